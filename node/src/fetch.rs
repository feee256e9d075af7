//! `mesh fetch`: resolve a model, move the missing pieces from peers, verify, materialize.
//!
//! 1. Resolve the name or id to a manifest: the local store first, then each peer. A manifest
//!    fetched by id must hash to that id.
//! 2. Check the target folder is writable and the disk has room for what is missing, before
//!    any byte moves.
//! 3. Split what is missing into segments of at most [`SEGMENT_BYTES`], aligned to chunk
//!    groups, and let [`WORKERS_PER_PEER`] workers per peer pull segments from one queue. A peer
//!    that sends corrupt bytes is dropped for the rest of the fetch and its segment goes back in
//!    the queue; so does one whose connection fails.
//! 4. Checkpoint every blob (which completes it), then hard-link each file into the target
//!    under a temporary name and rename it into place: a file appears only when whole.

use std::{
    collections::{HashSet, VecDeque},
    fs, io,
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{atomic::AtomicU64, atomic::Ordering, Arc, Mutex},
    time::Instant,
};

use bao_tree::{ChunkNum, ChunkRanges};
use mesh_proto::{
    wire::{ErrorCode, Request, Response},
    Manifest, ModelRef, RelPath,
};
use serde::Serialize;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::{
    metrics::Metrics,
    net::{read_frame, write_frame, ConnectError, Net},
    ranges,
    store::{blocking, BlobStatus, PartialBlob, Store, StoreError},
    transfer::get::{get_ranges, GetError},
};

/// The largest range one request asks for.
const SEGMENT_BYTES: u64 = 16 << 20;
/// Requests in flight to one peer at a time.
const WORKERS_PER_PEER: usize = 4;

/// What to fetch and where to put it.
#[derive(Clone, Debug)]
pub struct FetchRequest {
    /// The model, by name or id.
    pub model: ModelRef,
    /// Peers to ask.
    pub peers: Vec<SocketAddr>,
    /// The folder the files go to.
    pub to: PathBuf,
}

/// Live progress, one counter per file (bytes present, verified).
#[derive(Debug)]
pub struct FetchProgress {
    /// The files, in manifest order.
    pub files: Vec<FileProgress>,
}

/// One file's progress.
#[derive(Debug)]
pub struct FileProgress {
    /// Its path in the model.
    pub path: RelPath,
    /// Its size.
    pub size: u64,
    /// Verified bytes present.
    pub done: Arc<AtomicU64>,
}

