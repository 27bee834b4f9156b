//! The `native` build backend's plan: the SDK's declarative steps (contract
//! §3.3, the JSON objects exactly as sent) mapped to
//! [`nullspace_vm::template::Step`]s that
//! [`nullspace_vm::template::build_snapshot_with_steps`] runs in the build VM.
//!
//! Shell-rendered actions (`apt_install`, `pip_install`, `npm_install`,
//! `bun_install`, `git_clone`) use the Dockerfile renderer's shell text
//! ([`nullspace_build::render::step_shell`]), so both backends run the same
//! command; `remove`, `rename`, `make_dir` and `make_symlink` are validated
//! by the renderer too and run as argv (no shell quoting involved).
//!
//! Context refs (`builder-context/step-N/src-M/...`) resolve under the
//! directory the server materialized the uploaded context into
//! (`nullspace_build::context::materialize`), so a ref `r` is the host path
//! `context_root/r`.

use crate::model::RuntimeConfig;
use nullspace_build::render::step_shell;
use nullspace_vm::template::Step;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// Steps for the VM plus, per VM step, the index of the request step it
/// came from (`None` for the build/runtime env steps [`plan`] adds), so a
/// failing VM step maps back to the SDK's `step_index`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativePlan {
    pub steps: Vec<Step>,
    pub origin: Vec<Option<usize>>,
}

impl NativePlan {
    /// The request's step index for VM step `i` (see [`NativePlan::origin`]).
    pub fn request_index(&self, i: usize) -> Option<usize> {
        self.origin.get(i).copied().flatten()
    }
}

/// The whole native plan of a declarative build: build envs first (seen by
/// every step, never persisted), then the request's steps, then the
/// `runtime_config` defaults (runtime envs, and `default_workdir` /
/// `default_user` when set, which the SDK also sends as `workdir`/`user`
/// steps; repeating them is harmless and covers requests that only set
/// `runtime_config`).
pub fn plan(
    build_envs: Option<&BTreeMap<String, String>>,
    steps: &[Value],
    runtime: Option<&RuntimeConfig>,
    context_root: &Path,
) -> Result<NativePlan, String> {
    let mut out = NativePlan {
        steps: vec![],
        origin: vec![],
    };
    if let Some(b) = build_envs.filter(|b| !b.is_empty()) {
        check_envs("build", b)?;
        out.steps.push(Step::BuildEnv { envs: b.clone() });
        out.origin.push(None);
    }
    let main = steps_from_request_indexed(steps, context_root)?;
    for (i, s) in main {
        out.steps.push(s);
        out.origin.push(Some(i));
    }
    if let Some(r) = runtime {
        if let Some(e) = r.default_envs.as_ref().filter(|e| !e.is_empty()) {
            check_envs("runtime", e)?;
            out.steps.push(Step::Env { envs: e.clone() });
            out.origin.push(None);
        }
        if let Some(w) = r
            .default_workdir
            .as_deref()
            .filter(|w| !w.trim().is_empty())
        {
            out.steps.push(Step::Workdir {
                path: w.trim().to_string(),
            });
            out.origin.push(None);
        }
        if let Some(u) = r.default_user.as_deref().filter(|u| !u.trim().is_empty()) {
            out.steps.push(Step::User {
                user: u.trim().to_string(),
            });
            out.origin.push(None);
        }
    }
    Ok(out)
}

/// Maps the request's `steps` to VM steps. `copy_items` becomes one
/// [`Step::Copy`] per item, so the result can be longer than `steps`; use
/// [`plan`] to keep the mapping back to request indexes.
pub fn steps_from_request(steps: &[Value], context_root: &Path) -> Result<Vec<Step>, String> {
    Ok(steps_from_request_indexed(steps, context_root)?
        .into_iter()
        .map(|(_, s)| s)
        .collect())
}

