//! Lifecycle unit tests: `rm` keeps shared blobs and files added in place, `gc` removes what
//! dead processes left, eviction follows last use and spares pinned models, `verify` drops a
//! blob with a flipped byte.

use std::{fs, os::unix::fs::FileExt};

use mesh_proto::{FileEntry, Manifest, ModelRef, RelPath, Source};

use super::*;
use crate::store::{
    verify::{self, FileState},
    BlobStatus,
};

fn bytes(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
        .collect()
}

/// A blob owned by the store (as a fetch leaves it), returned as a manifest entry.
fn owned(store: &Store, dir: &Path, name: &str, size: usize, seed: u8) -> FileEntry {
    let path = dir.join(format!("{name}.incoming"));
    fs::write(&path, bytes(size, seed)).unwrap();
    let (hash, size) = store.import_owned(&path).unwrap();
    entry(name, hash, size)
}

fn entry(path: &str, hash: Hash, size: u64) -> FileEntry {
    FileEntry {
        path: RelPath::from_path(Path::new(path)).unwrap(),
        size,
        hash,
        sha256: None,
        etag: None,
    }
}

fn model(store: &Store, name: &str, files: Vec<FileEntry>) -> Manifest {
    let m = Manifest::new(name.to_string(), Source::Local, files).unwrap();
    store.insert_manifest(&m).unwrap();
    m
}

fn by_name(name: &str) -> ModelRef {
    ModelRef::Name(name.to_string())
}

#[test]
fn rm_keeps_shared_blobs_and_files_added_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("home")).unwrap();
    let src = dir.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a.bin"), bytes(100_000, 3)).unwrap();
    let added = store
        .add_path(&src, Some("added".into()), &mut |_| {})
        .unwrap();
    let shared = added.files()[0].clone();
    let own = owned(&store, dir.path(), "own.bin", 300_000, 5);
    model(
        &store,
        "fetched",
        vec![own.clone(), entry("a.bin", shared.hash, shared.size)],
    );

    let fetched = store.manifest(&by_name("fetched")).unwrap().unwrap();
    let prefix = &fetched.id().to_string()[..8];
    assert_eq!(store.find_model(prefix).unwrap().id(), fetched.id());
    assert!(matches!(
        store.find_model("abc"),
        Err(StoreError::NoModel(_))
    ));
    let removed = store.remove_model(prefix).unwrap();
    assert_eq!((removed.blobs, removed.shared, removed.in_place), (1, 1, 0));
    assert!(
        removed.bytes >= 300_000,
        "store shrank by {}",
        removed.bytes
    );
    assert_eq!(
        store.status(own.hash, own.size).unwrap(),
        BlobStatus::Missing
    );
    assert!(!store.blob_path(own.hash, "data").exists());
    assert_eq!(
        store.status(shared.hash, shared.size).unwrap(),
        BlobStatus::Complete
    );

    let removed = store.remove_model("added").unwrap();
    assert_eq!((removed.blobs, removed.in_place), (0, 1));
    assert_eq!(fs::read(src.join("a.bin")).unwrap(), bytes(100_000, 3));
    assert!(store.manifest(&by_name("added")).unwrap().is_none());
    assert!(matches!(
        store.remove_model("added"),
        Err(StoreError::NoModel(_))
    ));
}

