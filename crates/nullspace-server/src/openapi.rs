//! `/openapi.json`, generated from the code.
//!
//! Paths come from the one route table that also builds the router
//! ([`crate::http::routes`]): each entry is an [`Op`] (method, path,
//! parameters, body and reply types) bound to its handler, so a route
//! cannot be served without being documented. Schemas are derived from the
//! serde types in `model.rs` with `schemars` 1.x: it reads the serde
//! attributes the server actually uses (`default`, `skip_serializing_if`),
//! emits JSON Schema 2020-12, which is what OpenAPI 3.1 embeds unchanged,
//! and is widely used and actively maintained. (`utoipa` would need a
//! second copy of every path in `#[utoipa::path]` attributes, the drift
//! this module exists to prevent.)

use std::sync::OnceLock;

use axum::handler::Handler;
use axum::routing::{MethodFilter, MethodRouter, on};
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{Map, Value, json};

use crate::model::{ErrorBody, LogEntry};
use crate::state::Shared;

type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

fn schema_of<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

fn array_of<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<Vec<T>>()
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "get",
            Method::Post => "post",
            Method::Put => "put",
            Method::Patch => "patch",
            Method::Delete => "delete",
        }
    }
    fn filter(self) -> MethodFilter {
        match self {
            Method::Get => MethodFilter::GET,
            Method::Post => MethodFilter::POST,
            Method::Put => MethodFilter::PUT,
            Method::Patch => MethodFilter::PATCH,
            Method::Delete => MethodFilter::DELETE,
        }
    }
}

/// How a query parameter is read (see the handlers in `http.rs`).
#[derive(Clone, Copy, Debug)]
pub enum QueryKind {
    /// A non-negative integer.
    Offset,
    /// `true`/`false` (also `1`/`0`).
    Bool,
    /// An integer in the range.
    Range(i64, i64),
    /// One of these strings.
    OneOf(&'static [&'static str]),
    Text,
}

#[derive(Clone, Copy, Debug)]
pub struct QueryParam {
    pub name: &'static str,
    pub description: &'static str,
    pub kind: QueryKind,
}

impl QueryParam {
    fn schema(&self) -> Value {
        match self.kind {
            QueryKind::Offset => json!({"type": "integer", "minimum": 0}),
            QueryKind::Bool => json!({"type": "boolean"}),
            QueryKind::Range(lo, hi) => json!({"type": "integer", "minimum": lo, "maximum": hi}),
            QueryKind::OneOf(v) => json!({"type": "string", "enum": v}),
            QueryKind::Text => json!({"type": "string"}),
        }
    }
}

#[derive(Clone, Copy)]
pub enum Body {
    None,
    Json(SchemaFn),
    /// Raw bytes (`application/octet-stream`).
    Bytes,
}

#[derive(Clone, Copy)]
pub enum Reply {
    Json(u16, SchemaFn),
    /// No body.
    Empty(u16),
    /// `text/event-stream`: `id: <offset>`, `event: log`, `data: <LogEntry>`.
    Sse,
    /// `text/plain`.
    Text,
    /// Raw bytes (`application/octet-stream`).
    Bytes,
    /// A WebSocket upgrade (`101 Switching Protocols`).
    WebSocket,
}

/// One documented operation.
#[derive(Clone, Copy)]
pub struct Op {
    pub method: Method,
    /// Both the axum route and the OpenAPI path (`{param}` in both).
    pub path: &'static str,
    pub summary: &'static str,
    /// Behind bearer-token auth (every `/v1` route).
    pub auth: bool,
    pub query: &'static [QueryParam],
    pub body: Body,
    pub reply: Reply,
}

/// A documented operation bound to its handler: the router is built from
/// these and nothing else.
pub struct Route {
    pub op: Op,
    pub handler: MethodRouter<Shared>,
}

impl Op {
    const fn new(method: Method, path: &'static str, summary: &'static str) -> Op {
        Op {
            method,
            path,
            summary,
            auth: true,
            query: &[],
            body: Body::None,
            reply: Reply::Empty(204),
        }
    }
    pub const fn get(path: &'static str, summary: &'static str) -> Op {
        Op::new(Method::Get, path, summary)
    }
    pub const fn post(path: &'static str, summary: &'static str) -> Op {
        Op::new(Method::Post, path, summary)
    }
    pub const fn put(path: &'static str, summary: &'static str) -> Op {
        Op::new(Method::Put, path, summary)
    }
    pub const fn patch(path: &'static str, summary: &'static str) -> Op {
        Op::new(Method::Patch, path, summary)
    }
    pub const fn delete(path: &'static str, summary: &'static str) -> Op {
        Op::new(Method::Delete, path, summary)
    }
    pub const fn public(mut self) -> Op {
        self.auth = false;
        self
    }
    pub const fn query(mut self, q: &'static [QueryParam]) -> Op {
        self.query = q;
        self
    }
    pub fn body<T: JsonSchema>(mut self) -> Op {
        self.body = Body::Json(schema_of::<T>);
        self
    }
    pub const fn bytes(mut self) -> Op {
        self.body = Body::Bytes;
        self
    }
    pub fn reply<T: JsonSchema>(mut self, status: u16) -> Op {
        self.reply = Reply::Json(status, schema_of::<T>);
        self
    }
    pub fn reply_list<T: JsonSchema>(mut self) -> Op {
        self.reply = Reply::Json(200, array_of::<T>);
        self
    }
    pub const fn reply_with(mut self, status: u16, schema: SchemaFn) -> Op {
        self.reply = Reply::Json(status, schema);
        self
    }
    pub const fn sse(mut self) -> Op {
        self.reply = Reply::Sse;
        self
    }
    pub const fn text(mut self) -> Op {
        self.reply = Reply::Text;
        self
    }
    pub const fn reply_bytes(mut self) -> Op {
        self.reply = Reply::Bytes;
        self
    }
    pub const fn websocket(mut self) -> Op {
        self.reply = Reply::WebSocket;
        self
    }
    /// Binds the handler, with the documented method.
    pub fn to<H, T>(self, handler: H) -> Route
    where
        H: Handler<T, Shared>,
        T: 'static,
    {
        Route {
            op: self,
            handler: on(self.method.filter(), handler),
        }
    }

