//! The fetching side of one range request: ask a peer for chunk ranges of a blob, decode and
//! verify the bao stream in the request's task and hand verified items to the [`PartialBlob`]
//! in batches.
//!
//! Nothing is written before bao-tree has checked it against the blob's root: a flipped byte
//! ends the request with [`GetError::Corrupt`] and leaves those chunks missing.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use bao_tree::{
    io::{
        fsm::{ResponseDecoder, ResponseDecoderNext},
        BaoContentItem, DecodeError,
    },
    ChunkRanges,
};
use mesh_proto::{
    wire::{ErrorCode, Request, Response, RESET_SOURCE_CORRUPT, RESET_UNAVAILABLE},
    Hash,
};
use tokio::task::JoinHandle;

use super::io::StreamIn;
use crate::{
    discovery::PeerCounters,
    metrics::Metrics,
    net::{read_frame, write_frame, StreamError},
    store::{ranges, PartialBlob, StoreError, Written},
};

/// Verified bytes gathered before they are handed to the store, when they arrive fast.
const MIN_BATCH: usize = 256 << 10;
/// Verified bytes held back from the store at most, while the previous batch is written.
const MAX_BATCH: usize = 4 << 20;
/// How long verified bytes wait for more before they are handed to the store.
const BATCH_DELAY: std::time::Duration = std::time::Duration::from_millis(1);

/// Why a range request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GetError {
    /// The peer sent bytes that do not match the blob's hash. It should not be asked again.
    #[error("peer {peer} sent data that failed verification for blob {hash}")]
    Corrupt {
        /// The peer.
        peer: SocketAddr,
        /// The blob.
        hash: Hash,
    },
    /// The peer's own copy failed its checks (changed on disk); it stopped serving it.
    #[error("peer {peer}'s copy of blob {hash} changed or is corrupt; it no longer serves it")]
    SourceCorrupt {
        /// The peer.
        peer: SocketAddr,
        /// The blob.
        hash: Hash,
    },
    /// The peer refused the request.
    #[error("peer {peer} refused blob {hash}: {code:?}")]
    Refused {
        /// The peer.
        peer: SocketAddr,
        /// The blob.
        hash: Hash,
        /// Its reason.
        code: ErrorCode,
    },
    /// The peer was passing on chunks it was fetching itself, and its fetch failed or stalled.
    /// What it sent before is kept; the rest must come from elsewhere.
    #[error("peer {peer} could not pass on pending chunks of blob {hash}")]
    Unavailable {
        /// The peer.
        peer: SocketAddr,
        /// The blob.
        hash: Hash,
    },
    /// The peer broke the protocol (wrong size, ranges it was not asked for, short stream).
    #[error("peer {peer}: protocol error: {why}")]
    Protocol {
        /// The peer.
        peer: SocketAddr,
        /// What was wrong.
        why: String,
    },
    /// The connection or stream failed.
    #[error("peer {peer}: {source}")]
    Stream {
        /// The peer.
        peer: SocketAddr,
        /// The error.
        source: StreamError,
    },
    /// Writing verified bytes to the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl GetError {
    /// Whether the peer sent bad data (or its own copy was bad), as opposed to refusing or
    /// losing the connection.
    pub fn is_bad_data(&self) -> bool {
        matches!(self, Self::Corrupt { .. } | Self::SourceCorrupt { .. })
    }
}

/// Where a range request reports what it wrote, and how it is cancelled.
#[derive(Clone, Debug)]
pub struct GetHooks {
    /// Node counters.
    pub metrics: Arc<Metrics>,
    /// Bumped with new verified bytes of this file.
    pub progress: Arc<AtomicU64>,
    /// Bumped with verified bytes from this peer.
    pub peer: Arc<PeerCounters>,
    /// Set to stop reading (another peer delivered the piece first).
    pub cancel: Arc<AtomicBool>,
}

