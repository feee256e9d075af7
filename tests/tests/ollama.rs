//! Issue G (part): Ollama models. A node imports its Ollama store in place and serves it as
//! `ollama:NAME:TAG`; another node's `mesh fetch` writes it into its own Ollama store (blobs
//! first, the manifest last); a corrupt blob is caught by its sha256; with no peer holding the
//! model, `fake-ollama` (a strict stand-in for the registry) is the origin.

use std::{
    path::{Path, PathBuf},
    process::Output,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use mesh_tests::util::*;
use sha2::Digest as _;

const MODEL: &str = "ollama:tinyllm:1b";

/// Writes an Ollama store at `root` holding `registry.ollama.ai/library/tinyllm:1b`, as Ollama
/// lays it out: the manifest JSON and one file per blob. Returns the blobs' hex digests.
fn make_store(root: &Path) -> Vec<String> {
    make_store_sized(root, (6 << 20) + 13)
}

/// As [`make_store`], with a model blob of `size` bytes.
fn make_store_sized(root: &Path, size: u64) -> Vec<String> {
    let blobs: Vec<(&str, Vec<u8>)> = vec![
        ("application/vnd.ollama.image.model", test_bytes(size, 21)),
        (
            "application/vnd.ollama.image.template",
            b"{{ .System }} {{ .Prompt }}".to_vec(),
        ),
        (
            "application/vnd.ollama.image.params",
            br#"{"stop":["<|end|>"]}"#.to_vec(),
        ),
    ];
    let config = br#"{"model_format":"gguf","model_family":"llama","file_type":"Q4_K_M"}"#.to_vec();
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    let mut hexes = Vec::new();
    let mut put = |bytes: &[u8]| {
        let hex = hex::encode(sha2::Sha256::digest(bytes));
        std::fs::write(root.join(format!("blobs/sha256-{hex}")), bytes).unwrap();
        hexes.push(hex.clone());
        hex
    };
    let config_hex = put(&config);
    let layers: Vec<String> = blobs
        .iter()
        .map(|(media, bytes)| {
            let hex = put(bytes);
            format!(
                r#"{{"mediaType":"{media}","digest":"sha256:{hex}","size":{}}}"#,
                bytes.len()
            )
        })
        .collect();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:{config_hex}","size":{}}},"layers":[{}]}}"#,
        config.len(),
        layers.join(",")
    );
    let dir = root.join("manifests/registry.ollama.ai/library/tinyllm");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("1b"), manifest).unwrap();
    hexes
}

fn manifest_path(store: &Path) -> PathBuf {
    store.join("manifests/registry.ollama.ai/library/tinyllm/1b")
}

/// `mesh ARGS` with the Ollama store `store` and (optionally) a registry.
fn run(home: &Path, store: &Path, registry: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = mesh_cmd(home, None, None);
    cmd.env("OLLAMA_MODELS", store);
    if let Some(url) = registry {
        cmd.env("OLLAMA_REGISTRY", url);
    }
    let out = cmd.args(args).output().unwrap();
    print_output(&format!("mesh {}", args.join(" ")), &out);
    out
}

