//! The Rust `hf-hub` crate as a client, for the tests: one call, its result as a JSON line.
//!
//! `hf-hub-client --endpoint URL --cache DIR --repo org/name [--revision REV] get FILE`
//! prints `{"ok":true,"sha256":"..."}` (of the downloaded file), and `... info` prints
//! `{"ok":true,"sha":"...","files":[...]}`; a failure prints `{"ok":false,"error":"..."}`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use hf_hub::{api::tokio::ApiBuilder, Repo, RepoType};
use sha2::Digest as _;

#[derive(Parser, Debug)]
struct Opt {
    #[arg(long)]
    endpoint: String,
    #[arg(long)]
    cache: PathBuf,
    #[arg(long)]
    repo: String,
    #[arg(long, default_value = "main")]
    revision: String,
    #[arg(long)]
    token: Option<String>,
    #[command(subcommand)]
    op: Op,
}

#[derive(Subcommand, Debug)]
enum Op {
    /// Download one file.
    Get { file: String },
    /// The repo's revision info.
    Info,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let opt = Opt::parse();
    let api = ApiBuilder::new()
        .with_endpoint(opt.endpoint.clone())
        .with_cache_dir(opt.cache.clone())
        .with_token(opt.token.clone())
        .with_progress(false)
        .build()
        .expect("hf-hub api builds");
    let repo = api.repo(Repo::with_revision(
        opt.repo.clone(),
        RepoType::Model,
        opt.revision.clone(),
    ));
    let out = match opt.op {
        Op::Get { file } => match repo.get(&file).await {
            Ok(path) => {
                let bytes = std::fs::read(&path).expect("downloaded file readable");
                serde_json::json!({ "ok": true, "sha256": hex::encode(sha2::Sha256::digest(&bytes)) })
            }
            Err(e) => serde_json::json!({ "ok": false, "error": e.to_string() }),
        },
        Op::Info => match repo.info().await {
            Ok(info) => {
                let mut files: Vec<String> =
                    info.siblings.into_iter().map(|s| s.rfilename).collect();
                files.sort();
                serde_json::json!({ "ok": true, "sha": info.sha, "files": files })
            }
            Err(e) => serde_json::json!({ "ok": false, "error": e.to_string() }),
        },
    };
    println!("{out}");
}
