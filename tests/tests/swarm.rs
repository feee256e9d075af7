//! Issue B end to end: real `mesh node` processes on network-namespace hosts, found by mDNS,
//! swarming one model. Each test builds its own lab (own prefix and subnet) and tears it down
//! even when it fails. Without root, `ip` and `tc` they fail in CI and are skipped elsewhere
//! (`mesh_tests::prereq`).

use std::{path::Path, time::Duration};

use mesh_tests::{netlab::NetLab, prereq, util::*};

const KEY: Option<&str> = Some("swarm-test-key");
const FETCH_TIMEOUT: Duration = Duration::from_secs(120);

fn lab(prefix: &str, subnet: u8, hosts: usize, rate: Option<&str>) -> Option<NetLab> {
    if !prereq::netns(&format!("the swarm test on lab {prefix}")) {
        return None;
    }
    Some(NetLab::up(prefix, &format!("10.81.{subnet}"), hosts, rate).expect("lab comes up"))
}

/// A model of two files; `size` bytes in the big one.
fn make_model(dir: &Path, size: u64) {
    write_file(&dir.join("model.safetensors"), size, 11);
    write_file(&dir.join("config.json"), 700, 12);
}

/// A seed on host 1 holding a model "demo" of `size` bytes (plus a small file), and a node on
/// every other host of the lab, after mDNS had time to settle as it would in a running lab.
struct Fleet {
    seed: NodeProc,
    peers: Vec<NodeProc>,
    src: std::path::PathBuf,
    /// Every store, and the model's source; held so it is removed only after the nodes stop.
    _tmp: tempfile::TempDir,
}

fn fleet(lab: &NetLab, size: u64) -> Fleet {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_model(&src, size);
    add(&tmp.path().join("h1"), KEY, &src, "demo");
    let seed = node(lab, tmp.path(), 1, &[]);
    let peers = (2..=lab.hosts())
        .map(|i| node(lab, tmp.path(), i, &[]))
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    Fleet {
        seed,
        peers,
        src,
        _tmp: tmp,
    }
}

/// Starts `mesh node` on host `i` with its own store.
fn node(lab: &NetLab, root: &Path, i: usize, extra: &[&str]) -> NodeProc {
    NodeProc::start_in(
        &root.join(format!("h{i}")),
        KEY,
        Some(&lab.ns(i)),
        &lab.addr(i),
        extra,
    )
    .expect("node starts")
}

fn fetch_args(out: &Path) -> Vec<String> {
    ["fetch", "demo", "--json", "--to", out.to_str().unwrap()]
        .map(String::from)
        .to_vec()
}

