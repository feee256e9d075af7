//! The store lifecycle commands (`rm`, `gc`, `verify`, `pin`, `unpin`), `service install`, the
//! limit flags, and logging to the journal. Each command parses, calls a `LocalNode` (or
//! `mesh_node::service`) and prints.

use std::{os::unix::fs::MetadataExt, path::PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use mesh_node::{
    config::ConfigFile,
    limits::{parse_bytes, Hours, LimitConfig},
    local::{LocalError, LocalNode},
    node::NodeConfig,
    service::{self, ServiceOptions},
    store::{
        lifecycle::{GcKind, GcReport},
        verify::{FileState, VerifyReport},
    },
};

use crate::human_bytes;

/// Rate limits and the store quota: flags and environment variables, over the config file.
#[derive(Debug, Args)]
pub(crate) struct LimitArgs {
    /// Download limit of the whole node, bytes per second (or 100MB) [config: max_download].
    #[arg(long, env = "MESH_MAX_DOWNLOAD", global = true, value_parser = bytes_arg)]
    max_download: Option<u64>,
    /// HuggingFace download limit (the uplink), bytes per second (or 20MB)
    /// [config: max_hf_download].
    #[arg(long, env = "MESH_MAX_HF_DOWNLOAD", global = true, value_parser = bytes_arg)]
    max_hf_download: Option<u64>,
    /// Hours (local time) HuggingFace may be used, e.g. 18:00-07:00; outside them HF
    /// downloads wait and peers are used [config: hf_hours].
    #[arg(long, env = "MESH_HF_HOURS", global = true)]
    hf_hours: Option<String>,
    /// Store quota (e.g. 200GB): least recently used unpinned models are evicted to stay under
    /// it [config: max_store].
    #[arg(long, env = "MESH_MAX_STORE", global = true, value_parser = bytes_arg)]
    pub(crate) max_store: Option<u64>,
}

impl LimitArgs {
    /// The limits: these flags, else the config file.
    pub(crate) fn resolve(&self, file: &ConfigFile) -> Result<LimitConfig> {
        let hours = self.hf_hours.clone().or(file.hf_hours.clone());
        Ok(LimitConfig {
            max_download: self.max_download.or(file.max_download.map(|b| b.0)),
            max_hf_download: self.max_hf_download.or(file.max_hf_download.map(|b| b.0)),
            hf_hours: hours
                .map(|h| h.parse::<Hours>())
                .transpose()
                .context("hf_hours")?,
            max_upload: None,
        })
    }
}

/// A byte count or rate: `123`, `50MB`, `1.5G`, `512MiB`.
pub(crate) fn bytes_arg(s: &str) -> Result<u64, String> {
    parse_bytes(s)
}

/// The store lifecycle commands.
#[derive(Debug, Subcommand)]
pub(crate) enum StoreCommand {
    /// Forget models (by name, id or id prefix). Their blobs go unless another model uses them;
    /// files added in place and fetched folders stay.
    Rm {
        /// The models.
        #[arg(required = true)]
        models: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove what no model uses: unreferenced blobs, stale partial downloads, leftovers of
    /// interrupted runs, old HuggingFace records. Prints what it freed.
    Gc {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash models' files (all models when none is named); drop any that fail, so the next
    /// fetch gets them again from peers. Exits 5 if one failed.
    Verify {
        /// The models.
        models: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pin a model: it is never evicted to stay under max_store.
    Pin {
        /// The model.
        model: String,
    },
    /// Unpin a model.
    Unpin {
        /// The model.
        model: String,
    },
    /// Run mesh as a system service.
    #[command(subcommand)]
    Service(ServiceCommand),
}

/// `mesh service ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum ServiceCommand {
    /// Write the systemd unit and a config stub, and print what to run next.
    Install {
        /// Folder for the unit.
        #[arg(long, default_value = "/etc/systemd/system")]
        unit_dir: PathBuf,
        /// The config file the service reads (a stub is written if there is none).
        #[arg(long = "service-config", default_value = "/etc/mesh/config.toml")]
        service_config: PathBuf,
        /// The store [default: /var/lib/mesh].
        #[arg(long = "store", default_value = "/var/lib/mesh")]
        store: PathBuf,
        /// The user the node runs as.
        #[arg(long, default_value = "mesh")]
        user: String,
        /// The mesh binary the service runs [default: this one].
        #[arg(long)]
        bin: Option<PathBuf>,
        /// A folder the node may write fetched models into; repeatable.
        #[arg(long = "target")]
        targets: Vec<PathBuf>,
    },
}

/// Runs a lifecycle command against the node on the store, or the store itself.
pub(crate) async fn run(
    command: StoreCommand,
    node: NodeConfig,
    mesh_key: Option<&str>,
) -> Result<()> {
    if let StoreCommand::Service(ServiceCommand::Install {
        unit_dir,
        service_config,
        store,
        user,
        bin,
        targets,
    }) = command
    {
        let bin = match bin {
            Some(bin) => bin,
            None => std::env::current_exe().context("finding this binary")?,
        };
        let targets = targets
            .iter()
            .map(std::path::absolute)
            .collect::<Result<_, _>>()?;
        let options = ServiceOptions {
            unit_dir,
            config: service_config,
            bin: std::path::absolute(bin)?,
            home: store,
            user,
            targets,
            mesh_key: mesh_key.map(str::to_string),
        };
        return service_install(&options);
    }
    let local = LocalNode::open(node).await?;
    let result = lifecycle(command, &local).await;
    local.shutdown().await;
    result
}

async fn lifecycle(command: StoreCommand, local: &LocalNode) -> Result<()> {
    match command {
        StoreCommand::Rm { models, json } => {
            let removed = local.rm(models).await?;
            if json {
                println!("{}", serde_json::to_string(&removed)?);
            }
            for r in removed.iter().filter(|_| !json) {
                let mut line = format!(
                    "removed {} ({}): store {} smaller",
                    r.name,
                    &r.id[..16],
                    human_bytes(r.bytes)
                );
                if r.shared > 0 {
                    line += &format!(", {} blobs kept for other models", r.shared);
                }
                if r.in_place > 0 {
                    line += &format!(", {} files added in place left where they are", r.in_place);
                }
                if r.linked_elsewhere > 0 {
                    line += &format!(
                        ", {} stays on disk in fetched folders (hard links)",
                        human_bytes(r.linked_elsewhere)
                    );
                }
                println!("{line}");
            }
        }
        StoreCommand::Gc { json } => {
            let report = local.gc().await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print_gc(&report);
            }
        }
        StoreCommand::Verify { models, json } => {
            let report = local.verify(models).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print_verify(&report);
            }
            if report.corrupt > 0 {
                return Err(LocalError::Fetch {
                    message: format!(
                        "{} file(s) failed verification and were dropped from the store",
                        report.corrupt
                    ),
                    code: 5,
                    hint: Some("`mesh fetch MODEL` gets them again from peers".into()),
                }
                .into());
            }
        }
        StoreCommand::Pin { model } => {
            let m = local.pin(model, true).await?;
            println!("pinned {} ({})", m.name, &m.id[..16]);
        }
        StoreCommand::Unpin { model } => {
            let m = local.pin(model, false).await?;
            println!("unpinned {} ({})", m.name, &m.id[..16]);
        }
        StoreCommand::Service(_) => unreachable!("handled in run"),
    }
    Ok(())
}

fn print_gc(report: &GcReport) {
    for item in &report.items {
        let what = match item.kind {
            GcKind::UnreferencedBlob => "unreferenced blob",
            GcKind::StalePartial => "stale partial",
            GcKind::TempFile => "leftover temp file",
            GcKind::HfMetadata => "old HF-endpoint file",
            GcKind::EmptyModel => "model with no data",
        };
        println!(
            "  {what:<22} {:>10}  {}",
            human_bytes(item.bytes),
            item.path
        );
    }
    if report.records > 0 {
        println!("  {} old HuggingFace records", report.records);
    }
    if report.kept_for_running_fetch {
        println!("  (a fetch is running: unreferenced blobs were left for it)");
    }
    println!(
        "freed {} ({} items)",
        human_bytes(report.bytes),
        report.items.len()
    );
}

fn print_verify(report: &VerifyReport) {
    for m in &report.models {
        let bad: Vec<_> = m
            .files
            .iter()
            .filter(|f| f.state != FileState::Ok)
            .collect();
        if bad.is_empty() {
            println!("{}: ok ({} files)", m.name, m.files.len());
            continue;
        }
        println!("{}:", m.name);
        for f in bad {
            let state = match f.state {
                FileState::Ok => "ok",
                FileState::Partial => "partial (what is here is ok)",
                FileState::Missing => "missing",
                FileState::Corrupt => "CORRUPT: dropped, no longer served",
                FileState::Changed => "changed on disk since it was added: forgotten",
                FileState::Busy => "being fetched: not checked",
            };
            println!("  {}: {state}", f.path);
        }
    }
    println!(
        "verified {} ({} corrupt)",
        human_bytes(report.bytes),
        report.corrupt
    );
}

fn service_install(options: &ServiceOptions) -> Result<()> {
    let installed = service::install(options)?;
    println!("wrote {}", installed.unit.display());
    if installed.config_written {
        println!("wrote {}", installed.config.display());
    } else {
        println!("kept {} (already there)", installed.config.display());
    }
    println!("next, as root:");
    for step in &installed.next {
        println!("  {step}");
    }
    Ok(())
}

/// Logs to the journal with native fields (PEER=, MODEL=, BYTES=, SECONDS=...) when stderr is
/// the journal (systemd sets `JOURNAL_STREAM` to its device and inode). Returns whether it did.
pub(crate) fn init_journald(filter: &str) -> bool {
    use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt};
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let ours = std::fs::metadata("/proc/self/fd/2")
        .map(|m| format!("{}:{}", m.dev(), m.ino()))
        .unwrap_or_default();
    if stream.to_string_lossy() != ours {
        return false;
    }
    let Ok(layer) = tracing_journald::layer() else {
        return false;
    };
    tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new(filter))
        .with(layer.with_field_prefix(None))
        .init();
    true
}
