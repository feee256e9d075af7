//! Store unit tests: outboards match bao-tree's, adds serve in place, partial blobs only take
//! verified bytes, survive reopening, and pass on pending chunks only as they are verified.

use std::{fs, io::Write};

use bao_tree::{
    io::sync::{encode_ranges_validated, DecodeResponseIter},
    BaoTree,
};
use mesh_proto::{Hash, ModelRef};

use super::*;

/// Sizes around the chunk (1 KiB) and chunk group (16 KiB) boundaries, and several groups.
const SIZES: [u64; 9] = [
    0,
    1,
    1024,
    1025,
    16383,
    16384,
    16385,
    3 << 20,
    (16 << 20) + 7,
];

fn data_of(size: u64) -> Vec<u8> {
    (0..size).map(|i| (i * 31 % 251) as u8).collect()
}

#[test]
fn parallel_outboard_matches_bao_tree() {
    let dir = tempfile::tempdir().unwrap();
    // Above LEAF_TASK_BYTES too, so the rayon split and its offsets are exercised.
    for size in SIZES.iter().copied().chain([(40 << 20) + 123]) {
        let data = data_of(size);
        let path = dir.path().join("f");
        fs::write(&path, &data).unwrap();
        let ob_path = dir.path().join("ob");
        let hash = outboard::outboard_post_order(
            &fs::File::open(&path).unwrap(),
            size,
            &fs::File::create(&ob_path).unwrap(),
        )
        .unwrap();
        let mut expected = Vec::new();
        let root = bao_tree::io::sync::outboard_post_order(
            &data[..],
            BaoTree::new(size, BLOCK_SIZE),
            &mut expected,
        )
        .unwrap();
        assert_eq!(hash, Hash::from(root), "root, size {size}");
        assert_eq!(hash, Hash::of(&data), "blake3, size {size}");
        assert_eq!(
            fs::read(&ob_path).unwrap(),
            expected,
            "outboard, size {size}"
        );
    }
}

#[test]
fn add_serves_in_place_and_notices_changes() {
    let home = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    fs::create_dir_all(src.path().join("sub")).unwrap();
    fs::write(src.path().join("a.bin"), data_of(100_000)).unwrap();
    fs::write(src.path().join("sub/b.bin"), data_of(1)).unwrap();
    fs::write(src.path().join("empty"), b"").unwrap();
    fs::create_dir_all(src.path().join(".git")).unwrap();
    fs::write(src.path().join(".git/config"), b"x").unwrap();
    let store = Store::open(home.path()).unwrap();
    let manifest = store
        .add_path(src.path(), Some("m".into()), &mut |_| {})
        .unwrap();
    let paths: Vec<_> = manifest.files().iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["a.bin", "empty", "sub/b.bin"]);
    assert_eq!(
        store
            .manifest(&ModelRef::Name("m".into()))
            .unwrap()
            .unwrap(),
        manifest
    );
    let models = store.models().unwrap();
    assert_eq!(models.len(), 1);
    assert!(models[0].complete);
    // Served in place: no copy under blobs/.
    let a = &manifest.files()[0];
    assert_eq!(
        store.data_path(a.hash).unwrap(),
        src.path().join("a.bin").canonicalize().unwrap()
    );
    assert!(!home.path().join(format!("blobs/{}.data", a.hash)).exists());
    store.open_reader(a.hash).unwrap();

    // Same size, new bytes, new mtime: refused, and forgotten for good.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(src.path().join("a.bin"))
        .unwrap();
    f.write_all(b"tampered").unwrap();
    drop(f);
    assert!(matches!(
        store.open_reader(a.hash),
        Err(StoreError::SourceChanged(_))
    ));
    assert!(matches!(
        store.open_reader(a.hash),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.status(a.hash, a.size).unwrap(), BlobStatus::Missing);
}

