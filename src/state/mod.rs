//! The projections: what the log says is true, as a pure fold of its events.
//!
//! `State::apply` is deterministic and total: no I/O, no clock (times come from the events),
//! no randomness, and an event that does not fit the state is an [`ApplyError`] that leaves
//! the state as it was, never a panic. Replaying the same events always yields an equal state.

mod service;
mod snapshot;

use std::collections::VecDeque;

use crate::proto::{self, CrashReason, Event, IdempotentOp, Limits, StopReason, event::Kind};
use service::{count_quota, count_stopped};

pub use service::{
    CompactString, Desired, IdempotencyRecord, Labels, MAX_REPLACED_WHILE_STOPPING, Map, RECENT_EVENTS, RateWindow,
    RecentSeqs, RequestHash, Service, Status, Tenant, WINDOW_INTERVALS, deploy_request_hash, kill_request_hash,
    remove_request_hash,
};
pub use snapshot::SnapshotError;

/// Windows that shape the projection. They are part of the fold, so a node must keep them
/// stable across restarts to replay to the same state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// How long an idempotency key is remembered.
    pub idempotency_window_ms: u64,
    /// The window of the deploys-per-minute quota.
    pub deploy_rate_window_ms: u64,
    /// The window of the history budget (`max_history_mb_per_hour`).
    pub history_window_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            idempotency_window_ms: 24 * 3600 * 1000,
            deploy_rate_window_ms: 60_000,
            history_window_ms: 3_600_000,
        }
    }
}

/// Why an event could not be applied. The state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("event seq {found} does not follow the applied seq {applied}")]
    OutOfOrder { applied: u64, found: u64 },
    #[error("event for unknown service {tenant}/{service_id}")]
    UnknownService { tenant: String, service_id: String },
    #[error("event for version {event} of {tenant}/{service_id}, which is at version {current}")]
    StaleVersion {
        tenant: String,
        service_id: String,
        current: u64,
        event: u64,
    },
    #[error("{kind} does not apply to {tenant}/{service_id} while it is {status}")]
    InvalidTransition {
        tenant: String,
        service_id: String,
        kind: &'static str,
        status: Status,
    },
    #[error("{kind} without a {field}")]
    MissingField { kind: &'static str, field: &'static str },
}

#[derive(Debug, Clone, PartialEq)]
pub struct State {
    settings: Settings,
    applied_seq: u64,
    last_timestamp_ms: u64,
    tenants: Map<CompactString, Box<Tenant>>,
    /// Services of all tenants that hold quota (the node's share of them).
    active_services: u64,
    /// Services being killed: they hold no quota, but their instances exist until they stop.
    stopping_services: u64,
    /// (time, tenant, key) of remembered idempotency keys, oldest first, for expiry.
    idempotency_expiry: VecDeque<(u64, CompactString, CompactString)>,
    /// Services of every tenant that should run (not killed) with each module, by the first 8
    /// bytes of its SHA-256 (a u64 hashes far faster than 32 bytes, and every deploy counts
    /// here, in every copy of the state): a module none of them runs may leave the blob store.
    /// A killed service needs no module (a redeploy brings its own). Modules that share a
    /// prefix share a count, which can only keep a module longer, never drop one in use.
    /// Derived from the services.
    module_users: Map<u64, u32>,
}

impl State {
    pub fn new(settings: Settings) -> State {
        State {
            settings,
            applied_seq: 0,
            last_timestamp_ms: 0,
            tenants: Map::default(),
            active_services: 0,
            stopping_services: 0,
            idempotency_expiry: VecDeque::new(),
            module_users: Map::default(),
        }
    }

    /// Services that should run (not killed) whose current version is the module with this
    /// SHA-256.
    pub fn module_users(&self, sha256: &[u8; 32]) -> u32 {
        self.module_users.get(&module_key(sha256)).copied().unwrap_or(0)
    }

    /// Counts one more service running `module`.
    fn module_used(&mut self, module: [u8; 32]) {
        *self.module_users.entry(module_key(&module)).or_default() += 1;
    }

