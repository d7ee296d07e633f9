//! Wires a node together and runs it: opens the state, starts the runtime, serves gRPC and
//! HTTP, and shuts down in a fixed order with time limits.
//!
//! Shutdown (a signal, or the Shutdown API): record `shutdown_requested`; stop taking new work
//! and end every stream; let requests in flight finish within the grace; stop every service
//! gracefully (they come back with the node); stop the writer.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;

use crate::api::bodies::{BodyBudget, MeterBodies};
use crate::api::codec::RequestRefusals;
use crate::api::encoded::Frames;
use crate::api::grpc::{FILE_DESCRIPTOR_SET, GrpcApi};
use crate::api::grpc_routes::GrpcRoutes;
use crate::api::pace::ReadPace;
use crate::api::{ApiOptions, ApiState, Authenticator};
use crate::config::Config;
use crate::connections::{
    Accepted, Activity, AdmittedStream, Closer, CoalescedWrites, ConnectionLimits, Deadlines, HTTP2_OPENING,
    STREAMS_QUIET, TrackRequests, TrackRequestsLayer,
};
use crate::control::Control;
use crate::metrics::Metrics;
use crate::proto::solo_kernel_server::SoloKernelServer;
use crate::runtime::Runtime;
use crate::shed::Shedder;
use crate::tls::{PeerTenant, TlsSetup};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The node's listening sockets, bound before anything is served so port 0 resolves early.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        config.check_listeners()?;
        let grpc = TcpListener::bind(config.solo.grpc_addr)
            .await
            .with_context(|| format!("cannot listen on solo.grpc_addr {}", config.solo.grpc_addr))?;
        let http = TcpListener::bind(config.solo.http_addr)
            .await
            .with_context(|| format!("cannot listen on solo.http_addr {}", config.solo.http_addr))?;
        Ok(Listeners { grpc, http })
    }

    pub fn addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr)> {
        Ok((self.grpc.local_addr()?, self.http.local_addr()?))
    }
}

/// The line scripts and tests wait for on stdout.
pub fn listening_line(grpc: SocketAddr, http: SocketAddr) -> String {
    format!("solo listening grpc={grpc} http={http}")
}

/// Opens the node's state from its data directory. Blocking work runs off the async workers.
pub async fn open_control(config: &Config, metrics: Option<Arc<Metrics>>) -> anyhow::Result<Control> {
    let mut options = config.control_options()?;
    if let Some(metrics) = metrics {
        options.on_commit = Some(Box::new(move |events, took| metrics.committed(events, took)));
    }
    let data_dir = options.data_dir.clone();
    let (control, recovery) = tokio::task::spawn_blocking(move || Control::open(options))
        .await?
        .with_context(|| format!("cannot open the data directory {}", data_dir.display()))?;
    tracing::info!(
        data_dir = %data_dir.display(),
        head = recovery.head,
        snapshot = recovery.snapshot_seq,
        replayed = recovery.replayed,
        skipped = recovery.skipped,
        modules_collected = recovery.modules_collected,
        elapsed_ms = recovery.elapsed.as_millis() as u64,
        "state rebuilt from the log"
    );
    Ok(control)
}

/// A node's parts: the control layer, and the runtime attached to it.
#[derive(Debug, Clone)]
pub struct Node {
    pub control: Control,
    pub runtime: Runtime,
    /// Becomes true once the services that came back with the node are started (or failed
    /// to) and `node_started` is recorded.
    recovered: tokio::sync::watch::Receiver<bool>,
}

/// Opens the state, starts the runtime, brings back the services that should run and starts
/// following the log. Returns once the services are back; see [`Node::recovered`].
pub async fn open_node(config: &Config) -> anyhow::Result<Node> {
    let node = open_node_with(config, None).await?;
    node.recovered().await;
    Ok(node)
}

/// As [`open_node`], but returns while services with modules still to compile are coming
/// back, as `serve` does, so that the node can serve meanwhile (their calls wait for them).
pub async fn open_node_recovering(config: &Config) -> anyhow::Result<Node> {
    open_node_with(config, None).await
}

