//! Benchmarks of the WebAssembly runtime, in process (through the control layer):
//! - deploy of a cached module (latency; target p50 < 1 ms),
//! - cold compile + deploy of `echo`,
//! - echo call throughput with concurrent callers (target ≥ 200,000 calls/s on 2 cores),
//! - one tenant's echo calls while another tenant keeps 40 services busy (how much of the guest
//!   threads a quiet tenant keeps beside a noisy one),
//! - memory per idle service, and how many idle services fit in 24 GiB (target ≥ 10,000).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod common;

use common::{closed_loop, report_latencies, runtime, selected};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use solo::config::Config;
use solo::control::{Control, DeployRequest};
use solo::proto::Limits;
use solo::server::Node;

/// As in the `solo` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn example_wat(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/services")
        .join(format!("{name}.wat"));
    std::fs::read_to_string(path).expect("the example exists")
}

/// Clients send compiled wasm; turning text into wasm is theirs to do, before the clock.
fn wasm(wat: &str) -> Vec<u8> {
    wat::parse_str(wat).expect("the example is valid WAT")
}

/// A node in `dir` with quotas out of the way and a pool for `instances` services.
fn config(dir: &Path, instances: u32) -> Config {
    let mut config = Config::default();
    config.solo.data_dir = dir.to_path_buf();
    config.database.map_size_mb = 4096;
    config.runtime.max_instances = instances;
    config.limits.max_services = u32::MAX;
    config.limits.max_deploys_per_minute = u32::MAX;
    config.limits.max_history_mb_per_hour = u64::MAX;
    config.limits.max_tenant_memory_mb = 1 << 30;
    config.limits.max_memory_mb = 64;
    config.limits.default_memory_mb = 1;
    config
}

fn request(tenant: &str, id: &str, module: &[u8]) -> DeployRequest {
    DeployRequest {
        tenant: tenant.into(),
        actor: format!("tenant:{tenant}"),
        service_id: id.into(),
        module: Arc::from(module),
        limits: Limits::default(),
        labels: BTreeMap::new(),
        idempotency_key: String::new(),
        expected_version: None,
    }
}

/// Waits until the service of `tenant`/`id` reports `service_started` at or after `from`.
async fn started(control: &Control, from: u64, tenant: &str, id: &str) {
    let mut tail = Box::pin(control.log().tail(from));
    while let Some(event) = tail.next().await {
        let event = event.expect("the tail reads");
        if event.tenant == tenant && event.service_id == id && solo::event::kind_name(&event) == "service_started" {
            return;
        }
    }
}

