//! HuggingFace as the fallback source: repo metadata, resumable range downloads, and the
//! checks that make a downloaded file trustworthy (LFS sha256, or the git blob id for small
//! files) before its BLAKE3 root is computed and the store takes it.
//!
//! HuggingFace conventions honoured: `HF_ENDPOINT`, `HF_TOKEN`, the token file
//! (`$HF_TOKEN_PATH`, else `$HF_HOME/token`, else `~/.cache/huggingface/token`), and
//! `HF_HUB_OFFLINE=1`. The token is sent to the Hub only: reqwest drops `Authorization` when a
//! redirect leaves the Hub's origin (LFS files live on a CDN).

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use serde::Deserialize;

use crate::{
    limits::Limits,
    store::digest::Published,
    swarm::origin::{OriginFile, RangeOrigin, SplitError},
};

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// A repo reference: `org/name`, optionally `@revision`; `hf://` in front is accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoRef {
    /// `org/name`.
    pub repo: String,
    /// Branch, tag or commit (default `main`).
    pub revision: String,
}

impl RepoRef {
    /// Parses `org/name[@rev]` or `hf://org/name[@rev]`; `None` if it is not of that form.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.strip_prefix("hf://").unwrap_or(s);
        let (repo, revision) = match s.split_once('@') {
            Some((repo, rev)) if !rev.is_empty() => (repo, rev),
            Some(_) => return None,
            None => (s, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let ok = |part: &str| {
            !part.is_empty()
                && part.len() <= 96
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !part.starts_with('.')
        };
        let rev_ok = revision
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            && !revision.contains("..");
        (ok(org) && ok(name) && rev_ok).then(|| Self {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// Why a Hub call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// The repo needs a token (gated or private) and none, or a wrong one, was sent.
    #[error("{repo} is gated or private: HuggingFace refused access")]
    Unauthorized {
        /// The repo.
        repo: String,
    },
    /// No such repo, revision or file.
    #[error("not found on HuggingFace: {0}")]
    NotFound(String),
    /// `HF_HUB_OFFLINE` is set.
    #[error("HF_HUB_OFFLINE is set: not contacting HuggingFace")]
    Offline,
    /// The request failed or the answer was not what the Hub sends.
    #[error("HuggingFace at {endpoint}: {why}")]
    Http {
        /// The endpoint.
        endpoint: String,
        /// What happened.
        why: String,
    },
    /// The downloaded bytes do not match the Hub's sha256 or git blob id.
    #[error("{path} from HuggingFace does not match its published hash (expected {expected}, got {actual}); discarded")]
    Mismatch {
        /// The file.
        path: String,
        /// The published hash.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// Local file I/O.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// One file of a repo at a commit, as the Hub describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubFile {
    /// Path in the repo.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// LFS sha256 (hex), for LFS files.
    pub sha256: Option<String>,
    /// Git blob id (sha1 hex).
    pub git_oid: String,
}

impl HubFile {
    /// The etag HuggingFace clients key their cache on: the sha256 for LFS files, else the git
    /// blob id.
    pub fn etag(&self) -> &str {
        self.sha256.as_deref().unwrap_or(&self.git_oid)
    }

    /// The hash the Hub publishes the file under (what [`HubFile::etag`] names).
    pub fn published(&self) -> Published {
        match &self.sha256 {
            Some(sha) => Published::Sha256(sha.clone()),
            None => Published::GitBlob(self.git_oid.clone()),
        }
    }
}

/// A repo at a resolved commit.
#[derive(Clone, Debug)]
pub struct RepoInfo {
    /// `org/name`.
    pub repo: String,
    /// The commit sha the revision resolved to.
    pub commit: String,
    /// Its files.
    pub files: Vec<HubFile>,
    /// Gated or private: its files may only go to mesh members.
    pub restricted: bool,
}

#[derive(Deserialize)]
struct RevisionJson {
    sha: String,
    siblings: Vec<SiblingJson>,
    #[serde(default)]
    private: bool,
    /// `false`, or `"auto"`/`"manual"` for gated repos.
    #[serde(default)]
    gated: serde_json::Value,
}

#[derive(Deserialize)]
struct SiblingJson {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<LfsJson>,
}

#[derive(Deserialize)]
struct LfsJson {
    sha256: String,
}

/// A client for the Hub (or anything at `HF_ENDPOINT` that speaks its API).
#[derive(Clone, Debug)]
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    offline: bool,
    http: reqwest::Client,
    /// The node's rate limits and HF hours, awaited before every range and chunk.
    limits: Limits,
}

impl Hub {
    /// A client configured from the environment, as `huggingface_hub` is.
    pub fn from_env() -> Self {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
        Self {
            endpoint,
            token: token_from_env(),
            offline,
            http: reqwest::Client::builder()
                .user_agent(concat!("mesh/", env!("CARGO_PKG_VERSION")))
                .build()
                .expect("reqwest client builds"),
            limits: Limits::default(),
        }
    }

    /// This client, held to the node's limits (`max_hf_download`, `max_download`, `hf_hours`).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The endpoint in use.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Whether a token will be sent.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        let req = self.http.get(url);
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    fn http_err(&self, why: impl std::fmt::Display) -> HubError {
        HubError::Http {
            endpoint: self.endpoint.clone(),
            why: why.to_string(),
        }
    }

    /// Resolves `repo@revision` to a commit and lists its files with sizes and hashes.
    pub async fn repo_info(&self, repo: &RepoRef) -> Result<RepoInfo, HubError> {
        if self.offline {
            return Err(HubError::Offline);
        }
        let url = format!(
            "{}/api/models/{}/revision/{}?blobs=true",
            self.endpoint,
            repo.repo,
            urlencode(&repo.revision)
        );
        let resp = self.get(&url).send().await.map_err(|e| self.http_err(e))?;
        let status = resp.status();
        let code = header(&resp, "x-error-code");
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            // The Hub answers 401 for missing repos too, so as not to reveal private ones.
            return Err(match code.as_deref() {
                Some("RepoNotFound") if self.token.is_some() => {
                    HubError::NotFound(format!("repo {}", repo.repo))
                }
                _ => HubError::Unauthorized {
                    repo: repo.repo.clone(),
                },
            });
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(HubError::NotFound(format!(
                "{}@{}",
                repo.repo, repo.revision
            )));
        }
        if !status.is_success() {
            return Err(self.http_err(format!("{url}: HTTP {status}")));
        }
        let info: RevisionJson = resp.json().await.map_err(|e| self.http_err(e))?;
        let mut files = Vec::new();
        for s in info.siblings {
            let (Some(size), Some(git_oid)) = (s.size, s.blob_id) else {
                return Err(self.http_err("revision info lacks sizes or blob ids"));
            };
            files.push(HubFile {
                path: s.rfilename,
                size,
                sha256: s.lfs.map(|l| l.sha256.to_ascii_lowercase()),
                git_oid: git_oid.to_ascii_lowercase(),
            });
        }
        let gated = !matches!(
            info.gated,
            serde_json::Value::Bool(false) | serde_json::Value::Null
        );
        Ok(RepoInfo {
            repo: repo.repo.clone(),
            commit: info.sha,
            files,
            restricted: info.private || gated,
        })
    }

    /// The `resolve` URL of a file at a commit.
    fn resolve_url(&self, repo: &str, commit: &str, path: &str) -> String {
        let path: Vec<String> = path.split('/').map(urlencode).collect();
        format!(
            "{}/{repo}/resolve/{commit}/{}",
            self.endpoint,
            path.join("/")
        )
    }

    /// Downloads `len` bytes at `start` of one file at `commit` (a Range request, following
    /// the Hub's redirect to its CDN).
    pub async fn download_range(
        &self,
        repo: &str,
        commit: &str,
        file: &HubFile,
        start: u64,
        len: u64,
    ) -> Result<Vec<u8>, HubError> {
        if self.offline {
            return Err(HubError::Offline);
        }
        self.limits.hf_take(len).await;
        let url = self.resolve_url(repo, commit, &file.path);
        let resp = self
            .get(&url)
            .header(
                reqwest::header::RANGE,
                format!("bytes={start}-{}", start + len - 1),
            )
            .send()
            .await
            .map_err(|e| self.http_err(e))?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(HubError::Unauthorized {
                repo: repo.to_string(),
            });
        }
        let whole = status == reqwest::StatusCode::OK && start == 0 && len == file.size;
        if status != reqwest::StatusCode::PARTIAL_CONTENT && !whole {
            return Err(self.http_err(format!("{}: HTTP {status} for a range", file.path)));
        }
        let bytes = resp.bytes().await.map_err(|e| self.http_err(e))?;
        if bytes.len() as u64 != len {
            return Err(self.http_err(format!(
                "{}: range of {} bytes, expected {len}",
                file.path,
                bytes.len()
            )));
        }
        self.limits.hf_got(len);
        Ok(bytes.to_vec())
    }

    /// Downloads one file at `commit` to `part` (resuming from what `part` holds, with a Range
    /// request), then checks the whole file against its published hash. On a mismatch the
    /// file is deleted. `progress` counts bytes on disk.
    pub async fn download(
        &self,
        repo: &str,
        commit: &str,
        file: &HubFile,
        part: &Path,
        progress: Arc<AtomicU64>,
    ) -> Result<(), HubError> {
        if self.offline {
            return Err(HubError::Offline);
        }
        let io = |source| HubError::Io {
            path: part.to_path_buf(),
            source,
        };
        let mut have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if have > file.size {
            std::fs::remove_file(part).map_err(io)?;
            have = 0;
        }
        progress.store(have, Ordering::Relaxed);
        if have < file.size {
            self.limits.hf_window().await;
            let url = self.resolve_url(repo, commit, &file.path);
            let mut req = self.get(&url);
            if have > 0 {
                req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
            }
            let mut resp = req.send().await.map_err(|e| self.http_err(e))?;
            let status = resp.status();
            if status == reqwest::StatusCode::UNAUTHORIZED
                || status == reqwest::StatusCode::FORBIDDEN
            {
                return Err(HubError::Unauthorized {
                    repo: repo.to_string(),
                });
            }
            if status == reqwest::StatusCode::NOT_FOUND {
                return Err(HubError::NotFound(format!("{repo}/{}", file.path)));
            }
            let append = match status {
                reqwest::StatusCode::PARTIAL_CONTENT => true,
                reqwest::StatusCode::OK => false,
                other => return Err(self.http_err(format!("{}: HTTP {other}", file.path))),
            };
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(append)
                .write(true)
                .truncate(!append)
                .open(part)
                .map_err(io)?;
            let mut written = if append { have } else { 0 };
            while let Some(chunk) = resp.chunk().await.map_err(|e| self.http_err(e))? {
                written += chunk.len() as u64;
                if written > file.size {
                    return Err(self.http_err(format!("{} is longer than published", file.path)));
                }
                out.write_all(&chunk).map_err(io)?;
                progress.store(written, Ordering::Relaxed);
                self.limits.hf_got(chunk.len() as u64);
                self.limits.hf_rate(chunk.len() as u64).await;
            }
            out.sync_all().map_err(io)?;
            if written != file.size {
                return Err(self.http_err(format!(
                    "{}: got {written} of {} bytes (re-run to resume)",
                    file.path, file.size
                )));
            }
        }
        let part_owned = part.to_path_buf();
        let expected = file.clone();
        let actual = tokio::task::spawn_blocking(move || expected.published().of_file(&part_owned))
            .await
            .expect("hash task panicked")
            .map_err(io)?;
        if actual != file.etag() {
            let _ = std::fs::remove_file(part);
            return Err(HubError::Mismatch {
                path: file.path.clone(),
                expected: file.etag().to_string(),
                actual,
            });
        }
        Ok(())
    }
}

/// One file at one commit, as a range origin for the fleet split.
#[derive(Clone, Debug)]
pub struct HubRange {
    /// The client.
    pub hub: Hub,
    /// `org/name`.
    pub repo: String,
    /// The commit.
    pub commit: String,
    /// The file.
    pub file: HubFile,
}

impl HubRange {
    /// The file as the fleet split sees it.
    pub fn origin_file(&self) -> OriginFile {
        OriginFile {
            name: self.file.path.clone(),
            size: self.file.size,
            published: self.file.published(),
        }
    }
}

impl RangeOrigin for HubRange {
    type Error = HubError;

    async fn fetch_range(&self, start: u64, len: u64) -> Result<Vec<u8>, HubError> {
        self.hub
            .download_range(&self.repo, &self.commit, &self.file, start, len)
            .await
    }
}

impl From<SplitError<Self>> for HubError {
    fn from(e: SplitError<Self>) -> Self {
        match e {
            SplitError::Origin(e) => e,
            SplitError::Io { path, source } => Self::Io { path, source },
            SplitError::Mismatch {
                name,
                expected,
                actual,
            } => Self::Mismatch {
                path: name,
                expected,
                actual,
            },
        }
    }
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn token_from_env() -> Option<String> {
    if let Ok(token) = std::env::var("HF_TOKEN") {
        if !token.trim().is_empty() {
            return Some(token.trim().to_string());
        }
    }
    let path = std::env::var_os("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("token")))
        .or_else(|| dirs::home_dir().map(|h| h.join(".cache/huggingface/token")))?;
    let token = std::fs::read_to_string(path).ok()?;
    let token = token.trim();
    (!token.is_empty()).then(|| token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_refs() {
        let r = RepoRef::parse("hf://stabilityai/stable-diffusion-3.5-large@main").unwrap();
        assert_eq!(r.repo, "stabilityai/stable-diffusion-3.5-large");
        assert_eq!(r.revision, "main");
        assert_eq!(RepoRef::parse("a/b").unwrap().revision, "main");
        for bad in [
            "sd3.5_large",
            "a/b/c",
            "../x",
            "a/..",
            "a/b@",
            "/b",
            "a/b@x/../y",
        ] {
            assert!(RepoRef::parse(bad).is_none(), "{bad}");
        }
    }
}
