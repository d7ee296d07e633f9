//! The WebAssembly runtime: wasmtime instances of services, reconciled from the log.
//!
//! It owns one `Engine` (pooling allocator, epoch interruption), a bounded cache of compiled
//! modules (what compiling them may cost is [`compiles`]'s), and one slot per service. A slot is a task that applies, in order, what the log
//! asks of its service — start version N, kill, stop for shutdown — and holds the actor of the
//! current instance ([`actor`]). Guest code runs on a runtime of its own (`solo-guest`
//! threads), never on the threads that serve the APIs and the log. The runtime never changes
//! state itself: what it sees (started, crashed, restarted, stopped) goes to the control layer
//! as observations, and becomes true only once it is in the log.

mod actor;
mod compiles;
mod error;
mod instance;
mod logs;
mod module;
mod recorder;
mod stats;
mod turns;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub use compiles::CompileQuota;
pub use error::{CallError, CallFailure, InvalidModule, PrepareError, StartFailure};
pub use instance::trap_code;
pub use logs::{Level, LogBuffer, LogLimits, LogLine};
pub use module::{EngineOptions, GRANTED_IMPORTS, build_engine};
pub use recorder::RetryOptions;
pub use stats::LiveStatus;

use actor::{Actor, Call, PastRestarts, Ready, Route, RunningActor, Spawned, forced_at_least};
use compiles::{Compiles, SMALL_MODULE_BYTES, is_small};
use instance::{InstanceConfig, InstanceCount};
use module::{Compiler, ModuleCache, Prepared};
use recorder::Recorder;
use stats::LiveStats;
use turns::{GuestTurns, TenantTurns};

use crate::control::{EventLog, Module, Observation, Observer, StopReport};
use crate::proto::{CrashReason, Event, Limits, ServiceRef, StopOutcome, StopReason, event::Kind};
use crate::state::{Service, Status};

/// How long past its grace a shutdown waits for graceful stops (which enforce the grace
/// themselves) before it cuts every one short.
const SHUTDOWN_SLACK: Duration = Duration::from_millis(200);

/// How long shutdown waits for the guest threads to drop their ended tasks. Every instance has
/// stopped by then; this only covers a guest that ignores its deadline.
const GUEST_THREADS_EXIT: Duration = Duration::from_secs(1);

/// Everything the runtime is configured with. Fixed at startup.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    pub engine: EngineOptions,
    /// Threads that run guest code.
    pub guest_threads: usize,
    /// Compiled modules kept, by content hash, and the most compiled code they may hold.
    pub module_cache_entries: usize,
    pub module_cache_bytes: usize,
    /// Large modules compiled at once, all tenants together (small ones: four times as many):
    /// each may take memory in proportion to its largest function and its functions.
    pub compile_threads: usize,
    /// Log lines kept per service, and the rate it may log at.
    pub logs: LogLimits,
    /// The largest response a call may return.
    pub max_response_bytes: usize,
    /// Time an instance may take to start (`solo_init` included).
    pub start_timeout: Duration,
    /// How observations the log could not take are retried.
    pub observation_retry: RetryOptions,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            engine: EngineOptions {
                max_instances: 12_000,
                max_memory_bytes: 256 << 20,
                max_wasm_stack: 512 << 10,
                epoch_tick: Duration::from_millis(2),
                max_function_bytes: 1 << 20,
                max_functions: 50_000,
                max_locals: 4_000_000,
                max_looped_instructions: 32_000_000,
            },
            guest_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            module_cache_entries: 256,
            module_cache_bytes: 1 << 30,
            compile_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            logs: LogLimits {
                lines: 1000,
                bytes: 1 << 20,
                bytes_per_second: 256 << 10,
            },
            max_response_bytes: 16 << 20,
            start_timeout: Duration::from_secs(10),
            observation_retry: RetryOptions::default(),
        }
    }
}

/// A handle to the runtime. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    compiler: Compiler,
    cache: ModuleCache,
    /// What compiles may cost: each tenant's budget and turn, the node's slots.
    compiles: Compiles,
    /// Modules compiled from deploys since the runtime started, refused ones included.
    compiled: std::sync::atomic::AtomicU64,
    /// Modules compiled to start services, the cache lacking them.
    loaded: std::sync::atomic::AtomicU64,
    options: RuntimeOptions,
    /// Takes observations to the log, keeping those it cannot take yet.
    recorder: Arc<Recorder>,
    log: EventLog,
    /// Where guest code runs; owned here so it can be shut down without blocking.
    guest_runtime: Mutex<Option<tokio::runtime::Runtime>>,
    guests: tokio::runtime::Handle,
    /// Who runs guest code next: tenants take turns on the guest threads.
    turns: Arc<GuestTurns>,
    /// Slots by tenant, then by service id (so lookups need no allocation).
    /// Why a std lock: lookups and inserts only, never held across an `.await`.
    slots: Mutex<HashMap<String, HashMap<String, Arc<Slot>>>>,
    reconciler: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// How far the reconciler has acted on the log.
    reconciled: Reconciled,
    /// Services queued by `recover` whose start has not finished.
    recovering: Arc<AtomicUsize>,
    /// Instances alive, those finishing after an upgrade included.
    alive: InstanceCount,
    /// Cancelled once the node is shutting down: starts under way are given up.
    stopping: CancellationToken,
    ticker_stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// One service's place in the runtime.
struct Slot {
    tenant: String,
    service_id: String,
    /// The tenant's place in the rotation of turns on the guest threads, shared by its slots.
    turns: TenantTurns,
    logs: Arc<LogBuffer>,
    stats: Arc<LiveStats>,
    ready: Ready,
    commands: mpsc::UnboundedSender<SlotCommand>,
    /// The newest version a forced kill was asked for (`u64::MAX` once the node's shutdown
    /// grace is over): it cuts short a start or a graceful stop of that version or an older
    /// one under way, which would hold up the slot's commands.
    forced: watch::Sender<u64>,
    /// The newest version deployed, as the reconciler has read the log: the one a kill stops,
    /// and the one a start of an older version under way gives way to.
    deployed: watch::Sender<u64>,
    /// Starts sent to the slot's task and not yet ended (queued or under way): while there are
    /// any, calls that find no instance wait for one rather than fail. Shared with the actors,
    /// whose instance may go down while the next version starts.
    starts: Arc<AtomicUsize>,
}

impl Slot {
    /// Queues a start; calls wait for it from now on.
    fn queue_start(&self, start: SlotCommand) {
        self.starts.fetch_add(1, Ordering::AcqRel);
        self.logs.writer_came();
        self.ready.send_if_modified(|route| match route {
            Route::Down => {
                *route = Route::Pending;
                true
            }
            _ => false,
        });
        if self.commands.send(start).is_err() {
            self.start_ended();
        }
    }

