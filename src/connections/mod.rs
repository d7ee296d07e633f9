//! How many connections a listener holds open: in all, and per client address.
//!
//! Each listener (HTTP and gRPC) has its own [`ConnectionLimits`]. At the total cap it takes one
//! connection more off the kernel's listen backlog and no other, so new clients wait there
//! rather than the node running out of file descriptors for its log. Past the per-client cap,
//! a connection is refused, so that one client (20,000 connections each trickling a request)
//! cannot take every slot. A
//! client is an IPv4 address, or an IPv6 /64 network ([`client_of`]): a single host is usually
//! given a whole /64, and would otherwise have as many caps as addresses. An admitted
//! connection holds its place until it is dropped. While a listener is full and a client waits
//! (the one taken past the cap), a connection that has had no request open for a while gives
//! way to it, one at a time (the one idle longest), until a slot is free: idle connections from
//! many addresses, each within its cap, cannot keep everyone else out.
//!
//! A connection must also open, and go when told:
//! - it has [`Deadlines::opening_within`] to send its opening bytes, or it is closed: on the
//!   gRPC listener the HTTP/2 preface and SETTINGS frame ([`HTTP2_OPENING`]), on the HTTP
//!   listener its first byte (hyper bounds an HTTP/1 request's headers itself). HTTP/2 has no
//!   bound of its own there (its keep-alive pings start after the handshake), and a silent or
//!   half-open connection (a client pool's spare, dialled and never used) would otherwise hold
//!   a slot for good;
//! - once it has had no request open for a while, it is closed: an HTTP/2 connection that opened
//!   and then asks nothing (or only pings) would otherwise hold its slot for good, and a few
//!   addresses could take every slot. Each request counts as open from its call until its
//!   answer's body ends or is dropped ([`TrackRequests`], on the connection's [`Activity`]), so a
//!   quiet Watch or a slow call keeps its connection however long it is quiet. The HTTP listener
//!   shuts such a connection down itself (a GOAWAY); tonic offers no handle on one connection,
//!   so on the gRPC listener the stream closes it ([`Closer`], [`idle`]);
//! - once the listener drains, one that has sent nothing is closed at once: it asked nothing;
//!   and one whose only open requests are streams (told to end at the drain), to which nothing
//!   has been written for [`STREAMS_QUIET`], is closed: a stream's client that stops reading,
//!   or a stream that never ends, cannot hold the node. One with nothing open at all is closed
//!   likewise, once nothing was written to it for as long since its last request ended (the
//!   last answers of calls a shutdown cut off are written just after), unless it closes itself
//!   first: a client that answers nothing, not the GOAWAY's ping either, cannot hold it;
//! - once the shutdown's grace is over (and the answers of calls it cut off are out), every
//!   connection is closed, so that a client that ignores the HTTP/2 GOAWAY (or never answers
//!   its ping) cannot hold the node past it.

mod coalesce;
mod idle;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected as _, TcpConnectInfo};

pub use coalesce::CoalescedWrites;
use idle::IdleClose;
pub use idle::{Activities, Activity, TrackRequests, TrackRequestsLayer};

/// The pause after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// While a listener is full, how often it looks for an idle connection to give way, when the
/// one told last has gone.
pub const EVICTION_ROUND: Duration = Duration::from_millis(50);

/// How long a connection told to give way is waited for before another is: it closes once it
/// has settled (a request it had read meanwhile would keep it), a few hundred ms at most.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// How long, once its listener drains, a connection with nothing open but streams (a Watch, an
/// event stream) may take none of what is written to it before it is closed. Their ends are
/// written at the drain (a Watch within reach of the head is sent the rest first, for up to a
/// second), so a connection quiet this long after is held by a client that does not read, or
/// by a stream that never ends (a health Watch). A client still taking its stream's end keeps
/// the connection until it has it (or the grace is over).
pub const STREAMS_QUIET: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    slots: Arc<Semaphore>,
    per_client: usize,
    admitted: Arc<Mutex<Admitted>>,
    /// While the listener is full, how long a connection may have had no request open and
    /// keep its slot.
    full_idle: Duration,
    deadlines: Deadlines,
    activities: Activities,
}

