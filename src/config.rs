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
use crate::state::Settings;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub solo: SoloConfig,
    pub database: DatabaseConfig,
    pub limits: TenantLimits,
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
}

impl Default for SoloConfig {
    fn default() -> Self {
        SoloConfig {
            data_dir: PathBuf::from("./data"),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            idempotency_window_ms: 24 * 3600 * 1000,
            shutdown_grace_ms: 10_000,
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
    /// Recent events kept in memory for Watch and SSE subscribers.
    pub tail_window_events: u32,
    /// Events a subscriber behind the window reads from disk at a time.
    pub tail_read_chunk: u32,
    /// Most commands committed in one batch (one write transaction, one fsync).
    pub max_batch_events: u32,
    /// Commands that may queue for the writer before callers wait.
    pub writer_queue: u32,
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
            max_batch_events: writer.max_batch as u32,
            writer_queue: writer.queue_capacity as u32,
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

/// One tenant's settings: overrides of `[limits]` (keys as there).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
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
            ConfigError::Invalid {
                path,
                message: one_line(&e.into_inner().to_string()),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |path: &str, message: &str| ConfigError::Invalid {
            path: path.into(),
            message: message.into(),
        };
        let db = &self.database;
        if db.map_size_mb == 0 {
            return Err(invalid("database.map_size_mb", "must be at least 1"));
        }
        if db.max_readers == 0 {
            return Err(invalid("database.max_readers", "must be at least 1"));
        }
        if db.max_batch_events == 0 {
            return Err(invalid("database.max_batch_events", "must be at least 1"));
        }
        if db.writer_queue == 0 {
            return Err(invalid("database.writer_queue", "must be at least 1"));
        }
        if db.tail_read_chunk == 0 {
            return Err(invalid("database.tail_read_chunk", "must be at least 1"));
        }
        if db.snapshots_kept == 0 {
            return Err(invalid("database.snapshots_kept", "must be at least 1"));
        }
        if self.solo.idempotency_window_ms == 0 {
            return Err(invalid("solo.idempotency_window_ms", "must be at least 1"));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.telemetry.log_level) {
            return Err(invalid("telemetry.log_level", &format!("not a tracing filter: {e}")));
        }
        validate_limits("limits", &self.limits)?;
        for name in self.tenants.keys() {
            crate::control::validate_tenant(name).map_err(|e| invalid(&format!("tenants.{name}"), &e.to_string()))?;
            let limits = self.tenant_limits(name)?;
            validate_limits(&format!("tenants.{name}.limits"), &limits)?;
        }
        Ok(())
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
        Ok(LimitsTable {
            node: self.limits.clone(),
            tenants,
        })
    }

    pub fn log_options(&self, read_only: bool) -> LogOptions {
        let db = &self.database;
        LogOptions {
            store: StoreOptions {
                map_size: db.map_size_mb << 20,
                max_readers: db.max_readers,
                read_only,
            },
            tail_window: db.tail_window_events as usize,
            tail_read_chunk: db.tail_read_chunk as usize,
        }
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
            },
            limits: self.limits_table()?,
            clock: system_clock(),
        })
    }
}

fn validate_limits(path: &str, limits: &TenantLimits) -> Result<(), ConfigError> {
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
        let e = error_of("[limits]\nmax_services = -1\n");
        assert!(e.contains("limits.max_services"), "{e}");
        let e = error_of("[database]\nmap_size_mb = 0\n");
        assert!(e.contains("database.map_size_mb"), "{e}");
        let e = error_of("[limits]\ndefault_memory_mb = 512\n");
        assert!(
            e.contains("limits.default_memory_mb") && e.contains("max_memory_mb"),
            "{e}"
        );
        let e = error_of("this is not toml");
        assert!(e.contains("config"), "{e}");
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
