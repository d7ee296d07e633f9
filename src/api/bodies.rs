//! Request bodies in flight: a node-wide budget of bytes, and each tenant's share of it.
//!
//! Requests in flight are bounded in number ([`crate::shed`]), but a body may be up to
//! `max_request_bytes` (24 MiB), and a thousand large ones at once would take more memory than
//! the machine has: one tenant could bring the node down for all. So the bytes of request bodies
//! held at once are counted, from the first byte received to the end of the request's handling,
//! and a body that would take the count past `[solo] max_in_flight_body_bytes` is refused
//! (429 / RESOURCE_EXHAUSTED, retry later) rather than read. A tenant's bodies count against
//! its own `[limits] max_in_flight_body_bytes` too, so one tenant's uploads cannot hold the
//! whole budget and keep the others' out; the admin's count against the node's alone. A body's
//! first [`FREE_BYTES_PER_REQUEST`] are not counted: small requests (calls, kills, queries)
//! always get through, and the budget decides only among large uploads. A body whose length is
//! declared is charged in full before it is read.
//!
//! Who pays is known from the request's credentials before its body is read. A request whose
//! credentials fail pays nothing: past its free bytes it is refused with the authentication
//! error, so a stranger cannot make the node read a large body at all.
//!
//! Answers are bodies in flight too: a call may answer with up to `max_response_bytes`, and a
//! client that does not read leaves the answer in the node's memory. So a tenant's answers'
//! bytes past their free share are counted against its share as well (not the node's budget,
//! which they would fill for all), from when they are produced until the connection has
//! written them out. An answer that exists is never refused; instead, while a tenant's share
//! is full, its new requests are refused as they come in ([`BodyBudget::meter`]), so a tenant
//! whose clients do not read what they asked for holds at most its share, plus the answers of
//! the requests it had in flight.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use axum::body::Bytes;
use futures_util::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use tonic::server::NamedService;

use super::auth::{Authenticated, Caller, Principal};
use super::{ApiState, Error, ErrorKind};
use crate::limits::LimitsTable;

/// Bytes of each body that the budget does not count.
pub const FREE_BYTES_PER_REQUEST: u64 = 64 << 10;

/// Tenants' shares kept before those holding nothing are dropped (they come back on use).
const SHARES_KEPT: usize = 1024;

/// Bytes counted against a limit.
#[derive(Debug, Default)]
struct Held(AtomicU64);

