//! One plan, many views: each view of `POST /v1/templates/plan?view=…`
//! (and `nullspace template plan --view …`) is a pure function of the one
//! [`BuildPlan`], so no view can disagree with what a build of the same
//! request runs.
//!
//! - [`deps`]: the dependency graph (base → layers → steps → rootfs → VM
//!   → snapshot) as nodes and edges;
//! - [`steps`]: the ordered steps, where each runs and its shell line;
//! - [`outputs`]: the artifacts and digests, saying which are known before
//!   a build and which only once it has run;
//! - [`dry_run`]: what would run and what the caches hold, from the plan
//!   plus [`CacheFacts`], the server's look at its own caches (the only
//!   input that is not the plan).

use serde::{Deserialize, Serialize};

use super::plan::{BuildPlan, Route, Source};
use super::step::Step;

/// Which view of the plan to answer with (`?view=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum PlanView {
    /// The plan itself (`PlanResponse`), the answer without `?view`.
    #[default]
    Plan,
    Deps,
    DryRun,
    Steps,
    Outputs,
}

impl PlanView {
    pub const ALL: [PlanView; 5] = [
        PlanView::Plan,
        PlanView::Deps,
        PlanView::DryRun,
        PlanView::Steps,
        PlanView::Outputs,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PlanView::Plan => "plan",
            PlanView::Deps => "deps",
            PlanView::DryRun => "dry-run",
            PlanView::Steps => "steps",
            PlanView::Outputs => "outputs",
        }
    }

    pub fn parse(s: &str) -> Option<PlanView> {
        PlanView::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl std::fmt::Display for PlanView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---- deps ----------------------------------------------------------------

/// What a node of the dependency graph stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    BaseImage,
    BaseTemplate,
    Layers,
    Dockerfile,
    Context,
    Step,
    Engine,
    Rootfs,
    Vm,
    Start,
    Snapshot,
}

/// One node; `digest` is set where the plan already knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DepNode {
    pub id: String,
    pub kind: NodeKind,
    pub label: String,
    pub digest: Option<String>,
}

/// `from` is an input of `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DepEdge {
    pub from: String,
    pub to: String,
}

/// `?view=deps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DepsView {
    pub view: PlanView,
    pub route: Route,
    pub nodes: Vec<DepNode>,
    pub edges: Vec<DepEdge>,
}

struct Graph {
    nodes: Vec<DepNode>,
    edges: Vec<DepEdge>,
}

impl Graph {
    fn node(&mut self, id: &str, kind: NodeKind, label: String, digest: Option<String>) -> String {
        self.nodes.push(DepNode {
            id: id.into(),
            kind,
            label,
            digest,
        });
        id.into()
    }
    fn edge(&mut self, from: &str, to: &str) {
        self.edges.push(DepEdge {
            from: from.into(),
            to: to.into(),
        });
    }
}

fn step_id(i: usize) -> String {
    format!("step-{}", i + 1)
}

/// Steps that read the build context.
fn reads_context(s: &Step) -> bool {
    matches!(s, Step::Copy(_) | Step::CopyItems { .. })
}

