//! Templates, tags, aliases, visibility and name claims. A template belongs
//! to a namespace; private templates are invisible ("not found") to every
//! other caller, public ones are readable by all.

use nullspace_model::build::status::BuildStatus as Status;
use nullspace_store::{Caller, TemplateRow, now_ms};

use crate::builds::{ArtifactManifest, parse_record};
use crate::error::{ApiError, ApiResult};
use crate::model::*;
use crate::refs::{Qualifier, TemplateRef};
use crate::state::Shared;

const CLAIM_TTL_MS: i64 = 15 * 60 * 1000;

fn doc_of(row: &TemplateRow) -> TemplateDoc {
    serde_json::from_str(&row.doc).unwrap_or_default()
}

/// The template `(caller, name)`, created private if absent.
pub async fn ensure(state: &Shared, caller: &Caller, name: &str) -> ApiResult<String> {
    let doc = serde_json::to_string(&TemplateDoc {
        description: String::new(),
        visibility: "private".into(),
    })
    .map_err(ApiError::internal)?;
    Ok(state
        .store
        .ensure_template(&caller.namespace, name, &doc)
        .await?)
}

pub async fn check_claim(
    state: &Shared,
    caller: &Caller,
    name: &str,
    token: Option<&str>,
) -> ApiResult<()> {
    if let Some((hash, _)) = state.store.claim_on(&caller.namespace, name).await?
        && token.map(nullspace_store::Store::claim_hash).as_deref() != Some(hash.as_str())
    {
        return Err(ApiError::conflict(
            "template_name_conflict",
            format!("template name {name:?} is reserved by a claim"),
        ));
    }
    Ok(())
}

pub async fn info(state: &Shared, row: &TemplateRow) -> ApiResult<TemplateInfo> {
    let tags: Vec<(String, String, i64)> = state.store.tags(&row.id).await?;
    let names: Vec<String> = tags.iter().map(|t| t.0.clone()).collect();
    let default_tag = if names.iter().any(|t| t == "default") {
        Some("default".to_string())
    } else {
        names.first().cloned()
    };
    let runtime_defaults = match tags.iter().find(|t| Some(&t.0) == default_tag.as_ref()) {
        Some((_, build_id, _)) => match state.store.build(build_id).await? {
            Some(b) => Some(parse_record(&b)?.runtime_defaults),
            None => None,
        },
        None => None,
    };
    let doc = doc_of(row);
    let base = format!("{}/{}", row.namespace, row.name);
    Ok(TemplateInfo {
        id: row.id.clone(),
        name: row.name.clone(),
        description: doc.description,
        tags: names,
        canonical_ref: match &default_tag {
            Some(t) => format!("{base}:{t}"),
            None => base,
        },
        default_tag,
        builtin: false,
        namespace_slug: row.namespace.clone(),
        visibility: doc.visibility,
        runtime_defaults,
    })
}

/// The template's info as it will be once `rec`'s tags point at it (the
/// ready transition moves the tags in the same write as the status).
pub async fn info_after_tagging(state: &Shared, rec: &BuildRecord) -> ApiResult<TemplateInfo> {
    let row = state
        .store
        .template(&rec.template_id)
        .await?
        .ok_or_else(|| ApiError::template_not_found(&rec.template_id))?;
    let mut info = info(state, &row).await?;
    let mut names = info.tags.clone();
    for t in &rec.tags {
        if !names.contains(t) {
            names.push(t.clone());
        }
    }
    names.sort();
    let default_tag = if names.iter().any(|t| t == "default") {
        Some("default".to_string())
    } else {
        names.first().cloned()
    };
    if default_tag.as_ref().is_some_and(|d| rec.tags.contains(d)) {
        info.runtime_defaults = Some(rec.runtime_defaults.clone());
    }
    let base = format!("{}/{}", row.namespace, row.name);
    info.canonical_ref = match &default_tag {
        Some(t) => format!("{base}:{t}"),
        None => base,
    };
    info.default_tag = default_tag;
    info.tags = names;
    Ok(info)
}