impl Held {
    /// Counts `bytes` more, if that stays within `limit`.
    fn take(&self, bytes: u64, limit: u64) -> bool {
        let held = self.0.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if held > limit {
            self.0.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Counts `bytes` more, whatever the limit.
    fn add(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }

    fn give(&self, bytes: u64) {
        self.0.fetch_sub(bytes, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What the node's request bodies hold, against its limit, and each tenant's share.
#[derive(Debug)]
pub struct BodyBudget {
    held: Held,
    limit: u64,
    limits: Arc<LimitsTable>,
    /// Why a std lock: a map lookup per large body, never held across an `.await`.
    shares: Mutex<HashMap<String, Arc<Held>>>,
    /// Counts the requests refused for want of room (`solo_shed_total{scope="body_bytes"}`).
    refusals: prometheus::IntCounter,
}

/// Who a request's body is charged to, as its credentials say.
#[derive(Debug)]
pub enum Payer {
    /// The node's budget only: the admin's requests.
    Node,
    Tenant(String),
    /// Credentials that fail: the body is refused, with this error, past its free bytes.
    Stranger(Error),
}

impl Payer {
    /// The payer of a request from `caller`, as its credentials made it out.
    pub fn of(caller: &Result<Caller, Error>) -> Payer {
        match caller {
            Ok(Caller {
                principal: Principal::Admin,
                ..
            }) => Payer::Node,
            Ok(Caller {
                principal: Principal::Tenant(tenant),
                ..
            }) => Payer::Tenant(tenant.clone()),
            Err(e) => Payer::Stranger(e.clone()),
        }
    }
}

/// Why a body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    NodeFull,
    ShareFull,
    Stranger,
}

impl BodyBudget {
    pub fn new(limit: u64, limits: Arc<LimitsTable>, refusals: prometheus::IntCounter) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            held: Held::default(),
            limit,
            limits,
            shares: Mutex::new(HashMap::new()),
            refusals,
        })
    }

    /// Counted bytes held now, by all payers.
    pub fn held(&self) -> u64 {
        self.held.get()
    }

    /// Counted bytes held now by `tenant`'s requests and answers.
    #[cfg(test)]
    fn held_by(&self, tenant: &str) -> u64 {
        let shares = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        shares.get(tenant).map_or(0, |share| share.get())
    }

    fn share_of(&self, tenant: &str) -> Arc<Held> {
        let mut shares = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(share) = shares.get(tenant) {
            return Arc::clone(share);
        }
        if shares.len() >= SHARES_KEPT {
            // Only the map holds them, so they hold no bytes.
            shares.retain(|_, share| Arc::strong_count(share) > 1);
        }
        Arc::clone(shares.entry(tenant.to_string()).or_default())
    }

    /// Wraps a request's body so that what it receives is charged to this budget, and to the
    /// payer's share, for as long as the returned [`Charge`] lives. A declared length is charged
    /// at once; if it cannot be, the charge is already refused.
    pub fn meter<B: Body>(self: &Arc<Self>, payer: Payer, body: B) -> (Metered<B>, Arc<Charge>) {
        let share = match payer {
            Payer::Node => Share::None,
            Payer::Tenant(tenant) => Share::Tenant {
                held: self.share_of(&tenant),
                limit: self.limits.for_tenant(&tenant).max_in_flight_body_bytes,
                tenant,
            },
            Payer::Stranger(error) => Share::Refused(error),
        };
        let charge = Arc::new(Charge {
            budget: Arc::clone(self),
            share,
            received: AtomicU64::new(0),
            refused: OnceLock::new(),
        });
        // A tenant whose share is full has asked for answers its clients have not read yet (or
        // is sending large bodies): its new requests wait until they are.
        if let Share::Tenant { held, limit, .. } = &charge.share
            && held.get() >= *limit
        {
            charge.refuse(Refusal::ShareFull);
        }
        let declared = body.size_hint().exact();
        let prepaid = !charge.was_refused() && declared.is_some_and(|length| charge.add(length));
        let metered = Metered {
            body,
            charge: Arc::clone(&charge),
            prepaid,
        };
        (metered, charge)
    }
}

/// What a charge counts against besides the node's budget.
#[derive(Debug)]
enum Share {
    None,
    Tenant {
        tenant: String,
        held: Arc<Held>,
        limit: u64,
    },
    /// Nothing may be counted: the credentials failed with this error.
    Refused(Error),
}

/// One request's share of the budget, given back when the last of its holders (the body, the
/// request's handling) lets go of it.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<BodyBudget>,
    share: Share,
    /// Bytes received (or declared), counted and free together.
    received: AtomicU64,
    /// Set at the first refusal; the body ends there.
    refused: OnceLock<Refusal>,
}

impl Charge {
    /// Counts `bytes` more of the body; false, and nothing counted, if there is no room.
    fn add(&self, bytes: u64) -> bool {
        let before = self.received.fetch_add(bytes, Ordering::Relaxed);
        let counted = counted(before + bytes) - counted(before);
        if counted == 0 {
            return true;
        }
        let refusal = match &self.share {
            Share::Refused(_) => Some(Refusal::Stranger),
            Share::Tenant { held, limit, .. } if !held.take(counted, *limit) => Some(Refusal::ShareFull),
            _ if !self.budget.held.take(counted, self.budget.limit) => {
                if let Share::Tenant { held, .. } = &self.share {
                    held.give(counted);
                }
                Some(Refusal::NodeFull)
            }
            _ => None,
        };
        let Some(refusal) = refusal else { return true };
        self.received.fetch_sub(bytes, Ordering::Relaxed);
        self.refuse(refusal);
        false
    }

    /// Refuses the body, once; a want of room is counted as shedding.
    fn refuse(&self, refusal: Refusal) {
        if self.refused.set(refusal).is_ok() && refusal != Refusal::Stranger {
            self.budget.refusals.inc();
        }
    }

