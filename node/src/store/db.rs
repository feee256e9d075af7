//! The redb tables behind the store: blob records, manifests and model names.

use mesh_proto::{Hash, Manifest, ModelRef};
use redb::{ReadableTable, TableDefinition};

use super::{BlobRecord, StoreError};

/// Blob hash -> postcard [`BlobRecord`].
const BLOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blobs");
/// Model id -> canonical manifest bytes.
const MODELS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("models");
/// HuggingFace etag (LFS sha256 or git blob id) -> BLAKE3 root of a verified blob.
const ETAGS: TableDefinition<&str, &[u8]> = TableDefinition::new("etags");
/// Blobs and models from gated or private repos: never served in open mode.
const RESTRICTED: TableDefinition<&[u8], ()> = TableDefinition::new("restricted");
/// Model name -> model id (the latest manifest added or fetched under that name).
const NAMES: TableDefinition<&str, &[u8]> = TableDefinition::new("names");
/// HuggingFace metadata as the Hub sent it (see `hf::meta`): key -> bytes.
const HF_META: TableDefinition<&str, &[u8]> = TableDefinition::new("hf_meta");
/// Pinned model ids: never evicted to stay under `max_store`.
const PINNED: TableDefinition<&[u8], ()> = TableDefinition::new("pinned");
/// Model id -> when it was last added, fetched or served through the HF endpoint (Unix
/// milliseconds), for evicting the least recently used first.
const LAST_USED: TableDefinition<&[u8], u64> = TableDefinition::new("last_used");

/// Creates the tables so read transactions never meet a missing one.
pub(super) fn init(db: &redb::Database) -> Result<(), StoreError> {
    let tx = db.begin_write().map_err(redb::Error::from)?;
    tx.open_table(BLOBS).map_err(redb::Error::from)?;
    tx.open_table(MODELS).map_err(redb::Error::from)?;
    tx.open_table(NAMES).map_err(redb::Error::from)?;
    tx.open_table(ETAGS).map_err(redb::Error::from)?;
    tx.open_table(RESTRICTED).map_err(redb::Error::from)?;
    tx.open_table(HF_META).map_err(redb::Error::from)?;
    tx.open_table(PINNED).map_err(redb::Error::from)?;
    tx.open_table(LAST_USED).map_err(redb::Error::from)?;
    tx.commit().map_err(redb::Error::from)?;
    Ok(())
}

pub(super) fn blob(db: &redb::Database, hash: Hash) -> Result<Option<BlobRecord>, StoreError> {
    let tx = db.begin_read().map_err(redb::Error::from)?;
    let table = tx.open_table(BLOBS).map_err(redb::Error::from)?;
    let Some(bytes) = table
        .get(hash.as_bytes().as_slice())
        .map_err(redb::Error::from)?
    else {
        return Ok(None);
    };
    Ok(Some(postcard::from_bytes(bytes.value())?))
}

/// Writes a blob record; redb makes the commit durable before this returns.
pub(super) fn put_blob(
    db: &redb::Database,
    hash: Hash,
    record: &BlobRecord,
) -> Result<(), StoreError> {
    let bytes = postcard::to_allocvec(record)?;
    let tx = db.begin_write().map_err(redb::Error::from)?;
    {
        let mut table = tx.open_table(BLOBS).map_err(redb::Error::from)?;
        table
            .insert(hash.as_bytes().as_slice(), bytes.as_slice())
            .map_err(redb::Error::from)?;
    }
    tx.commit().map_err(redb::Error::from)?;
    Ok(())
}

pub(super) fn remove_blob(db: &redb::Database, hash: Hash) -> Result<(), StoreError> {
    let tx = db.begin_write().map_err(redb::Error::from)?;
    {
        let mut table = tx.open_table(BLOBS).map_err(redb::Error::from)?;
        table
            .remove(hash.as_bytes().as_slice())
            .map_err(redb::Error::from)?;
    }
    tx.commit().map_err(redb::Error::from)?;
    Ok(())
}

pub(super) fn insert_manifest(db: &redb::Database, manifest: &Manifest) -> Result<(), StoreError> {
    let id = manifest.id();
    let tx = db.begin_write().map_err(redb::Error::from)?;
    {
        let mut models = tx.open_table(MODELS).map_err(redb::Error::from)?;
        models
            .insert(id.as_bytes().as_slice(), manifest.encode().as_slice())
            .map_err(redb::Error::from)?;
        let mut names = tx.open_table(NAMES).map_err(redb::Error::from)?;
        names
            .insert(manifest.name(), id.as_bytes().as_slice())
            .map_err(redb::Error::from)?;
    }
    tx.commit().map_err(redb::Error::from)?;
    Ok(())
}

