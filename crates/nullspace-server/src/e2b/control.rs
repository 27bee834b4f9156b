//! E2B's control plane (`/sandboxes`, `/v2/sandboxes`): create, connect
//! (resumes a paused sandbox), get, list with paging and filters, kill,
//! timeout, pause, metrics; each one call of [`crate::machines`] as the
//! `X-API-KEY`'s namespace. What E2B offers and nullspace does not
//! (template builds, volumes) answers 501 naming it.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Json, Router, middleware};
use nullspace_model::machine::{CreateMachineBody, MachineStatus, TimeoutBody};
use nullspace_store::Caller;
use serde_json::{Map, Value};

use super::auth::{api_key, envd_token};
use super::errors::RestError;
use super::shapes::{Detail, Metric, NewSandbox, Sandbox, Timeout};
use crate::http::JsonBody;
use crate::machine_model::Flavor;
use crate::machines::{create as creating, end, file_ops, pause, query};
use crate::state::Shared;

type RestResult<T> = Result<T, RestError>;

pub fn routes(state: Shared) -> Router<Shared> {
    Router::new()
        .route("/sandboxes", post(create).get(list))
        .route("/v2/sandboxes", post(create).get(list))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/resume", post(connect))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/pause", post(pause_it))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/templates", any(templates_not_offered))
        .route("/templates/{*rest}", any(templates_not_offered))
        .route("/v2/templates", any(templates_not_offered))
        .route("/v2/templates/{*rest}", any(templates_not_offered))
        .route("/volumes", any(volumes_not_offered))
        .route("/volumes/{*rest}", any(volumes_not_offered))
        .route_layer(middleware::from_fn_with_state(state, api_key))
}

async fn templates_not_offered() -> RestError {
    RestError::new(
        StatusCode::NOT_IMPLEMENTED,
        "E2B's template build API is not offered by nullspace: build templates with the Nullspace API (POST /v1/templates/builds) and name them in templateID",
    )
}

async fn volumes_not_offered() -> RestError {
    RestError::new(
        StatusCode::NOT_IMPLEMENTED,
        "volumes through E2B's API are not offered by nullspace: use the Nullspace API's /v1/volumes",
    )
}

/// E2B's create body as a machine's.
fn machine_body(b: NewSandbox) -> RestResult<CreateMachineBody> {
    if b.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(RestError::new(
            StatusCode::NOT_IMPLEMENTED,
            "volumeMounts: volumes through E2B's API are not offered by nullspace",
        ));
    }
    if b.mcp.as_ref().is_some_and(|m| !m.is_null()) {
        return Err(RestError::new(
            StatusCode::NOT_IMPLEMENTED,
            "mcp: E2B's MCP gateway is not offered by nullspace",
        ));
    }
    // Set but empty (`{}`) asks for nothing.
    let asks = |v: &Option<Value>| {
        v.as_ref()
            .is_some_and(|v| !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty()))
    };
    if asks(&b.network) {
        return Err(RestError::new(
            StatusCode::NOT_IMPLEMENTED,
            "network: E2B's network rules are not offered by nullspace; set an egress policy with the Nullspace API (PATCH /v1/machines/{id}/egress)",
        ));
    }
    if asks(&b.iam) {
        return Err(RestError::new(
            StatusCode::NOT_IMPLEMENTED,
            "iam: E2B's IAM settings are not offered by nullspace",
        ));
    }
    let auto_resume = b.auto_resume.map(|a| a.enabled).filter(|e| *e);
    Ok(CreateMachineBody {
        template: b.template_id,
        timeout_ms: Some(b.timeout.unwrap_or(300).saturating_mul(1000)),
        timeout_action: b.auto_pause.filter(|p| *p).map(|_| "hibernate".to_string()),
        auto_resume,
        envs: b.env_vars,
        metadata: b.metadata.map(|m| {
            m.into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect::<Map<String, Value>>()
        }),
        internet_access: b.allow_internet_access,
        // Any count within the template's ceiling (`nullspace_model::size`);
        // another is refused by the create, naming what is possible.
        vcpus: b.cpu_count,
        ..Default::default()
    })
}

