//! Issue E on a simulated LAN: nodes on network-namespace hosts, found by mDNS, fetch a model
//! that so far lives only on the Hub, which sits behind a thin uplink (the school's), slower
//! than the LAN. Each byte must cross the uplink once for the whole fleet.

use std::time::Duration;

use mesh_tests::{netlab::NetLab, prereq, util::*};

const KEY: Option<&str> = Some("hf-fleet-key");
const REPO: &str = "org/fleet";

#[test]
fn a_fleet_behind_a_thin_uplink_pulls_each_hf_byte_once() {
    if !prereq::netns("a_fleet_behind_a_thin_uplink_pulls_each_hf_byte_once") {
        return;
    }
    let lab = NetLab::up("mhq", "10.85.0", 5, Some("400mbit")).expect("lab comes up");
    lab.set_rate(1, "40mbit").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    write_file(&repo.join("model.safetensors"), 32 << 20, 81);
    write_file(&repo.join("config.json"), 500, 82);
    let spec = format!("{REPO}={}", repo.display());
    let hub = FakeHub::start(
        tmp.path(),
        Some(&lab.ns(1)),
        &lab.addr(1),
        &["--repo", &spec],
    )
    .unwrap();
    let env = [("HF_ENDPOINT", hub.endpoint.as_str())];
    let nodes: Vec<NodeProc> = (2..=5)
        .map(|i| {
            let home = tmp.path().join(format!("h{i}"));
            NodeProc::start_env(&home, KEY, Some(&lab.ns(i)), &lab.addr(i), &[], &env).unwrap()
        })
        .collect();
    wait_for_full_mesh(&nodes, Duration::from_secs(90)).unwrap();
    let fetches: Vec<_> = nodes.iter().map(|n| n.spawn_fetch_to_out(REPO)).collect();
    let mut from_hf = 0;
    for (i, child) in fetches.into_iter().enumerate() {
        let run = finish(
            child,
            &format!("fetch on host {}", i + 2),
            Duration::from_secs(180),
        );
        assert!(run.status.success(), "fetch on host {} failed", i + 2);
        let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        from_hf += report["bytes_from_hf"].as_u64().unwrap();
        let from_peers = report["bytes_from_peers"].as_u64().unwrap();
        let peers_used = report["peers_used"].as_array().unwrap();
        assert_eq!(
            from_peers > 0,
            !peers_used.is_empty(),
            "host {}: {from_peers} bytes from peers, but peers_used is {peers_used:?}",
            i + 2
        );
    }
    for n in &nodes {
        assert_same_tree(&repo, &n.home.join("out"));
    }
    let stats = lab
        .cmd(1, "curl")
        .args(["-s", &format!("{}/_stats", hub.endpoint)])
        .output()
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    let served = stats["served_bytes"].as_u64().unwrap();
    let size = (32 << 20) + 500;
    eprintln!(
        "the Hub served {served} bytes for a {size}-byte repo ({:.4}x); the nodes counted {from_hf}",
        served as f64 / size as f64
    );
    assert!(
        served * 100 <= size * 101,
        "the Hub served {served} bytes for a {size}-byte repo"
    );
    assert_eq!(
        from_hf, served,
        "the nodes' bytes_from_hf don't add up to what the Hub sent"
    );
}
