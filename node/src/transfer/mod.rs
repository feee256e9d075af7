//! Moving blob bytes between nodes: [`provider`] answers requests on accepted connections,
//! [`get`] asks for ranges and writes what verifies.

pub mod get;
pub mod provider;

/// Buffer between bao-tree's synchronous encoder/decoder and a QUIC stream.
const STREAM_BUFFER: usize = 256 << 10;
