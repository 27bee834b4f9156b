//! The engine against a real file system standing in for the guest (a
//! host directory: the same operations the agent performs).

use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::publish::EntryKind;
use super::*;

/// Guest paths mapped under a host directory (relative ones under
/// `workspace/`).
struct HostDir(PathBuf);

impl HostDir {
    fn at(&self, p: &str) -> PathBuf {
        match p.strip_prefix('/') {
            Some(abs) => self.0.join(abs),
            None => self.0.join("workspace").join(p),
        }
    }
}

impl GuestFiles for HostDir {
    fn write_at(&self, path: &str, offset: u64, data: &[u8], mode: u32) -> std::io::Result<()> {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(offset == 0)
            .mode(mode)
            .open(self.at(path))?;
        f.seek(std::io::SeekFrom::Start(offset))?;
        f.write_all(data)
    }
    fn make_dir(&self, path: &str, mode: u32, parents: bool) -> std::io::Result<()> {
        let p = self.at(path);
        match std::fs::DirBuilder::new()
            .mode(mode)
            .recursive(parents)
            .create(&p)
        {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => Ok(()),
            r => r,
        }
    }
    fn chmod(&self, path: &str, mode: u32) -> std::io::Result<()> {
        std::fs::set_permissions(self.at(path), std::fs::Permissions::from_mode(mode))
    }
    fn symlink(&self, target: &str, path: &str) -> std::io::Result<()> {
        std::os::unix::fs::symlink(target, self.at(path))
    }
    fn rename(&self, from: &str, to: &str) -> std::io::Result<()> {
        std::fs::rename(self.at(from), self.at(to))
    }
    fn remove(&self, path: &str, recursive: bool) -> std::io::Result<()> {
        let p = self.at(path);
        // As the agent: a directory goes whole, or (not recursive) when empty.
        match (p.symlink_metadata()?.is_dir(), recursive) {
            (true, true) => std::fs::remove_dir_all(p),
            (true, false) => std::fs::remove_dir(p),
            (false, _) => std::fs::remove_file(p),
        }
    }
    fn kind(&self, path: &str) -> std::io::Result<Option<EntryKind>> {
        match self.at(path).symlink_metadata() {
            Ok(m) if m.is_dir() => Ok(Some(EntryKind::Dir)),
            Ok(m) if m.is_file() => Ok(Some(EntryKind::File)),
            Ok(m) if m.file_type().is_symlink() => Ok(Some(EntryKind::Symlink)),
            Ok(_) => Ok(Some(EntryKind::Other)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    spool: PathBuf,
    guest_root: PathBuf,
    up: Arc<Uploads>,
}

fn fixture(limits: Limits) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("uploads");
    let guest_root = tmp.path().join("guest");
    std::fs::create_dir_all(guest_root.join("workspace")).unwrap();
    let up = Arc::new(Uploads::open(&spool, limits).unwrap());
    Fixture {
        _tmp: tmp,
        spool,
        guest_root,
        up,
    }
}

impl Fixture {
    fn guest(&self) -> HostDir {
        HostDir(self.guest_root.clone())
    }
    fn spool_entries(&self) -> usize {
        std::fs::read_dir(&self.spool).unwrap().count()
    }
    /// Every path under the guest root, relative, sorted.
    fn guest_tree(&self) -> Vec<String> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
                if e.file_type().unwrap().is_dir() {
                    walk(base, &p, out);
                }
            }
        }
        let mut v = Vec::new();
        walk(&self.guest_root, &self.guest_root, &mut v);
        v.sort();
        v
    }
}

fn small() -> Limits {
    Limits {
        part_size: 1000,
        spool_reserve_bytes: 0,
        ..Limits::default()
    }
}

fn owner() -> Owner {
    Owner {
        namespace: "ns".into(),
        machine: "m-1".into(),
    }
}

