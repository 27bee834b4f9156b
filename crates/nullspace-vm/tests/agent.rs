//! The host↔guest channel against a real guest (QEMU, TCG here): bounded
//! memory and lines, background processes, attach, files as a non-root
//! user, concurrent requests on one connection, cancellation.
//! CPU-heavy: the tests take a lock and run one VM at a time.

use nullspace_model::agent::{ErrorCode, FileKind};
use nullspace_vm::qemu::{BootSpec, QemuVm, QemuVmm};
use nullspace_vm::template::GuestConfig;
use nullspace_vm::{ExecRequest, GuestKernel, Limits, Stream, Vm, VmError, WriteOptions};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

struct Fixture {
    vmm: QemuVmm,
    rootfs: PathBuf,
    dir: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| build_fixture().expect("fixture"))
}

fn build_fixture() -> anyhow::Result<Fixture> {
    use nullspace_oci::SourceRef;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nullspace-vm-agent");
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
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A VM booted from a private copy of the demo rootfs (grown to 256 MB),
/// with the demo image's runtime defaults (user app, workdir /srv).
fn boot(name: &str, vcpus: u32) -> QemuVm {
    let f = fixture();
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
    let vm = QemuVm::boot(&f.vmm, &spec, &nullspace_vm::CancellationToken::new()).expect("boot");
    eprintln!("[timing] {name}: booted in {:?}", t.elapsed());
    vm
}

const T: Duration = Duration::from_secs(60);

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

/// An exec that prints 2 GiB: the host keeps 1 MiB of it, reports the rest
/// as dropped, passes every byte to the callback, and its peak RSS grows by
/// no more than the client's stated memory bound (plus allocator slack).
#[test]
fn exec_printing_2_gib_stays_within_the_memory_bound() {
    let _s = serial();
    let mut vm = boot("big-output", 2);
    let agent = vm.agent().clone();
    let total: u64 = std::env::var("NS_AGENT_BIG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048)
        << 20;
    // Reset the peak RSS to the current RSS (Linux >= 4.0).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let rss0 = status_kb("VmRSS:");
    let mut seen = 0u64;
    let mut nonzero = 0u64;
    let t = Instant::now();
    let out = agent
        .exec_streaming(
            &ExecRequest {
                cmd: Some(format!(
                    "dd if=/dev/zero bs=1048576 count={} 2>/dev/null; echo done >&2",
                    total >> 20
                )),
                ..Default::default()
            },
            Duration::from_secs(3600),
            &mut |s, d| {
                if s == Stream::Stdout {
                    seen += d.len() as u64;
                    nonzero += d.iter().filter(|b| **b != 0).count() as u64;
                }
            },
        )
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let hwm = status_kb("VmHWM:");
    let grew = (hwm.saturating_sub(rss0)) << 10;
    let bound = agent.limits().memory_bound(1);
    eprintln!(
        "[figures] {} MiB in {secs:.1} s ({:.1} MiB/s); host RSS {} KiB -> peak {} KiB: +{} KiB (stated bound {} KiB)",
        total >> 20,
        (total >> 20) as f64 / secs,
        rss0,
        hwm,
        grew >> 10,
        bound >> 10
    );
    assert!(out.success(), "{out:?}");
    assert_eq!(seen, total, "every chunk reached the callback");
    assert_eq!(nonzero, 0);
    assert_eq!(out.stdout.len(), 1 << 20, "1 MiB kept");
    assert_eq!(out.stdout_dropped, total - (1 << 20));
    assert!(out.truncated);
    assert_eq!(out.stderr, b"done\n");
    // Slack: allocator arenas, the reader thread's stack, decoded copies.
    assert!(
        grew <= (bound + (8 << 20)) as u64,
        "peak RSS grew by {grew} bytes, bound {bound}"
    );
}

/// Flow control: a consumer slower than the guest's output neither grows
/// the host's memory (the guest waits for credit; the process blocks on its
/// pipe) nor delays other requests on the same connection.
#[test]
fn slow_reader_neither_buffers_nor_stalls_others() {
    let _s = serial();
    let mut vm = boot("slow-reader", 2);
    let agent = vm.agent().clone();
    let pinger = agent.clone();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done2 = done.clone();
    let pings = std::thread::spawn(move || {
        let mut worst = Duration::ZERO;
        let mut n = 0;
        while !done2.load(std::sync::atomic::Ordering::SeqCst) {
            let t = Instant::now();
            pinger.ping(T).unwrap();
            worst = worst.max(t.elapsed());
            n += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
        (n, worst)
    });
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let rss0 = status_kb("VmRSS:");
    let mut seen = 0usize;
    let t = Instant::now();
    let out = agent
        .exec_streaming(
            &ExecRequest::shell("dd if=/dev/zero bs=1048576 count=32 2>/dev/null"),
            Duration::from_secs(600),
            &mut |_, d| {
                seen += d.len();
                // About 3 MiB/s: slower than the guest produces.
                std::thread::sleep(Duration::from_millis(20));
            },
        )
        .unwrap();
    let took = t.elapsed();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (n, worst) = pings.join().unwrap();
    let grew = status_kb("VmHWM:").saturating_sub(rss0) << 10;
    let bound = agent.limits().memory_bound(1) as u64;
    eprintln!(
        "[figures] slow reader: 32 MiB in {took:?}; peak RSS +{} KiB (bound {} KiB); {n} pings meanwhile, slowest {worst:?}",
        grew >> 10,
        bound >> 10
    );
    assert!(out.success());
    assert_eq!(seen, 32 << 20);
    assert!(grew <= bound + (8 << 20), "peak RSS grew by {grew} bytes");
    assert!(n >= 5, "{n} pings");
    // Not queued behind the stream (which took the whole `took`); the bound
    // is loose because TCG guests on a loaded host answer slowly.
    assert!(
        worst < Duration::from_secs(5) && worst * 3 < took,
        "a ping waited {worst:?} during a {took:?} stream"
    );
}

/// A reply line longer than the client's limit drops the connection with a
/// clear error instead of being buffered; a new connection works. A request
/// longer than the guest's limit is refused before anything is sent.
#[test]
fn over_long_lines_are_refused() {
    let _s = serial();
    let mut vm = boot("long-line", 1);
    // A client that accepts 16 KiB lines: one 64 KiB output chunk (87 KiB
    // of base64) is a real guest line over its limit.
    let small = Limits {
        max_line: 16 << 10,
        ..Default::default()
    };
    let a = vm.reconnect_agent_with(small, T).unwrap();
    a.ping(T).unwrap();
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let rss0 = status_kb("VmRSS:");
    // dd writes 64 KiB blocks: the agent reads them as large chunks.
    let err = match a.sh("dd if=/dev/zero bs=65536 count=8 2>/dev/null", T) {
        Ok(o) => panic!("accepted: {} bytes of stdout", o.stdout.len()),
        Err(e) => e,
    };
    let grew = status_kb("VmHWM:").saturating_sub(rss0) << 10;
    eprintln!(
        "[figures] over-long line refused: {err}; peak RSS +{} KiB",
        grew >> 10
    );
    assert!(
        matches!(&err, VmError::Agent(m) if m.contains("longer than 16384 bytes")),
        "{err}"
    );
    assert!(
        grew < 4 << 20,
        "nothing like the line was buffered: +{grew}"
    );
    // The connection is gone, clearly.
    let again = a.ping(T).unwrap_err();
    assert!(again.to_string().contains("longer than"), "{again}");
    assert!(a.closed().is_some());
    // A fresh connection (default limits) serves again.
    vm.reconnect_agent(T).unwrap();
    let b = vm.agent().clone();
    assert_eq!(b.sh("echo back", T).unwrap().stdout_str(), "back\n");

    // Host side: a request over the guest's line limit is not sent.
    let huge = ExecRequest {
        argv: vec!["echo".into(), "x".repeat(2 << 20)],
        ..Default::default()
    };
    let err = b.exec(&huge, T).unwrap_err();
    assert!(err.to_string().contains("line limit"), "{err}");
    assert_eq!(b.sh("echo still", T).unwrap().stdout_str(), "still\n");
}

#[test]
fn background_processes_output_kill_and_stdin() {
    let _s = serial();
    let mut vm = boot("background", 1);
    let a = vm.agent().clone();
    let t = Instant::now();
    let pid = a
        .exec_background(
            &ExecRequest::shell("echo out; echo err >&2; exec sleep 300"),
            None,
            T,
        )
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the pid comes back at once"
    );
    let p = a
        .processes(T)
        .unwrap()
        .into_iter()
        .find(|p| p.pid == pid)
        .expect("listed");
    assert!(p.running && p.background, "{p:?}");
    assert!(p.command.contains("exec sleep 300"), "{p:?}");
    // Output lands in the ring buffers.
    let deadline = Instant::now() + T;
    let out = loop {
        let o = a.process_output(pid, T).unwrap();
        if (o.stdout.len(), o.stderr.len()) == (4, 4) || Instant::now() > deadline {
            break o;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        (&out.stdout[..], &out.stderr[..]),
        (&b"out\n"[..], &b"err\n"[..])
    );
    assert!(out.running && out.exit.is_none());
    // The runtime user runs it.
    let who = a.sh(&format!("stat -c %U /proc/{pid}"), T).unwrap();
    assert_eq!(who.stdout_str(), "app\n");

    a.kill(pid, 15, true, T).unwrap();
    let deadline = Instant::now() + T;
    let p = loop {
        let p = a
            .processes(T)
            .unwrap()
            .into_iter()
            .find(|p| p.pid == pid)
            .expect("exited processes stay listed");
        if !p.running || Instant::now() > deadline {
            break p;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!p.running);
    assert_eq!(p.exit.unwrap().signal, Some(15), "{p:?}");
    let out = a.process_output(pid, T).unwrap();
    assert_eq!(out.stdout, b"out\n", "output kept after the exit");
    assert!(matches!(
        a.kill(4_000_000, 9, true, T),
        Err(VmError::Guest {
            code: ErrorCode::NotFound,
            ..
        })
    ));

    // A small ring keeps the newest output and counts what it dropped.
    let pid = a
        .exec_background(
            &ExecRequest::shell("head -c 100000 /dev/zero | tr '\\0' y; echo; echo end"),
            Some(4096),
            T,
        )
        .unwrap();
    let deadline = Instant::now() + T;
    let out = loop {
        let o = a.process_output(pid, T).unwrap();
        if !o.running || Instant::now() > deadline {
            break o;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(out.exit.unwrap().code, Some(0));
    assert_eq!(out.stdout.len(), 4096);
    assert!(out.stdout.ends_with(b"yy\nend\n"));
    assert_eq!(out.stdout_dropped, 100_000 + 5 - 4096);

    // Stdin larger than one chunk is streamed to a foreground exec.
    let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    let want = hex::encode(Sha256::digest(&data));
    let out = a
        .exec(
            &ExecRequest {
                cmd: Some("sha256sum".into()),
                stdin: Some(data),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert!(out.stdout_str().starts_with(&want), "{out:?}");
}

/// `attach` streams a running process's output as it comes (a command that
/// prints, sleeps, prints), then its exit.
#[test]
fn attach_streams_before_the_exit() {
    let _s = serial();
    let mut vm = boot("attach", 1);
    let a = vm.agent().clone();
    let pid = a
        .exec_background(
            &ExecRequest::shell("echo one; sleep 4; echo two; exit 3"),
            None,
            T,
        )
        .unwrap();
    let mut got: Vec<(Instant, Vec<u8>)> = vec![];
    let st = a
        .attach(pid, true, T, &mut |s, d| {
            assert_eq!(s, Stream::Stdout);
            got.push((Instant::now(), d.to_vec()));
        })
        .unwrap();
    let end = Instant::now();
    assert_eq!(st.code, Some(3));
    assert_eq!(st.dropped, 0);
    let all: Vec<u8> = got.iter().flat_map(|(_, d)| d.clone()).collect();
    assert_eq!(all, b"one\ntwo\n");
    let first = got.first().unwrap().0;
    assert!(
        end - first >= Duration::from_secs(2),
        "\"one\" arrived {:?} before the exit",
        end - first
    );

    // Attaching after the exit: the replay, then the exit at once.
    let mut replay = vec![];
    let st = a
        .attach(pid, true, T, &mut |_, d| replay.extend_from_slice(d))
        .unwrap();
    assert_eq!((st.code, &replay[..]), (Some(3), &b"one\ntwo\n"[..]));
}

fn pseudo_random(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn files_as_a_non_root_user() {
    let _s = serial();
    let mut vm = boot("files", 1);
    let a = vm.agent().clone();
    let app = Some("app");
    assert!(a.make_dir("/tmp/files", None, true, app, T).unwrap());
    assert!(
        !a.make_dir("/tmp/files", None, true, app, T).unwrap(),
        "existed"
    );

    // 20 MiB, streamed from a host file in chunks, as app.
    let data = pseudo_random(20 << 20);
    let want = hex::encode(Sha256::digest(&data));
    let host = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(host.path(), &data).unwrap();
    let t = Instant::now();
    let n = a
        .write_file_from(
            "/tmp/files/big.bin",
            &mut std::fs::File::open(host.path()).unwrap(),
            &WriteOptions {
                user: app.map(str::to_string),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    let up = t.elapsed();
    assert_eq!(n, 20 << 20);
    let t = Instant::now();
    let mut h = Sha256::new();
    let read = a
        .read_file_to("/tmp/files/big.bin", app, &mut h, T)
        .unwrap();
    let down = t.elapsed();
    eprintln!("[figures] 20 MiB file: write {up:?}, read {down:?}");
    assert_eq!(read, 20 << 20);
    assert_eq!(hex::encode(h.finalize()), want, "sha256 of the round trip");
    let guest_sum = a.sh("sha256sum /tmp/files/big.bin", T).unwrap();
    assert!(guest_sum.stdout_str().starts_with(&want));

    // Stat: exactly what the SDK's FileInfo shows.
    let info = a.stat("/tmp/files/big.bin", app, T).unwrap();
    assert_eq!(
        (
            info.name.as_str(),
            info.path.as_str(),
            info.is_dir,
            info.size,
            info.kind,
            info.mode.as_str(),
            info.permissions.as_str(),
            info.owner.as_str(),
            info.group.as_str(),
        ),
        (
            "big.bin",
            "/tmp/files/big.bin",
            false,
            20 << 20,
            FileKind::File,
            "0644",
            "-rw-r--r--",
            "app",
            "app"
        )
    );
    let mt = &info.modified_time;
    assert!(
        mt.len() == 20 && mt.ends_with('Z') && mt.as_bytes()[10] == b'T',
        "RFC 3339: {mt}"
    );
    let json = serde_json::to_value(&info).unwrap();
    assert_eq!(json["type"], "file");
    assert!(json.get("symlink_target").is_none());

    // A tree, a symlink, list with depth.
    a.make_dir("/tmp/files/a/b", Some(0o750), true, app, T)
        .unwrap();
    a.write_file_from(
        "/tmp/files/a/b/c.txt",
        &mut &b"c"[..],
        &WriteOptions {
            user: app.map(str::to_string),
            ..Default::default()
        },
        T,
    )
    .unwrap();
    assert!(a.sh("ln -s a/b /tmp/files/link", T).unwrap().success());
    let (top, truncated) = a.list_dir("/tmp/files", 1, app, None, T).unwrap();
    assert!(!truncated);
    let names: Vec<&str> = top.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a", "big.bin", "link"]);
    let link = &top[2];
    assert_eq!(link.symlink_target.as_deref(), Some("a/b"));
    assert!(link.is_dir && link.permissions.starts_with('l'), "{link:?}");
    let (deep, _) = a.list_dir("/tmp/files", 3, app, None, T).unwrap();
    let paths: Vec<&str> = deep.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/tmp/files/a",
            "/tmp/files/a/b",
            "/tmp/files/a/b/c.txt",
            "/tmp/files/big.bin",
            "/tmp/files/link"
        ],
        "parents first, the symlinked dir not entered"
    );
    assert_eq!(deep[1].mode, "0750");
    assert_eq!(deep[1].permissions, "drwxr-x---");
    let (cut, truncated) = a.list_dir("/tmp/files", 3, app, Some(2), T).unwrap();
    assert!(truncated && cut.len() == 2);

    // Permissions are the user's: /root is 0700 root.
    for r in [
        a.list_dir("/root", 1, app, None, T).map(|_| ()),
        a.write_file_from("/etc/nope", &mut &b"x"[..], &WriteOptions::default(), T)
            .map(|_| ()),
    ] {
        assert!(
            matches!(
                r,
                Err(VmError::Guest {
                    code: ErrorCode::PermissionDenied,
                    ..
                })
            ),
            "{r:?}"
        );
    }
    // ... and root's when asked.
    a.list_dir("/root", 1, Some("root"), None, T).unwrap();
    assert!(matches!(
        a.stat("/tmp/files/missing", app, T),
        Err(VmError::Guest {
            code: ErrorCode::NotFound,
            ..
        })
    ));

    // Rename, chmod, remove.
    let moved = a
        .rename("/tmp/files/a/b/c.txt", "/tmp/files/c.txt", app, T)
        .unwrap();
    assert_eq!((moved.path.as_str(), moved.size), ("/tmp/files/c.txt", 1));
    a.chmod("/tmp/files/c.txt", 0o600, app, T).unwrap();
    assert_eq!(a.stat("/tmp/files/c.txt", app, T).unwrap().mode, "0600");
    assert!(
        a.remove("/tmp/files/a", false, app, T).is_err(),
        "not empty"
    );
    a.remove("/tmp/files/a", true, app, T).unwrap();
    a.remove("/tmp/files/big.bin", false, app, T).unwrap();
    let (left, _) = a.list_dir("/tmp/files", 1, app, None, T).unwrap();
    let names: Vec<&str> = left.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["c.txt", "link"]);
    // Chunked reads respect offset and length.
    a.write_file("/tmp/files/abc", b"abcdef", 0o644, T).unwrap();
    let (d, size, eof) = a.read_file_chunk("/tmp/files/abc", 2, 3, None, T).unwrap();
    assert_eq!((&d[..], size, eof), (&b"cde"[..], 6, false));
    let (d, _, eof) = a.read_file_chunk("/tmp/files/abc", 5, 3, None, T).unwrap();
    assert_eq!((&d[..], eof), (&b"f"[..], true));
    assert_eq!(a.stat("/tmp/files/abc", None, T).unwrap().owner, "root");
}

/// Writes `data` to a guest file as `user` (parents made).
fn put(a: &nullspace_vm::AgentClient, path: &str, data: &[u8], user: &str) {
    a.write_file_from(
        path,
        &mut &data[..],
        &WriteOptions {
            parents: true,
            user: Some(user.into()),
            ..Default::default()
        },
        T,
    )
    .unwrap();
}

fn guest_code<T: std::fmt::Debug>(r: Result<T, VmError>) -> ErrorCode {
    match r {
        Err(VmError::Guest { code, .. }) => code,
        other => panic!("expected a guest error, got {other:?}"),
    }
}

/// Search by name and by content, replace in files, as app and as root:
/// what is found, the line numbers, the bytes and modes on disk, what app
/// may not read or change, and the bounds.
#[test]
fn search_and_replace_as_a_user() {
    let _s = serial();
    let mut vm = boot("search", 1);
    let a = vm.agent().clone();
    let app = Some("app".to_string());
    put(
        &a,
        "/tmp/s/a.py",
        b"import os\nneedle = 1\nprint(needle)\n",
        "app",
    );
    put(&a, "/tmp/s/sub/b.py", b"x\r\ny\r\nneedle here\r\n", "app");
    put(&a, "/tmp/s/sub/deep/c.txt", b"no match\nNeedle\n", "app");
    put(&a, "/tmp/s/bin.dat", b"needle\0binary", "app");
    put(&a, "/tmp/s/notes.md", b"call foo(1)\nfoo\n", "app");
    put(&a, "/tmp/s/secret.py", b"needle = 'root'\n", "root");
    a.chmod("/tmp/s/secret.py", 0o600, Some("root"), T).unwrap();
    put(&a, "/tmp/s/private/inner.py", b"needle\n", "root");
    a.chmod("/tmp/s/private", 0o700, Some("root"), T).unwrap();
    a.chmod("/tmp/s/a.py", 0o640, app.as_deref(), T).unwrap();

    // By name: app sees names in what it may read, not inside private/.
    let names = |pattern: &str, depth: Option<u32>, user: Option<String>| {
        let f = a
            .search_names(
                &nullspace_model::agent::SearchNamesSpec {
                    path: "/tmp/s".into(),
                    pattern: pattern.into(),
                    max_depth: depth,
                    user,
                    ..Default::default()
                },
                T,
            )
            .unwrap();
        assert_eq!(f.truncated, None, "{pattern}");
        let mut p = f.items;
        p.sort();
        p
    };
    assert_eq!(
        names("*.py", None, app.clone()),
        ["/tmp/s/a.py", "/tmp/s/secret.py", "/tmp/s/sub/b.py"]
    );
    assert_eq!(
        names("*.py", None, Some("root".into())),
        [
            "/tmp/s/a.py",
            "/tmp/s/private/inner.py",
            "/tmp/s/secret.py",
            "/tmp/s/sub/b.py"
        ]
    );
    assert_eq!(
        names("*.py", Some(1), app.clone()),
        ["/tmp/s/a.py", "/tmp/s/secret.py"]
    );
    assert_eq!(
        names("sub/**/*.txt", None, app.clone()),
        ["/tmp/s/sub/deep/c.txt"]
    );
    assert_eq!(
        names("su?", None, app.clone()),
        ["/tmp/s/sub"],
        "directories too"
    );
    let one = a
        .search_names(
            &nullspace_model::agent::SearchNamesSpec {
                path: "/tmp/s".into(),
                pattern: "*".into(),
                max_results: Some(2),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!(one.items.len(), 2);
    assert_eq!(
        one.truncated,
        Some(nullspace_model::agent::SearchLimit::Results)
    );
    // From /: nothing under the pseudo filesystems.
    let all = a
        .search_names(
            &nullspace_model::agent::SearchNamesSpec {
                path: "/".into(),
                pattern: "status".into(),
                max_depth: Some(4),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert!(
        all.items
            .iter()
            .all(|p| !p.starts_with("/proc") && !p.starts_with("/sys")),
        "{:?}",
        &all.items[..all.items.len().min(5)]
    );
    let timed = a
        .search_names(
            &nullspace_model::agent::SearchNamesSpec {
                path: "/".into(),
                pattern: "*".into(),
                timeout_ms: Some(1),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!(
        timed.truncated,
        Some(nullspace_model::agent::SearchLimit::Time)
    );

    // By content: files, 1-based line numbers, the line without its end.
    let grep = |path: &str, pattern: &str, user: Option<String>| {
        a.search_content(
            &nullspace_model::agent::SearchContentSpec {
                path: path.into(),
                pattern: pattern.into(),
                user,
                ..Default::default()
            },
            T,
        )
    };
    let mut hits: Vec<(String, u64, String)> = grep("/tmp/s", "needle", app.clone())
        .unwrap()
        .items
        .into_iter()
        .map(|m| (m.file, m.line, m.content))
        .collect();
    hits.sort();
    let want = |v: &[(&str, u64, &str)]| -> Vec<(String, u64, String)> {
        v.iter()
            .map(|(f, l, c)| (f.to_string(), *l, c.to_string()))
            .collect()
    };
    assert_eq!(
        hits,
        want(&[
            ("/tmp/s/a.py", 2, "needle = 1"),
            ("/tmp/s/a.py", 3, "print(needle)"),
            ("/tmp/s/sub/b.py", 3, "needle here"),
        ]),
        "binary, unreadable and differently cased files left out"
    );
    let hits = grep("/tmp/s", r"^needle\s*=", app.clone()).unwrap().items;
    assert_eq!(hits.len(), 1);
    assert_eq!((hits[0].file.as_str(), hits[0].line), ("/tmp/s/a.py", 2));
    let hits = grep("/tmp/s", "foo(", app.clone()).unwrap().items;
    assert_eq!(hits.len(), 1, "not an expression: searched as text");
    assert_eq!((hits[0].line, hits[0].content.as_str()), (1, "call foo(1)"));
    let root_hits = grep("/tmp/s", "needle", Some("root".into())).unwrap().items;
    assert_eq!(root_hits.len(), 5, "{root_hits:?}");
    assert_eq!(
        guest_code(grep("/tmp/s/secret.py", "needle", app.clone())),
        ErrorCode::PermissionDenied,
        "a file asked for by name that app may not read"
    );
    assert_eq!(
        guest_code(grep("/tmp/s/missing", "needle", app.clone())),
        ErrorCode::NotFound
    );

    // Replace: every file checked first, so one that app may not write
    // fails the request with nothing changed.
    let replace = |files: &[&str], pattern: &str, to: &str, dry: bool, user: Option<String>| {
        a.replace(
            &nullspace_model::agent::ReplaceSpec {
                files: files.iter().map(|f| f.to_string()).collect(),
                pattern: pattern.into(),
                replacement: to.into(),
                dry_run: dry,
                user,
                ..Default::default()
            },
            T,
        )
    };
    let read = |p: &str| String::from_utf8(a.read_file(p, T).unwrap()).unwrap();
    assert_eq!(
        guest_code(replace(
            &["/tmp/s/a.py", "/tmp/s/secret.py"],
            "needle",
            "x",
            false,
            app.clone()
        )),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        read("/tmp/s/a.py"),
        "import os\nneedle = 1\nprint(needle)\n"
    );
    let denied = replace(&["/tmp/s/secret.py"], "needle", "x", false, None).unwrap_err();
    assert!(
        denied.to_string().contains("/tmp/s/secret.py")
            && denied.to_string().contains("as user app"),
        "names the path and the (default) user: {denied}"
    );
    let dry = replace(&["/tmp/s/a.py"], "needle", "x", true, app.clone()).unwrap();
    assert_eq!((dry.replacements, dry.files_modified), (2, 1));
    assert!(
        read("/tmp/s/a.py").contains("needle"),
        "a dry run changes nothing"
    );
    let r = replace(
        &[
            "/tmp/s/a.py",
            "sub/b.py",
            "/tmp/s/sub/deep/c.txt",
            "/tmp/s/bin.dat",
        ],
        "needle",
        "thread",
        false,
        app.clone(),
    );
    // A relative path resolves against the workdir (/srv): not found there.
    assert_eq!(guest_code(r), ErrorCode::NotFound);
    let r = replace(
        &[
            "/tmp/s/a.py",
            "/tmp/s/sub/b.py",
            "/tmp/s/sub/deep/c.txt",
            "/tmp/s/bin.dat",
        ],
        "needle",
        "thread",
        false,
        app.clone(),
    )
    .unwrap();
    assert_eq!(
        (
            r.replacements,
            r.files_modified,
            r.files_skipped,
            r.binary_files_skipped
        ),
        (3, 2, 1, 1)
    );
    assert_eq!(
        read("/tmp/s/a.py"),
        "import os\nthread = 1\nprint(thread)\n"
    );
    assert_eq!(read("/tmp/s/sub/b.py"), "x\r\ny\r\nthread here\r\n");
    assert_eq!(
        read("/tmp/s/bin.dat"),
        "needle\0binary",
        "binary left alone"
    );
    let info = a.stat("/tmp/s/a.py", None, T).unwrap();
    assert_eq!(
        (info.mode.as_str(), info.owner.as_str()),
        ("0640", "app"),
        "mode and owner kept"
    );
    // Groups expand; root keeps a root file's owner and mode.
    let r = replace(
        &["/tmp/s/secret.py"],
        r"(\w+) = '(\w+)'",
        "$2 = '$1'",
        false,
        Some("root".into()),
    )
    .unwrap();
    assert_eq!(r.replacements, 1);
    assert_eq!(read("/tmp/s/secret.py"), "root = 'needle'\n");
    let info = a.stat("/tmp/s/secret.py", None, T).unwrap();
    assert_eq!((info.mode.as_str(), info.owner.as_str()), ("0600", "root"));
    let left = a.sh("ls -a /tmp/s | grep -c ns-replace", T).unwrap();
    assert_eq!(left.stdout_str().trim(), "0", "no temporary files left");

    // Hostile paths: a NUL byte, an overlong name.
    assert_eq!(
        guest_code(a.stat("/tmp/a\0b", None, T)),
        ErrorCode::BadRequest
    );
    let long = format!("/tmp/{}", "n".repeat(300));
    assert_eq!(guest_code(grep(&long, "x", None)), ErrorCode::NameTooLong);
    assert_eq!(
        guest_code(replace(&[long.as_str()], "x", "y", false, None)),
        ErrorCode::NameTooLong
    );
}

/// Metrics of a 2-vCPU guest: counts and sizes it has, and a CPU share
/// that follows two busy loops.
#[test]
fn metrics_follow_the_guest() {
    let _s = serial();
    let mut vm = boot("metrics", 2);
    let a = vm.agent().clone();
    let m = a.metrics(None, T).unwrap();
    eprintln!("[figures] idle guest: {m:?}");
    assert_eq!(m.cpu_count, 2);
    assert!((0.0..=100.0).contains(&m.cpu_percent), "{m:?}");
    let mib = |b: u64| b >> 20;
    assert!(
        (400..=512).contains(&mib(m.mem_total_bytes)),
        "512 MiB VM: {m:?}"
    );
    assert!(m.mem_used_bytes > 0 && m.mem_used_bytes < m.mem_total_bytes);
    assert!(
        (150..=260).contains(&mib(m.disk_total_bytes)),
        "256 MB disk: {m:?}"
    );
    assert!(m.disk_used_bytes > 1 << 20 && m.disk_used_bytes < m.disk_total_bytes);
    // 64 MiB more on disk shows in the used figure.
    let fill = a
        .exec(
            &ExecRequest {
                cmd: Some(
                    "dd if=/dev/zero of=/fill bs=1048576 count=64 2>/dev/null && sync".into(),
                ),
                user: Some("root".into()),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert!(fill.success(), "{fill:?}");
    let filled = a.metrics(None, T).unwrap();
    let grew = mib(filled.disk_used_bytes.saturating_sub(m.disk_used_bytes));
    assert!((60..=70).contains(&grew), "disk used grew by {grew} MiB");
    // Two busy loops on two vCPUs.
    let mut pids = vec![];
    for _ in 0..2 {
        pids.push(
            a.exec_background(&ExecRequest::shell("while :; do :; done"), None, T)
                .unwrap(),
        );
    }
    let busy = a.metrics(Some(Duration::from_millis(500)), T).unwrap();
    eprintln!("[figures] busy guest: {busy:?}");
    for pid in pids {
        a.kill(pid, 9, true, T).unwrap();
    }
    assert!(busy.cpu_percent > 60.0, "{busy:?}");
}

/// Many threads, one connection: requests run at once in the guest.
#[test]
fn concurrent_requests_share_one_connection() {
    let _s = serial();
    let mut vm = boot("concurrent", 1);
    let a = vm.agent().clone();
    let t = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let a = a.clone();
            std::thread::spawn(move || {
                let out = a.sh(&format!("sleep 3; echo {i}"), T).unwrap();
                let info = a.stat("/srv/index.html", None, T).unwrap();
                (out.stdout_str(), info.size)
            })
        })
        .collect();
    // Meanwhile, quick calls on the same connection are not queued behind.
    let t_ping = Instant::now();
    for _ in 0..5 {
        a.ping(T).unwrap();
    }
    let pings = t_ping.elapsed();
    for (i, th) in threads.into_iter().enumerate() {
        let (out, size) = th.join().unwrap();
        assert_eq!(out, format!("{i}\n"));
        assert_eq!(size, 41);
    }
    let all = t.elapsed();
    eprintln!("[figures] 8 x (sleep 3) concurrently: {all:?}; 5 pings meanwhile: {pings:?}");
    assert!(
        all < Duration::from_secs(16),
        "serial would be 24 s: {all:?}"
    );
    assert!(pings < Duration::from_secs(3), "{pings:?}");
}

/// Cancelling a long exec returns within 2 s, and the guest process is gone.
#[test]
fn cancel_ends_a_long_exec() {
    let _s = serial();
    let mut vm = boot("cancel", 1);
    let token = CancellationToken::new();
    let a = vm.agent().with_cancel(token.clone());
    let th = std::thread::spawn(move || {
        let r = a.sh("sleep 1000", Duration::from_secs(3600));
        (r, Instant::now())
    });
    // Let it start.
    let plain = vm.agent().clone();
    let deadline = Instant::now() + T;
    while !plain
        .processes(T)
        .unwrap()
        .iter()
        .any(|p| p.command == "sleep 1000" && p.running)
    {
        assert!(Instant::now() < deadline, "exec never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = Instant::now();
    token.cancel();
    let (r, ended) = th.join().unwrap();
    let took = ended - t;
    eprintln!("[figures] cancel returned after {took:?}");
    assert!(matches!(r, Err(VmError::Cancelled)), "{r:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // The guest killed it.
    let deadline = Instant::now() + T;
    loop {
        let ps = plain.sh("ps -o args | grep -c '^sleep 1000'", T).unwrap();
        if ps.stdout_str().trim() == "0" {
            break;
        }
        assert!(Instant::now() < deadline, "sleep still running: {ps:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The cancelled client says so at once; the VM's own client still works.
    let cancelled = vm.agent().with_cancel(token);
    assert!(matches!(cancelled.ping(T), Err(VmError::Cancelled)));
    assert_eq!(vm.agent().sh("echo ok", T).unwrap().stdout_str(), "ok\n");
}
