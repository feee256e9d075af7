//! Idle benchmark: N `mesh node`s on network-namespace hosts that find each other by mDNS and
//! then do nothing for `--secs`. Prints, per node, the CPU milliseconds per second and the
//! bytes per second on its link (uplink: what it sends, including its share of mDNS; downlink:
//! what reaches it, including everyone's multicast), as mean and max over the nodes.
//!
//! `cargo build --release -p mesh-cli -p mesh-bench && target/release/idle --peers 8,32`
//! (as root; run it under `flock /work/bench.lock` so no other benchmark shares the CPU).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use mesh_bench::proc_cpu_secs;
use mesh_tests::{
    netlab::{self, NetLab},
    util::NodeProc,
};

#[derive(Parser, Debug)]
struct Opt {
    /// Fleet sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [8usize, 32])]
    peers: Vec<usize>,
    /// Seconds measured, after the fleet settled. Keep it a whole number of mDNS query
    /// intervals (60 s): the fleet asks in rounds, all at once, so a shorter window holds one
    /// round or none depending on where it starts.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Longest wait for every node to be connected to every other.
    #[arg(long, default_value_t = 60)]
    settle: u64,
    /// Per-host link rate, tc syntax (the links are shaped so that their bytes are counted).
    #[arg(long, default_value = "1gbit")]
    rate: String,
}

const KEY: &str = "bench-idle-key";

/// One fleet size's result.
struct Row {
    nodes: usize,
    settled: f64,
    cpu_ms: (f64, f64),
    up: (f64, f64),
    down: (f64, f64),
}

fn main() -> Result<()> {
    let opt = Opt::parse();
    if !netlab::available() {
        bail!("the idle benchmark needs root with ip and tc");
    }
    let mut rows = Vec::new();
    for &n in &opt.peers {
        rows.push(measure(&opt, n)?);
    }
    println!(
        "\nIdle fleet: {} s after every node connected to every other; per node, mean / max",
        opt.secs
    );
    println!("| nodes | connected after | CPU ms/s | uplink B/s | downlink B/s |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.1} s | {:.2} / {:.2} | {:.0} / {:.0} | {:.0} / {:.0} |",
            r.nodes, r.settled, r.cpu_ms.0, r.cpu_ms.1, r.up.0, r.up.1, r.down.0, r.down.1
        );
    }
    Ok(())
}

fn measure(opt: &Opt, n: usize) -> Result<Row> {
    let tmp = tempfile::tempdir()?;
    let lab = NetLab::up("mid", "10.84.0", n, Some(&opt.rate))?;
    let mut nodes = Vec::new();
    for i in 1..=n {
        nodes.push(NodeProc::start_in(
            &tmp.path().join(format!("h{i}")),
            Some(KEY),
            Some(&lab.ns(i)),
            &lab.addr(i),
            &[],
        )?);
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(opt.settle);
    loop {
        let connected: Vec<usize> = nodes
            .iter()
            .map(NodeProc::connected_peers)
            .collect::<Result<_>>()?;
        if connected.iter().all(|&c| c == n - 1) {
            break;
        }
        if Instant::now() > deadline {
            bail!("after {} s the nodes see {connected:?} peers", opt.settle);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let settled = start.elapsed().as_secs_f64();
    // Let the duplicate connections of the start close before measuring.
    std::thread::sleep(Duration::from_secs(8));
    let cpu0 = cpus(&nodes)?;
    let links0 = (1..=n)
        .map(|i| lab.link_counters(i))
        .collect::<Result<Vec<_>>>()?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(opt.secs));
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = cpus(&nodes)?;
    let links1 = (1..=n)
        .map(|i| lab.link_counters(i))
        .collect::<Result<Vec<_>>>()?;
    let cpu_ms: Vec<f64> = cpu0
        .iter()
        .zip(&cpu1)
        .map(|(a, b)| (b - a) * 1e3 / secs)
        .collect();
    let up: Vec<f64> = links0
        .iter()
        .zip(&links1)
        .map(|(a, b)| (b.0.bytes - a.0.bytes) as f64 / secs)
        .collect();
    let down: Vec<f64> = links0
        .iter()
        .zip(&links1)
        .map(|(a, b)| (b.1.bytes - a.1.bytes) as f64 / secs)
        .collect();
    for (i, node) in nodes.iter().enumerate() {
        if node.connected_peers()? != n - 1 {
            let table = node.peer_table()?;
            let lost: Vec<&str> = table
                .iter()
                .filter(|p| p["connected"].as_bool() != Some(true))
                .filter_map(|p| p["addr"].as_str())
                .collect();
            let log = node.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "node {} lost peers while idle: {lost:?}; its log ends:\n{}",
                i + 1,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    drop(nodes);
    drop(lab);
    Ok(Row {
        nodes: n,
        settled,
        cpu_ms: mean_max(&cpu_ms),
        up: mean_max(&up),
        down: mean_max(&down),
    })
}

fn cpus(nodes: &[NodeProc]) -> Result<Vec<f64>> {
    nodes.iter().map(|n| proc_cpu_secs(n.child.id())).collect()
}

fn mean_max(v: &[f64]) -> (f64, f64) {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    (mean, v.iter().copied().fold(0.0, f64::max))
}
