//! The network APIs: gRPC ([`grpc`], tonic) and REST with Server-Sent Events ([`rest`], axum).
//!
//! No business logic lives here. A handler authenticates the caller ([`auth`]), takes a shed
//! permit ([`crate::shed`]), decodes the request, calls one function of [`crate::control`] (or
//! follows the log through [`watch`]) and maps the result. Both APIs share one error type
//! ([`Error`]) whose kind gives the gRPC code and the HTTP status together.

pub mod auth;
pub mod bodies;
pub mod codec;
mod convert;
pub mod encoded;
mod error;
pub mod grpc;
pub mod grpc_routes;
mod ops;
pub mod pace;
pub mod rest;
pub mod watch;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

pub use auth::{Authenticator, Caller, Principal, TENANT_HEADER};
/// The REST API's JSON form of a service, also what the CLI prints with `--json`.
pub use convert::service_json;
pub use error::{Error, ErrorKind};

use crate::control::Control;
use crate::metrics::Metrics;
use crate::shed::Shedder;

/// Marks the answer to a retry that carried a known idempotency key (`Idempotent-Replayed:
/// true`, as Stripe's API does): the body is the original answer, and nothing was appended.
/// A response header on REST, response metadata on gRPC.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// Settings of the APIs.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// Grace of a kill or shutdown request that names none.
    pub default_grace: Duration,
    /// Progress interval of a Watch that names none.
    pub default_progress_interval: Duration,
    /// Keep-alive comment interval of SSE streams.
    pub sse_keepalive: Duration,
    /// Largest request body (REST) or message (gRPC).
    pub max_body_bytes: usize,
    /// Time limit of non-streaming REST requests (calls have their own).
    pub request_timeout: Duration,
    /// Most of an unread request body discarded before the answer goes out.
    pub discard_bytes: usize,
    /// Time a client may take none of what the node sends it: a backup it does not read is
    /// given up after it, as its connection would be.
    pub write_stall: Duration,
}

/// What every handler of both APIs shares.
#[derive(Debug)]
pub struct ApiState {
    pub control: Control,
    pub auth: Authenticator,
    pub shed: Shedder,
    /// Bytes of request bodies in flight, over both APIs.
    pub bodies: Arc<bodies::BodyBudget>,
    /// Bytes of service log lines sent per second, per principal.
    pub log_pace: pace::ReadPace,
    /// Bytes of history that Watch and SSE streams replay per second, per principal.
    pub history_pace: Arc<pace::ReadPace>,
    /// Recent events encoded once for every watcher.
    pub frames: encoded::Frames,
    pub metrics: Arc<Metrics>,
    pub options: ApiOptions,
    /// Cancelled when the node begins to shut down: streams end, new work is refused.
    pub stopping: CancellationToken,
    /// Cancelled to ask the node to shut down (the Shutdown RPC and `POST /shutdown`).
    pub shutdown_requested: CancellationToken,
    /// The grace a Shutdown request asked for.
    pub shutdown_grace: std::sync::Mutex<Option<Duration>>,
    pub started: Instant,
}

impl ApiState {
    /// Refuses new work once the node is stopping.
    pub fn check_open(&self) -> Result<(), Error> {
        if self.stopping.is_cancelled() {
            Err(Error::shutting_down())
        } else {
            Ok(())
        }
    }

    /// Asks the node to shut down, within `grace`.
    pub fn request_shutdown(&self, grace: Duration) {
        *self.shutdown_grace.lock().unwrap_or_else(|p| p.into_inner()) = Some(grace);
        self.shutdown_requested.cancel();
    }

    pub fn grace_or_default(&self, grace_ms: u32) -> Duration {
        if grace_ms == 0 {
            self.options.default_grace
        } else {
            Duration::from_millis(grace_ms.into())
        }
    }
}

/// Decrements a gauge when the stream it counts ends, however it ends.
#[derive(Debug)]
pub(crate) struct GaugeGuard(prometheus::IntGauge);

impl GaugeGuard {
    pub(crate) fn new(gauge: prometheus::IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
