//! WebAssembly services through the control layer: the examples, the crashers, supervision,
//! upgrades, kills and recovery.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use solo::control::{Error, KillCommand};
use solo::proto::event::Kind;
use solo::proto::{CrashReason, Limits, StopOutcome, StopReason};
use solo::runtime::CallError;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temp dir")
}

async fn call(control: &solo::control::Control, tenant: &str, id: &str, payload: &[u8]) -> Result<Vec<u8>, Error> {
    control.call(tenant, id, payload.to_vec(), None).await
}

/// Deploys the `spin` example as acme/`id`, with room for calls of up to 30 s, and waits until
/// it runs.
async fn spin_running(control: &solo::control::Control, id: &str) {
    let mut request = deploy_example("acme", id, "spin");
    request.limits = Limits {
        call_timeout_ms: 30_000,
        cpu_ms_per_call: 30_000,
        ..Limits::default()
    };
    let deployed = control.deploy(request).await.unwrap();
    wait_for_kind(control, deployed.seq, "acme", id, "service_started").await;
}

/// A call to a `spin` service that keeps it busy for `ms`, under way in a task of its own.
fn call_in_flight(
    control: &solo::control::Control,
    id: &str,
    ms: u64,
) -> tokio::task::JoinHandle<Result<Vec<u8>, Error>> {
    let (control, id) = (control.clone(), id.to_string());
    tokio::spawn(async move { call(&control, "acme", &id, ms.to_string().as_bytes()).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_counter_and_kv_behave_as_documented() {
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = &node.control;
    deploy_running(control, "acme", "echo", "echo").await;
    deploy_running(control, "acme", "counter", "counter").await;
    deploy_running(control, "acme", "kv", "kv").await;

    assert_eq!(call(control, "acme", "echo", b"hello").await.unwrap(), b"hello");
    let binary: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    assert_eq!(call(control, "acme", "echo", &binary).await.unwrap(), binary);
    assert_eq!(call(control, "acme", "echo", b"").await.unwrap(), b"");

    for expected in ["1", "2", "3"] {
        assert_eq!(
            call(control, "acme", "counter", b"").await.unwrap(),
            expected.as_bytes()
        );
    }

    assert_eq!(call(control, "acme", "kv", b"set colour blue").await.unwrap(), b"ok");
    assert_eq!(call(control, "acme", "kv", b"set size 42").await.unwrap(), b"ok");
    assert_eq!(call(control, "acme", "kv", b"get colour").await.unwrap(), b"blue");
    assert_eq!(call(control, "acme", "kv", b"set colour red").await.unwrap(), b"ok");
    assert_eq!(call(control, "acme", "kv", b"get colour").await.unwrap(), b"red");
    assert_eq!(call(control, "acme", "kv", b"del colour").await.unwrap(), b"ok");
    let missing = call(control, "acme", "kv", b"get colour").await.unwrap_err();
    assert!(
        matches!(&missing, Error::Call(CallError::Service { message, .. }) if message == "no such key"),
        "{missing}"
    );
    // An application error is not a crash: the data lives on.
    assert_eq!(call(control, "acme", "kv", b"get size").await.unwrap(), b"42");
    let bad = call(control, "acme", "kv", b"frobnicate").await.unwrap_err();
    assert!(matches!(bad, Error::Call(CallError::Service { .. })), "{bad}");

    let live = control.live("acme", "kv").unwrap();
    assert_eq!((live.calls, live.calls_failed), (9, 2));
    assert!(live.memory_bytes >= 65536 && live.uptime_ms < 60_000, "{live:?}");
    let logs: Vec<String> = control
        .logs("acme", "echo")
        .await
        .unwrap()
        .lines_from(0)
        .into_iter()
        .map(|l| l.message)
        .collect();
    assert_eq!(logs, ["echo ready"]);
    node.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traps_fail_the_call_and_restart_the_instance_fresh() {
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = &node.control;
    for (id, name, code) in [
        ("u", "unreachable", "unreachable"),
        ("s", "stack_overflow", "stack_overflow"),
    ] {
        let deployed = deploy_running(control, "acme", id, name).await;
        let err = call(control, "acme", id, b"x").await.unwrap_err();
        let Error::Call(CallError::Trapped { reason, trap_code, .. }) = &err else {
            panic!("{id}: {err}")
        };
        assert_eq!((*reason, trap_code.as_str()), (CrashReason::Trap, code), "{err}");
        let crashed = wait_for_kind(control, deployed.seq, "acme", id, "service_crashed").await;
        let Some(Kind::ServiceCrashed(c)) = &crashed.kind else {
            unreachable!()
        };
        assert!(c.restarting && c.trap_code == code, "{c:?}");
        let restarted = wait_for_kind(control, crashed.seq, "acme", id, "service_restarted").await;
        let Some(Kind::ServiceRestarted(r)) = &restarted.kind else {
            unreachable!()
        };
        assert_eq!(r.restarts, 1);
        assert_eq!(control.status("acme", id).unwrap().status.as_str(), "running");
    }
    node.stop(Duration::from_secs(5)).await;
}

/// With one guest thread, hence one turn on it: the instance a trap replaces lets its turn go
/// before the fresh one starts, which would otherwise wait for it for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_guest_thread_a_trapped_instance_is_replaced_and_serves_again() {
    let dir = tempdir();
    let mut config = node_config(dir.path());
    config.runtime.guest_threads = 1;
    let node = open_node(&config).await;
    let control = &node.control;
    let deployed = deploy_running(control, "acme", "u", "unreachable").await;
    let mut from = deployed.seq;
    for restarts in 1..=2 {
        let err = call(control, "acme", "u", b"x").await.unwrap_err();
        assert!(matches!(err, Error::Call(CallError::Trapped { .. })), "{err}");
        let restarted = wait_for_kind(control, from, "acme", "u", "service_restarted").await;
        let Some(Kind::ServiceRestarted(r)) = &restarted.kind else {
            unreachable!()
        };
        assert_eq!(r.restarts, restarts);
        from = restarted.seq + 1;
    }
    node.stop(Duration::from_secs(5)).await;
}

/// A deploy of acme/`id` whose every call traps, in a function whose name is `name_len` bytes.
fn trapping_in(id: &str, name_len: usize) -> solo::control::DeployRequest {
    let wat = format!(
        r#"(module
            (memory (export "memory") 1)
            (func (export "solo_alloc") (param i32) (result i32) (i32.const 1024))
            (func ${} (export "solo_handle") (param i32 i32) (result i64) unreachable))"#,
        "a".repeat(name_len)
    );
    solo::control::DeployRequest {
        module: Arc::from(wat.into_bytes()),
        ..deploy_request("acme", id, "")
    }
}

/// A trap names the function it happened in, and the module alone bounds that name: the
/// message is cut, in the call's error, the live status, the state and the crash event alike,
/// so one tenant's module cannot fill the log (or every `List`) with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_in_a_function_with_a_huge_name_is_reported_in_a_bounded_message() {
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = &node.control;
    let deployed = control.deploy(trapping_in("crash", 200 << 10)).await.unwrap();
    wait_for_kind(control, deployed.seq, "acme", "crash", "service_started").await;

    // The live status puts the trap code before the message.
    let bounded = |what: &str, message: &str| {
        assert!(
            message.len() <= solo::limits::MAX_FAILURE_MESSAGE_BYTES + "unreachable: ".len()
                && message.contains("(message cut;"),
            "{what}: {} bytes: {}",
            message.len(),
            &message[..message.len().min(200)]
        );
        assert!(message.contains("aaaa"), "{what} still names the function: {message}");
    };
    let err = call(control, "acme", "crash", b"x").await.unwrap_err();
    let Error::Call(CallError::Trapped { message, .. }) = &err else {
        panic!("{err}")
    };
    bounded("the call's error", message);
    let crashed = wait_for_kind(control, deployed.seq, "acme", "crash", "service_crashed").await;
    let Some(Kind::ServiceCrashed(c)) = &crashed.kind else {
        unreachable!()
    };
    bounded("the crash event", &c.message);
    bounded("the state", &control.status("acme", "crash").unwrap().last_error);
    let live = control.live("acme", "crash").expect("live figures");
    bounded("the live status", &live.last_error);
    node.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_hog_stops_at_its_cap_and_the_policy_gives_up_after_n_restarts() {
    let dir = tempdir();
    let mut config = node_config(dir.path());
    config.limits.max_restarts = 2;
    let node = open_node(&config).await;
    let control = &node.control;
    let mut request = deploy_example("acme", "hog", "memory_hog");
    request.limits = Limits {
        memory_bytes: 2 << 20,
        ..Limits::default()
    };
    let deployed = control.deploy(request).await.unwrap();
    wait_for_kind(control, deployed.seq, "acme", "hog", "service_started").await;

    for attempt in 0..3 {
        let err = call(control, "acme", "hog", b"more").await.unwrap_err();
        let Error::Call(CallError::Trapped { reason, .. }) = &err else {
            panic!("attempt {attempt}: {err}")
        };
        assert_eq!(*reason, CrashReason::MemoryLimit, "{err}");
        let live = control.live("acme", "hog").unwrap();
        assert!(live.memory_bytes <= 2 << 20, "memory grew past its cap: {live:?}");
        if attempt < 2 {
            wait_for_kind(control, control.head(), "acme", "hog", "service_restarted").await;
        }
    }
    let gave_up = wait_for_event(
        control,
        deployed.seq,
        |e| matches!(&e.kind, Some(Kind::ServiceCrashed(c)) if !c.restarting),
    )
    .await;
    assert_eq!(gave_up.service_id, "hog");
    let status = control.status("acme", "hog").unwrap();
    assert_eq!((status.status.as_str(), status.restarts), ("crashed", 2));
    // Down: the live figures describe no instance, and keep why it went down.
    let live = control.live("acme", "hog").unwrap();
    assert_eq!((live.memory_bytes, live.uptime_ms), (0, 0), "{live:?}");
    assert!(live.last_error.contains("unreachable"), "{live:?}");
    let err = call(control, "acme", "hog", b"more").await.unwrap_err();
    assert!(matches!(err, Error::NotRunning { .. }), "{err}");
    assert!(err.to_string().contains("crashed"), "{err}");

    // Redeploying brings it back.
    let redeployed = control
        .deploy(deploy_example("acme", "hog", "memory_hog"))
        .await
        .unwrap();
    assert_eq!(redeployed.version, 2);
    wait_for_kind(control, redeployed.seq, "acme", "hog", "service_started").await;
    let live = control.live("acme", "hog").unwrap();
    assert!(
        live.memory_bytes > 0 && live.last_error.is_empty(),
        "a new version starts clean: {live:?}"
    );
    node.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_guest_is_stopped_at_its_deadline_while_another_tenants_echo_answers() {
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = node.control.clone();
    let mut request = deploy_example("mallory", "loop", "loop");
    request.limits = Limits {
        cpu_ms_per_call: 300,
        ..Limits::default()
    };
    let deployed = control.deploy(request).await.unwrap();
    wait_for_kind(&control, deployed.seq, "mallory", "loop", "service_started").await;
    deploy_running(&control, "acme", "echo", "echo").await;

    let looping = {
        let control = control.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let err = call(&control, "mallory", "loop", b"").await.unwrap_err();
            (started.elapsed(), err)
        })
    };
    // While the loop burns its budget, echo keeps answering.
    let mut slowest = Duration::ZERO;
    let mut answered = 0;
    while !looping.is_finished() {
        let started = Instant::now();
        assert_eq!(call(&control, "acme", "echo", b"ping").await.unwrap(), b"ping");
        slowest = slowest.max(started.elapsed());
        answered += 1;
    }
    let (took, err) = looping.await.unwrap();
    let Error::Call(CallError::Trapped { reason, .. }) = &err else {
        panic!("{err}")
    };
    assert_eq!(*reason, CrashReason::CpuLimit);
    assert!(
        took >= Duration::from_millis(290),
        "stopped before its deadline: {took:?}"
    );
    // The deadline plus one tick, with wide room for a loaded test machine: this asserts that
    // the loop is stopped and echo is not starved, not how fast (benches measure that).
    assert!(took < Duration::from_millis(300 + 2000), "stopped late: {took:?}");
    assert!(answered >= 3, "echo answered only {answered} times");
    assert!(slowest < Duration::from_secs(1), "an echo call waited {slowest:?}");
    node.stop(Duration::from_secs(5)).await;
}

/// CPU is counted as the time the guest runs, not as the ticks it notices: one bulk memory
/// instruction outlasts many ticks and is checked once, when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_of_long_bulk_instructions_is_stopped_at_its_cpu_limit() {
    let dir = tempdir();
    let mut config = node_config(dir.path());
    config.limits.max_memory_mb = 256;
    config.runtime.max_instances = 8;
    config.runtime.epoch_tick_ms = 1;
    let node = open_node(&config).await;
    let control = node.control.clone();
    // Each round copies 256 MiB: tens of milliseconds, many ticks, in one instruction.
    let wat = r#"(module
        (memory (export "memory") 4096)
        (func (export "solo_alloc") (param i32) (result i32) (i32.const 0))
        (func (export "solo_handle") (param i32 i32) (result i64)
          (loop $again
            (memory.copy (i32.const 0) (i32.const 1) (i32.const 268435455))
            (br $again))
          (i64.const 0)))"#;
    let mut request = deploy_request("acme", "mover", "unused");
    request.module = wat.as_bytes().into();
    request.limits = Limits {
        memory_bytes: 256 << 20,
        cpu_ms_per_call: 300,
        call_timeout_ms: 60_000,
        ..Limits::default()
    };
    let deployed = control.deploy(request).await.unwrap();
    wait_for_kind(&control, deployed.seq, "acme", "mover", "service_started").await;
    let started = Instant::now();
    let err = call(&control, "acme", "mover", b"").await.unwrap_err();
    let took = started.elapsed();
    let Error::Call(CallError::Trapped { reason, .. }) = &err else {
        panic!("{err}")
    };
    assert_eq!(*reason, CrashReason::CpuLimit);
    // Counted by ticks, the 300 ticks of its budget were 300 rounds: several seconds. Counted
    // by time, the limit plus the round under way, with room for a loaded machine.
    assert!(took < Duration::from_secs(3), "stopped late: {took:?}");
    node.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_short_deadline_fails_that_call_and_never_the_service() {
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = node.control.clone();
    let deployed = deploy_running(&control, "acme", "spin", "spin").await;
    let max_restarts = control.status("acme", "spin").unwrap().limits.max_restarts;
    // More impatient calls than the restart policy would forgive as crashes: the first runs on
    // past its caller's deadline, the others are skipped in the mailbox once theirs pass.
    for _ in 0..=max_restarts {
        let impatient = Some(Duration::from_millis(20));
        let err = control
            .call("acme", "spin", b"300".to_vec(), impatient)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Call(CallError::Timeout { .. })), "{err}");
    }
    assert_eq!(call(&control, "acme", "spin", b"0").await.unwrap(), b"done");
    let service = control.status("acme", "spin").unwrap();
    assert_eq!((service.status, service.restarts), (solo::state::Status::Running, 0));
    let events = control.log().read(deployed.seq..=control.head()).unwrap();
    let crashes: Vec<_> = events
        .iter()
        .filter(|e| matches!(e.kind, Some(Kind::ServiceCrashed(_))))
        .collect();
    assert!(
        crashes.is_empty(),
        "a caller's deadline was recorded as a crash: {crashes:?}"
    );
    node.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_load_fails_no_call() {
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = node.control.clone();
    deploy_running(&control, "acme", "echo", "echo").await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = Vec::new();
    for task in 0..8 {
        let (control, stop) = (control.clone(), Arc::clone(&stop));
        callers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let payload = format!("{task}-{i}");
                match call(&control, "acme", "echo", payload.as_bytes()).await {
                    Ok(answer) if answer == payload.as_bytes() => ok += 1,
                    Ok(answer) => failed.push(format!("wrong answer {answer:?}")),
                    Err(e) => failed.push(e.to_string()),
                }
                i += 1;
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A different module (the log line differs) with the same behaviour.
    let v2 = String::from_utf8(example("echo").to_vec())
        .unwrap()
        .replace("echo ready", "echo v2!!");
    let request = solo::control::DeployRequest {
        module: Arc::from(v2.into_bytes()),
        ..deploy_request("acme", "echo", "")
    };
    let upgraded = control.deploy(request).await.unwrap();
    assert_eq!((upgraded.version, upgraded.created), (2, false));
    wait_for_kind(&control, upgraded.seq, "acme", "echo", "service_started").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for caller in callers {
        let (ok, failed) = caller.await.unwrap();
        assert!(failed.is_empty(), "calls failed during the upgrade: {failed:?}");
        total += ok;
    }
    assert!(total > 100, "only {total} calls ran");
    let versions: Vec<u64> = control
        .logs("acme", "echo")
        .await
        .unwrap()
        .lines_from(0)
        .iter()
        .map(|l| l.version)
        .collect();
    assert_eq!(
        versions,
        [1, 2, 1],
        "v1 started, v2 started, then v1 stopped after draining its queue"
    );
    // The history says what became of version 1; version 2's status is untouched.
    let stopped = stop_of(&control, upgraded.seq, "echo", 1).await;
    assert_eq!(
        (
            stopped.reason(),
            stopped.outcome(),
            stopped.calls_cut_off,
            stopped.message.as_str()
        ),
        (StopReason::Replaced, StopOutcome::Clean, 0, "")
    );
    let status = control.status("acme", "echo").unwrap();
    assert_eq!((status.version, status.status.as_str()), (2, "running"));
    node.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_and_forced_kills() {
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = &node.control;
    deploy_running(control, "acme", "gentle", "echo").await;
    deploy_running(control, "acme", "abrupt", "echo").await;

    let killed = control
        .kill(KillCommand {
            grace_ms: 2000,
            ..kill_command("acme", "gentle")
        })
        .await
        .unwrap();
    let stopped = stop_of(control, killed.seq, "gentle", 1).await;
    assert_eq!(
        (
            stopped.reason(),
            stopped.outcome(),
            stopped.calls_cut_off,
            stopped.message.as_str()
        ),
        (StopReason::Killed, StopOutcome::Clean, 0, "")
    );
    let lines: Vec<String> = control
        .logs("acme", "gentle")
        .await
        .unwrap()
        .lines_from(0)
        .into_iter()
        .map(|l| l.message)
        .collect();
    assert_eq!(lines, ["echo ready", "echo stopping"], "solo_stop ran");

    let killed = control
        .kill(KillCommand {
            force: true,
            ..kill_command("acme", "abrupt")
        })
        .await
        .unwrap();
    let stopped = stop_of(control, killed.seq, "abrupt", 1).await;
    assert_eq!((stopped.outcome(), stopped.calls_cut_off), (StopOutcome::Forced, 0));
    let lines: Vec<String> = control
        .logs("acme", "abrupt")
        .await
        .unwrap()
        .lines_from(0)
        .into_iter()
        .map(|l| l.message)
        .collect();
    assert_eq!(lines, ["echo ready"], "solo_stop did not run");

    for id in ["gentle", "abrupt"] {
        assert_eq!(control.status("acme", id).unwrap().status.as_str(), "stopped");
        let err = call(control, "acme", id, b"x").await.unwrap_err();
        assert!(matches!(err, Error::NotRunning { .. }), "{err}");
    }
    let err = control.kill(kill_command("acme", "ghost")).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    node.stop(Duration::from_secs(5)).await;
}

/// A graceful kill waits on the calls in flight; a forced kill meanwhile is recorded and cuts
/// the wait short, as `kill -9` after `kill` would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_kill_cuts_short_a_graceful_one_under_way() {
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = node.control.clone();
    spin_running(&control, "spin").await;
    let busy = call_in_flight(&control, "spin", 20000);
    while control.live("acme", "spin").unwrap().uptime_ms == 0 || control.runtime().unwrap().running_instances() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await; // the call is under way
    let gentle = control
        .kill(KillCommand {
            grace_ms: 60_000,
            ..kill_command("acme", "spin")
        })
        .await
        .unwrap();
    assert!(!gentle.already_stopped);
    // A graceful kill again finds it on its way down; a forced one is recorded.
    let again = control.kill(kill_command("acme", "spin")).await.unwrap();
    assert_eq!((again.seq, again.already_stopped), (gentle.seq, true));
    let started = std::time::Instant::now();
    let forced = control
        .kill(KillCommand {
            force: true,
            ..kill_command("acme", "spin")
        })
        .await
        .unwrap();
    assert!(forced.seq > gentle.seq && !forced.already_stopped, "{forced:?}");
    let stopped = stop_of(&control, forced.seq, "spin", 1).await;
    assert_eq!(
        (stopped.outcome(), stopped.calls_cut_off),
        (StopOutcome::Forced, 1),
        "{stopped:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "stopped without waiting out the call or the grace: {:?}",
        started.elapsed()
    );
    assert!(busy.await.unwrap().is_err(), "the call in flight was cut off");
    assert_eq!(control.status("acme", "spin").unwrap().status.as_str(), "stopped");
    // The quotas counted the service out once.
    let state_services = control.read_state(|s| s.active_services());
    assert_eq!(state_services, 0);
    node.stop(Duration::from_secs(5)).await;
}

/// A stop's record says how it went, as Kubernetes records how a container ended: the grace
/// running out on a call, a call failing while the queue drained, or nothing left to stop. The
/// live figures agree: the calls cut off failed, and what went wrong is the last error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_on_record_says_how_it_went() {
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = node.control.clone();
    let kill = |id: &str, grace_ms: u32| KillCommand {
        grace_ms,
        ..kill_command("acme", id)
    };

    // The grace runs out on a call under way.
    spin_running(&control, "slow").await;
    let busy = call_in_flight(&control, "slow", 5000);
    tokio::time::sleep(Duration::from_millis(200)).await; // the call is under way
    let killed = control.kill(kill("slow", 300)).await.unwrap();
    let stopped = stop_of(&control, killed.seq, "slow", 1).await;
    assert_eq!(
        (stopped.outcome(), stopped.calls_cut_off),
        (StopOutcome::GraceExpired, 1),
        "{stopped:?}"
    );
    assert!(
        stopped
            .message
            .contains("grace ran out with 1 call it had accepted unanswered"),
        "{}",
        stopped.message
    );
    assert!(busy.await.unwrap().is_err(), "the call was cut off");
    let live = control.live("acme", "slow").unwrap();
    assert_eq!(
        (live.calls, live.calls_failed, live.last_error.as_str()),
        (1, 1, stopped.message.as_str()),
        "the call cut off was handled, and failed"
    );

    // A queued call fails while the instance finishes its queue: the rest of the stop is
    // given up, and the record says why.
    spin_running(&control, "fails").await;
    let first = call_in_flight(&control, "fails", 600);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let too_large = {
        let control = control.clone();
        // Past what the example's `solo_alloc` takes: it traps.
        tokio::spawn(async move { call(&control, "acme", "fails", &[b'1'; 70_000]).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed = control.kill(kill("fails", 10_000)).await.unwrap();
    let stopped = stop_of(&control, killed.seq, "fails", 1).await;
    assert_eq!(
        (stopped.outcome(), stopped.calls_cut_off),
        (StopOutcome::Failed, 0),
        "{stopped:?}"
    );
    assert!(
        stopped.message.contains("a call it was finishing failed") && stopped.message.contains("unreachable"),
        "{}",
        stopped.message
    );
    assert_eq!(first.await.unwrap().unwrap(), b"done");
    assert!(too_large.await.unwrap().is_err());
    assert_eq!(control.live("acme", "fails").unwrap().last_error, stopped.message);

    // A service whose restart policy gave up has no instance to stop.
    let mut crasher = deploy_example("acme", "crashed", "unreachable");
    crasher.limits = Limits {
        max_restarts: 1,
        ..Limits::default()
    };
    let deployed = control.deploy(crasher).await.unwrap();
    wait_for_kind(&control, deployed.seq, "acme", "crashed", "service_started").await;
    // It traps, is restarted, traps again, and its restart policy gives up.
    for _ in 0..2 {
        call(&control, "acme", "crashed", b"x").await.unwrap_err();
    }
    while control.status("acme", "crashed").unwrap().status.as_str() != "crashed" {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed = control.kill(kill("crashed", 1000)).await.unwrap();
    let stopped = stop_of(&control, killed.seq, "crashed", 1).await;
    assert_eq!(
        (stopped.outcome(), stopped.calls_cut_off),
        (StopOutcome::NotRunning, 0),
        "{stopped:?}"
    );
    node.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_refuses_calls_as_busy() {
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = node.control.clone();
    let mut request = deploy_example("acme", "spin", "spin");
    request.limits = Limits {
        mailbox_capacity: 1,
        ..Limits::default()
    };
    let deployed = control.deploy(request).await.unwrap();
    wait_for_kind(&control, deployed.seq, "acme", "spin", "service_started").await;
    // A burst of slow calls: one runs, one waits in the mailbox of one, the rest are refused
    // at once. (Whatever the scheduling, at most a couple can be taken within the spin.)
    let burst: Vec<_> = (0..6)
        .map(|_| {
            let control = control.clone();
            tokio::spawn(async move { call(&control, "acme", "spin", b"600").await })
        })
        .collect();
    let (mut done, mut busy) = (0, 0);
    for call in burst {
        match call.await.unwrap() {
            Ok(answer) => {
                assert_eq!(answer, b"done");
                done += 1;
            }
            Err(Error::Call(CallError::Busy { capacity: 1, .. })) => busy += 1,
            Err(other) => panic!("neither served nor busy: {other}"),
        }
    }
    assert!(busy >= 1 && done >= 1, "{done} served, {busy} refused as busy");
    // The refusals did not break anything: the service answers again.
    assert_eq!(call(&control, "acme", "spin", b"1").await.unwrap(), b"done");
    node.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_failures_leave_the_service_failed() {
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = &node.control;
    let deployed = control
        .deploy(deploy_example("acme", "broken", "init_trap"))
        .await
        .unwrap();
    let crashed = wait_for_kind(control, deployed.seq, "acme", "broken", "service_crashed").await;
    let Some(Kind::ServiceCrashed(c)) = &crashed.kind else {
        unreachable!()
    };
    assert_eq!(
        (c.reason(), c.restarting, c.trap_code.as_str()),
        (CrashReason::InitFailure, false, "unreachable"),
        "the trap is named as a call's would be"
    );
    let status = control.status("acme", "broken").unwrap();
    assert_eq!(status.status.as_str(), "failed");
    assert!(status.last_error.contains("solo_init"), "{}", status.last_error);
    node.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_modules_get_clear_errors_and_append_nothing() {
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = &node.control;
    let cases: [(&[u8], &str); 6] = [
        (b"\0asm\x01\0\0\0\xff\xff", "not valid wasm"),
        // Valid, but its memory starts at 4 GiB: over what this node's instances may have.
        (b"(module (memory (export \"memory\") 65536))", "valid wasm, but over this node's limits"),
        (b"(module (func $f (result i32) (i32.const 1)", "WAT syntax error"),
        (b"(module (memory (export \"memory\") 1))", "does not export 'solo_alloc'"),
        (b"(module (memory (export \"memory\") 1) (func (export \"solo_alloc\") (param i64) (result i32) (i32.const 0)) (func (export \"solo_handle\") (param i32 i32) (result i64) (i64.const 0)))", "must be a function (i32) -> (i32)"),
        (&[0xff, 0xfe, 0x00], "neither wasm"),
    ];
    for (module, expected) in cases {
        let request = solo::control::DeployRequest {
            module: Arc::from(module),
            ..deploy_request("acme", "bad", "")
        };
        let err = control.deploy(request).await.unwrap_err();
        assert!(matches!(err, Error::InvalidModule(_)), "{err}");
        assert!(err.to_string().contains(expected), "expected '{expected}' in: {err}");
    }
    let err = control
        .deploy(deploy_example("acme", "bad", "forbidden_import"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("wasi_snapshot_preview1.fd_write") && err.to_string().contains("not granted"),
        "{err}"
    );
    // A memory limit below the module's own minimum (one 64 KiB page) could never start.
    let mut cramped = deploy_example("acme", "bad", "echo");
    cramped.limits.memory_bytes = 1;
    let err = control.deploy(cramped).await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidModule(_)) && err.to_string().contains("starts at 65536 bytes"),
        "{err}"
    );
    assert_eq!(control.head(), 1, "only node_started is in the log");

    // A refused module sent again is refused at once, for the same reason, without compiling
    // its bytes again, nor counting against the tenant's compiles.
    let runtime = control.runtime().unwrap();
    let missing_export = || {
        let mut request = deploy_example("acme", "bad", "echo");
        request.module = Arc::from(&b"(module (memory (export \"memory\") 1) (func (export \"solo_alloc\") (param i32) (result i32) (i32.const 0)))"[..]);
        request
    };
    let compiled = runtime.modules_compiled();
    let first = control.deploy(missing_export()).await.unwrap_err().to_string();
    assert_eq!(runtime.modules_compiled(), compiled + 1);
    for _ in 0..3 {
        assert_eq!(control.deploy(missing_export()).await.unwrap_err().to_string(), first);
    }
    assert_eq!(runtime.modules_compiled(), compiled + 1, "compiled once");
    node.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_the_limit_fails_the_call_not_the_service() {
    let dir = tempdir();
    let mut config = node_config(dir.path());
    config.runtime.max_response_bytes = 1000;
    let node = open_node(&config).await;
    let control = &node.control;
    deploy_running(control, "acme", "echo", "echo").await;
    // An honest echo of a big request: more often than the restart policy would allow crashes,
    // and each call fails on its own.
    for _ in 0..8 {
        let err = call(control, "acme", "echo", &[7; 2000]).await.unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Call(CallError::ResponseTooLarge {
                    bytes: 2000,
                    limit: 1000,
                    ..
                })
            ),
            "{err}"
        );
        assert!(err.to_string().contains("max_response_bytes"), "{err}");
    }
    // The instance lived on.
    assert_eq!(call(control, "acme", "echo", b"small").await.unwrap(), b"small");
    let status = control.status("acme", "echo").unwrap();
    assert_eq!((status.status.as_str(), status.restarts), ("running", 0));
    // A response outside linear memory breaks the ABI, however long it claims to be.
    let mut liar = deploy_request("acme", "liar", "");
    liar.module = Arc::from(
        &br#"(module (memory (export "memory") 1)
               (func (export "solo_alloc") (param i32) (result i32) (i32.const 1024))
               (func (export "solo_handle") (param i32 i32) (result i64) (i64.const 0xffffffff)))"#[..],
    );
    let deployed = control.deploy(liar).await.unwrap();
    wait_for_kind(control, deployed.seq, "acme", "liar", "service_started").await;
    let err = call(control, "acme", "liar", b"hi").await.unwrap_err();
    assert!(
        matches!(&err, Error::Call(CallError::Trapped { trap_code, .. }) if trap_code == "abi_violation"),
        "{err}"
    );
    // So does a message to the host outside linear memory.
    let mut scribbler = deploy_request("acme", "scribbler", "");
    scribbler.module = Arc::from(
        &br#"(module (import "solo" "log" (func $log (param i32 i32 i32))) (memory (export "memory") 1)
               (func (export "solo_alloc") (param i32) (result i32) (i32.const 1024))
               (func $scribble (export "solo_handle") (param i32 i32) (result i64)
                 (call $log (i32.const 2) (i32.const 65530) (i32.const 100)) (i64.const 0)))"#[..],
    );
    let deployed = control.deploy(scribbler).await.unwrap();
    wait_for_kind(control, deployed.seq, "acme", "scribbler", "service_started").await;
    let err = call(control, "acme", "scribbler", b"hi").await.unwrap_err();
    assert!(
        matches!(&err, Error::Call(CallError::Trapped { trap_code, message, .. })
            if trap_code == "abi_violation" && message.contains("outside linear memory") && message.contains("scribble")),
        "{err}"
    );
    node.stop(Duration::from_secs(5)).await;
}

/// A module with a distinct hash (and nothing else), which the runtime refuses: it exports no
/// handler.
fn refused_module(n: usize) -> solo::control::DeployRequest {
    let mut request = deploy_request("acme", "bad", "");
    request.module =
        Arc::from(format!("(module (memory (export \"memory\") 1) (global i32 (i32.const {n})))").as_bytes());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiles_count_against_the_deploy_rate_refused_ones_too() {
    let dir = tempdir();
    let mut config = node_config(dir.path());
    config.limits.max_deploys_per_minute = 3;
    let node = open_node(&config).await;
    let control = &node.control;
    let runtime = control.runtime().unwrap();
    // One module compiled for a deploy, two refused: the tenant's three compiles for the minute.
    deploy_running(control, "acme", "echo", "echo").await;
    for n in 0..2 {
        let err = control.deploy(refused_module(n)).await.unwrap_err();
        assert!(matches!(err, Error::InvalidModule(_)), "{err}");
    }
    let compiled = runtime.modules_compiled();
    // A fourth module is refused before it is compiled, and says which quota to raise.
    let err = control.deploy(refused_module(2)).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::QuotaExceeded {
                quota: "max_deploys_per_minute",
                limit: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("3 modules were compiled for tenant 'acme'"),
        "{err}"
    );
    assert_eq!(runtime.modules_compiled(), compiled, "nothing was compiled");
    // Modules compiled before cost nothing: a known refusal is told again, and a module that
    // runs already deploys (the tenant's second deploy of three).
    let err = control.deploy(refused_module(0)).await.unwrap_err();
    assert!(matches!(err, Error::InvalidModule(_)), "{err}");
    control.deploy(deploy_example("acme", "echo2", "echo")).await.unwrap();
    assert_eq!(runtime.modules_compiled(), compiled);
    // Another tenant's compiles are its own.
    let mut other = refused_module(3);
    other.tenant = "beta".into();
    let err = control.deploy(other).await.unwrap_err();
    assert!(matches!(err, Error::InvalidModule(_)), "{err}");
    assert_eq!(runtime.modules_compiled(), compiled + 1);
    assert_eq!(
        control.list(Some("acme")).services.len(),
        2,
        "the refusals appended nothing"
    );
    node.stop(Duration::from_secs(5)).await;
}

/// What acme compiled, or had refused, is nothing to beta: the same module costs beta a compile
/// of its own, and past beta's budget is refused as any other. A shared cache would let beta
/// check guesses at acme's modules (a secret built into one) for free, refused guesses costing
/// nothing and the right one deploying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_compiled_modules_are_not_another_tenants_shortcut() {
    let dir = tempdir();
    let mut config = node_config(dir.path());
    config.limits.max_deploys_per_minute = 2;
    let node = open_node(&config).await;
    let control = &node.control;
    let runtime = control.runtime().unwrap();
    deploy_running(control, "acme", "vault", "echo").await;
    let err = control.deploy(refused_module(0)).await.unwrap_err();
    assert!(matches!(err, Error::InvalidModule(_)), "{err}");
    let compiled = runtime.modules_compiled();

    let as_beta = |mut request: solo::control::DeployRequest| {
        request.tenant = "beta".into();
        request.actor = "tenant:beta".into();
        request
    };
    // The refusal acme had is compiled afresh for beta, and charged; so is another guess.
    for n in 0..2 {
        let err = control.deploy(as_beta(refused_module(n))).await.unwrap_err();
        assert!(matches!(err, Error::InvalidModule(_)), "{err}");
    }
    assert_eq!(runtime.modules_compiled(), compiled + 2);
    // Beta's budget is spent: the module acme runs is refused to it as any other would be.
    let err = control
        .deploy(as_beta(deploy_example("beta", "guess", "echo")))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::QuotaExceeded {
                quota: "max_deploys_per_minute",
                ..
            }
        ),
        "{err}"
    );
    assert!(control.list(Some("beta")).services.is_empty());
    node.stop(Duration::from_secs(5)).await;
}

/// A deploy of [`slow_to_compile_wat`]`(tag)`.
fn slow_to_compile(tenant: &str, id: &str, tag: usize) -> solo::control::DeployRequest {
    let mut request = deploy_request(tenant, id, "");
    request.module = Arc::from(slow_to_compile_wat(tag).into_bytes());
    request
}

/// As [`slow_to_compile`], made a large module (over 256 KiB, so its compile takes one of the
/// node's large compile slots) by a custom section of padding.
fn large_and_slow_to_compile(tenant: &str, id: &str, tag: usize) -> solo::control::DeployRequest {
    let wat = slow_to_compile_wat(tag);
    let padding = format!(r#"(@custom "padding" "{}"))"#, "a".repeat(300 << 10));
    let mut request = deploy_request(tenant, id, "");
    request.module = Arc::from((wat.strip_suffix(')').unwrap().to_string() + &padding).into_bytes());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_compiles_one_module_at_a_time_and_others_do_not_wait_behind_it() {
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = node.control.clone();
    let runtime = control.runtime().unwrap().clone();
    // Tenant acme sends eight distinct modules at once; they compile one after another.
    let flood: Vec<_> = (0..8)
        .map(|n| {
            let control = control.clone();
            tokio::spawn(async move { control.deploy(slow_to_compile("acme", &format!("s{n}"), n)).await })
        })
        .collect();
    while runtime.modules_compiled() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Beta's module does not queue behind them: it is compiled while most of acme's wait.
    control.deploy(slow_to_compile("beta", "b", 100)).await.unwrap();
    let started_for_acme = runtime.modules_compiled() - 1;
    assert!(
        started_for_acme <= 4,
        "acme's modules compiled alongside each other: {started_for_acme} of 8 begun before beta's was done"
    );
    for deploy in flood {
        deploy.await.unwrap().unwrap();
    }
    assert_eq!(runtime.modules_compiled(), 9);
    node.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compile_outlasts_a_caller_that_gave_up_and_serves_the_retry() {
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = &node.control;
    let runtime = control.runtime().unwrap();
    let cached = runtime.cached_modules();
    // As wasm, so that the compile is all the deploy waits for.
    let mut request = slow_to_compile("acme", "s", 7);
    request.module = Arc::from(wat::parse_bytes(&request.module).unwrap().into_owned());
    // The caller gives up (a request timing out) while the module compiles.
    let gave_up = tokio::time::timeout(Duration::from_millis(20), control.deploy(request.clone())).await;
    assert!(gave_up.is_err(), "the compile takes longer than that");
    let deadline = Instant::now() + Duration::from_secs(30);
    while runtime.cached_modules() == cached {
        assert!(Instant::now() < deadline, "the compile was dropped with its caller");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The retry finds it compiled: no second compile.
    let compiled = runtime.modules_compiled();
    control.deploy(request).await.unwrap();
    assert_eq!(runtime.modules_compiled(), compiled);
    node.stop(Duration::from_secs(5)).await;
}

/// A service module whose functions besides the ABI's are `extra` (WAT).
fn module_with(extra: &str) -> solo::control::DeployRequest {
    let mut request = deploy_request("acme", "big", "");
    request.module = Arc::from(
        format!(
            r#"(module (memory (export "memory") 1)
                 (func (export "solo_alloc") (param i32) (result i32) (i32.const 1024))
                 (func (export "solo_handle") (param i32 i32) (result i64) (i64.const 0))
                 {extra})"#
        )
        .into_bytes(),
    );
    request
}

/// What is cheap to send but dear to compile is refused before it is compiled: a large
/// function, many functions, many locals declared in a few bytes, loops nested deep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_over_the_compile_limits_are_refused_naming_the_limit() {
    type Tweak = fn(&mut solo::config::RuntimeConfig);
    let locals = format!("(func (local {}))", "i64 ".repeat(400)).repeat(3);
    let nested = format!("(func {} (nop) {})", "(loop ".repeat(40), ")".repeat(40));
    let cases: [(Tweak, solo::control::DeployRequest, &str); 4] = [
        (
            |rt| rt.max_function_bytes = 200,
            slow_to_compile("acme", "big", 1),
            "bytes of code, over this node's limit of 200 bytes ([runtime] max_function_bytes)",
        ),
        (
            |rt| rt.max_functions = 100,
            slow_to_compile("acme", "big", 1),
            "functions, over this node's limit of 100 ([runtime] max_functions)",
        ),
        (
            |rt| rt.max_locals = 1000,
            module_with(&locals),
            "declare more than 1000 locals, this node's limit ([runtime] max_locals), by entry 4",
        ),
        (
            // 40 loops nested hold 40 × 41 / 2 instructions (their own and the nop) besides
            // their ends: over 1,000.
            |rt| rt.max_looped_instructions = 1000,
            module_with(&nested),
            "inside loops, each counted once for every loop around it, this node's limit ([runtime] \
             max_looped_instructions)",
        ),
    ];
    for (tweak, module, refusal) in cases {
        let dir = tempdir();
        let mut config = node_config(dir.path());
        tweak(&mut config.runtime);
        let node = open_node(&config).await;
        let control = &node.control;
        let err = control.deploy(module).await.unwrap_err();
        assert!(matches!(err, Error::InvalidModule(_)), "{err}");
        assert!(err.to_string().contains(refusal), "{err}");
        // Modules within the limits deploy as ever.
        deploy_running(control, "acme", "echo", "echo").await;
        node.stop(Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restart_brings_running_services_back_fresh_with_their_history() {
    let dir = tempdir();
    let config = node_config(dir.path());
    let node = open_node(&config).await;
    let control = node.control.clone();
    deploy_running(&control, "acme", "counter", "counter").await;
    deploy_running(&control, "beta", "echo", "echo").await;
    let broken = control
        .deploy(deploy_example("acme", "broken", "init_trap"))
        .await
        .unwrap();
    wait_for_kind(&control, broken.seq, "acme", "broken", "service_crashed").await;
    deploy_running(&control, "acme", "gone", "echo").await;
    let killed = control.kill(kill_command("acme", "gone")).await.unwrap();
    wait_for_kind(&control, killed.seq, "acme", "gone", "service_stopped").await;
    for _ in 0..3 {
        call(&control, "acme", "counter", b"").await.unwrap();
    }
    let history = control.head();
    control.shutdown("admin", 1000).await.unwrap();
    node.stop(Duration::from_secs(5)).await;
    drop((node, control));

    let node = open_node(&config).await;
    let control = &node.control;
    let node_started = wait_for_kind(control, history, "", "", "node_started").await;
    let Some(Kind::NodeStarted(started)) = &node_started.kind else {
        unreachable!()
    };
    let mut recovered: Vec<String> = started
        .recovered
        .iter()
        .map(|r| format!("{}/{}", r.tenant, r.service_id))
        .collect();
    recovered.sort();
    assert_eq!(recovered, ["acme/counter", "beta/echo"]);
    assert_eq!(
        call(control, "acme", "counter", b"").await.unwrap(),
        b"1",
        "a fresh instance"
    );
    assert_eq!(call(control, "beta", "echo", b"back").await.unwrap(), b"back");
    assert_eq!(control.status("acme", "broken").unwrap().status.as_str(), "failed");
    assert_eq!(control.status("acme", "gone").unwrap().status.as_str(), "stopped");
    // The history is all there, and the shutdown was recorded.
    let events = control.log().read(1..=control.head()).unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| solo::event::kind_name(e)).collect();
    assert!(kinds.contains(&"shutdown_requested"));
    assert_eq!(kinds.iter().filter(|k| **k == "node_started").count(), 2);
    let stopped_for_shutdown = events.iter().filter(
        |e| matches!(&e.kind, Some(Kind::ServiceStopped(s)) if s.reason() == solo::proto::StopReason::NodeShutdown),
    );
    assert_eq!(stopped_for_shutdown.count(), 2);
    node.stop(Duration::from_secs(5)).await;
}

/// A service that failed to come back because the node could not load its module (a compile
/// limit lowered while the node was down) is tried again at the node's next start, as a kubelet
/// retries an image that failed to pull: once the operator has raised the limit again, it runs.
/// One whose own `solo_init` failed stays down until redeployed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_the_node_could_not_load_is_tried_again_at_its_next_start() {
    let dir = tempdir();
    let config = node_config(dir.path());
    let node = open_node(&config).await;
    let control = node.control.clone();
    let deployed = control.deploy(module_with(&"(func)".repeat(10))).await.unwrap();
    wait_for_kind(&control, deployed.seq, "acme", "big", "service_started").await;
    let broken = control
        .deploy(deploy_example("acme", "broken", "init_trap"))
        .await
        .unwrap();
    wait_for_kind(&control, broken.seq, "acme", "broken", "service_crashed").await;
    node.stop(Duration::from_secs(5)).await;
    drop((node, control));

    let mut lowered = config.clone();
    lowered.runtime.max_functions = 5;
    let node = open_node(&lowered).await;
    let control = node.control.clone();
    let failed = wait_for_kind(&control, deployed.seq, "acme", "big", "service_crashed").await;
    assert!(
        matches!(&failed.kind, Some(Kind::ServiceCrashed(c)) if c.reason() == CrashReason::LoadFailure),
        "{failed:?}"
    );
    let err = call(&control, "acme", "big", b"").await.unwrap_err();
    assert!(err.to_string().contains("max_functions"), "a call says why: {err}");
    node.stop(Duration::from_secs(5)).await;
    drop((node, control));

    let node = open_node(&config).await;
    let control = &node.control;
    let started = wait_for_kind(control, failed.seq, "acme", "big", "service_started").await;
    assert!(matches!(&started.kind, Some(Kind::ServiceStarted(s)) if s.recovered));
    assert!(call(control, "acme", "big", b"").await.is_ok());
    assert_eq!(control.status("acme", "big").unwrap().status.as_str(), "running");
    assert_eq!(control.status("acme", "broken").unwrap().status.as_str(), "failed");
    node.stop(Duration::from_secs(5)).await;
}

/// The config of a node in `dir` that compiles one large module at a time, and that ran `slow`
/// services of large, slow-to-compile modules (acme/s0, s1, …) until it stopped: started
/// again, it takes seconds to bring them back, one after another.
async fn slow_services_stopped(dir: &std::path::Path, slow: usize) -> solo::config::Config {
    let mut config = node_config(dir);
    config.runtime.compile_threads = 1;
    let node = open_node(&config).await;
    for tag in 0..slow {
        let id = format!("s{tag}");
        let request = large_and_slow_to_compile("acme", &id, tag);
        let deployed = node.control.deploy(request).await.unwrap();
        wait_for_kind(&node.control, deployed.seq, "acme", &id, "service_started").await;
    }
    node.stop(Duration::from_secs(5)).await;
    config
}

/// A node stopped while its services come back does not compile the rest first: it gives up
/// the starts not yet compiled (its stop keeps to its grace), records no `node_started`, and
/// the next start brings every service back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_while_its_services_come_back_compiles_no_more() {
    let dir = tempdir();
    let slow = 6;
    let config = slow_services_stopped(dir.path(), slow).await;

    let interrupted = solo::server::open_node_recovering(&config).await.unwrap();
    interrupted.stop(Duration::from_secs(5)).await;
    let loaded = interrupted.runtime.modules_loaded();
    assert!(
        loaded < slow as u64,
        "{loaded} of {slow} modules compiled after the stop"
    );
    drop(interrupted);

    let node = open_node(&config).await;
    assert_eq!(node.runtime.modules_loaded(), slow as u64, "every service came back");
    let events = node.control.log().read(1..=node.control.head()).unwrap();
    let node_started: Vec<usize> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::NodeStarted(started)) => Some(started.recovered.len()),
            _ => None,
        })
        .collect();
    assert_eq!(node_started, [0, slow], "the interrupted start recorded none");
    node.stop(Duration::from_secs(5)).await;
}

