//! Snapshots under real QEMU (TCG here): mapped restores continue the guest,
//! are isolated from each other and never write the template's memory
//! file; snapshots of restored (paused) VMs; verification against the
//! manifest (tampering, moved directories, the host kernel gone, format and
//! QEMU versions); cancellation and stale-process reaping.
//! CPU-heavy: run with `--test-threads=1`.

use nullspace_model::build::step::Step;
use nullspace_vm::machine::{self, MachineSpec};
use nullspace_vm::qemu::{AfterSnapshot, MemoryMode, QemuVm, QemuVmm, RestoreSpec};
use nullspace_vm::qmp::RunState;
use nullspace_vm::template::{self, GuestConfig, Snapshot, StepEvent, TemplateSpec};
use nullspace_vm::{CancellationToken, GuestKernel, Probe, Readiness, Vm, VmError};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

struct Fixture {
    kernel: GuestKernel,
    init: PathBuf,
    vmm: QemuVmm,
    rootfs: PathBuf,
    dir: PathBuf,
    /// A mapped template with the counter start command (read-only: tests
    /// that change files work on copies).
    template: Snapshot,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| build_fixture().expect("fixture"))
}

fn build_fixture() -> anyhow::Result<Fixture> {
    use nullspace_oci::SourceRef;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nullspace-vm-snapshots");
    if dir.exists() {
        // Read-only files from an earlier run: the directory is writable.
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(dir.join("images"))?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace)?;
    let layout = dir.join("images/demo-layout");
    nullspace_testkit::image::Layout::create(&layout)
        .image("1", &nullspace_testkit::image::demo_image()?)
        .finish();
    let image = nullspace_oci::Image::resolve(
        &SourceRef::parse(&format!("oci:{}:1", layout.display()))?,
        &Default::default(),
    )?;
    let out = dir.join("images/demo");
    nullspace_build::import::import(
        &image,
        &out,
        &nullspace_build::import::ImportOptions::default(),
        &nullspace_oci::layout::NoProgress,
    )?;
    let rootfs = out.join("rootfs.ext4");
    let kernel = GuestKernel::find()?;
    let vmm = QemuVmm::new(kernel.clone(), &init, &dir.join("cache"))?;
    let t = Instant::now();
    let template = template::build_snapshot(
        &vmm,
        &counter_spec(&rootfs, MemoryMode::Mapped),
        &dir.join("template"),
        &CancellationToken::new(),
    )?;
    eprintln!(
        "[timing] template: boot {} ms, ready {} ms, snapshot {} ms, commit {} ms (total {:?}); memory {} MiB on disk, device state {} KiB",
        template.meta.timings_ms.boot,
        template.meta.timings_ms.ready,
        template.meta.timings_ms.snapshot,
        template.meta.timings_ms.commit,
        t.elapsed(),
        template.meta.memory_bytes >> 20,
        template.meta.state_bytes >> 10,
    );
    Ok(Fixture {
        kernel,
        init,
        vmm,
        rootfs,
        dir,
        template,
    })
}

/// The start command holds a random token in its environment (process
/// memory, generated at boot) and counts in a shell variable, writing the
/// count every 100 ms; ready once it counted to 20. (`echo > file`
/// truncates first: a read may see "", which [`count`] reads again. A
/// rename into place would cost the 1-vCPU guest a `mv` process every
/// 100 ms, enough to widen other races under TCG.)
fn counter_spec(rootfs: &Path, mode: MemoryMode) -> TemplateSpec {
    let mut c = GuestConfig::new("nullspace-snap");
    c.env.insert("PATH".into(), "/bin".into());
    c.start_cmd = Some(
        "export TOKEN=$(cat /proc/sys/kernel/random/uuid); echo $TOKEN > /tmp/token; \
         exec sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done'"
            .into(),
    );
    let mut spec = TemplateSpec::new(rootfs, c);
    spec.memory_mb = 256;
    spec.vcpus = 1;
    spec.memory_mode = mode;
    spec.boot_timeout = Duration::from_secs(120);
    let mut r = Readiness::new(Probe::Command {
        command: "test \"$(cat /tmp/count)\" -ge 20".into(),
    });
    r.startup_grace = Duration::ZERO;
    r.interval = Duration::from_millis(200);
    r.timeout = Duration::from_secs(120);
    spec.readiness = Some(r);
    spec
}

fn nocancel() -> CancellationToken {
    CancellationToken::new()
}

fn restore(snap: &Snapshot) -> QemuVm {
    template::restore(snap, &RestoreSpec::default(), &nocancel()).expect("restore")
}

fn sh(vm: &mut QemuVm, cmd: &str) -> String {
    let o = vm.agent().sh(cmd, T).unwrap();
    assert!(o.success(), "{cmd}: {o:?}");
    o.stdout_str().trim().to_string()
}

/// What the start process looks like from inside the guest.
#[derive(Debug, PartialEq)]
struct Proc {
    pid: u64,
    /// /proc/PID/stat start time (clock ticks after boot).
    started: String,
    token: String,
}

fn start_proc(vm: &mut QemuVm) -> Proc {
    let pid = vm.agent().info(T).unwrap()["start"]["pid"]
        .as_u64()
        .expect("start pid");
    let started = sh(vm, &format!("cut -d' ' -f22 /proc/{pid}/stat"));
    let token = sh(
        vm,
        &format!("tr '\\0' '\\n' < /proc/{pid}/environ | sed -n 's/^TOKEN=//p'"),
    );
    assert_eq!(token.len(), 36, "a uuid: {token:?}");
    Proc {
        pid,
        started,
        token,
    }
}

