//! The node a command talks to: the one running on the store, through its local API, or —
//! when none runs — the store opened by the command itself, with a node embedded for the
//! command's duration when it needs peers. The CLI parses, calls a [`LocalNode`] and prints.
//!
//! An embedded node serves peers while it fetches (it is a full node, on the default port if
//! that is free and on any port if not) but has no local API.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    api::{
        fetch_lines, lifecycle::model_info, AddRequest, ClientError, FetchBody, FetchLine,
        ModelInfo, NodeClient,
    },
    discovery::PeerInfo,
    fetch::{
        bundle::{Bundle, BundleError, BundleOpts, BundleReport, EntryReport},
        FetchReport, FetchRequest,
    },
    net::BindError,
    node::{Node, NodeConfig, NodeError},
    store::{
        blocking,
        lifecycle::{GcReport, Removed},
        verify::VerifyReport,
        AddProgress, Store, StoreError,
    },
};

/// How often an embedded fetch reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    /// A fetch failed; the node chose the exit code and hint.
    #[error("{message}")]
    Fetch {
        /// The one-line error.
        message: String,
        /// The exit code (README.md documents them).
        code: u8,
        /// A hint, if any.
        hint: Option<String>,
    },
    /// The running node's API failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The embedded node could not start.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store is held by a process that publishes no API.
    #[error("the store at {0} is in use by another mesh process without a local API")]
    Busy(PathBuf),
    /// The command needs a running node and none runs.
    #[error("no node is running on this store (start one with `mesh node`)")]
    NoNode,
    /// The node ended a fetch stream without a result.
    #[error("the node ended the fetch stream without a result")]
    NoResult,
    /// The command line asks for something that can't be done (exit 2).
    #[error("{message}")]
    Usage {
        /// What is wrong.
        message: String,
    },
}

impl LocalError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Fetch { code, .. } | Self::Client(ClientError::Failed { code, .. }) => *code,
            Self::Usage { .. } => 2,
            Self::Store(e) => e.exit_code(),
            _ => 1,
        }
    }

    /// A one-line hint, where there is one.
    pub fn hint(&self) -> Option<&str> {
        match self {
            Self::Fetch { hint, .. } | Self::Client(ClientError::Failed { hint, .. }) => {
                hint.as_deref()
            }
            Self::Store(e) => e.hint(),
            _ => None,
        }
    }
}

/// The running node (through its API), or this process's own store and embedded node.
#[derive(Debug)]
pub enum LocalNode {
    /// A node runs on the store: everything goes through its API.
    Running(NodeClient),
    /// No node runs: this process opened the store, and starts a node when it needs peers.
    Embedded(Box<Embedded>),
}

/// The store opened by this process, and the node started in it, if any.
#[derive(Debug)]
pub struct Embedded {
    config: NodeConfig,
    store: Store,
    node: Option<Node>,
}

