//! Declarative build steps: the SDK's 15 actions (contract §3.3) as one
//! enum. [`Step::parse`] reads the flat `{"action": …, …args}` objects the
//! SDK sends and checks every rule; serialising a [`Step`] writes exactly
//! the SDK's JSON back (the CLI builds its requests this way). The
//! Dockerfile renderer and the build VM both execute these values, and
//! the shell line of a shell-run action comes from [`Step::shell_command`]
//! alone, so both backends run the same command.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use super::rules::{self, Mode, RuleError};
use crate::shell;

/// One declarative step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Step {
    /// `apt-get install -y packages`.
    AptInstall { packages: Vec<String> },
    /// `pip install`: system-wide unless `g` is false (`--user`); the SDK
    /// sends `g` only when it is false.
    PipInstall {
        packages: Vec<String>,
        #[serde(default = "yes", skip_serializing_if = "is_true")]
        g: bool,
    },
    /// `npm install`, global when `g` (sent only when true).
    NpmInstall {
        packages: Vec<String>,
        #[serde(default, skip_serializing_if = "is_false")]
        g: bool,
    },
    /// `bun add`, global when `g` (sent only when true).
    BunInstall {
        packages: Vec<String>,
        #[serde(default, skip_serializing_if = "is_false")]
        g: bool,
    },
    /// `sh -c command`, as `user` when given.
    Run {
        command: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// A cache boundary: the steps after it are not taken from a cache.
    SkipCache,
    /// Context files or directories copied to `dst`.
    Copy(CopyItem),
    /// Several copies in one step.
    CopyItems { items: Vec<CopyItem> },
    /// `git clone [--branch B] [--depth N] -- url path`.
    GitClone {
        url: String,
        path: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        branch: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        depth: Option<u64>,
    },
    /// Later steps' directory, and the template's default workdir.
    Workdir { path: String },
    /// Later steps' user, and the template's default user.
    User { user: String },
    /// `rm [-r] [-f] path`.
    Remove {
        path: String,
        recursive: bool,
        force: bool,
    },
    /// `mv [-f] src dst`.
    Rename {
        src: String,
        dst: String,
        force: bool,
    },
    /// `mkdir -p path`, then `chmod mode` when given.
    MakeDir {
        path: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        mode: Option<Mode>,
    },
    /// `ln -s target path`.
    MakeSymlink { target: String, path: String },
}

// `default`s: the schema of a field that may be omitted on the wire.
#[allow(dead_code)]
fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One copy: context paths (`builder-context/step-N/src-M/…` refs from the
/// SDK) to a guest path. A file goes to `dst`, or into it when `dst` ends
/// with `/`, is an existing directory or there are several sources; a
/// directory's contents go into `dst`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CopyItem {
    pub sources: Vec<String>,
    pub dst: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Re-upload the sources even when the server has them (a hint for the
    /// blob preflight; no effect on the build).
    #[serde(default, skip_serializing_if = "is_false")]
    pub force_upload: bool,
}

/// Every action name, in the SDK's order.
pub const ACTIONS: &[&str] = &[
    "apt_install",
    "pip_install",
    "npm_install",
    "bun_install",
    "run",
    "skip_cache",
    "copy",
    "copy_items",
    "git_clone",
    "workdir",
    "user",
    "remove",
    "rename",
    "make_dir",
    "make_symlink",
];

/// A step that breaks a rule: `steps[index] (action): message`, where
/// `index` is the position in the request's `steps` array (0-based, as a
/// JSON path; logs and `error_detail.step_index` count from 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("steps[{index}] ({action}): {message}")]
pub struct StepError {
    pub index: usize,
    pub action: String,
    pub message: String,
}

/// Reads one step object, turning each broken rule into a [`StepError`].
struct Reader<'a> {
    index: usize,
    action: &'a str,
    v: &'a Value,
}

