//! Declarative steps → Dockerfile.
//!
//! The input is the `steps` array exactly as the SDK sends it (contract §3.3:
//! flat objects `{"action": …, …args}`, 15 actions). Each action renders as
//! the spec (§2.2) and the SDK's local `to_dockerfile()` describe, with two
//! deliberate differences in *text*, not meaning:
//!
//! - shell words are quoted with [`shell_quote`] (single quotes, only when
//!   needed) instead of the SDK's double quotes, so `$`, backquotes and
//!   backslashes in paths and commands reach the shell literally;
//! - `COPY`/`WORKDIR`/`USER` arguments, which Dockerfile engines expand
//!   (`$VAR`), have `$` and `\` escaped; `COPY` switches to the JSON form
//!   when a path has a space or a quote.
//!
//! Build envs (`set_build_envs`) render as `ARG NAME="value"` lines right
//! after `FROM`. An `ARG` is in the environment of every later `RUN` of the
//! stage but is not written to the image config's `Env`, so it never becomes
//! a runtime default of the template (spec §2.3). Caveat (Docker semantics,
//! shared by BuildKit and buildah): an `ENV` of the same name in the base
//! image wins over the `ARG` during `RUN`.
//!
//! Runtime envs (`set_runtime_envs`) render as `ENV` lines at the end, so the
//! image config carries them and the importer's runtime defaults include
//! them; `set_workdir`/`set_user` render `WORKDIR`/`USER` and are also
//! returned in [`Rendered::runtime`] (these override the image's defaults).
//!
//! `skip_cache` renders `ARG NULLSPACE_SKIP_CACHE`: every `RUN` after it sees
//! that build arg, so the caller passes a fresh value
//! ([`Rendered::cache_bust_arg`]) and the engine's layer cache misses from
//! there on while the steps before it stay cached.
//!
//! The start command is not part of the image build (it runs before the
//! snapshot), so it is not rendered here.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use nullspace_oci::config::shell_quote;
use serde_json::Value;

/// The build arg a `skip_cache` step declares.
pub const CACHE_BUST_ARG: &str = "NULLSPACE_SKIP_CACHE";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("steps[{index}] ({action}): {message}")]
    Step {
        index: usize,
        action: String,
        message: String,
    },
    #[error("base image: {0}")]
    Base(String),
    #[error("{kind} env {name:?}: {message}")]
    Env {
        kind: &'static str,
        name: String,
        message: String,
    },
}

/// Runtime defaults the steps set (the last `workdir`/`user` step wins).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StepDefaults {
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub envs: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rendered {
    pub dockerfile: String,
    pub runtime: StepDefaults,
    /// Set when a `skip_cache` step is present: pass a unique value for this
    /// build arg to bypass the layer cache for the steps after it.
    pub cache_bust_arg: Option<String>,
    /// Every context path a `copy`/`copy_items` step reads, in order.
    pub context_refs: Vec<String>,
}

/// Inputs besides the steps.
#[derive(Debug, Clone)]
pub struct RenderInput<'a> {
    pub base_image: &'a str,
    pub steps: &'a [Value],
    pub build_envs: &'a BTreeMap<String, String>,
    pub runtime_envs: &'a BTreeMap<String, String>,
}

static EMPTY: BTreeMap<String, String> = BTreeMap::new();

impl Default for RenderInput<'_> {
    fn default() -> Self {
        RenderInput {
            base_image: "",
            steps: &[],
            build_envs: &EMPTY,
            runtime_envs: &EMPTY,
        }
    }
}

pub fn render(input: &RenderInput<'_>) -> Result<Rendered, RenderError> {
    let base = input.base_image;
    if base.is_empty() || base.contains(char::is_whitespace) || base.contains('$') {
        return Err(RenderError::Base(format!(
            "{base:?} must be a single image reference without variables"
        )));
    }
    let mut out = String::new();
    writeln!(out, "FROM {base}").unwrap();
    for (name, value) in input.build_envs {
        check_env("build", name, value)?;
        writeln!(out, "ARG {name}={}", dockerfile_quote(value)).unwrap();
    }
    let mut rendered = Rendered {
        dockerfile: String::new(),
        runtime: StepDefaults::default(),
        cache_bust_arg: None,
        context_refs: vec![],
    };
    for (index, step) in input.steps.iter().enumerate() {
        with_step(index, step, |s| render_step(s, &mut out, &mut rendered))?;
    }
    for (name, value) in input.runtime_envs {
        check_env("runtime", name, value)?;
        writeln!(out, "ENV {name}={}", dockerfile_quote(value)).unwrap();
        rendered.runtime.envs.insert(name.clone(), value.clone());
    }
    rendered.dockerfile = out;
    Ok(rendered)
}