    /// Counts one service fewer running `module`.
    fn module_released(&mut self, module: [u8; 32]) {
        if let hashbrown::hash_map::Entry::Occupied(mut users) = self.module_users.entry(module_key(&module)) {
            *users.get_mut() -= 1;
            if *users.get() == 0 {
                users.remove();
            }
        }
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// Seq of the last event applied.
    pub fn applied_seq(&self) -> u64 {
        self.applied_seq
    }

    /// Commit time of the last event applied.
    pub fn last_timestamp_ms(&self) -> u64 {
        self.last_timestamp_ms
    }

    /// Services of every tenant that hold quota.
    pub fn active_services(&self) -> u64 {
        self.active_services
    }

    /// Services of every tenant being killed, whose instances still exist.
    pub fn stopping_services(&self) -> u64 {
        self.stopping_services
    }

    pub fn tenant(&self, tenant: &str) -> Option<&Tenant> {
        self.tenants.get(tenant).map(|t| &**t)
    }

    pub fn tenants(&self) -> impl Iterator<Item = (&str, &Tenant)> {
        self.tenants.iter().map(|(name, tenant)| (name.as_str(), &**tenant))
    }

    pub fn service(&self, tenant: &str, service_id: &str) -> Option<&Service> {
        self.tenants.get(tenant)?.services.get(service_id).map(|s| &**s)
    }

    /// Every service of every tenant (in no particular order of tenants).
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.tenants.values().flat_map(|t| t.services.values().map(|s| &**s))
    }

    /// The remembered answer for `key`, if it is still within the window at `now_ms`.
    pub fn idempotency(&self, tenant: &str, key: &str, now_ms: u64) -> Option<&IdempotencyRecord> {
        let record = self.tenants.get(tenant)?.idempotency.get(key)?;
        (record.at_ms.saturating_add(self.settings.idempotency_window_ms) > now_ms).then_some(record)
    }

    /// Deploys of `tenant` committed after `since_ms`, counted in whole intervals of the
    /// rate window (see [`RateWindow`]): never fewer than there were.
    pub fn deploys_since(&self, tenant: &str, since_ms: u64) -> u64 {
        self.tenants.get(tenant).map_or(0, |t| {
            t.recent_deploys.since(since_ms, self.settings.deploy_rate_window_ms)
        })
    }

    /// When `tenant`, allowed `max` deploys per window, may deploy again (`now_ms` if it may).
    pub fn deploy_room_at(&self, tenant: &str, now_ms: u64, max: u32) -> u64 {
        self.tenants.get(tenant).map_or(now_ms, |t| {
            t.recent_deploys
                .room_at(now_ms, self.settings.deploy_rate_window_ms, max.into())
        })
    }

    /// Bytes the events of `tenant` added to the log in the history window ending at
    /// `now_ms`, counted in whole intervals (see [`RateWindow`]): never fewer than they were.
    pub fn history_bytes(&self, tenant: &str, now_ms: u64) -> u64 {
        let window_ms = self.settings.history_window_ms;
        self.tenants.get(tenant).map_or(0, |t| {
            t.recent_history_bytes
                .since(now_ms.saturating_sub(window_ms), window_ms)
        })
    }

    /// When `tenant`, allowed `max_bytes` of history per window, has room again (`now_ms`
    /// if it has).
    pub fn history_room_at(&self, tenant: &str, now_ms: u64, max_bytes: u64) -> u64 {
        self.tenants.get(tenant).map_or(now_ms, |t| {
            t.recent_history_bytes
                .room_at(now_ms, self.settings.history_window_ms, max_bytes)
        })
    }

    /// Folds one event into the state. On error nothing changed (not even the applied seq):
    /// see [`State::skip`].
    pub fn apply(&mut self, event: &Event) -> Result<(), ApplyError> {
        self.apply_with(event, None, stored_bytes(event))
    }

