//! The build VM stage: boot the template's rootfs, run the plan's native
//! steps (if any), start the start command, wait for readiness, snapshot
//! memory and disk. The VM driver (`nullspace_vm::template`) does the
//! boot → steps → start → readiness → snapshot sequence; this module gives
//! it typed inputs ([`vm_spec`], [`native_context`]), logs each step with
//! its 1-based index, and maps what went wrong onto the SDK's failure
//! phases ([`vm_failure`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nullspace_model::build::plan::{BuildPlan, Route};
use nullspace_model::build::probe::Readiness;
use nullspace_model::build::step::Step;
use nullspace_vm::template::{
    NativeSteps, Snapshot, StepEvent, TemplateSpec, build_snapshot, build_snapshot_with_steps,
};
use nullspace_vm::{QemuVmm, VmError};

use super::Run;
use super::context::context_entries;
use crate::builds::lifecycle::entry;
use crate::builds::{ArtifactManifest, FailedStep, Failure, failed, upload_failed};
use crate::model::*;

/// Boots the template in the build VM, runs the plan's native steps (on
/// the `NativeSteps` route), starts its start command with the runtime
/// defaults, waits for readiness and snapshots memory and disk into
/// `artifacts/snapshots/<build>.<attempt>`.
pub async fn snapshot_in_vm(
    run: &Run<'_>,
    rec: &mut BuildRecord,
    mut m: ArtifactManifest,
    vmm: Arc<QemuVmm>,
    p: &BuildPlan,
) -> Result<ArtifactManifest, Failure> {
    let spec = vm_spec(run, &m, p, rec)?;
    let native = native_context(run, rec, p).await?;
    let dir = run.state.template_snapshots_dir();
    std::fs::create_dir_all(&dir).map_err(|e| failed("snapshot", e.to_string(), true, "retry"))?;
    let snap_name = format!("{}.{}", rec.build_id, run.attempt);
    let out = dir.join(&snap_name);
    let _ = std::fs::remove_dir_all(&out);
    run.log(
        rec,
        LogKind::Message,
        LogLevel::Info,
        Some("vm_create"),
        format!(
            "booting the build VM ({} MiB, {} vCPU, {:?}, network {}); start command: {}",
            spec.memory_mb,
            spec.vcpus,
            vmm.accel,
            if spec.network { "on" } else { "off" },
            m.start_cmd.as_deref().unwrap_or("none")
        ),
    )
    .await;
    let result = drive(run, rec, vmm, spec, p, native.clone(), out.clone()).await;
    if let Some(ctx) = &native {
        let _ = std::fs::remove_dir_all(ctx);
    }
    if run.token.is_cancelled() {
        // The VM has ended (the call returned): its directory is free.
        let _ = std::fs::remove_dir_all(&out);
        return Err(Failure::Cancelled);
    }
    let snap = match result? {
        Ok(snap) => snap,
        Err(VmError::Cancelled) => return Err(Failure::Cancelled),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&out);
            return Err(vm_failure(run, rec, &e, p.total_steps() as i64).await);
        }
    };
    let t = &snap.meta.timings_ms;
    run.log(
        rec,
        LogKind::Message,
        LogLevel::Info,
        Some("snapshot"),
        format!(
            "snapshot taken: {} MiB memory, {} MiB disk (boot {} ms, ready {} ms)",
            snap.meta.memory_bytes >> 20,
            snap.meta.disk_bytes >> 20,
            t.boot,
            t.ready
        ),
    )
    .await;
    if native.is_some() {
        // Steps set the final runtime defaults (workdir, user, envs).
        let c = &snap.meta.config;
        m.env = c.env.clone();
        m.user = c.user.clone();
        m.workdir = c.workdir.clone();
    }
    // Relative to the artifact store, so a moved data directory restores.
    m.snapshot = Some(format!("snapshots/{snap_name}"));
    Ok(m)
}

