//! The control layer: the one way state changes, and the one place state is read.
//!
//! Commands (deploy, kill, shutdown, and the runtime's observations) go to the single writer
//! thread ([`writer`]), which decides them against the state ([`command::decide`]), appends
//! their events to the log with group commit and answers each caller once its events are
//! durable. Queries read the published state, which only ever holds committed events. At
//! open, the state is rebuilt from the newest valid snapshot plus the events after it.
//!
//! The state is held in four copies, so that nothing waits for a copy to catch up: the
//! writer's working copy, the published one, a spare that a helper thread brings up to date
//! during each commit (`spare`), and the snapshotter's, which follows the committed batches
//! (`snapshotter`).

pub mod command;
mod error;
mod history;
mod noop_keys;
mod recovery;
mod snapshotter;
mod spare;
mod writer;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

pub use command::{
    DeployCommand, DeployOutcome, KillCommand, KillOutcome, MAX_LABELS, Module, NODE_ACTOR, Observation, RemoveCommand,
    RemoveOutcome, StopReport, validate_idempotency_key, validate_labels, validate_service_id, validate_tenant,
};
pub use error::{DEPLOY_QUOTAS, Error, Result};
pub use noop_keys::check_stored as check_stored_request;
pub use recovery::{Recovery, load_snapshot, replay};

use command::{Command, Reply};
use history::HistoryCheck;
use noop_keys::NoOpKeys;
use snapshotter::Snapshotter;
use spare::Spare;
use writer::{CommitFailure, Request, Writer};

use crate::limits::LimitsTable;
use crate::log::{Log, LogOptions, NodeMeta};
use crate::proto::{Event, Limits};
use crate::runtime::{CallError, CompileQuota, LiveStatus, LogBuffer, PrepareError, Runtime};
use crate::state::{Service, Settings, State, Status};

/// Keys of keyed requests that changed nothing, remembered at most (the oldest go first).
const NOOP_KEYS_REMEMBERED: usize = 65_536;

/// The log of Solo's events.
pub type EventLog = Log<Event>;

/// A committed batch's events, shared by the writer and the threads that follow it.
type Events = Arc<[Arc<Event>]>;

/// Applies committed events to a copy of the state, as the writer did when deciding them.
fn apply_committed(state: &mut State, events: &[Arc<Event>]) {
    for event in events {
        if let Err(e) = state.apply(event) {
            tracing::error!(seq = event.seq, error = %e, "committed event does not apply");
            state.skip(event);
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch. Injected so tests can steer time.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    })
}

/// How the writer batches and snapshots.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Most commands decided and committed together.
    pub max_batch: usize,
    /// Commands that may wait for the writer; senders wait beyond it.
    pub queue_capacity: usize,
    /// Write a snapshot every this many events (0: never).
    pub snapshot_every: u64,
    /// Snapshots kept; older ones are deleted.
    pub snapshots_kept: usize,
    /// While the last commit has failed, how often a small commit tries the log again.
    pub write_probe_interval: std::time::Duration,
}

/// While the last commit has failed, asks the writer for a commit of its own every `interval`:
/// the node's health (etcd's NOSPACE alarm, `/health`) then clears once the disk has room
/// again, with no client write to wait for, which a readiness probe keeping clients away
/// would never send. Ends with the writer.
fn probe_writes_while_failing(
    requests: mpsc::WeakSender<Request>,
    commit_failure: Arc<CommitFailure>,
    interval: std::time::Duration,
) {
    let probe = move || {
        loop {
            std::thread::sleep(interval);
            let Some(requests) = requests.upgrade() else { return };
            if commit_failure.current().is_some() {
                // A full queue has commits coming that tell as much.
                let _ = requests.try_send(Request::ProbeWrites);
            }
        }
    };
    if let Err(e) = std::thread::Builder::new().name("solo-write-probe".into()).spawn(probe) {
        tracing::warn!(error = %e, "no thread to probe the log after a failed commit: a full disk's alarm clears with the next write");
    }
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            max_batch: 1024,
            queue_capacity: 16_384,
            snapshot_every: 100_000,
            snapshots_kept: 2,
            write_probe_interval: std::time::Duration::from_secs(2),
        }
    }
}

pub struct ControlOptions {
    pub data_dir: PathBuf,
    pub log: LogOptions,
    pub settings: Settings,
    pub writer: WriterOptions,
    pub limits: LimitsTable,
    pub clock: Clock,
    /// Told of every committed batch and how long its commit took (metrics), before readers
    /// and tailers can see the batch.
    pub on_commit: Option<CommitHook>,
}

