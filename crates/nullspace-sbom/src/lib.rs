//! The packages installed in a root filesystem, and their SPDX 2.3 and
//! CycloneDX 1.5 JSON documents.
//!
//! Sources: dpkg, rpm (sqlite and BerkeleyDB), apk, pacman, Python
//! `*.dist-info` and npm `node_modules`. The root filesystem is read through
//! [`RootFs`] (a host directory: [`HostDir`]). Database contents are
//! hostile input: every read is size-bounded, every length checked, and a
//! database that breaks its format is an error naming its path.

mod apk;
mod cyclonedx;
mod dpkg;
mod error;
mod license;
mod npm;
mod package;
mod pacman;
mod python;
mod rpm;
mod source;
mod spdx;
mod walk;

pub use error::SbomError;
pub use package::{Ecosystem, Package};
pub use source::{Entry, EntryKind, FsError, HostDir, RootFs};

/// The largest package database read (dpkg status, rpm databases, apk's).
pub const DB_LIMIT: u64 = 256 << 20;
/// The largest per-package metadata file read (desc, METADATA, package.json, copyright).
pub const META_LIMIT: u64 = 1 << 20;
/// Packages listed before the scan refuses to go on.
pub const MAX_PACKAGES: usize = 1_000_000;

/// What a root filesystem holds: its packages sorted by ecosystem, name and
/// version (one per purl), and the metadata files that could not be read.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Inventory {
    pub packages: Vec<Package>,
    pub skipped: Vec<String>,
}

/// The state one scan carries through its sources.
pub(crate) struct Scan<'a> {
    fs: &'a dyn RootFs,
    /// os-release's ID, the purl namespace of OS packages.
    distro: Option<&'a str>,
    packages: Vec<Package>,
    skipped: Vec<String>,
}

impl Scan<'_> {
    fn push(&mut self, p: Package) -> Result<(), SbomError> {
        if self.packages.len() >= MAX_PACKAGES {
            return Err(SbomError::TooMany {
                what: "packages",
                limit: MAX_PACKAGES,
            });
        }
        self.packages.push(p);
        Ok(())
    }
}

/// Lists the packages of every source present in `fs`.
pub fn scan(fs: &dyn RootFs) -> Result<Inventory, SbomError> {
    let distro = os_release_id(fs)?;
    let mut scan = Scan {
        fs,
        distro: distro.as_deref(),
        packages: Vec::new(),
        skipped: Vec::new(),
    };
    dpkg::scan(&mut scan)?;
    rpm::scan(&mut scan)?;
    apk::scan(&mut scan)?;
    pacman::scan(&mut scan)?;
    walk::scan(&mut scan)?;
    let Scan {
        mut packages,
        mut skipped,
        ..
    } = scan;
    packages.sort();
    // The same package seen twice (two status.d copies, a venv twin) is one entry.
    packages.dedup_by(|a, b| a.purl == b.purl);
    skipped.sort();
    Ok(Inventory { packages, skipped })
}

/// `ID=` of os-release, when it is a plain lower-case word.
fn os_release_id(fs: &dyn RootFs) -> Result<Option<String>, SbomError> {
    for path in ["etc/os-release", "usr/lib/os-release"] {
        let bytes = match fs.read(path, META_LIMIT) {
            Ok(Some(b)) => b,
            Ok(None) | Err(FsError::TooLarge { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let text = String::from_utf8_lossy(&bytes);
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("ID=") {
                let v = v.trim().trim_matches(['"', '\'']);
                // os-release(5): ID is lower-case letters, digits, `.`, `_`
                // and `-` (the purl namespace; anything else is dropped).
                let plain = !v.is_empty()
                    && v.bytes()
                        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'));
                return Ok(plain.then(|| v.to_owned()));
            }
        }
    }
    Ok(None)
}

/// The two document formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    SpdxJson,
    CycloneDxJson,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "spdx-json" => Ok(Format::SpdxJson),
            "cyclonedx-json" => Ok(Format::CycloneDxJson),
            other => Err(format!(
                "SBOM format {other:?} is not one of spdx-json, cyclonedx-json"
            )),
        }
    }
}

/// What a document says about itself. Without `created` the document has
/// no time of its own (SPDX requires one: it gets the Unix epoch), so the
/// same inventory always gives the same bytes.
#[derive(Debug, Clone)]
pub struct DocumentInfo {
    /// What the SBOM describes (a template reference).
    pub name: String,
    /// RFC 3339 UTC time, `YYYY-MM-DDThh:mm:ssZ`.
    pub created: Option<String>,
}

/// The inventory as a JSON document, pretty-printed, ending in a newline.
pub fn render(inventory: &Inventory, format: Format, info: &DocumentInfo) -> Vec<u8> {
    let value = match format {
        Format::SpdxJson => spdx::document(inventory, info),
        Format::CycloneDxJson => cyclonedx::document(inventory, info),
    };
    // Serialising a serde_json::Value cannot fail.
    let mut out = serde_json::to_vec_pretty(&value).unwrap_or_default();
    out.push(b'\n');
    out
}
