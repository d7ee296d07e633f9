//! The single writer: group commit.
//!
//! One thread owns a working copy of the state and the right to append. It drains its queue
//! into a batch, decides each command against the working state (which already holds the
//! earlier commands of the batch), appends the whole batch in one write transaction with one
//! durable commit, then swaps the working copy in as the published state, lets tailers see
//! the batch and answers every caller; the copy swapped out then catches up on the batch.
//! Callers are answered only after their events are durable. If the commit fails, every caller
//! of the batch gets the error and the working state is reset to the published (committed)
//! one.
//!
//! A commit costs about the same for one event as for hundreds (the fsync dominates), so under
//! load the writer lets a batch fill: when the previous batch was large and the queue is still
//! short, it waits a moment for the callers it just answered to come back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::command::{Command, Context, Decision, Module, Reply, decide};
use super::error::{Error, Result};
use super::snapshotter::Heads;
use super::{Clock, CommitHook, EventLog, WriterOptions};
use crate::limits::LimitsTable;
use crate::log::BlobRef;
use crate::proto::{Event, event::Kind};
use crate::state::State;

// Requests are moved once through the queue; boxing the large variant would only add an
// allocation per command.
#[allow(clippy::large_enum_variant)]
pub(super) enum Request {
    Command {
        command: Command,
        reply: oneshot::Sender<Result<Reply>>,
    },
    /// Stop after the batch at hand; answered when the writer is done.
    Close { done: oneshot::Sender<()> },
}

/// Module hashes the writer remembers as stored; forgetting one only costs a lookup.
const STORED_BLOBS_REMEMBERED: usize = 4096;

/// A batch this large means callers are queueing: worth letting the next one fill.
const BUSY_BATCH: usize = 16;

/// The longest the writer waits for a batch to fill, and how often it looks.
const LINGER: Duration = Duration::from_micros(200);
const LINGER_STEP: Duration = Duration::from_micros(20);

pub(super) struct Writer {
    pub log: EventLog,
    pub working: State,
    pub published: Arc<RwLock<State>>,
    pub limits: Arc<LimitsTable>,
    pub clock: Clock,
    pub options: WriterOptions,
    pub shutting_down: Arc<AtomicBool>,
    /// Hashes of modules known to be in the blob store (bounded: cleared when full).
    pub stored_blobs: std::collections::HashSet<[u8; 32]>,
    /// The head after each commit goes here for snapshots, if they are on.
    pub snapshots: Option<Heads>,
    pub on_commit: Option<CommitHook>,
}

/// A caller waiting for the batch to commit, and what it will be told.
struct Pending {
    reply: oneshot::Sender<Result<Reply>>,
    answer: Reply,
}

