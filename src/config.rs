//! The node's configuration: a TOML file (`--config FILE` or `SOLO_CONFIG`), every key optional
//! with a documented default (see `config.example.toml`). Unknown keys and bad values are
//! refused with the key's dotted path and the reason.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::control::{ControlOptions, WriterOptions, system_clock};
use crate::limits::{LimitsTable, TenantLimits};
use crate::log::{LogOptions, StoreOptions};
use crate::runtime::{EngineOptions, RetryOptions, RuntimeOptions};
use crate::state::Settings;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub solo: SoloConfig,
    pub database: DatabaseConfig,
    pub limits: TenantLimits,
    pub runtime: RuntimeConfig,
    pub security: SecurityConfig,
    pub telemetry: TelemetryConfig,
    /// Per-tenant overrides, keyed by tenant name.
    pub tenants: BTreeMap<String, TenantConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SoloConfig {
    pub data_dir: PathBuf,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// How long a retried deploy or kill with the same idempotency key gets the original answer.
    pub idempotency_window_ms: u64,
    /// How long shutdown waits for calls in flight and services to stop (when the request names none).
    pub shutdown_grace_ms: u32,
    /// Requests in flight on the node, all tenants together; more are shed.
    pub max_in_flight: u32,
    /// Largest request body (REST) or message (gRPC); a module in base64 JSON must fit.
    pub max_request_bytes: u64,
    /// Bytes of request bodies the node holds at once, over both APIs (each body's first 64 KiB
    /// not counted); a body that would go past it is refused (429 / RESOURCE_EXHAUSTED).
    pub max_in_flight_body_bytes: u64,
    /// Time limit of a non-streaming HTTP request.
    pub http_request_timeout_ms: u32,
    /// Time a client may take to send a request's headers (HTTP/1), and a new connection to send
    /// its opening bytes (its first byte on the HTTP listener; the HTTP/2 preface and SETTINGS,
    /// or a TLS hello, on the gRPC one). Also how long a connection to the HTTP listener may have
    /// no request open (HTTP/1 keep-alive, or HTTP/2) before it is closed.
    pub http_header_timeout_ms: u32,
    /// Time a client may take none of the bytes the node writes to it (on either listener):
    /// the connection is then closed, and lets go of the answers it held. A backup stream
    /// whose client takes none of it for as long is given up.
    pub write_stall_timeout_ms: u32,
    /// Idle time after which the gRPC listener pings a client to learn whether it is still
    /// there (as etcd's `--grpc-keepalive-interval`).
    pub grpc_keepalive_interval_ms: u64,
    /// How long the answer to that ping may take before the connection is closed.
    pub grpc_keepalive_timeout_ms: u32,
    /// How long a gRPC connection may have no call open (as grpc-go's `MaxConnectionIdle`)
    /// before it is closed; a stream open (a Watch, a followed log), however quiet, keeps it.
    /// Without it, a connection that opens and then asks nothing (or only pings) holds its slot
    /// for good, and a few addresses could take every slot. A minute by default: a client
    /// that calls at least once a minute keeps its connection (and its TLS handshake), one
    /// that asks nothing gives its slot back within a minute, and one that comes back later
    /// pays a reconnect; as long as `write_stall_timeout_ms`, and AWS load balancers' idle
    /// timeout. 0: never (only where every client is trusted).
    pub grpc_max_connection_idle_ms: u32,
    /// Connections each listener (HTTP, gRPC) holds open at once; more wait in the backlog.
    pub max_connections: u32,
    /// With a listener's `max_connections` all held, how long a connection may have had no
    /// request open and still keep its slot: past it, such connections are closed one at a time
    /// (the one idle longest first) to make room for the clients waiting. Idle connections from
    /// many addresses then cannot keep others out.
    pub full_listener_idle_ms: u32,
    /// Connections one client address may hold open on each listener; more are closed.
    pub max_connections_per_client: u32,
    /// Streams one HTTP/2 connection may have open at once (gRPC calls and watches, HTTP/2
    /// requests), as advertised in its SETTINGS; a client's further streams wait for one to end.
    pub max_streams_per_connection: u32,
    /// The most request headers (gRPC metadata) an HTTP/2 request may carry, counted as HTTP/2
    /// counts them (each name and value, plus 32 bytes), as the connection's SETTINGS tell the
    /// client. One over it is refused alone (`431`), and one over four times it closes its
    /// connection (hyper's guard against a flood), ending every call on it: hyper's default of
    /// 16 KiB put that at 64 KiB of metadata. 64 KiB, as Envoy's default.
    pub max_header_list_bytes: u32,
    /// Whether gRPC requests may come compressed (gzip, deflate). Off by default: a request of
    /// 20 KiB inflated to 20 MiB on the threads that serve every tenant, so a tenant's few
    /// compressed requests could hold them at no cost of its own (other tenants' calls waited
    /// 0.25-0.4 s). Turn it on only where every tenant is trusted.
    pub grpc_accept_compressed: bool,
    /// How much of a request body left unread (one over the limit, or refused before it was
    /// read) the server still reads and discards, so the client gets the answer rather than a
    /// connection reset.
    pub http_discard_bytes: u64,
    /// Keep-alive comment interval of SSE streams.
    pub sse_keepalive_ms: u32,
    /// Progress interval of a Watch that names none.
    pub watch_progress_interval_ms: u32,
}

