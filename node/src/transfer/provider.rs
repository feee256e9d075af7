//! The serving side: one task per accepted connection, one per request stream.
//!
//! A `Get` is encoded with bao-tree's *validated* encoder on a blocking thread: every chunk
//! group is hashed against the blob's outboard before it is written to the stream, so a file
//! that changed on disk (even with its mtime restored) is caught here, the stream is reset with
//! [`RESET_SOURCE_CORRUPT`] and the blob is dropped from the store.

use std::{io, sync::Arc, time::Duration};

use bao_tree::{
    io::{fsm::encode_ranges_validated, EncodeError},
    ChunkRanges,
};
use mesh_proto::wire::{
    ErrorCode, Request, Response, RESET_IO, RESET_SOURCE_CORRUPT, RESET_UNAVAILABLE,
};
use tracing::{debug, warn, Instrument};

use super::io::{BlobData, BlobOutboard, StreamOut};
use super::pieces;
use super::STREAM_BUFFER;
use crate::{
    discovery::{PeerCounters, Peers},
    limits::Throttle,
    metrics::Metrics,
    net::{read_frame, write_frame, StreamError},
    store::{blocking, ranges, BlobHave, Store, StoreError},
};

/// How long a subscription waits after a change before sending, to batch leaf writes. Every
/// peer subscribes to every other, so at N = 32 a node took in about 115 frames a second at
/// 100 ms; 400 ms cost 4-5% less fleet CPU there and changed no fleet's time. What peers must
/// learn at once, the blocks we start fetching, goes out after [`PENDING_COALESCE`].
const SUBSCRIBE_COALESCE: Duration = Duration::from_millis(400);
/// How long a subscription waits after a change to what we fetch: long enough for the
/// scheduler to finish one step (a block done, the next one started).
const PENDING_COALESCE: Duration = Duration::from_millis(1);

/// Buffer in front of the stream while passing on chunks as they arrive: smaller than a leaf
/// (16 KiB), so leaves go straight through and only parent hashes are gathered.
const FOLLOW_BUFFER: usize = 4 << 10;

/// What a provider needs, shared by all its connections.
#[derive(Clone, Debug)]
pub struct Provider {
    /// The store served from.
    pub store: Store,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Upload limit in bytes per second, for the whole node.
    pub upload_limit: Option<Arc<Throttle>>,
    /// Per-peer counters.
    pub peers: Peers,
    /// No mesh key: then nothing from a gated or private repo is served to anyone.
    pub open_mode: bool,
    /// Test-only: flip bytes in what we send, after our own verification, to play a hostile
    /// peer. Set by `MESH_DANGER_CORRUPT_UPLOADS=1`; never in normal use.
    pub danger_corrupt_uploads: bool,
}

