//! Template snapshots: boot the template rootfs, optionally run declarative
//! build steps in it ([`build_snapshot_with_steps`], the native backend),
//! start the start command with the runtime defaults, wait for readiness,
//! snapshot memory + disk.
//! Machines restore it with a qcow2 overlay each.
//!
//! The snapshot directory's files and manifest: see [`crate::snapshot`].

use crate::agent::{AgentClient, ExecRequest};
use crate::process::{self, Watch};
use crate::qemu::{BootSpec, DirGuard, MemoryMode, QemuVm, QemuVmm, RestoreSpec};
use crate::readiness::{Readiness, wait_ready};
use crate::snapshot::{self as snapfs};
pub use crate::snapshot::{SNAPSHOT_FILE, Snapshot, SnapshotMeta, Timings, VmMeta};
use crate::{VmError, rootfs};
use nullspace_model::build::plan::BuildPlan;
use nullspace_model::build::step::{CopyItem, Step};
use nullspace_model::snapshot::{
    Device, DiskFormat, DiskLayer, FORMAT_VERSION, Kernel, Memory, SnapshotManifest,
};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What `nullspace-init` reads from `/nullspace/config.json` (shared with
/// the guest through `nullspace-model`).
pub use nullspace_model::guest::GuestConfig;

/// Inputs of a template snapshot.
#[derive(Debug, Clone)]
pub struct TemplateSpec {
    /// The imported `rootfs.ext4` (left untouched; copied into the snapshot).
    pub rootfs: PathBuf,
    /// Runtime defaults (env, user, workdir) and the start command.
    pub config: GuestConfig,
    /// `None`: ready as soon as the agent answers (and the start command, if
    /// any, is still running after the grace period of 0).
    pub readiness: Option<Readiness>,
    pub memory_mb: u32,
    pub vcpus: u32,
    /// Minimum rootfs size; grown before boot.
    pub disk_mb: Option<u64>,
    pub boot_timeout: Duration,
    /// Guest networking (QEMU user-mode NAT to the host's network, e.g. for
    /// `apt_install`/`pip_install` steps); default off. Machines restored
    /// from the snapshot keep the network device.
    pub network: bool,
    /// How the snapshot stores guest memory (default: mapped).
    pub memory_mode: MemoryMode,
    /// The largest size machines of the template may take
    /// ([`nullspace_model::size`]); `None`: exactly `vcpus`/`memory_mb`.
    pub ceiling: Option<nullspace_model::size::Ceiling>,
}

impl TemplateSpec {
    pub fn new(rootfs: &Path, config: GuestConfig) -> TemplateSpec {
        TemplateSpec {
            rootfs: rootfs.to_path_buf(),
            config,
            readiness: None,
            memory_mb: 512,
            vcpus: 2,
            disk_mb: None,
            boot_timeout: Duration::from_secs(60),
            network: false,
            memory_mode: MemoryMode::Mapped,
            ceiling: None,
        }
    }
}

/// Boots the template, waits for readiness and snapshots it into `out`
/// (created; must not exist). On failure `out` is removed and no VM is left.
/// On cancel QEMU is killed and reaped, `out` and the VM's directory are
/// removed, and [`VmError::Cancelled`] is returned.
pub fn build_snapshot(
    vmm: &QemuVmm,
    spec: &TemplateSpec,
    out: &Path,
    cancel: &CancellationToken,
) -> Result<Snapshot, VmError> {
    let watch = Watch::new(cancel);
    let r = build_inner(vmm, spec, None, out, &watch);
    process::settle(r, watch)
}

/// The native backend's input: a plan's declarative steps (the build
/// model's one [`Step`] type) and what they run with.
#[derive(Debug, Clone, Copy)]
pub struct NativeSteps<'a> {
    pub steps: &'a [Step],
    /// Where the uploaded context was materialized: a copy source
    /// (`builder-context/step-N/src-M/…`) is the host path `context_root/src`.
    pub context_root: &'a Path,
    /// Seen by every step; never kept in the template.
    pub build_env: &'a BTreeMap<String, String>,
    /// The request's runtime settings, applied after the steps (the
    /// template keeps them): envs, then the workdir (created) and user.
    pub runtime_env: &'a BTreeMap<String, String>,
    pub runtime_workdir: Option<&'a str>,
    pub runtime_user: Option<&'a str>,
}

