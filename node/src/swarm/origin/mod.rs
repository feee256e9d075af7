//! Once per fleet: nodes that fetch the same file from an origin outside the mesh (HuggingFace,
//! a registry) at the same time split the origin's work by pieces and swap the rest among
//! themselves, so each byte crosses the internet once.
//!
//! Until the whole file is there its BLAKE3 root is unknown, so pieces travel raw
//! (`transfer::pieces`), and only between mesh members (every connection is authenticated).
//! Each node advertises the pieces it holds and is fetching, with a random node id. A piece a
//! peer holds is fetched from that peer; a piece nobody holds or fetches goes to the origin,
//! split among the nodes assembling the file by rendezvous hash ([`plan`]). The published hash
//! is computed in file order as pieces arrive ([`prefix`]); when all pieces are there the
//! whole file is checked against it; on a mismatch the pieces
//! that came from peers are dropped, those peers are banned for this file, and the pieces are
//! fetched from the origin instead.
//!
//! An origin is anything that serves byte ranges of a file ([`RangeOrigin`]).

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use std::{future::Future, path::PathBuf};

use mesh_proto::Hash;
use tokio::{
    sync::{mpsc, watch},
    task::{AbortHandle, JoinSet},
};
use tracing::{debug, warn};

mod plan;
mod prefix;

use self::{
    plan::{OriginPlan, Piece},
    prefix::PrefixHash,
};
use crate::{
    discovery::Connections,
    store::{
        digest::Published,
        pieces::{piece_bounds, piece_count, PieceFile},
    },
    transfer::pieces::{get_piece, subscribe, PieceError, PieceNews},
};

/// Pieces in flight to one peer.
const PEER_REQUESTS: usize = 4;
/// Range requests in flight to the origin from one node, at most ...
const ORIGIN_REQUESTS: usize = 4;
/// ... and from the whole fleet assembling a file (each node asks for at least one). The
/// pieces in flight share the uplink and land together at the end: each of them must then
/// still cross the LAN to every other node. Fewer at once keep that last wave small (8 nodes
/// with 4 each left 32 MiB to relay after the Hub's last byte, 1.0 s on a 400 Mbit LAN).
const FLEET_ORIGIN_REQUESTS: usize = 4;
/// How long a peer may take to send one piece before it is asked elsewhere.
const PEER_PIECE_TIMEOUT: Duration = Duration::from_secs(30);
/// Wait this long for other nodes to announce themselves before the first origin request.
const SETTLE: Duration = Duration::from_millis(200);
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

enum Event<E> {
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
    FromOrigin {
        piece: usize,
        result: Result<Vec<u8>, E>,
    },
}

/// A place outside the mesh that serves byte ranges of one file (a HuggingFace file at a
/// commit, a registry blob).
pub trait RangeOrigin: Clone + Send + Sync + 'static {
    /// Why a range failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The file's bytes `start..start + len`.
    fn fetch_range(
        &self,
        start: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<u8>, Self::Error>> + Send;
}

/// The file being assembled, as its publisher describes it.
#[derive(Clone, Debug)]
pub struct OriginFile {
    /// Its name, for logs and errors.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// The hash it must match.
    pub published: Published,
}

/// Why assembling a file failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SplitError<E> {
    /// The origin failed.
    #[error(transparent)]
    Origin(E),
    /// Local file I/O.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The assembled bytes (all from the origin) do not match the published hash.
    #[error(
        "{name} does not match its published hash (expected {expected}, got {actual}); discarded"
    )]
    Mismatch {
        /// The file.
        name: String,
        /// The published hash.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
}

/// Where the bytes of an assembled file came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assembled {
    /// Bytes from the origin, in this run.
    pub from_origin: u64,
    /// Bytes from peers, in this run.
    pub from_peers: u64,
    /// The peers that sent pieces, in this run.
    pub peers: BTreeSet<SocketAddr>,
    /// The file's BLAKE3 root and outboard (a temporary file), built as the pieces came;
    /// `None`: hash the file whole.
    pub outboard: Option<(Hash, PathBuf)>,
}

