//! Where the files of a published model come from, in order: [`LocalCopies`] (the store holds
//! a verified copy), [`PeerCopies`] (a LAN peer holds the same repo at the same commit), then
//! the origin itself ([`HubOrigin`]: HuggingFace, its pieces split across the fleet).
//!
//! Each [`Source`] first claims the files it can provide (that is the `--dry-run` plan, made
//! before any byte moves), then fetches them; a file it fails on is released, and the sources
//! after it claim it. Whatever the source, a file is trusted only once its bytes match the
//! hash its publisher gave (HF's sha256 or git blob id). A mirror or another registry is one
//! more [`Source`].

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{atomic::AtomicU64, atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use mesh_proto::{FileEntry, Hash, ModelRef, RelPath, Source as ModelSource};
use tracing::warn;

use super::{ask_manifest, FetchError, Fetcher, Origin};
use crate::{
    hf::{HubFile, RepoInfo},
    store::{blocking, BlobStatus, StoreError},
    swarm::FileJob,
};

/// How long to wait for peers to show up before asking them for a published model.
const PEER_WAIT: Duration = Duration::from_secs(2);

/// A boxed future, so that sources can sit behind `dyn Source`.
pub(super) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A file chosen for the fetch: what its publisher says, where it goes, where it comes from.
pub(super) struct Wanted {
    /// The file as published.
    pub(super) file: HubFile,
    /// Its path in the model.
    pub(super) target: RelPath,
    /// The source that claimed it.
    pub(super) origin: Option<Origin>,
    /// Its BLAKE3 root, once a verified copy is known.
    pub(super) hash: Option<Hash>,
    /// Verified bytes present, for progress bars.
    pub(super) progress: Arc<AtomicU64>,
}

impl Wanted {
    fn claim(&mut self, origin: Origin, hash: Option<Hash>) {
        self.origin = Some(origin);
        self.hash = hash;
    }

    /// Gives the file up: a later source claims it.
    fn release(&mut self) {
        self.origin = None;
        self.hash = None;
        self.progress.store(0, Ordering::Relaxed);
    }
}

/// What the sources moved, for the report.
#[derive(Debug, Default)]
pub(super) struct Tally {
    pub(super) from_peers: u64,
    pub(super) from_hf: u64,
    pub(super) peers_used: Vec<SocketAddr>,
}

/// One place the files of a published model can come from.
pub(super) trait Source: Send {
    /// What `--dry-run` calls it.
    fn origin(&self) -> Origin;

    /// Claims the unclaimed files it can provide, before any byte moves.
    fn claim<'a>(
        &'a mut self,
        fetcher: &'a Fetcher,
        files: &'a mut [Wanted],
    ) -> BoxFuture<'a, Result<(), FetchError>>;

    /// Brings the files it claimed into the store (setting their `hash`), releasing any it
    /// could not provide.
    fn fetch<'a>(
        &'a mut self,
        fetcher: &'a Fetcher,
        files: &'a mut [Wanted],
        tally: &'a mut Tally,
    ) -> BoxFuture<'a, Result<(), FetchError>>;
}

fn unclaimed(files: &mut [Wanted]) -> impl Iterator<Item = &mut Wanted> {
    files.iter_mut().filter(|w| w.origin.is_none())
}

fn claimed_by(files: &mut [Wanted], origin: Origin) -> impl Iterator<Item = &mut Wanted> {
    files.iter_mut().filter(move |w| w.origin == Some(origin))
}

/// Verified copies already in the store, found by published hash.
pub(super) struct LocalCopies;

impl Source for LocalCopies {
    fn origin(&self) -> Origin {
        Origin::Local
    }

