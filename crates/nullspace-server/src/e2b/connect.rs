//! The Connect protocol's framing with the JSON codec, over HTTP/1.1, as
//! E2B's SDK (the `connectrpc` Python client) speaks it: unary calls are a
//! JSON body each way; streaming calls carry envelopes (a flags byte, a
//! big-endian u32 length, the JSON), the response ending with an
//! end-of-stream envelope (flags 0x02) that may hold an error.
//!
//! Written here rather than taken from the `connectrpc` crate: that crate
//! serves services generated (with buffa) from `.proto` files through its
//! own codegen at build time, and envd's protos are not part of this
//! repository; the few messages E2B's SDK sends are plain serde structs
//! over JSON, and the framing is this file.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::errors::RpcError;

pub const STREAM_TYPE: &str = "application/connect+json";
/// Flags of the end-of-stream envelope.
const END_STREAM: u8 = 0x02;
/// Flags of a compressed envelope (the SDK never compresses).
const COMPRESSED: u8 = 0x01;
/// The most envelopes one request body may carry (StreamInput).
const MAX_ENVELOPES: usize = 4096;

/// One envelope.
pub fn envelope(flags: u8, json: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(5 + json.len());
    b.push(flags);
    b.extend_from_slice(&(json.len() as u32).to_be_bytes());
    b.extend_from_slice(json);
    Bytes::from(b)
}

/// A message envelope.
pub fn message<T: Serialize>(m: &T) -> Bytes {
    envelope(0, &serde_json::to_vec(m).unwrap_or_else(|_| b"{}".to_vec()))
}

/// The end-of-stream envelope, with the stream's error if it failed.
pub fn end(err: Option<&RpcError>) -> Bytes {
    let body = match err {
        Some(e) => serde_json::json!({"error": e.body()}),
        None => serde_json::json!({}),
    };
    envelope(END_STREAM, body.to_string().as_bytes())
}

/// The envelopes of a streaming request body, in order.
pub fn envelopes(mut body: &[u8]) -> Result<Vec<Bytes>, RpcError> {
    let mut out = vec![];
    while !body.is_empty() {
        if body.len() < 5 {
            return Err(RpcError::invalid(
                "request body: a truncated envelope header",
            ));
        }
        let flags = body[0];
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        if flags & COMPRESSED != 0 {
            return Err(RpcError::new(
                "unimplemented",
                "request body: compressed envelopes are not accepted (send identity)",
            ));
        }
        let Some(msg) = body.get(5..5 + len) else {
            return Err(RpcError::invalid(format!(
                "request body: an envelope of {len} bytes is longer than the body"
            )));
        };
        if flags & END_STREAM == 0 {
            out.push(Bytes::copy_from_slice(msg));
        }
        if out.len() > MAX_ENVELOPES {
            return Err(RpcError::invalid(format!(
                "request body: more than {MAX_ENVELOPES} envelopes"
            )));
        }
        body = &body[5 + len..];
    }
    Ok(out)
}

/// A message from JSON, in the proto3 JSON mapping (unknown fields are
/// ignored, as the SDK's codec does).
pub fn decode<T: DeserializeOwned>(json: &[u8]) -> Result<T, RpcError> {
    let json = if json.is_empty() {
        b"{}" as &[u8]
    } else {
        json
    };
    serde_json::from_slice(json)
        .map_err(|e| RpcError::invalid(format!("request message could not be decoded: {e}")))
}

/// The request message of a server-streaming call (one envelope) or a
/// unary one (the body itself), by the request's content type.
pub fn request<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, RpcError> {
    if is_stream(headers) {
        let all = envelopes(body)?;
        let first = all
            .first()
            .ok_or_else(|| RpcError::invalid("request body: no message envelope"))?;
        decode(first)
    } else {
        decode(body)
    }
}

pub fn is_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/connect+"))
}

/// A unary answer.
pub fn unary<T: Serialize>(r: Result<T, RpcError>) -> Response {
    match r {
        Ok(m) => (StatusCode::OK, axum::Json(m)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `Connect-Timeout-Ms`: the call's deadline (for Start, the process's
/// lifetime).
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

/// How long a stream may stay silent before a keepalive message
/// (`Keepalive-Ping-Interval`, seconds; envd's default 90).
pub fn keepalive(headers: &HeaderMap) -> Duration {
    let secs = headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(90);
    Duration::from_secs(secs.clamp(1, 3600))
}

/// A streaming answer: 200, then every envelope sent to the returned
/// sender, each flushed as its own chunk; the producer sends the
/// end-of-stream envelope last. The channel is small: a client that does
/// not read holds the producer, not the server's memory.
pub fn stream() -> (mpsc::Sender<Bytes>, Response) {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(STREAM_TYPE));
    (tx, resp)
}

/// A streaming call that failed before its first message: 200 with only
/// the end-of-stream envelope, which the SDK raises as the error.
pub fn stream_error(e: RpcError) -> Response {
    let mut resp = Response::new(Body::from(end(Some(&e))));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(STREAM_TYPE));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_end_stream_is_skipped() {
        let mut body = envelope(0, br#"{"a":1}"#).to_vec();
        body.extend_from_slice(&envelope(0, b"{}"));
        body.extend_from_slice(&end(None));
        let all = envelopes(&body).unwrap();
        assert_eq!(
            all,
            vec![Bytes::from_static(br#"{"a":1}"#), Bytes::from_static(b"{}")]
        );
    }

    #[test]
    fn truncated_and_compressed_envelopes_are_refused() {
        let e = envelopes(&[0, 0, 0, 0, 9, b'{']).unwrap_err();
        assert_eq!(e.code, "invalid_argument");
        assert!(e.message.contains("9 bytes"), "{e}");
        let e = envelopes(&envelope(COMPRESSED, b"x")).unwrap_err();
        assert_eq!(e.code, "unimplemented");
        assert_eq!(envelopes(&[0, 0]).unwrap_err().code, "invalid_argument");
    }

    #[test]
    fn end_of_stream_carries_the_error() {
        let b = end(Some(&RpcError::not_found("process 7 not found")));
        assert_eq!(b[0], END_STREAM);
        let v: serde_json::Value = serde_json::from_slice(&b[5..]).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
    }
}
