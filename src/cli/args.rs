//! Every subcommand and flag of `solo`, with its help text and examples. Parsing only: what a
//! command does lives in the module that runs it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::builder::PossibleValuesParser;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{Arg, Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

use crate::event::EventKind;
use crate::state::Status;

/// The exit codes, as every client command's help lists them.
macro_rules! exit_codes {
    () => {
        "Exit codes:
  0  success
  1  failure: the node refused the request, the call failed, a file could not be read
  2  usage error: bad flags or arguments
  3  not found: no such service (another tenant's services do not exist for you)
  4  unauthenticated or forbidden: missing or wrong token or client certificate, or an admin-only request
  5  unavailable: the node cannot be reached or is shutting down, or the endpoint does not speak gRPC"
    };
}

#[derive(Debug, Parser)]
#[command(
    name = "solo",
    version,
    about = "An event-sourced control plane for sandboxed WebAssembly services",
    long_about = "An event-sourced control plane for sandboxed WebAssembly services.\n\n\
        `solo serve` runs a node. The other commands are its client: they talk gRPC to the node at \
        --endpoint (SOLO_ENDPOINT), except `solo log`, `solo config`, `solo token` and `solo completions`, \
        which work offline.",
    after_help = concat!(
        "Examples:
  solo serve --data-dir ./data
  solo deploy echo examples/services/echo.wat --wait
  echo -n hello | solo call echo
  solo list --status running
  solo events --follow --json
  SOLO_ENDPOINT=https://node:50051 SOLO_TOKEN=solo_... solo status echo --ca-cert ca.pem

Environment: SOLO_ENDPOINT, SOLO_TOKEN, SOLO_TENANT, SOLO_CA_CERT, SOLO_CLIENT_CERT, SOLO_CLIENT_KEY,
SOLO_CONNECT_TIMEOUT_MS (the client commands); SOLO_CONFIG (serve, log); RUST_LOG (serve's log filter,
over [telemetry] log_level); NO_COLOR turns colour off.

",
        exit_codes!()
    )
)]
pub struct Cli {
    /// Configuration file (TOML) of `serve` and `log`; without one, the defaults serve. The
    /// client commands take their connection from flags and SOLO_*, not from it; `backup` reads
    /// its idempotency window, to verify the copy as `log verify` would.
    #[arg(long, global = true, env = "SOLO_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print JSON for programs: one document per command, JSON lines for `events`, `logs` and
    /// `log dump`. A client command's failure is that document (or the last line):
    /// `{"error": {"code", "message", "exit_code", "retryable"}}`, besides the sentence on stderr;
    /// `retryable` is true when the same command may succeed unchanged.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub connection: ConnectionArgs,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses `std::env::args`, exiting with the usage code (2) on bad arguments.
    pub fn parse_args() -> Cli {
        let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        Cli::parse_from_args(&args).unwrap_or_else(|e| {
            // With --json a program reads stdout: it gets the usage error there too, as the
            // document `exit` prints for any other failure.
            if e.use_stderr() && asks_for_json(&args) {
                let error = super::CliError::usage(usage_message(&e));
                let _ = super::output::Output::new(true).json_line(&error.to_json());
            }
            e.exit()
        })
    }

    /// Parses the given arguments (the first is the program name).
    pub fn parse_from_args<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let mut command = Cli::clap_command();
        let matches = command
            .try_get_matches_from_mut(&args)
            .map_err(|e| from_the_environment(e, &mut command, &args))?;
        let mut cli = Cli::from_arg_matches(&matches)?;
        // `log dump --tenant` filters the dump. It shares its name with the global --tenant, so
        // clap hands it SOLO_TENANT too; only a value given on the command line filters.
        if let Command::Log(LogCommand::Dump { tenant, .. }) = &mut cli.command {
            let source = matches
                .subcommand_matches("log")
                .and_then(|m| m.subcommand_matches("dump"))
                .and_then(|m| m.value_source("tenant"));
            if source != Some(ValueSource::CommandLine) {
                *tenant = None;
            }
        }
        Ok(cli)
    }
}

/// The global flags and the commands they mean something to. They are accepted anywhere on
/// the command line (`solo --endpoint URL status x`), but each command's help shows only its own.
const CONNECTION_FLAGS: [&str; 7] = [
    "endpoint",
    "token",
    "tenant",
    "ca_cert",
    "client_cert",
    "client_key",
    "connect_timeout_ms",
];

