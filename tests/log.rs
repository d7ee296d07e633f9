//! The log and the control writer: tails, durability, bad input and recovery.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use solo::control::{Control, DeployRequest, Error, KillCommand};
use solo::event::EventKind;
use solo::inspect;
use solo::log::{FrameError, frame};
use solo::proto::event::Kind;
use solo::state::State;
use tokio::time::timeout;

/// A guard against hangs: generous, never a performance assertion.
const PATIENCE: Duration = Duration::from_secs(60);

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temp dir")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tailer_from_one_sees_every_event_once_in_order_during_concurrent_writes() {
    let dir = tempdir();
    let control = open(options(dir.path()));
    let writers = 8;
    let per_writer = 50;
    let total = (writers * per_writer) as u64;

    let tailer = {
        let mut tail = Box::pin(control.log().tail(1));
        tokio::spawn(async move {
            let mut seqs = Vec::new();
            while let Some(event) = tail.next().await {
                let event = event.expect("tail reads");
                seqs.push(event.seq);
                if event.seq == total {
                    break;
                }
            }
            seqs
        })
    };
    let mut tasks = Vec::new();
    for w in 0..writers {
        let control = control.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                deploy(&control, &format!("t{w}"), &format!("svc-{i}"), "m").await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let seqs = timeout(PATIENCE, tailer).await.expect("tailer finishes").unwrap();
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tailer_does_not_hold_back_the_writer_or_the_other_tailers() {
    let dir = tempdir();
    let mut opts = options(dir.path());
    opts.log.tail_window = 64; // the stalled tailer will fall far behind the window
    opts.log.tail_read_chunk = 100;
    opts.limits.node.max_deploys_per_minute = u32::MAX;
    let control = open(opts);
    let total = 1_000u64;

    // The stalled tailer reads one event, then nobody polls it until the end.
    let mut stalled = Box::pin(control.log().tail(1));
    let mut tailers = Vec::new();
    for _ in 0..99 {
        let mut tail = Box::pin(control.log().tail(1));
        tailers.push(tokio::spawn(async move {
            let mut next = 1;
            while next <= total {
                let event = tail.next().await.expect("stream open").expect("tail reads");
                assert_eq!(event.seq, next);
                next += 1;
            }
        }));
    }
    let writer = {
        let control = control.clone();
        tokio::spawn(async move {
            for i in 0..total {
                deploy(&control, "acme", &format!("svc-{}", i % 50), &format!("m{i}")).await;
            }
        })
    };
    let first = stalled.next().await.unwrap().unwrap();
    assert_eq!(first.seq, 1);
    timeout(PATIENCE, writer)
        .await
        .expect("the writer is not held back")
        .unwrap();
    for tailer in tailers {
        timeout(PATIENCE, tailer)
            .await
            .expect("the other tailers keep up")
            .unwrap();
    }
    assert_eq!(control.head(), total);
    // The stalled tailer resumes from disk, missing nothing.
    for expected in 2..=total {
        let event = timeout(PATIENCE, stalled.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(event.seq, expected);
    }
}

/// Replays of history read the disk in turns, one chunk at a time (`tail_disk_readers`), and
/// each still gets every event, in order, while the log goes on growing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_from_disk_take_turns_and_each_gets_every_event() {
    let dir = tempdir();
    let mut opts = options(dir.path());
    opts.log.tail_window = 64;
    opts.log.tail_read_chunk = 100;
    opts.log.tail_disk_readers = 1;
    opts.limits.node.max_deploys_per_minute = u32::MAX;
    let control = open(opts);
    let (written, total) = (1_000u64, 1_500u64);
    for i in 0..written {
        deploy(&control, "acme", &format!("svc-{}", i % 50), &format!("m{i}")).await;
    }
    let replays: Vec<_> = (0..50)
        .map(|_| {
            let mut tail = Box::pin(control.log().tail(1));
            tokio::spawn(async move {
                for expected in 1..=total {
                    let event = tail.next().await.expect("stream open").expect("tail reads");
                    assert_eq!(event.seq, expected);
                }
            })
        })
        .collect();
    for i in written..total {
        deploy(&control, "acme", &format!("svc-{}", i % 50), &format!("m{i}")).await;
    }
    for replay in replays {
        timeout(PATIENCE, replay).await.expect("every replay ends").unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_past_the_head_waits_for_new_events() {
    let dir = tempdir();
    let control = open(options(dir.path()));
    deploy(&control, "acme", "a", "m1").await;
    let mut tail = Box::pin(control.log().tail(3));
    assert!(
        timeout(Duration::from_millis(200), tail.next()).await.is_err(),
        "nothing to read yet"
    );
    deploy(&control, "acme", "b", "m1").await;
    assert!(
        timeout(Duration::from_millis(200), tail.next()).await.is_err(),
        "seq 2 is before the start"
    );
    deploy(&control, "acme", "c", "m1").await;
    let event = timeout(PATIENCE, tail.next()).await.unwrap().unwrap().unwrap();
    assert_eq!((event.seq, event.service_id.as_str()), (3, "c"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tails_end_when_the_log_closes() {
    let dir = tempdir();
    let control = open(options(dir.path()));
    let mut tail = Box::pin(control.log().tail(1));
    control.close().await;
    drop(control);
    assert!(timeout(PATIENCE, tail.next()).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_state_survives_a_reopen_and_replays_equal() {
    let dir = tempdir();
    let control = open(options(dir.path()));
    deploy(&control, "acme", "a", "m1").await;
    deploy(&control, "acme", "a", "m2").await;
    deploy(&control, "beta", "a", "m1").await;
    kill(&control, "beta", "a").await;
    let live = control.read_state(Clone::clone);
    let head = control.head();
    control.close().await;
    drop(control);

    let (control, recovery) = Control::open(options(dir.path())).unwrap();
    assert_eq!((recovery.head, recovery.replayed, recovery.skipped), (head, head, 0));
    assert_eq!(control.read_state(Clone::clone), live);
    let a = control.status("acme", "a").unwrap();
    assert_eq!((a.version, a.status.as_str()), (2, "starting"));
    assert_eq!(control.status("beta", "a").unwrap().status.as_str(), "stopping");
    assert!(matches!(control.status("acme", "nope"), Err(Error::NotFound { .. })));
    // Tenants have their own namespaces.
    assert!(matches!(control.status("gamma", "a"), Err(Error::NotFound { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeploying_the_identical_module_is_a_no_op_that_says_so() {
    let dir = tempdir();
    let control = open(options(dir.path()));
    let first = deploy(&control, "acme", "a", "m1").await;
    assert!(first.created && !first.unchanged);
    let again = deploy(&control, "acme", "a", "m1").await;
    assert!(again.unchanged && !again.created);
    assert_eq!((again.version, again.seq), (1, first.seq));
    assert_eq!(control.head(), 1, "nothing appended");
    let upgrade = deploy(&control, "acme", "a", "m2").await;
    assert_eq!((upgrade.version, upgrade.created, upgrade.seq), (2, false, 2));
}

/// Deploys and kills `acme/a`, and returns a keyed kill of it: a request that changes nothing.
async fn keyed_kill_of_a_stopped_service(control: &Control) -> KillCommand {
    deploy(control, "acme", "a", "m1").await;
    control.kill(kill_command("acme", "a")).await.unwrap();
    KillCommand {
        idempotency_key: "kill-1".into(),
        ..kill_command("acme", "a")
    }
}

#[tokio::test]
async fn log_verify_reads_back_every_remembered_request() {
    use prost::Message as _;
    let dir = tempdir();
    let control = open(options(dir.path()));
    let kill = keyed_kill_of_a_stopped_service(&control).await;
    assert!(control.kill(kill).await.unwrap().already_stopped);
    let settings = control.read_state(|s| s.settings());
    let store = control.log().store();
    let report = inspect::verify(store, settings).unwrap();
    assert!(report.ok(), "{}", report.summary());
    assert_eq!(report.requests, 1);
    assert!(
        report.summary().contains("1 remembered requests"),
        "{}",
        report.summary()
    );

    // A copy of it under another key, one resting on a seq past the head, and bytes that are
    // no record at all.
    let (_, stored) = store.requests().unwrap().remove(0);
    let stored = stored.unwrap();
    let mut past = solo::proto::NoOpRequest::decode(stored.as_slice()).unwrap();
    past.key = "kill-2".into();
    past.seq = control.head() + 5;
    let puts = [
        (b"acme\0elsewhere".to_vec(), stored),
        (b"acme\0kill-2".to_vec(), past.encode_to_vec()),
        (b"acme\0garbage".to_vec(), b"\xff\xff not protobuf".to_vec()),
    ];
    let changes = solo::log::RequestChanges {
        put: &puts,
        delete: &[],
    };
    store
        .append(control.head() + 1, [], solo::log::BlobChanges::default(), changes)
        .unwrap();
    let report = inspect::verify(store, settings).unwrap();
    assert!(!report.ok());
    assert_eq!(report.requests, 4);
    let problems = report.problems.join("\n");
    assert_eq!(report.problems.len(), 3, "{problems}");
    assert!(
        problems.contains("\"acme/elsewhere\" cannot be read back (it is stored under another key"),
        "{problems}"
    );
    assert!(problems.contains("\"acme/kill-2\" rests on seq"), "{problems}");
    assert!(
        problems.contains("\"acme/garbage\" cannot be read back (it does not decode"),
        "{problems}"
    );
    assert!(
        report.summary().starts_with("FAILED: remembered request"),
        "{}",
        report.summary()
    );
}

#[tokio::test]
async fn a_retry_of_a_keyed_request_that_changed_nothing_changes_nothing_either() {
    let dir = tempdir();
    let control = open(options(dir.path()));

    // A keyed kill of a stopped service changes nothing; someone redeploys the service; the
    // kill's retry must not stop it.
    let kill = keyed_kill_of_a_stopped_service(&control).await;
    let first = control.kill(kill.clone()).await.unwrap();
    assert!(first.already_stopped && !first.replayed);
    let first_kill_seq = first.seq;
    let redeployed = deploy(&control, "acme", "a", "m2").await;
    let head = control.head();
    let retry = control.kill(kill.clone()).await.unwrap();
    assert_eq!(
        (retry.seq, retry.already_stopped, retry.replayed),
        (first.seq, true, true)
    );
    assert_eq!(control.head(), head, "the retry appended nothing");
    assert_eq!(control.status("acme", "a").unwrap().version, redeployed.version);

    // A keyed deploy of what already runs changes nothing; someone kills the service; the
    // deploy's retry must not bring it back.
    let mut same = deploy_request("acme", "a", "m2");
    same.idempotency_key = "deploy-1".into();
    let first = control.deploy(same.clone()).await.unwrap();
    assert!(first.unchanged && !first.replayed);
    control.kill(kill_command("acme", "a")).await.unwrap();
    let head = control.head();
    let retry = control.deploy(same.clone()).await.unwrap();
    assert_eq!(
        (retry.version, retry.seq, retry.unchanged, retry.replayed),
        (first.version, first.seq, true, true)
    );
    assert_eq!(control.head(), head, "the retry appended nothing");

    // Across a restart too: the node stored those keys with their answers. Someone redeploys
    // the service; neither retry may act on it.
    control.close().await;
    drop(control);
    let control = open(options(dir.path()));
    let redeployed = deploy(&control, "acme", "a", "m3").await;
    let head = control.head();
    // The node's default grace changed meanwhile: the kill, which named none, is the same.
    let new_default = KillCommand {
        grace_ms: kill.grace_ms + 5_000,
        ..kill.clone()
    };
    let retry = control.kill(new_default).await.unwrap();
    assert_eq!(
        (retry.seq, retry.already_stopped, retry.replayed),
        (first_kill_seq, true, true)
    );
    let retry = control.deploy(same.clone()).await.unwrap();
    assert_eq!(
        (retry.version, retry.seq, retry.unchanged, retry.replayed),
        (first.version, first.seq, true, true)
    );
    assert_eq!(control.head(), head, "the retries appended nothing");
    let service = control.status("acme", "a").unwrap();
    assert_eq!(
        (service.version, service.module_sha256),
        (redeployed.version, redeployed.module_sha256)
    );
    assert_eq!(service.desired, solo::state::Desired::Running);

    // Those keys are taken: another request with one is a conflict.
    let mut other = same.clone();
    other.labels.insert("team".into(), "red".into());
    assert!(matches!(
        control.deploy(other).await,
        Err(Error::IdempotencyConflict { .. })
    ));
    let forced = KillCommand { force: true, ..kill };
    assert!(matches!(
        control.kill(forced).await,
        Err(Error::IdempotencyConflict { .. })
    ));
}

#[tokio::test]
async fn a_retry_is_compared_with_the_request_not_with_defaults_that_changed_since() {
    let dir = tempdir();
    let with_default_memory = |mb: u64| {
        let mut config = solo::config::Config::default();
        config.solo.data_dir = dir.path().to_path_buf();
        config.database.map_size_mb = 256;
        config.limits.default_memory_mb = mb;
        config.control_options().unwrap()
    };
    let control = open(with_default_memory(16));
    let mut request = deploy_request("acme", "a", "m1");
    request.idempotency_key = "deploy-1".into();
    let first = control.deploy(request.clone()).await.unwrap();
    assert_eq!(control.status("acme", "a").unwrap().limits.memory_bytes, 16 << 20);
    control.close().await;
    drop(control);

    // The operator changes the default; the agent's retry is the same request, and gets the
    // original answer rather than a conflict.
    let control = open(with_default_memory(32));
    let retry = control.deploy(request.clone()).await.unwrap();
    assert_eq!((retry.seq, retry.replayed), (first.seq, true));
    // A retry that asks for something else is still a conflict.
    let mut other = request.clone();
    other.limits.memory_bytes = 8 << 20;
    assert!(matches!(
        control.deploy(other).await,
        Err(Error::IdempotencyConflict { .. })
    ));
    let event = control.log().read(first.seq..=first.seq).unwrap().remove(0);
    let Some(Kind::ServiceDeployed(deployed)) = &event.kind else {
        panic!("{event:?}")
    };
    assert_eq!(deployed.requested_limits, Some(request.limits));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_return_the_original_answer_across_a_restart() {
    let dir = tempdir();
    let control = open(options(dir.path()));
    let mut request = deploy_request("acme", "a", "m1");
    request.idempotency_key = "deploy-1".into();
    let first = control.deploy(request.clone()).await.unwrap();
    let retry = control.deploy(request.clone()).await.unwrap();
    assert!(retry.replayed);
    assert_eq!(
        (retry.version, retry.seq, retry.created),
        (first.version, first.seq, true)
    );

    let kill_cmd = KillCommand {
        idempotency_key: "kill-1".into(),
        ..kill_command("acme", "a")
    };
    let killed = control.kill(kill_cmd.clone()).await.unwrap();
    let head = control.head();
    control.close().await;
    drop(control);

    let control = open(options(dir.path()));
    let retry = control.deploy(request.clone()).await.unwrap();
    assert_eq!((retry.seq, retry.replayed), (first.seq, true));
    let retry_kill = control.kill(kill_cmd.clone()).await.unwrap();
    assert_eq!((retry_kill.seq, retry_kill.replayed), (killed.seq, true));
    // The node's default grace changed meanwhile: the request, which named none, is the same.
    let new_default = KillCommand {
        grace_ms: kill_cmd.grace_ms + 5_000,
        ..kill_cmd.clone()
    };
    let retry_kill = control.kill(new_default).await.unwrap();
    assert_eq!((retry_kill.seq, retry_kill.replayed), (killed.seq, true));
    assert_eq!(control.head(), head, "retries append nothing");

    // The same key for a different request is refused, not silently answered.
    let mut other = deploy_request("acme", "b", "m1");
    other.idempotency_key = "deploy-1".into();
    assert!(matches!(
        control.deploy(other).await,
        Err(Error::IdempotencyConflict { .. })
    ));
    // So is a retry that changes anything else the original asked for: its change would
    // otherwise be reported as applied and silently dropped.
    let mut relabelled = request.clone();
    relabelled.labels.insert("team".into(), "red".into());
    let mut resized = request.clone();
    resized.limits.memory_bytes = 2 << 20;
    for changed in [relabelled, resized] {
        assert!(matches!(
            control.deploy(changed).await,
            Err(Error::IdempotencyConflict { .. })
        ));
    }
    let forced = KillCommand {
        force: true,
        ..kill_cmd.clone()
    };
    let longer = KillCommand {
        grace_ms: kill_cmd.grace_ms + 1,
        requested_grace_ms: kill_cmd.requested_grace_ms + 1,
        ..kill_cmd
    };
    for changed in [forced, longer] {
        assert!(matches!(
            control.kill(changed).await,
            Err(Error::IdempotencyConflict { .. })
        ));
    }
    assert_eq!(control.head(), head, "refused retries append nothing");
    // Keys are per tenant.
    let mut beta = deploy_request("beta", "a", "m9");
    beta.idempotency_key = "deploy-1".into();
    assert!(!control.deploy(beta).await.unwrap().replayed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_is_typed_for_unknown_ids_and_idempotent_for_killed_ones() {
    let dir = tempdir();
    let control = open(options(dir.path()));
    assert!(matches!(
        control.kill(kill_command("acme", "ghost")).await,
        Err(Error::NotFound { .. })
    ));
    deploy(&control, "acme", "a", "m1").await;
    let first = kill(&control, "acme", "a").await;
    let again = kill(&control, "acme", "a").await;
    assert!(again.already_stopped && !first.already_stopped);
    assert_eq!(control.head(), 2);
    // Another tenant's service is simply not found.
    assert!(matches!(
        control.kill(kill_command("beta", "a")).await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_are_refused_before_anything_is_written() {
    let dir = tempdir();
    let control = open(options(dir.path()));
    for (tenant, id) in [("Acme", "a"), ("acme", "a/b"), ("acme", ""), ("", "a")] {
        let err = control.deploy(deploy_request(tenant, id, "m")).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{tenant}/{id}: {err}");
    }
    assert_eq!(control.head(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_refusal_names_a_version_stopping_behind_a_redeploy() {
    let dir = tempdir();
    let mut opts = options(dir.path());
    opts.limits.node.max_services = 1;
    let control = open(opts);
    deploy(&control, "acme", "a", "m").await;
    kill(&control, "acme", "a").await;
    // Redeployed while version 1 is still stopping: it keeps its slot, and reserves version
    // 1's memory until that has stopped.
    deploy(&control, "acme", "a", "m2").await;
    let err = control.deploy(deploy_request("acme", "b", "m")).await.unwrap_err();
    assert_refused_by(&err, "max_services");
    assert!(
        err.to_string()
            .contains("1 was redeployed while its earlier version is still stopping"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_hold_at_their_edges_and_under_a_race() {
    let dir = tempdir();
    let mut opts = options(dir.path());
    opts.limits.node.max_services = 3;
    opts.limits.node.max_module_bytes = 64;
    let control = open(opts);
    deploy(&control, "acme", "a", "m").await;
    deploy(&control, "acme", "b", "m").await;
    // Two deploys race for the last slot: exactly one wins.
    let (x, y) = tokio::join!(
        control.deploy(deploy_request("acme", "c", "m")),
        control.deploy(deploy_request("acme", "d", "m"))
    );
    assert_eq!(
        [x.is_ok(), y.is_ok()].iter().filter(|ok| **ok).count(),
        1,
        "{x:?} {y:?}"
    );
    let loser = x.err().or(y.err()).unwrap();
    assert!(
        matches!(
            loser,
            Error::QuotaExceeded {
                quota: "max_services",
                limit: 3,
                ..
            }
        ),
        "{loser}"
    );
    let head = control.head();
    // Upgrading an existing service needs no new slot; another tenant has its own quota.
    deploy(&control, "acme", "a", "m2").await;
    deploy(&control, "beta", "a", "m").await;
    // A killed service holds its slot until it has stopped, as its instance exists until
    // then; a redeploy of it takes its place.
    kill(&control, "acme", "b").await;
    let err = control.deploy(deploy_request("acme", "e", "m")).await.unwrap_err();
    assert_refused_by(&err, "max_services");
    assert!(err.to_string().contains("1 of them is stopping"), "{err}");
    let stopped = solo::control::Observation::Stopped {
        tenant: "acme".into(),
        service_id: "b".into(),
        version: 1,
        reason: solo::proto::StopReason::Killed,
        how: Default::default(),
    };
    control.observe(stopped).await.unwrap();
    deploy(&control, "acme", "e", "m").await;
    assert_eq!(control.head(), head + 5);

    // A limit lowered under what a tenant has leaves its services upgradable.
    control.close().await;
    drop(control);
    let mut opts = options(dir.path());
    opts.limits.node.max_services = 1;
    opts.limits.node.max_module_bytes = 64;
    let control = open(opts);
    deploy(&control, "acme", "a", "m3").await;
    let err = control.deploy(deploy_request("acme", "f", "m")).await.unwrap_err();
    assert_refused_by(&err, "max_services");

    let mut big = deploy_request("acme", "big", "m");
    big.module = Arc::from(vec![0u8; 65]);
    let err = control.deploy(big).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::QuotaExceeded {
                quota: "max_module_bytes",
                limit: 64,
                ..
            }
        ),
        "{err}"
    );
}

/// A killed service still stopping keeps its memory reserved, also once a smaller version has
/// replaced it (they run one at a time, the new one once the old has stopped), until its stop
/// is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_version_keeps_its_memory_reserved_until_it_has_stopped() {
    let dir = tempdir();
    let mut opts = options(dir.path());
    opts.limits.node.max_tenant_memory_mb = 30;
    let control = open(opts);
    let with_mib = |id: &str, tag: &str, mib: u64| DeployRequest {
        limits: solo::proto::Limits {
            memory_bytes: mib << 20,
            ..Default::default()
        },
        ..deploy_request("acme", id, tag)
    };
    control.deploy(with_mib("big", "m1", 20)).await.unwrap();
    kill(&control, "acme", "big").await;
    control.deploy(with_mib("big", "m2", 1)).await.unwrap();
    let err = control.deploy(with_mib("other", "m", 20)).await.unwrap_err();
    assert_refused_by(&err, "max_tenant_memory_mb");
    assert!(err.to_string().contains("reserve 20 MiB"), "{err}");
    let stopped = solo::control::Observation::Stopped {
        tenant: "acme".into(),
        service_id: "big".into(),
        version: 1,
        reason: solo::proto::StopReason::Killed,
        how: Default::default(),
    };
    control.observe(stopped).await.unwrap();
    control.deploy(with_mib("other", "m", 20)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_rate_quota_uses_the_logged_times() {
    let dir = tempdir();
    let mut opts = options(dir.path());
    opts.limits.node.max_deploys_per_minute = 2;
    let (clock, now) = manual_clock(1_000_000);
    opts.clock = clock;
    let control = open(opts);
    deploy(&control, "acme", "a", "m").await;
    deploy(&control, "acme", "b", "m").await;
    let err = control.deploy(deploy_request("acme", "c", "m")).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::QuotaExceeded {
                quota: "max_deploys_per_minute",
                limit: 2,
                ..
            }
        ),
        "{err}"
    );
    // Deploys count per second of the window: both were in the second from 1,000,000 ms,
    // which must leave the minute entirely before they stop counting.
    now.fetch_add(60_001, std::sync::atomic::Ordering::SeqCst);
    let err = control.deploy(deploy_request("acme", "c", "m")).await.unwrap_err();
    assert!(matches!(err, Error::QuotaExceeded { .. }), "{err}");
    now.fetch_add(999, std::sync::atomic::Ordering::SeqCst);
    deploy(&control, "acme", "c", "m").await;
}

/// One tenant, within its other quotas, cannot fill the append-only log for everyone: past the
/// bytes its events may add in an hour, its deploys wait, while it can still kill, the others
/// deploy, and the count holds across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_budget_refuses_a_tenants_deploys_but_not_its_kills_or_the_others() {
    let dir = tempdir();
    let (clock, now) = manual_clock(1_000_000);
    let options = || {
        let mut opts = options(dir.path());
        opts.limits.node.max_deploys_per_minute = u32::MAX;
        opts.limits.node.max_history_mb_per_hour = 1;
        opts.clock = clock.clone();
        opts
    };
    // The largest labels a deploy may carry: about 20 KiB an event.
    let labelled = |tenant: &str, round: usize| {
        let mut request = deploy_request(tenant, "a", "m");
        request.labels = (0..64)
            .map(|i| {
                (
                    format!("label-{i:02}-{}", "k".repeat(50)),
                    format!("{round}-{}", "v".repeat(250)),
                )
            })
            .collect();
        request
    };
    let control = open(options());
    let mut refusal = None;
    let mut deployed = 0;
    let keyed_first = || {
        let mut request = labelled("acme", 0);
        request.idempotency_key = "first".into();
        request
    };
    for round in 0..200 {
        let request = if round == 0 {
            keyed_first()
        } else {
            labelled("acme", round)
        };
        match control.deploy(request).await {
            Ok(_) => deployed += 1,
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    let Some(Error::QuotaExceeded {
        quota: "max_history_mb_per_hour",
        limit: 1,
        retry_after: Some(retry_after),
        ..
    }) = &refusal
    else {
        panic!("the budget never refused: {refusal:?}")
    };
    // 1 MiB of events of about 20 KiB: neither far fewer deploys nor far more.
    assert!((40..=60).contains(&deployed), "{deployed} deploys fit in 1 MiB");
    let message = refusal.as_ref().unwrap().to_string();
    assert!(message.contains("in the last hour"), "{message}");
    // All of them in the first minute of the hour: room comes as that minute leaves it.
    assert!(
        (Duration::from_secs(3_600)..=Duration::from_secs(3_660)).contains(retry_after),
        "{retry_after:?}"
    );
    // What already runs, asked for again with a new key, would be remembered (written): refused
    // too. A retry of a key answered before the budget ran out still gets its answer.
    let mut same = labelled("acme", deployed - 1);
    same.idempotency_key = "again".into();
    let err = control.deploy(same).await.unwrap_err();
    assert_refused_by(&err, "max_history_mb_per_hour");
    let retried = control.deploy(keyed_first()).await.unwrap();
    assert!(retried.replayed && retried.version == 1, "{retried:?}");
    let refused_at = control.head();
    deploy(&control, "globex", "a", "m").await;
    kill(&control, "acme", "a").await;
    control.close().await;
    drop(control);

    // Replayed from the log, or read from a snapshot, the count is the same.
    let control = open(options());
    let err = control.deploy(labelled("acme", 999)).await.unwrap_err();
    assert_refused_by(&err, "max_history_mb_per_hour");
    assert!(
        control.head() > refused_at,
        "the kill and the other tenant's deploy were written"
    );
    now.fetch_add(retry_after.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    control.deploy(labelled("acme", 999)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_map_is_a_typed_error_and_never_a_corrupt_log() {
    let dir = tempdir();
    let mut opts = options(dir.path());
    opts.log.store.map_size = 1 << 20;
    opts.limits.node.max_module_bytes = 1 << 20;
    let control = open(opts);
    deploy(&control, "acme", "small", "m").await;
    let mut failure = None;
    for i in 0..64 {
        let mut request = deploy_request("acme", &format!("big-{i}"), "m");
        request.module = Arc::from(vec![i as u8; 200_000]);
        if let Err(e) = control.deploy(request).await {
            failure = Some(e);
            break;
        }
    }
    let Some(Error::Storage(e)) = failure else {
        panic!("the map never filled: {failure:?}")
    };
    assert!(matches!(*e, solo::log::Error::MapFull { .. }), "{e}");
    assert!(
        e.to_string().contains("map_size_mb"),
        "the message says what to do: {e}"
    );
    let head = control.head();
    // The failed batch left no trace, and the writer still serves.
    let retried = control.deploy(deploy_request("acme", "small", "m2")).await.unwrap();
    assert_eq!((retried.version, retried.seq), (2, head + 1));
    let report = inspect::verify(control.log().store(), control.read_state(|s| s.settings())).unwrap();
    assert!(report.ok(), "{}", report.summary());
}

#[tokio::test]
async fn a_module_no_service_runs_any_more_leaves_the_blob_store() {
    let dir = tempdir();
    let control = open(options(dir.path()));
    let sha = |outcome: &solo::control::DeployOutcome| solo::state::parse_sha256(&outcome.module_sha256).unwrap();
    let has = |control: &Control, hash: &[u8; 32]| control.log().store().has_blob(hash).unwrap();
    let m1 = sha(&deploy(&control, "acme", "a", "m1").await);
    deploy(&control, "globex", "b", "m1").await;
    let m2 = sha(&deploy(&control, "acme", "a", "m2").await);
    assert!(has(&control, &m1), "globex/b still runs m1");
    assert!(has(&control, &m2));

    // Upgrade after upgrade, as a tenant filling the disk would: only what runs is kept.
    for round in 0..20 {
        deploy(&control, "acme", "a", &format!("filler-{round}")).await;
    }
    let m3 = sha(&deploy(&control, "globex", "b", "m3").await);
    assert!(!has(&control, &m1) && !has(&control, &m2), "nothing runs m1 or m2 now");
    assert!(has(&control, &m3));
    let (blobs, _) = blob_count(&control);
    assert_eq!(blobs, 2, "acme/a's latest module and globex/b's");

    // A killed service holds no module (a redeploy brings its own), so a tenant cannot fill
    // the disk with the modules of services it deployed and killed; a module collected once
    // is stored again by its next deploy.
    control.kill(kill_command("globex", "b")).await.unwrap();
    assert!(!has(&control, &m3), "globex/b was killed and nothing else runs m3");
    deploy(&control, "globex", "b", "m3").await;
    assert!(has(&control, &m3), "the redeploy stored its module again");
    let again = deploy(&control, "acme", "c", "m1").await;
    assert!(has(&control, &sha(&again)));
    // A module one service lets go of while another takes it up (in one batch or the next)
    // ends up stored.
    let (kill, redeploy) = tokio::join!(
        control.kill(kill_command("globex", "b")),
        control.deploy(deploy_request("globex", "b2", "m3"))
    );
    kill.unwrap();
    redeploy.unwrap();
    assert!(has(&control, &m3), "globex/b2 runs m3");

    // The log verifies (history names collected modules), also after a restart.
    let report = inspect::verify(control.log().store(), control.read_state(|s| s.settings())).unwrap();
    assert!(report.ok(), "{}", report.summary());
    control.close().await;
    drop(control);
    let control = open(options(dir.path()));
    assert!(has(&control, &m1) && has(&control, &m3) && !has(&control, &m2));
    deploy(&control, "acme", "c", "m4").await;
    assert!(!has(&control, &m1), "the state rebuilt at open counts who runs what");
    control.kill(kill_command("globex", "b2")).await.unwrap();
    assert!(!has(&control, &m3), "and who was killed");
}

/// A data directory from before modules were collected holds those of upgraded and killed
/// services: the node deletes them as it opens, and keeps every module a service should run.
#[tokio::test]
async fn modules_an_older_build_left_behind_are_deleted_at_open() {
    let dir = tempdir();
    let control = open(options(dir.path()));
    let sha = |outcome: &solo::control::DeployOutcome| solo::state::parse_sha256(&outcome.module_sha256).unwrap();
    let running = sha(&deploy(&control, "acme", "a", "m1").await);
    let runs_too = sha(&deploy(&control, "acme", "b", "m2").await);
    // What an older build left: the module of a killed service, stored beside the others.
    let left = module("left behind");
    let left_sha: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&left).into();
    let put = [solo::log::BlobRef {
        sha256: &left_sha,
        bytes: &left,
    }];
    let changes = solo::log::BlobChanges { put: &put, delete: &[] };
    let store = control.log().store();
    store
        .append(control.head() + 1, std::iter::empty(), changes, Default::default())
        .unwrap();
    assert_eq!(blob_count(&control).0, 3);
    control.close().await;
    drop(control);

    let (control, recovery) = Control::open(options(dir.path())).unwrap();
    assert_eq!(recovery.modules_collected, 1);
    let store = control.log().store();
    assert!(!store.has_blob(&left_sha).unwrap());
    assert!(store.has_blob(&running).unwrap() && store.has_blob(&runs_too).unwrap());
    let report = inspect::verify(store, control.read_state(|s| s.settings())).unwrap();
    assert!(report.ok(), "{}", report.summary());

    // A log with an event this build steps over may name services the state does not know:
    // nothing is deleted then.
    let mut stray = solo::event::envelope(
        "acme",
        "ghost",
        "node",
        Kind::ServiceStarted(solo::proto::ServiceStarted::default()),
    );
    stray.seq = control.head() + 1;
    let frame = frame::encode(&prost::Message::encode_to_vec(&stray));
    control
        .log()
        .store()
        .append(stray.seq, [frame.as_slice()], changes, Default::default())
        .unwrap();
    control.close().await;
    drop(control);
    let (control, recovery) = Control::open(options(dir.path())).unwrap();
    assert_eq!((recovery.skipped, recovery.modules_collected), (1, 0));
    assert!(control.log().store().has_blob(&left_sha).unwrap());
}

fn blob_count(control: &Control) -> (u64, u64) {
    let mut count = (0, 0);
    control
        .log()
        .store()
        .scan_blobs(|_, bytes| count = (count.0 + 1, count.1 + bytes.map_or(0, <[u8]>::len) as u64))
        .unwrap();
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_is_reported_by_verify_with_its_seq() {
    let dir = tempdir();
    let control = open(options(dir.path()));
    for i in 0..20 {
        let id = if i == 13 {
            "needle-service".to_string()
        } else {
            format!("svc-{i}")
        };
        // svc-2 runs a module of its own, which its upgrade after the damage lets go of.
        deploy(&control, "acme", &id, if i == 2 { "m-gone" } else { "m" }).await;
    }
    deploy(&control, "acme", "svc-2", "m").await;
    control.close().await;
    drop(control);
    let clean = solo_log("verify", dir.path());
    assert!(clean.status.success(), "{}", String::from_utf8_lossy(&clean.stdout));

    let copy = tempdir();
    let mut bytes = std::fs::read(dir.path().join("data.mdb")).unwrap();
    // Every copy of the record, the live one among them.
    for at in places_of(&bytes, b"needle-service") {
        bytes[at + 3] ^= 0x20;
    }
    std::fs::write(copy.path().join("data.mdb"), bytes).unwrap();

    let output = solo_log("verify", copy.path());
    let summary = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{summary}");
    assert!(summary.contains("seq 14") && summary.contains("checksum"), "{summary}");
    assert_eq!(summary.lines().count(), 1, "one-line summary: {summary}");
    // Replay stopped at seq 14 never saw the upgrade that let svc-2's module go: that is no
    // second problem.
    let also = String::from_utf8_lossy(&output.stderr);
    assert!(!also.contains("missing from the blob store"), "{also}");
}

/// The data.mdb of a closed data directory holding 20 deploys (`svc-0`..`svc-19`, module "m").
async fn twenty_deploys() -> Vec<u8> {
    let dir = tempdir();
    let control = open(options(dir.path()));
    for i in 0..20 {
        deploy(&control, "acme", &format!("svc-{i}"), "m").await;
    }
    control.close().await;
    drop(control);
    std::fs::read(dir.path().join("data.mdb")).unwrap()
}

/// A data directory of its own holding `data` as its data.mdb.
fn data_dir_of(data: Vec<u8>) -> tempfile::TempDir {
    let dir = tempdir();
    std::fs::write(dir.path().join("data.mdb"), data).unwrap();
    dir
}

/// Runs `solo log <command>` on `dir`.
fn solo_log(command: &str, dir: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_solo"))
        .args(["log", command, "--data-dir"])
        .arg(dir)
        .output()
        .unwrap()
}

/// A key of data.mdb damaged so that it no longer decodes: verify and dump name the seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_key_is_reported_with_its_seq() {
    let mut bytes = twenty_deploys().await;
    // A leaf node is (data size: 4 bytes, flags: 2, key size: 2, key): the key of seq 14, with
    // its size, in every copy of the page; a size of 4 leaves half a u64.
    let mut node = vec![8, 0];
    node.extend_from_slice(&14u64.to_be_bytes());
    for at in places_of(&bytes, &node) {
        bytes[at] = 4;
    }
    let copy = data_dir_of(bytes);
    let verified = solo_log("verify", copy.path());
    let summary = String::from_utf8_lossy(&verified.stdout);
    assert_eq!(verified.status.code(), Some(1), "{summary}");
    assert!(
        summary.starts_with("FAILED: first bad record is seq 14: its key in data.mdb is damaged"),
        "{summary}"
    );
    let dumped = solo_log("dump", copy.path());
    let error = String::from_utf8_lossy(&dumped.stderr);
    assert_eq!(dumped.status.code(), Some(1), "{error}");
    assert!(error.contains("record 14 does not decode"), "{error}");
    assert_eq!(String::from_utf8_lossy(&dumped.stdout).lines().count(), 13);
}

/// A value whose length in data.mdb is damaged to run past the end of the file: LMDB hands it
/// out as it is, and reading it would kill the process with SIGBUS. The tools report it as
/// damage instead, and a node that must replay it refuses to open, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_that_runs_past_the_end_of_the_file_is_damage_not_a_crash() {
    let clean = twenty_deploys().await;
    // A leaf node is (data size: 4 bytes, little-endian halves; flags: 2; key size: 2; key).
    // Its size's top byte set puts the value's end a gigabyte past the file's.
    let damaged = |key: &[u8]| {
        let mut bytes = clean.clone();
        let mut node = vec![key.len() as u8, 0];
        node.extend_from_slice(key);
        for at in places_of(&bytes, &node) {
            bytes[at - 3] = 0x40;
        }
        data_dir_of(bytes)
    };
    let event = damaged(&14u64.to_be_bytes());
    let verified = solo_log("verify", event.path());
    let summary = String::from_utf8_lossy(&verified.stdout);
    assert_eq!(verified.status.code(), Some(1), "{summary}");
    assert!(
        summary.starts_with("FAILED: first bad record is seq 14: its length in data.mdb is damaged"),
        "{summary}"
    );
    let dumped = solo_log("dump", event.path());
    let error = String::from_utf8_lossy(&dumped.stderr);
    assert_eq!(dumped.status.code(), Some(1), "{error}");
    assert!(
        error.contains("record 14") && error.contains("past the end of the file"),
        "{error}"
    );
    // A node that must replay the damaged record refuses to open, and says why.
    let refused = Control::open(options(event.path()))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("14") && refused.contains("past the end of the file"),
        "{refused}"
    );

    let sha: [u8; 32] =
        sha2::Digest::finalize(sha2::Digest::chain_update(sha2::Sha256::default(), &*module("m"))).into();
    let blob = damaged(&sha);
    let verified = solo_log("verify", blob.path());
    let summary = String::from_utf8_lossy(&verified.stdout);
    assert_eq!(verified.status.code(), Some(1), "{summary}");
    // A node whose services run that module refuses to start, rather than crash them all.
    let refused = solo::server::open_node(&node_config(blob.path()))
        .await
        .map(|_| ())
        .unwrap_err();
    let refused = format!("{refused:#}");
    assert!(
        refused.contains("cannot be read") && refused.contains("past the end of the file"),
        "{refused}"
    );
    assert!(
        summary.contains("is damaged: its length in data.mdb is damaged"),
        "{summary}"
    );
}

/// A tailer reading history through a damaged record gets every record before it, then the
/// damage: the reader learns exactly where the log stops being readable. The node, which
/// started past it from a snapshot, finds it as it starts, and says so, serving on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tailer_gets_the_records_before_the_damage_then_the_damage() {
    let dir = tempdir();
    let mut opts = options(dir.path());
    opts.writer.snapshot_every = 10;
    let control = open(opts);
    for i in 0..25 {
        let mut request = deploy_request("acme", &format!("svc-{i}"), "m");
        if i == 13 {
            // A label only seq 14 holds: the next deploy replaces it, so no snapshot has it.
            request.labels.insert("mark".into(), "needle-label".into());
        }
        control.deploy(request).await.unwrap();
        if i == 13 {
            deploy(&control, "acme", "svc-13", "m2").await;
        }
    }
    control.close().await;
    drop(control);
    // Seq 14's payload, in every copy LMDB left: its checksum no longer matches. The node
    // opens from the snapshot after seq 20, past it.
    let mut bytes = std::fs::read(dir.path().join("data.mdb")).unwrap();
    for at in places_of(&bytes, b"needle-label") {
        bytes[at] ^= 0x20;
    }
    let copy = data_dir_of(bytes);
    let mut opts = options(copy.path());
    opts.writer.snapshot_every = 10;
    let control = open(opts);
    let mut tail = Box::pin(control.log().tail(1));
    for seq in 1..14 {
        let record = timeout(Duration::from_secs(10), tail.next()).await.unwrap().unwrap();
        assert_eq!(record.unwrap().seq, seq);
    }
    let damage = timeout(Duration::from_secs(10), tail.next()).await.unwrap().unwrap();
    let damage = damage.unwrap_err().to_string();
    assert!(damage.contains("record 14 is corrupt"), "{damage}");
    assert!(
        timeout(Duration::from_secs(10), tail.next()).await.unwrap().is_none(),
        "the stream ends"
    );
    let found = timeout(Duration::from_secs(10), async {
        loop {
            match control.history_damage() {
                Some(found) => return found,
                None => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await
    .expect("the check of the history finds the damage");
    assert_eq!(
        control.log_failure(),
        None,
        "the log takes writes: the node is not degraded"
    );
    assert!(
        found.contains("history is damaged") && found.contains("record 14 is corrupt"),
        "{found}"
    );
    // It still takes writes.
    deploy(&control, "acme", "after", "m").await;
    control.close().await;
}

/// A node snapshotting every 10 events, after `deploys` deploys over 7 services; and its state.
async fn snapshotting_node(dir: &Path, deploys: usize) -> (Control, State) {
    let mut opts = options(dir);
    opts.writer.snapshot_every = 10;
    let control = open(opts);
    for i in 0..deploys {
        deploy(&control, "acme", &format!("svc-{}", i % 7), &format!("m{i}")).await;
    }
    let live = control.read_state(Clone::clone);
    (control, live)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_uses_the_newest_valid_snapshot_and_skips_bad_ones() {
    let dir = tempdir();
    let (control, live) = snapshotting_node(dir.path(), 35).await;
    // A damaged snapshot and one of another frame version, both newer than the good ones.
    let store = control.log().store();
    let mut damaged = frame::encode(b"not a snapshot");
    damaged[7] ^= 1;
    store.put_snapshot(34, &damaged, 10).unwrap();
    let mut future = frame::encode(b"from a newer build");
    future[0] = 9;
    assert_eq!(frame::decode(&future), Err(FrameError::UnknownVersion { found: 9 }));
    store.put_snapshot(35, &future, 10).unwrap();
    control.close().await;
    drop(control);

    let (control, recovery) = Control::open(options(dir.path())).unwrap();
    // A snapshot is taken at the end of the first batch that brings 10 events since the last.
    let used = recovery.snapshot_seq.expect("a good snapshot was used");
    assert!((20..=33).contains(&used), "snapshot at {used}");
    assert_eq!(recovery.replayed, 35 - used);
    assert_eq!(control.read_state(Clone::clone), live);
}

/// The snapshotter follows the writer's batches with a copy of its own: each snapshot must be
/// exactly the log replayed up to its seq, however the batches fell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_snapshot_is_the_log_replayed_to_its_seq() {
    let dir = tempdir();
    let mut opts = options(dir.path());
    opts.writer.snapshot_every = 10;
    opts.writer.snapshots_kept = 100;
    let control = open(opts);
    // Waves of 7 concurrent deploys: batches of several events, whose ends are not multiples of
    // 10, so snapshots fall where the batches end.
    for wave in 0..18 {
        let deploys = (wave * 7..wave * 7 + 7).map(|i| {
            let control = control.clone();
            async move { deploy(&control, "acme", &format!("svc-{}", i % 9), &format!("m{i}")).await }
        });
        futures_util::future::join_all(deploys).await;
    }
    let head = control.head();
    let settings = control.read_state(|s| s.settings());
    control.close().await;
    drop(control);

    let (control, _) = Control::open(options(dir.path())).unwrap();
    let store = control.log().store();
    let mut seqs = store.snapshot_seqs().unwrap();
    seqs.sort_unstable();
    assert!(seqs.len() >= 5, "snapshots at {seqs:?} of {head} events");
    for pair in seqs.windows(2) {
        assert!(
            pair[1] - pair[0] >= 10,
            "snapshots closer than snapshot_every: {seqs:?}"
        );
    }
    for &seq in &seqs {
        let snapshot = solo::control::load_snapshot(store, settings, seq).expect("the snapshot loads");
        assert_eq!(snapshot.applied_seq(), seq);
        let mut replayed = State::new(settings);
        solo::control::replay(store, &mut replayed, 1, seq).unwrap();
        assert_eq!(snapshot, replayed, "snapshot at {seq}");
    }
}

/// A running server prunes old snapshots whenever it takes a new one, collects the modules no
/// service runs any more and remembers keyed requests, also while `solo log verify` reads:
/// verify reads every database as of one moment, so a snapshot pruned since is compared all
/// the same, and a module collected or a request remembered since is no damage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_node_changes_while_verify_reads_is_no_damage() {
    let dir = tempdir();
    let (control, live) = snapshotting_node(dir.path(), 35).await;
    let store = control.log().store();
    let view = store.read_view().unwrap();
    let read = view.snapshots().unwrap();
    let listed: Vec<u64> = read.iter().map(|(seq, _)| *seq).collect();
    assert!(listed.len() >= 2, "snapshots at {listed:?}");
    let oldest = read.last().unwrap().0;
    // The server's next snapshot prunes all but the newest.
    let (newest, frame) = read[0];
    store.put_snapshot(newest, frame, 1).unwrap();
    assert!(store.read_snapshot(oldest, |bytes| bytes.is_none()).unwrap(), "pruned");
    // svc-0's module leaves the blob store, and a keyed kill that changes nothing is
    // remembered, resting on a seq past the head verify reads.
    kill(&control, "acme", "svc-0").await;
    let again = KillCommand {
        idempotency_key: "kill-0".into(),
        ..kill_command("acme", "svc-0")
    };
    assert!(control.kill(again).await.unwrap().already_stopped);
    assert_eq!(store.requests().unwrap().len(), 1);

    let report = inspect::verify_as_of(&view, live.settings()).unwrap();
    assert!(report.ok(), "{}", report.summary());
    assert_eq!((report.head, report.requests), (live.applied_seq(), 0));
    let compared: Vec<u64> = report.snapshots.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(compared, listed, "every snapshot read is compared, the pruned one too");
    drop(view);
    let report = inspect::verify(store, live.settings()).unwrap();
    assert!(report.ok(), "{}", report.summary());
    assert_eq!((report.head, report.requests), (live.applied_seq() + 1, 1));
}

/// `solo log verify` beside a node that deploys, kills and remembers keyed requests that changed
/// nothing, as fast as it can: a module deployed or collected, a snapshot taken or pruned, a
/// request remembered while verify reads must never look like damage. Verify reads every
/// database as of one moment; reading them one after another, it took a module collected
/// meanwhile for a missing one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_beside_a_node_deploying_and_killing_never_reports_damage() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempdir();
    let mut opts = options(dir.path());
    opts.limits.node.max_deploys_per_minute = u32::MAX;
    opts.writer.snapshot_every = 50;
    let control = open(opts);
    let settings = control.read_state(|s| s.settings());
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..4u64)
        .map(|worker| {
            let (control, stop) = (control.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut step = worker;
                while !stop.load(Ordering::Relaxed) {
                    // Few services and modules: modules are collected and stored again all the
                    // time; a key on every other request, so that those that change nothing are
                    // remembered.
                    step = step
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    let id = format!("s{}", (step >> 33) % 8);
                    let key = match (step >> 40) % 2 {
                        0 => String::new(),
                        _ => format!("k{worker}-{step}"),
                    };
                    // Refusals (a kill of a service killed already) are part of the load.
                    if (step >> 45) % 10 < 7 {
                        let request = DeployRequest {
                            idempotency_key: key,
                            ..deploy_request("acme", &id, &format!("m{}", (step >> 50) % 12))
                        };
                        let _ = control.deploy(request).await;
                    } else {
                        let kill = KillCommand {
                            idempotency_key: key,
                            force: true,
                            ..kill_command("acme", &id)
                        };
                        let _ = control.kill(kill).await;
                    }
                }
            })
        })
        .collect();

    let started = std::time::Instant::now();
    let mut runs = 0;
    let mut heads = std::collections::BTreeSet::new();
    while runs < 10 || started.elapsed() < Duration::from_secs(3) {
        // The tool in a process of its own, as an operator runs it, and the same check in this
        // one, on the node's own environment.
        let path = dir.path().to_path_buf();
        let output = tokio::task::spawn_blocking(move || solo_log("verify", &path))
            .await
            .unwrap();
        let summary = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "run {runs} at head {}: {summary}{}",
            control.head(),
            String::from_utf8_lossy(&output.stderr)
        );
        let live = control.clone();
        let report = tokio::task::spawn_blocking(move || inspect::verify(live.log().store(), settings).unwrap())
            .await
            .unwrap();
        assert!(report.ok(), "run {runs} in process: {}", report.summary());
        heads.insert(report.head);
        runs += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for worker in load {
        worker.await.unwrap();
    }
    let report = inspect::verify(control.log().store(), settings).unwrap();
    assert!(report.ok(), "{}", report.summary());
    assert!(heads.len() >= 5, "the node wrote while verify read: heads {heads:?}");
    assert!(
        report.requests > 0,
        "requests that changed nothing were remembered: {}",
        report.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_from_an_older_build_is_skipped_and_is_no_damage() {
    use prost::Message as _;
    let dir = tempdir();
    let (control, live) = snapshotting_node(dir.path(), 25).await;
    // Older builds listed each deploy time of the rate window.
    let mut old = live.to_snapshot();
    old.recent_deploys[0].at_ms = vec![old.last_timestamp_ms; 3];
    let store = control.log().store();
    store
        .put_snapshot(live.applied_seq(), &frame::encode(&old.encode_to_vec()), 10)
        .unwrap();
    let report = inspect::verify(store, live.settings()).unwrap();
    assert!(report.ok(), "{}", report.summary());
    assert!(
        report.snapshots.iter().all(|(seq, _)| *seq < live.applied_seq()),
        "{report:?}"
    );
    control.close().await;
    drop(control);

    let (control, recovery) = Control::open(options(dir.path())).unwrap();
    let used = recovery
        .snapshot_seq
        .expect("an older, current-format snapshot was used");
    assert!(used < live.applied_seq(), "snapshot at {used}");
    assert_eq!(control.read_state(Clone::clone), live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_an_unknown_format_version_is_refused() {
    let dir = tempdir();
    drop(open(options(dir.path())));
    set_format_version(dir.path(), 99);
    let err = Control::open(options(dir.path())).unwrap_err();
    assert!(
        matches!(
            err,
            solo::log::Error::UnsupportedFormat {
                found: 99,
                supported: solo::log::FORMAT_VERSION,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("format version 99"), "{err}");
}

/// A directory of the previous format (before `service_removed`) is read as it is by read-only
/// tools, and raised to this build's format by a node, so that the previous build, which would
/// step over removals and list removed services again, refuses it from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_of_the_previous_format_is_raised_when_a_node_opens_it() {
    let dir = tempdir();
    let control = open(options(dir.path()));
    deploy(&control, "acme", "a", "m1").await;
    control.close().await;
    drop(control);
    set_format_version(dir.path(), solo::log::OLDEST_FORMAT_VERSION);

    let read_only = solo::log::StoreOptions {
        read_only: true,
        ..options(dir.path()).log.store
    };
    let store = solo::log::Store::open(dir.path(), &read_only).unwrap();
    assert_eq!(store.head().unwrap(), 1);
    drop(store);
    assert_eq!(format_version(dir.path()), solo::log::OLDEST_FORMAT_VERSION);

    let control = open(options(dir.path()));
    assert_eq!(
        control.read_state(|s| s.service("acme", "a").map(|s| s.version)),
        Some(1)
    );
    control.close().await;
    drop(control);
    assert_eq!(format_version(dir.path()), solo::log::FORMAT_VERSION);
}

/// The heed environment of a closed test directory, with its `meta` database.
#[allow(unsafe_code)]
fn meta_of(dir: &std::path::Path) -> (heed::Env, heed::Database<heed::types::Str, heed::types::Bytes>) {
    // SAFETY: nothing else has this test's directory open.
    let env = unsafe { heed::EnvOpenOptions::new().max_dbs(8).open(dir) }.unwrap();
    let mut wtxn = env.write_txn().unwrap();
    let meta = env.create_database(&mut wtxn, Some("meta")).unwrap();
    wtxn.commit().unwrap();
    (env, meta)
}

fn set_format_version(dir: &std::path::Path, version: u32) {
    let (env, meta) = meta_of(dir);
    let mut wtxn = env.write_txn().unwrap();
    meta.put(&mut wtxn, "format_version", &version.to_be_bytes()).unwrap();
    wtxn.commit().unwrap();
}

fn format_version(dir: &std::path::Path) -> u32 {
    let (env, meta) = meta_of(dir);
    let rtxn = env.read_txn().unwrap();
    let bytes = meta.get(&rtxn, "format_version").unwrap().unwrap();
    u32::from_be_bytes(bytes.try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observations_that_no_longer_fit_are_refused_as_stale() {
    use solo::control::Observation;
    let dir = tempdir();
    let control = open(options(dir.path()));
    deploy(&control, "acme", "a", "m1").await;
    deploy(&control, "acme", "a", "m2").await;
    let started = |version| Observation::Started {
        tenant: "acme".into(),
        service_id: "a".into(),
        version,
        recovered: false,
    };
    assert!(
        matches!(control.observe(started(1)).await, Err(Error::Stale(_))),
        "version 1 was replaced"
    );
    let seq = control.observe(started(2)).await.unwrap();
    assert_eq!(seq, 3);
    assert!(
        matches!(control.observe(started(2)).await, Err(Error::Stale(_))),
        "already running"
    );
    assert_eq!(control.status("acme", "a").unwrap().status.as_str(), "running");
}

/// Once the shutdown is recorded, no start is: a start that ended as the shutdown was being
/// recorded is stopped with the rest, and its service comes back with the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_start_is_recorded_after_the_shutdown() {
    use solo::control::Observation;
    use solo::proto::StopReason;
    let dir = tempdir();
    let control = open(options(dir.path()));
    deploy(&control, "acme", "a", "m1").await;
    control.shutdown("admin", 1000).await.unwrap();
    let started = Observation::Started {
        tenant: "acme".into(),
        service_id: "a".into(),
        version: 1,
        recovered: false,
    };
    assert!(matches!(control.observe(started).await, Err(Error::ShuttingDown)));
    let stopped = Observation::Stopped {
        tenant: "acme".into(),
        service_id: "a".into(),
        version: 1,
        reason: StopReason::NodeShutdown,
        how: Default::default(),
    };
    control.observe(stopped).await.unwrap();
    assert!(control.status("acme", "a").unwrap().comes_back_with_the_node());
}

/// Shutdown is idempotent, as an impatient admin or a retry sends it again: one event, and
/// every request, concurrent or later, is answered with its seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_shutdown_request_appends_nothing_and_answers_the_first_seq() {
    let dir = tempdir();
    let control = open(options(dir.path()));
    deploy(&control, "acme", "a", "m1").await;
    let requests: Vec<_> = (0..8)
        .map(|n| {
            let control = control.clone();
            tokio::spawn(async move { control.shutdown("admin", 1000 + n).await.unwrap() })
        })
        .collect();
    let mut answers = Vec::new();
    for request in requests {
        answers.push(request.await.unwrap());
    }
    let (seq, _) = answers[0];
    assert!(answers.iter().all(|(s, _)| *s == seq), "{answers:?}");
    assert_eq!(
        answers.iter().filter(|(_, appended)| *appended).count(),
        1,
        "{answers:?}"
    );
    assert_eq!(control.shutdown("admin", 5).await.unwrap(), (seq, false));
    assert_eq!(control.head(), seq, "one shutdown_requested");
    let shutdowns = control
        .log()
        .read(1..=seq)
        .unwrap()
        .iter()
        .filter(|e| EventKind::of_event(e) == Some(EventKind::ShutdownRequested))
        .count();
    assert_eq!(shutdowns, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_shutdown_request_deploys_and_kills_are_refused() {
    let dir = tempdir();
    let control = open(options(dir.path()));
    deploy(&control, "acme", "a", "m1").await;
    let (seq, _) = control.shutdown("admin", 1000).await.unwrap();
    assert!(control.is_shutting_down());
    let events = control.log().read(seq..=seq).unwrap();
    assert_eq!(EventKind::of_event(&events[0]), Some(EventKind::ShutdownRequested));
    assert!(matches!(
        control.deploy(deploy_request("acme", "b", "m")).await,
        Err(Error::ShuttingDown)
    ));
    assert!(matches!(
        control.kill(kill_command("acme", "a")).await,
        Err(Error::ShuttingDown)
    ));
    // The runtime may still report what happens while it stops.
    let stopped = solo::control::Observation::Stopped {
        tenant: "acme".into(),
        service_id: "a".into(),
        version: 1,
        reason: solo::proto::StopReason::NodeShutdown,
        how: Default::default(),
    };
    control.observe(stopped).await.unwrap();
    let last = control.log().read(control.head()..=control.head()).unwrap();
    assert!(matches!(last[0].kind, Some(Kind::ServiceStopped(_))));
}

#[test]
fn garbage_config_gives_a_clear_error() {
    let dir = tempdir();
    let path = dir.path().join("solo.toml");
    std::fs::write(&path, "[database]\nmap_size_mb = \"lots\"\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_solo"))
        .args(["log", "stats", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("database.map_size_mb") && stderr.contains("solo.toml"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_of_a_module_heals_its_damaged_copy_in_the_blob_store() {
    use sha2::Digest as _;
    let dir = tempdir();
    let control = open(options(dir.path()));
    deploy(&control, "acme", "a", "rotting-module").await;
    control.close().await;
    drop(control);

    // A bad sector under the module's bytes (every copy, as LMDB may keep stale ones).
    let path = dir.path().join("data.mdb");
    let mut bytes = std::fs::read(&path).unwrap();
    for at in places_of(&bytes, b"rotting-module") {
        bytes[at] ^= 0x20;
    }
    std::fs::write(&path, bytes).unwrap();

    let module = module("rotting-module");
    let sha: [u8; 32] = sha2::Sha256::digest(&module).into();
    let control = open(options(dir.path()));
    let stored = control.log().store().blob(&sha).unwrap().expect("the blob is there");
    assert_ne!(stored, &module[..], "the copy is damaged");
    // Deploying the same module again, to any service, carries good bytes: they replace the
    // damaged copy, or every restart would bring both services back failed.
    deploy(&control, "acme", "b", "rotting-module").await;
    let stored = control.log().store().blob(&sha).unwrap().expect("the blob is there");
    assert_eq!(stored, &module[..]);
    control.close().await;
}

/// `solo log dump` reports a record missing from the gap-free seqs, and one whose payload names
/// another seq, as damage (log-format.md), rather than skip them in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(unsafe_code)]
async fn dump_reports_a_gap_and_a_record_under_the_wrong_seq() {
    let dir = tempdir();
    let control = open(options(dir.path()));
    for id in ["a", "b", "c", "d", "e"] {
        deploy(&control, "acme", id, id).await;
    }
    control.close().await;
    drop(control);
    {
        // SAFETY: nothing else has this test's directory open.
        let env = unsafe { heed::EnvOpenOptions::new().max_dbs(8).open(dir.path()) }.unwrap();
        let mut wtxn = env.write_txn().unwrap();
        let events: heed::Database<heed::types::Bytes, heed::types::Bytes> =
            env.open_database(&wtxn, Some("events")).unwrap().unwrap();
        let fifth = events.get(&wtxn, &5u64.to_be_bytes()).unwrap().unwrap().to_vec();
        events.delete(&mut wtxn, &2u64.to_be_bytes()).unwrap();
        events.put(&mut wtxn, &4u64.to_be_bytes(), &fifth).unwrap();
        wtxn.commit().unwrap();
    }
    let read_only = solo::log::StoreOptions {
        read_only: true,
        ..options(dir.path()).log.store
    };
    let store = solo::log::Store::open(dir.path(), &read_only).unwrap();
    let (mut out, mut errors) = (Vec::new(), Vec::new());
    let filter = inspect::DumpFilter {
        from: 1,
        to: None,
        tenant: None,
        service_id: None,
    };
    let damaged = inspect::dump(&store, &filter, false, &mut out, &mut errors).unwrap();
    let errors = String::from_utf8(errors).unwrap();
    assert_eq!(damaged, 2, "{errors}");
    assert!(errors.contains("seq 2: missing"), "{errors}");
    assert!(errors.contains("seq 4: damaged record: payload says seq 5"), "{errors}");
    assert_eq!(String::from_utf8(out).unwrap().lines().count(), 3, "seqs 1, 3 and 5");
}

/// A data directory that lost its events is refused, never served as a new, empty log (which
/// would then collect its modules as unused): an empty data file, one deleted beside the lock
/// file of the node that wrote it, or an emptied `events` database beside the modules that its
/// events brought.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(unsafe_code)]
async fn a_directory_that_lost_its_events_is_refused_not_started_afresh() {
    type Raw = heed::Database<heed::types::Bytes, heed::types::Bytes>;
    type Damage = (&'static str, fn(&Path));
    let damages: [Damage; 3] = [
        ("empty", |dir| {
            std::fs::File::create(dir.join("data.mdb")).map(drop).unwrap()
        }),
        ("deleted", |dir| std::fs::remove_file(dir.join("data.mdb")).unwrap()),
        ("emptied", |dir| {
            // SAFETY: nothing else has this test's directory open.
            let env = unsafe { heed::EnvOpenOptions::new().max_dbs(8).open(dir) }.unwrap();
            let mut wtxn = env.write_txn().unwrap();
            let events: Raw = env.open_database(&wtxn, Some("events")).unwrap().unwrap();
            events.clear(&mut wtxn).unwrap();
            wtxn.commit().unwrap();
        }),
    ];
    for (damage, apply) in damages {
        let dir = tempdir();
        let control = open(options(dir.path()));
        deploy(&control, "acme", "a", "m1").await;
        control.close().await;
        drop(control);
        apply(dir.path());
        for read_only in [false, true] {
            let store = solo::log::StoreOptions {
                read_only,
                ..options(dir.path()).log.store
            };
            let err = solo::log::Store::open(dir.path(), &store).unwrap_err().to_string();
            let expected = match damage {
                "empty" => "data.mdb is empty",
                "deleted" if read_only => "no data.mdb",
                "deleted" => "data.mdb is missing, though a node ran here",
                _ => "events",
            };
            assert!(err.contains(expected), "{damage}, read_only {read_only}: {err}");
        }
    }
}

/// A data directory that does not exist is made, its parents too, and opened again as the same
/// log (the names of the new directories and data file are synced with its first commit).
#[test]
fn a_missing_nested_data_directory_is_made_and_holds_the_log() {
    let dir = tempdir();
    let nested = dir.path().join("a/b/c");
    let store = solo::log::StoreOptions {
        read_only: false,
        ..options(&nested).log.store
    };
    let node_id = solo::log::Store::open(&nested, &store).unwrap().node().node_id.clone();
    assert!(nested.join("data.mdb").is_file());
    let again = solo::log::Store::open(&nested, &store).unwrap();
    assert_eq!(again.node().node_id, node_id, "the same log");
}

/// A reader that died holding a read transaction (a `solo log` tool killed mid-read) has its
/// slot freed, so that the pages of its moment can be reused; LMDB alone frees a slot only
/// when its reader ends. The dead reader is this test binary, run again as a child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_slot_of_a_process_that_died_reading_is_freed() {
    use std::io::{BufRead as _, Write as _};
    const CHILD: &str = "SOLO_TEST_DEAD_READER_DIR";
    if let Some(dir) = std::env::var_os(CHILD) {
        let dir = std::path::PathBuf::from(dir);
        let read_only = solo::log::StoreOptions {
            read_only: true,
            ..options(&dir).log.store
        };
        let store = solo::log::Store::open(&dir, &read_only).unwrap();
        let _reading = store.read_view().unwrap();
        println!("reading");
        std::io::stdout().flush().unwrap();
        std::thread::sleep(Duration::from_secs(600));
        return;
    }
    let dir = tempdir();
    let control = open(options(dir.path()));
    deploy(&control, "acme", "a", "m1").await;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "the_reader_slot_of_a_process_that_died_reading_is_freed",
            "--nocapture",
        ])
        .env(CHILD, dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let reading = stdout
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains("reading"));
    assert!(reading, "the child never read");
    child.kill().unwrap();
    child.wait().unwrap();
    let store = control.log().store();
    assert_eq!(store.clear_stale_readers().unwrap(), 1, "the dead child's slot");
    assert_eq!(store.clear_stale_readers().unwrap(), 0);
    control.close().await;
}

/// A backup's directory is its own while it is written, and what it holds is never replaced:
/// a second backup into it is refused, and a data file that comes meanwhile (a node started
/// there) stays, the backup not put over it. The copy is its owner's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_never_replaces_a_data_file_nor_shares_its_directory() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempdir();
    let control = open(options(dir.path()));
    deploy(&control, "acme", "a", "m1").await;
    let store = control.log().store();
    let store_options = options(dir.path()).log.store;
    let settings = solo::state::Settings::default();
    let backups = tempdir();

    let dest = backups.path().join("new/nested");
    let mut staged = inspect::StagedBackup::create(&dest).unwrap();
    let second = inspect::StagedBackup::create(&dest).unwrap_err().to_string();
    assert!(second.contains("another backup is writing"), "{second}");
    store.copy_compacted(staged.file()).unwrap();
    std::fs::write(dest.join("data.mdb"), b"precious").unwrap();
    let refused = staged.finish(&store_options, settings).unwrap_err().to_string();
    assert!(refused.contains("holds a data file now"), "{refused}");
    assert_eq!(std::fs::read(dest.join("data.mdb")).unwrap(), b"precious");

    let kept = inspect::backup(store, &backups.path().join("kept"), &store_options, settings).unwrap();
    assert!(kept.kept(), "{}", kept.verified.summary());
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&kept.path), 0o600, "every tenant's data, for its owner alone");
    assert_eq!(mode(&backups.path().join("kept")), 0o700);
    let names: Vec<_> = std::fs::read_dir(backups.path().join("kept"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["data.mdb"]);

    // A link by that name is a data file too, even one that leads nowhere; a file is no
    // directory.
    let linked = backups.path().join("linked");
    std::fs::create_dir(&linked).unwrap();
    std::os::unix::fs::symlink("/nowhere", linked.join("data.mdb")).unwrap();
    let refused = inspect::StagedBackup::create(&linked).unwrap_err().to_string();
    assert!(refused.contains("already holds a data file"), "{refused}");
    let file = backups.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let refused = inspect::StagedBackup::create(&file).unwrap_err().to_string();
    assert!(refused.contains("is not a directory"), "{refused}");
    control.close().await;
}