fn steps_from_request_indexed(
    steps: &[Value],
    context_root: &Path,
) -> Result<Vec<(usize, Step)>, String> {
    let mut out = vec![];
    for (index, v) in steps.iter().enumerate() {
        // Validation (and shell text) shared with the Dockerfile renderer.
        let shell = step_shell(index, v).map_err(|e| e.to_string())?;
        let action = v.get("action").and_then(Value::as_str).unwrap_or("");
        let err = |m: String| format!("steps[{index}] ({action}): {m}");
        let s = |k: &str| -> Result<String, String> {
            v.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| err(format!("{k} is required")))
        };
        let b = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        let step = match action {
            "apt_install" | "pip_install" | "npm_install" | "bun_install" | "git_clone" => {
                Step::Shell {
                    action: action.to_string(),
                    command: shell.ok_or_else(|| err("no shell text".into()))?,
                }
            }
            "run" => {
                let command = s("command")?;
                if command.contains('\0') {
                    return Err(err("command contains NUL".into()));
                }
                Step::Run {
                    command,
                    user: user_of(v, "user").map_err(err)?,
                }
            }
            "skip_cache" => Step::SkipCache,
            "copy" => copy_step(v, context_root).map_err(err)?,
            "copy_items" => {
                let items = v
                    .get("items")
                    .and_then(Value::as_array)
                    .filter(|i| !i.is_empty())
                    .ok_or_else(|| err("items must be a non-empty list".into()))?;
                for item in items {
                    out.push((index, copy_step(item, context_root).map_err(err)?));
                }
                continue;
            }
            "workdir" => {
                let path = s("path")?;
                if !path.starts_with('/') {
                    return Err(err("path must be absolute".into()));
                }
                Step::Workdir { path }
            }
            "user" => Step::User {
                user: user_of(v, "user")
                    .map_err(err)?
                    .ok_or_else(|| err("user is required".into()))?,
            },
            "remove" => Step::Remove {
                path: s("path")?,
                recursive: b("recursive"),
                force: b("force"),
            },
            "rename" => Step::Rename {
                src: s("src")?,
                dst: s("dst")?,
                force: b("force"),
            },
            "make_dir" => Step::MakeDir {
                path: s("path")?,
                mode: mode_of(v, "mode").map_err(err)?,
            },
            "make_symlink" => Step::MakeSymlink {
                target: s("target")?,
                path: s("path")?,
            },
            other => return Err(err(format!("unknown action {other:?}"))),
        };
        out.push((index, step));
    }
    Ok(out)
}

fn check_envs(kind: &str, envs: &BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in envs {
        let ok = k
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(format!(
                "{kind} env {k:?}: names are [A-Za-z_][A-Za-z0-9_]*"
            ));
        }
        if v.contains('\0') {
            return Err(format!("{kind} env {k:?}: value contains NUL"));
        }
    }
    Ok(())
}

fn user_of(v: &Value, key: &str) -> Result<Option<String>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(u))
            if !u.is_empty()
                && !u.starts_with('-')
                && u.split(':').count() <= 2
                && u.split(':').all(|p| {
                    !p.is_empty()
                        && p.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                }) =>
        {
            Ok(Some(u.clone()))
        }
        Some(_) => Err(format!(
            "{key} must be a user name or uid[:group] ([A-Za-z0-9._-])"
        )),
    }
}

fn mode_of(v: &Value, key: &str) -> Result<Option<u32>, String> {
    let m = match v.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(m)) => u32::from_str_radix(m, 8).ok(),
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Some(_) => None,
    };
    m.map(|m| Some(m & 0o7777))
        .ok_or_else(|| format!("{key} must be an octal mode like \"0755\""))
}

/// A `copy` step or `copy_items` item: sources (`sources`, or the legacy
/// `src` string/list) resolved under `context_root`.
fn copy_step(item: &Value, context_root: &Path) -> Result<Step, String> {
    let raw = item.get("sources").or_else(|| item.get("src"));
    let list: Vec<&Value> = match raw {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(v @ Value::String(_)) => vec![v],
        _ => return Err("sources must be a list of context paths".into()),
    };
    if list.is_empty() {
        return Err("sources is empty".into());
    }
    let mut sources = vec![];
    for src in list {
        let src = src
            .as_str()
            .filter(|p| !p.is_empty())
            .ok_or("each source must be a non-empty string")?;
        sources.push(resolve_ref(context_root, src)?);
    }
    let dst = item
        .get("dst")
        .or_else(|| item.get("dest"))
        .and_then(Value::as_str)
        .filter(|d| !d.is_empty())
        .ok_or("dst is required")?;
    if dst.contains('\0') {
        return Err("dst contains NUL".into());
    }
    Ok(Step::Copy {
        sources,
        dst: dst.to_string(),
        user: user_of(item, "user")?,
        mode: mode_of(item, "mode")?,
    })
}

