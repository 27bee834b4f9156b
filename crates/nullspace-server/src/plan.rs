//! `POST /v1/templates/plan`: the backend-neutral plan of a request, as
//! data. Secret values never appear (only ids and auth kinds).

use serde_json::{Value, json};

use crate::model::BuildRequest;
use crate::validate::{Base, Normalized};

pub fn plan(req: &BuildRequest, n: &Normalized) -> Value {
    let rc = req.runtime_config.clone().unwrap_or_default();
    let (run_steps, build_steps): (Vec<Value>, Vec<Value>) = n
        .steps
        .iter()
        .cloned()
        .partition(|s| matches!(s.get("action").and_then(Value::as_str), Some("run")));
    let base_template = match &n.base {
        Base::Template(_) | Base::Image(_) => req.base_image.clone(),
        Base::Dockerfile => None,
    };
    let env_assignments: Vec<Value> = rc
        .default_envs
        .iter()
        .flatten()
        .map(|(k, _)| json!({"key": k, "scope": "runtime"}))
        .chain(
            req.build_envs
                .iter()
                .flatten()
                .map(|(k, _)| json!({"key": k, "scope": "build"})),
        )
        .collect();
    let files = req
        .build_context
        .as_ref()
        .map(|c| c.files.len())
        .unwrap_or(0);
    let context_digest = req.build_context.as_ref().map(|c| {
        use sha2::Digest as _;
        let mut entries: Vec<String> = c
            .files
            .iter()
            .map(|f| {
                format!(
                    "{}\0{}\0{}",
                    f.path,
                    f.entry_type,
                    f.blob_id
                        .clone()
                        .or(f.content_base64.as_ref().map(|b| {
                            format!("inline:{}", hex::encode(sha2::Sha256::digest(b.as_bytes())))
                        }))
                        .unwrap_or_default()
                )
            })
            .collect();
        entries.sort();
        format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(entries.join("\n").as_bytes()))
        )
    });
    // Declarative steps: the Dockerfile a Dockerfile engine runs.
    let rendered = if !n.steps.is_empty() && !matches!(n.base, Base::Dockerfile) {
        let empty = std::collections::BTreeMap::new();
        nullspace_build::render::render(&nullspace_build::render::RenderInput {
            base_image: req.base_image.as_deref().unwrap_or_default(),
            steps: &n.steps,
            build_envs: req.build_envs.as_ref().unwrap_or(&empty),
            runtime_envs: rc.default_envs.as_ref().unwrap_or(&empty),
        })
        .ok()
    } else {
        None
    };
    // A Dockerfile: its stages, external images and ignored instructions.
    let analysis = req.dockerfile.as_ref().map(|d| {
        nullspace_build::dockerfile::analyze(d, &req.build_args.clone().unwrap_or_default())
    });
    let (stages, ignored, ignored_warnings, dockerfile_error) = match &analysis {
        Some(Ok(a)) => (
            a.stages
                .iter()
                .map(|st| json!({"index": st.index, "name": st.name, "line": st.line, "from": st.from, "resolved": st.resolved}))
                .collect::<Vec<_>>(),
            a.warnings.iter().map(|w| w.instruction.clone()).collect::<Vec<_>>(),
            a.warnings
                .iter()
                .map(|w| json!({"instruction": w.instruction, "line": w.line, "message": w.message}))
                .collect::<Vec<_>>(),
            None,
        ),
        Some(Err(e)) => (vec![], vec![], vec![], Some(e.to_string())),
        None => (vec![], vec![], vec![], None),
    };
    let mut warnings: Vec<String> = n.warnings.clone();
    if let Some(e) = &dockerfile_error {
        warnings.push(format!("dockerfile: {e}"));
    }
    json!({
        "build_plan": {
            "dockerfile": rendered.as_ref().map(|r| r.dockerfile.clone()),
            "stages": stages,
            "base_template": base_template,
            "source_type": n.source_type,
            "run_steps": run_steps,
            "build_steps": build_steps,
            "build_envs": req.build_envs.clone().unwrap_or_default().keys().collect::<Vec<_>>(),
            "env_assignments": env_assignments,
            "ignored_instructions": ignored,
            "ignored_instruction_warnings": ignored_warnings,
            "start_cmd": req.start_cmd,
            "default_user": rc.default_user.clone().or_else(|| rendered.as_ref().and_then(|r| r.runtime.user.clone())),
            "default_workdir": rc.default_workdir.clone().or_else(|| rendered.as_ref().and_then(|r| r.runtime.workdir.clone())),
            "readiness": rc.readiness,
            "name": n.name,
            "tags": n.tags,
            "secret_ids": req.build_secrets.iter().flatten().map(|s| s.id.clone()).collect::<Vec<_>>(),
        },
        "requires_base_image_auth": req.base_image_auth.is_some(),
        "build_backend": n.backend,
        "source_type": n.source_type,
        "source_digest": null,
        "dockerfile_digest": req.dockerfile.as_ref().map(|d| {
            use sha2::Digest as _;
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(d.as_bytes())))
        }),
        "warnings": warnings,
        "context_manifest": context_digest.map(|d| json!({
            "context_manifest_id": format!("ctx_{}", &d[7..19]),
            "context_digest": d,
            "file_count": files,
        })),
    })
}