    /// A start was skipped, given up, failed or is up.
    fn start_ended(&self) {
        self.starts.fetch_sub(1, Ordering::AcqRel);
        self.logs.writer_left();
    }

    /// Where calls go while no instance serves: they wait for a start to come, else fail.
    /// Read under the route's lock, so that a start queued meanwhile is never missed.
    fn route_without_instance(&self) -> Route {
        route_without_instance(&self.starts)
    }

    /// No instance serves any more.
    fn take_down(&self) {
        self.ready.send_modify(|route| *route = self.route_without_instance());
    }
}

/// Where calls go while no instance serves, given the starts to come.
fn route_without_instance(starts: &AtomicUsize) -> Route {
    if starts.load(Ordering::Acquire) > 0 {
        Route::Pending
    } else {
        Route::Down
    }
}

/// How far the reconciler has acted on the log: a call waits for it to reach the deploy of
/// the version the state says runs, so a call right after an acknowledged deploy never finds
/// the service unknown to the runtime.
#[derive(Default)]
struct Reconciled {
    seq: AtomicU64,
    /// The reconciler has ended (the node is stopping, or the log could not be read): the seq
    /// moves no more.
    closed: AtomicBool,
    advanced: Notify,
}

impl Reconciled {
    fn advance(&self, seq: u64) {
        self.seq.store(seq, Ordering::Release);
        self.advanced.notify_waiters();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.advanced.notify_waiters();
    }

    fn has_reached(&self, seq: u64) -> bool {
        self.seq.load(Ordering::Acquire) >= seq
    }

    /// Waits until the reconciler has acted on `seq`; false if it ended before.
    async fn reached(&self, seq: u64) -> bool {
        loop {
            let advanced = self.advanced.notified();
            tokio::pin!(advanced);
            advanced.as_mut().enable();
            if self.has_reached(seq) {
                return true;
            }
            if self.closed.load(Ordering::Acquire) {
                return false;
            }
            advanced.await;
        }
    }
}

/// Closes the runtime's [`Reconciled`] when the reconciler's task ends, however it ends.
struct CloseOnExit(std::sync::Weak<Inner>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.reconciled.close();
        }
    }
}

enum SlotCommand {
    Start {
        version: u64,
        module_sha256: String,
        limits: Limits,
        recovered: bool,
        restarts: PastRestarts,
        /// For a service the node brings back: told whether it came back.
        done: Option<RecoveryStart>,
    },
    Kill {
        version: u64,
        force: bool,
        grace: Duration,
    },
    Shutdown {
        grace: Duration,
        done: oneshot::Sender<()>,
    },
}

/// The start of a service that the node brings back: counted in [`Runtime::recovering`] from
/// when it is queued until its instance is up or its start has ended, however it ends
/// (answered, or dropped with its slot's queue), so that no service counts as both running
/// and recovering while its `service_started` waits for its commit.
struct RecoveryStart {
    done: Option<oneshot::Sender<bool>>,
    recovering: Option<Arc<AtomicUsize>>,
}

impl RecoveryStart {
    fn new(recovering: &Arc<AtomicUsize>) -> (RecoveryStart, oneshot::Receiver<bool>) {
        recovering.fetch_add(1, Ordering::Relaxed);
        let (done, answer) = oneshot::channel();
        let start = RecoveryStart {
            done: Some(done),
            recovering: Some(Arc::clone(recovering)),
        };
        (start, answer)
    }

