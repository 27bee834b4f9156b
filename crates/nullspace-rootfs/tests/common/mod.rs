//! Shared helpers: decode crafted layers, build an image, check it with
//! e2fsck and read it back with mkext4's reader.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use mkext4::reader::Fs;
use mkext4::spec::inode::FileType;
use nullspace_rootfs::{
    Error, Limits, RootfsOptions, RootfsSummary, SpooledLayer, build_rootfs, decode_layer,
};

pub struct Built {
    pub dir: tempfile::TempDir,
    pub img: PathBuf,
    pub summary: RootfsSummary,
}

pub fn layer_name(i: usize) -> String {
    format!("sha256:{:064x}", i + 1)
}

/// Decode every blob into a spool in `dir`.
pub fn spool(dir: &Path, blobs: &[Vec<u8>], limits: &Limits) -> Result<Vec<SpooledLayer>, Error> {
    let mut out = Vec::new();
    for (i, blob) in blobs.iter().enumerate() {
        let name = layer_name(i);
        let tar_path = dir.join(format!("layer{i}.tar"));
        let mut f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tar_path)
            .unwrap();
        let index = decode_layer(
            &name,
            &blob[..],
            "application/vnd.oci.image.layer.v1.tar",
            &mut f,
            limits,
        )?;
        out.push(SpooledLayer {
            name,
            tar_path,
            index,
        });
    }
    Ok(out)
}

pub fn try_build_with(blobs: &[Vec<u8>], opts: &RootfsOptions) -> Result<Built, Error> {
    let dir = tempfile::tempdir().unwrap();
    let layers = spool(dir.path(), blobs, &opts.limits)?;
    let img = dir.path().join("rootfs.ext4");
    let summary = build_rootfs(&layers, opts, &img)?;
    fsck(&img);
    Ok(Built { dir, img, summary })
}

pub fn try_build(blobs: &[Vec<u8>]) -> Result<Built, Error> {
    try_build_with(blobs, &RootfsOptions::default())
}

pub fn build(blobs: &[Vec<u8>]) -> Built {
    match try_build(blobs) {
        Ok(b) => b,
        Err(e) => panic!("build failed: {e}"),
    }
}

/// Expect an error and return its message; also checks that no output
/// (or temp file) was left behind.
pub fn build_err(blobs: &[Vec<u8>]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let opts = RootfsOptions::default();
    let res = spool(dir.path(), blobs, &opts.limits)
        .and_then(|layers| build_rootfs(&layers, &opts, &dir.path().join("rootfs.ext4")));
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("rootfs.ext4"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "partial output left behind: {leftovers:?}"
    );
    match res {
        Ok(_) => panic!("build unexpectedly succeeded"),
        Err(e) => e.to_string(),
    }
}

pub fn fsck(img: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(img)
        .output()
        .expect("run e2fsck");
    assert!(
        out.status.success(),
        "e2fsck -fn failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn debugfs_stat(img: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat {path}"))
        .arg(img)
        .output()
        .expect("run debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub struct Img {
    pub fs: Fs<File>,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum T {
    File,
    Dir,
    Symlink,
    Other,
}

impl Img {
    pub fn open(b: &Built) -> Img {
        Img {
            fs: Fs::open(File::open(&b.img).unwrap()).unwrap(),
        }
    }
    pub fn ino(&self, path: &str) -> Option<u32> {
        self.fs.resolve(path).ok()
    }
    pub fn exists(&self, path: &str) -> bool {
        self.ino(path).is_some()
    }
    pub fn kind(&self, path: &str) -> T {
        let ino = self.ino(path).unwrap_or_else(|| panic!("{path} missing"));
        match self.fs.inode(ino).unwrap().file_type() {
            FileType::Regular => T::File,
            FileType::Dir => T::Dir,
            FileType::Symlink => T::Symlink,
            _ => T::Other,
        }
    }
    pub fn read(&self, path: &str) -> Vec<u8> {
        let ino = self.ino(path).unwrap_or_else(|| panic!("{path} missing"));
        self.fs.read_file(ino).unwrap()
    }
    pub fn link(&self, path: &str) -> String {
        let ino = self.ino(path).unwrap_or_else(|| panic!("{path} missing"));
        String::from_utf8(self.fs.symlink_target(ino).unwrap()).unwrap()
    }
    pub fn inode(&self, path: &str) -> mkext4::spec::Inode {
        let ino = self.ino(path).unwrap_or_else(|| panic!("{path} missing"));
        self.fs.inode(ino).unwrap()
    }
    pub fn mode(&self, path: &str) -> u16 {
        self.inode(path).mode & 0o7777
    }
    pub fn names(&self, path: &str) -> Vec<String> {
        let ino = self.ino(path).unwrap_or_else(|| panic!("{path} missing"));
        let mut v: Vec<String> = self
            .fs
            .read_dir(ino)
            .unwrap()
            .into_iter()
            .map(|e| String::from_utf8(e.name).unwrap())
            .filter(|n| n != "." && n != "..")
            .collect();
        v.sort();
        v
    }
    pub fn xattr(&self, path: &str, name: &str) -> Option<Vec<u8>> {
        let ino = self.ino(path).unwrap_or_else(|| panic!("{path} missing"));
        self.fs
            .xattrs(ino)
            .unwrap()
            .into_iter()
            .find(|x| x.full_name().as_deref() == Some(name.as_bytes()))
            .map(|x| x.value)
    }
}
