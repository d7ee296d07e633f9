//! A service instance as an actor: one task owns the instance's `Store` and serves calls from a
//! bounded mailbox, one at a time. It supervises itself like an OTP worker: a fatal failure
//! fails that call, and a fresh instance replaces the old one under the restart policy (at most
//! `max_restarts` within `restart_window_ms`); past it the service stays down. Every such
//! transition is reported to the control layer as an observation; the actor never changes
//! state itself.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::error::{CallFailure, StartFailure};
use super::instance::{Instance, InstanceConfig};
use super::module::Prepared;
use super::recorder::Recorder;
use super::stats::LiveStats;
use crate::control::{Observation, StopReport};
use crate::proto::{CrashReason, StopOutcome};

/// One request waiting in a mailbox.
pub(super) struct Call {
    pub payload: Vec<u8>,
    /// When the caller stops waiting. A call not begun by then is skipped; one under way runs
    /// on to the service's own limits, as interrupting it would cost the instance.
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<Vec<u8>, CallFailure>>,
}

/// How callers reach the current instance of a service.
#[derive(Clone, Debug)]
pub(super) struct Handle {
    pub version: u64,
    pub mailbox: mpsc::Sender<Call>,
    pub capacity: u32,
}

/// Where a service's calls go, as its slot and its actor see it.
#[derive(Clone, Debug)]
pub(super) enum Route {
    /// An instance is on its way: calls wait for it.
    Pending,
    /// Calls go to this instance.
    Up(Handle),
    /// Nothing will serve until the next deploy: calls fail at once. This holds even when the
    /// log could not record why (a full disk), and the state still says the service runs.
    Down,
}

impl Route {
    pub fn is_up(&self) -> bool {
        matches!(self, Route::Up(_))
    }
}

pub(super) type Ready = Arc<watch::Sender<Route>>;

/// A request to stop: finish queued calls and run `solo_stop` within `grace`, then say how it
/// went.
#[derive(Debug)]
pub(super) struct StopRequest {
    pub grace: Duration,
    pub report: oneshot::Sender<StopReport>,
}

/// What a stop whose grace ran out says. Not the grace itself: a shutdown's services get what
/// is left of the node's (the kill or shutdown on record says what was asked).
fn grace_ran_out(cut_off: usize) -> String {
    format!(
        "the grace ran out with {} it had accepted unanswered; solo_stop did not run",
        calls(cut_off)
    )
}

/// `n` calls, in words.
fn calls(n: usize) -> String {
    if n == 1 {
        "1 call".to_string()
    } else {
        format!("{n} calls")
    }
}

fn stop_report(outcome: StopOutcome, calls_cut_off: usize, message: String) -> StopReport {
    StopReport {
        outcome,
        calls_cut_off: u32::try_from(calls_cut_off).unwrap_or(u32::MAX),
        message,
    }
}

pub(super) struct Actor {
    pub tenant: String,
    pub service_id: String,
    pub prepared: Prepared,
    pub config: InstanceConfig,
    pub stats: Arc<LiveStats>,
    pub recorder: Arc<Recorder>,
    pub ready: Ready,
    /// Its slot's starts to come: calls wait for them when this instance goes down.
    pub starts: Arc<std::sync::atomic::AtomicUsize>,
    /// Restarts of this version so far (carried over from the state after a node restart).
    pub restarts: PastRestarts,
    /// Becomes true once the start of this version is on record (or refused). The instance
    /// takes calls before that, but what it observes waits for it: a call that traps at once
    /// must not have its crash reach the log before the start it follows.
    pub start_recorded: watch::Receiver<bool>,
    /// Counts it among its log's writers for as long as it may run an instance: a follower
    /// of the log ends once no actor or start is left.
    pub _log_writer: super::logs::LogWriter,
}

/// What a version's restart policy has used so far, as the state recorded it.
#[derive(Debug, Clone, Default)]
pub(super) struct PastRestarts {
    pub count: u32,
    /// When the latest restarts were recorded (wall clock, oldest first).
    pub times_ms: Vec<u64>,
}

