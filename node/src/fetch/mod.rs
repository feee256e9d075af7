//! `mesh fetch`: resolve a model, move what is missing from its sources, verify, materialize.
//!
//! 1. Resolve ([`resolve`]): a catalog name or `org/name[@rev]` is a HuggingFace repo (the
//!    Hub answers with its files and their published hashes); anything else names a mesh
//!    model, looked up in the local store, then asked of each peer. A manifest fetched by id
//!    must hash to that id.
//! 2. Check every [`Target`] is writable and the disk has room for what is missing, before
//!    any byte moves.
//! 3. Move the bytes. A mesh model comes from peers through the [`swarm`] ([`mesh`]). A
//!    published model's files each come from the first [`sources`] entry that has them: the
//!    local store, LAN peers holding the same commit, then the origin (HuggingFace) with the
//!    fleet splitting its pieces ([`external`]). Two fetches of one model on one node take
//!    turns per blob, so the second finds the first one's work done.
//! 4. Checkpoint every blob, then materialize into each target: a file appears at its final
//!    path only when whole and verified.
//!
//! Before any source, files already at their final path are adopted in place ([`adopt`]).
//! `ollama:` names take their own path ([`ollama`]): the mesh, else the Ollama registry.
//! A [`bundle`] is several fetches run at once in one node, plus links.
//!
//! A new origin (a mirror, a registry) is one more source in [`sources`]; a new place for
//! files (an app's folder layout) is one more [`Layout`].

mod adopt;
pub mod bundle;
pub mod catalog;
mod external;
pub mod file;
mod mesh;
mod ollama;
pub mod plan;
mod resolve;
mod room;
pub mod running;
mod sources;
pub mod target;

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc, Mutex, Weak},
};

use mesh_proto::{Hash, Manifest, ModelRef, RelPath};
use serde::Serialize;

use self::catalog::CatalogEntry;
pub use self::{
    file::{FileState, FileTally},
    plan::{Origin, PlanEntry},
    resolve::ask_manifest,
    target::{default_folder, targets_for, Layout, Target},
};
use crate::{
    discovery::Peers,
    hf::{
        cache_out::HfCacheError,
        meta::{HubMeta, MetaError, Revision},
        Auth, Hub, HubError, RepoRef,
    },
    limits::Limits,
    metrics::Metrics,
    net::ConnectError,
    ollama::{OllamaError, OllamaName},
    rooted::RootError,
    store::{pieces::PieceFile, Store, StoreError},
    swarm::DownloadError,
};