fn count(vm: &mut QemuVm) -> u64 {
    // Between the writer's truncate and write the file is empty.
    for _ in 0..50 {
        if let Ok(n) = sh(vm, "cat /tmp/count").parse() {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("/tmp/count stayed empty")
}

fn sha256(p: &Path) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(p).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// QEMU processes that are this test process's children and whose command
/// line contains `needle` (other engineers run VMs on this machine).
fn our_qemus(needle: &str) -> Vec<u32> {
    let me = std::process::id().to_string();
    let mut v = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().nth(1))
            .unwrap_or("");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if comm.trim() == "qemu-system-x86"
            && ppid == me
            && alive(pid)
            && String::from_utf8_lossy(&cmdline).contains(needle)
        {
            v.push(pid);
        }
    }
    v
}

/// The restored QEMU's mapping of `file` in /proc/PID/maps and its
/// `Anonymous:` kB (pages this VM changed: private copies).
fn mapping(pid: u32, file: &Path) -> (String, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let name = file.display().to_string();
    let mut lines = smaps.lines();
    while let Some(l) = lines.next() {
        if l.ends_with(&name) {
            let perms = l.split_whitespace().nth(1).unwrap().to_string();
            for m in lines.by_ref() {
                if let Some(kb) = m.strip_prefix("Anonymous:") {
                    let kb = kb.trim().trim_end_matches(" kB").trim().parse().unwrap();
                    return (perms, kb);
                }
            }
        }
    }
    panic!("{name} not mapped by {pid}");
}

/// VM tests run one at a time (TCG is CPU-heavy).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A writable copy of `snap`'s directory (files keep their read-only mode).
fn copy_snapshot(snap: &Snapshot, to: &Path) -> Snapshot {
    let st = std::process::Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(&snap.dir)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
    Snapshot::open(to).unwrap()
}

#[test]
fn mapped_and_streamed_restores_continue_where_the_snapshot_left_off() {
    let _s = serial();
    let f = fixture();
    let streamed_dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let streamed = template::build_snapshot(
        &f.vmm,
        &counter_spec(&f.rootfs, MemoryMode::Streamed),
        &streamed_dir.path().join("snap"),
        &nocancel(),
    )
    .expect("streamed snapshot");
    eprintln!(
        "[timing] streamed template: snapshot {} ms (total {:?}), stream {} MiB; mapped: snapshot {} ms, device state {} KiB",
        streamed.meta.timings_ms.snapshot,
        t.elapsed(),
        streamed.meta.state_bytes >> 20,
        f.template.meta.timings_ms.snapshot,
        f.template.meta.state_bytes >> 10,
    );
    // The formats: mapped RAM in its own file, device state only in the
    // stream; streamed: RAM in the stream.
    let m = &f.template.manifest;
    assert_eq!(m.memory.mode, MemoryMode::Mapped);
    assert_eq!(m.memory.ram.as_ref().unwrap().size, 256 << 20);
    assert!(m.memory.state.size < 4 << 20, "{}", m.memory.state.size);
    assert_eq!(streamed.manifest.memory.mode, MemoryMode::Streamed);
    assert!(streamed.manifest.memory.ram.is_none());
    assert!(streamed.manifest.memory.state.size > 16 << 20);
    assert!(streamed.manifest.memory.state.size > 10 * m.memory.state.size);
    for name in [
        "memory.ram",
        "device.state",
        "disk.ext4",
        "vmlinuz",
        "initrd.img",
    ] {
        let mode = std::fs::metadata(f.template.dir.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o222, 0, "{name} read-only");
    }

    for snap in [&f.template, &streamed] {
        let mode = snap.manifest.memory.mode;
        let start_pid = snap.meta.start["pid"].as_u64().expect("start pid");
        let mut vms = [restore(snap), restore(snap)];
        let procs: Vec<Proc> = vms.iter_mut().map(start_proc).collect();
        // The same process (pid, start time) holding the same random token
        // generated at boot: memory came from the snapshot, nothing re-ran.
        assert_eq!(procs[0], procs[1], "{mode:?}");
        assert_eq!(procs[0].pid, start_pid, "{mode:?}");
        let token = String::from_utf8(vms[0].agent().read_file("/tmp/token", T).unwrap()).unwrap();
        assert_eq!(token.trim(), procs[0].token, "{mode:?}");
        // The counter continues from where it was (a restarted process
        // would count from 1), in both.
        for vm in vms.iter_mut() {
            let c1 = count(vm);
            assert!(c1 >= 20, "{mode:?}: count {c1} right after restore");
            std::thread::sleep(Duration::from_millis(700));
            let c2 = count(vm);
            assert!(c2 > c1, "{mode:?}: counter runs: {c1} -> {c2}");
        }
        let pid = vms[0].pid();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        match mode {
            MemoryMode::Mapped | MemoryMode::Delta => {
                let ram = snap.path(snap.manifest.memory.ram.as_ref().unwrap());
                let (perms, _) = mapping(pid, &ram);
                assert_eq!(perms, "rw-p", "a private (copy-on-write) mapping");
                assert!(cmdline.contains("-incoming defer"), "{cmdline}");
            }
            MemoryMode::Streamed => assert!(!cmdline.contains("memory-backend-file"), "{cmdline}"),
        }
        // No kernel file at all (not the host's /boot): the guest's kernel
        // is in the memory it continues from.
        assert!(
            !cmdline.contains("-kernel") && !cmdline.contains("-initrd"),
            "{cmdline}"
        );
    }
}

