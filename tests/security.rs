//! Tenants and limits, end to end (issue 6): a real node on port 0, real clients (tonic, reqwest),
//! certificates made here with rcgen.
//!
//! - Isolation: every gRPC RPC and every REST route (`solo::api::rest::ROUTES`) acts only on the
//!   caller's tenant; credentials are required once tokens exist; the admin acts for any tenant.
//! - Quotas at their edges (the last allowed, the first refused, nothing appended), per-tenant
//!   overrides, races for the last slot, quotas across a restart, and the instance pool.
//! - Load shedding under a burst, per tenant and per node, for requests and for streams; permits
//!   neither leak nor outlive their request.
//! - TLS on both listeners, plaintext refused, client certificates that name their tenant.
//! - Development mode only on loopback (library and `solo serve`); `solo config check` and
//!   `solo token new`.
//! - Tenant names and service ids outside their grammar are 400 / INVALID_ARGUMENT everywhere.
//!
//! Matrices collect every mismatch and fail once with the whole list, so one run shows every
//! route or RPC that is wrong.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::time::Duration;

use common::*;
use eventsource_stream::Eventsource as _;
use futures_util::{Stream, StreamExt as _};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use reqwest::RequestBuilder;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{Value, json};
use solo::api::rest::ROUTES;
use solo::config::{Config, TenantConfig, TenantLimitOverrides};
use solo::proto::{self, watch_response::Msg};
use solo::server::Server;
use tempfile::TempDir;
use tokio::task::JoinSet;
use tonic::Code;

/// A guard against hangs, never a performance assertion.
const PATIENCE: Duration = Duration::from_secs(30);

const MIB: u64 = 1 << 20;

/// Routes anyone may read, with or without credentials.
const PUBLIC_ROUTES: [&str; 2] = ["/health", "/metrics"];

type Grpc = proto::solo_kernel_client::SoloKernelClient<tonic::transport::Channel>;
type Status = tonic::Status;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn tempdir() -> TempDir {
    tempfile::tempdir().expect("a temp dir")
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().expect("an HTTP client")
}

fn wat_text(name: &str) -> String {
    String::from_utf8(example(name).to_vec()).expect("examples are UTF-8")
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn pct(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// How a request says who it is: an `authorization` value and an `x-tenant-id` value (bytes, so
/// that non-ASCII names can be sent as they are).
#[derive(Debug, Clone, Default)]
struct Auth {
    authorization: Option<String>,
    tenant: Option<Vec<u8>>,
}

impl Auth {
    /// No credentials at all (in development mode: the admin).
    fn none() -> Auth {
        Auth::default()
    }

    fn bearer(token: &str) -> Auth {
        Auth::raw(&format!("Bearer {token}"))
    }

    fn raw(authorization: &str) -> Auth {
        Auth {
            authorization: Some(authorization.to_string()),
            tenant: None,
        }
    }

    /// Only `x-tenant-id` (development mode's way to name a tenant).
    fn dev(tenant: &str) -> Auth {
        Auth::none().naming(tenant)
    }

    fn naming(mut self, tenant: &str) -> Auth {
        self.tenant = Some(tenant.as_bytes().to_vec());
        self
    }

    fn grpc<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let metadata = request.metadata_mut();
        if let Some(value) = &self.authorization {
            metadata.insert("authorization", value.parse().expect("an ASCII authorization"));
        }
        if let Some(tenant) = &self.tenant {
            let value = tonic::metadata::AsciiMetadataValue::try_from(tenant.as_slice()).expect("a header value");
            metadata.insert("x-tenant-id", value);
        }
        request
    }

    fn rest(&self, mut request: RequestBuilder) -> RequestBuilder {
        if let Some(value) = &self.authorization {
            request = request.header("authorization", value);
        }
        if let Some(tenant) = &self.tenant {
            request = request.header("x-tenant-id", HeaderValue::from_bytes(tenant).expect("a header value"));
        }
        request
    }
}

/// One HTTP answer. The body of an event stream is not read (it would never end).
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
    json: Value,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn error_code(&self) -> &str {
        self.json["error"].as_str().unwrap_or("")
    }

    fn message(&self) -> &str {
        self.json["message"].as_str().unwrap_or("")
    }

    fn is_event_stream(&self) -> bool {
        self.header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream"))
    }
}

async fn send(request: RequestBuilder) -> Reply {
    let response = tokio::time::timeout(PATIENCE, request.send())
        .await
        .expect("the request is answered in time")
        .expect("the request is answered");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let streaming = headers
        .get("content-type")
        .is_some_and(|c| c.as_bytes().starts_with(b"text/event-stream"));
    let body = if streaming {
        Vec::new()
    } else {
        tokio::time::timeout(PATIENCE, response.bytes())
            .await
            .expect("the body arrives in time")
            .expect("the body reads")
            .to_vec()
    };
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
        json,
    }
}

type Sse = Pin<
    Box<
        dyn Stream<Item = Result<eventsource_stream::Event, eventsource_stream::EventStreamError<reqwest::Error>>>
            + Send,
    >,
>;

/// Opens an SSE stream that must be admitted.
async fn open_sse(request: RequestBuilder) -> Sse {
    let response = tokio::time::timeout(PATIENCE, request.send())
        .await
        .expect("the stream opens in time")
        .expect("the stream opens");
    assert_eq!(response.status().as_u16(), 200, "{response:?}");
    Box::pin(response.bytes_stream().eventsource())
}

/// The events of an SSE stream (their data as JSON) up to and including the first that matches.
async fn sse_until(stream: &mut Sse, until: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    let found = async {
        while let Some(item) = stream.next().await {
            let event = item.expect("the SSE stream parses");
            if event.data.is_empty() || event.event == "progress" {
                continue;
            }
            let data: Value = serde_json::from_str(&event.data).expect("SSE data is JSON");
            let done = until(&data);
            seen.push(data);
            if done {
                return;
            }
        }
        panic!("the SSE stream ended before the awaited event");
    };
    tokio::time::timeout(PATIENCE, found)
        .await
        .expect("the awaited SSE event arrives");
    seen
}

fn sse_is(data: &Value, tenant: &str, id: &str, kind: &str) -> bool {
    data["tenant"] == tenant && data["service_id"] == id && data["kind"] == kind
}

async fn open_watch(
    client: &mut Grpc,
    auth: &Auth,
    from_seq: u64,
    service_id: &str,
) -> tonic::Streaming<proto::WatchResponse> {
    let request = proto::WatchRequest {
        from_seq,
        service_id: service_id.into(),
        ..Default::default()
    };
    client
        .watch(auth.grpc(request))
        .await
        .expect("the watch opens")
        .into_inner()
}

/// The events of a watch up to and including the first that matches (progress is skipped).
async fn watch_until(
    stream: &mut tonic::Streaming<proto::WatchResponse>,
    until: impl Fn(&proto::Event) -> bool,
) -> Vec<proto::Event> {
    let mut seen = Vec::new();
    let found = async {
        while let Some(item) = stream.next().await {
            if let Some(Msg::Event(event)) = item.expect("the watch goes on").msg {
                let done = until(&event);
                seen.push(event);
                if done {
                    return;
                }
            }
        }
        panic!("the watch ended before the awaited event");
    };
    tokio::time::timeout(PATIENCE, found)
        .await
        .expect("the awaited event arrives");
    seen
}

fn is(event: &proto::Event, tenant: &str, id: &str, kind: &str) -> bool {
    event.tenant == tenant && event.service_id == id && solo::event::kind_name(event) == kind
}

/// Waits, watching as `auth` from `from_seq`, until every `(tenant, id)` has started.
async fn wait_started(client: &mut Grpc, auth: &Auth, from_seq: u64, services: &[(&str, &str)]) {
    wait_for_each(client, auth, from_seq, "service_started", services).await;
}

/// Waits until each of `services` (tenant, id) has an event of `kind` at or after `from_seq`.
async fn wait_for_each(client: &mut Grpc, auth: &Auth, from_seq: u64, kind: &str, services: &[(&str, &str)]) {
    let mut stream = open_watch(client, auth, from_seq, "").await;
    let mut waiting: BTreeSet<(String, String)> =
        services.iter().map(|(t, id)| (t.to_string(), id.to_string())).collect();
    let found = async {
        while let Some(item) = stream.next().await {
            if let Some(Msg::Event(event)) = item.expect("the watch goes on").msg
                && solo::event::kind_name(&event) == kind
            {
                waiting.remove(&(event.tenant.clone(), event.service_id.clone()));
                if waiting.is_empty() {
                    return;
                }
            }
        }
        panic!("the watch ended while waiting for {kind} of {waiting:?}");
    };
    tokio::time::timeout(PATIENCE, found)
        .await
        .unwrap_or_else(|_| panic!("no {kind} of {services:?} within {PATIENCE:?}"));
}

async fn head(http: &reqwest::Client, base: &str) -> u64 {
    let reply = send(http.get(format!("{base}/health"))).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.json["head_seq"].as_u64().expect("head_seq")
}

/// The value of one sample of `/metrics`, such as `solo_shed_total{scope="tenant"}`.
async fn metric(http: &reqwest::Client, base: &str, sample: &str) -> f64 {
    let reply = send(http.get(format!("{base}/metrics"))).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let text = String::from_utf8(reply.body).expect("metrics are UTF-8");
    text.lines()
        .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |value| value.trim().parse().expect("a number"))
}

fn status_request(id: &str) -> proto::StatusRequest {
    proto::StatusRequest { service_id: id.into() }
}

fn call_request(id: &str, payload: &[u8]) -> proto::CallRequest {
    proto::CallRequest {
        service_id: id.into(),
        payload: payload.to_vec(),
        timeout_ms: 0,
    }
}

fn kill_request(id: &str) -> proto::KillRequest {
    proto::KillRequest {
        service_id: id.into(),
        grace_ms: 1000,
        ..Default::default()
    }
}

fn logs_request(id: &str, follow: bool) -> proto::LogsRequest {
    proto::LogsRequest {
        service_id: id.into(),
        follow,
        from_seq: 0,
        log_id: 0,
    }
}

/// A gRPC deploy of an example with a memory limit (0: the default).
fn deploy_with_memory(id: &str, name: &str, memory_bytes: u64) -> proto::DeployRequest {
    let mut request = grpc_deploy(id, name);
    request.limits = Some(proto::Limits {
        memory_bytes,
        ..Default::default()
    });
    request
}

/// Records a mismatch unless `result` failed with `want`.
fn expect_code<T: std::fmt::Debug>(
    failures: &mut Vec<String>,
    what: &str,
    result: Result<tonic::Response<T>, Status>,
    want: Code,
) {
    match result {
        Err(status) if status.code() == want => {}
        Err(status) => failures.push(format!(
            "{what}: {:?} ({}), want {want:?}",
            status.code(),
            status.message()
        )),
        Ok(response) => failures.push(format!("{what}: succeeded ({:?}), want {want:?}", response.get_ref())),
    }
}

/// Records a mismatch unless `reply` is an error of `status` and `code`.
fn expect_error(failures: &mut Vec<String>, what: &str, reply: &Reply, status: u16, code: &str) {
    if reply.status != status || reply.error_code() != code {
        let body = String::from_utf8_lossy(&reply.body);
        failures.push(format!("{what}: {} {body}, want {status} {code}", reply.status));
    }
}

#[track_caller]
fn assert_no_failures(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} mismatches:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// Every RPC of `solo.v1.SoloKernel` once, on service `id`, as `auth`. Only for callers that must
/// be refused: Shutdown and Kill would act otherwise.
async fn every_rpc(client: &mut Grpc, auth: &Auth, id: &str) -> Vec<(&'static str, Result<(), Status>)> {
    vec![
        (
            "Deploy",
            client.deploy(auth.grpc(grpc_deploy(id, "echo"))).await.map(drop),
        ),
        ("Status", client.status(auth.grpc(status_request(id))).await.map(drop)),
        (
            "List",
            client.list(auth.grpc(proto::ListRequest::default())).await.map(drop),
        ),
        ("Kill", client.kill(auth.grpc(kill_request(id))).await.map(drop)),
        (
            "Call",
            client.call(auth.grpc(call_request(id, b"ping"))).await.map(drop),
        ),
        ("Logs", client.logs(auth.grpc(logs_request(id, false))).await.map(drop)),
        (
            "Logs(follow)",
            client.logs(auth.grpc(logs_request(id, true))).await.map(drop),
        ),
        (
            "Watch",
            client.watch(auth.grpc(proto::WatchRequest::default())).await.map(drop),
        ),
        (
            "Shutdown",
            client
                .shutdown(auth.grpc(proto::ShutdownRequest::default()))
                .await
                .map(drop),
        ),
        (
            "Backup",
            client.backup(auth.grpc(proto::BackupRequest {})).await.map(drop),
        ),
    ]
}

/// A request of `method` on `route` (a template from `ROUTES`) for service `id`, with a body
/// that would be valid for a caller allowed to make it. `query` is appended to the path.
fn route_request(
    http: &reqwest::Client,
    base: &str,
    route: &str,
    method: &str,
    id: &str,
    query: &str,
) -> RequestBuilder {
    let url = format!("{base}{}{query}", route.replace("{id}", &pct(id)));
    match (route, method) {
        ("/services", "post") => http
            .post(url)
            .json(&json!({ "service_id": id, "wat": wat_text("echo") })),
        ("/services/{id}", "put") => http
            .put(url)
            .header("content-type", "text/plain")
            .body(wat_text("echo")),
        ("/services/{id}/call", "post") => http.post(url).body("ping"),
        (_, "get") => http.get(url),
        (_, "post") => http.post(url),
        (_, "delete") => http.delete(url),
        (_, "put") => http.put(url),
        other => panic!("no request for {other:?}: teach route_request this route"),
    }
}

fn all_routes() -> BTreeSet<(&'static str, &'static str)> {
    ROUTES
        .iter()
        .flat_map(|(route, methods)| methods.iter().map(move |m| (*route, *m)))
        .collect()
}

/// Tokens for the admin, tenant `alpha` (two, as during a rotation) and tenant `beta`.
#[derive(Debug, Clone)]
struct Keys {
    admin: String,
    alpha: [String; 2],
    beta: String,
}

impl Keys {
    fn configure(config: &mut Config) -> Keys {
        let token = || solo::api::auth::new_token().expect("randomness for a token");
        let (admin, admin_hash) = token();
        let (alpha0, alpha0_hash) = token();
        let (alpha1, alpha1_hash) = token();
        let (beta, beta_hash) = token();
        config.security.admin_token_sha256 = vec![admin_hash];
        config.tenants.insert(
            "alpha".into(),
            TenantConfig {
                token_sha256: vec![alpha0_hash, alpha1_hash],
                limits: None,
            },
        );
        config.tenants.insert(
            "beta".into(),
            TenantConfig {
                token_sha256: vec![beta_hash],
                limits: None,
            },
        );
        Keys {
            admin,
            alpha: [alpha0, alpha1],
            beta,
        }
    }
}

fn overrides(pairs: &[(&str, i64)]) -> TenantLimitOverrides {
    TenantLimitOverrides(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), toml::Value::Integer(*v)))
            .collect(),
    )
}

/// A tenant without tokens (development mode stays on) but with overrides of `[limits]`.
fn tenant_with_limits(pairs: &[(&str, i64)]) -> TenantConfig {
    TenantConfig {
        token_sha256: Vec::new(),
        limits: Some(overrides(pairs)),
    }
}

/// A node whose tenants and admin authenticate with the tokens of the returned [`Keys`].
async fn start_with_tokens(dir: &Path) -> (Server, Keys) {
    let mut keys = None;
    let server = start_server(dir, |c| keys = Some(Keys::configure(c))).await;
    (server, keys.expect("the configuration was made"))
}

async fn stop(server: Server) {
    tokio::time::timeout(PATIENCE, server.stop())
        .await
        .expect("the node stops in time")
        .expect("the node stops cleanly");
}