    /// Leaves the count (once).
    fn leave_count(&mut self) {
        if let Some(recovering) = self.recovering.take() {
            recovering.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Leaves the count, then answers whether the service is up with its start on record.
    fn finish(mut self, up: bool) {
        self.leave_count();
        if let Some(done) = self.done.take() {
            let _ = done.send(up);
        }
    }
}

impl Drop for RecoveryStart {
    fn drop(&mut self) {
        self.leave_count();
    }
}

impl Runtime {
    /// Builds the engine and the guest threads. `observer` takes what the runtime sees to the
    /// control layer; `log` supplies module bytes and the events to reconcile.
    pub fn new(options: RuntimeOptions, observer: Observer, log: EventLog) -> anyhow::Result<Runtime> {
        let compiler = Compiler::new(&options.engine)?;
        let guest_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.guest_threads.max(1))
            .thread_name("solo-guest")
            .enable_time()
            .build()?;
        let guests = guest_runtime.handle().clone();
        let turns = GuestTurns::new(options.guest_threads);
        let ticker_stop = Arc::new(AtomicBool::new(false));
        start_epoch_ticker(
            compiler.engine.weak(),
            options.engine.epoch_tick,
            Arc::clone(&ticker_stop),
        )?;
        Ok(Runtime {
            inner: Arc::new(Inner {
                cache: ModuleCache::new(options.module_cache_entries, options.module_cache_bytes),
                compiles: Compiles::new(options.compile_threads),
                compiled: std::sync::atomic::AtomicU64::new(0),
                loaded: std::sync::atomic::AtomicU64::new(0),
                compiler,
                recorder: Recorder::new(observer, options.observation_retry),
                options,
                log,
                guest_runtime: Mutex::new(Some(guest_runtime)),
                guests,
                turns,
                slots: Mutex::new(HashMap::new()),
                reconciler: Mutex::new(None),
                reconciled: Reconciled::default(),
                recovering: Arc::default(),
                alive: InstanceCount::default(),
                stopping: CancellationToken::new(),
                ticker_stop,
            }),
        })
    }

    /// Validates and compiles a module that `tenant` sent for deploy (wasm, or WAT converted to
    /// wasm), and caches it; checks that its memory starts within `memory_bytes`, the service's
    /// limit. A module that must be compiled is charged to the tenant's `quota` first. Returns
    /// the module as it will be stored: wasm bytes and their hash.
    pub async fn prepare(
        &self,
        tenant: &str,
        bytes: Arc<[u8]>,
        memory_bytes: u64,
        quota: CompileQuota,
    ) -> Result<Module, PrepareError> {
        let mut charged = false;
        let module = if bytes.starts_with(module::WASM_MAGIC) {
            Module::hashed(bytes).await
        } else {
            // WAT: converting it is work for a blocking thread and a compile slot, as compiling
            // is, and its hash (for the caches) is known only after it. So text over the size
            // of a small module counts as a compile whatever it holds; other text, quick to
            // convert, counts as one when it is refused, and past the budget is refused as over
            // it (the text of a module compiled before still costs nothing).
            let compiles = self.inner.compiles.of(tenant, quota);
            let _turn = compiles.turn().await;
            let small = bytes.len() <= SMALL_MODULE_BYTES;
            if !small {
                compiles.charge(quota)?;
                charged = true;
            }
            let _slot = self.inner.compiles.slot(small).await;
            match blocking(move || module::to_wasm(&bytes)).await {
                Ok(wasm) => Module::new(wasm.into()),
                Err(refusal) => {
                    if small {
                        compiles.charge(quota)?;
                    }
                    return Err(refusal.into());
                }
            }
        };
        let sha256 = module.sha256;
        let key = (tenant.to_string(), sha256);
        if let Some(reason) = self.inner.cache.refusal(&key) {
            return Err(InvalidModule(reason).into());
        }
        // The common case, a module already compiled, needs no blocking thread at all.
        let (inner, bytes) = (Arc::clone(&self.inner), Arc::clone(&module.bytes));
        let refused = key.clone();
        let compile = async move {
            let compiles = inner.compiles.of(&refused.0, quota);
            let _turn = compiles.turn().await;
            // Refused while this caller waited for its turn: by the same module sent at once.
            if let Some(reason) = inner.cache.refusal(&refused) {
                return Err(PrepareError::Invalid(InvalidModule(reason)));
            }
            if !charged {
                compiles.charge(quota)?;
            }
            let _slot = inner.compiles.slot(is_small(&bytes)).await;
            inner.compiled.fetch_add(1, Ordering::Relaxed);
            let compiler = Arc::clone(&inner);
            let compiled = blocking(move || module::prepare(&compiler.compiler, sha256, &bytes)).await;
            if let Err(refusal) = &compiled {
                inner.cache.remember_refusal(refused, &refusal.0);
            }
            compiled.map_err(PrepareError::Invalid)
        };
        let prepared = match self.inner.cache.get(&key) {
            Some(prepared) => prepared,
            None => {
                // A task of its own: a compile outlasts a caller that gave up (a request timed
                // out), and its module is cached for the retry rather than thrown away.
                let inner = Arc::clone(&self.inner);
                tokio::spawn(async move { inner.cache.get_or_prepare(key, compile).await })
                    .await
                    .map_err(|e| InvalidModule(format!("compiling the module failed: {e}")))??
            }
        };
        if prepared.min_memory_bytes > memory_bytes {
            return Err(InvalidModule(format!(
                "the module's memory starts at {} bytes, over the service's memory limit of {memory_bytes} \
                 bytes; ask for more memory_bytes, or lower the module's minimum",
                prepared.min_memory_bytes
            ))
            .into());
        }
        Ok(module)
    }

    /// Modules in the compile cache.
    pub fn cached_modules(&self) -> usize {
        self.inner.cache.len()
    }

    /// Modules compiled for deploys since the runtime started, refused ones included.
    pub fn modules_compiled(&self) -> u64 {
        self.inner.compiled.load(Ordering::Relaxed)
    }

    /// Modules compiled to start services (after a restart, or once evicted from the cache)
    /// since the runtime started.
    pub fn modules_loaded(&self) -> u64 {
        self.inner.loaded.load(Ordering::Relaxed)
    }

    /// Brings back, after replay, every service that should run, and records what came back
    /// in one `node_started` event. A service that fails to come back gets a `service_crashed`
    /// event.
    ///
    /// The starts are queued at once, ahead of anything a deploy or kill queues later, so the
    /// node can serve while they run: the returned future waits for them (modules may take
    /// long to compile) and records `node_started`, naming the services whose start is on
    /// record. A node shut down meanwhile gives up the starts under way and records no
    /// `node_started`: it never finished starting. Killed versions that a deploy replaced while
    /// they stopped, whose instances went down with the node, have their stops recorded first.
    /// Call it before [`Runtime::start_reconciler`],
    /// so that every service has its slot before the log asks anything of it.
    pub fn recover(
        &self,
        services: Vec<Service>,
        replayed_to_seq: u64,
    ) -> impl Future<Output = Vec<ServiceRef>> + Send + 'static {
        let mut starting = Vec::new();
        for service in services {
            let slot = self.inner.slot(&service.tenant, &service.id);
            slot.deployed.send_replace(service.version);
            // Killed versions replaced while they stopped, whose instances went down with the
            // node: their stops are recorded before the current version starts.
            for replaced in &service.replaced_while_stopping {
                let _ = slot.commands.send(SlotCommand::Kill {
                    version: replaced.version,
                    force: true,
                    grace: Duration::ZERO,
                });
            }
            if service.comes_back_with_the_node() {
                let (done, started) = RecoveryStart::new(&self.inner.recovering);
                slot.queue_start(SlotCommand::Start {
                    version: service.version,
                    module_sha256: service.module_sha256.clone(),
                    limits: service.limits,
                    recovered: true,
                    restarts: PastRestarts {
                        count: service.restarts,
                        times_ms: service.restart_times_ms.clone(),
                    },
                    done: Some(done),
                });
                starting.push((
                    ServiceRef {
                        tenant: service.tenant,
                        service_id: service.id,
                    },
                    started,
                ));
            } else if service.status == Status::Stopping {
                // A kill was under way when the node went down; no instance is left to stop.
                let _ = slot.commands.send(SlotCommand::Kill {
                    version: service.version,
                    force: true,
                    grace: Duration::ZERO,
                });
            }
        }
        let inner = Arc::clone(&self.inner);
        async move {
            let starts = starting
                .into_iter()
                .map(|(service, started)| async move { started.await.unwrap_or(false).then_some(service) });
            let recovered: Vec<ServiceRef> = futures_util::future::join_all(starts)
                .await
                .into_iter()
                .flatten()
                .collect();
            if inner.stopping.is_cancelled() {
                // Stopped before it had started: the next start brings the services back.
                return recovered;
            }
            let node_started = Observation::NodeStarted {
                version: crate::VERSION.to_string(),
                node_id: inner.log.store().node().node_id.clone(),
                recovered: recovered.clone(),
                replayed_to_seq,
            };
            inner.recorder.record(node_started).await;
            recovered
        }
    }

    /// Services the node is still bringing back after it started.
    pub fn recovering(&self) -> usize {
        self.inner.recovering.load(Ordering::Relaxed)
    }

