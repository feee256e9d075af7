//! One published file at a time, shared: every request for the same HuggingFace file (by its
//! published hash) on this node joins one download, whether it comes from a client of the HF
//! endpoint or from `mesh fetch`. The first request starts it; the others follow its
//! [`FileState`], and can read the bytes while they arrive (from a [`PartialBlob`], verified
//! as they come, or a [`PieceFile`], checked when whole).
//!
//! The file comes from the first source that has it: the store, a LAN peer holding the same
//! repo at the same commit, then HuggingFace with the fleet splitting its pieces. It is
//! recorded in the manifest named `org/name@commit`, so peers find it by commit.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc},
};

use mesh_proto::{FileEntry, Hash, Manifest, ModelRef, Source as ModelSource};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{ask_manifest, FetchError, Fetcher};
use crate::{
    hf::{Hub, HubError, HubFile, HubRange, RepoInfo},
    store::{blocking, pieces::PieceFile, ranges, PartialBlob, StoreError},
    swarm::{origin, FileJob},
};

/// How often a follower updates its progress counter.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// Where a shared file download is.
#[derive(Clone, Debug)]
pub enum FileState {
    /// Looking for a source.
    Starting,
    /// Arriving from peers, each 16 KiB group verified against the BLAKE3 root as it comes.
    FromPeers(Arc<PartialBlob>),
    /// Arriving from HuggingFace (and from members assembling it too): raw until whole.
    FromOrigin(Arc<PieceFile>),
    /// In the store, verified.
    Done {
        /// Its BLAKE3 root.
        hash: Hash,
        /// Where its bytes came from in this download.
        tally: FileTally,
    },
    /// Failed.
    Failed(Arc<FetchError>),
}

/// Where the bytes of one file came from.
#[derive(Clone, Debug, Default)]
pub struct FileTally {
    /// From LAN peers (verified blocks, or raw pieces of a split).
    pub from_peers: u64,
    /// From HuggingFace.
    pub from_hf: u64,
    /// The LAN peers that sent any of them.
    pub peers: BTreeSet<SocketAddr>,
}

/// The shared downloads, by published hash. A std mutex: map lookups only.
pub(crate) type Downloads = std::sync::Mutex<HashMap<String, watch::Receiver<FileState>>>;

impl Fetcher {
    /// Starts fetching `file` of `info`'s commit into the store, or joins the download
    /// already running for it. `token` is the HF token to download with if the node has none
    /// (a client's that the Hub accepted for this repo).
    pub fn fetch_file(
        &self,
        info: &RepoInfo,
        file: &HubFile,
        token: Option<&str>,
    ) -> watch::Receiver<FileState> {
        let mut downloads = self.downloads.lock().expect("downloads lock poisoned");
        if let Some(rx) = downloads.get(file.etag()) {
            if !matches!(*rx.borrow(), FileState::Failed(_)) {
                return rx.clone();
            }
        }
        let (tx, rx) = watch::channel(FileState::Starting);
        downloads.insert(file.etag().to_string(), rx.clone());
        let (this, info, file) = (self.clone(), info.clone(), file.clone());
        let hub = self.meta.hub().or_token(token);
        tokio::spawn(async move {
            let state = match this.fetch_file_impl(&info, &file, hub, &tx).await {
                Ok((hash, tally)) => FileState::Done { hash, tally },
                Err(e) => {
                    warn!(path = %file.path, "fetching a file failed: {e}");
                    FileState::Failed(Arc::new(e))
                }
            };
            let _ = tx.send(state);
        });
        rx
    }

