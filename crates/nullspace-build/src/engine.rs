//! Dockerfile engines behind one interface: [`Buildah`] (Debian's
//! daemonless buildah, `--storage-driver vfs --isolation chroot`) and
//! [`Buildkit`] (a BuildKit daemon at a configured address, driven through
//! `buildctl`). Each writes an OCI layout (`oci:DIR:latest`) that goes
//! through the same importer as every other image.
//!
//! Secrets and registry credentials are written only to a private directory
//! under `/dev/shm` (tmpfs: memory, never disk; directory 0700, files 0600)
//! and removed when the build ends, whatever the outcome. Every line the
//! engine prints is scrubbed of secret values and passwords before it
//! reaches the log callback or an error message.
//!
//! Network: buildah's `--network none` is refused with chroot isolation, so a
//! build without network runs buildah in a network namespace of its own
//! (`unshare --net`: only a downed loopback). Base images are pulled first,
//! with network, and the build then runs with `--pull=never`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio_util::sync::CancellationToken;

use crate::context::clean_relative;
use crate::dockerfile::{self, Analysis};
use nullspace_vm::process::{self as procs, PidDir};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{engine} is not available: {message}")]
    Unavailable { engine: String, message: String },
    #[error("{0}")]
    Dockerfile(#[from] dockerfile::DockerfileError),
    #[error("{engine}: {message}")]
    Invalid { engine: String, message: String },
    #[error("{engine} {step} failed ({status}): {tail}")]
    Failed {
        engine: String,
        step: String,
        status: String,
        /// The last lines of the engine's output (scrubbed).
        tail: String,
    },
    #[error("{engine}: build cancelled")]
    Cancelled { engine: String },
    #[error("{engine}: {context}: {source}")]
    Io {
        engine: String,
        context: String,
        #[source]
        source: io::Error,
    },
}

/// Credentials for one registry host.
#[derive(Clone)]
pub struct RegistryCredential {
    pub registry: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredential")
            .field("registry", &self.registry)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// One Dockerfile build.
pub struct EngineBuild<'a> {
    /// The build context directory (already filtered by `.dockerignore`).
    pub context_dir: &'a Path,
    /// Relative to the context, inside it; usually `Dockerfile`.
    pub dockerfile: &'a str,
    pub build_args: BTreeMap<String, String>,
    pub target: Option<String>,
    /// `(id, value)` for `RUN --mount=type=secret,id=…`.
    pub secrets: Vec<(String, String)>,
    /// False: the build runs without network (`internet_access: false`).
    pub network: bool,
    pub registry_auth: Vec<RegistryCredential>,
    /// The OCI layout to create (must not exist or be empty).
    pub output_dir: &'a Path,
    /// Streamed engine output, one scrubbed line per call.
    pub log: &'a dyn Fn(&str),
    /// Cancelled: the engine's process tree is killed, and `build` returns
    /// [`EngineError::Cancelled`] once every process of it is gone.
    pub cancel: Option<&'a CancellationToken>,
}

impl EngineBuild<'_> {
    pub fn new<'a>(
        context_dir: &'a Path,
        output_dir: &'a Path,
        log: &'a dyn Fn(&str),
    ) -> EngineBuild<'a> {
        EngineBuild {
            context_dir,
            dockerfile: "Dockerfile",
            build_args: BTreeMap::new(),
            target: None,
            secrets: vec![],
            network: true,
            registry_auth: vec![],
            output_dir,
            log,
            cancel: None,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineOutput {
    /// `buildah` or `buildkit`.
    pub engine: String,
    pub version: String,
    /// The layout's reference: `oci:DIR:latest`.
    pub reference: String,
    pub layout_dir: PathBuf,
    pub duration_ms: u64,
    /// What the Dockerfile analysis found (stages, warnings…).
    #[serde(skip)]
    pub analysis: Option<Analysis>,
}

pub trait DockerfileEngine: Send + Sync {
    fn name(&self) -> &'static str;
    fn version(&self) -> &str;
    fn build(&self, b: &EngineBuild<'_>) -> Result<EngineOutput, EngineError>;
}

/// Where engines keep their state and which daemon to use.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// buildah's storage (its layer cache, kept between builds) lives in
    /// `state_dir/buildah`.
    pub state_dir: PathBuf,
    /// A BuildKit daemon address (`unix:///run/buildkit/buildkitd.sock`,
    /// `tcp://…`), if one is configured.
    pub buildkit_addr: Option<String>,
    /// Parent of the private per-build directory for secrets and
    /// credentials: a tmpfs (`/dev/shm`).
    pub secret_root: PathBuf,
    /// Where engine processes are recorded while they run (see
    /// [`nullspace_vm::process`]); `None` records nothing.
    pub pid_dir: Option<PidDir>,
}

impl EngineConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> EngineConfig {
        EngineConfig {
            state_dir: state_dir.into(),
            buildkit_addr: None,
            secret_root: PathBuf::from("/dev/shm"),
            pid_dir: None,
        }
    }
}

