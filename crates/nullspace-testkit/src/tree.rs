//! A filesystem tree as comparable data: one record per path with type,
//! mode, owner, size, content hash, symlink target and hard-link group.
//! Built from an ext4 image (read with mkext4's reader, no mount) or from a
//! directory (e.g. `umoci unpack`'s rootfs), so the two can be compared
//! entry by entry.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::{Digest as _, Sha256};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `d`, `f`, `l`, or `?` for anything else.
    pub kind: char,
    /// Permission bits including setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Files: content length; symlinks: target length; dirs: 0.
    pub size: u64,
    /// sha256 of file content.
    pub hash: Option<String>,
    pub target: Option<String>,
    /// For files with more than one name: the smallest path of the group.
    pub link_group: Option<String>,
}

pub type Tree = BTreeMap<String, Entry>;

fn hash(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn assign_groups(tree: &mut Tree, inodes: HashMap<u64, Vec<String>>) {
    for (_, mut paths) in inodes {
        if paths.len() < 2 {
            continue;
        }
        paths.sort();
        let first = paths[0].clone();
        for p in paths {
            if let Some(e) = tree.get_mut(&p) {
                e.link_group = Some(first.clone());
            }
        }
    }
}

/// Reads a tree from a directory on the host (not following symlinks).
pub fn from_dir(root: &Path) -> std::io::Result<Tree> {
    let mut tree = Tree::new();
    let mut inodes: HashMap<u64, Vec<String>> = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for ent in std::fs::read_dir(&dir)? {
            let ent = ent?;
            let name = ent.file_name().to_string_lossy().into_owned();
            let path = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let md = std::fs::symlink_metadata(ent.path())?;
            let ft = md.file_type();
            let (kind, size, h, target) = if ft.is_dir() {
                stack.push((ent.path(), path.clone()));
                ('d', 0, None, None)
            } else if ft.is_symlink() {
                let t = std::fs::read_link(ent.path())?
                    .to_string_lossy()
                    .into_owned();
                ('l', t.len() as u64, None, Some(t))
            } else if ft.is_file() {
                if md.nlink() > 1 {
                    inodes.entry(md.ino()).or_default().push(path.clone());
                }
                ('f', md.len(), Some(hash(&std::fs::read(ent.path())?)), None)
            } else {
                ('?', 0, None, None)
            };
            tree.insert(
                path,
                Entry {
                    kind,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    size,
                    hash: h,
                    target,
                    link_group: None,
                },
            );
        }
    }
    assign_groups(&mut tree, inodes);
    Ok(tree)
}

/// Reads a tree from an ext4 image file.
pub fn from_ext4(image: &Path) -> anyhow::Result<Tree> {
    let file = std::fs::File::open(image)?;
    let fs = mkext4::reader::Fs::open(file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let err = |e: mkext4::Error| anyhow::anyhow!("{e}");
    let mut tree = Tree::new();
    let mut inodes: HashMap<u64, Vec<String>> = HashMap::new();
    let mut stack = vec![(2u32, String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for de in fs.read_dir(dir).map_err(err)? {
            let name = String::from_utf8_lossy(&de.name).into_owned();
            if name == "." || name == ".." {
                continue;
            }
            let path = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let ino = fs.inode(de.inode).map_err(err)?;
            let fmt = ino.mode & 0o170000;
            let (kind, size, h, target) = match fmt {
                0o040000 => {
                    stack.push((de.inode, path.clone()));
                    ('d', 0, None, None)
                }
                0o120000 => {
                    let t = String::from_utf8_lossy(&fs.symlink_target(de.inode).map_err(err)?)
                        .into_owned();
                    ('l', t.len() as u64, None, Some(t))
                }
                0o100000 => {
                    if ino.links_count > 1 {
                        inodes
                            .entry(de.inode as u64)
                            .or_default()
                            .push(path.clone());
                    }
                    let data = fs.read_file(de.inode).map_err(err)?;
                    ('f', data.len() as u64, Some(hash(&data)), None)
                }
                _ => ('?', 0, None, None),
            };
            tree.insert(
                path,
                Entry {
                    kind,
                    mode: (ino.mode & 0o7777) as u32,
                    uid: ino.uid,
                    gid: ino.gid,
                    size,
                    hash: h,
                    target,
                    link_group: None,
                },
            );
        }
    }
    assign_groups(&mut tree, inodes);
    Ok(tree)
}

/// Paths nullspace adds on purpose (guest mount points, ext4's
/// lost+found): allowed in `ours` only, as empty directories.
pub const ADDED_BY_IMPORT: &[&str] = &[
    "lost+found",
    "dev",
    "dev/pts",
    "dev/shm",
    "proc",
    "sys",
    "run",
    "tmp",
];

/// Differences between two trees, one line each (empty when they agree).
pub fn diff(ours: &Tree, reference: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    for (p, e) in ours {
        match reference.get(p) {
            None if ADDED_BY_IMPORT.contains(&p.as_str()) && e.kind == 'd' => {}
            None => out.push(format!("only in ours: {p} {e:?}")),
            Some(r) if r != e => out.push(format!(
                "differs: {p}\n  ours:      {e:?}\n  reference: {r:?}"
            )),
            Some(_) => {}
        }
    }
    for (p, r) in reference {
        if !ours.contains_key(p) {
            out.push(format!("only in reference: {p} {r:?}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn diff_notices_every_compared_field() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::write(root.join("f"), b"one").unwrap();
        std::fs::hard_link(root.join("f"), root.join("g")).unwrap();
        std::os::unix::fs::symlink("f", root.join("l")).unwrap();
        let before = from_dir(root).unwrap();
        assert_eq!(before["g"].link_group.as_deref(), Some("f"));
        assert!(diff(&before, &before).is_empty());

        std::fs::set_permissions(root.join("f"), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            diff(&from_dir(root).unwrap(), &before).len(),
            2,
            "mode of both links"
        );
        std::fs::remove_file(root.join("g")).unwrap();
        std::fs::write(root.join("g"), b"one").unwrap();
        std::fs::set_permissions(root.join("f"), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(root.join("g"), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            !diff(&from_dir(root).unwrap(), &before).is_empty(),
            "hard-link grouping"
        );
        std::fs::remove_file(root.join("l")).unwrap();
        std::os::unix::fs::symlink("g", root.join("l")).unwrap();
        let d = diff(&from_dir(root).unwrap(), &before);
        assert!(d.iter().any(|l| l.contains("differs: l")), "{d:?}");
        std::fs::write(root.join("f"), b"two").unwrap();
        let d = diff(&from_dir(root).unwrap(), &before);
        assert!(d.iter().any(|l| l.contains("differs: f")), "{d:?}");
    }
}
