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
//!
//! # Serving while downloading
//! Peers may be promised chunks that are still being fetched ([`PartialBlob::pending`]): the
//! encoder then waits in [`PartialBlob::await_verified`] until each chunk group is verified, so a
//! block is passed on as it arrives instead of after it is whole. A wait fails when the chunk
//! stops being pending without arriving (the fetch failed), or nothing arrives for
//! [`FOLLOW_TIMEOUT`]. The scheduler marks as pending only chunks it fetches from a peer that
//! holds them, never ones it is itself being passed live, so no two nodes can wait on each
//! other.

use std::{
    fs, io,
    os::unix::fs::{FileExt, OpenOptionsExt},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use bao_tree::{
    io::{
        outboard::PostOrderOutboard,
        sync::{Outboard, OutboardMut},
        BaoContentItem,
    },
    BaoTree, ChunkNum, ChunkRanges, TreeNode,
};
use mesh_proto::Hash;
use positioned_io::RandomAccessFile;

use super::{
    db, mtime_of, pairs_from_ranges, BlobReader, BlobRecord, Location, Store, StoreError,
    BLOCK_SIZE,
};
use super::{gather, ranges};

/// Bytes received between two checkpoints of a partial blob.
pub(crate) const CHECKPOINT_BYTES: u64 = 16 << 20;
/// How long serving a pending chunk waits for it before giving up (its source stalled).
pub(crate) const FOLLOW_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Notified whenever `state` changes, for encoders waiting on pending chunks.
    state_changed: Condvar,
    /// Writers hold it shared while they write; completion takes it exclusively.
    io_gate: std::sync::RwLock<()>,
    /// One writer at a time into `data` and `outboard`: the file system serialises buffered
    /// writes to one file anyway (the inode lock), and a thread waiting here sleeps, where one
    /// waiting on the inode lock spins while the holder copies.
    writer: Mutex<()>,
    /// Wakes subscribers after every verified write, so they can advertise new pieces at once.
    /// Its value counts the changes to `pending`, which they pass on sooner.
    changed: tokio::sync::watch::Sender<u64>,
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
    /// Chunks being fetched right now from a peer that holds them, advertised so peers don't
    /// fetch them from the seed too, and promised to peers that ask for them.
    pending: ChunkRanges,
}

