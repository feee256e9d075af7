//! Issue E: real HuggingFace clients — huggingface_hub, the `hf` CLI, transformers and the Rust
//! `hf-hub` crate — through a mesh node's HF endpoint get the same files, commits and
//! exception classes as from the Hub stand-in directly. Each client call runs with a cache of
//! its own, once against `fake-hf` and once against the node (whose own `HF_ENDPOINT` is
//! `fake-hf`).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::{prereq, util::*};

const TINY: &str = "org/tiny";
const DIFF: &str = "org/diffusers";
const GATED: &str = "org/gated";
const TOKEN: &str = "hf_secret";
/// A one-part id the stand-in moved to `TINY`, as the Hub moved `gpt2` under an org.
const ONE_PART: &str = "tiny";
/// A renamed repo the stand-in redirects to `TINY`.
const RENAMED: &str = "old-org/tiny";
/// A dataset: the node passes it on to the Hub.
const DATA: &str = "org/data";

/// A tokenizer-and-config repo transformers can load, a weight file (LFS) and a sub-folder.
fn make_tiny(dir: &Path, seed: u64) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-bert");
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(fixture).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    write_file(&dir.join("model.safetensors"), (3 << 20) + 17, seed);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/extra.json"), b"{\"extra\": true}\n").unwrap();
}

/// A diffusers-style repo: model_index.json, components in folders, fp32 and fp16 weights.
fn make_diffusers(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("model_index.json"),
        br#"{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}"#,
    )
    .unwrap();
    for (i, comp) in ["unet", "text_encoder", "vae"].iter().enumerate() {
        let i = i as u64;
        std::fs::create_dir_all(dir.join(comp)).unwrap();
        std::fs::write(dir.join(comp).join("config.json"), b"{}\n").unwrap();
        let name = if *comp == "text_encoder" {
            "model"
        } else {
            "diffusion_pytorch_model"
        };
        write_file(
            &dir.join(comp).join(format!("{name}.safetensors")),
            (4 << 20) + i,
            50 + i,
        );
        write_file(
            &dir.join(comp).join(format!("{name}.fp16.safetensors")),
            (2 << 20) + i,
            60 + i,
        );
    }
    std::fs::create_dir_all(dir.join("scheduler")).unwrap();
    std::fs::write(dir.join("scheduler/scheduler_config.json"), b"{}\n").unwrap();
}

struct Setup {
    tmp: tempfile::TempDir,
    hub: FakeHub,
    node: NodeProc,
    /// The repo folders, by id.
    dirs: Vec<(String, PathBuf)>,
}

impl Setup {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let tiny = tmp.path().join("tiny");
        make_tiny(&tiny, 41);
        let tiny_v1 = tmp.path().join("tiny-v1");
        make_tiny(&tiny_v1, 41);
        let gated = tmp.path().join("gated");
        make_tiny(&gated, 42);
        std::fs::write(
            tiny_v1.join("config.json"),
            b"{\"model_type\": \"bert\", \"vocab_size\": 20, \"v\": 1}\n",
        )
        .unwrap();
        let diff = tmp.path().join("diffusers");
        make_diffusers(&diff);
        let data = tmp.path().join("data");
        write_file(&data.join("data/train.parquet"), 300_017, 43);
        std::fs::write(data.join("README.md"), b"# a dataset\n").unwrap();
        let args = [
            "--repo".to_string(),
            format!("{TINY}={}", tiny.display()),
            "--repo".into(),
            format!("{TINY}@v1.0={}", tiny_v1.display()),
            "--repo".into(),
            format!("{DIFF}={}", diff.display()),
            "--repo".into(),
            format!("{GATED}={}", gated.display()),
            "--gated".into(),
            GATED.into(),
            "--token".into(),
            TOKEN.into(),
            "--moved".into(),
            format!("{ONE_PART}={TINY}"),
            "--moved".into(),
            format!("{RENAMED}={TINY}"),
            "--dataset".into(),
            format!("{DATA}={}", data.display()),
            // Listings come in pages, so that clients and the node follow them.
            "--tree-page-size".into(),
            "5".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let hub = FakeHub::start(tmp.path(), None, "127.0.0.1", &args).unwrap();
        let node = NodeProc::start_env(
            &tmp.path().join("node"),
            None,
            None,
            "127.0.0.1",
            &[],
            &[("HF_ENDPOINT", hub.endpoint.as_str())],
        )
        .unwrap();
        let dirs = vec![(TINY.into(), tiny), (DIFF.into(), diff)];
        Self {
            tmp,
            hub,
            node,
            dirs,
        }
    }

