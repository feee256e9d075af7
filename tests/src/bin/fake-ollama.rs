//! A local stand-in for the Ollama registry (registry.ollama.ai), as strict toward clients as
//! the real one is toward Ollama's (see the Ollama research note, section 6).
//!
//! It serves every model of an Ollama store folder (`--store DIR`:
//! `manifests/<host>/<ns>/<model>/<tag>` + `blobs/sha256-<hex>`), whatever the host part:
//! - `GET`/`HEAD /v2/<ns>/<model>/manifests/<tag>`: parts checked with Ollama's rules; the
//!   `Accept` header must include the v2 manifest type (else 400 `MANIFEST_INVALID`); the
//!   stored bytes with `Docker-Content-Digest`; 404 `MANIFEST_UNKNOWN` (JSON) otherwise;
//! - `GET`/`HEAD /v2/<ns>/<model>/blobs/sha256:<hex>`: the digest must be `sha256:` and 64
//!   lowercase hex (else 400 `DIGEST_INVALID`) and referenced by a manifest of that repository
//!   (else 404 `BLOB_UNKNOWN`); then a **307** to a second origin with another hostname
//!   (`localhost` instead of `127.0.0.1`: the "CDN");
//! - CDN `GET /cdn/<hex>?exp=...`: 200 with the whole blob, or 206 with `Content-Range` for
//!   `Range: bytes=a-b` / `bytes=a-`; 416 with `Content-Range: bytes */N` when unsatisfiable,
//!   for several ranges, or malformed; an `Authorization` header is refused (never forwarded);
//! - 404 for `/v2/`, `/v2/_catalog` and `tags/list`, as in production; 405 `UNSUPPORTED` for
//!   other methods;
//! - `GET /_stats`: blob body bytes served by the CDN.
//!
//! `--corrupt HEX` serves that blob with one byte flipped.

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
    extract::{Path, State},
    http::{header, HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{any, get},
    Json, Router,
};
use clap::Parser;
use sha2::Digest as _;

const MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";

#[derive(Parser, Debug)]
struct Opt {
    /// Registry address.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// CDN address (reached as `localhost:PORT`: another hostname).
    #[arg(long, default_value = "127.0.0.1:0")]
    cdn: SocketAddr,
    /// The Ollama store folder to serve.
    #[arg(long)]
    store: PathBuf,
    /// Blobs (hex) served with a flipped byte.
    #[arg(long = "corrupt")]
    corrupt: Vec<String>,
    /// Write "REGISTRY CDN" addresses to this file once listening.
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

struct Registry {
    /// `ns/model` -> tag -> manifest bytes.
    repos: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    blobs: PathBuf,
    corrupt: Vec<String>,
    cdn: String,
    served: AtomicU64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let opt = Opt::parse();
    let api = tokio::net::TcpListener::bind(opt.listen).await?;
    let cdn = tokio::net::TcpListener::bind(opt.cdn).await?;
    let mut repos: BTreeMap<String, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    for host in std::fs::read_dir(opt.store.join("manifests"))? {
        for ns in std::fs::read_dir(host?.path())? {
            let ns = ns?;
            for model in std::fs::read_dir(ns.path())? {
                let model = model?;
                for tag in std::fs::read_dir(model.path())? {
                    let tag = tag?;
                    let repo = format!(
                        "{}/{}",
                        ns.file_name().to_string_lossy(),
                        model.file_name().to_string_lossy()
                    );
                    repos.entry(repo).or_default().insert(
                        tag.file_name().to_string_lossy().into(),
                        std::fs::read(tag.path())?,
                    );
                }
            }
        }
    }
    let reg = Arc::new(Registry {
        repos,
        blobs: opt.store.join("blobs"),
        corrupt: opt.corrupt,
        cdn: format!("http://localhost:{}", cdn.local_addr()?.port()),
        served: AtomicU64::new(0),
    });
    if let Some(path) = &opt.addr_file {
        std::fs::write(path, format!("{} {}", api.local_addr()?, cdn.local_addr()?))?;
    }
    let api_app = Router::new()
        .route("/v2/", any(not_found))
        .route("/v2/_catalog", any(not_found))
        .route("/v2/{ns}/{model}/tags/list", any(not_found))
        .route("/v2/{ns}/{model}/manifests/{tag}", any(manifest))
        .route("/v2/{ns}/{model}/blobs/{digest}", any(blob))
        .route("/_stats", get(stats))
        .with_state(reg.clone());
    let cdn_app = Router::new()
        .route("/cdn/{hex}", get(cdn_get))
        .with_state(reg);
    let a = tokio::spawn(async move { axum::serve(api, api_app).await });
    let c = tokio::spawn(async move { axum::serve(cdn, cdn_app).await });
    let _ = tokio::join!(a, c);
    Ok(())
}

fn oci_error(status: StatusCode, code: &str, message: &str, detail: serde_json::Value) -> Response {
    let body =
        serde_json::json!({"errors": [{"code": code, "message": message, "detail": detail}]});
    (status, Json(body)).into_response()
}

async fn not_found() -> Response {
    StatusCode::NOT_FOUND.into_response()
}

async fn stats(State(reg): State<Arc<Registry>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "served_bytes": reg.served.load(Ordering::Relaxed) }))
}

