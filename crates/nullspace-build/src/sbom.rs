//! A template's packages: its final disk (ext4) read through the SBOM
//! scanner's two-operation view of a root filesystem.

use std::path::Path;

use nullspace_rootfs::ext4_read::{DirItem, Ext4Image, Ext4ReadError};
use nullspace_sbom::{Entry, EntryKind, FsError, Inventory, RootFs, SbomError};

/// Why a template's packages could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum TemplateSbomError {
    #[error(transparent)]
    Disk(#[from] Ext4ReadError),
    #[error(transparent)]
    Scan(#[from] SbomError),
}

/// The packages installed on the ext4 image `disk` (a journal that needs
/// recovery is replayed on a copy in `scratch`; the image is not written).
pub fn disk_inventory(disk: &Path, scratch: &Path) -> Result<Inventory, TemplateSbomError> {
    let image = Ext4Image::open(disk, scratch)?;
    Ok(nullspace_sbom::scan(&Disk(&image))?)
}

struct Disk<'a>(&'a Ext4Image);

fn fs_error(path: &str, e: Ext4ReadError) -> FsError {
    match e {
        Ext4ReadError::TooLarge { limit, .. } => FsError::TooLarge {
            path: path.to_owned(),
            limit,
        },
        e => FsError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(e.to_string()),
        },
    }
}

impl RootFs for Disk<'_> {
    fn read(&self, path: &str, limit: u64) -> Result<Option<Vec<u8>>, FsError> {
        self.0
            .read_if_file(path, limit)
            .map_err(|e| fs_error(path, e))
    }

    fn list(&self, path: &str) -> Result<Option<Vec<Entry>>, FsError> {
        let items = self.0.list_if_dir(path).map_err(|e| fs_error(path, e))?;
        Ok(items.map(|v| v.into_iter().map(entry).collect()))
    }
}

fn entry(i: DirItem) -> Entry {
    let kind = if i.is_dir {
        EntryKind::Dir
    } else if i.is_symlink {
        EntryKind::Symlink
    } else {
        EntryKind::File
    };
    Entry { name: i.name, kind }
}
