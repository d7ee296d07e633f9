//! Limits and quotas: what one service may use, and what one tenant may hold.
//!
//! The node-wide values come from `[limits]`; each `[tenants.<name>]` may override any of
//! them. The control writer checks quotas against the projection, so they hold across
//! restarts and under concurrency.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::api::Principal;
use crate::proto::Limits;

const MIB: u64 = 1 << 20;

/// Limits and quotas for one tenant. Every field may be overridden per tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    /// Services a tenant may have: not killed, or killed and still stopping.
    pub max_services: u32,
    /// Killed, stopped services a tenant's registry keeps; past it, the node removes the one
    /// stopped longest ago, as Kubernetes' pod garbage collector does terminated pods.
    pub max_stopped_services: u32,
    /// Linear memory of one service, and the default when a deploy gives none.
    pub max_memory_mb: u64,
    pub default_memory_mb: u64,
    /// Memory reserved by all of a tenant's services together.
    pub max_tenant_memory_mb: u64,
    /// Size of one module.
    pub max_module_bytes: u64,
    /// Deploys a tenant may make per minute; also the modules that may be compiled for it per
    /// minute, refused ones included.
    pub max_deploys_per_minute: u32,
    /// MiB that the tenant's events (its requests' and those the node records for its
    /// services) may add to the log per hour; past it, its deploys are refused until the
    /// hour's older events leave the window. The log is append-only, so this is what keeps
    /// one tenant from filling the node's disk for all.
    pub max_history_mb_per_hour: u64,
    /// Wall-clock time of one call.
    pub max_call_timeout_ms: u32,
    pub default_call_timeout_ms: u32,
    /// CPU time of one call (an epoch deadline).
    pub max_cpu_ms_per_call: u32,
    pub default_cpu_ms_per_call: u32,
    /// Calls waiting in one service's mailbox.
    pub max_mailbox_capacity: u32,
    pub default_mailbox_capacity: u32,
    /// Restart policy: at most this many restarts within the window, then the service stays down.
    pub max_restarts: u32,
    pub restart_window_ms: u32,
    /// Requests of the tenant in flight at once; more are shed (429 / RESOURCE_EXHAUSTED).
    pub max_in_flight_requests: u32,
    /// Watch, SSE and log-follow streams the tenant may hold open at once.
    pub max_watchers: u32,
    /// Bytes of the tenant's request bodies and unwritten answers held at once (past each
    /// one's free 64 KiB); its share of the node's `[solo] max_in_flight_body_bytes`.
    pub max_in_flight_body_bytes: u64,
    /// Bytes of log lines that the tenant's log reads and followers are sent per second, all
    /// together (see [`crate::api::pace`]).
    pub max_log_read_bytes_per_second: u64,
    /// Bytes of history (events as the log stores them) that the tenant's Watch and SSE
    /// streams replay per second, all together; what they follow live is not paced.
    pub max_history_read_bytes_per_second: u64,
}

impl Default for TenantLimits {
    fn default() -> Self {
        TenantLimits {
            max_services: 100,
            max_stopped_services: 1000,
            max_memory_mb: 256,
            default_memory_mb: 64,
            max_tenant_memory_mb: 4096,
            max_module_bytes: 16 * MIB,
            max_deploys_per_minute: 600,
            max_history_mb_per_hour: 64,
            max_call_timeout_ms: 60_000,
            default_call_timeout_ms: 5_000,
            max_cpu_ms_per_call: 30_000,
            default_cpu_ms_per_call: 1_000,
            max_mailbox_capacity: 4096,
            default_mailbox_capacity: 256,
            max_restarts: 5,
            restart_window_ms: 60_000,
            max_in_flight_requests: 100,
            max_watchers: 100,
            max_in_flight_body_bytes: 256 * MIB,
            max_log_read_bytes_per_second: 4 * MIB,
            max_history_read_bytes_per_second: 8 * MIB,
        }
    }
}

/// A request that asks for more than a limit allows (or, for the restart window, for less).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} = {requested} is {} of {limit}", if *.under { "under the minimum" } else { "over the maximum" })]
pub struct OverLimit {
    pub field: &'static str,
    pub requested: u64,
    pub limit: u64,
    /// The limit is a minimum: the request is too small.
    pub under: bool,
}

