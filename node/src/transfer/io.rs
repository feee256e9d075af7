//! The async ends bao-tree's encoder and decoder run on: a QUIC stream read in whatever
//! pieces quinn holds ([`StreamIn`]), a QUIC stream written in batches ([`StreamOut`]), and a
//! blob's data and outboard as the encoder reads them ([`BlobData`], [`BlobOutboard`]).
//!
//! Both sides run in the request's own task: no thread hop per read or write. A window of up
//! to [`READ_WINDOW`] bytes is read in the task when the page cache holds all of it
//! (`preadv2` with `RWF_NOWAIT`, which never waits for the disk), and on a blocking thread
//! when it does not. Pending chunks (a download in progress passed on as it arrives) are
//! waited for on the download's change watch and read right after they were written, from
//! the page cache.

use std::{collections::VecDeque, fs::File, io, os::unix::fs::FileExt, sync::Arc};

use bao_tree::{
    io::{fsm, outboard::PostOrderOutboard, sync::Outboard as _},
    BaoTree, ChunkNum, ChunkRanges, TreeNode,
};
use bytes::{Bytes, BytesMut};
use iroh_io::{AsyncSliceReader, AsyncStreamReader, AsyncStreamWriter};
use positioned_io::RandomAccessFile;

use crate::{discovery::PeerCounters, limits::Throttle, metrics::Metrics, store::PartialBlob};

/// The most bytes read from a blob's file in one go.
pub(super) const READ_WINDOW: usize = 1 << 20;
/// Chunks taken from quinn per call.
const CHUNKS_PER_READ: usize = 32;

/// A QUIC receive stream as bao-tree's decoder reads it: quinn's own buffers, handed over
/// without a copy when one holds a whole item.
pub(super) struct StreamIn {
    recv: quinn::RecvStream,
    chunks: VecDeque<Bytes>,
    buffered: usize,
    scratch: Vec<Bytes>,
    eof: bool,
}

impl StreamIn {
    pub(super) fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            chunks: VecDeque::new(),
            buffered: 0,
            scratch: vec![Bytes::new(); CHUNKS_PER_READ],
            eof: false,
        }
    }

    async fn fill(&mut self) -> io::Result<()> {
        match self.recv.read_chunks(&mut self.scratch).await {
            Ok(Some(n)) => {
                for chunk in &mut self.scratch[..n] {
                    let chunk = std::mem::take(chunk);
                    self.buffered += chunk.len();
                    self.chunks.push_back(chunk);
                }
            }
            Ok(None) => self.eof = true,
            // Kept as the source, so the caller can tell a reset from a lost connection.
            Err(e) => return Err(io::Error::other(e)),
        }
        Ok(())
    }
}

impl AsyncStreamReader for StreamIn {
    async fn read_bytes(&mut self, len: usize) -> io::Result<Bytes> {
        while self.buffered < len && !self.eof {
            self.fill().await?;
        }
        let len = len.min(self.buffered);
        self.buffered -= len;
        let front = self.chunks.front_mut();
        if let Some(front) = front.filter(|f| f.len() >= len) {
            let out = front.split_to(len);
            if front.is_empty() {
                self.chunks.pop_front();
            }
            return Ok(out);
        }
        let mut out = BytesMut::with_capacity(len);
        while out.len() < len {
            let front = self
                .chunks
                .front_mut()
                .expect("buffered bytes are in chunks");
            let take = (len - out.len()).min(front.len());
            out.extend_from_slice(&front.split_to(take));
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
        Ok(out.freeze())
    }

    async fn read<const L: usize>(&mut self) -> io::Result<[u8; L]> {
        let bytes = self.read_bytes(L).await?;
        let mut out = [0u8; L];
        if bytes.len() < L {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        out.copy_from_slice(&bytes);
        Ok(out)
    }
}

/// A QUIC send stream as bao-tree's encoder writes it: items are queued (leaves without a
/// copy) and handed to quinn together once `flush_at` bytes are queued, which also counts
/// them and applies the upload limit.
pub(super) struct StreamOut<'a> {
    pub(super) send: &'a mut quinn::SendStream,
    queued: Vec<Bytes>,
    queued_len: usize,
    flush_at: usize,
    pub(super) metrics: &'a Metrics,
    pub(super) peer: &'a PeerCounters,
    pub(super) limit: Option<&'a Throttle>,
    /// Test switch: flip a byte in every item over 64 bytes (after our own verification).
    pub(super) corrupt: bool,
    /// Whether these are chunks we are still fetching (counted as passed on).
    pub(super) following: bool,
}

impl<'a> StreamOut<'a> {
    /// A writer that hands bytes to quinn once `flush_at` are queued.
    pub(super) fn new(
        send: &'a mut quinn::SendStream,
        flush_at: usize,
        metrics: &'a Metrics,
        peer: &'a PeerCounters,
    ) -> Self {
        Self {
            send,
            queued: Vec::new(),
            queued_len: 0,
            flush_at,
            metrics,
            peer,
            limit: None,
            corrupt: false,
            following: false,
        }
    }

