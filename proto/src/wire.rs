//! The mesh protocol, spoken over QUIC.
//!
//! # Participants
//! Nodes. Every node both serves (provider) and fetches (getter); a connection is symmetric
//! once it is authenticated.
//!
//! # Goals
//! - Only members of one mesh (holders of the same mesh key) learn anything from each other.
//! - Many range requests run at once on one connection, one QUIC stream each, so a slow range
//!   never blocks another.
//! - A provider may hold only part of a blob and says which ranges it sends.
//! - Every byte of blob data is verifiable against its BLAKE3 root as it arrives.
//!
//! # Non-goals
//! Confidentiality beyond TLS 1.3, and NAT traversal: mesh is for LANs.
//!
//! # Connection set-up
//! The dialer opens one bidirectional stream and sends a [`Hello`]; the listener checks its
//! [`Hello::proof`] and answers with its own. Each proof is a keyed BLAKE3 hash of the TLS
//! session's exported keying material, so it cannot be replayed into another session or
//! relayed by a man in the middle. A wrong proof closes the connection with
//! [`CLOSE_AUTH_FAILED`] before any request is read.
//!
//! # Requests
//! Every further stream is one request: the dialer of the stream writes one [`Request`] frame
//! and finishes its side; the other side writes one [`Response`] frame, followed for
//! [`Request::Get`] by the bao-encoded ranges it named in [`Response::Get`].
//!
//! [`Request::Subscribe`] is the exception: its answer is a stream of [`Response::Have`]
//! frames, so a peer that is itself downloading advertises each piece as it verifies it.
//!
//! A frame is a little-endian `u32` length followed by that many bytes of postcard.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{Hash, ModelRef};

/// The ALPN protocol id; bump the suffix on any incompatible change.
pub const ALPN: &[u8] = b"mesh/1";
/// The protocol version carried in [`Hello`].
pub const VERSION: u32 = 1;
/// The largest frame either side accepts (manifests of very large repos fit easily).
pub const MAX_FRAME_BYTES: u32 = 16 << 20;
/// Bytes of TLS keying material a membership proof covers.
pub const EXPORTER_BYTES: usize = 32;
/// The TLS exporter label for membership proofs.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-mesh-membership";

/// Connection close code: the peer's membership proof was wrong (a different mesh key).
pub const CLOSE_AUTH_FAILED: u32 = 1;
/// Connection close code: the peer broke the protocol.
pub const CLOSE_PROTOCOL: u32 = 2;
/// Connection close code: the node is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 3;
/// Connection close code: the two nodes also hold another connection, which they keep.
pub const CLOSE_DUPLICATE: u32 = 4;
/// Stream reset code: the provider's copy of the blob failed its own verification.
pub const RESET_SOURCE_CORRUPT: u32 = 16;
/// Stream reset code: the provider hit a local I/O error.
pub const RESET_IO: u32 = 17;
/// Stream reset code: chunks the provider promised while it was fetching them did not arrive
/// (its own fetch failed or stalled).
pub const RESET_UNAVAILABLE: u32 = 18;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix is over [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(u32),
    /// The body is not the expected message.
    #[error("malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
}

/// Which end of a connection a proof speaks for, so the two proofs differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The side that opened the connection.
    Dialer,
    /// The side that accepted it.
    Listener,
}

/// The first message each way on a new connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`VERSION`] of the sender.
    pub version: u32,
    /// [`membership_proof`] for the sender's role.
    pub proof: [u8; 32],
}

/// A half-open range of chunk numbers (1 KiB units), as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkSpan {
    /// First chunk.
    pub start: u64,
    /// One past the last chunk.
    pub end: u64,
}

/// Sorted, non-empty, non-overlapping, non-adjacent chunk spans.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChunkSpans(Vec<ChunkSpan>);

/// Chunk spans that are unsorted, empty, overlapping or adjacent.
#[derive(Debug, thiserror::Error)]
#[error("chunk ranges must be sorted, non-empty and disjoint")]
pub struct BadSpans;