/// The summary of a finished fetch (printed by `mesh fetch --json`).
#[derive(Clone, Debug, Serialize)]
pub struct FetchReport {
    /// The model id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Where the files are.
    pub to: PathBuf,
    /// Files in the model.
    pub files: usize,
    /// Bytes in the model.
    pub total_bytes: u64,
    /// Bytes that were already present and verified before this run (complete or resumed).
    pub bytes_already_local: u64,
    /// Verified bytes received from peers in this run.
    pub bytes_from_peers: u64,
    /// Peers that sent data.
    pub peers_used: Vec<SocketAddr>,
    /// Wall time of the run.
    pub seconds: f64,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// A peer could not be reached or refused us, and no other peer could help.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// No peer was given and the model is not complete locally.
    #[error("model {0} is not complete here and no peer was given (use --peer IP:PORT)")]
    NoPeers(ModelRef),
    /// Neither the store nor any peer knows the model.
    #[error("unknown model {0}: not in the local store and no peer has it")]
    UnknownModel(ModelRef),
    /// A peer sent a manifest that is invalid or does not match the requested id.
    #[error("peer {peer} sent a bad manifest: {why}")]
    BadManifest {
        /// The peer.
        peer: SocketAddr,
        /// What was wrong.
        why: String,
    },
    /// The target folder cannot be written.
    #[error("target folder {path} is not writable: {source}")]
    TargetNotWritable {
        /// The folder.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Not enough free disk space for what is missing.
    #[error("not enough free disk space in {path}: need {need} bytes, {available} available")]
    NoSpace {
        /// The folder checked.
        path: PathBuf,
        /// Bytes needed.
        need: u64,
        /// Bytes free.
        available: u64,
    },
    /// Some file could not be had from any peer; `last` is the last peer error seen for it.
    #[error("no peer could provide {path}: {last}")]
    NoSource {
        /// The file.
        path: RelPath,
        /// The last error.
        last: String,
    },
    /// A local store error.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the target files failed.
    #[error("{path}: {source}")]
    Materialize {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Fetches a model into `req.to`. `on_start` receives the progress counters once the model
/// is resolved.
pub async fn fetch(
    store: Store,
    net: Net,
    metrics: Arc<Metrics>,
    req: FetchRequest,
    on_start: impl FnOnce(&Manifest, Arc<FetchProgress>),
) -> Result<FetchReport, FetchError> {
    let started = Instant::now();
    let local = {
        let store = store.clone();
        let model = req.model.clone();
        blocking(move || store.manifest(&model)).await?
    };
    let complete_locally = match &local {
        Some(manifest) => missing_bytes(&store, manifest).await? == 0,
        None => false,
    };
    let mut peers = Vec::new();
    if !complete_locally {
        peers = connect_all(&net, &req.peers).await;
    }
    let manifest = match local {
        Some(manifest) => manifest,
        None => resolve_from_peers(&store, &req.model, &mut peers, &req.peers).await?,
    };
    check_target(&req.to)?;

    let partials = open_partials(&store, &manifest).await?;
    let progress = Arc::new(FetchProgress {
        files: manifest
            .files()
            .iter()
            .zip(&partials)
            .map(|(file, partial)| FileProgress {
                path: file.path.clone(),
                size: file.size,
                done: Arc::new(AtomicU64::new(match partial {
                    Some(p) => ranges::byte_len(&p.have(), file.size),
                    None => file.size,
                })),
            })
            .collect(),
    });
    let already: u64 = progress
        .files
        .iter()
        .map(|f| f.done.load(Ordering::Relaxed))
        .sum();
    let missing = manifest.total_size() - already;
    check_space(&store, &req.to, &manifest, missing)?;
    on_start(&manifest, progress.clone());

    let received_before = metrics.bytes_received.load(Ordering::Relaxed);
    let mut peers_used = Vec::new();
    if missing > 0 {
        let live: Vec<_> = peers.iter().filter_map(|p| p.conn.clone()).collect();
        if live.is_empty() {
            return Err(match peers.into_iter().find_map(|p| p.error) {
                Some(e) => e.into(),
                None => FetchError::NoPeers(req.model),
            });
        }
        peers_used = download(&manifest, &partials, &progress, live, metrics.clone()).await?;
        for partial in partials.iter().flatten() {
            let partial = partial.clone();
            blocking(move || partial.checkpoint()).await?;
        }
    }
    for peer in &peers {
        if let Some(conn) = &peer.conn {
            conn.close(0u32.into(), b"done");
        }
    }
    drop(partials);
    let to = req.to.clone();
    let store2 = store.clone();
    let manifest2 = manifest.clone();
    tokio::task::spawn_blocking(move || materialize(&store2, &manifest2, &to))
        .await
        .expect("materialize task panicked")?;
    let report = FetchReport {
        id: manifest.id().to_string(),
        name: manifest.name().to_string(),
        to: req.to,
        files: manifest.files().len(),
        total_bytes: manifest.total_size(),
        bytes_already_local: already,
        bytes_from_peers: metrics.bytes_received.load(Ordering::Relaxed) - received_before,
        peers_used,
        seconds: started.elapsed().as_secs_f64(),
    };
    info!(
        model = %report.name,
        bytes = report.bytes_from_peers,
        secs = report.seconds,
        "fetch complete"
    );
    Ok(report)
}

/// A peer as given on the command line: its connection, or why there is none.
struct PeerSlot {
    addr: SocketAddr,
    conn: Option<quinn::Connection>,
    error: Option<ConnectError>,
}

async fn connect_all(net: &Net, addrs: &[SocketAddr]) -> Vec<PeerSlot> {
    let mut set = JoinSet::new();
    for &addr in addrs {
        let net = net.clone();
        set.spawn(async move { (addr, net.connect(addr).await) });
    }
    let mut out = Vec::new();
    while let Some(joined) = set.join_next().await {
        let (addr, result) = joined.expect("connect task panicked");
        match result {
            Ok(conn) => out.push(PeerSlot {
                addr,
                conn: Some(conn),
                error: None,
            }),
            Err(e) => {
                warn!("{e}");
                out.push(PeerSlot {
                    addr,
                    conn: None,
                    error: Some(e),
                })
            }
        }
    }
    out.sort_by_key(|p| addrs.iter().position(|a| *a == p.addr));
    out
}

async fn resolve_from_peers(
    store: &Store,
    model: &ModelRef,
    peers: &mut [PeerSlot],
    asked: &[SocketAddr],
) -> Result<Manifest, FetchError> {
    if asked.is_empty() {
        return Err(FetchError::UnknownModel(model.clone()));
    }
    let mut first_error = None;
    for peer in peers.iter_mut() {
        let Some(conn) = &peer.conn else {
            first_error = first_error.or(peer.error.take().map(FetchError::from));
            continue;
        };
        match ask_manifest(conn, model).await {
            Ok(Some(manifest)) => {
                let store = store.clone();
                let m = manifest.clone();
                blocking(move || store.insert_manifest(&m)).await?;
                return Ok(manifest);
            }
            Ok(None) => {}
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    Err(first_error.unwrap_or_else(|| FetchError::UnknownModel(model.clone())))
}

/// Asks one peer for a manifest; `None` if it doesn't have it.
pub async fn ask_manifest(
    conn: &quinn::Connection,
    model: &ModelRef,
) -> Result<Option<Manifest>, FetchError> {
    let peer = conn.remote_address();
    let bad = |why: String| FetchError::BadManifest { peer, why };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| bad(e.to_string()))?;
    write_frame(&mut send, &Request::Manifest(model.clone()))
        .await
        .map_err(|e| bad(e.to_string()))?;
    let _ = send.finish();
    match read_frame(&mut recv)
        .await
        .map_err(|e| bad(e.to_string()))?
    {
        Response::Manifest(bytes) => {
            let manifest = Manifest::decode(&bytes).map_err(|e| bad(e.to_string()))?;
            match model {
                ModelRef::Id(id) if manifest.id() != *id => {
                    Err(bad(format!("asked for {id}, got {}", manifest.id())))
                }
                ModelRef::Name(name) if manifest.name() != name => Err(bad(format!(
                    "asked for {name:?}, got {:?}",
                    manifest.name()
                ))),
                _ => Ok(Some(manifest)),
            }
        }
        Response::Error(ErrorCode::NotFound) => Ok(None),
        other => Err(bad(format!("unexpected response {other:?}"))),
    }
}

async fn missing_bytes(store: &Store, manifest: &Manifest) -> Result<u64, FetchError> {
    let store = store.clone();
    let manifest = manifest.clone();
    Ok(blocking(move || {
        let mut missing = 0;
        for file in manifest.files() {
            missing += match store.status(file.hash, file.size)? {
                BlobStatus::Complete => 0,
                BlobStatus::Partial(have) => file.size - ranges::byte_len(&have, file.size),
                BlobStatus::Missing => file.size,
            };
        }
        Ok(missing)
    })
    .await?)
}

/// One writer per file that is not complete (`None` for complete ones).
async fn open_partials(
    store: &Store,
    manifest: &Manifest,
) -> Result<Vec<Option<Arc<PartialBlob>>>, FetchError> {
    let store = store.clone();
    let manifest = manifest.clone();
    Ok(blocking(move || {
        let mut out = Vec::new();
        for file in manifest.files() {
            out.push(match store.status(file.hash, file.size)? {
                BlobStatus::Complete => None,
                _ => Some(store.partial(file.hash, file.size)?),
            });
        }
        Ok(out)
    })
    .await?)
}

fn check_target(to: &Path) -> Result<(), FetchError> {
    let not_writable = |source| FetchError::TargetNotWritable {
        path: to.to_path_buf(),
        source,
    };
    fs::create_dir_all(to).map_err(not_writable)?;
    let probe = to.join(format!(".mesh-write-test-{}", std::process::id()));
    fs::write(&probe, b"").map_err(not_writable)?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

fn check_space(
    store: &Store,
    to: &Path,
    manifest: &Manifest,
    missing: u64,
) -> Result<(), FetchError> {
    let outboards = missing / 256;
    let mut checks = vec![(store.home().to_path_buf(), missing + outboards)];
    let dev = |p: &Path| fs::metadata(p).map(|m| m.dev()).ok();
    if dev(store.home()) != dev(to) {
        // Hard links can't cross file systems: the target needs a full copy.
        checks.push((to.to_path_buf(), manifest.total_size()));
    }
    for (path, need) in checks {
        let available = fs4::available_space(&path).map_err(|e| {
            FetchError::Store(StoreError::Io {
                path: path.clone(),
                source: e,
            })
        })?;
        if need > available {
            return Err(FetchError::NoSpace {
                path,
                need,
                available,
            });
        }
    }
    Ok(())
}

/// A range of one blob to fetch, and the peers that already failed to provide it.
struct Segment {
    file: usize,
    ranges: ChunkRanges,
    tried: HashSet<SocketAddr>,
}

/// State shared by the download workers. A std mutex: held for queue edits only.
struct Queue {
    segments: VecDeque<Segment>,
    /// Peers dropped for this fetch (corrupt data or a dead connection).
    banned: HashSet<SocketAddr>,
    /// The last error per file, for the final report.
    last_error: Vec<Option<String>>,
    /// Segments being fetched right now.
    in_flight: usize,
    used: HashSet<SocketAddr>,
}

async fn download(
    manifest: &Manifest,
    partials: &[Option<Arc<PartialBlob>>],
    progress: &Arc<FetchProgress>,
    conns: Vec<quinn::Connection>,
    metrics: Arc<Metrics>,
) -> Result<Vec<SocketAddr>, FetchError> {
    let mut segments = VecDeque::new();
    for (file, partial) in partials.iter().enumerate() {
        let Some(partial) = partial else { continue };
        for ranges in split(&partial.missing(), partial.size()) {
            segments.push_back(Segment {
                file,
                ranges,
                tried: HashSet::new(),
            });
        }
    }
    let queue = Arc::new(Mutex::new(Queue {
        segments,
        banned: HashSet::new(),
        last_error: vec![None; partials.len()],
        in_flight: 0,
        used: HashSet::new(),
    }));
    let notify = Arc::new(tokio::sync::Notify::new());
    let mut workers = JoinSet::new();
    for conn in &conns {
        for _ in 0..WORKERS_PER_PEER {
            workers.spawn(worker(
                conn.clone(),
                partials.to_vec(),
                queue.clone(),
                notify.clone(),
                progress.clone(),
                metrics.clone(),
            ));
        }
    }
    while let Some(joined) = workers.join_next().await {
        if let Err(e) = joined.expect("download worker panicked") {
            workers.abort_all();
            return Err(e);
        }
    }
    let queue = queue.lock().expect("queue lock poisoned");
    if let Some(segment) = queue.segments.front() {
        let path = manifest.files()[segment.file].path.clone();
        let last = queue.last_error[segment.file]
            .clone()
            .unwrap_or_else(|| "no connected peer has it".into());
        return Err(FetchError::NoSource { path, last });
    }
    Ok(queue.used.iter().copied().collect())
}

/// Pulls segments for one peer until the queue is empty, the peer is banned, or every
/// remaining segment was already tried with this peer.
async fn worker(
    conn: quinn::Connection,
    partials: Vec<Option<Arc<PartialBlob>>>,
    queue: Arc<Mutex<Queue>>,
    notify: Arc<tokio::sync::Notify>,
    progress: Arc<FetchProgress>,
    metrics: Arc<Metrics>,
) -> Result<(), FetchError> {
    let peer = conn.remote_address();
    loop {
        let segment = {
            let mut q = queue.lock().expect("queue lock poisoned");
            if q.banned.contains(&peer) {
                return Ok(());
            }
            match q.segments.iter().position(|s| !s.tried.contains(&peer)) {
                Some(i) => {
                    q.in_flight += 1;
                    q.segments.remove(i)
                }
                // Others may still fail and hand segments back: wait while work is in flight.
                None if q.in_flight > 0 => None,
                None => return Ok(()),
            }
        };
        let Some(mut segment) = segment else {
            notify.notified().await;
            continue;
        };
        let partial = partials[segment.file]
            .clone()
            .expect("segments exist only for partial files");
        let done = progress.files[segment.file].done.clone();
        let result = get_ranges(&conn, partial, &segment.ranges, metrics.clone(), done).await;
        let mut q = queue.lock().expect("queue lock poisoned");
        q.in_flight -= 1;
        match result {
            Ok(sent) => {
                q.used.insert(peer);
                let rest = segment.ranges.clone() - &sent;
                if !rest.is_empty() {
                    segment.ranges = rest;
                    segment.tried.insert(peer);
                    q.last_error[segment.file] = Some(format!("peer {peer} lacks part of it"));
                    q.segments.push_back(segment);
                }
            }
            Err(GetError::Store(e)) => return Err(e.into()),
            Err(e) => {
                warn!("{e}");
                q.last_error[segment.file] = Some(e.to_string());
                // Done ranges stay done: re-queue only what is still missing.
                let partial = partials[segment.file].as_ref().expect("partial file");
                segment.ranges = segment.ranges.clone() - partial.have();
                segment.tried.insert(peer);
                let fatal_for_peer = matches!(
                    e,
                    GetError::Corrupt { .. } | GetError::Stream { .. } | GetError::Protocol { .. }
                );
                if matches!(e, GetError::Corrupt { .. }) {
                    Metrics::add(&metrics.verify_failures, 1);
                }
                if !segment.ranges.is_empty() {
                    q.segments.push_front(segment);
                }
                if fatal_for_peer {
                    debug!(%peer, "dropping peer for this fetch");
                    q.banned.insert(peer);
                    drop(q);
                    notify.notify_waiters();
                    return Ok(());
                }
            }
        }
        drop(q);
        notify.notify_waiters();
    }
}

/// Splits missing chunks into request-sized pieces, each aligned to chunk groups.
fn split(missing: &ChunkRanges, size: u64) -> Vec<ChunkRanges> {
    let step = SEGMENT_BYTES / mesh_proto::CHUNK_BYTES;
    let end = ranges::chunk_count(size).0;
    let mut out = Vec::new();
    let mut start = 0;
    while start < end {
        let piece = ChunkRanges::from(ChunkNum(start)..ChunkNum((start + step).min(end)));
        let want = missing.clone() & piece;
        if !want.is_empty() {
            out.push(want);
        }
        start += step;
    }
    out
}

/// Links (or copies across file systems) each file into `to`, atomically.
fn materialize(store: &Store, manifest: &Manifest, to: &Path) -> Result<(), FetchError> {
    for file in manifest.files() {
        let dest = file.path.under(to);
        let err = |source| FetchError::Materialize {
            path: dest.clone(),
            source,
        };
        let parent = dest.parent().expect("a path under a folder has a parent");
        fs::create_dir_all(parent).map_err(err)?;
        let tmp = parent.join(format!(
            ".{}.mesh-tmp",
            dest.file_name()
                .expect("a file path has a name")
                .to_string_lossy()
        ));
        let _ = fs::remove_file(&tmp);
        if file.size == 0 {
            fs::File::create(&tmp).map_err(err)?;
        } else {
            let src = store.data_path(file.hash)?;
            let same = |a: &Path, b: &Path| match (fs::metadata(a), fs::metadata(b)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if same(&src, &dest) {
                continue;
            }
            if fs::hard_link(&src, &tmp).is_err() {
                fs::copy(&src, &tmp).map_err(err)?;
                fs::File::open(&tmp)
                    .and_then(|f| f.sync_all())
                    .map_err(err)?;
            }
        }
        fs::rename(&tmp, &dest).map_err(err)?;
    }
    Ok(())
}
