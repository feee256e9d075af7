//! The raw-QUIC baseline: one file over one QUIC stream between two processes, with mesh's own
//! endpoint ([`mesh_node::net::Net`]: the same TLS, transport settings and socket buffers) and
//! nothing of mesh above it (no BLAKE3, no bao encoding, no requests, no store). What mesh
//! costs above this is mesh's; what this costs above a TCP copy is QUIC's (as quinn does it).

use std::{io::Write, path::Path, time::Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use mesh_node::net::Net;

/// Bytes read from the file and handed to quinn per call.
const CHUNK: usize = 1 << 20;

fn identity() -> Result<Vec<u8>> {
    Ok(rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?.serialize_der())
}

/// Serves `file` once, on one stream of the first connection to `addr`.
pub fn quic_serve(file: &Path, addr: &str) -> Result<()> {
    // A multi-threaded runtime, as a node has; file I/O blocks in place.
    tokio::runtime::Runtime::new()?.block_on(async {
        let net = Net::bind(addr.parse()?, &identity()?, None, true)?;
        let incoming = net.endpoint().accept().await.context("endpoint closed")?;
        let conn = net.accept(incoming).await?;
        net.authenticate(&conn).await?;
        let (mut send, _recv) = conn.open_bi().await?;
        let file = std::fs::File::open(file)?;
        let mut offset = 0;
        loop {
            let chunk = {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; CHUNK];
                let n = tokio::task::block_in_place(|| file.read_at(&mut buf, offset))?;
                buf.truncate(n);
                buf
            };
            if chunk.is_empty() {
                break;
            }
            offset += chunk.len() as u64;
            send.write_chunk(Bytes::from(chunk)).await?;
        }
        send.finish()?;
        // Wait until the receiver has everything (it closes the connection).
        conn.closed().await;
        Ok(())
    })
}

/// Fetches from a [`quic_serve`] into `out` and fsyncs it, printing the seconds taken.
pub fn quic_get(addr: &str, out: &Path) -> Result<()> {
    // A multi-threaded runtime, as a node has; file I/O blocks in place.
    tokio::runtime::Runtime::new()?.block_on(async {
        let net = Net::bind("0.0.0.0:0".parse()?, &identity()?, None, false)?;
        let start = Instant::now();
        let conn = connect_retry(&net, addr.parse()?).await?;
        let (_send, mut recv) = conn.accept_bi().await?;
        let mut f = std::fs::File::create(out)?;
        let mut chunks = vec![Bytes::new(); 32];
        while let Some(n) = recv.read_chunks(&mut chunks).await? {
            tokio::task::block_in_place(|| {
                chunks[..n].iter().try_for_each(|chunk| f.write_all(chunk))
            })?;
        }
        f.sync_all()?;
        conn.close(0u32.into(), b"done");
        println!("{:.3}", start.elapsed().as_secs_f64());
        Ok(())
    })
}

async fn connect_retry(net: &Net, addr: std::net::SocketAddr) -> Result<quinn::Connection> {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match net.connect(addr).await {
            Ok(conn) => return Ok(conn),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}
