//! Ollama models in the mesh: the local Ollama store imported in place at node start
//! ([`store_in`]), models written into an Ollama store so `ollama list` sees them
//! ([`store_out`]), and the registry's OCI distribution API as the origin of last resort
//! ([`registry`]; a blob is a `swarm::origin::RangeOrigin`, so the fleet splits it).
//!
//! An Ollama store is `manifests/<host>/<namespace>/<model>/<tag>` (the registry's manifest
//! JSON, byte for byte) plus `blobs/sha256-<hex>`. In the mesh an Ollama model is a model named
//! `ollama:<name>:<tag>` (Ollama's shortest spelling: namespace `library` and host
//! `registry.ollama.ai` implied) whose files are exactly those store files, so materializing
//! it into a store is placing its files, blobs first and the manifest last.
//!
//! The store is `$OLLAMA_MODELS`, else `~/.ollama/models`, else
//! `/usr/share/ollama/.ollama/models` (the Linux service's); the registry is
//! `$OLLAMA_REGISTRY` (mesh's own switch, for mirrors and tests; Ollama has none), else the
//! host in the name, over https.

pub mod registry;
pub mod store_in;
pub mod store_out;

use std::path::PathBuf;

use serde::Deserialize;

use crate::{rooted::RootError, store::StoreError, swarm::origin::SplitError};

/// Ollama's default registry host.
pub const DEFAULT_HOST: &str = "registry.ollama.ai";
/// The namespace of official models.
pub const DEFAULT_NAMESPACE: &str = "library";
/// The tag when none is given.
pub const DEFAULT_TAG: &str = "latest";
/// The prefix that makes a mesh model name an Ollama one.
pub const PREFIX: &str = "ollama:";
/// The media type Ollama asks the registry for (and the only one it accepts).
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// A fully qualified Ollama model name, parsed as Ollama parses it (`types/model/name.go`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OllamaName {
    /// Registry host (with its port, if any).
    pub host: String,
    /// Namespace (`library` for official models).
    pub namespace: String,
    /// Model.
    pub model: String,
    /// Tag.
    pub tag: String,
}

impl OllamaName {
    /// Parses `[[host/]namespace/]model[:tag]` (an `ollama:` prefix is accepted).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.strip_prefix(PREFIX).unwrap_or(s);
        let (path, tag) = match (s.rfind(':'), s.rfind('/')) {
            (Some(c), slash) if slash.is_none_or(|sl| c > sl) => (&s[..c], &s[c + 1..]),
            _ => (s, DEFAULT_TAG),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (host, namespace, model) = match parts.as_slice() {
            [m] => (DEFAULT_HOST, DEFAULT_NAMESPACE, *m),
            [n, m] => (DEFAULT_HOST, *n, *m),
            [h, n, m] => (*h, *n, *m),
            _ => return None,
        };
        let name = Self {
            host: host.into(),
            namespace: namespace.into(),
            model: model.into(),
            tag: tag.into(),
        };
        name.is_valid().then_some(name)
    }

    /// The parts of `manifests/<host>/<ns>/<model>/<tag>`, if they make a valid name.
    pub fn from_parts(host: &str, namespace: &str, model: &str, tag: &str) -> Option<Self> {
        let name = Self {
            host: host.into(),
            namespace: namespace.into(),
            model: model.into(),
            tag: tag.into(),
        };
        name.is_valid().then_some(name)
    }

    fn is_valid(&self) -> bool {
        let part = |s: &str, max: usize, extra: &str| {
            let mut chars = s.chars();
            (1..=max).contains(&s.len())
                && chars
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || extra.contains(c))
        };
        part(&self.host, 350, ".:-")
            && part(&self.namespace, 80, "-")
            && part(&self.model, 80, ".-")
            && part(&self.tag, 80, ".-")
    }

    /// The mesh model name: `ollama:` and Ollama's shortest spelling.
    pub fn mesh_name(&self) -> String {
        let short = match (
            self.host == DEFAULT_HOST,
            self.namespace == DEFAULT_NAMESPACE,
        ) {
            (true, true) => format!("{}:{}", self.model, self.tag),
            (true, false) => format!("{}/{}:{}", self.namespace, self.model, self.tag),
            _ => format!(
                "{}/{}/{}:{}",
                self.host, self.namespace, self.model, self.tag
            ),
        };
        format!("{PREFIX}{short}")
    }

    /// `host/namespace/model:tag`.
    pub fn full(&self) -> String {
        format!(
            "{}/{}/{}:{}",
            self.host, self.namespace, self.model, self.tag
        )
    }

    /// The manifest's path in a store: `manifests/<host>/<ns>/<model>/<tag>`.
    pub fn manifest_path(&self) -> String {
        format!(
            "manifests/{}/{}/{}/{}",
            self.host, self.namespace, self.model, self.tag
        )
    }
}

/// The parts of a manifest mesh uses.
#[derive(Debug, Deserialize)]
struct ManifestJson {
    #[serde(default)]
    config: Option<LayerJson>,
    #[serde(default)]
    layers: Vec<LayerJson>,
}

#[derive(Debug, Deserialize)]
struct LayerJson {
    #[serde(default)]
    digest: String,
    #[serde(default)]
    size: u64,
}

/// A blob a manifest lists: its sha256 (lowercase hex) and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobRef {
    /// The sha256, lowercase hex.
    pub sha256: String,
    /// Its size.
    pub size: u64,
}

impl BlobRef {
    /// Its path in a store: `blobs/sha256-<hex>`.
    pub fn path(&self) -> String {
        format!("blobs/sha256-{}", self.sha256)
    }
}

