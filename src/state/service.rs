//! One service as the log says it is, and the per-tenant figures quotas are checked against.

use std::collections::{BTreeMap, VecDeque};

pub use compact_str::CompactString;

use crate::proto::{DesiredState, IdempotentOp, Limits, ReplacedVersion, ServiceStatusCode};

/// The maps of the projection: hashbrown with foldhash, which is fast and seeded per map
/// (service ids come from tenants, so the hash must not be predictable). Tenants and services
/// are boxed in them: a bucket then holds a key and a pointer, 32 bytes, and a lookup probes a
/// dense table instead of striding over records of a few hundred bytes. The writer looks up
/// every event's tenant and service in both of its state copies, mostly out of cache.
pub type Map<K, V> = hashbrown::HashMap<K, V>;

/// What should be true of a service: the user's intent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desired {
    Running,
    Stopped,
}

/// What was last observed of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Deployed (or restarting after a crash); no instance has reported in yet.
    Starting,
    Running,
    /// Crashed more often than its restart policy allows; down until redeployed.
    Crashed,
    /// Its `solo_init` failed, or the module could not be loaded; down until redeployed.
    Failed,
    /// A kill was requested; the instance is finishing.
    Stopping,
    Stopped,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Starting,
        Status::Running,
        Status::Crashed,
        Status::Failed,
        Status::Stopping,
        Status::Stopped,
    ];

    /// The lower-case name used by the APIs and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Crashed => "crashed",
            Status::Failed => "failed",
            Status::Stopping => "stopping",
            Status::Stopped => "stopped",
        }
    }

    pub(crate) fn to_proto(self) -> ServiceStatusCode {
        match self {
            Status::Starting => ServiceStatusCode::Starting,
            Status::Running => ServiceStatusCode::Running,
            Status::Crashed => ServiceStatusCode::Crashed,
            Status::Failed => ServiceStatusCode::Failed,
            Status::Stopping => ServiceStatusCode::Stopping,
            Status::Stopped => ServiceStatusCode::Stopped,
        }
    }

    pub(crate) fn from_proto(code: ServiceStatusCode) -> Option<Status> {
        match code {
            ServiceStatusCode::Unspecified => None,
            ServiceStatusCode::Starting => Some(Status::Starting),
            ServiceStatusCode::Running => Some(Status::Running),
            ServiceStatusCode::Crashed => Some(Status::Crashed),
            ServiceStatusCode::Failed => Some(Status::Failed),
            ServiceStatusCode::Stopping => Some(Status::Stopping),
            ServiceStatusCode::Stopped => Some(Status::Stopped),
        }
    }
}

