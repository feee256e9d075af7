//! The local HTTP API (127.0.0.1 by default): health, models, peers, metrics, and `add` and
//! `fetch` for the CLI when a node holds the store ([`client`] is the CLI's side), plus the
//! HuggingFace-compatible read API ([`hf_endpoint`]). Mutating calls need the bearer token
//! from `node.json`, which only the store's owner can read.

pub mod client;
pub mod fleet;
mod hf;
pub mod lifecycle;
mod prom;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

pub use self::client::{ClientError, NodeClient, NodeInfo};
use crate::{
    discovery::PeerInfo,
    fetch::{FetchProgress, FetchReport, FetchRequest, Fetcher, Target},
    metrics::Metrics,
    store::{blocking, Store},
};

/// What the API handlers share.
#[derive(Clone, Debug)]
pub struct ApiState {
    store: Store,
    metrics: Arc<Metrics>,
    /// The bearer token of the mutating calls (and the node owner's key to gated repos).
    token: String,
    /// The node's QUIC address.
    listen: SocketAddr,
    /// The API's own address (requests naming another host are refused).
    api: SocketAddr,
    fetcher: Fetcher,
    gate: hf::Gate,
    poisoned: hf::Poisoned,
    /// Rates and disk figures, sampled when the fleet page or `/metrics` reads them.
    rates: Arc<fleet::Rates>,
}

impl ApiState {
    /// The state of a node's API at `api`, with its store, counters, token and fetcher.
    pub(crate) fn new(
        fetcher: Fetcher,
        metrics: Arc<Metrics>,
        token: String,
        listen: SocketAddr,
        api: SocketAddr,
    ) -> Self {
        Self {
            store: fetcher.store.clone(),
            gate: hf::Gate::new(&token, fetcher.meta.hub().clone()),
            poisoned: hf::Poisoned::default(),
            rates: Arc::default(),
            metrics,
            token,
            listen,
            api,
            fetcher,
        }
    }
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
    /// Never evicted to stay under `max_store`.
    #[serde(default)]
    pub pinned: bool,
    /// `local`, or `hf:org/name@commit`.
    #[serde(default)]
    pub source: Option<String>,
    /// Last added or fetched (Unix milliseconds).
    #[serde(default)]
    pub last_used: Option<u64>,
}

impl ModelInfo {
    /// A model just added with `mesh add`.
    pub fn added(manifest: &mesh_proto::Manifest) -> Self {
        Self {
            id: manifest.id().to_string(),
            name: manifest.name().to_string(),
            size: manifest.total_size(),
            complete: true,
            files: Some(manifest.files().len()),
            pinned: false,
            source: Some("local".into()),
            last_used: None,
        }
    }
}

impl From<mesh_proto::wire::ModelSummary> for ModelInfo {
    fn from(m: mesh_proto::wire::ModelSummary) -> Self {
        Self {
            id: m.id.to_string(),
            name: m.name,
            size: m.size,
            complete: m.complete,
            files: None,
            pinned: false,
            source: None,
            last_used: None,
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
    /// The exit code the CLI should use, where the node knows it.
    #[serde(default)]
    pub code: Option<u8>,
    /// A hint for the user.
    #[serde(default)]
    pub hint: Option<String>,
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
        .merge(hf::router().route_layer(middleware::from_fn_with_state(state.clone(), count_hf)))
        .merge(lifecycle::router())
        .merge(fleet::router())
        .fallback(hf::pass_on)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            hf::redirect_moved,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), check_host))
        .with_state(state.clone());
    let shutdown = async move { cancel.cancelled().await };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!("local API stopped: {e}");
    }
}

/// Refuses a request that names a host other than this machine's loopback or the API's own
/// address: a web page that got a name of its own to resolve to 127.0.0.1 (DNS rebinding)
/// must not reach the API.
async fn check_host(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    if host_allowed(host, state.api) {
        next.run(req).await
    } else {
        error(
            StatusCode::FORBIDDEN,
            format!("host {host:?} is not this node: use 127.0.0.1 or localhost"),
        )
    }
}

/// Whether `host` (a Host header) names this machine's loopback or the API's own address.
fn host_allowed(host: &str, api: SocketAddr) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback() || (!api.ip().is_unspecified() && ip == api.ip()),
        Err(_) => false,
    }
}

/// Counts the HF endpoint's answers by status.
async fn count_hf(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    state.metrics.count_hf_request(resp.status().as_u16());
    resp
}

async fn metrics(State(state): State<ApiState>) -> String {
    fleet::refresh(&state).await;
    state.metrics.prometheus() + &prom::series(&state)
}

async fn status(State(state): State<ApiState>) -> Json<serde_json::Value> {
    let counters: serde_json::Map<_, _> = state
        .metrics
        .snapshot()
        .into_iter()
        .map(|(name, _, value)| (name.to_string(), value.into()))
        .collect();
    let hf_requests: serde_json::Map<_, _> = state
        .metrics
        .hf_requests()
        .into_iter()
        .map(|(status, n)| (status, n.into()))
        .collect();
    Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "listen": state.listen,
        "counters": counters,
        "hf_endpoint_requests": hf_requests,
    }))
}