impl PartialState {
    /// Whether `chunks` (with `any`, one of them) are verified; an error when one that is
    /// missing is no longer coming (neither verified nor pending).
    fn verified(&self, chunks: &ChunkRanges, any: bool) -> io::Result<bool> {
        let missing = chunks.clone() - &self.have;
        if missing.is_empty() || (any && missing != *chunks) || self.complete {
            return Ok(true);
        }
        // All of them must still be coming, or (with `any`) one of them.
        let coming = if any {
            !(missing & &self.pending).is_empty()
        } else {
            (missing - &self.pending).is_empty()
        };
        if !coming {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "chunks are no longer being fetched",
            ));
        }
        Ok(false)
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "pending chunks did not arrive in time",
    )
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
                .mode(0o600)
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
            state_changed: Condvar::new(),
            io_gate: std::sync::RwLock::new(()),
            writer: Mutex::new(()),
            changed: tokio::sync::watch::channel(0).0,
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
            self.state_changed.notify_all();
            self.changed.send_modify(|generation| *generation += 1);
        }
    }

    /// What may be promised to a peer now: the verified chunks and the pending ones.
    pub fn promise(&self) -> (ChunkRanges, ChunkRanges) {
        let state = self.lock();
        (state.have.clone(), state.pending.clone())
    }

    /// Blocks until `chunks` are verified (with `any`, until one of them is).
    ///
    /// Fails with [`io::ErrorKind::NotFound`] when a chunk it needs is neither verified nor
    /// pending, and with [`io::ErrorKind::TimedOut`] after [`FOLLOW_TIMEOUT`].
    pub fn await_verified(&self, chunks: &ChunkRanges, any: bool) -> io::Result<()> {
        let chunks = chunks & &ranges::all_chunks(self.size);
        let deadline = Instant::now() + FOLLOW_TIMEOUT;
        let mut state = self.lock();
        loop {
            if state.verified(&chunks, any)? {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(timed_out());
            }
            state = self
                .state_changed
                .wait_timeout(state, deadline - now)
                .expect("partial state lock poisoned")
                .0;
        }
    }

    /// [`PartialBlob::await_verified`] for async callers: waits on the change watch instead of
    /// blocking a thread.
    pub async fn wait_verified(&self, chunks: &ChunkRanges, any: bool) -> io::Result<()> {
        let chunks = chunks & &ranges::all_chunks(self.size);
        let deadline = tokio::time::Instant::now() + FOLLOW_TIMEOUT;
        let mut changes = self.changed.subscribe();
        loop {
            changes.borrow_and_update();
            if self.lock().verified(&chunks, any)? {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(_) => {}
                Err(_) => return Err(timed_out()),
            }
        }
    }

    /// Wakes subscribers and encoders waiting on pending chunks.
    fn notify(&self) {
        self.state_changed.notify_all();
        self.changed.send_modify(|_| ());
    }

    /// Reads `buf.len()` bytes at `offset` if every one of them is verified; `Ok(false)` (and
    /// nothing read) if some are not yet.
    pub fn read_verified(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let start = ChunkNum(offset / mesh_proto::CHUNK_BYTES);
        let end = ChunkNum((offset + buf.len() as u64).div_ceil(mesh_proto::CHUNK_BYTES));
        let range = ChunkRanges::from(start..end.max(ChunkNum(start.0 + 1)));
        if !(range - &self.lock().have).is_empty() {
            return Ok(false);
        }
        self.data.read_exact_at(buf, offset)?;
        Ok(true)
    }

    /// Chunks still missing.
    pub fn missing(&self) -> ChunkRanges {
        ranges::all_chunks(self.size) - self.have()
    }

    /// A receiver that wakes after every verified write, every change to the pending chunks
    /// (which also bumps its value) and on completion.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Whether the blob moved into `blobs/`.
    pub fn is_complete(&self) -> bool {
        self.lock().complete
    }

    /// Writes one item the bao decoder has verified. Returns the data bytes newly added.
    pub fn write(&self, item: &BaoContentItem) -> Result<u64, StoreError> {
        self.write_batch(std::slice::from_ref(item)).map(|w| w.new)
    }

    /// Writes items the bao decoder has verified, in stream order (a parent pair before the
    /// leaves below it), then adds their chunks to `have` and wakes subscribers once.
    pub fn write_batch(&self, items: &[BaoContentItem]) -> Result<Written, StoreError> {
        // Held across the positional writes, so `complete` never records an mtime that a late
        // duplicate write (endgame) then changes.
        let gate = self.io_gate.read().expect("io gate poisoned");
        // Which leaves are here already, looked up without copying `have` (a binary search of
        // its boundaries per leaf: it can hold thousands of ranges).
        let here: Vec<bool> = {
            let state = self.lock();
            if state.complete {
                return Ok(Written {
                    new: 0,
                    duplicate: leaf_bytes(items),
                });
            }
            items
                .iter()
                .map(|item| match item {
                    BaoContentItem::Leaf(leaf) => {
                        contains(&state.have, &leaf_chunks(leaf.offset, leaf.data.len()))
                    }
                    BaoContentItem::Parent(_) => false,
                })
                .collect()
        };
        let mut written = Written::default();
        let mut added = ChunkRanges::empty();
        let mut ob = PostOrderOutboard {
            root: self.hash.into(),
            tree: self.tree(),
            data: Recorded::default(),
        };
        let mut leaves = Vec::new();
        for (item, here) in items.iter().zip(here) {
            match item {
                BaoContentItem::Parent(parent) => ob
                    .save(parent.node, &parent.pair)
                    .expect("recording cannot fail"),
                BaoContentItem::Leaf(leaf) if here => {
                    // Already here (a duplicate from the endgame): nothing to write.
                    written.duplicate += leaf.data.len() as u64;
                }
                BaoContentItem::Leaf(leaf) => {
                    leaves.push((leaf.offset, &leaf.data[..]));
                    added |= leaf_chunks(leaf.offset, leaf.data.len());
                }
            }
        }
        let pairs = ob
            .data
            .0
            .iter()
            .map(|(at, bytes)| (*at, &bytes[..]))
            .collect();
        {
            let _writer = self.writer.lock().expect("writer poisoned");
            gather::write_pieces(&self.outboard, pairs)
                .map_err(|e| self.write_failed("obao", e))?;
            gather::write_pieces(&self.data, leaves).map_err(|e| self.write_failed("data", e))?;
        }
        if added.is_empty() {
            return Ok(written);
        }
        // Only now, with the bytes written, do they count as verified here.
        let mut state = self.lock();
        let new = ranges::byte_len(&(added.clone() - &state.have), self.size);
        state.have |= added;
        state.unsynced += new;
        let due = state.unsynced >= CHECKPOINT_BYTES;
        drop(state);
        drop(gate);
        written.new = new;
        written.duplicate = leaf_bytes(items) - new;
        self.notify();
        if due {
            self.checkpoint()?;
        }
        Ok(written)
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
        match db::put_blob(&self.store.inner.db, self.hash, &record) {
            // redb refuses every later commit after a failed one ("previous I/O error"), so a
            // retry can't succeed; the original error is the one worth reporting.
            Err(e) if super::disk_full(&e) => {
                self.store.release_reserve();
                Err(e)
            }
            other => other,
        }
    }

    /// The error for a failed write to the partial `.data` or `.obao` file. A full disk
    /// releases the store's reserve first, so the checkpoint that follows (redb's commit)
    /// still has room to record what was verified.
    fn write_failed(&self, ext: &str, e: io::Error) -> StoreError {
        let e = StoreError::io(&self.store.partial_path(self.hash, ext))(e);
        if super::disk_full(&e) {
            self.store.release_reserve();
        }
        e
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
        drop(state);
        self.notify();
        tracing::debug!(hash = %self.hash.fmt_short(), "blob complete");
        Ok(())
    }

    /// A reader over the verified part, for serving while downloading; it may also promise the
    /// pending part (see the module docs).
    pub(super) fn reader(self: &Arc<Self>) -> Result<BlobReader, StoreError> {
        if self.is_complete() {
            return self.store.open_reader_complete(self.hash);
        }
        let data_path = self.store.partial_path(self.hash, "data");
        let ob_path = self.store.partial_path(self.hash, "obao");
        let reopen = |p: &std::path::Path| RandomAccessFile::open(p).map_err(StoreError::io(p));
        let (data, outboard) = match (reopen(&data_path), reopen(&ob_path)) {
            (Ok(data), Ok(outboard)) => (data, outboard),
            // Completed (and moved into `blobs/`) since we looked.
            _ if self.is_complete() => return self.store.open_reader_complete(self.hash),
            (Err(e), _) | (_, Err(e)) => return Err(e),
        };
        let (have, pending) = self.promise();
        Ok(BlobReader {
            data,
            outboard: PostOrderOutboard {
                root: self.hash.into(),
                tree: self.tree(),
                data: outboard,
            },
            have,
            pending,
            growing: Some(self.clone()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PartialState> {
        self.state.lock().expect("partial state lock poisoned")
    }
}

/// What a [`PartialBlob::write_batch`] added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Data bytes new to this blob.
    pub new: u64,
    /// Data bytes it held already (sent twice, as in the endgame).
    pub duplicate: u64,
}

/// The chunks a leaf at `offset` with `len` bytes covers (at least one, for the empty tail).
fn leaf_chunks(offset: u64, len: usize) -> ChunkRanges {
    let start = ChunkNum(offset / mesh_proto::CHUNK_BYTES);
    let end = ChunkNum((offset + len as u64).div_ceil(mesh_proto::CHUNK_BYTES))
        .max(ChunkNum(start.0 + 1));
    ChunkRanges::from(start..end)
}

fn leaf_bytes(items: &[BaoContentItem]) -> u64 {
    items
        .iter()
        .map(|item| match item {
            BaoContentItem::Leaf(leaf) => leaf.data.len() as u64,
            BaoContentItem::Parent(_) => 0,
        })
        .sum()
}

/// Whether `have` holds every chunk of the single range `range`: a binary search of its
/// boundaries, not a merge of the two sets.
fn contains(have: &ChunkRanges, range: &ChunkRanges) -> bool {
    let (Some(start), Some(end)) = (range.boundaries().first(), range.boundaries().get(1)) else {
        return range.is_empty();
    };
    let bounds = have.boundaries();
    // The last boundary at or before `start` must open a range that reaches `end`.
    let at = bounds.partition_point(|b| b <= start);
    at % 2 == 1 && bounds.get(at).is_none_or(|stop| stop >= end)
}

fn sync(file: &fs::File, path: &std::path::Path) -> Result<(), StoreError> {
    file.sync_data().map_err(StoreError::io(path))
}

/// A blob's data or outboard as the encoder reads it: for a download in progress, a read of
/// chunks that are still pending waits until they are verified ([`PartialBlob::await_verified`]).
#[derive(Debug)]
pub struct Verified<'a, T> {
    pub(super) inner: T,
    pub(super) growing: Option<&'a PartialBlob>,
}

impl<T> Verified<'_, T> {
    fn await_chunks(&self, chunks: ChunkRanges, any: bool) -> io::Result<()> {
        match self.growing {
            Some(partial) => partial.await_verified(&chunks, any),
            None => Ok(()),
        }
    }
}

