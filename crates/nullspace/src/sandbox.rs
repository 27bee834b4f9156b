//! `nullspace sandbox`: sandboxes restored from template snapshots on this
//! machine, working on the server's data directory. Each sandbox is a
//! detached QEMU with a qcow2 overlay over the snapshot disk, recorded in
//! `DATA_DIR/sandboxes/<id>/state.json` next to its overlay and sockets.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use nullspace_vm::agent::Stream;
use nullspace_vm::sandbox::{SandboxHandle, restore_detached, socket_path_fits};
use nullspace_vm::{ExecRequest, RestoreSpec, Snapshot};
use serde::{Deserialize, Serialize};

#[derive(Args)]
pub struct DataDir {
    /// The server's data directory (templates, snapshots, sandboxes).
    #[arg(long, env = "NULLSPACE_DATA_DIR", default_value = "nullspace-data")]
    data_dir: PathBuf,
}

impl DataDir {
    fn sandboxes(&self) -> Result<PathBuf> {
        let data = std::fs::canonicalize(&self.data_dir)
            .with_context(|| format!("data directory {}", self.data_dir.display()))?;
        Ok(data.join("sandboxes"))
    }
}

#[derive(Subcommand)]
pub enum SandboxCommand {
    /// Restore a template's snapshot as a new sandbox (a copy-on-write disk
    /// each); prints the sandbox id. The start command keeps running.
    Create {
        /// `name`, `name:tag`, `namespace/name[:tag]`, `name:tb_…` or `tmpl_…`.
        template: String,
        #[command(flatten)]
        data: DataDir,
        /// A Postgres URL when the server keeps its state there.
        #[arg(long, env = "NULLSPACE_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        /// The namespace names are resolved in.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Seconds to wait for the restored guest's agent.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Print the sandbox record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a sandbox; streams its output and exits with its
    /// exit code. A single argument with spaces runs under `sh -c`.
    Exec {
        id: String,
        #[command(flatten)]
        data: DataDir,
        /// KEY=VALUE added to the environment (repeatable).
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Working directory in the guest.
        #[arg(long)]
        cwd: Option<String>,
        /// User in the guest (default: the template's).
        #[arg(long)]
        user: Option<String>,
        /// Kill the command after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// Pass this process's standard input to the command (read to the end first).
        #[arg(long)]
        stdin: bool,
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// List sandboxes with their QEMU state.
    List {
        #[command(flatten)]
        data: DataDir,
        #[arg(long)]
        json: bool,
        /// Remove the records of sandboxes whose QEMU is gone.
        #[arg(long)]
        prune: bool,
    },
    /// Stop a sandbox's VM and delete its disk overlay and sockets.
    Kill {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        data: DataDir,
    },
}

/// `DATA_DIR/sandboxes/<id>/state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxState {
    pub id: String,
    /// The ref as given to `create`.
    pub template: String,
    pub template_id: String,
    pub canonical_ref: String,
    pub build_id: String,
    pub namespace: String,
    pub snapshot: PathBuf,
    #[serde(flatten)]
    pub vm: SandboxHandle,
    pub created_at: String,
    /// QEMU start to the restored guest agent's first answer.
    pub restore_ms: u64,
}

const STATE: &str = "state.json";

pub fn run(c: SandboxCommand) -> Result<()> {
    match c {
        SandboxCommand::Create {
            template,
            data,
            database_url,
            namespace,
            timeout,
            json,
        } => create(&template, &data, database_url, &namespace, timeout, json),
        SandboxCommand::Exec {
            id,
            data,
            env,
            cwd,
            user,
            timeout,
            stdin,
            cmd,
        } => {
            let mut req = ExecRequest {
                cwd,
                user,
                timeout: timeout.map(Duration::from_secs),
                ..Default::default()
            };
            if cmd.len() == 1 && cmd[0].contains(char::is_whitespace) {
                req.cmd = Some(cmd[0].clone());
            } else {
                req.argv = cmd;
            }
            for kv in env {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("--env {kv:?}: expected KEY=VALUE"))?;
                req.env.insert(k.to_string(), v.to_string());
            }
            if stdin {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)?;
                req.stdin = Some(b);
            }
            let code = exec(&id, &data, &req)?;
            std::process::exit(code)
        }
        SandboxCommand::List { data, json, prune } => list(&data, json, prune),
        SandboxCommand::Kill { ids, data } => {
            for id in ids {
                kill(&id, &data)?;
            }
            Ok(())
        }
    }
}

