//! The store's lifecycle: forgetting models (`mesh rm`), collecting what nothing uses
//! (`mesh gc`), pins and last use, and evicting the least recently used unpinned models to stay
//! under a quota. Re-hashing (`mesh verify`) is in [`super::verify`].
//!
//! Only files inside `MESH_HOME` are ever deleted. Files added in place are forgotten (their
//! outboard goes), never touched; files materialized into a target folder are hard links whose
//! bytes stay on disk as long as that folder keeps them.

use std::{
    collections::HashSet,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use mesh_proto::{Hash, Manifest, ModelRef};
use serde::{Deserialize, Serialize};

use super::{db, BlobRecord, Location, Store, StoreError};

/// A HuggingFace download (`partial/hf-*.part`) nobody touched for this long is stale.
const STALE_PART: Duration = Duration::from_secs(24 * 3600);
/// A temporary file that names no process and nobody touched for this long is stale.
const STALE_TMP: Duration = Duration::from_secs(3600);

/// What `mesh rm` did to one model.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Removed {
    /// The model's name.
    pub name: String,
    /// Its id (hex).
    pub id: String,
    /// How much smaller the store folder is (disk blocks, each file counted once).
    pub bytes: u64,
    /// Blobs deleted from the store.
    pub blobs: usize,
    /// Blobs kept because another model uses them.
    pub shared: usize,
    /// Files added in place: forgotten, left where they are.
    pub in_place: usize,
    /// Of the deleted blobs' bytes, those that stay on disk as hard links in fetched folders.
    pub linked_elsewhere: u64,
}

/// What one `mesh gc` item was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GcKind {
    /// A blob no model uses.
    UnreferencedBlob,
    /// A partial download with nothing verified, or that no model wants.
    StalePartial,
    /// A temporary file left by a process that died (`*.tmp`).
    TempFile,
    /// A HuggingFace record or HF-endpoint file whose blob is gone.
    HfMetadata,
    /// A model none of whose bytes are here (a fetch that never started).
    EmptyModel,
}

/// One thing `mesh gc` removed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GcItem {
    /// What it was.
    pub kind: GcKind,
    /// Its path (or record).
    pub path: String,
    /// Disk bytes it held.
    pub bytes: u64,
}

/// What `mesh gc` did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GcReport {
    /// Each file or model removed.
    pub items: Vec<GcItem>,
    /// Database records dropped (HuggingFace etags and restricted marks of gone blobs).
    pub records: usize,
    /// How much smaller the store folder is.
    pub bytes: u64,
    /// A fetch was running, so unreferenced blobs (maybe its own) were left alone.
    pub kept_for_running_fetch: bool,
}

/// A model with what the lifecycle knows about it.
#[derive(Clone, Debug)]
pub struct ModelEntry {
    /// The manifest.
    pub manifest: Manifest,
    /// Never evicted.
    pub pinned: bool,
    /// Last added, fetched or served through the HF endpoint (Unix milliseconds).
    pub last_used: Option<u64>,
    /// Every blob complete.
    pub complete: bool,
}