/// As [`open_node_recovering`], counting in `metrics`. A node with nothing to bring back
/// records `node_started` before it returns.
async fn open_node_with(config: &Config, metrics: Option<Arc<Metrics>>) -> anyhow::Result<Node> {
    let control = open_control(config, metrics).await?;
    let runtime = Runtime::new(config.runtime_options()?, control.observer(), control.log().clone())?;
    control.attach_runtime(runtime.clone());
    let (services, head) = control.read_state(|s| (s.services().cloned().collect::<Vec<_>>(), s.applied_seq()));
    check_modules_readable(&control, &services)?;
    // The slots of every service first, then what the log asks of them from here on.
    let recovery = runtime.recover(services, head);
    runtime.start_reconciler(head + 1);
    let (done, recovered) = tokio::sync::watch::channel(false);
    let bring_back = async move {
        let recovered = recovery.await;
        tracing::info!(recovered = recovered.len(), "services brought back");
        let _ = done.send(true);
    };
    if runtime.recovering() == 0 {
        bring_back.await;
    } else {
        tracing::info!(services = runtime.recovering(), "bringing services back");
        tokio::spawn(bring_back);
    }
    Ok(Node {
        control,
        runtime,
        recovered,
    })
}

/// Refuses to start when the modules of the services coming back cannot be read. A module
/// missing or altered fails only its own service; a read error means the data file itself is
/// damaged, and recording every service on it as crashed would bury the cause and change
/// what should run.
fn check_modules_readable(control: &Control, services: &[crate::state::Service]) -> anyhow::Result<()> {
    let mut checked = std::collections::HashSet::new();
    for service in services.iter().filter(|s| s.comes_back_with_the_node()) {
        if !checked.insert(service.module_hash) {
            continue;
        }
        control.log().store().has_blob(&service.module_hash).with_context(|| {
            format!(
                "the data directory is damaged: module {} (service '{}' of tenant '{}') cannot be read; \
                 `solo log verify` reports the damage, and a backup of the data directory repairs it",
                service.module_sha256, service.id, service.tenant
            )
        })?;
    }
    Ok(())
}

impl Node {
    /// Waits until the services that came back with the node are started (or failed to) and
    /// `node_started` is recorded.
    pub async fn recovered(&self) {
        // A dropped sender means the node stopped: nothing more will come back.
        let _ = self.recovered.clone().wait_for(|done| *done).await;
    }

    /// Stops every service (recorded as stopped for a node shutdown, so they come back with
    /// the node), then the writer.
    pub async fn stop(&self, grace: Duration) {
        self.runtime.shutdown(grace).await;
        // The starts still under way finished before their services stopped: what came back
        // is recorded before the writer closes.
        self.recovered().await;
        self.control.close().await;
    }
}

/// A running node, as tests and embedders hold it.
#[derive(Debug)]
pub struct Server {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub tls: bool,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Binds the configured addresses, opens the node and serves it in a task.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        let listeners = Listeners::bind(&config).await?;
        let (grpc_addr, http_addr) = listeners.addrs()?;
        let tls = config.tls_files().is_some();
        let shutdown = CancellationToken::new();
        let (ready, serving) = tokio::sync::oneshot::channel();
        let signal = shutdown.clone();
        let task = tokio::spawn(async move { serve(config, listeners, signal.cancelled_owned(), Some(ready)).await });
        match serving.await {
            Ok(()) => Ok(Server {
                grpc_addr,
                http_addr,
                tls,
                shutdown,
                task,
            }),
            Err(_) => Err(task
                .await?
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("the node stopped while starting"))),
        }
    }

    pub fn grpc_url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.grpc_addr)
    }

    pub fn http_url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.http_addr)
    }

    /// Shuts the node down as a signal would, and waits until it has.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }

    /// Waits until the node has stopped (for example after a Shutdown request).
    pub async fn stopped(self) -> anyhow::Result<()> {
        self.task.await?
    }
}

