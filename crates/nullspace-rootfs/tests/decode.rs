//! Decoder: compression sniffing, diff_id, spool contents, re-indexing,
//! determinism of the whole build, and the layer cache.

mod common;
use common::*;
use std::fs::File;

use nullspace_rootfs::testutil::{LayerBuilder, gzip, zstd};
use nullspace_rootfs::{
    Compression, EntryKind, LayerCache, Limits, RootfsOptions, decode_layer, index_tar_file,
    parse_digest,
};
use sha2::{Digest, Sha256};

fn sample() -> LayerBuilder {
    LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/a", 0o644, b"hello")
        .file("big", 0o644, &vec![0xabu8; 300_000])
        .symlink("s", "etc/a")
}

fn decode(blob: &[u8], media: &str) -> Result<(nullspace_rootfs::LayerIndex, Vec<u8>), String> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("spool");
    let mut f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    let idx = decode_layer("sha256:test", blob, media, &mut f, &Limits::default())
        .map_err(|e| e.to_string())?;
    Ok((idx, std::fs::read(&p).unwrap()))
}

#[test]
fn all_compressions_decode_to_same_stream_and_diff_id() {
    let tar = sample().into_tar();
    let want = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
    for (blob, c) in [
        (tar.clone(), Compression::None),
        (gzip(&tar), Compression::Gzip),
        (zstd(&tar), Compression::Zstd),
    ] {
        // Media type deliberately wrong: the magic decides.
        let (idx, spool) = decode(&blob, "application/vnd.oci.image.layer.v1.tar+zstd").unwrap();
        assert_eq!(idx.compression, c);
        assert_eq!(spool, tar);
        assert_eq!(idx.diff_id, want);
        assert_eq!(idx.uncompressed_size, tar.len() as u64);
        // Offsets point at the data.
        let EntryKind::File { offset, size } = idx.entries[2].kind else {
            panic!()
        };
        assert_eq!(size, 300_000);
        assert!(
            spool[offset as usize..(offset + size) as usize]
                .iter()
                .all(|&b| b == 0xab)
        );
    }
}

#[test]
fn trailing_bytes_after_end_marker_are_hashed() {
    let mut tar = sample().into_tar();
    tar.extend_from_slice(&[0u8; 10240]);
    let (idx, spool) = decode(&tar, "").unwrap();
    assert_eq!(spool.len(), tar.len());
    assert_eq!(
        idx.diff_id,
        format!("sha256:{}", hex::encode(Sha256::digest(&tar)))
    );
}

#[test]
fn xz_bzip2_and_garbage_rejected() {
    let e = decode(b"\xfd7zXZ\x00\x00\x04", "application/x-xz").unwrap_err();
    assert!(e.contains("unsupported compression xz"), "{e}");
    let e = decode(b"BZh91AY&SY", "").unwrap_err();
    assert!(e.contains("unsupported compression bzip2"), "{e}");
    let e = decode(b"this is not a layer at all", "").unwrap_err();
    assert!(e.contains("not a tar, gzip or zstd"), "{e}");
    // Corrupt gzip body.
    let mut g = gzip(&sample().into_tar());
    let n = g.len();
    g[20..n - 10].fill(0x55);
    assert!(decode(&g, "").is_err());
}

#[test]
fn empty_layer_is_fine() {
    let (idx, _) = decode(&[], "").unwrap();
    assert!(idx.entries.is_empty());
    let (idx, _) = decode(&gzip(&[0u8; 1024]), "").unwrap();
    assert!(idx.entries.is_empty());
}

#[test]
fn index_tar_file_matches_streaming_index() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("spool");
    let mut f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    let a = decode_layer(
        "l",
        &gzip(&sample().into_tar())[..],
        "",
        &mut f,
        &Limits::default(),
    )
    .unwrap();
    let b = index_tar_file("l", &p, &a.diff_id, &Limits::default()).unwrap();
    assert_eq!(a.entries, b.entries);
    assert_eq!(a.uncompressed_size, b.uncompressed_size);
}

