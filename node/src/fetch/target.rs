//! Where a fetched model goes: a [`Target`] is a root folder and a [`Layout`] that says where
//! under it each file lands. A fetch writes into one or more targets, and only once every file
//! is complete and verified in the store.
//!
//! Nothing is written outside a target's root: every path below it is resolved through
//! [`Root`], which refuses a symlink that leads out (exit 6).
//!
//! | layout | where a file of kind K with path P goes |
//! |---|---|
//! | `plain` | `ROOT/P` (a bundle entry's `to`: `ROOT/TO/P`, or `ROOT/TO` for one file) |
//! | `comfyui` | `ROOT/models/<ComfyUI folder of K>/P` (`checkpoints`, `clip`, `vae`, ...) |
//! | `swarmui` | `ROOT/Models/<SwarmUI folder of K>/P` (`Stable-Diffusion`, `clip`, `VAE`, ...) |
//! | `hf-cache` | `ROOT/models--org--name/{blobs,snapshots,refs}` (`hf::cache_out`) |
//! | `ollama` | `ROOT/P`: `blobs/sha256-<hex>` first, `manifests/...` last (`ollama::store_out`) |

use std::{
    fmt, fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    str::FromStr,
};

use mesh_proto::{FileEntry, Manifest, ModelRef};
use serde::{Deserialize, Serialize};

use super::{catalog::Kind, FetchError};
use crate::{
    hf::cache_out,
    ollama::{self, OllamaError},
    rooted::{Placed, Root},
    store::{Store, StoreError},
};

/// How files are placed under a target's root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// ComfyUI's `models/<folder for the kind>/`.
    #[serde(rename = "comfyui")]
    ComfyUi,
    /// The HuggingFace cache: `models--org--name/{blobs,snapshots,refs}` (see
    /// `hf::cache_out`); for models that came from HuggingFace.
    HfCache,
    /// An Ollama store: `manifests/<host>/<ns>/<model>/<tag>` and `blobs/sha256-<hex>`,
    /// blobs first and the manifest last (`ollama::store_out`); for `ollama:` models.
    Ollama,
    /// Each file at its path in the model.
    Plain,
    /// SwarmUI's `Models/<folder for the kind>/`.
    #[serde(rename = "swarmui")]
    SwarmUi,
}

impl FromStr for Layout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase())).map_err(|_| {
            format!("unknown layout {s:?} (one of: plain, comfyui, swarmui, hf-cache, ollama)")
        })
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let json = serde_json::to_value(self).expect("layouts serialize");
        f.write_str(json.as_str().expect("layouts serialize as strings"))
    }
}

/// A place a fetched model is materialized into.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The root folder: nothing is written outside it.
    pub root: PathBuf,
    /// Where each file goes under the root.
    pub layout: Layout,
    /// For app layouts: the kind of model, over what the catalog says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
    /// For `plain`: a place under the root (a bundle entry's `to`): a folder if it ends in
    /// `/`, else the path of the model's only file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

impl Target {
    /// Files at their model paths under `root`.
    pub fn folder(root: impl Into<PathBuf>) -> Self {
        Self::new(root, Layout::Plain)
    }

    /// `layout` under `root`.
    pub fn new(root: impl Into<PathBuf>, layout: Layout) -> Self {
        Self {
            root: root.into(),
            layout,
            kind: None,
            to: None,
        }
    }

    /// The HuggingFace cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`), if one can be found.
    pub fn hf_cache() -> Option<Self> {
        Some(Self::new(cache_out::cache_dir()?, Layout::HfCache))
    }

    /// Checks, before any byte moves, that the root can be written.
    pub(crate) fn check(&self) -> Result<(), FetchError> {
        let not_writable = |source| FetchError::TargetNotWritable {
            path: self.root.clone(),
            source,
        };
        fs::create_dir_all(&self.root).map_err(not_writable)?;
        let probe = self
            .root
            .join(format!(".mesh-write-test-{}", std::process::id()));
        fs::write(&probe, b"").map_err(not_writable)?;
        let _ = fs::remove_file(&probe);
        Ok(())
    }

