//! A local stand-in for the HuggingFace Hub, as strict as the real one where clients rely on it
//! (huggingface_hub, the `hf` CLI, transformers and the Rust `hf-hub` crate run against it
//! directly in the tests, so that what they do against a mesh node can be compared).
//!
//! It serves repos from folders, each revision a commit of its own (`--repo org/name=DIR` is
//! `main`; `--repo org/name@v1.0=DIR` adds the branch or tag `v1.0`):
//! - `GET /api/models/{org}/{name}` (= `main`) and `.../revision/{rev}` (`?blobs=true`: sizes,
//!   blob ids, LFS);
//! - `GET .../tree/{rev}[/{path}]` (`?recursive=true`), paginated by `--tree-page-size` with
//!   a `Link: <...>; rel="next"` header, 404 `EntryNotFound` for a missing folder; with
//!   `?expand=true` each entry also names its `lastCommit`, 50 to a page;
//! - `POST .../paths-info/{rev}` (form `paths=`; missing paths left out);
//! - `GET .../auth-check`: 200, or the error the token deserves;
//! - `HEAD`/`GET /{org}/{name}/resolve/{rev}/{path}`: small files inline with `ETag` (the git
//!   blob id); LFS files (over 10 KiB) as a 302 to a second origin (`--cdn`, the "CDN") with
//!   `X-Linked-Etag` (sha256) and `X-Linked-Size`; both carry `X-Repo-Commit`, also on a 404;
//! - `Range` answered with 206 and `Content-Range` (an end past the file is clamped), 416 with
//!   `Content-Range: bytes */size` when unsatisfiable;
//! - errors with `X-Error-Code`, `X-Error-Message` and `{"error": ...}`: 401 `RepoNotFound`
//!   for an unknown repo without a valid token, 404 `RepoNotFound` with one, 404
//!   `RevisionNotFound`, 404 `EntryNotFound`, 401/403 `GatedRepo` for gated repos without an
//!   approved token, 401 "Invalid credentials in Authorization header" for a token that is no
//!   token (tokens start with `hf_`);
//! - the CDN refuses a request that carries `Authorization` (clients must drop it across
//!   origins) and checks the URL's signature and expiry;
//! - `--xet`: LFS files also advertise Xet (`X-Xet-Hash` and a `Link rel="xet-auth"` on
//!   resolve, `xetHash` in tree entries), which a proxy must not pass on;
//! - `--stall-once-after N`: the first CDN body of each file stops after N bytes and holds the
//!   connection open; `--fail-first N`: the first N requests get a 503 with `Retry-After: 1`;
//!   `--rate B`: each body goes out at most B bytes per second;
//! - `--dataset org/name=DIR`: a dataset repo, on the same routes under `/api/datasets/` and
//!   `/datasets/`; a dataset is not found on the model routes, nor a model on these;
//! - `--moved OLD=NEW`: every request about repo `OLD` (a one-part id such as `gpt2`, which the
//!   Hub moved under an org, or a renamed repo) is answered 307 with a relative `Location`:
//!   the same path and query about `NEW`, as the Hub redirects them;
//! - `GET /_stats`: body bytes served (API + CDN, counted as they are sent), per file, and
//!   every request as `METHOD path status`.

