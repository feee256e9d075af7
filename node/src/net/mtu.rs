//! How large a datagram MTU discovery looks for on one connection: up to what the local route
//! to the peer carries where that is more than Ethernet's 1,500 bytes (8,972 bytes on a
//! jumbo-frame LAN, [`MAX_DATAGRAM`] on loopback), quinn's default (1,452) otherwise.
//!
//! Per packet quinn builds, encrypts and acknowledges the same whatever its size, so bigger
//! datagrams cut the CPU per byte where the path has room. Where it has none, every size above
//! the path's is probed three times and lost before discovery gives up on it, each loss found
//! by a timeout: on a 1,500-byte LAN an idle fleet of 32 paid for that in CPU. The interface
//! MTU the kernel routes the peer through tells the two apart before the first probe.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
};

/// The largest UDP payload MTU discovery looks for, on any route: what one datagram can carry
/// ([`super::udp::MAX_SEND`]). Loopback's MTU allows it; a jumbo-frame LAN stops discovery at
/// its own MTU first.
pub(super) const MAX_DATAGRAM: u16 = super::udp::MAX_SEND as u16;

/// The largest IP packet of an Ethernet frame without jumbo frames.
const ETHERNET_MTU: u32 = 1500;

/// Where MTU discovery stops on connections to `peer`: the UDP payload the interface the
/// kernel routes `peer` through carries (its MTU less the IP and UDP headers), if that
/// interface carries more than Ethernet's 1,500 bytes; `None` (quinn's default, 1,452)
/// otherwise, or if the route cannot be read.
pub(super) fn datagram_bound(peer: SocketAddr) -> Option<u16> {
    let mtu = route_mtu(peer).filter(|&mtu| mtu > ETHERNET_MTU)?;
    let headers = if peer.is_ipv4() { 20 + 8 } else { 40 + 8 };
    let payload = mtu.saturating_sub(headers).min(u32::from(MAX_DATAGRAM));
    Some(u16::try_from(payload).expect("at most MAX_DATAGRAM"))
}

/// The MTU of the interface the kernel routes `peer` through, read from a UDP socket
/// connected to it (no packet is sent), or `None` if it cannot be read.
fn route_mtu(peer: SocketAddr) -> Option<u32> {
    let (local, level, option): (SocketAddr, _, _) = match peer {
        SocketAddr::V4(_) => (
            (Ipv4Addr::UNSPECIFIED, 0).into(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
        ),
        SocketAddr::V6(_) => (
            (Ipv6Addr::UNSPECIFIED, 0).into(),
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU,
        ),
    };
    let socket = UdpSocket::bind(local).ok()?;
    socket.connect(peer).ok()?;
    let mut mtu: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the socket is open for the whole call, and `mtu` and `len` are valid for
    // writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then(|| u32::try_from(mtu).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_a_wide_route() {
        // Loopback's MTU is 65,536 on Linux.
        assert!(route_mtu("127.0.0.1:9".parse().unwrap()).is_some_and(|m| m > 9000));
        assert_eq!(
            datagram_bound("127.0.0.1:9".parse().unwrap()),
            Some(MAX_DATAGRAM)
        );
    }
}
