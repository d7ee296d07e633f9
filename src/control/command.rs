//! Commands, their outcomes, and `decide`: the pure rule that turns a command and the state
//! into the events to append (or a refusal, or an answer that needs no event).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::error::{Error, Result};
use crate::event::envelope;
use crate::limits::TenantLimits;
use crate::proto::{self, CrashReason, Event, IdempotentOp, Limits, RemovalReason, StopReason, event::Kind};
use crate::state::{
    Desired, IdempotencyRecord, Service, State, Status, Tenant, deploy_request_hash, kill_request_hash,
    remove_request_hash,
};

/// Who caused an event, as recorded in its `actor` field.
pub const NODE_ACTOR: &str = "node";

/// A wasm module, identified by the SHA-256 of its bytes.
#[derive(Debug, Clone)]
pub struct Module {
    pub sha256: [u8; 32],
    /// The hash in lower-case hex, as events carry it (computed by the caller, off the writer).
    sha256_hex: String,
    pub bytes: Arc<[u8]>,
}

impl Module {
    pub fn new(bytes: Arc<[u8]>) -> Module {
        use sha2::Digest as _;
        let sha256: [u8; 32] = sha2::Sha256::digest(&bytes).into();
        let mut hex = [0; 64];
        // `hex::encode` goes char by char; this is on every deploy's path.
        hex::encode_to_slice(sha256, &mut hex).expect("64 hex digits for 32 bytes");
        Module {
            sha256,
            sha256_hex: std::str::from_utf8(&hex).expect("hex digits are ASCII").to_owned(),
            bytes,
        }
    }

    /// As `new`, but a large module is hashed on the blocking pool rather than on a worker
    /// thread; a small one costs less than the hand-off would.
    pub async fn hashed(bytes: Arc<[u8]>) -> Module {
        const INLINE_MAX: usize = 256 << 10;
        if bytes.len() <= INLINE_MAX {
            return Module::new(bytes);
        }
        tokio::task::spawn_blocking(move || Module::new(bytes))
            .await
            .expect("hashing does not panic")
    }

    pub fn sha256_hex(&self) -> &str {
        &self.sha256_hex
    }

    /// The hash in hex, for the event, and the module as the blob store keeps it.
    fn into_parts(self) -> (String, Blob) {
        let blob = Blob {
            sha256: self.sha256,
            bytes: self.bytes,
        };
        (self.sha256_hex, blob)
    }
}

/// Module bytes for the blob store, keyed by their SHA-256.
#[derive(Debug)]
pub(super) struct Blob {
    pub sha256: [u8; 32],
    pub bytes: Arc<[u8]>,
}