/// The engines this machine has: buildah when it is on PATH and answers,
/// BuildKit when an address is configured and `buildctl debug workers`
/// answers. BuildKit first (the Dockerfile default of the spec).
pub fn detect(config: &EngineConfig) -> Vec<Box<dyn DockerfileEngine>> {
    let mut out: Vec<Box<dyn DockerfileEngine>> = vec![];
    if let Some(addr) = &config.buildkit_addr
        && let Ok(mut b) = Buildkit::probe(addr, &config.secret_root)
    {
        b.pids = config.pid_dir.clone();
        out.push(Box::new(b));
    }
    if let Ok(b) = Buildah::new(config) {
        out.push(Box::new(b));
    }
    out
}

// ---------------------------------------------------------------- helpers

/// Replaces secret values (and each of their lines) in engine output.
#[derive(Default, Clone)]
pub struct Scrubber {
    needles: Vec<String>,
}

impl Scrubber {
    pub fn add(&mut self, secret: &str) {
        let mut add = |s: &str| {
            let s = s.trim_end_matches(['\r', '\n']);
            if !s.is_empty() && !self.needles.iter().any(|n| n == s) {
                self.needles.push(s.to_string());
            }
        };
        add(secret);
        for line in secret.lines() {
            add(line);
        }
        self.needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
    }

    pub fn scrub(&self, line: &str) -> String {
        let mut out = line.to_string();
        for n in &self.needles {
            if out.contains(n.as_str()) {
                out = out.replace(n.as_str(), "***");
            }
        }
        out
    }
}

fn scrubber_for(b: &EngineBuild<'_>) -> Scrubber {
    let mut s = Scrubber::default();
    for (_, v) in &b.secrets {
        s.add(v);
    }
    for c in &b.registry_auth {
        s.add(&c.password);
        s.add(&auth_token(c));
    }
    s
}

fn auth_token(c: &RegistryCredential) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password))
}

/// A private directory on tmpfs; removed on drop.
struct PrivateDir {
    dir: tempfile::TempDir,
}

impl PrivateDir {
    fn new(root: &Path) -> io::Result<PrivateDir> {
        let dir = tempfile::Builder::new()
            .prefix("nullspace-build-")
            .tempdir_in(root)?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))?;
        Ok(PrivateDir { dir })
    }

    fn write(&self, name: &str, data: &[u8]) -> io::Result<PathBuf> {
        let p = self.dir.path().join(name);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)?;
        f.write_all(data)?;
        Ok(p)
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Writes the secrets as files; `(id, path)`.
fn write_secrets(
    dir: &PrivateDir,
    secrets: &[(String, String)],
) -> io::Result<Vec<(String, PathBuf)>> {
    secrets
        .iter()
        .enumerate()
        .map(|(i, (id, v))| Ok((id.clone(), dir.write(&format!("secret-{i}"), v.as_bytes())?)))
        .collect()
}

/// A `{"auths": {...}}` file as buildah's `--authfile` and Docker's
/// `config.json` read it.
fn auth_json(creds: &[RegistryCredential]) -> Vec<u8> {
    let mut auths = serde_json::Map::new();
    for c in creds {
        auths.insert(
            c.registry.clone(),
            serde_json::json!({ "auth": auth_token(c) }),
        );
    }
    serde_json::to_vec(&serde_json::json!({ "auths": auths })).unwrap()
}

/// `127.0.0.0/8`, `localhost`, `[::1]`, with or without a port.
pub fn is_loopback_host(host: &str) -> bool {
    let h = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    h == "localhost"
        || h == "::1"
        || h.parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_loopback())
}