/// Requests `wanted` chunks of `partial`'s blob from `conn` and writes what verifies.
///
/// Returns the chunks the peer sent (a subset of `wanted`: the ones it holds), or fewer if
/// cancelled.
pub async fn get_ranges(
    conn: &quinn::Connection,
    partial: Arc<PartialBlob>,
    wanted: &ChunkRanges,
    hooks: GetHooks,
) -> Result<ChunkRanges, GetError> {
    let peer = conn.remote_address();
    let hash = partial.hash();
    let size = partial.size();
    let stream_err = |source| GetError::Stream { peer, source };
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| stream_err(StreamError::from_connection(e)))?;
    let request = Request::Get {
        hash,
        ranges: ranges::to_spans(wanted, size),
    };
    let _ = send.set_priority(crate::net::CONTROL_PRIORITY);
    write_frame(&mut send, &request).await.map_err(stream_err)?;
    let _ = send.finish();
    let header = match read_frame(&mut recv).await {
        Ok(header) => header,
        // A reset can overtake the header frame: the provider failed at once.
        Err(StreamError::Read(quinn::ReadExactError::ReadError(e))) => {
            return Err(read_error(e, peer, hash))
        }
        Err(e) => return Err(stream_err(e)),
    };
    let sent = match header {
        Response::Get {
            size: peer_size,
            ranges,
        } => {
            if peer_size != size {
                return Err(GetError::Protocol {
                    peer,
                    why: format!("blob {hash} has {size} bytes, peer says {peer_size}"),
                });
            }
            let sent = ranges::from_spans(&ranges, size);
            if !(sent.clone() - wanted).is_empty() {
                return Err(GetError::Protocol {
                    peer,
                    why: "sent ranges that were not requested".into(),
                });
            }
            sent
        }
        Response::Error(ErrorCode::SourceChanged) => {
            return Err(GetError::SourceCorrupt { peer, hash })
        }
        Response::Error(code) => return Err(GetError::Refused { peer, hash, code }),
        other => {
            return Err(GetError::Protocol {
                peer,
                why: format!("unexpected response {other:?}"),
            })
        }
    };
    if sent.is_empty() {
        return Ok(sent);
    }
    match decode(recv, partial, &sent, &hooks).await {
        Ok(()) => Ok(sent),
        Err(DecodeOrStore::Store(e)) => Err(e.into()),
        Err(DecodeOrStore::Decode(e)) => Err(classify(e, peer, hash)),
    }
}

/// Decodes the response in this task and writes what verifies on a blocking thread, a batch at
/// a time: a batch goes out when it holds [`MIN_BATCH`] bytes and the previous one is written,
/// or [`BATCH_DELAY`] after its first item arrived. A fast stream is written in large batches
/// with few thread hops; a slow one leaf by leaf, at most [`BATCH_DELAY`] late.
async fn decode(
    recv: quinn::RecvStream,
    partial: Arc<PartialBlob>,
    sent: &ChunkRanges,
    hooks: &GetHooks,
) -> Result<(), DecodeOrStore> {
    let mut decoder = ResponseDecoder::new(
        partial.hash().into(),
        sent.clone(),
        partial.tree(),
        StreamIn::new(recv),
    );
    let mut writer = BatchWriter {
        partial,
        hooks,
        batch: Vec::new(),
        bytes: 0,
        since: None,
        writing: None,
    };
    loop {
        let mut next = Box::pin(decoder.next());
        let step = loop {
            let Some(since) = writer.since else {
                break next.await;
            };
            tokio::select! {
                biased;
                step = &mut next => break step,
                _ = tokio::time::sleep_until(since + BATCH_DELAY) => writer.flush(true).await?,
            }
        };
        let item = match step {
            ResponseDecoderNext::More((rest, item)) => {
                decoder = rest;
                item
            }
            ResponseDecoderNext::Done(_) => break,
        };
        if hooks.cancel.load(Ordering::Relaxed) {
            writer.batch.clear();
            break;
        }
        match item {
            Ok(item) => writer.push(item).await?,
            Err(e) => {
                // What verified before the bad item is kept.
                writer.finish().await?;
                return Err(e.into());
            }
        }
    }
    writer.finish().await
}

