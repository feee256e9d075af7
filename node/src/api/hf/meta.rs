//! The endpoint's metadata routes: revision info, tree listings, paths-info and auth-check,
//! answered from the Hub's own answers for the commit (`hf::meta`): the listing is always the
//! commit's full file list, whatever the store holds, and nothing waits for file content.
//! Xet is never advertised (`xetHash` is dropped) and listings come in one page. An expanded
//! listing (`expand=true`: each entry's last commit) is the Hub's, passed on.

use std::collections::BTreeSet;

use axum::{
    extract::{Path, RawForm, RawQuery, Request, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};

use super::{bearer, hf_error, meta_error, passthrough, ApiState};
use crate::hf::{
    meta::{MetaError, Revision},
    Auth,
};

/// Query or form pairs, keys repeated as clients send them (`expand=a&expand=b`).
type Pairs = Vec<(String, String)>;

fn pairs(raw: Option<&str>) -> Pairs {
    raw.and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default()
}

fn truthy(pairs: &Pairs, key: &str) -> bool {
    pairs
        .iter()
        .any(|(k, v)| k == key && matches!(v.as_str(), "true" | "True" | "1"))
}

impl ApiState {
    /// Whose token to send the Hub for this request: the client's own, or the node owner's
    /// HF token when the client holds the node's API token (which never leaves the node).
    pub(super) fn hub_auth<'a>(&self, headers: &'a HeaderMap) -> Auth<'a> {
        match bearer(headers) {
            Some(t) if blake3::hash(t.as_bytes()) == blake3::hash(self.token.as_bytes()) => {
                Auth::Node
            }
            token => Auth::Client(token),
        }
    }

    /// The revision info of `repo` at `rev` as the Hub gave it, if this request may have it.
    pub(super) async fn revision_for(
        &self,
        repo: &str,
        rev: &str,
        headers: &HeaderMap,
    ) -> Result<Revision, Response> {
        let meta = &self.fetcher.meta;
        let revision = meta
            .revision(repo, rev, self.hub_auth(headers))
            .await
            .map_err(|e| meta_error(&e))?;
        self.gate
            .check(repo, revision.info.restricted, bearer(headers))
            .await?;
        Ok(revision)
    }
}

