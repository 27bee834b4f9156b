//! Build-VM figures for `bench/vm.sh`, the earlier design (memory streamed
//! through the migration stream) and the current one (memory mapped from
//! the snapshot's file) side by side in one run, for the busybox demo
//! template and (when cached) the Debian-based bench image:
//! boot to ready, snapshot time and size, restore to first exec, PSS of
//! N idle restored VMs, and the snapshot of a restored VM.
//!
//! `cargo run -p nullspace-vm --example vm_bench -- [--reps N] [--pss 1,8] [--debian-layout DIR] [--only busybox|debian]`

use nullspace_oci::SourceRef;
use nullspace_vm::qemu::{AfterSnapshot, MemoryMode, QemuVm, QemuVmm, RestoreSpec};
use nullspace_vm::template::{self, GuestConfig, Snapshot, TemplateSpec};
use nullspace_vm::{CancellationToken, GuestKernel, Probe, Readiness, Vm};
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

/// Figures of one template in one memory mode.
#[derive(Default)]
struct Mode {
    boot_ready_ms: u64,
    snapshot_ms: u64,
    commit_ms: u64,
    /// Bytes on disk of the memory (allocated blocks) and device state.
    memory_disk: u64,
    state: u64,
    restore_exec_ms: Vec<u128>,
    /// N -> total PSS (kB) of N idle restored QEMUs.
    pss_kb: Vec<(usize, u64)>,
    fork: Option<Fork>,
}

struct Fork {
    paused_ms: u64,
    commit_ms: u64,
    memory_disk: u64,
    /// Pages the restored VM changed (its private copies), kB.
    changed_kb: u64,
    restore_exec_ms: u128,
}

fn median(v: &[u128]) -> u128 {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn pss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `Anonymous:` kB of `pid`'s mapping of `file` (the pages it changed).
fn changed_kb(pid: u32, file: &Path) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let name = file.display().to_string();
    let mut lines = smaps.lines();
    while let Some(l) = lines.next() {
        if l.ends_with(&name) {
            for m in lines.by_ref() {
                if let Some(kb) = m.strip_prefix("Anonymous:") {
                    return kb.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                }
            }
        }
    }
    0
}

fn restore(snap: &Snapshot) -> anyhow::Result<QemuVm> {
    Ok(template::restore(
        snap,
        &RestoreSpec::default(),
        &CancellationToken::new(),
    )?)
}

fn first_exec(vm: &mut QemuVm) -> anyhow::Result<()> {
    let o = vm.agent().sh("echo hi", Duration::from_secs(60))?;
    anyhow::ensure!(o.stdout_str() == "hi\n", "exec after restore: {o:?}");
    Ok(())
}

