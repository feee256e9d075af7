//! What `mesh fetch --dry-run` shows: each file, its size, and where it would come from.

use serde::{Deserialize, Serialize};

/// Where one file of a fetch comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// A file of the right size is at its final path: it is hashed and, if it matches,
    /// adopted in place (else fetched from the next source).
    Adopt,
    /// Already at its final path, verified and served from there.
    InPlace,
    /// Already in the local store, verified.
    Local,
    /// A LAN peer (for a published model: one holding the same repo at the same commit).
    Peer,
    /// HuggingFace.
    Hf,
    /// The Ollama registry (`OLLAMA_REGISTRY`, else the host in the model name).
    Registry,
}

/// One line of `mesh fetch --dry-run`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanEntry {
    /// The file's path in the model.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// Where it would come from.
    pub origin: Origin,
}
