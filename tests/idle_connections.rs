//! Connections that ask nothing give their slot back; connections with a request open, however
//! quiet, are never cut, until the node stops: then streams get a moment to end, and a client
//! that reads nothing more cannot hold the node. A real node on port 0, raw sockets for the clients that say nothing,
//! and real clients (tonic, reqwest over HTTP/2) for those that do.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use solo::proto::{self, watch_response::Msg};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The idle time the tests configure: several of it pass in each.
const IDLE_MS: u32 = 300;
const IDLE: Duration = Duration::from_millis(IDLE_MS as u64);

/// A guard against hangs, never a performance assertion.
const PATIENCE: Duration = Duration::from_secs(20);

/// An HTTP/2 client's hello: the preface and an empty SETTINGS frame.
const HTTP2_HELLO: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// A PING frame (stream 0, eight bytes of payload).
const HTTP2_PING: &[u8] = b"\0\0\x08\x06\0\0\0\0\0pingping";

/// A node whose connections idle for `IDLE` are closed, and whose calls may spin for seconds.
async fn node() -> (tempfile::TempDir, solo::server::Server) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = start_server(dir.path(), |c| {
        c.solo.grpc_max_connection_idle_ms = IDLE_MS;
        c.solo.http_header_timeout_ms = IDLE_MS;
        // Spins of a second and more are served.
        c.limits.default_cpu_ms_per_call = 10_000;
        c.limits.default_call_timeout_ms = 10_000;
    })
    .await;
    (dir, server)
}

fn address(url: &str) -> String {
    url.split("://").nth(1).unwrap().to_string()
}

/// Opens an HTTP/2 connection and then says nothing but, with `ping`, a PING every 100 ms;
/// returns how long the node kept it open (`None`: past `PATIENCE`).
async fn hello_then_silence(address: &str, ping: bool) -> Option<Duration> {
    let mut connection = TcpStream::connect(address).await.unwrap();
    connection.write_all(HTTP2_HELLO).await.unwrap();
    let opened = Instant::now();
    let mut every = tokio::time::interval(Duration::from_millis(100));
    let mut buf = [0u8; 1024];
    let closed = async {
        loop {
            tokio::select! {
                read = connection.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return opened.elapsed(),
                    Ok(_) => {}
                },
                _ = every.tick(), if ping => {
                    if connection.write_all(HTTP2_PING).await.is_err() {
                        return opened.elapsed();
                    }
                }
            }
        }
    };
    tokio::time::timeout(PATIENCE, closed).await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_connection_that_asks_nothing_is_closed_once_idle_even_if_it_pings() {
    let (_dir, server) = node().await;
    let grpc = address(&server.grpc_url());
    let (silent, pinging) = tokio::join!(hello_then_silence(&grpc, false), hello_then_silence(&grpc, true));
    for (what, open_for) in [("silent", silent), ("pinging", pinging)] {
        let open_for = open_for.unwrap_or_else(|| panic!("the {what} connection stays open"));
        assert!(
            open_for >= IDLE - Duration::from_millis(50),
            "{what}: closed after {open_for:?}"
        );
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_client_whose_connection_closed_idle_reconnects_for_its_next_call() {
    let (_dir, server) = node().await;
    // A channel that counts its dials.
    let dials = Arc::new(AtomicUsize::new(0));
    let connector = {
        let (dials, grpc) = (Arc::clone(&dials), address(&server.grpc_url()));
        tower::service_fn(move |_: tonic::transport::Uri| {
            dials.fetch_add(1, Ordering::SeqCst);
            let grpc = grpc.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(TcpStream::connect(grpc).await?)) }
        })
    };
    let channel = tonic::transport::Endpoint::from_shared(server.grpc_url())
        .unwrap()
        .connect_with_connector(connector)
        .await
        .unwrap();
    let mut client = proto::solo_kernel_client::SoloKernelClient::new(channel);
    let list = || as_tenant("acme", proto::ListRequest::default());
    client.list(list()).await.expect("the first call is served");
    assert_eq!(dials.load(Ordering::SeqCst), 1);
    // Calls closer together than the idle time keep the connection.
    for _ in 0..4 {
        tokio::time::sleep(IDLE / 6).await;
        client.list(list()).await.expect("a call is served");
    }
    assert_eq!(dials.load(Ordering::SeqCst), 1, "a busy connection was closed");
    // Idle for longer, the connection is closed; the next call dials again, and is served.
    tokio::time::sleep(IDLE * 3).await;
    client
        .list(list())
        .await
        .expect("the call after the idle close is served");
    assert_eq!(dials.load(Ordering::SeqCst), 2, "the idle connection was kept");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_watch_keeps_its_connection_and_sees_the_next_event() {
    let (_dir, server) = node().await;
    let mut watcher = grpc_client(&server).await;
    let watch = proto::WatchRequest {
        progress_interval_ms: 60_000,
        ..Default::default()
    };
    let mut stream = watcher.watch(as_tenant("acme", watch)).await.unwrap().into_inner();
    let first = tokio::time::timeout(PATIENCE, stream.next()).await.unwrap();
    assert!(
        matches!(
            first,
            Some(Ok(proto::WatchResponse {
                msg: Some(Msg::Progress(_))
            }))
        ),
        "{first:?}"
    );
    // Nothing at all passes on the watch's connection for several idle times.
    tokio::time::sleep(IDLE * 5).await;
    let mut other = grpc_client(&server).await;
    other
        .deploy(as_tenant("acme", grpc_deploy("echo", "echo")))
        .await
        .expect("the deploy is served");
    let event = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("an event comes")
        .expect("the watch is still open")
        .expect("the watch did not fail");
    let Some(Msg::Event(event)) = event.msg else {
        panic!("not an event: {event:?}");
    };
    assert_eq!((event.tenant.as_str(), event.service_id.as_str()), ("acme", "echo"));
    server.stop().await.unwrap();
}

/// A node whose listeners hold `max` connections each, whose connections with no request open
/// give way after 200 ms to a client waiting for a full listener's slot, and are otherwise
/// kept for a minute; as `tweak` configures it besides.
async fn node_of_few_slots(
    max: u32,
    tweak: impl FnOnce(&mut solo::config::Config),
) -> (tempfile::TempDir, solo::server::Server) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = start_server(dir.path(), |c| {
        c.solo.max_connections = max;
        c.solo.full_listener_idle_ms = 200;
        c.solo.grpc_max_connection_idle_ms = 60_000;
        c.solo.http_header_timeout_ms = 60_000;
        tweak(c);
    })
    .await;
    (dir, server)
}