fn bench_mode(
    vmm: &QemuVmm,
    spec: &TemplateSpec,
    mode: MemoryMode,
    reps: usize,
    pss: &[usize],
    work: &Path,
) -> anyhow::Result<Mode> {
    let mut spec = spec.clone();
    spec.memory_mode = mode;
    let out = work.join(format!("snap-{mode:?}"));
    let snap = template::build_snapshot(vmm, &spec, &out, &CancellationToken::new())?;
    let t = &snap.meta.timings_ms;
    let mut r = Mode {
        boot_ready_ms: t.boot + t.ready,
        snapshot_ms: t.snapshot,
        commit_ms: t.commit,
        memory_disk: snap.meta.memory_bytes,
        state: snap.meta.state_bytes,
        ..Default::default()
    };
    // Restores one at a time (the first also verifies the files' sha256
    // once for this process).
    let _ = restore(&snap)?;
    for _ in 0..reps {
        let t = Instant::now();
        let mut vm = restore(&snap)?;
        first_exec(&mut vm)?;
        r.restore_exec_ms.push(t.elapsed().as_millis());
    }
    for &n in pss {
        let mut vms = vec![];
        for _ in 0..n {
            let mut vm = restore(&snap)?;
            first_exec(&mut vm)?;
            vms.push(vm);
        }
        std::thread::sleep(Duration::from_secs(3));
        r.pss_kb
            .push((n, vms.iter().map(|v| pss_kb(v.pid())).sum()));
    }
    // A snapshot of a restored VM that wrote 16 MiB to guest memory.
    let mut vm = restore(&snap)?;
    vm.agent().sh(
        "head -c 16777216 /dev/urandom > /dev/shm/bench",
        Duration::from_secs(60),
    )?;
    let changed = vm
        .memory_file()
        .map(|f| changed_kb(vm.pid(), &f))
        .unwrap_or(0);
    let fork = vm.snapshot(
        &work.join(format!("fork-{mode:?}")),
        AfterSnapshot::Stop,
        &CancellationToken::new(),
    )?;
    drop(vm);
    let t = Instant::now();
    let mut vm = restore(&fork)?;
    first_exec(&mut vm)?;
    r.fork = Some(Fork {
        paused_ms: fork.meta.timings_ms.snapshot,
        commit_ms: fork.meta.timings_ms.commit,
        memory_disk: fork.meta.memory_bytes,
        changed_kb: changed,
        restore_exec_ms: t.elapsed().as_millis(),
    });
    Ok(r)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.1}x", a / b)
    } else {
        "-".into()
    }
}

fn report(name: &str, s: &Mode, m: &Mode) {
    println!("\n{name}");
    println!(
        "{:<44} {:>14} {:>14} {:>9}",
        "", "streamed", "mapped", "s/m"
    );
    let row = |label: &str, a: f64, b: f64, fmt: &dyn Fn(f64) -> String| {
        println!(
            "{:<44} {:>14} {:>14} {:>9}",
            label,
            fmt(a),
            fmt(b),
            ratio(a, b)
        );
    };
    let int = |v: f64| format!("{v:.0}");
    let mib = |v: f64| format!("{:.1}", v / (1 << 20) as f64);
    let kib = |v: f64| format!("{:.0}", v / 1024.0);
    row(
        "boot -> ready ms",
        s.boot_ready_ms as f64,
        m.boot_ready_ms as f64,
        &int,
    );
    row(
        "snapshot ms (VM paused, state written)",
        s.snapshot_ms as f64,
        m.snapshot_ms as f64,
        &int,
    );
    row(
        "snapshot commit ms (exit, fsync, sha256)",
        s.commit_ms as f64,
        m.commit_ms as f64,
        &int,
    );
    row("migration stream KiB", s.state as f64, m.state as f64, &kib);
    row(
        "memory on disk MiB (stream / RAM file + state)",
        s.memory_disk as f64,
        m.memory_disk as f64,
        &mib,
    );
    row(
        "restore -> first exec ms (median)",
        median(&s.restore_exec_ms) as f64,
        median(&m.restore_exec_ms) as f64,
        &int,
    );
    println!(
        "{:<44} {:>14} {:>14}",
        "  (each)",
        format!("{:?}", s.restore_exec_ms),
        format!("{:?}", m.restore_exec_ms)
    );
    for ((n, a), (_, b)) in s.pss_kb.iter().zip(&m.pss_kb) {
        row(
            &format!("PSS of {n} idle restored VM(s), MiB total"),
            *a as f64 * 1024.0,
            *b as f64 * 1024.0,
            &mib,
        );
        row(
            &format!("  per VM (N={n}), MiB"),
            *a as f64 * 1024.0 / *n as f64,
            *b as f64 * 1024.0 / *n as f64,
            &mib,
        );
    }
    if let (Some(a), Some(b)) = (&s.fork, &m.fork) {
        println!("snapshot of a restored VM that wrote 16 MiB to guest memory:");
        row(
            "  VM paused ms",
            a.paused_ms as f64,
            b.paused_ms as f64,
            &int,
        );
        row(
            "  commit ms (overlay copy, links, sha256)",
            a.commit_ms as f64,
            b.commit_ms as f64,
            &int,
        );
        row(
            "  memory on disk MiB",
            a.memory_disk as f64,
            b.memory_disk as f64,
            &mib,
        );
        row(
            "  pages the VM changed MiB (what a delta holds)",
            a.changed_kb as f64 * 1024.0,
            b.changed_kb as f64 * 1024.0,
            &mib,
        );
        row(
            "  restore of it -> first exec ms",
            a.restore_exec_ms as f64,
            b.restore_exec_ms as f64,
            &int,
        );
    }
}

