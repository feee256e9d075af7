//! A file's bytes for a `GET`, streamed as they arrive.
//!
//! A file in the store is read from the store. Otherwise the node's shared download of it
//! (`Fetcher::fetch_file`) is followed: bytes from peers go out as each 16 KiB group verifies
//! against the BLAKE3 root; bytes from HuggingFace (or relayed by members before the file's
//! root is known) go out as their pieces arrive, except the file's last piece, which goes out
//! only once the whole file matched its published sha256. If pieces already sent turn out bad
//! (the whole-file check failed and dropped them) the response is aborted, so the client sees
//! a failed download, never a complete wrong file, and for a while a request that would
//! resume that file from the middle is refused ([`Poisoned`]), so the client starts over.

use std::{
    collections::HashMap,
    io,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::body::{Body, Bytes};
use mesh_proto::PIECE_BYTES;
use tokio::{
    io::{AsyncReadExt, AsyncSeekExt},
    sync::{mpsc, watch},
};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    fetch::{FetchError, Fetcher, FileState},
    hf::{HubFile, RepoInfo},
    metrics::Metrics,
    store::{
        blocking,
        pieces::{piece_bounds, PieceFile},
    },
};

/// Bytes read and sent at a time.
const CHUNK: u64 = 256 << 10;
/// Chunks buffered between the reader and the client.
const BUFFERED: usize = 8;
/// How long a stream may wait without any progress of the download before it gives up.
const STALL: Duration = Duration::from_secs(60);
/// How long a refused resume stays refused after an aborted stream.
const POISON_FOR: Duration = Duration::from_secs(600);

/// Files whose streams were aborted for bad bytes, by etag: a resume from the middle would
/// stitch good bytes to bad ones. A std mutex: lookups only.
#[derive(Clone, Debug, Default)]
pub(crate) struct Poisoned(Arc<Mutex<HashMap<String, Instant>>>);

impl Poisoned {
    pub(crate) fn is_poisoned(&self, etag: &str) -> bool {
        let map = self.0.lock().expect("poisoned lock");
        map.get(etag).is_some_and(|at| at.elapsed() < POISON_FOR)
    }

    fn poison(&self, etag: &str) {
        let mut map = self.0.lock().expect("poisoned lock");
        map.insert(etag.to_string(), Instant::now());
    }
}

/// What a stream carries.
type Chunk = Result<Bytes, io::Error>;

/// The body for bytes `start..end` of `file`, and the error to answer instead if the download
/// fails before its first byte.
pub(super) async fn body(
    fetcher: &Fetcher,
    poisoned: &Poisoned,
    info: &RepoInfo,
    file: &HubFile,
    (start, end): (u64, u64),
    token: Option<&str>,
) -> Result<Body, Arc<FetchError>> {
    let (tx, mut rx) = mpsc::channel::<Chunk>(BUFFERED);
    let store = fetcher.store.clone();
    let etag = file.etag().to_string();
    let kept = blocking(move || store.blob_for_etag(&etag))
        .await
        .map_err(|e| Arc::new(e.into()))?;
    let metrics = fetcher.metrics.clone();
    match kept {
        Some(hash) => {
            let path = {
                let store = fetcher.store.clone();
                blocking(move || store.data_path(hash))
                    .await
                    .map_err(|e| Arc::new(e.into()))?
            };
            tokio::spawn(async move {
                if let Err(e) = send_file(&path, start, end, &tx, &metrics).await {
                    let _ = tx.send(Err(e)).await;
                }
            });
        }
        None => {
            let state = fetcher.fetch_file(info, file, token);
            let follower = Follower {
                state,
                size: file.size,
                etag: file.etag().to_string(),
                poisoned: poisoned.clone(),
                metrics,
                fetcher: fetcher.clone(),
            };
            tokio::spawn(follower.run(start, end, tx));
        }
    }
    // The status line waits for the first bytes (briefly), so that a download failing at once
    // is answered with an error status instead of a broken body.
    let first = tokio::time::timeout(Duration::from_secs(8), rx.recv()).await;
    let stream = ReceiverStream::new(rx);
    match first {
        Ok(Some(Err(e))) => Err(Arc::new(FetchError::Materialize {
            path: file.path.clone().into(),
            source: e,
        })),
        Ok(Some(Ok(bytes))) => {
            let head = tokio_stream::once(Ok::<_, io::Error>(bytes));
            Ok(Body::from_stream(tokio_stream::StreamExt::chain(
                head, stream,
            )))
        }
        Ok(None) => Ok(Body::empty()),
        Err(_) => Ok(Body::from_stream(stream)),
    }
}

