//! The store: one folder holding blobs, their bao-tree outboards, partial downloads and a redb
//! metadata database. It is the only module that touches those files.
//!
//! # Layout of `MESH_HOME`
//! - `meta.redb`: blob records, manifests and names ([`db`]).
//! - `blobs/<hash>.data`: fetched blobs. Blobs added with `mesh add` stay where they are and are
//!   served in place; their record holds the path, size and mtime seen when they were hashed.
//! - `blobs/<hash>.obao`: the post-order outboard (parent hashes above 16 KiB chunk groups) of
//!   every complete blob, on disk so multi-GB files don't need it in RAM.
//! - `partial/<hash>.{data,obao}`: downloads in progress ([`partial`]).
//! - `identity.key`: the node's ed25519 key (PKCS#8), readable by the owner only.
//!
//! # Concurrency
//! [`Store`] is a cheap handle. Every method blocks (file I/O, hashing, redb commits): async code
//! calls it from `spawn_blocking`. redb serialises write transactions itself, so the store
//! needs no actor; the only lock is the map of live partial blobs.

mod db;
pub mod digest;
mod error;
mod gather;
mod import;
pub mod lifecycle;
mod outboard;
mod partial;
pub mod pieces;
pub mod ranges;
pub mod verify;

use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
    time::SystemTime,
};

use bao_tree::{io::outboard::PostOrderOutboard, BaoTree, ChunkRanges};
use mesh_proto::{wire::ModelSummary, Hash, Manifest, ModelRef};
use positioned_io::RandomAccessFile;
use serde::{Deserialize, Serialize};

pub use self::error::{disk_full, StoreError, DISK_FULL_HINT, QUOTA_HINT};
pub use self::partial::{PartialBlob, Verified, Written};
use self::pieces::PieceFiles;
pub use self::{import::AddProgress, outboard::PieceOutboard};

/// Bytes `MESH_HOME/reserve` holds back, so that the database can still record what was
/// verified when the disk fills up (see [`Store::release_reserve`]).
const RESERVE_BYTES: u64 = 4 << 20;

/// The chunk group size of every outboard: 16 KiB.
pub const BLOCK_SIZE: bao_tree::BlockSize = bao_tree::BlockSize::from_chunk_log(4);

/// Where a complete blob's bytes live.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Location {
    /// `blobs/<hash>.data` in the store.
    Store,
    /// A file added in place.
    External(PathBuf),
}

/// What the store knows about one blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum BlobRecord {
    /// Every byte is present and was verified.
    Complete {
        /// Length in bytes.
        size: u64,
        /// Where the bytes are.
        location: Location,
        /// The data file's mtime when it was verified, as (seconds, nanoseconds) since the epoch.
        mtime: (u64, u32),
    },
    /// A download in progress; `have` lists verified chunks that are durably on disk.
    Partial {
        /// Length in bytes.
        size: u64,
        /// Verified chunk spans (`[start, end)` pairs).
        have: Vec<(u64, u64)>,
    },
}

/// How much of a blob the store holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobStatus {
    /// All of it.
    Complete,
    /// These verified chunks.
    Partial(ChunkRanges),
    /// None of it.
    Missing,
}

/// What the store holds of a blob, for advertising it to peers.
#[derive(Debug)]
pub struct BlobHave {
    /// Blob size in bytes.
    pub size: u64,
    /// Verified chunks.
    pub have: ChunkRanges,
    /// Chunks being fetched right now.
    pub pending: ChunkRanges,
    /// For a download in progress: wakes when more chunks are verified.
    pub changes: Option<tokio::sync::watch::Receiver<u64>>,
    /// For a download in progress: its random id ([`PartialBlob::node`]); otherwise 0.
    pub node: u64,
}

/// An open blob to serve: data, outboard and the chunks that may be read.
#[derive(Debug)]
pub struct BlobReader {
    /// The blob's bytes (possibly only partly present).
    pub data: RandomAccessFile,
    /// Its outboard.
    pub outboard: PostOrderOutboard<RandomAccessFile>,
    /// The verified chunks: these may be encoded at once.
    pub have: ChunkRanges,
    /// For a download in progress, the chunks being fetched: these may be promised too, and
    /// are encoded as they are verified when read through [`BlobReader::verified`].
    pub pending: ChunkRanges,
    /// The download in progress.
    growing: Option<Arc<PartialBlob>>,
}