/// Unix milliseconds now.
pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Store {
    /// Disk bytes under `MESH_HOME` (blocks allocated, each file counted once however many
    /// links it has there), as `du` counts them, less the disk reserve.
    pub fn usage(&self) -> u64 {
        let mut seen = HashSet::new();
        // The reserve is free space held back for the database, not data.
        let reserve = fs::metadata(self.home().join("reserve")).map_or(0, |m| m.blocks() * 512);
        du(self.home(), &mut seen).saturating_sub(reserve)
    }

    /// Disk bytes of the store's data: blobs, partial downloads and HF-endpoint files (what
    /// `rm` and `gc` free; the database's own size moves with every commit).
    fn data_usage(&self) -> u64 {
        let mut seen = HashSet::new();
        ["blobs", "partial", "hf-endpoint"]
            .iter()
            .map(|d| du(&self.home().join(d), &mut seen))
            .sum()
    }

    /// Free bytes on the store's disk.
    pub fn disk_free(&self) -> Result<u64, StoreError> {
        fs4::available_space(self.home()).map_err(StoreError::io(self.home()))
    }

    /// The manifest for `model`, or [`StoreError::NoModel`].
    pub fn require_manifest(&self, model: &ModelRef) -> Result<Manifest, StoreError> {
        self.manifest(model)?
            .ok_or_else(|| StoreError::NoModel(model.to_string()))
    }

    /// The model a user named: by name, by id, or by a unique prefix of its id (at least 6
    /// hex digits, as `mesh ls` shows 16).
    pub fn find_model(&self, named: &str) -> Result<Manifest, StoreError> {
        if let Ok(model) = named.parse::<ModelRef>() {
            if let Some(m) = self.manifest(&model)? {
                return Ok(m);
            }
        }
        let prefix = named.to_ascii_lowercase();
        if prefix.len() >= 6 && prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut found = self
                .manifests()?
                .into_iter()
                .filter(|m| m.id().to_string().starts_with(&prefix));
            if let (Some(m), None) = (found.next(), found.next()) {
                return Ok(m);
            }
        }
        Err(StoreError::NoModel(named.to_string()))
    }

    /// Every model with its pin, last use and completeness, least recently used first.
    pub fn model_entries(&self) -> Result<Vec<ModelEntry>, StoreError> {
        let pinned = db::pinned(&self.inner.db)?;
        let used = db::last_used(&self.inner.db)?;
        let mut out = Vec::new();
        for manifest in self.manifests()? {
            let mut complete = true;
            for f in manifest.files() {
                complete &= self.status(f.hash, f.size)? == super::BlobStatus::Complete;
            }
            let id = manifest.id();
            out.push(ModelEntry {
                pinned: pinned.contains(&id),
                last_used: used.get(&id).copied(),
                complete,
                manifest,
            });
        }
        out.sort_by_key(|e| (e.last_used.unwrap_or(0), e.manifest.name().to_string()));
        Ok(out)
    }

    /// Pins (or unpins) a model: a pinned model is never evicted.
    pub fn set_pinned(&self, model: &str, pin: bool) -> Result<ModelEntry, StoreError> {
        let id = self.find_model(model)?.id();
        db::set_pinned(&self.inner.db, id, pin)?;
        self.model_entries()?
            .into_iter()
            .find(|e| e.manifest.id() == id)
            .ok_or_else(|| StoreError::NoModel(model.to_string()))
    }

    /// Records that a model was used now (added, fetched, served to an HF client).
    pub fn touch(&self, id: Hash) -> Result<(), StoreError> {
        db::touch(&self.inner.db, id, now_millis())
    }

    /// Forgets models, as [`Store::remove_model`]; if any name is unknown, none is removed.
    pub fn remove_models(&self, models: &[String]) -> Result<Vec<Removed>, StoreError> {
        for m in models {
            self.find_model(m)?;
        }
        models.iter().map(|m| self.remove_model(m)).collect()
    }

    /// Forgets a model. Its blobs go unless another model uses them or they are being
    /// fetched; files added in place stay where they are.
    pub fn remove_model(&self, model: &str) -> Result<Removed, StoreError> {
        let manifest = self.find_model(model)?;
        self.remove_manifest(&manifest, &HashSet::new())
    }

    /// Forgets `manifest` and deletes its blobs that no other model uses and `keep` lacks.
    fn remove_manifest(
        &self,
        manifest: &Manifest,
        keep: &HashSet<Hash>,
    ) -> Result<Removed, StoreError> {
        let before = self.data_usage();
        db::remove_manifest(&self.inner.db, manifest)?;
        let used = self.referenced()?;
        let mut removed = Removed {
            name: manifest.name().to_string(),
            id: manifest.id().to_string(),
            ..Removed::default()
        };
        let mut held = Vec::new();
        let mut hashes: Vec<Hash> = manifest.files().iter().map(|f| f.hash).collect();
        hashes.sort();
        hashes.dedup();
        for hash in hashes {
            if used.contains(&hash) || keep.contains(&hash) {
                removed.shared += 1;
                continue;
            }
            match self.drop_blob(hash)? {
                Dropped::Store(file) => {
                    removed.blobs += 1;
                    held.extend(file);
                }
                Dropped::InPlace => removed.in_place += 1,
                Dropped::Partial => removed.blobs += 1,
                Dropped::Busy | Dropped::Nothing => {}
            }
        }
        sweep_hf_endpoint(self.home(), &mut Vec::new());
        // Data files still linked from somewhere else (a fetched folder) keep their bytes.
        removed.linked_elsewhere = held
            .iter()
            .filter_map(|f| f.metadata().ok())
            .filter(|m| m.nlink() > 0)
            .map(|m| m.len())
            .sum();
        removed.bytes = before.saturating_sub(self.data_usage());
        tracing::info!(model = %removed.name, bytes = removed.bytes, blobs = removed.blobs, "model removed");
        Ok(removed)
    }

    /// Evicts least recently used unpinned models until `need` more bytes fit under `max`
    /// (disk bytes of the store folder). Blobs in `keep` (the fetch's own) stay. If evicting
    /// every candidate would still not make room, nothing is evicted.
    pub fn evict_for(
        &self,
        need: u64,
        max: u64,
        keep: &HashSet<Hash>,
    ) -> Result<Vec<Removed>, StoreError> {
        let mut used = self.usage();
        if used + need <= max {
            return Ok(Vec::new());
        }
        let entries = self.model_entries()?;
        let evictable = |e: &ModelEntry| {
            !e.pinned && !e.manifest.files().iter().all(|f| keep.contains(&f.hash))
        };
        // What evicting them all would free: blobs no model that stays uses.
        let staying: HashSet<Hash> = entries
            .iter()
            .filter(|e| !evictable(e))
            .flat_map(|e| e.manifest.files().iter().map(|f| f.hash))
            .chain(keep.iter().copied())
            .collect();
        let freeable: u64 = entries
            .iter()
            .filter(|e| evictable(e))
            .flat_map(|e| e.manifest.files().iter().map(|f| f.hash))
            .filter(|h| !staying.contains(h))
            .collect::<HashSet<Hash>>()
            .into_iter()
            .map(|h| self.blob_disk_bytes(h))
            .sum();
        if used.saturating_sub(freeable) + need > max {
            return Err(StoreError::Quota {
                need,
                used,
                max,
                evicted: 0,
            });
        }
        let mut evicted = Vec::new();
        for entry in entries.iter().filter(|e| evictable(e)) {
            if used + need <= max {
                break;
            }
            let removed = self.remove_manifest(&entry.manifest, keep)?;
            tracing::warn!(
                model = %removed.name,
                id = %entry.manifest.id().fmt_short(),
                bytes = removed.bytes,
                need,
                max_store = max,
                "evicted the least recently used model to stay under max_store"
            );
            used = self.usage();
            evicted.push(removed);
        }
        if used + need > max {
            return Err(StoreError::Quota {
                need,
                used,
                max,
                evicted: evicted.len(),
            });
        }
        Ok(evicted)
    }

    /// Removes unreferenced blobs, stale partial downloads, temporary files left by dead
    /// processes, HuggingFace records of gone blobs, and models none of whose bytes are here.
    /// With `fetching` (a fetch runs in this process), unreferenced blobs stay: they may be
    /// that fetch's, not yet recorded in its manifest.
    pub fn gc(&self, fetching: bool) -> Result<GcReport, StoreError> {
        let before = self.data_usage();
        let mut report = GcReport {
            kept_for_running_fetch: fetching,
            ..GcReport::default()
        };
        self.gc_empty_models(&mut report)?;
        let used = self.referenced()?;
        let records = db::blobs(&self.inner.db)?;
        let known: HashSet<Hash> = records.iter().map(|(h, _)| *h).collect();
        for (hash, record) in &records {
            let stale_partial = match record {
                BlobRecord::Partial { have, .. } => have.is_empty() || !used.contains(hash),
                BlobRecord::Complete { .. } => false,
            };
            let unreferenced = !used.contains(hash) && !fetching;
            if !(stale_partial || unreferenced) || self.live_partial(*hash).is_some() {
                continue;
            }
            let kind = if stale_partial {
                GcKind::StalePartial
            } else {
                GcKind::UnreferencedBlob
            };
            let bytes = self.blob_disk_bytes(*hash);
            self.drop_blob(*hash)?;
            report.items.push(GcItem {
                kind,
                path: hash.to_string(),
                bytes,
            });
        }
        self.gc_files(&known, fetching, &mut report);
        let blobs: HashSet<Hash> = db::blobs(&self.inner.db)?
            .into_iter()
            .map(|(h, _)| h)
            .collect();
        let models: HashSet<Hash> = self.manifests()?.iter().map(Manifest::id).collect();
        let keep = |h: Hash| blobs.contains(&h) || models.contains(&h);
        report.records = db::prune_hf_records(&self.inner.db, &keep)?;
        let mut swept = Vec::new();
        sweep_hf_endpoint(self.home(), &mut swept);
        report.items.extend(swept);
        report.bytes = before.saturating_sub(self.data_usage());
        tracing::info!(
            items = report.items.len(),
            records = report.records,
            bytes = report.bytes,
            "store collected"
        );
        Ok(report)
    }

    /// Forgets models with bytes to fetch and none of them here (unless pinned).
    fn gc_empty_models(&self, report: &mut GcReport) -> Result<(), StoreError> {
        for entry in self.model_entries()? {
            if entry.pinned || entry.manifest.total_size() == 0 {
                continue;
            }
            let mut any = false;
            for f in entry.manifest.files().iter().filter(|f| f.size > 0) {
                any |= self.status(f.hash, f.size)? != super::BlobStatus::Missing;
            }
            if !any {
                db::remove_manifest(&self.inner.db, &entry.manifest)?;
                report.items.push(GcItem {
                    kind: GcKind::EmptyModel,
                    path: entry.manifest.name().to_string(),
                    bytes: 0,
                });
            }
        }
        Ok(())
    }

    /// Files in `blobs/` and `partial/` that no record (in `known`) explains, and leftovers.
    fn gc_files(&self, known: &HashSet<Hash>, fetching: bool, report: &mut GcReport) {
        let pid = std::process::id().to_string();
        let now = SystemTime::now();
        let age = |m: &fs::Metadata| {
            m.modified()
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default()
        };
        for dir in ["blobs", "partial", ""] {
            let dir = self.home().join(dir);
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(meta) = fs::symlink_metadata(&path) else {
                    continue;
                };
                if !meta.is_file() {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                let kind = if name.ends_with(".tmp") {
                    let pids = pids_in(&name);
                    let stale = if pids.is_empty() {
                        age(&meta) > STALE_TMP
                    } else {
                        !pids.contains(&pid)
                    };
                    stale.then_some(GcKind::TempFile)
                } else if let Some(etag) = name
                    .strip_prefix("hf-")
                    .and_then(|n| n.strip_suffix(".part"))
                {
                    let live = self.piece_files().get(etag).is_some();
                    (!live && !fetching && age(&meta) > STALE_PART).then_some(GcKind::StalePartial)
                } else if dir != self.home() {
                    match blob_file_hash(&name) {
                        Some(hash) if !known.contains(&hash) && !fetching => {
                            Some(if dir.ends_with("partial") {
                                GcKind::StalePartial
                            } else {
                                GcKind::UnreferencedBlob
                            })
                        }
                        _ => None,
                    }
                } else {
                    None
                };
                let Some(kind) = kind else { continue };
                if fs::remove_file(&path).is_ok() {
                    report.items.push(GcItem {
                        kind,
                        path: path.display().to_string(),
                        bytes: meta.blocks() * 512,
                    });
                }
            }
        }
    }

    /// Every blob hash some model uses.
    fn referenced(&self) -> Result<HashSet<Hash>, StoreError> {
        Ok(self
            .manifests()?
            .iter()
            .flat_map(|m| m.files().iter().map(|f| f.hash))
            .collect())
    }

    /// Disk bytes of a blob's files in the store.
    fn blob_disk_bytes(&self, hash: Hash) -> u64 {
        [
            self.blob_path(hash, "data"),
            self.outboard_path(hash),
            self.partial_path(hash, "data"),
            self.partial_path(hash, "obao"),
        ]
        .iter()
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| m.blocks() * 512)
        .sum()
    }

    /// Deletes a blob's record and its files in the store (never a file added in place).
    pub(super) fn drop_blob(&self, hash: Hash) -> Result<Dropped, StoreError> {
        if self.live_partial(hash).is_some() {
            return Ok(Dropped::Busy);
        }
        let record = db::blob(&self.inner.db, hash)?;
        db::remove_blob(&self.inner.db, hash)?;
        let remove = |p: PathBuf| match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(&p)(e)),
        };
        Ok(match record {
            Some(BlobRecord::Complete {
                location: Location::Store,
                ..
            }) => {
                let data = self.blob_path(hash, "data");
                let held = fs::File::open(&data).ok();
                remove(data)?;
                remove(self.outboard_path(hash))?;
                Dropped::Store(held)
            }
            Some(BlobRecord::Complete {
                location: Location::External(_),
                ..
            }) => {
                remove(self.outboard_path(hash))?;
                Dropped::InPlace
            }
            Some(BlobRecord::Partial { .. }) => {
                remove(self.partial_path(hash, "data"))?;
                remove(self.partial_path(hash, "obao"))?;
                Dropped::Partial
            }
            None => Dropped::Nothing,
        })
    }
}

