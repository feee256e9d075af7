//! Partial blobs: downloads in progress, written only with verified bytes.
//!
//! Bytes arrive as bao-tree items that the decoder has already checked against the blob's root.
//! A leaf is written to `partial/<hash>.data` at its offset and a parent pair to
//! `partial/<hash>.obao` at its post-order position; then the leaf's chunks join the in-memory
//! `have` set, from which the node can serve them at once.
//!
//! # Crash safety
//! The database's `have` list is what survives a crash, so it may only name bytes that are on
//! disk. A checkpoint therefore syncs both files first and then commits `have`. A `kill -9`
//! loses at most the bytes received since the last checkpoint ([`CHECKPOINT_BYTES`]). When the
//! last chunk arrives the files are synced and renamed into `blobs/`, and only then is the
//! record marked complete.

use std::{fs, os::unix::fs::FileExt, sync::Mutex};

use bao_tree::{
    io::{outboard::PostOrderOutboard, sync::OutboardMut, BaoContentItem},
    BaoTree, ChunkNum, ChunkRanges,
};
use mesh_proto::Hash;
use positioned_io::RandomAccessFile;

use super::{
    db, mtime_of, pairs_from_ranges, BlobReader, BlobRecord, Location, Store, StoreError,
    BLOCK_SIZE,
};
use crate::ranges;

/// Bytes received between two checkpoints of a partial blob.
pub(crate) const CHECKPOINT_BYTES: u64 = 16 << 20;

/// A blob being downloaded. Shared (`Arc`) by every task writing to or serving it.
#[derive(Debug)]
pub struct PartialBlob {
    /// The store it belongs to.
    store: Store,
    /// The blob's root hash.
    hash: Hash,
    /// Its size in bytes.
    size: u64,
    /// The data file, written with positional writes.
    data: fs::File,
    /// The outboard, written as parent pairs arrive.
    outboard: fs::File,
    /// Progress. A std mutex: held for range-set updates, never across I/O.
    state: Mutex<PartialState>,
    /// Writers hold it shared while they write; completion takes it exclusively.
    io_gate: std::sync::RwLock<()>,
    /// Bumped after every verified write, so subscribers can advertise new pieces at once.
    changed: tokio::sync::watch::Sender<()>,
    /// A random id for this download, which peers use to split the seed's pieces among the
    /// nodes downloading the blob.
    node: u64,
}

#[derive(Debug, Default)]
struct PartialState {
    /// Chunks verified and written (maybe not yet synced).
    have: ChunkRanges,
    /// Bytes written since the last checkpoint.
    unsynced: u64,
    /// Set once the blob moved into `blobs/`.
    complete: bool,
    /// Chunks being fetched right now, advertised so peers don't fetch them from the seed too.
    pending: ChunkRanges,
}

impl PartialBlob {
    pub(super) fn open(
        store: Store,
        hash: Hash,
        size: u64,
        have: ChunkRanges,
    ) -> Result<Self, StoreError> {
        let data_path = store.partial_path(hash, "data");
        let ob_path = store.partial_path(hash, "obao");
        let open = |path: &std::path::Path| {
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(StoreError::io(path))
        };
        let data = open(&data_path)?;
        let outboard = open(&ob_path)?;
        // A crash can leave the files shorter than `have` claims only if the checkpoint rule
        // was broken; check rather than trust.
        let len = data.metadata().map_err(StoreError::io(&data_path))?.len();
        let have = if have.is_empty() || len >= size {
            have
        } else {
            ChunkRanges::empty()
        };
        data.set_len(size).map_err(StoreError::io(&data_path))?;
        outboard
            .set_len(BaoTree::new(size, BLOCK_SIZE).outboard_size())
            .map_err(StoreError::io(&ob_path))?;
        Ok(Self {
            store,
            hash,
            size,
            data,
            outboard,
            state: Mutex::new(PartialState {
                have,
                ..Default::default()
            }),
            io_gate: std::sync::RwLock::new(()),
            changed: tokio::sync::watch::channel(()).0,
            node: rand::random::<u64>().max(1),
        })
    }

    /// This download's random id, advertised to peers (never 0).
    pub fn node(&self) -> u64 {
        self.node
    }

    /// The blob's hash.
    pub fn hash(&self) -> Hash {
        self.hash
    }

    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The tree geometry.
    pub fn tree(&self) -> BaoTree {
        BaoTree::new(self.size, BLOCK_SIZE)
    }

    /// Chunks verified so far.
    pub fn have(&self) -> ChunkRanges {
        self.lock().have.clone()
    }

    /// Chunks being fetched right now.
    pub fn pending(&self) -> ChunkRanges {
        self.lock().pending.clone()
    }

    /// Replaces the set of chunks being fetched and tells subscribers.
    pub fn set_pending(&self, pending: ChunkRanges) {
        let changed = {
            let mut state = self.lock();
            let changed = state.pending != pending;
            state.pending = pending;
            changed
        };
        if changed {
            self.changed.send_replace(());
        }
    }

    /// Chunks still missing.
    pub fn missing(&self) -> ChunkRanges {
        ranges::all_chunks(self.size) - self.have()
    }

