//! What can go wrong in the store, as [`StoreError`], with the exit code and hint each
//! failure shows the user, and [`disk_full`], which finds a full disk under any error.

use std::{
    io,
    path::{Path, PathBuf},
};

use mesh_proto::{Hash, ManifestError};

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process (usually a running `mesh node`) has the database open.
    #[error("the store at {0} is in use by another mesh process")]
    Locked(PathBuf),
    /// The metadata database failed.
    #[error("store database: {0}")]
    Db(Box<redb::Error>),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A record in the database does not decode.
    #[error("corrupt store record: {0}")]
    Record(#[from] postcard::Error),
    /// A manifest was rejected.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The store has no complete copy of the blob.
    #[error("blob {0} is not in the store")]
    NotFound(Hash),
    /// A file served in place changed since it was hashed; it is no longer served.
    #[error("{0} changed on disk since it was added; run `mesh add` again to re-hash it")]
    SourceChanged(PathBuf),
    /// A path given to `mesh add` has nothing to add.
    #[error("{0}: nothing to add (no regular files)")]
    Empty(PathBuf),
    /// No model of that name or id in this store.
    #[error("no model {0} in this store (`mesh ls` lists them)")]
    NoModel(String),
    /// `max_store` can't make room: what is left is pinned or needed by this fetch.
    #[error("max_store is {max} bytes and the store uses {used}: {need} more bytes do not fit, even with every unpinned model evicted ({evicted} were)")]
    Quota {
        /// Bytes the fetch needs.
        need: u64,
        /// Bytes the store uses after evicting.
        used: u64,
        /// The quota.
        max: u64,
        /// Models evicted before giving up.
        evicted: usize,
    },
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        Self::Db(Box::new(e))
    }
}

impl StoreError {
    /// The process exit code this error calls for (README.md documents them): 3 for an
    /// unknown model, 6 for a full disk or quota, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NoModel(_) => 3,
            Self::Quota { .. } => 6,
            e if disk_full(e) => 6,
            _ => 1,
        }
    }

    /// A one-line hint, where there is one.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Self::Quota { .. } => Some(QUOTA_HINT),
            e if disk_full(e) => Some(DISK_FULL_HINT),
            _ => None,
        }
    }

    pub(super) fn io(path: &Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What to tell a user whose disk filled up.
pub const DISK_FULL_HINT: &str = "the disk is full: free space (`mesh gc`, `mesh rm MODEL`) or set MESH_HOME to a bigger disk, then re-run: verified data is kept and the fetch resumes";
/// What to tell a user whose `max_store` is too small.
pub const QUOTA_HINT: &str =
    "raise max_store in config.toml (or MESH_MAX_STORE), or `mesh unpin` / `mesh rm` models";

/// Whether `err`, or any error under it, is a full disk (ENOSPC) or an exceeded disk quota
/// (EDQUOT).
pub fn disk_full(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        // redb's errors name no source: look inside the store's wrapper of them.
        let io = e
            .downcast_ref::<io::Error>()
            .or_else(|| match e.downcast_ref::<StoreError>() {
                Some(StoreError::Db(db)) => match &**db {
                    redb::Error::Io(io) => Some(io),
                    _ => None,
                },
                _ => None,
            });
        if let Some(io) = io {
            if matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
                || io.kind() == io::ErrorKind::StorageFull
            {
                return true;
            }
        }
        next = e.source();
    }
    false
}