/// A service killed while it waits to come back lets its module go at once; its start, when
/// its turn comes, finds no module, and that is no crash (the state refuses a crash of a
/// service being killed): the log says only that it was killed and stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_killed_before_it_came_back_is_not_recorded_as_crashed() {
    let dir = tempdir();
    let slow = 4;
    let config = slow_services_stopped(dir.path(), slow).await;

    // One compile at a time: all but the first to get its turn are killed while they wait.
    let node = solo::server::open_node_recovering(&config).await.unwrap();
    let mut first_kill = None;
    for tag in 0..slow {
        let killed = node
            .control
            .kill(kill_command("acme", &format!("s{tag}")))
            .await
            .unwrap();
        first_kill.get_or_insert(killed.seq);
    }
    let first_kill = first_kill.unwrap();
    let node_started = wait_for_kind(&node.control, first_kill, "", "", "node_started").await;
    let Some(Kind::NodeStarted(started)) = &node_started.kind else {
        unreachable!()
    };
    assert!(started.recovered.len() < slow, "{started:?}");
    // The last start to fail may record its stop just after node_started.
    for tag in 0..slow {
        wait_for_kind(&node.control, first_kill, "acme", &format!("s{tag}"), "service_stopped").await;
    }
    let after_kill = node.control.log().read(first_kill..=node.control.head()).unwrap();
    let crashed: Vec<_> = after_kill
        .iter()
        .filter(|e| matches!(e.kind, Some(Kind::ServiceCrashed(_))))
        .collect();
    assert!(crashed.is_empty(), "{crashed:?}");
    for tag in 0..slow {
        let status = node.control.status("acme", &format!("s{tag}")).unwrap().status;
        assert_eq!(status.as_str(), "stopped", "s{tag}");
    }
    node.stop(Duration::from_secs(5)).await;
}