    /// Follows the log from `from_seq` and carries out deploys and kills.
    pub fn start_reconciler(&self, from_seq: u64) {
        let weak = Arc::downgrade(&self.inner);
        let mut events = Box::pin(self.inner.log.tail_without_turns(from_seq));
        self.inner.reconciled.advance(from_seq.saturating_sub(1));
        let task = tokio::spawn(async move {
            let _closing = CloseOnExit(weak.clone());
            while let Some(event) = events.next().await {
                let Some(inner) = weak.upgrade() else { return };
                match event {
                    Ok(event) => {
                        inner.reconcile(&event);
                        inner.reconciled.advance(event.seq);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the runtime cannot follow the log");
                        return;
                    }
                }
            }
        });
        *self.inner.reconciler.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    /// Calls a service: bytes in, bytes out, within `timeout` (queueing included), once the
    /// runtime has acted on the log up to `deployed_seq` (the deploy of the version the caller
    /// expects to run).
    pub async fn call(
        &self,
        tenant: &str,
        service_id: &str,
        payload: Vec<u8>,
        timeout: Duration,
        deployed_seq: u64,
    ) -> Result<Vec<u8>, CallError> {
        let not_running = || CallError::NotRunning {
            service_id: service_id.to_string(),
        };
        let deadline = Instant::now() + timeout;
        let reconciled = &self.inner.reconciled;
        if !reconciled.has_reached(deployed_seq) {
            match tokio::time::timeout_at(deadline.into(), reconciled.reached(deployed_seq)).await {
                Ok(true) => {}
                Ok(false) => return Err(not_running()),
                Err(_) => return Err(timed_out(service_id, timeout)),
            }
        }
        let slot = self.inner.find(tenant, service_id).ok_or_else(not_running)?;
        let mut ready = slot.ready.subscribe();
        let mut payload = Some(payload);
        // The mailbox of an instance that stopped taking calls (an upgrade replaced it): the
        // call waits for its slot to route elsewhere.
        let mut closed: Option<mpsc::Sender<Call>> = None;
        let reply = loop {
            let routed = |route: &Route| match route {
                Route::Pending => false,
                Route::Up(handle) => closed.as_ref().is_none_or(|c| !c.same_channel(&handle.mailbox)),
                Route::Down => true,
            };
            let waited = tokio::time::timeout_at(deadline.into(), ready.wait_for(routed));
            let handle = match waited.await {
                Err(_) => return Err(timed_out(service_id, timeout)),
                Ok(Err(_)) => return Err(not_running()),
                Ok(Ok(route)) => match &*route {
                    Route::Up(handle) => handle.clone(),
                    Route::Down | Route::Pending => return Err(not_running()),
                },
            };
            let (reply, answer) = oneshot::channel();
            let call = Call {
                payload: payload.take().expect("sent once"),
                deadline,
                reply,
            };
            match handle.mailbox.try_send(call) {
                Ok(()) => break answer,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return Err(CallError::Busy {
                        service_id: service_id.to_string(),
                        capacity: handle.capacity,
                    });
                }
                Err(mpsc::error::TrySendError::Closed(call)) => {
                    payload = Some(call.payload);
                    closed = Some(handle.mailbox);
                }
            }
        };
        match tokio::time::timeout_at(deadline.into(), reply).await {
            Err(_) => Err(timed_out(service_id, timeout)),
            Ok(Err(_)) => Err(CallError::Stopped {
                service_id: service_id.to_string(),
            }),
            Ok(Ok(Ok(response))) => Ok(response),
            Ok(Ok(Err(failure))) => Err(match failure {
                CallFailure::Timeout => timed_out(service_id, timeout),
                CallFailure::Service(message) => CallError::Service {
                    service_id: service_id.to_string(),
                    message,
                },
                CallFailure::ResponseTooLarge { bytes, limit } => CallError::ResponseTooLarge {
                    service_id: service_id.to_string(),
                    bytes,
                    limit,
                },
                CallFailure::Trap {
                    reason,
                    trap_code,
                    message,
                } => CallError::Trapped {
                    service_id: service_id.to_string(),
                    reason,
                    trap_code,
                    message,
                },
            }),
        }
    }

    /// Live figures of a service this node knows.
    pub fn live(&self, tenant: &str, service_id: &str) -> Option<LiveStatus> {
        self.inner.find(tenant, service_id).map(|slot| slot.stats.snapshot())
    }

    /// A service's log buffer, if this node has seen the service, once the runtime has acted
    /// on the log up to `seq` or stopped following it.
    pub async fn logs_once_acted_on(&self, tenant: &str, service_id: &str, seq: u64) -> Option<Arc<LogBuffer>> {
        self.inner.reconciled.reached(seq).await;
        self.inner.find(tenant, service_id).map(|slot| Arc::clone(&slot.logs))
    }

    /// Observations the log could not take yet, waiting for a retry.
    pub fn unrecorded_observations(&self) -> usize {
        self.inner.recorder.backlog_len()
    }

    /// Instances alive: those serving calls, and those an upgrade replaced that are finishing
    /// theirs.
    pub fn live_instances(&self) -> usize {
        self.inner.alive.get()
    }

    /// Instances currently able to take calls.
    pub fn running_instances(&self) -> usize {
        self.inner
            .all_slots()
            .iter()
            .filter(|slot| slot.ready.borrow().is_up())
            .count()
    }

    /// Stops following the log, gives up the starts under way, stops every instance
    /// gracefully within `grace` (each recorded as `service_stopped` with reason
    /// `node_shutdown`), then the guest threads. `grace` bounds it all: a kill under way whose
    /// own grace is longer is cut short with it.
    ///
    /// Returns once the runtime's tasks are gone, and with them their handles on the log, so
    /// the data directory can be opened again at once (a restart within the process).
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.stopping.cancel();
        let reconciler = self.inner.reconciler.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = reconciler {
            task.abort();
            let _ = task.await;
        }
        let slots = self.inner.all_slots();
        let mut stopped = Vec::new();
        for slot in &slots {
            let (done, finished) = oneshot::channel();
            if slot.commands.send(SlotCommand::Shutdown { grace, done }).is_ok() {
                stopped.push(finished);
            }
        }
        let all_stopped = futures_util::future::join_all(stopped);
        tokio::pin!(all_stopped);
        if tokio::time::timeout(grace + SHUTDOWN_SLACK, &mut all_stopped)
            .await
            .is_err()
        {
            for slot in &slots {
                slot.forced.send_replace(u64::MAX);
            }
            all_stopped.await;
        }
        let guest_runtime = self
            .inner
            .guest_runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(guest_runtime) = guest_runtime {
            // The stopped actors' tasks are still ending on the guest threads; a guest stuck
            // past its deadline is left behind after the timeout, as the process exits anyway.
            let _ = tokio::task::spawn_blocking(move || guest_runtime.shutdown_timeout(GUEST_THREADS_EXIT)).await;
        }
    }
}

