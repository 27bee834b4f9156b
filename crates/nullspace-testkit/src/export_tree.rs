//! The export tests' tree comparison: a root filesystem as one record per
//! path (type, mode, owner, size, content sha256, symlink target, device
//! numbers, hard-link group, xattrs), read either from an ext4 image with
//! `nullspace_rootfs::ext4_read` (what the export reads) or from a
//! directory (`umoci unpack`'s rootfs). Times are left out: the export
//! sets them all to one fixed value.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use nullspace_rootfs::ext4_read::{Ext4Image, NodeKind, ReadLimits};
use sha2::{Digest as _, Sha256};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    /// `d`, `f`, `l`, `c`, `b`, `p`.
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub sha256: Option<String>,
    pub target: Option<String>,
    pub rdev: Option<(u32, u32)>,
    /// The byte-smallest path of the entry's names, when it has several.
    pub link_group: Option<String>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

pub type Tree = BTreeMap<String, Rec>;

fn groups(tree: &mut Tree, by_inode: HashMap<u64, Vec<String>>) {
    for mut paths in by_inode.into_values() {
        if paths.len() < 2 {
            continue;
        }
        paths.sort();
        for p in &paths {
            if let Some(r) = tree.get_mut(p) {
                r.link_group = Some(paths[0].clone());
            }
        }
    }
}

/// The tree of an ext4 image (the root itself and `lost+found` left out).
pub fn from_image(image: &Path, scratch: &Path) -> anyhow::Result<Tree> {
    let img = Ext4Image::open(image, scratch)?;
    let mut tree = Tree::new();
    let mut by_inode: HashMap<u64, Vec<String>> = HashMap::new();
    let nodes = img.walk(&ReadLimits::default())?;
    let kinds: HashMap<u32, NodeKind> = nodes
        .iter()
        .filter(|n| !matches!(n.kind, NodeKind::HardLink { .. }))
        .map(|n| (n.inode, n.kind.clone()))
        .collect();
    for n in &nodes {
        if n.path.is_empty() {
            continue;
        }
        let kind = match &n.kind {
            NodeKind::HardLink { .. } => kinds.get(&n.inode).cloned().unwrap_or(NodeKind::Fifo),
            k => k.clone(),
        };
        let mut rec = Rec {
            kind: 'p',
            mode: n.mode,
            uid: n.uid,
            gid: n.gid,
            size: 0,
            sha256: None,
            target: None,
            rdev: None,
            link_group: None,
            xattrs: n.xattrs.clone(),
        };
        match kind {
            NodeKind::Dir => rec.kind = 'd',
            NodeKind::File { size } => {
                rec.kind = 'f';
                rec.size = size;
                let mut r = img.open_inode(&n.path, n.inode)?;
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let k = r.read(&mut buf)?;
                    if k == 0 {
                        break;
                    }
                    h.update(&buf[..k]);
                }
                rec.sha256 = Some(hex::encode(h.finalize()));
            }
            NodeKind::Symlink { target } => {
                rec.kind = 'l';
                rec.size = target.len() as u64;
                rec.target = Some(target);
            }
            NodeKind::CharDevice { major, minor } => {
                rec.kind = 'c';
                rec.rdev = Some((major, minor));
            }
            NodeKind::BlockDevice { major, minor } => {
                rec.kind = 'b';
                rec.rdev = Some((major, minor));
            }
            NodeKind::Fifo => rec.kind = 'p',
            // Not exported (tar has no sockets).
            NodeKind::Socket | NodeKind::HardLink { .. } => continue,
        }
        by_inode
            .entry(u64::from(n.inode))
            .or_default()
            .push(n.path.clone());
        tree.insert(n.path.clone(), rec);
    }
    groups(&mut tree, by_inode);
    Ok(tree)
}

/// The tree of a host directory (symlinks not followed).
pub fn from_dir(root: &Path) -> anyhow::Result<Tree> {
    let mut tree = Tree::new();
    let mut by_inode: HashMap<u64, Vec<String>> = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for ent in std::fs::read_dir(&dir)? {
            let ent = ent?;
            let name = ent.file_name().to_string_lossy().into_owned();
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let md = std::fs::symlink_metadata(ent.path())?;
            let ft = md.file_type();
            let mut rec = Rec {
                kind: 'p',
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                size: 0,
                sha256: None,
                target: None,
                rdev: None,
                link_group: None,
                xattrs: xattrs(&ent.path())?,
            };
            if ft.is_dir() {
                rec.kind = 'd';
                stack.push((ent.path(), path.clone()));
            } else if ft.is_file() {
                rec.kind = 'f';
                rec.size = md.len();
                let mut f = std::fs::File::open(ent.path())?;
                let mut h = Sha256::new();
                std::io::copy(&mut f, &mut h)?;
                rec.sha256 = Some(hex::encode(h.finalize()));
                by_inode.entry(md.ino()).or_default().push(path.clone());
            } else if ft.is_symlink() {
                rec.kind = 'l';
                let t = std::fs::read_link(ent.path())?;
                let t = t.to_string_lossy().into_owned();
                rec.size = t.len() as u64;
                rec.target = Some(t);
                by_inode.entry(md.ino()).or_default().push(path.clone());
            } else if ft.is_char_device() || ft.is_block_device() {
                rec.kind = if ft.is_char_device() { 'c' } else { 'b' };
                let dev = rustix::fs::Dev::from(md.rdev());
                rec.rdev = Some((rustix::fs::major(dev), rustix::fs::minor(dev)));
            }
            tree.insert(path, rec);
        }
    }
    groups(&mut tree, by_inode);
    Ok(tree)
}

fn xattrs(p: &Path) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut names = vec![0u8; 64 << 10];
    let n = rustix::fs::llistxattr(p, &mut names)?;
    let mut out = BTreeMap::new();
    for name in names[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let mut value = vec![0u8; 64 << 10];
        let k = rustix::fs::lgetxattr(p, name.as_str(), &mut value)?;
        value.truncate(k);
        out.insert(name, value);
    }
    Ok(out)
}

/// Differences, one line each (empty when equal).
pub fn diff(left: &Tree, right: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    for (p, l) in left {
        match right.get(p) {
            None => out.push(format!("{p}: only in the first tree ({})", l.kind)),
            Some(r) if r != l => out.push(format!("{p}: {l:?} != {r:?}")),
            _ => {}
        }
    }
    for p in right.keys() {
        if !left.contains_key(p) {
            out.push(format!("{p}: only in the second tree"));
        }
    }
    out
}