/// Deploy `module` as `service_id` of `tenant` (the effective limits are already resolved).
#[derive(Debug, Clone)]
pub struct DeployCommand {
    pub tenant: String,
    pub actor: String,
    pub service_id: String,
    pub module: Module,
    /// The effective limits: the request's, with the node's defaults for those it left at 0.
    pub limits: Limits,
    /// The limits as the request gave them, for comparing a retry with it.
    pub requested_limits: Limits,
    pub labels: BTreeMap<String, String>,
    pub idempotency_key: String,
    /// Deploy only if the service is at this version (0: only if it does not exist).
    pub expected_version: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployOutcome {
    pub service_id: String,
    pub version: u64,
    /// The module of that version.
    pub module_sha256: String,
    /// Seq of the `service_deployed` event of this version.
    pub seq: u64,
    /// The id did not exist before.
    pub created: bool,
    /// The identical module was already deployed and running: nothing was appended.
    pub unchanged: bool,
    /// A retry with a known idempotency key: the original answer, nothing appended.
    pub replayed: bool,
    /// When the answer was first given (ms since the Unix epoch): a replayed answer older than
    /// the service now under its id was about one removed since.
    pub at_ms: u64,
}

#[derive(Debug, Clone)]
pub struct KillCommand {
    pub tenant: String,
    pub actor: String,
    pub service_id: String,
    pub force: bool,
    /// The grace the stop gets: the request's, or the node's default.
    pub grace_ms: u32,
    /// The grace as the request gave it (0: the node's default), which a retry with the same
    /// idempotency key must repeat.
    pub requested_grace_ms: u32,
    pub idempotency_key: String,
    /// Kill only if the service is at this version.
    pub expected_version: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct RemoveCommand {
    pub tenant: String,
    pub actor: String,
    pub service_id: String,
    pub idempotency_key: String,
    /// Remove only if the service is at this version.
    pub expected_version: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoveOutcome {
    /// Seq of the `service_removed` event.
    pub seq: u64,
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillOutcome {
    /// Seq of the `service_kill_requested` event (or of the last event, if already stopped).
    pub seq: u64,
    /// The service was already killed: nothing was appended.
    pub already_stopped: bool,
    pub replayed: bool,
}

/// What the runtime saw happen; it becomes an event only if it still fits the state.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    Started {
        tenant: String,
        service_id: String,
        version: u64,
        recovered: bool,
    },
    Crashed {
        tenant: String,
        service_id: String,
        version: u64,
        reason: CrashReason,
        trap_code: String,
        message: String,
        restarting: bool,
    },
    Restarted {
        tenant: String,
        service_id: String,
        version: u64,
        restarts: u32,
    },
    Stopped {
        tenant: String,
        service_id: String,
        version: u64,
        reason: StopReason,
        how: StopReport,
    },
    NodeStarted {
        version: String,
        node_id: String,
        recovered: Vec<proto::ServiceRef>,
        replayed_to_seq: u64,
    },
}

/// How an instance's stop went, as the runtime saw it (`ServiceStopped`'s account of it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopReport {
    pub outcome: proto::StopOutcome,
    /// Calls the instance had accepted and answered "stopped" instead.
    pub calls_cut_off: u32,
    /// What went wrong, for a person; empty for a clean stop.
    pub message: String,
}

#[derive(Debug, Clone)]
pub(super) enum Command {
    Deploy(DeployCommand),
    Kill(KillCommand),
    Remove(RemoveCommand),
    Shutdown { actor: String, grace_ms: u32 },
    Observe(Observation),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Reply {
    Deployed(DeployOutcome),
    Killed(KillOutcome),
    Removed(RemoveOutcome),
    /// The command's event, now durable. The caller reads its answer from it: the writer
    /// shares the event rather than copying fields out of it.
    Appended(Arc<Event>),
    /// The node is already shutting down, as the event at this seq asked.
    ShuttingDown(u64),
}

impl DeployOutcome {
    /// The answer to a deploy that appended `event`.
    pub(super) fn appended(event: &Event) -> DeployOutcome {
        let Some(Kind::ServiceDeployed(deployed)) = &event.kind else {
            unreachable!("a deploy appends service_deployed, not {:?}", event.kind)
        };
        DeployOutcome {
            service_id: event.service_id.clone(),
            version: deployed.version,
            module_sha256: deployed.module_sha256.clone(),
            seq: event.seq,
            created: deployed.version == 1,
            unchanged: false,
            replayed: false,
            at_ms: event.timestamp_ms,
        }
    }

