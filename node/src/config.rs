//! The TOML config file (`MESH_HOME/config.toml` or `--config`). Every key can also be set by
//! flag or environment variable; those win over the file.

use std::{net::SocketAddr, path::Path};

use serde::Deserialize;

/// The config file's keys; all optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The shared mesh key.
    pub mesh_key: Option<String>,
    /// QUIC listen address.
    pub listen: Option<SocketAddr>,
    /// Local API address.
    pub api: Option<SocketAddr>,
    /// Upload limit, bytes per second.
    pub max_upload: Option<u64>,
    /// Peers to keep connected besides those mDNS finds (on another subnet, say), IP:PORT.
    #[serde(default)]
    pub peers: Vec<SocketAddr>,
    /// Model aliases: short name -> HuggingFace repo and files.
    #[serde(default)]
    pub aliases: std::collections::BTreeMap<String, crate::fetch::catalog::CatalogEntry>,
    /// Materialize fetched HuggingFace models into the HF cache by default.
    #[serde(default)]
    pub hf_cache: bool,
    /// Named sets of files placed under one root (`mesh fetch BUNDLE`).
    #[serde(default)]
    pub bundles: std::collections::BTreeMap<String, crate::fetch::bundle::Bundle>,
}

/// A config file that can't be read or parsed.
#[derive(Debug, thiserror::Error)]
#[error("config file {path}: {why}")]
pub struct ConfigError {
    path: String,
    why: String,
}

impl ConfigFile {
    /// Reads `path`; a missing file is an empty config unless `required`.
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        let err = |why: String| ConfigError {
            path: path.display().to_string(),
            why,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| err(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(Self::default()),
            Err(e) => Err(err(e.to_string())),
        }
    }
}
