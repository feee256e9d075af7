//! Writing an Ollama model (complete in the mesh store) into an Ollama store, so that
//! `ollama list` sees it at once and never sees half of it:
//!
//! 1. Blobs first, at `blobs/sha256-<hex>`: a hard link to the mesh store's verified blob
//!    where possible (Ollama never writes a blob in place: it writes `-partial` files and
//!    renames them), else a synced copy; under a temporary name in `<root>/.mesh-tmp/` (not in
//!    `blobs/`, where Ollama deletes names that are not digests, nor under `manifests/`,
//!    where it would list them; removed again when empty), then renamed into place. A blob already there is checked
//!    against its sha256 and kept if it matches.
//! 2. The manifest last, copied (Ollama rewrites manifests in place, which through a hard link
//!    would change the mesh store's copy): the registry's exact bytes to a temporary file,
//!    fsync, `rename(2)` into `manifests/<host>/<ns>/<model>/<tag>`, fsync the folder.
//!
//! Blobs and manifest are written in one go, so the window in which Ollama's startup prune
//! (unreferenced blobs older than an hour) could take a hard-linked blob with an old mtime is
//! the few milliseconds before the manifest lands; mesh does not touch the mtime, which would
//! make its own store stop serving the blob.
//!
//! The store often belongs to the `ollama` user (the Linux service's). Run as another user,
//! mesh refuses before writing anything ([`OllamaError::NotWritable`]); run as root, it gives
//! what it created to the store's owner, so Ollama can still rewrite and prune it.

use std::{os::unix::fs::MetadataExt, path::Path};

use mesh_proto::{Manifest, Source};
use rustix::fs::{AtFlags, Gid, Uid};

use super::OllamaError;
use crate::{
    rooted::{Dir, Root},
    store::{digest::Published, Store},
};

/// Writes `manifest` (an `ollama:` model complete in `store`) into the Ollama store at `root`.
pub fn write(store: &Store, manifest: &Manifest, root_path: &Path) -> Result<(), OllamaError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OllamaError::Io { path, source }
    };
    std::fs::create_dir_all(root_path).map_err(io(root_path))?;
    let owner = check_owner(root_path)?;
    let root = Root::open(root_path)?;
    let tmp = root.dir(".mesh-tmp", true)?;
    let give = |dir: &Dir, name: &str| chown(dir, name, owner);
    give(&root.dir("", false)?, ".mesh-tmp").map_err(io(tmp.path()))?;
    let mut manifest_file = None;
    for file in manifest.files() {
        let Some(name) = file.path.as_str().strip_prefix("blobs/") else {
            manifest_file = Some(file);
            continue;
        };
        let hex = name.strip_prefix("sha256-").unwrap_or_default();
        let blobs = root.dir("blobs", true)?;
        give(&root.dir("", false)?, "blobs").map_err(io(blobs.path()))?;
        store.share_for_export(file.hash)?;
        let src = store.data_path(file.hash)?;
        check_sha256(store, &src, hex, file.hash)?;
        if blobs.file_size(name).map_err(io(&blobs.join(name)))? == Some(file.size) {
            let dest = blobs.join(name);
            let same = blobs.is_same_file(name, &src).unwrap_or(false);
            let matches = same
                || Published::Sha256(hex.into())
                    .of_file(&dest)
                    .is_ok_and(|d| d == hex);
            if matches {
                continue;
            }
        }
        let tmp_name = format!("{name}.{}", rand::random::<u32>());
        tmp.link_or_copy(&src, &tmp_name)
            .map_err(io(&tmp.join(&tmp_name)))?;
        tmp.rename_to(&tmp_name, &blobs, name)
            .map_err(io(&blobs.join(name)))?;
        give(&blobs, name).map_err(io(&blobs.join(name)))?;
    }
    let Some(file) = manifest_file else {
        return Ok(());
    };
    let bytes = std::fs::read(store.data_path(file.hash)?).map_err(io(root_path))?;
    if let Source::Ollama { digest, .. } = manifest.source() {
        let actual = super::sha256_hex(&bytes);
        if actual != *digest {
            return Err(OllamaError::Mismatch {
                name: file.path.to_string(),
                expected: digest.clone(),
                actual,
            });
        }
    }
    let rel = file.path.as_str();
    let (dir, name) = root.parent_of(rel, true)?;
    // Give every folder on the way to the store's owner.
    let parts: Vec<&str> = rel.split('/').collect();
    for i in 1..parts.len() {
        let parent = root.dir(&parts[..i - 1].join("/"), false)?;
        give(&parent, parts[i - 1]).map_err(io(parent.path()))?;
    }
    dir.write_atomic(&name, &bytes, &tmp)
        .map_err(io(&dir.join(&name)))?;
    give(&dir, &name).map_err(io(&dir.join(&name)))?;
    // Another writer may still use it: then it is not empty and stays.
    root.dir("", false)?.remove_empty_dir(".mesh-tmp");
    Ok(())
}

