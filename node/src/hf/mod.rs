//! HuggingFace: the Hub client ([`hub`]: metadata, range downloads, the hashes that make a
//! downloaded file trustworthy; a file at a commit is a `swarm::origin::RangeOrigin`, so the
//! fleet splits its pieces), and the HuggingFace cache in both directions: models already in
//! it are served in place ([`cache_in`]), fetched models are linked into it ([`cache_out`]).
//!
//! HuggingFace conventions honoured: `HF_ENDPOINT`, `HF_TOKEN`, the token file, `HF_HOME`,
//! `HF_HUB_CACHE` and `HF_HUB_OFFLINE`.

pub mod cache_in;
pub mod cache_out;
pub mod hub;

pub use self::hub::{Hub, HubError, HubFile, HubRange, RepoInfo, RepoRef};
