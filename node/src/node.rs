//! [`Node`]: wires the store, the QUIC endpoint, discovery, the provider and the local API
//! together, and shuts them down as one.
//!
//! A running node writes `MESH_HOME/node.json` ([`NodeInfo`]: its addresses and an API token
//! readable only by the owner), so `mesh add` and `mesh ls` on the same store go through the
//! node instead of opening the database it holds.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::{
    api::{self, NodeInfo},
    discovery::{mdns, Discovery, Peers},
    fetch::{catalog::CatalogEntry, Fetcher},
    hf::cache_in,
    hf::cache_out,
    limits::{LimitConfig, Limits},
    metrics::Metrics,
    net::{BindError, ConnectError, Net},
    store::{self, Store, StoreError},
    transfer::provider::Provider,
};

/// The default QUIC (UDP) port peers dial.
pub const DEFAULT_PORT: u16 = 7341;
/// The default local API port (127.0.0.1 only).
pub const DEFAULT_API_PORT: u16 = 7342;
/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 256;

/// How to run a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The store folder.
    pub home: PathBuf,
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Local HTTP API address; `None` disables it.
    pub api: Option<SocketAddr>,
    /// The mesh key; `None` is open mode.
    pub mesh_key: Option<String>,
    /// Upload limit in bytes per second.
    pub max_upload: Option<u64>,
    /// Find peers with mDNS.
    pub mdns: bool,
    /// Peers to keep connected besides those mDNS finds (the config file's `peers`).
    pub bootstrap: Vec<SocketAddr>,
    /// Model aliases from the config file.
    pub aliases: std::collections::BTreeMap<String, CatalogEntry>,
    /// Import models found in the HuggingFace cache at start.
    pub hf_cache_scan: bool,
    /// Import (serve in place) the models of the local Ollama store at start.
    pub ollama_scan: bool,
    /// Download rate limits and HF hours (`max_upload` above is reported there too).
    pub limits: LimitConfig,
    /// `max_store`: evict least recently used unpinned models to stay under this many bytes.
    pub max_store: Option<u64>,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The store failed to open.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The QUIC endpoint failed.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The API could not listen.
    #[error("cannot serve the local API on {addr}: {source}")]
    Api {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// Writing `node.json` failed.
    #[error("cannot write {path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    store: Store,
    net: Net,
    metrics: Arc<Metrics>,
    /// Runs fetches through this node's peers.
    fetcher: Fetcher,
    info: NodeInfo,
    /// Cancelled on shutdown; every task watches it.
    cancel: CancellationToken,
    /// The accept loop and the API server.
    tasks: JoinSet<()>,
}

impl Node {
    /// Opens the store, binds QUIC and the API, and starts serving.
    pub async fn spawn(config: NodeConfig) -> Result<Self, NodeError> {
        let store = {
            let home = config.home.clone();
            store::blocking(move || Store::open(&home)).await?
        };
        Self::start(store, config).await
    }