/// Moves a blob from one store to another through the real encoder and decoder, in pieces,
/// reopening the destination store in between as a restarted process would.
#[test]
fn partial_blob_takes_verified_ranges_and_resumes() {
    let src_home = tempfile::tempdir().unwrap();
    let dst_home = tempfile::tempdir().unwrap();
    let file = src_home.path().join("f.bin");
    let size = (5 << 20) + 5;
    let data = data_of(size);
    fs::write(&file, &data).unwrap();
    let src = Store::open(src_home.path()).unwrap();
    let manifest = src.add_path(&file, None, &mut |_| {}).unwrap();
    let hash = manifest.files()[0].hash;

    let transfer = |dst: &Store, ranges: ChunkRanges| {
        let reader = src.open_reader(hash).unwrap();
        let mut encoded = Vec::new();
        encode_ranges_validated(&reader.data, &reader.outboard, &ranges, &mut encoded).unwrap();
        let partial = dst.partial(hash, size).unwrap();
        let tree = partial.tree();
        for item in DecodeResponseIter::new(hash.into(), tree, &encoded[..], &ranges) {
            partial.write(&item.unwrap()).unwrap();
        }
        partial.checkpoint().unwrap();
    };
    let first_half = ChunkRanges::from(bao_tree::ChunkNum(0)..bao_tree::ChunkNum(2560));
    {
        let dst = Store::open(dst_home.path()).unwrap();
        transfer(&dst, first_half.clone());
        assert_eq!(
            dst.status(hash, size).unwrap(),
            BlobStatus::Partial(first_half.clone())
        );
    }
    // A new process sees what was checkpointed and fetches only the rest.
    let dst = Store::open(dst_home.path()).unwrap();
    let partial = dst.partial(hash, size).unwrap();
    assert_eq!(partial.have(), first_half);
    let missing = partial.missing();
    drop(partial);
    transfer(&dst, missing);
    assert_eq!(dst.status(hash, size).unwrap(), BlobStatus::Complete);
    assert_eq!(fs::read(dst.data_path(hash).unwrap()).unwrap(), data);
    // The fetched copy can itself be served, with an outboard that validates.
    let reader = dst.open_reader(hash).unwrap();
    let mut out = Vec::new();
    encode_ranges_validated(
        &reader.data,
        &reader.outboard,
        &ranges::all_chunks(size),
        &mut out,
    )
    .unwrap();
}

