//! End-to-end benchmarks over loopback gRPC, the load generator sharing the node's cores:
//! - Deploy of a cached module: p50 latency with 1 client (target < 1 ms) and throughput with
//!   256 concurrent clients (target ≥ 50,000 durable deploys/s);
//! - echo Call throughput with 64 concurrent clients (target ≥ 25,000 calls/s);
//! - Watch fan-out: 1,000 watchers while 5,000 events/s are appended (target p99
//!   commit-to-delivery < 50 ms, nothing lost), in two shapes: each watcher following one
//!   service (0), and each following every event (1); `SOLO_BENCH_FAN_OUT_SHAPE=N` runs one.
//!
//! Also the baselines the targets are stated against, measured by this harness on the same
//! cores:
//! - a no-op (the health check) on a bare tonic server, and the same no-op through Solo's gRPC
//!   port (admission, routing, connection tracking);
//! - a Status, the API's own cost (authentication, admission, metrics, a read of the state)
//!   with neither a commit nor the runtime;
//! - etcd's durable put (`grpc_etcd/put/256`), the yardstick for deploys, when an
//!   `etcd` binary is on the `PATH` (Debian: `apt install etcd-server`) or named by
//!   `SOLO_BENCH_ETCD`; skipped, saying so, otherwise.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod common;

use common::{closed_loop, report_latencies, runtime, selected};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use solo::proto::{self, solo_kernel_client::SoloKernelClient, watch_response::Msg};
use tonic::transport::Channel;

/// As in the `solo` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Connections the clients of a benchmark share, as a client pool would: HTTP/2 multiplexes
/// their calls. Fewer connections favour trivial calls, more favour calls that wait.
const CONNECTIONS: usize = 8;

fn echo_wasm(tag: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/services/echo.wat");
    let wat = std::fs::read_to_string(path)
        .expect("the example exists")
        .replace("echo ready", tag);
    wat::parse_str(wat).expect("echo is valid WAT")
}

/// A node on loopback ports with quotas and shedding out of the way.
async fn start(dir: &Path) -> solo::server::Server {
    let mut config = solo::config::Config::default();
    config.solo.data_dir = dir.to_path_buf();
    config.solo.grpc_addr = "127.0.0.1:0".parse().expect("an address");
    config.solo.http_addr = "127.0.0.1:0".parse().expect("an address");
    config.solo.max_in_flight = 100_000;
    config.database.map_size_mb = 8192;
    config.runtime.max_instances = 2000;
    config.limits.max_services = u32::MAX;
    config.limits.max_deploys_per_minute = u32::MAX;
    config.limits.max_history_mb_per_hour = u64::MAX;
    config.limits.max_tenant_memory_mb = 1 << 30;
    config.limits.default_memory_mb = 1;
    config.limits.max_in_flight_requests = 100_000;
    config.limits.max_watchers = 100_000;
    solo::server::Server::start(config).await.expect("the node starts")
}

async fn channel(server: &solo::server::Server) -> Channel {
    channel_to(server.grpc_url()).await
}

async fn channel_to(url: String) -> Channel {
    Channel::from_shared(url)
        .expect("a url")
        .connect()
        .await
        .expect("it connects")
}

async fn client(server: &solo::server::Server) -> SoloKernelClient<Channel> {
    SoloKernelClient::new(channel(server).await)
}

/// `count` connections to `server`, each its own HTTP/2 connection, as `make` wraps them.
async fn connections<C>(server: &solo::server::Server, count: usize, make: fn(Channel) -> C) -> Vec<C> {
    connections_to(&server.grpc_url(), count, make).await
}

/// `count` connections to the gRPC server at `url`, as `make` wraps them.
async fn connections_to<C>(url: &str, count: usize, make: fn(Channel) -> C) -> Vec<C> {
    let mut connections = Vec::with_capacity(count);
    for _ in 0..count {
        connections.push(make(channel_to(url.to_owned()).await));
    }
    connections
}

