//! `nullspace template …`: a client of the template build API that mirrors
//! the published SDK's CLI (`nullspace-sdk` 0.1.9). It talks to
//! `$NULLSPACE_API_URL` with `$NULLSPACE_API_KEY`; request and response
//! shapes follow docs/sdk-contract.md (section numbers cited below).

pub(crate) mod export_disk;
mod plan_view;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{ArgAction, ArgMatches, Args, Subcommand, ValueEnum};
use nullspace_model::build::plan::ValidateResult;
use nullspace_model::build::plan::{PlanContext, PlanResponse, plan as build_plan};
use nullspace_model::build::probe::Readiness;
use nullspace_model::build::request::{
    BuildConfig, BuildRequest, BuildSecret, CancelBody, Credentials, PromoteBody, RenameBody,
    RetryBody, RuntimeConfig, TagsBody,
};
use nullspace_model::build::rules;
use nullspace_model::build::status::BuildStatus as Status;
use nullspace_model::build::status::{LogKind, LogLevel};
use nullspace_model::build::step::Step;
use nullspace_model::build::wire::{
    BuildPage, BuildRecord, BuildStatus as StatusSnapshot, FailureDetail, LogEntry, TagEntry,
    TemplateInfo,
};
use nullspace_model::refs;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::Method;
use serde::Serialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::Value;