impl Inner {
    fn find(&self, tenant: &str, service_id: &str) -> Option<Arc<Slot>> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get(tenant)?.get(service_id).cloned()
    }

    fn all_slots(&self) -> Vec<Arc<Slot>> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.values().flat_map(|tenant| tenant.values().cloned()).collect()
    }

    /// The slot of a service, created (with its task) on first use.
    fn slot(self: &Arc<Self>, tenant: &str, service_id: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.get(tenant).and_then(|t| t.get(service_id)) {
            return Arc::clone(slot);
        }
        let (commands, queue) = mpsc::unbounded_channel();
        let turns = slots
            .get(tenant)
            .and_then(|services| services.values().next())
            .map_or_else(|| self.turns.tenant(), |slot| slot.turns.clone());
        let slot = Arc::new(Slot {
            tenant: tenant.to_string(),
            service_id: service_id.to_string(),
            turns,
            logs: Arc::new(LogBuffer::new(tenant, service_id, self.options.logs)),
            stats: Arc::new(LiveStats::default()),
            ready: Arc::new(watch::Sender::new(Route::Pending)),
            commands,
            forced: watch::Sender::new(0),
            deployed: watch::Sender::new(0),
            starts: Arc::new(AtomicUsize::new(0)),
        });
        slots
            .entry(tenant.to_string())
            .or_default()
            .insert(service_id.to_string(), Arc::clone(&slot));
        self.guests
            .spawn(run_slot(Arc::downgrade(self), Arc::clone(&slot), queue));
        slot
    }

    /// Acts on one committed event.
    fn reconcile(self: &Arc<Self>, event: &Event) {
        match &event.kind {
            Some(Kind::ServiceDeployed(deployed)) => {
                let slot = self.slot(&event.tenant, &event.service_id);
                slot.deployed.send_replace(deployed.version);
                slot.queue_start(SlotCommand::Start {
                    version: deployed.version,
                    module_sha256: deployed.module_sha256.clone(),
                    limits: deployed.limits.unwrap_or_default(),
                    recovered: false,
                    restarts: PastRestarts::default(),
                    done: None,
                });
            }
            Some(Kind::ServiceKillRequested(kill)) => {
                // Every service has a slot (from its deploy, or from `recover`), which knows
                // the version deployed before this event: the state may have moved past it.
                let Some(slot) = self.find(&event.tenant, &event.service_id) else {
                    return;
                };
                let version = *slot.deployed.borrow();
                if kill.force {
                    slot.forced.send_if_modified(|forced| {
                        let raised = version > *forced;
                        *forced = (*forced).max(version);
                        raised
                    });
                }
                let grace = Duration::from_millis(kill.grace_ms.into());
                let _ = slot.commands.send(SlotCommand::Kill {
                    version,
                    force: kill.force,
                    grace,
                });
            }
            Some(Kind::ServiceRemoved(_)) => self.remove_slot(&event.tenant, &event.service_id),
            // Nothing starts once the node is shutting down: its services come back with it.
            Some(Kind::ShutdownRequested(_)) => self.stopping.cancel(),
            _ => {}
        }
    }

    /// Lets a removed service's slot go, and ends its task: a later deploy of the id starts
    /// afresh, its log lines and figures too.
    fn remove_slot(&self, tenant: &str, service_id: &str) {
        let removed = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            let removed = slots.get_mut(tenant).and_then(|t| t.remove(service_id));
            if slots.get(tenant).is_some_and(HashMap::is_empty) {
                slots.remove(tenant);
            }
            removed
        };
        if let Some(slot) = removed {
            slot.logs.end();
            let (done, _) = oneshot::channel();
            let _ = slot.commands.send(SlotCommand::Shutdown {
                grace: Duration::ZERO,
                done,
            });
        }
    }

    /// `tenant`'s compiled module with this hash, from the cache or compiled from the blob store.
    async fn load(self: &Arc<Self>, tenant: &str, module_sha256: &str) -> Result<Prepared, String> {
        let mut sha = [0u8; 32];
        hex::decode_to_slice(module_sha256, &mut sha).map_err(|_| format!("bad module hash '{module_sha256}'"))?;
        let inner = Arc::clone(self);
        let missing = move || format!("module {} is missing from the blob store", hex::encode(sha));
        // The module's bytes, checked against their hash.
        let read = move |inner: Arc<Inner>| async move {
            let bytes = tokio::task::spawn_blocking(move || inner.log.store().blob(&sha))
                .await
                .map_err(|e| format!("cannot read the module: {e}"))?
                .map_err(|e| format!("cannot read the module: {e}"))?
                .ok_or_else(missing)?;
            let check: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&bytes).into();
            if check != sha {
                return Err(format!("module {} is damaged in the blob store", hex::encode(sha)));
            }
            Ok(bytes)
        };
        // Read and compiled only if the cache still lacks it when this caller's turn comes. A
        // module large by its size (in the store) is read once it has its slot; one small by
        // its size is read under a small slot, and may yet prove large by its functions.
        let compile = async move {
            let sized = Arc::clone(&inner);
            let size = tokio::task::spawn_blocking(move || sized.log.store().blob_len(&sha))
                .await
                .map_err(|e| format!("cannot read the module: {e}"))?
                .map_err(|e| format!("cannot read the module: {e}"))?
                .ok_or_else(missing)?;
            let (bytes, _slot) = if size > SMALL_MODULE_BYTES {
                let slot = inner.compiles.slot(false).await;
                (read(Arc::clone(&inner)).await?, slot)
            } else {
                let slot = inner.compiles.slot(true).await;
                let bytes = read(Arc::clone(&inner)).await?;
                if is_small(&bytes) {
                    (bytes, slot)
                } else {
                    drop(slot);
                    (bytes, inner.compiles.slot(false).await)
                }
            };
            inner.loaded.fetch_add(1, Ordering::Relaxed);
            let compiler = Arc::clone(&inner);
            let compile = move || module::prepare(&compiler.compiler, sha, &bytes).map_err(|e| e.to_string());
            tokio::task::spawn_blocking(compile)
                .await
                .map_err(|e| format!("compilation failed: {e}"))?
        };
        self.cache.get_or_prepare((tenant.to_string(), sha), compile).await
    }

    fn instance_config(&self, slot: &Slot, version: u64, limits: Limits) -> InstanceConfig {
        InstanceConfig {
            limits,
            version,
            logs: Arc::clone(&slot.logs),
            tick: self.options.engine.epoch_tick,
            max_response_bytes: self.options.max_response_bytes,
            start_timeout: self.options.start_timeout,
            turns: slot.turns.clone(),
            alive: self.alive.clone(),
        }
    }
}

/// A slot's actors: the one its calls go to, and the one an upgrade last replaced, finishing
/// the calls queued for it.
#[derive(Default)]
struct SlotActors {
    current: Option<RunningActor>,
    replaced: Option<Replaced>,
}

