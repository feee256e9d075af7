//! The QUIC endpoint and the membership handshake every connection starts with.
//!
//! [`Net`] owns one quinn endpoint that both dials and accepts. [`Net::connect`] returns a
//! connection only after both sides proved they hold the same mesh key; [`Net::authenticate`]
//! is the accepting side of that. Frame helpers for the request streams live here too.

mod mtu;
mod tls;
mod udp;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use mesh_proto::wire::{
    self, decode_body, encode_frame, frame_len, Hello, Role, CLOSE_AUTH_FAILED, CLOSE_PROTOCOL,
    EXPORTER_BYTES, EXPORTER_LABEL,
};
use serde::{de::DeserializeOwned, Serialize};

/// How long a dial (QUIC handshake plus membership proof) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a refused dialer has to acknowledge the refusal before we close ([`refuse`]).
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Keep-alive interval: 3 s short of [`IDLE_TIMEOUT`], time for about six retries of a lost
/// PING (quinn's probe timeout starts near 30 ms on a LAN and doubles). Only the dialing side
/// sends them: quinn sends one when nothing arrived for this long, so busy connections carry
/// none, and an idle pair exchanges one PING and its ACK per interval. With both sides
/// pinging, their timers fell into step (each restarts on the other's ACK) and an idle pair
/// sent three or four packets per round instead of two. An idle node's CPU is mostly these
/// wake-ups: at 32 peers, about 23 thread wake-ups a second with a 5 s interval.
const KEEP_ALIVE: Duration = Duration::from_secs(7);
/// A connection with no traffic (not even keep-alives) for this long is closed: this is how
/// long a dead peer goes unnoticed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent request streams a peer may open on one connection.
const MAX_STREAMS: u32 = 1024;
/// Per-stream receive window: enough for one stream to fill a 10 Gbit link at 1 ms RTT. The
/// connection's window (tuned, see [`tune_receive_windows`]) is what binds.
const STREAM_WINDOW: u32 = 8 << 20;
/// Packets a peer may receive before it must acknowledge them (it also acknowledges on a timer
/// of about one round trip). With QUIC's default of 2, ACK-only packets for what a node uploads
/// took 1.1% of its downlink in the swarm benchmark; with 9, 0.6%.
const ACK_EVERY: u32 = 9;
/// UDP socket buffer asked for each way.
const SOCKET_BUFFER: usize = 8 << 20;
/// Per-connection send buffer.
const SEND_WINDOW: u32 = 32 << 20;
/// The receive window a connection starts with and never goes below.
const MIN_RECEIVE_WINDOW: u32 = 48 << 10;
/// The most a connection's receive window grows to.
const MAX_RECEIVE_WINDOW: u32 = 32 << 20;
/// How much of a connection's receive rate its receive window covers.
const RECEIVE_WINDOW_TIME: Duration = Duration::from_millis(25);
/// How often receive windows follow the measured rate.
const WINDOW_TUNE_EVERY: Duration = Duration::from_millis(250);
/// How often they are looked at while no connection receives anything.
const WINDOW_TUNE_IDLE: Duration = Duration::from_secs(1);
/// How soon after a connection is added its rate is first sampled. Until then it has
/// [`MIN_RECEIVE_WINDOW`], which holds a fast link to a fraction of its rate: waiting for the
/// next regular look (up to [`WINDOW_TUNE_IDLE`] away) cost a 512 MiB loopback copy about a
/// second.
const WINDOW_FIRST_SAMPLE: Duration = Duration::from_millis(25);

/// quinn send priority of the streams that carry news and requests rather than data: a
/// holdings frame or a block request goes out ahead of the block data queued on the same
/// connection, which on a congested uplink can take seconds to drain, and peers decide on it.
pub const CONTROL_PRIORITY: i32 = 1;

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// No answer within [`CONNECT_TIMEOUT`].
    #[error("peer {0} is unreachable (no answer in 5 s)")]
    Unreachable(SocketAddr),
    /// The peer does not hold our mesh key (or we don't hold its).
    #[error("peer {0} refused us: wrong mesh key (set the same MESH_KEY on both nodes)")]
    WrongKey(SocketAddr),
    /// QUIC or TLS failed.
    #[error("peer {addr}: {source}")]
    Connection {
        /// The peer.
        addr: SocketAddr,
        /// The error.
        source: quinn::ConnectionError,
    },
    /// The peer broke the handshake protocol.
    #[error("peer {addr}: protocol error: {why}")]
    Protocol {
        /// The peer.
        addr: SocketAddr,
        /// What went wrong.
        why: String,
    },
}

