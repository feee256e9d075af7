//! What the node does not serve itself is passed on to the Hub: datasets and spaces, search,
//! `whoami`, a model's commits or refs, uploads. An app pointed at the node with `HF_ENDPOINT`
//! then keeps working for all of it, as with a plain HTTP proxy: the request goes to the Hub
//! as it came, once, and the Hub's answer comes back as it came, streamed, redirects included
//! (the client follows a redirect to the CDN itself). Nothing of it is kept or shared in the
//! mesh; only models are.
//!
//! The client's own token goes to the Hub; the node's API token never leaves the node: a read
//! (`GET`, `HEAD`) that carried it goes with the node owner's HF token instead, if the node
//! has one, and anything else without a token. Links to the Hub's own origin in an answer (the
//! next page of a listing) are turned into links to the node, so that the client comes back
//! here. Only the Hub's routes are passed on: not the node's own (`/v1/...`), nor a browser's
//! `/favicon.ico`.

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    response::Response,
};

use super::{meta_error, ApiState};
use crate::hf::{meta::MetaError, Auth, HubError};

/// Headers that belong to one connection, not to the request or answer (RFC 9110, 7.6.1),
/// besides `Keep-Alive`.
const HOP_BY_HOP: [header::HeaderName; 7] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Passes a request no route of the node took on to the Hub, and the Hub's answer back.
pub(crate) async fn pass_on(State(state): State<ApiState>, req: Request) -> Response {
    let path = req.uri().path();
    if !is_hub_route(path) {
        return crate::api::error(StatusCode::NOT_FOUND, format!("no such API route: {path}"));
    }
    let resp = match pass(&state, req).await {
        Ok(resp) => resp,
        Err(e) => meta_error(&MetaError::Hub(e)),
    };
    // The node's own HF routes are counted by their route layer, this fallback here.
    state.metrics.count_hf_request(resp.status().as_u16());
    resp
}

/// Sends `req` to the Hub as it came and returns the Hub's answer as it came, its links to the
/// Hub's own origin (a `Link` to the next page, a `Location` on the Hub) turned into links to
/// this node; `Err` if the Hub could not be asked.
pub(super) async fn pass(state: &ApiState, req: Request) -> Result<Response, HubError> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let (parts, body) = req.into_parts();
    let mut headers = without_hop_by_hop(&parts.headers);
    headers.remove(header::HOST);
    // The node's API token never leaves the node. A read that carried it is the node owner's,
    // and goes with the owner's HF token, as the node's own downloads do; anything else (an
    // upload) goes without a token.
    let owner = matches!(state.hub_auth(&parts.headers), Auth::Node);
    if owner {
        headers.remove(header::AUTHORIZATION);
    }
    let as_node = owner && matches!(parts.method, Method::GET | Method::HEAD);
    let body = reqwest::Body::wrap_stream(body.into_data_stream());
    let hub = state.fetcher.meta.hub();
    let answer = hub
        .pass_on(parts.method, &path, headers, body, as_node)
        .await?;
    let (status, mut headers) = (answer.status(), without_hop_by_hop(answer.headers()));
    if let Some(host) = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
    {
        let (hub, node) = (format!("{}/", hub.endpoint()), format!("http://{host}/"));
        for name in [header::LINK, header::LOCATION] {
            let here = headers
                .get(&name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.replace(&hub, &node))
                .and_then(|v| HeaderValue::from_str(&v).ok());
            if let Some(here) = here {
                headers.insert(name, here);
            }
        }
    }
    let mut resp = Response::new(Body::from_stream(answer.bytes_stream()));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    Ok(resp)
}

/// Whether `path` is one of the Hub's API or repo routes (`/api/...`, `/datasets/...`,
/// `/spaces/...`, `/{org}/{name}/...`), not the node's own (`/v1/...`) nor a page's stray
/// request (`/favicon.ico`), which must not reach the Hub.
fn is_hub_route(path: &str) -> bool {
    let prefixes = ["/api/", "/datasets/", "/spaces/"];
    let own = path.starts_with("/v1/") || path == "/v1";
    let repo_route = path.trim_start_matches('/').splitn(3, '/').count() == 3;
    !own && (prefixes.iter().any(|p| path.starts_with(p)) || repo_route)
}

fn without_hop_by_hop(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    for name in &HOP_BY_HOP {
        out.remove(name);
    }
    out.remove("keep-alive");
    out
}

#[cfg(test)]
mod tests {
    use super::is_hub_route;

    #[test]
    fn only_the_hubs_routes_are_passed_on() {
        for path in [
            "/api/whoami-v2",
            "/api/datasets/org/data/revision/main",
            "/datasets/org/data/resolve/main/a.csv",
            "/org/name/commits/main",
            "/org/name.git/info/lfs/objects/batch",
        ] {
            assert!(is_hub_route(path), "{path}");
        }
        for path in ["/v1/nothing", "/v1", "/favicon.ico", "/org/name", "/"] {
            assert!(!is_hub_route(path), "{path}");
        }
    }
}