/// The VM's inputs: the rootfs, the runtime defaults so far, readiness,
/// and the plan's VM settings (network only when the operator allows it
/// and the build wants it).
fn vm_spec(
    run: &Run<'_>,
    m: &ArtifactManifest,
    p: &BuildPlan,
    rec: &BuildRecord,
) -> Result<TemplateSpec, Failure> {
    let state = run.state;
    let rootfs = nullspace_digest::Digest::parse(&m.rootfs)
        .map(|d| state.artifacts.path(&d))
        .map_err(|e| failed("finalize", e.to_string(), false, "retry"))?;
    let mut config = nullspace_vm::GuestConfig::new(&rec.name);
    config.env = m.env.clone();
    config.user = m.user.clone();
    config.workdir = m.workdir.clone();
    config.start_cmd = m.start_cmd.clone();
    let mut spec = TemplateSpec::new(&rootfs, config);
    spec.memory_mode = state.config.build_vm_memory;
    spec.network = state.config.build_vm_network && p.vm.internet_access;
    // A template's readiness (from a base template or a HEALTHCHECK) is
    // checked again as the model's probe.
    spec.readiness = m
        .readiness
        .as_ref()
        .map(Readiness::parse)
        .transpose()
        .map_err(|e| {
            failed(
                "preflight",
                format!("readiness: {e}"),
                false,
                "fix the readiness probe",
            )
        })?;
    spec.memory_mb = p.vm.memory_mib;
    spec.vcpus = p.vm.vcpus;
    spec.ceiling = p.vm.ceiling;
    spec.disk_mb = p.vm.disk_mb;
    Ok(spec)
}

/// For native steps, the uploaded context materialized on the host (the
/// agent copies from it); `None` on the other routes.
async fn native_context(
    run: &Run<'_>,
    rec: &BuildRecord,
    p: &BuildPlan,
) -> Result<Option<PathBuf>, Failure> {
    if p.route != Route::NativeSteps {
        return Ok(None);
    }
    // Every copy source must be in the uploaded context.
    for src in p
        .steps
        .iter()
        .flat_map(|s| s.copies())
        .flat_map(|c| &c.sources)
    {
        if !p.context.as_ref().is_some_and(|c| c.covers(src)) {
            return Err(upload_failed(
                format!(
                    "source {src:?} is not in the uploaded build context; upload it with the build"
                ),
                "upload the build context",
            ));
        }
    }
    let entries = context_entries(run, rec, p.context.as_ref()).await?;
    let ctx = run.work_dir(rec).join("native");
    let _ = std::fs::remove_dir_all(&ctx);
    std::fs::create_dir_all(&ctx).map_err(|e| failed("prepare", e.to_string(), true, "retry"))?;
    nullspace_build::context::materialize(&ctx, &entries)
        .map_err(|e| upload_failed(e.to_string(), "fix the build context"))?;
    Ok(Some(ctx))
}

