//! The block scheduler's decisions, with no I/O: a state machine in the style of quinn-proto.
//!
//! The [driver](super::driver) feeds it events — a peer joined or left, a peer's subscription
//! frame (what it holds and fetches), a block request finished, a tick with the peers'
//! received-byte counters — and drains [`Action`]s from [`Policy::poll_action`]: requests to
//! start or cancel, subscriptions to open or drop, and the chunks to advertise as pending.
//! Time comes in as `now` on every call, so the tests drive it without sockets or sleeps.
//!
//! Of each peer it asks, in this order ([`Ask`]):
//! - **blocks it holds**, rarest first (ties broken by a per-fetch random key for every run of
//!   [`TIE_RUN`] blocks, so different nodes spread over different runs), keeping about [`PIPELINE_SECS`] of the peer's
//!   measured rate requested ahead;
//! - when it holds none we lack, **blocks it is fetching** (live): it passes each 16 KiB chunk
//!   group on as soon as it has verified it;
//! - **duplicates** of blocks in flight elsewhere: in the endgame (nothing left unassigned, at
//!   most two requests per block, the first to finish wins) and for blocks in flight for
//!   [`SLOW_BLOCK`].
//!
//! **A seed sends each block once**: a seed is asked only for blocks no other peer holds or is
//! fetching, and the downloaders split those by rendezvous hash over their download ids
//! ([`seed_order`]). A node takes its own share first, then the other owners' blocks, nearest
//! stand-in first, but leaves each owner its last block, so the seed stays busy to the end,
//! nobody waits on a slow owner, and two nodes don't ask the seed for the same block. When
//! the blocks only seeds hold stop getting fewer for [`STAND_IN_WAIT`] (an owner may not reach
//! the seed), anyone takes an owner's last block too.
//!
//! **Bad peers**: one whose bytes fail verification is banned for the rest of the fetch (by
//! address, so a new connection from it stays banned); one whose connection dies loses only
//! its in-flight blocks, which go back to the pool.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant},
};

use bao_tree::ChunkRanges;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod index;
mod pick;

use self::index::{Entry, Index, Indexed};

use super::layout::{covers, seed_order, Layout, BLOCK_BYTES};

/// Blocks that share a random tie-breaker, in order: among equally rare blocks a download
/// takes runs of this many in a random order of runs. Different nodes still spread over
/// different runs, and what a node holds stays a few long ranges instead of one per block:
/// with a random key per block, the range-set operations on a 16 GiB file's `have` set (one
/// range per block held) took 28% of the receiver's CPU.
const TIE_RUN: usize = 16;
/// Block requests in flight to a peer we know nothing about yet.
const MIN_REQUESTS_PER_PEER: usize = 2;
/// Requests in flight to a seed while other peers can serve too.
const SEED_DEPTH: usize = 1;
/// When the blocks only seeds hold stop getting fewer for this long (their owners may not
/// reach the seed), anyone may ask a seed for an owner's last block too.
pub(crate) const STAND_IN_WAIT: Duration = Duration::from_secs(2);
/// The most live requests (for blocks it is fetching itself) in flight to one peer.
const MAX_LIVE_PER_PEER: usize = 4;
/// The most block requests in flight to one peer.
const MAX_REQUESTS_PER_PEER: usize = 64;
/// Seconds of a peer's measured rate to keep requested ahead. More only queues blocks at a
/// busy peer that another peer could have served; less leaves the link idle between blocks.
const PIPELINE_SECS: f64 = 0.6;
/// A block in flight this long may be asked of a second peer.
pub(crate) const SLOW_BLOCK: Duration = Duration::from_secs(10);
/// A block in flight this long may be asked of a shared seed even while another peer holds
/// or fetches it: the last resort for a fetch that hangs without failing. Earlier, a second
/// request would make the seed (the swarm's bottleneck) send the block twice.
const STUCK_BLOCK: Duration = Duration::from_secs(30);
/// Give up when nothing is in flight and no peer offers a missing block for this long.
pub(crate) const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the driver ticks: rates, stalls, slow blocks and re-subscriptions.
pub(crate) const TICK: Duration = Duration::from_millis(250);
/// The first wait before re-subscribing to a peer whose subscription ended early; it doubles
/// up to [`RESUBSCRIBE_MAX`].
const RESUBSCRIBE_FIRST: Duration = Duration::from_millis(500);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(8);

