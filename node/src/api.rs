//! The local HTTP API (127.0.0.1 by default): health, models, metrics, and `add` for the CLI
//! when a node holds the store. Mutating calls need the bearer token from `node.json`.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::Metrics,
    node::NodeInfo,
    store::{blocking, Store},
};

/// What the API handlers share.
#[derive(Clone, Debug)]
pub(crate) struct ApiState {
    pub(crate) store: Store,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) token: String,
    pub(crate) listen: SocketAddr,
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
        Ok(models) => Json(
            models
                .into_iter()
                .map(|m| ModelInfo {
                    id: m.id.to_string(),
                    name: m.name,
                    size: m.size,
                    complete: m.complete,
                    files: None,
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn add(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Json(req): Json<AddRequest>,
) -> Response {
    let expected = format!("Bearer {}", state.token);
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| blake3::hash(v.as_bytes()) == blake3::hash(expected.as_bytes()));
    if !authorized {
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
