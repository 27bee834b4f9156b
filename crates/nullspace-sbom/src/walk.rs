//! One bounded walk of the whole tree that finds the language packages:
//! `*.dist-info` directories of Python site-packages, and npm's `node_modules`.

use crate::source::EntryKind;
use crate::{SbomError, Scan, npm, python};

/// Entries visited before the walk gives up (a hostile tree may be huge).
pub const WALK_LIMIT: usize = 5_000_000;
const MAX_DEPTH: usize = 48;
/// Pseudo filesystems a running system mounts; never package data.
const SKIP_TOP: &[&str] = &["proc", "sys", "dev", "run", "tmp"];

pub(crate) fn scan(scan: &mut Scan<'_>) -> Result<(), SbomError> {
    let mut visited = 0usize;
    let mut stack: Vec<(String, usize)> = vec![(String::new(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Some(entries) = scan.fs.list(&dir)? else {
            continue;
        };
        visited += entries.len();
        if visited > WALK_LIMIT {
            return Err(SbomError::TooMany {
                what: "directory entries",
                limit: WALK_LIMIT,
            });
        }
        let base = dir.rsplit('/').next().unwrap_or("");
        let site = base == "site-packages" || base == "dist-packages";
        for entry in entries.iter().filter(|e| e.kind == EntryKind::Dir) {
            let path = join(&dir, &entry.name);
            if depth == 0 && SKIP_TOP.contains(&entry.name.as_str()) {
                continue;
            }
            if site && entry.name.ends_with(".dist-info") {
                python::dist_info(scan, &path)?;
                continue;
            }
            if base == "node_modules" {
                if let Some(scope) = entry.name.strip_prefix('@') {
                    // Scoped packages live one level down: node_modules/@scope/name.
                    for inner in scan.fs.list(&path)?.unwrap_or_default() {
                        if inner.kind == EntryKind::Dir {
                            let pkg = join(&path, &inner.name);
                            npm::package(scan, &pkg, Some(scope))?;
                            push(&mut stack, pkg, depth + 2);
                        }
                    }
                    continue;
                }
                npm::package(scan, &path, None)?;
            }
            push(&mut stack, path, depth + 1);
        }
    }
    Ok(())
}

fn push(stack: &mut Vec<(String, usize)>, path: String, depth: usize) {
    if depth < MAX_DEPTH {
        stack.push((path, depth));
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}
