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
    json!({
        "build_plan": {
            "base_template": base_template,
            "source_type": n.source_type,
            "run_steps": run_steps,
            "build_steps": build_steps,
            "build_envs": req.build_envs.clone().unwrap_or_default().keys().collect::<Vec<_>>(),
            "env_assignments": env_assignments,
            "ignored_instructions": [],
            "ignored_instruction_warnings": [],
            "start_cmd": req.start_cmd,
            "default_user": rc.default_user,
            "default_workdir": rc.default_workdir,
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
        "warnings": n.warnings,
        "context_manifest": context_digest.map(|d| json!({
            "context_manifest_id": format!("ctx_{}", &d[7..19]),
            "context_digest": d,
            "file_count": files,
        })),
    })
}
