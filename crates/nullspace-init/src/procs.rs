//! Processes: the reaper (PID 1 reaps every child), spawning with the
//! runtime defaults, and the start command's state.

use crate::Config;
use crate::users;
use nullspace_model::agent::ExitStatus;
use rustix::process::{Gid, Uid};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    pub fn status(self, timed_out: bool) -> ExitStatus {
        let (code, signal) = match self {
            Exit::Code(c) => (Some(c), None),
            Exit::Signal(s) => (None, Some(s)),
        };
        ExitStatus {
            code,
            signal,
            timed_out,
            dropped: 0,
        }
    }
}

#[derive(Debug, Default)]
pub struct StartState {
    /// A start command was configured at boot or sent with the `start` op.
    pub configured: bool,
    pub cmd: String,
    pub pid: Option<u32>,
    pub started_unix_ms: u64,
    pub exit: Option<Exit>,
    pub spawn_error: Option<String>,
    pub output: VecDeque<u8>,
}

const START_OUTPUT_KEEP: usize = 16 * 1024;

#[derive(Default)]
struct Registry {
    waiters: HashMap<i32, Sender<Exit>>,
    unclaimed: HashMap<i32, Exit>,
}

/// Runtime defaults for spawned processes: from the boot config, replaced
/// by the `start` op (a build that ran steps before starting the start
/// command hands over the final defaults then).
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
}

pub struct Inner {
    pub cfg: Config,
    pub defaults: Mutex<Defaults>,
    pub boot: Instant,
    pub start: Mutex<StartState>,
    pub table: crate::exec::Table,
    reg: Mutex<Registry>,
}

pub type State = Arc<Inner>;

pub fn new_state(cfg: Config) -> State {
    let defaults = Defaults {
        env: cfg.env.clone(),
        user: cfg.user.clone(),
        workdir: cfg.workdir.clone(),
    };
    Arc::new(Inner {
        cfg,
        defaults: Mutex::new(defaults),
        boot: Instant::now(),
        start: Mutex::new(StartState::default()),
        table: Default::default(),
        reg: Mutex::new(Registry::default()),
    })
}

/// One exited child: `waitid(P_ALL, WEXITED | WNOWAIT)` leaves it
/// unreaped. nix's `waitid`, since rustix's does not expose the pid.
fn wait_any_exited() -> Option<i32> {
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)
        .ok()?
        .pid()
        .map(|p| p.as_raw())
}

/// Reaps every child. A child is first observed with `WNOWAIT` and only
/// reaped under the registry lock, so `spawn` (which holds that lock) can
/// register a pid before its exit is delivered, and std's own `waitpid` on a
/// failed exec never races with us.
pub fn start_reaper(state: State) {
    std::thread::spawn(move || {
        loop {
            let Some(pid) = wait_any_exited() else {
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            };
            let mut reg = state.reg.lock().unwrap();
            let Some(p) = rustix::process::Pid::from_raw(pid) else {
                continue;
            };
            let got = rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG);
            let Ok(Some((_, status))) = got else {
                continue;
            };
            let exit = match (status.exit_status(), status.terminating_signal()) {
                (Some(c), _) => Exit::Code(c),
                (None, Some(s)) => Exit::Signal(s),
                // Stopped/continued are not reported without WUNTRACED.
                _ => continue,
            };
            match reg.waiters.remove(&pid) {
                Some(tx) => {
                    let _ = tx.send(exit);
                }
                None => {
                    // Orphans re-parented to PID 1 land here too; keep the
                    // map bounded.
                    if reg.unclaimed.len() > 1024 {
                        reg.unclaimed.clear();
                    }
                    reg.unclaimed.insert(pid, exit);
                }
            }
        }
    });
}

pub enum Stdin {
    Null,
    Piped,
}

pub struct Spec<'a> {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub user: Option<&'a str>,
    pub stdin: Stdin,
    pub new_session: bool,
    /// Pipe stdout/stderr to the caller; otherwise /dev/null.
    pub capture: bool,
}

pub struct Spawned {
    pub child: std::process::Child,
    pub exit: Receiver<Exit>,
}

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Environment: defaults for PATH/HOME/USER, then the template's runtime
/// env, then the request's.
pub fn build_env(
    state: &State,
    defaults: &Defaults,
    ident: &users::Ident,
    extra: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
    env.insert("HOME".to_string(), ident.home.clone());
    if let Some(n) = &ident.name {
        env.insert("USER".to_string(), n.clone());
        env.insert("LOGNAME".to_string(), n.clone());
    }
    env.insert("HOSTNAME".to_string(), state.cfg.hostname.clone());
    env.extend(defaults.env.clone());
    env.extend(extra.clone());
    env
}

pub fn spawn(state: &State, spec: Spec) -> Result<Spawned, String> {
    spawn_with(state, spec, |_| {})
}

