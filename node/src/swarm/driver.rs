//! The async side of the block scheduler: it owns the connections, subscription tasks and
//! request tasks, turns what they report into [`Policy`] events, and carries out the policy's
//! [`Action`]s. It makes no scheduling decision of its own.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use bao_tree::ChunkRanges;
use mesh_proto::wire::{Request, Response};
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};
use tracing::{debug, warn};

use super::{
    layout::covers,
    policy::{Action, BlockRequest, FileSpec, Outcome, Policy, RequestId, Stalled, TICK},
    DownloadError, FileJob, NoSource,
};
use crate::{
    discovery::{Connections, Peers},
    limits::Limits,
    metrics::Metrics,
    net::{read_frame, write_frame, StreamError},
    store::ranges,
    transfer::get::{get_ranges, GetError, GetHooks},
};

/// Downloads every missing block of `jobs` from the peers in `conns` (which may change while
/// it runs). Returns the peers that delivered data.
pub(super) async fn run(
    jobs: Vec<FileJob>,
    mut conns: watch::Receiver<Connections>,
    peers: Peers,
    metrics: Arc<Metrics>,
    limits: Limits,
) -> Result<Vec<SocketAddr>, DownloadError> {
    let specs: Vec<FileSpec> = jobs
        .iter()
        .map(|j| FileSpec {
            size: j.partial.size(),
            have: j.partial.have(),
            node: j.partial.node(),
        })
        .collect();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut driver = Driver {
        policy: Policy::new(&specs, rand::random()),
        jobs,
        conns: HashMap::new(),
        requests: JoinSet::new(),
        cancels: HashMap::new(),
        events: tx,
        peer_set: peers,
        metrics,
        limits,
        used: HashSet::new(),
        last_error: None,
    };
    let mut tick = tokio::time::interval(TICK);
    driver.sync(&conns.borrow_and_update().clone());
    let result = loop {
        // Pending cancellations go out before we return, so no duplicate keeps reading.
        driver.act();
        if driver.policy.is_done() {
            break Ok(driver.used.iter().copied().collect());
        }
        driver.policy.schedule(Instant::now());
        driver.act();
        let step = tokio::select! {
            Some(event) = rx.recv() => driver.handle(event),
            changed = conns.changed() => {
                if changed.is_ok() {
                    let current = conns.borrow_and_update().clone();
                    driver.sync(&current);
                }
                Ok(())
            }
            _ = tick.tick() => driver.tick(),
            Some(_) = driver.requests.join_next(), if !driver.requests.is_empty() => Ok(()),
        };
        if let Err(e) = step {
            break Err(e);
        }
    };
    driver.finish();
    result
}

/// A connection the download uses, with its subscription tasks (dropped: aborted).
struct Conn {
    conn: quinn::Connection,
    subs: JoinSet<()>,
}

/// What the tasks report.
enum Event {
    Have {
        peer: SocketAddr,
        conn: usize,
        file: usize,
        added: ChunkRanges,
        pending: ChunkRanges,
        node: u64,
    },
    SubEnded {
        peer: SocketAddr,
        conn: usize,
        file: usize,
    },
    Done {
        req: BlockRequest,
        result: Result<ChunkRanges, GetError>,
    },
}

struct Driver {
    policy: Policy,
    jobs: Vec<FileJob>,
    conns: HashMap<SocketAddr, Conn>,
    /// Block request tasks.
    requests: JoinSet<()>,
    /// The cancel flag of every request in flight.
    cancels: HashMap<RequestId, Arc<AtomicBool>>,
    events: mpsc::UnboundedSender<Event>,
    peer_set: Peers,
    metrics: Arc<Metrics>,
    /// `max_download`: each request waits for its bytes before it goes out.
    limits: Limits,
    /// Peers that delivered data.
    used: HashSet<SocketAddr>,
    /// The most telling request failure, for the report if the download stalls: bad data
    /// beats a refusal.
    last_error: Option<GetError>,
}