/// A replaced actor on its way out: it serves the calls it had accepted and runs `solo_stop`,
/// within its call timeout (a call under way was allowed that long), and its stop is recorded
/// (`service_stopped`, reason `replaced`).
struct Replaced {
    /// Stops it at once, cutting off the calls it has left.
    cut: CancellationToken,
    stopping: tokio::task::JoinHandle<()>,
}

impl SlotActors {
    /// Drops the actor replaced last, if it is still finishing, before another instance of the
    /// service starts: a storm of upgrades over a busy service holds at most two of its
    /// instances (the current one and the one it replaced), not one per upgrade, each with its
    /// memory.
    async fn make_room(&mut self) {
        if let Some(older) = self.replaced.take() {
            older.cut.cancel();
            let _ = older.stopping.await;
        }
    }

    /// Calls go elsewhere from now on (`next`, or nowhere): the current actor finishes its queue
    /// and stops, and `recorder` records how that went.
    fn replace(&mut self, slot: &Arc<Slot>, next: Option<RunningActor>, recorder: &Arc<Recorder>) {
        let Some(old) = std::mem::replace(&mut self.current, next) else {
            return;
        };
        if let Some(older) = self.replaced.take() {
            older.cut.cancel();
        }
        let cut = CancellationToken::new();
        let (grace, mut forced, cut_short) = (old.call_timeout, slot.forced.subscribe(), cut.clone());
        let (slot, recorder, version) = (Arc::clone(slot), Arc::clone(recorder), old.version);
        let stopping = tokio::spawn(async move {
            let cut_short = async {
                tokio::select! {
                    () = forced_at_least(&mut forced, version) => {}
                    () = cut_short.cancelled() => {}
                }
            };
            let how = old.stop(false, grace, cut_short).await;
            recorder
                .record(stopped(&slot, version, StopReason::Replaced, how))
                .await;
        });
        self.replaced = Some(Replaced { cut, stopping });
    }

    /// Stops both actors as a kill asks: at once with `force`, else within `grace`. Says how
    /// the current one's stop went.
    async fn stop(&mut self, slot: &Slot, force: bool, grace: Duration) -> StopReport {
        let replaced = self.replaced.take().map(|replaced| replaced.stop(force, grace));
        let (report, ()) = tokio::join!(withdraw(slot, self.current.take(), force, grace), async {
            if let Some(replaced) = replaced {
                replaced.await;
            }
        });
        report
    }
}

impl Replaced {
    async fn stop(mut self, force: bool, grace: Duration) {
        if !force && tokio::time::timeout(grace, &mut self.stopping).await.is_ok() {
            return;
        }
        self.cut.cancel();
        let _ = self.stopping.await;
    }
}

/// Applies a slot's commands in order, holding its actors.
async fn run_slot(
    runtime: std::sync::Weak<Inner>,
    slot: Arc<Slot>,
    mut commands: mpsc::UnboundedReceiver<SlotCommand>,
) {
    let mut actors = SlotActors::default();
    let mut queued = std::collections::VecDeque::new();
    loop {
        let command = match queued.pop_front() {
            Some(command) => command,
            None => match commands.recv().await {
                Some(command) => command,
                None => return,
            },
        };
        while let Ok(more) = commands.try_recv() {
            queued.push_back(more);
        }
        // Under a storm of deploys, only the newest version is worth starting: a start that a
        // later start or kill supersedes is skipped (its version never runs).
        if let SlotCommand::Start { done: None, .. } = &command
            && queued
                .iter()
                .any(|c| matches!(c, SlotCommand::Start { .. } | SlotCommand::Kill { .. }))
        {
            slot.start_ended();
            continue;
        }
        let Some(inner) = runtime.upgrade() else { return };
        match command {
            SlotCommand::Start {
                version,
                module_sha256,
                limits,
                recovered,
                restarts,
                mut done,
            } => {
                let started = start(
                    &inner,
                    &slot,
                    &mut actors,
                    version,
                    &module_sha256,
                    limits,
                    recovered,
                    restarts,
                    done.as_mut(),
                )
                .await;
                if let Some(done) = done {
                    done.finish(started);
                }
            }
            SlotCommand::Kill { version, force, grace } => {
                // A follower of the log ends once the stop is on record, not before.
                let _recording = slot.logs.writer();
                let how = actors.stop(&slot, force, grace).await;
                observe(&inner, stopped(&slot, version, StopReason::Killed, how)).await;
            }
            SlotCommand::Shutdown { grace, done } => {
                let alive = actors
                    .current
                    .as_ref()
                    .filter(|actor| !actor.task.is_finished())
                    .map(|actor| actor.version);
                let how = actors.stop(&slot, false, grace).await;
                if let Some(version) = alive {
                    observe(&inner, stopped(&slot, version, StopReason::NodeShutdown, how)).await;
                }
                let _ = done.send(());
                return;
            }
        }
    }
}

