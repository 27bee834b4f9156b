//! Declarative steps → Dockerfile.
//!
//! The input is the plan's typed steps ([`nullspace_model::build::step::Step`],
//! parsed and checked once by the plan). Each action renders as the spec
//! (§2.2) and the SDK's local `to_dockerfile()` describe, with two
//! deliberate differences in *text*, not meaning:
//!
//! - shell-run actions render [`Step::shell_command`], whose words are
//!   quoted by the one shell quoter (single quotes, only when needed)
//!   instead of the SDK's double quotes, so `$`, backquotes and backslashes
//!   in paths and commands reach the shell literally; the build VM runs the
//!   same lines;
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

use nullspace_model::build::plan::{BuildPlan, Source};
use nullspace_model::build::rules;
use nullspace_model::build::step::{CopyItem, Step};
use nullspace_model::shell::quote as shell_quote;

/// The build arg a `skip_cache` step declares.
pub const CACHE_BUST_ARG: &str = "NULLSPACE_SKIP_CACHE";

/// What cannot be written as a Dockerfile (every step rule is the plan's).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("base image: {0}")]
    Base(String),
    #[error("{kind} env {name:?}: {message}")]
    Env {
        kind: &'static str,
        name: String,
        message: String,
    },
    #[error("a Dockerfile source has no steps to render")]
    NotDeclarative,
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
    pub steps: &'a [Step],
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

/// The Dockerfile a declarative plan runs on an engine: its base, build
/// envs, steps and runtime envs.
pub fn render_plan(plan: &BuildPlan) -> Result<Rendered, RenderError> {
    let base = match &plan.source {
        Source::Image { reference } | Source::Template { reference } => reference,
        Source::Dockerfile { .. } => return Err(RenderError::NotDeclarative),
    };
    render(&RenderInput {
        base_image: base,
        steps: &plan.steps,
        build_envs: &plan.build_envs.0,
        runtime_envs: &plan.runtime.env.0,
    })
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
    for step in input.steps {
        render_step(step, &mut out, &mut rendered);
    }
    for (name, value) in input.runtime_envs {
        check_env("runtime", name, value)?;
        writeln!(out, "ENV {name}={}", dockerfile_quote(value)).unwrap();
        rendered.runtime.envs.insert(name.clone(), value.clone());
    }
    rendered.dockerfile = out;
    Ok(rendered)
}

/// The name rule is the model's; a value must also fit on one Dockerfile
/// line.
fn check_env(kind: &'static str, name: &str, value: &str) -> Result<(), RenderError> {
    let err = |message: String| RenderError::Env {
        kind,
        name: name.into(),
        message,
    };
    rules::env_name(name).map_err(|e| err(e.to_string()))?;
    if value.contains(['\n', '\r', '\0']) {
        return Err(err(
            "the value contains a newline or NUL, which a Dockerfile ARG/ENV line cannot hold"
                .into(),
        ));
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

fn copy_line(out: &mut String, item: &CopyItem, refs: &mut Vec<String>) {
    out.push_str("COPY");
    if let Some(u) = &item.user {
        write!(out, " --chown={u}").unwrap();
    }
    if let Some(m) = item.mode {
        write!(out, " --chmod={m}").unwrap();
    }
    let mut words: Vec<&str> = item.sources.iter().map(String::as_str).collect();
    words.push(&item.dst);
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
    refs.extend(item.sources.iter().cloned());
}

fn render_step(step: &Step, out: &mut String, r: &mut Rendered) {
    match step {
        Step::Run { command, user } => match user {
            Some(u) => run_line(
                out,
                &format!(
                    "su -s /bin/sh -c {} {}",
                    shell_quote(command),
                    shell_quote(u)
                ),
            ),
            None => run_line(out, command),
        },
        Step::SkipCache => {
            if r.cache_bust_arg.is_none() {
                writeln!(out, "ARG {CACHE_BUST_ARG}").unwrap();
                r.cache_bust_arg = Some(CACHE_BUST_ARG.into());
            }
        }
        Step::Copy(_) | Step::CopyItems { .. } => {
            for item in step.copies() {
                copy_line(out, item, &mut r.context_refs);
            }
        }
        Step::Workdir { path } => {
            writeln!(out, "WORKDIR {}", dockerfile_literal(path)).unwrap();
            r.runtime.workdir = Some(path.clone());
        }
        Step::User { user } => {
            writeln!(out, "USER {user}").unwrap();
            r.runtime.user = Some(user.clone());
        }
        // Every other action is one shell line, the build VM's too.
        other => {
            let cmd = other.shell_command().unwrap_or_default();
            writeln!(out, "RUN {cmd}").unwrap();
        }
    }
}