    /// Puts every file of `manifest` (complete in the store) into place. `revision` is what
    /// the user asked for (a branch or tag name is recorded in the HF cache's `refs/`); `kind`
    /// is what the catalog says the model is. Returns the paths where another file was
    /// replaced.
    pub(crate) fn materialize(
        &self,
        store: &Store,
        manifest: &Manifest,
        revision: &str,
        kind: Option<Kind>,
    ) -> Result<Vec<PathBuf>, FetchError> {
        match self.layout {
            Layout::HfCache => {
                let snapshot = cache_out::export(store, manifest, revision, &self.root)?;
                tracing::info!(snapshot = %snapshot.display(), "exported to the HuggingFace cache");
                Ok(Vec::new())
            }
            Layout::Ollama => {
                if !matches!(manifest.source(), mesh_proto::Source::Ollama { .. }) {
                    return Err(OllamaError::BadName(manifest.name().to_string()).into());
                }
                ollama::store_out::write(store, manifest, &self.root)?;
                Ok(Vec::new())
            }
            _ => {
                let root = Root::open(&self.root)?;
                let dests = self.dests(manifest, kind)?;
                place_files(store, &root, &dests)
            }
        }
    }

    /// Each file of `manifest` with its path under the root (for every layout but the HF
    /// cache's).
    pub fn dests<'a>(
        &self,
        manifest: &'a Manifest,
        kind: Option<Kind>,
    ) -> Result<Vec<(&'a FileEntry, String)>, FetchError> {
        let files = manifest.files();
        if let Some(to) = self.to.as_deref().filter(|to| !to.ends_with('/')) {
            if files.len() != 1 && self.layout == Layout::Plain {
                return Err(FetchError::BadTo {
                    to: to.to_string(),
                    files: files.len(),
                });
            }
        }
        let kind = match self.layout {
            Layout::ComfyUi | Layout::SwarmUi => {
                Some(self.kind.or(kind).ok_or_else(|| FetchError::NoKind {
                    model: manifest.name().to_string(),
                    layout: self.layout,
                })?)
            }
            _ => None,
        };
        Ok(files
            .iter()
            .map(|f| (f, self.dest(f.path.as_str(), files.len(), kind)))
            .collect())
    }

    /// Where the file `path` of a model of `files` files goes under the root, for a plan
    /// (an app layout without a kind keeps the plain path).
    pub fn dest_of(&self, path: &str, files: usize) -> String {
        self.dest(path, files, self.kind)
    }

    pub(super) fn dest(&self, path: &str, files: usize, kind: Option<Kind>) -> String {
        match (self.layout, kind) {
            (Layout::ComfyUi, Some(kind)) => format!("models/{}/{path}", kind.comfyui_folder()),
            (Layout::SwarmUi, Some(kind)) => format!("Models/{}/{path}", kind.swarmui_folder()),
            _ => match self.to.as_deref() {
                None | Some("") => path.to_string(),
                Some(dir) if dir.ends_with('/') => format!("{dir}{path}"),
                Some(file) if files == 1 => file.to_string(),
                Some(dir) => format!("{dir}/{path}"),
            },
        }
    }
}

/// The targets of `mesh fetch MODEL [--to DIR] [--layout L] [--kind K] [--hf-cache]`:
/// `--to` (default `./NAME`, or the HF cache for `--layout hf-cache`) in `layout`, plus the HF
/// cache for `--hf-cache`. App layouts need `--to` (the app's folder). `ollama:` models go
/// into the Ollama store (`OLLAMA_MODELS`, ...) by default.
pub fn targets_for(
    model: &ModelRef,
    to: Option<PathBuf>,
    layout: Option<Layout>,
    kind: Option<Kind>,
    also_hf_cache: bool,
    cwd: &Path,
) -> Result<Vec<Target>, String> {
    let no_cache = || "no HuggingFace cache folder: set HF_HUB_CACHE or HF_HOME".to_string();
    let is_ollama = matches!(model, ModelRef::Name(n) if n.starts_with(ollama::PREFIX));
    let layout = layout.unwrap_or(if is_ollama {
        Layout::Ollama
    } else {
        Layout::Plain
    });
    let root = match (to, layout) {
        (Some(to), _) => cwd.join(to),
        (None, Layout::Plain) => default_folder(model, cwd),
        (None, Layout::HfCache) => cache_out::cache_dir().ok_or_else(no_cache)?,
        (None, Layout::Ollama) => {
            ollama::write_store().ok_or("no home folder: set OLLAMA_MODELS")?
        }
        (None, _) => {
            return Err(format!(
                "--layout {layout} needs the app's folder: --to DIR"
            ))
        }
    };
    let mut targets = vec![Target {
        kind,
        ..Target::new(root, layout)
    }];
    if also_hf_cache && layout != Layout::HfCache {
        targets.push(Target::hf_cache().ok_or_else(no_cache)?);
    }
    Ok(targets)
}

