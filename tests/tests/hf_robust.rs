//! Issue E: HuggingFace I/O that survives a flaky uplink, and a node that survives `kill -9`
//! in the middle of an HF download: a stalled body or a 503 is asked again, and a killed
//! download resumes from the pieces it checkpointed, not from zero.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use mesh_tests::util::*;

const REPO: &str = "org/weights";

fn hub(tmp: &Path, repo: &Path, extra: &[&str]) -> FakeHub {
    let spec = format!("{REPO}={}", repo.display());
    let mut args = vec!["--repo", spec.as_str()];
    args.extend(extra);
    FakeHub::start(tmp, None, "127.0.0.1", &args).unwrap()
}

fn fetch_cmd(hub: &FakeHub, home: &Path, out: &Path) -> std::process::Command {
    let mut cmd = hub.mesh_cmd(home);
    cmd.args(["fetch", REPO, "--json", "--to"]).arg(out);
    cmd
}

#[test]
fn a_stalled_body_and_503s_from_the_hub_are_asked_again() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    write_file(&repo.join("model.safetensors"), (5 << 20) + 3, 71);
    write_file(&repo.join("config.json"), 300, 72);
    // Every file's first CDN body stops after 512 KiB and hangs; the first three requests
    // get a 503 with Retry-After.
    let hub = hub(
        tmp.path(),
        &repo,
        &["--stall-once-after", "524288", "--fail-first", "3"],
    );
    let out = tmp.path().join("out");
    let started = Instant::now();
    let run = fetch_cmd(&hub, &tmp.path().join("home"), &out)
        .output()
        .unwrap();
    print_output("mesh fetch (stalling hub)", &run);
    assert!(run.status.success(), "the fetch did not get past the stall");
    assert_same_tree(&repo, &out);
    let stats = hub.stats();
    let requests: Vec<&str> = stats["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(
        requests.iter().any(|r| r.ends_with(" 503")),
        "no 503: {requests:?}"
    );
    // The stalled range was asked for again.
    let ranges: Vec<&str> = requests
        .iter()
        .filter(|r| r.starts_with("GET /cdn/"))
        .filter_map(|r| r.split('[').nth(1))
        .collect();
    let asked_twice = ranges
        .iter()
        .any(|r| ranges.iter().filter(|o| *o == r).count() > 1);
    assert!(asked_twice, "no range was asked for again: {ranges:?}");
    eprintln!(
        "fetched past a stalled body and three 503s in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_download_killed_mid_way_resumes_from_its_checkpointed_pieces() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let size: u64 = 48 << 20;
    write_file(&repo.join("model.safetensors"), size, 73);
    // 2 MB/s per request: about 6 s for the file, 4 ranges at a time.
    let hub = hub(tmp.path(), &repo, &["--rate", "2000000"]);
    let home = tmp.path().join("home");
    let out = tmp.path().join("out");
    let mut first = fetch_cmd(&hub, &home, &out).spawn().unwrap();
    // Wait for a checkpoint (16 pieces), then kill the fetch without warning.
    let partial = home.join("partial");
    let deadline = Instant::now() + Duration::from_secs(60);
    let checkpointed = loop {
        let found = std::fs::read_dir(&partial)
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| e.path().extension().is_some_and(|x| x == "pieces"));
        if let Some(found) = found {
            let record: serde_json::Value =
                serde_json::from_slice(&std::fs::read(found.path()).unwrap()).unwrap();
            break record["pieces"].as_array().unwrap().len() as u64;
        }
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        assert!(
            first.try_wait().unwrap().is_none(),
            "the fetch ended too soon"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    first.kill().unwrap();
    let _ = first.wait();
    let before = hub.served_bytes();
    assert!(before < size, "the first run finished before it was killed");
    let run = fetch_cmd(&hub, &home, &out).output().unwrap();
    print_output("mesh fetch (resumed)", &run);
    assert!(run.status.success());
    assert_same_tree(&repo, &out);
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let again = report["bytes_from_hf"].as_u64().unwrap();
    assert!(
        again <= size - (checkpointed << 20),
        "the resumed run fetched {again} bytes; {checkpointed} pieces were checkpointed"
    );
    eprintln!(
        "killed after {before} bytes ({checkpointed} pieces checkpointed); the re-run fetched {again} of {size}"
    );
}