/// What to fetch and where to put it.
#[derive(Clone, Debug)]
pub struct FetchRequest {
    /// The model, by name or id.
    pub model: ModelRef,
    /// Peers to ask.
    pub peers: Vec<SocketAddr>,
    /// Where the files go (at least one).
    pub targets: Vec<Target>,
    /// For HuggingFace repos: only files matching these globs (all when empty).
    pub include: Vec<String>,
    /// For HuggingFace repos: skip files matching these globs.
    pub exclude: Vec<String>,
    /// Only say what would move and from where.
    pub dry_run: bool,
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
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
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
    /// Files (paths in the model) already at their final path with the right bytes: adopted
    /// in place (hashed, served from there), nothing fetched.
    #[serde(default)]
    pub in_place: Vec<String>,
    /// Final paths where a different file was replaced.
    #[serde(default)]
    pub replaced: Vec<PathBuf>,
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
    /// Writing the HuggingFace cache layout failed.
    #[error(transparent)]
    HfCache(#[from] HfCacheError),
    /// A local store error.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A path under a target leads outside it (a symlink), or can't be written.
    #[error(transparent)]
    Root(#[from] RootError),
    /// An app layout needs the kind of model and nothing says it.
    #[error("--layout {layout} needs to know what kind of model {model} is: use a catalog name, or say --kind KIND")]
    NoKind {
        /// The model.
        model: String,
        /// The layout.
        layout: Layout,
    },
    /// A bundle entry's `to` names one file, but the model has several.
    #[error("`to = {to:?}` names one file but the model has {files}: end it with / for a folder")]
    BadTo {
        /// The `to`.
        to: String,
        /// The model's file count.
        files: usize,
    },
    /// An Ollama name, registry or store failed.
    #[error(transparent)]
    Ollama(#[from] OllamaError),
    /// A bundle link points at nothing.
    #[error("link {path} -> {target} does not resolve: fix the bundle's link target")]
    DanglingLink {
        /// The link.
        path: PathBuf,
        /// Its target.
        target: PathBuf,
    },
    /// Writing the target files failed.
    #[error("{path}: {source}")]
    Materialize {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A download this fetch shared with another request failed.
    #[error(transparent)]
    Shared(Arc<Self>),
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
    node_id: u64,
    /// HuggingFace files assembled here, kept so peers still assembling them can get pieces.
    assembled: Arc<Mutex<Vec<Arc<PieceFile>>>>,
    /// The Hub, with its metadata kept in the store.
    pub meta: HubMeta,
    /// Published files being fetched, shared by every request for them.
    downloads: Arc<file::Downloads>,
    /// Serialises updates of the `org/name@commit` manifests.
    commit_manifests: Arc<tokio::sync::Mutex<()>>,
    /// Rate limits and HF hours ([`Fetcher::with_limits`]).
    pub limits: Limits,
    /// `max_store`: least recently used unpinned models are evicted to stay under it.
    pub max_store: Option<u64>,
    /// The fetches running now.
    pub transfers: running::Transfers,
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
            meta: HubMeta::new(Hub::from_env(), store.clone()),
            store,
            peers,
            metrics,
            discovery,
            aliases: Arc::new(aliases),
            locks: Arc::default(),
            node_id: rand::random::<u64>() | 1,
            assembled: Arc::default(),
            downloads: Arc::default(),
            commit_manifests: Arc::default(),
            limits: Limits::default(),
            max_store: None,
            transfers: running::Transfers::default(),
        }
    }

    /// This fetcher, held to `limits` and to `max_store` bytes of store.
    pub fn with_limits(mut self, limits: Limits, max_store: Option<u64>) -> Self {
        let hub = Hub::from_env().with_limits(limits.clone());
        self.meta = HubMeta::new(hub, self.store.clone());
        self.limits = limits;
        self.max_store = max_store;
        self
    }

    /// Fetches a model into `req.targets`. `on_start` receives the progress counters once the
    /// model is resolved and checked. While it runs, the fetch is listed in
    /// [`Fetcher::transfers`]; when it succeeds the model counts as used now.
    pub async fn fetch(
        &self,
        req: FetchRequest,
        on_start: impl FnOnce(&Manifest, Arc<FetchProgress>),
    ) -> Result<FetchReport, FetchError> {
        let running = self
            .transfers
            .start(req.model.to_string(), &self.peers, &self.limits);
        let transfer = running.transfer.clone();
        let on_start = move |m: &Manifest, p: Arc<FetchProgress>| {
            transfer.set_progress(m.name(), p.clone());
            on_start(m, p);
        };
        let model = req.model.to_string();
        let report = match self.fetch_any(req, on_start).await {
            Ok(report) => report,
            Err(e) => {
                tracing::info!(model, code = e.exit_code(), "fetch failed: {e}");
                return Err(e);
            }
        };
        if report.plan.is_some() {
            return Ok(report);
        }
        Metrics::add(&self.metrics.bytes_local, report.bytes_already_local);
        if let Ok(id) = report.id.parse::<Hash>() {
            let store = self.store.clone();
            crate::store::blocking(move || store.touch(id)).await?;
        }
        let sources = running
            .transfer
            .sources(&self.peers, self.limits.hf_bytes());
        for (source, bytes) in sources {
            tracing::info!(peer = %source, model = %report.name, bytes, "received");
        }
        tracing::info!(
            model = %report.name,
            bytes = report.bytes_from_peers + report.bytes_from_hf,
            bytes_from_peers = report.bytes_from_peers,
            bytes_from_hf = report.bytes_from_hf,
            bytes_local = report.bytes_already_local,
            seconds = report.seconds,
            peers = report.peers_used.len(),
            "fetch complete"
        );
        Ok(report)
    }

    async fn fetch_any(
        &self,
        req: FetchRequest,
        on_start: impl FnOnce(&Manifest, Arc<FetchProgress>),
    ) -> Result<FetchReport, FetchError> {
        self.check_kinds(&req)?;
        if let ModelRef::Name(name) = &req.model {
            if name.starts_with(crate::ollama::PREFIX) {
                let parsed =
                    OllamaName::parse(name).ok_or_else(|| OllamaError::BadName(name.clone()))?;
                return self.fetch_ollama(req, parsed, on_start).await;
            }
            if let Some(mut published) = self.published(name) {
                // `on_start` can only be called once: hand it over only if the Hub answers (or
                // this node kept what it said).
                let mut answer = self.revision_of(&published.repo).await;
                if let Err(MetaError::Hub(HubError::Moved { repo, to })) = &answer {
                    // As huggingface_hub does: a moved repo is fetched from its new id.
                    tracing::warn!("HuggingFace moved {repo} to {to}; fetching {to}");
                    if published.name == *repo {
                        published.name = to.clone();
                    }
                    published.repo.repo = to.clone();
                    answer = self.revision_of(&published.repo).await;
                }
                let (repo, rev) = (&published.repo.repo, &published.repo.revision);
                return match answer {
                    Ok(revision) => {
                        self.fetch_external(&req, published, revision.info, on_start)
                            .await
                    }
                    Err(MetaError::Hub(e)) if e.is_unreachable() => {
                        // Offline or unreachable: the mesh may still have it under this name.
                        tracing::warn!("{e}; looking for {} in the mesh instead", published.name);
                        let req = FetchRequest {
                            model: ModelRef::Name(published.name),
                            ..req
                        };
                        self.fetch_mesh(req, on_start).await
                    }
                    Err(MetaError::Refused(answer)) => {
                        Err(self.meta.hub().refusal(&answer, repo, rev).into())
                    }
                    Err(MetaError::Hub(e)) => Err(e.into()),
                    Err(MetaError::Store(e)) => Err(e.into()),
                };
            }
        }
        self.fetch_mesh(req, on_start).await
    }
}

impl Fetcher {
    /// The Hub's revision info for `repo`, with the node's own token.
    async fn revision_of(&self, repo: &RepoRef) -> Result<Revision, MetaError> {
        self.meta
            .revision(&repo.repo, &repo.revision, Auth::Node)
            .await
    }

    /// App layouts need the kind of model: from the request, or the catalog (checked before
    /// any byte moves).
    fn check_kinds(&self, req: &FetchRequest) -> Result<(), FetchError> {
        let name = req.model.to_string();
        let catalog = catalog::lookup(&name, &self.aliases).and_then(|e| e.kind);
        for t in &req.targets {
            let app = matches!(t.layout, Layout::ComfyUi | Layout::SwarmUi);
            if app && t.kind.is_none() && catalog.is_none() {
                return Err(FetchError::NoKind {
                    model: name,
                    layout: t.layout,
                });
            }
        }
        Ok(())
    }
}

impl FetchProgress {
    /// Verified bytes present, over all files.
    pub fn done(&self) -> u64 {
        use std::sync::atomic::Ordering;
        self.files
            .iter()
            .map(|f| f.done.load(Ordering::Relaxed))
            .sum()
    }

    /// Bytes in all files.
    pub fn total(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Files complete.
    pub fn files_done(&self) -> usize {
        use std::sync::atomic::Ordering;
        self.files
            .iter()
            .filter(|f| f.done.load(Ordering::Relaxed) >= f.size)
            .count()
    }
}

impl FetchReport {
    /// A report for `manifest` fetched for `req`, with no bytes counted yet.
    fn new(manifest: &Manifest, req: &FetchRequest, started: std::time::Instant) -> Self {
        Self {
            id: manifest.id().to_string(),
            name: manifest.name().to_string(),
            to: req
                .targets
                .first()
                .map(|t| t.root.clone())
                .unwrap_or_default(),
            files: manifest.files().len(),
            total_bytes: manifest.total_size(),
            bytes_already_local: 0,
            bytes_from_peers: 0,
            bytes_from_hf: 0,
            peers_used: Vec::new(),
            seconds: started.elapsed().as_secs_f64(),
            source: match manifest.source() {
                mesh_proto::Source::HuggingFace { repo, commit } => {
                    Some(format!("{repo}@{commit}"))
                }
                _ => None,
            },
            plan: None,
            in_place: Vec::new(),
            replaced: Vec::new(),
        }
    }
}

impl Fetcher {
    /// Puts a complete model into every target; returns the paths where another file was
    /// replaced.
    async fn materialize(
        &self,
        manifest: &Manifest,
        targets: &[Target],
        revision: &str,
    ) -> Result<Vec<PathBuf>, FetchError> {
        let (store, manifest) = (self.store.clone(), manifest.clone());
        let (targets, revision) = (targets.to_vec(), revision.to_string());
        let kind = catalog::lookup(manifest.name(), &self.aliases).and_then(|e| e.kind);
        tokio::task::spawn_blocking(move || {
            let mut replaced = Vec::new();
            for t in &targets {
                replaced.extend(t.materialize(&store, &manifest, &revision, kind)?);
            }
            Ok(replaced)
        })
        .await
        .expect("materialize task panicked")
    }
}

impl FetchError {
    /// The process exit code for this error (README.md documents them).
    pub fn exit_code(&self) -> u8 {
        match self {
            e if crate::store::disk_full(e) => 6,
            Self::Store(e) => e.exit_code(),
            Self::UnknownModel(_) => 3,
            Self::Connect(_) | Self::NoPeers(_) | Self::BadManifest { .. } => 4,
            Self::Download(e) if e.is_bad_data() => 5,
            Self::Download(DownloadError::NoSource { .. }) => 4,
            Self::TargetNotWritable { .. } | Self::NoSpace { .. } | Self::Root(_) => 6,
            Self::HfCache(HfCacheError::Root(_)) => 6,
            Self::NoKind { .. } | Self::BadTo { .. } | Self::DanglingLink { .. } => 2,
            Self::Ollama(e) => match e {
                OllamaError::BadName(_) => 2,
                OllamaError::NotFound { .. } => 3,
                OllamaError::Mismatch { .. } => 5,
                OllamaError::Unauthorized { .. } | OllamaError::Http { .. } => 4,
                OllamaError::Store(_) => 1,
                _ => 6,
            },
            Self::Hub(HubError::NotFound(_) | HubError::Moved { .. }) => 3,
            Self::Hub(HubError::Mismatch { .. }) => 5,
            Self::Hub(_) => 4,
            Self::Shared(e) => e.exit_code(),
            Self::NothingSelected(_) | Self::BadGlob(_) => 2,
            _ => 1,
        }
    }

    /// A one-line hint for the user, where there is a useful one.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Self::Shared(e) => e.hint(),
            e if crate::store::disk_full(e) => Some(crate::store::DISK_FULL_HINT),
            Self::Store(e) => e.hint(),
            Self::Connect(ConnectError::WrongKey(_)) => Some(
                "every node of one mesh needs the same MESH_KEY (or --mesh-key, or mesh_key in config.toml)",
            ),
            Self::Connect(ConnectError::Unreachable(_)) => {
                Some("is `mesh node` running there, and is its UDP port open? (default 7341)")
            }
            Self::UnknownModel(_) => Some("`mesh ls` on a peer lists the models it has"),
            Self::NoSpace { .. } => Some("free some space or set MESH_HOME to a bigger disk"),
            Self::Ollama(OllamaError::NotWritable { .. }) => Some(
                "the Ollama store usually belongs to the `ollama` user: run `sudo -u ollama mesh fetch ...` (or as root), or set OLLAMA_MODELS (or --to) to a folder you own",
            ),
            Self::Ollama(OllamaError::NotFound { .. }) => {
                Some("check the name and tag (ollama.com/library lists them); no peer has it either")
            }
            Self::Root(RootError::Escapes { .. })
            | Self::HfCache(HfCacheError::Root(RootError::Escapes { .. })) => Some(
                "mesh never writes through a symlink that leaves the target folder: remove the link or fetch into its target directly",
            ),
            Self::Hub(HubError::Unauthorized { .. }) => Some(
                "accept the model's terms on huggingface.co, then set HF_TOKEN (or run `huggingface-cli login`)",
            ),
            _ => None,
        }
    }
}
