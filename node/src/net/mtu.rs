//! How large a datagram MTU discovery looks for on one connection: up to [`MAX_DATAGRAM`]
//! where the local route to the peer carries more than Ethernet's 1,500 bytes (jumbo frames,
//! loopback), quinn's default (1,452) otherwise.
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

/// The largest UDP payload MTU discovery looks for. It stays under a 9,000-byte jumbo frame,
/// and ten of them (what quinn 0.11 puts in one GSO send) under the kernel's 64 KiB limit: a
/// larger send fails with `EMSGSIZE`, quinn-udp drops it silently, and the connection crawls
/// on retransmissions (8,972 took a 512 MiB loopback fetch 2.8-3.4 s, 6,500 1.7 s).
pub(super) const MAX_DATAGRAM: u16 = 6500;

/// The largest IP packet of an Ethernet frame without jumbo frames.
const ETHERNET_MTU: u32 = 1500;

/// Whether connections to `peer` look for datagrams beyond Ethernet's size.
pub(super) fn wide_route(peer: SocketAddr) -> bool {
    route_mtu(peer).is_some_and(|mtu| mtu > ETHERNET_MTU)
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
        assert!(wide_route("127.0.0.1:9".parse().unwrap()));
    }
}