/// Services outlive their tenant's entry in the config: a tenant whose token was removed keeps
/// its services, running ones included, and only the admin can reach them. Say so at start.
fn warn_of_tenants_without_tokens(control: &Control, auth: &Authenticator) {
    let orphaned: Vec<(String, usize)> = control.read_state(|state| {
        state
            .tenants()
            .filter(|(name, tenant)| !tenant.services.is_empty() && !auth.has_token_for(name))
            .map(|(name, tenant)| (name.to_string(), tenant.services.len()))
            .collect()
    });
    for (tenant, services) in orphaned {
        tracing::warn!(
            %tenant,
            services,
            "this tenant has services but no token in the config: only the admin can reach them \
             (give it a token again, or kill and remove them as the admin)"
        );
    }
}

/// Runs a node until `shutdown` resolves (or the Shutdown API is called), printing the
/// `solo listening` line once it serves.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    serve(config, listeners, shutdown, None).await
}

async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
) -> anyhow::Result<()> {
    let (grpc_addr, http_addr) = listeners.addrs()?;
    let client_certificates = config.tls_files().is_some_and(|files| files.client_ca.is_some());
    let auth = Authenticator::new(config.tokens(), &[grpc_addr, http_addr])
        .map_err(anyhow::Error::msg)?
        .requiring_client_certificates(client_certificates);
    if auth.is_development() && client_certificates {
        // Every request comes with a verified certificate, which names its tenant or is refused.
        tracing::info!(
            "no tokens are configured: client certificates name the tenants (their subject CN), and no one \
             can act as the admin"
        );
    } else if auth.is_development() {
        tracing::warn!(
            "development mode: no tokens are configured, so the x-tenant-id header names the tenant and \
             requests without it act as the admin; every listener is on loopback"
        );
    }
    let tls = config
        .tls_files()
        .map(|files| TlsSetup::load(&files))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let metrics = Metrics::new();
    let node = open_node_with(&config, Some(Arc::clone(&metrics))).await?;
    if !auth.is_development() && !client_certificates {
        warn_of_tenants_without_tokens(&node.control, &auth);
    }
    let limits = Arc::new(node.control.limits().clone());
    let state = Arc::new(ApiState {
        control: node.control.clone(),
        auth,
        shed: Shedder::new(
            config.solo.max_in_flight as usize,
            Arc::clone(&limits),
            Arc::clone(&metrics),
        ),
        bodies: BodyBudget::new(
            config.solo.max_in_flight_body_bytes,
            Arc::clone(&limits),
            metrics.shed.with_label_values(&["body_bytes"]),
        ),
        log_pace: ReadPace::of_logs(Arc::clone(&limits), &metrics),
        history_pace: Arc::new(ReadPace::of_history(Arc::clone(&limits), &metrics)),
        frames: Frames::for_tail_window(config.database.tail_window_events as usize),
        metrics,
        options: api_options(&config),
        stopping: CancellationToken::new(),
        shutdown_requested: CancellationToken::new(),
        shutdown_grace: std::sync::Mutex::new(None),
        started: Instant::now(),
    });
    tokio::spawn(clear_stale_readers(Arc::downgrade(&state)));
    let drained = CancellationToken::new();
    let closed = CancellationToken::new();
    let header_timeout = Duration::from_millis(config.solo.http_header_timeout_ms.into());
    let write_stall = Duration::from_millis(config.solo.write_stall_timeout_ms.into());
    // Each listener has connection limits of its own.
    let connection_limits = |opening_bytes, closer| {
        ConnectionLimits::new(
            config.solo.max_connections as usize,
            config.solo.max_connections_per_client as usize,
            Duration::from_millis(config.solo.full_listener_idle_ms.into()),
            Deadlines {
                opening_bytes,
                opening_within: header_timeout,
                drained: drained.clone(),
                closed: closed.clone(),
                write_stall,
                closer,
            },
        )
    };
    let grpc_idle = match config.solo.grpc_max_connection_idle_ms {
        0 => None,
        ms => Some(Duration::from_millis(ms.into())),
    };
    let grpc_options = GrpcOptions {
        keepalive: Keepalive {
            interval: Duration::from_millis(config.solo.grpc_keepalive_interval_ms),
            timeout: Duration::from_millis(config.solo.grpc_keepalive_timeout_ms.into()),
        },
        accept_compressed: config.solo.grpc_accept_compressed,
    };
    let grpc = tokio::spawn(serve_grpc(
        listeners.grpc,
        Arc::clone(&state),
        tls.clone(),
        connection_limits(HTTP2_OPENING, Closer::Stream { idle_after: grpc_idle }),
        grpc_options,
        Http2Limits::of(&config.solo),
        drained.clone(),
    ));
    let http = tokio::spawn(serve_http(
        listeners.http,
        Arc::clone(&state),
        tls,
        // The HTTP listener closes its idle connections itself, gracefully.
        connection_limits(1, Closer::Server),
        header_timeout,
        Http2Limits::of(&config.solo),
        drained.clone(),
    ));
    println!("{}", listening_line(grpc_addr, http_addr));
    tracing::info!(%grpc_addr, %http_addr, "serving");
    if let Some(ready) = ready {
        let _ = ready.send(());
    }

    let requested = state.shutdown_requested.clone();
    tokio::select! {
        () = shutdown => {
            tracing::info!("shutdown signal received");
            let grace_ms = config.solo.shutdown_grace_ms;
            if let Err(e) = node.control.shutdown("node", grace_ms).await {
                tracing::warn!(error = %e, "shutdown_requested not recorded");
            }
        }
        () = requested.cancelled() => tracing::info!("shutdown requested through the API"),
    }
    let grace = state
        .shutdown_grace
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .unwrap_or(Duration::from_millis(config.solo.shutdown_grace_ms.into()));
    // New work is refused and streams end; requests in flight get the grace to finish.
    state.stopping.cancel();
    drained.cancel();
    let deadline = tokio::time::Instant::now() + grace;
    for (name, server) in [("grpc", grpc), ("http", http)] {
        match tokio::time::timeout_at(deadline, server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(listener = name, error = %e, "listener failed"),
            Ok(Err(e)) => tracing::warn!(listener = name, error = %e, "listener task failed"),
            Err(_) => tracing::warn!(
                listener = name,
                "requests still in flight after the grace; dropping them"
            ),
        }
    }
    // One grace for the whole shutdown: services get what the requests left of it.
    node.stop(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await;
    // Connections that are still closing hold the node until they are gone; an embedder (or a
    // test) that reopens the data directory right after `stop` must find it released. The
    // answers to calls that the services' stop cut off go out first; then connections still
    // open (a client that ignores the GOAWAY) are cut.
    let released = node.control.log().closed_signal();
    drop((node, state));
    let wait_for_release = |within: Duration| {
        let released = &released;
        async move {
            let deadline = tokio::time::Instant::now() + within;
            while !released() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_for_release(LAST_ANSWERS).await;
    closed.cancel();
    wait_for_release(RELEASE_WAIT).await;
    if !released() {
        tracing::warn!("the data directory is still open after {RELEASE_WAIT:?}: connections are still closing");
    }
    tracing::info!("stopped");
    Ok(())
}

/// How long connections get, once the services have stopped, to send the answers of the calls
/// that the stop cut off, before those still open are cut.
const LAST_ANSWERS: Duration = Duration::from_secs(1);

/// The longest a stopped node waits for its connections to let go of the data directory.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

fn api_options(config: &Config) -> ApiOptions {
    let solo = &config.solo;
    ApiOptions {
        default_grace: Duration::from_millis(solo.shutdown_grace_ms.into()),
        default_progress_interval: Duration::from_millis(solo.watch_progress_interval_ms.into()),
        sse_keepalive: Duration::from_millis(solo.sse_keepalive_ms.into()),
        max_body_bytes: usize::try_from(solo.max_request_bytes).unwrap_or(usize::MAX),
        request_timeout: Duration::from_millis(solo.http_request_timeout_ms.into()),
        discard_bytes: usize::try_from(solo.http_discard_bytes).unwrap_or(usize::MAX),
        write_stall: Duration::from_millis(solo.write_stall_timeout_ms.into()),
    }
}

/// What one HTTP/2 connection may ask of the node, on either listener.
#[derive(Debug, Clone, Copy)]
struct Http2Limits {
    max_streams: u32,
    max_header_list_bytes: u32,
}

impl Http2Limits {
    fn of(solo: &crate::config::SoloConfig) -> Http2Limits {
        Http2Limits {
            max_streams: solo.max_streams_per_connection,
            max_header_list_bytes: solo.max_header_list_bytes,
        }
    }
}

/// HTTP/2 pings on idle gRPC connections.
struct Keepalive {
    interval: Duration,
    timeout: Duration,
}

/// How the gRPC listener treats its connections and requests, besides their limits.
struct GrpcOptions {
    keepalive: Keepalive,
    /// Whether requests may come compressed (`[solo] grpc_accept_compressed`).
    accept_compressed: bool,
}

async fn serve_grpc(
    listener: TcpListener,
    state: Arc<ApiState>,
    tls: Option<TlsSetup>,
    limits: ConnectionLimits,
    options: GrpcOptions,
    http2: Http2Limits,
    drained: CancellationToken,
) -> anyhow::Result<()> {
    let GrpcOptions {
        keepalive,
        accept_compressed,
    } = options;
    // Only requests are bounded here; answers are bounded by what makes them (a service's
    // `max_response_bytes`, a page's size), not by what a request may be.
    let max_message = state.options.max_body_bytes;
    // Compressed requests are taken only if the operator says so (`grpc_accept_compressed`):
    // clients set to compress a whole channel send every call so, but a tenant's small request
    // may inflate to megabytes. Answers go uncompressed, most being too small to gain from it.
    let compressed: &[CompressionEncoding] = match accept_compressed {
        true => &[CompressionEncoding::Gzip, CompressionEncoding::Deflate],
        false => &[],
    };
    let mut kernel = SoloKernelServer::new(GrpcApi::new(Arc::clone(&state))).max_decoding_message_size(max_message);
    let (health, health_service) = tonic_health::server::health_reporter();
    // One limit for every service's requests, as their refusals name it.
    let mut health_service = health_service.max_decoding_message_size(max_message);
    for &encoding in compressed {
        kernel = kernel.accept_compressed(encoding);
        health_service = health_service.accept_compressed(encoding);
    }
    health.set_serving::<SoloKernelServer<GrpcApi>>().await;
    let health_follower = tokio::spawn(follow_log_health(health.clone(), Arc::downgrade(&state)));
    // Both versions of reflection, as clients speak one or the other (grpcurl v1, many
    // language runtimes only v1alpha), and the health service's schema beside Solo's.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let mut reflection_v1 =
        (reflection().build_v1().context("gRPC reflection")?).max_decoding_message_size(max_message);
    let mut reflection_v1alpha =
        (reflection().build_v1alpha().context("gRPC reflection")?).max_decoding_message_size(max_message);
    for &encoding in compressed {
        reflection_v1 = reflection_v1.accept_compressed(encoding);
        reflection_v1alpha = reflection_v1alpha.accept_compressed(encoding);
    }
    // A client that vanished without closing (a laptop put to sleep) is found by its missed
    // ping, and its connection is given back.
    let builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(keepalive.interval))
        .http2_keepalive_timeout(Some(keepalive.timeout))
        // tonic's default is no limit at all, overriding hyper's.
        .max_concurrent_streams(http2.max_streams)
        .http2_max_header_list_size(http2.max_header_list_bytes);
    let builder = match &tls {
        Some(tls) => builder.tls_config(tls.grpc()).context("gRPC TLS")?,
        None => builder,
    };
    // Every call, to any service, keeps its connection from closing idle while it is open.
    let builder =
        builder.layer(TrackRequestsLayer::by_address(limits.activities(), GRPC_STREAMS).yielding_to(GRPC_YIELDING));
    let stopping = drained.clone();
    let shutdown = async move {
        stopping.cancelled().await;
        health_follower.abort();
        set_health(&health, ServingStatus::NotServing).await;
    };
    // Every service's refusals say what was wrong, as Solo's own do.
    let routes = GrpcRoutes {
        kernel: MeterBodies::new(RequestRefusals::new(kernel, max_message), Arc::clone(&state)),
        health: RequestRefusals::new(health_service, max_message),
        reflection_v1: RequestRefusals::new(reflection_v1, max_message),
        reflection_v1alpha: RequestRefusals::new(reflection_v1alpha, max_message),
    };
    builder
        .serve_with_incoming_shutdown(routes, admitted_connections(listener, limits, tls.is_none()), shutdown)
        .await
        .context("gRPC server")
}

/// The gRPC requests anyone may make, with no credentials: they do not hold a connection when
/// a full listener needs its slot for a client that waits.
const GRPC_YIELDING: &[&str] = &["/grpc.health.v1.Health/", "/grpc.reflection."];

/// The gRPC methods whose answers are streams (server-streaming or bidirectional): the node
/// tells them to end as it stops, and their connections do not wait for their clients to read
/// the end (see [`crate::connections::STREAMS_QUIET`]).
const GRPC_STREAMS: &[&str] = &[
    "/solo.v1.SoloKernel/Logs",
    "/solo.v1.SoloKernel/Watch",
    "/solo.v1.SoloKernel/Backup",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// How often the node frees the log's reader slots that dead processes left.
const STALE_READERS_EVERY: Duration = Duration::from_secs(10);

/// Frees, at start and then every [`STALE_READERS_EVERY`], the reader slots of processes that
/// died reading the log (a `solo log backup` killed mid-copy), whose transactions would keep
/// the data file from reusing pages for as long as the node runs. Holds the node only while
/// it looks.
async fn clear_stale_readers(state: std::sync::Weak<ApiState>) {
    let mut every = tokio::time::interval(STALE_READERS_EVERY);
    loop {
        every.tick().await;
        let Some(state) = state.upgrade() else { return };
        let log = state.control.log().clone();
        drop(state);
        match tokio::task::spawn_blocking(move || log.store().clear_stale_readers()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(freed)) => tracing::info!(
                freed,
                "freed the log's reader slots of processes that died reading it; their old pages can be reused"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "the log's stale reader slots could not be checked"),
            Err(_) => return,
        }
    }
}

/// How often the gRPC health service looks at whether the log takes writes.
const LOG_HEALTH_EVERY: Duration = Duration::from_secs(1);

/// Keeps the gRPC health service in step with `/health`: not serving while the log's last
/// commit failed (a full disk), as etcd's NOSPACE alarm makes it unhealthy. Holds the node only
/// while it looks, so that it never keeps a stopped node open.
async fn follow_log_health(health: HealthReporter, state: std::sync::Weak<ApiState>) {
    let mut serving = true;
    let mut every = tokio::time::interval(LOG_HEALTH_EVERY);
    loop {
        every.tick().await;
        let Some(state) = state.upgrade() else { return };
        let writable = state.control.log_failure().is_none();
        drop(state);
        if writable != serving {
            serving = writable;
            let status = if writable {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_health(&health, status).await;
        }
    }
}

/// Sets the node's gRPC health: the server's as a whole (`""`) and SoloKernel's.
async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status(<SoloKernelServer<GrpcApi> as tonic::server::NamedService>::NAME, status)
        .await;
}

/// The gRPC listener's connections, as its limits admit them, their answers' writes coalesced
/// if `coalescing` (plain connections: under TLS it gains nothing). One over its client's cap
/// is closed at once: HTTP/2 offers nothing to say why before its handshake.
fn admitted_connections(
    listener: TcpListener,
    limits: ConnectionLimits,
    coalescing: bool,
) -> impl futures_util::Stream<Item = std::io::Result<CoalescedWrites<AdmittedStream>>> {
    futures_util::stream::unfold((listener, limits), move |(listener, limits)| async move {
        loop {
            match limits.accept(&listener).await {
                Accepted::Admitted(stream, _) => {
                    let connection: std::io::Result<_> = Ok(CoalescedWrites::new(stream, coalescing));
                    return Some((connection, (listener, limits)));
                }
                Accepted::OverClientCap(_, peer, _) => {
                    tracing::debug!(%peer, "too many gRPC connections from this address");
                }
            }
        }
    })
}

/// How long a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers a connection over its client's cap with a 429, once its request's headers are in (a
/// client that is still sending takes an early answer for a broken connection), then closes it.
async fn refuse_connection(mut stream: tokio::net::TcpStream, cap: usize) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let answered = async {
        let mut request = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 << 10 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = stream.write_all(too_many_connections(&request, cap).as_bytes()).await;
        let _ = stream.shutdown().await;
    };
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, answered).await;
}

