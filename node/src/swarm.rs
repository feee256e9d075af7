//! The block scheduler: one file set from many peers at once.
//!
//! Files are requested in 256 KiB blocks (aligned to 16 KiB chunk groups; files over 8 GiB get
//! bigger blocks so that none has more than [`MAX_BLOCKS`]). Every peer streams
//! what it holds of each file ([`Request::Subscribe`]) as it verifies it, with the blocks it is
//! fetching right now from a peer that holds them (its *pending* blocks), so the scheduler
//! always knows who has what. Of each peer it asks, in this order ([`Ask`]):
//! - **blocks it holds**, rarest first (ties broken by a per-fetch random key so different
//!   nodes spread over different blocks), keeping about [`PIPELINE_SECS`] of the peer's
//!   measured rate requested ahead;
//! - when it holds none we lack, **blocks it is fetching** (live): it passes each 16 KiB chunk
//!   group on as soon as it has verified it, so a block crosses the swarm about as fast as it
//!   leaves the seed, instead of waiting to be whole at every hop (see
//!   `store::PartialBlob::await_verified`);
//! - **duplicates** of blocks in flight elsewhere: in the endgame (nothing left unassigned,
//!   at most two requests per block, the first to finish wins) and for blocks in flight for
//!   [`SLOW_BLOCK`].
//!
//! **A seed sends each block once**: a seed is asked only for blocks no other peer holds or is
//! fetching, and the downloaders split those by rendezvous hash over their download ids. A
//! node takes its own share first, then the other owners' blocks, nearest stand-in first, but
//! leaves each owner its last block, so the seed stays busy to the end, nobody waits on a slow
//! owner, and two nodes don't ask the seed for the same block (see [`FileState::resplit`]).
//!
//! **Bad peers**: one whose bytes fail verification is banned for the rest of the fetch; one
//! whose connection dies loses only its in-flight blocks, which go back to the pool.
//!
//! Blocks are smaller than the 1 MiB pieces of the design because blocks held whole are still
//! store-and-forward: every hop waits for the whole block (ARCHITECTURE.md has the
//! measurements).
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
    RelPath, CHUNK_BYTES,
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

/// Bytes in one block, the unit of requests, for files up to [`MAX_BLOCKS`] of them.
const BLOCK_BYTES: u64 = 256 << 10;
/// The most blocks in one file: bigger files get bigger blocks (a power of two times
/// [`BLOCK_BYTES`]), since choosing a block scans the file's blocks.
const MAX_BLOCKS: u64 = 32 << 10;
/// Block requests in flight to a peer we know nothing about yet.
const MIN_REQUESTS_PER_PEER: usize = 2;
/// Requests in flight to a seed while other peers can serve too.
const SEED_DEPTH: usize = 1;
/// When the blocks only seeds hold stop getting fewer for this long (their owners may not
/// reach the seed), anyone may ask a seed for an owner's last block too.
const STAND_IN_WAIT: Duration = Duration::from_secs(2);
/// The most live requests (for blocks it is fetching itself) in flight to one peer.
const MAX_LIVE_PER_PEER: usize = 4;
/// The most block requests in flight to one peer.
const MAX_REQUESTS_PER_PEER: usize = 64;
/// Seconds of a peer's measured rate to keep requested ahead. More only queues blocks at a
/// busy peer that another peer could have served; less leaves the link idle between blocks.
const PIPELINE_SECS: f64 = 0.6;
/// A block in flight this long may be asked of a second peer.
const SLOW_BLOCK: Duration = Duration::from_secs(10);
/// Give up when nothing is in flight and no peer offers a missing block for this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often stalls, slow blocks and re-subscriptions are checked.
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
    /// No peer could provide some block of this file; `last` is the last peer error seen.
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

