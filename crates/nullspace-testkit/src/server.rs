//! The real `nullspace serve` on a loopback port with its own data
//! directory (and optionally a Postgres started here), API keys made with
//! `nullspace keys create`, and the published Python SDK to drive it.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Run, nullspace_bin, run};

pub struct Server {
    pub url: String,
    pub addr: String,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    /// Extra `serve` arguments (e.g. `--workers 0`).
    pub args: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

impl Server {
    pub fn start(data_dir: &Path, database_url: Option<&str>) -> Server {
        Server::start_with(data_dir, database_url, &[])
    }

    pub fn start_with(data_dir: &Path, database_url: Option<&str>, args: &[&str]) -> Server {
        let addr = free_addr();
        let mut s = Server {
            url: format!("http://{addr}"),
            addr,
            data_dir: data_dir.to_path_buf(),
            database_url: database_url.map(str::to_string),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
            log: data_dir.with_extension("server.log"),
        };
        s.spawn();
        s
    }

    fn base(&self, cmd: &mut Command) {
        cmd.arg("--data-dir").arg(&self.data_dir);
        if let Some(u) = &self.database_url {
            cmd.arg("--database-url").arg(u);
        }
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(nullspace_bin());
        cmd.arg("serve")
            .arg("--listen")
            .arg(&self.addr)
            .args(self.args.iter().filter(|a| {
                *a != "--auto-build-vm" && *a != "--base-template" && *a != "--node-url-self"
            }));
        // A node of a cluster, reached at its own address (a testkit-only
        // marker: the address is picked here).
        if self.args.iter().any(|a| a == "--node-url-self") {
            cmd.arg("--node-url").arg(&self.url);
        }
        // Likewise the base template (a build VM boot at every start): only
        // for tests that ask with `--base-template` (a testkit-only marker).
        if !self.args.iter().any(|a| a == "--base-template") {
            cmd.arg("--no-base-template");
        }
        // No pool of prepared VMs unless a test asks for one: tests count
        // their server's QEMU processes, and pooled ones are extra.
        if !self.args.iter().any(|a| a == "--machine-pool-size") {
            cmd.args(["--machine-pool-size", "0"]);
        }
        // Test servers run side by side: their SSH endpoints take any free
        // port (answers from `…/ssh-access` say which) unless a test says.
        if !self.args.iter().any(|a| a == "--ssh-listen") {
            cmd.args(["--ssh-listen", "127.0.0.1:0"]);
        }
        // The build VM is on by default wherever it can run; API tests that
        // do not ask for it run without (fast, and independent of whether
        // a guest init happens to be installed). `--auto-build-vm` (a
        // testkit-only marker, not passed on) keeps the server's default.
        if !self
            .args
            .iter()
            .any(|a| a == "--build-vm" || a == "--no-build-vm" || a == "--auto-build-vm")
        {
            cmd.arg("--no-build-vm");
        }
        self.base(&mut cmd);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting nullspace serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if TcpStream::connect(&self.addr).is_ok() {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("nullspace serve exited ({status}): {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "nullspace serve did not listen on {}: {}",
            self.addr,
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Creates an API key for `namespace` and returns the secret.
    pub fn key(&self, namespace: &str) -> String {
        let mut cmd = Command::new(nullspace_bin());
        cmd.args(["keys", "create", "--name", "test", "--namespace", namespace]);
        self.base(&mut cmd);
        let r = run(&mut cmd);
        r.ok();
        r.stdout.trim().to_string()
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM and waits up to `timeout` for the server to exit;
    /// returns its exit status (None: still running, then killed).
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Starts the server again (with the current `args`) after
    /// [`Server::kill`] or [`Server::terminate`]; one still running is
    /// killed first (it holds the port).
    pub fn start_again(&mut self) {
        self.kill();
        self.spawn();
    }

    /// QEMU processes of this server's machines: those whose command line
    /// names this data directory (never another test's VMs).
    pub fn qemu_pids(&self) -> Vec<u32> {
        let needle = std::fs::canonicalize(&self.data_dir)
            .unwrap_or_else(|_| self.data_dir.clone())
            .display()
            .to_string();
        nullspace_vm::process::procfs::naming(needle.as_bytes())
            .into_iter()
            .filter(|&p| {
                String::from_utf8_lossy(&nullspace_vm::process::procfs::cmdline_bytes(p))
                    .contains("qemu-system")
            })
            .collect()
    }

    /// Kills the server without a chance to clean up (a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        // Machines outlive their server by design; a test that failed
        // before ending them must not leave them behind. Only this
        // server's QEMU processes (named by its data directory).
        for pid in self.qemu_pids() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        // Their network namespaces too (empty once QEMU is gone, but they
        // outlive the data directory and pile up in `ip netns list`).
        nullspace_vm::net::release_owner(&self.data_dir);
    }
}

/// A throwaway Postgres cluster (Debian's postgresql 15) on a loopback
/// port, run as the `postgres` user, removed on drop.
pub struct Postgres {
    pub url: String,
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("postgresql is not installed (scripts/deps.sh installs it)")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .expect("initdb");
        let dir = tempfile::Builder::new()
            .prefix("nullspace-pg")
            .tempdir()
            .expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("data dir");
        let chown = run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path()));
        chown.ok();
        let as_pg = |args: &[&str]| {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).args(args);
            c
        };
        let initdb = bin.join("initdb").to_string_lossy().into_owned();
        let d = data.to_string_lossy().into_owned();
        run(&mut as_pg(&[
            &initdb,
            "-D",
            &d,
            "--auth=trust",
            "-U",
            "postgres",
        ]))
        .ok();
        let port = free_addr().rsplit(':').next().expect("port").to_string();
        let pg_ctl = bin.join("pg_ctl").to_string_lossy().into_owned();
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            dir.path().display()
        );
        let log = dir.path().join("pg.log").to_string_lossy().into_owned();
        run(&mut as_pg(&[
            &pg_ctl, "-D", &d, "-o", &opts, "-l", &log, "-w", "start",
        ]))
        .ok();
        Postgres {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            bin,
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_ctl)
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// A published SDK release the suites run on (`scripts/deps.sh` makes a
/// venv for each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sdk {
    /// `nullspace-sdk==0.1.9` in `target/sdk-venv` (`NULLSPACE_SDK_PYTHON`
    /// overrides it): `Sandbox`, `/v1/sandboxes`, `SandboxError`.
    V0_1_9,
    /// `nullspace-sdk==1.0.3` in `target/sdk1-venv` (`NULLSPACE_SDK1_PYTHON`):
    /// `Machine`, `/v1/machines`, `MachineError`.
    V1_0_3,
}

