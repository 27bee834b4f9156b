//! The build plan: a request normalised once, with every rule checked.
//!
//! [`plan`] is the only place a [`BuildRequest`] is interpreted. Its
//! [`BuildPlan`] is what `validate` reports on, what `POST
//! /v1/templates/plan` serialises ([`PlanResponse`]), what the executor
//! runs (routing on [`BuildPlan::route`]) and what the CLI's `--dry-run`
//! prints; the digests a build record carries are the plan's
//! ([`Digests`]), computed here and nowhere else.

use std::collections::{BTreeMap, BTreeSet};

use nullspace_digest::Digest;
use serde::{Deserialize, Serialize};

use super::context::{ContextError, ContextManifest};
use super::probe::Readiness;
use super::request::{BuildRequest, Credentials, RegistryAuth};
use super::rules;
use super::status::{Backend, ErrorCode, FailurePhase, RecordBackend, SecretSource, SourceType};
use super::step::{self, Step};
use crate::refs;

/// Limits on a request (beyond the HTTP body limit).
pub const MAX_STEPS: usize = 1000;
pub const MAX_DOCKERFILE_BYTES: usize = 1 << 20;
pub const MAX_CONTEXT_FILES: usize = 100_000;
pub const MAX_TAGS: usize = 32;
pub const MAX_BASE_IMAGE_BYTES: usize = 512;
/// The tag a build gets when the request names none.
pub const DEFAULT_TAG: &str = "default";
/// Build VM size when `build_config` does not say.
pub const DEFAULT_VCPUS: u32 = 2;
pub const DEFAULT_MEMORY_MIB: u32 = 512;

/// One problem with a request (`POST /v1/templates/validate` `errors[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Issue {
    pub code: ErrorCode,
    pub message: String,
    pub phase: Option<FailurePhase>,
}

fn issue(code: ErrorCode, message: impl Into<String>) -> Issue {
    Issue {
        code,
        message: message.into(),
        phase: Some(FailurePhase::Preflight),
    }
}

/// `POST /v1/templates/validate`: always answered; problems are in `errors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ValidateResult {
    pub valid: bool,
    pub errors: Vec<Issue>,
    pub warnings: Vec<String>,
}

impl ValidateResult {
    pub fn of(result: &Result<BuildPlan, Vec<Issue>>) -> ValidateResult {
        match result {
            Ok(p) => ValidateResult {
                valid: true,
                errors: vec![],
                warnings: p.warnings.clone(),
            },
            Err(issues) => ValidateResult {
                valid: false,
                errors: issues.clone(),
                warnings: vec![],
            },
        }
    }
}

/// What the plan depends on besides the request.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanContext<'a> {
    /// The caller's namespace: `ns/name` bases in it are templates.
    /// `None` on the client side, where only `tmpl_…`, `nullspace/…` and
    /// `:tb_…` refs are known to be templates.
    pub namespace: Option<&'a str>,
    /// The Dockerfile engines the server has, the default first. `None` on
    /// the client side: any engine is accepted, a Dockerfile defaults to
    /// `buildkit`.
    pub engines: Option<&'a [Backend]>,
}

/// Where the build's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// An OCI image (a registry reference).
    Image { reference: String },
    /// A template's artifact (`tmpl_…`, `nullspace/…`, `…:tb_…` or the
    /// caller's `ns/name`).
    Template { reference: String },
    /// A Dockerfile, built by a Dockerfile engine.
    Dockerfile {
        /// The text (not serialised: `digest` names it).
        #[serde(skip)]
        text: String,
        digest: String,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        build_args: BTreeMap<String, String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        target: Option<String>,
    },
}

impl Source {
    /// The base image or template reference (`None` for a Dockerfile).
    pub fn base_ref(&self) -> Option<&str> {
        match self {
            Source::Image { reference } | Source::Template { reference } => Some(reference),
            Source::Dockerfile { .. } => None,
        }
    }
}

/// How the executor builds the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// Resolve the base (import an image, or take a template's artifact).
    Import,
    /// Resolve the base, then run the steps in the build VM.
    NativeSteps,
    /// Build a Dockerfile (given, or rendered from the steps) with an
    /// engine and import its output.
    Engine,
}

/// Environment variables whose values are kept for the executor but never
/// shown: they serialise as their sorted names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvVars(pub BTreeMap<String, String>);

impl Serialize for EnvVars {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.keys())
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for EnvVars {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "EnvNames".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "array", "items": {"type": "string"}, "description": "variable names (values are never shown)"})
    }
}

/// The template's runtime settings the request sets; they override the
/// base image's (and the steps') defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RuntimeSettings {
    pub env: EnvVars,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub start_cmd: Option<String>,
    pub readiness: Option<Readiness>,
}