fn main() -> anyhow::Result<()> {
    let mut reps = 5;
    let mut pss = vec![1, 8];
    let mut only: Option<String> = None;
    let mut debian = PathBuf::from("/var/tmp/nullspace-bench/oci-app");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--reps" => reps = args.next().unwrap_or_default().parse()?,
            "--pss" => {
                pss = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|n| n.parse())
                    .collect::<Result<_, _>>()?
            }
            "--only" => only = args.next(),
            "--debian-layout" => debian = PathBuf::from(args.next().unwrap_or_default()),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let work = tempfile::Builder::new().prefix("ns-vmbench-").tempdir()?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace)?;
    let vmm = QemuVmm::new(GuestKernel::find()?, &init, &work.path().join("cache"))?;
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()?;
    println!(
        "accelerator: {:?}; VM: 2 vCPU, 512 MiB; {}",
        vmm.accel,
        String::from_utf8_lossy(&qemu.stdout)
            .lines()
            .next()
            .unwrap_or("")
    );
    println!(
        "streamed = the earlier design (RAM in the migration stream; no bandwidth cap now, the earlier code had QEMU's 128 MiB/s default); mapped = RAM file + device state, restores map it copy-on-write"
    );

    let mut r = Readiness::new(Probe::Tcp { port: 8080 });
    r.startup_grace = Duration::ZERO;
    let want = |n: &str| only.as_deref().is_none_or(|o| o == n);
    if want("busybox") {
        let layout = work.path().join("demo-layout");
        nullspace_testkit::image::Layout::create(&layout)
            .image("1", &nullspace_testkit::image::demo_image()?)
            .finish();
        let rootfs = import(&layout, "1", &work.path().join("demo"))?;
        let mut c = GuestConfig::new("bench-busybox");
        c.env.insert("PATH".into(), "/bin".into());
        c.start_cmd = Some("exec httpd -f -p 8080 -h /srv".into());
        let mut spec = TemplateSpec::new(&rootfs, c);
        spec.readiness = Some(r.clone());
        let dir = work.path().join("busybox");
        std::fs::create_dir(&dir)?;
        let s = bench_mode(&vmm, &spec, MemoryMode::Streamed, reps, &pss, &dir)?;
        let m = bench_mode(&vmm, &spec, MemoryMode::Mapped, reps, &pss, &dir)?;
        report("busybox (demo), httpd", &s, &m);
    }
    if want("debian") {
        if debian.join("index.json").exists() {
            let rootfs = import(&debian, "app", &work.path().join("debian"))?;
            let mut c = GuestConfig::new("bench-debian");
            c.start_cmd = Some("exec python3 -m http.server 8080".into());
            let mut spec = TemplateSpec::new(&rootfs, c);
            spec.boot_timeout = Duration::from_secs(120);
            r.timeout = Duration::from_secs(120);
            spec.readiness = Some(r);
            let dir = work.path().join("debian-snapshots");
            std::fs::create_dir(&dir)?;
            let s = bench_mode(&vmm, &spec, MemoryMode::Streamed, reps, &pss, &dir)?;
            let m = bench_mode(&vmm, &spec, MemoryMode::Mapped, reps, &pss, &dir)?;
            report("debian bookworm + python3, python3 -m http.server", &s, &m);
        } else {
            println!(
                "debian: SKIPPED ({} not found; build it with `sudo bash bench/import.sh --build-only`)",
                debian.display()
            );
        }
    }
    Ok(())
}
