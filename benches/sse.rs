//! Benchmark of Server-Sent Events fan-out: up to 1,000 concurrent `/events` clients on one
//! node while deploys are appended from another task.
//!
//! `cargo bench --bench sse`. A round is `DEPLOYS_PER_ROUND` deploys (each followed by a forced
//! kill, so instances do not pile up), sent one after the other over REST; it ends when every
//! client has received the last deploy's `service_deployed` event. Criterion times rounds.
//! Printed to stderr: the number of clients (limited by the open-file limit), the delivery
//! latency of `service_deployed` events — from just before the deploy request was sent to the
//! moment each client's task parsed the frame, one clock — at p50, p99, p99.9 and max, and
//! whether anything was lost: every client must receive every deploy it was connected for, and
//! every client's ids must be contiguous (an admin's unfiltered stream sees every seq).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use eventsource_stream::Eventsource as _;
use futures_util::StreamExt as _;
use tempfile::TempDir;
use tokio::runtime::Runtime;

use solo::config::Config;
use solo::server::Server;

/// As in the `solo` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Clients wanted; fewer if the open-file limit does not allow them.
const WANTED_CLIENTS: usize = 1000;

/// Each client costs two descriptors in this process (its socket and the server's end); this
/// many are kept for the node itself (LMDB, listeners, the runtime, criterion's files).
const RESERVED_FDS: u64 = 256;

const DEPLOYS_PER_ROUND: u64 = 10;

/// Clients connect this many at a time (the listen backlog is finite).
const CONNECT_BATCH: usize = 100;

const ECHO: &str = include_str!("../examples/services/echo.wat");

/// A guard against hangs.
const DEADLINE: Duration = Duration::from_secs(60);

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The soft limit on open files, from `/proc/self/limits` (Linux); `None` elsewhere.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.trim_start_matches("Max open files").split_whitespace().next()?;
    match soft {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    }
}

fn client_count() -> (usize, Option<u64>) {
    let limit = open_file_limit();
    // Without a figure, assume the common default of 1024.
    let fds = limit.unwrap_or(1024);
    let affordable = fds.saturating_sub(RESERVED_FDS) / 2;
    let clients = WANTED_CLIENTS
        .min(usize::try_from(affordable).unwrap_or(usize::MAX))
        .max(1);
    (clients, limit)
}

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    /// Seq of the last frame received (0: none yet).
    last: AtomicU64,
    /// Frames whose id did not follow the previous one: skipped seqs, and repeated ones.
    gaps: AtomicU64,
    duplicates: AtomicU64,
    /// (seq, time received) of every `service_deployed` frame.
    deployed: Mutex<Vec<(u64, Instant)>>,
}