/// Checks and reads the Dockerfile; returns its analysis.
fn prepare(engine: &str, b: &EngineBuild<'_>) -> Result<(PathBuf, Analysis), EngineError> {
    let invalid = |message: String| EngineError::Invalid {
        engine: engine.into(),
        message,
    };
    let rel = clean_relative(b.dockerfile).map_err(|e| invalid(e.to_string()))?;
    // Every component must be a real directory/file inside the context.
    let mut cur = b.context_dir.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        let m = fs::symlink_metadata(&cur)
            .map_err(|e| invalid(format!("Dockerfile {}: {e}", b.dockerfile)))?;
        if m.file_type().is_symlink() {
            return Err(invalid(format!(
                "Dockerfile {}: symlinks are not allowed",
                b.dockerfile
            )));
        }
    }
    if !fs::symlink_metadata(&cur)
        .map(|m| m.is_file())
        .unwrap_or(false)
    {
        return Err(invalid(format!(
            "Dockerfile {} is not a regular file",
            b.dockerfile
        )));
    }
    let text = fs::read_to_string(&cur).map_err(|e| invalid(format!("Dockerfile: {e}")))?;
    let analysis = dockerfile::analyze(&text, &b.build_args)?;
    analysis.check_engine(engine)?;
    if let Some(t) = &b.target {
        analysis.check_target(t)?;
    }
    for (id, _) in &b.secrets {
        nullspace_model::build::rules::secret_id(id).map_err(|e| invalid(e.to_string()))?;
    }
    if let Ok(mut rd) = fs::read_dir(b.output_dir)
        && rd.next().is_some()
    {
        return Err(invalid(format!(
            "output {} is not empty",
            b.output_dir.display()
        )));
    }
    Ok((cur, analysis))
}

/// Runs a command, streaming scrubbed lines to `log`. A cancel kills its
/// whole process tree ([`procs::kill_tree`]) within ~100 ms and returns
/// [`EngineError::Cancelled`] only once the command has been reaped.
/// Returns the status and the last lines of output.
fn run_streaming(
    engine: &str,
    step: &str,
    mut cmd: Command,
    log: &dyn Fn(&str),
    scrub: &Scrubber,
    cancel: Option<&CancellationToken>,
    pids: Option<&PidDir>,
) -> Result<(ExitStatus, Vec<String>), EngineError> {
    if cancel.is_some_and(CancellationToken::is_cancelled) {
        return Err(EngineError::Cancelled {
            engine: engine.into(),
        });
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    procs::prepare(&mut cmd);
    let mut child = cmd.spawn().map_err(|source| EngineError::Io {
        engine: engine.into(),
        context: format!("starting {step}"),
        source,
    })?;
    let _pidfile = pids.and_then(|p| p.record(child.id()).ok());
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = vec![];
    let pipes: Vec<Box<dyn Read + Send>> = vec![
        Box::new(child.stdout.take().unwrap()),
        Box::new(child.stderr.take().unwrap()),
    ];
    for pipe in pipes {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut r = BufReader::new(pipe);
            let mut buf = vec![];
            while let Ok(n) = r.read_until(b'\n', &mut buf) {
                if n == 0 {
                    break;
                }
                let line = String::from_utf8_lossy(&buf);
                let _ = tx.send(line.trim_end_matches(['\n', '\r']).to_string());
                buf.clear();
            }
        }));
    }
    drop(tx);
    let mut tail: Vec<String> = vec![];
    let mut push = |line: String| {
        let line = scrub.scrub(&line);
        log(&line);
        tail.push(line);
        if tail.len() > 20 {
            tail.remove(0);
        }
    };
    let mut killed_at: Option<Instant> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if killed_at.is_none() => push(line),
            // After a cancel, output is dropped: the build is over.
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if killed_at.is_none() && cancel.is_some_and(CancellationToken::is_cancelled) {
            procs::kill_tree(child.id());
            killed_at = Some(Instant::now());
        }
        // A killed tree closes its pipes at once; a process that escaped
        // the tree (and still holds a pipe) must not hold the build.
        if killed_at.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
            break;
        }
    }
    let status = child.wait().map_err(|source| EngineError::Io {
        engine: engine.into(),
        context: format!("waiting for {step}"),
        source,
    });
    if killed_at.is_some() {
        return Err(EngineError::Cancelled {
            engine: engine.into(),
        });
    }
    for r in readers {
        let _ = r.join();
    }
    Ok((status?, tail))
}

