//! Once per fleet: nodes that fetch the same HuggingFace file at the same time split the HF
//! work by pieces and swap the rest among themselves, so each byte crosses the internet once.
//!
//! Until the whole file is there its BLAKE3 root is unknown, so pieces travel raw, and only
//! between mesh members (every connection is authenticated). Each node advertises the pieces
//! it holds and is fetching ([`Request::HubSubscribe`]) with a random node id. A piece nobody
//! holds or fetches goes to HuggingFace from exactly one node: the one whose id wins a
//! rendezvous hash for that piece among the nodes assembling the file (a piece whose owner
//! vanished, or that stays unclaimed for [`CLAIM_WAIT`], is taken by anyone). When all pieces
//! are there the whole file is checked against HF's sha256 (or git blob id); on a mismatch the
//! pieces that came from peers are dropped, those peers are banned for this file, and the
//! pieces are fetched from HuggingFace instead.

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::SocketAddr,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use mesh_proto::{
    wire::{ChunkSpan, ChunkSpans, ErrorCode, Request, Response},
    PIECE_BYTES,
};
use tokio::{
    io::AsyncReadExt,
    sync::{mpsc, watch},
    task::JoinSet,
};
use tracing::{debug, warn};

use crate::{
    hub::{file_digest, Hub, HubError, HubFile},
    net::{read_frame, write_frame},
    peers::Connections,
    swarm::rendezvous,
};

/// Pieces in flight to one peer.
const PEER_REQUESTS: usize = 4;
/// Range requests in flight to HuggingFace.
const HUB_REQUESTS: usize = 4;
/// A piece still unclaimed this long after the download started may be taken by anyone.
const CLAIM_WAIT: Duration = Duration::from_secs(5);
/// Wait this long for other nodes to announce themselves before the first HF request.
const SETTLE: Duration = Duration::from_millis(500);
/// How soon a peer that had nothing (yet) is asked again.
const RESUBSCRIBE: Duration = Duration::from_millis(100);

/// A HuggingFace file being assembled, shared by the downloader and the provider.
#[derive(Debug)]
pub struct HubPartial {
    etag: String,
    size: u64,
    path: PathBuf,
    file: fs::File,
    /// This node's random id in rendezvous hashing.
    node: u64,
    /// From a gated or private repo: never served in open mode.
    restricted: bool,
    /// A std mutex: held for bitmap updates only.
    state: Mutex<HubState>,
    changed: watch::Sender<()>,
}

#[derive(Debug)]
struct HubState {
    have: Vec<bool>,
    pending: Vec<bool>,
    /// Which peer each piece came from (None: HuggingFace).
    from: Vec<Option<SocketAddr>>,
}

/// Live partials by etag. A std mutex: map lookups only.
#[derive(Debug, Default)]
pub struct HubPartials {
    map: Mutex<HashMap<String, std::sync::Weak<HubPartial>>>,
}

impl HubPartials {
    /// The partial for `etag`, opened (truncated) at `path` if no one holds it.
    pub fn open(
        &self,
        etag: &str,
        size: u64,
        path: &Path,
        node: u64,
        restricted: bool,
    ) -> std::io::Result<Arc<HubPartial>> {
        let mut map = self.map.lock().expect("hub partials lock poisoned");
        if let Some(live) = map.get(etag).and_then(std::sync::Weak::upgrade) {
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
        let partial = Arc::new(HubPartial {
            etag: etag.to_string(),
            size,
            path: path.to_path_buf(),
            file,
            node,
            restricted,
            state: Mutex::new(HubState {
                have: vec![false; pieces],
                pending: vec![false; pieces],
                from: vec![None; pieces],
            }),
            changed: watch::channel(()).0,
        });
        map.insert(etag.to_string(), Arc::downgrade(&partial));
        Ok(partial)
    }

    /// The partial for `etag`, if one is being assembled.
    pub fn get(&self, etag: &str) -> Option<Arc<HubPartial>> {
        let map = self.map.lock().expect("hub partials lock poisoned");
        map.get(etag).and_then(std::sync::Weak::upgrade)
    }
}

impl HubPartial {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().expect("hub partial lock poisoned")
    }

