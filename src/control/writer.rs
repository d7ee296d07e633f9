//! The single writer: group commit.
//!
//! One thread owns a working copy of the state and the right to append. It takes commands off
//! its queue into a batch, deciding each as it comes against the working state (which already
//! holds the earlier commands of the batch) and framing its event, appends the whole batch in
//! one write transaction with one durable commit, then swaps the working copy in as the
//! published state, lets tailers see the batch and answers every caller. The copy swapped out
//! has missed the batch; it goes to a helper thread ([`super::spare`]) in exchange for a third
//! copy that the helper brought up to date during the commit. Callers are answered only once
//! their batch is durable, refused ones too. If the commit fails, every caller of the batch
//! that was not refused gets the error, and the working state is reset to the published
//! (committed) one.
//!
//! A few events bring events of the node's own into the same batch, which no caller waits
//! for: a stop that takes a tenant past its `max_stopped_services` (and the node's start, for
//! every tenant) brings the removal of the services stopped longest ago.
//!
//! The writer is the one serial step, so it leaves what it can to the callers: a command's
//! strings move into its event rather than being copied, an appended command is answered with
//! the shared event (the caller reads its answer from it), and events that left the tail window
//! are freed only after the callers are answered.
//!
//! A commit costs about the same for one event as for hundreds (the fsync dominates), so under
//! load the writer lets a batch fill: when the previous batch was large and the queue is still
//! short, it waits a moment for the callers it just answered to come back. A batch of the
//! runtime's observations alone, which no caller's reply waits for, waits that moment too: a
//! deploy brings its service's `service_started` just as the client that deployed sends its
//! next command, which would otherwise queue behind a commit of its own.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::command::{Blob, Command, Context, Decision, Reply, collect_stopped, decide};
use super::error::{Error, Result};
use super::noop_keys::{KeyedRequest, NoOpKeys};
use super::snapshotter::Batches;
use super::spare::Spare;
use super::{Clock, CommitHook, EventLog, Events, WriterOptions};
use crate::limits::LimitsTable;
use crate::log::{self, BlobChanges, BlobRef, RequestChanges};
use crate::proto::{Event, StopReason, event::Kind};
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
    /// While the last commit has failed: try a commit, even with nothing to write, to learn
    /// whether the log takes writes again.
    ProbeWrites,
}

/// Module hashes the writer remembers as stored; forgetting one only costs a lookup.
const STORED_BLOBS_REMEMBERED: usize = 4096;

/// A batch this large means callers are queueing: worth letting the next one fill.
const BUSY_BATCH: usize = 16;

/// The longest the writer waits for a batch to fill (a commit takes a few times this), and how
/// often it looks.
const LINGER: Duration = Duration::from_micros(200);
const LINGER_STEP: Duration = Duration::from_micros(20);

pub(super) struct Writer {
    pub log: EventLog,
    pub working: State,
    pub published: Arc<RwLock<State>>,
    /// The copy that becomes the working one after each commit, caught up by a helper thread.
    pub spare: Spare,
    pub limits: Arc<LimitsTable>,
    pub clock: Clock,
    pub options: WriterOptions,
    pub shutting_down: Arc<AtomicBool>,
    /// The seq of the durable `shutdown_requested` of this run, if any.
    pub shutdown_seq: Option<u64>,
    /// Hashes of modules known to be in the blob store (bounded: cleared when full).
    pub stored_blobs: std::collections::HashSet<[u8; 32]>,
    /// Each committed batch goes here for snapshots, if they are on.
    pub snapshots: Option<Batches>,
    pub on_commit: Option<CommitHook>,
    /// Events that left the log's in-memory window; the helper frees them in the next round.
    pub evicted: Vec<Arc<Event>>,
    /// Keys of requests that changed nothing, which no event carries.
    pub noop_keys: NoOpKeys,
    pub commit_failure: Arc<CommitFailure>,
}

