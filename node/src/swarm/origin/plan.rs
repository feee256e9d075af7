//! Which pieces of a file this node asks the origin for, and in which order: a pure function
//! of what it and its peers hold, so that it is tested without sockets.
//!
//! The pieces nobody holds or fetches are split among the nodes assembling the file by
//! rendezvous hash, as a seed's blocks are (see `swarm::layout::seed_order`): a node asks for
//! its own pieces first, in file order; once it has none left to ask for, it helps as the
//! first stand-in of an owner that is not keeping up (its unclaimed pieces did not get fewer
//! for [`HELP_WAIT`]), taking that owner's pieces from the other end (the file's end) and
//! leaving it as many as it asks for at once (the `reserve`). So nodes that start together
//! never ask for the same piece, a fast node helps a slow one at the end, and the uplink stays
//! busy to the end. (Helping any owner made nodes collide whenever the news of what an owner
//! had taken lagged behind it: 1.07-1.41x of the file from a Hub as fast as the LAN.)
//! An owner that takes nothing for [`STAND_IN_WAIT`] (it can't reach the origin, say) has its
//! remaining pieces taken by its first stand-in, then, after twice that, by its second, and so
//! on: stand-ins that all see it stall don't all take the same piece at once (with one
//! threshold for all, a 40 Mbit uplink's slow last pieces were taken twice). A piece a local
//! reader waits for (and the few after it) goes first, whoever owns it.
//!
//! Unit-tested without sockets below.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::swarm::layout::seed_order;

/// How long an owner may take nothing before its first stand-in takes the pieces it would
/// ask for next (the r-th stand-in waits r times as long).
pub(crate) const STAND_IN_WAIT: Duration = Duration::from_secs(2);
/// How long an owner's unclaimed pieces must stay as many before a stand-in helps it.
pub(crate) const HELP_WAIT: Duration = Duration::from_millis(500);
/// Pieces fetched ahead of a local reader, beyond the one it waits for.
const READ_AHEAD: usize = 3;

/// What the plan needs to know about one piece.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Piece {
    /// Here, or on its way here.
    pub(crate) ours: bool,
    /// A usable peer holds it or is fetching it.
    pub(crate) elsewhere: bool,
}

/// The planner's memory between calls.
#[derive(Debug)]
pub(crate) struct OriginPlan {
    me: u64,
    /// The downloaders the pieces are split among (sorted, ours included), and per piece its
    /// place in our order and its owner.
    split: Vec<u64>,
    order: Vec<((u16, u64), u64)>,
    /// Per owner: its unclaimed pieces plus those we took for it, at the last call, and since
    /// when that number has not fallen (what we take for an owner is not its progress).
    owners: HashMap<u64, (usize, Instant)>,
    /// Per owner: how many of its pieces we asked for as its stand-in.
    helped: HashMap<u64, usize>,
}

impl OriginPlan {
    pub(crate) fn new(me: u64, pieces: usize) -> Self {
        let mut plan = Self {
            me,
            split: Vec::new(),
            order: Vec::new(),
            owners: HashMap::new(),
            helped: HashMap::new(),
        };
        plan.resplit(vec![me], pieces);
        plan
    }

    fn resplit(&mut self, mut ids: Vec<u64>, pieces: usize) {
        ids.push(self.me);
        ids.sort_unstable();
        ids.dedup();
        if ids == self.split && self.order.len() == pieces {
            return;
        }
        // Owners go through their pieces in file order, so that the fleet's pieces arrive
        // roughly in order and the published hash keeps up with them (it is computed in
        // order); stand-ins take an owner's pieces from the end.
        self.order = (0..pieces)
            .map(|p| {
                let ((rank, _), owner) = seed_order(self.me, &ids, p);
                let key = if rank == 0 {
                    p as u64
                } else {
                    u64::MAX - p as u64
                };
                ((rank, key), owner)
            })
            .collect();
        self.split = ids;
    }

    /// Our rank for `piece` in the split (0: ours) and its owner's id.
    pub(crate) fn rank(&self, piece: usize) -> (u16, u64) {
        let ((rank, _), owner) = self.order[piece];
        (rank, owner)
    }

