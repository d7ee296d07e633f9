//! The REST API and Server-Sent Events over axum: the same operations as gRPC for people with
//! `curl`, browsers and HTTP tools, through the same operations and the same error type.
//!
//! Every error is `{"error": "<code>", "message": "...", "request_id": "..."}` with the status
//! from [`ErrorKind::http_status`]; axum's own rejections (unknown route, wrong method, body too
//! large, timeout) are rewritten into that shape by [`normalize_errors`].

mod drain;
mod events;
mod services;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use super::bodies::Payer;
use super::{ApiState, Caller, Error, ErrorKind, TENANT_HEADER};
use crate::shed::Permit;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Every route and its methods, for `docs/openapi.yaml` and its test.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/services", &["get", "post"]),
    ("/services/{id}", &["get", "put", "delete"]),
    ("/services/{id}/call", &["post"]),
    ("/services/{id}/logs", &["get"]),
    ("/events", &["get"]),
    ("/shutdown", &["post"]),
    ("/backup", &["get"]),
    ("/health", &["get"]),
    ("/metrics", &["get"]),
];

/// The REST router over `state`.
pub fn router(state: Arc<ApiState>) -> Router {
    // Streams (SSE) are exempt from the request timeout; everything else has it.
    let bounded = Router::new()
        .route("/services", get(services::list).post(services::deploy_json))
        .route(
            "/services/{id}",
            get(services::status).put(services::deploy_raw).delete(services::kill),
        )
        .route("/services/{id}/call", post(services::call))
        .route("/shutdown", post(services::shutdown))
        .route("/health", get(services::health))
        .route("/metrics", get(services::metrics))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            state.options.request_timeout,
        ));
    let streaming = Router::new()
        .route("/services/{id}/logs", get(events::logs))
        .route("/events", get(events::events))
        .route("/backup", get(services::backup));
    Router::new()
        .merge(bounded)
        .merge(streaming)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(Arc::clone(&state), admit_bodies))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), refuse_when_stopping))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), normalize_errors))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            drain::drain_unread_bodies,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(state.options.max_body_bytes))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    let request_id = request
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), request_id)
                })
                // normalize_errors logs failures, each at the level its cause deserves.
                .on_failure(()),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, RandomRequestId))
        .layer(middleware::map_request(drop_unusable_request_id))
        .with_state(state)
}

/// The longest request id a client may choose. Ids are echoed in a header, in error bodies and
/// in every log line of the request, so they are kept short and plain.
const MAX_REQUEST_ID: usize = 128;

/// Removes a client's `X-Request-Id` that is longer than [`MAX_REQUEST_ID`] or holds anything
/// but visible ASCII, so that [`RandomRequestId`] replaces it.
async fn drop_unusable_request_id(mut request: Request) -> Request {
    let usable = |id: &HeaderValue| std::str::from_utf8(id.as_bytes()).is_ok_and(usable_request_id);
    if request.headers().get_all(REQUEST_ID).iter().any(|id| !usable(id)) {
        request.headers_mut().remove(REQUEST_ID);
    }
    request
}

/// Whether a client's `X-Request-Id` is kept: 1 to [`MAX_REQUEST_ID`] visible ASCII characters.
pub(crate) fn usable_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_REQUEST_ID && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Request ids: 16 random hex digits, unless the client sent one.
#[derive(Debug, Clone, Copy)]
struct RandomRequestId;

impl MakeRequestId for RandomRequestId {
    fn make_request_id<B>(&mut self, _request: &http::Request<B>) -> Option<RequestId> {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).ok()?;
        HeaderValue::from_str(&hex::encode(bytes)).ok().map(RequestId::new)
    }
}

