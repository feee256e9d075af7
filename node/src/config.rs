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
    /// Upload limit, bytes per second (a number, or `"50MB"`).
    pub max_upload: Option<Bytes>,
    /// Download limit of the whole node, bytes per second (a number, or `"50MB"`).
    pub max_download: Option<Bytes>,
    /// HuggingFace download limit (the uplink), bytes per second (a number, or `"20MB"`).
    pub max_hf_download: Option<Bytes>,
    /// Hours (local time) HuggingFace may be used: `"18:00-07:00"`.
    pub hf_hours: Option<String>,
    /// Store quota: least recently used unpinned models are evicted to stay under it
    /// (a number of bytes, or `"200GB"`).
    pub max_store: Option<Bytes>,
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

/// A byte count or rate in the config file: a number, or a string with a unit (`"200GB"`,
/// `"50MB"`, `"512MiB"`; see [`crate::limits::parse_bytes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Self(n)),
            Raw::Text(t) => crate::limits::parse_bytes(&t)
                .map(Self)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_take_numbers_or_units() {
        let c: ConfigFile = toml::from_str(
            "max_store = \"200GB\"\nmax_upload = 5000\nmax_hf_download = \"20MB\"\nhf_hours = \"18:00-07:00\"",
        )
        .unwrap();
        assert_eq!(c.max_store, Some(Bytes(200_000_000_000)));
        assert_eq!(c.max_upload, Some(Bytes(5000)));
        assert_eq!(c.max_hf_download, Some(Bytes(20_000_000)));
        assert!(toml::from_str::<ConfigFile>("max_store = \"lots\"").is_err());
    }
}
