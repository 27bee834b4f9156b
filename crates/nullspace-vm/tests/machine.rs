//! Machines (`nullspace_vm::machine`) under QEMU: restored into their own
//! directory and process group, snapshotted while running (the machine
//! goes on: fork) and into their end (pause), restored from those
//! snapshots with the files and the start process they had.
//! CPU-heavy: one VM test at a time.

use nullspace_vm::machine::{self, After, MachineSpec};
use nullspace_vm::qemu::QemuVmm;
use nullspace_vm::template::{self, GuestConfig, Snapshot, TemplateSpec};
use nullspace_vm::{GuestKernel, Probe, Readiness};
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
    template::build_snapshot(&vmm, &spec, &dir.join("template")).unwrap()
}

fn sh(agent: &mut nullspace_vm::AgentClient, cmd: &str) -> String {
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
        internet: true,
        timeout: T,
    }
}

#[test]
fn machines_fork_pause_and_restore() {
    let tmp = tempfile::Builder::new()
        .prefix("ns-mtest")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let snap = template(tmp.path());
    let machines = tmp.path().join("machines");
    std::fs::create_dir(&machines).unwrap();

    let mut a = machine::restore(&snap, &spec(machines.join("a"))).unwrap();
    assert!(a.handle.alive());
    assert_eq!(
        pgrp(a.handle.pid),
        a.handle.pid,
        "QEMU leads its own process group"
    );
    assert_eq!(machine::pidfile_pid(&a.handle.dir), Some(a.handle.pid));
    let start_pid = sh(&mut a.agent, "cat /tmp/pid");
    sh(&mut a.agent, "echo parent > /tmp/mine; sync");

    // Fork: a snapshot of the running machine, which goes on.
    let forked = tmp.path().join("snap-fork");
    let meta = machine::snapshot(&a.handle, &snap, &forked, After::Resume).unwrap();
    assert!(meta.memory_bytes > 0 && meta.disk_bytes > 0, "{meta:?}");
    assert_eq!(
        sh(&mut a.agent, "cat /tmp/mine"),
        "parent\n",
        "the parent runs on"
    );
    let fork_snap = Snapshot::open(&forked).unwrap();
    let mut b = machine::restore(&fork_snap, &spec(machines.join("b"))).unwrap();
    assert_eq!(
        sh(&mut b.agent, "cat /tmp/mine"),
        "parent\n",
        "the child has the parent's files"
    );
    assert_eq!(sh(&mut b.agent, "cat /tmp/pid"), start_pid);
    assert!(sh(&mut b.agent, "wget -q -O - http://127.0.0.1:8080/").contains("hello"));
    // They diverge.
    sh(&mut b.agent, "echo child > /tmp/mine");
    sh(&mut a.agent, "echo parent2 > /tmp/other");
    assert_eq!(sh(&mut a.agent, "cat /tmp/mine"), "parent\n");
    assert_eq!(
        sh(
            &mut b.agent,
            "cat /tmp/mine; test -e /tmp/other || echo none"
        ),
        "child\nnone\n"
    );

    // Pause: the snapshot takes the disk and QEMU ends.
    let paused = tmp.path().join("snap-pause");
    let a_pid = a.handle.pid;
    let a_dir = a.handle.dir.clone();
    machine::snapshot(&a.handle, &snap, &paused, After::Stop).unwrap();
    assert!(!a.handle.alive(), "QEMU {a_pid} ended");
    assert!(!a_dir.exists(), "the machine directory is gone");
    let mut a2 = machine::restore(
        &Snapshot::open(&paused).unwrap(),
        &spec(machines.join("a2")),
    )
    .unwrap();
    assert_eq!(
        sh(&mut a2.agent, "cat /tmp/mine /tmp/other"),
        "parent\nparent2\n"
    );
    assert_eq!(
        sh(&mut a2.agent, "cat /tmp/pid"),
        start_pid,
        "the start process survived the pause"
    );

    // A machine found again by its handle, once the first connection is
    // gone (what a restarted server does; QEMU serves one at a time).
    drop(a2.agent);
    let mut again = a2.handle.agent(T).unwrap();
    assert_eq!(sh(&mut again, "cat /tmp/mine"), "parent\n");
    drop(again);
    for h in [&a2.handle, &b.handle] {
        h.kill(Duration::from_secs(5)).unwrap();
        assert!(!h.alive() && !h.dir.exists());
    }
    // A failed restore leaves nothing: the directory exists already.
    std::fs::create_dir(machines.join("taken")).unwrap();
    assert!(machine::restore(&snap, &spec(machines.join("taken"))).is_err());
}
