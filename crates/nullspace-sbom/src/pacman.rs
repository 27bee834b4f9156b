//! pacman: `var/lib/pacman/local/<name>-<version>/desc`, one directory per
//! installed package, `%FIELD%` headers followed by value lines.

use crate::package::{Ecosystem, Package, PurlParts};
use crate::source::EntryKind;
use crate::{META_LIMIT, SbomError, Scan};

const LOCAL: &str = "var/lib/pacman/local";

pub(crate) fn scan(scan: &mut Scan<'_>) -> Result<(), SbomError> {
    let Some(entries) = scan.fs.list(LOCAL)? else {
        return Ok(());
    };
    for entry in entries.iter().filter(|e| e.kind == EntryKind::Dir) {
        let path = format!("{LOCAL}/{}/desc", entry.name);
        let Some(bytes) = scan.fs.read(&path, META_LIMIT)? else {
            return Err(SbomError::corrupt(
                &path,
                "a package directory without desc",
            ));
        };
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| SbomError::corrupt(&path, format!("not UTF-8 text: {e}")))?;
        let fields = sections(text);
        let one = |k: &str| {
            fields
                .iter()
                .find(|(name, _)| *name == k)
                .and_then(|(_, v)| v.first().copied())
        };
        let (Some(name), Some(version)) = (one("NAME"), one("VERSION")) else {
            return Err(SbomError::corrupt(&path, "no %NAME% or %VERSION%"));
        };
        let license = fields
            .iter()
            .find(|(k, _)| *k == "LICENSE")
            .and_then(|(_, v)| crate::dpkg::join_licenses(v.iter().map(|s| s.to_string())));
        let purl = PurlParts {
            ecosystem: Ecosystem::Alpm,
            namespace: Some(scan.distro.unwrap_or("arch")),
            name,
            version,
            qualifiers: &[("arch", one("ARCH").unwrap_or(""))],
        }
        .render();
        scan.push(Package {
            ecosystem: Ecosystem::Alpm,
            name: name.to_owned(),
            version: version.to_owned(),
            license,
            purl,
            source: path.clone(),
        })?;
    }
    Ok(())
}

/// `%NAME%` headers, each followed by its value lines up to a blank line.
fn sections(text: &str) -> Vec<(&str, Vec<&str>)> {
    let mut out: Vec<(&str, Vec<&str>)> = Vec::new();
    let mut current: Option<usize> = None;
    for line in text.lines() {
        if line.is_empty() {
            current = None;
        } else if current.is_none()
            && line.len() > 2
            && line.starts_with('%')
            && line.ends_with('%')
        {
            out.push((&line[1..line.len() - 1], Vec::new()));
            current = Some(out.len() - 1);
        } else if let Some(i) = current {
            out[i].1.push(line);
        }
    }
    out
}
