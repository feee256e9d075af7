//! File bytes, as the Hub and its CDN send them: ranges, signed CDN URLs, counted as sent.

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc},
};

use axum::{
    body::Body,
    extract::{Path, Query, State},
    http::{header, HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_stream::StreamExt;

use crate::{file_key, repo::RepoFile, Hub};

/// Bytes read and sent at a time.
const CHUNK: usize = 64 << 10;

fn signature(hub: &Hub, sha: &str, expires: &str) -> String {
    let mut h = sha2::Sha256::new();
    h.update(hub.secret);
    h.update(sha.as_bytes());
    h.update(expires.as_bytes());
    hex::encode(h.finalize())
}

/// The 302 the Hub answers for an LFS file: to a signed CDN URL, with the file's metadata.
pub(crate) fn redirect_to_cdn(hub: &Hub, id: &str, commit: &str, file: &RepoFile) -> Response {
    let expires = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600)
        .to_string();
    let location = format!(
        "{}/cdn/{}?expires={expires}&sig={}",
        hub.cdn,
        file.sha256,
        signature(hub, &file.sha256, &expires),
    );
    let mut resp = (
        StatusCode::FOUND,
        [
            (header::LOCATION.as_str(), location),
            ("x-repo-commit", commit.to_string()),
            ("x-linked-etag", format!("\"{}\"", file.sha256)),
            ("x-linked-size", file.size.to_string()),
            (header::ETAG.as_str(), format!("\"{}\"", file.git_oid)),
        ],
    )
        .into_response();
    if hub.xet {
        let h = resp.headers_mut();
        h.insert("x-xet-hash", file.xet_hash().parse().unwrap());
        let link = format!(
            "<{}/api/models/{id}/xet-read-token/{commit}>; rel=\"xet-auth\"",
            hub.api
        );
        h.insert(header::LINK, link.parse().unwrap());
    }
    resp
}

pub(crate) async fn cdn_get(
    State(hub): State<Arc<Hub>>,
    method: Method,
    Path(sha): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let (Some(expires), Some(sig)) = (q.get("expires"), q.get("sig")) else {
        return (StatusCode::FORBIDDEN, "missing signature").into_response();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if *sig != signature(&hub, &sha, expires) || expires.parse::<u64>().unwrap_or(0) < now {
        return (StatusCode::FORBIDDEN, "bad or expired signature").into_response();
    }
    // A CDN never sees the Hub token: a client that forwards it across origins is wrong.
    if headers.contains_key(header::AUTHORIZATION) {
        return (
            StatusCode::BAD_REQUEST,
            "Authorization forwarded to the CDN",
        )
            .into_response();
    }
    let Some((id, file)) = hub.repos.by_sha256(&sha) else {
        return (StatusCode::NOT_FOUND, "no such object").into_response();
    };
    let key = file_key(id, file);
    let mut resp = serve_bytes(&hub, &method, &headers, file, &key).await;
    resp.headers_mut().insert(
        header::ETAG,
        format!("\"{}\"", file.sha256).parse().unwrap(),
    );
    resp
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` against a file of `size` bytes: the half-open range
/// to send, `Ok(None)` without a Range, `Err` when unsatisfiable or malformed. An end past
/// the file is clamped, as HTTP says.
fn range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let spec = spec.to_str().map_err(|_| ())?;
    let spec = spec.strip_prefix("bytes=").ok_or(())?;
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        (size.saturating_sub(n), size)
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            size
        } else {
            (b.parse::<u64>().map_err(|_| ())? + 1).min(size)
        };
        (start, end)
    };
    if start >= size || start >= end {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// The file's bytes (or a range of them), streamed from disk and counted as they are sent.
pub(crate) async fn serve_bytes(
    hub: &Arc<Hub>,
    method: &Method,
    headers: &HeaderMap,
    file: &RepoFile,
    key: &str,
) -> Response {
    let size = file.size;
    let (status, start, end) = match range(headers, size) {
        Ok(Some((start, end))) => (StatusCode::PARTIAL_CONTENT, start, end),
        Ok(None) => (StatusCode::OK, 0, size),
        Err(()) => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response()
        }
    };
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if status == StatusCode::PARTIAL_CONTENT {
        resp = resp.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    if method == Method::HEAD || start == end {
        return resp.body(Body::empty()).unwrap();
    }
    let mut f = tokio::fs::File::open(&file.disk)
        .await
        .expect("repo file readable");
    f.seek(std::io::SeekFrom::Start(start)).await.unwrap();
    let corrupt = hub.corrupt.iter().any(|c| c == key);
    let mid = size / 2;
    // The first CDN body of each file may stop after some bytes and hang (a stalled CDN).
    // (Only a body it would cut short counts: a shorter one would go out whole.)
    let stall_at = hub.stall_once_after.filter(|&n| {
        let mut stalled = hub.stalled.lock().unwrap();
        let first = n < end - start && !stalled.iter().any(|k| k == key);
        if first {
            stalled.push(key.to_string());
        }
        first
    });
    let limit = stall_at.map_or(end - start, |n| n.min(end - start));
    let pace = hub
        .rate
        .map(|rate| std::time::Duration::from_secs_f64(CHUNK as f64 / rate.max(1) as f64));
    let (hub, key) = (hub.clone(), key.to_string());
    let mut offset = start;
    let stream =
        tokio_util::io::ReaderStream::with_capacity(f.take(limit), CHUNK).map(move |chunk| {
            let mut chunk = chunk?.to_vec();
            if corrupt && (offset..offset + chunk.len() as u64).contains(&mid) {
                chunk[(mid - offset) as usize] ^= 0x01;
            }
            offset += chunk.len() as u64;
            let n = chunk.len() as u64;
            hub.served.fetch_add(n, Ordering::Relaxed);
            *hub.served_per_file
                .lock()
                .unwrap()
                .entry(key.clone())
                .or_default() += n;
            Ok::<_, std::io::Error>(axum::body::Bytes::from(chunk))
        });
    let body = match (stall_at.is_some(), pace) {
        (true, _) => Body::from_stream(stream.chain(tokio_stream::pending())),
        (false, Some(pace)) => Body::from_stream(stream.throttle(pace)),
        (false, None) => Body::from_stream(stream),
    };
    resp.body(body).unwrap()
}