/// Runs a node of `config` until echo runs as acme/`id`, then stops it.
async fn echo_deployed_and_node_stopped(config: &solo::config::Config, id: &str) {
    let node = open_node(config).await;
    deploy_running(&node.control, "acme", id, "echo").await;
    node.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_modules_cannot_be_read_refuses_to_start_and_records_nothing() {
    let dir = tempdir();
    let config = node_config(dir.path());
    echo_deployed_and_node_stopped(&config, "echo").await;
    let head = {
        let control = common::open(options(dir.path()));
        let head = control.head();
        control.close().await;
        head
    };

    // Zero the page that holds the module, as a lost write would: LMDB then finds a page that
    // is not a leaf where the module's leaf should be.
    const PAGE: usize = 4096;
    let path = dir.path().join("data.mdb");
    let mut bytes = std::fs::read(&path).unwrap();
    let pages: std::collections::BTreeSet<usize> = places_of(&bytes, b"echo ready")
        .into_iter()
        .map(|at| at / PAGE)
        .collect();
    for page in pages {
        bytes[page * PAGE..(page + 1) * PAGE].fill(0);
    }
    std::fs::write(&path, bytes).unwrap();

    // The walk of the pages as the store opens finds it first: before any module is read.
    let err = match solo::server::open_node(&config).await {
        Ok(_) => panic!("a node started on a damaged data file"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("damaged") && err.contains("LMDB page"), "{err}");
    let store = solo::log::Store::open_unlocked(dir.path(), &options(dir.path()).log.store).unwrap();
    assert_eq!(store.head().unwrap(), head, "nothing was recorded on the damaged file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_gave_up_fails_calls_at_once_even_when_the_log_cannot_say_so() {
    let dir = tempdir();
    let mut config = node_config(dir.path());
    config.database.map_size_mb = 1;
    config.limits.max_deploys_per_minute = u32::MAX;
    config.limits.max_history_mb_per_hour = u64::MAX;
    let node = open_node(&config).await;
    let control = node.control.clone();
    // Its crash event names the function that trapped: a long name makes it (cut to 1 KiB) far
    // larger than the least filler below, so that it cannot fit in what the filling leaves.
    let mut crasher = trapping_in("crash", 12 << 10);
    crasher.limits.max_restarts = 1;
    crasher.limits.call_timeout_ms = 20_000;
    let deployed = control.deploy(crasher).await.unwrap();
    wait_for_kind(&control, deployed.seq, "acme", "crash", "service_started").await;

    // Fill the log: upgrades with labels, smaller and smaller, until not even the least fits.
    // Each filler's labels are new (an identical deploy would write nothing, and pass).
    let fillers = std::cell::Cell::new(0u32);
    let fill = async |value_len: usize| -> u32 {
        for fitted in 0u32.. {
            let n = fillers.replace(fillers.get() + 1);
            let mut filler = deploy_example("acme", "filler", "echo");
            let labels = if value_len == 0 { 1 } else { 64 };
            filler.labels = (0..labels)
                .map(|i| (format!("k{i}"), format!("{n:0>width$}", width = value_len.max(1))))
                .collect();
            match control.deploy(filler).await {
                Ok(_) => {}
                Err(Error::Storage(_)) => return fitted,
                Err(e) => panic!("{e}"),
            }
            assert!(n < 100_000, "the 1 MiB log never filled");
        }
        unreachable!()
    };
    for value_len in [256, 16, 0] {
        fill(value_len).await;
    }
    // Pages that earlier commits freed come back once no reader holds them any more (the
    // tailers move on): fill those too, until nothing more fits after a pause.
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if fill(0).await == 0 {
            break;
        }
    }

    // A trap, a restart, a second trap: the policy gives up. None of it can be recorded.
    for _ in 0..2 {
        let err = call(&control, "acme", "crash", b"x").await.unwrap_err();
        assert!(matches!(err, Error::Call(CallError::Trapped { .. })), "{err}");
    }
    let service = control.status("acme", "crash").unwrap();
    assert_eq!(service.status.as_str(), "running", "the log could not take the crashes");
    // A call sent as the second trap is answered may still reach the last instance's mailbox,
    // which closes as the actor gives up.
    let err = call(&control, "acme", "crash", b"x").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Call(CallError::NotRunning { .. } | CallError::Stopped { .. })
        ),
        "{err}"
    );
    // From then on calls fail at once, not after their 20 s timeout.
    let err = call(&control, "acme", "crash", b"x").await.unwrap_err();
    assert!(matches!(err, Error::Call(CallError::NotRunning { .. })), "{err}");
    node.stop(Duration::from_secs(5)).await;
}