fn new_upload(kind: Kind, target: &str, len: u64, whole: Option<String>) -> NewUpload {
    NewUpload {
        owner: owner(),
        kind,
        source_kind: "restartable_file".into(),
        target_path: target.into(),
        user: None,
        content_length: len,
        conflict: Conflict::Merge,
        whole_sha256: whole,
    }
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// A body stream in uneven frames.
fn body(b: &[u8]) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> + Unpin {
    let frames: Vec<Result<Vec<u8>, std::io::Error>> =
        b.chunks(333).map(|c| Ok(c.to_vec())).collect();
    futures_util::stream::iter(frames)
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

async fn put(
    f: &Fixture,
    id: &str,
    n: u32,
    content: &[u8],
    part_size: usize,
) -> Result<Info, UploadError> {
    let start = n as usize * part_size;
    let chunk = &content[start..(start + part_size).min(content.len())];
    f.up.put_part(&owner(), id, &n.to_string(), Some(&sha(chunk)), body(chunk))
        .await
}

#[tokio::test]
async fn parts_in_any_order_complete_into_the_file_with_its_sha256() {
    let f = fixture(small());
    let content = data(4321);
    let info =
        f.up.create(new_upload(Kind::File, "/workspace/dir/out.bin", 4321, None))
            .unwrap();
    assert_eq!((info.part_count, info.part_size), (5, 1000));
    assert_eq!(info.status, Status::Created);
    for n in [3, 0, 4] {
        put(&f, &info.id, n, &content, 1000).await.unwrap();
    }
    let st = f.up.status(&owner(), &info.id).unwrap();
    assert_eq!(st.received, vec![0, 3, 4]);
    assert_eq!(
        st.next_part,
        Some(1),
        "resume starts at the first missing part"
    );
    assert_eq!(st.accepted_bytes, 1000 + 1000 + 321);
    assert_eq!(st.status, Status::Uploading);
    // Completing with parts missing is refused and names the first.
    let e =
        f.up.complete(&owner(), &info.id, Some(&sha(&content)), f.guest())
            .await
            .unwrap_err();
    assert!(
        matches!(
            e,
            UploadError::MissingParts {
                count: 2,
                first: 1,
                ..
            }
        ),
        "{e}"
    );
    for n in [2, 1] {
        put(&f, &info.id, n, &content, 1000).await.unwrap();
    }
    assert_eq!(
        f.up.status(&owner(), &info.id).unwrap().status,
        Status::Staged
    );
    let done =
        f.up.complete(&owner(), &info.id, Some(&sha(&content)), f.guest())
            .await
            .unwrap();
    assert_eq!(done.status, Status::Completed);
    assert_eq!(
        done.published,
        Some(Published {
            bytes: 4321,
            files: 1
        })
    );
    let got = std::fs::read(f.guest_root.join("workspace/dir/out.bin")).unwrap();
    assert_eq!(sha(&got), sha(&content));
    // Only the file and its parent: no temporary left, spool gone.
    assert_eq!(
        f.guest_tree(),
        ["workspace", "workspace/dir", "workspace/dir/out.bin"]
    );
    assert_eq!(f.spool_entries(), 0);
    // A retried complete answers the same; a late part is refused.
    let again =
        f.up.complete(&owner(), &info.id, Some(&sha(&content)), f.guest())
            .await
            .unwrap();
    assert_eq!(again.status, Status::Completed);
    let e = put(&f, &info.id, 0, &content, 1000).await.unwrap_err();
    assert_eq!(e.reason(), Some(Reason::UploadAlreadyCompleted));
}

#[tokio::test]
async fn a_part_twice_is_idempotent_when_identical_and_refused_when_it_differs() {
    let f = fixture(small());
    let content = data(1500);
    let id =
        f.up.create(new_upload(Kind::File, "/x", 1500, None))
            .unwrap()
            .id;
    put(&f, &id, 1, &content, 1000).await.unwrap();
    let again = put(&f, &id, 1, &content, 1000).await.unwrap();
    assert_eq!(again.accepted_bytes, 500, "counted once");
    let other = vec![9u8; 500];
    let e =
        f.up.put_part(&owner(), &id, "1", None, body(&other))
            .await
            .unwrap_err();
    assert!(matches!(e, UploadError::PartDiffers { part: 1, .. }), "{e}");
    assert_eq!(e.reason(), Some(Reason::InvalidPartChecksum));
    // The kept part is the first one.
    let st = f.up.status(&owner(), &id).unwrap();
    assert_eq!(st.received, vec![1]);
    // Only committed parts in the spool: no temporaries left behind.
    let files: Vec<_> = std::fs::read_dir(f.spool.join(&id))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files, ["1"]);
}

#[tokio::test]
async fn bad_part_numbers_sizes_and_checksums_are_refused_clearly() {
    let f = fixture(small());
    let id =
        f.up.create(new_upload(Kind::File, "/x", 2500, None))
            .unwrap()
            .id;
    for raw in ["-1", "01", "x", "", "1.0", "4294967296", "99999999999"] {
        let e =
            f.up.put_part(&owner(), &id, raw, None, body(b""))
                .await
                .unwrap_err();
        assert!(matches!(e, UploadError::MalformedPart { .. }), "{raw}: {e}");
        assert!(e.to_string().contains("from 0 to 2"), "{e}");
    }
    let e =
        f.up.put_part(&owner(), &id, "3", None, body(&[0; 10]))
            .await
            .unwrap_err();
    assert!(
        matches!(
            e,
            UploadError::PartOutOfRange {
                part: 3,
                last: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("beyond the declared size"), "{e}");
    // Too long: cut off; too short; the last part's exact remainder.
    let e =
        f.up.put_part(&owner(), &id, "0", None, body(&[0; 1001]))
            .await
            .unwrap_err();
    assert!(
        e.to_string()
            .contains("must be 1000 bytes, got more than 1000"),
        "{e}"
    );
    let e =
        f.up.put_part(&owner(), &id, "2", None, body(&[0; 499]))
            .await
            .unwrap_err();
    assert!(
        e.to_string().contains("part 2 must be 500 bytes, got 499"),
        "{e}"
    );
    assert_eq!(e.reason(), Some(Reason::PartSizeMismatch));
    let e =
        f.up.put_part(&owner(), &id, "2", Some(&sha(b"other")), body(&[0; 500]))
            .await
            .unwrap_err();
    assert!(
        matches!(e, UploadError::PartChecksum { part: 2, .. }),
        "{e}"
    );
    // Nothing was accepted.
    let st = f.up.status(&owner(), &id).unwrap();
    assert!(st.received.is_empty());
    assert_eq!(std::fs::read_dir(f.spool.join(&id)).unwrap().count(), 0);
    // Another machine does not see the session.
    let other = Owner {
        namespace: "ns".into(),
        machine: "m-2".into(),
    };
    assert!(matches!(
        f.up.status(&other, &id),
        Err(UploadError::NotFound { .. })
    ));
}

#[tokio::test]
async fn a_wrong_whole_checksum_leaves_nothing_in_the_guest() {
    let f = fixture(small());
    let content = data(2000);
    let id =
        f.up.create(new_upload(Kind::File, "/workspace/f", 2000, None))
            .unwrap()
            .id;
    for n in 0..2 {
        put(&f, &id, n, &content, 1000).await.unwrap();
    }
    let e =
        f.up.complete(&owner(), &id, Some(&sha(b"not it")), f.guest())
            .await
            .unwrap_err();
    assert!(matches!(e, UploadError::WholeChecksum { .. }), "{e}");
    assert_eq!(f.guest_tree(), ["workspace"]);
    assert_eq!(f.up.status(&owner(), &id).unwrap().status, Status::Failed);
    assert_eq!(f.spool_entries(), 0, "a failed session's spool is removed");
}

#[tokio::test]
async fn checksum_given_at_creation_must_match_at_completion() {
    let f = fixture(small());
    let content = data(10);
    let id =
        f.up.create(new_upload(Kind::File, "f", 10, Some(sha(&content))))
            .unwrap()
            .id;
    put(&f, &id, 0, &content, 1000).await.unwrap();
    let e =
        f.up.begin_complete(&owner(), &id, Some(&sha(b"x")))
            .unwrap_err();
    assert!(matches!(e, UploadError::WholeChecksum { .. }), "{e}");
    // Without one at completion, the creation's is verified.
    f.up.complete(&owner(), &id, None, f.guest()).await.unwrap();
    assert_eq!(
        std::fs::read(f.guest_root.join("workspace/f")).unwrap(),
        content
    );
}

#[tokio::test]
async fn an_empty_file_has_one_empty_part() {
    let f = fixture(small());
    let info = f.up.create(new_upload(Kind::File, "/e", 0, None)).unwrap();
    assert_eq!(info.part_count, 1);
    f.up.put_part(&owner(), &info.id, "0", Some(&sha(b"")), body(b""))
        .await
        .unwrap();
    f.up.complete(&owner(), &info.id, Some(&sha(b"")), f.guest())
        .await
        .unwrap();
    assert_eq!(std::fs::read(f.guest_root.join("e")).unwrap(), b"");
}

#[tokio::test]
async fn sessions_expire_and_their_spool_is_removed() {
    let f = fixture(Limits {
        ttl: Duration::from_millis(200),
        ..small()
    });
    let content = data(1000);
    let id =
        f.up.create(new_upload(Kind::File, "/x", 1000, None))
            .unwrap()
            .id;
    put(&f, &id, 0, &content, 1000).await.unwrap();
    assert_eq!(f.spool_entries(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    f.up.sweep();
    assert_eq!(f.spool_entries(), 0);
    assert_eq!(f.up.status(&owner(), &id).unwrap().status, Status::Expired);
    let e = put(&f, &id, 0, &content, 1000).await.unwrap_err();
    assert_eq!(e.reason(), Some(Reason::UploadExpired));
    let e = f.up.begin_complete(&owner(), &id, None).unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");
}

#[tokio::test]
async fn limits_refuse_oversized_uploads_and_targets() {
    let f = fixture(Limits {
        max_upload_bytes: 10_000,
        machine_staging_quota_bytes: 15_000,
        ..small()
    });
    let e =
        f.up.create(new_upload(Kind::File, "/x", 10_001, None))
            .unwrap_err();
    assert_eq!(e.reason(), Some(Reason::SizeLimitExceeded));
    f.up.create(new_upload(Kind::File, "/x", 10_000, None))
        .unwrap();
    let e =
        f.up.create(new_upload(Kind::File, "/y", 6_000, None))
            .unwrap_err();
    assert!(matches!(e, UploadError::Quota { .. }), "{e}");
    for bad in ["", "/", "/a/../b", "a\0b", "/workspace/.nullspace/x"] {
        let e =
            f.up.create(new_upload(Kind::File, bad, 1, None))
                .unwrap_err();
        assert!(matches!(e, UploadError::Invalid(_)), "{bad:?}: {e}");
        assert!(
            e.to_string().contains("(as the machine's default user)"),
            "{e}"
        );
    }
    let e = normalize_target("/a/../b", Some("app")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "upload request: target path \"/a/../b\" (as user \"app\") contains '..'"
    );
    assert_eq!(normalize_target("/a//./b/", None).unwrap(), "/a/b");
    assert_eq!(normalize_target("./a/b", None).unwrap(), "a/b");
}

#[tokio::test]
async fn a_file_upload_honours_the_conflict_policy() {
    let f = fixture(small());
    std::fs::write(f.guest_root.join("workspace/exists"), b"old").unwrap();
    let mut req = new_upload(Kind::File, "/workspace/exists", 3, None);
    req.conflict = Conflict::Error;
    let id = f.up.create(req).unwrap().id;
    f.up.put_part(&owner(), &id, "0", None, body(b"new"))
        .await
        .unwrap();
    let e =
        f.up.complete(&owner(), &id, None, f.guest())
            .await
            .unwrap_err();
    assert_eq!(e.reason(), Some(Reason::TargetConflict));
    assert_eq!(
        std::fs::read(f.guest_root.join("workspace/exists")).unwrap(),
        b"old"
    );
    // Merge (the default) replaces a file.
    let id =
        f.up.create(new_upload(Kind::File, "/workspace/exists", 3, None))
            .unwrap()
            .id;
    f.up.put_part(&owner(), &id, "0", None, body(b"new"))
        .await
        .unwrap();
    f.up.complete(&owner(), &id, None, f.guest()).await.unwrap();
    assert_eq!(
        std::fs::read(f.guest_root.join("workspace/exists")).unwrap(),
        b"new"
    );
}

// ---- directory uploads ------------------------------------------------

/// A tar archive as Python's `tarfile` (PAX format) writes one.
fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    b.into_inner().unwrap()
}

fn add_dir(b: &mut tar::Builder<Vec<u8>>, name: &str, mode: u32) {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(mode);
    h.set_size(0);
    b.append_data(&mut h, name, &[][..]).unwrap();
}

fn add_file(b: &mut tar::Builder<Vec<u8>>, name: &str, mode: u32, content: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(mode);
    h.set_size(content.len() as u64);
    b.append_data(&mut h, name, content).unwrap();
}

fn add_link(b: &mut tar::Builder<Vec<u8>>, name: &str, target: &str) {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    h.set_size(0);
    b.append_link(&mut h, name, target).unwrap();
}

/// Writes a raw ustar header (no path checks of the tar crate's builder).
fn add_raw(b: &mut Vec<u8>, name: &[u8], ty: tar::EntryType, link: &[u8], content: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(ty);
    h.set_mode(0o644);
    h.set_size(content.len() as u64);
    h.set_cksum();
    b.extend_from_slice(h.as_bytes());
    b.extend_from_slice(content);
    b.resize(b.len().div_ceil(512) * 512, 0);
}

fn finish_raw(mut b: Vec<u8>) -> Vec<u8> {
    b.extend_from_slice(&[0; 1024]);
    b
}

async fn upload_dir(
    f: &Fixture,
    target: &str,
    tar: &[u8],
    conflict: Conflict,
) -> Result<Info, UploadError> {
    let mut req = new_upload(Kind::DirectoryTar, target, tar.len() as u64, Some(sha(tar)));
    req.source_kind = "directory_archive".into();
    req.conflict = conflict;
    let info = f.up.create(req)?;
    // Parts last to first.
    for n in (0..info.part_count).rev() {
        put(f, &info.id, n, tar, info.part_size as usize).await?;
    }
    f.up.complete(&owner(), &info.id, None, f.guest()).await
}

#[tokio::test]
async fn a_directory_archive_is_unpacked_with_modes_links_and_long_names() {
    let f = fixture(small());
    let long = format!("deep/{}/file.txt", "n".repeat(150));
    let big = data(5000);
    let tar = archive(|b| {
        add_dir(b, "deep", 0o755);
        add_file(b, "run.sh", 0o755, b"#!/bin/sh\necho hi\n");
        add_file(b, &long, 0o644, b"long name");
        add_file(b, "deep/big.bin", 0o600, &big);
        add_dir(b, "ro", 0o555);
        add_file(b, "ro/inside", 0o444, b"x");
        add_link(b, "deep/up", "../run.sh");
        add_file(b, "empty", 0o644, b"");
    });
    let info = upload_dir(&f, "/workspace/proj", &tar, Conflict::Merge)
        .await
        .unwrap();
    assert_eq!(info.status, Status::Completed);
    let p = info.published.unwrap();
    assert_eq!(p.files, 6);
    assert_eq!(p.bytes, 18 + 9 + 5000 + 1);
    let root = f.guest_root.join("workspace/proj");
    assert_eq!(std::fs::read(root.join(&long)).unwrap(), b"long name");
    assert_eq!(
        sha(&std::fs::read(root.join("deep/big.bin")).unwrap()),
        sha(&big)
    );
    let mode = |p: &str| {
        std::fs::symlink_metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("run.sh"), 0o755);
    assert_eq!(mode("deep/big.bin"), 0o600);
    assert_eq!(mode("ro"), 0o555);
    assert_eq!(
        std::fs::read_link(root.join("deep/up")).unwrap(),
        Path::new("../run.sh")
    );
    assert_eq!(
        std::fs::read(root.join("deep/up")).unwrap(),
        b"#!/bin/sh\necho hi\n"
    );
    // Nothing but the destination beside it.
    let top: Vec<_> = std::fs::read_dir(f.guest_root.join("workspace"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(top, ["proj"]);
    std::fs::set_permissions(root.join("ro"), std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn merge_adds_to_a_directory_and_replace_swaps_it() {
    let f = fixture(small());
    let d = f.guest_root.join("workspace/d");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::write(d.join("keep"), b"k").unwrap();
    std::fs::write(d.join("sub/over"), b"old").unwrap();
    let tar = archive(|b| {
        add_dir(b, "sub", 0o755);
        add_file(b, "sub/over", 0o644, b"new");
        add_file(b, "sub/added", 0o644, b"a");
    });
    upload_dir(&f, "/workspace/d", &tar, Conflict::Merge)
        .await
        .unwrap();
    assert_eq!(std::fs::read(d.join("keep")).unwrap(), b"k");
    assert_eq!(std::fs::read(d.join("sub/over")).unwrap(), b"new");
    assert_eq!(std::fs::read(d.join("sub/added")).unwrap(), b"a");
    upload_dir(&f, "/workspace/d", &tar, Conflict::Replace)
        .await
        .unwrap();
    assert!(
        !d.join("keep").exists(),
        "replace drops what the archive lacks"
    );
    assert_eq!(std::fs::read(d.join("sub/added")).unwrap(), b"a");
    let e = upload_dir(&f, "/workspace/d", &tar, Conflict::Error)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Some(Reason::TargetConflict));
    assert_eq!(
        f.guest_tree(),
        [
            "workspace",
            "workspace/d",
            "workspace/d/sub",
            "workspace/d/sub/added",
            "workspace/d/sub/over"
        ]
    );
}

#[tokio::test]
async fn hostile_archives_are_refused_naming_the_entry_and_leave_nothing() {
    let f = fixture(small());
    let raw = |entries: &[(&[u8], tar::EntryType, &[u8])]| {
        let mut b = Vec::new();
        add_raw(&mut b, b"ok.txt", tar::EntryType::Regular, b"", b"fine");
        for (name, ty, link) in entries {
            add_raw(&mut b, name, *ty, link, b"");
        }
        finish_raw(b)
    };
    use tar::EntryType as T;
    let cases: Vec<(Vec<u8>, &str, Reason)> = vec![
        (
            raw(&[(b"../evil", T::Regular, b"")]),
            "\"../evil\": contains '..'",
            Reason::DirectoryExtractInvalidPath,
        ),
        (
            raw(&[(b"a/../../evil", T::Regular, b"")]),
            "contains '..'",
            Reason::DirectoryExtractInvalidPath,
        ),
        (
            raw(&[(b"/etc/passwd", T::Regular, b"")]),
            "\"/etc/passwd\": is an absolute path",
            Reason::DirectoryExtractInvalidPath,
        ),
        (
            raw(&[(b"esc", T::Symlink, b"../../outside")]),
            "\"esc\": is a symbolic link to \"../../outside\", outside the destination",
            Reason::DirectoryExtractInvalidSymlink,
        ),
        (
            raw(&[(b"abs", T::Symlink, b"/etc")]),
            "absolute path",
            Reason::DirectoryExtractInvalidSymlink,
        ),
        (
            raw(&[(b"hard", T::Link, b"ok.txt")]),
            "\"hard\": is a hard link",
            Reason::DirectoryExtractUnsupportedEntry,
        ),
        (
            raw(&[(b"fifo", T::Fifo, b"")]),
            "\"fifo\": is a Fifo entry",
            Reason::DirectoryExtractUnsupportedEntry,
        ),
        (
            raw(&[(b"dev", T::Char, b"")]),
            "\"dev\"",
            Reason::DirectoryExtractUnsupportedEntry,
        ),
        // A link through a link made earlier: d -> ., then d/up -> .. (which
        // would really sit at the root and point outside).
        (
            raw(&[(b"d", T::Symlink, b"."), (b"d/up", T::Symlink, b"..")]),
            "\"d/up\": lies under \"d\"",
            Reason::DirectoryExtractInvalidSymlink,
        ),
        // A file under a name that is also a link.
        (
            raw(&[(b"l/f", T::Regular, b""), (b"l", T::Symlink, b".")]),
            "\"l\": is a symbolic link over a name",
            Reason::DirectoryExtractInvalidSymlink,
        ),
    ];
    for (i, (tar, msg, reason)) in cases.into_iter().enumerate() {
        let target = format!("/workspace/t{i}");
        let e = upload_dir(&f, &target, &tar, Conflict::Merge)
            .await
            .unwrap_err();
        assert!(e.to_string().contains(msg), "case {i}: {e}");
        assert_eq!(e.reason(), Some(reason), "case {i}: {e}");
        assert_eq!(
            f.guest_tree(),
            ["workspace"],
            "case {i} left something: {e}"
        );
    }
    // An overlong GNU name extension is refused before it is read.
    let mut b = Vec::new();
    let huge = vec![b'a'; archive::EXTENSION_MAX + 1];
    add_raw(&mut b, b"././@LongLink", T::GNULongName, b"", &huge);
    add_raw(&mut b, b"x", T::Regular, b"", b"");
    let e = upload_dir(&f, "/workspace/long", &finish_raw(b), Conflict::Merge)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("name extension, more than"), "{e}");
    // Garbage is not an archive.
    let e = upload_dir(&f, "/workspace/g", &[7u8; 1024], Conflict::Merge)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not a valid tar archive"), "{e}");
    assert_eq!(f.guest_tree(), ["workspace"]);
}

#[test]
fn entry_paths_and_link_targets_follow_the_rules() {
    assert_eq!(archive::entry_path(b"./a//b/").unwrap(), "a/b");
    assert_eq!(archive::entry_path(b"./").unwrap(), "");
    assert!(archive::entry_path(b"a\0b").unwrap_err().contains("NUL"));
    assert!(archive::entry_path(&[0xff]).unwrap_err().contains("UTF-8"));
    assert!(
        archive::entry_path("x".repeat(256).as_bytes())
            .unwrap_err()
            .contains("255")
    );
    assert!(
        archive::entry_path("a/".repeat(2049).as_bytes())
            .unwrap_err()
            .contains("4096")
    );
    assert!(archive::link_target("a/b/l", b"../../x").is_ok());
    assert!(archive::link_target("a/b/l", b"../../../x").is_err());
    assert!(archive::link_target("l", b"sub/../x").is_ok());
    assert!(archive::link_target("l", b"..").is_err());
    assert!(archive::link_target("l", b"").is_err());
}

#[test]
fn the_memory_bound_is_stated_and_small() {
    let l = Limits::default();
    // 16 requests in flight and a full table of the largest sessions
    // stay under 64 MiB; a request adds about 1.4 MiB.
    assert!(l.memory_bound(16) < 64 << 20, "{}", l.memory_bound(16));
    assert!(l.memory_bound(1) - l.memory_bound(0) < 3 << 19);
}

#[test]
fn a_restart_sweeps_the_spool() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("uploads");
    std::fs::create_dir_all(root.join("up_old")).unwrap();
    std::fs::write(root.join("up_old/0"), b"x").unwrap();
    let up = Uploads::open(&root, Limits::default()).unwrap();
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        1,
        "open keeps it"
    );
    up.clear_spool().unwrap();
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
}

#[test]
fn the_spool_reader_reads_and_seeks_across_parts() {
    use std::io::{Read, Seek, SeekFrom};
    let tmp = tempfile::tempdir().unwrap();
    let mut parts = Vec::new();
    for (i, s) in ["abc", "defg", "h"].iter().enumerate() {
        let p = tmp.path().join(i.to_string());
        std::fs::write(&p, s).unwrap();
        parts.push((p, s.len() as u64));
    }
    let mut r = spool::PartsReader::new(parts);
    let mut all = String::new();
    r.read_to_string(&mut all).unwrap();
    assert_eq!(all, "abcdefgh");
    r.seek(SeekFrom::Start(2)).unwrap();
    let mut b = [0u8; 3];
    r.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"cde");
    r.seek(SeekFrom::End(-1)).unwrap();
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"h");
}

/// A guest whose disk fills after `room` bytes of file content (ENOSPC, as
/// the agent reports it), otherwise the host directory.
struct FillingGuest {
    dir: HostDir,
    room: std::sync::atomic::AtomicI64,
}

impl GuestFiles for FillingGuest {
    fn write_at(&self, path: &str, offset: u64, data: &[u8], mode: u32) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        if self.room.fetch_sub(data.len() as i64, Ordering::SeqCst) < data.len() as i64 {
            return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
        }
        self.dir.write_at(path, offset, data, mode)
    }
    fn make_dir(&self, path: &str, mode: u32, parents: bool) -> std::io::Result<()> {
        self.dir.make_dir(path, mode, parents)
    }
    fn chmod(&self, path: &str, mode: u32) -> std::io::Result<()> {
        self.dir.chmod(path, mode)
    }
    fn symlink(&self, target: &str, path: &str) -> std::io::Result<()> {
        self.dir.symlink(target, path)
    }
    fn rename(&self, from: &str, to: &str) -> std::io::Result<()> {
        self.dir.rename(from, to)
    }
    fn remove(&self, path: &str, recursive: bool) -> std::io::Result<()> {
        self.dir.remove(path, recursive)
    }
    fn kind(&self, path: &str) -> std::io::Result<Option<EntryKind>> {
        self.dir.kind(path)
    }
}

/// A failed completion takes back the parent directories it created (a
/// file upload whose guest disk fills, a directory upload with a hostile
/// entry), and leaves those that were there, or that another upload filled
/// meanwhile.
#[tokio::test]
async fn a_failed_upload_leaves_no_parent_directories_behind() {
    let f = fixture(small());
    let content = data(2500);
    let id =
        f.up.create(new_upload(Kind::File, "/workspace/a/b/c/f", 2500, None))
            .unwrap()
            .id;
    for n in 0..3 {
        put(&f, &id, n, &content, 1000).await.unwrap();
    }
    let full = FillingGuest {
        dir: f.guest(),
        room: 1000.into(),
    };
    let e = f.up.complete(&owner(), &id, None, full).await.unwrap_err();
    assert!(
        matches!(&e, UploadError::Guest { op: "write", path, .. } if path.contains("/workspace/a/b/c/.f.nullspace-upload-")),
        "{e}"
    );
    assert_eq!(f.guest_tree(), ["workspace"], "{e}");

    // A relative target's parents too (relative to the guest's workdir).
    let mut req = new_upload(Kind::File, "x/y/f", 2500, None);
    req.conflict = Conflict::Replace;
    let id = f.up.create(req).unwrap().id;
    for n in 0..3 {
        put(&f, &id, n, &content, 1000).await.unwrap();
    }
    let full = FillingGuest {
        dir: f.guest(),
        room: 0.into(),
    };
    f.up.complete(&owner(), &id, None, full).await.unwrap_err();
    assert_eq!(f.guest_tree(), ["workspace"]);

    // A directory upload refused for an entry, under missing parents.
    let mut b = Vec::new();
    add_raw(&mut b, b"ok.txt", tar::EntryType::Regular, b"", b"fine");
    add_raw(&mut b, b"../evil", tar::EntryType::Regular, b"", b"");
    let e = upload_dir(&f, "/srv/p/q/t", &finish_raw(b), Conflict::Merge)
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Some(Reason::DirectoryExtractInvalidPath), "{e}");
    assert_eq!(f.guest_tree(), ["workspace"], "{e}");

    // Directories that existed stay; one filled meanwhile stays too.
    std::fs::create_dir_all(f.guest_root.join("srv/keep")).unwrap();
    std::fs::create_dir_all(f.guest_root.join("srv/busy")).unwrap();
    let g = f.guest();
    let made = publish::make_parents(&g, "/srv/keep/n1/n2").unwrap();
    assert_eq!(made, ["/srv/keep/n1", "/srv/keep/n1/n2"]);
    std::fs::write(f.guest_root.join("srv/keep/n1/other"), b"x").unwrap();
    publish::remove_made(&g, &made);
    assert!(f.guest_root.join("srv/keep/n1/other").exists());
    assert!(!f.guest_root.join("srv/keep/n1/n2").exists());
    // A file in the way fails, naming the path.
    std::fs::write(f.guest_root.join("srv/busy/file"), b"x").unwrap();
    let e = publish::make_parents(&g, "/srv/busy/file/d").unwrap_err();
    assert!(
        e.to_string().contains("/srv/busy/file/d: Not a directory"),
        "{e}"
    );
}