#[derive(Subcommand)]
pub enum TemplateCommand {
    /// Build a template: streams the build log until the template is ready.
    Build(Box<BuildArgs>),
    /// Check a build request on the server without building.
    Validate(Box<InspectArgs>),
    /// Show the build plan the server derives from a request (JSON), or
    /// one of its views.
    Plan(Box<PlanArgs>),
    /// List a template's builds, newest first.
    Builds {
        template_ref: String,
        #[arg(long, value_enum)]
        status: Option<BuildStatus>,
        #[arg(long, value_enum)]
        backend: Option<Backend>,
        #[arg(long, value_enum)]
        source_type: Option<SourceType>,
        /// Page size (1-100).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
        limit: Option<u32>,
        /// The `next_cursor` of a previous page.
        #[arg(long)]
        cursor: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Print a build's record and its log entries from OFFSET as JSON.
    BuildStatus {
        build_id: String,
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// Print a build's log; with --follow, until the build finishes.
    Logs {
        build_id: String,
        #[arg(long, default_value_t = 0)]
        offset: u64,
        #[arg(long)]
        follow: bool,
        /// One JSON log entry per line.
        #[arg(long)]
        json: bool,
    },
    /// Poll a build until it is ready, failed or cancelled, printing its log.
    Wait {
        build_id: String,
        #[arg(long, default_value_t = 0)]
        offset: u64,
        #[arg(long, default_value_t = 250)]
        poll_interval_ms: u64,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Print the final build record as JSON (the log goes to stderr).
        #[arg(long)]
        json: bool,
    },
    /// Cancel a build (a no-op on a finished one).
    Cancel {
        build_id: String,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Start a new attempt of a finished build.
    Retry {
        build_id: String,
        /// Tags for the new attempt (repeatable); default: the old ones.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// ID=VALUE; a retry must resupply the secrets the build used.
        #[arg(long = "build-secret", value_name = "ID=VALUE")]
        build_secrets: Vec<String>,
        #[command(flatten)]
        registry: RegistryArgs,
        #[arg(long)]
        json: bool,
    },
    /// Point a tag at a ready build.
    Promote {
        build_id: String,
        #[arg(long)]
        tag: String,
        #[arg(long)]
        json: bool,
    },
    /// List the templates visible to this API key.
    List {
        /// Comma-separated fields to return (raw JSON).
        #[arg(long)]
        fields: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show one template.
    Get {
        template_ref: String,
        #[arg(long)]
        fields: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Print {"template_ref", "exists"} for a template ref.
    Exists { template_ref: String },
    /// Delete a template.
    Delete { template_ref: String },
    /// The template's packages (listed when it was built) as an SBOM.
    Sbom {
        template_ref: String,
        #[arg(long, value_enum, default_value = "spdx-json")]
        format: SbomFormat,
        /// Write the document here (default: standard output).
        #[arg(long, short)]
        output: Option<std::path::PathBuf>,
    },
    /// Rename a template; the old name stays as an alias.
    Rename {
        template_ref: String,
        new_name: String,
        #[arg(long)]
        json: bool,
    },
    /// Assign, list or remove tags.
    #[command(subcommand)]
    Tag(TagCommand),
    /// Export a template as an OCI image (archive or layout), optionally pushing it.
    Export(Box<crate::template_export::ExportArgs>),
}

#[derive(Subcommand)]
pub enum TagCommand {
    /// Point TAGs at the template's current build.
    Assign {
        template_ref: String,
        #[arg(required = true)]
        tags: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// List a template's tags.
    List {
        template_ref: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a tag.
    Remove { template_ref: String, tag: String },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Jsonl,
    Quiet,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Backend {
    Native,
    Buildkit,
    Buildah,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum BuildStatus {
    Waiting,
    Building,
    Ready,
    Error,
    Cancelled,
}

#[derive(Clone, Copy, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum SourceType {
    Declarative,
    Dockerfile,
    OciImport,
    TemplateBase,
}

fn enum_name<T: ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

#[derive(Args)]
pub struct BuildArgs {
    #[command(flatten)]
    spec: BuildFlags,
    /// Root filesystem size in MiB (build only; validate and plan omit it).
    #[arg(long)]
    disk_mb: Option<u64>,
    /// Start the build and print its id instead of streaming the log.
    #[arg(long, conflicts_with_all = ["dry_run", "log_format"])]
    background: bool,
    /// Print the request JSON (secrets redacted) and the plan derived from
    /// it, and send nothing.
    #[arg(long)]
    dry_run: bool,
    /// How the streamed log is printed [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Print the final build record as JSON (the log goes to stderr).
    #[arg(long)]
    json: bool,
}

/// `template sbom --format`.
#[derive(Clone, Copy, ValueEnum)]
pub enum SbomFormat {
    /// SPDX 2.3 JSON.
    SpdxJson,
    /// CycloneDX 1.5 JSON.
    CyclonedxJson,
}

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    inspect: InspectArgs,
    /// Which view of the plan: plan (the default, JSON), deps, dry-run
    /// (what would run and what the server's caches hold), steps, outputs.
    #[arg(long, value_enum)]
    view: Option<plan_view::ViewArg>,
}

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    spec: BuildFlags,
    /// Print the server's answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RegistryArgs {
    /// Base-image registry user name (basic auth).
    #[arg(
        long,
        env = "NULLSPACE_REGISTRY_USERNAME",
        requires = "registry_password"
    )]
    registry_username: Option<String>,
    /// Base-image registry password.
    #[arg(
        long,
        env = "NULLSPACE_REGISTRY_PASSWORD",
        hide_env_values = true,
        requires = "registry_username"
    )]
    registry_password: Option<String>,
}

impl RegistryArgs {
    fn auth(&self) -> Option<Credentials> {
        match (&self.registry_username, &self.registry_password) {
            (Some(u), Some(p)) => Some(Credentials::Basic {
                username: u.clone(),
                password: p.clone(),
            }),
            _ => None,
        }
    }
}

/// The builder flags shared by build, validate and plan (spec §2).
#[derive(Args)]
pub struct BuildFlags {
    // ---- base selector (exactly one) ----
    /// Any OCI image reference.
    #[arg(long, group = "base", value_name = "REF")]
    from_image: Option<String>,
    /// An OCI image [default: ubuntu:22.04].
    #[arg(long, group = "base", value_name = "REF", num_args = 0..=1)]
    from_base_image: Option<Option<String>>,
    /// ubuntu:<V> [default: 22.04].
    #[arg(long, group = "base", value_name = "V", num_args = 0..=1)]
    from_ubuntu_image: Option<Option<String>>,
    /// debian:<TAG> [default: stable-slim].
    #[arg(long, group = "base", value_name = "TAG", num_args = 0..=1)]
    from_debian_image: Option<Option<String>>,
    /// python:<V>[-<VARIANT>].
    #[arg(long, group = "base", value_name = "V")]
    from_python_image: Option<String>,
    /// node:<V>[-<VARIANT>].
    #[arg(long, group = "base", value_name = "V")]
    from_node_image: Option<String>,
    /// Variant suffix for --from-python-image / --from-node-image (e.g. slim).
    #[arg(long, value_name = "X")]
    image_variant: Option<String>,
    /// oven/bun:<V>.
    #[arg(long, group = "base", value_name = "V")]
    from_bun_image: Option<String>,
    /// An existing template: base, name:tag, tmpl_…, ns/name[:tag].
    #[arg(long, group = "base", value_name = "REF")]
    from_template: Option<String>,
    /// A Dockerfile (its contents are sent; no build context is uploaded).
    #[arg(long, group = "base", value_name = "PATH")]
    from_dockerfile: Option<std::path::PathBuf>,
    /// Dockerfile text.
    #[arg(long, group = "base", value_name = "TEXT")]
    from_dockerfile_content: Option<String>,

    // ---- name, tags, start and readiness ----
    /// Template name (one path segment).
    #[arg(long)]
    name: Option<String>,
    /// Tag to publish (repeatable) [server default: default].
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Command started in the sandbox before the snapshot.
    #[arg(long)]
    start_cmd: Option<String>,
    /// Ready when this port accepts TCP connections.
    #[arg(long, group = "ready", value_name = "PORT")]
    ready_port: Option<u16>,
    /// Ready when http://localhost|127.0.0.1|0.0.0.0:PORT[/PATH] answers.
    #[arg(long, group = "ready", value_name = "URL")]
    ready_url: Option<String>,
    /// Ready when this file exists.
    #[arg(long, group = "ready", value_name = "PATH")]
    ready_file: Option<String>,
    /// Ready when a process with this name runs.
    #[arg(long, group = "ready", value_name = "NAME")]
    ready_process: Option<String>,
    /// Ready when this shell command succeeds.
    #[arg(long, group = "ready", value_name = "CMD")]
    ready_cmd: Option<String>,
    /// Ready after a fixed delay.
    #[arg(long, group = "ready", value_name = "MS")]
    ready_timeout_ms: Option<u64>,
    #[arg(long, requires = "ready", value_name = "SECS")]
    ready_timeout_secs: Option<u64>,
    #[arg(long, requires = "ready", value_name = "MS")]
    ready_interval_ms: Option<u64>,
    #[arg(long, requires = "ready", value_name = "SECS")]
    ready_startup_grace_secs: Option<u64>,

    // ---- environment ----
    /// Sandbox default env var K=V (repeatable).
    #[arg(long, value_name = "K=V")]
    set_runtime_env: Vec<String>,
    /// Build-step-only env var K=V (repeatable).
    #[arg(long, value_name = "K=V")]
    set_build_env: Vec<String>,

    // ---- steps, applied in command-line order ----
    /// A USER step; also the sandbox default user.
    #[arg(long, value_name = "USER")]
    set_user: Vec<String>,
    /// A WORKDIR step; also the sandbox default directory.
    #[arg(long, value_name = "DIR")]
    set_workdir: Vec<String>,
    /// A shell command step (repeatable).
    #[arg(long, value_name = "CMD")]
    run_cmd: Vec<String>,
    /// Run the preceding --run-cmd as this user.
    #[arg(long, value_name = "USER")]
    run_user: Vec<String>,
    /// apt packages, comma-separated.
    #[arg(long, value_name = "PKGS")]
    apt_install: Vec<String>,
    /// pip packages, comma-separated (system-wide).
    #[arg(long, value_name = "PKGS")]
    pip_install: Vec<String>,
    /// Install the preceding --pip-install with --user.
    #[arg(long, action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    pip_user_install: Vec<bool>,
    /// npm packages, comma-separated (local).
    #[arg(long, value_name = "PKGS")]
    npm_install: Vec<String>,
    /// Install the preceding --npm-install globally.
    #[arg(long, action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    npm_global: Vec<bool>,
    /// bun packages, comma-separated (local).
    #[arg(long, value_name = "PKGS")]
    bun_install: Vec<String>,
    /// Install the preceding --bun-install globally.
    #[arg(long, action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    bun_global: Vec<bool>,
    /// Create a directory (mkdir -p).
    #[arg(long, value_name = "PATH")]
    make_dir: Vec<String>,
    /// A cache boundary: the steps after it are not cached.
    #[arg(long, action = ArgAction::Append, num_args = 0, default_missing_value = "true")]
    step_skip_cache: Vec<bool>,

    // ---- credentials and secrets ----
    #[command(flatten)]
    registry: RegistryArgs,
    /// ID=VALUE, a build secret (repeatable; the value is never printed).
    #[arg(long = "build-secret", value_name = "ID=VALUE")]
    build_secrets: Vec<String>,

    // ---- build options ----
    #[arg(long, default_value_t = 2)]
    cpu_count: u32,
    #[arg(long, default_value_t = 512)]
    memory_mb: u32,
    /// The most vCPUs a machine of the template may ask for (default: 4,
    /// or --cpu-count if larger).
    #[arg(long)]
    max_cpu_count: Option<u32>,
    /// The most memory a machine of the template may ask for (default:
    /// 512, or --memory-mb if larger; a snapshot of a machine scans all of it).
    #[arg(long)]
    max_memory_mb: Option<u32>,
    /// Build without network access.
    #[arg(long)]
    no_internet_access: bool,
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Bypass the whole build cache.
    #[arg(long)]
    skip_cache: bool,
}

// ---- entry point -------------------------------------------------------------

/// `matches` are the whole command line's: step flags are applied in the
/// order they were given, which only the raw matches record.
/// A request body's JSON (the model's type, serialised).
pub(crate) fn to_body<B: Serialize + ?Sized>(b: &B) -> Result<Value> {
    serde_json::to_value(b).context("encoding the request")
}

/// Reads an answer to `path` as `R` (the server's response type); an
/// empty body (e.g. 204) is `null`.
pub(crate) fn read_json<R: DeserializeOwned>(
    path: &str,
    resp: reqwest::blocking::Response,
) -> Result<R> {
    let text = resp.text().context("reading the response")?;
    let text = if text.trim().is_empty() {
        "null"
    } else {
        &text
    };
    serde_json::from_str(text)
        .with_context(|| format!("the server answered {path} with unexpected JSON"))
}

pub fn run(cmd: TemplateCommand, matches: &ArgMatches) -> Result<()> {
    let sub = matches
        .subcommand()
        .and_then(|(_, t)| t.subcommand())
        .map(|(_, m)| m);
    match cmd {
        TemplateCommand::Build(a) => build(*a, sub.context("missing build arguments")?),
        TemplateCommand::Validate(a) => validate(*a, sub.context("missing build arguments")?),
        TemplateCommand::Plan(a) => plan(*a, sub.context("missing build arguments")?),
        TemplateCommand::Builds {
            template_ref,
            status,
            backend,
            source_type,
            limit,
            cursor,
            json,
        } => {
            let mut q = Vec::new();
            push_q(&mut q, "status", status.as_ref().map(enum_name));
            push_q(&mut q, "backend", backend.as_ref().map(enum_name));
            push_q(&mut q, "source_type", source_type.as_ref().map(enum_name));
            push_q(&mut q, "limit", limit.map(|l| l.to_string()));
            push_q(&mut q, "cursor", cursor);
            builds(&template_ref, &q, json)
        }
        TemplateCommand::BuildStatus { build_id, offset } => {
            let v: StatusSnapshot = Api::from_env()?.get(&status_path(&build_id, offset))?;
            print_json(&v)
        }
        TemplateCommand::Logs {
            build_id,
            offset,
            follow,
            json,
        } => logs(&build_id, offset, follow, json),
        TemplateCommand::Wait {
            build_id,
            offset,
            poll_interval_ms,
            log_format,
            json,
        } => wait(
            &build_id,
            offset,
            Duration::from_millis(poll_interval_ms),
            log_format,
            json,
        ),
        TemplateCommand::Cancel {
            build_id,
            reason,
            json,
        } => cancel(&build_id, reason, json),
        TemplateCommand::Retry {
            build_id,
            tags,
            build_secrets,
            registry,
            json,
        } => retry(&build_id, tags, &build_secrets, &registry, json),
        TemplateCommand::Promote {
            build_id,
            tag,
            json,
        } => {
            let path = format!("/v1/templates/builds/{}/promote", enc(&build_id));
            let info: TemplateInfo = Api::from_env()?.post(&path, &PromoteBody { tag })?;
            print_info(&info, json)
        }
        TemplateCommand::List { fields, json } => list(fields, json),
        TemplateCommand::Get {
            template_ref,
            fields,
            json,
        } => {
            let raw = fields.is_some();
            let mut q = Vec::new();
            push_q(&mut q, "fields", fields);
            let path = with_query(&ref_path(&template_ref, ""), &q);
            if raw {
                // `--fields` answers are raw subsets: show them as they are.
                return print_json(&Api::from_env()?.get::<Value>(&path)?);
            }
            let info: TemplateInfo = Api::from_env()?.get(&path)?;
            print_info(&info, json)
        }
        TemplateCommand::Exists { template_ref } => exists(&template_ref),
        TemplateCommand::Export(a) => crate::template_export::export(*a),
        TemplateCommand::Delete { template_ref } => {
            Api::from_env()?.send_json::<IgnoredAny>(
                Method::DELETE,
                &ref_path(&template_ref, ""),
                None,
            )?;
            println!("deleted {template_ref}");
            Ok(())
        }
        TemplateCommand::Sbom {
            template_ref,
            format,
            output,
        } => sbom(&template_ref, format, output.as_deref()),
        TemplateCommand::Rename {
            template_ref,
            new_name,
            json,
        } => {
            let body = RenameBody { new_name };
            let info: TemplateInfo =
                Api::from_env()?.post(&ref_path(&template_ref, "/rename"), &body)?;
            print_info(&info, json)
        }
        TemplateCommand::Tag(t) => tag(t),
    }
}

// ---- the API client ----------------------------------------------------------

/// An API error, from the `{error, code, error_detail?}` body (contract §1.5)
/// or from a log entry's `error_detail`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub code: String,
    pub message: String,
    pub phase: Option<String>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {}", self.message, self.code)?;
        if let Some(p) = &self.phase {
            write!(f, ", phase {p}")?;
        }
        write!(f, ")")
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// Both body shapes the SDK accepts: flat, or `error` as an object whose
    /// fields win over the top level. Read as a `Value`: the body may also
    /// be a proxy's text, or a shape `ErrorBody` does not describe.
    pub(crate) fn from_body(status: u16, body: &str) -> ApiError {
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        let nested = v.get("error").filter(|e| e.is_object());
        let field = |k: &str| {
            nested
                .and_then(|e| e.get(k))
                .or_else(|| v.get(k))
                .filter(|x| !x.is_null())
        };
        let message = match nested {
            Some(e) => e.get("message").and_then(Value::as_str).map(str::to_string),
            None => v.get("error").and_then(Value::as_str).map(str::to_string),
        };
        let message = message.unwrap_or_else(|| {
            let raw = body.trim();
            if raw.is_empty() || v.is_object() {
                format!("HTTP {status}")
            } else {
                format!("HTTP {status}: {}", raw.lines().next().unwrap_or_default())
            }
        });
        ApiError {
            code: field("code")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string(),
            message,
            phase: field("error_detail")
                .and_then(|d| d.get("phase"))
                .and_then(Value::as_str)
                .map(str::to_string),
        }
    }

    /// A failed build's `error_detail` (or its legacy `error` message).
    fn from_detail(detail: Option<&FailureDetail>, fallback: &str) -> ApiError {
        match detail {
            Some(d) => ApiError {
                code: d.code.clone(),
                message: d.message.clone(),
                phase: Some(d.phase.clone()),
            },
            None => ApiError {
                code: "build_error".into(),
                message: fallback.to_string(),
                phase: None,
            },
        }
    }
}

pub(crate) struct Api {
    base: String,
    key: String,
    http: reqwest::blocking::Client,
}

/// First non-empty (trimmed) value among the environment variables.
fn env_value(names: &[&str]) -> Option<String> {
    names
        .iter()
        .filter_map(|n| std::env::var(n).ok())
        .map(|v| v.trim().to_string())
        .find(|v| !v.is_empty())
}

/// Ordinary calls use the SDK's 30 s timeout; log streams may idle longer
/// (the server pings every few seconds; the SDK's build client allows 300 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const STREAM_TIMEOUT: Duration = Duration::from_secs(300);

impl Api {
    pub(crate) fn from_env() -> Result<Api> {
        // No default URL: guessing one sends the API key to the wrong place.
        let base = env_value(&["NULLSPACE_API_URL", "NULLSPACE_BASE_URL"]).ok_or_else(|| {
            anyhow!("NULLSPACE_API_URL is not set: export the template API's base URL, e.g. http://127.0.0.1:8080")
        })?;
        let key = env_value(&["NULLSPACE_API_KEY"]).ok_or_else(|| {
            anyhow!("NULLSPACE_API_KEY is not set: create a key with `nullspace keys create --name N --namespace NS`")
        })?;
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("NULLSPACE_API_URL {base:?} must start with http:// or https://");
        }
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(CALL_TIMEOUT)
            .timeout(STREAM_TIMEOUT)
            .user_agent(concat!("nullspace-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("creating the HTTP client")?;
        Ok(Api {
            base: base.trim_end_matches('/').to_string(),
            key,
            http,
        })
    }

    /// The base URL, without a trailing slash.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// The API key (sent as `Authorization: Bearer`).
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    /// Sends a request; 429 is retried like the SDK does (3 times, honouring
    /// `Retry-After` seconds), any other status ≥ 400 becomes an [`ApiError`].
    pub(crate) fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        stream: bool,
    ) -> Result<reqwest::blocking::Response> {
        self.send_headers(method, path, body, stream, &[])
    }