/// Waits until the node lists `model` as complete.
fn wait_for_model(node: &NodeProc, model: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let models = http_get(node.api, "/v1/models").unwrap_or_default();
        let listed: serde_json::Value = serde_json::from_str(&models).unwrap_or_default();
        let found = listed
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["name"] == model && m["complete"] == true);
        if found {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{model} never listed: {}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Watches an Ollama store while a fetch writes it: whenever the manifest is there, every
/// blob must be there whole. Returns (violations seen, blobs seen before the manifest).
fn watch(store: PathBuf, sizes: Vec<(String, u64)>, stop: Arc<AtomicBool>) -> (usize, bool) {
    let (mut bad, mut blobs_first) = (0, false);
    while !stop.load(Ordering::Relaxed) {
        let manifest = manifest_path(&store).exists();
        let whole = sizes.iter().all(|(hex, size)| {
            std::fs::metadata(store.join(format!("blobs/sha256-{hex}")))
                .is_ok_and(|m| m.len() == *size)
        });
        let any = sizes
            .iter()
            .any(|(hex, _)| store.join(format!("blobs/sha256-{hex}")).exists());
        if manifest && !whole {
            bad += 1;
        }
        blobs_first |= any && !manifest;
        std::thread::yield_now();
    }
    (bad, blobs_first)
}

fn sizes(store: &Path, hexes: &[String]) -> Vec<(String, u64)> {
    hexes
        .iter()
        .map(|h| {
            let len = std::fs::metadata(store.join(format!("blobs/sha256-{h}")))
                .unwrap()
                .len();
            (h.clone(), len)
        })
        .collect()
}

#[test]
fn an_ollama_model_moves_between_two_nodes_blobs_first_manifest_last() {
    let tmp = tempfile::tempdir().unwrap();
    let store_a = tmp.path().join("a-ollama");
    let hexes = make_store(&store_a);
    let home_a = tmp.path().join("a");
    let a = NodeProc::start_env(
        &home_a,
        None,
        None,
        "127.0.0.1",
        &[],
        &[("OLLAMA_MODELS", store_a.to_str().unwrap())],
    )
    .unwrap();
    wait_for_model(&a, MODEL);

    let store_b = tmp.path().join("b-ollama");
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (store, sizes, stop) = (store_b.clone(), sizes(&store_a, &hexes), stop.clone());
        std::thread::spawn(move || watch(store, sizes, stop))
    };
    let peer = a.listen.to_string();
    let home_b = tmp.path().join("b");
    let out = run(
        &home_b,
        &store_b,
        None,
        &["fetch", MODEL, "--peer", &peer, "--json"],
    );
    stop.store(true, Ordering::Relaxed);
    let (bad, blobs_first) = watcher.join().unwrap();
    assert!(out.status.success(), "fetch failed");
    assert_eq!(bad, 0, "the manifest appeared before every blob was whole");
    assert!(blobs_first, "blobs never showed before the manifest");
    assert_same_tree(&store_a, &store_b);
    assert!(
        !store_b.join(".mesh-tmp").exists(),
        "temporary folder left behind"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["bytes_from_peers"].as_u64().unwrap() >= 6 << 20);
    assert_eq!(report["bytes_from_hf"], 0);
    eprintln!(
        "{}",
        String::from_utf8_lossy(
            &std::process::Command::new("find")
                .arg(&store_b)
                .output()
                .unwrap()
                .stdout
        )
    );

    // Idempotent: a second fetch moves nothing and leaves the store as it is.
    let again = run(
        &home_b,
        &store_b,
        None,
        &["fetch", MODEL, "--peer", &peer, "--json"],
    );
    assert!(again.status.success());
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(report["bytes_from_peers"], 0);
    assert_same_tree(&store_a, &store_b);
}

