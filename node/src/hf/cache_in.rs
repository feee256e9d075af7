//! HF cache in: models already in the HuggingFace cache (`HF_HUB_CACHE`, `HF_HOME/hub`,
//! `~/.cache/huggingface/hub`) are found when the node starts, checked against the etag HF
//! named each blob by (sha256 for LFS files, git blob id otherwise), hashed in the background
//! with progress in the logs, and served in place as `org/name` models. A blob that doesn't
//! match its name is skipped, never served.

use std::{
    fs,
    path::{Path, PathBuf},
};

use mesh_proto::{FileEntry, Manifest, RelPath, Source};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::HubFile;
use crate::store::{Store, StoreError};

/// Scans `cache` on a blocking thread; stops early when `cancel` fires.
pub fn spawn_scan(store: Store, cache: PathBuf, cancel: CancellationToken) {
    tokio::task::spawn_blocking(move || match scan(&store, &cache, &cancel) {
        Ok(0) => {}
        Ok(n) => info!(models = n, cache = %cache.display(), "HuggingFace cache imported"),
        Err(e) => warn!(cache = %cache.display(), "HuggingFace cache scan failed: {e}"),
    });
}

/// Imports every snapshot not yet in the store; returns how many were imported.
pub fn scan(store: &Store, cache: &Path, cancel: &CancellationToken) -> Result<usize, StoreError> {
    let Ok(entries) = fs::read_dir(cache) else {
        return Ok(0);
    };
    let known: Vec<(String, String)> = store
        .manifests()?
        .into_iter()
        .filter_map(|m| match m.source() {
            Source::HuggingFace { repo, commit } => Some((repo.clone(), commit.clone())),
            _ => None,
        })
        .collect();
    let mut imported = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(repo) = name
            .strip_prefix("models--")
            .map(|r| r.replacen("--", "/", 1))
        else {
            continue;
        };
        let Ok(snapshots) = fs::read_dir(entry.path().join("snapshots")) else {
            continue;
        };
        for snapshot in snapshots.flatten() {
            if cancel.is_cancelled() {
                return Ok(imported);
            }
            let commit = snapshot.file_name().to_string_lossy().into_owned();
            if known.iter().any(|(r, c)| *r == repo && *c == commit) {
                continue;
            }
            info!(%repo, %commit, "hashing a model from the HuggingFace cache");
            match import_snapshot(store, &repo, &commit, &snapshot.path(), cancel)? {
                Some(manifest) => {
                    info!(%repo, files = manifest.files().len(), bytes = manifest.total_size(), "serving it in place");
                    imported += 1;
                }
                None => warn!(%repo, %commit, "nothing usable in this snapshot"),
            }
        }
    }
    Ok(imported)
}

fn import_snapshot(
    store: &Store,
    repo: &str,
    commit: &str,
    dir: &Path,
    cancel: &CancellationToken,
) -> Result<Option<Manifest>, StoreError> {
    let mut files = Vec::new();
    walk(dir, dir, &mut files);
    let mut entries = Vec::new();
    for (rel, link) in files {
        if cancel.is_cancelled() {
            return Ok(None);
        }
        // HF names each blob by its etag; the snapshot entry links to it.
        let Ok(blob) = fs::canonicalize(&link) else {
            continue;
        };
        let Some(etag) = blob
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
        else {
            continue;
        };
        let is_hex = |s: &str, n| s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
        let sha256 = is_hex(&etag, 64).then(|| etag.clone());
        if sha256.is_none() && !is_hex(&etag, 40) {
            continue;
        }
        let Ok(meta) = fs::metadata(&blob) else {
            continue;
        };
        let hub_file = HubFile {
            path: rel.to_string(),
            size: meta.len(),
            sha256: sha256.clone(),
            git_oid: etag.clone(),
        };
        let hash = match store.blob_for_etag(&etag)? {
            Some(hash) => hash,
            None => {
                let digest =
                    hub_file
                        .published()
                        .of_file(&blob)
                        .map_err(|source| StoreError::Io {
                            path: blob.clone(),
                            source,
                        })?;
                if digest != etag {
                    warn!(path = %blob.display(), "HF cache blob does not match its name: skipped");
                    continue;
                }
                let (hash, _) = store.add_in_place(&blob)?;
                store.record_etag(&etag, hash)?;
                hash
            }
        };
        entries.push(FileEntry {
            path: rel,
            size: meta.len(),
            hash,
            sha256,
            etag: Some(etag),
        });
    }
    if entries.is_empty() {
        return Ok(None);
    }
    let manifest = Manifest::new(
        repo.to_string(),
        Source::HuggingFace {
            repo: repo.to_string(),
            commit: commit.to_string(),
        },
        entries,
    )?;
    store.insert_manifest(&manifest)?;
    Ok(Some(manifest))
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(RelPath, PathBuf)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(root, &path, out);
        } else if path.is_file() {
            if let Ok(rel) = RelPath::from_path(path.strip_prefix(root).expect("below root")) {
                out.push((rel, path));
            }
        }
    }
}
