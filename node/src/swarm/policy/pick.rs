//! Choosing blocks: which peer is asked for which block next, in the order the module docs of
//! [`super`] give (held blocks rarest first, then live ones, then duplicates), with the seed
//! split that keeps a shared seed sending each block once.

use std::{net::SocketAddr, time::Instant};

use super::{
    Action, Ask, Asked, Block, BlockRequest, BlockState, Entry, Policy, RequestId,
    MAX_LIVE_PER_PEER, SEED_DEPTH, SLOW_BLOCK, STAND_IN_WAIT, STUCK_BLOCK,
};

impl Policy {
    /// Fills every peer's request slots: queues [`Action::Start`]s.
    pub(crate) fn schedule(&mut self, now: Instant) {
        for f in 0..self.files.len() {
            let mut ids: Vec<u64> = self
                .peers
                .values()
                .filter(|p| !p.banned && p.node[f] != 0)
                .map(|p| p.node[f])
                .chain([self.files[f].me])
                .collect();
            ids.sort_unstable();
            ids.dedup();
            if self.files[f].resplit(ids) {
                self.rebuild_seed_only();
            }
        }
        let endgame = self.index.missing.is_empty();
        let addrs: Vec<SocketAddr> = self.peers.keys().copied().collect();
        let others = self.peers.len() > usize::from(self.seeds());
        for addr in addrs {
            // Blocks it holds first; only when it has none we lack, blocks it is fetching
            // (live), and only then duplicates.
            for ask in [Ask::Held, Ask::Live, Ask::Duplicate] {
                if !self.fill(addr, ask, others, endgame, now) {
                    break;
                }
            }
        }
    }

    /// Starts requests of kind `ask` to `addr` until its slots are full (returns false) or it
    /// offers nothing more of that kind (returns true: try the next kind).
    fn fill(
        &mut self,
        addr: SocketAddr,
        ask: Ask,
        others: bool,
        endgame: bool,
        now: Instant,
    ) -> bool {
        loop {
            let state = &self.peers[&addr];
            // A seed shared with other peers gets few requests at a time from us: its blocks
            // then arrive (and can be passed on) as early as possible, instead of all of them
            // crawling in together.
            let (busy, depth) = match (ask, others && state.is_seed()) {
                (Ask::Live, _) => (state.live, MAX_LIVE_PER_PEER),
                (_, true) => (state.in_flight, SEED_DEPTH),
                (_, false) => (state.in_flight, state.depth),
            };
            if state.banned || busy >= depth {
                return false;
            }
            let Some((file, block)) = self.choose(addr, endgame, ask, now) else {
                return true;
            };
            self.start(addr, file, block, ask == Ask::Live, now);
        }
    }

    /// The next block to ask peer `addr` for, of the kind `ask`: the first of its candidate
    /// set ([`super::index`]), so the choice costs the same whatever the file's size.
    pub(super) fn choose(
        &self,
        addr: SocketAddr,
        endgame: bool,
        ask: Ask,
        now: Instant,
    ) -> Option<(usize, usize)> {
        let state = &self.peers[&addr];
        let at = |e: &Entry| (e.2 as usize, e.3 as usize);
        match ask {
            Ask::Duplicate => return self.choose_duplicate(addr, endgame, now),
            // A seed holds every block: none is one it fetches.
            Ask::Live => return state.fetching.first().map(at),
            Ask::Held => {}
        }
        // A seed's upload is the swarm's scarcest resource: ask seeds only for blocks that no
        // other peer holds or is fetching, and let peers spread the rest among themselves.
        let spare_seed = state.is_seed() && self.peers.len() > usize::from(self.seeds());
        if !spare_seed {
            let candidates = if state.is_seed() {
                &self.index.missing
            } else {
                &state.offers
            };
            return candidates.first().map(at);
        }
        let any_rank = self
            .seed_only_stuck_since
            .is_some_and(|t| now.saturating_duration_since(t) >= STAND_IN_WAIT);
        self.index
            .seed_only
            .iter()
            .find(|&&(rank, _, f, b)| {
                // The owner takes its last block itself: a stand-in taking it too would make
                // the seed send it twice.
                let owner = self.files[f as usize].owner[b as usize];
                let owners_last = rank > 0
                    && !any_rank
                    && self.index.left[f as usize]
                        .get(&owner)
                        .is_none_or(|&n| n <= 1);
                !owners_last
            })
            .map(|&(_, _, f, b)| (f as usize, b as usize))
    }

    /// Endgame and slow blocks: the oldest in-flight block peer `addr` could serve too.
    pub(super) fn choose_duplicate(
        &self,
        addr: SocketAddr,
        endgame: bool,
        now: Instant,
    ) -> Option<(usize, usize)> {
        let state = &self.peers[&addr];
        let seeds = self.seeds();
        let others = |block: &Block| block.avail.saturating_sub(seeds) + block.pending;
        let spare_seed = state.is_seed() && self.peers.len() > usize::from(seeds);
        for &(since, f, p) in &self.index.in_flight {
            let age = now.saturating_duration_since(since);
            let slow = age >= SLOW_BLOCK;
            if !endgame && !slow {
                // Oldest first: the rest are not slow either.
                return None;
            }
            let (f, p) = (f as usize, p as usize);
            let block = &self.files[f].blocks[p];
            let BlockState::InFlight { requests, .. } = &block.state else {
                continue;
            };
            // A shared seed's upload is the swarm's bottleneck: a block someone else holds or
            // is fetching (and passes on live) is asked of it a second time only when stuck.
            let eligible = state.has_block[f][p]
                && !(spare_seed && others(block) > 0 && age < STUCK_BLOCK)
                && requests.len() < 2
                && requests.iter().all(|r| r.peer != addr);
            if eligible {
                return Some((f, p));
            }
        }
        None
    }

    fn start(&mut self, addr: SocketAddr, file: usize, block: usize, live: bool, now: Instant) {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let peer = self.peers.get_mut(&addr).expect("scheduling a known peer");
        if live {
            peer.live += 1;
        } else {
            peer.in_flight += 1;
        }
        let asked = Asked {
            id,
            peer: addr,
            generation: peer.generation,
            live,
        };
        let f = &mut self.files[file];
        match &mut f.blocks[block].state {
            BlockState::InFlight { requests, .. } => requests.push(asked),
            state => {
                *state = BlockState::InFlight {
                    since: now,
                    requests: vec![asked],
                };
                self.index
                    .in_flight
                    .insert((now, file as u32, block as u32));
                self.reindex(file, block, None);
            }
        }
        let f = &self.files[file];
        self.actions.push_back(Action::Start(BlockRequest {
            id,
            peer: addr,
            file,
            block,
            chunks: f.layout.range(block),
            live,
        }));
        self.pending_dirty[file] = true;
    }
}
