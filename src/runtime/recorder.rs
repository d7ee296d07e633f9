//! Takes what the runtime observes into the log, through storage failures.
//!
//! An observation the log cannot take (the disk is full, the data file cannot grow) is kept in
//! a backlog, and one task retries the backlog in order with exponential backoff until the log
//! takes writes again, as a kubelet keeps reporting pod status until the API server takes it.
//! Without it, the log would miss what happened during the outage for good, and the state
//! would say `running` for a service that crashed until the node restarted. One task for the
//! whole backlog, not one per service: while the log is down, retries cost one failed write
//! per backoff period however many services are waiting.
//!
//! A service with an observation in the backlog has its later ones queued behind it, so its
//! events keep their order. The backlog is bounded: past `max_backlog` the oldest observation
//! is dropped, as the newest say most about where each service stands. A retried observation
//! that no longer fits the state (a later deploy replaced that version, unless it is the stop
//! of a killed version the state still owes one) is dropped, as any stale observation is. The
//! backlog ends with the control layer: once its writer has closed, nothing can be recorded
//! any more.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::control::{self, Observation, Observer};

/// Where observations go: the control layer, or a stand-in in tests.
pub(super) trait Sink: Send + Sync + 'static {
    fn observe(&self, observation: Observation) -> impl Future<Output = control::Result<u64>> + Send;
}

impl Sink for Observer {
    fn observe(&self, observation: Observation) -> impl Future<Output = control::Result<u64>> + Send {
        Observer::observe(self, observation)
    }
}

/// How the backlog is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryOptions {
    /// The first wait after a failure; it doubles with each failure in a row.
    pub initial: Duration,
    /// The longest wait between two tries.
    pub max: Duration,
    /// Observations kept at most; past it the oldest is dropped.
    pub max_backlog: usize,
}

impl Default for RetryOptions {
    fn default() -> Self {
        RetryOptions {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
            max_backlog: 10_000,
        }
    }
}

pub(super) struct Recorder<S: Sink = Observer> {
    sink: S,
    retry: RetryOptions,
    backlog: Mutex<Backlog>,
}

#[derive(Default)]
struct Backlog {
    /// Each with a number of its own, so the retry task knows whether the one it tried is still
    /// at the front (a full backlog may have dropped it meanwhile).
    queue: VecDeque<(u64, Observation)>,
    next_number: u64,
    /// Observations in the queue, by (tenant, service id): later ones of these services wait
    /// their turn.
    held: HashMap<(String, String), usize>,
    /// Whether the retry task is running (it runs while the queue is not empty).
    draining: bool,
}

impl<S: Sink> Recorder<S> {
    pub fn new(sink: S, retry: RetryOptions) -> Arc<Self> {
        Arc::new(Recorder {
            sink,
            retry,
            backlog: Mutex::new(Backlog::default()),
        })
    }

    /// Records `observation`, now or, if the log cannot take it, once it can. Returns once the
    /// observation is recorded (true), kept for a retry (true), or refused as stale (false).
    pub async fn record(self: &Arc<Self>, observation: Observation) -> bool {
        if self.backlog().holds(&observation) {
            self.defer(observation);
            return true;
        }
        // A clone, as the writer consumes what it is sent; it costs two short strings.
        match self.sink.observe(observation.clone()).await {
            Ok(_) => true,
            Err(control::Error::Storage(e)) => {
                // Once an outage, not once a service: a full disk at a shutdown of thousands of
                // services would otherwise say the same thousands of times.
                if self.backlog_len() == 0 {
                    tracing::warn!(error = %e, "the log cannot take what the runtime observes; it is kept and retried");
                } else {
                    tracing::debug!(error = %e, "the log cannot take an observation; it is kept and retried");
                }
                self.defer(observation);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "observation not recorded");
                false
            }
        }
    }

    /// Observations waiting for the log to take writes again.
    pub fn backlog_len(&self) -> usize {
        self.backlog().queue.len()
    }

    fn backlog(&self) -> std::sync::MutexGuard<'_, Backlog> {
        self.backlog.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn defer(self: &Arc<Self>, observation: Observation) {
        let mut backlog = self.backlog();
        if backlog.queue.len() >= self.retry.max_backlog.max(1)
            && let Some((_, dropped)) = backlog.queue.pop_front()
        {
            backlog.release(&dropped);
            tracing::warn!(
                max_backlog = self.retry.max_backlog,
                observation = ?dropped,
                "the backlog of observations is full; the oldest is dropped"
            );
        }
        *backlog.held.entry(service_of(&observation)).or_default() += 1;
        let number = backlog.next_number;
        backlog.next_number += 1;
        backlog.queue.push_back((number, observation));
        if !std::mem::replace(&mut backlog.draining, true) {
            tokio::spawn(Arc::clone(self).drain());
        }
    }

    /// Retries the backlog in order until it is empty or the control layer has closed.
    async fn drain(self: Arc<Self>) {
        let mut wait = self.retry.initial;
        loop {
            let (number, next) = {
                let mut backlog = self.backlog();
                match backlog.queue.front() {
                    Some((number, next)) => (*number, next.clone()),
                    None => {
                        backlog.draining = false;
                        return;
                    }
                }
            };
            match self.sink.observe(next).await {
                Err(control::Error::Storage(e)) => {
                    tracing::debug!(error = %e, retry_in = ?wait, "the log still cannot take observations");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(self.retry.max);
                    continue;
                }
                Err(control::Error::Closed) => {
                    let mut backlog = self.backlog();
                    tracing::warn!(
                        observations = backlog.queue.len(),
                        "the node closed before the log could take these observations"
                    );
                    *backlog = Backlog::default();
                    return;
                }
                Ok(_) => wait = self.retry.initial,
                Err(e) => tracing::debug!(error = %e, "a retried observation no longer applies"),
            }
            let mut backlog = self.backlog();
            if backlog.queue.front().is_some_and(|(front, _)| *front == number)
                && let Some((_, done)) = backlog.queue.pop_front()
            {
                backlog.release(&done);
            }
            if backlog.queue.is_empty() {
                tracing::info!("the log takes observations again; the backlog is done");
            }
        }
    }
}