/// How long a refused connection may take to send its request's headers: not long, as the
/// slot it holds meanwhile is one of the listener's.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// What a client over its connection cap is told before the connection closes: a REST error
/// as every other (its request id, echoed or made up, and when to retry), written by hand as
/// no HTTP connection is served to it. `request` is what the client sent of its request.
fn too_many_connections(request: &[u8], cap: usize) -> String {
    let error = crate::api::Error::new(
        crate::api::ErrorKind::Overloaded,
        format!(
            "too many connections from this address (at most {cap}, [solo] max_connections_per_client); close \
             some and retry"
        ),
    );
    let status = error.kind().http_status();
    let request_id = client_request_id(request).unwrap_or_else(|| {
        let mut bytes = [0u8; 8];
        let _ = getrandom::fill(&mut bytes);
        hex::encode(bytes)
    });
    let mut body = error.json_body();
    body["request_id"] = serde_json::json!(request_id);
    let body = body.to_string();
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\nretry-after: 1\r\n\
         x-request-id: {request_id}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The `X-Request-Id` in a request's raw headers, if it is one the REST API would echo.
fn client_request_id(request: &[u8]) -> Option<String> {
    let head = std::str::from_utf8(request).ok()?;
    let value = head.split("\r\n").find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("x-request-id").then(|| value.trim())
    })?;
    crate::api::rest::usable_request_id(value).then(|| value.to_string())
}

