//! Issue C (part): HuggingFace as the fallback, against `fake-hf`, a local server that speaks
//! the Hub's API as strictly as the Hub (LFS behind a redirect to another origin, 401 for gated
//! repos, Range, body-byte counter).

use std::path::Path;

use mesh_tests::{prereq, util::*};

const REPO: &str = "stabilityai/stable-diffusion-3.5-large";

/// A small stand-in for the SD3.5 repo: an LFS weight file, an LFS file in a folder, and small
/// plain-git files.
fn make_repo(dir: &Path) {
    write_file(&dir.join("sd3.5_large.safetensors"), (3 << 20) + 11, 1);
    write_file(&dir.join("text_encoders/clip_g.safetensors"), 300_000, 2);
    write_file(&dir.join("model_index.json"), 400, 3);
    std::fs::write(
        dir.join(".gitattributes"),
        "*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    )
    .unwrap();
}

/// The fake Hub serving `repo` as REPO.
fn serve_repo(tmp: &Path, repo: &Path) -> FakeHub {
    FakeHub::start(
        tmp,
        None,
        "127.0.0.1",
        &["--repo", &format!("{REPO}={}", repo.display())],
    )
    .unwrap()
}

/// The fake Hub serving `repo` as the gated `org/gated`, token `hf_secret`.
fn serve_gated(tmp: &Path, repo: &Path) -> FakeHub {
    let repo_arg = format!("org/gated={}", repo.display());
    let args = [
        "--repo",
        &repo_arg,
        "--gated",
        "org/gated",
        "--token",
        "hf_secret",
    ];
    FakeHub::start(tmp, None, "127.0.0.1", &args).unwrap()
}

/// Whether python3 can import huggingface_hub (see `prereq`).
fn has_huggingface_hub(test: &str) -> bool {
    prereq::python(test, &["huggingface_hub"])
}

fn total_size(dir: &Path) -> u64 {
    list_files(dir)
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).unwrap().len())
        .sum()
}

fn hub_cmd(
    hub: &FakeHub,
    home: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let mut cmd = hub.mesh_cmd(home);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.args(args).output().unwrap();
    print_output(&format!("mesh {}", args.join(" ")), &out);
    out
}

