//! The HuggingFace-compatible read API on the node's local API port, so clients that honour
//! `HF_ENDPOINT` (huggingface_hub, transformers, diffusers, hf-hub) download through the mesh:
//!
//! - `GET /api/models/{org}/{name}/revision/{rev}`: repo info with `sha` and `siblings`;
//! - `GET /api/models/{org}/{name}/tree/{rev}[/{path}]` (`?recursive=true`);
//! - `POST /api/models/{org}/{name}/paths-info/{rev}` (form `paths=`);
//! - `HEAD`/`GET /{org}/{name}/resolve/{rev}/{path}` with `X-Repo-Commit`, `ETag`,
//!   `X-Linked-Etag`, `X-Linked-Size`, and 206 for `Range`.
//!
//! Answers come from models in the store that came from HuggingFace; a repo or file that is
//! not here is first fetched through the mesh (peers first, HuggingFace as the fallback), into
//! `MESH_HOME/hf-endpoint`. Files are served straight from the store, never redirected, and
//! Xet is never advertised.

use std::{collections::BTreeMap, path::PathBuf};

use axum::{
    body::Body,
    extract::{Path, Query, RawForm, State},
    http::{header, HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use mesh_proto::{FileEntry, Manifest, ModelRef, Source};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::ApiState;
use crate::{
    fetch::{FetchRequest, Target},
    store::blocking,
};

/// The routes, to merge into the local API.
pub(crate) fn router() -> Router<ApiState> {
    Router::new()
        .route("/api/models/{org}/{name}/revision/{rev}", get(revision))
        .route("/api/models/{org}/{name}/tree/{rev}", get(tree_root))
        .route("/api/models/{org}/{name}/tree/{rev}/{*path}", get(tree))
        .route(
            "/api/models/{org}/{name}/paths-info/{rev}",
            post(paths_info),
        )
        .route(
            "/{org}/{name}/resolve/{rev}/{*path}",
            get(resolve).head(resolve),
        )
}

/// A repo at a commit, as the store knows it: the union of its HF manifests' files.
struct LocalRepo {
    commit: String,
    files: BTreeMap<String, FileEntry>,
}

fn hf_error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        [("x-error-code", code.to_string())],
        Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

/// The repo from the store; if absent (or lacking `path`), fetched through the mesh first.
async fn local_repo(
    state: &ApiState,
    repo: &str,
    rev: &str,
    path: Option<&str>,
) -> Result<LocalRepo, Response> {
    if let Some(found) = find(state, repo, rev).await? {
        if path.is_none_or(|p| found.files.contains_key(p)) {
            return Ok(found);
        }
    }
    let req = FetchRequest {
        model: ModelRef::Name(format!("{repo}@{rev}")),
        peers: Vec::new(),
        targets: vec![Target::folder(
            state
                .store
                .home()
                .join("hf-endpoint")
                .join(repo.replace('/', "--")),
        )],
        include: path.map(|p| vec![globset_escape(p)]).unwrap_or_default(),
        exclude: Vec::new(),
        dry_run: false,
    };
    if let Err(e) = state.fetcher.fetch(req, |_, _| {}).await {
        let status = match e.exit_code() {
            3 => StatusCode::NOT_FOUND,
            4 => StatusCode::UNAUTHORIZED,
            _ => StatusCode::BAD_GATEWAY,
        };
        let code = if status == StatusCode::NOT_FOUND {
            "RepoNotFound"
        } else {
            "MeshFetchFailed"
        };
        return Err(hf_error(status, code, e.to_string()));
    }
    match find(state, repo, rev).await? {
        Some(found) => Ok(found),
        None => Err(hf_error(
            StatusCode::NOT_FOUND,
            "RepoNotFound",
            format!("{repo}@{rev} not found"),
        )),
    }
}

async fn find(state: &ApiState, repo: &str, rev: &str) -> Result<Option<LocalRepo>, Response> {
    let store = state.store.clone();
    let manifests: Vec<Manifest> = blocking(move || store.manifests())
        .await
        .map_err(|e| hf_error(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string()))?;
    let matching: Vec<(&String, &Manifest)> = manifests
        .iter()
        .filter_map(|m| match m.source() {
            Source::HuggingFace { repo: r, commit } if r == repo => Some((commit, m)),
            _ => None,
        })
        .collect();
    // A commit sha pins one; a branch name takes the commit of the manifest named after the
    // repo (the last full fetch), else any.
    let commit = if matching.iter().any(|(c, _)| c.as_str() == rev) {
        rev.to_string()
    } else if let Some((c, _)) = matching.iter().find(|(_, m)| m.name() == repo) {
        c.to_string()
    } else if let Some((c, _)) = matching.first() {
        c.to_string()
    } else {
        return Ok(None);
    };
    let mut files = BTreeMap::new();
    for (c, m) in &matching {
        if **c == commit {
            for f in m.files() {
                files.insert(f.path.to_string(), f.clone());
            }
        }
    }
    Ok(Some(LocalRepo { commit, files }))
}

fn globset_escape(path: &str) -> String {
    path.chars()
        .map(|c| match c {
            '*' | '?' | '[' | ']' | '{' | '}' | '\\' => format!("[{c}]"),
            c => c.to_string(),
        })
        .collect()
}

fn is_lfs(f: &FileEntry) -> bool {
    f.sha256.is_some()
}

fn tree_entry(f: &FileEntry) -> serde_json::Value {
    let etag = f.etag.clone().unwrap_or_default();
    let mut v =
        serde_json::json!({ "type": "file", "oid": etag, "size": f.size, "path": f.path.as_str() });
    if let Some(sha) = &f.sha256 {
        v["lfs"] = serde_json::json!({ "oid": sha, "size": f.size, "pointerSize": 134 });
    }
    v
}

async fn revision(
    State(state): State<ApiState>,
    Path((org, name, rev)): Path<(String, String, String)>,
) -> Response {
    let repo_id = format!("{org}/{name}");
    let repo = match local_repo(&state, &repo_id, &rev, None).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    let siblings: Vec<_> = repo
        .files
        .values()
        .map(|f| {
            let mut s = serde_json::json!({ "rfilename": f.path.as_str(), "size": f.size });
            if let Some(etag) = &f.etag {
                if !is_lfs(f) {
                    s["blobId"] = etag.clone().into();
                }
            }
            if let Some(sha) = &f.sha256 {
                s["lfs"] = serde_json::json!({ "sha256": sha, "size": f.size, "pointerSize": 134 });
            }
            s
        })
        .collect();
    Json(serde_json::json!({
        "_id": repo.commit.get(..24).unwrap_or(&repo.commit),
        "id": repo_id,
        "modelId": repo_id,
        "sha": repo.commit,
        "private": false,
        "gated": false,
        "disabled": false,
        "tags": [],
        "siblings": siblings,
    }))
    .into_response()
}

async fn tree_root(
    State(state): State<ApiState>,
    Path((org, name, rev)): Path<(String, String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    tree_impl(&state, format!("{org}/{name}"), rev, String::new(), q).await
}

async fn tree(
    State(state): State<ApiState>,
    Path((org, name, rev, path)): Path<(String, String, String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    tree_impl(&state, format!("{org}/{name}"), rev, path, q).await
}

async fn tree_impl(
    state: &ApiState,
    repo_id: String,
    rev: String,
    dir: String,
    q: BTreeMap<String, String>,
) -> Response {
    let repo = match local_repo(state, &repo_id, &rev, None).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    let recursive = q.get("recursive").is_some_and(|v| v == "true" || v == "1");
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{}/", dir.trim_end_matches('/'))
    };
    let mut out = Vec::new();
    let mut dirs = std::collections::BTreeSet::new();
    for (path, f) in &repo.files {
        let Some(rest) = path.strip_prefix(&prefix) else {
            continue;
        };
        let mut parts: Vec<&str> = rest.split('/').collect();
        parts.pop();
        if !recursive && !parts.is_empty() {
            dirs.insert(format!("{prefix}{}", parts[0]));
            continue;
        }
        let mut acc = prefix.clone();
        for p in parts {
            acc.push_str(p);
            dirs.insert(acc.clone());
            acc.push('/');
        }
        out.push(tree_entry(f));
    }
    if !dir.is_empty() && out.is_empty() && dirs.is_empty() {
        return hf_error(
            StatusCode::NOT_FOUND,
            "EntryNotFound",
            format!("{dir} not found"),
        );
    }
    for d in dirs {
        out.push(
            serde_json::json!({ "type": "directory", "oid": "0".repeat(40), "size": 0, "path": d }),
        );
    }
    Json(out).into_response()
}

async fn paths_info(
    State(state): State<ApiState>,
    Path((org, name, rev)): Path<(String, String, String)>,
    RawForm(form): RawForm,
) -> Response {
    let repo = match local_repo(&state, &format!("{org}/{name}"), &rev, None).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&form).unwrap_or_default();
    let out: Vec<_> = form
        .iter()
        .filter(|(k, _)| k == "paths")
        .filter_map(|(_, p)| repo.files.get(p))
        .map(tree_entry)
        .collect();
    Json(out).into_response()
}

async fn resolve(
    State(state): State<ApiState>,
    method: Method,
    Path((org, name, rev, path)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let repo = match local_repo(&state, &format!("{org}/{name}"), &rev, Some(&path)).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    let Some(file) = repo.files.get(&path) else {
        return hf_error(
            StatusCode::NOT_FOUND,
            "EntryNotFound",
            format!("{path} not found"),
        );
    };
    let etag = file.etag.clone().unwrap_or_default();
    let data: Option<PathBuf> = if file.size == 0 {
        None
    } else {
        let store = state.store.clone();
        let hash = file.hash;
        match blocking(move || store.data_path(hash)).await {
            Ok(p) => Some(p),
            Err(e) => {
                return hf_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "MeshUnavailable",
                    e.to_string(),
                )
            }
        }
    };
    let size = file.size;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .map(|spec| {
            let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
            let start = if a.is_empty() {
                // `bytes=-N`: the last N bytes.
                size.saturating_sub(b.parse().unwrap_or(0))
            } else {
                a.parse().unwrap_or(u64::MAX)
            };
            let end = if a.is_empty() || b.is_empty() {
                size.saturating_sub(1)
            } else {
                b.parse::<u64>().unwrap_or(0).min(size.saturating_sub(1))
            };
            (start, end)
        });
    if let Some((start, end)) = range {
        if start >= size || start > end {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response();
        }
    }
    let (status, start, len) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, end + 1 - start),
        None => (StatusCode::OK, 0, size),
    };
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, len)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ETAG, format!("\"{etag}\""))
        .header("x-repo-commit", repo.commit.as_str())
        .header("x-linked-size", size);
    if is_lfs(file) {
        resp = resp.header("x-linked-etag", format!("\"{etag}\""));
    }
    if status == StatusCode::PARTIAL_CONTENT {
        resp = resp.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", start + len - 1),
        );
    }
    if method == Method::HEAD || len == 0 {
        return resp.body(Body::empty()).expect("valid response");
    }
    let path = data.expect("non-empty files have data");
    let mut f = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return hf_error(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string()),
    };
    if let Err(e) = f.seek(std::io::SeekFrom::Start(start)).await {
        return hf_error(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string());
    }
    crate::metrics::Metrics::add(&state.metrics.bytes_served_hf_endpoint, len);
    let stream = tokio_util::io::ReaderStream::with_capacity(f.take(len), 256 << 10);
    resp.body(Body::from_stream(stream))
        .expect("valid response")
}