    /// Wraps the request's answer so that its bytes past the free share are counted against
    /// the tenant's share, until the connection has written them. Only the share: an answer
    /// cannot be refused, and the node's budget must not be filled by one tenant's answers
    /// and so refuse the others' uploads.
    pub fn meter_answer<B>(&self, body: B) -> MeteredAnswer<B> {
        let share = match &self.share {
            Share::Tenant { held, .. } => Some(Arc::clone(held)),
            Share::None | Share::Refused(_) => None,
        };
        MeteredAnswer {
            body,
            share,
            produced: 0,
        }
    }

    /// Whether the body was refused.
    pub fn was_refused(&self) -> bool {
        self.refused.get().is_some()
    }

    /// The refusal, for either API: overloaded with a retry hint, or, for credentials that
    /// failed, their error.
    pub fn refusal(&self) -> Error {
        let message = match (self.refused.get(), &self.share) {
            (_, Share::Refused(error)) => return error.clone(),
            (Some(Refusal::ShareFull), Share::Tenant { tenant, limit, .. }) => format!(
                "tenant '{tenant}' holds as many request and answer bytes in flight as it may ({}, \
                 [limits] max_in_flight_body_bytes): read the answers already asked for, or let its \
                 uploads end, then retry",
                crate::limits::in_mib(*limit)
            ),
            _ => format!(
                "the node holds as many request bytes in flight as it may ({}, [solo] \
                 max_in_flight_body_bytes); retry later",
                crate::limits::in_mib(self.budget.limit)
            ),
        };
        Error::new(ErrorKind::Overloaded, message).with_retry_after(crate::shed::RETRY_AFTER)
    }
}

fn counted(received: u64) -> u64 {
    received.saturating_sub(FREE_BYTES_PER_REQUEST)
}

