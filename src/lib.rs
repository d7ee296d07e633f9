//! Solo: a single-binary, event-sourced control plane in which tenants deploy small sandboxed
//! WebAssembly services, call them, watch them and kill them, while every change is appended to
//! a durable log that is the only source of truth.
//!
//! The parts, in the order data flows through them (see `DESIGN.md`):
//! [`control`] decides commands and is the single writer of the [`log`]; [`state`] is the pure
//! projection of the log; [`server`] wires a node together.

pub mod api;
pub mod cli;
pub mod config;
pub mod connections;
pub mod control;
pub mod event;
pub mod fuzzing;
pub mod inspect;
pub mod limits;
pub mod log;
pub mod metrics;
pub mod runtime;
pub mod server;
pub mod shed;
pub mod state;
pub mod tls;

/// Code generated from `proto/solo/v1/`: the event and snapshot schemas, and the API's messages,
/// client and server (`build.rs`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/solo.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/server/solo.v1.rs"));
}

/// Solo's version, as recorded in `node_started` events.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
