//! Materializing a model into the HuggingFace cache layout, so `from_pretrained` and
//! `snapshot_download(..., local_files_only=True)` find it offline:
//!
//! ```text
//! $HF_HUB_CACHE/models--org--name/
//!   blobs/<etag>                          hard link to the store's blob (never a second copy)
//!   snapshots/<commit>/<path>             symlink -> ../../blobs/<etag> (relative)
//!   refs/<revision>                       the commit, for a branch or tag revision
//! ```

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use mesh_proto::{Manifest, Source};

use crate::store::{Store, StoreError};

/// Hard-links `src` to `dest`, or copies it (synced) where a link is impossible.
pub(crate) fn link_or_copy(src: &Path, dest: &Path) -> io::Result<()> {
    if fs::hard_link(src, dest).is_ok() {
        return Ok(());
    }
    fs::copy(src, dest)?;
    fs::File::open(dest)?.sync_all()
}

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
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| HfCacheError::Io { path, source }
    };
    let base = cache.join(format!("models--{}", repo.replace('/', "--")));
    let blobs = base.join("blobs");
    let snapshot = base.join("snapshots").join(commit);
    fs::create_dir_all(&blobs).map_err(io(&blobs))?;
    fs::create_dir_all(&snapshot).map_err(io(&snapshot))?;
    for file in manifest.files() {
        let etag = file
            .etag
            .as_deref()
            .ok_or_else(|| HfCacheError::NoEtag(file.path.to_string()))?;
        let blob = blobs.join(etag);
        if !blob.exists() {
            let tmp = blobs.join(format!("{etag}.mesh-tmp"));
            let _ = fs::remove_file(&tmp);
            if file.size == 0 {
                fs::File::create(&tmp).map_err(io(&tmp))?;
            } else {
                let src = store.data_path(file.hash)?;
                link_or_copy(&src, &tmp).map_err(io(&tmp))?;
            }
            fs::rename(&tmp, &blob).map_err(io(&blob))?;
        }
        let link = file.path.under(&snapshot);
        let parent = link.parent().expect("a snapshot file has a folder");
        fs::create_dir_all(parent).map_err(io(parent))?;
        let depth = file.path.as_str().split('/').count() + 1;
        let target = PathBuf::from("../".repeat(depth)).join("blobs").join(etag);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link).map_err(io(&link))?;
    }
    if revision != commit {
        let refs = base.join("refs");
        fs::create_dir_all(&refs).map_err(io(&refs))?;
        let r = refs.join(revision);
        if let Some(parent) = r.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        fs::write(&r, commit).map_err(io(&r))?;
    }
    Ok(snapshot)
}