fn bench_deploy(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("a temp dir");
    let node: Node = rt
        .block_on(solo::server::open_node(&config(dir.path(), 1000)))
        .expect("the node opens");
    let echo = example_wat("echo");
    // Two variants of echo, alternately deployed to one id: every deploy is an upgrade whose
    // module is already compiled.
    let variants = [wasm(&echo), wasm(&echo.replace("echo ready", "echo again"))];
    let mut group = c.benchmark_group("deploy");
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    let mut latencies = Vec::new();
    let mut n = 0usize;
    group.bench_function("cached_module", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started_at = Instant::now();
                for _ in 0..iters {
                    let t = Instant::now();
                    node.control
                        .deploy(request("bench", "echo", &variants[n % 2]))
                        .await
                        .expect("deploy succeeds");
                    latencies.push(t.elapsed());
                    n += 1;
                }
                started_at.elapsed()
            })
        });
    });
    report_latencies(
        "deploy/cached_module",
        "deploys (each one durable commit)",
        &mut latencies,
    );

    // Many clients, each upgrading its own service between the two variants: the parity of
    // a client's deploys so far picks the variant its service does not run.
    let clients = 256usize;
    let variants = Arc::new(variants);
    let deploys_by_client: Arc<Vec<AtomicU64>> = Arc::new((0..clients).map(|_| AtomicU64::new(0)).collect());
    group.throughput(Throughput::Elements(1));
    group.bench_with_input(
        BenchmarkId::new("cached_module_concurrent", clients),
        &clients,
        |b, &clients| {
            b.iter_custom(|iters| {
                rt.block_on(closed_loop(clients, iters, |i, turns| {
                    let (control, variants, deploys) = (
                        node.control.clone(),
                        Arc::clone(&variants),
                        Arc::clone(&deploys_by_client),
                    );
                    let id = format!("svc{i}");
                    async move {
                        while turns.claim().is_some() {
                            let module = &variants[(deploys[i].fetch_add(1, Ordering::Relaxed) % 2) as usize];
                            let outcome = control.deploy(request("bench", &id, module)).await;
                            assert!(
                                !outcome.expect("deploy succeeds").unchanged,
                                "every deploy is an upgrade"
                            );
                        }
                    }
                }))
            });
        },
    );

    let mut cold = Vec::new();
    group.bench_function("cold_compile_and_deploy_echo", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started_at = Instant::now();
                for _ in 0..iters {
                    // A fresh module each time: the data string makes its hash new.
                    let module = wasm(&echo.replace("echo ready", &format!("cold {n:06}")));
                    let t = Instant::now();
                    node.control
                        .deploy(request("bench", "cold", &module))
                        .await
                        .expect("deploy succeeds");
                    cold.push(t.elapsed());
                    n += 1;
                }
                started_at.elapsed()
            })
        });
    });
    report_latencies("deploy/cold_compile_and_deploy_echo", "deploys", &mut cold);
    group.finish();
    rt.block_on(node.stop(Duration::from_secs(5)));
}

fn bench_calls(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("a temp dir");
    let node: Node = rt
        .block_on(solo::server::open_node(&config(dir.path(), 1000)))
        .expect("the node opens");
    let echo = wasm(&example_wat("echo"));
    // Several echo services, so calls spread over instances as real tenants' would.
    let services = 8;
    rt.block_on(async {
        for i in 0..services {
            let id = format!("echo{i}");
            let outcome = node
                .control
                .deploy(request("bench", &id, &echo))
                .await
                .expect("deploy succeeds");
            started(&node.control, outcome.seq, "bench", &id).await;
        }
    });
    let mut group = c.benchmark_group("call");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(1));
    for callers in [1usize, 64, 256] {
        group.bench_with_input(BenchmarkId::new("echo", callers), &callers, |b, &callers| {
            b.iter_custom(|iters| {
                rt.block_on(closed_loop(callers, iters, |i, turns| {
                    let control = node.control.clone();
                    let id = format!("echo{}", i % services);
                    async move {
                        while turns.claim().is_some() {
                            let out = control.call("bench", &id, b"ping".to_vec(), None).await;
                            assert_eq!(out.expect("the call succeeds"), b"ping");
                        }
                    }
                }))
            });
        });
    }
    group.finish();
    rt.block_on(node.stop(Duration::from_secs(5)));
}

