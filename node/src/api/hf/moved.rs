//! Repos the Hub moved: one-part ids such as `gpt2` or `bert-base-uncased` (moved under orgs in
//! 2024, and still what tutorials type) and renamed repos. The Hub answers a request about the
//! old id with a 307 to the same request about the new one, relative to its own origin, and
//! clients follow it on the same host. The node answers the same, relative to itself, so that
//! the client asks again by the new id and everything after (the node's metadata, the swarm,
//! the client's cache) knows the repo by one name.
//!
//! The node's routes name repos as `org/name`; a one-part id is answered here, before routing,
//! by asking the Hub where it went (`hf::meta` keeps the answer, so that it still redirects
//! offline).

use axum::{
    extract::{Request, State},
    http::{header, StatusCode, Uri},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::{hf_error, meta_error, ApiState};
use crate::hf::RepoRef;

/// A response's mark that its repo moved: the middleware turns it into the redirect, since
/// only it knows the request's path.
#[derive(Clone, Debug)]
pub(super) struct Moved {
    /// The id asked for.
    pub from: String,
    /// The id the Hub named.
    pub to: String,
}

/// The metadata routes' words after a repo id (`/api/models/{repo}/{word}/...`).
const API_ROUTES: [&str; 4] = ["revision", "tree", "paths-info", "auth-check"];

/// Answers requests about one-part repo ids, and turns a [`Moved`] mark into a 307.
pub(crate) async fn redirect_moved(
    State(state): State<ApiState>,
    req: Request,
    next: Next,
) -> Response {
    let uri = req.uri().clone();
    let resp = match one_part_repo(uri.path()) {
        Some(id) => {
            let auth = state.hub_auth(req.headers());
            match state.fetcher.meta.revision(id, "main", auth).await {
                Ok(_) => hf_error(
                    StatusCode::NOT_FOUND,
                    "RepoNotFound",
                    &format!(
                        "mesh serves repos by their org/name id; HuggingFace named none for {id}"
                    ),
                ),
                Err(e) => meta_error(&e),
            }
        }
        None => next.run(req).await,
    };
    let Some(moved) = resp.extensions().get::<Moved>() else {
        return resp;
    };
    match relocate(&uri, &moved.from, &moved.to) {
        Some(location) => {
            let body = format!("Temporary Redirect. Redirecting to {location}");
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(header::LOCATION, location)],
                body,
            )
                .into_response()
        }
        None => hf_error(
            StatusCode::NOT_FOUND,
            "RepoNotFound",
            &format!("HuggingFace moved {} to {}", moved.from, moved.to),
        ),
    }
}

/// The one-part repo id a request is about, if the path is one of the HF routes with a
/// one-part id where the node's own routes expect `org/name`.
fn one_part_repo(path: &str) -> Option<&str> {
    let (id, two_part) = if let Some(rest) = path.strip_prefix("/api/models/") {
        let segs: Vec<&str> = rest.split('/').collect();
        let two_part = segs.len() == 2 || (segs.len() >= 3 && API_ROUTES.contains(&segs[2]));
        let one_part = segs.len() == 1 || API_ROUTES.contains(&segs[1]);
        (segs[0], two_part || !one_part)
    } else {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let two_part = segs.len() >= 4 && segs[2] == "resolve";
        let one_part = segs.len() >= 4 && segs[1] == "resolve";
        (segs[0], two_part || !one_part)
    };
    // A valid id as `mesh fetch hf://{id}` takes it.
    let valid = RepoRef::parse(&format!("hf://{id}")).is_some_and(|r| r.repo == id);
    (valid && !two_part).then_some(id)
}

/// The request's path and query with the repo id `from` replaced by `to`.
fn relocate(uri: &Uri, from: &str, to: &str) -> Option<String> {
    let path = uri.path();
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let api = path
        .strip_prefix("/api/models/")
        .and_then(|p| p.strip_prefix(from))
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        .map(|rest| format!("/api/models/{to}{rest}"));
    let resolve = || {
        path.strip_prefix('/')
            .and_then(|p| p.strip_prefix(from))
            .filter(|rest| rest.starts_with("/resolve/"))
            .map(|rest| format!("/{to}{rest}"))
    };
    api.or_else(resolve).map(|p| format!("{p}{query}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_part_ids_are_told_from_org_and_name() {
        for (path, id) in [
            ("/api/models/gpt2", Some("gpt2")),
            ("/api/models/gpt2/revision/main", Some("gpt2")),
            ("/api/models/gpt2/tree/main", Some("gpt2")),
            ("/api/models/gpt2/tree/main/sub/dir", Some("gpt2")),
            ("/api/models/gpt2/paths-info/main", Some("gpt2")),
            ("/gpt2/resolve/main/config.json", Some("gpt2")),
            ("/gpt2/resolve/main/sub/a.json", Some("gpt2")),
            // org/name: the node's own routes.
            ("/api/models/org/tiny", None),
            ("/api/models/org/tiny/revision/main", None),
            ("/api/models/org/tree/tree/main", None),
            ("/org/tiny/resolve/main/config.json", None),
            ("/org/resolve/resolve/main/config.json", None),
            // Not HF routes, or not repo ids.
            ("/v1/status", None),
            ("/api/models/gpt2/other/main", None),
            ("/../resolve/main/x", None),
            ("/", None),
        ] {
            assert_eq!(one_part_repo(path), id, "{path}");
        }
    }

    #[test]
    fn the_redirect_keeps_the_route_and_the_query() {
        let at = |s: &str| s.parse::<Uri>().unwrap();
        let to = "openai-community/gpt2";
        assert_eq!(
            relocate(&at("/api/models/gpt2/revision/main?expand=x"), "gpt2", to).as_deref(),
            Some("/api/models/openai-community/gpt2/revision/main?expand=x")
        );
        assert_eq!(
            relocate(&at("/gpt2/resolve/main/config.json"), "gpt2", to).as_deref(),
            Some("/openai-community/gpt2/resolve/main/config.json")
        );
        assert_eq!(
            relocate(&at("/KB/bert/resolve/abc/a.bin"), "KB/bert", "KBLab/bert").as_deref(),
            Some("/KBLab/bert/resolve/abc/a.bin")
        );
        assert_eq!(relocate(&at("/api/models/gpt2x"), "gpt2", to), None);
    }
}