async fn not_found() -> Error {
    Error::new(ErrorKind::NotFound, "no such route; see docs/openapi.yaml")
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.kind.http_status();
        let mut response = (status, axum::Json(self.json_body())).into_response();
        if let Some(after) = self.retry_after {
            let seconds = after.as_secs_f64().ceil().max(1.0) as u64;
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        // RFC 9110 asks a 401 to say which scheme would do.
        if self.kind == ErrorKind::Unauthenticated {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        // The request id is filled in by `normalize_errors`, which knows it.
        response.extensions_mut().insert(ErrorBody(self));
        response
    }
}

/// Marks a response whose body is one of our JSON errors, and carries that error, so that
/// `normalize_errors` rebuilds the body without reading it back.
#[derive(Debug, Clone)]
struct ErrorBody(Error);

/// Admits the request's body: one whose declared length is over `max_request_bytes` is refused
/// (413) before a byte of it is read, rather than after reading up to the limit (or waiting for
/// a body that never comes); the rest is charged to the node's budget of bytes in flight and to
/// its tenant's share ([`crate::api::bodies`]) until the answer is ready, and refused if it
/// does not fit. The answer's bytes are counted too, until they are written out.
async fn admit_bodies(State(state): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let certificate = parts.extensions.get::<crate::tls::PeerTenant>();
    // A tenant acting for another (`?tenant=`) is refused as one whose credentials fail.
    let query_tenant = services::query_tenant(parts.uri.query());
    let caller = caller(&state, &parts.headers, query_tenant.as_deref(), certificate);
    if axum::body::HttpBody::size_hint(&body).lower() > state.options.max_body_bytes as u64 {
        // A client whose credentials fail learns that, not the node's limits.
        return match caller {
            Err(e) => e.into_response(),
            Ok(_) => StatusCode::PAYLOAD_TOO_LARGE.into_response(),
        };
    }
    // Hyper decodes chunked and nothing else: a body in another transfer coding would be read
    // as sent, misread. RFC 9112 asks for 501.
    if let Some(coding) = transfer_coding(&parts.headers) {
        return match caller {
            Err(e) => e.into_response(),
            Ok(_) => Error::new(
                ErrorKind::NotImplemented,
                format!("the node reads bodies only as sent or chunked: Transfer-Encoding {coding} is not supported; send the body without it"),
            )
            .into_response(),
        };
    }
    // Only a body is decoded: a GET or probe that sends the header with none is served.
    if let Some(coding) = content_coding(&parts.headers).filter(|_| !axum::body::HttpBody::is_end_stream(&body)) {
        return match caller {
            Err(e) => e.into_response(),
            Ok(_) => {
                let refusal = Error::new(
                    ErrorKind::UnsupportedMediaType,
                    format!(
                        "the node reads bodies only as sent: Content-Encoding {coding} is not supported; send the body without it"
                    ),
                );
                // As RFC 9110 asks of a 415 for a content coding: the codings it takes.
                ([(header::ACCEPT_ENCODING, "identity")], refusal).into_response()
            }
        };
    }
    let (metered, charge) = state.bodies.meter(Payer::of(&caller), body);
    if charge.was_refused() {
        return charge.refusal().into_response();
    }
    let response = next
        .run(Request::from_parts(parts, axum::body::Body::new(metered)))
        .await;
    if charge.was_refused() {
        return charge.refusal().into_response();
    }
    response.map(|body| axum::body::Body::new(charge.meter_answer(body)))
}

/// The request's content coding, quoted, if it is one the node does not decode (any but
/// `identity`): read as if unencoded, a compressed body would be taken for something else.
fn content_coding(headers: &http::HeaderMap) -> Option<String> {
    codings_but(headers, header::CONTENT_ENCODING, "identity")
}

/// The request's transfer codings, quoted, if it has any but `chunked`, the one hyper decodes.
fn transfer_coding(headers: &http::HeaderMap) -> Option<String> {
    codings_but(headers, header::TRANSFER_ENCODING, "chunked")
}

/// The values of the coding header `name`, quoted, if they name a coding other than `known`.
fn codings_but(headers: &http::HeaderMap, name: header::HeaderName, known: &str) -> Option<String> {
    let codings = headers.get_all(name);
    let unsupported = codings.iter().any(|value| {
        value.to_str().map_or(true, |v| {
            v.split(',')
                .map(str::trim)
                .any(|c| !c.is_empty() && !c.eq_ignore_ascii_case(known))
        })
    });
    unsupported.then(|| {
        let named: Vec<String> = codings
            .iter()
            .map(|v| format!("{:?}", String::from_utf8_lossy(v.as_bytes())))
            .collect();
        named.join(", ")
    })
}

/// Refuses every new request once the node is stopping, on connections still open, as the
/// gRPC API does; `/health` answers for itself, saying the node is shutting down.
async fn refuse_when_stopping(State(state): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    if request.uri().path() != "/health"
        && let Err(e) = state.check_open()
    {
        return e.into_response();
    }
    next.run(request).await
}

/// Rewrites every error response into the JSON shape with the request id, counts the request,
/// and logs server errors.
async fn normalize_errors(State(state): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let route = ROUTES
        .iter()
        .map(|(r, _)| *r)
        .find(|r| *r == route)
        .unwrap_or("unmatched");
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut response = next.run(request).await;
    let status = response.status();
    state
        .metrics
        .http_requests
        .with_label_values(&[route, status.as_str()])
        .inc();
    let elapsed_ms = started.elapsed().as_millis() as u64;
    // A service's trap or slow call (502, 504) is its tenant's business, not the operator's:
    // at warn, any tenant could fill the node's log with its own bugs.
    if matches!(status, StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT) {
        tracing::debug!(route, %status, request_id, elapsed_ms, "the service failed the call");
    } else if route == "/health" {
        // Its 503 is its answer (degraded, stopping), once a probe: the cause is logged once
        // where it happens.
        tracing::debug!(route, %status, request_id, elapsed_ms, "health reported");
    } else if status.is_server_error() {
        tracing::warn!(route, %status, request_id, elapsed_ms, "request failed");
    }
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let ours = response.extensions_mut().remove::<ErrorBody>();
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/json");
    if ours.is_none() && json {
        // A handler's own JSON answer with an error status (`/health` while shutting down).
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let error = match ours {
        Some(ErrorBody(error)) => error,
        None => {
            // One of axum's or tower's own rejections: say the same in our words.
            let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
            let detail = String::from_utf8_lossy(&bytes).trim().to_string();
            rejection(status, route, detail, state.options.max_body_bytes)
        }
    };
    let mut value = error.json_body();
    value["request_id"] = json!(request_id);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(value.to_string()))
}

fn rejection(status: StatusCode, route: &str, detail: String, max_body_bytes: usize) -> Error {
    let or_status = |detail: String| if detail.is_empty() { status.to_string() } else { detail };
    match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let methods = ROUTES
                .iter()
                .find(|(r, _)| *r == route)
                .map(|(_, m)| *m)
                .unwrap_or_default();
            let mut allow: Vec<String> = methods.iter().map(|m| m.to_uppercase()).collect();
            // As the `Allow` header says: a route that takes GET takes HEAD too.
            if methods.contains(&"get") {
                allow.push("HEAD".into());
            }
            let message = format!("{route} does not take this method; it takes {}", allow.join(", "));
            Error::new(ErrorKind::MethodNotAllowed, message)
        }
        StatusCode::PAYLOAD_TOO_LARGE => Error::new(
            ErrorKind::PayloadTooLarge,
            format!("the request body is over this node's limit of {max_body_bytes} bytes (max_request_bytes)"),
        ),
        StatusCode::REQUEST_TIMEOUT => Error::new(ErrorKind::DeadlineExceeded, "the request did not finish in time"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => Error::new(ErrorKind::UnsupportedMediaType, detail),
        StatusCode::NOT_FOUND => Error::new(ErrorKind::NotFound, "no such route; see docs/openapi.yaml"),
        s if s.is_server_error() => Error::new(ErrorKind::Internal, or_status(detail)),
        _ => Error::new(ErrorKind::InvalidArgument, or_status(detail)),
    }
}