#[test]
fn build_is_deterministic_and_seed_sensitive() {
    let layers = vec![
        sample().into_gzip(),
        LayerBuilder::new()
            .whiteout("s")
            .file("etc/b", 0o600, b"b")
            .into_zstd(),
    ];
    let a = build(&layers);
    let b = build(&layers);
    let bytes_a = std::fs::read(&a.img).unwrap();
    assert_eq!(bytes_a, std::fs::read(&b.img).unwrap());
    assert_eq!(a.summary, b.summary);
    let opts = RootfsOptions {
        uuid_seed: [7; 32],
        ..RootfsOptions::default()
    };
    let c = try_build_with(&layers, &opts).unwrap();
    assert_ne!(bytes_a, std::fs::read(&c.img).unwrap());
}

#[test]
fn sizing_headroom_and_min_size() {
    let layers = vec![sample().into_tar()];
    let a = build(&layers);
    assert_eq!(a.summary.size_bytes % 4096, 0);
    assert!(a.summary.size_bytes >= 64 << 20);
    assert_eq!(a.summary.files, 2);
    assert_eq!(a.summary.symlinks, 1);
    assert_eq!(a.summary.data_bytes, 300_005);
    let opts = RootfsOptions {
        min_size_bytes: Some(1000 << 20),
        ..RootfsOptions::default()
    };
    let b = try_build_with(&layers, &opts).unwrap();
    assert!(b.summary.size_bytes >= 1000 << 20);
    assert_eq!(
        std::fs::metadata(&b.img).unwrap().len(),
        b.summary.size_bytes
    );
}

#[test]
fn many_files_in_one_dir_fit_and_fsck() {
    // Enough entries to need htree directories and more inodes than the
    // default ratio of a small image provides.
    let mut l = LayerBuilder::new();
    for i in 0..20_000 {
        l = l.file(&format!("many/file-with-a-longish-name-{i:06}"), 0o644, b"");
    }
    let b = build(&[l.into_gzip()]);
    assert_eq!(b.summary.files, 20_000);
    let img = Img::open(&b);
    assert!(img.exists("/many/file-with-a-longish-name-019999"));
}

#[test]
fn layer_cache_roundtrip_and_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let cache = LayerCache::open(dir.path(), 1).unwrap();
    let d1 = format!("sha256:{}", "1".repeat(64));
    let d2 = format!("sha256:{}", "2".repeat(64));
    assert!(cache.get(&d1).unwrap().is_none());
    assert!(cache.get("sha256:../../etc").is_err());
    assert!(parse_digest(&d1).is_ok());

    for d in [&d1, &d2] {
        let mut ins = cache.begin_insert(d).unwrap();
        let idx = decode_layer(
            d,
            &sample().into_gzip()[..],
            "",
            &mut ins.file,
            &Limits::default(),
        )
        .unwrap();
        let path = ins.commit(&idx, &cache).unwrap().tar_path;
        assert!(path.ends_with(format!("{}.tar", &d[7..])));
    }
    let hit = cache.get(&d1).unwrap().unwrap();
    let idx = index_tar_file(&d1, &hit.tar_path, &hit.diff_id, &Limits::default()).unwrap();
    assert_eq!(idx.entries.len(), 4);
    // An abandoned insert leaves nothing behind.
    drop(
        cache
            .begin_insert(&format!("sha256:{}", "3".repeat(64)))
            .unwrap(),
    );
    let names: Vec<_> = std::fs::read_dir(dir.path().join("layers/sha256"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(names.len(), 4, "two tars + two json");

    // Evict down to 1 byte, keeping d2: only d1 goes (once unleased).
    cache.evict(&[&d2]).unwrap();
    assert!(hit.tar_path.exists(), "a leased entry stays");
    drop(hit);
    // Another test of this binary spawning e2fsck can briefly hold a copy
    // of the tar's fd (and so its flock) between fork and exec; eviction
    // rightly skips a locked entry, so give it a few tries.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while cache.evict(&[&d2]).unwrap() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(cache.get(&d1).unwrap().is_none());
    assert!(cache.get(&d2).unwrap().is_some());
    assert!(cache.verify(&d2).unwrap());
    let s = cache.stats();
    assert_eq!((s.inserts, s.evictions), (2, 1));
    assert!(s.hits >= 2 && s.misses >= 2);
}