impl LocalNode {
    /// The node running on `config.home` if one answers; otherwise opens the store here.
    pub async fn open(config: NodeConfig) -> Result<Self, LocalError> {
        if let Some(client) = NodeClient::discover(&config.home).await {
            return Ok(Self::Running(client));
        }
        let home = config.home.clone();
        match blocking(move || Store::open(&home)).await {
            Ok(store) => Ok(Self::Embedded(Box::new(Embedded {
                config,
                store,
                node: None,
            }))),
            Err(StoreError::Locked(path)) => {
                // A node may have come up meanwhile.
                match NodeClient::discover(&config.home).await {
                    Some(client) => Ok(Self::Running(client)),
                    None => Err(LocalError::Busy(path)),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Hashes a file or folder and shares it as a model, in place. `progress` sees each file
    /// when the store is here (a running node reports only the result).
    pub async fn add(
        &self,
        path: PathBuf,
        name: Option<String>,
        progress: impl FnMut(AddProgress) + Send + 'static,
    ) -> Result<ModelInfo, LocalError> {
        match self {
            Self::Running(client) => Ok(client.add(&AddRequest { path, name }).await?),
            Self::Embedded(e) => {
                let store = e.store.clone();
                let mut progress = progress;
                let manifest = blocking(move || store.add_path(&path, name, &mut progress)).await?;
                Ok(ModelInfo::added(&manifest))
            }
        }
    }

    /// The models in the store.
    pub async fn models(&self) -> Result<Vec<ModelInfo>, LocalError> {
        match self {
            Self::Running(client) => Ok(client.models().await?),
            Self::Embedded(e) => {
                let store = e.store.clone();
                let entries = blocking(move || store.model_entries()).await?;
                let mut models: Vec<ModelInfo> = entries.iter().map(model_info).collect();
                models.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
                Ok(models)
            }
        }
    }

    /// Forgets models (by name, id or id prefix); their blobs go unless another model uses
    /// them. Nothing is removed if any name is unknown.
    pub async fn rm(&self, models: Vec<String>) -> Result<Vec<Removed>, LocalError> {
        match self {
            Self::Running(client) => Ok(client.rm(&models).await?),
            Self::Embedded(e) => {
                let store = e.store.clone();
                Ok(blocking(move || store.remove_models(&models)).await?)
            }
        }
    }

    /// Collects unreferenced blobs, stale partials, leftovers and old HF records.
    pub async fn gc(&self) -> Result<GcReport, LocalError> {
        match self {
            Self::Running(client) => Ok(client.gc().await?),
            Self::Embedded(e) => {
                let store = e.store.clone();
                Ok(blocking(move || store.gc(false)).await?)
            }
        }
    }

    /// Re-hashes the blobs of `models` (all when empty); drops the ones that fail.
    pub async fn verify(&self, models: Vec<String>) -> Result<VerifyReport, LocalError> {
        match self {
            Self::Running(client) => Ok(client.verify(&models).await?),
            Self::Embedded(e) => {
                let store = e.store.clone();
                Ok(blocking(move || store.verify(&models)).await?)
            }
        }
    }

    /// Pins or unpins a model.
    pub async fn pin(&self, model: String, pin: bool) -> Result<ModelInfo, LocalError> {
        match self {
            Self::Running(client) => Ok(client.pin(&model, pin).await?),
            Self::Embedded(e) => {
                let store = e.store.clone();
                let entry = blocking(move || store.set_pinned(&model, pin)).await?;
                Ok(model_info(&entry))
            }
        }
    }

    /// Runs a fetch, calling `on_line` with its start and progress.
    pub async fn fetch(
        &mut self,
        req: FetchRequest,
        mut on_line: impl FnMut(FetchLine),
    ) -> Result<FetchReport, LocalError> {
        let last = match self {
            Self::Running(client) => {
                let mut last = None;
                client
                    .fetch(&FetchBody::new(&req), |line| match line {
                        FetchLine::Done { .. } | FetchLine::Error { .. } => last = Some(line),
                        line => on_line(line),
                    })
                    .await?;
                last.ok_or(LocalError::NoResult)?
            }
            Self::Embedded(e) => {
                let node = e.node().await?;
                fetch_lines(node.fetcher(), req, PROGRESS_EVERY, on_line).await
            }
        };
        outcome(last)
    }

    /// Runs several fetches at once in one node (so they share its peers and swarm), calling
    /// `on_line` with each one's index and lines; returns each result in order.
    pub async fn fetch_all(
        &mut self,
        reqs: Vec<FetchRequest>,
        mut on_line: impl FnMut(usize, FetchLine),
    ) -> Vec<Result<FetchReport, LocalError>> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = tokio::task::JoinSet::new();
        let count = reqs.len();
        for (i, req) in reqs.into_iter().enumerate() {
            let tx = tx.clone();
            match self {
                Self::Running(client) => {
                    let client = client.clone();
                    tasks.spawn(async move {
                        let mut last = None;
                        let streamed = client
                            .fetch(&FetchBody::new(&req), |line| match line {
                                FetchLine::Done { .. } | FetchLine::Error { .. } => {
                                    last = Some(line)
                                }
                                line => drop(tx.send((i, line))),
                            })
                            .await;
                        let result = match (streamed, last) {
                            (Err(e), _) => Err(e.into()),
                            (Ok(()), Some(last)) => outcome(last),
                            (Ok(()), None) => Err(LocalError::NoResult),
                        };
                        (i, result)
                    });
                }
                Self::Embedded(e) => {
                    let fetcher = match e.node().await {
                        Ok(node) => node.fetcher().clone(),
                        Err(e) => {
                            let message = e.to_string();
                            tasks.spawn(async move { (i, Err(LocalError::Usage { message })) });
                            continue;
                        }
                    };
                    tasks.spawn(async move {
                        let send = move |line| drop(tx.send((i, line)));
                        (
                            i,
                            outcome(fetch_lines(&fetcher, req, PROGRESS_EVERY, send).await),
                        )
                    });
                }
            }
        }
        drop(tx);
        let mut results: Vec<Option<Result<FetchReport, LocalError>>> =
            (0..count).map(|_| None).collect();
        loop {
            tokio::select! {
                Some((i, line)) = rx.recv() => on_line(i, line),
                joined = tasks.join_next() => match joined {
                    Some(Ok((i, result))) => results[i] = Some(result),
                    Some(Err(e)) => tracing::warn!("a fetch task failed: {e}"),
                    None => break,
                },
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(LocalError::NoResult)))
            .collect()
    }

    /// `mesh fetch BUNDLE`: every entry at once into `root` (entries that could fetch the
    /// same file one after the other: [`Bundle::waves`]), then the links (for a dry run: each
    /// file's size, source and final path, and which links are there).
    pub async fn fetch_bundle(
        &mut self,
        name: &str,
        bundle: &Bundle,
        root: PathBuf,
        opts: &BundleOpts,
        mut on_line: impl FnMut(usize, FetchLine),
    ) -> Result<BundleReport, LocalError> {
        let (peers, dry_run) = (&opts.peers, opts.dry_run);
        let usage = |e: BundleError| LocalError::Usage {
            message: e.to_string(),
        };
        let reqs = bundle
            .requests(name, &root, peers, dry_run)
            .map_err(usage)?;
        let targets: Vec<_> = reqs.iter().map(|r| r.targets[0].clone()).collect();
        let mut reqs: Vec<Option<FetchRequest>> = reqs.into_iter().map(Some).collect();
        let mut results: Vec<Option<Result<FetchReport, LocalError>>> =
            reqs.iter().map(|_| None).collect();
        for wave in bundle.waves(&opts.aliases) {
            let batch = wave
                .iter()
                .map(|&i| reqs[i].take().expect("each entry is in one wave"))
                .collect();
            let done = self
                .fetch_all(batch, |k, line| on_line(wave[k], line))
                .await;
            for (&i, result) in wave.iter().zip(done) {
                results[i] = Some(result);
            }
        }
        let entries: Vec<EntryReport> = bundle
            .files
            .iter()
            .zip(&targets)
            .zip(results)
            .map(|((file, target), result)| {
                let result = result
                    .unwrap_or(Err(LocalError::NoResult))
                    .map_err(|e| (e.to_string(), e.exit_code()));
                EntryReport::new(&file.model, target, result)
            })
            .collect();
        let links = if entries.iter().all(|e| e.error.is_none()) {
            let (bundle, at) = (bundle.clone(), root.clone());
            tokio::task::spawn_blocking(move || bundle.make_links(&at, dry_run))
                .await
                .expect("link task panicked")
        } else {
            Ok(Vec::new())
        };
        Ok(BundleReport::new(name, &root, entries, links))
    }

    /// The peers this node sees. Without a running node, an embedded one listens for
    /// `listen_for` first, as a node would.
    pub async fn peers(&mut self, listen_for: Duration) -> Result<Vec<PeerInfo>, LocalError> {
        match self {
            Self::Running(client) => Ok(client.peers().await?),
            Self::Embedded(e) => {
                let node = e.node().await?;
                tokio::time::sleep(listen_for).await;
                Ok(node.fetcher().peers.table().await)
            }
        }
    }

    /// The running node's version, address and counters.
    pub async fn status(&self) -> Result<serde_json::Value, LocalError> {
        match self {
            Self::Running(client) => Ok(client.status().await?),
            Self::Embedded(_) => Err(LocalError::NoNode),
        }
    }

    /// Stops the embedded node, if one was started.
    pub async fn shutdown(self) {
        if let Self::Embedded(embedded) = self {
            if let Some(node) = embedded.node {
                node.shutdown().await;
            }
        }
    }
}

/// A fetch's last line as its result.
fn outcome(last: FetchLine) -> Result<FetchReport, LocalError> {
    match last {
        FetchLine::Done { report } => Ok(report),
        FetchLine::Error {
            message,
            code,
            hint,
        } => Err(LocalError::Fetch {
            message,
            code,
            hint,
        }),
        _ => Err(LocalError::NoResult),
    }
}

impl Embedded {
    /// The embedded node, started on first use: on the configured port if it is free, on any
    /// port if not.
    async fn node(&mut self) -> Result<&Node, LocalError> {
        if self.node.is_none() {
            let node = match Node::start(self.store.clone(), self.config.clone()).await {
                Err(NodeError::Bind(BindError::Bind { .. })) => {
                    let config = NodeConfig {
                        listen: SocketAddr::from(([0, 0, 0, 0], 0)),
                        ..self.config.clone()
                    };
                    Node::start(self.store.clone(), config).await?
                }
                other => other?,
            };
            self.node = Some(node);
        }
        Ok(self.node.as_ref().expect("started above"))
    }
}