impl Sdk {
    pub const ALL: [Sdk; 2] = [Sdk::V0_1_9, Sdk::V1_0_3];

    pub fn version(self) -> &'static str {
        match self {
            Sdk::V0_1_9 => "0.1.9",
            Sdk::V1_0_3 => "1.0.3",
        }
    }

    /// The venv's Python.
    pub fn python(self) -> PathBuf {
        let (var, venv) = match self {
            Sdk::V0_1_9 => ("NULLSPACE_SDK_PYTHON", "sdk-venv"),
            Sdk::V1_0_3 => ("NULLSPACE_SDK1_PYTHON", "sdk1-venv"),
        };
        if let Ok(p) = std::env::var(var) {
            return PathBuf::from(p);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../target")
            .join(venv)
            .join("bin/python");
        assert!(
            root.exists(),
            "{} missing: run scripts/deps.sh (it installs nullspace-sdk=={})",
            root.display(),
            self.version()
        );
        root
    }
}

/// The venv Python with `nullspace-sdk==0.1.9` (made by scripts/deps.sh).
pub fn sdk_python() -> PathBuf {
    Sdk::V0_1_9.python()
}

/// Runs the script (`argv[1]`) so that scripts written for 0.1.9 run on
/// 1.0 too: 1.0 renamed the errors' base class `SandboxError` to
/// `MachineError`, so each name is made to mean the other's class. The
/// script keeps its own line numbers in tracebacks.
const SDK_BOOT: &str = r#"import sys
import nullspace.errors as _e
if not hasattr(_e, "SandboxError"):
    _e.SandboxError = _e.MachineError
if not hasattr(_e, "MachineError"):
    _e.MachineError = _e.SandboxError
_src = sys.argv.pop(1)
exec(compile(_src, "<sdk script>", "exec"), {"__name__": "__main__"})
"#;

/// Runs a Python script with the SDK 0.1.9 pointed at `server` with `key`.
pub fn run_sdk(server: &Server, key: &str, script: &str, env: &[(&str, &str)]) -> Run {
    run_sdk_version(Sdk::V0_1_9, server, key, script, env)
}

/// Runs a Python script with `sdk` pointed at `server` with `key`.
pub fn run_sdk_version(
    sdk: Sdk,
    server: &Server,
    key: &str,
    script: &str,
    env: &[(&str, &str)],
) -> Run {
    let mut cmd = Command::new(sdk.python());
    cmd.arg("-c")
        .arg(SDK_BOOT)
        .arg(script)
        .env("NULLSPACE_API_URL", &server.url)
        .env("NULLSPACE_API_KEY", key)
        .env("NS_SDK_VERSION", sdk.version());
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}