    /// Whether it comes from a gated or private repo.
    pub fn restricted(&self) -> bool {
        self.restricted
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

    fn store_piece(
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

    fn set_pending(&self, piece: usize, on: bool) {
        self.lock().pending[piece] = on;
        self.changed.send_replace(());
    }
}

/// Serves a subscription: the current frame, then one after every change.
pub async fn serve_subscription(partial: Arc<HubPartial>, mut send: quinn::SendStream) {
    let mut changes = partial.subscribe();
    loop {
        if write_frame(&mut send, &partial.frame()).await.is_err() {
            return;
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { let _ = send.finish(); return },
            _ = send.stopped() => return,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Serves one piece, or NotFound. `danger_corrupt` flips a byte (the hostile-peer test switch).
pub async fn serve_piece(
    partial: Option<Arc<HubPartial>>,
    piece: u32,
    danger_corrupt: bool,
    mut send: quinn::SendStream,
) {
    let mut bytes = partial.and_then(|p| p.read_piece(piece));
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

/// What a peer told us about the file.
#[derive(Default)]
struct PeerView {
    node: u64,
    have: HashSet<usize>,
    pending: HashSet<usize>,
    in_flight: usize,
    banned: bool,
}

enum Event {
    Have {
        peer: SocketAddr,
        node: u64,
        have: HashSet<usize>,
        pending: HashSet<usize>,
    },
    SubEnded {
        peer: SocketAddr,
    },
    Piece {
        piece: usize,
        from: Option<SocketAddr>,
        result: Result<Vec<u8>, String>,
    },
}

/// Assembles `file` into `partial` from peers and HuggingFace, then checks it. Returns the
/// bytes that came from HuggingFace.
pub async fn download(
    hub: &Hub,
    repo: &str,
    commit: &str,
    file: &HubFile,
    partial: Arc<HubPartial>,
    mut conns: watch::Receiver<Connections>,
    progress: Arc<AtomicU64>,
) -> Result<u64, HubError> {
    let pieces = piece_count(file.size);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut peers: HashMap<SocketAddr, PeerView> = HashMap::new();
    let mut subs: HashMap<SocketAddr, tokio::task::AbortHandle> = HashMap::new();
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    let mut hub_in_flight = 0usize;
    let mut in_flight: HashSet<usize> = HashSet::new();
    let mut from_hf = 0u64;
    let mut retry_subs = tokio::time::interval(RESUBSCRIBE);
    // Each node walks the pieces in its own random order, so nodes that don't see each other
    // yet rarely pick the same piece.
    let mut order: Vec<usize> = (0..pieces).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rand::random_range(0..=i));
    }
    let sync = |peers: &mut HashMap<SocketAddr, PeerView>,
                subs: &mut HashMap<SocketAddr, tokio::task::AbortHandle>,
                tasks: &mut JoinSet<()>,
                conns: &Connections| {
        for (addr, conn) in conns {
            if !subs.contains_key(addr) {
                let handle = tasks.spawn(subscribe(
                    conn.clone(),
                    *addr,
                    partial.etag.clone(),
                    file.size,
                    tx.clone(),
                ));
                subs.insert(*addr, handle);
                peers.entry(*addr).or_default();
            }
        }
        peers.retain(|addr, _| conns.contains_key(addr));
    };
    sync(
        &mut peers,
        &mut subs,
        &mut tasks,
        &conns.borrow_and_update().clone(),
    );
    loop {
        let (have, mut pending_here) = {
            let state = partial.lock();
            (state.have.clone(), state.pending.clone())
        };
        progress.store(
            have.iter()
                .enumerate()
                .filter(|(_, h)| **h)
                .map(|(p, _)| piece_bounds(file.size, p).1)
                .sum(),
            Ordering::Relaxed,
        );
        if have.iter().all(|h| *h) && in_flight.is_empty() {
            // The whole file: check it before anyone trusts it.
            let path = partial.path.clone();
            let hub_file = file.clone();
            let digest = tokio::task::spawn_blocking(move || file_digest(&path, &hub_file))
                .await
                .expect("hash task panicked")
                .map_err(|source| HubError::Io {
                    path: partial.path.clone(),
                    source,
                })?;
            if digest == file.etag() {
                return Ok(from_hf);
            }
            let culprits: HashSet<SocketAddr> =
                partial.lock().from.iter().flatten().copied().collect();
            if culprits.is_empty() {
                return Err(HubError::Mismatch {
                    path: file.path.clone(),
                    expected: file.etag().to_string(),
                    actual: digest,
                });
            }
            warn!(path = %file.path, ?culprits, "assembled file does not match HF's hash: dropping pieces from peers and banning them");
            let mut state = partial.lock();
            for p in 0..pieces {
                if state.from[p].is_some() {
                    state.have[p] = false;
                    state.from[p] = None;
                }
            }
            drop(state);
            for c in culprits {
                if let Some(view) = peers.get_mut(&c) {
                    view.banned = true;
                }
            }
            continue;
        }
        // Assign work.
        let mut ids: Vec<u64> = peers
            .values()
            .filter(|v| !v.banned && v.node != 0)
            .map(|v| v.node)
            .collect();
        ids.push(partial.node);
        let settle = started.elapsed() >= SETTLE;
        for &p in &order {
            if have[p] || in_flight.contains(&p) {
                continue;
            }
            // From a peer that has it, if one has a free slot.
            let source = peers
                .iter()
                .filter(|(_, v)| !v.banned && v.have.contains(&p) && v.in_flight < PEER_REQUESTS)
                .min_by_key(|(_, v)| v.in_flight)
                .map(|(a, _)| *a);
            if let Some(addr) = source {
                let conn = conns.borrow().get(&addr).cloned();
                let Some(conn) = conn else { continue };
                peers.get_mut(&addr).expect("listed").in_flight += 1;
                in_flight.insert(p);
                partial.set_pending(p, true);
                pending_here[p] = true;
                let (tx, etag) = (tx.clone(), partial.etag.clone());
                tasks.spawn(async move {
                    let result = get_piece(&conn, &etag, p).await;
                    let _ = tx.send(Event::Piece {
                        piece: p,
                        from: Some(addr),
                        result,
                    });
                });
                continue;
            }
            let held_elsewhere = peers
                .values()
                .any(|v| !v.banned && (v.have.contains(&p) || v.pending.contains(&p)));
            if held_elsewhere || !settle || hub_in_flight >= HUB_REQUESTS {
                continue;
            }
            let owner = ids
                .iter()
                .copied()
                .max_by_key(|id| rendezvous(*id, p))
                .expect("ids has us");
            if owner != partial.node && started.elapsed() < CLAIM_WAIT {
                continue;
            }
            hub_in_flight += 1;
            in_flight.insert(p);
            partial.set_pending(p, true);
            let (tx, hub, repo, commit, file) = (
                tx.clone(),
                hub.clone(),
                repo.to_string(),
                commit.to_string(),
                file.clone(),
            );
            tasks.spawn(async move {
                let (start, len) = piece_bounds(file.size, p);
                let result = hub
                    .download_range(&repo, &commit, &file, start, len)
                    .await
                    .map_err(|e| e.to_string());
                let _ = tx.send(Event::Piece {
                    piece: p,
                    from: None,
                    result,
                });
            });
        }
        tokio::select! {
            Some(event) = rx.recv() => match event {
                Event::Have { peer, node, have, pending } => {
                    if let Some(view) = peers.get_mut(&peer) {
                        view.node = node;
                        view.have = have;
                        view.pending = pending;
                    }
                }
                Event::SubEnded { peer } => {
                    subs.remove(&peer);
                }
                Event::Piece { piece, from, result } => {
                    in_flight.remove(&piece);
                    match from {
                        Some(addr) => if let Some(v) = peers.get_mut(&addr) { v.in_flight -= 1 },
                        None => hub_in_flight -= 1,
                    }
                    match result {
                        Ok(bytes) => {
                            partial.store_piece(piece, &bytes, from).map_err(|source| HubError::Io { path: partial.path.clone(), source })?;
                            if from.is_none() {
                                from_hf += bytes.len() as u64;
                            }
                        }
                        Err(e) => {
                            debug!(piece, ?from, "piece failed: {e}");
                            partial.set_pending(piece, false);
                            if from.is_none() {
                                return Err(hub.http_error(e));
                            }
                            if let Some(v) = from.and_then(|a| peers.get_mut(&a)) {
                                v.have.remove(&piece);
                            }
                        }
                    }
                }
            },
            changed = conns.changed() => {
                if changed.is_ok() {
                    let current = conns.borrow_and_update().clone();
                    sync(&mut peers, &mut subs, &mut tasks, &current);
                }
            }
            _ = retry_subs.tick() => {
                // Peers that had nothing (yet) are asked again: they may have started.
                let current = conns.borrow().clone();
                sync(&mut peers, &mut subs, &mut tasks, &current);
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

async fn subscribe(
    conn: quinn::Connection,
    peer: SocketAddr,
    etag: String,
    size: u64,
    tx: mpsc::UnboundedSender<Event>,
) {
    let result: Result<(), String> = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(&mut send, &Request::HubSubscribe { etag })
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        loop {
            match read_frame(&mut recv).await.map_err(|e| e.to_string())? {
                Response::HubHave {
                    node,
                    size: s,
                    have,
                    pending,
                } if s == size => {
                    let _ = tx.send(Event::Have {
                        peer,
                        node,
                        have: set(&have),
                        pending: set(&pending),
                    });
                }
                _ => return Ok(()),
            }
        }
    }
    .await;
    if let Err(e) = result {
        debug!(%peer, "hub subscription ended: {e}");
    }
    // The caller re-subscribes on its next retry tick.
    let _ = tx.send(Event::SubEnded { peer });
}

async fn get_piece(conn: &quinn::Connection, etag: &str, piece: usize) -> Result<Vec<u8>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(
        &mut send,
        &Request::HubGet {
            etag: etag.to_string(),
            piece: piece as u32,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let _ = send.finish();
    match read_frame(&mut recv).await.map_err(|e| e.to_string())? {
        Response::HubPiece { len } if len <= PIECE_BYTES => {
            let mut buf = Vec::with_capacity(len as usize);
            (&mut recv)
                .take(len)
                .read_to_end(&mut buf)
                .await
                .map_err(|e| e.to_string())?;
            if buf.len() as u64 != len {
                return Err("short piece".into());
            }
            Ok(buf)
        }
        other => Err(format!("no piece: {other:?}")),
    }
}

fn piece_count(size: u64) -> usize {
    size.div_ceil(PIECE_BYTES).max(1) as usize
}

fn piece_bounds(size: u64, piece: usize) -> (u64, u64) {
    let start = piece as u64 * PIECE_BYTES;
    (start, PIECE_BYTES.min(size.saturating_sub(start)))
}

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

fn set(spans: &ChunkSpans) -> HashSet<usize> {
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
        let s = spans(&bits);
        let got = set(&s);
        let want: HashSet<usize> = [0, 1, 3, 6].into_iter().collect();
        assert_eq!(got, want);
        assert_eq!(piece_bounds(PIECE_BYTES + 5, 1), (PIECE_BYTES, 5));
        assert_eq!(piece_count(0), 1);
    }

    #[test]
    fn rendezvous_spreads_pieces() {
        let ids = [1u64, 2, 3, 4];
        let mut counts = [0; 4];
        for p in 0..400 {
            let owner = (0..4).max_by_key(|&i| rendezvous(ids[i], p)).unwrap();
            counts[owner] += 1;
        }
        assert!(counts.iter().all(|&c| c > 60), "{counts:?}");
    }
}
