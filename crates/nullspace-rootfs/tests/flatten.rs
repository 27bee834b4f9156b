//! OCI layer semantics, one test per rule, each on crafted layers and
//! checked on the produced (fsck-clean) image.

mod common;
use common::*;
use nullspace_rootfs::testutil::{Header, LayerBuilder};

#[test]
fn basic_types_and_content() {
    let l = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/hostname", 0o644, b"box\n")
        .symlink("etc/alias", "hostname")
        .hardlink("etc/hostname2", "etc/hostname")
        .entry(
            &{
                // old-style '\0' regular file
                let mut h = Header::new("etc/oldstyle", 0, 0o600);
                h.size = 3;
                h
            },
            b"old",
        )
        .into_tar();
    let b = build(&[l]);
    let img = Img::open(&b);
    assert_eq!(img.read("/etc/hostname"), b"box\n");
    assert_eq!(img.kind("/etc/alias"), T::Symlink);
    assert_eq!(img.link("/etc/alias"), "hostname");
    assert_eq!(img.ino("/etc/hostname2"), img.ino("/etc/hostname"));
    assert_eq!(img.inode("/etc/hostname").links_count, 2);
    assert_eq!(img.read("/etc/oldstyle"), b"old");
    assert_eq!(img.mode("/etc/oldstyle"), 0o600);
    assert_eq!(b.summary.hardlinks, 1);
}

#[test]
fn old_style_directory_with_trailing_slash() {
    let l = LayerBuilder::new()
        .entry(&Header::new("olddir/", 0, 0o750), &[])
        .file("olddir/f", 0o644, b"x")
        .into_tar();
    let img = Img::open(&build(&[l]));
    assert_eq!(img.kind("/olddir"), T::Dir);
    assert_eq!(img.mode("/olddir"), 0o750);
}

#[test]
fn later_entries_replace_earlier_ones() {
    let lower = LayerBuilder::new()
        .dir("d", 0o755)
        .file("d/child", 0o644, b"c")
        .file("f", 0o644, b"file")
        .file("s", 0o644, b"was a file")
        .dir("keep", 0o700)
        .file("keep/child", 0o644, b"kept")
        .into_tar();
    let upper = LayerBuilder::new()
        .file("d", 0o600, b"now a file") // file over dir: subtree goes
        .dir("f", 0o711) // dir over file
        .symlink("s", "/target") // symlink over file
        .dir("keep", 0o751) // dir over dir: children stay, meta updates
        .into_tar();
    let img = Img::open(&build(&[lower, upper]));
    assert_eq!(img.kind("/d"), T::File);
    assert_eq!(img.read("/d"), b"now a file");
    assert!(!img.exists("/d/child"));
    assert_eq!(img.kind("/f"), T::Dir);
    assert_eq!(img.mode("/f"), 0o711);
    assert_eq!(img.kind("/s"), T::Symlink);
    assert_eq!(img.link("/s"), "/target");
    assert_eq!(img.mode("/keep"), 0o751);
    assert_eq!(img.read("/keep/child"), b"kept");
}

#[test]
fn same_layer_later_entry_wins() {
    let l = LayerBuilder::new()
        .file("a", 0o644, b"first")
        .file("a", 0o644, b"second")
        .into_tar();
    let img = Img::open(&build(&[l]));
    assert_eq!(img.read("/a"), b"second");
}

#[test]
fn whiteout_deletes_lower_file_and_dir() {
    let lower = LayerBuilder::new()
        .file("a", 0o644, b"a")
        .dir("d", 0o755)
        .file("d/x", 0o644, b"x")
        .file("b", 0o644, b"b")
        .into_tar();
    let upper = LayerBuilder::new().whiteout("a").whiteout("d").into_tar();
    let img = Img::open(&build(&[lower, upper]));
    assert!(!img.exists("/a"));
    assert!(!img.exists("/d"));
    assert!(!img.exists("/d/x"));
    assert_eq!(img.read("/b"), b"b");
    // The whiteout files themselves never appear.
    assert!(img.names("/").iter().all(|n| !n.starts_with(".wh.")));
}

#[test]
fn whiteout_does_not_remove_same_layer_entries() {
    let lower = LayerBuilder::new().file("a", 0o644, b"old").into_tar();
    // The new file comes BEFORE the whiteout in archive order.
    let upper = LayerBuilder::new()
        .file("a", 0o644, b"new")
        .whiteout("a")
        .dir("o", 0o755)
        .file("o/mine", 0o644, b"mine")
        .opaque("o")
        .into_tar();
    let img = Img::open(&build(&[lower, upper]));
    assert_eq!(img.read("/a"), b"new");
    assert_eq!(img.read("/o/mine"), b"mine");
}

