//! A local stand-in for the HuggingFace Hub, as strict as the real one where clients rely on it.
//!
//! It serves repos from folders (`--repo org/name=DIR`) at one fixed commit each:
//! - `GET /api/models/{org}/{name}/revision/{rev}` (with `?blobs=true`: sizes, blob ids, LFS);
//! - `GET /api/models/{org}/{name}/tree/{rev}[/{path}]` (`?recursive=true`);
//! - `POST /api/models/{org}/{name}/paths-info/{rev}` (form `paths=`);
//! - `HEAD`/`GET /{org}/{name}/resolve/{rev}/{path}`: small files inline with `ETag` (git blob
//!   sha1); LFS files (over 10 KiB) as a 302 to a second origin (`--cdn`, the "CDN") with
//!   `X-Linked-Etag` (sha256) and `X-Linked-Size`; both carry `X-Repo-Commit`;
//! - `Range` answered with 206 and `Content-Range`, 416 when unsatisfiable;
//! - gated repos (`--gated org/name`) answer 401 with `X-Error-Code: GatedRepo` unless the
//!   request has `Authorization: Bearer {--token}`; CDN URLs are signed and expire like the Hub's;
//! - `GET /_stats`: body bytes served (API + CDN), for the tests' "at most once" checks, and
//!   `sent_bytes`: file bytes handed to the connection so far (bodies stream in 64 KiB pieces),
//!   to measure a client's download rate over time.
//!
//! `--corrupt PATH` serves that file with one byte flipped (to test the sha256 check).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use axum::{
    body::Body,
    extract::{Path, Query, RawForm, State},
    http::{header, HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use clap::Parser;
use sha1::Digest as _;

/// Files above this size are LFS files, as on the Hub for weights.
const LFS_THRESHOLD: u64 = 10 * 1024;

#[derive(Parser, Debug)]
struct Opt {
    /// API address.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// CDN address (a second origin).
    #[arg(long, default_value = "127.0.0.1:0")]
    cdn: SocketAddr,
    /// `org/name=DIR`, repeatable.
    #[arg(long = "repo")]
    repos: Vec<String>,
    /// Repos that need the token.
    #[arg(long = "gated")]
    gated: Vec<String>,
    /// The token gated repos accept.
    #[arg(long, default_value = "hf_test_token")]
    token: String,
    /// Repo file paths (`org/name/path`) served with a flipped byte.
    #[arg(long = "corrupt")]
    corrupt: Vec<String>,
    /// Write "API CDN" addresses to this file once listening.
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

struct RepoFile {
    path: String,
    size: u64,
    disk: PathBuf,
    sha256: String,
    git_oid: String,
}

struct Repo {
    commit: String,
    files: BTreeMap<String, RepoFile>,
    gated: bool,
}

struct Hub {
    repos: BTreeMap<String, Repo>,
    token: String,
    corrupt: Vec<String>,
    cdn: String,
    /// Body bytes served.
    served: AtomicU64,
    /// File bytes handed to connections so far, as the body streams.
    sent: Arc<AtomicU64>,
    /// Secret for CDN URL signatures.
    secret: [u8; 16],
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let opt = Opt::parse();
    let api = tokio::net::TcpListener::bind(opt.listen).await?;
    let cdn = tokio::net::TcpListener::bind(opt.cdn).await?;
    let mut repos = BTreeMap::new();
    for spec in &opt.repos {
        let (id, dir) = spec.split_once('=').expect("--repo org/name=DIR");
        repos.insert(
            id.to_string(),
            load_repo(dir.into(), opt.gated.contains(&id.to_string()))?,
        );
    }
    let hub = Arc::new(Hub {
        repos,
        token: opt.token.clone(),
        corrupt: opt.corrupt.clone(),
        cdn: format!("http://{}", cdn.local_addr()?),
        served: AtomicU64::new(0),
        sent: Arc::default(),
        secret: rand::random(),
    });
    if let Some(path) = &opt.addr_file {
        std::fs::write(path, format!("{} {}", api.local_addr()?, cdn.local_addr()?))?;
    }
    eprintln!("fake-hf api http://{} cdn {}", api.local_addr()?, hub.cdn);
    let api_app = Router::new()
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
        .route("/_stats", get(stats))
        .with_state(hub.clone());
    let cdn_app = Router::new()
        .route("/cdn/{sha}", get(cdn_get).head(cdn_get))
        .with_state(hub);
    let a = tokio::spawn(async move { axum::serve(api, api_app).await });
    let c = tokio::spawn(async move { axum::serve(cdn, cdn_app).await });
    let _ = tokio::join!(a, c);
    Ok(())
}

fn load_repo(dir: PathBuf, gated: bool) -> anyhow::Result<Repo> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let bytes = std::fs::read(&path)?;
            let rel = path
                .strip_prefix(&dir)?
                .to_string_lossy()
                .replace('\\', "/");
            let mut git = sha1::Sha1::new();
            git.update(format!("blob {}\0", bytes.len()).as_bytes());
            git.update(&bytes);
            files.insert(
                rel.clone(),
                RepoFile {
                    path: rel,
                    size: bytes.len() as u64,
                    disk: path.clone(),
                    sha256: hex::encode(sha2::Sha256::digest(&bytes)),
                    git_oid: hex::encode(git.finalize()),
                },
            );
        }
    }
    let mut commit = sha1::Sha1::new();
    for f in files.values() {
        commit.update(f.path.as_bytes());
        commit.update(f.sha256.as_bytes());
    }
    Ok(Repo {
        commit: hex::encode(commit.finalize()),
        files,
        gated,
    })
}

