//! Request validation and normalisation, shared by build, validate, plan and
//! retry, so all four agree. Errors carry a code, a message naming the
//! field and the rule, and a phase.

use std::collections::BTreeSet;

use serde::Serialize;
use serde_json::Value;

use crate::model::BuildRequest;
use crate::refs::{self, TemplateRef};

#[derive(Debug, Clone, Serialize, PartialEq, schemars::JsonSchema)]
pub struct Issue {
    pub code: String,
    pub message: String,
    pub phase: Option<String>,
}

fn issue(code: &str, message: impl Into<String>) -> Issue {
    Issue {
        code: code.into(),
        message: message.into(),
        phase: Some("preflight".into()),
    }
}

/// Limits on request size (beyond the HTTP body limit).
pub const MAX_STEPS: usize = 1000;
pub const MAX_DOCKERFILE_BYTES: usize = 1 << 20;
pub const MAX_CONTEXT_FILES: usize = 100_000;
pub const MAX_TAGS: usize = 32;

/// Where the build's base comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Base {
    Image(String),
    Template(TemplateRef),
    Dockerfile,
}

#[derive(Debug, Clone)]
pub struct Normalized {
    pub name: String,
    pub tags: Vec<String>,
    pub base: Base,
    pub source_type: &'static str,
    pub backend: String,
    pub steps: Vec<Value>,
    pub warnings: Vec<String>,
}

/// The Dockerfile engines this server has (names as in `build_backend`).
#[derive(Debug, Clone, Default)]
pub struct Engines {
    pub available: Vec<String>,
}

