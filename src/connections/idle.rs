//! When a connection is idle, and closing it then: each request counts as open from its call
//! until its answer's body ends or is dropped ([`TrackRequests`], on the connection's
//! [`Activity`]). The HTTP listener waits on the activity and shuts an idle connection down
//! itself; on the gRPC listener, which offers no handle on one connection, the connection's
//! stream ends itself ([`IdleClose`]), found by its requests through [`Activities`].
//!
//! Answers that are streams (a Watch, an event stream) are counted apart: the node tells them
//! to end as it stops, and a connection with nothing else open, to which nothing has been
//! written for [`STREAMS_QUIET`](super::STREAMS_QUIET) since, is closed. A client that stops
//! reading would otherwise hold the node for its whole grace (HTTP/2 flow control keeps its
//! stream's end from reaching it), and so would a health Watch, which never ends at all; one
//! still taking the end it is sent keeps its connection until it has it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::TcpConnectInfo;

/// How long a connection found idle on the gRPC listener settles before it closes. It is still
/// read meanwhile: a request that comes (or was read just before, and is not yet handed to the
/// task that counts it as open) is counted, and keeps the connection. hyper reads all it can
/// before it hands requests on, so only the end of a settling that read nothing is sure to
/// have missed none; one that read something (a request, or only a ping) settles again.
const IDLE_SETTLE: Duration = Duration::from_millis(100);

/// Settlings a connection that keeps sending something other than requests (pings) gets before
/// it is closed anyway: pings alone must not hold a slot.
const IDLE_SETTLINGS: u8 = 3;