/// The build VM (and engine) settings, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct VmSettings {
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Minimum root filesystem size.
    pub disk_mb: Option<u64>,
    /// `build_config.internet_access` (default true); the operator still
    /// decides whether build VMs have a network at all.
    pub internet_access: bool,
    /// The sizes machines of the template may take ([`crate::size`]).
    pub ceiling: Option<crate::size::Ceiling>,
}

/// The content digests of the build's inputs (`sha256:…`), the same in
/// the plan and in the build record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Digests {
    /// Everything that decides the template's content: the source, steps,
    /// build envs, start command, runtime settings and context digest.
    /// Names, tags, credentials and VM size are not part of it.
    pub source_digest: String,
    /// The Dockerfile text, for Dockerfile builds.
    pub dockerfile_digest: Option<String>,
    /// [`ContextManifest::compute_digest`], when there is a context.
    pub context_digest: Option<String>,
}

/// What decides whether an earlier build's artifact can be reused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CacheInputs {
    /// `skip_cache`: bypass every cache.
    pub skip_cache: bool,
    /// Digest of the final-artifact inputs: the source digest, the
    /// backend, the disk size, network access and the secret ids. The
    /// server adds the resolved base digests where it has them.
    pub final_artifact_inputs: String,
}

/// A request, normalised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BuildPlan {
    /// `name` (or `alias`); `None`: the server picks one.
    pub name: Option<String>,
    /// Distinct, sorted; `["default"]` when the request names none.
    pub tags: Vec<String>,
    pub source: Source,
    pub source_type: SourceType,
    pub backend: Backend,
    pub route: Route,
    /// The request's steps, in order; a log entry's `step_index` is the
    /// 1-based position in this list.
    pub steps: Vec<Step>,
    pub build_envs: EnvVars,
    pub runtime: RuntimeSettings,
    /// The build context (serialised in [`PlanResponse`] as a summary).
    #[serde(skip)]
    pub context: Option<ContextManifest>,
    pub vm: VmSettings,
    pub cache: CacheInputs,
    pub digests: Digests,
    /// Ids only; values live in memory for the build's lifetime.
    pub secret_ids: Vec<String>,
    /// `base_image_auth.kind`, when credentials were sent.
    pub base_image_auth: Option<String>,
    /// Registries with request-time credentials.
    pub registry_auth_hosts: Vec<String>,
    pub warnings: Vec<String>,
}

impl BuildPlan {
    /// The number of request steps (`total_steps` in log entries).
    pub fn total_steps(&self) -> usize {
        self.steps.len()
    }

    /// The last `workdir` and `user` the steps set.
    pub fn step_defaults(&self) -> (Option<&str>, Option<&str>) {
        let mut workdir = None;
        let mut user = None;
        for s in &self.steps {
            match s {
                Step::Workdir { path } => workdir = Some(path.as_str()),
                Step::User { user: u } => user = Some(u.as_str()),
                _ => {}
            }
        }
        (workdir, user)
    }

    /// The default user the template will have, as far as the request
    /// says (the base image may add its own).
    pub fn default_user(&self) -> Option<&str> {
        self.runtime.user.as_deref().or(self.step_defaults().1)
    }

    pub fn default_workdir(&self) -> Option<&str> {
        self.runtime.workdir.as_deref().or(self.step_defaults().0)
    }
}

