//! The `native` build backend's lowering of a plan to the build VM's steps
//! ([`nullspace_vm::template::Step`], run by
//! [`nullspace_vm::template::build_snapshot_with_steps`]).
//!
//! This is a thin mapping, no parsing or validation: every rule was checked
//! by the plan (`nullspace_model::build::plan`), and every shell line comes
//! from [`Step::shell_command`], which the Dockerfile renderer uses too. It
//! exists while `nullspace-vm` keeps its own step type (its executor is
//! being reworked in parallel); what it adds is execution detail the plan
//! does not hold: context refs resolved to host paths under the directory
//! the uploaded context was materialized into, `copy_items` split into one
//! copy per item, and the build/runtime envs and runtime workdir/user as
//! steps of their own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nullspace_model::build::plan::BuildPlan;
use nullspace_model::build::probe::{Probe, Readiness};
use nullspace_model::build::step::{CopyItem, Step};
use nullspace_vm::template::Step as VmStep;

/// Steps for the VM plus, per VM step, the index of the plan step it came
/// from (`None` for the env/workdir/user steps [`plan`] adds), so a failing
/// VM step maps back to the SDK's 1-based `step_index`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativePlan {
    pub steps: Vec<VmStep>,
    pub origin: Vec<Option<usize>>,
}

impl NativePlan {
    /// The 1-based plan step number of VM step `i` (see [`NativePlan::origin`]).
    pub fn step_number(&self, i: usize) -> Option<i64> {
        self.origin.get(i).copied().flatten().map(|x| x as i64 + 1)
    }

    fn push(&mut self, step: VmStep, origin: Option<usize>) {
        self.steps.push(step);
        self.origin.push(origin);
    }
}

/// The whole native run of a declarative plan: build envs first (seen by
/// every step, never persisted), then the plan's steps, then the runtime
/// settings (runtime envs, and the default workdir/user when set, which
/// the SDK also sends as `workdir`/`user` steps; repeating them is harmless
/// and covers requests that only set `runtime_config`). Fails when a copy
/// source is not in the materialized context.
pub fn plan(p: &BuildPlan, context_root: &Path) -> Result<NativePlan, String> {
    let mut out = NativePlan {
        steps: vec![],
        origin: vec![],
    };
    if !p.build_envs.0.is_empty() {
        out.push(
            VmStep::BuildEnv {
                envs: p.build_envs.0.clone(),
            },
            None,
        );
    }
    for (index, step) in p.steps.iter().enumerate() {
        let vm = match step {
            Step::Run { command, user } => VmStep::Run {
                command: command.clone(),
                user: user.clone(),
            },
            Step::SkipCache => VmStep::SkipCache,
            Step::Copy(_) | Step::CopyItems { .. } => {
                for item in step.copies() {
                    out.push(copy(item, context_root)?, Some(index));
                }
                continue;
            }
            Step::Workdir { path } => VmStep::Workdir { path: path.clone() },
            Step::User { user } => VmStep::User { user: user.clone() },
            Step::Remove {
                path,
                recursive,
                force,
            } => VmStep::Remove {
                path: path.clone(),
                recursive: *recursive,
                force: *force,
            },
            Step::Rename { src, dst, force } => VmStep::Rename {
                src: src.clone(),
                dst: dst.clone(),
                force: *force,
            },
            Step::MakeDir { path, mode } => VmStep::MakeDir {
                path: path.clone(),
                mode: mode.map(|m| m.bits()),
            },
            Step::MakeSymlink { target, path } => VmStep::MakeSymlink {
                target: target.clone(),
                path: path.clone(),
            },
            other => VmStep::Shell {
                action: other.action().to_string(),
                command: other.shell_command().unwrap_or_default(),
            },
        };
        out.push(vm, Some(index));
    }
    let r = &p.runtime;
    if !r.env.0.is_empty() {
        out.push(
            VmStep::Env {
                envs: r.env.0.clone(),
            },
            None,
        );
    }
    if let Some(w) = &r.workdir {
        out.push(VmStep::Workdir { path: w.clone() }, None);
    }
    if let Some(u) = &r.user {
        out.push(VmStep::User { user: u.clone() }, None);
    }
    Ok(out)
}

/// A copy with its sources resolved under `context_root` (checked paths:
/// relative, no `..`); each must exist there as a file or a directory.
fn copy(item: &CopyItem, context_root: &Path) -> Result<VmStep, String> {
    let mut sources = vec![];
    for src in &item.sources {
        sources.push(resolve(context_root, src)?);
    }
    Ok(VmStep::Copy {
        sources,
        dst: item.dst.clone(),
        user: item.user.clone(),
        mode: item.mode.map(|m| m.bits()),
    })
}

