//! Machines of other sizes from one template: a VM booted at its ceiling
//! and snapshotted at its own size takes vCPUs and memory blocks on and
//! offline after a restore, and a snapshot keeps the size it had.

mod support;

use nullspace_model::size::Ceiling;
use nullspace_vm::qemu::{AfterSnapshot, QemuVm, RestoreSpec};
use nullspace_vm::template::{self, GuestConfig, TemplateSpec};
use nullspace_vm::{CancellationToken, Snapshot, Vm, VmError};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn sh(vm: &mut QemuVm, cmd: &str) -> String {
    let o = vm.agent().sh(cmd, T).unwrap();
    assert!(o.success(), "{cmd}: {o:?}");
    o.stdout_str().trim().to_string()
}

/// (online CPUs as `nproc` counts them, MemTotal in MiB), seen in the guest.
fn size_seen(vm: &mut QemuVm) -> (u32, u64) {
    let n = sh(vm, "nproc").parse().unwrap();
    let kb: u64 = sh(
        vm,
        "grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2",
    )
    .parse()
    .unwrap();
    (n, kb >> 10)
}

/// MemTotal is the online memory less what the kernel keeps for itself
/// (its image and the page structs of the whole ceiling): tens of MiB.
fn assert_memory(seen: u64, asked: u32) {
    assert!(
        seen <= asked as u64 && seen + 160 >= asked as u64,
        "MemTotal {seen} MiB for {asked} MiB asked"
    );
}

fn start_pid(vm: &mut QemuVm) -> u64 {
    vm.agent().info(T).unwrap()["start"]["pid"]
        .as_u64()
        .expect("the start command runs")
}

fn template_with_ceiling(f: &support::Fixture) -> Snapshot {
    let name = "sized";
    let disk = f.dir.join(format!("{name}.ext4"));
    std::fs::copy(&f.rootfs, &disk).unwrap();
    nullspace_vm::rootfs::grow(&disk, 256).unwrap();
    let mut config = GuestConfig::new(name);
    config.env.insert("PATH".into(), "/bin".into());
    config.start_cmd = Some("sleep 100000".into());
    let mut spec = TemplateSpec::new(&disk, config);
    spec.ceiling = Some(Ceiling::plan(2, 512, None, Some(2048)));
    let out = f.dir.join(name);
    let _ = std::fs::remove_dir_all(&out);
    template::build_snapshot(&f.vmm, &spec, &out, &CancellationToken::new()).expect("template")
}

#[test]
fn one_template_gives_machines_of_every_size_within_its_ceiling() {
    let _g = support::serial();
    let f = support::fixture("sizes");
    let snap = template_with_ceiling(f);
    let m = &snap.manifest;
    assert_eq!((m.device.vcpus, m.device.memory_mib), (2, 512));
    assert_eq!(
        m.device.ceiling.map(|c| (c.vcpus, c.memory_mib)),
        Some((4, 2048))
    );
    assert_eq!(m.memory.ram.as_ref().unwrap().size, 2048 << 20);
    assert!(
        m.device.kernel_cmdline.contains("movablecore=1664M"),
        "{}",
        m.device.kernel_cmdline
    );
    // Blocks went offline: the build's memory file holds only what the
    // guest touched (no balloon had to pass over the rest).
    let ram = snap.path(m.memory.ram.as_ref().unwrap());
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&ram).unwrap()) * 512;
    assert!(
        allocated < 256 << 20,
        "{allocated} bytes of RAM file allocated"
    );

    let mut vm = template::restore(&snap, &RestoreSpec::default(), &CancellationToken::new())
        .expect("restore");
    let (n, mem) = size_seen(&mut vm);
    assert_eq!(n, 2);
    assert_memory(mem, 512);
    let pid = start_pid(&mut vm);

    // Larger than the template.
    let t = Instant::now();
    vm.resize(4, 1536, T).expect("grow");
    eprintln!("[timing] grow to 4 vCPUs / 1536 MiB: {:?}", t.elapsed());
    let (n, mem) = size_seen(&mut vm);
    assert_eq!(n, 4);
    assert_memory(mem, 1536);
    assert_eq!(vm.meta().vcpus, 4);
    assert_eq!(vm.meta().memory_mb, 1536);
    // Memory that came online is usable: one buffer larger than the
    // template's whole memory.
    sh(&mut vm, "dd if=/dev/zero of=/dev/null bs=700M count=1");

    // Smaller than the template.
    let t = Instant::now();
    vm.resize(1, 512, T).expect("shrink");
    eprintln!("[timing] shrink to 1 vCPU / 512 MiB: {:?}", t.elapsed());
    let (n, mem) = size_seen(&mut vm);
    assert_eq!(n, 1);
    assert_memory(mem, 512);
    assert_eq!(start_pid(&mut vm), pid, "the start command goes on");

    // Outside the ceiling: refused before the guest is asked.
    for (v, mb) in [(5, 512), (2, 4096), (0, 512), (2, 64)] {
        match vm.resize(v, mb, T) {
            Err(VmError::Size(m)) => assert!(m.contains("not possible"), "{m}"),
            other => panic!("{v}/{mb}: {other:?}"),
        }
    }
    assert_eq!(size_seen(&mut vm).0, 1, "a refused size changes nothing");

    // A snapshot keeps the machine's size; its restore has it at once.
    vm.resize(3, 1024, T).expect("resize");
    sh(&mut vm, "echo kept > /tmp/mark");
    let out = f.dir.join("sized-snap");
    let _ = std::fs::remove_dir_all(&out);
    let child = vm
        .snapshot(&out, AfterSnapshot::Stop, &CancellationToken::new())
        .expect("snapshot");
    drop(vm);
    assert_eq!(
        (
            child.manifest.device.vcpus,
            child.manifest.device.memory_mib
        ),
        (3, 1024)
    );
    assert_eq!(child.manifest.device.ceiling, snap.manifest.device.ceiling);
    let mut again = template::restore(&child, &RestoreSpec::default(), &CancellationToken::new())
        .expect("restore the snapshot");
    let (n, mem) = size_seen(&mut again);
    assert_eq!(n, 3);
    assert_memory(mem, 1024);
    assert_eq!(sh(&mut again, "cat /tmp/mark"), "kept");
    assert_eq!(start_pid(&mut again), pid);
}