impl ChunkSpans {
    /// Checks and wraps `spans`.
    pub fn new(spans: Vec<ChunkSpan>) -> Result<Self, BadSpans> {
        let sorted = spans.iter().all(|s| s.start < s.end)
            && spans.windows(2).all(|w| w[0].end < w[1].start);
        if sorted {
            Ok(Self(spans))
        } else {
            Err(BadSpans)
        }
    }

    /// The spans.
    pub fn spans(&self) -> &[ChunkSpan] {
        &self.0
    }

    /// Whether no chunk is covered.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de> Deserialize<'de> for ChunkSpans {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::new(Vec::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// One request, one per stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// Bao-encoded ranges of a blob.
    Get {
        /// The blob.
        hash: Hash,
        /// The chunks wanted; the provider sends those it holds or is fetching.
        ranges: ChunkSpans,
    },
    /// Which chunks of a blob the provider holds.
    Have {
        /// The blob.
        hash: Hash,
    },
    /// A model's manifest, by id or name.
    Manifest(ModelRef),
    /// The models the provider holds.
    Models,
    /// Which chunks of a blob the provider holds, now and as it verifies more: the answer is
    /// a stream of [`Response::Have`] frames, the first with everything held, each later one
    /// with only what was added. The provider finishes the stream once it holds the whole blob.
    Subscribe {
        /// The blob.
        hash: Hash,
    },
    /// Like [`Request::Subscribe`], for a HuggingFace file still being assembled (its BLAKE3
    /// root is not known yet): a stream of [`Response::HubHave`] frames.
    HubSubscribe {
        /// The file's HuggingFace etag.
        etag: String,
    },
    /// The raw bytes of one piece of a HuggingFace file still being assembled. They are not
    /// verifiable until the whole file is: only mesh members can be asked.
    HubGet {
        /// The file's HuggingFace etag.
        etag: String,
        /// The piece index ([`crate::PIECE_BYTES`] each).
        piece: u32,
    },
}

/// A model as listed by [`Request::Models`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSummary {
    /// The model id.
    pub id: Hash,
    /// Its name.
    pub name: String,
    /// Total bytes.
    pub size: u64,
    /// Whether every file is complete here.
    pub complete: bool,
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The provider does not hold that blob or model.
    NotFound,
    /// The provider's copy changed on disk or failed verification; it stopped serving it.
    SourceChanged,
    /// The request was malformed.
    BadRequest,
    /// A local error on the provider.
    Internal,
}

/// The answer to one [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Response {
    /// The request was refused.
    Error(ErrorCode),
    /// The provider will now send these ranges (the requested ones it holds or is fetching),
    /// bao-encoded. Chunks it is still fetching follow as it verifies them; if its own fetch
    /// fails it resets the stream with [`RESET_UNAVAILABLE`] after what it could send.
    Get {
        /// Blob size in bytes, as the provider knows it.
        size: u64,
        /// What follows.
        ranges: ChunkSpans,
    },
    /// The chunks held.
    Have {
        /// Blob size in bytes.
        size: u64,
        /// The chunks held (for a subscription after the first frame: the chunks added).
        ranges: ChunkSpans,
        /// The chunks the provider is fetching right now, in full (each frame replaces the
        /// last). Peers avoid asking a seed for pieces another peer is already bringing in, and
        /// may ask the provider for them: it passes them on as they arrive.
        pending: ChunkSpans,
        /// The provider's random id for its download of this blob (0 if it is not downloading
        /// it). Downloaders split the pieces only seeds hold by rendezvous hash over these ids,
        /// so a seed sends each piece once.
        node: u64,
    },
    /// What a node holds of a HuggingFace file it is assembling (full sets each time).
    HubHave {
        /// The sender's random node id, for splitting HuggingFace work.
        node: u64,
        /// File size.
        size: u64,
        /// Pieces held (as spans of piece indices).
        have: ChunkSpans,
        /// Pieces being fetched right now.
        pending: ChunkSpans,
    },
    /// One piece follows: this many raw bytes.
    HubPiece {
        /// Bytes that follow the frame.
        len: u64,
    },
    /// The manifest's canonical bytes; the receiver checks them against the id it wanted.
    Manifest(Vec<u8>),
    /// The models held.
    Models(Vec<ModelSummary>),
}

