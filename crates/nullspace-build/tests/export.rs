//! Template export without a server: an ext4 root filesystem written by
//! mkext4 (modes, owners above the ustar range, hard links, symlinks,
//! devices, a FIFO, xattrs, a long path) exported as an OCI layout and an
//! archive, checked with the real tools (`skopeo inspect`, `umoci unpack`)
//! and compared with the image as `ext4_read` reads it.

use std::path::Path;
use std::process::Command;

use mkext4::sink::FileSink;
use mkext4::{FsBuilder, Meta, Options, ROOT, SpecialKind};
use nullspace_build::export::{
    ExportFormat, ExportSpec, LayerCompression, TemplateRuntime, export_template,
};
use nullspace_model::build::probe::Readiness;
use nullspace_testkit::export_tree;

/// `vfs_cap_data` revision 2, effective, permitted = cap_net_bind_service.
const CAP_NET_BIND_SERVICE: [u8; 20] = [
    0x01, 0, 0, 0x02, 0x00, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

/// A small root filesystem with every kind of entry the export handles.
fn make_disk(path: &Path) {
    let t = (1_700_000_000, 5);
    let mut b = FsBuilder::new(Options::new(64 << 20, [7; 16], 1_700_000_000)).unwrap();
    let etc = b.mkdir(ROOT, "etc", Meta::new(0o755, 0, 0, t)).unwrap();
    let hosts = b.file(etc, "hosts", Meta::new(0o644, 0, 0, t), 10).unwrap();
    b.hardlink(etc, "hosts.link", hosts).unwrap();
    let bin = b.mkdir(ROOT, "bin", Meta::new(0o755, 0, 0, t)).unwrap();
    let tool = b
        .file(bin, "tool", Meta::new(0o4755, 0, 0, t), 5000)
        .unwrap();
    b.set_xattr(tool, "security.capability", &CAP_NET_BIND_SERVICE)
        .unwrap();
    b.set_xattr(tool, "user.note", b"exported").unwrap();
    b.symlink(bin, "sh", "tool", Meta::new(0o777, 0, 0, t))
        .unwrap();
    let home = b.mkdir(ROOT, "home", Meta::new(0o755, 0, 0, t)).unwrap();
    let big = b
        .mkdir(home, "big", Meta::new(0o750, 3_000_000, 3_000_001, t))
        .unwrap();
    let long = "d".repeat(120);
    let deep = b
        .mkdir(big, &long, Meta::new(0o700, 1000, 1000, t))
        .unwrap();
    let f = b
        .file(deep, &"f".repeat(90), Meta::new(0o600, 1000, 1000, t), 3)
        .unwrap();
    let tmp = b.mkdir(ROOT, "tmp", Meta::new(0o1777, 0, 0, t)).unwrap();
    let _ = tmp;
    let dev = b.mkdir(ROOT, "dev", Meta::new(0o755, 0, 0, t)).unwrap();
    b.mknod(
        dev,
        "null",
        Meta::new(0o666, 0, 0, t),
        SpecialKind::Char { major: 1, minor: 3 },
    )
    .unwrap();
    b.mknod(
        dev,
        "loop0",
        Meta::new(0o660, 0, 6, t),
        SpecialKind::Block { major: 7, minor: 0 },
    )
    .unwrap();
    b.mknod(dev, "fifo", Meta::new(0o644, 0, 0, t), SpecialKind::Fifo)
        .unwrap();
    b.file(ROOT, "empty", Meta::new(0o644, 0, 0, t), 0).unwrap();
    let layout = b.seal().unwrap();
    let mut sink = FileSink::create(path, 64 << 20).unwrap();
    let mut w = layout.writer(&mut sink).unwrap();
    w.fill(hosts, &mut &b"127.0.0.1\n"[..]).unwrap();
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    w.fill(tool, &mut &data[..]).unwrap();
    w.fill(f, &mut &b"abc"[..]).unwrap();
    w.finish().unwrap();
}

fn runtime() -> TemplateRuntime {
    TemplateRuntime {
        env: [("PATH".into(), "/bin".into()), ("A".into(), "b c".into())].into(),
        user: Some("1000:1000".into()),
        workdir: Some("/home".into()),
        start_cmd: Some("exec tool --serve".into()),
        readiness: Some(Readiness::command("test -e /tmp/ready")),
        labels: [("dev.nullspace.template".into(), "demo".into())].into(),
    }
}

fn spec(disk: &Path, out: &Path, format: ExportFormat, c: LayerCompression) -> ExportSpec {
    ExportSpec {
        disk: disk.to_path_buf(),
        runtime: runtime(),
        compression: c,
        format,
        output: out.to_path_buf(),
        scratch: out.parent().unwrap().to_path_buf(),
        ref_name: Some("latest".into()),
    }
}

#[test]
fn export_is_exact_deterministic_and_accepted_by_oci_tools() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.ext4");
    make_disk(&disk);

    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let sa = export_template(&spec(&disk, &a, ExportFormat::Oci, LayerCompression::Gzip)).unwrap();
    let sb = export_template(&spec(&disk, &b, ExportFormat::Oci, LayerCompression::Gzip)).unwrap();
    assert_eq!(sa.manifest_digest, sb.manifest_digest);
    let blob = |root: &Path, d: &nullspace_oci::Digest| {
        std::fs::read(root.join("blobs/sha256").join(d.hex())).unwrap()
    };
    assert_eq!(blob(&a, &sa.layers[0]), blob(&b, &sb.layers[0]));

    let z = dir.path().join("z.oci.tar");
    let sz = export_template(&spec(
        &disk,
        &z,
        ExportFormat::OciArchive,
        LayerCompression::Zstd,
    ))
    .unwrap();
    assert_ne!(sz.manifest_digest, sa.manifest_digest);
    let z2 = dir.path().join("z2.oci.tar");
    export_template(&spec(
        &disk,
        &z2,
        ExportFormat::OciArchive,
        LayerCompression::Zstd,
    ))
    .unwrap();
    assert_eq!(std::fs::read(&z).unwrap(), std::fs::read(&z2).unwrap());

    // No temporary siblings left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");

    if !have("skopeo") || !have("umoci") {
        panic!("skopeo and umoci are required (scripts/deps.sh)");
    }
    for src in [
        format!("oci:{}:latest", a.display()),
        format!("oci-archive:{}:latest", z.display()),
    ] {
        let out = Command::new("skopeo")
            .args(["inspect", "--config", &src])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cfg: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let c = &cfg["config"];
        assert_eq!(c["Entrypoint"], serde_json::json!(["/bin/sh", "-c"]));
        assert_eq!(c["Cmd"], serde_json::json!(["exec tool --serve"]));
        assert_eq!(c["User"], "1000:1000");
        assert_eq!(c["WorkingDir"], "/home");
        assert_eq!(c["Env"], serde_json::json!(["A=b c", "PATH=/bin"]));
        assert_eq!(c["Labels"]["dev.nullspace.template"], "demo");
    }
    // The healthcheck survives in the raw config.
    let out = Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            "--config",
            &format!("oci:{}:latest", a.display()),
        ])
        .output()
        .unwrap();
    let raw: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        raw["config"]["Healthcheck"]["Test"],
        serde_json::json!(["CMD-SHELL", "test -e /tmp/ready"])
    );

    let want = export_tree::from_image(&disk, dir.path()).unwrap();
    assert!(want.contains_key("etc/hosts.link"));
    for (name, layout) in [("gzip", &a), ("zstd", &dir.path().join("zdir"))] {
        if name == "zstd" {
            // This umoci reads no zstd: skopeo decompresses the archive's
            // layer (checking it) into a gzip layout for it.
            let out = Command::new("skopeo")
                .args(["copy", "--dest-compress-format", "gzip", "--dest-compress"])
                .arg(format!("oci-archive:{}:latest", z.display()))
                .arg(format!("oci:{}:latest", layout.display()))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let bundle = dir.path().join(format!("bundle-{name}"));
        let out = Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:latest", layout.display()))
            .arg(&bundle)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "umoci: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = export_tree::from_dir(&bundle.join("rootfs")).unwrap();
        let d = export_tree::diff(&want, &got);
        assert!(d.is_empty(), "{name}: trees differ:\n{}", d.join("\n"));
    }
}

