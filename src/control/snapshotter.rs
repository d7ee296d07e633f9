//! Snapshots, taken off the writer's threads.
//!
//! The snapshotter keeps a copy of the state of its own: the writer sends it each committed
//! batch, it applies the batch, and every `snapshot_every` events it encodes its copy and writes
//! it. So a snapshot is exactly the state at a batch's end, and taking one never holds a lock
//! the writer needs: copying a large state under the published state's lock held the next
//! commit for as long as the copy took (27 ms at 20,000 services). The price is a copy of the
//! state in memory and a second application of every event, on this thread. A snapshot is
//! derived data: if one cannot be written, the next one will be, and the log is intact either
//! way.

use std::sync::mpsc::{Receiver, Sender, channel};

use super::{EventLog, Events, apply_committed};
use crate::log::frame;
use crate::state::State;

/// Where the committing stage sends each committed batch.
pub(super) type Batches = Sender<Events>;

pub(super) struct Snapshotter {
    log: EventLog,
    state: State,
    every: u64,
    keep: usize,
    last_snapshot_seq: u64,
}

impl Snapshotter {
    /// Starts the snapshotter thread with a copy of `state`, or returns `None` if snapshots are
    /// off. It stops when the sender is dropped.
    pub(super) fn start(
        log: EventLog,
        state: &State,
        every: u64,
        keep: usize,
        last_snapshot_seq: u64,
    ) -> Option<(Batches, std::thread::JoinHandle<()>)> {
        if every == 0 {
            return None;
        }
        let (batches, receiver) = channel();
        let snapshotter = Snapshotter {
            log,
            state: state.clone(),
            every,
            keep,
            last_snapshot_seq,
        };
        let thread = std::thread::Builder::new()
            .name("solo-snapshot".into())
            .spawn(move || snapshotter.run(receiver))
            .expect("the snapshot thread starts");
        Some((batches, thread))
    }

    fn run(mut self, batches: Receiver<Events>) {
        // Batches that arrive while a snapshot is written wait in the channel.
        for batch in batches {
            apply_committed(&mut self.state, &batch);
            if self.state.applied_seq().saturating_sub(self.last_snapshot_seq) >= self.every {
                self.write();
            }
        }
    }

    fn write(&mut self) {
        let seq = self.state.applied_seq();
        let frame = frame::encode_with(|out| self.state.encode_snapshot(out));
        match self.log.store().put_snapshot(seq, &frame, self.keep) {
            Ok(()) => tracing::debug!(seq, bytes = frame.len(), "snapshot written"),
            // A snapshot only saves replay time; the log itself is intact.
            Err(e) => tracing::warn!(seq, error = %e, "snapshot not written"),
        }
        self.last_snapshot_seq = seq;
    }
}