/// The membership proof one side sends: a keyed hash of the TLS exporter and its role.
///
/// `mesh_key` is `None` in open mode; open nodes can then talk only to other open nodes.
pub fn membership_proof(
    mesh_key: Option<&str>,
    exporter: &[u8; EXPORTER_BYTES],
    role: Role,
) -> [u8; 32] {
    let key_material = match mesh_key {
        Some(key) => [b"key:".as_slice(), key.as_bytes()].concat(),
        None => b"open".to_vec(),
    };
    let key = blake3::derive_key("mesh 2026-11 membership proof v1", &key_material);
    let mut hasher = blake3::Hasher::new_keyed(&key);
    hasher.update(match role {
        Role::Dialer => b"dialer",
        Role::Listener => b"listener",
    });
    hasher.update(exporter);
    *hasher.finalize().as_bytes()
}

/// Checks a received proof in constant time.
pub fn verify_proof(
    mesh_key: Option<&str>,
    exporter: &[u8; EXPORTER_BYTES],
    role: Role,
    proof: &[u8; 32],
) -> bool {
    // blake3::Hash's PartialEq is constant-time.
    blake3::Hash::from_bytes(membership_proof(mesh_key, exporter, role))
        == blake3::Hash::from_bytes(*proof)
}

/// Encodes `msg` as a frame: length prefix and postcard body.
pub fn encode_frame<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = postcard::to_allocvec(msg).expect("encoding to a Vec cannot fail");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Checks a frame's length prefix and returns the body length to read.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix);
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len as usize)
}

/// Decodes a frame body.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(postcard::from_bytes(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        let req = Request::Get {
            hash: Hash::of(b"x"),
            ranges: ChunkSpans::new(vec![ChunkSpan { start: 0, end: 16 }]).unwrap(),
        };
        let frame = encode_frame(&req);
        let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        assert_eq!(decode_body::<Request>(&frame[4..]).unwrap(), req);
        assert!(frame_len((MAX_FRAME_BYTES + 1).to_le_bytes()).is_err());
        assert!(decode_body::<Request>(&[0xff, 0xff, 0xff]).is_err());
        assert!(decode_body::<Request>(&frame[4..frame.len() - 1]).is_err());
    }

    #[test]
    fn spans_must_be_sorted_and_disjoint() {
        let span = |start, end| ChunkSpan { start, end };
        assert!(ChunkSpans::new(vec![span(0, 4), span(8, 9)]).is_ok());
        assert!(ChunkSpans::new(vec![span(4, 4)]).is_err());
        assert!(ChunkSpans::new(vec![span(0, 4), span(4, 8)]).is_err());
        assert!(ChunkSpans::new(vec![span(8, 9), span(0, 4)]).is_err());
        // The same checks hold for bytes off the wire.
        let raw = postcard::to_allocvec(&vec![span(8, 9), span(0, 4)]).unwrap();
        assert!(postcard::from_bytes::<ChunkSpans>(&raw).is_err());
    }

    #[test]
    fn proofs_depend_on_key_session_and_role() {
        let ex = [7u8; EXPORTER_BYTES];
        let p = membership_proof(Some("k"), &ex, Role::Dialer);
        assert!(verify_proof(Some("k"), &ex, Role::Dialer, &p));
        assert!(!verify_proof(Some("other"), &ex, Role::Dialer, &p));
        assert!(!verify_proof(None, &ex, Role::Dialer, &p));
        assert!(!verify_proof(
            Some("k"),
            &[8u8; EXPORTER_BYTES],
            Role::Dialer,
            &p
        ));
        assert!(!verify_proof(Some("k"), &ex, Role::Listener, &p));
        let open = membership_proof(None, &ex, Role::Listener);
        assert!(verify_proof(None, &ex, Role::Listener, &open));
    }
}
