//! Wire types and formats for mesh: hashes, model manifests, request/response frames and the
//! membership proof. Nothing here does I/O, reads a clock or spawns a task, so every decoder can
//! be tested (and fuzzed) on plain byte slices.
//!
//! # Layout
//! - [`hash`]: the [`Hash`] newtype (a BLAKE3 root) and its text forms.
//! - [`manifest`]: [`Manifest`], [`RelPath`] and the rules that keep a peer's manifest inside
//!   the target folder.
//! - [`wire`]: the QUIC protocol: ALPN, [`wire::Request`], [`wire::Response`], error codes,
//!   length-prefixed frames and the membership proof.
#![warn(missing_docs)]

pub mod hash;
pub mod manifest;
pub mod wire;

pub use hash::Hash;
pub use manifest::{FileEntry, Manifest, ManifestError, ModelRef, RelPath, Source};

/// Bytes in one BLAKE3 chunk.
pub const CHUNK_BYTES: u64 = 1024;
/// log2 of the chunks in one chunk group: 2^4 chunks = 16 KiB, the unit bao-tree verifies.
pub const CHUNK_GROUP_LOG: u8 = 4;
/// Bytes in one chunk group (16 KiB).
pub const CHUNK_GROUP_BYTES: u64 = CHUNK_BYTES << CHUNK_GROUP_LOG;
/// Bytes in one piece (1 MiB): the unit peers schedule, request and advertise.
pub const PIECE_BYTES: u64 = 1 << 20;