fn hf_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [("x-error-code", code.to_string())],
        Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

/// The repo, after the gate and revision checks the Hub makes.
#[allow(clippy::result_large_err)] // the error is the HTTP answer itself
fn repo<'a>(
    hub: &'a Hub,
    org: &str,
    name: &str,
    rev: &str,
    headers: &HeaderMap,
) -> Result<&'a Repo, Response> {
    let Some(repo) = hub.repos.get(&format!("{org}/{name}")) else {
        return Err(hf_error(
            StatusCode::UNAUTHORIZED,
            "RepoNotFound",
            "Repository Not Found",
        ));
    };
    if repo.gated {
        let ok = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {}", hub.token));
        if !ok {
            return Err(hf_error(
                StatusCode::UNAUTHORIZED,
                "GatedRepo",
                "Access to this model is restricted. You must be authenticated to access it.",
            ));
        }
    }
    if rev != "main" && rev != repo.commit {
        return Err(hf_error(
            StatusCode::NOT_FOUND,
            "RevisionNotFound",
            "Invalid rev id",
        ));
    }
    Ok(repo)
}

fn is_lfs(f: &RepoFile) -> bool {
    f.size > LFS_THRESHOLD
}

fn entry(f: &RepoFile) -> serde_json::Value {
    let mut v =
        serde_json::json!({ "type": "file", "oid": f.git_oid, "size": f.size, "path": f.path });
    if is_lfs(f) {
        v["lfs"] = serde_json::json!({ "oid": f.sha256, "size": f.size, "pointerSize": 134 });
    }
    v
}