    /// Follows a file download to its end, keeping `progress` at the verified (or
    /// assembled) bytes: its BLAKE3 hash and where the bytes came from, or its error.
    pub async fn follow_file(
        mut rx: watch::Receiver<FileState>,
        size: u64,
        progress: &AtomicU64,
    ) -> Result<(Hash, FileTally), Arc<FetchError>> {
        use std::sync::atomic::Ordering;
        loop {
            let done = match &*rx.borrow_and_update() {
                FileState::Done { hash, tally } => Some(Ok((*hash, tally.clone()))),
                FileState::Failed(e) => Some(Err(e.clone())),
                FileState::FromPeers(p) => {
                    progress.store(ranges::byte_len(&p.have(), size), Ordering::Relaxed);
                    None
                }
                FileState::FromOrigin(p) => {
                    progress.store(p.bytes_here(), Ordering::Relaxed);
                    None
                }
                FileState::Starting => None,
            };
            if let Some(done) = done {
                if done.is_ok() {
                    progress.store(size, Ordering::Relaxed);
                }
                return done;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() {
                    return Err(Arc::new(FetchError::Store(StoreError::Io {
                        path: "download task".into(),
                        source: std::io::Error::other("ended without a result"),
                    })));
                },
                _ = tokio::time::sleep(PROGRESS_EVERY) => {}
            }
        }
    }

    async fn fetch_file_impl(
        &self,
        info: &RepoInfo,
        file: &HubFile,
        hub: Hub,
        state: &watch::Sender<FileState>,
    ) -> Result<(Hash, FileTally), FetchError> {
        let store = self.store.clone();
        let etag = file.etag().to_string();
        if let Some(hash) = blocking(move || store.blob_for_etag(&etag)).await? {
            return Ok((hash, FileTally::default()));
        }
        let received = self
            .metrics
            .bytes_received
            .load(std::sync::atomic::Ordering::Relaxed);
        if let Some((hash, peers)) = self.file_from_peers(info, file, state).await? {
            self.record_commit_file(info, file, hash).await?;
            let now = self
                .metrics
                .bytes_received
                .load(std::sync::atomic::Ordering::Relaxed);
            let tally = FileTally {
                from_peers: now - received,
                from_hf: 0,
                peers,
            };
            return Ok((hash, tally));
        }
        let (hash, tally) = self.file_from_hub(info, file, hub, state).await?;
        debug!(path = %file.path, ?tally, "file from HuggingFace");
        self.record_commit_file(info, file, hash).await?;
        Ok((hash, tally))
    }

    /// The file from a peer that holds the same commit, checked against its published hash,
    /// with the peers that sent it; `None` if no peer has it (or its copy is wrong).
    async fn file_from_peers(
        &self,
        info: &RepoInfo,
        file: &HubFile,
        state: &watch::Sender<FileState>,
    ) -> Result<Option<(Hash, BTreeSet<SocketAddr>)>, FetchError> {
        let Some(entry) = self.peer_copy(info, file).await else {
            return Ok(None);
        };
        let (hash, size) = (entry.hash, file.size);
        let mut used = BTreeSet::new();
        if size > 0 {
            let store = self.store.clone();
            let partial = blocking(move || store.partial(hash, size)).await?;
            let _ = state.send(FileState::FromPeers(partial.clone()));
            let job = FileJob {
                path: entry.path.clone(),
                partial,
                progress: Arc::new(AtomicU64::new(0)),
            };
            match self.swarm_download(vec![job]).await? {
                Ok(peers) => used.extend(peers),
                Err(e) => {
                    warn!(path = %file.path, "peers could not provide it, using HuggingFace: {e}");
                    return Ok(None);
                }
            }
        }
        Ok(super::sources::check_copy(self, hash, file)
            .await?
            .then_some((hash, used)))
    }

