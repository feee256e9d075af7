//! `mesh fetch BUNDLE`: runs the bundle through a [`LocalNode`] and prints what it did (or,
//! with `--dry-run`, each file's size, source and final path).

use std::{io::IsTerminal, path::PathBuf};

use anyhow::Result;
use mesh_node::{
    api::FetchLine,
    fetch::bundle::{Bundle, BundleOpts, BundleReport},
    local::{LocalError, LocalNode},
    node::NodeConfig,
};

use crate::{human_bytes, progress_bar};

/// Fetches the bundle `name` into `root` (default: the bundle's own).
pub(crate) async fn run(
    node: NodeConfig,
    name: &str,
    bundle: Bundle,
    root: Option<PathBuf>,
    opts: BundleOpts,
    json: bool,
) -> Result<()> {
    let dry_run = opts.dry_run;
    let root = bundle.root(name, root).map_err(|e| LocalError::Usage {
        message: e.to_string(),
    })?;
    let root = std::path::absolute(root)?;
    let show = std::io::stderr().is_terminal() && !json && !dry_run;
    let bar = show.then(|| progress_bar(0));
    let mut totals = vec![(0u64, 0u64); bundle.files.len()];
    let mut local = LocalNode::open(node).await?;
    let shown = bar.clone();
    let result = local
        .fetch_bundle(name, &bundle, root, &opts, |i, line| {
            match line {
                FetchLine::Start { total, .. } => totals[i].1 = total,
                FetchLine::Progress { done, total, .. } => totals[i] = (done, total),
                _ => return,
            }
            if let Some(bar) = &shown {
                bar.set_length(totals.iter().map(|t| t.1).sum());
                bar.set_position(totals.iter().map(|t| t.0).sum());
            }
        })
        .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    local.shutdown().await;
    let report = result?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else if dry_run {
        print_plan(&report);
    } else {
        print_done(&report);
    }
    match report.exit_code() {
        0 => Ok(()),
        code => Err(LocalError::Fetch {
            message: format!("bundle {name}: not every file and link is in place"),
            code,
            hint: None,
        }
        .into()),
    }
}

fn print_plan(report: &BundleReport) {
    println!("bundle {} -> {}", report.name, report.root.display());
    println!("{:>10}  {:<9} PATH", "SIZE", "FROM");
    let mut files = 0;
    for entry in &report.entries {
        if let Some(error) = &entry.error {
            println!("{:>10}  {:<9} {} ({error})", "?", "error", entry.model);
        }
        for f in &entry.files {
            let origin = f
                .origin
                .and_then(|o| serde_json::to_value(o).ok())
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            println!(
                "{:>10}  {origin:<9} {}",
                human_bytes(f.size),
                f.path.display()
            );
            files += 1;
        }
    }
    for link in &report.links {
        let state = if link.already { "in-place" } else { "link" };
        println!(
            "{:>10}  {state:<9} {} -> {}",
            "",
            link.path.display(),
            link.target.display()
        );
    }
    println!(
        "{files} files, {}, {} links (dry run: nothing moved)",
        human_bytes(report.total_bytes),
        report.links.len()
    );
}

fn print_done(report: &BundleReport) {
    for entry in &report.entries {
        match (&entry.report, &entry.error) {
            (Some(r), _) => eprintln!(
                "{}: {} files, {} ({} from peers, {} from HuggingFace, {} already here){}",
                entry.model,
                r.files,
                human_bytes(r.total_bytes),
                human_bytes(r.bytes_from_peers),
                human_bytes(r.bytes_from_hf),
                human_bytes(r.bytes_already_local),
                if r.replaced.is_empty() {
                    String::new()
                } else {
                    format!(", replaced {} different file(s)", r.replaced.len())
                }
            ),
            (None, Some(error)) => eprintln!("{}: FAILED: {error}", entry.model),
            (None, None) => {}
        }
    }
    for link in &report.links {
        eprintln!("link {} -> {}", link.path.display(), link.target.display());
    }
    if let Some(error) = &report.link_error {
        eprintln!("links: FAILED: {error}");
    }
    eprintln!(
        "bundle {} in {}: {} ({} from peers, {} from HuggingFace, {} already here)",
        report.name,
        report.root.display(),
        human_bytes(report.total_bytes),
        human_bytes(report.bytes_from_peers),
        human_bytes(report.bytes_from_hf),
        human_bytes(report.bytes_already_local),
    );
}
