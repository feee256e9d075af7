//! Resolving what to fetch: a catalog name or `org/name[@rev]` is a model published on
//! HuggingFace; anything else is a mesh model, found by id or name in the store or on a peer.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use mesh_proto::{
    wire::{ErrorCode, Request, Response},
    Manifest, ModelRef,
};

use super::{catalog, FetchError, Fetcher};
use crate::{
    hf::{Hub, RepoRef},
    net::{read_frame, write_frame, ConnectError},
    store::blocking,
};

/// How long a fetch by name waits for discovered peers to offer the manifest.
const RESOLVE_WAIT: Duration = Duration::from_secs(8);

/// A model published on HuggingFace, by the name it is fetched under.
pub(super) struct Published {
    /// The model name in the store (the catalog name, or the repo id).
    pub(super) name: String,
    /// The repo and revision.
    pub(super) repo: RepoRef,
    /// `(path in repo, path in the model)`; empty: every file under its own path.
    pub(super) files: Vec<(String, String)>,
    /// The Hub client.
    pub(super) hub: Hub,
}

impl Fetcher {
    /// The published model a name stands for, if it is a catalog name or a repo reference.
    pub(super) fn published(&self, name: &str) -> Option<Published> {
        let (name, repo, files) = match catalog::lookup(name, &self.aliases) {
            Some(entry) => {
                let repo = RepoRef::parse(&format!("{}@{}", entry.repo, entry.revision))?;
                (name.to_string(), repo, entry.file_map())
            }
            None => {
                let repo = RepoRef::parse(name)?;
                (repo.repo.clone(), repo, Vec::new())
            }
        };
        Some(Published {
            name,
            repo,
            files,
            hub: Hub::from_env().with_limits(self.limits.clone()),
        })
    }

    /// Asks connected peers for the manifest, waiting up to [`RESOLVE_WAIT`] for discovery to
    /// bring peers that have it.
    pub(super) async fn resolve(
        &self,
        model: &ModelRef,
        connect_errors: &mut Vec<ConnectError>,
    ) -> Result<Manifest, FetchError> {
        let deadline = Instant::now()
            + if self.discovery {
                RESOLVE_WAIT
            } else {
                Duration::ZERO
            };
        let mut asked = HashSet::new();
        let mut first_error = None;
        loop {
            let conns = self.peers.connections().borrow().clone();
            for (addr, conn) in conns {
                if !asked.insert((addr, conn.stable_id())) {
                    continue;
                }
                match ask_manifest(&conn, model).await {
                    Ok(Some(manifest)) => {
                        let store = self.store.clone();
                        let m = manifest.clone();
                        blocking(move || store.insert_manifest(&m)).await?;
                        return Ok(manifest);
                    }
                    Ok(None) => {}
                    Err(e) => first_error = first_error.or(Some(e)),
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        if asked.is_empty() {
            if !connect_errors.is_empty() {
                return Err(connect_errors.remove(0).into());
            }
            if !self.discovery {
                return Err(FetchError::UnknownModel(model.clone()));
            }
            return Err(FetchError::NoPeers(model.clone()));
        }
        Err(FetchError::UnknownModel(model.clone()))
    }
}

/// Asks one peer for a manifest; `None` if it doesn't have it.
pub async fn ask_manifest(
    conn: &quinn::Connection,
    model: &ModelRef,
) -> Result<Option<Manifest>, FetchError> {
    let peer = conn.remote_address();
    let bad = |why: String| FetchError::BadManifest { peer, why };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| bad(e.to_string()))?;
    write_frame(&mut send, &Request::Manifest(model.clone()))
        .await
        .map_err(|e| bad(e.to_string()))?;
    let _ = send.finish();
    match read_frame(&mut recv)
        .await
        .map_err(|e| bad(e.to_string()))?
    {
        Response::Manifest(bytes) => {
            let manifest = Manifest::decode(&bytes).map_err(|e| bad(e.to_string()))?;
            match model {
                ModelRef::Id(id) if manifest.id() != *id => {
                    Err(bad(format!("asked for {id}, got {}", manifest.id())))
                }
                ModelRef::Name(name) if manifest.name() != name => Err(bad(format!(
                    "asked for {name:?}, got {:?}",
                    manifest.name()
                ))),
                _ => Ok(Some(manifest)),
            }
        }
        Response::Error(ErrorCode::NotFound) => Ok(None),
        other => Err(bad(format!("unexpected response {other:?}"))),
    }
}