#[test]
fn restored_vms_do_not_see_each_others_memory_and_the_template_file_stays_unchanged() {
    let _s = serial();
    let f = fixture();
    let ram = f
        .template
        .path(f.template.manifest.memory.ram.as_ref().unwrap());
    let before = sha256(&ram);
    assert_eq!(
        before,
        f.template.manifest.memory.ram.as_ref().unwrap().sha256
    );
    let mut a = restore(&f.template);
    let mut b = restore(&f.template);
    // Guest RAM writes: tmpfs files live in guest memory only.
    sh(
        &mut a,
        "head -c 33554432 /dev/urandom > /dev/shm/a; md5sum < /dev/shm/a",
    );
    sh(&mut b, "echo only-b > /dev/shm/b");
    assert!(!b.agent().sh("test -e /dev/shm/a", T).unwrap().success());
    assert!(!a.agent().sh("test -e /dev/shm/b", T).unwrap().success());
    // Process memory: stopping B's counter does not stop A's.
    let pid = start_proc(&mut b).pid;
    sh(&mut b, &format!("kill -STOP {pid}"));
    let (ca, cb) = (count(&mut a), count(&mut b));
    std::thread::sleep(Duration::from_millis(700));
    assert!(count(&mut a) > ca, "A counts on ({ca})");
    assert_eq!(count(&mut b), cb, "B's counter is stopped");
    // A's writes are private copies in its QEMU (copy-on-write pages).
    let (_, anon_kb) = mapping(a.pid(), &ram);
    assert!(
        anon_kb >= 32 << 10,
        "A's changed pages are private: {anon_kb} kB"
    );
    drop(a);
    drop(b);
    assert_eq!(
        sha256(&ram),
        before,
        "the template's memory file is unchanged"
    );
    // A fresh restore still sees the template's memory, not A's or B's.
    let mut c = restore(&f.template);
    assert!(
        !c.agent()
            .sh("test -e /dev/shm/a || test -e /dev/shm/b", T)
            .unwrap()
            .success()
    );
}

#[test]
fn snapshot_of_a_paused_restored_vm_keeps_its_files_and_processes() {
    let _s = serial();
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let mut a = restore(&f.template);
    let template_proc = start_proc(&mut a);
    // State of A's own: a file on disk, a file in guest memory (tmpfs), and
    // a new process holding a value in its environment.
    sh(
        &mut a,
        "echo on-disk > /srv/forked.txt; echo in-ram > /dev/shm/forked",
    );
    let bg = sh(
        &mut a,
        "FORKVAL=v-$(cat /proc/sys/kernel/random/uuid) setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $!",
    );
    // `$!` may still be the shell's fork, with the shell's environment,
    // until it execs: wait for the variable.
    let forkval = sh(
        &mut a,
        &format!(
            "for i in $(seq 200); do tr '\\0' '\\n' < /proc/{bg}/environ | grep ^FORKVAL= && exit 0; sleep 0.05; done; exit 1"
        ),
    );
    let c_before = count(&mut a);
    a.pause().unwrap();
    assert_eq!(a.status().unwrap(), RunState::Paused);
    let t = Instant::now();
    let fork = a
        .snapshot(&work.path().join("fork"), AfterSnapshot::Pause, &nocancel())
        .expect("snapshot of a paused VM");
    eprintln!(
        "[timing] snapshot of a restored VM: paused {} ms, commit {} ms (total {:?}); memory {} MiB on disk, overlay {} KiB",
        fork.meta.timings_ms.snapshot,
        fork.meta.timings_ms.commit,
        t.elapsed(),
        fork.meta.memory_bytes >> 20,
        fork.manifest.disk[1].file.size >> 10,
    );
    // Left paused: the guest's counter does not move while paused.
    assert_eq!(a.status().unwrap(), RunState::Postmigrate);
    a.resume(T).unwrap();
    assert!(count(&mut a) >= c_before);
    sh(
        &mut a,
        "echo later > /srv/after-fork.txt; rm /dev/shm/forked",
    );

    // The fork's directory stands alone: the template's files are linked
    // in, the disk gains A's overlay, memory is the template's RAM file
    // (linked) and a stream of what A changed.
    let m = &fork.manifest;
    assert_eq!(
        m.parent.as_ref().unwrap().manifest_sha256,
        f.template.manifest_sha256
    );
    assert_eq!(m.disk.len(), 2);
    assert_eq!(m.disk[0], f.template.manifest.disk[0]);
    assert_eq!(m.memory.mode, MemoryMode::Delta);
    assert_eq!(m.memory.ram, f.template.manifest.memory.ram);
    let linked = |snap: &Snapshot, file: &str| {
        use std::os::unix::fs::MetadataExt;
        let ino = |d: &Path| std::fs::metadata(d.join(file)).unwrap().ino();
        assert_eq!(
            ino(&snap.dir),
            ino(&f.template.dir),
            "{file} of {}: hard-linked, not copied",
            snap.dir.display()
        );
    };
    linked(&fork, "disk.ext4");
    linked(&fork, "memory.ram");
    let whole = (m.device.memory_mib as u64) << 20;
    assert!(
        m.memory.state.size < whole / 4,
        "a delta of {} bytes for {whole} bytes of RAM",
        m.memory.state.size
    );
    drop(a);

    let check = |vm: &mut QemuVm, what: &str| {
        assert_eq!(sh(vm, "cat /srv/forked.txt"), "on-disk", "{what}");
        assert_eq!(sh(vm, "cat /dev/shm/forked"), "in-ram", "{what}");
        assert!(
            !vm.agent()
                .sh("test -e /srv/after-fork.txt", T)
                .unwrap()
                .success(),
            "{what}"
        );
        assert_eq!(
            sh(
                vm,
                &format!("tr '\\0' '\\n' < /proc/{bg}/environ | grep ^FORKVAL=")
            ),
            forkval,
            "{what}: the background process with its memory"
        );
        assert_eq!(start_proc(vm), template_proc, "{what}: the start process");
        let c = count(vm);
        assert!(c >= c_before, "{what}: count {c} continues from {c_before}");
    };
    let mut b = restore(&fork);
    check(&mut b, "restored from the fork");
    // A snapshot of that (stopping it), restored again: three disk layers.
    let fork2 = b
        .snapshot(&work.path().join("fork2"), AfterSnapshot::Stop, &nocancel())
        .expect("snapshot of a snapshot");
    assert_eq!(b.pid(), 0, "stopped");
    assert_eq!(fork2.manifest.disk.len(), 3);
    // Still one delta against the template's file, not a chain of them.
    assert_eq!(fork2.manifest.memory.mode, MemoryMode::Delta);
    linked(&fork2, "memory.ram");
    assert!(fork2.manifest.memory.state.size < whole / 4);
    eprintln!(
        "[size] deltas: fork {} KiB, fork of the fork {} KiB",
        m.memory.state.size >> 10,
        fork2.manifest.memory.state.size >> 10
    );
    let mut c = restore(&fork2);
    check(&mut c, "restored from the fork of the fork");
    // Keeping the VM running through a snapshot.
    let fork3 = c
        .snapshot(
            &work.path().join("fork3"),
            AfterSnapshot::Resume,
            &nocancel(),
        )
        .unwrap();
    assert_eq!(c.status().unwrap(), RunState::Running);
    let n = count(&mut c);
    std::thread::sleep(Duration::from_millis(500));
    assert!(count(&mut c) > n);
    drop(c);
    let mut d = restore(&fork3);
    check(&mut d, "restored from a snapshot of a running VM");
}

