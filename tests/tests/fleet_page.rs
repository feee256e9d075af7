//! Issue H, the fleet page in a real browser: a four-host lab (network namespaces, 10 Mbit/s
//! links), a seed on host 1 and nodes on hosts 2-4 fetching "demo" at once. Debian's headless
//! Chromium loads host 2's page (`GET /` on its API) while the fetch runs; the rendered DOM
//! must show every peer with what it holds (the seed: demo complete; the other two: demo, partial
//! while they fetch), and the transfer with its progress, sources and per-file rows; then it
//! takes a screenshot. Host 2 runs with `--max-download 1MB`, below its link, so the page
//! must also show that limit binding.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use mesh_tests::{netlab::NetLab, prereq, util::*};

const KEY: Option<&str> = Some("fleet-page-key");
const SIZE: u64 = 24 << 20;

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Runs headless Chromium in host `i` with a fresh profile, as root needs it.
fn chrome(lab: &NetLab, i: usize, bin: &Path, args: &[&str]) -> Output {
    let profile = tempfile::tempdir().unwrap();
    let out = lab
        .cmd(i, bin.to_str().unwrap())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--virtual-time-budget=2500",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .output()
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The element that starts at `marker` in `html`, up to the end of its row or block.
fn element<'a>(html: &'a str, marker: &str, end: &str) -> Option<&'a str> {
    let start = html.find(marker)?;
    let rest = &html[start..];
    Some(&rest[..rest.find(end).unwrap_or(rest.len())])
}

/// The first `data-progress` value in `html`.
fn progress(html: &str) -> Option<f64> {
    let at = html.find("data-progress=\"")? + "data-progress=\"".len();
    html[at..].split('"').next()?.parse().ok()
}

/// What the page must show during the fetch; `Err` says what is missing.
fn check(html: &str, seed: SocketAddr, others: &[SocketAddr]) -> Result<f64, String> {
    let row = element(html, &format!("data-peer=\"{seed}\""), "</tr>")
        .ok_or(format!("no row for the seed {seed}"))?;
    if !row.contains("data-model=\"demo\" data-complete=\"true\"") {
        return Err(format!("the seed's row does not show demo complete: {row}"));
    }
    // The other fetching nodes hold demo too, partly or (if done) completely.
    for peer in others {
        let row = element(html, &format!("data-peer=\"{peer}\""), "</tr>")
            .ok_or(format!("no row for peer {peer}"))?;
        if !row.contains("data-model=\"demo\"") {
            return Err(format!("peer {peer} is not shown holding demo: {row}"));
        }
    }
    let transfer =
        element(html, "data-transfer=\"demo\"", "class=\"file\"").ok_or("no transfer of demo")?;
    let p = progress(transfer).ok_or("the transfer has no progress bar")?;
    if !(p > 0.0 && p < 1.0) {
        return Err(format!("transfer progress {p} is not under way"));
    }
    if !transfer.contains("data-source=\"10.") {
        return Err(format!(
            "the transfer names no peer as its source: {transfer}"
        ));
    }
    if !html.contains("data-file=\"w.bin\"") {
        return Err("no per-file row for w.bin".into());
    }
    if !html.contains("data-limit=\"max_download\" data-binding=\"true\"") {
        return Err("max_download is not shown binding".into());
    }
    Ok(p)
}

#[test]
fn the_fleet_page_shows_peers_and_progress_during_a_four_node_fetch() {
    let test = "the_fleet_page_shows_peers_and_progress_during_a_four_node_fetch";
    if !prereq::netns(test) {
        return;
    }
    let bin = chromium();
    if !prereq::require(
        test,
        bin.is_some(),
        "needs Debian's chromium (scripts/test installs it)",
    ) {
        return;
    }
    let bin = bin.unwrap();
    let lab = NetLab::up("fp", "10.81.40", 4, Some("10mbit")).expect("lab comes up");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_file(&src.join("w.bin"), SIZE, 31);
    write_file(&src.join("config.json"), 600, 32);
    add(&tmp.path().join("h1"), KEY, &src, "demo");
    let nodes: Vec<NodeProc> = (1..=4)
        .map(|i| {
            NodeProc::start_in(
                &tmp.path().join(format!("h{i}")),
                KEY,
                Some(&lab.ns(i)),
                &lab.addr(i),
                // Host 2 downloads slower than its link: the page must say the limit binds.
                if i == 2 {
                    &["--max-download", "1MB"][..]
                } else {
                    &[]
                },
            )
            .expect("node starts")
        })
        .collect();
    // Host 2 sees the three others (mDNS).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = nodes[1]
            .spawn_cli(&["peers", "--json"])
            .wait_with_output()
            .unwrap();
        let peers: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let connected = peers
            .as_array()
            .map_or(0, |a| a.iter().filter(|p| p["connected"] == true).count());
        if connected == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "host 2 sees {connected} peers");
        std::thread::sleep(Duration::from_millis(200));
    }
    let fetches: Vec<_> = nodes[1..]
        .iter()
        .map(|n| {
            let to = n.home.join("out");
            n.spawn_cli(&["fetch", "demo", "--json", "--to", to.to_str().unwrap()])
        })
        .collect();

    let url = format!("http://{}/", nodes[1].api);
    let others = [nodes[2].listen, nodes[3].listen];
    let deadline = Instant::now() + Duration::from_secs(60);
    let shown = loop {
        let dom = chrome(&lab, 2, &bin, &["--dump-dom", &url]);
        let html = String::from_utf8_lossy(&dom.stdout).into_owned();
        match check(&html, nodes[0].listen, &others) {
            Ok(p) => break p,
            Err(why) if Instant::now() < deadline => eprintln!("page not there yet: {why}"),
            Err(why) => panic!("the fleet page never showed the fetch: {why}\n{html}"),
        }
    };
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fleet-page-4-nodes.png");
    let _ = std::fs::remove_file(&shot);
    chrome(
        &lab,
        2,
        &bin,
        &[
            "--window-size=1600,1000",
            &format!("--screenshot={}", shot.display()),
            &url,
        ],
    );
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    eprintln!(
        "fleet page at {:.0}% of the transfer: screenshot {}",
        shown * 100.0,
        shot.display()
    );

    for (child, n) in fetches.into_iter().zip(&nodes[1..]) {
        let out = finish(child, "mesh fetch demo", Duration::from_secs(120));
        assert!(out.status.success());
        assert_same_tree(&src, &n.home.join("out"));
    }
}