/// Why the last commit failed, until one succeeds: a node whose log cannot take writes (a full
/// disk) says so on `/health`.
#[derive(Debug, Default)]
pub struct CommitFailure {
    failing: AtomicBool,
    message: std::sync::Mutex<String>,
    /// For a full disk, the room a probe must find ([`Writer::probe`]); 0 for a failure that a
    /// probe cannot clear (a full map, the file size limit: both take a restart).
    probe_needs: AtomicU64,
}

/// Room on the disk beyond twice the failed batch that a probe asks for: LMDB writes the
/// branch pages a batch changes anew, and the batch that comes next may be larger.
const PROBE_MARGIN: u64 = 1 << 20;

impl CommitFailure {
    /// A commit failed with `error`; a probe may clear it once the disk has `probe_needs`
    /// bytes free (0: no probe can).
    fn failed(&self, error: &Error, probe_needs: u64) {
        *self.message.lock().unwrap_or_else(|p| p.into_inner()) = error.to_string();
        self.probe_needs.store(probe_needs, Ordering::Relaxed);
        self.failing.store(true, Ordering::Release);
    }

    /// The room a probe must find on the disk, while the last commit has failed for want of it.
    fn probe_needs(&self) -> Option<u64> {
        let needs = self.probe_needs.load(Ordering::Relaxed);
        (self.current().is_some() && needs > 0).then_some(needs)
    }

    fn succeeded(&self) {
        // Read first: a healthy writer only ever reads the flag.
        if self.failing.load(Ordering::Relaxed) {
            self.failing.store(false, Ordering::Release);
        }
    }

