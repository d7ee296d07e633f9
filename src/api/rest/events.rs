//! Server-Sent Events: `/events` (a tail of the log) and `/services/{id}/logs?follow=true`.
//!
//! An event frame is `id: <seq>`, `event: <kind>`, `data: <one line of JSON>`. While a filtered
//! stream skips events, a `progress` frame moves the client's `Last-Event-ID` forward, so a
//! reconnect resumes after everything already examined.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{FutureExt as _, Stream, StreamExt, TryStreamExt};
use serde_json::json;

use super::services::Params;
use crate::api::convert::log_line_json;
use crate::api::encoded::EncodedOnce;
use crate::api::ops::LogStart;
use crate::api::watch::{WatchFilter, WatchItem, watch};
use crate::api::{ApiState, Error, ErrorKind, GaugeGuard, ops};
use crate::tls::PeerTenant;

type Certificate = Option<Extension<PeerTenant>>;

pub(super) async fn events(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    certificate: Certificate,
) -> Result<Response, Error> {
    let params = Params::parse(query, &["tenant", "from", "service_id", "kinds"])?;
    let caller = super::caller(&state, &headers, params.get("tenant"), certificate.as_deref())?;
    state.check_open()?;
    let from_seq = resume_point(&headers, params.number("from")?)?;
    let filter = WatchFilter::new(
        params.get("service_id").map(str::to_string),
        params.get("kinds").unwrap_or("").split(','),
    )?;
    let permit = state.shed.admit_watcher(&caller.principal)?;
    let gauge = GaugeGuard::new(state.metrics.watchers.with_label_values(&["sse"]));
    let keepalive = state.options.sse_keepalive;
    let resumed = last_event_id(&headers)?.is_some();
    let items = watch(&state, caller, filter, from_seq, keepalive).map_err(|e| match e.kind() {
        // The seq refused is the one after it: name what the client sent too.
        ErrorKind::InvalidArgument if resumed => {
            Error::invalid(format!("Last-Event-ID {}: {}", from_seq - 1, e.message()))
        }
        _ => e,
    })?;
    // The stream ends cleanly at shutdown. Any other error (a damaged record) is sent as a
    // last `error` frame: a stream that just ended would read as "nothing more" to a client,
    // which would reconnect to the same damage forever without ever learning of it.
    let frames = items
        .scan(false, move |ended, item| {
            let next = match item {
                _ if *ended => None,
                Ok(item) => Some(frame(&state.frames.sse, &item)),
                Err(e) if e.kind() == ErrorKind::ShuttingDown => None,
                Err(e) => {
                    *ended = true;
                    Some(error_frame(&e))
                }
            };
            std::future::ready(next)
        })
        .map(move |frame| {
            let _held = (&permit, &gauge);
            Ok::<_, Infallible>(frame)
        });
    Ok(sse(frames, keepalive))
}

/// A log line's SSE id: its log's id and its number, so that a reconnect tells the lines of the
/// log it followed from those of a later one, numbered from 1 again.
fn log_event_id(log_id: u64, line: u64) -> String {
    format!("{log_id:x}-{line}")
}

/// Where a log read starts: after `Last-Event-ID` (a log's id and line, or a bare line number),
/// at `?from=`, or at the first line kept.
fn log_resume_point(headers: &HeaderMap, from: Option<u64>) -> Result<LogStart, Error> {
    let Some(value) = last_event_id(headers)? else {
        return Ok(LogStart::Line(from.unwrap_or(0)));
    };
    let malformed = || Error::invalid("Last-Event-ID must be the id of a log line, as sent");
    let text = value.to_str().map_err(|_| malformed())?.trim();
    match text.split_once('-') {
        Some((log, line)) => Ok(LogStart::After {
            log: u64::from_str_radix(log, 16).map_err(|_| malformed())?,
            line: line.parse().map_err(|_| malformed())?,
        }),
        None => {
            let line: u64 = text.parse().map_err(|_| malformed())?;
            Ok(LogStart::Line(line.saturating_add(1)))
        }
    }
}

/// The request's `Last-Event-ID`, if it names one: an empty one names none, as in the SSE spec
/// (the client has seen nothing yet); one sent twice is refused.
fn last_event_id(headers: &HeaderMap) -> Result<Option<&http::HeaderValue>, Error> {
    let value = crate::api::auth::single_value("Last-Event-ID", headers.get_all("last-event-id").iter())?;
    Ok(value.filter(|v| !v.as_bytes().trim_ascii().is_empty()))
}

/// Where an `/events` stream starts: after `Last-Event-ID` (exclusive), at `?from=` (inclusive),
/// or with what comes next.
fn resume_point(headers: &HeaderMap, from: Option<u64>) -> Result<u64, Error> {
    let last_event_id = last_event_id(headers)?.map(|v| {
        v.to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| Error::invalid("Last-Event-ID must be the seq of an event"))
    });
    match (last_event_id.transpose()?, from) {
        (Some(last), _) => last
            .checked_add(1)
            .ok_or_else(|| Error::invalid(format!("Last-Event-ID {last}: it is past the last possible seq"))),
        (None, Some(from)) => Ok(from),
        (None, None) => Ok(0),
    }
}