/// Flips one byte of `p` in place (size and mtime kept: only the content
/// and ctime change).
fn flip_byte(p: &Path, at: u64) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let mtime = f.metadata().unwrap().modified().unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, at).unwrap();
    f.set_modified(mtime).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o444)).unwrap();
}

#[test]
fn tampered_snapshot_files_are_refused_naming_the_file() {
    let _s = serial();
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let snap = copy_snapshot(&f.template, &work.path().join("snap"));
    // Verified once (restores after this reuse the per-file result) …
    drop(restore(&snap));
    for (name, at) in [
        ("memory.ram", 1u64 << 20),
        ("disk.ext4", 1 << 16),
        ("device.state", 100),
        ("vmlinuz", 4096),
        ("initrd.img", 10),
    ] {
        let p = snap.dir.join(name);
        flip_byte(&p, at);
        let t = Instant::now();
        let err = template::restore(&snap, &RestoreSpec::default(), &nocancel())
            .err()
            .unwrap_or_else(|| panic!("{name}: tampered snapshot restored"));
        let msg = err.to_string();
        eprintln!("[refused in {:?}] {msg}", t.elapsed());
        assert!(matches!(err, VmError::Corrupt { .. }), "{name}: {err:?}");
        assert_eq!(err.code(), "snapshot_corrupt");
        assert!(
            msg.contains(&format!("{}: {name} (", snap.dir.display())),
            "{msg}"
        );
        assert!(msg.contains("sha256"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
        assert!(
            our_qemus(&snap.dir.display().to_string()).is_empty(),
            "no VM started"
        );
        flip_byte(&p, at);
    }
    // Size and presence.
    let p = snap.dir.join("device.state");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let full = std::fs::read(&p).unwrap();
    std::fs::write(&p, &full[..full.len() - 1]).unwrap();
    let msg = template::restore(&snap, &RestoreSpec::default(), &nocancel())
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("device.state (device state): ") && msg.contains("bytes, the manifest says"),
        "{msg}"
    );
    std::fs::write(&p, &full).unwrap();
    std::fs::rename(snap.dir.join("initrd.img"), work.path().join("initrd.img")).unwrap();
    let msg = template::restore(&snap, &RestoreSpec::default(), &nocancel())
        .err()
        .unwrap()
        .to_string();
    assert!(msg.ends_with("initrd.img (initramfs): missing"), "{msg}");
    std::fs::rename(work.path().join("initrd.img"), snap.dir.join("initrd.img")).unwrap();
    // Put back, the snapshot restores again.
    let mut vm = restore(&snap);
    assert!(count(&mut vm) >= 20);
}

#[test]
fn a_moved_snapshot_restores_and_does_not_need_the_host_kernel() {
    let _s = serial();
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    // A kernel that disappears after the build (as after a kernel upgrade).
    let kdir = work.path().join("boot");
    std::fs::create_dir(&kdir).unwrap();
    let vmlinuz = kdir.join(f.kernel.vmlinuz.file_name().unwrap());
    std::fs::copy(&f.kernel.vmlinuz, &vmlinuz).unwrap();
    let kernel = GuestKernel::from_vmlinuz(&vmlinuz).unwrap();
    let vmm = QemuVmm::new(kernel, &f.init, &f.dir.join("cache")).unwrap();
    let first = work.path().join("a/snap");
    std::fs::create_dir_all(first.parent().unwrap()).unwrap();
    let snap = template::build_snapshot(
        &vmm,
        &counter_spec(&f.rootfs, MemoryMode::Mapped),
        &first,
        &nocancel(),
    )
    .unwrap();
    let json = std::fs::read_to_string(first.join("snapshot.json")).unwrap();
    assert!(
        !json.contains(&work.path().display().to_string()),
        "no absolute paths: {json}"
    );
    let token = {
        let mut vm = restore(&snap);
        start_proc(&mut vm).token
    };
    std::fs::remove_dir_all(&kdir).unwrap();
    let moved = work.path().join("elsewhere/deeper/snap");
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    std::fs::rename(&first, &moved).unwrap();
    let snap = Snapshot::open(&moved).unwrap();
    let mut vm = restore(&snap);
    assert_eq!(start_proc(&mut vm).token, token, "the same guest, moved");
    assert!(count(&mut vm) >= 20);
}

#[test]
fn older_formats_and_other_qemu_versions_are_refused_with_one_clear_line() {
    let _s = serial();
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    // The unversioned snapshot.json earlier nullspace versions wrote.
    let legacy = work.path().join("legacy");
    std::fs::create_dir(&legacy).unwrap();
    std::fs::write(
        legacy.join("snapshot.json"),
        r#"{"vm":{"vmlinuz":"/boot/vmlinuz-6.1.0-56-cloud-amd64","kernel_version":"6.1.0-56-cloud-amd64","memory_mb":512,"vcpus":2,"accel":"tcg"},"config":{},"start":null,"disk_bytes":1,"memory_bytes":1,"timings_ms":{"boot":1,"ready":1,"snapshot":1}}"#,
    )
    .unwrap();
    let err = Snapshot::open(&legacy).unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, VmError::Incompatible { .. }), "{err:?}");
    assert!(
        msg.contains("format 1") && msg.ends_with("rebuild the template"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));

    let snap = copy_snapshot(&f.template, &work.path().join("snap"));
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let p = snap.dir.join("snapshot.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    };
    edit(&|v| v["format_version"] = serde_json::json!(3));
    let msg = Snapshot::open(&snap.dir).unwrap_err().to_string();
    assert!(
        msg.contains("format 3; this nullspace reads format 2: rebuild the template"),
        "{msg}"
    );
    // A snapshot of another QEMU major version: refused by the new QEMU
    // (QMP query-version) before it loads any state; no QEMU left.
    edit(&|v| {
        v["format_version"] = serde_json::json!(2);
        v["qemu"]["major"] = serde_json::json!(7);
        v["qemu"]["minor"] = serde_json::json!(2);
    });
    let snap = Snapshot::open(&snap.dir).unwrap();
    let err = template::restore(&snap, &RestoreSpec::default(), &nocancel())
        .err()
        .unwrap();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, VmError::Incompatible { .. }), "{err:?}");
    assert!(
        msg.contains("made by QEMU 7.2.") && msg.contains("this host runs QEMU 10."),
        "{msg}"
    );
    assert!(our_qemus(&snap.dir.display().to_string()).is_empty());
    // A manifest that points outside its directory.
    edit(&|v| {
        v["qemu"]["major"] = serde_json::json!(10);
        v["kernel"]["file"]["path"] = serde_json::json!("../../../boot/vmlinuz");
    });
    let msg = Snapshot::open(&snap.dir).unwrap_err().to_string();
    assert!(
        msg.contains("snapshot.json: invalid manifest: kernel file"),
        "{msg}"
    );
}

