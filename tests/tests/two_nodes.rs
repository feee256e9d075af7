//! Issue A end to end: two real `mesh` processes on loopback move models over QUIC.

use std::{path::Path, time::Duration};

use mesh_tests::{prereq, util::*};

const KEY: Option<&str> = Some("test-mesh-key");

/// A model folder with every interesting size, nested paths and an empty file.
fn make_model(dir: &Path) {
    for (i, size) in INTERESTING_SIZES.iter().enumerate() {
        write_file(&dir.join(format!("f{i}_{size}.bin")), *size, i as u64);
    }
    write_file(&dir.join("sub/deeper/weights.safetensors"), 3 << 20, 99);
    write_file(&dir.join("sub/config.json"), 321, 100);
}

#[test]
fn two_nodes_move_a_multi_file_model_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_model(&src);
    let seed_home = tmp.path().join("seed");
    let id = add(&seed_home, KEY, &src, "demo");
    assert_eq!(id.len(), 64);
    let seed = NodeProc::start(&seed_home, KEY, "127.0.0.1", &[]).unwrap();

    // `mesh ls` goes through the running node's API while it holds the store.
    let ls = mesh(&seed_home, KEY, &["ls", "--json"]);
    assert!(ls.status.success());
    let models: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(models[0]["name"], "demo");
    assert_eq!(models[0]["complete"], true);

    let home = tmp.path().join("fetcher");
    let out = tmp.path().join("out");
    let peer = seed.listen.to_string();
    let run = mesh(
        &home,
        KEY,
        &[
            "fetch",
            "demo",
            "--peer",
            &peer,
            "--to",
            out.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(run.status.success(), "fetch failed");
    assert_same_tree(&src, &out);
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["id"], id.as_str());
    let total: u64 = list_files(&src)
        .iter()
        .map(|f| std::fs::metadata(src.join(f)).unwrap().len())
        .sum();
    assert_eq!(report["bytes_from_peers"], total);

    // Fetching by id works too, and a re-run moves nothing.
    let sent_before = seed.counter("mesh_bytes_sent_total");
    let again = mesh(
        &home,
        KEY,
        &[
            "fetch",
            &id,
            "--peer",
            &peer,
            "--to",
            out.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(again.status.success());
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(report["bytes_from_peers"], 0);
    assert_eq!(seed.counter("mesh_bytes_sent_total"), sent_before);
    assert_same_tree(&src, &out);

    // A second copy from the fetcher's own store needs no peer at all.
    let out2 = tmp.path().join("out2");
    let local = mesh(
        &home,
        KEY,
        &["fetch", "demo", "--to", out2.to_str().unwrap()],
    );
    assert!(local.status.success());
    assert_same_tree(&src, &out2);
}

#[test]
fn add_while_node_runs_is_served_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let seed_home = tmp.path().join("seed");
    let seed = NodeProc::start(&seed_home, KEY, "127.0.0.1", &[]).unwrap();
    let file = tmp.path().join("later.bin");
    write_file(&file, 100_000, 5);
    // The node holds the store's database: `mesh add` must go through its API.
    add(&seed_home, KEY, &file, "later");
    let out = tmp.path().join("out");
    let run = mesh(
        &tmp.path().join("f"),
        KEY,
        &[
            "fetch",
            "later",
            "--peer",
            &seed.listen.to_string(),
            "--to",
            out.to_str().unwrap(),
        ],
    );
    assert!(run.status.success());
    assert_eq!(
        std::fs::read(out.join("later.bin")).unwrap(),
        std::fs::read(&file).unwrap()
    );
}

#[test]
fn wrong_mesh_key_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_model(&src);
    let seed_home = tmp.path().join("seed");
    add(&seed_home, KEY, &src, "demo");
    let seed = NodeProc::start(&seed_home, KEY, "127.0.0.1", &[]).unwrap();
    let home = tmp.path().join("intruder");
    let out = tmp.path().join("out");
    let peer = seed.listen.to_string();
    for key in [Some("another-key"), None] {
        let run = mesh(
            &home,
            key,
            &[
                "fetch",
                "demo",
                "--peer",
                &peer,
                "--to",
                out.to_str().unwrap(),
            ],
        );
        assert_eq!(
            run.status.code(),
            Some(4),
            "expected the peer-error exit code"
        );
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(stderr.contains("wrong mesh key"), "{stderr}");
        assert!(list_files(&out).is_empty(), "files were written");
    }
    // Not even the model list or the manifest leaked: the intruder's store knows nothing.
    let ls = mesh(&home, None, &["ls", "--json"]);
    assert_eq!(String::from_utf8_lossy(&ls.stdout).trim(), "[]");
    assert!(seed.counter("mesh_auth_failures_total") >= 2);
    assert_eq!(seed.counter("mesh_bytes_sent_total"), 0);
}

