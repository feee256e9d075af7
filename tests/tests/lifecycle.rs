//! Issue H, the store's lifecycle with real `mesh` processes on loopback: `rm` and `gc` after
//! interrupted runs (without a node), `verify` and repair through a running node, eviction
//! under `max_store`, and the structured log fields.

use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::util::*;

const TIMEOUT: Duration = Duration::from_secs(120);

/// Bytes of the regular files under `dir` (apparent sizes).
fn dir_bytes(dir: &Path) -> u64 {
    list_files(dir)
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// The store's data: blobs, partial downloads.
fn store_bytes(home: &Path) -> u64 {
    dir_bytes(&home.join("blobs")) + dir_bytes(&home.join("partial"))
}

/// The size of a blob's post-order outboard: one 64-byte pair per 16 KiB group boundary.
fn outboard_size(size: u64) -> u64 {
    size.div_ceil(16384).max(1).saturating_sub(1) * 64
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

/// Waits until `cond` holds, or panics after `timeout`.
fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn files_matching(dir: &Path, pred: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| pred(&p.file_name().unwrap().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default()
}

fn kill9(mut child: Child) {
    // SIGKILL: nothing gets to clean up.
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A seed node serving "demo" (two files) and "big" (24 MiB, sent at 2 MB/s so a fetch of it
/// can be interrupted).
struct Seed {
    node: NodeProc,
    demo: PathBuf,
    _tmp: tempfile::TempDir,
}

fn seed(extra: &[&str]) -> Seed {
    let tmp = tempfile::tempdir().unwrap();
    let demo = tmp.path().join("demo");
    write_file(&demo.join("weights.bin"), (5 << 20) + 3, 1);
    write_file(&demo.join("config.json"), 900, 2);
    let big = tmp.path().join("big");
    write_file(&big.join("big.bin"), 24 << 20, 3);
    let home = tmp.path().join("seed");
    add(&home, None, &demo, "demo");
    add(&home, None, &big, "big");
    let node = NodeProc::start(&home, None, "127.0.0.1", extra).unwrap();
    Seed {
        node,
        demo,
        _tmp: tmp,
    }
}

#[test]
fn gc_after_interrupted_runs_and_rm_shrink_the_store_but_not_files_added_in_place() {
    let seed = seed(&["--max-upload", "2MB"]);
    let peer = seed.node.listen.to_string();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let out = tmp.path().join("out");
    let fetched = mesh(
        &home,
        None,
        &[
            "fetch",
            "demo",
            "--peer",
            &peer,
            "--to",
            out.to_str().unwrap(),
        ],
    );
    assert!(fetched.status.success());
    let mine = tmp.path().join("mine");
    write_file(&mine.join("lora.safetensors"), 700_000, 4);
    add(&home, None, &mine, "mine");
    let mine_mtime = std::fs::metadata(mine.join("lora.safetensors"))
        .unwrap()
        .modified()
        .unwrap();

    // Interrupted run 1: `mesh add` killed while it hashes (a 16 GiB sparse file takes seconds).
    let sparse = tmp.path().join("huge/zeros.bin");
    std::fs::create_dir_all(sparse.parent().unwrap()).unwrap();
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(16 << 30)
        .unwrap();
    let adding = mesh_cmd(&home, None, None)
        .args(["add", sparse.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let is_import_tmp = |n: &str| n.starts_with("import-") && n.ends_with(".obao.tmp");
    wait_for("mesh add's temporary outboard", TIMEOUT, || {
        !files_matching(&home.join("blobs"), is_import_tmp).is_empty()
    });
    kill9(adding);

    // Interrupted run 2: a fetch of "big" killed before its first checkpoint (16 MiB).
    let fetching = mesh_cmd(&home, None, None)
        .args(["fetch", "big", "--peer", &peer, "--to"])
        .arg(tmp.path().join("big-out"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let is_data = |n: &str| n.ends_with(".data");
    wait_for("the fetch's partial file", TIMEOUT, || {
        files_matching(&home.join("partial"), is_data)
            .iter()
            .any(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
    });
    std::thread::sleep(Duration::from_millis(300));
    kill9(fetching);

    // Refused run 3: over max_store, a fetch is refused (exit 6) before it writes anything.
    let big_out = tmp.path().join("big-out");
    let refused = mesh(
        &home,
        None,
        &[
            "fetch",
            "big",
            "--peer",
            &peer,
            "--max-store",
            "8MB",
            "--to",
            big_out.to_str().unwrap(),
        ],
    );
    assert_eq!(refused.status.code(), Some(6), "over max_store");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("max_store") && stderr.contains("hint:"));

    let ls = mesh(&home, None, &["ls", "--json"]);
    let listed = json(&ls);
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "big" && m["complete"] == false));
    let before = store_bytes(&home);
    let gc = mesh(&home, None, &["gc"]);
    assert!(gc.status.success());
    let report = stdout(&gc);
    assert!(report.contains("leftover temp file"), "{report}");
    assert!(report.contains("stale partial"), "{report}");
    assert!(report.contains("model with no data"), "{report}");
    assert!(report.contains("freed"), "{report}");
    assert!(files_matching(&home.join("blobs"), is_import_tmp).is_empty());
    assert!(files_matching(&home.join("partial"), |_| true).is_empty());
    let listed = json(&mesh(&home, None, &["ls", "--json"]));
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["demo", "mine"]);
    assert!(store_bytes(&home) < before);

    // rm: the store shrinks by demo's blobs and outboards; the fetched folder keeps its files.
    let sizes = [(5u64 << 20) + 3, 900];
    let expected: u64 = sizes.iter().map(|s| s + outboard_size(*s)).sum();
    let before = store_bytes(&home);
    let rm = mesh(&home, None, &["rm", "demo"]);
    assert!(rm.status.success());
    assert!(stdout(&rm).contains("stays on disk in fetched folders"));
    assert_eq!(before - store_bytes(&home), expected);
    assert_same_tree(&seed.demo, &out);

    // rm of a model added in place forgets it and leaves its files as they were.
    let before = store_bytes(&home);
    let rm = mesh(&home, None, &["rm", "mine"]);
    assert!(rm.status.success());
    assert_eq!(before - store_bytes(&home), outboard_size(700_000));
    assert_eq!(
        std::fs::read(mine.join("lora.safetensors")).unwrap(),
        test_bytes(700_000, 4)
    );
    let mtime = std::fs::metadata(mine.join("lora.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(mtime, mine_mtime);
    let unknown = mesh(&home, None, &["rm", "demo"]);
    assert_eq!(unknown.status.code(), Some(3));
}

/// Flips one byte of `path` and puts its mtime back, as bit rot would.
fn rot(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], offset).unwrap();
    f.set_modified(mtime).unwrap();
}

#[test]
fn verify_through_the_node_drops_a_rotten_blob_and_a_fetch_repairs_it_from_a_peer() {
    let seed = seed(&[]);
    let peer = seed.node.listen.to_string();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let node = NodeProc::start(&home, None, "127.0.0.1", &[]).unwrap();
    let out = tmp.path().join("out");
    let fetch = |home: &Path| {
        mesh(
            home,
            None,
            &[
                "fetch",
                "demo",
                "--peer",
                &peer,
                "--json",
                "--to",
                out.to_str().unwrap(),
            ],
        )
    };
    assert!(fetch(&home).status.success());
    // The fetched file is a hard link to the store's blob: rot it there.
    rot(&out.join("weights.bin"), 3_000_001);

    let verify = mesh(&home, None, &["verify", "demo"]);
    assert_eq!(verify.status.code(), Some(5));
    assert!(
        stdout(&verify).contains("weights.bin: CORRUPT"),
        "{}",
        stdout(&verify)
    );
    let metrics = http_get(node.api, "/metrics").unwrap();
    let value = |series: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in {metrics}"))
    };
    assert_eq!(
        value("mesh_verification_failures_total{where=\"store\"}"),
        1
    );
    let size = (5 << 20) + 3 + 900;
    assert_eq!(
        value("mesh_bytes_received_by_source_total{source=\"peer\"}"),
        size
    );
    assert_eq!(
        value(&format!(
            "mesh_peer_received_bytes_total{{peer=\"{peer}\"}}"
        )),
        size
    );
    assert_eq!(
        value("mesh_bytes_received_by_source_total{source=\"hf\"}"),
        0
    );
    assert_eq!(value("mesh_transfers_in_progress"), 0);
    let listed = json(&mesh(&home, None, &["ls", "--json"]));
    assert_eq!(
        listed[0]["complete"], false,
        "the rotten file is no longer here"
    );

    let repaired = fetch(&home);
    assert!(repaired.status.success());
    let report = json(&repaired);
    assert_eq!(report["bytes_from_peers"], (5 << 20) + 3);
    assert_same_tree(&seed.demo, &out);
    let verify = mesh(&home, None, &["verify"]);
    assert!(verify.status.success());
    assert!(stdout(&verify).contains("demo: ok (2 files)"));
}

#[test]
fn max_store_evicts_the_least_recently_used_unpinned_model_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let seed_home = tmp.path().join("seed");
    for (i, name) in ["m1", "m2", "m3", "m4"].iter().enumerate() {
        let dir = tmp.path().join(name);
        write_file(&dir.join("w.bin"), 3 << 20, 10 + i as u64);
        add(&seed_home, None, &dir, name);
    }
    let seed = NodeProc::start(&seed_home, None, "127.0.0.1", &[]).unwrap();
    let peer = seed.listen.to_string();
    let home = tmp.path().join("home");
    let fetch = |name: &str| {
        let to = tmp.path().join("out").join(name);
        mesh(
            &home,
            None,
            &["fetch", name, "--peer", &peer, "--to", to.to_str().unwrap()],
        )
    };
    // m1 is the oldest but pinned; m2 is used again after m3, so m3 is the least recent.
    for name in ["m1", "m2", "m3"] {
        assert!(fetch(name).status.success());
    }
    assert!(mesh(&home, None, &["pin", "m1"]).status.success());
    assert!(fetch("m2").status.success());

    // Room for about three models: the fourth needs one evicted.
    let node_dir_bytes = {
        use std::os::unix::fs::MetadataExt;
        let mut seen = std::collections::HashSet::new();
        // Less the disk reserve, which max_store does not count.
        let reserve = std::fs::metadata(home.join("reserve")).map_or(0, |m| m.blocks() * 512);
        du(&home, &mut seen) - reserve
    };
    let quota = (node_dir_bytes + (1 << 20)).to_string();
    let node = NodeProc::start(&home, None, "127.0.0.1", &["--max-store", &quota]).unwrap();
    assert!(fetch("m4").status.success());
    let listed = json(&mesh(&home, None, &["ls", "--json"]));
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["m1", "m2", "m4"]);
    assert_eq!(listed[0]["pinned"], true);
    let log = node.log();
    let line = log
        .lines()
        .find(|l| l.contains("evicted"))
        .unwrap_or_else(|| panic!("no eviction in the log: {log}"));
    assert!(
        line.contains("model=m3") && line.contains("max_store"),
        "{line}"
    );
}

/// Disk blocks under `dir`, each inode once (as `du`, and as the node counts `max_store`).
fn du(dir: &Path, seen: &mut std::collections::HashSet<(u64, u64)>) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            total += du(&entry.path(), seen);
        } else if meta.is_file() && seen.insert((meta.dev(), meta.ino())) {
            total += meta.blocks() * 512;
        }
    }
    total
}

#[test]
fn a_fetch_logs_peer_model_bytes_and_seconds_as_fields() {
    let seed = seed(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let out = mesh_cmd(&home, None, None)
        .env("RUST_LOG", "info")
        .args(["--log-json", "fetch", "demo", "--peer"])
        .arg(seed.node.listen.to_string())
        .arg("--to")
        .arg(tmp.path().join("out"))
        .output()
        .unwrap();
    print_output("mesh --log-json fetch demo", &out);
    assert!(out.status.success());
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let done = events
        .iter()
        .find(|e| e["fields"]["message"] == "fetch complete")
        .expect("a fetch complete event");
    assert_eq!(done["fields"]["model"], "demo");
    assert_eq!(done["fields"]["bytes"], (5 << 20) + 3 + 900);
    assert!(done["fields"]["seconds"].as_f64().unwrap() > 0.0);
    let received = events
        .iter()
        .find(|e| e["fields"]["message"] == "received")
        .expect("a received event");
    assert_eq!(
        received["fields"]["peer"],
        seed.node.listen.to_string().as_str()
    );
    assert_eq!(received["fields"]["bytes"], (5 << 20) + 3 + 900);
}
