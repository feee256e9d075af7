//! The mesh node as a library.
#![warn(missing_docs)]

pub mod ranges;
pub mod store;