#[test]
fn falls_back_to_hf_verifies_and_takes_nothing_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    make_repo(&repo);
    let hub = serve_repo(tmp.path(), &repo);
    let home = tmp.path().join("node");
    let out = tmp.path().join("out");
    let run = hub_cmd(
        &hub,
        &home,
        &["fetch", REPO, "--json", "--to", out.to_str().unwrap()],
        &[],
    );
    assert!(run.status.success(), "fetch from HF failed");
    assert_same_tree(&repo, &out);
    let size = total_size(&repo);
    assert_eq!(hub.served_bytes(), size, "HF served more than the repo");
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["bytes_from_hf"], size);
    assert!(report["source"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{REPO}@")));

    // The same files under a catalog name come from the store: not one byte from HF again.
    let out2 = tmp.path().join("out2");
    let again = hub_cmd(
        &hub,
        &home,
        &[
            "fetch",
            "sd3.5_large",
            "--json",
            "--to",
            out2.to_str().unwrap(),
        ],
        &[],
    );
    assert!(again.status.success());
    assert_eq!(
        std::fs::read(out2.join("sd3.5_large.safetensors")).unwrap(),
        std::fs::read(repo.join("sd3.5_large.safetensors")).unwrap()
    );
    assert_eq!(hub.served_bytes(), size, "a second fetch went to HF");
}

#[test]
fn a_peer_that_has_the_repo_is_used_instead_of_hf() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    make_repo(&repo);
    let hub = serve_repo(tmp.path(), &repo);
    let seed_home = tmp.path().join("seed");
    let first = hub_cmd(
        &hub,
        &seed_home,
        &[
            "fetch",
            REPO,
            "--to",
            tmp.path().join("o1").to_str().unwrap(),
        ],
        &[],
    );
    assert!(first.status.success());
    let served = hub.served_bytes();
    let seed = NodeProc::start(&seed_home, None, "127.0.0.1", &[]).unwrap();
    let home = tmp.path().join("second");
    let out = tmp.path().join("o2");
    let peer = seed.listen.to_string();
    let run = hub_cmd(
        &hub,
        &home,
        &[
            "fetch",
            REPO,
            "--peer",
            &peer,
            "--json",
            "--to",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(run.status.success());
    assert_same_tree(&repo, &out);
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(
        report["bytes_from_hf"], 0,
        "HF was used although a peer had every file"
    );
    assert_eq!(hub.served_bytes(), served, "file bytes came from HF");
    // The revision lookup still went to HF (it pins the commit), but no file bytes did.
}

#[test]
fn gated_repo_needs_a_token() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    make_repo(&repo);
    let hub = serve_gated(tmp.path(), &repo);
    let home = tmp.path().join("node");
    let out = tmp.path().join("out");
    let refused = hub_cmd(
        &hub,
        &home,
        &["fetch", "org/gated", "--to", out.to_str().unwrap()],
        &[],
    );
    assert_eq!(refused.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("gated or private") && stderr.contains("HF_TOKEN"),
        "{stderr}"
    );
    assert!(list_files(&out).is_empty());
    // The token file under HF_HOME counts as much as HF_TOKEN.
    std::fs::create_dir_all(home.join("hf-home")).unwrap();
    std::fs::write(home.join("hf-home/token"), "hf_secret\n").unwrap();
    let ok = hub_cmd(
        &hub,
        &home,
        &["fetch", "org/gated", "--to", out.to_str().unwrap()],
        &[],
    );
    assert!(ok.status.success());
    assert_same_tree(&repo, &out);
}

#[test]
fn a_file_that_does_not_match_hf_sha256_is_discarded() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    make_repo(&repo);
    let hub = FakeHub::start(
        tmp.path(),
        None,
        "127.0.0.1",
        &[
            "--repo",
            &format!("{REPO}={}", repo.display()),
            "--corrupt",
            &format!("{REPO}/text_encoders/clip_g.safetensors"),
        ],
    )
    .unwrap();
    let home = tmp.path().join("node");
    let out = tmp.path().join("out");
    let run = hub_cmd(
        &hub,
        &home,
        &["fetch", REPO, "--to", out.to_str().unwrap()],
        &[],
    );
    assert_eq!(
        run.status.code(),
        Some(5),
        "expected the verification exit code"
    );
    assert!(String::from_utf8_lossy(&run.stderr).contains("does not match its published hash"));
    assert!(
        !out.join("text_encoders/clip_g.safetensors").exists(),
        "a bad file appeared"
    );
}

#[test]
fn dry_run_lists_files_sizes_and_sources_for_a_catalog_name() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    make_repo(&repo);
    let hub = serve_repo(tmp.path(), &repo);
    let home = tmp.path().join("node");
    let plan = hub_cmd(&hub, &home, &["fetch", "sd3.5_large", "--dry-run"], &[]);
    assert!(plan.status.success());
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        text.contains("sd3.5_large.safetensors") && text.contains("hf"),
        "{text}"
    );
    assert!(text.contains("3.00 MiB"), "size missing: {text}");
    assert_eq!(hub.served_bytes(), 0, "a dry run moved bytes");
    assert!(!home
        .join("blobs")
        .read_dir()
        .map(|mut d| d.any(|e| e.unwrap().path().extension().is_some_and(|x| x == "data")))
        .unwrap_or(false));
    // Globs pick files of a repo.
    let json = hub_cmd(
        &hub,
        &home,
        &[
            "fetch",
            REPO,
            "--dry-run",
            "--json",
            "--include",
            "*.json",
            "--include",
            "text_encoders/*",
        ],
        &[],
    );
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let paths: Vec<&str> = report["plan"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        ["model_index.json", "text_encoders/clip_g.safetensors"]
    );
}