impl Backlog {
    /// Whether an earlier observation of the same service waits here. Allocates only while
    /// the backlog is not empty.
    fn holds(&self, observation: &Observation) -> bool {
        !self.queue.is_empty() && self.held.contains_key(&service_of(observation))
    }

    fn release(&mut self, observation: &Observation) {
        let key = service_of(observation);
        if let Some(count) = self.held.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                self.held.remove(&key);
            }
        }
    }
}

/// The service an observation is about; the node's own have empty names.
fn service_of(observation: &Observation) -> (String, String) {
    match observation {
        Observation::Started { tenant, service_id, .. }
        | Observation::Crashed { tenant, service_id, .. }
        | Observation::Restarted { tenant, service_id, .. }
        | Observation::Stopped { tenant, service_id, .. } => (tenant.clone(), service_id.clone()),
        Observation::NodeStarted { .. } => (String::new(), String::new()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::proto::CrashReason;
    use crate::state::ApplyError;

    /// A log that refuses writes while `full`, answers `Stale` for `stale_version`, and
    /// keeps what it took.
    #[derive(Default)]
    struct FakeLog {
        full: AtomicBool,
        closed: AtomicBool,
        stale_version: Mutex<Option<u64>>,
        tries: AtomicUsize,
        taken: Mutex<Vec<Observation>>,
    }

    impl Sink for Arc<FakeLog> {
        async fn observe(&self, observation: Observation) -> control::Result<u64> {
            self.tries.fetch_add(1, Ordering::SeqCst);
            if self.closed.load(Ordering::SeqCst) {
                return Err(control::Error::Closed);
            }
            if self.full.load(Ordering::SeqCst) {
                return Err(crate::log::Error::MapFull { map_size_mb: 1 }.into());
            }
            if let Observation::Started { version, .. } = &observation
                && *self.stale_version.lock().unwrap() == Some(*version)
            {
                return Err(control::Error::Stale(ApplyError::OutOfOrder { applied: 0, found: 0 }));
            }
            let mut taken = self.taken.lock().unwrap();
            taken.push(observation);
            Ok(taken.len() as u64)
        }
    }

    fn started(service_id: &str, version: u64) -> Observation {
        Observation::Started {
            tenant: "acme".into(),
            service_id: service_id.into(),
            version,
            recovered: false,
        }
    }

    fn crashed(service_id: &str, version: u64) -> Observation {
        Observation::Crashed {
            tenant: "acme".into(),
            service_id: service_id.into(),
            version,
            reason: CrashReason::Trap,
            trap_code: "unreachable".into(),
            message: "boom".into(),
            restarting: false,
        }
    }

    fn recorder(log: &Arc<FakeLog>) -> Arc<Recorder<Arc<FakeLog>>> {
        recorder_of(log, 100)
    }

    fn recorder_of(log: &Arc<FakeLog>, max_backlog: usize) -> Arc<Recorder<Arc<FakeLog>>> {
        Recorder::new(
            Arc::clone(log),
            RetryOptions {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(8),
                max_backlog,
            },
        )
    }

    async fn until(mut done: impl FnMut() -> bool) {
        for _ in 0..2000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the condition never held");
    }

    #[tokio::test]
    async fn what_a_full_log_refuses_is_recorded_once_it_takes_writes_again() {
        let log = Arc::new(FakeLog::default());
        let recorder = recorder(&log);
        log.full.store(true, Ordering::SeqCst);
        recorder.record(started("a", 1)).await;
        recorder.record(crashed("a", 1)).await;
        assert_eq!(recorder.backlog_len(), 2);
        // Retried while full, with backoff: a handful of tries, not a busy loop.
        tokio::time::sleep(Duration::from_millis(40)).await;
        let tries = log.tries.load(Ordering::SeqCst);
        assert!((3..=20).contains(&tries), "{tries} tries in 40 ms");
        assert!(log.taken.lock().unwrap().is_empty());

        log.full.store(false, Ordering::SeqCst);
        until(|| recorder.backlog_len() == 0).await;
        assert_eq!(*log.taken.lock().unwrap(), vec![started("a", 1), crashed("a", 1)]);
    }

    #[tokio::test]
    async fn a_service_with_a_backlog_has_its_later_observations_queued_behind_it() {
        let log = Arc::new(FakeLog::default());
        let recorder = recorder(&log);
        log.full.store(true, Ordering::SeqCst);
        recorder.record(started("a", 1)).await;
        log.full.store(false, Ordering::SeqCst);
        // Another service goes straight to the log; "a" waits behind its backlog, even though
        // the log could take it now.
        recorder.record(started("b", 1)).await;
        recorder.record(crashed("a", 1)).await;
        until(|| recorder.backlog_len() == 0).await;
        let taken = log.taken.lock().unwrap().clone();
        assert_eq!(taken.len(), 3);
        let a: Vec<_> = taken.iter().filter(|o| service_of(o).1 == "a").cloned().collect();
        assert_eq!(a, vec![started("a", 1), crashed("a", 1)]);
        // Once the backlog is done, observations go straight to the log again.
        let tries = log.tries.load(Ordering::SeqCst);
        recorder.record(started("a", 2)).await;
        assert_eq!(log.tries.load(Ordering::SeqCst), tries + 1);
        assert_eq!(recorder.backlog_len(), 0);
    }

    #[tokio::test]
    async fn a_stale_retry_is_dropped_and_the_rest_goes_on() {
        let log = Arc::new(FakeLog::default());
        let recorder = recorder(&log);
        log.full.store(true, Ordering::SeqCst);
        recorder.record(started("a", 1)).await;
        recorder.record(started("a", 2)).await;
        // Meanwhile version 1 was replaced: its observation no longer fits.
        *log.stale_version.lock().unwrap() = Some(1);
        log.full.store(false, Ordering::SeqCst);
        until(|| recorder.backlog_len() == 0).await;
        assert_eq!(*log.taken.lock().unwrap(), vec![started("a", 2)]);
    }

    #[tokio::test]
    async fn the_backlog_ends_when_the_control_layer_closes() {
        let log = Arc::new(FakeLog::default());
        let recorder = recorder(&log);
        log.full.store(true, Ordering::SeqCst);
        recorder.record(started("a", 1)).await;
        recorder.record(started("b", 1)).await;
        log.closed.store(true, Ordering::SeqCst);
        until(|| recorder.backlog_len() == 0).await;
        let tries = log.tries.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(log.tries.load(Ordering::SeqCst), tries, "no task is left retrying");
        assert!(log.taken.lock().unwrap().is_empty());
        // Nothing is held back: a later observation is tried at once.
        recorder.record(started("a", 2)).await;
        assert_eq!(log.tries.load(Ordering::SeqCst), tries + 1);
    }

    #[tokio::test]
    async fn a_full_backlog_drops_its_oldest_observation() {
        let log = Arc::new(FakeLog::default());
        let recorder = recorder_of(&log, 2);
        log.full.store(true, Ordering::SeqCst);
        for version in 1..=3 {
            recorder.record(started("a", version)).await;
        }
        assert_eq!(recorder.backlog_len(), 2);
        log.full.store(false, Ordering::SeqCst);
        until(|| recorder.backlog_len() == 0).await;
        assert_eq!(*log.taken.lock().unwrap(), vec![started("a", 2), started("a", 3)]);
    }
}