struct Step<'a> {
    index: usize,
    action: &'a str,
    v: &'a Value,
}

impl Step<'_> {
    fn err(&self, message: impl Into<String>) -> RenderError {
        RenderError::Step {
            index: self.index,
            action: if self.action.is_empty() {
                "?".into()
            } else {
                self.action.into()
            },
            message: message.into(),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>, RenderError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.err(format!("{key} must be a string"))),
        }
    }

    fn str(&self, key: &str) -> Result<&str, RenderError> {
        match self.opt_str(key)? {
            Some(s) if !s.is_empty() => Ok(s),
            _ => Err(self.err(format!("{key} is required"))),
        }
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool, RenderError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(self.err(format!("{key} must be a boolean"))),
        }
    }

    fn packages(&self) -> Result<String, RenderError> {
        let list = self
            .v
            .get("packages")
            .and_then(Value::as_array)
            .ok_or_else(|| self.err("packages must be a list"))?;
        if list.is_empty() {
            return Err(self.err("packages is empty"));
        }
        let mut words = vec![];
        for p in list {
            let p = p
                .as_str()
                .filter(|p| !p.is_empty())
                .ok_or_else(|| self.err("each package must be a non-empty string"))?;
            if p.starts_with('-') {
                return Err(self.err(format!("package {p:?} looks like an option")));
            }
            no_newline(self, p)?;
            words.push(shell_quote(p));
        }
        Ok(words.join(" "))
    }
}

fn no_newline(s: &Step<'_>, v: &str) -> Result<(), RenderError> {
    if v.contains(['\n', '\r', '\0']) {
        Err(s.err(format!("{v:?} contains a newline or NUL")))
    } else {
        Ok(())
    }
}

fn check_env(kind: &'static str, name: &str, value: &str) -> Result<(), RenderError> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let err = |message: &str| RenderError::Env {
        kind,
        name: name.into(),
        message: message.into(),
    };
    if !ok {
        return Err(err("names are [A-Za-z_][A-Za-z0-9_]*"));
    }
    if value.contains(['\n', '\r', '\0']) {
        return Err(err("value contains a newline or NUL"));
    }
    Ok(())
}

