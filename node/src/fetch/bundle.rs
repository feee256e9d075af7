//! Bundles: a named set of files from any number of sources, placed at given paths under one
//! root, plus symlinks. `mesh fetch BUNDLE` fetches every entry at once in one node (so the
//! entries share its peers and swarm), then makes the links.
//!
//! ```toml
//! [bundles.ai4artsed]
//! root = "/opt/ai4artsed/SwarmUI"
//! files = [
//!   { model = "sd3.5_large", to = "Models/Stable-Diffusion/OfficialStableDiffusion/" },
//!   { model = "org/repo@rev", include = ["*.safetensors"], to = "some/dir/" },
//!   { model = "a-mesh-model-name", to = "other/dir/file.bin" },
//! ]
//! links = [ { path = "a/link", target = "../Models/Stable-Diffusion" } ]
//! ```
//!
//! `model` is anything `mesh fetch` accepts; `to` ending in `/` is a folder (each file at its
//! path in the model below it), otherwise the path of the model's only file. Links are the
//! only symlinks mesh creates, and each must point inside the root.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use mesh_proto::{ModelRef, RelPath};
use serde::{Deserialize, Serialize};

use super::{
    catalog, catalog::CatalogEntry, FetchError, FetchReport, FetchRequest, Layout, Target,
};
use crate::{
    hf::RepoRef,
    rooted::{Root, RootError},
};

/// One bundle, as in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// Where the files go (`--root` overrides it).
    pub root: Option<PathBuf>,
    /// The files.
    #[serde(default)]
    pub files: Vec<BundleFile>,
    /// Symlinks made once every file is in place.
    #[serde(default)]
    pub links: Vec<BundleLink>,
}

/// One entry of a bundle: a model (or some of its files) and where it goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleFile {
    /// Anything `mesh fetch` accepts: a catalog name, `org/name[@rev]`, a mesh model name or
    /// id.
    pub model: String,
    /// A folder under the root (ending in `/`), or the path of the model's only file.
    pub to: String,
    /// For HuggingFace repos: only files matching these globs.
    #[serde(default)]
    pub include: Vec<String>,
    /// For HuggingFace repos: skip files matching these globs.
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// A symlink a bundle makes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleLink {
    /// The link, under the root.
    pub path: String,
    /// What it points to (relative to the link's folder, or absolute inside the root).
    pub target: PathBuf,
}

/// How to run a bundle.
#[derive(Clone, Debug, Default)]
pub struct BundleOpts {
    /// Peers to ask besides those discovered.
    pub peers: Vec<SocketAddr>,
    /// Only say what would move.
    pub dry_run: bool,
    /// The config file's aliases (catalog names).
    pub aliases: BTreeMap<String, CatalogEntry>,
}

/// What happened to one link.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkReport {
    /// The link's full path.
    pub path: PathBuf,
    /// Its target.
    pub target: PathBuf,
    /// Whether it was already there (pointing where it should).
    pub already: bool,
}

/// Why a bundle can't be used as written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// An entry or link is malformed.
    #[error("bundle {bundle}: {why}")]
    Bad {
        /// The bundle.
        bundle: String,
        /// What is wrong.
        why: String,
    },
    /// No root in the bundle and none given.
    #[error("bundle {0} has no root: give --root DIR")]
    NoRoot(String),
}

/// The seed's set: what the lab's setup script rsyncs into SwarmUI and its ComfyUI backend
/// (SD3.5 Large, its CLIP-G and T5 encoders, SwarmUI's encoder-only T5, LTX-Video 13B) and the
/// link that lets ComfyUI see SwarmUI's SD3.5 folder. The link's target climbs four folders
/// (`checkpoints`, `models`, `ComfyUI`, `dlbackend`) to reach `Models/`: with three, as the
/// setup script wrote it, it would point at `dlbackend/Models/...`, which does not exist.
pub fn builtin() -> BTreeMap<&'static str, Bundle> {
    let file = |model: &str, to: &str| BundleFile {
        model: model.into(),
        to: to.into(),
        include: Vec::new(),
        exclude: Vec::new(),
    };
    let clip = "dlbackend/ComfyUI/models/clip/";
    BTreeMap::from([(
        "ai4artsed",
        Bundle {
            root: Some("/opt/ai4artsed/SwarmUI".into()),
            files: vec![
                file(
                    "sd3.5_large",
                    "Models/Stable-Diffusion/OfficialStableDiffusion/",
                ),
                file("clip_g", clip),
                file("t5xxl_enconly", clip),
                file("t5xxl_fp16", clip),
                file("ltxv-13b", "dlbackend/ComfyUI/models/checkpoints/"),
            ],
            links: vec![BundleLink {
                path: "dlbackend/ComfyUI/models/checkpoints/OfficialStableDiffusion".into(),
                target: "../../../../Models/Stable-Diffusion/OfficialStableDiffusion".into(),
            }],
        },
    )])
}