#[test]
fn a_corrupt_blob_is_caught_by_its_sha256_and_never_offered() {
    let tmp = tempfile::tempdir().unwrap();
    let store_a = tmp.path().join("a-ollama");
    let hexes = make_store(&store_a);
    // The big blob keeps its name and size but not its bytes.
    let blob = store_a.join(format!("blobs/sha256-{}", hexes[1]));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[1 << 20] ^= 0x40;
    std::fs::write(&blob, bytes).unwrap();
    let a = NodeProc::start_env(
        &tmp.path().join("a"),
        None,
        None,
        "127.0.0.1",
        &[],
        &[("OLLAMA_MODELS", store_a.to_str().unwrap())],
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !a.log().contains("does not match its sha256") {
        assert!(Instant::now() < deadline, "no sha256 warning: {}", a.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let models = http_get(a.api, "/v1/models").unwrap();
    assert!(
        !models.contains(MODEL),
        "a corrupt model is offered: {models}"
    );
    // No peer has it, and the registry is unreachable: the fetch fails, nothing is written.
    let store_b = tmp.path().join("b-ollama");
    let out = run(
        &tmp.path().join("b"),
        &store_b,
        Some("http://127.0.0.1:9"),
        &["fetch", MODEL, "--peer", &a.listen.to_string()],
    );
    assert_eq!(out.status.code(), Some(4));
    assert!(!manifest_path(&store_b).exists());
}

#[test]
fn the_registry_is_the_origin_when_no_peer_has_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = tmp.path().join("registry-store");
    let hexes = make_store(&origin);
    let blob_bytes: u64 = sizes(&origin, &hexes).iter().map(|(_, s)| s).sum();
    let reg = FakeRegistry::start(tmp.path(), &origin, &[]).unwrap();
    // A peer that has nothing.
    let empty = NodeProc::start(&tmp.path().join("empty"), None, "127.0.0.1", &[]).unwrap();
    let peer = empty.listen.to_string();
    let (home_b, store_b) = (tmp.path().join("b"), tmp.path().join("b-ollama"));

    let plan = run(
        &home_b,
        &store_b,
        Some(&reg.url),
        &["fetch", MODEL, "--peer", &peer, "--dry-run", "--json"],
    );
    assert!(plan.status.success());
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    let entries = plan["plan"].as_array().unwrap();
    assert_eq!(entries.len(), hexes.len() + 1);
    assert!(entries.iter().all(|e| e["origin"] == "registry"), "{plan}");

    let out = run(
        &home_b,
        &store_b,
        Some(&reg.url),
        &["fetch", MODEL, "--peer", &peer, "--json"],
    );
    assert!(out.status.success());
    assert_same_tree(&origin, &store_b);
    assert_eq!(
        reg.served_bytes(),
        blob_bytes,
        "the registry served more than the blobs"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["bytes_from_hf"], blob_bytes);

    // That node now serves the model: the next one gets it from there, not the registry.
    let b = NodeProc::start_env(
        &home_b,
        None,
        None,
        "127.0.0.1",
        &["--no-ollama-scan"],
        &[("OLLAMA_MODELS", store_b.to_str().unwrap())],
    )
    .unwrap();
    let store_c = tmp.path().join("c-ollama");
    let out = run(
        &tmp.path().join("c"),
        &store_c,
        Some(&reg.url),
        &["fetch", MODEL, "--peer", &b.listen.to_string()],
    );
    assert!(out.status.success());
    assert_same_tree(&origin, &store_c);
    assert_eq!(
        reg.served_bytes(),
        blob_bytes,
        "the registry was asked again"
    );

    // Unknown tags are the registry's MANIFEST_UNKNOWN: exit 3.
    let out = run(
        &tmp.path().join("d"),
        &tmp.path().join("d-ollama"),
        Some(&reg.url),
        &["fetch", "ollama:tinyllm:99b"],
    );
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn a_corrupt_registry_blob_is_discarded() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = tmp.path().join("registry-store");
    let hexes = make_store(&origin);
    let reg = FakeRegistry::start(tmp.path(), &origin, &["--corrupt", &hexes[1]]).unwrap();
    let store = tmp.path().join("b-ollama");
    let out = run(
        &tmp.path().join("b"),
        &store,
        Some(&reg.url),
        &["fetch", MODEL],
    );
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sha256"));
    assert!(!manifest_path(&store).exists());
    assert!(!store.join(format!("blobs/sha256-{}", hexes[1])).exists());
}

/// Three nodes pull one model from the registry at the same moment: they split each blob's
/// pieces and swap the rest, so the registry serves the model about once, not three times.
#[test]
fn three_nodes_at_once_pull_each_byte_from_the_registry_once() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = tmp.path().join("registry-store");
    let hexes = make_store_sized(&origin, (40 << 20) + 3);
    let blob_bytes: u64 = sizes(&origin, &hexes).iter().map(|(_, s)| s).sum();
    let reg = FakeRegistry::start(tmp.path(), &origin, &[]).unwrap();
    let env = [("OLLAMA_REGISTRY", reg.url.as_str())];
    let nodes: Vec<NodeProc> = (0..3)
        .map(|i| {
            let home = tmp.path().join(format!("n{i}"));
            NodeProc::start_env(&home, Some("fleet"), None, "127.0.0.1", &[], &env).unwrap()
        })
        .collect();
    let fetches: Vec<_> = nodes
        .iter()
        .map(|n| {
            let mut args = vec!["fetch".to_string(), MODEL.to_string(), "--json".into()];
            for other in nodes.iter().filter(|o| o.listen != n.listen) {
                args.push("--peer".into());
                args.push(other.listen.to_string());
            }
            n.spawn_cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .collect();
    for (i, child) in fetches.into_iter().enumerate() {
        let run = finish(
            child,
            &format!("fetch on node {i}"),
            Duration::from_secs(120),
        );
        assert!(run.status.success(), "fetch on node {i} failed");
    }
    for n in &nodes {
        // `mesh_cmd` points each command's OLLAMA_MODELS at HOME/ollama.
        assert_same_tree(&origin, &n.home.join("ollama"));
    }
    let served = reg.served_bytes();
    eprintln!(
        "blobs {blob_bytes} bytes; the registry served {served} ({:.3}x)",
        served as f64 / blob_bytes as f64
    );
    assert!(
        served * 100 <= blob_bytes * 102,
        "the registry served {served} bytes for {blob_bytes} bytes of blobs"
    );
}
