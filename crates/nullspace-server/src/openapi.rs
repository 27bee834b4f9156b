//! `/openapi.json`. The path list is kept beside the router (see
//! `http::router`); schemas are the serde types in `model.rs`.
//! TODO(issue 4 item 9): generate schemas from the types (utoipa) instead
//! of this summary.

use axum::Json;
use serde_json::{Value, json};

pub const PATHS: &[(&str, &str, &str)] = &[
    (
        "post",
        "/v1/templates/builds",
        "Start a background template build",
    ),
    (
        "post",
        "/v1/templates/build",
        "Build and stream structured log entries (SSE) until `end`",
    ),
    (
        "get",
        "/v1/templates/builds/{build_id}",
        "Build status and log entries from `offset`",
    ),
    (
        "get",
        "/v1/templates/builds/{build_id}/logs",
        "SSE replay of durable log entries (`offset`/`cursor`, `follow`)",
    ),
    (
        "post",
        "/v1/templates/builds/{build_id}/cancel",
        "Cancel a queued or running build",
    ),
    (
        "post",
        "/v1/templates/builds/{build_id}/retry",
        "Retry a build from its sanitized persisted definition",
    ),
    (
        "post",
        "/v1/templates/builds/{build_id}/promote",
        "Move a tag to a ready build",
    ),
    ("post", "/v1/templates/validate", "Validate a build request"),
    ("post", "/v1/templates/plan", "Backend-neutral build plan"),
    ("get", "/v1/templates", "List templates"),
    ("post", "/v1/templates", "Deprecated blocking create"),
    ("get", "/v1/templates/refs/{ref}", "Get a template"),
    ("delete", "/v1/templates/refs/{ref}", "Delete a template"),
    ("get", "/v1/templates/refs/{ref}/builds", "Build history"),
    (
        "get",
        "/v1/templates/{id}/builds",
        "Build history by template id",
    ),
    ("get", "/v1/templates/refs/{ref}/tags", "List tags"),
    ("post", "/v1/templates/refs/{ref}/tags", "Assign tags"),
    (
        "delete",
        "/v1/templates/refs/{ref}/tags/{tag}",
        "Remove a tag",
    ),
    ("get", "/v1/templates/refs/{ref}/aliases", "List aliases"),
    (
        "delete",
        "/v1/templates/refs/{ref}/aliases/{alias}",
        "Remove an alias",
    ),
    (
        "post",
        "/v1/templates/refs/{ref}/rename",
        "Rename (the old name becomes an alias)",
    ),
    (
        "patch",
        "/v1/templates/refs/{ref}/visibility",
        "Set visibility",
    ),
    (
        "post",
        "/v1/templates/blobs/preflight",
        "Announce context files; answers which blobs are missing",
    ),
    (
        "put",
        "/v1/templates/blobs/{blob_id}",
        "Upload a context blob",
    ),
    ("post", "/v1/templates/claims", "Reserve a template name"),
    (
        "delete",
        "/v1/templates/claims/{token}",
        "Release a name claim",
    ),
    ("get", "/v1/templates/namespaces/{slug}", "Get a namespace"),
];

pub async fn document() -> Json<Value> {
    let mut paths = serde_json::Map::new();
    for (method, path, summary) in PATHS {
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[*method] = json!({
            "summary": summary,
            "parameters": params,
            "security": [{"bearer": []}],
            "responses": {"200": {"description": "OK"}, "default": {"description": "Error: {error, code, error_detail?}"}},
        });
    }
    Json(json!({
        "openapi": "3.0.3",
        "info": {"title": "nullspace template API", "version": env!("CARGO_PKG_VERSION")},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }))
}
