//! Fetching a mesh model (known by manifest, id or name) from the store and peers.

use std::{
    net::SocketAddr,
    sync::{atomic::AtomicU64, atomic::Ordering, Arc, Weak},
    time::Instant,
};

use mesh_proto::{Hash, Manifest};

use super::{
    FetchError, FetchProgress, FetchReport, FetchRequest, Fetcher, FileProgress, Origin, PlanEntry,
};
use crate::{
    store::{blocking, ranges, BlobStatus, PartialBlob, Store, StoreError},
    swarm::{self, DownloadError, FileJob},
};

impl Fetcher {
    /// Fetches a model known by manifest (id or name) from the store and peers.
    pub(super) async fn fetch_mesh(
        &self,
        req: FetchRequest,
        on_start: impl FnOnce(&Manifest, Arc<FetchProgress>),
    ) -> Result<FetchReport, FetchError> {
        let started = Instant::now();
        let store = self.store.clone();
        let local = {
            let store = store.clone();
            let model = req.model.clone();
            blocking(move || store.manifest(&model)).await?
        };
        let complete_locally = match &local {
            Some(manifest) => missing_bytes(&store, manifest).await? == 0,
            None => false,
        };
        let mut connect_errors = Vec::new();
        if !complete_locally {
            connect_errors = self.peers.add_explicit(&req.peers).await;
        }
        let manifest = match local {
            Some(manifest) => manifest,
            None => self.resolve(&req.model, &mut connect_errors).await?,
        };
        let in_place = self
            .adopt_in_place(&manifest, &req.targets, req.dry_run)
            .await?;
        if req.dry_run {
            return self.plan_mesh(&manifest, &req, &in_place, started).await;
        }
        for target in &req.targets {
            target.check()?;
        }

        // Whoever holds a blob's lock is downloading it; a second fetch of the same model
        // waits here and then finds the blob complete.
        let _guards = self.lock_blobs(&manifest).await;
        // Room first (evicting under max_store), so a fetch refused for space leaves no
        // partial files behind.
        let missing = missing_bytes(&store, &manifest).await?;
        let keep = manifest.files().iter().map(|f| f.hash).collect();
        self.make_room(&req.targets, missing, manifest.total_size(), keep)
            .await?;
        let partials = open_partials(&store, &manifest).await?;
        let progress = Arc::new(progress_of(&manifest, &partials));
        let already = progress.done();
        let missing = manifest.total_size() - already;
        on_start(&manifest, progress.clone());

        let received_before = self.metrics.bytes_received.load(Ordering::Relaxed);
        let mut peers_used = Vec::new();
        if missing > 0 {
            if self.peers.connections().borrow().is_empty() && !self.discovery {
                return Err(match connect_errors.into_iter().next() {
                    Some(e) => e.into(),
                    None => FetchError::NoPeers(req.model),
                });
            }
            let jobs = manifest
                .files()
                .iter()
                .zip(&partials)
                .zip(&progress.files)
                .filter_map(|((file, partial), progress)| {
                    Some(FileJob {
                        path: file.path.clone(),
                        partial: partial.clone()?,
                        progress: progress.done.clone(),
                    })
                })
                .collect();
            peers_used = match self.swarm_download(jobs).await? {
                Ok(used) => used,
                Err(DownloadError::NoSource { .. })
                    if !connect_errors.is_empty()
                        && self.peers.connections().borrow().is_empty() =>
                {
                    return Err(connect_errors.remove(0).into());
                }
                Err(e) => return Err(e.into()),
            };
        }
        drop(partials);
        let replaced = self.materialize(&manifest, &req.targets, "main").await?;
        let mut report = FetchReport::new(&manifest, &req, started);
        report.replaced = replaced;
        report.in_place = in_place_paths(&manifest, &in_place);
        report.bytes_already_local = already;
        report.bytes_from_peers =
            self.metrics.bytes_received.load(Ordering::Relaxed) - received_before;
        report.peers_used = peers_used;
        Ok(report)
    }

    /// Swarms `jobs` from this node's peers, then checkpoints every partial blob, also when
    /// the download failed, so that a re-run resumes from what arrived.
    pub(crate) async fn swarm_download(
        &self,
        jobs: Vec<FileJob>,
    ) -> Result<Result<Vec<SocketAddr>, DownloadError>, StoreError> {
        let partials: Vec<_> = jobs.iter().map(|j| j.partial.clone()).collect();
        let result = swarm::download(
            jobs,
            self.peers.connections(),
            self.peers.clone(),
            self.metrics.clone(),
            self.limits.clone(),
        )
        .await;
        for partial in partials {
            blocking(move || partial.checkpoint()).await?;
        }
        Ok(result)
    }

