//! Unread request bodies. hyper closes a keep-alive connection whose
//! request body the handler dropped unread, so the client's next request
//! on it fails ("server disconnected"), and a client still sending a large
//! body to a route that answered early (401, 404) gets a broken pipe
//! instead of the answer. Here the body a handler dropped is taken back,
//! and read to its end and discarded before the answer goes out, within
//! [`HttpLimits`]: past them the answer says `Connection: close` (as it
//! does when the client waits for `100 Continue` and has sent nothing).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::StreamExt;

use super::HttpLimits;
use crate::state::Shared;

/// Where a request body the handler dropped before its end is put back,
/// with whether any of it was read.
type Slot = Arc<Mutex<Option<(Body, bool)>>>;

/// A request body that, dropped before its end, returns what is left to
/// its [`Slot`] instead of dropping it.
struct Tracked {
    inner: Option<Body>,
    slot: Slot,
    polled: bool,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        self.polled = true;
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(Pin::new(inner).poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            // The end, or a broken body: nothing is left to drain.
            self.inner = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(rest) = self.inner.take().filter(|b| !b.is_end_stream())
            && let Ok(mut slot) = self.slot.lock()
        {
            *slot = Some((rest, self.polled));
        }
    }
}

/// Middleware: tracks the request body; if the handler answered without
/// reading it to the end, reads and discards the rest (at most
/// `drain_max_bytes`, within `header_read_timeout`) before the answer, or
/// else marks the answer `Connection: close`.
pub async fn drain_unread(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    if body.is_end_stream() {
        return next.run(Request::from_parts(parts, body)).await;
    }
    // A client that asked before sending (`Expect: 100-continue`) and was
    // never told to go on has sent nothing: closing is cleaner than
    // inviting the body only to discard it.
    let expects = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let slot = Slot::default();
    let tracked = Body::new(Tracked {
        inner: Some(body),
        slot: slot.clone(),
        polled: false,
    });
    let mut resp = next.run(Request::from_parts(parts, tracked)).await;
    let rest = slot.lock().ok().and_then(|mut s| s.take());
    if let Some((rest, polled)) = rest
        && ((expects && !polled) || !discard(rest, &state.config.http).await)
    {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Reads `body` to its end within `limits`; false when it could not (too
/// long, too slow, or broken): the connection cannot be reused.
async fn discard(body: Body, limits: &HttpLimits) -> bool {
    // A declared length past the bound is not worth reading.
    if body.size_hint().lower() > limits.drain_max_bytes {
        return false;
    }
    let mut left = limits.drain_max_bytes;
    let mut data = body.into_data_stream();
    let read = async {
        while let Some(chunk) = data.next().await {
            match chunk {
                Ok(c) if (c.len() as u64) <= left => left -= c.len() as u64,
                _ => return false,
            }
        }
        true
    };
    tokio::time::timeout(limits.header_read_timeout, read)
        .await
        .unwrap_or(false)
}
