//! Hostile-input rules.

mod common;
use common::*;
use nullspace_rootfs::testutil::{Header, LayerBuilder, raw_header, set_checksum};
use nullspace_rootfs::{Limits, RootfsOptions};

#[test]
fn paths_are_normalized() {
    let l = LayerBuilder::new()
        .file("/abs", 0o644, b"1")
        .file("./dot/./x", 0o644, b"2")
        .file("a/../folded", 0o644, b"3")
        .into_tar();
    let img = Img::open(&build(&[l]));
    assert_eq!(img.read("/abs"), b"1");
    assert_eq!(img.read("/dot/x"), b"2");
    assert_eq!(img.read("/folded"), b"3");
    assert!(!img.exists("/a/folded"));
}

#[test]
fn escaping_dotdot_is_rejected() {
    for p in ["../evil", "a/../../evil", "/../../etc/passwd"] {
        let l = LayerBuilder::new().file(p, 0o644, b"x").into_tar();
        let e = build_err(&[l]);
        assert!(e.contains("`..` escapes the root"), "{p}: {e}");
    }
}

#[test]
fn bad_names_are_rejected() {
    // Empty name.
    let l = LayerBuilder::new()
        .entry(&Header::new("", b'0', 0o644), &[])
        .into_tar();
    assert!(build_err(&[l]).contains("empty path"));
    // NUL inside a PAX path.
    let l = LayerBuilder::new()
        .pax(&[("path", b"a\0b")])
        .file("x", 0o644, b"")
        .into_tar();
    assert!(build_err(&[l]).contains("NUL"));
    // Component > 255 bytes (via PAX path).
    let long = format!("d/{}", "n".repeat(256));
    let l = LayerBuilder::new().file(&long, 0o644, b"").into_tar();
    assert!(build_err(&[l]).contains("exceeds 255"));
    // Path longer than max_path_len.
    let long = vec!["abcdefgh"; 600].join("/");
    let l = LayerBuilder::new().file(&long, 0o644, b"").into_tar();
    assert!(build_err(&[l]).contains("exceeds the limit of 4096"));
}

#[test]
fn symlinked_parent_resolves_inside_rootfs() {
    // merged-/usr: lib -> usr/lib, later layer writes lib/x86_64/libc.so
    let base = LayerBuilder::new()
        .dir("usr/lib", 0o755)
        .symlink("lib", "usr/lib")
        .symlink("abs", "/usr/lib")
        .into_tar();
    let top = LayerBuilder::new()
        .file("lib/x86_64/libc.so", 0o755, b"libc")
        .file("abs/viaabs", 0o644, b"abs")
        .into_tar();
    let img = Img::open(&build(&[base, top]));
    assert_eq!(img.kind("/lib"), T::Symlink);
    assert_eq!(img.read("/usr/lib/x86_64/libc.so"), b"libc");
    assert_eq!(img.read("/usr/lib/viaabs"), b"abs");
}

#[test]
fn symlink_pointing_outside_stays_inside() {
    let l1 = LayerBuilder::new()
        .symlink("escape", "../../../../etc")
        .symlink("escape_abs", "/../../etc")
        .into_tar();
    let l2 = LayerBuilder::new()
        .file("escape/passwd", 0o644, b"pwned?")
        .file("escape_abs/shadow", 0o644, b"pwned?")
        .into_tar();
    let img = Img::open(&build(&[l1, l2]));
    // Clamped at the rootfs root: /etc inside the image, nothing else.
    assert_eq!(img.read("/etc/passwd"), b"pwned?");
    assert_eq!(img.read("/etc/shadow"), b"pwned?");
    assert_eq!(img.kind("/escape"), T::Symlink);
}

#[test]
fn symlink_loops_are_rejected() {
    let l = LayerBuilder::new()
        .symlink("a", "b")
        .symlink("b", "a")
        .file("a/x", 0o644, b"")
        .into_tar();
    assert!(build_err(&[l]).contains("too many levels of symbolic links"));
}

#[test]
fn symlink_cannot_replace_root() {
    // CVE-2021-29136 shape: a symlink whose name normalizes to the root.
    for name in [".", "./", "/"] {
        let l = LayerBuilder::new()
            .symlink(name, "/tmp/evil")
            .file("after", 0o644, b"x")
            .into_tar();
        let e = build_err(&[l]);
        assert!(e.contains("replace the root directory"), "{name}: {e}");
    }
    // An empty-named symlink is rejected as an empty path.
    let l = LayerBuilder::new().symlink("", "/").into_tar();
    assert!(build_err(&[l]).contains("empty path"));
}

#[test]
fn dir_entry_over_symlink_replaces_the_symlink() {
    // CVE-2021-32760 shape: chmod through a symlink must not happen.
    let l1 = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/shadow", 0o600, b"secret")
        .symlink("link", "etc")
        .into_tar();
    let l2 = LayerBuilder::new().dir("link", 0o777).into_tar();
    let img = Img::open(&build(&[l1, l2]));
    assert_eq!(img.kind("/link"), T::Dir);
    assert_eq!(img.mode("/link"), 0o777);
    assert_eq!(img.mode("/etc"), 0o755, "target mode must be untouched");
    assert!(img.names("/link").is_empty());
}

