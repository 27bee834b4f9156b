//! `snapshot.json` as the restore path reads it: a manifest that passes
//! validation prints and reads back equal, and names only plain files with
//! sha256 digests.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nullspace_model::snapshot::{SnapshotManifest, is_plain_name, is_sha256_hex};

fuzz_target!(|data: &[u8]| {
    let Ok(m) = SnapshotManifest::from_json(data) else {
        return;
    };
    let again = SnapshotManifest::from_json(&m.to_json()).expect("a printed manifest reads");
    assert_eq!(again, m);
    for (what, f) in m.files() {
        assert!(is_plain_name(&f.path), "{what}: {:?}", f.path);
        assert!(is_sha256_hex(&f.sha256), "{what}: {:?}", f.sha256);
    }
});