/// Assembles `file` into `partial` from peers and `origin`, then checks it against its
/// published hash.
pub async fn download<O: RangeOrigin>(
    origin: &O,
    file: &OriginFile,
    partial: Arc<PieceFile>,
    mut conns: watch::Receiver<Connections>,
    progress: Arc<AtomicU64>,
) -> Result<Assembled, SplitError<O::Error>> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut assembly = Assembly::new(origin, file, partial, tx);
    let mut retry_subs = tokio::time::interval(RESUBSCRIBE);
    assembly.sync(&conns.borrow_and_update().clone());
    loop {
        progress.store(assembly.bytes_here(), Ordering::Relaxed);
        if let Some(done) = assembly.check_if_whole().await {
            return done;
        }
        assembly.assign(&conns.borrow().clone());
        tokio::select! {
            Some(event) = rx.recv() => assembly.handle(event).await?,
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
struct Assembly<'a, O: RangeOrigin> {
    origin: &'a O,
    file: &'a OriginFile,
    partial: Arc<PieceFile>,
    pieces: usize,
    events: mpsc::UnboundedSender<Event<O::Error>>,
    peers: HashMap<SocketAddr, PeerView>,
    /// Subscription tasks, by peer.
    subs: HashMap<SocketAddr, AbortHandle>,
    tasks: JoinSet<()>,
    started: Instant,
    origin_in_flight: usize,
    in_flight: HashSet<usize>,
    from_origin: u64,
    /// Bytes that came from peers.
    from_peers: u64,
    /// The peers those bytes came from.
    peers_used: BTreeSet<SocketAddr>,
    /// Which pieces to ask the origin for.
    plan: OriginPlan,
    /// The published hash over the pieces here so far, in file order.
    prefix: PrefixHash,
}

impl<'a, O: RangeOrigin> Assembly<'a, O> {
    fn new(
        origin: &'a O,
        file: &'a OriginFile,
        partial: Arc<PieceFile>,
        events: mpsc::UnboundedSender<Event<O::Error>>,
    ) -> Self {
        let pieces = piece_count(file.size);
        let plan = OriginPlan::new(partial.node(), pieces);
        let prefix = PrefixHash::new(&file.published, &partial);
        Self {
            origin,
            file,
            partial,
            pieces,
            events,
            peers: HashMap::new(),
            subs: HashMap::new(),
            tasks: JoinSet::new(),
            started: Instant::now(),
            origin_in_flight: 0,
            in_flight: HashSet::new(),
            from_origin: 0,
            from_peers: 0,
            peers_used: BTreeSet::new(),
            plan,
            prefix,
        }
    }

    /// Subscribes to peers we don't follow yet, and forgets peers that left.
    fn sync(&mut self, conns: &Connections) {
        for (addr, conn) in conns {
            if self.subs.contains_key(addr) {
                continue;
            }
            let (conn, peer, events) = (conn.clone(), *addr, self.events.clone());
            let (etag, size) = (self.partial.etag().to_string(), self.file.size);
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
        self.partial.bytes_here()
    }

    /// Hashes what arrived in order; when every piece is here, checks the file against its
    /// published hash. `None` while pieces are missing or a mismatch sent us back for pieces
    /// from the origin.
    async fn check_if_whole(&mut self) -> Option<Result<Assembled, SplitError<O::Error>>> {
        let io_error = |source, partial: &PieceFile| {
            let path = partial.path().to_path_buf();
            Some(Err(SplitError::Io { path, source }))
        };
        if let Err(e) = self.prefix.advance(&self.partial, false).await {
            return io_error(e, &self.partial);
        }
        let whole = self.partial.state().have.iter().all(|h| *h);
        if !whole || !self.in_flight.is_empty() {
            return None;
        }
        let hashing = Instant::now();
        if let Err(e) = self.prefix.advance(&self.partial, true).await {
            return io_error(e, &self.partial);
        }
        let (digest, outboard) = self
            .prefix
            .finish()
            .expect("every piece is here and hashed");
        debug!(file = %self.file.name, seconds = hashing.elapsed().as_secs_f64(), "every piece here; the rest hashed and checked against the published hash");
        if digest == self.file.published.hex() {
            return Some(Ok(Assembled {
                from_origin: self.from_origin,
                from_peers: self.from_peers,
                peers: std::mem::take(&mut self.peers_used),
                outboard: prefix::finish_outboard(outboard),
            }));
        }
        drop(outboard);
        let culprits = self.partial.drop_pieces_from_peers();
        if let Err(source) = self.partial.checkpoint() {
            let path = self.partial.path().to_path_buf();
            return Some(Err(SplitError::Io { path, source }));
        }
        if culprits.is_empty() {
            return Some(Err(SplitError::Mismatch {
                name: self.file.name.clone(),
                expected: self.file.published.hex().to_string(),
                actual: digest,
            }));
        }
        warn!(file = %self.file.name, ?culprits, "assembled file does not match its published hash: dropping pieces from peers and banning them");
        for c in culprits {
            if let Some(view) = self.peers.get_mut(&c) {
                view.banned = true;
            }
        }
        None
    }

    /// Starts fetching every piece we may fetch now: from a peer that has it, else from the
    /// origin, as the [`plan`] says.
    fn assign(&mut self, conns: &Connections) {
        let have = self.partial.state().have;
        for (p, &held) in have.iter().enumerate() {
            if held || self.in_flight.contains(&p) {
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
            }
        }
        let usable = || self.peers.values().filter(|v| !v.banned);
        let ids: Vec<u64> = usable().map(|v| v.node).filter(|&n| n != 0).collect();
        let per_node = (FLEET_ORIGIN_REQUESTS / (ids.len() + 1)).clamp(1, ORIGIN_REQUESTS);
        let slots = per_node.saturating_sub(self.origin_in_flight);
        if slots == 0 {
            return;
        }
        let views: Vec<Piece> = (0..self.pieces)
            .map(|p| Piece {
                ours: have[p] || self.in_flight.contains(&p),
                elsewhere: usable().any(|v| v.have.contains(&p) || v.pending.contains(&p)),
            })
            .collect();
        let settled = self.started.elapsed() >= SETTLE;
        let urgent = self.partial.urgent();
        let now = Instant::now();
        let next = (self.plan).next(&views, ids, urgent, settled, slots, per_node, now);
        for p in next {
            let (rank, owner) = self.plan.rank(p);
            debug!(piece = p, rank, owner, me = self.partial.node(), file = %self.file.name, "asking the origin");
            self.ask_origin(p);
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
            let result = match tokio::time::timeout(
                PEER_PIECE_TIMEOUT,
                get_piece(&conn, &etag, piece),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(PieceError::Stalled { peer, piece }),
            };
            let _ = events.send(Event::FromPeer {
                piece,
                peer,
                result,
            });
        });
    }

    fn ask_origin(&mut self, piece: usize) {
        self.origin_in_flight += 1;
        self.in_flight.insert(piece);
        self.partial.set_pending(piece, true);
        let events = self.events.clone();
        let origin = self.origin.clone();
        let (start, len) = piece_bounds(self.file.size, piece);
        self.tasks.spawn(async move {
            let result = origin.fetch_range(start, len).await;
            let _ = events.send(Event::FromOrigin { piece, result });
        });
    }

    async fn handle(&mut self, event: Event<O::Error>) -> Result<(), SplitError<O::Error>> {
        match event {
            Event::Have { peer, news } => {
                debug!(%peer, file = %self.file.name, have = news.have.len(), pending = news.pending.len(), "piece news");
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
                    Ok(bytes) => {
                        self.from_peers += bytes.len() as u64;
                        self.peers_used.insert(peer);
                        self.store(piece, bytes, Some(peer)).await?;
                    }
                    Err(e) => {
                        debug!(piece, %peer, "piece failed: {e}");
                        self.partial.set_pending(piece, false);
                        if let Some(v) = self.peers.get_mut(&peer) {
                            v.have.remove(&piece);
                        }
                    }
                }
            }
            Event::FromOrigin { piece, result } => {
                self.in_flight.remove(&piece);
                self.origin_in_flight -= 1;
                let bytes = result.map_err(|e| {
                    self.partial.set_pending(piece, false);
                    SplitError::Origin(e)
                })?;
                self.from_origin += bytes.len() as u64;
                self.store(piece, bytes, None).await?;
            }
        }
        Ok(())
    }

    /// Writes a piece (off the async threads: a checkpoint syncs the file).
    async fn store(
        &self,
        piece: usize,
        bytes: Vec<u8>,
        from: Option<SocketAddr>,
    ) -> Result<(), SplitError<O::Error>> {
        let partial = self.partial.clone();
        tokio::task::spawn_blocking(move || partial.store_piece(piece, &bytes, from))
            .await
            .expect("piece write panicked")
            .map_err(|source| SplitError::Io {
                path: self.partial.path().to_path_buf(),
                source,
            })
    }
}