/// A tonic server with the health service alone, on a loopback port, as the issue's "no-op
/// tonic server": no admission, routing or connection tracking. Returns its URL and what
/// stops it.
async fn bare_tonic() -> (String, tokio::sync::oneshot::Sender<()>) {
    let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().expect("an address"))
        .expect("a loopback port")
        .with_nodelay(Some(true));
    let url = format!("http://{}", incoming.local_addr().expect("a bound port"));
    let (_, health) = tonic_health::server::health_reporter();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tonic::transport::Server::builder().serve_with_incoming_shutdown(health, incoming, async {
        let _ = stopped.await;
    });
    tokio::spawn(async move { serving.await.expect("the bare server serves") });
    (url, stop)
}

/// A group whose figures are requests a second: ten samples of 5 s each.
fn per_request_group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(1));
    group
}

fn as_tenant<T>(tenant: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-tenant-id", tenant.parse().expect("a valid header"));
    request
}

fn deploy(id: &str, wasm: &[u8]) -> proto::DeployRequest {
    proto::DeployRequest {
        service_id: id.into(),
        module: Some(proto::deploy_request::Module::Wasm(wasm.to_vec())),
        ..Default::default()
    }
}

fn bench_deploy(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = rt.block_on(start(dir.path()));
    let modules = [echo_wasm("echo one"), echo_wasm("echo two")];
    let mut group = per_request_group(c, "grpc_deploy");
    // Deploys made by each client so far, whose parity picks the module that differs from the
    // one its service runs: every deploy is an upgrade, none an unchanged no-op.
    let deploys_by_client: Arc<Vec<AtomicU64>> = Arc::new((0..256).map(|_| AtomicU64::new(0)).collect());
    for clients in [1usize, 256] {
        let mut latencies = Vec::new();
        let connections = rt.block_on(connections(&server, clients.min(CONNECTIONS), SoloKernelClient::new));
        group.bench_with_input(BenchmarkId::new("cached_module", clients), &clients, |b, &clients| {
            b.iter_custom(|iters| {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let elapsed = rt.block_on(closed_loop(clients, iters, |i, turns| {
                    let mut client = connections[i % connections.len()].clone();
                    let (modules, tx, deploys) = (modules.clone(), tx.clone(), Arc::clone(&deploys_by_client));
                    // Each client upgrades its own service between two cached modules.
                    let id = format!("svc{i}");
                    async move {
                        while turns.claim().is_some() {
                            let module = &modules[(deploys[i].fetch_add(1, Ordering::Relaxed) % 2) as usize];
                            let t = Instant::now();
                            let done = client.deploy(as_tenant("bench", deploy(&id, module))).await;
                            done.expect("the deploy is acknowledged");
                            let _ = tx.send(t.elapsed());
                        }
                    }
                }));
                drop(tx);
                while let Ok(latency) = rx.try_recv() {
                    latencies.push(latency);
                }
                elapsed
            });
        });
        report_latencies(
            &format!("grpc_deploy/cached_module/{clients}"),
            "deploys",
            &mut latencies,
        );
    }
    group.finish();
    rt.block_on(server.stop()).expect("the node stops");
}

