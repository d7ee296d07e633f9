//! Load shedding: bounded work in flight, per tenant and on the node, so no tenant can starve
//! the node. A request over a limit is refused at once (429 / RESOURCE_EXHAUSTED with a retry
//! hint) and does no work. Permits are RAII guards over semaphores: released exactly once, when
//! the request ends, whatever way it ends.
//!
//! Requests count against their principal: a tenant's against its own limits and the node's,
//! the admin's against limits of its own (the node's `[limits]`) only, whichever tenant it acts
//! for. So no tenant's traffic can lock the admin out, and the admin's takes nothing from a
//! tenant.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::{Error, ErrorKind, Principal};
use crate::limits::LimitsTable;
use crate::metrics::Metrics;

/// How soon a shed client should retry.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Shedder {
    node: Arc<Semaphore>,
    node_limit: usize,
    limits: Arc<LimitsTable>,
    /// Why a std lock: a map lookup per request, never held across an `.await`.
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
    watchers: Mutex<HashMap<String, Arc<Semaphore>>>,
    metrics: Arc<Metrics>,
}

/// Held for the life of one request.
#[derive(Debug)]
#[must_use = "the request is admitted only while the permit lives"]
pub struct Permit {
    _tenant: OwnedSemaphorePermit,
    /// None for the admin's requests, which the node's limit does not count.
    _node: Option<OwnedSemaphorePermit>,
}

/// Either kind of permit, for a handler that takes one or the other.
#[derive(Debug)]
pub enum Held {
    Request(Permit),
    Watcher(WatcherPermit),
}

/// Held for the life of one Watch, SSE or log-follow stream.
#[derive(Debug)]
#[must_use = "the stream is admitted only while the permit lives"]
pub struct WatcherPermit {
    _tenant: OwnedSemaphorePermit,
}