    /// Up to `slots` pieces to ask the origin for now, in order. `ids` are the download ids of
    /// the peers assembling the file; `urgent` the piece a local reader waits for; before
    /// `settled`, only what a reader waits for is asked (peers may not have shown up yet).
    /// Each node asks for up to `reserve` pieces at once: a stand-in leaves an owner that many.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn next(
        &mut self,
        pieces: &[Piece],
        ids: Vec<u64>,
        urgent: Option<usize>,
        settled: bool,
        slots: usize,
        reserve: usize,
        now: Instant,
    ) -> Vec<usize> {
        self.resplit(ids, pieces.len());
        let free = |p: usize| !pieces[p].ours && !pieces[p].elsewhere;
        let mut out: Vec<usize> = urgent
            .into_iter()
            .flat_map(|u| u..(u + 1 + READ_AHEAD).min(pieces.len()))
            .filter(|&p| free(p))
            .take(slots)
            .collect();
        let candidates: Vec<usize> = (0..pieces.len()).filter(|&p| free(p)).collect();
        if !settled {
            return out;
        }
        let mut left: HashMap<u64, usize> = HashMap::new();
        for &p in &candidates {
            *left.entry(self.order[p].1).or_default() += 1;
        }
        self.owners.retain(|o, _| left.contains_key(o));
        for (&owner, &n) in &left {
            let n = n + self.helped.get(&owner).copied().unwrap_or(0);
            let seen = self.owners.entry(owner).or_insert((n, now));
            if n < seen.0 {
                *seen = (n, now);
            }
        }
        // How long each owner has not taken a piece (what we took for it doesn't count).
        let idle = |owner: u64| {
            self.owners
                .get(&owner)
                .map_or(Duration::ZERO, |(_, since)| {
                    now.saturating_duration_since(*since)
                })
        };
        let own_left = candidates.iter().any(|&p| self.order[p].0 .0 == 0);
        let mut ranked: Vec<usize> = candidates
            .into_iter()
            .filter(|&p| {
                let ((rank, _), owner) = self.order[p];
                rank == 0 || (!own_left && may_help(rank, idle(owner)))
            })
            .collect();
        ranked.sort_by_key(|&p| self.order[p].0);
        for p in ranked {
            if out.len() >= slots {
                break;
            }
            let ((rank, _), owner) = self.order[p];
            if rank > 0 {
                // Leave the owner what it asks for next, unless it has been stuck.
                let n = left.get_mut(&owner).expect("counted above");
                if *n <= reserve && !may_take_reserved(rank, idle(owner)) {
                    continue;
                }
                *n = n.saturating_sub(1);
                *self.helped.entry(owner).or_default() += 1;
            }
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }
}

/// Whether a stand-in of `rank` may help an owner idle this long: the first stand-in once the
/// owner doesn't keep up ([`HELP_WAIT`]), the r-th only after r times [`STAND_IN_WAIT`], so
/// stand-ins that see the same owner fall behind don't all take the same piece at once.
fn may_help(rank: u16, idle: Duration) -> bool {
    match rank {
        0 => true,
        1 => idle >= HELP_WAIT,
        r => idle >= STAND_IN_WAIT * u32::from(r),
    }
}

