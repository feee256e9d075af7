//! Helpers for mesh's integration tests: real `mesh` processes, real sockets.
//!
//! The tests run the release binary built by `cargo build --release` (or `MESH_BIN`); see
//! README.md for the one command that builds it and runs them.

pub mod netlab;
pub mod prereq;
pub mod util;