impl Provider {
    /// Serves request streams on an authenticated connection until it closes.
    pub async fn serve(self, conn: quinn::Connection) {
        let peer = conn.remote_address();
        let counters = self.peers.counters(peer);
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(streams) => streams,
                Err(e) => {
                    debug!(%peer, "connection ended: {e}");
                    return;
                }
            };
            let this = self.clone();
            let counters = counters.clone();
            tokio::spawn(this.request_task(send, recv, counters).in_current_span());
        }
    }

    async fn request_task(
        self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        counters: Arc<PeerCounters>,
    ) {
        let request: Request = match read_frame(&mut recv).await {
            Ok(request) => request,
            Err(e) => {
                debug!("bad request: {e}");
                let _ = write_frame(&mut send, &Response::Error(ErrorCode::BadRequest)).await;
                let _ = send.finish();
                return;
            }
        };
        if let Err(e) = self.request_impl(request, send, counters).await {
            debug!("request failed: {e}");
        }
    }

    async fn request_impl(
        &self,
        request: Request,
        mut send: quinn::SendStream,
        counters: Arc<PeerCounters>,
    ) -> Result<(), StreamError> {
        let store = self.store.clone();
        if self.open_mode && self.touches_restricted(&request).await {
            write_frame(&mut send, &Response::Error(ErrorCode::NotFound)).await?;
            let _ = send.finish();
            return Ok(());
        }
        let response = match request {
            Request::Get { hash, ranges } => return self.get(hash, ranges, send, counters).await,
            Request::Subscribe { hash } => return self.subscribe(hash, send).await,
            Request::HubSubscribe { etag } => {
                match self.store.piece_files().get(&etag) {
                    Some(p) if !(self.open_mode && p.restricted()) => {
                        pieces::serve_subscription(p, send).await
                    }
                    _ => {
                        write_frame(&mut send, &Response::Error(ErrorCode::NotFound)).await?;
                        let _ = send.finish();
                    }
                }
                return Ok(());
            }
            Request::HubGet { etag, piece } => {
                let partial = self
                    .store
                    .piece_files()
                    .get(&etag)
                    .filter(|p| !(self.open_mode && p.restricted()));
                pieces::serve_piece(partial, piece, self.danger_corrupt_uploads, send).await;
                return Ok(());
            }
            Request::Have { hash } => match blocking(move || store.open_reader(hash)).await {
                Ok(reader) => {
                    let size = reader.outboard.tree.size();
                    Response::Have {
                        size,
                        ranges: ranges::to_spans(&reader.have, size),
                        pending: Default::default(),
                        node: 0,
                    }
                }
                Err(e) => Response::Error(error_code(&e)),
            },
            Request::Manifest(model) => match blocking(move || store.manifest(&model)).await {
                Ok(Some(manifest)) => Response::Manifest(manifest.encode()),
                Ok(None) => Response::Error(ErrorCode::NotFound),
                Err(e) => Response::Error(error_code(&e)),
            },
            Request::Models => match blocking(move || store.models()).await {
                Ok(mut models) => {
                    if self.open_mode {
                        let store = self.store.clone();
                        models = blocking(move || {
                            let mut open = Vec::new();
                            for m in models {
                                if !store.is_restricted(m.id)? {
                                    open.push(m);
                                }
                            }
                            Ok(open)
                        })
                        .await
                        .unwrap_or_default();
                    }
                    Response::Models(models)
                }
                Err(e) => Response::Error(error_code(&e)),
            },
            _ => Response::Error(ErrorCode::BadRequest),
        };
        write_frame(&mut send, &response).await?;
        let _ = send.finish();
        Ok(())
    }

    /// Whether a request is about a gated or private model or blob (refused in open mode).
    async fn touches_restricted(&self, request: &Request) -> bool {
        let store = self.store.clone();
        let request = request.clone();
        blocking(move || {
            Ok(match request {
                Request::Get { hash, .. }
                | Request::Have { hash }
                | Request::Subscribe { hash } => store.is_restricted(hash)?,
                Request::Manifest(model) => match store.manifest(&model)? {
                    Some(m) => store.is_restricted(m.id())?,
                    None => false,
                },
                _ => false,
            })
        })
        .await
        // When in doubt, refuse.
        .unwrap_or(true)
    }

    /// Streams what we hold of a blob, then each addition, until we hold it all or the
    /// subscriber stops reading. A blob we have none of yet is waited for, so a peer that
    /// starts the same download a moment after the subscriber is seen the moment it starts.
    async fn subscribe(
        &self,
        hash: mesh_proto::Hash,
        mut send: quinn::SendStream,
    ) -> Result<(), StreamError> {
        let _ = send.set_priority(crate::net::CONTROL_PRIORITY);
        let mut sent = ChunkRanges::empty();
        let mut sent_pending = ChunkRanges::empty();
        let mut first = true;
        let mut appeared = self.store.watch_new_blobs();
        loop {
            let store = self.store.clone();
            let held = blocking(move || store.have(hash)).await;
            let Ok(Some(BlobHave {
                size,
                have,
                pending,
                changes,
                node,
            })) = held
            else {
                if first && matches!(held, Ok(None)) {
                    tokio::select! {
                        _ = appeared.changed() => continue,
                        _ = send.stopped() => return Ok(()),
                    }
                }
                if first {
                    write_frame(&mut send, &Response::Error(ErrorCode::NotFound)).await?;
                }
                let _ = send.finish();
                return Ok(());
            };
            let added = have.clone() - &sent;
            if first || !added.is_empty() || pending != sent_pending {
                let frame = Response::Have {
                    size,
                    ranges: ranges::to_spans(&added, size),
                    pending: ranges::to_spans(&pending, size),
                    node,
                };
                write_frame(&mut send, &frame).await?;
                sent = have;
                sent_pending = pending;
                first = false;
            }
            let Some(mut watch) = changes else {
                // Complete (or a partial nobody is writing): nothing more will come.
                let _ = send.finish();
                return Ok(());
            };
            let generation = *watch.borrow_and_update();
            tokio::select! {
                _ = watch.changed() => {}
                _ = send.stopped() => return Ok(()),
            }
            // Coalesce a burst of leaf writes into one frame, but tell at once what we started or
            // stopped fetching: peers ask us for it as it arrives.
            let deadline = tokio::time::Instant::now() + SUBSCRIBE_COALESCE;
            loop {
                if *watch.borrow_and_update() != generation {
                    tokio::time::sleep(PENDING_COALESCE).await;
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    changed = watch.changed() => if changed.is_err() { break },
                }
            }
        }
    }

    async fn get(
        &self,
        hash: mesh_proto::Hash,
        wanted: mesh_proto::wire::ChunkSpans,
        mut send: quinn::SendStream,
        counters: Arc<PeerCounters>,
    ) -> Result<(), StreamError> {
        let store = self.store.clone();
        let reader = match blocking(move || store.open_reader(hash)).await {
            Ok(reader) => reader,
            Err(e) => {
                debug!(hash = %hash.fmt_short(), "not serving: {e}");
                write_frame(&mut send, &Response::Error(error_code(&e))).await?;
                let _ = send.finish();
                return Ok(());
            }
        };
        let size = reader.outboard.tree.size();
        // What we are fetching ourselves is promised too, and passed on as it is verified.
        let sending = ranges::from_spans(&wanted, size) & &reader.promised();
        let header = Response::Get {
            size,
            ranges: ranges::to_spans(&sending, size),
        };
        write_frame(&mut send, &header).await?;
        Metrics::add(&self.metrics.requests_served, 1);
        // Chunks we are still fetching go out leaf by leaf as they are verified: a big buffer
        // would hold them back until the whole block is here.
        let following = !(sending.clone() - &reader.have).is_empty();
        let flush_at = if following {
            FOLLOW_BUFFER
        } else {
            STREAM_BUFFER
        };
        let (file, outboard, have, growing) = reader.into_parts();
        let data = BlobData::new(file, size, have, sending.clone(), growing.clone());
        let outboard = BlobOutboard::new(outboard, growing);
        let mut out = StreamOut::new(&mut send, flush_at, &self.metrics, &counters);
        out.limit = self.upload_limit.as_deref();
        out.corrupt = self.danger_corrupt_uploads;
        out.following = following;
        let result = match encode_ranges_validated(data, outboard, &sending, &mut out).await {
            Ok(()) => out.flush().await.map_err(EncodeError::Io),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                let _ = send.finish();
            }
            Err(EncodeError::Io(e))
                if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::TimedOut) =>
            {
                // A pending block we promised stopped arriving.
                debug!(hash = %hash.fmt_short(), "pending chunks unavailable: {e}");
                let _ = send.reset(RESET_UNAVAILABLE.into());
            }
            Err(EncodeError::Io(e)) => {
                debug!(hash = %hash.fmt_short(), "stream ended while sending: {e}");
                let _ = send.reset(RESET_IO.into());
            }
            Err(e) => {
                warn!(hash = %hash.fmt_short(), "our copy failed verification while serving: {e}");
                Metrics::add(&self.metrics.source_corrupt, 1);
                let _ = send.reset(RESET_SOURCE_CORRUPT.into());
                let store = self.store.clone();
                let _ = blocking(move || store.forget_blob(hash)).await;
            }
        }
        Ok(())
    }
}

fn error_code(e: &StoreError) -> ErrorCode {
    match e {
        StoreError::NotFound(_) => ErrorCode::NotFound,
        StoreError::SourceChanged(_) => ErrorCode::SourceChanged,
        _ => ErrorCode::Internal,
    }
}
