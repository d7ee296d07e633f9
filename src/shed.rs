//! Load shedding: bounded work in flight, per tenant and on the node, so no tenant can starve
//! the node. A request over a limit is refused at once (429 / RESOURCE_EXHAUSTED with a retry
//! hint) and does no work. Permits are RAII guards over semaphores: released exactly once, when
//! the request ends, whatever way it ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::{Error, ErrorKind};
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
    _node: OwnedSemaphorePermit,
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

    /// Admits one request of `tenant`, or refuses it without waiting.
    pub fn admit(&self, tenant: &str) -> Result<Permit, Error> {
        let limit = self.limits.for_tenant(tenant).max_in_flight_requests as usize;
        let tenant_permit = semaphore(&self.tenants, tenant, limit)
            .try_acquire_owned()
            .map_err(|_| {
                self.shed(
                    "tenant",
                    format!("tenant '{tenant}' has {limit} requests in flight, its limit"),
                )
            })?;
        let node_permit = Arc::clone(&self.node).try_acquire_owned().map_err(|_| {
            self.shed(
                "node",
                format!("the node has {} requests in flight, its limit", self.node_limit),
            )
        })?;
        Ok(Permit {
            _tenant: tenant_permit,
            _node: node_permit,
        })
    }

    /// Admits one long-lived stream of `tenant`, or refuses it.
    pub fn admit_watcher(&self, tenant: &str) -> Result<WatcherPermit, Error> {
        let limit = self.limits.for_tenant(tenant).max_watchers as usize;
        let permit = semaphore(&self.watchers, tenant, limit)
            .try_acquire_owned()
            .map_err(|_| {
                self.shed(
                    "watchers",
                    format!("tenant '{tenant}' has {limit} streams open, its limit"),
                )
            })?;
        Ok(WatcherPermit { _tenant: permit })
    }

    /// Requests in flight on the node now.
    pub fn in_flight(&self) -> usize {
        self.node_limit - self.node.available_permits()
    }

    fn shed(&self, scope: &str, message: String) -> Error {
        self.metrics.shed.with_label_values(&[scope]).inc();
        Error::new(ErrorKind::Overloaded, format!("{message}; retry later")).with_retry_after(RETRY_AFTER)
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
        let a = shedder.admit("acme").unwrap();
        let b = shedder.admit("acme").unwrap();
        let refused = shedder.admit("acme").unwrap_err();
        assert_eq!(refused.kind, ErrorKind::Overloaded);
        assert_eq!(refused.retry_after, Some(RETRY_AFTER));
        let c = shedder.admit("beta").unwrap();
        assert!(shedder.admit("gamma").is_err(), "the node limit holds across tenants");
        assert_eq!(shedder.in_flight(), 3);
        drop(a);
        assert!(shedder.admit("gamma").is_ok());
        drop((b, c));
        assert_eq!(shedder.in_flight(), 0);
        assert_eq!(shedder.metrics.shed.with_label_values(&["tenant"]).get(), 1);
        assert_eq!(shedder.metrics.shed.with_label_values(&["node"]).get(), 1);

        let watch = shedder.admit_watcher("acme").unwrap();
        assert!(shedder.admit_watcher("acme").is_err());
        drop(watch);
        assert!(shedder.admit_watcher("acme").is_ok());
    }
}