/// Whether a stand-in of `rank` may take the pieces an owner idle this long would ask for next
/// (it can't reach the origin, say).
fn may_take_reserved(rank: u16, idle: Duration) -> bool {
    idle >= STAND_IN_WAIT * u32::from(rank.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_free(n: usize) -> Vec<Piece> {
        vec![Piece::default(); n]
    }

    /// Runs the plan for one node until it asks for nothing more; every asked piece arrives
    /// at once.
    fn drain(plan: &mut OriginPlan, pieces: &mut [Piece], ids: &[u64], now: Instant) -> Vec<usize> {
        let mut asked = Vec::new();
        loop {
            let next = plan.next(pieces, ids.to_vec(), None, true, 1, 1, now);
            let Some(&p) = next.first() else {
                return asked;
            };
            pieces[p].ours = true;
            asked.push(p);
        }
    }

    #[test]
    fn alone_a_node_asks_for_every_piece_once() {
        let mut plan = OriginPlan::new(7, 20);
        let mut pieces = all_free(20);
        let mut asked = drain(&mut plan, &mut pieces, &[], Instant::now());
        asked.sort_unstable();
        assert_eq!(asked, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn owners_ask_in_file_order_and_stand_ins_from_the_end() {
        let mut plan = OriginPlan::new(7, 20);
        let mut pieces = all_free(20);
        let asked = drain(&mut plan, &mut pieces, &[], Instant::now());
        assert_eq!(asked, (0..20).collect::<Vec<_>>(), "alone: in file order");
        let (a, b) = (11u64, 22u64);
        let mut plan = OriginPlan::new(a, 64);
        let pieces = all_free(64);
        let start = Instant::now();
        let own = plan.next(&pieces, vec![b], None, true, 64, 1, start);
        assert!(
            own.windows(2).all(|w| w[0] < w[1]),
            "own pieces in order: {own:?}"
        );
        // Once b has been idle long enough, a takes b's pieces from the file's end.
        let mut pieces = pieces;
        for &p in &own {
            pieces[p].ours = true;
        }
        plan.next(&pieces, vec![b], None, true, 1, 1, start);
        let later = start + STAND_IN_WAIT * 2;
        let helped = plan.next(&pieces, vec![b], None, true, 64, 1, later);
        assert!(!helped.is_empty());
        assert!(
            helped.windows(2).all(|w| w[0] > w[1]),
            "b's pieces from the end: {helped:?}"
        );
    }

    #[test]
    fn two_nodes_split_the_pieces_and_leave_each_owner_its_last() {
        let (a, b) = (11u64, 22u64);
        let n = 64;
        let now = Instant::now();
        let mut plan_a = OriginPlan::new(a, n);
        let mut pieces = all_free(n);
        // b takes nothing (say it is slow): a takes its own, then, once b has not kept up for
        // HELP_WAIT, b's but for b's last one.
        let mut asked = drain(&mut plan_a, &mut pieces, &[b], now);
        asked.extend(drain(&mut plan_a, &mut pieces, &[b], now + HELP_WAIT));
        let now = now + HELP_WAIT;
        let owner = |p: usize| seed_order(a, &[a, b], p).1;
        let owned_by_b = (0..n).filter(|&p| owner(p) == b).count();
        assert_eq!(asked.len(), n - 1, "all but b's last piece");
        let first_b = asked.iter().position(|&p| owner(p) == b).unwrap();
        assert!(
            asked[..first_b].iter().all(|&p| owner(p) == a),
            "own pieces first"
        );
        assert_eq!(asked.len() - first_b, owned_by_b - 1);
        // Once the pieces nobody has stop getting fewer for STAND_IN_WAIT, a takes it too.
        assert!(plan_a
            .next(&pieces, vec![b], None, true, 4, 1, now)
            .is_empty());
        let later = plan_a.next(&pieces, vec![b], None, true, 4, 1, now + STAND_IN_WAIT);
        assert_eq!(later.len(), 1);
        assert_eq!(owner(later[0]), b);
    }

    #[test]
    fn nodes_that_start_together_ask_for_disjoint_pieces() {
        let ids = [11u64, 22, 33, 44];
        let n = 7;
        let now = Instant::now();
        let mut asked = vec![0; n];
        for &me in &ids {
            let mut plan = OriginPlan::new(me, n);
            let others = ids.iter().copied().filter(|&i| i != me).collect();
            for p in plan.next(&all_free(n), others, None, true, 4, 4, now) {
                asked[p] += 1;
            }
        }
        assert!(
            asked.iter().all(|&a| a <= 1),
            "a piece asked twice: {asked:?}"
        );
        // Every piece has an owner that asks for it.
        assert!(asked.iter().all(|&a| a == 1), "{asked:?}");
    }

    #[test]
    fn an_owner_that_keeps_up_gets_no_help() {
        let (a, b) = (11u64, 22u64);
        let n = 64;
        let t0 = Instant::now();
        let owner = |p: usize| seed_order(a, &[a, b], p).1;
        let mut plan = OriginPlan::new(a, n);
        let mut pieces = all_free(n);
        drain(&mut plan, &mut pieces, &[b], t0);
        // b takes one of its pieces every 100 ms: a never asks for b's.
        let mut t = t0;
        while let Some(p) = (0..n).find(|&p| owner(p) == b && !pieces[p].elsewhere) {
            t += Duration::from_millis(100);
            pieces[p].elsewhere = true;
            assert!(plan.next(&pieces, vec![b], None, true, 4, 1, t).is_empty());
        }
    }

    #[test]
    fn stand_ins_take_a_stuck_owners_last_pieces_one_rank_at_a_time() {
        assert!(may_help(0, Duration::ZERO));
        assert!(!may_help(1, HELP_WAIT / 2) && may_help(1, HELP_WAIT));
        assert!(!may_help(2, STAND_IN_WAIT) && may_help(2, STAND_IN_WAIT * 2));
        assert!(!may_take_reserved(1, STAND_IN_WAIT / 2) && may_take_reserved(1, STAND_IN_WAIT));
        assert!(
            !may_take_reserved(3, STAND_IN_WAIT * 2) && may_take_reserved(3, STAND_IN_WAIT * 3)
        );
    }

    #[test]
    fn pieces_held_or_fetched_elsewhere_are_not_asked_of_the_origin() {
        let mut plan = OriginPlan::new(1, 8);
        let mut pieces = all_free(8);
        for p in [0, 3, 5] {
            pieces[p].elsewhere = true;
        }
        let mut asked = drain(&mut plan, &mut pieces, &[], Instant::now());
        asked.sort_unstable();
        assert_eq!(asked, vec![1, 2, 4, 6, 7]);
    }

    #[test]
    fn a_readers_piece_goes_first_even_before_peers_settle() {
        let mut plan = OriginPlan::new(1, 100);
        let pieces = all_free(100);
        let next = plan.next(&pieces, vec![2, 3], Some(40), false, 2, 2, Instant::now());
        assert_eq!(next, vec![40, 41]);
        let next = plan.next(&pieces, vec![2, 3], Some(98), false, 4, 4, Instant::now());
        assert_eq!(next, vec![98, 99]);
    }
}
