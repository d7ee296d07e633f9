//! The `solo` command: parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use solo::config::{Config, LogFormat};
use solo::inspect::{self, DumpFilter};
use solo::log::Store;

#[derive(Parser)]
#[command(
    name = "solo",
    version,
    about = "An event-sourced control plane for sandboxed WebAssembly services"
)]
struct Cli {
    /// Configuration file (TOML); without one, the defaults serve.
    #[arg(long, global = true, env = "SOLO_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Serve(ServeArgs),
    /// Read a data directory offline (works while a server runs).
    #[command(subcommand)]
    Log(LogCommand),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Token tools.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a fresh random token, and the config line that holds its hash.
    New,
}

#[derive(Args)]
struct ServeArgs {
    /// Data directory [config: solo.data_dir, default ./data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC listen address; port 0 picks a free port [config: solo.grpc_addr].
    #[arg(long, value_name = "HOST:PORT")]
    grpc_addr: Option<std::net::SocketAddr>,
    /// HTTP listen address; port 0 picks a free port [config: solo.http_addr].
    #[arg(long, value_name = "HOST:PORT")]
    http_addr: Option<std::net::SocketAddr>,
}

#[derive(Args)]
struct DataDirArg {
    /// Data directory [config: solo.data_dir, default ./data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum LogCommand {
    /// Check every record, blob and snapshot; exit 1 naming the first bad seq.
    Verify(DataDirArg),
    /// Print events, one per line.
    Dump {
        #[command(flatten)]
        dir: DataDirArg,
        /// First seq to print.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Last seq to print.
        #[arg(long)]
        to: Option<u64>,
        /// Only this tenant's events.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this service's events.
        #[arg(long = "service")]
        service_id: Option<String>,
        /// JSON lines: {seq, timestamp_ms, tenant, service_id, actor, kind, ...fields}.
        #[arg(long)]
        json: bool,
    },
    /// Counts by kind, sizes, head and snapshots.
    Stats {
        #[command(flatten)]
        dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file and print the effective configuration.
    Check {
        /// The file to check.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve(cli.config, args),
        Command::Log(command) => {
            let config = Config::load(cli.config.as_deref())?;
            log_command(&config, command)
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let config = Config::load(Some(&file))?;
            config.limits_table()?;
            config.runtime_options()?;
            if let Some(files) = config.tls_files() {
                solo::tls::TlsSetup::load(&files).map_err(anyhow::Error::msg)?;
            }
            let text = toml::to_string_pretty(&config.redacted()).context("cannot print the configuration")?;
            print!("{text}");
            eprintln!("{}: ok", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::New) => {
            let (token, hash) = solo::api::auth::new_token().context("no randomness for a token")?;
            println!("{token}");
            eprintln!("Keep the token secret. Put its hash in the config: for the admin, under [security]:");
            eprintln!("  admin_token_sha256 = [\"{hash}\"]");
            eprintln!("or for a tenant, under [tenants.<name>]:");
            eprintln!("  token_sha256 = [\"{hash}\"]");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn serve(config_path: Option<PathBuf>, args: ServeArgs) -> anyhow::Result<ExitCode> {
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
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listeners = solo::server::Listeners::bind(&config).await?;
        solo::server::run(config, listeners, shutdown_signal()).await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn log_command(config: &Config, command: LogCommand) -> anyhow::Result<ExitCode> {
    let open = |dir: DataDirArg| -> anyhow::Result<Store> {
        let path = dir.data_dir.unwrap_or_else(|| config.solo.data_dir.clone());
        Ok(Store::open(&path, &config.log_options(true).store)?)
    };
    match command {
        LogCommand::Verify(dir) => {
            let report = inspect::verify(&open(dir)?, config.settings())?;
            for problem in report.problems.iter().skip(1) {
                eprintln!("also: {problem}");
            }
            println!("{}", report.summary());
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        LogCommand::Dump {
            dir,
            from,
            to,
            tenant,
            service_id,
            json,
        } => {
            let filter = DumpFilter {
                from,
                to,
                tenant,
                service_id,
            };
            let stdout = std::io::stdout();
            let damaged = inspect::dump(&open(dir)?, &filter, json, &mut stdout.lock(), &mut std::io::stderr())?;
            Ok(if damaged == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        LogCommand::Stats { dir, json } => {
            let stats = inspect::stats(&open(dir)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print_stats(&stats);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_stats(stats: &inspect::Stats) {
    println!("node        {}", stats.node_id);
    println!("head        {}", stats.head);
    println!("records     {} ({} bytes)", stats.records, stats.record_bytes);
    if stats.records > 0 {
        println!(
            "time        {} .. {}",
            solo::event::format_timestamp_ms(stats.first_timestamp_ms),
            solo::event::format_timestamp_ms(stats.last_timestamp_ms)
        );
    }
    println!("services    {} in {} tenants", stats.services, stats.tenants);
    println!("blobs       {} ({} bytes)", stats.blobs, stats.blob_bytes);
    println!(
        "file        {} bytes of a {} byte map",
        stats.file_bytes, stats.map_size_bytes
    );
    for (seq, bytes) in &stats.snapshots {
        println!("snapshot    at seq {seq} ({bytes} bytes)");
    }
    println!("by kind:");
    for (kind, count) in &stats.by_kind {
        println!("  {kind:<24}{count}");
    }
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

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