impl Default for SoloConfig {
    fn default() -> Self {
        SoloConfig {
            data_dir: PathBuf::from("./data"),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            idempotency_window_ms: 24 * 3600 * 1000,
            shutdown_grace_ms: 10_000,
            max_in_flight: 1000,
            max_request_bytes: 24 << 20,
            max_in_flight_body_bytes: 1 << 30,
            http_request_timeout_ms: 70_000,
            http_header_timeout_ms: 10_000,
            write_stall_timeout_ms: 60_000,
            grpc_keepalive_interval_ms: 2 * 3600 * 1000,
            grpc_keepalive_timeout_ms: 20_000,
            grpc_max_connection_idle_ms: 60_000,
            max_connections: 10_000,
            full_listener_idle_ms: 1_000,
            max_connections_per_client: 1_000,
            max_streams_per_connection: 1_000,
            max_header_list_bytes: 64 << 10,
            grpc_accept_compressed: false,
            http_discard_bytes: 64 << 20,
            sse_keepalive_ms: 15_000,
            watch_progress_interval_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// LMDB map size: the most the data file may grow to. Reserves address space, not disk.
    pub map_size_mb: u64,
    /// LMDB reader slots, shared with offline tools reading the same directory.
    pub max_readers: u32,
    /// Write a state snapshot every this many events (0: never).
    pub snapshot_every: u64,
    pub snapshots_kept: u32,
    /// Recent events kept in memory for Watch and SSE subscribers; a quarter as many (at most
    /// 4096) are kept encoded too, once for all the subscribers they go to.
    pub tail_window_events: u32,
    /// Events a subscriber behind the window reads from disk at a time.
    pub tail_read_chunk: u32,
    /// Subscribers that may read from disk at once (replays of history take turns).
    pub tail_disk_readers: u32,
    /// Most commands committed in one batch (one write transaction, one fsync).
    pub max_batch_events: u32,
    /// Commands that may queue for the writer before callers wait.
    pub writer_queue: u32,
    /// While the last commit has failed, how often a small commit tries whether the log takes
    /// writes again, so that the node's health recovers with no client write to wait for.
    pub write_probe_interval_ms: u32,
    /// Walk every page of the data file's newest commit as the node opens it, refusing damage.
    pub check_pages_at_start: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        let writer = WriterOptions::default();
        DatabaseConfig {
            map_size_mb: 64 * 1024,
            max_readers: 1024,
            snapshot_every: writer.snapshot_every,
            snapshots_kept: writer.snapshots_kept as u32,
            tail_window_events: 16_384,
            tail_read_chunk: 1024,
            tail_disk_readers: 1,
            max_batch_events: writer.max_batch as u32,
            writer_queue: writer.queue_capacity as u32,
            write_probe_interval_ms: writer.write_probe_interval.as_millis() as u32,
            check_pages_at_start: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Instances that may exist at once (wasmtime's pool); services beyond it cannot start.
    pub max_instances: u32,
    /// Threads that run guest code (0: one per core). API and log threads never run guests.
    pub guest_threads: u32,
    /// Period of the epoch clock: CPU deadlines are checked, and looping guests yield, this often.
    pub epoch_tick_ms: u32,
    /// Compiled modules kept in memory, by content hash, and the most compiled code they may
    /// hold together.
    pub module_cache_entries: u32,
    pub module_cache_mb: u32,
    /// Large modules compiled at once, all tenants together (0: one per core); four times as
    /// many small ones besides.
    pub compile_threads: u32,
    /// The largest function body a module may have; compiling takes memory in proportion.
    pub max_function_bytes: u32,
    /// The most functions a module may define; each takes memory and time to compile.
    pub max_functions: u32,
    /// The most locals a module's functions may declare, all together.
    pub max_locals: u64,
    /// The most instructions a module may hold inside loops, counted once per enclosing loop.
    pub max_looped_instructions: u64,
    /// Log lines kept per service.
    pub log_lines_per_service: u32,
    /// Bytes of log lines kept per service (a line counts 64 bytes besides its text); the
    /// oldest lines go first.
    pub log_bytes_per_service: u64,
    /// Bytes a service may log per second (a line counts 64 bytes besides its text); lines
    /// over it are dropped, and counted in the next line kept.
    pub log_bytes_per_second: u64,
    /// Largest response a call may return.
    pub max_response_bytes: u64,
    /// Wasm stack of one call; deeper recursion traps with stack_overflow.
    pub max_wasm_stack_kb: u32,
    /// Time an instance may take to start, solo_init included.
    pub start_timeout_ms: u32,
    /// Longest wait between two tries to record what the runtime observed (a crash, a
    /// restart) while the log cannot take writes; the wait starts short and doubles.
    pub observation_retry_max_ms: u32,
    /// Observations kept for a retry at most; past it the oldest is dropped.
    pub observation_backlog_max: u32,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        let defaults = RuntimeOptions::default();
        RuntimeConfig {
            max_instances: defaults.engine.max_instances,
            guest_threads: 0,
            epoch_tick_ms: defaults.engine.epoch_tick.as_millis() as u32,
            module_cache_entries: defaults.module_cache_entries as u32,
            module_cache_mb: (defaults.module_cache_bytes >> 20) as u32,
            compile_threads: 0,
            max_function_bytes: defaults.engine.max_function_bytes as u32,
            max_functions: defaults.engine.max_functions as u32,
            max_locals: defaults.engine.max_locals,
            max_looped_instructions: defaults.engine.max_looped_instructions,
            log_lines_per_service: defaults.logs.lines as u32,
            log_bytes_per_service: defaults.logs.bytes,
            log_bytes_per_second: defaults.logs.bytes_per_second,
            max_response_bytes: defaults.max_response_bytes as u64,
            max_wasm_stack_kb: (defaults.engine.max_wasm_stack >> 10) as u32,
            start_timeout_ms: defaults.start_timeout.as_millis() as u32,
            observation_retry_max_ms: defaults.observation_retry.max.as_millis() as u32,
            observation_backlog_max: defaults.observation_retry.max_backlog as u32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// A tracing filter, e.g. "info" or "solo=debug,tower=warn". `RUST_LOG` overrides it.
    pub log_level: String,
    /// "text" for people, "json" for log pipelines.
    pub log_format: LogFormat,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_level: "info".into(),
            log_format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// SHA-256 (hex) of each admin token; several allow rotation.
    pub admin_token_sha256: Vec<String>,
    /// PEM certificate chain and key: with both, both listeners speak TLS only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA: clients must present a certificate it signed, whose subject CN names the tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

/// One tenant's settings: its tokens, and overrides of `[limits]` (keys as there).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// SHA-256 (hex) of each of the tenant's tokens.
    #[serde(default)]
    pub token_sha256: Vec<String>,
    #[serde(default)]
    pub limits: Option<TenantLimitOverrides>,
}

/// `[tenants.<name>.limits]`: any subset of `[limits]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TenantLimitOverrides(pub BTreeMap<String, toml::Value>);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    /// Reads and checks a config file; `None` gives the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Invalid { path: key, message } => ConfigError::Invalid {
                path: format!("{}: {key}", path.display()),
                message,
            },
            other => other,
        })
    }