/// `[A-Za-z_][A-Za-z0-9_]*`.
pub fn env_key_ok(k: &str) -> bool {
    !k.is_empty()
        && !k.as_bytes()[0].is_ascii_digit()
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A `base_image` that names a template rather than an OCI image: raw ids,
/// the builtin namespace, exact-build qualifiers, or the caller's own
/// namespace.
pub fn classify_base(base: &str, caller_ns: &str) -> Base {
    let looks_template = base.starts_with("tmpl_")
        || base.starts_with("nullspace/")
        || base
            .rsplit_once(':')
            .is_some_and(|(_, q)| q.starts_with("tb_"))
        || base.split_once('/').is_some_and(|(ns, _)| ns == caller_ns);
    match (looks_template, TemplateRef::parse(base)) {
        (true, Ok(r)) => Base::Template(r),
        _ => Base::Image(base.to_string()),
    }
}

const STEP_FIELDS: &[(&str, &[&str])] = &[
    ("apt_install", &["packages"]),
    ("pip_install", &["packages"]),
    ("npm_install", &["packages"]),
    ("bun_install", &["packages"]),
    ("run", &["command"]),
    ("skip_cache", &[]),
    ("copy", &["dst"]),
    ("copy_items", &["items"]),
    ("git_clone", &["url"]),
    ("workdir", &["path"]),
    ("user", &["user"]),
    ("remove", &["path"]),
    ("rename", &["src", "dst"]),
    ("make_dir", &["path"]),
    ("make_symlink", &["target", "path"]),
];

fn check_step(i: usize, step: &Value, out: &mut Vec<Issue>) {
    let at = |m: String| issue("invalid_step", format!("steps[{i}]: {m}"));
    let Some(obj) = step.as_object() else {
        out.push(at("must be an object with an \"action\"".into()));
        return;
    };
    let Some(action) = obj.get("action").and_then(Value::as_str) else {
        out.push(at("missing \"action\"".into()));
        return;
    };
    let Some((_, required)) = STEP_FIELDS.iter().find(|(a, _)| *a == action) else {
        let known: Vec<&str> = STEP_FIELDS.iter().map(|(a, _)| *a).collect();
        out.push(at(format!(
            "unknown action {action:?} (known: {})",
            known.join(", ")
        )));
        return;
    };
    for f in *required {
        match obj.get(*f) {
            None | Some(Value::Null) => out.push(at(format!("{action}: \"{f}\" is required"))),
            Some(Value::String(s)) if s.trim().is_empty() => {
                out.push(at(format!("{action}: \"{f}\" must not be empty")))
            }
            Some(Value::Array(a)) if a.is_empty() => {
                out.push(at(format!("{action}: \"{f}\" must not be empty")))
            }
            _ => {}
        }
    }
    if action == "copy" && obj.get("sources").or_else(|| obj.get("src")).is_none() {
        out.push(at("copy: \"sources\" is required".into()));
    }
    if let Some(m) = obj.get("mode").and_then(Value::as_str)
        && (m.is_empty() || m.len() > 4 || !m.bytes().all(|b| (b'0'..=b'7').contains(&b)))
    {
        out.push(at(format!("{action}: mode {m:?} is not an octal mode")));
    }
}

fn check_readiness(r: &Value, out: &mut Vec<Issue>) {
    let bad = |m: String| {
        issue(
            "invalid_readiness",
            format!("runtime_config.readiness: {m}"),
        )
    };
    let Some(obj) = r.as_object() else {
        out.push(bad("must be an object".into()));
        return;
    };
    let int = |k: &str| obj.get(k).and_then(Value::as_i64);
    for k in [
        "timeout_secs",
        "interval_ms",
        "startup_grace_secs",
        "timeout_ms",
    ] {
        if let Some(v) = obj.get(k)
            && !v.as_i64().is_some_and(|n| (0..=86_400_000).contains(&n))
        {
            out.push(bad(format!("{k} must be a non-negative integer")));
        }
    }
    let port_ok = |out: &mut Vec<Issue>| match int("port") {
        Some(p) if (1..=65535).contains(&p) => {}
        _ => out.push(bad("an explicit port 1-65535 is required".into())),
    };
    match obj.get("kind").and_then(Value::as_str) {
        Some("tcp") => port_ok(out),
        Some("http") => {
            port_ok(out);
            // The probe runs inside the VM against localhost: only a path.
            let path = obj.get("path").and_then(Value::as_str).unwrap_or("/");
            if !path.starts_with('/')
                || path.contains(['?', '#'])
                || path.contains(char::is_whitespace)
            {
                out.push(bad(format!(
                    "http path {path:?} must start with '/' and have no query or fragment"
                )));
            }
            if let Some(h) = obj.get("host").and_then(Value::as_str)
                && !["localhost", "127.0.0.1", "0.0.0.0"].contains(&h)
            {
                out.push(bad(format!(
                    "http probes may only target localhost, not {h:?}"
                )));
            }
        }
        Some("command") => {
            if obj
                .get("command")
                .and_then(Value::as_str)
                .is_none_or(|c| c.trim().is_empty())
            {
                out.push(bad("command probes need a non-empty \"command\"".into()));
            }
        }
        Some("timeout") => {
            if int("timeout_ms").is_none() {
                out.push(bad("timeout probes need \"timeout_ms\"".into()));
            }
        }
        other => out.push(bad(format!(
            "kind {other:?} is not one of tcp, http, command, timeout"
        ))),
    }
}

fn check_auth(v: &Value, what: &str, out: &mut Vec<Issue>) {
    let bad = |m: &str| issue("invalid_auth", format!("{what}: {m}"));
    let s = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .filter(|x| !x.trim().is_empty())
    };
    match v.get("kind").and_then(Value::as_str) {
        Some("basic") => {
            if s("username").is_none() || s("password").is_none() {
                out.push(bad("basic auth needs username and password"));
            }
        }
        Some("aws_ecr") => {
            if s("access_key_id").is_none()
                || s("secret_access_key").is_none()
                || s("region").is_none()
            {
                out.push(bad(
                    "aws_ecr auth needs access_key_id, secret_access_key and region",
                ));
            }
        }
        Some("gcp_artifact_registry") => {
            if v.get("service_account_json")
                .and_then(Value::as_object)
                .is_none_or(|o| o.is_empty())
            {
                out.push(bad(
                    "gcp_artifact_registry auth needs a non-empty service_account_json object",
                ));
            }
        }
        _ => out.push(bad("kind must be basic, gcp_artifact_registry or aws_ecr")),
    }
}