static NO_ENV: BTreeMap<String, String> = BTreeMap::new();

impl<'a> NativeSteps<'a> {
    /// `steps` alone: no build envs, no runtime settings.
    pub fn new(steps: &'a [Step], context_root: &'a Path) -> NativeSteps<'a> {
        NativeSteps {
            steps,
            context_root,
            build_env: &NO_ENV,
            runtime_env: &NO_ENV,
            runtime_workdir: None,
            runtime_user: None,
        }
    }

    /// The steps of a plan with its build envs and runtime settings.
    pub fn of_plan(plan: &'a BuildPlan, context_root: &'a Path) -> NativeSteps<'a> {
        NativeSteps {
            steps: &plan.steps,
            context_root,
            build_env: &plan.build_envs.0,
            runtime_env: &plan.runtime.env.0,
            runtime_workdir: plan.runtime.workdir.as_deref(),
            runtime_user: plan.runtime.user.as_deref(),
        }
    }
}

/// Like [`build_snapshot`], but boots without the start command, runs the
/// declarative steps in the VM (native backend) on the disk that becomes
/// the snapshot's, then starts the start command with the runtime defaults
/// as the steps (and the runtime settings after them) left them
/// (`spec.config`'s env/user/workdir are the base, e.g. from the image
/// config), waits for readiness and snapshots.
///
/// `on_step` sees every step start, its output, and its end, with the
/// step's 0-based index in `steps.steps`. A failing step is
/// [`VmError::StepFailed`] with that index; the VM is killed and `out`
/// removed. The snapshot's `meta.config` holds the final runtime defaults.
/// Cancel works as for [`build_snapshot`], during a step too.
pub fn build_snapshot_with_steps(
    vmm: &QemuVmm,
    spec: &TemplateSpec,
    steps: &NativeSteps<'_>,
    on_step: &mut dyn FnMut(usize, &Step, StepEvent<'_>),
    out: &Path,
    cancel: &CancellationToken,
) -> Result<Snapshot, VmError> {
    let watch = Watch::new(cancel);
    let r = build_inner(vmm, spec, Some((steps, on_step)), out, &watch);
    process::settle(r, watch)
}

type StepsArg<'a, 'b, 'c> = Option<(
    &'a NativeSteps<'c>,
    &'b mut dyn FnMut(usize, &Step, StepEvent<'_>),
)>;

