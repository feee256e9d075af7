//! Swarm benchmark: one seed to N peers on network-namespace hosts with tbf-shaped links,
//! timed for mesh and, in the same run, for BitTorrent (aria2c + opentracker) and one HTTP
//! server (nginx) via `shared/lab/bt_baseline.sh`. Prints seconds until the last peer holds a
//! verified copy, the ratio to the bound F/R, and the mesh fleet's CPU seconds, in all and per GB
//! delivered.
//!
//! `cargo build --release -p mesh-cli -p mesh-bench && target/release/swarm --peers 8`
//! (as root; needs aria2c, opentracker, mktorrent, nginx and b3sum for the baselines).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use mesh_bench::*;
use mesh_tests::{
    netlab::{self, rate_bits, LinkCounters, NetLab},
    util::{mesh_bin, NodeProc},
};

#[derive(Parser, Debug)]
struct Opt {
    /// Peers fetching (hosts = peers + 1 seed).
    #[arg(long, default_value_t = 8)]
    peers: usize,
    /// Per-host link rate, tc syntax.
    #[arg(long, default_value = "50mbit")]
    rate: String,
    /// File size in MiB.
    #[arg(long, default_value_t = 128)]
    size_mib: u64,
    /// Skip the BitTorrent baseline.
    #[arg(long)]
    no_bt: bool,
    /// Skip the HTTP baseline.
    #[arg(long)]
    no_http: bool,
    /// Path to shared/lab (default: ../shared/lab beside the repo).
    #[arg(long)]
    lab: Option<PathBuf>,
    /// `RUST_LOG` for the mesh nodes, e.g. `mesh_node::swarm=debug`.
    #[arg(long)]
    log: Option<String>,
    /// Copy each mesh node's log to `DIR/h{i}.log` (the seed is h1).
    #[arg(long)]
    keep_logs: Option<PathBuf>,
}

const KEY: &str = "bench-swarm-key";

fn main() -> Result<()> {
    let opt = Opt::parse();
    if !netlab::available() {
        bail!("the swarm benchmark needs root with ip and tc");
    }
    let tmp = tempfile::tempdir()?;
    let size = opt.size_mib << 20;
    let file = tmp.path().join("weights.bin");
    make_file(&file, size)?;
    let bound = size as f64 * 8.0 / rate_bits(&opt.rate)? as f64;

    let (mesh_secs, fleet_cpu) = run_mesh(&opt, tmp.path(), &file, size)?;
    let cpu_per_gb = fleet_cpu / ((opt.peers as u64 * size) as f64 / 1e9);
    let lab_dir = opt
        .lab
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/lab"));
    let script = lab_dir.join("bt_baseline.sh");
    let bt = (!opt.no_bt).then(|| baseline(&script, "bt", &opt, &file));
    let http = (!opt.no_http).then(|| baseline(&script, "http", &opt, &file));

    println!(
        "\n{} MiB, 1 seed -> {} peers, {} per host; F/R = {:.1} s",
        opt.size_mib, opt.peers, opt.rate, bound
    );
    println!("| tool | seconds | x F/R | fleet CPU-s | CPU-s per GB delivered |");
    println!("|---|---|---|---|---|");
    println!(
        "| mesh | {:.1} | {:.2} | {:.1} | {:.1} |",
        mesh_secs,
        mesh_secs / bound,
        fleet_cpu,
        cpu_per_gb
    );
    for (name, result) in [("aria2c (BitTorrent)", bt), ("nginx (HTTP)", http)] {
        match result {
            Some(Ok(secs)) => println!("| {name} | {secs:.1} | {:.2} | | |", secs / bound),
            Some(Err(e)) => println!("| {name} | failed: {e:#} | | | |"),
            None => {}
        }
    }
    Ok(())
}