/// Builds with `steps` and `readiness`, cancelling 1.5 s after the step
/// event `cancel_on` picks; checks the call returns `Cancelled` within 2 s
/// of the cancel with its QEMU (pid from the run directory's pidfile) gone
/// and nothing left in the run directory or the output.
fn cancel_build(
    name: &str,
    steps: Vec<Step>,
    readiness: Readiness,
    cancel_on: fn(&StepEvent<'_>, usize, usize) -> bool,
) {
    let f = fixture();
    let work = tempfile::Builder::new()
        .prefix("ns-cancel-")
        .tempdir()
        .unwrap();
    let run = work.path().join("run");
    let vmm = QemuVmm::with_run_dir(f.kernel.clone(), &f.init, &f.dir.join("cache"), &run).unwrap();
    let mut spec = counter_spec(&f.rootfs, MemoryMode::Mapped);
    spec.readiness = Some(readiness);
    let out = work.path().join("snap");
    let token = CancellationToken::new();
    let cancelled_at: std::sync::Arc<std::sync::Mutex<Option<Instant>>> = Default::default();
    let qemu_pid = std::sync::Arc::new(std::sync::Mutex::new(0u32));
    let n = steps.len();
    let mut on_step = |i: usize, _: &Step, ev: StepEvent<'_>| {
        if cancel_on(&ev, i, n) {
            // QEMU's record in the VM's directory under the run directory.
            let pid = std::fs::read_dir(&run)
                .unwrap()
                .flatten()
                .find_map(|e| {
                    let recs = nullspace_vm::process::PidDir::new(e.path()).recorded();
                    recs.first().map(|r| r.pid)
                })
                .expect("QEMU's record in the run directory");
            *qemu_pid.lock().unwrap() = pid;
            let (token, at) = (token.clone(), cancelled_at.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(1500));
                *at.lock().unwrap() = Some(Instant::now());
                token.cancel();
            });
        }
    };
    let no_context = std::env::temp_dir();
    let native = template::NativeSteps::new(&steps, &no_context);
    let err = template::build_snapshot_with_steps(&vmm, &spec, &native, &mut on_step, &out, &token)
        .err()
        .unwrap_or_else(|| panic!("{name}: the build must be cancelled"));
    let took = cancelled_at.lock().unwrap().expect("cancelled").elapsed();
    let pid = *qemu_pid.lock().unwrap();
    eprintln!("[timing] {name}: cancelled build returned {took:?} after the cancel: {err}");
    assert!(matches!(err, VmError::Cancelled), "{name}: {err:?}");
    assert_eq!(err.code(), "cancelled");
    assert!(took < Duration::from_secs(2), "{name}: {took:?}");
    assert!(
        !alive(pid),
        "{name}: QEMU {pid} gone when the call returned"
    );
    assert!(
        our_qemus(&run.display().to_string()).is_empty(),
        "{name}: no QEMU left"
    );
    assert!(!out.exists(), "{name}: half-written snapshot removed");
    assert_eq!(
        std::fs::read_dir(&run).unwrap().count(),
        0,
        "{name}: VM directory removed"
    );
}

#[test]
fn cancel_during_a_slow_readiness_wait_kills_qemu_within_2s() {
    let _s = serial();
    let mut r = Readiness::new(Probe::Command {
        command: "false".into(),
    });
    r.timeout = Duration::from_secs(300);
    r.interval = Duration::from_secs(5);
    r.startup_grace = Duration::ZERO;
    // Cancel 1.5 s after the (only) step finished: the start command runs
    // and the probe fails every 5 s.
    cancel_build(
        "readiness",
        vec![Step::Run {
            command: "true".into(),
            user: None,
        }],
        r,
        |ev, i, n| matches!(ev, StepEvent::Finished { .. }) && i + 1 == n,
    );
}