impl Cli {
    /// The command line as parsed and as its help shows it: the global flags are hidden from
    /// the commands they do nothing for (the connection flags from the offline commands, `--json`
    /// from `serve` and `completions`, `--config` from all but `serve`, `log` and `backup`, which
    /// verifies its copy under the config's idempotency window).
    pub fn clap_command() -> clap::Command {
        let mut command = Cli::command();
        let hidden = |command: &clap::Command, ids: &[&str]| -> Vec<Arg> {
            command
                .get_arguments()
                .filter(|arg| ids.contains(&arg.get_id().as_str()))
                .map(|arg| arg.clone().hide(true))
                .collect()
        };
        let connection = hidden(&command, &CONNECTION_FLAGS);
        let json = hidden(&command, &["json"]);
        let config = hidden(&command, &["config"]);
        let offline: [(&str, &[&[Arg]]); 5] = [
            ("serve", &[&connection, &json]),
            ("log", &[&connection]),
            ("config", &[&connection, &config]),
            ("token", &[&connection, &config]),
            ("completions", &[&connection, &json, &config]),
        ];
        let names: Vec<String> = command.get_subcommands().map(|c| c.get_name().to_string()).collect();
        for name in names {
            let flags: Vec<Arg> = match offline.iter().find(|(n, _)| *n == name) {
                Some((_, groups)) => groups.iter().flat_map(|g| g.iter().cloned()).collect(),
                None if name == "backup" => Vec::new(),
                None => config.clone(),
            };
            command = command.mut_subcommand(name, |sub| sub.args(flags));
        }
        command
    }
}

/// Whether the command line asks for JSON: `--json` before any `--`.
fn asks_for_json(args: &[std::ffi::OsString]) -> bool {
    args.iter()
        .skip(1)
        .take_while(|arg| *arg != "--")
        .any(|arg| arg == "--json")
}

/// The sentence of a clap error on one line (the arguments it lists below it too), without
/// its `error: ` lead, usage and tips.
fn usage_message(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let sentence: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let sentence = sentence.join(" ");
    sentence.strip_prefix("error: ").unwrap_or(&sentence).to_string()
}

/// A bad value clap found in an environment variable (`SOLO_CONNECT_TIMEOUT_MS=abc`) is
/// reported naming the variable, not the flag the command line did not hold.
fn from_the_environment(error: clap::Error, command: &mut clap::Command, args: &[std::ffi::OsString]) -> clap::Error {
    if !matches!(error.kind(), ErrorKind::InvalidValue | ErrorKind::ValueValidation) {
        return error;
    }
    let Some(ContextValue::String(invalid)) = error.get(ContextKind::InvalidArg) else {
        return error;
    };
    let flag = invalid.split_whitespace().next().unwrap_or_default().to_string();
    let Some(variable) = command
        .get_arguments()
        .find(|arg| arg.get_long().is_some_and(|long| format!("--{long}") == flag))
        .and_then(Arg::get_env)
        .map(|v| v.to_string_lossy().into_owned())
    else {
        return error;
    };
    let on_the_command_line = args.iter().skip(1).any(|arg| {
        arg.to_str()
            .is_some_and(|arg| arg == flag || arg.starts_with(&format!("{flag}=")))
    });
    if on_the_command_line {
        return error;
    }
    let message = usage_message(&error).replacen(&format!("for '{invalid}'"), &format!("for {variable} ({flag})"), 1);
    command.error(error.kind(), message)
}

/// The endpoint of client commands without --endpoint or SOLO_ENDPOINT.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:50051";

/// An endpoint: `http://` or `https://`, or a bare `host:port`.
fn parse_endpoint(text: &str) -> Result<String, String> {
    match text.trim().split_once("://") {
        Some((scheme, _)) if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") => {
            Err(format!("the scheme must be http:// or https://, not {scheme}://"))
        }
        _ => Ok(text.to_string()),
    }
}