/// What a connection's requests are doing: how many are open, and since when none has been.
/// The connection waits on it to go idle; [`TrackRequests`] counts the requests.
#[derive(Debug)]
pub struct Activity {
    /// Requests open: from their call until their answer's body has ended or is dropped.
    open: AtomicUsize,
    /// Of those, the ones whose answers are streams.
    streams: AtomicUsize,
    /// The base of `last_ended_us`: when the connection was admitted.
    opened: Instant,
    /// When the last request ended (or the connection was admitted), in µs since `opened`.
    last_ended_us: AtomicU64,
    /// When the client last took bytes written to it, in µs since `opened`.
    last_wrote_us: AtomicU64,
    /// The one task that waits for the connection to go idle (the connection's), woken when its
    /// last open request ends, or its last one that is not a stream.
    waiter: AtomicWaker,
    /// When it was told to give its slot up ([`Activity::evict`]), in µs since `opened`, plus
    /// one; 0 until then. It then closes as soon as no request is open that holds it.
    evicted_us: AtomicU64,
    /// Of the requests open, those that do not hold the connection when a full listener needs
    /// its slot ([`TrackRequestsLayer::yielding_to`]).
    yielding: AtomicUsize,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            open: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
            opened: Instant::now(),
            last_ended_us: AtomicU64::new(0),
            last_wrote_us: AtomicU64::new(0),
            waiter: AtomicWaker::new(),
            evicted_us: AtomicU64::new(0),
            yielding: AtomicUsize::new(0),
        })
    }

    /// Asks the connection to close as an idle one does, at once if it has no request open,
    /// else once it has none: its listener is full, and others wait for its slot.
    pub(super) fn evict(&self) {
        self.evicted_us.store(self.now_us() + 1, Ordering::SeqCst);
        self.waiter.wake();
    }

    pub(super) fn is_evicted(&self) -> bool {
        self.evicted_us.load(Ordering::SeqCst) > 0
    }

    /// Whether it was told to give its slot up within `within`, and has no request open that
    /// holds it: it is on its way out.
    pub(super) fn leaving(&self, within: Duration) -> bool {
        let evicted = self.evicted_us.load(Ordering::SeqCst);
        evicted > 0
            && self.holding_since().is_some()
            && self.now_us().saturating_sub(evicted - 1) < u64::try_from(within.as_micros()).unwrap_or(u64::MAX)
    }

    /// Since when no request has been open that holds the connection against a full listener's
    /// need of its slot; `None` while one is.
    pub(super) fn holding_since(&self) -> Option<Instant> {
        let yielding = self.yielding.load(Ordering::SeqCst);
        if self.open.load(Ordering::SeqCst) > yielding {
            return None;
        }
        Some(self.opened + Duration::from_micros(self.last_ended_us.load(Ordering::SeqCst)))
    }

    /// Whether no request has been open for `after`; once evicted, whether none is open that
    /// holds it.
    fn idle_for(&self, after: Duration) -> bool {
        if self.is_evicted() {
            return self.holding_since().is_some();
        }
        self.idle_since().is_some_and(|since| since.elapsed() >= after)
    }

    /// Counts a request as open until the guard is dropped.
    fn start(self: &Arc<Self>, yields: bool) -> OpenRequest {
        // Before the count: an eviction that looks meanwhile never sees it as holding.
        if yields {
            self.yielding.fetch_add(1, Ordering::SeqCst);
        }
        self.open.fetch_add(1, Ordering::SeqCst);
        OpenRequest {
            activity: Arc::clone(self),
            stream: false,
            yields,
        }
    }

    /// Microseconds since the connection was admitted.
    fn now_us(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// The client took bytes written to it.
    pub(super) fn wrote(&self) {
        self.last_wrote_us.store(self.now_us(), Ordering::Relaxed);
    }

    fn end(&self, stream: bool, yields: bool) {
        let now = self.now_us();
        // Before the count drops: a waiter that sees none open sees when the last one ended.
        self.last_ended_us.fetch_max(now, Ordering::SeqCst);
        // Streams first: meanwhile the request still counts, as a call, never as nothing.
        if stream {
            self.streams.fetch_sub(1, Ordering::SeqCst);
        }
        let open = self.open.fetch_sub(1, Ordering::SeqCst) - 1;
        if yields {
            self.yielding.fetch_sub(1, Ordering::SeqCst);
        }
        if open == 0 || open == self.streams.load(Ordering::SeqCst) {
            self.waiter.wake();
        }
    }

    /// Requests open whose answers are not streams. Read in this order, a stream that ends
    /// meanwhile counts as a call, never the other way round.
    fn calls_open(&self) -> usize {
        let open = self.open.load(Ordering::SeqCst);
        open.saturating_sub(self.streams.load(Ordering::SeqCst))
    }

    /// Resolves once no request is open but streams, and nothing has been written to the
    /// connection for `quiet` since `drained` (when the streams were told to end) or since: all
    /// the connection still owes is a stream's end its client does not take, or a stream that
    /// never ends. With nothing open at all, the quiet counts from the last request's end too: a
    /// call's answer that a shutdown cut off is counted as ended a moment before its last bytes
    /// are written, which closing then would lose; and a connection whose client answers
    /// nothing (not the GOAWAY's ping either) would otherwise hold the node to the end of its
    /// grace. One task at a time may wait (the connection's own).
    pub async fn streams_done(&self, drained: Instant, quiet: Duration) {
        let mut timer = Box::pin(tokio::time::sleep_until(drained + quiet));
        std::future::poll_fn(|cx| self.poll_streams_done(drained, quiet, &mut timer, cx)).await;
    }

    fn poll_streams_done(
        &self,
        drained: Instant,
        quiet: Duration,
        timer: &mut Pin<Box<Sleep>>,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        // Registered before looking, so that a call ending meanwhile still wakes the task.
        self.waiter.register(cx.waker());
        if self.calls_open() > 0 {
            return Poll::Pending;
        }
        // A write (or a request's end) since the timer was set moves the deadline on: once it
        // fires, look again.
        let deadline = || {
            let at = |us: &AtomicU64| self.opened + Duration::from_micros(us.load(Ordering::SeqCst));
            drained.max(at(&self.last_wrote_us)).max(at(&self.last_ended_us)) + quiet
        };
        loop {
            let due = deadline();
            if timer.deadline() != due {
                timer.as_mut().reset(due);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if deadline() == due {
                return Poll::Ready(());
            }
        }
    }

    /// Since when the connection has had no request open; `None` while one is.
    pub(super) fn idle_since(&self) -> Option<Instant> {
        if self.open.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(self.opened + Duration::from_micros(self.last_ended_us.load(Ordering::SeqCst)))
    }

    /// Resolves once the connection has had no request open for `after`. One task at a time
    /// may wait (the connection's own).
    pub async fn idle(&self, after: Duration) {
        let mut timer = Box::pin(tokio::time::sleep(after));
        std::future::poll_fn(|cx| self.poll_idle(after, &mut timer, cx)).await;
    }

    fn poll_idle(&self, after: Duration, timer: &mut Pin<Box<Sleep>>, cx: &mut Context<'_>) -> Poll<()> {
        // Registered before looking, so that a request ending meanwhile still wakes the task.
        self.waiter.register(cx.waker());
        if self.is_evicted() && self.holding_since().is_some() {
            return Poll::Ready(());
        }
        let Some(since) = self.idle_since() else {
            return Poll::Pending;
        };
        let deadline = since + after;
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx)
    }
}