impl Drop for Charge {
    fn drop(&mut self) {
        let counted = counted(*self.received.get_mut());
        self.budget.held.give(counted);
        if let Share::Tenant { held, .. } = &self.share {
            held.give(counted);
        }
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

/// An answer whose bytes are counted from when they are produced until every handle to them
/// is dropped: the connection drops them once they are written out.
#[derive(Debug)]
pub struct MeteredAnswer<B> {
    body: B,
    /// The tenant's share; the admin's answers are not counted.
    share: Option<Arc<Held>>,
    /// Bytes produced so far, counted and free together.
    produced: u64,
}

impl<B> Body for MeteredAnswer<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let frame = match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let Some(share) = self.share.clone() else {
            return Poll::Ready(Some(Ok(frame)));
        };
        let frame = frame.map_data(|data| {
            let before = self.produced;
            self.produced += data.len() as u64;
            let counted = counted(self.produced) - counted(before);
            if counted == 0 {
                return data;
            }
            share.add(counted);
            Bytes::from_owner(HeldBytes { data, share, counted })
        });
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Bytes of an answer that count against the tenant's share until dropped.
struct HeldBytes {
    data: Bytes,
    share: Arc<Held>,
    counted: u64,
}

impl AsRef<[u8]> for HeldBytes {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for HeldBytes {
    fn drop(&mut self) {
        self.share.give(self.counted);
    }
}

/// Meters the request bodies of a gRPC service, and their answers: a request's charge lasts
/// until its answer is ready (for a unary call: decoded, handled and encoded), the answer's
/// until it is written out. A request whose credentials fail is answered with that at once,
/// before any of its message is read: a stranger learns nothing of the node's limits or its
/// parser (a message over the limit, or not protobuf, is refused as unauthenticated), as over
/// REST.
#[derive(Debug, Clone)]
pub struct MeterBodies<S> {
    inner: S,
    state: Arc<ApiState>,
}

impl<S> MeterBodies<S> {
    pub fn new(inner: S, state: Arc<ApiState>) -> MeterBodies<S> {
        MeterBodies { inner, state }
    }
}

impl<S: NamedService> NamedService for MeterBodies<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for MeterBodies<S>
where
    S: tower::Service<http::Request<Metered<B>>, Response = http::Response<tonic::body::Body>> + NamedService,
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
        let certificate_tenant = || {
            use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
            let certificates = parts.extensions.get::<TlsConnectInfo<TcpConnectInfo>>()?.peer_certs()?;
            crate::tls::certificate_tenant(certificates.first()?.as_ref())
        };
        let caller = self
            .state
            .auth
            .authenticate_headers(&parts.headers, certificate_tenant().as_deref());
        if let Err(refusal) = &caller {
            let status = refusal.to_status();
            super::grpc::count_refused_unread(&self.state, S::NAME, parts.uri.path(), status.code());
            let answer = status.into_http();
            return Box::pin(async move { Ok(answer) });
        }
        let (metered, charge) = self.state.bodies.meter(Payer::of(&caller), body);
        let mut parts = parts;
        parts.extensions.insert(Authenticated(caller));
        let answer = self.inner.call(http::Request::from_parts(parts, metered));
        Box::pin(async move {
            let answer = answer.await?;
            Ok(answer.map(|body| tonic::body::Body::new(charge.meter_answer(body))))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, Full, StreamBody};

    /// A budget of `limit` bytes, in which each tenant may hold `share`; tenant "small" may
    /// hold 20 KiB.
    fn budget(limit: u64, share: u64) -> Arc<BodyBudget> {
        let node = crate::limits::TenantLimits {
            max_in_flight_body_bytes: share,
            ..Default::default()
        };
        let small = crate::limits::TenantLimits {
            max_in_flight_body_bytes: 20 << 10,
            ..node.clone()
        };
        let limits = LimitsTable {
            node,
            tenants: HashMap::from([("small".to_string(), small)]),
            node_services: None,
        };
        BodyBudget::new(
            limit,
            Arc::new(limits),
            prometheus::IntCounter::new("refused", "refused").unwrap(),
        )
    }

    fn tenant(name: &str) -> Payer {
        Payer::Tenant(name.into())
    }

    /// The status a metered body ended with.
    async fn refusal_of<B: Body>(body: B) -> tonic::Status
    where
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let error: Box<dyn std::error::Error + Send + Sync> = body.collect().await.map(|_| ()).unwrap_err().into();
        *error.downcast::<tonic::Status>().expect("a status")
    }

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
        let budget = budget(1 << 20, 1 << 20);
        let free = FREE_BYTES_PER_REQUEST as usize;
        let (body, charge) = budget.meter(tenant("acme"), chunks(&[free, 1000, 24]));
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(collected.len(), free + 1024);
        assert_eq!(budget.held(), 1024, "the free share is not counted");
        assert_eq!(budget.held_by("acme"), 1024);
        // The body is read, and the request's handling still holds its bytes until it ends.
        drop(charge);
        assert_eq!((budget.held(), budget.held_by("acme")), (0, 0));
    }

    #[tokio::test]
    async fn a_body_past_the_budget_is_refused_and_counts_nothing() {
        let budget = budget(100 << 10, 1 << 20);
        let free = FREE_BYTES_PER_REQUEST as usize;
        // A declared length is charged before a byte is read.
        let (first, first_charge) = budget.meter(Payer::Node, Full::new(Bytes::from(vec![0u8; free + (80 << 10)])));
        assert!(!first_charge.was_refused());
        assert_eq!(budget.held(), 80 << 10);
        // One streamed in is charged as it comes, and refused at the frame that does not fit.
        let (second, second_charge) = budget.meter(tenant("acme"), chunks(&[free, 10 << 10, 30 << 10]));
        let status = refusal_of(second).await;
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("max_in_flight_body_bytes"), "{status:?}");
        assert!(second_charge.was_refused());
        assert_eq!(budget.refusals.get(), 1, "counted as shedding");
        assert_eq!(budget.held(), 90 << 10, "the refused frame is not counted");
        assert_eq!(budget.held_by("acme"), 10 << 10, "nor in the tenant's share");
        drop(second_charge);
        assert_eq!(budget.held(), 80 << 10);
        // Small bodies get through whatever the budget holds.
        let (small, small_charge) = budget.meter(tenant("acme"), Full::new(Bytes::from_static(b"ping")));
        assert_eq!(small.collect().await.unwrap().to_bytes(), "ping");
        assert!(!small_charge.was_refused());
        drop((first, first_charge, small_charge));
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_tenant_holds_at_most_its_share_and_a_stranger_nothing() {
        let budget = budget(1 << 20, 1 << 20);
        let free = FREE_BYTES_PER_REQUEST as usize;
        let (_held, held_charge) = budget.meter(tenant("small"), Full::new(Bytes::from(vec![0u8; free + (15 << 10)])));
        assert!(!held_charge.was_refused());
        // Past its 20 KiB share, with room in the node's budget.
        let (over, over_charge) = budget.meter(tenant("small"), chunks(&[free, 4 << 10, 4 << 10]));
        let status = refusal_of(over).await;
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("tenant 'small'")
                && status.message().contains("[limits] max_in_flight_body_bytes"),
            "{status:?}"
        );
        assert!(over_charge.was_refused());
        assert_eq!((budget.held(), budget.held_by("small")), (19 << 10, 19 << 10));
        // Another tenant's bodies count against its own share.
        let (other, other_charge) = budget.meter(tenant("acme"), chunks(&[free, 100 << 10]));
        assert_eq!(other.collect().await.unwrap().to_bytes().len(), free + (100 << 10));
        assert_eq!(budget.held_by("acme"), 100 << 10);
        drop((over_charge, other_charge));
        assert_eq!(budget.held(), 15 << 10);
        // Failed credentials: the free bytes are read, not a byte more, and the refusal is theirs.
        let stranger = || Payer::Stranger(Error::unauthenticated("invalid token"));
        let (declared, declared_charge) = budget.meter(stranger(), Full::new(Bytes::from(vec![0u8; free + 1])));
        assert!(declared_charge.was_refused());
        assert_eq!(declared_charge.refusal().kind, ErrorKind::Unauthenticated);
        drop((declared, declared_charge));
        let (streamed, streamed_charge) = budget.meter(stranger(), chunks(&[free, 1]));
        let status = refusal_of(streamed).await;
        assert_eq!(
            (status.code(), status.message()),
            (tonic::Code::Unauthenticated, "invalid token")
        );
        drop(streamed_charge);
        assert_eq!(budget.held(), 15 << 10);
    }