#[test]
fn a_failed_export_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.ext4");
    // Not an ext4 image.
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let out = dir.path().join("out");
    let e = export_template(&spec(
        &disk,
        &out,
        ExportFormat::Oci,
        LayerCompression::Gzip,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("disk.ext4"), "{e}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "only the disk remains");
    // An existing archive is never replaced.
    make_disk(&disk);
    let z = dir.path().join("x.oci.tar");
    std::fs::write(&z, b"keep").unwrap();
    let e = export_template(&spec(
        &disk,
        &z,
        ExportFormat::OciArchive,
        LayerCompression::Gzip,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");
    assert_eq!(std::fs::read(&z).unwrap(), b"keep");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

/// A disk whose superblock says the journal needs recovery (as a snapshot
/// of a mounted root file system does) is read from a replayed copy: the
/// same image as the clean disk, and the disk itself is left unchanged.
#[test]
fn a_disk_needing_journal_recovery_is_replayed_on_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.ext4");
    make_disk(&clean);
    let dirty = dir.path().join("dirty.ext4");
    std::fs::copy(&clean, &dirty).unwrap();
    let out = Command::new("debugfs")
        .args(["-w", "-R", "feature needs_recovery"])
        .arg(&dirty)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = std::fs::read(&dirty).unwrap();
    let img = nullspace_rootfs::ext4_read::Ext4Image::open(&dirty, dir.path()).unwrap();
    assert!(img.replayed_journal);
    drop(img);
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let sa = export_template(&spec(&clean, &a, ExportFormat::Oci, LayerCompression::Gzip)).unwrap();
    let sb = export_template(&spec(&dirty, &b, ExportFormat::Oci, LayerCompression::Gzip)).unwrap();
    assert_eq!(sa.manifest_digest, sb.manifest_digest);
    assert!(
        std::fs::read(&dirty).unwrap() == before,
        "the disk was written"
    );
    // The replay's copy is gone.
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A hostile image: a directory linked into itself is refused, not walked
/// forever.
#[test]
fn a_directory_loop_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.ext4");
    make_disk(&disk);
    let out = Command::new("debugfs")
        .args(["-w", "-R", "ln /etc /etc/loop"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = dir.path().join("out");
    let e = export_template(&spec(
        &disk,
        &out,
        ExportFormat::Oci,
        LayerCompression::Gzip,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("etc/loop"), "{e}");
    assert!(e.to_string().contains("loop"), "{e}");
    assert!(!out.exists());
}