/// One file to schedule.
#[derive(Clone, Debug)]
pub(crate) struct FileSpec {
    /// Its size in bytes.
    pub(crate) size: u64,
    /// The chunks already verified here.
    pub(crate) have: ChunkRanges,
    /// This node's download id for it (see [`seed_order`]); never 0.
    pub(crate) node: u64,
}

/// Names one block request, from [`Action::Start`] to [`Policy::handle_done`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RequestId(u64);

/// A block request to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BlockRequest {
    pub(crate) id: RequestId,
    pub(crate) peer: SocketAddr,
    pub(crate) file: usize,
    pub(crate) block: usize,
    /// The block's chunks (the driver asks only for those still missing).
    pub(crate) chunks: ChunkRanges,
    /// Asked of a peer that is itself fetching the block: it passes it on as it arrives.
    pub(crate) live: bool,
}

/// What the driver must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Stop reading a request (another peer delivered the block first).
    Cancel(RequestId),
    /// Advertise these chunks of `file` as ones we are fetching from a holder.
    Pending { file: usize, chunks: ChunkRanges },
    /// Start a block request.
    Start(BlockRequest),
    /// Subscribe to what `peer` holds of `file`.
    Subscribe { peer: SocketAddr, file: usize },
    /// Drop every subscription to `peer` (banned).
    Unsubscribe { peer: SocketAddr },
}

/// How a block request ended, as far as scheduling cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The request ran (the peer sent what it had of the block, maybe nothing).
    Ok,
    /// Nothing was asked: the block was complete here already (another fetch of the blob).
    AlreadyHave,
    /// The peer was passing the block on live and its own source failed: no fault of its.
    Unavailable,
    /// The peer sent bytes that failed verification: ban it.
    Corrupt,
    /// The peer broke the protocol: ban it.
    Protocol,
    /// The peer doesn't really hold the block (refused, or its copy changed): forget it does.
    NotHeld,
    /// The connection or stream failed; the peer set drops or replaces the connection.
    Failed,
}

/// The download can't go on: nothing is in flight and no usable peer offers a missing block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stalled {
    /// The first file still missing blocks.
    pub(crate) file: usize,
    /// Every peer we know is banned (or there is none).
    pub(crate) all_banned: bool,
}

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

/// The scheduler's state for one download of a set of files.
#[derive(Debug)]
pub(crate) struct Policy {
    files: Vec<FileState>,
    /// The largest block size among the files, for pipelining.
    block_bytes: u64,
    /// Peers by address; banned ones stay (so they stay banned if they reconnect).
    peers: BTreeMap<SocketAddr, PeerState>,
    /// The next request id, and the next peer generation.
    next_id: u64,
    next_generation: u64,
    actions: VecDeque<Action>,
    /// Files whose pending set changed since it was last advertised.
    pending_dirty: Vec<bool>,
    /// Since when nothing was in flight and nothing offered.
    stalled_since: Option<Instant>,
    /// Blocks only seeds hold and nobody fetches, at the last tick, and since when that number
    /// has not fallen.
    seed_only: usize,
    seed_only_stuck_since: Option<Instant>,
    /// Missing blocks in rarest-first and seed order, and blocks in flight ([`index`]).
    index: Index,
}

#[derive(Debug)]
struct FileState {
    layout: Layout,
    blocks: Vec<Block>,
    /// Blocks not yet [`BlockState::Have`].
    missing: usize,
    /// Our download id.
    me: u64,
    /// The download ids the seed's blocks are split among (ours included), sorted.
    split: Vec<u64>,
    /// Per block: the order in which we ask a seed for it (see [`seed_order`]).
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
    /// How it sits in the indexes while it is missing ([`Policy::reindex`]).
    indexed: Option<Indexed>,
}

#[derive(Debug)]
enum BlockState {
    Missing,
    InFlight {
        since: Instant,
        requests: Vec<Asked>,
    },
    Have,
}

/// One request in flight for a block.
#[derive(Debug)]
struct Asked {
    id: RequestId,
    peer: SocketAddr,
    /// The peer's generation when asked: a reconnected peer's counters are not this one's.
    generation: u64,
    live: bool,
}