    async fn push(&mut self, mut data: Bytes) -> io::Result<()> {
        if self.corrupt && data.len() > 64 {
            let mut bad = data.to_vec();
            let mid = bad.len() / 2;
            bad[mid] ^= 0x55;
            data = bad.into();
        }
        self.queued_len += data.len();
        self.queued.push(data);
        if self.queued_len >= self.flush_at {
            self.flush().await?;
        }
        Ok(())
    }

    /// Hands everything queued to quinn.
    pub(super) async fn flush(&mut self) -> io::Result<()> {
        if self.queued.is_empty() {
            return Ok(());
        }
        let n = std::mem::take(&mut self.queued_len) as u64;
        if let Some(limit) = self.limit {
            limit.take(n).await;
        }
        let result = self.send.write_all_chunks(&mut self.queued).await;
        self.queued.clear();
        result.map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))?;
        Metrics::add(&self.metrics.bytes_sent, n);
        if self.following {
            Metrics::add(&self.metrics.bytes_passed_on, n);
        }
        Metrics::add(&self.peer.sent, n);
        Ok(())
    }
}

impl AsyncStreamWriter for StreamOut<'_> {
    async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.push(Bytes::copy_from_slice(data)).await
    }

    async fn write_bytes(&mut self, data: Bytes) -> io::Result<()> {
        self.push(data).await
    }

    async fn sync(&mut self) -> io::Result<()> {
        self.flush().await
    }
}

/// A blob's bytes as the encoder reads them: verified chunks from a window ([`read_cached`],
/// or a blocking thread when the disk must be read), pending ones once they are verified.
pub(super) struct BlobData {
    file: Arc<File>,
    size: u64,
    /// Chunks verified when the blob was opened: readable without waiting.
    have: ChunkRanges,
    /// The chunks being encoded, so that a window never reads past what is asked.
    wanted: ChunkRanges,
    growing: Option<Arc<PartialBlob>>,
    window: Bytes,
    window_start: u64,
}

impl BlobData {
    pub(super) fn new(
        file: RandomAccessFile,
        size: u64,
        have: ChunkRanges,
        wanted: ChunkRanges,
        growing: Option<Arc<PartialBlob>>,
    ) -> Self {
        let file = match file.try_into_inner() {
            Ok(file) => file,
            Err(_) => unreachable!("a RandomAccessFile on unix is a plain File"),
        };
        Self {
            file: Arc::new(file),
            size,
            have,
            wanted,
            growing,
            window: Bytes::new(),
            window_start: 0,
        }
    }

    /// The end (in bytes) of the run of chunks from `start` that are both verified and
    /// wanted, at most [`READ_WINDOW`] on.
    fn window_end(&self, start: u64) -> u64 {
        let first = ChunkNum(start / mesh_proto::CHUNK_BYTES);
        let readable = self.have.clone() & &self.wanted;
        let bounds = readable.boundaries();
        let pos = bounds.partition_point(|b| *b <= first);
        let run_end = if pos % 2 == 1 {
            bounds.get(pos).map_or(u64::MAX, |end| end.to_bytes())
        } else {
            0
        };
        run_end.min(self.size).min(start + READ_WINDOW as u64)
    }
}

