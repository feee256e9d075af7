//! The indexes that let [`Policy`] choose a block without scanning the file: every missing
//! block in rarest-first order, per peer the missing blocks it holds and the ones it fetches
//! (its candidate sets), the blocks only seeds hold in seed-split order, and the blocks in
//! flight, oldest first.
//!
//! A block is indexed while it is missing here (not in flight, not verified), under the score
//! it had when it was indexed (its sources: peers holding or fetching it). Every change to a
//! block's state or sources goes through [`Policy::reindex`], which moves it in the sets of
//! the peers that hold or fetch it, so an update costs `O(sources · log blocks)` and a choice
//! `O(log blocks)`, whatever the file's size. A seed keeps no set of its own: it holds every
//! block, so [`Index::missing`] is its candidate set.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    time::Instant,
};

use super::{BlockState, Policy};

/// A missing block in a rarest-first set: its sources, its random key, file and block.
pub(super) type Entry = (u16, u32, u32, u32);
/// A block only seeds hold, in the order we ask a seed for it: our rank, the owner's weight,
/// file and block (see [`crate::swarm::layout::seed_order`]).
pub(super) type SeedEntry = (u16, u64, u32, u32);

/// How a missing block is indexed: its sources, and whether only seeds hold it (and nobody
/// fetches it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Indexed {
    pub(super) sources: u16,
    pub(super) seed_only: bool,
}

/// The policy's global indexes (the per-peer ones live in each peer's state).
#[derive(Debug, Default)]
pub(super) struct Index {
    /// Every missing block, rarest first.
    pub(super) missing: BTreeSet<Entry>,
    /// Missing blocks only seeds hold and nobody fetches, in seed order.
    pub(super) seed_only: BTreeSet<SeedEntry>,
    /// Per file: how many of `seed_only` each owner (download id) owns.
    pub(super) left: Vec<HashMap<u64, usize>>,
    /// Blocks in flight, oldest first: the candidates for duplicates.
    pub(super) in_flight: BTreeSet<(Instant, u32, u32)>,
    /// The number of usable seeds the seed-only set was built for.
    pub(super) seeds: u16,
}

impl Policy {
    /// Puts block `b` of file `f` where its state and sources say, after a change. `changed`
    /// names a peer whose own holding or fetching of the block changed (so it may be in a set
    /// it no longer belongs to).
    pub(super) fn reindex(&mut self, f: usize, b: usize, changed: Option<SocketAddr>) {
        let seeds = self.index.seeds;
        let block = &self.files[f].blocks[b];
        let want = matches!(block.state, BlockState::Missing).then(|| Indexed {
            sources: block.avail + block.pending,
            seed_only: block.avail > 0 && block.avail <= seeds && block.pending == 0,
        });
        let had = block.indexed;
        if want == had && changed.is_none() {
            return;
        }
        let key = block.key;
        let at = |i: Indexed| (i.sources, key, f as u32, b as u32);
        if let Some(old) = had {
            let entry = at(old);
            self.index.missing.remove(&entry);
            for (addr, peer) in &mut self.peers {
                if Some(*addr) == changed || peer.holds_or_fetches(f, b) {
                    peer.offers.remove(&entry);
                    peer.fetching.remove(&entry);
                }
            }
            if old.seed_only {
                self.seed_only_remove(f, b);
            }
        }
        if let Some(new) = want {
            let entry = at(new);
            self.index.missing.insert(entry);
            for peer in self.peers.values_mut() {
                if peer.banned {
                    continue;
                }
                if peer.has_block[f][b] {
                    if !peer.is_seed() {
                        peer.offers.insert(entry);
                    }
                } else if peer.pending_block[f][b] {
                    peer.fetching.insert(entry);
                }
            }
            if new.seed_only {
                self.seed_only_insert(f, b);
            }
        }
        self.files[f].blocks[b].indexed = want;
    }

    fn seed_only_entry(&self, f: usize, b: usize) -> SeedEntry {
        let (rank, weight) = self.files[f].seed_order[b];
        (rank, weight, f as u32, b as u32)
    }

    fn seed_only_insert(&mut self, f: usize, b: usize) {
        let entry = self.seed_only_entry(f, b);
        self.index.seed_only.insert(entry);
        *self.index.left[f]
            .entry(self.files[f].owner[b])
            .or_default() += 1;
    }

    fn seed_only_remove(&mut self, f: usize, b: usize) {
        let entry = self.seed_only_entry(f, b);
        self.index.seed_only.remove(&entry);
        let owner = self.files[f].owner[b];
        if let Some(n) = self.index.left[f].get_mut(&owner) {
            *n -= 1;
            if *n == 0 {
                self.index.left[f].remove(&owner);
            }
        }
    }

    /// Rebuilds the seed-only set: the number of seeds changed, or the seed split did.
    pub(super) fn rebuild_seed_only(&mut self) {
        self.index.seed_only.clear();
        for left in &mut self.index.left {
            left.clear();
        }
        let seeds = self.index.seeds;
        for f in 0..self.files.len() {
            for b in 0..self.files[f].blocks.len() {
                let block = &mut self.files[f].blocks[b];
                let Some(indexed) = &mut block.indexed else {
                    continue;
                };
                indexed.seed_only = block.avail > 0 && block.avail <= seeds && block.pending == 0;
                if indexed.seed_only {
                    self.seed_only_insert(f, b);
                }
            }
        }
    }

    /// Follows a change in the number of usable seeds, and in which peers are seeds: a peer
    /// that became a seed drops its candidate set (it has them all), one that stopped being
    /// one gets it back.
    pub(super) fn update_seeds(&mut self) {
        let mut rebuilt = Vec::new();
        for (addr, peer) in &mut self.peers {
            match (peer.is_seed(), peer.was_seed) {
                (true, false) => peer.offers.clear(),
                (false, true) => rebuilt.push(*addr),
                _ => {}
            }
            peer.was_seed = peer.is_seed();
        }
        for addr in rebuilt {
            self.rebuild_offers(addr);
        }
        let seeds = self.seeds();
        if seeds != self.index.seeds {
            self.index.seeds = seeds;
            self.rebuild_seed_only();
        }
    }

    /// Fills `addr`'s candidate set from what it holds.
    fn rebuild_offers(&mut self, addr: SocketAddr) {
        let mut offers = BTreeSet::new();
        let peer = &self.peers[&addr];
        for (f, file) in self.files.iter().enumerate() {
            for (b, block) in file.blocks.iter().enumerate() {
                if let (Some(i), true) = (block.indexed, peer.has_block[f][b]) {
                    offers.insert((i.sources, block.key, f as u32, b as u32));
                }
            }
        }
        self.peers.get_mut(&addr).expect("known peer").offers = offers;
    }
}
