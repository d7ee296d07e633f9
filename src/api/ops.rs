//! The operations both APIs offer, each one call into the control layer plus its metrics, so
//! gRPC and REST handlers only decode and encode.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::Stream;

use super::{ApiState, Caller, Error, ErrorKind};
use crate::control::{DeployOutcome, DeployRequest, KillCommand, KillOutcome, Listing, RemoveCommand, RemoveOutcome};
use crate::proto::{self, Limits};
use crate::runtime::{CallError, LogLine};
use crate::state::{Service, Status};

/// Everything a deploy carries besides the caller.
#[derive(Debug)]
pub struct Deploy {
    pub service_id: String,
    pub module: Arc<[u8]>,
    pub limits: Limits,
    pub labels: BTreeMap<String, String>,
    pub idempotency_key: String,
    /// Deploy only if the service is at this version (0: only if it does not exist).
    pub expected_version: Option<u64>,
}

/// Refuses a module the caller declared binary (`declared`) that is not: parsed as WAT it would
/// fail with a baffling syntax error. `text_way` says where WAT text goes instead.
pub fn require_wasm_binary(module: &[u8], declared: &str, text_way: &str) -> Result<(), Error> {
    if module.starts_with(b"\0asm") {
        return Ok(());
    }
    let what = if module.is_empty() {
        "it is empty".to_string()
    } else {
        format!("these {} bytes do not", module.len())
    };
    Err(Error::invalid(format!(
        "{declared} is not a wasm binary: a wasm binary starts with the bytes \\0asm and {what}; send WAT text in {text_way}"
    )))
}

pub async fn deploy(state: &ApiState, caller: &Caller, deploy: Deploy) -> Result<DeployOutcome, Error> {
    state.check_open()?;
    let request = DeployRequest {
        tenant: caller.tenant().to_string(),
        actor: caller.actor(),
        service_id: deploy.service_id,
        module: deploy.module,
        limits: deploy.limits,
        labels: deploy.labels,
        idempotency_key: deploy.idempotency_key,
        expected_version: deploy.expected_version,
    };
    let result = state.control.deploy(request).await;
    let label = match &result {
        Ok(o) if o.replayed => "replayed",
        Ok(o) if o.unchanged => "unchanged",
        Ok(o) if o.created => "created",
        Ok(_) => "upgraded",
        Err(_) => "refused",
    };
    state.metrics.deploys.with_label_values(&[label]).inc();
    if let Err(crate::control::Error::QuotaExceeded { quota, .. }) = &result {
        state.metrics.quota_refusals.with_label_values(&[quota]).inc();
    }
    Ok(result?)
}

pub fn status(state: &ApiState, caller: &Caller, service_id: &str) -> Result<proto::ServiceStatus, Error> {
    let service = state
        .control
        .status(caller.tenant(), service_id)
        .map_err(|e| Error::from(e).seen_by(caller))?;
    Ok(super::convert::service_status(
        &service,
        state.control.live(&service.tenant, &service.id),
    ))
}

/// The service a deploy's answer is about, as it is now; `None` for a replayed answer whose
/// service was removed since (though its id may have been deployed anew).
pub fn deployed_status(
    state: &ApiState,
    caller: &Caller,
    outcome: &DeployOutcome,
) -> Result<Option<proto::ServiceStatus>, Error> {
    match state.control.status(caller.tenant(), &outcome.service_id) {
        Ok(service) if outcome.replayed && !outcome.is_about(&service) => Ok(None),
        Ok(service) => Ok(Some(super::convert::service_status(
            &service,
            state.control.live(&service.tenant, &service.id),
        ))),
        Err(crate::control::Error::NotFound { .. }) if outcome.replayed => Ok(None),
        Err(e) => Err(Error::from(e).seen_by(caller)),
    }
}

/// Which services a listing returns.
#[derive(Debug, Default)]
pub struct ListFilter {
    pub status: Option<Status>,
    pub labels: BTreeMap<String, String>,
}

impl ListFilter {
    pub fn new(status: &str, labels: BTreeMap<String, String>) -> Result<ListFilter, Error> {
        let status = match status.trim() {
            "" => None,
            name => Some(name.parse::<Status>().map_err(Error::invalid)?),
        };
        // A selector no service could carry is a mistake, not an empty answer.
        crate::control::validate_labels(&labels).map_err(|e| Error::invalid(format!("label selector: {e}")))?;
        Ok(ListFilter { status, labels })
    }