/// What [`Store::drop_blob`] found.
#[derive(Debug)]
pub(super) enum Dropped {
    /// A blob in `blobs/`; its data file, still open, to see whether other links remain.
    Store(Option<fs::File>),
    /// A file added in place: its outboard went, the file stays.
    InPlace,
    /// A partial download.
    Partial,
    /// Being fetched right now: left alone.
    Busy,
    /// No record.
    Nothing,
}

/// `<64 hex>.data` or `<64 hex>.obao` -> the hash.
fn blob_file_hash(name: &str) -> Option<Hash> {
    let stem = name
        .strip_suffix(".data")
        .or_else(|| name.strip_suffix(".obao"))?;
    stem.parse().ok()
}

/// Process ids a temporary file's name carries (`import-PID-N.obao.tmp`, `x.PID.tmp`).
fn pids_in(name: &str) -> Vec<String> {
    name.split(['-', '.'])
        .filter(|t| !t.is_empty() && t.len() <= 10 && t.bytes().all(|b| b.is_ascii_digit()))
        .map(str::to_string)
        .collect()
}

/// Disk blocks under `dir`, each inode once.
fn du(dir: &Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            total += du(&entry.path(), seen);
        } else if meta.is_file() && seen.insert((meta.dev(), meta.ino())) {
            total += meta.blocks() * 512;
        }
    }
    total
}

/// Removes files under `MESH_HOME/hf-endpoint` that no longer share their bytes with a store
/// blob (their only link is this one), and leftover `.mesh-tmp` files; then empty folders.
fn sweep_hf_endpoint(home: &Path, out: &mut Vec<GcItem>) {
    fn walk(dir: &Path, out: &mut Vec<GcItem>) -> bool {
        let Ok(entries) = fs::read_dir(dir) else {
            return false;
        };
        let mut empty = true;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                empty = false;
                continue;
            };
            let orphan = meta.is_file()
                && (meta.nlink() == 1
                    || entry.file_name().to_string_lossy().ends_with(".mesh-tmp"));
            if meta.is_dir() {
                if walk(&path, out) && fs::remove_dir(&path).is_ok() {
                    continue;
                }
            } else if orphan && fs::remove_file(&path).is_ok() {
                out.push(GcItem {
                    kind: GcKind::HfMetadata,
                    path: path.display().to_string(),
                    bytes: meta.blocks() * 512,
                });
                continue;
            }
            empty = false;
        }
        empty
    }
    walk(&home.join("hf-endpoint"), out);
}

#[cfg(test)]
#[path = "lifecycle_tests.rs"]
mod tests;