    #[tokio::test]
    async fn answers_count_until_written_and_a_full_share_refuses_new_requests() {
        let budget = budget(1 << 20, 1 << 20);
        let free = FREE_BYTES_PER_REQUEST as usize;
        let (_, charge) = budget.meter(tenant("small"), Full::new(Bytes::from_static(b"call")));
        let mut answer = charge.meter_answer(chunks(&[free, 30 << 10]));
        drop(charge);
        let mut held = Vec::new();
        while let Some(frame) = answer.frame().await {
            held.push(frame.unwrap().into_data().unwrap());
        }
        assert_eq!(held.iter().map(Bytes::len).sum::<usize>(), free + (30 << 10));
        // Produced, not yet written: counted past the free share, against the tenant's 20 KiB
        // (and not against the node's budget).
        assert_eq!((budget.held(), budget.held_by("small")), (0, 30 << 10));
        let next = |payer: Payer| budget.meter(payer, Full::new(Bytes::from_static(b"call"))).1;
        let refused = next(tenant("small")).refusal();
        assert_eq!(refused.kind, ErrorKind::Overloaded);
        assert!(
            refused.to_string().contains("read the answers already asked for"),
            "{refused}"
        );
        assert!(!next(tenant("acme")).was_refused() && !next(Payer::Node).was_refused());
        // Written out: the connection drops the bytes, and the share is free again.
        let tail = held.pop().unwrap();
        let copy = tail.slice(10..);
        drop((held, tail));
        assert_eq!(budget.held_by("small"), 30 << 10, "a slice still holds them");
        drop(copy);
        assert_eq!((budget.held(), budget.held_by("small")), (0, 0));
        assert!(!next(tenant("small")).was_refused());
    }
}