    fn matches(&self, service: &Service) -> bool {
        self.status.is_none_or(|s| s == service.status)
            && self.labels.iter().all(|(k, v)| service.labels.get(k) == Some(v))
    }
}

/// The caller's services (all tenants' for an admin who named none) that match, ordered by
/// (tenant, id), with the seq they are as of.
pub fn list(state: &ApiState, caller: &Caller, filter: &ListFilter) -> Listing {
    let mut listing = state.control.list(caller.scope());
    listing.services.retain(|s| filter.matches(s));
    listing
}

pub fn service_status(state: &ApiState, service: &Service) -> proto::ServiceStatus {
    super::convert::service_status(service, state.control.live(&service.tenant, &service.id))
}

/// A kill as either API receives it.
#[derive(Debug)]
pub struct Kill {
    pub service_id: String,
    pub force: bool,
    /// 0: the node's default.
    pub grace_ms: u32,
    pub idempotency_key: String,
    /// Kill only if the service is at this version.
    pub expected_version: Option<u64>,
}

pub async fn kill(state: &ApiState, caller: &Caller, kill: Kill) -> Result<KillOutcome, Error> {
    state.check_open()?;
    let command = KillCommand {
        tenant: caller.tenant().to_string(),
        actor: caller.actor(),
        service_id: kill.service_id,
        force: kill.force,
        requested_grace_ms: kill.grace_ms,
        // A forced kill drops the instance at once: its event says it had no grace.
        grace_ms: match kill.force {
            true => 0,
            false => state
                .grace_or_default(kill.grace_ms)
                .as_millis()
                .try_into()
                .unwrap_or(u32::MAX),
        },
        idempotency_key: kill.idempotency_key,
        expected_version: kill.expected_version,
    };
    state
        .control
        .kill(command)
        .await
        .map_err(|e| Error::from(e).seen_by(caller))
}

/// A remove as either API receives it.
#[derive(Debug)]
pub struct Remove {
    pub service_id: String,
    pub idempotency_key: String,
    /// Remove only if the service is at this version.
    pub expected_version: Option<u64>,
}

pub async fn remove(state: &ApiState, caller: &Caller, remove: Remove) -> Result<RemoveOutcome, Error> {
    state.check_open()?;
    let command = RemoveCommand {
        tenant: caller.tenant().to_string(),
        actor: caller.actor(),
        service_id: remove.service_id,
        idempotency_key: remove.idempotency_key,
        expected_version: remove.expected_version,
    };
    state
        .control
        .remove(command)
        .await
        .map_err(|e| Error::from(e).seen_by(caller))
}

pub async fn call(
    state: &ApiState,
    caller: &Caller,
    service_id: &str,
    payload: Vec<u8>,
    timeout_ms: u32,
) -> Result<Vec<u8>, Error> {
    state.check_open()?;
    let started = Instant::now();
    let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms.into()));
    let result = state.control.call(caller.tenant(), service_id, payload, timeout).await;
    count_call(state, started, result.as_ref().err());
    result.map_err(|e| Error::from(e).seen_by(caller))
}

/// Refuses, before its payload is read, a call to a service `caller` has not (or may not
/// see), counted as [`call`] counts the refusal.
pub fn check_callable(state: &ApiState, caller: &Caller, service_id: &str) -> Result<(), Error> {
    state.check_open()?;
    let started = Instant::now();
    match state.control.check_callable(caller.tenant(), service_id) {
        Ok(_) => Ok(()),
        Err(e) => {
            count_call(state, started, Some(&e));
            Err(Error::from(e).seen_by(caller))
        }
    }
}

/// Counts a call in `solo_calls_total` by how it ended (`None`: answered), and its duration.
fn count_call(state: &ApiState, started: Instant, failure: Option<&crate::control::Error>) {
    let label = match failure {
        None => "ok",
        Some(crate::control::Error::Call(e)) => match e {
            CallError::Service { .. } | CallError::ResponseTooLarge { .. } => "service_error",
            CallError::Trapped { .. } => "trapped",
            CallError::Timeout { .. } => "timeout",
            CallError::Busy { .. } => "busy",
            CallError::NotRunning { .. } | CallError::Stopped { .. } => "not_running",
        },
        Some(crate::control::Error::NotRunning { .. } | crate::control::Error::ShuttingDown) => "not_running",
        Some(_) => "refused",
    };
    state.metrics.calls.with_label_values(&[label]).inc();
    state.metrics.call_duration.observe(started.elapsed().as_secs_f64());
}