    /// As [`State::apply`], but moves the labels of a `service_deployed` event into the state
    /// rather than copying them; once applied, `event` holds the labels they replaced. For
    /// replay, which drops every event it applies, and where copying labels and freeing the old
    /// ones took a tenth of its time.
    /// `stored` is the bytes the log stores the event in (its frame), which replay knows.
    pub fn apply_taking(&mut self, event: &mut Event, stored: u64) -> Result<(), ApplyError> {
        let Some(Kind::ServiceDeployed(deployed)) = &mut event.kind else {
            return self.apply_with(event, None, stored);
        };
        let mut labels = std::mem::take(&mut deployed.labels);
        let applied = self.apply_with(event, Some(&mut labels), stored);
        if let Some(Kind::ServiceDeployed(deployed)) = &mut event.kind {
            deployed.labels = labels;
        }
        applied
    }

    /// Applies `event`, which the log stores in `stored` bytes; a deploy takes `labels`, when
    /// given, in place of the event's own, and leaves the service's old labels in their place.
    fn apply_with(&mut self, event: &Event, labels: Option<&mut Labels>, stored: u64) -> Result<(), ApplyError> {
        self.check_seq(event)?;
        // As time passes, whatever the event: keys are not kept past their window until the
        // next keyed request comes.
        self.expire_idempotency(event.timestamp_ms);
        match &event.kind {
            Some(Kind::ServiceDeployed(e)) => self.apply_deployed(event, e, labels)?,
            Some(Kind::ServiceKillRequested(e)) => self.apply_kill_requested(event, e)?,
            Some(Kind::ServiceStarted(_)) => self.update(event, |s| {
                s.status = Status::Running;
                s.load_failed = false;
            })?,
            Some(Kind::ServiceCrashed(e)) => self.update(event, |s| {
                s.load_failed = e.reason() == CrashReason::LoadFailure;
                s.status = match e.reason() {
                    CrashReason::InitFailure | CrashReason::LoadFailure => Status::Failed,
                    _ if e.restarting => Status::Starting,
                    _ => Status::Crashed,
                };
                s.last_error.clone_from(&e.message);
            })?,
            Some(Kind::ServiceRestarted(e)) => self.update(event, |s| {
                s.status = Status::Running;
                s.restarts = e.restarts;
                s.restart_times_ms.push(event.timestamp_ms);
                let excess = s.restart_times_ms.len().saturating_sub(s.limits.max_restarts as usize);
                s.restart_times_ms.drain(..excess);
            })?,
            Some(Kind::ServiceStopped(e)) => self.update(event, |s| match e.reason() {
                // History only: the version serving now is newer.
                StopReason::Replaced => {}
                _ if e.version == s.version => s.status = Status::Stopped,
                _ => s.replaced_while_stopping.retain(|r| r.version != e.version),
            })?,
            Some(Kind::ServiceRemoved(e)) => self.apply_removed(event, e)?,
            // Node-level events, and kinds from a newer build: nothing this build tracks.
            Some(Kind::ShutdownRequested(_) | Kind::NodeStarted(_)) | None => {}
        }
        // Every event of a tenant's services counts against its history budget, those the
        // node recorded for it (starts, crashes, stops) as much as its requests.
        if let Some(tenant) = self.tenants.get_mut(event.tenant.as_str()) {
            tenant
                .recent_history_bytes
                .add(event.timestamp_ms, self.settings.history_window_ms, stored);
        }
        self.applied_seq = event.seq;
        self.last_timestamp_ms = self.last_timestamp_ms.max(event.timestamp_ms);
        Ok(())
    }

    /// Moves past an event that did not apply, as replay does: the log is the truth even
    /// where this build cannot use an event.
    pub fn skip(&mut self, event: &Event) {
        if self.check_seq(event).is_ok() {
            self.expire_idempotency(event.timestamp_ms);
            self.applied_seq = event.seq;
            self.last_timestamp_ms = self.last_timestamp_ms.max(event.timestamp_ms);
        }
    }