/// [`spawn`], with `extra` adjusting the command last (a terminal's stdio
/// and `pre_exec`, which runs after the identity switch).
pub fn spawn_with(
    state: &State,
    spec: Spec,
    extra: impl FnOnce(&mut Command),
) -> Result<Spawned, String> {
    let defaults = state.defaults.lock().unwrap().clone();
    let user = spec.user.or(defaults.user.as_deref());
    let ident = users::resolve(user)?;
    let env = build_env(state, &defaults, &ident, &spec.env);
    let cwd = spec
        .cwd
        .clone()
        .or_else(|| defaults.workdir.clone())
        .unwrap_or_else(|| "/".into());
    if spec.argv.is_empty() {
        return Err("empty argv".into());
    }
    let mut cmd = Command::new(&spec.argv[0]);
    let pipe = |on: bool| if on { Stdio::piped() } else { Stdio::null() };
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(&env)
        .current_dir(&cwd)
        .stdin(pipe(matches!(spec.stdin, Stdin::Piped)))
        .stdout(pipe(spec.capture))
        .stderr(pipe(spec.capture));
    if !spec.new_session {
        // Its own process group, so a kill reaches its children too.
        cmd.process_group(0);
    }
    // Everything the child needs, allocated before the fork.
    let groups: Vec<Gid> = ident.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    let (uid, gid) = (Uid::from_raw(ident.uid), Gid::from_raw(ident.gid));
    let new_session = spec.new_session;
    // std's `uid`/`gid` would drop the supplementary groups (and cannot set
    // them, or a new session, on stable Rust: `CommandExt::groups` and
    // `setsid` are unstable), so the identity is set here.
    // SAFETY: runs in the child between fork and exec; it only makes raw
    // syscalls through rustix (no allocation, no locks), which is what
    // `pre_exec` requires.
    unsafe {
        cmd.pre_exec(move || {
            if new_session {
                rustix::process::setsid()?;
            }
            rustix::thread::set_thread_groups(&groups)?;
            rustix::thread::set_thread_res_gid(gid, gid, gid)?;
            rustix::thread::set_thread_res_uid(uid, uid, uid)?;
            Ok(())
        });
    }
    extra(&mut cmd);
    let (tx, rx) = channel();
    let mut reg = state.reg.lock().unwrap();
    let child = cmd.spawn().map_err(|e| {
        format!(
            "{}: {e} (cwd {cwd}, user {})",
            crate::agent::clip(&spec.argv[0], 256),
            user.unwrap_or("root")
        )
    })?;
    let pid = child.id() as i32;
    match reg.unclaimed.remove(&pid) {
        Some(exit) => {
            let _ = tx.send(exit);
        }
        None => {
            reg.waiters.insert(pid, tx);
        }
    }
    drop(reg);
    Ok(Spawned { child, exit: rx })
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Starts the template's start command under `/bin/sh -c` with the runtime
/// defaults, in its own session; its output is kept (last 16 KiB) and
/// copied to the console.
pub fn start_command(state: &State, cmd: &str) -> Result<u32, String> {
    let spec = Spec {
        argv: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
        env: BTreeMap::new(),
        cwd: None,
        user: None,
        stdin: Stdin::Null,
        new_session: true,
        capture: true,
    };
    // Hold the start lock so the reaper sees the pid before a fast exit.
    let mut st = state.start.lock().unwrap();
    if st.pid.is_some() && st.exit.is_none() {
        return Err(format!(
            "the start command is already running (pid {:?})",
            st.pid
        ));
    }
    *st = StartState {
        configured: true,
        cmd: cmd.to_string(),
        ..Default::default()
    };
    let sp = match spawn(state, spec) {
        Ok(sp) => sp,
        Err(e) => {
            st.spawn_error = Some(e.clone());
            return Err(e);
        }
    };
    let pid = sp.child.id();
    st.pid = Some(pid);
    st.started_unix_ms = now_unix_ms();
    // The registry may already hold its exit if it died instantly.
    if let Ok(exit) = sp.exit.try_recv() {
        st.exit = Some(exit);
    }
    drop(st);
    let mut child = sp.child;
    for r in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let state = state.clone();
        std::thread::spawn(move || copy_start_output(state, r));
    }
    let st2 = state.clone();
    std::thread::spawn(move || {
        if let Ok(exit) = sp.exit.recv() {
            st2.start.lock().unwrap().exit = Some(exit);
            crate::log(&format!("start command (pid {pid}) exited: {exit:?}"));
        }
    });
    Ok(pid)
}

fn copy_start_output(state: State, mut r: Box<dyn Read + Send>) {
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                {
                    let mut st = state.start.lock().unwrap();
                    st.output.extend(&buf[..n]);
                    let over = st.output.len().saturating_sub(START_OUTPUT_KEEP);
                    st.output.drain(..over);
                }
                use std::io::Write;
                let _ = std::io::stderr().write_all(&buf[..n]);
            }
        }
    }
}
