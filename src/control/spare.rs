//! The writer's spare copy of the state, brought up to date off the writer's path.
//!
//! The writer decides commands on its working copy while queries read the published one; after
//! each commit the two swap, and the copy swapped out has missed the batch. Applying the batch
//! to it on the writer thread put a third of a microsecond per event on every caller's wait. So
//! the writer keeps one more copy, and a helper thread brings a copy up to date while the
//! writer waits for a batch's commit, when the writer and its callers leave the CPU idle. After
//! the commit the writer takes the helper's copy, which holds the batch, as its working copy,
//! and keeps the copy swapped out for the next round. The price is that copy's memory.
//!
//! The helper also frees the events that left the log's in-memory window, which would
//! otherwise take the writer's time between batches.
//!
//! Each round is one message each way, so the helper is woken once per batch. Its copy is
//! handed back as soon as it is ready; the writer waits only if the commit was faster than the
//! catching up.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use super::{Events, apply_committed};
use crate::proto::Event;
use crate::state::State;

/// The spare copy and the helper that catches it up. Used in rounds: [`Spare::lend`] as a batch
/// is about to be committed, then [`Spare::exchange`] once it is, or [`Spare::reset`] if the
/// commit failed.
pub(super) struct Spare {
    /// Between rounds: the copy and the batch it missed.
    behind: Option<(State, Events)>,
    /// `None` only while dropping, to let the helper end.
    rounds: Option<Sender<Round>>,
    /// Unbounded, yet never holds more than one copy: the writer takes each round's.
    ready: Receiver<(State, Vec<Arc<Event>>)>,
    thread: Option<JoinHandle<()>>,
}

struct Round {
    copy: State,
    /// Applied in this order.
    missed: Events,
    batch: Events,
    /// Events to free; the emptied vector comes back for reuse.
    evicted: Vec<Arc<Event>>,
}

impl Spare {
    /// Starts the helper. `copy` is a copy of the writer's state.
    pub(super) fn start(copy: State) -> Spare {
        let (rounds, inbox) = channel();
        let (handback, ready) = channel();
        let thread = std::thread::Builder::new()
            .name("solo-state-spare".into())
            .spawn(move || serve(inbox, handback))
            .expect("the spare state's thread starts");
        Spare {
            behind: Some((copy, Arc::new([]))),
            rounds: Some(rounds),
            ready,
            thread: Some(thread),
        }
    }

    /// Has the helper apply `batch`, about to be committed, to the spare copy, and free
    /// `evicted`.
    pub(super) fn lend(&mut self, batch: Events, evicted: Vec<Arc<Event>>) {
        let Some((copy, missed)) = self.behind.take() else {
            unreachable!("a round is lent only after the previous one was exchanged or reset");
        };
        let round = Round {
            copy,
            missed,
            batch,
            evicted,
        };
        // The helper ends only when `rounds` closes, or by a panic in applying events, which
        // the writer would have met first: it applied them when deciding them.
        self.rounds
            .as_ref()
            .and_then(|rounds| rounds.send(round).ok())
            .expect("the spare state's thread takes rounds");
    }

    /// After the lent batch committed: puts the helper's copy, which holds it, in `working`, and
    /// keeps the copy that was there, which missed it. Returns an empty vector for the next
    /// round's evicted events.
    pub(super) fn exchange(&mut self, working: &mut State, batch: Events) -> Vec<Arc<Event>> {
        let (caught_up, emptied) = self.take();
        self.behind = Some((std::mem::replace(working, caught_up), batch));
        emptied
    }

    /// After the lent batch failed to commit: the helper's copy holds it, so `committed` takes
    /// its place.
    pub(super) fn reset(&mut self, committed: State) -> Vec<Arc<Event>> {
        let (_, evicted) = self.take();
        self.behind = Some((committed, Arc::new([])));
        evicted
    }

    fn take(&mut self) -> (State, Vec<Arc<Event>>) {
        self.ready.recv().expect("the spare state's thread hands its copy back")
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        self.rounds = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(rounds: Receiver<Round>, handback: Sender<(State, Vec<Arc<Event>>)>) {
    // The vector emptied in the previous round, handed back with this round's copy.
    let mut emptied = Vec::new();
    for mut round in rounds {
        apply_committed(&mut round.copy, &round.missed);
        apply_committed(&mut round.copy, &round.batch);
        if handback.send((round.copy, emptied)).is_err() {
            return;
        }
        // After the handback: the writer may be waiting for the copy, never for this.
        round.evicted.clear();
        emptied = round.evicted;
        drop(round.missed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::recovery::tests::history;
    use crate::state::Settings;

    fn replayed(events: &[Arc<Event>]) -> State {
        let mut state = State::new(Settings::default());
        for event in events {
            state.apply(event).expect("the history applies");
        }
        state
    }

    /// Drives the spare as the writer does, with every third commit failing and the batch then
    /// retried: the working and published copies always equal a replay of what committed.
    #[test]
    fn the_copies_follow_the_commits_and_forget_failed_batches() {
        let events: Vec<Arc<Event>> = history(40, 3).into_iter().map(Arc::new).collect();
        let mut spare = Spare::start(State::new(Settings::default()));
        let mut working = State::new(Settings::default());
        let mut published = working.clone();
        let mut committed = 0;
        for attempt in 0.. {
            let Some(batch) = events[committed..].chunks(23).next() else {
                break;
            };
            for event in batch {
                working.apply(event).expect("a batch applies to the working copy");
            }
            let batch: Events = batch.into();
            spare.lend(Arc::clone(&batch), Vec::new());
            if attempt % 3 == 2 {
                spare.reset(published.clone());
                working = published.clone();
            } else {
                std::mem::swap(&mut published, &mut working);
                spare.exchange(&mut working, Arc::clone(&batch));
                committed += batch.len();
            }
            let expected = replayed(&events[..committed]);
            assert_eq!(published, expected, "published after attempt {attempt}");
            assert_eq!(working, expected, "working after attempt {attempt}");
        }
        assert_eq!(published.applied_seq(), events.len() as u64);
    }

    /// Evicted events are freed by the helper, and their vector comes back empty for reuse.
    #[test]
    fn evicted_events_are_freed_by_the_helper() {
        let events: Vec<Arc<Event>> = history(4, 1).into_iter().map(Arc::new).collect();
        let evicted: Vec<Arc<Event>> = events.iter().map(Arc::clone).collect();
        let mut spare = Spare::start(State::new(Settings::default()));
        let mut published = replayed(&events[..6]);
        let mut working = published.clone();

        spare.lend(events[..6].into(), evicted);
        let batch: Events = events[6..].into();
        for event in batch.iter() {
            working.apply(event).unwrap();
        }
        spare.reset(published.clone());
        spare.lend(Arc::clone(&batch), Vec::with_capacity(1));
        std::mem::swap(&mut published, &mut working);
        let emptied = spare.exchange(&mut working, batch);
        assert!(emptied.is_empty());
        assert!(
            emptied.capacity() >= events.len(),
            "the first round's vector comes back"
        );
        // The first six were in no batch since: only the evicted vector held them.
        let held = |e: &Arc<Event>| Arc::strong_count(e) > 1;
        assert!(!events[..6].iter().any(held), "the helper let them go");
    }
}