    fn node_endpoint(&self) -> String {
        format!("http://{}", self.node.api)
    }

    /// A fresh client cache folder.
    fn home(&self, name: &str) -> PathBuf {
        let dir = self.tmp.path().join("clients").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// One client call direct and through the node; asserts both got the same, and returns it.
    fn same(
        &self,
        label: &str,
        token: Option<&str>,
        args: &[&str],
        table: &mut Vec<String>,
    ) -> serde_json::Value {
        let direct = hf_client(
            &self.hub.endpoint,
            &self.home(&format!("{label}-direct")),
            token,
            args,
        );
        let via = hf_client(
            &self.node_endpoint(),
            &self.home(&format!("{label}-node")),
            token,
            args,
        );
        let strip = |v: &serde_json::Value| {
            let mut v = v.clone();
            v.as_object_mut().unwrap().remove("seconds");
            v
        };
        table.push(format!(
            "| {label} | {} s | {} s | {} |",
            direct["seconds"],
            via["seconds"],
            if strip(&direct) == strip(&via) {
                "yes"
            } else {
                "NO"
            }
        ));
        assert_eq!(
            strip(&direct),
            strip(&via),
            "{label}: direct vs through the node"
        );
        direct
    }
}

#[test]
fn real_clients_get_the_same_through_the_node_as_from_the_hub() {
    let test = "real_clients_get_the_same_through_the_node_as_from_the_hub";
    if !prereq::python(test, &["huggingface_hub", "transformers"]) {
        return;
    }
    let s = Setup::new();
    let mut table = vec![
        "| client call | direct | through the node | identical |".to_string(),
        "|---|---|---|---|".to_string(),
    ];
    // Metadata first: it must not move file content.
    s.same("model_info(repo)", None, &["info", TINY], &mut table);
    s.same(
        "model_info(repo, v1.0)",
        None,
        &["info", TINY, "--revision", "v1.0"],
        &mut table,
    );
    assert_eq!(s.hub.served_of(&format!("{TINY}/model.safetensors")), 0);
    s.same(
        "snapshot_download(*.json)",
        None,
        &["snapshot", TINY, "--allow", "*.json"],
        &mut table,
    );
    let weights = format!("{TINY}/model.safetensors");
    assert_eq!(
        s.hub.served_of(&weights),
        0,
        "a *.json snapshot fetched the weights"
    );
    s.same("snapshot_download", None, &["snapshot", TINY], &mut table);
    s.same(
        "hf_hub_download",
        None,
        &["download", TINY, "model.safetensors"],
        &mut table,
    );
    s.same(
        "hf_hub_download(v1.0)",
        None,
        &["download", TINY, "config.json", "--revision", "v1.0"],
        &mut table,
    );
    let info = hf_client(&s.hub.endpoint, &s.home("sha"), None, &["info", TINY]);
    let sha = info["sha"].as_str().unwrap().to_string();
    s.same(
        "hf_hub_download(pinned sha)",
        None,
        &["download", TINY, "config.json", "--revision", &sha],
        &mut table,
    );
    s.same("AutoConfig", None, &["config", TINY], &mut table);
    s.same("AutoTokenizer", None, &["tokenizer", TINY], &mut table);
    // Errors: the same exception classes.
    s.same(
        "missing file",
        None,
        &["download", TINY, "nope.json"],
        &mut table,
    );
    s.same(
        "unknown revision",
        None,
        &["download", TINY, "config.json", "--revision", "v9.9"],
        &mut table,
    );
    s.same(
        "unknown sha",
        None,
        &[
            "download",
            TINY,
            "config.json",
            "--revision",
            &"0".repeat(40),
        ],
        &mut table,
    );
    s.same(
        "unknown repo",
        None,
        &["download", "org/none", "config.json"],
        &mut table,
    );
    s.same(
        "gated, no token",
        None,
        &["download", GATED, "config.json"],
        &mut table,
    );
    s.same(
        "gated, token",
        Some(TOKEN),
        &["download", GATED, "config.json"],
        &mut table,
    );
    // The weights crossed from the Hub twice for the direct calls that ask for them (the
    // snapshot and hf_hub_download, each with a cache of its own) and once for the node, for
    // both of its clients.
    assert_eq!(
        s.hub.served_of(&weights),
        3 * std::fs::metadata(s.dirs[0].1.join("model.safetensors"))
            .unwrap()
            .len(),
        "the node fetched the weights more than once"
    );
    moved_and_dataset_calls_match(&s, &mut table);
    hf_cli_matches(&s, &mut table);
    hf_ls_matches(&s, &mut table);
    hf_hub_crate_matches(&s, &mut table);
    eprintln!("{}", table.join("\n"));
}

/// Repos the Hub moved, and a dataset the node passes on to the Hub: the same as direct.
fn moved_and_dataset_calls_match(s: &Setup, table: &mut Vec<String>) {
    // Moved repos: the client follows the node's redirect and loads the repo by its new id.
    s.same("model_info(one-part id)", None, &["info", ONE_PART], table);
    s.same(
        "AutoTokenizer(one-part id)",
        None,
        &["tokenizer", ONE_PART],
        table,
    );
    s.same(
        "hf_hub_download(renamed repo)",
        None,
        &["download", RENAMED, "model.safetensors"],
        table,
    );
    // A dataset: passed on to the Hub as it came, answers included.
    let dataset = ["--repo-type", "dataset"];
    for (label, args, ok) in [
        ("dataset: snapshot_download", &["snapshot", DATA][..], true),
        (
            "dataset: hf_hub_download",
            &["download", DATA, "README.md"][..],
            true,
        ),
        (
            "dataset: missing file",
            &["download", DATA, "nope.csv"][..],
            false,
        ),
        (
            "dataset: get_paths_info (POST)",
            &["paths", DATA, "README.md"][..],
            true,
        ),
        (
            "dataset: a model's id",
            &["download", TINY, "config.json"][..],
            false,
        ),
    ] {
        let got = s.same(label, None, &[args, &dataset[..]].concat(), table);
        assert_eq!(got["ok"], ok, "{label}: {got}");
    }
}

/// `hf download REPO --local-dir DIR`, direct and through the node: the same files.
fn hf_cli_matches(s: &Setup, table: &mut Vec<String>) {
    let run = |endpoint: &str, label: &str| {
        let out = s.tmp.path().join(format!("cli-{label}"));
        let started = Instant::now();
        let status = Command::new("hf")
            .args(["download", TINY, "--local-dir"])
            .arg(&out)
            .env("HF_ENDPOINT", endpoint)
            .env("HF_HOME", s.home(&format!("cli-{label}")))
            .env("HF_HUB_DISABLE_TELEMETRY", "1")
            .env_remove("HF_TOKEN")
            .status()
            .expect("the hf CLI runs");
        assert!(status.success(), "hf download ({label}) failed");
        (out, started.elapsed().as_secs_f64())
    };
    let (direct, t1) = run(&s.hub.endpoint, "direct");
    let (via, t2) = run(&s.node_endpoint(), "node");
    let strip = |dir: &Path| {
        let _ = std::fs::remove_dir_all(dir.join(".cache"));
    };
    strip(&direct);
    strip(&via);
    assert_same_tree(&direct, &via);
    assert_same_tree(&s.dirs[0].1, &via);
    table.push(format!(
        "| hf download (CLI) | {t1:.3} s | {t2:.3} s | yes |"
    ));
}

/// `hf models ls REPO -R --format json` (an expanded listing: each file's last commit, 50 to
/// a page), direct and through the node: the same entries, dates included.
fn hf_ls_matches(s: &Setup, table: &mut Vec<String>) {
    let run = |endpoint: &str, label: &str| {
        let started = Instant::now();
        let out = Command::new("hf")
            .args(["models", "ls", DIFF, "-R", "--format", "json"])
            .env("HF_ENDPOINT", endpoint)
            .env("HF_HOME", s.home(&format!("ls-{label}")))
            .env("HF_HUB_DISABLE_TELEMETRY", "1")
            .env_remove("HF_TOKEN")
            .output()
            .expect("the hf CLI runs");
        assert!(out.status.success(), "hf models ls ({label}) failed");
        let listing: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("hf models ls prints JSON");
        (listing, started.elapsed().as_secs_f64())
    };
    let (direct, t1) = run(&s.hub.endpoint, "direct");
    let (via, t2) = run(&s.node_endpoint(), "node");
    assert_eq!(direct, via, "hf models ls: direct vs through the node");
    let dated = direct
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| !e["last_commit"].is_null())
        .count();
    assert!(dated > 0, "no entry has its last commit: {direct}");
    // The next page is asked of the node, not of the Hub behind it.
    let first = format!("/api/models/{DIFF}/tree/main?recursive=true&expand=true");
    let (status, link) = raw_header(s.node.api, "GET", &first, None, None, "link");
    assert_eq!(status, 200);
    let node = format!("<http://{}/api/models/{DIFF}/tree/main?", s.node.api);
    assert!(link.starts_with(&node), "next page: {link}");
    table.push(format!(
        "| hf models ls -R ({dated} entries dated) | {t1:.3} s | {t2:.3} s | yes |"
    ));
}

