//! Short names for the models a classroom uses, mapped to a HuggingFace repo and files, plus
//! aliases users add in `config.toml`:
//!
//! ```toml
//! [aliases.my-model]
//! repo = "org/name"
//! revision = "main"          # optional
//! files = ["model.safetensors"]   # optional; all files when empty
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

/// One catalog entry.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct CatalogEntry {
    /// `org/name` on HuggingFace.
    pub repo: String,
    /// Branch, tag or commit.
    #[serde(default = "main")]
    pub revision: String,
    /// Files to fetch as `repo path` or `repo path=saved name`; empty means all.
    #[serde(default)]
    pub files: Vec<String>,
}

fn main() -> String {
    "main".into()
}

impl CatalogEntry {
    /// `(path in repo, path in the model)` pairs; empty means every file under its own path.
    pub fn file_map(&self) -> Vec<(String, String)> {
        self.files
            .iter()
            .map(|f| match f.split_once('=') {
                Some((from, to)) => (from.to_string(), to.to_string()),
                None => (f.clone(), f.clone()),
            })
            .collect()
    }
}

/// The built-in catalog.
pub fn builtin() -> BTreeMap<&'static str, CatalogEntry> {
    let entry = |repo: &str, files: &[&str]| CatalogEntry {
        repo: repo.into(),
        revision: "main".into(),
        files: files.iter().map(|f| f.to_string()).collect(),
    };
    BTreeMap::from([
        (
            "sd3.5_large",
            entry(
                "stabilityai/stable-diffusion-3.5-large",
                &["sd3.5_large.safetensors"],
            ),
        ),
        (
            "clip_g",
            entry(
                "stabilityai/stable-diffusion-3.5-large",
                &["text_encoders/clip_g.safetensors=clip_g.safetensors"],
            ),
        ),
        (
            "t5xxl_fp16",
            entry(
                "stabilityai/stable-diffusion-3.5-large",
                &["text_encoders/t5xxl_fp16.safetensors=t5xxl_fp16.safetensors"],
            ),
        ),
        (
            // SwarmUI's encoder-only T5 XXL (fp8), saved under the name SD3.5 workflows use.
            "t5xxl_enconly",
            entry(
                "mcmonkey/google_t5-v1_1-xxl_encoderonly",
                &["t5xxl_fp8_e4m3fn.safetensors=t5xxl_enconly.safetensors"],
            ),
        ),
        (
            "ltxv-13b",
            entry(
                "Lightricks/LTX-Video",
                &["ltxv-13b-0.9.7-distilled-fp8.safetensors"],
            ),
        ),
        (
            "sdxl-base",
            entry(
                "stabilityai/stable-diffusion-xl-base-1.0",
                &["sd_xl_base_1.0.safetensors"],
            ),
        ),
        (
            "sdxl-refiner",
            entry(
                "stabilityai/stable-diffusion-xl-refiner-1.0",
                &["sd_xl_refiner_1.0.safetensors"],
            ),
        ),
    ])
}

/// Looks a name up in the user's aliases first, then the built-in catalog.
pub fn lookup(name: &str, aliases: &BTreeMap<String, CatalogEntry>) -> Option<CatalogEntry> {
    aliases
        .get(name)
        .cloned()
        .or_else(|| builtin().get(name).cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_names_and_aliases() {
        let sd = lookup("sd3.5_large", &BTreeMap::new()).unwrap();
        assert_eq!(sd.repo, "stabilityai/stable-diffusion-3.5-large");
        let t5 = lookup("t5xxl_enconly", &BTreeMap::new()).unwrap();
        assert_eq!(
            t5.file_map(),
            vec![(
                "t5xxl_fp8_e4m3fn.safetensors".into(),
                "t5xxl_enconly.safetensors".into()
            )]
        );
        let mut aliases = BTreeMap::new();
        aliases.insert(
            "sd3.5_large".to_string(),
            CatalogEntry {
                repo: "me/fork".into(),
                revision: "main".into(),
                files: vec![],
            },
        );
        assert_eq!(lookup("sd3.5_large", &aliases).unwrap().repo, "me/fork");
        assert!(lookup("nope", &aliases).is_none());
        for entry in builtin().values() {
            assert!(
                crate::hf::RepoRef::parse(&entry.repo).is_some(),
                "{}",
                entry.repo
            );
        }
    }
}