/// Starts `mesh fetch demo` into `out` on every node (delegated to each node).
fn fetch_all(nodes: &[NodeProc]) -> Vec<std::process::Child> {
    nodes
        .iter()
        .map(|n| {
            let args = fetch_args(&n.home.join("out"));
            n.spawn_cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .collect()
}

#[test]
fn fetch_finds_peers_by_mdns_without_peer_flag() {
    let Some(lab) = lab("msd", 1, 2, Some("1gbit")) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_model(&src, 6 << 20);
    add(&tmp.path().join("h1"), KEY, &src, "demo");
    let _seed = node(&lab, tmp.path(), 1, &[]);

    // No node on host 2: `mesh fetch` runs one for its duration, which must find host 1.
    let out = tmp.path().join("out");
    let home = tmp.path().join("h2");
    let started = std::time::Instant::now();
    let child = mesh_cmd(&home, KEY, Some(&lab.ns(2)))
        .args(fetch_args(&out))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let run = finish(child, "mesh fetch demo (no --peer)", FETCH_TIMEOUT);
    assert!(run.status.success(), "fetch without --peer failed");
    assert_same_tree(&src, &out);
    let secs = started.elapsed().as_secs_f64();
    assert!(secs < 15.0, "discovery plus a 6 MiB fetch took {secs:.1} s");

    // `mesh peers` (also without a node) lists host 1 and what it holds.
    let peers = mesh_cmd(&home, KEY, Some(&lab.ns(2)))
        .args(["peers", "--json"])
        .output()
        .unwrap();
    let table: serde_json::Value = serde_json::from_slice(&peers.stdout).expect("peers JSON");
    let row = table
        .as_array()
        .unwrap()
        .iter()
        .find(|p| {
            p["addr"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{}:", lab.addr(1)))
        })
        .unwrap_or_else(|| panic!("host 1 missing from {table}"));
    assert_eq!(row["source"], "mdns");
    assert_eq!(row["models"][0], "demo");
}

#[test]
fn one_seed_four_peers_all_identical_and_peers_relay() {
    let Some(lab) = lab("ms4", 2, 5, Some("100mbit")) else {
        return;
    };
    let size = 24 << 20;
    let fleet = fleet(&lab, size);
    let (seed, peers) = (&fleet.seed, &fleet.peers);
    let fetches: Vec<_> = fetch_all(peers);
    for (i, child) in fetches.into_iter().enumerate() {
        let run = finish(
            child,
            &format!("mesh fetch on host {}", i + 2),
            FETCH_TIMEOUT,
        );
        assert!(run.status.success(), "fetch on host {} failed", i + 2);
    }
    for p in peers {
        assert_same_tree(&fleet.src, &p.home.join("out"));
    }
    // Without relaying the seed would send 4x the model. The downloaders split what only the
    // seed holds, so it sends each block about once (bao parents add under 1%), and the peers
    // carry the other 3x among themselves, none far beyond its share of 0.75x.
    let total = size + 700;
    let seed_sent = seed.counter("mesh_bytes_sent_total");
    let relayed: Vec<u64> = peers
        .iter()
        .map(|p| p.counter("mesh_bytes_sent_total"))
        .collect();
    eprintln!("seed sent {seed_sent}, peers relayed {relayed:?}, model {total}");
    assert!(
        seed_sent < total * 23 / 20,
        "the seed sent {seed_sent} bytes for a {total}-byte model (over 1.15x)"
    );
    assert!(
        relayed.iter().sum::<u64>() > total * 5 / 2,
        "peers relayed too little"
    );
    for (i, sent) in relayed.iter().enumerate() {
        assert!(
            *sent < total * 3 / 2,
            "host {} relayed {sent} bytes, twice its share of a {total}-byte model",
            i + 2
        );
    }
    // Peers pass a block on while it is still arriving from the seed (measured: all but a
    // few blocks), instead of waiting for it to be whole.
    let passed_on: u64 = peers
        .iter()
        .map(|p| p.counter("mesh_bytes_passed_on_total"))
        .sum();
    let relayed_total: u64 = relayed.iter().sum();
    eprintln!("peers passed on {passed_on} of {relayed_total} bytes while still fetching them");
    assert!(
        passed_on > relayed_total / 2,
        "peers passed on only {passed_on} of {relayed_total} bytes while still fetching them"
    );
}

#[test]
fn a_peer_killed_mid_transfer_costs_only_its_pieces() {
    let Some(lab) = lab("msk", 3, 4, Some("50mbit")) else {
        return;
    };
    let size = 24 << 20;
    let mut fleet = fleet(&lab, size);
    let peers = &mut fleet.peers;
    let mut fetches: Vec<_> = fetch_all(peers);
    // Kill host 4's node once it holds (and so serves) part of the model.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while peers[2].counter("mesh_bytes_received_total") < size / 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "host 4 made no progress"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut victim = peers.remove(2);
    victim.child.kill().unwrap(); // SIGKILL
    victim.child.wait().unwrap();
    let _ = fetches.remove(2).kill();
    for (i, child) in fetches.into_iter().enumerate() {
        let run = finish(
            child,
            &format!("mesh fetch on host {}", i + 2),
            FETCH_TIMEOUT,
        );
        assert!(
            run.status.success(),
            "fetch on host {} failed after a peer died",
            i + 2
        );
    }
    for p in peers.iter() {
        assert_same_tree(&fleet.src, &p.home.join("out"));
    }
}

#[test]
fn a_hostile_peer_is_banned_and_no_bad_byte_is_written() {
    let Some(lab) = lab("msh", 4, 3, Some("100mbit")) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let size = 16 << 20;
    make_model(&src, size);
    add(&tmp.path().join("h1"), KEY, &src, "demo");
    add(&tmp.path().join("h2"), KEY, &src, "demo");
    let _seed = node(&lab, tmp.path(), 1, &[]);
    // Host 2 holds the same model but flips bytes in everything it sends.
    let hostile = NodeProc::start_in(
        &tmp.path().join("h2"),
        KEY,
        Some(&lab.ns(2)),
        &lab.addr(2),
        &[],
    );
    let hostile = {
        // The switch is read from the environment: restart host 2 with it set.
        drop(hostile);
        let home = tmp.path().join("h2");
        std::env::set_var("MESH_DANGER_CORRUPT_UPLOADS", "1");
        let node = NodeProc::start_in(&home, KEY, Some(&lab.ns(2)), &lab.addr(2), &[]);
        std::env::remove_var("MESH_DANGER_CORRUPT_UPLOADS");
        node.unwrap()
    };
    assert!(
        hostile.log().contains("CORRUPT"),
        "hostile switch not on: {}",
        hostile.log()
    );
    let fetcher = node(&lab, tmp.path(), 3, &[]);
    std::thread::sleep(Duration::from_secs(3));
    let args = fetch_args(&fetcher.home.join("out"));
    let child = fetcher.spawn_cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let run = finish(child, "mesh fetch next to a hostile peer", FETCH_TIMEOUT);
    assert!(run.status.success(), "fetch failed");
    assert_same_tree(&src, &fetcher.home.join("out"));
    assert!(
        fetcher.counter("mesh_verify_failures_total") >= 1,
        "the hostile peer was never caught"
    );
    // Banned after its first bad piece: it got few requests in.
    let hostile_sent = hostile.counter("mesh_bytes_sent_total");
    assert!(
        hostile_sent < size / 2,
        "hostile peer sent {hostile_sent} bytes"
    );
    // Nothing unverified in the fetcher's store either: its blob hashes to the manifest.
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["total_bytes"], size + 700);
}

#[test]
fn two_fetches_of_one_model_on_one_node_download_once() {
    let Some(lab) = lab("ms2", 5, 2, Some("200mbit")) else {
        return;
    };
    let size = 24 << 20;
    let fleet = fleet(&lab, size);
    let (seed, target, src) = (&fleet.seed, &fleet.peers[0], &fleet.src);
    let a = target.home.join("out-a");
    let b = target.home.join("out-b");
    let first = target.spawn_cli(&["fetch", "demo", "--json", "--to", a.to_str().unwrap()]);
    let second = target.spawn_cli(&["fetch", "demo", "--json", "--to", b.to_str().unwrap()]);
    assert!(finish(first, "first fetch", FETCH_TIMEOUT).status.success());
    assert!(finish(second, "second fetch", FETCH_TIMEOUT)
        .status
        .success());
    assert_same_tree(src, &a);
    assert_same_tree(src, &b);
    let total = size + 700;
    let received = target.counter("mesh_bytes_received_total");
    assert_eq!(
        received, total,
        "the node stored {received} new bytes for a {total}-byte model"
    );
    let seed_sent = seed.counter("mesh_bytes_sent_total");
    assert!(
        seed_sent <= total + total / 50,
        "the seed sent {seed_sent} bytes: downloaded twice"
    );
}

#[test]
fn hosts_that_cannot_reach_the_seed_get_its_blocks_through_one_that_can() {
    // Hosts 2 and 3 have no route to the seed (host 1); host 4 reaches everyone. The three
    // downloaders split the seed's blocks, so host 4 owns about a third and stands in for
    // another third; the blocks whose owner and stand-in are hosts 2 and 3 it takes only once
    // the seed-only blocks stop getting fewer. Everyone must still finish.
    let Some(lab) = lab("msr", 6, 4, Some("100mbit")) else {
        return;
    };
    for host in [2, 3] {
        let status = std::process::Command::new("ip")
            .args(["-n", &lab.ns(host), "route", "add", "blackhole"])
            .arg(format!("{}/32", lab.addr(1)))
            .status()
            .expect("ip runs");
        assert!(status.success(), "blackhole route on host {host}");
    }
    let size = 16 << 20;
    let fleet = fleet(&lab, size);
    let (seed, peers, src) = (&fleet.seed, &fleet.peers, &fleet.src);
    // Host 4 starts first, so the others can learn the model's manifest from it.
    let bridge = &peers[2];
    let args = fetch_args(&bridge.home.join("out"));
    let first = bridge.spawn_cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let started = std::time::Instant::now();
    while bridge.counter("mesh_bytes_received_total") == 0 {
        assert!(started.elapsed() < FETCH_TIMEOUT, "host 4 never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rest = fetch_all(&peers[..2]);
    for (i, child) in std::iter::once(first).chain(rest).enumerate() {
        let host = [4, 2, 3][i];
        let run = finish(child, &format!("mesh fetch on host {host}"), FETCH_TIMEOUT);
        assert!(run.status.success(), "fetch on host {host} failed");
    }
    for p in peers {
        assert_same_tree(src, &p.home.join("out"));
    }
    let total = size + 700;
    let seed_sent = seed.counter("mesh_bytes_sent_total");
    assert!(
        seed_sent < total * 23 / 20,
        "the seed sent {seed_sent} bytes for a {total}-byte model"
    );
}