/// The ceiling of this harness on this machine: a health check, which touches neither the log
/// nor the runtime, with as many clients and connections as the deploy benchmark; first on a
/// bare tonic server, then through Solo's gRPC port.
fn bench_baseline(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = rt.block_on(start(dir.path()));
    let (bare_url, stop_bare) = rt.block_on(bare_tonic());
    let clients = 256usize;
    let mut group = per_request_group(c, "grpc_baseline");
    for (name, url) in [
        ("bare_tonic_health_check", bare_url),
        ("health_check", server.grpc_url()),
    ] {
        let connections = rt.block_on(connections_to(
            &url,
            CONNECTIONS,
            tonic_health::pb::health_client::HealthClient::new,
        ));
        group.bench_with_input(BenchmarkId::new(name, clients), &clients, |b, &clients| {
            b.iter_custom(|iters| {
                rt.block_on(closed_loop(clients, iters, |i, turns| {
                    let mut client = connections[i % connections.len()].clone();
                    async move {
                        while turns.claim().is_some() {
                            let request = tonic_health::pb::HealthCheckRequest::default();
                            client.check(request).await.expect("the server answers");
                        }
                    }
                }))
            });
        });
    }
    let _ = stop_bare.send(());
    // The API's own cost: authentication, admission, metrics and a read of the state, with
    // neither a commit nor the runtime.
    let kernels = rt.block_on(crate::connections(&server, CONNECTIONS, SoloKernelClient::new));
    let wasm = echo_wasm("echo status");
    rt.block_on(async {
        let mut client = kernels[0].clone();
        client.deploy(as_tenant("bench", deploy("probed", &wasm))).await
    })
    .expect("the deploy is acknowledged");
    group.bench_with_input(BenchmarkId::new("status", clients), &clients, |b, &clients| {
        b.iter_custom(|iters| {
            rt.block_on(closed_loop(clients, iters, |i, turns| {
                let mut client = kernels[i % kernels.len()].clone();
                async move {
                    while turns.claim().is_some() {
                        let request = proto::StatusRequest {
                            service_id: "probed".into(),
                        };
                        client
                            .status(as_tenant("bench", request))
                            .await
                            .expect("the node answers");
                    }
                }
            }))
        });
    });
    group.finish();
    rt.block_on(server.stop()).expect("the node stops");
}

/// The part of etcd 3.4's `etcdserverpb` a put needs, wire-compatible with etcd's own messages.
mod etcd {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResponseHeader {
        #[prost(int64, tag = "3")]
        pub revision: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
    }
}

/// A single-member etcd in a temporary directory, with its defaults (a put is acknowledged once
/// its WAL entry is fsynced), killed when dropped.
struct Etcd {
    process: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// `SOLO_BENCH_ETCD`, or `etcd` on the `PATH`.
    fn binary() -> Option<std::path::PathBuf> {
        if let Some(named) = std::env::var_os("SOLO_BENCH_ETCD") {
            return Some(named.into());
        }
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|dir| dir.join("etcd"))
            .find(|candidate| candidate.is_file())
    }

    fn start(binary: &Path) -> Etcd {
        // etcd takes no port 0; a port just freed is as good for a benchmark.
        let free_port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .expect("a free loopback port")
                .port()
        };
        let url = format!("http://127.0.0.1:{}", free_port());
        let peer_url = format!("http://127.0.0.1:{}", free_port());
        let dir = tempfile::tempdir().expect("a temp dir");
        let process = std::process::Command::new(binary)
            .arg("--name=bench")
            .arg(format!("--data-dir={}", dir.path().join("etcd").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=bench={peer_url}"))
            .arg("--quota-backend-bytes=8589934592")
            .arg("--logger=zap")
            .arg("--log-level=error")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} does not start: {e}", binary.display()));
        Etcd {
            process,
            url,
            _dir: dir,
        }
    }

    /// Once etcd acknowledges a put, within 30 s.
    async fn ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let attempt = async {
                let mut grpc = tonic::client::Grpc::new(Channel::from_shared(self.url.clone())?.connect().await?);
                etcd_put(&mut grpc, b"ready".to_vec(), Vec::new()).await?;
                Ok::<_, Box<dyn std::error::Error>>(())
            };
            match attempt.await {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("etcd at {} does not answer: {e}", self.url),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

async fn etcd_put(
    grpc: &mut tonic::client::Grpc<Channel>,
    key: Vec<u8>,
    value: Vec<u8>,
) -> Result<etcd::PutResponse, tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/etcdserverpb.KV/Put");
    let codec = tonic_prost::ProstCodec::default();
    let request = tonic::Request::new(etcd::PutRequest { key, value });
    grpc.unary(request, path, codec).await.map(tonic::Response::into_inner)
}