/// Why a stream frame could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// Reading failed (including a stream the peer reset).
    #[error("read: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// Writing failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// The frame was malformed or too large.
    #[error(transparent)]
    Frame(#[from] wire::FrameError),
    /// The stream was already finished.
    #[error("stream closed")]
    Closed,
}

impl StreamError {
    /// A stream that could not be opened because the connection failed.
    pub fn from_connection(e: quinn::ConnectionError) -> Self {
        Self::Read(quinn::ReadExactError::ReadError(e.into()))
    }
}

/// Failed endpoint set-up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// TLS configuration (usually a bad identity key).
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// Binding the UDP socket.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// One QUIC endpoint for dialing and (optionally) accepting, and the mesh key it proves.
#[derive(Clone, Debug)]
pub struct Net {
    endpoint: quinn::Endpoint,
    mesh_key: Option<Arc<str>>,
    /// Our certificate, to decide which of two connections between the same nodes stays.
    cert: Arc<[u8]>,
    /// The connections whose receive windows follow their rate.
    tuned: Arc<Tuned>,
    /// The endpoint's settings for dialing and accepting, which serve as they are on routes
    /// no wider than Ethernet; on wider ones the transport settings follow the route ([`mtu`]).
    client: quinn::ClientConfig,
    server: Option<quinn::ServerConfig>,
}

/// The connections [`tune_receive_windows`] looks after, and its wake-up for a new one.
#[derive(Debug, Default)]
struct Tuned {
    conns: std::sync::Mutex<Vec<quinn::Connection>>,
    added: tokio::sync::Notify,
}

