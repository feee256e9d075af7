//! BLAKE3 roots and bao-tree post-order outboards, built on all cores or piece by piece.
//!
//! Subtrees of the BLAKE3 tree are independent and their parent pairs have known places in a
//! post-order outboard, so a whole file is hashed by subtrees on all cores (rayon), one
//! [`LEAF_TASK_BYTES`] buffer per thread in memory ([`outboard_post_order`]); and a file that
//! arrives in aligned pieces of a power-of-two size (HuggingFace pieces) is hashed piece by
//! piece as they come, in any order, leaving only the pairs above the pieces for the end
//! ([`PieceOutboard`]).

use std::{fs, io, os::unix::fs::FileExt, path::PathBuf};

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use mesh_proto::Hash;

use super::BLOCK_SIZE;

/// Subtrees up to this size are hashed by one thread from one buffer; larger ones split.
const LEAF_TASK_BYTES: u64 = 16 << 20;

/// Writes the post-order outboard of `data` (its first `size` bytes) to `outboard` and returns
/// the BLAKE3 root. Byte-identical to bao-tree's own `outboard_post_order`, but parallel.
pub(crate) fn outboard_post_order(
    data: &fs::File,
    size: u64,
    outboard: &fs::File,
) -> io::Result<Hash> {
    let tree = bao_tree::BaoTree::new(size, BLOCK_SIZE);
    outboard.set_len(tree.outboard_size())?;
    let leaf = |span: Span| {
        let mut buf = vec![0u8; span.len as usize];
        data.read_exact_at(&mut buf, span.start)?;
        let mut pairs = Vec::with_capacity(Span::pair_count(span.len) as usize * 64);
        let cv = span.hash_buf(&buf, span.len == size, &mut pairs);
        outboard.write_all_at(&pairs, span.pair_index * 64)?;
        Ok(cv)
    };
    let root = Span::whole(size).walk(true, LEAF_TASK_BYTES, &leaf, outboard)?;
    Ok(Hash::from(*root.as_bytes()))
}

/// The outboard of a file that arrives in pieces of `piece_bytes` (a power of two, a multiple
/// of the chunk group, aligned): each piece's pairs are written as it comes
/// ([`PieceOutboard::add`]), the pairs above the pieces at the end ([`PieceOutboard::finish`]).
/// For a file of more than one piece (one piece is the whole tree: hash it whole).
#[derive(Debug)]
pub struct PieceOutboard {
    outboard: fs::File,
    /// Where `outboard` is (a temporary name until the store takes the file).
    path: PathBuf,
    size: u64,
    piece_bytes: u64,
    /// Each piece's chaining value, once added.
    cvs: Vec<Option<blake3::Hash>>,
}

impl PieceOutboard {
    /// Builds into `outboard`, the file at `path` (emptied and sized here).
    pub(crate) fn new(
        outboard: fs::File,
        path: PathBuf,
        size: u64,
        piece_bytes: u64,
    ) -> io::Result<Self> {
        assert!(
            piece_bytes.is_power_of_two() && piece_bytes.is_multiple_of(BLOCK_SIZE.bytes() as u64)
        );
        assert!(size > piece_bytes, "a one-piece file is hashed whole");
        outboard.set_len(0)?;
        outboard.set_len(bao_tree::BaoTree::new(size, BLOCK_SIZE).outboard_size())?;
        let pieces = size.div_ceil(piece_bytes) as usize;
        Ok(Self {
            outboard,
            path,
            size,
            piece_bytes,
            cvs: vec![None; pieces],
        })
    }

    /// Hashes piece `piece` (its bytes) and writes its pairs.
    pub fn add(&mut self, piece: usize, bytes: &[u8]) -> io::Result<()> {
        let start = piece as u64 * self.piece_bytes;
        let len = self.piece_bytes.min(self.size - start);
        if bytes.len() as u64 != len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "piece of the wrong length",
            ));
        }
        let span = Span::at(start, len);
        let mut pairs = Vec::with_capacity(Span::pair_count(len) as usize * 64);
        let cv = span.hash_buf(bytes, false, &mut pairs);
        self.outboard.write_all_at(&pairs, span.pair_index * 64)?;
        self.cvs[piece] = Some(cv);
        Ok(())
    }

    /// Writes the pairs above the pieces, syncs the outboard and returns the BLAKE3 root and
    /// the outboard's path, once every piece was added.
    pub fn finish(mut self) -> io::Result<(Hash, PathBuf)> {
        let leaf = |span: Span| {
            self.cvs[(span.start / self.piece_bytes) as usize]
                .ok_or_else(|| io::Error::other("a piece was not hashed"))
        };
        let root = Span::whole(self.size).walk(true, self.piece_bytes, &leaf, &self.outboard)?;
        self.outboard.sync_all()?;
        Ok((Hash::from(*root.as_bytes()), std::mem::take(&mut self.path)))
    }
}

impl Drop for PieceOutboard {
    /// An outboard never finished (the download failed, or its file did not match) is removed.
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A subtree of the BLAKE3 tree: where its bytes start, how many, and where its parent pairs
/// go in the post-order outboard.
#[derive(Clone, Copy, Debug)]
struct Span {
    /// Byte offset of the subtree's first byte.
    start: u64,
    /// Its length in bytes.
    len: u64,
    /// Index (in 64-byte pairs) of its first pair in the post-order outboard.
    pair_index: u64,
}

impl Span {
    fn whole(size: u64) -> Self {
        Self {
            start: 0,
            len: size,
            pair_index: 0,
        }
    }

