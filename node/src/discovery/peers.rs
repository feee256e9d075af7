//! The peer set: keeps one authenticated QUIC connection to every address in the
//! [`Discovery`] view, drops it when the connection dies, and redials with backoff.
//!
//! **One connection per pair of nodes.** A connection a peer dialed to us counts as well as
//! one we dialed ([`Peers::accepted`]): we don't dial a peer that is connected to us, and
//! fetches use either. When two nodes dial each other at once, both keep the connection
//! dialed by the node with the smaller certificate ([`Net::keeps`]) and close the other after
//! [`DUPLICATE_GRACE`], once requests on it had time to finish.
//!
//! The connection, not mDNS, is how a vanished peer is noticed: mDNS sends no goodbye, while a
//! dead QUIC connection times out after the idle timeout (10 s, with keep-alives on idle
//! connections every 4 s). Besides the connections it keeps, per peer, the models it holds
//! (asked when someone looks, at most every [`MODELS_FRESH`]) and transfer rates, for
//! `mesh peers`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use mesh_proto::wire::{ModelSummary, Request, Response, CLOSE_DUPLICATE};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{merged, AddrSource, Discovery};
use crate::net::{read_frame, write_frame, ConnectError, Net, StreamError};

/// How often the set is reconciled (dials retried, models refreshed, rates computed).
const TICK: Duration = Duration::from_secs(1);
/// Wait before redialing a peer that failed; it doubles with every failure in a row, up to
/// [`RETRY_MAX`].
const RETRY_AFTER: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Wait before redialing a peer that refused our mesh key.
const RETRY_WRONG_KEY_AFTER: Duration = Duration::from_secs(30);
/// A peer's model list is asked again only when it is older than this.
const MODELS_FRESH: Duration = Duration::from_secs(5);
/// How long the peer table waits for model lists.
const MODELS_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a connection that another one would replace has to answer, to show it is alive.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the losing one of two connections between the same nodes stays open.
const DUPLICATE_GRACE: Duration = Duration::from_secs(5);

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
    /// Per connected address: whether we dialed the connection in `conns`.
    dialed: Mutex<HashMap<SocketAddr, bool>>,
    /// Per peer: its model names, and when they were asked for.
    models: Mutex<HashMap<SocketAddr, (Vec<HeldModel>, Instant)>>,
    /// Every connection we dial, for the node to serve requests on (the peer may use it as
    /// its only connection to us).
    dialed_tx: tokio::sync::mpsc::UnboundedSender<quinn::Connection>,
    dialed_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<quinn::Connection>>>,
}

/// The peer set's own loop state.
#[derive(Default)]
struct Upkeep {
    /// When to dial an address that failed again, and the wait that led there.
    retry_at: HashMap<SocketAddr, (Instant, Duration)>,
    dialing: HashSet<SocketAddr>,
    /// Each peer's byte totals at the last tick, for rates.
    last_totals: HashMap<SocketAddr, (u64, u64)>,
}

