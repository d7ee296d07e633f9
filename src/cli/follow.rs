//! The streaming commands, `events` and `logs`.
//!
//! Without `--follow` they print what is there and exit: for events, history up to the head
//! of the log as it was when the command started (the seq a List is as of). With `--follow`
//! they keep printing until Ctrl-C, and survive a dropped connection or a node restart: they
//! reconnect with backoff and resume just after the last seq seen (events: the last event or
//! progress note; logs: the last line), so nothing is missed and nothing is printed twice.
//! They end quietly, with exit code 0, once the reader of stdout has gone, even while idle.

use std::time::Duration;

use super::args::{EventsArgs, LogsArgs};
use super::connect::{Client, Connector};
use super::error::{CliError, Exit};
use super::output::{Colour, Output, describe_log_line, human_duration_ms, log_line_json, note};
use crate::proto::{self, watch_response::Msg};

/// Progress interval of the watches here: the smallest the node allows, so an idle or
/// filtered watch still learns quickly how far the log has moved.
const PROGRESS_INTERVAL_MS: u32 = 100;

/// How often an idle follow checks whether the reader of stdout has gone.
const STDOUT_CHECK: Duration = Duration::from_secs(1);

/// Reconnect delays: doubling from the first to the last.
const FIRST_DELAY: Duration = Duration::from_millis(100);
const LAST_DELAY: Duration = Duration::from_secs(5);

pub async fn events(conn: &Connector, out: Output, args: EventsArgs) -> Result<(), CliError> {
    if args.follow {
        until_interrupted(follow_events(conn, out, &args)).await
    } else {
        event_history(conn, out, &args).await
    }
}

pub async fn logs(conn: &Connector, out: Output, args: LogsArgs) -> Result<(), CliError> {
    if args.follow {
        until_interrupted(follow_logs(conn, out, &args)).await
    } else {
        let mut client = conn.connect().await?;
        let request = proto::LogsRequest {
            service_id: args.service_id.clone(),
            follow: false,
            from_seq: args.from.unwrap_or(0),
            log_id: 0,
        };
        let mut stream = client.logs(request).await.map_err(|s| conn.error(&s))?.into_inner();
        while let Some(line) = stream.message().await.map_err(|s| conn.error(&s))? {
            print_log_line(out, &line)?;
        }
        Ok(())
    }
}

fn watch_request(args: &EventsArgs, from_seq: u64) -> proto::WatchRequest {
    proto::WatchRequest {
        from_seq,
        service_id: args.service_id.clone().unwrap_or_default(),
        kinds: args.kinds.clone(),
        progress_interval_ms: PROGRESS_INTERVAL_MS,
    }
}

fn print_event(out: Output, event: &proto::Event) -> Result<(), CliError> {
    if out.json {
        return out.json_line(&crate::event::to_json(event));
    }
    let line = crate::event::describe(event);
    match crate::event::kind_name(event) {
        "service_crashed" => out.line(&out.paint(Colour::Red, &line)),
        _ => out.line(&line),
    }
}

fn print_log_line(out: Output, line: &proto::LogLine) -> Result<(), CliError> {
    if out.json {
        out.json_line(&log_line_json(line))
    } else {
        out.line(&describe_log_line(&out, line))
    }
}

/// The head of the log: the seq a listing is as of. A List rather than a first watch, so
/// reading history holds one stream, not two in a row, against the caller's `max_watchers`.
async fn head(client: &mut Client, conn: &Connector) -> Result<u64, CliError> {
    let request = proto::ListRequest {
        page_size: 1,
        ..Default::default()
    };
    let listing = client.list(request).await.map_err(|s| conn.error(&s))?.into_inner();
    Ok(listing.head_seq)
}

