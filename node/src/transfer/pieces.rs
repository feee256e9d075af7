//! Raw pieces of a file being assembled from an origin (see `store::pieces`), both ways:
//! advertising and serving them to members, and subscribing to and fetching them from a peer.
//!
//! Pieces are not verified on arrival (the file's BLAKE3 root is unknown until it is whole);
//! the whole file is checked against its published digest before it is trusted.

use std::{collections::HashSet, net::SocketAddr, sync::Arc, time::Duration};

use mesh_proto::{
    wire::{ErrorCode, Request, Response},
    PIECE_BYTES,
};
use tokio::io::AsyncReadExt;
use tracing::debug;

use crate::{
    net::{read_frame, write_frame, StreamError},
    store::pieces::{piece_set, PieceFile},
};

/// How long a piece subscription waits after a change before sending, to batch updates.
const ADVERTISE_COALESCE: Duration = Duration::from_millis(20);

/// Why a piece could not be fetched from a peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PieceError {
    /// The stream or connection failed.
    #[error("peer {peer}: {source}")]
    Stream {
        /// The peer.
        peer: SocketAddr,
        /// The error.
        source: StreamError,
    },
    /// The peer does not hold the piece (any more).
    #[error("peer {peer} does not hold piece {piece}")]
    NotHeld {
        /// The peer.
        peer: SocketAddr,
        /// The piece.
        piece: usize,
    },
    /// The peer did not send the piece in time.
    #[error("peer {peer} stalled sending piece {piece}")]
    Stalled {
        /// The peer.
        peer: SocketAddr,
        /// The piece.
        piece: usize,
    },
    /// The peer sent fewer bytes than it announced, or more than a piece.
    #[error("peer {peer} sent a bad piece {piece}")]
    Malformed {
        /// The peer.
        peer: SocketAddr,
        /// The piece.
        piece: usize,
    },
}

/// What a peer said about a file it assembles.
#[derive(Debug)]
pub struct PieceNews {
    /// The peer's download id.
    pub node: u64,
    /// Pieces it holds.
    pub have: HashSet<usize>,
    /// Pieces it is fetching.
    pub pending: HashSet<usize>,
}

/// Serves a subscription: the current frame, then one after every change.
pub async fn serve_subscription(partial: Arc<PieceFile>, mut send: quinn::SendStream) {
    let _ = send.set_priority(crate::net::CONTROL_PRIORITY);
    let mut changes = partial.subscribe();
    loop {
        if write_frame(&mut send, &partial.frame()).await.is_err() {
            return;
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { let _ = send.finish(); return },
            _ = send.stopped() => return,
        }
        tokio::time::sleep(ADVERTISE_COALESCE).await;
    }
}

/// Serves one piece, or NotFound. `danger_corrupt` flips a byte (the hostile-peer test switch).
pub async fn serve_piece(
    partial: Option<Arc<PieceFile>>,
    piece: u32,
    danger_corrupt: bool,
    mut send: quinn::SendStream,
) {
    let mut bytes = match partial {
        Some(p) => tokio::task::spawn_blocking(move || p.read_piece(piece))
            .await
            .expect("piece read panicked"),
        None => None,
    };
    if danger_corrupt {
        if let Some(b) = bytes.as_mut().filter(|b| !b.is_empty()) {
            let mid = b.len() / 2;
            b[mid] ^= 0x55;
        }
    }
    let _ = match bytes {
        Some(bytes) => {
            let header = Response::HubPiece {
                len: bytes.len() as u64,
            };
            match write_frame(&mut send, &header).await {
                Ok(()) => send.write_all(&bytes).await.map_err(|_| ()),
                Err(_) => Err(()),
            }
        }
        None => write_frame(&mut send, &Response::Error(ErrorCode::NotFound))
            .await
            .map_err(|_| ()),
    };
    let _ = send.finish();
}

/// Subscribes to what `conn`'s node holds of the file `etag` and hands each frame to `news`,
/// until the subscription ends (the peer has no such file, or it completed it) or `news`
/// returns false.
pub async fn subscribe(
    conn: &quinn::Connection,
    etag: String,
    size: u64,
    mut news: impl FnMut(PieceNews) -> bool,
) -> Result<(), StreamError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(StreamError::from_connection)?;
    let _ = send.set_priority(crate::net::CONTROL_PRIORITY);
    write_frame(&mut send, &Request::HubSubscribe { etag }).await?;
    let _ = send.finish();
    loop {
        match read_frame(&mut recv).await? {
            Response::HubHave {
                node,
                size: s,
                have,
                pending,
            } if s == size => {
                let frame = PieceNews {
                    node,
                    have: piece_set(&have),
                    pending: piece_set(&pending),
                };
                if !news(frame) {
                    return Ok(());
                }
            }
            other => {
                debug!("piece subscription ended: {other:?}");
                return Ok(());
            }
        }
    }
}

/// Fetches piece `piece` of the file `etag` from `conn`'s node.
pub async fn get_piece(
    conn: &quinn::Connection,
    etag: &str,
    piece: usize,
) -> Result<Vec<u8>, PieceError> {
    let peer = conn.remote_address();
    let stream = |source| PieceError::Stream { peer, source };
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| stream(StreamError::from_connection(e)))?;
    let request = Request::HubGet {
        etag: etag.to_string(),
        piece: piece as u32,
    };
    let _ = send.set_priority(crate::net::CONTROL_PRIORITY);
    write_frame(&mut send, &request).await.map_err(stream)?;
    let _ = send.finish();
    match read_frame(&mut recv).await.map_err(stream)? {
        Response::HubPiece { len } if len <= PIECE_BYTES => {
            let mut buf = Vec::with_capacity(len as usize);
            (&mut recv)
                .take(len)
                .read_to_end(&mut buf)
                .await
                .map_err(|_| PieceError::Malformed { peer, piece })?;
            if buf.len() as u64 != len {
                return Err(PieceError::Malformed { peer, piece });
            }
            Ok(buf)
        }
        Response::HubPiece { .. } => Err(PieceError::Malformed { peer, piece }),
        _ => Err(PieceError::NotHeld { peer, piece }),
    }
}