#[test]
fn gc_removes_what_dead_processes_left_and_nothing_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let store = Store::open(&home).unwrap();
    let kept = owned(&store, dir.path(), "kept.bin", 50_000, 7);
    model(&store, "kept", vec![kept.clone()]);
    let (orphan, _) = {
        let p = dir.path().join("orphan");
        fs::write(&p, bytes(70_000, 9)).unwrap();
        store.import_owned(&p).unwrap()
    };
    store.record_etag("abc123", orphan).unwrap();
    let dead_tmp = home.join("blobs/import-999999999-42.obao.tmp");
    let own_tmp = home.join(format!("blobs/import-{}-42.obao.tmp", std::process::id()));
    fs::write(&dead_tmp, vec![1u8; 8192]).unwrap();
    fs::write(&own_tmp, vec![1u8; 8192]).unwrap();
    let stray = home.join(format!("partial/{}.data", Hash::of(b"stray")));
    fs::write(&stray, vec![2u8; 8192]).unwrap();
    // A model whose fetch never moved a byte.
    model(&store, "empty", vec![entry("x.bin", Hash::of(b"x"), 5000)]);

    let report = store.gc(false).unwrap();
    let kinds: HashSet<GcKind> = report.items.iter().map(|i| i.kind).collect();
    for kind in [
        GcKind::UnreferencedBlob,
        GcKind::TempFile,
        GcKind::StalePartial,
        GcKind::EmptyModel,
    ] {
        assert!(kinds.contains(&kind), "{kind:?} missing from {report:?}");
    }
    assert_eq!(report.records, 1, "the etag of the collected blob");
    assert!(report.bytes >= 70_000);
    assert!(!dead_tmp.exists() && !stray.exists());
    assert!(own_tmp.exists(), "this process's temporary file is in use");
    assert_eq!(
        store.status(kept.hash, kept.size).unwrap(),
        BlobStatus::Complete
    );
    assert_eq!(store.blob_for_etag("abc123").unwrap(), None);
    assert!(store.manifest(&by_name("empty")).unwrap().is_none());
    // While a fetch runs, an unreferenced blob may be its own: it stays.
    let p = dir.path().join("fresh");
    fs::write(&p, bytes(20_000, 11)).unwrap();
    let (fresh, size) = store.import_owned(&p).unwrap();
    store.gc(true).unwrap();
    assert_eq!(store.status(fresh, size).unwrap(), BlobStatus::Complete);
}

#[test]
fn eviction_takes_the_least_recently_used_unpinned_model() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("home")).unwrap();
    for (i, name) in ["pinned-oldest", "old", "new"].iter().enumerate() {
        let f = owned(&store, dir.path(), name, 200_000, i as u8 + 1);
        let m = model(&store, name, vec![f]);
        db::touch(&store.inner.db, m.id(), 1000 + i as u64).unwrap();
    }
    store.set_pinned("pinned-oldest", true).unwrap();
    let max = store.usage();
    let evicted = store.evict_for(100_000, max, &HashSet::new()).unwrap();
    let names: Vec<&str> = evicted.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["old"]);
    assert!(store.usage() + 100_000 <= max);
    // Asking for more than evicting every unpinned model frees: nothing is evicted.
    let err = store.evict_for(10 << 20, max, &HashSet::new()).unwrap_err();
    assert!(matches!(err, StoreError::Quota { evicted: 0, .. }), "{err}");
    assert!(store.manifest(&by_name("pinned-oldest")).unwrap().is_some());
    assert!(store.manifest(&by_name("new")).unwrap().is_some());
}

#[test]
fn verify_drops_a_blob_with_a_flipped_byte() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("home")).unwrap();
    let good = owned(&store, dir.path(), "good.bin", 100_000, 13);
    let bad = owned(&store, dir.path(), "bad.bin", 100_000, 17);
    model(&store, "m", vec![good.clone(), bad.clone()]);
    let path = store.blob_path(bad.hash, "data");
    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
    let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
    let mut byte = [0u8; 1];
    fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut byte, 77_777)
        .unwrap();
    file.write_all_at(&[byte[0] ^ 1], 77_777).unwrap();
    file.set_modified(mtime).unwrap();
    drop(file);

    let report = store.verify(&[]).unwrap();
    assert_eq!(report.corrupt, 1);
    let state = |r: &verify::VerifyReport, path: &str| {
        r.models[0]
            .files
            .iter()
            .find(|f| f.path == path)
            .unwrap()
            .state
    };
    assert_eq!(state(&report, "good.bin"), FileState::Ok);
    assert_eq!(state(&report, "bad.bin"), FileState::Corrupt);
    assert_eq!(
        store.status(bad.hash, bad.size).unwrap(),
        BlobStatus::Missing
    );
    assert!(!path.exists());
    assert!(store.open_reader(bad.hash).is_err(), "no longer served");
    let again = store.verify(&["m".to_string()]).unwrap();
    assert_eq!(again.corrupt, 0);
    assert_eq!(state(&again, "bad.bin"), FileState::Missing);
}