    /// [`Api::send`] with extra request headers.
    pub(crate) fn send_headers(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        stream: bool,
        headers: &[(&str, String)],
    ) -> Result<reqwest::blocking::Response> {
        let url = format!("{}{path}", self.base);
        for attempt in 0.. {
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(&self.key);
            for (k, v) in headers {
                req = req.header(*k, v);
            }
            if !stream {
                req = req.timeout(CALL_TIMEOUT);
            }
            if let Some(b) = body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(serde_json::to_vec(b)?);
            }
            let resp = req.send().with_context(|| format!("{method} {url}"))?;
            let status = resp.status().as_u16();
            if status < 400 {
                return Ok(resp);
            }
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .unwrap_or(1.0);
            let err = ApiError::from_body(status, &resp.text().unwrap_or_default());
            let rate_limited =
                status == 429 && matches!(err.code.as_str(), "unknown" | "rate_limit_exceeded");
            if rate_limited && !stream && attempt < 3 {
                std::thread::sleep(Duration::from_secs_f64(retry_after.min(60.0)));
                continue;
            }
            return Err(err.into());
        }
        unreachable!("the retry loop returns")
    }

    /// A GET whose body is a large download (no retries; `timeout` for
    /// the whole transfer).
    pub(crate) fn download(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<reqwest::blocking::Response> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(&self.key)
            .timeout(timeout)
            .send()
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status().as_u16();
        if status >= 400 {
            return Err(ApiError::from_body(status, &resp.text().unwrap_or_default()).into());
        }
        Ok(resp)
    }