/// Flips bytes in an added file behind the node's back. With a new mtime the node's stat check
/// refuses it; with the mtime put back, the validated encoder catches the bad chunk group.
#[test]
fn provider_side_tampering_fails_the_fetch_and_leaves_no_bad_file() {
    for restore_mtime in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let victim = src.join("weights.bin");
        write_file(&victim, 4 << 20, 1);
        write_file(&src.join("ok.txt"), 10, 2);
        let seed_home = tmp.path().join("seed");
        add(&seed_home, KEY, &src, "demo");
        let seed = NodeProc::start(&seed_home, KEY, "127.0.0.1", &[]).unwrap();

        let mtime = std::fs::metadata(&victim).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut bytes = std::fs::read(&victim).unwrap();
        bytes[3 << 20] ^= 0xff;
        std::fs::write(&victim, &bytes).unwrap();
        if restore_mtime {
            let f = std::fs::File::options().write(true).open(&victim).unwrap();
            f.set_modified(mtime).unwrap();
        }

        let out = tmp.path().join("out");
        let run = mesh(
            &tmp.path().join("f"),
            KEY,
            &[
                "fetch",
                "demo",
                "--peer",
                &seed.listen.to_string(),
                "--to",
                out.to_str().unwrap(),
            ],
        );
        assert!(!run.status.success(), "fetch of a tampered file succeeded");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            stderr.contains("weights.bin"),
            "error should name the file: {stderr}"
        );
        assert!(!out.join("weights.bin").exists(), "a bad file appeared");
        if restore_mtime {
            assert_eq!(
                run.status.code(),
                Some(5),
                "expected the verification exit code"
            );
            assert_eq!(seed.counter("mesh_source_corrupt_total"), 1);
        }
    }
}

#[test]
fn killed_fetch_resumes_and_moves_only_what_was_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let size: u64 = 96 << 20;
    write_file(&src.join("big.bin"), size, 7);
    let seed_home = tmp.path().join("seed");
    add(&seed_home, KEY, &src, "big");
    // 24 MB/s: slow enough to kill the fetch midway on any machine.
    let seed =
        NodeProc::start(&seed_home, KEY, "127.0.0.1", &["--max-upload", "24000000"]).unwrap();
    let home = tmp.path().join("f");
    let out = tmp.path().join("out");
    let peer = seed.listen.to_string();
    let mut child = mesh_cmd(&home, KEY, None)
        .args([
            "fetch",
            "big",
            "--peer",
            &peer,
            "--to",
            out.to_str().unwrap(),
        ])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seed.counter("mesh_bytes_sent_total") < size * 6 / 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "transfer did not progress"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "fetch ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !out.join("big.bin").exists(),
        "a partial file appeared in the target"
    );
    // The provider keeps writing into the dead connection until its flow-control credit runs
    // out: count that towards the first run by waiting for the counter to settle.
    let mut sent_first = seed.counter("mesh_bytes_sent_total");
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = seed.counter("mesh_bytes_sent_total");
        if now == sent_first {
            break;
        }
        sent_first = now;
    }

    let run = mesh(
        &home,
        KEY,
        &[
            "fetch",
            "big",
            "--peer",
            &peer,
            "--to",
            out.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(run.status.success());
    assert_eq!(
        std::fs::read(out.join("big.bin")).unwrap(),
        std::fs::read(src.join("big.bin")).unwrap()
    );
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let resumed = report["bytes_already_local"].as_u64().unwrap();
    let sent_second = seed.counter("mesh_bytes_sent_total") - sent_first;
    eprintln!("first run sent {sent_first}, resumed {resumed}, second run sent {sent_second}");
    assert!(resumed >= 16 << 20, "nothing was resumed after kill -9");
    // The second run moves what was missing plus bao parent hashes (< 1%), nothing more.
    let missing = size - resumed;
    assert!(
        sent_second <= missing + missing / 100 + (64 << 10),
        "second run re-sent data"
    );
    assert!(
        sent_second >= missing,
        "counter cannot be below what was missing"
    );
}

#[test]
fn clear_errors_for_bad_targets_and_unknown_models() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("m.bin");
    write_file(&file, 50_000, 3);
    let seed_home = tmp.path().join("seed");
    add(&seed_home, KEY, &file, "m");
    let seed = NodeProc::start(&seed_home, KEY, "127.0.0.1", &[]).unwrap();
    let peer = seed.listen.to_string();
    let home = tmp.path().join("f");

    let unknown = mesh(
        &home,
        KEY,
        &[
            "fetch",
            "nope",
            "--peer",
            &peer,
            "--to",
            tmp.path().join("o").to_str().unwrap(),
        ],
    );
    assert_eq!(unknown.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown model nope"));

    // A target below a regular file can't be created, even by root.
    let bad_to = file.join("sub");
    let unwritable = mesh(
        &home,
        KEY,
        &[
            "fetch",
            "m",
            "--peer",
            &peer,
            "--to",
            bad_to.to_str().unwrap(),
        ],
    );
    assert_eq!(unwritable.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&unwritable.stderr).contains("not writable"));

    let unreachable = mesh(
        &home,
        KEY,
        &[
            "fetch",
            "m",
            "--peer",
            "127.0.0.1:9",
            "--to",
            tmp.path().join("o").to_str().unwrap(),
        ],
    );
    assert_eq!(unreachable.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("unreachable"));
}

/// Fills a small tmpfs store so the free-space check must refuse before any byte moves.
#[test]
fn not_enough_disk_is_refused_before_starting() {
    if !prereq::root("not_enough_disk_is_refused_before_starting") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("m.bin");
    write_file(&file, 8 << 20, 4);
    let seed_home = tmp.path().join("seed");
    add(&seed_home, KEY, &file, "m");
    let seed = NodeProc::start(&seed_home, KEY, "127.0.0.1", &[]).unwrap();
    let small = tmp.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs failed");
    let run = mesh(
        &small.join("home"),
        KEY,
        &[
            "fetch",
            "m",
            "--peer",
            &seed.listen.to_string(),
            "--to",
            small.join("out").to_str().unwrap(),
        ],
    );
    let _ = std::process::Command::new("umount").arg(&small).status();
    assert_eq!(run.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&run.stderr).contains("not enough free disk space"));
    assert_eq!(seed.counter("mesh_bytes_sent_total"), 0);
}