    /// Binds QUIC and the API on an open store, and starts serving.
    pub async fn start(store: Store, config: NodeConfig) -> Result<Self, NodeError> {
        let key = store.identity_key()?;
        if config.mesh_key.is_none() {
            warn!("no mesh key set: running in OPEN mode, any open-mode node on the network can fetch from this one (set MESH_KEY)");
        }
        let net = Net::bind(config.listen, &key, config.mesh_key.clone(), true)?;
        let metrics = Arc::new(Metrics::default());
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let discovery = Discovery::new(&config.bootstrap);
        let mdns_on = config.mdns
            && match mdns::spawn(net.local_addr(), discovery.clone(), cancel.clone()) {
                Ok(()) => true,
                Err(e) => {
                    warn!("LAN discovery is off: {e}");
                    false
                }
            };
        let peers = Peers::spawn(net.clone(), discovery, cancel.clone());
        let limits = Limits::new(&LimitConfig {
            max_upload: config.max_upload,
            ..config.limits.clone()
        });
        let fetcher = Fetcher::new(
            store.clone(),
            peers.clone(),
            metrics.clone(),
            mdns_on,
            config.aliases.clone(),
        )
        .with_limits(limits.clone(), config.max_store);
        let danger_corrupt_uploads =
            std::env::var("MESH_DANGER_CORRUPT_UPLOADS").is_ok_and(|v| v == "1");
        if danger_corrupt_uploads {
            warn!("MESH_DANGER_CORRUPT_UPLOADS=1: this node sends CORRUPT data to peers (test switch)");
        }
        let provider = Provider {
            store: store.clone(),
            metrics: metrics.clone(),
            upload_limit: limits.upload(),
            peers: peers.clone(),
            open_mode: config.mesh_key.is_none(),
            danger_corrupt_uploads,
        };
        if let Some(mut dialed) = peers.dialed_connections() {
            // Peers use the connections we dialed as much as the ones they dialed.
            let provider = provider.clone();
            let cancel = cancel.clone();
            tasks.spawn(
                async move {
                    loop {
                        let conn = tokio::select! {
                            _ = cancel.cancelled() => break,
                            conn = dialed.recv() => conn,
                        };
                        let Some(conn) = conn else { break };
                        let (provider, cancel) = (provider.clone(), cancel.clone());
                        tokio::spawn(async move {
                            tokio::select! {
                                _ = cancel.cancelled() => {}
                                _ = provider.serve(conn) => {}
                            }
                        });
                    }
                }
                .in_current_span(),
            );
        }
        tasks.spawn(
            accept_loop(net.clone(), provider, metrics.clone(), cancel.clone()).in_current_span(),
        );
        let token = hex::encode(rand::random::<[u8; 16]>());
        let api_addr = match config.api {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| NodeError::Api { addr, source })?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| NodeError::Api { addr, source })?;
                let state = api::ApiState::new(
                    fetcher.clone(),
                    metrics.clone(),
                    token.clone(),
                    net.local_addr(),
                    bound,
                );
                tasks.spawn(api::serve(listener, state, cancel.clone()).in_current_span());
                Some(bound)
            }
            None => None,
        };
        let info = NodeInfo {
            pid: std::process::id(),
            listen: net.local_addr(),
            api: api_addr,
            token,
        };
        let path = NodeInfo::path(&config.home);
        let json = serde_json::to_vec_pretty(&info).expect("node info serializes");
        store::write_private(&path, &json).map_err(|source| NodeError::State { path, source })?;
        if config.hf_cache_scan {
            if let Some(cache) = cache_out::cache_dir() {
                cache_in::spawn_scan(store.clone(), cache, cancel.clone());
            }
        }
        if config.ollama_scan {
            if let Some(models) = crate::ollama::local_store() {
                crate::ollama::store_in::spawn_scan(store.clone(), models, cancel.clone());
            }
        }
        info!(listen = %info.listen, api = ?info.api, "node running");
        Ok(Self {
            store,
            net,
            metrics,
            fetcher,
            info,
            cancel,
            tasks,
        })
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The endpoint, for fetching through this node.
    pub fn net(&self) -> &Net {
        &self.net
    }

    /// The fetcher, for `mesh fetch` run by or through this node.
    pub fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    /// What the node published.
    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    /// Stops accepting, closes connections with a shutdown code and waits for the tasks.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        self.net.close(mesh_proto::wire::CLOSE_SHUTDOWN).await;
        while let Some(joined) = self.tasks.join_next().await {
            if let Err(e) = joined {
                warn!("task failed during shutdown: {e}");
            }
        }
        if self.info.api.is_some() {
            let _ = std::fs::remove_file(NodeInfo::path(self.store.home()));
        }
        info!("node stopped");
    }
}

async fn accept_loop(
    net: Net,
    provider: Provider,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => break,
            incoming = net.endpoint().accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let net = net.clone();
        let provider = provider.clone();
        let metrics = metrics.clone();
        let cancel = cancel.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                let conn = match net.accept(incoming).await {
                    Ok(conn) => conn,
                    Err(e) => {
                        debug!("incoming connection failed: {e}");
                        return;
                    }
                };
                match net.authenticate(&conn).await {
                    Ok(()) => {}
                    Err(ConnectError::WrongKey(addr)) => {
                        Metrics::add(&metrics.auth_failures, 1);
                        warn!(%addr, "refused a peer with a different mesh key");
                        return;
                    }
                    Err(e) => {
                        debug!("handshake failed: {e}");
                        return;
                    }
                }
                provider.peers.accepted(conn.clone());
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = provider.serve(conn) => {}
                }
            }
            .in_current_span(),
        );
    }
}
