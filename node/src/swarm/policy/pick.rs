//! Choosing blocks: which peer is asked for which block next, in the order the module docs of
//! [`super`] give (held blocks rarest first, then live ones, then duplicates), with the seed
//! split that keeps a shared seed sending each block once.

use std::{collections::HashMap, net::SocketAddr, time::Instant};

use super::{
    Action, Ask, Asked, Block, BlockRequest, BlockScore, BlockState, Policy, RequestId,
    MAX_LIVE_PER_PEER, SEED_DEPTH, SLOW_BLOCK, STAND_IN_WAIT,
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
            self.files[f].resplit(ids);
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

    /// The next block to ask peer `addr` for, of the kind `ask`.
    fn choose(
        &self,
        addr: SocketAddr,
        endgame: bool,
        ask: Ask,
        now: Instant,
    ) -> Option<(usize, usize)> {
        if ask == Ask::Duplicate {
            return self.choose_duplicate(addr, endgame, now);
        }
        let state = &self.peers[&addr];
        // A seed's upload is the swarm's scarcest resource: ask seeds only for blocks that no
        // other peer holds or is fetching, and let peers spread the rest among themselves.
        let seeds = self.seeds();
        let others = |block: &Block| block.avail.saturating_sub(seeds) + block.pending;
        let spare_seed = state.is_seed() && self.peers.len() > usize::from(seeds);
        let any_rank = self
            .seed_only_stuck_since
            .is_some_and(|t| now.saturating_duration_since(t) >= STAND_IN_WAIT);
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
                if !matches!(block.state, BlockState::Missing) || !offers {
                    continue;
                }
                let rank = file.seed_order[p].0;
                // The owner takes its last block itself: a stand-in taking it too would make
                // the seed send it twice.
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
        best.map(|(_, f, p)| (f, p))
    }

    /// Endgame and slow blocks: the oldest in-flight block peer `addr` could serve too.
    fn choose_duplicate(
        &self,
        addr: SocketAddr,
        endgame: bool,
        now: Instant,
    ) -> Option<(usize, usize)> {
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
                let slow = now.saturating_duration_since(*since) >= SLOW_BLOCK;
                let eligible = state.has_block[f][p]
                    && !(spare_seed && others(block) > 0 && !slow)
                    && requests.len() < 2
                    && requests.iter().all(|r| r.peer != addr)
                    && (endgame || slow);
                if eligible && oldest.as_ref().is_none_or(|(t, _, _)| since < t) {
                    oldest = Some((*since, f, p));
                }
            }
        }
        oldest.map(|(_, f, p)| (f, p))
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
                }
            }
        }
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
