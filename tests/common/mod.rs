//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use solo::config::Config;
use solo::control::{Clock, Control, ControlOptions, DeployOutcome, DeployRequest, KillCommand, KillOutcome};
use solo::proto::Limits;

/// Options for a node in `dir` with the defaults of an empty config and a small map.
pub fn options(dir: &Path) -> ControlOptions {
    let mut config = Config::default();
    config.solo.data_dir = dir.to_path_buf();
    config.database.map_size_mb = 256;
    config.control_options().expect("default config is valid")
}

/// A clock the test moves by hand.
pub fn manual_clock(start_ms: u64) -> (Clock, Arc<AtomicU64>) {
    let now = Arc::new(AtomicU64::new(start_ms));
    let reader = Arc::clone(&now);
    (Arc::new(move || reader.load(Ordering::SeqCst)), now)
}

pub fn open(options: ControlOptions) -> Control {
    Control::open(options).expect("the data directory opens").0
}

/// A tiny stand-in module; the log treats module bytes as opaque.
pub fn module(tag: &str) -> Arc<[u8]> {
    Arc::from(format!("\0asm module {tag}").into_bytes())
}

pub fn deploy_request(tenant: &str, id: &str, module_tag: &str) -> DeployRequest {
    DeployRequest {
        tenant: tenant.into(),
        actor: format!("tenant:{tenant}"),
        service_id: id.into(),
        module: module(module_tag),
        limits: Limits::default(),
        labels: BTreeMap::new(),
        idempotency_key: String::new(),
        expected_version: None,
    }
}

pub async fn deploy(control: &Control, tenant: &str, id: &str, module_tag: &str) -> DeployOutcome {
    control
        .deploy(deploy_request(tenant, id, module_tag))
        .await
        .expect("deploy succeeds")
}

pub fn kill_command(tenant: &str, id: &str) -> KillCommand {
    KillCommand {
        tenant: tenant.into(),
        actor: format!("tenant:{tenant}"),
        service_id: id.into(),
        force: false,
        grace_ms: 0,
        requested_grace_ms: 0,
        idempotency_key: String::new(),
        expected_version: None,
    }
}

pub async fn kill(control: &Control, tenant: &str, id: &str) -> KillOutcome {
    control.kill(kill_command(tenant, id)).await.expect("kill succeeds")
}

/// A config for a whole node in `dir`: small pools and maps, so tests start fast.
pub fn node_config(dir: &Path) -> Config {
    let mut config = Config::default();
    config.solo.data_dir = dir.to_path_buf();
    config.database.map_size_mb = 256;
    config.runtime.max_instances = 64;
    config.runtime.guest_threads = 2;
    config.limits.max_memory_mb = 64;
    config
}

pub async fn open_node(config: &Config) -> solo::server::Node {
    solo::server::open_node(config).await.expect("the node opens")
}

/// An example service from `examples/services/`, as WAT bytes.
pub fn example(name: &str) -> Arc<[u8]> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/services")
        .join(format!("{name}.wat"));
    Arc::from(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

pub fn deploy_example(tenant: &str, id: &str, name: &str) -> DeployRequest {
    DeployRequest {
        module: example(name),
        ..deploy_request(tenant, id, "")
    }
}

/// Waits (up to 20 s, a guard against hangs) for an event from `from_seq` on that `matches`.
pub async fn wait_for_event(
    control: &Control,
    from_seq: u64,
    matches: impl Fn(&solo::proto::Event) -> bool,
) -> std::sync::Arc<solo::proto::Event> {
    use futures_util::StreamExt;
    let mut tail = Box::pin(control.log().tail(from_seq));
    let found = async {
        while let Some(event) = tail.next().await {
            let event = event.expect("the tail reads");
            if matches(&event) {
                return event;
            }
        }
        panic!("the log closed while waiting");
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), found)
        .await
        .expect("the event arrives in time")
}

/// Waits for `id` of `tenant` to report `kind` (snake_case) at or after `from_seq`.
pub async fn wait_for_kind(
    control: &Control,
    from_seq: u64,
    tenant: &str,
    id: &str,
    kind: &str,
) -> std::sync::Arc<solo::proto::Event> {
    wait_for_event(control, from_seq, |e| {
        e.tenant == tenant && e.service_id == id && solo::event::kind_name(e) == kind
    })
    .await
}

/// Deploys an example and waits until it runs.
pub async fn deploy_running(control: &Control, tenant: &str, id: &str, name: &str) -> DeployOutcome {
    let outcome = control
        .deploy(deploy_example(tenant, id, name))
        .await
        .expect("deploy succeeds");
    wait_for_kind(control, outcome.seq, tenant, id, "service_started").await;
    outcome
}

