//! Files already where a fetch would put them are adopted, not fetched again: a file of the
//! right size at a target path is hashed, and if it matches (the publisher's sha256 or git
//! blob id for a published model, the BLAKE3 root for a mesh model) the store takes it in
//! place and serves it to peers from there. This is how a lab that already has half a set on
//! some machines starts sharing it. A file that does not match is left to be replaced
//! atomically when the fetch materializes, and the report lists it.
//!
//! A dry run does not hash: a file that is the store's own copy is `in-place`, one of the
//! right size is `adopt` (hashed on the real run).

use std::sync::atomic::Ordering;

use mesh_proto::Manifest;
use tracing::{info, warn};

use super::{
    catalog::{self, Kind},
    sources::{BoxFuture, Source, Tally, Wanted},
    FetchError, Fetcher, Layout, Origin, Target,
};
use crate::{
    rooted::{Dir, Root, RootError},
    store::{blocking, BlobStatus, StoreError},
};

/// The source that claims files already at their final path (first in the list).
pub(super) struct InPlace {
    targets: Vec<Target>,
    kind: Option<Kind>,
    dry_run: bool,
}

impl InPlace {
    pub(super) fn new(fetcher: &Fetcher, name: &str, targets: &[Target], dry_run: bool) -> Self {
        Self {
            targets: targets.to_vec(),
            kind: catalog::lookup(name, &fetcher.aliases).and_then(|e| e.kind),
            dry_run,
        }
    }

    /// Checks one file's final paths; claims it if one holds its bytes.
    async fn claim_one(
        &self,
        fetcher: &Fetcher,
        w: &mut Wanted,
        files: usize,
    ) -> Result<(), FetchError> {
        let store = fetcher.store.clone();
        let etag = w.file.etag().to_string();
        let known = blocking(move || store.blob_for_etag(&etag)).await?;
        for target in &self.targets {
            let rel = target.dest(w.target.as_str(), files, target.kind.or(self.kind));
            let Some((dir, name)) = existing(target, &rel)? else {
                continue;
            };
            if dir.file_size(&name).ok().flatten() != Some(w.file.size) {
                continue;
            }
            if let Some(hash) = known {
                // The store has it: in place only if this is the store's copy; otherwise the
                // store's copy is linked over it (no bytes move either way).
                let here = fetcher
                    .store
                    .data_path(hash)
                    .is_ok_and(|src| dir.is_same_file(&name, &src).unwrap_or(false));
                if here {
                    w.origin = Some(Origin::InPlace);
                    w.hash = Some(hash);
                    w.progress.store(w.file.size, Ordering::Relaxed);
                    return Ok(());
                }
                continue;
            }
            if self.dry_run {
                w.origin = Some(Origin::Adopt);
                return Ok(());
            }
            let path = dir.join(&name);
            let (store, file) = (fetcher.store.clone(), w.file.clone());
            let adopted = blocking(move || {
                let digest = file
                    .published()
                    .of_file(&path)
                    .map_err(|source| StoreError::Io {
                        path: path.clone(),
                        source,
                    })?;
                if digest != file.etag() {
                    warn!(path = %path.display(), "a file of the right size but other bytes is in the way: it will be replaced");
                    return Ok(None);
                }
                let (hash, _) = store.add_in_place(&path)?;
                store.record_etag(file.etag(), hash)?;
                info!(path = %path.display(), "adopted in place");
                Ok(Some(hash))
            })
            .await?;
            if let Some(hash) = adopted {
                w.origin = Some(Origin::InPlace);
                w.hash = Some(hash);
                w.progress.store(w.file.size, Ordering::Relaxed);
                return Ok(());
            }
        }
        Ok(())
    }
}

impl Source for InPlace {
    fn origin(&self) -> Origin {
        Origin::InPlace
    }

    fn claim<'a>(
        &'a mut self,
        fetcher: &'a Fetcher,
        files: &'a mut [Wanted],
    ) -> BoxFuture<'a, Result<(), FetchError>> {
        Box::pin(async move {
            let count = files.len();
            for w in files.iter_mut().filter(|w| w.origin.is_none()) {
                self.claim_one(fetcher, w, count).await?;
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
        // Claimed files are in the store already.
        Box::pin(async { Ok(()) })
    }
}

impl Fetcher {
    /// For a mesh model: adopts files of `manifest` found at their final paths (or, for a dry
    /// run, says which would be checked). Returns each file's origin if it is in place.
    pub(super) async fn adopt_in_place(
        &self,
        manifest: &Manifest,
        targets: &[Target],
        dry_run: bool,
    ) -> Result<Vec<Option<Origin>>, FetchError> {
        let (store, manifest, targets) = (self.store.clone(), manifest.clone(), targets.to_vec());
        let kind = catalog::lookup(manifest.name(), &self.aliases).and_then(|e| e.kind);
        tokio::task::spawn_blocking(move || {
            let files = manifest.files();
            let mut out = vec![None; files.len()];
            for (i, file) in files.iter().enumerate() {
                if file.size == 0 {
                    continue;
                }
                let complete = store.status(file.hash, file.size)? == BlobStatus::Complete;
                for target in &targets {
                    let rel = target.dest(file.path.as_str(), files.len(), target.kind.or(kind));
                    let Some((dir, name)) = existing(target, &rel)? else {
                        continue;
                    };
                    if dir.file_size(&name).ok().flatten() != Some(file.size) {
                        continue;
                    }
                    let src = complete.then(|| store.data_path(file.hash).ok()).flatten();
                    if src.is_some_and(|src| dir.is_same_file(&name, &src).unwrap_or(false)) {
                        out[i] = Some(Origin::InPlace);
                        break;
                    }
                    if complete {
                        continue;
                    }
                    if dry_run {
                        out[i] = Some(Origin::Adopt);
                        break;
                    }
                    let path = dir.join(&name);
                    if store.add_in_place_if(&path, file.hash)? {
                        info!(path = %path.display(), "adopted in place");
                        out[i] = Some(Origin::InPlace);
                        break;
                    }
                    warn!(path = %path.display(), "a file of the right size but other bytes is in the way: it will be replaced");
                }
            }
            Ok(out)
        })
        .await
        .expect("adopt task panicked")
    }
}

/// The folder and name of `rel` under `target`, if its folder exists; a symlink leading out of
/// the root is an error.
fn existing(target: &Target, rel: &str) -> Result<Option<(Dir, String)>, FetchError> {
    if target.layout == Layout::HfCache || !target.root.is_dir() {
        return Ok(None);
    }
    let root = Root::open(&target.root)?;
    match root.parent_of(rel, false) {
        Ok(found) => Ok(Some(found)),
        Err(RootError::Io { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}