/// Validates and normalises a request. `Err` lists every problem found.
pub fn normalize(
    req: &BuildRequest,
    caller_ns: &str,
    engines: &Engines,
) -> Result<Normalized, Vec<Issue>> {
    let mut errs = Vec::new();
    let mut warnings = Vec::new();

    let name = req.name.clone().or_else(|| req.alias.clone());
    if let Some(n) = &name
        && let Err(m) = refs::check_name("name", n)
    {
        errs.push(issue("invalid_name", m));
    }
    let tags = match &req.tags {
        None => vec!["default".to_string()],
        Some(t) if t.is_empty() => {
            errs.push(issue(
                "invalid_tags",
                "tags: an explicit empty list is invalid (omit it for [\"default\"])",
            ));
            vec![]
        }
        Some(t) => {
            if t.len() > MAX_TAGS {
                errs.push(issue("invalid_tags", format!("tags: at most {MAX_TAGS}")));
            }
            for tag in t {
                if let Err(m) = refs::check_tag(tag) {
                    errs.push(issue("invalid_tags", m));
                }
            }
            let set: BTreeSet<&String> = t.iter().collect();
            set.into_iter().cloned().collect()
        }
    };

    let steps = req.steps.clone().unwrap_or_default();
    let base = match (&req.base_image, &req.dockerfile) {
        (Some(_), Some(_)) => {
            errs.push(issue(
                "invalid_source",
                "exactly one source: base_image or dockerfile, not both",
            ));
            None
        }
        (None, None) => {
            errs.push(issue(
                "invalid_source",
                "a build needs a source: base_image (with optional steps) or dockerfile",
            ));
            None
        }
        (Some(b), None) => {
            if b.trim().is_empty() || b.len() > 512 {
                errs.push(issue(
                    "invalid_source",
                    "base_image must be a non-empty reference of at most 512 bytes",
                ));
                None
            } else {
                Some(classify_base(b.trim(), caller_ns))
            }
        }
        (None, Some(d)) => {
            if d.trim().is_empty() {
                errs.push(issue("invalid_source", "dockerfile is empty"));
            }
            if d.len() > MAX_DOCKERFILE_BYTES {
                errs.push(issue(
                    "invalid_source",
                    format!("dockerfile exceeds {MAX_DOCKERFILE_BYTES} bytes"),
                ));
            }
            if !steps.is_empty() {
                errs.push(issue(
                    "invalid_source",
                    "steps cannot be combined with a dockerfile",
                ));
            }
            Some(Base::Dockerfile)
        }
    };
    if steps.len() > MAX_STEPS {
        errs.push(issue("invalid_step", format!("at most {MAX_STEPS} steps")));
    }
    for (i, s) in steps.iter().enumerate() {
        check_step(i, s, &mut errs);
    }

    let backend =
        match req.build_backend.as_deref() {
            None if base == Some(Base::Dockerfile) => engines
                .available
                .first()
                .cloned()
                .unwrap_or_else(|| "buildkit".into()),
            None => "native".into(),
            Some("native") => {
                if base == Some(Base::Dockerfile) {
                    errs.push(issue(
                        "invalid_backend",
                        "build_backend native cannot build a dockerfile (use buildkit or omit it)",
                    ));
                }
                "native".into()
            }
            Some(b @ ("buildkit" | "buildah")) => {
                if !engines.available.iter().any(|e| e == b) {
                    errs.push(issue(
                    "backend_unavailable",
                    format!(
                        "build_backend {b} is not available on this server (available: native{})",
                        engines.available.iter().map(|e| format!(", {e}")).collect::<String>()
                    ),
                ));
                }
                b.to_string()
            }
            Some(other) => {
                errs.push(issue(
                    "invalid_backend",
                    format!("build_backend {other:?} is not one of native, buildkit, buildah"),
                ));
                other.to_string()
            }
        };

    if let Some(secrets) = &req.build_secrets {
        let mut seen = BTreeSet::new();
        for s in secrets {
            if s.id.is_empty()
                || !s
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                errs.push(issue(
                    "invalid_secret",
                    format!("build_secrets: id {:?} must match [A-Za-z0-9._-]+", s.id),
                ));
            }
            if !seen.insert(s.id.clone()) {
                errs.push(issue(
                    "invalid_secret",
                    format!("build_secrets: duplicate id {:?}", s.id),
                ));
            }
            if s.value.is_none() {
                errs.push(issue(
                    "invalid_secret",
                    format!("build_secrets: {:?} has no value", s.id),
                ));
            }
            if let Some(src) = &s.source
                && !["value", "env", "file"].contains(&src.as_str())
            {
                errs.push(issue(
                    "invalid_secret",
                    format!(
                        "build_secrets: {:?} source must be value, env or file",
                        s.id
                    ),
                ));
            }
        }
        if !secrets.is_empty() && backend == "native" {
            errs.push(issue(
                "invalid_secret",
                "build_secrets need a Dockerfile engine backend; native builds reject them",
            ));
        }
    }
    if let Some(a) = &req.base_image_auth {
        check_auth(a, "base_image_auth", &mut errs);
        if matches!(base, Some(Base::Template(_))) {
            errs.push(issue(
                "invalid_auth",
                "base_image_auth applies to OCI images, not template bases",
            ));
        }
    }
    if let Some(ra) = &req.registry_auth {
        for (i, entry) in ra.iter().enumerate() {
            if entry
                .get("registry")
                .and_then(Value::as_str)
                .is_none_or(|r| r.is_empty())
            {
                errs.push(issue(
                    "invalid_auth",
                    format!("registry_auth[{i}]: registry is required"),
                ));
            }
            match entry.get("auth") {
                Some(a) => check_auth(a, &format!("registry_auth[{i}].auth"), &mut errs),
                None => errs.push(issue(
                    "invalid_auth",
                    format!("registry_auth[{i}]: auth is required"),
                )),
            }
        }
    }
    if let Some(rc) = &req.runtime_config {
        for k in rc.default_envs.iter().flat_map(|m| m.keys()) {
            if !env_key_ok(k) {
                errs.push(issue(
                    "invalid_env",
                    format!("runtime_config.default_envs: {k:?} is not a valid variable name"),
                ));
            }
        }
        if let Some(u) = &rc.default_user
            && nullspace_oci::config::UserSpec::parse(u).is_none()
        {
            errs.push(issue("invalid_user", format!("runtime_config.default_user {u:?} is not user, uid, user:group, user:gid, uid:group or uid:gid")));
        }
        if let Some(w) = &rc.default_workdir
            && !w.starts_with('/')
        {
            errs.push(issue(
                "invalid_workdir",
                format!("runtime_config.default_workdir {w:?} must be absolute"),
            ));
        }
        if let Some(r) = &rc.readiness {
            check_readiness(r, &mut errs);
        }
    }
    for k in req.build_envs.iter().flat_map(|m| m.keys()) {
        if !env_key_ok(k) {
            errs.push(issue(
                "invalid_env",
                format!("build_envs: {k:?} is not a valid variable name"),
            ));
        }
    }
    if let Some(c) = &req.build_config {
        if c.vcpus.is_some_and(|v| !(1..=32).contains(&v)) {
            errs.push(issue(
                "invalid_build_config",
                "build_config.vcpus must be 1-32",
            ));
        }
        if c.memory_mib.is_some_and(|v| !(128..=65536).contains(&v)) {
            errs.push(issue(
                "invalid_build_config",
                "build_config.memory_mib must be 128-65536",
            ));
        }
        if c.disk_mb.is_some_and(|v| !(513..=1_048_576).contains(&v)) {
            errs.push(issue(
                "invalid_build_config",
                "build_config.disk_mb must be 513-1048576",
            ));
        }
    }
    if let Some(ctx) = &req.build_context {
        if ctx.files.len() > MAX_CONTEXT_FILES {
            errs.push(issue(
                "invalid_context",
                format!("build_context: at most {MAX_CONTEXT_FILES} files"),
            ));
        }
        for f in &ctx.files {
            let p = &f.path;
            if p.is_empty()
                || p.starts_with('/')
                || p.split('/').any(|c| c.is_empty() || c == "." || c == "..")
                || p.contains('\0')
            {
                errs.push(issue(
                    "invalid_context",
                    format!(
                        "build_context: path {p:?} must be relative and stay inside the context"
                    ),
                ));
            }
            match f.entry_type.as_str() {
                "dir" => {}
                "file" => {
                    if f.blob_id.is_none() && f.content_base64.is_none() {
                        errs.push(issue("file_upload_error", format!("build_context: {p:?} has neither blob_id nor content_base64 (run the blob preflight)")));
                    }
                }
                other => errs.push(issue("invalid_context", format!("build_context: {p:?} entry_type {other:?} is not file or dir (symlinks and special files are rejected)"))),
            }
        }
    }
    if req.skip_cache == Some(true) {
        warnings.push("skip_cache: the whole build cache is bypassed".to_string());
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    let base = base.expect("a source exists when there are no errors");
    let source_type = match (&base, steps.is_empty()) {
        (Base::Dockerfile, _) => "dockerfile",
        (_, false) => "declarative",
        (Base::Template(_), true) => "template_base",
        (Base::Image(_), true) => "oci_import",
    };
    let name = name.unwrap_or_else(|| nullspace_store::new_id("t-").replace('_', "-"));
    Ok(Normalized {
        name,
        tags,
        base,
        source_type,
        backend,
        steps,
        warnings,
    })
}