pub async fn info_by_id(state: &Shared, id: &str) -> ApiResult<TemplateInfo> {
    let row = state
        .store
        .template(id)
        .await?
        .ok_or_else(|| ApiError::template_not_found(id))?;
    info(state, &row).await
}

/// Resolves a ref the caller may read. `write`: the caller must own it.
pub async fn resolve(
    state: &Shared,
    caller: &Caller,
    raw: &str,
    write: bool,
) -> ApiResult<(TemplateRow, Qualifier)> {
    let r = TemplateRef::parse(raw).map_err(|_| ApiError::template_not_found(raw))?;
    let row = match &r {
        TemplateRef::Id { id, .. } => state.store.template(id).await?,
        TemplateRef::Named {
            namespace, name, ..
        } => {
            let ns = namespace
                .clone()
                .unwrap_or_else(|| caller.namespace.clone());
            match state.store.template_id(&ns, name).await? {
                Some(id) => state.store.template(&id).await?,
                // A renamed template keeps its old name as an alias.
                None => match state.store.alias_target(&ns, name).await? {
                    Some(id) => state.store.template(&id).await?,
                    None => None,
                },
            }
        }
    };
    let row = row.ok_or_else(|| ApiError::template_not_found(raw))?;
    let visible =
        row.namespace == caller.namespace || (!write && doc_of(&row).visibility == "public");
    if !visible {
        return Err(ApiError::template_not_found(raw));
    }
    Ok((row, r.qualifier().clone()))
}

/// The build a ref points at: an exact build, a tag, or the default tag.
pub async fn resolve_build(
    state: &Shared,
    caller: &Caller,
    raw: &str,
) -> ApiResult<(TemplateRow, BuildRecord)> {
    let (row, q) = resolve(state, caller, raw, false).await?;
    let build_id = match q {
        Qualifier::Build(b) => b,
        Qualifier::Tag(t) => tag_target(state, &row.id, &t)
            .await?
            .ok_or_else(|| ApiError::template_not_found(raw))?,
        Qualifier::None => {
            let tags = state.store.tags(&row.id).await?;
            tags.iter()
                .find(|t| t.0 == "default")
                .or(tags.first())
                .map(|t| t.1.clone())
                .ok_or_else(|| ApiError::template_not_found(raw))?
        }
    };
    let b = state
        .store
        .build(&build_id)
        .await?
        .filter(|b| b.template_id == row.id)
        .ok_or_else(|| ApiError::template_not_found(raw))?;
    Ok((row, parse_record(&b)?))
}

async fn tag_target(state: &Shared, template_id: &str, tag: &str) -> ApiResult<Option<String>> {
    Ok(state
        .store
        .tags(template_id)
        .await?
        .into_iter()
        .find(|t| t.0 == tag)
        .map(|t| t.1))
}

/// The artifact of a ready template build, for `template_base` builds.
pub async fn resolve_artifact(
    state: &Shared,
    namespace: &str,
    r: &TemplateRef,
) -> ApiResult<ArtifactManifest> {
    let caller = Caller {
        key_id: String::new(),
        namespace: namespace.to_string(),
    };
    let raw = match r {
        TemplateRef::Id { id, qualifier } => with_q(id, qualifier),
        TemplateRef::Named {
            namespace,
            name,
            qualifier,
        } => with_q(
            &match namespace {
                Some(ns) => format!("{ns}/{name}"),
                None => name.clone(),
            },
            qualifier,
        ),
    };
    let (_, rec) = resolve_build(state, &caller, &raw).await?;
    if rec.status != Status::Ready {
        return Err(ApiError::invalid(format!(
            "template {raw} points at build {} which is {}",
            rec.build_id, rec.status
        )));
    }
    manifest_of(state, &rec, &raw).await
}

