//! Once per fleet: nodes that fetch the same HuggingFace file at the same time split the HF
//! work by pieces and swap the rest among themselves, so each byte crosses the internet once.
//!
//! Until the whole file is there its BLAKE3 root is unknown, so pieces travel raw
//! (`transfer::pieces`), and only between mesh members (every connection is authenticated).
//! Each node advertises the pieces it holds and is fetching, with a random node id. A piece
//! nobody holds or fetches goes to HuggingFace from exactly one node: the one whose id wins a
//! rendezvous hash for that piece among the nodes assembling the file (a piece whose owner
//! vanished, or that stays unclaimed for [`CLAIM_WAIT`], is taken by anyone). When all pieces
//! are there the whole file is checked against HF's sha256 (or git blob id); on a mismatch the
//! pieces that came from peers are dropped, those peers are banned for this file, and the
//! pieces are fetched from HuggingFace instead.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::{
    sync::{mpsc, watch},
    task::{AbortHandle, JoinSet},
};
use tracing::{debug, warn};

use super::hub::{file_digest, Hub, HubError, HubFile};
use crate::{
    discovery::Connections,
    store::pieces::{piece_bounds, piece_count, PieceFile},
    swarm::rendezvous,
    transfer::pieces::{get_piece, subscribe, PieceError, PieceNews},
};

/// Pieces in flight to one peer.
const PEER_REQUESTS: usize = 4;
/// Range requests in flight to HuggingFace.
const HUB_REQUESTS: usize = 4;
/// A piece still unclaimed this long after the download started may be taken by anyone.
const CLAIM_WAIT: Duration = Duration::from_secs(5);
/// Wait this long for other nodes to announce themselves before the first HF request.
const SETTLE: Duration = Duration::from_millis(500);
/// How soon a peer that had nothing (yet) is asked again.
const RESUBSCRIBE: Duration = Duration::from_millis(100);

/// What a peer told us about the file.
#[derive(Default)]
struct PeerView {
    node: u64,
    have: HashSet<usize>,
    pending: HashSet<usize>,
    in_flight: usize,
    banned: bool,
}

enum Event {
    Have {
        peer: SocketAddr,
        news: PieceNews,
    },
    SubEnded {
        peer: SocketAddr,
    },
    FromPeer {
        piece: usize,
        peer: SocketAddr,
        result: Result<Vec<u8>, PieceError>,
    },
    FromHub {
        piece: usize,
        result: Result<Vec<u8>, HubError>,
    },
}

/// Where a HuggingFace file is assembled from.
pub struct HubSource<'a> {
    /// The Hub client.
    pub hub: &'a Hub,
    /// `org/name`.
    pub repo: &'a str,
    /// The commit.
    pub commit: &'a str,
    /// The file.
    pub file: &'a HubFile,
}

/// Assembles `src.file` into `partial` from peers and HuggingFace, then checks it. Returns the
/// bytes that came from HuggingFace.
pub async fn download(
    src: HubSource<'_>,
    partial: Arc<PieceFile>,
    mut conns: watch::Receiver<Connections>,
    progress: Arc<AtomicU64>,
) -> Result<u64, HubError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut assembly = Assembly::new(src, partial, tx);
    let mut retry_subs = tokio::time::interval(RESUBSCRIBE);
    assembly.sync(&conns.borrow_and_update().clone());
    loop {
        progress.store(assembly.bytes_here(), Ordering::Relaxed);
        if let Some(done) = assembly.check_if_whole().await {
            return done;
        }
        assembly.assign(&conns.borrow().clone());
        tokio::select! {
            Some(event) = rx.recv() => assembly.handle(event)?,
            changed = conns.changed() => {
                if changed.is_ok() {
                    let current = conns.borrow_and_update().clone();
                    assembly.sync(&current);
                }
            }
            _ = retry_subs.tick() => {
                // Peers that had nothing (yet) are asked again: they may have started.
                let current = conns.borrow().clone();
                assembly.sync(&current);
            }
            Some(_) = assembly.tasks.join_next(), if !assembly.tasks.is_empty() => {}
        }
    }
}

