//! Snapshots, taken off the writer's threads.
//!
//! The committing stage tells the snapshotter how far the log has come. Every `snapshot_every`
//! events the snapshotter copies the published state (holding its read lock only for the copy)
//! and encodes and writes the copy on its own thread, so a large state never holds up a commit
//! for the time it takes to encode. A snapshot is derived data: if one cannot be written, the
//! next one will be, and the log is intact either way.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, RwLock};

use super::EventLog;
use crate::log::frame;
use crate::state::State;

/// Where the committing stage sends the seq of each committed batch's last event.
pub(super) type Heads = Sender<u64>;

pub(super) struct Snapshotter {
    log: EventLog,
    published: Arc<RwLock<State>>,
    every: u64,
    keep: usize,
    last_snapshot_seq: u64,
}

impl Snapshotter {
    /// Starts the snapshotter thread, or returns `None` if snapshots are off. It stops when
    /// the sender is dropped.
    pub(super) fn start(
        log: EventLog,
        published: Arc<RwLock<State>>,
        every: u64,
        keep: usize,
        last_snapshot_seq: u64,
    ) -> Option<(Heads, std::thread::JoinHandle<()>)> {
        if every == 0 {
            return None;
        }
        let (heads, receiver) = channel();
        let snapshotter = Snapshotter {
            log,
            published,
            every,
            keep,
            last_snapshot_seq,
        };
        let thread = std::thread::Builder::new()
            .name("solo-snapshot".into())
            .spawn(move || snapshotter.run(receiver))
            .expect("the snapshot thread starts");
        Some((heads, thread))
    }

    fn run(mut self, heads: Receiver<u64>) {
        for head in heads {
            if head.saturating_sub(self.last_snapshot_seq) >= self.every {
                self.write();
            }
        }
    }

    fn write(&mut self) {
        // The copy is of whatever is published now, which may be past the head that was due.
        let state = self.published.read().unwrap_or_else(|p| p.into_inner()).clone();
        let seq = state.applied_seq();
        let frame = frame::encode_with(|out| state.encode_snapshot(out));
        match self.log.store().put_snapshot(seq, &frame, self.keep) {
            Ok(()) => tracing::debug!(seq, bytes = frame.len(), "snapshot written"),
            // A snapshot only saves replay time; the log itself is intact.
            Err(e) => tracing::warn!(seq, error = %e, "snapshot not written"),
        }
        self.last_snapshot_seq = seq;
    }
}
