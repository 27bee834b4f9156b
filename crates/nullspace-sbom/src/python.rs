//! Python: the core metadata (`METADATA`, RFC 822 headers) of an installed
//! distribution's `*.dist-info` directory.

use crate::package::{Ecosystem, Package, PurlParts};
use crate::{META_LIMIT, SbomError, Scan};

pub(crate) fn dist_info(scan: &mut Scan<'_>, dir: &str) -> Result<(), SbomError> {
    let path = format!("{dir}/METADATA");
    let bytes = match scan.fs.read(&path, META_LIMIT) {
        Ok(Some(b)) => b,
        // Not a database: a missing or oversized file is noted, not fatal.
        Ok(None) | Err(crate::FsError::TooLarge { .. }) => {
            scan.skipped.push(path);
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut name = None;
    let mut version = None;
    let mut license = None;
    let mut expression = None;
    // Headers end at the first blank line; the description follows.
    for line in text.lines().take_while(|l| !l.is_empty()) {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k.to_ascii_lowercase().as_str() {
            "name" => name = name.or(Some(v.to_owned())),
            "version" => version = version.or(Some(v.to_owned())),
            "license" if !v.is_empty() && !v.eq_ignore_ascii_case("UNKNOWN") => {
                license = license.or(Some(v.to_owned()))
            }
            "license-expression" if !v.is_empty() => expression = Some(v.to_owned()),
            _ => {}
        }
    }
    let (Some(name), Some(version)) = (name, version) else {
        scan.skipped.push(path);
        return Ok(());
    };
    // PEP 503 normalisation, as purl-spec asks for pypi names.
    let normal = normalise(&name);
    let purl = PurlParts {
        ecosystem: Ecosystem::Pypi,
        namespace: None,
        name: &normal,
        version: &version,
        qualifiers: &[],
    }
    .render();
    scan.push(Package {
        ecosystem: Ecosystem::Pypi,
        name,
        version,
        license: expression.or(license),
        purl,
        source: path,
    })
}

fn normalise(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        let c = if matches!(c, '_' | '.') {
            '-'
        } else {
            c.to_ascii_lowercase()
        };
        if !(c == '-' && out.ends_with('-')) {
            out.push(c);
        }
    }
    out
}
