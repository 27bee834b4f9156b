//! Machines through the published SDK, unchanged: 1.0.3 (`Machine`,
//! `/v1/machines`) and 0.1.9 (`Sandbox`, `/v1/sandboxes`) run the same
//! scenario suite (`machines_scenario.py`) against a real server with the
//! build VM; then the server's life: a restart with machines running,
//! capacity bounds. CPU-heavy (TCG guests): one test at a time.

use std::path::Path;
use std::time::{Duration, Instant};

use nullspace_testkit::registry::{Auth, Registry};
use nullspace_testkit::server::{Sdk, Server, run_sdk_version};

const SCENARIO: &str = include_str!("machines_scenario.py");

/// The template every test restores: the demo image with a start command
/// that records its pid, serving /srv on 8080.
const BUILD: &str = r#"
import os
from nullspace import Template, wait_for_port
start = "sh -c 'echo $$ > /tmp/pid; exec httpd -f -p 8080 -h /srv'"
b = Template.build(Template.from_image(os.environ["NS_IMAGE"]).set_start_cmd(start, wait_for_port(8080)), name="web")
print("BUILT", b.status.value)
"#;

fn init_bin() -> String {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    nullspace_vm::init_binary::locate_or_build(&workspace)
        .expect("guest init")
        .display()
        .to_string()
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static L: std::sync::Mutex<()> = std::sync::Mutex::new(());
    L.lock().unwrap_or_else(|p| p.into_inner())
}

struct Setup {
    _reg: Registry,
    _tmp: tempfile::TempDir,
    server: Server,
    key: String,
}

impl Setup {
    /// Runs an SDK 1.0.3 script against the server; the test fails, with
    /// the script's output and the server's log, unless it printed `done`.
    fn scenario(&self, script: &str, env: &[(&str, &str)], done: &str) -> String {
        let t = Instant::now();
        let r = run_sdk_version(Sdk::V1_0_3, &self.server, &self.key, script, env);
        eprintln!("{done} after {:?}:\n{}", t.elapsed(), r.stdout);
        assert!(
            r.stdout.contains(done),
            "{}\n{}\nserver log:\n{}",
            r.stdout,
            r.stderr,
            self.server.log_text()
        );
        r.stdout
    }
}

fn setup(args: &[&str]) -> Setup {
    setup_from(args, |reg, scratch| reg.push_demo(scratch, "demo/web"))
}

/// A server with the template `web` built from the image `push` puts in
/// the registry (it returns the reference).
fn setup_from(args: &[&str], push: impl FnOnce(&Registry, &Path) -> String) -> Setup {
    let tmp = tempfile::Builder::new()
        .prefix("ns-mach")
        .tempdir()
        .unwrap();
    let reg = Registry::start(Auth::None);
    let image = push(&reg, tmp.path());
    let init = init_bin();
    let mut a = vec!["--build-vm", "--init-bin", init.as_str()];
    a.extend_from_slice(args);
    let server = Server::start_with(&tmp.path().join("data"), None, &a);
    let key = server.key("team-a");
    let r = run_sdk_version(Sdk::V1_0_3, &server, &key, BUILD, &[("NS_IMAGE", &image)]);
    assert!(
        r.stdout.contains("BUILT ready"),
        "{}\n{}\nserver log:\n{}",
        r.stdout,
        r.stderr,
        server.log_text()
    );
    Setup {
        _reg: reg,
        _tmp: tmp,
        server,
        key,
    }
}

const CHECKS: &[&str] = &[
    "restored_not_rerun",
    "exit_codes_stdout_stderr",
    "background_wait",
    "files_isolated",
    "files_list_and_info",
    "envs_for_commands_not_start",
    "streaming_before_exit",
    "background_stream_and_connect",
    "fork_keeps_files_then_diverges",
    "snapshot_create_from_delete",
    "pause_then_connect_resume",
    "kill_removes_from_list",
    "killed_machine_is_not_found",
    "unoffered_calls_are_not_implemented",
    "other_namespace_cannot_see",
    "idempotency_key_same_machine",
    "timeout_destroys_or_hibernates",
    "set_timeout",
    "sizes_from_one_template",
    "base_template",
];