async fn serve_http(
    listener: TcpListener,
    state: Arc<ApiState>,
    tls: Option<TlsSetup>,
    connections: ConnectionLimits,
    header_timeout: Duration,
    http2: Http2Limits,
    drained: CancellationToken,
) -> anyhow::Result<()> {
    let router = crate::api::rest::router(state);
    let acceptor = tls.map(|t| tokio_rustls::TlsAcceptor::from(t.http));
    let mut builder = HttpBuilder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
        .http2()
        .max_concurrent_streams(http2.max_streams)
        .max_header_list_size(http2.max_header_list_bytes);
    // Each connection's task holds a sender: the listener has drained once all are dropped.
    let (open, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = connections.accept(&listener) => match accepted {
                Accepted::Admitted(stream, peer) => (stream, peer),
                Accepted::OverClientCap(stream, peer, slot) => {
                    tracing::debug!(%peer, "too many connections from this address");
                    // Over TLS the answer could not be read before a handshake: it just closes.
                    if acceptor.is_none() {
                        let cap = connections.per_client();
                        tokio::spawn(async move {
                            let _slot = slot;
                            refuse_connection(stream, cap).await;
                        });
                    }
                    continue;
                }
            },
            () = drained.cancelled() => break,
        };
        let router = router.clone();
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let drained = drained.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let _open = open;
            let activity = stream.activity();
            // A TLS peer may name its tenant by its client certificate.
            let (stream, tenant) = match acceptor {
                None => (Either::Left(stream), None),
                Some(acceptor) => {
                    let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let tenant = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .and_then(|cert| crate::tls::certificate_tenant(cert.as_ref()));
                    (Either::Right(stream), tenant)
                }
            };
            let service = service_for(router, PeerTenant(tenant), Arc::clone(&activity));
            let served = HttpConnection {
                builder: &builder,
                activity: &activity,
                idle_after: header_timeout,
                drained: &drained,
            };
            if let Err(e) = served.serve(stream, service).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    drop(open);
    let _ = all_closed.recv().await;
    Ok(())
}

