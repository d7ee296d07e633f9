//! Pacing of reads that replay what is kept: each principal's service log lines (all its log
//! reads and followers over both APIs together) go out at no more than its
//! `[limits] max_log_read_bytes_per_second`, and the history its Watch and SSE streams replay
//! at no more than `max_history_read_bytes_per_second`.
//!
//! A service writes its log at a bounded rate, but each read and each new follower is sent the
//! whole ring again (up to 1,000 lines of 4 KiB), encoded on the threads that serve every
//! tenant's requests; a stream from seq 1 is sent the tenant's whole history, as large as its
//! labels make it. Unpaced, one tenant's hundred followers, reconnecting, kept those threads
//! busy and delayed other tenants' calls by seconds. Paced, a tenant's reads cost at most its
//! rate's worth of that work a second, however many it opens; a read past the rate waits, as
//! one from a slow client would. A follower held back long enough misses what the ring
//! overwrites meanwhile, as a slow reader does anyway; a history replay misses nothing.
//!
//! Each rate is a token bucket per principal that holds one second's worth: a read within it
//! goes out at once. An item is charged before it is sent, and a reader that finds the bucket
//! short waits for what it owes, so the tenant's readers queue in the order they asked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Principal;
use crate::limits::{LimitsTable, TenantLimits};
use crate::metrics::Metrics;

/// Principals' buckets kept before the full ones (those not read from for a second) are
/// dropped: a full bucket is what a new one is.
const BUCKETS_KEPT: usize = 1024;

/// One kind of read's rates, per principal.
#[derive(Debug)]
pub struct ReadPace {
    limits: Arc<LimitsTable>,
    /// The rate of a principal's limits that this pace keeps.
    rate_of: fn(&TenantLimits) -> u64,
    /// Why a std lock: a few arithmetic steps per line, never held across an `.await`.
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Seconds that reads were held back, all principals together.
    waited: prometheus::Counter,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Bytes that may go out now; below zero, what the readers waiting owe.
    allowance: i64,
    refilled_at: Instant,
}

impl Bucket {
    fn full(rate: u64, now: Instant) -> Bucket {
        Bucket {
            allowance: to_i64(rate),
            refilled_at: now,
        }
    }

    /// Adds what `rate` has given since the last refill, up to one second's worth.
    fn refill(&mut self, rate: u64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled_at).as_micros();
        let earned = to_i64(u64::try_from(elapsed * u128::from(rate) / 1_000_000).unwrap_or(u64::MAX));
        if earned > 0 {
            self.allowance = self.allowance.saturating_add(earned).min(to_i64(rate));
            self.refilled_at = now;
        }
    }
}