/// Whether this process may write the store: it owns it, or it is root (and then gives what
/// it creates to the owner, returned here).
fn check_owner(root: &Path) -> Result<Option<(u32, u32)>, OllamaError> {
    let meta = std::fs::metadata(root).map_err(|source| OllamaError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    let uid = rustix::process::geteuid().as_raw();
    match (uid, meta.uid()) {
        (0, 0) => Ok(None),
        (0, owner) => Ok(Some((owner, meta.gid()))),
        (me, owner) if me == owner => Ok(None),
        (me, owner) => Err(OllamaError::NotWritable {
            path: root.to_path_buf(),
            owner,
            uid: me,
        }),
    }
}

fn chown(dir: &Dir, name: &str, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    let Some((uid, gid)) = owner else {
        return Ok(());
    };
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    rustix::fs::chownat(
        dir.fd(),
        name,
        Some(uid),
        Some(gid),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// Checks (once per blob: the store remembers) that the store's copy hashes to its digest.
fn check_sha256(
    store: &Store,
    src: &Path,
    hex: &str,
    hash: mesh_proto::Hash,
) -> Result<(), OllamaError> {
    if store.blob_for_etag(hex)? == Some(hash) {
        return Ok(());
    }
    let actual = Published::Sha256(hex.into())
        .of_file(src)
        .map_err(|source| OllamaError::Io {
            path: src.to_path_buf(),
            source,
        })?;
    if actual != hex {
        return Err(OllamaError::Mismatch {
            name: format!("blob sha256:{hex}"),
            expected: hex.to_string(),
            actual,
        });
    }
    store.record_etag(hex, hash)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use sha2::Digest as _;

    use super::*;
    use crate::ollama::{store_in, OllamaName};

    /// An Ollama store with one model; returns the manifest's bytes.
    fn ollama_store(root: &Path) -> Vec<u8> {
        let blob = |bytes: &[u8]| {
            let hex = hex::encode(sha2::Sha256::digest(bytes));
            std::fs::create_dir_all(root.join("blobs")).unwrap();
            std::fs::write(root.join(format!("blobs/sha256-{hex}")), bytes).unwrap();
            format!(r#"{{"digest":"sha256:{hex}","size":{}}}"#, bytes.len())
        };
        let (config, model) = (blob(b"{}"), blob(&[7u8; 40_000]));
        let manifest = format!(r#"{{"schemaVersion":2,"config":{config},"layers":[{model}]}}"#);
        let dir = root.join("manifests/registry.ollama.ai/library/m");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("t"), &manifest).unwrap();
        manifest.into_bytes()
    }

    #[test]
    fn a_store_of_another_user_is_refused_or_given_back_to_its_owner() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("mesh")).unwrap();
        let source = tmp.path().join("src");
        let bytes = ollama_store(&source);
        let name = OllamaName::parse("m:t").unwrap();
        let manifest = store_in::import(&store, &source, &name, &bytes)
            .unwrap()
            .expect("imported");
        let dest = tmp.path().join("dest");
        std::fs::create_dir_all(&dest).unwrap();
        let nobody = 65534;
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&dest, Some(nobody), Some(nobody)).unwrap();
            write(&store, &manifest, &dest).unwrap();
            let manifest_file = dest.join("manifests/registry.ollama.ai/library/m/t");
            assert_eq!(std::fs::read(&manifest_file).unwrap(), bytes);
            for path in [manifest_file, dest.join("manifests"), dest.join("blobs")] {
                assert_eq!(std::fs::metadata(&path).unwrap().uid(), nobody, "{path:?}");
            }
        } else {
            match write(&store, &manifest, Path::new("/")) {
                Err(OllamaError::NotWritable { owner: 0, .. }) => {}
                other => panic!("{other:?}"),
            }
        }
    }
}
