//! apk: `lib/apk/db/installed`, the text database of Alpine's package
//! manager (one `K:value` line per field, a blank line between packages).

use crate::package::{Ecosystem, Package, PurlParts};
use crate::{DB_LIMIT, SbomError, Scan};

const INSTALLED: &str = "lib/apk/db/installed";

pub(crate) fn scan(scan: &mut Scan<'_>) -> Result<(), SbomError> {
    let Some(bytes) = scan.fs.read(INSTALLED, DB_LIMIT)? else {
        return Ok(());
    };
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| SbomError::corrupt(INSTALLED, format!("not UTF-8 text: {e}")))?;
    let mut record: Vec<(char, &str)> = Vec::new();
    for (n, line) in text.lines().chain(std::iter::once("")).enumerate() {
        if line.is_empty() {
            if !record.is_empty() {
                emit(scan, &record)?;
                record.clear();
            }
            continue;
        }
        let mut chars = line.chars();
        match (chars.next(), chars.next()) {
            (Some(key), Some(':')) => record.push((key, &line[key.len_utf8() + 1..])),
            _ => {
                return Err(SbomError::corrupt(
                    INSTALLED,
                    format!("line {}: not a `K:value` line", n + 1),
                ));
            }
        }
    }
    Ok(())
}

fn emit(scan: &mut Scan<'_>, record: &[(char, &str)]) -> Result<(), SbomError> {
    let field = |key: char| record.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let (Some(name), Some(version)) = (field('P'), field('V')) else {
        return Err(SbomError::corrupt(INSTALLED, "a package without P: or V:"));
    };
    let purl = PurlParts {
        ecosystem: Ecosystem::Apk,
        namespace: Some(scan.distro.unwrap_or("alpine")),
        name,
        version,
        qualifiers: &[("arch", field('A').unwrap_or(""))],
    }
    .render();
    scan.push(Package {
        ecosystem: Ecosystem::Apk,
        name: name.to_owned(),
        version: version.to_owned(),
        license: field('L').filter(|l| !l.is_empty()).map(str::to_owned),
        purl,
        source: INSTALLED.to_owned(),
    })
}
