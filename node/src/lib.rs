//! The mesh node as a library: everything `mesh` does is a call into this crate.
//!
//! # Layout
//! One folder per concern. A module uses only those below it, never those above:
//!
//! | layer | module | what it owns |
//! |---|---|---|
//! | 1 | [`node`], [`local`], [`config`], [`service`] | wiring a node; the node a command talks to; the config file; the systemd unit |
//! | 2 | [`api`] | the local HTTP API, its client, and the HuggingFace-compatible endpoint |
//! | 3 | [`fetch`] | resolve a name, plan sources, drive the swarm, materialize into targets |
//! | 4 | [`hf`], [`ollama`] | the Hub client, HF cache in and out; the Ollama store in and out, its registry |
//! | 5 | [`swarm`] | the block scheduler: a pure policy and its async driver |
//! | 6 | [`transfer`] | one request each way: serve ([`transfer::provider`]), fetch and verify |
//! | 7 | [`discovery`] | where peer addresses come from (mDNS, `--peer`, bootstrap) and the peer set |
//! | 8 | [`net`] | the QUIC endpoint, the membership handshake, frames |
//! | 9 | [`store`] | blobs, outboards, partial downloads (mesh and HF pieces), redb metadata |
//! | 10 | [`metrics`], [`limits`], [`rooted`] | counters every layer bumps; rate limits and HF hours every layer awaits; a folder nothing is written outside of |
//!
//! Wire types and formats live in the `mesh-proto` crate, below all of these.
//!
//! Where to add things: a way to find peers is a source in [`discovery`]; a place to put files
//! (an app's folder layout) is a [`fetch::Layout`]; a place bytes come from (a mirror, a
//! registry) is a source in `fetch::sources` beside HuggingFace.
#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod discovery;
pub mod fetch;
pub mod hf;
pub mod limits;
pub mod local;
pub mod metrics;
pub mod net;
pub mod node;
pub mod ollama;
pub mod rooted;
pub mod service;
pub mod store;
pub mod swarm;
pub mod transfer;
