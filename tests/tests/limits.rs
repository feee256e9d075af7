//! Issue H, limits and a full disk, with real `mesh` processes: `max_hf_download` measured
//! against the fake Hub's byte counter over time, `hf_hours` outside its window, `max_download`
//! on a mesh fetch, and ENOSPC in the middle of a fetch on a small tmpfs (exit 6, then resume).

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::{prereq, util::*};

const REPO: &str = "lab/weights";
const TIMEOUT: Duration = Duration::from_secs(120);

fn hub_with(tmp: &Path, size: u64) -> FakeHub {
    let repo = tmp.join("repo");
    write_file(&repo.join("model.safetensors"), size, 21);
    std::fs::write(repo.join("config.json"), b"{}").unwrap();
    FakeHub::start(
        tmp,
        None,
        "127.0.0.1",
        &["--repo", &format!("{REPO}={}", repo.display())],
    )
    .unwrap()
}

fn hub_fetch(hub: &FakeHub, home: &Path, to: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = mesh_cmd(home, None, None);
    cmd.env("HF_ENDPOINT", &hub.endpoint)
        .env_remove("HF_HUB_OFFLINE")
        .args(["fetch", REPO, "--json", "--to"])
        .arg(to)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// The local time `hours` from now, as HH:MM (the node reads the same clock and zone).
fn local_hhmm(hours_from_now: i64) -> String {
    let out = Command::new("date")
        .arg(format!("--date=@{}", unix_now() + hours_from_now * 3600))
        .arg("+%H:%M")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn max_hf_download_holds_the_hub_to_its_rate() {
    const SIZE: u64 = 32 << 20;
    const RATE: f64 = 4_000_000.0;
    let tmp = tempfile::tempdir().unwrap();
    let hub = hub_with(tmp.path(), SIZE);
    let home = tmp.path().join("home");
    let out = tmp.path().join("out");
    // hf_hours open now: the window must not get in the way when it is open.
    let hours = format!("{}-{}", local_hhmm(-1), local_hhmm(2));
    let started = Instant::now();
    let child = hub_fetch(
        &hub,
        &home,
        &out,
        &[("MESH_MAX_HF_DOWNLOAD", "4MB"), ("MESH_HF_HOURS", &hours)],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // The Hub's counter of file bytes handed to the connection, every 200 ms.
    let mut samples = Vec::new();
    let mut child = Some(child);
    while let Some(c) = child.as_mut() {
        samples.push((started.elapsed().as_secs_f64(), hub.sent_bytes()));
        if c.try_wait().unwrap().is_some() || started.elapsed() > TIMEOUT {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let run = finish(
        child.take().unwrap(),
        "mesh fetch (max_hf_download)",
        TIMEOUT,
    );
    assert!(run.status.success());
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        test_bytes(SIZE, 21)
    );
    // Socket buffers let the counter run a few MB ahead at first; past that it moves at the
    // client's pace. Fit a line through the samples from 2 s until the file was all sent.
    let steady: Vec<(f64, f64)> = samples
        .iter()
        .filter(|(t, n)| *t >= 2.0 && *n < SIZE)
        .map(|(t, n)| (*t, *n as f64))
        .collect();
    assert!(steady.len() >= 10, "too few samples: {samples:?}");
    let k = steady.len() as f64;
    let (mt, mn) = (
        steady.iter().map(|s| s.0).sum::<f64>() / k,
        steady.iter().map(|s| s.1).sum::<f64>() / k,
    );
    let slope = steady.iter().map(|s| (s.0 - mt) * (s.1 - mn)).sum::<f64>()
        / steady.iter().map(|s| (s.0 - mt).powi(2)).sum::<f64>();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "max_hf_download 4 MB/s: the Hub sent {:.2} MB/s from 2 s on ({} samples), the whole \
         {} MiB file took {secs:.1} s",
        slope / 1e6,
        steady.len(),
        SIZE >> 20
    );
    assert!(
        (0.85 * RATE..=1.1 * RATE).contains(&slope),
        "the Hub sent {slope:.0} B/s with max_hf_download = 4 MB/s"
    );
}

#[test]
fn outside_hf_hours_a_fetch_waits_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = hub_with(tmp.path(), 1 << 20);
    let home = tmp.path().join("home");
    let hours = format!("{}-{}", local_hhmm(2), local_hhmm(3));
    let mut child = hub_fetch(
        &hub,
        &home,
        &tmp.path().join("out"),
        &[("MESH_HF_HOURS", &hours)],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let opens = &hours[..5];
    let deadline = Instant::now() + Duration::from_secs(30);
    let notice = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("HuggingFace downloads wait until") => break line,
            Ok(_) => continue,
            Err(_) => panic!("no notice that HuggingFace waits for hf_hours"),
        }
    };
    eprintln!("{notice}");
    assert!(notice.contains(opens), "{notice}");
    assert!(child.try_wait().unwrap().is_none(), "the fetch waits");
    assert_eq!(hub.sent_bytes(), 0, "no file byte came from the Hub");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn max_download_holds_a_mesh_fetch_to_its_rate() {
    const SIZE: u64 = 16 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_file(&src.join("w.bin"), SIZE, 5);
    add(&tmp.path().join("seed"), None, &src, "demo");
    let seed = NodeProc::start(&tmp.path().join("seed"), None, "127.0.0.1", &[]).unwrap();
    let out = tmp.path().join("out");
    let started = Instant::now();
    let run = mesh(
        &tmp.path().join("home"),
        None,
        &[
            "fetch",
            "demo",
            "--peer",
            &seed.listen.to_string(),
            "--max-download",
            "4MB",
            "--json",
            "--to",
            out.to_str().unwrap(),
        ],
    );
    let secs = started.elapsed().as_secs_f64();
    assert!(run.status.success());
    assert_same_tree(&src, &out);
    let rate = SIZE as f64 / secs;
    eprintln!(
        "max_download 4 MB/s: {} MiB in {secs:.2} s = {:.2} MB/s",
        SIZE >> 20,
        rate / 1e6
    );
    // At most the limit plus its 100 ms burst.
    assert!(rate <= 4_000_000.0 * 1.05, "fetched at {rate:.0} B/s");
}

/// A tmpfs of `mib` MiB mounted at `dir` for the life of the value.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u64) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs");
        Self(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `path` with one file until a write fails; returns that error.
fn fill(path: &Path) -> std::io::Error {
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0x55u8; 256 << 10];
    loop {
        if let Err(e) = f.write_all(&block).and_then(|()| f.sync_data()) {
            return e;
        }
    }
}

#[test]
fn a_disk_full_mid_fetch_exits_6_with_a_hint_and_a_rerun_resumes() {
    disk_full_mid_fetch(
        "a_disk_full_mid_fetch_exits_6_with_a_hint_and_a_rerun_resumes",
        false,
    );
}

/// The same through a node that keeps running on the full disk (as under systemd): its
/// store must take writes again once there is room, without a restart.
#[test]
fn a_running_node_whose_disk_filled_up_resumes_without_a_restart() {
    disk_full_mid_fetch(
        "a_running_node_whose_disk_filled_up_resumes_without_a_restart",
        true,
    );
}

/// A fetch into a store on a 40 MiB tmpfs that fills up mid-way: exit 6 with one error line
/// and a hint, nothing in the target; then room again, and a re-run resumes. With
/// `running_node`, both fetches go through one `mesh node` on that store.
fn disk_full_mid_fetch(test: &str, running_node: bool) {
    if !prereq::root(test) {
        return;
    }
    const SIZE: u64 = 24 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_file(&src.join("w.bin"), SIZE, 8);
    add(&tmp.path().join("seed"), None, &src, "demo");
    let seed = NodeProc::start(
        &tmp.path().join("seed"),
        None,
        "127.0.0.1",
        &["--max-upload", "4MB"],
    )
    .unwrap();
    let disk = Tmpfs::mount(&tmp.path().join("disk"), 40);
    let home = disk.0.join("home");
    let out = disk.0.join("out");
    let node = running_node.then(|| NodeProc::start(&home, None, "127.0.0.1", &[]).unwrap());
    let args = [
        "fetch",
        "demo",
        "--peer",
        &seed.listen.to_string(),
        "--json",
        "--to",
        out.to_str().unwrap(),
    ];
    let fetch = || match &node {
        Some(node) => node.spawn_cli(&args),
        None => mesh_cmd(&home, None, None)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    };
    let child = fetch();
    // Once a few MB are verified and written, the disk fills up.
    let partial = home.join("partial");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        use std::os::unix::fs::MetadataExt;
        let written: u64 = std::fs::read_dir(&partial)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.blocks() * 512)
                    .sum()
            })
            .unwrap_or(0);
        if written >= 6 << 20 {
            break;
        }
        assert!(Instant::now() < deadline, "the fetch never wrote 6 MiB");
        std::thread::sleep(Duration::from_millis(20));
    }
    let filler = disk.0.join("filler");
    let full = fill(&filler);
    assert_eq!(full.raw_os_error(), Some(28), "{full}");
    let run = finish(child, "mesh fetch (disk fills up)", TIMEOUT);
    assert_eq!(run.status.code(), Some(6));
    let stderr = String::from_utf8_lossy(&run.stderr);
    let error: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error.len(), 1, "{stderr}");
    assert!(error[0].contains("No space left on device"), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("hint:") && l.contains("resumes")),
        "{stderr}"
    );
    assert!(
        !out.join("w.bin").exists(),
        "no half-written file in the target"
    );

    std::fs::remove_file(&filler).unwrap();
    let again = finish(fetch(), "mesh fetch (room again)", TIMEOUT);
    assert!(again.status.success());
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    let kept = report["bytes_already_local"].as_u64().unwrap();
    assert!(
        kept >= 4 << 20,
        "the re-run started from {kept} verified bytes"
    );
    assert_same_tree(&src, &out);
    if let Some(node) = &node {
        // And the node's store still records what it is asked to.
        let ls = finish(node.spawn_cli(&["ls", "--json"]), "mesh ls", TIMEOUT);
        assert!(String::from_utf8_lossy(&ls.stdout).contains("\"complete\":true"));
    }
}
