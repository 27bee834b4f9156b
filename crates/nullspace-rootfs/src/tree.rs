//! Phase B: flatten the layers' entry lists into one in-memory tree with
//! OCI layer semantics. Nothing here touches the host filesystem: symlinks
//! are resolved inside the tree, chroot-style.

use std::collections::BTreeMap;

use crate::decode::{EntryKind, EntryMeta, EntryRec, LayerIndex};
use crate::error::{EntryRule, Error};
use crate::path::split_last;

pub(crate) type NodeId = u32;
pub(crate) const ROOT: NodeId = 0;
/// Same bound as Linux's MAXSYMLINKS.
const MAX_SYMLINKS: u32 = 40;

#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, u32),
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Meta {
    fn default_dir(mode: u32, epoch: i64) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime: (epoch, 0),
            xattrs: Vec::new(),
        }
    }
    fn from_entry(m: &EntryMeta) -> Meta {
        Meta {
            mode: m.mode,
            uid: m.uid,
            gid: m.gid,
            mtime: m.mtime,
            xattrs: m.xattrs.clone(),
        }
    }
}

#[derive(Debug)]
pub(crate) enum Kind {
    /// Children by name; BTreeMap so every walk is in byte order.
    Dir(BTreeMap<String, NodeId>),
    File {
        offset: u64,
        size: u64,
    },
    Symlink(String),
}

#[derive(Debug)]
pub(crate) struct Node {
    pub kind: Kind,
    pub meta: Meta,
    /// Index of the layer that created the node (for error messages and
    /// to locate file data).
    pub layer: u32,
}

/// The flattened namespace. Nodes are an arena; a node is live iff it is
/// reachable from the root, and hard links are simply two directory
/// entries naming the same node. Replaced or deleted nodes are left
/// unreachable rather than freed.
#[derive(Debug)]
pub(crate) struct Tree {
    pub nodes: Vec<Node>,
    epoch: i64,
}

impl Tree {
    pub fn new(epoch: i64) -> Tree {
        Tree {
            nodes: vec![Node {
                kind: Kind::Dir(BTreeMap::new()),
                meta: Meta::default_dir(0o755, epoch),
                layer: 0,
            }],
            epoch,
        }
    }

    fn push(&mut self, kind: Kind, meta: Meta, layer: u32) -> NodeId {
        self.nodes.push(Node { kind, meta, layer });
        (self.nodes.len() - 1) as NodeId
    }

    fn children(&self, dir: NodeId) -> Option<&BTreeMap<String, NodeId>> {
        match &self.nodes[dir as usize].kind {
            Kind::Dir(c) => Some(c),
            _ => None,
        }
    }

    fn children_mut(&mut self, dir: NodeId) -> &mut BTreeMap<String, NodeId> {
        match &mut self.nodes[dir as usize].kind {
            Kind::Dir(c) => c,
            // Callers only pass ids produced by `resolve_dir`.
            _ => unreachable!("children_mut on a non-directory"),
        }
    }

    pub fn lookup(&self, dir: NodeId, name: &str) -> Option<NodeId> {
        self.children(dir).and_then(|c| c.get(name).copied())
    }

