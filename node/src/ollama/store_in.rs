//! The local Ollama store, imported in place when the node starts: each manifest
//! (`manifests/*/*/*/*`, regular files) whose name is valid and whose blobs are all there and
//! hash to their sha256 digests becomes the mesh model `ollama:<name>:<tag>`, its blobs served
//! where they are. Nothing in the Ollama store is written, moved or touched.
//!
//! Blob names are never trusted (Ollama renames a blob before it verifies it): every blob is
//! hashed whole once (the store then remembers its sha256 by BLAKE3 root). A model with a
//! missing or corrupt blob is skipped with a warning, never offered. A manifest Ollama is
//! rewriting (it writes them in place) may read truncated: it is read again once.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_proto::{FileEntry, Manifest, ModelRef, RelPath, Source};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{manifest_blobs, sha256_hex, BlobRef, OllamaName};
use crate::store::{digest::Published, Store, StoreError};

/// Scans the store at `root` on a blocking thread; stops early when `cancel` fires.
pub fn spawn_scan(store: Store, root: PathBuf, cancel: CancellationToken) {
    tokio::task::spawn_blocking(move || match scan(&store, &root, &cancel) {
        Ok(0) => {}
        Ok(n) => info!(models = n, store = %root.display(), "Ollama models imported"),
        Err(e) => warn!(store = %root.display(), "Ollama store scan failed: {e}"),
    });
}

/// Imports every model of the store at `root` not yet in the mesh store; returns how many.
pub fn scan(store: &Store, root: &Path, cancel: &CancellationToken) -> Result<usize, StoreError> {
    let mut imported = 0;
    for (name, path) in manifests(root) {
        if cancel.is_cancelled() {
            break;
        }
        let Some(bytes) = read_manifest(&path) else {
            warn!(path = %path.display(), "Ollama manifest does not parse: skipped");
            continue;
        };
        if let Some(manifest) = import(store, root, &name, &bytes)? {
            info!(
                model = manifest.name(),
                files = manifest.files().len(),
                bytes = manifest.total_size(),
                "serving an Ollama model in place"
            );
            imported += 1;
        }
    }
    Ok(imported)
}

/// Every `manifests/<host>/<ns>/<model>/<tag>` regular file with a valid name.
fn manifests(root: &Path) -> Vec<(OllamaName, PathBuf)> {
    let dirs = |p: &Path| -> Vec<(String, PathBuf)> {
        let Ok(entries) = fs::read_dir(p) else {
            return Vec::new();
        };
        let mut out: Vec<_> = entries
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        out.sort();
        out
    };
    let mut out = Vec::new();
    for (host, h) in dirs(&root.join("manifests")) {
        for (ns, n) in dirs(&h) {
            for (model, m) in dirs(&n) {
                for (tag, t) in dirs(&m) {
                    let name = OllamaName::from_parts(&host, &ns, &model, &tag);
                    match name {
                        Some(name) if t.is_file() => out.push((name, t)),
                        _ => {}
                    }
                }
            }
        }
    }
    out
}

/// The manifest's bytes, if they parse (read twice: Ollama rewrites manifests in place).
fn read_manifest(path: &Path) -> Option<Vec<u8>> {
    for attempt in 0..2 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Ok(bytes) = fs::read(path) {
            if manifest_blobs(&bytes).is_ok() {
                return Some(bytes);
            }
        }
    }
    None
}

/// Imports one model; `None` if it is already imported, or unusable (logged).
pub fn import(
    store: &Store,
    root: &Path,
    name: &OllamaName,
    bytes: &[u8],
) -> Result<Option<Manifest>, StoreError> {
    let digest = sha256_hex(bytes);
    let mesh_name = name.mesh_name();
    if let Some(known) = store.manifest(&ModelRef::Name(mesh_name.clone()))? {
        let same = matches!(known.source(), Source::Ollama { digest: d, .. } if *d == digest);
        if same
            && known
                .files()
                .iter()
                .all(|f| store.data_path(f.hash).is_ok())
        {
            return Ok(None);
        }
    }
    let blobs = manifest_blobs(bytes).expect("read_manifest checked it");
    let mut entries = Vec::new();
    for blob in &blobs {
        match import_blob(store, root, blob)? {
            Some(entry) => entries.push(entry),
            None => {
                warn!(model = %mesh_name, blob = %blob.sha256, "Ollama model incomplete or corrupt: not served");
                return Ok(None);
            }
        }
    }
    // The manifest itself is copied into the store: Ollama rewrites it in place.
    let tmp = store
        .home()
        .join("partial")
        .join(format!("ollama-{digest}.{}.tmp", std::process::id()));
    fs::write(&tmp, bytes).map_err(|source| StoreError::Io {
        path: tmp.clone(),
        source,
    })?;
    let (hash, size) = store.import_owned(&tmp)?;
    entries.push(FileEntry {
        path: rel(&name.manifest_path())?,
        size,
        hash,
        sha256: Some(digest.clone()),
        etag: None,
    });
    let source = Source::Ollama {
        name: name.full(),
        digest,
    };
    let manifest = Manifest::new(mesh_name, source, entries)?;
    store.insert_manifest(&manifest)?;
    Ok(Some(manifest))
}

/// Checks one blob (size, then its whole sha256) and serves it in place; `None` if it is
/// missing or does not match.
fn import_blob(
    store: &Store,
    root: &Path,
    blob: &BlobRef,
) -> Result<Option<FileEntry>, StoreError> {
    let blobs = root.join("blobs");
    let path = [
        format!("sha256-{}", blob.sha256),
        format!("sha256:{}", blob.sha256),
    ]
    .into_iter()
    .map(|n| blobs.join(n))
    .find(|p| p.is_file());
    let Some(path) = path else {
        return Ok(None);
    };
    match fs::metadata(&path) {
        Ok(meta) if meta.len() == blob.size => {}
        _ => return Ok(None),
    }
    let hash = match store.blob_for_etag(&blob.sha256)? {
        Some(hash) => hash,
        None => {
            let published = Published::Sha256(blob.sha256.clone());
            let actual = match published.of_file(&path) {
                Ok(actual) => actual,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(source) => return Err(StoreError::Io { path, source }),
            };
            if actual != blob.sha256 {
                warn!(path = %path.display(), %actual, "Ollama blob does not match its sha256 digest: not served");
                return Ok(None);
            }
            let (hash, _) = store.add_in_place(&path)?;
            store.record_etag(&blob.sha256, hash)?;
            hash
        }
    };
    Ok(Some(FileEntry {
        path: rel(&blob.path())?,
        size: blob.size,
        hash,
        sha256: Some(blob.sha256.clone()),
        etag: Some(blob.sha256.clone()),
    }))
}

fn rel(path: &str) -> Result<RelPath, StoreError> {
    Ok(path.parse::<RelPath>()?)
}