#[test]
fn cancel_during_a_long_step_kills_qemu_within_2s() {
    let _s = serial();
    cancel_build(
        "step",
        vec![
            Step::Run {
                command: "echo before".into(),
                user: None,
            },
            Step::Run {
                command: "sleep 600".into(),
                user: None,
            },
        ],
        Readiness::new(Probe::Command {
            command: "true".into(),
        }),
        |ev, i, _| matches!(ev, StepEvent::Started) && i == 1,
    );
}

#[test]
fn a_cancelled_restore_leaves_nothing() {
    let _s = serial();
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    token.cancel();
    let spec = RestoreSpec {
        work_dir: Some(work.path().to_path_buf()),
        timeout: T,
        ..Default::default()
    };
    let err = template::restore(&f.template, &spec, &token).err().unwrap();
    assert!(matches!(err, VmError::Cancelled), "{err:?}");
    // Cancelled while QEMU loads: killed, directory gone.
    let token = CancellationToken::new();
    let t2 = token.clone();
    // A mapped restore can be done in about 150 ms: cancel well before.
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        t2.cancel();
    });
    let r = template::restore(&f.template, &spec, &token);
    match r {
        Err(VmError::Cancelled) => {}
        Ok(vm) => panic!("restored in under 30 ms?: {}", vm.ready_ms),
        Err(e) => panic!("{e:?}"),
    }
    assert!(our_qemus(&work.path().display().to_string()).is_empty());
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
}

