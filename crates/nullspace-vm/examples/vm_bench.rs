//! Build-VM figures for `bench/vm.sh`: boot to ready, snapshot size, restore
//! to first exec, for the busybox demo template and (when cached) the
//! Debian-based bench image.
//!
//! `cargo run -p nullspace-vm --example vm_bench -- [--reps N] [--debian-layout DIR]`

use nullspace_oci::SourceRef;
use nullspace_vm::qemu::{QemuVmm, RestoreSpec};
use nullspace_vm::template::{self, GuestConfig, TemplateSpec};
use nullspace_vm::{GuestKernel, Probe, Readiness, Vm};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn import(layout: &Path, tag: &str, out: &Path) -> anyhow::Result<PathBuf> {
    let image = nullspace_oci::Image::resolve(
        &SourceRef::parse(&format!("oci:{}:{tag}", layout.display()))?,
        &Default::default(),
    )?;
    nullspace_build::import::import(
        &image,
        out,
        &nullspace_build::import::ImportOptions::default(),
        &nullspace_oci::layout::NoProgress,
    )?;
    Ok(out.join("rootfs.ext4"))
}

struct Row {
    name: String,
    boot_ms: u64,
    ready_ms: u64,
    snapshot_ms: u64,
    memory_mb: u64,
    disk_mb: u64,
    restore_exec_ms: Vec<u128>,
}

fn bench(vmm: &QemuVmm, name: &str, spec: &TemplateSpec, reps: usize) -> anyhow::Result<Row> {
    let dir = tempfile::Builder::new().prefix("ns-snap-").tempdir()?;
    let out = dir.path().join("snap");
    let snap = template::build_snapshot(vmm, spec, &out, &nocancel())?;
    let mut restore_exec_ms = vec![];
    for _ in 0..reps {
        let t = Instant::now();
        let mut vm = template::restore(&snap, &RestoreSpec::default(), &nocancel())?;
        let o = vm.agent().sh("echo hi", Duration::from_secs(60))?;
        anyhow::ensure!(o.stdout_str() == "hi\n", "exec after restore: {o:?}");
        restore_exec_ms.push(t.elapsed().as_millis());
        drop(vm);
    }
    let m = &snap.meta;
    Ok(Row {
        name: name.into(),
        boot_ms: m.timings_ms.boot,
        ready_ms: m.timings_ms.ready,
        snapshot_ms: m.timings_ms.snapshot,
        memory_mb: m.memory_bytes >> 20,
        disk_mb: m.disk_bytes >> 20,
        restore_exec_ms,
    })
}

fn main() -> anyhow::Result<()> {
    let mut reps = 3;
    let mut debian = PathBuf::from("/var/tmp/nullspace-bench/oci-app");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--reps" => reps = args.next().unwrap_or_default().parse()?,
            "--debian-layout" => debian = PathBuf::from(args.next().unwrap_or_default()),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let work = tempfile::Builder::new().prefix("ns-vmbench-").tempdir()?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace)?;
    let vmm = QemuVmm::new(GuestKernel::find()?, &init, &work.path().join("cache"))?;
    println!("accelerator: {:?}; VM: 2 vCPU, 512 MiB", vmm.accel);

    let mut rows = vec![];
    // Small: the busybox demo image, httpd start command, tcp readiness.
    let layout = work.path().join("demo-layout");
    nullspace_testkit::image::Layout::create(&layout)
        .image("1", &nullspace_testkit::image::demo_image()?)
        .finish();
    let rootfs = import(&layout, "1", &work.path().join("demo"))?;
    let mut c = GuestConfig::new("bench-busybox");
    c.env.insert("PATH".into(), "/bin".into());
    c.start_cmd = Some("exec httpd -f -p 8080 -h /srv".into());
    let mut spec = TemplateSpec::new(&rootfs, c);
    let mut r = Readiness::new(Probe::Tcp { port: 8080 });
    r.startup_grace = Duration::ZERO;
    spec.readiness = Some(r.clone());
    rows.push(bench(&vmm, "busybox (demo)", &spec, reps)?);

    if debian.join("index.json").exists() {
        let rootfs = import(&debian, "app", &work.path().join("debian"))?;
        let mut c = GuestConfig::new("bench-debian");
        c.start_cmd = Some("exec python3 -m http.server 8080".into());
        let mut spec = TemplateSpec::new(&rootfs, c);
        spec.boot_timeout = Duration::from_secs(120);
        r.timeout = Duration::from_secs(120);
        spec.readiness = Some(r);
        rows.push(bench(&vmm, "debian bookworm + python3", &spec, reps)?);
    } else {
        println!(
            "debian: SKIPPED ({} not found; build it with `sudo bash bench/import.sh --build-only`)",
            debian.display()
        );
    }

    println!(
        "\n{:<28} {:>9} {:>9} {:>11} {:>10} {:>10} {:>9} {:>22}",
        "template",
        "boot ms",
        "ready ms",
        "boot->ready",
        "snap ms",
        "memory MB",
        "disk MB",
        "restore->exec ms (med)"
    );
    for r in &rows {
        let mut v = r.restore_exec_ms.clone();
        v.sort();
        let med = v.get(v.len() / 2).copied().unwrap_or(0);
        println!(
            "{:<28} {:>9} {:>9} {:>11} {:>10} {:>10} {:>9} {:>22}",
            r.name,
            r.boot_ms,
            r.ready_ms,
            r.boot_ms + r.ready_ms,
            r.snapshot_ms,
            r.memory_mb,
            r.disk_mb,
            format!("{med} {v:?}")
        );
    }
    Ok(())
}

fn nocancel() -> nullspace_vm::CancellationToken {
    nullspace_vm::CancellationToken::new()
}
