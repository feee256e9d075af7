//! The peer set: keeps one authenticated QUIC connection to every address in the
//! [`Discovery`] view, drops it when the connection dies, and redials with backoff.
//!
//! The connection, not mDNS, is how a vanished peer is noticed: mDNS sends no goodbye, while a
//! dead QUIC connection times out after the idle timeout (10 s with keep-alives every 2 s).
//! Besides the connections it keeps, per peer, the models it holds (asked every few seconds)
//! and transfer rates, for `mesh peers`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use mesh_proto::wire::{ModelSummary, Request, Response};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{merged, AddrSource, Discovery};
use crate::net::{read_frame, write_frame, ConnectError, Net, StreamError};

/// How often the set is reconciled (dials retried, models refreshed, rates computed).
const TICK: Duration = Duration::from_secs(1);
/// Wait before redialing a peer that failed.
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// Wait before redialing a peer that refused our mesh key.
const RETRY_WRONG_KEY_AFTER: Duration = Duration::from_secs(30);
/// How often each peer's model list is refreshed.
const MODELS_EVERY: Duration = Duration::from_secs(5);

/// The live connections, by peer address.
pub type Connections = BTreeMap<SocketAddr, quinn::Connection>;

/// Byte counters for one peer address.
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Verified blob bytes received from it.
    pub received: AtomicU64,
    /// Blob bytes sent to it.
    pub sent: AtomicU64,
}

/// A peer as `mesh peers` shows it.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct PeerInfo {
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// `mdns`, `explicit`, `bootstrap` or `incoming`.
    pub source: String,
    /// Whether we hold a live connection to it.
    pub connected: bool,
    /// Models it holds (names), as of the last refresh.
    pub models: Vec<String>,
    /// Bytes per second received from it, over the last second.
    pub rate_in: u64,
    /// Bytes per second sent to it, over the last second.
    pub rate_out: u64,
    /// Total bytes received from it.
    pub received: u64,
    /// Total bytes sent to it.
    pub sent: u64,
    /// The models it holds, with whether each is complete there (for the fleet page).
    #[serde(default)]
    pub held: Vec<HeldModel>,
}

/// A model a peer holds, as the fleet page shows it.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct HeldModel {
    /// Its name.
    pub name: String,
    /// Total bytes.
    pub size: u64,
    /// Whether every file is complete there.
    pub complete: bool,
}

/// Handle to the peer set. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Peers {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    net: Net,
    /// Where addresses come from.
    discovery: Discovery,
    /// Live connections; fetches watch this to pick up peers as they come and go.
    conns: watch::Sender<Connections>,
    /// Per-address counters (also for peers that only connect to us).
    counters: Mutex<HashMap<SocketAddr, Arc<PeerCounters>>>,
    /// What `mesh peers` shows. A std mutex: only replaced or cloned.
    table: Mutex<BTreeMap<SocketAddr, PeerInfo>>,
}

/// The peer set's own loop state.
#[derive(Default)]
struct Upkeep {
    /// When to dial an address that failed again.
    retry_at: HashMap<SocketAddr, Instant>,
    dialing: HashSet<SocketAddr>,
    /// When each peer's model list was last asked for.
    models_asked: HashMap<SocketAddr, Instant>,
    /// Each peer's byte totals at the last tick, for rates.
    last_totals: HashMap<SocketAddr, (u64, u64)>,
}

impl Peers {
    /// Starts keeping connections to every address `discovery` knows.
    pub fn spawn(net: Net, discovery: Discovery, cancel: CancellationToken) -> Self {
        let peers = Self {
            inner: Arc::new(Inner {
                net,
                discovery,
                conns: watch::channel(Connections::new()).0,
                counters: Mutex::default(),
                table: Mutex::default(),
            }),
        };
        tokio::spawn(peers.clone().run(cancel));
        peers
    }

    /// The live connections, as a watch that changes when peers come and go.
    pub fn connections(&self) -> watch::Receiver<Connections> {
        self.inner.conns.subscribe()
    }

    /// The counters for one peer address.
    pub fn counters(&self, addr: SocketAddr) -> Arc<PeerCounters> {
        let mut map = self.inner.counters.lock().expect("counters lock poisoned");
        map.entry(addr).or_default().clone()
    }

    /// The table `mesh peers` prints.
    pub fn table(&self) -> Vec<PeerInfo> {
        let table = self.inner.table.lock().expect("table lock poisoned");
        table.values().cloned().collect()
    }

    /// Adds `addrs` as explicit peers, dials them now, and reports each failure.
    pub async fn add_explicit(&self, addrs: &[SocketAddr]) -> Vec<ConnectError> {
        let mut errors = Vec::new();
        for &addr in addrs {
            // Dialed before it joins the view, so the peer set doesn't dial it a second time.
            if !self.inner.conns.borrow().contains_key(&addr) {
                match self.inner.net.connect(addr).await {
                    Ok(conn) => self.insert(addr, conn),
                    Err(e) => {
                        warn!("{e}");
                        errors.push(e);
                    }
                }
            }
            self.inner.discovery.add(AddrSource::Explicit, addr);
        }
        errors
    }

    fn insert(&self, addr: SocketAddr, conn: quinn::Connection) {
        info!(%addr, "connected to peer");
        let watcher = conn.clone();
        self.inner.conns.send_modify(|c| {
            c.insert(addr, conn);
        });
        let this = self.clone();
        tokio::spawn(async move {
            let reason = watcher.closed().await;
            debug!(%addr, "peer connection closed: {reason}");
            this.inner.conns.send_if_modified(|c| match c.get(&addr) {
                Some(current) if current.stable_id() == watcher.stable_id() => {
                    c.remove(&addr);
                    true
                }
                _ => false,
            });
        });
    }