    /// Forgets the idempotency keys past their window as of the last event applied. A
    /// snapshot written before keys expired with every event (only as the next keyed request
    /// came) may hold such keys: they answer nothing, and a comparison ignores them this way.
    pub fn forget_expired_keys(&mut self) {
        self.expire_idempotency(self.last_timestamp_ms);
    }

    /// Whether `event` would apply, without applying it.
    pub fn check(&self, event: &Event) -> Result<(), ApplyError> {
        self.check_seq(event)?;
        match &event.kind {
            Some(Kind::ServiceDeployed(e)) => self.check_deployed(event, e),
            Some(Kind::ShutdownRequested(_) | Kind::NodeStarted(_)) | None => Ok(()),
            Some(kind) => {
                let kind_name = crate::event::EventKind::of(kind).as_str();
                require_service_ids(event, kind_name)?;
                let service = self
                    .service(&event.tenant, &event.service_id)
                    .ok_or_else(|| unknown(event))?;
                transition_allowed(event, service)
            }
        }
    }

    fn check_seq(&self, event: &Event) -> Result<(), ApplyError> {
        if self.applied_seq.checked_add(1) == Some(event.seq) {
            Ok(())
        } else {
            Err(ApplyError::OutOfOrder {
                applied: self.applied_seq,
                found: event.seq,
            })
        }
    }

    fn check_deployed(&self, event: &Event, e: &proto::ServiceDeployed) -> Result<(), ApplyError> {
        check_deployed_fields(event, e)?;
        let current = self.service(&event.tenant, &event.service_id).map_or(0, |s| s.version);
        check_next_version(event, current, e.version)
    }

    /// Checks and applies in one lookup of the tenant and one of the service (replay and the
    /// writer apply every deploy), changing nothing when a check fails.
    fn apply_deployed(
        &mut self,
        event: &Event,
        e: &proto::ServiceDeployed,
        labels: Option<&mut Labels>,
    ) -> Result<(), ApplyError> {
        use hashbrown::hash_map::EntryRef;
        let (limits, module_hash) = check_deployed_fields(event, e)?;
        let tenant = match self.tenants.entry_ref(event.tenant.as_str()) {
            EntryRef::Occupied(tenant) => tenant.into_mut(),
            EntryRef::Vacant(tenant) => {
                check_next_version(event, 0, e.version)?;
                tenant.insert(Box::default())
            }
        };
        // A redeployed stopped service is no longer one; a new one never was.
        let (service, was_stopped) = match tenant.services.entry_ref(event.service_id.as_str()) {
            EntryRef::Occupied(service) => {
                check_next_version(event, service.get().version, e.version)?;
                let was_stopped = service.get().is_removable();
                (service.into_mut(), was_stopped)
            }
            EntryRef::Vacant(service) => {
                check_next_version(event, 0, e.version)?;
                (service.insert(Box::new(Service::new(event, limits))), false)
            }
        };
        count_stopped(&mut tenant.stopped_services, was_stopped, false);
        count_stopping(&mut self.stopping_services, service.status == Status::Stopping, false);
        if service.status == Status::Stopping {
            // Its instance stops before the new version starts, and the stop is recorded.
            let replaced = &mut service.replaced_while_stopping;
            replaced.drain(..(replaced.len() + 1).saturating_sub(MAX_REPLACED_WHILE_STOPPING));
            replaced.push(proto::ReplacedVersion {
                version: service.version,
                memory_bytes: service.limits.memory_bytes,
            });
        }
        let held_quota = service.held_quota();
        let was_active = service.is_active();
        if !was_active {
            self.active_services += 1;
        }
        // Whether the module use changes: a service that was not running (new, or killed,
        // which let its module go) takes the module up; a running one switches modules.
        let module_change = match (was_active, service.module_sha256 != e.module_sha256) {
            (false, _) => Some(None),
            (true, true) => Some(Some(service.module_hash)),
            (true, false) => None,
        };
        service.module_sha256.clone_from(&e.module_sha256);
        service.module_hash = module_hash;
        service.module_size = e.module_size;
        service.version = e.version;
        service.limits = limits;
        match labels {
            Some(labels) => std::mem::swap(&mut service.labels, labels),
            None => service.labels.clone_from(&e.labels),
        }
        service.desired = Desired::Running;
        service.status = Status::Starting;
        count_quota(
            &mut tenant.quota_services,
            &mut tenant.quota_memory_bytes,
            held_quota,
            service.held_quota(),
        );
        service.restarts = 0;
        service.restart_times_ms.clear();
        service.last_error.clear();
        service.load_failed = false;
        service.deployed_seq = event.seq;
        service.touched(event);
        let request_hash = (!e.idempotency_key.is_empty()).then(|| {
            deploy_request_hash(
                &e.requested_limits.unwrap_or(limits),
                &service.labels,
                e.expected_version,
            )
        });

        tenant
            .recent_deploys
            .record(event.timestamp_ms, self.settings.deploy_rate_window_ms);
        if let Some(request_hash) = request_hash {
            let answer = (e.version, module_hash, request_hash);
            self.remember_answer(event, &e.idempotency_key, IdempotentOp::Deploy, answer);
        }
        if let Some(replaced) = module_change {
            self.module_used(module_hash);
            if let Some(replaced) = replaced {
                self.module_released(replaced);
            }
        }
        Ok(())
    }

