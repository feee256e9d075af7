//! Files assembled from raw pieces before their BLAKE3 root is known: a download from an
//! origin outside the mesh (HuggingFace) that several nodes split between them.
//!
//! A [`PieceFile`] is keyed by the file's published digest (its HF etag), holds the pieces in
//! `partial/hf-<etag>.part` and tracks which pieces are here, which are being fetched, and
//! which peer each came from. Pieces are *not* verified one by one: the whole file is checked
//! against its published digest before the store takes it (see `swarm::origin`). That is why
//! they travel only between mesh members.
//!
//! # Crash safety
//! Every [`CHECKPOINT_PIECES`] pieces the data file is synced and only then is the list of
//! pieces (and where each came from) written next to it (`.pieces`, atomically), so a
//! `kill -9` loses at most the pieces since the last checkpoint and a re-run resumes.
//!
//! # Readers
//! A reader streaming the file as it arrives waits in [`PieceFile::wait_piece`] and says
//! which piece it needs next ([`PieceFile::urgent`]), which the fleet split fetches first.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    net::SocketAddr,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
    time::Duration,
};

use mesh_proto::{
    wire::{ChunkSpan, ChunkSpans, Response},
    PIECE_BYTES,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Pieces written between two checkpoints.
pub const CHECKPOINT_PIECES: usize = 16;

/// A file being assembled from pieces, shared by the downloader and the provider.
#[derive(Debug)]
pub struct PieceFile {
    etag: String,
    size: u64,
    path: PathBuf,
    file: fs::File,
    /// This node's random id in the rendezvous split.
    node: u64,
    /// From a gated or private repo: never served in open mode.
    restricted: bool,
    /// A std mutex: held for bitmap updates only, never across I/O.
    state: Mutex<PieceState>,
    changed: watch::Sender<()>,
    /// One more than the piece a reader waits for (0: none).
    urgent: AtomicUsize,
    /// Pieces written since the last checkpoint.
    unsynced: AtomicUsize,
    /// Bumped when pieces are dropped (they failed the whole-file check): a reader that
    /// passed on bytes of an older generation passed on bad bytes.
    generation: AtomicUsize,
}

/// What the `.pieces` file next to the data records.
#[derive(Serialize, Deserialize)]
struct Checkpoint {
    size: u64,
    /// `(piece, source)`: the source is a peer's address, or empty for the origin.
    pieces: Vec<(usize, String)>,
}

/// Which pieces are where.
#[derive(Clone, Debug)]
pub struct PieceState {
    /// Pieces written here.
    pub have: Vec<bool>,
    /// Pieces being fetched by this node.
    pub pending: Vec<bool>,
    /// Which peer each piece came from (`None`: the origin).
    pub from: Vec<Option<SocketAddr>>,
}

/// Live piece files by etag. A std mutex: map lookups only.
#[derive(Debug, Default)]
pub struct PieceFiles {
    map: Mutex<HashMap<String, Weak<PieceFile>>>,
}

impl PieceFiles {
    /// The piece file for `etag` at `path`, if no one holds it opened with the pieces a
    /// previous run checkpointed there.
    pub fn open(
        &self,
        etag: &str,
        size: u64,
        path: &Path,
        node: u64,
        restricted: bool,
    ) -> io::Result<Arc<PieceFile>> {
        let mut map = self.map.lock().expect("piece files lock poisoned");
        if let Some(live) = map.get(etag).and_then(Weak::upgrade) {
            return Ok(live);
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let pieces = piece_count(size);
        let mut state = PieceState {
            have: vec![false; pieces],
            pending: vec![false; pieces],
            from: vec![None; pieces],
        };
        let resumed = file.metadata()?.len() == size && restore(path, size, &mut state);
        if !resumed {
            file.set_len(0)?;
            file.set_len(size)?;
        }
        let partial = Arc::new(PieceFile {
            etag: etag.to_string(),
            size,
            path: path.to_path_buf(),
            file,
            node,
            restricted,
            state: Mutex::new(state),
            changed: watch::channel(()).0,
            urgent: AtomicUsize::new(0),
            unsynced: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
        });
        map.insert(etag.to_string(), Arc::downgrade(&partial));
        Ok(partial)
    }

    /// The piece file for `etag`, if one is being assembled.
    pub fn get(&self, etag: &str) -> Option<Arc<PieceFile>> {
        let map = self.map.lock().expect("piece files lock poisoned");
        map.get(etag).and_then(Weak::upgrade)
    }
}

impl PieceFile {
    fn lock(&self) -> MutexGuard<'_, PieceState> {
        self.state.lock().expect("piece file lock poisoned")
    }

    /// The published digest it is keyed by.
    pub fn etag(&self) -> &str {
        &self.etag
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where the pieces are written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This node's id in the rendezvous split.
    pub fn node(&self) -> u64 {
        self.node
    }

    /// Whether it comes from a gated or private repo.
    pub fn restricted(&self) -> bool {
        self.restricted
    }

    /// Bytes of the pieces here.
    pub fn bytes_here(&self) -> u64 {
        let state = self.lock();
        (0..state.have.len())
            .filter(|&p| state.have[p])
            .map(|p| piece_bounds(self.size, p).1)
            .sum()
    }

    /// A copy of which pieces are where.
    pub fn state(&self) -> PieceState {
        self.lock().clone()
    }

    /// The advertisement frame.
    pub fn frame(&self) -> Response {
        let state = self.lock();
        Response::HubHave {
            node: self.node,
            size: self.size,
            have: spans(&state.have),
            pending: spans(&state.pending),
        }
    }

    /// Wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// The bytes of a piece this node holds.
    pub fn read_piece(&self, piece: u32) -> Option<Vec<u8>> {
        let piece = piece as usize;
        if !self.lock().have.get(piece).copied().unwrap_or(false) {
            return None;
        }
        let (start, len) = piece_bounds(self.size, piece);
        let mut buf = vec![0u8; len as usize];
        self.file.read_exact_at(&mut buf, start).ok()?;
        Some(buf)
    }

    /// Writes a piece that came from `from` (`None`: the origin), checkpointing every
    /// [`CHECKPOINT_PIECES`].
    pub fn store_piece(
        &self,
        piece: usize,
        bytes: &[u8],
        from: Option<SocketAddr>,
    ) -> io::Result<()> {
        let (start, len) = piece_bounds(self.size, piece);
        if bytes.len() as u64 != len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "piece of the wrong length",
            ));
        }
        self.file.write_all_at(bytes, start)?;
        {
            let mut state = self.lock();
            state.have[piece] = true;
            state.pending[piece] = false;
            state.from[piece] = from;
        }
        self.changed.send_replace(());
        if self.unsynced.fetch_add(1, Ordering::Relaxed) + 1 >= CHECKPOINT_PIECES {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Syncs the data, then records which pieces are here (see the module docs).
    pub fn checkpoint(&self) -> io::Result<()> {
        self.unsynced.store(0, Ordering::Relaxed);
        self.file.sync_data()?;
        let pieces = {
            let state = self.lock();
            (0..state.have.len())
                .filter(|&p| state.have[p])
                .map(|p| (p, state.from[p].map(|a| a.to_string()).unwrap_or_default()))
                .collect()
        };
        let record = Checkpoint {
            size: self.size,
            pieces,
        };
        let json = serde_json::to_vec(&record).expect("a checkpoint serializes");
        super::write_private(&checkpoint_path(&self.path), &json)
    }

    /// Forgets the checkpoint (the file was taken into the store, or dropped).
    pub fn discard_checkpoint(&self) {
        let _ = fs::remove_file(checkpoint_path(&self.path));
    }

    /// Waits until `piece` is here; false if `stall` passes without any change.
    pub async fn wait_piece(&self, piece: usize, stall: Duration) -> bool {
        let mut changes = self.subscribe();
        loop {
            if self.lock().have.get(piece).copied().unwrap_or(false) {
                return true;
            }
            self.urgent.store(piece + 1, Ordering::Relaxed);
            match tokio::time::timeout(stall, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return false,
            }
        }
    }

    /// A builder of this file's outboard piece by piece, next to it, for a file of more than
    /// one piece (`None`: hash it whole).
    pub fn outboard_builder(&self) -> io::Result<Option<super::PieceOutboard>> {
        if self.size <= PIECE_BYTES {
            return Ok(None);
        }
        let tmp = super::Store::outboard_tmp_path(&self.path);
        let file = super::create_private(&tmp)?;
        super::PieceOutboard::new(file, tmp, self.size, PIECE_BYTES).map(Some)
    }

    /// Whether `piece` is here.
    pub fn has(&self, piece: usize) -> bool {
        self.lock().have.get(piece).copied().unwrap_or(false)
    }

    /// Tells the fleet split a reader waits for `piece`.
    pub fn mark_urgent(&self, piece: usize) {
        self.urgent.store(piece + 1, Ordering::Relaxed);
    }

    /// The piece a reader waits for, if any (and not here yet).
    pub fn urgent(&self) -> Option<usize> {
        let piece = self.urgent.load(Ordering::Relaxed).checked_sub(1)?;
        (!self.lock().have.get(piece).copied().unwrap_or(true)).then_some(piece)
    }

    /// Reads `buf.len()` bytes at `offset` (which the caller waited for).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Marks a piece as being fetched by this node, or not.
    pub fn set_pending(&self, piece: usize, on: bool) {
        self.lock().pending[piece] = on;
        self.changed.send_replace(());
    }

    /// Drops every piece that came from a peer (the whole file failed its check); returns
    /// those peers.
    pub fn drop_pieces_from_peers(&self) -> HashSet<SocketAddr> {
        let mut state = self.lock();
        let culprits = state.from.iter().flatten().copied().collect();
        for p in 0..state.have.len() {
            if state.from[p].take().is_some() {
                state.have[p] = false;
            }
        }
        drop(state);
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.changed.send_replace(());
        culprits
    }

    /// How often pieces were dropped (see the field's docs).
    pub fn generation(&self) -> usize {
        self.generation.load(Ordering::Relaxed)
    }
}

fn checkpoint_path(path: &Path) -> PathBuf {
    path.with_extension("pieces")
}

/// Restores the pieces a checkpoint names; false if there is none or it doesn't fit.
fn restore(path: &Path, size: u64, state: &mut PieceState) -> bool {
    let Ok(bytes) = fs::read(checkpoint_path(path)) else {
        return false;
    };
    let Ok(record) = serde_json::from_slice::<Checkpoint>(&bytes) else {
        return false;
    };
    if record.size != size || record.pieces.iter().any(|(p, _)| *p >= state.have.len()) {
        return false;
    }
    for (p, from) in record.pieces {
        state.have[p] = true;
        state.from[p] = from.parse().ok();
    }
    true
}

/// Pieces in a file of `size` bytes (one for an empty file).
pub fn piece_count(size: u64) -> usize {
    size.div_ceil(PIECE_BYTES).max(1) as usize
}

/// Offset and length of piece `piece`.
pub fn piece_bounds(size: u64, piece: usize) -> (u64, u64) {
    let start = piece as u64 * PIECE_BYTES;
    (start, PIECE_BYTES.min(size.saturating_sub(start)))
}

/// A piece bitmap as wire spans.
fn spans(bits: &[bool]) -> ChunkSpans {
    let mut out = Vec::new();
    let mut start = None;
    for (i, b) in bits.iter().chain(std::iter::once(&false)).enumerate() {
        match (b, start) {
            (true, None) => start = Some(i as u64),
            (false, Some(s)) => {
                out.push(ChunkSpan {
                    start: s,
                    end: i as u64,
                });
                start = None;
            }
            _ => {}
        }
    }
    ChunkSpans::new(out).expect("built sorted and disjoint")
}

/// Wire spans as a set of piece indexes (bounded, whatever a peer sends).
pub fn piece_set(spans: &ChunkSpans) -> HashSet<usize> {
    spans
        .spans()
        .iter()
        .flat_map(|s| (s.start..s.end.min(s.start + (1 << 24))).map(|p| p as usize))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_round_trip() {
        let bits = [true, true, false, true, false, false, true];
        let got = piece_set(&spans(&bits));
        let want: HashSet<usize> = [0, 1, 3, 6].into_iter().collect();
        assert_eq!(got, want);
        assert_eq!(piece_bounds(PIECE_BYTES + 5, 1), (PIECE_BYTES, 5));
        assert_eq!(piece_count(0), 1);
    }
}