    /// Parses and checks TOML text. Errors name the key (`limits.max_services`) and the reason.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let deserializer = toml::Deserializer::parse(text).map_err(|e| ConfigError::Invalid {
            path: "(syntax)".into(),
            message: one_line(&e.to_string()),
        })?;
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            let mut message = one_line(&e.into_inner().to_string());
            if message.contains("invalid socket address syntax") {
                message.push_str(
                    "; give an IP address and a port, such as 127.0.0.1:8080 (host names such as localhost are \
                     not looked up)",
                );
            }
            ConfigError::Invalid { path, message }
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |path: &str, message: &str| ConfigError::Invalid {
            path: path.into(),
            message: message.into(),
        };
        let (db, solo, rt) = (&self.database, &self.solo, &self.runtime);
        // Zero would refuse every request, fill no batch, or retry in a spin: never meant.
        for (key, value) in [
            ("database.map_size_mb", db.map_size_mb),
            ("database.max_readers", db.max_readers.into()),
            ("database.max_batch_events", db.max_batch_events.into()),
            ("database.writer_queue", db.writer_queue.into()),
            ("database.write_probe_interval_ms", db.write_probe_interval_ms.into()),
            ("database.tail_read_chunk", db.tail_read_chunk.into()),
            ("database.tail_disk_readers", db.tail_disk_readers.into()),
            ("database.snapshots_kept", db.snapshots_kept.into()),
            ("solo.idempotency_window_ms", solo.idempotency_window_ms),
            ("solo.http_request_timeout_ms", solo.http_request_timeout_ms.into()),
            ("solo.http_header_timeout_ms", solo.http_header_timeout_ms.into()),
            ("solo.write_stall_timeout_ms", solo.write_stall_timeout_ms.into()),
            ("solo.grpc_keepalive_interval_ms", solo.grpc_keepalive_interval_ms),
            ("solo.grpc_keepalive_timeout_ms", solo.grpc_keepalive_timeout_ms.into()),
            ("solo.max_in_flight", solo.max_in_flight.into()),
            ("solo.max_request_bytes", solo.max_request_bytes),
            ("solo.max_connections", solo.max_connections.into()),
            ("solo.full_listener_idle_ms", solo.full_listener_idle_ms.into()),
            (
                "solo.max_connections_per_client",
                solo.max_connections_per_client.into(),
            ),
            (
                "solo.max_streams_per_connection",
                solo.max_streams_per_connection.into(),
            ),
            ("runtime.max_instances", u64::from(rt.max_instances)),
            ("runtime.epoch_tick_ms", rt.epoch_tick_ms.into()),
            ("runtime.module_cache_entries", rt.module_cache_entries.into()),
            ("runtime.module_cache_mb", rt.module_cache_mb.into()),
            ("runtime.max_function_bytes", rt.max_function_bytes.into()),
            ("runtime.max_functions", rt.max_functions.into()),
            ("runtime.max_locals", rt.max_locals),
            ("runtime.max_looped_instructions", rt.max_looped_instructions),
            ("runtime.log_lines_per_service", rt.log_lines_per_service.into()),
            ("runtime.max_response_bytes", rt.max_response_bytes),
            ("runtime.start_timeout_ms", rt.start_timeout_ms.into()),
            ("runtime.observation_retry_max_ms", rt.observation_retry_max_ms.into()),
            ("runtime.observation_backlog_max", rt.observation_backlog_max.into()),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if solo.data_dir.as_os_str().is_empty() {
            return Err(invalid("solo.data_dir", "is empty: name the data directory"));
        }
        // More often, a keep-alive only floods the client: the floor of a Watch's progress.
        let floor = crate::api::watch::MIN_PROGRESS_INTERVAL.as_millis();
        for (key, value) in [
            ("solo.sse_keepalive_ms", solo.sse_keepalive_ms),
            ("solo.watch_progress_interval_ms", solo.watch_progress_interval_ms),
        ] {
            if u128::from(value) < floor {
                return Err(invalid(key, &format!("must be at least {floor}")));
            }
        }
        // Less, and a client's ordinary headers (a token, a user agent, a trace) would not fit.
        if solo.max_header_list_bytes < MIN_HEADER_LIST_BYTES {
            return Err(invalid(
                "solo.max_header_list_bytes",
                &format!("must be at least {MIN_HEADER_LIST_BYTES}"),
            ));
        }
        // Shorter, a connection would close between the calls of a client that is busy.
        let idle = solo.grpc_max_connection_idle_ms;
        if idle != 0 && u128::from(idle) < floor {
            return Err(invalid(
                "solo.grpc_max_connection_idle_ms",
                &format!("must be at least {floor} (0: never)"),
            ));
        }
        // Less than one full line a second would drop every full line, however seldom.
        let one_line = crate::runtime::LogLimits::FULL_LINE_COST;
        for (key, value) in [
            ("runtime.log_bytes_per_second", rt.log_bytes_per_second),
            // Less, and a full line would not be kept.
            ("runtime.log_bytes_per_service", rt.log_bytes_per_service),
        ] {
            if value < one_line {
                return Err(invalid(
                    key,
                    &format!("must be at least {one_line} (one full line of 4 KiB, and what a line costs besides)"),
                ));
            }
        }
        // A slower epoch clock checks CPU limits too seldom to hold them, and the stack is
        // reserved for every instance of the pool.
        for (key, value, most) in [
            ("runtime.epoch_tick_ms", rt.epoch_tick_ms, MAX_EPOCH_TICK_MS),
            ("runtime.max_wasm_stack_kb", rt.max_wasm_stack_kb, MAX_WASM_STACK_KB),
        ] {
            if value > most {
                return Err(invalid(key, &format!("must be at most {most}")));
            }
        }
        // Guest threads are all made at start, each with its stack, and each compile takes
        // memory: a typo here could take all of it.
        for (key, value) in [
            ("runtime.guest_threads", rt.guest_threads),
            ("runtime.compile_threads", rt.compile_threads),
        ] {
            if value > MAX_THREADS {
                return Err(invalid(
                    key,
                    &format!("must be at most {MAX_THREADS} (0: one per core)"),
                ));
            }
        }
        if solo.max_in_flight_body_bytes < solo.max_request_bytes {
            return Err(invalid(
                "solo.max_in_flight_body_bytes",
                &format!(
                    "{} is under max_request_bytes = {}: the largest request could never be taken",
                    solo.max_in_flight_body_bytes, solo.max_request_bytes
                ),
            ));
        }
        // Each slot takes 64 bytes of the lock file, which LMDB sizes for all of them at once.
        if db.max_readers > MAX_READERS {
            return Err(invalid(
                "database.max_readers",
                &format!("must be at most {MAX_READERS} (a 64 MiB lock file)"),
            ));
        }
        if db.map_size_mb > MAX_MAP_SIZE_MB {
            return Err(invalid(
                "database.map_size_mb",
                &format!("must be at most {MAX_MAP_SIZE_MB} (64 TiB of address space)"),
            ));
        }
        check_log_level(&self.telemetry.log_level).map_err(|e| invalid("telemetry.log_level", &e))?;
        validate_limits("limits", &self.limits, self.solo.max_request_bytes)?;
        self.validate_security()?;
        self.check_listeners()?;
        if rt.max_wasm_stack_kb < 64 {
            return Err(invalid("runtime.max_wasm_stack_kb", "must be at least 64"));
        }
        for name in self.tenants.keys() {
            crate::control::validate_tenant(name).map_err(|e| invalid(&format!("tenants.{name}"), &e.to_string()))?;
            let limits = self.tenant_limits(name)?;
            validate_limits(&format!("tenants.{name}.limits"), &limits, self.solo.max_request_bytes)?;
        }
        // After the limits: a memory limit that is wrong in itself is named as such.
        self.validate_instance_pool()?;
        Ok(())
    }

    /// Refuses listeners on one port: the second would fail to bind as if another process held
    /// it. Run again by `serve` once its flags have set the addresses.
    pub fn check_listeners(&self) -> Result<(), ConfigError> {
        let (grpc, http) = (self.solo.grpc_addr, self.solo.http_addr);
        let same_host = grpc.ip() == http.ip() || grpc.ip().is_unspecified() || http.ip().is_unspecified();
        if grpc.port() != 0 && grpc.port() == http.port() && same_host {
            return Err(ConfigError::Invalid {
                path: "solo.http_addr".into(),
                message: format!(
                    "{http} is on the port of solo.grpc_addr ({grpc}): each listener needs a port of its own"
                ),
            });
        }
        Ok(())
    }

    fn validate_security(&self) -> Result<(), ConfigError> {
        let invalid = |path: String, message: String| ConfigError::Invalid { path, message };
        let mut seen: std::collections::HashMap<String, String> = std::collections::HashMap::new();
        for (key, hash, _) in self.tokens() {
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(
                    key,
                    "not a SHA-256 in hex (64 hex digits); `solo token new` prints one".into(),
                ));
            }
            // One token names one principal: a hash given twice would make it ambiguous.
            if let Some(first) = seen.insert(hash.to_ascii_lowercase(), key.clone()) {
                return Err(invalid(
                    key,
                    format!("this hash is already given to {first}; a token names one principal"),
                ));
            }
        }
        let sec = &self.security;
        match (&sec.tls_cert, &sec.tls_key) {
            (Some(_), None) => {
                return Err(invalid(
                    "security.tls_key".into(),
                    "tls_cert is set, tls_key is not".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "security.tls_cert".into(),
                    "tls_key is set, tls_cert is not".into(),
                ));
            }
            (None, None) if sec.client_ca.is_some() => {
                return Err(invalid(
                    "security.client_ca".into(),
                    "needs tls_cert and tls_key".into(),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// Every configured token hash: (its config key, the hex hash, its principal).
    pub fn tokens(&self) -> Vec<(String, String, crate::api::Principal)> {
        let admin = self.security.admin_token_sha256.iter().map(|h| {
            (
                "security.admin_token_sha256".to_string(),
                h.clone(),
                crate::api::Principal::Admin,
            )
        });
        let tenants = self.tenants.iter().flat_map(|(name, tenant)| {
            tenant.token_sha256.iter().map(move |h| {
                (
                    format!("tenants.{name}.token_sha256"),
                    h.clone(),
                    crate::api::Principal::Tenant(name.clone()),
                )
            })
        });
        admin.chain(tenants).collect()
    }

    /// The TLS files, if TLS is configured.
    pub fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        let sec = &self.security;
        Some(crate::tls::TlsFiles {
            cert: sec.tls_cert.clone()?,
            key: sec.tls_key.clone()?,
            client_ca: sec.client_ca.clone(),
        })
    }

    /// The configuration with token hashes replaced, for printing.
    pub fn redacted(&self) -> Config {
        let mut config = self.clone();
        let redact = |hashes: &mut Vec<String>| hashes.iter_mut().for_each(|h| *h = "<redacted>".into());
        redact(&mut config.security.admin_token_sha256);
        config.tenants.values_mut().for_each(|t| redact(&mut t.token_sha256));
        config
    }

    /// `[limits]` with the tenant's overrides applied.
    fn tenant_limits(&self, name: &str) -> Result<TenantLimits, ConfigError> {
        let overrides = self.tenants.get(name).and_then(|t| t.limits.as_ref());
        let Some(overrides) = overrides else {
            return Ok(self.limits.clone());
        };
        let mut merged = toml::Table::try_from(&self.limits).expect("limits serialise");
        merged.extend(overrides.0.clone());
        let path = format!("tenants.{name}.limits");
        serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|e| ConfigError::Invalid {
            path: format!("{path}.{}", e.path()),
            message: one_line(&e.into_inner().to_string()),
        })
    }

    /// The limits table the control writer enforces.
    pub fn limits_table(&self) -> Result<LimitsTable, ConfigError> {
        let mut tenants = std::collections::HashMap::new();
        for name in self.tenants.keys() {
            tenants.insert(name.clone(), self.tenant_limits(name)?);
        }
        // Upgrades and restarts briefly need a second instance: keep a sixteenth of the pool for them.
        let pool = u64::from(self.runtime.max_instances);
        Ok(LimitsTable {
            node: self.limits.clone(),
            tenants,
            node_services: Some(pool - pool / 16),
        })
    }

    pub fn log_options(&self, read_only: bool) -> LogOptions {
        let db = &self.database;
        LogOptions {
            store: StoreOptions {
                map_size: db.map_size_mb << 20,
                max_readers: db.max_readers,
                read_only,
                check_pages: db.check_pages_at_start,
            },
            tail_window: db.tail_window_events as usize,
            tail_read_chunk: db.tail_read_chunk as usize,
            tail_disk_readers: db.tail_disk_readers as usize,
        }
    }

    /// The runtime's options. Its memory pool is sized for the largest per-service memory any
    /// tenant may ask for.
    pub fn runtime_options(&self) -> Result<RuntimeOptions, ConfigError> {
        let table = self.limits_table()?;
        let max_memory_bytes = table
            .tenants
            .values()
            .chain([&table.node])
            .map(TenantLimits::max_memory_bytes)
            .max();
        let rt = &self.runtime;
        Ok(RuntimeOptions {
            engine: EngineOptions {
                max_instances: rt.max_instances,
                max_memory_bytes: max_memory_bytes.unwrap_or(table.node.max_memory_bytes()),
                max_wasm_stack: (rt.max_wasm_stack_kb as usize) << 10,
                epoch_tick: std::time::Duration::from_millis(rt.epoch_tick_ms.into()),
                max_function_bytes: rt.max_function_bytes as usize,
                max_functions: rt.max_functions as usize,
                max_locals: rt.max_locals,
                max_looped_instructions: rt.max_looped_instructions,
            },
            guest_threads: match rt.guest_threads {
                0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
                n => n as usize,
            },
            module_cache_entries: rt.module_cache_entries as usize,
            module_cache_bytes: (rt.module_cache_mb as usize) << 20,
            compile_threads: match rt.compile_threads {
                0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
                n => n as usize,
            },
            logs: crate::runtime::LogLimits {
                lines: rt.log_lines_per_service as usize,
                bytes: rt.log_bytes_per_service,
                bytes_per_second: rt.log_bytes_per_second,
            },
            max_response_bytes: usize::try_from(rt.max_response_bytes).unwrap_or(usize::MAX),
            start_timeout: std::time::Duration::from_millis(rt.start_timeout_ms.into()),
            observation_retry: {
                let max = std::time::Duration::from_millis(rt.observation_retry_max_ms.into());
                RetryOptions {
                    initial: RetryOptions::default().initial.min(max),
                    max,
                    max_backlog: rt.observation_backlog_max as usize,
                }
            },
        })
    }

    pub fn settings(&self) -> Settings {
        Settings {
            idempotency_window_ms: self.solo.idempotency_window_ms,
            ..Settings::default()
        }
    }

    pub fn control_options(&self) -> Result<ControlOptions, ConfigError> {
        let db = &self.database;
        Ok(ControlOptions {
            data_dir: self.solo.data_dir.clone(),
            log: self.log_options(false),
            settings: self.settings(),
            writer: WriterOptions {
                max_batch: db.max_batch_events as usize,
                queue_capacity: db.writer_queue as usize,
                snapshot_every: db.snapshot_every,
                snapshots_kept: db.snapshots_kept as usize,
                write_probe_interval: std::time::Duration::from_millis(db.write_probe_interval_ms.into()),
            },
            limits: self.limits_table()?,
            clock: system_clock(),
            on_commit: None,
        })
    }
}

/// The largest LMDB map: address space is reserved for all of it.
const MAX_MAP_SIZE_MB: u64 = 64 << 20;

/// The most LMDB reader slots: readers are threads reading at once, not clients.
const MAX_READERS: u32 = 1 << 20;

/// The slowest epoch clock: CPU limits are checked this often at least.
const MAX_EPOCH_TICK_MS: u32 = 1000;

/// The largest wasm stack of a call (64 MiB); the pool reserves one for each instance.
const MAX_WASM_STACK_KB: u32 = 64 << 10;

/// The most threads of one kind (guest, compile) a node may be given.
const MAX_THREADS: u32 = 1024;

/// The smallest `max_header_list_bytes`: grpc-java's and grpc C-core's own default.
const MIN_HEADER_LIST_BYTES: u32 = 8 << 10;

/// The address space the instance pool may reserve: each slot holds its largest memory.
const MAX_POOL_RESERVATION: u64 = 64 << 40;

impl Config {
    /// The instance pool reserves a memory slot for each instance up front: refuses a pool that
    /// could never be reserved, naming the keys to lower.
    fn validate_instance_pool(&self) -> Result<(), ConfigError> {
        let largest_memory = self
            .limits_table()?
            .tenants
            .values()
            .chain([&self.limits])
            .map(TenantLimits::max_memory_bytes)
            .max()
            .unwrap_or(0);
        // A slot is the memory plus its guard page, as the engine lays them out.
        let slot = largest_memory.next_multiple_of(1 << 16) + (1 << 16);
        let reserved = u64::from(self.runtime.max_instances).saturating_mul(slot);
        if reserved > MAX_POOL_RESERVATION {
            return Err(ConfigError::Invalid {
                path: "runtime.max_instances".into(),
                message: format!(
                    "{} instances of up to {} MiB each would reserve {:.1} TiB of address space, over 64 TiB; \
                     lower runtime.max_instances or [limits] max_memory_mb",
                    self.runtime.max_instances,
                    largest_memory >> 20,
                    reserved as f64 / (1u64 << 40) as f64
                ),
            });
        }
        Ok(())
    }
}

/// Checks `[telemetry] log_level`: a tracing filter, whose bare words are levels. tracing
/// takes a bare word for a target to log at every level, so a typo such as "warning" would
/// silently log nothing at all; here a target takes its level after `=`.
pub(crate) fn check_log_level(filter: &str) -> Result<(), String> {
    if filter.split(',').all(|d| d.trim().is_empty()) {
        return Err("is empty: name a level, such as \"info\"".into());
    }
    tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| format!("not a tracing filter: {e}"))?;
    const LEVELS: [&str; 12] = [
        "trace", "debug", "info", "warn", "error", "off", "0", "1", "2", "3", "4", "5",
    ];
    let bare = filter
        .split(',')
        .map(str::trim)
        .find(|d| !d.is_empty() && !d.contains(['=', '[']) && !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(d)));
    match bare {
        Some(word) => Err(format!(
            "'{word}' is not a level (trace, debug, info, warn, error or off); a target takes its \
             level after '=', as in '{word}=debug'"
        )),
        None => Ok(()),
    }
}

