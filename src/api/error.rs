//! The one error type of both APIs. `kind()` decides the gRPC code and the HTTP status
//! together, so gRPC and REST cannot drift apart; every lower-layer error is classified here,
//! once, with exhaustive matches.

use std::time::Duration;

use http::StatusCode;
use tonic::Code;

use crate::control;
use crate::runtime::CallError;

/// What went wrong, as both APIs report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed input: a bad id, a bad module, bad JSON or protobuf.
    InvalidArgument,
    /// No credentials, or credentials that are not valid.
    Unauthenticated,
    /// Valid credentials, but not allowed to do this (a tenant calling Shutdown).
    PermissionDenied,
    /// No such service (also: another tenant's), or no such route.
    NotFound,
    /// An idempotency key that came with another request before. Not ALREADY_EXISTS nor 409,
    /// which clients may take for "done already": 422 as the IETF's Idempotency-Key draft asks,
    /// and FAILED_PRECONDITION, the key's earlier use being the state the request fails on.
    IdempotencyKeyReused,
    /// The request required a version the service is not at (a lost read-modify-write race).
    VersionMismatch,
    /// The service is not in a state to take the request (crashed, stopped).
    FailedPrecondition,
    /// A quota is used up.
    QuotaExceeded,
    /// Too many requests in flight, or a full mailbox: retry later.
    Overloaded,
    /// The call did not finish in time.
    DeadlineExceeded,
    /// The guest trapped while handling the call.
    ServiceTrapped,
    /// The guest answered with an application error.
    ServiceError,
    /// The node is shutting down.
    ShuttingDown,
    /// The node cannot serve right now.
    Unavailable,
    /// The log's map or disk is full.
    InsufficientStorage,
    /// A body over the configured limit.
    PayloadTooLarge,
    /// A body of the wrong content type.
    UnsupportedMediaType,
    /// The route exists, the method does not.
    MethodNotAllowed,
    /// A request in a form the node does not read (a transfer coding other than chunked).
    NotImplemented,
    /// A bug or an I/O failure inside the node.
    Internal,
}

impl ErrorKind {
    /// The machine-readable code in REST error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::NotFound => "not_found",
            ErrorKind::IdempotencyKeyReused => "idempotency_key_reused",
            ErrorKind::VersionMismatch => "version_mismatch",
            ErrorKind::FailedPrecondition => "failed_precondition",
            ErrorKind::QuotaExceeded => "quota_exceeded",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::ServiceTrapped => "service_trapped",
            ErrorKind::ServiceError => "service_error",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::InsufficientStorage => "insufficient_storage",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::UnsupportedMediaType => "unsupported_media_type",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::NotImplemented => "not_implemented",
            ErrorKind::Internal => "internal",
        }
    }

    pub fn grpc_code(self) -> Code {
        match self {
            ErrorKind::InvalidArgument | ErrorKind::UnsupportedMediaType => Code::InvalidArgument,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::NotFound => Code::NotFound,
            // As gRPC's guide says of a failed test-and-set: retry the whole read-modify-write.
            ErrorKind::VersionMismatch => Code::Aborted,
            ErrorKind::FailedPrecondition | ErrorKind::IdempotencyKeyReused => Code::FailedPrecondition,
            ErrorKind::QuotaExceeded | ErrorKind::Overloaded | ErrorKind::InsufficientStorage => {
                Code::ResourceExhausted
            }
            ErrorKind::PayloadTooLarge => Code::ResourceExhausted,
            ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorKind::ServiceTrapped => Code::Aborted,
            ErrorKind::ServiceError => Code::Unknown,
            ErrorKind::ShuttingDown | ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::MethodNotAllowed | ErrorKind::NotImplemented => Code::Unimplemented,
            ErrorKind::Internal => Code::Internal,
        }
    }

    pub fn http_status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::VersionMismatch | ErrorKind::FailedPrecondition => StatusCode::CONFLICT,
            ErrorKind::QuotaExceeded | ErrorKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::ServiceTrapped => StatusCode::BAD_GATEWAY,
            ErrorKind::ServiceError | ErrorKind::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::ShuttingDown | ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::NotImplemented => StatusCode::NOT_IMPLEMENTED,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An error of either API: its kind, a message for a person, and when to retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    /// Private so that [`Error::new`], which bounds it, is the only way in.
    message: String,
    /// For overload and quota errors: when a retry may succeed.
    pub retry_after: Option<Duration>,
}

