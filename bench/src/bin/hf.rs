//! HuggingFace benchmark: a model that so far lives only on the Hub reaches N nodes behind one
//! thin uplink. The Hub stand-in (`fake-hf`) runs on host 1, whose link is the school's uplink
//! (default 40 Mbit); the N nodes on hosts 2..N+1 have LAN links (default 400 Mbit) and find
//! each other by mDNS. Prints the bytes the Hub served / the repo's size, and the fleet's time
//! / (size / uplink), with a direct download over the same uplink in the same run as the
//! baseline; CPU-seconds of the fleet beside it. With `--ttfb`, also the time to the first byte
//! of a cold 1 GiB file through a node's HF endpoint, against the Hub directly.
//!
//! `cargo build --release -p mesh-cli -p mesh-tests -p mesh-bench && target/release/hf --nodes 8`
//! (as root).

use std::{
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use mesh_bench::*;
use mesh_tests::{
    netlab::{self, rate_bits, NetLab},
    util::{wait_for_full_mesh, FakeHub, NodeProc},
};

#[derive(Parser, Debug)]
struct Opt {
    /// Nodes fetching.
    #[arg(long, default_value_t = 8)]
    nodes: usize,
    /// The Hub's uplink, tc syntax.
    #[arg(long, default_value = "40mbit")]
    uplink: String,
    /// Each node's LAN link, tc syntax.
    #[arg(long, default_value = "400mbit")]
    lan: String,
    /// Repo size in MiB (one weight file and a small config).
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
    /// Also measure the time to the first byte of a cold 1 GiB file through the endpoint.
    #[arg(long)]
    ttfb: bool,
    /// Copy each node's log here (as `node-N.log`) when the fleet is done; set
    /// `MESH_TEST_LOG=mesh_node=debug` for more detail.
    #[arg(long)]
    logs: Option<std::path::PathBuf>,
}

const KEY: &str = "bench-hf-key";
const REPO: &str = "org/bench";
const BIG_REPO: &str = "org/bench-big";

fn main() -> Result<()> {
    let opt = Opt::parse();
    if !netlab::available() {
        bail!("the hf benchmark needs root with ip and tc");
    }
    let tmp = tempfile::tempdir()?;
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(&repo)?;
    let size = opt.size_mib << 20;
    make_file(&repo.join("weights.safetensors"), size)?;
    std::fs::write(repo.join("config.json"), b"{\"bench\": true}\n")?;
    let repo_size = size + 16;
    // The 1 GiB file for --ttfb is a repo of its own, so the fleet's fetch leaves it cold.
    let big = tmp.path().join("big");
    let mut repos = vec![format!("{REPO}={}", repo.display())];
    if opt.ttfb {
        std::fs::create_dir_all(&big)?;
        make_file(&big.join("big.safetensors"), 1 << 30)?;
        repos.push(format!("{BIG_REPO}={}", big.display()));
    }
    let hub_args: Vec<&str> = repos.iter().flat_map(|r| ["--repo", r.as_str()]).collect();
    let lab = NetLab::up("mhf", "10.84.0", opt.nodes + 1, Some(&opt.lan))?;
    lab.set_rate(1, &opt.uplink)?;
    let hub = FakeHub::start(tmp.path(), Some(&lab.ns(1)), &lab.addr(1), &hub_args)?;
    let bound = repo_size as f64 * 8.0 / rate_bits(&opt.uplink)? as f64;
    let direct = direct_download(&lab, &hub)?;
    let served0 = served(&hub, &lab)?;
    let (fleet, cpu, uplink) = run_fleet(&opt, &lab, &hub, tmp.path())?;
    let served = served(&hub, &lab)? - served0;
    println!(
        "\n{} MiB repo, {} nodes, uplink {}, LAN {}; size/uplink = {bound:.1} s",
        opt.size_mib, opt.nodes, opt.uplink, opt.lan
    );
    println!("| run | seconds | x size/uplink | x direct | HF bytes / repo | fleet CPU-s |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| direct download (curl, one host) | {direct:.2} | {:.3} | 1.000 | 1.000 | |",
        direct / bound
    );
    println!(
        "| mesh, {} nodes | {fleet:.2} | {:.3} | {:.3} | {:.4} | {cpu:.1} |",
        opt.nodes,
        fleet / bound,
        fleet / direct,
        served as f64 / repo_size as f64
    );
    println!("{}", uplink.describe(rate_bits(&opt.uplink)?, fleet));
    println!("{}", uplink.busy_per_half_second(rate_bits(&opt.uplink)?));
    if opt.ttfb {
        ttfb(&lab, &hub, tmp.path())?;
    }
    Ok(())
}

/// The Hub's served bytes, asked from inside host 1 (its API listens there).
fn served(hub: &FakeHub, lab: &NetLab) -> Result<u64> {
    let out = lab
        .cmd(1, "curl")
        .args(["-s", &format!("{}/_stats", hub.endpoint)])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fake-hf stats")?;
    v["served_bytes"].as_u64().context("served_bytes")
}

/// One host downloads the weights straight from the Hub with curl: the uplink's own time.
fn direct_download(lab: &NetLab, hub: &FakeHub) -> Result<f64> {
    let url = format!("{}/{REPO}/resolve/main/weights.safetensors", hub.endpoint);
    let out = lab
        .cmd(2, "curl")
        .args(["-s", "-L", "-o", "/dev/null", "-w", "%{time_total}", &url])
        .output()?;
    if !out.status.success() {
        bail!("direct download failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// Every node fetches the repo at once; returns the seconds until the last one is done, the
/// fleet's CPU-seconds, and what the uplink carried when.
fn run_fleet(opt: &Opt, lab: &NetLab, hub: &FakeHub, dir: &Path) -> Result<(f64, f64, Timeline)> {
    let env = [("HF_ENDPOINT", hub.endpoint.as_str())];
    let mut nodes = Vec::new();
    for i in 2..=opt.nodes + 1 {
        let home = dir.join(format!("h{i}"));
        nodes.push(NodeProc::start_env(
            &home,
            Some(KEY),
            Some(&lab.ns(i)),
            &lab.addr(i),
            &[],
            &env,
        )?);
    }
    // A running lab: every node already knows every other one.
    wait_for_full_mesh(&nodes, Duration::from_secs(90))?;
    let cpu0: f64 = nodes
        .iter()
        .map(|n| proc_cpu_secs(n.child.id()).unwrap_or(0.0))
        .sum();
    let start = Instant::now();
    let sampling = AtomicBool::new(true);
    let (last, timeline) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| Timeline::sample(lab, start, &sampling));
        let last = wait_for_fetches(&nodes, start);
        sampling.store(false, Ordering::Relaxed);
        (last, sampler.join().expect("sampler panicked"))
    });
    let (last, timeline) = (last?, timeline?);
    if let Some(logs) = &opt.logs {
        std::fs::create_dir_all(logs)?;
        for (i, n) in nodes.iter().enumerate() {
            std::fs::write(logs.join(format!("node-{}.log", i + 2)), n.log())?;
        }
    }
    let cpu: f64 = nodes
        .iter()
        .map(|n| proc_cpu_secs(n.child.id()).unwrap_or(0.0))
        .sum::<f64>()
        - cpu0;
    Ok((last, cpu, timeline))
}

/// Starts `mesh fetch` on every node and waits for all; the seconds until the last is done.
fn wait_for_fetches(nodes: &[NodeProc], start: Instant) -> Result<f64> {
    let fetches: Vec<_> = nodes.iter().map(|n| n.spawn_fetch_to_out(REPO)).collect();
    let mut last = 0.0f64;
    for (i, child) in fetches.into_iter().enumerate() {
        let out = child.wait_with_output()?;
        let done = start.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!(
                "fetch on host {} failed: {}",
                i + 2,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        eprintln!(
            "node {} done at {done:.1} s: {} bytes from HF, {} from peers",
            i + 2,
            report["bytes_from_hf"],
            report["bytes_from_peers"]
        );
        last = last.max(done);
    }
    Ok(last)
}

/// The Hub's uplink (host 1's shaped link) sampled every [`Timeline::EVERY`]: where the fleet's
/// time goes, before the Hub's first byte, while it sends, and after its last.
struct Timeline {
    /// (seconds since the fetches started, bytes the uplink carried since then).
    samples: Vec<(f64, u64)>,
}

impl Timeline {
    const EVERY: Duration = Duration::from_millis(100);

    fn sample(lab: &NetLab, start: Instant, running: &AtomicBool) -> Result<Self> {
        let base = lab.link_counters(1)?.0.bytes;
        let mut samples = Vec::new();
        while running.load(Ordering::Relaxed) {
            let bytes = lab.link_counters(1)?.0.bytes - base;
            samples.push((start.elapsed().as_secs_f64(), bytes));
            std::thread::sleep(Self::EVERY);
        }
        Ok(Self { samples })
    }

    /// The uplink's rate per half second, as a share of its configured rate.
    fn busy_per_half_second(&self, rate_bits: u64) -> String {
        let step = (500 / Self::EVERY.as_millis()) as usize;
        let windows: Vec<String> = self
            .samples
            .windows(step + 1)
            .step_by(step)
            .map(|w| {
                let (a, b) = (w[0], w[step]);
                let busy = (b.1 - a.1) as f64 * 8.0 / rate_bits as f64 / (b.0 - a.0);
                format!("{:.0}", 100.0 * busy)
            })
            .collect();
        format!("uplink busy % per 0.5 s: {}", windows.join(" "))
    }

    /// One line: when the Hub's bytes started and ended, how busy the uplink was between,
    /// and how long the fleet took after them.
    fn describe(&self, rate_bits: u64, fleet: f64) -> String {
        let total = self.samples.last().map_or(0, |s| s.1);
        // Metadata calls and closing handshakes are a few kB: content starts when the count
        // passes 64 kB and ends within 64 kB of the total.
        let first = self.samples.iter().find(|s| s.1 > 64 << 10);
        let last = self
            .samples
            .iter()
            .find(|s| s.1 + (64 << 10) >= total.max(64 << 10));
        let (Some(first), Some(last)) = (first, last) else {
            return "uplink: no content bytes seen".into();
        };
        let busy = (last.1 - first.1) as f64 * 8.0 / rate_bits as f64;
        let span = last.0 - first.0;
        format!(
            "uplink (sampled every {} ms): content from {:.2} s to {:.2} s, {:.0}% busy between; fleet done {:.2} s after the last Hub byte",
            Self::EVERY.as_millis(),
            first.0,
            last.0,
            100.0 * busy / span.max(1e-9),
            fleet - last.0
        )
    }
}

/// Time to the first byte of a cold 1 GiB file, through the HF endpoint of a new node on host
/// 2 and straight from the Hub (from host 3); each curl is aborted after 5 s.
fn ttfb(lab: &NetLab, hub: &FakeHub, dir: &Path) -> Result<()> {
    let first_byte = |host: usize, url: &str| -> Result<f64> {
        let out = lab
            .cmd(host, "curl")
            .args([
                "-s",
                "-L",
                "-o",
                "/dev/null",
                "--max-time",
                "5",
                "-w",
                "%{http_code} %{time_starttransfer}",
                url,
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        match text.split_once(' ') {
            Some(("200", t)) => Ok(t.parse()?),
            _ => bail!("curl {url} from host {host}: {text}"),
        }
    };
    let direct = first_byte(
        3,
        &format!("{}/{BIG_REPO}/resolve/main/big.safetensors", hub.endpoint),
    )?;
    let env = [("HF_ENDPOINT", hub.endpoint.as_str())];
    let node = NodeProc::start_env(
        &dir.join("ttfb"),
        Some(KEY),
        Some(&lab.ns(2)),
        &lab.addr(2),
        &[],
        &env,
    )?;
    let via = first_byte(
        2,
        &format!(
            "http://{}/{BIG_REPO}/resolve/main/big.safetensors",
            node.api
        ),
    )?;
    println!("\ntime to first byte of a cold 1 GiB file: {via:.3} s through the node, {direct:.3} s from the Hub directly");
    Ok(())
}