/// The snapshot directory an artifact manifest names: relative to the
/// artifact store (absolute in records of older versions).
pub fn snapshot_dir(state: &Shared, m: &ArtifactManifest) -> Option<std::path::PathBuf> {
    m.snapshot
        .as_ref()
        .map(|s| crate::builds::snapshot_path(state, s))
}

/// The artifact manifest of a ready build (`raw`: the ref, for errors).
pub async fn manifest_of(
    state: &Shared,
    rec: &BuildRecord,
    raw: &str,
) -> ApiResult<ArtifactManifest> {
    let digest = rec
        .artifact_ids
        .first()
        .and_then(|d| nullspace_digest::Digest::parse(d).ok())
        .ok_or_else(|| ApiError::invalid(format!("template {raw} has no artifact")))?;
    let bytes = std::fs::read(state.artifacts.path(&digest)).map_err(ApiError::internal)?;
    serde_json::from_slice(&bytes).map_err(ApiError::internal)
}

fn with_q(base: &str, q: &Qualifier) -> String {
    match q {
        Qualifier::None => base.to_string(),
        Qualifier::Tag(t) | Qualifier::Build(t) => format!("{base}:{t}"),
    }
}

pub async fn list(state: &Shared, caller: &Caller) -> ApiResult<Vec<TemplateInfo>> {
    let mut out = Vec::new();
    for row in state.store.templates(&caller.namespace).await? {
        out.push(info(state, &row).await?);
    }
    Ok(out)
}

pub async fn delete(state: &Shared, caller: &Caller, raw: &str) -> ApiResult<()> {
    let (row, _) = resolve(state, caller, raw, true).await?;
    state.store.delete_template(&row.id).await?;
    // Its pooled VMs can never be taken now.
    let (rt, id) = (state.machines.clone(), row.id.clone());
    let _ = tokio::task::spawn_blocking(move || rt.drop_pooled(|k| k.label == id)).await;
    Ok(())
}

pub async fn assign_tags(
    state: &Shared,
    caller: &Caller,
    raw: &str,
    tags: &[String],
) -> ApiResult<TemplateInfo> {
    if tags.is_empty() {
        return Err(ApiError::invalid("tags: at least one tag"));
    }
    for t in tags {
        crate::refs::check_tag(t).map_err(ApiError::invalid)?;
    }
    let (row, rec) = resolve_build(state, caller, raw).await?;
    if row.namespace != caller.namespace {
        return Err(ApiError::template_not_found(raw));
    }
    if rec.status != Status::Ready {
        return Err(ApiError::conflict(
            "template_build_conflict",
            format!("build {} is {}, not ready", rec.build_id, rec.status),
        ));
    }
    for t in tags {
        state.store.set_tag(&row.id, t, &rec.build_id).await?;
    }
    info(state, &row).await
}

pub async fn promote(
    state: &Shared,
    caller: &Caller,
    build_id: &str,
    tag: &str,
) -> ApiResult<TemplateInfo> {
    crate::refs::check_tag(tag).map_err(ApiError::invalid)?;
    let (row, rec) = crate::builds::load(state, caller, build_id).await?;
    if rec.status != Status::Ready {
        return Err(ApiError::conflict(
            "template_build_conflict",
            format!(
                "build {build_id} is {}, only ready builds can be promoted",
                rec.status
            ),
        ));
    }
    state.store.set_tag(&row.template_id, tag, build_id).await?;
    info_by_id(state, &row.template_id).await
}

pub async fn remove_tag(state: &Shared, caller: &Caller, raw: &str, tag: &str) -> ApiResult<()> {
    let (row, _) = resolve(state, caller, raw, true).await?;
    if !state.store.remove_tag(&row.id, tag).await? {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "template_tag_not_found",
            format!("tag {tag:?} not found"),
        ));
    }
    Ok(())
}

pub async fn tags(state: &Shared, caller: &Caller, raw: &str) -> ApiResult<serde_json::Value> {
    let (row, _) = resolve(state, caller, raw, false).await?;
    let tags = state.store.tags(&row.id).await?;
    Ok(serde_json::Value::Array(
        tags.into_iter()
            .map(|(tag, build_id, at)| serde_json::json!({"tag": tag, "build_id": build_id, "created_at": iso(at)}))
            .collect(),
    ))
}