    fn apply_kill_requested(&mut self, event: &Event, e: &proto::ServiceKillRequested) -> Result<(), ApplyError> {
        require_service_ids(event, "service_kill_requested")?;
        let tenant = self
            .tenants
            .get_mut(event.tenant.as_str())
            .ok_or_else(|| unknown(event))?;
        let service = tenant
            .services
            .get_mut(event.service_id.as_str())
            .ok_or_else(|| unknown(event))?;
        transition_allowed(event, service)?;
        // A forced kill of a service already stopping hurries the stop along; the service
        // stopped counting as one that should run with the first kill. It holds its tenant's
        // quota until it has stopped.
        let escalation = service.desired == Desired::Stopped;
        count_stopped(&mut tenant.stopped_services, service.is_removable(), false);
        count_stopping(&mut self.stopping_services, service.status == Status::Stopping, true);
        service.desired = Desired::Stopped;
        service.status = Status::Stopping;
        service.touched(event);
        let (version, module) = (service.version, service.module_hash);
        if !escalation {
            self.active_services = self.active_services.saturating_sub(1);
            self.module_released(module);
        }
        if !e.idempotency_key.is_empty() {
            let answer = (
                version,
                [0; 32],
                kill_request_hash(e.force, e.requested_grace_ms.unwrap_or(e.grace_ms), e.expected_version),
            );
            self.remember_answer(event, &e.idempotency_key, IdempotentOp::Kill, answer);
        }
        Ok(())
    }

    fn apply_removed(&mut self, event: &Event, e: &proto::ServiceRemoved) -> Result<(), ApplyError> {
        require_service_ids(event, "service_removed")?;
        let tenant = self
            .tenants
            .get_mut(event.tenant.as_str())
            .ok_or_else(|| unknown(event))?;
        let service = tenant
            .services
            .get(event.service_id.as_str())
            .ok_or_else(|| unknown(event))?;
        transition_allowed(event, service)?;
        // A stopped service holds no quota and no module: only its entry goes.
        let version = service.version;
        count_stopped(&mut tenant.stopped_services, service.is_removable(), false);
        tenant.services.remove(event.service_id.as_str());
        if !e.idempotency_key.is_empty() {
            let answer = (version, [0; 32], remove_request_hash(e.expected_version));
            self.remember_answer(event, &e.idempotency_key, IdempotentOp::Remove, answer);
        }
        Ok(())
    }