/// Receives each committed batch, on the writer thread: keep it quick.
pub type CommitHook = Box<dyn Fn(&[Arc<Event>], Duration) + Send>;

impl std::fmt::Debug for ControlOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlOptions")
            .field("data_dir", &self.data_dir)
            .field("log", &self.log)
            .field("settings", &self.settings)
            .field("writer", &self.writer)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// A deploy as a caller asks for it: limits may be zero (defaults) and are checked here.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    pub tenant: String,
    pub actor: String,
    pub service_id: String,
    pub module: Arc<[u8]>,
    pub limits: Limits,
    pub labels: BTreeMap<String, String>,
    pub idempotency_key: String,
    /// Deploy only if the service is at this version (0: only if it does not exist).
    pub expected_version: Option<u64>,
}

/// The handle every other part uses. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Control {
    shared: Arc<Shared>,
}

struct Shared {
    requests: mpsc::Sender<Request>,
    /// The committed state. A std lock: held only to copy or to apply a batch, never across `.await`.
    state: Arc<RwLock<State>>,
    log: EventLog,
    limits: Arc<LimitsTable>,
    clock: Clock,
    /// The state's, fixed at start.
    deploy_rate_window_ms: u64,
    commit_failure: Arc<CommitFailure>,
    /// The check of the history before the snapshot the node started from.
    history: Arc<HistoryCheck>,
    shutting_down: Arc<AtomicBool>,
    /// The writer's thread, then the snapshotter's and the history check's, joined in that
    /// order at close.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    node: NodeMeta,
    /// The wasm runtime, once attached: it validates modules and serves calls. Without one (as
    /// in tests of the log alone), module bytes are opaque and calls fail.
    runtime: OnceLock<Runtime>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("node", &self.node)
            .field("limits", &self.limits)
            .field("shutting_down", &self.shutting_down)
            .finish_non_exhaustive()
    }
}

impl Control {
    /// Opens the log, rebuilds the state and starts the writer. Blocking: call it from
    /// `spawn_blocking` in async code.
    pub fn open(options: ControlOptions) -> Result<(Control, Recovery), crate::log::Error> {
        let log = EventLog::open(&options.data_dir, &options.log)?;
        let (state, recovery) = recovery::recover(&log, options.settings)?;
        let mut noop_keys = NoOpKeys::new(state.settings().idempotency_window_ms, NOOP_KEYS_REMEMBERED);
        noop_keys.restore(log.store().requests()?, (options.clock)());
        Ok((
            Control::start(log, state, noop_keys, recovery.snapshot_seq.unwrap_or(0), options),
            recovery,
        ))
    }

    fn start(
        log: EventLog,
        state: State,
        noop_keys: NoOpKeys,
        last_snapshot_seq: u64,
        options: ControlOptions,
    ) -> Control {
        let (requests, receiver) = mpsc::channel(options.writer.queue_capacity.max(1));
        let published = Arc::new(RwLock::new(state.clone()));
        let limits = Arc::new(options.limits);
        let shutting_down = Arc::new(AtomicBool::new(false));
        let snapshots = Snapshotter::start(
            log.clone(),
            &state,
            options.writer.snapshot_every,
            options.writer.snapshots_kept,
            last_snapshot_seq,
        );
        let (snapshots, snapshot_thread) = snapshots.unzip();
        // Recovery read and checked every record after the snapshot; the ones before it, here.
        let (history, history_thread) = HistoryCheck::start(log.clone(), last_snapshot_seq);
        let commit_failure = Arc::new(CommitFailure::default());
        let probe_interval = options.writer.write_probe_interval;
        let writer = Writer {
            commit_failure: Arc::clone(&commit_failure),
            noop_keys,
            log: log.clone(),
            spare: Spare::start(state.clone()),
            working: state,
            published: Arc::clone(&published),
            limits: Arc::clone(&limits),
            clock: Arc::clone(&options.clock),
            options: options.writer,
            shutting_down: Arc::clone(&shutting_down),
            shutdown_seq: None,
            snapshots,
            stored_blobs: std::collections::HashSet::new(),
            on_commit: options.on_commit,
            evicted: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("solo-writer".into())
            .spawn(move || writer.run(receiver))
            .expect("the writer thread starts");
        probe_writes_while_failing(requests.downgrade(), Arc::clone(&commit_failure), probe_interval);
        Control {
            shared: Arc::new(Shared {
                requests,
                state: published,
                node: log.store().node().clone(),
                log,
                limits,
                clock: options.clock,
                deploy_rate_window_ms: options.settings.deploy_rate_window_ms,
                commit_failure,
                history,
                shutting_down,
                // The writer first: when it ends, the snapshotter's queue closes.
                threads: Mutex::new(
                    [Some(thread), snapshot_thread, history_thread]
                        .into_iter()
                        .flatten()
                        .collect(),
                ),
                runtime: OnceLock::new(),
            }),
        }
    }

    /// Attaches the runtime that validates modules and serves calls (once).
    pub fn attach_runtime(&self, runtime: Runtime) {
        if self.shared.runtime.set(runtime).is_err() {
            tracing::warn!("a runtime was already attached");
        }
    }

    pub fn runtime(&self) -> Option<&Runtime> {
        self.shared.runtime.get()
    }

    /// A handle for the runtime's observations that does not keep this control layer alive.
    pub fn observer(&self) -> Observer {
        Observer {
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// Stops the writer after the commands already queued; later commands fail with
    /// [`Error::Closed`]. Queries and tails keep working until the last handle is dropped.
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.shared.requests.send(Request::Close { done }).await.is_ok() {
            let _ = closed.await;
        }
        self.shared.history.stop();
        let threads = std::mem::take(&mut *self.shared.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let _ = tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join()))).await;
    }

