//! Where a restore's time goes, phase by phase, for a plain restore and
//! for a prepared (pooled) one: `cargo run -p nullspace-vm --example
//! restore_trace -- [--reps N] [--debian-layout DIR] [--only busybox|debian]`.
//!
//! Prints, per restore: verify, overlay, QEMU spawn to QMP, state load,
//! `cont` to the guest's first answer (clock and RNG set), then the first
//! three `echo hi` execs and a ping between them.

use nullspace_oci::SourceRef;
use nullspace_vm::machine::{self, MachineSpec};
use nullspace_vm::qemu::{MemoryMode, QemuVm, QemuVmm, RestoreSpec};
use nullspace_vm::template::{self, GuestConfig, Snapshot, TemplateSpec};
use nullspace_vm::{CancellationToken, GuestKernel, Probe, Readiness, Vm};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

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

/// `Pss:` of `/proc/PID/smaps_rollup`, MiB.
fn pss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn ms(t: Instant) -> u128 {
    t.elapsed().as_millis()
}

/// Three execs with pings between: `[exec1, ping, exec2, exec3]` ms.
fn execs(vm: &mut QemuVm, cmd: &str) -> anyhow::Result<[u128; 4]> {
    let mut out = [0; 4];
    for (i, slot) in out.iter_mut().enumerate() {
        let t = Instant::now();
        if i == 1 {
            vm.agent().ping(T)?;
        } else {
            let o = vm.agent().sh(cmd, T)?;
            anyhow::ensure!(o.success(), "{cmd}: {o:?}");
        }
        *slot = ms(t);
    }
    Ok(out)
}

fn trace(snap: &Snapshot, reps: usize, cmd: &str, work: &Path) -> anyhow::Result<()> {
    for warmed in [false, true] {
        trace_one(snap, reps, cmd, work, warmed)?;
    }
    Ok(())
}

fn trace_one(
    snap: &Snapshot,
    reps: usize,
    cmd: &str,
    work: &Path,
    warmed: bool,
) -> anyhow::Result<()> {
    let nc = CancellationToken::new();
    // Hash the files once for this process.
    drop(template::restore(snap, &RestoreSpec::default(), &nc)?);
    println!(
        "{:<10} {:>6} {:>7} {:>6} {:>5} {:>6} {:>7} | {:>6} {:>5} {:>6} {:>6}",
        "restore",
        "verify",
        "overlay",
        "spawn",
        "load",
        "start",
        "total",
        "exec1",
        "ping",
        "exec2",
        "exec3"
    );
    for i in 0..reps {
        // Plain: everything on the critical path.
        let t = Instant::now();
        let mut vm = template::restore(snap, &RestoreSpec::default(), &nc)?;
        let total = ms(t);
        let p = vm.phases;
        let e = execs(&mut vm, cmd)?;
        println!(
            "{:<10} {:>6} {:>7} {:>6} {:>5} {:>6} {:>7} | {:>6} {:>5} {:>6} {:>6} | {:.1}",
            "plain",
            p.verify,
            p.overlay,
            p.spawn,
            p.load,
            p.start,
            total,
            e[0],
            e[1],
            e[2],
            e[3],
            pss_mib(vm.pid())
        );
        drop(vm);
        // Prepared ahead (pool): only the start is on the critical path.
        let dir = work.join(format!("m{i}-{warmed}"));
        let prep = machine::prepare(
            snap,
            &MachineSpec {
                dir,
                timeout: T,
                nice: 0,
                net: None,
            },
            &nc,
        )?;
        let p = prep.phases();
        std::thread::sleep(Duration::from_millis(500));
        let mut prep = prep;
        let warm = if warmed {
            Some(prep.warm_up(T, &nc)?)
        } else {
            None
        };
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let mut r = prep.start(T, &nc)?;
        let total = ms(t);
        let e = execs(&mut r.vm, cmd)?;
        println!(
            "{:<10} {:>6} {:>7} {:>6} {:>5} {:>6} {:>7} | {:>6} {:>5} {:>6} {:>6} | {:.1}",
            if warmed { "warmed" } else { "prepared" },
            p.verify,
            p.overlay,
            p.spawn,
            p.load,
            r.vm.phases.start,
            total,
            e[0],
            e[1],
            e[2],
            e[3],
            pss_mib(r.vm.pid())
        );
        if let Some(w) = warm {
            println!("  (warm-up: guest ran {w} ms)");
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut reps = 5;
    let mut only: Option<String> = None;
    let mut debian = PathBuf::from("/var/tmp/nullspace-bench/oci-app");
    let mut cmd = "echo hi".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--reps" => reps = args.next().unwrap_or_default().parse()?,
            "--only" => only = args.next(),
            "--cmd" => cmd = args.next().unwrap_or_default(),
            "--debian-layout" => debian = PathBuf::from(args.next().unwrap_or_default()),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let work = tempfile::Builder::new().prefix("ns-trace-").tempdir()?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace)?;
    let vmm = QemuVmm::new(GuestKernel::find()?, &init, &work.path().join("cache"))?;
    println!(
        "accelerator {:?}; 2 vCPU, 512 MiB, mapped memory",
        vmm.accel
    );
    let mut r = Readiness::new(Probe::Tcp { port: 8080 });
    r.startup_grace = Duration::ZERO;
    r.timeout = Duration::from_secs(120);
    let want = |n: &str| only.as_deref().is_none_or(|o| o == n);
    let mut templates = vec![];
    if want("busybox") {
        let layout = work.path().join("demo-layout");
        nullspace_testkit::image::Layout::create(&layout)
            .image("1", &nullspace_testkit::image::demo_image()?)
            .finish();
        let rootfs = import(&layout, "1", &work.path().join("demo"))?;
        let mut c = GuestConfig::new("trace-busybox");
        c.env.insert("PATH".into(), "/bin".into());
        c.start_cmd = Some("exec httpd -f -p 8080 -h /srv".into());
        let mut spec = TemplateSpec::new(&rootfs, c);
        spec.readiness = Some(r.clone());
        templates.push(("busybox", spec));
    }
    if want("debian") && debian.join("index.json").exists() {
        let rootfs = import(&debian, "app", &work.path().join("debian"))?;
        let mut c = GuestConfig::new("trace-debian");
        c.start_cmd = Some("exec python3 -m http.server 8080".into());
        let mut spec = TemplateSpec::new(&rootfs, c);
        spec.boot_timeout = Duration::from_secs(120);
        spec.readiness = Some(r.clone());
        templates.push(("debian", spec));
    }
    for (name, mut spec) in templates {
        spec.memory_mode = MemoryMode::Mapped;
        let snap = template::build_snapshot(
            &vmm,
            &spec,
            &work.path().join(format!("snap-{name}")),
            &CancellationToken::new(),
        )?;
        println!(
            "\n{name}: boot {} ms, ready {} ms, snapshot {} ms",
            snap.meta.timings_ms.boot, snap.meta.timings_ms.ready, snap.meta.timings_ms.snapshot
        );
        let mdir = work.path().join(format!("machines-{name}"));
        std::fs::create_dir(&mdir)?;
        trace(&snap, reps, &cmd, &mdir)?;
    }
    Ok(())
}