#[path = "fake_hf/repo.rs"]
mod repo;
#[path = "fake_hf/serve.rs"]
mod serve;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use axum::{
    extract::{Path, Query, RawForm, Request, State},
    http::{header, HeaderMap, Method, StatusCode, Uri},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use clap::Parser;

use repo::{Access, Repo, RepoFile, Repos};

#[derive(Parser, Debug)]
struct Opt {
    /// API address.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// CDN address (a second origin).
    #[arg(long, default_value = "127.0.0.1:0")]
    cdn: SocketAddr,
    /// `org/name=DIR` (branch main) or `org/name@REV=DIR` (branch or tag REV); repeatable.
    #[arg(long = "repo")]
    repos: Vec<String>,
    /// `org/name=DIR`: a dataset repo (branch main); repeatable.
    #[arg(long = "dataset")]
    datasets: Vec<String>,
    /// Repos that need an approved token.
    #[arg(long = "gated")]
    gated: Vec<String>,
    /// Repos that look missing without an approved token.
    #[arg(long = "private")]
    private: Vec<String>,
    /// The token gated and private repos accept.
    #[arg(long, default_value = "hf_test_token")]
    token: String,
    /// Repo file paths (`org/name/path`) served with a flipped byte.
    #[arg(long = "corrupt")]
    corrupt: Vec<String>,
    /// `OLD=NEW`: requests about repo OLD are redirected to the same requests about NEW.
    #[arg(long = "moved")]
    moved: Vec<String>,
    /// Advertise Xet for LFS files.
    #[arg(long)]
    xet: bool,
    /// Entries per page of a tree listing.
    #[arg(long, default_value_t = 1000)]
    tree_page_size: usize,
    /// The first CDN body of each file stops after this many bytes and stalls.
    #[arg(long)]
    stall_once_after: Option<u64>,
    /// The first N requests answer 503 with `Retry-After: 1`.
    #[arg(long, default_value_t = 0)]
    fail_first: u64,
    /// Send each file body at most this fast (bytes per second, per request).
    #[arg(long)]
    rate: Option<u64>,
    /// Write "API CDN" addresses to this file once listening.
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

/// The Hub's state.
pub(crate) struct Hub {
    repos: Repos,
    /// The ids in `repos` that are datasets.
    datasets: Vec<String>,
    token: String,
    corrupt: Vec<String>,
    /// Old repo id, new repo id.
    moved: Vec<(String, String)>,
    xet: bool,
    tree_page_size: usize,
    stall_once_after: Option<u64>,
    rate: Option<u64>,
    /// `http://API` and `http://CDN`.
    api: String,
    cdn: String,
    /// Body bytes served, in all and per `org/name/path`.
    served: AtomicU64,
    served_per_file: Mutex<BTreeMap<String, u64>>,
    /// Files whose CDN body already stalled once.
    stalled: Mutex<Vec<String>>,
    /// Requests still to fail with a 503.
    fail_left: AtomicU64,
    /// Every request: `METHOD path status`.
    log: Mutex<Vec<String>>,
    /// Secret for CDN URL signatures.
    secret: [u8; 16],
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let opt = Opt::parse();
    let api = tokio::net::TcpListener::bind(opt.listen).await?;
    let cdn = tokio::net::TcpListener::bind(opt.cdn).await?;
    let specs: Vec<String> = opt.repos.iter().chain(&opt.datasets).cloned().collect();
    let repos = Repos::load(&specs, &opt.gated, &opt.private)?;
    let datasets = opt
        .datasets
        .iter()
        .filter_map(|d| d.split_once('=').map(|(id, _)| id.to_string()))
        .collect();
    let hub = Arc::new(Hub {
        repos,
        datasets,
        token: opt.token.clone(),
        corrupt: opt.corrupt.clone(),
        moved: opt
            .moved
            .iter()
            .map(|m| match m.split_once('=') {
                Some((old, new)) => Ok((old.to_string(), new.to_string())),
                None => Err(anyhow::anyhow!("--moved takes OLD=NEW, not {m:?}")),
            })
            .collect::<anyhow::Result<_>>()?,
        xet: opt.xet,
        tree_page_size: opt.tree_page_size.max(1),
        stall_once_after: opt.stall_once_after,
        rate: opt.rate,
        api: format!("http://{}", api.local_addr()?),
        cdn: format!("http://{}", cdn.local_addr()?),
        served: AtomicU64::new(0),
        served_per_file: Mutex::default(),
        stalled: Mutex::default(),
        fail_left: AtomicU64::new(opt.fail_first),
        log: Mutex::default(),
        secret: rand::random(),
    });
    if let Some(path) = &opt.addr_file {
        std::fs::write(path, format!("{} {}", api.local_addr()?, cdn.local_addr()?))?;
    }
    eprintln!("fake-hf api {} cdn {}", hub.api, hub.cdn);
    let mut api_app = Router::new();
    // Models and datasets have the same routes under their own prefixes.
    for (api, files) in [("/api/models", ""), ("/api/datasets", "/datasets")] {
        let repo = format!("{api}/{{org}}/{{name}}");
        api_app = api_app
            .route(&repo, get(model_info))
            .route(&format!("{repo}/revision/{{rev}}"), get(revision))
            .route(&format!("{repo}/auth-check"), get(auth_check))
            .route(&format!("{repo}/tree/{{rev}}"), get(tree_root))
            .route(&format!("{repo}/tree/{{rev}}/{{*path}}"), get(tree))
            .route(&format!("{repo}/paths-info/{{rev}}"), post(paths_info))
            .route(
                &format!("{files}/{{org}}/{{name}}/resolve/{{rev}}/{{*path}}"),
                get(resolve).head(resolve),
            );
    }
    let api_app = api_app
        .route("/_stats", get(stats))
        .fallback(|| async { hf_error(StatusCode::NOT_FOUND, "", "Not Found") })
        .route_layer(middleware::from_fn_with_state(hub.clone(), repo_kind))
        .layer(middleware::from_fn_with_state(hub.clone(), redirect_moved))
        .layer(middleware::from_fn_with_state(hub.clone(), log_and_fail))
        .with_state(hub.clone());
    let cdn_app = Router::new()
        .route("/cdn/{sha}", get(serve::cdn_get).head(serve::cdn_get))
        .layer(middleware::from_fn_with_state(hub.clone(), log_and_fail))
        .with_state(hub);
    let a = tokio::spawn(async move { axum::serve(api, api_app).await });
    let c = tokio::spawn(async move { axum::serve(cdn, cdn_app).await });
    let _ = tokio::join!(a, c);
    Ok(())
}

/// Logs every request with its status, and answers the first `--fail-first` with a 503.
async fn log_and_fail(State(hub): State<Arc<Hub>>, req: Request, next: Next) -> Response {
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|r| r.to_str().ok())
        .map(|r| format!(" [{r}]"))
        .unwrap_or_default();
    let line = format!("{} {}{range}", req.method(), req.uri());
    let failing = req.uri().path() != "/_stats"
        && hub
            .fail_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
    let resp = if failing {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "try again",
        )
            .into_response()
    } else {
        next.run(req).await
    };
    let mut log = hub.log.lock().unwrap();
    log.push(format!("{line} {}", resp.status().as_u16()));
    resp
}