    fn claim<'a>(
        &'a mut self,
        fetcher: &'a Fetcher,
        files: &'a mut [Wanted],
    ) -> BoxFuture<'a, Result<(), FetchError>> {
        Box::pin(async move {
            for w in unclaimed(files) {
                let store = fetcher.store.clone();
                let etag = w.file.etag().to_string();
                if let Some(hash) = blocking(move || store.blob_for_etag(&etag)).await? {
                    w.claim(self.origin(), Some(hash));
                    w.progress.store(w.file.size, Ordering::Relaxed);
                }
            }
            Ok(())
        })
    }

    fn fetch<'a>(
        &'a mut self,
        _: &'a Fetcher,
        _: &'a mut [Wanted],
        _: &'a mut Tally,
    ) -> BoxFuture<'a, Result<(), FetchError>> {
        // Nothing to move.
        Box::pin(async { Ok(()) })
    }
}

/// LAN peers holding the same repo at the same commit: fetched through the swarm (BLAKE3
/// verified against the peer's manifest), then checked against the published hash.
pub(super) struct PeerCopies {
    /// Model names to ask peers for: the repo at the commit, the name fetched under, and the
    /// repo id.
    names: [String; 3],
    repo: String,
    commit: String,
}

impl PeerCopies {
    pub(super) fn new(name: &str, info: &RepoInfo) -> Self {
        Self {
            names: [
                format!("{}@{}", info.repo, info.commit),
                name.to_string(),
                info.repo.clone(),
            ],
            repo: info.repo.clone(),
            commit: info.commit.clone(),
        }
    }

    /// Peers' copies of the repo at the commit, by published hash.
    async fn copies(&self, fetcher: &Fetcher) -> HashMap<String, FileEntry> {
        let mut out = HashMap::new();
        let wait = if fetcher.discovery {
            PEER_WAIT
        } else {
            Duration::ZERO
        };
        let deadline = Instant::now() + wait;
        let conns = loop {
            let conns = fetcher.peers.connections().borrow().clone();
            if !conns.is_empty() || Instant::now() >= deadline {
                break conns;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for conn in conns.values() {
            for name in &self.names {
                let Ok(model) = name.parse::<ModelRef>() else {
                    continue;
                };
                let Ok(Some(manifest)) = ask_manifest(conn, &model).await else {
                    continue;
                };
                let ModelSource::HuggingFace { repo, commit } = manifest.source() else {
                    continue;
                };
                if *repo == self.repo && *commit == self.commit {
                    for f in manifest.files() {
                        if let Some(etag) = &f.etag {
                            out.insert(etag.clone(), f.clone());
                        }
                    }
                }
            }
        }
        out
    }
}

/// Whether the store's copy of `hash` matches the published hash of `file` (and records it if
/// so); a copy that doesn't is dropped from the store.
pub(super) async fn check_copy(
    fetcher: &Fetcher,
    hash: Hash,
    file: &HubFile,
) -> Result<bool, FetchError> {
    let store = fetcher.store.clone();
    let file = file.clone();
    Ok(blocking(move || {
        let Ok(path) = store.data_path(hash) else {
            return Ok(false);
        };
        let digest = file
            .published()
            .of_file(&path)
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        if digest == file.etag() {
            store.record_etag(file.etag(), hash)?;
            Ok(true)
        } else {
            // A peer relayed bytes that hash to its BLAKE3 root but not to the publisher's
            // hash: never trust that blob.
            store.forget_blob(hash)?;
            Ok(false)
        }
    })
    .await?)
}

impl Source for PeerCopies {
    fn origin(&self) -> Origin {
        Origin::Peer
    }

    fn claim<'a>(
        &'a mut self,
        fetcher: &'a Fetcher,
        files: &'a mut [Wanted],
    ) -> BoxFuture<'a, Result<(), FetchError>> {
        Box::pin(async move {
            if unclaimed(files).next().is_none() {
                return Ok(());
            }
            let copies = self.copies(fetcher).await;
            for w in unclaimed(files) {
                if let Some(entry) = copies.get(w.file.etag()) {
                    if entry.size == w.file.size {
                        w.claim(self.origin(), Some(entry.hash));
                    }
                }
            }
            Ok(())
        })
    }

