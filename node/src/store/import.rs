//! `mesh add`: hash files where they are and record them as a model served in place.
//!
//! Hashing builds the bao-tree post-order outboard and the BLAKE3 root in one pass. Subtrees
//! of the BLAKE3 tree are independent, so they are hashed on all cores (rayon) and written to
//! their known offsets in the outboard file; only one [`LEAF_TASK_BYTES`] buffer per thread is
//! in memory, never the file or its outboard.

use std::{
    fs,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use mesh_proto::{FileEntry, Hash, Manifest, RelPath, Source};

use super::{db, mtime_of, BlobRecord, Location, Store, StoreError, BLOCK_SIZE};

/// Subtrees up to this size are hashed by one thread from one buffer; larger ones split.
const LEAF_TASK_BYTES: u64 = 16 << 20;
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

/// Writes the post-order outboard of `data` (its first `size` bytes) to `outboard` and returns
/// the BLAKE3 root. Byte-identical to bao-tree's own `outboard_post_order`, but parallel.
pub(crate) fn outboard_post_order(
    data: &fs::File,
    size: u64,
    outboard: &fs::File,
) -> std::io::Result<Hash> {
    let tree = bao_tree::BaoTree::new(size, BLOCK_SIZE);
    outboard.set_len(tree.outboard_size())?;
    let task = Subtree {
        data,
        outboard,
        start: 0,
        len: size,
        pair_index: 0,
    };
    Ok(Hash::from(*task.hash(true)?.as_bytes()))
}

/// A subtree of the BLAKE3 tree whose parent pairs go to a known place in the outboard.
#[derive(Clone, Copy)]
struct Subtree<'a> {
    data: &'a fs::File,
    outboard: &'a fs::File,
    /// Byte offset of the subtree's first byte.
    start: u64,
    /// Its length in bytes.
    len: u64,
    /// Index (in 64-byte pairs) of its first pair in the post-order outboard.
    pair_index: u64,
}

impl Subtree<'_> {
    /// Pairs a subtree of `len` bytes stores: one per chunk group boundary.
    fn pair_count(len: u64) -> u64 {
        len.div_ceil(BLOCK_SIZE.bytes() as u64).max(1) - 1
    }

    fn split(self) -> (Self, Self) {
        let left_len = left_subtree_len(self.len);
        let left = Self {
            len: left_len,
            ..self
        };
        let right = Self {
            start: self.start + left_len,
            len: self.len - left_len,
            pair_index: self.pair_index + Self::pair_count(left_len),
            ..self
        };
        (left, right)
    }

    /// Hashes the subtree and writes its pairs; returns its chaining value (or root hash).
    fn hash(self, is_root: bool) -> std::io::Result<blake3::Hash> {
        if self.len <= LEAF_TASK_BYTES {
            let mut buf = vec![0u8; self.len as usize];
            self.data.read_exact_at(&mut buf, self.start)?;
            let mut pairs = Vec::with_capacity(Self::pair_count(self.len) as usize * 64);
            let hash = self.hash_buf(&buf, is_root, &mut pairs);
            self.outboard.write_all_at(&pairs, self.pair_index * 64)?;
            return Ok(hash);
        }
        let (left, right) = self.split();
        let (l, r) = rayon::join(|| left.hash(false), || right.hash(false));
        let (l, r) = (l?, r?);
        let own_index = self.pair_index + Self::pair_count(self.len) - 1;
        self.outboard
            .write_all_at(&join_pair(&l, &r), own_index * 64)?;
        Ok(merge(&l, &r, is_root))
    }

    /// The in-memory part of [`Subtree::hash`]: `buf` is this subtree's bytes.
    fn hash_buf(&self, buf: &[u8], is_root: bool, pairs: &mut Vec<u8>) -> blake3::Hash {
        if buf.len() as u64 <= BLOCK_SIZE.bytes() as u64 {
            if is_root {
                return blake3::hash(buf);
            }
            let mut hasher = blake3::Hasher::new();
            hasher.set_input_offset(self.start);
            hasher.update(buf);
            return blake3::Hash::from(hasher.finalize_non_root());
        }
        let (left, right) = self.split();
        let mid = left.len as usize;
        let l = left.hash_buf(&buf[..mid], false, pairs);
        let r = right.hash_buf(&buf[mid..], false, pairs);
        pairs.extend_from_slice(&join_pair(&l, &r));
        merge(&l, &r, is_root)
    }
}

fn join_pair(l: &blake3::Hash, r: &blake3::Hash) -> [u8; 64] {
    let mut pair = [0u8; 64];
    pair[..32].copy_from_slice(l.as_bytes());
    pair[32..].copy_from_slice(r.as_bytes());
    pair
}

fn merge(l: &blake3::Hash, r: &blake3::Hash, is_root: bool) -> blake3::Hash {
    let (l, r): (ChainingValue, ChainingValue) = (*l.as_bytes(), *r.as_bytes());
    if is_root {
        merge_subtrees_root(&l, &r, Mode::Hash)
    } else {
        blake3::Hash::from(merge_subtrees_non_root(&l, &r, Mode::Hash))
    }
}