/// Sends bytes `pos..end` of a complete file.
async fn send_file(
    path: &std::path::Path,
    mut pos: u64,
    end: u64,
    tx: &mpsc::Sender<Chunk>,
    metrics: &Metrics,
) -> io::Result<()> {
    let mut f = tokio::fs::File::open(path).await?;
    f.seek(io::SeekFrom::Start(pos)).await?;
    while pos < end {
        let mut buf = vec![0u8; CHUNK.min(end - pos) as usize];
        f.read_exact(&mut buf).await?;
        pos += buf.len() as u64;
        Metrics::add(&metrics.bytes_served_hf_endpoint, buf.len() as u64);
        if tx.send(Ok(Bytes::from(buf))).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Streams a file while the node's shared download of it runs.
struct Follower {
    state: watch::Receiver<FileState>,
    size: u64,
    etag: String,
    poisoned: Poisoned,
    metrics: Arc<Metrics>,
    fetcher: Fetcher,
}

impl Follower {
    async fn run(mut self, start: u64, end: u64, tx: mpsc::Sender<Chunk>) {
        if let Err(e) = self.run_impl(start, end, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    }

    async fn run_impl(
        &mut self,
        mut pos: u64,
        end: u64,
        tx: &mpsc::Sender<Chunk>,
    ) -> io::Result<()> {
        // The pieces we passed on, and their generation then.
        let mut passed: Option<(Arc<PieceFile>, usize)> = None;
        while pos < end {
            let state = self.state.borrow_and_update().clone();
            if let Some((pieces, gen)) = &passed {
                if *gen != pieces.generation() {
                    // Bytes we sent were dropped as bad: never let this response complete.
                    self.poisoned.poison(&self.etag);
                    return Err(io::Error::other(
                        "the file failed its check after bytes were sent",
                    ));
                }
            }
            let read = match state {
                FileState::Done { hash, .. } => {
                    let store = self.fetcher.store.clone();
                    let path = blocking(move || store.data_path(hash))
                        .await
                        .map_err(io::Error::other)?;
                    return send_file(&path, pos, end, tx, &self.metrics).await;
                }
                FileState::Failed(e) => return Err(io::Error::other(e.to_string())),
                FileState::Starting => None,
                FileState::FromPeers(partial) => {
                    let len = CHUNK.min(end - pos);
                    let mut buf = vec![0u8; len as usize];
                    let read = tokio::task::spawn_blocking(move || {
                        partial
                            .read_verified(&mut buf, pos)
                            .map(|ok| ok.then_some(buf))
                    })
                    .await
                    .expect("read task panicked")?;
                    read
                }
                FileState::FromOrigin(pieces) => {
                    let piece = (pos / PIECE_BYTES) as usize;
                    let (p_start, p_len) = piece_bounds(self.size, piece);
                    let piece_end = (p_start + p_len).min(end);
                    passed.get_or_insert_with(|| (pieces.clone(), pieces.generation()));
                    // The file's last piece waits for the whole-file check (the Done state).
                    if p_start + p_len == self.size {
                        self.wait(None).await?;
                        continue;
                    }
                    if !pieces.has(piece) {
                        pieces.mark_urgent(piece);
                        None
                    } else {
                        let mut buf = vec![0u8; (piece_end - pos) as usize];
                        let read = tokio::task::spawn_blocking(move || {
                            pieces.read_at(&mut buf, pos).map(|()| buf)
                        })
                        .await
                        .expect("read task panicked")?;
                        Some(read)
                    }
                }
            };
            match read {
                Some(buf) => {
                    pos += buf.len() as u64;
                    Metrics::add(&self.metrics.bytes_served_hf_endpoint, buf.len() as u64);
                    if tx.send(Ok(Bytes::from(buf))).await.is_err() {
                        return Ok(());
                    }
                }
                None => self.wait(Some(pos)).await?,
            }
        }
        Ok(())
    }

    /// Waits for the download to move: a new state, or (with `pos`) the bytes at `pos`.
    async fn wait(&mut self, pos: Option<u64>) -> io::Result<()> {
        let state = self.state.borrow().clone();
        let progress = async {
            match (state, pos) {
                (FileState::FromPeers(partial), Some(_)) => {
                    let mut changes = partial.subscribe();
                    let _ = changes.changed().await;
                }
                (FileState::FromOrigin(pieces), Some(pos)) => {
                    let piece = (pos / PIECE_BYTES) as usize;
                    pieces.wait_piece(piece, STALL).await;
                }
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = self.state.changed() => {
                changed.map_err(|_| io::Error::other("the download ended without a result"))
            }
            _ = progress => Ok(()),
            _ = tokio::time::sleep(STALL) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the download made no progress",
            )),
        }
    }
}