pub async fn aliases(state: &Shared, caller: &Caller, raw: &str) -> ApiResult<serde_json::Value> {
    let (row, _) = resolve(state, caller, raw, false).await?;
    let aliases = state.store.aliases(&row.id).await?;
    Ok(serde_json::Value::Array(
        aliases
            .into_iter()
            .map(|(a, at)| serde_json::json!({"alias_ref": format!("{}/{a}", row.namespace), "created_at": iso(at)}))
            .collect(),
    ))
}

pub async fn remove_alias(
    state: &Shared,
    caller: &Caller,
    raw: &str,
    alias: &str,
) -> ApiResult<()> {
    let (row, _) = resolve(state, caller, raw, true).await?;
    let name = alias.rsplit('/').next().unwrap_or(alias);
    if !state.store.remove_alias(&row.id, name).await? {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "template_alias_not_found",
            format!("alias {alias:?} not found"),
        ));
    }
    Ok(())
}

pub async fn rename(
    state: &Shared,
    caller: &Caller,
    raw: &str,
    new_name: &str,
) -> ApiResult<TemplateInfo> {
    crate::refs::check_name("new_name", new_name).map_err(ApiError::invalid)?;
    let (row, _) = resolve(state, caller, raw, true).await?;
    if state
        .store
        .template_id(&caller.namespace, new_name)
        .await?
        .is_some()
    {
        return Err(ApiError::conflict(
            "template_name_conflict",
            format!("a template named {new_name:?} exists"),
        ));
    }
    check_claim(state, caller, new_name, None).await?;
    state
        .store
        .update_template(&row.id, new_name, &row.doc)
        .await?;
    state
        .store
        .add_alias(&caller.namespace, &row.name, &row.id)
        .await?;
    info_by_id(state, &row.id).await
}

pub async fn set_visibility(
    state: &Shared,
    caller: &Caller,
    raw: &str,
    visibility: &str,
) -> ApiResult<TemplateInfo> {
    if !["private", "public"].contains(&visibility) {
        return Err(ApiError::invalid(format!(
            "visibility {visibility:?} must be private or public"
        )));
    }
    let (row, _) = resolve(state, caller, raw, true).await?;
    let mut doc = doc_of(&row);
    doc.visibility = visibility.to_string();
    state
        .store
        .update_template(
            &row.id,
            &row.name,
            &serde_json::to_string(&doc).map_err(ApiError::internal)?,
        )
        .await?;
    info_by_id(state, &row.id).await
}

pub async fn reserve(
    state: &Shared,
    caller: &Caller,
    template_ref: &str,
) -> ApiResult<serde_json::Value> {
    let r = TemplateRef::parse(template_ref).map_err(ApiError::invalid)?;
    let TemplateRef::Named {
        namespace, name, ..
    } = r
    else {
        return Err(ApiError::invalid("template_ref must be a name, not an id"));
    };
    if namespace
        .as_deref()
        .is_some_and(|ns| ns != caller.namespace)
    {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "permission_denied",
            "names can only be reserved in your own namespace",
        ));
    }
    if state
        .store
        .template_id(&caller.namespace, &name)
        .await?
        .is_some()
        || state
            .store
            .claim_on(&caller.namespace, &name)
            .await?
            .is_some()
    {
        return Err(ApiError::conflict(
            "template_name_conflict",
            format!("template name {name:?} is taken"),
        ));
    }
    let (token, expires) = state
        .store
        .create_claim(&caller.namespace, &name, CLAIM_TTL_MS)
        .await?;
    Ok(
        serde_json::json!({"claim_token": token, "canonical_ref": format!("{}/{name}", caller.namespace), "expires_at": iso(expires)}),
    )
}

pub fn now_iso() -> String {
    iso(now_ms())
}
