//! The store's lifecycle over the API, for `mesh rm`, `gc`, `verify`, `pin` and `unpin` when
//! a node holds the store: `POST /v1/rm`, `/v1/gc`, `/v1/verify`, `/v1/pin`. Each needs the
//! bearer token from `node.json`; an error carries the exit code the CLI should use.

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use serde::{Deserialize, Serialize};

use super::{authorized, ApiError, ApiState, ModelInfo};
use crate::{
    metrics::Metrics,
    store::{blocking, lifecycle::ModelEntry, StoreError},
};

/// The body of `POST /v1/rm` and `POST /v1/verify`: model names, ids or id prefixes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ModelsBody {
    /// The models (for verify, none means all).
    pub models: Vec<String>,
}

/// The body of `POST /v1/pin`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PinBody {
    /// The model.
    pub model: String,
    /// Pin (true) or unpin (false).
    pub pin: bool,
}

pub(super) fn router() -> Router<ApiState> {
    Router::new()
        .route("/v1/rm", post(rm))
        .route("/v1/gc", post(gc))
        .route("/v1/verify", post(verify))
        .route("/v1/pin", post(pin))
}

/// A model as `mesh ls` shows it, with its pin, source and last use.
pub fn model_info(entry: &ModelEntry) -> ModelInfo {
    let m = &entry.manifest;
    ModelInfo {
        id: m.id().to_string(),
        name: m.name().to_string(),
        size: m.total_size(),
        complete: entry.complete,
        files: Some(m.files().len()),
        pinned: entry.pinned,
        source: Some(match m.source() {
            mesh_proto::Source::HuggingFace { repo, commit } => {
                format!("hf:{repo}@{}", &commit[..commit.len().min(12)])
            }
            _ => "local".to_string(),
        }),
        last_used: entry.last_used,
    }
}

/// The error response for a store error, with its exit code and hint.
pub(super) fn store_error(e: &StoreError) -> Response {
    let code = e.exit_code();
    let status = match code {
        3 => StatusCode::NOT_FOUND,
        6 => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let body = ApiError {
        error: e.to_string(),
        code: Some(code),
        hint: e.hint().map(str::to_string),
    };
    (status, Json(body)).into_response()
}

fn unauthorized() -> Response {
    let body = ApiError {
        error: "missing or wrong API token".into(),
        code: None,
        hint: None,
    };
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

async fn rm(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Json(body): Json<ModelsBody>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let store = state.store.clone();
    match blocking(move || store.remove_models(&body.models)).await {
        Ok(removed) => Json(removed).into_response(),
        Err(e) => store_error(&e),
    }
}

async fn gc(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let store = state.store.clone();
    let fetching = !state.fetcher.transfers.is_empty();
    match blocking(move || store.gc(fetching)).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => store_error(&e),
    }
}

async fn verify(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Json(body): Json<ModelsBody>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let store = state.store.clone();
    match blocking(move || store.verify(&body.models)).await {
        Ok(report) => {
            Metrics::add(&state.metrics.store_verify_failures, report.corrupt as u64);
            Json(report).into_response()
        }
        Err(e) => store_error(&e),
    }
}

async fn pin(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Json(body): Json<PinBody>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let store = state.store.clone();
    match blocking(move || store.set_pinned(&body.model, body.pin)).await {
        Ok(entry) => Json(model_info(&entry)).into_response(),
        Err(e) => store_error(&e),
    }
}
