//! Moving bytes between nodes, one request each way: [`provider`] answers requests on accepted
//! connections, [`get`] asks for verified ranges of a blob and writes what verifies, and
//! [`pieces`] moves raw pieces of a file that is still being assembled from an origin.

pub mod get;
pub mod pieces;
pub mod provider;

/// Buffer between bao-tree's synchronous encoder/decoder and a QUIC stream.
const STREAM_BUFFER: usize = 256 << 10;
