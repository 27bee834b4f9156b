// Each test binary uses a part of this module.
#![allow(dead_code)]

//! A booted guest for agent tests: the demo image (busybox) imported once
//! per test binary, one VM at a time.

use nullspace_vm::qemu::{BootSpec, QemuVm, QemuVmm};
use nullspace_vm::template::GuestConfig;
use nullspace_vm::{GuestKernel, Vm};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct Fixture {
    pub vmm: QemuVmm,
    pub rootfs: PathBuf,
    pub dir: PathBuf,
}

pub fn fixture(name: &str) -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| build_fixture(name).expect("fixture"))
}

fn build_fixture(name: &str) -> anyhow::Result<Fixture> {
    use nullspace_oci::SourceRef;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace)?;
    let layout = dir.join("demo-layout");
    nullspace_testkit::image::Layout::create(&layout)
        .image("1", &nullspace_testkit::image::demo_image()?)
        .finish();
    let image = nullspace_oci::Image::resolve(
        &SourceRef::parse(&format!("oci:{}:1", layout.display()))?,
        &Default::default(),
    )?;
    nullspace_build::import::import(
        &image,
        &dir.join("demo"),
        &nullspace_build::import::ImportOptions::default(),
        &nullspace_oci::layout::NoProgress,
    )?;
    let vmm = QemuVmm::new(GuestKernel::find()?, &init, &dir.join("cache"))?;
    Ok(Fixture {
        vmm,
        rootfs: dir.join("demo/rootfs.ext4"),
        dir,
    })
}

/// VM tests run one at a time (TCG guests are CPU-heavy; RSS is per process).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A VM booted from a private copy of the demo rootfs (grown to 256 MB),
/// with the demo image's runtime defaults (user app, workdir /srv).
pub fn boot(f: &Fixture, name: &str, vcpus: u32) -> QemuVm {
    let disk = f.dir.join(format!("{name}.ext4"));
    std::fs::copy(&f.rootfs, &disk).unwrap();
    nullspace_vm::rootfs::grow(&disk, 256).unwrap();
    let mut config = GuestConfig::new("nullspace-agent");
    config.env.insert("PATH".into(), "/bin".into());
    config.user = Some("app:app".into());
    config.workdir = Some("/srv".into());
    let spec = BootSpec {
        disk,
        config,
        memory_mb: 512,
        vcpus,
        boot_timeout: Duration::from_secs(90),
        network: false,
        memory_mode: nullspace_vm::MemoryMode::Mapped,
        memory_file: None,
        ceiling: None,
    };
    let t = Instant::now();
    let mut vm =
        QemuVm::boot(&f.vmm, &spec, &nullspace_vm::CancellationToken::new()).expect("boot");
    vm.agent().ping(Duration::from_secs(60)).expect("ping");
    eprintln!("[timing] {name}: booted in {:?}", t.elapsed());
    vm
}

/// A field of /proc/self/status in KiB.
pub fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

/// A template snapshot of the demo rootfs (no start command) in the
/// fixture's directory `name`.
pub fn template(f: &Fixture, name: &str) -> nullspace_vm::Snapshot {
    let disk = f.dir.join(format!("{name}.ext4"));
    std::fs::copy(&f.rootfs, &disk).unwrap();
    nullspace_vm::rootfs::grow(&disk, 256).unwrap();
    let mut config = GuestConfig::new(name);
    config.env.insert("PATH".into(), "/bin".into());
    let spec = nullspace_vm::template::TemplateSpec::new(&disk, config);
    let out = f.dir.join(name);
    let _ = std::fs::remove_dir_all(&out);
    nullspace_vm::template::build_snapshot(
        &f.vmm,
        &spec,
        &out,
        &nullspace_vm::CancellationToken::new(),
    )
    .expect("template")
}