/// `max_request_bytes`: the largest request, which a tenant's share of bodies in flight must fit.
fn validate_limits(path: &str, limits: &TenantLimits, max_request_bytes: u64) -> Result<(), ConfigError> {
    // Zero would refuse every request, stream or deploy, or (a window of no time) let a
    // crashing service restart without end: never meant.
    for (key, value) in [
        ("max_in_flight_requests", limits.max_in_flight_requests.into()),
        ("max_watchers", limits.max_watchers.into()),
        (
            "max_history_read_bytes_per_second",
            limits.max_history_read_bytes_per_second,
        ),
        ("max_deploys_per_minute", limits.max_deploys_per_minute.into()),
        ("max_history_mb_per_hour", limits.max_history_mb_per_hour),
        ("max_module_bytes", limits.max_module_bytes),
        ("restart_window_ms", limits.restart_window_ms.into()),
    ] {
        if value == 0 {
            return Err(ConfigError::Invalid {
                path: format!("{path}.{key}"),
                message: "must be at least 1".into(),
            });
        }
    }
    // Less, a full line would wait more than a second, however seldom the tenant reads.
    let one_line = crate::runtime::LogLimits::FULL_LINE_COST;
    if limits.max_log_read_bytes_per_second < one_line {
        return Err(ConfigError::Invalid {
            path: format!("{path}.max_log_read_bytes_per_second"),
            message: format!("must be at least {one_line} (one full line of 4 KiB, and what a line costs besides)"),
        });
    }
    if limits.max_in_flight_body_bytes < max_request_bytes {
        return Err(ConfigError::Invalid {
            path: format!("{path}.max_in_flight_body_bytes"),
            message: format!(
                "{} is under [solo] max_request_bytes = {max_request_bytes}: a request of the largest size \
                 could never be sent",
                limits.max_in_flight_body_bytes
            ),
        });
    }
    let pairs = [
        (
            "default_memory_mb",
            limits.default_memory_mb,
            "max_memory_mb",
            limits.max_memory_mb,
        ),
        (
            "default_call_timeout_ms",
            limits.default_call_timeout_ms.into(),
            "max_call_timeout_ms",
            limits.max_call_timeout_ms.into(),
        ),
        (
            "default_cpu_ms_per_call",
            limits.default_cpu_ms_per_call.into(),
            "max_cpu_ms_per_call",
            limits.max_cpu_ms_per_call.into(),
        ),
        (
            "default_mailbox_capacity",
            limits.default_mailbox_capacity.into(),
            "max_mailbox_capacity",
            limits.max_mailbox_capacity.into(),
        ),
    ];
    for (default_key, default, max_key, max) in pairs {
        if default == 0 {
            return Err(ConfigError::Invalid {
                path: format!("{path}.{default_key}"),
                message: "must be at least 1".into(),
            });
        }
        if default > max {
            return Err(ConfigError::Invalid {
                path: format!("{path}.{default_key}"),
                message: format!("{default} is over {max_key} = {max}"),
            });
        }
    }
    if limits.max_memory_mb > limits.max_tenant_memory_mb {
        return Err(ConfigError::Invalid {
            path: format!("{path}.max_memory_mb"),
            message: format!(
                "{} is over max_tenant_memory_mb = {}",
                limits.max_memory_mb, limits.max_tenant_memory_mb
            ),
        });
    }
    if limits.max_memory_mb > 4096 {
        return Err(ConfigError::Invalid {
            path: format!("{path}.max_memory_mb"),
            message: "a wasm32 memory holds at most 4096 MiB".into(),
        });
    }
    Ok(())
}

