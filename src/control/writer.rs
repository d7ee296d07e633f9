//! The single writer: group commit.
//!
//! One thread owns a working copy of the state and the right to append. It drains its queue
//! into a batch, decides each command against the working state (which already holds the
//! earlier commands of the batch), appends the whole batch in one write transaction with one
//! durable commit, then applies it to the published state, lets tailers see it and answers
//! every caller. Callers are answered only after their events are durable. If the commit
//! fails, every caller of the batch gets the error and the working state is reset to the
//! published (committed) one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::command::{Command, Context, Decision, Reply, decide};
use super::error::{Error, Result};
use super::{Clock, CommitHook, EventLog, WriterOptions};
use crate::limits::LimitsTable;
use crate::log::{BlobRef, frame};
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

pub(super) struct Writer {
    pub log: EventLog,
    pub working: State,
    pub published: Arc<RwLock<State>>,
    pub limits: Arc<LimitsTable>,
    pub clock: Clock,
    pub options: WriterOptions,
    pub shutting_down: Arc<AtomicBool>,
    pub last_snapshot_seq: u64,
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
        while let Some(first) = requests.blocking_recv() {
            batch.push(first);
            while batch.len() < self.options.max_batch {
                match requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            let mut close = None;
            let commands = batch.drain(..).filter_map(|request| match request {
                Request::Command { command, reply } => Some((command, reply)),
                Request::Close { done } => {
                    close = Some(done);
                    None
                }
            });
            let commands: Vec<_> = commands.collect();
            self.process(commands);
            if let Some(done) = close {
                let _ = done.send(());
                return;
            }
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
            let tenant_limits = match &command {
                Command::Deploy(cmd) => self.limits.for_tenant(&cmd.tenant),
                _ => &self.limits.node,
            };
            let cx = Context {
                now_ms,
                shutting_down,
                limits: tenant_limits,
            };
            match decide(&self.working, &command, cx) {
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
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
                    blobs.extend(blob);
                    events.push(Arc::new(event));
                }
            }
        }
        if events.is_empty() {
            answer(pending);
            return;
        }
        self.commit(events, &blobs, pending, shutting_down);
    }

    /// Appends the batch and answers its callers. `shutting_down` is raised for everyone once
    /// the batch (which may hold the shutdown request) is durable.
    fn commit(
        &mut self,
        events: Vec<Arc<Event>>,
        blobs: &[super::command::Module],
        pending: Vec<Pending>,
        shutting_down: bool,
    ) {
        let blob_refs: Vec<BlobRef<'_>> = blobs
            .iter()
            .map(|m| BlobRef {
                sha256: &m.sha256,
                bytes: &m.bytes,
            })
            .collect();
        let started = Instant::now();
        match self.log.append(&events, &blob_refs) {
            Ok(_) => {
                let elapsed = started.elapsed();
                {
                    let mut published = self.published.write().unwrap_or_else(|poison| poison.into_inner());
                    for event in &events {
                        if let Err(e) = published.apply(event) {
                            tracing::error!(seq = event.seq, error = %e, "committed event does not apply");
                            published.skip(event);
                        }
                    }
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
                self.maybe_snapshot();
            }
            Err(e) => {
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
            }
        }
    }

    fn maybe_snapshot(&mut self) {
        let seq = self.working.applied_seq();
        if self.options.snapshot_every == 0 || seq - self.last_snapshot_seq < self.options.snapshot_every {
            return;
        }
        let frame = frame::encode_with(|out| self.working.encode_snapshot(out));
        match self.log.store().put_snapshot(seq, &frame, self.options.snapshots_kept) {
            Ok(()) => {
                self.last_snapshot_seq = seq;
                tracing::debug!(seq, bytes = frame.len(), "snapshot written");
            }
            Err(e) => {
                // A snapshot only saves replay time; the log itself is intact.
                tracing::warn!(seq, error = %e, "snapshot not written");
                self.last_snapshot_seq = seq;
            }
        }
    }
}

fn answer(pending: Vec<Pending>) {
    for p in pending {
        let _ = p.reply.send(Ok(p.answer));
    }
}
