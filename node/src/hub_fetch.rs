//! Fetching a HuggingFace repo (by `org/name[@rev]`, `hf://…`, or a catalog name): each file
//! comes from the local store if a verified copy is there, else from a LAN peer that holds the
//! same repo at the same commit, else from HuggingFace with resumable range requests. Whatever
//! the source, the whole file must match HuggingFace's published sha256 (or git blob id)
//! before it is trusted; a peer's copy that doesn't is discarded and fetched from HF.

use std::{
    collections::HashMap,
    sync::{atomic::AtomicU64, atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use globset::{Glob, GlobSet, GlobSetBuilder};
use mesh_proto::{FileEntry, Manifest, ModelRef, RelPath, Source};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    fetch::{
        ask_manifest, check_space, check_target, materialize, FetchError, FetchProgress,
        FetchReport, FetchRequest, Fetcher, FileProgress,
    },
    hf_cache,
    hub::{file_digest, Hub, HubFile, RepoRef},
    store::{blocking, BlobStatus},
    swarm::FileJob,
};

/// Where one file of a fetch comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Already in the local store, verified.
    Local,
    /// A LAN peer holding the same repo at the same commit.
    Peer,
    /// HuggingFace.
    Hf,
}

/// One line of `mesh fetch --dry-run`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanEntry {
    /// The file's path in the model.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// Where it would come from.
    pub origin: Origin,
}

/// A file chosen for the fetch: what the Hub says, where it goes, where it comes from.
struct Wanted {
    hub: HubFile,
    target: RelPath,
    origin: Origin,
    /// The BLAKE3 root, when a local or peer copy is known.
    hash: Option<mesh_proto::Hash>,
}