#[test]
fn file_over_symlink_replaces_the_link() {
    let l = LayerBuilder::new()
        .file("etc/passwd", 0o644, b"root:x:0:0")
        .symlink("a", "/etc/passwd")
        .file("a", 0o644, b"overwritten")
        .into_tar();
    let img = Img::open(&build(&[l]));
    assert_eq!(img.kind("/a"), T::File);
    assert_eq!(img.read("/a"), b"overwritten");
    assert_eq!(img.read("/etc/passwd"), b"root:x:0:0");
}

#[test]
fn file_as_parent_is_rejected() {
    let l = LayerBuilder::new()
        .file("f", 0o644, b"x")
        .file("f/child", 0o644, b"y")
        .into_tar();
    assert!(build_err(&[l]).contains("is not a directory"));
}

#[test]
fn pax_size_disagreement_is_rejected() {
    // TARmageddon shape: ustar says 0, PAX says 1024; a parser honouring
    // the ustar field would read the "data" as headers.
    let mut inner = LayerBuilder::new()
        .file("smuggled", 0o644, b"evil")
        .into_raw();
    inner.resize(1024, 0);
    let mut h = Header::new("outer", b'0', 0o644);
    h.size = 0;
    let l = LayerBuilder::new()
        .pax(&[("size", b"1024")])
        .entry(&h, &inner)
        .into_tar();
    let e = build_err(&[l]);
    assert_eq!(
        e,
        format!(
            "layer {}: path \"outer\": PAX size 1024 disagrees with the ustar header size 0",
            layer_name(0)
        )
    );
    // Equal sizes are fine and data offsets line up.
    let l = LayerBuilder::new()
        .pax(&[("size", b"4")])
        .file("ok", 0o644, b"good")
        .into_tar();
    assert_eq!(Img::open(&build(&[l])).read("/ok"), b"good");
}

#[test]
fn header_only_types_with_data_are_rejected() {
    let mut h = Header::new("d", b'5', 0o755);
    h.size = 512;
    let l = LayerBuilder::new().entry(&h, &[0u8; 512]).into_tar();
    assert!(build_err(&[l]).contains("must be 0"));
}

#[test]
fn oversized_extended_headers_rejected_before_buffering() {
    // Header claims 1 GiB of PAX data; the stream ends right after it. If
    // the decoder buffered first, this would be a truncation error (or an
    // allocation), not the limit error.
    let mut h = Header::new("PaxHeaders/x", b'x', 0o644);
    h.size = 1 << 30;
    let blob = raw_header(&h).to_vec();
    let e = build_err(&[blob]);
    assert!(
        e.contains("extended header of 1073741824 bytes exceeds the limit"),
        "{e}"
    );
    // Same for GNU long names.
    let mut h = Header::new("././@LongLink", b'L', 0o644);
    h.size = 2 << 20;
    let e = build_err(&[raw_header(&h).to_vec()]);
    assert!(e.contains("exceeds the limit"), "{e}");
}

#[test]
fn gnu_long_names_work() {
    let long = format!("{}/file", "d".repeat(200));
    let l = LayerBuilder::new()
        .ext_header(b'L', "././@LongLink", format!("{long}\0").as_bytes())
        .file("truncated-name", 0o644, b"long")
        .into_tar();
    let img = Img::open(&build(&[l]));
    assert_eq!(img.read(&format!("/{long}")), b"long");
}

#[test]
fn entry_and_size_limits() {
    let mut l = LayerBuilder::new();
    for i in 0..20 {
        l = l.file(&format!("f{i}"), 0o644, b"x");
    }
    let blob = l.into_tar();
    let opts = RootfsOptions {
        limits: Limits {
            max_entries: 10,
            ..Limits::default()
        },
        ..RootfsOptions::default()
    };
    let e = try_build_with(std::slice::from_ref(&blob), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("entry count exceeds the limit of 10"), "{e}");
    let opts = RootfsOptions {
        limits: Limits {
            max_layer_bytes: 4096,
            ..Limits::default()
        },
        ..RootfsOptions::default()
    };
    let e = try_build_with(std::slice::from_ref(&blob), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("uncompressed layer size exceeds the limit"),
        "{e}"
    );
    let opts = RootfsOptions {
        limits: Limits {
            max_total_bytes: blob.len() as u64 + 10,
            ..Limits::default()
        },
        ..RootfsOptions::default()
    };
    let e = try_build_with(&[blob.clone(), blob], &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("total uncompressed size"), "{e}");
}

#[test]
fn corrupt_checksum_and_truncation() {
    let mut h = raw_header(&Header::new("x", b'0', 0o644));
    h[0] = b'y'; // checksum now wrong
    let mut blob = LayerBuilder::new().file("ok", 0o644, b"x").into_raw();
    blob.extend_from_slice(&h);
    blob.extend_from_slice(&[0u8; 1024]);
    assert!(build_err(&[blob]).contains("checksum mismatch"));

    let mut blob = LayerBuilder::new()
        .file("big", 0o644, &[7u8; 5000])
        .into_raw();
    blob.truncate(2048);
    assert!(build_err(&[blob]).contains("unexpected end of stream"));

    let mut hh = raw_header(&Header::new("x", b'0', 0o644));
    hh[124..136].copy_from_slice(b"zzzzzzzzzzz\0");
    set_checksum(&mut hh);
    let mut blob = hh.to_vec();
    blob.extend_from_slice(&[0u8; 1024]);
    assert!(build_err(&[blob]).contains("corrupt tar"));
}

#[test]
fn whiteout_name_as_parent_rejected() {
    let l = LayerBuilder::new()
        .file(".wh.x/inner", 0o644, b"")
        .into_tar();
    assert!(build_err(&[l]).contains("whiteout"));
}