/// A request open on its connection, until dropped.
#[derive(Debug)]
struct OpenRequest {
    activity: Arc<Activity>,
    stream: bool,
    /// Whether it does not hold the connection against a full listener.
    yields: bool,
}

impl OpenRequest {
    /// Counts the request's answer as a stream from now on.
    fn answers_a_stream(&mut self) {
        if !self.stream {
            self.stream = true;
            self.activity.streams.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.activity.end(self.stream, self.yields);
    }
}

/// Closes an admitted connection at its stream once it has had no request open for a while,
/// and as the node stops, once its streams have had their time to end and nothing else is open.
#[derive(Debug)]
pub(super) struct IdleClose {
    activity: Arc<Activity>,
    /// `None`: never closed for being idle.
    after: Option<Duration>,
    /// Runs out when the connection has been idle for `after` (unused without it).
    timer: Pin<Box<Sleep>>,
    closing: Closing,
    /// Resolves as the listener drains: the node is stopping, and has told streams to end.
    drained: Pin<Box<WaitForCancellationFutureOwned>>,
    /// When it drained.
    drained_at: Option<Instant>,
    /// Runs out when only streams are open, and nothing was written for long enough.
    streams_quiet: Pin<Box<Sleep>>,
    /// Keeps the connection's activity findable by its requests while it is open.
    _registered: Option<Registered>,
}

#[derive(Debug)]
enum Closing {
    No,
    /// Found idle: when this ends, the connection closes unless a request came meanwhile.
    Settling {
        until: Pin<Box<Sleep>>,
        /// Settlings so far, this one included.
        round: u8,
        /// Whether anything was read during this one.
        read: bool,
    },
    Closed,
}

impl IdleClose {
    /// Tracks the connection of `activity`, whose tonic connect info is `connect_info`, found by
    /// its requests through `activities`, to close it once it has been idle for `after`, or
    /// once `drained` is cancelled and only streams whose end is not taken are left.
    pub(super) fn new(
        activities: &Activities,
        activity: Arc<Activity>,
        connect_info: &TcpConnectInfo,
        after: Option<Duration>,
        drained: &CancellationToken,
    ) -> IdleClose {
        IdleClose {
            _registered: activities.register(connect_info, &activity),
            activity,
            after,
            timer: Box::pin(tokio::time::sleep(after.unwrap_or_default())),
            closing: Closing::No,
            drained: Box::pin(drained.clone().cancelled_owned()),
            drained_at: None,
            streams_quiet: Box::pin(tokio::time::sleep(super::STREAMS_QUIET)),
        }
    }

    /// Whether the node is stopping and only streams whose end is not taken are left (see
    /// [`Activity::streams_done`]); makes sure the task is woken when that may change.
    fn only_untaken_streams(&mut self, cx: &mut Context<'_>) -> bool {
        let drained = match self.drained_at {
            Some(at) => at,
            None => {
                if self.drained.as_mut().poll(cx).is_pending() {
                    return false;
                }
                *self.drained_at.insert(Instant::now())
            }
        };
        self.activity
            .poll_streams_done(drained, super::STREAMS_QUIET, &mut self.streams_quiet, cx)
            .is_ready()
    }

    pub(super) fn is_closed(&self) -> bool {
        matches!(self.closing, Closing::Closed)
    }

    /// A read returned bytes: a settling under way must settle again.
    pub(super) fn read_something(&mut self) {
        if let Closing::Settling { read, .. } = &mut self.closing {
            *read = true;
        }
    }