/// Where the node is and who is asking: shared by every client command.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection")]
pub struct ConnectionArgs {
    /// The node's gRPC address: http://HOST:PORT, or https://HOST:PORT with --ca-cert.
    #[arg(
        long,
        global = true,
        env = "SOLO_ENDPOINT",
        default_value = DEFAULT_ENDPOINT,
        value_name = "URL",
        value_parser = parse_endpoint
    )]
    pub endpoint: String,
    /// Bearer token (`solo token new` makes one); sent as `authorization: Bearer <token>`.
    #[arg(
        long,
        global = true,
        env = "SOLO_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Tenant to act as (development mode), or, for the admin, the tenant to act for; a blank
    /// one is refused, never taken for the admin.
    #[arg(long, global = true, env = "SOLO_TENANT", value_name = "TENANT")]
    pub tenant: Option<String>,
    /// PEM certificate of the CA that signed the node's certificate (for https endpoints).
    #[arg(long, global = true, env = "SOLO_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate, for nodes that name the tenant by certificate (with --client-key).
    #[arg(long, global = true, env = "SOLO_CLIENT_CERT", value_name = "FILE")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, global = true, env = "SOLO_CLIENT_KEY", value_name = "FILE")]
    pub client_key: Option<PathBuf>,
    /// How long to wait for the node to answer a connection, in milliseconds: the TCP connect,
    /// the TLS handshake and the node's first bytes.
    #[arg(
        long,
        global = true,
        env = "SOLO_CONNECT_TIMEOUT_MS",
        default_value_t = 5000,
        value_name = "MS",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub connect_timeout_ms: u64,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node.
    #[command(after_help = "Examples:
  solo serve
  solo serve --data-dir /var/lib/solo --grpc-addr 127.0.0.1:50051 --http-addr 127.0.0.1:8080
  solo serve --config solo.toml

Once it listens, it prints one line for scripts: solo listening grpc=ADDR http=ADDR")]
    Serve(ServeArgs),
    /// Deploy a module (.wasm or .wat) to a service: the first version, or an upgrade.
    #[command(after_help = concat!("Examples:
  solo deploy echo examples/services/echo.wat
  solo deploy echo echo.wasm --memory-mb 16 --call-timeout-ms 2000 --label team=search --wait
  solo deploy echo echo.wasm --idempotency-key deploy-42 --json
  cat echo.wasm | solo deploy echo -

", exit_codes!()))]
    Deploy(DeployArgs),
    /// List services, with filters.
    #[command(after_help = concat!("Examples:
  solo list
  solo list --status crashed
  solo list --label team=search --json
  solo list --token $ADMIN_TOKEN --tenant acme

", exit_codes!()))]
    List(ListArgs),
    /// Show one service, with live figures.
    #[command(after_help = concat!("Examples:
  solo status echo
  solo status echo --json

", exit_codes!()))]
    Status(StatusArgs),
    /// Call a service: the request from --data, --file or stdin, the response bytes to stdout.
    #[command(after_help = concat!("Examples:
  solo call echo --data hello
  solo call echo --file request.bin > response.bin
  printf 'ping' | solo call echo
  solo call counter --timeout-ms 500

", exit_codes!()))]
    Call(CallArgs),
    /// Stop a service, gracefully (it may finish within the grace) or at once (--force).
    #[command(after_help = concat!("Examples:
  solo kill echo
  solo kill echo --grace-ms 2000 --wait
  solo kill echo --force

With --json: {service_id, seq, already_stopped, replayed, status, stopped}; status is
`stopping` after a kill just recorded, what the service is at now if one was recorded
before (or the answer is a replay), and `stopped` once --wait has seen it stop.

", exit_codes!()))]
    Kill(KillArgs),
    /// Remove a stopped service from the registry (kill it first): its id is free again, and
    /// a deploy to it starts over at version 1. Its history stays in the log.
    #[command(after_help = concat!("Examples:
  solo kill echo --wait && solo remove echo
  solo remove echo --expected-version 3

", exit_codes!()))]
    Remove(RemoveArgs),
    /// Print a service's log lines; with --follow, new ones as they are written.
    #[command(after_help = concat!("Examples:
  solo logs echo
  solo logs echo --follow
  solo logs echo --from 100 --json

--follow survives a dropped connection or a node restart: it reconnects and carries on after the \
last line it printed. It ends on Ctrl-C, or (exit 0) after the last line once the service is down \
for good (stopped, crashed past its restart policy, failed) or removed.

", exit_codes!()))]
    Logs(LogsArgs),
    /// Print the events of the log you may see; with --follow, new ones as they are committed.
    #[command(after_help = concat!("Examples:
  solo events                                  # the whole history, then exit
  solo events --from 120 --service echo
  solo events --kind service_crashed,service_stopped
  solo events --follow --json                  # new events, as JSON lines, until Ctrl-C