    /// The subtree of `len` bytes at `start`, which is aligned to a power of two at least as
    /// large as `len`'s subtree. In post-order, every pair of the subtrees wholly left of it
    /// comes first: with `b` chunk groups before it, `b - popcount(b)` pairs.
    fn at(start: u64, len: u64) -> Self {
        let b = start / BLOCK_SIZE.bytes() as u64;
        Self {
            start,
            len,
            pair_index: b - u64::from(b.count_ones()),
        }
    }

    /// Pairs a subtree of `len` bytes stores: one per chunk group boundary.
    fn pair_count(len: u64) -> u64 {
        len.div_ceil(BLOCK_SIZE.bytes() as u64).max(1) - 1
    }

    fn split(self) -> (Self, Self) {
        let left_len = left_subtree_len(self.len);
        let left = Self {
            len: left_len,
            ..self
        };
        let right = Self {
            start: self.start + left_len,
            len: self.len - left_len,
            pair_index: self.pair_index + Self::pair_count(left_len),
        };
        (left, right)
    }

    /// The chaining value (or root hash) of this subtree: `leaf` for subtrees of up to
    /// `leaf_bytes`, split in two (on all cores) above that, writing each split's pair.
    fn walk<F>(
        self,
        is_root: bool,
        leaf_bytes: u64,
        leaf: &F,
        outboard: &fs::File,
    ) -> io::Result<blake3::Hash>
    where
        F: Fn(Self) -> io::Result<blake3::Hash> + Sync,
    {
        if self.len <= leaf_bytes {
            return leaf(self);
        }
        let (left, right) = self.split();
        let (l, r) = rayon::join(
            || left.walk(false, leaf_bytes, leaf, outboard),
            || right.walk(false, leaf_bytes, leaf, outboard),
        );
        let (l, r) = (l?, r?);
        let own_index = self.pair_index + Self::pair_count(self.len) - 1;
        outboard.write_all_at(&join_pair(&l, &r), own_index * 64)?;
        Ok(merge(&l, &r, is_root))
    }

    /// Hashes this subtree's bytes `buf` in memory, appending its pairs in post-order.
    fn hash_buf(&self, buf: &[u8], is_root: bool, pairs: &mut Vec<u8>) -> blake3::Hash {
        if buf.len() as u64 <= BLOCK_SIZE.bytes() as u64 {
            if is_root {
                return blake3::hash(buf);
            }
            let mut hasher = blake3::Hasher::new();
            hasher.set_input_offset(self.start);
            hasher.update(buf);
            return blake3::Hash::from(hasher.finalize_non_root());
        }
        let (left, right) = self.split();
        let mid = left.len as usize;
        let l = left.hash_buf(&buf[..mid], false, pairs);
        let r = right.hash_buf(&buf[mid..], false, pairs);
        pairs.extend_from_slice(&join_pair(&l, &r));
        merge(&l, &r, is_root)
    }
}

fn join_pair(l: &blake3::Hash, r: &blake3::Hash) -> [u8; 64] {
    let mut pair = [0u8; 64];
    pair[..32].copy_from_slice(l.as_bytes());
    pair[32..].copy_from_slice(r.as_bytes());
    pair
}

fn merge(l: &blake3::Hash, r: &blake3::Hash, is_root: bool) -> blake3::Hash {
    let (l, r): (ChainingValue, ChainingValue) = (*l.as_bytes(), *r.as_bytes());
    if is_root {
        merge_subtrees_root(&l, &r, Mode::Hash)
    } else {
        blake3::Hash::from(merge_subtrees_non_root(&l, &r, Mode::Hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Piece by piece, in any order, gives the same root and outboard bytes as hashing whole.
    #[test]
    fn pieces_in_any_order_give_the_whole_files_outboard() {
        const PIECE: u64 = 64 << 10;
        let block = BLOCK_SIZE.bytes() as u64;
        for size in [
            PIECE + 1,
            2 * PIECE,
            3 * PIECE + block,
            5 * PIECE + 17,
            8 * PIECE,
            9 * PIECE - 1,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let bytes: Vec<u8> = (0..size).map(|i| (i * 31 % 253) as u8).collect();
            let data = dir.path().join("data");
            fs::write(&data, &bytes).unwrap();
            let whole_ob = fs::File::create_new(dir.path().join("whole")).unwrap();
            let whole =
                outboard_post_order(&fs::File::open(&data).unwrap(), size, &whole_ob).unwrap();
            let piece_path = dir.path().join("pieces");
            let piece_ob = fs::File::create_new(&piece_path).unwrap();
            let mut builder = PieceOutboard::new(piece_ob, piece_path, size, PIECE).unwrap();
            let pieces: Vec<usize> = (0..size.div_ceil(PIECE) as usize).rev().collect();
            for &p in pieces
                .iter()
                .step_by(2)
                .chain(pieces.iter().skip(1).step_by(2))
            {
                let start = p as u64 * PIECE;
                let end = (start + PIECE).min(size);
                builder
                    .add(p, &bytes[start as usize..end as usize])
                    .unwrap();
            }
            assert_eq!(builder.finish().unwrap().0, whole, "root, size {size}");
            assert_eq!(
                fs::read(dir.path().join("pieces")).unwrap(),
                fs::read(dir.path().join("whole")).unwrap(),
                "outboard bytes, size {size}"
            );
        }
    }

    #[test]
    fn a_missing_piece_is_an_error_not_a_wrong_root() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ob");
        let ob = fs::File::create_new(&path).unwrap();
        let mut builder = PieceOutboard::new(ob, path, 3 << 16, 1 << 16).unwrap();
        builder.add(0, &[1u8; 1 << 16]).unwrap();
        builder.add(2, &[2u8; 1 << 16]).unwrap();
        assert!(builder.finish().is_err());
    }
}
