//! rpm: installed packages from either database rpm has used, sqlite
//! (rpm 4.16+) and BerkeleyDB (RHEL/CentOS 7-8), both storing header blobs.

mod bdb;
mod header;
mod sqlite;

use crate::package::{Ecosystem, Package, PurlParts};
use crate::{DB_LIMIT, SbomError, Scan};
use header::*;

const BDB_PATHS: &[&str] = &["var/lib/rpm/Packages", "usr/lib/sysimage/rpm/Packages"];

pub(crate) fn scan(scan: &mut Scan<'_>) -> Result<(), SbomError> {
    // One database per root: sqlite first, as rpm 4.16+ prefers it when both exist.
    for path in sqlite::PATHS {
        if let Some(bytes) = scan.fs.read(path, DB_LIMIT)? {
            for blob in sqlite::blobs(scan, path, bytes)? {
                package(scan, path, &blob)?;
            }
            return Ok(());
        }
    }
    for path in BDB_PATHS {
        if let Some(bytes) = scan.fs.read(path, DB_LIMIT)? {
            let distro = scan.distro;
            let mut found = Vec::new();
            bdb::values(path, &bytes, |blob| {
                found.push(read(distro, path, blob)?);
                Ok(())
            })?;
            for p in found.into_iter().flatten() {
                scan.push(p)?;
            }
            return Ok(());
        }
    }
    Ok(())
}

fn package(scan: &mut Scan<'_>, path: &str, blob: &[u8]) -> Result<(), SbomError> {
    match read(scan.distro, path, blob)? {
        Some(p) => scan.push(p),
        None => Ok(()),
    }
}

/// One header as a package; `None` for the gpg-pubkey pseudo-packages
/// (imported signing keys, not software).
fn read(distro: Option<&str>, path: &str, blob: &[u8]) -> Result<Option<Package>, SbomError> {
    let bad = |reason: String| SbomError::corrupt(path, reason);
    let h = Header::parse(blob).map_err(bad)?;
    let name = h
        .string(TAG_NAME)
        .map_err(bad)?
        .ok_or_else(|| bad("a header without a name".into()))?;
    if name == "gpg-pubkey" {
        return Ok(None);
    }
    let version = h
        .string(TAG_VERSION)
        .map_err(bad)?
        .ok_or_else(|| bad(format!("{name}: no version")))?;
    let release = h
        .string(TAG_RELEASE)
        .map_err(bad)?
        .ok_or_else(|| bad(format!("{name}: no release")))?;
    let epoch = h.int32(TAG_EPOCH).map_err(bad)?;
    let arch = h.string(TAG_ARCH).map_err(bad)?.unwrap_or_default();
    let license = h
        .string(TAG_LICENSE)
        .map_err(bad)?
        .filter(|l| !l.is_empty());
    let evr = format!("{version}-{release}");
    let epoch_text = epoch.map(|e| e.to_string()).unwrap_or_default();
    let purl = PurlParts {
        ecosystem: Ecosystem::Rpm,
        namespace: Some(distro.unwrap_or("redhat")),
        name: &name,
        version: &evr,
        qualifiers: &[("arch", &arch), ("epoch", &epoch_text)],
    }
    .render();
    Ok(Some(Package {
        ecosystem: Ecosystem::Rpm,
        version: match epoch {
            Some(e) => format!("{e}:{evr}"),
            None => evr,
        },
        name,
        license,
        purl,
        source: path.to_owned(),
    }))
}