pub(super) fn manifest(
    db: &redb::Database,
    model: &ModelRef,
) -> Result<Option<Manifest>, StoreError> {
    let tx = db.begin_read().map_err(redb::Error::from)?;
    let id = match model {
        ModelRef::Id(id) => *id,
        ModelRef::Name(name) => {
            let names = tx.open_table(NAMES).map_err(redb::Error::from)?;
            let Some(id) = names.get(name.as_str()).map_err(redb::Error::from)? else {
                return Ok(None);
            };
            let bytes: [u8; 32] = id
                .value()
                .try_into()
                .map_err(|_| postcard::Error::DeserializeUnexpectedEnd)?;
            Hash::from(bytes)
        }
    };
    let models = tx.open_table(MODELS).map_err(redb::Error::from)?;
    let Some(bytes) = models
        .get(id.as_bytes().as_slice())
        .map_err(redb::Error::from)?
    else {
        return Ok(None);
    };
    Ok(Some(Manifest::decode(bytes.value())?))
}

pub(super) fn manifests(db: &redb::Database) -> Result<Vec<Manifest>, StoreError> {
    let tx = db.begin_read().map_err(redb::Error::from)?;
    let models = tx.open_table(MODELS).map_err(redb::Error::from)?;
    let mut out = Vec::new();
    for entry in models.iter().map_err(redb::Error::from)? {
        let (_, bytes) = entry.map_err(redb::Error::from)?;
        out.push(Manifest::decode(bytes.value())?);
    }
    Ok(out)
}

pub(super) fn put_etag(db: &redb::Database, etag: &str, hash: Hash) -> Result<(), StoreError> {
    let tx = db.begin_write().map_err(redb::Error::from)?;
    {
        let mut table = tx.open_table(ETAGS).map_err(redb::Error::from)?;
        table
            .insert(etag, hash.as_bytes().as_slice())
            .map_err(redb::Error::from)?;
    }
    tx.commit().map_err(redb::Error::from)?;
    Ok(())
}

pub(super) fn etag(db: &redb::Database, etag: &str) -> Result<Option<Hash>, StoreError> {
    let tx = db.begin_read().map_err(redb::Error::from)?;
    let table = tx.open_table(ETAGS).map_err(redb::Error::from)?;
    let Some(bytes) = table.get(etag).map_err(redb::Error::from)? else {
        return Ok(None);
    };
    let bytes: [u8; 32] = bytes
        .value()
        .try_into()
        .map_err(|_| postcard::Error::DeserializeUnexpectedEnd)?;
    Ok(Some(Hash::from(bytes)))
}

pub(super) fn restrict(db: &redb::Database, hashes: &[Hash]) -> Result<(), StoreError> {
    let tx = db.begin_write().map_err(redb::Error::from)?;
    {
        let mut table = tx.open_table(RESTRICTED).map_err(redb::Error::from)?;
        for h in hashes {
            table
                .insert(h.as_bytes().as_slice(), ())
                .map_err(redb::Error::from)?;
        }
    }
    tx.commit().map_err(redb::Error::from)?;
    Ok(())
}

pub(super) fn is_restricted(db: &redb::Database, hash: Hash) -> Result<bool, StoreError> {
    let tx = db.begin_read().map_err(redb::Error::from)?;
    let table = tx.open_table(RESTRICTED).map_err(redb::Error::from)?;
    Ok(table
        .get(hash.as_bytes().as_slice())
        .map_err(redb::Error::from)?
        .is_some())
}

fn hash_of(bytes: &[u8]) -> Result<Hash, StoreError> {
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| postcard::Error::DeserializeUnexpectedEnd)?;
    Ok(Hash::from(bytes))
}

/// Every blob record.
pub(super) fn blobs(db: &redb::Database) -> Result<Vec<(Hash, BlobRecord)>, StoreError> {
    let tx = db.begin_read().map_err(redb::Error::from)?;
    let table = tx.open_table(BLOBS).map_err(redb::Error::from)?;
    let mut out = Vec::new();
    for entry in table.iter().map_err(redb::Error::from)? {
        let (k, v) = entry.map_err(redb::Error::from)?;
        out.push((hash_of(k.value())?, postcard::from_bytes(v.value())?));
    }
    Ok(out)
}

/// Forgets a model: its manifest, its name (if the name still points at it), its pin and its
/// last use. Its blobs are the caller's business.
pub(super) fn remove_manifest(db: &redb::Database, manifest: &Manifest) -> Result<(), StoreError> {
    let id = manifest.id();
    let key = id.as_bytes().as_slice();
    let tx = db.begin_write().map_err(redb::Error::from)?;
    {
        let mut models = tx.open_table(MODELS).map_err(redb::Error::from)?;
        models.remove(key).map_err(redb::Error::from)?;
        let mut names = tx.open_table(NAMES).map_err(redb::Error::from)?;
        let points_here = names
            .get(manifest.name())
            .map_err(redb::Error::from)?
            .is_some_and(|v| v.value() == key);
        if points_here {
            names.remove(manifest.name()).map_err(redb::Error::from)?;
        }
        let mut pinned = tx.open_table(PINNED).map_err(redb::Error::from)?;
        pinned.remove(key).map_err(redb::Error::from)?;
        let mut used = tx.open_table(LAST_USED).map_err(redb::Error::from)?;
        used.remove(key).map_err(redb::Error::from)?;
    }
    tx.commit().map_err(redb::Error::from)?;
    Ok(())
}

