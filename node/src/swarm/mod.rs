//! The block scheduler: one set of files from many peers at once.
//!
//! Files are requested in 256 KiB blocks ([`layout`]; bigger for files over 8 GiB, so that no
//! file has more than 32,768). Every peer streams what it holds of each file
//! ([`Request::Subscribe`](mesh_proto::wire::Request::Subscribe)) as it verifies it, with the
//! blocks it is fetching right now from a peer that holds them (its *pending* blocks), so the
//! scheduler always knows who has what.
//!
//! - [`policy`]: every decision (which block from which peer, when to duplicate, whom to ban),
//!   as a state machine with no I/O, unit-tested with explicit time;
//! - [`driver`]: the async side, which runs subscriptions and requests over the peers'
//!   connections and feeds the policy;
//! - [`origin`]: the other scheduler, for a file that comes from outside the mesh: the nodes
//!   fetching it split the origin's pieces between them and swap the rest.
//!
//! Blocks are smaller than the 1 MiB pieces of the design because blocks held whole are still
//! store-and-forward: every hop waits for the whole block (ARCHITECTURE.md has the
//! measurements).

mod driver;
pub(crate) mod layout;
pub mod origin;
mod policy;

use std::{
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc},
};

use mesh_proto::RelPath;
use tokio::sync::watch;

use crate::{
    discovery::{Connections, Peers},
    limits::Limits,
    metrics::Metrics,
    store::{PartialBlob, StoreError},
    transfer::get::GetError,
};

/// One file to download.
#[derive(Debug)]
pub struct FileJob {
    /// Its path in the model, for errors.
    pub path: RelPath,
    /// The blob being written.
    pub partial: Arc<PartialBlob>,
    /// Verified bytes present, for progress bars.
    pub progress: Arc<AtomicU64>,
}

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DownloadError {
    /// No peer could provide some block of this file.
    #[error("no peer could provide {path}: {cause}")]
    NoSource {
        /// The file.
        path: RelPath,
        /// Why not.
        cause: NoSource,
    },
    /// Writing to the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why no peer could provide a file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NoSource {
    /// Peers were there, but none holds or fetches what is missing.
    #[error("no connected peer has it")]
    NotOffered,
    /// Every peer is banned, or there is none.
    #[error("no usable peer")]
    NoUsablePeer,
    /// The last (most telling) request failure.
    #[error(transparent)]
    Failed(Box<GetError>),
}

impl DownloadError {
    /// Whether the download failed because a peer sent data that failed verification.
    pub fn is_bad_data(&self) -> bool {
        matches!(self, Self::NoSource { cause: NoSource::Failed(e), .. } if e.is_bad_data())
    }
}

/// Downloads every missing block of `jobs` from the peers in `conns` (which may change while
/// it runs), each request waiting for its bytes to fit `limits` (`max_download`). Returns the
/// peers that delivered data.
pub async fn download(
    jobs: Vec<FileJob>,
    conns: watch::Receiver<Connections>,
    peers: Peers,
    metrics: Arc<Metrics>,
    limits: Limits,
) -> Result<Vec<SocketAddr>, DownloadError> {
    driver::run(jobs, conns, peers, metrics, limits).await
}