/// The Rust `hf-hub` crate: a file, revision info, and a missing file.
fn hf_hub_crate_matches(s: &Setup, table: &mut Vec<String>) {
    let bin = mesh_bin().with_file_name("hf-hub-client");
    let run = |endpoint: &str, label: &str, repo: &str, args: &[&str]| {
        let started = Instant::now();
        let out = Command::new(&bin)
            .args(["--endpoint", endpoint, "--cache"])
            .arg(s.home(&format!("hfhub-{label}")))
            .args(["--repo", repo])
            .args(args)
            .output()
            .expect("hf-hub-client runs");
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("hf-hub-client prints JSON");
        (v, started.elapsed().as_secs_f64())
    };
    for (label, repo, args) in [
        ("get", TINY, &["get", "model.safetensors"][..]),
        ("get (one-part id)", ONE_PART, &["get", "config.json"][..]),
        ("info", TINY, &["info"][..]),
        ("missing", TINY, &["get", "nope.json"][..]),
    ] {
        let (direct, t1) = run(&s.hub.endpoint, &format!("{label}-direct"), repo, args);
        let (via, t2) = run(&s.node_endpoint(), &format!("{label}-node"), repo, args);
        // Errors name the URL, which differs; their kind must not.
        let same = if direct["ok"] == true {
            direct == via
        } else {
            via["ok"] == false && via["error"].as_str().unwrap().contains("404")
        };
        table.push(format!(
            "| hf-hub {label} | {t1:.3} s | {t2:.3} s | {} |",
            if same { "yes" } else { "NO" }
        ));
        assert!(same, "hf-hub {label}: {direct} vs {via}");
    }
}

