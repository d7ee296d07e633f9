//! The commands that need no node: `serve` (which runs one), `log verify|dump|stats`,
//! `config check`, `token new` and `completions`. They fail with exit code 1.

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
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listeners = crate::server::Listeners::bind(&config).await?;
        crate::server::run(config, listeners, super::interrupted()).await
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn config_check(file: PathBuf) -> anyhow::Result<ExitCode> {
    let config = Config::load(Some(&file))?;
    config.limits_table()?;
    config.runtime_options()?;
    if let Some(files) = config.tls_files() {
        crate::tls::TlsSetup::load(&files).map_err(anyhow::Error::msg)?;
    }
    let text = toml::to_string_pretty(&config.redacted()).context("cannot print the configuration")?;
    print!("{text}");
    eprintln!("{}: ok", file.display());
    Ok(ExitCode::SUCCESS)
}

pub fn config(command: ConfigCommand) -> anyhow::Result<ExitCode> {
    match command {
        ConfigCommand::Check { file } => config_check(file),
    }
}

pub fn token(command: TokenCommand) -> anyhow::Result<ExitCode> {
    match command {
        TokenCommand::New => {
            let (token, hash) = crate::api::auth::new_token().context("no randomness for a token")?;
            println!("{token}");
            eprintln!("Keep the token secret. Put its hash in the config: for the admin, under [security]:");
            eprintln!("  admin_token_sha256 = [\"{hash}\"]");
            eprintln!("or for a tenant, under [tenants.<name>]:");
            eprintln!("  token_sha256 = [\"{hash}\"]");
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<ExitCode> {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "solo", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

pub fn log(config_path: Option<PathBuf>, command: LogCommand) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path.as_deref())?;
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
            crate::event::format_timestamp_ms(stats.first_timestamp_ms),
            crate::event::format_timestamp_ms(stats.last_timestamp_ms)
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