/// The export into the HF cache layout loads with the real `huggingface_hub`, offline.
#[test]
fn hf_cache_export_loads_offline_with_huggingface_hub() {
    if !has_huggingface_hub("hf_cache_export_loads_offline_with_huggingface_hub") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    make_repo(&repo);
    let hub = serve_repo(tmp.path(), &repo);
    let home = tmp.path().join("node");
    let run = hub_cmd(
        &hub,
        &home,
        &[
            "fetch",
            REPO,
            "--hf-cache",
            "--to",
            tmp.path().join("out").to_str().unwrap(),
        ],
        &[],
    );
    assert!(run.status.success());
    let script = format!(
        "from huggingface_hub import snapshot_download, hf_hub_download\n\
         p = snapshot_download('{REPO}', local_files_only=True)\n\
         f = hf_hub_download('{REPO}', 'text_encoders/clip_g.safetensors', local_files_only=True)\n\
         print(p)\nprint(f)\n"
    );
    let py = std::process::Command::new("python3")
        .args(["-c", &script])
        .env("HF_HOME", home.join("hf-home"))
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    eprintln!(
        "python: {}\n{}",
        String::from_utf8_lossy(&py.stdout),
        String::from_utf8_lossy(&py.stderr)
    );
    assert!(
        py.status.success(),
        "huggingface_hub could not load the export offline"
    );
    let snapshot = String::from_utf8_lossy(&py.stdout)
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert_same_tree(&repo, Path::new(&snapshot));
    // Blobs are hard links to the store, not copies.
    use std::os::unix::fs::MetadataExt;
    let weight = std::fs::metadata(Path::new(&snapshot).join("sd3.5_large.safetensors")).unwrap();
    assert!(weight.nlink() >= 2, "the cache blob is a copy, not a link");
}

/// The real Python client downloads through a node's HF-compatible endpoint: the node pulls
/// from (fake) HuggingFace once and serves the files itself.
#[test]
fn snapshot_download_through_the_node_endpoint_is_byte_identical() {
    if !has_huggingface_hub("snapshot_download_through_the_node_endpoint_is_byte_identical") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    make_repo(&repo);
    let hub = serve_repo(tmp.path(), &repo);
    let home = tmp.path().join("node");
    let hf_home = home.join("hf-home");
    let node = NodeProc::start_env(
        &home,
        None,
        None,
        "127.0.0.1",
        &[],
        &[
            ("HF_ENDPOINT", hub.endpoint.as_str()),
            ("HF_HOME", hf_home.to_str().unwrap()),
        ],
    )
    .unwrap();
    let script = format!(
        "import sys\nfrom huggingface_hub import snapshot_download, hf_hub_download\n\
         p = snapshot_download('{REPO}')\nprint(p)\n\
         f = hf_hub_download('{REPO}', 'sd3.5_large.safetensors', force_download=True)\nprint(f)\n"
    );
    let client_home = tmp.path().join("client-hf-home");
    let run = |what: &str| {
        let py = std::process::Command::new("python3")
            .args(["-c", &script])
            .env("HF_ENDPOINT", format!("http://{}", node.api))
            .env("HF_HOME", &client_home)
            .env("HF_HUB_DISABLE_XET", "1")
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_HUB_CACHE")
            .output()
            .unwrap();
        eprintln!(
            "python ({what}): {}\n{}",
            String::from_utf8_lossy(&py.stdout),
            String::from_utf8_lossy(&py.stderr)
        );
        assert!(
            py.status.success(),
            "snapshot_download through the node failed ({what})"
        );
        String::from_utf8_lossy(&py.stdout)
            .lines()
            .next()
            .unwrap()
            .to_string()
    };
    let snapshot = run("first");
    assert_same_tree(&repo, Path::new(&snapshot));
    let size = total_size(&repo);
    assert_eq!(
        hub.served_bytes(),
        size,
        "the node pulled more than the repo from HF"
    );
    // Again: everything comes from the node's store; HF serves nothing more.
    run("second");
    assert_eq!(
        hub.served_bytes(),
        size,
        "the second client download reached HF"
    );
}