Without --follow, `events` prints history from --from (default 1) up to the head of the log, then \
exits. With --follow and no --from it prints what comes after the head: new events only. --follow survives a dropped connection or \
a node restart: it reconnects and resumes after the last seq it saw, without a gap or a repeat.

", exit_codes!()))]
    Events(EventsArgs),
    /// Shut the node down (admin only); its services come back when it starts again.
    #[command(after_help = concat!("Examples:
  solo shutdown
  solo shutdown --grace-ms 30000 --token $ADMIN_TOKEN

", exit_codes!()))]
    Shutdown(ShutdownArgs),
    /// Back the node up into a directory (admin only): a copy of its data file as of one moment,
    /// checked against the node's SHA-256 and verified before it is kept.
    #[command(after_help = concat!("Examples:
  solo backup /backups/solo-$(date +%F) --token $ADMIN_TOKEN

The directory is made if missing and must hold no data file. The copy takes the name data.mdb \
there only once it is whole, durable and verified (as `solo log verify` would, under --config's \
idempotency window); otherwise nothing is kept. To restore, stop the node and start one on the \
directory: solo serve --data-dir /backups/solo-...

", exit_codes!()))]
    Backup(BackupArgs),
    /// Read a data directory offline (works while a server runs).
    #[command(
        subcommand,
        after_help = "Examples:
  solo log verify --data-dir ./data
  solo log dump --from 100 --service echo --json
  solo log stats"
    )]
    Log(LogCommand),
    /// Configuration tools.
    #[command(
        subcommand,
        after_help = "Examples:
  solo config check solo.toml"
    )]
    Config(ConfigCommand),
    /// Token tools.
    #[command(
        subcommand,
        after_help = "Examples:
  solo token new"
    )]
    Token(TokenCommand),
    /// Print a shell completion script.
    #[command(after_help = "Examples:
  solo completions bash > /etc/bash_completion.d/solo
  solo completions zsh > \"${fpath[1]}/_solo\"
  solo completions fish > ~/.config/fish/completions/solo.fish")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a fresh random token, and the config line that holds its hash.
    #[command(after_help = "Examples:
  solo token new > admin.token")]
    New,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data directory [config: solo.data_dir, default ./data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// gRPC listen address; port 0 picks a free port [config: solo.grpc_addr].
    #[arg(long, value_name = "IP:PORT")]
    pub grpc_addr: Option<std::net::SocketAddr>,
    /// HTTP listen address; port 0 picks a free port [config: solo.http_addr].
    #[arg(long, value_name = "IP:PORT")]
    pub http_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
pub struct DataDirArg {
    /// Data directory [config: solo.data_dir, default ./data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Check every record, blob and snapshot; exit 1 naming the first bad seq.
    #[command(after_help = "Examples:
  solo log verify --data-dir ./data")]
    Verify(DataDirArg),
    /// Print events, one per line; with --json, JSON lines: {seq, timestamp_ms, tenant,
    /// service_id, actor, kind, ...fields}.
    #[command(after_help = "Examples:
  solo log dump
  solo log dump --from 100 --to 200 --tenant acme --service echo --json")]
    Dump {
        #[command(flatten)]
        dir: DataDirArg,
        /// First seq to print (at most one past the log's head: what comes next).
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
    },
    /// Counts by kind, sizes, head and snapshots.
    #[command(after_help = "Examples:
  solo log stats --data-dir ./data --json")]
    Stats {
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Copy the data file as of one moment into another directory, compacted, and verify the
    /// copy: a backup a node can be started on. Works while a server runs.
    #[command(after_help = "Examples:
  solo log backup --data-dir ./data /backups/solo-$(date +%F)

To restore, stop the node and start it on the backup: solo serve --data-dir /backups/solo-...
(or move the backup's data.mdb into an empty data directory). The node then holds what the log
held when the backup was taken, and brings back the services running then.")]
    Backup {
        #[command(flatten)]
        dir: DataDirArg,
        /// Directory to write the backup in, made if missing; it must hold no data file.
        #[arg(value_name = "DEST")]
        dest: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file and print the effective configuration.
    #[command(after_help = "Examples:
  solo config check solo.toml")]
    Check {
        /// The file to check.
        file: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The service id.
    #[arg(value_parser = parse_service_id)]
    pub service_id: String,
    /// The module: a wasm binary or WAT text (`-` reads stdin).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Maximum linear memory, in MiB (default: the node's).
    #[arg(long, value_name = "MIB")]
    pub memory_mb: Option<u64>,
    /// Wall-clock limit of one call, in milliseconds (default: the node's).
    #[arg(long, value_name = "MS")]
    pub call_timeout_ms: Option<u32>,
    /// CPU limit of one call, in milliseconds (default: the node's).
    #[arg(long, value_name = "MS")]
    pub cpu_ms: Option<u32>,
    /// Calls that may wait in the service's mailbox (default: the node's).
    #[arg(long, value_name = "N")]
    pub mailbox: Option<u32>,
    /// Restarts allowed within --restart-window-ms before the service counts as crashed.
    #[arg(long, value_name = "N")]
    pub max_restarts: Option<u32>,
    /// The window of --max-restarts, in milliseconds: at least the node's (its [limits]
    /// restart_window_ms, 60000 by default); a longer window only makes the policy stricter.
    #[arg(long, value_name = "MS")]
    pub restart_window_ms: Option<u32>,
    /// A label, KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// A retry with the same key gets the first answer and changes nothing.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Deploy only if the service is at this version now (0: only if it does not exist yet).
    #[arg(long, value_name = "VERSION")]
    pub expected_version: Option<u64>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// Labels given as repeated `--label KEY=VALUE`, by key. A key given twice is a usage error
/// rather than its last value silently kept: a service has one value a key (the node refuses
/// the same over REST), and a listing that must match both values matches nothing.
pub fn labels_by_key(labels: &[(String, String)]) -> Result<BTreeMap<String, String>, crate::cli::CliError> {
    let mut by_key = BTreeMap::new();
    for (key, value) in labels {
        if by_key.insert(key.clone(), value.clone()).is_some() {
            return Err(crate::cli::CliError::usage(format!(
                "--label {key} is given more than once; a label has one value"
            )));
        }
    }
    Ok(by_key)
}

/// Waiting for the outcome of a deploy or a kill.
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Wait until the service runs (deploy) or has stopped (kill, also one already stopping);
    /// exit 1 if it fails instead.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, in milliseconds (at least 1: no wait at all is no --wait).
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 60_000,
        requires = "wait",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub wait_timeout_ms: u64,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only services with this status.
    #[arg(long, value_parser = PossibleValuesParser::new(Status::ALL.map(Status::as_str)))]
    pub status: Option<String>,
    /// Only services carrying this label, KEY=VALUE (repeatable: all must match).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Services per request; `list` always pages through all of them.
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub page_size: u32,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The service id.
    #[arg(value_parser = parse_service_id)]
    pub service_id: String,
}

#[derive(Debug, Args)]
pub struct CallArgs {
    /// The service id.
    #[arg(value_parser = parse_service_id)]
    pub service_id: String,
    /// The request, as given (otherwise --file, otherwise stdin unless it is a terminal).
    #[arg(long, short = 'd', value_name = "STRING", conflicts_with = "file")]
    pub data: Option<String>,
    /// Read the request from FILE (`-` for stdin).
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Time limit of the call, in milliseconds; capped by the service's own.
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<u32>,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    /// The service id.
    #[arg(value_parser = parse_service_id)]
    pub service_id: String,
    /// Stop at once, without solo_stop or the queued calls.
    #[arg(long)]
    pub force: bool,
    /// How long solo_stop and queued calls may take (default: the node's shutdown_grace_ms).
    #[arg(long, value_name = "MS")]
    pub grace_ms: Option<u32>,
    /// A retry with the same key gets the first answer and changes nothing.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Kill only if the service is at this version now.
    #[arg(long, value_name = "VERSION")]
    pub expected_version: Option<u64>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// The service id.
    #[arg(value_parser = parse_service_id)]
    pub service_id: String,
    /// A retry with the same key gets the first answer and changes nothing.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Remove only if the service is at this version now.
    #[arg(long, value_name = "VERSION")]
    pub expected_version: Option<u64>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The service id.
    #[arg(value_parser = parse_service_id)]
    pub service_id: String,
    /// Keep printing new lines until Ctrl-C.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// First line to print, by its seq (default: every line the node still holds).
    #[arg(long, value_name = "SEQ")]
    pub from: Option<u64>,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// First seq to print (default: 1; with --follow, the first after the head).
    #[arg(long, value_name = "SEQ")]
    pub from: Option<u64>,
    /// Only this service's events.
    #[arg(long = "service", value_name = "ID")]
    pub service_id: Option<String>,
    /// Only these kinds (repeatable, or comma-separated).
    #[arg(
        long = "kind",
        value_name = "KIND",
        num_args = 1..,
        value_delimiter = ',',
        value_parser = PossibleValuesParser::new(EventKind::ALL.map(EventKind::as_str)),
    )]
    pub kinds: Vec<String>,
    /// Keep printing new events until Ctrl-C.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Directory to write the backup in, made if missing; it must hold no data file.
    #[arg(value_name = "DEST")]
    pub dest: PathBuf,
}

#[derive(Debug, Args)]
pub struct ShutdownArgs {
    /// How long calls in flight and services may take to stop (default: the node's).
    #[arg(long, value_name = "MS")]
    pub grace_ms: Option<u32>,
}

/// `KEY=VALUE`, with a non-empty key.
/// A service id the node could hold, checked here so that a typo is a usage error (exit 2)
/// found before any connection.
fn parse_service_id(text: &str) -> Result<String, String> {
    crate::control::validate_service_id(text).map_err(|e| e.to_string())?;
    Ok(text.to_string())
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_string(), value.to_string())),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::clap_command().debug_assert();
    }

    #[test]
    fn endpoints_are_http_or_https() {
        assert!(parse_endpoint("http://h:1").is_ok() && parse_endpoint("HTTPS://h:1").is_ok());
        assert!(parse_endpoint("h:1").is_ok(), "a bare host:port gets its scheme later");
        assert!(parse_endpoint("ftp://h").unwrap_err().contains("ftp://"));
    }

    #[test]
    fn a_label_key_given_twice_is_a_usage_error() {
        let labels = [("team".to_string(), "red".to_string()), ("tier".into(), "1".into())];
        assert_eq!(labels_by_key(&labels).unwrap().len(), 2);
        let twice = [("team".to_string(), "red".to_string()), ("team".into(), "blue".into())];
        let error = labels_by_key(&twice).unwrap_err();
        assert_eq!(error.exit, crate::cli::Exit::Usage);
        assert!(
            error.message.contains("--label team is given more than once"),
            "{error}"
        );
    }

    #[test]
    fn a_wait_of_no_time_is_a_usage_error() {
        let wait = |ms: &str| Cli::parse_from_args(["solo", "kill", "x", "--wait", "--wait-timeout-ms", ms]);
        assert!(wait("1").is_ok());
        let refused = wait("0").unwrap_err();
        assert_eq!(refused.kind(), clap::error::ErrorKind::ValueValidation, "{refused}");
    }

    #[test]
    fn labels_parse() {
        assert_eq!(parse_label("team=x=y"), Ok(("team".into(), "x=y".into())));
        assert_eq!(parse_label("k="), Ok(("k".into(), String::new())));
        assert!(parse_label("=v").is_err() && parse_label("kv").is_err());
    }

    #[test]
    fn global_flags_go_anywhere_and_dump_keeps_its_tenant() {
        let cli = Cli::parse_from_args(["solo", "list", "--endpoint", "http://h:1", "--json"]).unwrap();
        assert_eq!(cli.connection.endpoint, "http://h:1");
        assert!(cli.json);
        let cli = Cli::parse_from_args(["solo", "--tenant", "acme", "status", "x"]).unwrap();
        assert_eq!(cli.connection.tenant.as_deref(), Some("acme"));
        let cli = Cli::parse_from_args(["solo", "log", "dump", "--tenant", "beta"]).unwrap();
        let Command::Log(LogCommand::Dump { tenant, .. }) = cli.command else {
            panic!()
        };
        assert_eq!(tenant.as_deref(), Some("beta"));
    }

    #[test]
    fn kinds_split_on_commas_and_unknown_ones_are_usage_errors() {
        let cli = Cli::parse_from_args(["solo", "events", "--kind", "service_started,service_stopped"]).unwrap();
        let Command::Events(args) = cli.command else { panic!() };
        assert_eq!(args.kinds, ["service_started", "service_stopped"]);
        let err = Cli::parse_from_args(["solo", "events", "--kind", "nope"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
