//! The `solo` command line: a client of a node's gRPC API for operators and agents (deploy,
//! list, status, call, kill, logs, events, shutdown), beside the commands that need no node
//! (serve, log, config, token, completions).
//!
//! [`args`] parses; [`connect`] reaches the node; [`services`] and [`follow`] run the
//! commands; [`output`] prints tables or JSON; [`error`] turns failures into one sentence and
//! an exit code. Nothing here decides anything about services: the node does.

pub mod args;
mod connect;
mod error;
mod follow;
mod offline;
pub mod output;
mod services;
mod spinner;

use std::process::ExitCode;

pub use args::Cli;
use args::Command;
pub use error::{CliError, Exit};

/// Runs a parsed command line and returns the process's exit code.
pub fn run(cli: Cli) -> ExitCode {
    let Cli {
        config,
        connection,
        json,
        command,
    } = cli;
    let offline = match command {
        Command::Serve(args) => offline::serve(config, args),
        Command::Log(command) => offline::log(config, command, json),
        Command::Config(command) => offline::config(command, json),
        Command::Token(command) => offline::token(command, json),
        Command::Completions { shell } => offline::completions(shell),
        client => return exit(run_client(&connection, config.as_deref(), json, client), json),
    };
    offline.unwrap_or_else(|e| {
        output::print_error(&offline_error(&e));
        ExitCode::FAILURE
    })
}

/// An offline command's error and its causes, each said once: a storage error's message
/// already quotes the LMDB error that is also its source.
fn offline_error(error: &anyhow::Error) -> String {
    let error: &(dyn std::error::Error + 'static) = error.as_ref();
    error::causes(error)
}

/// Runs a client command on a small runtime of its own.
fn run_client(
    connection: &args::ConnectionArgs,
    config: Option<&std::path::Path>,
    json: bool,
    command: Command,
) -> Result<(), CliError> {
    let conn = connect::Connector::new(connection)?;
    let out = output::Output::new(json);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failure(format!("cannot start the client runtime: {e}")))?;
    runtime.block_on(async {
        match command {
            Command::Deploy(args) => services::deploy(&conn, out, args).await,
            Command::List(args) => services::list(&conn, out, args).await,
            Command::Status(args) => services::status(&conn, out, args).await,
            Command::Call(args) => services::call(&conn, out, args).await,
            Command::Kill(args) => services::kill(&conn, out, args).await,
            Command::Remove(args) => services::remove(&conn, out, args).await,
            Command::Shutdown(args) => services::shutdown(&conn, out, args).await,
            Command::Backup(args) => services::backup(&conn, out, args, config).await,
            Command::Logs(args) => follow::logs(&conn, out, args).await,
            Command::Events(args) => follow::events(&conn, out, args).await,
            Command::Serve(_)
            | Command::Log(_)
            | Command::Config(_)
            | Command::Token(_)
            | Command::Completions { .. } => Err(CliError::usage("not a client command")),
        }
    })
}

/// The exit code of a client command, its error (if any) on stderr, and with `--json` also
/// on stdout as the command's document.
fn exit(result: Result<(), CliError>, json: bool) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if !error.message.is_empty() {
                if json && !output::Output::document_printed() {
                    // Best effort: a stdout that cannot take it still has stderr's copy.
                    let _ = output::Output::new(true).json_line(&error.to_json());
                }
                output::print_error(&error.message);
            }
            ExitCode::from(error.exit.code())
        }
    }
}

/// Resolves on SIGINT, SIGTERM or SIGHUP (never, for a signal that cannot be watched): what
/// stops `serve` gracefully and ends a followed stream. A hangup (the terminal `serve` runs in
/// went away) would otherwise kill the node on the spot, as a `kill -9` does: Solo reloads no
/// configuration on it, so it stops cleanly instead, and its services come back with the next
/// start. The signals are watched from the call on, not from the first poll: one that came
/// between (as a node still starts up) would take its default action and kill the process.
/// Called within a runtime.
#[cfg(unix)]
fn interrupted() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    async fn received(signal: Option<Signal>) {
        match signal {
            Some(mut signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    let watch = |kind| signal(kind).ok();
    let (interrupt, terminate, hangup) = (
        watch(SignalKind::interrupt()),
        watch(SignalKind::terminate()),
        watch(SignalKind::hangup()),
    );
    async move {
        tokio::select! {
            () = received(interrupt) => {}
            () = received(terminate) => {}
            () = received(hangup) => {
                tracing::warn!("SIGHUP: stopping as for SIGTERM (a hangup reloads nothing)");
            }
        }
    }
}

#[cfg(not(unix))]
fn interrupted() -> impl std::future::Future<Output = ()> {
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_lmdb_error_is_said_once() {
        let error = anyhow::Error::from(crate::log::Error::Lmdb {
            path: "/data".into(),
            source: heed::Error::Mdb(heed::MdbError::PageNotFound),
        });
        let text = offline_error(&error);
        assert!(text.starts_with("LMDB error on /data: MDB_PAGE_NOTFOUND"), "{text}");
        assert_eq!(text.matches("MDB_PAGE_NOTFOUND").count(), 1, "{text}");
        let io = anyhow::Error::from(std::io::Error::other("disk on fire")).context("cannot print");
        assert_eq!(offline_error(&io), "cannot print: disk on fire");
    }
}