    /// The last commit's error, if it failed.
    pub fn current(&self) -> Option<String> {
        self.failing
            .load(Ordering::Acquire)
            .then(|| self.message.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// A caller waiting for the batch to commit, and what it will be told.
struct Pending {
    reply: oneshot::Sender<Result<Reply>>,
    answer: Result<Reply>,
}

/// The batch being gathered: what its commands decided, and who waits for it.
struct Batch {
    /// The timestamp every event of the batch carries.
    now_ms: u64,
    /// The seq of the node's shutdown request, set by one earlier in the batch too: later
    /// commands are refused. The shared flag is raised only once the request is durable.
    shutdown_seq: Option<u64>,
    events: log::Batch<Event>,
    /// Modules not yet in the blob store, each once.
    blobs: Vec<Blob>,
    /// Modules that deploys of the batch moved services off; those that no service runs once
    /// the batch is decided leave the blob store with it.
    replaced: Vec<[u8; 32]>,
    /// Every command taken, with what it will be told, whether or not it appends anything.
    pending: Vec<Pending>,
    /// Whether a caller's reply waits for the batch: it holds more than the runtime's observations.
    awaited: bool,
    close: Option<oneshot::Sender<()>>,
    /// Whether the batch commits even with nothing to write ([`Request::ProbeWrites`]).
    probe: bool,
}

impl Writer {
    pub(super) fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let mut last_batch = 0;
        while let Some(first) = requests.blocking_recv() {
            let mut batch = Batch {
                now_ms: (self.clock)().max(self.working.last_timestamp_ms()),
                shutdown_seq: self.shutdown_seq,
                events: log::Batch::with_capacity(last_batch.max(1)),
                blobs: Vec::new(),
                replaced: Vec::new(),
                pending: Vec::with_capacity(last_batch.max(1)),
                awaited: false,
                close: None,
                probe: false,
            };
            self.take(first, &mut batch);
            self.gather(&mut requests, &mut batch, last_batch);
            last_batch = batch.pending.len();
            let close = batch.close.take();
            self.commit(batch);
            if let Some(done) = close {
                let _ = done.send(());
                return;
            }
        }
    }

    /// Takes queued requests into `batch`, deciding each as it comes, so deciding overlaps
    /// with the callers' sending; lingers briefly while [`worth_lingering`] says so.
    fn gather(&mut self, requests: &mut mpsc::Receiver<Request>, batch: &mut Batch, last_batch: usize) {
        let max = self.options.max_batch;
        let linger_until = Instant::now() + LINGER;
        while batch.pending.len() < max && batch.close.is_none() {
            match requests.try_recv() {
                Ok(request) => self.take(request, batch),
                Err(mpsc::error::TryRecvError::Empty)
                    if worth_lingering(batch, last_batch, max) && Instant::now() < linger_until =>
                {
                    std::thread::sleep(LINGER_STEP);
                }
                Err(_) => return,
            }
        }
    }

    /// Decides one request against the working state, which holds the batch's earlier events.
    fn take(&mut self, request: Request, batch: &mut Batch) {
        let (command, reply) = match request {
            Request::Command { command, reply } => (command, reply),
            Request::Close { done } => {
                batch.close = Some(done);
                return;
            }
            Request::ProbeWrites => {
                batch.probe = true;
                return;
            }
        };
        batch.awaited |= !matches!(command, Command::Observe(_));
        let keyed = KeyedRequest::of(&command);
        if let Some(request) = &keyed
            && let Some(answer) = self.noop_keys.answer(request, batch.now_ms)
        {
            batch.pending.push(Pending { reply, answer });
            return;
        }
        let limits = match &command {
            Command::Deploy(cmd) => self.limits.for_tenant(&cmd.tenant),
            _ => &self.limits.node,
        };
        let cx = Context {
            now_ms: batch.now_ms,
            shutdown_seq: batch.shutdown_seq,
            limits,
            node_services: self.limits.node_services,
        };
        match decide(&self.working, command, cx) {
            // Every answer waits for the batch: an answer may rest on its events, and a caller
            // answered early could send again into this batch, whose time is already set.
            Err(e) => batch.pending.push(Pending { reply, answer: Err(e) }),
            Ok(Decision::Answer(answer)) => {
                if let Some(request) = keyed {
                    self.noop_keys.remember(request, &answer, batch.now_ms);
                }
                batch.pending.push(Pending {
                    reply,
                    answer: Ok(answer),
                });
            }
            Ok(Decision::Append { event, blob }) => {
                let answer = self.append(event, blob, batch).map(|event| {
                    self.collect_stopped(&event, batch);
                    Reply::Appended(event)
                });
                batch.pending.push(Pending { reply, answer });
            }
        }
    }

    /// Adds a decided event to the batch: numbers it, applies it to the working state, and
    /// notes the module it brings and the one it lets go of.
    fn append(&mut self, mut event: Event, blob: Option<Blob>, batch: &mut Batch) -> Result<Arc<Event>> {
        event.seq = self.working.applied_seq() + 1;
        event.timestamp_ms = batch.now_ms;
        // The module the event lets go of: an upgrade's old one, a kill's (a killed service
        // needs none). It leaves the blob store if nothing else runs it.
        let replaced = match &event.kind {
            Some(Kind::ServiceDeployed(deployed)) => self
                .working
                .service(&event.tenant, &event.service_id)
                .filter(|s| s.module_sha256 != deployed.module_sha256)
                .map(|s| s.module_hash),
            Some(Kind::ServiceKillRequested(_)) => self
                .working
                .service(&event.tenant, &event.service_id)
                .map(|s| s.module_hash),
            _ => None,
        };
        if let Err(e) = self.working.apply(&event) {
            // decide() checked this; a failure here is a bug, reported, not appended.
            tracing::error!(error = %e, "a decided event does not apply");
            return Err(Error::Stale(e));
        }
        if let Some(Kind::ShutdownRequested(_)) = event.kind {
            batch.shutdown_seq = Some(event.seq);
        }
        batch.replaced.extend(replaced);
        // A module already in the blob store (or in this batch) is not written again.
        if let Some(module) = blob
            && !self.stored_blobs.contains(&module.sha256)
            && !batch.blobs.iter().any(|m| m.sha256 == module.sha256)
        {
            batch.blobs.push(module);
        }
        let event = Arc::new(event);
        batch.events.push(Arc::clone(&event));
        Ok(event)
    }

    /// Keeps tenants within their `max_stopped_services`: once a service has stopped (or, as
    /// the node starts, for every tenant, whose limit may have been lowered), the node removes
    /// the services stopped longest ago, in the same batch.
    fn collect_stopped(&mut self, after: &Event, batch: &mut Batch) {
        let tenants: Vec<String> = match &after.kind {
            // A version an upgrade replaced leaves its service as it was.
            Some(Kind::ServiceStopped(e)) if e.reason() != StopReason::Replaced => vec![after.tenant.clone()],
            Some(Kind::NodeStarted(_)) => self.working.tenants().map(|(name, _)| name.to_string()).collect(),
            _ => return,
        };
        for tenant in tenants {
            let keep = self.limits.for_tenant(&tenant).max_stopped_services;
            for removal in collect_stopped(&self.working, &tenant, keep) {
                if self.append(removal, None, batch).is_err() {
                    break;
                }
            }
        }
    }

    /// Appends the batch and answers its callers. A shutdown request in it is announced to
    /// everyone once it is durable.
    fn commit(&mut self, batch: Batch) {
        let Batch {
            now_ms,
            shutdown_seq,
            events,
            blobs,
            mut replaced,
            pending,
            probe,
            ..
        } = batch;
        // A keyed request that changed nothing is answered once its key is durable, so that
        // its retry gets the same answer after a restart too.
        let requests = self.noop_keys.unstored_changes();
        let request_changes = RequestChanges {
            put: &requests.put,
            delete: &requests.delete,
        };
        if events.is_empty() {
            if !request_changes.is_empty() {
                if let Err(e) = self.log.append(&events, BlobChanges::default(), request_changes) {
                    self.fail(pending, e, 0, 0);
                    return;
                }
                self.commit_failure.succeeded();
                self.noop_keys.stored();
            } else if let Some(needed) = self.commit_failure.probe_needs().filter(|_| probe) {
                match self.log.store().probe_writes(now_ms, needed) {
                    Ok(()) => {
                        tracing::info!("the log takes writes again");
                        self.commit_failure.succeeded();
                    }
                    Err(e) => tracing::debug!(error = %e, "the log still takes no writes"),
                }
            }
            answer(pending);
            return;
        }
        let batch_bytes = (events.frames_len() + blobs.iter().map(|m| m.bytes.len()).sum::<usize>()) as u64;
        let blob_refs: Vec<BlobRef<'_>> = blobs
            .iter()
            .map(|m| BlobRef {
                sha256: &m.sha256,
                bytes: &m.bytes,
            })
            .collect();
        // Garbage collection of modules, in the commit that made them garbage: stored modules
        // stay bounded by what services run, however often a tenant deploys new ones.
        replaced.sort_unstable();
        replaced.dedup();
        replaced.retain(|module| self.working.module_users(module) == 0);
        let changes = BlobChanges {
            put: &blob_refs,
            delete: &replaced,
        };
        // The helper applies the batch to its copy while the commit waits for the disk.
        let shared: Events = events.records().into();
        self.spare.lend(Arc::clone(&shared), std::mem::take(&mut self.evicted));
        let started = Instant::now();
        if let Err(e) = self.log.append(&events, changes, request_changes) {
            self.fail(pending, e, events.len(), batch_bytes);
            let committed = self
                .published
                .read()
                .unwrap_or_else(|poison| poison.into_inner())
                .clone();
            self.evicted = self.spare.reset(committed.clone());
            self.working = committed;
            return;
        }
        let elapsed = started.elapsed();
        self.commit_failure.succeeded();
        self.noop_keys.stored();
        let events = events.records();
        // Before anyone can see the batch: whoever sees an event finds it counted.
        if let Some(hook) = &self.on_commit {
            hook(events, elapsed);
        }
        if self.stored_blobs.len() + blobs.len() > STORED_BLOBS_REMEMBERED {
            self.stored_blobs.clear();
        }
        self.stored_blobs.extend(blobs.iter().map(|m| m.sha256));
        for module in &replaced {
            self.stored_blobs.remove(module);
        }
        // The working copy holds the batch: it becomes the published state in one swap, so
        // readers wait only for the swap.
        {
            let mut published = self.published.write().unwrap_or_else(|poison| poison.into_inner());
            std::mem::swap(&mut *published, &mut self.working);
        }
        if shutdown_seq.is_some() && self.shutdown_seq.is_none() {
            self.shutdown_seq = shutdown_seq;
            self.shutting_down.store(true, Ordering::Release);
        }
        // Tailers hear of the batch only now, so whoever sees an event finds it in the state.
        self.log.publish(events, &mut self.evicted);
        answer(pending);
        if let Some(snapshots) = &self.snapshots {
            // The snapshotter is gone only when the node is closing.
            let _ = snapshots.send(Arc::clone(&shared));
        }
        // The copy swapped out missed the batch; the helper's copy holds it.
        self.evicted = self.spare.exchange(&mut self.working, shared);
    }

    /// Answers the callers of a batch of about `bytes` whose commit failed, and records the
    /// failure.
    fn fail(&mut self, pending: Vec<Pending>, error: crate::log::Error, events: usize, bytes: u64) {
        tracing::error!(error = %error, events, "commit failed; the batch was not written");
        // The no-op answers of the batch were never given: their retries are decided afresh.
        self.noop_keys.forget_unstored_answers();
        let probe_needs = match error {
            crate::log::Error::DiskFull { .. } => bytes.saturating_mul(2).saturating_add(PROBE_MARGIN),
            _ => 0,
        };
        let error = Error::from(error);
        self.commit_failure.failed(&error, probe_needs);
        for p in pending {
            // A refusal stands; whatever rested on the batch failed with it.
            let _ = p.reply.send(p.answer.and(Err(error.clone())));
        }
    }
}

/// Whether a batch whose queue ran dry should wait a moment for more: when no caller's reply
/// waits for it (the next command can share its commit), or when the queue is still short of
/// what the previous batch held (the callers just answered are about to send again).
fn worth_lingering(batch: &Batch, last_batch: usize, max_batch: usize) -> bool {
    let refilling = last_batch >= BUSY_BATCH && batch.pending.len() < last_batch.min(max_batch) * 9 / 10;
    !batch.awaited || refilling
}

fn answer(pending: Vec<Pending>) {
    for p in pending {
        let _ = p.reply.send(p.answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(callers: usize, awaited: bool) -> Batch {
        Batch {
            now_ms: 0,
            shutdown_seq: None,
            events: log::Batch::with_capacity(1),
            blobs: Vec::new(),
            replaced: Vec::new(),
            pending: (0..callers)
                .map(|_| Pending {
                    reply: oneshot::channel().0,
                    answer: Err(Error::Closed),
                })
                .collect(),
            awaited,
            close: None,
            probe: false,
        }
    }

    #[test]
    fn a_batch_of_observations_alone_waits_for_a_command_to_share_its_commit() {
        assert!(worth_lingering(&batch(1, false), 0, 1024));
        assert!(worth_lingering(&batch(3, false), 1, 1024));
    }

    #[test]
    fn a_batch_a_client_waits_for_lingers_only_while_the_callers_just_answered_come_back() {
        // Quiet: the one caller is answered at once.
        assert!(!worth_lingering(&batch(1, true), 0, 1024));
        assert!(!worth_lingering(&batch(1, true), BUSY_BATCH - 1, 1024));
        // Busy: it waits until the batch holds nine tenths of the last one (of at most max).
        assert!(worth_lingering(&batch(1, true), 100, 1024));
        assert!(worth_lingering(&batch(89, true), 100, 1024));
        assert!(!worth_lingering(&batch(90, true), 100, 1024));
        assert!(!worth_lingering(&batch(45, true), 100, 50));
    }
}
