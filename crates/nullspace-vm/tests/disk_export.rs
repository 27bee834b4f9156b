//! An exported disk boots under plain QEMU (TCG, a `pc` machine, no
//! nullspace) and runs the template's start command: its HTTP server
//! answers through a QEMU user-network host forward.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nullspace_model::snapshot::DiskFormat;
use nullspace_vm::disk_export::{DiskExport, export};
use nullspace_vm::qemu::QemuVmm;
use nullspace_vm::template::{self, GuestConfig, TemplateSpec};
use nullspace_vm::{GuestKernel, Probe, Readiness};

fn import_demo(dir: &Path) -> anyhow::Result<PathBuf> {
    use nullspace_oci::SourceRef;
    let layout = dir.join("demo-layout");
    nullspace_testkit::image::Layout::create(&layout)
        .image("1", &nullspace_testkit::image::demo_image()?)
        .finish();
    let image = nullspace_oci::Image::resolve(
        &SourceRef::parse(&format!("oci:{}:1", layout.display()))?,
        &Default::default(),
    )?;
    let out = dir.join("demo");
    nullspace_build::import::import(
        &image,
        &out,
        &nullspace_build::import::ImportOptions::default(),
        &nullspace_oci::layout::NoProgress,
    )?;
    Ok(out.join("rootfs.ext4"))
}

#[test]
fn exported_disk_boots_under_plain_qemu_to_its_start_command() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("disk-export");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace).unwrap();
    let kernel = GuestKernel::find().unwrap();
    let vmm = QemuVmm::new(kernel.clone(), &init, &dir.join("cache")).unwrap();
    let rootfs = import_demo(&dir).unwrap();

    let start = "echo served-from-the-disk > /tmp/index.html; exec httpd -f -p 8080 -h /tmp";
    let mut cfg = GuestConfig::new("exported");
    cfg.env.insert("PATH".into(), "/bin".into());
    cfg.user = Some("app:app".into());
    cfg.workdir = Some("/srv".into());
    cfg.start_cmd = Some(start.into());
    let mut spec = TemplateSpec::new(&rootfs, cfg.clone());
    spec.disk_mb = Some(128);
    let mut r = Readiness::new(Probe::Tcp { port: 8080 });
    r.startup_grace = Duration::from_millis(500);
    spec.readiness = Some(r);
    let snap_dir = dir.join("snap");
    template::build_snapshot(
        &vmm,
        &spec,
        &snap_dir,
        &nullspace_vm::CancellationToken::new(),
    )
    .expect("template snapshot");

    let disk = dir.join("template.qcow2");
    let t = Instant::now();
    let size = export(&DiskExport {
        snapshot_dir: &snap_dir,
        kernel: &kernel,
        config: cfg,
        format: DiskFormat::Qcow2,
        output: &disk,
    })
    .expect("export");
    eprintln!(
        "[timing] export {:?}, {} MiB qcow2",
        t.elapsed(),
        size >> 20
    );
    // Nothing left beside the output.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".disk-export-"))
        .collect();
    assert!(names.is_empty(), "work directories left: {names:?}");
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&disk)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2", "{info}");

    // Plain QEMU: a `pc` machine, SeaBIOS → syslinux → the kernel.
    let console = dir.join("console.log");
    let answer = nullspace_testkit::plain_qemu::boot_and_get(
        &disk,
        "qcow2",
        &console,
        "/index.html",
        "served-from-the-disk",
    );
    assert!(answer.starts_with("HTTP/1."), "{answer}");
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(log.contains("standalone: no agent"), "{log}");
}

/// The boot test: a Debian bookworm + python3 template (the cached
/// bench image, see `tests/debian.rs`) exported raw boots to `python3 -m
/// http.server`. Without the image it prints SKIPPED, unless
/// `NULLSPACE_REQUIRE_DEBIAN_VM=1`.
#[test]
fn debian_python_disk_boots_to_its_http_server() {
    let layout = std::env::var_os("NULLSPACE_DEBIAN_LAYOUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/nullspace-bench/oci-app"));
    if !layout.join("index.json").exists() {
        let msg = format!(
            "Debian image layout {} not found; build it with `sudo bash bench/import.sh --build-only`",
            layout.display()
        );
        assert!(
            std::env::var("NULLSPACE_REQUIRE_DEBIAN_VM").as_deref() != Ok("1"),
            "NULLSPACE_REQUIRE_DEBIAN_VM=1: {msg}"
        );
        eprintln!("SKIPPED debian_python_disk_boots_to_its_http_server: {msg}");
        return;
    }
    use nullspace_oci::SourceRef;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("disk-export-debian");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace).unwrap();
    let kernel = GuestKernel::find().unwrap();
    let vmm = QemuVmm::new(kernel.clone(), &init, &dir.join("cache")).unwrap();
    let image = nullspace_oci::Image::resolve(
        &SourceRef::parse(&format!("oci:{}:app", layout.display())).unwrap(),
        &Default::default(),
    )
    .unwrap();
    nullspace_build::import::import(
        &image,
        &dir.join("debian"),
        &nullspace_build::import::ImportOptions::default(),
        &nullspace_oci::layout::NoProgress,
    )
    .unwrap();
    let mut cfg = GuestConfig::new("debian-disk");
    cfg.workdir = Some("/etc".into());
    cfg.start_cmd = Some("exec python3 -m http.server 8080".into());
    let mut spec = TemplateSpec::new(&dir.join("debian/rootfs.ext4"), cfg.clone());
    spec.boot_timeout = Duration::from_secs(120);
    let mut r = Readiness::new(Probe::Tcp { port: 8080 });
    r.timeout = Duration::from_secs(120);
    spec.readiness = Some(r);
    let snap_dir = dir.join("snap");
    template::build_snapshot(
        &vmm,
        &spec,
        &snap_dir,
        &nullspace_vm::CancellationToken::new(),
    )
    .expect("debian template snapshot");
    let disk = dir.join("debian.raw");
    let t = Instant::now();
    let size = export(&DiskExport {
        snapshot_dir: &snap_dir,
        kernel: &kernel,
        config: cfg,
        format: DiskFormat::Raw,
        output: &disk,
    })
    .expect("export");
    eprintln!("[timing] export {:?}, {} MiB raw", t.elapsed(), size >> 20);
    let console = dir.join("console.log");
    // python's listing of its working directory (/etc) names os-release.
    let answer =
        nullspace_testkit::plain_qemu::boot_and_get(&disk, "raw", &console, "/", "os-release");
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(log.contains("standalone: no agent"), "{log}");
}