async fn create(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<NewSandbox>,
) -> RestResult<Response> {
    // A create retried with the same key answers the first one's sandbox.
    let key = crate::machine_api::idempotency_key(&headers)?;
    let body = machine_body(b)?;
    let m = creating::create(&s, &c, Flavor::Sandbox, body, key).await?;
    let token = envd_token(&s, &m.id);
    Ok((StatusCode::CREATED, Json(Sandbox::of(&m, token))).into_response())
}

/// Resumes a paused sandbox; a timeout only extends the current one.
async fn connect(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<Timeout>,
) -> RestResult<Response> {
    let mut m = query::get(&s, &c, &id).await?;
    let mut status = StatusCode::OK;
    if m.status == MachineStatus::Paused {
        m = pause::resume(&s, &c, &id).await?;
        status = StatusCode::CREATED;
    }
    if let Some(t) = b.timeout {
        let want = t.saturating_mul(1000);
        if m.remaining_ms.is_none_or(|r| r < want as i64) {
            end::set_timeout(
                &s,
                &c,
                &id,
                TimeoutBody {
                    timeout_ms: want,
                    timeout_action: None,
                },
            )
            .await?;
        }
    }
    let token = envd_token(&s, &m.id);
    Ok((status, Json(Sandbox::of(&m, token))).into_response())
}

