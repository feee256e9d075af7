//! The piece scheduler: one file set from many peers at once.
//!
//! Files are cut into 1 MiB pieces (aligned to 16 KiB chunk groups). Every peer streams what it
//! holds of each file ([`Request::Subscribe`]), including pieces it verifies while itself
//! downloading, so the scheduler always knows who has what. It keeps about
//! [`PIPELINE_SECS`] of each peer's measured rate requested ahead (2 to 16 pieces), choosing:
//! - **rarest first**: among the missing pieces a peer holds, the one the fewest peers hold,
//!   ties broken by a per-fetch random key so different nodes spread over different pieces;
//! - **endgame**: once nothing is left unassigned, an idle peer duplicates an in-flight piece
//!   (at most two requests per piece); the first to finish wins and the other is cancelled;
//! - **slow peers**: a piece in flight for [`SLOW_PIECE`] may be duplicated at any time;
//! - **bad peers**: one whose bytes fail verification is banned for the rest of the fetch; one
//!   whose connection dies loses only its in-flight pieces, which go back to the pool.
//!
//! The scheduler is an actor: a single task owns all state and reacts to events from the
//! subscription and request tasks it spawns, so no lock is needed.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bao_tree::{ChunkNum, ChunkRanges};
use mesh_proto::{
    wire::{Request, Response},
    RelPath, CHUNK_BYTES, PIECE_BYTES,
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};
use tracing::{debug, warn};

use crate::{
    metrics::Metrics,
    net::{read_frame, write_frame},
    peers::{Connections, Peers},
    ranges,
    store::{PartialBlob, StoreError},
    transfer::get::{get_ranges, GetError, GetHooks},
};

/// Chunks in one piece.
const PIECE_CHUNKS: u64 = PIECE_BYTES / CHUNK_BYTES;
/// Piece requests in flight to a peer we know nothing about yet.
const MIN_REQUESTS_PER_PEER: usize = 2;
/// Requests in flight to a seed while other peers can serve too.
const SEED_DEPTH: usize = 1;
/// The most piece requests in flight to one peer.
const MAX_REQUESTS_PER_PEER: usize = 16;
/// Seconds of a peer's measured rate to keep requested ahead. More only queues pieces at a
/// busy peer that another peer could have served; less leaves the link idle between pieces.
const PIPELINE_SECS: f64 = 0.6;
/// A piece in flight this long may be asked of a second peer.
const SLOW_PIECE: Duration = Duration::from_secs(10);
/// Give up when nothing is in flight and no peer offers a missing piece for this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often stalls, slow pieces and re-subscriptions are checked.
const TICK: Duration = Duration::from_millis(250);

/// One file to download.
#[derive(Debug)]
pub struct FileJob {
    /// Its path in the model, for errors.
    pub path: RelPath,
    /// The blob being written.
    pub partial: Arc<PartialBlob>,
    /// Verified bytes present, for progress bars.
    pub progress: Arc<AtomicU64>,
}

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DownloadError {
    /// No peer could provide some piece of this file; `last` is the last peer error seen.
    #[error("no peer could provide {path}: {last}")]
    NoSource {
        /// The file.
        path: RelPath,
        /// The last error.
        last: String,
    },
    /// Writing to the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Downloads every missing piece of `jobs` from the peers in `conns` (which may change while
/// it runs). Returns the peers that delivered data.
pub async fn download(
    jobs: Vec<FileJob>,
    conns: watch::Receiver<Connections>,
    peers: Peers,
    metrics: Arc<Metrics>,
) -> Result<Vec<SocketAddr>, DownloadError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let files = jobs.into_iter().map(FileState::new).collect();
    let mut scheduler = Scheduler {
        files,
        peers: HashMap::new(),
        events: tx,
        peer_set: peers,
        metrics,
        requests: JoinSet::new(),
        used: HashSet::new(),
        last_error: None,
        last_error_telling: false,
        stalled_since: None,
    };
    let result = scheduler.run(rx, conns).await;
    scheduler.cancel_all();
    result
}

#[derive(Debug)]
struct FileState {
    job: FileJob,
    pieces: Vec<Piece>,
    /// Pieces not yet [`PieceState::Have`].
    missing: usize,
}

#[derive(Debug)]
struct Piece {
    state: PieceState,
    /// Random tie-breaker for rarest-first.
    key: u32,
    /// Non-banned peers that hold it.
    avail: u16,
    /// Non-banned peers fetching it right now.
    pending: u16,
}