/// A peer taking part in this download.
#[derive(Debug)]
struct PeerState {
    generation: u64,
    /// Whole blocks it holds, over all files, and how many there are in all.
    held: usize,
    total: usize,
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
    /// Missing blocks it holds, rarest first (empty for a seed: it holds them all).
    offers: BTreeSet<Entry>,
    /// Missing blocks it is fetching and doesn't hold, rarest first.
    fetching: BTreeSet<Entry>,
    /// Whether it was a seed at the last [`Policy::update_seeds`].
    was_seed: bool,
    /// Per file: when to subscribe again after the peer's subscription ended early, and the
    /// backoff that led there.
    resubscribe: Vec<Option<(Instant, Duration)>>,
}

impl PeerState {
    /// Whether it holds every block of every file.
    fn is_seed(&self) -> bool {
        self.held == self.total
    }

    /// Whether it holds or fetches block `b` of file `f`.
    fn holds_or_fetches(&self, f: usize, b: usize) -> bool {
        self.has_block[f][b] || self.pending_block[f][b]
    }
}

impl FileState {
    fn new(spec: &FileSpec, rng: &mut StdRng) -> Self {
        let layout = Layout::new(spec.size);
        let mut run_key = 0u32;
        let blocks: Vec<Block> = (0..layout.count())
            .map(|p| Block {
                state: if covers(&spec.have, &layout.range(p)) {
                    BlockState::Have
                } else {
                    BlockState::Missing
                },
                key: {
                    if p % TIE_RUN == 0 {
                        run_key = rng.random::<u32>() & !(TIE_RUN as u32 - 1);
                    }
                    run_key | (p % TIE_RUN) as u32
                },
                avail: 0,
                pending: 0,
                indexed: None,
            })
            .collect();
        let missing = blocks
            .iter()
            .filter(|p| !matches!(p.state, BlockState::Have))
            .count();
        let mut state = Self {
            layout,
            split: Vec::new(),
            seed_order: vec![(0, 0); blocks.len()],
            owner: vec![0; blocks.len()],
            me: spec.node,
            blocks,
            missing,
        };
        state.resplit(vec![spec.node]);
        state
    }

    /// Splits the blocks among the downloaders `ids` (sorted, ours included) if they changed;
    /// returns whether they did.
    ///
    /// Each block goes to the id with the highest rendezvous weight for it; the next highest is
    /// its first stand-in, and so on. We take blocks from a seed by our rank for them (our own
    /// first), and within a rank by the owner's weight: the owner goes from the heaviest down,
    /// stand-ins from the lightest up, and a stand-in leaves an owner its last block. So nobody
    /// waits on a slow owner, and two nodes rarely ask a seed for the same block.
    fn resplit(&mut self, ids: Vec<u64>) -> bool {
        if ids == self.split {
            return false;
        }
        for b in 0..self.blocks.len() {
            (self.seed_order[b], self.owner[b]) = seed_order(self.me, &ids, b);
        }
        self.split = ids;
        true
    }

    fn mark_have(&mut self, block: usize) {
        if !matches!(self.blocks[block].state, BlockState::Have) {
            self.blocks[block].state = BlockState::Have;
            self.missing -= 1;
        }
    }
}

impl Policy {
    /// A policy for `files`; `seed` seeds the rarest-first tie-breakers.
    pub(crate) fn new(files: &[FileSpec], seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let files: Vec<FileState> = files.iter().map(|f| FileState::new(f, &mut rng)).collect();
        let block_bytes = files.iter().map(|f| f.layout.block_bytes()).max();
        let index = Index {
            left: vec![HashMap::new(); files.len()],
            ..Index::default()
        };
        let mut policy = Self {
            block_bytes: block_bytes.unwrap_or(BLOCK_BYTES),
            pending_dirty: vec![false; files.len()],
            files,
            peers: BTreeMap::new(),
            next_id: 0,
            next_generation: 0,
            actions: VecDeque::new(),
            stalled_since: None,
            seed_only: 0,
            seed_only_stuck_since: None,
            index,
        };
        for f in 0..policy.files.len() {
            for b in 0..policy.files[f].blocks.len() {
                policy.reindex(f, b, None);
            }
        }
        policy
    }

