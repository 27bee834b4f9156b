//! Package databases as `nullspace_sbom::scan` reads them from an image:
//! rpm's BerkeleyDB `Packages` and its header blobs, dpkg's status, apk's
//! installed, a pacman desc, Python METADATA and an npm package.json (the
//! first byte picks which file the rest is). Whatever the bytes, the scan
//! returns; a listed package has a purl, the list is sorted with one entry
//! per purl, and both documents render to the same JSON twice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nullspace_sbom::{DocumentInfo, Entry, EntryKind, Format, FsError, RootFs, render, scan};
use std::collections::BTreeMap;

const PATHS: [&str; 6] = [
    "var/lib/rpm/Packages",
    "var/lib/dpkg/status",
    "lib/apk/db/installed",
    "var/lib/pacman/local/p-1-1/desc",
    "usr/lib/python3/dist-packages/p-1.dist-info/METADATA",
    "app/node_modules/p/package.json",
];

/// One file in memory; directories are the prefixes of its path.
struct OneFile(BTreeMap<String, Vec<u8>>);

impl RootFs for OneFile {
    fn read(&self, path: &str, limit: u64) -> Result<Option<Vec<u8>>, FsError> {
        match self.0.get(path) {
            Some(b) if b.len() as u64 > limit => Err(FsError::TooLarge {
                path: path.into(),
                limit,
            }),
            b => Ok(b.cloned()),
        }
    }
    fn list(&self, dir: &str) -> Result<Option<Vec<Entry>>, FsError> {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let mut out: Vec<Entry> = Vec::new();
        for key in self.0.keys() {
            let Some(rest) = key.strip_prefix(&prefix) else {
                continue;
            };
            let (name, kind) = match rest.split_once('/') {
                Some((d, _)) => (d, EntryKind::Dir),
                None => (rest, EntryKind::File),
            };
            if !out.iter().any(|e| e.name == name) {
                out.push(Entry {
                    name: name.to_owned(),
                    kind,
                });
            }
        }
        Ok((!out.is_empty()).then_some(out))
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let path = PATHS[pick as usize % PATHS.len()];
    let fs = OneFile([(path.to_owned(), body.to_vec())].into());
    let Ok(inv) = scan(&fs) else {
        return;
    };
    assert!(inv.packages.iter().all(|p| p.purl.starts_with("pkg:")));
    assert!(
        inv.packages
            .windows(2)
            .all(|w| w[0] <= w[1] && w[0].purl != w[1].purl)
    );
    let info = DocumentInfo {
        name: "fuzz".into(),
        created: None,
    };
    for f in [Format::SpdxJson, Format::CycloneDxJson] {
        let doc = render(&inv, f, &info);
        assert_eq!(doc, render(&inv, f, &info));
        serde_json::from_slice::<serde_json::Value>(&doc).expect("a document is JSON");
    }
});