/// A service whose `solo_init` keeps the CPU busy for `ms` milliseconds (at most 30,000, its
/// CPU limit).
fn slow_to_start(tenant: &str, id: &str, ms: u64) -> solo::control::DeployRequest {
    let wat = format!(
        r#"(module
            (import "solo" "now_ms" (func $now (result i64)))
            (memory (export "memory") 1)
            (func (export "solo_init") (result i32)
                (local $until i64)
                (local.set $until (i64.add (call $now) (i64.const {ms})))
                (loop $spin (br_if $spin (i64.lt_u (call $now) (local.get $until))))
                (i32.const 0))
            (func (export "solo_alloc") (param i32) (result i32) (i32.const 1024))
            (func (export "solo_handle") (param i32 i32) (result i64) (i64.const 0)))"#
    );
    solo::control::DeployRequest {
        module: Arc::from(wat.into_bytes()),
        limits: Limits {
            cpu_ms_per_call: 30_000,
            ..Limits::default()
        },
        ..deploy_request(tenant, id, "")
    }
}

/// A node whose starts may take a minute, so that only a kill or a shutdown ends a slow one.
fn patient_config(dir: &std::path::Path) -> solo::config::Config {
    let mut config = node_config(dir);
    config.runtime.start_timeout_ms = 60_000;
    config
}

