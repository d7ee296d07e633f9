//! The runtime's errors: a refused module, a failed start, a failed call.

use crate::event::crash_reason_name;
use crate::proto::CrashReason;

/// A module that cannot be deployed, and why (for the person who sent it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidModule(pub String);

/// Why a module sent for deploy was not made ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Invalid(#[from] InvalidModule),
    /// The tenant had as many modules compiled within the window as its quota allows.
    #[error("{compiled} modules were compiled for the tenant within the window, its limit of {limit}")]
    OverCompileQuota {
        limit: u32,
        compiled: u64,
        /// Until the quota has room again.
        retry_after: std::time::Duration,
    },
}

/// An instance that did not come up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StartFailure {
    pub reason: CrashReason,
    /// The trap's kind, named as a call's crash names it (`unreachable`, `cpu_limit`, and
    /// `start_timeout` for a start that outlasted its time); empty when nothing trapped.
    pub trap_code: String,
    pub message: String,
}

impl StartFailure {
    /// A start that failed with no trap.
    pub fn new(reason: CrashReason, message: impl Into<String>) -> StartFailure {
        StartFailure {
            reason,
            trap_code: String::new(),
            message: message.into(),
        }
    }
}

/// A trap's kind for a person, each name once: `unreachable`, `cpu_limit`, or, when a limit led
/// to the trap, both (`memory_limit, then unreachable`).
fn trap_kind(reason: CrashReason, trap_code: &str) -> String {
    let reason = crash_reason_name(reason);
    if reason == "trap" || reason == trap_code {
        trap_code.to_string()
    } else {
        format!("{reason}, then {trap_code}")
    }
}

/// How one call into a guest failed, as the instance saw it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallFailure {
    /// The guest trapped, ran out of CPU or broke the ABI: the instance is replaced.
    #[error("{}: {message}", trap_kind(*reason, trap_code))]
    Trap {
        reason: CrashReason,
        trap_code: String,
        message: String,
    },
    /// The call ran past its time limit: the instance is replaced.
    #[error("the call ran past its time limit")]
    Timeout,
    /// The guest answered with an application error (bit 63 of `solo_handle`'s result).
    #[error("{0}")]
    Service(String),
    /// The guest answered with more than the node carries back. Not the guest's fault as a
    /// trap is (the request may have asked for it): the instance lives on.
    #[error("the response is {bytes} bytes, over this node's limit of {limit} (runtime.max_response_bytes)")]
    ResponseTooLarge { bytes: u32, limit: usize },
}

impl CallFailure {
    pub fn abi(message: impl Into<String>) -> CallFailure {
        CallFailure::Trap {
            reason: CrashReason::Trap,
            trap_code: "abi_violation".into(),
            message: message.into(),
        }
    }

    /// Whether the instance must be replaced after this failure.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, CallFailure::Service(_) | CallFailure::ResponseTooLarge { .. })
    }
}

/// Why a call did not produce a response, as the caller sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("service '{service_id}' is not running")]
    NotRunning { service_id: String },
    #[error("service '{service_id}' is busy: its mailbox of {capacity} calls is full; retry later")]
    Busy { service_id: String, capacity: u32 },
    #[error("the call to '{service_id}' did not finish within {timeout_ms} ms")]
    Timeout { service_id: String, timeout_ms: u64 },
    #[error("service '{service_id}' trapped ({}): {message}", trap_kind(*reason, trap_code))]
    Trapped {
        service_id: String,
        reason: CrashReason,
        trap_code: String,
        message: String,
    },
    #[error("service '{service_id}' returned an error: {message}")]
    Service { service_id: String, message: String },
    #[error(
        "service '{service_id}' answered with {bytes} bytes, over this node's limit of {limit} \
         (runtime.max_response_bytes); the service runs on"
    )]
    ResponseTooLarge {
        service_id: String,
        bytes: u32,
        limit: usize,
    },
    #[error("service '{service_id}' stopped before the call finished")]
    Stopped { service_id: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trapped(reason: CrashReason, trap_code: &str, message: &str) -> String {
        CallError::Trapped {
            service_id: "svc".into(),
            reason,
            trap_code: trap_code.into(),
            message: message.into(),
        }
        .to_string()
    }

    #[test]
    fn a_trap_is_described_naming_each_kind_once() {
        assert_eq!(
            trapped(
                CrashReason::Trap,
                "unreachable",
                "wasm `unreachable` instruction executed"
            ),
            "service 'svc' trapped (unreachable): wasm `unreachable` instruction executed"
        );
        assert_eq!(
            trapped(CrashReason::CpuLimit, "cpu_limit", "the call ran past its CPU limit"),
            "service 'svc' trapped (cpu_limit): the call ran past its CPU limit"
        );
        assert_eq!(
            trapped(
                CrashReason::MemoryLimit,
                "unreachable",
                "wasm `unreachable` instruction executed"
            ),
            "service 'svc' trapped (memory_limit, then unreachable): wasm `unreachable` instruction executed"
        );
    }
}