    /// Whether every block of every file is here.
    pub(crate) fn is_done(&self) -> bool {
        self.files.iter().all(|f| f.missing == 0)
    }

    /// The next thing the driver must do.
    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        if let Some(action) = self.actions.pop_front() {
            return Some(action);
        }
        let file = self.pending_dirty.iter().position(|d| *d)?;
        self.pending_dirty[file] = false;
        Some(Action::Pending {
            file,
            chunks: self.pending_chunks(file),
        })
    }

    /// Every request still in flight, to cancel when the download ends.
    pub(crate) fn in_flight(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.index.in_flight.iter().flat_map(|&(_, f, b)| {
            match &self.files[f as usize].blocks[b as usize].state {
                BlockState::InFlight { requests, .. } => requests.iter().map(|r| r.id).collect(),
                _ => Vec::new(),
            }
        })
    }

    /// A connection to `peer` came up; `received` is its received-bytes counter now. Returns
    /// false if the peer is known (banned peers stay banned).
    pub(crate) fn handle_peer_joined(&mut self, peer: SocketAddr, received: u64) -> bool {
        if self.peers.contains_key(&peer) {
            return false;
        }
        let n = self.files.len();
        let blocks = |f: &FileState| vec![false; f.blocks.len()];
        self.next_generation += 1;
        let state = PeerState {
            generation: self.next_generation,
            held: 0,
            total: self.files.iter().map(|f| f.blocks.len()).sum(),
            have: vec![ChunkRanges::empty(); n],
            has_block: self.files.iter().map(blocks).collect(),
            pending: vec![ChunkRanges::empty(); n],
            pending_block: self.files.iter().map(blocks).collect(),
            node: vec![0; n],
            in_flight: 0,
            live: 0,
            depth: MIN_REQUESTS_PER_PEER,
            last_received: received,
            rate: 0.0,
            banned: false,
            offers: BTreeSet::new(),
            fetching: BTreeSet::new(),
            was_seed: false,
            resubscribe: vec![None; n],
        };
        self.peers.insert(peer, state);
        for file in 0..n {
            self.actions.push_back(Action::Subscribe { peer, file });
        }
        true
    }

    /// The connection to `peer` is gone: what it held no longer counts, and its in-flight
    /// requests come back as failures. A banned peer is kept (and stays banned).
    pub(crate) fn handle_peer_left(&mut self, peer: SocketAddr) {
        let banned = self.peers.get(&peer).is_some_and(|p| p.banned);
        self.forget_holdings(peer);
        if !banned {
            // A vanished peer is not a bad one: a new connection may bring it back.
            self.peers.remove(&peer);
        }
        self.update_seeds();
    }

    /// A subscription frame: `peer` verified `added` chunks of `file`, and is fetching
    /// `pending` (replacing what it fetched before) as download `node`.
    pub(crate) fn handle_have(
        &mut self,
        peer: SocketAddr,
        file: usize,
        added: &ChunkRanges,
        pending: ChunkRanges,
        node: u64,
    ) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if state.banned {
            return;
        }
        state.have[file] |= added.clone();
        let f = &mut self.files[file];
        let layout = f.layout;
        let mut changed = Vec::new();
        for p in layout.touching(added) {
            if !state.has_block[file][p] && covers(&state.have[file], &layout.range(p)) {
                state.has_block[file][p] = true;
                state.held += 1;
                f.blocks[p].avail += 1;
                changed.push(p);
            }
        }
        let now_pending: HashSet<usize> = layout.touching(&pending).collect();
        let touched = pending.clone() | &state.pending[file];
        for p in layout.touching(&touched) {
            let was = &mut state.pending_block[file][p];
            let is = now_pending.contains(&p);
            if is != *was {
                *was = is;
                let block = &mut f.blocks[p];
                if is {
                    block.pending += 1;
                } else {
                    block.pending -= 1;
                }
                changed.push(p);
            }
        }
        // A download id counts from the first frame that shows the peer fetching, until one
        // says it no longer downloads (it completed the file).
        let downloading = node != 0 && (!pending.is_empty() || state.node[file] == node);
        state.node[file] = if downloading { node } else { 0 };
        state.pending[file] = pending;
        self.stalled_since = None;
        for p in changed {
            self.reindex(file, p, Some(peer));
        }
        self.update_seeds();
    }

    /// `peer`'s subscription to `file` ended. Unless it holds the file whole, subscribe again
    /// after a backoff.
    pub(crate) fn handle_subscription_ended(
        &mut self,
        peer: SocketAddr,
        file: usize,
        now: Instant,
    ) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        let f = &self.files[file];
        let whole = covers(&state.have[file], &f.layout.all());
        if !whole && f.missing > 0 {
            let backoff = state.resubscribe[file]
                .map_or(RESUBSCRIBE_FIRST, |(_, b)| (b * 2).min(RESUBSCRIBE_MAX));
            state.resubscribe[file] = Some((now + backoff, backoff));
        }
    }

    /// A block request ended. `complete`: whether the block is now verified here (whoever
    /// delivered it).
    pub(crate) fn handle_done(&mut self, req: &BlockRequest, outcome: Outcome, complete: bool) {
        let (peer, file, block) = (req.peer, req.file, req.block);
        let generation = self.asked_generation(req);
        if let Some(state) = self.peers.get_mut(&peer) {
            if Some(state.generation) == generation {
                if req.live {
                    state.live -= 1;
                } else {
                    state.in_flight -= 1;
                }
            }
        }
        match outcome {
            Outcome::Ok | Outcome::AlreadyHave | Outcome::Failed => {}
            Outcome::Unavailable => self.forget_pending(peer, file, block),
            Outcome::Corrupt | Outcome::Protocol => self.ban(peer),
            Outcome::NotHeld => self.forget_held(peer, file, block),
        }
        let f = &mut self.files[file];
        if let BlockState::InFlight { requests, since } = &mut f.blocks[block].state {
            let since = *since;
            requests.retain(|r| r.id != req.id);
            let idle = requests.is_empty();
            if complete {
                // The first to finish wins; the others stop reading.
                let others = requests.iter().map(|r| Action::Cancel(r.id));
                self.actions.extend(others);
            } else if idle {
                f.blocks[block].state = BlockState::Missing;
            }
            if complete || idle {
                self.index
                    .in_flight
                    .remove(&(since, file as u32, block as u32));
            }
        }
        if complete {
            f.mark_have(block);
        }
        self.reindex(file, block, None);
        self.pending_dirty[file] = true;
    }

    /// Once every [`TICK`]: peers' rates (from their received-byte counters), due
    /// re-subscriptions, the seed-only count, and whether the download stalled.
    pub(crate) fn handle_tick(
        &mut self,
        now: Instant,
        received: impl Fn(SocketAddr) -> u64,
    ) -> Result<(), Stalled> {
        for (addr, state) in self.peers.iter_mut() {
            let total = received(*addr);
            let rate = total.saturating_sub(state.last_received) as f64 / TICK.as_secs_f64();
            state.last_received = total;
            state.rate = if state.rate == 0.0 {
                rate
            } else {
                0.7 * state.rate + 0.3 * rate
            };
            let ahead = (state.rate * PIPELINE_SECS / self.block_bytes as f64).ceil() as usize + 1;
            state.depth = ahead.clamp(MIN_REQUESTS_PER_PEER, MAX_REQUESTS_PER_PEER);
            if state.banned {
                continue;
            }
            for (file, at) in state.resubscribe.iter_mut().enumerate() {
                if let Some((t, backoff)) = *at {
                    if t <= now {
                        // Re-armed only by the next ended subscription.
                        *at = Some((now + Duration::from_secs(3600), backoff));
                        self.actions
                            .push_back(Action::Subscribe { peer: *addr, file });
                    }
                }
            }
        }
        let seed_only = self.index.seed_only.len();
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
        if now.saturating_duration_since(since) >= STALL_TIMEOUT {
            return Err(Stalled {
                file: self
                    .files
                    .iter()
                    .position(|f| f.missing > 0)
                    .expect("a stalled download misses a block"),
                all_banned: self.peers.values().all(|p| p.banned),
            });
        }
        Ok(())
    }

    /// The generation of the peer a request was made to, if it is still in flight.
    fn asked_generation(&self, req: &BlockRequest) -> Option<u64> {
        match &self.files[req.file].blocks[req.block].state {
            BlockState::InFlight { requests, .. } => requests
                .iter()
                .find(|r| r.id == req.id)
                .map(|r| r.generation),
            _ => None,
        }
    }

    /// The chunks of `file` we fetch from a peer that holds them: those we can pass on as they
    /// arrive. Blocks we are being passed live are left out, so a live relay never waits on
    /// another live relay (and two nodes never on each other).
    fn pending_chunks(&self, file: usize) -> ChunkRanges {
        let f = &self.files[file];
        let mut blocks: Vec<usize> = Vec::new();
        for &(_, fi, b) in &self.index.in_flight {
            if fi as usize != file {
                continue;
            }
            if let BlockState::InFlight { requests, .. } = &f.blocks[b as usize].state {
                if requests.iter().any(|r| !r.live) {
                    blocks.push(b as usize);
                }
            }
        }
        blocks.sort_unstable();
        let mut pending = ChunkRanges::empty();
        let mut run: Option<(usize, usize)> = None;
        for b in blocks {
            match &mut run {
                Some((_, end)) if *end == b => *end = b + 1,
                _ => {
                    if let Some((start, end)) = run.replace((b, b + 1)) {
                        pending |= f.layout.span(start, end);
                    }
                }
            }
        }
        if let Some((start, end)) = run {
            pending |= f.layout.span(start, end);
        }
        pending
    }

    /// Usable peers holding every file whole.
    fn seeds(&self) -> u16 {
        let seeds = self.peers.values().filter(|p| !p.banned && p.is_seed());
        seeds.count().try_into().unwrap_or(u16::MAX)
    }

    /// A live relay lost its own source: don't ask it again for this block until its next
    /// frame says it is still fetching it.
    fn forget_pending(&mut self, peer: SocketAddr, file: usize, block: usize) {
        if let Some(state) = self.peers.get_mut(&peer) {
            let range = self.files[file].layout.range(block);
            state.pending[file] = state.pending[file].clone() - range;
            if std::mem::take(&mut state.pending_block[file][block]) {
                self.files[file].blocks[block].pending -= 1;
                self.reindex(file, block, Some(peer));
            }
        }
    }

    /// It doesn't really hold this block: forget that it does.
    fn forget_held(&mut self, peer: SocketAddr, file: usize, block: usize) {
        if let Some(state) = self.peers.get_mut(&peer) {
            let range = self.files[file].layout.range(block);
            state.have[file] = state.have[file].clone() - range;
            if std::mem::take(&mut state.has_block[file][block]) {
                state.held -= 1;
                self.files[file].blocks[block].avail -= 1;
                self.reindex(file, block, Some(peer));
                self.update_seeds();
            }
        }
    }

    /// Bans `peer` for the rest of this download.
    fn ban(&mut self, peer: SocketAddr) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if state.banned {
            return;
        }
        tracing::warn!(%peer, "banning peer for the rest of this fetch");
        state.banned = true;
        self.actions.push_back(Action::Unsubscribe { peer });
        self.forget_holdings(peer);
    }

    /// What `peer` holds and fetches no longer counts.
    fn forget_holdings(&mut self, peer: SocketAddr) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        let mut changed = Vec::new();
        for (file, has) in state.has_block.iter_mut().enumerate() {
            for (p, held) in has.iter_mut().enumerate() {
                if std::mem::take(held) {
                    self.files[file].blocks[p].avail -= 1;
                    changed.push((file, p));
                }
            }
        }
        state.held = 0;
        for (file, pending) in state.pending_block.iter_mut().enumerate() {
            for (p, is) in pending.iter_mut().enumerate() {
                if std::mem::take(is) {
                    self.files[file].blocks[p].pending -= 1;
                    changed.push((file, p));
                }
            }
        }
        state.pending.fill(ChunkRanges::empty());
        state.node.fill(0);
        state.offers.clear();
        state.fetching.clear();
        for (file, p) in changed {
            self.reindex(file, p, Some(peer));
        }
        self.update_seeds();
    }
}

#[cfg(test)]
mod index_tests;
#[cfg(test)]
mod tests;