/// The dependency graph of a build of `p`, in build order.
pub fn deps(p: &BuildPlan) -> DepsView {
    let mut g = Graph {
        nodes: vec![],
        edges: vec![],
    };
    // The chain's current tail: each stage's output feeds the next.
    let mut tail = match &p.source {
        Source::Image { reference } => {
            let base = g.node("base", NodeKind::BaseImage, reference.clone(), None);
            let layers = g.node(
                "layers",
                NodeKind::Layers,
                "the image's layers (digests known once the reference is resolved)".into(),
                None,
            );
            g.edge(&base, &layers);
            layers
        }
        Source::Template { reference } => {
            g.node("base", NodeKind::BaseTemplate, reference.clone(), None)
        }
        Source::Dockerfile { digest, .. } => g.node(
            "dockerfile",
            NodeKind::Dockerfile,
            "Dockerfile".into(),
            Some(digest.clone()),
        ),
    };
    let context = p.context.as_ref().map(|c| {
        g.node(
            "context",
            NodeKind::Context,
            format!("build context, {} entries", c.file_count()),
            Some(c.digest.clone()),
        )
    });
    let engine_steps = |g: &mut Graph, tail: String| -> String {
        let mut tail = tail;
        for (i, s) in p.steps.iter().enumerate() {
            let id = g.node(
                &step_id(i),
                NodeKind::Step,
                format!("{} ({})", s.action(), runner(p.route)),
                None,
            );
            g.edge(&tail, &id);
            if let Some(c) = &context
                && reads_context(s)
            {
                g.edge(c, &id);
            }
            tail = id;
        }
        tail
    };
    match p.route {
        Route::Engine => {
            if let Source::Dockerfile { .. } = p.source {
                let engine = g.node(
                    "engine",
                    NodeKind::Engine,
                    format!("{} build", p.backend),
                    None,
                );
                g.edge(&tail, &engine);
                if let Some(c) = &context {
                    g.edge(c, &engine);
                }
                tail = engine;
            } else {
                tail = engine_steps(&mut g, tail);
            }
            let rootfs = g.node("rootfs", NodeKind::Rootfs, rootfs_label(p), None);
            g.edge(&tail, &rootfs);
            tail = rootfs;
        }
        Route::Import | Route::NativeSteps => {
            let rootfs = g.node("rootfs", NodeKind::Rootfs, rootfs_label(p), None);
            g.edge(&tail, &rootfs);
            tail = rootfs;
        }
    }
    let vm = g.node(
        "vm",
        NodeKind::Vm,
        format!("build VM, {} vCPU, {} MiB", p.vm.vcpus, p.vm.memory_mib),
        None,
    );
    g.edge(&tail, &vm);
    tail = vm;
    if p.route == Route::NativeSteps {
        tail = engine_steps(&mut g, tail);
    }
    if let Some(cmd) = &p.runtime.start_cmd {
        let start = g.node("start", NodeKind::Start, cmd.clone(), None);
        g.edge(&tail, &start);
        tail = start;
    }
    let snapshot = g.node(
        "snapshot",
        NodeKind::Snapshot,
        "template snapshot (memory, device state, disk)".into(),
        None,
    );
    g.edge(&tail, &snapshot);
    DepsView {
        view: PlanView::Deps,
        route: p.route,
        nodes: g.nodes,
        edges: g.edges,
    }
}

fn rootfs_label(p: &BuildPlan) -> String {
    match (&p.route, &p.source) {
        (Route::Engine, _) => "ext4 root filesystem imported from the engine's output".into(),
        (_, Source::Template { .. }) => "the base template's root filesystem".into(),
        _ => "ext4 root filesystem flattened from the layers".into(),
    }
}

// ---- steps ---------------------------------------------------------------

/// Where a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum StepRunner {
    /// In the build VM, through the guest agent.
    BuildVm,
    /// In a Dockerfile engine, as a rendered instruction.
    Engine,
}

impl std::fmt::Display for StepRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StepRunner::BuildVm => "build VM",
            StepRunner::Engine => "engine",
        })
    }
}

fn runner(route: Route) -> StepRunner {
    match route {
        Route::Engine => StepRunner::Engine,
        Route::Import | Route::NativeSteps => StepRunner::BuildVm,
    }
}

/// One step, with its 1-based index (a log entry's `step_index`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PlannedStep {
    pub index: usize,
    pub runs_in: StepRunner,
    /// The fixed shell line of actions that run as one (`None` for `run`,
    /// whose command is the user's own, and file or setting actions).
    pub shell: Option<String>,
    #[serde(flatten)]
    pub step: Step,
}

/// `?view=steps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StepsView {
    pub view: PlanView,
    pub route: Route,
    pub steps: Vec<PlannedStep>,
    /// Runs after the steps, before the snapshot.
    pub start_cmd: Option<String>,
    /// A Dockerfile build's steps are its instructions (see the plan's
    /// `stages`), not declarative steps.
    pub dockerfile_digest: Option<String>,
}

pub fn steps(p: &BuildPlan) -> StepsView {
    StepsView {
        view: PlanView::Steps,
        route: p.route,
        steps: p
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| PlannedStep {
                index: i + 1,
                runs_in: runner(p.route),
                shell: s.shell_command(),
                step: s.clone(),
            })
            .collect(),
        start_cmd: p.runtime.start_cmd.clone(),
        dockerfile_digest: p.digests.dockerfile_digest.clone(),
    }
}