/// Runs the VM driver on a blocking thread; with `native`, each step's
/// start, output (within the step log budget) and end are logged with its
/// 1-based `step_index` and `total_steps`. The driver watches the build's
/// token: on cancel it kills and reaps QEMU and removes its directories
/// before it returns, and this waits for that (the worker slot bounds VMs).
async fn drive(
    run: &Run<'_>,
    rec: &BuildRecord,
    vmm: Arc<QemuVmm>,
    spec: TemplateSpec,
    p: &BuildPlan,
    native: Option<PathBuf>,
    out: PathBuf,
) -> Result<Result<Snapshot, VmError>, Failure> {
    let handle = tokio::runtime::Handle::current();
    let st = run.state.clone();
    let log_rec = rec.clone();
    let token = run.token.clone();
    let plan = p.clone();
    let total = p.total_steps() as i64;
    tokio::task::spawn_blocking(move || {
        let Some(ctx) = native else {
            return build_snapshot(&vmm, &spec, &out, &token);
        };
        let log = |index: usize, msg: String| {
            let mut e = entry(&log_rec, LogKind::Message, LogLevel::Info, msg);
            e.phase = Some("step".into());
            e.step_index = Some(index as i64 + 1);
            e.total_steps = Some(total);
            let _ = handle.block_on(crate::builds::append(
                &st,
                nullspace_store::LogGate::Owner(&st.owner),
                e,
            ));
        };
        let label = |index: usize| format!("step {}/{total}", index + 1);
        let mut budget = super::OutputBudget::new(st.config.step_log_limit);
        // The step that ran last: a step that fails has no `Finished`, so
        // its truncation entry is written after the driver returns.
        let mut last = None;
        let mut on_step = |i: usize, step: &Step, ev: StepEvent<'_>| {
            last = Some(i);
            let mut msgs = Vec::new();
            match ev {
                StepEvent::Started => {
                    budget.reset();
                    msgs.push(format!("{}: {}", label(i), step.describe()));
                }
                StepEvent::Output(b) => {
                    let text = String::from_utf8_lossy(b);
                    msgs.push(budget.admit(&text).trim_end().to_string());
                }
                StepEvent::Finished { elapsed } => {
                    msgs.extend(budget.take_truncation(&label(i)));
                    msgs.push(format!("step done in {} ms", elapsed.as_millis()));
                }
            };
            for msg in msgs.into_iter().filter(|m| !m.is_empty()) {
                log(i, msg);
            }
        };
        let steps = NativeSteps::of_plan(&plan, Path::new(&ctx));
        let r = build_snapshot_with_steps(&vmm, &spec, &steps, &mut on_step, &out, &token);
        if let Some(i) = last
            && let Some(t) = budget.take_truncation(&label(i))
        {
            log(i, t);
        }
        r
    })
    .await
    .map_err(|e| {
        failed(
            "snapshot",
            format!("build VM task failed: {e}"),
            true,
            "retry the build",
        )
    })
}

/// What a VM error means for the build: its SDK failure phase (a failed
/// step is `build_step` with its 1-based place among the plan's `total`
/// steps), written first as an error-level log line with the VM's phase.
async fn vm_failure(run: &Run<'_>, rec: &BuildRecord, e: &VmError, total: i64) -> Failure {
    // Log phases follow the VM's own steps; error_detail.phase must stay
    // within the SDK's enum.
    let (log_phase, phase) = match e.code() {
        "step" => ("step", "build_step"),
        "vm_create" | "kernel" => ("vm_create", "prepare"),
        "invalid_rootfs" => ("vm_create", "preflight"),
        "readiness" | "readiness_timeout" => ("readiness", "readiness"),
        "snapshot" => ("snapshot", "snapshot"),
        _ => ("startup", "finalize"),
    };
    let (message, step) = match e {
        VmError::StepFailed {
            index,
            action,
            exit_code,
            tail,
        } => {
            let n = index.map(|i| i as i64 + 1);
            let exit = exit_code
                .map(|c| format!(" with exit code {c}"))
                .unwrap_or_default();
            let which = match n {
                Some(n) => format!("step {n} of {total} ({action})"),
                None => format!("the runtime {action} setting"),
            };
            (
                format!("step: {which} failed{exit}: {tail}"),
                n.map(|index| FailedStep { index, total }),
            )
        }
        _ => (format!("{}: {e}", e.code()), None),
    };
    // A `message` at error level: the SDK stops at the first `error`
    // entry, which must be the terminal one with its error_detail.
    let mut line = entry(rec, LogKind::Message, LogLevel::Error, message.clone());
    line.phase = Some(log_phase.into());
    line.step_index = step.map(|s| s.index);
    line.total_steps = step.map(|s| s.total);
    run.append(line).await;
    Failure::Failed {
        phase,
        message,
        retryable: e.code() == "vm_create",
        action: if step.is_some() {
            "fix the failing step; its output is in the log"
        } else {
            "check the start command and readiness probe; see the log"
        },
        code: "build_error",
        step,
    }
}
