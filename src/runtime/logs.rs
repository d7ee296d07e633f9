//! Each service's log lines: a bounded ring buffer (what the Logs APIs read) plus a broadcast
//! for followers, and a copy to tracing. A service logs at a bounded rate: every line is copied
//! to each follower on the threads that serve the APIs, so a guest logging without end would
//! otherwise take those threads from every tenant. Lines over the rate are dropped, as
//! journald's rate limit drops them, and the next line kept is preceded by one saying how many.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

/// Severity of a guest's log line (`solo.log`'s first argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    /// 0 trace, 1 debug, 2 info, 3 warn, 4 error; anything else counts as info.
    pub fn from_guest(level: i32) -> Level {
        match level {
            0 => Level::Trace,
            1 => Level::Debug,
            3 => Level::Warn,
            4 => Level::Error,
            _ => Level::Info,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Position in this service's log, from 1; survives restarts and upgrades of the service.
    pub seq: u64,
    pub timestamp_ms: u64,
    pub level: Level,
    /// The service version whose instance wrote the line.
    pub version: u64,
    pub message: String,
}

/// What one service may log: lines kept, bytes kept, and bytes per second.
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    pub lines: usize,
    /// Of the lines kept, each counted as a rate counts it ([`LogLine::cost`]): the bound on
    /// the memory a service's log holds, as lines up to 4 KiB would make `lines` alone 64
    /// times looser for a service writing long lines than for one writing short ones.
    pub bytes: u64,
    pub bytes_per_second: u64,
}

/// What a line costs of a rate besides its text: a flood of empty lines is a flood too.
const LINE_COST: u64 = 64;

impl LogLine {
    /// What this line costs of a rate, to write or to read: its text and [`LINE_COST`].
    pub fn cost(&self) -> u64 {
        cost_of(&self.message)
    }
}

fn cost_of(message: &str) -> u64 {
    message.len() as u64 + LINE_COST
}

impl LogLimits {
    /// What the longest line costs of the rate: the least rate that lets every line through.
    pub const FULL_LINE_COST: u64 = super::instance::MAX_LOG_LINE as u64 + LINE_COST;
}

#[derive(Debug)]
pub struct LogBuffer {
    /// Tells this log from the service's earlier ones (before the node restarted, or before it
    /// was removed and deployed again), whose lines were numbered from 1 too.
    id: u64,
    pub(super) tenant: String,
    pub(super) service_id: String,
    capacity: usize,
    max_bytes: u64,
    bytes_per_second: u64,
    /// Why a std lock: pushes and copies are short and never cross an `.await`.
    lines: Mutex<Lines>,
    follow: broadcast::Sender<LogLine>,
    /// Cancelled when the service is removed: no line will come any more.
    ended: CancellationToken,
    /// What may still write lines: the service's starts queued or under way, and its actors
    /// that may still run an instance. None once it has stopped, crashed for good or failed,
    /// until it is deployed again.
    writers: watch::Sender<usize>,
}

/// A place among a log's writers, given back when dropped: an actor's, for as long as it may
/// run an instance, or a start's or a stop's, until what it came to is on record.
#[derive(Debug)]
pub(super) struct LogWriter(Arc<LogBuffer>);

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.0.writer_left();
    }
}

#[derive(Debug)]
struct Lines {
    ring: VecDeque<LogLine>,
    /// What the lines in the ring cost together.
    bytes: u64,
    next_seq: u64,
    /// Bytes the service may log now: a second's worth at most, refilled as time passes.
    allowance: u64,
    refilled_at: Instant,
    /// Lines dropped since the last one kept.
    dropped: u64,
}

/// A log id: a number drawn once per process, plus a count of the logs made since, so that
/// ids differ within a run for certain and across runs but for a 1 in 2^64 chance. Never 0,
/// which the API takes for no log named.
fn new_log_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static FIRST: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static MADE: AtomicU64 = AtomicU64::new(0);
    let first = *FIRST.get_or_init(|| {
        let mut bytes = [0u8; 8];
        // Without randomness, the clock: a restart comes at another nanosecond.
        getrandom::fill(&mut bytes).map_or_else(
            |_| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            },
            |()| u64::from_le_bytes(bytes),
        )
    });
    first.wrapping_add(MADE.fetch_add(1, Ordering::Relaxed)).max(1)
}