/// The connections a listener holds.
#[derive(Debug, Default)]
struct Admitted {
    /// How many, by client.
    by_client: HashMap<IpAddr, usize>,
    /// Each one's client and activity, by its admission's number.
    connections: HashMap<u64, (IpAddr, Arc<Activity>)>,
    next_number: u64,
}

/// A connection's place under the limits, given back when it is dropped.
#[derive(Debug)]
struct Admission {
    _slot: OwnedSemaphorePermit,
    admitted: Arc<Mutex<Admitted>>,
    address: IpAddr,
    number: u64,
}

/// A connection taken off the listener.
#[derive(Debug)]
// One a connection, moved on at once: boxing the stream would cost an allocation for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Accepted {
    Admitted(AdmittedStream, SocketAddr),
    /// Its address holds as many connections as it may: answer it if the protocol allows, and
    /// close it. It holds a slot until then, if one was free, so refusals too stay within the
    /// total (past it by the one connection a full listener takes off its backlog).
    OverClientCap(TcpStream, SocketAddr, Option<OwnedSemaphorePermit>),
}

impl ConnectionLimits {
    /// `full_idle`: while all `max` slots are held, how long a connection may have had no
    /// request open and keep its slot.
    pub fn new(max: usize, per_client: usize, full_idle: Duration, deadlines: Deadlines) -> ConnectionLimits {
        ConnectionLimits {
            slots: Arc::new(Semaphore::new(max.max(1))),
            per_client: per_client.max(1),
            admitted: Arc::default(),
            full_idle,
            deadlines,
            activities: Activities::default(),
        }
    }

    fn admitted(&self) -> std::sync::MutexGuard<'_, Admitted> {
        self.admitted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a client taken off the backlog of a full listener: waits for one, telling an
    /// idle connection to give way each [`EVICTION_ROUND`] meanwhile.
    async fn slot_when_full(&self) -> OwnedSemaphorePermit {
        loop {
            if let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() {
                return slot;
            }
            self.evict_one_idle();
            tokio::select! {
                slot = Arc::clone(&self.slots).acquire_owned() => return slot.expect("the semaphore is never closed"),
                () = tokio::time::sleep(EVICTION_ROUND) => {}
            }
        }
    }

    /// Tells one connection idle for `full_idle` at least to close: the one idle longest (of
    /// two as long, that of the client holding more). Not the client holding the most first:
    /// an attacker spread over many addresses would make a busy client's pool the target,
    /// whose connections are idle only between its calls. None may be: every connection has a
    /// request open, or has had one lately. None is while one told already is on its way out.
    fn evict_one_idle(&self) {
        let admitted = self.admitted();
        if admitted
            .connections
            .values()
            .any(|(_, activity)| activity.leaving(EVICTION_WAIT))
        {
            return;
        }
        let victim = admitted
            .connections
            .values()
            .filter(|(_, activity)| !activity.is_evicted())
            .filter_map(|(client, activity)| {
                let since = activity
                    .holding_since()
                    .filter(|since| since.elapsed() >= self.full_idle)?;
                let held = admitted.by_client.get(client).copied().unwrap_or(0);
                Some(((std::cmp::Reverse(since), held), client, activity))
            })
            .max_by_key(|(rank, _, _)| *rank);
        if let Some((_, client, activity)) = victim {
            tracing::debug!(%client, "the listener is full: an idle connection gives way");
            activity.evict();
        }
    }

    /// The activity of the connections this listener closes when idle, by their addresses.
    pub fn activities(&self) -> Activities {
        self.activities.clone()
    }

    /// Connections one client address may hold open at once.
    pub fn per_client(&self) -> usize {
        self.per_client
    }