impl Driver {
    /// Carries out every action the policy has queued.
    fn act(&mut self) {
        while let Some(action) = self.policy.poll_action() {
            match action {
                Action::Start(req) => self.start(req),
                Action::Cancel(id) => {
                    if let Some(flag) = self.cancels.get(&id) {
                        flag.store(true, Ordering::Relaxed);
                    }
                }
                Action::Subscribe { peer, file } => self.subscribe(peer, file),
                Action::Unsubscribe { peer } => {
                    if let Some(c) = self.conns.get_mut(&peer) {
                        c.subs.abort_all();
                    }
                }
                Action::Pending { file, chunks } => self.jobs[file].partial.set_pending(chunks),
            }
        }
    }

    fn start(&mut self, req: BlockRequest) {
        let job = &self.jobs[req.file];
        let wanted = req.chunks.clone() & job.partial.missing();
        let conn = self.conns.get(&req.peer).map(|c| c.conn.clone());
        let Some(conn) = conn.filter(|_| !wanted.is_empty()) else {
            // Completed meanwhile (another fetch of the same blob), or the peer just left.
            let complete = wanted.is_empty();
            let outcome = if complete {
                Outcome::AlreadyHave
            } else {
                Outcome::Failed
            };
            self.policy.handle_done(&req, outcome, complete);
            return;
        };
        debug!(peer = %req.peer, file = req.file, block = req.block, live = req.live, "request");
        let cancel = Arc::new(AtomicBool::new(false));
        self.cancels.insert(req.id, cancel.clone());
        let hooks = GetHooks {
            metrics: self.metrics.clone(),
            progress: job.progress.clone(),
            peer: self.peer_set.counters(req.peer),
            cancel,
        };
        let partial = job.partial.clone();
        let events = self.events.clone();
        let limits = self.limits.clone();
        let bytes = ranges::byte_len(&wanted, partial.size());
        self.requests.spawn(async move {
            limits.download(bytes).await;
            let result = get_ranges(&conn, partial, &wanted, hooks).await;
            let _ = events.send(Event::Done { req, result });
        });
    }

    fn subscribe(&mut self, peer: SocketAddr, file: usize) {
        let Some(c) = self.conns.get_mut(&peer) else {
            return;
        };
        let partial = &self.jobs[file].partial;
        c.subs.spawn(subscribe_task(
            c.conn.clone(),
            peer,
            file,
            partial.hash(),
            partial.size(),
            self.events.clone(),
        ));
    }

    fn handle(&mut self, event: Event) -> Result<(), DownloadError> {
        match event {
            Event::Have {
                peer,
                conn,
                file,
                added,
                pending,
                node,
            } => {
                if self.is_current(peer, conn) {
                    self.policy.handle_have(peer, file, &added, pending, node);
                }
            }
            Event::SubEnded { peer, conn, file } => {
                if self.is_current(peer, conn) {
                    self.policy
                        .handle_subscription_ended(peer, file, Instant::now());
                }
            }
            Event::Done { req, result } => self.done(req, result)?,
        }
        Ok(())
    }

    fn done(
        &mut self,
        req: BlockRequest,
        result: Result<ChunkRanges, GetError>,
    ) -> Result<(), DownloadError> {
        self.cancels.remove(&req.id);
        debug!(peer = %req.peer, file = req.file, block = req.block, ok = result.is_ok(), "done");
        let outcome = match result {
            Ok(sent) => {
                if !sent.is_empty() {
                    self.used.insert(req.peer);
                }
                Outcome::Ok
            }
            Err(GetError::Store(e)) => return Err(e.into()),
            Err(e @ GetError::Unavailable { .. }) => {
                debug!("{e}");
                Outcome::Unavailable
            }
            Err(e) => {
                warn!("{e}");
                let outcome = match &e {
                    GetError::Corrupt { .. } => {
                        Metrics::add(&self.metrics.verify_failures, 1);
                        Outcome::Corrupt
                    }
                    GetError::Protocol { .. } => Outcome::Protocol,
                    GetError::SourceCorrupt { .. } | GetError::Refused { .. } => Outcome::NotHeld,
                    _ => Outcome::Failed,
                };
                if e.is_bad_data() || !self.last_error.as_ref().is_some_and(GetError::is_bad_data) {
                    self.last_error = Some(e);
                }
                outcome
            }
        };
        let complete = covers(&self.jobs[req.file].partial.have(), &req.chunks);
        self.policy.handle_done(&req, outcome, complete);
        Ok(())
    }