async fn detail(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> RestResult<Json<Detail>> {
    let m = query::get(&s, &c, &id).await?;
    live(&m)?;
    Ok(Json(Detail::of(&m, Some(envd_token(&s, &m.id)))))
}

/// An ended machine is a sandbox that no longer exists.
fn live(m: &nullspace_model::machine::MachineInfo) -> RestResult<()> {
    if matches!(m.status, MachineStatus::Destroyed | MachineStatus::Error) {
        return Err(RestError::new(
            StatusCode::NOT_FOUND,
            format!("sandbox {:?} not found", m.id),
        ));
    }
    Ok(())
}

/// `metadata=k%3Dv%26k2%3Dv2`: the value is itself a query string.
fn metadata_filter(raw: &str) -> RestResult<Map<String, Value>> {
    let uri: Uri = format!("/?{raw}").parse().map_err(|_| {
        RestError::new(
            StatusCode::BAD_REQUEST,
            format!("metadata {raw:?} is not a query string of key=value pairs"),
        )
    })?;
    let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(&uri)
        .map_err(|e| RestError::new(StatusCode::BAD_REQUEST, format!("metadata {raw:?}: {e}")))?;
    Ok(pairs
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect())
}

async fn list(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Query(q): Query<Vec<(String, String)>>,
) -> RestResult<Response> {
    let one = |name: &str| {
        q.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let mut states = vec![];
    for (_, v) in q.iter().filter(|(k, _)| k == "state") {
        for st in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match st {
                "running" => states.extend(["creating", "running"]),
                "paused" => states.push("paused"),
                other => {
                    return Err(RestError::new(
                        StatusCode::BAD_REQUEST,
                        format!("state {other:?} is not one of running, paused"),
                    ));
                }
            }
        }
    }
    if states.is_empty() {
        states = vec!["creating", "running", "paused"];
    }
    let limit = match one("limit") {
        Some(l) => Some(l.parse::<i64>().map_err(|_| {
            RestError::new(
                StatusCode::BAD_REQUEST,
                format!("limit {l:?} is not a number"),
            )
        })?),
        None => None,
    };
    let lq = query::ListQuery {
        limit,
        next_token: one("nextToken"),
        states: states.into_iter().map(str::to_string).collect(),
        template: one("template"),
        metadata: one("metadata").map(|m| metadata_filter(&m)).transpose()?,
    };
    let page = query::list(&s, &c, lq).await?;
    let items: Vec<Detail> = page.items.iter().map(|m| Detail::of(m, None)).collect();
    let mut resp = Json(items).into_response();
    if let Some(t) = page.next_token.filter(|_| page.has_next)
        && let Ok(v) = HeaderValue::from_str(&t)
    {
        resp.headers_mut().insert("x-next-token", v);
    }
    Ok(resp)
}

async fn kill(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> RestResult<StatusCode> {
    let m = query::get(&s, &c, &id).await?;
    live(&m)?;
    end::destroy(&s, &c, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_timeout(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<Timeout>,
) -> RestResult<StatusCode> {
    let Some(t) = b.timeout else {
        return Err(RestError::new(
            StatusCode::BAD_REQUEST,
            "timeout (seconds) is required",
        ));
    };
    end::set_timeout(
        &s,
        &c,
        &id,
        TimeoutBody {
            timeout_ms: t.saturating_mul(1000),
            timeout_action: None,
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause_it(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> RestResult<StatusCode> {
    let m = query::get(&s, &c, &id).await?;
    live(&m)?;
    if m.status == MachineStatus::Paused {
        return Err(RestError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id} is already paused"),
        ));
    }
    pause::hibernate(&s, &c, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn metrics(
    State(s): State<Shared>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
) -> RestResult<Json<Vec<Metric>>> {
    let m = query::get(&s, &c, &id).await?;
    live(&m)?;
    if m.status != MachineStatus::Running {
        // E2B reports no samples for a sandbox that is not running.
        return Ok(Json(vec![]));
    }
    let samples = file_ops::metrics(&s, &c, &id).await?;
    Ok(Json(samples.iter().map(Metric::of).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_e2b_create_is_a_machine_create() {
        let b: NewSandbox = serde_json::from_value(serde_json::json!({
            "templateID": "web", "timeout": 120, "metadata": {"a": "b"},
            "envVars": {"X": "1"}, "autoPause": true, "autoResume": {"enabled": true},
            "network": {}, "cpuCount": 2, "unknownField": 1
        }))
        .unwrap();
        let m = machine_body(b).unwrap();
        assert_eq!(m.template.as_deref(), Some("web"));
        assert_eq!(m.timeout_ms, Some(120_000));
        assert_eq!(m.timeout_action.as_deref(), Some("hibernate"));
        assert_eq!(m.auto_resume, Some(true));
        assert_eq!(m.vcpus, Some(2));
        assert_eq!(m.metadata.unwrap()["a"], "b");
        assert_eq!(m.envs.unwrap()["X"], "1");
        let default = machine_body(NewSandbox::default()).unwrap();
        assert_eq!(default.timeout_ms, Some(300_000), "E2B's default timeout");
        assert_eq!(default.timeout_action, None);
    }

    #[test]
    fn what_is_not_offered_is_refused_by_name() {
        for (body, word) in [
            (
                serde_json::json!({"volumeMounts": [{"name": "v", "path": "/v"}]}),
                "volumeMounts",
            ),
            (
                serde_json::json!({"network": {"denyOut": ["0.0.0.0/0"]}}),
                "network",
            ),
            (serde_json::json!({"mcp": {"x": {}}}), "mcp"),
            (serde_json::json!({"iam": {"role": "r"}}), "iam"),
        ] {
            let e = machine_body(serde_json::from_value(body).unwrap()).unwrap_err();
            assert_eq!(e.status, StatusCode::NOT_IMPLEMENTED);
            assert!(e.message.starts_with(word), "{e}");
        }
    }

    #[test]
    fn the_metadata_filter_is_a_query_string() {
        let m = metadata_filter("a=b&team=x%20y").unwrap();
        assert_eq!(m["a"], "b");
        assert_eq!(m["team"], "x y");
        assert!(metadata_filter("").unwrap().is_empty());
    }
}