#[derive(Debug)]
enum PieceState {
    Missing,
    InFlight {
        since: Instant,
        requests: Vec<(SocketAddr, Arc<AtomicBool>)>,
    },
    Have,
}

impl FileState {
    fn new(job: FileJob) -> Self {
        let size = job.partial.size();
        let have = job.partial.have();
        let count = piece_count(size);
        let pieces: Vec<Piece> = (0..count)
            .map(|p| Piece {
                state: if covers(&have, &piece_range(size, p)) {
                    PieceState::Have
                } else {
                    PieceState::Missing
                },
                key: rand::random(),
                avail: 0,
                pending: 0,
            })
            .collect();
        let missing = pieces
            .iter()
            .filter(|p| !matches!(p.state, PieceState::Have))
            .count();
        Self {
            job,
            pieces,
            missing,
        }
    }
}

impl PeerState {
    /// Whether it holds every piece of every file.
    fn is_seed(&self) -> bool {
        self.held == self.total
    }
}

/// A peer taking part in this download.
struct PeerState {
    /// Whole pieces it holds, over all files, and how many there are in all.
    held: usize,
    total: usize,
    conn: quinn::Connection,
    /// Chunks it holds, per file.
    have: Vec<ChunkRanges>,
    /// Whole pieces it holds, per file.
    has_piece: Vec<Vec<bool>>,
    /// Pieces it is fetching right now, per file.
    pending_piece: Vec<Vec<bool>>,
    in_flight: usize,
    /// Requests it may have in flight, from its measured rate.
    depth: usize,
    /// Its received-bytes counter at the last tick, and the smoothed rate (bytes/s).
    last_received: u64,
    rate: f64,
    banned: bool,
    /// Per file: when to subscribe again after the peer's subscription ended early.
    resubscribe: Vec<Option<(Instant, Duration)>>,
    /// Subscription tasks; dropping the set aborts them.
    subs: JoinSet<()>,
}

enum Event {
    Have {
        peer: SocketAddr,
        conn: usize,
        file: usize,
        added: ChunkRanges,
        pending: ChunkRanges,
    },
    SubEnded {
        peer: SocketAddr,
        conn: usize,
        file: usize,
    },
    Done {
        peer: SocketAddr,
        file: usize,
        piece: usize,
        result: Result<ChunkRanges, GetError>,
    },
}

struct Scheduler {
    files: Vec<FileState>,
    peers: HashMap<SocketAddr, PeerState>,
    events: mpsc::UnboundedSender<Event>,
    peer_set: Peers,
    metrics: Arc<Metrics>,
    /// Piece request tasks.
    requests: JoinSet<()>,
    used: HashSet<SocketAddr>,
    last_error: Option<String>,
    /// Whether `last_error` is about bad data (kept over later, vaguer errors).
    last_error_telling: bool,
    stalled_since: Option<Instant>,
}

impl Scheduler {
    async fn run(
        &mut self,
        mut rx: mpsc::UnboundedReceiver<Event>,
        mut conns: watch::Receiver<Connections>,
    ) -> Result<Vec<SocketAddr>, DownloadError> {
        let mut tick = tokio::time::interval(TICK);
        self.sync_peers(&conns.borrow_and_update().clone());
        loop {
            if self.files.iter().all(|f| f.missing == 0) {
                return Ok(self.used.iter().copied().collect());
            }
            self.schedule();
            tokio::select! {
                Some(event) = rx.recv() => self.handle(event)?,
                changed = conns.changed() => {
                    if changed.is_ok() {
                        let current = conns.borrow_and_update().clone();
                        self.sync_peers(&current);
                    }
                }
                _ = tick.tick() => self.on_tick()?,
                Some(_) = self.requests.join_next(), if !self.requests.is_empty() => {}
            }
        }
    }