    /// After a read that found nothing: whether the connection is to close now. Starts settling
    /// once it has been idle for long enough, and makes sure the task is woken when the idle
    /// time or the settling is over.
    pub(super) fn nothing_to_read(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            match &mut self.closing {
                Closing::Closed => return true,
                Closing::No => {
                    if self.only_untaken_streams(cx) {
                        tracing::debug!("closing a gRPC connection with only streams open: the node is stopping");
                        self.closing = Closing::Closed;
                        continue;
                    }
                    let after = match self.after {
                        Some(after) => after,
                        // Never closed for being idle, unless evicted: then at once. Registered
                        // before looking, so that an eviction meanwhile still wakes the task.
                        None => {
                            self.activity.waiter.register(cx.waker());
                            if !self.activity.is_evicted() {
                                return false;
                            }
                            Duration::ZERO
                        }
                    };
                    if self.activity.poll_idle(after, &mut self.timer, cx).is_pending() {
                        return false;
                    }
                    self.closing = Closing::Settling {
                        until: Box::pin(tokio::time::sleep(IDLE_SETTLE)),
                        round: 1,
                        read: false,
                    };
                }
                Closing::Settling { until, round, read } => {
                    if until.as_mut().poll(cx).is_pending() {
                        return false;
                    }
                    let still_idle = self.activity.idle_for(self.after.unwrap_or(Duration::MAX));
                    self.closing = if !still_idle {
                        Closing::No
                    } else if *read && *round < IDLE_SETTLINGS {
                        Closing::Settling {
                            until: Box::pin(tokio::time::sleep(IDLE_SETTLE)),
                            round: *round + 1,
                            read: false,
                        }
                    } else {
                        tracing::debug!(
                            idle_ms = self.after.unwrap_or_default().as_millis() as u64,
                            "closing an idle gRPC connection"
                        );
                        Closing::Closed
                    };
                }
            }
        }
    }
}

/// The activity of a listener's open connections, found by their addresses: tonic's
/// [`TcpConnectInfo`] in a request is all that names its connection there.
#[derive(Debug, Clone, Default)]
pub struct Activities(Arc<Mutex<ByAddresses>>);

/// Connections' activity by their local and remote addresses.
type ByAddresses = HashMap<(SocketAddr, SocketAddr), Arc<Activity>>;

/// A connection's entry in [`Activities`], removed when dropped.
#[derive(Debug)]
struct Registered {
    activities: Activities,
    key: (SocketAddr, SocketAddr),
    activity: Arc<Activity>,
}

impl Activities {
    /// `None` for a connection whose addresses the kernel could not tell (one already gone):
    /// its requests are not counted, and it closes when idle from its admission.
    fn register(&self, info: &TcpConnectInfo, activity: &Arc<Activity>) -> Option<Registered> {
        let key = Self::key(info)?;
        self.lock().insert(key, Arc::clone(activity));
        Some(Registered {
            activities: self.clone(),
            key,
            activity: Arc::clone(activity),
        })
    }

    fn find(&self, info: &TcpConnectInfo) -> Option<Arc<Activity>> {
        self.lock().get(&Self::key(info)?).cloned()
    }

    fn key(info: &TcpConnectInfo) -> Option<(SocketAddr, SocketAddr)> {
        Some((info.local_addr()?, info.remote_addr()?))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ByAddresses> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut activities = self.activities.lock();
        // A new connection with the same addresses may have come in as this one closed.
        if activities
            .get(&self.key)
            .is_some_and(|a| Arc::ptr_eq(a, &self.activity))
        {
            activities.remove(&self.key);
        }
    }
}

/// Where [`TrackRequests`] finds the activity of a request's connection.
#[derive(Debug, Clone)]
enum Find {
    /// The service serves one connection (the HTTP listener makes one per connection).
    Connection(Arc<Activity>),
    /// By the addresses tonic puts in the request.
    ByAddress(Activities),
}

/// A layer counting each request as open on its connection (see [`TrackRequests`]): tonic's
/// server takes one layer for all its connections, which finds each request's by its addresses.
#[derive(Debug, Clone)]
pub struct TrackRequestsLayer {
    activities: Activities,
    stream_paths: &'static [&'static str],
    yielding: &'static [&'static str],
}

impl TrackRequestsLayer {
    /// `stream_paths`: the paths of the methods whose answers are streams.
    pub fn by_address(activities: Activities, stream_paths: &'static [&'static str]) -> TrackRequestsLayer {
        TrackRequestsLayer {
            activities,
            stream_paths,
            yielding: &[],
        }
    }

    /// Requests whose paths start with one of `prefixes` keep their connection open as any
    /// request does, but not when a full listener needs its slot: requests anyone may make
    /// with no credentials (a health Watch, a health Check whose body never ends), which would
    /// otherwise let a few addresses hold every slot for good.
    pub fn yielding_to(mut self, prefixes: &'static [&'static str]) -> TrackRequestsLayer {
        self.yielding = prefixes;
        self
    }
}

impl<S> tower::Layer<S> for TrackRequestsLayer {
    type Service = TrackRequests<S>;

    fn layer(&self, inner: S) -> TrackRequests<S> {
        TrackRequests {
            inner,
            find: Find::ByAddress(self.activities.clone()),
            stream_paths: self.stream_paths,
            yielding: self.yielding,
        }
    }
}