fn build_inner(
    vmm: &QemuVmm,
    spec: &TemplateSpec,
    steps: StepsArg<'_, '_, '_>,
    out: &Path,
    watch: &Watch,
) -> Result<Snapshot, VmError> {
    rootfs::check_shell(&spec.rootfs)?;
    watch.check()?;
    std::fs::create_dir(out).map_err(VmError::io(out.display().to_string()))?;
    let mut guard = DirGuard(out, false);
    let out = &std::fs::canonicalize(out).map_err(VmError::io(out.display().to_string()))?;
    let disk = out.join("disk.ext4");
    std::fs::copy(&spec.rootfs, &disk).map_err(VmError::io("copy rootfs"))?;
    if let Some(mb) = spec.disk_mb {
        rootfs::grow(&disk, mb)?;
    }
    let mut boot_config = spec.config.clone();
    boot_config.defer_start = steps.is_some();
    let boot = BootSpec {
        disk: disk.clone(),
        config: boot_config,
        memory_mb: spec.memory_mb,
        vcpus: spec.vcpus,
        boot_timeout: spec.boot_timeout,
        network: spec.network,
        memory_mode: spec.memory_mode,
        // The guest writes its RAM straight into the snapshot's file.
        memory_file: Some(out.join("memory.ram")),
        ceiling: spec.ceiling,
    };
    let mut vm = QemuVm::boot_watched(vmm, &boot, watch)?;
    let boot_ms = vm.ready_ms as u64;
    // Every agent wait of the build (steps, readiness) also watches the
    // token: a cancelled call stops its command in the guest at once, and
    // the watch kills QEMU besides.
    let mut cancellable = crate::Vm::agent(&mut vm).with_cancel(watch.token().clone());
    let agent = &mut cancellable;
    let mut config = spec.config.clone();
    config.network = spec.network;
    let mut steps_ms = 0;
    if let Some((native, on_step)) = steps {
        let t_steps = Instant::now();
        let mut st = StepState {
            env: config.env.clone(),
            build_env: native.build_env.clone(),
            user: config.user.clone(),
            workdir: config.workdir.clone(),
        };
        for (i, step) in native.steps.iter().enumerate() {
            watch.check()?;
            on_step(i, step, StepEvent::Started);
            let t = Instant::now();
            run_step(
                agent,
                &mut st,
                Some(i),
                step,
                native.context_root,
                &mut |ev| on_step(i, step, ev),
            )?;
            on_step(
                i,
                step,
                StepEvent::Finished {
                    elapsed: t.elapsed(),
                },
            );
        }
        // The runtime settings the request sets, after the steps (the SDK
        // also sends them as `workdir`/`user` steps; repeating is harmless
        // and covers requests that only set `runtime_config`).
        st.env.extend(native.runtime_env.clone());
        if let Some(w) = native.runtime_workdir {
            let step = Step::Workdir { path: w.into() };
            run_step(
                agent,
                &mut st,
                None,
                &step,
                native.context_root,
                &mut |_| {},
            )?;
        }
        if let Some(u) = native.runtime_user {
            st.user = Some(u.to_string());
        }
        watch.check()?;
        // The page cache is in the memory snapshot too, but the disk file
        // must be complete on its own (e.g. for a later cold boot).
        let sync = agent.exec(&root_argv(&["sync"]), STEP_TIMEOUT)?;
        if !sync.success() {
            return Err(VmError::Snapshot(format!("sync in the guest: {sync:?}")));
        }
        config.env = st.env;
        config.user = st.user;
        config.workdir = st.workdir;
        steps_ms = t_steps.elapsed().as_millis() as u64;
        agent
            .start(
                config.start_cmd.as_deref(),
                &config.env,
                config.user.as_deref(),
                config.workdir.as_deref(),
                Duration::from_secs(30),
            )
            .map_err(|e| match e {
                VmError::Agent(m) | VmError::Guest { message: m, .. } => VmError::StartExited {
                    detail: format!("could not start: {m}"),
                    output: String::new(),
                },
                e => e,
            })?;
    }
    let t_ready = Instant::now();
    match &spec.readiness {
        Some(r) => {
            wait_ready(agent, r)?;
        }
        None => {
            let none = Readiness {
                probe: crate::Probe::Timeout { timeout_ms: 0 },
                timeout: Duration::ZERO,
                interval: Duration::from_millis(100),
                startup_grace: Duration::ZERO,
            };
            wait_ready(agent, &none)?;
        }
    }
    let ready_ms = t_ready.elapsed().as_millis() as u64;
    let info = agent.info(Duration::from_secs(10))?;
    let t_snap = Instant::now();
    let vm_meta = vm.meta().clone();
    let cmdline = vm.cmdline().to_string();
    let (qemu, paused) = vm.snapshot_build(out, watch)?;
    let snapshot_ms = paused.as_millis() as u64;
    let mapped = vm_meta.memory_mode == MemoryMode::Mapped;
    let memory = Memory {
        mode: vm_meta.memory_mode,
        ram: if mapped {
            Some(snapfs::commit_file(out, "memory.ram")?)
        } else {
            None
        },
        state: snapfs::commit_file(out, if mapped { "device.state" } else { "memory.bin" })?,
    };
    let mut manifest = SnapshotManifest {
        format_version: FORMAT_VERSION,
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        qemu,
        kernel: Kernel {
            version: vm_meta.kernel_version.clone(),
            file: snapfs::commit_file(out, "vmlinuz")?,
        },
        initramfs: snapfs::commit_file(out, "initrd.img")?,
        device: Device {
            machine: "microvm".into(),
            accel: vm_meta.accel,
            memory_mib: vm_meta.memory_mb,
            vcpus: vm_meta.vcpus,
            network: vm_meta.network,
            spare_disks: vm_meta.spare_disks,
            nic: vm_meta.nic,
            kernel_cmdline: cmdline,
            ceiling: vm_meta.ceiling,
        },
        disk: vec![DiskLayer {
            format: DiskFormat::Raw,
            file: snapfs::commit_file(out, "disk.ext4")?,
        }],
        memory,
        parent: None,
        guest: serde_json::to_value(&config).unwrap_or_default(),
        start: info["start"].clone(),
        timings_ms: BTreeMap::new(),
    };
    let timings = Timings {
        boot: boot_ms,
        ready: ready_ms,
        snapshot: snapshot_ms,
        steps: steps_ms,
        // QEMU's exit, the kernel/initramfs copies, fsync and hashing.
        commit: (t_snap.elapsed() - paused).as_millis() as u64,
    };
    manifest.timings_ms = timings.to_map();
    snapfs::write_manifest(out, &manifest)?;
    guard.1 = true;
    Snapshot::open(out)
}