/// Pins or unpins a model id.
pub(super) fn set_pinned(db: &redb::Database, id: Hash, pin: bool) -> Result<(), StoreError> {
    let tx = db.begin_write().map_err(redb::Error::from)?;
    {
        let mut table = tx.open_table(PINNED).map_err(redb::Error::from)?;
        if pin {
            table
                .insert(id.as_bytes().as_slice(), ())
                .map_err(redb::Error::from)?;
        } else {
            table
                .remove(id.as_bytes().as_slice())
                .map_err(redb::Error::from)?;
        }
    }
    tx.commit().map_err(redb::Error::from)?;
    Ok(())
}

/// The pinned model ids.
pub(super) fn pinned(db: &redb::Database) -> Result<std::collections::HashSet<Hash>, StoreError> {
    let tx = db.begin_read().map_err(redb::Error::from)?;
    let table = tx.open_table(PINNED).map_err(redb::Error::from)?;
    let mut out = std::collections::HashSet::new();
    for entry in table.iter().map_err(redb::Error::from)? {
        out.insert(hash_of(entry.map_err(redb::Error::from)?.0.value())?);
    }
    Ok(out)
}

/// Records that a model was used at `millis` (Unix milliseconds).
pub(super) fn touch(db: &redb::Database, id: Hash, millis: u64) -> Result<(), StoreError> {
    let tx = db.begin_write().map_err(redb::Error::from)?;
    {
        let mut table = tx.open_table(LAST_USED).map_err(redb::Error::from)?;
        table
            .insert(id.as_bytes().as_slice(), millis)
            .map_err(redb::Error::from)?;
    }
    tx.commit().map_err(redb::Error::from)?;
    Ok(())
}

/// When each model was last used (models never used are absent).
pub(super) fn last_used(
    db: &redb::Database,
) -> Result<std::collections::HashMap<Hash, u64>, StoreError> {
    let tx = db.begin_read().map_err(redb::Error::from)?;
    let table = tx.open_table(LAST_USED).map_err(redb::Error::from)?;
    let mut out = std::collections::HashMap::new();
    for entry in table.iter().map_err(redb::Error::from)? {
        let (k, v) = entry.map_err(redb::Error::from)?;
        out.insert(hash_of(k.value())?, v.value());
    }
    Ok(out)
}

/// Drops HuggingFace etag records whose blob `keep` rejects, and restricted marks on hashes
/// `keep` rejects. Returns how many records went.
pub(super) fn prune_hf_records(
    db: &redb::Database,
    keep: &dyn Fn(Hash) -> bool,
) -> Result<usize, StoreError> {
    let tx = db.begin_write().map_err(redb::Error::from)?;
    let mut removed = 0;
    {
        let mut etags = tx.open_table(ETAGS).map_err(redb::Error::from)?;
        let mut stale = Vec::new();
        for entry in etags.iter().map_err(redb::Error::from)? {
            let (k, v) = entry.map_err(redb::Error::from)?;
            if !keep(hash_of(v.value())?) {
                stale.push(k.value().to_string());
            }
        }
        for etag in &stale {
            etags.remove(etag.as_str()).map_err(redb::Error::from)?;
        }
        removed += stale.len();
        let mut restricted = tx.open_table(RESTRICTED).map_err(redb::Error::from)?;
        let mut stale = Vec::new();
        for entry in restricted.iter().map_err(redb::Error::from)? {
            let key = entry.map_err(redb::Error::from)?.0.value().to_vec();
            if !keep(hash_of(&key)?) {
                stale.push(key);
            }
        }
        for key in &stale {
            restricted
                .remove(key.as_slice())
                .map_err(redb::Error::from)?;
        }
        removed += stale.len();
    }
    tx.commit().map_err(redb::Error::from)?;
    Ok(removed)
}

pub(super) fn put_hf_meta(db: &redb::Database, key: &str, value: &[u8]) -> Result<(), StoreError> {
    let tx = db.begin_write().map_err(redb::Error::from)?;
    {
        let mut table = tx.open_table(HF_META).map_err(redb::Error::from)?;
        table.insert(key, value).map_err(redb::Error::from)?;
    }
    tx.commit().map_err(redb::Error::from)?;
    Ok(())
}

pub(super) fn hf_meta(db: &redb::Database, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let tx = db.begin_read().map_err(redb::Error::from)?;
    let table = tx.open_table(HF_META).map_err(redb::Error::from)?;
    let value = table.get(key).map_err(redb::Error::from)?;
    Ok(value.map(|v| v.value().to_vec()))
}