    async fn submit(&self, command: Command) -> Result<Reply> {
        let (reply, answer) = oneshot::channel();
        self.shared
            .requests
            .send(Request::Command { command, reply })
            .await
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Deploys a module: the first version of a service, an upgrade, or — for the identical
    /// module — a no-op that says so. Answers once the deploy is durable.
    pub async fn deploy(&self, request: DeployRequest) -> Result<DeployOutcome> {
        validate_tenant(&request.tenant)?;
        validate_service_id(&request.service_id)?;
        validate_labels(&request.labels)?;
        validate_idempotency_key(&request.idempotency_key)?;
        let tenant_limits = self.shared.limits.for_tenant(&request.tenant);
        let module_size = request.module.len() as u64;
        if module_size > tenant_limits.max_module_bytes {
            return Err(Error::QuotaExceeded {
                quota: "max_module_bytes",
                limit: tenant_limits.max_module_bytes,
                detail: format!("the module is {module_size} bytes"),
                retry_after: None,
            });
        }
        if request.limits.memory_bytes > tenant_limits.max_memory_bytes() {
            return Err(Error::QuotaExceeded {
                quota: "max_memory_mb",
                limit: tenant_limits.max_memory_mb,
                detail: format!(
                    "the deploy asks for {} of memory",
                    crate::limits::in_mib(request.limits.memory_bytes)
                ),
                retry_after: None,
            });
        }
        let limits = tenant_limits
            .resolve(&request.limits)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        // Early, so a deploy bound to fail costs no compile; the writer decides for good. Not
        // for a keyed deploy, whose retry gets the first answer whatever the version is now.
        if request.idempotency_key.is_empty() {
            let now_ms = (self.shared.clock)();
            self.read_state(|state| {
                command::require_version(state, &request.tenant, &request.service_id, request.expected_version)?;
                command::require_history_room(state, &request.tenant, tenant_limits, now_ms)
            })?;
        }
        let module = match self.runtime() {
            Some(runtime) => {
                let quota = CompileQuota {
                    max: tenant_limits.max_deploys_per_minute,
                    window_ms: self.shared.deploy_rate_window_ms,
                    now_ms: (self.shared.clock)(),
                };
                runtime
                    .prepare(&request.tenant, request.module, limits.memory_bytes, quota)
                    .await
                    .map_err(|e| match e {
                        PrepareError::Invalid(invalid) => Error::InvalidModule(invalid.0),
                        PrepareError::OverCompileQuota {
                            limit,
                            compiled,
                            retry_after,
                        } => Error::QuotaExceeded {
                            quota: "max_deploys_per_minute",
                            limit: limit.into(),
                            detail: format!(
                                "{compiled} modules were compiled for tenant '{}' in the last minute (a \
                                 module still in the compile cache needs no compile)",
                                request.tenant
                            ),
                            retry_after: Some(retry_after),
                        },
                    })?
            }
            None => Module::hashed(request.module).await,
        };
        let command = DeployCommand {
            tenant: request.tenant,
            actor: request.actor,
            service_id: request.service_id,
            module,
            limits,
            requested_limits: request.limits,
            labels: request.labels,
            idempotency_key: request.idempotency_key,
            expected_version: request.expected_version,
        };
        match self.submit(Command::Deploy(command)).await? {
            Reply::Deployed(outcome) => Ok(outcome),
            Reply::Appended(event) => Ok(DeployOutcome::appended(&event)),
            other => unreachable!("deploy answered with {other:?}"),
        }
    }

    /// Removes a stopped service from the registry; its id is free again.
    pub async fn remove(&self, command: RemoveCommand) -> Result<RemoveOutcome> {
        validate_tenant(&command.tenant)?;
        validate_service_id(&command.service_id)?;
        validate_idempotency_key(&command.idempotency_key)?;
        match self.submit(Command::Remove(command)).await? {
            Reply::Removed(outcome) => Ok(outcome),
            Reply::Appended(event) => Ok(RemoveOutcome {
                seq: event.seq,
                replayed: false,
            }),
            other => unreachable!("remove answered with {other:?}"),
        }
    }

    /// Requests that a service stop. Killing a killed service is a no-op that says so.
    pub async fn kill(&self, command: KillCommand) -> Result<KillOutcome> {
        validate_tenant(&command.tenant)?;
        validate_service_id(&command.service_id)?;
        validate_idempotency_key(&command.idempotency_key)?;
        match self.submit(Command::Kill(command)).await? {
            Reply::Killed(outcome) => Ok(outcome),
            Reply::Appended(event) => Ok(KillOutcome {
                seq: event.seq,
                already_stopped: false,
                replayed: false,
            }),
            other => unreachable!("kill answered with {other:?}"),
        }
    }

    /// Records that the node is shutting down; later deploys and kills are refused. Returns
    /// the seq of the `shutdown_requested` event, and whether this request appended it (a
    /// repeat appends nothing: it is answered with the first one's seq).
    pub async fn shutdown(&self, actor: &str, grace_ms: u32) -> Result<(u64, bool)> {
        match self
            .submit(Command::Shutdown {
                actor: actor.to_string(),
                grace_ms,
            })
            .await?
        {
            Reply::Appended(event) => Ok((event.seq, true)),
            Reply::ShuttingDown(seq) => Ok((seq, false)),
            other => unreachable!("shutdown answered with {other:?}"),
        }
    }

    /// Records what the runtime observed, if it still fits the state ([`Error::Stale`] if not).
    pub async fn observe(&self, observation: Observation) -> Result<u64> {
        match self.submit(Command::Observe(observation)).await? {
            Reply::Appended(event) => Ok(event.seq),
            other => unreachable!("observation answered with {other:?}"),
        }
    }

    /// Calls a service of `tenant`: bytes in, bytes out. `timeout` is capped by the service's
    /// call timeout (its default too).
    pub async fn call(
        &self,
        tenant: &str,
        service_id: &str,
        payload: Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>> {
        let (call_timeout_ms, deployed_seq) = self.callable(tenant, service_id)?;
        let limit = Duration::from_millis(call_timeout_ms.into());
        let timeout = timeout.filter(|t| !t.is_zero()).map_or(limit, |t| t.min(limit));
        let runtime = self.runtime().ok_or(Error::Closed)?;
        runtime
            .call(tenant, service_id, payload, timeout, deployed_seq)
            .await
            .map_err(|e| match e {
                // A call the shutdown cut off is worth retrying once the node is back: not a
                // precondition of the service, but the node's unavailability.
                CallError::Stopped { .. } | CallError::NotRunning { .. } if self.is_shutting_down() => {
                    Error::ShuttingDown
                }
                e => Error::Call(e),
            })
    }

    /// Whether `service_id` of `tenant` takes calls now (the refusal [`Control::call`] would
    /// give if not), so an API can refuse a call before it reads the payload.
    pub fn check_callable(&self, tenant: &str, service_id: &str) -> Result<()> {
        self.callable(tenant, service_id).map(|_| ())
    }

    /// A callable service's call timeout and deployed seq. Only what a call needs is read:
    /// this is the data plane's hot path.
    fn callable(&self, tenant: &str, service_id: &str) -> Result<(u32, u64)> {
        validate_tenant(tenant)?;
        validate_service_id(service_id)?;
        self.read_state(|state| {
            let service = state.service(tenant, service_id).ok_or_else(|| Error::NotFound {
                service_id: service_id.to_string(),
            })?;
            // A service stopped by the node's shutdown is coming back with the node, and its
            // calls wait for it as for one starting. One that failed to load is tried again,
            // but says why it failed until it is back.
            let coming_back = service.status == Status::Stopped && service.comes_back_with_the_node();
            if !matches!(service.status, Status::Starting | Status::Running) && !coming_back {
                return Err(Error::NotRunning {
                    service_id: service_id.to_string(),
                    status: service.status,
                    last_error: service.last_error.clone(),
                });
            }
            Ok((service.limits.call_timeout_ms, service.deployed_seq))
        })
    }

    /// Live figures of a service, if the runtime knows it.
    pub fn live(&self, tenant: &str, service_id: &str) -> Option<LiveStatus> {
        self.runtime()?.live(tenant, service_id)
    }

    /// A service's log lines, once the runtime has acted on the log as it is now: a read right
    /// after a deploy's answer finds its log, and the log's writers
    /// ([`LogBuffer::quiet`]) count every start and stop committed before the read.
    pub async fn logs(&self, tenant: &str, service_id: &str) -> Result<Arc<LogBuffer>> {
        self.status(tenant, service_id)?;
        let logs = match self.runtime() {
            Some(runtime) => runtime.logs_once_acted_on(tenant, service_id, self.head()).await,
            None => None,
        };
        logs.ok_or_else(|| Error::NotFound {
            service_id: service_id.to_string(),
        })
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutting_down.load(Ordering::Acquire)
    }

    /// Why the log cannot take writes, if its last commit failed (cleared by the next commit
    /// that succeeds, such as a retried observation's).
    pub fn log_failure(&self) -> Option<String> {
        self.shared.commit_failure.current()
    }

    /// What the check of the history before the snapshot this node started from found
    /// damaged, if anything (it runs as the node starts).
    pub fn history_damage(&self) -> Option<String> {
        self.shared.history.damage().map(str::to_string)
    }

    /// One service of `tenant`.
    pub fn status(&self, tenant: &str, service_id: &str) -> Result<Service> {
        validate_tenant(tenant)?;
        validate_service_id(service_id)?;
        self.read_state(|state| state.service(tenant, service_id).cloned())
            .ok_or_else(|| Error::NotFound {
                service_id: service_id.to_string(),
            })
    }

    /// Services of `tenant`, or of every tenant for `None`, ordered by (tenant, id), as of
    /// one committed state.
    pub fn list(&self, tenant: Option<&str>) -> Listing {
        let (mut services, seq): (Vec<Service>, u64) = self.read_state(|state| {
            let services = match tenant {
                Some(tenant) => state
                    .tenant(tenant)
                    .map(|t| t.services.values().map(|s| (**s).clone()).collect())
                    .unwrap_or_default(),
                None => state.services().cloned().collect(),
            };
            (services, state.applied_seq())
        });
        services.sort_by(|a, b| (&a.tenant, &a.id).cmp(&(&b.tenant, &b.id)));
        Listing { services, seq }
    }

    /// The last seq the state holds. It may run one batch ahead of [`Control::head`]: the
    /// writer publishes the state just before it lets tailers see the batch.
    pub fn applied_seq(&self) -> u64 {
        self.read_state(State::applied_seq)
    }

    /// Runs `f` on the committed state. Keep `f` short: the writer waits for it.
    pub fn read_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.shared.state.read().unwrap_or_else(|poison| poison.into_inner()))
    }

