//! The Hub client: repo metadata, range and resumable downloads, and passing the Hub's answers
//! on to the node's HF endpoint as they came.
//!
//! HuggingFace conventions honoured: `HF_ENDPOINT`, `HF_TOKEN`, the token file
//! (`$HF_TOKEN_PATH`, else `$HF_HOME/token`, else `~/.cache/huggingface/token`), and
//! `HF_HUB_OFFLINE=1`. A token is sent to the Hub only: reqwest drops `Authorization` when a
//! redirect leaves the Hub's origin (LFS files live on a CDN), and pagination links are
//! followed only on the Hub's own origin. Every request has timeouts and retries
//! ([`super::retry`]).

use std::path::PathBuf;

use crate::limits::Limits;

use super::{
    repo::{urlencode, HubFile, RepoInfo, RepoRef},
    retry,
};

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

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
    /// The Hub redirected the repo to another id: a one-part id such as `gpt2` (moved under
    /// an org in 2024), or a renamed repo.
    #[error("HuggingFace moved {repo} to {to}: use hf://{to}")]
    Moved {
        /// The id asked for.
        repo: String,
        /// The id the Hub redirected to.
        to: String,
    },
    /// `HF_HUB_OFFLINE` is set.
    #[error("HF_HUB_OFFLINE is set: not contacting HuggingFace")]
    Offline,
    /// No answer, after retries (connection refused, timeouts, 5xx).
    #[error("HuggingFace at {endpoint} is unreachable: {why}")]
    Unreachable {
        /// The endpoint.
        endpoint: String,
        /// What happened last.
        why: String,
    },
    /// The answer was not what the Hub sends.
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

impl HubError {
    /// Whether the Hub could not be asked at all (so the mesh may be asked instead).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Offline | Self::Unreachable { .. })
    }
}

/// Whose token a request carries.
#[derive(Clone, Copy, Debug)]
pub enum Auth<'a> {
    /// The node owner's (`HF_TOKEN` or the token file).
    Node,
    /// A client's, as it sent it to the node's HF endpoint (or none).
    Client(Option<&'a str>),
}

/// A Hub answer as it came, for the node's HF endpoint to pass on.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// `X-Error-Code`.
    pub code: Option<String>,
    /// `X-Error-Message`.
    pub message: Option<String>,
    /// The body.
    pub body: bytes::Bytes,
    /// The path the Hub answered from, after the redirects it made on its own origin.
    pub path: String,
}

impl Answer {
    /// Whether the Hub said yes.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A client for the Hub (or anything at `HF_ENDPOINT` that speaks its API).
#[derive(Clone, Debug)]
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    offline: bool,
    http: reqwest::Client,
    /// For requests passed on as they came ([`Hub::pass_on`]): no redirect is followed.
    raw: reqwest::Client,
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
                .connect_timeout(retry::CONNECT_TIMEOUT)
                .read_timeout(retry::READ_TIMEOUT)
                .build()
                .expect("reqwest client builds"),
            raw: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(retry::CONNECT_TIMEOUT)
                .read_timeout(retry::READ_TIMEOUT)
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

    /// Whether a token will be sent for the node's own requests.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// This client, with `token` for the node's own requests if it has none of its own (a
    /// client of the HF endpoint that the Hub lets read a gated repo, for that repo's files).
    pub fn or_token(&self, token: Option<&str>) -> Self {
        let mut hub = self.clone();
        if hub.token.is_none() {
            hub.token = token.map(str::to_string);
        }
        hub
    }

    /// Whether `HF_HUB_OFFLINE` is set.
    pub fn is_offline(&self) -> bool {
        self.offline
    }

