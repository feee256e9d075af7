//! The scheduler's decisions, driven without sockets: each test feeds events with explicit
//! times and checks the actions that come out.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use bao_tree::ChunkRanges;

use super::*;
use crate::swarm::layout::{seed_order, Layout, BLOCK_BYTES};

/// Our download id in every test.
const ME: u64 = 1;

fn peer(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i], 7341))
}

fn spec(blocks: u64) -> FileSpec {
    FileSpec {
        size: blocks * BLOCK_BYTES,
        have: ChunkRanges::empty(),
        node: ME,
    }
}

/// The chunks of `blocks` in a file of `total` blocks.
fn chunks(total: u64, blocks: impl IntoIterator<Item = usize>) -> ChunkRanges {
    let layout = Layout::new(total * BLOCK_BYTES);
    let mut out = ChunkRanges::empty();
    for b in blocks {
        out |= layout.range(b);
    }
    out
}

fn drain(policy: &mut Policy) -> Vec<Action> {
    std::iter::from_fn(|| policy.poll_action()).collect()
}

fn starts(actions: &[Action]) -> Vec<BlockRequest> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Start(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn blocks_of(reqs: &[BlockRequest], to: SocketAddr) -> BTreeSet<usize> {
    reqs.iter()
        .filter(|r| r.peer == to)
        .map(|r| r.block)
        .collect()
}

/// A policy for one file of `blocks` blocks with `holders` joined, each holding the given
/// blocks (and fetching nothing).
fn with_holders(blocks: u64, holders: &[(SocketAddr, Vec<usize>)]) -> Policy {
    let mut policy = Policy::new(&[spec(blocks)], 7);
    for (addr, held) in holders {
        assert!(policy.handle_peer_joined(*addr, 0));
        let held = chunks(blocks, held.iter().copied());
        policy.handle_have(*addr, 0, &held, ChunkRanges::empty(), 0);
    }
    let subs = drain(&mut policy);
    assert_eq!(
        subs.len(),
        holders.len(),
        "one subscription per peer and file"
    );
    policy
}

#[test]
fn rarest_blocks_are_asked_first() {
    let (a, b) = (peer(2), peer(3));
    let mut policy = with_holders(4, &[(a, vec![0, 1, 2]), (b, vec![2])]);
    policy.schedule(Instant::now());
    let reqs = starts(&drain(&mut policy));
    // Blocks 0 and 1 have one source, block 2 has two: a is asked for the rare ones (two
    // requests, its starting depth), and b for the one only it could add.
    assert_eq!(blocks_of(&reqs, a), BTreeSet::from([0, 1]));
    assert_eq!(blocks_of(&reqs, b), BTreeSet::from([2]));
    assert!(reqs.iter().all(|r| !r.live));
}

#[test]
fn a_seed_is_asked_for_our_share_first_then_as_stand_in_but_not_for_an_owners_last_block() {
    const BLOCKS: u64 = 16;
    const OTHER: u64 = 99;
    let (seed, other) = (peer(2), peer(3));
    let t0 = Instant::now();
    let mut policy = with_holders(BLOCKS, &[(seed, (0..16).collect())]);
    // Another downloader, fetching block 15 from the seed.
    assert!(policy.handle_peer_joined(other, 0));
    policy.handle_have(other, 0, &ChunkRanges::empty(), chunks(BLOCKS, [15]), OTHER);
    drain(&mut policy);

    let ids = [ME, OTHER];
    let order = |b: usize| seed_order(ME, &ids, b);
    let mine: Vec<usize> = (0..15).filter(|&b| order(b).0 .0 == 0).collect();
    let theirs: Vec<usize> = (0..15).filter(|&b| order(b).0 .0 == 1).collect();
    assert!(mine.len() >= 2 && theirs.len() >= 2, "{mine:?} {theirs:?}");

    // One request at a time to a seed others share; each completes before the next.
    let mut asked = Vec::new();
    loop {
        policy.schedule(t0);
        let reqs: Vec<BlockRequest> = starts(&drain(&mut policy))
            .into_iter()
            .filter(|r| r.peer == seed)
            .collect();
        assert!(reqs.len() <= 1, "one request at a time to a shared seed");
        let Some(req) = reqs.into_iter().next() else {
            break;
        };
        asked.push(req.block);
        policy.handle_done(&req, Outcome::Ok, true);
        drain(&mut policy);
    }
    // Our own blocks first, heaviest first; then the other's, lightest first, all but its last.
    let mut expect_mine = mine.clone();
    expect_mine.sort_by_key(|&b| order(b).0);
    let mut expect_theirs = theirs.clone();
    expect_theirs.sort_by_key(|&b| order(b).0);
    let last = expect_theirs.pop().unwrap();
    assert_eq!(asked, [expect_mine, expect_theirs].concat());
    assert!(
        !asked.contains(&15),
        "the block the other fetches is not asked of the seed"
    );

    // The owner never takes its last block (it can't reach the seed, say): once the seed-only
    // blocks stop getting fewer for STAND_IN_WAIT, we take it.
    policy.handle_tick(t0, |_| 0).unwrap();
    policy.schedule(t0 + STAND_IN_WAIT / 2);
    assert!(starts(&drain(&mut policy)).is_empty());
    policy.handle_tick(t0 + STAND_IN_WAIT, |_| 0).unwrap();
    policy.schedule(t0 + STAND_IN_WAIT);
    let reqs = starts(&drain(&mut policy));
    assert_eq!(blocks_of(&reqs, seed), BTreeSet::from([last]));
}

#[test]
fn endgame_duplicates_go_to_a_second_holder_and_the_loser_is_cancelled() {
    let (a, b) = (peer(2), peer(3));
    let mut policy = with_holders(2, &[(a, vec![0, 1]), (b, vec![0, 1])]);
    policy.schedule(Instant::now());
    let mut reqs = starts(&drain(&mut policy));
    // The endgame starts with the next round, once nothing is left unassigned.
    policy.schedule(Instant::now());
    reqs.extend(starts(&drain(&mut policy)));
    // Two seeds: a takes both blocks, so b gets a duplicate of each, never a third request
    // for one block.
    assert_eq!(blocks_of(&reqs, a), BTreeSet::from([0, 1]));
    assert_eq!(blocks_of(&reqs, b), BTreeSet::from([0, 1]));
    assert_eq!(reqs.len(), 4);
    let first = reqs.iter().find(|r| r.peer == a && r.block == 0).unwrap();
    let dup = reqs.iter().find(|r| r.peer == b && r.block == 0).unwrap();
    policy.handle_done(first, Outcome::Ok, true);
    let actions = drain(&mut policy);
    assert!(actions.contains(&Action::Cancel(dup.id)), "{actions:?}");
    policy.schedule(Instant::now());
    assert!(starts(&drain(&mut policy)).is_empty());
}

#[test]
fn a_stalled_peers_blocks_are_handed_on_after_slow_block() {
    let (a, b) = (peer(2), peer(3));
    let held: Vec<usize> = (0..4).collect();
    // Blocks 4..8 nobody has yet, so this is not the endgame.
    let mut policy = with_holders(8, &[(a, held.clone()), (b, held)]);
    let t0 = Instant::now();
    policy.schedule(t0);
    let reqs = starts(&drain(&mut policy));
    assert_eq!(reqs.len(), 4, "two each");
    let a_first = reqs.iter().find(|r| r.peer == a).unwrap().clone();
    let b_blocks = blocks_of(&reqs, b);

    // a frees a slot before SLOW_BLOCK: b's blocks are not duplicated yet.
    policy.handle_done(&a_first, Outcome::Ok, true);
    policy.schedule(t0 + SLOW_BLOCK / 2);
    assert!(starts(&drain(&mut policy)).is_empty());

    // b is still on its blocks after SLOW_BLOCK: a takes one of them too.
    let a_second = reqs.iter().filter(|r| r.peer == a).nth(1).unwrap().clone();
    policy.handle_done(&a_second, Outcome::Ok, true);
    policy.schedule(t0 + SLOW_BLOCK);
    let handed = starts(&drain(&mut policy));
    assert!(!handed.is_empty());
    assert!(handed
        .iter()
        .all(|r| r.peer == a && b_blocks.contains(&r.block)));
}

#[test]
fn a_shared_seed_is_asked_twice_for_a_slow_block_only_when_it_is_stuck() {
    let (seed, p) = (peer(2), peer(3));
    let mut policy = with_holders(2, &[(seed, vec![0, 1]), (p, vec![0])]);
    let t0 = Instant::now();
    policy.schedule(t0);
    let reqs = starts(&drain(&mut policy));
    // p is asked for the block it holds, the seed for the one only it holds.
    assert_eq!(blocks_of(&reqs, p), BTreeSet::from([0]));
    assert_eq!(blocks_of(&reqs, seed), BTreeSet::from([1]));
    let from_seed = reqs.iter().find(|r| r.peer == seed).unwrap();
    policy.handle_done(from_seed, Outcome::Ok, true);

    // p is slow with block 0. The seed is free, but p holds the block: a second request
    // would make the seed send it although it is on its way.
    policy.schedule(t0 + SLOW_BLOCK);
    assert!(starts(&drain(&mut policy)).is_empty());
    policy.schedule(t0 + STUCK_BLOCK - Duration::from_millis(1));
    assert!(starts(&drain(&mut policy)).is_empty());

    // Stuck: the seed takes it too.
    policy.schedule(t0 + STUCK_BLOCK);
    let handed = starts(&drain(&mut policy));
    assert_eq!(blocks_of(&handed, seed), BTreeSet::from([0]));
    assert_eq!(handed.len(), 1);
}

#[test]
fn a_banned_peers_blocks_go_back_to_the_pool() {
    let (bad, good) = (peer(2), peer(3));
    let mut policy = with_holders(4, &[(bad, vec![0, 1, 2, 3]), (good, vec![0, 1, 2, 3])]);
    policy.schedule(Instant::now());
    let reqs = starts(&drain(&mut policy));
    let from_bad: Vec<BlockRequest> = reqs.iter().filter(|r| r.peer == bad).cloned().collect();
    let from_good: Vec<BlockRequest> = reqs.iter().filter(|r| r.peer == good).cloned().collect();
    assert_eq!(from_bad.len(), 2);

    policy.handle_done(&from_bad[0], Outcome::Corrupt, false);
    let actions = drain(&mut policy);
    assert!(actions.contains(&Action::Unsubscribe { peer: bad }));
    // The good peer frees its slots and gets the block the bad one failed; nothing more goes
    // to the bad one, also after it reconnects.
    for req in &from_good {
        policy.handle_done(req, Outcome::Ok, true);
    }
    policy.handle_peer_left(bad);
    assert!(
        !policy.handle_peer_joined(bad, 0),
        "a banned peer stays banned"
    );
    policy.schedule(Instant::now());
    let next = starts(&drain(&mut policy));
    assert_eq!(blocks_of(&next, good), BTreeSet::from([from_bad[0].block]));
    assert!(blocks_of(&next, bad).is_empty());
}

#[test]
fn a_reconnected_peer_is_not_charged_for_its_old_connections_requests() {
    let a = peer(2);
    let mut policy = with_holders(2, &[(a, vec![0, 1])]);
    policy.schedule(Instant::now());
    let old = starts(&drain(&mut policy));
    assert_eq!(old.len(), 2);
    policy.handle_peer_left(a);
    assert!(policy.handle_peer_joined(a, 0));
    policy.handle_have(a, 0, &chunks(2, [0, 1]), ChunkRanges::empty(), 0);
    // The old connection's requests fail late; the new connection's slots stay free.
    for req in &old {
        policy.handle_done(req, Outcome::Failed, false);
    }
    drain(&mut policy);
    policy.schedule(Instant::now());
    assert_eq!(
        blocks_of(&starts(&drain(&mut policy)), a),
        BTreeSet::from([0, 1])
    );
}

#[test]
fn blocks_a_peer_is_fetching_are_asked_live_and_not_advertised_as_ours() {
    let relay = peer(2);
    let mut policy = Policy::new(&[spec(4)], 7);
    assert!(policy.handle_peer_joined(relay, 0));
    // It holds nothing yet, and is fetching block 3 from a holder.
    policy.handle_have(relay, 0, &ChunkRanges::empty(), chunks(4, [3]), 42);
    drain(&mut policy);
    policy.schedule(Instant::now());
    let actions = drain(&mut policy);
    let reqs = starts(&actions);
    assert_eq!(reqs.len(), 1);
    assert!(reqs[0].live && reqs[0].block == 3);
    // We are being passed block 3 live: we don't advertise it as pending (no chain of relays).
    assert!(actions.contains(&Action::Pending {
        file: 0,
        chunks: ChunkRanges::empty()
    }));
}

#[test]
fn a_download_with_no_source_stalls_after_stall_timeout() {
    let a = peer(2);
    let mut policy = with_holders(4, &[(a, vec![])]);
    let t0 = Instant::now();
    policy.schedule(t0);
    assert!(starts(&drain(&mut policy)).is_empty());
    policy.handle_tick(t0, |_| 0).unwrap();
    policy
        .handle_tick(t0 + STALL_TIMEOUT - Duration::from_millis(1), |_| 0)
        .unwrap();
    let stalled = policy.handle_tick(t0 + STALL_TIMEOUT, |_| 0).unwrap_err();
    assert_eq!(
        stalled,
        Stalled {
            file: 0,
            all_banned: false
        }
    );
}

#[test]
fn a_subscription_that_ends_early_is_renewed_with_backoff() {
    let a = peer(2);
    let mut policy = with_holders(4, &[(a, vec![0])]);
    let t0 = Instant::now();
    policy.handle_subscription_ended(a, 0, t0);
    policy
        .handle_tick(t0 + Duration::from_millis(400), |_| 0)
        .unwrap();
    assert!(!drain(&mut policy).contains(&Action::Subscribe { peer: a, file: 0 }));
    policy
        .handle_tick(t0 + Duration::from_millis(500), |_| 0)
        .unwrap();
    assert!(drain(&mut policy).contains(&Action::Subscribe { peer: a, file: 0 }));
}
