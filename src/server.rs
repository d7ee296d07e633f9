//! Wires a node together: opens the control layer (log, state, writer), binds the listeners,
//! announces them, and shuts down in order when the shutdown future resolves.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::control::Control;

/// The node's listening sockets, bound before anything is served so port 0 resolves early.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
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
pub async fn open_control(config: &Config) -> anyhow::Result<Control> {
    let options = config.control_options()?;
    let data_dir = options.data_dir.clone();
    let (control, recovery) = tokio::task::spawn_blocking(move || Control::open(options))
        .await?
        .with_context(|| format!("cannot open the data directory {}", data_dir.display()))?;
    tracing::info!(
        data_dir = %data_dir.display(),
        head = recovery.head,
        snapshot = ?recovery.snapshot_seq,
        replayed = recovery.replayed,
        skipped = recovery.skipped,
        elapsed_ms = recovery.elapsed.as_millis() as u64,
        "state rebuilt from the log"
    );
    Ok(control)
}

/// Runs a node until `shutdown` resolves.
pub async fn run(config: Config, listeners: Listeners, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let control = open_control(&config).await?;
    let (grpc, http) = listeners.addrs()?;
    println!("{}", listening_line(grpc, http));
    shutdown.await;
    tracing::info!("shutting down");
    control.close().await;
    Ok(())
}