    /// Whether `service`, the one now under the outcome's id, is the one this outcome deployed
    /// (or found deployed): not if the id was removed since and deployed anew.
    pub fn is_about(&self, service: &crate::state::Service) -> bool {
        service.created_at_ms <= self.at_ms
            && (service.version > self.version || (service.version == self.version && service.deployed_seq == self.seq))
    }
}

/// What the writer does with one command.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // built and consumed once per command, never stored
pub(super) enum Decision {
    /// Append this event (its seq and time are filled in by the writer), storing `blob` if
    /// the blob store lacks it, and answer with [`Reply::Appended`].
    Append { event: Event, blob: Option<Blob> },
    /// Answer without appending anything.
    Answer(Reply),
}

/// The node-wide facts a decision depends on besides the state.
#[derive(Debug, Clone, Copy)]
pub(super) struct Context<'a> {
    pub now_ms: u64,
    /// The seq of the `shutdown_requested` of this run of the node, once there is one.
    pub shutdown_seq: Option<u64>,
    pub limits: &'a TenantLimits,
    /// Services the node can run, all tenants together.
    pub node_services: Option<u64>,
}

/// Takes the command by value: its strings move into the event, so the writer copies none.
pub(super) fn decide(state: &State, command: Command, cx: Context<'_>) -> Result<Decision> {
    match command {
        // A shutting-down node takes no more changes from clients (its observations still
        // record what the runtime does).
        Command::Deploy(_) | Command::Kill(_) | Command::Remove(_) if cx.shutdown_seq.is_some() => {
            Err(Error::ShuttingDown)
        }
        // Nor is anything recorded as started: a start that ended as the shutdown was being
        // recorded is stopped with the others, and its service comes back with the node.
        Command::Observe(Observation::Started { .. }) if cx.shutdown_seq.is_some() => Err(Error::ShuttingDown),
        Command::Deploy(cmd) => decide_deploy(state, cmd, cx),
        Command::Kill(cmd) => decide_kill(state, cmd, cx),
        Command::Remove(cmd) => decide_remove(state, cmd, cx),
        // A repeat (an impatient client, a retry) is told of the shutdown already under way;
        // the node stops with the first one's grace.
        Command::Shutdown { .. } if let Some(seq) = cx.shutdown_seq => Ok(Decision::Answer(Reply::ShuttingDown(seq))),
        Command::Shutdown { actor, grace_ms } => Ok(Decision::Append {
            event: envelope(
                String::new(),
                String::new(),
                actor,
                Kind::ShutdownRequested(proto::ShutdownRequested { grace_ms }),
            ),
            blob: None,
        }),
        Command::Observe(observation) => decide_observation(state, observation),
    }
}

fn decide_deploy(state: &State, cmd: DeployCommand, cx: Context<'_>) -> Result<Decision> {
    let sha = cmd.module.sha256_hex();
    let same_request = |record: &IdempotencyRecord| {
        record.module_hash == cmd.module.sha256
            && record.request_hash.is_none_or(|h| {
                // The original is hashed as requested (as granted, before requests were
                // kept); either way a retry asking for the same matches.
                h == deploy_request_hash(&cmd.requested_limits, &cmd.labels, cmd.expected_version)
                    || h == deploy_request_hash(&cmd.limits, &cmd.labels, cmd.expected_version)
            })
    };
    let keyed = Keyed {
        tenant: &cmd.tenant,
        key: &cmd.idempotency_key,
        op: IdempotentOp::Deploy,
        service_id: &cmd.service_id,
    };
    if let Some(record) = keyed.answered(state, cx.now_ms, same_request)? {
        return Ok(Decision::Answer(Reply::Deployed(DeployOutcome {
            service_id: cmd.service_id.clone(),
            version: record.version,
            module_sha256: hex::encode(record.module_hash),
            seq: record.seq,
            created: record.version == 1,
            unchanged: false,
            replayed: true,
            at_ms: record.at_ms,
        })));
    }
    let existing = state.service(&cmd.tenant, &cmd.service_id);
    check_version(existing, &cmd.service_id, cmd.expected_version)?;
    if let Some(s) = existing
        && s.module_sha256 == sha
        && s.limits == cmd.limits
        && s.labels == cmd.labels
        && s.desired == Desired::Running
        && matches!(s.status, Status::Starting | Status::Running)
    {
        // The node remembers a keyed request that changed nothing (a `requests` entry): that
        // is written too, so past its history budget a tenant is refused it as any deploy.
        if !cmd.idempotency_key.is_empty() {
            require_history_room(state, &cmd.tenant, cx.limits, cx.now_ms)?;
        }
        return Ok(Decision::Answer(Reply::Deployed(DeployOutcome {
            service_id: cmd.service_id.clone(),
            version: s.version,
            module_sha256: s.module_sha256.clone(),
            seq: s.deployed_seq,
            created: false,
            unchanged: true,
            replayed: false,
            at_ms: cx.now_ms,
        })));
    }
    check_deploy_quotas(state, &cmd, existing, cx)?;
    let version = existing.map_or(1, |s| s.version + 1);
    let module_size = cmd.module.bytes.len() as u64;
    let (module_sha256, blob) = cmd.module.into_parts();
    let event = envelope(
        cmd.tenant,
        cmd.service_id,
        cmd.actor,
        Kind::ServiceDeployed(proto::ServiceDeployed {
            module_sha256,
            version,
            limits: Some(cmd.limits),
            labels: cmd.labels,
            requested_limits: (!cmd.idempotency_key.is_empty()).then_some(cmd.requested_limits),
            idempotency_key: cmd.idempotency_key,
            module_size,
            expected_version: cmd.expected_version,
        }),
    );
    Ok(Decision::Append {
        event,
        blob: Some(blob),
    })
}

fn decide_remove(state: &State, cmd: RemoveCommand, cx: Context<'_>) -> Result<Decision> {
    let keyed = Keyed {
        tenant: &cmd.tenant,
        key: &cmd.idempotency_key,
        op: IdempotentOp::Remove,
        service_id: &cmd.service_id,
    };
    let same_request = |record: &IdempotencyRecord| {
        record
            .request_hash
            .is_none_or(|h| h == remove_request_hash(cmd.expected_version))
    };
    if let Some(record) = keyed.answered(state, cx.now_ms, same_request)? {
        return Ok(Decision::Answer(Reply::Removed(RemoveOutcome {
            seq: record.seq,
            replayed: true,
        })));
    }
    let service = named_service(state, &cmd.tenant, &cmd.service_id, cmd.expected_version)?;
    if !service.is_removable() {
        return Err(Error::NotStopped {
            service_id: cmd.service_id,
            status: service.status,
        });
    }
    let event = envelope(
        cmd.tenant,
        cmd.service_id,
        cmd.actor,
        Kind::ServiceRemoved(proto::ServiceRemoved {
            idempotency_key: cmd.idempotency_key,
            expected_version: cmd.expected_version,
            reason: RemovalReason::Requested.into(),
        }),
    );
    Ok(Decision::Append { event, blob: None })
}

/// The removals that bring a tenant back within its `max_stopped_services`: of the services
/// stopped longest ago, oldest first. Usually none, or one after a service stopped; more when
/// the limit was lowered.
pub(super) fn collect_stopped(state: &State, tenant: &str, max_stopped_services: u32) -> Vec<Event> {
    let Some(held) = state.tenant(tenant) else {
        return Vec::new();
    };
    let excess = held.stopped_services.saturating_sub(max_stopped_services) as usize;
    if excess == 0 {
        return Vec::new();
    }
    held.stopped_longest(excess)
        .into_iter()
        .map(|service| {
            envelope(
                tenant,
                service.id.as_str(),
                NODE_ACTOR,
                Kind::ServiceRemoved(proto::ServiceRemoved {
                    reason: RemovalReason::MaxStoppedServices.into(),
                    ..Default::default()
                }),
            )
        })
        .collect()
}

/// A keyed request: what its key may have answered before.
struct Keyed<'a> {
    tenant: &'a str,
    key: &'a str,
    op: IdempotentOp,
    service_id: &'a str,
}