#[test]
fn opaque_whiteout_clears_lower_children_only() {
    let lower = LayerBuilder::new()
        .dir("d", 0o755)
        .file("d/old1", 0o644, b"1")
        .dir("d/sub", 0o755)
        .file("d/sub/old2", 0o644, b"2")
        .into_tar();
    let upper = LayerBuilder::new()
        .dir("d", 0o700)
        .opaque("d")
        .file("d/new", 0o644, b"n")
        .into_tar();
    let img = Img::open(&build(&[lower, upper]));
    assert_eq!(img.names("/d"), vec!["new".to_owned()]);
    assert_eq!(img.mode("/d"), 0o700);
}

#[test]
fn whiteout_of_missing_path_is_noop() {
    let l = LayerBuilder::new()
        .whiteout("nope/deeper")
        .whiteout("gone")
        .into_tar();
    let img = Img::open(&build(&[l]));
    assert!(!img.exists("/nope"));
}

#[test]
fn whiteouts_naming_dot_dotdot_or_nothing_are_rejected() {
    for name in [".wh..", ".wh...", ".wh.", "d/.wh.."] {
        let l = LayerBuilder::new().file(name, 0o644, b"").into_tar();
        let e = build_err(&[l]);
        assert!(e.contains("whiteout"), "{name}: {e}");
    }
}

#[test]
fn metadata_is_preserved() {
    let big_uid = 3_000_000_000u64; // needs PAX
    let l = LayerBuilder::new()
        .file_owned("suid", 0o4755, 1000, 1001, 1_600_000_000, b"x")
        .file_owned("sgid", 0o2711, 0, 0, 1_600_000_000, b"x")
        .entry(&Header::new("sticky", b'5', 0o1777), &[])
        .file_owned("bigid", 0o644, big_uid, big_uid + 1, 1_600_000_000, b"x")
        .pax(&[("mtime", b"1650000000.123456789")])
        .file("nanos", 0o644, b"n")
        .pax(&[
            (
                "SCHILY.xattr.security.capability",
                b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
            ),
            ("SCHILY.xattr.user.note", b"line1\nline2"),
        ])
        .file("caps", 0o755, b"bin")
        .into_tar();
    let b = build(&[l]);
    let img = Img::open(&b);
    assert_eq!(img.mode("/suid"), 0o4755);
    let i = img.inode("/suid");
    assert_eq!((i.uid, i.gid, i.mtime), (1000, 1001, 1_600_000_000));
    assert_eq!(img.mode("/sgid"), 0o2711);
    assert_eq!(img.mode("/sticky"), 0o1777);
    let i = img.inode("/bigid");
    assert_eq!((u64::from(i.uid), u64::from(i.gid)), (big_uid, big_uid + 1));
    let i = img.inode("/nanos");
    assert_eq!(i.mtime, 1_650_000_000);
    assert_eq!(i.mtime_extra >> 2, 123_456_789);
    assert_eq!(
        img.xattr("/caps", "security.capability").unwrap()[..4],
        [1, 0, 0, 2]
    );
    assert_eq!(img.xattr("/caps", "user.note").unwrap(), b"line1\nline2");
    let st = debugfs_stat(&b.img, "/caps");
    assert!(st.contains("security.capability"), "{st}");
}

#[test]
fn implicit_parents_get_defaults_and_root_meta_from_dot_entry() {
    let l = LayerBuilder::new()
        .entry(
            &{
                let mut h = Header::new("./", b'5', 0o700);
                h.uid = 5;
                h.mtime = 1_234_567;
                h
            },
            &[],
        )
        .file("a/b/c/file", 0o644, b"deep")
        .into_tar();
    let img = Img::open(&build(&[l]));
    assert_eq!(img.mode("/a/b"), 0o755);
    let i = img.inode("/a/b");
    assert_eq!((i.uid, i.gid, i.mtime), (0, 0, 0));
    let r = img.inode("/");
    assert_eq!(r.mode & 0o7777, 0o700);
    assert_eq!((r.uid, r.mtime), (5, 1_234_567));
}

#[test]
fn mount_points_exist() {
    let l = LayerBuilder::new().file("x", 0o644, b"x").into_tar();
    let img = Img::open(&build(&[l]));
    for d in [
        "/dev", "/proc", "/sys", "/dev/pts", "/dev/shm", "/run", "/tmp",
    ] {
        assert_eq!(img.kind(d), T::Dir, "{d}");
    }
    assert_eq!(img.mode("/tmp"), 0o1777);
}

#[test]
fn mount_points_keep_image_run_but_force_proc_dir() {
    let l = LayerBuilder::new()
        .symlink("run", "/var/run")
        .symlink("proc", "/elsewhere")
        .file("sys", 0o644, b"not a dir")
        .into_tar();
    let img = Img::open(&build(&[l]));
    assert_eq!(img.kind("/run"), T::Symlink);
    assert_eq!(img.kind("/proc"), T::Dir);
    assert_eq!(img.kind("/sys"), T::Dir);
}