fn frame(encoded: &EncodedOnce<SseEvent>, item: &WatchItem) -> SseEvent {
    match item {
        WatchItem::Event(event) => encoded.get(event, |event| {
            SseEvent::default()
                .id(event.seq.to_string())
                .event(crate::event::kind_name(event))
                .data(crate::event::to_json(event).to_string())
        }),
        // With data, though EventSource keeps an id-only frame's id too: some clients (the npm
        // `eventsource`) drop a frame without data, id and all, and would resume from an older
        // id. Named, so an `onmessage` handler is not called for it.
        WatchItem::Progress(seq) => SseEvent::default()
            .id(seq.to_string())
            .event("progress")
            .data(serde_json::json!({ "head_seq": seq }).to_string()),
    }
}

/// How long an EventSource waits before it reconnects after an error frame: what ended the
/// stream (a damaged record) would end the next one too, so not at the browser's few seconds.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(60);

/// The error that ends a stream, as the JSON body of a REST error.
fn error_frame(error: &Error) -> SseEvent {
    SseEvent::default()
        .event("error")
        .retry(RETRY_AFTER_ERROR)
        .data(error.json_body().to_string())
}

fn sse<S>(frames: S, keepalive: Duration) -> Response
where
    S: Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
{
    let mut response = Sse::new(frames)
        .keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive"))
        .into_response();
    let headers = response.headers_mut();
    headers.insert("cache-control", HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

pub(super) async fn logs(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    certificate: Certificate,
) -> Result<Response, Error> {
    let params = Params::parse(query, &["tenant", "follow", "from"])?;
    let caller = super::caller(&state, &headers, params.get("tenant"), certificate.as_deref())?;
    let follow = params.flag("follow")?;
    // Like /events: after Last-Event-ID (what a reconnecting EventSource sends), else ?from=.
    let from = log_resume_point(&headers, params.number("from")?)?;
    if !follow {
        let _permit = state.shed.admit(&caller.principal)?;
        let (log_id, lines) = ops::logs(&state, &caller, &id, from, false).await?;
        // All or nothing: a read cut short (the node stopping) is an error, not fewer lines.
        // The route streams too, so it is not under the layer that bounds other requests' time;
        // a read paced past that time is bounded here.
        let limit = state.options.request_timeout;
        let read = lines
            .map(|line| line.map(|l| log_line_json(&l)))
            .try_collect::<Vec<_>>();
        let Ok(lines) = tokio::time::timeout(limit, read).await else {
            let error = Error::new(
                ErrorKind::DeadlineExceeded,
                format!(
                    "the read did not finish within {} ms (http_request_timeout_ms): at this tenant's \
                     max_log_read_bytes_per_second the lines kept take longer; read from a later line \
                     (from=), or follow the log",
                    limit.as_millis()
                ),
            );
            // 408, as the other requests over their time are: the node, not a service, took long.
            let mut response = error.into_response();
            *response.status_mut() = http::StatusCode::REQUEST_TIMEOUT;
            return Ok(response);
        };
        let lines = lines?;
        let log_id = format!("{log_id:x}");
        return Ok(Json(json!({ "service_id": id, "log_id": log_id, "lines": lines })).into_response());
    }
    let permit = state.shed.admit_watcher(&caller.principal)?;
    let (log_id, lines) = ops::logs(&state, &caller, &id, from, true).await?;
    let mut lines = Box::pin(lines.peekable());
    // Nothing to send and nothing to come (the service is down for good): 204, which tells an
    // EventSource to stop reconnecting, as the HTML standard has it. Else it would come back
    // every few seconds for ever, to find the same end.
    if let Some(None) = lines.as_mut().peek().now_or_never() {
        return Ok(http::StatusCode::NO_CONTENT.into_response());
    }
    let gauge = GaugeGuard::new(state.metrics.watchers.with_label_values(&["sse"]));
    let frames = async_stream::stream! {
        let _held = (permit, gauge);
        while let Some(line) = lines.next().await {
            // The node is stopping: the stream just ends, and the client resumes elsewhere.
            let Ok(line) = line else { return };
            yield Ok::<_, Infallible>(
                SseEvent::default()
                    .id(log_event_id(log_id, line.seq))
                    .event("log")
                    .data(log_line_json(&line).to_string()),
            );
        }
        // The service is down for good, or removed: a client that reconnects anyway is told
        // 204, above.
        yield Ok(SseEvent::default()
            .event("end")
            .data(json!({ "service_id": id, "message": "the service is down or removed: no more lines will come" }).to_string()));
    };
    Ok(sse(frames, state.options.sse_keepalive))
}