    /// Resolve `path` (normalized) as a directory, following symlinks in
    /// every component chroot-style: absolute targets restart at the
    /// root, `..` never climbs above the root, at most 40 links. Missing
    /// components are created as default directories when `create`,
    /// otherwise the result is `None`. A non-directory component is an
    /// error when creating and `None` otherwise.
    fn resolve_dir(
        &mut self,
        path: &str,
        create: bool,
        layer: u32,
    ) -> Result<Option<NodeId>, EntryRule> {
        // Remaining components, consumed from the back.
        let mut todo: Vec<String> = path
            .split('/')
            .filter(|c| !c.is_empty())
            .rev()
            .map(str::to_owned)
            .collect();
        let mut stack: Vec<NodeId> = vec![ROOT];
        let mut links = 0u32;
        while let Some(comp) = todo.pop() {
            let cur = *stack.last().unwrap_or(&ROOT);
            match comp.as_str() {
                "." => continue,
                ".." => {
                    if stack.len() > 1 {
                        stack.pop();
                    }
                    continue;
                }
                _ => {}
            }
            match self.lookup(cur, &comp) {
                None => {
                    if !create {
                        return Ok(None);
                    }
                    let id = self.push(
                        Kind::Dir(BTreeMap::new()),
                        Meta::default_dir(0o755, self.epoch),
                        layer,
                    );
                    self.children_mut(cur).insert(comp, id);
                    stack.push(id);
                }
                Some(id) => match &self.nodes[id as usize].kind {
                    Kind::Dir(_) => stack.push(id),
                    Kind::Symlink(target) => {
                        links += 1;
                        if links > MAX_SYMLINKS {
                            return Err(EntryRule::SymlinkLoop);
                        }
                        if target.starts_with('/') {
                            stack.truncate(1);
                        }
                        todo.extend(
                            target
                                .split('/')
                                .filter(|c| !c.is_empty())
                                .rev()
                                .map(str::to_owned),
                        );
                    }
                    Kind::File { .. } => {
                        if !create {
                            return Ok(None);
                        }
                        return Err(EntryRule::ParentNotDir(comp));
                    }
                },
            }
        }
        Ok(Some(*stack.last().unwrap_or(&ROOT)))
    }

    /// Apply one layer: its whiteouts first (so they only ever hit lower
    /// layers), then its other entries in archive order.
    pub fn apply_layer(&mut self, layer: u32, name: &str, index: &LayerIndex) -> Result<(), Error> {
        for e in &index.entries {
            match e.kind {
                EntryKind::Whiteout | EntryKind::Opaque => self
                    .apply_whiteout(e, layer)
                    .map_err(|r| Error::entry(name, &e.path, r))?,
                _ => {}
            }
        }
        for e in &index.entries {
            match e.kind {
                EntryKind::Whiteout | EntryKind::Opaque => {}
                _ => self
                    .apply_entry(e, layer)
                    .map_err(|r| Error::entry(name, &e.path, r))?,
            }
        }
        Ok(())
    }

    fn apply_whiteout(&mut self, e: &EntryRec, layer: u32) -> Result<(), EntryRule> {
        match e.kind {
            EntryKind::Opaque => {
                if let Some(dir) = self.resolve_dir(&e.path, false, layer)? {
                    self.children_mut(dir).clear();
                }
            }
            _ => {
                let (parent, name) = split_last(&e.path).ok_or(EntryRule::BadWhiteout)?;
                if let Some(dir) = self.resolve_dir(parent, false, layer)? {
                    self.children_mut(dir).remove(name);
                }
            }
        }
        Ok(())
    }

    fn apply_entry(&mut self, e: &EntryRec, layer: u32) -> Result<(), EntryRule> {
        let Some((parent, name)) = split_last(&e.path) else {
            // The root itself: only a directory entry may describe it.
            return match e.kind {
                EntryKind::Dir => {
                    self.nodes[ROOT as usize].meta = Meta::from_entry(&e.meta);
                    Ok(())
                }
                _ => Err(EntryRule::RootNotDir),
            };
        };
        // Hard link targets are resolved before the parent is created so
        // a missing target leaves no trace.
        let link_target = match &e.kind {
            EntryKind::Hardlink { target } => Some(self.resolve_link_target(target, layer)?),
            _ => None,
        };
        let dir = self
            .resolve_dir(parent, true, layer)?
            .ok_or_else(|| EntryRule::ParentNotDir(parent.to_owned()))?;
        let existing = self.lookup(dir, name);
        let new_id = match &e.kind {
            EntryKind::Dir => {
                if let Some(id) = existing
                    && matches!(self.nodes[id as usize].kind, Kind::Dir(_))
                {
                    // Directory over directory: children stay, metadata
                    // (including xattrs) is the upper entry's.
                    self.nodes[id as usize].meta = Meta::from_entry(&e.meta);
                    return Ok(());
                }
                self.push(Kind::Dir(BTreeMap::new()), Meta::from_entry(&e.meta), layer)
            }
            EntryKind::File { offset, size } => self.push(
                Kind::File {
                    offset: *offset,
                    size: *size,
                },
                Meta::from_entry(&e.meta),
                layer,
            ),
            EntryKind::Symlink { target } => self.push(
                Kind::Symlink(target.clone()),
                Meta::from_entry(&e.meta),
                layer,
            ),
            EntryKind::Hardlink { .. } => match link_target {
                Some(id) => id,
                None => unreachable!("hard link target resolved above"),
            },
            EntryKind::Whiteout | EntryKind::Opaque => return Ok(()),
        };
        // Whatever was there (file, symlink, whole directory subtree) is
        // replaced; the final component is never followed.
        self.children_mut(dir).insert(name.to_owned(), new_id);
        Ok(())
    }

