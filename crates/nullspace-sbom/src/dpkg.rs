//! dpkg: `var/lib/dpkg/status` (and distroless `status.d/`), licences from
//! machine-readable `usr/share/doc/<package>/copyright` files.

use crate::package::{Ecosystem, Package, PurlParts};
use crate::{DB_LIMIT, META_LIMIT, SbomError, Scan, source::EntryKind};

const STATUS: &str = "var/lib/dpkg/status";
const STATUS_D: &str = "var/lib/dpkg/status.d";

pub(crate) fn scan(scan: &mut Scan<'_>) -> Result<(), SbomError> {
    let mut files = Vec::new();
    if let Some(bytes) = scan.fs.read(STATUS, DB_LIMIT)? {
        files.push((STATUS.to_owned(), bytes));
    }
    for entry in scan.fs.list(STATUS_D)?.unwrap_or_default() {
        // status.d holds one paragraph per package (plus .md5sums files).
        if entry.kind == EntryKind::File && !entry.name.contains('.') {
            let path = format!("{STATUS_D}/{}", entry.name);
            if let Some(bytes) = scan.fs.read(&path, META_LIMIT)? {
                files.push((path, bytes));
            }
        }
    }
    for (path, bytes) in files {
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| SbomError::corrupt(&path, format!("not UTF-8 text: {e}")))?;
        for para in paragraphs(text) {
            let para = para.map_err(|reason| SbomError::corrupt(&path, reason))?;
            let field = |name: &str| {
                para.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.trim())
            };
            // dpkg keeps removed-but-configured packages too: only "installed" counts.
            // status.d paragraphs have no Status field and are all installed.
            if let Some(status) = field("Status")
                && status.split_whitespace().nth(2) != Some("installed")
            {
                continue;
            }
            let (Some(name), Some(version)) = (field("Package"), field("Version")) else {
                return Err(SbomError::corrupt(
                    &path,
                    "a paragraph without Package or Version",
                ));
            };
            let arch = field("Architecture").unwrap_or("");
            let license = copyright_license(scan, name)?;
            let purl = PurlParts {
                ecosystem: Ecosystem::Deb,
                namespace: Some(scan.distro.unwrap_or("debian")),
                name,
                version,
                qualifiers: &[("arch", arch)],
            }
            .render();
            scan.push(Package {
                ecosystem: Ecosystem::Deb,
                name: name.to_owned(),
                version: version.to_owned(),
                license,
                purl,
                source: path.clone(),
            })?;
        }
    }
    Ok(())
}

/// deb822 paragraphs: `Field: value` lines, continuation lines starting
/// with a space or tab, paragraphs separated by blank lines.
pub(crate) fn paragraphs(text: &str) -> impl Iterator<Item = Result<Vec<(&str, String)>, String>> {
    let mut lines = text.lines().enumerate().peekable();
    std::iter::from_fn(move || {
        while lines.peek().is_some_and(|(_, l)| l.trim().is_empty()) {
            lines.next();
        }
        lines.peek()?;
        let mut fields: Vec<(&str, String)> = Vec::new();
        while let Some((n, line)) = lines.next_if(|(_, l)| !l.trim().is_empty()) {
            if line.starts_with([' ', '\t']) {
                match fields.last_mut() {
                    Some((_, v)) => {
                        v.push('\n');
                        v.push_str(line.trim());
                    }
                    None => return Some(Err(format!("line {}: a continuation line first", n + 1))),
                }
            } else if let Some((k, v)) = line.split_once(':') {
                fields.push((k.trim(), v.trim().to_owned()));
            } else if line.starts_with('#') {
                // Comments are allowed in copyright files.
            } else {
                return Some(Err(format!("line {}: not a `Field: value` line", n + 1)));
            }
        }
        Some(Ok(fields))
    })
}

/// The licences a DEP-5 copyright file names (`License:` short names,
/// sorted, joined with AND); `None` when the file is missing or free-form.
fn copyright_license(scan: &Scan<'_>, package: &str) -> Result<Option<String>, SbomError> {
    // Multi-arch packages may name the file `<package>:<arch>`; the doc
    // directory uses the bare name.
    let name = package.split(':').next().unwrap_or(package);
    if name.contains('/') || name == ".." {
        return Ok(None);
    }
    let path = format!("usr/share/doc/{name}/copyright");
    let bytes = match scan.fs.read(&path, META_LIMIT) {
        Ok(Some(b)) => b,
        // An oversized or missing copyright file only costs the licence.
        Ok(None) | Err(crate::FsError::TooLarge { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return Ok(None);
    };
    if !text
        .lines()
        .next()
        .is_some_and(|l| l.starts_with("Format:") && l.contains("copyright-format"))
    {
        return Ok(None);
    }
    let mut names = std::collections::BTreeSet::new();
    for para in paragraphs(text) {
        let Ok(para) = para else { return Ok(None) };
        // Only paragraphs that apply a licence to files (or the header's
        // overall licence); stand-alone `License:` paragraphs hold texts.
        let applies = para
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("Files") || k.eq_ignore_ascii_case("Format"));
        if !applies {
            continue;
        }
        for (k, v) in &para {
            if k.eq_ignore_ascii_case("License") {
                let short = v.lines().next().unwrap_or("").trim();
                if !short.is_empty() {
                    names.insert(short.to_owned());
                }
            }
        }
    }
    Ok(join_licenses(names))
}

/// Several licence names as one expression, parenthesised where compound.
pub(crate) fn join_licenses(names: impl IntoIterator<Item = String>) -> Option<String> {
    let names: Vec<String> = names.into_iter().filter(|n| !n.trim().is_empty()).collect();
    match names.len() {
        0 => None,
        1 => Some(names.into_iter().next().unwrap_or_default()),
        _ => Some(
            names
                .iter()
                .map(|n| {
                    if n.contains(' ') {
                        format!("({n})")
                    } else {
                        n.clone()
                    }
                })
                .collect::<Vec<_>>()
                .join(" AND "),
        ),
    }
}