    /// Applies `change` to the event's service, if the event's rules allow it (one lookup).
    fn update(&mut self, event: &Event, change: impl FnOnce(&mut Service)) -> Result<(), ApplyError> {
        let kind = event
            .kind
            .as_ref()
            .map_or("unknown", |k| crate::event::EventKind::of(k).as_str());
        require_service_ids(event, kind)?;
        let tenant = self
            .tenants
            .get_mut(event.tenant.as_str())
            .ok_or_else(|| unknown(event))?;
        let service = tenant
            .services
            .get_mut(event.service_id.as_str())
            .ok_or_else(|| unknown(event))?;
        transition_allowed(event, service)?;
        let (was_removable, was_stopping) = (service.is_removable(), service.status == Status::Stopping);
        let held_quota = service.held_quota();
        change(service);
        service.touched(event);
        let is_removable = service.is_removable();
        count_stopped(&mut tenant.stopped_services, was_removable, is_removable);
        count_quota(
            &mut tenant.quota_services,
            &mut tenant.quota_memory_bytes,
            held_quota,
            service.held_quota(),
        );
        count_stopping(
            &mut self.stopping_services,
            was_stopping,
            service.status == Status::Stopping,
        );
        Ok(())
    }

    /// Remembers that `event` answered the keyed request `op` with `key`: its `(version,
    /// module_hash, request_hash)`, the module zeros for a kill or remove.
    fn remember_answer(&mut self, event: &Event, key: &str, op: IdempotentOp, answer: (u64, [u8; 32], RequestHash)) {
        let (version, module_hash, request_hash) = answer;
        let record = IdempotencyRecord {
            op,
            service_id: event.service_id.as_str().into(),
            seq: event.seq,
            version,
            module_hash,
            request_hash: Some(request_hash),
            at_ms: event.timestamp_ms,
        };
        self.remember(&event.tenant, key, record);
    }

    /// Remembers the first answer given for `key`; a key already remembered keeps its answer.
    /// (Keys past the window were forgotten as the event began to apply.)
    fn remember(&mut self, tenant: &str, key: &str, record: IdempotencyRecord) {
        let keys = &mut self.tenants.entry_ref(tenant).or_default().idempotency;
        if !keys.contains_key(key) {
            self.idempotency_expiry
                .push_back((record.at_ms, tenant.into(), key.into()));
            keys.insert(key.into(), record);
        }
    }

    fn expire_idempotency(&mut self, now_ms: u64) {
        let window = self.settings.idempotency_window_ms;
        while let Some((at, tenant, key)) = self.idempotency_expiry.front() {
            if at.saturating_add(window) > now_ms {
                break;
            }
            if let Some(t) = self.tenants.get_mut(tenant)
                && t.idempotency.get(key).is_some_and(|r| r.at_ms == *at)
            {
                t.idempotency.remove(key);
            }
            self.idempotency_expiry.pop_front();
        }
    }
}

