//! Live figures of one service, updated by its actor and read by Status.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct LiveStats {
    pub calls: AtomicU64,
    pub calls_failed: AtomicU64,
    pub memory_bytes: AtomicU64,
    /// Time spent running calls, in microseconds: the service's CPU use.
    pub cpu_micros: AtomicU64,
    pub restarts: AtomicU64,
    /// Wall clock (ms since the epoch) when the current instance started; 0 when none runs.
    pub instance_started_ms: AtomicU64,
    pub last_error: Mutex<String>,
}

/// A copy of the live figures, for an API response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveStatus {
    pub calls: u64,
    pub calls_failed: u64,
    pub memory_bytes: u64,
    pub cpu_ms: u64,
    /// Restarts observed by this node since it started.
    pub restarts: u64,
    /// How long the current instance has been up, in ms; 0 when none runs.
    pub uptime_ms: u64,
    /// The last trap or failure seen by this node.
    pub last_error: String,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl LiveStats {
    pub fn instance_started(&self, memory_bytes: u64) {
        self.instance_started_ms.store(now_ms(), Ordering::Relaxed);
        self.memory_bytes.store(memory_bytes, Ordering::Relaxed);
    }

    pub fn instance_stopped(&self) {
        self.instance_started_ms.store(0, Ordering::Relaxed);
        self.memory_bytes.store(0, Ordering::Relaxed);
    }

    pub fn call_finished(&self, took: Duration, ok: bool, memory_bytes: u64) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.calls_failed.fetch_add(1, Ordering::Relaxed);
        }
        self.cpu_micros.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.memory_bytes.store(memory_bytes, Ordering::Relaxed);
    }

    /// Calls an instance had accepted and a stop cut off: handled, and failed.
    pub fn calls_cut_off(&self, calls: u64) {
        self.calls.fetch_add(calls, Ordering::Relaxed);
        self.calls_failed.fetch_add(calls, Ordering::Relaxed);
    }

    /// What went wrong last; empty once a new instance is up.
    pub fn set_last_error(&self, error: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }

    pub fn snapshot(&self) -> LiveStatus {
        let started = self.instance_started_ms.load(Ordering::Relaxed);
        LiveStatus {
            calls: self.calls.load(Ordering::Relaxed),
            calls_failed: self.calls_failed.load(Ordering::Relaxed),
            memory_bytes: self.memory_bytes.load(Ordering::Relaxed),
            cpu_ms: self.cpu_micros.load(Ordering::Relaxed) / 1000,
            restarts: self.restarts.load(Ordering::Relaxed),
            uptime_ms: if started == 0 {
                0
            } else {
                now_ms().saturating_sub(started)
            },
            last_error: self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}
