//! End-to-end benchmarks over loopback gRPC, the load generator sharing the node's cores:
//! - Deploy of a cached module: p50 latency with 1 client (target < 1 ms) and throughput with
//!   256 concurrent clients (target ≥ 50,000 durable deploys/s);
//! - echo Call throughput with 64 concurrent clients (target ≥ 25,000 calls/s);
//! - Watch fan-out: 1,000 watchers while 5,000 events/s are appended (target p99
//!   commit-to-delivery < 50 ms, nothing lost).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use solo::proto::{self, solo_kernel_client::SoloKernelClient, watch_response::Msg};
use tokio::runtime::Runtime;
use tonic::transport::Channel;

/// As in the `solo` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

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
    config.limits.max_tenant_memory_mb = 1 << 30;
    config.limits.default_memory_mb = 1;
    config.limits.max_in_flight_requests = 100_000;
    config.limits.max_watchers = 100_000;
    solo::server::Server::start(config).await.expect("the node starts")
}

async fn client(server: &solo::server::Server) -> SoloKernelClient<Channel> {
    let channel = Channel::from_shared(server.grpc_url())
        .expect("a url")
        .connect()
        .await
        .expect("it connects");
    SoloKernelClient::new(channel)
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

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

fn bench_deploy(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = rt.block_on(start(dir.path()));
    let modules = [echo_wasm("echo one"), echo_wasm("echo two")];
    let mut group = c.benchmark_group("grpc_deploy");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(1));
    let flip = Arc::new(AtomicU64::new(0));
    for clients in [1usize, 256] {
        let mut latencies = Vec::new();
        let connections: Vec<_> = rt.block_on(async {
            let mut connections = Vec::new();
            for _ in 0..clients.min(16) {
                connections.push(client(&server).await);
            }
            connections
        });
        group.bench_with_input(BenchmarkId::new("cached_module", clients), &clients, |b, &clients| {
            b.iter_custom(|iters| {
                let next = Arc::new(AtomicU64::new(0));
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let elapsed = rt.block_on(async {
                    let started = Instant::now();
                    let tasks: Vec<_> = (0..clients)
                        .map(|i| {
                            let mut client = connections[i % connections.len()].clone();
                            let (next, flip, modules, tx) =
                                (Arc::clone(&next), Arc::clone(&flip), modules.clone(), tx.clone());
                            tokio::spawn(async move {
                                // Each client upgrades its own service between two cached modules.
                                let id = format!("svc{i}");
                                while next.fetch_add(1, Ordering::Relaxed) < iters {
                                    let module = &modules[(flip.fetch_add(1, Ordering::Relaxed) % 2) as usize];
                                    let t = Instant::now();
                                    let done = client.deploy(as_tenant("bench", deploy(&id, module))).await;
                                    done.expect("the deploy is acknowledged");
                                    let _ = tx.send(t.elapsed());
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        task.await.expect("a client does not panic");
                    }
                    started.elapsed()
                });
                drop(tx);
                while let Ok(latency) = rx.try_recv() {
                    latencies.push(latency);
                }
                elapsed
            });
        });
        latencies.sort();
        eprintln!(
            "grpc_deploy/cached_module/{clients}: {} deploys, latency p50 {:?}, p99 {:?}",
            latencies.len(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99)
        );
    }
    group.finish();
    rt.block_on(server.stop()).expect("the node stops");
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
        let mut connections = Vec::new();
        for _ in 0..8 {
            connections.push(client(&server).await);
        }
        connections
    });
    let mut group = c.benchmark_group("grpc_call");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(1));
    let clients = 64usize;
    group.bench_with_input(BenchmarkId::new("echo", clients), &clients, |b, &clients| {
        b.iter_custom(|iters| {
            let next = Arc::new(AtomicU64::new(0));
            rt.block_on(async {
                let started = Instant::now();
                let tasks: Vec<_> = (0..clients)
                    .map(|i| {
                        let mut client = connections[i % connections.len()].clone();
                        let next = Arc::clone(&next);
                        tokio::spawn(async move {
                            let request = proto::CallRequest {
                                service_id: format!("echo{}", i % 8),
                                payload: b"ping".to_vec(),
                                timeout_ms: 0,
                            };
                            while next.fetch_add(1, Ordering::Relaxed) < iters {
                                let answer = client.call(as_tenant("bench", request.clone())).await;
                                assert_eq!(answer.expect("the call succeeds").into_inner().payload, b"ping");
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.expect("a client does not panic");
                }
                started.elapsed()
            })
        });
    });
    group.finish();
    rt.block_on(server.stop()).expect("the node stops");
}

/// Not a criterion measurement: 1,000 watchers while events are appended at a steady rate;
/// prints commit-to-delivery percentiles and checks nothing was lost.
fn watch_fan_out(_: &mut Criterion) {
    let watchers = 1000;
    let rate = 5000u64; // events per second
    let seconds = 4u64;
    let rt = runtime();
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = rt.block_on(start(dir.path()));
    let report = rt.block_on(async {
        let mut connections = Vec::new();
        for _ in 0..8 {
            connections.push(client(&server).await);
        }
        let mut writer = client(&server).await;
        let module = echo_wasm("echo ready");
        // One service, killed and redeployed in turns: two events per round, none of them
        // starting instances at the event rate (starts coalesce).
        writer.deploy(as_tenant("bench", deploy("w", &module))).await.unwrap();
        let first = writer
            .deploy(as_tenant("bench", deploy("w", &echo_wasm("v2"))))
            .await
            .unwrap()
            .into_inner()
            .seq
            + 1;
        let total = rate * seconds;
        let mut tasks = Vec::new();
        for i in 0..watchers {
            let mut client = connections[i % connections.len()].clone();
            let watch = proto::WatchRequest {
                from_seq: first,
                kinds: vec!["service_kill_requested".into(), "service_deployed".into()],
                ..Default::default()
            };
            let mut stream = client.watch(as_tenant("bench", watch)).await.unwrap().into_inner();
            tasks.push(tokio::spawn(async move {
                let mut delays = Vec::with_capacity(total as usize);
                let mut next_seq = 0;
                while (delays.len() as u64) < total {
                    let Some(Ok(item)) = stream.next().await else { break };
                    if let Some(Msg::Event(event)) = item.msg {
                        assert!(event.seq > next_seq, "in order, each once");
                        next_seq = event.seq;
                        let now_ms = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as u64);
                        delays.push(Duration::from_millis(now_ms.saturating_sub(event.timestamp_ms)));
                    }
                }
                delays
            }));
        }
        let started = Instant::now();
        let mut sent = 0u64;
        let wasm = [module, echo_wasm("v2")];
        while sent < total {
            // Paced: stay on the rate, one event at a time (kill, then deploy).
            let due = Duration::from_micros(sent * 1_000_000 / rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            if sent % 2 == 0 {
                let kill = proto::KillRequest {
                    service_id: "w".into(),
                    force: true,
                    ..Default::default()
                };
                writer.kill(as_tenant("bench", kill)).await.unwrap();
            } else {
                writer
                    .deploy(as_tenant("bench", deploy("w", &wasm[(sent / 2 % 2) as usize])))
                    .await
                    .unwrap();
            }
            sent += 1;
        }
        let elapsed = started.elapsed();
        let mut all = Vec::new();
        let mut complete = 0;
        for task in tasks {
            let delays = tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("watchers finish")
                .unwrap();
            if delays.len() as u64 == total {
                complete += 1;
            }
            all.extend(delays);
        }
        all.sort();
        format!(
            "watch fan-out: {watchers} watchers, {total} events at {:.0} events/s; {complete}/{watchers} watchers got \
             every event; commit-to-delivery p50 {:?}, p99 {:?}, max {:?} (millisecond clock)",
            total as f64 / elapsed.as_secs_f64(),
            percentile(&all, 0.5),
            percentile(&all, 0.99),
            all.last().copied().unwrap_or_default(),
        )
    });
    eprintln!("{report}");
    rt.block_on(server.stop()).expect("the node stops");
}

criterion_group!(benches, bench_deploy, bench_call, watch_fan_out);
criterion_main!(benches);