pub async fn shutdown(state: &ApiState, caller: &Caller, grace_ms: u32) -> Result<u64, Error> {
    caller.require_admin("shut the node down")?;
    let grace = state.grace_or_default(grace_ms);
    let (seq, appended) = state
        .control
        .shutdown(&caller.actor(), grace.as_millis().try_into().unwrap_or(u32::MAX))
        .await?;
    // The node stops with the grace its event records: a repeat's own grace is not used.
    if appended {
        state.request_shutdown(grace);
    }
    Ok(seq)
}

/// Bytes per piece of a backup stream: well within the 4 MiB gRPC clients take by default.
const BACKUP_PIECE: usize = 1 << 20;

/// A piece of a backup stream.
#[derive(Debug)]
pub enum BackupPiece {
    /// The next bytes of the copy.
    Bytes(Vec<u8>),
    /// The end, once the copy is whole: the SHA-256 of all its bytes, in hex.
    End { sha256: String },
}

/// A backup of the node's data file (admin only), as etcd's snapshot: LMDB's compacted copy
/// as one read transaction sees it, streamed as it is made, through a pipe, so that it takes
/// no room on the node's disk. A copy that fails ends the stream with an error, never with an
/// end. The read transaction lasts as long as the copy, and meanwhile the data file grows by
/// what the node writes rather than reuse the pages of that moment: so a client that takes
/// nothing for the write stall timeout has its backup given up, as does one that goes away
/// (the copy's writes to the pipe then fail). The stream holds a watcher's permit, lasting as
/// long as its client takes to read it. Answers once the first piece is ready, so that a copy
/// that cannot begin (no reader slot left) is an error, not a stream.
pub async fn backup(
    state: &ApiState,
    caller: &Caller,
) -> Result<impl Stream<Item = Result<BackupPiece, Error>> + Send + 'static, Error> {
    use std::os::fd::OwnedFd;
    // Before admission: a tenant is told no, not that the node is busy.
    caller.require_admin("take a backup")?;
    state.check_open()?;
    let permit = state.shed.admit_watcher(&caller.principal)?;
    let stall = state.options.write_stall;
    let (reader, writer) = std::io::pipe().map_err(|e| internal("cannot make a pipe for the backup", &e))?;
    let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))
        .map_err(|e| internal("cannot read the backup's pipe", &e))?;
    let log = state.control.log().clone();
    let copy = tokio::task::spawn_blocking(move || {
        let mut pipe = std::fs::File::from(OwnedFd::from(writer));
        log.store().copy_compacted(&mut pipe)
    });
    // One piece waits for the client at most: the reader holds the rest back in the pipe.
    let (pieces, mut taken) = tokio::sync::mpsc::channel(1);
    let stopping = state.stopping.clone();
    tokio::spawn(send_backup(reader, copy, pieces, stall, stopping.clone()));
    let first = match taken.recv().await {
        Some(Err(e)) => return Err(e),
        Some(Ok(piece)) => piece,
        None => return Err(internal("the backup ended before it began", &"its copy stopped")),
    };
    Ok(async_stream::stream! {
        let _permit = permit;
        let mut next = Some(Ok(first));
        while let Some(piece) = next {
            let last = !matches!(piece, Ok(BackupPiece::Bytes(_)));
            yield piece;
            if last {
                return;
            }
            next = taken.recv().await;
        }
        // Given up, with nobody to tell at the time.
        if stopping.is_cancelled() {
            yield Err(Error::shutting_down());
            return;
        }
        yield Err(Error::new(
            ErrorKind::DeadlineExceeded,
            format!(
                "the backup was given up: its client took nothing for {} ms, while the copy kept \
                 the node's data file from reusing its pages ([solo] write_stall_timeout_ms)",
                stall.as_millis()
            ),
        ));
    })
}

