//! Following the log for a caller: the stream behind gRPC Watch and SSE `/events`.
//!
//! It is a tail of the log itself (no second event bus), filtered to what the caller may see
//! and asked for, with a progress note whenever nothing was sent for a while, so a filtered
//! watcher still learns how far the log has moved. It ends when the node shuts down.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use prost::Message as _;
use tokio::time::Instant;

use super::{ApiState, Caller, Error, ErrorKind};
use crate::event::{EventKind, SharedEvent};
use crate::proto::Event;

/// How long a stopping watch spends on the events committed before the stop, in all.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// How far behind the head a watcher may be, when the node stops, and still be sent the rest
/// (`shutdown_requested` among it) before its stream ends. One further behind is replaying
/// history: it ends at once, as etcd cancels its watches, and resumes from its last seq with
/// the next start, rather than holding the shutdown for as long as its backlog takes.
const DRAIN_MAX_EVENTS: u64 = 4096;

/// What an event replayed costs of its caller's history rate besides its bytes, as a log line
/// does: many small events are work too.
const EVENT_COST: u64 = 64;

/// Events a watch examines, while events are ready one after another, between looks at the
/// node's stop and at the clock: each look costs more than examining an event that is
/// filtered out, and 64 events pass in microseconds.
const EVENTS_BETWEEN_LOOKS: u32 = 64;

/// The shortest progress interval a client may ask for.
pub const MIN_PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Default)]
pub struct WatchFilter {
    pub service_id: Option<String>,
    /// `None`: every kind.
    pub kinds: Option<HashSet<EventKind>>,
}

impl WatchFilter {
    /// Parses kind names (snake_case); empty names are ignored.
    pub fn new<'a>(service_id: Option<String>, kinds: impl IntoIterator<Item = &'a str>) -> Result<WatchFilter, Error> {
        let kinds: HashSet<EventKind> = kinds
            .into_iter()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| k.parse::<EventKind>().map_err(Error::invalid))
            .collect::<Result<_, _>>()?;
        let service_id = service_id.filter(|s| !s.is_empty());
        if let Some(id) = &service_id {
            crate::control::validate_service_id(id).map_err(|e| Error::invalid(e.to_string()))?;
        }
        Ok(WatchFilter {
            service_id,
            kinds: (!kinds.is_empty()).then_some(kinds),
        })
    }

    fn matches(&self, event: &Event) -> bool {
        self.service_id.as_ref().is_none_or(|id| *id == event.service_id)
            && self
                .kinds
                .as_ref()
                .is_none_or(|kinds| EventKind::of_event(event).is_some_and(|k| kinds.contains(&k)))
    }
}

#[derive(Debug, Clone)]
pub enum WatchItem {
    Event(SharedEvent),
    /// Every event up to this seq was sent or filtered out.
    Progress(u64),
}

