//! Events as Solo's log stores them: how they are encoded, named and shown.
//!
//! The JSON form here is the one `solo log dump --json` prints and the REST API streams:
//! `{seq, timestamp_ms, tenant, service_id, actor, kind, …fields of the kind}`.

use std::fmt::Write as _;
use std::sync::Arc;

use prost::Message as _;
use serde_json::{Map, Value, json};

use crate::log::Record;
use crate::proto::{CrashReason, Event, Limits, RemovalReason, StopOutcome, StopReason, event::Kind};

/// A committed event as tailers receive it: decoded once, shared.
pub type SharedEvent = Arc<Event>;

impl Record for Event {
    fn seq(&self) -> u64 {
        self.seq
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        // No `reserve`: `encode` measures the event itself, and the batch's buffer is reused,
        // so a second measurement would only repeat work. A Vec never runs out of space.
        self.encode(out).expect("a Vec grows as needed");
    }

    fn decode_payload(payload: &[u8]) -> Result<Self, String> {
        Event::decode(payload).map_err(|e| e.to_string())
    }
}

/// The kinds of event, without their fields: for filters, names and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    ServiceDeployed,
    ServiceStarted,
    ServiceCrashed,
    ServiceRestarted,
    ServiceKillRequested,
    ServiceStopped,
    ShutdownRequested,
    NodeStarted,
    ServiceRemoved,
}

impl EventKind {
    pub const ALL: [EventKind; 9] = [
        EventKind::ServiceDeployed,
        EventKind::ServiceStarted,
        EventKind::ServiceCrashed,
        EventKind::ServiceRestarted,
        EventKind::ServiceKillRequested,
        EventKind::ServiceStopped,
        EventKind::ShutdownRequested,
        EventKind::NodeStarted,
        EventKind::ServiceRemoved,
    ];

    /// The snake_case name used in filters, SSE `event:` lines and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ServiceDeployed => "service_deployed",
            EventKind::ServiceStarted => "service_started",
            EventKind::ServiceCrashed => "service_crashed",
            EventKind::ServiceRestarted => "service_restarted",
            EventKind::ServiceKillRequested => "service_kill_requested",
            EventKind::ServiceStopped => "service_stopped",
            EventKind::ShutdownRequested => "shutdown_requested",
            EventKind::NodeStarted => "node_started",
            EventKind::ServiceRemoved => "service_removed",
        }
    }

    pub fn of(kind: &Kind) -> EventKind {
        match kind {
            Kind::ServiceDeployed(_) => EventKind::ServiceDeployed,
            Kind::ServiceStarted(_) => EventKind::ServiceStarted,
            Kind::ServiceCrashed(_) => EventKind::ServiceCrashed,
            Kind::ServiceRestarted(_) => EventKind::ServiceRestarted,
            Kind::ServiceKillRequested(_) => EventKind::ServiceKillRequested,
            Kind::ServiceStopped(_) => EventKind::ServiceStopped,
            Kind::ShutdownRequested(_) => EventKind::ShutdownRequested,
            Kind::NodeStarted(_) => EventKind::NodeStarted,
            Kind::ServiceRemoved(_) => EventKind::ServiceRemoved,
        }
    }

    /// The kind of `event`; `None` for a kind this build does not know (written by a newer one).
    pub fn of_event(event: &Event) -> Option<EventKind> {
        event.kind.as_ref().map(EventKind::of)
    }
}

impl std::str::FromStr for EventKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == name).ok_or_else(|| {
            let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
            format!("unknown event kind '{name}'; known kinds: {}", known.join(", "))
        })
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name of an event's kind, `"unknown"` for one this build does not know.
pub fn kind_name(event: &Event) -> &'static str {
    EventKind::of_event(event).map_or("unknown", EventKind::as_str)
}

pub fn crash_reason_name(reason: CrashReason) -> &'static str {
    match reason {
        CrashReason::Unspecified => "unspecified",
        CrashReason::Trap => "trap",
        CrashReason::CpuLimit => "cpu_limit",
        CrashReason::MemoryLimit => "memory_limit",
        CrashReason::InitFailure => "init_failure",
        CrashReason::LoadFailure => "load_failure",
    }
}

pub fn stop_reason_name(reason: StopReason) -> &'static str {
    match reason {
        StopReason::Unspecified => "unspecified",
        StopReason::Killed => "killed",
        StopReason::NodeShutdown => "node_shutdown",
        StopReason::Replaced => "replaced",
    }
}

/// How a stop went, by its number: `unspecified` for a stop recorded before outcomes were, or
/// an outcome from a newer build.
pub fn stop_outcome_name(outcome: i32) -> &'static str {
    match StopOutcome::try_from(outcome).unwrap_or(StopOutcome::Unspecified) {
        StopOutcome::Unspecified => "unspecified",
        StopOutcome::Clean => "clean",
        StopOutcome::GraceExpired => "grace_expired",
        StopOutcome::Forced => "forced",
        StopOutcome::Failed => "failed",
        StopOutcome::NotRunning => "not_running",
    }
}