impl Reader<'_> {
    fn err(&self, message: impl Into<String>) -> StepError {
        StepError {
            index: self.index,
            action: if self.action.is_empty() {
                "?".into()
            } else {
                self.action.into()
            },
            message: message.into(),
        }
    }

    fn rule(&self, e: RuleError) -> StepError {
        self.err(e.to_string())
    }

    fn opt_str_in(&self, v: &Value, key: &str) -> Result<Option<String>, StepError> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.err(format!("\"{key}\" must be a string"))),
        }
    }

    /// A required, non-blank, single-line string.
    fn word_in(&self, v: &Value, key: &str) -> Result<String, StepError> {
        match self.opt_str_in(v, key)? {
            Some(s) if !s.trim().is_empty() => {
                rules::single_line(&s).map_err(|e| self.rule(e))?;
                Ok(s)
            }
            Some(_) => Err(self.err(format!("\"{key}\" must not be empty"))),
            None => Err(self.err(format!("\"{key}\" is required"))),
        }
    }

    fn word(&self, key: &str) -> Result<String, StepError> {
        self.word_in(self.v, key)
    }

    /// A path argument of a shell-run action: a word not taken for an option.
    fn path(&self, key: &str) -> Result<String, StepError> {
        let p = self.word(key)?;
        rules::not_option(&p).map_err(|e| self.rule(e))?;
        Ok(p)
    }

    fn bool_in(&self, v: &Value, key: &str, default: bool) -> Result<bool, StepError> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(self.err(format!("\"{key}\" must be a boolean"))),
        }
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool, StepError> {
        self.bool_in(self.v, key, default)
    }

    fn user_in(&self, v: &Value, key: &str) -> Result<Option<String>, StepError> {
        match self.opt_str_in(v, key)? {
            None => Ok(None),
            Some(u) => {
                rules::user(&u).map_err(|e| self.err(format!("\"{key}\": {e}")))?;
                Ok(Some(u))
            }
        }
    }

    fn mode_in(&self, v: &Value, key: &str) -> Result<Option<Mode>, StepError> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(m) => Mode::from_json(m)
                .map(Some)
                .map_err(|e| self.err(format!("\"{key}\": {e}"))),
        }
    }

    fn packages(&self) -> Result<Vec<String>, StepError> {
        let list = match self.v.get("packages") {
            None | Some(Value::Null) => return Err(self.err("\"packages\" is required")),
            Some(Value::Array(a)) => a,
            Some(_) => return Err(self.err("\"packages\" must be a list")),
        };
        if list.is_empty() {
            return Err(self.err("\"packages\" must not be empty"));
        }
        let mut out = vec![];
        for p in list {
            let p = p
                .as_str()
                .filter(|p| !p.is_empty())
                .ok_or_else(|| self.err("each package must be a non-empty string"))?;
            rules::not_option(p)
                .and_then(|()| rules::single_line(p))
                .map_err(|e| self.err(format!("package {e}")))?;
            out.push(p.to_string());
        }
        Ok(out)
    }

    /// A `copy` step or a `copy_items` item: `sources` (or the legacy `src`,
    /// a string or a list) and `dst` (or `dest`).
    fn copy_item(&self, item: &Value) -> Result<CopyItem, StepError> {
        let list: Vec<&Value> = match item.get("sources").or_else(|| item.get("src")) {
            Some(Value::Array(a)) => a.iter().collect(),
            Some(v @ Value::String(_)) => vec![v],
            None | Some(Value::Null) => return Err(self.err("\"sources\" is required")),
            Some(_) => return Err(self.err("\"sources\" must be a list of context paths")),
        };
        if list.is_empty() {
            return Err(self.err("\"sources\" must not be empty"));
        }
        let mut sources = vec![];
        for s in list {
            let s = s
                .as_str()
                .filter(|s| !s.trim().is_empty())
                .ok_or_else(|| self.err("each source must be a non-empty string"))?;
            rules::single_line(s).map_err(|e| self.rule(e))?;
            sources.push(rules::context_path(s).map_err(|e| self.err(format!("source: {e}")))?);
        }
        let dst_key = if item.get("dst").is_none() && item.get("dest").is_some() {
            "dest"
        } else {
            "dst"
        };
        let dst = self.word_in(item, dst_key).map_err(|mut e| {
            e.message = e.message.replace("\"dest\"", "\"dst\"");
            e
        })?;
        Ok(CopyItem {
            sources,
            dst,
            user: self.user_in(item, "user")?,
            mode: self.mode_in(item, "mode")?,
            force_upload: self.bool_in(item, "force_upload", false)?,
        })
    }
}

