//! The local HTTP API (127.0.0.1 by default): health, models, peers, metrics, and `add` and
//! `fetch` for the CLI when a node holds the store. Mutating calls need the bearer token from
//! `node.json`, which only the store's owner can read.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
};

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{
    fetch::{FetchProgress, FetchReport, FetchRequest, Fetcher},
    metrics::Metrics,
    node::NodeInfo,
    peers::PeerInfo,
    store::{blocking, Store},
};

/// What the API handlers share.
#[derive(Clone, Debug)]
pub struct ApiState {
    pub(crate) store: Store,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) token: String,
    pub(crate) listen: SocketAddr,
    pub(crate) fetcher: Fetcher,
}

/// A model as the API and `mesh ls --json` show it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The model id (hex).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Total bytes.
    pub size: u64,
    /// Whether every file is complete.
    pub complete: bool,
    /// Number of files.
    pub files: Option<usize>,
}

impl From<mesh_proto::wire::ModelSummary> for ModelInfo {
    fn from(m: mesh_proto::wire::ModelSummary) -> Self {
        Self {
            id: m.id.to_string(),
            name: m.name,
            size: m.size,
            complete: m.complete,
            files: None,
        }
    }
}

/// The body of `POST /v1/add`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddRequest {
    /// Absolute path to a file or folder.
    pub path: PathBuf,
    /// The model name (default: the file or folder name).
    pub name: Option<String>,
}

/// An API error: status and a one-line message.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    /// The message.
    pub error: String,
}

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    cancel: CancellationToken,
) {
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/models", get(models))
        .route("/v1/add", post(add))
        .route("/v1/fetch", post(fetch))
        .route("/v1/peers", get(peers))
        .merge(crate::hf_api::router())
        .with_state(state);
    let shutdown = async move { cancel.cancelled().await };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!("local API stopped: {e}");
    }
}

async fn metrics(State(state): State<ApiState>) -> String {
    state.metrics.prometheus()
}

async fn status(State(state): State<ApiState>) -> Json<serde_json::Value> {
    let counters: serde_json::Map<_, _> = state
        .metrics
        .snapshot()
        .into_iter()
        .map(|(name, _, value)| (name.to_string(), value.into()))
        .collect();
    Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "listen": state.listen,
        "counters": counters,
    }))
}