/// How many of `connections` the node has closed, read within a moment.
async fn closed_of(connections: &mut [TcpStream]) -> usize {
    let mut closed = 0;
    for connection in connections {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_millis(50), connection.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => {
                    closed += 1;
                    break;
                }
                Ok(Ok(_)) => {} // the node's SETTINGS
                Err(_) => break,
            }
        }
    }
    closed
}

/// A full listener makes room for the clients that come: connections that ask nothing (from
/// any number of addresses; here one, whose cap lets it hold every slot) give way, one at a
/// time, long before their idle time is up, while a connection with a stream open keeps its
/// slot however quiet. On both listeners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_closes_idle_connections_for_the_clients_that_come() {
    let (_dir, server) = node_of_few_slots(4, |_| {}).await;
    let grpc = address(&server.grpc_url());
    let mut watcher = grpc_client(&server).await;
    let watch = proto::WatchRequest {
        progress_interval_ms: 60_000,
        ..Default::default()
    };
    let mut stream = watcher.watch(as_tenant("acme", watch)).await.unwrap().into_inner();
    tokio::time::timeout(PATIENCE, stream.next()).await.unwrap();
    let mut silent = Vec::new();
    for _ in 0..3 {
        let mut connection = TcpStream::connect(&grpc).await.unwrap();
        connection.write_all(HTTP2_HELLO).await.unwrap();
        silent.push(connection);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let mut other = tokio::time::timeout(PATIENCE, grpc_client(&server))
        .await
        .expect("a slot was made");
    other
        .deploy(as_tenant("acme", grpc_deploy("echo", "echo")))
        .await
        .expect("the deploy is served");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!(
        closed_of(&mut silent).await,
        1,
        "one silent connection gave way, no more"
    );
    let event = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("an event comes")
        .expect("the watch is still open")
        .expect("the watch did not fail");
    assert!(matches!(event.msg, Some(Msg::Event(_))), "{event:?}");
    drop(silent);

    // The HTTP listener: four silent connections, then a request.
    let http = address(&server.http_url());
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(&http).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let health = tokio::time::timeout(PATIENCE, reqwest::get(format!("{}/health", server.http_url())))
        .await
        .expect("a slot was made")
        .unwrap();
    assert_eq!(health.status(), 200);
    assert!(closed_of(&mut silent).await >= 1);
    drop(silent);
    server.stop().await.unwrap();
}