/// A machine from a snapshot: a new QEMU with `-incoming`, a qcow2 overlay
/// over the snapshot disk, memory mapped (or streamed), `cont`, agent
/// reconnected. See [`QemuVm::restore`].
pub fn restore(
    snapshot: &Snapshot,
    spec: &RestoreSpec,
    cancel: &CancellationToken,
) -> Result<QemuVm, VmError> {
    QemuVm::restore(snapshot, spec, cancel)
}

/// Commands and file operations of one build step run at most this long.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(3600);

/// What [`build_snapshot_with_steps`] reports per step.
#[derive(Debug)]
pub enum StepEvent<'a> {
    Started,
    /// A chunk of the step's output (stdout or stderr, as it streams).
    Output(&'a [u8]),
    Finished {
        elapsed: Duration,
    },
}

struct StepState {
    env: BTreeMap<String, String>,
    build_env: BTreeMap<String, String>,
    user: Option<String>,
    workdir: Option<String>,
}

fn root_argv(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        user: Some("root".into()),
        cwd: Some("/".into()),
        timeout: Some(STEP_TIMEOUT),
        ..Default::default()
    }
}

/// The last `max` bytes of `out`, cut to whole lines where possible.
fn tail(out: &[u8], max: usize) -> String {
    let s = String::from_utf8_lossy(&out[out.len().saturating_sub(max)..]).to_string();
    if out.len() > max
        && let Some(i) = s.find('\n')
    {
        return s[i + 1..].trim_end().to_string();
    }
    s.trim_end().to_string()
}

fn resolve_path(workdir: Option<&str>, p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        let base = workdir.unwrap_or("/").trim_end_matches('/');
        format!("{base}/{p}")
    }
}