/// Reads the copy out of its pipe and hands it to the stream in pieces, then its end; gives up
/// (ending the copy) when a piece waits `stall` to be taken, or the stream has gone.
async fn send_backup(
    mut reader: tokio::net::unix::pipe::Receiver,
    copy: tokio::task::JoinHandle<std::io::Result<()>>,
    pieces: tokio::sync::mpsc::Sender<Result<BackupPiece, Error>>,
    stall: Duration,
    stopping: tokio_util::sync::CancellationToken,
) {
    use sha2::Digest as _;
    use tokio::io::AsyncReadExt as _;
    let hand_over = async |piece| match tokio::time::timeout(stall, pieces.send(piece)).await {
        Ok(Ok(())) => true,
        // The client went away: its stream has gone, and the copy with it.
        Ok(Err(_)) => false,
        Err(_) => {
            tracing::info!(
                stall_ms = stall.as_millis() as u64,
                "a backup was given up: its client took nothing for the write stall timeout"
            );
            false
        }
    };
    let mut hash = sha2::Sha256::new();
    let mut piece = vec![0; BACKUP_PIECE];
    let mut filled = 0;
    loop {
        let read = tokio::select! {
            biased;
            () = stopping.cancelled() => {
                let _ = pieces.try_send(Err(Error::shutting_down()));
                return;
            }
            read = reader.read(&mut piece[filled..]) => read,
        };
        match read {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) => {
                hand_over(Err(internal("the backup's copy could not be read", &e))).await;
                return;
            }
        }
        if filled == BACKUP_PIECE {
            hash.update(&piece);
            let full = std::mem::replace(&mut piece, vec![0; BACKUP_PIECE]);
            filled = 0;
            if !hand_over(Ok(BackupPiece::Bytes(full))).await {
                return;
            }
        }
    }
    piece.truncate(filled);
    hash.update(&piece);
    let end = match copy.await {
        Ok(Ok(())) => {
            if !piece.is_empty() && !hand_over(Ok(BackupPiece::Bytes(piece))).await {
                return;
            }
            Ok(BackupPiece::End {
                sha256: hex::encode(hash.finalize()),
            })
        }
        Ok(Err(e)) => Err(copy_failed(&e)),
        Err(e) => Err(internal("the backup failed", &e)),
    };
    if let Err(e) = &end {
        tracing::warn!(error = %e.message(), "a backup failed");
    }
    hand_over(end).await;
}

/// Why a backup's copy failed: the store's own errors keep their kind (no reader slot left is
/// the node's load, as for any read, not a fault), anything else is internal.
fn copy_failed(error: &std::io::Error) -> Error {
    match error.get_ref().and_then(|e| e.downcast_ref::<crate::log::Error>()) {
        Some(crate::log::Error::ReadersFull) => {
            let message = format!("the backup could not begin: {}", crate::log::Error::ReadersFull);
            Error::new(ErrorKind::Unavailable, message).with_retry_after(crate::shed::RETRY_AFTER)
        }
        _ => internal("the backup failed", error),
    }
}

fn internal(what: &str, error: &dyn std::fmt::Display) -> Error {
    Error::new(ErrorKind::Internal, format!("{what}: {error}"))
}

/// Where a read of a service's log starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStart {
    /// At this line of the service's log as it is (0 and 1: its first).
    Line(u64),
    /// After this line of the log `log` (a [`LogBuffer`](crate::runtime::LogBuffer) id): if
    /// the service has a new log since (the node restarted, or it was removed and deployed
    /// again), every line of that one is new to the reader, from the first.
    After { log: u64, line: u64 },
}