/// A model fetched from a gated repo is never served in open mode, and is served to members.
#[test]
fn gated_models_are_served_to_members_only_never_in_open_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    make_repo(&repo);
    let hub = serve_gated(tmp.path(), &repo);
    let home = tmp.path().join("a");
    let first = hub_cmd(
        &hub,
        &home,
        &[
            "fetch",
            "org/gated",
            "--json",
            "--to",
            tmp.path().join("o1").to_str().unwrap(),
        ],
        &[("HF_TOKEN", "hf_secret")],
    );
    assert!(first.status.success());
    let id = serde_json::from_slice::<serde_json::Value>(&first.stdout).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Open mode: the model does not exist as far as peers can tell.
    let open = NodeProc::start(&home, None, "127.0.0.1", &[]).unwrap();
    let peer = open.listen.to_string();
    let out = tmp.path().join("o2");
    let denied = mesh(
        &tmp.path().join("b"),
        None,
        &["fetch", &id, "--peer", &peer, "--to", out.to_str().unwrap()],
    );
    assert_eq!(
        denied.status.code(),
        Some(3),
        "a gated model was offered in open mode"
    );
    assert!(list_files(&out).is_empty());
    assert_eq!(open.counter("mesh_bytes_sent_total"), 0);
    drop(open);

    // With a mesh key every peer is a member: served.
    let key = Some("members-only");
    let member = NodeProc::start(&home, key, "127.0.0.1", &[]).unwrap();
    let ok = mesh(
        &tmp.path().join("c"),
        key,
        &[
            "fetch",
            &id,
            "--peer",
            &member.listen.to_string(),
            "--to",
            out.to_str().unwrap(),
        ],
    );
    assert!(ok.status.success());
    assert_same_tree(&repo, &out);
}