    pub fn limits(&self) -> &LimitsTable {
        &self.shared.limits
    }

    pub fn log(&self) -> &EventLog {
        &self.shared.log
    }

    pub fn head(&self) -> u64 {
        self.shared.log.head()
    }

    pub fn node(&self) -> &NodeMeta {
        &self.shared.node
    }
}

/// Services as of one committed state: every event up to `seq` is in them, none after it,
/// so a watch from `seq + 1` misses no change and repeats none (list-then-watch, as with
/// etcd's revision or Kubernetes' resourceVersion).
#[derive(Debug, Clone)]
pub struct Listing {
    pub services: Vec<Service>,
    pub seq: u64,
}

/// The runtime's way back into the control layer: it records observations and reads the state,
/// without keeping the control layer alive (the control layer owns the runtime).
#[derive(Clone, Debug)]
pub struct Observer {
    shared: Weak<Shared>,
}

impl Observer {
    pub async fn observe(&self, observation: Observation) -> Result<u64> {
        let shared = self.shared.upgrade().ok_or(Error::Closed)?;
        Control { shared }.observe(observation).await
    }

    pub fn service(&self, tenant: &str, service_id: &str) -> Option<Service> {
        let shared = self.shared.upgrade()?;
        Control { shared }.status(tenant, service_id).ok()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The writer owns a clone of the log; wait for it so the environment is really closed
        // when the last handle goes (tests reopen the same directory).
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.requests, closed));
        self.history.stop();
        for thread in std::mem::take(self.threads.get_mut().unwrap_or_else(|p| p.into_inner())) {
            let _ = thread.join();
        }
    }
}
