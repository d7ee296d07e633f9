//! What the benchmarks share. Each benchmark uses some of it.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;

/// A runtime with as many workers as the development machine has cores.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Whether the command line's filter (`cargo bench -- FILTER`) selects a measurement that
/// is not a criterion benchmark and so is not filtered by criterion.
pub fn selected(name: &str) -> bool {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
}

/// Sorts `latencies` and prints their count, p50 and p99 as `label: N what, p50 …, p99 …`;
/// nothing for a filtered-out benchmark, which measured nothing.
pub fn report_latencies(label: &str, what: &str, latencies: &mut [Duration]) {
    latencies.sort();
    if !latencies.is_empty() {
        eprintln!(
            "{label}: {} {what}, p50 {:?}, p99 {:?}",
            latencies.len(),
            percentile(latencies, 0.5),
            percentile(latencies, 0.99)
        );
    }
}

/// Zero when nothing was measured (a filtered-out benchmark).
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let index = ((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(index).copied().unwrap_or_default()
}

/// The requests of one benchmark iteration, claimed one at a time by concurrent clients.
#[derive(Clone)]
pub struct Turns {
    next: Arc<AtomicU64>,
    end: u64,
}

impl Turns {
    /// The index of the request claimed, or `None` once all are taken.
    pub fn claim(&self) -> Option<u64> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        (turn < self.end).then_some(turn)
    }
}

/// Runs `clients` tasks, `client(i, turns)` each, which share `requests` between them (a
/// closed loop: each sends its next request when the last is answered). Returns the time
/// they took together.
pub async fn closed_loop<F, Fut>(clients: usize, requests: u64, client: F) -> Duration
where
    F: Fn(usize, Turns) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let turns = Turns {
        next: Arc::new(AtomicU64::new(0)),
        end: requests,
    };
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients).map(|i| tokio::spawn(client(i, turns.clone()))).collect();
    for task in tasks {
        task.await.expect("a client does not panic");
    }
    started.elapsed()
}