#[test]
fn corrupt_bytes_never_reach_a_partial_blob() {
    let src_home = tempfile::tempdir().unwrap();
    let dst_home = tempfile::tempdir().unwrap();
    let file = src_home.path().join("f.bin");
    let size = 200_000;
    fs::write(&file, data_of(size)).unwrap();
    let src = Store::open(src_home.path()).unwrap();
    let hash = src.add_path(&file, None, &mut |_| {}).unwrap().files()[0].hash;
    let reader = src.open_reader(hash).unwrap();
    let all = ranges::all_chunks(size);
    let mut encoded = Vec::new();
    encode_ranges_validated(&reader.data, &reader.outboard, &all, &mut encoded).unwrap();
    let last = encoded.len() - 10;
    encoded[last] ^= 1;
    let dst = Store::open(dst_home.path()).unwrap();
    let partial = dst.partial(hash, size).unwrap();
    let mut failed = false;
    for item in DecodeResponseIter::new(hash.into(), partial.tree(), &encoded[..], &all) {
        match item {
            Ok(item) => {
                partial.write(&item).unwrap();
            }
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the flipped byte was not detected");
    assert!(!partial.missing().is_empty());
    assert_ne!(dst.status(hash, size).unwrap(), BlobStatus::Complete);
}

#[test]
fn second_open_of_a_store_reports_it_locked() {
    let home = tempfile::tempdir().unwrap();
    let _first = Store::open(home.path()).unwrap();
    assert!(matches!(
        Store::open(home.path()),
        Err(StoreError::Locked(_))
    ));
}

/// A relay promised chunks it is still fetching encodes each one as it is verified: the
/// encoder waits for the data, and its output is exactly the source's encoding.
#[test]
fn pending_chunks_are_passed_on_as_they_are_verified() {
    let src_home = tempfile::tempdir().unwrap();
    let relay_home = tempfile::tempdir().unwrap();
    let file = src_home.path().join("f.bin");
    let size = (1 << 20) + 5;
    fs::write(&file, data_of(size)).unwrap();
    let src = Store::open(src_home.path()).unwrap();
    let hash = src.add_path(&file, None, &mut |_| {}).unwrap().files()[0].hash;
    let encode = |store: &Store, ranges: &ChunkRanges| {
        let reader = store.open_reader(hash).unwrap();
        let (data, outboard) = reader.verified();
        let mut out = Vec::new();
        encode_ranges_validated(data, outboard, ranges, &mut out).map(|()| out)
    };
    let block = ChunkRanges::from(bao_tree::ChunkNum(256)..bao_tree::ChunkNum(768));
    let (first, second) = (
        ChunkRanges::from(bao_tree::ChunkNum(256)..bao_tree::ChunkNum(512)),
        ChunkRanges::from(bao_tree::ChunkNum(512)..bao_tree::ChunkNum(768)),
    );
    let relay = Store::open(relay_home.path()).unwrap();
    let partial = relay.partial(hash, size).unwrap();
    partial.set_pending(block.clone());
    let reader = relay.open_reader(hash).unwrap();
    assert_eq!(reader.promised(), block);
    let passing_on = std::thread::scope(|scope| {
        let encoder = scope.spawn(|| encode(&relay, &block));
        let deliver = |ranges: &ChunkRanges| {
            let encoded = encode(&src, ranges).unwrap();
            for item in DecodeResponseIter::new(hash.into(), partial.tree(), &encoded[..], ranges) {
                partial.write(&item.unwrap()).unwrap();
            }
        };
        deliver(&first);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            !encoder.is_finished(),
            "encoded chunks that were not here yet"
        );
        deliver(&second);
        encoder.join().unwrap()
    });
    assert_eq!(passing_on.unwrap(), encode(&src, &block).unwrap());
}

/// When the fetch a relay promised from fails (the chunks stop being pending), the encoder
/// gives up at once instead of waiting for data that will not come.
#[test]
fn a_failed_fetch_ends_the_relay_with_not_found() {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let size = 200_000;
    let hash = Hash::from(*blake3::hash(&data_of(size)).as_bytes());
    let partial = store.partial(hash, size).unwrap();
    let wanted = ChunkRanges::from(bao_tree::ChunkNum(0)..bao_tree::ChunkNum(32));
    partial.set_pending(wanted.clone());
    let started = std::time::Instant::now();
    let result = std::thread::scope(|scope| {
        let encoder = scope.spawn(|| {
            let reader = store.open_reader(hash).unwrap();
            let (data, outboard) = reader.verified();
            encode_ranges_validated(data, outboard, &wanted, &mut Vec::new())
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        partial.set_pending(ChunkRanges::empty());
        encoder.join().unwrap()
    });
    match result {
        Err(bao_tree::io::EncodeError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::NotFound),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(started.elapsed() < partial::FOLLOW_TIMEOUT);
}

#[test]
fn only_the_owner_reads_the_store_until_a_public_blob_is_exported() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let store = Store::open(&home).unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for d in ["", "blobs", "partial"] {
        assert_eq!(mode(&home.join(d)), 0o700, "{d}");
    }
    assert_eq!(mode(&home.join("meta.redb")), 0o600);
    let part = home.join("partial/hf-x.part");
    fs::write(&part, vec![7u8; 40_000]).unwrap();
    let (hash, _) = store.import_owned(&part).unwrap();
    let data = store.data_path(hash).unwrap();
    assert_eq!(mode(&data), 0o600);
    store.share_for_export(hash).unwrap();
    assert_eq!(
        mode(&data),
        0o644,
        "a public blob linked into a target is readable there"
    );
    // A gated model's blob stays the owner's only.
    let gated = home.join("partial/hf-y.part");
    fs::write(&gated, vec![9u8; 40_000]).unwrap();
    let (hash, size) = store.import_owned(&gated).unwrap();
    let entry = mesh_proto::FileEntry {
        path: "w.bin".parse().unwrap(),
        size,
        hash,
        sha256: None,
        etag: None,
    };
    let manifest = Manifest::new("g".into(), mesh_proto::Source::Local, vec![entry]).unwrap();
    store.restrict(&manifest).unwrap();
    store.share_for_export(hash).unwrap();
    assert_eq!(mode(&store.data_path(hash).unwrap()), 0o600);
}
