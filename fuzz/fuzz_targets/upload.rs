//! Upload sessions: the create/complete/URL bodies read back equal after
//! printing; a target path normalises to a fixed point inside what it
//! named (no `..`, no empty or `.` parts, absolute iff it was); a part
//! number reads back as the text it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nullspace_model::upload::rules::{normalize_target, parse_part, valid_sha256};
use nullspace_model::upload::{CompleteUploadRequest, CreateUploadRequest, TransferUrlRequest};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn round_trip<T: Serialize + DeserializeOwned>(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<T>(data) else {
        return;
    };
    let printed = serde_json::to_value(&v).unwrap();
    let again: T = serde_json::from_value(printed.clone()).expect("a printed body parses");
    assert_eq!(serde_json::to_value(&again).unwrap(), printed);
}

fuzz_target!(|data: &[u8]| {
    round_trip::<CreateUploadRequest>(data);
    round_trip::<CompleteUploadRequest>(data);
    round_trip::<TransferUrlRequest>(data);
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(n) = parse_part(s) {
        assert_eq!(n.to_string(), s);
    }
    if valid_sha256(s) {
        assert!(
            s.len() == 64
                && s.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }
    if let Ok(t) = normalize_target(s) {
        assert_eq!(
            normalize_target(&t),
            Ok(t.clone()),
            "not a fixed point: {s:?}"
        );
        assert_eq!(t.starts_with('/'), s.starts_with('/'));
        let rel = t.strip_prefix('/').unwrap_or(&t);
        assert!(!rel.is_empty());
        for c in rel.split('/') {
            assert!(
                !c.is_empty() && c != "." && c != ".." && c.len() <= 255,
                "{t:?}"
            );
        }
        assert!(t.len() <= s.len() + 1);
    }
});
