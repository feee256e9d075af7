//! `mesh fetch ollama:NAME:TAG`: an Ollama model, into an Ollama store.
//!
//! 1. The mesh first: the store or a peer that has `ollama:NAME:TAG` (a node imports its
//!    local Ollama store at start) gives the model; it comes through the swarm from every
//!    peer at once, like any mesh model, BLAKE3-verified, and each blob is checked against its
//!    sha256 again before it goes into the Ollama store.
//! 2. Only when no peer has it: the registry's manifest, then each blob from the first of its
//!    sources: already in the Ollama store ([`InPlace`]), in the mesh store ([`LocalCopies`]),
//!    else the registry ([`RegistryOrigin`]), with the fleet splitting each blob's pieces
//!    (`swarm::origin`, as for HuggingFace) so each byte leaves the registry once. The node
//!    then holds the model and serves it to peers like one it imported.
//!
//! Either way the files land through `Layout::Ollama` (`ollama::store_out`): blobs first,
//! the manifest renamed into place last.

use std::{
    sync::{atomic::AtomicU64, Arc},
    time::Instant,
};

use mesh_proto::{FileEntry, Manifest, ModelRef, Source as ModelSource};

use super::{
    adopt::InPlace,
    sources::{BoxFuture, LocalCopies, Source, Tally, Wanted},
    target::check_space,
    FetchError, FetchProgress, FetchReport, FetchRequest, Fetcher, FileProgress, Origin, PlanEntry,
};
use crate::{
    hf::HubFile,
    ollama::{
        manifest_blobs,
        registry::{BlobRange, Registry},
        sha256_hex, BlobRef, OllamaError, OllamaName,
    },
    store::{blocking, StoreError},
    swarm::origin,
};

impl Fetcher {
    /// Fetches an Ollama model: from the mesh if anyone has it, else from the registry.
    pub(super) async fn fetch_ollama(
        &self,
        req: FetchRequest,
        name: OllamaName,
        on_start: impl FnOnce(&Manifest, Arc<FetchProgress>),
    ) -> Result<FetchReport, FetchError> {
        let req = FetchRequest {
            model: ModelRef::Name(name.mesh_name()),
            ..req
        };
        let mut slot = Some(on_start);
        let start = |m: &Manifest, p| {
            if let Some(f) = slot.take() {
                f(m, p)
            }
        };
        match self.fetch_mesh(req.clone(), start).await {
            Err(FetchError::UnknownModel(_) | FetchError::NoPeers(_)) => {}
            other => return other,
        }
        tracing::info!(model = %name.full(), "no peer has it: asking the registry");
        let on_start = slot
            .take()
            .unwrap_or_else(|| unreachable!("started without a model"));
        self.fetch_from_registry(&req, &name, on_start).await
    }