    fn with_auth(&self, req: reqwest::RequestBuilder, auth: Auth<'_>) -> reqwest::RequestBuilder {
        let token = match auth {
            Auth::Node => self.token.as_deref(),
            Auth::Client(token) => token,
        };
        match token {
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

    fn unreachable(&self, why: impl std::fmt::Display) -> HubError {
        HubError::Unreachable {
            endpoint: self.endpoint.clone(),
            why: why.to_string(),
        }
    }

    /// Sends a request built by `build`, retrying timeouts, connection errors, 5xx and 429.
    /// Returns the first answer that is not worth retrying (which may be an error status).
    async fn send(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, HubError> {
        if self.offline {
            return Err(HubError::Offline);
        }
        let mut attempt = 0;
        loop {
            let last = attempt + 1 >= retry::ATTEMPTS;
            let wait = match build().send().await {
                Ok(resp) if retry::retryable_status(resp.status()) && !last => {
                    tracing::debug!(status = %resp.status(), url = %resp.url(), "Hub answered; retrying");
                    retry::retry_after(&resp).unwrap_or_else(|| retry::backoff(attempt))
                }
                Ok(resp) if retry::retryable_status(resp.status()) => {
                    return Err(self.unreachable(format!("HTTP {}", resp.status())))
                }
                Ok(resp) => return Ok(resp),
                Err(e) if retry::retryable_error(&e) && !last => {
                    tracing::debug!("Hub request failed; retrying: {e}");
                    retry::backoff(attempt)
                }
                Err(e) if retry::retryable_error(&e) => return Err(self.unreachable(e)),
                Err(e) => return Err(self.http_err(e)),
            };
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// `GET {endpoint}{path_and_query}` on the Hub's API, its answer as it came (errors too).
    pub async fn api_get(&self, path_and_query: &str, auth: Auth<'_>) -> Result<Answer, HubError> {
        let url = format!("{}{path_and_query}", self.endpoint);
        let resp = self
            .send(|| self.with_auth(self.http.get(&url), auth))
            .await?;
        self.answer(resp).await
    }

    /// Sends a client's request on to the Hub as it came (`path_and_query` on the endpoint),
    /// once, and returns the Hub's answer as it came: a redirect is not followed, since the
    /// client follows it (to the CDN, with no token) itself. With `as_node`, it goes with the
    /// node owner's token (if there is one) in place of any the headers carry.
    pub async fn pass_on(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        mut headers: reqwest::header::HeaderMap,
        body: reqwest::Body,
        as_node: bool,
    ) -> Result<reqwest::Response, HubError> {
        if self.offline {
            return Err(HubError::Offline);
        }
        let url = format!("{}{path_and_query}", self.endpoint);
        let token = self.token.as_deref().filter(|_| as_node);
        if token.is_some() {
            headers.remove(reqwest::header::AUTHORIZATION);
        }
        let mut req = self.raw.request(method, &url).headers(headers).body(body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req.send().await.map_err(|e| {
            if retry::retryable_error(&e) {
                self.unreachable(e)
            } else {
                self.http_err(e)
            }
        })
    }

    async fn answer(&self, resp: reqwest::Response) -> Result<Answer, HubError> {
        let status = resp.status().as_u16();
        let path = resp.url().path().to_string();
        let code = header(&resp, "x-error-code");
        let message = header(&resp, "x-error-message");
        let body = resp.bytes().await.map_err(|e| self.unreachable(e))?;
        Ok(Answer {
            status,
            code,
            message,
            body,
            path,
        })
    }

    /// The revision info (`?blobs=true`) of `repo` at `rev`: the Hub's JSON, or its refusal.
    pub async fn revision(
        &self,
        repo: &str,
        rev: &str,
        auth: Auth<'_>,
    ) -> Result<Result<serde_json::Value, Answer>, HubError> {
        let route = format!("/revision/{}", urlencode(rev));
        let path = format!("/api/models/{repo}{route}?blobs=true");
        let answer = self.api_get(&path, auth).await?;
        // A moved repo's new place answers whatever it answers (even 401); the move comes first.
        if let Some(to) = moved_to(&answer.path, "/api/models/", repo, &route) {
            return Err(HubError::Moved {
                repo: repo.to_string(),
                to,
            });
        }
        if !answer.is_success() {
            return Ok(Err(answer));
        }
        serde_json::from_slice(&answer.body)
            .map(Ok)
            .map_err(|e| self.http_err(format!("{path}: {e}")))
    }

    /// Every entry of `repo`'s tree at `commit`, recursively, following the Hub's pages.
    pub async fn tree(
        &self,
        repo: &str,
        commit: &str,
        auth: Auth<'_>,
    ) -> Result<Result<Vec<serde_json::Value>, Answer>, HubError> {
        let mut url = format!(
            "{}/api/models/{repo}/tree/{commit}?recursive=true&expand=false",
            self.endpoint
        );
        let mut entries = Vec::new();
        loop {
            let resp = self
                .send(|| self.with_auth(self.http.get(&url), auth))
                .await?;
            let next = next_link(&resp).filter(|n| n.starts_with(&format!("{}/", self.endpoint)));
            let answer = self.answer(resp).await?;
            if !answer.is_success() {
                return Ok(Err(answer));
            }
            let page: Vec<serde_json::Value> = serde_json::from_slice(&answer.body)
                .map_err(|e| self.http_err(format!("tree of {repo}: {e}")))?;
            entries.extend(page);
            match next {
                Some(next) => url = next,
                None => return Ok(Ok(entries)),
            }
        }
    }

    /// Whether `token` may read `repo`'s files (`GET /api/models/{repo}/auth-check`).
    pub async fn auth_check(
        &self,
        repo: &str,
        token: Option<&str>,
    ) -> Result<Result<(), Answer>, HubError> {
        let answer = self
            .api_get(
                &format!("/api/models/{repo}/auth-check"),
                Auth::Client(token),
            )
            .await?;
        Ok(if answer.is_success() {
            Ok(())
        } else {
            Err(answer)
        })
    }

    /// Resolves `repo@revision` to a commit and lists its files with sizes and hashes, with
    /// the node's token.
    pub async fn repo_info(&self, repo: &RepoRef) -> Result<RepoInfo, HubError> {
        match self
            .revision(&repo.repo, &repo.revision, Auth::Node)
            .await?
        {
            Ok(json) => RepoInfo::from_revision_json(&repo.repo, &json)
                .ok_or_else(|| self.http_err("revision info lacks the commit, sizes or blob ids")),
            Err(answer) => Err(self.refusal(&answer, &repo.repo, &repo.revision)),
        }
    }

    /// What a refusal of the node's own request means.
    pub fn refusal(&self, answer: &Answer, repo: &str, rev: &str) -> HubError {
        match (answer.status, answer.code.as_deref()) {
            // The Hub answers 401 for missing repos too, so as not to reveal private ones.
            (401 | 403, Some("RepoNotFound")) if self.token.is_some() => {
                HubError::NotFound(format!("repo {repo}"))
            }
            (401 | 403, _) => HubError::Unauthorized {
                repo: repo.to_string(),
            },
            (404, _) => HubError::NotFound(format!("{repo}@{rev}")),
            (status, _) => self.http_err(format!("{repo}@{rev}: HTTP {status}")),
        }
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
    /// the Hub's redirect to its CDN). A body that breaks off or stalls is asked for again.
    pub async fn download_range(
        &self,
        repo: &str,
        commit: &str,
        file: &HubFile,
        start: u64,
        len: u64,
    ) -> Result<Vec<u8>, HubError> {
        // Within the HF hours and the uplink's rate (`max_hf_download`), if set.
        self.limits.hf_take(len).await;
        let url = self.resolve_url(repo, commit, &file.path);
        let range = format!("bytes={start}-{}", start + len - 1);
        let mut attempt = 0;
        loop {
            let resp = self
                .send(|| {
                    self.with_auth(self.http.get(&url), Auth::Node)
                        .header(reqwest::header::RANGE, &range)
                })
                .await?;
            let status = resp.status();
            if status == reqwest::StatusCode::UNAUTHORIZED
                || status == reqwest::StatusCode::FORBIDDEN
            {
                return Err(HubError::Unauthorized {
                    repo: repo.to_string(),
                });
            }
            let whole = status == reqwest::StatusCode::OK && start == 0 && len == file.size;
            if status != reqwest::StatusCode::PARTIAL_CONTENT && !whole {
                return Err(self.http_err(format!("{}: HTTP {status} for a range", file.path)));
            }
            match resp.bytes().await {
                Ok(bytes) if bytes.len() as u64 == len => {
                    self.limits.hf_got(len);
                    return Ok(bytes.to_vec());
                }
                Ok(bytes) => {
                    return Err(self.http_err(format!(
                        "{}: range of {} bytes, expected {len}",
                        file.path,
                        bytes.len()
                    )))
                }
                Err(e) if attempt + 1 < retry::ATTEMPTS => {
                    tracing::debug!(path = %file.path, start, "range broke off, asking again: {e}");
                    tokio::time::sleep(retry::backoff(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(self.unreachable(e)),
            }
        }
    }
}

/// The repo id the Hub answered from, when a request for `{before}{repo}{after}` was
/// redirected on the Hub's own origin to the same route about another repo.
fn moved_to(answered: &str, before: &str, repo: &str, after: &str) -> Option<String> {
    let to = answered.strip_prefix(before)?.strip_suffix(after)?;
    let valid = !to.contains('@') && RepoRef::parse(to).is_some();
    (to != repo && valid).then(|| to.to_string())
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The URL of a `Link: <URL>; rel="next"` header.
fn next_link(resp: &reqwest::Response) -> Option<String> {
    let link = header(resp, "link")?;
    link.split(',').find_map(|part| {
        let (url, params) = part.trim().split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            url.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
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
    use super::moved_to;

    #[test]
    fn a_redirect_to_the_same_route_about_another_repo_is_a_move() {
        let (api, route) = ("/api/models/", "/revision/main");
        let moved = |answered: &str, repo: &str| moved_to(answered, api, repo, route);
        assert_eq!(
            moved("/api/models/openai-community/gpt2/revision/main", "gpt2").as_deref(),
            Some("openai-community/gpt2")
        );
        assert_eq!(
            moved("/api/models/KBLab/bert/revision/main", "KB/bert").as_deref(),
            Some("KBLab/bert")
        );
        // Not moved: the same path, another route, or no valid repo id.
        assert_eq!(
            moved("/api/models/org/tiny/revision/main", "org/tiny"),
            None
        );
        assert_eq!(moved("/api/models/org/tiny/tree/main", "gpt2"), None);
        assert_eq!(moved("/login/revision/main", "gpt2"), None);
        assert_eq!(moved("/api/models/a/b/c/revision/main", "gpt2"), None);
        assert_eq!(moved("/api/models/../x/revision/main", "gpt2"), None);
    }
}