impl LogBuffer {
    pub fn new(tenant: &str, service_id: &str, limits: LogLimits) -> LogBuffer {
        let capacity = limits.lines.max(1);
        LogBuffer {
            id: new_log_id(),
            tenant: tenant.to_string(),
            service_id: service_id.to_string(),
            capacity,
            // Room for one line at least, however long.
            max_bytes: limits.bytes.max(LogLimits::FULL_LINE_COST),
            bytes_per_second: limits.bytes_per_second,
            lines: Mutex::new(Lines {
                ring: VecDeque::new(),
                bytes: 0,
                next_seq: 1,
                allowance: limits.bytes_per_second,
                refilled_at: Instant::now(),
                dropped: 0,
            }),
            follow: broadcast::channel(capacity.clamp(16, 4096)).0,
            ended: CancellationToken::new(),
            writers: watch::Sender::new(0),
        }
    }

    /// A start of the service was queued: it may write lines.
    pub(super) fn writer_came(&self) {
        self.writers.send_modify(|writers| *writers += 1);
    }

    /// A start ended, or a [`LogWriter`] was dropped.
    pub(super) fn writer_left(&self) {
        self.writers.send_modify(|writers| *writers = writers.saturating_sub(1));
    }

    /// Counts one more writer until the [`LogWriter`] is dropped.
    pub(super) fn writer(self: &Arc<Self>) -> LogWriter {
        self.writer_came();
        LogWriter(Arc::clone(self))
    }

    /// Resolves once nothing may write lines any more: the service has stopped, crashed for
    /// good or failed, with no start to come (at once if that is so now). Its last lines are
    /// in the ring and sent to the followers before.
    pub async fn quiet(&self) {
        let _ = self.writers.subscribe().wait_for(|writers| *writers == 0).await;
    }

    /// This log's id, which no other log of this node, before or after a restart, shares.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Tells followers that no line will come any more: the service was removed.
    pub fn end(&self) {
        self.ended.cancel();
    }

    /// Resolves once [`LogBuffer::end`] was called.
    pub fn ended(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.ended.cancelled()
    }

    pub fn push(&self, level: Level, version: u64, message: String) {
        // Tenants' lines reach the node's own log only at debug, whatever their level: a guest
        // that logs without end must not flood the operator's log, nor block every tenant's
        // calls on a slow stderr. Its own buffer (the Logs APIs) is where they belong. Only lines
        // within the rate go there too, written once the buffer's lock is let go.
        let traced = tracing::enabled!(target: "solo::guest", tracing::Level::DEBUG).then(|| message.clone());
        let timestamp_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = (now.duration_since(lines.refilled_at).as_micros() as u64).saturating_mul(self.bytes_per_second)
            / 1_000_000;
        if refill > 0 {
            lines.allowance = (lines.allowance + refill).min(self.bytes_per_second);
            lines.refilled_at = now;
        }
        let cost = cost_of(&message);
        if cost > lines.allowance {
            lines.dropped += 1;
            return;
        }
        lines.allowance -= cost;
        if lines.dropped > 0 {
            let dropped = std::mem::take(&mut lines.dropped);
            let note = format!(
                "solo: {dropped} line{} dropped: the service logged more than its {} bytes a second \
                 ([runtime] log_bytes_per_second)",
                if dropped == 1 { " was" } else { "s were" },
                self.bytes_per_second
            );
            self.keep(&mut lines, timestamp_ms, Level::Warn, version, note);
        }
        self.keep(&mut lines, timestamp_ms, level, version, message);
        drop(lines);
        if let Some(message) = traced {
            let (tenant, service, guest_level) = (&self.tenant, &self.service_id, level.as_str());
            tracing::debug!(target: "solo::guest", tenant, service, version, level = guest_level, "{message}");
        }
    }

