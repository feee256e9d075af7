//! How a file is cut into request blocks, and the seed split: which downloader owns which of
//! a seed's blocks (rendezvous hashing).

use bao_tree::{ChunkNum, ChunkRanges};
use mesh_proto::CHUNK_BYTES;

use crate::store::ranges;

/// Bytes in one block, the unit of requests, for files up to [`MAX_BLOCKS`] of them.
pub(crate) const BLOCK_BYTES: u64 = 256 << 10;
/// The most blocks in one file: bigger files get bigger blocks (a power of two times
/// [`BLOCK_BYTES`]), which keeps per-file state small.
pub(crate) const MAX_BLOCKS: u64 = 32 << 10;

/// How a file is cut into blocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    /// Chunks in the file.
    pub(crate) chunks: u64,
    /// Chunks in one block (the last may be shorter).
    pub(crate) block: u64,
}

impl Layout {
    pub(crate) fn new(size: u64) -> Self {
        let chunks = ranges::chunk_count(size).0;
        let mut block = BLOCK_BYTES / CHUNK_BYTES;
        while chunks.div_ceil(block) > MAX_BLOCKS {
            block *= 2;
        }
        Self { chunks, block }
    }

    /// Bytes in one block.
    pub(crate) fn block_bytes(&self) -> u64 {
        self.block * CHUNK_BYTES
    }

    /// Blocks in the file (one for an empty file).
    pub(crate) fn count(&self) -> usize {
        self.chunks.div_ceil(self.block).max(1) as usize
    }

    /// Every chunk of the file.
    pub(crate) fn all(&self) -> ChunkRanges {
        ChunkRanges::from(ChunkNum(0)..ChunkNum(self.chunks))
    }

    /// The chunks of block `index`.
    pub(crate) fn range(&self, index: usize) -> ChunkRanges {
        let start = index as u64 * self.block;
        let end = (start + self.block).min(self.chunks);
        ChunkRanges::from(ChunkNum(start)..ChunkNum(end))
    }

    /// The chunks of blocks `start..end`.
    pub(crate) fn span(&self, start: usize, end: usize) -> ChunkRanges {
        let first = start as u64 * self.block;
        let last = (end as u64 * self.block).min(self.chunks);
        ChunkRanges::from(ChunkNum(first)..ChunkNum(last))
    }

    /// The blocks a range set touches.
    pub(crate) fn touching(&self, ranges: &ChunkRanges) -> impl Iterator<Item = usize> {
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

/// Whether `have` holds every chunk of `range`.
pub(crate) fn covers(have: &ChunkRanges, range: &ChunkRanges) -> bool {
    (range.clone() - have).is_empty()
}

/// Where block `block` comes in our requests to a seed when the downloaders `ids` (ours, `me`,
/// included) split the seed's blocks: our rank among them (0: we own it), then the owner's
/// weight, heaviest first for the owner and lightest first for stand-ins. Lower goes first.
/// Also returns the owner's id.
pub(crate) fn seed_order(me: u64, ids: &[u64], block: usize) -> ((u16, u64), u64) {
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
        assert_eq!(Layout::new(8 * gib).block_bytes(), BLOCK_BYTES);
        assert_eq!(Layout::new(8 * gib + 1).block_bytes(), 2 * BLOCK_BYTES);
        let big = Layout::new(50_000_000_000);
        assert!(big.count() as u64 <= MAX_BLOCKS);
        assert_eq!(big.block_bytes(), 2 << 20);
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