    /// A JSON call read as `R` (the server's response type); an empty
    /// body (e.g. 204) is `null`.
    pub(crate) fn send_json<R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<R> {
        read_json(path, self.send(method, path, body, false)?)
    }

    pub(crate) fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R> {
        self.send_json(Method::GET, path, None)
    }

    /// POSTs a typed body (its JSON).
    pub(crate) fn post<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R> {
        self.send_json(Method::POST, path, Some(&to_body(body)?))
    }

    /// Reads an SSE log stream: one JSON entry per `data: ` line (comments,
    /// `id:` and `event:` lines are ignored). `on_entry` returns false to stop.
    fn sse(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        mut on_entry: impl FnMut(LogEntry) -> Result<bool>,
    ) -> Result<()> {
        let resp = self.send(method, path, body, true)?;
        for line in BufReader::new(resp).lines() {
            let line = line.context("reading the log stream")?;
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            let entry: LogEntry = serde_json::from_str(data)
                .with_context(|| format!("the log stream carried an invalid entry: {data}"))?;
            if !on_entry(entry)? {
                break;
            }
        }
        Ok(())
    }
}

/// What `urllib.parse.quote(x, safe='')` leaves as is.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `urllib.parse.quote(x, safe='')`: refs and tags travel as one segment.
pub(crate) fn enc(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// `template sbom`: the server's document, byte for byte.
fn sbom(template_ref: &str, format: SbomFormat, output: Option<&std::path::Path>) -> Result<()> {
    let f = match format {
        SbomFormat::SpdxJson => "spdx-json",
        SbomFormat::CyclonedxJson => "cyclonedx-json",
    };
    let path = ref_path(template_ref, &format!("/sbom?format={f}"));
    let mut resp = Api::from_env()?.download(&path, Duration::from_secs(120))?;
    match output {
        None => {
            resp.copy_to(&mut std::io::stdout().lock())?;
        }
        Some(p) => {
            let parent = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            let mut tmp = tempfile::NamedTempFile::new_in(parent)
                .with_context(|| format!("a temporary file in {}", parent.display()))?;
            resp.copy_to(tmp.as_file_mut())?;
            tmp.persist(p)
                .map_err(|e| e.error)
                .with_context(|| format!("writing {}", p.display()))?;
        }
    }
    Ok(())
}

fn ref_path(r: &str, rest: &str) -> String {
    format!("/v1/templates/refs/{}{rest}", enc(r))
}

fn status_path(build_id: &str, offset: u64) -> String {
    format!("/v1/templates/builds/{}?offset={offset}", enc(build_id))
}

pub(crate) fn push_q(q: &mut Vec<(&'static str, String)>, k: &'static str, v: Option<String>) {
    if let Some(v) = v {
        q.push((k, v));
    }
}

pub(crate) fn with_query(path: &str, q: &[(&str, String)]) -> String {
    if q.is_empty() {
        return path.to_string();
    }
    let parts: Vec<String> = q.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect();
    format!("{path}?{}", parts.join("&"))
}

/// Written, not `println!`: a closed pipe (`| head`) is an error, not a panic.
/// Through a `Value`, so that keys print sorted as they always have.
pub(crate) fn print_json<T: Serialize + ?Sized>(v: &T) -> Result<()> {
    use std::io::Write;
    let v = serde_json::to_value(v).context("encoding JSON")?;
    writeln!(
        std::io::stdout().lock(),
        "{}",
        serde_json::to_string_pretty(&v)?
    )
    .context("writing to stdout")
}

// ---- build, validate, plan ---------------------------------------------------

fn build(a: BuildArgs, m: &ArgMatches) -> Result<()> {
    let mut body = request(&a.spec, m)?;
    if let Some(d) = a.disk_mb {
        body.build_config
            .get_or_insert_with(Default::default)
            .disk_mb = Some(d as i64);
    }
    if a.dry_run {
        return dry_run(&body);
    }
    let api = Api::from_env()?;
    if a.background {
        let rec: BuildRecord = api.post("/v1/templates/builds", &body)?;
        return print_started(&rec, a.json);
    }
    let printer = Printer::new(a.log_format.unwrap_or(LogFormat::Text), a.json);
    build_streaming(&api, &body, &printer, a.json)
}

/// `--dry-run`: the request as it would be sent (secrets redacted) and the
/// plan the model derives from it, as the server would (its engines and
/// namespace aside); nothing is sent.
fn dry_run(body: &BuildRequest) -> Result<()> {
    #[derive(Serialize)]
    struct DryRun {
        request: BuildRequest,
        #[serde(skip_serializing_if = "Option::is_none")]
        plan: Option<PlanResponse>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        errors: Vec<nullspace_model::build::plan::Issue>,
    }
    let (plan, errors) = match build_plan(body, &PlanContext::default()) {
        Ok(p) => (Some(PlanResponse::new(p)), vec![]),
        Err(e) => (None, e),
    };
    let n = errors.len();
    print_json(&DryRun {
        request: body.redacted(),
        plan,
        errors,
    })?;
    if n > 0 {
        bail!("the build request is invalid ({n} error(s))");
    }
    Ok(())
}

fn print_started(rec: &BuildRecord, json_out: bool) -> Result<()> {
    if json_out {
        return print_json(rec);
    }
    let id = &rec.build_id;
    // The id alone on stdout, so `id=$(nullspace template build --background …)` works.
    println!("{id}");
    eprintln!(
        "build {id} is {}; follow it with: nullspace template logs {id} --follow",
        rec.status
    );
    Ok(())
}

/// The blocking build: `POST /v1/templates/build` streams log entries; the
/// build succeeded only when an `end` entry with a `result` arrives (§5).
fn build_streaming(
    api: &Api,
    body: &BuildRequest,
    printer: &Printer,
    json_out: bool,
) -> Result<()> {
    let body = serde_json::to_value(body).context("encoding the request")?;
    let mut last: Option<LogEntry> = None;
    let mut failure: Option<ApiError> = None;
    api.sse(Method::POST, "/v1/templates/build", Some(&body), |e| {
        printer.print(&e)?;
        let kind = e.kind;
        if kind == LogKind::Error {
            failure = Some(ApiError::from_detail(e.error_detail.as_ref(), &e.message));
        }
        last = Some(e);
        Ok(kind != LogKind::Error && kind != LogKind::End)
    })?;
    if let Some(f) = failure {
        return Err(f.into());
    }
    let Some(mut end) =
        last.filter(|e| e.kind == LogKind::End && e.result.as_ref().is_some_and(Value::is_object))
    else {
        bail!("the template build ended without a terminal end entry (cancelled or interrupted)");
    };
    if json_out {
        let offset = u64::try_from(end.offset).unwrap_or(0) + 1;
        let snap: StatusSnapshot = api.get(&status_path(&end.build_id, offset))?;
        return print_json(&snap.build);
    }
    let result: TemplateInfo = serde_json::from_value(end.result.take().unwrap_or_default())
        .context("the end entry's result is not a template")?;
    println!(
        "ready: {} (template {}, build {})",
        result.canonical_ref, end.template_id, end.build_id
    );
    Ok(())
}

fn validate(a: InspectArgs, m: &ArgMatches) -> Result<()> {
    let body = request(&a.spec, m)?;
    let v: ValidateResult = Api::from_env()?.post("/v1/templates/validate", &body)?;
    if a.json {
        print_json(&v)?;
    } else {
        println!("{}", if v.valid { "valid" } else { "invalid" });
        for e in &v.errors {
            let phase = e.phase.map(|p| format!(" (phase {p})")).unwrap_or_default();
            println!("  error [{}] {}{phase}", e.code, e.message);
        }
        for w in &v.warnings {
            println!("  warning {w}");
        }
    }
    if !v.valid {
        bail!("the build request is invalid ({} error(s))", v.errors.len());
    }
    Ok(())
}

fn plan(a: PlanArgs, m: &ArgMatches) -> Result<()> {
    let body = request(&a.inspect.spec, m)?;
    plan_view::show(&body, a.view, a.inspect.json)
}

// ---- the request body (contract §3) ----------------------------------------

enum Source {
    Image(String),
    Dockerfile(String),
}

/// The build request, built from the model's types: keys omitted when
/// unset, as the SDK sends it.
fn request(f: &BuildFlags, m: &ArgMatches) -> Result<BuildRequest> {
    let source = source(f)?;
    let steps = Steps::from_matches(m)?;
    let build_envs = key_values(&f.set_build_env, "--set-build-env")?;
    let mut body = BuildRequest::default();
    match source {
        Source::Image(b) => {
            body.base_image = Some(b);
            if !steps.steps.is_empty() || !build_envs.is_empty() || f.start_cmd.is_some() {
                body.set_steps(&steps.steps);
            }
        }
        Source::Dockerfile(d) => {
            if !steps.steps.is_empty() {
                bail!(
                    "step flags (--run-cmd, --apt-install, --set-user, …) cannot be combined with a Dockerfile"
                );
            }
            if matches!(f.backend, Some(Backend::Native)) {
                bail!("--backend native cannot build a Dockerfile (use buildkit or buildah)");
            }
            body.dockerfile = Some(d);
        }
    }
    if !build_envs.is_empty() {
        body.build_envs = Some(build_envs);
    }
    body.start_cmd = f.start_cmd.clone();
    let runtime = runtime_config(f, &steps)?;
    if !runtime.is_empty() {
        body.runtime_config = Some(runtime);
    }
    if let Some(auth) = f.registry.auth() {
        if f.from_base_image == Some(None) {
            bail!("registry credentials need an explicit image: --from-base-image REF");
        }
        body.set_base_image_auth(&auth);
    }
    let secrets = build_secrets(&f.build_secrets)?;
    if !secrets.is_empty() {
        body.build_secrets = Some(secrets);
    }
    if let Some(n) = &f.name {
        if n.is_empty() || n.contains(['/', ':']) {
            bail!("--name {n:?} must be a single name segment (no '/' or ':'; use --tag for tags)");
        }
        body.name = Some(n.clone());
    }
    if !f.tags.is_empty() {
        body.tags = Some(f.tags.clone());
    }
    body.build_config = Some(BuildConfig {
        vcpus: Some(f.cpu_count.into()),
        memory_mib: Some(f.memory_mb.into()),
        // Sent only when false, like the SDK.
        internet_access: f.no_internet_access.then_some(false),
        disk_mb: None,
        max_vcpus: f.max_cpu_count.map(Into::into),
        max_memory_mib: f.max_memory_mb.map(Into::into),
    });
    body.build_backend = f.backend.as_ref().map(enum_name);
    if f.skip_cache {
        body.skip_cache = Some(true);
    }
    Ok(body)
}

fn source(f: &BuildFlags) -> Result<Source> {
    let or = |v: &Option<String>, d: &str| v.clone().unwrap_or_else(|| d.to_string());
    let variant = |v: &str| match &f.image_variant {
        Some(x) => format!("{v}-{x}"),
        None => v.to_string(),
    };
    if f.image_variant.is_some() && f.from_python_image.is_none() && f.from_node_image.is_none() {
        bail!("--image-variant applies to --from-python-image and --from-node-image only");
    }
    let image = if let Some(r) = &f.from_image {
        r.clone()
    } else if let Some(r) = &f.from_base_image {
        or(r, "ubuntu:22.04")
    } else if let Some(v) = &f.from_ubuntu_image {
        format!("ubuntu:{}", or(v, "22.04"))
    } else if let Some(t) = &f.from_debian_image {
        format!("debian:{}", or(t, "stable-slim"))
    } else if let Some(v) = &f.from_python_image {
        format!("python:{}", variant(v))
    } else if let Some(v) = &f.from_node_image {
        format!("node:{}", variant(v))
    } else if let Some(v) = &f.from_bun_image {
        format!("oven/bun:{v}")
    } else if let Some(r) = &f.from_template {
        refs::from_template(r).map_err(|e| anyhow!("--from-template: {e}"))?
    } else if let Some(p) = &f.from_dockerfile {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        return Ok(Source::Dockerfile(text));
    } else if let Some(t) = &f.from_dockerfile_content {
        return Ok(Source::Dockerfile(t.clone()));
    } else {
        bail!(
            "choose a base: --from-image REF, --from-base-image, --from-ubuntu-image, --from-debian-image, --from-python-image, --from-node-image, --from-bun-image, --from-template or --from-dockerfile[-content]"
        );
    };
    if image.trim().is_empty() {
        bail!("the base image reference is empty");
    }
    Ok(Source::Image(image))
}

/// Steps in command-line order, and the runtime defaults set by
/// `--set-user` / `--set-workdir` (which are steps too, §3.3).
struct Steps {
    steps: Vec<Step>,
    user: Option<String>,
    workdir: Option<String>,
}

/// Step flags, and the modifiers that apply to the step just before them.
const STEP_ARGS: &[&str] = &[
    "set_user",
    "set_workdir",
    "run_cmd",
    "run_user",
    "apt_install",
    "pip_install",
    "pip_user_install",
    "npm_install",
    "npm_global",
    "bun_install",
    "bun_global",
    "make_dir",
    "step_skip_cache",
];

fn flag(id: &str) -> String {
    format!("--{}", id.replace('_', "-"))
}

impl Steps {
    fn from_matches(m: &ArgMatches) -> Result<Steps> {
        let mut events: Vec<(usize, &str, String)> = Vec::new();
        for id in STEP_ARGS {
            let values: Vec<String> = m
                .get_raw(id)
                .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            for (k, i) in m.indices_of(id).into_iter().flatten().enumerate() {
                events.push((i, id, values.get(k).cloned().unwrap_or_default()));
            }
        }
        events.sort_by_key(|e| e.0);
        let mut out = Steps {
            steps: Vec::new(),
            user: None,
            workdir: None,
        };
        let mut prev = "";
        for (_, id, v) in events {
            out.apply(id, v, prev)?;
            prev = id;
        }
        Ok(out)
    }

    fn apply(&mut self, id: &str, v: String, prev: &str) -> Result<()> {
        let step = match id {
            "set_user" => {
                self.user = Some(v.clone());
                Step::User { user: v }
            }
            "set_workdir" => {
                self.workdir = Some(v.clone());
                Step::Workdir { path: v }
            }
            "run_cmd" => Step::Run {
                command: v,
                user: None,
            },
            "apt_install" => Step::AptInstall {
                packages: packages(&v, &flag(id))?,
            },
            "pip_install" => Step::PipInstall {
                packages: packages(&v, &flag(id))?,
                g: true,
            },
            "npm_install" => Step::NpmInstall {
                packages: packages(&v, &flag(id))?,
                g: false,
            },
            "bun_install" => Step::BunInstall {
                packages: packages(&v, &flag(id))?,
                g: false,
            },
            "make_dir" => Step::MakeDir {
                path: v,
                mode: None,
            },
            "step_skip_cache" => Step::SkipCache,
            modifier => return self.modify(modifier, v, prev),
        };
        self.steps.push(step);
        Ok(())
    }

    /// Scope modifiers must come right after their step flag (as in the SDK CLI).
    fn modify(&mut self, id: &str, v: String, prev: &str) -> Result<()> {
        let owner = match id {
            "run_user" => "run_cmd",
            "pip_user_install" => "pip_install",
            "npm_global" => "npm_install",
            "bun_global" => "bun_install",
            other => bail!("unknown step flag {other}"),
        };
        match self.steps.last_mut() {
            Some(step) if prev == owner => {
                match step {
                    Step::Run { user, .. } => *user = Some(v),
                    Step::PipInstall { g, .. } => *g = false,
                    Step::NpmInstall { g, .. } | Step::BunInstall { g, .. } => *g = true,
                    _ => bail!("{} must come right after a {}", flag(id), flag(owner)),
                }
                Ok(())
            }
            _ => bail!("{} must come right after a {}", flag(id), flag(owner)),
        }
    }
}

fn packages(v: &str, what: &str) -> Result<Vec<String>> {
    let p: Vec<String> = v
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    if p.is_empty() {
        bail!("{what} needs at least one package");
    }
    Ok(p)
}

fn key_values(list: &[String], what: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for kv in list {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                out.insert(k.to_string(), v.to_string());
            }
            _ => bail!("{what} {kv:?} must be KEY=VALUE"),
        }
    }
    Ok(out)
}