    /// A receiver that wakes after every verified write and on completion.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// Whether the blob moved into `blobs/`.
    pub fn is_complete(&self) -> bool {
        self.lock().complete
    }

    /// Writes one item the bao decoder has verified. Returns the data bytes newly added.
    pub fn write(&self, item: &BaoContentItem) -> Result<u64, StoreError> {
        // Held across the positional write, so `complete` never records an mtime that a late
        // duplicate write (endgame) then changes.
        let gate = self.io_gate.read().expect("io gate poisoned");
        match item {
            BaoContentItem::Parent(parent) => {
                if self.is_complete() {
                    return Ok(0);
                }
                let mut ob = PostOrderOutboard {
                    root: self.hash.into(),
                    tree: self.tree(),
                    data: WriteAtFile(&self.outboard),
                };
                ob.save(parent.node, &parent.pair)
                    .map_err(StoreError::io(&self.store.partial_path(self.hash, "obao")))?;
                Ok(0)
            }
            BaoContentItem::Leaf(leaf) => {
                let start = ChunkNum(leaf.offset / mesh_proto::CHUNK_BYTES);
                let end = ChunkNum((leaf.offset + leaf.data.len() as u64).div_ceil(1024))
                    .max(ChunkNum(start.0 + 1));
                let range = ChunkRanges::from(start..end);
                {
                    let state = self.lock();
                    if state.complete || (range.clone() - &state.have).is_empty() {
                        // Already here (a duplicate from the endgame): nothing to write.
                        return Ok(0);
                    }
                }
                self.data
                    .write_all_at(&leaf.data, leaf.offset)
                    .map_err(StoreError::io(&self.store.partial_path(self.hash, "data")))?;
                let mut state = self.lock();
                let new = ranges::byte_len(&(range - &state.have), self.size);
                state.have |= ChunkRanges::from(start..end);
                state.unsynced += new;
                let due = state.unsynced >= CHECKPOINT_BYTES;
                drop(state);
                drop(gate);
                self.changed.send_replace(());
                if due {
                    self.checkpoint()?;
                }
                Ok(new)
            }
        }
    }

    /// Makes everything written so far durable and records it. Completes the blob if whole.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let have = {
            let mut state = self.lock();
            if state.complete {
                return Ok(());
            }
            state.unsynced = 0;
            state.have.clone()
        };
        // Sync before the record names these bytes: see the module docs.
        let data_path = self.store.partial_path(self.hash, "data");
        let ob_path = self.store.partial_path(self.hash, "obao");
        sync(&self.data, &data_path)?;
        sync(&self.outboard, &ob_path)?;
        if ranges::all_chunks(self.size) - &have == ChunkRanges::empty() {
            return self.complete();
        }
        let record = BlobRecord::Partial {
            size: self.size,
            have: pairs_from_ranges(&have),
        };
        db::put_blob(&self.store.inner.db, self.hash, &record)
    }

    fn complete(&self) -> Result<(), StoreError> {
        let _gate = self.io_gate.write().expect("io gate poisoned");
        let mut state = self.lock();
        if state.complete {
            return Ok(());
        }
        let data_path = self.store.blob_path(self.hash, "data");
        let ob_path = self.store.outboard_path(self.hash);
        let from_data = self.store.partial_path(self.hash, "data");
        let from_ob = self.store.partial_path(self.hash, "obao");
        fs::rename(&from_ob, &ob_path).map_err(StoreError::io(&ob_path))?;
        fs::rename(&from_data, &data_path).map_err(StoreError::io(&data_path))?;
        let meta = fs::metadata(&data_path).map_err(StoreError::io(&data_path))?;
        let dir = self.store.inner.home.join("blobs");
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(StoreError::io(&dir))?;
        let record = BlobRecord::Complete {
            size: self.size,
            location: Location::Store,
            mtime: mtime_of(&meta),
        };
        db::put_blob(&self.store.inner.db, self.hash, &record)?;
        state.complete = true;
        self.changed.send_replace(());
        tracing::debug!(hash = %self.hash.fmt_short(), "blob complete");
        Ok(())
    }

    /// A reader over the verified part, for serving while downloading.
    pub(super) fn reader(&self) -> Result<BlobReader, StoreError> {
        if self.is_complete() {
            return self.store.open_reader_complete(self.hash);
        }
        let data_path = self.store.partial_path(self.hash, "data");
        let ob_path = self.store.partial_path(self.hash, "obao");
        let reopen = |p: &std::path::Path| RandomAccessFile::open(p).map_err(StoreError::io(p));
        Ok(BlobReader {
            data: reopen(&data_path)?,
            outboard: PostOrderOutboard {
                root: self.hash.into(),
                tree: self.tree(),
                data: reopen(&ob_path)?,
            },
            have: self.have(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PartialState> {
        self.state.lock().expect("partial state lock poisoned")
    }
}

fn sync(file: &fs::File, path: &std::path::Path) -> Result<(), StoreError> {
    file.sync_data().map_err(StoreError::io(path))
}

/// Positional writes through a shared `&File` (pwrite needs no `&mut`).
struct WriteAtFile<'a>(&'a fs::File);

impl positioned_io::WriteAt for WriteAtFile<'_> {
    fn write_at(&mut self, pos: u64, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_at(buf, pos)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