#[test]
fn a_diffusers_fp16_selection_fetches_only_the_fp16_files() {
    let test = "a_diffusers_fp16_selection_fetches_only_the_fp16_files";
    if !prereq::python(test, &["huggingface_hub"]) {
        return;
    }
    let s = Setup::new();
    let got = hf_client(
        &s.node_endpoint(),
        &s.home("fp16"),
        None,
        &[
            "snapshot",
            DIFF,
            "--allow",
            "*.json",
            "--allow",
            "*.fp16.safetensors",
        ],
    );
    assert_eq!(got["ok"], true, "{got}");
    let files = got["files"].as_object().unwrap();
    // model_index.json, the scheduler's and three components' configs, three fp16 weights.
    assert_eq!(files.len(), 8, "{files:?}");
    let stats = s.hub.stats();
    for (file, served) in stats["served_per_file"].as_object().unwrap() {
        let served = served.as_u64().unwrap();
        if file.ends_with(".safetensors") && !file.contains(".fp16.") {
            assert_eq!(
                served, 0,
                "{file}: fp32 weights fetched for an fp16 selection"
            );
        }
    }
    let fp16: u64 = (0..3).map(|i| (2 << 20) + i).sum();
    let served: u64 = stats["served_bytes"].as_u64().unwrap();
    assert!(
        served < fp16 + (64 << 10),
        "served {served} bytes for {fp16} of fp16 weights"
    );
}