    /// The next connection, with a slot: a free one, or, with every slot held, one that an idle
    /// connection gives up for it (the connection then waits, the one past the cap, until it
    /// has). An accept that fails (out of file descriptors and the like) is logged and retried
    /// after a pause rather than spun on.
    pub async fn accept(&self, listener: &TcpListener) -> Accepted {
        let free = Arc::clone(&self.slots).try_acquire_owned().ok();
        let (stream, peer) = loop {
            match listener.accept().await {
                Ok(accepted) => break accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        };
        // Small replies must not wait on Nagle's algorithm for the peer's delayed ACK.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot turn Nagle's algorithm off");
        }
        let address = client_of(peer.ip());
        // Before any connection gives way for it. Only this task admits connections, so the
        // count cannot grow meanwhile.
        if self
            .admitted()
            .by_client
            .get(&address)
            .is_some_and(|open| *open >= self.per_client)
        {
            return Accepted::OverClientCap(stream, peer, free);
        }
        let slot = match free {
            Some(slot) => slot,
            None => self.slot_when_full().await,
        };
        let activity = Activity::new();
        let number = {
            let mut admitted = self.admitted();
            let open = admitted.by_client.entry(address).or_default();
            *open += 1;
            let number = admitted.next_number;
            admitted.next_number += 1;
            admitted.connections.insert(number, (address, Arc::clone(&activity)));
            number
        };
        let admission = Admission {
            _slot: slot,
            admitted: Arc::clone(&self.admitted),
            address,
            number,
        };
        let stream = AdmittedStream::new(stream, admission, activity, &self.deadlines, &self.activities);
        Accepted::Admitted(stream, peer)
    }
}

/// The client a connection from `address` counts against: the address itself, or for IPv6 its
/// /64 network (an IPv4 address mapped into IPv6, as a dual-stack listener sees it, stays itself).
pub fn client_of(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !(u128::from(u64::MAX)))),
        v4 => v4,
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut admitted = self.admitted.lock().unwrap_or_else(|p| p.into_inner());
        admitted.connections.remove(&self.number);
        if let std::collections::hash_map::Entry::Occupied(mut open) = admitted.by_client.entry(self.address) {
            *open.get_mut() -= 1;
            if *open.get() == 0 {
                open.remove();
            }
        }
    }
}

/// What an HTTP/2 client sends first: the preface (24 bytes) and the header of the SETTINGS
/// frame that must follow it (9). A TLS hello is longer.
pub const HTTP2_OPENING: usize = 33;

/// When an admitted connection must have opened, and when it must close.
#[derive(Debug, Clone)]
pub struct Deadlines {
    /// Bytes a connection must send, within `opening_within`, to be open.
    pub opening_bytes: usize,
    pub opening_within: Duration,
    /// Cancelled as the listener drains: connections that sent nothing yet are closed.
    pub drained: CancellationToken,
    /// Cancelled once the shutdown's grace is over and the last answers are out: every
    /// connection is closed.
    pub closed: CancellationToken,
    /// How long the client may take none of the bytes the node has for it: a connection whose
    /// writes make no progress for longer is closed, and lets go of the answers it held.
    pub write_stall: Duration,
    /// Who closes connections that are idle, or that hold only streams as the node stops.
    pub closer: Closer,
}

/// Who closes a listener's connections that are idle, or that hold only streams once it drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closer {
    /// The server, which has a handle on each connection (the HTTP listener: a GOAWAY).
    Server,
    /// The connection's stream, as tonic offers no handle on one connection: it ends once the
    /// connection has had no request open for `idle_after` (`None`: never), and once the
    /// listener drains and only streams are open, quiet for [`STREAMS_QUIET`]. Its requests
    /// must pass through [`TrackRequests`] over [`ConnectionLimits::activities`].
    Stream { idle_after: Option<Duration> },
}

/// An admitted TCP connection that holds its [`Admission`] for as long as it is open, and is
/// closed as its [`Deadlines`] say: the form a server that takes a stream of connections
/// (tonic) can use.
#[derive(Debug)]
pub struct AdmittedStream {
    stream: TcpStream,
    _admission: Admission,
    /// Until the opening bytes are in.
    opening: Option<Opening>,
    closed: CancellationToken,
    on_close: Pin<Box<WaitForCancellationFutureOwned>>,
    write_stall: Duration,
    /// Running while a write waits for the client to take bytes.
    stalled_since: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Taken once, at admission: what tonic puts in each request, and the connection's key in
    /// [`Activities`].
    connect_info: TcpConnectInfo,
    /// What its requests are doing, and when it was last written to.
    activity: Arc<Activity>,
    idle: Option<Box<IdleClose>>,
}

