//! REST handlers for services, shutdown, health and metrics.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::admit;
use crate::api::convert::service_json;
use crate::api::ops::{self, Deploy, ListFilter};
use crate::api::{ApiState, Error, ErrorKind, REPLAYED_HEADER};
use crate::proto::Limits;
use crate::state::Status;
use crate::tls::PeerTenant;

type Certificate = Option<Extension<PeerTenant>>;

/// The parameters of a query string, refusing any not in `allowed`.
pub(super) struct Params(Vec<(String, String)>);

/// A query string's key or value, decoded as a form encodes it (`+` a space, `%XX` a byte); one
/// whose bytes are not UTF-8 is refused, not stored with replacement characters.
fn query_text(encoded: &str) -> Result<String, Error> {
    let spaced = encoded.replace('+', " ");
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(&spaced).collect();
    String::from_utf8(bytes).map_err(|_| {
        Error::invalid(format!(
            "the query string's '{}' is not UTF-8 once its %-escapes are decoded",
            crate::limits::cut_to(encoded.to_string(), 64)
        ))
    })
}

/// Part of a query value, for a message: a long one would push what the message says past
/// the cut every message gets.
fn shown(value: &str) -> String {
    crate::limits::cut_to(value.to_string(), 96)
}

/// A query parameter's number type, and the most it holds (for the error past it).
pub(super) trait Number: std::str::FromStr {
    const MAX: u64;
}

impl Number for u32 {
    const MAX: u64 = u32::MAX as u64;
}

impl Number for u64 {
    const MAX: u64 = u64::MAX;
}

impl Number for usize {
    const MAX: u64 = usize::MAX as u64;
}

/// The tenant a query names (`?tenant=`), if it names one once and readably; a route's own
/// parse refuses a query that does otherwise.
pub(super) fn query_tenant(query: Option<&str>) -> Option<String> {
    let mut named = query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(key, _)| query_text(key).is_ok_and(|k| k == "tenant"));
    match (named.next(), named.next()) {
        (Some((_, value)), None) => query_text(value).ok(),
        _ => None,
    }
}

impl Params {
    pub(super) fn parse(raw: Option<String>, allowed: &[&str]) -> Result<Params, Error> {
        let raw = raw.unwrap_or_default();
        let pairs: Vec<(String, String)> = raw
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                Ok((query_text(key)?, query_text(value)?))
            })
            .collect::<Result<_, Error>>()?;
        if let Some((unknown, _)) = pairs.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            let takes = match allowed {
                [] => "this route takes none".to_string(),
                _ => format!("this route takes: {}", allowed.join(", ")),
            };
            return Err(Error::invalid(format!(
                "unknown query parameter '{}'; {takes}",
                shown(unknown)
            )));
        }
        // Which copy would win is anyone's guess: a request that says two things is refused.
        for (i, (key, _)) in pairs.iter().enumerate() {
            if key != "label" && pairs[..i].iter().any(|(earlier, _)| earlier == key) {
                return Err(Error::invalid(format!(
                    "query parameter '{key}' is given more than once"
                )));
            }
        }
        Ok(Params(pairs))
    }

    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub(super) fn number<T: Number>(&self, key: &str) -> Result<Option<T>, Error> {
        self.number_at_most(key, T::MAX)
    }

    /// A number of type `T` that may be at most `max` (a route's own bound, named in the
    /// refusal of a value too large for `T` too).
    pub(super) fn number_at_most<T: Number>(&self, key: &str, max: u64) -> Result<Option<T>, Error> {
        self.get(key)
            .map(|v| {
                let too_large = !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
                let parsed = v.parse::<T>().ok().filter(|_| v.parse::<u64>().is_ok_and(|n| n <= max));
                parsed.ok_or_else(|| {
                    let why = if too_large {
                        format!("is over the maximum of {max}")
                    } else {
                        "is not a whole number of 0 or more".to_string()
                    };
                    Error::invalid(format!("query parameter '{key}': '{}' {why}", shown(v)))
                })
            })
            .transpose()
    }

    pub(super) fn flag(&self, key: &str) -> Result<bool, Error> {
        match self.get(key) {
            None | Some("false" | "0") => Ok(false),
            Some("true" | "1" | "") => Ok(true),
            Some(other) => Err(Error::invalid(format!(
                "query parameter '{key}': '{}' is not true or false",
                shown(other)
            ))),
        }
    }

    /// `label=k=v` pairs; a key may appear once.
    fn labels(&self) -> Result<BTreeMap<String, String>, Error> {
        let mut labels = BTreeMap::new();
        for (_, pair) in self.0.iter().filter(|(k, _)| k == "label") {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| Error::invalid(format!("label '{pair}' is not of the form key=value")))?;
            if labels.insert(key.to_string(), value.to_string()).is_some() {
                return Err(Error::invalid(format!("label '{key}' is given more than once")));
            }
        }
        Ok(labels)
    }

    fn limits(&self) -> Result<Limits, Error> {
        Ok(Limits {
            memory_bytes: self.number("memory_bytes")?.unwrap_or(0),
            call_timeout_ms: self.number("call_timeout_ms")?.unwrap_or(0),
            cpu_ms_per_call: self.number("cpu_ms_per_call")?.unwrap_or(0),
            mailbox_capacity: self.number("mailbox_capacity")?.unwrap_or(0),
            max_restarts: self.number("max_restarts")?.unwrap_or(0),
            restart_window_ms: self.number("restart_window_ms")?.unwrap_or(0),
        })
    }
}