#[test]
fn eight_clients_at_once_on_a_cold_repo_share_one_download() {
    let test = "eight_clients_at_once_on_a_cold_repo_share_one_download";
    if !prereq::python(test, &["huggingface_hub"]) {
        return;
    }
    let s = Setup::new();
    let endpoint = s.node_endpoint();
    let homes: Vec<PathBuf> = (0..8).map(|i| s.home(&format!("c{i}"))).collect();
    let results: Vec<serde_json::Value> = std::thread::scope(|scope| {
        let runs: Vec<_> = homes
            .iter()
            .map(|home| scope.spawn(|| hf_client(&endpoint, home, None, &["snapshot", TINY])))
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["files"], results[0]["files"]);
    }
    let size: u64 = list_files(&s.dirs[0].1)
        .iter()
        .map(|f| std::fs::metadata(s.dirs[0].1.join(f)).unwrap().len())
        .sum();
    let served = s.hub.served_bytes();
    assert!(
        served <= size,
        "the Hub served {served} bytes for a {size}-byte repo"
    );
    // The store stayed consistent: a fetch afterwards finds everything here.
    let out = s.tmp.path().join("out");
    let run = mesh(
        &s.node.home,
        None,
        &["fetch", TINY, "--json", "--to", out.to_str().unwrap()],
    );
    assert!(run.status.success());
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["bytes_from_hf"], 0, "{report}");
    assert_same_tree(&s.dirs[0].1, &out);
}

#[test]
fn gated_repos_need_a_token_the_hub_accepts_and_foreign_hosts_are_refused() {
    let s = Setup::new();
    let url = format!("/{GATED}/resolve/main/config.json");
    let status =
        |auth: Option<&str>, host: Option<&str>| raw_status(s.node.api, "GET", &url, auth, host);
    assert_eq!(status(None, None), (401, "GatedRepo".into()));
    assert_eq!(status(Some("hf_wrong"), None), (403, "GatedRepo".into()));
    assert_eq!(status(Some(TOKEN), None), (200, String::new()));
    // Cached metadata and content are no key either: a request without a token is refused.
    assert_eq!(status(None, None), (401, "GatedRepo".into()));
    // The node owner's API token opens it.
    let owner = api_token(&s.node.home);
    let owner = owner.as_str();
    assert_eq!(status(Some(owner), None), (200, String::new()));
    // It opens the node, never the Hub: a request passed on goes without it (the stand-in
    // answers 401 to a token that is no HF token).
    assert!(!owner.starts_with("hf_"));
    let data = format!("/api/datasets/{DATA}/revision/main");
    let passed = raw_status(s.node.api, "GET", &data, Some(owner), None);
    assert_eq!(passed, (200, String::new()));
    // The node's own routes are never passed on.
    assert_eq!(
        raw_status(s.node.api, "GET", "/v1/nothing", None, None).0,
        404
    );
    let requests = s.hub.stats()["requests"].to_string();
    assert!(requests.contains(&format!("GET {data} 200")), "{requests}");
    assert!(!requests.contains("/v1/nothing"), "{requests}");
    // A read passed on with it is the node owner's: it goes with the node's HF token if the
    // node has one (the expanded listing `hf models ls` asks for), else with none.
    let expand = format!("/api/models/{GATED}/tree/main?expand=true");
    assert_eq!(
        raw_status(s.node.api, "GET", &expand, Some(owner), None).0,
        401
    );
    let env = [
        ("HF_ENDPOINT", s.hub.endpoint.as_str()),
        ("HF_TOKEN", TOKEN),
    ];
    let home = s.tmp.path().join("owned");
    let with_token = NodeProc::start_env(&home, None, None, "127.0.0.1", &[], &env).unwrap();
    assert_eq!(
        raw_status(
            with_token.api,
            "GET",
            &expand,
            Some(&api_token(&home)),
            None
        ),
        (200, String::new())
    );
    // A page that made its own name resolve to 127.0.0.1 (DNS rebinding) gets nothing.
    assert_eq!(status(Some(TOKEN), Some("attacker.example")).0, 403);
    assert_eq!(
        raw_status(
            s.node.api,
            "GET",
            "/v1/models",
            None,
            Some("attacker.example:7342")
        )
        .0,
        403
    );
    eprintln!(
        "gated: no token 401 GatedRepo, wrong token 403 GatedRepo, foreign Host 403, the owner's read passed on with the node's HF token"
    );
}