/// `ID=VALUE` pairs; error messages name the id only, never the value.
fn build_secrets(list: &[String]) -> Result<Vec<BuildSecret>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let Some((id, value)) = item.split_once('=') else {
            bail!("--build-secret #{} must be ID=VALUE", i + 1);
        };
        if let Err(e) = rules::secret_id(id) {
            bail!("--build-secret #{}: {e}", i + 1);
        }
        if !seen.insert(id.to_string()) {
            bail!("--build-secret {id:?} is given twice");
        }
        out.push(BuildSecret {
            id: id.to_string(),
            value: Some(value.to_string()),
            source: Some("value".into()),
        });
    }
    Ok(out)
}

fn runtime_config(f: &BuildFlags, steps: &Steps) -> Result<RuntimeConfig> {
    let mut rc = RuntimeConfig {
        default_user: steps.user.clone().filter(|u| !u.is_empty()),
        default_workdir: steps.workdir.clone().filter(|w| !w.is_empty()),
        ..Default::default()
    };
    let envs = key_values(&f.set_runtime_env, "--set-runtime-env")?;
    if !envs.is_empty() {
        rc.default_envs = Some(envs);
    }
    if let Some(r) = readiness(f)? {
        rc.set_readiness(&r);
    }
    Ok(rc)
}

