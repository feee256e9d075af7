//! The node a command talks to: the one running on the store, through its local API, or —
//! when none runs — the store opened by the command itself, with a node embedded for the
//! command's duration when it needs peers. The CLI parses, calls a [`LocalNode`] and prints.
//!
//! An embedded node serves peers while it fetches (it is a full node, on the default port if
//! that is free and on any port if not) but has no local API.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    api::{fetch_lines, AddRequest, ClientError, FetchBody, FetchLine, ModelInfo, NodeClient},
    discovery::PeerInfo,
    fetch::{FetchReport, FetchRequest},
    net::BindError,
    node::{Node, NodeConfig, NodeError},
    store::{blocking, AddProgress, Store, StoreError},
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
}

impl LocalError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Fetch { code, .. } => *code,
            _ => 1,
        }
    }

    /// A one-line hint, where there is one.
    pub fn hint(&self) -> Option<&str> {
        match self {
            Self::Fetch { hint, .. } => hint.as_deref(),
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
                Ok(ModelInfo {
                    id: manifest.id().to_string(),
                    name: manifest.name().to_string(),
                    size: manifest.total_size(),
                    complete: true,
                    files: Some(manifest.files().len()),
                })
            }
        }
    }

    /// The models in the store.
    pub async fn models(&self) -> Result<Vec<ModelInfo>, LocalError> {
        match self {
            Self::Running(client) => Ok(client.models().await?),
            Self::Embedded(e) => {
                let store = e.store.clone();
                let models = blocking(move || store.models()).await?;
                Ok(models.into_iter().map(ModelInfo::from).collect())
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