    /// `{name}` segments of the path.
    pub fn path_params(&self) -> impl Iterator<Item = &'static str> {
        self.path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
    }

    fn operation(&self, g: &mut SchemaGenerator, req: &mut SchemaGenerator) -> Value {
        let mut params: Vec<Value> = self
            .path_params()
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        params.extend(self.query.iter().map(|q| {
            json!({"name": q.name, "in": "query", "required": false,
                   "description": q.description, "schema": q.schema()})
        }));
        let mut responses = Map::new();
        let error_ref = Value::from(g.subschema_for::<ErrorBody>());
        let error = json!({
            "description": "Error: `{error, code, error_detail?}`",
            "content": {"application/json": {"schema": error_ref}},
        });
        match self.reply {
            Reply::Json(status, f) => {
                responses.insert(
                    status.to_string(),
                    json!({"description": "OK", "content": {"application/json": {"schema": Value::from(f(g))}}}),
                );
            }
            Reply::Empty(status) => {
                responses.insert(status.to_string(), json!({"description": "Done, no body"}));
            }
            Reply::Sse => {
                // One event (as parsed by the client) per log entry.
                let entry = Value::from(g.subschema_for::<LogEntry>());
                responses.insert(
                    "200".into(),
                    json!({"description": "Server-sent events, one per durable log entry: `id: <offset>`, `event: log`, `data: <LogEntry JSON>`; `: ping` comments keep idle streams open",
                           "content": {"text/event-stream": {"schema": {
                               "type": "object",
                               "properties": {
                                   "id": {"type": "string", "pattern": "^[0-9]+$"},
                                   "event": {"const": "log"},
                                   "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": entry},
                               },
                               "required": ["id", "event", "data"],
                           }}}}),
                );
            }
            Reply::Text => {
                responses.insert(
                    "200".into(),
                    json!({"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}),
                );
            }
            Reply::Bytes => {
                responses.insert(
                    "200".into(),
                    json!({"description": "The bytes", "content": {"application/octet-stream": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}}),
                );
            }
            Reply::WebSocket => {
                responses.insert(
                    "101".into(),
                    json!({"description": "WebSocket (JSON text messages): client `exec_start {id, command, args, timeout_secs, cwd?, envs?, shell?}` or `exec_connect {id, pid}`; server `exec_started {id, pid}`, `exec_stdout`/`exec_stderr {id, pid, data}`, `exec_exit {id, pid, exit_code}`, `error {id, message}`"}),
                );
            }
        }
        if self.auth {
            responses.insert("default".into(), error);
        }
        let mut op = json!({
            "operationId": operation_id(self),
            "summary": self.summary,
            "parameters": params,
            "responses": responses,
        });
        if self.auth {
            op["security"] = json!([{"bearer": []}]);
        } else {
            op["security"] = json!([]);
        }
        match self.body {
            Body::None => {}
            Body::Json(f) => {
                op["requestBody"] = json!({
                    "required": false,
                    "description": "JSON; an empty body is read as `{}`",
                    "content": {"application/json": {"schema": Value::from(f(req))}},
                });
            }
            Body::Bytes => {
                op["requestBody"] = json!({
                    "required": true,
                    "content": {"application/octet-stream": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}},
                });
            }
        }
        op
    }
}

fn operation_id(op: &Op) -> String {
    let mut id = op.method.as_str().to_string();
    for seg in op.path.split('/').filter(|s| !s.is_empty() && *s != "v1") {
        let seg = seg.trim_start_matches('{').trim_end_matches('}');
        id.push('_');
        id.push_str(&seg.replace(['.', '-'], "_"));
    }
    id
}