    fn handle(&mut self, event: Event) -> Result<(), DownloadError> {
        match event {
            Event::Have {
                peer,
                conn,
                file,
                added,
                pending,
            } => {
                let Some(state) = self.peers.get_mut(&peer) else {
                    return Ok(());
                };
                if state.conn.stable_id() != conn || state.banned {
                    return Ok(());
                }
                state.have[file] |= added.clone();
                let size = self.files[file].job.partial.size();
                for p in pieces_touching(&added, size) {
                    if !state.has_piece[file][p] && covers(&state.have[file], &piece_range(size, p))
                    {
                        state.has_piece[file][p] = true;
                        state.held += 1;
                        self.files[file].pieces[p].avail += 1;
                    }
                }
                let now_pending: HashSet<usize> = pieces_touching(&pending, size).collect();
                for (p, was) in state.pending_piece[file].iter_mut().enumerate() {
                    let is = now_pending.contains(&p);
                    if is != *was {
                        *was = is;
                        let piece = &mut self.files[file].pieces[p];
                        if is {
                            piece.pending += 1;
                        } else {
                            piece.pending -= 1;
                        }
                    }
                }
                self.stalled_since = None;
            }
            Event::SubEnded { peer, conn, file } => {
                let Some(state) = self.peers.get_mut(&peer) else {
                    return Ok(());
                };
                if state.conn.stable_id() != conn {
                    return Ok(());
                }
                let size = self.files[file].job.partial.size();
                let whole = covers(&state.have[file], &ranges::all_chunks(size));
                if !whole && self.files[file].missing > 0 {
                    let backoff = state.resubscribe[file]
                        .map_or(Duration::from_millis(500), |(_, b)| {
                            (b * 2).min(Duration::from_secs(8))
                        });
                    state.resubscribe[file] = Some((Instant::now() + backoff, backoff));
                }
            }
            Event::Done {
                peer,
                file,
                piece,
                result,
            } => self.on_done(peer, file, piece, result)?,
        }
        Ok(())
    }

    fn on_done(
        &mut self,
        peer: SocketAddr,
        file: usize,
        piece: usize,
        result: Result<ChunkRanges, GetError>,
    ) -> Result<(), DownloadError> {
        if let Some(state) = self.peers.get_mut(&peer) {
            state.in_flight -= 1;
        }
        let size = self.files[file].job.partial.size();
        match result {
            Ok(sent) => {
                if !sent.is_empty() {
                    self.used.insert(peer);
                }
            }
            Err(GetError::Store(e)) => return Err(e.into()),
            Err(e) => {
                warn!("{e}");
                // Keep the most telling error for the final report: bad data beats a refusal.
                let telling =
                    matches!(e, GetError::Corrupt { .. } | GetError::SourceCorrupt { .. });
                if telling || !self.last_error_telling {
                    self.last_error = Some(e.to_string());
                    self.last_error_telling = telling;
                }
                match e {
                    GetError::Corrupt { .. } => {
                        Metrics::add(&self.metrics.verify_failures, 1);
                        self.ban(peer);
                    }
                    GetError::Protocol { .. } => self.ban(peer),
                    GetError::SourceCorrupt { .. } | GetError::Refused { .. } => {
                        // It doesn't really have this piece: forget that it does.
                        if let Some(state) = self.peers.get_mut(&peer) {
                            let range = piece_range(size, piece);
                            state.have[file] = state.have[file].clone() - range;
                            if std::mem::take(&mut state.has_piece[file][piece]) {
                                state.held -= 1;
                                self.files[file].pieces[piece].avail -= 1;
                            }
                        }
                    }
                    // The connection failed: the peer set will drop or replace it.
                    _ => {}
                }
            }
        }
        let have = self.files[file].job.partial.have();
        let complete = covers(&have, &piece_range(size, piece));
        let f = &mut self.files[file];
        let p = &mut f.pieces[piece];
        if let PieceState::InFlight { requests, .. } = &mut p.state {
            requests.retain(|(who, _)| *who != peer);
            if complete {
                for (_, cancel) in requests.iter() {
                    cancel.store(true, Ordering::Relaxed);
                }
                p.state = PieceState::Have;
                f.missing -= 1;
            } else if requests.is_empty() {
                p.state = PieceState::Missing;
            }
        }
        self.publish_pending(file);
        Ok(())
    }

    /// Tells our own subscribers which pieces of `file` we are fetching now.
    fn publish_pending(&self, file: usize) {
        let f = &self.files[file];
        let size = f.job.partial.size();
        let mut pending = ChunkRanges::empty();
        for (p, piece) in f.pieces.iter().enumerate() {
            if matches!(piece.state, PieceState::InFlight { .. }) {
                pending |= piece_range(size, p);
            }
        }
        f.job.partial.set_pending(pending);
    }

