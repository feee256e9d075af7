//! The indexes ([`super::index`]) at the largest block count a file has (32,768): after every
//! event of long random runs, each choice they give is the one a scan of every block gives
//! (the scheduler before the indexes), and a whole download ends with each block fetched once.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use bao_tree::ChunkRanges;
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::*;
use crate::swarm::layout::{Layout, MAX_BLOCKS};

const BLOCKS: usize = MAX_BLOCKS as usize;

fn peer(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 1, i], 7341))
}

fn big_file() -> FileSpec {
    FileSpec {
        size: BLOCKS as u64 * BLOCK_BYTES,
        have: ChunkRanges::empty(),
        node: 1,
    }
}

fn blocks(layout: &Layout, list: impl IntoIterator<Item = usize>) -> ChunkRanges {
    let mut out = ChunkRanges::empty();
    for b in list {
        out |= layout.range(b);
    }
    out
}

/// The choice as the scheduler made it before the indexes: a scan of every block.
fn scan_choose(
    policy: &Policy,
    addr: SocketAddr,
    endgame: bool,
    ask: Ask,
    now: Instant,
) -> Option<(usize, usize)> {
    let state = &policy.peers[&addr];
    let seeds = policy.seeds();
    let others = |block: &Block| block.avail.saturating_sub(seeds) + block.pending;
    let spare_seed = state.is_seed() && policy.peers.len() > usize::from(seeds);
    if ask == Ask::Duplicate {
        let mut oldest: Option<(Instant, usize, usize)> = None;
        for (f, file) in policy.files.iter().enumerate() {
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
        return oldest.map(|(_, f, p)| (f, p));
    }
    let any_rank = policy
        .seed_only_stuck_since
        .is_some_and(|t| now.saturating_duration_since(t) >= STAND_IN_WAIT);
    type Score = (u16, (u16, u64));
    let mut best: Option<(Score, usize, usize)> = None;
    for (f, file) in policy.files.iter().enumerate() {
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
            let owners_last =
                rank > 0 && !any_rank && left.get(&file.owner[p]).is_none_or(|&n| n <= 1);
            if spare_seed && (others(block) > 0 || owners_last) {
                continue;
            }
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

/// Every choice, the seed-only count and the pending chunks, against a scan of every block.
fn assert_matches_scan(policy: &Policy, now: Instant) {
    let endgame = policy.files.iter().all(|f| {
        f.blocks
            .iter()
            .all(|b| !matches!(b.state, BlockState::Missing))
    });
    assert_eq!(endgame, policy.index.missing.is_empty());
    for &addr in policy.peers.keys() {
        if policy.peers[&addr].banned {
            continue;
        }
        for ask in [Ask::Held, Ask::Live, Ask::Duplicate] {
            assert_eq!(
                policy.choose(addr, endgame, ask, now),
                scan_choose(policy, addr, endgame, ask, now),
                "{ask:?} for {addr}"
            );
        }
    }
    let seeds = policy.seeds();
    let seed_only = policy.files[0]
        .blocks
        .iter()
        .filter(|b| {
            matches!(b.state, BlockState::Missing)
                && b.avail > 0
                && b.avail.saturating_sub(seeds) + b.pending == 0
        })
        .count();
    assert_eq!(policy.index.seed_only.len(), seed_only);
    let file = &policy.files[0];
    let mut pending = ChunkRanges::empty();
    for (p, block) in file.blocks.iter().enumerate() {
        if let BlockState::InFlight { requests, .. } = &block.state {
            if requests.iter().any(|r| !r.live) {
                pending |= file.layout.range(p);
            }
        }
    }
    assert_eq!(policy.pending_chunks(0), pending);
}

#[test]
fn indexed_choices_match_a_scan_of_32768_blocks_through_random_events() {
    let layout = Layout::new(big_file().size);
    assert_eq!(layout.count(), BLOCKS);
    for run in 0..3u64 {
        let mut rng = StdRng::seed_from_u64(run);
        let mut policy = Policy::new(&[big_file()], run);
        let t0 = Instant::now();
        let mut now = t0;
        let mut in_flight: Vec<BlockRequest> = Vec::new();
        let mut ids: HashMap<SocketAddr, u64> = HashMap::new();
        for step in 0..400 {
            now += Duration::from_millis(rng.random_range(0..400));
            let i = rng.random_range(2..10u8);
            let addr = peer(i);
            match rng.random_range(0..100) {
                0..=19 => {
                    if policy.handle_peer_joined(addr, 0) && i == 2 {
                        // Peer 2 is a seed whenever it is there.
                        policy.handle_have(addr, 0, &layout.all(), ChunkRanges::empty(), 0);
                    }
                }
                20..=49 if policy.peers.contains_key(&addr) => {
                    let start = rng.random_range(0..BLOCKS);
                    let len = rng.random_range(1..2000).min(BLOCKS - start);
                    let held = blocks(&layout, start..start + len);
                    let p0 = rng.random_range(0..BLOCKS - 8);
                    let pending = blocks(&layout, (p0..p0 + 8).filter(|_| rng.random_bool(0.5)));
                    let node = *ids.entry(addr).or_insert_with(|| rng.random_range(2..1000));
                    policy.handle_have(addr, 0, &held, pending, node);
                }
                50..=54 => policy.handle_peer_left(addr),
                55..=59 => {
                    let _ = policy.handle_tick(now, |_| 0);
                }
                _ => {
                    assert_matches_scan(&policy, now);
                    policy.schedule(now);
                    while let Some(action) = policy.poll_action() {
                        if let Action::Start(req) = action {
                            in_flight.push(req);
                        }
                    }
                    // Finish some requests, in any order, with any outcome.
                    for _ in 0..rng.random_range(0..in_flight.len().max(1) + 1) {
                        if in_flight.is_empty() {
                            break;
                        }
                        let req = in_flight.swap_remove(rng.random_range(0..in_flight.len()));
                        let (outcome, complete) = match rng.random_range(0..40) {
                            0 => (Outcome::Corrupt, false),
                            1 => (Outcome::NotHeld, false),
                            2 => (Outcome::Unavailable, false),
                            3..=7 => (Outcome::Failed, false),
                            _ => (Outcome::Ok, true),
                        };
                        policy.handle_done(&req, outcome, complete);
                    }
                }
            }
            if step % 4 == 0 {
                assert_matches_scan(&policy, now);
            }
        }
        assert_matches_scan(&policy, now);
    }
}

#[test]
fn a_32768_block_download_from_a_seed_and_peers_fetches_each_block_once() {
    let layout = Layout::new(big_file().size);
    let mut policy = Policy::new(&[big_file()], 5);
    let seed = peer(2);
    assert!(policy.handle_peer_joined(seed, 0));
    policy.handle_have(seed, 0, &layout.all(), ChunkRanges::empty(), 0);
    // Seven peers each hold a different eighth of the file.
    for i in 0..7u8 {
        let addr = peer(3 + i);
        assert!(policy.handle_peer_joined(addr, 0));
        let eighth = BLOCKS / 8;
        let start = usize::from(i) * eighth;
        let held = blocks(&layout, start..start + eighth);
        policy.handle_have(addr, 0, &held, ChunkRanges::empty(), 0);
    }
    let now = Instant::now();
    let mut asked = vec![0u32; BLOCKS];
    let mut rounds = 0;
    while !policy.is_done() {
        rounds += 1;
        assert!(rounds < 100_000, "the download does not end");
        policy.schedule(now);
        let mut started = Vec::new();
        while let Some(action) = policy.poll_action() {
            if let Action::Start(req) = action {
                started.push(req);
            }
        }
        assert!(!started.is_empty(), "nothing scheduled with blocks missing");
        for req in started {
            asked[req.block] += 1;
            if req.peer == seed {
                assert!(
                    req.block >= 7 * (BLOCKS / 8),
                    "the seed was asked for a peer's block"
                );
            }
            policy.handle_done(&req, Outcome::Ok, true);
        }
    }
    assert!(
        asked.iter().all(|&n| n == 1),
        "every block asked exactly once"
    );
    assert!(policy.index.in_flight.is_empty());
    assert!(policy.index.missing.is_empty());
}
