//! envd's plain HTTP routes: `/files` download and upload (multipart with
//! one part per file, or the body itself as `application/octet-stream`,
//! optionally gzip-encoded) through the machine's file operations, and
//! `/health`.

use std::collections::HashMap;
use std::io::Read as _;

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::auth::Envd;
use super::errors::RestError;
use crate::http::BODY_LIMIT;
use crate::machines::files;
use crate::state::Shared;

/// `GET /health`: the gate let it through, so the sandbox runs.
pub async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// `e2b-code-interpreter`'s routes: not offered.
pub async fn code_interpreter() -> RestError {
    RestError::new(
        StatusCode::NOT_IMPLEMENTED,
        format!(
            "E2B's code interpreter (port {}, run_code) is not offered by nullspace: run code with commands.run",
            super::CODE_INTERPRETER_PORT
        ),
    )
}

/// The user of a `/files` call: the header's, else `username`.
fn user(e: &Envd, q: &HashMap<String, String>) -> Option<String> {
    e.user.clone().or_else(|| {
        q.get("username")
            .filter(|u| !u.is_empty() && *u != "user")
            .cloned()
    })
}

fn path_of(e: &Envd, q: &HashMap<String, String>) -> Result<String, RestError> {
    let p = q.get("path").filter(|p| !p.is_empty()).ok_or_else(|| {
        RestError::new(
            StatusCode::BAD_REQUEST,
            "/files: the path parameter is required",
        )
    })?;
    Ok(e.path(p))
}

/// `GET /files?path=…`: the file's bytes as the guest reads them.
pub async fn download(
    State(s): State<Shared>,
    Extension(e): Extension<Envd>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, RestError> {
    let path = path_of(&e, &q)?;
    let user = user(&e, &q);
    let info = files::stat_file(&s, &e.caller, &e.id, &path, user.as_deref()).await?;
    if info.is_dir {
        return Err(RestError::new(
            StatusCode::BAD_REQUEST,
            format!("path {path} is a directory, not a file"),
        ));
    }
    let (size, body) = files::read_stream(&s, &e.caller, &e.id, &path, user.as_deref()).await?;
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    Ok(resp)
}

/// One written file as the SDK reads it back.
fn written(path: &str) -> Value {
    let name = path.rsplit('/').next().unwrap_or(path);
    json!({"name": name, "type": "file", "path": path})
}

/// A gzip body, inflated to at most the body limit (a bomb is refused,
/// not inflated).
fn gunzip(b: &[u8]) -> Result<Vec<u8>, RestError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b)
        .take(BODY_LIMIT as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|err| {
            RestError::new(
                StatusCode::BAD_REQUEST,
                format!("/files: the gzip body does not inflate: {err}"),
            )
        })?;
    if out.len() > BODY_LIMIT {
        return Err(RestError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "/files: the inflated body is over the {} MiB limit",
                BODY_LIMIT >> 20
            ),
        ));
    }
    Ok(out)
}

/// `POST /files`: multipart (each part's file name is its path when the
/// query names none) or the body itself.
pub async fn upload(
    State(s): State<Shared>,
    Extension(e): Extension<Envd>,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Result<Response, RestError> {
    let user = user(&e, &q);
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let gzip = req
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    let mut out = vec![];
    if ct.starts_with("multipart/form-data") {
        let mut mp = Multipart::from_request(req, &s)
            .await
            .map_err(|err| RestError::new(StatusCode::BAD_REQUEST, format!("/files: {err}")))?;
        while let Some(field) = mp
            .next_field()
            .await
            .map_err(|err| RestError::new(StatusCode::BAD_REQUEST, format!("/files: {err}")))?
        {
            let dest = match q.get("path").filter(|p| !p.is_empty()) {
                Some(p) => e.path(p),
                None => e.path(field.file_name().filter(|f| !f.is_empty()).ok_or_else(|| {
                    RestError::new(
                        StatusCode::BAD_REQUEST,
                        "/files: a part without a file name and no path parameter",
                    )
                })?),
            };
            let data = field
                .bytes()
                .await
                .map_err(|err| RestError::new(StatusCode::BAD_REQUEST, format!("/files: {err}")))?;
            files::write_file(&s, &e.caller, &e.id, &dest, data.to_vec(), user.as_deref()).await?;
            out.push(written(&dest));
        }
    } else {
        let dest = path_of(&e, &q)?;
        let data = Bytes::from_request(req, &s)
            .await
            .map_err(|err| RestError::new(err.status(), format!("/files: {err}")))?;
        let data = if gzip { gunzip(&data)? } else { data.to_vec() };
        files::write_file(&s, &e.caller, &e.id, &dest, data, user.as_deref()).await?;
        out.push(written(&dest));
    }
    if out.is_empty() {
        return Err(RestError::new(
            StatusCode::BAD_REQUEST,
            "/files: no file in the request",
        ));
    }
    Ok((StatusCode::OK, axum::Json(out)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gzip_body_inflates_and_garbage_is_refused() {
        use std::io::Write as _;
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(b"hello").unwrap();
        assert_eq!(gunzip(&z.finish().unwrap()).unwrap(), b"hello");
        let e = gunzip(b"not gzip").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}