/// etcd's durable put, the yardstick the deploy target is set against ("Solo's durable writes
/// should beat etcd's by 2x"), driven as `grpc_deploy/cached_module/256` is: 256 clients over
/// [`CONNECTIONS`] connections, each overwriting its own key with a value the size of that
/// bench's module.
fn bench_etcd(c: &mut Criterion) {
    let Some(binary) = Etcd::binary() else {
        if selected("grpc_etcd/put") {
            eprintln!("grpc_etcd/put: skipped, no etcd (`apt install etcd-server`, or SOLO_BENCH_ETCD=PATH)");
        }
        return;
    };
    let rt = runtime();
    // Started by the benchmark's first run, so a filter that leaves it out starts no etcd.
    let mut etcd: Option<(Etcd, Vec<tonic::client::Grpc<Channel>>)> = None;
    let value = echo_wasm("echo one");
    let mut group = per_request_group(c, "grpc_etcd");
    let clients = 256usize;
    group.bench_with_input(BenchmarkId::new("put", clients), &clients, |b, &clients| {
        let (_, connections) = etcd.get_or_insert_with(|| {
            let etcd = Etcd::start(&binary);
            let connections = rt.block_on(async {
                etcd.ready().await;
                connections_to(&etcd.url, CONNECTIONS, tonic::client::Grpc::new).await
            });
            (etcd, connections)
        });
        b.iter_custom(|iters| {
            rt.block_on(closed_loop(clients, iters, |i, turns| {
                let mut grpc = connections[i % connections.len()].clone();
                let (key, value) = (format!("svc{i}").into_bytes(), value.clone());
                async move {
                    while turns.claim().is_some() {
                        let put = etcd_put(&mut grpc, key.clone(), value.clone()).await;
                        let revision = put.expect("the put is acknowledged").header.map(|h| h.revision);
                        assert!(revision.is_some_and(|r| r > 0), "an acknowledged put has a revision");
                    }
                }
            }))
        });
    });
    group.finish();
}

fn bench_call(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = rt.block_on(start(dir.path()));
    let connections: Vec<_> = rt.block_on(async {
        let mut setup = client(&server).await;
        let services = 8;
        for i in 0..services {
            setup
                .deploy(as_tenant(
                    "bench",
                    deploy(&format!("echo{i}"), &echo_wasm("echo ready")),
                ))
                .await
                .unwrap();
        }
        // Wait until all are running.
        let watch = proto::WatchRequest {
            from_seq: 1,
            kinds: vec!["service_started".into()],
            ..Default::default()
        };
        let mut stream = setup.watch(as_tenant("bench", watch)).await.unwrap().into_inner();
        let mut running = 0;
        while running < services {
            if let Some(Msg::Event(_)) = stream.next().await.unwrap().unwrap().msg {
                running += 1;
            }
        }
        connections(&server, CONNECTIONS, SoloKernelClient::new).await
    });
    let mut group = per_request_group(c, "grpc_call");
    let clients = 64usize;
    group.bench_with_input(BenchmarkId::new("echo", clients), &clients, |b, &clients| {
        b.iter_custom(|iters| {
            rt.block_on(closed_loop(clients, iters, |i, turns| {
                let mut client = connections[i % connections.len()].clone();
                let request = proto::CallRequest {
                    service_id: format!("echo{}", i % 8),
                    payload: b"ping".to_vec(),
                    timeout_ms: 0,
                };
                async move {
                    while turns.claim().is_some() {
                        let answer = client.call(as_tenant("bench", request.clone())).await;
                        assert_eq!(answer.expect("the call succeeds").into_inner().payload, b"ping");
                    }
                }
            }))
        });
    });
    group.finish();
    rt.block_on(server.stop()).expect("the node stops");
}

/// One shape of the watch fan-out measurement.
struct FanOut {
    watchers: usize,
    /// Services the load cycles through; with `per_service`, watcher `i` follows service
    /// `i % services` only, as a controller following its own objects would.
    services: usize,
    per_service: bool,
    /// Events a second the load aims for (each kill or deploy appends about two).
    events_per_second: u64,
    seconds: u64,
}

