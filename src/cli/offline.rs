//! The commands that need no node: `serve` (which runs one), `log verify|dump|stats|backup`,
//! `config check`, `token new` and `completions`. They fail with exit code 1.
//!
//! The `log` tools only read the data directory (`backup` writes its copy elsewhere). They open
//! the data file read-only, and without LMDB's lock file when they may not write the directory;
//! they create nothing in a directory that holds no log; and damage, even the kind that crashes
//! LMDB, is reported as damage.

use std::io::{IsTerminal as _, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;

use super::args::{Cli, ConfigCommand, LogCommand, ServeArgs, TokenCommand};
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
    init_tracing(&config)?;
    ignore_file_size_signal();
    let json_log = config.telemetry.log_format == LogFormat::Json;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let served = runtime.block_on(async {
        let listeners = crate::server::Listeners::bind(&config).await?;
        crate::server::run(config, listeners, super::interrupted()).await
    });
    // The node has stopped, its log durable. A compile still under way cannot be cancelled,
    // and dropping the runtime would wait for it: the process exits without it.
    runtime.shutdown_timeout(LEFTOVER_WORK_WAIT);
    match served {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // A JSON log's reader takes every line as JSON: why the node stopped is one too.
        Err(e) if json_log => {
            tracing::error!(error = %super::offline_error(&e), "the node cannot serve");
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e),
    }
}

/// How long a stopped node's process waits for work that outlived the node (a compile) before
/// it exits without it.
const LEFTOVER_WORK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

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
    // Reserved as `serve` would: whether this machine can map the instance pool.
    crate::runtime::build_engine(&config.runtime_options()?.engine)?;
    if let Some(files) = config.tls_files() {
        crate::tls::TlsSetup::load(&files).map_err(anyhow::Error::msg)?;
    }
    // The tokens, and whether the listeners may leave loopback without any.
    crate::api::Authenticator::new(config.tokens(), &[config.solo.grpc_addr, config.solo.http_addr])
        .map_err(anyhow::Error::msg)?;
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

/// `solo config check`. With `--json`, a configuration refused is a document on stdout too,
/// `{"ok": false, "error"}`, as a failure of the log tools is.
pub fn config(command: ConfigCommand, json: bool) -> anyhow::Result<ExitCode> {
    match command {
        ConfigCommand::Check { file } => config_check(file, json).inspect_err(|error| {
            if json {
                let message = super::error::causes(error.as_ref());
                print_failure(&serde_json::json!({ "ok": false, "error": message }));
            }
        }),
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
    let mut command = Cli::clap_command();
    // Into memory first: clap_complete panics when a write fails.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "solo", &mut script);
    printing(|out| {
        out.write_all(&script)?;
        Ok(ExitCode::SUCCESS)
    })
}

/// `solo log verify|dump|stats|backup`. A failure is printed here, as damage when it is damage,
/// and with `--json` as a document too (not `dump`), so that programs read it as well.
pub fn log(config_path: Option<PathBuf>, command: LogCommand, json: bool) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path.as_deref())?;
    let (dir, one_document) = match &command {
        LogCommand::Verify(dir) | LogCommand::Stats { dir } | LogCommand::Backup { dir, .. } => (dir, json),
        LogCommand::Dump { dir, .. } => (dir, false),
    };
    let path = dir.data_dir.clone().unwrap_or_else(|| config.solo.data_dir.clone());
    report_crashes_as_damage(one_document);
    let error = match read_log(&config, &path, command, json) {
        Ok(code) => return Ok(code),
        Err(error) => error,
    };
    let damaged = is_damage(&error);
    let mut message = super::error::causes(error.as_ref());
    // The store's own word for a damaged file already says so, and what to do.
    let said = error.chain().any(|e| {
        matches!(
            e.downcast_ref::<crate::log::Error>(),
            Some(crate::log::Error::Damaged { .. })
        )
    });
    if damaged && !said {
        message = format!(
            "the data file in {} is damaged: {message}; restore it from a backup",
            path.display()
        );
    }
    super::output::print_error(&message);
    if one_document {
        print_failure(&serde_json::json!({ "ok": false, "damaged": damaged, "error": message }));
    }
    Ok(ExitCode::FAILURE)
}

/// An offline command's failure as its `--json` document on stdout. A reader that went away
/// misses nothing it could act on: the exit code says it.
fn print_failure(document: &serde_json::Value) {
    let _ = printing(|out| {
        writeln!(out, "{}", serde_json::to_string_pretty(document)?)?;
        Ok(ExitCode::FAILURE)
    });
}