/// A whole node on ports 0 in `dir`, in development mode unless `tweak` adds tokens.
pub async fn start_server(dir: &Path, tweak: impl FnOnce(&mut Config)) -> solo::server::Server {
    let mut config = node_config(dir);
    config.solo.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.solo.http_addr = "127.0.0.1:0".parse().unwrap();
    tweak(&mut config);
    solo::server::Server::start(config).await.expect("the server starts")
}

/// A connection to `server`'s gRPC listener.
pub async fn grpc_channel(server: &solo::server::Server) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(server.grpc_url())
        .unwrap()
        .connect()
        .await
        .expect("the gRPC endpoint connects")
}

/// A gRPC client of `server`.
pub async fn grpc_client(
    server: &solo::server::Server,
) -> solo::proto::solo_kernel_client::SoloKernelClient<tonic::transport::Channel> {
    let channel = grpc_channel(server).await;
    solo::proto::solo_kernel_client::SoloKernelClient::new(channel).max_decoding_message_size(64 << 20)
}

/// A gRPC request acting as `tenant` in development mode.
pub fn as_tenant<T>(tenant: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-tenant-id", tenant.parse().unwrap());
    request
}

/// A gRPC request carrying a bearer token.
pub fn with_token<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// A gRPC deploy of an example service.
pub fn grpc_deploy(id: &str, name: &str) -> solo::proto::DeployRequest {
    let wat = String::from_utf8(example(name).to_vec()).unwrap();
    solo::proto::DeployRequest {
        service_id: id.into(),
        module: Some(solo::proto::deploy_request::Module::Wat(wat)),
        ..Default::default()
    }
}

/// Echo plus 400 functions that no one calls, their constants numbered from `tag`: a distinct
/// module for each tag, which takes Cranelift a good fraction of a second to compile.
pub fn slow_to_compile_wat(tag: usize) -> String {
    let body: String = (0..40)
        .map(|i| format!("(i32.mul (i32.add (local.get 0) (i32.const {i})) "))
        .collect();
    let close = ")".repeat(40);
    let functions: String = (0..400)
        .map(|f| {
            format!(
                "(func (param i32) (result i32) {body}(i32.const {}){close})\n",
                tag * 1000 + f
            )
        })
        .collect();
    let echo = String::from_utf8(example("echo").to_vec()).unwrap();
    echo.trim_end().strip_suffix(')').unwrap().to_string() + &functions + ")"
}

/// Every offset of `pattern` in a data file's `bytes`: LMDB copies pages on write, so stale
/// copies of a record may sit in free pages beside the live one, and damage meant for it must
/// hit them all. Panics if there is none.
pub fn places_of(bytes: &[u8], pattern: &[u8]) -> Vec<usize> {
    let places: Vec<usize> = bytes
        .windows(pattern.len())
        .enumerate()
        .filter(|(_, w)| *w == pattern)
        .map(|(at, _)| at)
        .collect();
    assert!(
        !places.is_empty(),
        "{:?} is in the file",
        String::from_utf8_lossy(pattern)
    );
    places
}

/// Asserts that `err` is a refusal by the quota named `quota`.
pub fn assert_refused_by(err: &solo::control::Error, quota: &str) {
    assert!(
        matches!(err, solo::control::Error::QuotaExceeded { quota: q, .. } if *q == quota),
        "not refused by {quota}: {err}"
    );
}

/// A gRPC channel to `server` whose HTTP/2 windows (16 KiB) are small enough that the node can
/// send little ahead of a reader that is slow, or reads nothing.
pub async fn small_window_channel(server: &solo::server::Server) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(server.grpc_url())
        .unwrap()
        .initial_stream_window_size(16 << 10)
        .initial_connection_window_size(16 << 10)
        .connect()
        .await
        .unwrap()
}

/// A Watch of everything from seq 1 over a [`small_window_channel`], its first message read.
pub async fn small_window_replay(
    server: &solo::server::Server,
) -> (
    solo::proto::solo_kernel_client::SoloKernelClient<tonic::transport::Channel>,
    tonic::Streaming<solo::proto::WatchResponse>,
) {
    let mut client = solo::proto::solo_kernel_client::SoloKernelClient::new(small_window_channel(server).await);
    let replay = solo::proto::WatchRequest {
        from_seq: 1,
        ..Default::default()
    };
    let mut stream = client.watch(replay).await.unwrap().into_inner();
    stream.message().await.unwrap().expect("a first message");
    (client, stream)
}

/// What `solo log verify` finds in `bytes` (a backup) as the data file of a directory of its own.
pub fn verify_backup(bytes: &[u8]) -> solo::inspect::VerifyReport {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("data.mdb"), bytes).expect("the copy is written");
    let options = solo::log::StoreOptions {
        map_size: 1 << 30,
        max_readers: 16,
        read_only: true,
        check_pages: true,
    };
    let copy = solo::log::Store::open(dir.path(), &options).expect("the copy opens");
    solo::inspect::verify(&copy, Default::default()).expect("the copy reads")
}