/// Lays out `repo` as huggingface_hub would cache it at `commit`: blobs named by etag,
/// snapshot entries as relative symlinks, refs/main.
fn make_hf_cache(cache: &Path, repo_id: &str, commit: &str, repo: &Path) {
    use sha2::Digest;
    let base = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = base.join("snapshots").join(commit);
    std::fs::create_dir_all(base.join("blobs")).unwrap();
    std::fs::create_dir_all(base.join("refs")).unwrap();
    std::fs::write(base.join("refs/main"), commit).unwrap();
    for rel in list_files(repo) {
        let bytes = std::fs::read(repo.join(&rel)).unwrap();
        let etag = if bytes.len() > 10 * 1024 {
            hex::encode(sha2::Sha256::digest(&bytes))
        } else {
            let mut h = sha1::Sha1::new();
            h.update(format!("blob {}\0", bytes.len()).as_bytes());
            h.update(&bytes);
            hex::encode(h.finalize())
        };
        std::fs::write(base.join("blobs").join(&etag), &bytes).unwrap();
        let link = snapshot.join(&rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let depth = rel.split('/').count() + 1;
        std::os::unix::fs::symlink(format!("{}blobs/{etag}", "../".repeat(depth)), &link).unwrap();
    }
}

/// Models already in the HF cache are found at start, hashed, and served in place; a peer
/// with HuggingFace offline gets them from the node.
#[test]
fn models_in_the_hf_cache_are_served_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    make_repo(&repo);
    let home = tmp.path().join("a");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    make_hf_cache(&home.join("hf-home/hub"), REPO, commit, &repo);
    // One blob in another cached repo has bytes that don't match its name: never served.
    let bad = tmp.path().join("bad");
    write_file(&bad.join("w.safetensors"), 50_000, 9);
    make_hf_cache(&home.join("hf-home/hub"), "org/bad", commit, &bad);
    let blob_dir = home.join("hf-home/hub/models--org--bad/blobs");
    let blob = std::fs::read_dir(&blob_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&blob, bytes).unwrap();

    let node = NodeProc::start(&home, None, "127.0.0.1", &[]).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let ls = mesh(&home, None, &["ls", "--json"]);
        let models: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
        if models
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == REPO && m["complete"] == true)
        {
            assert!(
                !models
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| m["name"] == "org/bad"),
                "a bad blob was imported"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the HF cache was not imported: {}",
            node.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Served in place: nothing was copied into the store.
    let copies = std::fs::read_dir(home.join("blobs"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "data"))
        .count();
    assert_eq!(copies, 0, "the HF cache was copied into the store");
    let out = tmp.path().join("out");
    let run = mesh_cmd(&tmp.path().join("b"), None, None)
        .env("HF_HUB_OFFLINE", "1")
        .args([
            "fetch",
            REPO,
            "--peer",
            &node.listen.to_string(),
            "--to",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "fetch with HF offline failed");
    assert_same_tree(&repo, &out);
}

/// Four nodes fetch one repo at the same moment: they split the HuggingFace work by pieces and
/// swap the rest, so the Hub serves the repo about once, not four times.
#[test]
fn four_nodes_at_once_pull_each_byte_from_hf_once() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    write_file(&repo.join("weights.safetensors"), 48 << 20, 21);
    write_file(
        &repo.join("text_encoders/enc.safetensors"),
        (6 << 20) + 5,
        22,
    );
    write_file(&repo.join("config.json"), 900, 23);
    let hub = serve_repo(tmp.path(), &repo);
    let log = std::env::var("MESH_TEST_NODE_LOG").unwrap_or_default();
    let env = [
        ("HF_ENDPOINT", hub.endpoint.as_str()),
        ("RUST_LOG", log.as_str()),
    ];
    let nodes: Vec<NodeProc> = (0..4)
        .map(|i| {
            NodeProc::start_env(
                &tmp.path().join(format!("n{i}")),
                Some("fleet"),
                None,
                "127.0.0.1",
                &[],
                &env,
            )
            .unwrap()
        })
        .collect();
    let fetches: Vec<_> = nodes
        .iter()
        .map(|n| {
            let mut args = vec![
                "fetch".to_string(),
                REPO.to_string(),
                "--json".into(),
                "--to".into(),
                n.home.join("out").display().to_string(),
            ];
            for other in nodes.iter().filter(|o| o.listen != n.listen) {
                args.push("--peer".into());
                args.push(other.listen.to_string());
            }
            n.spawn_cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .collect();
    let mut from_hf = 0;
    for (i, child) in fetches.into_iter().enumerate() {
        let run = finish(
            child,
            &format!("fetch on node {i}"),
            std::time::Duration::from_secs(120),
        );
        assert!(run.status.success(), "fetch on node {i} failed");
        let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        from_hf += report["bytes_from_hf"].as_u64().unwrap();
    }
    for n in &nodes {
        assert_same_tree(&repo, &n.home.join("out"));
    }
    let size = total_size(&repo);
    let served = hub.served_bytes();
    eprintln!(
        "repo {size} bytes; HF served {served} ({:.3}x); nodes counted {from_hf}",
        served as f64 / size as f64
    );
    if let Ok(dir) = std::env::var("MESH_KEEP_NODE_LOGS") {
        for (i, n) in nodes.iter().enumerate() {
            std::fs::write(format!("{dir}/n{i}.log"), n.log()).unwrap();
        }
    }
    if let Ok(dump) = std::env::var("MESH_DUMP_HUB_LOG") {
        let addr = hub.endpoint.trim_start_matches("http://").parse().unwrap();
        std::fs::write(dump, http_get(addr, "/_stats").unwrap()).unwrap();
    }
    assert!(
        served * 100 <= size * 102,
        "HF served {served} bytes for a {size}-byte repo"
    );
}

/// A peer that relays wrong bytes of a HuggingFace file (before its BLAKE3 root is known) is
/// caught by the whole-file sha256 check; its pieces are refetched from HF and it is banned.
#[test]
fn wrong_relayed_hf_bytes_are_caught_by_sha256() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    write_file(&repo.join("weights.safetensors"), 24 << 20, 31);
    let hub = serve_repo(tmp.path(), &repo);
    let honest = NodeProc::start_env(
        &tmp.path().join("honest"),
        Some("fleet"),
        None,
        "127.0.0.1",
        &[],
        &[("HF_ENDPOINT", hub.endpoint.as_str())],
    )
    .unwrap();
    let hostile = NodeProc::start_env(
        &tmp.path().join("hostile"),
        Some("fleet"),
        None,
        "127.0.0.1",
        &[],
        &[
            ("HF_ENDPOINT", hub.endpoint.as_str()),
            ("MESH_DANGER_CORRUPT_UPLOADS", "1"),
        ],
    )
    .unwrap();
    let fetch = |n: &NodeProc, other: &NodeProc| {
        let out = n.home.join("out");
        n.spawn_cli(&[
            "fetch",
            REPO,
            "--json",
            "--peer",
            &other.listen.to_string(),
            "--to",
            out.to_str().unwrap(),
        ])
    };
    let a = fetch(&honest, &hostile);
    let b = fetch(&hostile, &honest);
    let run = finish(a, "honest fetch", std::time::Duration::from_secs(120));
    let _ = finish(b, "hostile fetch", std::time::Duration::from_secs(120));
    assert!(run.status.success(), "the honest node's fetch failed");
    assert_same_tree(&repo, &honest.home.join("out"));
    assert!(
        honest.log().contains("does not match its published hash"),
        "the bad relay was not caught: {}",
        honest.log()
    );
}