    async fn run(self, cancel: CancellationToken) {
        let mut upkeep = Upkeep::default();
        let (dial_tx, mut dial_rx) = tokio::sync::mpsc::channel(64);
        let mut tick = tokio::time::interval(TICK);
        let mut sources = self.inner.discovery.watch();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
                Some((addr, result)) = dial_rx.recv() => {
                    upkeep.dialing.remove(&addr);
                    match result {
                        Ok(conn) => self.insert(addr, conn),
                        Err(e) => {
                            debug!("{e}");
                            let wait = if matches!(e, ConnectError::WrongKey(_)) {
                                RETRY_WRONG_KEY_AFTER
                            } else {
                                RETRY_AFTER
                            };
                            upkeep.retry_at.insert(addr, Instant::now() + wait);
                        }
                    }
                    continue;
                }
                changed = sources.changed() => if changed.is_err() { break },
            }
            let known = merged(&sources.borrow());
            let conns = self.inner.conns.borrow().clone();
            self.dial_missing(&known, &conns, &mut upkeep, &dial_tx);
            self.refresh_models(&conns, &mut upkeep);
            self.rebuild_table(&known, &conns, &mut upkeep);
        }
    }

    /// Dials every known address we hold no connection to and are not waiting on.
    fn dial_missing(
        &self,
        known: &BTreeMap<SocketAddr, AddrSource>,
        conns: &Connections,
        upkeep: &mut Upkeep,
        dial_tx: &tokio::sync::mpsc::Sender<(SocketAddr, Result<quinn::Connection, ConnectError>)>,
    ) {
        let own = self.inner.net.local_addr();
        for &addr in known.keys() {
            if addr == own || conns.contains_key(&addr) || upkeep.dialing.contains(&addr) {
                continue;
            }
            if upkeep
                .retry_at
                .get(&addr)
                .is_some_and(|t| *t > Instant::now())
            {
                continue;
            }
            upkeep.dialing.insert(addr);
            let net = self.inner.net.clone();
            let tx = dial_tx.clone();
            tokio::spawn(async move {
                let _ = tx.send((addr, net.connect(addr).await)).await;
            });
        }
    }

    /// Asks each connected peer for its model list every [`MODELS_EVERY`].
    fn refresh_models(&self, conns: &Connections, upkeep: &mut Upkeep) {
        for (&addr, conn) in conns {
            let stale = upkeep
                .models_asked
                .get(&addr)
                .is_none_or(|at| at.elapsed() >= MODELS_EVERY);
            if !stale {
                continue;
            }
            upkeep.models_asked.insert(addr, Instant::now());
            let conn = conn.clone();
            let this = self.clone();
            tokio::spawn(async move {
                if let Ok(list) = ask_models(&conn).await {
                    let names = list.iter().map(|m| m.name.clone()).collect();
                    let mut table = this.inner.table.lock().expect("table lock poisoned");
                    if let Some(row) = table.get_mut(&addr) {
                        row.models = names;
                        row.held = list
                            .into_iter()
                            .map(|m| HeldModel {
                                name: m.name,
                                size: m.size,
                                complete: m.complete,
                            })
                            .collect();
                    }
                }
            });
        }
    }

    /// Rebuilds the `mesh peers` table: every known or connected address, with rates.
    fn rebuild_table(
        &self,
        known: &BTreeMap<SocketAddr, AddrSource>,
        conns: &Connections,
        upkeep: &mut Upkeep,
    ) {
        let counters = self
            .inner
            .counters
            .lock()
            .expect("counters lock poisoned")
            .clone();
        let mut table = self.inner.table.lock().expect("table lock poisoned");
        let mut next = BTreeMap::new();
        let addrs: BTreeSet<SocketAddr> = known.keys().chain(conns.keys()).copied().collect();
        for addr in addrs {
            let (received, sent) = counters
                .get(&addr)
                .map(|c| {
                    (
                        c.received.load(Ordering::Relaxed),
                        c.sent.load(Ordering::Relaxed),
                    )
                })
                .unwrap_or_default();
            let (last_in, last_out) = upkeep
                .last_totals
                .insert(addr, (received, sent))
                .unwrap_or((received, sent));
            let secs = TICK.as_secs_f64();
            let source = match known.get(&addr) {
                Some(AddrSource::Mdns) => "mdns",
                Some(AddrSource::Explicit) => "explicit",
                Some(AddrSource::Bootstrap) => "bootstrap",
                None => "incoming",
            };
            let row = PeerInfo {
                addr,
                source: source.into(),
                connected: conns.contains_key(&addr),
                models: table
                    .get(&addr)
                    .map(|r| r.models.clone())
                    .unwrap_or_default(),
                held: table.get(&addr).map(|r| r.held.clone()).unwrap_or_default(),
                rate_in: ((received - last_in) as f64 / secs) as u64,
                rate_out: ((sent - last_out) as f64 / secs) as u64,
                received,
                sent,
            };
            next.insert(addr, row);
        }
        *table = next;
    }
}

/// Asks a peer which models it holds.
pub async fn ask_models(conn: &quinn::Connection) -> Result<Vec<ModelSummary>, StreamError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(StreamError::from_connection)?;
    write_frame(&mut send, &Request::Models).await?;
    let _ = send.finish();
    match read_frame(&mut recv).await? {
        Response::Models(models) => Ok(models),
        _ => Ok(Vec::new()),
    }
}
