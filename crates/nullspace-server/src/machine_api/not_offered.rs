//! What answers a request no route serves: the SDK's routes this server
//! does not offer get `501 not_implemented` naming the feature (the SDK
//! raises its `NotImplementedError`), any other path a JSON 404, and a
//! known path with another method a JSON 405. Never a bare status: the SDK
//! reports an empty body as `MachineError('', 'unknown')`.

use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::not_implemented;
use crate::error::ApiError;

/// Families under `/v1/machines/{id}/…` (and `/v1/sandboxes/{id}/…`) by
/// their first segment, with what they are.
const MACHINE_FAMILIES: &[(&str, &str)] = &[
    ("desktop", "desktop machines"),
    ("code", "the code interpreter"),
    // Served under /v1/machines; 0.1.9's prefix has none.
    ("volumes", "volumes for sandboxes (SDK 0.1.9)"),
    ("egress", "egress policies for sandboxes (SDK 0.1.9)"),
    ("host", "this port operation"),
    ("ports", "this port operation"),
    ("preview-urls", "this preview URL operation"),
    // Served under /v1/machines (http::ssh_routes); 0.1.9's prefix has none.
    ("ssh-access", "SSH access for sandboxes (SDK 0.1.9)"),
    ("metrics", "machine metrics"),
    ("lifecycle", "this lifecycle operation"),
    ("git", "this git operation"),
    ("pty", "terminals"),
    ("uploads", "upload sessions"),
    ("files", "this file operation"),
    ("processes", "this process operation"),
];

/// Top-level families under `/v1/…`.
const API_FAMILIES: &[(&str, &str)] = &[
    // The routes offered are served; the rest (upload sessions, search…) not.
    ("volumes", "this volume operation"),
    ("functions", "functions"),
    ("environments", "environments"),
    ("secrets", "secrets"),
    ("lifecycle", "lifecycle events and webhooks"),
    ("monitor", "the monitor stream"),
    ("desktop", "desktop machines"),
];

/// The feature a path belongs to, if it is one the SDK knows.
fn feature(path: &str) -> Option<&'static str> {
    let seg: Vec<&str> = path.trim_matches('/').split('/').collect();
    if seg.first() != Some(&"v1") {
        return None;
    }
    match seg.as_slice() {
        [_, "machines" | "sandboxes", _id, family, ..] => MACHINE_FAMILIES
            .iter()
            .find(|(f, _)| f == family)
            .map(|(_, what)| *what),
        [_, family, ..] => API_FAMILIES
            .iter()
            .find(|(f, _)| f == family)
            .map(|(_, what)| *what),
        _ => None,
    }
}

/// The router's fallback.
pub async fn fallback(method: Method, uri: Uri) -> Response {
    let path = uri.path();
    match feature(path) {
        Some(what) => not_implemented(format!(
            "{what} ({method} {path}) is not offered by this server"
        ))
        .into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route for {method} {path}"),
        )
        .into_response(),
    }
}

/// A path that exists with another method.
pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not accept {method}", uri.path()),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::feature;

    #[test]
    fn sdk_families_are_named_and_others_are_not() {
        assert_eq!(
            feature("/v1/machines/mch_1/desktop/screenshot"),
            Some("desktop machines")
        );
        assert_eq!(
            feature("/v1/sandboxes/sbx/volumes"),
            Some("volumes for sandboxes (SDK 0.1.9)")
        );
        assert_eq!(feature("/v1/functions/f_1"), Some("functions"));
        assert_eq!(
            feature("/v1/machines/mch_1/ports/80/other"),
            Some("this port operation")
        );
        assert_eq!(feature("/v1/nothing"), None);
        assert_eq!(feature("/v2/machines/x/desktop"), None);
        assert_eq!(feature("/"), None);
    }
}
