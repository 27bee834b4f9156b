//! The SBOM of root filesystems whose package databases the real package
//! managers wrote (tests/fixtures/make-rootfs.sh): exactly the installed
//! packages, with their versions, licences and purls; documents valid
//! against the official SPDX 2.3 and CycloneDX 1.5 schemas; corrupt
//! databases as errors naming the file, never a panic.

use nullspace_sbom::{
    DocumentInfo, Ecosystem, Entry, EntryKind, Format, FsError, HostDir, Inventory, RootFs,
    SbomError, render, scan,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The fixture roots, built once per test process by the real tools.
fn roots() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let out = Command::new("bash")
            .arg(fixtures_dir().join("make-rootfs.sh"))
            .arg(dir.path())
            .output()
            .expect("run make-rootfs.sh");
        assert!(
            out.status.success(),
            "make-rootfs.sh failed (are dpkg, rpm, db5.3-util, pacman-package-manager, libarchive-tools installed? scripts/deps.sh):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .path()
}

fn scan_root(name: &str) -> Inventory {
    scan(&HostDir::new(roots().join(name))).unwrap_or_else(|e| panic!("scan {name}: {e}"))
}

fn expected(name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(roots().join(format!("expected-{name}.txt"))).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.sort();
    assert!(!lines.is_empty(), "the tools report no package for {name}");
    lines
}

fn listed(inv: &Inventory) -> Vec<String> {
    let mut lines: Vec<String> = inv
        .packages
        .iter()
        .map(|p| format!("{} {}", p.name, p.version))
        .collect();
    lines.sort();
    lines
}

fn by_name(inv: &Inventory) -> BTreeMap<&str, &nullspace_sbom::Package> {
    inv.packages.iter().map(|p| (p.name.as_str(), p)).collect()
}

#[test]
fn dpkg_lists_installed_packages_only_with_copyright_licences() {
    let inv = scan_root("deb");
    assert_eq!(listed(&inv), expected("deb"));
    // gone-sbom was removed; its conffile keeps a "deinstall" paragraph.
    let status = std::fs::read_to_string(roots().join("deb/var/lib/dpkg/status")).unwrap();
    assert!(
        status.contains("Package: gone-sbom"),
        "the fixture keeps the removed package's paragraph"
    );
    let p = by_name(&inv);
    assert_eq!(p["hello-sbom"].license.as_deref(), Some("GPL-2+ AND MIT"));
    assert_eq!(
        p["libfix++1"].license.as_deref(),
        Some("(Apache-2.0 or MIT) AND MIT")
    );
    assert_eq!(
        p["libfix++1"].purl,
        "pkg:deb/debian/libfix%2B%2B1@1%3A0.9~rc1-2?arch=all"
    );
    assert!(inv.packages.iter().all(|p| p.ecosystem == Ecosystem::Deb));
}

#[test]
fn rpm_sqlite_and_berkeleydb_give_the_same_packages() {
    let sqlite = scan_root("rpm-sqlite");
    let bdb = scan_root("rpm-bdb");
    assert_eq!(listed(&sqlite), expected("rpm"));
    assert_eq!(listed(&bdb), expected("rpm"));
    // Big-endian, 512-byte pages: the same packages, purls and licences.
    assert_eq!(scan_root("rpm-bdb-be").packages, bdb.packages);
    let (s, b) = (by_name(&sqlite), by_name(&bdb));
    assert_eq!(s["rpm-epoch"].license.as_deref(), Some("GPLv2+ and BSD"));
    assert_eq!(
        s["rpm-epoch"].purl,
        "pkg:rpm/rocky/rpm-epoch@1.1-1.el8?arch=noarch&epoch=4"
    );
    assert_eq!(
        b["rpm-epoch"].purl,
        "pkg:rpm/centos/rpm-epoch@1.1-1.el8?arch=noarch&epoch=4"
    );
    assert_eq!(b["rpm-large"].license.as_deref(), Some("Apache-2.0"));
    assert_eq!(b["rpm-large"].source, "var/lib/rpm/Packages");
    // rpm-large's header spans Berkeley DB overflow pages.
    let header = std::fs::metadata(roots().join("rpm-bdb/var/lib/rpm/Packages")).unwrap();
    assert!(header.len() > 4 * 4096);
}

#[test]
fn pacman_and_apk_list_their_packages() {
    let alpm = scan_root("alpm");
    assert_eq!(listed(&alpm), expected("alpm"));
    let p = by_name(&alpm);
    assert_eq!(
        p["hello-alpm"].license.as_deref(),
        Some("GPL-2.0-or-later AND MIT")
    );
    assert_eq!(
        p["hello-alpm"].purl,
        "pkg:alpm/arch/hello-alpm@0.5-2?arch=any"
    );

    let apk = scan_root("apk");
    assert_eq!(listed(&apk), expected("apk"));
    let p = by_name(&apk);
    assert_eq!(p["musl"].license.as_deref(), Some("MIT"));
    assert_eq!(
        p["busybox"].purl,
        "pkg:apk/alpine/busybox@1.36.1-r5?arch=x86_64"
    );
}

#[test]
fn python_dist_info_and_npm_node_modules() {
    let inv = scan_root("lang");
    assert_eq!(listed(&inv), expected("lang"));
    let p = by_name(&inv);
    assert_eq!(p["@types/node"].purl, "pkg:npm/%40types/node@20.11.5");
    assert_eq!(p["left-pad"].license.as_deref(), Some("WTFPL"));
    assert!(p["pip"].purl.starts_with("pkg:pypi/pip@"));
    assert_eq!(p["pip"].ecosystem, Ecosystem::Pypi);
}

/// Runs the vendored official schema check; returns its stderr on failure.
fn validate(kind: &str, doc: &[u8]) -> Result<(), String> {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), doc).unwrap();
    // Debian's python3 carries python3-jsonschema (scripts/deps.sh).
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let out = Command::new(python)
        .args(["-W", "ignore"])
        .arg(fixtures_dir().join("validate.py"))
        .arg(kind)
        .arg(file.path())
        .output()
        .expect("run validate.py");
    match out.status.code() {
        Some(0) => Ok(()),
        Some(1) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        _ => panic!(
            "validate.py could not run: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn documents_validate_against_spdx_2_3_and_cyclonedx_1_5() {
    let info = DocumentInfo {
        name: "fixture".into(),
        created: None,
    };
    for root in [
        "deb",
        "rpm-sqlite",
        "rpm-bdb",
        "rpm-bdb-be",
        "alpm",
        "apk",
        "lang",
    ] {
        let inv = scan_root(root);
        let spdx = render(&inv, Format::SpdxJson, &info);
        validate("spdx", &spdx).unwrap_or_else(|e| panic!("{root} SPDX: {e}"));
        let cdx = render(&inv, Format::CycloneDxJson, &info);
        validate("cyclonedx", &cdx).unwrap_or_else(|e| panic!("{root} CycloneDX: {e}"));

        let spdx: serde_json::Value = serde_json::from_slice(&spdx).unwrap();
        let cdx: serde_json::Value = serde_json::from_slice(&cdx).unwrap();
        let purls = |v: &serde_json::Value, f: &dyn Fn(&serde_json::Value) -> String| {
            let mut p: Vec<String> = v.as_array().unwrap().iter().map(f).collect();
            p.sort();
            p
        };
        let want: Vec<String> = {
            let mut p: Vec<String> = inv.packages.iter().map(|p| p.purl.clone()).collect();
            p.sort();
            p
        };
        assert_eq!(
            purls(&spdx["packages"], &|p| {
                p["externalRefs"][0]["referenceLocator"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            }),
            want
        );
        assert_eq!(
            purls(&cdx["components"], &|c| c["purl"]
                .as_str()
                .unwrap()
                .to_owned()),
            want
        );
    }
    // The check itself can fail: a document missing a required field.
    let inv = scan_root("apk");
    let mut doc: serde_json::Value =
        serde_json::from_slice(&render(&inv, Format::SpdxJson, &info)).unwrap();
    doc.as_object_mut().unwrap().remove("spdxVersion");
    let err = validate("spdx", &serde_json::to_vec(&doc).unwrap()).unwrap_err();
    assert!(err.contains("spdxVersion"), "{err}");
}

#[test]
fn documents_are_deterministic_and_timestamped_only_on_request() {
    let a = scan_root("deb");
    let b = scan_root("deb");
    let info = DocumentInfo {
        name: "t".into(),
        created: None,
    };
    for f in [Format::SpdxJson, Format::CycloneDxJson] {
        assert_eq!(render(&a, f, &info), render(&b, f, &info));
    }
    let cdx: serde_json::Value =
        serde_json::from_slice(&render(&a, Format::CycloneDxJson, &info)).unwrap();
    assert!(cdx["metadata"].get("timestamp").is_none());
    let fixed = DocumentInfo {
        name: "t".into(),
        created: Some("2026-01-02T03:04:05Z".into()),
    };
    let spdx: serde_json::Value =
        serde_json::from_slice(&render(&a, Format::SpdxJson, &fixed)).unwrap();
    assert_eq!(spdx["creationInfo"]["created"], "2026-01-02T03:04:05Z");
    assert_eq!("spdx-json".parse::<Format>(), Ok(Format::SpdxJson));
    assert!("xml".parse::<Format>().unwrap_err().contains("\"xml\""));
}

/// A root filesystem in memory: the whole trait in a few lines, and a way
/// to hand the scanner mutated databases.
struct MemFs(BTreeMap<String, Vec<u8>>);

impl RootFs for MemFs {
    fn read(&self, path: &str, limit: u64) -> Result<Option<Vec<u8>>, FsError> {
        match self.0.get(path) {
            Some(b) if b.len() as u64 > limit => Err(FsError::TooLarge {
                path: path.into(),
                limit,
            }),
            b => Ok(b.cloned()),
        }
    }
    fn list(&self, path: &str) -> Result<Option<Vec<Entry>>, FsError> {
        // Only the root and nothing below it: these tests are about databases.
        Ok((path.is_empty()).then(|| {
            vec![Entry {
                name: "var".into(),
                kind: EntryKind::File,
            }]
        }))
    }
}

fn real(path: &str) -> Vec<u8> {
    std::fs::read(roots().join(path)).unwrap()
}

#[test]
fn corrupt_databases_are_errors_naming_the_file() {
    let bdb = real("rpm-bdb/var/lib/rpm/Packages");
    let one = |path: &str, bytes: Vec<u8>| scan(&MemFs([(path.to_owned(), bytes)].into()));

    // Cut inside an overflow chain.
    let err = one("var/lib/rpm/Packages", bdb[..bdb.len() - 4096].to_vec()).unwrap_err();
    assert!(matches!(err, SbomError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("var/lib/rpm/Packages"), "{err}");
    // Shorter than its meta page, magic intact.
    let err = one("var/lib/rpm/Packages", bdb[..30].to_vec()).unwrap_err();
    assert!(
        err.to_string()
            .contains("shorter than its 4096-byte meta page"),
        "{err}"
    );
    // Not a Berkeley DB at all.
    let err = one("var/lib/rpm/Packages", real("deb/var/lib/dpkg/status")).unwrap_err();
    assert!(
        err.to_string().contains("not a Berkeley DB hash database"),
        "{err}"
    );
    // A truncated SQLite database.
    let sqlite = real("rpm-sqlite/var/lib/rpm/rpmdb.sqlite");
    let err = one(
        "var/lib/rpm/rpmdb.sqlite",
        sqlite[..sqlite.len() / 3].to_vec(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("var/lib/rpm/rpmdb.sqlite"),
        "{err}"
    );
    // A Packages view that would compute rows forever (written by SQLite itself).
    let dir = tempfile::tempdir().unwrap();
    let view = dir.path().join("view.sqlite");
    let made = Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute(\"CREATE VIEW Packages AS WITH RECURSIVE r(hnum, blob) AS (SELECT 1, x'00' UNION ALL SELECT hnum + 1, blob FROM r) SELECT * FROM r\"); c.commit()")
        .arg(&view)
        .status()
        .unwrap();
    assert!(made.success());
    let err = one("var/lib/rpm/rpmdb.sqlite", std::fs::read(&view).unwrap()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "corrupt package database var/lib/rpm/rpmdb.sqlite: no Packages table"
    );
    // dpkg's status with a paragraph cut before its Version.
    let status = String::from_utf8(real("deb/var/lib/dpkg/status")).unwrap();
    let hello = status.find("Package: hello-sbom").unwrap();
    let cut = hello + status[hello..].find("Version:").unwrap();
    let err = one("var/lib/dpkg/status", status.as_bytes()[..cut].to_vec()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "corrupt package database var/lib/dpkg/status: a paragraph without Package or Version"
    );
    // A database over its size bound.
    let mut big = MemFs(BTreeMap::new());
    big.0.insert(
        "var/lib/dpkg/status".into(),
        vec![b'a'; (nullspace_sbom::DB_LIMIT + 1) as usize],
    );
    let err = scan(&big).unwrap_err();
    assert!(
        matches!(err, SbomError::Fs(FsError::TooLarge { .. })),
        "{err}"
    );
}

#[test]
fn mutated_databases_never_panic() {
    // Deterministic mutations of the real databases: truncations and byte
    // changes. Each scan returns, Ok or a Corrupt/Sqlite error.
    let cases = [
        ("var/lib/rpm/Packages", real("rpm-bdb/var/lib/rpm/Packages")),
        (
            "var/lib/rpm/Packages",
            real("rpm-bdb-be/var/lib/rpm/Packages"),
        ),
        (
            "var/lib/rpm/rpmdb.sqlite",
            real("rpm-sqlite/var/lib/rpm/rpmdb.sqlite"),
        ),
        ("var/lib/dpkg/status", real("deb/var/lib/dpkg/status")),
        ("lib/apk/db/installed", real("apk/lib/apk/db/installed")),
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (path, bytes) in &cases {
        let rounds = if path.ends_with("sqlite") { 40 } else { 300 };
        for round in 0..rounds {
            let mut m = bytes.clone();
            if round % 3 == 0 {
                // Short cuts often: the first page holds the format's header.
                let bound = if round % 2 == 0 {
                    64.min(m.len())
                } else {
                    m.len()
                };
                m.truncate((next() as usize) % bound);
            } else {
                for _ in 0..1 + round % 8 {
                    let i = (next() as usize) % m.len();
                    m[i] = next() as u8;
                }
            }
            let fs = MemFs([(path.to_string(), m)].into());
            match scan(&fs) {
                Ok(_) | Err(SbomError::Corrupt { .. }) | Err(SbomError::Sqlite { .. }) => {}
                Err(e) => panic!("{path} round {round}: unexpected {e}"),
            }
        }
    }
}

#[test]
fn symlinks_resolve_inside_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("var/lib/dpkg")).unwrap();
    // On the host this would be the host's passwd; inside the root it is absent.
    std::os::unix::fs::symlink("/../../../etc/passwd", root.join("var/lib/dpkg/status")).unwrap();
    assert!(Path::new("/etc/passwd").exists());
    let inv = scan(&HostDir::new(root)).unwrap();
    assert!(inv.packages.is_empty());
    // A link within the root is followed: lib -> usr/lib, as merged-/usr systems have.
    std::fs::create_dir_all(root.join("usr/lib/apk/db")).unwrap();
    std::fs::copy(
        roots().join("apk/lib/apk/db/installed"),
        root.join("usr/lib/apk/db/installed"),
    )
    .unwrap();
    std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
    assert_eq!(listed(&scan(&HostDir::new(root)).unwrap()), expected("apk"));
    // A loop is an error, not a hang.
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::os::unix::fs::symlink("os-release", root.join("etc/os-release")).unwrap();
    let err = scan(&HostDir::new(root)).unwrap_err();
    assert!(err.to_string().contains("etc/os-release"), "{err}");
}

#[test]
fn licences_are_spdx_expressions_only_when_exactly_so() {
    let info = DocumentInfo {
        name: "t".into(),
        created: None,
    };
    let spdx_of = |root: &str, name: &str| -> serde_json::Value {
        let doc: serde_json::Value =
            serde_json::from_slice(&render(&scan_root(root), Format::SpdxJson, &info)).unwrap();
        doc["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()
            .clone()
    };
    let p = spdx_of("alpm", "hello-alpm");
    assert_eq!(p["licenseDeclared"], "GPL-2.0-or-later AND MIT");
    assert!(p.get("licenseComments").is_none());
    let p = spdx_of("deb", "libfix++1");
    assert_eq!(p["licenseDeclared"], "(Apache-2.0 OR MIT) AND MIT");
    assert_eq!(
        p["licenseComments"],
        "recorded licence: (Apache-2.0 or MIT) AND MIT"
    );
    // Debian's "GPL-2+" and rpm's "GPLv2+ and BSD" name no exact SPDX licence.
    let p = spdx_of("deb", "hello-sbom");
    assert_eq!(p["licenseDeclared"], "NOASSERTION");
    assert_eq!(p["licenseComments"], "recorded licence: GPL-2+ AND MIT");
    let p = spdx_of("rpm-sqlite", "rpm-epoch");
    assert_eq!(p["licenseDeclared"], "NOASSERTION");

    let cdx: serde_json::Value =
        serde_json::from_slice(&render(&scan_root("rpm-bdb"), Format::CycloneDxJson, &info))
            .unwrap();
    let licences = |name: &str| {
        cdx["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()["licenses"]
            .clone()
    };
    assert_eq!(
        licences("rpm-large"),
        serde_json::json!([{ "expression": "Apache-2.0" }])
    );
    assert_eq!(
        licences("rpm-epoch"),
        serde_json::json!([{ "license": { "name": "GPLv2+ and BSD" } }])
    );
}
