//! Spawning `mesh` processes, making test files, reading a node's counters.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// File sizes that hit distinct code paths:
/// - 0: the empty blob (no chunks; never fetched, always complete);
/// - 1: a single partial chunk;
/// - 16 KiB - 1, 16 KiB, 16 KiB + 1: one chunk group exactly, minus and plus one byte (the
///   outboard goes from no parent pair to one);
/// - 5 MiB + 3: many chunk groups, several pieces, an unaligned tail.
pub const INTERESTING_SIZES: [u64; 6] = [0, 1, 16383, 16384, 16385, (5 << 20) + 3];

/// The `mesh` binary under test.
pub fn mesh_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("MESH_BIN") {
        return bin.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("release/mesh");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --release -p mesh-cli` first (README's test command does)",
        bin.display()
    );
    bin
}

/// Deterministic pseudo-random bytes (fast, and different for each seed).
pub fn test_bytes(size: u64, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(size as usize + 8);
    while (out.len() as u64) < size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(size as usize);
    out
}

/// Writes `size` test bytes to `path`, creating parent folders.
pub fn write_file(path: &Path, size: u64, seed: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, test_bytes(size, seed)).unwrap();
}

/// A `mesh` command with `MESH_HOME` and (optionally) `MESH_KEY` set, optionally inside a
/// network namespace.
pub fn mesh_cmd(home: &Path, key: Option<&str>, netns: Option<&str>) -> Command {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(mesh_bin());
            c
        }
        None => Command::new(mesh_bin()),
    };
    // Hermetic: no HF token, endpoint or cache of the machine leaks into a test.
    cmd.env("MESH_HOME", home)
        .env("HF_HOME", home.join("hf-home"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_ENDPOINT")
        .env_remove("MESH_KEY")
        .env_remove("RUST_LOG")
        .env("OLLAMA_MODELS", home.join("ollama"))
        .env_remove("OLLAMA_REGISTRY");
    if let Ok(filter) = std::env::var("MESH_TEST_LOG") {
        // A log filter for the nodes under test only (RUST_LOG would also reach the harness).
        cmd.env("RUST_LOG", filter);
    }
    if netns.is_none() {
        // Loopback tests name their peers; mDNS would let concurrent tests find each other.
        cmd.env("MESH_NO_MDNS", "1");
    } else {
        cmd.env_remove("MESH_NO_MDNS");
    }
    if let Some(key) = key {
        cmd.env("MESH_KEY", key);
    }
    cmd
}

/// Runs `mesh ARGS` to completion.
pub fn mesh(home: &Path, key: Option<&str>, args: &[&str]) -> Output {
    let out = mesh_cmd(home, key, None)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("mesh runs");
    print_output(&format!("mesh {}", args.join(" ")), &out);
    out
}

/// `mesh add PATH --name NAME`, returning the model id.
pub fn add(home: &Path, key: Option<&str>, path: &Path, name: &str) -> String {
    let out = mesh(home, key, &["add", path.to_str().unwrap(), "--name", name]);
    assert!(out.status.success(), "mesh add failed");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A running `mesh node`; killed when dropped.
pub struct NodeProc {
    /// The process.
    pub child: Child,
    /// Its store.
    pub home: PathBuf,
    /// Its QUIC address.
    pub listen: SocketAddr,
    /// Its local API address.
    pub api: SocketAddr,
    /// The network namespace it runs in, if any.
    pub netns: Option<String>,
    /// Its mesh key.
    pub key: Option<String>,
}

impl NodeProc {
    /// Starts `mesh node` on `listen_ip` (port chosen by the OS) and waits until it serves.
    pub fn start(home: &Path, key: Option<&str>, listen_ip: &str, extra: &[&str]) -> Result<Self> {
        Self::start_in(home, key, None, listen_ip, extra)
    }

    /// As [`NodeProc::start`], inside network namespace `netns` if given.
    pub fn start_in(
        home: &Path,
        key: Option<&str>,
        netns: Option<&str>,
        listen_ip: &str,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_env(home, key, netns, listen_ip, extra, &[])
    }

    /// As [`NodeProc::start_in`], with extra environment variables for the node.
    pub fn start_env(
        home: &Path,
        key: Option<&str>,
        netns: Option<&str>,
        listen_ip: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        std::fs::create_dir_all(home)?;
        let info_path = home.join("node.json");
        let _ = std::fs::remove_file(&info_path);
        let log = std::fs::File::create(home.join("node.log"))?;
        let mut cmd = mesh_cmd(home, key, netns);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .args([
                "node",
                "--listen",
                &format!("{listen_ip}:0"),
                "--api",
                "127.0.0.1:0",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning mesh node")?;
        let mut node = Self {
            child,
            home: home.to_path_buf(),
            listen: "0.0.0.0:0".parse()?,
            api: "0.0.0.0:0".parse()?,
            netns: netns.map(str::to_string),
            key: key.map(str::to_string),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&info_path) {
                if let Ok(info) = serde_json::from_str::<serde_json::Value>(&text) {
                    node.listen = info["listen"].as_str().context("listen")?.parse()?;
                    node.api = info["api"].as_str().context("api")?.parse()?;
                    return Ok(node);
                }
            }
            if let Some(status) = node.child.try_wait()? {
                bail!("mesh node exited early ({status}): {}", node.log());
            }
            if Instant::now() > deadline {
                bail!("mesh node did not start: {}", node.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("node.log")).unwrap_or_default()
    }

    /// A counter from the node's `/metrics` (through `mesh status` inside a namespace, whose
    /// loopback API this process can't reach).
    pub fn counter(&self, name: &str) -> u64 {
        if let Some(ns) = &self.netns {
            let out = mesh_cmd(&self.home, self.key.as_deref(), Some(ns))
                .arg("status")
                .output()
                .expect("mesh status runs");
            let status: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("mesh status prints JSON");
            return status["counters"][name]
                .as_u64()
                .unwrap_or_else(|| panic!("no counter {name} in {status}"));
        }
        let body = http_get(self.api, "/metrics").expect("metrics answer");
        body.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no counter {name} in {body}"))
    }

    /// Runs `mesh ARGS` against this node's store, in its namespace; does not wait.
    pub fn spawn_cli(&self, args: &[&str]) -> Child {
        mesh_cmd(&self.home, self.key.as_deref(), self.netns.as_deref())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mesh runs")
    }

    /// Runs `mesh fetch MODEL --json --to HOME/out` on this node; does not wait.
    pub fn spawn_fetch_to_out(&self, model: &str) -> Child {
        let out = self.home.join("out");
        self.spawn_cli(&[
            "fetch",
            model,
            "--json",
            "--to",
            out.to_str().expect("UTF-8 path"),
        ])
    }

    /// The node's peer table, `mesh peers --json` run in its namespace (whose loopback API
    /// this process can't reach).
    pub fn peer_table(&self) -> Result<Vec<serde_json::Value>> {
        let out = self.spawn_cli(&["peers", "--json"]).wait_with_output()?;
        let table: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "mesh peers --json: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        match table {
            serde_json::Value::Array(rows) => Ok(rows),
            _ => bail!("mesh peers --json prints a list"),
        }
    }

    /// How many peers this node holds a connection to.
    pub fn connected_peers(&self) -> Result<usize> {
        Ok(self
            .peer_table()?
            .iter()
            .filter(|p| p["connected"].as_bool() == Some(true))
            .count())
    }
}

/// Waits until every node in `nodes` holds a connection to every other one.
pub fn wait_for_full_mesh(nodes: &[NodeProc], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for n in nodes {
        while n.connected_peers()? < nodes.len() - 1 {
            if Instant::now() > deadline {
                bail!("nodes did not find each other within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 GET against the node's local API, returning the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP body")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {head}");
    }
    Ok(body.to_string())
}

/// Every regular file below `dir`, as sorted relative paths.
pub fn list_files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(
                    path.strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Asserts two folders hold the same files with the same bytes.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let files = list_files(a);
    assert_eq!(files, list_files(b), "file lists differ");
    for f in files {
        let (x, y) = (
            std::fs::read(a.join(&f)).unwrap(),
            std::fs::read(b.join(&f)).unwrap(),
        );
        assert!(x == y, "{f} differs");
    }
}

/// Waits for a spawned `mesh` command, killing it after `timeout`; prints its output.
pub fn finish(mut child: Child, what: &str, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    print_output(what, &out);
    out
}

/// A running `fake-hf` (the local HuggingFace stand-in); killed when dropped.
pub struct FakeHub {
    /// The process.
    pub child: Child,
    /// `http://IP:PORT` to use as `HF_ENDPOINT`.
    pub endpoint: String,
}

