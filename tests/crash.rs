//! Crash test: a child process appends under concurrency and is killed with SIGKILL at random
//! moments, 20 rounds over one data directory. After each kill, every event the child saw
//! acknowledged must be in the log at its seq, seqs must be contiguous and `verify` must pass.
//!
//! This file has no test harness: run plainly it is the parent; with `SOLO_CRASH_CHILD` set
//! (which only the parent does) it is the child appender.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use solo::control::{Control, KillCommand};
use solo::proto::event::Kind;

const CHILD_ENV: &str = "SOLO_CRASH_CHILD";
const ROUNDS: usize = 20;
const APPENDERS: usize = 16;

fn main() {
    match std::env::var_os(CHILD_ENV) {
        Some(dir) => child(dir.into()),
        None => parent(),
    }
}

/// Appends forever from many tasks, printing one line per acknowledged command.
fn child(dir: std::path::PathBuf) {
    let mut options = common::options(&dir);
    options.writer.snapshot_every = 50;
    options.limits.node.max_services = u32::MAX;
    options.limits.node.max_deploys_per_minute = u32::MAX;
    options.limits.node.max_history_mb_per_hour = u64::MAX;
    options.limits.node.max_tenant_memory_mb = u64::MAX >> 21;
    // No runtime here: the node-wide instance quota does not apply.
    options.limits.node_services = None;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let control = common::open(options);
        let round = std::env::var("SOLO_CRASH_ROUND").unwrap_or_default();
        let mut tasks = Vec::new();
        for task in 0..APPENDERS {
            let control = control.clone();
            let round = round.clone();
            tasks.push(tokio::spawn(async move { append_forever(control, task, round).await }));
        }
        for task in tasks {
            let _ = task.await;
        }
    });
}

async fn append_forever(control: Control, task: usize, round: String) {
    let tenant = format!("t{task}");
    for n in 0.. {
        let id = format!("r{round}-s{n}");
        let outcome = control
            .deploy(common::deploy_request(&tenant, &id, &format!("{round}-{n}")))
            .await;
        // A refusal here is a bug in the test's setup: say so rather than fall silent.
        let outcome = outcome.unwrap_or_else(|e| panic!("the child's deploy failed: {e}"));
        ack("deploy", outcome.seq, &tenant, &id);
        if n % 4 == 3 {
            let kill = KillCommand {
                idempotency_key: format!("kill-{round}-{n}"),
                ..common::kill_command(&tenant, &id)
            };
            let killed = control
                .kill(kill)
                .await
                .unwrap_or_else(|e| panic!("the child's kill failed: {e}"));
            ack("kill", killed.seq, &tenant, &id);
        }
    }
}

fn ack(kind: &str, seq: u64, tenant: &str, id: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ack {kind} {seq} {tenant} {id}");
    let _ = out.flush();
}

/// An acknowledged command: what the child was told, by seq.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ack {
    kind: String,
    tenant: String,
    id: String,
}

fn parent() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = seed();
    eprintln!("crash test: seed {rng}");
    let mut acked: BTreeMap<u64, Ack> = BTreeMap::new();
    for round in 0..ROUNDS {
        let before = acked.len();
        let delay = Duration::from_millis(xorshift(&mut rng) % 300);
        run_and_kill(dir.path(), round, delay, &mut acked);
        let head = check(dir.path(), &acked);
        eprintln!(
            "round {round:>2}: killed {delay:?} after the first ack; {} new acks, {} in all, head {head}",
            acked.len() - before,
            acked.len()
        );
        assert!(acked.len() > before, "round {round}: the child acknowledged nothing");
    }
    eprintln!("crash test: ok");
}

fn run_and_kill(dir: &std::path::Path, round: usize, delay: Duration, acked: &mut BTreeMap<u64, Ack>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(CHILD_ENV, dir)
        .env("SOLO_CRASH_ROUND", round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the child starts");
    let stdout = child.stdout.take().unwrap();
    let (lines, received) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let first = received
        .recv_timeout(Duration::from_secs(60))
        .expect("the child acknowledges within a minute");
    let deadline = Instant::now() + delay;
    let mut all = vec![first];
    while let Ok(line) = received.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        all.push(line);
    }
    child.kill().expect("SIGKILL is delivered");
    child.wait().unwrap();
    reader.join().unwrap();
    all.extend(received.try_iter());
    for line in all {
        // A line cut short by the kill is not an acknowledgement anyone saw.
        let parts: Vec<&str> = line.split(' ').collect();
        if let ["ack", kind, seq, tenant, id] = parts[..]
            && let Ok(seq) = seq.parse::<u64>()
        {
            let ack = Ack {
                kind: kind.into(),
                tenant: tenant.into(),
                id: id.into(),
            };
            if let Some(previous) = acked.insert(seq, ack.clone()) {
                assert_eq!(previous, ack, "seq {seq} was acknowledged twice for different commands");
            }
        }
    }
}

/// Opens the directory as a restarted node would and checks every acknowledgement.
fn check(dir: &std::path::Path, acked: &BTreeMap<u64, Ack>) -> u64 {
    let control = common::open(common::options(dir));
    let head = control.head();
    let report = solo::inspect::verify(control.log().store(), control.read_state(|s| s.settings())).unwrap();
    assert!(report.ok(), "verify after a kill: {}", report.summary());
    for (&seq, ack) in acked {
        assert!(seq <= head, "acknowledged seq {seq} is past the head {head}");
        let event = &control.log().read(seq..=seq).unwrap()[0];
        let kind_matches = matches!(
            (&event.kind, ack.kind.as_str()),
            (Some(Kind::ServiceDeployed(_)), "deploy") | (Some(Kind::ServiceKillRequested(_)), "kill")
        );
        assert!(
            kind_matches && event.tenant == ack.tenant && event.service_id == ack.id,
            "seq {seq} holds {event:?}, but {ack:?} was acknowledged"
        );
        assert!(control.status(&ack.tenant, &ack.id).is_ok(), "{ack:?} is in the state");
    }
    head
}

fn seed() -> u64 {
    std::env::var("SOLO_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
