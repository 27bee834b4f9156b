//! A layer tar (uncompressed) through the decoder and the flattener: every
//! indexed and flattened path stays inside the root, file data lies inside
//! the spooled stream, and the spool is exactly the stream the index hashed.
#![no_main]

use std::io::{Read, Seek, SeekFrom};

use libfuzzer_sys::fuzz_target;
use nullspace_rootfs::{EntryKind, Limits, decode_layer, flatten_paths};

fn check_path(p: &str) {
    assert!(!p.starts_with('/'), "absolute path {p:?}");
    assert!(!p.ends_with('/'), "trailing slash {p:?}");
    assert!(!p.contains('\0'), "NUL in {p:?}");
    if !p.is_empty() {
        for c in p.split('/') {
            assert!(
                !c.is_empty() && c != "." && c != "..",
                "component {c:?} in {p:?}"
            );
            assert!(c.len() <= 255, "long component in {p:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_layer_bytes: 64 << 20,
        max_total_bytes: 64 << 20,
        ..Limits::default()
    };
    let mut spool = tempfile::tempfile().expect("spool");
    let media = "application/vnd.oci.image.layer.v1.tar";
    let Ok(index) = decode_layer("layer", data, media, &mut spool, &limits) else {
        return;
    };
    let mut spooled = Vec::new();
    spool.seek(SeekFrom::Start(0)).unwrap();
    spool.read_to_end(&mut spooled).unwrap();
    assert_eq!(spooled.len() as u64, index.uncompressed_size);
    let digest = nullspace_fuzz_sha256(&spooled);
    assert_eq!(index.diff_id, format!("sha256:{digest}"));
    for e in &index.entries {
        check_path(&e.path);
        match &e.kind {
            EntryKind::File { offset, size } => {
                assert!(
                    offset
                        .checked_add(*size)
                        .is_some_and(|end| end <= index.uncompressed_size)
                );
            }
            EntryKind::Hardlink { target } => check_path(target),
            _ => {}
        }
    }
    // One layer, then the same layer over itself (whiteouts meet entries).
    for layers in [vec![("l0", &index)], vec![("l0", &index), ("l1", &index)]] {
        if let Ok(paths) = flatten_paths(&layers) {
            for (p, _) in &paths {
                check_path(p);
                assert!(!p.is_empty());
            }
        }
    }
});

fn nullspace_fuzz_sha256(b: &[u8]) -> String {
    nullspace_oci::Digest::sha256_of(b).hex().to_string()
}