/// The blobs a manifest needs (config, then layers, each once), checked as Ollama checks them:
/// every digest `sha256:` and 64 lowercase hex digits (an empty config digest is skipped).
pub fn manifest_blobs(bytes: &[u8]) -> Result<Vec<BlobRef>, String> {
    let json: ManifestJson = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let config = json.config.filter(|c| !c.digest.is_empty());
    let mut out: Vec<BlobRef> = Vec::new();
    for layer in config.into_iter().chain(json.layers) {
        let hex = layer
            .digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .ok_or_else(|| format!("bad digest {:?}", layer.digest))?;
        if !out.iter().any(|b| b.sha256 == hex) {
            out.push(BlobRef {
                sha256: hex.to_string(),
                size: layer.size,
            });
        }
    }
    if out.is_empty() {
        return Err("the manifest lists no blobs".into());
    }
    Ok(out)
}

/// The sha256 (hex) of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Where the local Ollama store is: `$OLLAMA_MODELS` (trimmed of spaces and quotes, as Ollama
/// does), else the first of `~/.ollama/models` and `/usr/share/ollama/.ollama/models` that
/// exists. `None` if none does.
pub fn local_store() -> Option<PathBuf> {
    if let Some(dir) = env_store() {
        return Some(dir);
    }
    let home = dirs::home_dir().map(|h| h.join(".ollama/models"));
    home.into_iter()
        .chain([PathBuf::from("/usr/share/ollama/.ollama/models")])
        .find(|p| p.is_dir())
}

/// Where `mesh fetch ollama:...` writes: the local store, else `~/.ollama/models`.
pub fn write_store() -> Option<PathBuf> {
    local_store().or_else(|| dirs::home_dir().map(|h| h.join(".ollama/models")))
}

fn env_store() -> Option<PathBuf> {
    let dir = std::env::var("OLLAMA_MODELS").ok()?;
    let dir = dir.trim().trim_matches(|c| c == '"' || c == '\'');
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// Why an Ollama operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OllamaError {
    /// Not a valid Ollama model name.
    #[error("{0:?} is not an Ollama model name ([[host/]namespace/]model[:tag])")]
    BadName(String),
    /// The registry has no such model or tag.
    #[error("the Ollama registry at {registry} has no {name}")]
    NotFound {
        /// The registry.
        registry: String,
        /// The model.
        name: String,
    },
    /// The registry wants credentials.
    #[error("the Ollama registry at {registry} refused access to {name} (mesh pulls anonymously)")]
    Unauthorized {
        /// The registry.
        registry: String,
        /// The model.
        name: String,
    },
    /// The request failed, or the answer is not what a registry sends.
    #[error("Ollama registry at {registry}: {why}")]
    Http {
        /// The registry.
        registry: String,
        /// What happened.
        why: String,
    },
    /// A blob's bytes do not hash to its digest.
    #[error("{name} does not match its sha256 (expected {expected}, got {actual}); discarded")]
    Mismatch {
        /// The blob.
        name: String,
        /// Its digest.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// The Ollama store belongs to another user.
    #[error("the Ollama store {path} belongs to uid {owner}, not to this user (uid {uid})")]
    NotWritable {
        /// The store.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Who we are.
        uid: u32,
    },
    /// A path in the store leads outside it, or can't be written.
    #[error(transparent)]
    Root(#[from] RootError),
    /// The mesh store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// File I/O.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl From<SplitError<Self>> for OllamaError {
    fn from(e: SplitError<Self>) -> Self {
        match e {
            SplitError::Origin(e) => e,
            SplitError::Io { path, source } => Self::Io { path, source },
            SplitError::Mismatch {
                name,
                expected,
                actual,
            } => Self::Mismatch {
                name,
                expected,
                actual,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_as_ollama_parses_them() {
        let n = OllamaName::parse("ollama:gpt-oss:20b").unwrap();
        assert_eq!(
            n.manifest_path(),
            "manifests/registry.ollama.ai/library/gpt-oss/20b"
        );
        assert_eq!(n.mesh_name(), "ollama:gpt-oss:20b");
        let n = OllamaName::parse("llama3.2-vision").unwrap();
        assert_eq!(n.tag, "latest");
        assert_eq!(n.mesh_name(), "ollama:llama3.2-vision:latest");
        let n = OllamaName::parse("user/model:tag").unwrap();
        assert_eq!(
            n.manifest_path(),
            "manifests/registry.ollama.ai/user/model/tag"
        );
        let n = OllamaName::parse("localhost:5000/ns/m:t").unwrap();
        assert_eq!(n.manifest_path(), "manifests/localhost:5000/ns/m/t");
        assert_eq!(n.mesh_name(), "ollama:localhost:5000/ns/m:t");
        for bad in [
            "",
            "a/b/c/d",
            "m@sha256:00",
            ":t",
            "m:",
            "ns.x/m",
            "-m",
            "a/../b",
        ] {
            assert!(OllamaName::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn manifests_list_their_blobs_once_with_checked_digests() {
        let h = |c: char| c.to_string().repeat(64);
        let json = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"sha256:{}","size":5}},
                "layers":[{{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:{}","size":9}},
                          {{"digest":"sha256:{}","size":9}}]}}"#,
            h('a'),
            h('b'),
            h('b')
        );
        let blobs = manifest_blobs(json.as_bytes()).unwrap();
        assert_eq!(blobs.len(), 2);
        assert_eq!(blobs[1].path(), format!("blobs/sha256-{}", h('b')));
        let upper = json.replace(&h('b'), &h('B'));
        assert!(manifest_blobs(upper.as_bytes()).is_err());
        assert!(manifest_blobs(b"{\"layers\":[{\"digest\":\"sha256-00\"}]}").is_err());
    }
}
