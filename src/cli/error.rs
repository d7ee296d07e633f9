//! What a client command's failure is: one sentence for stderr, and the exit code scripts
//! branch on. Every gRPC code is classified here, once, with an exhaustive match.

use tonic::Code;

/// The exit codes of `solo` (listed in `solo --help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success,
    /// The node refused the request, the call failed, a file could not be read.
    Failure,
    /// Bad flags or arguments (clap exits with the same code).
    Usage,
    /// No such service.
    NotFound,
    /// Missing or wrong credentials, or a request the principal may not make.
    Denied,
    /// The node cannot be reached, or is shutting down.
    Unavailable,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::Usage => 2,
            Exit::NotFound => 3,
            Exit::Denied => 4,
            Exit::Unavailable => 5,
        }
    }

    /// The exit code for a gRPC status code.
    pub fn of(code: Code) -> Exit {
        match code {
            Code::Ok => Exit::Success,
            Code::NotFound => Exit::NotFound,
            Code::Unauthenticated | Code::PermissionDenied => Exit::Denied,
            Code::Unavailable => Exit::Unavailable,
            Code::Cancelled
            | Code::Unknown
            | Code::InvalidArgument
            | Code::DeadlineExceeded
            | Code::AlreadyExists
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::Internal
            | Code::DataLoss => Exit::Failure,
        }
    }
}

/// A failed client command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub exit: Exit,
    /// One sentence for a person; empty when there is nothing to say (stdout was closed).
    pub message: String,
    /// Whether the same request may succeed if sent again unchanged (a follower then
    /// reconnects rather than give up): the node could not be reached, was unavailable or
    /// busy, or the time ran out; not a refusal that holds until the request changes.
    pub retry: bool,
    /// What went wrong, for programs: the node's error code (its `solo-error`, REST's `code`),
    /// or else the gRPC code's name, in snake case; for the CLI's own errors, its exit's.
    pub code: String,
}

impl CliError {
    pub fn new(exit: Exit, message: impl Into<String>) -> CliError {
        let code = match exit {
            Exit::Success => "",
            Exit::Failure => "failed",
            Exit::Usage => "usage",
            Exit::NotFound => "not_found",
            Exit::Denied => "permission_denied",
            Exit::Unavailable => "unavailable",
        };
        CliError {
            exit,
            message: message.into(),
            retry: false,
            code: code.to_string(),
        }
    }

    /// The error as `--json` prints it, on stdout: the command's one document (or, for a
    /// command printing JSON lines, its last line).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "code": self.code,
                "message": self.message,
                "exit_code": self.exit.code(),
                "retryable": self.retry,
            }
        })
    }

    /// The same error, marked as worth a retry.
    pub fn retryable(mut self) -> CliError {
        self.retry = true;
        self
    }

    pub fn failure(message: impl Into<String>) -> CliError {
        CliError::new(Exit::Failure, message)
    }

    pub fn usage(message: impl Into<String>) -> CliError {
        CliError::new(Exit::Usage, message)
    }

    /// The reader of stdout went away (`solo events | head`): stop quietly, successfully.
    pub fn stdout_closed() -> CliError {
        CliError::new(Exit::Success, "")
    }

    /// The node cannot be reached at all.
    pub fn unreachable(endpoint: &str, cause: &dyn std::error::Error) -> CliError {
        CliError::new(
            Exit::Unavailable,
            format!("cannot reach the node at {endpoint}: {}", causes(cause)),
        )
        .retryable()
    }

    /// A failed request: the node's own message, or what went wrong on the way to it.
    pub fn from_status(status: &tonic::Status, endpoint: &str) -> CliError {
        // A status the client made up (the connection broke) carries the error behind it.
        if let Some(source) = std::error::Error::source(status) {
            return CliError::new(
                Exit::Unavailable,
                format!("lost the connection to the node at {endpoint}: {}", causes(source)),
            )
            .retryable();
        }
        let exit = Exit::of(status.code());
        let retry = worth_retrying(status);
        let mut message = status.message().trim().to_string();
        if message.is_empty() {
            message = format!("the node answered {:?}", status.code());
        }
        match status.code() {
            Code::Unauthenticated => message.push_str(" (give a token with --token or SOLO_TOKEN)"),
            Code::ResourceExhausted => {
                if let Some(ms) = status
                    .metadata()
                    .get("retry-after-ms")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    message.push_str(&format!(" (retry after {})", super::output::human_duration_ms(ms)));
                }
            }
            _ => {}
        }
        let code = status
            .metadata()
            .get("solo-error")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            .map_or_else(|| snake_case_name(status.code()).to_string(), str::to_string);
        CliError {
            exit,
            message,
            retry,
            code,
        }
    }
}

