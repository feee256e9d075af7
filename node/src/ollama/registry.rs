//! The Ollama registry as Ollama's own client uses it (the OCI distribution API, anonymous):
//! `GET /v2/<ns>/<model>/manifests/<tag>` with the v2 manifest `Accept` header, and
//! `GET /v2/<ns>/<model>/blobs/sha256:<hex>` with `Range`, following the registry's 307 to its
//! CDN (reqwest drops `Authorization` when a redirect leaves the registry's host). A blob is a
//! [`RangeOrigin`], so nodes fetching it at once split it between them.
//!
//! `OLLAMA_REGISTRY` (a base URL) replaces the registry for every name: a mirror, or a test's
//! stand-in.

use reqwest::StatusCode;

use super::{BlobRef, OllamaError, OllamaName, MANIFEST_MEDIA_TYPE};
use crate::{
    store::digest::Published,
    swarm::origin::{OriginFile, RangeOrigin},
};

/// A registry client.
#[derive(Clone, Debug)]
pub struct Registry {
    base: String,
    http: reqwest::Client,
}

impl Registry {
    /// The registry for `name`: `$OLLAMA_REGISTRY`, else `https://<host>`.
    pub fn for_name(name: &OllamaName) -> Self {
        let base = std::env::var("OLLAMA_REGISTRY")
            .ok()
            .filter(|r| !r.trim().is_empty())
            .unwrap_or_else(|| format!("https://{}", name.host));
        Self {
            base: base.trim().trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .user_agent(concat!("mesh/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(std::time::Duration::from_secs(10))
                .build()
                .expect("reqwest client builds"),
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn http_err(&self, why: impl std::fmt::Display) -> OllamaError {
        OllamaError::Http {
            registry: self.base.clone(),
            why: why.to_string(),
        }
    }

    /// The manifest's bytes, exactly as the registry sends them.
    pub async fn manifest(&self, name: &OllamaName) -> Result<Vec<u8>, OllamaError> {
        let url = format!(
            "{}/v2/{}/{}/manifests/{}",
            self.base, name.namespace, name.model, name.tag
        );
        let resp = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, MANIFEST_MEDIA_TYPE)
            .send()
            .await
            .map_err(|e| self.http_err(e))?;
        match resp.status() {
            StatusCode::NOT_FOUND => {
                return Err(OllamaError::NotFound {
                    registry: self.base.clone(),
                    name: name.full(),
                })
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(OllamaError::Unauthorized {
                    registry: self.base.clone(),
                    name: name.full(),
                })
            }
            s if !s.is_success() => {
                let body = resp.text().await.unwrap_or_default();
                return Err(self.http_err(format!("{url}: HTTP {s}: {}", body.trim())));
            }
            _ => {}
        }
        Ok(resp.bytes().await.map_err(|e| self.http_err(e))?.to_vec())
    }

    /// `len` bytes at `start` of a blob.
    pub async fn blob_range(
        &self,
        name: &OllamaName,
        blob: &BlobRef,
        start: u64,
        len: u64,
    ) -> Result<Vec<u8>, OllamaError> {
        let url = format!(
            "{}/v2/{}/{}/blobs/sha256:{}",
            self.base, name.namespace, name.model, blob.sha256
        );
        let end = start + len - 1;
        let resp = self
            .http
            .get(&url)
            .header(reqwest::header::RANGE, format!("bytes={start}-{end}"))
            .send()
            .await
            .map_err(|e| self.http_err(e))?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Err(OllamaError::NotFound {
                registry: self.base.clone(),
                name: format!("{} blob sha256:{}", name.full(), blob.sha256),
            });
        }
        let whole = status == StatusCode::OK && start == 0 && len == blob.size;
        if status == StatusCode::PARTIAL_CONTENT {
            // The range must be the one asked for: a server that ignores it corrupts pieces.
            let range = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !range.starts_with(&format!("bytes {start}-{end}/")) {
                return Err(self.http_err(format!("asked for bytes {start}-{end}, got {range:?}")));
            }
        } else if !whole {
            return Err(self.http_err(format!("{url}: HTTP {status} for a range")));
        }
        let bytes = resp.bytes().await.map_err(|e| self.http_err(e))?;
        if bytes.len() as u64 != len {
            return Err(self.http_err(format!("range of {} bytes, expected {len}", bytes.len())));
        }
        Ok(bytes.to_vec())
    }
}

/// One blob of one model, as a range origin for the fleet split.
#[derive(Clone, Debug)]
pub struct BlobRange {
    /// The client.
    pub registry: Registry,
    /// The model (the registry serves a blob under a repository that references it).
    pub name: OllamaName,
    /// The blob.
    pub blob: BlobRef,
}

impl BlobRange {
    /// The blob as the fleet split sees it.
    pub fn origin_file(&self) -> OriginFile {
        OriginFile {
            name: format!("sha256:{}", self.blob.sha256),
            size: self.blob.size,
            published: Published::Sha256(self.blob.sha256.clone()),
        }
    }
}

impl RangeOrigin for BlobRange {
    type Error = OllamaError;

    async fn fetch_range(&self, start: u64, len: u64) -> Result<Vec<u8>, OllamaError> {
        self.registry
            .blob_range(&self.name, &self.blob, start, len)
            .await
    }
}