/// A service's log lines from `start` on; with `follow`, then new lines until the service
/// has stopped, crashed for good or failed (at once after the lines kept, if it has), or is
/// removed. Lines that a slow follower let the ring overwrite are skipped, never repeated.
/// Also the id of the log they are from. Lines go out at the caller's pace
/// ([`super::pace`]); the stream ends with [`Error::shutting_down`] if the node stops
/// while it waits.
pub async fn logs(
    state: &Arc<ApiState>,
    caller: &Caller,
    service_id: &str,
    start: LogStart,
    follow: bool,
) -> Result<(u64, impl Stream<Item = Result<LogLine, Error>> + Send + 'static), Error> {
    let buffer = state
        .control
        .logs(caller.tenant(), service_id)
        .await
        .map_err(|e| Error::from(e).seen_by(caller))?;
    let from_seq = match start {
        LogStart::Line(line) => line,
        LogStart::After { log, line } if log == buffer.id() => line.saturating_add(1),
        LogStart::After { .. } => 1,
    };
    let log_id = buffer.id();
    // As a Watch refuses a start past the log's next seq: a client resuming after a node
    // restart would otherwise wait, silently, for the new log to reach its old number.
    let next_line = buffer.next_seq();
    if from_seq > next_line {
        return Err(Error::invalid(format!(
            "line {from_seq} is past the service's next log line, {next_line}: log lines live in the \
             node's memory and are numbered afresh from 1 when the node restarts; read from 0 for \
             every line kept"
        )));
    }
    let state = Arc::clone(state);
    let principal = caller.principal.clone();
    // Subscribe before reading the ring, so nothing falls between the two.
    let mut updates = buffer.subscribe();
    Ok((
        log_id,
        async_stream::stream! {
            // Ends once the service is down for good, as `kubectl logs -f` does with its
            // container.
            let quiet = buffer.quiet();
            tokio::pin!(quiet);
            let mut next = from_seq.max(1);
            let mut unsent = VecDeque::from(buffer.lines_from(next));
            loop {
                while let Some(line) = unsent.pop_front() {
                    if line.seq < next {
                        continue;
                    }
                    if !state.log_pace.wait(&principal, line.cost(), &state.stopping).await {
                        yield Err(Error::shutting_down());
                        return;
                    }
                    next = line.seq + 1;
                    yield Ok(line);
                }
                if !follow {
                    return;
                }
                tokio::select! {
                    biased;
                    () = state.stopping.cancelled() => {
                        yield Err(Error::shutting_down());
                        return;
                    }
                    update = updates.recv() => match update {
                        Ok(line) => unsent.push_back(line),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            unsent.extend(buffer.lines_from(next));
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    // The service was removed, or has no instance and none to come: after its
                    // last lines (above, first: every line is sent before it ends), the end.
                    () = buffer.ended() => return,
                    () = &mut quiet => return,
                }
            }
        },
    ))
}

/// The most a List page's services may take on the wire, in either API. Official gRPC clients
/// refuse an answer over 4 MiB unless told otherwise, and services with many long labels pass
/// that well within the largest page size (over REST, a label of control characters takes six
/// times its bytes as JSON: pages of 100 MB, each built whole in memory). A page ends short of
/// this, as Kubernetes may answer fewer items than its `limit`, and the next one starts after
/// the last service sent.
pub const MAX_PAGE_BYTES: usize = 3 << 20;

/// What a page token belongs to: whose services (the caller's scope) and which filter, hashed.
/// A token used with another scope or filter would skip or repeat services, so it is refused.
pub fn listing_fingerprint(
    scope: Option<&str>,
    status: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> String {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    // Length-prefixed fields: no two listings encode alike.
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    field(scope.map_or(b"*".as_slice(), str::as_bytes));
    field(status.trim().as_bytes());
    for (key, value) in labels {
        field(key.as_bytes());
        field(value.as_bytes());
    }
    hex::encode(&hasher.finalize()[..8])
}

pub fn encode_page_token(listing: &str, tenant: &str, id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{listing}\n{tenant}\n{id}"))
}

/// The position a page token resumes after, if it belongs to `listing`, of `scope`'s services
/// (`None`: every tenant's).
pub fn decode_page_token(token: &str, listing: &str, scope: Option<&str>) -> Result<Option<(String, String)>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Error::invalid("page_token is not one this node issued");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let mut fields = text.splitn(3, '\n');
    let (Some(issued_for), Some(tenant), Some(id)) = (fields.next(), fields.next(), fields.next()) else {
        return Err(bad());
    };
    if issued_for != listing {
        return Err(Error::invalid(
            "page_token belongs to another listing (another tenant, status or labels); list again without it",
        ));
    }
    // The position is only a place to resume from (a page never holds more than the caller
    // may see), but one that names no possible service was not issued here.
    // A tenant's listing never ends on another tenant's service either: such a position would
    // end the listing early, and quietly.
    let well_formed = crate::control::validate_tenant(tenant).is_ok()
        && crate::control::validate_service_id(id).is_ok()
        && scope.is_none_or(|scope| scope == tenant);
    if !well_formed {
        return Err(bad());
    }
    Ok(Some((tenant.to_string(), id.to_string())))
}

/// The first of `unsent` that fit a page, each as `encode` makes it with the bytes it takes in
/// the answer: at most `page_size`, and as many as fit in `max_bytes`, one at least. Also the
/// last one taken, if more are left for another page.
pub fn fill_page<'a, S: 'a, T>(
    unsent: impl Iterator<Item = &'a S>,
    page_size: usize,
    max_bytes: usize,
    encode: impl Fn(&S) -> (T, usize),
) -> (Vec<T>, Option<&'a S>) {
    let mut unsent = unsent.peekable();
    let (mut page, mut bytes, mut last) = (Vec::new(), 0, None);
    while let Some(&next) = unsent.peek() {
        if page.len() == page_size {
            break;
        }
        let (encoded, size) = encode(next);
        if !page.is_empty() && bytes + size > max_bytes {
            break;
        }
        bytes += size;
        page.push(encoded);
        last = unsent.next();
    }
    let more = unsent.peek().is_some();
    (page, last.filter(|_| more))
}

/// Resolves a page size: 0 is the default (100), more than 1000 is refused.
pub fn page_size(requested: u64) -> Result<usize, Error> {
    match requested {
        0 => Ok(100),
        n if n > MAX_PAGE_SIZE => Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("page size {n} is over the maximum of {MAX_PAGE_SIZE}"),
        )),
        n => Ok(n as usize),
    }
}