impl Step {
    /// Parses step `index` of a request (the SDK's JSON object).
    pub fn parse(index: usize, v: &Value) -> Result<Step, StepError> {
        let action = v.get("action").and_then(Value::as_str).unwrap_or("");
        let r = Reader { index, action, v };
        if !v.is_object() {
            return Err(r.err("a step must be an object with an \"action\""));
        }
        Ok(match action {
            "apt_install" => Step::AptInstall {
                packages: r.packages()?,
            },
            "pip_install" => Step::PipInstall {
                packages: r.packages()?,
                g: r.bool("g", true)?,
            },
            "npm_install" => Step::NpmInstall {
                packages: r.packages()?,
                g: r.bool("g", false)?,
            },
            "bun_install" => Step::BunInstall {
                packages: r.packages()?,
                g: r.bool("g", false)?,
            },
            "run" => {
                // Multi-line commands are fine (the renderer uses the exec
                // form for them); NUL is not.
                let command = match r.opt_str_in(v, "command")? {
                    Some(c) if !c.trim().is_empty() => c,
                    Some(_) => return Err(r.err("\"command\" must not be empty")),
                    None => return Err(r.err("\"command\" is required")),
                };
                if command.contains('\0') {
                    return Err(r.err("\"command\" contains a NUL byte"));
                }
                Step::Run {
                    command,
                    user: r.user_in(v, "user")?,
                }
            }
            "skip_cache" => Step::SkipCache,
            "copy" => Step::Copy(r.copy_item(v)?),
            "copy_items" => {
                let items = match v.get("items") {
                    Some(Value::Array(a)) if !a.is_empty() => a,
                    None | Some(Value::Null) => return Err(r.err("\"items\" is required")),
                    Some(_) => return Err(r.err("\"items\" must be a non-empty list")),
                };
                let mut out = vec![];
                for item in items {
                    if !item.is_object() {
                        return Err(r.err("each item must be an object"));
                    }
                    out.push(r.copy_item(item)?);
                }
                Step::CopyItems { items: out }
            }
            "git_clone" => {
                let url = r.word("url")?;
                rules::not_option(&url).map_err(|e| r.err(format!("url: {e}")))?;
                let path = match r.opt_str_in(v, "path")? {
                    None => "/workspace".to_string(),
                    Some(_) => r.path("path")?,
                };
                let branch = match r.opt_str_in(v, "branch")? {
                    None => None,
                    Some(_) => Some(r.path("branch")?),
                };
                let depth = match v.get("depth") {
                    None | Some(Value::Null) => None,
                    Some(d) => Some(
                        d.as_u64()
                            .filter(|d| *d > 0)
                            .ok_or_else(|| r.err("\"depth\" must be a positive integer"))?,
                    ),
                };
                Step::GitClone {
                    url,
                    path,
                    branch,
                    depth,
                }
            }
            "workdir" => {
                let path = r.word("path")?;
                rules::absolute(&path).map_err(|e| r.rule(e))?;
                Step::Workdir { path }
            }
            "user" => Step::User {
                user: r
                    .user_in(v, "user")?
                    .ok_or_else(|| r.err("\"user\" is required"))?,
            },
            "remove" => Step::Remove {
                path: r.path("path")?,
                recursive: r.bool("recursive", false)?,
                force: r.bool("force", false)?,
            },
            "rename" => Step::Rename {
                src: r.path("src")?,
                dst: r.path("dst")?,
                force: r.bool("force", false)?,
            },
            "make_dir" => Step::MakeDir {
                path: r.path("path")?,
                mode: r.mode_in(v, "mode")?,
            },
            "make_symlink" => Step::MakeSymlink {
                target: r.path("target")?,
                path: r.path("path")?,
            },
            "" => return Err(r.err("\"action\" is required")),
            other => {
                return Err(r.err(format!(
                    "unknown action {other:?} (known: {})",
                    ACTIONS.join(", ")
                )));
            }
        })
    }