/// The reason of a `service_removed` by its number: a removal from before reasons were
/// recorded (0) was a requested one, as only clients removed services then; a reason from a
/// newer build is `unspecified`, as for every enum.
pub fn removal_reason_name(reason: i32) -> &'static str {
    match RemovalReason::try_from(reason) {
        Ok(RemovalReason::Unspecified | RemovalReason::Requested) => "requested",
        Ok(RemovalReason::MaxStoppedServices) => "max_stopped_services",
        Err(_) => "unspecified",
    }
}

pub fn limits_json(limits: &Limits) -> Value {
    json!({
        "memory_bytes": limits.memory_bytes,
        "call_timeout_ms": limits.call_timeout_ms,
        "cpu_ms_per_call": limits.cpu_ms_per_call,
        "mailbox_capacity": limits.mailbox_capacity,
        "max_restarts": limits.max_restarts,
        "restart_window_ms": limits.restart_window_ms,
    })
}

/// The event as one JSON object: the envelope, `kind`, then the fields of the kind.
pub fn to_json(event: &Event) -> Value {
    let mut out = Map::new();
    out.insert("seq".into(), event.seq.into());
    out.insert("timestamp_ms".into(), event.timestamp_ms.into());
    out.insert("tenant".into(), event.tenant.clone().into());
    out.insert("service_id".into(), event.service_id.clone().into());
    out.insert("actor".into(), event.actor.clone().into());
    out.insert("kind".into(), kind_name(event).into());
    if let Some(Value::Object(fields)) = event.kind.as_ref().map(kind_fields_json) {
        out.extend(fields);
    }
    Value::Object(out)
}

fn kind_fields_json(kind: &Kind) -> Value {
    match kind {
        Kind::ServiceDeployed(e) => json!({
            "module_sha256": e.module_sha256,
            "module_size": e.module_size,
            "version": e.version,
            "limits": limits_json(&e.limits.unwrap_or_default()),
            "labels": e.labels,
            "idempotency_key": e.idempotency_key,
            "requested_limits": e.requested_limits.as_ref().map(limits_json),
            "expected_version": e.expected_version,
        }),
        Kind::ServiceStarted(e) => json!({ "version": e.version, "recovered": e.recovered }),
        Kind::ServiceCrashed(e) => json!({
            "version": e.version,
            "reason": crash_reason_name(e.reason()),
            "trap_code": e.trap_code,
            "message": e.message,
            "restarting": e.restarting,
        }),
        Kind::ServiceRestarted(e) => json!({ "version": e.version, "restarts": e.restarts }),
        Kind::ServiceKillRequested(e) => json!({
            "force": e.force,
            "grace_ms": e.grace_ms,
            "idempotency_key": e.idempotency_key,
            "requested_grace_ms": e.requested_grace_ms,
            "expected_version": e.expected_version,
        }),
        Kind::ServiceStopped(e) => json!({
            "version": e.version,
            "reason": stop_reason_name(e.reason()),
            "outcome": stop_outcome_name(e.outcome),
            "calls_cut_off": e.calls_cut_off,
            "message": e.message,
        }),
        Kind::ShutdownRequested(e) => json!({ "grace_ms": e.grace_ms }),
        Kind::ServiceRemoved(e) => json!({
            "idempotency_key": e.idempotency_key,
            "expected_version": e.expected_version,
            "reason": removal_reason_name(e.reason),
        }),
        Kind::NodeStarted(e) => json!({
            "version": e.version,
            "node_id": e.node_id,
            "replayed_to_seq": e.replayed_to_seq,
            "recovered": e.recovered.iter()
                .map(|r| json!({ "tenant": r.tenant, "service_id": r.service_id }))
                .collect::<Vec<_>>(),
        }),
    }
}

/// ` expected_version=N` for a request that named the version it required.
fn required_version(expected_version: Option<u64>) -> String {
    expected_version.map_or(String::new(), |v| format!(" expected_version={v}"))
}