// ---- outputs -------------------------------------------------------------

/// When a digest becomes known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Known {
    /// From the request alone (given here).
    BeforeBuild,
    /// When the build starts and resolves its bases (a `dry-run` resolves
    /// them now).
    AtBuildStart,
    /// Only once the build has produced it.
    AfterBuild,
}

/// What an output is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// A digest of the build's inputs (also in the build record).
    Input,
    /// A cache key (or the plan's part of one).
    CacheKey,
    /// A resolved base.
    Base,
    /// Something the build writes to the artifact store.
    Artifact,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Output {
    pub name: String,
    pub kind: OutputKind,
    pub known: Known,
    /// Set when `known` is `before_build`.
    pub digest: Option<String>,
    pub description: String,
}

/// `?view=outputs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OutputsView {
    pub view: PlanView,
    pub outputs: Vec<Output>,
}

pub fn outputs(p: &BuildPlan) -> OutputsView {
    let mut out = vec![];
    let mut push = |name: &str, kind, known, digest: Option<String>, description: &str| {
        out.push(Output {
            name: name.into(),
            kind,
            known,
            digest,
            description: description.into(),
        })
    };
    use Known::*;
    use OutputKind::*;
    push(
        "source_digest",
        Input,
        BeforeBuild,
        Some(p.digests.source_digest.clone()),
        "everything that decides the template's content (source, steps, envs, runtime settings, context digest)",
    );
    if let Some(d) = &p.digests.dockerfile_digest {
        push(
            "dockerfile_digest",
            Input,
            BeforeBuild,
            Some(d.clone()),
            "the Dockerfile's text",
        );
    }
    if let Some(d) = &p.digests.context_digest {
        push(
            "context_digest",
            Input,
            BeforeBuild,
            Some(d.clone()),
            "the build context: paths, types, modes and content",
        );
    }
    push(
        "final_artifact_inputs",
        CacheKey,
        BeforeBuild,
        Some(p.cache.final_artifact_inputs.clone()),
        "the plan's part of the final-artifact cache key (source digest, backend, disk size, network, secret ids)",
    );
    match &p.source {
        Source::Image { .. } => {
            push(
                "base_manifest_digest",
                Base,
                AtBuildStart,
                None,
                "the manifest the base reference resolves to",
            );
            push(
                "layer_digests",
                Base,
                AtBuildStart,
                None,
                "the base image's layers (the layer cache's keys)",
            );
        }
        Source::Template { .. } => push(
            "base_rootfs_digest",
            Base,
            AtBuildStart,
            None,
            "the base template's root filesystem",
        ),
        Source::Dockerfile { .. } => {}
    }
    if p.route == Route::Engine {
        push(
            "final_artifact_key",
            CacheKey,
            AtBuildStart,
            None,
            "the final-artifact cache key: the inputs plus resolved base digests, engine and version, VM settings",
        );
    }
    push(
        "rootfs_digest",
        Artifact,
        AfterBuild,
        None,
        "sha256 of the template's rootfs.ext4",
    );
    push(
        "artifact_digest",
        Artifact,
        AfterBuild,
        None,
        "sha256 of the artifact manifest (the build record's artifact_ids[0])",
    );
    push(
        "snapshot",
        Artifact,
        AfterBuild,
        None,
        "the template snapshot (memory.ram, device.state, disk.ext4, each with its sha256 in its manifest), taken when the server has a build VM",
    );
    OutputsView {
        view: PlanView::Outputs,
        outputs: out,
    }
}

// ---- dry-run -------------------------------------------------------------

/// What the server found in its caches for a plan (the dry-run's only
/// input besides the plan).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheFacts {
    /// Whether the server boots build VMs (steps, start, snapshot).
    pub build_vm: bool,
    pub base: Option<BaseFacts>,
    /// Engine builds: the final-artifact cache key and whether a ready
    /// build's artifact is stored under it.
    pub final_artifact: Option<Result<CachedKey, String>>,
}