pub(super) async fn model_info(
    State(state): State<ApiState>,
    Path((org, name)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    revision_impl(
        &state,
        &format!("{org}/{name}"),
        "main",
        &pairs(q.as_deref()),
        &headers,
    )
    .await
}

pub(super) async fn revision(
    State(state): State<ApiState>,
    Path((org, name, rev)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    revision_impl(
        &state,
        &format!("{org}/{name}"),
        &rev,
        &pairs(q.as_deref()),
        &headers,
    )
    .await
}

async fn revision_impl(
    state: &ApiState,
    repo: &str,
    rev: &str,
    q: &Pairs,
    headers: &HeaderMap,
) -> Response {
    match state.revision_for(repo, rev, headers).await {
        Ok(revision) => Json(shape_revision(&revision.json, q)).into_response(),
        Err(resp) => resp,
    }
}

/// The kept revision info (`?blobs=true`) shaped as the Hub answers this query: without
/// `blobs`, siblings name files only; with `expand`, only the listed properties.
fn shape_revision(json: &serde_json::Value, q: &Pairs) -> serde_json::Value {
    let mut out = json.clone();
    if !truthy(q, "blobs") {
        if let Some(siblings) = out["siblings"].as_array_mut() {
            for s in siblings {
                let name = s["rfilename"].clone();
                *s = serde_json::json!({ "rfilename": name });
            }
        }
    }
    let expand: BTreeSet<&str> = q
        .iter()
        .filter(|(k, _)| k == "expand")
        .map(|(_, v)| v.as_str())
        .collect();
    if !expand.is_empty() {
        if let Some(map) = out.as_object_mut() {
            map.retain(|k, _| expand.contains(k.as_str()) || k == "_id" || k == "id");
        }
    }
    out
}

pub(super) async fn auth_check(
    State(state): State<ApiState>,
    Path((org, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let repo = format!("{org}/{name}");
    if let Auth::Node = state.hub_auth(&headers) {
        return Json(serde_json::json!({})).into_response();
    }
    let hub = state.fetcher.meta.hub();
    match hub.auth_check(&repo, bearer(&headers)).await {
        Ok(Ok(())) => Json(serde_json::json!({})).into_response(),
        Ok(Err(answer)) => passthrough(&answer),
        Err(e) => meta_error(&e.into()),
    }
}

pub(super) async fn tree_root(
    State(state): State<ApiState>,
    Path((org, name, rev)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    tree_or_pass(&state, &format!("{org}/{name}"), &rev, "", req).await
}

pub(super) async fn tree(
    State(state): State<ApiState>,
    Path((org, name, rev, path)): Path<(String, String, String, String)>,
    req: Request,
) -> Response {
    tree_or_pass(&state, &format!("{org}/{name}"), &rev, &path, req).await
}

/// A listing from the kept tree; with `expand` (each entry's last commit, which the kept tree
/// does not hold) the Hub's own, passed on, and the kept one only when the Hub can't be asked.
async fn tree_or_pass(
    state: &ApiState,
    repo: &str,
    rev: &str,
    dir: &str,
    req: Request,
) -> Response {
    let q = pairs(req.uri().query());
    if !truthy(&q, "expand") {
        return tree_impl(state, repo, rev, dir, &q, req.headers()).await;
    }
    let headers = req.headers().clone();
    match super::pass::pass(state, req).await {
        Ok(resp) => resp,
        Err(e) if !e.is_unreachable() => meta_error(&MetaError::Hub(e)),
        Err(_) => tree_impl(state, repo, rev, dir, &q, &headers).await,
    }
}

async fn tree_impl(
    state: &ApiState,
    repo: &str,
    rev: &str,
    dir: &str,
    q: &Pairs,
    headers: &HeaderMap,
) -> Response {
    let entries = match listing(state, repo, rev, headers).await {
        Ok(entries) => entries,
        Err(resp) => return resp,
    };
    let dir = dir.trim_matches('/');
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    let recursive = truthy(q, "recursive");
    let out: Vec<serde_json::Value> = entries
        .into_iter()
        .filter(|e| {
            let path = e["path"].as_str().unwrap_or_default();
            path.strip_prefix(&prefix)
                .is_some_and(|rest| !rest.is_empty() && (recursive || !rest.contains('/')))
        })
        .collect();
    if !dir.is_empty() && out.is_empty() {
        return hf_error(
            StatusCode::NOT_FOUND,
            "EntryNotFound",
            &format!("{dir} does not exist"),
        );
    }
    Json(out).into_response()
}

pub(super) async fn paths_info(
    State(state): State<ApiState>,
    Path((org, name, rev)): Path<(String, String, String)>,
    headers: HeaderMap,
    RawForm(form): RawForm,
) -> Response {
    let Ok(form) = serde_urlencoded::from_bytes::<Pairs>(&form) else {
        return hf_error(StatusCode::BAD_REQUEST, "", "Invalid form body");
    };
    let wanted: BTreeSet<&str> = form
        .iter()
        .filter(|(k, _)| k == "paths")
        .map(|(_, p)| p.trim_matches('/'))
        .collect();
    match listing(&state, &format!("{org}/{name}"), &rev, &headers).await {
        Ok(entries) => {
            let out: Vec<_> = entries
                .into_iter()
                .filter(|e| wanted.contains(e["path"].as_str().unwrap_or_default()))
                .collect();
            Json(out).into_response()
        }
        Err(resp) => resp,
    }
}

/// The commit's whole listing (files and folders, recursive), without Xet hashes.
async fn listing(
    state: &ApiState,
    repo: &str,
    rev: &str,
    headers: &HeaderMap,
) -> Result<Vec<serde_json::Value>, Response> {
    let revision = state.revision_for(repo, rev, headers).await?;
    let meta = &state.fetcher.meta;
    let mut entries = meta
        .tree(repo, &revision.info.commit, state.hub_auth(headers))
        .await
        .map_err(|e| meta_error(&e))?;
    for e in &mut entries {
        if let Some(map) = e.as_object_mut() {
            map.remove("xetHash");
        }
    }
    Ok(entries)
}