/// Kinds of the events of `id` from `from_seq` on.
fn kinds_of(control: &solo::control::Control, from_seq: u64, id: &str) -> Vec<String> {
    let events = control.log().read(from_seq..=control.head()).unwrap();
    events
        .iter()
        .filter(|e| e.service_id == id)
        .map(|e| solo::event::kind_name(e).to_string())
        .collect()
}

/// A forced kill is `kill -9`: it does not wait for a `solo_init` under way, whether the service
/// is new or an upgrade of one that runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_kill_gives_up_a_start_under_way() {
    let dir = tempdir();
    let node = open_node(&patient_config(dir.path())).await;
    let control = &node.control;
    deploy_running(control, "acme", "upgraded", "echo").await;
    for id in ["fresh", "upgraded"] {
        let deployed = control.deploy(slow_to_start("acme", id, 20_000)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await; // solo_init is under way
        let asked = Instant::now();
        let forced = KillCommand {
            force: true,
            ..kill_command("acme", id)
        };
        let killed = control.kill(forced).await.unwrap();
        wait_for_kind(control, killed.seq, "acme", id, "service_stopped").await;
        assert!(asked.elapsed() < Duration::from_secs(5), "{id}: {:?}", asked.elapsed());
        assert_eq!(
            kinds_of(control, deployed.seq, id),
            ["service_deployed", "service_kill_requested", "service_stopped"],
            "{id}: the given-up start recorded nothing"
        );
        assert_eq!(control.status("acme", id).unwrap().status.as_str(), "stopped");
        assert!(control.live("acme", id).is_none_or(|l| l.memory_bytes == 0), "{id}");
    }
    node.stop(Duration::from_secs(5)).await;
}