/// Starts `version`; on success it takes over from the current actor, which finishes the calls
/// already queued for it and stops ([`SlotActors::replace`]). On failure the current actor is
/// retired the same way: the state no longer says it runs, but the calls it accepted are served. A forced kill of this
/// version, a later deploy or the node stopping gives the start up, `solo_init` under way
/// included, and records nothing: the kill records the stop, the later version starts next,
/// and a stopping node's services come back with its next start. Returns whether the new
/// instance is up and its start on record.
#[allow(clippy::too_many_arguments)]
async fn start(
    inner: &Arc<Inner>,
    slot: &Arc<Slot>,
    actors: &mut SlotActors,
    version: u64,
    module_sha256: &str,
    limits: Limits,
    recovered: bool,
    restarts: PastRestarts,
    recovery: Option<&mut RecoveryStart>,
) -> bool {
    // A follower of the log ends once what this start came to is on record, not before.
    let _recording = slot.logs.writer();
    let crashed = |StartFailure {
                       reason,
                       trap_code,
                       message,
                   }| Observation::Crashed {
        tenant: slot.tenant.clone(),
        service_id: slot.service_id.clone(),
        version,
        reason,
        trap_code,
        message,
        restarting: false,
    };
    // An instance is on its way again: calls that find none wait for it rather than fail.
    slot.ready.send_if_modified(|route| match route {
        Route::Down => {
            *route = Route::Pending;
            true
        }
        _ => false,
    });
    let given_up = || {
        let (mut forced, mut deployed) = (slot.forced.subscribe(), slot.deployed.subscribe());
        async move {
            let superseded = async {
                if deployed.wait_for(|newest| *newest > version).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = inner.stopping.cancelled() => {}
                () = forced_at_least(&mut forced, version) => {}
                () = superseded => {}
            }
        }
    };
    let give_up = |slot: &Slot| {
        slot.start_ended();
        slot.ready.send_if_modified(|route| match route {
            Route::Pending => {
                *route = slot.route_without_instance();
                matches!(route, Route::Down)
            }
            _ => false,
        });
        false
    };
    // Only the compiles under way finish, on their threads: a stopping node keeps to its grace.
    let loaded = tokio::select! {
        biased;
        () = given_up() => None,
        loaded = inner.load(&slot.tenant, module_sha256) => Some(loaded),
    };
    let Some(loaded) = loaded else {
        return give_up(slot);
    };
    let prepared = match loaded {
        Ok(prepared) => prepared,
        Err(message) => {
            tracing::warn!(tenant = %slot.tenant, service = %slot.service_id, version, %message, "module not loaded");
            retire(slot, actors, &inner.recorder);
            observe(inner, crashed(StartFailure::new(CrashReason::LoadFailure, message))).await;
            return false;
        }
    };
    // The instance serves calls as soon as it is up, and its start is recorded meanwhile; what
    // it observes (a crash) waits for that record, so the log never has it first.
    let (record_start, start_recorded) = tokio::sync::watch::channel(false);
    let actor = Actor {
        tenant: slot.tenant.clone(),
        service_id: slot.service_id.clone(),
        prepared,
        config: inner.instance_config(slot, version, limits),
        stats: Arc::clone(&slot.stats),
        recorder: Arc::clone(&inner.recorder),
        ready: Arc::clone(&slot.ready),
        starts: Arc::clone(&slot.starts),
        restarts,
        start_recorded,
        _log_writer: slot.logs.writer(),
    };
    actors.make_room().await;
    match actor.spawn(&inner.guests, given_up()).await {
        Spawned::Up(actor) => {
            // The swap: new calls go to the new instance from here on. The old actor keeps its
            // queue, serves it, and stops once the last sender is gone.
            // Out of the recovering count before it counts as running, never in both.
            if let Some(recovery) = recovery {
                recovery.leave_count();
            }
            slot.ready.send_replace(Route::Up(actor.handle.clone()));
            slot.start_ended();
            actors.replace(slot, Some(actor), &inner.recorder);
            // The last error was an earlier version's, or this one's before it was redeployed.
            slot.stats.set_last_error(String::new());
            let recorded = observe(
                inner,
                Observation::Started {
                    tenant: slot.tenant.clone(),
                    service_id: slot.service_id.clone(),
                    version,
                    recovered,
                },
            )
            .await;
            record_start.send_replace(true);
            recorded
        }
        Spawned::Failed(failure) => {
            tracing::info!(tenant = %slot.tenant, service = %slot.service_id, version, error = %failure, "instance did not start");
            slot.stats.set_last_error(failure.message.clone());
            retire(slot, actors, &inner.recorder);
            observe(inner, crashed(failure)).await;
            false
        }
        Spawned::GivenUp => give_up(slot),
    }
}

/// Ends a start that failed: takes calls away from the slot; its current actor, if any, serves
/// the calls it has accepted and stops, as an upgrade's old actor does.
fn retire(slot: &Arc<Slot>, actors: &mut SlotActors, recorder: &Arc<Recorder>) {
    slot.start_ended();
    slot.take_down();
    actors.replace(slot, None, recorder);
    slot.stats.instance_stopped();
}

/// Takes calls away from the slot and stops `actor`, if any; says how that went, in the
/// service's live figures too (the calls cut off failed; what went wrong is its last error).
async fn withdraw(slot: &Slot, actor: Option<RunningActor>, force: bool, grace: Duration) -> StopReport {
    slot.take_down();
    let report = match actor {
        Some(actor) => {
            let (mut forced, version) = (slot.forced.subscribe(), actor.version);
            actor.stop(force, grace, forced_at_least(&mut forced, version)).await
        }
        None => StopReport {
            outcome: StopOutcome::NotRunning,
            ..StopReport::default()
        },
    };
    slot.stats.instance_stopped();
    slot.stats.calls_cut_off(report.calls_cut_off.into());
    if !report.message.is_empty() {
        slot.stats.set_last_error(report.message.clone());
    }
    report
}

fn stopped(slot: &Slot, version: u64, reason: StopReason, how: StopReport) -> Observation {
    Observation::Stopped {
        tenant: slot.tenant.clone(),
        service_id: slot.service_id.clone(),
        version,
        reason,
        how,
    }
}

/// Records `observation`; false if it was refused (stale).
async fn observe(inner: &Inner, observation: Observation) -> bool {
    inner.recorder.record(observation).await
}

fn timed_out(service_id: &str, timeout: Duration) -> CallError {
    CallError::Timeout {
        service_id: service_id.to_string(),
        timeout_ms: timeout.as_millis() as u64,
    }
}

/// Advances the engine's epoch every `tick`: the clock of CPU deadlines and guest yields.
fn start_epoch_ticker(engine: wasmtime::EngineWeak, tick: Duration, stop: Arc<AtomicBool>) -> std::io::Result<()> {
    std::thread::Builder::new().name("solo-epoch".into()).spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(tick);
            match engine.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
        }
    })?;
    Ok(())
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
        if let Some(guest_runtime) = self.guest_runtime.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            guest_runtime.shutdown_background();
        }
    }
}