/// The base, as the server resolved it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BaseFacts {
    Image {
        manifest_digest: String,
        /// `(compressed digest, held by the layer cache)`, in order.
        layers: Vec<(String, bool)>,
    },
    Template {
        rootfs_digest: String,
    },
    /// It could not be resolved now (the message says why).
    Unresolved(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedKey {
    pub key: String,
    pub cached: bool,
}

/// What a dry-run says a stage would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// It would run.
    Run,
    /// The cache holds its result: it would be reused.
    Cached,
    /// `skip_cache`: it would run, the cache unread and unwritten.
    Bypass,
    /// It would not run (an earlier cached result covers it, or this
    /// server does not do it).
    Skip,
    /// The server could not tell now (`detail` says why).
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DryRunStage {
    /// `resolve_base`, `layer`, `final_artifact`, `engine`, `rootfs`,
    /// `vm`, `steps`, `start`, `snapshot`.
    pub stage: String,
    /// What the stage is about (a reference, a digest, a key).
    pub subject: Option<String>,
    pub action: Action,
    /// Whether the cache holds the result; `None` where no cache applies.
    pub cached: Option<bool>,
    pub detail: String,
}

/// `?view=dry-run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DryRunView {
    pub view: PlanView,
    pub route: Route,
    /// False only when the whole result is cached.
    pub would_build: bool,
    /// Stages whose result the cache holds.
    pub cached_stages: usize,
    /// Stages that would run (including bypassed ones).
    pub run_stages: usize,
    pub stages: Vec<DryRunStage>,
}