impl Keyed<'_> {
    /// The record of the request this key answered within the window, if any, for a retry
    /// to get the same answer; a conflict if the key answered another operation or service,
    /// or a request that `same_request` does not find the same.
    fn answered<'s>(
        &self,
        state: &'s State,
        now_ms: u64,
        same_request: impl Fn(&IdempotencyRecord) -> bool,
    ) -> Result<Option<&'s IdempotencyRecord>> {
        if self.key.is_empty() {
            return Ok(None);
        }
        let Some(record) = state.idempotency(self.tenant, self.key, now_ms) else {
            return Ok(None);
        };
        if record.op != self.op || record.service_id != self.service_id || !same_request(record) {
            return Err(Error::IdempotencyConflict {
                key: self.key.to_string(),
            });
        }
        Ok(Some(record))
    }
}

/// Refuses a request that requires a version (`expected`; 0: that the service not exist) the
/// service is not at.
pub(super) fn require_version(state: &State, tenant: &str, service_id: &str, expected: Option<u64>) -> Result<()> {
    check_version(state.service(tenant, service_id), service_id, expected)
}

/// The service a kill or remove names, if it exists and is at the version the request
/// requires, if any.
fn named_service<'s>(state: &'s State, tenant: &str, service_id: &str, expected: Option<u64>) -> Result<&'s Service> {
    let service = state.service(tenant, service_id).ok_or_else(|| Error::NotFound {
        service_id: service_id.to_string(),
    })?;
    check_version(Some(service), service_id, expected)?;
    Ok(service)
}

/// As [`require_version`], for the service already looked up (`None`: it does not exist).
fn check_version(service: Option<&Service>, service_id: &str, expected: Option<u64>) -> Result<()> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let actual = service.map(|s| s.version);
    if actual.unwrap_or(0) == expected {
        return Ok(());
    }
    Err(Error::VersionMismatch {
        service_id: service_id.to_string(),
        expected,
        actual,
    })
}