/// A quiet tenant's echo calls, one caller at a time, while a noisy tenant keeps 40 services
/// busy with CPU work (`count` to a hundred million, one caller each). Alone, the echo answers as `call/echo/1` does.
fn bench_noisy_neighbour(c: &mut Criterion) {
    const NOISY_SERVICES: usize = 40;
    // The noise would run while other benchmarks are measured.
    if !selected("echo_beside") {
        return;
    }
    let rt = runtime();
    let dir = tempfile::tempdir().expect("a temp dir");
    let node: Node = rt
        .block_on(solo::server::open_node(&config(dir.path(), 1000)))
        .expect("the node opens");
    let (echo, busy) = (wasm(&example_wat("echo")), wasm(&example_wat("count")));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let noise: Vec<_> = rt.block_on(async {
        let outcome = node
            .control
            .deploy(request("quiet", "echo", &echo))
            .await
            .expect("deploy succeeds");
        started(&node.control, outcome.seq, "quiet", "echo").await;
        let mut noise = Vec::new();
        for i in 0..NOISY_SERVICES {
            let id = format!("busy{i}");
            let mut deploy = request("noisy", &id, &busy);
            deploy.limits.cpu_ms_per_call = 30_000;
            deploy.limits.call_timeout_ms = 60_000;
            let outcome = node.control.deploy(deploy).await.expect("deploy succeeds");
            started(&node.control, outcome.seq, "noisy", &id).await;
            let (control, stop) = (node.control.clone(), Arc::clone(&stop));
            noise.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let timeout = Some(Duration::from_secs(300));
                    control
                        .call("noisy", &id, b"100000000".to_vec(), timeout)
                        .await
                        .expect("the call succeeds");
                }
            }));
        }
        noise
    });
    let mut group = c.benchmark_group("call");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(1));
    group.bench_function("echo_beside_40_busy_services_of_another_tenant", |b| {
        b.iter_custom(|iters| {
            rt.block_on(closed_loop(1, iters, |_, turns| {
                let control = node.control.clone();
                async move {
                    while turns.claim().is_some() {
                        let out = control.call("quiet", "echo", b"ping".to_vec(), None).await;
                        assert_eq!(out.expect("the call succeeds"), b"ping");
                    }
                }
            }))
        });
    });
    group.finish();
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for caller in noise {
            caller.await.expect("the noisy caller ends");
        }
        node.stop(Duration::from_secs(5)).await
    });
}

/// Resident memory of this process, from /proc (Linux).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// A pool large enough that `services` fit under the node-wide quota, which keeps a
/// sixteenth of the pool back for upgrades and restarts.
fn pool_for(services: u32) -> u32 {
    services + services / 15 + 100
}

/// Not a criterion measurement: deploys idle echo services and reports the memory each one
/// holds and how many would fit in 24 GiB.
fn idle_services(_: &mut Criterion) {
    if !selected("idle_services") {
        return;
    }
    let count: u32 = std::env::var("SOLO_BENCH_IDLE_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rt = runtime();
    let dir = tempfile::tempdir().expect("a temp dir");
    let node: Node = rt
        .block_on(solo::server::open_node(&config(dir.path(), pool_for(count))))
        .expect("the node opens");
    let echo = wasm(&example_wat("echo"));
    let before = rss_bytes();
    let started_at = Instant::now();
    rt.block_on(async {
        let mut tail = Box::pin(node.control.log().tail(node.control.head() + 1));
        let deploys: Vec<_> = (0..32u32)
            .map(|worker| {
                let (control, echo) = (node.control.clone(), echo.clone());
                tokio::spawn(async move {
                    for i in (worker..count).step_by(32) {
                        let tenant = format!("t{}", i % 1000);
                        control
                            .deploy(request(&tenant, &format!("s{i}"), &echo))
                            .await
                            .expect("deploy succeeds");
                    }
                })
            })
            .collect();
        for deploy in deploys {
            deploy.await.expect("deploys do not panic");
        }
        let mut running = 0;
        while running < count {
            let event = tail.next().await.expect("the log is open").expect("the tail reads");
            match solo::event::kind_name(&event) {
                "service_started" => running += 1,
                "service_crashed" => panic!("a service did not start: {event:?}"),
                _ => {}
            }
        }
    });
    let took = started_at.elapsed();
    let after = rss_bytes();
    let per_service = (after.saturating_sub(before)) / u64::from(count);
    let fit = (24u64 << 30) / per_service.max(1);
    eprintln!(
        "idle services: {count} echo instances running; resident memory {} MiB -> {} MiB, {} KiB per idle service \
         (linear memory, store, actor, state); {fit} would fit in 24 GiB; deployed and started in {took:?}",
        before >> 20,
        after >> 20,
        per_service >> 10,
    );
    assert_eq!(node.runtime.running_instances(), count as usize);
    rt.block_on(node.stop(Duration::from_secs(30)));
}

criterion_group!(benches, bench_deploy, bench_calls, bench_noisy_neighbour, idle_services);
criterion_main!(benches);