impl PastRestarts {
    /// The recorded restarts as instants of this process's clock, oldest first: the start of
    /// the policy's window, which a node restart must not reset.
    fn as_instants(&self) -> VecDeque<Instant> {
        let now = Instant::now();
        let now_ms = crate::control::system_clock()();
        self.times_ms
            .iter()
            .filter_map(|&at| now.checked_sub(Duration::from_millis(now_ms.saturating_sub(at))))
            .collect()
    }
}

/// How a start ended.
pub(super) enum Spawned {
    Up(RunningActor),
    Failed(StartFailure),
    /// Given up before the instance was up (a forced kill, the node stopping): the instance,
    /// `solo_init` under way included, is dropped.
    GivenUp,
}

/// A started actor, as its slot holds it.
pub(super) struct RunningActor {
    pub version: u64,
    pub handle: Handle,
    pub task: tokio::task::JoinHandle<()>,
    pub stop: mpsc::Sender<StopRequest>,
    /// The longest one of its calls may take: the time it is given to finish its queue and stop
    /// once an upgrade has replaced it.
    pub call_timeout: Duration,
    /// Whether the actor is running a call: one that a stop at once cuts off.
    serving: Arc<AtomicBool>,
}

impl RunningActor {
    /// Stops the actor: at once with `force`, else gracefully within `grace` (then at once),
    /// or at once when `cut_short` resolves meanwhile (a forced kill). Says how the stop went.
    pub async fn stop(mut self, force: bool, grace: Duration, cut_short: impl Future<Output = ()>) -> StopReport {
        if self.task.is_finished() {
            return stop_report(StopOutcome::NotRunning, 0, String::new());
        }
        let (report, reported) = oneshot::channel();
        let mut outcome = StopOutcome::Forced;
        if !force && self.stop.send(StopRequest { grace, report }).await.is_ok() {
            // A little slack over the grace: the actor enforces it itself, once the call it
            // runs lets it see the request.
            tokio::select! {
                finished = tokio::time::timeout(grace + Duration::from_millis(100), &mut self.task) => match finished {
                    // No report: the instance went down by itself meanwhile (its restart
                    // policy gave up).
                    Ok(_) => {
                        return reported
                            .await
                            .unwrap_or_else(|_| stop_report(StopOutcome::NotRunning, 0, String::new()));
                    }
                    Err(_) => outcome = StopOutcome::GraceExpired,
                },
                () = cut_short => {}
            }
        }
        let cut_off = self.accepted_calls();
        self.task.abort();
        let _ = self.task.await;
        let message = match (outcome, cut_off) {
            (_, 0) => String::new(),
            (StopOutcome::GraceExpired, n) => grace_ran_out(n),
            (_, n) => format!("stopped at once, cutting off {} it had accepted", calls(n)),
        };
        stop_report(outcome, cut_off, message)
    }

    /// Calls the actor has accepted and not answered: those in its mailbox, and the one it runs.
    fn accepted_calls(&self) -> usize {
        let mailbox = &self.handle.mailbox;
        mailbox.max_capacity() - mailbox.capacity() + usize::from(self.serving.load(Ordering::Relaxed))
    }
}

