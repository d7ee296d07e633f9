//! Request bodies a handler left unread are read and discarded before the answer goes out.
//!
//! A server that answers before reading the whole request body (413 for one over the limit, or
//! a refusal that never looks at it) and then closes the connection makes the kernel reset it,
//! since unread data remains; the client may then see the reset instead of the answer. So every
//! handler gets its body through [`Tracked`], which hands back what it left unread, and this
//! layer discards that rest (bounded in bytes and time, like nginx's lingering close) before
//! the answer is sent. A rest it cannot finish closes the connection after the answer.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Version, header};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt as _;

use crate::api::ApiState;

/// Discards what the handler left of the request body: at most `http_discard_bytes`, within the
/// request timeout.
pub(super) async fn drain_unread_bodies(State(state): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    let version = request.version();
    let (parts, body) = request.into_parts();
    let unread = Arc::new(Mutex::new(None));
    let tracked = Tracked {
        body: Some(body),
        unread: Arc::clone(&unread),
    };
    let mut response = next.run(Request::from_parts(parts, Body::new(tracked))).await;
    let rest = unread.lock().unwrap_or_else(|poison| poison.into_inner()).take();
    if let Some(rest) = rest {
        let limit = state.options.discard_bytes;
        let drained = tokio::time::timeout(state.options.request_timeout, discard(rest, limit)).await;
        // HTTP/2 ends one stream, not the connection, and forbids the header.
        if drained != Ok(true) && version <= Version::HTTP_11 {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    response
}

/// Reads `body` to its end; false if it ends in an error or holds more than `max_bytes`.
async fn discard(mut body: Body, max_bytes: usize) -> bool {
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return false };
        read = read.saturating_add(frame.data_ref().map_or(0, Bytes::len));
        if read > max_bytes {
            return false;
        }
    }
    true
}

/// A request body that, dropped before its end, leaves the rest for [`drain_unread_bodies`].
struct Tracked {
    body: Option<Body>,
    unread: Arc<Mutex<Option<Body>>>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        match self.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(body) = self.body.take()
            && !body.is_end_stream()
        {
            *self.unread.lock().unwrap_or_else(|poison| poison.into_inner()) = Some(body);
        }
    }
}