/// The probe of the SDK's `wait_for_*` helpers (contract §3.4), with the
/// model's default schedule unless the `--ready-*` modifiers say otherwise.
fn readiness(f: &BuildFlags) -> Result<Option<Readiness>> {
    if let Some(ms) = f.ready_timeout_ms {
        if f.ready_timeout_secs.is_some()
            || f.ready_interval_ms.is_some()
            || f.ready_startup_grace_secs.is_some()
        {
            bail!(
                "--ready-timeout-ms is a fixed delay: the other --ready-* modifiers do not apply"
            );
        }
        return Ok(Some(Readiness::timeout(ms)));
    }
    let mut probe = if let Some(p) = f.ready_port {
        if p == 0 {
            bail!("--ready-port must be 1-65535");
        }
        Readiness::tcp(p)
    } else if let Some(u) = &f.ready_url {
        let (port, path) = parse_ready_url(u)?;
        Readiness::http(port, &path)
    } else if let Some(p) = &f.ready_file {
        Readiness::file(p)
    } else if let Some(n) = &f.ready_process {
        Readiness::process(n)
    } else if let Some(c) = &f.ready_cmd {
        Readiness::command(c)
    } else {
        return Ok(None);
    };
    if let Some(t) = f.ready_timeout_secs {
        probe.timeout = Duration::from_secs(t);
    }
    if let Some(i) = f.ready_interval_ms {
        probe.interval = Duration::from_millis(i);
    }
    if let Some(g) = f.ready_startup_grace_secs {
        probe.startup_grace = Duration::from_secs(g);
    }
    Ok(Some(probe))
}

