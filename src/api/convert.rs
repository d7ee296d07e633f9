//! Projections and runtime figures to API messages. REST's JSON is built from the gRPC message,
//! field for field, so the two cannot differ.

use serde_json::{Value, json};

use crate::event::limits_json;
use crate::proto;
use crate::runtime::{LiveStatus, LogLine};
use crate::state::{Desired, Service};

pub fn service_status(service: &Service, live: Option<LiveStatus>) -> proto::ServiceStatus {
    let live = live.unwrap_or_default();
    let last_error = if service.last_error.is_empty() {
        live.last_error
    } else {
        service.last_error.clone()
    };
    proto::ServiceStatus {
        service_id: service.id.clone(),
        tenant: service.tenant.clone(),
        version: service.version,
        status: service.status.as_str().to_string(),
        module_sha256: service.module_sha256.clone(),
        labels: service.labels.clone(),
        limits: Some(service.limits),
        created_at_ms: service.created_at_ms,
        updated_at_ms: service.updated_at_ms,
        restarts: service.restarts,
        memory_bytes: live.memory_bytes,
        calls: live.calls,
        calls_failed: live.calls_failed,
        last_error,
        uptime_ms: live.uptime_ms,
        cpu_ms: live.cpu_ms,
        module_size: service.module_size,
        desired: match service.desired {
            Desired::Running => "running",
            Desired::Stopped => "stopped",
        }
        .to_string(),
        last_seq: service.last_seq,
    }
}

/// The REST form of a `ServiceStatus`.
pub fn service_json(status: &proto::ServiceStatus) -> Value {
    json!({
        "service_id": status.service_id,
        "tenant": status.tenant,
        "version": status.version,
        "status": status.status,
        "module_sha256": status.module_sha256,
        "labels": status.labels,
        "limits": limits_json(&status.limits.unwrap_or_default()),
        "created_at_ms": status.created_at_ms,
        "updated_at_ms": status.updated_at_ms,
        "restarts": status.restarts,
        "memory_bytes": status.memory_bytes,
        "calls": status.calls,
        "calls_failed": status.calls_failed,
        "last_error": status.last_error,
        "uptime_ms": status.uptime_ms,
        "cpu_ms": status.cpu_ms,
        "module_size": status.module_size,
        "desired": status.desired,
        "last_seq": status.last_seq,
    })
}

/// A line of the log `log_id`.
pub fn log_line(line: &LogLine, log_id: u64) -> proto::LogLine {
    proto::LogLine {
        seq: line.seq,
        timestamp_ms: line.timestamp_ms,
        level: line.level.as_str().to_string(),
        message: line.message.clone(),
        version: line.version,
        log_id,
    }
}

pub fn log_line_json(line: &LogLine) -> Value {
    json!({
        "seq": line.seq,
        "timestamp_ms": line.timestamp_ms,
        "level": line.level.as_str(),
        "message": line.message,
        "version": line.version,
    })
}