impl<R: positioned_io::ReadAt> positioned_io::ReadAt for Verified<'_, R> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        let start = ChunkNum(pos / mesh_proto::CHUNK_BYTES);
        let end = ChunkNum((pos + buf.len() as u64).div_ceil(mesh_proto::CHUNK_BYTES));
        self.await_chunks(
            ChunkRanges::from(start..end.max(ChunkNum(start.0 + 1))),
            false,
        )?;
        self.inner.read_at(pos, buf)
    }
}

impl<O: Outboard> Outboard for Verified<'_, O> {
    fn root(&self) -> blake3::Hash {
        self.inner.root()
    }

    fn tree(&self) -> BaoTree {
        self.inner.tree()
    }

    fn load(&self, node: TreeNode) -> io::Result<Option<(blake3::Hash, blake3::Hash)>> {
        // A parent pair is written before the first leaf below it: once any of its chunks is
        // verified, the pair is on disk.
        self.await_chunks(ChunkRanges::from(node.chunk_range()), true)?;
        self.inner.load(node)
    }
}

/// Positional writes kept to be made later, gathered ([`gather::write_pieces`]).
#[derive(Default)]
struct Recorded(Vec<(u64, Vec<u8>)>);

impl positioned_io::WriteAt for Recorded {
    fn write_at(&mut self, pos: u64, buf: &[u8]) -> io::Result<usize> {
        self.0.push((pos, buf.to_vec()));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_agrees_with_a_set_difference() {
        let r = |a: u64, b: u64| ChunkRanges::from(ChunkNum(a)..ChunkNum(b));
        let have = r(0, 16) | r(32, 64) | r(80, 96);
        for start in 0..100 {
            for end in start + 1..110 {
                let range = r(start, end);
                assert_eq!(
                    contains(&have, &range),
                    (range.clone() - &have).is_empty(),
                    "{start}..{end}"
                );
            }
        }
        assert!(!contains(&ChunkRanges::empty(), &r(0, 1)));
        let open = ChunkRanges::from(ChunkNum(10)..);
        assert!(contains(&open, &r(10, 1000)));
        assert!(!contains(&open, &r(9, 11)));
    }
}