/// The bundle called `name`: the config file's, else a built-in one.
pub fn lookup(name: &str, config: &BTreeMap<String, Bundle>) -> Option<Bundle> {
    config
        .get(name)
        .cloned()
        .or_else(|| builtin().get(name).cloned())
}

impl Bundle {
    /// One fetch per entry, all into `root`.
    pub fn requests(
        &self,
        name: &str,
        root: &Path,
        peers: &[SocketAddr],
        dry_run: bool,
    ) -> Result<Vec<FetchRequest>, BundleError> {
        let bad = |why: String| BundleError::Bad {
            bundle: name.to_string(),
            why,
        };
        self.check_links().map_err(bad)?;
        self.files
            .iter()
            .map(|f| {
                let model: ModelRef = f
                    .model
                    .parse()
                    .map_err(|e| bad(format!("model {:?}: {e}", f.model)))?;
                check_to(&f.to).map_err(|why| bad(format!("to = {:?}: {why}", f.to)))?;
                Ok(FetchRequest {
                    model,
                    peers: peers.to_vec(),
                    targets: vec![Target {
                        to: Some(f.to.clone()),
                        ..Target::new(root, Layout::Plain)
                    }],
                    include: f.include.clone(),
                    exclude: f.exclude.clone(),
                    dry_run,
                })
            })
            .collect()
    }

    /// The entries in waves that may run at once (indices into `files`). Two entries that
    /// could fetch the same published file (one catalog file twice, or a whole or globbed
    /// repo and anything else from it) or the same mesh model are never in one wave: two
    /// fetches of one file at once would both write its download.
    pub fn waves(&self, aliases: &BTreeMap<String, CatalogEntry>) -> Vec<Vec<usize>> {
        let keys: Vec<(String, Vec<String>)> = self
            .files
            .iter()
            .map(|f| source_key(&f.model, aliases))
            .collect();
        let overlap = |a: &(String, Vec<String>), b: &(String, Vec<String>)| {
            a.0 == b.0 && (a.1.is_empty() || b.1.is_empty() || a.1.iter().any(|f| b.1.contains(f)))
        };
        let mut waves: Vec<Vec<usize>> = Vec::new();
        for i in 0..keys.len() {
            let free = waves
                .iter_mut()
                .find(|w| w.iter().all(|&j| !overlap(&keys[i], &keys[j])));
            match free {
                Some(wave) => wave.push(i),
                None => waves.push(vec![i]),
            }
        }
        waves
    }

    /// The root to use: `--root`, else the bundle's.
    pub fn root(&self, name: &str, over: Option<PathBuf>) -> Result<PathBuf, BundleError> {
        over.or_else(|| self.root.clone())
            .ok_or_else(|| BundleError::NoRoot(name.to_string()))
    }

    /// Makes every link under `root` (or, for `dry_run`, only says which are there).
    pub fn make_links(&self, root: &Path, dry_run: bool) -> Result<Vec<LinkReport>, FetchError> {
        let mut out = Vec::new();
        let resolved = match std::fs::canonicalize(root) {
            Ok(path) => path,
            Err(_) if dry_run => root.to_path_buf(),
            Err(source) => {
                return Err(FetchError::Root(RootError::Io {
                    path: root.into(),
                    source,
                }))
            }
        };
        for link in &self.links {
            let path = resolved.join(&link.path);
            let already = std::fs::read_link(&path).is_ok_and(|t| t == link.target);
            if !dry_run {
                Root::open(root)?.symlink(&link.path, &link.target)?;
                if std::fs::metadata(&path).is_err() {
                    return Err(FetchError::DanglingLink {
                        path,
                        target: link.target.clone(),
                    });
                }
            }
            out.push(LinkReport {
                path,
                target: link.target.clone(),
                already,
            });
        }
        Ok(out)
    }

    fn check_links(&self) -> Result<(), String> {
        for link in &self.links {
            check_to(&link.path).map_err(|why| format!("link {:?}: {why}", link.path))?;
            if link.path.ends_with('/') {
                return Err(format!("link {:?}: a link is not a folder", link.path));
            }
        }
        Ok(())
    }
}

/// What an entry fetches from: the repo and its files (empty: any), or the mesh model.
fn source_key(model: &str, aliases: &BTreeMap<String, CatalogEntry>) -> (String, Vec<String>) {
    if let Some(entry) = catalog::lookup(model, aliases) {
        let files = entry.file_map().into_iter().map(|(from, _)| from).collect();
        return (entry.repo, files);
    }
    match RepoRef::parse(model) {
        Some(repo) => (repo.repo, Vec::new()),
        None => (model.to_string(), Vec::new()),
    }
}