const LIMIT_PARAMS: [&str; 6] = [
    "memory_bytes",
    "call_timeout_ms",
    "cpu_ms_per_call",
    "mailbox_capacity",
    "max_restarts",
    "restart_window_ms",
];

fn idempotency_key(headers: &HeaderMap) -> Result<String, Error> {
    let key = crate::api::auth::single_value("Idempotency-Key", headers.get_all("idempotency-key").iter())?;
    let key = match key {
        None => return Ok(String::new()),
        Some(value) => value
            .to_str()
            .map_err(|_| Error::invalid("Idempotency-Key must be visible ASCII ('!' to '~')"))?,
    };
    crate::control::validate_idempotency_key(key)?;
    Ok(key.to_string())
}

/// The media type of the body, lower-cased (media types are case-insensitive), without
/// parameters such as `charset`.
fn content_type(headers: &HeaderMap) -> String {
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    value.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// The deploy body of `POST /services`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    service_id: String,
    #[serde(default, deserialize_with = "given")]
    wasm_base64: Option<String>,
    #[serde(default, deserialize_with = "given")]
    wat: Option<String>,
    #[serde(default)]
    limits: LimitsBody,
    #[serde(default, deserialize_with = "labels_once")]
    labels: BTreeMap<String, String>,
    /// Deploy only if the service is at this version (0: only if it does not exist).
    #[serde(default)]
    expected_version: Option<u64>,
}

/// A field that may be absent, but not `null`: as with `limits` and `labels`, a field sent
/// holds a value.
fn given<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    String::deserialize(deserializer).map(Some)
}

/// A labels object in which each key appears once: which copy would win is anyone's guess.
/// One with more labels than a service may carry is refused at the first too many, before
/// the rest of it is read: a body of millions took seconds to build as a map.
fn labels_once<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct Labels;
    impl<'de> serde::de::Visitor<'de> for Labels {
        type Value = BTreeMap<String, String>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object of string labels")
        }

        fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
            let mut labels = BTreeMap::new();
            while let Some((key, value)) = map.next_entry::<String, String>()? {
                if labels.contains_key(&key) {
                    return Err(serde::de::Error::custom(format!(
                        "label '{key}' is given more than once"
                    )));
                }
                labels.insert(key, value);
                if labels.len() > crate::control::MAX_LABELS {
                    return Err(serde::de::Error::custom(format!(
                        "more than {} labels given; at most {} are allowed",
                        crate::control::MAX_LABELS,
                        crate::control::MAX_LABELS
                    )));
                }
            }
            Ok(labels)
        }
    }
    deserializer.deserialize_map(Labels)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LimitsBody {
    memory_bytes: u64,
    call_timeout_ms: u32,
    cpu_ms_per_call: u32,
    mailbox_capacity: u32,
    max_restarts: u32,
    restart_window_ms: u32,
}

/// Refuses a body not declared JSON.
fn require_json(headers: &HeaderMap) -> Result<(), Error> {
    if content_type(headers) != "application/json" {
        return Err(Error::new(
            ErrorKind::UnsupportedMediaType,
            "send the body as Content-Type: application/json",
        ));
    }
    Ok(())
}