fn new_id() -> Result<String> {
    let mut b = [0u8; 6];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)?;
    Ok(format!(
        "sbx_{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    ))
}

/// The ready build `raw` names and its snapshot directory. Opens the store
/// read-only in spirit: no recovery of running builds (the server may be up).
fn resolve(
    data_dir: &Path,
    database_url: Option<String>,
    namespace: &str,
    raw: &str,
) -> Result<(nullspace_server::model::BuildRecord, PathBuf)> {
    let mut config = nullspace_server::Config::new(data_dir.to_path_buf());
    config.database_url = database_url;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let rec = rt.block_on(async {
        let url = config.database_url.clone().unwrap_or_else(|| {
            format!("sqlite:{}", config.data_dir.join("nullspace.db").display())
        });
        let store = nullspace_store::Store::open(&url)
            .await
            .context("opening the data directory's database")?;
        let artifacts = nullspace_store::artifacts::Artifacts::open(&data_dir.join("artifacts"))?;
        let state = Arc::new(nullspace_server::AppState::offline(
            config, store, artifacts,
        ));
        let caller = nullspace_store::Caller {
            key_id: String::new(),
            namespace: namespace.to_string(),
        };
        let (_, rec) = nullspace_server::templates::resolve_build(&state, &caller, raw)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        anyhow::Ok(rec)
    })?;
    if rec.status != nullspace_model::build::status::BuildStatus::Ready {
        bail!(
            "template {raw}: build {} is {}, not ready",
            rec.build_id,
            rec.status
        );
    }
    let hex = rec
        .artifact_ids
        .first()
        .and_then(|a| a.strip_prefix("sha256:"))
        .with_context(|| format!("build {} has no artifact", rec.build_id))?;
    let path = data_dir.join("artifacts/sha256").join(hex);
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("artifact manifest {}", path.display()))?,
    )
    .with_context(|| format!("artifact manifest {}", path.display()))?;
    let Some(snap) = manifest.get("snapshot").and_then(|s| s.as_str()) else {
        bail!(
            "template {raw} (build {}) has no snapshot: build the template with `nullspace serve --build-vm`",
            rec.build_id
        );
    };
    // Relative to the artifact store (absolute in records of older versions).
    Ok((rec, data_dir.join("artifacts").join(snap)))
}

fn create(
    raw: &str,
    data: &DataDir,
    database_url: Option<String>,
    namespace: &str,
    timeout: u64,
    json: bool,
) -> Result<()> {
    let root = data.sandboxes()?;
    let data_dir = root.parent().expect("sandboxes has a parent").to_path_buf();
    let (rec, snap_dir) = resolve(&data_dir, database_url, namespace, raw)?;
    // The error names the snapshot directory and the rule it broke.
    let snapshot = Snapshot::open(&snap_dir)
        .with_context(|| format!("template {raw} (build {})", rec.build_id))?;
    std::fs::create_dir_all(&root).with_context(|| root.display().to_string())?;
    let id = new_id()?;
    let dir = root.join(&id);
    // QEMU's sockets live in dir/ns-sbx-XXXXXX/.
    if !socket_path_fits(&dir.join("ns-sbx-XXXXXX/agent.sock")) {
        bail!(
            "the data directory's path is too long for the sandbox's Unix sockets ({}); use a shorter --data-dir",
            dir.display()
        );
    }
    std::fs::create_dir(&dir).with_context(|| dir.display().to_string())?;
    let t0 = Instant::now();
    let restored = restore_detached(
        &snapshot,
        &RestoreSpec {
            work_dir: Some(dir.clone()),
            timeout: Duration::from_secs(timeout),
        },
        &nullspace_vm::CancellationToken::new(),
    );
    let (vm, restore_ms) = match restored {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(anyhow::anyhow!("restoring template {raw}: {e}"));
        }
    };
    let state = SandboxState {
        id: id.clone(),
        template: raw.to_string(),
        template_id: rec.template_id.clone(),
        canonical_ref: rec.canonical_ref.clone(),
        build_id: rec.build_id.clone(),
        namespace: namespace.to_string(),
        snapshot: snap_dir,
        vm,
        created_at: nullspace_server::model::iso(nullspace_store::now_ms()),
        restore_ms: restore_ms as u64,
    };
    let written = serde_json::to_vec_pretty(&state)
        .map_err(anyhow::Error::from)
        .and_then(|b| {
            let tmp = dir.join("state.json.tmp");
            std::fs::write(&tmp, b)?;
            std::fs::rename(&tmp, dir.join(STATE))?;
            Ok(())
        });
    if let Err(e) = written {
        let _ = state.vm.kill(Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e.context("recording the sandbox"));
    }
    eprintln!(
        "restored {id} from {} (build {}) in {} ms",
        rec.canonical_ref,
        rec.build_id,
        t0.elapsed().as_millis()
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&state)?);
    } else {
        println!("{id}");
    }
    Ok(())
}

