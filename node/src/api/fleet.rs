//! The fleet page: `GET /` serves one HTML file embedded in the binary (no build step, no
//! CDN), which polls `GET /v1/fleet` once a second and draws this node, its peers with what
//! each holds, the transfers in progress and the models in the store.
//!
//! Rates are sampled here when read, at most about once a second ([`refresh`]). Both routes
//! answer only requests whose `Host` is an IP address or `localhost`, so a web page can't read
//! them by DNS rebinding.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{atomic::Ordering, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{Html, IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde::{Deserialize, Serialize};

use super::{lifecycle, ApiState, ModelInfo};
use crate::{discovery::PeerInfo, limits::LimitStatus, store::blocking};

/// The page, as shipped.
const PAGE: &str = include_str!("fleet.html");
/// The youngest sample that is taken again: the page polls once a second.
const SAMPLE_EVERY: Duration = Duration::from_millis(900);
/// Rates are shown only over a span up to this long.
const RATE_SPAN_MAX: Duration = Duration::from_secs(5);

/// What `GET /v1/fleet` answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FleetView {
    /// This node.
    pub node: NodeView,
    /// Configured limits, and whether each binds now.
    pub limits: Vec<LimitStatus>,
    /// Every peer this node knows.
    pub peers: Vec<PeerInfo>,
    /// Fetches running in this node.
    pub transfers: Vec<TransferView>,
    /// The models in the store.
    pub models: Vec<ModelInfo>,
}

/// This node, for the page's header.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeView {
    /// The machine's host name.
    pub host: String,
    /// The QUIC address peers dial.
    pub listen: SocketAddr,
    /// mesh's version.
    pub version: String,
    /// Disk bytes the store folder uses.
    pub store_bytes: u64,
    /// Free bytes on the store's disk.
    pub disk_free: u64,
    /// `max_store`, if set.
    pub max_store: Option<u64>,
    /// Bytes per second arriving (peers and HuggingFace).
    pub rate_in: u64,
    /// Bytes per second sent to peers.
    pub rate_out: u64,
}

/// A running fetch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransferView {
    /// What was asked for (the model's name once resolved).
    pub model: String,
    /// Seconds since it started.
    pub seconds: f64,
    /// Verified bytes present.
    pub done: u64,
    /// Bytes in the model (0 until it is resolved).
    pub total: u64,
    /// Bytes per second over the last second.
    pub rate: u64,
    /// Where its bytes came from: peer addresses and `huggingface`, with bytes.
    pub sources: Vec<(String, u64)>,
    /// Each file.
    pub files: Vec<FileView>,
}

/// One file of a running fetch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileView {
    /// Its path in the model.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// Verified bytes present.
    pub done: u64,
    /// Bytes per second over the last second.
    pub rate: u64,
}

/// Rates and disk figures, sampled when read ([`refresh`]).
#[derive(Debug, Default)]
pub(crate) struct Rates {
    inner: Mutex<Sampled>,
}

#[derive(Debug, Default)]
struct Sampled {
    at: Option<Instant>,
    received: u64,
    sent: u64,
    rate_in: u64,
    rate_out: u64,
    /// (transfer, file) -> (done, rate).
    files: HashMap<(u64, usize), (u64, u64)>,
    store_bytes: u64,
    disk_free: u64,
}

impl Rates {
    /// The store's disk bytes and the disk's free bytes, as last sampled ([`refresh`]).
    pub(super) fn disk(&self) -> (u64, u64) {
        let s = self.inner.lock().expect("rates lock");
        (s.store_bytes, s.disk_free)
    }
}

pub(super) fn router() -> Router<ApiState> {
    Router::new()
        .route("/", get(page))
        .route("/v1/fleet", get(fleet))
        .route_layer(middleware::from_fn(local_host_only))
}

