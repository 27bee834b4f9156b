//! Volumes on a real guest (QEMU, TCG here): a spare disk re-pointed at an
//! ext4 image at run time is mounted by the agent, written, unmounted and
//! released; the host reads what the guest wrote; a read-only attachment
//! cannot change the image; the spare takes another image after.

mod support;

use nullspace_model::agent::MountSpec;
use nullspace_vm::spares::{self, SpareImage};
use nullspace_vm::{Vm, volume_image};
use std::time::{Duration, Instant};
use support::{boot, fixture, serial};

const T: Duration = Duration::from_secs(60);

fn sh(vm: &mut nullspace_vm::QemuVm, cmd: &str) -> String {
    let out = vm.agent().sh(cmd, T).unwrap();
    assert_eq!(
        out.code,
        Some(0),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn attach_mount_write_detach_and_read_on_the_host() {
    let _g = serial();
    let f = fixture("nullspace-vm-volumes");
    let mut vm = boot(f, "volumes", 1);
    assert_eq!(vm.meta().spare_disks, spares::SPARE_DISKS);
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("volume.raw");
    let size = 64 << 20;
    volume_image::create(&img, size).unwrap();
    let image = SpareImage {
        path: img.clone(),
        read_only: false,
        size,
    };

    let t = Instant::now();
    spares::attach(vm.dir(), 1, &image).unwrap();
    let qmp_ms = t.elapsed().as_millis();
    let st = vm
        .agent()
        .mount_volume(
            MountSpec {
                slot: 1,
                mount_path: "/mnt/data".into(),
                read_only: false,
                subpath: None,
                size_bytes: size,
            },
            T,
        )
        .unwrap();
    eprintln!(
        "[timing] attach: QMP {qmp_ms} ms, attach+mount {} ms",
        t.elapsed().as_millis()
    );
    assert!(st.mounted && st.total_bytes > 0, "{st:?}");
    sh(&mut vm, "echo from-guest > /mnt/data/hello.txt");
    // Throughput in the guest: 64 MiB… of a 64 MiB volume is too much; 32.
    let t = Instant::now();
    sh(
        &mut vm,
        "dd if=/dev/zero of=/mnt/data/big bs=1M count=32 conv=fsync 2>/dev/null",
    );
    let w = t.elapsed();
    let t = Instant::now();
    sh(
        &mut vm,
        "echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; dd if=/mnt/data/big of=/dev/null bs=1M 2>/dev/null",
    );
    let r = t.elapsed();
    eprintln!(
        "[timing] guest 32 MiB: write {:.0} MiB/s, read {:.0} MiB/s",
        32.0 / w.as_secs_f64(),
        32.0 / r.as_secs_f64()
    );
    let h = vm.agent().volume_health(1, "/mnt/data", T).unwrap();
    assert!(h.mounted && h.used_bytes >= 32 << 20, "{h:?}");

    vm.agent().unmount_volume(1, "/mnt/data", T).unwrap();
    let h = vm.agent().volume_health(1, "/mnt/data", T).unwrap();
    assert!(!h.mounted);
    spares::detach(vm.dir(), 1).unwrap();
    assert_eq!(
        volume_image::read(&img, "/hello.txt").unwrap(),
        b"from-guest\n"
    );

    // Read-only: the guest's writes never reach the image.
    let ro = SpareImage {
        read_only: true,
        ..image.clone()
    };
    spares::attach(vm.dir(), 1, &ro).unwrap();
    vm.agent()
        .mount_volume(
            MountSpec {
                slot: 1,
                mount_path: "/ro".into(),
                read_only: true,
                subpath: None,
                size_bytes: size,
            },
            T,
        )
        .unwrap();
    assert_eq!(sh(&mut vm, "cat /ro/hello.txt"), "from-guest\n");
    let out = vm.agent().sh("echo x > /ro/new.txt", T).unwrap();
    assert_ne!(out.code, Some(0), "a read-only mount took a write");
    // Even a raw write to the device lands in the overlay, not the image.
    let before = std::fs::read(&img).unwrap();
    let _ = vm.agent().sh(
        "dev=$(grep -l nsvol1 /sys/block/vd*/serial | cut -d/ -f4); dd if=/dev/zero of=/dev/$dev bs=4096 count=16 conv=fsync 2>&1",
        T,
    );
    vm.agent().unmount_volume(1, "/ro", T).unwrap();
    spares::detach(vm.dir(), 1).unwrap();
    assert!(std::fs::read(&img).unwrap() == before, "the image changed");

    // The spare takes a subpath mount of the same image again.
    spares::attach(vm.dir(), 1, &image).unwrap();
    vm.agent()
        .mount_volume(
            MountSpec {
                slot: 1,
                mount_path: "/sub".into(),
                read_only: false,
                subpath: Some("team".into()),
                size_bytes: size,
            },
            T,
        )
        .unwrap();
    sh(&mut vm, "echo s > /sub/s.txt");
    vm.agent().unmount_volume(1, "/sub", T).unwrap();
    spares::detach(vm.dir(), 1).unwrap();
    assert_eq!(volume_image::read(&img, "/team/s.txt").unwrap(), b"s\n");
}