impl Writer {
    pub(super) fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(self.options.max_batch);
        let mut last_batch = 0;
        while let Some(first) = requests.blocking_recv() {
            batch.push(first);
            self.fill(&mut requests, &mut batch, last_batch);
            last_batch = batch.len();
            let mut close = None;
            let commands: Vec<_> = batch
                .drain(..)
                .filter_map(|request| match request {
                    Request::Command { command, reply } => Some((command, reply)),
                    Request::Close { done } => {
                        close = Some(done);
                        None
                    }
                })
                .collect();
            self.process(commands);
            if let Some(done) = close {
                let _ = done.send(());
                return;
            }
        }
    }

    /// Adds queued requests to `batch`, lingering briefly while the queue is short of what the
    /// previous batch held (the callers just answered are about to send again).
    fn fill(&self, requests: &mut mpsc::Receiver<Request>, batch: &mut Vec<Request>, last_batch: usize) {
        let max = self.options.max_batch;
        let target = last_batch.min(max);
        let linger_until = Instant::now() + LINGER;
        loop {
            while batch.len() < max {
                match requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            let waiting = last_batch >= BUSY_BATCH && batch.len() < target * 9 / 10 && Instant::now() < linger_until;
            if !waiting {
                return;
            }
            std::thread::sleep(LINGER_STEP);
        }
    }

    fn process(&mut self, commands: Vec<(Command, oneshot::Sender<Result<Reply>>)>) {
        let now_ms = (self.clock)().max(self.working.last_timestamp_ms());
        let mut events: Vec<Arc<Event>> = Vec::with_capacity(commands.len());
        let mut blobs = Vec::new();
        let mut pending = Vec::with_capacity(commands.len());
        // Commands after a shutdown request in the same batch are refused too; the shared flag
        // is raised only once the request is durable.
        let mut shutting_down = self.shutting_down.load(Ordering::Acquire);
        for (command, reply) in commands {
            let limits = match &command {
                Command::Deploy(cmd) => self.limits.for_tenant(&cmd.tenant),
                _ => &self.limits.node,
            };
            let cx = Context {
                now_ms,
                shutting_down,
                limits,
                node_services: self.limits.node_services,
            };
            match decide(&self.working, &command, cx) {
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
                // Answered after the commit: it may rest on events of this batch.
                Ok(Decision::Answer(answer)) => pending.push(Pending { reply, answer }),
                Ok(Decision::Append {
                    mut event,
                    blob,
                    reply: answer_for,
                }) => {
                    event.seq = self.working.applied_seq() + 1;
                    event.timestamp_ms = now_ms;
                    if let Err(e) = self.working.apply(&event) {
                        // decide() checked this; a failure here is a bug, reported, not appended.
                        tracing::error!(error = %e, "a decided event does not apply");
                        let _ = reply.send(Err(Error::Stale(e)));
                        continue;
                    }
                    shutting_down |= matches!(event.kind, Some(Kind::ShutdownRequested(_)));
                    pending.push(Pending {
                        reply,
                        answer: answer_for(&event),
                    });
                    // A module already in the blob store (or in this batch) is not written again.
                    if let Some(module) = blob
                        && !self.stored_blobs.contains(&module.sha256)
                        && !blobs.iter().any(|m: &Module| m.sha256 == module.sha256)
                    {
                        blobs.push(module);
                    }
                    events.push(Arc::new(event));
                }
            }
        }
        if events.is_empty() {
            answer(pending);
            return;
        }
        self.commit(events, blobs, pending, shutting_down);
    }

    /// Appends the batch and answers its callers. `shutting_down` is raised for everyone once
    /// the batch (which may hold the shutdown request) is durable.
    fn commit(&mut self, events: Vec<Arc<Event>>, blobs: Vec<Module>, pending: Vec<Pending>, shutting_down: bool) {
        let blob_refs: Vec<BlobRef<'_>> = blobs
            .iter()
            .map(|m| BlobRef {
                sha256: &m.sha256,
                bytes: &m.bytes,
            })
            .collect();
        let started = Instant::now();
        if let Err(e) = self.log.append(&events, &blob_refs) {
            tracing::error!(error = %e, events = events.len(), "commit failed; the batch was not written");
            let error = Error::from(e);
            for p in pending {
                let _ = p.reply.send(Err(error.clone()));
            }
            self.working = self
                .published
                .read()
                .unwrap_or_else(|poison| poison.into_inner())
                .clone();
            return;
        }
        let elapsed = started.elapsed();
        if self.stored_blobs.len() + blobs.len() > STORED_BLOBS_REMEMBERED {
            self.stored_blobs.clear();
        }
        self.stored_blobs.extend(blobs.iter().map(|m| m.sha256));
        // The working copy holds the batch: it becomes the published state in one swap, so
        // readers wait only for the swap. The copy that was published catches up after the
        // callers are answered, while they prepare their next commands.
        {
            let mut published = self.published.write().unwrap_or_else(|poison| poison.into_inner());
            std::mem::swap(&mut *published, &mut self.working);
        }
        if shutting_down {
            self.shutting_down.store(true, Ordering::Release);
        }
        // Tailers hear of the batch only now, so whoever sees an event finds it in the state.
        self.log.publish(&events);
        if let Some(hook) = &self.on_commit {
            hook(&events, elapsed);
        }
        answer(pending);
        if let (Some(snapshots), Some(last)) = (&self.snapshots, events.last()) {
            // The snapshotter is gone only when the node is closing.
            let _ = snapshots.send(last.seq);
        }
        for event in &events {
            if let Err(e) = self.working.apply(event) {
                tracing::error!(seq = event.seq, error = %e, "committed event does not apply");
                self.working.skip(event);
            }
        }
    }
}

fn answer(pending: Vec<Pending>) {
    for p in pending {
        let _ = p.reply.send(Ok(p.answer));
    }
}