impl Net {
    /// Binds the endpoint. With `accept` false it only dials.
    pub fn bind(
        addr: SocketAddr,
        key_der: &[u8],
        mesh_key: Option<String>,
        accept: bool,
    ) -> Result<Self, BindError> {
        let tls = tls::configs(key_der)?;
        let client_tls = quinn::crypto::rustls::QuicClientConfig::try_from(tls.client)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_tls));
        client.transport_config(Arc::new(transport_config(None, Some(KEEP_ALIVE))));
        let socket =
            std::net::UdpSocket::bind(addr).map_err(|source| BindError::Bind { addr, source })?;
        size_socket_buffers(&socket);
        let server = if accept {
            let tls = quinn::crypto::rustls::QuicServerConfig::try_from(tls.server)
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            let mut server = quinn::ServerConfig::with_crypto(Arc::new(tls));
            server.transport_config(Arc::new(transport_config(None, None)));
            Some(server)
        } else {
            None
        };
        let runtime = quinn::default_runtime().expect("called inside a tokio runtime");
        let socket = runtime
            .wrap_udp_socket(socket)
            .map_err(|source| BindError::Bind { addr, source })?;
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config
            .max_udp_payload_size(mtu::MAX_DATAGRAM)
            .expect("a UDP payload size quinn accepts");
        let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            server.clone(),
            udp::SplitSends::new(socket),
            runtime,
        )
        .map_err(|source| BindError::Bind { addr, source })?;
        endpoint.set_default_client_config(client.clone());
        let tuned = Arc::default();
        tokio::spawn(tune_receive_windows(Arc::downgrade(&tuned)));
        Ok(Self {
            endpoint,
            mesh_key: mesh_key.map(Arc::from),
            cert: tls.cert.into(),
            tuned,
            client,
            server,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("a bound endpoint has an address")
    }

    /// The underlying endpoint, for accepting.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Dials `addr` and runs the membership handshake.
    pub async fn connect(&self, addr: SocketAddr) -> Result<quinn::Connection, ConnectError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.connect_impl(addr)).await {
            Ok(result) => result,
            Err(_) => Err(ConnectError::Unreachable(addr)),
        }
    }

    /// Accepts an incoming connection, with the wide-route settings where they apply.
    pub async fn accept(
        &self,
        incoming: quinn::Incoming,
    ) -> Result<quinn::Connection, quinn::ConnectionError> {
        // The route's MTU is looked up only by a net that accepts.
        let server = self.server.as_ref();
        let bound = server.and_then(|_| mtu::datagram_bound(incoming.remote_address()));
        match (server, bound) {
            (Some(server), Some(bound)) => {
                let mut config = server.clone();
                config.transport_config(Arc::new(transport_config(Some(bound), None)));
                incoming.accept_with(Arc::new(config))?.await
            }
            _ => incoming.await,
        }
    }

    async fn connect_impl(&self, addr: SocketAddr) -> Result<quinn::Connection, ConnectError> {
        let connecting = if let Some(bound) = mtu::datagram_bound(addr) {
            let mut config = self.client.clone();
            config.transport_config(Arc::new(transport_config(Some(bound), Some(KEEP_ALIVE))));
            self.endpoint.connect_with(config, addr, "mesh")
        } else {
            self.endpoint.connect(addr, "mesh")
        }
        .map_err(|e| ConnectError::Protocol {
            addr,
            why: e.to_string(),
        })?;
        let conn = connecting
            .await
            .map_err(|source| map_conn_error(addr, source))?;
        let protocol = |why: String| ConnectError::Protocol { addr, why };
        let exporter = exporter(&conn).map_err(|_| protocol("no TLS exporter".into()))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|source| map_conn_error(addr, source))?;
        let hello = Hello {
            version: wire::VERSION,
            proof: wire::membership_proof(self.mesh_key.as_deref(), &exporter, Role::Dialer),
        };
        let reply: Result<Hello, StreamError> = async {
            write_frame(&mut send, &hello).await?;
            send.finish().map_err(|_| StreamError::Closed)?;
            read_frame(&mut recv).await
        }
        .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => {
                if let Some(reason) = conn.close_reason() {
                    return Err(map_conn_error(addr, reason));
                }
                return Err(protocol(e.to_string()));
            }
        };
        if !wire::verify_proof(
            self.mesh_key.as_deref(),
            &exporter,
            Role::Listener,
            &reply.proof,
        ) {
            conn.close(CLOSE_AUTH_FAILED.into(), b"wrong mesh key");
            return Err(ConnectError::WrongKey(addr));
        }
        self.tune(&conn);
        Ok(conn)
    }

    /// The accepting side of the handshake: reads the dialer's proof and answers with ours, or
    /// turns the dialer away ([`refuse`]). No request is read before this succeeds.
    pub async fn authenticate(&self, conn: &quinn::Connection) -> Result<(), ConnectError> {
        let addr = conn.remote_address();
        let protocol = |why: String| ConnectError::Protocol { addr, why };
        let run = async {
            let exporter = exporter(conn).map_err(|_| protocol("no TLS exporter".into()))?;
            let (mut send, mut recv) = conn
                .accept_bi()
                .await
                .map_err(|source| map_conn_error(addr, source))?;
            let hello: Hello = read_frame(&mut recv)
                .await
                .map_err(|e| protocol(e.to_string()))?;
            if !wire::verify_proof(
                self.mesh_key.as_deref(),
                &exporter,
                Role::Dialer,
                &hello.proof,
            ) {
                refuse(conn, send).await;
                return Err(ConnectError::WrongKey(addr));
            }
            let reply = Hello {
                version: wire::VERSION,
                proof: wire::membership_proof(self.mesh_key.as_deref(), &exporter, Role::Listener),
            };
            write_frame(&mut send, &reply)
                .await
                .map_err(|e| protocol(e.to_string()))?;
            send.finish().map_err(|e| protocol(e.to_string()))?;
            Ok(())
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, run).await {
            Ok(Ok(())) => {
                self.tune(conn);
                Ok(())
            }
            Ok(Err(e)) => {
                if matches!(e, ConnectError::Protocol { .. }) {
                    conn.close(CLOSE_PROTOCOL.into(), b"bad handshake");
                }
                Err(e)
            }
            Err(_) => {
                conn.close(CLOSE_PROTOCOL.into(), b"handshake timeout");
                Err(ConnectError::Unreachable(addr))
            }
        }
    }

    fn tune(&self, conn: &quinn::Connection) {
        self.tuned
            .conns
            .lock()
            .expect("tuned connections lock poisoned")
            .push(conn.clone());
        self.tuned.added.notify_one();
    }

    /// Of two connections between the same two nodes (one dialed by each), whether `conn`
    /// is the one both keep: the one dialed by the node with the smaller certificate. Both
    /// nodes see both certificates, so both decide the same.
    pub fn keeps(&self, conn: &quinn::Connection, dialed_by_us: bool) -> bool {
        let theirs = conn
            .peer_identity()
            .and_then(|id| {
                id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|certs| certs.first().map(|c| c.to_vec()))
            .unwrap_or_default();
        let we_are_smaller = *self.cert < *theirs;
        dialed_by_us == we_are_smaller
    }

    /// Closes every connection with `code` and waits until the peers were told.
    pub async fn close(&self, code: u32) {
        self.endpoint.close(code.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// Turns away a dialer whose proof failed: first in band, with a reply whose proof cannot
/// verify (the dialer then reports the wrong key and closes), then, in the background, with a
/// close once the dialer acknowledged the reply or closed, at most [`REFUSAL_LINGER`] later.
/// The close alone may never leave: quinn 0.11 does not send `CONNECTION_CLOSE` while the
/// congestion window is full (quinn#2785), and our first MTU probe (up to 64 KiB on loopback)
/// can fill it; the dialer then saw a stateless reset ("reset by peer") about one time in
/// twenty.
async fn refuse(conn: &quinn::Connection, mut send: quinn::SendStream) {
    let refusal = Hello {
        version: wire::VERSION,
        proof: [0; 32],
    };
    let close = |conn: &quinn::Connection| conn.close(CLOSE_AUTH_FAILED.into(), b"wrong mesh key");
    if write_frame(&mut send, &refusal).await.is_err() || send.finish().is_err() {
        close(conn);
        return;
    }
    let conn = conn.clone();
    tokio::spawn(async move {
        let delivered = async {
            tokio::select! {
                _ = send.stopped() => {}
                _ = conn.closed() => {}
            }
        };
        let _ = tokio::time::timeout(REFUSAL_LINGER, delivered).await;
        close(&conn);
    });
}

/// Asks for [`SOCKET_BUFFER`] bytes of kernel buffer each way (the kernel caps it at
/// `net.core.rmem_max` / `wmem_max`). The default (about 200 KiB) overflows when a burst of
/// packets arrives while the receiving task is busy: each drop is a loss to QUIC.
fn size_socket_buffers(socket: &std::net::UdpSocket) {
    let sock = socket2::SockRef::from(socket);
    for (what, result) in [
        ("receive", sock.set_recv_buffer_size(SOCKET_BUFFER)),
        ("send", sock.set_send_buffer_size(SOCKET_BUFFER)),
    ] {
        if let Err(e) = result {
            tracing::debug!("cannot size the UDP {what} buffer: {e}");
        }
    }
}

/// The transport settings; `max_datagram` is where MTU discovery stops, quinn's default if
/// `None` ([`mtu`]); `keep_alive` is for the dialing side only ([`KEEP_ALIVE`]).
fn transport_config(
    max_datagram: Option<u16>,
    keep_alive: Option<Duration>,
) -> quinn::TransportConfig {
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(ACK_EVERY.into());
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    if let Some(max) = max_datagram {
        mtu.upper_bound(max);
    }
    let mut config = quinn::TransportConfig::default();
    config
        .mtu_discovery_config(Some(mtu))
        .max_concurrent_bidi_streams(MAX_STREAMS.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(STREAM_WINDOW.into())
        .receive_window(MIN_RECEIVE_WINDOW.into())
        .send_window(SEND_WINDOW.into())
        .ack_frequency_config(Some(acks))
        // Block streams of one priority are sent in the order they were written, not
        // round-robin: each block arrives as soon as it can instead of all of a peer's
        // requests arriving together at the end, and the slow-block duplicates they caused
        // fall (Decisions, "Blocks in order").
        .send_fairness(false)
        .keep_alive_interval(keep_alive)
        .max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .expect("idle timeout fits a QUIC varint"),
        ));
    config
}

/// Keeps each connection's receive window (what the peer may have in flight to us) at
/// [`RECEIVE_WINDOW_TIME`] of what we receive on it, and at least [`MIN_RECEIVE_WINDOW`], until
/// the endpoint is dropped. One task for all connections, ticking every [`WINDOW_TUNE_EVERY`]
/// while any of them received at least [`MIN_RECEIVE_WINDOW`] since the last look, every
/// [`WINDOW_TUNE_IDLE`] while none did (keep-alives are not traffic), and
/// [`WINDOW_FIRST_SAMPLE`] after a connection was added.
///
/// When many peers send to one node, each of them fills its congestion window, and together
/// they overflow the queue in front of that node's downlink (the switch port): drops,
/// retransmissions and halved windows. Bounding what each may have in flight to about
/// [`RECEIVE_WINDOW_TIME`] of its own rate keeps that queue short and loss-free, while a peer
/// that speeds up is granted more within a tick. ARCHITECTURE.md has the measurements.
async fn tune_receive_windows(tuned: std::sync::Weak<Tuned>) {
    // Per connection (by stable id): bytes received at the last look, and the window set.
    let mut seen: std::collections::HashMap<usize, (u64, u64, tokio::time::Instant)> =
        std::collections::HashMap::new();
    let mut wait = WINDOW_TUNE_IDLE;
    loop {
        let Some(tuned) = tuned.upgrade() else {
            return;
        };
        let added = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            _ = tuned.added.notified() => true,
        };
        let now = tokio::time::Instant::now();
        let mut busy = false;
        let mut list = tuned.conns.lock().expect("tuned connections lock poisoned");
        list.retain(|c| c.close_reason().is_none());
        seen.retain(|id, _| list.iter().any(|c| c.stable_id() == *id));
        for conn in list.iter() {
            let received = conn.stats().udp_rx.bytes;
            let (last, window, at) =
                seen.entry(conn.stable_id())
                    .or_insert((received, MIN_RECEIVE_WINDOW.into(), now));
            let secs = now.saturating_duration_since(*at).as_secs_f64().max(1e-3);
            let rate = received.saturating_sub(*last) as f64 / secs;
            // Keep-alives are not traffic: at 32 peers one arrives nearly every second.
            busy |= received.saturating_sub(*last) >= MIN_RECEIVE_WINDOW.into();
            (*last, *at) = (received, now);
            let want = ((rate * RECEIVE_WINDOW_TIME.as_secs_f64()) as u64)
                .clamp(MIN_RECEIVE_WINDOW.into(), MAX_RECEIVE_WINDOW.into());
            if want != *window {
                *window = want;
                conn.set_receive_window(
                    quinn::VarInt::from_u64(want).expect("window fits a varint"),
                );
            }
        }
        wait = if added {
            WINDOW_FIRST_SAMPLE
        } else if busy {
            WINDOW_TUNE_EVERY
        } else {
            WINDOW_TUNE_IDLE
        };
    }
}

fn exporter(
    conn: &quinn::Connection,
) -> Result<[u8; EXPORTER_BYTES], quinn::crypto::ExportKeyingMaterialError> {
    let mut out = [0u8; EXPORTER_BYTES];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")?;
    Ok(out)
}

fn map_conn_error(addr: SocketAddr, source: quinn::ConnectionError) -> ConnectError {
    match &source {
        quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code == CLOSE_AUTH_FAILED.into() =>
        {
            ConnectError::WrongKey(addr)
        }
        quinn::ConnectionError::TimedOut => ConnectError::Unreachable(addr),
        _ => ConnectError::Connection { addr, source },
    }
}

/// Writes one length-prefixed frame.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), StreamError> {
    send.write_all(&encode_frame(msg)).await?;
    Ok(())
}