impl Peers {
    /// Starts keeping connections to every address `discovery` knows.
    pub fn spawn(net: Net, discovery: Discovery, cancel: CancellationToken) -> Self {
        let (dialed_tx, dialed_rx) = tokio::sync::mpsc::unbounded_channel();
        let peers = Self {
            inner: Arc::new(Inner {
                net,
                discovery,
                conns: watch::channel(Connections::new()).0,
                counters: Mutex::default(),
                table: Mutex::default(),
                dialed: Mutex::default(),
                models: Mutex::default(),
                dialed_tx,
                dialed_rx: Mutex::new(Some(dialed_rx)),
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

    /// Every address known or connected, as of the last tick (no network round trip).
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let table = self.inner.table.lock().expect("table lock poisoned");
        table.keys().copied().collect()
    }

    /// The table `mesh peers` prints, with model lists asked for now where they are older
    /// than [`MODELS_FRESH`] (nothing is asked while nobody looks).
    pub async fn table(&self) -> Vec<PeerInfo> {
        self.refresh_models().await;
        let models = self.inner.models.lock().expect("models lock poisoned");
        let table = self.inner.table.lock().expect("table lock poisoned");
        table
            .values()
            .map(|row| PeerInfo {
                models: models
                    .get(&row.addr)
                    .map(|(held, _)| held.iter().map(|m| m.name.clone()).collect())
                    .unwrap_or_default(),
                held: models
                    .get(&row.addr)
                    .map(|(held, _)| held.clone())
                    .unwrap_or_default(),
                ..row.clone()
            })
            .collect()
    }

    /// Asks every connected peer whose model list is stale for it, at once, waiting at most
    /// [`MODELS_TIMEOUT`].
    async fn refresh_models(&self) {
        let conns = self.inner.conns.borrow().clone();
        let stale: Vec<(SocketAddr, quinn::Connection)> = {
            let models = self.inner.models.lock().expect("models lock poisoned");
            conns
                .into_iter()
                .filter(|(addr, _)| {
                    models
                        .get(addr)
                        .is_none_or(|(_, at)| at.elapsed() >= MODELS_FRESH)
                })
                .collect()
        };
        let mut asks = tokio::task::JoinSet::new();
        for (addr, conn) in stale {
            asks.spawn(async move {
                let list = tokio::time::timeout(MODELS_TIMEOUT, ask_models(&conn)).await;
                (addr, list)
            });
        }
        while let Some(joined) = asks.join_next().await {
            if let Ok((addr, Ok(Ok(list)))) = joined {
                let held = list
                    .into_iter()
                    .map(|m| HeldModel {
                        name: m.name,
                        size: m.size,
                        complete: m.complete,
                    })
                    .collect();
                let mut models = self.inner.models.lock().expect("models lock poisoned");
                models.insert(addr, (held, Instant::now()));
            }
        }
    }

    /// The connections this set dials, as they come up: requests arrive on them too, and
    /// someone must serve them. Only the first call gets them.
    pub fn dialed_connections(
        &self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<quinn::Connection>> {
        self.inner
            .dialed_rx
            .lock()
            .expect("dialed receiver lock poisoned")
            .take()
    }

    /// A connection a peer dialed to us passed the membership handshake: fetches may use it.
    pub fn accepted(&self, conn: quinn::Connection) {
        self.offer(conn.remote_address(), conn, false);
    }

    /// Adds `addrs` as explicit peers, dials them now, and reports each failure.
    pub async fn add_explicit(&self, addrs: &[SocketAddr]) -> Vec<ConnectError> {
        let mut errors = Vec::new();
        for &addr in addrs {
            // Dialed before it joins the view, so the peer set doesn't dial it a second time.
            if !self.inner.conns.borrow().contains_key(&addr) {
                match self.inner.net.connect(addr).await {
                    Ok(conn) => self.offer(addr, conn, true),
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

    /// Takes `conn` to `addr` (dialed by us or by the peer) as the connection to that peer,
    /// unless we hold another one that stays ([`Net::keeps`]): of two connections dialed the
    /// same way the newer stays (the older one's peer went away and came back).
    fn offer(&self, addr: SocketAddr, conn: quinn::Connection, dialed_by_us: bool) {
        if dialed_by_us {
            // Served until it closes, whichever connection stays.
            let _ = self.inner.dialed_tx.send(conn.clone());
        }
        self.take(addr, conn, dialed_by_us);
    }

    /// [`Peers::offer`] for a connection that is already being served.
    fn take(&self, addr: SocketAddr, conn: quinn::Connection, dialed_by_us: bool) {
        let mut dialed = self.inner.dialed.lock().expect("dialed lock poisoned");
        let current = self.inner.conns.borrow().get(&addr).cloned();
        let keep_new = match &current {
            Some(old) if old.stable_id() == conn.stable_id() => return,
            Some(old) if old.close_reason().is_none() => {
                let old_dialed_by_us = dialed.get(&addr).copied().unwrap_or(true);
                old_dialed_by_us == dialed_by_us || self.inner.net.keeps(&conn, dialed_by_us)
            }
            _ => true,
        };
        if let (false, Some(old)) = (keep_new, current.clone()) {
            // The old one stays, if it is alive: a peer that restarted and dialed us leaves a
            // dead connection behind, which only its idle timeout would end.
            debug!(%addr, "a second connection to a connected peer: keeping the first");
            let this = self.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(PROBE_TIMEOUT, ask_models(&old)).await {
                    Ok(Ok(_)) => retire(conn),
                    _ => {
                        old.close(CLOSE_DUPLICATE.into(), b"no answer");
                        this.take(addr, conn, dialed_by_us);
                    }
                }
            });
            return;
        }
        if let Some(old) = current {
            retire(old);
        }
        dialed.insert(addr, dialed_by_us);
        let watcher = conn.clone();
        // Still under the `dialed` lock: a second `take` for this peer must see this
        // connection as current. (Inserted after the lock was dropped, two connections that
        // came up together could both be taken as new, the second overwriting the first
        // without retiring it, while the peer kept the other one: it then closed every
        // connection this node dialed, and this node redialed every 6 s.)
        self.inner.conns.send_modify(|c| {
            c.insert(addr, conn);
        });
        drop(dialed);
        info!(%addr, incoming = !dialed_by_us, "connected to peer");
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
                        Ok(conn) => {
                            upkeep.retry_at.remove(&addr);
                            self.offer(addr, conn, true);
                        }
                        Err(e) => {
                            debug!("{e}");
                            let wait = if matches!(e, ConnectError::WrongKey(_)) {
                                RETRY_WRONG_KEY_AFTER
                            } else {
                                upkeep
                                    .retry_at
                                    .get(&addr)
                                    .map_or(RETRY_AFTER, |(_, last)| (*last * 2).min(RETRY_MAX))
                            };
                            upkeep.retry_at.insert(addr, (Instant::now() + wait, wait));
                        }
                    }
                    continue;
                }
                changed = sources.changed() => if changed.is_err() { break },
            }
            let known = merged(&sources.borrow());
            let conns = self.inner.conns.borrow().clone();
            self.dial_missing(&known, &conns, &mut upkeep, &dial_tx);
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
                .is_some_and(|(t, _)| *t > Instant::now())
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
                models: Vec::new(),
                held: Vec::new(),
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

/// Closes the losing one of two connections between the same nodes, after requests on it had
/// [`DUPLICATE_GRACE`] to finish.
fn retire(conn: quinn::Connection) {
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(DUPLICATE_GRACE) => {
                conn.close(CLOSE_DUPLICATE.into(), b"duplicate connection");
            }
            _ = conn.closed() => {}
        }
    });
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
