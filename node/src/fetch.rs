//! `mesh fetch`: resolve a model, move the missing pieces from peers, verify, materialize.
//!
//! 1. Resolve the name or id to a manifest: the local store first, then each peer. A manifest
//!    fetched by id must hash to that id.
//! 2. Check the target folder is writable and the disk has room for what is missing, before
//!    any byte moves.
//! 3. Hand the missing pieces to the [`swarm`] scheduler, which pulls them from every peer at
//!    once. Two fetches of one model on one node take turns per blob ([`Fetcher::lock_blobs`]),
//!    so the second finds the first one's work done instead of downloading it again.
//! 4. Checkpoint every blob (which completes it), then hard-link each file into the target
//!    under a temporary name and rename it into place: a file appears only when whole.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs, io,
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{atomic::AtomicU64, atomic::Ordering, Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use mesh_proto::{
    wire::{ErrorCode, Request, Response},
    Hash, Manifest, ModelRef, RelPath,
};
use serde::Serialize;
use tracing::info;

use crate::{
    catalog::{self, CatalogEntry},
    hf_cache::{self, HfCacheError},
    hub::{HubError, RepoRef},
    hub_fetch::{Origin, PlanEntry},
    metrics::Metrics,
    net::{read_frame, write_frame, ConnectError},
    peers::Peers,
    ranges,
    store::{blocking, BlobStatus, PartialBlob, Store, StoreError},
    swarm::{self, DownloadError, FileJob},
};

/// How long a fetch by name waits for discovered peers to offer the manifest.
const RESOLVE_WAIT: Duration = Duration::from_secs(8);

/// What to fetch and where to put it.
#[derive(Clone, Debug)]
pub struct FetchRequest {
    /// The model, by name or id.
    pub model: ModelRef,
    /// Peers to ask.
    pub peers: Vec<SocketAddr>,
    /// The folder the files go to.
    pub to: PathBuf,
    /// For HuggingFace repos: only files matching these globs (all when empty).
    pub include: Vec<String>,
    /// For HuggingFace repos: skip files matching these globs.
    pub exclude: Vec<String>,
    /// Only say what would move and from where.
    pub dry_run: bool,
    /// Also materialize into the HuggingFace cache layout.
    pub hf_cache: bool,
}

/// Live progress, one counter per file (bytes present, verified).
#[derive(Debug)]
pub struct FetchProgress {
    /// The files, in manifest order.
    pub files: Vec<FileProgress>,
}

/// One file's progress.
#[derive(Debug)]
pub struct FileProgress {
    /// Its path in the model.
    pub path: RelPath,
    /// Its size.
    pub size: u64,
    /// Verified bytes present.
    pub done: Arc<AtomicU64>,
}

/// The summary of a finished fetch (printed by `mesh fetch --json`).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct FetchReport {
    /// The model id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Where the files are.
    pub to: PathBuf,
    /// Files in the model.
    pub files: usize,
    /// Bytes in the model.
    pub total_bytes: u64,
    /// Bytes that were already present and verified before this run (complete or resumed).
    pub bytes_already_local: u64,
    /// Verified bytes received from peers in this run.
    pub bytes_from_peers: u64,
    /// Bytes downloaded from HuggingFace in this run.
    pub bytes_from_hf: u64,
    /// Peers that sent data.
    pub peers_used: Vec<SocketAddr>,
    /// Wall time of the run.
    pub seconds: f64,
    /// `org/name@commit` for models from HuggingFace.
    pub source: Option<String>,
    /// With `--dry-run`: each file, its size and where it would come from.
    pub plan: Option<Vec<PlanEntry>>,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// A peer could not be reached or refused us, and no other peer could help.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// No peer was found (none given, none discovered) and the model is not complete here.
    #[error("model {0} is not complete here and no peer was found (is a node running on the LAN? --peer IP:PORT adds one)")]
    NoPeers(ModelRef),
    /// Neither the store nor any peer knows the model.
    #[error("unknown model {0}: not in the local store and no peer has it")]
    UnknownModel(ModelRef),
    /// A peer sent a manifest that is invalid or does not match the requested id.
    #[error("peer {peer} sent a bad manifest: {why}")]
    BadManifest {
        /// The peer.
        peer: SocketAddr,
        /// What was wrong.
        why: String,
    },
    /// The target folder cannot be written.
    #[error("target folder {path} is not writable: {source}")]
    TargetNotWritable {
        /// The folder.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Not enough free disk space for what is missing.
    #[error("not enough free disk space in {path}: need {need} bytes, {available} available")]
    NoSpace {
        /// The folder checked.
        path: PathBuf,
        /// Bytes needed.
        need: u64,
        /// Bytes free.
        available: u64,
    },
    /// The download failed (no peer could provide a piece, or the store failed).
    #[error(transparent)]
    Download(#[from] DownloadError),
    /// HuggingFace refused, failed, or sent bytes that don't match its own hashes.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// No file of the repo passed the include/exclude globs.
    #[error("no file of {0} matches the --include/--exclude globs")]
    NothingSelected(String),
    /// A glob did not parse.
    #[error("bad glob: {0}")]
    BadGlob(String),
    /// `--hf-cache` but no cache folder could be found.
    #[error("no HuggingFace cache folder: set HF_HUB_CACHE or HF_HOME")]
    NoHfCache,
    /// Writing the HuggingFace cache layout failed.
    #[error(transparent)]
    HfCache(#[from] HfCacheError),
    /// A local store error.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the target files failed.
    #[error("{path}: {source}")]
    Materialize {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Runs fetches for one node: its store, its peer set, and the per-blob locks that make two
/// fetches of one model wait for each other instead of downloading twice.
#[derive(Clone, Debug)]
pub struct Fetcher {
    /// The store written to.
    pub store: Store,
    /// The node's peers.
    pub peers: Peers,
    /// Node counters.
    pub metrics: Arc<Metrics>,
    /// Whether mDNS runs (so waiting a moment for peers to show up makes sense).
    pub discovery: bool,
    /// Short names from the config file, over the built-in catalog.
    pub aliases: Arc<BTreeMap<String, CatalogEntry>>,
    /// One async lock per blob being fetched.
    locks: Arc<Mutex<HashMap<Hash, Weak<tokio::sync::Mutex<()>>>>>,
    /// This node's id when splitting HuggingFace work with peers.
    pub(crate) node_id: u64,
    /// HuggingFace files assembled here, kept so peers still assembling them can get pieces.
    pub(crate) assembled: Arc<Mutex<Vec<Arc<crate::hub_swarm::HubPartial>>>>,
}

impl Fetcher {
    /// A fetcher for a node's store and peers.
    pub fn new(
        store: Store,
        peers: Peers,
        metrics: Arc<Metrics>,
        discovery: bool,
        aliases: BTreeMap<String, CatalogEntry>,
    ) -> Self {
        Self {
            store,
            peers,
            metrics,
            discovery,
            aliases: Arc::new(aliases),
            locks: Arc::default(),
            node_id: rand::random::<u64>() | 1,
            assembled: Arc::default(),
        }
    }

    /// Fetches a model into `req.to`. `on_start` receives the progress counters once the
    /// model is resolved and checked.
    pub async fn fetch(
        &self,
        req: FetchRequest,
        on_start: impl FnOnce(&Manifest, Arc<FetchProgress>),
    ) -> Result<FetchReport, FetchError> {
        if let ModelRef::Name(name) = &req.model {
            let hub_source = match catalog::lookup(name, &self.aliases) {
                Some(entry) => {
                    let repo = RepoRef::parse(&format!("{}@{}", entry.repo, entry.revision));
                    repo.map(|r| (name.clone(), r, entry.file_map()))
                }
                None => RepoRef::parse(name).map(|r| (r.repo.clone(), r, Vec::new())),
            };
            if let Some((model_name, repo, files)) = hub_source {
                // `on_start` can only be called once: hand it over only if the Hub answers.
                let hub = crate::hub::Hub::from_env();
                match hub.repo_info(&repo).await {
                    Ok(_) => {
                        return self
                            .fetch_hub(&req, model_name, repo, files, on_start)
                            .await
                    }
                    Err(e @ (HubError::Offline | HubError::Http { .. })) => {
                        // Offline or unreachable: the mesh may still have it under this name.
                        tracing::warn!("{e}; looking for {model_name} in the mesh instead");
                        let req = FetchRequest {
                            model: ModelRef::Name(model_name),
                            ..req
                        };
                        return Box::pin(self.fetch_mesh(req, on_start)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        self.fetch_mesh(req, on_start).await
    }

    /// Fetches a model known by manifest (id or name) from the store and peers.
    async fn fetch_mesh(
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
        if req.dry_run {
            return self.plan_mesh(&manifest, &req, started).await;
        }
        check_target(&req.to)?;

        // Whoever holds a blob's lock is downloading it; a second fetch of the same model
        // waits here and then finds the blob complete.
        let _guards = self.lock_blobs(&manifest).await;
        let partials = open_partials(&store, &manifest).await?;
        let progress = Arc::new(FetchProgress {
            files: manifest
                .files()
                .iter()
                .zip(&partials)
                .map(|(file, partial)| FileProgress {
                    path: file.path.clone(),
                    size: file.size,
                    done: Arc::new(AtomicU64::new(match partial {
                        Some(p) => ranges::byte_len(&p.have(), file.size),
                        None => file.size,
                    })),
                })
                .collect(),
        });
        let already: u64 = progress
            .files
            .iter()
            .map(|f| f.done.load(Ordering::Relaxed))
            .sum();
        let missing = manifest.total_size() - already;
        check_space(&store, &req.to, missing, manifest.total_size())?;
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
                Err(DownloadError::NoSource { path, last })
                    if !connect_errors.is_empty()
                        && self.peers.connections().borrow().is_empty() =>
                {
                    let _ = (path, last);
                    return Err(connect_errors.remove(0).into());
                }
                Err(e) => return Err(e.into()),
            };
        }
        drop(partials);
        let to = req.to.clone();
        let manifest2 = manifest.clone();
        tokio::task::spawn_blocking(move || materialize(&store, &manifest2, &to))
            .await
            .expect("materialize task panicked")?;
        let report = FetchReport {
            id: manifest.id().to_string(),
            name: manifest.name().to_string(),
            to: req.to,
            files: manifest.files().len(),
            total_bytes: manifest.total_size(),
            bytes_already_local: already,
            bytes_from_peers: self.metrics.bytes_received.load(Ordering::Relaxed) - received_before,
            bytes_from_hf: 0,
            peers_used,
            seconds: started.elapsed().as_secs_f64(),
            source: match manifest.source() {
                mesh_proto::Source::HuggingFace { repo, commit } => {
                    Some(format!("{repo}@{commit}"))
                }
                _ => None,
            },
            plan: None,
        };
        if req.hf_cache {
            let cache = hf_cache::cache_dir().ok_or(FetchError::NoHfCache)?;
            let store = self.store.clone();
            let m = manifest.clone();
            tokio::task::spawn_blocking(move || hf_cache::export(&store, &m, "main", &cache))
                .await
                .expect("export task panicked")?;
        }
        info!(
            model = %report.name,
            bytes = report.bytes_from_peers,
            secs = report.seconds,
            "fetch complete"
        );
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
        started: Instant,
    ) -> Result<FetchReport, FetchError> {
        let mut plan = Vec::new();
        let mut local = 0;
        for file in manifest.files() {
            let store = self.store.clone();
            let (hash, size) = (file.hash, file.size);
            let here = blocking(move || store.status(hash, size)).await? == BlobStatus::Complete;
            if here {
                local += file.size;
            }
            plan.push(PlanEntry {
                path: file.path.to_string(),
                size: file.size,
                origin: if here { Origin::Local } else { Origin::Peer },
            });
        }
        Ok(FetchReport {
            id: manifest.id().to_string(),
            name: manifest.name().to_string(),
            to: req.to.clone(),
            files: manifest.files().len(),
            total_bytes: manifest.total_size(),
            bytes_already_local: local,
            bytes_from_peers: 0,
            bytes_from_hf: 0,
            peers_used: Vec::new(),
            seconds: started.elapsed().as_secs_f64(),
            source: None,
            plan: Some(plan),
        })
    }

    /// Asks connected peers for the manifest, waiting up to [`RESOLVE_WAIT`] for discovery to
    /// bring peers that have it.
    async fn resolve(
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

pub(crate) fn check_target(to: &Path) -> Result<(), FetchError> {
    let not_writable = |source| FetchError::TargetNotWritable {
        path: to.to_path_buf(),
        source,
    };
    fs::create_dir_all(to).map_err(not_writable)?;
    let probe = to.join(format!(".mesh-write-test-{}", std::process::id()));
    fs::write(&probe, b"").map_err(not_writable)?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

pub(crate) fn check_space(
    store: &Store,
    to: &Path,
    missing: u64,
    total: u64,
) -> Result<(), FetchError> {
    let outboards = missing / 256;
    let mut checks = vec![(store.home().to_path_buf(), missing + outboards)];
    let dev = |p: &Path| fs::metadata(p).map(|m| m.dev()).ok();
    if dev(store.home()) != dev(to) {
        // Hard links can't cross file systems: the target needs a full copy.
        checks.push((to.to_path_buf(), total));
    }
    for (path, need) in checks {
        let available = fs4::available_space(&path).map_err(|e| {
            FetchError::Store(StoreError::Io {
                path: path.clone(),
                source: e,
            })
        })?;
        if need > available {
            return Err(FetchError::NoSpace {
                path,
                need,
                available,
            });
        }
    }
    Ok(())
}

/// Links (or copies across file systems) each file into `to`, atomically.
pub(crate) fn materialize(store: &Store, manifest: &Manifest, to: &Path) -> Result<(), FetchError> {
    for file in manifest.files() {
        let dest = file.path.under(to);
        let err = |source| FetchError::Materialize {
            path: dest.clone(),
            source,
        };
        let parent = dest.parent().expect("a path under a folder has a parent");
        fs::create_dir_all(parent).map_err(err)?;
        let tmp = parent.join(format!(
            ".{}.mesh-tmp",
            dest.file_name()
                .expect("a file path has a name")
                .to_string_lossy()
        ));
        let _ = fs::remove_file(&tmp);
        if file.size == 0 {
            fs::File::create(&tmp).map_err(err)?;
        } else {
            let src = store.data_path(file.hash)?;
            let same = |a: &Path, b: &Path| match (fs::metadata(a), fs::metadata(b)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if same(&src, &dest) {
                continue;
            }
            if fs::hard_link(&src, &tmp).is_err() {
                fs::copy(&src, &tmp).map_err(err)?;
                fs::File::open(&tmp)
                    .and_then(|f| f.sync_all())
                    .map_err(err)?;
            }
        }
        fs::rename(&tmp, &dest).map_err(err)?;
    }
    Ok(())
}

impl FetchError {
    /// The process exit code for this error (README.md documents them).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::UnknownModel(_) => 3,
            Self::Connect(_) | Self::NoPeers(_) | Self::BadManifest { .. } => 4,
            Self::Download(DownloadError::NoSource { last, .. })
                if last.contains("verification") || last.contains("corrupt") =>
            {
                5
            }
            Self::Download(DownloadError::NoSource { .. }) => 4,
            Self::TargetNotWritable { .. } | Self::NoSpace { .. } => 6,
            Self::Hub(HubError::NotFound(_)) => 3,
            Self::Hub(HubError::Mismatch { .. }) => 5,
            Self::Hub(_) => 4,
            Self::NothingSelected(_) | Self::BadGlob(_) => 2,
            _ => 1,
        }
    }

    /// A one-line hint for the user, where there is a useful one.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Self::Connect(ConnectError::WrongKey(_)) => Some(
                "every node of one mesh needs the same MESH_KEY (or --mesh-key, or mesh_key in config.toml)",
            ),
            Self::Connect(ConnectError::Unreachable(_)) => {
                Some("is `mesh node` running there, and is its UDP port open? (default 7341)")
            }
            Self::UnknownModel(_) => Some("`mesh ls` on a peer lists the models it has"),
            Self::NoSpace { .. } => Some("free some space or set MESH_HOME to a bigger disk"),
            Self::Hub(HubError::Unauthorized { .. }) => Some(
                "accept the model's terms on huggingface.co, then set HF_TOKEN (or run `huggingface-cli login`)",
            ),
            _ => None,
        }
    }
}