/// Parses a JSON body (declared so: [`require_json`]), saying where it is wrong.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    // Serde would read a struct from an array of its fields in order too; the API's bodies are
    // objects, with named fields.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Error::invalid("malformed JSON: the body must be a JSON object ({...})"));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let at = if path == "." {
            String::new()
        } else {
            format!(" at '{path}'")
        };
        Error::invalid(format!("malformed JSON{at} {}", json_problem(&inner)))
    })?;
    // One document: anything after it (a second object, stray brackets) is refused, not ignored.
    deserializer
        .end()
        .map_err(|e| Error::invalid(format!("malformed JSON {}", json_problem(&e))))?;
    Ok(parsed)
}

/// `(line L, column C): what`, the position given once: serde_json's own words end with it.
fn json_problem(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    let what = text.strip_suffix(&suffix).unwrap_or(&text);
    format!("(line {}, column {}): {what}", error.line(), error.column())
}

pub(super) async fn deploy_json(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    certificate: Certificate,
    request: axum::extract::Request,
) -> Result<Response, Error> {
    let params = Params::parse(query, &["tenant"])?;
    let (caller, _permit) = admit(&state, &headers, params.get("tenant"), certificate.as_deref())?;
    require_json(&headers)?;
    let idempotency_key = idempotency_key(&headers)?;
    let body = match read_body(request).await {
        Ok(body) => body,
        Err(refused) => return Ok(refused),
    };
    let body: DeployBody = parse_json(&body)?;
    let module: Arc<[u8]> = match (body.wasm_base64, body.wat) {
        (Some(b64), None) => {
            let wasm = base64::engine::general_purpose::STANDARD
                .decode(b64.split_ascii_whitespace().collect::<String>())
                .map_err(|e| Error::invalid(format!("wasm_base64 is not valid base64: {e}")))?;
            ops::require_wasm_binary(&wasm, "`wasm_base64`", "the `wat` field")?;
            wasm.into()
        }
        (None, Some(wat)) => wat.into_bytes().into(),
        _ => return Err(Error::invalid("give exactly one of wasm_base64 and wat")),
    };
    let l = body.limits;
    let limits = Limits {
        memory_bytes: l.memory_bytes,
        call_timeout_ms: l.call_timeout_ms,
        cpu_ms_per_call: l.cpu_ms_per_call,
        mailbox_capacity: l.mailbox_capacity,
        max_restarts: l.max_restarts,
        restart_window_ms: l.restart_window_ms,
    };
    let deploy = Deploy {
        service_id: body.service_id,
        module,
        limits,
        labels: body.labels,
        idempotency_key,
        expected_version: body.expected_version,
    };
    deployed(&state, &caller, deploy).await
}

pub(super) async fn deploy_raw(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    certificate: Certificate,
    request: axum::extract::Request,
) -> Result<Response, Error> {
    let mut allowed = vec!["tenant", "label", "expected_version"];
    allowed.extend(LIMIT_PARAMS);
    let params = Params::parse(query, &allowed)?;
    let (caller, _permit) = admit(&state, &headers, params.get("tenant"), certificate.as_deref())?;
    let content_type = content_type(&headers);
    match content_type.as_str() {
        // None said (`curl -T`): octet-stream, as RFC 9110 lets a recipient assume.
        "application/wasm" | "application/octet-stream" | "text/plain" | "text/wat" | "" => {}
        // curl --data-binary sends this by default: taken for a wasm binary (checked below).
        "application/x-www-form-urlencoded" => {}
        other => return Err(not_a_module(other)),
    }
    // The rest of what the request line and headers say, checked before the body is read.
    crate::control::validate_service_id(&id)?;
    let (limits, labels) = (params.limits()?, params.labels()?);
    crate::control::validate_labels(&labels)?;
    let idempotency_key = idempotency_key(&headers)?;
    let expected_version = params.number("expected_version")?;
    let body = match read_body(request).await {
        Ok(body) => body,
        Err(refused) => return Ok(refused),
    };
    match content_type.as_str() {
        // Declared a binary: WAT text sent this way would be taken for one and fail oddly.
        "application/wasm" => ops::require_wasm_binary(
            &body,
            "a body sent as Content-Type: application/wasm",
            "a body sent as Content-Type: text/plain",
        )?,
        "application/x-www-form-urlencoded" if !body.starts_with(b"\0asm") => {
            return Err(not_a_module(&content_type));
        }
        _ => {}
    }
    let deploy = Deploy {
        service_id: id,
        module: Arc::from(body.as_ref()),
        limits,
        labels,
        idempotency_key,
        expected_version,
    };
    deployed(&state, &caller, deploy).await
}