/// Reads one length-prefixed frame, refusing frames over the size limit.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, StreamError> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await?;
    let mut body = vec![0u8; frame_len(prefix)?];
    recv.read_exact(&mut body).await?;
    Ok(decode_body(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Net {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        Net::bind(addr, &key.serialize_der(), Some("k".into()), true).unwrap()
    }

    /// Accepts one connection on `net` and runs the membership handshake.
    async fn accept(net: &Net) -> quinn::Connection {
        let conn = net.endpoint().accept().await.unwrap().await.unwrap();
        net.authenticate(&conn).await.unwrap();
        conn
    }

    /// Two nodes that dial each other at once hold two connections; both must keep the same
    /// one, or each would close the other's choice and they would end up with none.
    #[tokio::test]
    async fn both_ends_of_a_double_dial_keep_the_same_connection() {
        for _ in 0..4 {
            let (a, b) = (node(), node());
            let (a_to_b, b_from_a) = tokio::join!(a.connect(b.local_addr()), accept(&b));
            let (b_to_a, a_from_b) = tokio::join!(b.connect(a.local_addr()), accept(&a));
            let (a_to_b, b_to_a) = (a_to_b.unwrap(), b_to_a.unwrap());
            // The connection a dialed, as each end sees it.
            let a_keeps_its_dial = a.keeps(&a_to_b, true);
            assert_eq!(a_keeps_its_dial, b.keeps(&b_from_a, false));
            // The one b dialed: kept exactly when a's is not.
            assert_eq!(b.keeps(&b_to_a, true), a.keeps(&a_from_b, false));
            assert_ne!(a_keeps_its_dial, b.keeps(&b_to_a, true));
        }
    }
}
