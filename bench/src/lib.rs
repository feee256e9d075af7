//! Shared pieces of mesh's benchmarks: test files, CPU accounting for child processes, and
//! the plain-TCP and raw-QUIC baselines.

use std::{
    io::{Read, Write},
    path::Path,
    time::Instant,
};

use anyhow::{Context, Result};

mod quic;
pub use quic::{quic_get, quic_serve};

/// Writes `size` bytes of incompressible test data to `path` without holding it in memory.
pub fn make_file(path: &Path, size: u64) -> Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let block = 64 << 20;
    let mut written = 0;
    let mut seed = 1;
    while written < size {
        let n = block.min(size - written);
        file.write_all(&mesh_tests::util::test_bytes(n, seed))?;
        written += n;
        seed += 1;
    }
    file.flush()?;
    Ok(())
}

/// CPU seconds (user + system) a running process has used so far.
pub fn proc_cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)` part; utime and stime are fields 14 and 15 overall.
    let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / clk_tck())
}

/// Waits for `child` and returns its exit status, CPU seconds (user + system) and peak RSS in
/// bytes. CPU comes from the kernel's accounting of that one process; the peak RSS is its
/// `VmHWM`, read every 50 ms until it exits (the kernel's `ru_maxrss` would include the RSS
/// this process had when it forked the child).
pub fn wait_measured(
    child: &mut std::process::Child,
) -> Result<(std::process::ExitStatus, f64, u64)> {
    use std::os::unix::process::ExitStatusExt;
    let pid = child.id();
    let mut peak = 0;
    loop {
        if let Ok(hwm) = proc_peak_rss(pid) {
            peak = peak.max(hwm);
        }
        // SAFETY: waitid writes only the struct we pass; WNOWAIT leaves the child unreaped.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is set by waitid when a child changed state (0 otherwise).
        if rc < 0 || unsafe { info.si_pid() } != 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut status = 0;
    // SAFETY: wait4 writes only the status and the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let cpu = tv(usage.ru_utime) + tv(usage.ru_stime);
    Ok((std::process::ExitStatus::from_raw(status), cpu, peak))
}

/// The peak RSS of a running process so far (`VmHWM`), in bytes.
pub fn proc_peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

/// Makes a sparse file of `size` bytes (all zeros, no disk blocks): `mesh add` hashes it in
/// place, so the biggest files cost only the receiver's copy.
pub fn make_sparse_file(path: &Path, size: u64) -> Result<()> {
    std::fs::File::create(path)?.set_len(size)?;
    Ok(())
}

/// CPU seconds used by all waited-for children of this process.
pub fn children_cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// The BLAKE3 hash of a file, for checking copies.
pub fn file_hash(path: &Path) -> Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(path)?;
    Ok(hasher.finalize())
}

/// Serves `file` to one TCP client on `addr`, then exits (the plain-copy baseline's sender).
pub fn tcp_serve(file: &Path, addr: &str) -> Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    let (mut stream, _) = listener.accept()?;
    let mut f = std::fs::File::open(file)?;
    std::io::copy(&mut f, &mut stream)?;
    Ok(())
}

/// Fetches from a [`tcp_serve`] into `out` and fsyncs it, printing the seconds taken.
pub fn tcp_get(addr: &str, out: &Path) -> Result<()> {
    let start = Instant::now();
    let mut stream = connect_retry(addr)?;
    let mut f = std::fs::File::create(out)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        f.write_all(&buf[..n])?;
    }
    f.sync_all()?;
    println!("{:.3}", start.elapsed().as_secs_f64());
    Ok(())
}

fn connect_retry(addr: &str) -> Result<std::net::TcpStream> {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match std::net::TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}
