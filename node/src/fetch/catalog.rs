//! Short names for the models a classroom uses, mapped to a HuggingFace repo and files, plus
//! aliases users add in `config.toml`:
//!
//! ```toml
//! [aliases.my-model]
//! repo = "org/name"
//! revision = "main"          # optional
//! files = ["model.safetensors"]   # optional; all files when empty
//! kind = "lora"              # optional; where app layouts (ComfyUI, SwarmUI) put it
//! ```

use std::{collections::BTreeMap, fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// What a model file is to an app: it decides the folder `--layout comfyui|swarmui` puts it
/// in ([`Kind::comfyui_folder`], [`Kind::swarmui_folder`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A full checkpoint (UNet/DiT, text encoders and VAE in one file).
    Checkpoint,
    /// A CLIP vision encoder (image prompts, IP-Adapter).
    ClipVision,
    /// A ControlNet.
    Controlnet,
    /// A diffusion model alone (UNet/DiT, no encoders).
    DiffusionModel,
    /// A textual-inversion embedding.
    Embedding,
    /// A LoRA (or LyCORIS) adapter.
    Lora,
    /// A text encoder (CLIP-L/G, T5).
    TextEncoder,
    /// An upscaler (ESRGAN and friends).
    Upscaler,
    /// A VAE.
    Vae,
}

impl Kind {
    /// Every kind, for help texts.
    pub const ALL: [Self; 9] = [
        Self::Checkpoint,
        Self::ClipVision,
        Self::Controlnet,
        Self::DiffusionModel,
        Self::Embedding,
        Self::Lora,
        Self::TextEncoder,
        Self::Upscaler,
        Self::Vae,
    ];

    /// The folder under ComfyUI's `models/` (ComfyUI's `folder_paths.py`). Text encoders go
    /// to `clip` and diffusion models to `diffusion_models`: ComfyUI scans `clip` for text
    /// encoders in every version (newer ones also `text_encoders`), and it is where SwarmUI
    /// and the lab's setup put them.
    pub fn comfyui_folder(self) -> &'static str {
        match self {
            Self::Checkpoint => "checkpoints",
            Self::ClipVision => "clip_vision",
            Self::Controlnet => "controlnet",
            Self::DiffusionModel => "diffusion_models",
            Self::Embedding => "embeddings",
            Self::Lora => "loras",
            Self::TextEncoder => "clip",
            Self::Upscaler => "upscale_models",
            Self::Vae => "vae",
        }
    }

    /// The folder under SwarmUI's `Models/` (SwarmUI's default `Paths` settings; upscalers
    /// and diffusion models are the folders it forwards to its ComfyUI backend).
    pub fn swarmui_folder(self) -> &'static str {
        match self {
            Self::Checkpoint => "Stable-Diffusion",
            Self::ClipVision => "clip_vision",
            Self::Controlnet => "controlnet",
            Self::DiffusionModel => "diffusion_models",
            Self::Embedding => "Embeddings",
            Self::Lora => "Lora",
            Self::TextEncoder => "clip",
            Self::Upscaler => "upscale_models",
            Self::Vae => "VAE",
        }
    }
}

impl FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.to_ascii_lowercase().replace('_', "-");
        Ok(match s.as_str() {
            "checkpoint" | "checkpoints" => Self::Checkpoint,
            "clip-vision" => Self::ClipVision,
            "controlnet" => Self::Controlnet,
            "diffusion-model" | "diffusion-models" | "unet" => Self::DiffusionModel,
            "embedding" | "embeddings" => Self::Embedding,
            "lora" | "loras" => Self::Lora,
            "text-encoder" | "text-encoders" | "clip" => Self::TextEncoder,
            "upscaler" | "upscale-models" => Self::Upscaler,
            "vae" => Self::Vae,
            _ => {
                let all: Vec<String> = Self::ALL.iter().map(Self::to_string).collect();
                return Err(format!("unknown kind {s:?} (one of: {})", all.join(", ")));
            }
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let json = serde_json::to_value(self).expect("kinds serialize");
        f.write_str(json.as_str().expect("kinds serialize as strings"))
    }
}

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
    /// What kind of model it is, for app layouts.
    #[serde(default)]
    pub kind: Option<Kind>,
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
    let entry = |repo: &str, files: &[&str], kind| CatalogEntry {
        repo: repo.into(),
        revision: "main".into(),
        files: files.iter().map(|f| f.to_string()).collect(),
        kind: Some(kind),
    };
    BTreeMap::from([
        (
            "sd3.5_large",
            entry(
                "stabilityai/stable-diffusion-3.5-large",
                &["sd3.5_large.safetensors"],
                Kind::Checkpoint,
            ),
        ),
        (
            "clip_g",
            entry(
                "stabilityai/stable-diffusion-3.5-large",
                &["text_encoders/clip_g.safetensors=clip_g.safetensors"],
                Kind::TextEncoder,
            ),
        ),
        (
            "t5xxl_fp16",
            entry(
                "stabilityai/stable-diffusion-3.5-large",
                &["text_encoders/t5xxl_fp16.safetensors=t5xxl_fp16.safetensors"],
                Kind::TextEncoder,
            ),
        ),
        (
            // SwarmUI's encoder-only T5 XXL (fp8), saved under the name SD3.5 workflows use.
            "t5xxl_enconly",
            entry(
                "mcmonkey/google_t5-v1_1-xxl_encoderonly",
                &["t5xxl_fp8_e4m3fn.safetensors=t5xxl_enconly.safetensors"],
                Kind::TextEncoder,
            ),
        ),
        (
            "ltxv-13b",
            entry(
                "Lightricks/LTX-Video",
                &["ltxv-13b-0.9.7-distilled-fp8.safetensors"],
                Kind::Checkpoint,
            ),
        ),
        (
            "sdxl-base",
            entry(
                "stabilityai/stable-diffusion-xl-base-1.0",
                &["sd_xl_base_1.0.safetensors"],
                Kind::Checkpoint,
            ),
        ),
        (
            "sdxl-refiner",
            entry(
                "stabilityai/stable-diffusion-xl-refiner-1.0",
                &["sd_xl_refiner_1.0.safetensors"],
                Kind::Checkpoint,
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
                kind: None,
            },
        );
        assert_eq!(lookup("sd3.5_large", &aliases).unwrap().repo, "me/fork");
        assert!(lookup("nope", &aliases).is_none());
        assert_eq!(
            lookup("clip_g", &BTreeMap::new()).unwrap().kind,
            Some(Kind::TextEncoder)
        );
        for kind in Kind::ALL {
            assert_eq!(kind.to_string().parse::<Kind>(), Ok(kind));
        }
        assert_eq!("clip".parse::<Kind>(), Ok(Kind::TextEncoder));
        for entry in builtin().values() {
            assert!(
                crate::hf::RepoRef::parse(&entry.repo).is_some(),
                "{}",
                entry.repo
            );
        }
    }
}
