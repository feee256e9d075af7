//! `mesh verify`: re-hash blobs against their outboards, the way a peer's request would be
//! served (bao-tree's validated encoder, every 16 KiB chunk group against the outboard, every
//! outboard pair up to the root). A blob that fails is dropped at once: its record goes (so it
//! is no longer served), and so do its files in the store; a file added in place is only
//! forgotten. The next fetch of a model that used it gets it again from peers.

use std::{collections::HashMap, fs, io};

use bao_tree::{
    io::{outboard::PostOrderOutboard, sync::encode_ranges_validated, EncodeError},
    BaoTree, ChunkRanges,
};
use mesh_proto::Hash;
use positioned_io::RandomAccessFile;
use serde::{Deserialize, Serialize};

use super::{db, ranges_from_pairs, BlobRecord, Location, Store, StoreError, BLOCK_SIZE};

/// What `mesh verify` found for one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileState {
    /// Every byte matches.
    Ok,
    /// A download in progress; what is here matches.
    Partial,
    /// Not here.
    Missing,
    /// Failed verification: dropped from the store.
    Corrupt,
    /// A file added in place changed since it was hashed: forgotten.
    Changed,
    /// Being fetched right now: not checked.
    Busy,
}

/// One file's result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileCheck {
    /// Its path in the model.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// What was found.
    pub state: FileState,
}

/// One model's result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelCheck {
    /// The model's name.
    pub name: String,
    /// Its id (hex).
    pub id: String,
    /// Each file.
    pub files: Vec<FileCheck>,
}

/// What `mesh verify` found.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Each model checked.
    pub models: Vec<ModelCheck>,
    /// Blobs that failed and were dropped (each counted once).
    pub corrupt: usize,
    /// Bytes re-hashed.
    pub bytes: u64,
}

impl Store {
    /// Re-hashes the blobs of `models` (all models when empty) and drops the ones that fail.
    pub fn verify(&self, models: &[String]) -> Result<VerifyReport, StoreError> {
        let manifests = if models.is_empty() {
            self.manifests()?
        } else {
            models
                .iter()
                .map(|m| self.find_model(m))
                .collect::<Result<_, _>>()?
        };
        let mut report = VerifyReport::default();
        let mut seen: HashMap<Hash, FileState> = HashMap::new();
        for manifest in manifests {
            let mut files = Vec::new();
            for file in manifest.files() {
                let state = match seen.get(&file.hash) {
                    Some(state) => *state,
                    None => {
                        let state = self.verify_blob(file.hash, file.size)?;
                        if state == FileState::Corrupt {
                            report.corrupt += 1;
                        }
                        if state == FileState::Ok {
                            report.bytes += file.size;
                        }
                        seen.insert(file.hash, state);
                        state
                    }
                };
                files.push(FileCheck {
                    path: file.path.to_string(),
                    size: file.size,
                    state,
                });
            }
            report.models.push(ModelCheck {
                name: manifest.name().to_string(),
                id: manifest.id().to_string(),
                files,
            });
        }
        Ok(report)
    }

    /// Checks one blob; drops it if it fails.
    fn verify_blob(&self, hash: Hash, size: u64) -> Result<FileState, StoreError> {
        if size == 0 {
            return Ok(FileState::Ok);
        }
        if self.live_partial(hash).is_some() {
            return Ok(FileState::Busy);
        }
        let (data_path, ob_path, ranges, state) = match db::blob(&self.inner.db, hash)? {
            None => return Ok(FileState::Missing),
            Some(BlobRecord::Complete {
                size,
                location,
                mtime,
            }) => {
                let path = self.location_path(hash, &location);
                match self.check_unchanged(hash, &path, size, mtime) {
                    Ok(()) => {}
                    Err(StoreError::SourceChanged(_)) => {
                        // The record is gone; the store's own files go too.
                        if location == Location::Store {
                            let _ = fs::remove_file(&path);
                        }
                        let _ = fs::remove_file(self.outboard_path(hash));
                        return Ok(FileState::Changed);
                    }
                    Err(e) => return Err(e),
                }
                (
                    path,
                    self.outboard_path(hash),
                    ChunkRanges::all(),
                    FileState::Ok,
                )
            }
            Some(BlobRecord::Partial { have, .. }) => (
                self.partial_path(hash, "data"),
                self.partial_path(hash, "obao"),
                ranges_from_pairs(&have, size),
                FileState::Partial,
            ),
        };
        let open = |p: &std::path::Path| RandomAccessFile::open(p).map_err(StoreError::io(p));
        let outboard = PostOrderOutboard {
            root: hash.into(),
            tree: BaoTree::new(size, BLOCK_SIZE),
            data: open(&ob_path)?,
        };
        let data = open(&data_path)?;
        match encode_ranges_validated(&data, &outboard, &ranges, io::sink()) {
            Ok(()) => Ok(state),
            Err(EncodeError::Io(e)) if e.kind() != io::ErrorKind::UnexpectedEof => {
                Err(StoreError::io(&data_path)(e))
            }
            Err(e) => {
                tracing::warn!(
                    hash = %hash.fmt_short(),
                    path = %data_path.display(),
                    "blob failed verification ({e}): dropped, no longer served"
                );
                self.drop_blob(hash)?;
                Ok(FileState::Corrupt)
            }
        }
    }
}
