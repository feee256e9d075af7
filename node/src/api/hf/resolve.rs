//! `HEAD`/`GET /{repo}/resolve/{rev}/{path}`: a file's metadata as the Hub gives it (never
//! waiting for content), and its bytes, whole or a range, from this origin.

use axum::{
    extract::{Path, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
};

use super::{hf_error, stream, ApiState};
use crate::{
    fetch::FetchError,
    hf::{HubError, HubFile},
};

pub(super) async fn resolve(
    State(state): State<ApiState>,
    method: Method,
    Path((org, name, rev, path)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let repo = format!("{org}/{name}");
    let revision = match state.revision_for(&repo, &rev, &headers).await {
        Ok(revision) => revision,
        Err(resp) => return resp,
    };
    let info = &revision.info;
    let commit = header_value(&info.commit);
    let Some(file) = info.file(&path) else {
        let mut resp = hf_error(StatusCode::NOT_FOUND, "EntryNotFound", "Entry not found");
        resp.headers_mut().insert("x-repo-commit", commit);
        return resp;
    };
    let size = file.size;
    let range = match parse_range(&headers, size) {
        Ok(range) => range,
        Err(()) => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response()
        }
    };
    let (status, start, end) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, end),
        None => (StatusCode::OK, 0, size),
    };
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("x-repo-commit", commit);
    for (name, value) in file_headers(file) {
        resp = resp.header(name, value);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        resp = resp.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    if method == Method::HEAD || start == end {
        return resp
            .body(axum::body::Body::empty())
            .expect("valid response");
    }
    if start > 0 && state.poisoned.is_poisoned(file.etag()) {
        return hf_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "",
            "an earlier download of this file was aborted: download it again from the start",
        );
    }
    // A client the Hub lets read a gated repo may fetch its files with its own token (never
    // the node's API token, which stays here).
    let token = match state.hub_auth(&headers) {
        crate::hf::Auth::Client(token) => token,
        crate::hf::Auth::Node => None,
    };
    let body = stream::body(
        &state.fetcher,
        &state.poisoned,
        info,
        file,
        (start, end),
        token,
    );
    match body.await {
        Ok(body) => resp.body(body).expect("valid response"),
        Err(e) => fetch_error(&e),
    }
}

/// The headers the Hub sends for a file: its git blob id as `ETag`, and for LFS files the
/// sha256 as `X-Linked-Etag` and the size as `X-Linked-Size` (what clients key caches on).
fn file_headers(file: &HubFile) -> Vec<(&'static str, String)> {
    let mut out = vec![("etag", format!("\"{}\"", file.git_oid))];
    if let Some(sha) = &file.sha256 {
        out.push(("x-linked-etag", format!("\"{sha}\"")));
        out.push(("x-linked-size", file.size.to_string()));
    }
    out
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` against a file of `size` bytes: the half-open range to
/// send, `Ok(None)` without a Range header, `Err` when unsatisfiable or malformed. An end past
/// the file is clamped (hf-hub asks one byte past it).
fn parse_range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let spec = spec.to_str().map_err(|_| ())?;
    let (a, b) = spec
        .strip_prefix("bytes=")
        .and_then(|s| s.split_once('-'))
        .ok_or(())?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.trim().parse().map_err(|_| ())?;
        (size.saturating_sub(n), size)
    } else {
        let start: u64 = a.trim().parse().map_err(|_| ())?;
        let end = if b.trim().is_empty() {
            size
        } else {
            b.trim()
                .parse::<u64>()
                .map_err(|_| ())?
                .saturating_add(1)
                .min(size)
        };
        (start, end)
    };
    if start >= size || start >= end {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// A download that failed before its first byte, as an HTTP answer.
fn fetch_error(e: &FetchError) -> Response {
    let (status, code) = match e {
        FetchError::Shared(inner) => return fetch_error(inner),
        FetchError::Hub(HubError::NotFound(_)) => (StatusCode::NOT_FOUND, "EntryNotFound"),
        FetchError::Hub(HubError::Unauthorized { .. }) => (StatusCode::UNAUTHORIZED, "GatedRepo"),
        FetchError::Hub(e) if e.is_unreachable() => (StatusCode::SERVICE_UNAVAILABLE, ""),
        FetchError::Hub(_) | FetchError::Download(_) => (StatusCode::BAD_GATEWAY, ""),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, ""),
    };
    hf_error(status, code, &e.to_string())
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(spec: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, spec.parse().unwrap());
        parse_range(&h, size)
    }

    #[test]
    fn ranges_as_http_says() {
        assert_eq!(range("bytes=0-0", 10), Ok(Some((0, 1))));
        assert_eq!(range("bytes=5-", 10), Ok(Some((5, 10))));
        assert_eq!(range("bytes=-3", 10), Ok(Some((7, 10))));
        // hf-hub asks one byte past the end: clamped.
        assert_eq!(range("bytes=8-10", 10), Ok(Some((8, 10))));
        assert_eq!(range("bytes=10-", 10), Err(()));
        assert_eq!(range("bytes=0-0", 0), Err(()));
        assert_eq!(range("items=0-1", 10), Err(()));
        assert_eq!(parse_range(&HeaderMap::new(), 10), Ok(None));
    }
}