/// History from `--from` (default 1) up to the head as it was at the start.
async fn event_history(conn: &Connector, out: Output, args: &EventsArgs) -> Result<(), CliError> {
    let mut client = conn.connect().await?;
    let head = head(&mut client, conn).await?;
    let from = args.from.unwrap_or(1).max(1);
    if from == head + 1 {
        // The history ends just before `from`: nothing to print.
        return Ok(());
    }
    // A `from` further on names a seq this node never acknowledged: the node refuses the
    // watch and says so, as it does for `--follow`.
    let request = watch_request(args, from);
    let mut stream = client.watch(request).await.map_err(|s| conn.error(&s))?.into_inner();
    while let Some(item) = stream.message().await.map_err(|s| conn.error(&s))? {
        match item.msg {
            Some(Msg::Event(event)) => {
                if event.seq > head {
                    break;
                }
                print_event(out, &event)?;
                if event.seq == head {
                    break;
                }
            }
            Some(Msg::Progress(progress)) if progress.head_seq >= head => break,
            Some(Msg::Progress(_)) | None => {}
        }
    }
    Ok(())
}

/// What a follow has been through. A follow whose first stream never gets going (a peer that
/// takes the connection but never answers as a node) is given up on, as one refused at once
/// is; only a node that served it once is waited for. A reconnect is told once its stream is
/// going again, not when its connection opens.
#[derive(Debug, Default)]
struct Session {
    streamed: bool,
    resumed: Option<String>,
}

impl Session {
    fn stream_opened(&mut self) {
        self.streamed = true;
        if let Some(resumed) = self.resumed.take() {
            note(&resumed);
        }
    }

    /// Whether a loss is worth a reconnect.
    fn retries(&self, lost: &CliError) -> bool {
        lost.retry && self.streamed
    }
}

/// Waits before each reconnect: 100 ms, doubling up to 5 s; back to the start once a stream
/// delivers again.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: FIRST_DELAY }
    }

    fn delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(LAST_DELAY);
        delay
    }

    fn reset(&mut self) {
        self.next = FIRST_DELAY;
    }
}

/// Waits out the backoff and connects again, as often as it takes; notes each try on stderr.
async fn reconnect(conn: &Connector, backoff: &mut Backoff, lost: &CliError, resume: &str) -> Client {
    let mut delay = backoff.delay();
    note(&format!(
        "{}; reconnecting in {} (then resuming {resume})",
        lost.message,
        human_duration_ms(delay.as_millis() as u64)
    ));
    loop {
        tokio::time::sleep(delay).await;
        match conn.connect().await {
            Ok(client) => return client,
            Err(e) => {
                delay = backoff.delay();
                note(&format!(
                    "{}; retrying in {}",
                    e.message,
                    human_duration_ms(delay.as_millis() as u64)
                ));
            }
        }
    }
}

/// A stream that ended without an error: the node (or something on the way) closed it.
fn ended(conn: &Connector) -> CliError {
    CliError::new(
        Exit::Unavailable,
        format!("the node at {} ended the stream", conn.url()),
    )
    .retryable()
}

/// Where a follow resumes: just after what it last saw.
fn resume_text(next: u64) -> String {
    if next == 0 {
        "at the head of the log".to_string()
    } else {
        format!("at seq {next}")
    }
}

async fn follow_events(conn: &Connector, out: Output, args: &EventsArgs) -> Result<(), CliError> {
    // 0: from the head; after that, one past the last event or progress note seen.
    let mut next = args.from.unwrap_or(0);
    let mut backoff = Backoff::new();
    let mut session = Session::default();
    let mut client = conn.connect().await?;
    loop {
        let watched = watch_events(&mut client, conn, out, args, &mut next, &mut backoff, &mut session).await;
        let lost = match watched {
            Ok(()) => ended(conn),
            Err(e) if session.retries(&e) => e,
            Err(e) => return Err(e),
        };
        client = reconnect(conn, &mut backoff, &lost, &resume_text(next)).await;
        session.resumed = Some(format!("reconnected to {}; resuming {}", conn.url(), resume_text(next)));
    }
}