/// Downloads every missing block of `jobs` from the peers in `conns` (which may change while
/// it runs). Returns the peers that delivered data.
pub async fn download(
    jobs: Vec<FileJob>,
    conns: watch::Receiver<Connections>,
    peers: Peers,
    metrics: Arc<Metrics>,
) -> Result<Vec<SocketAddr>, DownloadError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let files: Vec<FileState> = jobs.into_iter().map(FileState::new).collect();
    let block_bytes = files.iter().map(|f| f.layout.block * CHUNK_BYTES).max();
    let mut scheduler = Scheduler {
        block_bytes: block_bytes.unwrap_or(BLOCK_BYTES),
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
        seed_only: 0,
        seed_only_stuck_since: None,
    };
    let result = scheduler.run(rx, conns).await;
    scheduler.cancel_all();
    for (addr, state) in &scheduler.peers {
        let stats = state.conn.stats();
        debug!(
            %addr,
            rx_bytes = stats.udp_rx.bytes,
            rx_datagrams = stats.udp_rx.datagrams,
            tx_datagrams = stats.udp_tx.datagrams,
            ack_frames_tx = stats.frame_tx.acks,
            max_data_frames_tx = stats.frame_tx.max_data,
            rtt_ms = stats.path.rtt.as_secs_f64() * 1e3,
            "connection totals"
        );
    }
    result
}

#[derive(Debug)]
struct FileState {
    job: FileJob,
    layout: Layout,
    blocks: Vec<Block>,
    /// Blocks not yet [`BlockState::Have`].
    missing: usize,
    /// The download ids the seed's blocks are split among (ours included), sorted.
    split: Vec<u64>,
    /// Per block: the order in which we ask a seed for it (see [`FileState::resplit`]).
    seed_order: Vec<(u16, u64)>,
    /// Per block: the download id that owns it in the split.
    owner: Vec<u64>,
}

#[derive(Debug)]
struct Block {
    state: BlockState,
    /// Random tie-breaker for rarest-first.
    key: u32,
    /// Non-banned peers that hold it.
    avail: u16,
    /// Non-banned peers fetching it right now.
    pending: u16,
}

/// How a candidate block ranks (lower first): sources that hold or fetch it, then the order in
/// which we ask a seed for it or a random key.
type BlockScore = (u16, (u16, u64));

/// What kind of block to ask a peer for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ask {
    /// One it holds whole.
    Held,
    /// One it is fetching itself from a peer that holds it: it passes the block on as it
    /// arrives, so such requests follow its own download and are not pipelined.
    Live,
    /// One already in flight from another peer (endgame, or a slow peer).
    Duplicate,
}

/// One request for a block.
#[derive(Debug)]
struct BlockRequest {
    peer: SocketAddr,
    cancel: Arc<AtomicBool>,
    /// Asked of a peer that is itself fetching the block (see [`Scheduler::choose`]).
    live: bool,
}

#[derive(Debug)]
enum BlockState {
    Missing,
    InFlight {
        since: Instant,
        requests: Vec<BlockRequest>,
    },
    Have,
}

impl FileState {
    fn new(job: FileJob) -> Self {
        let layout = Layout::new(job.partial.size());
        let have = job.partial.have();
        let blocks: Vec<Block> = (0..layout.count())
            .map(|p| Block {
                state: if covers(&have, &layout.range(p)) {
                    BlockState::Have
                } else {
                    BlockState::Missing
                },
                key: rand::random(),
                avail: 0,
                pending: 0,
            })
            .collect();
        let missing = blocks
            .iter()
            .filter(|p| !matches!(p.state, BlockState::Have))
            .count();
        let me = job.partial.node();
        let mut state = Self {
            layout,
            split: Vec::new(),
            seed_order: vec![(0, 0); blocks.len()],
            owner: vec![0; blocks.len()],
            job,
            blocks,
            missing,
        };
        state.resplit(vec![me]);
        state
    }

    /// Splits the blocks among the downloaders `ids` (sorted, ours included) if they changed.
    ///
    /// Each block goes to the id with the highest rendezvous weight for it; the next highest is
    /// its first stand-in, and so on. We take blocks from a seed by our rank for them (our own
    /// first), and within a rank by the owner's weight: the owner goes from the heaviest down,
    /// stand-ins from the lightest up, and a stand-in leaves an owner its last block. So nobody
    /// waits on a slow owner, and two nodes rarely ask a seed for the same block.
    fn resplit(&mut self, ids: Vec<u64>) {
        if ids == self.split {
            return;
        }
        let me = self.job.partial.node();
        for b in 0..self.blocks.len() {
            (self.seed_order[b], self.owner[b]) = seed_order(me, &ids, b);
        }
        self.split = ids;
    }
}

impl PeerState {
    /// Whether it holds every block of every file.
    fn is_seed(&self) -> bool {
        self.held == self.total
    }
}