    /// A peer's entry for `file` at `info`'s commit, if a connected peer holds one.
    async fn peer_copy(&self, info: &RepoInfo, file: &HubFile) -> Option<FileEntry> {
        let conns = self.peers.connections().borrow().clone();
        let names = [format!("{}@{}", info.repo, info.commit), info.repo.clone()];
        for conn in conns.values() {
            for name in &names {
                let Ok(model) = name.parse::<ModelRef>() else {
                    continue;
                };
                let Ok(Some(manifest)) = ask_manifest(conn, &model).await else {
                    continue;
                };
                let ModelSource::HuggingFace { repo, commit } = manifest.source() else {
                    continue;
                };
                if *repo != info.repo || *commit != info.commit {
                    continue;
                }
                let found = manifest
                    .files()
                    .iter()
                    .find(|f| f.etag.as_deref() == Some(file.etag()) && f.size == file.size);
                if let Some(entry) = found {
                    return Some(entry.clone());
                }
            }
        }
        None
    }

    /// The file from HuggingFace, its pieces split with every peer assembling it too.
    async fn file_from_hub(
        &self,
        info: &RepoInfo,
        file: &HubFile,
        hub: Hub,
        state: &watch::Sender<FileState>,
    ) -> Result<(Hash, FileTally), FetchError> {
        let part = self.store.hub_part_path(file.etag());
        let partial = self
            .store
            .piece_files()
            .open(file.etag(), file.size, &part, self.node_id, info.restricted)
            .map_err(|source| StoreError::Io {
                path: part.clone(),
                source,
            })?;
        let _ = state.send(FileState::FromOrigin(partial.clone()));
        let range = HubRange {
            hub,
            repo: info.repo.clone(),
            commit: info.commit.clone(),
            file: file.clone(),
        };
        let origin_file = range.origin_file();
        let conns = self.peers.connections();
        let progress = Arc::new(AtomicU64::new(0));
        let assembled = origin::download(&range, &origin_file, partial.clone(), conns, progress)
            .await
            .map_err(HubError::from)?;
        // Keep serving its pieces to peers still assembling it.
        self.assembled
            .lock()
            .expect("assembled lock poisoned")
            .push(partial.clone());
        let store = self.store.clone();
        let etag = file.etag().to_string();
        let importing = std::time::Instant::now();
        let built = assembled.outboard.clone();
        let hash = blocking(move || {
            let (hash, _) = match built {
                Some((hash, outboard)) => {
                    store.import_owned_with_outboard(&part, hash, &outboard)?
                }
                None => store.import_owned(&part)?,
            };
            store.record_etag(&etag, hash)?;
            Ok(hash)
        })
        .await?;
        partial.discard_checkpoint();
        debug!(path = %file.path, seconds = importing.elapsed().as_secs_f64(), "assembled file taken into the store");
        let tally = FileTally {
            from_peers: assembled.from_peers,
            from_hf: assembled.from_origin,
            peers: assembled.peers,
        };
        self.metrics.add_from_hf(tally.from_hf);
        Ok((hash, tally))
    }

    /// Adds `file` to the manifest named `org/name@commit`: every file of that commit this
    /// node holds, under its path in the repo.
    pub(crate) async fn record_commit_file(
        &self,
        info: &RepoInfo,
        file: &HubFile,
        hash: Hash,
    ) -> Result<(), FetchError> {
        let _serial = self.commit_manifests.lock().await;
        let name = format!("{}@{}", info.repo, info.commit);
        let (store, info, file) = (self.store.clone(), info.clone(), file.clone());
        blocking(move || {
            let model = ModelRef::Name(name.clone());
            let mut entries: Vec<FileEntry> = store
                .manifest(&model)?
                .map(|m| m.files().to_vec())
                .unwrap_or_default();
            entries.retain(|e| e.path.as_str() != file.path);
            entries.push(FileEntry {
                path: file.path.parse()?,
                size: file.size,
                hash,
                sha256: file.sha256.clone(),
                etag: Some(file.etag().to_string()),
            });
            let source = ModelSource::HuggingFace {
                repo: info.repo.clone(),
                commit: info.commit.clone(),
            };
            let manifest = Manifest::new(name, source, entries)?;
            if info.restricted {
                store.restrict(&manifest)?;
            }
            store.insert_manifest(&manifest)
        })
        .await?;
        Ok(())
    }
}