/// Normalises `req` into a plan; `Err` lists every problem found.
pub fn plan(req: &BuildRequest, ctx: &PlanContext<'_>) -> Result<BuildPlan, Vec<Issue>> {
    use ErrorCode as C;
    let mut errs = Vec::new();
    let mut warnings = Vec::new();

    let name = req.name.clone().or_else(|| req.alias.clone());
    if let Some(n) = &name
        && let Err(m) = refs::check_name("name", n)
    {
        errs.push(issue(C::InvalidName, m));
    }
    let tags = match &req.tags {
        None => vec![DEFAULT_TAG.to_string()],
        Some(t) if t.is_empty() => {
            errs.push(issue(
                C::InvalidTags,
                "tags: an explicit empty list is invalid (omit it for [\"default\"])",
            ));
            vec![]
        }
        Some(t) => {
            if t.len() > MAX_TAGS {
                errs.push(issue(C::InvalidTags, format!("tags: at most {MAX_TAGS}")));
            }
            for tag in t {
                if let Err(m) = refs::check_tag(tag) {
                    errs.push(issue(C::InvalidTags, m));
                }
            }
            t.iter()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .cloned()
                .collect()
        }
    };

    let raw_steps = req.steps.as_deref().unwrap_or_default();
    let build_args = req.build_args.clone().unwrap_or_default();
    let source = match (&req.base_image, &req.dockerfile) {
        (Some(_), Some(_)) => {
            errs.push(issue(
                C::InvalidSource,
                "exactly one source: base_image or dockerfile, not both",
            ));
            None
        }
        (None, None) => {
            errs.push(issue(
                C::InvalidSource,
                "a build needs a source: base_image (with optional steps) or dockerfile",
            ));
            None
        }
        (Some(b), None) => {
            let b = b.trim();
            if b.is_empty() || b.len() > MAX_BASE_IMAGE_BYTES {
                errs.push(issue(
                    C::InvalidSource,
                    format!(
                        "base_image must be a non-empty reference of at most {MAX_BASE_IMAGE_BYTES} bytes"
                    ),
                ));
                None
            } else if refs::names_template(b, ctx.namespace).is_some() {
                Some(Source::Template {
                    reference: b.to_string(),
                })
            } else {
                Some(Source::Image {
                    reference: b.to_string(),
                })
            }
        }
        (None, Some(d)) => {
            if d.trim().is_empty() {
                errs.push(issue(C::InvalidSource, "dockerfile is empty"));
            }
            if d.len() > MAX_DOCKERFILE_BYTES {
                errs.push(issue(
                    C::InvalidSource,
                    format!("dockerfile exceeds {MAX_DOCKERFILE_BYTES} bytes"),
                ));
            }
            if !raw_steps.is_empty() {
                errs.push(issue(
                    C::InvalidSource,
                    "steps cannot be combined with a dockerfile",
                ));
            }
            Some(Source::Dockerfile {
                text: d.clone(),
                digest: Digest::sha256_of(d.as_bytes()).to_string(),
                build_args: build_args.clone(),
                target: req.target.clone(),
            })
        }
    };
    let is_dockerfile = matches!(source, Some(Source::Dockerfile { .. }));
    let steps = if raw_steps.len() > MAX_STEPS {
        errs.push(issue(C::InvalidStep, format!("at most {MAX_STEPS} steps")));
        vec![]
    } else {
        match step::parse_all(raw_steps) {
            Ok(s) => s,
            Err(es) => {
                errs.extend(es.into_iter().map(|e| issue(C::InvalidStep, e.to_string())));
                vec![]
            }
        }
    };

    let engines_text = || {
        ctx.engines
            .unwrap_or_default()
            .iter()
            .map(|e| format!(", {e}"))
            .collect::<String>()
    };
    let backend = match req.build_backend.as_deref() {
        None if is_dockerfile => ctx
            .engines
            .and_then(|e| e.first().copied())
            .unwrap_or(Backend::Buildkit),
        None => Backend::Native,
        Some(b) => match Backend::parse(b) {
            Some(Backend::Native) => {
                if is_dockerfile {
                    errs.push(issue(
                        C::InvalidBackend,
                        "build_backend native cannot build a dockerfile (use buildkit or omit it)",
                    ));
                }
                Backend::Native
            }
            Some(engine) => {
                if ctx.engines.is_some_and(|e| !e.contains(&engine)) {
                    errs.push(issue(
                        C::BackendUnavailable,
                        format!(
                            "build_backend {engine} is not available on this server (available: native{})",
                            engines_text()
                        ),
                    ));
                }
                engine
            }
            None => {
                errs.push(issue(
                    C::InvalidBackend,
                    format!("build_backend {b:?} is not one of native, buildkit, buildah"),
                ));
                Backend::Native
            }
        },
    };

    let mut secret_ids = vec![];
    if let Some(secrets) = &req.build_secrets {
        let mut seen = BTreeSet::new();
        for s in secrets {
            if let Err(e) = rules::secret_id(&s.id) {
                errs.push(issue(C::InvalidSecret, format!("build_secrets: {e}")));
            }
            if !seen.insert(s.id.clone()) {
                errs.push(issue(
                    C::InvalidSecret,
                    format!("build_secrets: duplicate id {:?}", s.id),
                ));
            }
            if s.value.is_none() {
                errs.push(issue(
                    C::InvalidSecret,
                    format!("build_secrets: {:?} has no value", s.id),
                ));
            }
            if let Some(src) = &s.source
                && SecretSource::parse(src).is_none()
            {
                errs.push(issue(
                    C::InvalidSecret,
                    format!(
                        "build_secrets: {:?} source must be value, env or file",
                        s.id
                    ),
                ));
            }
            secret_ids.push(s.id.clone());
        }
        if !secrets.is_empty() && backend == Backend::Native {
            errs.push(issue(
                C::InvalidSecret,
                "build_secrets need a Dockerfile engine backend; native builds reject them",
            ));
        }
    }
    let base_image_auth = match &req.base_image_auth {
        None => None,
        Some(a) => {
            if let Err(m) = Credentials::parse(a) {
                errs.push(issue(C::InvalidAuth, format!("base_image_auth: {m}")));
            }
            if matches!(source, Some(Source::Template { .. })) {
                errs.push(issue(
                    C::InvalidAuth,
                    "base_image_auth applies to OCI images, not template bases",
                ));
            }
            a.get("kind")
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
        }
    };
    let mut registry_auth_hosts = vec![];
    for (i, entry) in req.registry_auth.iter().flatten().enumerate() {
        match RegistryAuth::parse(entry) {
            Ok(a) => registry_auth_hosts.push(a.registry),
            Err(m) => errs.push(issue(C::InvalidAuth, format!("registry_auth[{i}]: {m}"))),
        }
    }

    let rc = req.runtime_config.clone().unwrap_or_default();
    let runtime_env = rc.default_envs.clone().unwrap_or_default();
    if let Err(e) = rules::envs(&runtime_env) {
        errs.push(issue(
            C::InvalidEnv,
            format!("runtime_config.default_envs: {e}"),
        ));
    }
    let user = rc.default_user.clone().filter(|u| !u.trim().is_empty());
    if let Some(u) = &user
        && let Err(e) = rules::user(u)
    {
        errs.push(issue(
            C::InvalidUser,
            format!("runtime_config.default_user: {e}"),
        ));
    }
    let workdir = rc.default_workdir.clone().filter(|w| !w.trim().is_empty());
    if let Some(w) = &workdir
        && rules::absolute(w).is_err()
    {
        errs.push(issue(
            C::InvalidWorkdir,
            format!("runtime_config.default_workdir {w:?} must be absolute"),
        ));
    }
    let readiness = match &rc.readiness {
        None => None,
        Some(r) => match Readiness::parse(r) {
            Ok(r) => Some(r),
            Err(e) => {
                errs.push(issue(
                    C::InvalidReadiness,
                    format!("runtime_config.readiness: {e}"),
                ));
                None
            }
        },
    };
    let build_envs = req.build_envs.clone().unwrap_or_default();
    if let Err(e) = rules::envs(&build_envs) {
        errs.push(issue(C::InvalidEnv, format!("build_envs: {e}")));
    }

    let c = req.build_config.clone().unwrap_or_default();
    let in_range = |v: Option<i64>, lo: i64, hi: i64, what: &str, errs: &mut Vec<Issue>| {
        if v.is_some_and(|v| !(lo..=hi).contains(&v)) {
            errs.push(issue(
                C::InvalidBuildConfig,
                format!("build_config.{what} must be {lo}-{hi}"),
            ));
        }
    };
    in_range(c.vcpus, 1, 32, "vcpus", &mut errs);
    in_range(c.memory_mib, 128, 65536, "memory_mib", &mut errs);
    in_range(c.disk_mb, 513, 1_048_576, "disk_mb", &mut errs);
    in_range(c.max_vcpus, 1, 32, "max_vcpus", &mut errs);
    in_range(c.max_memory_mib, 128, 65536, "max_memory_mib", &mut errs);
    let (vcpus, memory_mib) = (
        c.vcpus.map_or(DEFAULT_VCPUS, |v| v as u32),
        c.memory_mib.map_or(DEFAULT_MEMORY_MIB, |v| v as u32),
    );
    let vm = VmSettings {
        vcpus,
        memory_mib,
        disk_mb: c.disk_mb.map(|d| d as u64),
        internet_access: c.internet_access != Some(false),
        ceiling: Some(crate::size::Ceiling::plan(
            vcpus,
            memory_mib,
            c.max_vcpus.map(|v| v as u32),
            c.max_memory_mib.map(|v| v as u32),
        )),
    };

    let context = match &req.build_context {
        None => None,
        Some(bc) if bc.files.len() > MAX_CONTEXT_FILES => {
            errs.push(issue(
                C::InvalidContext,
                format!("build_context: at most {MAX_CONTEXT_FILES} files"),
            ));
            None
        }
        Some(bc) => match ContextManifest::from_request(bc) {
            Ok(m) => Some(m),
            Err(es) => {
                errs.extend(es.into_iter().map(|e: ContextError| {
                    let code = if e.is_upload() {
                        C::FileUploadError
                    } else {
                        C::InvalidContext
                    };
                    issue(code, e.to_string())
                }));
                None
            }
        },
    };
    let skip_cache = req.skip_cache == Some(true);
    if skip_cache {
        warnings.push("skip_cache: the whole build cache is bypassed".to_string());
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    let source = source.expect("a source exists when there are no errors");
    let (source_type, route) = match (&source, steps.is_empty()) {
        (Source::Dockerfile { .. }, _) => (SourceType::Dockerfile, Route::Engine),
        (_, false) if backend == Backend::Native => (SourceType::Declarative, Route::NativeSteps),
        (_, false) => (SourceType::Declarative, Route::Engine),
        (Source::Template { .. }, true) => (SourceType::TemplateBase, Route::Import),
        (Source::Image { .. }, true) => (SourceType::OciImport, Route::Import),
    };
    let runtime = RuntimeSettings {
        env: EnvVars(runtime_env),
        user,
        workdir,
        start_cmd: req.start_cmd.clone().filter(|c| !c.trim().is_empty()),
        readiness,
    };
    let build_envs = EnvVars(build_envs);
    let digests = digests(&source, &steps, &build_envs, &runtime, context.as_ref());
    let cache = CacheInputs {
        skip_cache,
        final_artifact_inputs: sha256_json(&FinalInputs {
            v: 2,
            source_digest: &digests.source_digest,
            backend,
            disk_mb: vm.disk_mb,
            internet_access: vm.internet_access,
            secret_ids: &secret_ids,
        }),
    };
    Ok(BuildPlan {
        name,
        tags,
        source,
        source_type,
        backend,
        route,
        steps,
        build_envs,
        runtime,
        context,
        vm,
        cache,
        digests,
        secret_ids,
        base_image_auth,
        registry_auth_hosts,
        warnings,
    })
}

fn sha256_json(v: &impl Serialize) -> String {
    Digest::sha256_of(&serde_json::to_vec(v).unwrap_or_default()).to_string()
}

/// What the source digest covers (typed, so its JSON is deterministic:
/// struct fields in order, maps sorted).
#[derive(Serialize)]
struct SourceInputs<'a> {
    v: u32,
    source: &'a Source,
    steps: &'a [Step],
    build_envs: &'a BTreeMap<String, String>,
    runtime_env: &'a BTreeMap<String, String>,
    user: Option<&'a str>,
    workdir: Option<&'a str>,
    start_cmd: Option<&'a str>,
    readiness: Option<&'a Readiness>,
    context_digest: Option<&'a str>,
}