/// A peer taking part in this download.
struct PeerState {
    /// Whole blocks it holds, over all files, and how many there are in all.
    held: usize,
    total: usize,
    conn: quinn::Connection,
    /// Chunks it holds, per file.
    have: Vec<ChunkRanges>,
    /// Whole blocks it holds, per file.
    has_block: Vec<Vec<bool>>,
    /// Chunks it is fetching right now, and the blocks they touch, per file.
    pending: Vec<ChunkRanges>,
    pending_block: Vec<Vec<bool>>,
    /// Per file: its download id while it is downloading the file (shown by fetching
    /// something), else 0.
    node: Vec<u64>,
    in_flight: usize,
    /// Requests in flight for blocks it is fetching itself (they arrive as fast as it gets
    /// them, so they don't count against `depth`).
    live: usize,
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
        node: u64,
    },
    SubEnded {
        peer: SocketAddr,
        conn: usize,
        file: usize,
    },
    Done {
        peer: SocketAddr,
        file: usize,
        block: usize,
        /// Whether it was a live request (see [`Scheduler::choose`]).
        live: bool,
        result: Result<ChunkRanges, GetError>,
    },
}

struct Scheduler {
    files: Vec<FileState>,
    /// The largest block size among the files, for pipelining.
    block_bytes: u64,
    peers: HashMap<SocketAddr, PeerState>,
    events: mpsc::UnboundedSender<Event>,
    peer_set: Peers,
    metrics: Arc<Metrics>,
    /// Block request tasks.
    requests: JoinSet<()>,
    used: HashSet<SocketAddr>,
    last_error: Option<String>,
    /// Whether `last_error` is about bad data (kept over later, vaguer errors).
    last_error_telling: bool,
    stalled_since: Option<Instant>,
    /// Blocks only seeds hold and nobody fetches, at the last tick, and since when that number
    /// has not fallen.
    seed_only: usize,
    seed_only_stuck_since: Option<Instant>,
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
                node,
            } => {
                let Some(state) = self.peers.get_mut(&peer) else {
                    return Ok(());
                };
                if state.conn.stable_id() != conn || state.banned {
                    return Ok(());
                }
                state.have[file] |= added.clone();
                let layout = self.files[file].layout;
                for p in layout.touching(&added) {
                    if !state.has_block[file][p] && covers(&state.have[file], &layout.range(p)) {
                        state.has_block[file][p] = true;
                        state.held += 1;
                        self.files[file].blocks[p].avail += 1;
                    }
                }
                let now_pending: HashSet<usize> = layout.touching(&pending).collect();
                let touched = pending.clone() | &state.pending[file];
                for p in layout.touching(&touched) {
                    let was = &mut state.pending_block[file][p];
                    let is = now_pending.contains(&p);
                    if is != *was {
                        *was = is;
                        let block = &mut self.files[file].blocks[p];
                        if is {
                            block.pending += 1;
                        } else {
                            block.pending -= 1;
                        }
                    }
                }
                // A download id counts from the first frame that shows the peer fetching, until
                // one says it no longer downloads (it completed the file).
                let downloading = node != 0 && (!pending.is_empty() || state.node[file] == node);
                state.node[file] = if downloading { node } else { 0 };
                state.pending[file] = pending;
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
                block,
                live,
                result,
            } => self.on_done(peer, file, block, live, result)?,
        }
        Ok(())
    }

    fn on_done(
        &mut self,
        peer: SocketAddr,
        file: usize,
        block: usize,
        live: bool,
        result: Result<ChunkRanges, GetError>,
    ) -> Result<(), DownloadError> {
        if let Some(state) = self.peers.get_mut(&peer) {
            if live {
                state.live -= 1;
            } else {
                state.in_flight -= 1;
            }
        }
        debug!(%peer, file, block, ok = result.is_ok(), "done");
        match result {
            Ok(sent) => {
                if !sent.is_empty() {
                    self.used.insert(peer);
                }
            }
            Err(GetError::Store(e)) => return Err(e.into()),
            // A peer passing on what it fetches lost its own source: no fault of its, but don't
            // ask it again for this block until its next frame says it is still fetching it.
            Err(e @ GetError::Unavailable { .. }) => {
                debug!("{e}");
                if let Some(state) = self.peers.get_mut(&peer) {
                    let range = self.files[file].layout.range(block);
                    state.pending[file] = state.pending[file].clone() - range;
                    if std::mem::take(&mut state.pending_block[file][block]) {
                        self.files[file].blocks[block].pending -= 1;
                    }
                }
            }
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
                        // It doesn't really have this block: forget that it does.
                        if let Some(state) = self.peers.get_mut(&peer) {
                            let range = self.files[file].layout.range(block);
                            state.have[file] = state.have[file].clone() - range;
                            if std::mem::take(&mut state.has_block[file][block]) {
                                state.held -= 1;
                                self.files[file].blocks[block].avail -= 1;
                            }
                        }
                    }
                    // The connection failed: the peer set will drop or replace it.
                    _ => {}
                }
            }
        }
        let have = self.files[file].job.partial.have();
        let complete = covers(&have, &self.files[file].layout.range(block));
        let f = &mut self.files[file];
        let p = &mut f.blocks[block];
        if let BlockState::InFlight { requests, .. } = &mut p.state {
            requests.retain(|r| r.peer != peer);
            if complete {
                for r in requests.iter() {
                    r.cancel.store(true, Ordering::Relaxed);
                }
                p.state = BlockState::Have;
                f.missing -= 1;
            } else if requests.is_empty() {
                p.state = BlockState::Missing;
            }
        }
        self.publish_pending(file);
        Ok(())
    }

    /// Tells our own subscribers which blocks of `file` we are fetching now from a peer that
    /// holds them: those we can pass on as they arrive. Blocks we are being passed live are left
    /// out, so a live relay never waits on another live relay (and two nodes never on each
    /// other).
    fn publish_pending(&self, file: usize) {
        let f = &self.files[file];
        let mut pending = ChunkRanges::empty();
        for (p, block) in f.blocks.iter().enumerate() {
            if let BlockState::InFlight { requests, .. } = &block.state {
                if requests.iter().any(|r| !r.live) {
                    pending |= f.layout.range(p);
                }
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
        for (file, has) in state.has_block.iter_mut().enumerate() {
            for (p, held) in has.iter_mut().enumerate() {
                if std::mem::take(held) {
                    self.files[file].blocks[p].avail -= 1;
                }
            }
        }
        state.held = 0;
        for (file, pending) in state.pending_block.iter_mut().enumerate() {
            for (p, is) in pending.iter_mut().enumerate() {
                if std::mem::take(is) {
                    self.files[file].blocks[p].pending -= 1;
                }
            }
        }
        state.pending.fill(ChunkRanges::empty());
        state.node.fill(0);
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
                total: self.files.iter().map(|f| f.blocks.len()).sum(),
                conn: conn.clone(),
                have: self.files.iter().map(|_| ChunkRanges::empty()).collect(),
                has_block: self
                    .files
                    .iter()
                    .map(|f| vec![false; f.blocks.len()])
                    .collect(),
                pending: vec![ChunkRanges::empty(); self.files.len()],
                pending_block: self
                    .files
                    .iter()
                    .map(|f| vec![false; f.blocks.len()])
                    .collect(),
                node: vec![0; self.files.len()],
                in_flight: 0,
                live: 0,
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
            let ahead = (state.rate * PIPELINE_SECS / self.block_bytes as f64).ceil() as usize + 1;
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
        let seeds = self.seeds();
        let seed_only = self
            .files
            .iter()
            .flat_map(|f| &f.blocks)
            .filter(|b| {
                matches!(b.state, BlockState::Missing)
                    && b.avail > 0
                    && b.avail.saturating_sub(seeds) + b.pending == 0
            })
            .count();
        if seed_only == 0 || seed_only < self.seed_only {
            self.seed_only_stuck_since = None;
        } else {
            self.seed_only_stuck_since.get_or_insert(now);
        }
        self.seed_only = seed_only;
        let in_flight: usize = self.peers.values().map(|p| p.in_flight + p.live).sum();
        let offered = self.files.iter().any(|f| {
            f.blocks
                .iter()
                .any(|p| matches!(p.state, BlockState::Missing) && p.avail > 0)
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

    /// Usable peers holding every file whole.
    fn seeds(&self) -> u16 {
        let seeds = self.peers.values().filter(|p| !p.banned && p.is_seed());
        seeds.count().try_into().unwrap_or(u16::MAX)
    }

    /// Fills every peer's request slots.
    fn schedule(&mut self) {
        for (f, file) in self.files.iter_mut().enumerate() {
            let mut ids: Vec<u64> = self
                .peers
                .values()
                .filter(|p| !p.banned && p.node[f] != 0)
                .map(|p| p.node[f])
                .chain([file.job.partial.node()])
                .collect();
            ids.sort_unstable();
            ids.dedup();
            file.resplit(ids);
        }
        let endgame = self.files.iter().all(|f| {
            f.blocks
                .iter()
                .all(|p| !matches!(p.state, BlockState::Missing))
        });
        let addrs: Vec<SocketAddr> = self.peers.keys().copied().collect();
        let others = self.peers.len() > usize::from(self.seeds());
        for addr in addrs {
            // Blocks it holds first; only when it has none we lack, blocks it is fetching
            // (live), and only then duplicates.
            for ask in [Ask::Held, Ask::Live, Ask::Duplicate] {
                let mut found_none = false;
                loop {
                    let state = &self.peers[&addr];
                    // A seed shared with other peers gets few requests at a time from us: its
                    // blocks then arrive (and can be passed on) as early as possible, instead of
                    // all of them crawling in together.
                    let (busy, depth) = match (ask, others && state.is_seed()) {
                        (Ask::Live, _) => (state.live, MAX_LIVE_PER_PEER),
                        (_, true) => (state.in_flight, SEED_DEPTH),
                        (_, false) => (state.in_flight, state.depth),
                    };
                    if state.banned || busy >= depth {
                        break;
                    }
                    let Some((file, block)) = self.choose(addr, endgame, ask) else {
                        found_none = true;
                        break;
                    };
                    self.start(addr, file, block, ask == Ask::Live);
                }
                if !found_none {
                    break;
                }
            }
        }
    }

    /// The next block to ask peer `addr` for, of the kind `ask`.
    fn choose(&self, addr: SocketAddr, endgame: bool, ask: Ask) -> Option<(usize, usize)> {
        if ask == Ask::Duplicate {
            return self.choose_duplicate(addr, endgame);
        }
        let state = &self.peers[&addr];
        // A seed's upload is the swarm's scarcest resource: ask seeds only for blocks that no
        // other peer holds or is fetching, and let peers spread the rest among themselves.
        let seeds = self.seeds();
        let others = |block: &Block| block.avail.saturating_sub(seeds) + block.pending;
        let spare_seed = state.is_seed() && self.peers.len() > usize::from(seeds);
        let any_rank = self
            .seed_only_stuck_since
            .is_some_and(|t| t.elapsed() >= STAND_IN_WAIT);
        let mut best: Option<(BlockScore, usize, usize)> = None;
        for (f, file) in self.files.iter().enumerate() {
            if file.missing == 0 {
                continue;
            }
            // Per owner: the blocks only seeds hold that nobody fetches yet.
            let mut left: HashMap<u64, usize> = HashMap::new();
            if spare_seed && !any_rank {
                for (p, block) in file.blocks.iter().enumerate() {
                    if matches!(block.state, BlockState::Missing) && others(block) == 0 {
                        *left.entry(file.owner[p]).or_default() += 1;
                    }
                }
            }
            for (p, block) in file.blocks.iter().enumerate() {
                let offers = match ask {
                    Ask::Live => state.pending_block[f][p] && !state.has_block[f][p],
                    _ => state.has_block[f][p],
                };
                if matches!(block.state, BlockState::Missing) && offers {
                    let rank = file.seed_order[p].0;
                    // The owner takes its last block itself: a stand-in taking it too would
                    // make the seed send it twice.
                    let owners_last =
                        rank > 0 && !any_rank && left.get(&file.owner[p]).is_none_or(|&n| n <= 1);
                    if spare_seed && (others(block) > 0 || owners_last) {
                        continue;
                    }
                    // A block another peer is already fetching counts as one more source.
                    let order = if spare_seed {
                        file.seed_order[p]
                    } else {
                        (0, u64::from(block.key))
                    };
                    let score = (block.avail + block.pending, order);
                    if best.as_ref().is_none_or(|(b, _, _)| score < *b) {
                        best = Some((score, f, p));
                    }
                }
            }
        }
        best.map(|(_, f, p)| (f, p))
    }

    /// Endgame and slow blocks: the oldest in-flight block peer `addr` could serve too.
    fn choose_duplicate(&self, addr: SocketAddr, endgame: bool) -> Option<(usize, usize)> {
        let state = &self.peers[&addr];
        let seeds = self.seeds();
        let others = |block: &Block| block.avail.saturating_sub(seeds) + block.pending;
        let spare_seed = state.is_seed() && self.peers.len() > usize::from(seeds);
        let mut oldest: Option<(Instant, usize, usize)> = None;
        for (f, file) in self.files.iter().enumerate() {
            for (p, block) in file.blocks.iter().enumerate() {
                let BlockState::InFlight { since, requests } = &block.state else {
                    continue;
                };
                let eligible = state.has_block[f][p]
                    && !(spare_seed && others(block) > 0 && since.elapsed() < SLOW_BLOCK)
                    && requests.len() < 2
                    && requests.iter().all(|r| r.peer != addr)
                    && (endgame || since.elapsed() >= SLOW_BLOCK);
                if eligible && oldest.as_ref().is_none_or(|(t, _, _)| since < t) {
                    oldest = Some((*since, f, p));
                }
            }
        }
        oldest.map(|(_, f, p)| (f, p))
    }

    fn start(&mut self, addr: SocketAddr, file: usize, block: usize, live: bool) {
        let job = &self.files[file].job;
        let wanted = self.files[file].layout.range(block) & job.partial.missing();
        let cancel = Arc::new(AtomicBool::new(false));
        let f = &mut self.files[file];
        if wanted.is_empty() {
            // Completed meanwhile (e.g. by another fetch of the same blob).
            if !matches!(f.blocks[block].state, BlockState::Have) {
                f.blocks[block].state = BlockState::Have;
                f.missing -= 1;
            }
            return;
        }
        match &mut f.blocks[block].state {
            BlockState::InFlight { requests, .. } => requests.push(BlockRequest {
                peer: addr,
                cancel: cancel.clone(),
                live,
            }),
            state => {
                *state = BlockState::InFlight {
                    since: Instant::now(),
                    requests: vec![BlockRequest {
                        peer: addr,
                        cancel: cancel.clone(),
                        live,
                    }],
                }
            }
        }
        let peer = self.peers.get_mut(&addr).expect("scheduling a known peer");
        if live {
            peer.live += 1;
        } else {
            peer.in_flight += 1;
        }
        debug!(
            %addr,
            file,
            block,
            live,
            seed = peer.is_seed(),
            in_flight = peer.in_flight,
            "request"
        );
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
                block,
                live,
                result,
            });
        });
    }

    fn cancel_all(&mut self) {
        for file in &self.files {
            file.job.partial.set_pending(ChunkRanges::empty());
            for block in &file.blocks {
                if let BlockState::InFlight { requests, .. } = &block.state {
                    for r in requests {
                        r.cancel.store(true, Ordering::Relaxed);
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
                    node,
                } if s == size => {
                    let added = ranges::from_spans(&ranges, size);
                    let pending = ranges::from_spans(&pending, size);
                    if events
                        .send(Event::Have {
                            pending,
                            node,
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

/// Where block `block` comes in our requests to a seed when the downloaders `ids` (ours, `me`,
/// included) split the seed's blocks: our rank among them (0: we own it), then the owner's
/// weight, heaviest first for the owner and lightest first for stand-ins. Lower goes first.
/// Also returns the owner's id.
fn seed_order(me: u64, ids: &[u64], block: usize) -> ((u16, u64), u64) {
    let mine = rendezvous(me, block);
    let (mut rank, mut top, mut owner) = (0u16, mine, me);
    for &id in ids.iter().filter(|&&id| id != me) {
        let weight = rendezvous(id, block);
        if weight > mine {
            rank = rank.saturating_add(1);
        }
        if weight > top {
            (top, owner) = (weight, id);
        }
    }
    let key = if rank == 0 { u64::MAX - top } else { top };
    ((rank, key), owner)
}

/// The weight of node id `node` for piece or block `index` in a rendezvous split: the highest
/// weight wins, so every node computes the same owner and a node leaving moves only its share.
pub(crate) fn rendezvous(node: u64, index: usize) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&node.to_le_bytes());
    h.update(&(index as u64).to_le_bytes());
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

/// How a file is cut into blocks.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Chunks in the file, and in one block (the last may be shorter).
    chunks: u64,
    block: u64,
}

impl Layout {
    fn new(size: u64) -> Self {
        let chunks = ranges::chunk_count(size).0;
        let mut block = BLOCK_BYTES / CHUNK_BYTES;
        while chunks.div_ceil(block) > MAX_BLOCKS {
            block *= 2;
        }
        Self { chunks, block }
    }

    /// Blocks in the file (one for an empty file).
    fn count(&self) -> usize {
        self.chunks.div_ceil(self.block).max(1) as usize
    }

    /// The chunks of block `index`.
    fn range(&self, index: usize) -> ChunkRanges {
        let start = index as u64 * self.block;
        let end = (start + self.block).min(self.chunks);
        ChunkRanges::from(ChunkNum(start)..ChunkNum(end))
    }

    /// The blocks a range set touches.
    fn touching(&self, ranges: &ChunkRanges) -> impl Iterator<Item = usize> {
        let bounded = ranges.clone() & ChunkRanges::from(ChunkNum(0)..ChunkNum(self.chunks));
        let block = self.block;
        let spans: Vec<(u64, u64)> = bounded
            .boundaries()
            .chunks(2)
            .map(|pair| (pair[0].0 / block, (pair[1].0 - 1) / block))
            .collect();
        spans
            .into_iter()
            .flat_map(|(a, b)| (a as usize)..=(b as usize))
    }
}

fn covers(have: &ChunkRanges, range: &ChunkRanges) -> bool {
    (range.clone() - have).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_the_blob_exactly() {
        let size = 3 * BLOCK_BYTES + 5;
        let layout = Layout::new(size);
        assert_eq!(layout.count(), 4);
        assert_eq!(Layout::new(0).count(), 1);
        assert_eq!(Layout::new(BLOCK_BYTES).count(), 1);
        let mut all = ChunkRanges::empty();
        for p in 0..layout.count() {
            all |= layout.range(p);
        }
        assert_eq!(all, ranges::all_chunks(size));
        let block = BLOCK_BYTES / CHUNK_BYTES;
        let span = ChunkNum(block - 24)..ChunkNum(2 * block + 52);
        let touched: Vec<_> = layout.touching(&ChunkRanges::from(span)).collect();
        assert_eq!(touched, vec![0, 1, 2]);
    }

    #[test]
    fn big_files_get_bigger_blocks_on_the_chunk_group_grid() {
        let gib = 1u64 << 30;
        assert_eq!(Layout::new(8 * gib).count() as u64, MAX_BLOCKS);
        assert_eq!(Layout::new(8 * gib).block * CHUNK_BYTES, BLOCK_BYTES);
        assert_eq!(
            Layout::new(8 * gib + 1).block * CHUNK_BYTES,
            2 * BLOCK_BYTES
        );
        let big = Layout::new(50_000_000_000);
        assert!(big.count() as u64 <= MAX_BLOCKS);
        assert_eq!(big.block * CHUNK_BYTES, 2 << 20);
        // Blocks stay aligned to the 16-chunk groups the store verifies.
        assert_eq!(big.block % 16, 0);
        let last = big.range(big.count() - 1);
        assert_eq!(last.boundaries()[1].0, big.chunks);
    }

    #[test]
    fn seed_split_gives_each_block_one_owner_and_one_first_stand_in() {
        let ids = [11u64, 22, 33, 44, 55];
        let mut owned = [0usize; 5];
        for block in 0..1000 {
            let orders: Vec<(u16, u64)> = ids
                .iter()
                .map(|&me| seed_order(me, &ids, block).0)
                .collect();
            let owners: Vec<u64> = ids
                .iter()
                .map(|&me| seed_order(me, &ids, block).1)
                .collect();
            let ranks: Vec<u16> = orders.iter().map(|o| o.0).collect();
            for rank in 0..5u16 {
                assert_eq!(
                    ranks.iter().filter(|&&r| r == rank).count(),
                    1,
                    "block {block}"
                );
            }
            let owner = ranks.iter().position(|&r| r == 0).unwrap();
            owned[owner] += 1;
            // Every node names the same owner.
            assert!(owners.iter().all(|&o| o == ids[owner]), "block {block}");
            // Owner and first stand-in walk the owner's blocks from opposite ends.
            let stand_in = ranks.iter().position(|&r| r == 1).unwrap();
            assert_eq!(orders[owner].1, u64::MAX - orders[stand_in].1);
        }
        // Rendezvous spreads the blocks: each of 5 nodes owns about 200 of 1000.
        assert!(owned.iter().all(|&n| (140..260).contains(&n)), "{owned:?}");
        // Alone, a node owns everything, in an order of its own.
        let alone: Vec<u64> = (0..8).map(|b| seed_order(11, &[11], b).0 .1).collect();
        let other: Vec<u64> = (0..8).map(|b| seed_order(22, &[22], b).0 .1).collect();
        assert_ne!(alone, other);
    }
}