impl BlobReader {
    /// Data, outboard, the chunks verified when it was opened, and the download in progress
    /// (for waiting on pending chunks with [`PartialBlob::wait_verified`]).
    pub fn into_parts(
        self,
    ) -> (
        RandomAccessFile,
        PostOrderOutboard<RandomAccessFile>,
        ChunkRanges,
        Option<Arc<PartialBlob>>,
    ) {
        (self.data, self.outboard, self.have, self.growing)
    }

    /// The chunks this reader may be asked to encode.
    pub fn promised(&self) -> ChunkRanges {
        self.have.clone() | &self.pending
    }

    /// Data and outboard for the encoder: reads of pending chunks wait until they are verified,
    /// and fail if they stop being fetched.
    pub fn verified(
        &self,
    ) -> (
        Verified<'_, &RandomAccessFile>,
        Verified<'_, &PostOrderOutboard<RandomAccessFile>>,
    ) {
        let growing = self.growing.as_deref();
        (
            Verified {
                inner: &self.data,
                growing,
            },
            Verified {
                inner: &self.outboard,
                growing,
            },
        )
    }
}

/// A handle to the store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `MESH_HOME`.
    home: PathBuf,
    /// The metadata database.
    db: redb::Database,
    /// Files being assembled from an origin's pieces (before their BLAKE3 root is known).
    piece_files: PieceFiles,
    /// Partial blobs being written, so concurrent fetches of one blob share one writer.
    /// A std mutex: it is held only for map lookups, never across I/O or `.await`.
    partials: Mutex<HashMap<Hash, Weak<PartialBlob>>>,
    /// Bumped when a blob appears (a download starts, or a file is added or imported), for
    /// subscribers waiting on a blob we don't have yet.
    blobs_appeared: tokio::sync::watch::Sender<()>,
}