/// A shutdown gives up the starts under way and bounds everything by its grace: a graceful
/// kill under way with a longer grace of its own is cut short with it, and nothing is recorded
/// as started once the shutdown is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_gives_up_starts_and_cuts_kills_under_way_at_its_grace() {
    let dir = tempdir();
    let config = patient_config(dir.path());
    let node = open_node(&config).await;
    let control = node.control.clone();
    spin_running(&control, "draining").await;
    let busy = call_in_flight(&control, "draining", 20000);
    tokio::time::sleep(Duration::from_millis(300)).await; // the call is under way
    let patient_kill = KillCommand {
        grace_ms: 60_000,
        ..kill_command("acme", "draining")
    };
    control.kill(patient_kill).await.unwrap();
    control.deploy(slow_to_start("acme", "starting", 20_000)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // its solo_init is under way

    let asked = Instant::now();
    let (shutdown_seq, _) = control.shutdown("admin", 500).await.unwrap();
    node.stop(Duration::from_millis(500)).await;
    assert!(asked.elapsed() < Duration::from_secs(5), "{:?}", asked.elapsed());
    assert!(busy.await.unwrap().is_err(), "the call in flight was cut off");
    // The log is still readable through the stopped node's handle.
    let after: Vec<_> = control.log().read(shutdown_seq..=control.head()).unwrap();
    let kinds: Vec<&str> = after.iter().map(|e| solo::event::kind_name(e)).collect();
    assert_eq!(
        kinds,
        ["shutdown_requested", "service_stopped"],
        "only the kill's stop, and no start: {after:?}"
    );
    assert_eq!(control.status("acme", "draining").unwrap().status.as_str(), "stopped");
    assert!(control.status("acme", "starting").unwrap().comes_back_with_the_node());
}