/// Verified items on their way to the store, at most one batch being written at a time.
struct BatchWriter<'a> {
    partial: Arc<PartialBlob>,
    hooks: &'a GetHooks,
    batch: Vec<BaoContentItem>,
    /// Data bytes in `batch`.
    bytes: usize,
    /// When the first item of `batch` arrived.
    since: Option<tokio::time::Instant>,
    writing: Option<JoinHandle<Result<Written, StoreError>>>,
}

impl BatchWriter<'_> {
    async fn push(&mut self, item: BaoContentItem) -> Result<(), StoreError> {
        if let BaoContentItem::Leaf(leaf) = &item {
            self.bytes += leaf.data.len();
        }
        self.batch.push(item);
        self.since.get_or_insert_with(tokio::time::Instant::now);
        if self.bytes >= MAX_BATCH {
            self.flush(true).await?;
        } else if self.bytes >= MIN_BATCH {
            self.flush(false).await?;
        }
        Ok(())
    }

    /// Starts writing the batch, unless the previous one is still being written and `wait`
    /// is false (then the batch grows until the next flush).
    async fn flush(&mut self, wait: bool) -> Result<(), StoreError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        if let Some(done) = self.writing.take() {
            if !wait && !done.is_finished() {
                self.writing = Some(done);
                return Ok(());
            }
            self.hooks.count(done.await.expect("writer panicked")?);
        }
        let partial = self.partial.clone();
        let batch = std::mem::take(&mut self.batch);
        self.bytes = 0;
        self.since = None;
        self.writing = Some(tokio::task::spawn_blocking(move || {
            partial.write_batch(&batch)
        }));
        Ok(())
    }

    /// Writes what is left and waits until it is written.
    async fn finish(mut self) -> Result<(), DecodeOrStore> {
        self.flush(true).await?;
        if let Some(done) = self.writing.take() {
            self.hooks.count(done.await.expect("writer panicked")?);
        }
        Ok(())
    }
}

impl GetHooks {
    fn count(&self, written: Written) {
        Metrics::add(&self.metrics.bytes_duplicate, written.duplicate);
        Metrics::add(&self.metrics.bytes_received, written.new);
        Metrics::add(&self.progress, written.new);
        Metrics::add(&self.peer.received, written.new);
    }
}

enum DecodeOrStore {
    Decode(DecodeError),
    Store(StoreError),
}

impl From<StoreError> for DecodeOrStore {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl From<DecodeError> for DecodeOrStore {
    fn from(e: DecodeError) -> Self {
        Self::Decode(e)
    }
}

fn classify(e: DecodeError, peer: SocketAddr, hash: Hash) -> GetError {
    match e {
        DecodeError::LeafHashMismatch(_) | DecodeError::ParentHashMismatch(_) => {
            GetError::Corrupt { peer, hash }
        }
        DecodeError::Io(io) => io_error(io, peer, hash),
        DecodeError::ParentNotFound(_) | DecodeError::LeafNotFound(_) => GetError::Protocol {
            peer,
            why: "stream ended before the requested ranges".into(),
        },
    }
}

fn io_error(io: std::io::Error, peer: SocketAddr, hash: Hash) -> GetError {
    let read = io
        .get_ref()
        .and_then(|e| e.downcast_ref::<quinn::ReadError>());
    match read {
        Some(e) => read_error(e.clone(), peer, hash),
        None => GetError::Protocol {
            peer,
            why: format!("stream ended early: {io}"),
        },
    }
}

fn read_error(e: quinn::ReadError, peer: SocketAddr, hash: Hash) -> GetError {
    match e {
        quinn::ReadError::Reset(code) if code == RESET_SOURCE_CORRUPT.into() => {
            GetError::SourceCorrupt { peer, hash }
        }
        quinn::ReadError::Reset(code) if code == RESET_UNAVAILABLE.into() => {
            GetError::Unavailable { peer, hash }
        }
        e => GetError::Stream {
            peer,
            source: StreamError::Read(quinn::ReadExactError::ReadError(e)),
        },
    }
}