fn to_i64(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

impl ReadPace {
    fn new(limits: Arc<LimitsTable>, rate_of: fn(&TenantLimits) -> u64, waited: prometheus::Counter) -> ReadPace {
        ReadPace {
            limits,
            rate_of,
            buckets: Mutex::new(HashMap::new()),
            waited,
        }
    }

    /// The pace of service log lines (`max_log_read_bytes_per_second`), counting its waits in
    /// `solo_read_wait_seconds_total{reads="logs"}`.
    pub fn of_logs(limits: Arc<LimitsTable>, metrics: &Metrics) -> ReadPace {
        let waited = metrics.read_wait.with_label_values(&["logs"]);
        ReadPace::new(limits, |limits| limits.max_log_read_bytes_per_second, waited)
    }

    /// The pace of Watch and SSE replays (`max_history_read_bytes_per_second`), counting its
    /// waits in `solo_read_wait_seconds_total{reads="history"}`.
    pub fn of_history(limits: Arc<LimitsTable>, metrics: &Metrics) -> ReadPace {
        let waited = metrics.read_wait.with_label_values(&["history"]);
        ReadPace::new(limits, |limits| limits.max_history_read_bytes_per_second, waited)
    }

    /// Charges `bytes` to `principal`'s rate, and waits until they may go out: false if
    /// `stopping` was cancelled first.
    pub async fn wait(&self, principal: &Principal, bytes: u64, stopping: &CancellationToken) -> bool {
        let wait = self.charge_at(principal, bytes, Instant::now());
        if wait.is_zero() {
            // A replay at once is thousands of items, each encoded where it is sent: let the
            // task yield now and then, so that the thread serves others between them.
            tokio::task::coop::consume_budget().await;
            return true;
        }
        tokio::select! {
            () = stopping.cancelled() => false,
            () = tokio::time::sleep(wait) => true,
        }
    }

    fn charge_at(&self, principal: &Principal, bytes: u64, now: Instant) -> Duration {
        let (key, limits) = self.limits.for_principal(principal);
        // At least a byte a second: configuration refuses less, and 0 would divide by zero.
        let rate = (self.rate_of)(limits).max(1);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(key) && buckets.len() >= BUCKETS_KEPT {
            buckets.retain(|key, bucket| {
                let rate = (self.rate_of)(self.limits.for_tenant(key));
                bucket.refill(rate, now);
                bucket.allowance < to_i64(rate)
            });
        }
        let bucket = buckets
            .entry(key.to_string())
            .or_insert_with(|| Bucket::full(rate, now));
        bucket.refill(rate, now);
        bucket.allowance = bucket.allowance.saturating_sub(to_i64(bytes));
        if bucket.allowance >= 0 {
            return Duration::ZERO;
        }
        let owed = bucket.allowance.unsigned_abs();
        let wait =
            Duration::from_micros(u64::try_from(u128::from(owed) * 1_000_000 / u128::from(rate)).unwrap_or(u64::MAX));
        self.waited.inc_by(wait.as_secs_f64());
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pace(rate: u64, tenants: &[(&str, u64)]) -> ReadPace {
        let limits = |rate| TenantLimits {
            max_log_read_bytes_per_second: rate,
            ..TenantLimits::default()
        };
        let table = LimitsTable {
            node: limits(rate),
            tenants: tenants
                .iter()
                .map(|(name, rate)| (name.to_string(), limits(*rate)))
                .collect(),
            node_services: None,
        };
        ReadPace::new(
            Arc::new(table),
            |limits| limits.max_log_read_bytes_per_second,
            prometheus::Counter::new("waited", "seconds").unwrap(),
        )
    }

    fn tenant(name: &str) -> Principal {
        Principal::Tenant(name.into())
    }

    #[test]
    fn a_second_of_the_rate_goes_out_at_once_and_the_rest_waits_its_turn() {
        let pace = pace(1000, &[]);
        let start = Instant::now();
        assert_eq!(pace.charge_at(&tenant("a"), 600, start), Duration::ZERO);
        assert_eq!(pace.charge_at(&tenant("a"), 400, start), Duration::ZERO);
        // Over the bucket: 100 bytes owed, a tenth of a second at 1000 a second.
        assert_eq!(pace.charge_at(&tenant("a"), 100, start), Duration::from_millis(100));
        // The next reader queues behind what the first owes.
        assert_eq!(pace.charge_at(&tenant("a"), 100, start), Duration::from_millis(200));
        // Time pays the debt back, and then refills the bucket, no further than a second's worth.
        let later = start + Duration::from_millis(250);
        assert_eq!(pace.charge_at(&tenant("a"), 50, later), Duration::ZERO);
        let much_later = later + Duration::from_secs(60);
        assert_eq!(pace.charge_at(&tenant("a"), 1000, much_later), Duration::ZERO);
        assert_eq!(pace.charge_at(&tenant("a"), 1, much_later), Duration::from_millis(1));
        assert!((pace.waited.get() - 0.301).abs() < 1e-9, "{}", pace.waited.get());
    }

    #[test]
    fn each_principal_has_a_rate_of_its_own() {
        let pace = pace(1000, &[("fast", 1_000_000)]);
        let now = Instant::now();
        assert_eq!(pace.charge_at(&tenant("a"), 2000, now), Duration::from_secs(1));
        assert_eq!(
            pace.charge_at(&tenant("b"), 1000, now),
            Duration::ZERO,
            "b pays nothing of a's"
        );
        assert_eq!(pace.charge_at(&Principal::Admin, 1000, now), Duration::ZERO);
        assert_eq!(
            pace.charge_at(&tenant("fast"), 500_000, now),
            Duration::ZERO,
            "its own rate"
        );
        assert_eq!(
            pace.charge_at(&tenant("fast"), 1_000_000, now),
            Duration::from_millis(500)
        );
    }

    /// Many principals keep no more than [`BUCKETS_KEPT`] buckets, beside those still owing:
    /// a full bucket is dropped, and one that owes is kept, or its debt would be forgiven.
    #[test]
    fn full_buckets_are_dropped_and_owing_ones_kept() {
        let pace = pace(1000, &[]);
        let now = Instant::now();
        pace.charge_at(&tenant("owing"), 5000, now);
        for i in 0..BUCKETS_KEPT {
            pace.charge_at(&tenant(&format!("t{i}")), 1, now);
        }
        let later = now + Duration::from_secs(2);
        pace.charge_at(&tenant("newcomer"), 1, later);
        let buckets = pace.buckets.lock().unwrap();
        assert_eq!(buckets.len(), 2, "{:?}", buckets.keys().collect::<Vec<_>>());
        assert!(buckets.contains_key("owing") && buckets.contains_key("newcomer"));
        drop(buckets);
        assert_eq!(
            pace.charge_at(&tenant("owing"), 0, later),
            Duration::from_secs(2),
            "still owes 4000 less the 2000 that two seconds paid"
        );
    }
}
