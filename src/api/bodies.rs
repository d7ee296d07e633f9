//! Request bodies in flight: a node-wide budget of bytes.
//!
//! Requests in flight are bounded in number ([`crate::shed`]), but a body may be up to
//! `max_request_bytes` (24 MiB), and a thousand large ones at once would take more memory than
//! the machine has: one tenant could bring the node down for all. So the bytes of request bodies
//! held at once are counted, from the first byte received to the end of the request's handling,
//! and a body that would take the count past `solo.max_in_flight_body_bytes` is refused
//! (429 / RESOURCE_EXHAUSTED, retry later) rather than read. A body's first
//! [`FREE_BYTES_PER_REQUEST`] are not counted: small requests (calls, kills, queries) always get
//! through, and the budget decides only among large uploads. A body whose length is declared is
//! charged in full before it is read.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use axum::body::Bytes;
use futures_util::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use tonic::server::NamedService;

/// Bytes of each body that the budget does not count.
pub const FREE_BYTES_PER_REQUEST: u64 = 64 << 10;

/// What the node's request bodies hold, against its limit.
#[derive(Debug)]
pub struct BodyBudget {
    held: AtomicU64,
    limit: u64,
}

impl BodyBudget {
    pub fn new(limit: u64) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            held: AtomicU64::new(0),
            limit,
        })
    }

    /// Counted bytes held now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Wraps a request's body so that what it receives is charged to this budget, for as long
    /// as the returned [`Charge`] lives. A declared length is charged at once; if it cannot be,
    /// the charge is already refused.
    pub fn meter<B: Body>(self: &Arc<Self>, body: B) -> (Metered<B>, Arc<Charge>) {
        let charge = Arc::new(Charge {
            budget: Arc::clone(self),
            received: AtomicU64::new(0),
            refused: AtomicBool::new(false),
        });
        let declared = body.size_hint().exact();
        let prepaid = declared.is_some_and(|length| charge.add(length));
        let metered = Metered {
            body,
            charge: Arc::clone(&charge),
            prepaid,
        };
        (metered, charge)
    }
}

/// One request's share of the budget, given back when the last of its holders (the body, the
/// request's handling) lets go of it.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<BodyBudget>,
    /// Bytes received (or declared), counted and free together.
    received: AtomicU64,
    refused: AtomicBool,
}

impl Charge {
    /// Counts `bytes` more of the body; false, and nothing counted, if the budget has no room.
    fn add(&self, bytes: u64) -> bool {
        let before = self.received.fetch_add(bytes, Ordering::Relaxed);
        let counted = counted(before + bytes) - counted(before);
        if counted == 0 {
            return true;
        }
        let held = self.budget.held.fetch_add(counted, Ordering::Relaxed) + counted;
        if held > self.budget.limit {
            self.budget.held.fetch_sub(counted, Ordering::Relaxed);
            self.received.fetch_sub(bytes, Ordering::Relaxed);
            self.refused.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Whether the body was refused for want of room.
    pub fn was_refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// The refusal, for either API: overloaded, with a retry hint.
    pub fn refusal(&self) -> super::Error {
        let message = format!(
            "the node holds as many request bytes in flight as it may ({} MiB, [solo] max_in_flight_body_bytes); \
             retry later",
            self.budget.limit >> 20
        );
        super::Error::new(super::ErrorKind::Overloaded, message).with_retry_after(crate::shed::RETRY_AFTER)
    }
}

fn counted(received: u64) -> u64 {
    received.saturating_sub(FREE_BYTES_PER_REQUEST)
}

impl Drop for Charge {
    fn drop(&mut self) {
        let counted = counted(*self.received.get_mut());
        self.budget.held.fetch_sub(counted, Ordering::Relaxed);
    }
}

/// A request body whose bytes are charged as they arrive. Refused, it ends with an error (a
/// RESOURCE_EXHAUSTED status, which tonic passes on as it is).
#[derive(Debug)]
pub struct Metered<B> {
    body: B,
    charge: Arc<Charge>,
    /// The declared length was charged up front.
    prepaid: bool,
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.charge.was_refused() {
            return Poll::Ready(Some(Err(self.refused())));
        }
        let frame = match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if !self.prepaid
            && let Some(data) = frame.data_ref()
            && !self.charge.add(data.len() as u64)
        {
            return Poll::Ready(Some(Err(self.refused())));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B> Metered<B> {
    fn refused(&self) -> Box<dyn std::error::Error + Send + Sync> {
        Box::new(self.charge.refusal().to_status())
    }
}

/// Meters the request bodies of a gRPC service; a request's charge lasts until its answer is
/// ready (for a unary call: decoded, handled and encoded).
#[derive(Debug, Clone)]
pub struct MeterBodies<S> {
    inner: S,
    budget: Arc<BodyBudget>,
}

impl<S> MeterBodies<S> {
    pub fn new(inner: S, budget: Arc<BodyBudget>) -> MeterBodies<S> {
        MeterBodies { inner, budget }
    }
}

impl<S: NamedService> NamedService for MeterBodies<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for MeterBodies<S>
where
    S: tower::Service<http::Request<Metered<B>>>,
    S::Future: Send + 'static,
    B: Body,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let (metered, charge) = self.budget.meter(body);
        let answer = self.inner.call(http::Request::from_parts(parts, metered));
        Box::pin(async move {
            let answer = answer.await;
            drop(charge);
            answer
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, Full, StreamBody};

    /// A body streamed in frames of these sizes, of unknown length.
    fn chunks(sizes: &[usize]) -> impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin + use<> {
        let frames: Vec<Result<_, std::convert::Infallible>> = sizes
            .iter()
            .map(|&n| Ok(Frame::data(Bytes::from(vec![0u8; n]))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn only_bytes_past_the_free_share_are_counted_and_held_until_the_end() {
        let budget = BodyBudget::new(1 << 20);
        let free = FREE_BYTES_PER_REQUEST as usize;
        let (body, charge) = budget.meter(chunks(&[free, 1000, 24]));
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(collected.len(), free + 1024);
        assert_eq!(budget.held(), 1024, "the free share is not counted");
        // The body is read, and the request's handling still holds its bytes until it ends.
        drop(charge);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_body_past_the_budget_is_refused_and_counts_nothing() {
        let budget = BodyBudget::new(100 << 10);
        let free = FREE_BYTES_PER_REQUEST as usize;
        // A declared length is charged before a byte is read.
        let (first, first_charge) = budget.meter(Full::new(Bytes::from(vec![0u8; free + (80 << 10)])));
        assert!(!first_charge.was_refused());
        assert_eq!(budget.held(), 80 << 10);
        // One streamed in is charged as it comes, and refused at the frame that does not fit.
        let (second, second_charge) = budget.meter(chunks(&[free, 10 << 10, 30 << 10]));
        let error = second.collect().await.unwrap_err();
        let status = error.downcast::<tonic::Status>().expect("a status");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("max_in_flight_body_bytes"), "{status:?}");
        assert!(second_charge.was_refused());
        assert_eq!(budget.held(), 90 << 10, "the refused frame is not counted");
        drop(second_charge);
        assert_eq!(budget.held(), 80 << 10);
        // Small bodies get through whatever the budget holds.
        let (small, small_charge) = budget.meter(Full::new(Bytes::from_static(b"ping")));
        assert_eq!(small.collect().await.unwrap().to_bytes(), "ping");
        assert!(!small_charge.was_refused());
        drop((first, first_charge, small_charge));
        assert_eq!(budget.held(), 0);
    }
}