/// The rule of each kind that changes an existing service: the version it names must be the
/// current one, and the service must be in a status the kind can follow.
fn transition_allowed(event: &Event, service: &Service) -> Result<(), ApplyError> {
    let (kind, version, allowed) = match &event.kind {
        Some(Kind::ServiceStarted(e)) => (
            "service_started",
            Some(e.version),
            service.status == Status::Starting || (e.recovered && service.comes_back_with_the_node()),
        ),
        Some(Kind::ServiceCrashed(e)) => (
            "service_crashed",
            Some(e.version),
            matches!(service.status, Status::Starting | Status::Running) || service.comes_back_with_the_node(),
        ),
        Some(Kind::ServiceRestarted(e)) => ("service_restarted", Some(e.version), service.status == Status::Starting),
        Some(Kind::ServiceKillRequested(e)) => (
            "service_kill_requested",
            None,
            service.desired == Desired::Running || (e.force && service.status == Status::Stopping),
        ),
        // The stop of a killed version that a deploy has replaced: history only.
        Some(Kind::ServiceStopped(e)) if e.version != service.version && service.stop_owed_to_replaced(e.version) => {
            return Ok(());
        }
        // The stop of a version an upgrade replaced: history only, of an older version.
        Some(Kind::ServiceStopped(e)) if e.reason() == StopReason::Replaced => {
            return if e.version < service.version {
                Ok(())
            } else {
                Err(stale(event, service.version, e.version))
            };
        }
        Some(Kind::ServiceStopped(e)) => {
            let killed = e.reason() == StopReason::Killed;
            let up = matches!(service.status, Status::Starting | Status::Running | Status::Stopping);
            (
                "service_stopped",
                Some(e.version),
                up && (!killed || service.desired == Desired::Stopped),
            )
        }
        Some(Kind::ServiceRemoved(_)) => ("service_removed", None, service.is_removable()),
        Some(Kind::ServiceDeployed(_) | Kind::ShutdownRequested(_) | Kind::NodeStarted(_)) | None => {
            unreachable!("only kinds that change an existing service are checked here")
        }
    };
    if let Some(version) = version
        && version != service.version
    {
        return Err(stale(event, service.version, version));
    }
    if !allowed {
        return Err(ApplyError::InvalidTransition {
            tenant: event.tenant.clone(),
            service_id: event.service_id.clone(),
            kind,
            status: service.status,
        });
    }
    Ok(())
}

/// The fields a `service_deployed` event cannot do without: its limits and module hash.
fn check_deployed_fields(event: &Event, e: &proto::ServiceDeployed) -> Result<(Limits, [u8; 32]), ApplyError> {
    require_service_ids(event, "service_deployed")?;
    let limits = e.limits.ok_or(ApplyError::MissingField {
        kind: "service_deployed",
        field: "limits",
    })?;
    let module_hash = parse_sha256(&e.module_sha256).ok_or(ApplyError::MissingField {
        kind: "service_deployed",
        field: "module_sha256 (64 hex digits)",
    })?;
    Ok((limits, module_hash))
}

/// A deploy makes the version after the current one (0 for a new service).
fn check_next_version(event: &Event, current: u64, version: u64) -> Result<(), ApplyError> {
    if current.checked_add(1) == Some(version) {
        Ok(())
    } else {
        Err(stale(event, current, version))
    }
}

fn stale(event: &Event, current: u64, found: u64) -> ApplyError {
    ApplyError::StaleVersion {
        tenant: event.tenant.clone(),
        service_id: event.service_id.clone(),
        current,
        event: found,
    }
}

/// A module hash from its hex form.
/// The key of a module in [`State::module_users`].
fn module_key(sha256: &[u8; 32]) -> u64 {
    let mut prefix = [0; 8];
    prefix.copy_from_slice(&sha256[..8]);
    u64::from_le_bytes(prefix)
}

pub fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let mut hash = [0; 32];
    hex::decode_to_slice(hex, &mut hash).ok().map(|()| hash)
}

/// The bytes the log stores `event` in: its frame (see `log-format.md`).
fn stored_bytes(event: &Event) -> u64 {
    (crate::log::frame::HEADER_LEN + prost::Message::encoded_len(event)) as u64
}

fn unknown(event: &Event) -> ApplyError {
    ApplyError::UnknownService {
        tenant: event.tenant.clone(),
        service_id: event.service_id.clone(),
    }
}

fn require_service_ids(event: &Event, kind: &'static str) -> Result<(), ApplyError> {
    if event.tenant.is_empty() {
        return Err(ApplyError::MissingField { kind, field: "tenant" });
    }
    if event.service_id.is_empty() {
        return Err(ApplyError::MissingField {
            kind,
            field: "service_id",
        });
    }
    Ok(())
}

/// Keeps the node's count of services being killed as one changes status.
fn count_stopping(stopping_services: &mut u64, was: bool, is: bool) {
    match (was, is) {
        (false, true) => *stopping_services += 1,
        (true, false) => *stopping_services = stopping_services.saturating_sub(1),
        _ => {}
    }
}

#[cfg(test)]
mod tests;