/// Runs module work (parsing, compiling) on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, InvalidModule> + Send + 'static,
) -> Result<T, InvalidModule> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| InvalidModule(format!("compilation failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::compiles::{SMALL_COMPILES_PER_SLOT, SMALL_MODULE_FUNCTIONS};
    use super::*;

    /// A runtime over a fresh log in a temp dir (kept alive by the first value), as `tweak`
    /// configures it; no reconciler runs.
    fn runtime_of(
        tweak: impl FnOnce(&mut crate::config::Config),
    ) -> (tempfile::TempDir, crate::control::Control, Runtime) {
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut config = crate::config::Config::default();
        config.solo.data_dir = dir.path().to_path_buf();
        tweak(&mut config);
        let (control, _) = crate::control::Control::open(config.control_options().unwrap()).expect("the log opens");
        let options = config.runtime_options().unwrap();
        let runtime = Runtime::new(options, control.observer(), control.log().clone()).expect("the runtime starts");
        (dir, control, runtime)
    }

    /// A kill stops the version deployed before it in the log, even when the state has moved
    /// on to a later deploy by the time the runtime reads the kill (both in one batch): a
    /// forced kill of version 1 must not cut short a later graceful kill of version 2.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kill_names_the_version_deployed_before_it_in_the_log() {
        use crate::proto::{ServiceDeployed, ServiceKillRequested};
        let (_dir, _control, runtime) = runtime_of(|_| {});
        let event = |seq, kind| Event {
            seq,
            tenant: "acme".into(),
            service_id: "svc".into(),
            kind: Some(kind),
            ..Event::default()
        };
        let deployed = |version| {
            Kind::ServiceDeployed(ServiceDeployed {
                module_sha256: "00".repeat(32),
                version,
                ..ServiceDeployed::default()
            })
        };
        let forced = Kind::ServiceKillRequested(ServiceKillRequested {
            force: true,
            ..ServiceKillRequested::default()
        });
        let inner = &runtime.inner;
        inner.reconcile(&event(1, deployed(1)));
        inner.reconcile(&event(2, forced));
        inner.reconcile(&event(3, deployed(2)));
        let slot = inner.find("acme", "svc").expect("the deploy made a slot");
        assert_eq!(*slot.forced.borrow(), 1, "the forced kill names version 1");
        assert_eq!(*slot.deployed.borrow(), 2);
        runtime.shutdown(Duration::from_secs(1)).await;
    }

    /// A call that waits for the runtime to act on a deploy is told at once once the runtime
    /// will act on nothing more (it stopped), rather than wait out its timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_waiting_for_the_reconciler_end_with_it() {
        let (_dir, _control, runtime) = runtime_of(|_| {});
        runtime.start_reconciler(1);
        let waiting = {
            let runtime = runtime.clone();
            tokio::spawn(async move {
                runtime
                    .call("acme", "svc", Vec::new(), Duration::from_secs(30), 5)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let asked = Instant::now();
        runtime.shutdown(Duration::from_secs(1)).await;
        let answer = waiting.await.unwrap();
        assert!(matches!(answer, Err(CallError::NotRunning { .. })), "{answer:?}");
        assert!(asked.elapsed() < Duration::from_secs(5), "{:?}", asked.elapsed());
    }

    /// A module of about `bytes` bytes, most of them one data segment, and `functions` empty
    /// functions besides its exports.
    fn module_of(bytes: usize, functions: usize) -> Arc<[u8]> {
        let pages = bytes.div_ceil(1 << 16) + 1;
        let wat = format!(
            r#"(module
                (memory (export "memory") {pages})
                (data (i32.const 0) "{}")
                {}
                (func (export "solo_alloc") (param i32) (result i32) i32.const 0)
                (func (export "solo_handle") (param i32 i32) (result i64) i64.const 0))"#,
            "a".repeat(bytes),
            "(func)".repeat(functions)
        );
        module::to_wasm(wat.as_bytes()).expect("the module assembles").into()
    }

    /// With every one of `slots` taken (as by other tenants' compiles), `waiting` waits for
    /// one, and `free` does not.
    async fn only_one_waits<W, F, A, B, E, G>(slots: &tokio::sync::Semaphore, waiting: W, free: F)
    where
        W: Future<Output = Result<A, E>> + Send + 'static,
        F: Future<Output = Result<B, G>>,
        A: Send + 'static,
        E: std::fmt::Debug + Send + 'static,
        G: std::fmt::Debug,
    {
        let all = u32::try_from(slots.available_permits()).unwrap();
        let taken = slots.acquire_many(all).await.unwrap();
        let mut waiting = tokio::spawn(waiting);
        let free = tokio::time::timeout(Duration::from_secs(30), free).await;
        if let Err(e) = free.expect("a module of the other kind compiles without waiting") {
            panic!("the module that need not wait: {e:?}");
        }
        let early = tokio::time::timeout(Duration::from_millis(300), &mut waiting).await;
        assert!(early.is_err(), "a module compiled without a slot of its kind");
        drop(taken);
        let compiled = tokio::time::timeout(Duration::from_secs(30), waiting)
            .await
            .expect("the waiting module compiles once a slot is free")
            .expect("its task ends");
        if let Err(e) = compiled {
            panic!("the waiting module: {e:?}");
        }
    }

    /// Only `compile_threads` large modules (by their bytes or by their functions) compile at
    /// once, and four times as many small ones, the node's tenants together, for deploys and for
    /// starts (after a restart, or once evicted from the cache); neither kind waits for the
    /// other.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compiles_wait_for_a_slot_of_their_kind() {
        let (_dir, control, runtime) = runtime_of(|c| c.runtime.compile_threads = 1);
        let inner = &runtime.inner;
        assert_eq!(inner.compiles.small_slots.available_permits(), SMALL_COMPILES_PER_SLOT);
        let quota = CompileQuota {
            max: 10,
            window_ms: 60_000,
            now_ms: 1_000,
        };

        // Deploys: a module large by its bytes waits for a large slot.
        let large = module_of(SMALL_MODULE_BYTES + 1, 0);
        assert!(!is_small(&large));
        let deploying = runtime.clone();
        let large = async move { deploying.prepare("a", large, 1 << 30, quota).await };
        let small = runtime.prepare("b", module_of(1024, 0), 1 << 30, quota);
        only_one_waits(&inner.compiles.large_slots, large, small).await;
        assert_eq!(runtime.modules_compiled(), 2);

        // Starts, of modules in the blob store that the cache lacks: one large by its functions
        // waits for a large slot; a small one waits for a small slot.
        let modules = [
            module_of(SMALL_MODULE_BYTES + 2, 0),
            module_of(1025, SMALL_MODULE_FUNCTIONS + 1),
            module_of(1026, 0),
            module_of(1027, 0),
        ];
        assert!(modules[1].len() <= SMALL_MODULE_BYTES && !is_small(&modules[1]));
        let shas = modules
            .each_ref()
            .map(|m| <sha2::Sha256 as sha2::Digest>::digest(m).into());
        let stored: Vec<_> = shas
            .iter()
            .zip(&modules)
            .map(|(sha256, bytes)| crate::log::BlobRef { sha256, bytes })
            .collect();
        let blobs = crate::log::BlobChanges {
            put: &stored,
            delete: &[],
        };
        control
            .log()
            .append(&crate::log::Batch::with_capacity(0), blobs, Default::default())
            .expect("the modules are stored");
        let load = |index: usize| {
            let (inner, sha) = (Arc::clone(inner), hex::encode(shas[index]));
            async move { inner.load("acme", &sha).await }
        };
        only_one_waits(&inner.compiles.large_slots, load(1), load(2)).await;
        only_one_waits(&inner.compiles.small_slots, load(3), load(0)).await;
        assert_eq!(runtime.modules_loaded(), 4);

        runtime.shutdown(Duration::ZERO).await;
        control.close().await;
    }
}