fn not_a_module(content_type: &str) -> Error {
    Error::new(
        ErrorKind::UnsupportedMediaType,
        format!(
            "Content-Type '{content_type}' is not a module: send Content-Type: application/wasm (or text/plain for WAT)"
        ),
    )
}

/// The body of `request`, read once what its headers settle has been checked: a refusal they
/// decide is answered before the client sends the body (it waits, with `Expect: 100-continue`)
/// rather than after the node has read all of it. Refusals of the body itself (over the limit,
/// no room in the budget) are answered as the body extractor answers them.
async fn read_body(request: axum::extract::Request) -> Result<Bytes, Response> {
    use axum::extract::FromRequest as _;
    Bytes::from_request(request, &())
        .await
        .map_err(IntoResponse::into_response)
}

async fn deployed(state: &ApiState, caller: &crate::api::Caller, deploy: Deploy) -> Result<Response, Error> {
    let outcome = ops::deploy(state, caller, deploy).await?;
    let mut body = match ops::deployed_status(state, caller, &outcome)? {
        Some(service) => service_json(&service),
        // A replay of a deploy whose service was removed since: its answer, without a service.
        None => json!({ "service_id": outcome.service_id, "tenant": caller.tenant(), "removed": true }),
    };
    body["deploy"] = json!({
        "version": outcome.version,
        "seq": outcome.seq,
        "created": outcome.created,
        "unchanged": outcome.unchanged,
        "module_sha256": outcome.module_sha256,
    });
    let status = if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut response = (status, Json(body)).into_response();
    if outcome.created {
        // With its tenant, as Kubernetes puts the namespace in an object's path: to the admin
        // (or in development mode, to no one in particular) the bare id names the default
        // tenant's service. Any caller that may see the service may name its tenant. Ids and
        // tenant names need no escaping.
        let location = format!("/services/{}?tenant={}", outcome.service_id, caller.tenant());
        if let Ok(value) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, value);
        }
    }
    Ok(marked_replayed(response, outcome.replayed))
}

pub(super) async fn list(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    certificate: Certificate,
) -> Result<Json<ServicePage>, Error> {
    let params = Params::parse(query, &["tenant", "status", "label", "limit", "offset", "page_token"])?;
    let (caller, _permit) = admit(&state, &headers, params.get("tenant"), certificate.as_deref())?;
    let (status, labels) = (params.get("status").unwrap_or(""), params.labels()?);
    let listing_id = ops::listing_fingerprint(caller.scope(), status, &labels);
    let filter = ListFilter::new(status, labels)?;
    let limit = ops::page_size(params.number_at_most("limit", ops::MAX_PAGE_SIZE)?.unwrap_or(0))?;
    let after = ops::decode_page_token(params.get("page_token").unwrap_or(""), &listing_id, caller.scope())?;
    if after.is_some() && params.get("offset").is_some() {
        return Err(Error::invalid(
            "give `page_token` or `offset`, not both: the token says where its page starts",
        ));
    }
    let listing = ops::list(&state, &caller, &filter);
    // A token resumes after the service it names, wherever the services added or removed since
    // have moved it in the listing; an offset counts from the listing's start as it is now.
    let offset: usize = match &after {
        Some((tenant, id)) => listing.services.partition_point(|s| (&s.tenant, &s.id) <= (tenant, id)),
        None => params.number("offset")?.unwrap_or(0),
    };
    // Each service is encoded once, as it is measured against the page's bytes (with the comma
    // after it).
    let (page, last) = ops::fill_page(listing.services.iter().skip(offset), limit, ops::MAX_PAGE_BYTES, |s| {
        let text = service_json(&ops::service_status(&state, s)).to_string();
        let size = text.len() + 1;
        (text, size)
    });
    let next_offset = last.map(|_| offset + page.len());
    let next_page_token = last.map(|s| ops::encode_page_token(&listing_id, &s.tenant, &s.id));
    let services = page
        .into_iter()
        .map(RawValue::from_string)
        .collect::<Result<_, _>>()
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    Ok(Json(ServicePage {
        total: listing.services.len(),
        limit,
        offset,
        next_offset,
        next_page_token,
        head_seq: listing.seq,
        services,
    }))
}