/// Redirects a request about a moved repo to the same request about its new id: 307, with a
/// `Location` relative to this origin (clients follow it on the same host, keeping the token).
async fn redirect_moved(State(hub): State<Arc<Hub>>, req: Request, next: Next) -> Response {
    let uri = req.uri();
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    for (old, new) in &hub.moved {
        if let Some((before, after)) = repo_in_path(uri.path(), old) {
            let location = format!("{before}{new}{after}{query}");
            let body = format!("Temporary Redirect. Redirecting to {location}");
            return (
                StatusCode::TEMPORARY_REDIRECT,
                [(header::LOCATION, location)],
                body,
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// A dataset is found only on the dataset routes, a model only on the model routes.
async fn repo_kind(
    State(hub): State<Arc<Hub>>,
    Path(params): Path<BTreeMap<String, String>>,
    req: Request,
    next: Next,
) -> Response {
    let (Some(org), Some(name)) = (params.get("org"), params.get("name")) else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    let dataset_route = path.starts_with("/api/datasets/") || path.starts_with("/datasets/");
    let is_dataset = hub.datasets.contains(&format!("{org}/{name}"));
    if dataset_route != is_dataset {
        let status = if req.headers().contains_key(header::AUTHORIZATION) {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::UNAUTHORIZED
        };
        return hf_error(status, "RepoNotFound", "Repository Not Found");
    }
    next.run(req).await
}

/// Where `repo` sits in `path` if the path is one of the Hub's routes about it: the text
/// before and after the repo id.
fn repo_in_path<'a>(path: &'a str, repo: &str) -> Option<(&'a str, &'a str)> {
    let api = ["", "/revision/", "/tree/", "/paths-info/", "/auth-check"];
    for (prefix, routes) in [("/api/models/", &api[..]), ("/", &["/resolve/"][..])] {
        let Some(after) = path.strip_prefix(prefix).and_then(|p| p.strip_prefix(repo)) else {
            continue;
        };
        let route_follows = routes.iter().any(|r| match *r {
            "" | "/auth-check" => after == *r,
            r => after.starts_with(r),
        });
        if route_follows {
            return Some((prefix, after));
        }
    }
    None
}

/// An error as the Hub sends it.
fn hf_error(status: StatusCode, code: &str, message: &str) -> Response {
    let mut resp = (status, Json(serde_json::json!({ "error": message }))).into_response();
    let h = resp.headers_mut();
    if !code.is_empty() {
        h.insert("x-error-code", code.parse().unwrap());
    }
    h.insert("x-error-message", message.parse().unwrap());
    resp
}

/// What the request's token is worth.
#[allow(clippy::result_large_err)] // the error is the HTTP answer itself
fn access(hub: &Hub, headers: &HeaderMap) -> Result<Access, Response> {
    let Some(auth) = headers.get(header::AUTHORIZATION) else {
        return Ok(Access::Anonymous);
    };
    let token = auth
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !token.starts_with("hf_") {
        return Err(hf_error(
            StatusCode::UNAUTHORIZED,
            "",
            "Invalid credentials in Authorization header",
        ));
    }
    Ok(if token == hub.token {
        Access::Approved
    } else {
        Access::Valid
    })
}

/// The repo at a revision, after the checks the Hub makes: the token, the gate, the revision.
#[allow(clippy::result_large_err)] // the error is the HTTP answer itself
fn repo<'a>(
    hub: &'a Hub,
    id: &str,
    rev: &str,
    headers: &HeaderMap,
) -> Result<(&'a Repo, &'a str), Response> {
    let access = access(hub, headers)?;
    let repo = hub
        .repos
        .get(id)
        .filter(|r| !r.private || access == Access::Approved);
    let Some(repo) = repo else {
        // Missing and private repos look the same; without a token the Hub answers 401.
        let status = if access == Access::Anonymous {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::NOT_FOUND
        };
        return Err(hf_error(status, "RepoNotFound", "Repository Not Found"));
    };
    if repo.gated && access != Access::Approved {
        let (status, message) = match access {
            Access::Anonymous => (
                StatusCode::UNAUTHORIZED,
                format!("Access to model {id} is restricted. You must have access to it and be authenticated to access it. Please log in."),
            ),
            _ => (
                StatusCode::FORBIDDEN,
                format!("Access to model {id} is restricted and you are not in the authorized list. Visit https://huggingface.co/{id} to ask for access."),
            ),
        };
        return Err(hf_error(status, "GatedRepo", &message));
    }
    match repo.commit_for(rev) {
        Some(commit) => Ok((repo, commit)),
        None => Err(hf_error(
            StatusCode::NOT_FOUND,
            "RevisionNotFound",
            &format!("Invalid rev id: {rev}"),
        )),
    }
}

fn truthy(q: &BTreeMap<String, String>, key: &str) -> bool {
    q.get(key)
        .is_some_and(|v| matches!(v.as_str(), "true" | "True" | "1"))
}

async fn model_info(
    State(hub): State<Arc<Hub>>,
    Path((org, name)): Path<(String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    revision_impl(&hub, &format!("{org}/{name}"), "main", &q, &headers)
}

async fn revision(
    State(hub): State<Arc<Hub>>,
    Path((org, name, rev)): Path<(String, String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    revision_impl(&hub, &format!("{org}/{name}"), &rev, &q, &headers)
}

fn revision_impl(
    hub: &Hub,
    id: &str,
    rev: &str,
    q: &BTreeMap<String, String>,
    headers: &HeaderMap,
) -> Response {
    let (repo, commit) = match repo(hub, id, rev, headers) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let blobs = truthy(q, "blobs");
    let siblings: Vec<_> = repo.files(commit).map(|f| f.sibling(blobs)).collect();
    Json(serde_json::json!({
        "_id": commit[..24],
        "id": id,
        "modelId": id,
        "author": id.split('/').next(),
        "sha": commit,
        "private": repo.private,
        "gated": if repo.gated { serde_json::json!("manual") } else { serde_json::json!(false) },
        "disabled": false,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "library_name": "transformers",
        "siblings": siblings,
        "spaces": [],
        "createdAt": "2026-10-01T00:00:00.000Z",
        "lastModified": "2026-11-01T00:00:00.000Z",
        "usedStorage": repo.files(commit).map(|f| f.size).sum::<u64>(),
    }))
    .into_response()
}

async fn auth_check(
    State(hub): State<Arc<Hub>>,
    Path((org, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    match repo(&hub, &format!("{org}/{name}"), "main", &headers) {
        Ok(_) => Json(serde_json::json!({})).into_response(),
        Err(e) => e,
    }
}

async fn tree_root(
    State(hub): State<Arc<Hub>>,
    Path((org, name, rev)): Path<(String, String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let at = (format!("{org}/{name}"), rev, String::new());
    tree_impl(&hub, at, &q, &uri, &headers)
}

async fn tree(
    State(hub): State<Arc<Hub>>,
    Path((org, name, rev, path)): Path<(String, String, String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    tree_impl(
        &hub,
        (format!("{org}/{name}"), rev, path),
        &q,
        &uri,
        &headers,
    )
}

/// The Hub's pages: 1,000 entries (`--tree-page-size`), 50 with `expand`.
const EXPANDED_PAGE: usize = 50;

/// A tree listing of `(repo id, revision, folder)`, one page of it.
fn tree_impl(
    hub: &Hub,
    (id, rev, dir): (String, String, String),
    q: &BTreeMap<String, String>,
    uri: &Uri,
    headers: &HeaderMap,
) -> Response {
    let (id, rev, dir) = (id.as_str(), rev.as_str(), dir.as_str());
    let (repo, commit) = match repo(hub, id, rev, headers) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let Some(entries) = repo.tree(commit, dir, truthy(q, "recursive"), hub.xet) else {
        let mut resp = hf_error(StatusCode::NOT_FOUND, "EntryNotFound", "Entry not found");
        resp.headers_mut()
            .insert("x-repo-commit", commit.parse().unwrap());
        return resp;
    };
    // Pages as the Hub's: an opaque cursor in the next page's absolute URL.
    let expand = truthy(q, "expand");
    let size = if expand {
        hub.tree_page_size.min(EXPANDED_PAGE)
    } else {
        hub.tree_page_size
    };
    let start: usize = q.get("cursor").and_then(|c| c.parse().ok()).unwrap_or(0);
    let end = (start + size).min(entries.len());
    let mut page = entries.get(start..end).unwrap_or_default().to_vec();
    if expand {
        // The last commit that touched each entry: every file here came with its commit.
        for entry in &mut page {
            entry["lastCommit"] = serde_json::json!({
                "id": commit,
                "title": format!("Upload {}", entry["path"].as_str().unwrap_or_default()),
                "date": "2024-05-01T12:00:00.000Z",
            });
        }
    }
    let mut resp = Json(page).into_response();
    if end < entries.len() {
        let mut next = q.clone();
        next.insert("cursor".into(), end.to_string());
        let query = serde_urlencoded::to_string(&next).unwrap();
        let link = format!("<{}{}?{query}>; rel=\"next\"", hub.api, uri.path());
        resp.headers_mut()
            .insert(header::LINK, link.parse().unwrap());
    }
    resp
}

async fn paths_info(
    State(hub): State<Arc<Hub>>,
    Path((org, name, rev)): Path<(String, String, String)>,
    headers: HeaderMap,
    RawForm(form): RawForm,
) -> Response {
    let (repo, commit) = match repo(&hub, &format!("{org}/{name}"), &rev, &headers) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let Ok(form) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&form) else {
        return hf_error(StatusCode::BAD_REQUEST, "", "Invalid form body");
    };
    let out: Vec<_> = form
        .iter()
        .filter(|(k, _)| k == "paths")
        .filter_map(|(_, p)| repo.file(commit, p))
        .map(|f| f.entry(hub.xet))
        .collect();
    Json(out).into_response()
}

async fn resolve(
    State(hub): State<Arc<Hub>>,
    method: Method,
    Path((org, name, rev, path)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let id = format!("{org}/{name}");
    let (repo, commit) = match repo(&hub, &id, &rev, &headers) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let Some(file) = repo.file(commit, &path) else {
        let mut resp = hf_error(StatusCode::NOT_FOUND, "EntryNotFound", "Entry not found");
        resp.headers_mut()
            .insert("x-repo-commit", commit.parse().unwrap());
        return resp;
    };
    if file.is_lfs() {
        return serve::redirect_to_cdn(&hub, &id, commit, file);
    }
    let mut resp = serve::serve_bytes(&hub, &method, &headers, file, &format!("{id}/{path}")).await;
    let h = resp.headers_mut();
    h.insert("x-repo-commit", commit.parse().unwrap());
    h.insert(
        header::ETAG,
        format!("\"{}\"", file.git_oid).parse().unwrap(),
    );
    resp
}

async fn stats(State(hub): State<Arc<Hub>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "served_bytes": hub.served.load(Ordering::Relaxed),
        "served_per_file": *hub.served_per_file.lock().unwrap(),
        "requests": *hub.log.lock().unwrap(),
    }))
}

/// A file as the stand-in knows it (for `serve`).
pub(crate) fn file_key(id: &str, f: &RepoFile) -> String {
    format!("{id}/{}", f.path)
}