/// For a quota refusal: how many of the tenant's services count only until their kills end,
/// being stopping, or redeployed over a version still stopping (whose memory they reserve).
fn still_stopping(tenant: Option<&Tenant>) -> String {
    let (mut stopping, mut behind_a_redeploy) = (0, 0);
    for service in tenant.iter().flat_map(|t| t.services.values()) {
        if service.status == Status::Stopping {
            stopping += 1;
        } else if !service.replaced_while_stopping.is_empty() {
            behind_a_redeploy += 1;
        }
    }
    let mut parts = Vec::new();
    match stopping {
        0 => {}
        1 => parts.push("1 of them is stopping".to_string()),
        n => parts.push(format!("{n} of them are stopping")),
    }
    match behind_a_redeploy {
        0 => {}
        1 => parts.push("1 was redeployed while its earlier version is still stopping".to_string()),
        n => parts.push(format!(
            "{n} were redeployed while their earlier versions are still stopping"
        )),
    }
    if parts.is_empty() {
        return String::new();
    }
    format!(
        " ({}; a stopping version counts until it has stopped)",
        parts.join(", and ")
    )
}

/// The quotas that depend on the state: services, tenant memory, deploy rate. (Module size and
/// per-service memory depend on the request alone and are checked before it is queued.)
fn check_deploy_quotas(state: &State, cmd: &DeployCommand, existing: Option<&Service>, cx: Context<'_>) -> Result<()> {
    let limits = cx.limits;
    let tenant = state.tenant(&cmd.tenant);
    let (held_services, memory) = tenant.map_or((0, 0), |t| (t.quota_services, t.quota_memory_bytes));
    // A service being killed still has its instance until it stops: the node's room and its
    // tenant's quotas count it, and a redeploy takes its place (its next version starts once
    // it has stopped).
    let held = existing.and_then(Service::held_quota);
    let (running, stopping) = (state.active_services(), state.stopping_services());
    if let Some(capacity) = cx.node_services
        && held.is_none()
        && running + stopping >= capacity
    {
        let stopping = match stopping {
            0 => String::new(),
            n => format!(" and {n} more are stopping (try again once they have stopped)"),
        };
        return Err(Error::QuotaExceeded {
            quota: "runtime.max_instances",
            limit: capacity,
            detail: format!(
                "the node runs {running} services{stopping}, all it has room for (some of \
                 runtime.max_instances is kept for upgrades)"
            ),
            retry_after: None,
        });
    }
    // An upgrade adds no service: it is allowed even over a limit lowered since.
    if held.is_none() && held_services >= limits.max_services {
        return Err(Error::QuotaExceeded {
            quota: "max_services",
            limit: limits.max_services.into(),
            detail: format!(
                "tenant '{}' has {held_services} services{}",
                cmd.tenant,
                still_stopping(tenant)
            ),
            retry_after: None,
        });
    }
    let stopping = existing.map_or(0, Service::memory_stopping_past_a_deploy);
    let memory_after = memory - held.unwrap_or(0) + cmd.limits.memory_bytes.max(stopping);
    if memory_after > limits.max_tenant_memory_bytes() {
        return Err(Error::QuotaExceeded {
            quota: "max_tenant_memory_mb",
            limit: limits.max_tenant_memory_mb,
            detail: format!(
                "the tenant's services reserve {} and would reserve {} with this deploy{}",
                crate::limits::in_mib(memory),
                crate::limits::in_mib(memory_after),
                still_stopping(tenant)
            ),
            retry_after: None,
        });
    }
    let window_start = cx.now_ms.saturating_sub(state.settings().deploy_rate_window_ms);
    let recent = state.deploys_since(&cmd.tenant, window_start);
    if recent >= limits.max_deploys_per_minute.into() {
        return Err(Error::QuotaExceeded {
            quota: "max_deploys_per_minute",
            limit: limits.max_deploys_per_minute.into(),
            detail: format!("tenant '{}' deployed {recent} times in the last minute", cmd.tenant),
            retry_after: Some(Duration::from_millis(
                state.deploy_room_at(&cmd.tenant, cx.now_ms, limits.max_deploys_per_minute) - cx.now_ms,
            )),
        });
    }
    require_history_room(state, &cmd.tenant, limits, cx.now_ms)
}

/// Refuses a deploy of a tenant whose events added its `max_history_mb_per_hour` to the log
/// within the hour. Only deploys: a kill or a removal adds little, and stops what would add
/// more, so a tenant over its budget can always wind down.
pub(super) fn require_history_room(state: &State, tenant: &str, limits: &TenantLimits, now_ms: u64) -> Result<()> {
    let added = state.history_bytes(tenant, now_ms);
    let budget = limits.max_history_bytes_per_hour();
    if added < budget {
        return Ok(());
    }
    Err(Error::QuotaExceeded {
        quota: "max_history_mb_per_hour",
        limit: limits.max_history_mb_per_hour,
        detail: format!(
            "the events of tenant '{tenant}' added {:.1} MiB to the log in the last hour; it may deploy again \
             once older ones leave the hour",
            added as f64 / (1 << 20) as f64
        ),
        retry_after: Some(Duration::from_millis(
            state.history_room_at(tenant, now_ms, budget) - now_ms,
        )),
    })
}

