//! What compiling modules may cost the node. Each tenant has a budget of compiles (its deploy
//! rate) and compiles one module at a time; the node runs a bounded number of compiles at once,
//! in slots for small modules and slots for large ones, so neither kind waits for the other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

use super::error::PrepareError;
use super::module;
use crate::state::RateWindow;

/// A module of at most this many bytes and functions is small: its compile takes little memory
/// (about 6 KiB a function, besides its code), so small modules have compile slots of their
/// own, more of them, and never wait behind large ones.
pub(super) const SMALL_MODULE_BYTES: usize = 256 << 10;
pub(super) const SMALL_MODULE_FUNCTIONS: usize = 2_048;

/// Small compiles that may run at once for each large one (`compile_threads`).
pub(super) const SMALL_COMPILES_PER_SLOT: usize = 4;

/// Tenants' compile records kept before the idle ones are dropped.
const COMPILE_RECORDS_KEPT: usize = 1024;

pub(super) fn is_small(wasm: &[u8]) -> bool {
    wasm.len() <= SMALL_MODULE_BYTES && module::function_count(wasm) <= SMALL_MODULE_FUNCTIONS
}

/// How many modules a tenant may have compiled for its deploys: at most `max` within the last
/// `window_ms`. It is the tenant's deploy rate, so that modules refused (as invalid, or by
/// another quota once compiled) cost the node no more than deploys would; a module already
/// compiled costs nothing.
#[derive(Debug, Clone, Copy)]
pub struct CompileQuota {
    pub max: u32,
    pub window_ms: u64,
    pub now_ms: u64,
}

impl CompileQuota {
    fn window_start(&self) -> u64 {
        self.now_ms.saturating_sub(self.window_ms)
    }
}

/// The node's compiles: each tenant's record, and the slots all tenants share.
pub(super) struct Compiles {
    by_tenant: Mutex<HashMap<String, Arc<TenantCompiles>>>,
    /// A permit per compile under way, all tenants together: large modules, and small ones.
    pub(super) large_slots: Semaphore,
    pub(super) small_slots: Semaphore,
}

impl Compiles {
    /// `compile_threads` large compiles at once, and [`SMALL_COMPILES_PER_SLOT`] times as many
    /// small ones.
    pub(super) fn new(compile_threads: usize) -> Compiles {
        let threads = compile_threads.max(1);
        Compiles {
            by_tenant: Mutex::new(HashMap::new()),
            large_slots: Semaphore::new(threads),
            small_slots: Semaphore::new(threads * SMALL_COMPILES_PER_SLOT),
        }
    }

    /// `tenant`'s compile record, created on first use.
    pub(super) fn of(&self, tenant: &str, quota: CompileQuota) -> Arc<TenantCompiles> {
        let mut compiles = self.by_tenant.lock().unwrap_or_else(|p| p.into_inner());
        // Records that nobody holds and that count no compile are dropped as the map grows,
        // not one by one.
        if compiles.len() >= COMPILE_RECORDS_KEPT {
            compiles.retain(|_, record| Arc::strong_count(record) > 1 || !record.is_idle(quota));
        }
        Arc::clone(
            compiles
                .entry(tenant.to_string())
                .or_insert_with(|| Arc::new(TenantCompiles::default())),
        )
    }

    /// A turn to compile a module, small or large, among all the node's compiles.
    pub(super) async fn slot(&self, small: bool) -> SemaphorePermit<'_> {
        let slots = if small { &self.small_slots } else { &self.large_slots };
        slots.acquire().await.expect("the compile slots are never closed")
    }
}

/// A tenant's compiles. One at a time: a tenant sending many large modules at once queues
/// behind itself, and leaves the other cores to everyone else.
pub(super) struct TenantCompiles {
    turn: Semaphore,
    /// Compiles within the quota's window.
    recent: Mutex<RateWindow>,
}

impl Default for TenantCompiles {
    fn default() -> TenantCompiles {
        TenantCompiles {
            turn: Semaphore::new(1),
            recent: Mutex::new(RateWindow::default()),
        }
    }
}

impl TenantCompiles {
    pub(super) async fn turn(&self) -> SemaphorePermit<'_> {
        self.turn.acquire().await.expect("the turn is never closed")
    }

    /// Counts one compile, if the quota has room for it.
    pub(super) fn charge(&self, quota: CompileQuota) -> Result<(), PrepareError> {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let compiled = recent.since(quota.window_start(), quota.window_ms);
        if compiled >= quota.max.into() {
            let room_at = recent.room_at(quota.now_ms, quota.window_ms, quota.max.into());
            return Err(PrepareError::OverCompileQuota {
                limit: quota.max,
                compiled,
                retry_after: Duration::from_millis(room_at - quota.now_ms),
            });
        }
        recent.record(quota.now_ms, quota.window_ms);
        Ok(())
    }

    /// Whether the tenant compiled nothing within the window: its record may go.
    fn is_idle(&self, quota: CompileQuota) -> bool {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.since(quota.window_start(), quota.window_ms) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenants_compiles_are_counted_within_the_window() {
        let record = TenantCompiles::default();
        let at = |now_ms| CompileQuota {
            max: 2,
            window_ms: 60_000,
            now_ms,
        };
        assert!(record.is_idle(at(1_000)));
        record.charge(at(1_000)).unwrap();
        record.charge(at(30_000)).unwrap();
        assert_eq!(
            record.charge(at(59_000)),
            Err(PrepareError::OverCompileQuota {
                limit: 2,
                compiled: 2,
                // The first compile, at 1 s, counts to the end of its second: until 61.999 s.
                retry_after: Duration::from_millis(2_999)
            })
        );
        // The first compile leaves the window: room for one.
        record.charge(at(62_000)).unwrap();
        assert!(record.charge(at(62_000)).is_err());
        assert!(!record.is_idle(at(62_000)));
        assert!(record.is_idle(at(200_000)));
    }

    /// Idle records go once the map is full; records in use, or counting a compile, stay.
    #[test]
    fn idle_tenant_records_are_dropped_as_the_map_fills() {
        let compiles = Compiles::new(1);
        let at = |now_ms| CompileQuota {
            max: 10,
            window_ms: 60_000,
            now_ms,
        };
        compiles.of("busy", at(1_000)).charge(at(1_000)).unwrap();
        let held = compiles.of("held", at(1_000));
        for i in 0..COMPILE_RECORDS_KEPT {
            compiles.of(&format!("idle{i}"), at(2_000));
        }
        // The map filled once, two records before the end: the idle records in it then went.
        assert_eq!(
            compiles.by_tenant.lock().unwrap().len(),
            4,
            "busy, held and two idle records"
        );
        assert!(Arc::ptr_eq(&held, &compiles.of("held", at(3_000))));
        let busy = compiles.of("busy", at(3_000));
        assert_eq!(
            busy.recent.lock().unwrap().since(0, 60_000),
            1,
            "its compile is still counted"
        );
    }
}
