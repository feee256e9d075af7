//! Fetching a model published on HuggingFace (`org/name[@rev]`, `hf://…`, or a catalog
//! name): the Hub lists the commit's files with their sizes and hashes, the selected files
//! come from the [`sources`](super::sources) in order, and the manifest records the repo, the
//! commit and each file's published hash, so that peers can later serve it as the same repo.

use std::{
    sync::{atomic::AtomicU64, Arc},
    time::Instant,
};

use globset::{Glob, GlobSet, GlobSetBuilder};
use mesh_proto::{FileEntry, Manifest, Source as ModelSource};
use tracing::warn;

use super::{
    adopt::InPlace,
    resolve::Published,
    sources::{HubOrigin, LocalCopies, PeerCopies, Source, Tally, Wanted},
    FetchError, FetchProgress, FetchReport, FetchRequest, Fetcher, FileProgress, PlanEntry,
};
use crate::{
    hf::{HubError, HubFile, RepoInfo},
    store::{blocking, StoreError},
};

impl Fetcher {
    /// Fetches the files of `published` (at `info`'s commit) that the request selects.
    pub(super) async fn fetch_external(
        &self,
        req: &FetchRequest,
        published: Published,
        info: RepoInfo,
        on_start: impl FnOnce(&Manifest, Arc<FetchProgress>),
    ) -> Result<FetchReport, FetchError> {
        let started = Instant::now();
        let mut wanted = select(&info.files, &published.files, &req.include, &req.exclude)?;
        if wanted.is_empty() {
            return Err(FetchError::NothingSelected(published.repo.repo.clone()));
        }
        for e in self.peers.add_explicit(&req.peers).await {
            warn!("{e}");
        }
        let (name, revision) = (published.name, published.repo.revision);
        let mut sources: Vec<Box<dyn Source>> = vec![
            Box::new(InPlace::new(self, &name, &req.targets, req.dry_run)),
            Box::new(LocalCopies),
            Box::new(PeerCopies::new(&name, &info)),
            Box::new(HubOrigin::new(info.clone())),
        ];
        for source in &mut sources {
            source.claim(self, &mut wanted).await?;
        }
        let mut report = report_for(&name, &info, req, &wanted);
        if req.dry_run {
            report.plan = Some(plan(&wanted));
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        for target in &req.targets {
            target.check()?;
        }
        let missing = report.total_bytes - report.bytes_already_local;
        let keep = wanted.iter().filter_map(|w| w.hash).collect();
        self.make_room(&req.targets, missing, report.total_bytes, keep)
            .await?;
        let provisional = Manifest::new(name.clone(), ModelSource::Local, Vec::new())
            .map_err(StoreError::from)?;
        on_start(&provisional, Arc::new(progress(&wanted)));

        let mut tally = Tally::default();
        for i in 0..sources.len() {
            sources[i].fetch(self, &mut wanted, &mut tally).await?;
            // What it released falls to the sources after it.
            for later in &mut sources[i + 1..] {
                later.claim(self, &mut wanted).await?;
            }
        }
        let manifest = self.record(name, &info, &wanted).await?;
        report.replaced = self.materialize(&manifest, &req.targets, &revision).await?;
        report.id = manifest.id().to_string();
        report.bytes_from_peers = tally.from_peers;
        report.bytes_from_hf = tally.from_hf;
        report.peers_used = tally.peers_used;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Records the manifest of the fetched files (gated or private repos marked restricted).
    async fn record(
        &self,
        name: String,
        info: &RepoInfo,
        wanted: &[Wanted],
    ) -> Result<Manifest, FetchError> {
        let entries = wanted
            .iter()
            .map(|w| FileEntry {
                path: w.target.clone(),
                size: w.file.size,
                hash: w.hash.unwrap_or_else(|| mesh_proto::Hash::of(b"")),
                sha256: w.file.sha256.clone(),
                etag: Some(w.file.etag().to_string()),
            })
            .collect();
        let source = ModelSource::HuggingFace {
            repo: info.repo.clone(),
            commit: info.commit.clone(),
        };
        let manifest = Manifest::new(name, source, entries).map_err(StoreError::from)?;
        let store = self.store.clone();
        let m = manifest.clone();
        let restricted = info.restricted;
        blocking(move || {
            if restricted {
                store.restrict(&m)?;
            }
            store.insert_manifest(&m)
        })
        .await?;
        Ok(manifest)
    }
}

/// The report before any byte moves.
fn report_for(name: &str, info: &RepoInfo, req: &FetchRequest, wanted: &[Wanted]) -> FetchReport {
    let size = |local: bool| {
        wanted
            .iter()
            .filter(|w| {
                !local
                    || matches!(
                        w.origin,
                        Some(super::Origin::Local | super::Origin::InPlace)
                    )
            })
            .map(|w| w.file.size)
            .sum()
    };
    FetchReport {
        id: String::new(),
        name: name.to_string(),
        to: req
            .targets
            .first()
            .map(|t| t.root.clone())
            .unwrap_or_default(),
        files: wanted.len(),
        total_bytes: size(false),
        bytes_already_local: size(true),
        bytes_from_peers: 0,
        bytes_from_hf: 0,
        peers_used: Vec::new(),
        seconds: 0.0,
        source: Some(format!("{}@{}", info.repo, info.commit)),
        in_place: wanted
            .iter()
            .filter(|w| w.origin == Some(super::Origin::InPlace))
            .map(|w| w.target.to_string())
            .collect(),
        ..FetchReport::default()
    }
}

fn plan(wanted: &[Wanted]) -> Vec<PlanEntry> {
    wanted
        .iter()
        .map(|w| PlanEntry {
            path: w.target.to_string(),
            size: w.file.size,
            origin: w.origin.expect("the origin claims every file"),
        })
        .collect()
}

fn progress(wanted: &[Wanted]) -> FetchProgress {
    FetchProgress {
        files: wanted
            .iter()
            .map(|w| FileProgress {
                path: w.target.clone(),
                size: w.file.size,
                done: w.progress.clone(),
            })
            .collect(),
    }
}

/// Chooses the files of a repo: the catalog's list (with renames), or all files passing the
/// globs.
fn select(
    files: &[HubFile],
    wanted: &[(String, String)],
    include: &[String],
    exclude: &[String],
) -> Result<Vec<Wanted>, FetchError> {
    let globs = |patterns: &[String]| -> Result<Option<GlobSet>, FetchError> {
        if patterns.is_empty() {
            return Ok(None);
        }
        let mut b = GlobSetBuilder::new();
        for p in patterns {
            b.add(Glob::new(p).map_err(|e| FetchError::BadGlob(e.to_string()))?);
        }
        Ok(Some(
            b.build().map_err(|e| FetchError::BadGlob(e.to_string()))?,
        ))
    };
    let (inc, exc) = (globs(include)?, globs(exclude)?);
    let mut out = Vec::new();
    let pick = |f: &HubFile, target: &str| -> Result<Wanted, FetchError> {
        Ok(Wanted {
            file: f.clone(),
            target: target.parse().map_err(StoreError::from)?,
            origin: None,
            hash: None,
            progress: Arc::new(AtomicU64::new(0)),
        })
    };
    if wanted.is_empty() {
        for f in files {
            let included = inc.as_ref().is_none_or(|g| g.is_match(&f.path));
            let excluded = exc.as_ref().is_some_and(|g| g.is_match(&f.path));
            if included && !excluded {
                out.push(pick(f, &f.path)?);
            }
        }
    } else {
        for (from, to) in wanted {
            let f = files
                .iter()
                .find(|f| &f.path == from)
                .ok_or_else(|| FetchError::Hub(HubError::NotFound(from.clone())))?;
            out.push(pick(f, to)?);
        }
    }
    Ok(out)
}
