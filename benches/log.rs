//! Benchmarks of the log: durable appends through the control writer (group commit), rebuilding
//! the state from a million events (and backing them up), and commit-to-delivery latency of
//! tailers.
//!
//! `cargo bench --bench log`. These measure; they assert nothing. Figures that criterion cannot
//! report (tail latency percentiles, the shape of the data set) are printed to stderr.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt as _;
use tempfile::TempDir;
use tokio::runtime::Runtime;

mod common;

use solo::config::Config;
use solo::control::{Control, ControlOptions, DeployRequest, EventLog, load_snapshot, replay};
use solo::event::envelope;
use solo::limits::{LimitsTable, TenantLimits};
use solo::log::{Batch, BlobChanges, BlobRef, LogOptions, frame};
use solo::proto::{self, CrashReason, Event, Limits, StopReason, event::Kind};
use solo::state::{Settings, State};

/// As in the `solo` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn log_options() -> LogOptions {
    Config::default().log_options(false)
}

fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("solo-bench-")
        .tempdir()
        .expect("a temporary directory")
}

// ---------------------------------------------------------------------------------------------
// 1. Durable appends through the control writer (group commit).
// ---------------------------------------------------------------------------------------------

/// Concurrent appenders (tokio tasks) per run.
const APPENDERS: [usize; 4] = [1, 16, 256, 1024];

/// Deploys are spread over this many tenants. With the default quota of 100 services a tenant,
/// a node holding the services these runs create would need about as many tenants.
const APPEND_TENANTS: u64 = 16_384;

/// The two modules deploys alternate between: tiny and fixed, so each blob is stored once.
const TINY_MODULE: &[u8] = b"\0asm\x01\0\0\0";
const TINY_MODULE_V2: &[u8] = b"\0asm\x01\0\0\0\0\x02\x01v";

/// A node whose quotas never refuse the benchmark's deploys.
fn unlimited() -> LimitsTable {
    LimitsTable {
        node: TenantLimits {
            max_services: u32::MAX,
            max_deploys_per_minute: u32::MAX,
            max_history_mb_per_hour: u64::MAX,
            max_tenant_memory_mb: 1 << 30,
            ..TenantLimits::default()
        },
        ..LimitsTable::default()
    }
}

/// p50 and p99 of a 4 KiB write + `fdatasync` in `dir`: the floor under a durable commit
/// (LMDB syncs twice per commit: the data pages, then the meta page). Printed with each run,
/// as it varies with what else the machine is writing.
fn sync_latency(dir: &Path) -> (Duration, Duration) {
    use std::io::{Seek as _, Write as _};
    let path = dir.join("sync-probe");
    let mut file = std::fs::File::create(&path).expect("the probe file is created");
    let mut times: Vec<Duration> = (0..50)
        .map(|i| {
            file.seek(std::io::SeekFrom::Start((i % 8) * 4096)).expect("seek");
            file.write_all(&[i as u8; 4096]).expect("write");
            let started = Instant::now();
            file.sync_data().expect("fdatasync");
            started.elapsed()
        })
        .collect();
    drop(file);
    let _ = std::fs::remove_file(path);
    times.sort();
    (times[times.len() / 2], times[times.len() * 99 / 100])
}

/// What the writer's commit hook saw: batches, their events, and time spent committing them.
#[derive(Default)]
struct CommitStats {
    batches: AtomicU64,
    events: AtomicU64,
    commit_ns: AtomicU64,
    max_batch: AtomicU64,
}

impl CommitStats {
    /// `active`: the time appenders were running, warm-up included (as the hook counts it).
    fn report(&self, active: Duration) -> String {
        let batches = self.batches.load(Ordering::Relaxed).max(1);
        let events = self.events.load(Ordering::Relaxed);
        let commit = Duration::from_nanos(self.commit_ns.load(Ordering::Relaxed));
        format!(
            "{batches} commits, {:.1} events per commit (max {}), {:?} per commit inside Log::append \
             ({:.0}% of the time appenders ran)",
            events as f64 / batches as f64,
            self.max_batch.load(Ordering::Relaxed),
            commit / batches as u32,
            100.0 * commit.as_secs_f64() / active.as_secs_f64().max(1e-9),
        )
    }
}

