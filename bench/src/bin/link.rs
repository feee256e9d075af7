//! Single-link benchmark: one large file between two `mesh` nodes, on loopback, between two
//! network-namespace hosts on a tbf-shaped link, and between two on an unshaped link with
//! 9,000-byte frames (what a jumbo-frame LAN's datagrams cost, at the CPU's speed), against a
//! plain TCP copy and one raw QUIC stream (mesh's endpoint, nothing of mesh above it)
//! measured in the same run, and a `dd` of the file to a new file on the same disk (what
//! every receiver pays for the page cache). Prints seconds, MB/s and the CPU seconds of both
//! sides.
//!
//! `cargo build --release -p mesh-cli -p mesh-bench && sudo target/release/link`

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use mesh_bench::*;
use mesh_tests::{netlab::NetLab, util::mesh_bin};

#[derive(Parser, Debug)]
struct Opt {
    /// File size in MiB.
    #[arg(long, default_value_t = 512)]
    size_mib: u64,
    /// Link rate for the namespace case (tc syntax).
    #[arg(long, default_value = "1gbit")]
    rate: String,
    /// Skip the namespace cases.
    #[arg(long)]
    loopback_only: bool,
    /// Skip the TCP and QUIC baseline copies (for sizes whose second copy would not fit on the
    /// disk).
    #[arg(long)]
    no_tcp: bool,
    /// A sparse test file (zeros): only the copies take disk space. Use for 16 GiB.
    #[arg(long)]
    sparse: bool,
    /// Work folder (default: a temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    helper: Option<Helper>,
}

/// Roles the benchmark runs inside namespaces (re-executing itself).
#[derive(Subcommand, Debug)]
enum Helper {
    TcpServe { file: PathBuf, addr: String },
    TcpGet { addr: String, out: PathBuf },
    QuicServe { file: PathBuf, addr: String },
    QuicGet { addr: String, out: PathBuf },
}

/// One measured transfer.
struct Row {
    case: String,
    tool: &'static str,
    secs: f64,
    sender_cpu: f64,
    receiver_cpu: f64,
    /// Peak RSS of sender and receiver, for mesh.
    rss: Option<(u64, u64)>,
}

fn main() -> Result<()> {
    let opt = Opt::parse();
    match &opt.helper {
        Some(Helper::TcpServe { file, addr }) => return tcp_serve(file, addr),
        Some(Helper::TcpGet { addr, out }) => return tcp_get(addr, out),
        Some(Helper::QuicServe { file, addr }) => return quic_serve(file, addr),
        Some(Helper::QuicGet { addr, out }) => return quic_get(addr, out),
        None => {}
    }
    let tmp = tempfile::tempdir()?;
    let dir = opt.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let size = opt.size_mib << 20;
    let file = dir.join("weights.bin");
    eprintln!("making a {} MiB test file", opt.size_mib);
    if opt.sparse {
        make_sparse_file(&file, size)?;
    } else {
        make_file(&file, size)?;
    }
    let want = file_hash(&file)?;

    let seed_home = dir.join("seed");
    let t = Instant::now();
    let add = Command::new(mesh_bin())
        .env("MESH_HOME", &seed_home)
        .args(["add"])
        .arg(&file)
        .args(["--name", "bench"])
        .output()?;
    if !add.status.success() {
        bail!("mesh add failed: {}", String::from_utf8_lossy(&add.stderr));
    }
    let add_secs = t.elapsed().as_secs_f64();
    println!(
        "mesh add (BLAKE3 + outboard): {:.2} s, {:.0} MB/s",
        add_secs,
        size as f64 / add_secs / 1e6
    );

    // First, what this disk charges for writing the file's bytes anew (no network). Its copy
    // is then freed, as each case's is before the next, so that every case starts alike.
    let mut rows = vec![local_write(&dir, &file, want)?];
    // Loopback.
    rows.push(run_mesh(
        &dir,
        &seed_home,
        "loopback",
        None,
        None,
        "127.0.0.1",
        "127.0.0.1",
        want,
    )?);
    if !opt.no_tcp {
        for copy in [Copy::Tcp, Copy::Quic] {
            rows.push(run_copy(
                copy,
                &dir,
                &file,
                "loopback",
                None,
                "127.0.0.1",
                want,
            )?);
        }
    }
    if !opt.loopback_only {
        if !mesh_tests::netlab::available() {
            eprintln!("SKIPPED the namespace cases: needs root with ip and tc");
        } else {
            let lab = NetLab::up("mbl", "10.79.0", 2, Some(&opt.rate))?;
            let case = format!("netns {}", opt.rate);
            rows.extend(run_lab_case(
                &opt, &dir, &file, &seed_home, &lab, &case, want,
            )?);
            drop(lab);
            let lab = NetLab::up("mbj", "10.79.1", 2, None)?;
            lab.set_mtu(9000)?;
            let case = "netns 9000 MTU".to_string();
            rows.extend(run_lab_case(
                &opt, &dir, &file, &seed_home, &lab, &case, want,
            )?);
        }
    }
    println!("\n{} MiB, one sender to one receiver", opt.size_mib);
    println!(
        "| case | tool | seconds | MB/s | sender CPU-s | receiver CPU-s | time vs TCP | CPU vs TCP (send / recv) | CPU vs QUIC stream (send / recv) | peak RSS MB (send / recv) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in &rows {
        let baseline = |tool: &str| rows.iter().find(|r| r.case == row.case && r.tool == tool);
        let cpu_ratio = |base: Option<&Row>| {
            base.map(|b| {
                format!(
                    "{:.1}x / {:.1}x",
                    row.sender_cpu / b.sender_cpu,
                    row.receiver_cpu / b.receiver_cpu
                )
            })
            .unwrap_or_default()
        };
        let tcp = baseline(Copy::Tcp.tool());
        println!(
            "| {} | {} | {:.2} | {:.1} | {:.2} | {:.2} | {} | {} | {} | {} |",
            row.case,
            row.tool,
            row.secs,
            size as f64 / row.secs / 1e6,
            row.sender_cpu,
            row.receiver_cpu,
            tcp.map(|t| format!("{:.2}x", row.secs / t.secs))
                .unwrap_or_default(),
            cpu_ratio(tcp),
            cpu_ratio(baseline(Copy::Quic.tool())),
            row.rss
                .map(|(s, r)| format!("{:.0} / {:.0}", s as f64 / 1e6, r as f64 / 1e6))
                .unwrap_or_default(),
        );
    }
    Ok(())
}