impl Error {
    /// An error whose message is cut to [`MAX_MESSAGE_BYTES`]: messages quote what the
    /// client sent (an id, a line of WAT), and gRPC carries them in a header.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: crate::limits::cut_to(message.into(), MAX_MESSAGE_BYTES),
            retry_after: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Unauthenticated, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::PermissionDenied, message)
    }

    pub fn shutting_down() -> Error {
        Error::new(ErrorKind::ShuttingDown, "the node is shutting down")
    }

    pub fn with_retry_after(mut self, after: Duration) -> Error {
        self.retry_after = Some(after);
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The error as `caller` should read it: an admin who named no tenant acted for the
    /// `default` one, and a service it did not find there may well be another tenant's.
    pub fn seen_by(self, caller: &super::auth::Caller) -> Error {
        if self.kind != ErrorKind::NotFound || !caller.is_admin() || caller.scope().is_some() {
            return self;
        }
        let message = format!(
            "{} in tenant '{}': the admin acts for the tenant it names (x-tenant-id, ?tenant=, --tenant)",
            self.message,
            caller.tenant()
        );
        Error {
            message: crate::limits::cut_to(message, MAX_MESSAGE_BYTES),
            ..self
        }
    }

    /// The JSON body every REST error (and an SSE stream's last `error` frame) carries.
    pub fn json_body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.kind.as_str(), "message": self.message() })
    }

    /// The gRPC status, with the error's kind in `solo-error` metadata (the `error` of a REST
    /// body: several kinds share a code, as a service's `service_error` shares `UNKNOWN` with
    /// failures of the transport) and the retry hint in `retry-after-ms`, and in
    /// `grpc-retry-pushback-ms` for gRPC's built-in retry policies (gRFC A6).
    pub fn to_status(&self) -> tonic::Status {
        let mut status = tonic::Status::new(self.kind.grpc_code(), self.message.clone());
        status.metadata_mut().insert(
            "solo-error",
            tonic::metadata::MetadataValue::from_static(self.kind.as_str()),
        );
        if let Some(after) = self.retry_after
            && let Ok(value) = after
                .as_millis()
                .to_string()
                .parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>()
        {
            status.metadata_mut().insert("retry-after-ms", value.clone());
            status.metadata_mut().insert("grpc-retry-pushback-ms", value);
        }
        status
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> tonic::Status {
        error.to_status()
    }
}

/// The longest message either API sends. gRPC puts it in the `grpc-message` header, which
/// clients refuse past 8 to 16 KiB (percent-encoding can triple it), so 1 KiB leaves room.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// How long a client should wait after being shed or refused by a rate quota.
const RETRY_SOON: Duration = Duration::from_secs(1);

impl From<control::Error> for Error {
    fn from(error: control::Error) -> Error {
        use control::Error as E;
        let message = error.to_string();
        match error {
            E::InvalidArgument(_) | E::InvalidModule(_) => Error::new(ErrorKind::InvalidArgument, message),
            E::NotFound { .. } => Error::new(ErrorKind::NotFound, message),
            E::QuotaExceeded { quota, retry_after, .. } => {
                let refused = Error::new(ErrorKind::QuotaExceeded, message);
                if let Some(after) = retry_after {
                    return refused.with_retry_after(after);
                }
                match quota {
                    // Limits on the request itself, or on what the tenant holds: the same
                    // request is refused until the request, or the tenant's own services,
                    // change, so no `Retry-After` invites a retry.
                    "max_module_bytes" | "max_memory_mb" | "max_services" | "max_tenant_memory_mb" => refused,
                    _ => refused.with_retry_after(RETRY_SOON),
                }
            }
            E::IdempotencyConflict { .. } => Error::new(ErrorKind::IdempotencyKeyReused, message),
            E::VersionMismatch { .. } => Error::new(ErrorKind::VersionMismatch, message),
            E::NotRunning { .. } | E::NotStopped { .. } => Error::new(ErrorKind::FailedPrecondition, message),
            E::Stale(_) => Error::new(ErrorKind::Internal, message),
            E::ShuttingDown => Error::shutting_down(),
            E::Closed => Error::new(ErrorKind::Unavailable, message),
            E::Storage(storage) => Error::new(
                storage_kind(&storage),
                format!("the log could not be written: {}", storage.for_clients()),
            ),
            E::Call(call) => Error::from(call),
        }
    }
}

fn storage_kind(error: &crate::log::Error) -> ErrorKind {
    use crate::log::Error as E;
    match error {
        E::MapFull { .. } | E::DiskFull { .. } | E::FileSizeLimit { .. } => ErrorKind::InsufficientStorage,
        E::ReadersFull => ErrorKind::Unavailable,
        E::Closed => ErrorKind::Unavailable,
        E::Io { .. }
        | E::UnsupportedFormat { .. }
        | E::BadDataDir { .. }
        | E::Damaged { .. }
        | E::AlreadyOpen { .. }
        | E::InUse { .. }
        | E::CorruptRecord { .. }
        | E::UndecodableRecord { .. }
        | E::MissingRecord { .. }
        | E::OutOfOrder { .. }
        | E::NotPastHead { .. }
        | E::Lmdb { .. } => ErrorKind::Internal,
    }
}

impl From<CallError> for Error {
    fn from(error: CallError) -> Error {
        let message = error.to_string();
        match error {
            CallError::NotRunning { .. } | CallError::Stopped { .. } => {
                Error::new(ErrorKind::FailedPrecondition, message)
            }
            CallError::Busy { .. } => Error::new(ErrorKind::Overloaded, message).with_retry_after(RETRY_SOON),
            CallError::Timeout { .. } => Error::new(ErrorKind::DeadlineExceeded, message),
            CallError::Trapped { .. } => Error::new(ErrorKind::ServiceTrapped, message),
            CallError::Service { .. } | CallError::ResponseTooLarge { .. } => {
                Error::new(ErrorKind::ServiceError, message)
            }
        }
    }
}

impl From<crate::log::Error> for Error {
    fn from(error: crate::log::Error) -> Error {
        Error::new(storage_kind(&error), error.for_clients())
    }
}
