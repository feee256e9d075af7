//! Moving bytes between nodes, one request each way: [`provider`] answers requests on accepted
//! connections, [`get`] asks for verified ranges of a blob and writes what verifies, and
//! [`pieces`] moves raw pieces of a file that is still being assembled from an origin.

pub mod get;
mod io;
pub mod pieces;
pub mod provider;

/// Bytes a provider queues before handing them to quinn (unless it passes on chunks it is
/// still fetching: then each leaf goes out at once).
const STREAM_BUFFER: usize = 256 << 10;