/// Refuses requests whose `Host` is a name other than `localhost` (DNS rebinding).
async fn local_host_only(req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let ok = name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok();
    if ok {
        next.run(req).await
    } else {
        (
            StatusCode::FORBIDDEN,
            "Host must be an IP address or localhost",
        )
            .into_response()
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn fleet(State(state): State<ApiState>) -> Response {
    refresh(&state).await;
    let store = state.store.clone();
    let entries = match blocking(move || store.model_entries()).await {
        Ok(entries) => entries,
        Err(e) => return lifecycle::store_error(&e),
    };
    let mut models: Vec<ModelInfo> = entries.iter().map(lifecycle::model_info).collect();
    models.sort_by(|a, b| a.name.cmp(&b.name));
    let peers = state.fetcher.peers.table().await;
    let sampled = state.rates.inner.lock().expect("rates lock");
    let hf_bytes = state.fetcher.limits.hf_bytes();
    let transfers = state
        .fetcher
        .transfers
        .list()
        .iter()
        .map(|t| {
            let files: Vec<FileView> = t
                .progress()
                .map(|(_, p)| {
                    p.files
                        .iter()
                        .enumerate()
                        .map(|(i, f)| FileView {
                            path: f.path.to_string(),
                            size: f.size,
                            done: f.done.load(Ordering::Relaxed),
                            rate: sampled.files.get(&(t.id, i)).map_or(0, |s| s.1),
                        })
                        .collect()
                })
                .unwrap_or_default();
            TransferView {
                model: t.progress().map_or(t.model.clone(), |(n, _)| n.to_string()),
                seconds: t.started.elapsed().as_secs_f64(),
                done: files.iter().map(|f| f.done).sum(),
                total: files.iter().map(|f| f.size).sum(),
                rate: files.iter().map(|f| f.rate).sum(),
                sources: t.sources(&state.fetcher.peers, hf_bytes),
                files,
            }
        })
        .collect();
    let view = FleetView {
        node: NodeView {
            host: host_name(),
            listen: state.listen,
            version: env!("CARGO_PKG_VERSION").to_string(),
            store_bytes: sampled.store_bytes,
            disk_free: sampled.disk_free,
            max_store: state.fetcher.max_store,
            rate_in: sampled.rate_in,
            rate_out: sampled.rate_out,
        },
        limits: state.fetcher.limits.status(),
        peers,
        transfers,
        models,
    };
    drop(sampled);
    Json(view).into_response()
}

/// Takes a new sample of the node's byte counters, each transfer's files and the store's disk
/// use, unless the last one is less than [`SAMPLE_EVERY`] old. Called by the readers (the page,
/// `/metrics`), so an idle node that nobody looks at does no sampling: walking the store folder
/// once a second was a blocking-thread hop and 30 system calls per second on every node.
pub(super) async fn refresh(state: &ApiState) {
    let fresh = |s: &Sampled| s.at.is_some_and(|at| at.elapsed() < SAMPLE_EVERY);
    if fresh(&state.rates.inner.lock().expect("rates lock")) {
        return;
    }
    let store = state.store.clone();
    let disk = blocking(move || Ok((store.usage(), store.disk_free().unwrap_or(0)))).await;
    let received =
        state.metrics.bytes_received.load(Ordering::Relaxed) + state.fetcher.limits.hf_bytes();
    let sent = state.metrics.bytes_sent.load(Ordering::Relaxed);
    let now = Instant::now();
    let mut s = state.rates.inner.lock().expect("rates lock");
    if fresh(&s) {
        return;
    }
    // A rate over a long gap (the first look in a while) would be an old average: show none.
    let secs =
        s.at.map(|at| now.duration_since(at).as_secs_f64())
            .filter(|secs| *secs <= RATE_SPAN_MAX.as_secs_f64());
    let rate = |new: u64, old: u64| match secs {
        Some(secs) if secs > 0.0 => (new.saturating_sub(old) as f64 / secs) as u64,
        _ => 0,
    };
    s.rate_in = rate(received, s.received);
    s.rate_out = rate(sent, s.sent);
    (s.received, s.sent, s.at) = (received, sent, Some(now));
    if let Ok((used, free)) = disk {
        (s.store_bytes, s.disk_free) = (used, free);
    }
    let mut files = HashMap::new();
    for t in state.fetcher.transfers.list() {
        let Some((_, progress)) = t.progress() else {
            continue;
        };
        for (i, f) in progress.files.iter().enumerate() {
            let done = f.done.load(Ordering::Relaxed);
            let before = s.files.get(&(t.id, i)).map_or(done, |x| x.0);
            files.insert((t.id, i), (done, rate(done, before)));
        }
    }
    s.files = files;
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}