/// A `to` must be a plain relative path (no `..`, not absolute).
fn check_to(to: &str) -> Result<(), String> {
    let trimmed = to.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(());
    }
    trimmed
        .parse::<RelPath>()
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The summary of `mesh fetch BUNDLE` (`--json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BundleReport {
    /// The bundle.
    pub name: String,
    /// Where its files are.
    pub root: PathBuf,
    /// Each entry, in order.
    pub entries: Vec<EntryReport>,
    /// The links.
    pub links: Vec<LinkReport>,
    /// Why the links could not be made, if they could not.
    pub link_error: Option<String>,
    /// Its exit code.
    pub link_code: Option<u8>,
    /// Bytes in all entries.
    pub total_bytes: u64,
    /// Bytes already here before the run (in the store or in place).
    pub bytes_already_local: u64,
    /// Bytes received from peers in this run.
    pub bytes_from_peers: u64,
    /// Bytes downloaded from HuggingFace or a registry in this run.
    pub bytes_from_hf: u64,
    /// Whether every file and link is in place (always false for a dry run).
    pub complete: bool,
    /// Wall time.
    pub seconds: f64,
}

/// One entry's outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EntryReport {
    /// The entry's `model`.
    pub model: String,
    /// Each file: final path, size and (dry run) where it would come from.
    pub files: Vec<EntryFile>,
    /// The fetch's report, if it succeeded.
    pub report: Option<FetchReport>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// The failure's exit code.
    pub code: Option<u8>,
}

/// One file of a bundle.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EntryFile {
    /// Where it goes.
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
    /// Where it comes from (dry run), or `null`.
    pub origin: Option<super::Origin>,
}

impl BundleReport {
    /// Sums the entries' reports.
    pub fn new(
        name: &str,
        root: &Path,
        entries: Vec<EntryReport>,
        links: Result<Vec<LinkReport>, FetchError>,
    ) -> Self {
        let sum = |f: fn(&FetchReport) -> u64| {
            entries
                .iter()
                .filter_map(|e| e.report.as_ref())
                .map(f)
                .sum()
        };
        let failed = entries.iter().any(|e| e.error.is_some());
        let dry = entries
            .iter()
            .any(|e| e.report.as_ref().is_some_and(|r| r.plan.is_some()));
        let (links, link_error, link_code) = match links {
            Ok(links) => (links, None, None),
            Err(e) => (Vec::new(), Some(e.to_string()), Some(e.exit_code())),
        };
        Self {
            name: name.to_string(),
            root: root.to_path_buf(),
            total_bytes: sum(|r| r.total_bytes),
            bytes_already_local: sum(|r| r.bytes_already_local),
            bytes_from_peers: sum(|r| r.bytes_from_peers),
            bytes_from_hf: sum(|r| r.bytes_from_hf),
            complete: !failed && !dry && link_error.is_none(),
            seconds: entries
                .iter()
                .filter_map(|e| e.report.as_ref())
                .map(|r| r.seconds)
                .fold(0.0, f64::max),
            entries,
            links,
            link_error,
            link_code,
        }
    }

    /// The first failure's exit code, or 0.
    pub fn exit_code(&self) -> u8 {
        self.entries
            .iter()
            .find_map(|e| e.code)
            .or(self.link_code)
            .unwrap_or(0)
    }
}

impl EntryReport {
    /// The outcome of one entry's fetch into `target`.
    pub fn new(model: &str, target: &Target, result: Result<FetchReport, (String, u8)>) -> Self {
        match result {
            Ok(report) => {
                let files = match &report.plan {
                    Some(plan) => plan
                        .iter()
                        .map(|p| EntryFile {
                            path: target.root.join(target.dest_of(&p.path, plan.len())),
                            size: p.size,
                            origin: Some(p.origin),
                        })
                        .collect(),
                    None => Vec::new(),
                };
                Self {
                    model: model.to_string(),
                    files,
                    report: Some(report),
                    error: None,
                    code: None,
                }
            }
            Err((message, code)) => Self {
                model: model.to_string(),
                files: Vec::new(),
                report: None,
                error: Some(message),
                code: Some(code),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_parse_check_their_paths_and_expand_to_fetches() {
        let text = r#"
            root = "/r"
            files = [
              { model = "sd3.5_large", to = "Models/SD/" },
              { model = "org/repo@v1", include = ["*.safetensors"], to = "x/y/" },
              { model = "my-model", to = "a/file.bin" },
            ]
            links = [ { path = "l/sd", target = "../Models/SD" } ]
        "#;
        let bundle: Bundle = toml::from_str(text).unwrap();
        let reqs = bundle.requests("b", Path::new("/r"), &[], false).unwrap();
        assert_eq!(reqs.len(), 3);
        assert_eq!(reqs[1].include, vec!["*.safetensors".to_string()]);
        assert_eq!(reqs[2].targets[0].to.as_deref(), Some("a/file.bin"));
        for bad in ["../x/", "/abs/", "a/../../b"] {
            let mut b = bundle.clone();
            b.files[0].to = bad.into();
            assert!(
                b.requests("b", Path::new("/r"), &[], false).is_err(),
                "{bad}"
            );
        }
        let seed = lookup("ai4artsed", &BTreeMap::new()).unwrap();
        assert_eq!(seed.files.len(), 5);
        assert!(seed
            .requests("ai4artsed", Path::new("/r"), &[], true)
            .is_ok());
    }
}