async fn revision(
    State(hub): State<Arc<Hub>>,
    Path((org, name, rev)): Path<(String, String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let repo = match repo(&hub, &org, &name, &rev, &headers) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let blobs = q.get("blobs").is_some_and(|v| v == "true" || v == "1");
    let siblings: Vec<_> = repo
        .files
        .values()
        .map(|f| {
            let mut s = serde_json::json!({ "rfilename": f.path });
            if blobs {
                s["size"] = f.size.into();
                s["blobId"] = f.git_oid.clone().into();
                if is_lfs(f) {
                    s["lfs"] = serde_json::json!({ "sha256": f.sha256, "size": f.size, "pointerSize": 134 });
                }
            }
            s
        })
        .collect();
    Json(serde_json::json!({
        "_id": repo.commit[..24],
        "id": format!("{org}/{name}"),
        "modelId": format!("{org}/{name}"),
        "sha": repo.commit,
        "private": false,
        "gated": if repo.gated { serde_json::json!("manual") } else { serde_json::json!(false) },
        "disabled": false,
        "tags": [],
        "siblings": siblings,
        "lastModified": "2026-11-01T00:00:00.000Z",
    }))
    .into_response()
}

async fn tree_root(
    State(hub): State<Arc<Hub>>,
    Path((org, name, rev)): Path<(String, String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    tree_impl(&hub, &org, &name, &rev, "", &q, &headers)
}

async fn tree(
    State(hub): State<Arc<Hub>>,
    Path((org, name, rev, path)): Path<(String, String, String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    tree_impl(&hub, &org, &name, &rev, &path, &q, &headers)
}

fn tree_impl(
    hub: &Hub,
    org: &str,
    name: &str,
    rev: &str,
    dir: &str,
    q: &BTreeMap<String, String>,
    headers: &HeaderMap,
) -> Response {
    let repo = match repo(hub, org, name, rev, headers) {
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
    for f in repo.files.values() {
        let Some(rest) = f.path.strip_prefix(&prefix) else {
            continue;
        };
        match rest.split_once('/') {
            Some((sub, _)) if !recursive => {
                dirs.insert(format!("{prefix}{sub}"));
            }
            Some(_) => {
                let mut parts: Vec<&str> = rest.split('/').collect();
                parts.pop();
                let mut acc = prefix.clone();
                for p in parts {
                    acc.push_str(p);
                    dirs.insert(acc.clone());
                    acc.push('/');
                }
                out.push(entry(f));
            }
            None => out.push(entry(f)),
        }
    }
    if !dir.is_empty() && out.is_empty() && dirs.is_empty() {
        return hf_error(StatusCode::NOT_FOUND, "EntryNotFound", "Entry not found");
    }
    for d in dirs {
        out.push(
            serde_json::json!({ "type": "directory", "oid": "0".repeat(40), "size": 0, "path": d }),
        );
    }
    Json(out).into_response()
}

async fn paths_info(
    State(hub): State<Arc<Hub>>,
    Path((org, name, rev)): Path<(String, String, String)>,
    headers: HeaderMap,
    RawForm(form): RawForm,
) -> Response {
    let repo = match repo(&hub, &org, &name, &rev, &headers) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&form).unwrap_or_default();
    let out: Vec<_> = form
        .iter()
        .filter(|(k, _)| k == "paths")
        .filter_map(|(_, p)| repo.files.get(p))
        .map(entry)
        .collect();
    Json(out).into_response()
}

fn signature(hub: &Hub, sha: &str, expires: &str) -> String {
    let mut h = sha2::Sha256::new();
    h.update(hub.secret);
    h.update(sha.as_bytes());
    h.update(expires.as_bytes());
    hex::encode(h.finalize())
}

async fn resolve(
    State(hub): State<Arc<Hub>>,
    method: Method,
    Path((org, name, rev, path)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let repo = match repo(&hub, &org, &name, &rev, &headers) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let Some(file) = repo.files.get(&path) else {
        return hf_error(StatusCode::NOT_FOUND, "EntryNotFound", "Entry not found");
    };
    if is_lfs(file) {
        let expires = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600)
            .to_string();
        let location = format!(
            "{}/cdn/{}?expires={expires}&sig={}&repo={org}/{name}&path={}",
            hub.cdn,
            file.sha256,
            signature(&hub, &file.sha256, &expires),
            path
        );
        return (
            StatusCode::FOUND,
            [
                (header::LOCATION.as_str(), location),
                ("x-repo-commit", repo.commit.clone()),
                ("x-linked-etag", format!("\"{}\"", file.sha256)),
                ("x-linked-size", file.size.to_string()),
                (header::ETAG.as_str(), format!("\"{}\"", file.git_oid)),
            ],
        )
            .into_response();
    }
    let mut resp = serve_bytes(
        &hub,
        &method,
        &headers,
        file,
        &format!("{org}/{name}/{path}"),
    )
    .await;
    let h = resp.headers_mut();
    h.insert("x-repo-commit", repo.commit.parse().unwrap());
    h.insert(
        header::ETAG,
        format!("\"{}\"", file.git_oid).parse().unwrap(),
    );
    resp
}

async fn cdn_get(
    State(hub): State<Arc<Hub>>,
    method: Method,
    Path(sha): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let (Some(expires), Some(sig)) = (q.get("expires"), q.get("sig")) else {
        return (StatusCode::FORBIDDEN, "missing signature").into_response();
    };
    if *sig != signature(&hub, &sha, expires) {
        return (StatusCode::FORBIDDEN, "bad signature").into_response();
    }
    // A CDN never sees the Hub token: a client that forwards it across origins is wrong.
    if headers.contains_key(header::AUTHORIZATION) {
        return (
            StatusCode::BAD_REQUEST,
            "Authorization forwarded to the CDN",
        )
            .into_response();
    }
    let found = hub
        .repos
        .iter()
        .flat_map(|(id, r)| r.files.values().map(move |f| (id, f)))
        .find(|(_, f)| f.sha256 == sha);
    let Some((id, file)) = found else {
        return (StatusCode::NOT_FOUND, "no such object").into_response();
    };
    let mut resp = serve_bytes(
        &hub,
        &method,
        &headers,
        file,
        &format!("{id}/{}", file.path),
    )
    .await;
    resp.headers_mut().insert(
        header::ETAG,
        format!("\"{}\"", file.sha256).parse().unwrap(),
    );
    resp
}

/// The file's bytes (or a range of them), counted.
async fn serve_bytes(
    hub: &Hub,
    method: &Method,
    headers: &HeaderMap,
    file: &RepoFile,
    key: &str,
) -> Response {
    let mut bytes = std::fs::read(&file.disk).expect("repo file readable");
    if hub.corrupt.iter().any(|c| c == key) && !bytes.is_empty() {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
    }
    let size = bytes.len() as u64;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match range.and_then(|r| r.strip_prefix("bytes=")) {
        Some(spec) => {
            let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
            let start: u64 = a.parse().unwrap_or(u64::MAX);
            let end: u64 = if b.is_empty() {
                size.saturating_sub(1)
            } else {
                b.parse().unwrap_or(0).min(size.saturating_sub(1))
            };
            if start >= size || start > end {
                return (
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{size}"))],
                )
                    .into_response();
            }
            (StatusCode::PARTIAL_CONTENT, start, end + 1)
        }
        None => (StatusCode::OK, 0, size),
    };
    let body = bytes[start as usize..end as usize].to_vec();
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, body.len())
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if status == StatusCode::PARTIAL_CONTENT {
        resp = resp.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    if method == Method::HEAD {
        return resp.body(Body::empty()).unwrap();
    }
    hub.served.fetch_add(body.len() as u64, Ordering::Relaxed);
    let sent = hub.sent.clone();
    let pieces: Vec<bytes::Bytes> = body
        .chunks(64 << 10)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    let stream = tokio_stream::StreamExt::map(tokio_stream::iter(pieces), move |piece| {
        sent.fetch_add(piece.len() as u64, Ordering::Relaxed);
        Ok::<_, std::convert::Infallible>(piece)
    });
    resp.body(Body::from_stream(stream)).unwrap()
}

async fn stats(State(hub): State<Arc<Hub>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "served_bytes": hub.served.load(Ordering::Relaxed),
        "sent_bytes": hub.sent.load(Ordering::Relaxed),
    }))
}
