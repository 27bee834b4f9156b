//! Terminal sessions and directory watches against a real guest (QEMU,
//! TCG here): a shell on a real pseudo-terminal that echoes, resizes and
//! survives the host reconnecting; a watcher that reports what changes and
//! stays bounded under a flood.

mod support;

use nullspace_model::agent::{ErrorCode, PtySpec, WatchEvent, WatchKind, WatchSpec};
use nullspace_vm::{AgentClient, ExecRequest, Vm, VmError, WatchEnd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{boot, fixture, serial, status_kb};

const T: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(3600);

fn fx() -> &'static support::Fixture {
    fixture("nullspace-vm-terminal")
}

/// A terminal's output, collected by an attached reader thread.
struct Screen {
    out: Arc<Mutex<Vec<u8>>>,
    stop: nullspace_vm::CancellationToken,
    reader: std::thread::JoinHandle<Result<nullspace_model::agent::ExitStatus, VmError>>,
}

impl Screen {
    fn attach(agent: &AgentClient, pid: u32, replay: bool) -> Screen {
        let out = Arc::new(Mutex::new(Vec::new()));
        let stop = nullspace_vm::CancellationToken::new();
        let (a, o) = (agent.with_cancel(stop.clone()), out.clone());
        let reader = std::thread::spawn(move || {
            a.attach(pid, replay, LONG, &mut |_, d| {
                o.lock().unwrap().extend_from_slice(d)
            })
        });
        Screen { out, stop, reader }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).to_string()
    }

    /// Waits until the output holds `needle`.
    fn wait_for(&self, needle: &str) {
        let t = Instant::now();
        while !self.text().contains(needle) {
            assert!(
                t.elapsed() < T,
                "no {needle:?} on the terminal; it shows {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn type_in(agent: &AgentClient, pid: u32, s: &str) {
    agent.write_stdin(pid, s.as_bytes(), false, T).unwrap();
}

#[test]
fn terminal_echoes_resizes_and_survives_a_reconnect() {
    let _s = serial();
    let mut vm = boot(fx(), "terminal", 2);
    let agent = vm.agent().clone();
    let info = agent
        .pty_start(
            &PtySpec {
                cols: 80,
                rows: 24,
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert!(
        info.session.starts_with("pty_") && info.session.len() == 20,
        "{info:?}"
    );
    assert_eq!((info.cols, info.rows, info.running), (80, 24, true));
    let pid = info.pid;
    let screen = Screen::attach(&agent, pid, true);
    // The terminal echoes what is typed (the quotes), the shell runs it.
    type_in(&agent, pid, "echo hel''lo-$((6*7))\n");
    screen.wait_for("hel''lo-$((6*7))");
    screen.wait_for("hello-42");
    type_in(
        &agent,
        pid,
        "stty size; echo \"$TERM as $(id -un) in $PWD on $(tty)\"\n",
    );
    screen.wait_for("24 80");
    screen.wait_for("xterm-256color as app in /srv on /dev/pts/");
    let resized = agent.pty_resize(pid, 100, 40, T).unwrap();
    assert_eq!((resized.cols, resized.rows), (100, 40));
    type_in(&agent, pid, "stty size\n");
    screen.wait_for("40 100");
    // A controlling terminal: ^C interrupts the foreground job, not the shell.
    type_in(&agent, pid, "sleep 100\n");
    std::thread::sleep(Duration::from_millis(1500));
    type_in(&agent, pid, "\x03echo after-$((2+3))\n");
    screen.wait_for("after-5");

    // The host goes away (its reader detaches), then comes back.
    screen.stop.cancel();
    assert!(matches!(
        screen.reader.join().unwrap(),
        Err(VmError::Cancelled)
    ));
    drop(agent);
    vm.reconnect_agent(T).unwrap();
    let agent = vm.agent().clone();
    let listed = agent
        .pty_session(&info.session, T)
        .unwrap()
        .expect("listed");
    assert!(listed.running && listed.pid == pid, "{listed:?}");
    assert_eq!((listed.cols, listed.rows), (100, 40));
    let again = Screen::attach(&agent, pid, true);
    // The ring replays what the first host saw.
    again.wait_for("hello-42");
    type_in(&agent, pid, "echo again-$((1+2))\n");
    again.wait_for("again-3");
    type_in(&agent, pid, "exit 3\n");
    let exit = again.reader.join().unwrap().unwrap();
    assert_eq!(exit.code, Some(3), "{exit:?}");
    let listed = agent
        .pty_session(&info.session, T)
        .unwrap()
        .expect("listed");
    assert!(!listed.running && listed.exit.is_some_and(|e| e.code == Some(3)));
    let err = agent.write_stdin(pid, b"x", false, T).unwrap_err();
    assert!(
        matches!(&err, VmError::Guest { code: ErrorCode::NotFound, message, .. } if message.contains("exited")),
        "{err}"
    );

    // kill ends a session (its process group).
    let s2 = agent
        .pty_start(
            &PtySpec {
                cmd: Some("sleep 1000".into()),
                user: Some("root".into()),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    let watch = Screen::attach(&agent, s2.pid, false);
    agent.kill(s2.pid, 9, true, T).unwrap();
    let exit = watch.reader.join().unwrap().unwrap();
    assert_eq!(exit.signal, Some(9), "{exit:?}");

    // Hostile sizes and unknown sessions get clear errors.
    let err = agent.pty_resize(pid, 0, 10, T).unwrap_err();
    assert!(err.to_string().contains("cols must be"), "{err}");
    let err = agent.pty_resize(999_999, 10, 10, T).unwrap_err();
    assert!(
        err.to_string()
            .contains("no terminal session with pid 999999"),
        "{err}"
    );
}

/// A program that floods its terminal while the host reads slowly: the
/// guest neither blocks the program nor grows (the reader loses chunks,
/// counted), and the host stays within its bound.
#[test]
fn a_flooding_terminal_stays_bounded() {
    let _s = serial();
    let mut vm = boot(fx(), "terminal-flood", 2);
    let agent = vm.agent().clone();
    let rss = |a: &AgentClient| -> u64 {
        let o = a.sh("grep VmRSS /proc/1/status", T).unwrap();
        o.stdout_str()
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let guest0 = rss(&agent);
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let host0 = status_kb("VmRSS:");
    let info = agent
        .pty_start(
            &PtySpec {
                cmd: Some("yes flood | head -c 20000000; echo; echo END".into()),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    let mut seen = 0usize;
    let t = Instant::now();
    let exit = agent
        .attach(info.pid, false, Duration::from_secs(900), &mut |_, d| {
            seen += d.len();
            std::thread::sleep(Duration::from_millis(5));
        })
        .unwrap();
    let host_grew = status_kb("VmHWM:").saturating_sub(host0);
    let guest_grew = rss(&agent).saturating_sub(guest0);
    eprintln!(
        "[figures] terminal flood: 20 MB in {:?}; host read {seen} bytes, {} dropped; \
         host peak RSS +{host_grew} KiB, guest agent RSS +{guest_grew} KiB",
        t.elapsed(),
        exit.dropped
    );
    assert_eq!(exit.code, Some(0), "{exit:?}");
    assert!(exit.dropped > 0, "a slow reader loses chunks");
    assert!(host_grew < 16 << 10, "host RSS +{host_grew} KiB");
    assert!(guest_grew < 16 << 10, "guest RSS +{guest_grew} KiB");
    // The end is still there to replay.
    let out = agent.process_output(info.pid, T);
    assert!(out.is_err(), "a session is not an exec process");
    let mut tail = Vec::new();
    agent
        .attach(info.pid, true, T, &mut |_, d| tail.extend_from_slice(d))
        .unwrap();
    assert!(String::from_utf8_lossy(&tail).contains("END"));
}

type Events = Arc<Mutex<(Vec<WatchEvent>, u64)>>;

struct Watching {
    events: Events,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<WatchEnd, VmError>>,
}

fn watch(agent: &AgentClient, spec: WatchSpec, pace: Duration) -> Watching {
    let events: Events = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let (a, ev, st) = (agent.clone(), events.clone(), stop.clone());
    let thread = std::thread::spawn(move || {
        a.watch(
            &spec,
            LONG,
            &mut |p| {
                let _ = tx.send(p.to_string());
            },
            &mut |batch, dropped| {
                let mut e = ev.lock().unwrap();
                e.0.extend_from_slice(batch);
                e.1 += dropped;
                drop(e);
                std::thread::sleep(pace);
                !st.load(Ordering::SeqCst)
            },
        )
    });
    rx.recv_timeout(T).expect("watch started");
    Watching {
        events,
        stop,
        thread,
    }
}

fn has(events: &Events, kind: WatchKind, name: &str) -> bool {
    events
        .lock()
        .unwrap()
        .0
        .iter()
        .any(|e| e.kind == kind && e.name == name)
}

fn wait_event(events: &Events, kind: WatchKind, name: &str) {
    let t = Instant::now();
    while !has(events, kind, name) {
        assert!(t.elapsed() < T, "no {kind:?} {name}; got {:?}", {
            let e = events.lock().unwrap();
            let n = e.0.len();
            (n, e.1, e.0[n.saturating_sub(5)..].to_vec())
        });
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn watcher_reports_changes_and_stays_bounded() {
    let _s = serial();
    let mut vm = boot(fx(), "watch", 2);
    let agent = vm.agent().clone();
    agent.make_dir("/tmp/w", None, true, None, T).unwrap();
    let w = watch(
        &agent,
        WatchSpec {
            path: "/tmp/w".into(),
            recursive: true,
            user: None,
        },
        Duration::ZERO,
    );
    let run = |cmd: &str| {
        let o = agent.exec(&ExecRequest::shell(cmd), T).unwrap();
        assert!(o.success(), "{cmd}: {o:?}");
    };
    // A tree made at once: what the new directories already hold when
    // their watches begin is reported as created.
    run("echo hi > /tmp/w/a.txt && mkdir -p /tmp/w/sub/deep && echo z > /tmp/w/sub/deep/early.txt");
    for (k, n) in [
        (WatchKind::Create, "a.txt"),
        (WatchKind::Write, "a.txt"),
        (WatchKind::Create, "sub"),
        (WatchKind::Create, "sub/deep/early.txt"),
    ] {
        wait_event(&w.events, k, n);
    }
    run("echo x > /tmp/w/sub/b.txt");
    wait_event(&w.events, WatchKind::Create, "sub/b.txt");
    wait_event(&w.events, WatchKind::Write, "sub/b.txt");
    run("mv /tmp/w/a.txt /tmp/w/c.txt && chmod 600 /tmp/w/c.txt && rm /tmp/w/sub/b.txt");
    for (k, n) in [
        (WatchKind::Rename, "a.txt"),
        (WatchKind::Create, "c.txt"),
        (WatchKind::Chmod, "c.txt"),
        (WatchKind::Remove, "sub/b.txt"),
    ] {
        wait_event(&w.events, k, n);
    }
    let e = w.events.lock().unwrap().0.clone();
    let c = e.iter().find(|e| e.name == "c.txt").unwrap();
    assert_eq!(c.path, "/tmp/w/c.txt");
    // A directory moved within the tree keeps being watched under its new name.
    run("mv /tmp/w/sub /tmp/w/moved && echo y > /tmp/w/moved/deep/d.txt");
    wait_event(&w.events, WatchKind::Create, "moved/deep/d.txt");
    w.stop.store(true, Ordering::SeqCst);
    run("touch /tmp/w/last");
    assert_eq!(w.thread.join().unwrap().unwrap(), WatchEnd::Stopped);

    // Errors name the path and the user.
    let err = agent
        .watch(
            &WatchSpec {
                path: "/tmp/missing".into(),
                ..Default::default()
            },
            T,
            &mut |_| {},
            &mut |_, _| true,
        )
        .unwrap_err();
    assert!(
        matches!(&err, VmError::Guest { code: ErrorCode::NotFound, message, .. }
            if message.contains("/tmp/missing") && message.contains("app")),
        "{err}"
    );
    run("mkdir -p /tmp/private && chmod 700 /tmp/private");
    // (root made it: the default user app may not watch it)
    let o = agent
        .exec(
            &ExecRequest {
                cmd: Some("chown root:root /tmp/private".into()),
                user: Some("root".into()),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert!(o.success());
    let err = agent
        .watch(
            &WatchSpec {
                path: "/tmp/private".into(),
                ..Default::default()
            },
            T,
            &mut |_| {},
            &mut |_, _| true,
        )
        .unwrap_err();
    assert!(
        matches!(
            &err,
            VmError::Guest {
                code: ErrorCode::PermissionDenied,
                ..
            }
        ),
        "{err}"
    );

    // A flood of 50k creations read slowly: the guest coalesces or drops
    // (counted), its memory and the host's stay bounded, and the watch
    // still works afterwards.
    let rss = |a: &AgentClient| -> u64 {
        let o = a.sh("grep VmRSS /proc/1/status", T).unwrap();
        o.stdout_str()
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let guest0 = rss(&agent);
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let host0 = status_kb("VmRSS:");
    let w = watch(
        &agent,
        WatchSpec {
            path: "/dev/shm".into(),
            recursive: false,
            user: Some("root".into()),
        },
        Duration::from_millis(100),
    );
    let t = Instant::now();
    let o = agent
        .exec(
            &ExecRequest {
                // 50k: the guest's tmpfs has room for about 64k inodes.
                cmd: Some("cd /dev/shm && seq 1 50000 | xargs touch && echo made".into()),
                user: Some("root".into()),
                ..Default::default()
            },
            Duration::from_secs(900),
        )
        .unwrap();
    assert!(
        o.success(),
        "{}",
        String::from_utf8_lossy(&o.stderr[..o.stderr.len().min(300)])
    );
    let made = t.elapsed();
    let guest_grew = rss(&agent).saturating_sub(guest0);
    // The held events drain at the host's pace; a change while the queue
    // is still full would be dropped (counted), so wait for it to empty.
    let mut last = (usize::MAX, Instant::now());
    loop {
        let n = w.events.lock().unwrap().0.len();
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(3) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(900),
            "the watch never drained"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    agent
        .exec(
            &ExecRequest {
                cmd: Some("touch /dev/shm/after-the-flood".into()),
                user: Some("root".into()),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    wait_event(&w.events, WatchKind::Create, "after-the-flood");
    let host_grew = status_kb("VmHWM:").saturating_sub(host0);
    let (got, dropped) = {
        let e = w.events.lock().unwrap();
        (e.0.len(), e.1)
    };
    eprintln!(
        "[figures] watch flood: 50k files created in {made:?}; host got {got} events, \
         {dropped} dropped; guest agent RSS +{guest_grew} KiB, host peak RSS +{host_grew} KiB"
    );
    assert!(dropped > 0, "a slow host loses events, counted");
    assert!(got as u64 + dropped >= 50_000, "{got} + {dropped}");
    assert!(guest_grew < 16 << 10, "guest RSS +{guest_grew} KiB");
    assert!(host_grew < 64 << 10, "host RSS +{host_grew} KiB");
    w.stop.store(true, Ordering::SeqCst);
    agent
        .exec(
            &ExecRequest {
                cmd: Some("touch /dev/shm/stop".into()),
                user: Some("root".into()),
                ..Default::default()
            },
            T,
        )
        .unwrap();
    assert_eq!(w.thread.join().unwrap().unwrap(), WatchEnd::Stopped);
    // Removing the watched directory ends a watch.
    agent.make_dir("/tmp/gone", None, true, None, T).unwrap();
    let g = watch(
        &agent,
        WatchSpec {
            path: "/tmp/gone".into(),
            ..Default::default()
        },
        Duration::ZERO,
    );
    run("rmdir /tmp/gone");
    match g.thread.join().unwrap().unwrap() {
        WatchEnd::Gone(reason) => assert!(reason.contains("/tmp/gone"), "{reason}"),
        other => panic!("{other:?}"),
    }
}