#[test]
fn hardlink_to_lower_layer_file_and_to_symlink() {
    let lower = LayerBuilder::new()
        .file("bin/busybox", 0o755, b"BB")
        .symlink("bin/sh", "busybox")
        .into_tar();
    let upper = LayerBuilder::new()
        .hardlink("bin/ls", "bin/busybox")
        .hardlink("bin/sh2", "bin/sh")
        .into_tar();
    let img = Img::open(&build(&[lower, upper]));
    assert_eq!(img.ino("/bin/ls"), img.ino("/bin/busybox"));
    assert_eq!(img.read("/bin/ls"), b"BB");
    assert_eq!(img.ino("/bin/sh2"), img.ino("/bin/sh"));
    assert_eq!(img.kind("/bin/sh2"), T::Symlink);
}

#[test]
fn hardlink_survives_deletion_of_original_and_keeps_old_content() {
    let lower = LayerBuilder::new()
        .file("a", 0o644, b"v1")
        .hardlink("b", "a")
        .into_tar();
    let upper = LayerBuilder::new()
        .whiteout("a")
        .file("c", 0o644, b"c")
        .into_tar();
    let img = Img::open(&build(&[lower, upper]));
    assert!(!img.exists("/a"));
    assert_eq!(img.read("/b"), b"v1");
    assert_eq!(img.inode("/b").links_count, 1);

    // Replacing one name does not change the other.
    let l = LayerBuilder::new()
        .file("a", 0o644, b"v1")
        .hardlink("b", "a")
        .file("a", 0o644, b"v2")
        .into_tar();
    let img = Img::open(&build(&[l]));
    assert_eq!(img.read("/a"), b"v2");
    assert_eq!(img.read("/b"), b"v1");
}

#[test]
fn bad_hardlinks_are_rejected() {
    let cases = [
        (
            LayerBuilder::new().hardlink("x", "missing"),
            "does not exist",
        ),
        (
            LayerBuilder::new().dir("d", 0o755).hardlink("x", "d"),
            "is a directory",
        ),
        (
            LayerBuilder::new().hardlink("x", "../../etc/passwd"),
            "escapes",
        ),
        (LayerBuilder::new().hardlink("x", "."), "is a directory"),
    ];
    for (l, want) in cases {
        let e = build_err(&[l.into_tar()]);
        assert!(e.contains(want), "{e}");
        assert!(e.contains("path \"x\""), "{e}");
    }
}

#[test]
fn special_files_are_rejected_with_layer_path_and_type() {
    for (t, want) in [
        (b'3', "character device entries are not allowed"),
        (b'4', "block device entries are not allowed"),
        (b'6', "FIFO entries are not allowed"),
        (b'S', "sparse entries are not allowed"),
        (b'V', "unknown tar entry type 'V'"),
    ] {
        let l = LayerBuilder::new()
            .file("ok", 0o644, b"x")
            .entry(&Header::new("dev/thing", t, 0o644), &[])
            .into_tar();
        let e = build_err(&[l]);
        assert_eq!(
            e,
            format!("layer {}: path \"dev/thing\": {want}", layer_name(0)),
        );
    }
}

#[test]
fn char_device_0_0_is_not_a_whiteout() {
    let lower = LayerBuilder::new().file("a", 0o644, b"a").into_tar();
    let upper = LayerBuilder::new()
        .entry(&Header::new("a", b'3', 0), &[])
        .into_tar();
    let e = build_err(&[lower, upper]);
    assert!(e.contains("character device"), "{e}");
}

#[test]
fn pax_sparse_is_rejected() {
    let l = LayerBuilder::new()
        .pax(&[("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0")])
        .file("sparse", 0o644, b"x")
        .into_tar();
    assert!(build_err(&[l]).contains("sparse"));
}

#[test]
fn lost_found_in_image() {
    let l = LayerBuilder::new().dir("lost+found", 0o700).into_tar();
    let img = Img::open(&build(&[l]));
    assert_eq!(img.kind("/lost+found"), T::Dir);
    let l = LayerBuilder::new()
        .file("lost+found/x", 0o644, b"x")
        .into_tar();
    assert!(build_err(&[l]).contains("lost+found"));
}

#[test]
fn unsupported_xattr_namespace_rejected() {
    let l = LayerBuilder::new()
        .pax(&[("SCHILY.xattr.weird.name", b"v")])
        .file("f", 0o644, b"x")
        .into_tar();
    assert!(build_err(&[l]).contains("xattr"));
}