/// Ollama's name-part rules: first `[A-Za-z0-9_]`, then `extra` characters too.
fn part_ok(s: &str, extra: &str) -> bool {
    let mut chars = s.chars();
    (1..=80).contains(&s.len())
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || extra.contains(c))
}

fn unsupported() -> Response {
    oci_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "UNSUPPORTED",
        "The operation is unsupported.",
        serde_json::json!({}),
    )
}

async fn manifest(
    State(reg): State<Arc<Registry>>,
    method: Method,
    Path((ns, model, tag)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return unsupported();
    }
    if !part_ok(&ns, "-") || !part_ok(&model, ".-") || !part_ok(&tag, ".-") {
        return oci_error(
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
            "invalid repository name",
            serde_json::json!({}),
        );
    }
    let accept = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains(MANIFEST_V2));
    if !accept {
        return oci_error(
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
            "manifest invalid",
            serde_json::json!({}),
        );
    }
    let Some(bytes) = reg
        .repos
        .get(&format!("{ns}/{model}"))
        .and_then(|r| r.get(&tag))
    else {
        return oci_error(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "manifest unknown",
            serde_json::json!({ "Tag": tag }),
        );
    };
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(bytes.clone())
    };
    Response::builder()
        .header(header::CONTENT_TYPE, MANIFEST_V2)
        .header(header::CONTENT_LENGTH, bytes.len())
        .header("docker-content-digest", digest)
        .body(body)
        .unwrap()
}

async fn blob(
    State(reg): State<Arc<Registry>>,
    method: Method,
    Path((ns, model, digest)): Path<(String, String, String)>,
) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return unsupported();
    }
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    let Some(hex) = hex else {
        return oci_error(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            "provided digest did not match uploaded content",
            serde_json::json!({}),
        );
    };
    // Only blobs a manifest of this repository references.
    let referenced = reg.repos.get(&format!("{ns}/{model}")).is_some_and(|tags| {
        tags.values()
            .any(|m| String::from_utf8_lossy(m).contains(&digest))
    });
    if !referenced || !reg.blobs.join(format!("sha256-{hex}")).is_file() {
        if method == Method::HEAD {
            return StatusCode::NOT_FOUND.into_response();
        }
        return oci_error(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            "blob unknown to registry",
            serde_json::json!(digest),
        );
    }
    let location = format!("{}/cdn/{hex}?exp={}", reg.cdn, u32::MAX);
    Response::builder()
        .status(StatusCode::TEMPORARY_REDIRECT)
        .header(header::LOCATION, location)
        .body(Body::empty())
        .unwrap()
}

async fn cdn_get(
    State(reg): State<Arc<Registry>>,
    Path(hex): Path<String>,
    headers: HeaderMap,
) -> Response {
    if headers.contains_key(header::AUTHORIZATION) {
        return (
            StatusCode::BAD_REQUEST,
            "Authorization forwarded to the CDN",
        )
            .into_response();
    }
    let Ok(mut bytes) = std::fs::read(reg.blobs.join(format!("sha256-{hex}"))) else {
        return (StatusCode::NOT_FOUND, "no such object").into_response();
    };
    if reg.corrupt.contains(&hex) && !bytes.is_empty() {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
    }
    let total = bytes.len() as u64;
    let unsatisfiable = || {
        Response::builder()
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_RANGE, format!("bytes */{total}"))
            .body(Body::empty())
            .unwrap()
    };
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, total.saturating_sub(1)),
        Some(r) => {
            let Some(spec) = r.strip_prefix("bytes=").filter(|s| !s.contains(',')) else {
                return unsatisfiable();
            };
            let Some((a, b)) = spec.split_once('-') else {
                return unsatisfiable();
            };
            let Ok(a) = a.parse::<u64>() else {
                return unsatisfiable();
            };
            let b = match b {
                "" => total.saturating_sub(1),
                b => match b.parse::<u64>() {
                    Ok(b) if b >= a => b.min(total.saturating_sub(1)),
                    _ => return unsatisfiable(),
                },
            };
            if a >= total {
                return unsatisfiable();
            }
            (StatusCode::PARTIAL_CONTENT, a, b)
        }
    };
    let body = if total == 0 {
        Vec::new()
    } else {
        bytes[start as usize..=end as usize].to_vec()
    };
    reg.served.fetch_add(body.len() as u64, Ordering::Relaxed);
    let mut resp = Response::builder()
        .status(status)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, body.len());
    if status == StatusCode::PARTIAL_CONTENT {
        resp = resp.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{end}/{total}"),
        );
    }
    resp.body(Body::from(body)).unwrap()
}