type HttpBuilder = hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>;

type HttpStream = Either<AdmittedStream, tokio_rustls::server::TlsStream<AdmittedStream>>;

type HttpService = hyper_util::service::TowerToHyperService<TrackRequests<axum::Router>>;

/// The REST routes whose answers are streams besides Server-Sent Events: at shutdown they end,
/// and a connection holding only streams is closed once its client takes nothing from it.
const HTTP_STREAMS: &[&str] = &["/backup"];

fn service_for(router: axum::Router, tenant: PeerTenant, activity: Arc<Activity>) -> HttpService {
    hyper_util::service::TowerToHyperService::new(TrackRequests::new(
        router.layer(axum::Extension(tenant)),
        activity,
        HTTP_STREAMS,
    ))
}

/// How long a connection told to close, with no request open, may take to go: an HTTP/2 client
/// must answer the GOAWAY's ping first, and one that never does would hold it for good.
const GOAWAY_WAIT: Duration = Duration::from_secs(1);

/// One connection of the HTTP listener, and when it is shut down.
struct HttpConnection<'a> {
    builder: &'a HttpBuilder,
    activity: &'a Activity,
    /// The header timeout: as long as hyper lets an HTTP/1 connection wait for its next request.
    idle_after: Duration,
    drained: &'a CancellationToken,
}