#[test]
fn reap_stale_ends_a_qemu_a_dead_owner_left_and_keeps_live_ones() {
    use nullspace_vm::process::{OwnerLock, PidDir, ProcessRecord};
    let _s = serial();
    let work = tempfile::Builder::new()
        .prefix("ns-reap-")
        .tempdir()
        .unwrap();
    let run = work.path().join("run");
    // A VM directory in the run directory's one format: its owner's lock,
    // QEMU's `<pid>.json` record. `hold`: the owner (this process) lives.
    let spawn = |name: &str, hold: bool| {
        let dir = run.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let lock = OwnerLock::within(&dir).unwrap();
        let child = std::process::Command::new("qemu-system-x86_64")
            .args(["-M", "microvm", "-S", "-display", "none", "-nodefaults"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::mem::forget(lock.pids.record(child.id()).unwrap());
        (dir, child, hold.then_some(lock))
    };
    let (stale_dir, mut stale, _) = spawn("ns-vm-stale", false);
    let (live_dir, mut live, _live_lock) = spawn("ns-vm-live", true);
    // A dead owner's record whose pid now runs something else.
    let mut other = std::process::Command::new("sleep")
        .arg("100")
        .spawn()
        .unwrap();
    let fake = run.join("ns-vm-fake");
    std::fs::create_dir_all(&fake).unwrap();
    drop(OwnerLock::within(&fake).unwrap());
    let mut rec = ProcessRecord::of(other.id()).unwrap();
    rec.cmdline = vec!["qemu-system-x86_64".into(), "-M".into(), "microvm".into()];
    std::fs::write(
        fake.join(format!("{}.json", other.id())),
        serde_json::to_vec(&rec).unwrap(),
    )
    .unwrap();
    assert_eq!(PidDir::new(&fake).recorded(), [rec]);

    let r = nullspace_vm::reap_stale(&run, Duration::from_secs(5)).unwrap();
    let killed: Vec<u32> = r.killed.iter().map(|k| k.pid).collect();
    assert_eq!(killed, vec![stale.id()], "only the stale QEMU");
    stale.wait().unwrap();
    let mut dead = r.dead_vm_dirs.clone();
    dead.sort();
    assert_eq!(dead, ["ns-vm-fake", "ns-vm-stale"]);
    assert!(
        !stale_dir.exists() && !fake.exists(),
        "stale directories removed"
    );
    assert!(alive(live.id()), "a live owner's QEMU is kept");
    assert!(live_dir.exists());
    assert!(alive(other.id()), "a reused pid is not killed");
    // Nothing left to do the second time.
    let again = nullspace_vm::reap_stale(&run, Duration::from_secs(5)).unwrap();
    assert!(again.killed.is_empty() && again.dead_vm_dirs.is_empty());
    for c in [&mut live, &mut other] {
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

#[test]
fn build_vms_record_their_qemu_in_a_locked_run_dir_and_the_kvm_probe_leaves_nothing() {
    use nullspace_vm::process::{PidDir, records::LOCK_FILE};
    let _s = serial();
    let f = fixture();
    let me = std::process::id().to_string();
    // The fixture's QemuVmm ran the KVM probe (when /dev/kvm exists).
    assert!(our_qemus("ns-kvmprobe-").is_empty());
    let probes = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ns-kvmprobe-"))
        .filter(|e| std::fs::read_to_string(e.path().join(LOCK_FILE)).is_ok_and(|o| o.trim() == me))
        .count();
    assert_eq!(probes, 0, "the probe's directory is removed");
    let work = tempfile::Builder::new()
        .prefix("ns-run-")
        .tempdir()
        .unwrap();
    let run = work.path().join("run");
    let vmm = QemuVmm::with_run_dir(f.kernel.clone(), &f.init, &f.dir.join("cache"), &run).unwrap();
    let disk = work.path().join("disk.ext4");
    std::fs::copy(&f.rootfs, &disk).unwrap();
    let mut spec = nullspace_vm::BootSpec::new(&disk, GuestConfig::new("x"));
    spec.memory_mb = 128;
    spec.vcpus = 1;
    spec.boot_timeout = Duration::from_secs(120);
    let mut vm = QemuVm::boot(&vmm, &spec, &nocancel()).unwrap();
    let dir = vm.dir().to_path_buf();
    assert!(dir.starts_with(std::fs::canonicalize(&run).unwrap()));
    let recs = PidDir::new(&dir).running();
    assert_eq!(recs.len(), 1, "{recs:?}");
    let pid = recs[0].pid;
    assert_eq!(pid, vm.pid());
    assert_eq!(recs[0].cmdline[0], "qemu-system-x86_64");
    let owner = std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap();
    assert_eq!(owner.trim(), me);
    // This process is alive: reaping leaves the VM alone.
    let r = nullspace_vm::reap_stale(&run, Duration::from_secs(5)).unwrap();
    assert!(r.killed.is_empty() && r.dead_vm_dirs.is_empty(), "{r:?}");
    assert_eq!(sh(&mut vm, "echo up"), "up");
    drop(vm);
    assert!(!alive(pid));
    assert!(!dir.exists());
}

#[test]
fn cancel_during_a_snapshot_of_a_restored_vm_keeps_the_vm_and_leaves_nothing() {
    let _s = serial();
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let mut vm = restore(&f.template);
    // While the VM is paused for the migration (the delta filter reading
    // QEMU's stream), at several points: a snapshot takes ~100-300 ms here.
    let mut cancelled = 0;
    for (i, delay) in [20u64, 50, 90].into_iter().enumerate() {
        let before = count(&mut vm);
        let token = CancellationToken::new();
        let t2 = token.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay));
            t2.cancel();
        });
        let out = work.path().join(format!("fork{i}"));
        let t = Instant::now();
        let r = vm.snapshot(&out, AfterSnapshot::Resume, &token);
        eprintln!(
            "[timing] snapshot cancelled after {delay} ms returned after {:?}: {:?}",
            t.elapsed(),
            r.as_ref().err()
        );
        match r {
            Err(VmError::Cancelled) => {
                cancelled += 1;
                assert!(!out.exists(), "nothing half-written");
            }
            Ok(_) => {}
            Err(e) => panic!("{e:?}"),
        }
        // The VM itself goes on (resumed, as asked).
        assert_eq!(vm.status().unwrap(), RunState::Running);
        vm.reconnect_agent(T).unwrap();
        let t = Instant::now();
        while count(&mut vm) <= before {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "after a cancel at {delay} ms the VM's counter is stuck at {before}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert!(cancelled > 0, "no snapshot was still running 20 ms in?");
}

/// The guest's `/proc/uptime` (seconds since boot, on the guest's clock,
/// which stands still while the VM is paused).
fn uptime(vm: &mut QemuVm) -> f64 {
    sh(vm, "cut -d' ' -f1 /proc/uptime").parse().unwrap()
}

#[test]
fn a_prepared_vm_waits_paused_and_then_starts_where_the_snapshot_left_off() {
    let _s = serial();
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    // The reference: a plain restore, asked at once.
    let mut plain = restore(&f.template);
    let u_plain = uptime(&mut plain);
    let template_proc = start_proc(&mut plain);
    drop(plain);
    let spec = MachineSpec {
        dir: work.path().join("m1"),
        timeout: T,
        nice: 0,
        net: None,
    };
    let mut p = machine::prepare(&f.template, &spec, &nocancel()).expect("prepare");
    assert_eq!(p.status().unwrap(), RunState::Paused);
    let pid = p.handle().pid;
    assert_eq!(
        std::fs::read_to_string(spec.dir.join(machine::PID_FILE))
            .unwrap()
            .trim(),
        pid.to_string(),
        "its pidfile"
    );
    // Waiting costs the guest nothing: it does not run while pooled.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(p.status().unwrap(), RunState::Paused);
    let t = Instant::now();
    let mut r = p.start(T, &nocancel()).expect("start");
    eprintln!(
        "[timing] prepared VM: prepare phases {:?}; start {} ms (call {:?})",
        r.vm.phases,
        r.vm.phases.start,
        t.elapsed()
    );
    let vm = &mut r.vm;
    let u = uptime(vm);
    assert!(
        u < u_plain + 2.0,
        "the guest ran while prepared: uptime {u} s against {u_plain} s for a plain restore"
    );
    // The same start process, with its memory (the token), counting on.
    assert_eq!(start_proc(vm), template_proc);
    let c1 = count(vm);
    std::thread::sleep(Duration::from_millis(700));
    assert!(count(vm) > c1, "the counter runs");
    // Its clock was set: the guest's wall clock is the host's.
    let guest: u64 = sh(vm, "date +%s").parse().unwrap();
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(guest.abs_diff(host) <= 5, "guest {guest}, host {host}");
    drop(r);
    // A prepared VM dropped unstarted leaves nothing.
    let spec2 = MachineSpec {
        dir: work.path().join("m2"),
        timeout: T,
        nice: 0,
        net: None,
    };
    let p2 = machine::prepare(&f.template, &spec2, &nocancel()).unwrap();
    let pid2 = p2.handle().pid;
    drop(p2);
    assert!(!alive(pid2));
    assert!(!spec2.dir.exists());
}

/// The niceness of every thread of `pid`.
fn nice_of(pid: u32) -> Vec<i64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap();
            // Field 19, counted after the parenthesised name (field 2).
            stat.rsplit(')')
                .next()
                .unwrap()
                .split_whitespace()
                .nth(16)
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

/// `/proc/PID/cmdline` of a QEMU, spaces for NULs.
fn cmdline(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
        .replace('\0', " ")
}

#[test]
fn pool_entries_of_different_templates_and_sizes_never_mix() {
    use nullspace_vm::pool::{Pool, PoolConfig, PoolKey};
    use std::sync::{Arc, Mutex};
    let _s = serial();
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    // A second template: the same image, another size.
    let mut spec = counter_spec(&f.rootfs, MemoryMode::Mapped);
    spec.memory_mb = 320;
    let other = template::build_snapshot(&f.vmm, &spec, &work.path().join("t320"), &nocancel())
        .expect("a 320 MiB template");
    let machines = work.path().join("machines");
    std::fs::create_dir(&machines).unwrap();
    // What the pool records (the server: its run directory), live.
    let records: Arc<Mutex<Vec<u32>>> = Default::default();
    struct Record(Arc<Mutex<Vec<u32>>>, u32);
    impl Drop for Record {
        fn drop(&mut self) {
            self.0.lock().unwrap().retain(|p| *p != self.1);
        }
    }
    let rec = records.clone();
    let n = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let pool = Pool::new(PoolConfig {
        net: None,
        size: 1,
        max_size: 1,
        demand_window: Duration::from_secs(10),
        admit: None,
        wait_for_refill: Duration::ZERO,
        max_keys: 4,
        idle: Duration::from_secs(600),
        dir: machines.clone(),
        new_id: Arc::new(move || {
            format!(
                "mch_t{}",
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            )
        }),
        timeout: T,
        warm_up: true,
        // Niced while pooled (root runs these tests; see the take below).
        nice: if nullspace_vm::process::may_raise_priority() {
            10
        } else {
            0
        },
        quiet: Duration::from_millis(100),
        recorder: Some(Arc::new(move |pid| {
            rec.lock().unwrap().push(pid);
            Some(Box::new(Record(rec.clone(), pid)) as Box<dyn Send>)
        })),
    });
    let a = PoolKey::of("tpl-a", &f.template);
    let b = PoolKey::of("tpl-b", &other);
    assert_ne!(a.memory_mb, b.memory_mb);
    // The first takes miss and make the keys wanted.
    assert!(pool.take("tpl-a", &f.template).is_none());
    assert!(pool.take("tpl-b", &other).is_none());
    assert!(
        pool.wait_full(Duration::from_secs(180)),
        "{:?}",
        pool.stats()
    );
    let pooled = our_qemus(&machines.display().to_string());
    assert_eq!(pooled.len(), 2, "one entry per key");
    assert_eq!(records.lock().unwrap().len(), 2, "both recorded");
    // The same snapshot under another label is another key: nothing of
    // A's is handed out for it.
    assert!(pool.take("tpl-c", &f.template).is_none());
    // (That miss made tpl-c wanted: dropped again, with what it got.)
    pool.remove(|k| k.label == "tpl-c");
    let check = |e: &nullspace_vm::pool::Entry, snap: &Snapshot, mb: u32| {
        let c = cmdline(e.pid());
        let ram = snap.path(snap.manifest.memory.ram.as_ref().unwrap());
        assert!(c.contains(&ram.display().to_string()), "{c}");
        assert!(c.contains(&format!("-m {mb} ")), "{c}");
        assert!(e.dir().starts_with(&machines));
    };
    let ea = pool.take("tpl-a", &f.template).expect("A's entry");
    assert_eq!(ea.key, a);
    check(&ea, &f.template, 256);
    let eb = pool.take("tpl-b", &other).expect("B's entry");
    assert_eq!(eb.key, b);
    check(&eb, &other, 320);
    let (pa, pb) = (ea.pid(), eb.pid());
    let niced = nullspace_vm::process::may_raise_priority();
    if niced {
        assert_eq!(nice_of(pa), vec![10; nice_of(pa).len()], "pooled: niced");
    }
    let mut ma = ea.start(T, &nocancel()).unwrap();
    let mut mb = eb.start(T, &nocancel()).unwrap();
    for p in [pa, pb] {
        let n = nice_of(p);
        assert!(n.len() > 1 && n.iter().all(|x| *x == 0), "a machine: {n:?}");
    }
    // Taken: no longer the pool's records.
    let recs = records.lock().unwrap().clone();
    assert!(!recs.contains(&pa) && !recs.contains(&pb), "{recs:?}");
    let mem_kb = |vm: &mut QemuVm| -> u64 {
        sh(
            vm,
            "sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo",
        )
        .parse()
        .unwrap()
    };
    let (ka, kb) = (mem_kb(&mut ma.vm), mem_kb(&mut mb.vm));
    assert!(
        kb > ka + (40 << 10),
        "MemTotal {ka} kB (256 MiB) vs {kb} kB (320 MiB)"
    );
    // Each continues its own template's start process (warmed up in the
    // pool: a moment past the snapshot, the same process and memory).
    for (vm, snap) in [(&mut ma.vm, &f.template), (&mut mb.vm, &other)] {
        let p = start_proc(vm);
        assert_eq!(p.pid, snap.meta.start["pid"].as_u64().unwrap());
        let token = sh(vm, "cat /tmp/token");
        assert_eq!(token, p.token);
        let c1 = count(vm);
        std::thread::sleep(Duration::from_millis(500));
        assert!(count(vm) > c1);
    }
    // Removing B's key ends its refilled entry; A's stays.
    assert!(
        pool.wait_full(Duration::from_secs(180)),
        "{:?}",
        pool.stats()
    );
    let stats = pool.stats();
    assert!(
        stats
            .iter()
            .any(|(k, s)| *k == a && s.hits == 1 && s.ready == 1),
        "{stats:?}"
    );
    assert_eq!(pool.remove(|k| *k == b), 1);
    // The pool ends its own (including the refills), not the machines.
    drop(pool);
    assert!(
        our_qemus(&machines.display().to_string())
            .iter()
            .all(|p| *p == pa || *p == pb)
    );
    assert!(alive(pa) && alive(pb), "taken machines run on");
    assert!(records.lock().unwrap().is_empty());
    let dirs: Vec<String> = std::fs::read_dir(&machines)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        dirs.len(),
        2,
        "only the two machines' directories: {dirs:?}"
    );
    drop(ma);
    drop(mb);
}
