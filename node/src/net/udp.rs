//! The UDP socket quinn sends through: quinn-udp's own, with one change. A batch of datagrams
//! handed to the kernel in one GSO send may not exceed a UDP datagram's 64 KiB, and quinn 0.11
//! batches up to ten datagrams whatever their size, so on routes whose datagrams exceed 6,553
//! bytes (jumbo frames, loopback) the kernel refuses the send with `EMSGSIZE` and quinn-udp
//! drops it without a word. [`SplitSends`] hands such a batch to the kernel in parts.

use std::{
    fmt,
    io::{self, IoSliceMut},
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use quinn::{
    udp::{RecvMeta, Transmit},
    AsyncUdpSocket, UdpPoller,
};

/// The most UDP payload one send may carry, GSO or not: an IPv4 packet's 65,535 bytes less
/// the IPv4 and UDP headers.
pub(super) const MAX_SEND: usize = 65_535 - 20 - 8;

/// quinn's socket, sending batches larger than [`MAX_SEND`] in parts.
pub(super) struct SplitSends(Arc<dyn AsyncUdpSocket>);

impl SplitSends {
    pub(super) fn new(inner: Arc<dyn AsyncUdpSocket>) -> Arc<Self> {
        Arc::new(Self(inner))
    }
}

impl fmt::Debug for SplitSends {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SplitSends").field(&self.0).finish()
    }
}

impl AsyncUdpSocket for SplitSends {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    /// A batch within [`MAX_SEND`] goes as it is. A larger one goes in parts of as many whole
    /// datagrams as fit. If a part after the first would block, the rest is dropped, as a
    /// full queue on the way would drop it: QUIC retransmits it, and quinn, told the send
    /// would block, would instead resend the parts already sent.
    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let segment = match transmit.segment_size {
            Some(segment) if transmit.contents.len() > MAX_SEND => segment,
            _ => return self.0.try_send(transmit),
        };
        let part_len = MAX_SEND / segment * segment;
        for (i, part) in transmit.contents.chunks(part_len).enumerate() {
            let sent = self.0.try_send(&Transmit {
                contents: part,
                segment_size: (part.len() > segment).then_some(segment),
                ..*transmit
            });
            match sent {
                Err(e) if i > 0 && e.kind() == io::ErrorKind::WouldBlock => {
                    tracing::trace!("dropped the rest of a split send: the socket is full");
                    return Ok(());
                }
                other => other?,
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Ten datagrams of 9,000 bytes (90,000 together) in one send all arrive, each whole.
    #[tokio::test]
    async fn a_send_beyond_64_kib_arrives_in_parts() {
        let receiver = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let runtime = quinn::default_runtime().unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = SplitSends::new(runtime.wrap_udp_socket(sender).unwrap());
        assert!(
            sender.max_transmit_segments() >= 10,
            "this kernel offers no UDP segmentation offload"
        );
        let mut poller = sender.clone().create_io_poller();
        std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
            .await
            .unwrap();
        let contents: Vec<u8> = (0..90_000u32).map(|i| (i / 9_000) as u8).collect();
        sender
            .try_send(&Transmit {
                destination: receiver.local_addr().unwrap(),
                ecn: None,
                contents: &contents,
                segment_size: Some(9_000),
                src_ip: None,
            })
            .unwrap();
        let mut buf = vec![0; 65_536];
        for i in 0..10u8 {
            let recv = tokio::time::timeout(Duration::from_secs(5), receiver.recv(&mut buf));
            let n = recv.await.expect("datagram lost").unwrap();
            assert_eq!(n, 9_000);
            assert!(
                buf[..n].iter().all(|&b| b == i),
                "datagram {i} out of order"
            );
        }
    }
}