/// Health Watches hold no slot a client waits for: anyone may open them, with no credentials,
/// and a few addresses' worth would otherwise lock every other client out for good. They keep
/// their connections otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_watches_give_way_on_a_full_listener() {
    let (_dir, server) = node_of_few_slots(3, |_| {}).await;
    let mut watches = Vec::new();
    for _ in 0..3 {
        let mut health = tonic_health::pb::health_client::HealthClient::new(grpc_channel(&server).await);
        let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
        let mut stream = health.watch(request).await.unwrap().into_inner();
        stream.next().await.unwrap().unwrap();
        watches.push((health, stream));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut other = tokio::time::timeout(PATIENCE, grpc_client(&server))
        .await
        .expect("a slot was made");
    other
        .list(as_tenant("acme", proto::ListRequest::default()))
        .await
        .expect("the call is served");
    let mut ended = 0;
    for (_, stream) in &mut watches {
        if let Ok(next) = tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
            assert!(!matches!(next, Some(Ok(_))), "a health change came: {next:?}");
            ended += 1;
        }
    }
    assert_eq!(ended, 1, "one health watch gave way, no more");
    drop(watches);
    server.stop().await.unwrap();
}

/// A connection from `local` (a loopback address of the client's choosing) to `address`.
async fn connect_from(local: &str, address: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    socket.connect(address.parse().unwrap()).await.unwrap()
}

