//! The fetching side of one range request: ask a peer for chunk ranges of a blob, decode the
//! bao stream on a blocking thread and hand each verified item to the [`PartialBlob`].
//!
//! Nothing is written before bao-tree has checked it against the blob's root: a flipped byte
//! ends the request with [`GetError::Corrupt`] and leaves those chunks missing.

use std::{
    io::BufReader,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use bao_tree::{
    io::{sync::DecodeResponseIter, BaoContentItem, DecodeError},
    ChunkRanges,
};
use mesh_proto::{
    wire::{ErrorCode, Request, Response, RESET_SOURCE_CORRUPT, RESET_UNAVAILABLE},
    Hash,
};
use tokio_util::io::SyncIoBridge;

use super::STREAM_BUFFER;
use crate::{
    discovery::PeerCounters,
    metrics::Metrics,
    net::{read_frame, write_frame, StreamError},
    store::{ranges, PartialBlob, StoreError},
};

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
    let bridge = SyncIoBridge::new(recv);
    let decode_ranges = sent.clone();
    let result = tokio::task::spawn_blocking(move || {
        let reader = BufReader::with_capacity(STREAM_BUFFER, bridge);
        let items = DecodeResponseIter::new(hash.into(), partial.tree(), reader, &decode_ranges);
        for item in items {
            if hooks.cancel.load(Ordering::Relaxed) {
                break;
            }
            let item = item?;
            let written = partial.write(&item).map_err(DecodeOrStore::Store)?;
            if let BaoContentItem::Leaf(leaf) = &item {
                Metrics::add(
                    &hooks.metrics.bytes_duplicate,
                    leaf.data.len() as u64 - written,
                );
            }
            Metrics::add(&hooks.metrics.bytes_received, written);
            Metrics::add(&hooks.progress, written);
            Metrics::add(&hooks.peer.received, written);
        }
        Ok::<(), DecodeOrStore>(())
    })
    .await
    .expect("decoder task panicked");
    match result {
        Ok(()) => Ok(sent),
        Err(DecodeOrStore::Store(e)) => Err(e.into()),
        Err(DecodeOrStore::Decode(e)) => Err(classify(e, peer, hash)),
    }
}

enum DecodeOrStore {
    Decode(DecodeError),
    Store(StoreError),
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
