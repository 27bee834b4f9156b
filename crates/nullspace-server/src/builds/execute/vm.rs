//! The build VM stage: boot the template, run the native steps (if any)
//! and the start command, wait for readiness, snapshot memory and disk.

use std::sync::Arc;

use serde_json::Value;

use super::Run;
use super::context::context_entries;
use crate::builds::lifecycle::entry;
use crate::builds::{ArtifactManifest, Failure, failed};
use crate::model::*;

/// Boots the template in the build VM, runs its start command with the
/// runtime defaults, waits for readiness and snapshots memory and disk
/// into `artifacts/snapshots/<build>.<attempt>`.
pub async fn snapshot_in_vm(
    run: &Run<'_>,
    rec: &mut BuildRecord,
    mut m: ArtifactManifest,
    vmm: Arc<nullspace_vm::QemuVmm>,
    steps: &[Value],
) -> Result<ArtifactManifest, Failure> {
    use nullspace_vm::template::{
        StepEvent, TemplateSpec, build_snapshot, build_snapshot_with_steps,
    };
    let state = run.state;
    let req = run.req();
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
    // Network only when the operator allows it and the build wants it.
    spec.network = state.config.build_vm_network
        && req.build_config.as_ref().and_then(|c| c.internet_access) != Some(false);
    spec.readiness = m
        .readiness
        .as_ref()
        .map(nullspace_vm::Readiness::from_json)
        .transpose()
        .map_err(|e| {
            failed(
                "preflight",
                format!("readiness: {e}"),
                false,
                "fix the readiness probe",
            )
        })?;
    if let Some(c) = &req.build_config {
        if let Some(mem) = c.memory_mib {
            spec.memory_mb = mem as u32;
        }
        if let Some(v) = c.vcpus {
            spec.vcpus = v as u32;
        }
        spec.disk_mb = c.disk_mb.map(|d| d as u64);
    }
    let dir = state.snapshots_dir();
    std::fs::create_dir_all(&dir).map_err(|e| failed("snapshot", e.to_string(), true, "retry"))?;
    let snap_name = format!("{}.{}", rec.build_id, run.attempt);
    let out = dir.join(&snap_name);
    let _ = std::fs::remove_dir_all(&out);
    run.log(
        rec,
        "message",
        "info",
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
    // Native steps: the context is materialized on the host and copied in
    // by the agent; each step logs its start, output and end.
    let native = if steps.is_empty() {
        None
    } else {
        let entries = context_entries(run, rec).await?;
        let ctx = run.work_dir(rec).join("native");
        let _ = std::fs::remove_dir_all(&ctx);
        std::fs::create_dir_all(&ctx)
            .map_err(|e| failed("prepare", e.to_string(), true, "retry"))?;
        nullspace_build::context::materialize(&ctx, &entries).map_err(|e| Failure::Failed {
            phase: "blob_upload",
            message: e.to_string(),
            retryable: false,
            action: "fix the build context",
            code: "file_upload_error",
        })?;
        let plan = crate::native::plan(
            req.build_envs.as_ref(),
            steps,
            req.runtime_config.as_ref(),
            &ctx,
        )
        .map_err(|e| failed("preflight", e, false, "fix the steps"))?;
        Some((plan, ctx))
    };
    let task_out = out.clone();
    let handle = tokio::runtime::Handle::current();
    let st = state.clone();
    let log_rec = rec.clone();
    let total = steps.len() as i64;
    let native_task = native.clone();
    // The VM driver watches the build's token: on cancel it kills and
    // reaps QEMU and removes its directories before it returns, and the
    // worker waits for that (its slot bounds VMs).
    let token = run.token.clone();
    let result = tokio::task::spawn_blocking(move || match &native_task {
        None => build_snapshot(&vmm, &spec, &task_out, &token),
        Some((plan, _)) => {
            let log = |index: Option<i64>, msg: String| {
                let mut e = entry(&log_rec, "message", "info", msg);
                e.phase = Some("step".into());
                e.step_index = index;
                e.total_steps = Some(total);
                let _ = handle.block_on(crate::builds::append(
                    &st,
                    nullspace_store::LogGate::Owner(&st.owner),
                    e,
                ));
            };
            let label = |index: Option<i64>| {
                format!(
                    "step {}",
                    index.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
                )
            };
            let mut budget = super::OutputBudget::new(st.config.step_log_limit);
            // The step that ran last: a step that fails has no `Finished`,
            // so its truncation entry is written after the driver returns.
            let mut last = None;
            let mut on_step = |i: usize, step: &nullspace_vm::template::Step, ev: StepEvent<'_>| {
                let index = plan.request_index(i).map(|x| x as i64 + 1);
                last = index;
                let label = label(index);
                let mut msgs = Vec::new();
                match ev {
                    StepEvent::Started => {
                        budget.reset();
                        msgs.push(format!("{label}: {step:?}"));
                    }
                    StepEvent::Output(b) => {
                        let text = String::from_utf8_lossy(b);
                        msgs.push(budget.admit(&text).trim_end().to_string());
                    }
                    StepEvent::Finished { elapsed } => {
                        msgs.extend(budget.take_truncation(&label));
                        msgs.push(format!("step done in {} ms", elapsed.as_millis()));
                    }
                };
                for msg in msgs.into_iter().filter(|m| !m.is_empty()) {
                    log(index, msg);
                }
            };
            let r = build_snapshot_with_steps(
                &vmm,
                &spec,
                &plan.steps,
                &mut on_step,
                &task_out,
                &token,
            );
            if let Some(t) = budget.take_truncation(&label(last)) {
                log(last, t);
            }
            r
        }
    })
    .await
    .map_err(|e| {
        failed(
            "snapshot",
            format!("build VM task failed: {e}"),
            true,
            "retry the build",
        )
    });
    if let Some((_, ctx)) = &native {
        let _ = std::fs::remove_dir_all(ctx);
    }
    if run.token.is_cancelled() {
        // The VM has ended (the call returned): its directory is free.
        let _ = std::fs::remove_dir_all(&out);
        return Err(Failure::Cancelled);
    }
    let snap = match result? {
        Ok(snap) => snap,
        Err(nullspace_vm::VmError::Cancelled) => return Err(Failure::Cancelled),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&out);
            // Log phases follow the VM's own steps; error_detail.phase must
            // stay within the SDK's enum.
            let (log_phase, phase) = match e.code() {
                "step" => ("step", "build_step"),
                "vm_create" | "kernel" => ("vm_create", "prepare"),
                "invalid_rootfs" => ("vm_create", "preflight"),
                "readiness" | "readiness_timeout" => ("readiness", "readiness"),
                "snapshot" => ("snapshot", "snapshot"),
                _ => ("startup", "finalize"),
            };
            // A `message` at error level: the SDK stops at the first `error`
            // entry, which must be the terminal one with its error_detail.
            run.log(
                rec,
                "message",
                "error",
                Some(log_phase),
                format!("{}: {e}", e.code()),
            )
            .await;
            return Err(failed(
                phase,
                format!("{}: {e}", e.code()),
                e.code() == "vm_create",
                "check the start command and readiness probe; see the log",
            ));
        }
    };
    let t = &snap.meta.timings_ms;
    run.log(
        rec,
        "message",
        "info",
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
    if !steps.is_empty() {
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