/// Counts each request as open on its connection's [`Activity`] from its call until its
/// answer's body has ended or is dropped (a client that cancels drops it): the node closes
/// only connections with none open, so a Watch, a followed log or a slow call is never cut.
/// An answer to a request for one of `stream_paths`, or of Server-Sent Events, counts as a
/// stream.
#[derive(Debug, Clone)]
pub struct TrackRequests<S> {
    inner: S,
    find: Find,
    stream_paths: &'static [&'static str],
    yielding: &'static [&'static str],
}

impl<S> TrackRequests<S> {
    /// For a service that serves the one connection `activity` is of; its streams are
    /// Server-Sent Events and the answers to `stream_paths`.
    pub fn new(inner: S, activity: Arc<Activity>, stream_paths: &'static [&'static str]) -> TrackRequests<S> {
        TrackRequests {
            inner,
            find: Find::Connection(activity),
            stream_paths,
            yielding: &[],
        }
    }
}

/// Whether an answer with these headers is a stream of Server-Sent Events.
fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

impl<S, B, R> tower::Service<http::Request<B>> for TrackRequests<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<OpenBody<R>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let activity = match &self.find {
            Find::Connection(activity) => Some(Arc::clone(activity)),
            Find::ByAddress(activities) => request
                .extensions()
                .get::<TcpConnectInfo>()
                .and_then(|info| activities.find(info)),
        };
        let path = request.uri().path();
        let yields = self.yielding.iter().any(|prefix| path.starts_with(prefix));
        let mut open = activity.map(|activity| activity.start(yields));
        let stream_path = self.stream_paths.contains(&path);
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await?;
            if let Some(open) = open.as_mut()
                && (stream_path || is_event_stream(answer.headers()))
            {
                open.answers_a_stream();
            }
            Ok(answer.map(|body| OpenBody { body, open }))
        })
    }
}

/// An answer's body, which keeps its request open on its connection until it ends or is dropped.
#[derive(Debug)]
pub struct OpenBody<B> {
    body: B,
    open: Option<OpenRequest>,
}

impl<B: Body + Unpin> Body for OpenBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        if frame.is_none() {
            self.open = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_is_idle_only_once_no_request_has_been_open_for_the_time() {
        let activity = Activity::new();
        let after = Duration::from_millis(100);
        let open = activity.start(false);
        let idle = activity.idle(after);
        tokio::pin!(idle);
        // However long a request stays open, the connection is not idle.
        assert!(tokio::time::timeout(after * 3, idle.as_mut()).await.is_err());
        drop(open);
        let ended = Instant::now();
        idle.await;
        assert!(ended.elapsed() >= after, "idle after {:?}", ended.elapsed());
        // A request that came and went meanwhile starts the time afresh.
        tokio::time::sleep(after / 2).await;
        drop(activity.start(false));
        let ended = Instant::now();
        activity.idle(after).await;
        assert!(ended.elapsed() >= after, "idle after {:?}", ended.elapsed());
    }

    #[tokio::test]
    async fn once_streams_were_told_to_end_only_calls_and_writes_hold_a_connection() {
        let quiet = Duration::from_millis(100);
        let activity = Activity::new();
        let mut stream = activity.start(false);
        stream.answers_a_stream();
        let call = activity.start(false);
        let drained = Instant::now();
        let done = activity.streams_done(drained, quiet);
        tokio::pin!(done);
        assert!(
            tokio::time::timeout(quiet * 3, done.as_mut()).await.is_err(),
            "a call is open"
        );
        drop(call);
        // The client takes what is written: the stream's end is on its way.
        for _ in 0..4 {
            activity.wrote();
            assert!(tokio::time::timeout(quiet / 2, done.as_mut()).await.is_err());
        }
        activity.wrote();
        let last_write = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), done)
            .await
            .expect("only a stream is open, and nothing is written");
        assert!(last_write.elapsed() >= quiet - Duration::from_millis(10));
        // The stream still keeps the connection from going idle.
        assert!(activity.idle_since().is_none());
        drop(stream);
        let ended = Instant::now();
        assert!(activity.idle_since().is_some());
        assert_eq!(activity.calls_open(), 0);
        // With nothing open at all, the quiet counts from the last request's end too (a call's
        // answer may be counted as ended before its last bytes are out).
        let done = activity.streams_done(drained, quiet);
        tokio::time::timeout(Duration::from_secs(5), done)
            .await
            .expect("nothing is open, and nothing is written");
        assert!(ended.elapsed() >= quiet - Duration::from_millis(10));
    }
}
