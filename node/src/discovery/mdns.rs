//! LAN discovery with libp2p mDNS: one source of peer addresses ([`AddrSource::Mdns`]).
//!
//! libp2p's mDNS advertises the swarm's *listen* addresses, and mesh moves data over its own
//! quinn endpoint, not libp2p. So the swarm listens on TCP at the same IP and port number as the
//! node's QUIC (UDP) socket, and a discovered `/ip4/A/tcp/P` means "dial QUIC at A:P". Nothing
//! is ever dialed over that TCP listener; it exists so mDNS has an address to announce.
//!
//! The query interval is 60 s (every node answers every query, so the traffic grows with the
//! square of the fleet; ARCHITECTURE.md has the idle numbers), the ttl is 3x that, loopback
//! and IPv6 addresses are dropped, and a vanished peer is noticed by its QUIC connection long
//! before mDNS expires it.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use libp2p::{futures::StreamExt, mdns, multiaddr::Protocol, swarm::SwarmEvent, Multiaddr};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{AddrSource, Discovery};

/// mDNS query interval. Responses are multicast, so every node's query refreshes every
/// record for all; at start libp2p probes at 0.5, 1, 2, ... s until a peer answers. A node
/// nobody has seen yet dials the ones it found, and connections dialed to a node count for it
/// ([`super::Peers::accepted`]), so a long interval delays no connection.
///
/// libp2p restarts every node's query timer when an answer arrives, and answers are multicast,
/// so a fleet's timers run in step: each round, the few nodes whose timers fire within a few
/// milliseconds of each other all ask (2 to 5 of 32 in the idle bench), and every node answers
/// each of them. At 32 nodes that is about 4 x 32 answers of 260 bytes reaching every node per
/// round; 30 s made it 1.2 KB/s of each node's downlink.
const QUERY_INTERVAL: Duration = Duration::from_secs(60);
/// mDNS record ttl: three query intervals.
const TTL: Duration = Duration::from_secs(180);

/// Peers seen on the LAN: libp2p peer id (text) -> QUIC address.
type Seen = BTreeMap<String, SocketAddr>;

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// Building the libp2p swarm failed.
    #[error("mdns: {0}")]
    Setup(String),
    /// The TCP announce listener could not bind.
    #[error("mdns: cannot listen on tcp {0}: {1}")]
    Listen(SocketAddr, String),
}

/// Starts mDNS for a node whose QUIC socket is `quic`; the peers it sees go into `discovery`.
pub fn spawn(
    quic: SocketAddr,
    discovery: Discovery,
    cancel: CancellationToken,
) -> Result<(), DiscoveryError> {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .map_err(|e| DiscoveryError::Setup(e.to_string()))?
        .with_behaviour(|key| {
            let config = mdns::Config {
                ttl: TTL,
                query_interval: QUERY_INTERVAL,
                enable_ipv6: false,
            };
            mdns::tokio::Behaviour::new(config, key.public().to_peer_id())
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| DiscoveryError::Setup(e.to_string()))?
        .build();
    let listen: Multiaddr = match quic {
        SocketAddr::V4(v4) => Multiaddr::empty()
            .with(Protocol::Ip4(*v4.ip()))
            .with(Protocol::Tcp(v4.port())),
        SocketAddr::V6(_) => {
            return Err(DiscoveryError::Setup(
                "mDNS discovery needs an IPv4 listen address".into(),
            ))
        }
    };
    swarm
        .listen_on(listen)
        .map_err(|e| DiscoveryError::Listen(quic, e.to_string()))?;
    tokio::spawn(async move {
        let mut seen = Seen::new();
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => break,
                event = swarm.select_next_some() => event,
            };
            match event {
                SwarmEvent::Behaviour(mdns::Event::Discovered(found)) => {
                    for (peer, addr) in found {
                        if let Some(quic) = quic_addr(&addr) {
                            if seen.insert(peer.to_string(), quic).is_none() {
                                info!(%quic, "discovered peer");
                            }
                        }
                    }
                }
                SwarmEvent::Behaviour(mdns::Event::Expired(gone)) => {
                    for (peer, addr) in gone {
                        if quic_addr(&addr).is_some() && seen.remove(&peer.to_string()).is_some() {
                            debug!(%addr, "mdns record expired");
                        }
                    }
                }
                SwarmEvent::ListenerError { error, .. } => {
                    warn!("mdns listener: {error}");
                    continue;
                }
                _ => continue,
            }
            discovery.set(AddrSource::Mdns, seen.values().copied().collect());
        }
    });
    Ok(())
}

/// `/ip4/A/tcp/P` -> `A:P`, dropping loopback and anything else.
fn quic_addr(addr: &Multiaddr) -> Option<SocketAddr> {
    let mut parts = addr.iter();
    let ip = match parts.next()? {
        Protocol::Ip4(ip) if !ip.is_loopback() && !ip.is_unspecified() => ip,
        _ => return None,
    };
    match parts.next()? {
        Protocol::Tcp(port) => Some(SocketAddr::from((ip, port))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lan_ipv4_tcp_addresses_map_to_quic() {
        let ok: Multiaddr = "/ip4/10.77.0.3/tcp/7341".parse().unwrap();
        assert_eq!(quic_addr(&ok), Some("10.77.0.3:7341".parse().unwrap()));
        for bad in [
            "/ip4/127.0.0.1/tcp/7341",
            "/ip6/::1/tcp/1",
            "/ip4/10.0.0.1/udp/1/quic-v1",
        ] {
            assert_eq!(quic_addr(&bad.parse().unwrap()), None, "{bad}");
        }
    }
}