/// A page of `GET /services`.
#[derive(Debug, serde::Serialize)]
pub(super) struct ServicePage {
    services: Vec<Box<RawValue>>,
    total: usize,
    limit: usize,
    /// Where this page starts in the listing as it is now.
    offset: usize,
    /// Where the next page starts in the listing as it is now, if any services are past this
    /// one: a page may hold fewer than `limit` ([`ops::MAX_PAGE_BYTES`]). Services added or
    /// removed before it shift it.
    next_offset: Option<usize>,
    /// Resumes after the last service of this page, whatever is added or removed meanwhile:
    /// paging with it sees every service that exists throughout exactly once.
    next_page_token: Option<String>,
    head_seq: u64,
}

pub(super) async fn status(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    certificate: Certificate,
) -> Result<Json<Value>, Error> {
    let params = Params::parse(query, &["tenant"])?;
    let (caller, _permit) = admit(&state, &headers, params.get("tenant"), certificate.as_deref())?;
    let service = state.control.status(caller.tenant(), &id)?;
    let mut body = service_json(&ops::service_status(&state, &service));
    let control = state.control.clone();
    let seqs = service.recent_seqs;
    let events = tokio::task::spawn_blocking(move || {
        seqs.iter()
            .map(|seq| control.log().read(seq..=seq).map(|events| events.into_iter().next()))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))??;
    body["events"] = events
        .into_iter()
        .flatten()
        .map(|e| crate::event::to_json(&e))
        .collect();
    Ok(Json(body))
}

pub(super) async fn kill(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    certificate: Certificate,
) -> Result<Response, Error> {
    let params = Params::parse(query, &["tenant", "force", "grace_ms", "expected_version", "purge"])?;
    let (caller, _permit) = admit(&state, &headers, params.get("tenant"), certificate.as_deref())?;
    if params.flag("purge")? {
        if params.flag("force")? || params.number::<u32>("grace_ms")?.unwrap_or(0) > 0 {
            return Err(Error::invalid(
                "purge removes a stopped service and stops nothing: it takes no force or grace_ms",
            ));
        }
        let remove = ops::Remove {
            service_id: id.clone(),
            idempotency_key: idempotency_key(&headers)?,
            expected_version: params.number("expected_version")?,
        };
        let outcome = ops::remove(&state, &caller, remove).await?;
        let body = json!({ "service_id": id, "seq": outcome.seq, "removed": true });
        return Ok(marked_replayed(Json(body).into_response(), outcome.replayed));
    }
    let kill = ops::Kill {
        service_id: id.clone(),
        force: params.flag("force")?,
        grace_ms: params.number("grace_ms")?.unwrap_or(0),
        idempotency_key: idempotency_key(&headers)?,
        expected_version: params.number("expected_version")?,
    };
    let outcome = ops::kill(&state, &caller, kill).await?;
    let body = json!({ "service_id": id, "seq": outcome.seq, "already_stopped": outcome.already_stopped });
    Ok(marked_replayed(
        (StatusCode::ACCEPTED, Json(body)).into_response(),
        outcome.replayed,
    ))
}

/// Marks the answer to a retry with a known idempotency key, whose body is the original one.
fn marked_replayed(mut response: Response, replayed: bool) -> Response {
    if replayed {
        response
            .headers_mut()
            .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    response
}

pub(super) async fn call(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    certificate: Certificate,
    request: axum::extract::Request,
) -> Result<Response, Error> {
    let params = Params::parse(query, &["tenant", "timeout_ms"])?;
    let (caller, _permit) = admit(&state, &headers, params.get("tenant"), certificate.as_deref())?;
    let timeout_ms = params.number("timeout_ms")?.unwrap_or(0);
    // A call to no service (or another tenant's) is answered before its payload is read.
    ops::check_callable(&state, &caller, &id)?;
    let body = match read_body(request).await {
        Ok(body) => body,
        Err(refused) => return Ok(refused),
    };
    let response = ops::call(&state, &caller, &id, body.to_vec(), timeout_ms).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], response).into_response())
}