#[derive(Serialize)]
struct FinalInputs<'a> {
    v: u32,
    source_digest: &'a str,
    backend: Backend,
    disk_mb: Option<u64>,
    internet_access: bool,
    secret_ids: &'a [String],
}

/// The plan's digests: the one function that computes them.
fn digests(
    source: &Source,
    steps: &[Step],
    build_envs: &EnvVars,
    runtime: &RuntimeSettings,
    context: Option<&ContextManifest>,
) -> Digests {
    let context_digest = context.map(|c| c.digest.clone());
    let source_digest = sha256_json(&SourceInputs {
        v: 1,
        source,
        steps,
        build_envs: &build_envs.0,
        runtime_env: &runtime.env.0,
        user: runtime.user.as_deref(),
        workdir: runtime.workdir.as_deref(),
        start_cmd: runtime.start_cmd.as_deref(),
        readiness: runtime.readiness.as_ref(),
        context_digest: context_digest.as_deref(),
    });
    let dockerfile_digest = match source {
        Source::Dockerfile { digest, .. } => Some(digest.clone()),
        _ => None,
    };
    Digests {
        source_digest,
        dockerfile_digest,
        context_digest,
    }
}

// ---- the plan's views --------------------------------------------------------

/// A step with its 1-based position in the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct IndexedStep {
    pub index: usize,
    #[serde(flatten)]
    pub step: Step,
}