/// A gRPC code's name in snake case, as the node's own error codes are written.
fn snake_case_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// Whether a request the node failed with `status` may succeed if sent again unchanged: the
/// node was unavailable, the time ran out, or it was busy and said when to come back. A quota
/// that holds until the request changes (a module over its size) comes without that hint, as
/// does a service's own error or trap, which the same request meets again.
fn worth_retrying(status: &tonic::Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => true,
        Code::ResourceExhausted => status.metadata().contains_key("retry-after-ms"),
        Code::Ok
        | Code::Unknown
        | Code::Internal
        | Code::Aborted
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::DataLoss
        | Code::Unauthenticated => false,
    }
}

/// The messages of an error and its sources, most general first, without tonic's and hyper's
/// generic wrappers or repeats.
pub fn causes(error: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        let generic = matches!(
            text.as_str(),
            "transport error" | "error trying to connect" | "client error (Connect)" | "status: Unknown"
        );
        if !generic && !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    if parts.is_empty() {
        error.to_string()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_exits() {
        assert_eq!(Exit::of(Code::NotFound).code(), 3);
        assert_eq!(Exit::of(Code::PermissionDenied).code(), 4);
        assert_eq!(Exit::of(Code::Unauthenticated).code(), 4);
        assert_eq!(Exit::of(Code::Unavailable).code(), 5);
        assert_eq!(Exit::of(Code::InvalidArgument).code(), 1);
    }

    #[test]
    fn statuses_keep_the_nodes_message() {
        let e = CliError::from_status(&tonic::Status::not_found("service 'x' not found"), "http://n");
        assert_eq!((e.exit, e.message.as_str()), (Exit::NotFound, "service 'x' not found"));
        let mut busy = tonic::Status::resource_exhausted("too many requests");
        busy.metadata_mut().insert("retry-after-ms", "1000".parse().unwrap());
        let e = CliError::from_status(&busy, "http://n");
        assert_eq!(e.message, "too many requests (retry after 1s)");
    }

    #[test]
    fn errors_carry_a_code_for_programs() {
        let mut refused = tonic::Status::invalid_argument("bad module");
        refused
            .metadata_mut()
            .insert("solo-error", "invalid_module".parse().unwrap());
        let e = CliError::from_status(&refused, "http://n");
        assert_eq!(e.code, "invalid_module");
        let mut busy = tonic::Status::resource_exhausted("busy");
        busy.metadata_mut().insert("retry-after-ms", "1000".parse().unwrap());
        let e = CliError::from_status(&busy, "http://n");
        assert_eq!(e.code, "resource_exhausted");
        let json = e.to_json();
        assert_eq!(json["error"]["exit_code"], 1);
        assert_eq!(json["error"]["retryable"], true);
        assert_eq!(json["error"]["message"], "busy (retry after 1s)");
        assert_eq!(CliError::usage("no").code, "usage");
    }

    /// `retryable` tells an agent whether to send the same request again: never for a refusal
    /// that holds until the request changes, or a failure the same request meets again.
    #[test]
    fn only_what_may_pass_unchanged_is_retryable() {
        let retryable = |status: tonic::Status| CliError::from_status(&status, "http://n").retry;
        assert!(retryable(tonic::Status::unavailable("shutting down")));
        assert!(retryable(tonic::Status::deadline_exceeded("call timed out")));
        assert!(!retryable(tonic::Status::resource_exhausted("over max_module_bytes")));
        assert!(!retryable(tonic::Status::invalid_argument("bad module")));
        assert!(!retryable(tonic::Status::failed_precondition("version mismatch")));
        assert!(!retryable(tonic::Status::aborted("the service trapped")));
        assert!(!retryable(tonic::Status::unknown("the service answered an error")));
        assert!(!retryable(tonic::Status::not_found("no such service")));
    }
}