impl TenantLimits {
    /// The effective limits of a deploy: zeros become defaults; anything over a maximum is refused.
    /// The restart policy is the tenant's; a request may only tighten it.
    pub fn resolve(&self, requested: &Limits) -> Result<Limits, OverLimit> {
        fn pick(field: &'static str, requested: u64, default: u64, max: u64) -> Result<u64, OverLimit> {
            match requested {
                0 => Ok(default.min(max)),
                r if r > max => Err(OverLimit {
                    field,
                    requested: r,
                    limit: max,
                    under: false,
                }),
                r => Ok(r),
            }
        }
        let narrow = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        Ok(Limits {
            memory_bytes: pick(
                "memory_bytes",
                requested.memory_bytes,
                self.default_memory_mb * MIB,
                self.max_memory_mb * MIB,
            )?,
            call_timeout_ms: narrow(pick(
                "call_timeout_ms",
                requested.call_timeout_ms.into(),
                self.default_call_timeout_ms.into(),
                self.max_call_timeout_ms.into(),
            )?),
            cpu_ms_per_call: narrow(pick(
                "cpu_ms_per_call",
                requested.cpu_ms_per_call.into(),
                self.default_cpu_ms_per_call.into(),
                self.max_cpu_ms_per_call.into(),
            )?),
            mailbox_capacity: narrow(pick(
                "mailbox_capacity",
                requested.mailbox_capacity.into(),
                self.default_mailbox_capacity.into(),
                self.max_mailbox_capacity.into(),
            )?),
            max_restarts: narrow(pick(
                "max_restarts",
                requested.max_restarts.into(),
                self.max_restarts.into(),
                self.max_restarts.into(),
            )?),
            // A shorter window would allow more restarts than the tenant's policy: refused, as
            // a higher `max_restarts` is, rather than quietly lengthened.
            restart_window_ms: match requested.restart_window_ms {
                0 => self.restart_window_ms,
                r if r < self.restart_window_ms => {
                    return Err(OverLimit {
                        field: "restart_window_ms",
                        requested: r.into(),
                        limit: self.restart_window_ms.into(),
                        under: true,
                    });
                }
                r => r,
            },
        })
    }

    pub fn max_memory_bytes(&self) -> u64 {
        self.max_memory_mb * MIB
    }

    pub fn max_tenant_memory_bytes(&self) -> u64 {
        self.max_tenant_memory_mb * MIB
    }

    pub fn max_history_bytes_per_hour(&self) -> u64 {
        self.max_history_mb_per_hour.saturating_mul(MIB)
    }
}

/// The node's limits and each tenant's overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitsTable {
    pub node: TenantLimits,
    pub tenants: HashMap<String, TenantLimits>,
    /// Services the node can run at once, all tenants together (its instance pool, less room
    /// for upgrades); `None` when nothing runs them (the log alone).
    pub node_services: Option<u64>,
}

impl LimitsTable {
    pub fn for_tenant(&self, tenant: &str) -> &TenantLimits {
        self.tenants.get(tenant).unwrap_or(&self.node)
    }

    /// The key that `principal`'s share of a per-tenant budget is kept under, and its limits:
    /// the admin's key is empty, which no tenant's name can be, and its limits are the node's.
    pub fn for_principal<'a>(&'a self, principal: &'a Principal) -> (&'a str, &'a TenantLimits) {
        match principal {
            Principal::Admin => ("", &self.node),
            Principal::Tenant(tenant) => (tenant, self.for_tenant(tenant)),
        }
    }
}