// ---------------------------------------------------------------------------------------------
// 1. Isolation and credentials
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_tenants_cannot_read_call_kill_watch_or_overwrite_each_other() {
    let dir = tempdir();
    let (server, keys) = start_with_tokens(dir.path()).await;
    let (alpha, beta) = (Auth::bearer(&keys.alpha[0]), Auth::bearer(&keys.beta));
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;

    // beta follows everything it may see from the start of the log, and everything about "svc".
    let mut beta_all = open_watch(&mut client, &beta, 1, "").await;
    let mut beta_svc = open_watch(&mut client, &beta, 1, "svc").await;
    let alpha_deploy = client
        .deploy(alpha.grpc(grpc_deploy("svc", "echo")))
        .await
        .expect("alpha deploys")
        .into_inner();
    wait_started(&mut client, &alpha, alpha_deploy.seq, &[("alpha", "svc")]).await;
    let before = head(&http, &base).await;

    let mut failures = Vec::new();
    expect_code(
        &mut failures,
        "Status of alpha's service as beta",
        client.status(beta.grpc(status_request("svc"))).await,
        Code::NotFound,
    );
    let listed = client
        .list(beta.grpc(proto::ListRequest::default()))
        .await
        .expect("beta lists")
        .into_inner();
    if !listed.services.is_empty() {
        failures.push(format!("List as beta shows {:?}", listed.services));
    }
    expect_code(
        &mut failures,
        "Kill of alpha's service as beta",
        client.kill(beta.grpc(kill_request("svc"))).await,
        Code::NotFound,
    );
    expect_code(
        &mut failures,
        "Call of alpha's service as beta",
        client.call(beta.grpc(call_request("svc", b"ping"))).await,
        Code::NotFound,
    );
    expect_code(
        &mut failures,
        "Logs of alpha's service as beta",
        client.logs(beta.grpc(logs_request("svc", false))).await,
        Code::NotFound,
    );
    expect_code(
        &mut failures,
        "Logs(follow) of alpha's service as beta",
        client.logs(beta.grpc(logs_request("svc", true))).await,
        Code::NotFound,
    );
    if head(&http, &base).await != before {
        failures.push("beta's refused requests appended events".into());
    }
    let alpha_status = client
        .status(alpha.grpc(status_request("svc")))
        .await
        .expect("alpha's service")
        .into_inner();
    if alpha_status.status != "running" {
        failures.push(format!("alpha's service after beta's kill: {alpha_status:?}"));
    }

    // beta's deploy over alpha's id creates beta's own service; alpha's stays as it was.
    let beta_deploy = client
        .deploy(beta.grpc(grpc_deploy("svc", "counter")))
        .await
        .expect("beta deploys its own svc")
        .into_inner();
    if !(beta_deploy.created && beta_deploy.version == 1) {
        failures.push(format!("beta's deploy over alpha's id: {beta_deploy:?}"));
    }
    wait_started(&mut client, &beta, beta_deploy.seq, &[("beta", "svc")]).await;
    let beta_status = client
        .status(beta.grpc(status_request("svc")))
        .await
        .expect("beta's service")
        .into_inner();
    assert_eq!(
        (beta_status.tenant.as_str(), beta_status.version),
        ("beta", 1),
        "{beta_status:?}"
    );
    assert_eq!(beta_status.module_sha256, beta_deploy.module_sha256);
    let alpha_status = client
        .status(alpha.grpc(status_request("svc")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            alpha_status.tenant.as_str(),
            alpha_status.version,
            alpha_status.module_sha256.as_str(),
            alpha_status.status.as_str()
        ),
        ("alpha", 1, alpha_deploy.module_sha256.as_str(), "running"),
        "alpha's service is untouched"
    );
    let echo = client.call(alpha.grpc(call_request("svc", b"ping"))).await.unwrap();
    assert_eq!(echo.into_inner().payload, b"ping", "alpha still reaches its echo");
    let count = client.call(beta.grpc(call_request("svc", b""))).await.unwrap();
    assert_eq!(count.into_inner().payload, b"1", "beta reaches its counter");
    let listed = client
        .list(beta.grpc(proto::ListRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<(String, String)> = listed
        .services
        .iter()
        .map(|s| (s.tenant.clone(), s.service_id.clone()))
        .collect();
    assert_eq!(names, [("beta".to_string(), "svc".to_string())]);

    // beta kills its own; alpha's runs on.
    let killed = client.kill(beta.grpc(kill_request("svc"))).await.unwrap().into_inner();
    let stopped = watch_until(&mut beta_all, |e| is(e, "beta", "svc", "service_stopped")).await;
    let alpha_status = client
        .status(alpha.grpc(status_request("svc")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(alpha_status.status, "running", "beta's kill of its own svc");
    assert!(killed.seq > 0);

    // beta's watches carried only beta's events; alpha's only alpha's.
    for event in &stopped {
        if event.tenant != "beta" {
            failures.push(format!("beta's Watch carried {event:?}"));
        }
    }
    let filtered = watch_until(&mut beta_svc, |e| is(e, "beta", "svc", "service_stopped")).await;
    for event in &filtered {
        if event.tenant != "beta" {
            failures.push(format!("beta's Watch of svc carried {event:?}"));
        }
    }
    let marker = client
        .deploy(alpha.grpc(grpc_deploy("marker", "echo")))
        .await
        .unwrap()
        .into_inner();
    let mut alpha_all = open_watch(&mut client, &alpha, 1, "").await;
    let seen = watch_until(&mut alpha_all, |e| e.seq == marker.seq).await;
    for event in &seen {
        if event.tenant != "alpha" {
            failures.push(format!("alpha's Watch carried {event:?}"));
        }
    }
    assert_no_failures(&failures);
    drop((beta_all, beta_svc, alpha_all));
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_tenants_cannot_read_call_kill_watch_or_overwrite_each_other_on_any_route() {
    let dir = tempdir();
    let (server, keys) = start_with_tokens(dir.path()).await;
    let (alpha, beta) = (Auth::bearer(&keys.alpha[0]), Auth::bearer(&keys.beta));
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    let url = |path: &str| format!("{base}{path}");

    let mut beta_all = open_sse(beta.rest(http.get(url("/events?from=1")))).await;
    let mut beta_svc = open_sse(beta.rest(http.get(url("/events?from=1&service_id=svc")))).await;
    let mut alpha_sha = BTreeMap::new();
    let mut first_seq = None;
    for id in ["svc", "put-target", "post-target"] {
        let reply = send(alpha.rest(route_request(&http, &base, "/services", "post", id, ""))).await;
        assert_eq!(reply.status, 201, "{reply:?}");
        first_seq.get_or_insert(reply.json["deploy"]["seq"].as_u64().unwrap());
        alpha_sha.insert(id, reply.json["module_sha256"].as_str().unwrap().to_string());
    }
    wait_started(
        &mut client,
        &alpha,
        first_seq.unwrap(),
        &[("alpha", "svc"), ("alpha", "put-target"), ("alpha", "post-target")],
    )
    .await;
    let before = head(&http, &base).await;

    let mut covered: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut failures = Vec::new();

    let listed = send(beta.rest(http.get(url("/services")))).await;
    covered.insert(("/services", "get"));
    assert_eq!(listed.status, 200, "{listed:?}");
    assert_eq!(
        (listed.json["total"].clone(), listed.json["services"].clone()),
        (json!(0), json!([]))
    );
    for (route, method, query) in [
        ("/services/{id}", "get", ""),
        ("/services/{id}", "delete", ""),
        ("/services/{id}/call", "post", ""),
        ("/services/{id}/logs", "get", ""),
        ("/services/{id}/logs", "get", "?follow=true"),
    ] {
        let reply = send(beta.rest(route_request(&http, &base, route, method, "svc", query))).await;
        let what = format!("{} {route}{query} of alpha's svc as beta", method.to_uppercase());
        covered.insert((route, method));
        expect_error(&mut failures, &what, &reply, 404, "not_found");
    }
    let shutdown = send(beta.rest(http.post(url("/shutdown")))).await;
    covered.insert(("/shutdown", "post"));
    expect_error(
        &mut failures,
        "POST /shutdown as beta",
        &shutdown,
        403,
        "permission_denied",
    );
    // A backup holds every tenant's services and history: the admin's alone.
    let backup = send(beta.rest(http.get(url("/backup")))).await;
    covered.insert(("/backup", "get"));
    expect_error(&mut failures, "GET /backup as beta", &backup, 403, "permission_denied");
    for route in PUBLIC_ROUTES {
        let reply = send(beta.rest(http.get(url(route)))).await;
        covered.insert((route, "get"));
        if reply.status != 200 {
            failures.push(format!("GET {route} as beta: {reply:?}"));
        }
    }
    if head(&http, &base).await != before {
        failures.push("beta's refused requests appended events".into());
    }
    let alpha_svc = send(alpha.rest(http.get(url("/services/svc")))).await;
    assert_eq!(
        alpha_svc.json["status"], "running",
        "beta's DELETE left alpha's svc alone"
    );

    // Deploys over alpha's ids, by PUT and by POST, create beta's own services.
    let put = send(
        beta.rest(
            http.put(url("/services/put-target"))
                .header("content-type", "text/plain")
                .body(wat_text("counter")),
        ),
    )
    .await;
    covered.insert(("/services/{id}", "put"));
    let post = send(
        beta.rest(
            http.post(url("/services"))
                .json(&json!({ "service_id": "post-target", "wat": wat_text("counter") })),
        ),
    )
    .await;
    covered.insert(("/services", "post"));
    for (what, reply) in [("PUT", &put), ("POST", &post)] {
        let ok = reply.status == 201
            && reply.json["tenant"] == "beta"
            && reply.json["version"] == 1
            && reply.json["deploy"]["created"] == true;
        if !ok {
            failures.push(format!("{what} over alpha's id as beta: {reply:?}"));
        }
    }
    let beta_seq = post.json["deploy"]["seq"].as_u64().unwrap_or(1);
    wait_started(
        &mut client,
        &beta,
        put.json["deploy"]["seq"].as_u64().unwrap_or(1).min(beta_seq),
        &[("beta", "put-target"), ("beta", "post-target")],
    )
    .await;
    for id in ["put-target", "post-target"] {
        let mine = send(alpha.rest(http.get(url(&format!("/services/{id}"))))).await;
        let ok = mine.json["tenant"] == "alpha"
            && mine.json["version"] == 1
            && mine.json["module_sha256"] == alpha_sha[id].as_str()
            && mine.json["status"] == "running";
        if !ok {
            failures.push(format!("alpha's {id} after beta's deploy: {mine:?}"));
        }
        let echo = send(alpha.rest(route_request(&http, &base, "/services/{id}/call", "post", id, ""))).await;
        assert_eq!(echo.body, b"ping", "alpha still reaches its echo {id}");
        let count = send(beta.rest(http.post(url(&format!("/services/{id}/call"))).body(""))).await;
        assert_eq!(count.body, b"1", "beta reaches its own counter {id}");
    }

    // beta's streams carried only beta's events.
    let events = sse_until(&mut beta_all, |d| sse_is(d, "beta", "post-target", "service_started")).await;
    covered.insert(("/events", "get"));
    let kill = send(beta.rest(http.delete(url("/services/svc")))).await;
    expect_error(
        &mut failures,
        "DELETE of alpha's svc as beta, later",
        &kill,
        404,
        "not_found",
    );
    for data in &events {
        if data["tenant"] != "beta" {
            failures.push(format!("beta's /events carried {data}"));
        }
    }
    // beta has no svc: its filtered stream sees nothing until beta makes one.
    let own = send(beta.rest(route_request(&http, &base, "/services", "post", "svc", ""))).await;
    assert_eq!(own.status, 201, "{own:?}");
    let events = sse_until(&mut beta_svc, |d| sse_is(d, "beta", "svc", "service_deployed")).await;
    for data in &events {
        if data["tenant"] != "beta" {
            failures.push(format!("beta's /events?service_id=svc carried {data}"));
        }
    }
    let marker = send(alpha.rest(route_request(&http, &base, "/services", "post", "marker", ""))).await;
    let marker_seq = marker.json["deploy"]["seq"].as_u64().expect("the marker's seq");
    let mut alpha_all = open_sse(alpha.rest(http.get(url("/events?from=1")))).await;
    let events = sse_until(&mut alpha_all, |d| d["seq"] == marker_seq).await;
    for data in &events {
        if data["tenant"] != "alpha" {
            failures.push(format!("alpha's /events carried {data}"));
        }
    }
    assert_eq!(covered, all_routes(), "the matrix covers every route and method");
    assert_no_failures(&failures);
    drop((beta_all, beta_svc, alpha_all));
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_every_rpc_needs_a_valid_token_and_only_the_admin_shuts_down() {
    let dir = tempdir();
    let (server, keys) = start_with_tokens(dir.path()).await;
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    let alpha = Auth::bearer(&keys.alpha[0]);
    let deployed = client.deploy(alpha.grpc(grpc_deploy("svc", "echo"))).await.unwrap();
    wait_started(&mut client, &alpha, deployed.get_ref().seq, &[("alpha", "svc")]).await;
    let before = head(&http, &base).await;

    let mut failures = Vec::new();
    let (_, unknown_hash_token) = solo::api::auth::new_token().unwrap();
    let unauthenticated = [
        ("no credentials", Auth::none()),
        ("x-tenant-id alone", Auth::dev("alpha")),
        ("a wrong token", Auth::bearer("solo_0123456789abcdef")),
        ("a hash used as a token", Auth::bearer(&unknown_hash_token)),
        ("a wrong token naming alpha", Auth::bearer("solo_nope").naming("alpha")),
        ("an empty bearer", Auth::raw("Bearer ")),
        ("the Basic scheme", Auth::raw(&format!("Basic {}", keys.alpha[0]))),
        ("a bare token", Auth::raw(&keys.alpha[0])),
    ];
    for (what, auth) in &unauthenticated {
        for (rpc, result) in every_rpc(&mut client, auth, "svc").await {
            expect_code(
                &mut failures,
                &format!("{rpc} with {what}"),
                result.map(tonic::Response::new),
                Code::Unauthenticated,
            );
        }
    }
    // A tenant's token naming another tenant is refused on every RPC.
    for token in [&keys.alpha[0], &keys.alpha[1]] {
        let auth = Auth::bearer(token).naming("beta");
        for (rpc, result) in every_rpc(&mut client, &auth, "svc").await {
            expect_code(
                &mut failures,
                &format!("{rpc} with alpha's token naming beta"),
                result.map(tonic::Response::new),
                Code::PermissionDenied,
            );
        }
    }
    // Shutdown is the admin's alone.
    for (who, auth) in [
        ("alpha", Auth::bearer(&keys.alpha[0])),
        ("alpha naming itself", Auth::bearer(&keys.alpha[1]).naming("alpha")),
        ("beta", Auth::bearer(&keys.beta)),
    ] {
        expect_code(
            &mut failures,
            &format!("Shutdown as {who}"),
            client.shutdown(auth.grpc(proto::ShutdownRequest::default())).await,
            Code::PermissionDenied,
        );
        expect_code(
            &mut failures,
            &format!("Backup as {who}"),
            client
                .backup(auth.grpc(proto::BackupRequest {}))
                .await
                .map(drop)
                .map(tonic::Response::new),
            Code::PermissionDenied,
        );
    }
    if head(&http, &base).await != before {
        failures.push("refused requests appended events".into());
    }
    // A tenant naming itself is fine; alpha's service is still there and running.
    let status = client
        .status(Auth::bearer(&keys.alpha[1]).naming("alpha").grpc(status_request("svc")))
        .await;
    match status {
        Ok(s) if s.get_ref().status == "running" => {}
        other => failures.push(format!("Status as alpha naming itself: {other:?}")),
    }
    assert_no_failures(&failures);

    // The admin may shut the node down.
    let admin = Auth::bearer(&keys.admin);
    client
        .shutdown(admin.grpc(proto::ShutdownRequest { grace_ms: 2000 }))
        .await
        .expect("the admin shuts the node down");
    tokio::time::timeout(PATIENCE, server.stopped())
        .await
        .expect("the node stops in time")
        .expect("the node stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_every_route_needs_a_valid_token_and_only_the_admin_shuts_down() {
    let dir = tempdir();
    let (server, keys) = start_with_tokens(dir.path()).await;
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    let alpha = Auth::bearer(&keys.alpha[0]);
    let deployed = client.deploy(alpha.grpc(grpc_deploy("svc", "echo"))).await.unwrap();
    wait_started(&mut client, &alpha, deployed.get_ref().seq, &[("alpha", "svc")]).await;
    let before = head(&http, &base).await;

    let mut failures = Vec::new();
    let unauthenticated = [
        ("no credentials", Auth::none()),
        ("X-Tenant-ID alone", Auth::dev("alpha")),
        ("a wrong token", Auth::bearer("solo_0123456789abcdef")),
        ("a wrong token naming alpha", Auth::bearer("solo_nope").naming("alpha")),
        ("an empty bearer", Auth::raw("Bearer ")),
        ("the Basic scheme", Auth::raw(&format!("Basic {}", keys.alpha[0]))),
        ("a bare token", Auth::raw(&keys.alpha[0])),
    ];
    for (route, method) in all_routes() {
        let public = PUBLIC_ROUTES.contains(&route);
        for (what, auth) in &unauthenticated {
            let reply = send(auth.rest(route_request(&http, &base, route, method, "svc", ""))).await;
            let label = format!("{} {route} with {what}", method.to_uppercase());
            if public {
                if reply.status != 200 {
                    failures.push(format!("{label}: {} (public routes answer anyone)", reply.status));
                }
            } else {
                expect_error(&mut failures, &label, &reply, 401, "unauthenticated");
            }
        }
        if public {
            continue;
        }
        // A tenant's token naming another tenant, by header or (where the route takes it) query.
        let naming = Auth::bearer(&keys.alpha[1]).naming("beta");
        let reply = send(naming.rest(route_request(&http, &base, route, method, "svc", ""))).await;
        let label = format!(
            "{} {route} with alpha's token and X-Tenant-ID: beta",
            method.to_uppercase()
        );
        expect_error(&mut failures, &label, &reply, 403, "permission_denied");
        if route != "/shutdown" {
            let reply = send(alpha.rest(route_request(&http, &base, route, method, "svc", "?tenant=beta"))).await;
            let label = format!("{} {route}?tenant=beta with alpha's token", method.to_uppercase());
            expect_error(&mut failures, &label, &reply, 403, "permission_denied");
            // Naming itself in the header does not make naming another in the query a mistake
            // rather than a refusal.
            let itself = Auth::bearer(&keys.alpha[1]).naming("alpha");
            let reply = send(itself.rest(route_request(&http, &base, route, method, "svc", "?tenant=beta"))).await;
            let label = format!(
                "{} {route}?tenant=beta with alpha's token and X-Tenant-ID: alpha",
                method.to_uppercase()
            );
            expect_error(&mut failures, &label, &reply, 403, "permission_denied");
        }
    }
    for (who, auth) in [
        ("alpha", Auth::bearer(&keys.alpha[0])),
        ("alpha naming itself", Auth::bearer(&keys.alpha[1]).naming("alpha")),
        ("beta", Auth::bearer(&keys.beta)),
    ] {
        let reply = send(auth.rest(http.post(format!("{base}/shutdown")))).await;
        expect_error(
            &mut failures,
            &format!("POST /shutdown as {who}"),
            &reply,
            403,
            "permission_denied",
        );
    }
    if head(&http, &base).await != before {
        failures.push("refused requests appended events".into());
    }
    let mine = send(alpha.rest(http.get(format!("{base}/services/svc")))).await;
    if mine.json["status"] != "running" {
        failures.push(format!("alpha's svc after the refused requests: {mine:?}"));
    }
    assert_no_failures(&failures);

    let shutdown = send(Auth::bearer(&keys.admin).rest(http.post(format!("{base}/shutdown?grace_ms=2000")))).await;
    assert_eq!(shutdown.status, 202, "{shutdown:?}");
    tokio::time::timeout(PATIENCE, server.stopped())
        .await
        .expect("the node stops in time")
        .expect("the node stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_acts_for_any_tenant_it_names() {
    let dir = tempdir();
    let (server, keys) = start_with_tokens(dir.path()).await;
    let (http, base) = (http_client(), server.http_url());
    let url = |path: &str| format!("{base}{path}");
    let mut client = grpc_client(&server).await;
    let alpha = Auth::bearer(&keys.alpha[0]);
    let admin = Auth::bearer(&keys.admin);
    let for_alpha = admin.clone().naming("alpha");
    let deployed = client.deploy(alpha.grpc(grpc_deploy("svc", "echo"))).await.unwrap();
    wait_started(&mut client, &alpha, deployed.get_ref().seq, &[("alpha", "svc")]).await;

    // gRPC, naming the tenant in x-tenant-id.
    let status = client.status(for_alpha.grpc(status_request("svc"))).await.unwrap();
    assert_eq!(status.get_ref().tenant, "alpha");
    let echo = client.call(for_alpha.grpc(call_request("svc", b"hi"))).await.unwrap();
    assert_eq!(echo.get_ref().payload, b"hi");
    let lines: Vec<proto::LogLine> = client
        .logs(for_alpha.grpc(logs_request("svc", false)))
        .await
        .unwrap()
        .into_inner()
        .map(|l| l.unwrap())
        .collect()
        .await;
    assert!(lines.iter().any(|l| l.message == "echo ready"), "{lines:?}");
    // A deploy for a tenant that has no token of its own.
    let gamma = client
        .deploy(admin.clone().naming("gamma").grpc(grpc_deploy("svc", "counter")))
        .await
        .expect("the admin deploys for gamma")
        .into_inner();
    assert!(gamma.created);
    let mut gamma_watch = open_watch(&mut client, &admin.clone().naming("gamma"), 1, "").await;
    let events = watch_until(&mut gamma_watch, |e| is(e, "gamma", "svc", "service_started")).await;
    assert!(events.iter().all(|e| e.tenant == "gamma"), "{events:?}");
    // REST, naming the tenant in ?tenant= or X-Tenant-ID.
    let by_query = send(admin.rest(http.get(url("/services/svc?tenant=gamma")))).await;
    assert_eq!(
        (by_query.status, by_query.json["tenant"].as_str()),
        (200, Some("gamma"))
    );
    let by_header = send(for_alpha.rest(http.get(url("/services/svc")))).await;
    assert_eq!(
        (by_header.status, by_header.json["tenant"].as_str()),
        (200, Some("alpha"))
    );
    let call = send(admin.rest(http.post(url("/services/svc/call?tenant=alpha")).body("yo"))).await;
    assert_eq!((call.status, call.body.as_slice()), (200, b"yo".as_slice()));
    let logs = send(admin.rest(http.get(url("/services/svc/logs?tenant=alpha")))).await;
    assert_eq!(logs.json["lines"][0]["message"], "echo ready", "{logs:?}");
    let put = send(
        admin.rest(
            http.put(url("/services/other?tenant=beta"))
                .header("content-type", "text/plain")
                .body(wat_text("echo")),
        ),
    )
    .await;
    assert_eq!(
        (put.status, put.json["tenant"].as_str()),
        (201, Some("beta")),
        "{put:?}"
    );
    let mut sse = open_sse(admin.rest(http.get(url("/events?from=1&tenant=beta")))).await;
    let events = sse_until(&mut sse, |d| sse_is(d, "beta", "other", "service_deployed")).await;
    assert!(events.iter().all(|d| d["tenant"] == "beta"), "{events:?}");
    // Listings: everything without a name, one tenant with one.
    let all = client.list(admin.grpc(proto::ListRequest::default())).await.unwrap();
    let names: BTreeSet<(String, String)> = all
        .get_ref()
        .services
        .iter()
        .map(|s| (s.tenant.clone(), s.service_id.clone()))
        .collect();
    let expected: BTreeSet<(String, String)> = [("alpha", "svc"), ("beta", "other"), ("gamma", "svc")]
        .iter()
        .map(|(t, s)| (t.to_string(), s.to_string()))
        .collect();
    assert_eq!(names, expected);
    let only_beta = send(admin.rest(http.get(url("/services?tenant=beta")))).await;
    assert_eq!(only_beta.json["total"], 1, "{only_beta:?}");
    // Kill for a tenant: alpha's goes, gamma's same-named service stays.
    client
        .kill(for_alpha.grpc(kill_request("svc")))
        .await
        .expect("the admin kills alpha's svc");
    let deleted = send(admin.rest(http.delete(url("/services/other?tenant=beta")))).await;
    assert_eq!(deleted.status, 202, "{deleted:?}");
    let alpha_svc = send(alpha.rest(http.get(url("/services/svc")))).await;
    assert_eq!(alpha_svc.json["desired"], "stopped", "{alpha_svc:?}");
    let gamma_svc = send(admin.rest(http.get(url("/services/svc?tenant=gamma")))).await;
    assert_eq!(gamma_svc.json["desired"], "running", "{gamma_svc:?}");
    drop((gamma_watch, sse));
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_tokens_of_a_rotation_act_for_the_same_tenant() {
    let dir = tempdir();
    let (server, keys) = start_with_tokens(dir.path()).await;
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    let (old, new) = (Auth::bearer(&keys.alpha[0]), Auth::bearer(&keys.alpha[1]));
    let deployed = client.deploy(old.grpc(grpc_deploy("svc", "echo"))).await.unwrap();
    wait_started(&mut client, &new, deployed.get_ref().seq, &[("alpha", "svc")]).await;
    let status = client.status(new.grpc(status_request("svc"))).await.unwrap();
    assert_eq!(
        (status.get_ref().tenant.as_str(), status.get_ref().version),
        ("alpha", 1)
    );
    let listed = send(new.rest(http.get(format!("{base}/services")))).await;
    assert_eq!(listed.json["total"], 1, "{listed:?}");
    let upgraded = send(
        new.rest(
            http.put(format!("{base}/services/svc"))
                .header("content-type", "text/plain")
                .body(wat_text("counter")),
        ),
    )
    .await;
    assert_eq!((upgraded.status, upgraded.json["version"].clone()), (200, json!(2)));
    let seen = client.status(old.grpc(status_request("svc"))).await.unwrap();
    assert_eq!(seen.get_ref().version, 2, "the old token sees the new token's upgrade");
    // Both tokens' events name the same actor.
    let mut watch = open_watch(&mut client, &old, 1, "svc").await;
    let events = watch_until(&mut watch, |e| e.seq == upgraded.json["deploy"]["seq"]).await;
    let actors: BTreeSet<&str> = events
        .iter()
        .filter(|e| solo::event::kind_name(e) == "service_deployed")
        .map(|e| e.actor.as_str())
        .collect();
    assert_eq!(actors, BTreeSet::from(["tenant:alpha"]));
    drop(watch);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_header_sent_twice_is_refused_whichever_copy_comes_first() {
    let dir = tempdir();
    let (server, keys) = start_with_tokens(dir.path()).await;
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    let (alpha, beta) = (format!("Bearer {}", keys.alpha[0]), format!("Bearer {}", keys.beta));
    for (first, second) in [(&alpha, &beta), (&beta, &alpha), (&alpha, &alpha)] {
        let mut request = tonic::Request::new(proto::ListRequest::default());
        for value in [first, second] {
            request.metadata_mut().append("authorization", value.parse().unwrap());
        }
        let refused = client.list(request).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().contains("authorization: sent more than once"),
            "{refused:?}"
        );

        let reply = send(
            http.get(format!("{base}/services"))
                .header("authorization", first.as_str())
                .header("authorization", second.as_str()),
        )
        .await;
        assert_eq!(
            (reply.status, reply.json["error"].as_str()),
            (400, Some("invalid_argument")),
            "{reply:?}"
        );
    }
    // So is a tenant header sent twice, even by the admin.
    let reply = send(
        http.get(format!("{base}/services"))
            .header("authorization", format!("Bearer {}", keys.admin))
            .header("x-tenant-id", "alpha")
            .header("x-tenant-id", "beta"),
    )
    .await;
    assert_eq!(reply.status, 400, "{reply:?}");
    stop(server).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Quotas
// ---------------------------------------------------------------------------------------------

/// Asserts a gRPC quota refusal naming `quota` and `value`.
#[track_caller]
fn assert_grpc_quota<T: std::fmt::Debug>(result: Result<tonic::Response<T>, Status>, quota: &str, value: u64) {
    let status = result.expect_err("the quota refuses the request");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let message = status.message();
    assert!(
        message.contains(quota) && message.contains(&value.to_string()),
        "the refusal names {quota} and {value}: {status:?}"
    );
}

/// Asserts a REST quota refusal naming `quota` and `value`, with a `Retry-After` only where a
/// retry of the same request may pass without the tenant changing anything.
#[track_caller]
fn assert_rest_quota(reply: &Reply, quota: &str, value: u64) {
    assert_eq!((reply.status, reply.error_code()), (429, "quota_exceeded"), "{reply:?}");
    let only_the_tenant_can_lift = [
        "max_services",
        "max_tenant_memory_mb",
        "max_module_bytes",
        "max_memory_mb",
    ];
    assert_eq!(
        reply.headers.contains_key("retry-after"),
        !only_the_tenant_can_lift.contains(&quota),
        "{quota}: {reply:?}"
    );
    let message = reply.message();
    assert!(
        message.contains(quota) && message.contains(&value.to_string()),
        "the refusal names {quota} and {value}: {reply:?}"
    );
}

/// `POST /services` of WAT text with `limits`.
async fn rest_deploy(http: &reqwest::Client, base: &str, auth: &Auth, id: &str, wat: &str, limits: Value) -> Reply {
    let body = json!({ "service_id": id, "wat": wat, "limits": limits });
    send(auth.rest(http.post(format!("{base}/services")).json(&body))).await
}

/// `PUT /services/{id}` of WAT text, with a query string.
async fn rest_put(http: &reqwest::Client, base: &str, auth: &Auth, id: &str, wat: &str, query: &str) -> Reply {
    let request = http
        .put(format!("{base}/services/{id}{query}"))
        .header("content-type", "text/plain")
        .body(wat.to_string());
    send(auth.rest(request)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_services_holds_at_its_edge() {
    let dir = tempdir();
    let server = start_server(dir.path(), |c| c.limits.max_services = 2).await;
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    let q = Auth::dev("q");
    let first = client.deploy(q.grpc(grpc_deploy("s1", "echo"))).await.unwrap();
    let second = rest_deploy(&http, &base, &q, "s2", &wat_text("echo"), json!({})).await;
    assert_eq!(second.status, 201, "the last allowed: {second:?}");
    wait_started(
        &mut client,
        &Auth::none(),
        first.get_ref().seq,
        &[("q", "s1"), ("q", "s2")],
    )
    .await;
    let before = head(&http, &base).await;

    assert_grpc_quota(
        client.deploy(q.grpc(grpc_deploy("s3", "echo"))).await,
        "max_services",
        2,
    );
    assert_rest_quota(
        &rest_deploy(&http, &base, &q, "s3", &wat_text("echo"), json!({})).await,
        "max_services",
        2,
    );
    assert_rest_quota(
        &rest_put(&http, &base, &q, "s3", &wat_text("echo"), "").await,
        "max_services",
        2,
    );
    assert_eq!(head(&http, &base).await, before, "a refused deploy appends nothing");
    let missing = client.status(q.grpc(status_request("s3"))).await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);

    // An upgrade keeps its slot; another tenant has its own; a kill frees a slot once the
    // service has stopped.
    let upgraded = client.deploy(q.grpc(grpc_deploy("s1", "counter"))).await.unwrap();
    assert_eq!(upgraded.get_ref().version, 2);
    client
        .deploy(Auth::dev("r").grpc(grpc_deploy("s3", "echo")))
        .await
        .expect("another tenant's first service");
    let killed = client.kill(q.grpc(kill_request("s2"))).await.unwrap().into_inner();
    wait_for_each(&mut client, &q, killed.seq, "service_stopped", &[("q", "s2")]).await;
    client
        .deploy(q.grpc(grpc_deploy("s3", "echo")))
        .await
        .expect("a stopped service frees its slot");
    assert_grpc_quota(
        client.deploy(q.grpc(grpc_deploy("s4", "echo"))).await,
        "max_services",
        2,
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_memory_mb_per_service_holds_at_its_edge() {
    let dir = tempdir();
    let server = start_server(dir.path(), |c| c.limits.max_memory_mb = 64).await;
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    let q = Auth::dev("q");
    let at_max = client
        .deploy(q.grpc(deploy_with_memory("m1", "echo", 64 * MIB)))
        .await
        .expect("exactly the maximum is allowed");
    let by_rest = rest_deploy(
        &http,
        &base,
        &q,
        "m2",
        &wat_text("echo"),
        json!({ "memory_bytes": 64 * MIB }),
    )
    .await;
    assert_eq!(by_rest.status, 201, "{by_rest:?}");
    wait_started(
        &mut client,
        &Auth::none(),
        at_max.get_ref().seq,
        &[("q", "m1"), ("q", "m2")],
    )
    .await;
    let status = client.status(q.grpc(status_request("m1"))).await.unwrap();
    assert_eq!(status.get_ref().limits.unwrap().memory_bytes, 64 * MIB);
    let before = head(&http, &base).await;

    assert_grpc_quota(
        client
            .deploy(q.grpc(deploy_with_memory("m3", "echo", 64 * MIB + 1)))
            .await,
        "max_memory_mb",
        64,
    );
    assert_rest_quota(
        &rest_deploy(
            &http,
            &base,
            &q,
            "m3",
            &wat_text("echo"),
            json!({ "memory_bytes": 64 * MIB + 65536 }),
        )
        .await,
        "max_memory_mb",
        64,
    );
    let query = format!("?memory_bytes={}", 65 * MIB);
    assert_rest_quota(
        &rest_put(&http, &base, &q, "m3", &wat_text("echo"), &query).await,
        "max_memory_mb",
        64,
    );
    // An upgrade asking for more is refused the same way.
    assert_grpc_quota(
        client
            .deploy(q.grpc(deploy_with_memory("m1", "counter", 128 * MIB)))
            .await,
        "max_memory_mb",
        64,
    );
    assert_eq!(head(&http, &base).await, before, "a refused deploy appends nothing");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tenant_memory_mb_holds_at_its_edge() {
    let dir = tempdir();
    let server = start_server(dir.path(), |c| {
        c.limits.max_memory_mb = 64;
        c.limits.max_tenant_memory_mb = 100;
    })
    .await;
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    let q = Auth::dev("q");
    let first = client
        .deploy(q.grpc(deploy_with_memory("m1", "echo", 64 * MIB)))
        .await
        .unwrap();
    let last = rest_deploy(
        &http,
        &base,
        &q,
        "m2",
        &wat_text("echo"),
        json!({ "memory_bytes": 36 * MIB }),
    )
    .await;
    assert_eq!(last.status, 201, "exactly the tenant's total is allowed: {last:?}");
    wait_started(
        &mut client,
        &Auth::none(),
        first.get_ref().seq,
        &[("q", "m1"), ("q", "m2")],
    )
    .await;
    let before = head(&http, &base).await;

    assert_grpc_quota(
        client.deploy(q.grpc(deploy_with_memory("m3", "echo", 65536))).await,
        "max_tenant_memory_mb",
        100,
    );
    // A deploy that names no memory reserves the default (64 MiB), which does not fit either.
    assert_rest_quota(
        &rest_deploy(&http, &base, &q, "m3", &wat_text("echo"), json!({})).await,
        "max_tenant_memory_mb",
        100,
    );
    // Growing a service counts only the growth: 37 MiB does not fit, 36 does.
    assert_grpc_quota(
        client
            .deploy(q.grpc(deploy_with_memory("m2", "counter", 37 * MIB)))
            .await,
        "max_tenant_memory_mb",
        100,
    );
    assert_eq!(head(&http, &base).await, before, "a refused deploy appends nothing");
    let same = client
        .deploy(q.grpc(deploy_with_memory("m2", "counter", 36 * MIB)))
        .await
        .expect("an upgrade within the tenant's memory");
    assert_eq!(same.get_ref().version, 2);
    client
        .deploy(Auth::dev("r").grpc(deploy_with_memory("m1", "echo", 64 * MIB)))
        .await
        .expect("another tenant has its own memory");
    let killed = client.kill(q.grpc(kill_request("m1"))).await.unwrap().into_inner();
    // Its instance holds the memory until it has stopped.
    wait_for_each(&mut client, &q, killed.seq, "service_stopped", &[("q", "m1")]).await;
    client
        .deploy(q.grpc(deploy_with_memory("m3", "echo", 64 * MIB)))
        .await
        .expect("a stopped service's memory is free again");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_module_bytes_holds_at_its_edge() {
    let echo = wat_text("echo");
    let size = echo.len() as u64;
    let dir = tempdir();
    let server = start_server(dir.path(), |c| c.limits.max_module_bytes = size).await;
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    let q = Auth::dev("q");
    let exact = client
        .deploy(q.grpc(grpc_deploy("e1", "echo")))
        .await
        .expect("a module of exactly the maximum is allowed");
    wait_started(&mut client, &Auth::none(), exact.get_ref().seq, &[("q", "e1")]).await;
    let before = head(&http, &base).await;

    let mut over = grpc_deploy("e2", "echo");
    over.module = Some(proto::deploy_request::Module::Wat(format!("{echo} ")));
    assert_grpc_quota(client.deploy(q.grpc(over)).await, "max_module_bytes", size);
    assert_rest_quota(
        &rest_deploy(&http, &base, &q, "e2", &format!("{echo}\n"), json!({})).await,
        "max_module_bytes",
        size,
    );
    let over_by_put = rest_put(&http, &base, &q, "e2", &format!("{echo};"), "").await;
    assert_rest_quota(&over_by_put, "max_module_bytes", size);
    assert!(
        !over_by_put.headers.contains_key("retry-after"),
        "the same module is refused every time: no retry is invited"
    );
    assert_eq!(head(&http, &base).await, before, "a refused deploy appends nothing");
    let by_put = rest_put(&http, &base, &q, "e2", &echo, "").await;
    assert_eq!(by_put.status, 201, "exactly the maximum over REST: {by_put:?}");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_deploys_per_minute_holds_at_its_edge() {
    let dir = tempdir();
    let server = start_server(dir.path(), |c| c.limits.max_deploys_per_minute = 3).await;
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    let q = Auth::dev("q");
    let first = client.deploy(q.grpc(grpc_deploy("d1", "echo"))).await.unwrap();
    assert_eq!(
        rest_deploy(&http, &base, &q, "d2", &wat_text("echo"), json!({}))
            .await
            .status,
        201
    );
    let third = rest_put(&http, &base, &q, "d3", &wat_text("echo"), "").await;
    assert_eq!(third.status, 201, "the third deploy of the minute: {third:?}");
    wait_started(
        &mut client,
        &Auth::none(),
        first.get_ref().seq,
        &[("q", "d1"), ("q", "d2"), ("q", "d3")],
    )
    .await;
    let before = head(&http, &base).await;

    let refused = client.deploy(q.grpc(grpc_deploy("d4", "echo"))).await;
    let status = refused.as_ref().expect_err("the fourth is refused").clone();
    assert_grpc_quota(refused, "max_deploys_per_minute", 3);
    // Room comes back when the first deploy's second leaves the minute: a minute after it,
    // less the time the test took since.
    let retry_after_ms: u64 = status
        .metadata()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .expect("a retry hint in milliseconds");
    assert!((45_000..61_000).contains(&retry_after_ms), "{status:?}");
    // The same, for gRPC clients' own retry policies.
    assert_eq!(
        status.metadata().get("grpc-retry-pushback-ms").unwrap(),
        &retry_after_ms.to_string()
    );
    let reply = rest_deploy(&http, &base, &q, "d4", &wat_text("echo"), json!({})).await;
    assert_rest_quota(&reply, "max_deploys_per_minute", 3);
    let retry_after: u64 = reply
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("a retry hint in seconds");
    assert!((45..=61).contains(&retry_after), "{reply:?}");
    // An upgrade is a deploy too.
    assert_grpc_quota(
        client.deploy(q.grpc(grpc_deploy("d1", "counter"))).await,
        "max_deploys_per_minute",
        3,
    );
    assert_eq!(head(&http, &base).await, before, "a refused deploy appends nothing");
    client
        .deploy(Auth::dev("r").grpc(grpc_deploy("d4", "echo")))
        .await
        .expect("another tenant has its own rate");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_overrides_replace_the_node_limits() {
    let dir = tempdir();
    let server = start_server(dir.path(), |c| {
        c.limits.max_services = 1;
        c.limits.max_memory_mb = 64;
        c.tenants.insert(
            "big".into(),
            tenant_with_limits(&[("max_services", 3), ("max_memory_mb", 128)]),
        );
        c.tenants.insert(
            "tight".into(),
            tenant_with_limits(&[("max_module_bytes", 100), ("max_watchers", 1)]),
        );
    })
    .await;
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    let big = Auth::dev("big");
    let roomy = client
        .deploy(big.grpc(deploy_with_memory("b1", "echo", 128 * MIB)))
        .await
        .expect("big may reserve 128 MiB for one service");
    client.deploy(big.grpc(grpc_deploy("b2", "echo"))).await.unwrap();
    let third = rest_deploy(&http, &base, &big, "b3", &wat_text("echo"), json!({})).await;
    assert_eq!(third.status, 201, "big's third service: {third:?}");
    assert_grpc_quota(
        client.deploy(big.grpc(grpc_deploy("b4", "echo"))).await,
        "max_services",
        3,
    );
    assert_rest_quota(
        &rest_deploy(&http, &base, &big, "b4", &wat_text("echo"), json!({})).await,
        "max_services",
        3,
    );
    // big's 128 MiB service really runs (the instance pool fits the largest override).
    wait_started(&mut client, &Auth::none(), roomy.get_ref().seq, &[("big", "b1")]).await;
    let echo = client.call(big.grpc(call_request("b1", b"roomy"))).await.unwrap();
    assert_eq!(echo.get_ref().payload, b"roomy");

    // Everyone else has the node's limits.
    let other = Auth::dev("other");
    assert_grpc_quota(
        client
            .deploy(other.grpc(deploy_with_memory("o1", "echo", 65 * MIB)))
            .await,
        "max_memory_mb",
        64,
    );
    client.deploy(other.grpc(grpc_deploy("o1", "echo"))).await.unwrap();
    assert_grpc_quota(
        client.deploy(other.grpc(grpc_deploy("o2", "echo"))).await,
        "max_services",
        1,
    );
    // An override of one key leaves the others at the node's values.
    let tight = Auth::dev("tight");
    assert_grpc_quota(
        client.deploy(tight.grpc(grpc_deploy("t1", "echo"))).await,
        "max_module_bytes",
        100,
    );
    let tiny = "(module)";
    let mut small = grpc_deploy("t1", "echo");
    small.module = Some(proto::deploy_request::Module::Wat(tiny.into()));
    let refused_by_runtime_or_ok = client.deploy(tight.grpc(small)).await;
    assert!(
        refused_by_runtime_or_ok
            .as_ref()
            .map_or_else(|s| s.code() != Code::ResourceExhausted, |_| true),
        "a module under the override is not refused by a quota: {refused_by_runtime_or_ok:?}"
    );
    // Stream limits are overridden the same way: tight may hold one, everyone else several.
    let first = open_watch(&mut client, &tight, 0, "").await;
    let second = client.watch(tight.grpc(proto::WatchRequest::default())).await;
    assert_eq!(grpc_outcome(second), Outcome::Shed, "tight's second stream");
    let sse = send(tight.rest(http.get(format!("{base}/events")))).await;
    assert_eq!(rest_outcome(&sse, 200), Outcome::Shed, "tight's second stream: {sse:?}");
    let others = (
        open_watch(&mut client, &other, 0, "").await,
        open_watch(&mut client, &other, 0, "").await,
    );
    drop((first, others));
    stop(server).await;
}

/// One racing deploy: won, or refused with a code and a message.
type RaceResult = Result<(), (Code, String)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deploys_race_for_the_last_slot_and_exactly_one_wins() {
    let dir = tempdir();
    let server = start_server(dir.path(), |c| {
        c.limits.max_services = 1;
        c.tenants.insert(
            "rate".into(),
            tenant_with_limits(&[("max_services", 100), ("max_deploys_per_minute", 3)]),
        );
    })
    .await;
    let (http, base) = (http_client(), server.http_url());
    let client = grpc_client(&server).await;

    // Eight tenants, each with one slot and two deploys (one per API) racing for it.
    let mut races = JoinSet::new();
    for n in 0..8 {
        let tenant = format!("r{n}");
        let mut grpc = client.clone();
        let auth = Auth::dev(&tenant);
        races.spawn({
            let (tenant, auth) = (tenant.clone(), auth.clone());
            async move {
                let result = grpc.deploy(auth.grpc(grpc_deploy("x", "echo"))).await;
                (
                    tenant,
                    "grpc",
                    result.map(drop).map_err(|s| (s.code(), s.message().to_string())),
                )
            }
        });
        let (http, base) = (http.clone(), base.clone());
        races.spawn(async move {
            let reply = rest_deploy(&http, &base, &auth, "y", &wat_text("echo"), json!({})).await;
            let result = match reply.status {
                201 => Ok(()),
                429 if reply.error_code() == "quota_exceeded" => {
                    Err((Code::ResourceExhausted, reply.message().to_string()))
                }
                _ => Err((Code::Unknown, format!("{reply:?}"))),
            };
            (tenant, "rest", result)
        });
    }
    let mut by_tenant: BTreeMap<String, Vec<(&str, RaceResult)>> = BTreeMap::new();
    while let Some(joined) = tokio::time::timeout(PATIENCE, races.join_next())
        .await
        .expect("in time")
    {
        let (tenant, api, result) = joined.expect("the task runs");
        by_tenant.entry(tenant).or_default().push((api, result));
    }
    for (tenant, results) in &by_tenant {
        let wins = results.iter().filter(|(_, r)| r.is_ok()).count();
        assert_eq!(wins, 1, "{tenant}: exactly one deploy wins: {results:?}");
        let (_, lost) = results.iter().find(|(_, r)| r.is_err()).unwrap();
        let (code, message) = lost.as_ref().unwrap_err();
        assert!(
            *code == Code::ResourceExhausted && message.contains("max_services"),
            "{tenant}: the loser hit the quota: {results:?}"
        );
        let listed = client
            .clone()
            .list(Auth::dev(tenant).grpc(proto::ListRequest::default()))
            .await
            .unwrap();
        assert_eq!(listed.get_ref().services.len(), 1, "{tenant}: {listed:?}");
    }

    // Six deploys race for a rate of three a minute.
    let mut races = JoinSet::new();
    for n in 0..6 {
        let mut grpc = client.clone();
        races.spawn(async move {
            grpc.deploy(Auth::dev("rate").grpc(grpc_deploy(&format!("z{n}"), "echo")))
                .await
                .map(drop)
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = tokio::time::timeout(PATIENCE, races.join_next())
        .await
        .expect("in time")
    {
        results.push(joined.expect("the task runs"));
    }
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 3, "{results:?}");
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            refused.code() == Code::ResourceExhausted && refused.message().contains("max_deploys_per_minute"),
            "{refused:?}"
        );
    }
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_hold_across_a_restart() {
    let dir = tempdir();
    let tweak = |c: &mut Config| {
        c.limits.max_services = 1;
        c.limits.max_deploys_per_minute = 2;
    };
    let server = start_server(dir.path(), tweak).await;
    let mut client = grpc_client(&server).await;
    let q = Auth::dev("q");
    client.deploy(q.grpc(grpc_deploy("a1", "echo"))).await.unwrap();
    let upgraded = client.deploy(q.grpc(grpc_deploy("a1", "counter"))).await.unwrap();
    wait_started(&mut client, &Auth::none(), upgraded.get_ref().seq, &[("q", "a1")]).await;
    stop(server).await;

    let server = start_server(dir.path(), tweak).await;
    let mut client = grpc_client(&server).await;
    assert_grpc_quota(
        client.deploy(q.grpc(grpc_deploy("a2", "echo"))).await,
        "max_services",
        1,
    );
    assert_grpc_quota(
        client.deploy(q.grpc(grpc_deploy("a1", "echo"))).await,
        "max_deploys_per_minute",
        2,
    );
    stop(server).await;
}

/// Instances reuse the slots of a pool, and a freed slot is zeroed only where its guest wrote:
/// whatever one tenant's service left in memory, the next service in that slot must not see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_instance_slot_holds_nothing_of_the_last_tenant() {
    let dir = tempdir();
    // One slot: the second service can only run in the first one's.
    let server = start_server(dir.path(), |c| c.runtime.max_instances = 1).await;
    let mut client = grpc_client(&server).await;
    let (q, r) = (Auth::dev("q"), Auth::dev("r"));

    let vault = client.deploy(q.grpc(grpc_deploy("vault", "kv"))).await.unwrap();
    wait_started(&mut client, &q, vault.get_ref().seq, &[("q", "vault")]).await;
    let set = client
        .call(q.grpc(call_request("vault", b"set secret hunter2")))
        .await
        .expect("the secret is stored");
    assert_eq!(set.get_ref().payload, b"ok");
    let got = client.call(q.grpc(call_request("vault", b"get secret"))).await.unwrap();
    assert_eq!(got.get_ref().payload, b"hunter2", "the store works");
    let killed = client.kill(q.grpc(kill_request("vault"))).await.unwrap();
    wait_for_each(
        &mut client,
        &q,
        killed.get_ref().seq,
        "service_stopped",
        &[("q", "vault")],
    )
    .await;

    let probe = client
        .deploy(r.grpc(grpc_deploy("probe", "kv")))
        .await
        .expect("the freed slot takes the next service");
    wait_started(&mut client, &r, probe.get_ref().seq, &[("r", "probe")]).await;
    let status = client
        .call(r.grpc(call_request("probe", b"get secret")))
        .await
        .expect_err("the key is not in a fresh store");
    assert!(status.message().contains("no such key"), "{status:?}");
    assert!(!status.message().contains("hunter2"), "{status:?}");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_beyond_the_instance_pool_are_refused_as_documented() {
    // config.example.toml: "[runtime] max_instances: Instances that may exist at once (wasmtime's
    // instance pool). Deploys beyond it are refused."
    let dir = tempdir();
    let server = start_server(dir.path(), |c| c.runtime.max_instances = 2).await;
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    let q = Auth::dev("q");
    let first = client.deploy(q.grpc(grpc_deploy("p1", "echo"))).await.unwrap();
    client
        .deploy(Auth::dev("r").grpc(grpc_deploy("p2", "echo")))
        .await
        .unwrap();
    wait_started(
        &mut client,
        &Auth::none(),
        first.get_ref().seq,
        &[("q", "p1"), ("r", "p2")],
    )
    .await;
    let before = head(&http, &base).await;
    let third = client.deploy(q.grpc(grpc_deploy("p3", "echo"))).await;
    let after = head(&http, &base).await;
    let listed = client
        .list(Auth::none().grpc(proto::ListRequest::default()))
        .await
        .unwrap();
    let statuses: Vec<(String, String)> = listed
        .get_ref()
        .services
        .iter()
        .map(|s| (s.service_id.clone(), format!("{} {}", s.status, s.last_error)))
        .collect();
    match &third {
        Err(status) => {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(status.message().contains("max_instances"), "{status:?}");
            assert_eq!(after, before, "a refused deploy appends nothing");
        }
        Ok(accepted) => panic!(
            "a deploy beyond runtime.max_instances = 2 was accepted ({:?}); services now: {statuses:?}",
            accepted.get_ref()
        ),
    }
    stop(server).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Load shedding
// ---------------------------------------------------------------------------------------------

/// Long enough that a burst is answered while the admitted calls still spin.
const SPIN_MS: &str = "3000";

/// Calls may spin for seconds; each admitted call gets a guest thread of its own.
fn slow_calls(config: &mut Config) {
    config.runtime.guest_threads = 4;
    config.limits.default_cpu_ms_per_call = 20_000;
    config.limits.default_call_timeout_ms = 20_000;
    config.solo.sse_keepalive_ms = 100;
}

/// What became of one request of a burst.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Served,
    /// Refused by load shedding, with the retry hint.
    Shed,
    Other(String),
}

fn grpc_outcome<T: std::fmt::Debug>(result: Result<tonic::Response<T>, Status>) -> Outcome {
    match result {
        Ok(_) => Outcome::Served,
        Err(status) if status.code() == Code::ResourceExhausted => {
            let hint = status.metadata().get("retry-after-ms").and_then(|v| v.to_str().ok());
            if hint == Some("1000") {
                Outcome::Shed
            } else {
                Outcome::Other(format!("RESOURCE_EXHAUSTED without retry-after-ms: 1000: {status:?}"))
            }
        }
        Err(status) => Outcome::Other(format!("{status:?}")),
    }
}

fn rest_outcome(reply: &Reply, served: u16) -> Outcome {
    if reply.status == served {
        Outcome::Served
    } else if reply.status == 429 && reply.error_code() == "overloaded" {
        if reply.header("retry-after") == Some("1") {
            Outcome::Shed
        } else {
            Outcome::Other(format!("429 without Retry-After: 1: {reply:?}"))
        }
    } else {
        Outcome::Other(format!("{reply:?}"))
    }
}

/// Deploys `ids` of spin for `tenant` and waits until they all run.
async fn deploy_spinners(client: &mut Grpc, tenant: &str, ids: &[String]) {
    let mut first = None;
    for id in ids {
        let deployed = client
            .deploy(Auth::dev(tenant).grpc(grpc_deploy(id, "spin")))
            .await
            .expect("spin deploys");
        first.get_or_insert(deployed.get_ref().seq);
    }
    let services: Vec<(&str, &str)> = ids.iter().map(|id| (tenant, id.as_str())).collect();
    wait_started(client, &Auth::none(), first.unwrap(), &services).await;
}

/// A spin call of `ms` over gRPC (even `n`) or REST (odd `n`), as `tenant`.
#[allow(clippy::too_many_arguments)]
fn spawn_spin(
    set: &mut JoinSet<Outcome>,
    n: usize,
    client: &Grpc,
    http: &reqwest::Client,
    base: &str,
    tenant: &str,
    id: &str,
    ms: &str,
) {
    let auth = Auth::dev(tenant);
    let (id, ms) = (id.to_string(), ms.to_string());
    if n.is_multiple_of(2) {
        let mut client = client.clone();
        set.spawn(async move { grpc_outcome(client.call(auth.grpc(call_request(&id, ms.as_bytes()))).await) });
    } else {
        let (http, url) = (http.clone(), format!("{base}/services/{id}/call"));
        set.spawn(async move { rest_outcome(&send(auth.rest(http.post(url).body(ms))).await, 200) });
    }
}

/// Collects outcomes until `sheds` requests were shed (the admitted ones still run), returning
/// (served so far, shed, others).
async fn until_shed(set: &mut JoinSet<Outcome>, sheds: usize) -> (usize, usize, Vec<String>) {
    let (mut served, mut shed, mut other) = (0, 0, Vec::new());
    while shed + other.len() < sheds {
        let Some(joined) = tokio::time::timeout(PATIENCE, set.join_next()).await.expect("in time") else {
            break;
        };
        match joined.expect("the task runs") {
            Outcome::Served => served += 1,
            Outcome::Shed => shed += 1,
            Outcome::Other(what) => other.push(what),
        }
    }
    (served, shed, other)
}

async fn drain(set: &mut JoinSet<Outcome>) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    while let Some(joined) = tokio::time::timeout(PATIENCE, set.join_next()).await.expect("in time") {
        outcomes.push(joined.expect("the task runs"));
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_tenant_limit_is_shed_with_a_retry_hint_and_permits_do_not_leak() {
    let dir = tempdir();
    let server = start_server(dir.path(), |c| {
        slow_calls(c);
        c.limits.max_in_flight_requests = 3;
    })
    .await;
    let (http, base) = (http_client(), server.http_url());
    let url = |path: &str| format!("{base}{path}");
    let mut client = grpc_client(&server).await;
    let ids: Vec<String> = (0..10).map(|n| format!("spin{n}")).collect();
    deploy_spinners(&mut client, "a", &ids).await;
    let before = head(&http, &base).await;
    let a = Auth::dev("a");

    // Ten slow calls at once: three are admitted and hold their permits, seven are shed at once.
    let mut burst = JoinSet::new();
    for (n, id) in ids.iter().enumerate() {
        spawn_spin(&mut burst, n, &client, &http, &base, "a", id, SPIN_MS);
    }
    let (served_early, shed, other) = until_shed(&mut burst, 7).await;
    assert_eq!((served_early, shed), (0, 7), "{other:?}");
    assert!(other.is_empty(), "{other:?}");

    // While the three spin, every other request of the tenant is shed too, whatever it is.
    let mut failures = Vec::new();
    let mut wave = Vec::new();
    for (what, request) in [
        ("GET /services", http.get(url("/services"))),
        ("GET /services/spin0", http.get(url("/services/spin0"))),
        ("GET /services/spin0/logs", http.get(url("/services/spin0/logs"))),
        ("DELETE /services/spin9", http.delete(url("/services/spin9"))),
        (
            "POST /services/spin0/call",
            http.post(url("/services/spin0/call")).body("1"),
        ),
        (
            "POST /services",
            http.post(url("/services"))
                .json(&json!({ "service_id": "late", "wat": wat_text("echo") })),
        ),
        (
            "PUT /services/late",
            http.put(url("/services/late"))
                .header("content-type", "text/plain")
                .body(wat_text("echo")),
        ),
    ] {
        wave.push((what.to_string(), rest_outcome(&send(a.rest(request)).await, 0)));
    }
    wave.push((
        "gRPC Status".into(),
        grpc_outcome(client.status(a.grpc(status_request("spin0"))).await),
    ));
    wave.push((
        "gRPC List".into(),
        grpc_outcome(client.list(a.grpc(proto::ListRequest::default())).await),
    ));
    wave.push((
        "gRPC Deploy".into(),
        grpc_outcome(client.deploy(a.grpc(grpc_deploy("late", "echo"))).await),
    ));
    wave.push((
        "gRPC Kill".into(),
        grpc_outcome(client.kill(a.grpc(kill_request("spin9"))).await),
    ));
    wave.push((
        "gRPC Call".into(),
        grpc_outcome(client.call(a.grpc(call_request("spin0", b"1"))).await),
    ));
    wave.push((
        "gRPC Logs".into(),
        grpc_outcome(client.logs(a.grpc(logs_request("spin0", false))).await),
    ));
    let wave_shed = wave.iter().filter(|(_, o)| *o == Outcome::Shed).count();
    for (what, outcome) in &wave {
        if *outcome != Outcome::Shed {
            failures.push(format!("{what} while tenant a is at its limit: {outcome:?}"));
        }
    }
    // Meanwhile another tenant and the public routes are served.
    let b = Auth::dev("b");
    let listed = send(b.rest(http.get(url("/services")))).await;
    if listed.status != 200 {
        failures.push(format!("tenant b while a is at its limit: {listed:?}"));
    }
    if let Err(e) = client.list(b.grpc(proto::ListRequest::default())).await {
        failures.push(format!("tenant b over gRPC while a is at its limit: {e:?}"));
    }
    let during = head(&http, &base).await;
    if during != before {
        failures.push(format!("shed requests did work: head {before} -> {during}"));
    }
    let counted = metric(&http, &base, "solo_shed_total{scope=\"tenant\"}").await;
    if counted != (7 + wave_shed) as f64 {
        failures.push(format!(
            "solo_shed_total{{scope=\"tenant\"}} = {counted}, want {}",
            7 + wave_shed
        ));
    }
    if metric(&http, &base, "solo_shed_total{scope=\"node\"}").await != 0.0 {
        failures.push("the node limit was not reached, yet node sheds were counted".into());
    }
    let rest = drain(&mut burst).await;
    assert_eq!(rest, vec![Outcome::Served; 3], "the three admitted calls finish");

    // After the burst the node serves normally.
    let listed = send(a.rest(http.get(url("/services")))).await;
    assert_eq!((listed.status, listed.json["total"].clone()), (200, json!(10)));
    let done = client.call(a.grpc(call_request("spin0", b"1"))).await.unwrap();
    assert_eq!(done.get_ref().payload, b"done");

    // Many requests that end every way: refused after admission, failed, cancelled by the client.
    for n in 0..10 {
        let missing = client.call(a.grpc(call_request("ghost", b"1"))).await;
        assert_eq!(missing.unwrap_err().code(), Code::NotFound);
        let invalid = send(
            a.rest(
                http.post(url("/services"))
                    .json(&json!({ "service_id": "bad", "wat": "(" })),
            ),
        )
        .await;
        assert_eq!(invalid.status, 400, "{invalid:?}");
        let status = send(a.rest(http.get(url(&format!("/services/spin{n}"))))).await;
        assert_eq!(status.status, 200);
    }
    for id in &ids[..3] {
        let mut grpc = client.clone();
        let cancelled =
            tokio::time::timeout(Duration::from_millis(100), grpc.call(a.grpc(call_request(id, b"400")))).await;
        assert!(cancelled.is_err(), "the client gave up first");
    }
    // A call queued behind each cancelled one answers once that one's guest is done.
    for id in &ids[..3] {
        let after = client.call(a.grpc(call_request(id, b"1"))).await.unwrap();
        assert_eq!(after.get_ref().payload, b"done");
    }
    // Exactly the limit fits in flight again: of four slow calls, three are served.
    let mut again = JoinSet::new();
    for (n, id) in ids[3..7].iter().enumerate() {
        spawn_spin(&mut again, n, &client, &http, &base, "a", id, "1500");
    }
    let mut outcomes = drain(&mut again).await;
    outcomes.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(
        outcomes,
        vec![Outcome::Served, Outcome::Served, Outcome::Served, Outcome::Shed],
        "no permit leaked and none was released twice"
    );
    assert_no_failures(&failures);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_node_limit_is_shed_for_every_tenant() {
    let dir = tempdir();
    let server = start_server(dir.path(), |c| {
        slow_calls(c);
        c.solo.max_in_flight = 3;
    })
    .await;
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    let ids: Vec<String> = (0..6).map(|n| format!("spin{n}")).collect();
    deploy_spinners(&mut client, "a", &ids).await;
    deploy_spinners(&mut client, "b", &ids).await;

    let mut burst = JoinSet::new();
    for (n, id) in ids.iter().enumerate() {
        spawn_spin(&mut burst, n, &client, &http, &base, "a", id, SPIN_MS);
        spawn_spin(&mut burst, n + 1, &client, &http, &base, "b", id, SPIN_MS);
    }
    let (served_early, shed, other) = until_shed(&mut burst, 9).await;
    assert_eq!((served_early, shed), (0, 9), "{other:?}");
    assert!(other.is_empty(), "{other:?}");
    // A third tenant is shed too: the node is full.
    let c = Auth::dev("c");
    let third = send(c.rest(http.get(format!("{base}/services")))).await;
    assert_eq!(rest_outcome(&third, 200), Outcome::Shed, "{third:?}");
    assert!(third.message().contains("node"), "{third:?}");
    let health = send(http.get(format!("{base}/health"))).await;
    assert_eq!(health.status, 200, "health is not shed");
    assert_eq!(metric(&http, &base, "solo_shed_total{scope=\"node\"}").await, 10.0);
    assert_eq!(metric(&http, &base, "solo_shed_total{scope=\"tenant\"}").await, 0.0);
    let rest = drain(&mut burst).await;
    assert_eq!(rest, vec![Outcome::Served; 3]);
    // Both tenants are served again.
    for tenant in ["a", "b", "c"] {
        let listed = send(Auth::dev(tenant).rest(http.get(format!("{base}/services")))).await;
        assert_eq!(listed.status, 200, "{tenant}: {listed:?}");
    }
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_over_max_watchers_are_shed_on_watch_sse_and_log_follow() {
    let dir = tempdir();
    let server = start_server(dir.path(), |c| {
        slow_calls(c);
        c.limits.max_watchers = 2;
    })
    .await;
    let (http, base) = (http_client(), server.http_url());
    let url = |path: &str| format!("{base}{path}");
    let mut client = grpc_client(&server).await;
    let a = Auth::dev("a");
    let deployed = client.deploy(a.grpc(grpc_deploy("echo", "echo"))).await.unwrap();
    // The admin waits (its streams count for the tenant "default", not for a).
    wait_started(&mut client, &Auth::none(), deployed.get_ref().seq, &[("a", "echo")]).await;

    let watch = open_watch(&mut client, &a, 0, "").await;
    let sse = open_sse(a.rest(http.get(url("/events")))).await;
    let mut failures = Vec::new();
    let mut refused = 0;
    let mut shed = |what: &str, outcome: Outcome| {
        refused += 1;
        if outcome != Outcome::Shed {
            failures.push(format!("{what} over max_watchers: {outcome:?}"));
        }
    };
    shed(
        "gRPC Watch",
        grpc_outcome(client.watch(a.grpc(proto::WatchRequest::default())).await),
    );
    shed(
        "gRPC Logs(follow)",
        grpc_outcome(client.logs(a.grpc(logs_request("echo", true))).await),
    );
    shed(
        "SSE /events",
        rest_outcome(&send(a.rest(http.get(url("/events")))).await, 200),
    );
    shed(
        "SSE /services/echo/logs?follow=true",
        rest_outcome(
            &send(a.rest(http.get(url("/services/echo/logs?follow=true")))).await,
            200,
        ),
    );
    // Reading logs without following is a request, not a stream.
    if let Err(e) = client.logs(a.grpc(logs_request("echo", false))).await {
        failures.push(format!("gRPC Logs without follow: {e:?}"));
    }
    let lines = send(a.rest(http.get(url("/services/echo/logs")))).await;
    if lines.status != 200 {
        failures.push(format!("GET /services/echo/logs: {lines:?}"));
    }
    // Another tenant has its own allowance.
    let b = Auth::dev("b");
    let b_watch = client.watch(b.grpc(proto::WatchRequest::default())).await;
    let b_sse = send(b.rest(http.get(url("/events")))).await;
    if b_watch.is_err() || !b_sse.is_event_stream() {
        failures.push(format!("tenant b's streams: {b_watch:?} {b_sse:?}"));
    }
    let counted = metric(&http, &base, "solo_shed_total{scope=\"watchers\"}").await;
    if counted != refused as f64 {
        failures.push(format!(
            "solo_shed_total{{scope=\"watchers\"}} = {counted}, want {refused}"
        ));
    }
    assert_no_failures(&failures);

    // A closed stream gives its place back (the node notices the close a little later).
    drop(watch);
    let reopened = async {
        loop {
            match client.watch(a.grpc(proto::WatchRequest::default())).await {
                Ok(stream) => return stream,
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    };
    let watch = tokio::time::timeout(PATIENCE, reopened)
        .await
        .expect("a closed Watch frees its permit");
    drop(sse);
    let reopened = async {
        loop {
            let reply = send(a.rest(http.get(url("/events")))).await;
            if reply.is_event_stream() {
                return;
            }
            assert_eq!(reply.status, 429, "{reply:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, reopened)
        .await
        .expect("a closed SSE stream frees its permit");
    drop((watch, b_watch));
    stop(server).await;
}

// ---------------------------------------------------------------------------------------------
// 4. TLS
// ---------------------------------------------------------------------------------------------

/// A certificate authority made for one test.
struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).expect("a self-signed CA").pem();
        TestCa { params, key, pem }
    }

    /// A leaf certificate for `common_name` (and `names` as subject alternative names), and its
    /// private key, both PEM.
    fn issue(&self, common_name: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().expect("a leaf key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("a signed leaf");
        (cert.pem(), key.serialize_pem())
    }

    fn client(&self, tenant: &str) -> (String, String) {
        self.issue(tenant, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// Writes the node's certificate (for localhost and 127.0.0.1) and key, and the client CA if
/// any, into `dir`, and points `config` at them.
fn configure_tls(config: &mut Config, dir: &Path, server_ca: &TestCa, client_ca: Option<&TestCa>) {
    let (cert, key) = server_ca.issue(
        "solo test node",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let write = |name: &str, text: &str| -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("a PEM file");
        path
    };
    config.security.tls_cert = Some(write("node.crt", &cert));
    config.security.tls_key = Some(write("node.key", &key));
    config.security.client_ca = client_ca.map(|ca| write("clients-ca.crt", &ca.pem));
}

/// A gRPC client over TLS trusting `ca` (if any), with a client certificate (if any). Connecting
/// and one List must both work for `Ok`.
async fn tls_grpc(
    addr: SocketAddr,
    ca: Option<&str>,
    identity: Option<&(String, String)>,
    auth: &Auth,
) -> Result<(Grpc, proto::ListResponse), String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut tls = ClientTlsConfig::new().domain_name("localhost");
    if let Some(ca) = ca {
        tls = tls.ca_certificate(Certificate::from_pem(ca));
    }
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .timeout(Duration::from_secs(10));
    let channel = tokio::time::timeout(PATIENCE, endpoint.connect())
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut client = Grpc::new(channel);
    let listed = client
        .list(auth.grpc(proto::ListRequest::default()))
        .await
        .map_err(|e| format!("list: {e:?}"))?;
    Ok((client, listed.into_inner()))
}

/// A plaintext gRPC client: connecting and one List must both work for `Ok`.
async fn plain_grpc(addr: SocketAddr) -> Result<(), String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(10));
    let channel = tokio::time::timeout(PATIENCE, endpoint.connect())
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e:?}"))?;
    Grpc::new(channel)
        .list(Auth::dev("a").grpc(proto::ListRequest::default()))
        .await
        .map(drop)
        .map_err(|e| format!("list: {e:?}"))
}

/// An HTTPS client trusting `ca` (if any), with a client certificate (if any), that reaches the
/// node as `localhost`.
fn tls_http(addr: SocketAddr, ca: Option<&str>, identity: Option<&(String, String)>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .resolve("localhost", addr)
        .timeout(Duration::from_secs(10));
    if let Some(ca) = ca {
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).expect("a CA"));
    }
    if let Some((cert, key)) = identity {
        let pem = format!("{cert}{key}");
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).expect("an identity"));
    }
    builder.build().expect("an HTTPS client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_both_listeners_to_clients_that_trust_the_ca_and_refuses_plaintext() {
    let dir = tempdir();
    let pki = tempdir();
    let ca = TestCa::new("solo test CA");
    let server = start_server(dir.path(), |c| configure_tls(c, pki.path(), &ca, None)).await;
    assert!(server.tls && server.grpc_url().starts_with("https://") && server.http_url().starts_with("https://"));
    let a = Auth::dev("a");

    // gRPC over TLS, a whole round trip.
    let (mut client, listed) = tls_grpc(server.grpc_addr, Some(&ca.pem), None, &a)
        .await
        .expect("a client trusting the CA connects");
    assert!(listed.services.is_empty());
    let deployed = client.deploy(a.grpc(grpc_deploy("echo", "echo"))).await.unwrap();
    wait_started(&mut client, &a, deployed.get_ref().seq, &[("a", "echo")]).await;
    let echo = client.call(a.grpc(call_request("echo", b"secret"))).await.unwrap();
    assert_eq!(echo.get_ref().payload, b"secret");

    // REST over TLS (HTTP/2 by ALPN).
    let https = tls_http(server.http_addr, Some(&ca.pem), None);
    let port = server.http_addr.port();
    let response = https
        .get(format!("https://localhost:{port}/services"))
        .header("x-tenant-id", "a")
        .send()
        .await
        .expect("a client trusting the CA connects over https");
    assert_eq!(response.version(), reqwest::Version::HTTP_2, "ALPN picks h2");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["services"][0]["service_id"], "echo", "{body}");
    let mut sse = open_sse(
        https
            .get(format!("https://localhost:{port}/events?from=1"))
            .header("x-tenant-id", "a"),
    )
    .await;
    sse_until(&mut sse, |d| sse_is(d, "a", "echo", "service_started")).await;
    drop(sse);

    // A client that does not trust the CA gives up; so does one that wants another name.
    assert!(tls_grpc(server.grpc_addr, None, None, &a).await.is_err());
    let untrusting = tls_http(server.http_addr, None, None);
    assert!(
        untrusting
            .get(format!("https://localhost:{port}/health"))
            .send()
            .await
            .is_err()
    );
    let other_ca = TestCa::new("another CA");
    assert!(tls_grpc(server.grpc_addr, Some(&other_ca.pem), None, &a).await.is_err());

    // Plaintext is refused on both listeners.
    let plain = plain_grpc(server.grpc_addr).await;
    assert!(plain.is_err(), "plaintext gRPC: {plain:?}");
    let plain = http_client()
        .get(format!("http://{}/health", server.http_addr))
        .send()
        .await;
    assert!(plain.is_err(), "plaintext HTTP: {plain:?}");
    let plain = http_client()
        .get(format!("http://{}/services", server.http_addr))
        .header("x-tenant-id", "a")
        .send()
        .await;
    assert!(plain.is_err(), "plaintext HTTP: {plain:?}");
    stop(server).await;
}

/// Over TLS, a connection idle past its time closes too (the TLS layer sees the end of its
/// stream), and its client's next request reconnects; a quiet Watch keeps its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_connections_close_and_their_clients_reconnect() {
    let dir = tempdir();
    let pki = tempdir();
    let ca = TestCa::new("solo test CA");
    let idle = Duration::from_millis(300);
    let server = start_server(dir.path(), |c| {
        configure_tls(c, pki.path(), &ca, None);
        c.solo.grpc_max_connection_idle_ms = 300;
        c.solo.http_header_timeout_ms = 300;
    })
    .await;
    let a = Auth::dev("a");
    let (mut client, _) = tls_grpc(server.grpc_addr, Some(&ca.pem), None, &a)
        .await
        .expect("a client trusting the CA connects");
    let (mut watcher, _) = tls_grpc(server.grpc_addr, Some(&ca.pem), None, &a)
        .await
        .expect("a client trusting the CA connects");
    let mut watch = open_watch(&mut watcher, &a, 0, "").await;
    let https = tls_http(server.http_addr, Some(&ca.pem), None);
    let health = format!("https://localhost:{}/health", server.http_addr.port());
    assert_eq!(https.get(&health).send().await.unwrap().status(), 200);
    tokio::time::sleep(idle * 5).await;
    // Both clients' connections closed meanwhile; their next requests are served.
    client
        .list(a.grpc(proto::ListRequest::default()))
        .await
        .expect("the call after the idle close is served");
    assert_eq!(https.get(&health).send().await.unwrap().status(), 200);
    let deployed = client.deploy(a.grpc(grpc_deploy("echo", "echo"))).await.unwrap();
    let seq = deployed.get_ref().seq;
    watch_until(&mut watch, |e| e.seq == seq).await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_with_client_ca_and_name_the_tenant() {
    let dir = tempdir();
    let pki = tempdir();
    let ca = TestCa::new("solo test CA");
    let clients = TestCa::new("solo clients CA");
    let mut keys = None;
    let server = start_server(dir.path(), |c| {
        keys = Some(Keys::configure(c));
        configure_tls(c, pki.path(), &ca, Some(&clients));
    })
    .await;
    let keys = keys.unwrap();
    let admin = Auth::bearer(&keys.admin);
    let operator = clients.client("operator");

    // The admin (a certificate, and the admin's token) deploys for alpha and beta.
    let (mut client, _) = tls_grpc(server.grpc_addr, Some(&ca.pem), Some(&operator), &admin)
        .await
        .expect("the admin connects with a certificate");
    let first = client
        .deploy(admin.clone().naming("alpha").grpc(grpc_deploy("svc", "echo")))
        .await
        .unwrap();
    client
        .deploy(admin.clone().naming("beta").grpc(grpc_deploy("svc", "counter")))
        .await
        .unwrap();
    client
        .deploy(admin.clone().naming("beta").grpc(grpc_deploy("other", "echo")))
        .await
        .unwrap();
    wait_started(
        &mut client,
        &admin,
        first.get_ref().seq,
        &[("alpha", "svc"), ("beta", "svc"), ("beta", "other")],
    )
    .await;

    // A certificate whose subject names alpha acts as alpha, without a token.
    let alpha_cert = clients.client("alpha");
    let (mut alpha, listed) = tls_grpc(server.grpc_addr, Some(&ca.pem), Some(&alpha_cert), &Auth::none())
        .await
        .expect("alpha connects with its certificate");
    let names: Vec<(&str, &str)> = listed
        .services
        .iter()
        .map(|s| (s.tenant.as_str(), s.service_id.as_str()))
        .collect();
    assert_eq!(names, [("alpha", "svc")]);
    let echo = alpha
        .call(Auth::none().grpc(call_request("svc", b"mine")))
        .await
        .unwrap();
    assert_eq!(
        echo.get_ref().payload,
        b"mine",
        "alpha's svc is its echo, not beta's counter"
    );
    let other = alpha.status(Auth::none().grpc(status_request("other"))).await;
    assert_eq!(other.unwrap_err().code(), Code::NotFound);
    let naming = alpha.list(Auth::dev("beta").grpc(proto::ListRequest::default())).await;
    assert_eq!(naming.unwrap_err().code(), Code::PermissionDenied);

    let https = tls_http(server.http_addr, Some(&ca.pem), Some(&alpha_cert));
    let port = server.http_addr.port();
    let listed = send(https.get(format!("https://localhost:{port}/services"))).await;
    assert_eq!(listed.status, 200, "{listed:?}");
    assert_eq!(listed.json["total"], 1, "{listed:?}");
    assert_eq!(listed.json["services"][0]["tenant"], "alpha");
    let other = send(https.get(format!("https://localhost:{port}/services/other"))).await;
    assert_eq!(other.status, 404, "{other:?}");
    let call = send(
        https
            .post(format!("https://localhost:{port}/services/svc/call"))
            .body("hey"),
    )
    .await;
    assert_eq!(call.body, b"hey");
    // Its large bodies are its own: a module past the free 64 KiB, over either API.
    let big_wat = format!("{}\n;; {}", wat_text("echo"), "x".repeat(100 << 10));
    let mut big = grpc_deploy("big", "echo");
    big.module = Some(proto::deploy_request::Module::Wat(big_wat.clone()));
    let deployed = alpha.deploy(Auth::none().grpc(big)).await.unwrap();
    assert!(deployed.get_ref().created);
    let deployed = send(
        https
            .put(format!("https://localhost:{port}/services/big2"))
            .header("content-type", "text/plain")
            .body(big_wat),
    )
    .await;
    assert_eq!(deployed.status, 201, "{deployed:?}");
    assert_eq!(deployed.json["tenant"], "alpha");
    let shutdown = send(https.post(format!("https://localhost:{port}/shutdown"))).await;
    assert_eq!(
        shutdown.status, 403,
        "a tenant's certificate cannot shut down: {shutdown:?}"
    );

    // Without a certificate, or with one from another CA, the handshake is refused.
    let none = tls_grpc(server.grpc_addr, Some(&ca.pem), None, &admin).await;
    assert!(
        none.is_err(),
        "gRPC without a client certificate: {:?}",
        none.map(|r| r.1)
    );
    let https = tls_http(server.http_addr, Some(&ca.pem), None);
    let none = https
        .get(format!("https://localhost:{port}/services"))
        .bearer_auth(&keys.admin)
        .send()
        .await;
    assert!(none.is_err(), "HTTPS without a client certificate: {none:?}");
    let stranger = TestCa::new("a stranger's CA").client("alpha");
    let forged = tls_grpc(server.grpc_addr, Some(&ca.pem), Some(&stranger), &Auth::none()).await;
    assert!(
        forged.is_err(),
        "a certificate from another CA: {:?}",
        forged.map(|r| r.1)
    );
    let https = tls_http(server.http_addr, Some(&ca.pem), Some(&stranger));
    let forged = https.get(format!("https://localhost:{port}/services")).send().await;
    assert!(forged.is_err(), "a certificate from another CA over HTTPS: {forged:?}");
    stop(server).await;
}

// ---------------------------------------------------------------------------------------------
// 5. Development mode
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_mode_only_on_loopback_and_tokens_open_other_addresses() {
    // Loopback without tokens starts, and x-tenant-id names the tenant.
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let (http, base) = (http_client(), server.http_url());
    let deployed = rest_deploy(&http, &base, &Auth::dev("a"), "echo", &wat_text("echo"), json!({})).await;
    assert_eq!((deployed.status, deployed.json["tenant"].as_str()), (201, Some("a")));
    stop(server).await;

    // Any listener off loopback without a token: the node refuses to start, and says how to fix it.
    for (grpc, http_addr) in [("0.0.0.0:0", "127.0.0.1:0"), ("127.0.0.1:0", "0.0.0.0:0")] {
        let dir = tempdir();
        let mut config = node_config(dir.path());
        config.solo.grpc_addr = grpc.parse().unwrap();
        config.solo.http_addr = http_addr.parse().unwrap();
        let err = Server::start(config).await.expect_err("no tokens off loopback");
        let message = format!("{err:#}");
        for needle in ["0.0.0.0", "solo token new", "admin_token_sha256", "token_sha256"] {
            assert!(message.contains(needle), "the refusal mentions {needle}: {message}");
        }
    }

    // With a token it starts on 0.0.0.0, and the token is required.
    let dir = tempdir();
    let (token, hash) = solo::api::auth::new_token().unwrap();
    let mut config = node_config(dir.path());
    config.solo.grpc_addr = "0.0.0.0:0".parse().unwrap();
    config.solo.http_addr = "0.0.0.0:0".parse().unwrap();
    config.security.admin_token_sha256 = vec![hash];
    let server = Server::start(config).await.expect("a token allows any address");
    let http_at = SocketAddr::from(([127, 0, 0, 1], server.http_addr.port()));
    let grpc_at = SocketAddr::from(([127, 0, 0, 1], server.grpc_addr.port()));
    let anonymous = send(Auth::dev("a").rest(http.get(format!("http://{http_at}/services")))).await;
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    let admin = send(Auth::bearer(&token).rest(http.get(format!("http://{http_at}/services")))).await;
    assert_eq!(admin.status, 200, "{admin:?}");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc_at}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = Grpc::new(channel);
    let anonymous = client.list(Auth::dev("a").grpc(proto::ListRequest::default())).await;
    assert_eq!(anonymous.unwrap_err().code(), Code::Unauthenticated);
    client
        .list(Auth::bearer(&token).grpc(proto::ListRequest::default()))
        .await
        .expect("the admin's token works");
    stop(server).await;
}

// ---------------------------------------------------------------------------------------------
// 6. The command line: config check, token new
// ---------------------------------------------------------------------------------------------

fn solo_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_solo"));
    command.env_remove("SOLO_CONFIG").env_remove("RUST_LOG");
    command
}

fn config_check(path: &Path) -> std::process::Output {
    solo_command()
        .args(["config", "check"])
        .arg(path)
        .output()
        .expect("solo runs")
}

#[test]
fn config_check_prints_the_effective_configuration_with_token_hashes_redacted() {
    let dir = tempdir();
    let hash = || solo::api::auth::new_token().unwrap().1;
    let (admin, acme1, acme2) = (hash(), hash(), hash());
    let path = dir.path().join("solo.toml");
    let text = format!(
        r#"
[solo]
grpc_addr = "0.0.0.0:7000"

[limits]
max_services = 9

[security]
admin_token_sha256 = ["{admin}"]

[tenants.acme]
token_sha256 = ["{acme1}", "{acme2}"]

[tenants.acme.limits]
max_deploys_per_minute = 5
"#
    );
    std::fs::write(&path, text).unwrap();
    let output = config_check(&path);
    let (stdout, stderr) = (
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    );
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for secret in [&admin, &acme1, &acme2] {
        assert!(
            !stdout.contains(secret.as_str()) && !stderr.contains(secret.as_str()),
            "a token hash is printed:\n{stdout}\n{stderr}"
        );
    }
    let printed: toml::Table = toml::from_str(&stdout).expect("the effective configuration is TOML");
    for section in ["solo", "database", "limits", "runtime", "security", "telemetry"] {
        assert!(printed.contains_key(section), "[{section}] is printed:\n{stdout}");
    }
    let redacted = |v: &toml::Value| {
        v.as_array().map(|a| {
            a.iter()
                .map(|h| h.as_str().unwrap_or("").to_string())
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(
        redacted(&printed["security"]["admin_token_sha256"]),
        Some(vec!["<redacted>".to_string()])
    );
    assert_eq!(
        redacted(&printed["tenants"]["acme"]["token_sha256"]),
        Some(vec!["<redacted>".to_string(); 2]),
        "{stdout}"
    );
    // Effective: what the file says, and the defaults for what it does not.
    assert_eq!(printed["solo"]["grpc_addr"].as_str(), Some("0.0.0.0:7000"));
    assert_eq!(printed["limits"]["max_services"].as_integer(), Some(9));
    assert_eq!(printed["limits"]["max_deploys_per_minute"].as_integer(), Some(600));
    assert_eq!(printed["database"]["map_size_mb"].as_integer(), Some(65536));
    assert_eq!(
        printed["tenants"]["acme"]["limits"]["max_deploys_per_minute"].as_integer(),
        Some(5)
    );
    // The example file checks too.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let output = config_check(&example);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn config_check_refuses_bad_files_naming_the_key() {
    let dir = tempdir();
    let cases: &[(&str, &[&str])] = &[
        ("[limits]\nmax_services = \"many\"\n", &["limits.max_services"]),
        ("[limits]\nmax_servics = 3\n", &["max_servics"]),
        ("[solo]\ngrpc_addr = \"nowhere\"\n", &["solo.grpc_addr"]),
        (
            "[security]\nadmin_token_sha256 = [\"abc\"]\n",
            &["security.admin_token_sha256"],
        ),
        (
            "[tenants.acme]\ntoken_sha256 = [\"xyz\"]\n",
            &["tenants.acme.token_sha256"],
        ),
        ("[tenants.Acme]\n", &["tenants.Acme"]),
        ("[tenants.-acme]\n", &["tenants.-acme"]),
        (
            "[tenants.acme.limits]\nmax_servicez = 2\n",
            &["tenants.acme.limits", "max_servicez"],
        ),
        (
            "[tenants.acme.limits]\nmax_memory_mb = 8192\n",
            &["tenants.acme.limits.max_memory_mb"],
        ),
        (
            "[tenants.acme.limits]\nmax_services = \"x\"\n",
            &["tenants.acme.limits", "max_services"],
        ),
        (
            "[security]\ntls_cert = \"/nonexistent/node.crt\"\ntls_key = \"/nonexistent/node.key\"\n",
            &["security.tls_cert", "/nonexistent/node.crt"],
        ),
        ("[security]\ntls_cert = \"/x.crt\"\n", &["security.tls_key"]),
        ("[security]\nclient_ca = \"/x.crt\"\n", &["security.client_ca"]),
        ("[nope]\n", &["nope"]),
        ("this is = = not toml", &["config"]),
    ];
    let mut failures = Vec::new();
    for (n, (text, needles)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{n}.toml"));
        std::fs::write(&path, text).unwrap();
        let output = config_check(&path);
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if output.status.success() {
            failures.push(format!("{text:?}: accepted"));
        } else if let Some(missing) = needles.iter().find(|n| !printed.contains(*n)) {
            failures.push(format!("{text:?}: the error does not name {missing}: {printed}"));
        }
    }
    let missing = config_check(&dir.path().join("missing.toml"));
    if missing.status.success() || !String::from_utf8_lossy(&missing.stderr).contains("missing.toml") {
        failures.push(format!("a missing file: {missing:?}"));
    }
    assert_no_failures(&failures);
}

#[test]
fn config_check_refuses_a_token_hash_given_to_two_principals() {
    // One token must name one principal: a hash listed for two is ambiguous (which one acts?).
    let dir = tempdir();
    let hash = solo::api::auth::new_token().unwrap().1;
    let cases = [
        format!("[security]\nadmin_token_sha256 = [\"{hash}\"]\n[tenants.acme]\ntoken_sha256 = [\"{hash}\"]\n"),
        format!("[tenants.acme]\ntoken_sha256 = [\"{hash}\"]\n[tenants.beta]\ntoken_sha256 = [\"{hash}\"]\n"),
    ];
    for (n, text) in cases.iter().enumerate() {
        let path = dir.path().join(format!("shared{n}.toml"));
        std::fs::write(&path, text).unwrap();
        let output = config_check(&path);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains("token_sha256"),
            "a hash shared by two principals is refused, naming the key:\n{text}\n{stderr}"
        );
    }
}

/// Starts `solo serve` and waits for its `solo listening` line; `None` if it exits first. The
/// child is killed and its stderr returned.
fn serve_once(command: &mut Command) -> (Option<String>, String) {
    use std::io::{BufRead as _, Read as _};
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("solo starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        let listening = lines.find_map(|l| l.ok().filter(|l| l.starts_with("solo listening")));
        let _ = tx.send(listening);
    });
    let listening = rx.recv_timeout(PATIENCE).expect("solo serves or exits in time");
    let _ = child.kill();
    let _ = child.wait();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (listening, stderr)
}

#[test]
fn serve_warns_in_development_mode_and_needs_a_token_off_loopback() {
    let dir = tempdir();
    let serve = |data: &str, grpc: &str, http: &str| {
        let mut command = solo_command();
        command.arg("serve").arg("--data-dir").arg(dir.path().join(data)).args([
            "--grpc-addr",
            grpc,
            "--http-addr",
            http,
        ]);
        command
    };
    let (listening, stderr) = serve_once(&mut serve("dev", "127.0.0.1:0", "127.0.0.1:0"));
    assert!(listening.is_some(), "{stderr}");
    assert!(stderr.contains("development mode"), "startup warns: {stderr}");

    let (listening, stderr) = serve_once(&mut serve("exposed", "0.0.0.0:0", "127.0.0.1:0"));
    assert!(listening.is_none(), "no token off loopback must not serve: {stderr}");
    assert!(
        stderr.contains("solo token new"),
        "the refusal says how to add a token: {stderr}"
    );

    // A token in the file named by --config, or by SOLO_CONFIG, lets it listen anywhere.
    let hash = solo::api::auth::new_token().unwrap().1;
    let path = dir.path().join("solo.toml");
    std::fs::write(&path, format!("[security]\nadmin_token_sha256 = [\"{hash}\"]\n")).unwrap();
    let mut with_flag = serve("flag", "0.0.0.0:0", "0.0.0.0:0");
    with_flag.arg("--config").arg(&path);
    let (listening, stderr) = serve_once(&mut with_flag);
    assert!(listening.is_some(), "{stderr}");
    assert!(!stderr.contains("development mode"), "{stderr}");
    let mut with_env = serve("env", "0.0.0.0:0", "0.0.0.0:0");
    with_env.env("SOLO_CONFIG", &path);
    let (listening, stderr) = serve_once(&mut with_env);
    assert!(listening.is_some(), "{stderr}");
}

/// A tenant whose token left the config keeps its services, which only the admin can reach
/// then: the node names it as it starts, and no tenant that still has a token.
#[test]
fn serve_warns_of_tenants_with_services_but_no_token() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let server = start_server(&data, |_| {}).await;
        let mut client = grpc_client(&server).await;
        for tenant in ["alice", "bob"] {
            client
                .deploy(as_tenant(tenant, grpc_deploy("svc", "echo")))
                .await
                .unwrap();
        }
        server.stop().await.unwrap();
    });
    let (admin, alice) = (
        solo::api::auth::new_token().unwrap().1,
        solo::api::auth::new_token().unwrap().1,
    );
    let path = dir.path().join("solo.toml");
    let config =
        format!("[security]\nadmin_token_sha256 = [\"{admin}\"]\n[tenants.alice]\ntoken_sha256 = [\"{alice}\"]\n");
    std::fs::write(&path, config).unwrap();
    let mut serve = solo_command();
    serve
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .arg("--config")
        .arg(&path)
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"]);
    let (listening, stderr) = serve_once(&mut serve);
    assert!(listening.is_some(), "{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("no token in the config"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains("tenant=bob") && warnings[0].contains("services=1"),
        "{stderr}"
    );
}

#[test]
fn token_new_prints_a_token_and_the_line_with_its_sha256() {
    use sha2::Digest as _;
    let run = || {
        let output = solo_command().args(["token", "new"]).output().expect("solo runs");
        assert!(output.status.success(), "{output:?}");
        (
            String::from_utf8(output.stdout).unwrap(),
            String::from_utf8(output.stderr).unwrap(),
        )
    };
    let (stdout, stderr) = run();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout is the token alone: {stdout:?}");
    let token = lines[0].trim();
    assert!(token.len() >= 32, "{token}");
    let line = stderr
        .lines()
        .find(|l| l.contains("admin_token_sha256 = [\""))
        .unwrap_or_else(|| panic!("the config line: {stderr}"));
    let hash = line
        .split('"')
        .nth(1)
        .unwrap_or_else(|| panic!("a quoted hash: {line}"));
    assert_eq!(hash, hex::encode(sha2::Sha256::digest(token.as_bytes())));
    assert!(
        stderr.contains(&format!("token_sha256 = [\"{hash}\"]")),
        "the tenant line too: {stderr}"
    );
    assert!(!stderr.contains(token), "the token is printed once, on stdout");
    // The printed line is a valid configuration.
    let config = Config::parse(&format!("[security]\n{}\n", line.trim())).expect("the line parses");
    assert_eq!(config.security.admin_token_sha256, vec![hash.to_string()]);
    let (again, _) = run();
    assert_ne!(again.trim(), token, "every token is fresh");
}

// ---------------------------------------------------------------------------------------------
// 7. Names
// ---------------------------------------------------------------------------------------------

fn bad_tenants() -> Vec<String> {
    let mut names: Vec<String> = [
        "Acme", "ACME", "-acme", "_acme", "a b", "a.b", "a/b", "a:b", "ténant", "日本",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    names.push("a".repeat(64));
    names
}

fn bad_service_ids() -> Vec<String> {
    let mut ids: Vec<String> = ["-x", ".x", "_x", "a b", "a:b", "a@b", "a/b", "naïve", "ü", "x\u{200b}"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    ids.push("x".repeat(129));
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_names_outside_the_grammar_are_invalid_through_both_apis() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    let mut failures = Vec::new();
    for name in bad_tenants() {
        let auth = Auth::dev(&name);
        expect_code(
            &mut failures,
            &format!("gRPC List as {name:?}"),
            client.list(auth.grpc(proto::ListRequest::default())).await,
            Code::InvalidArgument,
        );
        expect_code(
            &mut failures,
            &format!("gRPC Deploy as {name:?}"),
            client.deploy(auth.grpc(grpc_deploy("svc", "echo"))).await,
            Code::InvalidArgument,
        );
        let reply = send(auth.rest(http.get(format!("{base}/services")))).await;
        expect_error(
            &mut failures,
            &format!("GET /services with X-Tenant-ID {name:?}"),
            &reply,
            400,
            "invalid_argument",
        );
        let reply = rest_deploy(&http, &base, &auth, "svc", &wat_text("echo"), json!({})).await;
        expect_error(
            &mut failures,
            &format!("POST /services with X-Tenant-ID {name:?}"),
            &reply,
            400,
            "invalid_argument",
        );
        let reply = send(http.get(format!("{base}/services?tenant={}", pct(&name)))).await;
        expect_error(
            &mut failures,
            &format!("GET /services?tenant={name:?}"),
            &reply,
            400,
            "invalid_argument",
        );
        let reply = send(http.get(format!("{base}/events?tenant={}", pct(&name)))).await;
        expect_error(
            &mut failures,
            &format!("GET /events?tenant={name:?}"),
            &reply,
            400,
            "invalid_argument",
        );
    }
    let listed = send(http.get(format!("{base}/services"))).await;
    if listed.json["total"] != 0 {
        failures.push(format!("bad names created services: {listed:?}"));
    }
    // The edges of the grammar are fine.
    for name in ["a".repeat(63), "0".into(), "a_-9".into(), "z".into()] {
        let auth = Auth::dev(&name);
        match client.deploy(auth.grpc(grpc_deploy("svc", "echo"))).await {
            Ok(r) if r.get_ref().created => {}
            other => failures.push(format!("gRPC Deploy as {name:?}: {other:?}")),
        }
        let reply = send(http.get(format!("{base}/services?tenant={}", pct(&name)))).await;
        if reply.status != 200 || reply.json["total"] != 1 {
            failures.push(format!("GET /services?tenant={name:?}: {reply:?}"));
        }
    }
    assert_no_failures(&failures);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_ids_outside_the_grammar_are_invalid_through_both_apis() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    let a = Auth::dev("a");
    let mut failures = Vec::new();
    for id in bad_service_ids() {
        let grpc: Vec<(&str, Result<(), Status>)> = vec![
            (
                "Deploy",
                client.deploy(a.grpc(grpc_deploy(&id, "echo"))).await.map(drop),
            ),
            ("Status", client.status(a.grpc(status_request(&id))).await.map(drop)),
            ("Kill", client.kill(a.grpc(kill_request(&id))).await.map(drop)),
            ("Call", client.call(a.grpc(call_request(&id, b"x"))).await.map(drop)),
            ("Logs", client.logs(a.grpc(logs_request(&id, false))).await.map(drop)),
            (
                "Logs(follow)",
                client.logs(a.grpc(logs_request(&id, true))).await.map(drop),
            ),
            (
                "Watch(service_id)",
                client
                    .watch(a.grpc(proto::WatchRequest {
                        service_id: id.clone(),
                        ..Default::default()
                    }))
                    .await
                    .map(drop),
            ),
        ];
        for (rpc, result) in grpc {
            expect_code(
                &mut failures,
                &format!("gRPC {rpc} of {id:?}"),
                result.map(tonic::Response::new),
                Code::InvalidArgument,
            );
        }
        for (route, method) in all_routes() {
            if !route.contains("{id}") && route != "/services" {
                continue;
            }
            if route == "/services" && method == "get" {
                continue;
            }
            let reply = send(a.rest(route_request(&http, &base, route, method, &id, ""))).await;
            let what = format!("{} {route} with id {id:?}", method.to_uppercase());
            expect_error(&mut failures, &what, &reply, 400, "invalid_argument");
        }
        let reply = send(a.rest(route_request(
            &http,
            &base,
            "/services/{id}/logs",
            "get",
            &id,
            "?follow=true",
        )))
        .await;
        let what = format!("GET /services/{{id}}/logs?follow=true with id {id:?}");
        expect_error(&mut failures, &what, &reply, 400, "invalid_argument");
        let reply = send(a.rest(http.get(format!("{base}/events?service_id={}", pct(&id))))).await;
        let what = format!("GET /events?service_id={id:?}");
        expect_error(&mut failures, &what, &reply, 400, "invalid_argument");
    }
    let listed = send(a.rest(http.get(format!("{base}/services")))).await;
    if listed.json["total"] != 0 {
        failures.push(format!("bad ids created services: {listed:?}"));
    }
    // The edges of the grammar are fine.
    for id in ["x".repeat(128), "A.b-c_9".into(), "0".into()] {
        match client.deploy(a.grpc(grpc_deploy(&id, "echo"))).await {
            Ok(r) if r.get_ref().created => {}
            other => failures.push(format!("gRPC Deploy of {id:?}: {other:?}")),
        }
        let reply = send(a.rest(http.get(format!("{base}/services/{}", pct(&id))))).await;
        if reply.status != 200 {
            failures.push(format!("GET /services/{id:?}: {reply:?}"));
        }
    }
    let put = rest_put(&http, &base, &a, &"y".repeat(128), &wat_text("echo"), "").await;
    if put.status != 201 {
        failures.push(format!("PUT of a 128-character id: {put:?}"));
    }
    assert_no_failures(&failures);
    stop(server).await;
}

/// Logs each call's payload as a line, and answers nothing.
const LOG_EACH_CALL: &str = r#"(module
  (import "solo" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (func (export "solo_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "solo_handle") (param $ptr i32) (param $len i32) (result i64)
    (call $log (i32.const 2) (local.get $ptr) (local.get $len))
    (i64.const 0)))"#;

/// The seqs and texts of a service's log lines, read once over gRPC.
async fn read_log(client: &mut Grpc, auth: &Auth, id: &str) -> Vec<(u64, String)> {
    let lines = client
        .logs(auth.grpc(logs_request(id, false)))
        .await
        .expect("a log read");
    let lines: Vec<proto::LogLine> = tokio::time::timeout(PATIENCE, lines.into_inner().map(Result::unwrap).collect())
        .await
        .expect("the read ends");
    lines.into_iter().map(|l| (l.seq, l.message)).collect()
}

/// What reading logs costs the node is bounded per tenant: a tenant's reads past its
/// `max_log_read_bytes_per_second` wait their turn, get every line in order all the same, and
/// hold back or cost no other tenant anything. A read the shutdown cuts short is an error,
/// not fewer lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_reads_go_out_at_each_tenants_own_rate() {
    let dir = tempdir();
    let server = start_server(dir.path(), |c| {
        c.tenants.insert(
            "slow".into(),
            tenant_with_limits(&[("max_log_read_bytes_per_second", 10_000)]),
        );
    })
    .await;
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    // 30 lines of 1,000 bytes: 31,920 bytes of the rate with what each line costs besides.
    let written: Vec<(u64, String)> = (1..=30)
        .map(|seq| (seq, format!("{seq:04}{}", "x".repeat(996))))
        .collect();
    for tenant in ["slow", "quick"] {
        let auth = Auth::dev(tenant);
        let mut deploy = grpc_deploy("chatty", "echo");
        deploy.module = Some(proto::deploy_request::Module::Wat(LOG_EACH_CALL.into()));
        let deployed = client.deploy(auth.grpc(deploy)).await.expect("a deploy");
        wait_started(&mut client, &auth, deployed.get_ref().seq, &[(tenant, "chatty")]).await;
        for (_, line) in &written {
            client
                .call(auth.grpc(call_request("chatty", line.as_bytes())))
                .await
                .expect("a call");
        }
    }
    let waited = "solo_read_wait_seconds_total{reads=\"logs\"}";

    assert_eq!(read_log(&mut client, &Auth::dev("quick"), "chatty").await, written);
    assert_eq!(
        metric(&http, &base, waited).await,
        0.0,
        "quick's rate is the node's 4 MiB"
    );

    // slow's first second's worth (10,000 bytes) goes out at once, the rest at 10,000 a second.
    let started = std::time::Instant::now();
    assert_eq!(read_log(&mut client, &Auth::dev("slow"), "chatty").await, written);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2100),
        "21,920 bytes over the rate took {took:?}"
    );
    let waited_before = metric(&http, &base, waited).await;
    assert!(waited_before > 1.0, "{waited_before}");

    // quick is not held back by slow's debt, and is charged nothing of it.
    assert_eq!(read_log(&mut client, &Auth::dev("quick"), "chatty").await, written);
    assert_eq!(metric(&http, &base, waited).await, waited_before);

    // slow's bucket is spent: its next read waits from its first line, until the shutdown.
    let cut = tokio::spawn(send(
        Auth::dev("slow").rest(http.get(format!("{base}/services/chatty/logs"))),
    ));
    let deadline = std::time::Instant::now() + PATIENCE;
    while metric(&http, &base, waited).await == waited_before {
        assert!(std::time::Instant::now() < deadline, "the read never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop(server).await;
    let cut = cut.await.expect("the read's task");
    assert_eq!(
        (cut.status, cut.json["error"].as_str()),
        (503, Some("shutting_down")),
        "{cut:?}"
    );
}

/// A request of more labels than any service may carry is refused before they are built:
/// millions of tiny labels, within the size limit, took seconds of the threads that serve every
/// tenant, and gigabytes, before the handler could count them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_many_labels_are_refused_before_they_are_built() {
    let dir = tempdir();
    let server = start_server(dir.path(), |_| {}).await;
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    let auth = Auth::dev("acme");
    let many: BTreeMap<String, String> = (0..5000).map(|i| (format!("k{i}"), String::new())).collect();

    let mut deploy = grpc_deploy("svc", "echo");
    deploy.labels = many.clone();
    let refused = client.deploy(auth.grpc(deploy)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("more than 4096 times"), "{refused:?}");
    let list = proto::ListRequest {
        labels: many,
        ..Default::default()
    };
    let refused = client.list(auth.grpc(list)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    let labels: serde_json::Map<String, Value> = (0..1000).map(|i| (format!("k{i}"), json!(""))).collect();
    let body = json!({ "service_id": "svc", "wat": wat_text("echo"), "labels": labels });
    let refused = send(auth.rest(http.post(format!("{base}/services")).json(&body))).await;
    assert_eq!(refused.status, 400, "{refused:?}");
    assert!(
        refused.json["message"]
            .as_str()
            .unwrap()
            .contains("more than 64 labels"),
        "{refused:?}"
    );
    // Nothing was deployed, and 64 labels are still fine.
    let labels: serde_json::Map<String, Value> = (0..64).map(|i| (format!("k{i}"), json!("v"))).collect();
    let body = json!({ "service_id": "svc", "wat": wat_text("echo"), "labels": labels });
    let deployed = send(auth.rest(http.post(format!("{base}/services")).json(&body))).await;
    assert_eq!(
        (deployed.status, deployed.json["deploy"]["version"].as_u64()),
        (201, Some(1)),
        "{deployed:?}"
    );
    stop(server).await;
}

/// What a tenant's Watch and SSE streams replay of the history goes out at its own
/// `max_history_read_bytes_per_second`, whole and in order; another tenant's replay pays
/// nothing of it, and live events are not held back by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_replays_go_out_at_each_tenants_own_rate() {
    use prost::Message as _;
    let dir = tempdir();
    let rate: u64 = 700;
    let server = start_server(dir.path(), |c| {
        c.tenants.insert(
            "slow".into(),
            tenant_with_limits(&[("max_history_read_bytes_per_second", rate as i64)]),
        );
    })
    .await;
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    for tenant in ["slow", "quick"] {
        let auth = Auth::dev(tenant);
        for i in 0..8 {
            let deployed = client
                .deploy(auth.grpc(grpc_deploy(&format!("s{i}"), "echo")))
                .await
                .unwrap();
            wait_started(
                &mut client,
                &auth,
                deployed.get_ref().seq,
                &[(tenant, &format!("s{i}"))],
            )
            .await;
        }
    }
    let waited = "solo_read_wait_seconds_total{reads=\"history\"}";
    let last_started =
        |events: &[proto::Event], tenant: &str| events.last().is_some_and(|e| is(e, tenant, "s7", "service_started"));

    // (The waits for each start above replayed slow's history too.)
    let before = metric(&http, &base, waited).await;
    let mut quick = open_watch(&mut client, &Auth::dev("quick"), 1, "").await;
    let replayed = watch_until(&mut quick, |e| is(e, "quick", "s7", "service_started")).await;
    assert!(last_started(&replayed, "quick") && replayed.len() >= 16, "{replayed:?}");
    assert_eq!(
        metric(&http, &base, waited).await,
        before,
        "quick's rate is the node's 8 MiB"
    );
    // Time enough for slow's bucket to refill, whatever the waits above left owing.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let started = std::time::Instant::now();
    let mut slow = open_watch(&mut client, &Auth::dev("slow"), 1, "").await;
    let replayed = watch_until(&mut slow, |e| is(e, "slow", "s7", "service_started")).await;
    let took = started.elapsed();
    let seqs: Vec<u64> = replayed.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]) && replayed.iter().all(|e| e.tenant == "slow"));
    // A second's worth at once, the rest at the rate.
    let cost: u64 = replayed.iter().map(|e| e.encoded_len() as u64 + 64).sum();
    let least = Duration::from_secs_f64(cost.saturating_sub(rate) as f64 / rate as f64);
    assert!(cost > 2 * rate, "a history of {cost} bytes is too short to tell");
    assert!(
        took >= least,
        "{cost} bytes of history at {rate} a second took {took:?}"
    );
    assert!(metric(&http, &base, waited).await > before);

    // Live, an event comes as it is committed: the deploy's answer names its seq, and the
    // stream, caught up, carries it without waiting out the rate.
    let before = metric(&http, &base, waited).await;
    let auth = Auth::dev("slow");
    client.deploy(auth.grpc(grpc_deploy("live", "echo"))).await.unwrap();
    watch_until(&mut slow, |e| is(e, "slow", "live", "service_deployed")).await;
    assert_eq!(metric(&http, &base, waited).await, before, "live events are not paced");
    drop((quick, slow));
    stop(server).await;
}

/// A one-off REST read of the log is a request like any other: one that its tenant's rate
/// would stretch past `http_request_timeout_ms` is 408 at that time, not an answer minutes later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_read_paced_past_the_request_timeout_is_408() {
    let dir = tempdir();
    let server = start_server(dir.path(), |c| {
        c.solo.http_request_timeout_ms = 1000;
        c.tenants.insert(
            "slow".into(),
            tenant_with_limits(&[("max_log_read_bytes_per_second", 4160)]),
        );
    })
    .await;
    let (http, base) = (http_client(), server.http_url());
    let mut client = grpc_client(&server).await;
    let auth = Auth::dev("slow");
    let mut deploy = grpc_deploy("chatty", "echo");
    deploy.module = Some(proto::deploy_request::Module::Wat(LOG_EACH_CALL.into()));
    let deployed = client.deploy(auth.grpc(deploy)).await.expect("a deploy");
    wait_started(&mut client, &auth, deployed.get_ref().seq, &[("slow", "chatty")]).await;
    // 10 lines of 1,064 bytes of the rate: past the first second's 4,160, 1.5 s more.
    for _ in 0..10 {
        let line = "x".repeat(1000);
        client
            .call(auth.grpc(call_request("chatty", line.as_bytes())))
            .await
            .unwrap();
    }
    let started = std::time::Instant::now();
    let read = send(auth.rest(http.get(format!("{base}/services/chatty/logs")))).await;
    assert_eq!(
        (read.status, read.json["error"].as_str()),
        (408, Some("deadline_exceeded")),
        "{read:?}"
    );
    assert!(
        read.json["message"]
            .as_str()
            .unwrap()
            .contains("max_log_read_bytes_per_second"),
        "{read:?}"
    );
    assert!(started.elapsed() < PATIENCE);
    stop(server).await;
}