/// `context_root/r` for a relative context ref `r` without `..`; it must
/// exist as a file or directory (not a symlink).
fn resolve_ref(context_root: &Path, r: &str) -> Result<(PathBuf, bool), String> {
    let clean = r.trim_start_matches("./");
    let rel = Path::new(clean);
    if clean.is_empty()
        || rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "source {r:?} must be a relative path inside the build context"
        ));
    }
    let host = context_root.join(rel);
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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

    fn one(v: Value) -> Result<Step, String> {
        let d = ctx();
        let mut s = steps_from_request(&[v], d.path())?;
        assert_eq!(s.len(), 1);
        Ok(s.remove(0))
    }

    #[test]
    fn package_installs_use_the_renderer_shell_text() {
        assert_eq!(
            one(json!({"action":"apt_install","packages":["curl","git"]})).unwrap(),
            Step::Shell {
                action: "apt_install".into(),
                command:
                    "apt-get update && apt-get install -y curl git && rm -rf /var/lib/apt/lists/*"
                        .into()
            }
        );
        let cmd = |v| match one(v).unwrap() {
            Step::Shell { command, .. } => command,
            s => panic!("{s:?}"),
        };
        assert_eq!(
            cmd(json!({"action":"pip_install","packages":["requests"]})),
            "pip install --no-cache-dir requests"
        );
        assert_eq!(
            cmd(json!({"action":"pip_install","packages":["black"],"g":false})),
            "pip install --user --no-cache-dir black"
        );
        assert_eq!(
            cmd(json!({"action":"npm_install","packages":["typescript"]})),
            "npm install typescript"
        );
        assert_eq!(
            cmd(json!({"action":"npm_install","packages":["pnpm"],"g":true})),
            "npm install -g pnpm"
        );
        assert_eq!(
            cmd(json!({"action":"bun_install","packages":["zod"]})),
            "bun add zod"
        );
        assert_eq!(
            cmd(json!({"action":"bun_install","packages":["tsx"],"g":true})),
            "bun add --global tsx"
        );
        assert_eq!(
            cmd(
                json!({"action":"git_clone","url":"https://h/x.git","path":"/src/hello","branch":"master","depth":1})
            ),
            "git clone --branch master --depth 1 -- https://h/x.git /src/hello"
        );
        assert_eq!(
            cmd(json!({"action":"git_clone","url":"https://h/y.git","path":"/workspace"})),
            "git clone -- https://h/y.git /workspace"
        );
        assert!(one(json!({"action":"apt_install","packages":[]})).is_err());
        assert!(one(json!({"action":"apt_install","packages":["-y"]})).is_err());
    }

    #[test]
    fn run_with_and_without_user() {
        assert_eq!(
            one(json!({"action":"run","command":"echo one"})).unwrap(),
            Step::Run {
                command: "echo one".into(),
                user: None
            }
        );
        assert_eq!(
            one(json!({"action":"run","command":"echo two","user":"app"})).unwrap(),
            Step::Run {
                command: "echo two".into(),
                user: Some("app".into())
            }
        );
        assert!(one(json!({"action":"run","command":""})).is_err());
        assert!(one(json!({"action":"run","command":"x","user":"a b"})).is_err());
    }

    #[test]
    fn copy_resolves_context_refs() {
        let d = ctx();
        let s = steps_from_request(
            &[
                json!({"action":"copy","sources":["builder-context/step-0/src-0/app"],
                     "dst":"/opt/app","user":"app","mode":"0755"}),
            ],
            d.path(),
        )
        .unwrap();
        assert_eq!(
            s,
            vec![Step::Copy {
                sources: vec![(d.path().join("builder-context/step-0/src-0/app"), true)],
                dst: "/opt/app".into(),
                user: Some("app".into()),
                mode: Some(0o755)
            }]
        );
        // A file, legacy `src`, dst ending in `/`.
        let s = steps_from_request(
            &[
                json!({"action":"copy","src":"builder-context/step-1/src-0/config.toml",
                     "dst":"/etc/app/","force_upload":true}),
            ],
            d.path(),
        )
        .unwrap();
        assert_eq!(
            s,
            vec![Step::Copy {
                sources: vec![(
                    d.path().join("builder-context/step-1/src-0/config.toml"),
                    false
                )],
                dst: "/etc/app/".into(),
                user: None,
                mode: None
            }]
        );
        for bad in [
            json!({"action":"copy","sources":["../etc/passwd"],"dst":"/x"}),
            json!({"action":"copy","sources":["/etc/passwd"],"dst":"/x"}),
            json!({"action":"copy","sources":["builder-context/missing"],"dst":"/x"}),
            json!({"action":"copy","sources":[],"dst":"/x"}),
            json!({"action":"copy","sources":["builder-context/step-1/src-0/config.toml"]}),
            json!({"action":"copy","sources":["builder-context/step-1/src-0/config.toml"],"dst":"/x","mode":"abc"}),
        ] {
            assert!(
                steps_from_request(std::slice::from_ref(&bad), d.path()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn copy_items_become_one_copy_each_with_the_request_index() {
        let d = ctx();
        let p = plan(
            None,
            &[
                json!({"action":"run","command":"true"}),
                json!({"action":"copy_items","items":[
                    {"sources":["builder-context/step-1/src-0/config.toml"],"dst":"/etc/x.toml"},
                    {"sources":["builder-context/step-0/src-0/app/sub"],"dst":"/opt/sub","mode":"0644"}]}),
            ],
            None,
            d.path(),
        )
        .unwrap();
        assert_eq!(p.steps.len(), 3);
        assert_eq!(p.origin, vec![Some(0), Some(1), Some(1)]);
        assert!(
            matches!(&p.steps[2], Step::Copy { mode: Some(0o644), sources, .. } if sources[0].1)
        );
    }

    #[test]
    fn workdir_user_and_fs_steps() {
        assert_eq!(
            one(json!({"action":"workdir","path":"/workspace"})).unwrap(),
            Step::Workdir {
                path: "/workspace".into()
            }
        );
        assert!(one(json!({"action":"workdir","path":"rel"})).is_err());
        assert_eq!(
            one(json!({"action":"user","user":"app"})).unwrap(),
            Step::User { user: "app".into() }
        );
        assert_eq!(
            one(json!({"action":"remove","path":"/tmp/one","recursive":true,"force":false}))
                .unwrap(),
            Step::Remove {
                path: "/tmp/one".into(),
                recursive: true,
                force: false
            }
        );
        assert_eq!(
            one(json!({"action":"rename","src":"/tmp/a","dst":"/tmp/b","force":true})).unwrap(),
            Step::Rename {
                src: "/tmp/a".into(),
                dst: "/tmp/b".into(),
                force: true
            }
        );
        assert_eq!(
            one(json!({"action":"make_dir","path":"/data","mode":"0700"})).unwrap(),
            Step::MakeDir {
                path: "/data".into(),
                mode: Some(0o700)
            }
        );
        assert_eq!(
            one(json!({"action":"make_dir","path":"/data2"})).unwrap(),
            Step::MakeDir {
                path: "/data2".into(),
                mode: None
            }
        );
        assert_eq!(
            one(json!({"action":"make_symlink","target":"/data","path":"/d"})).unwrap(),
            Step::MakeSymlink {
                target: "/data".into(),
                path: "/d".into()
            }
        );
        assert_eq!(
            one(json!({"action":"skip_cache"})).unwrap(),
            Step::SkipCache
        );
        assert!(one(json!({"action":"remove","path":"-rf"})).is_err());
        assert!(one(json!({"action":"nope"})).is_err());
        assert!(one(json!({"command":"x"})).is_err());
    }

    #[test]
    fn plan_adds_build_and_runtime_envs() {
        let d = ctx();
        let build: BTreeMap<String, String> = [("B".to_string(), "1".to_string())].into();
        let rc = RuntimeConfig {
            default_user: Some("app".into()),
            default_workdir: Some("/w".into()),
            default_envs: Some([("R".to_string(), "2".to_string())].into()),
            readiness: None,
        };
        let p = plan(
            Some(&build),
            &[json!({"action":"run","command":"true"})],
            Some(&rc),
            d.path(),
        )
        .unwrap();
        assert_eq!(
            p.steps,
            vec![
                Step::BuildEnv { envs: build },
                Step::Run {
                    command: "true".into(),
                    user: None
                },
                Step::Env {
                    envs: [("R".to_string(), "2".to_string())].into()
                },
                Step::Workdir { path: "/w".into() },
                Step::User { user: "app".into() },
            ]
        );
        assert_eq!(p.origin, vec![None, Some(0), None, None, None]);
        assert_eq!(p.request_index(1), Some(0));
        assert_eq!(p.request_index(0), None);
        let bad: BTreeMap<String, String> = [("A-B".to_string(), "1".to_string())].into();
        assert!(plan(Some(&bad), &[], None, d.path()).is_err());
    }
}