impl std::str::FromStr for Status {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Status::ALL.into_iter().find(|s| s.as_str() == name).ok_or_else(|| {
            format!("unknown status '{name}'; expected one of starting, running, crashed, failed, stopping, stopped")
        })
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Desired {
    pub(crate) fn to_proto(self) -> DesiredState {
        match self {
            Desired::Running => DesiredState::Running,
            Desired::Stopped => DesiredState::Stopped,
        }
    }

    pub(crate) fn from_proto(code: DesiredState) -> Option<Desired> {
        match code {
            DesiredState::Unspecified => None,
            DesiredState::Running => Some(Desired::Running),
            DesiredState::Stopped => Some(Desired::Stopped),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub tenant: String,
    pub id: String,
    /// Lower-case hex SHA-256 of the module, its key in the blob store.
    pub module_sha256: String,
    /// The same hash as bytes (zeros before the first deploy), kept so that counting who runs
    /// each module never parses hex.
    pub module_hash: [u8; 32],
    pub module_size: u64,
    pub version: u64,
    pub limits: Limits,
    pub labels: Labels,
    pub desired: Desired,
    pub status: Status,
    /// Restarts since the current version was deployed.
    pub restarts: u32,
    /// When the current version's latest restarts were recorded (wall clock, at most
    /// `max_restarts` of them, oldest first), so that its restart policy's window holds
    /// across a node restart.
    pub restart_times_ms: Vec<u64>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// The last crash's message; empty once a new version is deployed.
    pub last_error: String,
    /// Seq of the `service_deployed` event of the current version.
    pub deployed_seq: u64,
    /// Seq of the last event about this service.
    pub last_seq: u64,
    /// Seqs of the service's most recent events.
    pub recent_seqs: RecentSeqs,
    /// Killed versions that a deploy replaced while they were still stopping, oldest first:
    /// each is still owed its `service_stopped`, and holds its memory until then (at most
    /// [`MAX_REPLACED_WHILE_STOPPING`]).
    pub replaced_while_stopping: Vec<ReplacedVersion>,
    /// The current version is `failed` because the node could not load its module (over a
    /// node limit lowered since its deploy, missing or damaged in the blob store), not for
    /// anything the module did: the cause is the node's, and the node's next start tries again.
    pub load_failed: bool,
}

/// Killed versions still stopping that a service keeps track of; an older one's stop, should
/// so many kills and redeploys outrun it, is refused as stale.
pub const MAX_REPLACED_WHILE_STOPPING: usize = 16;

/// A service's labels, in key order.
pub type Labels = BTreeMap<String, String>;

/// Events per service whose seqs the projection keeps, for "what happened to it lately".
pub const RECENT_EVENTS: usize = 10;

/// The seqs of a service's newest [`RECENT_EVENTS`] events, oldest first. Held inline, since
/// every event of a service records its seq here and replay should not chase a pointer for it.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecentSeqs {
    seqs: [u64; RECENT_EVENTS],
    len: usize,
}

impl RecentSeqs {
    /// Records the newest seq, forgetting the oldest once full.
    pub fn push(&mut self, seq: u64) {
        if self.len == RECENT_EVENTS {
            self.seqs.copy_within(1.., 0);
            self.seqs[RECENT_EVENTS - 1] = seq;
        } else {
            self.seqs[self.len] = seq;
            self.len += 1;
        }
    }

    pub fn as_slice(&self) -> &[u64] {
        &self.seqs[..self.len]
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = u64> + '_ {
        self.as_slice().iter().copied()
    }
}

impl PartialEq for RecentSeqs {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

/// Keeps the newest [`RECENT_EVENTS`] of `seqs`, given oldest first.
impl FromIterator<u64> for RecentSeqs {
    fn from_iter<I: IntoIterator<Item = u64>>(seqs: I) -> RecentSeqs {
        let mut recent = RecentSeqs::default();
        seqs.into_iter().for_each(|seq| recent.push(seq));
        recent
    }
}

impl Service {
    /// Whether the service should run: everything the user has not killed.
    pub fn is_active(&self) -> bool {
        self.desired == Desired::Running
    }

    /// Whether the service counts against its tenant's quotas: it should run, or it was killed
    /// and is still stopping, as its instance and memory exist until it has stopped.
    pub fn holds_quota(&self) -> bool {
        self.is_active() || self.status == Status::Stopping
    }

    /// The memory this service reserves of its tenant's quota, if it holds quota: its current
    /// version's, or more while a killed version it replaced still stops (a service's versions
    /// run one at a time, so the largest of them is what it may take).
    pub fn held_quota(&self) -> Option<u64> {
        self.holds_quota()
            .then_some(self.limits.memory_bytes.max(self.replaced_memory()))
    }

    /// The memory of this service's killed versions that would still be stopping once another
    /// version is deployed: those it replaced already, and the current one if it is stopping.
    pub fn memory_stopping_past_a_deploy(&self) -> u64 {
        let current = if self.status == Status::Stopping {
            self.limits.memory_bytes
        } else {
            0
        };
        current.max(self.replaced_memory())
    }

    /// The most memory any killed version it replaced, still stopping, reserves.
    fn replaced_memory(&self) -> u64 {
        self.replaced_while_stopping
            .iter()
            .map(|r| r.memory_bytes)
            .max()
            .unwrap_or(0)
    }

    /// Whether `version` is a killed version this service replaced that is still owed its stop.
    pub fn stop_owed_to_replaced(&self, version: u64) -> bool {
        self.replaced_while_stopping.iter().any(|r| r.version == version)
    }

    /// Whether the service may leave the registry: killed, and stopped.
    pub fn is_removable(&self) -> bool {
        self.desired == Desired::Stopped && self.status == Status::Stopped
    }

    /// A new, not yet deployed service, as a first `service_deployed` event creates it.
    pub(crate) fn new(event: &crate::proto::Event, limits: Limits) -> Service {
        Service {
            tenant: event.tenant.clone(),
            id: event.service_id.clone(),
            module_sha256: String::new(),
            module_hash: [0; 32],
            module_size: 0,
            version: 0,
            limits,
            labels: BTreeMap::new(),
            desired: Desired::Stopped,
            status: Status::Stopped,
            restarts: 0,
            restart_times_ms: Vec::new(),
            created_at_ms: event.timestamp_ms,
            updated_at_ms: event.timestamp_ms,
            last_error: String::new(),
            deployed_seq: event.seq,
            last_seq: event.seq,
            recent_seqs: RecentSeqs::default(),
            replaced_while_stopping: Vec::new(),
            load_failed: false,
        }
    }

    /// Records that `event` changed this service.
    pub(crate) fn touched(&mut self, event: &crate::proto::Event) {
        self.updated_at_ms = event.timestamp_ms;
        self.last_seq = event.seq;
        self.recent_seqs.push(event.seq);
    }

    /// Whether a starting node brings this service back: it should run, and it was up (or on
    /// its way up) when the node stopped, or failed only because the node could not load its
    /// module (an operator who raises the limit or heals the blob store and restarts the node
    /// gets it back, as a kubelet retries a pod whose image failed to pull). Services that
    /// crashed, or whose `solo_init` failed, stay down until redeployed.
    pub fn comes_back_with_the_node(&self) -> bool {
        self.desired == Desired::Running
            && (matches!(self.status, Status::Starting | Status::Running | Status::Stopped)
                || (self.status == Status::Failed && self.load_failed))
    }
}

/// A digest of what a keyed request asked for beyond its operation, service and module, so
/// that a retry which changes any of it is refused rather than answered as if applied. It is
/// kept in snapshots, so its encoding is fixed: SHA-256 over the fields in a set order.
pub type RequestHash = [u8; 32];

/// The [`RequestHash`] of a deploy: its limits as requested (as granted, for events from before
/// requests were kept), its labels and the version it required, if any.
pub fn deploy_request_hash(limits: &Limits, labels: &Labels, expected_version: Option<u64>) -> RequestHash {
    use sha2::Digest as _;
    let mut digest = sha2::Sha256::new();
    digest.update(b"deploy");
    let fields = [
        limits.memory_bytes,
        limits.call_timeout_ms.into(),
        limits.cpu_ms_per_call.into(),
        limits.mailbox_capacity.into(),
        limits.max_restarts.into(),
        limits.restart_window_ms.into(),
    ];
    for field in fields {
        digest.update(field.to_le_bytes());
    }
    // Length-prefixed, so no two label sets encode alike; a BTreeMap iterates in key order.
    for (key, value) in labels {
        for text in [key, value] {
            digest.update((text.len() as u64).to_le_bytes());
            digest.update(text.as_bytes());
        }
    }
    // Only when named, so a deploy that names none hashes as it did before the field existed.
    if let Some(version) = expected_version {
        digest.update(b"expected_version");
        digest.update(version.to_le_bytes());
    }
    digest.finalize().into()
}

/// The [`RequestHash`] of a kill: how forcefully, with what grace, and at which version, if
/// it named one.
pub fn kill_request_hash(force: bool, grace_ms: u32, expected_version: Option<u64>) -> RequestHash {
    use sha2::Digest as _;
    let mut digest = sha2::Sha256::new();
    digest.update(b"kill");
    digest.update([u8::from(force)]);
    digest.update(grace_ms.to_le_bytes());
    // Only when named, so a kill that names none hashes as it did before the field existed.
    if let Some(version) = expected_version {
        digest.update(b"expected_version");
        digest.update(version.to_le_bytes());
    }
    digest.finalize().into()
}

/// The [`RequestHash`] of a remove: the version it required, if it named one.
pub fn remove_request_hash(expected_version: Option<u64>) -> RequestHash {
    use sha2::Digest as _;
    let mut digest = sha2::Sha256::new();
    digest.update(b"remove");
    if let Some(version) = expected_version {
        digest.update(b"expected_version");
        digest.update(version.to_le_bytes());
    }
    digest.finalize().into()
}

/// A remembered answer to a command that carried an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub op: IdempotentOp,
    pub service_id: CompactString,
    /// Seq of the event that carried the key.
    pub seq: u64,
    pub version: u64,
    /// SHA-256 of the deployed module; zeros for a kill.
    pub module_hash: [u8; 32],
    /// What else the request asked for ([`deploy_request_hash`], [`kill_request_hash`]);
    /// `None` for a key remembered by a snapshot from before it was kept.
    pub request_hash: Option<RequestHash>,
    pub at_ms: u64,
}

/// Everything of one tenant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tenant {
    pub services: Map<CompactString, Box<Service>>,
    /// Services that hold quota ([`Service::holds_quota`]) and the memory they reserve.
    pub quota_services: u32,
    pub quota_memory_bytes: u64,
    /// Services killed and stopped ([`Service::is_removable`]): what `max_stopped_services`
    /// bounds.
    pub stopped_services: u32,
    /// Deploys within the rate window.
    pub recent_deploys: RateWindow,
    /// Bytes the tenant's events added to the log within the history window.
    pub recent_history_bytes: RateWindow,
    pub idempotency: Map<CompactString, IdempotencyRecord>,
}

/// Counts, in a tenant's `stopped_services`, a service that was removable (`was`) and now is
/// (`is`), or not. (A field, not the tenant: its services are borrowed meanwhile.)
pub(crate) fn count_stopped(stopped_services: &mut u32, was: bool, is: bool) {
    match (was, is) {
        (false, true) => *stopped_services = stopped_services.saturating_add(1),
        (true, false) => *stopped_services = stopped_services.saturating_sub(1),
        _ => {}
    }
}

/// Counts, in a tenant's `quota_services` and `quota_memory_bytes`, a service that held `was`
/// of its quota ([`Service::held_quota`]) and now holds `is`. (Fields, not the tenant: its
/// services are borrowed meanwhile.)
pub(crate) fn count_quota(services: &mut u32, memory: &mut u64, was: Option<u64>, is: Option<u64>) {
    match (was, is) {
        (None, Some(_)) => *services = services.saturating_add(1),
        (Some(_), None) => *services = services.saturating_sub(1),
        _ => {}
    }
    *memory = memory.saturating_sub(was.unwrap_or(0)).saturating_add(is.unwrap_or(0));
}

impl Tenant {
    /// The `count` killed, stopped services whose last events are the oldest, oldest first:
    /// the first to go when the tenant keeps too many.
    pub fn stopped_longest(&self, count: usize) -> Vec<&Service> {
        let mut stopped: Vec<&Service> = self
            .services
            .values()
            .filter(|s| s.is_removable())
            .map(|s| &**s)
            .collect();
        if count < stopped.len() {
            stopped.select_nth_unstable_by_key(count, |s| s.last_seq);
            stopped.truncate(count);
        }
        stopped.sort_unstable_by_key(|s| s.last_seq);
        stopped
    }
}

/// Intervals a rate window is counted in.
pub const WINDOW_INTERVALS: u64 = 60;

/// What a tenant did within a rate window (deploys, or bytes its events added to the log),
/// counted per interval of a sixtieth of the window (one second of the deploy rate's minute,
/// one minute of the history budget's hour), oldest first. Counting per interval keeps the
/// state small however fast a tenant goes. An amount counts until its whole interval has left
/// the window, so a quota errs on the strict side, by less than one interval.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateWindow {
    /// (interval start in ms, amount committed in it), oldest first.
    intervals: VecDeque<(u64, u64)>,
}

