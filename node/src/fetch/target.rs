//! Where a fetched model goes: a [`Target`] is a root folder and a [`Layout`] that says where
//! under it each file lands. A fetch writes into one or more targets, and only once every file
//! is complete and verified in the store.
//!
//! An app's folder layout (ComfyUI, SwarmUI, Ollama) is one more [`Layout`] here.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use mesh_proto::{Manifest, ModelRef};
use serde::{Deserialize, Serialize};

use super::FetchError;
use crate::{
    hf::cache_out::{self, link_or_copy},
    store::{Store, StoreError},
};

/// How files are placed under a target's root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Each file at its path in the model.
    Plain,
    /// The HuggingFace cache: `models--org--name/{blobs,snapshots,refs}` (see
    /// `hf::cache_out`); for models that came from HuggingFace.
    HfCache,
}

/// A place a fetched model is materialized into.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The root folder: nothing is written outside it.
    pub root: PathBuf,
    /// Where each file goes under the root.
    pub layout: Layout,
}

impl Target {
    /// Files at their model paths under `root`.
    pub fn folder(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            layout: Layout::Plain,
        }
    }

    /// The HuggingFace cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`), if one can be found.
    pub fn hf_cache() -> Option<Self> {
        Some(Self {
            root: cache_out::cache_dir()?,
            layout: Layout::HfCache,
        })
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
    /// the user asked for (a branch or tag name is recorded in the HF cache's `refs/`).
    pub(crate) fn materialize(
        &self,
        store: &Store,
        manifest: &Manifest,
        revision: &str,
    ) -> Result<(), FetchError> {
        match self.layout {
            Layout::Plain => materialize_plain(store, manifest, &self.root),
            Layout::HfCache => {
                let snapshot = cache_out::export(store, manifest, revision, &self.root)?;
                tracing::info!(snapshot = %snapshot.display(), "exported to the HuggingFace cache");
                Ok(())
            }
        }
    }
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

/// Links (or copies across file systems) each file into `to`, atomically: a file at its final
/// path is always whole and verified.
fn materialize_plain(store: &Store, manifest: &Manifest, to: &Path) -> Result<(), FetchError> {
    for file in manifest.files() {
        let dest = file.path.under(to);
        let err = |source| FetchError::Materialize {
            path: dest.clone(),
            source,
        };
        let parent = dest.parent().expect("a path under a folder has a parent");
        fs::create_dir_all(parent).map_err(err)?;
        let tmp = parent.join(format!(
            ".{}.mesh-tmp",
            dest.file_name()
                .expect("a file path has a name")
                .to_string_lossy()
        ));
        let _ = fs::remove_file(&tmp);
        if file.size == 0 {
            fs::File::create(&tmp).map_err(err)?;
        } else {
            let src = store.data_path(file.hash)?;
            if same_file(&src, &dest) {
                continue;
            }
            link_or_copy(&src, &tmp).map_err(err)?;
        }
        fs::rename(&tmp, &dest).map_err(err)?;
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
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
        let t = Target {
            root: "/c".into(),
            layout: Layout::HfCache,
        };
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#"{"root":"/c","layout":"hf-cache"}"#);
    }
}