/// A client at its own cap is refused without anyone giving way for it: a client cannot use a
/// full listener to close others' connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_at_its_cap_makes_no_connection_give_way() {
    let (_dir, server) = node_of_few_slots(4, |c| c.solo.max_connections_per_client = 2).await;
    let grpc = address(&server.grpc_url());
    let mut held = Vec::new();
    for local in ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"] {
        let mut connection = connect_from(local, &grpc).await;
        connection.write_all(HTTP2_HELLO).await.unwrap();
        held.push(connection);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut over = vec![connect_from("127.0.0.2", &grpc).await];
    tokio::time::timeout(PATIENCE, async { while closed_of(&mut over).await == 0 {} })
        .await
        .expect("the connection past its client's cap is closed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        closed_of(&mut held).await,
        0,
        "a connection gave way to a client at its cap"
    );
    drop(held);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_for_several_idle_times_is_answered() {
    let (_dir, server) = node().await;
    let mut client = grpc_client(&server).await;
    let deployed = client
        .deploy(as_tenant("acme", grpc_deploy("spin", "spin")))
        .await
        .expect("spin deploys")
        .into_inner();
    let mut watch = client
        .watch(as_tenant(
            "acme",
            proto::WatchRequest {
                from_seq: deployed.seq,
                kinds: vec!["service_started".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    while !matches!(
        watch.next().await,
        Some(Ok(proto::WatchResponse {
            msg: Some(Msg::Event(_))
        }))
    ) {}
    drop(watch);
    // A call on a connection of its own, in flight for five idle times.
    let mut caller = grpc_client(&server).await;
    let spin_ms = IDLE.as_millis() * 5;
    let started = Instant::now();
    let call = proto::CallRequest {
        service_id: "spin".into(),
        payload: spin_ms.to_string().into_bytes(),
        ..Default::default()
    };
    let answer = tokio::time::timeout(PATIENCE, caller.call(as_tenant("acme", call)))
        .await
        .expect("answered")
        .expect("the call is served");
    assert_eq!(answer.into_inner().payload, b"done");
    // (The guest's clock counts whole milliseconds.)
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(spin_ms as u64 - 10),
        "answered after {took:?}"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connections_that_ask_nothing_more_are_closed_after_the_header_timeout() {
    let (_dir, server) = node().await;
    let http = address(&server.http_url());
    // HTTP/2 that opens and then asks nothing, or only pings.
    let (silent, pinging) = tokio::join!(hello_then_silence(&http, false), hello_then_silence(&http, true));
    for (what, open_for) in [("silent", silent), ("pinging", pinging)] {
        let open_for = open_for.unwrap_or_else(|| panic!("the {what} HTTP/2 connection stays open"));
        assert!(
            open_for >= IDLE - Duration::from_millis(50),
            "{what}: closed after {open_for:?}"
        );
    }
    // HTTP/1 kept alive after its answer.
    let mut kept = TcpStream::connect(&http).await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: solo\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("\"status\"") {
        let n = tokio::time::timeout(PATIENCE, kept.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before its answer: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    let answered = Instant::now();
    let rest = tokio::time::timeout(PATIENCE, kept.read_to_end(&mut answer)).await;
    assert!(rest.is_ok(), "the kept-alive connection stays open");
    assert!(
        answered.elapsed() >= IDLE - Duration::from_millis(50),
        "{:?}",
        answered.elapsed()
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_event_stream_over_http2_keeps_its_connection() {
    let (_dir, server) = node().await;
    let http2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let events = http2
        .get(format!("{}/events", server.http_url()))
        .header("x-tenant-id", "acme")
        .send()
        .await
        .expect("the stream opens");
    assert_eq!(events.status(), 200);
    assert_eq!(events.version(), reqwest::Version::HTTP_2);
    let mut body = events.bytes_stream();
    // Nothing passes on it for several idle times (keep-alive comments come every 15 s).
    tokio::time::sleep(IDLE * 5).await;
    let mut client = grpc_client(&server).await;
    client
        .deploy(as_tenant("acme", grpc_deploy("echo", "echo")))
        .await
        .expect("the deploy is served");
    let mut seen = String::new();
    while !seen.contains("service_deployed") {
        let chunk = tokio::time::timeout(PATIENCE, body.next())
            .await
            .expect("the event comes")
            .expect("the stream is still open")
            .expect("the stream did not fail");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    server.stop().await.unwrap();
}

/// How a client holds a stream open at shutdown without reading it.
#[derive(Debug, Clone, Copy)]
enum Unread {
    /// A Watch replaying a history larger than its HTTP/2 windows.
    Watch,
    /// The standard health service's Watch, which never ends by itself.
    HealthWatch,
    /// `/events?from=1` over HTTP/2, its windows as small.
    EventsOverHttp2,
    /// No stream: a gRPC connection that sent its hello and then nothing at all, not even the
    /// answer to the GOAWAY's ping.
    Silent,
}

/// A node with a history of some 1,500 events, whose shutdown grace is long: a node that waits
/// for its unread streams would take all of it.
async fn node_with_history(dir: &std::path::Path) -> solo::server::Server {
    {
        let control = open(options(dir));
        for n in 0..500 {
            let id = format!("svc{}", n % 5);
            control
                .deploy(deploy_request("acme", &id, &format!("{id}-{n}")))
                .await
                .unwrap();
        }
        assert!(control.head() >= 500, "{}", control.head());
        control.close().await;
    }
    start_server(dir, |c| c.solo.shutdown_grace_ms = 20_000).await
}

/// Opens a stream of the kind `unread` says, reads its first message, and returns what keeps it
/// open, unread.
async fn open_unread(server: &solo::server::Server, unread: Unread) -> Box<dyn std::any::Any + Send> {
    match unread {
        Unread::Silent => {
            let mut connection = TcpStream::connect(address(&server.grpc_url())).await.unwrap();
            connection.write_all(HTTP2_HELLO).await.unwrap();
            let mut settings = [0u8; 64];
            let _ = connection.read(&mut settings).await.unwrap();
            Box::new(connection)
        }
        Unread::Watch => Box::new(small_window_replay(server).await),
        Unread::HealthWatch => {
            let channel = small_window_channel(server).await;
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
            let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
            let mut stream = client.watch(request).await.unwrap().into_inner();
            stream.next().await.unwrap().unwrap();
            Box::new((client, stream))
        }
        Unread::EventsOverHttp2 => {
            let http2 = reqwest::Client::builder()
                .http2_prior_knowledge()
                .http2_initial_stream_window_size(16 << 10)
                .http2_initial_connection_window_size(16 << 10)
                .build()
                .unwrap();
            let events = http2
                .get(format!("{}/events?from=1", server.http_url()))
                .send()
                .await
                .expect("the stream opens");
            assert_eq!(events.status(), 200);
            let mut body = events.bytes_stream();
            body.next().await.unwrap().unwrap();
            Box::new((http2, body))
        }
    }
}

/// A stream's client that stops reading cannot hold the node past its shutdown: HTTP/2 flow
/// control keeps the stream's end from reaching it, so the node lets go of its connection a
/// moment after the streams were told to end, not at the end of the grace.
async fn an_unread_stream_holds_no_shutdown(unread: Unread) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = node_with_history(dir.path()).await;
    let held = open_unread(&server, unread).await;
    let asked = Instant::now();
    let mut admin = grpc_client(&server).await;
    admin
        .shutdown(proto::ShutdownRequest { grace_ms: 20_000 })
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, server.stopped()).await.unwrap().unwrap();
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(8), "{unread:?}: stopped after {took:?}");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_watch_holds_no_shutdown() {
    an_unread_stream_holds_no_shutdown(Unread::Watch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_health_watch_holds_no_shutdown() {
    an_unread_stream_holds_no_shutdown(Unread::HealthWatch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_holds_no_shutdown() {
    an_unread_stream_holds_no_shutdown(Unread::Silent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_event_stream_holds_no_shutdown() {
    an_unread_stream_holds_no_shutdown(Unread::EventsOverHttp2).await;
}
