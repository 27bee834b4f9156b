//! One error shape for every answer: handlers answer with
//! [`ApiError`]'s JSON, but the framework answers some requests before any
//! handler runs (a body over the limit, a path or query that does not
//! parse, a missing content type) with plain text, which the SDK reports as
//! `MachineError(text, 'unknown')`. This middleware turns any error answer
//! that is not JSON into `{"error", "code"}`, keeping its status and
//! headers. Answers relayed from a machine's own server (the preview proxy)
//! are marked [`Relayed`] and left as they are.

use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Marks an answer that is not the API's own (a guest's, through the
/// preview proxy): its status and body are passed on untouched.
#[derive(Debug, Clone, Copy)]
pub struct Relayed;

/// The most bytes of a plain-text rejection kept as the message.
const MESSAGE_MAX: usize = 1024;

/// Middleware: error answers that are not JSON become the API's JSON error.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let what = format!("{} {}", req.method(), req.uri().path());
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error())
        || is_json(resp.headers())
        || resp.extensions().get::<Relayed>().is_some()
    {
        return resp;
    }
    // The framework's rejections are short and whole; a body that may be
    // long or a stream is left alone rather than waited for.
    if axum::body::HttpBody::size_hint(resp.body())
        .upper()
        .is_none_or(|n| n > MESSAGE_MAX as u64 * 64)
    {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, MESSAGE_MAX)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let mut out =
        ApiError::new(status, code(status), message(status, &what, &text)).into_response();
    // Keep what the status relies on (`Allow`, `Retry-After`,
    // `Connection: close`), not the old body's description.
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    out
}

fn is_json(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let essence = v.split(';').next().unwrap_or("").trim();
            essence.eq_ignore_ascii_case("application/json") || essence.ends_with("+json")
        })
}

/// The SDK's `code` for a status the framework chose.
fn code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::LENGTH_REQUIRED => "length_required",
        StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_exceeded",
        StatusCode::NOT_IMPLEMENTED => "not_implemented",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        StatusCode::GATEWAY_TIMEOUT => "timeout",
        s if s.is_server_error() => "internal_error",
        _ => "invalid_request",
    }
}

/// One line: the request, and what was wrong with it.
fn message(status: StatusCode, what: &str, text: &str) -> String {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "{what}: the request body is over the {} MiB limit",
            crate::http::BODY_LIMIT >> 20
        ),
        _ if text.is_empty() => format!(
            "{what}: {}",
            status.canonical_reason().unwrap_or("request refused")
        ),
        _ => format!("{what}: {}", text.replace('\n', " ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::routing::{get, post};
    use tower::ServiceExt;

    async fn call(app: Router, req: axum::http::Request<Body>) -> Response {
        app.oneshot(req).await.unwrap()
    }

    async fn body_json(resp: Response) -> serde_json::Value {
        let b = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        serde_json::from_slice(&b).unwrap()
    }

    fn app() -> Router {
        Router::new()
            .route("/bytes", post(|_: axum::body::Bytes| async { "ok" }))
            .route(
                "/num/{n}",
                get(
                    |axum::extract::Path(n): axum::extract::Path<u16>| async move { n.to_string() },
                ),
            )
            .route(
                "/relayed",
                get(|| async {
                    let mut r = (StatusCode::NOT_FOUND, "guest's own page").into_response();
                    r.extensions_mut().insert(Relayed);
                    r
                }),
            )
            .route(
                "/api",
                get(|| async { ApiError::new(StatusCode::CONFLICT, "x_conflict", "taken") }),
            )
            .layer(axum::extract::DefaultBodyLimit::max(16))
            .layer(axum::middleware::from_fn(json_errors))
    }

    fn req(method: &str, uri: &str, body: &'static str) -> axum::http::Request<Body> {
        axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body))
            .unwrap()
    }

    /// The framework's rejections come out as JSON with a code; the API's
    /// own errors and relayed answers are left alone.
    #[tokio::test]
    async fn rejections_become_json_errors() {
        let r = call(app(), req("POST", "/bytes", "more than sixteen bytes")).await;
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let v = body_json(r).await;
        assert_eq!(v["code"], "request_too_large", "{v}");
        assert!(
            v["error"].as_str().unwrap().starts_with("POST /bytes: "),
            "{v}"
        );

        let r = call(app(), req("GET", "/num/notanumber", "")).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let v = body_json(r).await;
        assert_eq!(v["code"], "invalid_request", "{v}");

        let r = call(app(), req("GET", "/api", "")).await;
        assert_eq!(body_json(r).await["code"], "x_conflict");

        let r = call(app(), req("GET", "/relayed", "")).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let b = axum::body::to_bytes(r.into_body(), 100).await.unwrap();
        assert_eq!(&b[..], b"guest's own page");
    }
}
