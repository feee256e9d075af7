//! The mesh node as a library: everything `mesh` does is a call into this crate.
//!
//! # Layout
//! - [`store`]: blobs, outboards, partial downloads and the redb metadata database.
//! - [`net`]: the QUIC endpoint, TLS identities and the mesh-key handshake.
//! - [`transfer`]: serving range requests ([`transfer::provider`]) and fetching them
//!   ([`transfer::get`]), both verified with bao-tree.
//! - [`fetch`]: the `mesh fetch` pipeline: resolve, schedule segments across peers, materialize.
//! - [`node`]: the long-running node that wires these together; [`api`]: its local HTTP API.
//! - [`metrics`]: counters; [`ranges`]: chunk range helpers; [`config`]: the TOML config file.
#![warn(missing_docs)]

pub mod api;
pub mod catalog;
pub mod config;
pub mod discovery;
pub mod fetch;
pub mod hf_api;
pub mod hf_cache;
pub mod hf_import;
pub mod hub;
pub mod hub_fetch;
pub mod hub_swarm;
pub mod metrics;
pub mod net;
pub mod node;
pub mod peers;
pub mod ranges;
pub mod store;
pub mod swarm;
pub mod transfer;