    /// Adds a line to the ring, and sends it to the followers.
    fn keep(&self, lines: &mut Lines, timestamp_ms: u64, level: Level, version: u64, message: String) {
        let line = LogLine {
            seq: lines.next_seq,
            timestamp_ms,
            level,
            version,
            message,
        };
        lines.next_seq += 1;
        // The oldest lines make room: for one more line, and for its bytes.
        lines.bytes += line.cost();
        while lines.ring.len() >= self.capacity || lines.bytes > self.max_bytes {
            let Some(oldest) = lines.ring.pop_front() else { break };
            lines.bytes -= oldest.cost();
        }
        // Sent under the lock: a follower that subscribes after this finds the line in the
        // ring, as it reads the ring after subscribing, and followers get lines in seq order.
        // Most lines have no follower. One that left meanwhile is fine.
        if self.follow.receiver_count() > 0 {
            let _ = self.follow.send(line.clone());
        }
        lines.ring.push_back(line);
    }

    /// The seq the next line will have.
    pub fn next_seq(&self) -> u64 {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).next_seq
    }

    /// The buffered lines with a seq of at least `from`, oldest first.
    pub fn lines_from(&self, from: u64) -> Vec<LogLine> {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.ring.iter().filter(|l| l.seq >= from).cloned().collect()
    }

    /// New lines as they are written. Subscribe before reading the buffer, then skip lines
    /// already seen by seq, so nothing falls between the two.
    pub fn subscribe(&self) -> broadcast::Receiver<LogLine> {
        self.follow.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Room for `count` lines, and a rate no test reaches.
    fn lines(count: usize) -> LogLimits {
        LogLimits {
            lines: count,
            bytes: 1 << 30,
            bytes_per_second: 1 << 30,
        }
    }

    /// A service logging past its rate loses the lines over it; the next line kept is preceded
    /// by one that counts them, and the rate comes back with time.
    #[test]
    fn lines_over_the_rate_are_dropped_and_counted() {
        let buffer = LogBuffer::new(
            "acme",
            "svc",
            LogLimits {
                lines: 100,
                bytes: 1 << 20,
                bytes_per_second: 1000,
            },
        );
        let mut follow = buffer.subscribe();
        // 136 bytes of the rate each (the text and the cost of a line): 7 fit in a second's 1000.
        for i in 0..20 {
            buffer.push(Level::Info, 1, format!("line {i:>66}"));
        }
        let kept: Vec<String> = buffer.lines_from(0).into_iter().map(|l| l.message).collect();
        assert_eq!(kept.len(), 7, "{kept:?}");
        std::thread::sleep(std::time::Duration::from_millis(300));
        buffer.push(Level::Info, 1, "after a pause".into());
        let lines = buffer.lines_from(8);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0].level, Level::Warn);
        assert!(
            lines[0].message.starts_with("solo: 13 lines were dropped")
                && lines[0].message.contains("1000 bytes a second"),
            "{}",
            lines[0].message
        );
        assert_eq!((lines[1].seq, lines[1].message.as_str()), (9, "after a pause"));
        let followed: Vec<u64> = std::iter::from_fn(|| follow.try_recv().ok()).map(|l| l.seq).collect();
        assert_eq!(
            followed,
            (1..=9).collect::<Vec<_>>(),
            "followers get what is kept, in order"
        );
    }

    /// What the node's own log prints, under `filter`, of a guest writing `messages` at error
    /// into a buffer of `limits`.
    fn node_log_of_guest_errors(filter: &str, limits: LogLimits, messages: &[String]) -> String {
        #[derive(Clone, Default)]
        struct Captured(std::sync::Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let buffer = LogBuffer::new("acme", "svc", limits);
            for message in messages {
                buffer.push(Level::Error, 1, message.clone());
            }
        });
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn guest_lines_reach_the_node_log_only_when_its_filter_asks_for_them() {
        let boom = ["guest says boom".to_string()];
        assert_eq!(
            node_log_of_guest_errors("info", lines(3), &boom),
            "",
            "an error of a guest is not the node's"
        );
        let shown = node_log_of_guest_errors("info,solo::guest=debug", lines(3), &boom);
        assert!(
            shown.contains("DEBUG") && shown.contains("level=\"error\"") && shown.contains("guest says boom"),
            "{shown}"
        );
    }

    /// A line over the rate is dropped from the node's log too: the rate bounds what a guest
    /// writes there as well as in its own buffer.
    #[test]
    fn the_node_log_gets_only_the_lines_within_the_rate() {
        let rate = LogLimits {
            lines: 100,
            bytes: 1 << 20,
            bytes_per_second: 1000,
        };
        // 136 bytes of the rate each: 7 fit in a second's 1000.
        let messages: Vec<String> = (0..20).map(|i| format!("line {i:>66}")).collect();
        let shown = node_log_of_guest_errors("info,solo::guest=debug", rate, &messages);
        assert_eq!(shown.lines().count(), 7, "{shown}");
    }

    #[test]
    fn the_ring_keeps_the_newest_lines() {
        let buffer = LogBuffer::new("acme", "svc", lines(3));
        let mut follow = buffer.subscribe();
        for i in 0..5 {
            buffer.push(Level::Info, 1, format!("line {i}"));
        }
        let kept: Vec<u64> = buffer.lines_from(0).iter().map(|l| l.seq).collect();
        assert_eq!(kept, [3, 4, 5]);
        assert_eq!(buffer.lines_from(5).len(), 1);
        assert_eq!(follow.try_recv().unwrap().message, "line 0");
    }

    /// Long lines are bounded by their bytes, not only by their count: the oldest go first,
    /// and a line as long as a line may be is always kept.
    #[test]
    fn the_ring_keeps_the_newest_lines_that_fit_its_bytes() {
        let limits = LogLimits {
            lines: 1000,
            bytes: 3 * LogLimits::FULL_LINE_COST,
            bytes_per_second: 1 << 30,
        };
        let buffer = LogBuffer::new("acme", "svc", limits);
        let full = |i: usize| format!("{i}{}", "x".repeat(super::super::instance::MAX_LOG_LINE - 1));
        for i in 0..10 {
            buffer.push(Level::Info, 1, full(i));
        }
        let kept: Vec<u64> = buffer.lines_from(0).iter().map(|l| l.seq).collect();
        assert_eq!(kept, [8, 9, 10], "three full lines fit");
        // Short lines take the room of the long ones as they come, oldest first: 69 bytes each
        // (5 and 64), so 180 fit in the room of three long ones.
        for _ in 0..100 {
            buffer.push(Level::Info, 1, "short".into());
        }
        let kept = buffer.lines_from(0);
        assert_eq!(kept.len(), 101, "the newest long line and the short ones");
        assert_eq!(kept[0].seq, 10);
        for _ in 0..100 {
            buffer.push(Level::Info, 1, "short".into());
        }
        let kept = buffer.lines_from(0);
        assert_eq!(kept.len(), 180);
        assert!(kept.iter().all(|l| l.message == "short"));
        let held: u64 = kept.iter().map(LogLine::cost).sum();
        assert!(held <= limits.bytes, "{held}");
        // A ring smaller than one full line still keeps the latest line.
        let tiny = LogBuffer::new("acme", "svc", LogLimits { bytes: 1, ..limits });
        tiny.push(Level::Info, 1, full(1));
        tiny.push(Level::Info, 1, full(2));
        let kept: Vec<u64> = tiny.lines_from(0).iter().map(|l| l.seq).collect();
        assert_eq!(kept, [2]);
    }

    #[test]
    fn a_line_nobody_follows_is_kept_and_a_later_follower_gets_what_comes_next() {
        let buffer = LogBuffer::new("acme", "svc", lines(10));
        buffer.push(Level::Info, 1, "unfollowed".into());
        let mut follow = buffer.subscribe();
        buffer.push(Level::Warn, 1, "followed".into());
        let messages: Vec<String> = buffer.lines_from(0).into_iter().map(|l| l.message).collect();
        assert_eq!(messages, ["unfollowed", "followed"]);
        let line = follow.try_recv().unwrap();
        assert_eq!((line.seq, line.message.as_str()), (2, "followed"));
        assert!(follow.try_recv().is_err(), "the follower sees each line once");
    }
}
