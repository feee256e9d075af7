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
    api::{AddRequest, ModelInfo, NodeClient},
    config::ConfigFile,
    fetch::{self, FetchError, FetchProgress, FetchRequest},
    metrics::Metrics,
    net::{ConnectError, Net},
    node::{Node, NodeConfig, DEFAULT_API_PORT, DEFAULT_PORT},
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
    /// Fetch a model (by name or id) from peers into a folder.
    Fetch {
        /// Model name or 64-hex-digit id.
        model: String,
        /// A peer to fetch from, IP:PORT; repeat for several.
        #[arg(long = "peer")]
        peers: Vec<SocketAddr>,
        /// Target folder [default: ./<model name>].
        #[arg(long)]
        to: Option<PathBuf>,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List the models in this store.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Exit codes scripts can rely on (documented in README.md).
mod exit {
    pub(crate) const ERROR: u8 = 1;
    pub(crate) const UNKNOWN_MODEL: u8 = 3;
    pub(crate) const PEER: u8 = 4;
    pub(crate) const VERIFY: u8 = 5;
    pub(crate) const LOCAL: u8 = 6;
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
                };
            run_node(config).await
        }
        Command::Add { path, name, json } => add(&home, path, name, json).await,
        Command::Fetch {
            model,
            peers,
            to,
            json,
        } => run_fetch(&home, mesh_key, model, peers, to, json).await,
        Command::Ls { json } => ls(&home, json).await,
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
            let bar = show.then(|| bar(0));
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

async fn run_fetch(
    home: &std::path::Path,
    mesh_key: Option<String>,
    model: String,
    peers: Vec<SocketAddr>,
    to: Option<PathBuf>,
    json: bool,
) -> Result<()> {
    let model: ModelRef = model.parse().context("bad model name")?;
    let store = match open_store(home).await {
        Err(StoreError::Locked(path)) => anyhow::bail!(
            "the store at {} is held by a running `mesh node`; fetching through it is not supported yet, use another MESH_HOME",
            path.display()
        ),
        other => other?,
    };
    let key = store.identity_key()?;
    let net = Net::bind(SocketAddr::from(([0, 0, 0, 0], 0)), &key, mesh_key, false)?;
    let to = match to {
        Some(to) => to,
        None => std::env::current_dir()?.join(match &model {
            ModelRef::Name(name) => name.replace('/', "--"),
            ModelRef::Id(id) => id.fmt_short(),
        }),
    };
    let show = std::io::stderr().is_terminal() && !json;
    let bar_slot: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>> = Arc::default();
    let bar_slot2 = bar_slot.clone();
    let req = FetchRequest { model, peers, to };
    let result = fetch::fetch(
        store,
        net.clone(),
        Arc::new(Metrics::default()),
        req,
        move |manifest, progress| {
            if show {
                let handle = tokio::spawn(render(manifest.total_size(), progress));
                *bar_slot2.lock().expect("bar lock") = Some(handle);
            }
        },
    )
    .await;
    if let Some(handle) = bar_slot.lock().expect("bar lock").take() {
        handle.abort();
    }
    net.close(0).await;
    let report = result?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        eprintln!(
            "{}: {} files, {} in {} ({} from peers, {} already here)",
            report.name,
            report.files,
            human_bytes(report.total_bytes),
            report.to.display(),
            human_bytes(report.bytes_from_peers),
            human_bytes(report.bytes_already_local),
        );
    }
    Ok(())
}

async fn render(total: u64, progress: Arc<FetchProgress>) {
    let bar = bar(total);
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

fn bar(total: u64) -> ProgressBar {
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
            .map(|m| ModelInfo {
                id: m.id.to_string(),
                name: m.name,
                size: m.size,
                complete: m.complete,
                files: None,
            })
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
    if let Some(fetch) = e.downcast_ref::<FetchError>() {
        return match fetch {
            FetchError::UnknownModel(_) => exit::UNKNOWN_MODEL,
            FetchError::Connect(_) | FetchError::NoPeers(_) | FetchError::BadManifest { .. } => {
                exit::PEER
            }
            FetchError::NoSource { last, .. }
                if last.contains("verification") || last.contains("corrupt") =>
            {
                exit::VERIFY
            }
            FetchError::NoSource { .. } => exit::PEER,
            FetchError::TargetNotWritable { .. } | FetchError::NoSpace { .. } => exit::LOCAL,
            _ => exit::ERROR,
        };
    }
    exit::ERROR
}

fn hint(e: &anyhow::Error) -> Option<&'static str> {
    match e.downcast_ref::<FetchError>()? {
        FetchError::Connect(ConnectError::WrongKey(_)) => {
            Some("every node of one mesh needs the same MESH_KEY (or --mesh-key, or mesh_key in config.toml)")
        }
        FetchError::Connect(ConnectError::Unreachable(_)) => {
            Some("is `mesh node` running there, and is its UDP port open? (default 7341)")
        }
        FetchError::UnknownModel(_) => Some("`mesh ls` on a peer lists the models it has"),
        FetchError::NoSpace { .. } => Some("free some space or set MESH_HOME to a bigger disk"),
        _ => None,
    }
}