/// Resolves once `forced` reaches `version`; never if its sender is gone.
pub(super) async fn forced_at_least(forced: &mut watch::Receiver<u64>, version: u64) {
    if forced.wait_for(|v| *v >= version).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Actor {
    /// Starts an instance on `guests`, and the actor task once it is up, unless `give_up`
    /// resolves first.
    pub async fn spawn(self, guests: &tokio::runtime::Handle, give_up: impl Future<Output = ()>) -> Spawned {
        let capacity = self.config.limits.mailbox_capacity.max(1);
        let (mailbox, calls) = mpsc::channel(capacity as usize);
        let (stop, stops) = mpsc::channel(1);
        let (started, outcome) = oneshot::channel();
        let version = self.config.version;
        let call_timeout = self.config.call_timeout();
        let serving = Arc::new(AtomicBool::new(false));
        let actor_serving = Arc::clone(&serving);
        let task = guests.spawn(async move {
            match Instance::start(&self.prepared, self.config.clone()).await {
                Ok(instance) => {
                    self.stats.instance_started(instance.memory_bytes());
                    if started.send(Ok(())).is_ok() {
                        self.run(instance, calls, stops, &actor_serving).await;
                    }
                }
                Err(failure) => {
                    let _ = started.send(Err(failure));
                }
            }
        });
        let outcome = tokio::select! {
            outcome = outcome => outcome,
            () = give_up => {
                // Wasm yields at every epoch tick, so the abort ends even a looping solo_init.
                task.abort();
                let _ = task.await;
                return Spawned::GivenUp;
            }
        };
        match outcome {
            Ok(Ok(())) => Spawned::Up(RunningActor {
                version,
                handle: Handle {
                    version,
                    mailbox,
                    capacity,
                },
                task,
                stop,
                call_timeout,
                serving,
            }),
            Ok(Err(failure)) => Spawned::Failed(failure),
            Err(_) => Spawned::Failed(StartFailure::new(CrashReason::LoadFailure, "the instance task ended")),
        }
    }

    async fn run(
        mut self,
        mut instance: Instance,
        mut calls: mpsc::Receiver<Call>,
        mut stops: mpsc::Receiver<StopRequest>,
        serving: &AtomicBool,
    ) {
        let mut restart_times = self.restarts.as_instants();
        loop {
            tokio::select! {
                biased;
                Some(stop) = stops.recv() => {
                    calls.close();
                    let deadline = Instant::now() + stop.grace;
                    let drained = tokio::time::timeout_at(deadline.into(), async {
                        while let Some(call) = calls.recv().await {
                            if let Some(fatal) = self.serve(&mut instance, call, serving).await {
                                return Err(fatal); // a fatal failure while stopping: no restart
                            }
                        }
                        Ok(instance)
                    })
                    .await;
                    let report = match drained {
                        Ok(Ok(instance)) => match instance.stop(deadline.saturating_duration_since(Instant::now())).await {
                            Ok(()) => stop_report(StopOutcome::Clean, 0, String::new()),
                            Err(failure) if Instant::now() >= deadline => stop_report(
                                StopOutcome::GraceExpired,
                                0,
                                format!("the grace ran out in solo_stop ({failure})"),
                            ),
                            Err(failure) => {
                                stop_report(StopOutcome::Failed, 0, format!("solo_stop did not finish: {failure}"))
                            }
                        },
                        // The calls still queued are dropped with the mailbox: answered "stopped".
                        Ok(Err(fatal)) => stop_report(
                            StopOutcome::Failed,
                            calls.len(),
                            format!("a call it was finishing failed ({fatal}); solo_stop did not run"),
                        ),
                        Err(_) => {
                            let cut_off = calls.len() + usize::from(serving.load(Ordering::Relaxed));
                            stop_report(StopOutcome::GraceExpired, cut_off, grace_ran_out(cut_off))
                        }
                    };
                    let _ = stop.report.send(report);
                    return;
                }
                call = calls.recv() => {
                    let Some(call) = call else {
                        // Every sender is gone (its slot's task ended): the queued calls are done.
                        // Nobody is left to record how it went; a failure is in the node's log.
                        let _ = instance.stop(self.config.call_timeout()).await;
                        return;
                    };
                    if let Some(failure) = self.serve(&mut instance, call, serving).await {
                        // The fresh instance's start may wait for a turn: this one's is free.
                        instance.idle();
                        match self.restart(failure, &mut restart_times).await {
                            Some(fresh) => instance = fresh,
                            None => return,
                        }
                    }
                    if calls.is_empty() {
                        // Nothing more to serve: the turn on the guest threads goes to others.
                        instance.idle();
                    }
                }
            }
        }
    }

    /// Serves one call; returns the failure if the instance must be replaced.
    async fn serve(&self, instance: &mut Instance, call: Call, serving: &AtomicBool) -> Option<CallFailure> {
        // On a busy node the turn may take a while: the caller is asked after it.
        instance.take_turn().await;
        if Instant::now() >= call.deadline || call.reply.is_closed() {
            // The caller has given up already; running it would only waste the budget.
            let _ = call.reply.send(Err(CallFailure::Timeout));
            return None;
        }
        let started = Instant::now();
        let guest_time = instance.guest_time();
        // The service's own wall-clock limit, not the caller's: a guest stopped mid-call loses
        // its instance, and one caller's short deadline must not crash the service for all.
        let limit = self.config.call_timeout();
        serving.store(true, Ordering::Relaxed);
        let result = instance.call(&call.payload, started + limit).await;
        serving.store(false, Ordering::Relaxed);
        // The time the guest had the threads, not the time it waited for them.
        let took = instance.guest_time().saturating_sub(guest_time);
        self.stats.call_finished(took, result.is_ok(), instance.memory_bytes());
        let fatal = match &result {
            Err(failure) if failure.is_fatal() => Some(failure.clone()),
            _ => None,
        };
        let _ = call.reply.send(result);
        fatal
    }

    /// Replaces a failed instance, if the restart policy allows; `None` when the service stays down.
    async fn restart(&mut self, failure: CallFailure, restart_times: &mut VecDeque<Instant>) -> Option<Instance> {
        let (reason, trap_code, message) = match failure {
            CallFailure::Trap {
                reason,
                trap_code,
                message,
            } => (reason, trap_code, message),
            CallFailure::Timeout => (
                CrashReason::CpuLimit,
                "call_timeout".to_string(),
                format!("{failure} of {} ms", self.config.limits.call_timeout_ms),
            ),
            CallFailure::Service(_) | CallFailure::ResponseTooLarge { .. } => return None,
        };
        self.stats.set_last_error(format!("{trap_code}: {message}"));
        let window = Duration::from_millis(self.config.limits.restart_window_ms.into());
        let now = Instant::now();
        while restart_times
            .front()
            .is_some_and(|t: &Instant| now.duration_since(*t) >= window)
        {
            restart_times.pop_front();
        }
        let restarting = restart_times.len() < self.config.limits.max_restarts as usize;
        if !restarting {
            // Calls fail at once from here on, before the crash is on record.
            self.withdraw();
            // Each crash is its tenant's business (its events say it); the policy giving up, at
            // most once a deploy, is worth the operator's log too.
            tracing::info!(
                tenant = %self.tenant,
                service = %self.service_id,
                version = self.config.version,
                %trap_code,
                restarts = self.restarts.count,
                "the service crashed and its restart policy gave up: it stays down until redeployed"
            );
        } else {
            tracing::debug!(tenant = %self.tenant, service = %self.service_id, version = self.config.version, %trap_code, "the service crashed; restarting it");
        }
        self.observe(Observation::Crashed {
            tenant: self.tenant.clone(),
            service_id: self.service_id.clone(),
            version: self.config.version,
            reason,
            trap_code,
            message,
            restarting,
        })
        .await;
        if !restarting {
            return None;
        }
        restart_times.push_back(now);
        match Instance::start(&self.prepared, self.config.clone()).await {
            Ok(instance) => {
                self.restarts.count += 1;
                self.stats.restarts.fetch_add(1, Ordering::Relaxed);
                self.stats.instance_started(instance.memory_bytes());
                self.observe(Observation::Restarted {
                    tenant: self.tenant.clone(),
                    service_id: self.service_id.clone(),
                    version: self.config.version,
                    restarts: self.restarts.count,
                })
                .await;
                Some(instance)
            }
            Err(failure) => {
                self.withdraw();
                tracing::info!(tenant = %self.tenant, service = %self.service_id, version = self.config.version, error = %failure, "the restarted instance did not start: the service stays down until redeployed");
                self.observe(Observation::Crashed {
                    tenant: self.tenant.clone(),
                    service_id: self.service_id.clone(),
                    version: self.config.version,
                    reason: failure.reason,
                    trap_code: String::new(),
                    message: failure.message,
                    restarting: false,
                })
                .await;
                None
            }
        }
    }

    /// Stops routing calls to this actor (if it is still the one calls go to); its live
    /// figures then describe no instance.
    fn withdraw(&self) {
        let version = self.config.version;
        let withdrawn = self.ready.send_if_modified(|route| match route {
            Route::Up(h) if h.version == version => {
                *route = super::route_without_instance(&self.starts);
                true
            }
            _ => false,
        });
        if withdrawn {
            self.stats.instance_stopped();
        }
    }

    async fn observe(&self, observation: Observation) {
        // A start that is never recorded (its sender gone) holds nothing back.
        let _ = self.start_recorded.clone().wait_for(|recorded| *recorded).await;
        self.recorder.record(observation).await;
    }
}