/// Calls to a service the state says is starting wait for it, within their timeout: right after
/// its deploy is acknowledged, and while the version before it drains a graceful kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_wait_for_a_start_the_state_promises() {
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = node.control.clone();
    for round in 0..50 {
        let id = format!("echo{round}");
        control.deploy(deploy_example("acme", &id, "echo")).await.unwrap();
        assert_eq!(call(&control, "acme", &id, b"hi").await.unwrap(), b"hi", "{id}");
    }

    spin_running(&control, "swap").await;
    let busy = call_in_flight(&control, "swap", 1500);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let graceful = KillCommand {
        grace_ms: 10_000,
        ..kill_command("acme", "swap")
    };
    control.kill(graceful).await.unwrap();
    // The runtime takes the old instance's calls away as it reads the kill; a call that
    // reaches it before (a busy machine) is queued to it, and served by the drain: a payload
    // of "1" keeps the spin service's answer to it quick too.
    tokio::time::sleep(Duration::from_millis(200)).await;
    control.deploy(deploy_example("acme", "swap", "echo")).await.unwrap();
    let waited = Instant::now();
    let answer = control
        .call("acme", "swap", b"1".to_vec(), Some(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(answer == b"1" || answer == b"done", "{answer:?}");
    assert!(waited.elapsed() > Duration::from_millis(500), "it waited for the drain");
    assert_eq!(
        busy.await.unwrap().unwrap(),
        b"done",
        "the drain served the call in flight"
    );
    node.stop(Duration::from_secs(5)).await;
}

/// An upgrade whose new version fails to start leaves the service failed, but the old
/// version serves the calls it had accepted, as after a successful upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_lets_the_old_version_finish_its_calls() {
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = node.control.clone();
    spin_running(&control, "svc").await;
    let busy = call_in_flight(&control, "svc", 1500);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let upgraded = control
        .deploy(deploy_example("acme", "svc", "init_trap"))
        .await
        .unwrap();
    wait_for_kind(&control, upgraded.seq, "acme", "svc", "service_crashed").await;
    assert_eq!(busy.await.unwrap().unwrap(), b"done");
    let stopped = stop_of(&control, upgraded.seq, "svc", 1).await;
    assert_eq!(
        (stopped.reason(), stopped.outcome(), stopped.calls_cut_off),
        (StopReason::Replaced, StopOutcome::Clean, 0)
    );
    assert_eq!(control.status("acme", "svc").unwrap().status.as_str(), "failed");
    let err = call(&control, "acme", "svc", b"1").await.unwrap_err();
    assert!(matches!(err, Error::NotRunning { .. }), "{err}");
    node.stop(Duration::from_secs(5)).await;
}

/// Version `tag` of the `spin` example (a data segment of its own makes it another module), with
/// room for calls of up to 30 s.
fn spin_version(id: &str, tag: u64) -> solo::control::DeployRequest {
    let wat = String::from_utf8(example("spin").to_vec()).unwrap().replace(
        r#"(data (i32.const 16) "done")"#,
        &format!(r#"(data (i32.const 16) "done") (data (i32.const 32) "v{tag}")"#),
    );
    solo::control::DeployRequest {
        module: Arc::from(wat.into_bytes()),
        limits: Limits {
            call_timeout_ms: 30_000,
            cpu_ms_per_call: 30_000,
            ..Limits::default()
        },
        ..deploy_request("acme", id, "")
    }
}

/// Upgrades over a busy service do not pile its instances up, each with its memory: the
/// version an upgrade replaced finishes its call beside the new one, but the next upgrade cuts
/// it short. And a forced kill stops the replaced version too, not only the current one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_over_a_busy_service_hold_at_most_two_of_its_instances() {
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = node.control.clone();
    let runtime = control.runtime().unwrap();
    spin_running(&control, "svc").await;
    let mut busy = Vec::new();
    for version in 2..=5 {
        busy.push(call_in_flight(&control, "svc", 20_000));
        // The call is on its way to the current version (under way, or queued behind none).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let upgraded = control.deploy(spin_version("svc", version)).await.unwrap();
        assert_eq!(upgraded.version, version);
        wait_for_kind(&control, upgraded.seq, "acme", "svc", "service_started").await;
        assert!(
            runtime.live_instances() <= 2,
            "{} instances alive after upgrading to version {version}",
            runtime.live_instances()
        );
    }
    // Versions 1 to 3 were cut short; version 4, replaced last, still serves its call.
    let cut_by = Instant::now() + Duration::from_secs(5);
    for (version, call) in busy.drain(..3).enumerate() {
        let answer = tokio::time::timeout_at(cut_by.into(), call).await;
        let answer = answer.unwrap_or_else(|_| panic!("version {}'s call still runs", version + 1));
        let err = answer.unwrap().unwrap_err();
        assert!(matches!(err, Error::Call(CallError::Stopped { .. })), "{err}");
    }
    assert!(!busy[0].is_finished(), "the replaced version finishes its call");
    assert_eq!(runtime.live_instances(), 2);
    // Each version cut short has its stop on record, with the call it cut off.
    for version in 1..=3 {
        let stopped = stop_of(&control, 1, "svc", version).await;
        assert_eq!(
            (stopped.reason(), stopped.outcome(), stopped.calls_cut_off),
            (StopReason::Replaced, StopOutcome::Forced, 1),
            "version {version}: {stopped:?}"
        );
    }

    let started = Instant::now();
    let forced = control
        .kill(KillCommand {
            force: true,
            ..kill_command("acme", "svc")
        })
        .await
        .unwrap();
    wait_for_kind(&control, forced.seq, "acme", "svc", "service_stopped").await;
    let cut = tokio::time::timeout(Duration::from_secs(3), busy.remove(0)).await;
    assert!(cut.expect("the forced kill cut the call short").unwrap().is_err());
    let replaced = stop_of(&control, forced.seq, "svc", 4).await;
    assert_eq!(
        (replaced.reason(), replaced.outcome(), replaced.calls_cut_off),
        (StopReason::Replaced, StopOutcome::Forced, 1)
    );
    let killed = stop_of(&control, forced.seq, "svc", 5).await;
    assert_eq!(
        (killed.reason(), killed.outcome()),
        (StopReason::Killed, StopOutcome::Forced)
    );
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    while runtime.live_instances() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "instances outlive a forced kill"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node.stop(Duration::from_secs(5)).await;
}

/// The restart policy's window holds across a node restart: a service that used its restarts
/// before the node stopped has none left after it, until the window has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_restart_policy_window_holds_across_a_node_restart() {
    let dir = tempdir();
    let config = node_config(dir.path());
    let node = open_node(&config).await;
    let mut request = deploy_example("acme", "u", "unreachable");
    request.limits = Limits {
        max_restarts: 2,
        restart_window_ms: 600_000,
        ..Limits::default()
    };
    let deployed = node.control.deploy(request).await.unwrap();
    wait_for_kind(&node.control, deployed.seq, "acme", "u", "service_started").await;
    let mut from = deployed.seq;
    for _ in 0..2 {
        assert!(call(&node.control, "acme", "u", b"x").await.is_err());
        from = wait_for_kind(&node.control, from, "acme", "u", "service_restarted")
            .await
            .seq
            + 1;
    }
    let before = node.control.status("acme", "u").unwrap();
    assert_eq!((before.status.as_str(), before.restarts), ("running", 2));
    assert_eq!(before.restart_times_ms.len(), 2);
    node.stop(Duration::from_secs(5)).await;
    drop(node);

    let node = open_node(&config).await;
    let control = &node.control;
    let back = control.status("acme", "u").unwrap();
    assert_eq!((back.status.as_str(), back.restarts), ("running", 2));
    assert_eq!(
        back.restart_times_ms, before.restart_times_ms,
        "the projection kept them"
    );
    let head = control.head();
    assert!(call(control, "acme", "u", b"x").await.is_err());
    let crashed = wait_for_kind(control, head, "acme", "u", "service_crashed").await;
    let Some(Kind::ServiceCrashed(c)) = &crashed.kind else {
        unreachable!()
    };
    assert!(!c.restarting, "the window still holds two restarts: {c:?}");
    assert_eq!(control.status("acme", "u").unwrap().status.as_str(), "crashed");
    node.stop(Duration::from_secs(5)).await;
}

/// The node's room for instances counts a service being killed until it has stopped: its
/// instance exists until then, and a deploy let in meanwhile would fail to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instance_pool_counts_services_still_stopping() {
    let dir = tempdir();
    let mut config = node_config(dir.path());
    config.runtime.max_instances = 2;
    let node = open_node(&config).await;
    let control = node.control.clone();
    spin_running(&control, "draining").await;
    let busy = call_in_flight(&control, "draining", 1500);
    tokio::time::sleep(Duration::from_millis(200)).await; // the call is under way
    let graceful = KillCommand {
        grace_ms: 10_000,
        ..kill_command("acme", "draining")
    };
    let killed = control.kill(graceful).await.unwrap();
    deploy_running(&control, "beta", "one", "echo").await;
    let err = control.deploy(deploy_example("beta", "two", "echo")).await.unwrap_err();
    assert_refused_by(&err, "runtime.max_instances");
    assert!(err.to_string().contains("1 more are stopping"), "{err}");
    assert_eq!(busy.await.unwrap().unwrap(), b"done");
    wait_for_kind(&control, killed.seq, "acme", "draining", "service_stopped").await;
    deploy_running(&control, "beta", "two", "echo").await;
    node.stop(Duration::from_secs(5)).await;
}