/// A node as the default configuration makes it (so snapshots are written every 100,000 events),
/// with quotas out of the way and a hook counting commits.
fn control_options(dir: &TempDir, stats: &Arc<CommitStats>) -> ControlOptions {
    let mut options = Config::default()
        .control_options()
        .expect("the default config is valid");
    options.data_dir = dir.path().to_path_buf();
    options.limits = unlimited();
    let stats = Arc::clone(stats);
    options.on_commit = Some(Box::new(move |events, took| {
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.events.fetch_add(events.len() as u64, Ordering::Relaxed);
        stats.commit_ns.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        stats.max_batch.fetch_max(events.len() as u64, Ordering::Relaxed);
    }));
    options
}

/// Services the appenders upgrade in turn. A bounded set, so the state stays the size of a
/// real node's while every deploy is a new version (one `service_deployed` event).
const APPEND_SERVICES: u64 = 4096;

/// The names of one service the appenders deploy: a client has them at hand, not to format.
struct AppendTarget {
    tenant: String,
    actor: String,
    service_id: String,
}

fn append_targets() -> Arc<[AppendTarget]> {
    (0..APPEND_SERVICES)
        .map(|service| {
            let tenant = format!("t{}", service % APPEND_TENANTS);
            AppendTarget {
                actor: format!("tenant:{tenant}"),
                tenant,
                service_id: format!("s{service}"),
            }
        })
        .collect()
}

/// One appender: claims indices until `end` and deploys, for each, the next version of service
/// `index % APPEND_SERVICES` (the module alternates, so nothing is an unchanged no-op).
async fn deploy_loop(
    control: Control,
    targets: Arc<[AppendTarget]>,
    modules: Arc<[Arc<[u8]>; 2]>,
    next: Arc<AtomicU64>,
    end: u64,
    failed: Arc<AtomicU64>,
) {
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= end {
            return;
        }
        let target = &targets[(i % APPEND_SERVICES) as usize];
        let request = DeployRequest {
            actor: target.actor.clone(),
            tenant: target.tenant.clone(),
            service_id: target.service_id.clone(),
            module: Arc::clone(&modules[(i / APPEND_SERVICES % 2) as usize]),
            limits: Limits::default(),
            labels: BTreeMap::new(),
            idempotency_key: String::new(),
            expected_version: None,
        };
        match control.deploy(request).await {
            Ok(outcome) if !outcome.unchanged && !outcome.replayed => {}
            Ok(outcome) => {
                if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("deploy {i} appended nothing: {outcome:?}");
                }
            }
            Err(e) => {
                if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("deploy {i} failed: {e}");
                }
            }
        }
    }
}