impl Store {
    /// Opens (creating if needed) the store at `home`.
    pub fn open(home: &Path) -> Result<Self, StoreError> {
        for dir in [home.to_path_buf(), home.join("blobs"), home.join("partial")] {
            fs::create_dir_all(&dir).map_err(StoreError::io(&dir))?;
            // Only the owner reads the store: it holds what the owner fetched with their HF
            // token (gated repos too).
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .map_err(StoreError::io(&dir))?;
        }
        let db_path = home.join("meta.redb");
        let db = match redb::Database::create(&db_path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::Locked(home.to_path_buf()))
            }
            Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))
                if e.kind() == io::ErrorKind::WouldBlock =>
            {
                return Err(StoreError::Locked(home.to_path_buf()))
            }
            Err(e) => return Err(redb::Error::from(e).into()),
        };
        let _ = fs::set_permissions(&db_path, fs::Permissions::from_mode(0o600));
        db::init(&db)?;
        let store = Self {
            inner: Arc::new(Inner {
                home: home.to_path_buf(),
                db,
                piece_files: PieceFiles::default(),
                partials: Mutex::default(),
                blobs_appeared: tokio::sync::watch::channel(()).0,
            }),
        };
        store.ensure_reserve();
        Ok(store)
    }

    /// Holds back [`RESERVE_BYTES`] of disk in `MESH_HOME/reserve`, if it isn't already (and
    /// the disk has room).
    pub fn ensure_reserve(&self) {
        let path = self.inner.home.join("reserve");
        if fs::metadata(&path).is_ok_and(|m| m.len() == RESERVE_BYTES) {
            return;
        }
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        let made = fs::File::create(&tmp).and_then(|f| {
            use fs4::FileExt;
            f.allocate(RESERVE_BYTES)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        });
        if let Err(e) = made {
            let _ = fs::remove_file(&tmp);
            tracing::debug!("no disk reserve for the store: {e}");
        }
    }

    /// Gives the reserve back to the disk: called when a write finds the disk full, so the
    /// checkpoint that follows can still record the verified bytes. Returns whether there was
    /// one.
    pub(crate) fn release_reserve(&self) -> bool {
        let released = fs::remove_file(self.inner.home.join("reserve")).is_ok();
        if released {
            tracing::info!(
                bytes = RESERVE_BYTES,
                "disk full: released the store's reserve to record what was verified"
            );
        }
        released
    }

    /// The store folder.
    pub fn home(&self) -> &Path {
        &self.inner.home
    }

    /// Files being assembled from an origin's pieces.
    pub fn piece_files(&self) -> &PieceFiles {
        &self.inner.piece_files
    }

    /// The node's identity key (PKCS#8 DER), created on first use.
    pub fn identity_key(&self) -> Result<Vec<u8>, StoreError> {
        let path = self.inner.home.join("identity.key");
        match fs::read(&path) {
            Ok(der) => return Ok(der),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(&path)(e)),
        }
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .expect("ed25519 key generation does not fail");
        let der = key.serialize_der();
        write_private(&path, &der).map_err(StoreError::io(&path))?;
        Ok(der)
    }

    /// Hashes a file or folder and records it as a model served in place. See [`import`].
    pub fn add_path(
        &self,
        path: &Path,
        name: Option<String>,
        progress: &mut dyn FnMut(AddProgress),
    ) -> Result<Manifest, StoreError> {
        import::add_path(self, path, name, progress)
    }

    /// Hashes one file and serves it in place (as `mesh add` does for each file).
    pub fn add_in_place(&self, path: &Path) -> Result<(Hash, u64), StoreError> {
        import::add_file(self, path, None)
    }

    /// Hashes one file and serves it in place only if its BLAKE3 root is `expected` (a file
    /// found where a fetch would put that blob); returns whether it was.
    pub fn add_in_place_if(&self, path: &Path, expected: Hash) -> Result<bool, StoreError> {
        Ok(import::add_file(self, path, Some(expected))?.0 == expected)
    }

    /// Records a manifest and points its name at it. A model new to the store counts as used
    /// now (so it is not the first evicted).
    pub fn insert_manifest(&self, manifest: &Manifest) -> Result<(), StoreError> {
        let new = db::manifest(&self.inner.db, &ModelRef::Id(manifest.id()))?.is_none();
        db::insert_manifest(&self.inner.db, manifest)?;
        if new {
            self.touch(manifest.id())?;
        }
        Ok(())
    }

    /// The manifest for a model id or name, if known here.
    pub fn manifest(&self, model: &ModelRef) -> Result<Option<Manifest>, StoreError> {
        db::manifest(&self.inner.db, model)
    }

    /// Every manifest in the store.
    pub fn manifests(&self) -> Result<Vec<Manifest>, StoreError> {
        db::manifests(&self.inner.db)
    }

    /// Every known model, with whether all its blobs are complete.
    pub fn models(&self) -> Result<Vec<ModelSummary>, StoreError> {
        let mut out = Vec::new();
        for manifest in db::manifests(&self.inner.db)? {
            let mut complete = true;
            for file in manifest.files() {
                complete &= self.status(file.hash, file.size)? == BlobStatus::Complete;
            }
            out.push(ModelSummary {
                id: manifest.id(),
                name: manifest.name().to_string(),
                size: manifest.total_size(),
                complete,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// How much of a blob is here. A live partial's in-memory state counts.
    pub fn status(&self, hash: Hash, size: u64) -> Result<BlobStatus, StoreError> {
        if size == 0 {
            // The empty blob is always complete: there is nothing to fetch or verify.
            return Ok(BlobStatus::Complete);
        }
        if let Some(partial) = self.live_partial(hash) {
            return Ok(BlobStatus::Partial(partial.have()));
        }
        Ok(match db::blob(&self.inner.db, hash)? {
            Some(BlobRecord::Complete { .. }) => BlobStatus::Complete,
            Some(BlobRecord::Partial { have, .. }) => {
                BlobStatus::Partial(ranges_from_pairs(&have, size))
            }
            None => BlobStatus::Missing,
        })
    }

    /// What a peer may ask of a blob: its size, the verified chunks, and for a download in
    /// progress a receiver that wakes when more arrive. `None` if the store has none of it.
    pub fn have(&self, hash: Hash) -> Result<Option<BlobHave>, StoreError> {
        if let Some(partial) = self.live_partial(hash) {
            if !partial.is_complete() {
                return Ok(Some(BlobHave {
                    size: partial.size(),
                    have: partial.have(),
                    pending: partial.pending(),
                    changes: Some(partial.subscribe()),
                    node: partial.node(),
                }));
            }
        }
        Ok(match db::blob(&self.inner.db, hash)? {
            Some(BlobRecord::Complete { size, .. }) => Some(BlobHave {
                size,
                have: ranges::all_chunks(size),
                pending: ChunkRanges::empty(),
                changes: None,
                node: 0,
            }),
            Some(BlobRecord::Partial { size, have }) => Some(BlobHave {
                size,
                have: ranges_from_pairs(&have, size),
                pending: ChunkRanges::empty(),
                changes: None,
                node: 0,
            }),
            None => None,
        })
    }

    /// The path of a complete blob's bytes, after checking the file is unchanged.
    pub fn data_path(&self, hash: Hash) -> Result<PathBuf, StoreError> {
        match db::blob(&self.inner.db, hash)? {
            Some(BlobRecord::Complete {
                size,
                location,
                mtime,
            }) => {
                let path = self.location_path(hash, &location);
                self.check_unchanged(hash, &path, size, mtime)?;
                Ok(path)
            }
            _ => Err(StoreError::NotFound(hash)),
        }
    }

    /// Opens a blob for serving: complete blobs after the size/mtime check, or the verified
    /// part of a partial one.
    pub fn open_reader(&self, hash: Hash) -> Result<BlobReader, StoreError> {
        if let Some(partial) = self.live_partial(hash) {
            return partial.reader();
        }
        self.open_reader_complete(hash)
    }

    fn open_reader_complete(&self, hash: Hash) -> Result<BlobReader, StoreError> {
        let Some(BlobRecord::Complete {
            size,
            location,
            mtime,
        }) = db::blob(&self.inner.db, hash)?
        else {
            return Err(StoreError::NotFound(hash));
        };
        let path = self.location_path(hash, &location);
        self.check_unchanged(hash, &path, size, mtime)?;
        let data = RandomAccessFile::open(&path).map_err(StoreError::io(&path))?;
        let ob_path = self.outboard_path(hash);
        let outboard = RandomAccessFile::open(&ob_path).map_err(StoreError::io(&ob_path))?;
        Ok(BlobReader {
            data,
            outboard: PostOrderOutboard {
                root: hash.into(),
                tree: BaoTree::new(size, BLOCK_SIZE),
                data: outboard,
            },
            have: ranges::all_chunks(size),
            pending: ChunkRanges::empty(),
            growing: None,
        })
    }

    /// The complete blob known under a HuggingFace etag, if any.
    pub fn blob_for_etag(&self, etag: &str) -> Result<Option<Hash>, StoreError> {
        let Some(hash) = db::etag(&self.inner.db, etag)? else {
            return Ok(None);
        };
        Ok(self.data_path(hash).ok().map(|_| hash))
    }

    /// Records that the blob `hash` was checked against the HuggingFace etag `etag`.
    pub fn record_etag(&self, etag: &str, hash: Hash) -> Result<(), StoreError> {
        db::put_etag(&self.inner.db, etag, hash)
    }

    /// Marks a model and its blobs as from a gated or private repo.
    pub fn restrict(&self, manifest: &Manifest) -> Result<(), StoreError> {
        let mut hashes: Vec<Hash> = manifest.files().iter().map(|f| f.hash).collect();
        hashes.push(manifest.id());
        db::restrict(&self.inner.db, &hashes)
    }

    /// Whether a blob or model id came from a gated or private repo.
    pub fn is_restricted(&self, hash: Hash) -> Result<bool, StoreError> {
        db::is_restricted(&self.inner.db, hash)
    }

    /// Stores HuggingFace metadata under `key` (see `hf::meta`).
    pub fn put_hf_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        db::put_hf_meta(&self.inner.db, key, value)
    }

    /// HuggingFace metadata stored under `key`.
    pub fn hf_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        db::hf_meta(&self.inner.db, key)
    }

    /// Where a HuggingFace download of `etag` is kept until it is verified.
    pub fn hub_part_path(&self, etag: &str) -> PathBuf {
        self.inner
            .home
            .join("partial")
            .join(format!("hf-{etag}.part"))
    }

    /// Takes a verified file into the store (moving it into `blobs/`) and returns its BLAKE3
    /// root and size.
    pub fn import_owned(&self, path: &Path) -> Result<(Hash, u64), StoreError> {
        let file = fs::File::open(path).map_err(StoreError::io(path))?;
        let size = file.metadata().map_err(StoreError::io(path))?.len();
        let tmp = Self::outboard_tmp_path(path);
        let outboard = create_private(&tmp).map_err(StoreError::io(&tmp))?;
        let hash =
            outboard::outboard_post_order(&file, size, &outboard).map_err(StoreError::io(path))?;
        outboard.sync_all().map_err(StoreError::io(&tmp))?;
        self.take_owned(path, hash, &tmp)
    }

    /// Where the outboard of a file at `path` is built before the store takes both. Named
    /// after this process, so `mesh gc` knows a leftover from a dead one.
    pub(crate) fn outboard_tmp_path(path: &Path) -> PathBuf {
        path.with_extension(format!("{}.obao.tmp", std::process::id()))
    }

    /// [`Store::import_owned`] for a file whose BLAKE3 root and outboard (synced, at
    /// `outboard`) were built as it arrived ([`PieceOutboard`]), from the same bytes.
    pub fn import_owned_with_outboard(
        &self,
        path: &Path,
        hash: Hash,
        outboard: &Path,
    ) -> Result<(Hash, u64), StoreError> {
        self.take_owned(path, hash, outboard)
    }

    /// Moves the file at `path` and its outboard at `tmp` into `blobs/` as blob `hash`.
    fn take_owned(&self, path: &Path, hash: Hash, tmp: &Path) -> Result<(Hash, u64), StoreError> {
        let size = fs::metadata(path).map_err(StoreError::io(path))?.len();
        if size == 0 || self.data_path(hash).is_ok() {
            let _ = fs::remove_file(tmp);
            let _ = fs::remove_file(path);
            return Ok((hash, size));
        }
        let data_path = self.blob_path(hash, "data");
        let ob_path = self.outboard_path(hash);
        fs::rename(tmp, &ob_path).map_err(StoreError::io(&ob_path))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(StoreError::io(path))?;
        fs::rename(path, &data_path).map_err(StoreError::io(&data_path))?;
        let meta = fs::metadata(&data_path).map_err(StoreError::io(&data_path))?;
        let record = BlobRecord::Complete {
            size,
            location: Location::Store,
            mtime: mtime_of(&meta),
        };
        db::put_blob(&self.inner.db, hash, &record)?;
        self.blob_appeared();
        Ok((hash, size))
    }

    /// A receiver that wakes when a blob appears in the store (see [`Store::have`]).
    pub fn watch_new_blobs(&self) -> tokio::sync::watch::Receiver<()> {
        self.inner.blobs_appeared.subscribe()
    }

    fn blob_appeared(&self) {
        self.inner.blobs_appeared.send_replace(());
    }

    /// Makes a complete blob in `blobs/` readable by others (0644), as it is about to be
    /// linked into a folder the user chose, whose permissions then decide who reads it (the
    /// store's own folders stay 0700). A blob from a gated or private repo stays 0600: only
    /// the owner reads it, wherever it is linked. Files added in place are the user's own and
    /// are left as they are.
    pub fn share_for_export(&self, hash: Hash) -> Result<(), StoreError> {
        let Some(BlobRecord::Complete {
            location: Location::Store,
            ..
        }) = db::blob(&self.inner.db, hash)?
        else {
            return Ok(());
        };
        let mode = if db::is_restricted(&self.inner.db, hash)? {
            0o600
        } else {
            0o644
        };
        let path = self.blob_path(hash, "data");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(StoreError::io(&path))
    }

    /// Drops a complete blob whose bytes no longer match (changed on disk or failed
    /// verification while being served), so it is never served again.
    pub fn forget_blob(&self, hash: Hash) -> Result<(), StoreError> {
        tracing::warn!(hash = %hash.fmt_short(), "blob failed its checks: no longer served");
        db::remove_blob(&self.inner.db, hash)
    }

    /// The writer for a partial blob, shared by everyone fetching it. Fails if it is complete.
    pub fn partial(&self, hash: Hash, size: u64) -> Result<Arc<PartialBlob>, StoreError> {
        // The lock is held across the open so two fetchers can't both create a writer.
        let mut partials = self.inner.partials.lock().expect("partials lock poisoned");
        if let Some(live) = partials.get(&hash).and_then(Weak::upgrade) {
            return Ok(live);
        }
        let have = match db::blob(&self.inner.db, hash)? {
            Some(BlobRecord::Partial { have, .. }) => ranges_from_pairs(&have, size),
            _ => ChunkRanges::empty(),
        };
        let partial = Arc::new(PartialBlob::open(self.clone(), hash, size, have)?);
        partials.insert(hash, Arc::downgrade(&partial));
        self.blob_appeared();
        Ok(partial)
    }

    fn live_partial(&self, hash: Hash) -> Option<Arc<PartialBlob>> {
        let partials = self.inner.partials.lock().expect("partials lock poisoned");
        partials.get(&hash).and_then(Weak::upgrade)
    }

    fn location_path(&self, hash: Hash, location: &Location) -> PathBuf {
        match location {
            Location::Store => self.blob_path(hash, "data"),
            Location::External(path) => path.clone(),
        }
    }

    fn check_unchanged(
        &self,
        hash: Hash,
        path: &Path,
        size: u64,
        mtime: (u64, u32),
    ) -> Result<(), StoreError> {
        let unchanged = match fs::metadata(path) {
            Ok(meta) => meta.len() == size && mtime_of(&meta) == mtime,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(StoreError::io(path)(e)),
        };
        if unchanged {
            Ok(())
        } else {
            self.forget_blob(hash)?;
            Err(StoreError::SourceChanged(path.to_path_buf()))
        }
    }

    fn blob_path(&self, hash: Hash, ext: &str) -> PathBuf {
        self.inner.home.join("blobs").join(format!("{hash}.{ext}"))
    }

    fn outboard_path(&self, hash: Hash) -> PathBuf {
        self.blob_path(hash, "obao")
    }

    fn partial_path(&self, hash: Hash, ext: &str) -> PathBuf {
        self.inner
            .home
            .join("partial")
            .join(format!("{hash}.{ext}"))
    }
}

/// Runs blocking store work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .expect("store task panicked")
}

/// Seconds and nanoseconds since the epoch of a file's mtime (zero if the platform has none).
fn mtime_of(meta: &fs::Metadata) -> (u64, u32) {
    let since = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .unwrap_or_default();
    (since.as_secs(), since.subsec_nanos())
}

fn ranges_from_pairs(pairs: &[(u64, u64)], size: u64) -> ChunkRanges {
    let mut out = ChunkRanges::empty();
    for &(start, end) in pairs {
        out |= ChunkRanges::from(bao_tree::ChunkNum(start)..bao_tree::ChunkNum(end));
    }
    out & ranges::all_chunks(size)
}

fn pairs_from_ranges(ranges: &ChunkRanges) -> Vec<(u64, u64)> {
    ranges
        .boundaries()
        .chunks(2)
        .filter(|pair| pair.len() == 2)
        .map(|pair| (pair[0].0, pair[1].0))
        .collect()
}

/// Creates (truncating) a file only its owner can read.
pub(crate) fn create_private(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Writes a file only its owner can read, durably.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests;
