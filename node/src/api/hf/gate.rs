//! Who may read a gated or private repo through the endpoint: a request whose token the Hub
//! accepts for that repo (asked once per token and repo with `auth-check`, and the answer kept
//! for [`TTL`]), or the node owner's API token (from `node.json`). Offline, only the owner's.
//!
//! Without this, anything the node owner fetched with their HF token would be readable by every
//! local user and every web page that reaches the port.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{http::StatusCode, response::Response};

use super::{hf_error, passthrough};
use crate::hf::{Answer, Hub};

/// How long the Hub's answer about a token and a repo is trusted.
const TTL: Duration = Duration::from_secs(60);

/// The Hub's answers by (token hash, repo), and when they came.
type Answers = HashMap<(blake3::Hash, String), (Result<(), Answer>, Instant)>;

/// The gate. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Gate {
    /// The node owner's API token, hashed.
    owner: blake3::Hash,
    hub: Hub,
    /// (token hash, repo) -> the Hub's answer and when. A std mutex: lookups only.
    answers: Arc<Mutex<Answers>>,
}

impl Gate {
    pub(crate) fn new(owner_token: &str, hub: Hub) -> Self {
        Self {
            owner: blake3::hash(owner_token.as_bytes()),
            hub,
            answers: Arc::default(),
        }
    }

    /// Whether a request with `token` may read `repo` (which is `restricted`: gated or
    /// private); the refusal to send if not.
    pub(crate) async fn check(
        &self,
        repo: &str,
        restricted: bool,
        token: Option<&str>,
    ) -> Result<(), Response> {
        if !restricted {
            return Ok(());
        }
        let Some(token) = token else {
            return Err(hf_error(
                StatusCode::UNAUTHORIZED,
                "GatedRepo",
                &format!("Access to model {repo} is restricted. You must have access to it and be authenticated to access it. Please log in."),
            ));
        };
        let hashed = blake3::hash(token.as_bytes());
        if hashed == self.owner {
            return Ok(());
        }
        let key = (hashed, repo.to_string());
        let kept = {
            let answers = self.answers.lock().expect("gate lock poisoned");
            answers
                .get(&key)
                .filter(|(_, at)| at.elapsed() < TTL)
                .map(|(a, _)| a.clone())
        };
        let answer = match kept {
            Some(answer) => answer,
            None => match self.hub.auth_check(repo, Some(token)).await {
                Ok(answer) => {
                    let mut answers = self.answers.lock().expect("gate lock poisoned");
                    answers.insert(key, (answer.clone(), Instant::now()));
                    answer
                }
                Err(e) => {
                    return Err(hf_error(
                        StatusCode::UNAUTHORIZED,
                        "GatedRepo",
                        &format!("Access to model {repo} is restricted and HuggingFace can't be asked ({e}): only the node owner's API token opens it now."),
                    ))
                }
            },
        };
        answer.map_err(|refusal| passthrough(&refusal))
    }
}