/// `wait_for_url` rules: the probe runs inside the sandbox, so only
/// `http://{localhost,127.0.0.1,0.0.0.0}:PORT[/PATH]` with an explicit
/// port and no query, fragment or credentials. Returns (port, path).
fn parse_ready_url(url: &str) -> Result<(u16, String)> {
    let bad = |why: &str| anyhow!("--ready-url {url:?}: {why}");
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected http://HOST:PORT[/PATH]"))?;
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(bad("only http:// is supported"));
    }
    if rest.contains(['?', '#']) {
        return Err(bad("query strings and fragments are not allowed"));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(bad("credentials are not allowed"));
    }
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| bad("an explicit port is required"))?;
    if !["localhost", "127.0.0.1", "0.0.0.0"].contains(&host.to_ascii_lowercase().as_str()) {
        return Err(bad("the host must be localhost, 127.0.0.1 or 0.0.0.0"));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("the port must be 1-65535"))?;
    Ok((port, path.to_string()))
}

// ---- log entries -------------------------------------------------------------

/// Prints log entries like the SDK's `str(entry)`: `==> msg` for start and
/// end, `WARN  msg` / `ERROR msg` by level, else the message; debug entries
/// are hidden in text mode. With `--json` the log goes to stderr so stdout
/// carries only the final JSON.
struct Printer {
    format: LogFormat,
    to_stderr: bool,
}

impl Printer {
    fn new(format: LogFormat, to_stderr: bool) -> Printer {
        Printer { format, to_stderr }
    }

    fn print(&self, e: &LogEntry) -> Result<()> {
        let line = match self.format {
            LogFormat::Quiet => None,
            // Through a `Value`: keys sorted, as they always printed.
            LogFormat::Jsonl => Some(serde_json::to_string(&serde_json::to_value(e)?)?),
            LogFormat::Text => render(e),
        };
        match line {
            Some(l) if self.to_stderr => eprintln!("{l}"),
            Some(l) => println!("{l}"),
            None => {}
        }
        Ok(())
    }
}

fn render(e: &LogEntry) -> Option<String> {
    let msg = &e.message;
    match (e.kind, e.level) {
        (LogKind::Start | LogKind::End, _) => Some(format!("==> {msg}")),
        (_, LogLevel::Debug) => None,
        (_, LogLevel::Warn) => Some(format!("WARN  {msg}")),
        (_, LogLevel::Error) => Some(format!("ERROR {msg}")),
        (_, LogLevel::Info) => Some(msg.to_string()),
    }
}

// ---- builds --------------------------------------------------------------------

fn builds(r: &str, q: &[(&str, String)], json_out: bool) -> Result<()> {
    // The SDK routes raw template ids to /v1/templates/{id}/builds (§11).
    let path = if r.starts_with("tmpl_") {
        format!("/v1/templates/{}/builds", enc(r))
    } else {
        ref_path(r, "/builds")
    };
    let v: BuildPage = Api::from_env()?.get(&with_query(&path, q))?;
    if json_out {
        return print_json(&v);
    }
    for b in &v.builds {
        println!(
            "{}  {:<9}  {:<13}  {:<8}  {}  {}",
            b.build_id,
            b.status.as_str(),
            b.source_type,
            b.build_backend,
            b.created_at,
            b.tags.join(",")
        );
    }
    if let Some(c) = &v.next_cursor {
        eprintln!("more builds: --cursor {c}");
    }
    Ok(())
}

fn logs(build_id: &str, offset: u64, follow: bool, json_out: bool) -> Result<()> {
    let path = format!(
        "/v1/templates/builds/{}/logs?offset={offset}&follow={follow}",
        enc(build_id)
    );
    let printer = Printer::new(
        if json_out {
            LogFormat::Jsonl
        } else {
            LogFormat::Text
        },
        false,
    );
    // The server closes the stream: after replay, or with --follow once the
    // build is finished and drained.
    Api::from_env()?.sse(Method::GET, &path, None, |e| {
        printer.print(&e).map(|()| true)
    })
}