fn bench_append(c: &mut Criterion) {
    let rt = runtime();
    let modules: Arc<[Arc<[u8]>; 2]> = Arc::new([Arc::from(TINY_MODULE), Arc::from(TINY_MODULE_V2)]);
    let targets = append_targets();
    let mut group = c.benchmark_group("append_durable");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(1));
    for appenders in APPENDERS {
        // A fresh data directory and node per concurrency, so runs do not inherit each other's
        // state (heed also refuses to open one directory twice in a process). Opened on first
        // use, so a filtered-out run costs nothing.
        let mut node: Option<(TempDir, Control)> = None;
        let next = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let stats = Arc::new(CommitStats::default());
        let mut active = Duration::ZERO;
        group.bench_with_input(BenchmarkId::new("deploy", appenders), &appenders, |b, &appenders| {
            let (_, control) = node.get_or_insert_with(|| {
                let dir = tempdir();
                let (p50, p99) = sync_latency(dir.path());
                eprintln!("append_durable/deploy/{appenders}: before the run, fdatasync p50 {p50:?}, p99 {p99:?}");
                let (control, _) = Control::open(control_options(&dir, &stats)).expect("the control layer opens");
                (dir, control)
            });
            b.iter_custom(|iters| {
                let end = next.load(Ordering::Relaxed) + iters;
                let started = Instant::now();
                rt.block_on(async {
                    let tasks: Vec<_> = (0..appenders)
                        .map(|_| {
                            tokio::spawn(deploy_loop(
                                control.clone(),
                                Arc::clone(&targets),
                                Arc::clone(&modules),
                                Arc::clone(&next),
                                end,
                                Arc::clone(&failed),
                            ))
                        })
                        .collect();
                    for task in tasks {
                        task.await.expect("an appender does not panic");
                    }
                });
                let elapsed = started.elapsed();
                next.store(end, Ordering::Relaxed);
                active += elapsed;
                elapsed
            });
        });
        if let Some((dir, control)) = node.take() {
            let (p50, p99) = sync_latency(dir.path());
            eprintln!(
                "append_durable/deploy/{appenders}: {} events committed in total, {} deploys appended nothing; {}; \
                 after the run, fdatasync p50 {p50:?}, p99 {p99:?}",
                control.head(),
                failed.load(Ordering::Relaxed),
                stats.report(active),
            );
            rt.block_on(control.close());
            drop(control);
            drop(dir);
        }
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// 2. Rebuilding the state from 1,000,000 events, and from a snapshot; a backup of them.
// ---------------------------------------------------------------------------------------------

const DATASET_EVENTS: u64 = 1_000_000;
const DATASET_TENANTS: usize = 500;
const DATASET_SERVICES_PER_TENANT: usize = 40;
const DATASET_SLOTS: usize = DATASET_TENANTS * DATASET_SERVICES_PER_TENANT;
/// Services with an episode (deploy … stop) in flight at any moment.
const DATASET_CURSORS: usize = 2_000;
const DATASET_MODULES: usize = 64;
/// Events per write transaction while building the data set.
const DATASET_BATCH: usize = 4_096;
/// One event every this many milliseconds: a million events span a little over a day, so
/// idempotency keys (remembered for 24 h) expire during replay as they would on a real node.
const DATASET_EVENT_SPACING_MS: u64 = 100;

/// A data directory holding the million events and a snapshot at its head, built once and
/// shared by the rebuild benchmarks. The log is dropped before its directory.
struct Dataset {
    log: EventLog,
    head: u64,
    settings: Settings,
    _dir: TempDir,
}

/// xorshift64*: deterministic, so every run builds the same data set.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What the generator knows of one service id.
struct Slot {
    tenant: String,
    service_id: String,
    version: u64,
}

/// An idempotency key on a quarter of the commands, as clients that retry send them.
fn idempotency_key(rng: &mut Rng, keys: &mut u64) -> String {
    if rng.chance(25) {
        *keys += 1;
        format!("req-{keys:08x}")
    } else {
        String::new()
    }
}

/// What an episode needs besides the slot: the module hashes, the limits, the key counter.
struct EpisodeContext<'a> {
    modules: &'a [String],
    limits: Limits,
    keys: u64,
}

/// A deploy of the slot's next version, its start, and the crashes its restart policy recovers
/// from, as (kind, by the tenant?).
fn deploy_events(rng: &mut Rng, slot: &mut Slot, cx: &mut EpisodeContext<'_>, kinds: &mut Vec<(Kind, bool)>) {
    slot.version += 1;
    let mut labels = BTreeMap::new();
    labels.insert("app".to_string(), slot.service_id.clone());
    labels.insert(
        "env".to_string(),
        if rng.chance(70) { "prod" } else { "dev" }.to_string(),
    );
    let module = rng.below(cx.modules.len() as u64) as usize;
    let idempotency_key = idempotency_key(rng, &mut cx.keys);
    kinds.push((
        Kind::ServiceDeployed(proto::ServiceDeployed {
            module_sha256: cx.modules[module].clone(),
            version: slot.version,
            limits: Some(cx.limits),
            labels,
            // A keyed deploy keeps the limits as requested: here, every default.
            requested_limits: (!idempotency_key.is_empty()).then(Limits::default),
            idempotency_key,
            module_size: 2048,
            expected_version: None,
        }),
        true,
    ));
    kinds.push((
        Kind::ServiceStarted(proto::ServiceStarted {
            version: slot.version,
            recovered: false,
        }),
        false,
    ));
    for restarts in 1..=rng.below(4) as u32 {
        kinds.push((crash(rng, slot.version, true), false));
        kinds.push((
            Kind::ServiceRestarted(proto::ServiceRestarted {
                version: slot.version,
                restarts,
            }),
            false,
        ));
    }
}