    fn ban(&mut self, peer: SocketAddr) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if state.banned {
            return;
        }
        warn!(%peer, "banning peer for the rest of this fetch");
        state.banned = true;
        state.subs.abort_all();
        for (file, has) in state.has_piece.iter_mut().enumerate() {
            for (p, held) in has.iter_mut().enumerate() {
                if std::mem::take(held) {
                    self.files[file].pieces[p].avail -= 1;
                }
            }
        }
        state.held = 0;
        for (file, pending) in state.pending_piece.iter_mut().enumerate() {
            for (p, is) in pending.iter_mut().enumerate() {
                if std::mem::take(is) {
                    self.files[file].pieces[p].pending -= 1;
                }
            }
        }
    }

    fn sync_peers(&mut self, conns: &Connections) {
        let gone: Vec<SocketAddr> = self
            .peers
            .iter()
            .filter(|(addr, state)| {
                conns
                    .get(addr)
                    .is_none_or(|c| c.stable_id() != state.conn.stable_id())
            })
            .map(|(addr, _)| *addr)
            .collect();
        for addr in gone {
            let banned = self.peers.get(&addr).is_some_and(|p| p.banned);
            self.ban(addr);
            if !banned {
                // A vanished peer is not a bad one: a new connection may bring it back.
                let state = self.peers.remove(&addr).expect("listed above");
                debug!(%addr, in_flight = state.in_flight, "peer left the download");
            }
        }
        for (addr, conn) in conns {
            if self.peers.contains_key(addr) {
                continue;
            }
            let mut state = PeerState {
                held: 0,
                total: self.files.iter().map(|f| f.pieces.len()).sum(),
                conn: conn.clone(),
                have: self.files.iter().map(|_| ChunkRanges::empty()).collect(),
                has_piece: self
                    .files
                    .iter()
                    .map(|f| vec![false; f.pieces.len()])
                    .collect(),
                pending_piece: self
                    .files
                    .iter()
                    .map(|f| vec![false; f.pieces.len()])
                    .collect(),
                in_flight: 0,
                depth: MIN_REQUESTS_PER_PEER,
                last_received: self
                    .peer_set
                    .counters(*addr)
                    .received
                    .load(Ordering::Relaxed),
                rate: 0.0,
                banned: false,
                resubscribe: vec![None; self.files.len()],
                subs: JoinSet::new(),
            };
            for file in 0..self.files.len() {
                self.subscribe(*addr, &mut state, file);
            }
            self.peers.insert(*addr, state);
        }
    }

    fn subscribe(&self, peer: SocketAddr, state: &mut PeerState, file: usize) {
        let partial = &self.files[file].job.partial;
        state.subs.spawn(subscribe_task(
            state.conn.clone(),
            peer,
            file,
            partial.hash(),
            partial.size(),
            self.events.clone(),
        ));
    }

    fn on_tick(&mut self) -> Result<(), DownloadError> {
        let now = Instant::now();
        for (addr, state) in self.peers.iter_mut() {
            let received = self
                .peer_set
                .counters(*addr)
                .received
                .load(Ordering::Relaxed);
            let rate = (received - state.last_received) as f64 / TICK.as_secs_f64();
            state.last_received = received;
            state.rate = if state.rate == 0.0 {
                rate
            } else {
                0.7 * state.rate + 0.3 * rate
            };
            let ahead = (state.rate * PIPELINE_SECS / PIECE_BYTES as f64).ceil() as usize + 1;
            state.depth = ahead.clamp(MIN_REQUESTS_PER_PEER, MAX_REQUESTS_PER_PEER);
        }
        let mut due = Vec::new();
        for (addr, state) in &self.peers {
            for (file, at) in state.resubscribe.iter().enumerate() {
                if at.is_some_and(|(t, _)| t <= now) && !state.banned {
                    due.push((*addr, file));
                }
            }
        }
        for (addr, file) in due {
            let mut state = self.peers.remove(&addr).expect("listed above");
            if let Some((_, backoff)) = state.resubscribe[file] {
                state.resubscribe[file] = Some((now + Duration::from_secs(3600), backoff));
            }
            self.subscribe(addr, &mut state, file);
            self.peers.insert(addr, state);
        }
        let in_flight: usize = self.peers.values().map(|p| p.in_flight).sum();
        let offered = self.files.iter().any(|f| {
            f.pieces
                .iter()
                .any(|p| matches!(p.state, PieceState::Missing) && p.avail > 0)
        });
        if in_flight > 0 || offered {
            self.stalled_since = None;
            return Ok(());
        }
        let since = *self.stalled_since.get_or_insert(now);
        if since.elapsed() >= STALL_TIMEOUT {
            let file = self
                .files
                .iter()
                .find(|f| f.missing > 0)
                .expect("not all complete");
            return Err(DownloadError::NoSource {
                path: file.job.path.clone(),
                last: self.last_error.clone().unwrap_or_else(|| {
                    if self.peers.values().all(|p| p.banned) {
                        "no usable peer".into()
                    } else {
                        "no connected peer has it".into()
                    }
                }),
            });
        }
        Ok(())
    }

    /// Fills every peer's request slots.
    fn schedule(&mut self) {
        let endgame = self.files.iter().all(|f| {
            f.pieces
                .iter()
                .all(|p| !matches!(p.state, PieceState::Missing))
        });
        let addrs: Vec<SocketAddr> = self.peers.keys().copied().collect();
        let seeds = self
            .peers
            .values()
            .filter(|p| !p.banned && p.is_seed())
            .count();
        let others = self.peers.len() > seeds;
        for addr in addrs {
            loop {
                let state = &self.peers[&addr];
                // A seed shared with other peers gets one request at a time from us: its pieces
                // then arrive (and can be passed on) as early as possible, instead of all of
                // them crawling in together.
                let depth = if others && state.is_seed() {
                    SEED_DEPTH
                } else {
                    state.depth
                };
                if state.banned || state.in_flight >= depth {
                    break;
                }
                let Some((file, piece)) = self.choose(addr, endgame) else {
                    break;
                };
                self.start(addr, file, piece);
            }
        }
    }

    fn choose(&self, addr: SocketAddr, endgame: bool) -> Option<(usize, usize)> {
        let state = &self.peers[&addr];
        // A seed's upload is the swarm's scarcest resource: ask seeds only for pieces that no
        // other peer holds or is fetching, and let peers spread the rest among themselves.
        let seeds = self
            .peers
            .values()
            .filter(|p| !p.banned && p.is_seed())
            .count() as u16;
        let spare_seed = state.is_seed() && self.peers.len() > seeds as usize;
        let others = |piece: &Piece| piece.avail.saturating_sub(seeds) + piece.pending;
        let mut best: Option<((u16, u32), usize, usize)> = None;
        for (f, file) in self.files.iter().enumerate() {
            if file.missing == 0 {
                continue;
            }
            for (p, piece) in file.pieces.iter().enumerate() {
                if matches!(piece.state, PieceState::Missing) && state.has_piece[f][p] {
                    if spare_seed && others(piece) > 0 {
                        continue;
                    }
                    // A piece another peer is already fetching counts as one more source.
                    let score = (piece.avail + piece.pending, piece.key);
                    if best.as_ref().is_none_or(|(b, _, _)| score < *b) {
                        best = Some((score, f, p));
                    }
                }
            }
        }
        if let Some((_, f, p)) = best {
            return Some((f, p));
        }
        // Endgame and slow pieces: duplicate the oldest in-flight piece this peer could serve.
        let mut oldest: Option<(Instant, usize, usize)> = None;
        for (f, file) in self.files.iter().enumerate() {
            for (p, piece) in file.pieces.iter().enumerate() {
                let PieceState::InFlight { since, requests } = &piece.state else {
                    continue;
                };
                let eligible = state.has_piece[f][p]
                    && !(spare_seed && others(piece) > 0 && since.elapsed() < SLOW_PIECE)
                    && requests.len() < 2
                    && requests.iter().all(|(who, _)| *who != addr)
                    && (endgame || since.elapsed() >= SLOW_PIECE);
                if eligible && oldest.as_ref().is_none_or(|(t, _, _)| since < t) {
                    oldest = Some((*since, f, p));
                }
            }
        }
        oldest.map(|(_, f, p)| (f, p))
    }

    fn start(&mut self, addr: SocketAddr, file: usize, piece: usize) {
        let job = &self.files[file].job;
        let size = job.partial.size();
        let wanted = piece_range(size, piece) & job.partial.missing();
        let cancel = Arc::new(AtomicBool::new(false));
        let f = &mut self.files[file];
        if wanted.is_empty() {
            // Completed meanwhile (e.g. by another fetch of the same blob).
            if !matches!(f.pieces[piece].state, PieceState::Have) {
                f.pieces[piece].state = PieceState::Have;
                f.missing -= 1;
            }
            return;
        }
        match &mut f.pieces[piece].state {
            PieceState::InFlight { requests, .. } => requests.push((addr, cancel.clone())),
            state => {
                *state = PieceState::InFlight {
                    since: Instant::now(),
                    requests: vec![(addr, cancel.clone())],
                }
            }
        }
        let peer = self.peers.get_mut(&addr).expect("scheduling a known peer");
        peer.in_flight += 1;
        let conn = peer.conn.clone();
        let partial = f.job.partial.clone();
        let hooks = GetHooks {
            metrics: self.metrics.clone(),
            progress: f.job.progress.clone(),
            peer: self.peer_set.counters(addr),
            cancel,
        };
        let events = self.events.clone();
        self.publish_pending(file);
        self.requests.spawn(async move {
            let result = get_ranges(&conn, partial, &wanted, hooks).await;
            let _ = events.send(Event::Done {
                peer: addr,
                file,
                piece,
                result,
            });
        });
    }

    fn cancel_all(&mut self) {
        for file in &self.files {
            file.job.partial.set_pending(ChunkRanges::empty());
            for piece in &file.pieces {
                if let PieceState::InFlight { requests, .. } = &piece.state {
                    for (_, cancel) in requests {
                        cancel.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
        for state in self.peers.values_mut() {
            state.subs.abort_all();
        }
    }
}

async fn subscribe_task(
    conn: quinn::Connection,
    peer: SocketAddr,
    file: usize,
    hash: mesh_proto::Hash,
    size: u64,
    events: mpsc::UnboundedSender<Event>,
) {
    let id = conn.stable_id();
    let result: Result<(), String> = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(&mut send, &Request::Subscribe { hash })
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        loop {
            match read_frame(&mut recv).await.map_err(|e| e.to_string())? {
                Response::Have {
                    size: s,
                    ranges,
                    pending,
                } if s == size => {
                    let added = ranges::from_spans(&ranges, size);
                    let pending = ranges::from_spans(&pending, size);
                    if events
                        .send(Event::Have {
                            pending,
                            peer,
                            conn: id,
                            file,
                            added,
                        })
                        .is_err()
                    {
                        return Ok(());
                    }
                }
                _ => return Ok(()),
            }
        }
    }
    .await;
    if let Err(e) = result {
        debug!(%peer, "subscription ended: {e}");
    }
    let _ = events.send(Event::SubEnded {
        peer,
        conn: id,
        file,
    });
}

fn piece_count(size: u64) -> usize {
    ranges::chunk_count(size).0.div_ceil(PIECE_CHUNKS) as usize
}

fn piece_range(size: u64, piece: usize) -> ChunkRanges {
    let start = piece as u64 * PIECE_CHUNKS;
    let end = (start + PIECE_CHUNKS).min(ranges::chunk_count(size).0);
    ChunkRanges::from(ChunkNum(start)..ChunkNum(end))
}

fn covers(have: &ChunkRanges, range: &ChunkRanges) -> bool {
    (range.clone() - have).is_empty()
}

/// The pieces a range set touches.
fn pieces_touching(ranges: &ChunkRanges, size: u64) -> impl Iterator<Item = usize> {
    let bounded = ranges.clone() & ranges::all_chunks(size);
    let spans: Vec<(u64, u64)> = bounded
        .boundaries()
        .chunks(2)
        .map(|pair| (pair[0].0 / PIECE_CHUNKS, (pair[1].0 - 1) / PIECE_CHUNKS))
        .collect();
    spans
        .into_iter()
        .flat_map(|(a, b)| (a as usize)..=(b as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_blob_exactly() {
        let size = 3 * PIECE_BYTES + 5;
        assert_eq!(piece_count(size), 4);
        assert_eq!(piece_count(0), 1);
        assert_eq!(piece_count(PIECE_BYTES), 1);
        let mut all = ChunkRanges::empty();
        for p in 0..piece_count(size) {
            all |= piece_range(size, p);
        }
        assert_eq!(all, ranges::all_chunks(size));
        let touched: Vec<_> =
            pieces_touching(&ChunkRanges::from(ChunkNum(1000)..ChunkNum(2100)), size).collect();
        assert_eq!(touched, vec![0, 1, 2]);
    }
}
