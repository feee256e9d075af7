//! Conversions between bao-tree's [`ChunkRanges`] and the wire's [`ChunkSpans`], and the few
//! range questions the store and scheduler ask.

use bao_tree::{ChunkNum, ChunkRanges};
use mesh_proto::wire::{ChunkSpan, ChunkSpans};

/// The chunks of a blob of `size` bytes (at least one, for the empty blob's single leaf).
pub fn all_chunks(size: u64) -> ChunkRanges {
    ChunkRanges::from(ChunkNum(0)..chunk_count(size))
}

/// The number of 1 KiB chunks in `size` bytes (the empty blob has one empty chunk).
pub fn chunk_count(size: u64) -> ChunkNum {
    ChunkNum(size.div_ceil(mesh_proto::CHUNK_BYTES).max(1))
}

/// `ranges` as wire spans, with an unbounded tail cut at the blob's end.
pub fn to_spans(ranges: &ChunkRanges, size: u64) -> ChunkSpans {
    let ranges = ranges & &all_chunks(size);
    let spans = ranges
        .boundaries()
        .chunks(2)
        .map(|pair| ChunkSpan {
            start: pair[0].0,
            end: pair[1].0,
        })
        .collect();
    ChunkSpans::new(spans).expect("a range set's boundaries are sorted and disjoint")
}

/// Wire spans as a range set, cut at the blob's end.
pub fn from_spans(spans: &ChunkSpans, size: u64) -> ChunkRanges {
    let mut out = ChunkRanges::empty();
    for span in spans.spans() {
        out |= ChunkRanges::from(ChunkNum(span.start)..ChunkNum(span.end));
    }
    out & all_chunks(size)
}

/// The number of data bytes `ranges` covers in a blob of `size` bytes.
pub fn byte_len(ranges: &ChunkRanges, size: u64) -> u64 {
    let ranges = ranges & &all_chunks(size);
    ranges
        .boundaries()
        .chunks(2)
        .map(|pair| (pair[1].to_bytes().min(size)) - pair[0].to_bytes().min(size))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_round_trip_and_cut_at_end() {
        let size = 10 * 1024 + 1; // 11 chunks, the last one 1 byte
        let ranges = ChunkRanges::from(ChunkNum(2)..ChunkNum(4)) | ChunkRanges::from(ChunkNum(8)..);
        let spans = to_spans(&ranges, size);
        assert_eq!(
            spans.spans(),
            &[
                ChunkSpan { start: 2, end: 4 },
                ChunkSpan { start: 8, end: 11 }
            ]
        );
        assert_eq!(from_spans(&spans, size), &ranges & &all_chunks(size));
        assert_eq!(byte_len(&ranges, size), 2 * 1024 + 2 * 1024 + 1);
        assert_eq!(byte_len(&all_chunks(0), 0), 0);
        assert_eq!(byte_len(&all_chunks(size), size), size);
    }
}
