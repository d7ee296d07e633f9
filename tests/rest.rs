//! The REST API and Server-Sent Events, end to end: a real node on port 0, a real HTTP client
//! (reqwest) and a real SSE parser (eventsource-stream). Every route's success and error paths,
//! the error shape, authentication, tenant isolation, SSE framing and resumption, parity with
//! gRPC, and `docs/openapi.yaml` against the router's route table.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use eventsource_stream::Eventsource as _;
use futures_util::{Stream, StreamExt as _};
use reqwest::header::HeaderMap;
use reqwest::{Client, Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};
use solo::config::{Config, TenantConfig};
use tempfile::TempDir;

/// A guard against hangs: nothing a test waits for should take this long.
const DEADLINE: Duration = Duration::from_secs(20);

/// The fields of a service, exactly as `service_json` builds them.
const SERVICE_FIELDS: [&str; 19] = [
    "service_id",
    "tenant",
    "version",
    "status",
    "module_sha256",
    "labels",
    "limits",
    "created_at_ms",
    "updated_at_ms",
    "restarts",
    "memory_bytes",
    "calls",
    "calls_failed",
    "last_error",
    "uptime_ms",
    "cpu_ms",
    "module_size",
    "desired",
    "last_seq",
];

/// Fields of a service that depend on the clock rather than on what was done.
const TIME_FIELDS: [&str; 4] = ["created_at_ms", "updated_at_ms", "uptime_ms", "cpu_ms"];

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn client() -> Client {
    Client::builder().no_proxy().build().expect("an HTTP client")
}

fn wat_text(name: &str) -> String {
    String::from_utf8(example(name).to_vec()).expect("examples are UTF-8")
}

fn wasm_bytes(name: &str) -> Vec<u8> {
    wat::parse_str(wat_text(name)).expect("the example compiles")
}

/// A node serving on port 0 in its own data directory, and a client of it.
struct Node {
    server: solo::server::Server,
    http: Client,
    base: String,
    _dir: TempDir,
}

/// One HTTP answer, read whole.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    bytes: Vec<u8>,
    /// The body as JSON, `Null` if it is not JSON.
    json: Value,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts a JSON error of `status` and `code` in the documented shape, with the request id
    /// that the `X-Request-Id` header carries; returns its message.
    #[track_caller]
    fn error(&self, status: u16, code: &str) -> &str {
        assert_eq!(self.status.as_u16(), status, "{self:?}");
        assert!(
            self.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{self:?}"
        );
        let keys: BTreeSet<&str> = self
            .json
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, BTreeSet::from(["error", "message", "request_id"]), "{self:?}");
        assert_eq!(self.json["error"], code, "{self:?}");
        let request_id = self.json["request_id"].as_str().expect("request_id is a string");
        assert!(!request_id.is_empty(), "{self:?}");
        assert_eq!(self.header("x-request-id"), Some(request_id), "{self:?}");
        let message = self.json["message"].as_str().expect("message is a string");
        assert!(!message.is_empty(), "{self:?}");
        message
    }

    #[track_caller]
    fn ok(&self, status: u16) -> &Value {
        assert_eq!(self.status.as_u16(), status, "{self:?}");
        &self.json
    }
}

async fn send(request: RequestBuilder) -> Reply {
    let response = tokio::time::timeout(DEADLINE, request.send())
        .await
        .expect("the request is answered in time")
        .expect("the request is answered");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("the body reads").to_vec();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        bytes,
        json,
    }
}

/// A parsed SSE stream.
type SseStream = Pin<
    Box<
        dyn Stream<Item = Result<eventsource_stream::Event, eventsource_stream::EventStreamError<reqwest::Error>>>
            + Send,
    >,
>;

/// One dispatched SSE event: `id`, `event` and its `data` parsed as JSON. A log line's id is
/// its log's and its own, `<log>-<line>`: `id` is the line, `raw_id` the whole.
#[derive(Debug, Clone, PartialEq)]
struct Frame {
    id: u64,
    raw_id: String,
    event: String,
    data: Value,
}

/// The next event of the log, `None` when the stream ends: progress frames are passed over,
/// as an EventSource's `onmessage` and per-kind listeners pass them over.
async fn next_frame(stream: &mut SseStream) -> Option<Frame> {
    let event = loop {
        let item = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("an SSE event arrives in time")?;
        let event = item.expect("the SSE stream parses");
        if event.event != "progress" {
            break event;
        }
    };
    assert!(!event.data.contains('\n'), "data is one line: {event:?}");
    let data = serde_json::from_str(&event.data).unwrap_or_else(|e| panic!("data is not JSON ({e}): {event:?}"));
    let seq = event.id.rsplit_once('-').map_or(event.id.as_str(), |(_, line)| line);
    let id = seq.parse().unwrap_or_else(|_| panic!("the id is a seq: {event:?}"));
    Some(Frame {
        id,
        raw_id: event.id.clone(),
        event: event.event,
        data,
    })
}

/// Every event up to and including the first that `matches`.
async fn frames_until(stream: &mut SseStream, matches: impl Fn(&Frame) -> bool) -> Vec<Frame> {
    let mut frames = Vec::new();
    loop {
        let frame = next_frame(stream)
            .await
            .expect("the stream goes on until the awaited event");
        let done = matches(&frame);
        frames.push(frame);
        if done {
            return frames;
        }
    }
}

fn is_event(frame: &Frame, service_id: &str, kind: &str) -> bool {
    frame.data["service_id"] == service_id && frame.data["kind"] == kind
}

/// An SSE stream read as raw frames (lines up to a blank line), to see what a parser hides:
/// comments, and each line as sent.
struct RawSse {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Vec<u8>>> + Send>>,
    buffer: Vec<u8>,
}

impl RawSse {
    fn new(response: reqwest::Response) -> RawSse {
        RawSse {
            body: Box::pin(response.bytes_stream().map(|chunk| chunk.map(|b| b.to_vec()))),
            buffer: Vec::new(),
        }
    }

    async fn next_frame(&mut self) -> Vec<String> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.buffer.drain(..end + 2).take(end).collect();
                let text = String::from_utf8(frame).expect("SSE is UTF-8");
                return text.lines().map(str::to_string).collect();
            }
            let chunk = tokio::time::timeout(DEADLINE, self.body.next())
                .await
                .expect("an SSE frame arrives in time")
                .expect("the stream stays open")
                .expect("the stream reads");
            self.buffer.extend_from_slice(&chunk);
        }
    }
}

async fn node(tweak: impl FnOnce(&mut Config)) -> Node {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = start_server(dir.path(), tweak).await;
    let base = server.http_url();
    Node {
        server,
        http: client(),
        base,
        _dir: dir,
    }
}

async fn dev_node() -> Node {
    node(|_| {}).await
}

impl Node {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request acting as `tenant` in development mode (`""`: no header, the admin).
    fn request(&self, method: Method, path: &str, tenant: &str) -> RequestBuilder {
        let request = self.http.request(method, self.url(path));
        if tenant.is_empty() {
            request
        } else {
            request.header("x-tenant-id", tenant)
        }
    }

    async fn get(&self, path: &str, tenant: &str) -> Reply {
        send(self.request(Method::GET, path, tenant)).await
    }

    async fn delete(&self, path: &str, tenant: &str) -> Reply {
        send(self.request(Method::DELETE, path, tenant)).await
    }

    async fn post_json(&self, path: &str, tenant: &str, body: &Value) -> Reply {
        send(self.request(Method::POST, path, tenant).json(body)).await
    }

    async fn call(&self, tenant: &str, id: &str, payload: impl Into<reqwest::Body>) -> Reply {
        let path = format!("/services/{id}/call");
        send(self.request(Method::POST, &path, tenant).body(payload)).await
    }

    /// A call as tenant `a` with the caller's own deadline.
    async fn call_with_timeout(&self, id: &str, payload: &'static str, timeout_ms: u32) -> Reply {
        let path = format!("/services/{id}/call?timeout_ms={timeout_ms}");
        send(self.request(Method::POST, &path, "a").body(payload)).await
    }

    /// `POST /services` of an example as WAT.
    async fn deploy(&self, tenant: &str, id: &str, name: &str) -> Reply {
        let body = json!({ "service_id": id, "wat": wat_text(name) });
        self.post_json("/services", tenant, &body).await
    }

    /// Deploys a new service and waits until it runs; returns the deploy's answer.
    async fn deploy_running(&self, tenant: &str, id: &str, name: &str) -> Value {
        let reply = self.deploy(tenant, id, name).await;
        let body = reply.ok(201).clone();
        let seq = body["deploy"]["seq"].as_u64().expect("the deploy's seq");
        self.wait_event(tenant, seq, id, "service_started").await;
        body
    }

    /// Opens `/events` with `query` as `tenant`, resuming after `last_event_id` if given.
    async fn events(&self, query: &str, tenant: &str, last_event_id: Option<u64>) -> (HeaderMap, SseStream) {
        let mut request = self.request(Method::GET, &format!("/events{query}"), tenant);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = tokio::time::timeout(DEADLINE, request.send())
            .await
            .expect("the stream opens in time")
            .expect("the stream opens");
        assert_eq!(response.status(), StatusCode::OK, "{response:?}");
        let headers = response.headers().clone();
        (headers, Box::pin(response.bytes_stream().eventsource()))
    }

    /// Waits, by tailing `/events` from `from_seq`, for `kind` of service `id` of `tenant`.
    async fn wait_event(&self, tenant: &str, from_seq: u64, id: &str, kind: &str) -> Frame {
        let (_, mut stream) = self.events(&format!("?from={from_seq}"), tenant, None).await;
        let frames = frames_until(&mut stream, |f| is_event(f, id, kind)).await;
        frames.last().cloned().expect("at least the awaited frame")
    }

    async fn head(&self) -> u64 {
        self.get("/health", "").await.ok(200)["head_seq"]
            .as_u64()
            .expect("head_seq")
    }

    async fn metrics(&self) -> Prometheus {
        let reply = self.get("/metrics", "").await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        let content_type = reply.header("content-type").unwrap_or_default();
        assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
        Prometheus::parse(std::str::from_utf8(&reply.bytes).expect("metrics are UTF-8"))
    }

    async fn stop(self) {
        tokio::time::timeout(DEADLINE, self.server.stop())
            .await
            .expect("the node stops in time")
            .expect("the node stops cleanly");
    }
}

/// The Prometheus text format, parsed: `# HELP`, `# TYPE` and `name{labels} value` lines.
#[derive(Debug, Default)]
struct Prometheus {
    help: BTreeMap<String, String>,
    types: BTreeMap<String, String>,
    samples: BTreeMap<(String, BTreeMap<String, String>), f64>,
}

impl Prometheus {
    fn parse(text: &str) -> Prometheus {
        let mut parsed = Prometheus::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                parsed.help.insert(name.to_string(), help.to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("line {n}: {line}"));
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "line {n}: {line}"
                );
                parsed.types.insert(name.to_string(), kind.to_string());
            } else if line.starts_with('#') {
                continue;
            } else {
                let (name, labels, rest) = Prometheus::sample(line).unwrap_or_else(|| panic!("line {n}: {line}"));
                let value = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_else(|| panic!("line {n}: {line}"));
                let value: f64 = value
                    .parse()
                    .unwrap_or_else(|_| panic!("line {n}: bad value in {line}"));
                parsed.samples.insert((name, labels), value);
            }
        }
        parsed
    }

    /// `name{k="v",...} rest` into its parts.
    fn sample(line: &str) -> Option<(String, BTreeMap<String, String>, &str)> {
        let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
        let name = &line[..name_end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            return None;
        }
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            loop {
                while chars.next_if(|(_, c)| *c == ',' || *c == ' ').is_some() {}
                let (start, c) = chars.next()?;
                if c == '}' {
                    rest = &inner[start + 1..];
                    break;
                }
                let mut key_end = start;
                for (i, c) in chars.by_ref() {
                    if c == '=' {
                        key_end = i;
                        break;
                    }
                }
                let key = inner[start..key_end].to_string();
                if chars.next()?.1 != '"' {
                    return None;
                }
                let mut value = String::new();
                loop {
                    match chars.next()?.1 {
                        '\\' => match chars.next()?.1 {
                            'n' => value.push('\n'),
                            other => value.push(other),
                        },
                        '"' => break,
                        other => value.push(other),
                    }
                }
                labels.insert(key, value);
            }
        }
        Some((name.to_string(), labels, rest.trim_start()))
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples
            .get(&(name.to_string(), labels.clone()))
            .copied()
            .unwrap_or(0.0)
    }

    /// The metric family a sample belongs to (histograms expose `_bucket`, `_sum`, `_count`).
    fn family<'a>(&self, sample: &'a str) -> Option<&'a str> {
        if self.types.contains_key(sample) {
            return Some(sample);
        }
        ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| sample.strip_suffix(suffix))
            .find(|base| {
                self.types
                    .get(*base)
                    .is_some_and(|t| t == "histogram" || t == "summary")
            })
    }
}

fn tokens_config(config: &mut Config) -> (String, String) {
    let (admin_token, admin_hash) = solo::api::auth::new_token().expect("a token");
    let (acme_token, acme_hash) = solo::api::auth::new_token().expect("a token");
    config.security.admin_token_sha256 = vec![admin_hash];
    config.tenants.insert(
        "acme".into(),
        TenantConfig {
            token_sha256: vec![acme_hash],
            limits: None,
        },
    );
    (admin_token, acme_token)
}