/// A double-quoted Dockerfile word for `ARG`/`ENV` values: `\`, `"` and `$`
/// escaped so the engine stores the value literally.
pub fn dockerfile_quote(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        if matches!(c, '\\' | '"' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Escapes Dockerfile variable expansion (`$`, `\`) in a bare argument.
fn dockerfile_literal(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '\\' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A `RUN` line: shell form, or the exec form `["/bin/sh","-c",…]` when the
/// command cannot sit on one Dockerfile line.
fn run_line(out: &mut String, cmd: &str) {
    let trimmed = cmd.trim_end();
    if cmd.contains(['\n', '\r']) || trimmed.ends_with('\\') || trimmed.starts_with('[') {
        let json = serde_json::to_string(&["/bin/sh", "-c", cmd]).unwrap();
        writeln!(out, "RUN {json}").unwrap();
    } else {
        writeln!(out, "RUN {cmd}").unwrap();
    }
}

fn mode_of(s: &Step<'_>, v: &Value, key: &str) -> Result<Option<String>, RenderError> {
    let m = match v.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(m)) => u32::from_str_radix(m, 8).ok(),
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Some(_) => None,
    };
    match m {
        Some(m) => Ok(Some(format!("{:04o}", m & 0o7777))),
        None => Err(s.err(format!("{key} must be an octal mode like \"0755\""))),
    }
}

fn user_of<'a>(s: &Step<'_>, v: &'a Value, key: &str) -> Result<Option<&'a str>, RenderError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(u)) if valid_user(u) => Ok(Some(u)),
        Some(_) => Err(s.err(format!(
            "{key} must be a user name or uid[:group] ([A-Za-z0-9._-])"
        ))),
    }
}

fn valid_user(u: &str) -> bool {
    !u.is_empty()
        && !u.starts_with('-')
        && u.split(':').count() <= 2
        && u.split(':').all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        })
}

fn sources_of(s: &Step<'_>, v: &Value) -> Result<Vec<String>, RenderError> {
    let raw = v.get("sources").or_else(|| v.get("src"));
    let list: Vec<&Value> = match raw {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(v @ Value::String(_)) => vec![v],
        _ => return Err(s.err("sources must be a list of context paths")),
    };
    if list.is_empty() {
        return Err(s.err("sources is empty"));
    }
    let mut out = vec![];
    for src in list {
        let src = src
            .as_str()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| s.err("each source must be a non-empty string"))?;
        no_newline(s, src)?;
        let clean = src.trim_start_matches("./");
        if clean.starts_with('/') || clean.split('/').any(|c| c == "..") {
            return Err(s.err(format!(
                "source {src:?} must be a relative path inside the build context"
            )));
        }
        out.push(clean.to_string());
    }
    Ok(out)
}

fn copy_line(
    s: &Step<'_>,
    out: &mut String,
    item: &Value,
    refs: &mut Vec<String>,
) -> Result<(), RenderError> {
    let sources = sources_of(s, item)?;
    let dst = item
        .get("dst")
        .or_else(|| item.get("dest"))
        .and_then(Value::as_str)
        .filter(|d| !d.is_empty())
        .ok_or_else(|| s.err("dst is required"))?;
    no_newline(s, dst)?;
    let user = user_of(s, item, "user")?;
    let mode = mode_of(s, item, "mode")?;
    out.push_str("COPY");
    if let Some(u) = user {
        write!(out, " --chown={u}").unwrap();
    }
    if let Some(m) = mode {
        write!(out, " --chmod={m}").unwrap();
    }
    let mut words: Vec<&str> = sources.iter().map(String::as_str).collect();
    words.push(dst);
    if words.iter().any(|w| {
        w.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') || w.starts_with('[')
    }) {
        // Engines run each JSON element through the Dockerfile word lexer
        // too (quotes and `$`), so those are backslash-escaped as well.
        let escaped: Vec<String> = words
            .iter()
            .map(|w| {
                let mut o = String::new();
                for c in w.chars() {
                    if matches!(c, '\\' | '$' | '\'' | '"') {
                        o.push('\\');
                    }
                    o.push(c);
                }
                o
            })
            .collect();
        writeln!(out, " {}", serde_json::to_string(&escaped).unwrap()).unwrap();
    } else {
        for w in &words {
            write!(out, " {}", dockerfile_literal(w)).unwrap();
        }
        out.push('\n');
    }
    refs.extend(sources);
    Ok(())
}

fn path_word(s: &Step<'_>, key: &str) -> Result<String, RenderError> {
    let p = s.str(key)?;
    no_newline(s, p)?;
    if p.starts_with('-') {
        return Err(s.err(format!("{key} {p:?} looks like an option")));
    }
    Ok(shell_quote(p))
}

/// The shell command a shell-rendered action runs (`apt_install`,
/// `pip_install`, `npm_install`, `bun_install`, `git_clone`, `remove`,
/// `rename`, `make_dir`, `make_symlink`): exactly the text after `RUN ` in
/// the Dockerfile [`render`] writes. `None` for every other action (`run`,
/// `copy`, `workdir`, …), which are not a fixed shell line. The native build
/// backend runs these lines in the build VM, so both backends share one
/// rendering.
pub fn step_shell(index: usize, step: &Value) -> Result<Option<String>, RenderError> {
    with_step(index, step, shell_step)
}

/// Runs `f` on step `index` of a request, which must be a JSON object.
fn with_step<T>(
    index: usize,
    step: &Value,
    f: impl FnOnce(&Step<'_>) -> Result<T, RenderError>,
) -> Result<T, RenderError> {
    let action = step.get("action").and_then(Value::as_str).unwrap_or("");
    let s = Step {
        index,
        action,
        v: step,
    };
    if !step.is_object() {
        return Err(s.err("a step must be an object"));
    }
    f(&s)
}

fn shell_step(s: &Step<'_>) -> Result<Option<String>, RenderError> {
    let cmd = match s.action {
        "apt_install" => {
            let p = s.packages()?;
            format!("apt-get update && apt-get install -y {p} && rm -rf /var/lib/apt/lists/*")
        }
        "pip_install" => {
            let p = s.packages()?;
            // `g` is sent only when false: absent means system-wide.
            let user = if s.bool("g", true)? { "" } else { "--user " };
            format!("pip install {user}--no-cache-dir {p}")
        }
        "npm_install" => {
            let p = s.packages()?;
            let g = if s.bool("g", false)? { "-g " } else { "" };
            format!("npm install {g}{p}")
        }
        "bun_install" => {
            let p = s.packages()?;
            let g = if s.bool("g", false)? { "--global " } else { "" };
            format!("bun add {g}{p}")
        }
        "git_clone" => {
            let url = s.str("url")?;
            no_newline(s, url)?;
            if url.starts_with('-') {
                return Err(s.err("url looks like an option"));
            }
            let path = s.opt_str("path")?.unwrap_or("/workspace");
            no_newline(s, path)?;
            let mut cmd = String::from("git clone");
            if let Some(b) = s.opt_str("branch")? {
                no_newline(s, b)?;
                write!(cmd, " --branch {}", shell_quote(b)).unwrap();
            }
            match s.v.get("depth") {
                None | Some(Value::Null) => {}
                Some(d) => {
                    let d = d
                        .as_u64()
                        .filter(|d| *d > 0)
                        .ok_or_else(|| s.err("depth must be a positive integer"))?;
                    write!(cmd, " --depth {d}").unwrap();
                }
            }
            write!(cmd, " -- {} {}", shell_quote(url), shell_quote(path)).unwrap();
            cmd
        }
        "remove" => {
            let p = path_word(s, "path")?;
            let flags = match (s.bool("recursive", false)?, s.bool("force", false)?) {
                (true, true) => "-rf ",
                (true, false) => "-r ",
                (false, true) => "-f ",
                (false, false) => "",
            };
            format!("rm {flags}{p}")
        }
        "rename" => {
            let (src, dst) = (path_word(s, "src")?, path_word(s, "dst")?);
            let f = if s.bool("force", false)? { "-f " } else { "" };
            format!("mv {f}{src} {dst}")
        }
        "make_dir" => {
            let p = path_word(s, "path")?;
            match mode_of(s, s.v, "mode")? {
                Some(m) => format!("mkdir -p {p} && chmod {m} {p}"),
                None => format!("mkdir -p {p}"),
            }
        }
        "make_symlink" => {
            let (target, path) = (path_word(s, "target")?, path_word(s, "path")?);
            format!("ln -s {target} {path}")
        }
        _ => return Ok(None),
    };
    Ok(Some(cmd))
}

fn render_step(s: &Step<'_>, out: &mut String, r: &mut Rendered) -> Result<(), RenderError> {
    if let Some(cmd) = shell_step(s)? {
        writeln!(out, "RUN {cmd}").unwrap();
        return Ok(());
    }
    match s.action {
        "run" => {
            let cmd = s.str("command")?;
            if cmd.contains('\0') {
                return Err(s.err("command contains NUL"));
            }
            match user_of(s, s.v, "user")? {
                Some(u) => run_line(
                    out,
                    &format!("su -s /bin/sh -c {} {}", shell_quote(cmd), shell_quote(u)),
                ),
                None => run_line(out, cmd),
            }
        }
        "skip_cache" => {
            if r.cache_bust_arg.is_none() {
                writeln!(out, "ARG {CACHE_BUST_ARG}").unwrap();
                r.cache_bust_arg = Some(CACHE_BUST_ARG.into());
            }
        }
        "copy" => copy_line(s, out, s.v, &mut r.context_refs)?,
        "copy_items" => {
            let items =
                s.v.get("items")
                    .and_then(Value::as_array)
                    .filter(|i| !i.is_empty())
                    .ok_or_else(|| s.err("items must be a non-empty list"))?;
            for item in items {
                if !item.is_object() {
                    return Err(s.err("each item must be an object"));
                }
                copy_line(s, out, item, &mut r.context_refs)?;
            }
        }
        "workdir" => {
            let p = s.str("path")?;
            no_newline(s, p)?;
            if !p.starts_with('/') {
                return Err(s.err("path must be absolute"));
            }
            writeln!(out, "WORKDIR {}", dockerfile_literal(p)).unwrap();
            r.runtime.workdir = Some(p.to_string());
        }
        "user" => {
            let u = s.str("user")?;
            if !valid_user(u) {
                return Err(s.err("user must be a user name or uid[:group] ([A-Za-z0-9._-])"));
            }
            writeln!(out, "USER {u}").unwrap();
            r.runtime.user = Some(u.to_string());
        }
        "" => return Err(s.err("action is required")),
        other => return Err(s.err(format!("unknown action {other:?}"))),
    }
    Ok(())
}