/// Mesh, then the TCP and QUIC copies, from host 1 to host 2 of `lab`.
fn run_lab_case(
    opt: &Opt,
    dir: &Path,
    file: &Path,
    seed_home: &Path,
    lab: &NetLab,
    case: &str,
    want: blake3::Hash,
) -> Result<Vec<Row>> {
    let ip = lab.addr(1);
    let mut rows = vec![run_mesh(
        dir,
        seed_home,
        case,
        Some(lab),
        Some(1),
        &ip,
        &ip,
        want,
    )?];
    if !opt.no_tcp {
        for copy in [Copy::Tcp, Copy::Quic] {
            rows.push(run_copy(copy, dir, file, case, Some(lab), &ip, want)?);
        }
    }
    Ok(rows)
}

fn spawn_in(lab: Option<&NetLab>, host: usize, program: &Path) -> Command {
    match lab {
        Some(lab) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &lab.ns(host)]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Writes every dirty page to disk before a case starts, so that no case pays for the
/// writeback of what came before it (the test file, the seed's store, the last case's copy).
fn settle_disk() -> Result<()> {
    let status = Command::new("sync").status()?;
    if !status.success() {
        bail!("sync failed");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_mesh(
    dir: &Path,
    seed_home: &Path,
    case: &str,
    lab: Option<&NetLab>,
    _seed_host: Option<usize>,
    listen_ip: &str,
    dial_ip: &str,
    want: blake3::Hash,
) -> Result<Row> {
    settle_disk()?;
    let _ = std::fs::remove_file(seed_home.join("node.json"));
    let mut seed = spawn_in(lab, 1, &mesh_bin())
        .env("MESH_HOME", seed_home)
        .args([
            "node",
            "--no-mdns",
            "--listen",
            &format!("{listen_ip}:0"),
            "--api",
            "127.0.0.1:0",
        ])
        .stderr(Stdio::null())
        .spawn()?;
    // The port the OS gave the seed (a fixed one may be taken by another node on the box).
    let info = wait_for(&seed_home.join("node.json"), &mut seed)?;
    let port = info["listen"]
        .as_str()
        .and_then(|l| l.rsplit(':').next())
        .context("node.json has no listen address")?
        .to_string();
    let fetch_home = dir.join(format!("fetch-{}", case.replace(' ', "_")));
    let out = dir.join(format!("out-{}", case.replace(' ', "_")));
    let _ = std::fs::remove_dir_all(&fetch_home);
    let _ = std::fs::remove_dir_all(&out);
    let seed_cpu0 = proc_cpu_secs(seed.id())?;
    let t = Instant::now();
    let mut fetch = spawn_in(lab, 2, &mesh_bin())
        .env("MESH_HOME", &fetch_home)
        .args([
            "fetch",
            "bench",
            "--peer",
            &format!("{dial_ip}:{port}"),
            "--to",
        ])
        .arg(&out)
        .stdout(Stdio::null())
        .spawn()?;
    let (status, receiver_cpu, receiver_rss) = wait_measured(&mut fetch)?;
    let secs = t.elapsed().as_secs_f64();
    let sender_cpu = proc_cpu_secs(seed.id())? - seed_cpu0;
    let sender_rss = proc_peak_rss(seed.id())?;
    let _ = seed.kill();
    let _ = seed.wait();
    if !status.success() {
        bail!("mesh fetch failed in case {case}");
    }
    if file_hash(&out.join("weights.bin"))? != want {
        bail!("mesh copy differs in case {case}");
    }
    std::fs::remove_dir_all(&fetch_home)?;
    std::fs::remove_dir_all(&out)?;
    Ok(Row {
        case: case.into(),
        tool: "mesh",
        secs,
        sender_cpu,
        receiver_cpu,
        rss: Some((sender_rss, receiver_rss)),
    })
}

/// `dd` of the file to a new file on the same disk: the page-cache and file-system cost every
/// receiver pays, whatever carried the bytes. On a VM whose freed memory goes back to the host
/// (free page reporting), writing pages it had not touched lately costs many times the copy.
fn local_write(dir: &Path, file: &Path, want: blake3::Hash) -> Result<Row> {
    settle_disk()?;
    let out = dir.join("local.out");
    let cpu0 = children_cpu_secs();
    let t = Instant::now();
    let status = Command::new("dd")
        .arg(format!("if={}", file.display()))
        .arg(format!("of={}", out.display()))
        .args(["bs=1M", "status=none"])
        .status()?;
    let secs = t.elapsed().as_secs_f64();
    let receiver_cpu = children_cpu_secs() - cpu0;
    if !status.success() || file_hash(&out)? != want {
        bail!("dd of the test file failed");
    }
    std::fs::remove_file(&out)?;
    Ok(Row {
        case: "this disk".into(),
        tool: "dd, no network",
        secs,
        sender_cpu: 0.0,
        receiver_cpu,
        rss: None,
    })
}

/// A baseline copy of the same file between the same two hosts.
#[derive(Clone, Copy)]
enum Copy {
    /// `std::io::copy` into a TCP socket.
    Tcp,
    /// One QUIC stream on mesh's own endpoint, nothing of mesh above it.
    Quic,
}

impl Copy {
    fn tool(self) -> &'static str {
        match self {
            Self::Tcp => "tcp copy",
            Self::Quic => "quic stream",
        }
    }

    fn helpers(self) -> (&'static str, &'static str) {
        match self {
            Self::Tcp => ("tcp-serve", "tcp-get"),
            Self::Quic => ("quic-serve", "quic-get"),
        }
    }
}

fn run_copy(
    copy: Copy,
    dir: &Path,
    file: &Path,
    case: &str,
    lab: Option<&NetLab>,
    ip: &str,
    want: blake3::Hash,
) -> Result<Row> {
    settle_disk()?;
    let me = std::env::current_exe()?;
    let addr = format!("{ip}:7399");
    let (serve, get) = copy.helpers();
    let mut server = spawn_in(lab, 1, &me)
        .args([serve])
        .arg(file)
        .arg(&addr)
        .spawn()?;
    let out = dir.join("copy.out");
    let cpu0 = children_cpu_secs();
    let server_cpu0 = proc_cpu_secs(server.id())?;
    let got = spawn_in(lab, 2, &me)
        .args([get, &addr])
        .arg(&out)
        .output()?;
    let receiver_cpu = children_cpu_secs() - cpu0;
    let sender_cpu = proc_cpu_secs(server.id()).unwrap_or(0.0) - server_cpu0;
    let _ = server.wait();
    let tool = copy.tool();
    if !got.status.success() {
        bail!("{tool} failed: {}", String::from_utf8_lossy(&got.stderr));
    }
    let secs: f64 = String::from_utf8_lossy(&got.stdout)
        .trim()
        .parse()
        .with_context(|| format!("{get} output"))?;
    if file_hash(&out)? != want {
        bail!("{tool} differs");
    }
    std::fs::remove_file(&out)?;
    Ok(Row {
        case: case.into(),
        tool,
        secs,
        sender_cpu,
        receiver_cpu,
        rss: None,
    })
}

/// Waits until the node wrote its `node.json`, and returns it.
fn wait_for(path: &Path, child: &mut Child) -> Result<serde_json::Value> {
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Ok(info) = serde_json::from_slice(&std::fs::read(path).unwrap_or_default()) {
            return Ok(info);
        }
        if child.try_wait()?.is_some() || Instant::now() > deadline {
            bail!("mesh node did not start");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