fn load(id: &str, data: &DataDir) -> Result<(PathBuf, SandboxState)> {
    let valid = id.starts_with("sbx_")
        && id.len() > 4
        && id[4..].chars().all(|c| c.is_ascii_alphanumeric());
    let root = data.sandboxes()?;
    let dir = root.join(id);
    let path = dir.join(STATE);
    if !valid || !path.is_file() {
        bail!("no sandbox {id} in {}", root.display());
    }
    let s: SandboxState = serde_json::from_slice(&std::fs::read(&path)?)
        .with_context(|| format!("sandbox {id}: {}", path.display()))?;
    Ok((dir, s))
}

fn exec(id: &str, data: &DataDir, req: &ExecRequest) -> Result<i32> {
    let (dir, s) = load(id, data)?;
    if !s.vm.alive() {
        bail!(
            "sandbox {id} is not running (QEMU pid {} is gone); `nullspace sandbox kill {id}` removes it",
            s.vm.pid
        );
    }
    // The guest agent serves one host connection at a time: queue behind
    // other `exec`s of this sandbox instead of timing out.
    let lock = std::fs::File::create(dir.join("exec.lock"))?;
    lock.lock()?;
    let agent =
        s.vm.agent(Duration::from_secs(30))
            .with_context(|| format!("sandbox {id}: guest agent"))?;
    let limit = req
        .timeout
        .map(|t| t + Duration::from_secs(30))
        .unwrap_or(Duration::from_secs(365 * 24 * 3600));
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let r = agent
        .exec_streaming(req, limit, &mut |stream, data| {
            let _ = match stream {
                Stream::Stdout => out.write_all(data).and_then(|_| out.flush()),
                Stream::Stderr => err.write_all(data).and_then(|_| err.flush()),
            };
        })
        .with_context(|| format!("sandbox {id}: exec"))?;
    if r.timed_out {
        eprintln!("sandbox {id}: the command was killed after its --timeout");
        return Ok(124);
    }
    Ok(match (r.code, r.signal) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    })
}

struct Entry {
    id: String,
    dir: PathBuf,
    state: Option<SandboxState>,
    alive: bool,
}

fn entries(data: &DataDir) -> Result<Vec<Entry>> {
    let root = data.sandboxes()?;
    let mut out = vec![];
    let rd = match std::fs::read_dir(&root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).context(root.display().to_string()),
    };
    for e in rd {
        let e = e?;
        let id = e.file_name().to_string_lossy().to_string();
        if !id.starts_with("sbx_") || !e.path().is_dir() {
            continue;
        }
        let state: Option<SandboxState> = std::fs::read(e.path().join(STATE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let alive = state.as_ref().is_some_and(|s| s.vm.alive());
        out.push(Entry {
            id,
            dir: e.path(),
            state,
            alive,
        });
    }
    out.sort_by(|a, b| {
        let ca = a.state.as_ref().map(|s| s.created_at.clone());
        let cb = b.state.as_ref().map(|s| s.created_at.clone());
        ca.cmp(&cb).then(a.id.cmp(&b.id))
    });
    Ok(out)
}

fn list(data: &DataDir, json: bool, prune: bool) -> Result<()> {
    let mut all = entries(data)?;
    if prune {
        all.retain(|e| {
            // A directory without a record is a `create` in progress unless
            // it is older than any restore takes.
            let stale = e.state.is_some()
                || std::fs::metadata(&e.dir)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(600));
            if !e.alive && stale {
                match std::fs::remove_dir_all(&e.dir) {
                    Ok(()) => eprintln!("pruned {}", e.id),
                    Err(err) => eprintln!("pruning {}: {err}", e.id),
                }
                return false;
            }
            true
        });
    }
    if json {
        let v: Vec<serde_json::Value> = all
            .iter()
            .map(|e| {
                let mut v = e
                    .state
                    .as_ref()
                    .and_then(|s| serde_json::to_value(s).ok())
                    .unwrap_or_else(|| serde_json::json!({"id": e.id}));
                v["status"] = serde_json::json!(status(e));
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<24} {:<8} {:<8} CREATED",
        "ID", "TEMPLATE", "PID", "STATUS"
    );
    for e in &all {
        let (tmpl, pid, created) = match &e.state {
            Some(s) => (
                s.canonical_ref.clone(),
                s.vm.pid.to_string(),
                s.created_at.clone(),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<16} {:<24} {:<8} {:<8} {created}",
            e.id,
            tmpl,
            pid,
            status(e)
        );
    }
    Ok(())
}

fn status(e: &Entry) -> &'static str {
    match (&e.state, e.alive) {
        (None, _) => "creating",
        (Some(_), true) => "running",
        (Some(_), false) => "dead",
    }
}

fn kill(id: &str, data: &DataDir) -> Result<()> {
    let (dir, s) = load(id, data)?;
    let was_alive = s.vm.alive();
    s.vm.kill(Duration::from_secs(5))
        .with_context(|| format!("sandbox {id}"))?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    if was_alive {
        eprintln!("killed {id}");
    } else {
        eprintln!("removed {id} (its VM was not running)");
    }
    Ok(())
}