/// Polls the status endpoint from `offset` (each answer's `next_offset`
/// feeds the next), printing new entries, until the build is terminal.
fn wait(
    build_id: &str,
    mut offset: u64,
    every: Duration,
    format: LogFormat,
    json_out: bool,
) -> Result<()> {
    let api = Api::from_env()?;
    let printer = Printer::new(format, json_out);
    loop {
        let snap: StatusSnapshot = api.get(&status_path(build_id, offset))?;
        for e in &snap.entries {
            printer.print(e)?;
        }
        offset = u64::try_from(snap.next_offset).context("the status answer's next_offset")?;
        if snap.build.status.is_terminal() {
            return finished(&snap.build, json_out);
        }
        std::thread::sleep(every);
    }
}

/// Reports a terminal build: ready succeeds; error fails with its detail;
/// cancelled fails too, since a script waiting for a template did not get one.
fn finished(rec: &BuildRecord, json_out: bool) -> Result<()> {
    if json_out {
        print_json(rec)?;
    }
    let id = &rec.build_id;
    match rec.status {
        Status::Ready => {
            if !json_out {
                println!(
                    "ready: {} (template {}, build {id})",
                    rec.canonical_ref, rec.template_id
                );
            }
            Ok(())
        }
        Status::Cancelled => {
            let why = rec
                .cancellation_reason
                .as_ref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            bail!("build {id} was cancelled{why}")
        }
        _ => {
            let fallback = rec.error.as_deref().unwrap_or("template build failed");
            Err(ApiError::from_detail(rec.error_detail.as_ref(), fallback).into())
        }
    }
}

fn cancel(build_id: &str, reason: Option<String>, json_out: bool) -> Result<()> {
    let body = CancelBody { reason };
    let path = format!("/v1/templates/builds/{}/cancel", enc(build_id));
    let snap: StatusSnapshot = Api::from_env()?.post(&path, &body)?;
    if json_out {
        return print_json(&snap);
    }
    println!("build {build_id}: {}", snap.build.status);
    Ok(())
}

fn retry(
    build_id: &str,
    tags: Vec<String>,
    secrets: &[String],
    registry: &RegistryArgs,
    json_out: bool,
) -> Result<()> {
    let secrets = build_secrets(secrets)?;
    let body = RetryBody {
        tags: (!tags.is_empty()).then_some(tags),
        base_image_auth: registry.auth().map(|a| a.to_json()),
        registry_auth: None,
        build_secrets: (!secrets.is_empty()).then_some(secrets),
    };
    let path = format!("/v1/templates/builds/{}/retry", enc(build_id));
    let rec: BuildRecord = Api::from_env()?.post(&path, &body)?;
    print_started(&rec, json_out)
}

// ---- templates -------------------------------------------------------------------

fn info_line(t: &TemplateInfo) -> String {
    format!(
        "{}  {}  {}  tags={}",
        t.canonical_ref,
        t.id,
        t.visibility,
        t.tags.join(",")
    )
}

fn print_info(info: &TemplateInfo, json_out: bool) -> Result<()> {
    if json_out {
        return print_json(info);
    }
    println!("{}", info_line(info));
    Ok(())
}

fn list(fields: Option<String>, json_out: bool) -> Result<()> {
    let mut q = Vec::new();
    let raw = fields.is_some();
    push_q(&mut q, "fields", fields);
    let path = with_query("/v1/templates", &q);
    let api = Api::from_env()?;
    if raw {
        // `--fields` answers are raw subsets: show them as they are.
        return print_json(&api.get::<Value>(&path)?);
    }
    let v: Vec<TemplateInfo> = api.get(&path)?;
    if json_out {
        return print_json(&v);
    }
    for t in &v {
        println!("{}", info_line(t));
    }
    Ok(())
}

/// False only when the server says `template_not_found` (or the SDK's
/// `sandbox_not_found`); any other failure is an error (contract §0.2).
fn exists(r: &str) -> Result<()> {
    let found = match Api::from_env()?.get::<IgnoredAny>(&ref_path(r, "")) {
        Ok(_) => true,
        Err(e) => match e.downcast_ref::<ApiError>() {
            Some(a) if a.code == "template_not_found" || a.code == "sandbox_not_found" => false,
            _ => return Err(e),
        },
    };
    #[derive(Serialize)]
    struct Exists<'a> {
        template_ref: &'a str,
        exists: bool,
    }
    println!(
        "{}",
        serde_json::to_string(&Exists {
            template_ref: r,
            exists: found
        })?
    );
    Ok(())
}

fn tag(t: TagCommand) -> Result<()> {
    let api = Api::from_env()?;
    match t {
        TagCommand::Assign {
            template_ref,
            tags,
            json,
        } => {
            let info: TemplateInfo =
                api.post(&ref_path(&template_ref, "/tags"), &TagsBody { tags })?;
            print_info(&info, json)
        }
        TagCommand::List { template_ref, json } => {
            let v: Vec<TagEntry> = api.get(&ref_path(&template_ref, "/tags"))?;
            if json {
                return print_json(&v);
            }
            for t in &v {
                println!("{}  {}  {}", t.tag, t.build_id, t.created_at);
            }
            Ok(())
        }
        TagCommand::Remove { template_ref, tag } => {
            let path = ref_path(&template_ref, &format!("/tags/{}", enc(&tag)));
            api.send_json::<IgnoredAny>(Method::DELETE, &path, None)?;
            println!("removed tag {tag} from {template_ref}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_refs_as_one_segment() {
        assert_eq!(enc("acme/t1:stable"), "acme%2Ft1%3Astable");
        assert_eq!(enc("tb_AZ-09._~"), "tb_AZ-09._~");
    }

    #[test]
    fn ready_url_rules() {
        assert_eq!(
            parse_ready_url("http://127.0.0.1:3000/ready").unwrap(),
            (3000, "/ready".into())
        );
        assert_eq!(
            parse_ready_url("http://0.0.0.0:9000").unwrap(),
            (9000, "/".into())
        );
        for bad in [
            "https://localhost:1/",
            "http://example.com:1/",
            "http://localhost/",
            "http://localhost:0/",
            "http://localhost:1/?q",
            "http://localhost:1/#f",
            "http://u:p@localhost:1/",
        ] {
            assert!(parse_ready_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn error_bodies_flat_and_nested() {
        let e = ApiError::from_body(
            404,
            r#"{"error":"template \"x\" not found","code":"template_not_found"}"#,
        );
        assert_eq!(
            e.to_string(),
            "template \"x\" not found (code template_not_found)"
        );
        let e = ApiError::from_body(
            400,
            r#"{"error":{"message":"bad","code":"build_error","error_detail":{"phase":"prepare"}}}"#,
        );
        assert_eq!(e.to_string(), "bad (code build_error, phase prepare)");
        let e = ApiError::from_body(502, "Bad Gateway");
        assert_eq!(e.to_string(), "HTTP 502: Bad Gateway (code unknown)");
    }
}