impl AsyncSliceReader for BlobData {
    async fn read_at(&mut self, offset: u64, len: usize) -> io::Result<Bytes> {
        let len = len.min(self.size.saturating_sub(offset) as usize);
        let end = offset + len as u64;
        let window_end = self.window_start + self.window.len() as u64;
        if offset >= self.window_start && end <= window_end {
            let from = (offset - self.window_start) as usize;
            return Ok(self.window.slice(from..from + len));
        }
        let first = offset / mesh_proto::CHUNK_BYTES;
        let last = end.div_ceil(mesh_proto::CHUNK_BYTES).max(first + 1);
        let chunks = ChunkRanges::from(ChunkNum(first)..ChunkNum(last));
        if let (Some(partial), false) = (&self.growing, ranges_cover(&self.have, &chunks)) {
            // Pending: wait until it is verified here, then read what was just written.
            partial.wait_verified(&chunks, false).await?;
            let mut buf = vec![0u8; len];
            self.file.read_exact_at(&mut buf, offset)?;
            return Ok(buf.into());
        }
        let read_end = self.window_end(offset).max(end);
        let window_len = (read_end - offset) as usize;
        let window = match read_cached(&self.file, offset, window_len) {
            Some(window) => window,
            None => {
                let file = self.file.clone();
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; window_len];
                    file.read_exact_at(&mut buf, offset).map(|()| buf)
                })
                .await
                .map_err(io::Error::other)??
            }
        };
        self.window = window.into();
        self.window_start = offset;
        Ok(self.window.slice(0..len))
    }

    async fn size(&mut self) -> io::Result<u64> {
        Ok(self.size)
    }
}

/// `len` bytes at `offset` if the page cache holds all of them, read without blocking
/// (`preadv2` with `RWF_NOWAIT`). `None` when any part would wait for the disk, and on any
/// error or end of file: the blocking read that follows reports those.
fn read_cached(file: &File, offset: u64, len: usize) -> Option<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let filled = buf.len();
        let iov = libc::iovec {
            // SAFETY: within the allocation; the kernel writes at most `len - filled` bytes.
            iov_base: unsafe { buf.as_mut_ptr().add(filled) }.cast(),
            iov_len: len - filled,
        };
        let at = libc::off_t::try_from(offset + filled as u64).ok()?;
        // SAFETY: `iov` points into `buf`'s spare capacity, valid for `iov_len` bytes.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
        if n <= 0 {
            return None;
        }
        // SAFETY: the kernel initialized `n` more bytes.
        unsafe { buf.set_len(filled + n as usize) };
    }
    Some(buf)
}

fn ranges_cover(have: &ChunkRanges, chunks: &ChunkRanges) -> bool {
    (chunks.clone() - have).is_empty()
}

/// A blob's outboard as the encoder reads it: a parent pair of a download in progress is read
/// once a chunk below it is verified (it is written before the first leaf below it).
pub(super) struct BlobOutboard {
    inner: PostOrderOutboard<RandomAccessFile>,
    growing: Option<Arc<PartialBlob>>,
}

impl BlobOutboard {
    pub(super) fn new(
        inner: PostOrderOutboard<RandomAccessFile>,
        growing: Option<Arc<PartialBlob>>,
    ) -> Self {
        Self { inner, growing }
    }
}

impl fsm::Outboard for BlobOutboard {
    fn root(&self) -> blake3::Hash {
        self.inner.root
    }

    fn tree(&self) -> BaoTree {
        self.inner.tree
    }

    async fn load(&mut self, node: TreeNode) -> io::Result<Option<(blake3::Hash, blake3::Hash)>> {
        if let Some(partial) = &self.growing {
            partial
                .wait_verified(&ChunkRanges::from(node.chunk_range()), true)
                .await?;
        }
        // 64 bytes of a file far smaller than the blob: read in place.
        self.inner.load(node)
    }
}
