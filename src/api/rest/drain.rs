//! Request bodies a handler left unread are read and discarded, so the client gets the answer.
//!
//! A server that answers before reading the whole request body (413 for one over the limit, or
//! a refusal that never looks at it) and then closes the connection makes the kernel reset it,
//! since unread data remains; the client may then see the reset instead of the answer. So every
//! handler gets its body through [`Tracked`], which hands back what it left unread, and while
//! the answer goes out this layer reads and discards that rest, bounded in bytes and time (what
//! nginx's lingering close does). A rest whose length is known to be over the bound, or that
//! a client sending `Expect: 100-continue` holds back until told to go on, is not read: the
//! connection closes after the answer.

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

/// Discards what the handler left of the request body, alongside the answer: at most
/// `http_discard_bytes`, within the request timeout.
pub(super) async fn drain_unread_bodies(State(state): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    let version = request.version();
    // Such a client sends its body only once told to go on: refused, it need not send it at all.
    let awaits_continue = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
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
        if rest.size_hint().lower() <= limit as u64 && !awaits_continue {
            // The answer goes out at once; the connection reads the rest meanwhile.
            let timeout = state.options.request_timeout;
            tokio::spawn(tokio::time::timeout(timeout, discard(rest, limit)));
        } else if version <= Version::HTTP_11 {
            // HTTP/2 ends one stream, not the connection, and forbids the header.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    response
}

/// Reads `body` to its end, unless it fails or holds more than `max_bytes`. Dropping a body
/// before its end closes the connection once the answer is out.
async fn discard(mut body: Body, max_bytes: usize) {
    let mut read = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        read = read.saturating_add(frame.data_ref().map_or(0, Bytes::len));
        if read > max_bytes {
            return;
        }
    }
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