/// The most services one page lists.
pub const MAX_PAGE_SIZE: u64 = 1000;

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::os::fd::OwnedFd;
    use std::time::Duration;

    use super::{BackupPiece, send_backup};

    /// A copy of `bytes` written into a pipe, as LMDB's would be, and what `send_backup` reads.
    fn piped(
        bytes: usize,
    ) -> (
        tokio::net::unix::pipe::Receiver,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let (reader, writer) = std::io::pipe().unwrap();
        let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader)).unwrap();
        let copy = tokio::task::spawn_blocking(move || {
            let mut pipe = std::fs::File::from(OwnedFd::from(writer));
            pipe.write_all(&vec![7; bytes])
        });
        (reader, copy)
    }

    #[tokio::test]
    async fn a_backup_comes_in_whole_pieces_then_its_hash() {
        let (reader, copy) = piped(2 * super::BACKUP_PIECE + 5);
        let (pieces, mut taken) = tokio::sync::mpsc::channel(1);
        let stopping = tokio_util::sync::CancellationToken::new();
        tokio::spawn(send_backup(reader, copy, pieces, Duration::from_secs(10), stopping));
        let mut sizes = Vec::new();
        let end = loop {
            match taken.recv().await.expect("an end") {
                Ok(BackupPiece::Bytes(bytes)) => sizes.push(bytes.len()),
                other => break other,
            }
        };
        assert_eq!(sizes, [super::BACKUP_PIECE, super::BACKUP_PIECE, 5]);
        let Ok(BackupPiece::End { sha256 }) = end else {
            panic!("{end:?}")
        };
        use sha2::Digest as _;
        let expected = sha2::Sha256::digest(vec![7; 2 * super::BACKUP_PIECE + 5]);
        assert_eq!(sha256, hex::encode(expected));
    }

    /// A client that takes nothing has its backup given up, and the copy ends (its writes to
    /// the pipe fail) rather than hold its read transaction for as long as the client stays.
    #[tokio::test]
    async fn a_backup_nobody_reads_is_given_up_and_its_copy_ends() {
        let (reader, copy) = piped(8 * super::BACKUP_PIECE);
        let copy_ended = copy.abort_handle();
        let (pieces, taken) = tokio::sync::mpsc::channel(1);
        let stopping = tokio_util::sync::CancellationToken::new();
        let sending = tokio::spawn(send_backup(reader, copy, pieces, Duration::from_millis(50), stopping));
        tokio::time::timeout(Duration::from_secs(10), sending)
            .await
            .expect("the backup is given up")
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !copy_ended.is_finished() {
            assert!(std::time::Instant::now() < deadline, "the copy still writes");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(taken);
    }
}