impl RateWindow {
    /// Rebuilds a window from its intervals, as [`RateWindow::intervals`] gave them.
    pub fn from_intervals(intervals: impl IntoIterator<Item = (u64, u64)>) -> RateWindow {
        RateWindow {
            intervals: intervals.into_iter().collect(),
        }
    }

    /// (interval start in ms, amount in it), oldest first.
    pub fn intervals(&self) -> impl ExactSizeIterator<Item = (u64, u64)> + '_ {
        self.intervals.iter().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.intervals.is_empty()
    }

    /// Counts one (a deploy) committed at `at_ms`.
    pub fn record(&mut self, at_ms: u64, window_ms: u64) {
        self.add(at_ms, window_ms, 1);
    }

    /// Counts `amount` committed at `at_ms`, first forgetting intervals that left the window.
    pub fn add(&mut self, at_ms: u64, window_ms: u64, amount: u64) {
        let width = interval_ms(window_ms);
        let window_start = at_ms.saturating_sub(window_ms);
        while self
            .intervals
            .front()
            .is_some_and(|&(start, _)| !reaches_past(start, width, window_start))
        {
            self.intervals.pop_front();
        }
        let start = at_ms - at_ms % width;
        match self.intervals.back_mut() {
            // Commit times never go back; should a log say otherwise, the newest interval
            // takes the amount.
            Some((newest, counted)) if *newest >= start => *counted = counted.saturating_add(amount),
            _ => self.intervals.push_back((start, amount)),
        }
    }

    /// The amount in the intervals that reach past `since_ms`: at least all that was
    /// committed after it.
    pub fn since(&self, since_ms: u64, window_ms: u64) -> u64 {
        let width = interval_ms(window_ms);
        self.intervals
            .iter()
            .rev()
            .take_while(|&&(start, _)| reaches_past(start, width, since_ms))
            .fold(0, |sum, &(_, amount)| sum.saturating_add(amount))
    }

    /// The earliest time, at or after `now_ms`, at which less than `max` is counted in the
    /// window ending then: when a tenant at its quota may go on.
    pub fn room_at(&self, now_ms: u64, window_ms: u64, max: u64) -> u64 {
        let width = interval_ms(window_ms);
        let window_start = now_ms.saturating_sub(window_ms);
        let counted = self.since(window_start, window_ms);
        // What must leave the window before the count is under `max`.
        let mut to_leave = counted.saturating_add(1).saturating_sub(max);
        for &(start, amount) in self.intervals.iter() {
            if to_leave == 0 {
                break;
            }
            if !reaches_past(start, width, window_start) {
                continue;
            }
            if amount >= to_leave {
                // The interval stops counting once the window starts at its last millisecond.
                return (start + width - 1).saturating_add(window_ms).max(now_ms);
            }
            to_leave -= amount;
        }
        now_ms
    }
}

fn interval_ms(window_ms: u64) -> u64 {
    (window_ms / WINDOW_INTERVALS).max(1)
}

/// Whether the interval `start..start + width` holds times after `time_ms`.
fn reaches_past(start: u64, width: u64, time_ms: u64) -> bool {
    start.saturating_add(width) > time_ms.saturating_add(1)
}