#[derive(Debug)]
struct Opening {
    received: usize,
    needed: usize,
    within: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    drained: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl AdmittedStream {
    fn new(
        stream: TcpStream,
        admission: Admission,
        activity: Arc<Activity>,
        deadlines: &Deadlines,
        activities: &Activities,
    ) -> AdmittedStream {
        let connect_info = stream.connect_info();
        let idle = match deadlines.closer {
            Closer::Server => None,
            Closer::Stream { idle_after } => Some(Box::new(IdleClose::new(
                activities,
                Arc::clone(&activity),
                &connect_info,
                idle_after,
                &deadlines.drained,
            ))),
        };
        AdmittedStream {
            stream,
            _admission: admission,
            opening: Some(Opening {
                received: 0,
                needed: deadlines.opening_bytes.max(1),
                within: deadlines.opening_within,
                deadline: Box::pin(tokio::time::sleep(deadlines.opening_within)),
                drained: Box::pin(deadlines.drained.clone().cancelled_owned()),
            }),
            closed: deadlines.closed.clone(),
            on_close: Box::pin(deadlines.closed.clone().cancelled_owned()),
            write_stall: deadlines.write_stall,
            stalled_since: None,
            connect_info,
            activity,
            idle,
        }
    }

    /// What the connection's requests are doing (for a server that counts them itself, with
    /// [`TrackRequests::new`]), and when it was last written to.
    pub fn activity(&self) -> Arc<Activity> {
        Arc::clone(&self.activity)
    }

    /// Passes a write's outcome on, timing how long writes wait for the client: past
    /// `write_stall` without progress, the write fails and the connection closes.
    fn timed_write(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        if written.is_ready() {
            self.stalled_since = None;
            if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
                self.activity.wrote();
            }
            return written;
        }
        let stall = self.write_stall;
        let timer = self
            .stalled_since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client took none of its answer for {stall:?}"),
            )));
        }
        Poll::Pending
    }

    /// An error once the node has closed its connections; registers the task to hear of it.
    fn check_closed(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        if self.closed.is_cancelled() || self.on_close.as_mut().poll(cx).is_ready() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the node stopped; its shutdown grace is over",
            ));
        }
        Ok(())
    }
}

impl AdmittedStream {
    /// Reads, counting the opening bytes until they are in.
    fn read_opening(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        let Some(opening) = self.opening.as_mut() else {
            return read;
        };
        match read {
            Poll::Ready(Ok(())) => {
                opening.received += buf.filled().len() - before;
                if opening.received >= opening.needed {
                    self.opening = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if opening.received == 0 && opening.drained.as_mut().poll(cx).is_ready() => {
                // The end of the stream: the server closes a connection that asked nothing.
                Poll::Ready(Ok(()))
            }
            Poll::Pending if opening.deadline.as_mut().poll(cx).is_ready() => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client did not open the connection within {:?}", opening.within),
            ))),
            other => other,
        }
    }
}

impl AsyncRead for AdmittedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        self.check_closed(cx)?;
        if self.idle.as_ref().is_some_and(|idle| idle.is_closed()) {
            return Poll::Ready(Ok(()));
        }
        let filled = buf.filled().len();
        let read = self.read_opening(cx, buf);
        let Some(idle) = self.idle.as_mut() else {
            return read;
        };
        match read {
            Poll::Pending if idle.nothing_to_read(cx) => {
                // The end of the stream: the server closes the connection.
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(())) if buf.filled().len() > filled => {
                idle.read_something();
                read
            }
            read => read,
        }
    }
}

impl AsyncWrite for AdmittedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.check_closed(cx)?;
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.timed_write(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.check_closed(cx)?;
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.timed_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for AdmittedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.connect_info.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_client_is_its_64_and_an_ipv4_one_its_address() {
        let client = |text: &str| client_of(text.parse().unwrap()).to_string();
        assert_eq!(client("192.0.2.7"), "192.0.2.7");
        // A dual-stack listener sees IPv4 clients as mapped addresses: each is still its own.
        assert_eq!(client("::ffff:192.0.2.7"), "192.0.2.7");
        assert_ne!(client("::ffff:192.0.2.7"), client("::ffff:192.0.2.8"));
        assert_eq!(client("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(client("2001:db8:1:2:bbbb::9"), client("2001:db8:1:2:aaaa::1"));
        assert_ne!(client("2001:db8:1:3::1"), client("2001:db8:1:2::1"));
        assert_eq!(client("::1"), "::");
    }
}