    /// `--dry-run` for a mesh model: each file and whether it is here or must come from peers.
    async fn plan_mesh(
        &self,
        manifest: &Manifest,
        req: &FetchRequest,
        in_place: &[Option<Origin>],
        started: Instant,
    ) -> Result<FetchReport, FetchError> {
        let mut plan = Vec::new();
        let mut local = 0;
        for (file, in_place) in manifest.files().iter().zip(in_place) {
            let store = self.store.clone();
            let (hash, size) = (file.hash, file.size);
            let here = blocking(move || store.status(hash, size)).await? == BlobStatus::Complete;
            if here {
                local += file.size;
            }
            plan.push(PlanEntry {
                path: file.path.to_string(),
                size: file.size,
                origin: match (in_place, here) {
                    (Some(origin), _) => *origin,
                    (None, true) => Origin::Local,
                    (None, false) => Origin::Peer,
                },
            });
        }
        let mut report = FetchReport::new(manifest, req, started);
        report.in_place = in_place_paths(manifest, in_place);
        report.bytes_already_local = local;
        report.plan = Some(plan);
        Ok(report)
    }

    async fn lock_blobs(&self, manifest: &Manifest) -> Vec<tokio::sync::OwnedMutexGuard<()>> {
        let mut hashes: Vec<Hash> = manifest.files().iter().map(|f| f.hash).collect();
        hashes.sort();
        hashes.dedup();
        let locks: Vec<_> = {
            let mut map = self.locks.lock().expect("locks lock poisoned");
            map.retain(|_, weak| weak.strong_count() > 0);
            hashes
                .iter()
                .map(|h| {
                    if let Some(lock) = map.get(h).and_then(Weak::upgrade) {
                        return lock;
                    }
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(*h, Arc::downgrade(&lock));
                    lock
                })
                .collect()
        };
        let mut guards = Vec::with_capacity(locks.len());
        // Sorted order, so two fetches can never hold each other's locks.
        for lock in locks {
            guards.push(lock.lock_owned().await);
        }
        guards
    }
}

fn in_place_paths(manifest: &Manifest, in_place: &[Option<Origin>]) -> Vec<String> {
    manifest
        .files()
        .iter()
        .zip(in_place)
        .filter(|(_, o)| **o == Some(Origin::InPlace))
        .map(|(f, _)| f.path.to_string())
        .collect()
}

async fn missing_bytes(store: &Store, manifest: &Manifest) -> Result<u64, FetchError> {
    let store = store.clone();
    let manifest = manifest.clone();
    Ok(blocking(move || {
        let mut missing = 0;
        for file in manifest.files() {
            missing += match store.status(file.hash, file.size)? {
                BlobStatus::Complete => 0,
                BlobStatus::Partial(have) => file.size - ranges::byte_len(&have, file.size),
                BlobStatus::Missing => file.size,
            };
        }
        Ok(missing)
    })
    .await?)
}

/// Progress counters for `manifest`'s files, starting at what is verified here.
fn progress_of(manifest: &Manifest, partials: &[Option<Arc<PartialBlob>>]) -> FetchProgress {
    FetchProgress {
        files: manifest
            .files()
            .iter()
            .zip(partials)
            .map(|(file, partial)| FileProgress {
                path: file.path.clone(),
                size: file.size,
                done: Arc::new(AtomicU64::new(match partial {
                    Some(p) => ranges::byte_len(&p.have(), file.size),
                    None => file.size,
                })),
            })
            .collect(),
    }
}

/// One writer per file that is not complete (`None` for complete ones).
async fn open_partials(
    store: &Store,
    manifest: &Manifest,
) -> Result<Vec<Option<Arc<PartialBlob>>>, FetchError> {
    let store = store.clone();
    let manifest = manifest.clone();
    Ok(blocking(move || {
        let mut out = Vec::new();
        for file in manifest.files() {
            out.push(match store.status(file.hash, file.size)? {
                BlobStatus::Complete => None,
                _ => Some(store.partial(file.hash, file.size)?),
            });
        }
        Ok(out)
    })
    .await?)
}