fn decide_kill(state: &State, cmd: KillCommand, cx: Context<'_>) -> Result<Decision> {
    let keyed = Keyed {
        tenant: &cmd.tenant,
        key: &cmd.idempotency_key,
        op: IdempotentOp::Kill,
        service_id: &cmd.service_id,
    };
    let same_request = |record: &IdempotencyRecord| {
        record
            .request_hash
            .is_none_or(|h| h == kill_request_hash(cmd.force, cmd.requested_grace_ms, cmd.expected_version))
    };
    if let Some(record) = keyed.answered(state, cx.now_ms, same_request)? {
        return Ok(Decision::Answer(Reply::Killed(KillOutcome {
            seq: record.seq,
            already_stopped: false,
            replayed: true,
        })));
    }
    let service = named_service(state, &cmd.tenant, &cmd.service_id, cmd.expected_version)?;
    // A forced kill of a service still stopping (a graceful kill waiting on its calls) is
    // recorded too, and cuts the stop short; anything else finds the service on its way down.
    let escalates = cmd.force && service.status == Status::Stopping;
    if service.desired == Desired::Stopped && !escalates {
        return Ok(Decision::Answer(Reply::Killed(KillOutcome {
            seq: service.last_seq,
            already_stopped: true,
            replayed: false,
        })));
    }
    let event = envelope(
        cmd.tenant,
        cmd.service_id,
        cmd.actor,
        Kind::ServiceKillRequested(proto::ServiceKillRequested {
            force: cmd.force,
            grace_ms: cmd.grace_ms,
            requested_grace_ms: (!cmd.idempotency_key.is_empty()).then_some(cmd.requested_grace_ms),
            idempotency_key: cmd.idempotency_key,
            expected_version: cmd.expected_version,
        }),
    );
    Ok(Decision::Append { event, blob: None })
}

fn decide_observation(state: &State, mut observation: Observation) -> Result<Decision> {
    // A service brought back, then killed and removed before the node had finished starting,
    // is no longer there to name.
    if let Observation::NodeStarted { recovered, .. } = &mut observation {
        recovered.retain(|r| state.service(&r.tenant, &r.service_id).is_some());
    }
    let mut event = observation_event(observation);
    // Check against the state as if this were the next event: a stale observation (say, from
    // an instance that an upgrade replaced) is refused rather than appended.
    event.seq = state.applied_seq() + 1;
    state.check(&event).map_err(Error::Stale)?;
    Ok(Decision::Append { event, blob: None })
}

fn observation_event(observation: Observation) -> Event {
    match observation {
        Observation::Started {
            tenant,
            service_id,
            version,
            recovered,
        } => envelope(
            tenant,
            service_id,
            NODE_ACTOR,
            Kind::ServiceStarted(proto::ServiceStarted { version, recovered }),
        ),
        Observation::Crashed {
            tenant,
            service_id,
            version,
            reason,
            trap_code,
            message,
            restarting,
        } => envelope(
            tenant,
            service_id,
            NODE_ACTOR,
            Kind::ServiceCrashed(proto::ServiceCrashed {
                version,
                reason: reason as i32,
                trap_code,
                // Whatever the runtime saw, the log keeps no more of it than an error would.
                message: crate::limits::cut_to(message, crate::limits::MAX_FAILURE_MESSAGE_BYTES),
                restarting,
            }),
        ),
        Observation::Restarted {
            tenant,
            service_id,
            version,
            restarts,
        } => envelope(
            tenant,
            service_id,
            NODE_ACTOR,
            Kind::ServiceRestarted(proto::ServiceRestarted { version, restarts }),
        ),
        Observation::Stopped {
            tenant,
            service_id,
            version,
            reason,
            how,
        } => envelope(
            tenant,
            service_id,
            NODE_ACTOR,
            Kind::ServiceStopped(proto::ServiceStopped {
                version,
                reason: reason as i32,
                outcome: how.outcome as i32,
                calls_cut_off: how.calls_cut_off,
                message: how.message,
            }),
        ),
        Observation::NodeStarted {
            version,
            node_id,
            recovered,
            replayed_to_seq,
        } => envelope(
            String::new(),
            String::new(),
            NODE_ACTOR,
            Kind::NodeStarted(proto::NodeStarted {
                version,
                node_id,
                recovered,
                replayed_to_seq,
            }),
        ),
    }
}