fn resolve(context_root: &Path, r: &str) -> Result<(PathBuf, bool), String> {
    let host = context_root.join(r);
    let md = std::fs::symlink_metadata(&host).map_err(|e| {
        format!("source {r:?} is not in the uploaded build context ({e}); upload it with the build")
    })?;
    if md.is_dir() {
        Ok((host, true))
    } else if md.is_file() {
        Ok((host, false))
    } else {
        Err(format!("source {r:?} is not a regular file or directory"))
    }
}

/// The plan's readiness as the VM's waiter takes it (its own type until
/// `nullspace-vm` reads the model's).
pub fn vm_readiness(r: &Readiness) -> nullspace_vm::Readiness {
    let probe = match &r.probe {
        Probe::Tcp { port } => nullspace_vm::Probe::Tcp { port: *port },
        Probe::Http { port, path } => nullspace_vm::Probe::Http {
            port: *port,
            path: path.clone(),
        },
        Probe::Command { command } => nullspace_vm::Probe::Command {
            cmd: command.clone(),
        },
        Probe::Timeout { timeout_ms } => nullspace_vm::Probe::Timeout {
            timeout_ms: *timeout_ms,
        },
    };
    nullspace_vm::Readiness {
        probe,
        timeout: Duration::from_secs(r.timeout_secs),
        interval: Duration::from_millis(r.interval_ms),
        startup_grace: Duration::from_secs(r.startup_grace_secs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nullspace_model::build::plan::{PlanContext, plan as build_plan};
    use nullspace_model::build::request::BuildRequest;
    use serde_json::{Value, json};

    fn ctx() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let app = d.path().join("builder-context/step-0/src-0/app");
        std::fs::create_dir_all(app.join("sub")).unwrap();
        std::fs::write(app.join("sub/a.txt"), "a").unwrap();
        let f = d.path().join("builder-context/step-1/src-0");
        std::fs::create_dir_all(&f).unwrap();
        std::fs::write(f.join("config.toml"), "x=1").unwrap();
        d
    }

    fn lower(v: Value, dir: &Path) -> Result<NativePlan, String> {
        let req: BuildRequest = serde_json::from_value(v).unwrap();
        let p = build_plan(&req, &PlanContext::default()).unwrap();
        plan(&p, dir)
    }

    #[test]
    fn shell_steps_use_the_model_shell_text() {
        let d = ctx();
        let p = lower(
            json!({"base_image":"x","steps":[{"action":"apt_install","packages":["curl","git"]},
                {"action":"git_clone","url":"https://h/x.git","path":"/src/hello","branch":"master","depth":1}]}),
            d.path(),
        )
        .unwrap();
        assert_eq!(
            p.steps,
            vec![
                VmStep::Shell {
                    action: "apt_install".into(),
                    command:
                        "apt-get update && apt-get install -y curl git && rm -rf /var/lib/apt/lists/*"
                            .into()
                },
                VmStep::Shell {
                    action: "git_clone".into(),
                    command: "git clone --branch master --depth 1 -- https://h/x.git /src/hello"
                        .into()
                }
            ]
        );
    }

    #[test]
    fn copies_resolve_and_keep_their_step_number() {
        let d = ctx();
        let p = lower(
            json!({"base_image":"x","build_envs":{"B":"1"},"steps":[
                {"action":"run","command":"true"},
                {"action":"copy_items","items":[
                    {"sources":["builder-context/step-1/src-0/config.toml"],"dst":"/etc/x.toml"},
                    {"sources":["builder-context/step-0/src-0/app/sub"],"dst":"/opt/sub","mode":"0644"}]}],
                "runtime_config":{"default_user":"app","default_workdir":"/w","default_envs":{"R":"2"}}}),
            d.path(),
        )
        .unwrap();
        assert_eq!(
            p.origin,
            vec![None, Some(0), Some(1), Some(1), None, None, None]
        );
        assert_eq!(p.step_number(0), None);
        assert_eq!(p.step_number(1), Some(1));
        assert_eq!(p.step_number(3), Some(2));
        assert!(
            matches!(&p.steps[3], VmStep::Copy { mode: Some(0o644), sources, .. } if sources[0].1)
        );
        assert_eq!(p.steps[6], VmStep::User { user: "app".into() });
        let e = lower(
            json!({"base_image":"x","steps":[{"action":"copy","sources":["builder-context/missing"],"dst":"/x"}]}),
            d.path(),
        )
        .unwrap_err();
        assert!(e.contains("not in the uploaded build context"), "{e}");
    }

    #[test]
    fn readiness_maps_with_the_model_defaults() {
        let r = vm_readiness(&Readiness::tcp(8080));
        assert_eq!(r.probe, nullspace_vm::Probe::Tcp { port: 8080 });
        assert_eq!(
            (r.timeout, r.interval, r.startup_grace),
            (
                Duration::from_secs(30),
                Duration::from_millis(500),
                Duration::from_secs(2)
            )
        );
    }
}
