//! OCI / Docker manifests and indexes, and the platform choice: a parsed
//! document serialises and parses back equal, and the platform chosen from
//! an index is one of its manifests and matches what was asked for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nullspace_oci::manifest::{Document, parse_document};
use nullspace_oci::platform::PlatformSpec;

const DECLARED: [Option<&str>; 6] = [
    None,
    Some("application/vnd.oci.image.manifest.v1+json"),
    Some("application/vnd.oci.image.index.v1+json"),
    Some("application/vnd.docker.distribution.manifest.v2+json"),
    Some("application/vnd.docker.distribution.manifest.list.v2+json"),
    Some("text/plain"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let declared = DECLARED[sel as usize % DECLARED.len()];
    let Ok(doc) = parse_document(body, declared) else {
        return;
    };
    let again = match &doc {
        Document::Index(i) => serde_json::to_vec(i).unwrap(),
        Document::Manifest(m) => serde_json::to_vec(m).unwrap(),
    };
    let reparsed = parse_document(&again, declared).expect("a serialised document parses");
    assert_eq!(reparsed, doc);
    if let Document::Index(index) = &doc {
        for spec in [
            "linux/amd64",
            "linux/arm64/v8",
            "linux/arm/v7",
            "linux/riscv64",
        ] {
            let spec = PlatformSpec::parse(spec).expect("a Linux platform");
            if let Ok(desc) = spec.select(index) {
                assert!(index.manifests.iter().any(|d| d == desc));
                if let Some(p) = &desc.platform {
                    spec.check(p)
                        .expect("the chosen manifest's platform matches");
                }
            }
        }
    }
});