/// The OpenAPI 3.1 document for `ops`.
pub fn build(ops: &[Op]) -> Value {
    // Request bodies are read (deserialize contract: `default` fields are
    // optional); responses are written (serialize contract: skipped
    // `None`s are optional). Both share `components/schemas`, so a type
    // used both ways must come out the same (checked by a test).
    let settings = SchemaSettings::draft2020_12().with(|s| {
        s.definitions_path = "/components/schemas".into();
        s.meta_schema = None;
    });
    let mut req = settings.clone().for_deserialize().into_generator();
    let mut resp = settings.for_serialize().into_generator();
    let mut paths = Map::new();
    for op in ops {
        let v = op.operation(&mut resp, &mut req);
        let entry = paths
            .entry(op.path.to_string())
            .or_insert_with(|| json!({}));
        entry[op.method.as_str()] = v;
    }
    let mut schemas = resp.take_definitions(true);
    for (name, schema) in req.take_definitions(true) {
        match schemas.get(&name) {
            Some(other) if *other != schema => {
                panic!("schema {name} differs between requests and responses: {other} vs {schema}")
            }
            _ => {
                schemas.insert(name, schema);
            }
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "nullspace API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Template builds, logs, templates, tags, aliases, claims and context blobs; machines (`/v1/machines` for nullspace-sdk 1.0.x, `/v1/sandboxes` for 0.1.9) and their snapshots. The wire contract the published SDK relies on: docs/sdk-contract.md (templates) and the README section Machines.",
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "An API key from `nullspace keys create`"}},
            "schemas": schemas,
        },
        "paths": paths,
    })
}

/// `GET /openapi.json`.
pub async fn document() -> axum::response::Response {
    use axum::response::IntoResponse;
    // Serialised once: the document is fixed, and (170 KiB) cloning and
    // serialising it per request let a client that pipelines requests for
    // it and never reads the answers keep a core busy.
    static DOC: OnceLock<axum::body::Bytes> = OnceLock::new();
    let doc = DOC.get_or_init(|| {
        let ops: Vec<Op> = crate::http::routes().into_iter().map(|r| r.op).collect();
        serde_json::to_vec(&build(&ops)).unwrap_or_default().into()
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        doc.clone(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops() -> Vec<Op> {
        crate::http::routes().into_iter().map(|r| r.op).collect()
    }

    #[test]
    fn document_has_every_route() {
        let ops = ops();
        let doc = build(&ops);
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().unwrap();
        let mut n = 0;
        for op in &ops {
            let o = &paths[op.path][op.method.as_str()];
            assert!(
                o.is_object(),
                "{} {} is not documented",
                op.method.as_str(),
                op.path
            );
            let documented: Vec<&str> = o["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().unwrap())
                .collect();
            assert_eq!(documented, op.path_params().collect::<Vec<_>>());
            n += 1;
        }
        let total: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(
            total, n,
            "the document has operations the router does not serve"
        );
        // Operation ids are unique.
        let mut ids: Vec<String> = ops.iter().map(operation_id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), ops.len());
    }

    /// The router is `routes()` and nothing else: a `.route(` call in
    /// `http.rs` outside the table would serve an undocumented path.
    #[test]
    fn router_is_built_only_from_the_table() {
        let src = include_str!("http.rs");
        let calls = src.matches(".route(").count();
        assert_eq!(
            calls, 1,
            "http.rs must add routes only through `routes()` (found {calls} `.route(` calls)"
        );
        assert!(!src.contains(".nest("));
        // The one exception: the preview proxy's path routes (the guest's
        // paths under `/preview/{id}/{port}/`, any method), merged once.
        assert_eq!(src.matches(".merge(crate::preview::routes())").count(), 1);
        assert_eq!(
            include_str!("preview/mod.rs")
                .matches(".route(\"/preview/")
                .count(),
            3
        );
        // The other: E2B's SDK dialect (its own keys, shapes and paths,
        // documented by E2B, not in this document), merged once.
        assert_eq!(
            src.matches(".merge(crate::e2b::routes(state.clone()))")
                .count(),
            1
        );
        // The one fallback answers errors only (501, JSON 404/405).
        assert_eq!(
            src.matches(".fallback(").count(),
            src.matches(".fallback(machine_api::not_offered::fallback)")
                .count()
        );
    }

    #[test]
    fn every_v1_route_needs_a_key() {
        for op in ops() {
            // `/metrics` names templates of every namespace: a key too.
            let keyed = op.path.starts_with("/v1/") || op.path == "/metrics";
            assert_eq!(op.auth, keyed, "{}", op.path);
        }
    }

    #[test]
    fn schemas_resolve() {
        let doc = build(&ops());
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for name in [
            "BuildRequest",
            "BuildRecord",
            "LogEntry",
            "TemplateInfo",
            "ErrorBody",
            "FailureDetail",
            "CancelBody",
            "RetryBody",
            "PromoteBody",
            "PreflightBody",
            "TagsBody",
            "RenameBody",
            "VisibilityBody",
            "ClaimBody",
        ] {
            assert!(schemas.contains_key(name), "{name} missing");
        }
        for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &piece[..piece.find('"').unwrap()];
            assert!(schemas.contains_key(name), "dangling $ref {name}");
        }
    }
}