// ---------------------------------------------------------------------------------------------
// Services: deploy, list, status, kill
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_services_creates_upgrades_and_recognises_identical_modules() {
    let node = dev_node().await;
    // WAT in JSON: a new service.
    let created = node.deploy("a", "echo", "echo").await;
    let body = created.ok(201);
    assert_eq!(created.header("location"), Some("/services/echo?tenant=a"));
    assert_eq!(node.get("/services/echo?tenant=a", "a").await.ok(200)["tenant"], "a");
    // A deploy for a tenant is found where its Location says by anyone who may see it, the
    // admin too: in that tenant, not in the default one, which the bare path names to the admin.
    let for_b = node
        .request(Method::POST, "/services?tenant=b", "")
        .json(&json!({ "service_id": "echo", "wat": wat_text("kv") }));
    let for_b = send(for_b).await;
    for_b.ok(201);
    let location = for_b.header("location").expect("a location").to_string();
    assert_eq!(location, "/services/echo?tenant=b");
    assert_eq!(node.get("/services/echo", "").await.status, StatusCode::NOT_FOUND);
    assert_eq!(node.get(&location, "").await.ok(200)["tenant"], "b");
    let keys: BTreeSet<&str> = body.as_object().unwrap().keys().map(String::as_str).collect();
    let mut expected: BTreeSet<&str> = SERVICE_FIELDS.into_iter().collect();
    expected.insert("deploy");
    assert_eq!(keys, expected);
    assert_eq!(
        (body["service_id"].as_str(), body["tenant"].as_str()),
        (Some("echo"), Some("a"))
    );
    assert_eq!(body["version"], 1);
    let deploy = &body["deploy"];
    assert_eq!(
        (deploy["created"].as_bool(), deploy["unchanged"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(deploy["version"], 1);
    let sha = deploy["module_sha256"].as_str().unwrap().to_string();
    assert!(sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()), "{sha}");
    assert_eq!(body["module_sha256"], sha.as_str());
    let seq = deploy["seq"].as_u64().unwrap();
    node.wait_event("a", seq, "echo", "service_started").await;

    // The same module as a binary: recognised as identical (the hash is of the wasm).
    let wasm = base64::engine::general_purpose::STANDARD.encode(wasm_bytes("echo"));
    let same = node
        .post_json("/services", "a", &json!({ "service_id": "echo", "wasm_base64": wasm }))
        .await;
    let body = same.ok(200);
    assert_eq!(same.header("location"), None);
    assert_eq!(body["deploy"]["unchanged"], true);
    assert_eq!(body["deploy"]["created"], false);
    assert_eq!(
        (body["version"].as_u64(), body["deploy"]["seq"].as_u64()),
        (Some(1), Some(seq))
    );

    // Another module as a binary, with limits and labels: an upgrade.
    let counter = base64::engine::general_purpose::STANDARD.encode(wasm_bytes("counter"));
    let upgraded = node
        .post_json(
            "/services",
            "a",
            &json!({
                "service_id": "echo",
                "wasm_base64": counter,
                "limits": { "memory_bytes": 2 << 20, "call_timeout_ms": 3000 },
                "labels": { "team": "red" },
            }),
        )
        .await;
    let body = upgraded.ok(200);
    assert_eq!(
        (
            body["deploy"]["created"].as_bool(),
            body["deploy"]["unchanged"].as_bool()
        ),
        (Some(false), Some(false))
    );
    assert_eq!(
        (body["version"].as_u64(), body["deploy"]["version"].as_u64()),
        (Some(2), Some(2))
    );
    assert_ne!(body["module_sha256"], sha.as_str());
    assert_eq!(body["limits"]["memory_bytes"], 2 << 20);
    assert_eq!(body["limits"]["call_timeout_ms"], 3000);
    assert_eq!(body["labels"], json!({ "team": "red" }));
    assert!(body["deploy"]["seq"].as_u64().unwrap() > seq);

    // Idempotency-Key: a retry gets the original answer; the key reused for another deploy is a conflict.
    let keyed = |id: &str| {
        node.request(Method::POST, "/services", "a")
            .header("idempotency-key", "deploy-kv-1")
            .json(&json!({ "service_id": id, "wat": wat_text("kv") }))
    };
    let first = send(keyed("kv")).await;
    let retried = send(keyed("kv")).await;
    assert_eq!(first.ok(201)["deploy"], retried.ok(201)["deploy"]);
    assert_eq!(retried.json["version"], 1);
    // The retry's answer says it is a replay; the first's does not.
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(retried.header("idempotent-replayed"), Some("true"));
    send(keyed("other")).await.error(422, "idempotency_key_reused");
    // A retry after the service was removed still gets its answer, which says so.
    let killed = node.delete("/services/kv?force=true", "a").await;
    let seq = killed.ok(202)["seq"].as_u64().unwrap();
    node.wait_event("a", seq, "kv", "service_stopped").await;
    node.delete("/services/kv?purge=true", "a").await.ok(200);
    let late = send(keyed("kv")).await;
    assert_eq!(late.ok(201)["deploy"], first.json["deploy"]);
    assert_eq!(
        (late.json["removed"].as_bool(), late.header("idempotent-replayed")),
        (Some(true), Some("true"))
    );
    // So does one after the id was deployed anew, whatever version the new service is at: the
    // answer is not passed off as the new service's.
    for key in ["anew-1", "anew-2"] {
        let anew = node
            .request(Method::POST, "/services", "a")
            .header("idempotency-key", key)
            .json(
                &json!({ "service_id": "kv", "wat": if key == "anew-1" { wat_text("kv") } else { wat_text("echo") } }),
            );
        send(anew).await;
        let late = send(keyed("kv")).await;
        assert_eq!(late.ok(201)["deploy"], first.json["deploy"]);
        assert_eq!(
            (late.json["removed"].as_bool(), late.json.get("created_at_ms")),
            (Some(true), None),
            "{}",
            late.json
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_services_refuses_bad_deploys_with_reasons() {
    let node = dev_node().await;
    let echo = wat_text("echo");
    let b64 = base64::engine::general_purpose::STANDARD.encode(wasm_bytes("echo"));
    let cases: [(Value, &str); 8] = [
        (
            json!({ "service_id": "x", "wat": echo, "wasm_base64": b64 }),
            "exactly one",
        ),
        // A field sent holds a value: null is not taken for absent.
        (
            json!({ "service_id": "x", "wat": echo, "wasm_base64": null }),
            "at 'wasm_base64'",
        ),
        (json!({ "service_id": "x" }), "exactly one"),
        (json!({ "service_id": "x", "wasm_base64": "%%% not base64" }), "base64"),
        (json!({ "service_id": "x", "wat": "(module (func" }), "WAT syntax error"),
        (
            json!({ "service_id": "x", "wat": wat_text("forbidden_import") }),
            "wasi_snapshot_preview1.fd_write', which is not granted",
        ),
        (json!({ "service_id": "x", "wat": echo, "colour": "blue" }), "colour"),
        (
            json!({ "service_id": "Not A Valid Id!", "wat": echo }),
            "invalid service id",
        ),
    ];
    for (body, needle) in cases {
        let reply = node.post_json("/services", "a", &body).await;
        let message = reply.error(400, "invalid_argument");
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }
    // A module without the required exports names the export.
    let reply = node
        .post_json(
            "/services",
            "a",
            &json!({ "service_id": "x", "wat": "(module (memory (export \"memory\") 1))" }),
        )
        .await;
    assert!(reply.error(400, "invalid_argument").contains("solo_alloc"), "{reply:?}");
    // Not JSON at all.
    let reply = send(
        node.request(Method::POST, "/services", "a")
            .header("content-type", "text/plain")
            .body(echo.clone()),
    )
    .await;
    assert!(reply.error(415, "unsupported_media_type").contains("application/json"));
    // A content coding the node does not decode: read as sent, the body would be misread.
    let body = json!({ "service_id": "x", "wat": echo }).to_string();
    for coding in ["br", "gzip, identity"] {
        let reply = send(
            node.request(Method::POST, "/services", "a")
                .header("content-type", "application/json")
                .header("content-encoding", coding)
                .body(body.clone()),
        )
        .await;
        let message = reply.error(415, "unsupported_media_type");
        assert!(
            message.contains("Content-Encoding") && message.contains(coding),
            "{message}"
        );
        assert_eq!(reply.header("accept-encoding"), Some("identity"));
    }
    // Without a body there is nothing to decode.
    let reply = send(
        node.request(Method::GET, "/services", "a")
            .header("content-encoding", "gzip"),
    )
    .await;
    assert_eq!(reply.ok(200)["total"], 0);
    // Nor a transfer coding but chunked, which is all the HTTP layer decodes: 501, as RFC 9112
    // asks.
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let address = node.base.trim_start_matches("http://").to_string();
        let mut raw = tokio::net::TcpStream::connect(&address).await.unwrap();
        let request = format!(
            "POST /services HTTP/1.1\r\nhost: solo\r\nx-tenant-id: a\r\ncontent-type: application/json\r\n\
             transfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        );
        raw.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(DEADLINE, raw.read_to_end(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
        assert!(
            answer.contains("not_implemented") && answer.contains("gzip"),
            "{answer}"
        );
    }
    let reply = node
        .post_json("/services?colour=blue", "a", &json!({ "service_id": "x", "wat": echo }))
        .await;
    assert!(reply.error(400, "invalid_argument").contains("colour"));
    // Nothing was deployed by any of these.
    assert_eq!(node.get("/services", "a").await.ok(200)["total"], 0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_400_and_says_where() {
    let node = dev_node().await;
    let raw = |text: &'static str| {
        node.request(Method::POST, "/services", "a")
            .header("content-type", "application/json")
            .body(text)
    };
    let reply = send(raw("{\"service_id\": \"x\",\n  \"wat\": }")).await;
    let message = reply.error(400, "invalid_argument");
    // The position, once.
    assert!(
        message.contains("(line 2, column 10): expected value") && message.matches("line").count() == 1,
        "{message}"
    );
    let reply = send(raw("{\"service_id\": 5, \"wat\": \"(module)\"}")).await;
    let message = reply.error(400, "invalid_argument");
    assert!(
        message.contains("service_id") && message.contains("column"),
        "{message}"
    );
    let reply = send(raw(
        "{\"service_id\": \"x\", \"wat\": \"\", \"limits\": {\"memory_bytes\": \"big\"}}",
    ))
    .await;
    let message = reply.error(400, "invalid_argument");
    assert!(message.contains("limits.memory_bytes"), "{message}");
    let reply = send(raw("")).await;
    assert!(reply.error(400, "invalid_argument").contains("malformed JSON"));
    // One document only: a second one after it, or stray characters, are refused, not ignored.
    for trailing in ["{\"service_id\": \"y\"}", "]]]", "\0garbage"] {
        let body = format!("{{\"service_id\": \"x\", \"wat\": \"(module)\"}}{trailing}");
        let reply = send(
            node.request(Method::POST, "/services", "a")
                .header("content-type", "application/json")
                .body(body),
        )
        .await;
        let message = reply.error(400, "invalid_argument");
        assert!(message.contains("trailing characters"), "{message}");
    }
    // An array of the fields in order is not the object the API takes.
    let reply = send(raw("[\"arr\", null, \"(module)\", {}, {}]")).await;
    assert!(
        reply.error(400, "invalid_argument").contains("JSON object"),
        "{reply:?}"
    );
    assert_eq!(node.get("/services/arr", "a").await.status, StatusCode::NOT_FOUND);
    assert_eq!(node.get("/services/x", "a").await.status, StatusCode::NOT_FOUND);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_says_two_things_is_refused() {
    let node = dev_node().await;
    node.deploy_running("a", "echo", "echo").await;
    // A query parameter given twice: which copy would win is anyone's guess.
    for query in ["?status=running&status=failed", "?tenant=a&tenant=b"] {
        let reply = node.get(&format!("/services{query}"), "").await;
        assert!(
            reply.error(400, "invalid_argument").contains("more than once"),
            "{reply:?}"
        );
    }
    // The same label key twice, in JSON or in the query.
    let body = format!(
        "{{\"service_id\": \"twice\", \"wat\": {}, \"labels\": {{\"k\": \"1\", \"k\": \"2\"}}}}",
        json!(wat_text("echo"))
    );
    let post = node
        .request(Method::POST, "/services", "a")
        .header("content-type", "application/json")
        .body(body);
    let reply = send(post).await;
    assert!(reply.error(400, "invalid_argument").contains("label 'k'"), "{reply:?}");
    let put = node
        .request(Method::PUT, "/services/twice?label=k=1&label=k=2", "a")
        .header("content-type", "text/plain")
        .body(wat_text("echo"));
    let reply = send(put).await;
    assert!(reply.error(400, "invalid_argument").contains("label 'k'"), "{reply:?}");
    // Headers that name one thing, sent twice.
    let put = node
        .request(Method::PUT, "/services/twice", "a")
        .header("content-type", "text/plain")
        .header("idempotency-key", "k1")
        .header("idempotency-key", "k2")
        .body(wat_text("echo"));
    let reply = send(put).await;
    assert!(
        reply.error(400, "invalid_argument").contains("Idempotency-Key"),
        "{reply:?}"
    );
    let events = node
        .request(Method::GET, "/events", "a")
        .header("last-event-id", "1")
        .header("last-event-id", "5");
    let reply = send(events).await;
    assert!(
        reply.error(400, "invalid_argument").contains("Last-Event-ID"),
        "{reply:?}"
    );
    // A label selector no service could carry.
    let reply = node.get("/services?label==x", "a").await;
    assert!(
        reply.error(400, "invalid_argument").contains("label selector"),
        "{reply:?}"
    );
    // An empty tenant header is a mistake, not the admin (which would see every tenant).
    let empty = send(node.http.get(node.url("/services")).header("x-tenant-id", "")).await;
    assert!(
        empty.error(400, "invalid_argument").contains("x-tenant-id"),
        "{empty:?}"
    );
    // A bad ?tenant= is named as such.
    let reply = node.get("/services?tenant=BAD", "").await;
    assert!(reply.error(400, "invalid_argument").contains("?tenant="), "{reply:?}");
    assert_eq!(
        node.get("/services", "").await.ok(200)["services"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Escapes are decoded as UTF-8; bytes that are not UTF-8 are refused, not replaced (two
    // different values would become one).
    let put = |query: &str| {
        node.request(Method::PUT, &format!("/services/esc?{query}"), "a")
            .header("content-type", "text/plain")
            .body(wat_text("echo"))
    };
    let reply = send(put("label=k=%FF")).await;
    assert!(reply.error(400, "invalid_argument").contains("not UTF-8"), "{reply:?}");
    assert_eq!(node.get("/services/esc", "a").await.status, StatusCode::NOT_FOUND);
    let reply = send(put("label=k=caf%C3%A9+noir")).await;
    assert_eq!(reply.ok(201)["labels"]["k"], "café noir");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_deploys_raw_wasm_and_wat_and_refuses_other_media_types() {
    let node = dev_node().await;
    // `id` may carry a query string.
    let put = |id: &str, content_type: &str, body: Vec<u8>| {
        node.request(Method::PUT, &format!("/services/{id}"), "a")
            .header("content-type", content_type)
            .body(body)
    };
    let wasm = send(put("bin", "application/wasm", wasm_bytes("echo"))).await;
    assert_eq!(wasm.header("location"), Some("/services/bin?tenant=a"));
    let body = wasm.ok(201);
    assert_eq!(
        (body["service_id"].as_str(), body["version"].as_u64()),
        (Some("bin"), Some(1))
    );
    // No Content-Type at all (`curl -T`): a body of bytes, as RFC 9110 lets it be taken.
    let untyped = node
        .request(Method::PUT, "/services/untyped", "a")
        .body(wasm_bytes("echo"));
    send(untyped).await.ok(201);
    let text = send(put("text", "text/plain; charset=utf-8", wat_text("echo").into_bytes())).await;
    let text_body = text.ok(201);
    assert_eq!(
        text_body["module_sha256"], body["module_sha256"],
        "the same module either way"
    );
    // Identical again: unchanged; octet-stream works too.
    let again = send(put("bin", "application/octet-stream", wasm_bytes("echo"))).await;
    assert_eq!(again.ok(200)["deploy"]["unchanged"], true);
    // curl --data-binary's default content type is accepted for a wasm binary.
    let curl = send(put("curl", "application/x-www-form-urlencoded", wasm_bytes("echo"))).await;
    curl.ok(201);
    // Limits and labels in the query string.
    let path = "/services/limited?label=team=red&label=tier=1&memory_bytes=1048576&mailbox_capacity=8";
    let limited = send(
        node.request(Method::PUT, path, "a")
            .header("content-type", "application/wasm")
            .body(wasm_bytes("counter")),
    )
    .await;
    let limited = limited.ok(201);
    assert_eq!(limited["labels"], json!({ "team": "red", "tier": "1" }));
    assert_eq!(limited["limits"]["memory_bytes"], 1 << 20);
    assert_eq!(limited["limits"]["mailbox_capacity"], 8);

    let png = send(put("img", "image/png", wasm_bytes("echo"))).await;
    assert!(png.error(415, "unsupported_media_type").contains("application/wasm"));
    let form = send(put("form", "application/x-www-form-urlencoded", b"a=b".to_vec())).await;
    form.error(415, "unsupported_media_type");
    let unknown = send(put("x?colour=red", "application/wasm", wasm_bytes("echo"))).await;
    assert!(unknown.error(400, "invalid_argument").contains("colour"));
    let bad_label = send(put("x?label=nokey", "application/wasm", wasm_bytes("echo"))).await;
    assert!(bad_label.error(400, "invalid_argument").contains("key=value"));
    let bad_number = send(put("x?memory_bytes=lots", "application/wasm", wasm_bytes("echo"))).await;
    assert!(bad_number.error(400, "invalid_argument").contains("memory_bytes"));
    let not_wasm = send(put("junk", "application/wasm", b"\0asm\x01\0\0\0garbage".to_vec())).await;
    not_wasm.error(400, "invalid_argument");
    // A deploy at a version, in the query string or in the JSON body.
    let at_one = || put("limited?expected_version=1", "application/wasm", wasm_bytes("echo"));
    assert_eq!(send(at_one()).await.ok(200)["deploy"]["version"], 2);
    let stale = send(at_one()).await;
    assert!(stale.error(409, "version_mismatch").contains("is at version 2"));
    let soon = send(put("x?expected_version=soon", "application/wasm", wasm_bytes("echo"))).await;
    assert!(soon.error(400, "invalid_argument").contains("expected_version"));
    let body = json!({ "service_id": "text", "wat": wat_text("echo"), "expected_version": 0 });
    let taken = node.post_json("/services", "a", &body).await;
    assert!(taken.error(409, "version_mismatch").contains("does not exist yet"));
    let listed = node.get("/services", "a").await;
    let ids: Vec<&str> = listed.ok(200)["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["service_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["bin", "curl", "limited", "text", "untyped"]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_services_filters_pages_and_refuses_bad_queries() {
    let node = dev_node().await;
    for (id, team) in [("s1", "red"), ("s2", "blue"), ("s3", "red")] {
        let body = json!({ "service_id": id, "wat": wat_text("echo"), "labels": { "team": team } });
        let reply = node.post_json("/services", "a", &body).await;
        let seq = reply.ok(201)["deploy"]["seq"].as_u64().unwrap();
        node.wait_event("a", seq, id, "service_started").await;
    }
    let killed = node.delete("/services/s3", "a").await;
    let seq = killed.ok(202)["seq"].as_u64().unwrap();
    node.wait_event("a", seq, "s3", "service_stopped").await;

    let all = node.get("/services", "a").await;
    assert_eq!(ids(&all), ["s1", "s2", "s3"]);
    assert_eq!(
        (
            all.json["total"].as_u64(),
            all.json["limit"].as_u64(),
            all.json["offset"].as_u64()
        ),
        (Some(3), Some(100), Some(0))
    );
    assert_eq!(all.json["next_offset"], Value::Null, "the last page");
    // The node is quiet: the listing is as of the last event, s3's stop.
    let stopped = node.wait_event("a", seq, "s3", "service_stopped").await;
    assert_eq!(all.json["head_seq"].as_u64(), Some(stopped.id));
    for service in all.json["services"].as_array().unwrap() {
        let keys: BTreeSet<&str> = service.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, SERVICE_FIELDS.into_iter().collect());
    }
    assert_eq!(ids(&node.get("/services?status=running", "a").await), ["s1", "s2"]);
    assert_eq!(ids(&node.get("/services?status=stopped", "a").await), ["s3"]);
    assert_eq!(ids(&node.get("/services?label=team=red", "a").await), ["s1", "s3"]);
    assert_eq!(
        ids(&node.get("/services?label=team=red&status=running", "a").await),
        ["s1"]
    );
    let page = node.get("/services?limit=1&offset=1", "a").await;
    assert_eq!(ids(&page), ["s2"]);
    assert_eq!(page.json["next_offset"].as_u64(), Some(2));
    assert_eq!(
        (
            page.json["total"].as_u64(),
            page.json["limit"].as_u64(),
            page.json["offset"].as_u64()
        ),
        (Some(3), Some(1), Some(1))
    );
    assert!(ids(&node.get("/services?offset=10", "a").await).is_empty());

    let too_big = node.get("/services?limit=5000", "a").await;
    assert!(too_big.error(400, "invalid_argument").contains("1000"));
    let unknown = node.get("/services?colour=red", "a").await;
    assert!(unknown.error(400, "invalid_argument").contains("colour"));
    node.get("/services?status=sleepy", "a")
        .await
        .error(400, "invalid_argument");
    let ten = node.get("/services?limit=ten", "a").await;
    assert!(
        ten.error(400, "invalid_argument")
            .contains("'ten' is not a whole number")
    );
    // A number past what the parameter holds says so, naming the most it takes.
    let huge = node.get("/services?offset=99999999999999999999", "a").await;
    assert!(
        huge.error(400, "invalid_argument")
            .contains(&format!("over the maximum of {}", usize::MAX)),
        "{huge:?}"
    );
    // A parameter with a bound of its own names that bound, however large the number.
    for limit in ["5000", "99999999999999999999999"] {
        let page = node.get(&format!("/services?limit={limit}"), "a").await;
        let message = page.error(400, "invalid_argument");
        assert!(message.contains("over the maximum of 1000"), "{message}");
    }
    // A long name or value is shortened, so what the message says about it is not cut off.
    let long = "z".repeat(3000);
    let unknown = node.get(&format!("/services?{long}=1"), "a").await;
    let message = unknown.error(400, "invalid_argument");
    assert!(message.contains("this route takes: tenant, status"), "{message}");
    let huge = node.get(&format!("/services?offset={}", "9".repeat(3000)), "a").await;
    assert!(
        huge.error(400, "invalid_argument").contains("over the maximum"),
        "{huge:?}"
    );
    let grace = node.delete("/services/nope?grace_ms=99999999999", "a").await;
    assert!(
        grace
            .error(400, "invalid_argument")
            .contains("over the maximum of 4294967295")
    );
    node.get("/services?label=team", "a")
        .await
        .error(400, "invalid_argument");
    node.stop().await;
}

/// The ids of a `GET /services` page, in its order.
fn ids(reply: &Reply) -> Vec<String> {
    reply.ok(200)["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| s["service_id"].as_str().unwrap().to_string())
        .collect()
}

/// Paging by `next_page_token` resumes after the last service sent, wherever services added or
/// removed since have moved it: every service there throughout is seen once, as a reflector
/// listing page by page needs. An offset counts from the listing's start as it is now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_by_token_sees_every_service_once_while_others_come_and_go() {
    let node = dev_node().await;
    for id in ["b", "c", "d", "e"] {
        node.deploy("a", id, "echo").await.ok(201);
    }
    let first = node.get("/services?limit=2", "a").await;
    assert_eq!(ids(&first), ["b", "c"]);
    let token = first.json["next_page_token"].as_str().expect("a token").to_string();
    assert_eq!(first.json["next_offset"].as_u64(), Some(2));
    // Added before the position: the offset now points at `c` again, the token past it.
    node.deploy("a", "a", "echo").await.ok(201);
    assert_eq!(ids(&node.get("/services?limit=2&offset=2", "a").await), ["c", "d"]);
    let second = node.get(&format!("/services?limit=2&page_token={token}"), "a").await;
    assert_eq!(ids(&second), ["d", "e"]);
    assert_eq!(second.json["offset"].as_u64(), Some(3), "where the page starts now");
    assert_eq!(second.json["next_page_token"], Value::Null, "the last page");
    assert_eq!(second.json["next_offset"], Value::Null);

    // Removed before the position: the offset now skips `c`, the token does not.
    let first = node.get("/services?limit=2", "a").await;
    assert_eq!(ids(&first), ["a", "b"]);
    let token = first.json["next_page_token"].as_str().expect("a token").to_string();
    let killed = node.delete("/services/a?force=true", "a").await;
    let seq = killed.ok(202)["seq"].as_u64().unwrap();
    node.wait_event("a", seq, "a", "service_stopped").await;
    node.delete("/services/a?purge=true", "a").await.ok(200);
    assert_eq!(ids(&node.get("/services?limit=2&offset=2", "a").await), ["d", "e"]);
    let second = node.get(&format!("/services?limit=2&page_token={token}"), "a").await;
    assert_eq!(ids(&second), ["c", "d"]);

    // A token serves only the listing it was issued for, and says where its page starts.
    let other = node
        .get(&format!("/services?status=running&page_token={token}"), "a")
        .await;
    assert!(
        other.error(400, "invalid_argument").contains("another listing"),
        "{other:?}"
    );
    let theirs = node.get(&format!("/services?page_token={token}"), "b").await;
    assert!(
        theirs.error(400, "invalid_argument").contains("another listing"),
        "{theirs:?}"
    );
    let both = node.get(&format!("/services?offset=1&page_token={token}"), "a").await;
    assert!(both.error(400, "invalid_argument").contains("not both"), "{both:?}");
    let forged = node.get("/services?page_token=bm9wZQ", "a").await;
    assert!(
        forged
            .error(400, "invalid_argument")
            .contains("not one this node issued")
    );
    node.stop().await;
}

/// Services whose labels are control characters take six times their bytes as JSON: a page
/// of them ends before 3 MiB, as a gRPC page does, and names where the next one starts, so
/// that paging by `next_page_token` sees every service once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_services_ends_before_3_mib_and_names_the_next() {
    let node = dev_node().await;
    let labels: serde_json::Map<String, Value> =
        (0..64).map(|i| (format!("k{i}"), json!("\u{1}".repeat(256)))).collect();
    let wasm = base64::engine::general_purpose::STANDARD.encode(wasm_bytes("echo"));
    for i in 0..40 {
        let body = json!({ "service_id": format!("s{i:02}"), "wasm_base64": wasm, "labels": labels });
        node.post_json("/services", "a", &body).await.ok(201);
    }
    let (mut seen, mut pages) = (Vec::new(), 0);
    let mut token = Some(String::new());
    while let Some(at) = token {
        pages += 1;
        let page = node.get(&format!("/services?limit=1000&page_token={at}"), "a").await;
        assert!(page.bytes.len() <= 3 << 20, "a page of {} bytes", page.bytes.len());
        let services = page.ok(200)["services"].as_array().unwrap().clone();
        assert!(!services.is_empty());
        seen.extend(services.iter().map(|s| s["service_id"].as_str().unwrap().to_string()));
        token = page.json["next_page_token"].as_str().map(str::to_string);
        let next_offset = page.json["next_offset"].as_u64().map(|n| n as usize);
        assert_eq!(
            next_offset,
            token.as_ref().map(|_| seen.len()),
            "both name the same place"
        );
    }
    let expected: Vec<String> = (0..40).map(|i| format!("s{i:02}")).collect();
    assert_eq!(seen, expected);
    assert!(pages >= 2, "40 services of 100 KB of JSON each fit one page");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_service_shows_its_status_and_last_events() {
    let node = dev_node().await;
    node.deploy_running("a", "echo", "echo").await;
    assert_eq!(node.call("a", "echo", "hi").await.bytes, b"hi");
    let reply = node.get("/services/echo", "a").await;
    let body = reply.ok(200);
    let keys: BTreeSet<&str> = body.as_object().unwrap().keys().map(String::as_str).collect();
    let mut expected: BTreeSet<&str> = SERVICE_FIELDS.into_iter().collect();
    expected.insert("events");
    assert_eq!(keys, expected);
    assert_eq!(
        (body["status"].as_str(), body["desired"].as_str()),
        (Some("running"), Some("running"))
    );
    assert_eq!(
        (body["calls"].as_u64(), body["calls_failed"].as_u64()),
        (Some(1), Some(0))
    );
    assert!(body["memory_bytes"].as_u64().unwrap() >= 65536, "{body}");
    assert_eq!(body["module_size"].as_u64(), Some(wasm_bytes("echo").len() as u64));
    let events = body["events"].as_array().expect("events");
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["service_deployed", "service_started"]);
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(body["last_seq"].as_u64(), seqs.last().copied());
    for event in events {
        assert_eq!(
            (event["tenant"].as_str(), event["service_id"].as_str()),
            (Some("a"), Some("echo"))
        );
        assert!(event["timestamp_ms"].as_u64().unwrap() > 0);
    }
    node.get("/services/nope", "a").await.error(404, "not_found");
    node.get("/services/echo?verbose=1", "a")
        .await
        .error(400, "invalid_argument");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_answers_202_and_unknown_services_404() {
    let node = dev_node().await;
    node.deploy_running("a", "echo", "echo").await;
    let killed = node.delete("/services/echo", "a").await;
    let body = killed.ok(202);
    assert_eq!(
        (body["service_id"].as_str(), body["already_stopped"].as_bool()),
        (Some("echo"), Some(false))
    );
    let seq = body["seq"].as_u64().unwrap();
    let requested = node.wait_event("a", seq, "echo", "service_kill_requested").await;
    assert_eq!(requested.id, seq);
    let stopped = node.wait_event("a", seq, "echo", "service_stopped").await;
    assert_eq!(stopped.data["reason"], "killed");
    let status = node.get("/services/echo", "a").await;
    assert_eq!(
        (status.json["status"].as_str(), status.json["desired"].as_str()),
        (Some("stopped"), Some("stopped"))
    );
    // Calling a stopped service is a precondition failure.
    node.call("a", "echo", "hi").await.error(409, "failed_precondition");
    // Killing again: accepted, and says it was already stopped.
    assert_eq!(
        node.delete("/services/echo", "a").await.ok(202)["already_stopped"],
        true
    );
    node.delete("/services/nope", "a").await.error(404, "not_found");

    // force reaches the event, with no grace, as it stops the service at once (the request's
    // grace is kept to compare a retry with); an idempotent retry gets the same answer.
    node.deploy_running("a", "kv", "kv").await;
    let forced = || {
        node.request(Method::DELETE, "/services/kv?force=true&grace_ms=25", "a")
            .header("idempotency-key", "kill-kv")
    };
    let first = send(forced()).await;
    let retry = send(forced()).await;
    let seq = first.ok(202)["seq"].as_u64().unwrap();
    assert_eq!(retry.ok(202), &first.json);
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    let event = node.wait_event("a", seq, "kv", "service_kill_requested").await;
    assert_eq!(
        (
            event.data["force"].as_bool(),
            event.data["grace_ms"].as_u64(),
            event.data["requested_grace_ms"].as_u64()
        ),
        (Some(true), Some(0), Some(25))
    );
    assert_eq!(event.data["idempotency_key"], "kill-kv");
    assert_eq!(event.data["expected_version"], Value::Null);
    // A kill at a version the service is not at stops nothing.
    node.deploy_running("a", "pinned", "echo").await;
    let stale = node.delete("/services/pinned?expected_version=2", "a").await;
    assert!(stale.error(409, "version_mismatch").contains("is at version 1"));
    let pinned = node.delete("/services/pinned?expected_version=1", "a").await;
    let seq = pinned.ok(202)["seq"].as_u64().unwrap();
    let event = node.wait_event("a", seq, "pinned", "service_kill_requested").await;
    assert_eq!(event.data["expected_version"], 1);
    // `purge` removes a stopped service; it stops nothing itself.
    node.deploy_running("a", "busy", "echo").await;
    let busy = node.delete("/services/busy?purge=true", "a").await;
    assert!(busy.error(409, "failed_precondition").contains("kill it"));
    node.delete("/services/pinned?purge=true&force=true", "a")
        .await
        .error(400, "invalid_argument");
    node.delete("/services/pinned?purge=true&grace_ms=5", "a")
        .await
        .error(400, "invalid_argument");
    node.wait_event("a", seq, "pinned", "service_stopped").await;
    // What a client sends by habit, saying nothing, is no obstacle.
    let purged = node
        .delete("/services/pinned?purge=true&force=false&grace_ms=0", "a")
        .await;
    assert_eq!(purged.ok(200)["removed"], true);
    let seq = purged.json["seq"].as_u64().unwrap();
    node.wait_event("a", seq, "pinned", "service_removed").await;
    node.get("/services/pinned", "a").await.error(404, "not_found");
    node.delete("/services/pinned?purge=true", "a")
        .await
        .error(404, "not_found");
    node.delete("/services/kv?force=maybe", "a")
        .await
        .error(400, "invalid_argument");
    node.delete("/services/kv?grace_ms=soon", "a")
        .await
        .error(400, "invalid_argument");
    node.delete("/services/kv?colour=red", "a")
        .await
        .error(400, "invalid_argument");
    node.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Calls and logs
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_round_trip_bytes_and_map_guest_failures() {
    let node = dev_node().await;
    node.deploy_running("a", "echo", "echo").await;
    node.deploy_running("a", "kv", "kv").await;
    let crasher = node.deploy_running("a", "crash", "unreachable").await;
    node.deploy_running("a", "spin", "spin").await;

    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let echoed = node.call("a", "echo", binary.clone()).await;
    assert_eq!(echoed.status, StatusCode::OK);
    assert_eq!(echoed.header("content-type"), Some("application/octet-stream"));
    assert_eq!(echoed.bytes, binary);
    assert_eq!(node.call("a", "echo", Vec::new()).await.bytes, b"");

    assert_eq!(node.call("a", "kv", "set colour blue").await.bytes, b"ok");
    assert_eq!(node.call("a", "kv", "get colour").await.bytes, b"blue");
    let missing = node.call("a", "kv", "get missing").await;
    let message = missing.error(422, "service_error");
    assert!(
        message.ends_with("no such key"),
        "the guest's message reaches the caller: {message}"
    );
    // An application error is not a crash: the data lives on.
    assert_eq!(node.call("a", "kv", "get colour").await.bytes, b"blue");

    let trapped = node.call("a", "crash", "x").await;
    assert!(
        trapped.error(502, "service_trapped").contains("unreachable"),
        "{trapped:?}"
    );
    let seq = crasher["deploy"]["seq"].as_u64().unwrap();
    let crashed = node.wait_event("a", seq, "crash", "service_crashed").await;
    assert_eq!(
        (crashed.data["reason"].as_str(), crashed.data["restarting"].as_bool()),
        (Some("trap"), Some(true))
    );

    let slow = node.call_with_timeout("spin", "5000", 200).await;
    slow.error(504, "deadline_exceeded");

    node.call("a", "nope", "x").await.error(404, "not_found");
    let bad = send(
        node.request(Method::POST, "/services/echo/call?timeout_ms=soon", "a")
            .body("x"),
    )
    .await;
    bad.error(400, "invalid_argument");
    let status = node.get("/services/kv", "a").await;
    assert_eq!(
        (status.json["calls"].as_u64(), status.json["calls_failed"].as_u64()),
        (Some(4), Some(1))
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_as_json_and_followed_as_sse() {
    let node = node(|c| c.solo.sse_keepalive_ms = 200).await;
    node.deploy_running("a", "echo", "echo").await;
    let logs = node.get("/services/echo/logs", "a").await;
    let body = logs.ok(200);
    assert_eq!(body["service_id"], "echo");
    let lines = body["lines"].as_array().expect("lines");
    assert_eq!(lines.len(), 1, "{body}");
    let line = &lines[0];
    assert_eq!(
        (line["message"].as_str(), line["level"].as_str()),
        (Some("echo ready"), Some("info"))
    );
    assert_eq!((line["seq"].as_u64(), line["version"].as_u64()), (Some(1), Some(1)));
    assert!(line["timestamp_ms"].as_u64().unwrap() > 0);
    assert!(
        node.get("/services/echo/logs?from=2", "a").await.ok(200)["lines"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Followed: SSE frames `id: <line seq>`, `event: log`, then new lines as they come.
    let response = send_stream(node.request(Method::GET, "/services/echo/logs?follow=true", "a")).await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["cache-control"], "no-cache");
    let mut stream: SseStream = Box::pin(response.bytes_stream().eventsource());
    let first = next_frame(&mut stream).await.expect("the first line");
    assert_eq!((first.id, first.event.as_str()), (1, "log"));
    assert_eq!(first.data["message"], "echo ready");
    // The raw stream carries keep-alive comments while nothing happens.
    let raw = send_stream(node.request(Method::GET, "/services/echo/logs?follow=1&from=2", "a")).await;
    let mut raw = RawSse::new(raw);
    let frame = raw.next_frame().await;
    assert_eq!(frame, [": keep-alive"], "a comment frame");
    // A kill makes echo log in solo_stop.
    node.delete("/services/echo", "a").await.ok(202);
    let stopping = next_frame(&mut stream).await.expect("the stop line");
    assert_eq!(
        (stopping.id, stopping.data["message"].as_str()),
        (2, Some("echo stopping"))
    );
    let frame = loop {
        let frame = raw.next_frame().await;
        if frame.first().is_some_and(|l| l.starts_with("id:")) {
            break frame;
        }
    };
    // Its id names its log, then its line.
    assert_eq!(
        frame[..2],
        [format!("id: {}", stopping.raw_id), "event: log".to_string()]
    );
    assert!(stopping.raw_id.ends_with("-2"), "{}", stopping.raw_id);
    // The service has stopped: the follow ends after its last line with an `end` event, as
    // `kubectl logs -f` ends with its container, and one started now gets the lines kept and
    // ends so too.
    async fn ends(stream: &mut SseStream) {
        let end = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("the end arrives");
        let end = end.expect("an end event").expect("it parses");
        assert_eq!(end.event, "end", "{end:?}");
        assert!(end.data.contains("no more lines will come"), "{end:?}");
        let after = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("the stream ends");
        assert!(after.is_none(), "{after:?}");
    }
    ends(&mut stream).await;
    let late = send_stream(node.request(Method::GET, "/services/echo/logs?follow=true", "a")).await;
    let mut late: SseStream = Box::pin(late.bytes_stream().eventsource());
    let kept = [next_frame(&mut late).await, next_frame(&mut late).await];
    let kept = kept.map(|frame| frame.map(|f| f.data["message"].as_str().unwrap_or_default().to_string()));
    assert_eq!(kept, [Some("echo ready".into()), Some("echo stopping".into())]);
    ends(&mut late).await;
    // An EventSource that reconnects all the same, with nothing left for it, is told to stop:
    // 204, as the HTML standard has it.
    let reconnect = node
        .request(Method::GET, "/services/echo/logs?follow=true", "a")
        .header("last-event-id", &stopping.raw_id)
        .send()
        .await
        .unwrap();
    assert_eq!(reconnect.status(), 204);

    node.get("/services/nope/logs", "a").await.error(404, "not_found");
    node.get("/services/nope/logs?follow=true", "a")
        .await
        .error(404, "not_found");
    node.get("/services/echo/logs?follow=maybe", "a")
        .await
        .error(400, "invalid_argument");
    node.get("/services/echo/logs?tail=5", "a")
        .await
        .error(400, "invalid_argument");
    drop((stream, raw));
    node.stop().await;
}

async fn send_stream(request: RequestBuilder) -> reqwest::Response {
    let response = tokio::time::timeout(DEADLINE, request.send())
        .await
        .expect("the stream opens in time")
        .expect("the stream opens");
    assert_eq!(response.status(), StatusCode::OK, "{response:?}");
    response
}

// ---------------------------------------------------------------------------------------------
// Node routes: shutdown, health, metrics
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_for_the_admin_and_stops_the_server() {
    let mut tokens = None;
    let node = node(|c| tokens = Some(tokens_config(c))).await;
    let (admin, acme) = tokens.unwrap();
    let shutdown = |token: Option<&str>, query: &str| {
        let request = node.http.post(node.url(&format!("/shutdown{query}")));
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    };
    send(shutdown(Some(&acme), "")).await.error(403, "permission_denied");
    // A tenant is refused before its query is read, as over gRPC.
    for query in ["?grace_ms=abc", "?colour=red"] {
        send(shutdown(Some(&acme), query)).await.error(403, "permission_denied");
    }
    send(shutdown(None, "")).await.error(401, "unauthenticated");
    send(shutdown(Some("solo_wrong"), ""))
        .await
        .error(401, "unauthenticated");
    send(shutdown(Some(&admin), "?grace_ms=soon"))
        .await
        .error(400, "invalid_argument");
    assert_eq!(node.get("/health", "").await.ok(200)["status"], "ok");
    let accepted = send(shutdown(Some(&admin), "?grace_ms=2000")).await;
    let seq = accepted.ok(202)["seq"].as_u64().expect("the seq of shutdown_requested");
    assert!(seq >= 1);
    let Node {
        server,
        http,
        base,
        _dir: dir,
    } = node;
    tokio::time::timeout(DEADLINE, server.stopped())
        .await
        .expect("the server stops after a shutdown request")
        .expect("cleanly");
    assert!(
        http.get(format!("{base}/health")).send().await.is_err(),
        "nothing listens any more"
    );
    drop(dir);
}

/// `GET /backup` is the admin's: the data file's copy, whole, as a download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_downloads_the_data_file_for_the_admin_only() {
    let node = dev_node().await;
    node.deploy_running("a", "echo", "echo").await;
    assert!(
        node.get("/backup", "a")
            .await
            .error(403, "permission_denied")
            .contains("admin")
    );
    node.get("/backup?tenant=a", "").await.error(400, "invalid_argument");
    let reply = send_stream(node.request(Method::GET, "/backup", "")).await;
    assert_eq!(reply.status(), 200);
    assert_eq!(reply.headers()["content-type"], "application/octet-stream");
    assert_eq!(
        reply.headers()["content-disposition"],
        "attachment; filename=\"data.mdb\""
    );
    let bytes = reply.bytes().await.expect("the whole body");
    let verified = verify_backup(&bytes);
    assert!(verified.ok() && verified.head >= 2, "{}", verified.summary());
    node.stop().await;
}

/// 15 MiB of data segment in a module: a data file that outlasts what sockets buffer.
fn big_module() -> Vec<u8> {
    let wat = format!(
        r#"(module (memory (export "memory") 256)
             (func (export "solo_alloc") (param i32) (result i32) (i32.const 0))
             (func (export "solo_handle") (param i32 i32) (result i64) (i64.const 0))
             (data (i32.const 0) "{}"))"#,
        "a".repeat(15 << 20)
    );
    wat::parse_str(wat).unwrap()
}

/// A backup that cannot begin, the log's reader slots all held by backups nobody reads, is an
/// error status that says why, not a 200 whose body ends at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_that_cannot_begin_is_an_error_not_an_empty_download() {
    let node = node(|c| c.database.max_readers = 4).await;
    let deploy = node
        .request(Method::PUT, "/services/big", "a")
        .header("content-type", "application/wasm")
        .body(big_module());
    send(deploy).await.ok(201);
    let mut unread = Vec::new();
    let refused = loop {
        let reply = node.request(Method::GET, "/backup", "").send().await.unwrap();
        if reply.status() != 200 {
            break reply;
        }
        unread.push(reply);
        assert!(
            unread.len() <= 4,
            "more backups under way than the log has reader slots"
        );
    };
    // The node's load, not a fault: 503 with a time to retry, as for any read with no slot.
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"), "{refused:?}");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("max_readers"), "{body}");
    drop(unread);
    node.stop().await;
}

/// A download nobody reads is a stream to the shutdown, as SSE is: it ends with the node's
/// other streams rather than hold the node for the whole grace of requests in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_download_nobody_reads_does_not_hold_a_shutdown() {
    let node = dev_node().await;
    let deploy = node
        .request(Method::PUT, "/services/big", "a")
        .header("content-type", "application/wasm")
        .body(big_module());
    send(deploy).await.ok(201);
    let unread = send_stream(node.request(Method::GET, "/backup", "")).await;
    assert_eq!(unread.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    send(node.request(Method::POST, "/shutdown?grace_ms=30000", ""))
        .await
        .ok(202);
    tokio::time::timeout(Duration::from_secs(20), node.server.stopped())
        .await
        .expect("the node stops long before the 30 s grace")
        .expect("cleanly");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    drop(unread);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_in_development_mode_refuses_tenants_and_ends_streams() {
    let node = dev_node().await;
    let reply = send(node.request(Method::POST, "/shutdown", "a")).await;
    assert!(reply.error(403, "permission_denied").contains("admin"));
    send(node.request(Method::POST, "/shutdown?tenant=a", ""))
        .await
        .error(400, "invalid_argument");
    assert_eq!(node.get("/health", "").await.ok(200)["status"], "ok");

    node.deploy_running("a", "echo", "echo").await;
    let (_, mut tenant_events) = node.events("", "a", None).await;
    let (_, mut admin_events) = node.events("", "", None).await;
    let logs = send_stream(node.request(Method::GET, "/services/echo/logs?follow=true&from=2", "a")).await;
    let mut logs: SseStream = Box::pin(logs.bytes_stream().eventsource());
    let head = node.head().await;
    // Without a tenant, development mode acts as the admin.
    let accepted = send(node.request(Method::POST, "/shutdown?grace_ms=3000", "")).await;
    let seq = accepted.ok(202)["seq"].as_u64().unwrap();
    assert_eq!(seq, head + 1, "shutdown_requested is the next event");
    // Every stream ends cleanly (no transport error). The admin's may carry shutdown_requested
    // first, if its tail got there before the stop; nothing else happened.
    while let Some(frame) = next_frame(&mut admin_events).await {
        assert_eq!((frame.id, frame.event.as_str()), (seq, "shutdown_requested"));
        assert_eq!(
            (frame.data["tenant"].as_str(), frame.data["actor"].as_str()),
            (Some(""), Some("admin"))
        );
        assert_eq!(frame.data["grace_ms"], 3000);
    }
    while let Some(frame) = next_frame(&mut tenant_events).await {
        assert_eq!(frame.data["tenant"], "a", "a tenant never sees node events");
    }
    while let Some(frame) = next_frame(&mut logs).await {
        assert_eq!(frame.event, "log");
    }
    let Node { server, _dir: dir, .. } = node;
    tokio::time::timeout(DEADLINE, server.stopped())
        .await
        .expect("the server stops after a shutdown request")
        .expect("cleanly");
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_ok_and_the_head() {
    let node = dev_node().await;
    let health = node.get("/health", "").await;
    let body = health.ok(200).clone();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["version"], solo::VERSION);
    assert_eq!(body["services_running"], 0);
    assert_eq!(body["unrecorded_observations"], 0);
    assert!(body["log_error"].is_null(), "{body}");
    let head = body["head_seq"].as_u64().unwrap();
    assert!(head >= 1, "node_started is in the log: {body}");
    assert!(body["uptime_ms"].as_u64().is_some());
    node.deploy_running("a", "echo", "echo").await;
    let after = node.get("/health", "a").await;
    assert_eq!(after.ok(200)["services_running"], 1);
    assert_eq!(after.json["head_seq"].as_u64(), Some(head + 2));
    node.stop().await;
}

/// The REST router alone, over a node whose API is already stopping (as during a shutdown's
/// grace), behind a real socket: the window a real shutdown leaves is too short to aim at.
async fn stopping_router() -> (String, solo::server::Node, TempDir) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = node_config(dir.path());
    let node = open_node(&config).await;
    let metrics = solo::metrics::Metrics::new();
    let limits = std::sync::Arc::new(config.limits_table().expect("valid limits"));
    let state = std::sync::Arc::new(solo::api::ApiState {
        control: node.control.clone(),
        auth: solo::api::Authenticator::development(),
        shed: solo::shed::Shedder::new(100, std::sync::Arc::clone(&limits), std::sync::Arc::clone(&metrics)),
        bodies: solo::api::bodies::BodyBudget::new(
            1 << 30,
            std::sync::Arc::clone(&limits),
            metrics.shed.with_label_values(&["body_bytes"]),
        ),
        log_pace: solo::api::pace::ReadPace::of_logs(std::sync::Arc::clone(&limits), &metrics),
        history_pace: std::sync::Arc::new(solo::api::pace::ReadPace::of_history(limits, &metrics)),
        frames: solo::api::encoded::Frames::for_tail_window(config.database.tail_window_events as usize),
        metrics,
        options: solo::api::ApiOptions {
            default_grace: Duration::from_secs(1),
            default_progress_interval: Duration::from_secs(1),
            sse_keepalive: Duration::from_secs(1),
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(10),
            discard_bytes: 1 << 20,
            write_stall: Duration::from_secs(10),
        },
        stopping: tokio_util::sync::CancellationToken::new(),
        shutdown_requested: tokio_util::sync::CancellationToken::new(),
        shutdown_grace: std::sync::Mutex::new(None),
        started: Instant::now(),
    });
    state.stopping.cancel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = solo::api::rest::router(state);
    tokio::spawn(async move { axum::serve(listener, router).await });
    (base, node, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_refuses_work_with_503() {
    let (base, node, _dir) = stopping_router().await;
    let http = client();
    let deploy = http
        .post(format!("{base}/services"))
        .header("x-tenant-id", "a")
        .json(&json!({ "service_id": "echo", "wat": wat_text("echo") }));
    send(deploy).await.error(503, "shutting_down");
    let events = http.get(format!("{base}/events")).header("x-tenant-id", "a");
    send(events).await.error(503, "shutting_down");
    // Reads too: every new request on a connection still open, as over gRPC.
    for path in [
        "/services",
        "/services/echo",
        "/services/echo/logs",
        "/metrics",
        "/nowhere",
    ] {
        let read = http.get(format!("{base}{path}")).header("x-tenant-id", "a");
        let reply = send(read).await;
        reply.error(503, "shutting_down");
        assert!(reply.json["request_id"].as_str().is_some(), "{path}: {reply:?}");
    }
    node.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_of_a_stopping_node_is_503_with_its_own_body() {
    // `health` answers 503 {status: "shutting_down", version, uptime_ms, head_seq, ...} so that
    // load balancers and operators see why; the body must reach them as the handler wrote it.
    let (base, node, _dir) = stopping_router().await;
    let reply = send(client().get(format!("{base}/health"))).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert_eq!(
        reply.json["status"], "shutting_down",
        "the health body was rewritten: {reply:?}"
    );
    assert!(reply.json["head_seq"].as_u64().is_some(), "{reply:?}");
    node.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    let node = node(|c| c.solo.sse_keepalive_ms = 200).await;
    let before = node.metrics().await;
    node.deploy_running("a", "echo", "echo").await;
    assert_eq!(node.call("a", "echo", "hi").await.status, StatusCode::OK);
    node.call("a", "nope", "hi").await.error(404, "not_found");
    let after = node.metrics().await;

    for (family, kind) in [
        ("solo_http_requests_total", "counter"),
        ("solo_calls_total", "counter"),
        // No gRPC request was made: its series are there from the start.
        ("solo_grpc_requests_total", "counter"),
        ("solo_deploys_total", "counter"),
        ("solo_quota_refusals_total", "counter"),
        ("solo_events_appended_total", "counter"),
        ("solo_call_duration_seconds", "histogram"),
        ("solo_services", "gauge"),
        ("solo_instances", "gauge"),
        ("solo_watchers", "gauge"),
        ("solo_log_head_seq", "gauge"),
    ] {
        assert_eq!(after.types.get(family).map(String::as_str), Some(kind), "{family}");
        assert!(
            after.help.get(family).is_some_and(|h| !h.is_empty()),
            "{family} has help"
        );
    }
    for (name, _) in after.samples.keys() {
        assert!(after.family(name).is_some(), "{name} has a # TYPE");
    }

    let delta = |name: &str, labels: &[(&str, &str)]| after.value(name, labels) - before.value(name, labels);
    assert_eq!(delta("solo_deploys_total", &[("result", "created")]), 1.0);
    assert_eq!(delta("solo_calls_total", &[("result", "ok")]), 1.0);
    assert_eq!(delta("solo_calls_total", &[("result", "refused")]), 1.0);
    assert_eq!(delta("solo_call_duration_seconds_count", &[]), 2.0);
    assert_eq!(
        delta("solo_events_appended_total", &[("kind", "service_deployed")]),
        1.0
    );
    assert_eq!(delta("solo_events_appended_total", &[("kind", "service_started")]), 1.0);
    let http = |route: &str, code: &str| delta("solo_http_requests_total", &[("route", route), ("code", code)]);
    assert_eq!(http("/services", "201"), 1.0);
    assert_eq!(http("/services/{id}/call", "200"), 1.0);
    assert_eq!(http("/services/{id}/call", "404"), 1.0);
    assert_eq!(
        http("/metrics", "200"),
        1.0,
        "the first scrape counts once it is answered"
    );
    assert!(http("/events", "200") >= 1.0, "deploy_running tails /events");
    assert_eq!(after.value("solo_services", &[("status", "running")]), 1.0);
    assert_eq!(after.value("solo_instances", &[]), 1.0);
    assert_eq!(after.value("solo_log_head_seq", &[]), node.head().await as f64);

    // The SSE watcher gauge follows open streams; a closed one is noticed at its next frame.
    let watchers = async |want: f64| {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let now = node.metrics().await.value("solo_watchers", &[("protocol", "sse")]);
            if now == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "solo_watchers{{protocol=\"sse\"}} stays {now}, not {want}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (_, stream) = node.events("", "a", None).await;
    watchers(1.0).await;
    // A log follower is a watcher too, as max_watchers counts it.
    let follower = send_stream(node.request(Method::GET, "/services/echo/logs?follow=true", "a")).await;
    watchers(2.0).await;
    drop((stream, follower));
    watchers(0.0).await;
    node.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The HTTP envelope: routes, methods, limits, request ids, authentication
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_wrong_methods_answer_json() {
    let node = dev_node().await;
    for path in ["/nope", "/services/a/b/c", "/v1/services"] {
        let reply = node.get(path, "a").await;
        assert!(reply.error(404, "not_found").contains("route"), "{path}: {reply:?}");
    }
    for (method, path, allow) in [
        (Method::PATCH, "/services", "GET,POST"),
        (Method::POST, "/services/x", "DELETE,GET,PUT"),
        (Method::GET, "/services/x/call", "POST"),
        (Method::DELETE, "/services/x/logs", "GET"),
        (Method::POST, "/events", "GET"),
        (Method::GET, "/shutdown", "POST"),
        (Method::DELETE, "/health", "GET"),
        (Method::PUT, "/metrics", "GET"),
    ] {
        let reply = send(node.request(method.clone(), path, "a")).await;
        let message = reply.error(405, "method_not_allowed").to_string();
        let header = reply
            .header("allow")
            .unwrap_or_else(|| panic!("{method} {path}: no Allow header"));
        let mut methods: Vec<String> = header
            .split(',')
            .map(|m| m.trim().to_string())
            .filter(|m| m != "HEAD")
            .collect();
        methods.sort();
        assert_eq!(methods.join(","), allow, "{method} {path}");
        for m in allow.split(',') {
            assert!(message.contains(m), "{method} {path}: {message}");
        }
        // The message names what the header does.
        assert_eq!(
            message.contains("HEAD"),
            header.contains("HEAD"),
            "{method} {path}: {message}"
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_are_413() {
    let node = node(|c| c.solo.max_request_bytes = 2048).await;
    // A service to call: a call to none is refused before its body is read.
    node.deploy_running("a", "big", "unreachable").await;
    let big = "x".repeat(6000);
    let reply = node
        .post_json("/services", "a", &json!({ "service_id": "big", "wat": big }))
        .await;
    assert!(reply.error(413, "payload_too_large").contains("limit of 2048 bytes"));
    let reply = send(
        node.request(Method::PUT, "/services/big", "a")
            .header("content-type", "application/wasm")
            .body(big.clone()),
    )
    .await;
    reply.error(413, "payload_too_large");
    node.call("a", "big", big.clone()).await.error(413, "payload_too_large");
    // A chunked body (no Content-Length) is cut off at the limit too.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..4).map(|_| Ok(vec![b'x'; 1500])).collect();
    let chunked = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    node.call("a", "big", chunked).await.error(413, "payload_too_large");
    // A body far over the limit is refused before it is read; the server reads and discards
    // the rest while the answer goes out, so the client gets the 413 every time, never a reset.
    let huge = vec![b'x'; 4 << 20];
    for _ in 0..10 {
        node.call("a", "big", huge.clone())
            .await
            .error(413, "payload_too_large");
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = huge.chunks(64 << 10).map(|c| Ok(c.to_vec())).collect();
        let chunked = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
        node.call("a", "big", chunked).await.error(413, "payload_too_large");
    }
    // A Content-Length over the limit is answered at once, whether or not the body follows,
    // and a client waiting for `100 Continue` is not invited to send it.
    let address = node.base.trim_start_matches("http://").to_string();
    for (extra, declared) in [("", 99_999_999_999u64), ("expect: 100-continue\r\n", 5000)] {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut raw = tokio::net::TcpStream::connect(&address).await.unwrap();
        let head = format!(
            "POST /services/big/call HTTP/1.1\r\nhost: solo\r\nx-tenant-id: a\r\n{extra}content-length: {declared}\r\n\r\n"
        );
        raw.write_all(head.as_bytes()).await.unwrap();
        raw.write_all(b"only a little").await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(DEADLINE, raw.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "no answer, or the connection stayed open");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("max_request_bytes"), "{answer}");
    }
    // Under the limit, the same routes go on to their usual answers.
    node.call("a", "nothing", "small").await.error(404, "not_found");
    node.deploy_running("a", "tiny", "unreachable").await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_echoed_or_generated() {
    let node = dev_node().await;
    let given = send(
        node.request(Method::GET, "/health", "")
            .header("x-request-id", "req-abc-123"),
    )
    .await;
    assert_eq!(given.header("x-request-id"), Some("req-abc-123"));
    let error = send(
        node.request(Method::GET, "/services/nope", "a")
            .header("x-request-id", "req-abc-124"),
    )
    .await;
    error.error(404, "not_found");
    assert_eq!(error.json["request_id"], "req-abc-124");
    let unmatched = send(
        node.request(Method::GET, "/nope", "a")
            .header("x-request-id", "req-abc-125"),
    )
    .await;
    unmatched.error(404, "not_found");
    assert_eq!(unmatched.json["request_id"], "req-abc-125");

    let generated = node.get("/health", "").await;
    let first = generated.header("x-request-id").expect("a generated id").to_string();
    assert!(
        first.len() == 16 && first.bytes().all(|b| b.is_ascii_hexdigit()),
        "{first}"
    );
    let second = node.get("/services/nope", "a").await;
    second.error(404, "not_found"); // checks body == header
    assert_ne!(
        second.header("x-request-id"),
        Some(first.as_str()),
        "ids are fresh per request"
    );
    let (headers, _stream) = node.events("", "a", None).await;
    assert!(headers.contains_key("x-request-id"), "streams carry an id too");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_when_configured() {
    let mut tokens = None;
    let node = node(|c| tokens = Some(tokens_config(c))).await;
    let (admin, acme) = tokens.unwrap();
    let get = |path: &str, auth: Option<&str>| {
        let request = node.http.get(node.url(path));
        match auth {
            Some(value) => request.header("authorization", value),
            None => request,
        }
    };
    let bearer = |token: &str| format!("Bearer {token}");
    for path in ["/services", "/services/x", "/services/x/logs", "/events"] {
        let refused = send(get(path, None)).await;
        // As RFC 9110 asks of a 401: the scheme that would do.
        assert_eq!(refused.header("www-authenticate"), Some("Bearer"), "{path}");
        refused.error(401, "unauthenticated");
        send(get(path, Some("Bearer solo_not_a_token")))
            .await
            .error(401, "unauthenticated");
        send(get(path, Some(&format!("Basic {acme}"))))
            .await
            .error(401, "unauthenticated");
    }
    // X-Tenant-ID alone proves nothing once tokens exist.
    send(get("/services", None).header("x-tenant-id", "acme"))
        .await
        .error(401, "unauthenticated");
    // Health and metrics are public.
    send(get("/health", None)).await.ok(200);
    assert_eq!(send(get("/metrics", None)).await.status, StatusCode::OK);

    // A tenant's token acts for that tenant, and only for it.
    let deployed = send(
        node.http
            .post(node.url("/services"))
            .bearer_auth(&acme)
            .json(&json!({ "service_id": "echo", "wat": wat_text("echo") })),
    )
    .await;
    assert_eq!(deployed.ok(201)["tenant"], "acme");
    let listed = send(get("/services", Some(&bearer(&acme)))).await;
    assert_eq!(listed.ok(200)["total"], 1);
    // The scheme's name is case-insensitive.
    for scheme in ["bearer", "BEARER"] {
        let listed = send(get("/services", Some(&format!("{scheme} {acme}")))).await;
        assert_eq!(listed.ok(200)["total"], 1);
    }
    send(get("/services", Some(&bearer(&acme))).header("x-tenant-id", "beta"))
        .await
        .error(403, "permission_denied");
    send(get("/services?tenant=beta", Some(&bearer(&acme))))
        .await
        .error(403, "permission_denied");

    // The admin sees every tenant, or the one it names with ?tenant= or X-Tenant-ID.
    let other = send(
        node.http
            .put(node.url("/services/other?tenant=beta"))
            .bearer_auth(&admin)
            .header("content-type", "application/wasm")
            .body(wasm_bytes("echo")),
    )
    .await;
    assert_eq!(other.ok(201)["tenant"], "beta");
    assert_eq!(send(get("/services", Some(&bearer(&admin)))).await.ok(200)["total"], 2);
    let named = send(get("/services?tenant=acme", Some(&bearer(&admin)))).await;
    assert_eq!(named.ok(200)["services"][0]["tenant"], "acme");
    assert_eq!(named.json["total"], 1);
    let header = send(get("/services/other", Some(&bearer(&admin))).header("x-tenant-id", "beta")).await;
    assert_eq!(header.ok(200)["tenant"], "beta");
    send(get("/services?tenant=acme", Some(&bearer(&admin))).header("x-tenant-id", "beta"))
        .await
        .error(400, "invalid_argument");

    // Streams need a token too, and a tenant's stream shows its own events.
    let response = send_stream(get("/events?from=1", Some(&bearer(&acme)))).await;
    let mut stream: SseStream = Box::pin(response.bytes_stream().eventsource());
    let frames = frames_until(&mut stream, |f| is_event(f, "echo", "service_deployed")).await;
    assert!(frames.iter().all(|f| f.data["tenant"] == "acme"), "{frames:?}");
    drop(stream);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_and_shedding_refusals_carry_retry_after() {
    let node = node(|c| {
        c.limits.max_deploys_per_minute = 2;
        c.limits.max_watchers = 1;
    })
    .await;
    node.deploy("a", "one", "echo").await.ok(201);
    node.deploy("a", "two", "echo").await.ok(201);
    let refused = node.deploy("a", "three", "echo").await;
    assert!(refused.error(429, "quota_exceeded").contains("max_deploys_per_minute"));
    // When the first deploy leaves the minute: a deploy counts to the end of its second.
    let retry_after: u64 = refused.header("retry-after").and_then(|v| v.parse().ok()).unwrap();
    assert!((50..=61).contains(&retry_after), "{retry_after}");
    let (_, stream) = node.events("", "a", None).await;
    let shed = node.get("/events", "a").await;
    shed.error(429, "overloaded");
    assert_eq!(shed.header("retry-after"), Some("1"));
    let metrics = node.metrics().await;
    assert_eq!(metrics.value("solo_shed_total", &[("scope", "watchers")]), 1.0);
    assert_eq!(metrics.value("solo_deploys_total", &[("result", "refused")]), 1.0);
    let refusals = |quota| metrics.value("solo_quota_refusals_total", &[("quota", quota)]);
    assert_eq!(refusals("max_deploys_per_minute"), 1.0);
    assert_eq!(
        refusals("max_history_mb_per_hour"),
        0.0,
        "every quota's series is there"
    );
    // Another tenant has its own allowance.
    let (_, other) = node.events("", "b", None).await;
    // So has the admin: naming no tenant it acts on tenant `default`, but that tenant's streams
    // take nothing from it, nor its streams from that tenant.
    let (_, tenant_default) = node.events("", "default", None).await;
    let (_, admin) = node.events("", "", None).await;
    node.get("/events", "default").await.error(429, "overloaded");
    assert!(
        node.get("/events", "")
            .await
            .error(429, "overloaded")
            .contains("the admin is at its limit of open streams (1)")
    );
    drop((stream, other, tenant_default, admin));
    node.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Server-Sent Events
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_over_damaged_history_ends_with_an_error_frame_not_a_clean_end() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let snapshot_often = |config: &mut Config| config.database.snapshot_every = 4;
    let on = |server: solo::server::Server| Node {
        base: server.http_url(),
        server,
        http: client(),
        _dir: tempfile::tempdir().expect("a temp dir"),
    };
    let node = on(start_server(dir.path(), snapshot_often).await);
    // A label only the first deploy's event holds: the upgrade replaces it, and the snapshots
    // taken after it hold the state without it.
    let labelled = json!({ "service_id": "svc", "wat": wat_text("echo"), "labels": { "mark": "needle-label-7731" } });
    node.post_json("/services", "a", &labelled).await.ok(201);
    node.deploy("a", "svc", "counter").await.ok(200);
    for i in 0..3 {
        node.deploy_running("a", &format!("more{i}"), "echo").await;
    }
    node.stop().await;

    // Damage the first event, in every copy LMDB left in the file; the snapshots are intact,
    // so the node starts.
    let file = dir.path().join("data.mdb");
    let mut bytes = std::fs::read(&file).unwrap();
    for at in places_of(&bytes, b"needle-label-7731") {
        bytes[at] ^= 0xff;
    }
    std::fs::write(&file, bytes).unwrap();
    let node = on(start_server(dir.path(), snapshot_often).await);

    let response = node.request(Method::GET, "/events?from=1", "").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut raw = RawSse::new(response);
    // The record before the damage goes out whole, then the damage.
    let first = raw.next_frame().await;
    assert!(
        first.contains(&"id: 1".to_string()) && first.contains(&"event: node_started".to_string()),
        "{first:?}"
    );
    let frame = raw.next_frame().await;
    assert!(frame.contains(&"event: error".to_string()), "{frame:?}");
    assert!(frame.contains(&"retry: 60000".to_string()), "{frame:?}");
    let data: Value = serde_json::from_str(frame.iter().find_map(|l| l.strip_prefix("data: ")).unwrap()).unwrap();
    let message = data["message"].as_str().unwrap();
    assert!(
        message.contains("record 2 is corrupt"),
        "the first deploy, after node_started: {data}"
    );
    assert!(data["error"].as_str().is_some_and(|e| !e.is_empty()), "{data}");
    // Nothing follows: the stream ends after saying why.
    let rest = tokio::time::timeout(DEADLINE, raw.body.next())
        .await
        .expect("the stream ends");
    assert!(rest.is_none(), "{rest:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_frames_carry_seq_kind_and_one_json_line() {
    let node = dev_node().await;
    let (headers, mut stream) = node.events("", "a", None).await;
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    let deployed = node.deploy("a", "echo", "echo").await;
    let seq = deployed.ok(201)["deploy"]["seq"].as_u64().unwrap();
    let frames = frames_until(&mut stream, |f| is_event(f, "echo", "service_started")).await;
    assert_eq!(frames.len(), 2, "nothing else happened: {frames:?}");
    assert_eq!(frames[0].id, seq, "the stream starts with what comes next");
    for frame in &frames {
        let data = &frame.data;
        assert_eq!(data["seq"].as_u64(), Some(frame.id));
        assert_eq!(data["kind"].as_str(), Some(frame.event.as_str()));
        assert_eq!(
            (data["tenant"].as_str(), data["service_id"].as_str()),
            (Some("a"), Some("echo"))
        );
        assert!(data["actor"].as_str().is_some_and(|a| !a.is_empty()), "{data}");
        assert!(data["timestamp_ms"].as_u64().unwrap() > 1_600_000_000_000);
    }
    let deployed = &frames[0].data;
    assert_eq!(deployed["actor"], "tenant:a");
    assert_eq!(
        (deployed["version"].as_u64(), deployed["module_size"].as_u64()),
        (Some(1), Some(wasm_bytes("echo").len() as u64))
    );
    assert_eq!(deployed["module_sha256"].as_str().map(str::len), Some(64));
    assert_eq!(frames[1].data["version"], 1);
    assert!(frames[0].id < frames[1].id);
    drop(stream);
    node.stop().await;
}

/// Streams share each event's frame: a stream following live, one replaying the history and
/// the admin's get the same frames, each its own event's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sse_stream_gets_each_event_whole_live_or_replayed() {
    let node = dev_node().await;
    let (_, mut live) = node.events("", "a", None).await;
    let (_, mut admin) = node.events("", "", None).await;
    let first = node.deploy_running("a", "echo", "echo").await["deploy"]["seq"]
        .as_u64()
        .unwrap();
    node.deploy_running("a", "counter", "counter").await;
    let last = |f: &Frame| is_event(f, "counter", "service_started");
    let live = frames_until(&mut live, last).await;
    let (_, mut replayed) = node.events(&format!("?from={first}"), "a", None).await;
    assert_eq!(frames_until(&mut replayed, last).await, live);
    assert_eq!(frames_until(&mut admin, last).await, live);
    let events: Vec<(u64, &str, &str)> = live
        .iter()
        .map(|f| {
            assert_eq!(f.data["seq"].as_u64(), Some(f.id), "{f:?}");
            (f.id, f.data["service_id"].as_str().unwrap(), f.event.as_str())
        })
        .collect();
    assert_eq!(
        events,
        [
            (first, "echo", "service_deployed"),
            (first + 1, "echo", "service_started"),
            (first + 2, "counter", "service_deployed"),
            (first + 3, "counter", "service_started")
        ]
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_replays_history_and_filters_by_kind_and_service() {
    let node = dev_node().await;
    let echo = node.deploy_running("a", "echo", "echo").await;
    node.deploy_running("a", "counter", "counter").await;
    let echo_seq = echo["deploy"]["seq"].as_u64().unwrap();

    // The admin's history starts with the node's own event, which no tenant sees.
    let (_, mut admin) = node.events("?from=1", "", None).await;
    let first = next_frame(&mut admin).await.unwrap();
    assert_eq!((first.id, first.event.as_str()), (1, "node_started"));
    assert_eq!(
        (first.data["tenant"].as_str(), first.data["service_id"].as_str()),
        (Some(""), Some(""))
    );
    drop(admin);

    // ?from=1: the whole history the tenant may see, in order.
    let (_, mut all) = node.events("?from=1", "a", None).await;
    let frames = frames_until(&mut all, |f| is_event(f, "counter", "service_started")).await;
    let kinds: Vec<(&str, &str)> = frames
        .iter()
        .map(|f| (f.data["service_id"].as_str().unwrap(), f.event.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("echo", "service_deployed"),
            ("echo", "service_started"),
            ("counter", "service_deployed"),
            ("counter", "service_started")
        ]
    );
    assert_eq!(frames[0].id, echo_seq);
    assert!(frames.windows(2).all(|w| w[0].id < w[1].id));

    // ?kinds= and ?service_id= filter; the sentinel (a kill) ends each read.
    let (_, mut started) = node
        .events("?from=1&kinds=service_started,service_stopped", "a", None)
        .await;
    let (_, mut counter) = node.events("?from=1&service_id=counter", "a", None).await;
    let (_, mut both) = node
        .events(
            "?from=1&service_id=counter&kinds=service_deployed,service_stopped",
            "a",
            None,
        )
        .await;
    node.delete("/services/counter", "a").await.ok(202);
    let frames = frames_until(&mut started, |f| is_event(f, "counter", "service_stopped")).await;
    let kinds: Vec<(&str, &str)> = frames
        .iter()
        .map(|f| (f.data["service_id"].as_str().unwrap(), f.event.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("echo", "service_started"),
            ("counter", "service_started"),
            ("counter", "service_stopped")
        ]
    );
    let frames = frames_until(&mut counter, |f| is_event(f, "counter", "service_stopped")).await;
    let kinds: Vec<&str> = frames.iter().map(|f| f.event.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "service_deployed",
            "service_started",
            "service_kill_requested",
            "service_stopped"
        ]
    );
    let frames = frames_until(&mut both, |f| is_event(f, "counter", "service_stopped")).await;
    let kinds: Vec<&str> = frames.iter().map(|f| f.event.as_str()).collect();
    assert_eq!(kinds, ["service_deployed", "service_stopped"]);

    // Last-Event-ID wins over ?from= and resumes after it.
    let (_, mut resumed) = node.events("?from=1", "a", Some(echo_seq)).await;
    let next = next_frame(&mut resumed).await.unwrap();
    assert_eq!(next.id, echo_seq + 1);

    node.get("/events?kinds=service_exploded", "a")
        .await
        .error(400, "invalid_argument");
    node.get("/events?from=first", "a").await.error(400, "invalid_argument");
    node.get("/events?colour=red", "a").await.error(400, "invalid_argument");
    let bad_resume = send(node.request(Method::GET, "/events", "a").header("last-event-id", "abc")).await;
    bad_resume.error(400, "invalid_argument");
    // An empty one names no event (the SSE spec's empty last event id): `from` decides.
    let empty = node
        .request(Method::GET, "/events?from=1", "")
        .header("last-event-id", "")
        .send()
        .await
        .unwrap();
    assert_eq!(empty.status(), 200);
    let first = RawSse::new(empty).next_frame().await;
    assert!(first.contains(&"id: 1".to_string()), "{first:?}");
    // A resume point this node never reached is refused, not waited for: it comes from another
    // node or from before a restore, and waiting would skip the events in between.
    let head = node.get("/health", "a").await.json["head_seq"].as_u64().unwrap();
    let past = node.get(&format!("/events?from={}", head + 1000), "a").await;
    assert!(
        past.error(400, "invalid_argument")
            .contains("this node's log ends at seq"),
        "{past:?}"
    );
    for last in [(head + 1000).to_string(), u64::MAX.to_string()] {
        let ahead = send(node.request(Method::GET, "/events", "a").header("last-event-id", &last)).await;
        // Named as sent, not as the seq after it.
        let message = ahead.error(400, "invalid_argument");
        assert!(message.starts_with(&format!("Last-Event-ID {last}")), "{message}");
    }
    drop((all, started, counter, both, resumed));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_from_now_opens_with_the_head_as_its_id() {
    let node = node(|_| {}).await;
    let deployed = node.deploy("a", "echo", "echo").await;
    let seq = deployed.ok(201)["deploy"]["seq"].as_u64().unwrap();
    let response = send_stream(node.request(Method::GET, "/events", "a")).await;
    let mut raw = RawSse::new(response);
    // Before anything else happens: a progress frame, so that a reconnect sends a
    // Last-Event-ID and misses nothing committed in between.
    let first = raw.next_frame().await;
    let id = progress_id(&first);
    assert!(id >= seq, "{first:?}");
    node.stop().await;
}

/// The seq a progress frame names, checking it is one: its id, its type, and its data (which
/// every client keeps the id of; some drop a frame without data, id and all).
fn progress_id(frame: &[String]) -> u64 {
    let [id, event, data] = frame else {
        panic!("a progress frame has three lines: {frame:?}")
    };
    let id: u64 = id
        .strip_prefix("id: ")
        .expect("an id")
        .parse()
        .expect("the id is a seq");
    assert_eq!(event, "event: progress");
    assert_eq!(data, &format!("data: {{\"head_seq\":{id}}}"));
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_sends_progress_frames_while_filtering() {
    let node = node(|c| c.solo.sse_keepalive_ms = 200).await;
    let response = send_stream(node.request(Method::GET, "/events?kinds=service_stopped", "a")).await;
    let mut raw = RawSse::new(response);
    let deployed = node.deploy("a", "echo", "echo").await;
    let seq = deployed.ok(201)["deploy"]["seq"].as_u64().unwrap();
    // Progress frames, and no event, until one moves the id past the deploy.
    loop {
        let frame = raw.next_frame().await;
        if frame.iter().all(|l| l.starts_with(':')) {
            continue;
        }
        if progress_id(&frame) >= seq {
            break;
        }
    }
    // The kill's service_stopped passes the filter, as a full frame with one data line.
    node.delete("/services/echo", "a").await.ok(202);
    let frame = loop {
        let frame = raw.next_frame().await;
        if frame.iter().any(|l| l == "event: service_stopped") {
            break frame;
        }
        assert!(
            frame.iter().all(|l| l.starts_with(':')) || frame.contains(&"event: progress".to_string()),
            "a filtered-out event was sent: {frame:?}"
        );
    };
    assert_eq!(frame.len(), 3, "{frame:?}");
    assert!(frame[0].starts_with("id: "));
    assert_eq!(frame[1], "event: service_stopped");
    let data: Value = serde_json::from_str(frame[2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(data["kind"], "service_stopped");
    assert_eq!(frame[0], format!("id: {}", data["seq"]));
    drop(raw);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resume_with_last_event_id_is_gap_free_under_concurrent_writes() {
    const SERVICES: usize = 12;
    let node = dev_node().await;
    let head = node.head().await;
    let (_, mut first) = node.events("", "a", None).await;

    // Another task deploys and kills services while the stream is read, dropped and resumed.
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let writer = {
        let (http, base) = (node.http.clone(), node.base.clone());
        let deploy = move |id: String| {
            let body = json!({ "service_id": id, "wat": wat_text("echo") });
            http.post(format!("{base}/services"))
                .header("x-tenant-id", "a")
                .json(&body)
        };
        let (http, base) = (node.http.clone(), node.base.clone());
        let kill = move |id: String| http.delete(format!("{base}/services/{id}")).header("x-tenant-id", "a");
        tokio::spawn(async move {
            for i in 0..SERVICES {
                let deployed = send(deploy(format!("s{i}"))).await;
                let seq = deployed.ok(201)["deploy"]["seq"].as_u64().unwrap();
                send(kill(format!("s{i}"))).await.ok(202);
                let _ = done_tx.send(seq);
            }
            // The sentinel: everything before it is in the log when it is.
            send(deploy("sentinel".into())).await.ok(201)["deploy"]["seq"]
                .as_u64()
                .unwrap()
        })
    };

    let mut seen: Vec<u64> = Vec::new();
    for _ in 0..8 {
        seen.push(next_frame(&mut first).await.unwrap().id);
    }
    let last = *seen.last().unwrap();
    drop(first);
    // Let more writes land while no one is connected: deploys after the last event seen.
    let mut after_drop = 0;
    while after_drop < 3 {
        let seq = done.recv().await.expect("the writer goes on");
        if seq > last {
            after_drop += 1;
        }
    }
    let (_, mut resumed) = node.events("", "a", Some(last)).await;
    let rest = frames_until(&mut resumed, |f| is_event(f, "sentinel", "service_deployed")).await;
    let sentinel = writer.await.expect("the writer finishes");
    seen.extend(rest.iter().map(|f| f.id));
    assert_eq!(seen.last().copied(), Some(sentinel));

    let unique: BTreeSet<u64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "duplicates in {seen:?}");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "out of order: {seen:?}");
    // Only tenant a writes after `head`, so its events are the whole log from there.
    let expected: Vec<u64> = (head + 1..=sentinel).collect();
    assert_eq!(seen, expected, "a gap or an extra event");
    // And it is exactly what a full replay shows for that range.
    let (_, mut replay) = node.events("?from=1", "a", None).await;
    let truth = frames_until(&mut replay, |f| f.id == sentinel).await;
    let truth: Vec<u64> = truth.iter().map(|f| f.id).filter(|&s| s > head).collect();
    assert_eq!(seen, truth);
    assert!(
        rest.len() > 3 * 2,
        "the resumed stream carried the writes made while disconnected"
    );
    drop((resumed, replay));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_resumes_after_last_event_id() {
    // A log stream's frames carry `id: <log>-<line>`, so an EventSource that reconnects sends
    // `Last-Event-ID` with the last line it got, and must not get that line again.
    let node = dev_node().await;
    node.deploy_running("a", "echo", "echo").await;
    let follow = |last_event_id: &str| {
        let request = node.request(Method::GET, "/services/echo/logs?follow=true", "a");
        let request = request.header("last-event-id", last_event_id);
        async move { Box::pin(send_stream(request).await.bytes_stream().eventsource()) as SseStream }
    };
    let mut first: SseStream = Box::pin(
        send_stream(node.request(Method::GET, "/services/echo/logs?follow=true", "a"))
            .await
            .bytes_stream()
            .eventsource(),
    );
    let line_one = next_frame(&mut first).await.expect("a line");
    drop(first);
    assert_eq!(line_one.id, 1);
    let mut resumed = follow(&line_one.raw_id).await;
    node.delete("/services/echo", "a").await.ok(202);
    let frame = next_frame(&mut resumed).await.expect("a line");
    assert_eq!(
        (frame.id, frame.data["message"].as_str()),
        (2, Some("echo stopping")),
        "line 1 was delivered before the reconnect and came again"
    );
    drop(resumed);
    // The service removed and deployed again has a new log, numbered from 1: a reconnect with
    // an id of the old one gets all of the new one, rather than skipping its first lines or
    // being refused.
    node.delete("/services/echo?purge=true", "a").await;
    let deadline = Instant::now() + DEADLINE;
    while node.get("/services/echo", "a").await.status != StatusCode::NOT_FOUND {
        assert!(Instant::now() < deadline, "the service was never removed");
        node.delete("/services/echo?purge=true", "a").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.deploy_running("a", "echo", "echo").await;
    let mut anew = follow(&frame.raw_id).await;
    let first_of_new = next_frame(&mut anew).await.expect("a line");
    assert_eq!(
        (first_of_new.id, first_of_new.data["message"].as_str()),
        (1, Some("echo ready"))
    );
    assert_ne!(first_of_new.raw_id, line_one.raw_id, "another log, another id");
    drop(anew);
    // A read of the lines names their log as the stream's ids do, so a poller can resume too.
    let read = node.get("/services/echo/logs", "a").await;
    let read = read.ok(200);
    let (log, line) = first_of_new.raw_id.split_once('-').expect("<log>-<line>");
    assert_eq!(
        (read["log_id"].as_str(), read["lines"][0]["seq"].as_u64()),
        (Some(log), line.parse().ok())
    );
    // An id past the log's last line, as an EventSource sends to a node restarted since (its
    // lines numbered afresh), is refused rather than left waiting for the log to catch up.
    node.deploy_running("a", "echo2", "echo").await;
    let reply = node
        .request(Method::GET, "/services/echo2/logs?follow=true", "a")
        .header("last-event-id", "41")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 400);
    let body: serde_json::Value = reply.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("numbered afresh"), "{body}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_time_limit_are_408_json() {
    let node = node(|c| c.solo.http_request_timeout_ms = 1000).await;
    let body = json!({
        "service_id": "spin",
        "wat": wat_text("spin"),
        "limits": { "cpu_ms_per_call": 5000, "call_timeout_ms": 5000 },
    });
    let deployed = node.post_json("/services", "a", &body).await;
    let seq = deployed.ok(201)["deploy"]["seq"].as_u64().unwrap();
    node.wait_event("a", seq, "spin", "service_started").await;
    let started = Instant::now();
    let reply = node.call("a", "spin", "3000").await;
    let message = reply.error(408, "deadline_exceeded");
    assert!(message.contains("in time"), "{message}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "answered at the limit, not when the guest finished"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_and_sse_work_over_http2_cleartext() {
    let mut node = dev_node().await;
    node.http = Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .expect("an HTTP/2 client");
    let response = send_stream(node.request(Method::GET, "/health", "")).await;
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let (headers, mut stream) = node.events("", "a", None).await;
    assert_eq!(headers["content-type"], "text/event-stream");
    let deployed = node.deploy("a", "echo", "echo").await;
    let seq = deployed.ok(201)["deploy"]["seq"].as_u64().unwrap();
    let frame = next_frame(&mut stream).await.expect("an event over HTTP/2");
    assert_eq!((frame.id, frame.event.as_str()), (seq, "service_deployed"));
    node.get("/nope", "a").await.error(404, "not_found");
    drop(stream);
    node.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Tenant isolation
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_on_every_route() {
    let node = dev_node().await;
    let (_, mut b_events) = node.events("?from=1", "b", None).await;
    let a_deploy = node.deploy_running("a", "svc", "echo").await;
    let a_sha = a_deploy["module_sha256"].as_str().unwrap().to_string();

    node.get("/services/svc", "b").await.error(404, "not_found");
    node.delete("/services/svc", "b").await.error(404, "not_found");
    node.call("b", "svc", "x").await.error(404, "not_found");
    node.get("/services/svc/logs", "b").await.error(404, "not_found");
    node.get("/services/svc/logs?follow=true", "b")
        .await
        .error(404, "not_found");
    let (_, mut b_filtered) = node.events("?from=1&service_id=svc", "b", None).await;
    let listed = node.get("/services", "b").await;
    assert_eq!(listed.ok(200)["total"], 0);
    assert_eq!(listed.json["services"], json!([]));
    // b's kill attempt changed nothing of a's.
    assert_eq!(node.get("/services/svc", "a").await.ok(200)["status"], "running");

    // PUT over a's id creates b's own, separate service.
    let put = send(
        node.request(Method::PUT, "/services/svc", "b")
            .header("content-type", "text/plain")
            .body(wat_text("counter")),
    )
    .await;
    let b_body = put.ok(201).clone();
    assert_eq!(
        (b_body["tenant"].as_str(), b_body["version"].as_u64()),
        (Some("b"), Some(1))
    );
    assert_eq!(b_body["deploy"]["created"], true);
    node.wait_event("b", b_body["deploy"]["seq"].as_u64().unwrap(), "svc", "service_started")
        .await;
    assert_eq!(node.call("b", "svc", "").await.bytes, b"1", "b reaches its counter");
    assert_eq!(
        node.call("a", "svc", "ping").await.bytes,
        b"ping",
        "a still reaches its echo"
    );
    let a_status = node.get("/services/svc", "a").await;
    assert_eq!(
        (
            a_status.json["version"].as_u64(),
            a_status.json["module_sha256"].as_str()
        ),
        (Some(1), Some(a_sha.as_str()))
    );
    assert_eq!(a_status.json["calls"], 1);
    let a_list = node.get("/services", "a").await;
    assert_eq!(a_list.ok(200)["total"], 1);
    assert_eq!(a_list.json["services"][0]["tenant"], "a");
    // The admin (no tenant in development mode) sees both.
    assert_eq!(node.get("/services", "").await.ok(200)["total"], 2);

    // b kills its own; a's runs on.
    let killed = node.delete("/services/svc", "b").await;
    let kill_seq = killed.ok(202)["seq"].as_u64().unwrap();
    node.wait_event("b", kill_seq, "svc", "service_stopped").await;
    assert_eq!(node.get("/services/svc", "a").await.json["status"], "running");
    assert_eq!(node.call("a", "svc", "still").await.bytes, b"still");

    // b's streams carried only b's events; a's only a's.
    let frames = frames_until(&mut b_events, |f| is_event(f, "svc", "service_stopped")).await;
    assert!(frames.iter().all(|f| f.data["tenant"] == "b"), "{frames:?}");
    assert_eq!(
        frames.len(),
        4,
        "deployed, started, kill requested, stopped: {frames:?}"
    );
    let frames = frames_until(&mut b_filtered, |f| is_event(f, "svc", "service_stopped")).await;
    assert!(frames.iter().all(|f| f.data["tenant"] == "b"), "{frames:?}");
    let a_done = node.deploy("a", "done", "echo").await.ok(201)["deploy"]["seq"]
        .as_u64()
        .unwrap();
    let (_, mut a_events) = node.events("?from=1", "a", None).await;
    let frames = frames_until(&mut a_events, |f| f.id == a_done).await;
    assert!(frames.iter().all(|f| f.data["tenant"] == "a"), "{frames:?}");
    assert_eq!(frames.len(), 3, "svc deployed, svc started, done deployed: {frames:?}");
    // A malformed tenant name is refused, not mapped to some tenant.
    let bad = node.get("/services", "Not A Tenant!").await;
    assert!(bad.error(400, "invalid_argument").contains("x-tenant-id"));
    // Tenant b naming tenant a in the query is acting for another tenant: refused as such.
    let reply = node.get("/services?tenant=a", "b").await;
    assert!(
        reply
            .error(403, "permission_denied")
            .contains("cannot act for tenant 'a'")
    );
    drop((b_events, b_filtered, a_events));
    node.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Parity with gRPC
// ---------------------------------------------------------------------------------------------

fn grpc_status_json(s: &solo::proto::ServiceStatus) -> Value {
    let l = s.limits.unwrap_or_default();
    json!({
        "service_id": s.service_id,
        "tenant": s.tenant,
        "version": s.version,
        "status": s.status,
        "module_sha256": s.module_sha256,
        "labels": s.labels,
        "limits": {
            "memory_bytes": l.memory_bytes,
            "call_timeout_ms": l.call_timeout_ms,
            "cpu_ms_per_call": l.cpu_ms_per_call,
            "mailbox_capacity": l.mailbox_capacity,
            "max_restarts": l.max_restarts,
            "restart_window_ms": l.restart_window_ms,
        },
        "created_at_ms": s.created_at_ms,
        "updated_at_ms": s.updated_at_ms,
        "restarts": s.restarts,
        "memory_bytes": s.memory_bytes,
        "calls": s.calls,
        "calls_failed": s.calls_failed,
        "last_error": s.last_error,
        "uptime_ms": s.uptime_ms,
        "cpu_ms": s.cpu_ms,
        "module_size": s.module_size,
        "desired": s.desired,
        "last_seq": s.last_seq,
    })
}

fn without(mut value: Value, keys: &[&str]) -> Value {
    if let Value::Object(map) = &mut value {
        for key in keys {
            map.remove(*key);
        }
    }
    value
}

/// Reads a gRPC Watch, keeping events as JSON, up to and including the first of `kind`.
async fn grpc_events_until(
    watch: &mut tonic::Streaming<solo::proto::WatchResponse>,
    events: &mut Vec<Value>,
    kind: &str,
) {
    loop {
        let message = tokio::time::timeout(DEADLINE, watch.message())
            .await
            .expect("an event in time")
            .expect("the watch reads")
            .expect("the watch goes on");
        if let Some(solo::proto::watch_response::Msg::Event(event)) = message.msg {
            let json = solo::event::to_json(&event);
            events.push(json.clone());
            if json["kind"] == kind {
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_rest_agree_on_one_scenario() {
    use solo::proto::{CallRequest, KillRequest, StatusRequest, WatchRequest};

    // Through gRPC on one node.
    let grpc_node = dev_node().await;
    let mut client = grpc_client(&grpc_node.server).await;
    let mut watch = client
        .watch(as_tenant(
            "acme",
            WatchRequest {
                from_seq: 1,
                ..Default::default()
            },
        ))
        .await
        .expect("watch")
        .into_inner();
    let mut grpc_events = Vec::new();
    let deployed = client
        .deploy(as_tenant("acme", grpc_deploy("echo", "echo")))
        .await
        .expect("deploy")
        .into_inner();
    grpc_events_until(&mut watch, &mut grpc_events, "service_started").await;
    let called = client
        .call(as_tenant(
            "acme",
            CallRequest {
                service_id: "echo".into(),
                payload: b"hello".to_vec(),
                timeout_ms: 0,
            },
        ))
        .await
        .expect("call")
        .into_inner();
    let killed = client
        .kill(as_tenant(
            "acme",
            KillRequest {
                service_id: "echo".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("kill")
        .into_inner();
    grpc_events_until(&mut watch, &mut grpc_events, "service_stopped").await;
    let grpc_status = client
        .status(as_tenant(
            "acme",
            StatusRequest {
                service_id: "echo".into(),
            },
        ))
        .await
        .expect("status")
        .into_inner();
    let grpc_status = grpc_status_json(&grpc_status);
    let rest_on_grpc_node = grpc_node.get("/services/echo", "acme").await.ok(200).clone();

    // Through REST on another, fresh node.
    let rest_node = dev_node().await;
    let (_, mut stream) = rest_node.events("?from=1", "acme", None).await;
    let rest_deployed = rest_node.deploy("acme", "echo", "echo").await.ok(201).clone();
    let mut rest_events = frames_until(&mut stream, |f| f.event == "service_started").await;
    let rest_called = rest_node.call("acme", "echo", "hello").await;
    let rest_killed = rest_node.delete("/services/echo", "acme").await.ok(202).clone();
    rest_events.extend(frames_until(&mut stream, |f| f.event == "service_stopped").await);
    let rest_status = rest_node.get("/services/echo", "acme").await.ok(200).clone();

    // The same answers...
    let d = &rest_deployed["deploy"];
    assert_eq!(d["version"].as_u64(), Some(deployed.version));
    assert_eq!(d["seq"].as_u64(), Some(deployed.seq));
    assert_eq!(d["created"].as_bool(), Some(deployed.created));
    assert_eq!(d["unchanged"].as_bool(), Some(deployed.unchanged));
    assert_eq!(d["module_sha256"].as_str(), Some(deployed.module_sha256.as_str()));
    assert_eq!(rest_called.bytes, called.payload);
    assert_eq!(rest_killed["seq"].as_u64(), Some(killed.seq));
    assert_eq!(rest_killed["already_stopped"].as_bool(), Some(killed.already_stopped));
    // ...the same status, field for field, but for the clock...
    let rest_status = without(rest_status, &["events"]);
    assert_eq!(
        without(rest_status.clone(), &TIME_FIELDS),
        without(grpc_status.clone(), &TIME_FIELDS)
    );
    assert_eq!(
        without(
            rest_on_grpc_node,
            &["events"].iter().chain(&TIME_FIELDS).copied().collect::<Vec<_>>()
        ),
        without(grpc_status, &TIME_FIELDS),
        "REST and gRPC on one node show one status"
    );
    // ...and the same events, in the same order.
    let rest_kinds: Vec<&str> = rest_events.iter().map(|f| f.event.as_str()).collect();
    let grpc_kinds: Vec<&str> = grpc_events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(rest_kinds, grpc_kinds);
    assert_eq!(
        rest_kinds,
        [
            "service_deployed",
            "service_started",
            "service_kill_requested",
            "service_stopped"
        ]
    );
    let rest_data: Vec<Value> = rest_events
        .iter()
        .map(|f| without(f.data.clone(), &["timestamp_ms"]))
        .collect();
    let grpc_data: Vec<Value> = grpc_events
        .iter()
        .map(|e| without(e.clone(), &["timestamp_ms"]))
        .collect();
    assert_eq!(rest_data, grpc_data);
    drop(stream);
    drop(watch);
    grpc_node.stop().await;
    rest_node.stop().await;
}

// ---------------------------------------------------------------------------------------------
// docs/openapi.yaml
// ---------------------------------------------------------------------------------------------

const HTTP_METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// A message a client can take in any header: at most 1 KiB.
#[track_caller]
fn assert_bounded(message: &str) {
    assert!(message.len() <= 1024, "{} bytes", message.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_quoting_long_input_are_cut_and_keep_their_shape() {
    let node = dev_node().await;
    let put_wat = |line: String| {
        node.request(Method::PUT, "/services/wat", "a")
            .header("content-type", "text/plain")
            .body(line)
    };
    // One line with a syntax error, of 20 KB and of 1.5 MiB: the JSON error, cut.
    for len in [20_000, 3 << 19] {
        let wat = format!("(module (func (result i32) (i32.const 1) {}))", "x".repeat(len));
        let reply = send(put_wat(wat)).await;
        let message = reply.error(400, "invalid_argument");
        assert_bounded(message);
        assert!(
            message.contains("WAT syntax error") && message.contains("… (message cut; it was"),
            "{message}"
        );
    }
    // A long id is abbreviated, so the rule after it survives.
    let body = json!({ "service_id": "a".repeat(20_000), "wat": wat_text("echo") });
    let reply = node.post_json("/services", "a", &body).await;
    let message = reply.error(400, "invalid_argument");
    assert_bounded(message);
    assert!(message.contains("use 1 to 128 characters"), "{message}");
    let reply = node.get(&format!("/services/{}", "b".repeat(5000)), "a").await;
    assert_bounded(reply.error(400, "invalid_argument"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_request_ids_are_replaced_by_generated_ones() {
    let node = dev_node().await;
    let with_id = |id: reqwest::header::HeaderValue| {
        node.request(Method::GET, "/services/nope", "a")
            .header("x-request-id", id)
    };
    let longest = "r".repeat(128);
    let kept = send(with_id(longest.parse().unwrap())).await;
    kept.error(404, "not_found");
    assert_eq!(kept.json["request_id"], longest.as_str());
    let unusable = [
        "r".repeat(129).into_bytes(),
        "x".repeat(8192).into_bytes(),
        "café".as_bytes().to_vec(),
        b"has space".to_vec(),
    ];
    for id in unusable {
        let reply = send(with_id(reqwest::header::HeaderValue::from_bytes(&id).unwrap())).await;
        reply.error(404, "not_found"); // the body's id is the header's
        let generated = reply.header("x-request-id").unwrap();
        assert!(
            generated.len() == 16 && generated.bytes().all(|b| b.is_ascii_hexdigit()),
            "{generated}"
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_declared_wasm_that_is_not_wasm_is_refused_with_a_hint() {
    let node = dev_node().await;
    let put = |content_type: &str, body: Vec<u8>| {
        node.request(Method::PUT, "/services/svc", "a")
            .header("content-type", content_type)
            .body(body)
    };
    for (body, detail) in [(b"hello".to_vec(), "these 5 bytes do not"), (Vec::new(), "it is empty")] {
        let reply = send(put("application/wasm", body)).await;
        let message = reply.error(400, "invalid_argument");
        assert!(
            message.contains("application/wasm is not a wasm binary")
                && message.contains("\\0asm")
                && message.contains(detail)
                && message.contains("text/plain"),
            "{message}"
        );
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(wat_text("echo"));
    let reply = node
        .post_json("/services", "a", &json!({ "service_id": "svc", "wasm_base64": b64 }))
        .await;
    let message = reply.error(400, "invalid_argument");
    assert!(
        message.contains("`wasm_base64` is not a wasm binary") && message.contains("the `wat` field"),
        "{message}"
    );
    assert_eq!(node.get("/services", "a").await.ok(200)["total"], 0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_types_are_case_insensitive() {
    let node = dev_node().await;
    for (id, content_type) in [("upper", "TEXT/PLAIN"), ("mixed", "Text/Plain; Charset=UTF-8")] {
        let reply = send(
            node.request(Method::PUT, &format!("/services/{id}"), "a")
                .header("content-type", content_type)
                .body(wat_text("echo")),
        )
        .await;
        reply.ok(201);
    }
    let reply = send(
        node.request(Method::PUT, "/services/bin", "a")
            .header("content-type", "Application/WASM")
            .body(wasm_bytes("echo")),
    )
    .await;
    reply.ok(201);
    let body = json!({ "service_id": "json", "wat": wat_text("echo") });
    let reply = send(
        node.request(Method::POST, "/services", "a")
            .header("content-type", "APPLICATION/JSON; charset=utf-8")
            .body(body.to_string()),
    )
    .await;
    reply.ok(201);
    node.stop().await;
}

/// `paths:` of an OpenAPI document: each path and its methods, each method with whether it has
/// `responses:`. Relies on block style with two-space indentation, as the file is written.
fn documented_operations(yaml: &str) -> BTreeMap<String, BTreeMap<String, bool>> {
    let mut paths: BTreeMap<String, BTreeMap<String, bool>> = BTreeMap::new();
    let mut in_paths = false;
    let mut path: Option<String> = None;
    let mut method: Option<String> = None;
    for line in yaml.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let key = trimmed
            .strip_suffix(':')
            .or_else(|| trimmed.split_once(": ").map(|(k, _)| k))
            .map(|k| k.trim_matches(|c| c == '"' || c == '\''));
        match indent {
            0 => {
                in_paths = trimmed == "paths:";
                path = None;
                method = None;
            }
            _ if !in_paths => {}
            2 => {
                let key = key.unwrap_or_else(|| panic!("a path key: {line}"));
                paths.entry(key.to_string()).or_default();
                path = Some(key.to_string());
                method = None;
            }
            4 => {
                method = None;
                if let (Some(path), Some(key)) = (&path, key)
                    && HTTP_METHODS.contains(&key)
                {
                    paths.get_mut(path).unwrap().insert(key.to_string(), false);
                    method = Some(key.to_string());
                }
            }
            6 => {
                if let (Some(path), Some(method), Some("responses")) = (&path, &method, key) {
                    paths.get_mut(path).unwrap().insert(method.clone(), true);
                }
            }
            _ => {}
        }
    }
    paths
}

#[test]
fn openapi_documents_every_route_and_method() {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.yaml");
    let yaml = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert!(
        yaml.lines().any(|l| l.starts_with("openapi: 3.1")),
        "docs/openapi.yaml declares OpenAPI 3.1"
    );
    let documented = documented_operations(&yaml);
    for (route, methods) in solo::api::rest::ROUTES {
        let operations = documented
            .get(*route)
            .unwrap_or_else(|| panic!("{route} is not in docs/openapi.yaml"));
        for method in *methods {
            let has_responses = operations
                .get(*method)
                .unwrap_or_else(|| panic!("{} {route} is not in docs/openapi.yaml", method.to_uppercase()));
            assert!(
                has_responses,
                "{} {route} documents no responses",
                method.to_uppercase()
            );
        }
    }
    // Nothing documented that the router does not serve.
    for (path, operations) in &documented {
        let methods = solo::api::rest::ROUTES
            .iter()
            .find(|(r, _)| r == path)
            .map(|(_, m)| *m)
            .unwrap_or_else(|| panic!("docs/openapi.yaml documents {path}, which the router does not serve"));
        for method in operations.keys() {
            assert!(
                methods.contains(&method.as_str()),
                "docs/openapi.yaml documents {} {path}, which the router does not serve",
                method.to_uppercase()
            );
        }
    }
    // Every error code is in the error schema, mapped to its status.
    use solo::api::ErrorKind as K;
    for kind in [
        K::InvalidArgument,
        K::Unauthenticated,
        K::PermissionDenied,
        K::NotFound,
        K::IdempotencyKeyReused,
        K::FailedPrecondition,
        K::QuotaExceeded,
        K::Overloaded,
        K::DeadlineExceeded,
        K::ServiceTrapped,
        K::ServiceError,
        K::ShuttingDown,
        K::Unavailable,
        K::InsufficientStorage,
        K::PayloadTooLarge,
        K::UnsupportedMediaType,
        K::MethodNotAllowed,
        K::NotImplemented,
        K::Internal,
    ] {
        assert!(
            yaml.contains(&format!("- {}", kind.as_str())),
            "error code {} is not listed in docs/openapi.yaml",
            kind.as_str()
        );
        let status = kind.http_status().as_u16();
        assert!(
            yaml.contains(&format!("{}: '{status}'", kind.as_str())),
            "x-http-status does not map {} to {status}",
            kind.as_str()
        );
    }
    // The fields of a service are the ones the handlers send.
    for field in SERVICE_FIELDS {
        assert!(
            yaml.contains(&format!("        {field}:")),
            "Service.{field} is not documented"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_headers_or_silent_is_disconnected_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let node = node(|c| c.solo.http_header_timeout_ms = 300).await;
    let address = node.base.trim_start_matches("http://").to_string();
    let mut slow = tokio::net::TcpStream::connect(&address).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: solo\r\n").await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    // The headers never end: the node hangs up (after a 408, if it sends one).
    let read = tokio::time::timeout(DEADLINE, slow.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the connection is closed");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // A connection that sends nothing at all is closed too.
    let mut silent = tokio::net::TcpStream::connect(&address).await.unwrap();
    let read = tokio::time::timeout(DEADLINE, silent.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the silent connection is closed");
    // A short request (shorter than an HTTP/2 client's opening) is served, and its stream
    // outlives the timeout.
    let mut short = tokio::net::TcpStream::connect(&address).await.unwrap();
    short.write_all(b"GET /events HTTP/1.0\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(DEADLINE, short.read(&mut byte))
            .await
            .expect("answered");
        assert_eq!(
            read.unwrap(),
            1,
            "the head ended early: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.0 200"), "{}", String::from_utf8_lossy(&head));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut more = [0u8; 256];
    match tokio::time::timeout(Duration::from_millis(300), short.read(&mut more)).await {
        Err(_) => {}             // still open, with nothing to say: as it should be
        Ok(Ok(n)) if n > 0 => {} // a keep-alive comment
        other => panic!("the stream was cut: {other:?}"),
    }
    // Clients that send their requests are served as ever.
    node.get("/health", "").await.ok(200);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_until_one_closes() {
    let node = node(|c| c.solo.max_connections = 2).await;
    let address = node.base.trim_start_matches("http://").to_string();
    let first = tokio::net::TcpStream::connect(&address).await.unwrap();
    let _second = tokio::net::TcpStream::connect(&address).await.unwrap();
    // Both slots are held by silent connections: a third client's request waits...
    let waiting = tokio::spawn({
        let url = node.url("/health");
        async move { client().get(url).send().await.map(|r| r.status()) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "served past the cap");
    // ...until one closes.
    drop(first);
    let status = tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("served once a slot is free");
    assert_eq!(status.unwrap().unwrap(), StatusCode::OK);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_grace_bounds_the_shutdown_and_a_call_it_cuts_off_is_unavailable() {
    let node = dev_node().await;
    let body = json!({
        "service_id": "spin",
        "wat": wat_text("spin"),
        "limits": { "call_timeout_ms": 20000, "cpu_ms_per_call": 20000 },
    });
    let seq = node.post_json("/services", "a", &body).await.ok(201)["deploy"]["seq"]
        .as_u64()
        .unwrap();
    node.wait_event("a", seq, "spin", "service_started").await;
    // A 15 s call is in flight when the shutdown comes with a 2 s grace.
    let request = node.request(Method::POST, "/services/spin/call", "a").body("15000");
    let call = tokio::spawn(async move { request.send().await.map(|r| r.status().as_u16()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    send(node.request(Method::POST, "/shutdown?grace_ms=2000", ""))
        .await
        .ok(202);
    let Node { server, _dir: dir, .. } = node;
    tokio::time::timeout(DEADLINE, server.stopped())
        .await
        .expect("the server stops")
        .expect("cleanly");
    // The requests' wait and the services' stop share the one grace: not a grace each (4 s).
    let took = started.elapsed();
    assert!(took < Duration::from_millis(3500), "the shutdown took {took:?}");
    let cut_off = tokio::time::timeout(DEADLINE, call)
        .await
        .expect("the call ends")
        .unwrap();
    assert!(
        matches!(cut_off, Ok(503)),
        "a call cut off by the shutdown is retryable: {cut_off:?}"
    );
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_in_flight_share_one_budget_and_small_ones_always_pass() {
    use tokio::io::AsyncWriteExt as _;
    let node = node(|c| {
        c.solo.max_request_bytes = 600 << 10;
        c.solo.max_in_flight_body_bytes = 1 << 20;
    })
    .await;
    node.deploy_running("a", "echo", "echo").await;
    // An upload of 590 KiB under way (declared, barely sent) holds its share of the budget...
    let address = node.base.trim_start_matches("http://").to_string();
    let mut slow = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /services/echo/call HTTP/1.1\r\nhost: solo\r\nx-tenant-id: a\r\ncontent-length: {}\r\n\r\n",
        590 << 10
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(b"the start").await.unwrap();
    // ...so another body of as much, over REST or gRPC, does not fit, and is refused with a hint.
    let big_wat = format!("{}\n;; {}", wat_text("echo"), "x".repeat(575 << 10));
    let big_deploy = json!({ "service_id": "big", "wat": big_wat });
    let deadline = Instant::now() + DEADLINE;
    let refused = loop {
        let reply = node.post_json("/services", "b", &big_deploy).await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            break reply;
        }
        assert!(
            Instant::now() < deadline,
            "the upload under way never held the budget: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        refused.error(429, "overloaded").contains("max_in_flight_body_bytes"),
        "{refused:?}"
    );
    assert!(refused.header("retry-after").is_some(), "{refused:?}");
    let mut grpc = grpc_client(&node.server).await;
    let mut request = grpc_deploy("big", "echo");
    request.module = Some(solo::proto::deploy_request::Module::Wat(big_wat.clone()));
    let status = grpc.deploy(as_tenant("b", request.clone())).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("max_in_flight_body_bytes"), "{status:?}");
    assert!(status.metadata().get("retry-after-ms").is_some(), "{status:?}");
    // Small requests get through meanwhile, from any tenant; /metrics shows what is held.
    assert_eq!(node.call("a", "echo", "ping").await.bytes, b"ping");
    let held = node.metrics().await.value("solo_body_bytes_in_flight", &[]);
    assert!(held >= f64::from((590 - 64) << 10), "{held}");
    node.get("/services", "b").await.ok(200);
    // Once the upload is gone, its share is free again.
    drop(slow);
    let deadline = Instant::now() + DEADLINE;
    loop {
        match grpc.deploy(as_tenant("b", request.clone())).await {
            Ok(deployed) => {
                assert!(deployed.into_inner().created);
                break;
            }
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                assert!(Instant::now() < deadline, "the budget was never given back");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    node.stop().await;
}

/// Opens an upload to `path` with these header lines, declaring `length` bytes and sending a
/// few: read, it holds its bytes of the budget until the connection goes. Returns the
/// connection, and the answer if one came at once.
async fn open_upload(node: &Node, path: &str, headers: &str, length: usize) -> (tokio::net::TcpStream, Option<String>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let address = node.base.trim_start_matches("http://").to_string();
    let mut upload = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nhost: solo\r\n{headers}content-length: {length}\r\n\r\n");
    upload.write_all(head.as_bytes()).await.unwrap();
    upload.write_all(b"the start").await.unwrap();
    let mut answer = vec![0u8; 4096];
    let answer = match tokio::time::timeout(Duration::from_millis(300), upload.read(&mut answer)).await {
        Ok(Ok(n)) => Some(String::from_utf8_lossy(&answer[..n]).into_owned()),
        _ => None,
    };
    (upload, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_uploads_cannot_keep_anothers_out() {
    let node = node(|c| {
        c.solo.max_request_bytes = 600 << 10;
        c.solo.max_in_flight_body_bytes = 4 << 20;
        c.limits.max_module_bytes = 600 << 10;
        c.limits.max_in_flight_body_bytes = 1 << 20;
    })
    .await;
    node.deploy_running("a", "echo", "echo").await;
    // Tenant a's first upload of 590 KiB fits in its 1 MiB share; its second does not, though
    // the node has room, and is refused before it is read.
    let (_first, answer) = open_upload(&node, "/services/echo/call", "x-tenant-id: a\r\n", 590 << 10).await;
    assert_eq!(answer, None, "the first upload is being read");
    let deadline = Instant::now() + DEADLINE;
    let refused = loop {
        let (_second, answer) = open_upload(&node, "/services/echo/call", "x-tenant-id: a\r\n", 590 << 10).await;
        if let Some(answer) = answer {
            break answer;
        }
        assert!(Instant::now() < deadline, "tenant a's uploads were never bounded");
    };
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(
        refused.contains("tenant 'a'") && refused.contains("[limits] max_in_flight_body_bytes"),
        "{refused}"
    );
    let big_wat = format!("{}\n;; {}", wat_text("echo"), "x".repeat(575 << 10));
    let mut grpc = grpc_client(&node.server).await;
    let mut request = grpc_deploy("big", "echo");
    request.module = Some(solo::proto::deploy_request::Module::Wat(big_wat.clone()));
    let status = grpc.deploy(as_tenant("a", request.clone())).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("tenant 'a'"), "{status:?}");
    // Tenant b's uploads of as much go through, over both APIs.
    let deployed = node
        .post_json("/services", "b", &json!({ "service_id": "big", "wat": big_wat }))
        .await;
    assert_eq!(deployed.ok(201)["deploy"]["created"], true);
    let deployed = grpc.deploy(as_tenant("b", request)).await.unwrap().into_inner();
    assert!(!deployed.created, "the same deploy again");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_a_tenants_clients_do_not_read_fill_its_share_until_they_are_cut_off() {
    let node = node(|c| {
        c.solo.max_request_bytes = 1 << 20;
        c.solo.write_stall_timeout_ms = 3000;
        c.limits.max_in_flight_body_bytes = 16 << 20;
    })
    .await;
    // Answers every call with 16 MiB of its memory, the most an answer may be.
    let big = r#"(module (memory (export "memory") 257)
        (func (export "solo_alloc") (param i32) (result i32) (i32.const 1024))
        (func (export "solo_handle") (param i32 i32) (result i64) (i64.const 16777216)))"#;
    let deployed = node
        .post_json("/services", "a", &json!({ "service_id": "big", "wat": big }))
        .await;
    let seq = deployed.ok(201)["deploy"]["seq"].as_u64().unwrap();
    node.wait_event("a", seq, "big", "service_started").await;
    node.deploy_running("b", "echo", "echo").await;
    // Calls whose answers are never read: what the sockets cannot take stays in the node,
    // counted against tenant a's 16 MiB until a's next request is refused.
    let mut unread = Vec::new();
    let refused = loop {
        assert!(unread.len() < 16, "the unread answers were never counted");
        let (connection, _) = open_upload(&node, "/services/big/call", "x-tenant-id: a\r\n", 2).await;
        unread.push(connection);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reply = node.call("a", "echo-missing", "ping").await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            break reply;
        }
    };
    assert!(
        refused
            .error(429, "overloaded")
            .contains("read the answers already asked for"),
        "{refused:?}"
    );
    assert!(refused.header("retry-after").is_some(), "{refused:?}");
    let shed = node
        .metrics()
        .await
        .value("solo_shed_total", &[("scope", "body_bytes")]);
    assert!(shed >= 1.0, "the refusal is counted as shedding: {shed}");
    let mut grpc = grpc_client(&node.server).await;
    let call = solo::proto::CallRequest {
        service_id: "echo".into(),
        payload: b"ping".to_vec(),
        timeout_ms: 0,
    };
    let status = grpc.call(as_tenant("a", call.clone())).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    // Other tenants are not held back.
    assert_eq!(
        grpc.call(as_tenant("b", call)).await.unwrap().into_inner().payload,
        b"ping"
    );
    assert_eq!(node.call("b", "echo", "ping").await.bytes, b"ping");
    // Clients that take nothing for write_stall_timeout_ms are disconnected, though they never
    // close: their answers are let go, and tenant a is served again.
    let deadline = Instant::now() + DEADLINE;
    while node.call("a", "echo-missing", "ping").await.status == StatusCode::TOO_MANY_REQUESTS {
        assert!(Instant::now() < deadline, "the unread answers were never let go");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(unread);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_with_failed_credentials_is_refused_before_it_is_read() {
    let mut tokens = None;
    let node = node(|c| tokens = Some(tokens_config(c))).await;
    let (_, acme) = tokens.unwrap();
    // Also a body over the node's limit: a stranger learns of its credentials, not the limit.
    for length in [10_000_000, 30_000_000] {
        for authorization in ["", "authorization: Bearer solo_not_a_token\r\n"] {
            let (_upload, answer) = open_upload(&node, "/services", authorization, length).await;
            let answer = answer.expect("an answer before the body");
            assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
            assert!(answer.contains("\"unauthenticated\""), "{answer}");
        }
    }
    // Over gRPC, a large module from a stranger is refused as unauthenticated too.
    let mut grpc = grpc_client(&node.server).await;
    let mut request = grpc_deploy("big", "echo");
    request.module = Some(solo::proto::deploy_request::Module::Wat(format!(
        "{}\n;; {}",
        wat_text("echo"),
        "x".repeat(1 << 20)
    )));
    let status = grpc
        .deploy(with_token("solo_not_a_token", request.clone()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    // Nor does a stranger learn the node's message limit, or what its parser makes of bytes
    // that are not protobuf: its credentials are checked first.
    let mut over_the_limit = request.clone();
    over_the_limit.module = Some(solo::proto::deploy_request::Module::Wat("x".repeat(30 << 20)));
    for (what, deploy) in [
        ("no credentials", tonic::Request::new(over_the_limit.clone())),
        ("a wrong token", with_token("solo_not_a_token", over_the_limit)),
    ] {
        let status = grpc.deploy(deploy).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{what}: {status:?}");
    }
    let http2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let mut not_protobuf = vec![0u8];
    not_protobuf.extend(4u32.to_be_bytes());
    not_protobuf.extend([0xff; 4]);
    let reply = http2
        .post(format!("{}/solo.v1.SoloKernel/Status", node.server.grpc_url()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(not_protobuf)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.headers()["grpc-status"], "16", "{reply:?}");
    let refused = node.metrics().await.value(
        "solo_grpc_requests_total",
        &[("method", "Deploy"), ("code", "UNAUTHENTICATED")],
    );
    assert!(refused >= 3.0, "{refused}");
    // The tenant's own token gets it deployed.
    let deployed = grpc.deploy(with_token(&acme, request)).await.unwrap().into_inner();
    assert!(deployed.created);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_address_cannot_take_every_connection() {
    let node = node(|c| c.solo.max_connections_per_client = 2).await;
    let address = node.base.trim_start_matches("http://").to_string();
    let first = tokio::net::TcpStream::connect(&address).await.unwrap();
    let _second = tokio::net::TcpStream::connect(&address).await.unwrap();
    // A third connection from the same address is told why, and closed, in the shape of every
    // error: its request id, and when to retry.
    let reply = client()
        .get(node.url("/health"))
        .header("x-request-id", "third-one")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.headers()["x-request-id"], "third-one");
    assert_eq!(reply.headers()["retry-after"], "1");
    let body: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(body["request_id"], "third-one", "{body}");
    let refused = send(client().get(node.url("/health"))).await;
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.json["error"], "overloaded", "{refused:?}");
    assert_eq!(refused.json["request_id"].as_str().unwrap().len(), 16, "{refused:?}");
    assert!(
        refused.json["message"]
            .as_str()
            .unwrap()
            .contains("too many connections from this address (at most 2, [solo] max_connections_per_client)"),
        "{refused:?}"
    );
    // Once one closes, the address may connect again.
    drop(first);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = send(client().get(node.url("/health"))).await;
        if reply.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the closed connection was never counted out: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.stop().await;
}

/// A gRPC stream is counted as it ends, with the code it ended with: a Watch its client
/// dropped is CANCELLED, a log read to its end OK; neither is counted as it opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_are_counted_by_how_they_end() {
    let node = dev_node().await;
    node.deploy_running("a", "echo", "echo").await;
    let mut grpc = grpc_client(&node.server).await;
    let count = |metrics: &Prometheus, method: &str, code: &str| {
        metrics.value("solo_grpc_requests_total", &[("method", method), ("code", code)])
    };
    let watch = solo::proto::WatchRequest::default();
    let mut watch = grpc.watch(as_tenant("a", watch)).await.unwrap().into_inner();
    watch.next().await.expect("the opening progress").unwrap();
    let open = node.metrics().await;
    assert_eq!(
        (count(&open, "Watch", "OK"), count(&open, "Watch", "CANCELLED")),
        (0.0, 0.0)
    );
    drop(watch);
    let deadline = Instant::now() + DEADLINE;
    while count(&node.metrics().await, "Watch", "CANCELLED") < 1.0 {
        assert!(Instant::now() < deadline, "the dropped watch was never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = solo::proto::LogsRequest {
        service_id: "echo".into(),
        ..Default::default()
    };
    let lines: Vec<_> = grpc
        .logs(as_tenant("a", logs))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert!(lines.iter().all(Result::is_ok), "{lines:?}");
    let ended = node.metrics().await;
    assert_eq!(count(&ended, "Logs", "OK"), 1.0);
    assert_eq!(count(&ended, "Watch", "OK"), 0.0);
    node.stop().await;
}

/// What the request line and headers settle (a type that is no module, a service that is not
/// there, a bad parameter or key, a tenant acting for another) is answered before the body is
/// read: a client that asked `Expect: 100-continue` sends none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_the_headers_decide_come_before_the_body() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let node = dev_node().await;
    let address = node.base.trim_start_matches("http://").to_string();
    for (request, status) in [
        ("PUT /services/big HTTP/1.1\r\ncontent-type: image/png", "415"),
        ("POST /services/nothing/call HTTP/1.1", "404"),
        ("PUT /services/big?memory_bytes=abc HTTP/1.1", "400"),
        ("PUT /services/big?label=-x=1 HTTP/1.1", "400"),
        ("PUT /services/big?expected_version=x HTTP/1.1", "400"),
        ("PUT /services/bad%20id HTTP/1.1", "400"),
        ("PUT /services/big HTTP/1.1\r\nidempotency-key: a b", "400"),
        ("POST /services HTTP/1.1\r\ncontent-type: text/plain", "415"),
        ("POST /services?foo=1 HTTP/1.1\r\ncontent-type: application/json", "400"),
        (
            "POST /services HTTP/1.1\r\ncontent-type: application/json\r\nidempotency-key: a b",
            "400",
        ),
        (
            "POST /services?tenant=b HTTP/1.1\r\ncontent-type: application/json",
            "403",
        ),
        ("PUT /services/big?tenant=b HTTP/1.1", "403"),
        // Over max_request_bytes: a tenant acting for another learns that, not the limit.
        ("GET /services?tenant=b HTTP/1.1\r\ncontent-length: 99999999999", "403"),
    ] {
        let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
        let length = if request.contains("content-length") {
            ""
        } else {
            "content-length: 2000000\r\n"
        };
        let head = format!("{request}\r\nhost: solo\r\nx-tenant-id: a\r\n{length}expect: 100-continue\r\n\r\n");
        socket.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let read = tokio::time::timeout(DEADLINE, socket.read(&mut answer))
            .await
            .expect("answered without the body")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..read]).to_string();
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{request}: {answer}");
    }
    node.stop().await;
}