/// The events of one service's life, from a deploy to its stop, as (kind, by the tenant?).
fn episode(rng: &mut Rng, slot: &mut Slot, cx: &mut EpisodeContext<'_>) -> Vec<(Kind, bool)> {
    let mut kinds = Vec::with_capacity(16);
    deploy_events(rng, slot, cx, &mut kinds);
    if rng.chance(20) {
        deploy_events(rng, slot, cx, &mut kinds); // an upgrade
    }
    if rng.chance(10) {
        kinds.push((crash(rng, slot.version, false), false)); // down for good
    }
    kinds.push((
        Kind::ServiceKillRequested(proto::ServiceKillRequested {
            force: rng.chance(10),
            grace_ms: 5_000,
            idempotency_key: idempotency_key(rng, &mut cx.keys),
            expected_version: None,
            requested_grace_ms: None,
        }),
        true,
    ));
    kinds.push((
        Kind::ServiceStopped(proto::ServiceStopped {
            version: slot.version,
            reason: StopReason::Killed as i32,
            ..Default::default()
        }),
        false,
    ));
    kinds
}

fn crash(rng: &mut Rng, version: u64, restarting: bool) -> Kind {
    let (reason, trap_code, message) = match rng.below(3) {
        0 => (
            CrashReason::Trap,
            "unreachable",
            "wasm trap: wasm `unreachable` instruction executed",
        ),
        1 => (CrashReason::CpuLimit, "", "the call ran past its CPU budget of 1000 ms"),
        _ => (CrashReason::MemoryLimit, "", "the guest hit its memory limit of 64 MiB"),
    };
    Kind::ServiceCrashed(proto::ServiceCrashed {
        version,
        reason: reason as i32,
        trap_code: trap_code.into(),
        message: message.into(),
        restarting,
    })
}