fn check(
    engine: &str,
    step: &str,
    r: (ExitStatus, Vec<String>),
) -> Result<Vec<String>, EngineError> {
    if r.0.success() {
        Ok(r.1)
    } else {
        Err(EngineError::Failed {
            engine: engine.into(),
            step: step.into(),
            status: r.0.to_string(),
            tail: r.1.join("\n"),
        })
    }
}

fn unavailable(engine: &str, message: impl Into<String>) -> EngineError {
    EngineError::Unavailable {
        engine: engine.into(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------- buildah

/// Debian's buildah, daemonless, as root with vfs storage and chroot
/// isolation. Its storage under `state_dir/buildah` is the engine's own
/// layer cache (`--layers`), kept between builds.
pub struct Buildah {
    program: PathBuf,
    version: String,
    root: PathBuf,
    runroot: PathBuf,
    secret_root: PathBuf,
    pids: Option<PidDir>,
}

impl Buildah {
    pub fn new(config: &EngineConfig) -> Result<Buildah, EngineError> {
        Buildah::with_program("buildah", config)
    }

    pub fn with_program(
        program: impl Into<PathBuf>,
        config: &EngineConfig,
    ) -> Result<Buildah, EngineError> {
        let program = program.into();
        let out = Command::new(&program)
            .arg("--version")
            .output()
            .map_err(|e| unavailable("buildah", format!("{}: {e}", program.display())))?;
        if !out.status.success() {
            return Err(unavailable("buildah", "`buildah --version` failed"));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .split_whitespace()
            .skip_while(|w| *w != "version")
            .nth(1)
            .unwrap_or("unknown")
            .to_string();
        let base = config.state_dir.join("buildah");
        Ok(Buildah {
            program,
            version,
            root: base.join("storage"),
            runroot: base.join("run"),
            secret_root: config.secret_root.clone(),
            pids: config.pid_dir.clone(),
        })
    }

    fn command(&self, no_network: bool) -> Command {
        let mut c = if no_network {
            let mut c = Command::new("unshare");
            c.arg("--net").arg("--").arg(&self.program);
            c
        } else {
            Command::new(&self.program)
        };
        c.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .arg("--storage-driver")
            .arg("vfs");
        c
    }

    /// Storage location (for tests and cache size reports).
    pub fn storage_dir(&self) -> &Path {
        &self.root
    }

    /// The `buildah build` arguments after the global ones.
    #[allow(clippy::too_many_arguments)]
    pub fn build_args(
        b: &EngineBuild<'_>,
        dockerfile: &Path,
        tag: &str,
        secrets: &[(String, PathBuf)],
        authfile: Option<&Path>,
        insecure: bool,
        pull_never: bool,
    ) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "build".into(),
            "--isolation".into(),
            "chroot".into(),
            "--layers".into(),
            "--format".into(),
            "oci".into(),
            "-f".into(),
            dockerfile.display().to_string(),
            "-t".into(),
            tag.into(),
        ];
        if let Some(t) = &b.target {
            a.extend(["--target".into(), t.clone()]);
        }
        for (k, v) in &b.build_args {
            a.extend(["--build-arg".into(), format!("{k}={v}")]);
        }
        for (id, p) in secrets {
            a.extend(["--secret".into(), format!("id={id},src={}", p.display())]);
        }
        if let Some(f) = authfile {
            a.extend(["--authfile".into(), f.display().to_string()]);
        }
        if insecure {
            a.push("--tls-verify=false".into());
        }
        if pull_never {
            a.push("--pull=never".into());
        }
        a.push(b.context_dir.display().to_string());
        a
    }
}

/// Maps an I/O failure of an engine's `context` step to [`EngineError::Io`].
fn io_err(engine: &str, context: &str) -> impl FnOnce(std::io::Error) -> EngineError + use<> {
    let (engine, context) = (engine.to_string(), context.to_string());
    move |source| EngineError::Io {
        engine,
        context,
        source,
    }
}

impl DockerfileEngine for Buildah {
    fn name(&self) -> &'static str {
        "buildah"
    }

    fn version(&self) -> &str {
        &self.version
    }

    fn build(&self, b: &EngineBuild<'_>) -> Result<EngineOutput, EngineError> {
        const E: &str = "buildah";
        let start = Instant::now();
        let (dockerfile, analysis) = prepare(E, b)?;
        let io = |context: &str| io_err(E, context);
        fs::create_dir_all(&self.root).map_err(io("storage"))?;
        fs::create_dir_all(&self.runroot).map_err(io("storage"))?;
        let scrub = scrubber_for(b);
        let private = PrivateDir::new(&self.secret_root).map_err(io("private dir"))?;
        let secrets = write_secrets(&private, &b.secrets).map_err(io("secrets"))?;
        let authfile = if b.registry_auth.is_empty() {
            None
        } else {
            Some(
                private
                    .write("auth.json", &auth_json(&b.registry_auth))
                    .map_err(io("authfile"))?,
            )
        };
        let hosts = analysis.registry_hosts();
        let insecure = !hosts.is_empty() && hosts.iter().all(|h| is_loopback_host(h));
        let cancel = b.cancel;
        let pids = self.pids.as_ref();

        // Without network: pull the base images first (with network), then
        // build in a network namespace of its own.
        if !b.network {
            let mut refs: Vec<String> = analysis
                .external_images()
                .map(|(_, r, _)| r.to_string())
                .collect();
            refs.extend(analysis.imported_images.iter().map(|i| i.reference.clone()));
            refs.sort();
            refs.dedup();
            for r in refs {
                let mut c = self.command(false);
                c.arg("pull");
                if let Some(f) = &authfile {
                    c.arg("--authfile").arg(f);
                }
                if is_loopback_host(&dockerfile::registry_host(&r)) {
                    c.arg("--tls-verify=false");
                }
                c.arg(&r);
                check(
                    E,
                    "pull",
                    run_streaming(E, "pull", c, b.log, &scrub, cancel, pids)?,
                )?;
            }
        }

        let tag = format!(
            "localhost/nullspace-build-{}-{}",
            std::process::id(),
            start.elapsed().as_nanos() ^ (b.output_dir.as_os_str().len() as u128) ^ unique()
        );
        let mut c = self.command(!b.network);
        c.args(Buildah::build_args(
            b,
            &dockerfile,
            &tag,
            &secrets,
            authfile.as_deref(),
            insecure,
            !b.network,
        ));
        let built = run_streaming(E, "build", c, b.log, &scrub, cancel, pids)
            .and_then(|r| check(E, "build", r));
        // Secrets and credentials leave tmpfs before anything else happens.
        drop(private);
        let result = built.and_then(|_| {
            let mut c = self.command(false);
            c.arg("push")
                .arg(&tag)
                .arg(format!("oci:{}:latest", b.output_dir.display()));
            check(
                E,
                "push",
                run_streaming(E, "push", c, b.log, &scrub, cancel, pids)?,
            )
        });
        // Drop the tag; the intermediate layers stay as the layer cache.
        let _ = self
            .command(false)
            .arg("rmi")
            .arg(&tag)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        result?;
        Ok(EngineOutput {
            engine: E.into(),
            version: self.version.clone(),
            reference: format!("oci:{}:latest", b.output_dir.display()),
            layout_dir: b.output_dir.to_path_buf(),
            duration_ms: start.elapsed().as_millis() as u64,
            analysis: Some(analysis),
        })
    }
}

fn unique() -> u128 {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    t.wrapping_add(N.fetch_add(1, Ordering::Relaxed) as u128)
}

// ---------------------------------------------------------------- buildkit

/// A BuildKit daemon driven through `buildctl`. Heredocs work (the
/// Dockerfile frontend supports them); no network via
/// `force-network-mode=none`; registry credentials via a `DOCKER_CONFIG`
/// directory on tmpfs.
pub struct Buildkit {
    addr: String,
    version: String,
    secret_root: PathBuf,
    pids: Option<PidDir>,
}

impl Buildkit {
    /// Asks the daemon for its workers; fails when `buildctl` is missing or
    /// nothing answers at `addr`.
    pub fn probe(addr: &str, secret_root: &Path) -> Result<Buildkit, EngineError> {
        let out = Command::new("buildctl")
            .args(["--addr", addr, "debug", "workers"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| unavailable("buildkit", format!("buildctl: {e}")))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(unavailable(
                "buildkit",
                format!(
                    "no daemon answers at {addr}: {}",
                    err.lines().last().unwrap_or("").trim()
                ),
            ));
        }
        let v = Command::new("buildctl").arg("--version").output();
        let version = v
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .nth(2)
                    .unwrap_or("unknown")
                    .to_string()
            })
            .unwrap_or_else(|| "unknown".into());
        Ok(Buildkit {
            addr: addr.into(),
            version,
            secret_root: secret_root.into(),
            pids: None,
        })
    }

    /// The `buildctl` arguments of a build.
    pub fn build_args(
        addr: &str,
        b: &EngineBuild<'_>,
        secrets: &[(String, PathBuf)],
        tar: &Path,
    ) -> Vec<String> {
        let df = Path::new(b.dockerfile);
        let df_dir = match df.parent() {
            Some(p) if !p.as_os_str().is_empty() => b.context_dir.join(p),
            _ => b.context_dir.to_path_buf(),
        };
        let file_name = df
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "Dockerfile".into());
        let mut a: Vec<String> = vec![
            "--addr".into(),
            addr.into(),
            "build".into(),
            "--progress=plain".into(),
            "--frontend".into(),
            "dockerfile.v0".into(),
            "--local".into(),
            format!("context={}", b.context_dir.display()),
            "--local".into(),
            format!("dockerfile={}", df_dir.display()),
            "--opt".into(),
            format!("filename={file_name}"),
        ];
        if let Some(t) = &b.target {
            a.extend(["--opt".into(), format!("target={t}")]);
        }
        for (k, v) in &b.build_args {
            a.extend(["--opt".into(), format!("build-arg:{k}={v}")]);
        }
        if !b.network {
            a.extend(["--opt".into(), "force-network-mode=none".into()]);
        }
        for (id, p) in secrets {
            a.extend(["--secret".into(), format!("id={id},src={}", p.display())]);
        }
        a.extend([
            "--output".into(),
            format!("type=oci,dest={},name=latest", tar.display()),
        ]);
        a
    }
}