#[test]
fn both_published_sdks_pass_the_machine_scenarios() {
    let _s = serial();
    // The base template builds at start-up, as on a default server, and
    // creates take pooled VMs, as on a default server.
    let mut s = setup(&["--base-template", "--machine-pool-size", "2"]);
    let other = s.server.key("team-b");
    let mut failures = vec![];
    for (sdk, v) in [(Sdk::V1_0_3, "1"), (Sdk::V0_1_9, "0")] {
        let t = Instant::now();
        let r = run_sdk_version(
            sdk,
            &s.server,
            &s.key,
            SCENARIO,
            &[
                ("NS_SDK", v),
                ("NS_TEMPLATE", "web"),
                ("NS_OTHER_KEY", &other),
            ],
        );
        eprintln!("[{sdk:?}] scenarios in {:?}\n{}", t.elapsed(), r.stdout);
        for name in CHECKS {
            if !r.stdout.lines().any(|l| l == format!("OK {name}")) {
                failures.push(format!("{sdk:?} {name}"));
            }
        }
        if !r.stdout.contains("DONE") {
            failures.push(format!("{sdk:?} did not finish: {}", r.stderr));
        }
    }
    assert!(
        failures.is_empty(),
        "failed: {failures:?}\nserver log:\n{}",
        s.server.log_text()
    );
    let log = s.server.log_text();
    assert!(log.contains("pooled=true"), "no create was pooled\n{log}");
    // Every machine was killed or timed out, and a stop ends the pool: no
    // QEMU of this server is left.
    let st = s.server.terminate(Duration::from_secs(60));
    assert!(st.is_some_and(|x| x.success()), "{st:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.server.qemu_pids().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(s.server.qemu_pids(), Vec::<u32>::new(), "QEMU left running");
}

const RESTART_BEFORE: &str = r#"
import os
from nullspace import Machine
keep = Machine.create(template="web")
keep.files.write("/tmp/kept.txt", "survives")
gone = Machine.create(template="web")
paused = Machine.create(template="web")
paused.files.write("/tmp/p.txt", "paused")
paused.pause()
print("IDS", keep.id, gone.id, paused.id)
"#;

const RESTART_AFTER: &str = r#"
import os, sys
from nullspace import Machine
keep, gone, paused = sys.argv[1:4]
st = {m.id: m.status.value for m in Machine.list(state=None)}
assert st.get(keep) == "running", st
assert st.get(paused) == "paused", st
assert gone not in st, st
errored = {m.id: m for m in Machine.list(state="error")}
assert gone in errored, errored
# An ended machine is gone for everything but list: connect is not_found.
from nullspace.errors import NotFoundError
try:
    Machine.connect(gone)
    raise AssertionError("connected to a machine that ended")
except NotFoundError as e:
    assert e.code == "machine_not_found", e.code
m = Machine.connect(keep)
assert m.files.read("/tmp/kept.txt") == "survives"
assert m.commands.run("cat /tmp/pid", shell=True).exit_code == 0
p = Machine.connect(paused)
assert p.files.read("/tmp/p.txt") == "paused"
m.kill(); p.kill()
print("AFTER OK")
"#;

/// Runs `body` with SDK 1.0.3, `sys.argv[1:]` = `args`.
fn script(s: &Setup, body: &str, args: &[&str]) -> (bool, String, String) {
    let mut full = format!("import sys\nsys.argv = ['x'] + {args:?}\n");
    full.push_str(body);
    let r = run_sdk_version(Sdk::V1_0_3, &s.server, &s.key, &full, &[]);
    (r.status.success(), r.stdout, r.stderr)
}

fn kill_pid(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

const TERMINAL: &str = r#"
import threading, time
from nullspace import Machine

def until(buf, needle, t=60):
    end = time.time() + t
    while needle.encode() not in b"".join(buf):
        assert time.time() < end, (needle, b"".join(buf)[-400:])
        time.sleep(0.1)

m = Machine.create(template="web")
s = m.pty.create_session(cols=80, rows=24)
sid = s.session_id
assert sid.startswith("pty_") and s.pid > 0, (sid, s.pid)
out = []
threading.Thread(target=lambda: [out.append(c) for c in s], daemon=True).start()
s.send_input("stty size; echo hi-$((6*7))\n")
until(out, "hi-42")
until(out, "24 80")
s.resize(100, 40)
s.send_input(b"stty size\n")
until(out, "40 100")
assert [i.session_id for i in m.pty.list_sessions()] == [sid]
assert m.pty.get_session_info(sid).rows == 40
m.pty.resize_session(sid, 90, 30)
assert (m.pty.get_session_info(sid).cols, m.pty.get_session_info(sid).rows) == (90, 30)
# The socket closes; the session goes on and is reattached by id.
s.disconnect()
s2 = m.pty.connect(session_id=sid)
again = []
s2.send_input("echo again-$((1+2)); exit 7\n")
r = s2.wait(on_data=again.append, timeout=60)
assert r.exit_code == 7, r
assert b"again-3" in b"".join(again) and b"hi-42" in b"".join(again)
s3 = m.pty.create_session()
m.pty.kill_session(s3.session_id)
r = s3.wait(timeout=60)
assert r.exit_code in (129, 137), r
assert m.pty.list_sessions() == []
print("PTY OK")

m.commands.run("mkdir -p /tmp/wd", shell=True)
events = []
h = m.files.watch_dir("/tmp/wd", events.append, recursive=True)
m.commands.run("echo x > /tmp/wd/a && mkdir /tmp/wd/s && sleep 1 && echo y > /tmp/wd/s/b && rm /tmp/wd/a", shell=True)
end = time.time() + 60
want = {("create", "a"), ("write", "a"), ("create", "s"), ("create", "s/b"), ("write", "s/b"), ("remove", "a")}
while not want <= {(e.type, e.name) for e in events}:
    assert time.time() < end, [(e.type, e.name) for e in events]
    time.sleep(0.1)
assert all(e.path == "/tmp/wd/" + e.name for e in events), events
h.stop()
m.kill()
print("WATCH OK")
"#;

/// SDK 1.0.3's `machine.pty` and `files.watch_dir`, unpatched: a terminal
/// that echoes, resizes (`stty size`), is listed, resized and reattached
/// by the routes and passes its exit code on; a kill ends it; a recursive
/// watch reports create, write and remove.
#[test]
fn terminals_and_watch_through_sdk_1_0_3() {
    let _s = serial();
    let s = setup(&[]);
    let (ok, out, err) = script(&s, TERMINAL, &[]);
    assert!(
        ok && out.contains("PTY OK") && out.contains("WATCH OK"),
        "{out}\n{err}\nserver log:\n{}",
        s.server.log_text()
    );
}

/// A server that stops (SIGTERM, then a crash) leaves its machines running;
/// started again, it takes them over, and a machine whose VM died while it
/// was down is reported as `error`; a machine directory without a record
/// is removed with its QEMU.
#[test]
fn a_restarted_server_finds_its_machines() {
    let _s = serial();
    let mut s = setup(&[]);
    let (ok, out, err) = script(&s, RESTART_BEFORE, &[]);
    assert!(ok, "{out}\n{err}\n{}", s.server.log_text());
    let ids: Vec<String> = out
        .lines()
        .find_map(|l| l.strip_prefix("IDS "))
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let before = s.server.qemu_pids();
    assert_eq!(before.len(), 2, "keep and gone run; paused has no VM");

    // A normal stop: the server exits cleanly and the machines keep running.
    let st = s.server.terminate(Duration::from_secs(60));
    assert!(
        st.is_some_and(|s| s.success()),
        "SIGTERM: {st:?}\n{}",
        s.server.log_text()
    );
    assert_eq!(
        s.server.qemu_pids().len(),
        2,
        "machines outlive the server\n{}",
        s.server.log_text()
    );
    // While it is down, one VM dies, and a stray machine directory appears.
    let data = s.server.data_dir.clone();
    let gone_pid: u32 =
        std::fs::read_to_string(data.join("machines").join(&ids[1]).join("qemu.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    kill_pid(gone_pid);
    std::fs::create_dir_all(data.join("machines/mch_stray")).unwrap();
    s.server.start_again();
    // Recovery runs before the server listens.
    let args: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (ok, out, err) = script(&s, RESTART_AFTER, &args);
    assert!(
        ok && out.contains("AFTER OK"),
        "{out}\n{err}\n{}",
        s.server.log_text()
    );
    assert!(
        !data.join("machines/mch_stray").exists(),
        "the stray directory is removed"
    );
    assert!(!data.join("machines").join(&ids[1]).exists());

    // A crash (SIGKILL) mid-life: same story.
    let (ok, out, err) = script(
        &s,
        "from nullspace import Machine\nm = Machine.create(template='web')\nprint('ID', m.id)\n",
        &[],
    );
    assert!(ok, "{out}\n{err}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("ID "))
        .unwrap()
        .to_string();
    s.server.kill();
    assert_eq!(s.server.qemu_pids().len(), 1);
    s.server.start_again();
    let (ok, out, err) = script(
        &s,
        "import sys\nfrom nullspace import Machine\nm = Machine.connect(sys.argv[1])\nassert m.commands.run('echo hi', shell=True).stdout == 'hi\\n'\nm.kill()\nprint('CRASH OK')\n",
        &[&id],
    );
    assert!(
        ok && out.contains("CRASH OK"),
        "{out}\n{err}\n{}",
        s.server.log_text()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.server.qemu_pids().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(s.server.qemu_pids(), Vec::<u32>::new(), "QEMU left running");
}

const CAPACITY: &str = r#"
import time
from nullspace import Machine
from nullspace.errors import QuotaExceededError
a = Machine.create(template="web")
t = time.time()
try:
    Machine.create(template="web")
    raise AssertionError("a second machine beyond --max-machines 1")
except QuotaExceededError as e:
    assert e.code == "capacity_exceeded" and "--max-machines" in str(e), (e.code, str(e))
assert time.time() - t < 20, "not retried"
a.kill()
b = Machine.create(template="web")
b.kill()
print("CAPACITY OK")
"#;

/// `--max-machines` bounds what the server runs, with an error the client
/// does not retry (not 429); a machine that ends frees its place.
#[test]
fn capacity_bounds_are_clear_errors() {
    let _s = serial();
    let s = setup(&["--max-machines", "1"]);
    let r = run_sdk_version(Sdk::V1_0_3, &s.server, &s.key, CAPACITY, &[]);
    assert!(
        r.stdout.contains("CAPACITY OK"),
        "{}\n{}\n{}",
        r.stdout,
        r.stderr,
        s.server.log_text()
    );
    // The memory bound: one 512 MiB machine fits in 600 MiB, two do not.
    let mut s = s;
    let init = init_bin();
    s.server.args = [
        "--build-vm",
        "--init-bin",
        &init,
        "--max-machine-memory-mb",
        "600",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    s.server.start_again();
    let r = run_sdk_version(Sdk::V1_0_3, &s.server, &s.key, MEMORY, &[]);
    assert!(
        r.stdout.contains("MEMORY OK"),
        "{}\n{}\n{}",
        r.stdout,
        r.stderr,
        s.server.log_text()
    );
    assert_eq!(s.server.qemu_pids(), Vec::<u32>::new());
}

const MEMORY: &str = r#"
from nullspace import Machine
from nullspace.errors import QuotaExceededError
a = Machine.create(template="web")
try:
    Machine.create(template="web")
    raise AssertionError("a second 512 MiB machine within 600 MiB")
except QuotaExceededError as e:
    assert "--max-machine-memory-mb" in str(e), str(e)
a.kill()
print("MEMORY OK")
"#;

/// `nullspace machine …` drives the same API: create, exec (exit code and
/// output), files, fork, pause, resume, list, kill.
#[test]
fn the_cli_drives_machines() {
    let _s = serial();
    let s = setup(&[]);
    let cli = |args: &[&str], stdin: Option<&[u8]>| {
        use std::io::Write as _;
        let mut cmd = std::process::Command::new(nullspace_testkit::nullspace_bin());
        cmd.args(args)
            .env("NULLSPACE_API_URL", &s.server.url)
            .env("NULLSPACE_API_KEY", &s.key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(b) = stdin {
            input.write_all(b).unwrap();
        }
        drop(input);
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, id, err) = cli(&["machine", "create", "web", "--env", "WHO=cli"], None);
    assert_eq!(code, 0, "{err}\n{}", s.server.log_text());
    let id = id.trim().to_string();
    assert!(id.starts_with("mch_"), "{id}");
    let (code, out, _) = cli(
        &[
            "machine",
            "exec",
            &id,
            "--",
            "echo $WHO; echo e >&2; exit 7",
        ],
        None,
    );
    assert_eq!((code, out.as_str()), (7, "cli\n"));
    let (code, out, _) = cli(
        &["machine", "exec", &id, "--", "printf", "%s|", "a b", "c"],
        None,
    );
    assert_eq!((code, out.as_str()), (0, "a b|c|"));
    let (code, _, err) = cli(
        &["machine", "files", "write", &id, "/tmp/cli.txt"],
        Some(b"from stdin\n"),
    );
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = cli(&["machine", "files", "read", &id, "/tmp/cli.txt"], None);
    assert_eq!(out, "from stdin\n");
    let (code, child, err) = cli(&["machine", "fork", &id], None);
    assert_eq!(code, 0, "{err}");
    let child = child.trim().to_string();
    let (_, out, _) = cli(&["machine", "exec", &child, "--", "cat /tmp/cli.txt"], None);
    assert_eq!(out, "from stdin\n");
    let (code, _, err) = cli(&["machine", "pause", &id], None);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = cli(&["machine", "list"], None);
    assert!(
        out.lines()
            .any(|l| l.starts_with(&id) && l.contains("\tpaused\t")),
        "{out}"
    );
    let (code, _, err) = cli(&["machine", "resume", &id], None);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = cli(&["machine", "exec", &id, "--", "cat /tmp/cli.txt"], None);
    assert_eq!(out, "from stdin\n");
    // The old command name still works.
    let (code, _, err) = cli(&["sandbox", "kill", &id, &child], None);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = cli(&["machine", "list"], None);
    assert!(!out.contains(&id) && !out.contains(&child), "{out}");
    let (code, _, err) = cli(&["machine", "exec", &id, "--", "true"], None);
    assert!(
        code != 0 && err.contains("machine_not_found"),
        "{code} {err}"
    );
    assert_eq!(s.server.qemu_pids(), Vec::<u32>::new());
}

/// A pseudo-terminal opened by the test: the CLI gets its terminal end as
/// its controlling terminal (`setsid --ctty`), the test types into and
/// reads from the other end and resizes it.
struct Terminal {
    master: std::sync::Arc<std::os::fd::OwnedFd>,
    slave: std::os::fd::OwnedFd,
    out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Terminal {
    fn open(cols: u16, rows: u16) -> Terminal {
        use rustix::fs::{Mode, OFlags};
        use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
        let master =
            openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).expect("openpt");
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        let slave = rustix::fs::open(
            name.as_c_str(),
            OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        let t = Terminal {
            master: std::sync::Arc::new(master),
            slave,
            out: Default::default(),
        };
        t.resize(cols, rows);
        let (master, out) = (t.master.clone(), t.out.clone());
        // Ends with the test process: the read blocks while the test holds
        // the terminal end.
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = rustix::io::read(&*master, &mut buf) {
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        t
    }

    /// The CLI with this terminal as its standard streams and controlling
    /// terminal (so the kernel signals it on a resize).
    fn spawn(&self, s: &Setup, args: &[&str]) -> std::process::Child {
        let fd = || std::process::Stdio::from(self.slave.try_clone().unwrap());
        std::process::Command::new("setsid")
            .args(["--wait", "--ctty"])
            .arg(nullspace_testkit::nullspace_bin())
            .args(args)
            .env("NULLSPACE_API_URL", &s.server.url)
            .env("NULLSPACE_API_KEY", &s.key)
            .env("TERM", "vt100")
            .stdin(fd())
            .stdout(fd())
            .stderr(fd())
            .spawn()
            .unwrap()
    }

    /// Any program with this terminal as its standard streams and
    /// controlling terminal.
    fn spawn_program(&self, argv: &[String]) -> std::process::Child {
        let fd = || std::process::Stdio::from(self.slave.try_clone().unwrap());
        std::process::Command::new("setsid")
            .args(["--wait", "--ctty"])
            .args(argv)
            .env("TERM", "vt100")
            .stdin(fd())
            .stdout(fd())
            .stderr(fd())
            .spawn()
            .unwrap()
    }

    fn resize(&self, cols: u16, rows: u16) {
        let w = rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(&*self.master, w).unwrap();
    }

    fn type_in(&self, keys: &str) {
        let mut b = keys.as_bytes();
        while !b.is_empty() {
            let n = rustix::io::write(&*self.master, b).unwrap();
            b = &b[n..];
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).to_string()
    }

    /// Waits until the output holds `needle` (after `from` bytes).
    /// Types `stty size` until the machine's terminal reports `size` (a
    /// resize travels as a frame while typed lines do too).
    fn await_size(&self, mut from: usize, size: &str, s: &Setup) {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            self.type_in("stty size\r");
            let got = self.until(from, "\n", s);
            std::thread::sleep(Duration::from_millis(500));
            if self.text()[from..].contains(size) {
                return;
            }
            assert!(Instant::now() < end, "no resize:\n{}", self.text());
            from = got;
        }
    }

    fn until(&self, from: usize, needle: &str, s: &Setup) -> usize {
        let end = Instant::now() + Duration::from_secs(90);
        loop {
            let out = self.out.lock().unwrap();
            if let Some(i) = String::from_utf8_lossy(&out[from.min(out.len())..]).find(needle) {
                return from + i + needle.len();
            }
            drop(out);
            assert!(
                Instant::now() < end,
                "no {needle:?} in the terminal:\n{}\nserver log:\n{}",
                self.text(),
                s.server.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The terminal's local modes (ICANON, ECHO, ISIG...) as the CLI left them.
    fn local_modes(&self) -> rustix::termios::LocalModes {
        rustix::termios::tcgetattr(&self.slave).unwrap().local_modes
    }

    /// Waits until the CLI has put the terminal in raw mode.
    fn until_raw(&self, s: &Setup) {
        use rustix::termios::LocalModes;
        let end = Instant::now() + Duration::from_secs(90);
        while self
            .local_modes()
            .intersects(LocalModes::ICANON | LocalModes::ECHO)
        {
            assert!(
                Instant::now() < end,
                "the terminal never went raw:\n{}\nserver log:\n{}",
                self.text(),
                s.server.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn wait_exit(child: &mut std::process::Child, t: &Terminal, s: &Setup) -> i32 {
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        assert!(
            Instant::now() < end,
            "the CLI did not exit:\n{}\nserver log:\n{}",
            t.text(),
            s.server.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `nullspace machine shell` in a real pseudo-terminal: raw mode while it
/// runs, typed keys run in the machine, a resize of the window reaches it
/// (`stty size`), the exit code passes on and the terminal's settings are
/// back afterwards; SIGTERM ends the session (none is left in the guest)
/// and restores them too. Pipes, `--cmd`, `--user`, and the errors for a
/// machine that does not exist or does not run.
#[test]
fn the_shell_command_is_a_terminal() {
    use rustix::termios::LocalModes;
    let _s = serial();
    let s = setup(&[]);
    let nullspace = |args: &[&str], stdin: &[u8]| {
        use std::io::Write as _;
        let mut child = std::process::Command::new(nullspace_testkit::nullspace_bin())
            .args(args)
            .env("NULLSPACE_API_URL", &s.server.url)
            .env("NULLSPACE_API_KEY", &s.key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, id, err) = nullspace(&["machine", "create", "web"], b"");
    assert_eq!(code, 0, "{err}\n{}", s.server.log_text());
    let id = id.trim().to_string();

    let t = Terminal::open(80, 24);
    let cooked = t.local_modes();
    assert!(cooked.contains(LocalModes::ICANON | LocalModes::ECHO | LocalModes::ISIG));
    let mut cli = t.spawn(&s, &["machine", "shell", &id, "--cwd", "/srv"]);
    t.until_raw(&s);
    t.type_in("stty size; echo hi-$((6*7)) $TERM $PWD\r");
    let at = t.until(0, "hi-42 vt100 /srv", &s);
    assert!(t.text().contains("24 80"), "{}", t.text());
    t.resize(100, 40);
    t.await_size(at, "40 100", &s);
    t.type_in("exit 3\r");
    assert_eq!(wait_exit(&mut cli, &t, &s), 3, "{}", t.text());
    assert_eq!(t.local_modes(), cooked, "the terminal's settings are back");

    // A signal ends the session in the guest too, and restores the terminal.
    let t = Terminal::open(80, 24);
    let mut cli = t.spawn(&s, &["machine", "shell", &id]);
    t.until_raw(&s);
    t.type_in("echo ready-$((1+1))\r");
    t.until(0, "ready-2", &s);
    kill_term(cli.id());
    assert_eq!(wait_exit(&mut cli, &t, &s), 128 + 15, "{}", t.text());
    assert_eq!(t.local_modes(), cooked);
    let (ok, out, err) = script(
        &s,
        "import sys, time\nfrom nullspace import Machine\nm = Machine.connect(sys.argv[1])\nend = time.time() + 30\nwhile m.pty.list_sessions():\n    assert time.time() < end, m.pty.list_sessions()\n    time.sleep(0.2)\nprint('NO SESSIONS')\n",
        &[&id],
    );
    assert!(ok && out.contains("NO SESSIONS"), "{out}\n{err}");

    // No terminal: a pipe's lines run, its end is Ctrl-D, the exit code passes on.
    let (code, out, err) = nullspace(
        &["machine", "shell", &id, "--user", "app"],
        b"echo uid-$(id -u) piped-$((2+3))\nexit 4\n",
    );
    assert_eq!(code, 4, "{out}\n{err}");
    assert!(out.contains("uid-1000 piped-5"), "{out:?}");
    let (code, out, err) = nullspace(
        &[
            "machine",
            "shell",
            &id,
            "--cmd",
            "echo cmd-$((3+4)); exit 5",
        ],
        b"",
    );
    assert_eq!(code, 5, "{out}\n{err}");
    assert!(out.contains("cmd-7"), "{out:?}");
    let (code, out, err) = nullspace(&["machine", "shell", &id, "--cmd", "cat"], b"");
    assert_eq!(code, 0, "Ctrl-D ends cat: {out}\n{err}");

    // One-line errors naming the machine.
    let (code, _, err) = nullspace(&["machine", "shell", "mch_nope"], b"");
    assert_eq!(code, 1);
    assert!(
        err.lines().count() == 1
            && err.contains("\"mch_nope\" not found")
            && err.contains("machine_not_found"),
        "{err}"
    );
    let (code, _, err) = nullspace(&["machine", "pause", &id], b"");
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = nullspace(&["machine", "shell", &id], b"");
    assert_eq!(code, 1);
    assert!(
        err.lines().count() == 1
            && err.contains(&format!("{id} is paused"))
            && err.contains("machine_not_ready"),
        "{err}"
    );
    let (code, _, err) = nullspace(&["machine", "kill", &id], b"");
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = nullspace(&["machine", "shell", &id], b"");
    assert!(code == 1 && err.contains("machine_not_found"), "{err}");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let out = std::process::Command::new(nullspace_testkit::nullspace_bin())
        .args(["machine", "shell", &id])
        .env("NULLSPACE_API_URL", &url)
        .env("NULLSPACE_API_KEY", &s.key)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains(&format!("cannot reach the server at {url}")),
        "{err}"
    );
    assert_eq!(s.server.qemu_pids(), Vec::<u32>::new());
}

fn kill_term(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

/// A second template of another shape (1 vCPU, 384 MiB) whose start
/// command marks its machines.
const BUILD_SMALL: &str = r#"
import os
from nullspace import Template, wait_for_port
start = "sh -c 'echo small > /tmp/which; exec httpd -f -p 8080 -h /srv'"
b = Template.build(Template.from_image(os.environ["NS_IMAGE"]).set_start_cmd(start, wait_for_port(8080)), name="small", cpu_count=1, memory_mb=384)
print("BUILT", b.status.value, b.build_id)
"#;

/// Creates one machine of each template named in argv and prints, per
/// machine, `M <template> <id> <nproc> <MemTotal kB> <marker>`.
const POOL_CREATE: &str = r#"
import sys
from nullspace import Machine
shape = {"web": {}, "small": {"vcpus": 1, "memory_mb": 384}}
for t in sys.argv[1:]:
    m = Machine.create(template=t, **shape[t])
    r = m.commands.run("echo $(nproc) $(sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo) $(cat /tmp/which 2>/dev/null || echo web)", shell=True)
    assert r.exit_code == 0, r
    print("M", t, m.id, r.stdout.strip())
"#;

/// The pooled QEMUs of a server: QEMUs of its data directory whose machine
/// directory has no running machine (the ids `running` lists).
fn pool_entries(s: &Setup, running: &[String]) -> Vec<(String, String)> {
    let data = std::fs::canonicalize(&s.server.data_dir).unwrap();
    let mut out = vec![];
    for pid in s.server.qemu_pids() {
        let c = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let c = String::from_utf8_lossy(&c).replace('\0', " ");
        let m = data.join("machines").display().to_string();
        let Some(rest) = c.split(&format!("{m}/")).nth(1) else {
            continue;
        };
        let id = rest.split('/').next().unwrap_or("").to_string();
        if !running.contains(&id) {
            out.push((id, c));
        }
    }
    out
}

/// Waits until the server answers HTTP (`/healthz`).
fn answers(s: &Setup) {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut got = String::new();
        if let Ok(mut c) = std::net::TcpStream::connect(&s.server.addr) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = c.write_all(b"GET /healthz HTTP/1.0\r\n\r\n");
            let _ = c.read_to_string(&mut got);
        }
        if got.starts_with("HTTP/1.0 200") || got.starts_with("HTTP/1.1 200") {
            return;
        }
        assert!(Instant::now() < deadline, "no answer: {got:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_entries(s: &Setup, running: &[String], n: usize) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let e = pool_entries(s, running);
        if e.len() == n {
            // Loaded too (a just-spawned QEMU has its directory already).
            std::thread::sleep(Duration::from_secs(2));
            let again = pool_entries(s, running);
            if again.len() == n {
                return again;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} pooled VMs, expected {n}\n{}",
            e.len(),
            s.server.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `--machine-pool-size`: creates take a VM prepared for exactly their
/// template's snapshot and shape (never another's), the pool refills,
/// deleting a template ends its pooled VMs, a stopping server ends them
/// all (machines run on), and those a crashed server left are swept at
/// the next start.
#[test]
fn pooled_vms_are_per_template_and_shape_and_end_with_the_server() {
    let _s = serial();
    // Two per key whatever the demand (the demand rule would grow a key
    // that these creates keep taking from).
    let mut s = setup(&["--machine-pool-size", "2", "--machine-pool-max", "2"]);
    let image = s._reg.push_demo(s._tmp.path(), "demo/small");
    let r = run_sdk_version(
        Sdk::V1_0_3,
        &s.server,
        &s.key,
        BUILD_SMALL,
        &[("NS_IMAGE", &image)],
    );
    assert!(
        r.stdout.contains("BUILT ready"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    let parse = |out: &str| -> Vec<Vec<String>> {
        out.lines()
            .filter_map(|l| l.strip_prefix("M "))
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect()
    };
    // First creates miss (nothing pooled yet) and make both keys wanted.
    let (ok, out, err) = script(&s, POOL_CREATE, &["web", "small"]);
    assert!(ok, "{out}\n{err}\n{}", s.server.log_text());
    let mut running: Vec<String> = parse(&out).iter().map(|m| m[1].clone()).collect();
    let entries = wait_entries(&s, &running, 4);
    // Both templates' VMs run at their ceiling (`-m 2048`): a pooled VM's
    // template is the snapshot its memory file is mapped from
    // (`snapshots/<build>.<attempt>/memory.ram`).
    let small_build = r
        .stdout
        .split_whitespace()
        .find(|w| w.starts_with("tb_"))
        .expect("the small template's build id")
        .to_string();
    let small_ram = format!("/{small_build}.");
    let kinds = |entries: &[(String, String)]| -> (Vec<String>, Vec<String>) {
        let (small, web): (Vec<_>, Vec<_>) = entries.iter().partition(|e| e.1.contains(&small_ram));
        (
            web.into_iter().map(|e| e.0.clone()).collect(),
            small.into_iter().map(|e| e.0.clone()).collect(),
        )
    };
    let (web, small) = kinds(&entries);
    assert_eq!((web.len(), small.len()), (2, 2), "{entries:?}");
    // Four creates, alternating: each is one of the pooled VMs of its own
    // template (its id is the pooled VM's), with its template's shape.
    let (ok, out, err) = script(&s, POOL_CREATE, &["web", "small", "small", "web"]);
    assert!(ok, "{out}\n{err}\n{}", s.server.log_text());
    for m in parse(&out) {
        let (t, id, nproc, mem, marker) = (&m[0], &m[1], &m[2], &m[3], &m[4]);
        let mem: u64 = mem.parse().unwrap();
        match t.as_str() {
            "web" => {
                assert!(
                    web.contains(id),
                    "{id} was not a pooled web VM: {entries:?}"
                );
                assert_eq!((nproc.as_str(), marker.as_str()), ("2", "web"));
                assert!(mem > 420 << 10, "{mem}");
            }
            _ => {
                assert!(
                    small.contains(id),
                    "{id} was not a pooled small VM: {entries:?}"
                );
                assert_eq!((nproc.as_str(), marker.as_str()), ("1", "small"));
                assert!(mem < 384 << 10, "{mem}");
            }
        }
        running.push(id.clone());
    }
    let log = s.server.log_text();
    assert_eq!(
        log.matches("pooled=true").count(),
        4,
        "four pooled creates\n{log}"
    );
    // Refilled: two of each again.
    let entries = wait_entries(&s, &running, 4);
    let (_, small) = kinds(&entries);
    // Deleting a template ends its pooled VMs (not its machines).
    let (ok, out, err) = script(
        &s,
        "from nullspace import Template\nTemplate.delete('small')\nprint('DELETED')\n",
        &[],
    );
    assert!(ok && out.contains("DELETED"), "{out}\n{err}");
    let left = wait_entries(&s, &running, 2);
    assert!(left.iter().all(|e| !small.contains(&e.0)), "{left:?}");
    assert_eq!(s.server.qemu_pids().len(), running.len() + 2);
    // A stop ends the pool; the machines run on.
    let st = s.server.terminate(Duration::from_secs(60));
    assert!(st.is_some_and(|x| x.success()), "{st:?}");
    assert_eq!(
        s.server.qemu_pids().len(),
        running.len(),
        "only the machines run\n{}",
        s.server.log_text()
    );
    assert!(pool_entries(&s, &running).is_empty());
    // A crash leaves pooled VMs behind: the next start ends them.
    s.server.start_again();
    let (ok, out, err) = script(&s, POOL_CREATE, &["web"]);
    assert!(ok, "{out}\n{err}\n{}", s.server.log_text());
    running.extend(parse(&out).iter().map(|m| m[1].clone()));
    wait_entries(&s, &running, 2);
    s.server.kill();
    assert_eq!(s.server.qemu_pids().len(), running.len() + 2);
    s.server.start_again();
    // It listens before it recovers; it answers after.
    answers(&s);
    assert!(
        pool_entries(&s, &running).is_empty(),
        "{:?}\n{}",
        pool_entries(&s, &running),
        s.server.log_text()
    );
    let (ok, out, err) = script(
        &s,
        "from nullspace import Machine\nfor m in list(Machine.list()):\n    Machine.kill_by_id(m.id)\nprint('KILLED')\n",
        &[],
    );
    assert!(ok && out.contains("KILLED"), "{out}\n{err}");
    s.server.terminate(Duration::from_secs(60));
    assert_eq!(s.server.qemu_pids(), Vec::<u32>::new());
}

const EVENTS_SCENARIO: &str = include_str!("machines_events_scenario.py");

/// Lifecycle events (listed with filters and paging, streamed: replay then
/// follow, resumed from a cursor), stdin to background processes, and git
/// in a template without git, through SDK 1.0.3 unpatched.
#[test]
fn sdk_lifecycle_events_stdin_and_git() {
    let _s = serial();
    let s = setup(&[]);
    let t = Instant::now();
    let r = run_sdk_version(
        Sdk::V1_0_3,
        &s.server,
        &s.key,
        EVENTS_SCENARIO,
        &[("NS_TEMPLATE", "web")],
    );
    eprintln!("events scenarios in {:?}\n{}", t.elapsed(), r.stdout);
    let mut failures = vec![];
    for name in [
        "stdin_reaches_a_background_process",
        "git_without_git_is_a_clear_error",
        "lifecycle_lists_in_order_with_filters",
        "lifecycle_stream_replays_then_follows",
    ] {
        if !r.stdout.lines().any(|l| l == format!("OK {name}")) {
            failures.push(name);
        }
    }
    assert!(
        failures.is_empty() && r.stdout.contains("DONE"),
        "failed: {failures:?}\n{}\n{}\nserver log:\n{}",
        r.stdout,
        r.stderr,
        s.server.log_text()
    );
}

const GIT_SCENARIO: &str = include_str!("machines_git_scenario.py");

/// Every git call of SDK 1.0.3, unpatched, run by git in the guest (a
/// template carrying the host's git and its libraries), each checked by
/// its effect on the repositories.
#[test]
fn git_through_sdk_1_0_3_in_a_template_with_git() {
    let _s = serial();
    let s = setup_from(&[], |reg, scratch| {
        let git = nullspace_testkit::image::host_programs_layer(
            &["/usr/bin/git"],
            &[
                // The demo image's PATH is busybox's /bin.
                ("/bin/git", "/usr/bin/git"),
                ("/usr/lib/git-core/git-upload-pack", "/usr/bin/git"),
                ("/usr/lib/git-core/git-receive-pack", "/usr/bin/git"),
                ("/usr/lib/git-core/git-upload-archive", "/usr/bin/git"),
            ],
        )
        .expect("a layer with the host's git");
        let img = nullspace_testkit::image::demo_image_with(git).expect("demo image");
        reg.push_image(scratch, "demo/git", &img)
    });
    s.scenario(GIT_SCENARIO, &[("NS_TEMPLATE", "web")], "GIT OK");
}

const PORTS_SCENARIO: &str = include_str!("machines_ports_scenario.py");

/// Ports and previews through SDK 1.0.3 (`machines_ports_scenario.py`), in
/// a template that carries the tests' web server
/// (`nullspace-guest-fixture`, built static like the init).
#[test]
fn ports_and_previews_through_sdk_1_0_3() {
    let _s = serial();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let fixture = nullspace_vm::init_binary::build_static(&workspace, "nullspace-guest-fixture")
        .expect("the guest web server");
    // The path goes into the image as it is: no `..` in it.
    let fixture = std::fs::canonicalize(fixture).expect("the fixture's path");
    let fixture = fixture.to_str().expect("a UTF-8 path").to_string();
    let s = setup_from(&["--preview-response-timeout-secs", "3"], |reg, scratch| {
        let layer = nullspace_testkit::image::host_programs_layer(
            &[&fixture],
            &[("/bin/ns-guest-fixture", &fixture)],
        )
        .expect("a layer with the guest web server");
        let img = nullspace_testkit::image::demo_image_with(layer).expect("demo image");
        reg.push_image(scratch, "demo/ports", &img)
    });
    let other = s.server.key("team-b");
    // Kept with the test output (target/tmp) for a look.
    let shot = format!("{}/ports-preview.png", env!("CARGO_TARGET_TMPDIR"));
    let _ = std::fs::remove_file(&shot);
    let t = Instant::now();
    let r = run_sdk_version(
        Sdk::V1_0_3,
        &s.server,
        &s.key,
        PORTS_SCENARIO,
        &[
            ("NS_TEMPLATE", "web"),
            ("NS_KEY_B", &other),
            (
                "NS_SERVER_PID",
                &s.server.pid().expect("server pid").to_string(),
            ),
            ("NS_SCREENSHOT", &shot),
        ],
    );
    eprintln!("ports scenario in {:?}:\n{}", t.elapsed(), r.stdout);
    let png = std::fs::read(&shot).unwrap_or_default();
    assert!(
        r.stdout.contains("PORTS OK") && png.starts_with(b"\x89PNG"),
        "{}\n{}\nserver log:\n{}",
        r.stdout,
        r.stderr,
        s.server.log_text()
    );
}

// ---- SSH access (`create_ssh_access` and the server's SSH endpoint) ----

const SSH_SCENARIO: &str = include_str!("machines_ssh.py");

fn keygen(path: &Path, kind: &str) {
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", "", "-C", "test", "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Runs `argv` (a real OpenSSH client), stdin `input`: (status, stdout, stderr).
fn run_ssh(argv: &[String], input: &[u8]) -> (i32, String, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The SDK's command line as words, with `extra` options before the
/// destination and `remote` after it.
fn ssh_argv(command: &str, extra: &[&str], remote: &[&str]) -> Vec<String> {
    let mut words: Vec<String> = command.split(' ').map(str::to_string).collect();
    // The command is shlex-joined from paths without spaces: plain words.
    assert!(!command.contains('\''), "{command}");
    let dest = words.pop().unwrap();
    words.extend(["-o", "BatchMode=yes", "-o", "ConnectTimeout=60"].map(String::from));
    words.extend(extra.iter().map(|s| s.to_string()));
    words.push(dest);
    words.extend(remote.iter().map(|s| s.to_string()));
    words
}

/// `create_ssh_access` with the unpatched SDK 1.0.3, then a real OpenSSH
/// client with the command it returns: `id -u` is the guest user's, exit
/// statuses, stdin, stdout and stderr pass through; a terminal session
/// (`ssh -tt` in a real pseudo-terminal) runs typed commands. Refused:
/// an expired certificate (signed with the data directory's CA by
/// `ssh-keygen -V` in the past), machine A's certificate at machine B,
/// another namespace's certificate, and a forged one naming another
/// machine under A's grant; a malformed or RSA key is a 400.
#[test]
fn ssh_access_through_the_servers_endpoint() {
    let _s = serial();
    let mut s = setup(&[]);
    let other = s.server.key("team-b");
    let dir = tempfile::tempdir().unwrap();
    let (key, key_c) = (dir.path().join("id_a"), dir.path().join("id_c"));
    let rsa = dir.path().join("id_rsa");
    keygen(&key, "ed25519");
    keygen(&key_c, "ed25519");
    keygen(&rsa, "rsa");
    let r = run_sdk_version(
        Sdk::V1_0_3,
        &s.server,
        &s.key,
        SSH_SCENARIO,
        &[
            ("NS_KEY", key.to_str().unwrap()),
            ("NS_KEY_C", key_c.to_str().unwrap()),
            ("NS_RSA", rsa.to_str().unwrap()),
            ("NS_OTHER_KEY", &other),
            ("HOME", dir.path().to_str().unwrap()),
        ],
    );
    let line = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("SSH "))
        .unwrap_or_else(|| panic!("{}\n{}\n{}", r.stdout, r.stderr, s.server.log_text()));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let text = |k: &str| v[k].as_str().unwrap().to_string();
    let (a, b, c) = (text("a"), text("b"), text("c"));
    let command = text("command");
    eprintln!("the SDK's command: {command}");

    // Malformed and unsupported keys: 400 invalid_request, one line naming the rule.
    for (name, rule) in [
        ("malformed", "not an OpenSSH public key"),
        ("rsa", "not supported"),
    ] {
        let (code, msg) = (
            v["bad"][name][0].as_str().unwrap(),
            v["bad"][name][1].as_str().unwrap(),
        );
        assert_eq!(code, "invalid_request", "{name}: {msg}");
        assert!(msg.contains(rule) && !msg.contains('\n'), "{name}: {msg}");
    }
    assert_eq!(v["bad"]["other_namespace"][0], "machine_not_found", "{v}");

    // A connection that says nothing (checked at the end).
    let port = v["port"].as_u64().unwrap();
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", port as u16)).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    use std::io::Read as _;
    let argv_sleep = ssh_argv(&command, &[], &["echo ready; exec sleep 600"]);

    // The command as the SDK printed it: the guest user's uid.
    let (st, out, err) = run_ssh(&ssh_argv(&command, &[], &["id", "-u"]), b"");
    assert_eq!(
        (st, out.trim()),
        (0, "1000"),
        "{err}\n{}",
        s.server.log_text()
    );
    let (st, _, _) = run_ssh(&ssh_argv(&command, &[], &["exit 7"]), b"");
    assert_eq!(st, 7);
    let (st, out, err) = run_ssh(
        &ssh_argv(&command, &[], &["tr a-z A-Z; echo oops >&2; exit 3"]),
        b"hello ssh\n",
    );
    assert_eq!((st, out.as_str()), (3, "HELLO SSH\n"), "{err}");
    assert!(err.contains("oops"), "{err}");

    // Refusals: the client sees an authentication failure (255), the log says why.
    let refused = |argv: Vec<String>, why: &str| {
        let (st, out, err) = run_ssh(&argv, b"");
        assert_eq!(st, 255, "{argv:?} was let in: {out}{err}");
        let log = s.server.log_text();
        assert!(log.contains(why), "no {why:?} in the server log:\n{log}");
    };
    // A's certificate at machine B.
    let at = |cmd: &str, m: &str| {
        cmd.rsplit_once(' ').map(|(h, dest)| {
            let host = dest.split_once('@').unwrap().1;
            format!("{h} {m}@{host}")
        })
    };
    refused(
        ssh_argv(&at(&command, &b).unwrap(), &[], &["true"]),
        &format!("login {b:?} is not a principal"),
    );
    // Namespace team-b's certificate (for C) at A, and A's at C.
    let command_c = text("command_c");
    let (st, out, err) = run_ssh(&ssh_argv(&command_c, &[], &["id", "-u"]), b"");
    assert_eq!((st, out.trim()), (0, "0"), "{err}");
    refused(
        ssh_argv(&at(&command_c, &a).unwrap(), &[], &["true"]),
        &format!("login {a:?} is not a principal"),
    );
    refused(
        ssh_argv(&at(&command, &c).unwrap(), &[], &["true"]),
        &format!("login {c:?}"),
    );
    // Signed by this server's CA with ssh-keygen: expired, and a forged
    // principal (machine C, in team-b) under A's grant.
    let ca = s._tmp.path().join("data/ssh/ca_ed25519");
    let sign = |name: &str, principal: &str, validity: &str| {
        let k = dir.path().join(name);
        std::fs::copy(&key, &k).unwrap();
        std::fs::copy(
            key.with_extension("pub"),
            dir.path().join(format!("{name}.pub")),
        )
        .unwrap();
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-s"])
            .arg(&ca)
            .args(["-I", &text("access_id"), "-n", principal, "-V", validity])
            .arg(dir.path().join(format!("{name}.pub")))
            .status()
            .unwrap();
        assert!(st.success());
        let cert = dir.path().join(format!("{name}-cert.pub"));
        command
            .replace(key.to_str().unwrap(), k.to_str().unwrap())
            .replace(
                &format!("CertificateFile={}", key.display()),
                &format!("CertificateFile={}", k.display()),
            )
            .replace(&format!("{}-cert.pub", k.display()), cert.to_str().unwrap())
    };
    let expired = sign("id_expired", &a, "20200101:20200102");
    assert!(expired.contains("id_expired-cert.pub"), "{expired}");
    // russh refuses it before the handler (its own log line).
    refused(ssh_argv(&expired, &[], &["true"]), "Certificate is expired");
    let forged = sign("id_forged", &c, "-5m:+5m");
    refused(
        ssh_argv(&at(&forged, &c).unwrap(), &[], &["true"]),
        &format!("is for machine {a}, not {c}"),
    );
    // The right certificate still works after the refusals.
    let (st, _, _) = run_ssh(&ssh_argv(&command, &[], &["true"]), b"");
    assert_eq!(st, 0);

    // An interactive session in a real terminal.
    let t = Terminal::open(80, 24);
    let mut ssh = t.spawn_program(&ssh_argv(&command, &["-tt"], &[]));
    t.type_in("stty size; echo hi-$((6*7)) $TERM $(id -u)\r");
    let from = t.until(0, "hi-42 vt100 1000", &s);
    assert!(t.text().contains("24 80"), "{}", t.text());
    // A window change reaches the machine's terminal (ssh forwards SIGWINCH).
    t.resize(100, 40);
    t.await_size(from, "40 100", &s);
    t.type_in("exit 4\r");
    assert_eq!(wait_exit(&mut ssh, &t, &s), 4, "{}", t.text());

    // An idle connection that never authenticates is closed (30 s): the
    // server's banner, then EOF.
    let mut read = String::new();
    let t0 = Instant::now();
    let n = idle.read_to_string(&mut read);
    assert!(
        n.is_ok() && read.starts_with("SSH-2.0-nullspace"),
        "{n:?} {read:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(35), "{:?}", t0.elapsed());

    // Sessions end when the server stops.
    let mut long = std::process::Command::new(&argv_sleep[0])
        .args(&argv_sleep[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = [0u8; 6];
    std::io::Read::read_exact(long.stdout.as_mut().unwrap(), &mut first).unwrap();
    assert_eq!(&first, b"ready\n");
    let st = s.server.terminate(Duration::from_secs(60));
    assert!(st.is_some_and(|x| x.success()), "{st:?}");
    let end = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(st) = long.try_wait().unwrap() {
            break st.code();
        }
        assert!(Instant::now() < end, "the ssh session outlived the server");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_ne!(code, Some(0));
    let log = s.server.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

// ---- egress policies (`network.egress`, legacy lists, `update_egress`) ----

const EGRESS_SCENARIO: &str = include_str!("machines_egress.py");

#[test]
fn egress_policies_through_sdk_1_0_3() {
    use nullspace_testkit::inet::{self, TestInternet};
    let _s = serial();
    let _inet = TestInternet::start().expect("the test internet");
    let namespaces = || -> Vec<String> {
        std::fs::read_dir("/run/netns")
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.starts_with("nsm-"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let before = namespaces();
    let dns = inet::DNS.to_string();
    let s = setup(&["--machine-dns", &dns]);
    assert!(
        s.server
            .log_text()
            .contains("a namespace per machine; egress policies enforced"),
        "machine namespaces were not set up:\n{}",
        s.server.log_text()
    );
    let other = s.server.key("team-b");
    s.scenario(
        EGRESS_SCENARIO,
        &[
            ("NS_TEMPLATE", "web"),
            ("NS_KEY_B", &other),
            ("NS_ALLOWED", &inet::ALLOWED.to_string()),
            ("NS_DENIED", &inet::DENIED.to_string()),
            ("NS_DNS", &dns),
        ],
        "EGRESS OK",
    );
    // Every machine ended: no namespace of this server is left.
    drop(s);
    let left: Vec<String> = namespaces()
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
}

// ---- volumes (`Volume.*`, attach/detach/health/remount, `Volume.files`) ----

const VOLUMES_SCENARIO: &str = include_str!("machines_volumes_scenario.py");

#[test]
fn volumes_through_sdk_1_0_3() {
    let _s = serial();
    let s = setup(&[]);
    let other = s.server.key("team-b");
    s.scenario(
        VOLUMES_SCENARIO,
        &[("NS_TEMPLATE", "web"), ("NS_OTHER_KEY", &other)],
        "VOLUMES OK",
    );
}

// ---- warm pools (`TemplateWarmPool.*`, `Machine.create(warm_pool=…)`) ----

const WARM_POOLS_SCENARIO: &str = include_str!("machines_warm_pools.py");

/// Makes a warm pool of two and waits for them (prints its id), or (with
/// `NS_POOL_ID`) waits until that pool is ready again.
const WARM_POOL_AGAIN: &str = r#"
import os
from nullspace import TemplateWarmPool
pid = os.environ.get("NS_POOL_ID")
if pid:
    p = TemplateWarmPool.get(pid)
else:
    p = TemplateWarmPool.create(os.environ["NS_TEMPLATE"], name="kept", min_ready=2, max_ready=2)
info = p.wait_until_ready(timeout_secs=240, interval_secs=0.5)
assert info.status.ready >= 2 and p.state == "enabled", info
print("POOL", p.id)
"#;

#[test]
fn warm_pools_through_sdk_1_0_3() {
    let _s = serial();
    // No pool of the server's own: what is ready is the warm pool's; three
    // machines at most, so the pool's stock must give way to creates.
    let mut s = setup(&["--machine-pool-size", "0", "--max-machines", "3"]);
    let other = s.server.key("team-b");
    s.scenario(
        WARM_POOLS_SCENARIO,
        &[("NS_TEMPLATE", "web"), ("NS_OTHER_KEY", &other)],
        "WARM POOLS OK",
    );
    // A warm pool outlives a crash of its server: the next start ends the
    // old VMs and prepares new ones, never more than the capacity.
    let out = s.scenario(WARM_POOL_AGAIN, &[("NS_TEMPLATE", "web")], "POOL ");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("POOL "))
        .expect("the pool's id")
        .to_string();
    let before = s.server.qemu_pids();
    assert_eq!(before.len(), 2, "the pool's two VMs: {before:?}");
    s.server.restart();
    s.scenario(
        WARM_POOL_AGAIN,
        &[("NS_POOL_ID", &id)],
        &format!("POOL {id}"),
    );
    let after = s.server.qemu_pids();
    assert_eq!(after.len(), 2, "two VMs again, none left over: {after:?}");
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "the crashed server's VMs were ended: {before:?} -> {after:?}"
    );
}

// ---- fault injection: the server killed during each machine operation ----

const FAULT_PREP: &str = r#"
from nullspace import Machine
m = Machine.create(template="web")
m.files.write("/tmp/mark", "before")
if sys.argv[1] == "resume":
    m.pause()
print("ID", m.id)
"#;

/// One operation, cut short when the test kills the server: it writes the
/// marker file just before its request.
const FAULT_OP: &str = r#"
import pathlib
from nullspace import Machine
op, mid, mark = sys.argv[1:4]
m = Machine.connect(mid) if op in ("pause", "fork", "snapshot", "kill") else None
pathlib.Path(mark).write_text("go")
try:
    if op == "create":
        Machine.create(template="web")
    elif op == "pause":
        m.pause()
    elif op == "resume":
        Machine.resume(mid)
    elif op == "fork":
        m.fork()
    elif op == "snapshot":
        m.create_snapshot()
    elif op == "kill":
        m.kill()
    print("OP DONE")
except Exception as e:
    print("OP CUT", type(e).__name__, e)
"#;

/// After the restart: every machine listed is running (and answers), paused
/// (and resumes with its files) or ended with a reason; each is then killed.
const FAULT_CHECK: &str = r#"
from nullspace import Machine
seen = {m.id: m.status.value for m in Machine.list(state=None)}
for mid, st in seen.items():
    assert st in ("running", "paused", "error"), (mid, st, seen)
    if st == "error":
        continue
    m = Machine.connect(mid)
    r = m.commands.run("cat /tmp/mark 2>/dev/null; echo; echo ok", shell=True)
    assert r.stdout.endswith("ok\n"), (mid, st, r.stdout, r.stderr)
    m.kill()
print("STATES", seen)
print("CHECK OK")
"#;

/// SIGKILL of the server in the middle of create, pause, resume, fork,
/// snapshot and kill, then a restart: the records say what exists (each
/// machine runs and answers, is paused and resumes with its files, or
/// ended as `error`), and once the listed machines are killed no QEMU and
/// no machine directory is left.
#[test]
fn a_server_killed_during_each_machine_operation_restarts_consistent() {
    let _s = serial();
    let mut s = setup(&["--machine-pool-size", "0"]);
    let scratch = tempfile::tempdir().unwrap();
    // How long after the request to kill: inside each operation here.
    for (op, after_ms) in [
        ("create", 150),
        ("pause", 80),
        ("resume", 150),
        ("fork", 120),
        ("snapshot", 40),
        ("kill", 20),
    ] {
        let id = if op == "create" {
            String::new()
        } else {
            let (ok, out, err) = script(&s, FAULT_PREP, &[op]);
            assert!(ok, "{op}: {out}\n{err}\n{}", s.server.log_text());
            out.lines()
                .find_map(|l| l.strip_prefix("ID "))
                .unwrap()
                .to_string()
        };
        let mark = scratch.path().join(op);
        let pid = s.server.pid().expect("server running");
        let out = std::thread::scope(|t| {
            let run = t.spawn(|| script(&s, FAULT_OP, &[op, &id, mark.to_str().unwrap()]));
            let deadline = Instant::now() + Duration::from_secs(60);
            while !mark.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(after_ms));
            kill_pid(pid);
            run.join().unwrap()
        });
        eprintln!("{op}: {}", out.1.trim());
        s.server.start_again();
        let (ok, out, err) = script(&s, FAULT_CHECK, &[]);
        assert!(
            ok && out.contains("CHECK OK"),
            "after {op}: {out}\n{err}\n{}",
            s.server.log_text()
        );
        eprintln!("after {op}: {}", out.lines().next().unwrap_or(""));
        let deadline = Instant::now() + Duration::from_secs(30);
        let machines = s.server.data_dir.join("machines");
        let left = || std::fs::read_dir(&machines).map(|d| d.count()).unwrap_or(0);
        while (!s.server.qemu_pids().is_empty() || left() > 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        let stray: Vec<String> = s
            .server
            .qemu_pids()
            .iter()
            .map(|p| {
                let c = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                format!("{p}: {}", String::from_utf8_lossy(&c).replace('\0', " "))
            })
            .collect();
        assert!(
            stray.is_empty(),
            "after {op}: QEMU left: {stray:?}\n{}",
            s.server.log_text()
        );
        assert_eq!(left(), 0, "after {op}: machine directories left");
    }
}
