//! Materializing a model into the HuggingFace cache layout, so `from_pretrained` and
//! `snapshot_download(..., local_files_only=True)` find it offline:
//!
//! ```text
//! $HF_HUB_CACHE/models--org--name/
//!   blobs/<etag>                          hard link to the store's blob (never a second copy)
//!   snapshots/<commit>/<path>             symlink -> ../../blobs/<etag> (relative)
//!   refs/<revision>                       the commit, for a branch or tag revision
//! ```
//!
//! Every path is resolved under the cache folder through `rooted::Root`: a symlink in the
//! cache that leads outside it is refused, never written through.

use std::{
    io,
    path::{Path, PathBuf},
};

use mesh_proto::{Manifest, Source};

use crate::{
    rooted::{Root, RootError},
    store::{Store, StoreError},
};

/// Why the export failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HfCacheError {
    /// The model did not come from HuggingFace.
    #[error("{0} did not come from HuggingFace: nothing to put in its cache")]
    NotFromHub(String),
    /// A file lacks the etag HF clients key their cache on.
    #[error("{0} has no HuggingFace etag")]
    NoEtag(String),
    /// Store lookup failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A path in the cache leads outside it, or can't be written.
    #[error(transparent)]
    Root(#[from] RootError),
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// The hub cache folder: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return Some(dir.into());
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(home).join("hub"));
    }
    dirs::home_dir().map(|h| h.join(".cache/huggingface/hub"))
}

/// Writes `manifest` into `cache` for `revision`. Returns the snapshot folder.
pub fn export(
    store: &Store,
    manifest: &Manifest,
    revision: &str,
    cache: &Path,
) -> Result<PathBuf, HfCacheError> {
    let Source::HuggingFace { repo, commit } = manifest.source() else {
        return Err(HfCacheError::NotFromHub(manifest.name().to_string()));
    };
    let io = |path: PathBuf| move |source| HfCacheError::Io { path, source };
    let root = Root::open(cache)?;
    let base = format!("models--{}", repo.replace('/', "--"));
    let blobs = root.dir(&format!("{base}/blobs"), true)?;
    let snapshot = format!("{base}/snapshots/{commit}");
    for file in manifest.files() {
        let etag = file
            .etag
            .as_deref()
            .ok_or_else(|| HfCacheError::NoEtag(file.path.to_string()))?;
        if blobs.stat(etag).map_err(io(blobs.join(etag)))?.is_none() {
            let src = match file.size {
                0 => None,
                _ => {
                    store.share_for_export(file.hash)?;
                    Some(store.data_path(file.hash)?)
                }
            };
            blobs
                .place(etag, src.as_deref())
                .map_err(io(blobs.join(etag)))?;
        }
        let depth = file.path.as_str().split('/').count() + 1;
        let target = PathBuf::from("../".repeat(depth)).join("blobs").join(etag);
        root.symlink(&format!("{snapshot}/{}", file.path), &target)?;
    }
    if revision != commit {
        let (refs, name) = root.parent_of(&format!("{base}/refs/{revision}"), true)?;
        refs.write_atomic(&name, commit.as_bytes(), &refs)
            .map_err(io(refs.join(&name)))?;
    }
    Ok(root.dir(&snapshot, false)?.path().to_path_buf())
}