    fn fetch<'a>(
        &'a mut self,
        fetcher: &'a Fetcher,
        files: &'a mut [Wanted],
        tally: &'a mut Tally,
    ) -> BoxFuture<'a, Result<(), FetchError>> {
        Box::pin(async move {
            let origin = self.origin();
            if claimed_by(files, origin).next().is_none() {
                return Ok(());
            }
            let received_before = fetcher.metrics.bytes_received.load(Ordering::Relaxed);
            let mut jobs = Vec::new();
            for w in claimed_by(files, origin) {
                let (hash, size) = (w.hash.expect("claimed peer files have a hash"), w.file.size);
                let store = fetcher.store.clone();
                if size == 0
                    || blocking(move || store.status(hash, size)).await? == BlobStatus::Complete
                {
                    continue;
                }
                let store = fetcher.store.clone();
                let partial = blocking(move || store.partial(hash, size)).await?;
                jobs.push(FileJob {
                    path: w.target.clone(),
                    partial,
                    progress: w.progress.clone(),
                });
            }
            match fetcher.swarm_download(jobs).await? {
                Ok(used) => tally.peers_used = used,
                Err(e) => warn!("peers could not provide everything, using HuggingFace: {e}"),
            }
            for w in claimed_by(files, origin) {
                let hash = w.hash.expect("claimed peer files have a hash");
                if !check_copy(fetcher, hash, &w.file).await? {
                    warn!(path = %w.target, "peer copy missing or does not match HuggingFace's hash: fetching from HuggingFace");
                    w.release();
                }
            }
            tally.from_peers =
                fetcher.metrics.bytes_received.load(Ordering::Relaxed) - received_before;
            Ok(())
        })
    }
}

/// HuggingFace itself: each file through the node's shared download of it
/// ([`Fetcher::fetch_file`]), the fleet splitting its pieces; [`FILES_AT_ONCE`] at a time, in
/// the Hub's order, so that nodes fetching the same repo work on the same files together.
pub(super) struct HubOrigin {
    info: RepoInfo,
}

/// Files of one repo fetched from HuggingFace at once.
const FILES_AT_ONCE: usize = 4;

impl HubOrigin {
    pub(super) fn new(info: RepoInfo) -> Self {
        Self { info }
    }
}

impl Source for HubOrigin {
    fn origin(&self) -> Origin {
        Origin::Hf
    }

    fn claim<'a>(
        &'a mut self,
        _: &'a Fetcher,
        files: &'a mut [Wanted],
    ) -> BoxFuture<'a, Result<(), FetchError>> {
        let origin = self.origin();
        for w in unclaimed(files) {
            w.claim(origin, None);
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
            let mut running = tokio::task::JoinSet::new();
            let mut ended = Vec::new();
            let claimed: Vec<usize> = (0..files.len())
                .filter(|&i| files[i].origin == Some(self.origin()))
                .collect();
            for i in claimed {
                if running.len() >= FILES_AT_ONCE {
                    ended.extend(running.join_next().await);
                }
                let rx = fetcher.fetch_file(&self.info, &files[i].file, None);
                let (size, progress) = (files[i].file.size, files[i].progress.clone());
                running.spawn(async move { (i, Fetcher::follow_file(rx, size, &progress).await) });
            }
            ended.extend(running.join_all().await.into_iter().map(Ok));
            for joined in ended {
                let (i, result) = joined.expect("file tasks do not panic");
                let (hash, from) = result.map_err(FetchError::Shared)?;
                files[i].hash = Some(hash);
                tally.from_hf += from.from_hf;
                tally.from_peers += from.from_peers;
                for peer in from.peers {
                    if !tally.peers_used.contains(&peer) {
                        tally.peers_used.push(peer);
                    }
                }
            }
            Ok(())
        })
    }
}