/// Events from `from_seq` (inclusive; 0: only what comes next) that `caller` may see and
/// `filter` selects, in seq order, each once. Ends with [`ErrorKind::ShuttingDown`] on shutdown.
///
/// A watch that starts at the head opens with a progress note naming it (as etcd's "created"
/// response carries the revision), so a client that follows "from now" can resume exactly
/// even if it is cut off before any event arrives.
///
/// A start past the next seq is refused, as Kubernetes refuses a resource version it has not
/// reached: every seq this node acknowledged is at most its head, so such a resume point comes
/// from another node or from before this node's data was restored, and waiting for it would
/// silently skip the events in between.
///
/// What it replays of the history (the events up to the head as it starts) goes out at the
/// caller's `max_history_read_bytes_per_second` ([`super::pace`]), in the bytes the log stores;
/// what it follows live is not paced.
pub fn watch(
    state: &ApiState,
    caller: Caller,
    filter: WatchFilter,
    from_seq: u64,
    progress_interval: Duration,
) -> Result<impl Stream<Item = Result<WatchItem, Error>> + Send + 'static, Error> {
    let control = &state.control;
    let shutdown = state.stopping.clone();
    let pace = Arc::clone(&state.history_pace);
    // The writer publishes the state a moment before tailers see its batch, so a List may
    // name a seq just past the log's head; that seq was committed too.
    let head = control.head().max(control.applied_seq());
    let start = if from_seq == 0 { head + 1 } else { from_seq };
    if start > head + 1 {
        return Err(Error::invalid(format!(
            "cannot start at seq {start}: this node's log ends at seq {head}, so that seq was never \
             acknowledged here (was it from another node, or from before a restore?); start at \
             {} or earlier",
            head + 1
        )));
    }
    let log = control.log().clone();
    let mut events = Box::pin(log.tail(start));
    let interval = progress_interval.max(MIN_PROGRESS_INTERVAL);
    Ok(async_stream::stream! {
        let mut examined = start - 1;
        // Both futures live across turns: re-arming a timer and a cancellation waiter for
        // every event would cost more than delivering it. The deadline moves lazily: the timer
        // fires at the old one and is re-armed for `quiet_until` if something was sent since.
        let mut quiet_until = Instant::now() + interval;
        let progress_timer = tokio::time::sleep_until(quiet_until);
        // A token of its own: the node's would be one lock that every watcher going idle
        // takes in turn.
        let stopping = shutdown.child_token().cancelled_owned();
        tokio::pin!(progress_timer, stopping);
        // Events examined since the last look at the stop and the clock, which are polled only
        // when no event is ready, and looked at every few events while one is.
        let mut unlooked = 0;
        if start == head + 1 {
            yield Ok(WatchItem::Progress(head));
        }
        'follow: loop {
            tokio::select! {
                biased;
                next = events.next() => match next {
                    Some(Ok(event)) => {
                        examined = event.seq;
                        if caller.sees(&event) && filter.matches(&event) {
                            // A replay cut short by the shutdown ends at once, as one far behind
                            // the head does: it resumes with the next start.
                            if event.seq <= head
                                && !pace.wait(&caller.principal, event.encoded_len() as u64 + EVENT_COST, &shutdown).await
                            {
                                yield Err(Error::shutting_down());
                                return;
                            }
                            quiet_until = Instant::now() + interval;
                            yield Ok(WatchItem::Event(event));
                        }
                        unlooked += 1;
                        if unlooked == EVENTS_BETWEEN_LOOKS {
                            unlooked = 0;
                            if shutdown.is_cancelled() {
                                break 'follow;
                            }
                            // A burst of events this watcher does not want still counts as quiet.
                            let now = Instant::now();
                            if now >= quiet_until {
                                quiet_until = now + interval;
                                yield Ok(WatchItem::Progress(examined));
                            }
                        }
                    }
                    Some(Err(e)) => {
                        yield Err(Error::new(ErrorKind::Internal, format!("cannot read the log: {e}")));
                        return;
                    }
                    None => {
                        yield Err(Error::shutting_down());
                        return;
                    }
                },
                () = &mut stopping => break 'follow,
                () = &mut progress_timer => {
                    let now = Instant::now();
                    if now >= quiet_until {
                        quiet_until = now + interval;
                        yield Ok(WatchItem::Progress(examined));
                    }
                    progress_timer.as_mut().reset(quiet_until);
                }
            }
        }
        // The node is stopping. What was committed before the stop (shutdown_requested among
        // it) is still delivered to a watcher that had nearly caught up; then the stream ends.
        let head = log.head();
        let drain_until = Instant::now() + DRAIN_TIMEOUT;
        let drains = head.saturating_sub(examined) <= DRAIN_MAX_EVENTS;
        // The deadline is checked between events too: `timeout_at` takes an event that is ready
        // even past it, and a slow reader makes every event ready.
        while drains && examined < head && Instant::now() < drain_until {
            match tokio::time::timeout_at(drain_until, events.next()).await {
                Ok(Some(Ok(event))) => {
                    examined = event.seq;
                    if caller.sees(&event) && filter.matches(&event) {
                        yield Ok(WatchItem::Event(event));
                    }
                }
                _ => break,
            }
        }
        yield Err(Error::shutting_down());
    })
}