/// Keeps the first line of a multi-line message (toml's errors draw the source below it).
fn one_line(message: &str) -> String {
    let lines: Vec<&str> = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    match lines.as_slice() {
        [] => String::new(),
        // toml: "TOML parse error at line 2, column 1", the source excerpt, then the reason.
        [first, .., last] if first.starts_with("TOML parse error") => {
            format!("{last} ({})", first.trim_start_matches("TOML parse error "))
        }
        [first, ..] => (*first).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn empty_config_is_the_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.solo.data_dir, PathBuf::from("./data"));
        assert_eq!(config.solo.grpc_addr.port(), 50051);
    }

    #[test]
    fn the_example_file_documents_exactly_the_defaults() {
        let example = Config::parse(include_str!("../config.example.toml")).unwrap();
        assert_eq!(example, Config::default());
        // Every key of the defaults appears in the example (so none goes undocumented).
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        let text = include_str!("../config.example.toml");
        let sections = defaults.iter().filter(|(s, _)| *s != "tenants");
        for (section, keys) in sections.filter_map(|(s, v)| Some((s, v.as_table()?))) {
            assert!(
                text.contains(&format!("[{section}]")),
                "[{section}] is not in config.example.toml"
            );
            for key in keys.keys() {
                assert!(
                    text.contains(&format!("\n{key} = ")),
                    "{section}.{key} is not in config.example.toml"
                );
            }
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path() {
        let e = error_of("[solo]\ndata_dri = \"x\"\n");
        assert!(e.contains("data_dri"), "{e}");
        let e = error_of("[limits]\nmax_servics = 3\n");
        assert!(e.contains("max_servics"), "{e}");
        let e = error_of("[nope]\n");
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = error_of("[solo]\ngrpc_addr = \"not an address\"\n");
        assert!(e.contains("solo.grpc_addr"), "{e}");
        let e = error_of("[solo]\nhttp_addr = \"localhost:8080\"\n");
        assert!(
            e.contains("solo.http_addr") && e.contains("such as 127.0.0.1:8080"),
            "{e}"
        );
        let e = error_of("[limits]\nmax_services = -1\n");
        assert!(e.contains("limits.max_services"), "{e}");
        let e = error_of("[solo]\ngrpc_addr = \"127.0.0.1:7000\"\nhttp_addr = \"0.0.0.0:7000\"\n");
        assert!(e.contains("solo.http_addr") && e.contains("port of its own"), "{e}");
        let e = error_of("[database]\nmap_size_mb = 0\n");
        assert!(e.contains("database.map_size_mb"), "{e}");
        let e = error_of("[limits]\ndefault_memory_mb = 512\n");
        assert!(
            e.contains("limits.default_memory_mb") && e.contains("max_memory_mb"),
            "{e}"
        );
        let e = error_of("[limits]\nmax_in_flight_body_bytes = 1048576\n");
        assert!(
            e.contains("limits.max_in_flight_body_bytes") && e.contains("[solo] max_request_bytes = 25165824"),
            "{e}"
        );
        let e = error_of("this is not toml");
        assert!(e.contains("config"), "{e}");
    }

    #[test]
    fn a_log_level_is_a_filter_whose_bare_words_are_levels() {
        for good in [
            "info",
            "WARN",
            "solo=debug,info",
            "error,solo::api=trace",
            "off",
            "solo[call]=debug",
        ] {
            assert_eq!(check_log_level(good), Ok(()), "{good}");
        }
        for (bad, says) in [
            ("", "is empty"),
            (" , ", "is empty"),
            ("warning", "'warning' is not a level"),
            ("info,verbose", "'verbose' is not a level"),
            ("solo=loud", "not a tracing filter"),
        ] {
            let e = check_log_level(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let e = error_of("[telemetry]\nlog_level = \"warning\"\n");
        assert!(
            e.contains("telemetry.log_level") && e.contains("'warning=debug'"),
            "{e}"
        );
    }

    #[test]
    fn values_that_no_request_could_get_past_are_refused() {
        for (text, key) in [
            ("[solo]\nmax_in_flight = 0\n", "solo.max_in_flight"),
            ("[solo]\nmax_request_bytes = 0\n", "solo.max_request_bytes"),
            (
                "[limits]\nmax_in_flight_requests = 0\n",
                "limits.max_in_flight_requests",
            ),
            ("[limits]\nmax_watchers = 0\n", "limits.max_watchers"),
            (
                "[limits]\nmax_history_read_bytes_per_second = 0\n",
                "limits.max_history_read_bytes_per_second",
            ),
            (
                "[tenants.acme.limits]\nmax_watchers = 0\n",
                "tenants.acme.limits.max_watchers",
            ),
            (
                "[limits]\nmax_deploys_per_minute = 0\n",
                "limits.max_deploys_per_minute",
            ),
            (
                "[tenants.acme.limits]\nmax_deploys_per_minute = 0\n",
                "tenants.acme.limits.max_deploys_per_minute",
            ),
            ("[limits]\nrestart_window_ms = 0\n", "limits.restart_window_ms"),
            (
                "[tenants.acme.limits]\nmax_history_mb_per_hour = 0\n",
                "tenants.acme.limits.max_history_mb_per_hour",
            ),
            ("[limits]\nmax_module_bytes = 0\n", "limits.max_module_bytes"),
        ] {
            let e = error_of(text);
            assert!(e.contains(key) && e.contains("at least 1"), "{text}: {e}");
        }
    }

    #[test]
    fn values_that_would_flood_or_exhaust_the_node_are_refused() {
        for (text, key, says) in [
            (
                "[tenants.acme.limits]\nmax_log_read_bytes_per_second = 4096\n",
                "tenants.acme.limits.max_log_read_bytes_per_second",
                "at least 4160",
            ),
            (
                "[database]\nmax_readers = 4294967295\n",
                "database.max_readers",
                "at most 1048576",
            ),
            (
                "[solo]\nhttp_request_timeout_ms = 0\n",
                "solo.http_request_timeout_ms",
                "at least 1",
            ),
            (
                "[solo]\nsse_keepalive_ms = 0\n",
                "solo.sse_keepalive_ms",
                "at least 100",
            ),
            (
                "[solo]\nsse_keepalive_ms = 99\n",
                "solo.sse_keepalive_ms",
                "at least 100",
            ),
            (
                "[solo]\nmax_header_list_bytes = 1024\n",
                "solo.max_header_list_bytes",
                "at least 8192",
            ),
            (
                "[runtime]\nguest_threads = 100000000\n",
                "runtime.guest_threads",
                "at most 1024",
            ),
            (
                "[runtime]\ncompile_threads = 1025\n",
                "runtime.compile_threads",
                "at most 1024",
            ),
            (
                "[solo]\ngrpc_max_connection_idle_ms = 99\n",
                "solo.grpc_max_connection_idle_ms",
                "at least 100 (0: never)",
            ),
            (
                "[solo]\nwatch_progress_interval_ms = 0\n",
                "solo.watch_progress_interval_ms",
                "at least 100",
            ),
            (
                "[runtime]\nepoch_tick_ms = 4294967295\n",
                "runtime.epoch_tick_ms",
                "at most 1000",
            ),
            (
                "[runtime]\nmax_wasm_stack_kb = 4294967295\n",
                "runtime.max_wasm_stack_kb",
                "at most 65536",
            ),
            ("[solo]\ndata_dir = \"\"\n", "solo.data_dir", "is empty"),
            (
                "[runtime]\nlog_bytes_per_second = 4000\n",
                "runtime.log_bytes_per_second",
                "at least 4160",
            ),
            (
                "[runtime]\nlog_bytes_per_service = 4159\n",
                "runtime.log_bytes_per_service",
                "at least 4160",
            ),
            (
                "[runtime]\nlog_bytes_per_second = 0\n",
                "runtime.log_bytes_per_second",
                "at least 4160 (one full line",
            ),
        ] {
            let e = error_of(text);
            assert!(e.contains(key) && e.contains(says), "{text}: {e}");
        }
        Config::parse("[solo]\nsse_keepalive_ms = 100\n[runtime]\nguest_threads = 1024\n").unwrap();
        Config::parse("[runtime]\nepoch_tick_ms = 1000\nmax_wasm_stack_kb = 65536\n").unwrap();
        Config::parse("[solo]\ngrpc_max_connection_idle_ms = 0\n").unwrap();
        Config::parse("[solo]\ngrpc_max_connection_idle_ms = 100\n").unwrap();
    }

    #[test]
    fn reservations_beyond_the_address_space_are_refused() {
        let e = error_of("[database]\nmap_size_mb = 18446744073709551615\n");
        assert!(e.contains("database.map_size_mb") && e.contains("64 TiB"), "{e}");
        let e = error_of("[runtime]\nmax_instances = 4294967295\n");
        assert!(
            e.contains("runtime.max_instances") && e.contains("max_memory_mb"),
            "{e}"
        );
        // A pool within the address space is fine, however large.
        Config::parse("[runtime]\nmax_instances = 100000\n[limits]\nmax_memory_mb = 64\n").unwrap();
    }

    #[test]
    fn tenant_overrides_merge_over_the_node_limits() {
        let config =
            Config::parse("[limits]\nmax_services = 7\n[tenants.acme.limits]\nmax_deploys_per_minute = 2\n").unwrap();
        let table = config.limits_table().unwrap();
        let acme = table.for_tenant("acme");
        assert_eq!((acme.max_services, acme.max_deploys_per_minute), (7, 2));
        assert_eq!(
            table.for_tenant("other").max_deploys_per_minute,
            TenantLimits::default().max_deploys_per_minute
        );
        let e = error_of("[tenants.acme.limits]\nmax_servicez = 2\n");
        assert!(e.contains("max_servicez"), "{e}");
        let e = error_of("[tenants.Bad]\n");
        assert!(e.contains("tenants.Bad"), "{e}");
    }
}