async fn models(State(state): State<ApiState>) -> Response {
    let store = state.store.clone();
    match blocking(move || store.models()).await {
        Ok(models) => {
            Json(models.into_iter().map(ModelInfo::from).collect::<Vec<_>>()).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn add(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Json(req): Json<AddRequest>,
) -> Response {
    if !authorized(&state, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API token".into(),
        );
    }
    let store = state.store.clone();
    let result = blocking(move || store.add_path(&req.path, req.name, &mut |_| {})).await;
    match result {
        Ok(manifest) => Json(ModelInfo {
            id: manifest.id().to_string(),
            name: manifest.name().to_string(),
            size: manifest.total_size(),
            complete: true,
            files: Some(manifest.files().len()),
        })
        .into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn peers(State(state): State<ApiState>) -> Json<Vec<PeerInfo>> {
    Json(state.fetcher.peers.table())
}

/// The body of `POST /v1/fetch`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FetchBody {
    /// Model name or id.
    pub model: String,
    /// Extra peers to dial.
    pub peers: Vec<SocketAddr>,
    /// Absolute target folder.
    pub to: PathBuf,
    /// Include globs (HuggingFace repos).
    #[serde(default)]
    pub include: Vec<String>,
    /// Exclude globs (HuggingFace repos).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Only plan.
    #[serde(default)]
    pub dry_run: bool,
    /// Also export to the HuggingFace cache.
    #[serde(default)]
    pub hf_cache: bool,
}

/// One line of the `POST /v1/fetch` NDJSON stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum FetchLine {
    /// The model resolved; bytes are about to move.
    Start {
        /// Model name.
        name: String,
        /// Total bytes.
        total: u64,
        /// Files in the model.
        files: usize,
    },
    /// Periodic progress.
    Progress {
        /// Verified bytes present.
        done: u64,
        /// Total bytes.
        total: u64,
        /// Files complete.
        files_done: usize,
    },
    /// Finished.
    Done {
        /// The summary.
        report: FetchReport,
    },
    /// Failed.
    Error {
        /// The one-line error.
        message: String,
        /// The exit code the CLI should use.
        code: u8,
        /// A hint, if any.
        hint: Option<String>,
    },
}

/// Interval between progress lines of a fetch run through the node.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

async fn fetch(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Json(body): Json<FetchBody>,
) -> Response {
    if !authorized(&state, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API token".into(),
        );
    }
    let model = match body.model.parse() {
        Ok(model) => model,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{e}")),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<FetchLine>(16);
    let req = FetchRequest {
        model,
        peers: body.peers,
        to: body.to,
        include: body.include,
        exclude: body.exclude,
        dry_run: body.dry_run,
        hf_cache: body.hf_cache,
    };
    // The fetch runs to the end even if the client goes away: the blobs stay useful.
    tokio::spawn(async move {
        let progress_slot = Arc::new(std::sync::Mutex::new(None::<Arc<FetchProgress>>));
        let slot = progress_slot.clone();
        let start_tx = tx.clone();
        let fetch = state.fetcher.fetch(req, move |manifest, progress| {
            *slot.lock().expect("progress slot lock") = Some(progress);
            let _ = start_tx.try_send(FetchLine::Start {
                name: manifest.name().to_string(),
                total: manifest.total_size(),
                files: manifest.files().len(),
            });
        });
        tokio::pin!(fetch);
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        let result = loop {
            tokio::select! {
                result = &mut fetch => break result,
                _ = tick.tick() => {
                    let progress = progress_slot.lock().expect("progress slot lock").clone();
                    if let Some(p) = progress {
                        let _ = tx.try_send(progress_line(&p));
                    }
                }
            }
        };
        let line = match result {
            Ok(report) => FetchLine::Done { report },
            Err(e) => FetchLine::Error {
                message: e.to_string(),
                code: e.exit_code(),
                hint: e.hint().map(str::to_string),
            },
        };
        let _ = tx.send(line).await;
    });
    let lines = tokio_stream::wrappers::ReceiverStream::new(rx).map(|line| {
        let mut json = serde_json::to_vec(&line).expect("fetch lines serialize");
        json.push(b'\n');
        Ok::<_, std::convert::Infallible>(json)
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}

fn progress_line(p: &FetchProgress) -> FetchLine {
    FetchLine::Progress {
        done: p.files.iter().map(|f| f.done.load(Ordering::Relaxed)).sum(),
        total: p.files.iter().map(|f| f.size).sum(),
        files_done: p
            .files
            .iter()
            .filter(|f| f.done.load(Ordering::Relaxed) >= f.size)
            .count(),
    }
}

fn authorized(state: &ApiState, headers: &HeaderMap) -> bool {
    let expected = format!("Bearer {}", state.token);
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| blake3::hash(v.as_bytes()) == blake3::hash(expected.as_bytes()))
}

fn error(status: StatusCode, error: String) -> Response {
    (status, Json(ApiError { error })).into_response()
}

/// A client for a node running on the same store.
#[derive(Debug)]
pub struct NodeClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

/// A failed API call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The node did not answer.
    #[error("the node's local API at {0} does not answer: {1}")]
    Unreachable(String, reqwest::Error),
    /// The node answered with an error.
    #[error("{0}")]
    Node(String),
}

impl NodeClient {
    /// A client for the node running on `home`, if one published its API and answers.
    pub async fn discover(home: &std::path::Path) -> Option<Self> {
        let info = NodeInfo::read(home)?;
        let api = info.api?;
        let client = Self {
            base: format!("http://{api}"),
            token: info.token,
            http: reqwest::Client::new(),
        };
        let health = client
            .http
            .get(format!("{}/health", client.base))
            .send()
            .await;
        health.ok()?.error_for_status().ok()?;
        Some(client)
    }

    /// `POST /v1/add`.
    pub async fn add(&self, req: &AddRequest) -> Result<ModelInfo, ClientError> {
        let resp = self
            .http
            .post(format!("{}/v1/add", self.base))
            .bearer_auth(&self.token)
            .json(req)
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(self.base.clone(), e))?;
        Self::json(resp).await
    }

    /// `GET /v1/status`: version, listen address and counters.
    pub async fn status(&self) -> Result<serde_json::Value, ClientError> {
        let resp = self
            .http
            .get(format!("{}/v1/status", self.base))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(self.base.clone(), e))?;
        Self::json(resp).await
    }

    /// `GET /v1/peers`.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, ClientError> {
        let resp = self
            .http
            .get(format!("{}/v1/peers", self.base))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(self.base.clone(), e))?;
        Self::json(resp).await
    }

    /// `POST /v1/fetch`: runs a fetch in the node, calling `on_line` for each line it streams.
    pub async fn fetch(
        &self,
        body: &FetchBody,
        mut on_line: impl FnMut(FetchLine),
    ) -> Result<(), ClientError> {
        let mut resp = self
            .http
            .post(format!("{}/v1/fetch", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(self.base.clone(), e))?;
        if !resp.status().is_success() {
            return Self::json::<serde_json::Value>(resp).await.map(|_| ());
        }
        let mut buf = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| ClientError::Node(format!("the node's fetch stream broke: {e}")))?
        {
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let line = serde_json::from_slice(&line)
                    .map_err(|e| ClientError::Node(format!("bad line from the node: {e}")))?;
                on_line(line);
            }
        }
        Ok(())
    }

    /// `GET /v1/models`.
    pub async fn models(&self) -> Result<Vec<ModelInfo>, ClientError> {
        let resp = self
            .http
            .get(format!("{}/v1/models", self.base))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(self.base.clone(), e))?;
        Self::json(resp).await
    }

    async fn json<T: for<'de> Deserialize<'de>>(resp: reqwest::Response) -> Result<T, ClientError> {
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Node(e.to_string()))?;
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Node(e.to_string()))
        } else {
            let msg = serde_json::from_slice::<ApiError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| status.to_string());
            Err(ClientError::Node(msg))
        }
    }
}