impl DockerfileEngine for Buildkit {
    fn name(&self) -> &'static str {
        "buildkit"
    }

    fn version(&self) -> &str {
        &self.version
    }

    fn build(&self, b: &EngineBuild<'_>) -> Result<EngineOutput, EngineError> {
        const E: &str = "buildkit";
        let start = Instant::now();
        let (_, analysis) = prepare(E, b)?;
        let io = |context: &str| io_err(E, context);
        let scrub = scrubber_for(b);
        let private = PrivateDir::new(&self.secret_root).map_err(io("private dir"))?;
        let secrets = write_secrets(&private, &b.secrets).map_err(io("secrets"))?;
        let tmp = tempfile::Builder::new()
            .prefix(".buildkit-")
            .tempdir_in(b.output_dir.parent().unwrap_or(Path::new(".")))
            .map_err(io("scratch dir"))?;
        let tar = tmp.path().join("image.tar");
        let mut c = Command::new("buildctl");
        c.args(Buildkit::build_args(&self.addr, b, &secrets, &tar));
        if !b.registry_auth.is_empty() {
            private
                .write("config.json", &auth_json(&b.registry_auth))
                .map_err(io("registry credentials"))?;
            c.env("DOCKER_CONFIG", private.path());
        }
        let r = run_streaming(E, "build", c, b.log, &scrub, b.cancel, self.pids.as_ref());
        drop(private);
        check(E, "build", r?)?;
        fs::create_dir_all(b.output_dir).map_err(io("output"))?;
        let f = fs::File::open(&tar).map_err(io("oci tar"))?;
        tar::Archive::new(f)
            .unpack(b.output_dir)
            .map_err(io("unpacking the oci tar"))?;
        name_latest(b.output_dir).map_err(io("index.json"))?;
        Ok(EngineOutput {
            engine: E.into(),
            version: self.version.clone(),
            reference: format!("oci:{}:latest", b.output_dir.display()),
            layout_dir: b.output_dir.to_path_buf(),
            duration_ms: start.elapsed().as_millis() as u64,
            analysis: Some(analysis),
        })
    }
}

