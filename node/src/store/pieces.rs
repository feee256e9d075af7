//! Files assembled from raw pieces before their BLAKE3 root is known: a download from an
//! origin outside the mesh (HuggingFace) that several nodes split between them.
//!
//! A [`PieceFile`] is keyed by the file's published digest (its HF etag), holds the pieces in
//! `partial/hf-<etag>.part` and tracks which pieces are here, which are being fetched, and
//! which peer each came from. Pieces are *not* verified one by one: the whole file is checked
//! against its published digest before the store takes it (see `hf::split`). That is why they
//! travel only between mesh members.

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::SocketAddr,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, Weak},
};

use mesh_proto::{
    wire::{ChunkSpan, ChunkSpans, Response},
    PIECE_BYTES,
};
use tokio::sync::watch;

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
    /// The piece file for `etag`, opened (truncated) at `path` if no one holds it.
    pub fn open(
        &self,
        etag: &str,
        size: u64,
        path: &Path,
        node: u64,
        restricted: bool,
    ) -> std::io::Result<Arc<PieceFile>> {
        let mut map = self.map.lock().expect("piece files lock poisoned");
        if let Some(live) = map.get(etag).and_then(Weak::upgrade) {
            return Ok(live);
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(size)?;
        let pieces = piece_count(size);
        let partial = Arc::new(PieceFile {
            etag: etag.to_string(),
            size,
            path: path.to_path_buf(),
            file,
            node,
            restricted,
            state: Mutex::new(PieceState {
                have: vec![false; pieces],
                pending: vec![false; pieces],
                from: vec![None; pieces],
            }),
            changed: watch::channel(()).0,
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

    /// Writes a piece that came from `from` (`None`: the origin).
    pub fn store_piece(
        &self,
        piece: usize,
        bytes: &[u8],
        from: Option<SocketAddr>,
    ) -> std::io::Result<()> {
        let (start, len) = piece_bounds(self.size, piece);
        if bytes.len() as u64 != len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
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
        Ok(())
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
        self.changed.send_replace(());
        culprits
    }
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