/// The folder `mesh fetch MODEL` writes to without `--to`: `./NAME` (like `git clone`), with
/// `org--name` for a HuggingFace repo and the short id for a model id.
pub fn default_folder(model: &ModelRef, cwd: &Path) -> PathBuf {
    cwd.join(match model {
        ModelRef::Name(name) => {
            let name = name.strip_prefix("hf://").unwrap_or(name);
            let name = name.split('@').next().unwrap_or(name);
            name.replace('/', "--")
        }
        ModelRef::Id(id) => id.fmt_short(),
    })
}

/// Checks that the store's disk has room for `missing` bytes (and their outboards), and
/// that every target on another file system has room for a full copy.
pub(crate) fn check_space(
    store: &Store,
    targets: &[Target],
    missing: u64,
    total: u64,
) -> Result<(), FetchError> {
    let outboards = missing / 256;
    let mut checks = vec![(store.home().to_path_buf(), missing + outboards)];
    let dev = |p: &Path| fs::metadata(p).map(|m| m.dev()).ok();
    for target in targets {
        if dev(store.home()) != dev(&target.root) {
            // Hard links can't cross file systems: the target needs a full copy.
            checks.push((target.root.clone(), total));
        }
    }
    for (path, need) in checks {
        let available = fs4::available_space(&path).map_err(|e| {
            FetchError::Store(StoreError::Io {
                path: path.clone(),
                source: e,
            })
        })?;
        if need > available {
            return Err(FetchError::NoSpace {
                path,
                need,
                available,
            });
        }
    }
    Ok(())
}

/// Links (or copies across file systems) each file to its path under `root`, atomically: a
/// file at its final path is always whole and verified. Returns the paths where another file
/// was replaced.
fn place_files(
    store: &Store,
    root: &Root,
    dests: &[(&FileEntry, String)],
) -> Result<Vec<PathBuf>, FetchError> {
    let mut replaced = Vec::new();
    for (file, rel) in dests {
        let (dir, name) = root.parent_of(rel, true)?;
        let err = |source| FetchError::Materialize {
            path: dir.join(&name),
            source,
        };
        let src = match file.size {
            0 if dir.file_size(&name).map_err(err)? == Some(0) => continue,
            0 => None,
            _ => {
                store.share_for_export(file.hash)?;
                Some(store.data_path(file.hash)?)
            }
        };
        if dir.place(&name, src.as_deref()).map_err(err)? == Placed::Replaced {
            tracing::warn!(path = %dir.join(&name).display(), "replaced a different file");
            replaced.push(dir.join(&name));
        }
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_folders_are_named_after_the_model() {
        let cwd = Path::new("/w");
        let name = |s: &str| default_folder(&ModelRef::Name(s.into()), cwd);
        assert_eq!(name("sd3.5_large"), Path::new("/w/sd3.5_large"));
        assert_eq!(name("hf://org/repo@v1"), Path::new("/w/org--repo"));
        assert_eq!(name("org/repo"), Path::new("/w/org--repo"));
    }

    #[test]
    fn targets_serialize_with_kebab_case_layouts() {
        let t = Target::new("/c", Layout::HfCache);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#"{"root":"/c","layout":"hf-cache"}"#);
        for layout in ["plain", "comfyui", "swarmui", "hf-cache"] {
            assert_eq!(layout.parse::<Layout>().unwrap().to_string(), layout);
        }
        assert!("ollama2".parse::<Layout>().is_err());
    }
}