fn read_log(config: &Config, path: &Path, command: LogCommand, json: bool) -> anyhow::Result<ExitCode> {
    let (store, unlocked) = open_for_reading(config, path)?;
    if unlocked {
        super::output::note(&format!(
            "{} is not writable: reading it without LMDB's lock file, which is safe only while no node writes to it",
            path.display()
        ));
    }
    match command {
        LogCommand::Verify(_) => {
            let report = inspect::verify(&store, config.settings())?;
            if !json {
                for problem in report.other_problems() {
                    eprintln!("also: {problem}");
                }
            }
            printing(|out| {
                if json {
                    let mut document = report.to_json();
                    document["unlocked"] = unlocked.into();
                    writeln!(out, "{}", serde_json::to_string_pretty(&document)?)?;
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
            dir: _,
            from,
            to,
            tenant,
            service_id,
        } => {
            // The seq after the head is where the next event will be, so `--from` it (what
            // is new since a dump up to the head) prints nothing and is fine; further on, as
            // etcd refuses a future revision, the range cannot be what was meant.
            let head = store.head()?;
            let problem = match to {
                Some(0) => Some("--to 0 is before the first event (seq 1)".to_string()),
                Some(to) if to < from => Some(format!("--from {from} is after --to {to}")),
                _ if from > head.saturating_add(1) => {
                    Some(format!("--from {from} is past the log's head (seq {head})"))
                }
                _ => None,
            };
            if let Some(problem) = problem {
                super::output::print_error(&format!("{problem}: no event could be printed"));
                return Ok(ExitCode::from(super::Exit::Usage.code()));
            }
            let filter = DumpFilter {
                from,
                to,
                tenant,
                service_id,
            };
            printing(|out| {
                let damaged = inspect::dump(&store, &filter, json, out, &mut std::io::stderr())?;
                Ok(if damaged == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            })
        }
        LogCommand::Backup { dir: _, dest } => {
            let options = config.log_options(true).store;
            let backup = inspect::backup(&store, &dest, &options, config.settings())?;
            // What the copy left out: the data file's free pages.
            let source_bytes = std::fs::metadata(path.join(crate::log::DATA_FILE)).map_or(0, |m| m.len());
            let not_kept = format!(
                "no backup kept: the copy of {} does not verify, so the data file is damaged ({}); \
                 solo log verify says where",
                path.display(),
                backup.verified.summary()
            );
            if !backup.kept() {
                super::output::print_error(&not_kept);
            }
            printing(|out| {
                if json {
                    let mut document = serde_json::json!({
                        "ok": backup.kept(),
                        "path": backup.kept().then(|| backup.path.display().to_string()),
                        "bytes": backup.bytes,
                        "source_bytes": source_bytes,
                        "head": backup.verified.head,
                        "unlocked": unlocked,
                        "verify": backup.verified.to_json(),
                    });
                    // As every failure of the log tools reads: damage, and why.
                    if !backup.kept() {
                        document["damaged"] = true.into();
                        document["error"] = not_kept.clone().into();
                    }
                    writeln!(out, "{}", serde_json::to_string_pretty(&document)?)?;
                } else if backup.kept() {
                    writeln!(
                        out,
                        "backed up {} to {} as of seq {}: {} bytes (the data file: {}); the copy verifies: {}",
                        path.display(),
                        backup.path.display(),
                        backup.verified.head,
                        backup.bytes,
                        source_bytes,
                        backup.verified.summary(),
                    )?;
                }
                Ok(if backup.kept() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            })
        }
        LogCommand::Stats { dir: _ } => {
            let stats = inspect::stats(&store)?;
            printing(|out| {
                if json {
                    let mut document = serde_json::to_value(&stats)?;
                    document["unlocked"] = unlocked.into();
                    writeln!(out, "{}", serde_json::to_string_pretty(&document)?)?;
                } else {
                    print_stats(out, &stats)?;
                }
                Ok(ExitCode::SUCCESS)
            })
        }
    }
}

/// LMDB's lock file in a data directory.
const LOCK_FILE: &str = "lock.mdb";

/// Opens a data directory read-only; without LMDB's lock file (`true`) where this process may
/// not write it (a directory of another user, a read-only mount), since LMDB would otherwise
/// refuse, or create the file.
fn open_for_reading(config: &Config, path: &Path) -> anyhow::Result<(Store, bool)> {
    let options = config.log_options(true).store;
    if lock_is_usable(path) {
        Ok((Store::open(path, &options)?, false))
    } else {
        Ok((Store::open_unlocked(path, &options)?, true))
    }
}

/// Whether this process may use LMDB's lock file in `dir`: open the one there, or create it.
fn lock_is_usable(dir: &Path) -> bool {
    use rustix::fs::{Access, access};
    let lock = dir.join(LOCK_FILE);
    if lock.exists() {
        access(&lock, Access::READ_OK | Access::WRITE_OK).is_ok()
    } else {
        access(dir, Access::WRITE_OK | Access::EXEC_OK).is_ok()
    }
}

/// Whether `error` is damage in the data file: LMDB finding a page it cannot find or make
/// sense of, or a record that is corrupt or missing.
fn is_damage(error: &anyhow::Error) -> bool {
    use heed::MdbError;
    let lmdb = |e: &heed::Error| {
        matches!(
            e,
            heed::Error::Mdb(MdbError::PageNotFound | MdbError::Corrupted | MdbError::Panic | MdbError::Incompatible)
        )
    };
    let log = |e: &crate::log::Error| match e {
        crate::log::Error::Lmdb { source, .. } => lmdb(source),
        e => e.is_damage(),
    };
    error.chain().any(|e| {
        e.downcast_ref::<heed::Error>().is_some_and(lmdb)
            || e.downcast_ref::<crate::log::Error>().is_some_and(log)
            // An error the tools pass on as I/O (`dump`) holds the store's.
            || e.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<crate::log::Error>())
                .is_some_and(log)
    })
}

/// What a crash inside LMDB says. LMDB trusts its pages: a damaged B-tree page can send it
/// outside the map (SIGSEGV) or past the file's end (SIGBUS) before any check could refuse it.
const CRASHED: &[u8] = b"error: the data file is damaged: LMDB crashed reading it (SIGSEGV or SIGBUS on a \
damaged page); restore it from a backup\n";

/// [`CRASHED`] as the JSON document of a failed `log` tool.
const CRASHED_JSON: &[u8] = b"{\"ok\": false, \"damaged\": true, \"error\": \"the data file is damaged: LMDB crashed \
reading it (SIGSEGV or SIGBUS on a damaged page); restore it from a backup\"}\n";

static CRASH_AS_JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns a crash of the `log` tools into the one line above and exit code 1 (damage), rather
/// than a silent death by signal. Only these tools: under `serve`, wasmtime handles the same
/// signals for its guests.
/// With `--json`, the same as the document on stdout, where nothing else was written yet (the
/// tools print their document once they are done).
fn report_crashes_as_damage(as_json: bool) {
    CRASH_AS_JSON.store(as_json, std::sync::atomic::Ordering::Relaxed);
    extern "C" fn crashed(_signal: libc::c_int) {
        // SAFETY: write(2) and _exit(2) are async-signal-safe, the messages are static, and an
        // atomic load is a plain load.
        #[allow(unsafe_code)]
        unsafe {
            if CRASH_AS_JSON.load(std::sync::atomic::Ordering::Relaxed) {
                libc::write(1, CRASHED_JSON.as_ptr().cast(), CRASHED_JSON.len());
            }
            libc::write(2, CRASHED.as_ptr().cast(), CRASHED.len());
            libc::_exit(1);
        }
    }
    let handler: extern "C" fn(libc::c_int) = crashed;
    for signal in [libc::SIGSEGV, libc::SIGBUS] {
        // SAFETY: a zeroed sigaction is valid (no flags, an empty mask once set below); the
        // handler only calls async-signal-safe functions. SA_ONSTACK runs it on the alternate
        // stack Rust gives the main thread, should the fault be a stack overflow.
        #[allow(unsafe_code)]
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as libc::sighandler_t;
            action.sa_flags = libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
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

/// The node's log on stderr: coloured only on a terminal, and never with `NO_COLOR`. A
/// `RUST_LOG` that is not a filter, or whose bare words are not levels, is refused, as a bad
/// `[telemetry] log_level` is, rather than silently replaced by the config's or taken for a
/// target ("warning" would log nothing at all).
fn init_tracing(config: &Config) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.trim().is_empty() => {
            crate::config::check_log_level(&value).map_err(|e| {
                anyhow::anyhow!(
                    "RUST_LOG='{value}': {e} (unset it to use [telemetry] log_level = '{}')",
                    config.telemetry.log_level
                )
            })?;
            tracing_subscriber::EnvFilter::new(&value)
        }
        Err(std::env::VarError::NotUnicode(_)) => anyhow::bail!("RUST_LOG is not valid UTF-8"),
        Ok(_) | Err(std::env::VarError::NotPresent) => tracing_subscriber::EnvFilter::new(&config.telemetry.log_level),
    };
    let colour =
        super::output::colour_enabled(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    // Logs go to stderr: stdout carries the `solo listening` line for scripts.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match config.telemetry.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}