/// A byte figure for a person: in MiB when it is a whole number of them, else in bytes, so
/// that no figure is rounded to a limit's side of it.
pub fn in_mib(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// The longest failure message a guest can cause (a trap, a failed start), as events, statuses
/// and errors carry it: a trap names the guest function, whose name the module alone bounds.
pub const MAX_FAILURE_MESSAGE_BYTES: usize = 1024;

/// How a cut message ends: these two around its length before the cut.
const CUT_NOTE: (&str, &str) = ("… (message cut; it was ", " bytes)");

/// `message`, or its head cut at a char boundary and marked as cut, within `max_bytes` (at
/// least 64, room for the mark). A message that quotes one cut before (a guest's trap, quoted
/// in an API error) is cut before the earlier mark, and keeps its length if that was longer:
/// the quoted message's length is the one worth telling.
pub fn cut_to(message: String, max_bytes: usize) -> String {
    if message.len() <= max_bytes {
        return message;
    }
    let (text, was) = match earlier_cut(&message) {
        Some((at, was)) => (&message[..at], was.max(message.len())),
        None => (message.as_str(), message.len()),
    };
    let note = format!("{}{was}{}", CUT_NOTE.0, CUT_NOTE.1);
    let mut end = max_bytes.saturating_sub(note.len()).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{note}", &text[..end])
}

/// Where the last mark of an earlier cut in `message` begins, and the length it gives.
fn earlier_cut(message: &str) -> Option<(usize, usize)> {
    let at = message.rfind(CUT_NOTE.0)?;
    let rest = &message[at + CUT_NOTE.0.len()..];
    let digits = rest.find(|c: char| !c.is_ascii_digit())?;
    if !rest[digits..].starts_with(CUT_NOTE.1) {
        return None;
    }
    Some((at, rest[..digits].parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_at_a_char_boundary_and_say_so() {
        assert_eq!(cut_to("short".into(), 64), "short");
        let long = "é".repeat(1000);
        let cut = cut_to(long, 100);
        assert!(cut.len() <= 100, "{} bytes", cut.len());
        assert!(
            cut.starts_with("éé") && cut.ends_with("(message cut; it was 2000 bytes)"),
            "{cut}"
        );
    }

    #[test]
    fn a_message_quoting_a_cut_one_says_how_long_the_quoted_one_was() {
        let trap = cut_to("x".repeat(100_000), MAX_FAILURE_MESSAGE_BYTES);
        let quoted = format!("service 'svc' trapped (unreachable): {trap}");
        let cut = cut_to(quoted, MAX_FAILURE_MESSAGE_BYTES);
        assert!(cut.len() <= MAX_FAILURE_MESSAGE_BYTES, "{} bytes", cut.len());
        assert!(cut.starts_with("service 'svc' trapped (unreachable): xxx"), "{cut}");
        assert!(cut.ends_with("xx… (message cut; it was 100000 bytes)"), "{cut}");
        assert_eq!(cut.matches("message cut").count(), 1, "{cut}");
        // A message that only looks like a cut one is cut as any other.
        let odd = format!("{}… (message cut; it was many bytes)", "y".repeat(2000));
        let was = format!("(message cut; it was {} bytes)", odd.len());
        assert!(cut_to(odd, 100).ends_with(&was));
    }

    #[test]
    fn zeros_take_defaults_and_maxima_are_enforced() {
        let limits = TenantLimits::default();
        let resolved = limits.resolve(&Limits::default()).unwrap();
        assert_eq!(resolved.memory_bytes, 64 * MIB);
        assert_eq!(resolved.call_timeout_ms, 5_000);
        assert_eq!(resolved.max_restarts, 5);

        let at_max = Limits {
            memory_bytes: 256 * MIB,
            ..Limits::default()
        };
        assert_eq!(limits.resolve(&at_max).unwrap().memory_bytes, 256 * MIB);
        let over = Limits {
            memory_bytes: 256 * MIB + 1,
            ..Limits::default()
        };
        let err = limits.resolve(&over).unwrap_err();
        assert_eq!(err.field, "memory_bytes");
        assert!(err.to_string().contains("over the maximum"), "{err}");
    }

    #[test]
    fn a_restart_window_may_be_lengthened_never_shortened() {
        let limits = TenantLimits::default();
        let longer = Limits {
            restart_window_ms: 120_000,
            ..Limits::default()
        };
        assert_eq!(limits.resolve(&longer).unwrap().restart_window_ms, 120_000);
        let shorter = Limits {
            restart_window_ms: 1,
            ..Limits::default()
        };
        let err = limits.resolve(&shorter).unwrap_err();
        assert_eq!(err.to_string(), "restart_window_ms = 1 is under the minimum of 60000");
    }
}