async fn models(State(state): State<ApiState>) -> Response {
    let store = state.store.clone();
    match blocking(move || store.model_entries()).await {
        Ok(entries) => {
            let mut models: Vec<ModelInfo> = entries.iter().map(lifecycle::model_info).collect();
            models.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
            Json(models).into_response()
        }
        Err(e) => lifecycle::store_error(&e),
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
        Ok(manifest) => Json(ModelInfo::added(&manifest)).into_response(),
        Err(e) if e.exit_code() != 1 => lifecycle::store_error(&e),
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn peers(State(state): State<ApiState>) -> Json<Vec<PeerInfo>> {
    Json(state.fetcher.peers.table().await)
}

/// The body of `POST /v1/fetch`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FetchBody {
    /// Model name or id.
    pub model: String,
    /// Extra peers to dial.
    pub peers: Vec<SocketAddr>,
    /// Where the files go (absolute roots).
    pub targets: Vec<Target>,
    /// Include globs (HuggingFace repos).
    #[serde(default)]
    pub include: Vec<String>,
    /// Exclude globs (HuggingFace repos).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Only plan.
    #[serde(default)]
    pub dry_run: bool,
}

impl FetchBody {
    /// The body for a request.
    pub fn new(req: &FetchRequest) -> Self {
        Self {
            model: req.model.to_string(),
            peers: req.peers.clone(),
            targets: req.targets.clone(),
            include: req.include.clone(),
            exclude: req.exclude.clone(),
            dry_run: req.dry_run,
        }
    }
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
    /// Something the user should know while the fetch runs (HuggingFace waiting for
    /// `hf_hours`, say).
    Notice {
        /// The message.
        message: String,
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
        targets: body.targets,
        include: body.include,
        exclude: body.exclude,
        dry_run: body.dry_run,
    };
    // The fetch runs to the end even if the client goes away: the blobs stay useful.
    tokio::spawn(async move {
        let progress_tx = tx.clone();
        let last = fetch_lines(&state.fetcher, req, PROGRESS_EVERY, move |line| {
            let _ = progress_tx.try_send(line);
        })
        .await;
        let _ = tx.send(last).await;
    });
    let lines = tokio_stream::wrappers::ReceiverStream::new(rx).map(|line| {
        let mut json = serde_json::to_vec(&line).expect("fetch lines serialize");
        json.push(b'\n');
        Ok::<_, std::convert::Infallible>(json)
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}

/// Runs a fetch, reporting a [`FetchLine::Start`] when it starts and a
/// [`FetchLine::Progress`] every `every`; returns the last line ([`FetchLine::Done`] or
/// [`FetchLine::Error`]).
pub async fn fetch_lines(
    fetcher: &Fetcher,
    req: FetchRequest,
    every: std::time::Duration,
    mut on_line: impl FnMut(FetchLine),
) -> FetchLine {
    // Set by the fetch when it starts; read by the ticker below, in the same task.
    type Started = Option<(FetchLine, Arc<FetchProgress>)>;
    let started: Arc<std::sync::Mutex<Started>> = Arc::default();
    let slot = started.clone();
    let fetch = fetcher.fetch(req, move |manifest, progress| {
        let line = FetchLine::Start {
            name: manifest.name().to_string(),
            total: manifest.total_size(),
            files: manifest.files().len(),
        };
        *slot.lock().expect("progress slot lock") = Some((line, progress));
    });
    tokio::pin!(fetch);
    let mut tick = tokio::time::interval(every);
    let mut announced = false;
    let mut last_notice = None;
    let result = loop {
        tokio::select! {
            result = &mut fetch => break result,
            _ = tick.tick() => {}
        }
        let notice = fetcher.limits.notice();
        if notice != last_notice {
            if let Some(message) = notice.clone() {
                on_line(FetchLine::Notice { message });
            }
            last_notice = notice;
        }
        let slot = started.lock().expect("progress slot lock").clone();
        if let Some((start, progress)) = slot {
            if !std::mem::replace(&mut announced, true) {
                on_line(start);
            }
            on_line(progress_line(&progress));
        }
    };
    match result {
        Ok(report) => FetchLine::Done { report },
        Err(e) => FetchLine::Error {
            message: e.to_string(),
            code: e.exit_code(),
            hint: e.hint().map(str::to_string),
        },
    }
}

/// A progress line for `p`.
pub fn progress_line(p: &FetchProgress) -> FetchLine {
    FetchLine::Progress {
        done: p.done(),
        total: p.total(),
        files_done: p.files_done(),
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
    let body = ApiError {
        error,
        code: None,
        hint: None,
    };
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_names_and_the_api_address_are_this_node() {
        let api: SocketAddr = "127.0.0.1:7342".parse().unwrap();
        for ok in [
            "127.0.0.1:7342",
            "localhost:7342",
            "LOCALHOST",
            "[::1]:7342",
            "127.0.0.2",
        ] {
            assert!(host_allowed(ok, api), "{ok}");
        }
        for bad in [
            "attacker.example",
            "attacker.example:7342",
            "",
            "10.0.0.5:7342",
            "[::]",
        ] {
            assert!(!host_allowed(bad, api), "{bad}");
        }
        let lan: SocketAddr = "10.0.0.5:7342".parse().unwrap();
        assert!(host_allowed("10.0.0.5:7342", lan));
        let any: SocketAddr = "0.0.0.0:7342".parse().unwrap();
        assert!(!host_allowed("0.0.0.0:7342", any));
    }
}