impl FakeHub {
    /// A hermetic `mesh` command ([`mesh_cmd`]) with this Hub as HuggingFace.
    pub fn mesh_cmd(&self, home: &Path) -> Command {
        let mut cmd = mesh_cmd(home, None, None);
        cmd.env("HF_ENDPOINT", &self.endpoint)
            .env_remove("HF_HUB_OFFLINE");
        cmd
    }

    /// Starts `fake-hf` with extra arguments (`--repo org/name=DIR`, `--gated`, `--corrupt`),
    /// listening on `ip` (API and CDN), optionally inside a namespace.
    pub fn start(dir: &Path, netns: Option<&str>, ip: &str, args: &[&str]) -> Result<Self> {
        let bin = mesh_bin().with_file_name("fake-hf");
        let addr_file = dir.join("fake-hf.addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = cmd
            .args([
                "--listen",
                &format!("{ip}:0"),
                "--cdn",
                &format!("{ip}:0"),
                "--addr-file",
            ])
            .arg(&addr_file)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut hub = Self {
            child,
            endpoint: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while hub.endpoint.is_empty() {
            if let Ok(text) = std::fs::read_to_string(&addr_file) {
                if let Some(api) = text.split_whitespace().next() {
                    hub.endpoint = format!("http://{api}");
                }
            }
            if Instant::now() > deadline {
                bail!("fake-hf did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(hub)
    }

    /// Body bytes the fake Hub has served so far (API and CDN).
    pub fn served_bytes(&self) -> u64 {
        self.stats()["served_bytes"].as_u64().unwrap()
    }

    /// File bytes the fake Hub has handed to its connections so far (counted as bodies
    /// stream, 64 KiB at a time), to measure a client's download rate over time.
    pub fn sent_bytes(&self) -> u64 {
        self.served_bytes()
    }

    /// The fake Hub's counters: `served_bytes`, `served_per_file` (by `org/name/path`) and
    /// `requests` (`METHOD uri [range] status`).
    pub fn stats(&self) -> serde_json::Value {
        let addr: SocketAddr = self.endpoint.trim_start_matches("http://").parse().unwrap();
        let body = http_get(addr, "/_stats").expect("fake-hf stats");
        serde_json::from_str(&body).unwrap()
    }

    /// Content bytes served so far of `org/name/path`.
    pub fn served_of(&self, file: &str) -> u64 {
        self.stats()["served_per_file"][file].as_u64().unwrap_or(0)
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs one HuggingFace client call (`tests/py/hf_client.py ARGS`) against `endpoint` with a
/// cache of its own under `home`, and returns what it printed (a JSON object).
pub fn hf_client(
    endpoint: &str,
    home: &Path,
    token: Option<&str>,
    args: &[&str],
) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/hf_client.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .args(args)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", home)
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN");
    if let Some(token) = token {
        cmd.env("HF_TOKEN", token);
    }
    let out = cmd.output().expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| {
        print_output(&format!("hf_client.py {}", args.join(" ")), &out);
        panic!("hf_client.py printed no JSON ({e})")
    })
}

/// A running `fake-ollama` (the local Ollama registry stand-in); killed when dropped.
pub struct FakeRegistry {
    /// The process.
    pub child: Child,
    /// `http://IP:PORT` to use as `OLLAMA_REGISTRY`.
    pub url: String,
}

impl FakeRegistry {
    /// Starts `fake-ollama` serving the Ollama store `store`, with extra arguments
    /// (`--corrupt HEX`).
    pub fn start(dir: &Path, store: &Path, args: &[&str]) -> Result<Self> {
        let bin = mesh_bin().with_file_name("fake-ollama");
        let addr_file = dir.join("fake-ollama.addr");
        let _ = std::fs::remove_file(&addr_file);
        let child = Command::new(&bin)
            .arg("--store")
            .arg(store)
            .arg("--addr-file")
            .arg(&addr_file)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut reg = Self {
            child,
            url: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while reg.url.is_empty() {
            if let Ok(text) = std::fs::read_to_string(&addr_file) {
                if let Some(api) = text.split_whitespace().next() {
                    reg.url = format!("http://{api}");
                }
            }
            if Instant::now() > deadline {
                bail!("fake-ollama did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(reg)
    }

    /// Blob bytes its CDN has served so far.
    pub fn served_bytes(&self) -> u64 {
        let addr: SocketAddr = self.url.trim_start_matches("http://").parse().unwrap();
        let body = http_get(addr, "/_stats").expect("fake-ollama stats");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["served_bytes"].as_u64().unwrap()
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Prints a finished command's exit code and output, for test logs.
pub fn print_output(what: &str, out: &Output) {
    eprintln!(
        "$ {what}\n  exit {:?}\n  stdout: {}\n  stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