/// `env_assignments[]`: which variables a build sets, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EnvAssignment {
    pub key: String,
    /// `runtime` (the template keeps it) or `build` (steps only).
    pub scope: String,
}

/// A stage of a Dockerfile (filled by the server's Dockerfile analysis).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PlanStage {
    pub index: usize,
    pub name: Option<String>,
    pub line: usize,
    pub from: String,
    pub resolved: Option<String>,
}

/// An instruction nullspace ignores, with its line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct IgnoredInstruction {
    pub instruction: String,
    pub line: usize,
    pub message: String,
}

/// `build_plan`: the plan itself, plus the spec's derived keys
/// (`base_template`, `run_steps`/`build_steps`, `env_assignments`, the
/// effective `start_cmd`/`default_user`/`default_workdir`/`readiness`) and
/// what only the server can add (the rendered Dockerfile of an engine
/// build, a Dockerfile's stages and ignored instructions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PlanDetail {
    #[serde(flatten)]
    pub plan: BuildPlan,
    pub base_template: Option<String>,
    pub run_steps: Vec<IndexedStep>,
    pub build_steps: Vec<IndexedStep>,
    pub env_assignments: Vec<EnvAssignment>,
    pub start_cmd: Option<String>,
    pub default_user: Option<String>,
    pub default_workdir: Option<String>,
    pub readiness: Option<Readiness>,
    /// The Dockerfile an engine runs for declarative steps.
    pub dockerfile: Option<String>,
    pub stages: Vec<PlanStage>,
    pub ignored_instructions: Vec<String>,
    pub ignored_instruction_warnings: Vec<IgnoredInstruction>,
}

/// `context_manifest` of a plan response (all three keys required by the SDK).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ContextSummary {
    pub context_manifest_id: String,
    pub context_digest: String,
    pub file_count: usize,
}

/// `POST /v1/templates/plan` (contract §9.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PlanResponse {
    pub build_plan: PlanDetail,
    pub requires_base_image_auth: bool,
    pub build_backend: RecordBackend,
    pub source_type: SourceType,
    pub source_digest: Option<String>,
    pub dockerfile_digest: Option<String>,
    pub warnings: Vec<String>,
    pub context_manifest: Option<ContextSummary>,
}