pub fn dry_run(p: &BuildPlan, facts: &CacheFacts) -> DryRunView {
    let mut stages: Vec<DryRunStage> = vec![];
    let mut add = |stage: &str, subject: Option<String>, action, cached, detail: String| {
        stages.push(DryRunStage {
            stage: stage.into(),
            subject,
            action,
            cached,
            detail,
        })
    };
    let skip = p.cache.skip_cache;
    // The cache's verdict on one cacheable stage.
    let verdict = |held: bool| {
        if skip {
            (Action::Bypass, Some(false))
        } else if held {
            (Action::Cached, Some(true))
        } else {
            (Action::Run, Some(false))
        }
    };
    let mut whole_cached = false;
    match (&p.source, &facts.base) {
        (Source::Dockerfile { .. }, _) => {}
        (s, Some(BaseFacts::Unresolved(why))) => add(
            "resolve_base",
            s.base_ref().map(str::to_string),
            Action::Unknown,
            None,
            why.clone(),
        ),
        (s, None) => add(
            "resolve_base",
            s.base_ref().map(str::to_string),
            Action::Run,
            None,
            "resolved when the build starts".into(),
        ),
        (
            Source::Image { reference },
            Some(BaseFacts::Image {
                manifest_digest,
                layers,
            }),
        ) => {
            add(
                "resolve_base",
                Some(reference.clone()),
                Action::Run,
                None,
                format!("{reference} resolves to {manifest_digest} now"),
            );
            // Engines pull their bases themselves: the layer cache is the
            // importer's, used by the other routes.
            if p.route != Route::Engine {
                for (digest, held) in layers {
                    let (action, cached) = verdict(*held);
                    let detail = match action {
                        Action::Cached => "in the layer cache: reused",
                        Action::Bypass => "skip_cache: fetched, not stored",
                        _ => "not in the layer cache: fetched and stored",
                    };
                    add("layer", Some(digest.clone()), action, cached, detail.into());
                }
            }
        }
        (Source::Template { reference }, Some(BaseFacts::Template { rootfs_digest })) => add(
            "resolve_base",
            Some(reference.clone()),
            Action::Cached,
            Some(true),
            format!("the template's root filesystem {rootfs_digest} is reused"),
        ),
        (s, Some(other)) => add(
            "resolve_base",
            s.base_ref().map(str::to_string),
            Action::Unknown,
            None,
            format!("unexpected base facts for this source: {other:?}"),
        ),
    }
    if p.route == Route::Engine {
        match &facts.final_artifact {
            Some(Ok(k)) => {
                let (action, cached) = verdict(k.cached);
                whole_cached = action == Action::Cached;
                let detail = match action {
                    Action::Cached => "a ready build's artifact and snapshot are reused",
                    Action::Bypass => "skip_cache: the cache is neither read nor written",
                    _ => "no ready build under this key: built and stored",
                };
                add(
                    "final_artifact",
                    Some(k.key.clone()),
                    action,
                    cached,
                    detail.into(),
                );
            }
            Some(Err(why)) => add("final_artifact", None, Action::Unknown, None, why.clone()),
            None => add(
                "final_artifact",
                None,
                Action::Unknown,
                None,
                "the key needs the resolved bases".into(),
            ),
        }
        let (action, detail) = if whole_cached {
            (Action::Skip, "the cached artifact covers it".to_string())
        } else {
            let what = if p.steps.is_empty() {
                "the Dockerfile".to_string()
            } else {
                format!("{} rendered step(s)", p.steps.len())
            };
            (Action::Run, format!("{} runs {what}", p.backend))
        };
        add("engine", None, action, None, detail);
    }
    let covered = |a: Action| if whole_cached { Action::Skip } else { a };
    let rootfs_detail = match (&p.route, &p.source) {
        _ if whole_cached => "the cached artifact covers it".to_string(),
        (Route::Engine, _) => "the engine's output imported to ext4".into(),
        (_, Source::Template { .. }) => "the template's root filesystem, as is".into(),
        _ => "the layers flattened to a new ext4 (no cache holds imported root filesystems)".into(),
    };
    let rootfs_action = match (&p.route, &p.source) {
        (Route::Import | Route::NativeSteps, Source::Template { .. }) => Action::Skip,
        _ => covered(Action::Run),
    };
    add("rootfs", None, rootfs_action, None, rootfs_detail);
    let vm_action = |what: &str| -> (Action, String) {
        if whole_cached {
            (
                Action::Skip,
                "the cached artifact's snapshot covers it".into(),
            )
        } else if facts.build_vm {
            (Action::Run, what.into())
        } else {
            (
                Action::Skip,
                "this server has no build VM (--build-vm): the template is its root filesystem only"
                    .into(),
            )
        }
    };
    let (a, d) = vm_action("boot the build VM on the root filesystem");
    add("vm", None, a, None, d);
    if p.route == Route::NativeSteps {
        let (a, d) = if !facts.build_vm && !whole_cached {
            (
                Action::Skip,
                "fails at preflight: native steps need a server with --build-vm".into(),
            )
        } else {
            vm_action(&format!(
                "{} step(s) run in the build VM (no per-step cache)",
                p.steps.len()
            ))
        };
        add("steps", None, a, None, d);
    }
    if let Some(cmd) = &p.runtime.start_cmd {
        let (a, d) = vm_action("start, then wait for readiness");
        add("start", Some(cmd.clone()), a, None, d);
    }
    let (a, d) = vm_action("snapshot the running VM");
    add("snapshot", None, a, None, d);
    let cached_stages = stages.iter().filter(|s| s.action == Action::Cached).count();
    let run_stages = stages
        .iter()
        .filter(|s| matches!(s.action, Action::Run | Action::Bypass))
        .count();
    DryRunView {
        view: PlanView::DryRun,
        route: p.route,
        would_build: !whole_cached,
        cached_stages,
        run_stages,
        stages,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::plan::{PlanContext, plan};
    use crate::build::status::Backend;
    use serde_json::json;

    fn planned(v: serde_json::Value) -> BuildPlan {
        let req = serde_json::from_value(v).unwrap();
        plan(
            &req,
            &PlanContext {
                namespace: Some("team-a"),
                engines: Some(&[Backend::Buildah]),
            },
        )
        .unwrap()
    }

    fn chain(d: &DepsView) -> Vec<String> {
        // Follows the edges from the first node, preferring the non-context
        // successor, to read the graph's spine.
        let mut at = d.nodes[0].id.clone();
        let mut out = vec![at.clone()];
        while let Some(e) = d.edges.iter().find(|e| e.from == at) {
            at = e.to.clone();
            out.push(at.clone());
        }
        out
    }

    #[test]
    fn view_names_round_trip() {
        for v in PlanView::ALL {
            assert_eq!(PlanView::parse(v.as_str()), Some(v));
            assert_eq!(serde_json::to_value(v).unwrap(), json!(v.as_str()));
        }
        assert_eq!(PlanView::parse("dry_run"), None);
    }

    #[test]
    fn deps_per_route() {
        let p = planned(json!({"base_image": "r/x:1",
            "steps": [{"action":"run","command":"make"},{"action":"copy","sources":["a"],"dst":"/a"}],
            "start_cmd": "./serve",
            "build_context": {"files": [{"path":"a","entry_type":"file","content_base64":"eA=="}]}}));
        let d = deps(&p);
        assert_eq!(d.route, Route::NativeSteps);
        assert_eq!(
            chain(&d),
            [
                "base", "layers", "rootfs", "vm", "step-1", "step-2", "start", "snapshot"
            ]
        );
        // The context feeds the copy step only, with its digest.
        let ctx: Vec<_> = d.edges.iter().filter(|e| e.from == "context").collect();
        assert_eq!(ctx.len(), 1);
        assert_eq!(ctx[0].to, "step-2");
        let node = d.nodes.iter().find(|n| n.id == "context").unwrap();
        assert_eq!(node.digest, p.digests.context_digest);

        let p = planned(json!({"base_image": "r/x:1", "build_backend": "buildah",
            "steps": [{"action":"run","command":"make"}]}));
        assert_eq!(
            chain(&deps(&p)),
            ["base", "layers", "step-1", "rootfs", "vm", "snapshot"]
        );
        let p = planned(json!({"dockerfile": "FROM x\n"}));
        let d = deps(&p);
        assert_eq!(
            chain(&d),
            ["dockerfile", "engine", "rootfs", "vm", "snapshot"]
        );
        assert_eq!(d.nodes[0].digest, p.digests.dockerfile_digest);
        let p = planned(json!({"base_image": "team-a/base:v1"}));
        let d = deps(&p);
        assert_eq!(chain(&d), ["base", "rootfs", "vm", "snapshot"]);
        assert_eq!(d.nodes[0].kind, NodeKind::BaseTemplate);
        // Every edge joins two nodes.
        for e in &d.edges {
            assert!(d.nodes.iter().any(|n| n.id == e.from));
            assert!(d.nodes.iter().any(|n| n.id == e.to));
        }
    }

    #[test]
    fn steps_in_order_with_their_runner() {
        let p = planned(json!({"base_image": "r/x:1",
            "steps": [{"action":"apt_install","packages":["curl"]},{"action":"run","command":"make"}],
            "start_cmd": "./serve"}));
        let s = steps(&p);
        assert_eq!(s.steps.iter().map(|s| s.index).collect::<Vec<_>>(), [1, 2]);
        assert!(s.steps.iter().all(|s| s.runs_in == StepRunner::BuildVm));
        assert!(
            s.steps[0]
                .shell
                .as_deref()
                .unwrap()
                .contains("apt-get install -y curl")
        );
        assert_eq!(s.steps[1].shell, None);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["view"], "steps");
        assert_eq!(v["steps"][1]["action"], "run");
        assert_eq!(v["steps"][1]["command"], "make");
        assert_eq!(v["start_cmd"], "./serve");
        let p = planned(json!({"base_image": "r/x:1", "build_backend": "buildah",
            "steps": [{"action":"run","command":"make"}]}));
        assert_eq!(steps(&p).steps[0].runs_in, StepRunner::Engine);
    }

    #[test]
    fn outputs_say_when_known() {
        let p = planned(json!({"dockerfile": "FROM x\n",
            "build_context": {"files": [{"path":"a","entry_type":"file","content_base64":"eA=="}]}}));
        let o = outputs(&p);
        let get = |n: &str| o.outputs.iter().find(|x| x.name == n).unwrap();
        assert_eq!(
            get("source_digest").digest.as_ref(),
            Some(&p.digests.source_digest)
        );
        assert_eq!(get("dockerfile_digest").digest, p.digests.dockerfile_digest);
        assert_eq!(get("context_digest").digest, p.digests.context_digest);
        assert_eq!(
            get("final_artifact_inputs").digest.as_ref(),
            Some(&p.cache.final_artifact_inputs)
        );
        assert_eq!(get("final_artifact_key").known, Known::AtBuildStart);
        for n in ["rootfs_digest", "artifact_digest", "snapshot"] {
            assert_eq!((get(n).known, &get(n).digest), (Known::AfterBuild, &None));
        }
        // Known before the build ⇔ a digest is given.
        for x in &o.outputs {
            assert_eq!(x.known == Known::BeforeBuild, x.digest.is_some(), "{x:?}");
        }
        let p = planned(json!({"base_image": "r/x:1"}));
        let o = outputs(&p);
        assert!(o.outputs.iter().any(|x| x.name == "layer_digests"));
        assert!(!o.outputs.iter().any(|x| x.name == "final_artifact_key"));
    }

    fn stage<'a>(d: &'a DryRunView, name: &str) -> Vec<&'a DryRunStage> {
        d.stages.iter().filter(|s| s.stage == name).collect()
    }

    #[test]
    fn dry_run_reads_the_facts() {
        let p = planned(json!({"base_image": "r/x:1", "start_cmd": "./serve"}));
        let facts = |held: bool| CacheFacts {
            build_vm: true,
            base: Some(BaseFacts::Image {
                manifest_digest: "sha256:m".into(),
                layers: vec![("sha256:a".into(), true), ("sha256:b".into(), held)],
            }),
            final_artifact: None,
        };
        let cold = dry_run(&p, &facts(false));
        let layers = stage(&cold, "layer");
        assert_eq!(
            layers.iter().map(|s| s.action).collect::<Vec<_>>(),
            [Action::Cached, Action::Run]
        );
        assert_eq!(layers[1].subject.as_deref(), Some("sha256:b"));
        assert!(cold.would_build);
        let warm = dry_run(&p, &facts(true));
        assert_eq!(warm.cached_stages, cold.cached_stages + 1);
        assert_eq!(stage(&warm, "start")[0].action, Action::Run);
        assert_eq!(stage(&warm, "snapshot")[0].action, Action::Run);
        // skip_cache bypasses what would have been hits.
        let p2 = planned(json!({"base_image": "r/x:1", "skip_cache": true}));
        let b = dry_run(&p2, &facts(true));
        assert!(
            stage(&b, "layer")
                .iter()
                .all(|s| s.action == Action::Bypass)
        );
        // Without a build VM nothing boots.
        let mut f = facts(true);
        f.build_vm = false;
        let d = dry_run(&p, &f);
        assert_eq!(stage(&d, "snapshot")[0].action, Action::Skip);
    }

    #[test]
    fn dry_run_of_a_template_base() {
        let p = planned(json!({"base_image": "team-a/base:v1"}));
        let found = dry_run(
            &p,
            &CacheFacts {
                build_vm: true,
                base: Some(BaseFacts::Template {
                    rootfs_digest: "sha256:r".into(),
                }),
                final_artifact: None,
            },
        );
        let base = stage(&found, "resolve_base");
        assert_eq!(
            (base[0].action, base[0].cached),
            (Action::Cached, Some(true))
        );
        assert!(base[0].detail.contains("sha256:r"));
        assert_eq!(stage(&found, "rootfs")[0].action, Action::Skip);
        assert!(stage(&found, "layer").is_empty());
        let missing = dry_run(
            &p,
            &CacheFacts {
                build_vm: true,
                base: Some(BaseFacts::Unresolved(
                    "template team-a/base:v1 not found".into(),
                )),
                final_artifact: None,
            },
        );
        let base = stage(&missing, "resolve_base");
        assert_eq!(base[0].action, Action::Unknown);
        assert!(base[0].detail.contains("not found"));
    }

    #[test]
    fn dry_run_engine_cache_hit_covers_the_rest() {
        let p = planned(json!({"dockerfile": "FROM x\n"}));
        let facts = |cached| CacheFacts {
            build_vm: true,
            base: None,
            final_artifact: Some(Ok(CachedKey {
                key: "sha256:k".into(),
                cached,
            })),
        };
        let hit = dry_run(&p, &facts(true));
        assert!(!hit.would_build);
        assert_eq!(stage(&hit, "final_artifact")[0].cached, Some(true));
        for s in ["engine", "rootfs", "vm", "snapshot"] {
            assert_eq!(stage(&hit, s)[0].action, Action::Skip, "{s}");
        }
        let miss = dry_run(&p, &facts(false));
        assert!(miss.would_build);
        assert_eq!(stage(&miss, "engine")[0].action, Action::Run);
        let unknown = dry_run(
            &p,
            &CacheFacts {
                final_artifact: Some(Err("resolving x: refused".into())),
                ..facts(false)
            },
        );
        assert_eq!(stage(&unknown, "final_artifact")[0].action, Action::Unknown);
    }
}