impl Shedder {
    pub fn new(node_limit: usize, limits: Arc<LimitsTable>, metrics: Arc<Metrics>) -> Shedder {
        Shedder {
            node: Arc::new(Semaphore::new(node_limit)),
            node_limit,
            limits,
            tenants: Mutex::new(HashMap::new()),
            watchers: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Admits one request of `principal`, or refuses it without waiting.
    pub fn admit(&self, principal: &Principal) -> Result<Permit, Error> {
        let (bucket, limits) = self.limits.for_principal(principal);
        let limit = limits.max_in_flight_requests as usize;
        let tenant_permit = semaphore(&self.tenants, bucket, limit)
            .try_acquire_owned()
            .map_err(|_| {
                self.shed(
                    "tenant",
                    format!("{} is at its limit of requests in flight ({limit})", who(principal)),
                )
            })?;
        let node_permit = match principal {
            Principal::Admin => None,
            Principal::Tenant(_) => Some(Arc::clone(&self.node).try_acquire_owned().map_err(|_| {
                self.shed(
                    "node",
                    format!("the node is at its limit of requests in flight ({})", self.node_limit),
                )
            })?),
        };
        Ok(Permit {
            _tenant: tenant_permit,
            _node: node_permit,
        })
    }

    /// Admits one long-lived stream of `principal`, or refuses it.
    pub fn admit_watcher(&self, principal: &Principal) -> Result<WatcherPermit, Error> {
        let (bucket, limits) = self.limits.for_principal(principal);
        let limit = limits.max_watchers as usize;
        let permit = semaphore(&self.watchers, bucket, limit)
            .try_acquire_owned()
            .map_err(|_| {
                self.shed(
                    "watchers",
                    format!("{} is at its limit of open streams ({limit})", who(principal)),
                )
            })?;
        Ok(WatcherPermit { _tenant: permit })
    }

    /// Tenants' requests in flight on the node now.
    pub fn in_flight(&self) -> usize {
        self.node_limit - self.node.available_permits()
    }

    fn shed(&self, scope: &str, message: String) -> Error {
        self.metrics.shed.with_label_values(&[scope]).inc();
        Error::new(ErrorKind::Overloaded, format!("{message}; retry later")).with_retry_after(RETRY_AFTER)
    }
}

fn who(principal: &Principal) -> String {
    match principal {
        Principal::Admin => "the admin".to_string(),
        Principal::Tenant(tenant) => format!("tenant '{tenant}'"),
    }
}

fn semaphore(map: &Mutex<HashMap<String, Arc<Semaphore>>>, tenant: &str, limit: usize) -> Arc<Semaphore> {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    Arc::clone(
        map.entry(tenant.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(limit))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::TenantLimits;

    fn tenant(name: &str) -> Principal {
        Principal::Tenant(name.into())
    }

    fn shedder(node: usize, per_tenant: u32) -> Shedder {
        let limits = LimitsTable {
            node: TenantLimits {
                max_in_flight_requests: per_tenant,
                max_watchers: 1,
                ..TenantLimits::default()
            },
            ..LimitsTable::default()
        };
        Shedder::new(node, Arc::new(limits), Metrics::new())
    }

    #[test]
    fn permits_are_released_when_dropped_and_only_then() {
        let shedder = shedder(3, 2);
        let a = shedder.admit(&tenant("acme")).unwrap();
        let b = shedder.admit(&tenant("acme")).unwrap();
        let refused = shedder.admit(&tenant("acme")).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::Overloaded);
        assert_eq!(refused.retry_after, Some(RETRY_AFTER));
        let c = shedder.admit(&tenant("beta")).unwrap();
        assert!(
            shedder.admit(&tenant("gamma")).is_err(),
            "the node limit holds across tenants"
        );
        assert_eq!(shedder.in_flight(), 3);
        drop(a);
        assert!(shedder.admit(&tenant("gamma")).is_ok());
        drop((b, c));
        assert_eq!(shedder.in_flight(), 0);
        assert_eq!(shedder.metrics.shed.with_label_values(&["tenant"]).get(), 1);
        assert_eq!(shedder.metrics.shed.with_label_values(&["node"]).get(), 1);

        let watch = shedder.admit_watcher(&tenant("acme")).unwrap();
        assert!(shedder.admit_watcher(&tenant("acme")).is_err());
        drop(watch);
        assert!(shedder.admit_watcher(&tenant("acme")).is_ok());
    }

    #[test]
    fn the_admin_has_limits_of_its_own() {
        let shedder = shedder(10, 1);
        // A tenant named `default` (the one the admin acts on when it names none) at its limits
        // takes nothing from the admin, and the admin nothing from it.
        let _request = shedder.admit(&tenant("default")).unwrap();
        let _stream = shedder.admit_watcher(&tenant("default")).unwrap();
        let admin_request = shedder.admit(&Principal::Admin).unwrap();
        let admin_stream = shedder.admit_watcher(&Principal::Admin).unwrap();
        let refused = shedder.admit(&Principal::Admin).unwrap_err();
        assert!(
            refused
                .to_string()
                .starts_with("the admin is at its limit of requests in flight (1)"),
            "{refused}"
        );
        assert!(shedder.admit_watcher(&Principal::Admin).is_err());
        assert!(shedder.admit(&tenant("default")).is_err());
        drop((admin_request, admin_stream));
        assert!(shedder.admit(&Principal::Admin).is_ok());
        assert!(shedder.admit(&tenant("default")).is_err());
    }

    /// Tenants that fill the node's limit between them lock the admin out of nothing, and the
    /// admin's requests leave the node's limit to the tenants.
    #[test]
    fn the_node_limit_counts_tenants_only() {
        let shedder = shedder(2, 5);
        let _tenants = [
            shedder.admit(&tenant("acme")).unwrap(),
            shedder.admit(&tenant("beta")).unwrap(),
        ];
        assert!(shedder.admit(&tenant("gamma")).is_err(), "the node is full");
        let _admin: Vec<Permit> = (0..5).map(|_| shedder.admit(&Principal::Admin).unwrap()).collect();
        assert_eq!(shedder.in_flight(), 2);
    }
}