impl PlanResponse {
    /// The response for `plan`; the server fills the Dockerfile fields of
    /// [`PlanDetail`] afterwards.
    pub fn new(plan: BuildPlan) -> PlanResponse {
        let indexed = |run: bool| -> Vec<IndexedStep> {
            plan.steps
                .iter()
                .enumerate()
                .filter(|(_, s)| matches!(s, Step::Run { .. }) == run)
                .map(|(i, s)| IndexedStep {
                    index: i + 1,
                    step: s.clone(),
                })
                .collect()
        };
        let env_assignments = plan
            .runtime
            .env
            .0
            .keys()
            .map(|k| (k, "runtime"))
            .chain(plan.build_envs.0.keys().map(|k| (k, "build")))
            .map(|(k, scope)| EnvAssignment {
                key: k.clone(),
                scope: scope.into(),
            })
            .collect();
        let context_manifest = plan.context.as_ref().map(|c| ContextSummary {
            context_manifest_id: c.id(),
            context_digest: c.digest.clone(),
            file_count: c.file_count(),
        });
        PlanResponse {
            requires_base_image_auth: plan.base_image_auth.is_some(),
            build_backend: plan.backend.record(),
            source_type: plan.source_type,
            source_digest: Some(plan.digests.source_digest.clone()),
            dockerfile_digest: plan.digests.dockerfile_digest.clone(),
            warnings: plan.warnings.clone(),
            context_manifest,
            build_plan: PlanDetail {
                base_template: plan.source.base_ref().map(str::to_string),
                run_steps: indexed(true),
                build_steps: indexed(false),
                env_assignments,
                start_cmd: plan.runtime.start_cmd.clone(),
                default_user: plan.default_user().map(str::to_string),
                default_workdir: plan.default_workdir().map(str::to_string),
                readiness: plan.runtime.readiness.clone(),
                dockerfile: None,
                stages: vec![],
                ignored_instructions: vec![],
                ignored_instruction_warnings: vec![],
                plan,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::request::{BuildContext, ContextFile};
    use serde_json::json;

    fn req(v: serde_json::Value) -> BuildRequest {
        serde_json::from_value(v).unwrap()
    }

    fn server() -> PlanContext<'static> {
        PlanContext {
            namespace: Some("team-a"),
            engines: Some(&[Backend::Buildah]),
        }
    }

    fn ok(v: serde_json::Value) -> BuildPlan {
        plan(&req(v), &server()).unwrap()
    }

    fn errors(v: serde_json::Value) -> Vec<Issue> {
        plan(&req(v), &server()).unwrap_err()
    }

    #[test]
    fn routes_and_source_types() {
        let p = ok(json!({"base_image": "127.0.0.1:5000/x:1"}));
        assert_eq!(
            (p.source_type, p.route, p.backend),
            (SourceType::OciImport, Route::Import, Backend::Native)
        );
        assert_eq!(p.tags, ["default"]);
        let p = ok(json!({"base_image": "team-a/base:v1"}));
        assert_eq!(
            (p.source_type, p.route),
            (SourceType::TemplateBase, Route::Import)
        );
        let p = ok(json!({"base_image": "x:1", "steps": [{"action":"run","command":"true"}]}));
        assert_eq!(
            (p.source_type, p.route),
            (SourceType::Declarative, Route::NativeSteps)
        );
        let p = ok(
            json!({"base_image": "x:1", "steps": [{"action":"run","command":"true"}], "build_backend": "buildah"}),
        );
        assert_eq!(
            (p.route, p.backend.record()),
            (Route::Engine, RecordBackend::Buildkit)
        );
        let p = ok(json!({"dockerfile": "FROM x\n"}));
        assert_eq!(
            (p.source_type, p.route, p.backend),
            (SourceType::Dockerfile, Route::Engine, Backend::Buildah)
        );
        // Client side: any engine, buildkit by default.
        let p = plan(
            &req(json!({"dockerfile": "FROM x\n"})),
            &PlanContext::default(),
        )
        .unwrap();
        assert_eq!(p.backend, Backend::Buildkit);
        // `steps: []` with a start command is still an import.
        let p = ok(json!({"base_image": "x:1", "steps": [], "start_cmd": "./serve"}));
        assert_eq!(p.source_type, SourceType::OciImport);
        assert_eq!(p.runtime.start_cmd.as_deref(), Some("./serve"));
    }

    #[test]
    fn defaults_in_one_place() {
        let p = ok(
            json!({"base_image": "x:1", "runtime_config": {"readiness": {"kind": "tcp", "port": 8080}}}),
        );
        let r = p.runtime.readiness.unwrap();
        assert_eq!(
            (
                r.timeout.as_secs(),
                r.interval.as_millis(),
                r.startup_grace.as_secs()
            ),
            (30, 500, 2)
        );
        assert_eq!(
            (p.vm.vcpus, p.vm.memory_mib, p.vm.internet_access),
            (2, 512, true)
        );
        let p = ok(
            json!({"base_image": "x:1", "build_config": {"vcpus": 4, "memory_mib": 2048, "internet_access": false, "disk_mb": 4096}}),
        );
        assert_eq!(
            p.vm,
            VmSettings {
                vcpus: 4,
                memory_mib: 2048,
                disk_mb: Some(4096),
                internet_access: false,
                ceiling: Some(crate::size::Ceiling {
                    vcpus: 4,
                    memory_mib: 2048,
                }),
            }
        );
        // Without maxima: 4 vCPUs, and the SDK's default create's 512 MiB.
        let p = ok(json!({"base_image": "x:1"}));
        assert_eq!(
            p.vm.ceiling,
            Some(crate::size::Ceiling {
                vcpus: 4,
                memory_mib: 512,
            })
        );
    }

    /// The digests depend on what the template is made of, never on names,
    /// tags, credentials or the VM size; inline and uploaded context bytes
    /// agree.
    #[test]
    fn digests() {
        let base = json!({"base_image": "x:1", "steps": [{"action":"copy","sources":["a.txt"],"dst":"/a"}],
            "build_context": {"files": [{"path":"a.txt","entry_type":"file","mode":"0644","content_base64":"aGVsbG8K"}]}});
        let a = ok(base.clone());
        let mut v = base.clone();
        v["name"] = json!("other");
        v["tags"] = json!(["t"]);
        v["build_config"] = json!({"vcpus": 8});
        v["build_context"]["files"][0] = json!({"path":"a.txt","entry_type":"file","mode":"0644",
            "blob_id":"blob_5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"});
        let b = ok(v);
        assert_eq!(a.digests, b.digests);
        assert!(a.digests.context_digest.is_some() && a.digests.dockerfile_digest.is_none());
        let mut v = base.clone();
        v["steps"][0]["dst"] = json!("/b");
        assert_ne!(ok(v).digests.source_digest, a.digests.source_digest);
        let d = ok(json!({"dockerfile": "FROM x\n"}));
        assert_eq!(
            d.digests.dockerfile_digest.as_deref(),
            Some(Digest::sha256_of(b"FROM x\n").to_string().as_str())
        );
        // The cache key moves with the backend, not with the VM size.
        let e = ok(json!({"dockerfile": "FROM x\n", "build_config": {"vcpus": 4}}));
        assert_eq!(d.cache, e.cache);
    }

    /// The messages the SDK validation suite looks for.
    #[test]
    fn every_rule() {
        let img = json!({"base_image": "x:1"});
        let with = |k: &str, v: serde_json::Value| {
            let mut r = img.clone();
            r[k] = v;
            r
        };
        for (body, code, needle) in [
            (
                with("tags", json!([])),
                ErrorCode::InvalidTags,
                "explicit empty list",
            ),
            (with("tags", json!(["tb_1"])), ErrorCode::InvalidTags, "tb_"),
            (with("name", json!("Upper")), ErrorCode::InvalidName, "name"),
            (json!({}), ErrorCode::InvalidSource, "needs a source"),
            (
                with("dockerfile", json!("FROM x")),
                ErrorCode::InvalidSource,
                "exactly one source",
            ),
            (
                json!({"dockerfile": "FROM x", "build_backend": "native"}),
                ErrorCode::InvalidBackend,
                "native cannot build a dockerfile",
            ),
            (
                json!({"dockerfile": "FROM x", "build_backend": "buildkit"}),
                ErrorCode::BackendUnavailable,
                "not available on this server (available: native, buildah)",
            ),
            (
                with("build_backend", json!("docker")),
                ErrorCode::InvalidBackend,
                "not one of native",
            ),
            (
                with("steps", json!([{"action": "run"}])),
                ErrorCode::InvalidStep,
                "\"command\" is required",
            ),
            (
                with("build_secrets", json!([{"id": "bad id!", "value": "x"}])),
                ErrorCode::InvalidSecret,
                "must match",
            ),
            (
                with("build_secrets", json!([{"id": "a", "value": "x"}])),
                ErrorCode::InvalidSecret,
                "native builds reject them",
            ),
            (
                with(
                    "runtime_config",
                    json!({"readiness": {"kind": "http", "path": "/x"}}),
                ),
                ErrorCode::InvalidReadiness,
                "runtime_config.readiness: an explicit port",
            ),
            (
                with("runtime_config", json!({"default_user": "a:b:c"})),
                ErrorCode::InvalidUser,
                "default_user",
            ),
            (
                with("runtime_config", json!({"default_workdir": "relative"})),
                ErrorCode::InvalidWorkdir,
                "absolute",
            ),
            (
                with("runtime_config", json!({"default_envs": {"1BAD": "x"}})),
                ErrorCode::InvalidEnv,
                "valid variable name",
            ),
            (
                with("build_envs", json!({"A-B": "x"})),
                ErrorCode::InvalidEnv,
                "build_envs",
            ),
            (
                with("base_image_auth", json!({"kind": "basic", "username": "u"})),
                ErrorCode::InvalidAuth,
                "username and password",
            ),
            (
                with("base_image_auth", json!({"kind": "oauth"})),
                ErrorCode::InvalidAuth,
                "kind must be",
            ),
            (
                with(
                    "registry_auth",
                    json!([{"auth": {"kind": "basic", "username": "u", "password": "p"}}]),
                ),
                ErrorCode::InvalidAuth,
                "registry_auth[0]: registry is required",
            ),
            (
                with("build_config", json!({"disk_mb": 100})),
                ErrorCode::InvalidBuildConfig,
                "disk_mb",
            ),
            (
                with("build_config", json!({"vcpus": 0})),
                ErrorCode::InvalidBuildConfig,
                "vcpus",
            ),
            (
                with(
                    "build_context",
                    json!({"files": [{"path": "../x", "entry_type": "file", "blob_id": "b"}]}),
                ),
                ErrorCode::InvalidContext,
                "inside the context",
            ),
            (
                with(
                    "build_context",
                    json!({"files": [{"path": "l", "entry_type": "symlink"}]}),
                ),
                ErrorCode::InvalidContext,
                "symlinks",
            ),
            (
                with(
                    "build_context",
                    json!({"files": [{"path": "f", "entry_type": "file"}]}),
                ),
                ErrorCode::FileUploadError,
                "neither blob_id nor content_base64",
            ),
            (
                with(
                    "steps",
                    json!([{"action": "make_dir", "path": "/x", "mode": "999"}]),
                ),
                ErrorCode::InvalidStep,
                "octal",
            ),
            (
                json!({"base_image": "nullspace/base:v1", "base_image_auth": {"kind": "basic", "username": "u", "password": "p"}}),
                ErrorCode::InvalidAuth,
                "not template bases",
            ),
        ] {
            let errs = errors(body.clone());
            assert!(
                errs.iter()
                    .any(|e| e.code == code && e.message.contains(needle)),
                "{body}: {errs:?}"
            );
            assert!(
                errs.iter()
                    .all(|e| e.phase == Some(FailurePhase::Preflight))
            );
        }
        // Every problem at once.
        let errs = errors(
            json!({"base_image": "x:1", "tags": [], "runtime_config": {"default_envs": {"1BAD": "x"}}}),
        );
        assert_eq!(errs.len(), 2, "{errs:?}");
    }

    #[test]
    fn plan_response_view() {
        let p = ok(json!({"base_image": "x:1",
            "steps": [{"action":"run","command":"echo hi"},{"action":"workdir","path":"/w"},{"action":"user","user":"app"}],
            "build_envs": {"B": "secret-ish"}, "runtime_config": {"default_envs": {"R": "v"}},
            "build_context": {"files": [{"path":"f","entry_type":"file","content_base64":""}]}}));
        let digests = p.digests.clone();
        let r = serde_json::to_value(PlanResponse::new(p)).unwrap();
        assert_eq!(r["source_type"], "declarative");
        assert_eq!(r["build_backend"], "native");
        assert_eq!(r["source_digest"], json!(digests.source_digest));
        assert_eq!(
            r["context_manifest"]["context_digest"],
            json!(digests.context_digest)
        );
        assert_eq!(r["context_manifest"]["file_count"], 1);
        let bp = &r["build_plan"];
        assert_eq!(
            bp["run_steps"],
            json!([{"index": 1, "action": "run", "command": "echo hi"}])
        );
        assert_eq!(bp["build_steps"][0]["index"], 2);
        assert_eq!(bp["default_workdir"], "/w");
        assert_eq!(bp["default_user"], "app");
        assert_eq!(bp["base_template"], "x:1");
        assert_eq!(bp["build_envs"], json!(["B"]));
        assert_eq!(
            bp["env_assignments"],
            json!([{"key":"R","scope":"runtime"},{"key":"B","scope":"build"}])
        );
        let text = r.to_string();
        assert!(
            !text.contains("secret-ish") && !text.contains("\"v\""),
            "env values never shown: {text}"
        );
    }

    #[test]
    fn context_manifest_is_typed() {
        let p = plan(
            &BuildRequest {
                base_image: Some("x:1".into()),
                build_context: Some(BuildContext {
                    files: vec![ContextFile {
                        path: "./d".into(),
                        entry_type: "dir".into(),
                        ..Default::default()
                    }],
                }),
                ..Default::default()
            },
            &server(),
        )
        .unwrap();
        let c = p.context.unwrap();
        assert_eq!(c.entries[0].path, "d");
        assert_eq!(c.entries[0].mode.to_string(), "0755");
    }
}