pub(super) async fn shutdown(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    certificate: Certificate,
) -> Result<Response, Error> {
    let caller = super::caller(&state, &headers, None, certificate.as_deref())?;
    // Authorized before the query is read, so a tenant learns nothing but "no", as over gRPC.
    caller.require_admin("shut the node down")?;
    let params = Params::parse(query, &["grace_ms"])?;
    let seq = ops::shutdown(&state, &caller, params.number("grace_ms")?.unwrap_or(0)).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "seq": seq }))).into_response())
}

/// `GET /backup` (admin only): a copy of the data file, as `application/octet-stream`. A copy
/// that fails cuts the body off before its end, so that no client takes it for a whole file.
pub(super) async fn backup(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    certificate: Certificate,
) -> Result<Response, Error> {
    let caller = super::caller(&state, &headers, None, certificate.as_deref())?;
    // Authorized before the query is read, as /shutdown is.
    caller.require_admin("take a backup")?;
    Params::parse(query, &[])?;
    let pieces = futures_util::StreamExt::filter_map(ops::backup(&state, &caller).await?, |piece| {
        std::future::ready(match piece {
            Ok(ops::BackupPiece::Bytes(bytes)) => Some(Ok(bytes)),
            Ok(ops::BackupPiece::End { .. }) => None,
            Err(e) => Some(Err(std::io::Error::other(e.message().to_string()))),
        })
    });
    let headers = [
        (header::CONTENT_TYPE, "application/octet-stream"),
        (header::CONTENT_DISPOSITION, "attachment; filename=\"data.mdb\""),
        (header::CACHE_CONTROL, "no-store"),
    ];
    Ok((headers, axum::body::Body::from_stream(pieces)).into_response())
}

pub(super) async fn health(State(state): State<Arc<ApiState>>) -> Response {
    let stopping = state.stopping.is_cancelled() || state.control.is_shutting_down();
    // As etcd's NOSPACE alarm: a node whose log takes no writes is not healthy, though reads
    // and calls still work.
    let log_error = state.control.log_failure();
    let status = match (stopping, &log_error) {
        (true, _) => "shutting_down",
        (false, Some(_)) => "degraded",
        (false, None) => "ok",
    };
    let body = json!({
        "status": status,
        "version": crate::VERSION,
        "uptime_ms": state.started.elapsed().as_millis() as u64,
        "head_seq": state.control.head(),
        "services_running": state.control.runtime().map_or(0, |r| r.running_instances()),
        // Services that came back with the node and are still starting (compiling, say).
        "services_recovering": state.control.runtime().map_or(0, |r| r.recovering()),
        // What the runtime saw but the log could not take yet (a full disk): statuses lag.
        "unrecorded_observations": state.control.runtime().map_or(0, |r| r.unrecorded_observations()),
        "log_error": log_error,
        // Damage to the history before the snapshot the node started from: it serves on.
        "history_error": state.control.history_damage(),
    });
    let code = if status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

pub(super) async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    let mut counts: HashMap<Status, i64> = HashMap::new();
    state.control.read_state(|s| {
        for service in s.services() {
            *counts.entry(service.status).or_default() += 1;
        }
    });
    for status in Status::ALL {
        state
            .metrics
            .services
            .with_label_values(&[status.as_str()])
            .set(counts.get(&status).copied().unwrap_or(0));
    }
    state.metrics.log_head_seq.set(state.control.head() as i64);
    state
        .metrics
        .log_history_damaged
        .set(i64::from(state.control.history_damage().is_some()));
    let runtime = state.control.runtime();
    let unrecorded = runtime.map_or(0, |r| r.unrecorded_observations());
    state.metrics.unrecorded_observations.set(unrecorded as i64);
    let instances = runtime.map_or(0, |r| r.live_instances());
    state
        .metrics
        .instances
        .set(i64::try_from(instances).unwrap_or(i64::MAX));
    state
        .metrics
        .body_bytes_in_flight
        .set(i64::try_from(state.bodies.held()).unwrap_or(i64::MAX));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}