/// Who is calling: `Authorization`, `X-Tenant-ID` (or `?tenant=` for the admin) and a client
/// certificate's tenant, set at the TLS handshake.
pub(crate) fn caller(
    state: &ApiState,
    headers: &HeaderMap,
    query_tenant: Option<&str>,
    certificate: Option<&crate::tls::PeerTenant>,
) -> Result<Caller, Error> {
    let text = |name: &str| super::auth::header(headers, name);
    let header_tenant = text(TENANT_HEADER)?;
    if let Some(named) = query_tenant {
        crate::control::validate_tenant(named).map_err(|e| Error::invalid(format!("?tenant=: {e}")))?;
    }
    let certificate_tenant = certificate.and_then(|c| c.0.as_deref());
    let tenant = match (header_tenant, query_tenant) {
        (Some(h), Some(q)) if h != q => {
            // Who asks decides what is wrong: a tenant may not act for another, while the
            // admin said two things at once.
            let asking = state
                .auth
                .authenticate(text("authorization")?, Some(h), certificate_tenant)?;
            if let super::auth::Principal::Tenant(own) = &asking.principal {
                return Err(Error::forbidden(format!("tenant '{own}' cannot act for tenant '{q}'")));
            }
            return Err(Error::invalid(format!(
                "{TENANT_HEADER} says '{h}' but ?tenant= says '{q}'"
            )));
        }
        (Some(h), _) => Some(h),
        (None, q) => q,
    };
    state
        .auth
        .authenticate(text("authorization")?, tenant, certificate_tenant)
}

/// Authenticates and admits a request.
pub(crate) fn admit(
    state: &ApiState,
    headers: &HeaderMap,
    query_tenant: Option<&str>,
    certificate: Option<&crate::tls::PeerTenant>,
) -> Result<(Caller, Permit), Error> {
    let caller = caller(state, headers, query_tenant, certificate)?;
    let permit = state.shed.admit(&caller.principal)?;
    Ok((caller, permit))
}