/// Runs one step. Run-type steps (`run`, the shell-run actions,
/// `make_dir`, `make_symlink`, `remove`, `rename`) run as the current user
/// (the last `user` step, else the template's) in the current workdir, with
/// the runtime and build envs so far, like `RUN` after `USER`/`WORKDIR`/
/// `ENV` in a Dockerfile; the shell-run actions run
/// [`Step::shell_command`], the same line the Dockerfile renderer writes,
/// and the file operations run as argv (no quoting involved). `copy` writes
/// as root and then applies `user`/`mode`, like `COPY --chown/--chmod`.
fn run_step(
    agent: &mut AgentClient,
    st: &mut StepState,
    index: Option<usize>,
    step: &Step,
    context_root: &Path,
    emit: &mut dyn FnMut(StepEvent<'_>),
) -> Result<(), VmError> {
    let failed = |exit_code: Option<i32>, tail: String| VmError::StepFailed {
        index,
        action: step.action().to_string(),
        exit_code,
        tail,
    };
    // Runs `req` with the step's env/cwd (and user unless set), streaming
    // output to `on_step`; a non-zero exit is the step's failure.
    let mut run = |agent: &mut AgentClient, mut req: ExecRequest| -> Result<(), VmError> {
        let mut env = st.env.clone();
        env.extend(st.build_env.clone());
        req.env = env;
        if req.cwd.is_none() {
            req.cwd = st.workdir.clone();
        }
        if req.user.is_none() {
            req.user = st.user.clone();
        }
        req.timeout = Some(STEP_TIMEOUT);
        let mut combined = Vec::new();
        let out = agent.exec_streaming(
            &req,
            STEP_TIMEOUT + Duration::from_secs(60),
            &mut |_, d: &[u8]| {
                combined.extend_from_slice(d);
                if combined.len() > 64 << 10 {
                    combined.drain(..combined.len() - (16 << 10));
                }
                emit(StepEvent::Output(d));
            },
        );
        match out {
            Ok(o) if o.success() => Ok(()),
            Ok(o) => {
                let mut t = tail(&combined, 4096);
                if o.timed_out {
                    t.push_str("\n(timed out)");
                } else if let Some(sig) = o.signal {
                    t.push_str(&format!("\n(killed by signal {sig})"));
                }
                Err(failed(o.code, t))
            }
            Err(VmError::Agent(m) | VmError::Guest { message: m, .. }) => Err(failed(None, m)),
            Err(e) => Err(e),
        }
    };
    let argv = |a: &[&str]| ExecRequest {
        argv: a.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    match step {
        Step::Run { command, user } => run(
            agent,
            ExecRequest {
                cmd: Some(command.clone()),
                user: user.clone(),
                ..Default::default()
            },
        ),
        Step::AptInstall { .. }
        | Step::PipInstall { .. }
        | Step::NpmInstall { .. }
        | Step::BunInstall { .. }
        | Step::GitClone { .. } => {
            let command = step.shell_command().unwrap_or_default();
            run(agent, ExecRequest::shell(&command))
        }
        Step::MakeDir { path, mode } => {
            run(agent, argv(&["mkdir", "-p", "--", path]))?;
            match mode {
                Some(m) => run(
                    agent,
                    argv(&["chmod", &format!("{:o}", m.bits()), "--", path]),
                ),
                None => Ok(()),
            }
        }
        Step::MakeSymlink { target, path } => run(agent, argv(&["ln", "-s", "--", target, path])),
        Step::Remove {
            path,
            recursive,
            force,
        } => {
            let mut a = vec!["rm"];
            match (recursive, force) {
                (true, true) => a.push("-rf"),
                (true, false) => a.push("-r"),
                (false, true) => a.push("-f"),
                (false, false) => {}
            }
            a.extend(["--", path.as_str()]);
            run(agent, argv(&a))
        }
        Step::Rename { src, dst, force } => {
            let mut a = vec!["mv"];
            if *force {
                a.push("-f");
            }
            a.extend(["--", src.as_str(), dst.as_str()]);
            run(agent, argv(&a))
        }
        Step::Workdir { path } => {
            let p = resolve_path(st.workdir.as_deref(), path);
            run(agent, root_argv(&["mkdir", "-p", "--", &p]))?;
            st.workdir = Some(p);
            Ok(())
        }
        Step::User { user } => {
            st.user = Some(user.clone());
            Ok(())
        }
        Step::SkipCache => Ok(()),
        Step::Copy(_) | Step::CopyItems { .. } => {
            let mut copied = String::new();
            for item in step.copies() {
                let sources = resolve_sources(context_root, item).map_err(|m| failed(None, m))?;
                copied.push_str(&copy_item(agent, st, item, &sources, &mut run, &failed)?);
            }
            emit(StepEvent::Output(copied.as_bytes()));
            Ok(())
        }
    }
}

/// A copy's sources as `(host path, is a directory)`, each under
/// `context_root` (the plan checked the paths: relative, no `..`).
fn resolve_sources(context_root: &Path, item: &CopyItem) -> Result<Vec<(PathBuf, bool)>, String> {
    let mut out = vec![];
    for src in &item.sources {
        let host = context_root.join(src);
        let md = std::fs::symlink_metadata(&host).map_err(|e| {
            format!(
                "source {src:?} is not in the uploaded build context ({e}); upload it with the build"
            )
        })?;
        if md.is_dir() {
            out.push((host, true));
        } else if md.is_file() {
            out.push((host, false));
        } else {
            return Err(format!("source {src:?} is not a regular file or directory"));
        }
    }
    Ok(out)
}

/// One copy: a file goes to `dst`, or into it when `dst` ends with `/`, is
/// an existing directory or there are several sources; a directory's
/// contents go into `dst`. `mode` applies to every copied entry, otherwise
/// the host modes are kept; `user` (`user[:group]`) owns them. Returns the
/// guest paths of the files written, one per line.
fn copy_item(
    agent: &mut AgentClient,
    st: &StepState,
    item: &CopyItem,
    sources: &[(PathBuf, bool)],
    run: &mut dyn FnMut(&mut AgentClient, ExecRequest) -> Result<(), VmError>,
    failed: &dyn Fn(Option<i32>, String) -> VmError,
) -> Result<String, VmError> {
    let (dst, user) = (&item.dst, &item.user);
    let mode = item.mode.map(|m| m.bits());
    let dst_abs = resolve_path(st.workdir.as_deref(), dst);
    let into_dir = dst.ends_with('/')
        || sources.len() > 1
        || sources.iter().any(|(_, d)| *d)
        || agent
            .exec(&root_argv(&["test", "-d", &dst_abs]), STEP_TIMEOUT)?
            .success();
    let base = dst_abs.trim_end_matches('/').to_string();
    let base = if base.is_empty() {
        "/".to_string()
    } else {
        base
    };
    let join = |rel: &str| {
        if base == "/" {
            format!("/{rel}")
        } else {
            format!("{base}/{rel}")
        }
    };
    // (guest path, mode) of every directory and file to create.
    let mut dirs: Vec<(String, u32)> = vec![];
    let mut files: Vec<(String, PathBuf, u32)> = vec![];
    if into_dir {
        dirs.push((base.clone(), mode.unwrap_or(0o755)));
    }
    for (host, is_dir) in sources {
        if *is_dir {
            walk(host, "", &mut |rel, p, md| {
                let m = mode.unwrap_or(md.permissions().mode() & 0o7777);
                if md.is_dir() {
                    dirs.push((join(rel), m));
                } else {
                    files.push((join(rel), p.to_path_buf(), m));
                }
            })
            .map_err(|e| failed(None, format!("{}: {e}", host.display())))?;
        } else {
            let md = std::fs::metadata(host)
                .map_err(|e| failed(None, format!("{}: {e}", host.display())))?;
            let m = mode.unwrap_or(md.permissions().mode() & 0o7777);
            let name = host
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let target = if into_dir { join(&name) } else { base.clone() };
            files.push((target, host.clone(), m));
        }
    }
    if !into_dir && let Some(parent) = Path::new(&base).parent() {
        let parent = parent.to_string_lossy().to_string();
        run(agent, root_argv(&["mkdir", "-p", "--", &parent]))?;
    }
    let mut paths: Vec<&str> = vec![];
    for batch in dirs.chunks(200) {
        let mut a = vec!["mkdir", "-p", "--"];
        a.extend(batch.iter().map(|(p, _)| p.as_str()));
        run(agent, root_argv(&a))?;
    }
    // Directory modes as in the context (or `mode`), grouped per mode.
    let mut by_mode: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for (p, m) in &dirs {
        if p != &base || mode.is_some() {
            by_mode.entry(*m).or_default().push(p);
        }
    }
    for (m, ps) in &by_mode {
        for batch in ps.chunks(200) {
            let ms = format!("{m:o}");
            let mut a = vec!["chmod", ms.as_str(), "--"];
            a.extend(batch);
            run(agent, root_argv(&a))?;
        }
    }
    for (g, h, m) in &files {
        // Streamed in chunks: never the whole file in memory.
        let mut src =
            std::fs::File::open(h).map_err(|e| failed(None, format!("{}: {e}", h.display())))?;
        agent
            .copy_to_guest(&mut src, g, *m, STEP_TIMEOUT)
            .map_err(|e| match e {
                VmError::Agent(m) | VmError::Guest { message: m, .. } => failed(None, m),
                VmError::Io { context, source } => failed(None, format!("{context}: {source}")),
                e => e,
            })?;
    }
    if let Some(u) = user {
        paths.extend(dirs.iter().map(|(p, _)| p.as_str()));
        paths.extend(files.iter().map(|(p, _, _)| p.as_str()));
        for batch in paths.chunks(200) {
            let mut a = vec!["chown", u.as_str(), "--"];
            a.extend(batch);
            run(agent, root_argv(&a))?;
        }
    }
    // The guest paths written, for the log.
    Ok(files.iter().map(|(g, _, _)| format!("{g}\n")).collect())
}

/// Every entry under `dir` (not `dir` itself), parents before children:
/// `f(relative path, host path, metadata)`. Symlinks are refused (the SDK
/// never uploads them).
fn walk(
    dir: &Path,
    rel: &str,
    f: &mut dyn FnMut(&str, &Path, &std::fs::Metadata),
) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().to_string();
        let r = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let md = std::fs::symlink_metadata(e.path())?;
        if md.file_type().is_symlink() {
            return Err(std::io::Error::other(format!(
                "{r}: symlinks are not supported in the build context"
            )));
        }
        f(&r, &e.path(), &md);
        if md.is_dir() {
            walk(&e.path(), &r, f)?;
        }
    }
    Ok(())
}
