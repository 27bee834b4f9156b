//! The accelerator: KVM only if a probe guest really boots under it.

use super::child::{ChildGuard, VmDir};
use crate::kernel::GuestKernel;
use crate::process::{self, Launch};
use crate::template::GuestConfig;
use crate::{VmError, initramfs};
use nullspace_model::snapshot::Accel;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub(super) fn accel_args(a: Accel) -> [&'static str; 2] {
    match a {
        Accel::Kvm => ["-accel", "kvm"],
        // Single-threaded TCG: multi-threaded TCG hangs microvm boots
        // about 1 in 6 here.
        Accel::Tcg => ["-accel", "tcg,thread=single"],
    }
}

pub(super) static ACCEL: OnceLock<Accel> = OnceLock::new();

/// KVM only if a probe guest boots under it within 5 s; else TCG. Cached
/// per process; `NULLSPACE_VM_ACCEL=tcg|kvm` overrides. The probe's QEMU
/// dies with the calling thread and is killed when the probe ends.
pub fn detect_accel(kernel: &GuestKernel, base_initrd: &Path, run_dir: Option<&Path>) -> Accel {
    *ACCEL.get_or_init(|| match std::env::var("NULLSPACE_VM_ACCEL").as_deref() {
        Ok("tcg") => Accel::Tcg,
        Ok("kvm") => Accel::Kvm,
        _ => {
            if std::fs::File::options()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_err()
            {
                return Accel::Tcg;
            }
            match probe_kvm(kernel, base_initrd, run_dir) {
                Ok(true) => Accel::Kvm,
                _ => Accel::Tcg,
            }
        }
    })
}

pub(super) fn probe_kvm(
    kernel: &GuestKernel,
    base_initrd: &Path,
    run_dir: Option<&Path>,
) -> Result<bool, VmError> {
    let mut dir = VmDir::owned(run_dir, "ns-kvmprobe-")?;
    let initrd = dir.path().join("initrd");
    let cfg = GuestConfig {
        probe_only: true,
        ..Default::default()
    };
    initramfs::write_with_config(
        base_initrd,
        &serde_json::to_vec(&cfg).unwrap_or_default(),
        &initrd,
    )?;
    let log = dir.path().join("console.log");
    let args: Vec<String> = [
        "-M",
        "microvm",
        "-accel",
        "kvm",
        "-m",
        "128",
        "-nographic",
        "-no-reboot",
        "-append",
        "console=ttyS0 panic=-1 edd=off quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "-kernel".into(),
        kernel.vmlinuz.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
    ])
    .collect();
    // Dies with this thread (the probe is one call) and is killed by the
    // guard on every return path.
    let mut child = ChildGuard(Some(process::spawn::spawn_qemu(
        &args,
        &log,
        Launch::SCOPED_VM,
    )?));
    if let Some(c) = &child.0 {
        dir.record(c.id())?;
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("NULLSPACE_PROBE_OK")
        {
            return Ok(true);
        }
        if let Some(c) = child.0.as_mut()
            && let Ok(Some(_)) = c.try_wait()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("NULLSPACE_PROBE_OK"))
}
