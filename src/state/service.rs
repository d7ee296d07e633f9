//! One service as the log says it is, and the per-tenant figures quotas are checked against.

use std::collections::{HashMap, VecDeque};

use crate::proto::{DesiredState, IdempotentOp, Limits, ServiceStatusCode};

/// The maps of the projection: hashbrown with foldhash, which is fast and seeded per map
/// (service ids come from tenants, so the hash must not be predictable).
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
    pub module_size: u64,
    pub version: u64,
    pub limits: Limits,
    pub labels: HashMap<String, String>,
    pub desired: Desired,
    pub status: Status,
    /// Restarts since the current version was deployed.
    pub restarts: u32,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// The last crash's message; empty once a new version is deployed.
    pub last_error: String,
    /// Seq of the `service_deployed` event of the current version.
    pub deployed_seq: u64,
    /// Seq of the last event about this service.
    pub last_seq: u64,
    /// Seqs of the service's most recent events, oldest first (at most [`RECENT_EVENTS`]).
    pub recent_seqs: VecDeque<u64>,
}

/// Events per service whose seqs the projection keeps, for "what happened to it lately".
pub const RECENT_EVENTS: usize = 10;

impl Service {
    /// Whether the service holds quota: everything the user has not killed.
    pub fn is_active(&self) -> bool {
        self.desired == Desired::Running
    }

    /// Whether a starting node brings this service back: it should run, and it was up (or on
    /// its way up) when the node stopped. Crashed and failed services stay down.
    /// A new, not yet deployed service, as a first `service_deployed` event creates it.
    pub(crate) fn new(event: &crate::proto::Event, limits: Limits) -> Service {
        Service {
            tenant: event.tenant.clone(),
            id: event.service_id.clone(),
            module_sha256: String::new(),
            module_size: 0,
            version: 0,
            limits,
            labels: HashMap::new(),
            desired: Desired::Stopped,
            status: Status::Stopped,
            restarts: 0,
            created_at_ms: event.timestamp_ms,
            updated_at_ms: event.timestamp_ms,
            last_error: String::new(),
            deployed_seq: event.seq,
            last_seq: event.seq,
            recent_seqs: VecDeque::with_capacity(RECENT_EVENTS),
        }
    }

    /// Records that `event` changed this service.
    pub(crate) fn touched(&mut self, event: &crate::proto::Event) {
        self.updated_at_ms = event.timestamp_ms;
        self.last_seq = event.seq;
        while self.recent_seqs.len() >= RECENT_EVENTS {
            self.recent_seqs.pop_front();
        }
        self.recent_seqs.push_back(event.seq);
    }

    pub fn comes_back_with_the_node(&self) -> bool {
        self.desired == Desired::Running && matches!(self.status, Status::Starting | Status::Running | Status::Stopped)
    }
}

/// A remembered answer to a command that carried an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub op: IdempotentOp,
    pub service_id: String,
    /// Seq of the event that carried the key.
    pub seq: u64,
    pub version: u64,
    /// SHA-256 of the deployed module; zeros for a kill.
    pub module_hash: [u8; 32],
    pub at_ms: u64,
}

/// Everything of one tenant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tenant {
    pub services: Map<String, Service>,
    /// Services that hold quota ([`Service::is_active`]) and the memory they reserve.
    pub active_services: u32,
    pub active_memory_bytes: u64,
    /// Commit times of deploys within the rate window, oldest first.
    pub recent_deploys: VecDeque<u64>,
    pub idempotency: Map<String, IdempotencyRecord>,
}
