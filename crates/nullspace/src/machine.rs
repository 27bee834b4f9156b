//! `nullspace machine …` (alias `sandbox`): a client of the machine API
//! (`/v1/machines`), like `nullspace template`: it reads
//! `NULLSPACE_API_URL` and `NULLSPACE_API_KEY`, and the server does the
//! work (machines restored from template snapshots, owned by the key's
//! namespace, run as detached VMs on the server).

use std::collections::BTreeMap;
use std::io::{Read, Write};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::Subcommand;
use nullspace_model::machine::{
    CreateMachineBody, Destroyed, ExecBody, ExecReply, FileInfo, MachineInfo, MachinePage,
    MachineSnapshotInfo, TimeoutAction, TimeoutBody, TimeoutLease, WriteFileBody,
};
use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::template::{Api, enc, print_json, push_q, read_json, to_body, with_query};

#[derive(Subcommand)]
pub enum MachineCommand {
    /// Create a machine from a template's snapshot (default: `base`);
    /// prints its id once it runs commands. The start command is already
    /// running: it was restored, not started again.
    Create {
        /// `name`, `name:tag`, `namespace/name[:tag]`, `name:tb_…` or `tmpl_…`.
        template: Option<String>,
        /// KEY=VALUE for the machine's commands (repeatable; never the start command).
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Default working directory of commands.
        #[arg(long)]
        cwd: Option<String>,
        /// Seconds until the server applies the timeout action.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[arg(long, value_enum)]
        timeout_action: Option<TimeoutAction>,
        /// Repeating a create with the same key returns the same machine.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Restore this machine snapshot instead of a template.
        #[arg(long, conflicts_with = "template")]
        snapshot: Option<String>,
        /// Print the machine record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a machine, print its output and exit with its exit
    /// code. A single argument with spaces is a shell line (`sh -c`);
    /// several arguments run as a program and its arguments.
    Exec {
        id: String,
        /// KEY=VALUE added to the environment (repeatable).
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
        env: Vec<String>,
        #[arg(long)]
        cwd: Option<String>,
        /// As this user in the guest (default: the template's).
        #[arg(long)]
        user: Option<String>,
        /// Kill the command after this many seconds (0: no limit).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Start it in the background and print its pid.
        #[arg(long)]
        background: bool,
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// An interactive terminal in a running machine, in this terminal
    /// (raw mode, resized with the window); exits with the terminal's exit
    /// code. Standard input may be a pipe: its end is sent as Ctrl-D.
    Shell {
        id: String,
        /// Start in this directory.
        #[arg(long)]
        cwd: Option<String>,
        /// As this user in the guest (default: the template's).
        #[arg(long)]
        user: Option<String>,
        /// Run this shell line instead of the user's login shell.
        #[arg(long)]
        cmd: Option<String>,
        /// KEY=VALUE added to the environment (repeatable); `TERM` is this
        /// terminal's unless given.
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
        env: Vec<String>,
    },
    /// Read, write or list files in a machine.
    #[command(subcommand)]
    Files(FilesCommand),
    /// List machines (running and paused, unless --state says otherwise).
    List {
        /// Comma-separated statuses: creating, running, paused, destroyed, error.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show one machine.
    Get {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Destroy machines.
    #[command(alias = "delete")]
    Kill {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// A new machine from a snapshot of a running one (copy-on-write disk);
    /// prints the new id.
    Fork {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Pause (hibernate): memory and disk into a snapshot, the VM stops.
    #[command(alias = "hibernate")]
    Pause {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Resume a paused machine (same id).
    Resume {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Snapshot a running machine (it goes on); prints the snapshot id.
    Snapshot {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Set a machine's timeout, counted from now.
    Timeout {
        id: String,
        seconds: u64,
        #[arg(long, value_enum)]
        action: Option<TimeoutAction>,
    },
}

#[derive(Subcommand)]
pub enum FilesCommand {
    /// Write a file: from --from FILE, else this process's standard input.
    Write {
        id: String,
        path: String,
        #[arg(long)]
        from: Option<std::path::PathBuf>,
    },
    /// Print a file's bytes.
    Read { id: String, path: String },
    /// List a directory.
    List {
        id: String,
        #[arg(default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 1)]
        depth: u32,
        #[arg(long)]
        json: bool,
    },
}

fn key_values(list: &[String]) -> Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    for kv in list {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--env {kv:?} must be KEY=VALUE");
        };
        m.insert(k.to_string(), v.to_string());
    }
    Ok(m)
}

fn path(id: &str, rest: &str) -> String {
    format!("/v1/machines/{}{rest}", enc(id))
}

/// Lifecycle calls (create, exec, pause, fork) may take minutes: the
/// stream timeout (300 s) applies, as the SDK's lifecycle calls allow.
fn long<R: DeserializeOwned>(
    api: &Api,
    method: Method,
    p: &str,
    body: Option<&serde_json::Value>,
) -> Result<R> {
    read_json(p, api.send(method, p, body, true)?)
}

fn line(m: &MachineInfo) -> String {
    format!("{}\t{}\t{}\t{}", m.id, m.status, m.template, m.created_at)
}

fn show_id(id: &str, v: &impl Serialize, json_out: bool) -> Result<()> {
    if json_out {
        print_json(v)
    } else {
        writeln!(std::io::stdout().lock(), "{id}").context("writing to stdout")
    }
}

fn show(m: &MachineInfo, json_out: bool) -> Result<()> {
    show_id(&m.id, m, json_out)
}

pub fn run(c: MachineCommand) -> Result<()> {
    let api = Api::from_env()?;
    match c {
        MachineCommand::Create {
            template,
            env,
            cwd,
            timeout,
            timeout_action,
            idempotency_key,
            snapshot,
            json,
        } => {
            let (template, snapshot_id) = match snapshot {
                Some(s) => (None, Some(s)),
                None => (Some(template.unwrap_or_else(|| "base".into())), None),
            };
            let req = CreateMachineBody {
                template,
                snapshot_id,
                timeout_ms: Some(timeout * 1000),
                timeout_action: timeout_action.map(|a| a.as_str().to_string()),
                envs: Some(key_values(&env)?),
                cwd,
                ..Default::default()
            };
            // The server de-duplicates on the key: a retried create is safe.
            let key = idempotency_key.unwrap_or_else(|| nullspace_store::new_id("cli_"));
            let resp = api.send_headers(
                Method::POST,
                "/v1/machines",
                Some(&to_body(&req)?),
                true,
                &[("Idempotency-Key", key)],
            )?;
            let m: MachineInfo = read_json("/v1/machines", resp)?;
            show(&m, json)
        }
        MachineCommand::Exec {
            id,
            env,
            cwd,
            user,
            timeout,
            background,
            cmd,
        } => {
            let (command, args) = match &cmd[..] {
                [one] => (one.clone(), vec![]),
                [first, rest @ ..] => (first.clone(), rest.to_vec()),
                [] => bail!("a command is required after --"),
            };
            let req = ExecBody {
                command,
                args,
                timeout_secs: Some(timeout),
                background: Some(background),
                envs: Some(key_values(&env)?),
                cwd,
                user,
                shell: None,
            };
            let r = match long(
                &api,
                Method::POST,
                &path(&id, "/exec"),
                Some(&to_body(&req)?),
            )? {
                ExecReply::Background(s) if background => {
                    println!("{}", s.pid);
                    return Ok(());
                }
                ExecReply::Finished(r) if !background => r,
                _ => bail!("the server answered exec in the other mode (background {background})"),
            };
            std::io::stdout().write_all(r.stdout.as_bytes())?;
            std::io::stderr().write_all(r.stderr.as_bytes())?;
            std::io::stdout().flush()?;
            if r.exit_code != 0 {
                std::process::exit(r.exit_code.clamp(1, 255));
            }
            Ok(())
        }
        MachineCommand::Shell {
            id,
            cwd,
            user,
            cmd,
            env,
        } => {
            let o = crate::shell::Options {
                cwd,
                user,
                cmd,
                env: key_values(&env)?,
            };
            // The terminal is restored when `run` returns, before exiting.
            let code = crate::shell::run(&api, &id, o)?;
            if code != 0 {
                std::process::exit(code.clamp(1, 255));
            }
            Ok(())
        }
        MachineCommand::Files(f) => files(&api, f),
        MachineCommand::List { state, json } => {
            let mut q = vec![];
            push_q(&mut q, "state", state);
            let mut all = vec![];
            let mut token: Option<String> = None;
            loop {
                let mut q = q.clone();
                push_q(&mut q, "next_token", token.clone());
                let p = with_query("/v1/machines", &q);
                let page: MachinePage = api.send_json(Method::GET, &p, None)?;
                all.extend(page.items);
                token = page.next_token;
                if token.is_none() || !page.has_next {
                    break;
                }
            }
            if json {
                return print_json(&all);
            }
            let mut out = std::io::stdout().lock();
            for m in &all {
                writeln!(out, "{}", line(m)).context("writing to stdout")?;
            }
            Ok(())
        }
        MachineCommand::Get { id, json } => {
            let m: MachineInfo = api.send_json(Method::GET, &path(&id, ""), None)?;
            if json {
                print_json(&m)
            } else {
                println!("{}", line(&m));
                Ok(())
            }
        }
        MachineCommand::Kill { ids } => {
            for id in ids {
                let _: Destroyed = api.send_json(Method::DELETE, &path(&id, ""), None)?;
                eprintln!("destroyed {id}");
            }
            Ok(())
        }
        MachineCommand::Fork { id, json } => {
            let m: MachineInfo = long(&api, Method::POST, &path(&id, "/fork"), None)?;
            show(&m, json)
        }
        MachineCommand::Pause { id, json } => {
            let s: MachineSnapshotInfo = long(&api, Method::POST, &path(&id, "/hibernate"), None)?;
            if json {
                print_json(&s)
            } else {
                println!("paused {id} (snapshot {})", s.id);
                Ok(())
            }
        }
        MachineCommand::Resume { id, json } => {
            let m: MachineInfo = long(&api, Method::POST, &path(&id, "/resume"), None)?;
            show(&m, json)
        }
        MachineCommand::Snapshot { id, json } => {
            let s: MachineSnapshotInfo = long(&api, Method::POST, &path(&id, "/snapshots"), None)?;
            show_id(&s.id, &s, json)
        }
        MachineCommand::Timeout {
            id,
            seconds,
            action,
        } => {
            let req = TimeoutBody {
                timeout_ms: seconds * 1000,
                timeout_action: action.map(|a| a.as_str().to_string()),
            };
            let p = path(&id, "/timeout");
            let lease: TimeoutLease = api.send_json(Method::POST, &p, Some(&to_body(&req)?))?;
            print_json(&lease)
        }
    }
}

fn files(api: &Api, f: FilesCommand) -> Result<()> {
    match f {
        FilesCommand::Write { id, path: p, from } => {
            let mut data = vec![];
            match from {
                Some(file) => {
                    data = std::fs::read(&file).with_context(|| file.display().to_string())?
                }
                None => {
                    std::io::stdin()
                        .read_to_end(&mut data)
                        .context("reading standard input")?;
                }
            }
            let req = WriteFileBody {
                path: p,
                content: base64::engine::general_purpose::STANDARD.encode(&data),
                encoding: Some("base64".into()),
                user: None,
            };
            let info: FileInfo = long(
                api,
                Method::POST,
                &path(&id, "/files/write"),
                Some(&to_body(&req)?),
            )?;
            eprintln!("wrote {} ({} bytes)", info.path, data.len());
            Ok(())
        }
        FilesCommand::Read { id, path: p } => {
            let q = with_query(&path(&id, "/file"), &[("path", p)]);
            let bytes = api
                .send(Method::GET, &q, None, true)?
                .bytes()
                .context("reading the file")?;
            std::io::stdout()
                .write_all(&bytes)
                .context("writing to stdout")
        }
        FilesCommand::List {
            id,
            path: p,
            depth,
            json,
        } => {
            let q = with_query(
                &path(&id, "/files"),
                &[("path", p), ("depth", depth.to_string())],
            );
            let list: Vec<FileInfo> = api.send_json(Method::GET, &q, None)?;
            if json {
                return print_json(&list);
            }
            let mut out = std::io::stdout().lock();
            for e in &list {
                let kind = e
                    .r#type
                    .as_deref()
                    .unwrap_or(if e.is_dir { "dir" } else { "file" });
                writeln!(out, "{}\t{}\t{}", kind, e.size, e.path).context("writing to stdout")?;
            }
            Ok(())
        }
    }
}