fn build_dataset() -> Dataset {
    let started = Instant::now();
    let dir = tempdir();
    let log = EventLog::open(dir.path(), &log_options()).expect("the log opens");
    let settings = Settings::default();
    let limits = TenantLimits::default()
        .resolve(&Limits::default())
        .expect("the defaults resolve");
    let module_bytes: Vec<Vec<u8>> = (0..DATASET_MODULES)
        .map(|m| {
            let mut bytes = TINY_MODULE.to_vec();
            bytes.resize(2048, m as u8);
            bytes
        })
        .collect();
    let module_hashes: Vec<[u8; 32]> = module_bytes
        .iter()
        .map(|bytes| {
            use sha2::Digest as _;
            sha2::Sha256::digest(bytes).into()
        })
        .collect();
    let modules: Vec<String> = module_hashes.iter().map(hex::encode).collect();
    let blobs: Vec<BlobRef<'_>> = module_hashes
        .iter()
        .zip(&module_bytes)
        .map(|(sha256, bytes)| BlobRef { sha256, bytes })
        .collect();

    let mut slots: Vec<Slot> = (0..DATASET_SLOTS)
        .map(|i| Slot {
            tenant: format!("tenant-{:03}", i % DATASET_TENANTS),
            service_id: format!("svc-{:05}", i / DATASET_TENANTS),
            version: 0,
        })
        .collect();
    // Cursor c owns the slots c, c + CURSORS, c + 2 * CURSORS, …, and lives their episodes one
    // after the other; cursors are interleaved at random.
    let mut cursors: Vec<(usize, std::vec::IntoIter<(Kind, bool)>)> =
        (0..DATASET_CURSORS).map(|c| (c, Vec::new().into_iter())).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut cx = EpisodeContext {
        modules: &modules,
        limits,
        keys: 0,
    };
    let mut state = State::new(settings);
    let base_ms = 1_750_000_000_000;
    let mut counts: HashMap<&'static str, u64> = HashMap::new();
    let mut batch = Batch::with_capacity(DATASET_BATCH);
    let mut first_batch = true;
    for seq in 1..=DATASET_EVENTS {
        let c = rng.below(DATASET_CURSORS as u64) as usize;
        let (slot_index, pending) = &mut cursors[c];
        let (kind, by_tenant) = match pending.next() {
            Some(next) => next,
            None => {
                *slot_index = (*slot_index + DATASET_CURSORS) % DATASET_SLOTS;
                let mut fresh = episode(&mut rng, &mut slots[*slot_index], &mut cx).into_iter();
                let next = fresh.next().expect("an episode has events");
                *pending = fresh;
                next
            }
        };
        let slot = &slots[*slot_index];
        *counts.entry(solo::event::EventKind::of(&kind).as_str()).or_default() += 1;
        let actor = if by_tenant {
            format!("tenant:{}", slot.tenant)
        } else {
            "node".to_string()
        };
        let mut event = envelope(&slot.tenant, &slot.service_id, &actor, kind);
        event.seq = seq;
        event.timestamp_ms = base_ms + seq * DATASET_EVENT_SPACING_MS;
        state.apply(&event).expect("the generator writes events that apply");
        batch.push(Arc::new(event));
        if batch.len() == DATASET_BATCH || seq == DATASET_EVENTS {
            let put: &[BlobRef<'_>] = if first_batch { &blobs } else { &[] };
            let changes = BlobChanges { put, delete: &[] };
            log.append(&batch, changes, Default::default())
                .expect("the data set is written");
            log.publish(batch.records(), &mut Vec::new());
            batch.clear();
            first_batch = false;
        }
    }
    let head = log.head();
    let snapshot = frame::encode_with(|out| state.encode_snapshot(out));
    log.store()
        .put_snapshot(head, &snapshot, 2)
        .expect("the snapshot is written");
    let stats = log.store().stats().expect("stats");
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort();
    let active = state.services().filter(|s| s.is_active()).count();
    eprintln!(
        "data set: {head} events ({counts:?}), {} services in {} tenants ({active} active), {} idempotency keys \
         remembered, data.mdb {} MiB, snapshot {} KiB; built in {:.1?}",
        state.services().count(),
        state.tenants().count(),
        state.to_snapshot().idempotency.len(),
        stats.file_bytes >> 20,
        snapshot.len() >> 10,
        started.elapsed()
    );
    Dataset {
        log,
        head,
        settings,
        _dir: dir,
    }
}

fn bench_rebuild(c: &mut Criterion) {
    // Built by whichever benchmark runs first (none, if both are filtered out), and removed when
    // this function returns.
    let mut dataset: Option<Dataset> = None;
    let mut group = c.benchmark_group("rebuild");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    // A rebuilt state is dropped outside the timed part, as recovery keeps it.
    group.bench_function("load_snapshot_at_head", |b| {
        let data = &*dataset.get_or_insert_with(build_dataset);
        let store = data.log.store();
        b.iter_batched(
            || (),
            |()| {
                let mut state = load_snapshot(store, data.settings, data.head).expect("the snapshot loads");
                // Then the events after the snapshot: none, as it was taken at the head.
                let from = state.applied_seq() + 1;
                replay(store, &mut state, from, data.head).expect("nothing to replay");
                state
            },
            BatchSize::PerIteration,
        );
    });
    // The walk of every page in use that a node does as it opens its data directory, before
    // LMDB reads a tree (the store's open refuses damaged pages with it).
    group.bench_function(BenchmarkId::new("page_walk_at_open", DATASET_EVENTS), |b| {
        let data = &*dataset.get_or_insert_with(build_dataset);
        let view = data.log.store().read_view().expect("a read view");
        b.iter(|| assert!(view.page_damage().expect("the pages walk").is_none()));
    });
    group
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(DATASET_EVENTS));
    group.bench_function(BenchmarkId::new("replay_from_empty", DATASET_EVENTS), |b| {
        let data = &*dataset.get_or_insert_with(build_dataset);
        let store = data.log.store();
        b.iter_batched(
            || State::new(data.settings),
            |mut state| {
                let skipped = replay(store, &mut state, 1, data.head).expect("the log replays");
                (state, skipped)
            },
            BatchSize::PerIteration,
        );
    });
    // `solo log backup`: LMDB's compacting copy of the whole store, made durable, then verified
    // as `solo log verify` would (the page walk, every record, the replay, the blobs).
    group.bench_function(BenchmarkId::new("backup_and_verify", DATASET_EVENTS), |b| {
        let data = &*dataset.get_or_insert_with(build_dataset);
        let store_options = log_options().store;
        b.iter_batched(
            tempdir,
            |dest| {
                let report = solo::inspect::backup(data.log.store(), dest.path(), &store_options, data.settings)
                    .expect("the backup is written");
                assert!(report.kept(), "{}", report.verified.summary());
                dest
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// 3. Tail: commit-to-delivery latency.
// ---------------------------------------------------------------------------------------------

const TAILERS: [usize; 2] = [1, 1_000];

/// Latencies in 1 µs buckets up to one second; slower ones are counted apart.
struct Histogram {
    buckets: Vec<u64>,
    over: u64,
    total: u64,
    max_ns: u64,
    /// Time the appender spent in `Log::publish` (waking the tailers), and how many calls.
    publish: Duration,
    publishes: u32,
}

impl Histogram {
    const BUCKETS: usize = 1_000_000;

    fn new() -> Histogram {
        Histogram {
            buckets: vec![0; Histogram::BUCKETS],
            over: 0,
            total: 0,
            max_ns: 0,
            publish: Duration::ZERO,
            publishes: 0,
        }
    }

    fn record(&mut self, ns: u64) {
        match self.buckets.get_mut((ns / 1_000) as usize) {
            Some(bucket) => *bucket += 1,
            None => self.over += 1,
        }
        self.total += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    /// The latency (upper edge of its bucket) under which `quantile` of the samples fall.
    fn quantile(&self, quantile: f64) -> Duration {
        let rank = ((self.total as f64 * quantile).ceil() as u64).max(1);
        let mut seen = 0;
        for (us, count) in self.buckets.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Duration::from_micros(us as u64 + 1);
            }
        }
        Duration::from_nanos(self.max_ns)
    }
}

/// An event of the size a deploy writes.
fn tail_event(seq: u64) -> Arc<Event> {
    let mut event = envelope(
        "acme",
        format!("svc-{seq}"),
        "tenant:acme",
        Kind::ServiceDeployed(proto::ServiceDeployed {
            module_sha256: "ab".repeat(32),
            version: 1,
            limits: Some(
                TenantLimits::default()
                    .resolve(&Limits::default())
                    .expect("the defaults resolve"),
            ),
            labels: BTreeMap::new(),
            requested_limits: None,
            idempotency_key: String::new(),
            module_size: 2048,
            expected_version: None,
        }),
    );
    event.seq = seq;
    event.timestamp_ms = 1_750_000_000_000 + seq;
    Arc::new(event)
}

/// Starts `tailers` tails at the next seq, then commits `events` events, one durable commit
/// each, back to back, publishing each to tailers once durable (as the control writer does).
/// Every delivery's latency — from the moment `append` returned (the event is durable, not yet
/// published) to the moment the tailer's task holds the event — goes into `histogram`. Returns
/// the time from the first commit to the last delivery.
fn tail_round(rt: &Runtime, log: &EventLog, tailers: usize, events: u64, histogram: &mut Histogram) -> Duration {
    let from = log.head() + 1;
    let last = from + events - 1;
    let base = Instant::now();
    let ready = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..tailers)
        .map(|_| {
            let stream = log.tail(from);
            let ready = Arc::clone(&ready);
            rt.spawn(async move {
                let mut stream = std::pin::pin!(stream);
                let mut delivered = Vec::with_capacity(events as usize);
                ready.fetch_add(1, Ordering::Release);
                while let Some(item) = stream.next().await {
                    let Ok(event) = item else { break };
                    delivered.push(base.elapsed().as_nanos() as u64);
                    if event.seq >= last {
                        break;
                    }
                }
                delivered
            })
        })
        .collect();
    while ready.load(Ordering::Acquire) < tailers {
        std::thread::sleep(Duration::from_micros(100));
    }
    // Let every tailer reach its wait on the head.
    std::thread::sleep(Duration::from_millis(2));

    let mut committed = Vec::with_capacity(events as usize);
    let started = Instant::now();
    for seq in from..=last {
        let records: Batch<Event> = std::iter::once(tail_event(seq)).collect();
        log.append(&records, Default::default(), Default::default())
            .expect("the append commits");
        committed.push(base.elapsed().as_nanos() as u64);
        let publishing = Instant::now();
        log.publish(records.records(), &mut Vec::new());
        histogram.publish += publishing.elapsed();
        histogram.publishes += 1;
    }
    for task in tasks {
        let delivered = rt.block_on(task).expect("a tailer does not panic");
        for (at, commit) in delivered.iter().zip(&committed) {
            histogram.record(at.saturating_sub(*commit));
        }
    }
    started.elapsed()
}

fn bench_tail(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempdir();
    let log = EventLog::open(dir.path(), &log_options()).expect("the log opens");
    let mut group = c.benchmark_group("tail");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for tailers in TAILERS {
        let (p50, p99) = sync_latency(dir.path());
        eprintln!("tail/{tailers} tailers: before the run, fdatasync p50 {p50:?}, p99 {p99:?}");
        let mut histogram = Histogram::new();
        // Criterion's figure is deliveries per second; the latencies are printed below.
        group.throughput(Throughput::Elements(tailers as u64));
        group.bench_with_input(BenchmarkId::new("deliveries", tailers), &tailers, |b, &tailers| {
            b.iter_custom(|events| tail_round(&rt, &log, tailers, events, &mut histogram));
        });
        eprintln!(
            "tail/{tailers} tailers: commit-to-delivery latency over {} deliveries: p50 {:?}, p99 {:?}, p99.9 {:?}, \
             max {:?} ({} over 1 s); Log::publish took {:?} on average on the appender's thread",
            histogram.total,
            histogram.quantile(0.50),
            histogram.quantile(0.99),
            histogram.quantile(0.999),
            Duration::from_nanos(histogram.max_ns),
            histogram.over,
            histogram.publish / histogram.publishes.max(1),
        );
    }
    group.finish();
}

/// History that replays read from disk, and how many replay it at once.
const REPLAY_HISTORY: u64 = 200_000;
const REPLAYS: usize = 200;

/// A durable commit's latency, on a thread of its own as the control writer's, while `REPLAYS`
/// tailers replay the history from disk over and over (as clients reading `/events` from seq
/// 1): with `tail_disk_readers` at 1, the default, the replays take turns at the disk; at
/// `REPLAYS`, each reads at once, on a blocking thread of its own.
fn bench_replays(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("tail");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(1));
    for readers in [1, REPLAYS] {
        let (name, parameter) = (
            format!("commit_beside_{REPLAYS}_replays"),
            format!("{readers}_disk_readers"),
        );
        if !common::selected(&format!("tail/{name}/{parameter}")) {
            continue;
        }
        let id = BenchmarkId::new(&name, &parameter);
        let dir = tempdir();
        let mut options = log_options();
        options.tail_disk_readers = readers;
        let log = EventLog::open(dir.path(), &options).expect("the log opens");
        for start in (1..=REPLAY_HISTORY).step_by(DATASET_BATCH) {
            let end = (start + DATASET_BATCH as u64 - 1).min(REPLAY_HISTORY);
            let batch: Batch<Event> = (start..=end).map(tail_event).collect();
            log.append(&batch, Default::default(), Default::default())
                .expect("the history is written");
            log.publish(batch.records(), &mut Vec::new());
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let replays: Vec<_> = (0..REPLAYS)
            .map(|_| {
                let (log, stop) = (log.clone(), Arc::clone(&stop));
                rt.spawn(async move {
                    let mut replayed = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let mut stream = std::pin::pin!(log.tail(1));
                        while let Some(Ok(event)) = stream.next().await {
                            replayed += 1;
                            if event.seq >= REPLAY_HISTORY || stop.load(Ordering::Relaxed) {
                                break;
                            }
                        }
                    }
                    replayed
                })
            })
            .collect();
        let started = Instant::now();
        let mut latencies = Vec::new();
        group.bench_function(id, |b| {
            b.iter_custom(|commits| {
                let began = Instant::now();
                for _ in 0..commits {
                    let records: Batch<Event> = std::iter::once(tail_event(log.head() + 1)).collect();
                    let commit = Instant::now();
                    log.append(&records, Default::default(), Default::default())
                        .expect("the append commits");
                    log.publish(records.records(), &mut Vec::new());
                    latencies.push(commit.elapsed());
                }
                began.elapsed()
            })
        });
        stop.store(true, Ordering::Relaxed);
        let replayed: u64 = replays
            .into_iter()
            .map(|replay| rt.block_on(replay).expect("a replay does not panic"))
            .sum();
        latencies.sort();
        eprintln!(
            "tail/{name}/{parameter}: {} commits, p50 {:?}, p99 {:?}; replays delivered {:.0} events/s",
            latencies.len(),
            common::percentile(&latencies, 0.5),
            common::percentile(&latencies, 0.99),
            replayed as f64 / started.elapsed().as_secs_f64()
        );
    }
    group.finish();
}

criterion_group!(benches, bench_append, bench_rebuild, bench_tail, bench_replays);
criterion_main!(benches);