/// Reads one client's stream until it ends, recording what arrives.
async fn follow(response: reqwest::Response, seen: Arc<Seen>) {
    let mut events = response.bytes_stream().eventsource();
    while let Some(Ok(event)) = events.next().await {
        let at = Instant::now();
        let Ok(seq) = event.id.parse::<u64>() else {
            continue;
        };
        let last = seen.last.load(Ordering::Relaxed);
        if last != 0 {
            if seq <= last {
                seen.duplicates.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            seen.gaps.fetch_add(seq - last - 1, Ordering::Relaxed);
        }
        if event.event == "service_deployed" {
            seen.deployed.lock().unwrap_or_else(|p| p.into_inner()).push((seq, at));
        }
        seen.last.store(seq, Ordering::Release);
    }
}

/// A node, its SSE clients, and the deploys sent so far.
struct Fanout {
    rt: Runtime,
    server: Option<Server>,
    http: reqwest::Client,
    base: String,
    clients: Vec<Arc<Seen>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// (seq of `service_deployed`, when its request was sent).
    sent: Vec<(u64, Instant)>,
    next_service: u64,
    _dir: TempDir,
}

impl Fanout {
    fn start(clients: usize) -> Fanout {
        let rt = runtime();
        let dir = tempfile::Builder::new()
            .prefix("solo-bench-sse-")
            .tempdir()
            .expect("a temporary directory");
        let mut config = Config::default();
        config.solo.data_dir = dir.path().to_path_buf();
        config.solo.grpc_addr = "127.0.0.1:0".parse().expect("an address");
        config.solo.http_addr = "127.0.0.1:0".parse().expect("an address");
        config.database.map_size_mb = 4096;
        config.runtime.max_instances = 64;
        config.limits.max_memory_mb = 64;
        config.limits.default_memory_mb = 16;
        // The bench deploys far more than a tenant's defaults allow; streams are the admin's,
        // which count against tenant `default`.
        config.limits.max_deploys_per_minute = 1_000_000;
        config.limits.max_history_mb_per_hour = u64::MAX;
        config.limits.max_services = 1_000_000;
        config.limits.max_watchers = 1_000_000;
        // Every client of the bench is on loopback: one address.
        config.solo.max_connections_per_client = 1_000_000;
        let server = rt.block_on(Server::start(config)).expect("the node starts");
        let base = server.http_url();
        let http = reqwest::Client::builder().no_proxy().build().expect("an HTTP client");

        let seen: Vec<Arc<Seen>> = (0..clients).map(|_| Arc::new(Seen::default())).collect();
        let mut tasks = Vec::with_capacity(clients);
        rt.block_on(async {
            for batch in seen.chunks(CONNECT_BATCH) {
                let opened = futures_util::future::join_all(batch.iter().map(|_| {
                    // Development mode, no tenant: the admin, who sees every event.
                    http.get(format!("{base}/events")).send()
                }))
                .await;
                for (response, seen) in opened.into_iter().zip(batch) {
                    let response = response.expect("the stream opens");
                    assert_eq!(response.status(), reqwest::StatusCode::OK, "{response:?}");
                    tasks.push(tokio::spawn(follow(response, Arc::clone(seen))));
                }
            }
        });
        Fanout {
            rt,
            server: Some(server),
            http,
            base,
            clients: seen,
            tasks,
            sent: Vec::new(),
            next_service: 0,
            _dir: dir,
        }
    }

    /// Runs `rounds` rounds; the time from the first deploy sent to the last deploy received by
    /// every client.
    fn rounds(&mut self, rounds: u64) -> Duration {
        let Fanout {
            rt,
            http,
            base,
            clients,
            sent,
            next_service,
            ..
        } = self;
        rt.block_on(async {
            let started = Instant::now();
            let mut target = 0;
            for _ in 0..rounds * DEPLOYS_PER_ROUND {
                let id = format!("s{next_service}");
                *next_service += 1;
                let body = serde_json::json!({ "service_id": id, "wat": ECHO });
                let at = Instant::now();
                let response = http
                    .post(format!("{base}/services"))
                    .json(&body)
                    .send()
                    .await
                    .expect("the deploy is answered");
                assert_eq!(response.status(), reqwest::StatusCode::CREATED, "{response:?}");
                let answer: serde_json::Value = response.json().await.expect("a JSON answer");
                let seq = answer["deploy"]["seq"].as_u64().expect("the deploy's seq");
                sent.push((seq, at));
                target = seq;
                let killed = http
                    .delete(format!("{base}/services/{id}?force=true"))
                    .send()
                    .await
                    .expect("the kill is answered");
                assert_eq!(killed.status(), reqwest::StatusCode::ACCEPTED, "{killed:?}");
            }
            let deadline = Instant::now() + DEADLINE;
            while clients.iter().any(|c| c.last.load(Ordering::Acquire) < target) {
                assert!(Instant::now() < deadline, "some clients never received seq {target}");
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            started.elapsed()
        })
    }

    /// Prints the latencies and what was lost.
    fn report(&self, limit: Option<u64>) {
        let sent: std::collections::HashMap<u64, Instant> = self.sent.iter().copied().collect();
        let mut latencies = Vec::with_capacity(self.sent.len() * self.clients.len());
        let mut lost = 0u64;
        let (mut gaps, mut duplicates) = (0, 0);
        for client in &self.clients {
            let deployed = client.deployed.lock().unwrap_or_else(|p| p.into_inner());
            let received: std::collections::HashSet<u64> = deployed.iter().map(|(seq, _)| *seq).collect();
            lost += self.sent.iter().filter(|(seq, _)| !received.contains(seq)).count() as u64;
            for (seq, at) in deployed.iter() {
                if let Some(sent_at) = sent.get(seq) {
                    latencies.push(at.saturating_duration_since(*sent_at));
                }
            }
            gaps += client.gaps.load(Ordering::Relaxed);
            duplicates += client.duplicates.load(Ordering::Relaxed);
        }
        latencies.sort_unstable();
        let quantile = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        eprintln!(
            "sse fan-out: {} clients (open-file soft limit {}), {} deploys, {} deliveries of service_deployed",
            self.clients.len(),
            limit.map_or_else(|| "unknown".to_string(), |l| l.to_string()),
            self.sent.len(),
            latencies.len(),
        );
        eprintln!(
            "sse fan-out: send-to-receive latency p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?}",
            quantile(0.50),
            quantile(0.99),
            quantile(0.999),
            latencies.last().copied().unwrap_or_default(),
        );
        eprintln!(
            "sse fan-out: lost {lost} (deploys some client never received), {gaps} skipped seqs, {duplicates} repeated seqs"
        );
        assert_eq!(
            (lost, gaps, duplicates),
            (0, 0, 0),
            "every client must receive every event exactly once"
        );
    }

    fn stop(mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        if let Some(server) = self.server.take() {
            self.rt.block_on(server.stop()).expect("the node stops");
        }
    }
}

fn bench_fanout(c: &mut Criterion) {
    let (clients, limit) = client_count();
    if clients < WANTED_CLIENTS {
        eprintln!(
            "sse fan-out: the open-file limit ({}) allows {clients} clients, not {WANTED_CLIENTS}; raise it with `ulimit -n` for the full run",
            limit.map_or_else(|| "unknown".to_string(), |l| l.to_string()),
        );
    }
    let mut fanout = Fanout::start(clients);
    let mut group = c.benchmark_group("sse");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10))
        // Criterion's figure is deliveries per second.
        .throughput(Throughput::Elements(DEPLOYS_PER_ROUND * clients as u64));
    group.bench_function(format!("fanout/{clients}_clients"), |b| {
        b.iter_custom(|rounds| fanout.rounds(rounds))
    });
    group.finish();
    fanout.report(limit);
    fanout.stop();
}

criterion_group!(benches, bench_fanout);
criterion_main!(benches);