    /// The SDK action name.
    pub fn action(&self) -> &'static str {
        match self {
            Step::AptInstall { .. } => "apt_install",
            Step::PipInstall { .. } => "pip_install",
            Step::NpmInstall { .. } => "npm_install",
            Step::BunInstall { .. } => "bun_install",
            Step::Run { .. } => "run",
            Step::SkipCache => "skip_cache",
            Step::Copy(_) => "copy",
            Step::CopyItems { .. } => "copy_items",
            Step::GitClone { .. } => "git_clone",
            Step::Workdir { .. } => "workdir",
            Step::User { .. } => "user",
            Step::Remove { .. } => "remove",
            Step::Rename { .. } => "rename",
            Step::MakeDir { .. } => "make_dir",
            Step::MakeSymlink { .. } => "make_symlink",
        }
    }

    /// The SDK's JSON object for this step.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// The copies this step makes (`copy` and `copy_items`).
    pub fn copies(&self) -> &[CopyItem] {
        match self {
            Step::Copy(c) => std::slice::from_ref(c),
            Step::CopyItems { items } => items,
            _ => &[],
        }
    }

    /// The shell line of an action that runs as one fixed command:
    /// `apt_install`, `pip_install`, `npm_install`, `bun_install`,
    /// `git_clone`, `remove`, `rename`, `make_dir`, `make_symlink` (words
    /// quoted by [`shell::quote`]). `None` for `run` (its command is the
    /// user's own), `copy`, `copy_items`, `workdir`, `user` and
    /// `skip_cache`.
    pub fn shell_command(&self) -> Option<String> {
        let q = shell::quote;
        let words = |p: &[String]| p.iter().map(|w| q(w)).collect::<Vec<_>>().join(" ");
        Some(match self {
            Step::AptInstall { packages } => format!(
                "apt-get update && apt-get install -y {} && rm -rf /var/lib/apt/lists/*",
                words(packages)
            ),
            Step::PipInstall { packages, g } => {
                let user = if *g { "" } else { "--user " };
                format!("pip install {user}--no-cache-dir {}", words(packages))
            }
            Step::NpmInstall { packages, g } => {
                let g = if *g { "-g " } else { "" };
                format!("npm install {g}{}", words(packages))
            }
            Step::BunInstall { packages, g } => {
                let g = if *g { "--global " } else { "" };
                format!("bun add {g}{}", words(packages))
            }
            Step::GitClone {
                url,
                path,
                branch,
                depth,
            } => {
                let mut cmd = String::from("git clone");
                if let Some(b) = branch {
                    write!(cmd, " --branch {}", q(b)).unwrap();
                }
                if let Some(d) = depth {
                    write!(cmd, " --depth {d}").unwrap();
                }
                write!(cmd, " -- {} {}", q(url), q(path)).unwrap();
                cmd
            }
            Step::Remove {
                path,
                recursive,
                force,
            } => {
                let flags = match (recursive, force) {
                    (true, true) => "-rf ",
                    (true, false) => "-r ",
                    (false, true) => "-f ",
                    (false, false) => "",
                };
                format!("rm {flags}{}", q(path))
            }
            Step::Rename { src, dst, force } => {
                let f = if *force { "-f " } else { "" };
                format!("mv {f}{} {}", q(src), q(dst))
            }
            Step::MakeDir { path, mode } => match mode {
                Some(m) => format!("mkdir -p {p} && chmod {m} {p}", p = q(path)),
                None => format!("mkdir -p {}", q(path)),
            },
            Step::MakeSymlink { target, path } => format!("ln -s {} {}", q(target), q(path)),
            Step::Run { .. }
            | Step::SkipCache
            | Step::Copy(_)
            | Step::CopyItems { .. }
            | Step::Workdir { .. }
            | Step::User { .. } => return None,
        })
    }

    /// One line for build logs.
    pub fn describe(&self) -> String {
        match self {
            Step::Run { command, user } => match user {
                Some(u) => format!("run (as {u}): {command}"),
                None => format!("run: {command}"),
            },
            Step::Copy(c) => format!("copy {} -> {}", c.sources.join(" "), c.dst),
            Step::CopyItems { items } => {
                let parts: Vec<String> = items
                    .iter()
                    .map(|c| format!("{} -> {}", c.sources.join(" "), c.dst))
                    .collect();
                format!("copy_items {}", parts.join("; "))
            }
            Step::Workdir { path } => format!("workdir {path}"),
            Step::User { user } => format!("user {user}"),
            Step::SkipCache => "skip_cache".into(),
            other => format!(
                "{}: {}",
                other.action(),
                other.shell_command().unwrap_or_default()
            ),
        }
    }
}

