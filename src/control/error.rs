//! What can go wrong with a command or a query, typed so the API layer can map each case.

use std::sync::Arc;

use crate::runtime::CallError;
use crate::state::{ApplyError, Status};

/// The quotas a deploy may be refused by ([`Error::QuotaExceeded`]'s `quota`): each the key
/// of its limit. Their refusals are counted from the node's start, none left out as unseen.
pub const DEPLOY_QUOTAS: [&str; 7] = [
    "max_services",
    "max_memory_mb",
    "max_tenant_memory_mb",
    "max_module_bytes",
    "max_deploys_per_minute",
    "max_history_mb_per_hour",
    "runtime.max_instances",
];

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("service '{service_id}' not found")]
    NotFound { service_id: String },
    #[error("the module was refused: {0}")]
    InvalidModule(String),
    #[error("service '{service_id}' is {status}{}", if last_error.is_empty() { String::new() } else { format!(": {last_error}") })]
    NotRunning {
        service_id: String,
        status: Status,
        last_error: String,
    },
    #[error("{0}")]
    Call(CallError),
    #[error("quota exceeded: {quota} = {limit} ({detail})")]
    QuotaExceeded {
        quota: &'static str,
        limit: u64,
        detail: String,
        /// For a rate quota, how long until it has room again.
        retry_after: Option<std::time::Duration>,
    },
    #[error(
        "idempotency key '{key}' was already used for a different request; nothing was done (a new request takes a new key)"
    )]
    IdempotencyConflict { key: String },
    /// A remove of a service that is not stopped.
    #[error("service '{service_id}' is {status}: kill it, and remove it once it has stopped")]
    NotStopped { service_id: String, status: Status },
    /// A deploy or kill required a version the service is not at.
    #[error("{}", version_mismatch(service_id, *expected, *actual))]
    VersionMismatch {
        service_id: String,
        expected: u64,
        /// `None`: no service has this id.
        actual: Option<u64>,
    },
    #[error("observation no longer applies: {0}")]
    Stale(ApplyError),
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("the control writer has stopped")]
    Closed,
    #[error("the log could not be written: {0}")]
    Storage(Arc<crate::log::Error>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<crate::log::Error> for Error {
    fn from(e: crate::log::Error) -> Self {
        Error::Storage(Arc::new(e))
    }
}

fn version_mismatch(service_id: &str, expected: u64, actual: Option<u64>) -> String {
    let now = match actual {
        Some(version) => format!("service '{service_id}' is at version {version}"),
        None => format!("service '{service_id}' does not exist"),
    };
    let wanted = match expected {
        0 => "expected_version 0 is for a service that does not exist yet".to_string(),
        version => format!("the request expected version {version}"),
    };
    format!("{now}, and {wanted}: nothing was changed; read the service again and decide afresh")
}
