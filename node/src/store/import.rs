//! `mesh add`: hash files where they are (`outboard.rs`) and record them as a model served in
//! place.

use std::{
    fs,
    path::{Path, PathBuf},
};

use mesh_proto::{FileEntry, Hash, Manifest, RelPath, Source};

use super::{db, mtime_of, outboard::outboard_post_order, BlobRecord, Location, Store, StoreError};
/// Folder names skipped when adding a folder: version control and tool caches.
const SKIPPED_DIRS: [&str; 2] = [".git", ".cache"];

/// Progress of `mesh add`, reported after each file.
#[derive(Clone, Debug)]
pub struct AddProgress {
    /// The file just hashed.
    pub path: RelPath,
    /// Bytes hashed so far, over all files.
    pub done: u64,
    /// Bytes to hash in all.
    pub total: u64,
}

pub(super) fn add_path(
    store: &Store,
    path: &Path,
    name: Option<String>,
    progress: &mut dyn FnMut(AddProgress),
) -> Result<Manifest, StoreError> {
    let root = fs::canonicalize(path).map_err(StoreError::io(path))?;
    let meta = fs::metadata(&root).map_err(StoreError::io(&root))?;
    let name = match name {
        Some(name) => name,
        None => root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
    };
    mesh_proto::manifest::check_name(&name)?;
    let files = if meta.is_file() {
        let rel = RelPath::from_path(Path::new(root.file_name().expect("a file has a name")))?;
        vec![(rel, root.clone())]
    } else {
        let mut files = Vec::new();
        walk(&root, &root, &mut files)?;
        files
    };
    if files.is_empty() {
        return Err(StoreError::Empty(root));
    }
    let total = files
        .iter()
        .map(|(_, p)| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let mut done = 0;
    let mut entries = Vec::with_capacity(files.len());
    for (rel, abs) in files {
        let (hash, size) = add_file(store, &abs, None)?;
        done += size;
        progress(AddProgress {
            path: rel.clone(),
            done,
            total,
        });
        entries.push(FileEntry {
            path: rel,
            size,
            hash,
            sha256: None,
            etag: None,
        });
    }
    let manifest = Manifest::new(name, Source::Local, entries)?;
    store.insert_manifest(&manifest)?;
    Ok(manifest)
}

/// Collects the regular files below `dir` (following symlinks, as an HF cache needs).
fn walk(root: &Path, dir: &Path, out: &mut Vec<(RelPath, PathBuf)>) -> Result<(), StoreError> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(StoreError::io(dir))?
        .collect::<Result<_, _>>()
        .map_err(StoreError::io(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let meta = fs::metadata(&path).map_err(StoreError::io(&path))?;
        if meta.is_dir() {
            if !SKIPPED_DIRS.contains(&entry.file_name().to_string_lossy().as_ref()) {
                walk(root, &path, out)?;
            }
        } else if meta.is_file() {
            let rel = path.strip_prefix(root).expect("walk stays below root");
            out.push((RelPath::from_path(rel)?, path));
        }
    }
    Ok(())
}

/// Hashes one file in place and records it, unless the store already has it complete (or
/// its BLAKE3 root is not `expected`: then nothing is recorded).
pub(super) fn add_file(
    store: &Store,
    path: &Path,
    expected: Option<Hash>,
) -> Result<(Hash, u64), StoreError> {
    let file = fs::File::open(path).map_err(StoreError::io(path))?;
    let before = file.metadata().map_err(StoreError::io(path))?;
    let size = before.len();
    let tmp = store.inner.home.join("blobs").join(format!(
        "import-{}-{}.obao.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let outboard = super::create_private(&tmp).map_err(StoreError::io(&tmp))?;
    let hash = outboard_post_order(&file, size, &outboard).map_err(StoreError::io(path));
    let hash = match hash {
        Ok(hash) => hash,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let after = fs::metadata(path).map_err(StoreError::io(path))?;
    if after.len() != size || mtime_of(&after) != mtime_of(&before) {
        let _ = fs::remove_file(&tmp);
        return Err(StoreError::SourceChanged(path.to_path_buf()));
    }
    outboard.sync_all().map_err(StoreError::io(&tmp))?;
    if size > 0 && expected.is_none_or(|e| e == hash) {
        let already = matches!(
            db::blob(&store.inner.db, hash)?,
            Some(BlobRecord::Complete { .. })
        ) && store.data_path(hash).is_ok();
        if !already {
            let ob_path = store.outboard_path(hash);
            fs::rename(&tmp, &ob_path).map_err(StoreError::io(&ob_path))?;
            let record = BlobRecord::Complete {
                size,
                location: Location::External(path.to_path_buf()),
                mtime: mtime_of(&before),
            };
            db::put_blob(&store.inner.db, hash, &record)?;
            store.blob_appeared();
        }
    }
    let _ = fs::remove_file(&tmp);
    Ok((hash, size))
}