/// The API token of the node on `home`, from its `node.json`.
fn api_token(home: &Path) -> String {
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(home.join("node.json")).unwrap()).unwrap();
    info["token"].as_str().unwrap().to_string()
}

/// A repo the Hub moved is redirected by the node as the stand-in redirects it, to the same
/// route about the new id, and still after the Hub became unreachable.
#[test]
fn moved_repos_are_redirected_as_the_hub_redirects_them_also_offline() {
    let mut s = Setup::new();
    let hub: std::net::SocketAddr = s
        .hub
        .endpoint
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let location = |api, path: &str| raw_header(api, "GET", path, None, None, "location");
    let paths = [
        format!("/api/models/{ONE_PART}/revision/main?blobs=true"),
        format!("/{ONE_PART}/resolve/main/config.json"),
        format!("/api/models/{RENAMED}"),
        format!("/{RENAMED}/resolve/main/sub/extra.json"),
    ];
    for path in &paths {
        let direct = location(hub, path);
        assert_eq!(direct.0, 307, "the stand-in redirects {path}");
        assert!(direct.1.contains(&format!("{TINY}/")) || direct.1.ends_with(TINY));
        assert_eq!(location(s.node.api, path), direct, "{path}");
    }
    // The node asked the Hub about the one-part id once (the stand-in's log also holds the one
    // direct request above), not once per request.
    let again = format!("/{ONE_PART}/resolve/main/sub/extra.json");
    assert_eq!(location(s.node.api, &again).0, 307);
    let asked = s.hub.stats()["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            let r = r.as_str().unwrap();
            r.starts_with(&format!("GET /api/models/{ONE_PART}/revision/main"))
        })
        .count();
    assert_eq!(
        asked, 2,
        "the node asked the Hub about {ONE_PART} per request"
    );
    // An unknown one-part id is what the Hub says it is.
    let unknown = "/nothing-here/resolve/main/config.json";
    assert_eq!(raw_status(s.node.api, "GET", unknown, None, None).0, 404);
    s.hub.child.kill().unwrap();
    s.hub.child.wait().unwrap();
    for path in [&paths[1], &paths[2]] {
        assert_eq!(location(s.node.api, path).0, 307, "offline: {path}");
    }
    // And after a restart, from the store.
    s.node.child.kill().unwrap();
    s.node.child.wait().unwrap();
    let env = [("HF_ENDPOINT", s.hub.endpoint.as_str())];
    s.node = NodeProc::start_env(&s.node.home.clone(), None, None, "127.0.0.1", &[], &env).unwrap();
    for path in [&paths[1], &paths[2]] {
        assert_eq!(
            location(s.node.api, path).0,
            307,
            "restarted, offline: {path}"
        );
    }
    eprintln!(
        "moved: {} routes redirected as the Hub does, 2 of them offline, also after a restart",
        paths.len()
    );
}

/// Status and `X-Error-Code` of one raw HTTP/1.1 request to the node's API.
fn raw_status(
    api: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    host: Option<&str>,
) -> (u16, String) {
    raw_header(api, method, path, token, host, "x-error-code")
}

/// Status and one header's value (empty if absent) of one raw HTTP/1.1 request.
fn raw_header(
    api: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    host: Option<&str>,
    header: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(api).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let host = host.map_or(api.to_string(), str::to_string);
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some(token) = token {
        req.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).unwrap();
    let mut resp = Vec::new();
    let _ = stream.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let code = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(header).then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, code)
}
