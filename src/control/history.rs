//! A check, in the background, of the history that a node started from a snapshot did not read.
//!
//! Recovery replays only what follows the newest snapshot, checking each record it reads; the
//! records before it are read again only by a watcher, an audit or `solo log verify`. A record
//! damaged there would otherwise go unnoticed until someone needs it, perhaps long after the
//! backups that hold it whole are gone. So the node checks them once as it starts, as etcd
//! checks its data at start: every record's checksum, and that no seq is missing. Damage is
//! logged as an error and shown on `/health` (`history_error`) and in `/metrics`; the node
//! serves on, and stays ready, as everything after the snapshot is sound: a probe that took it
//! out of service would only have it restart, and find the same damage. The scan goes in
//! chunks, each in a short read transaction, so that it pins no pages the writer would want
//! back, and it stops when the node closes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use super::EventLog;

/// Records checked in one read transaction: a few milliseconds' work.
const CHUNK: u64 = 65_536;

#[derive(Debug, Default)]
pub(super) struct HistoryCheck {
    damage: OnceLock<String>,
    stop: AtomicBool,
}

impl HistoryCheck {
    /// Checks records `1..=through` on a thread of its own.
    pub fn start(log: EventLog, through: u64) -> (Arc<HistoryCheck>, Option<std::thread::JoinHandle<()>>) {
        let check = Arc::new(HistoryCheck::default());
        if through == 0 {
            return (check, None);
        }
        let checking = Arc::clone(&check);
        let thread = std::thread::Builder::new()
            .name("solo-history-check".into())
            .spawn(move || checking.run(&log, through))
            .expect("the history check's thread starts");
        (check, Some(thread))
    }

    /// What the check found wrong, if anything (yet).
    pub fn damage(&self) -> Option<&str> {
        self.damage.get().map(String::as_str)
    }

    /// Ends the check at its next chunk.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn run(&self, log: &EventLog, through: u64) {
        let started = std::time::Instant::now();
        match check(log, through, &self.stop) {
            Ok(true) => tracing::info!(
                through,
                took_ms = started.elapsed().as_millis() as u64,
                "checked the log's history before the snapshot: every record is whole"
            ),
            Ok(false) => {}
            // Not damage: the check could not read (a full reader table, an I/O error).
            Err(e) if e.damaged_seq().is_none() => {
                tracing::warn!(error = %e, "the check of the log's history could not finish; `solo log verify` can");
            }
            Err(damage) => {
                tracing::error!(
                    %damage,
                    "the log's history before the snapshot is damaged: the node serves on, but a \
                     watcher or audit reading there will fail; `solo log verify` tells more, and a \
                     backup repairs it"
                );
                let _ = self.damage.set(format!("the log's history is damaged: {damage}"));
            }
        }
    }
}

/// Whether records `1..=through` are all there and whole (`Ok(false)`: stopped before the end).
fn check(log: &EventLog, through: u64, stop: &AtomicBool) -> Result<bool, crate::log::Error> {
    let mut from = 1;
    while from <= through {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let to = through.min(from + CHUNK - 1);
        let mut next = from;
        log.store().visit_frames(from..=to, |seq, _| {
            next = seq + 1;
            Ok(())
        })?;
        // The scan stops quietly where records end: one missing at the chunk's end is a gap.
        if next <= to {
            return Err(crate::log::Error::MissingRecord { seq: next });
        }
        from = to + 1;
    }
    Ok(true)
}