/// One line for a person: `seq time kind tenant/service fields…`.
pub fn describe(event: &Event) -> String {
    let mut line = format!(
        "{:>8}  {}  {:<22}",
        event.seq,
        format_timestamp_ms(event.timestamp_ms),
        kind_name(event)
    );
    if !event.service_id.is_empty() {
        let _ = write!(line, "  {}/{}", event.tenant, event.service_id);
    }
    let detail = match &event.kind {
        Some(Kind::ServiceDeployed(e)) => {
            format!(
                "version={} module={} size={}{}",
                e.version,
                short_hash(&e.module_sha256),
                e.module_size,
                required_version(e.expected_version)
            )
        }
        Some(Kind::ServiceStarted(e)) => {
            format!("version={}{}", e.version, if e.recovered { " recovered" } else { "" })
        }
        Some(Kind::ServiceCrashed(e)) => format!(
            "version={} reason={}{} restarting={} {:?}",
            e.version,
            crash_reason_name(e.reason()),
            if e.trap_code.is_empty() {
                String::new()
            } else {
                format!(" trap={}", e.trap_code)
            },
            e.restarting,
            e.message
        ),
        Some(Kind::ServiceRestarted(e)) => format!("version={} restarts={}", e.version, e.restarts),
        Some(Kind::ServiceKillRequested(e)) => format!(
            "force={} grace_ms={}{}",
            e.force,
            e.grace_ms,
            required_version(e.expected_version)
        ),
        Some(Kind::ServiceStopped(e)) => format!(
            "version={} reason={} outcome={}{}{}",
            e.version,
            stop_reason_name(e.reason()),
            stop_outcome_name(e.outcome),
            match e.calls_cut_off {
                0 => String::new(),
                n => format!(" calls_cut_off={n}"),
            },
            match e.message.as_str() {
                "" => String::new(),
                message => format!(" message={message:?}"),
            }
        ),
        Some(Kind::ShutdownRequested(e)) => format!("grace_ms={}", e.grace_ms),
        Some(Kind::ServiceRemoved(e)) => format!(
            "reason={}{}",
            removal_reason_name(e.reason),
            required_version(e.expected_version)
        ),
        Some(Kind::NodeStarted(e)) => {
            format!(
                "version={} node={} recovered={}",
                e.version,
                e.node_id,
                e.recovered.len()
            )
        }
        None => String::new(),
    };
    let _ = write!(line, "  {detail}  by {}", event.actor);
    line
}

fn short_hash(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds.
/// Times humantime cannot show (past the year 9999) are shown as raw milliseconds.
pub fn format_timestamp_ms(ms: u64) -> String {
    let mut out = String::new();
    let time = std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms));
    match time.map(|t| write!(out, "{}", humantime::format_rfc3339_millis(t))) {
        Some(Ok(())) => out,
        _ => format!("{ms}ms"),
    }
}

/// Builds an event envelope; the writer fills in seq and timestamp at commit.
pub fn envelope(
    tenant: impl Into<String>,
    service_id: impl Into<String>,
    actor: impl Into<String>,
    kind: Kind,
) -> Event {
    Event {
        seq: 0,
        timestamp_ms: 0,
        tenant: tenant.into(),
        service_id: service_id.into(),
        actor: actor.into(),
        kind: Some(kind),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

    #[test]
    fn kind_names_round_trip() {
        for kind in EventKind::ALL {
            assert_eq!(kind.as_str().parse::<EventKind>(), Ok(kind));
        }
        let err = "nope".parse::<EventKind>().unwrap_err();
        assert!(err.contains("service_deployed"), "{err}");
    }

    #[test]
    fn json_has_envelope_kind_and_fields() {
        let mut event = envelope(
            "acme",
            "echo",
            "tenant:acme",
            Kind::ServiceStopped(proto::ServiceStopped {
                version: 3,
                reason: StopReason::Killed as i32,
                ..Default::default()
            }),
        );
        event.seq = 7;
        event.timestamp_ms = 1_700_000_000_000;
        let value = to_json(&event);
        assert_eq!(value["seq"], 7);
        assert_eq!(value["kind"], "service_stopped");
        assert_eq!(value["reason"], "killed");
        assert_eq!(value["version"], 3);
        assert_eq!(value["tenant"], "acme");
        assert!(describe(&event).contains("2023-11-14T22:13:20.000Z"));
        // Far-future times (a damaged or hostile record) print raw rather than panic.
        assert_eq!(format_timestamp_ms(253_402_300_800_000), "253402300800000ms");
        assert_eq!(format_timestamp_ms(u64::MAX), format!("{}ms", u64::MAX));
    }

    #[test]
    fn a_required_version_shows_in_both_forms_only_when_named() {
        let kill = |expected_version| {
            envelope(
                "acme",
                "echo",
                "tenant:acme",
                Kind::ServiceKillRequested(proto::ServiceKillRequested {
                    expected_version,
                    ..Default::default()
                }),
            )
        };
        assert!(describe(&kill(Some(4))).contains("grace_ms=0 expected_version=4"));
        assert_eq!(to_json(&kill(Some(4)))["expected_version"], 4);
        assert!(!describe(&kill(None)).contains("expected_version"));
        assert!(to_json(&kill(None))["expected_version"].is_null());
    }
}