/// One watch, until it ends; `next` follows what it delivers.
async fn watch_events(
    client: &mut Client,
    conn: &Connector,
    out: Output,
    args: &EventsArgs,
    next: &mut u64,
    backoff: &mut Backoff,
    session: &mut Session,
) -> Result<(), CliError> {
    let mut stream = client
        .watch(watch_request(args, *next))
        .await
        .map_err(|s| conn.error(&s))?
        .into_inner();
    session.stream_opened();
    while let Some(item) = stream.message().await.map_err(|s| conn.error(&s))? {
        backoff.reset();
        match item.msg {
            Some(Msg::Event(event)) => {
                // The node sends each seq once and in order; a repeat could only come from
                // a node whose log went back in time, and is not printed twice.
                if *next != 0 && event.seq < *next {
                    continue;
                }
                print_event(out, &event)?;
                *next = event.seq + 1;
            }
            Some(Msg::Progress(progress)) => *next = (*next).max(progress.head_seq + 1),
            None => {}
        }
    }
    Ok(())
}

async fn follow_logs(conn: &Connector, out: Output, args: &LogsArgs) -> Result<(), CliError> {
    let mut last: Option<proto::LogLine> = None;
    let mut backoff = Backoff::new();
    let mut session = Session::default();
    let mut client = conn.connect().await?;
    loop {
        let streamed = stream_logs(&mut client, conn, out, args, &mut last, &mut backoff, &mut session).await;
        let lost = match streamed {
            // A followed log ends without an error once its service is down for good or removed
            // (a node that stops ends it with UNAVAILABLE): there is nothing more to follow.
            Ok(()) => {
                let why = match super::services::status_unless_removed(&mut client, conn, &args.service_id).await {
                    Ok(Some(status)) => format!("is {}", status.status),
                    Ok(None) => "was removed".to_string(),
                    Err(_) => "is down".to_string(),
                };
                note(&format!("service '{}' {why}; its log ends here", args.service_id));
                return Ok(());
            }
            Err(e) if session.retries(&e) => e,
            Err(e) => return Err(e),
        };
        let resume = match &last {
            Some(line) => format!("after line {}", line.seq),
            None => "at the first line".to_string(),
        };
        client = reconnect(conn, &mut backoff, &lost, &resume).await;
        session.resumed = Some(format!("reconnected to {}; resuming {resume}", conn.url()));
    }
}

async fn stream_logs(
    client: &mut Client,
    conn: &Connector,
    out: Output,
    args: &LogsArgs,
    last: &mut Option<proto::LogLine>,
    backoff: &mut Backoff,
    session: &mut Session,
) -> Result<(), CliError> {
    // After a loss, the node may have restarted with a fresh log: naming the log we followed
    // gets that one from its first line, all of it new to us.
    let request = match last {
        None => proto::LogsRequest {
            service_id: args.service_id.clone(),
            follow: true,
            from_seq: args.from.unwrap_or(0),
            log_id: 0,
        },
        Some(line) => proto::LogsRequest {
            service_id: args.service_id.clone(),
            follow: true,
            from_seq: line.seq + 1,
            log_id: line.log_id,
        },
    };
    let mut stream = client.logs(request).await.map_err(|s| conn.error(&s))?.into_inner();
    session.stream_opened();
    while let Some(line) = stream.message().await.map_err(|s| conn.error(&s))? {
        backoff.reset();
        if last.as_ref().is_some_and(|last| last.log_id != line.log_id) {
            note(&format!(
                "the node's log of {} starts afresh (the node restarted); printing it from its first line",
                args.service_id
            ));
        }
        print_log_line(out, &line)?;
        *last = Some(line);
    }
    Ok(())
}

/// Runs `work` until it ends, the user interrupts (Ctrl-C, SIGTERM) or the reader of stdout
/// goes away, either of which ends it cleanly.
async fn until_interrupted(work: impl Future<Output = Result<(), CliError>>) -> Result<(), CliError> {
    tokio::select! {
        result = work => result,
        () = super::interrupted() => Ok(()),
        () = stdout_closed() => Ok(()),
    }
}

/// Resolves once the reader of stdout has gone, checked every [`STDOUT_CHECK`].
async fn stdout_closed() {
    let mut checks = tokio::time::interval(STDOUT_CHECK);
    loop {
        checks.tick().await;
        if super::output::stdout_gone() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_five_seconds_and_resets() {
        let mut backoff = Backoff::new();
        let delays: Vec<u128> = (0..8).map(|_| backoff.delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        backoff.reset();
        assert_eq!(backoff.delay(), FIRST_DELAY);
    }
}