/// Parses a request's `steps`, collecting every error.
pub fn parse_all(steps: &[Value]) -> Result<Vec<Step>, Vec<StepError>> {
    let mut out = Vec::with_capacity(steps.len());
    let mut errs = vec![];
    for (i, v) in steps.iter().enumerate() {
        match Step::parse(i, v) {
            Ok(s) => out.push(s),
            Err(e) => errs.push(e),
        }
    }
    if errs.is_empty() { Ok(out) } else { Err(errs) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Contract §4 E: every step of the SDK's full declarative chain, as
    /// sent, parses and serialises back to the same JSON.
    #[test]
    fn the_sdk_chain_round_trips() {
        let steps = json!([
            {"action": "apt_install", "packages": ["curl", "git"]},
            {"action": "pip_install", "packages": ["requests"]},
            {"action": "pip_install", "packages": ["black"], "g": false},
            {"action": "npm_install", "packages": ["typescript"]},
            {"action": "npm_install", "packages": ["pnpm"], "g": true},
            {"action": "bun_install", "packages": ["zod"]},
            {"action": "bun_install", "packages": ["tsx"], "g": true},
            {"action": "run", "command": "echo one"},
            {"action": "run", "command": "echo two", "user": "app"},
            {"action": "skip_cache"},
            {"action": "copy", "sources": ["builder-context/step-11/src-0/app"], "dst": "/opt/app", "user": "app", "mode": "0755"},
            {"action": "copy", "sources": ["builder-context/step-12/src-0/config.toml"], "dst": "/etc/app/", "force_upload": true},
            {"action": "copy_items", "items": [
              {"sources": ["builder-context/step-13/src-0/config.toml"], "dst": "/etc/x.toml"},
              {"sources": ["builder-context/step-13/src-1/sub"], "dst": "/opt/sub", "mode": "0644"}]},
            {"action": "git_clone", "url": "https://github.com/octocat/Hello-World.git", "path": "/src/hello", "branch": "master", "depth": 1},
            {"action": "git_clone", "url": "https://github.com/octocat/Spoon-Knife.git", "path": "/workspace"},
            {"action": "workdir", "path": "/workspace"},
            {"action": "user", "user": "app"},
            {"action": "remove", "path": "/tmp/junk", "recursive": true, "force": true},
            {"action": "remove", "path": "/tmp/one", "recursive": false, "force": false},
            {"action": "rename", "src": "/tmp/a", "dst": "/tmp/b", "force": true},
            {"action": "make_dir", "path": "/data", "mode": "0700"},
            {"action": "make_dir", "path": "/data2"},
            {"action": "make_symlink", "target": "/data", "path": "/d"}
        ]);
        let parsed = parse_all(steps.as_array().unwrap()).unwrap();
        assert_eq!(parsed.len(), 23);
        let back: Vec<Value> = parsed.iter().map(Step::to_json).collect();
        assert_eq!(Value::Array(back), steps);
        let actions: std::collections::BTreeSet<&str> = parsed.iter().map(Step::action).collect();
        assert_eq!(actions.len(), ACTIONS.len(), "every action is covered");
    }

    #[test]
    fn lenient_inputs_normalise() {
        let s = Step::parse(
            0,
            &json!({"action":"copy","src":"./a//b","dest":"/x","mode":0o40644}),
        )
        .unwrap();
        assert_eq!(
            s.to_json(),
            json!({"action":"copy","sources":["a/b"],"dst":"/x","mode":"0644"})
        );
        let s = Step::parse(0, &json!({"action":"git_clone","url":"https://h/x.git"})).unwrap();
        assert_eq!(s.to_json()["path"], "/workspace");
    }

    #[test]
    fn shell_lines() {
        let sh = |v: Value| Step::parse(0, &v).unwrap().shell_command().unwrap();
        assert_eq!(
            sh(json!({"action":"pip_install","packages":["numpy>=1.26"]})),
            "pip install --no-cache-dir 'numpy>=1.26'"
        );
        assert_eq!(
            sh(
                json!({"action":"git_clone","url":"https://h/x.git","path":"/src/hello","branch":"master","depth":1})
            ),
            "git clone --branch master --depth 1 -- https://h/x.git /src/hello"
        );
        assert_eq!(
            sh(json!({"action":"make_dir","path":"/my dir","mode":"700"})),
            "mkdir -p '/my dir' && chmod 0700 '/my dir'"
        );
        assert_eq!(
            Step::parse(0, &json!({"action":"run","command":"x"}))
                .unwrap()
                .shell_command(),
            None
        );
    }

    #[test]
    fn every_rule_names_the_step() {
        for (v, msg) in [
            (
                json!({"action":"run"}),
                "steps[0] (run): \"command\" is required",
            ),
            (
                json!({"action":"run","command":" "}),
                "steps[0] (run): \"command\" must not be empty",
            ),
            (
                json!({"action":"teleport"}),
                "steps[0] (teleport): unknown action \"teleport\" (known: apt_install",
            ),
            (
                json!({"command":"x"}),
                "steps[0] (?): \"action\" is required",
            ),
            (json!("run"), "steps[0] (?): a step must be an object"),
            (
                json!({"action":"apt_install","packages":["--allow-unauthenticated"]}),
                "steps[0] (apt_install): package \"--allow-unauthenticated\" looks like an option",
            ),
            (
                json!({"action":"apt_install","packages":[]}),
                "\"packages\" must not be empty",
            ),
            (
                json!({"action":"run","command":"x","user":"app; rm -rf /"}),
                "\"user\": \"app; rm -rf /\" is not user",
            ),
            (
                json!({"action":"make_dir","path":"/x","mode":"999"}),
                "\"mode\": \"999\" is not an octal mode",
            ),
            (
                json!({"action":"copy","sources":["../etc/passwd"],"dst":"/x"}),
                "inside the context",
            ),
            (
                json!({"action":"copy","sources":["/etc/passwd"],"dst":"/x"}),
                "inside the context",
            ),
            (
                json!({"action":"copy","sources":[],"dst":"/x"}),
                "\"sources\" must not be empty",
            ),
            (
                json!({"action":"copy","sources":["a"]}),
                "\"dst\" is required",
            ),
            (
                json!({"action":"copy_items","items":[]}),
                "\"items\" must be a non-empty list",
            ),
            (json!({"action":"workdir","path":"rel"}), "must be absolute"),
            (
                json!({"action":"remove","path":"-rf"}),
                "looks like an option",
            ),
            (
                json!({"action":"remove","path":"/x","force":"yes"}),
                "\"force\" must be a boolean",
            ),
            (
                json!({"action":"git_clone","url":"https://h","depth":0}),
                "positive integer",
            ),
            (
                json!({"action":"make_symlink","target":"/a\nb","path":"/d"}),
                "newline",
            ),
        ] {
            let e = Step::parse(0, &v).unwrap_err().to_string();
            assert!(e.contains(msg), "{v}: {e}");
        }
        let errs = parse_all(&[
            json!({"action":"run"}),
            json!({"action":"skip_cache"}),
            json!({"action":"x"}),
        ])
        .unwrap_err();
        assert_eq!(errs.iter().map(|e| e.index).collect::<Vec<_>>(), [0, 2]);
    }
}
