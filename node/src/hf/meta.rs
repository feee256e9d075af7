//! The Hub's metadata for the commits this node has seen, kept in the store, so that the node's
//! HF endpoint answers what the Hub said for the same commit, also offline.
//!
//! - A branch or tag moves: it is asked of the Hub (at most every [`REF_TTL`]), and offline or
//!   unreachable the last commit the Hub named answers.
//! - A commit's revision info (`?blobs=true`, as the Hub sent it) and its recursive tree never
//!   change: asked once, kept.
//! - A move (the Hub redirected the repo to another id: `gpt2`, a renamed repo) is trusted
//!   for [`MOVE_TTL`] without asking again, and kept, so that it still redirects offline.
//! - A refusal (no such repo, revision, or no access) is the Hub's answer and is passed on as
//!   it came, never replaced by what the cache holds.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{is_commit, Answer, Auth, Hub, HubError, RepoInfo};
use crate::store::{blocking, Store, StoreError};

/// How long the commit a branch named is trusted without asking the Hub again.
const REF_TTL: Duration = Duration::from_secs(5);
/// How long a move the Hub made is trusted without asking again: a client asks about the old
/// id once per file, and the Hub moves repos for good.
const MOVE_TTL: Duration = Duration::from_secs(600);

/// Why metadata could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// The Hub said no (its answer, to pass on).
    #[error("HuggingFace answered {}", .0.status)]
    Refused(Answer),
    /// The Hub could not be asked, and nothing is kept.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A repo at a commit: the Hub's revision info, raw and read.
#[derive(Clone, Debug)]
pub struct Revision {
    /// The revision info as the Hub sent it (`?blobs=true`).
    pub json: serde_json::Value,
    /// What it says.
    pub info: RepoInfo,
}

/// Branches asked lately: (repo, rev) -> (commit, when).
type Refs = HashMap<(String, String), (String, Instant)>;
/// Moves the Hub named lately: old id -> (new id, when).
type Moves = HashMap<String, (String, Instant)>;

/// The metadata cache in front of the Hub. Cheap to clone.
#[derive(Clone, Debug)]
pub struct HubMeta {
    hub: Hub,
    store: Store,
    /// Branches asked of the Hub lately: (repo, rev) -> (commit, when). A std mutex: lookups.
    refs: Arc<Mutex<Refs>>,
    /// Moves the Hub named lately.
    moves: Arc<Mutex<Moves>>,
}

impl HubMeta {
    /// A cache in `store` in front of `hub`.
    pub fn new(hub: Hub, store: Store) -> Self {
        Self {
            hub,
            store,
            refs: Arc::default(),
            moves: Arc::default(),
        }
    }

    /// The Hub client.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The revision info of `repo` at `rev` (a branch, tag or commit).
    pub async fn revision(
        &self,
        repo: &str,
        rev: &str,
        auth: Auth<'_>,
    ) -> Result<Revision, MetaError> {
        if let Some(to) = self.recent_move(repo) {
            return Err(HubError::Moved {
                repo: repo.to_string(),
                to,
            }
            .into());
        }
        if is_commit(rev) {
            if let Some(kept) = self.kept_revision(repo, rev).await? {
                return Ok(kept);
            }
        } else if let Some(commit) = self.recent_ref(repo, rev) {
            if let Some(kept) = self.kept_revision(repo, &commit).await? {
                return Ok(kept);
            }
        }
        match self.hub.revision(repo, rev, auth).await {
            Ok(Ok(json)) => {
                let info =
                    RepoInfo::from_revision_json(repo, &json).ok_or_else(|| HubError::Http {
                        endpoint: self.hub.endpoint().to_string(),
                        why: format!("revision info of {repo}@{rev} lacks sizes or blob ids"),
                    })?;
                self.keep(
                    &key("rev", repo, &info.commit),
                    json.to_string().into_bytes(),
                )
                .await?;
                self.keep_ref(repo, rev, &info.commit).await?;
                Ok(Revision { json, info })
            }
            Ok(Err(answer)) => Err(MetaError::Refused(answer)),
            Err(HubError::Moved { repo, to }) => {
                self.moves
                    .lock()
                    .expect("moves lock poisoned")
                    .insert(repo.clone(), (to.clone(), Instant::now()));
                self.keep(&key("moved", &repo, ""), to.clone().into_bytes())
                    .await?;
                Err(HubError::Moved { repo, to }.into())
            }
            Err(e) if e.is_unreachable() => match self.kept_move(repo).await? {
                Some(to) => Err(HubError::Moved {
                    repo: repo.to_string(),
                    to,
                }
                .into()),
                None => self.kept_commit(repo, rev, e).await,
            },
            Err(e) => Err(e.into()),
        }
    }