/// One file being assembled.
struct Assembly<'a> {
    src: HubSource<'a>,
    partial: Arc<PieceFile>,
    pieces: usize,
    events: mpsc::UnboundedSender<Event>,
    peers: HashMap<SocketAddr, PeerView>,
    /// Subscription tasks, by peer.
    subs: HashMap<SocketAddr, AbortHandle>,
    tasks: JoinSet<()>,
    started: Instant,
    hub_in_flight: usize,
    in_flight: HashSet<usize>,
    from_hf: u64,
    /// This node's walk through the pieces: its own random order, so nodes that don't see
    /// each other yet rarely pick the same piece.
    order: Vec<usize>,
}

impl<'a> Assembly<'a> {
    fn new(
        src: HubSource<'a>,
        partial: Arc<PieceFile>,
        events: mpsc::UnboundedSender<Event>,
    ) -> Self {
        let pieces = piece_count(src.file.size);
        let mut order: Vec<usize> = (0..pieces).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rand::random_range(0..=i));
        }
        Self {
            src,
            partial,
            pieces,
            events,
            peers: HashMap::new(),
            subs: HashMap::new(),
            tasks: JoinSet::new(),
            started: Instant::now(),
            hub_in_flight: 0,
            in_flight: HashSet::new(),
            from_hf: 0,
            order,
        }
    }

    /// Subscribes to peers we don't follow yet, and forgets peers that left.
    fn sync(&mut self, conns: &Connections) {
        for (addr, conn) in conns {
            if self.subs.contains_key(addr) {
                continue;
            }
            let (conn, peer, events) = (conn.clone(), *addr, self.events.clone());
            let (etag, size) = (self.partial.etag().to_string(), self.src.file.size);
            let handle = self.tasks.spawn(async move {
                let news = |news| events.send(Event::Have { peer, news }).is_ok();
                if let Err(e) = subscribe(&conn, etag, size, news).await {
                    debug!(%peer, "piece subscription ended: {e}");
                }
                // Renewed on the next retry tick.
                let _ = events.send(Event::SubEnded { peer });
            });
            self.subs.insert(*addr, handle);
            self.peers.entry(*addr).or_default();
        }
        self.peers.retain(|addr, _| conns.contains_key(addr));
    }

    fn bytes_here(&self) -> u64 {
        let state = self.partial.state();
        (0..self.pieces)
            .filter(|&p| state.have[p])
            .map(|p| piece_bounds(self.src.file.size, p).1)
            .sum()
    }

    /// When every piece is here: checks the file against its published hash. `None` while
    /// pieces are missing or a mismatch sent us back for pieces from HuggingFace.
    async fn check_if_whole(&mut self) -> Option<Result<u64, HubError>> {
        let whole = self.partial.state().have.iter().all(|h| *h);
        if !whole || !self.in_flight.is_empty() {
            return None;
        }
        let path = self.partial.path().to_path_buf();
        let file = self.src.file.clone();
        let digest = tokio::task::spawn_blocking(move || file_digest(&path, &file))
            .await
            .expect("hash task panicked");
        let digest = match digest {
            Ok(digest) => digest,
            Err(source) => {
                let path = self.partial.path().to_path_buf();
                return Some(Err(HubError::Io { path, source }));
            }
        };
        if digest == self.src.file.etag() {
            return Some(Ok(self.from_hf));
        }
        let culprits = self.partial.drop_pieces_from_peers();
        if culprits.is_empty() {
            return Some(Err(HubError::Mismatch {
                path: self.src.file.path.clone(),
                expected: self.src.file.etag().to_string(),
                actual: digest,
            }));
        }
        warn!(path = %self.src.file.path, ?culprits, "assembled file does not match HF's hash: dropping pieces from peers and banning them");
        for c in culprits {
            if let Some(view) = self.peers.get_mut(&c) {
                view.banned = true;
            }
        }
        None
    }

    /// Starts fetching every piece we may fetch now: from a peer that has it, else from
    /// HuggingFace if it is ours (or unclaimed for long enough).
    fn assign(&mut self, conns: &Connections) {
        let state = self.partial.state();
        let mut ids: Vec<u64> = self
            .peers
            .values()
            .filter(|v| !v.banned && v.node != 0)
            .map(|v| v.node)
            .collect();
        ids.push(self.partial.node());
        let settled = self.started.elapsed() >= SETTLE;
        for i in 0..self.order.len() {
            let p = self.order[i];
            if state.have[p] || self.in_flight.contains(&p) {
                continue;
            }
            let source = self
                .peers
                .iter()
                .filter(|(_, v)| !v.banned && v.have.contains(&p) && v.in_flight < PEER_REQUESTS)
                .min_by_key(|(_, v)| v.in_flight)
                .map(|(a, _)| *a);
            if let Some(conn) = source.and_then(|addr| conns.get(&addr)) {
                self.ask_peer(p, conn.clone());
                continue;
            }
            let held_elsewhere = self
                .peers
                .values()
                .any(|v| !v.banned && (v.have.contains(&p) || v.pending.contains(&p)));
            if held_elsewhere || !settled || self.hub_in_flight >= HUB_REQUESTS {
                continue;
            }
            let owner = ids
                .iter()
                .copied()
                .max_by_key(|id| rendezvous(*id, p))
                .expect("ids has us");
            if owner != self.partial.node() && self.started.elapsed() < CLAIM_WAIT {
                continue;
            }
            self.ask_hub(p);
        }
    }

    fn ask_peer(&mut self, piece: usize, conn: quinn::Connection) {
        let peer = conn.remote_address();
        if let Some(view) = self.peers.get_mut(&peer) {
            view.in_flight += 1;
        }
        self.in_flight.insert(piece);
        self.partial.set_pending(piece, true);
        let (events, etag) = (self.events.clone(), self.partial.etag().to_string());
        self.tasks.spawn(async move {
            let result = get_piece(&conn, &etag, piece).await;
            let _ = events.send(Event::FromPeer {
                piece,
                peer,
                result,
            });
        });
    }

    fn ask_hub(&mut self, piece: usize) {
        self.hub_in_flight += 1;
        self.in_flight.insert(piece);
        self.partial.set_pending(piece, true);
        let events = self.events.clone();
        let hub = self.src.hub.clone();
        let (repo, commit) = (self.src.repo.to_string(), self.src.commit.to_string());
        let file = self.src.file.clone();
        self.tasks.spawn(async move {
            let (start, len) = piece_bounds(file.size, piece);
            let result = hub.download_range(&repo, &commit, &file, start, len).await;
            let _ = events.send(Event::FromHub { piece, result });
        });
    }

    fn handle(&mut self, event: Event) -> Result<(), HubError> {
        match event {
            Event::Have { peer, news } => {
                if let Some(view) = self.peers.get_mut(&peer) {
                    view.node = news.node;
                    view.have = news.have;
                    view.pending = news.pending;
                }
            }
            Event::SubEnded { peer } => {
                self.subs.remove(&peer);
            }
            Event::FromPeer {
                piece,
                peer,
                result,
            } => {
                self.in_flight.remove(&piece);
                if let Some(v) = self.peers.get_mut(&peer) {
                    v.in_flight -= 1;
                }
                match result {
                    Ok(bytes) => self.store(piece, &bytes, Some(peer))?,
                    Err(e) => {
                        debug!(piece, %peer, "piece failed: {e}");
                        self.partial.set_pending(piece, false);
                        if let Some(v) = self.peers.get_mut(&peer) {
                            v.have.remove(&piece);
                        }
                    }
                }
            }
            Event::FromHub { piece, result } => {
                self.in_flight.remove(&piece);
                self.hub_in_flight -= 1;
                let bytes = result.inspect_err(|_| self.partial.set_pending(piece, false))?;
                self.store(piece, &bytes, None)?;
                self.from_hf += bytes.len() as u64;
            }
        }
        Ok(())
    }

    fn store(&self, piece: usize, bytes: &[u8], from: Option<SocketAddr>) -> Result<(), HubError> {
        self.partial
            .store_piece(piece, bytes, from)
            .map_err(|source| HubError::Io {
                path: self.partial.path().to_path_buf(),
                source,
            })
    }
}
