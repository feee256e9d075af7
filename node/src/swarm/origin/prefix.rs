//! The published hash of a file being assembled, and its BLAKE3 outboard, computed in file
//! order while its pieces arrive, so that little is left to hash when the last one lands.
//! (Hashed only at the end, eight nodes on two cores spent 0.1-0.3 s each on the sha256 of a
//! 64 MiB file after its last piece, and as long again on its outboard; a 50 GB file would
//! take a minute.) Owners ask the origin for their pieces in file order ([`super::plan`]), so
//! the hashed prefix follows the download closely.
//!
//! Both cover the bytes in the piece file, read back after they were written, each piece read
//! once for both; a dropped piece (the piece file's generation changed) starts them again from
//! the first piece. The outboard is only kept once the published hash matched.

use std::{io, path::PathBuf, sync::Arc};

use mesh_proto::Hash;
use tracing::debug;

use crate::store::{
    digest::{Published, PublishedHasher},
    pieces::{piece_bounds, piece_count, PieceFile},
    PieceOutboard,
};

/// Pieces hashed per call while the download runs, so the download's loop is never held up
/// for long (16 MiB: about 10 ms with SHA extensions).
const PIECES_PER_STEP: usize = 16;

/// A published hash (and an outboard) over the pieces `0..next` of a piece file.
#[derive(Debug)]
pub(super) struct PrefixHash {
    published: Published,
    size: u64,
    hasher: Option<PublishedHasher>,
    /// `None` for a one-piece file, or if its file could not be made (then the store
    /// hashes the file whole).
    outboard: Option<PieceOutboard>,
    /// Pieces in `hasher`: `0..next`. (`hasher` is `None` after [`PrefixHash::finish`].)
    next: usize,
    /// The piece file's generation when `hasher` started.
    generation: usize,
}

impl PrefixHash {
    pub(super) fn new(published: &Published, partial: &PieceFile) -> Self {
        let outboard = partial.outboard_builder().unwrap_or_else(|e| {
            debug!(path = %partial.path().display(), "outboard built after the download instead: {e}");
            None
        });
        Self {
            published: published.clone(),
            size: partial.size(),
            hasher: Some(published.hasher(partial.size())),
            outboard,
            next: 0,
            generation: partial.generation(),
        }
    }

    /// Feeds the pieces that are here, in order from the first not yet hashed: up to
    /// [`PIECES_PER_STEP`], or, with `to_end`, all of them.
    pub(super) async fn advance(
        &mut self,
        partial: &Arc<PieceFile>,
        to_end: bool,
    ) -> io::Result<()> {
        if partial.generation() != self.generation || self.hasher.is_none() {
            // The old outboard's file goes before the new one takes its name.
            self.outboard = None;
            *self = Self::new(&self.published, partial);
        }
        let pieces = piece_count(self.size);
        let mut end = self.next;
        while end < pieces && partial.has(end) && (to_end || end - self.next < PIECES_PER_STEP) {
            end += 1;
        }
        if end == self.next {
            return Ok(());
        }
        let (start, size, partial) = (self.next, self.size, partial.clone());
        let mut hasher = self.hasher.take().expect("set above");
        let mut outboard = self.outboard.take();
        let (hasher, outboard, read) = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::new();
            let mut step = || -> io::Result<()> {
                for piece in start..end {
                    let (offset, len) = piece_bounds(size, piece);
                    buf.resize(len as usize, 0);
                    partial.read_at(&mut buf, offset)?;
                    hasher.update(&buf);
                    if let Some(outboard) = &mut outboard {
                        outboard.add(piece, &buf)?;
                    }
                }
                Ok(())
            };
            let read = step();
            (hasher, outboard, read)
        })
        .await
        .expect("hash task panicked");
        self.hasher = Some(hasher);
        self.outboard = outboard;
        read?;
        self.next = end;
        Ok(())
    }

    /// The digest, once [`PrefixHash::advance`] has fed every piece, and the outboard built
    /// alongside; starts over for the next attempt (after a mismatch, pieces are dropped and
    /// fetched again).
    pub(super) fn finish(&mut self) -> Option<(String, Option<PieceOutboard>)> {
        if self.next < piece_count(self.size) {
            return None;
        }
        // The next advance starts over.
        self.next = 0;
        let hasher = self.hasher.take().expect("a hasher between steps");
        Some((hasher.finish(), self.outboard.take()))
    }
}

/// Finishes an outboard built piece by piece: its BLAKE3 root and where it is. `None` (the
/// store then hashes the file whole) if it could not be finished.
pub(super) fn finish_outboard(outboard: Option<PieceOutboard>) -> Option<(Hash, PathBuf)> {
    match outboard?.finish() {
        Ok(done) => Some(done),
        Err(e) => {
            debug!("outboard built after the download instead: {e}");
            None
        }
    }
}