    /// The revision a branch or tag last named, for when the Hub cannot be asked (`e`).
    async fn kept_commit(&self, repo: &str, rev: &str, e: HubError) -> Result<Revision, MetaError> {
        if is_commit(rev) {
            return Err(e.into());
        }
        let commit = self.kept(&key("ref", repo, rev)).await?;
        match commit.and_then(|c| String::from_utf8(c).ok()) {
            Some(commit) => self.kept_revision(repo, &commit).await?.ok_or(e.into()),
            None => Err(e.into()),
        }
    }

    /// Where the Hub last said `repo` moved, if it did.
    async fn kept_move(&self, repo: &str) -> Result<Option<String>, StoreError> {
        let to = self.kept(&key("moved", repo, "")).await?;
        Ok(to.and_then(|t| String::from_utf8(t).ok()))
    }

    /// Every entry of `repo`'s tree at `commit` (recursive), as the Hub lists it.
    pub async fn tree(
        &self,
        repo: &str,
        commit: &str,
        auth: Auth<'_>,
    ) -> Result<Vec<serde_json::Value>, MetaError> {
        let k = key("tree", repo, commit);
        if let Some(bytes) = self.kept(&k).await? {
            if let Ok(entries) = serde_json::from_slice(&bytes) {
                return Ok(entries);
            }
        }
        match self.hub.tree(repo, commit, auth).await {
            Ok(Ok(entries)) => {
                let bytes = serde_json::to_vec(&entries).expect("JSON values serialize");
                self.keep(&k, bytes).await?;
                Ok(entries)
            }
            Ok(Err(answer)) => Err(MetaError::Refused(answer)),
            Err(e) if e.is_unreachable() => {
                // Offline and never listed: the files the revision info names.
                match self.kept_revision(repo, commit).await? {
                    Some(rev) => Ok(tree_from_revision(&rev)),
                    None => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    fn recent_move(&self, repo: &str) -> Option<String> {
        let moves = self.moves.lock().expect("moves lock poisoned");
        moves
            .get(repo)
            .filter(|(_, at)| at.elapsed() < MOVE_TTL)
            .map(|(to, _)| to.clone())
    }

    fn recent_ref(&self, repo: &str, rev: &str) -> Option<String> {
        let refs = self.refs.lock().expect("refs lock poisoned");
        refs.get(&(repo.to_string(), rev.to_string()))
            .filter(|(_, at)| at.elapsed() < REF_TTL)
            .map(|(c, _)| c.clone())
    }

    async fn keep_ref(&self, repo: &str, rev: &str, commit: &str) -> Result<(), StoreError> {
        self.refs.lock().expect("refs lock poisoned").insert(
            (repo.to_string(), rev.to_string()),
            (commit.to_string(), Instant::now()),
        );
        if rev != commit {
            self.keep(&key("ref", repo, rev), commit.as_bytes().to_vec())
                .await?;
        }
        Ok(())
    }

    async fn kept_revision(
        &self,
        repo: &str,
        commit: &str,
    ) -> Result<Option<Revision>, StoreError> {
        let Some(bytes) = self.kept(&key("rev", repo, commit)).await? else {
            return Ok(None);
        };
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return Ok(None);
        };
        Ok(RepoInfo::from_revision_json(repo, &json).map(|info| Revision { json, info }))
    }

    async fn kept(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let (store, key) = (self.store.clone(), key.to_string());
        blocking(move || store.hf_meta(&key)).await
    }

    async fn keep(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let (store, key) = (self.store.clone(), key.to_string());
        blocking(move || store.put_hf_meta(&key, &value)).await
    }
}

/// The store key of one kind of metadata (`ref`, `rev`, `tree`, `moved`) of `repo` at `at`.
fn key(kind: &str, repo: &str, at: &str) -> String {
    format!("{kind}\0{repo}\0{at}")
}

/// A recursive listing built from revision info alone (offline, never listed): every file, and
/// every folder above one, with folder ids derived from the commit.
fn tree_from_revision(rev: &Revision) -> Vec<serde_json::Value> {
    use sha1::Digest as _;
    let mut out = Vec::new();
    let mut dirs = std::collections::BTreeSet::new();
    let siblings = rev.json["siblings"].as_array().cloned().unwrap_or_default();
    for f in &rev.info.files {
        let mut entry =
            serde_json::json!({ "type": "file", "oid": f.git_oid, "size": f.size, "path": f.path });
        if let Some(sha) = &f.sha256 {
            let pointer = siblings
                .iter()
                .find(|s| s["rfilename"] == f.path.as_str())
                .and_then(|s| s["lfs"]["pointerSize"].as_u64())
                .unwrap_or(134);
            entry["lfs"] =
                serde_json::json!({ "oid": sha, "size": f.size, "pointerSize": pointer });
        }
        out.push(entry);
        let mut dir = f.path.as_str();
        while let Some((parent, _)) = dir.rsplit_once('/') {
            dirs.insert(parent.to_string());
            dir = parent;
        }
    }
    for d in dirs {
        let oid = hex::encode(sha1::Sha1::digest(format!("{}:{d}", rev.info.commit)));
        out.push(serde_json::json!({ "type": "directory", "oid": oid, "size": 0, "path": d }));
    }
    out
}