impl Fetcher {
    /// Fetches `repo` (files per `files`, or all that pass the include/exclude globs) under
    /// the model name `name`.
    pub(crate) async fn fetch_hub(
        &self,
        req: &FetchRequest,
        name: String,
        repo: RepoRef,
        files: Vec<(String, String)>,
        on_start: impl FnOnce(&Manifest, Arc<FetchProgress>),
    ) -> Result<FetchReport, FetchError> {
        let started = Instant::now();
        let hub = Hub::from_env();
        let info = hub.repo_info(&repo).await?;
        let mut wanted = select(&info.files, &files, &req.include, &req.exclude)?;
        if wanted.is_empty() {
            return Err(FetchError::NothingSelected(repo.repo.clone()));
        }
        let connect_errors = self.peers.add_explicit(&req.peers).await;
        for e in &connect_errors {
            warn!("{e}");
        }
        // Local copies first, then what peers with the same repo at the same commit hold.
        for w in &mut wanted {
            let store = self.store.clone();
            let etag = w.hub.etag().to_string();
            if let Some(hash) = blocking(move || store.blob_for_etag(&etag)).await? {
                w.origin = Origin::Local;
                w.hash = Some(hash);
            }
        }
        if wanted.iter().any(|w| w.origin != Origin::Local) {
            let by_etag = self.peer_copies(&name, &info.repo, &info.commit).await;
            for w in wanted.iter_mut().filter(|w| w.origin != Origin::Local) {
                if let Some(entry) = by_etag.get(w.hub.etag()) {
                    if entry.size == w.hub.size {
                        w.origin = Origin::Peer;
                        w.hash = Some(entry.hash);
                    }
                }
            }
        }
        let plan: Vec<PlanEntry> = wanted
            .iter()
            .map(|w| PlanEntry {
                path: w.target.to_string(),
                size: w.hub.size,
                origin: w.origin,
            })
            .collect();
        let total: u64 = wanted.iter().map(|w| w.hub.size).sum();
        let mut report = FetchReport {
            id: String::new(),
            name: name.clone(),
            to: req.to.clone(),
            files: wanted.len(),
            total_bytes: total,
            bytes_already_local: wanted
                .iter()
                .filter(|w| w.origin == Origin::Local)
                .map(|w| w.hub.size)
                .sum(),
            bytes_from_peers: 0,
            bytes_from_hf: 0,
            peers_used: Vec::new(),
            seconds: 0.0,
            source: Some(format!("{}@{}", info.repo, info.commit)),
            plan: None,
        };
        if req.dry_run {
            report.plan = Some(plan);
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        check_target(&req.to)?;
        let missing = total - report.bytes_already_local;
        let provisional = Manifest::new(name.clone(), Source::Local, Vec::new())
            .map_err(crate::store::StoreError::from)?;
        check_space(&self.store, &req.to, missing, total)?;
        let progress = Arc::new(FetchProgress {
            files: wanted
                .iter()
                .map(|w| FileProgress {
                    path: w.target.clone(),
                    size: w.hub.size,
                    done: Arc::new(AtomicU64::new(if w.origin == Origin::Local {
                        w.hub.size
                    } else {
                        0
                    })),
                })
                .collect(),
        });
        on_start(&provisional, progress.clone());

        // Peers first: swarm every file a peer holds, then check each against HF's hash.
        let received_before = self.metrics.bytes_received.load(Ordering::Relaxed);
        let peer_files: Vec<usize> = (0..wanted.len())
            .filter(|&i| wanted[i].origin == Origin::Peer)
            .collect();
        if !peer_files.is_empty() {
            let mut jobs = Vec::new();
            for &i in &peer_files {
                let store = self.store.clone();
                let (hash, size) = (
                    wanted[i].hash.expect("peer files have a hash"),
                    wanted[i].hub.size,
                );
                if size == 0 {
                    continue;
                }
                if blocking(move || store.status(hash, size)).await? == BlobStatus::Complete {
                    continue;
                }
                let store = self.store.clone();
                let partial = blocking(move || store.partial(hash, size)).await?;
                jobs.push(FileJob {
                    path: wanted[i].target.clone(),
                    partial,
                    progress: progress.files[i].done.clone(),
                });
            }
            match self.swarm_download(jobs).await? {
                Ok(used) => report.peers_used = used,
                Err(e) => warn!("peers could not provide everything, using HuggingFace: {e}"),
            }
            for &i in &peer_files {
                let w = &mut wanted[i];
                let hash = w.hash.expect("peer files have a hash");
                let store = self.store.clone();
                let hub_file = w.hub.clone();
                let ok = blocking(move || {
                    let Ok(path) = store.data_path(hash) else {
                        return Ok(false);
                    };
                    let digest = file_digest(&path, &hub_file).map_err(|source| {
                        crate::store::StoreError::Io {
                            path: path.clone(),
                            source,
                        }
                    })?;
                    if digest == hub_file.etag() {
                        store.record_etag(hub_file.etag(), hash)?;
                        Ok(true)
                    } else {
                        // A peer relayed bytes that hash to its BLAKE3 root but not to
                        // HuggingFace's: never trust that blob.
                        store.forget_blob(hash)?;
                        Ok(false)
                    }
                })
                .await?;
                if !ok {
                    warn!(path = %w.target, "peer copy missing or does not match HuggingFace's hash: fetching from HuggingFace");
                    w.origin = Origin::Hf;
                    w.hash = None;
                    progress.files[i].done.store(0, Ordering::Relaxed);
                }
            }
        }
        report.bytes_from_peers =
            self.metrics.bytes_received.load(Ordering::Relaxed) - received_before;

        // What is left comes from HuggingFace, resumably, checked, then into the store.
        for (i, w) in wanted.iter_mut().enumerate() {
            if w.origin != Origin::Hf {
                continue;
            }
            let part = self.store.hub_part_path(w.hub.etag());
            if self.peers.connections().borrow().is_empty() {
                // Alone: one resumable download (a re-run continues where this one stopped).
                let before = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
                hub.download(
                    &info.repo,
                    &info.commit,
                    &w.hub,
                    &part,
                    progress.files[i].done.clone(),
                )
                .await?;
                report.bytes_from_hf += w.hub.size - before;
            } else {
                // With peers: split the HF work with any peer assembling the same file.
                let partial = self
                    .store
                    .hub_partials()
                    .open(
                        w.hub.etag(),
                        w.hub.size,
                        &part,
                        self.node_id,
                        info.restricted,
                    )
                    .map_err(|source| crate::store::StoreError::Io {
                        path: part.clone(),
                        source,
                    })?;
                report.bytes_from_hf += crate::hub_swarm::download(
                    &hub,
                    &info.repo,
                    &info.commit,
                    &w.hub,
                    partial.clone(),
                    self.peers.connections(),
                    progress.files[i].done.clone(),
                )
                .await?;
                // Keep serving its pieces to peers still assembling it.
                self.assembled
                    .lock()
                    .expect("assembled lock poisoned")
                    .push(partial);
            }
            let store = self.store.clone();
            let etag = w.hub.etag().to_string();
            let hash = blocking(move || {
                let (hash, _) = store.import_owned(&part)?;
                store.record_etag(&etag, hash)?;
                Ok(hash)
            })
            .await?;
            w.hash = Some(hash);
        }

        let entries = wanted
            .iter()
            .map(|w| FileEntry {
                path: w.target.clone(),
                size: w.hub.size,
                hash: w.hash.unwrap_or_else(|| mesh_proto::Hash::of(b"")),
                sha256: w.hub.sha256.clone(),
                etag: Some(w.hub.etag().to_string()),
            })
            .collect();
        let manifest = Manifest::new(
            name,
            Source::HuggingFace {
                repo: info.repo.clone(),
                commit: info.commit.clone(),
            },
            entries,
        )
        .map_err(crate::store::StoreError::from)?;
        let store = self.store.clone();
        let m = manifest.clone();
        let restricted = info.restricted;
        blocking(move || {
            if restricted {
                store.restrict(&m)?;
            }
            store.insert_manifest(&m)
        })
        .await?;
        let store = self.store.clone();
        let m = manifest.clone();
        let to = req.to.clone();
        tokio::task::spawn_blocking(move || materialize(&store, &m, &to))
            .await
            .expect("materialize task panicked")?;
        if req.hf_cache {
            let cache = hf_cache::cache_dir().ok_or(FetchError::NoHfCache)?;
            let store = self.store.clone();
            let m = manifest.clone();
            let rev = repo.revision.clone();
            let snapshot =
                tokio::task::spawn_blocking(move || hf_cache::export(&store, &m, &rev, &cache))
                    .await
                    .expect("export task panicked")?;
            info!(snapshot = %snapshot.display(), "exported to the HuggingFace cache");
        }
        report.id = manifest.id().to_string();
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Peers' copies of `repo` at `commit`, by HF etag, from any peer that lists it under
    /// `name` or the repo id.
    async fn peer_copies(
        &self,
        name: &str,
        repo: &str,
        commit: &str,
    ) -> HashMap<String, FileEntry> {
        let mut out = HashMap::new();
        let deadline = Instant::now()
            + if self.discovery {
                Duration::from_secs(2)
            } else {
                Duration::ZERO
            };
        loop {
            let conns = self.peers.connections().borrow().clone();
            if !conns.is_empty() || Instant::now() >= deadline {
                for conn in conns.values() {
                    for model in [name, repo] {
                        let Ok(model) = model.parse::<ModelRef>() else {
                            continue;
                        };
                        let Ok(Some(manifest)) = ask_manifest(conn, &model).await else {
                            continue;
                        };
                        if let Source::HuggingFace { repo: r, commit: c } = manifest.source() {
                            if r == repo && c == commit {
                                for f in manifest.files() {
                                    if let Some(etag) = &f.etag {
                                        out.insert(etag.clone(), f.clone());
                                    }
                                }
                            }
                        }
                    }
                }
                return out;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Chooses the files of a repo: the catalog's list (with renames), or all files passing the
/// globs.
fn select(
    files: &[HubFile],
    wanted: &[(String, String)],
    include: &[String],
    exclude: &[String],
) -> Result<Vec<Wanted>, FetchError> {
    let globs = |patterns: &[String]| -> Result<Option<GlobSet>, FetchError> {
        if patterns.is_empty() {
            return Ok(None);
        }
        let mut b = GlobSetBuilder::new();
        for p in patterns {
            b.add(Glob::new(p).map_err(|e| FetchError::BadGlob(e.to_string()))?);
        }
        Ok(Some(
            b.build().map_err(|e| FetchError::BadGlob(e.to_string()))?,
        ))
    };
    let (inc, exc) = (globs(include)?, globs(exclude)?);
    let mut out = Vec::new();
    let pick = |f: &HubFile, target: &str| -> Result<Wanted, FetchError> {
        Ok(Wanted {
            hub: f.clone(),
            target: target.parse().map_err(crate::store::StoreError::from)?,
            origin: Origin::Hf,
            hash: None,
        })
    };
    if wanted.is_empty() {
        for f in files {
            let included = inc.as_ref().is_none_or(|g| g.is_match(&f.path));
            let excluded = exc.as_ref().is_some_and(|g| g.is_match(&f.path));
            if included && !excluded {
                out.push(pick(f, &f.path)?);
            }
        }
    } else {
        for (from, to) in wanted {
            let f = files
                .iter()
                .find(|f| &f.path == from)
                .ok_or_else(|| FetchError::Hub(crate::hub::HubError::NotFound(from.clone())))?;
            out.push(pick(f, to)?);
        }
    }
    Ok(out)
}
