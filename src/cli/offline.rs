//! The commands that need no node: `serve` (which runs one), `log verify|dump|stats`,
//! `config check`, `token new` and `completions`. They fail with exit code 1.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::CommandFactory as _;

use super::args::{Cli, ConfigCommand, DataDirArg, LogCommand, ServeArgs, TokenCommand};
use crate::config::{Config, LogFormat};
use crate::inspect::{self, DumpFilter};
use crate::log::Store;

pub fn serve(config_path: Option<PathBuf>, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(config_path.as_deref())?;
    if let Some(dir) = args.data_dir {
        config.solo.data_dir = dir;
    }
    if let Some(addr) = args.grpc_addr {
        config.solo.grpc_addr = addr;
    }
    if let Some(addr) = args.http_addr {
        config.solo.http_addr = addr;
    }
    init_tracing(&config);
    ignore_file_size_signal();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listeners = crate::server::Listeners::bind(&config).await?;
        crate::server::run(config, listeners, super::interrupted()).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// A write past the file size limit (`ulimit -f`, systemd's `LimitFSIZE=`) raises SIGXFSZ,
/// whose default kills the process. Ignored, the write fails with EFBIG instead, and the log
/// refuses that batch with an error that names the limit while the node goes on serving.
fn ignore_file_size_signal() {
    // SAFETY: SIG_IGN installs no handler code; it only changes what the kernel does with the
    // signal, before any thread that writes is started.
    #[allow(unsafe_code)]
    let previous = unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    if previous == libc::SIG_ERR {
        tracing::warn!("SIGXFSZ could not be ignored: a write past the file size limit will end the process");
    }
}

pub fn config_check(file: PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    let config = Config::load(Some(&file))?;
    config.limits_table()?;
    config.runtime_options()?;
    if let Some(files) = config.tls_files() {
        crate::tls::TlsSetup::load(&files).map_err(anyhow::Error::msg)?;
    }
    let text = if json {
        serde_json::to_string_pretty(&config.redacted())? + "\n"
    } else {
        toml::to_string_pretty(&config.redacted()).context("cannot print the configuration")?
    };
    printing(|out| {
        write!(out, "{text}")?;
        eprintln!("{}: ok", file.display());
        Ok(ExitCode::SUCCESS)
    })
}

pub fn config(command: ConfigCommand, json: bool) -> anyhow::Result<ExitCode> {
    match command {
        ConfigCommand::Check { file } => config_check(file, json),
    }
}

pub fn token(command: TokenCommand, json: bool) -> anyhow::Result<ExitCode> {
    match command {
        TokenCommand::New => {
            let (token, hash) = crate::api::auth::new_token().context("no randomness for a token")?;
            printing(|out| {
                if json {
                    let document = serde_json::json!({ "token": token, "token_sha256": hash });
                    writeln!(out, "{}", serde_json::to_string_pretty(&document)?)?;
                    return Ok(ExitCode::SUCCESS);
                }
                writeln!(out, "{token}")?;
                eprintln!("Keep the token secret. Put its hash in the config: for the admin, under [security]:");
                eprintln!("  admin_token_sha256 = [\"{hash}\"]");
                eprintln!("or for a tenant, under [tenants.<name>]:");
                eprintln!("  token_sha256 = [\"{hash}\"]");
                Ok(ExitCode::SUCCESS)
            })
        }
    }
}

pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<ExitCode> {
    let mut command = Cli::command();
    // Into memory first: clap_complete panics when a write fails.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "solo", &mut script);
    printing(|out| {
        out.write_all(&script)?;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn log(config_path: Option<PathBuf>, command: LogCommand, json: bool) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path.as_deref())?;
    let open = |dir: DataDirArg| -> anyhow::Result<Store> {
        let path = dir.data_dir.unwrap_or_else(|| config.solo.data_dir.clone());
        Ok(Store::open(&path, &config.log_options(true).store)?)
    };
    match command {
        LogCommand::Verify(dir) => {
            let report = inspect::verify(&open(dir)?, config.settings())?;
            if !json {
                for problem in report.problems.iter().skip(1) {
                    eprintln!("also: {problem}");
                }
            }
            printing(|out| {
                if json {
                    writeln!(out, "{}", serde_json::to_string_pretty(&report.to_json())?)?;
                } else {
                    writeln!(out, "{}", report.summary())?;
                }
                Ok(if report.ok() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            })
        }
        LogCommand::Dump {
            dir,
            from,
            to,
            tenant,
            service_id,
        } => {
            if let Some(to) = to.filter(|&to| to < from) {
                let problem = if to == 0 {
                    "--to 0 is before the first event (seq 1)".to_string()
                } else {
                    format!("--from {from} is after --to {to}")
                };
                super::output::print_error(&format!("{problem}: no event could be printed"));
                return Ok(ExitCode::from(super::Exit::Usage.code()));
            }
            let filter = DumpFilter {
                from,
                to,
                tenant,
                service_id,
            };
            let store = open(dir)?;
            printing(|out| {
                let damaged = inspect::dump(&store, &filter, json, out, &mut std::io::stderr())?;
                Ok(if damaged == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            })
        }
        LogCommand::Stats { dir } => {
            let stats = inspect::stats(&open(dir)?)?;
            printing(|out| {
                if json {
                    writeln!(out, "{}", serde_json::to_string_pretty(&stats)?)?;
                } else {
                    print_stats(out, &stats)?;
                }
                Ok(ExitCode::SUCCESS)
            })
        }
    }
}

/// Stdout for the offline commands, noting whether its reader went away.
struct Stdout {
    out: std::io::StdoutLock<'static>,
    closed: bool,
}

impl Stdout {
    fn note(&mut self, result: &std::io::Result<impl Sized>) {
        self.closed |= matches!(result, Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe);
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let result = self.out.write(buf);
        self.note(&result);
        result
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let result = self.out.flush();
        self.note(&result);
        result
    }
}

/// Runs `command` with stdout. When the reader of stdout goes away (`solo log dump | head`),
/// the command stops quietly with exit code 0, as the client commands do: Rust ignores
/// SIGPIPE, so the write fails with EPIPE where C tools would die of the signal.
fn printing(command: impl FnOnce(&mut Stdout) -> anyhow::Result<ExitCode>) -> anyhow::Result<ExitCode> {
    let mut out = Stdout {
        out: std::io::stdout().lock(),
        closed: false,
    };
    let result = command(&mut out).and_then(|code| {
        out.flush()?;
        Ok(code)
    });
    match result {
        Err(_) if out.closed => Ok(ExitCode::SUCCESS),
        result => result,
    }
}

fn print_stats(out: &mut dyn Write, stats: &inspect::Stats) -> std::io::Result<()> {
    writeln!(out, "node        {}", stats.node_id)?;
    writeln!(out, "head        {}", stats.head)?;
    writeln!(out, "records     {} ({} bytes)", stats.records, stats.record_bytes)?;
    if stats.records > 0 {
        writeln!(
            out,
            "time        {} .. {}",
            crate::event::format_timestamp_ms(stats.first_timestamp_ms),
            crate::event::format_timestamp_ms(stats.last_timestamp_ms)
        )?;
    }
    writeln!(out, "services    {} in {} tenants", stats.services, stats.tenants)?;
    writeln!(out, "blobs       {} ({} bytes)", stats.blobs, stats.blob_bytes)?;
    // The map the data file records: the one a node serving it uses, not this config's.
    writeln!(
        out,
        "file        {} bytes of a {} byte map",
        stats.file_bytes, stats.map_size_bytes
    )?;
    for (seq, bytes) in &stats.snapshots {
        writeln!(out, "snapshot    at seq {seq} ({bytes} bytes)")?;
    }
    writeln!(out, "by kind:")?;
    for (kind, count) in &stats.by_kind {
        writeln!(out, "  {kind:<24}{count}")?;
    }
    Ok(())
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.telemetry.log_level));
    // Logs go to stderr: stdout carries the `solo listening` line for scripts.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.telemetry.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