/// Makes sure the layout's single manifest is named `latest`.
fn name_latest(layout: &Path) -> io::Result<()> {
    let p = layout.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&fs::read(&p)?)?;
    let key = "org.opencontainers.image.ref.name";
    if let Some(ms) = index.get_mut("manifests").and_then(|m| m.as_array_mut())
        && ms.len() == 1
        && ms[0]
            .pointer(&format!("/annotations/{}", key.replace('/', "~1")))
            .and_then(|v| v.as_str())
            != Some("latest")
    {
        let ann = ms[0]
            .as_object_mut()
            .unwrap()
            .entry("annotations")
            .or_insert_with(|| serde_json::json!({}));
        if let Some(a) = ann.as_object_mut() {
            a.insert(key.into(), "latest".into());
        }
        fs::write(&p, serde_json::to_vec(&index)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buildkit_arguments() {
        let log = |_: &str| {};
        let ctx = Path::new("/ctx");
        let mut b = EngineBuild::new(ctx, Path::new("/out/layout"), &log);
        b.dockerfile = "docker/app.Dockerfile";
        b.target = Some("rt".into());
        b.build_args.insert("V".into(), "1 2".into());
        b.network = false;
        let secrets = vec![("tok".to_string(), PathBuf::from("/dev/shm/x/secret-0"))];
        let a = Buildkit::build_args(
            "unix:///run/buildkit.sock",
            &b,
            &secrets,
            Path::new("/t/image.tar"),
        );
        assert_eq!(
            a.join(" "),
            "--addr unix:///run/buildkit.sock build --progress=plain --frontend dockerfile.v0 \
             --local context=/ctx --local dockerfile=/ctx/docker --opt filename=app.Dockerfile \
             --opt target=rt --opt build-arg:V=1 2 --opt force-network-mode=none \
             --secret id=tok,src=/dev/shm/x/secret-0 --output type=oci,dest=/t/image.tar,name=latest"
        );
        b.dockerfile = "Dockerfile";
        b.network = true;
        b.target = None;
        let a = Buildkit::build_args("tcp://127.0.0.1:1234", &b, &[], Path::new("/t/i.tar"));
        assert!(a.contains(&"dockerfile=/ctx".to_string()));
        assert!(a.contains(&"filename=Dockerfile".to_string()));
        assert!(!a.iter().any(|x| x.contains("network")));
    }

    #[test]
    fn buildkit_not_available() {
        let cfg = EngineConfig {
            buildkit_addr: Some("unix:///nonexistent/buildkitd.sock".into()),
            ..EngineConfig::new("/tmp/ns-engine-test")
        };
        let e = Buildkit::probe(cfg.buildkit_addr.as_deref().unwrap(), &cfg.secret_root)
            .err()
            .unwrap();
        assert!(matches!(e, EngineError::Unavailable { .. }), "{e}");
        assert!(detect(&cfg).iter().all(|e| e.name() != "buildkit"));
    }

    #[test]
    fn buildah_arguments() {
        let log = |_: &str| {};
        let mut b = EngineBuild::new(Path::new("/ctx"), Path::new("/out"), &log);
        b.target = Some("build".into());
        b.build_args.insert("A".into(), "x".into());
        let s = vec![("tok".to_string(), PathBuf::from("/dev/shm/p/secret-0"))];
        let a = Buildah::build_args(
            &b,
            Path::new("/ctx/Dockerfile"),
            "localhost/t",
            &s,
            Some(Path::new("/dev/shm/p/auth.json")),
            true,
            true,
        );
        assert_eq!(
            a.join(" "),
            "build --isolation chroot --layers --format oci -f /ctx/Dockerfile -t localhost/t \
             --target build --build-arg A=x --secret id=tok,src=/dev/shm/p/secret-0 \
             --authfile /dev/shm/p/auth.json --tls-verify=false --pull=never /ctx"
        );
    }

    #[test]
    fn scrubbing_and_loopback() {
        let mut s = Scrubber::default();
        s.add("hunter2");
        s.add("line one\nline two\n");
        assert_eq!(s.scrub("pw=hunter2 and line two"), "pw=*** and ***");
        assert!(is_loopback_host("127.0.0.1:5000"));
        assert!(is_loopback_host("localhost"));
        assert!(is_loopback_host("[::1]:5000"));
        assert!(!is_loopback_host("registry.example.com:5000"));
        assert!(!is_loopback_host("10.0.0.1"));
        let c = RegistryCredential {
            registry: "r.io".into(),
            username: "u".into(),
            password: "p".into(),
        };
        assert!(!format!("{c:?}").contains("\"p\""));
        let j: serde_json::Value = serde_json::from_slice(&auth_json(&[c])).unwrap();
        assert_eq!(j["auths"]["r.io"]["auth"], "dTpw");
    }
}
