//! `mesh`: the command line. It parses arguments, calls into `mesh-node` and prints; nothing
//! else lives here.

use std::{
    io::IsTerminal,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mesh_node::{
    api::{AddRequest, FetchBody, FetchLine, ModelInfo, NodeClient},
    config::ConfigFile,
    fetch::{FetchProgress, FetchRequest},
    net::BindError,
    node::{Node, NodeConfig, NodeError, DEFAULT_API_PORT, DEFAULT_PORT},
    store::{Store, StoreError},
};
use mesh_proto::ModelRef;

/// Peer-to-peer model distribution for LANs.
#[derive(Debug, Parser)]
#[command(name = "mesh", version, about)]
struct Cli {
    /// The store folder [default: <cache dir>/mesh].
    #[arg(long, env = "MESH_HOME", global = true)]
    home: Option<PathBuf>,
    /// The shared mesh key; nodes with different keys refuse each other.
    #[arg(long, env = "MESH_KEY", global = true, hide_env_values = true)]
    mesh_key: Option<String>,
    /// Config file [default: <home>/config.toml].
    #[arg(long, env = "MESH_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log as JSON lines (for journald and log shippers).
    #[arg(long, global = true)]
    log_json: bool,
    /// Don't look for peers with mDNS (only --peer addresses are used).
    #[arg(long, env = "MESH_NO_MDNS", global = true, value_parser = clap::builder::FalseyValueParser::new())]
    no_mdns: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node: serve this store to peers until SIGINT/SIGTERM.
    Node {
        /// QUIC (UDP) listen address [default: 0.0.0.0:7341].
        #[arg(long, env = "MESH_LISTEN")]
        listen: Option<SocketAddr>,
        /// Local HTTP API address [default: 127.0.0.1:7342].
        #[arg(long, env = "MESH_API")]
        api: Option<SocketAddr>,
        /// Do not serve the local API.
        #[arg(long, conflicts_with = "api")]
        no_api: bool,
        /// Upload limit for the whole node, in bytes per second.
        #[arg(long, env = "MESH_MAX_UPLOAD")]
        max_upload: Option<u64>,
        /// Don't import (hash and serve) models found in the HuggingFace cache at start.
        #[arg(long)]
        no_hf_cache_scan: bool,
    },
    /// Hash a file or folder and share it as a model, in place (no copy). Prints the model id.
    Add {
        /// The file or folder.
        path: PathBuf,
        /// Model name [default: the file or folder name].
        #[arg(long)]
        name: Option<String>,
        /// Print a JSON summary instead.
        #[arg(long)]
        json: bool,
    },
    /// Fetch a model (by name or id) from LAN peers into a folder.
    Fetch {
        /// A catalog name (sd3.5_large), a model id, or a HuggingFace repo: org/name[@revision]
        /// or hf://org/name.
        model: String,
        /// A peer to fetch from besides those found by mDNS, IP:PORT; repeat for several.
        #[arg(long = "peer")]
        peers: Vec<SocketAddr>,
        /// Target folder [default: ./<model name>].
        #[arg(long)]
        to: Option<PathBuf>,
        /// HuggingFace revision (branch, tag or commit); same as org/name@revision.
        #[arg(long)]
        revision: Option<String>,
        /// Only files matching this glob (HuggingFace repos); repeatable.
        #[arg(long)]
        include: Vec<String>,
        /// Skip files matching this glob (HuggingFace repos); repeatable.
        #[arg(long)]
        exclude: Vec<String>,
        /// Show each file, its size and where it would come from; move nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also put the model into the HuggingFace cache (HF_HUB_CACHE / HF_HOME), linked.
        #[arg(long)]
        hf_cache: bool,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List the peers this node sees: address, models, transfer rates.
    Peers {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the running node's address and counters (JSON).
    Status,
    /// List the models in this store.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Exit codes scripts can rely on (documented in README.md); fetch errors carry their own
/// (`FetchError::exit_code`).
mod exit {
    pub(crate) const ERROR: u8 = 1;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime starts");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(hint) = hint(&e) {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

fn init_tracing(cli: &Cli) {
    let default = match cli.command {
        Command::Node { .. } => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(cli: Cli) -> Result<()> {
    let home = match cli.home {
        Some(home) => home,
        None => dirs::cache_dir()
            .context("no cache dir on this system: set MESH_HOME")?
            .join("mesh"),
    };
    let config_path = cli
        .config
        .clone()
        .unwrap_or_else(|| home.join("config.toml"));
    let config = ConfigFile::load(&config_path, cli.config.is_some())?;
    let mesh_key = cli
        .mesh_key
        .or(config.mesh_key.clone())
        .filter(|k| !k.is_empty());
    match cli.command {
        Command::Node {
            listen,
            api,
            no_api,
            max_upload,
            no_hf_cache_scan,
        } => {
            let config =
                NodeConfig {
                    home,
                    listen: listen
                        .or(config.listen)
                        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))),
                    api: if no_api {
                        None
                    } else {
                        Some(api.or(config.api).unwrap_or_else(|| {
                            SocketAddr::from(([127, 0, 0, 1], DEFAULT_API_PORT))
                        }))
                    },
                    mesh_key,
                    max_upload: max_upload.or(config.max_upload),
                    mdns: !cli.no_mdns,
                    aliases: config.aliases.clone(),
                    hf_cache_scan: !no_hf_cache_scan,
                };
            run_node(config).await
        }
        Command::Add { path, name, json } => add(&home, path, name, json).await,
        Command::Fetch {
            model,
            peers,
            to,
            revision,
            include,
            exclude,
            dry_run,
            hf_cache,
            json,
        } => {
            let model = match revision {
                Some(rev) if !model.contains('@') => format!("{model}@{rev}"),
                Some(_) => anyhow::bail!("give the revision once: as --revision or as @revision"),
                None => model,
            };
            let node = embedded_config(home.clone(), mesh_key, !cli.no_mdns, &config);
            let opts = FetchOpts {
                include,
                exclude,
                dry_run,
                hf_cache: hf_cache || config.hf_cache,
                json,
            };
            run_fetch(node, model, peers, to, opts).await
        }
        Command::Peers { json } => {
            let node = embedded_config(home.clone(), mesh_key, !cli.no_mdns, &config);
            peers(node, json).await
        }
        Command::Ls { json } => ls(&home, json).await,
        Command::Status => {
            let client = NodeClient::discover(&home)
                .await
                .context("no node is running on this store (start one with `mesh node`)")?;
            println!("{}", serde_json::to_string_pretty(&client.status().await?)?);
            Ok(())
        }
    }
}

async fn run_node(config: NodeConfig) -> Result<()> {
    let node = Node::spawn(config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

async fn add(
    home: &std::path::Path,
    path: PathBuf,
    name: Option<String>,
    json: bool,
) -> Result<()> {
    let path = std::fs::canonicalize(&path).with_context(|| format!("{}", path.display()))?;
    let info = match open_store(home).await {
        Ok(store) => {
            let show = std::io::stderr().is_terminal() && !json;
            let bar = show.then(|| progress_bar(0));
            let manifest = tokio::task::spawn_blocking(move || {
                store.add_path(&path, name, &mut |p| {
                    if let Some(bar) = &bar {
                        bar.set_length(p.total);
                        bar.set_position(p.done);
                        bar.set_message(p.path.to_string());
                    }
                })
            })
            .await??;
            ModelInfo {
                id: manifest.id().to_string(),
                name: manifest.name().to_string(),
                size: manifest.total_size(),
                complete: true,
                files: Some(manifest.files().len()),
            }
        }
        Err(StoreError::Locked(_)) => {
            let client = NodeClient::discover(home)
                .await
                .context("the store is held by a running node whose local API does not answer")?;
            client.add(&AddRequest { path, name }).await?
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        eprintln!(
            "added {} ({} files, {})",
            info.name,
            info.files.unwrap_or(0),
            human_bytes(info.size)
        );
        println!("{}", info.id);
    }
    Ok(())
}

/// The node `mesh fetch` and `mesh peers` run for their own duration when no node is running
/// on this store: it serves peers while it fetches, and has no local API.
fn embedded_config(
    home: PathBuf,
    mesh_key: Option<String>,
    mdns: bool,
    config: &ConfigFile,
) -> NodeConfig {
    NodeConfig {
        home,
        listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
        api: None,
        mesh_key,
        max_upload: config.max_upload,
        mdns,
        aliases: config.aliases.clone(),
        hf_cache_scan: false,
    }
}

/// Starts the embedded node, on the default port if it is free and on any port if not.
async fn spawn_embedded(config: NodeConfig) -> Result<Node> {
    match Node::spawn(config.clone()).await {
        Err(NodeError::Bind(BindError::Bind { .. })) => {
            let config = NodeConfig {
                listen: SocketAddr::from(([0, 0, 0, 0], 0)),
                ..config
            };
            Ok(Node::spawn(config).await?)
        }
        Err(NodeError::Store(StoreError::Locked(path))) => anyhow::bail!(
            "the store at {} is in use by another mesh process without a local API",
            path.display()
        ),
        other => Ok(other?),
    }
}

/// A fetch failure that carries the exit code and hint the node chose.
#[derive(Debug)]
struct FetchFailed {
    message: String,
    code: u8,
    hint: Option<String>,
}

impl std::fmt::Display for FetchFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FetchFailed {}

/// `mesh fetch` options passed through to the node.
struct FetchOpts {
    include: Vec<String>,
    exclude: Vec<String>,
    dry_run: bool,
    hf_cache: bool,
    json: bool,
}

async fn run_fetch(
    node: NodeConfig,
    model: String,
    peers: Vec<SocketAddr>,
    to: Option<PathBuf>,
    opts: FetchOpts,
) -> Result<()> {
    let json = opts.json;
    let model_ref: ModelRef = model.parse().context("bad model name")?;
    let to = match to {
        Some(to) => std::path::absolute(to)?,
        None => std::env::current_dir()?.join(match &model_ref {
            ModelRef::Name(name) => {
                let name = name.strip_prefix("hf://").unwrap_or(name);
                let name = name.split('@').next().unwrap_or(name);
                name.replace('/', "--")
            }
            ModelRef::Id(id) => id.fmt_short(),
        }),
    };
    let show = std::io::stderr().is_terminal() && !json && !opts.dry_run;
    let report = if let Some(client) = NodeClient::discover(&node.home).await {
        // A node runs on this store: it does the fetch and keeps serving afterwards.
        let body = FetchBody {
            model,
            peers,
            to,
            include: opts.include,
            exclude: opts.exclude,
            dry_run: opts.dry_run,
            hf_cache: opts.hf_cache,
        };
        let mut bar: Option<ProgressBar> = None;
        let mut outcome = None;
        client
            .fetch(&body, |line| match line {
                FetchLine::Start { total, .. } if show => bar = Some(progress_bar(total)),
                FetchLine::Progress {
                    done, files_done, ..
                } => {
                    if let Some(bar) = &bar {
                        bar.set_position(done);
                        bar.set_message(format!("{files_done} files done"));
                    }
                }
                FetchLine::Done { report } => outcome = Some(Ok(report)),
                FetchLine::Error {
                    message,
                    code,
                    hint,
                } => {
                    outcome = Some(Err(FetchFailed {
                        message,
                        code,
                        hint,
                    }))
                }
                _ => {}
            })
            .await?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        outcome.context("the node ended the fetch stream without a result")??
    } else {
        let node = spawn_embedded(node).await?;
        let bar_task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>> = Arc::default();
        let slot = bar_task.clone();
        let req = FetchRequest {
            model: model_ref,
            peers,
            to,
            include: opts.include,
            exclude: opts.exclude,
            dry_run: opts.dry_run,
            hf_cache: opts.hf_cache,
        };
        let result = node
            .fetcher()
            .fetch(req, move |manifest, progress| {
                if show {
                    let handle = tokio::spawn(render(manifest.total_size(), progress));
                    *slot.lock().expect("bar lock") = Some(handle);
                }
            })
            .await;
        if let Some(handle) = bar_task.lock().expect("bar lock").take() {
            handle.abort();
        }
        node.shutdown().await;
        result.map_err(|e| FetchFailed {
            message: e.to_string(),
            code: e.exit_code(),
            hint: e.hint().map(str::to_string),
        })?
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else if let Some(plan) = &report.plan {
        if let Some(source) = &report.source {
            println!("{} = {source}", report.name);
        }
        println!("{:<48} {:>10}  FROM", "FILE", "SIZE");
        for entry in plan {
            let origin = serde_json::to_value(entry.origin)?;
            println!(
                "{:<48} {:>10}  {}",
                entry.path,
                human_bytes(entry.size),
                origin.as_str().unwrap_or("?")
            );
        }
        println!(
            "{} files, {} (dry run: nothing moved)",
            plan.len(),
            human_bytes(report.total_bytes)
        );
    } else {
        eprintln!(
            "{}: {} files, {} in {} ({} from peers, {} from HuggingFace, {} already here)",
            report.name,
            report.files,
            human_bytes(report.total_bytes),
            report.to.display(),
            human_bytes(report.bytes_from_peers),
            human_bytes(report.bytes_from_hf),
            human_bytes(report.bytes_already_local),
        );
    }
    Ok(())
}

async fn peers(node: NodeConfig, json: bool) -> Result<()> {
    let table = if let Some(client) = NodeClient::discover(&node.home).await {
        client.peers().await?
    } else {
        // No node here: listen for a few seconds, as a node would.
        let node = spawn_embedded(node).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let table = node.fetcher().peers.table();
        node.shutdown().await;
        table
    };
    if json {
        println!("{}", serde_json::to_string(&table)?);
        return Ok(());
    }
    println!(
        "{:<22} {:<9} {:>10} {:>10}  MODELS",
        "PEER", "SOURCE", "IN/s", "OUT/s"
    );
    for p in table {
        println!(
            "{:<22} {:<9} {:>10} {:>10}  {}",
            p.addr,
            if p.connected {
                p.source
            } else {
                format!("{}?", p.source)
            },
            human_bytes(p.rate_in),
            human_bytes(p.rate_out),
            p.models.join(", ")
        );
    }
    Ok(())
}

async fn render(total: u64, progress: Arc<FetchProgress>) {
    let bar = progress_bar(total);
    loop {
        let done: u64 = progress
            .files
            .iter()
            .map(|f| f.done.load(Ordering::Relaxed))
            .sum();
        let files_done = progress
            .files
            .iter()
            .filter(|f| f.done.load(Ordering::Relaxed) >= f.size)
            .count();
        bar.set_position(done);
        bar.set_message(format!("{files_done}/{} files", progress.files.len()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40.cyan/blue} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
        )
        .expect("progress template is valid"),
    );
    bar
}

async fn ls(home: &std::path::Path, json: bool) -> Result<()> {
    let models: Vec<ModelInfo> = match open_store(home).await {
        Ok(store) => tokio::task::spawn_blocking(move || store.models())
            .await??
            .into_iter()
            .map(ModelInfo::from)
            .collect(),
        Err(StoreError::Locked(_)) => {
            let client = NodeClient::discover(home)
                .await
                .context("the store is held by a running node whose local API does not answer")?;
            client.models().await?
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        println!("{}", serde_json::to_string(&models)?);
        return Ok(());
    }
    println!("{:<32} {:<16} {:>10}  STATUS", "NAME", "ID", "SIZE");
    for m in models {
        println!(
            "{:<32} {:<16} {:>10}  {}",
            m.name,
            &m.id[..16],
            human_bytes(m.size),
            if m.complete { "complete" } else { "partial" }
        );
    }
    Ok(())
}

async fn open_store(home: &std::path::Path) -> Result<Store, StoreError> {
    let home = home.to_path_buf();
    tokio::task::spawn_blocking(move || Store::open(&home))
        .await
        .expect("store open panicked")
}

fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<FetchFailed>() {
        Some(failed) => failed.code,
        None => exit::ERROR,
    }
}

fn hint(e: &anyhow::Error) -> Option<String> {
    e.downcast_ref::<FetchFailed>()?.hint.clone()
}
