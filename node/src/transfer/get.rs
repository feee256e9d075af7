//! The fetching side of one range request: ask a peer for chunk ranges of a blob, decode the
//! bao stream on a blocking thread and hand each verified item to the [`PartialBlob`].
//!
//! Nothing is written before bao-tree has checked it against the blob's root: a flipped byte
//! ends the request with [`GetError::Corrupt`] and leaves those chunks missing.

use std::{
    io::BufReader,
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc},
};

use bao_tree::{
    io::{sync::DecodeResponseIter, DecodeError},
    ChunkRanges,
};
use mesh_proto::{
    wire::{ErrorCode, Request, Response, RESET_SOURCE_CORRUPT},
    Hash,
};
use tokio_util::io::SyncIoBridge;

use super::STREAM_BUFFER;
use crate::{
    metrics::Metrics,
    net::{read_frame, write_frame, StreamError},
    ranges,
    store::{PartialBlob, StoreError},
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

/// Requests `wanted` chunks of `partial`'s blob from `conn` and writes what verifies.
///
/// Returns the chunks the peer sent (a subset of `wanted`: the ones it holds). `progress` is
/// bumped with data bytes as they are written.
pub async fn get_ranges(
    conn: &quinn::Connection,
    partial: Arc<PartialBlob>,
    wanted: &ChunkRanges,
    metrics: Arc<Metrics>,
    progress: Arc<AtomicU64>,
) -> Result<ChunkRanges, GetError> {
    let peer = conn.remote_address();
    let hash = partial.hash();
    let size = partial.size();
    let stream_err = |source| GetError::Stream { peer, source };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| {
        stream_err(StreamError::Read(quinn::ReadExactError::ReadError(
            e.into(),
        )))
    })?;
    let request = Request::Get {
        hash,
        ranges: ranges::to_spans(wanted, size),
    };
    write_frame(&mut send, &request).await.map_err(stream_err)?;
    let _ = send.finish();
    let sent = match read_frame(&mut recv).await.map_err(stream_err)? {
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
            let written = partial.write(&item?).map_err(DecodeOrStore::Store)?;
            Metrics::add(&metrics.bytes_received, written);
            Metrics::add(&progress, written);
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
        Some(quinn::ReadError::Reset(code)) if *code == RESET_SOURCE_CORRUPT.into() => {
            GetError::SourceCorrupt { peer, hash }
        }
        Some(e) => GetError::Stream {
            peer,
            source: StreamError::Read(quinn::ReadExactError::ReadError(e.clone())),
        },
        None => GetError::Protocol {
            peer,
            why: format!("stream ended early: {io}"),
        },
    }
}