    /// A hard link target must exist in the current state (this layer or
    /// below) and be a regular file or a symlink; its parent components
    /// resolve like any other path, the final component is not followed.
    fn resolve_link_target(&mut self, target: &str, layer: u32) -> Result<NodeId, EntryRule> {
        let Some((parent, name)) = split_last(target) else {
            return Err(EntryRule::HardlinkToDir(target.to_owned()));
        };
        let missing = || EntryRule::HardlinkMissing(target.to_owned());
        let dir = self
            .resolve_dir(parent, false, layer)?
            .ok_or_else(missing)?;
        let id = self.lookup(dir, name).ok_or_else(missing)?;
        match self.nodes[id as usize].kind {
            Kind::Dir(_) => Err(EntryRule::HardlinkToDir(target.to_owned())),
            _ => Ok(id),
        }
    }

    /// Ensure the runtime mount points. dev/proc/sys (and dev/pts,
    /// dev/shm) must be directories — anything else the image put there
    /// is replaced. run and tmp are created if absent but an image's own
    /// version (e.g. `run -> /var/run`) is kept.
    pub fn ensure_mount_points(&mut self) {
        let epoch = self.epoch;
        let force_dir = |t: &mut Tree, parent: NodeId, name: &str, mode: u32| -> NodeId {
            if let Some(id) = t.lookup(parent, name)
                && matches!(t.nodes[id as usize].kind, Kind::Dir(_))
            {
                return id;
            }
            let id = t.push(
                Kind::Dir(BTreeMap::new()),
                Meta::default_dir(mode, epoch),
                0,
            );
            t.children_mut(parent).insert(name.to_owned(), id);
            id
        };
        let dev = force_dir(self, ROOT, "dev", 0o755);
        force_dir(self, dev, "pts", 0o755);
        force_dir(self, dev, "shm", 0o1777);
        force_dir(self, ROOT, "proc", 0o555);
        force_dir(self, ROOT, "sys", 0o555);
        for (name, mode) in [("run", 0o755), ("tmp", 0o1777)] {
            if self.lookup(ROOT, name).is_none() {
                let id = self.push(
                    Kind::Dir(BTreeMap::new()),
                    Meta::default_dir(mode, epoch),
                    0,
                );
                self.children_mut(ROOT).insert(name.to_owned(), id);
            }
        }
    }

    /// `/lost+found` belongs to the filesystem (mkext4 always creates it).
    /// An empty directory of that name in the image is dropped; anything
    /// else would be lost or clash, so it is an error.
    pub fn take_lost_found(&mut self, layer_names: &[&str]) -> Result<(), Error> {
        let Some(id) = self.lookup(ROOT, "lost+found") else {
            return Ok(());
        };
        let node = &self.nodes[id as usize];
        match &node.kind {
            Kind::Dir(c) if c.is_empty() => {
                self.children_mut(ROOT).remove("lost+found");
                Ok(())
            }
            _ => Err(Error::entry(
                layer_names.get(node.layer as usize).copied().unwrap_or("?"),
                "lost+found",
                EntryRule::ReservedLostFound,
            )),
        }
    }
}
