//! HuggingFace: what a repo is ([`repo`]: references, revisions, files and their published
//! hashes), the Hub client ([`hub`]: metadata, range and resumable downloads, with timeouts
//! and retries from [`retry`]), the Hub's metadata kept in the store so it answers offline
//! ([`meta`]), a file at a commit as an origin the fleet splits ([`range`]), and the
//! HuggingFace cache in both directions: models already in it are served in place
//! ([`cache_in`]), fetched models are linked into it ([`cache_out`]).
//!
//! HuggingFace conventions honoured: `HF_ENDPOINT`, `HF_TOKEN`, the token file, `HF_HOME`,
//! `HF_HUB_CACHE` and `HF_HUB_OFFLINE`.

pub mod cache_in;
pub mod cache_out;
pub mod hub;
pub mod meta;
pub mod range;
pub mod repo;
mod retry;

pub use self::{
    hub::{Answer, Auth, Hub, HubError},
    range::HubRange,
    repo::{is_commit, HubFile, RepoInfo, RepoRef},
};