/// Not a criterion measurement: watchers follow the log while a paced load of kills and
/// deploys appends events; prints commit-to-delivery percentiles and checks, against an
/// unfiltered reference watch, that every watcher got each of its events once, in order.
fn watch_fan_out(_: &mut Criterion) {
    if !selected("watch_fan_out") {
        return;
    }
    let shapes = [
        FanOut {
            watchers: 1000,
            services: 1000,
            per_service: true,
            events_per_second: 5000,
            seconds: 5,
        },
        FanOut {
            watchers: 1000,
            services: 100,
            per_service: false,
            events_per_second: 5000,
            seconds: 5,
        },
    ];
    let only: Option<usize> = std::env::var("SOLO_BENCH_FAN_OUT_SHAPE")
        .ok()
        .and_then(|v| v.parse().ok());
    for (index, shape) in shapes.into_iter().enumerate() {
        if only.is_some_and(|only| only != index) {
            continue;
        }
        let rt = runtime();
        let dir = tempfile::tempdir().expect("a temp dir");
        let server = rt.block_on(start(dir.path()));
        let report = rt.block_on(fan_out(&server, &shape));
        eprintln!("{report}");
        rt.block_on(server.stop()).expect("the node stops");
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Follows a watch until `done` holds a seq and the watch has passed it, by an event or by a
/// progress note. Returns, in arrival order, the seq and `record` of each event before it.
async fn follow<T>(
    mut client: SoloKernelClient<Channel>,
    request: proto::WatchRequest,
    done: tokio::sync::watch::Receiver<u64>,
    record: fn(proto::Event, u32) -> T,
    expected_events: usize,
) -> Vec<(u64, T)> {
    let mut stream = client.watch(as_tenant("bench", request)).await.unwrap().into_inner();
    let mut seen = Vec::with_capacity(expected_events);
    loop {
        let passed = match stream.next().await {
            Some(Ok(proto::WatchResponse {
                msg: Some(Msg::Event(event)),
            })) => {
                let delay_ms = u32::try_from(now_ms().saturating_sub(event.timestamp_ms)).unwrap_or(u32::MAX);
                let seq = event.seq;
                seen.push((seq, record(event, delay_ms)));
                seq
            }
            Some(Ok(proto::WatchResponse {
                msg: Some(Msg::Progress(p)),
            })) => p.head_seq,
            Some(Ok(_)) => continue,
            Some(Err(status)) => panic!("the watch failed: {status}"),
            None => panic!("the watch ended early"),
        };
        let end = *done.borrow();
        if end != 0 && passed >= end {
            seen.retain(|&(seq, _)| seq < end);
            return seen;
        }
    }
}

async fn fan_out(server: &solo::server::Server, shape: &FanOut) -> String {
    let mut connections = connections(server, CONNECTIONS, SoloKernelClient::new).await;
    let modules = Arc::new([echo_wasm("echo one"), echo_wasm("echo two")]);
    let mut first = 0;
    for i in 0..shape.services {
        let n = connections.len();
        let deployed = connections[i % n]
            .deploy(as_tenant("bench", deploy(&format!("svc{i}"), &modules[0])))
            .await
            .unwrap();
        first = first.max(deployed.into_inner().seq + 1);
    }
    let (done_tx, done) = tokio::sync::watch::channel(0u64);
    let watch_request = |service_id: String| proto::WatchRequest {
        from_seq: first,
        service_id,
        progress_interval_ms: 100,
        ..Default::default()
    };
    let total_events = (shape.events_per_second * shape.seconds) as usize + 16;
    let reference = tokio::spawn(follow(
        client(server).await,
        watch_request(String::new()),
        done.clone(),
        |event, _| event.service_id,
        total_events,
    ));
    let mut watchers = Vec::new();
    for i in 0..shape.watchers {
        let service = if shape.per_service {
            format!("svc{}", i % shape.services)
        } else {
            String::new()
        };
        let client = connections[i % connections.len()].clone();
        let expected_events = if shape.per_service {
            total_events / shape.services
        } else {
            total_events
        };
        let watch = follow(
            client,
            watch_request(service.clone()),
            done.clone(),
            |_, delay_ms| delay_ms,
            expected_events,
        );
        watchers.push((service, tokio::spawn(watch)));
    }

    // The load: writers, each cycling through its own services, alternately killing and
    // redeploying each one, paced to the rate.
    let writers = 32.min(shape.services);
    let requests_per_second = (shape.events_per_second / 2).max(1);
    let total_requests = requests_per_second * shape.seconds;
    let started = Instant::now();
    let load: Vec<_> = (0..writers)
        .map(|w| {
            let mut client = connections[w % connections.len()].clone();
            let modules = Arc::clone(&modules);
            let services: Vec<usize> = (w..shape.services).step_by(writers).collect();
            tokio::spawn(async move {
                let mut k = w as u64;
                let mut round = 0usize;
                while k < total_requests {
                    let due = Duration::from_micros(k * 1_000_000 / requests_per_second);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                    let id = format!("svc{}", services[round % services.len()]);
                    let cycle = round / services.len();
                    if cycle.is_multiple_of(2) {
                        let kill = proto::KillRequest {
                            service_id: id,
                            force: true,
                            ..Default::default()
                        };
                        client
                            .kill(as_tenant("bench", kill))
                            .await
                            .expect("the kill is acknowledged");
                    } else {
                        let module = &modules[(cycle / 2) % 2];
                        client
                            .deploy(as_tenant("bench", deploy(&id, module)))
                            .await
                            .expect("the deploy is acknowledged");
                    }
                    round += 1;
                    k += writers as u64;
                }
            })
        })
        .collect();
    for task in load {
        task.await.expect("a writer does not panic");
    }
    let elapsed = started.elapsed();
    // Let the runtime's last observations land, then mark the end with one more event.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let end = connections[0]
        .deploy(as_tenant("bench", deploy("end", &modules[0])))
        .await
        .unwrap()
        .into_inner()
        .seq;
    done_tx.send(end).expect("watchers are listening");

    let reference = reference.await.expect("the reference watch does not panic");
    let all: Vec<u64> = reference.iter().map(|(seq, _)| *seq).collect();
    let mut by_service: std::collections::HashMap<String, Vec<u64>> = std::collections::HashMap::new();
    for (seq, service) in reference {
        by_service.entry(service).or_default().push(seq);
    }
    // Milliseconds of commit-to-delivery delay -> deliveries.
    let mut delays = std::collections::BTreeMap::<u32, u64>::new();
    let mut complete = 0;
    for (service, watcher) in watchers {
        let seen = tokio::time::timeout(Duration::from_secs(120), watcher)
            .await
            .expect("watchers finish")
            .expect("a watcher does not panic");
        let expected = if service.is_empty() {
            Some(&all)
        } else {
            by_service.get(&service)
        };
        let got: Vec<u64> = seen.iter().map(|&(seq, _)| seq).collect();
        if got == expected.map_or(&[][..], Vec::as_slice) {
            complete += 1;
        }
        for (_, delay_ms) in seen {
            *delays.entry(delay_ms).or_default() += 1;
        }
    }
    let deliveries: u64 = delays.values().sum();
    let delay_percentile = |q: f64| {
        let rank = (deliveries as f64 * q) as u64;
        let mut below = 0;
        for (&delay_ms, &count) in &delays {
            below += count;
            if below > rank {
                return delay_ms;
            }
        }
        0
    };
    let shape_name = if shape.per_service {
        format!("each following one of {} services", shape.services)
    } else {
        "each following every event".to_string()
    };
    format!(
        "watch fan-out: {} watchers {shape_name}; {} events at {:.0} events/s; {} deliveries; {complete}/{} watchers got \
         exactly their events in order; commit-to-delivery p50 {} ms, p99 {} ms, max {} ms",
        shape.watchers,
        all.len(),
        all.len() as f64 / elapsed.as_secs_f64(),
        deliveries,
        shape.watchers,
        delay_percentile(0.5),
        delay_percentile(0.99),
        delays.last_key_value().map_or(0, |(&delay_ms, _)| delay_ms),
    )
}

criterion_group!(
    benches,
    bench_baseline,
    bench_etcd,
    bench_deploy,
    bench_call,
    watch_fan_out
);
criterion_main!(benches);