/// Tenant names: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn validate_tenant(name: &str) -> Result<()> {
    let ok = name.len() <= 63
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid tenant name '{}': use 1 to 63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit",
            quoted(name)
        )))
    }
}

/// Client input quoted in a refusal: escaped, and cut to 64 characters (with its length) so
/// that a huge id cannot crowd out the rule that follows it, or outgrow a gRPC header.
fn quoted(input: &str) -> String {
    const SHOWN: usize = 64;
    let escaped = input.escape_debug().to_string();
    match escaped.char_indices().nth(SHOWN) {
        None => escaped,
        Some((end, _)) => format!("{}… ({} bytes)", &escaped[..end], input.len()),
    }
}

/// Service ids: `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`.
pub fn validate_service_id(id: &str) -> Result<()> {
    let ok = id.len() <= 128
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid service id '{}': use 1 to 128 characters of A-Z, a-z, 0-9, '_', '.' and '-', starting with a letter or digit",
            quoted(id)
        )))
    }
}

/// The most labels a service may carry.
pub const MAX_LABELS: usize = 64;

/// Labels: at most [`MAX_LABELS`]; keys `[A-Za-z0-9][A-Za-z0-9_./-]{0,62}`, values up to 256
/// bytes.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return Err(Error::InvalidArgument(format!(
            "{} labels given; at most {MAX_LABELS} are allowed",
            labels.len()
        )));
    }
    for (key, value) in labels {
        let key_ok = key.len() <= 63
            && key.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-'));
        if !key_ok {
            return Err(Error::InvalidArgument(format!(
                "invalid label key '{}': use 1 to 63 characters of A-Z, a-z, 0-9, '_', '.', '/' and '-', starting with a letter or digit",
                quoted(key)
            )));
        }
        if value.len() > 256 {
            return Err(Error::InvalidArgument(format!(
                "label '{}' has a value over 256 bytes",
                quoted(key)
            )));
        }
    }
    Ok(())
}

/// Idempotency keys: up to 128 visible ASCII characters (`!` to `~`, no spaces).
pub fn validate_idempotency_key(key: &str) -> Result<()> {
    if key.len() <= 128 && key.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(
            "invalid idempotency key: use at most 128 visible ASCII characters ('!' to '~', no spaces)".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_patterns() {
        for ok in ["a", "acme", "a-b_c9", &"x".repeat(63)] {
            assert!(validate_tenant(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Acme", "-a", "a b", "ä", &"x".repeat(64)] {
            assert!(validate_tenant(bad).is_err(), "{bad}");
        }
        for ok in ["E", "echo.v2", "a_b-c", &"x".repeat(128)] {
            assert!(validate_service_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".a", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_service_id(bad).is_err(), "{bad}");
        }
        assert!(validate_idempotency_key("retry-1").is_ok());
        assert!(validate_idempotency_key("has space").is_err());
    }

    #[test]
    fn node_started_names_only_recovered_services_still_in_the_registry() {
        let mut state = State::new(crate::state::Settings::default());
        let mut deployed = envelope(
            "acme",
            "kept",
            "tenant:acme",
            Kind::ServiceDeployed(proto::ServiceDeployed {
                module_sha256: "ab".repeat(32),
                version: 1,
                limits: Some(Limits::default()),
                ..Default::default()
            }),
        );
        deployed.seq = 1;
        state.apply(&deployed).unwrap();
        let service = |id: &str| proto::ServiceRef {
            tenant: "acme".into(),
            service_id: id.into(),
        };
        let observation = Observation::NodeStarted {
            version: "1".into(),
            node_id: "n".into(),
            recovered: vec![service("kept"), service("removed")],
            replayed_to_seq: 1,
        };
        let Ok(Decision::Append { event, .. }) = decide_observation(&state, observation) else {
            panic!("node_started is appended");
        };
        let Some(Kind::NodeStarted(started)) = event.kind else {
            panic!("{event:?}");
        };
        assert_eq!(started.recovered, [service("kept")]);
    }
}
