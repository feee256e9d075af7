//! The HuggingFace-compatible read API on the node's API port, so that clients honouring
//! `HF_ENDPOINT` (huggingface_hub, the `hf` CLI, transformers, diffusers, hf-hub) download
//! through the mesh and get what the Hub would answer:
//!
//! - metadata ([`meta`]): `GET /api/models/{repo}` and `.../revision/{rev}`, `.../tree/...`,
//!   `POST .../paths-info/{rev}`, `GET .../auth-check`. They come from the Hub's own answers
//!   for the commit, kept in the store (`hf::meta`), and never wait for file content;
//! - content ([`resolve`]): `HEAD`/`GET /{repo}/resolve/{rev}/{path}` with the Hub's headers.
//!   A `GET` fetches only that file (peers first, HuggingFace as the fallback, shared with
//!   every other request for it) and streams it as it arrives ([`stream`]).
//!
//! Everything else (datasets, spaces, search, `whoami`, uploads) is passed on to the Hub as it
//! came ([`pass`]).
//!
//! A repo the Hub moved (a one-part id such as `gpt2`, a renamed repo) is redirected as the Hub
//! redirects it, relative to the node ([`moved`]).
//!
//! Errors are the Hub's (status, `X-Error-Code`, `X-Error-Message`, `{"error": ...}`), passed
//! on as the Hub sent them where it sent them. Gated and private repos are served only to a
//! request whose token the Hub accepts for that repo, or the node owner's API token ([`gate`]).
//! Files are served from this origin, never redirected, and Xet is never advertised.

mod gate;
mod meta;
mod moved;
mod pass;
mod resolve;
mod stream;

use axum::{
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};

pub(crate) use self::{gate::Gate, moved::redirect_moved, pass::pass_on, stream::Poisoned};
use super::ApiState;
use crate::hf::{meta::MetaError, Answer, HubError};

/// The routes, to merge into the local API.
pub(crate) fn router() -> Router<ApiState> {
    Router::new()
        .route("/api/models/{org}/{name}", get(meta::model_info))
        .route(
            "/api/models/{org}/{name}/revision/{rev}",
            get(meta::revision),
        )
        .route("/api/models/{org}/{name}/auth-check", get(meta::auth_check))
        .route("/api/models/{org}/{name}/tree/{rev}", get(meta::tree_root))
        .route(
            "/api/models/{org}/{name}/tree/{rev}/{*path}",
            get(meta::tree),
        )
        .route(
            "/api/models/{org}/{name}/paths-info/{rev}",
            post(meta::paths_info),
        )
        .route(
            "/{org}/{name}/resolve/{rev}/{*path}",
            get(resolve::resolve).head(resolve::resolve),
        )
}

/// An error as the Hub sends it.
pub(crate) fn hf_error(status: StatusCode, code: &str, message: &str) -> Response {
    let mut resp = (status, Json(serde_json::json!({ "error": message }))).into_response();
    let h = resp.headers_mut();
    if !code.is_empty() {
        h.insert("x-error-code", header_value(code));
    }
    h.insert("x-error-message", header_value(message));
    resp
}

/// A Hub answer passed on as it came.
fn passthrough(answer: &Answer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut resp = (status, answer.body.clone()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(code) = &answer.code {
        h.insert("x-error-code", header_value(code));
    }
    if let Some(message) = &answer.message {
        h.insert("x-error-message", header_value(message));
    }
    resp
}

/// What a metadata failure looks like to a client: the Hub's refusal as it came; "try later"
/// (503, which clients retry) when the Hub can't be asked and nothing is kept.
fn meta_error(e: &MetaError) -> Response {
    match e {
        MetaError::Refused(answer) => passthrough(answer),
        MetaError::Hub(HubError::Moved { repo, to }) => {
            let mut resp = StatusCode::TEMPORARY_REDIRECT.into_response();
            resp.extensions_mut().insert(moved::Moved {
                from: repo.clone(),
                to: to.clone(),
            });
            resp
        }
        MetaError::Hub(e) if e.is_unreachable() => {
            let mut resp = hf_error(StatusCode::SERVICE_UNAVAILABLE, "", &e.to_string());
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            resp
        }
        e => hf_error(StatusCode::BAD_GATEWAY, "", &e.to_string()),
    }
}

/// The bearer token a request carries, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// A header value from text that may hold anything (non-visible characters are dropped).
fn header_value(text: &str) -> HeaderValue {
    let clean: String = text
        .chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control())
        .collect();
    HeaderValue::from_str(&clean).unwrap_or_else(|_| HeaderValue::from_static(""))
}