fn run_mesh(opt: &Opt, dir: &Path, file: &Path, size: u64) -> Result<(f64, f64)> {
    let lab = NetLab::up("msw", "10.82.0", opt.peers + 1, Some(&opt.rate))?;
    let seed_home = dir.join("h1");
    let add = Command::new(mesh_bin())
        .env("MESH_HOME", &seed_home)
        .env("MESH_KEY", KEY)
        .arg("add")
        .arg(file)
        .args(["--name", "bench"])
        .output()?;
    if !add.status.success() {
        bail!("mesh add: {}", String::from_utf8_lossy(&add.stderr));
    }
    let env: Vec<(&str, &str)> = opt.log.iter().map(|l| ("RUST_LOG", l.as_str())).collect();
    let mut nodes = Vec::new();
    for i in 1..=opt.peers + 1 {
        nodes.push(NodeProc::start_env(
            &dir.join(format!("h{i}")),
            Some(KEY),
            Some(&lab.ns(i)),
            &lab.addr(i),
            &[],
            &env,
        )?);
    }
    std::thread::sleep(Duration::from_secs(3)); // mDNS settles, as in a running lab
    let links0 = (1..=lab.hosts())
        .map(|i| lab.link_counters(i))
        .collect::<Result<Vec<_>>>()?;
    let cpu0: f64 = nodes
        .iter()
        .map(|n| proc_cpu_secs(n.child.id()).unwrap_or(0.0))
        .sum();
    let child_cpu0 = children_cpu_secs();
    let start = Instant::now();
    let fetches: Vec<_> = nodes[1..]
        .iter()
        .map(|n| n.spawn_fetch_to_out("bench"))
        .collect();
    let mut last = 0.0f64;
    for (i, mut child) in fetches.into_iter().enumerate() {
        let status = child.wait()?;
        let done = start.elapsed().as_secs_f64();
        eprintln!("peer {} done at {done:.1} s", i + 2);
        last = last.max(done);
        if !status.success() {
            let mut err = String::new();
            use std::io::Read;
            child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            bail!("mesh fetch on host {} failed: {err}", i + 2);
        }
    }
    let secs = last;
    let links: Vec<(LinkCounters, LinkCounters)> = (1..=lab.hosts())
        .map(|i| {
            let (up, down) = lab.link_counters(i)?;
            Ok((up - links0[i - 1].0, down - links0[i - 1].1))
        })
        .collect::<Result<_>>()?;
    let cpu: f64 = nodes
        .iter()
        .map(|n| proc_cpu_secs(n.child.id()).unwrap_or(0.0))
        .sum::<f64>()
        - cpu0
        + (children_cpu_secs() - child_cpu0);
    let want = file_hash(file)?;
    for n in &nodes[1..] {
        if file_hash(&n.home.join("out/weights.bin"))? != want {
            bail!("corrupt copy at {}", n.home.display());
        }
    }
    let seed_sent = nodes[0].counter("mesh_bytes_sent_total");
    let dup: u64 = nodes[1..]
        .iter()
        .map(|n| n.counter("mesh_bytes_duplicate_total"))
        .sum();
    let relayed: u64 = nodes[1..]
        .iter()
        .map(|n| n.counter("mesh_bytes_sent_total"))
        .sum();
    let passed_on: u64 = nodes[1..]
        .iter()
        .map(|n| n.counter("mesh_bytes_passed_on_total"))
        .sum();
    let seed_addr = lab.addr(1);
    let from_seed: u64 = nodes[1..]
        .iter()
        .map(|n| received_from(n, &seed_addr))
        .sum::<Result<u64>>()?;
    eprintln!(
        "mesh: seed sent {:.3}x the file (bao-encoded), of which new to its receiver {:.3}x; \
         peers relayed {:.2}x ({:.2}x passed on while still arriving); duplicates received \
         {:.3}x",
        seed_sent as f64 / size as f64,
        from_seed as f64 / size as f64,
        relayed as f64 / size as f64,
        passed_on as f64 / size as f64,
        dup as f64 / size as f64
    );
    if let Some(keep) = &opt.keep_logs {
        std::fs::create_dir_all(keep)?;
        for (i, n) in nodes.iter().enumerate() {
            std::fs::copy(
                n.home.join("node.log"),
                keep.join(format!("h{}.log", i + 1)),
            )?;
        }
    }
    let downs: Vec<f64> = links[1..]
        .iter()
        .map(|(_, down)| down.bytes as f64 / size as f64)
        .collect();
    let up_drops: u64 = links.iter().map(|(up, _)| up.dropped).sum();
    let down_drops: u64 = links.iter().map(|(_, down)| down.dropped).sum();
    eprintln!(
        "mesh on the wire: seed uplink {:.3}x the file; peers' downlinks {:.3}-{:.3}x; \
         packets dropped by the links' queues: {up_drops} going up, {down_drops} coming down",
        links[0].0.bytes as f64 / size as f64,
        downs.iter().copied().fold(f64::INFINITY, f64::min),
        downs.iter().copied().fold(0.0, f64::max),
    );
    drop(nodes);
    drop(lab);
    Ok((secs, cpu))
}

/// Verified new bytes node `n` received from the peer at `ip`, from `mesh peers --json`.
fn received_from(n: &NodeProc, ip: &str) -> Result<u64> {
    Ok(n.peer_table()?
        .iter()
        .filter(|p| {
            p["addr"]
                .as_str()
                .is_some_and(|a| a.split(':').next() == Some(ip))
        })
        .filter_map(|p| p["received"].as_u64())
        .sum())
}

fn baseline(script: &Path, mode: &str, opt: &Opt, file: &Path) -> Result<f64> {
    let out = Command::new("bash")
        .arg(script)
        .args([mode, &opt.peers.to_string(), &opt.rate])
        .arg(file)
        .env("NETLAB_PREFIX", "mbb")
        .env("NETLAB_NET", "10.83.0")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{mode} baseline failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .lines()
        .last()
        .context("no output")?
        .parse()
        .context("baseline output")
}
