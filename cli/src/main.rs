//! `mesh`: the command line. It parses arguments, calls a [`LocalNode`] and prints; nothing
//! else lives here.

mod lifecycle;

use std::{io::IsTerminal, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

mod bundle;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mesh_node::{
    api::{FetchLine, ModelInfo},
    config::ConfigFile,
    discovery::PeerInfo,
    fetch::{
        bundle::{lookup as bundle_named, BundleOpts},
        catalog::Kind,
        targets_for, FetchReport, FetchRequest, Layout,
    },
    local::{LocalError, LocalNode},
    node::{Node, NodeConfig, DEFAULT_API_PORT, DEFAULT_PORT},
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
    #[command(flatten)]
    limits: lifecycle::LimitArgs,
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
        /// Upload limit for the whole node, bytes per second (or 50MB).
        #[arg(long, env = "MESH_MAX_UPLOAD", value_parser = lifecycle::bytes_arg)]
        max_upload: Option<u64>,
        /// A peer to keep connected besides those found by mDNS, IP:PORT; repeatable (adds to
        /// the config file's `peers`).
        #[arg(long = "peer")]
        peers: Vec<SocketAddr>,
        /// Don't import (hash and serve) models found in the HuggingFace cache at start.
        #[arg(long)]
        no_hf_cache_scan: bool,
        /// Don't import (hash and serve in place) the models of the local Ollama store
        /// (OLLAMA_MODELS, ~/.ollama/models, /usr/share/ollama/.ollama/models) at start.
        #[arg(long)]
        no_ollama_scan: bool,
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
    /// Fetch a model (by name or id) from LAN peers into a folder, or a bundle into its root.
    Fetch {
        /// A catalog name (sd3.5_large), a model id, a HuggingFace repo (org/name[@revision]
        /// or hf://org/name), or a bundle (ai4artsed, or [bundles.NAME] in the config file).
        model: String,
        /// For a bundle: the root its paths are under [default: the bundle's `root`].
        #[arg(long)]
        root: Option<PathBuf>,
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
        /// Also put the model into the HuggingFace cache (HF_HUB_CACHE / HF_HOME), linked
        /// (`--layout hf-cache` beside the folder).
        #[arg(long)]
        hf_cache: bool,
        /// Where files go under --to: plain (paths as in the model), comfyui (models/<kind
        /// folder>/), swarmui (Models/<kind folder>/), hf-cache, ollama [default: plain;
        /// ollama, into the Ollama store, for ollama:NAME:TAG].
        #[arg(long)]
        layout: Option<Layout>,
        /// The kind of model, for --layout comfyui|swarmui when the catalog doesn't say:
        /// checkpoint, diffusion-model, text-encoder (clip), vae, lora, upscaler, controlnet,
        /// clip-vision, embedding.
        #[arg(long)]
        kind: Option<Kind>,
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
    #[command(flatten)]
    Store(lifecycle::StoreCommand),
}

/// How long `mesh peers` listens for peers when no node runs.
const PEERS_LISTEN: Duration = Duration::from_secs(3);

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
            let local = e.downcast_ref::<LocalError>();
            if let Some(hint) = local.and_then(LocalError::hint) {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(local.map_or(1, LocalError::exit_code))
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
    if !cli.log_json && lifecycle::init_journald(&filter.to_string()) {
        return;
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(cli: Cli) -> Result<()> {
    let home = match &cli.home {
        Some(home) => home.clone(),
        None => dirs::cache_dir()
            .context("no cache dir on this system: set MESH_HOME")?
            .join("mesh"),
    };
    let config_path = cli
        .config
        .clone()
        .unwrap_or_else(|| home.join("config.toml"));
    let file = ConfigFile::load(&config_path, cli.config.is_some())?;
    // What a command's embedded node runs with: the defaults, then the file, then flags.
    let mut node = NodeConfig {
        home,
        listen: file
            .listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))),
        api: None,
        mesh_key: cli
            .mesh_key
            .clone()
            .or(file.mesh_key.clone())
            .filter(|k| !k.is_empty()),
        max_upload: file.max_upload.map(|b| b.0),
        mdns: !cli.no_mdns,
        bootstrap: file.peers.clone(),
        aliases: file.aliases.clone(),
        hf_cache_scan: false,
        ollama_scan: false,
        limits: cli.limits.resolve(&file)?,
        max_store: cli.limits.max_store.or(file.max_store.map(|b| b.0)),
    };
    match cli.command {
        Command::Node {
            listen,
            api,
            no_api,
            max_upload,
            peers,
            no_hf_cache_scan,
            no_ollama_scan,
        } => {
            node.listen = listen.unwrap_or(node.listen);
            let default_api = SocketAddr::from(([127, 0, 0, 1], DEFAULT_API_PORT));
            node.api = (!no_api).then(|| api.or(file.api).unwrap_or(default_api));
            node.max_upload = max_upload.or(node.max_upload);
            node.bootstrap.extend(peers);
            node.hf_cache_scan = !no_hf_cache_scan;
            node.ollama_scan = !no_ollama_scan;
            run_node(node).await
        }
        Command::Add { path, name, json } => add(node, path, name, json).await,
        Command::Fetch {
            model,
            root,
            peers,
            to,
            revision,
            include,
            exclude,
            dry_run,
            hf_cache,
            layout,
            kind,
            json,
        } => {
            if let Some(bundle) = bundle_named(&model, &file.bundles) {
                let opts = BundleOpts {
                    peers,
                    dry_run,
                    aliases: file.aliases.clone(),
                };
                return bundle::run(node, &model, bundle, root, opts, json).await;
            }
            if root.is_some() {
                anyhow::bail!("--root is for bundles; {model} is not one (use --to DIR)");
            }
            let model = match revision {
                Some(rev) if !model.contains('@') => format!("{model}@{rev}"),
                Some(_) => anyhow::bail!("give the revision once: as --revision or as @revision"),
                None => model,
            };
            let model: ModelRef = model.parse().context("bad model name")?;
            let cwd = std::env::current_dir()?;
            let targets = targets_for(&model, to, layout, kind, hf_cache || file.hf_cache, &cwd)
                .map_err(|message| LocalError::Usage { message })?;
            let req = FetchRequest {
                model,
                peers,
                targets,
                include,
                exclude,
                dry_run,
            };
            fetch(node, req, json).await
        }
        Command::Peers { json } => peers(node, json).await,
        Command::Ls { json } => ls(node, json).await,
        Command::Status => {
            let local = LocalNode::open(node).await?;
            println!("{}", serde_json::to_string_pretty(&local.status().await?)?);
            Ok(())
        }
        Command::Store(command) => lifecycle::run(command, node, cli.mesh_key.as_deref()).await,
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

async fn add(node: NodeConfig, path: PathBuf, name: Option<String>, json: bool) -> Result<()> {
    let path = std::fs::canonicalize(&path).with_context(|| format!("{}", path.display()))?;
    let local = LocalNode::open(node).await?;
    let bar = (std::io::stderr().is_terminal() && !json).then(|| progress_bar(0));
    let shown = bar.clone();
    let info = local
        .add(path, name, move |p| {
            if let Some(bar) = &shown {
                bar.set_length(p.total);
                bar.set_position(p.done);
                bar.set_message(p.path.to_string());
            }
        })
        .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let info = info?;
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

async fn fetch(node: NodeConfig, req: FetchRequest, json: bool) -> Result<()> {
    let show = std::io::stderr().is_terminal() && !json && !req.dry_run;
    let mut local = LocalNode::open(node).await?;
    let mut bar: Option<ProgressBar> = None;
    let result = local
        .fetch(req, |line| match line {
            FetchLine::Start { total, .. } if show => bar = Some(progress_bar(total)),
            FetchLine::Notice { message } => match &bar {
                Some(bar) => bar.println(format!("mesh: {message}")),
                None => eprintln!("mesh: {message}"),
            },
            FetchLine::Progress {
                done, files_done, ..
            } => {
                if let Some(bar) = &bar {
                    bar.set_position(done);
                    bar.set_message(format!("{files_done} files done"));
                }
            }
            _ => {}
        })
        .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    local.shutdown().await;
    let report = result?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else if let Some(plan) = &report.plan {
        print_plan(&report, plan)?;
    } else {
        eprintln!(
            "{}: {} files, {} in {} ({} from peers, {} from {}, {} already here)",
            report.name,
            report.files,
            human_bytes(report.total_bytes),
            report.to.display(),
            human_bytes(report.bytes_from_peers),
            human_bytes(report.bytes_from_hf),
            match report.name.starts_with("ollama:") {
                true => "the registry",
                false => "HuggingFace",
            },
            human_bytes(report.bytes_already_local),
        );
    }
    Ok(())
}

fn print_plan(report: &FetchReport, plan: &[mesh_node::fetch::PlanEntry]) -> Result<()> {
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
    Ok(())
}

async fn peers(node: NodeConfig, json: bool) -> Result<()> {
    let mut local = LocalNode::open(node).await?;
    let table = local.peers(PEERS_LISTEN).await;
    local.shutdown().await;
    let table: Vec<PeerInfo> = table?;
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

async fn ls(node: NodeConfig, json: bool) -> Result<()> {
    let local = LocalNode::open(node).await?;
    let models: Vec<ModelInfo> = local.models().await?;
    local.shutdown().await;
    if json {
        println!("{}", serde_json::to_string(&models)?);
        return Ok(());
    }
    println!(
        "{:<32} {:<16} {:>10}  {:<8}  {:<3}  SOURCE",
        "NAME", "ID", "SIZE", "STATUS", "PIN"
    );
    for m in models {
        println!(
            "{:<32} {:<16} {:>10}  {:<8}  {:<3}  {}",
            m.name,
            &m.id[..16],
            human_bytes(m.size),
            if m.complete { "complete" } else { "partial" },
            if m.pinned { "yes" } else { "" },
            m.source.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

pub(crate) fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40.cyan/blue} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
        )
        .expect("progress template is valid"),
    );
    bar
}

pub(crate) fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}