    async fn fetch_from_registry(
        &self,
        req: &FetchRequest,
        name: &OllamaName,
        on_start: impl FnOnce(&Manifest, Arc<FetchProgress>),
    ) -> Result<FetchReport, FetchError> {
        let started = Instant::now();
        let registry = Registry::for_name(name);
        let bytes = registry.manifest(name).await?;
        let blobs = manifest_blobs(&bytes).map_err(|why| OllamaError::Http {
            registry: registry.base().to_string(),
            why: format!("the manifest of {} is not usable: {why}", name.full()),
        })?;
        let digest = sha256_hex(&bytes);
        let mesh_name = name.mesh_name();
        let mut wanted = blobs.iter().map(wanted).collect::<Result<Vec<_>, _>>()?;
        let mut sources: Vec<Box<dyn Source>> = vec![
            Box::new(InPlace::new(self, &mesh_name, &req.targets, req.dry_run)),
            Box::new(LocalCopies),
            Box::new(RegistryOrigin {
                registry,
                name: name.clone(),
            }),
        ];
        for source in &mut sources {
            source.claim(self, &mut wanted).await?;
        }
        let here = |w: &&Wanted| matches!(w.origin, Some(Origin::Local | Origin::InPlace));
        let mut report = FetchReport {
            name: mesh_name.clone(),
            to: req
                .targets
                .first()
                .map(|t| t.root.clone())
                .unwrap_or_default(),
            files: wanted.len() + 1,
            total_bytes: wanted.iter().map(|w| w.file.size).sum::<u64>() + bytes.len() as u64,
            bytes_already_local: wanted.iter().filter(here).map(|w| w.file.size).sum(),
            source: Some(format!("{}@sha256:{digest}", name.full())),
            in_place: wanted
                .iter()
                .filter(|w| w.origin == Some(Origin::InPlace))
                .map(|w| w.target.to_string())
                .collect(),
            ..FetchReport::default()
        };
        if req.dry_run {
            let mut plan: Vec<PlanEntry> = wanted
                .iter()
                .map(|w| PlanEntry {
                    path: w.target.to_string(),
                    size: w.file.size,
                    origin: w.origin.expect("the registry claims every blob"),
                })
                .collect();
            plan.push(PlanEntry {
                path: name.manifest_path(),
                size: bytes.len() as u64,
                origin: Origin::Registry,
            });
            report.plan = Some(plan);
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        for target in &req.targets {
            target.check()?;
        }
        let missing = report.total_bytes - report.bytes_already_local;
        check_space(&self.store, &req.targets, missing, report.total_bytes)?;
        let provisional = Manifest::new(mesh_name.clone(), ModelSource::Local, Vec::new())
            .map_err(StoreError::from)?;
        on_start(&provisional, Arc::new(progress(&wanted)));

        let mut tally = Tally::default();
        for i in 0..sources.len() {
            sources[i].fetch(self, &mut wanted, &mut tally).await?;
            for later in &mut sources[i + 1..] {
                later.claim(self, &mut wanted).await?;
            }
        }
        let manifest = self.record_ollama(name, bytes, digest, &wanted).await?;
        report.replaced = self.materialize(&manifest, &req.targets, "main").await?;
        report.id = manifest.id().to_string();
        report.bytes_from_hf = tally.from_hf;
        report.peers_used = tally.peers_used;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Records the model: its blobs and its manifest's exact bytes (copied into the store).
    async fn record_ollama(
        &self,
        name: &OllamaName,
        bytes: Vec<u8>,
        digest: String,
        wanted: &[Wanted],
    ) -> Result<Manifest, FetchError> {
        let mut entries: Vec<FileEntry> = wanted
            .iter()
            .map(|w| FileEntry {
                path: w.target.clone(),
                size: w.file.size,
                hash: w.hash.expect("every fetched blob has a hash"),
                sha256: w.file.sha256.clone(),
                etag: w.file.sha256.clone(),
            })
            .collect();
        let store = self.store.clone();
        let (path, full, mesh_name) = (name.manifest_path(), name.full(), name.mesh_name());
        let manifest = blocking(move || {
            let tmp = store
                .home()
                .join("partial")
                .join(format!("ollama-{digest}.{}.tmp", rand::random::<u32>()));
            std::fs::write(&tmp, &bytes).map_err(|source| StoreError::Io {
                path: tmp.clone(),
                source,
            })?;
            let (hash, size) = store.import_owned(&tmp)?;
            entries.push(FileEntry {
                path: path.parse()?,
                size,
                hash,
                sha256: Some(digest.clone()),
                etag: None,
            });
            let source = ModelSource::Ollama { name: full, digest };
            let manifest = Manifest::new(mesh_name, source, entries)?;
            store.insert_manifest(&manifest)?;
            Ok(manifest)
        })
        .await?;
        Ok(manifest)
    }
}

fn wanted(blob: &BlobRef) -> Result<Wanted, FetchError> {
    Ok(Wanted {
        file: HubFile {
            path: blob.path(),
            size: blob.size,
            sha256: Some(blob.sha256.clone()),
            git_oid: String::new(),
        },
        target: blob.path().parse().map_err(StoreError::from)?,
        origin: None,
        hash: None,
        progress: Arc::new(AtomicU64::new(0)),
    })
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

/// The Ollama registry, for blobs no other source has; nodes fetching the same blob at once
/// split its pieces ([`origin`]).
struct RegistryOrigin {
    registry: Registry,
    name: OllamaName,
}

impl RegistryOrigin {
    /// Fetches one blob into the store; returns the bytes that came from the registry.
    async fn download(&self, fetcher: &Fetcher, w: &mut Wanted) -> Result<u64, FetchError> {
        let sha256 = w.file.etag().to_string();
        let part = fetcher.store.hub_part_path(&sha256);
        let partial = fetcher
            .store
            .piece_files()
            .open(&sha256, w.file.size, &part, fetcher.node_id, false)
            .map_err(|source| StoreError::Io {
                path: part.clone(),
                source,
            })?;
        let range = BlobRange {
            registry: self.registry.clone(),
            name: self.name.clone(),
            blob: BlobRef {
                sha256: sha256.clone(),
                size: w.file.size,
            },
        };
        let file = range.origin_file();
        let conns = fetcher.peers.connections();
        let from = origin::download(&range, &file, partial.clone(), conns, w.progress.clone())
            .await
            .map_err(OllamaError::from)?;
        // Keep serving its pieces to peers still assembling it.
        fetcher
            .assembled
            .lock()
            .expect("assembled lock poisoned")
            .push(partial.clone());
        let store = fetcher.store.clone();
        let hash = blocking(move || {
            let (hash, _) = store.import_owned(&part)?;
            store.record_etag(&sha256, hash)?;
            Ok(hash)
        })
        .await?;
        partial.discard_checkpoint();
        w.hash = Some(hash);
        Ok(from.from_origin)
    }
}

impl Source for RegistryOrigin {
    fn origin(&self) -> Origin {
        Origin::Registry
    }

    fn claim<'a>(
        &'a mut self,
        _: &'a Fetcher,
        files: &'a mut [Wanted],
    ) -> BoxFuture<'a, Result<(), FetchError>> {
        for w in files.iter_mut().filter(|w| w.origin.is_none()) {
            w.origin = Some(Origin::Registry);
        }
        Box::pin(async { Ok(()) })
    }

    fn fetch<'a>(
        &'a mut self,
        fetcher: &'a Fetcher,
        files: &'a mut [Wanted],
        tally: &'a mut Tally,
    ) -> BoxFuture<'a, Result<(), FetchError>> {
        Box::pin(async move {
            for w in files
                .iter_mut()
                .filter(|w| w.origin == Some(Origin::Registry))
            {
                tally.from_hf += self.download(fetcher, w).await?;
            }
            Ok(())
        })
    }
}