/// The `service_stopped` of `version` of acme/`id` at or after `from_seq`.
async fn stop_of(
    control: &solo::control::Control,
    from_seq: u64,
    id: &str,
    version: u64,
) -> solo::proto::ServiceStopped {
    let event = wait_for_event(control, from_seq, |e| {
        e.service_id == id && matches!(&e.kind, Some(Kind::ServiceStopped(s)) if s.version == version)
    })
    .await;
    let Some(Kind::ServiceStopped(stopped)) = &event.kind else {
        unreachable!()
    };
    stopped.clone()
}

/// A killed version that a deploy replaces while it is still stopping has its stop recorded
/// (the history says what became of it, and `kill --wait` learns of it), and the new version
/// starts once the old one has stopped: one instance at a time, as Kubernetes' `Recreate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_version_replaced_while_stopping_records_its_stop() {
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = node.control.clone();
    spin_running(&control, "draining").await;
    let busy = call_in_flight(&control, "draining", 1500);
    tokio::time::sleep(Duration::from_millis(200)).await; // the call is under way
    let graceful = KillCommand {
        grace_ms: 10_000,
        ..kill_command("acme", "draining")
    };
    let killed = control.kill(graceful).await.unwrap();
    let redeployed = control
        .deploy(deploy_example("acme", "draining", "echo"))
        .await
        .unwrap();
    assert_eq!(redeployed.version, 2);
    assert_eq!(
        busy.await.unwrap().unwrap(),
        b"done",
        "the killed version finished its call"
    );
    assert_eq!(
        stop_of(&control, killed.seq, "draining", 1).await.reason(),
        StopReason::Killed
    );
    wait_for_kind(&control, redeployed.seq, "acme", "draining", "service_started").await;
    assert_eq!(
        kinds_of(&control, killed.seq, "draining"),
        [
            "service_kill_requested",
            "service_deployed",
            "service_stopped",
            "service_started"
        ]
    );
    assert_eq!(call(&control, "acme", "draining", b"hi").await.unwrap(), b"hi");
    let status = control.status("acme", "draining").unwrap();
    assert_eq!((status.version, status.status.as_str()), (2, "running"));
    node.stop(Duration::from_secs(5)).await;
}

/// A node that went down while a killed version, already replaced, was still stopping records
/// that version's stop as it comes back, then starts the version that replaced it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_version_replaced_while_stopping_is_stopped_on_record_at_the_next_start() {
    let dir = tempdir();
    let config = node_config(dir.path());
    echo_deployed_and_node_stopped(&config, "a").await;
    // The log alone: the kill is recorded, and the redeploy, but no instance stops on record.
    let (control, _) = solo::control::Control::open(config.control_options().unwrap()).unwrap();
    let killed = kill(&control, "acme", "a").await;
    let echo = wat::parse_bytes(&example("echo")).unwrap().into_owned();
    let redeploy = solo::control::DeployRequest {
        module: Arc::from(echo),
        ..deploy_request("acme", "a", "")
    };
    assert_eq!(control.deploy(redeploy).await.unwrap().version, 2);
    control.close().await;
    drop(control);

    let node = open_node(&config).await;
    let control = &node.control;
    assert_eq!(stop_of(control, killed.seq, "a", 1).await.reason(), StopReason::Killed);
    wait_for_kind(control, killed.seq, "acme", "a", "service_started").await;
    assert_eq!(
        kinds_of(control, killed.seq, "a"),
        [
            "service_kill_requested",
            "service_deployed",
            "service_stopped",
            "service_started"
        ]
    );
    assert_eq!(call(control, "acme", "a", b"back").await.unwrap(), b"back");
    node.stop(Duration::from_secs(5)).await;
}

/// WAT text is converted before its module's hash is known, so the conversion is charged as a
/// compile: text that does not parse counts against the deploy rate, and so does any text over
/// the size of a small module, whatever it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converting_wat_counts_against_the_deploy_rate() {
    let dir = tempdir();
    let mut config = node_config(dir.path());
    config.limits.max_deploys_per_minute = 3;
    let node = open_node(&config).await;
    let control = &node.control;
    let wat = |text: String| solo::control::DeployRequest {
        module: Arc::from(text.into_bytes()),
        ..deploy_request("acme", "w", "")
    };
    for _ in 0..2 {
        let err = control.deploy(wat("(module (oops))".into())).await.unwrap_err();
        assert!(matches!(err, Error::InvalidModule(_)), "{err}");
    }
    // Large text: a comment pads a small module past 256 KiB.
    let padded = format!(
        ";; {}\n{}",
        "x".repeat(300 << 10),
        String::from_utf8(example("echo").to_vec()).unwrap()
    );
    control.deploy(wat(padded.clone())).await.unwrap();
    let err = control.deploy(wat(padded)).await.unwrap_err();
    assert_refused_by(&err, "max_deploys_per_minute");
    // Past the budget, text that does not convert is refused as over it; small text of a
    // module compiled before (the padded text's) still costs nothing.
    let err = control.deploy(wat("(module (oops))".into())).await.unwrap_err();
    assert_refused_by(&err, "max_deploys_per_minute");
    control.deploy(deploy_example("acme", "echo", "echo")).await.unwrap();
    node.stop(Duration::from_secs(5)).await;
}

/// A deploy gives up the start of the version before it still under way, `solo_init` and all:
/// only the newest version is worth starting, as when a rollout supersedes another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_gives_up_the_start_of_the_version_before_it() {
    let dir = tempdir();
    let node = open_node(&patient_config(dir.path())).await;
    let control = &node.control;
    let first = control.deploy(slow_to_start("acme", "svc", 20_000)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // solo_init is under way
    let asked = Instant::now();
    let second = control.deploy(deploy_example("acme", "svc", "echo")).await.unwrap();
    wait_for_kind(control, second.seq, "acme", "svc", "service_started").await;
    assert!(asked.elapsed() < Duration::from_secs(5), "{:?}", asked.elapsed());
    assert_eq!(
        kinds_of(control, first.seq, "svc"),
        ["service_deployed", "service_deployed", "service_started"],
        "version 1 never started"
    );
    assert_eq!(call(control, "acme", "svc", b"hi").await.unwrap(), b"hi");
    node.stop(Duration::from_secs(5)).await;
}

/// While the next version starts, calls wait for it even if the version before it goes down
/// meanwhile (its restart policy gave up): the state says the service is starting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_wait_for_the_next_version_when_the_one_before_goes_down() {
    let dir = tempdir();
    let node = open_node(&patient_config(dir.path())).await;
    let control = &node.control;
    let mut crasher = deploy_example("acme", "svc", "unreachable");
    crasher.limits = Limits {
        max_restarts: 1,
        ..Limits::default()
    };
    let first = control.deploy(crasher).await.unwrap();
    wait_for_kind(control, first.seq, "acme", "svc", "service_started").await;
    control.deploy(slow_to_start("acme", "svc", 1500)).await.unwrap();
    // Version 1 traps twice (once restarted, then given up on) while version 2 starts.
    for _ in 0..2 {
        let err = call(control, "acme", "svc", b"x").await.unwrap_err();
        assert!(matches!(err, Error::Call(CallError::Trapped { .. })), "{err}");
    }
    let answer = loop {
        match control
            .call("acme", "svc", b"x".to_vec(), Some(Duration::from_secs(20)))
            .await
        {
            // Queued to version 1 in the moment between its last answer and its going down.
            Err(Error::Call(CallError::Stopped { .. })) => continue,
            answer => break answer.unwrap(),
        }
    };
    assert!(answer.is_empty(), "version 2 answered: {answer:?}");
    node.stop(Duration::from_secs(5)).await;
}

/// The instance takes calls as soon as it is up, while its start is being recorded; a call
/// that traps at once must not have its crash (or its restart) reach the log first, or the
/// history would say the version crashed before it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_traps_at_its_first_call_is_on_record_as_started_first() {
    use futures_util::StreamExt;
    let dir = tempdir();
    let node = open_node(&node_config(dir.path())).await;
    let control = node.control.clone();
    let rounds = 60;
    for round in 0..rounds {
        let id = format!("crasher{round}");
        control
            .deploy(deploy_example("acme", &id, "unreachable"))
            .await
            .unwrap();
        // Calls that wait for the instance, and reach it the moment it is up.
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let (control, id) = (control.clone(), id.clone());
                tokio::spawn(async move { call(&control, "acme", &id, b"boom").await })
            })
            .collect();
        for called in calls {
            assert!(called.await.unwrap().is_err(), "{id}: the crasher answered");
        }
    }
    let last = format!("crasher{}", rounds - 1);
    let head = wait_for_kind(&control, 1, "acme", &last, "service_crashed").await.seq;
    let mut tail = Box::pin(control.log().tail(1));
    let mut started = std::collections::HashSet::new();
    let mut seq = 0;
    while seq < head {
        let event = tail.next().await.unwrap().unwrap();
        seq = event.seq;
        match solo::event::kind_name(&event) {
            "service_started" => {
                started.insert(event.service_id.clone());
            }
            "service_crashed" | "service_restarted" => assert!(
                started.contains(&event.service_id),
                "{} {} at seq {} before its start",
                event.service_id,
                solo::event::kind_name(&event),
                event.seq
            ),
            _ => {}
        }
    }
    node.stop(Duration::from_secs(5)).await;
}