impl HttpConnection<'_> {
    /// Serves the connection until it ends. Once the listener drains, or the connection has had
    /// no request open for `idle_after` (HTTP/2 has no bound of its own for that), it is shut
    /// down gracefully: an HTTP/2 client is sent a GOAWAY, an HTTP/1 one served no further
    /// request. One still open [`GOAWAY_WAIT`] after that with no request open is dropped; after
    /// the drain, so is one with only streams open that has taken nothing written to it for
    /// [`STREAMS_QUIET`] (its client does not read its streams' end).
    async fn serve(
        self,
        stream: HttpStream,
        service: HttpService,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let connection = self
            .builder
            .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service);
        let mut connection = std::pin::pin!(connection);
        let drained = tokio::select! {
            result = connection.as_mut() => return result,
            () = self.drained.cancelled() => Some(tokio::time::Instant::now()),
            () = self.activity.idle(self.idle_after) => {
                tracing::trace!("closing an idle HTTP connection");
                None
            }
        };
        connection.as_mut().graceful_shutdown();
        let let_go = async {
            if let Some(drained) = drained {
                self.activity.streams_done(drained, STREAMS_QUIET).await;
            } else {
                tokio::time::sleep(GOAWAY_WAIT).await;
                self.activity.idle(GOAWAY_WAIT).await;
            }
        };
        tokio::select! {
            result = connection => result,
            () = let_go => {
                tracing::debug!("dropping a connection that did not close when told");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    /// Every streaming method the gRPC listener serves, from the descriptors it serves by
    /// reflection: those of [`super::GRPC_STREAMS`].
    #[test]
    fn the_grpc_streams_are_every_streaming_method_served() {
        let sets = [
            super::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut streams = Vec::new();
        for set in sets {
            let set = prost_types::FileDescriptorSet::decode(set).expect("a descriptor set");
            for file in set.file {
                for service in &file.service {
                    for method in &service.method {
                        if method.server_streaming() {
                            streams.push(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
                        }
                    }
                }
            }
        }
        streams.sort();
        let mut listed: Vec<String> = super::GRPC_STREAMS.iter().map(|s| s.to_string()).collect();
        listed.sort();
        assert_eq!(streams, listed);
    }
}