    fn tick(&mut self) -> Result<(), DownloadError> {
        let peers = &self.peer_set;
        let received = |addr| peers.counters(addr).received.load(Ordering::Relaxed);
        match self.policy.handle_tick(Instant::now(), received) {
            Ok(()) => Ok(()),
            Err(Stalled { file, all_banned }) => Err(DownloadError::NoSource {
                path: self.jobs[file].path.clone(),
                cause: match self.last_error.take() {
                    Some(e) => NoSource::Failed(Box::new(e)),
                    None if all_banned => NoSource::NoUsablePeer,
                    None => NoSource::NotOffered,
                },
            }),
        }
    }

    /// Follows the peer set: connections that went away leave the policy, new ones join it.
    fn sync(&mut self, current: &Connections) {
        let gone: Vec<SocketAddr> = self
            .conns
            .iter()
            .filter(|(addr, c)| {
                current
                    .get(addr)
                    .is_none_or(|now| now.stable_id() != c.conn.stable_id())
            })
            .map(|(addr, _)| *addr)
            .collect();
        for addr in gone {
            self.conns.remove(&addr);
            self.policy.handle_peer_left(addr);
            debug!(%addr, "peer left the download");
        }
        for (addr, conn) in current {
            if self.conns.contains_key(addr) {
                continue;
            }
            let received = self
                .peer_set
                .counters(*addr)
                .received
                .load(Ordering::Relaxed);
            if self.policy.handle_peer_joined(*addr, received) {
                let c = Conn {
                    conn: conn.clone(),
                    subs: JoinSet::new(),
                };
                self.conns.insert(*addr, c);
            }
        }
    }

    fn is_current(&self, peer: SocketAddr, conn: usize) -> bool {
        self.conns
            .get(&peer)
            .is_some_and(|c| c.conn.stable_id() == conn)
    }

    /// Stops every request still running and clears what we advertise as pending.
    fn finish(&mut self) {
        for id in self.policy.in_flight() {
            if let Some(flag) = self.cancels.get(&id) {
                flag.store(true, Ordering::Relaxed);
            }
        }
        for job in &self.jobs {
            job.partial.set_pending(ChunkRanges::empty());
        }
        for (addr, c) in &mut self.conns {
            c.subs.abort_all();
            let stats = c.conn.stats();
            debug!(
                %addr,
                rx_bytes = stats.udp_rx.bytes,
                rx_datagrams = stats.udp_rx.datagrams,
                tx_datagrams = stats.udp_tx.datagrams,
                ack_frames_tx = stats.frame_tx.acks,
                max_data_frames_tx = stats.frame_tx.max_data,
                rtt_ms = stats.path.rtt.as_secs_f64() * 1e3,
                "connection totals"
            );
        }
    }
}

/// Streams a peer's view of one file (what it holds, then each addition, and what it fetches)
/// into events, until the subscription ends.
async fn subscribe_task(
    conn: quinn::Connection,
    peer: SocketAddr,
    file: usize,
    hash: mesh_proto::Hash,
    size: u64,
    events: mpsc::UnboundedSender<Event>,
) {
    let id = conn.stable_id();
    let result: Result<(), StreamError> = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(StreamError::from_connection)?;
        let _ = send.set_priority(crate::net::CONTROL_PRIORITY);
        write_frame(&mut send, &Request::Subscribe { hash }).await?;
        let _ = send.finish();
        loop {
            match read_frame(&mut recv).await? {
                Response::Have {
                    size: s,
                    ranges,
                    pending,
                    node,
                } if s == size => {
                    let event = Event::Have {
                        pending: ranges::from_spans(&pending, size),
                        node,
                        peer,
                        conn: id,
                        file,
                        added: ranges::from_spans(&ranges, size),
                    };
                    if events.send(event).is_err() {
                        return Ok(());
                    }
                }
                _ => return Ok(()),
            }
        }
    }
    .await;
    if let Err(e) = result {
        debug!(%peer, "subscription ended: {e}");
    }
    let _ = events.send(Event::SubEnded {
        peer,
        conn: id,
        file,
    });
}
