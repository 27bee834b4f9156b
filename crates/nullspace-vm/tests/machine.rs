//! Machines (`nullspace_vm::machine`) under QEMU: restored into their own
//! directory and process group, snapshotted while running (the machine
//! goes on: fork) and into their end (pause), restored from those
//! snapshots with the files and the start process they had.
//! CPU-heavy: one VM test at a time.

use nullspace_vm::machine::{self, MachineSpec};
use nullspace_vm::qemu::QemuVmm;
use nullspace_vm::template::{self, GuestConfig, Snapshot, TemplateSpec};
use nullspace_vm::{AfterSnapshot, CancellationToken, GuestKernel, Probe, Readiness};
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn template(dir: &Path) -> Snapshot {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace).expect("guest init");
    let img = nullspace_testkit::image::demo_image().expect("demo image");
    let layout = dir.join("layout");
    nullspace_testkit::image::Layout::create(&layout)
        .image("1", &img)
        .finish();
    let image = nullspace_oci::Image::resolve(
        &nullspace_oci::SourceRef::parse(&format!("oci:{}:1", layout.display())).unwrap(),
        &Default::default(),
    )
    .unwrap();
    nullspace_build::import::import(
        &image,
        &dir.join("rootfs"),
        &nullspace_build::import::ImportOptions::default(),
        &nullspace_oci::layout::NoProgress,
    )
    .unwrap();
    let vmm = QemuVmm::new(GuestKernel::find().unwrap(), &init, &dir.join("cache")).unwrap();
    let mut c = GuestConfig::new("machine-test");
    c.env.insert("PATH".into(), "/bin".into());
    c.start_cmd = Some("echo $$ > /tmp/pid; exec httpd -f -p 8080 -h /srv".into());
    let mut spec = TemplateSpec::new(&dir.join("rootfs/rootfs.ext4"), c);
    spec.readiness = Some(Readiness {
        probe: Probe::Tcp { port: 8080 },
        timeout: T,
        interval: Duration::from_millis(200),
        startup_grace: Duration::ZERO,
    });
    template::build_snapshot(
        &vmm,
        &spec,
        &dir.join("template"),
        &CancellationToken::new(),
    )
    .unwrap()
}

fn sh(agent: &nullspace_vm::AgentClient, cmd: &str) -> String {
    let out = agent.sh(cmd, T).unwrap();
    assert!(out.success(), "{cmd}: {out:?}");
    out.stdout_str()
}

fn pgrp(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap()
}

fn spec(dir: PathBuf) -> MachineSpec {
    MachineSpec {
        dir,
        timeout: T,
        nice: 0,
        net: None,
    }
}

#[test]
fn machines_fork_pause_reattach_and_restore() {
    let tmp = tempfile::Builder::new()
        .prefix("ns-mtest")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let snap = template(tmp.path());
    let machines = tmp.path().join("machines");
    std::fs::create_dir(&machines).unwrap();
    let tok = CancellationToken::new();

    let mut a = machine::restore(&snap, &spec(machines.join("a")), &tok).unwrap();
    assert!(a.handle.alive());
    assert_eq!(
        pgrp(a.handle.pid),
        a.handle.pid,
        "QEMU leads its own process group"
    );
    assert_eq!(
        machine::pidfile_pid(&machines.join("a")),
        Some(a.handle.pid)
    );
    assert_eq!(
        machine::vm_dir(&machines.join("a")).as_deref(),
        Some(a.handle.dir.as_path())
    );
    let start_pid = sh(&a.agent, "cat /tmp/pid");
    sh(&a.agent, "echo parent > /tmp/mine; sync");

    // Fork: a snapshot of the running machine, which goes on (with a new
    // agent connection: QEMU serves one, so ours goes first).
    drop(a.agent);
    let forked = tmp.path().join("snap-fork");
    let fork_snap = a.vm.snapshot(&forked, AfterSnapshot::Resume, &tok).unwrap();
    let a_agent = nullspace_vm::Vm::agent(&mut a.vm).clone();
    assert_eq!(
        sh(&a_agent, "cat /tmp/mine"),
        "parent\n",
        "the parent runs on"
    );
    let b = machine::restore(&fork_snap, &spec(machines.join("b")), &tok).unwrap();
    assert_eq!(
        sh(&b.agent, "cat /tmp/mine"),
        "parent\n",
        "the child has the parent's files"
    );
    assert_eq!(sh(&b.agent, "cat /tmp/pid"), start_pid);
    assert!(sh(&b.agent, "wget -q -O - http://127.0.0.1:8080/").contains("hello"));
    // They diverge.
    sh(&b.agent, "echo child > /tmp/mine");
    sh(&a_agent, "echo parent2 > /tmp/other");
    assert_eq!(sh(&a_agent, "cat /tmp/mine"), "parent\n");
    assert_eq!(
        sh(&b.agent, "cat /tmp/mine; test -e /tmp/other || echo none"),
        "child\nnone\n"
    );

    // A process that restarts takes the machine over by its handle (the
    // old value is released, not killed) and can still pause it.
    drop(a_agent);
    let handle = a.vm.detach();
    let mut a = machine::reattach(&handle, snap.clone(), T).unwrap();
    assert_eq!(sh(&a.agent, "cat /tmp/other"), "parent2\n");
    drop(a.agent);
    let paused = tmp.path().join("snap-pause");
    let pause_snap = a.vm.snapshot(&paused, AfterSnapshot::Stop, &tok).unwrap();
    drop(a.vm);
    assert!(!handle.alive(), "QEMU {} ended", handle.pid);
    handle.kill(Duration::from_secs(1)).unwrap();
    let a2 = machine::restore(&pause_snap, &spec(machines.join("a2")), &tok).unwrap();
    assert_eq!(
        sh(&a2.agent, "cat /tmp/mine /tmp/other"),
        "parent\nparent2\n"
    );
    assert_eq!(
        sh(&a2.agent, "cat /tmp/pid"),
        start_pid,
        "the start process survived the pause"
    );

    for r in [a2, b] {
        let h = r.handle.clone();
        drop(r);
        h.kill(Duration::from_secs(5)).unwrap();
        assert!(!h.alive() && !h.dir.exists());
    }
    // A failed restore leaves nothing behind, and an existing directory is refused.
    std::fs::create_dir(machines.join("taken")).unwrap();
    assert!(machine::restore(&snap, &spec(machines.join("taken")), &tok).is_err());
    assert!(
        machines.join("taken").exists(),
        "not someone else's directory"
    );
}