/// A session the spool's file system could not hold is refused when it is
/// created (507, `insufficient_staging_space`), not halfway through its
/// parts; so is a signed `PUT` when the disk is down to the reserve.
#[tokio::test]
async fn an_upload_the_spool_disk_cannot_hold_is_refused_up_front() {
    let f = fixture(Limits {
        spool_reserve_bytes: u64::MAX / 4,
        ..small()
    });
    let e =
        f.up.create(new_upload(Kind::File, "/workspace/big", 10, None))
            .unwrap_err();
    assert!(matches!(e, UploadError::DiskFull { length: 10, .. }), "{e}");
    assert_eq!(e.reason(), Some(Reason::InsufficientStagingSpace));
    assert!(e.retryable());
    assert!(
        e.to_string().contains("upload spool has") && e.to_string().contains("kept free"),
        "{e}"
    );
    assert!(
        !e.to_string().contains(f.spool.to_str().unwrap()),
        "the host path stays out of the message: {e}"
    );
    assert_eq!(f.spool_entries(), 0, "nothing spooled");
    let e =
        f.up.spool_direct(&owner(), "/workspace/put", None, body(b"data"))
            .await
            .unwrap_err();
    assert!(matches!(e, UploadError::DiskFull { .. }), "{e}");
    assert_eq!(f.spool_entries(), 0);

    // What open sessions may still send counts against the free space.
    let st = rustix::fs::statvfs(&f.spool).unwrap();
    let free = st.f_bavail * st.f_frsize;
    let f = fixture(Limits {
        spool_reserve_bytes: 0,
        max_upload_bytes: u64::MAX,
        machine_staging_quota_bytes: u64::MAX,
        part_size: 1 << 30,
        ..Limits::default()
    });
    f.up.create(new_upload(
        Kind::File,
        "/workspace/a",
        free / 2 + free / 8,
        None,
    ))
    .unwrap();
    let e =
        f.up.create(new_upload(
            Kind::File,
            "/workspace/b",
            free / 2 + free / 8,
            None,
        ))
        .unwrap_err();
    assert!(
        matches!(e, UploadError::DiskFull { pending, .. } if pending > free / 2 + free / 16),
        "{e}"
    );
}
