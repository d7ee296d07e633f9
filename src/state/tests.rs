use super::*;
use crate::event::envelope;
use crate::proto::{Limits, ServiceCrashed, ServiceDeployed, ServiceKillRequested, ServiceStarted, ServiceStopped};

fn at(mut event: Event, seq: u64, ts: u64) -> Event {
    event.seq = seq;
    event.timestamp_ms = ts;
    event
}

fn deployed(id: &str, version: u64, memory: u64, key: &str) -> Event {
    envelope(
        "acme",
        id,
        "tenant:acme",
        Kind::ServiceDeployed(ServiceDeployed {
            module_sha256: format!("{version:064x}"),
            version,
            limits: Some(Limits {
                memory_bytes: memory,
                ..Limits::default()
            }),
            idempotency_key: key.into(),
            ..ServiceDeployed::default()
        }),
    )
}

fn started(id: &str, version: u64) -> Event {
    envelope(
        "acme",
        id,
        "node",
        Kind::ServiceStarted(ServiceStarted {
            version,
            recovered: false,
        }),
    )
}

fn stopped(id: &str, version: u64, reason: StopReason) -> Event {
    envelope(
        "acme",
        id,
        "node",
        Kind::ServiceStopped(ServiceStopped {
            version,
            reason: reason as i32,
            ..Default::default()
        }),
    )
}

fn kill(id: &str) -> Event {
    envelope(
        "acme",
        id,
        "tenant:acme",
        Kind::ServiceKillRequested(ServiceKillRequested::default()),
    )
}

#[test]
fn lifecycle_and_quota_counts() {
    let mut state = State::new(Settings::default());
    state.apply(&at(deployed("a", 1, 100, ""), 1, 10)).unwrap();
    state.apply(&at(deployed("b", 1, 50, ""), 2, 11)).unwrap();
    state.apply(&at(started("a", 1), 3, 12)).unwrap();
    let tenant = state.tenant("acme").unwrap();
    assert_eq!((tenant.quota_services, tenant.quota_memory_bytes), (2, 150));
    assert_eq!(state.service("acme", "a").unwrap().status, Status::Running);

    // Upgrade: memory is replaced, not added; the service starts over.
    state.apply(&at(deployed("a", 2, 10, ""), 4, 13)).unwrap();
    let a = state.service("acme", "a").unwrap();
    assert_eq!(
        (a.version, a.status, a.deployed_seq, a.created_at_ms),
        (2, Status::Starting, 4, 10)
    );
    assert_eq!(state.tenant("acme").unwrap().quota_memory_bytes, 60);

    // A service being killed holds its quota until it has stopped: its instance still exists.
    state.apply(&at(kill("b"), 5, 14)).unwrap();
    assert_eq!(state.service("acme", "b").unwrap().status, Status::Stopping);
    let tenant = state.tenant("acme").unwrap();
    assert_eq!((tenant.quota_services, tenant.quota_memory_bytes), (2, 60));
    let stopped = envelope(
        "acme",
        "b",
        "node",
        Kind::ServiceStopped(ServiceStopped {
            version: 1,
            reason: StopReason::Killed as i32,
            ..Default::default()
        }),
    );
    state.apply(&at(stopped, 6, 15)).unwrap();
    assert_eq!(state.service("acme", "b").unwrap().status, Status::Stopped);
    let tenant = state.tenant("acme").unwrap();
    assert_eq!((tenant.quota_services, tenant.quota_memory_bytes), (1, 10));
    // The three deploys (at 10, 11 and 13 ms) share the window's first second, which counts
    // them together until all of it is past.
    assert_eq!(state.deploys_since("acme", 10), 3);
    assert_eq!(state.deploys_since("acme", 999), 0);
}

#[test]
fn a_module_counts_the_services_that_should_run_it() {
    // Modules told apart by their first byte (counts are kept by a prefix of the hash).
    let module = |n: u8| {
        let mut hash = [0; 32];
        hash[0] = n;
        hash
    };
    let deploy = |id: &str, version: u64, n: u8| {
        let mut event = deployed(id, version, 1, "");
        if let Some(Kind::ServiceDeployed(d)) = &mut event.kind {
            d.module_sha256 = hex::encode(module(n));
        }
        event
    };
    let mut state = State::new(Settings::default());
    state.apply(&at(deploy("a", 1, 1), 1, 1)).unwrap();
    state.apply(&at(deploy("b", 1, 1), 2, 1)).unwrap();
    assert_eq!(state.module_users(&module(1)), 2);
    // A killed service lets its module go, once, however often it is killed.
    state.apply(&at(kill("b"), 3, 1)).unwrap();
    assert_eq!(state.module_users(&module(1)), 1);
    let mut forced = kill("b");
    if let Some(Kind::ServiceKillRequested(k)) = &mut forced.kind {
        k.force = true;
    }
    state.apply(&at(forced, 4, 1)).unwrap();
    assert_eq!(state.module_users(&module(1)), 1);
    // Redeployed, it takes up its new module; an upgrade switches modules.
    state.apply(&at(deploy("b", 2, 2), 5, 1)).unwrap();
    assert_eq!((state.module_users(&module(1)), state.module_users(&module(2))), (1, 1));
    state.apply(&at(deploy("a", 2, 2), 6, 1)).unwrap();
    assert_eq!((state.module_users(&module(1)), state.module_users(&module(2))), (0, 2));
    // A snapshot counts as the log did.
    let mut bytes = Vec::new();
    state.encode_snapshot(&mut bytes);
    assert_eq!(State::decode_snapshot(&bytes, Settings::default()).unwrap(), state);
}

#[test]
fn a_stopped_service_leaves_the_registry_and_its_id_starts_over() {
    let removed = |key: &str| {
        envelope(
            "acme",
            "a",
            "tenant:acme",
            Kind::ServiceRemoved(proto::ServiceRemoved {
                idempotency_key: key.into(),
                ..Default::default()
            }),
        )
    };
    let stopped = envelope(
        "acme",
        "a",
        "node",
        Kind::ServiceStopped(ServiceStopped {
            version: 1,
            reason: StopReason::Killed as i32,
            ..Default::default()
        }),
    );
    let mut state = State::new(Settings::default());
    state.apply(&at(deployed("a", 1, 1, ""), 1, 1)).unwrap();
    // Running, then stopping: not yet.
    assert!(state.apply(&at(removed(""), 2, 1)).is_err());
    state.apply(&at(kill("a"), 2, 1)).unwrap();
    assert!(state.apply(&at(removed(""), 3, 1)).is_err());
    state.apply(&at(stopped, 3, 1)).unwrap();
    state.apply(&at(removed("rm-1"), 4, 1)).unwrap();
    assert!(state.service("acme", "a").is_none());
    assert_eq!(state.tenant("acme").unwrap().quota_services, 0);
    let record = state.idempotency("acme", "rm-1", 1).unwrap();
    assert_eq!((record.op, record.seq), (IdempotentOp::Remove, 4));
    // The id is free: a deploy starts over at version 1.
    assert!(state.apply(&at(deployed("a", 2, 1, ""), 5, 1)).is_err());
    state.apply(&at(deployed("a", 1, 1, ""), 5, 1)).unwrap();
    let mut bytes = Vec::new();
    state.encode_snapshot(&mut bytes);
    assert_eq!(State::decode_snapshot(&bytes, Settings::default()).unwrap(), state);
}

#[test]
fn killed_and_stopped_services_are_counted_the_longest_stopped_first() {
    let stopped = |id: &str, version: u64| stopped(id, version, StopReason::Killed);
    let shut_down = envelope(
        "acme",
        "d",
        "node",
        Kind::ServiceStopped(ServiceStopped {
            version: 1,
            reason: StopReason::NodeShutdown as i32,
            ..Default::default()
        }),
    );
    let removed = envelope(
        "acme",
        "a",
        "node",
        Kind::ServiceRemoved(proto::ServiceRemoved::default()),
    );
    let count = |state: &State| state.tenant("acme").unwrap().stopped_services;
    let longest = |state: &State, n: usize| -> Vec<String> {
        let tenant = state.tenant("acme").unwrap();
        tenant.stopped_longest(n).into_iter().map(|s| s.id.clone()).collect()
    };
    let mut state = State::new(Settings::default());
    let events = [
        deployed("a", 1, 1, ""),
        deployed("b", 1, 1, ""),
        deployed("c", 1, 1, ""),
        deployed("d", 1, 1, ""),
        kill("a"),
        stopped("a", 1),
        kill("c"),
        stopped("c", 1),
        kill("b"),
        // Stopping, not yet stopped; and stopped by a shutdown, which comes back with the node.
        shut_down,
    ];
    for (seq, event) in (1..).zip(events) {
        state.apply(&at(event, seq, 1)).unwrap();
    }
    assert_eq!(count(&state), 2);
    state.apply(&at(stopped("b", 1), 11, 1)).unwrap();
    assert_eq!(count(&state), 3);
    assert_eq!(longest(&state, 2), ["a", "c"]);
    assert_eq!(longest(&state, 5), ["a", "c", "b"]);
    // A new service is not one; a redeploy and a removal each take one away.
    state.apply(&at(deployed("e", 1, 1, ""), 12, 1)).unwrap();
    assert_eq!(count(&state), 3);
    state.apply(&at(deployed("c", 2, 1, ""), 13, 1)).unwrap();
    state.apply(&at(removed, 14, 1)).unwrap();
    assert_eq!((count(&state), longest(&state, 5)), (1, vec!["b".to_string()]));
    // A snapshot counts as the log did.
    let mut bytes = Vec::new();
    state.encode_snapshot(&mut bytes);
    assert_eq!(State::decode_snapshot(&bytes, Settings::default()).unwrap(), state);
}

#[test]
fn events_that_do_not_fit_change_nothing() {
    let mut state = State::new(Settings::default());
    state.apply(&at(deployed("a", 1, 1, ""), 1, 1)).unwrap();
    let before = state.clone();
    let cases = [
        at(started("a", 2), 2, 2),
        at(started("ghost", 1), 2, 2),
        at(deployed("a", 3, 1, ""), 2, 2),
        at(started("a", 1), 5, 2),
        at(
            envelope(
                "",
                "",
                "node",
                Kind::ServiceStarted(ServiceStarted {
                    version: 1,
                    recovered: false,
                }),
            ),
            2,
            2,
        ),
    ];
    for event in &cases {
        assert!(state.apply(event).is_err(), "{event:?} applied");
        assert_eq!(state, before);
    }
    state.skip(&cases[0]);
    assert_eq!(state.applied_seq(), 2);
}

#[test]
fn crash_reasons_decide_the_status() {
    let mut state = State::new(Settings::default());
    state.apply(&at(deployed("a", 1, 1, ""), 1, 1)).unwrap();
    let crash = |reason: CrashReason, restarting| {
        envelope(
            "acme",
            "a",
            "node",
            Kind::ServiceCrashed(ServiceCrashed {
                version: 1,
                reason: reason as i32,
                restarting,
                message: "boom".into(),
                ..ServiceCrashed::default()
            }),
        )
    };
    state.apply(&at(crash(CrashReason::Trap, true), 2, 2)).unwrap();
    assert_eq!(state.service("acme", "a").unwrap().status, Status::Starting);
    state.apply(&at(crash(CrashReason::Trap, false), 3, 3)).unwrap();
    let a = state.service("acme", "a").unwrap();
    assert_eq!((a.status, a.last_error.as_str()), (Status::Crashed, "boom"));
    // Crashed stays down: another crash report does not fit.
    assert!(state.check(&at(crash(CrashReason::Trap, true), 4, 4)).is_err());
    state.apply(&at(deployed("a", 2, 1, ""), 4, 4)).unwrap();
    assert_eq!(state.service("acme", "a").unwrap().last_error, "");
}

/// A version the node could not load comes back with the next node (the cause was the node's);
/// one whose `solo_init` failed does not. Snapshots keep which it was.
#[test]
fn a_load_failure_comes_back_with_the_node_and_an_init_failure_does_not() {
    use prost::Message as _;
    let mut state = State::new(Settings::default());
    state.apply(&at(deployed("a", 1, 1, ""), 1, 1)).unwrap();
    let crash = |version: u64, reason: CrashReason| {
        envelope(
            "acme",
            "a",
            "node",
            Kind::ServiceCrashed(ServiceCrashed {
                version,
                reason: reason as i32,
                ..ServiceCrashed::default()
            }),
        )
    };
    state.apply(&at(crash(1, CrashReason::LoadFailure), 2, 2)).unwrap();
    let a = state.service("acme", "a").unwrap();
    assert_eq!((a.status, a.load_failed), (Status::Failed, true));
    assert!(a.comes_back_with_the_node());
    let restored = State::decode_snapshot(&state.to_snapshot().encode_to_vec(), Settings::default()).unwrap();
    assert_eq!(restored, state);
    // Tried again at the next start, it may fail again, or run.
    state.apply(&at(crash(1, CrashReason::LoadFailure), 3, 3)).unwrap();
    let started = envelope(
        "acme",
        "a",
        "node",
        Kind::ServiceStarted(ServiceStarted {
            version: 1,
            recovered: true,
        }),
    );
    state.apply(&at(started, 4, 4)).unwrap();
    let a = state.service("acme", "a").unwrap();
    assert_eq!((a.status, a.load_failed), (Status::Running, false));

    state.apply(&at(deployed("a", 2, 1, ""), 5, 5)).unwrap();
    state.apply(&at(crash(2, CrashReason::InitFailure), 6, 6)).unwrap();
    let a = state.service("acme", "a").unwrap();
    assert_eq!((a.status, a.load_failed), (Status::Failed, false));
    assert!(!a.comes_back_with_the_node());
}

#[test]
fn idempotency_keys_expire_after_the_window() {
    let settings = Settings {
        idempotency_window_ms: 1000,
        ..Settings::default()
    };
    let mut state = State::new(settings);
    state.apply(&at(deployed("a", 1, 1, "k1"), 1, 100)).unwrap();
    assert_eq!(state.idempotency("acme", "k1", 1099).map(|r| r.seq), Some(1));
    assert!(state.idempotency("acme", "k1", 1100).is_none());
    // Expired keys are forgotten when the next key is remembered.
    state.apply(&at(deployed("b", 1, 1, "k2"), 2, 1100)).unwrap();
    let keys: Vec<&str> = state
        .tenant("acme")
        .unwrap()
        .idempotency
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(keys, ["k2"]);
    // Deploys count per second (a sixtieth of the minute window): 100 and 1100 fall in
    // different seconds.
    assert_eq!(state.deploys_since("acme", 99), 2);
    assert_eq!(state.deploys_since("acme", 998), 2);
    assert_eq!(state.deploys_since("acme", 999), 1);
    // And as time passes, whatever the next event: an unkeyed one forgets k2 too.
    state.apply(&at(deployed("c", 1, 1, ""), 3, 2100)).unwrap();
    assert!(state.tenant("acme").unwrap().idempotency.is_empty());
}

#[test]
fn a_rate_window_counts_per_interval_and_never_undercounts() {
    let window_ms = 60_000;
    let mut window = RateWindow::default();
    // (commit time, amount): deploys count one each, history bytes an event's size.
    let mut times: Vec<(u64, u64)> = Vec::new();
    // A deterministic walk of commit times: bursts within one interval, gaps across many.
    let mut at = 1_000_000u64;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..5_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        at += match seed % 10 {
            0 => seed % 90_000,
            1..=3 => seed % 3_000,
            _ => seed % 50,
        };
        let amount = if seed.is_multiple_of(3) { 1 + seed % 20_000 } else { 1 };
        window.add(at, window_ms, amount);
        times.push((at, amount));
        let sum_where = |keep: &dyn Fn(u64) -> bool| -> u64 {
            times.iter().filter(|&&(t, _)| keep(t)).map(|&(_, amount)| amount).sum()
        };
        for since in [at.saturating_sub(window_ms), at - 30_000, at - 1_500, at - 1, at] {
            let exact = sum_where(&|t| t > since);
            let counted = window.since(since, window_ms);
            assert!(counted >= exact, "at {at}, since {since}: counted {counted} < {exact}");
            // Over by at most what the interval that holds `since` holds.
            let interval = since - since % 1000;
            let same_interval = sum_where(&|t| t >= interval && t <= since);
            assert!(
                counted <= exact + same_interval,
                "at {at}, since {since}: {counted} > {exact} + {same_interval}"
            );
        }
        // Bounded however fast the deploys come: one entry per interval of the window, plus
        // the interval the window starts in.
        assert!(window.intervals().len() as u64 <= WINDOW_INTERVALS + 1);
        // `room_at` is the first moment the count is under the quota again.
        for max in [1, 7, 50, 500, 100_000] {
            let room_at = window.room_at(at, window_ms, max);
            let counted_at = |t: u64| window.since(t - window_ms, window_ms);
            assert!(counted_at(room_at) < max, "at {at}, max {max}: full at {room_at}");
            if room_at > at {
                assert!(
                    counted_at(room_at - 1) >= max,
                    "at {at}, max {max}: room before {room_at}"
                );
            }
        }
    }
}

#[test]
fn every_event_of_a_tenants_services_counts_against_its_history_as_the_log_stores_it() {
    use prost::Message as _;
    let hour = Settings::default().history_window_ms;
    let stored = |event: &Event| (crate::log::frame::HEADER_LEN + event.encoded_len()) as u64;
    let mut state = State::new(Settings::default());
    let events = [
        at(labelled(deployed("a", 1, 7, ""), &[("env", "prod")]), 1, 1_000),
        // The node's own events count for the tenant whose service they tell of.
        at(started("a", 1), 2, 2_000),
        at(kill("a"), 3, 3_000),
    ];
    for event in &events {
        state.apply(event).unwrap();
    }
    let node_started = at(
        envelope("", "", "node", Kind::NodeStarted(Default::default())),
        4,
        4_000,
    );
    state.apply(&node_started).unwrap();
    let total: u64 = events.iter().map(stored).sum();
    assert_eq!(state.history_bytes("acme", 4_000), total);
    assert_eq!(state.history_bytes("globex", 4_000), 0);
    assert_eq!(state.tenants().count(), 1, "a node event belongs to no tenant");

    // Room comes once the oldest interval (a minute of the hour) has left the window.
    assert_eq!(state.history_room_at("acme", 4_000, total + 1), 4_000);
    assert_eq!(state.history_room_at("acme", 4_000, total), 60_000 - 1 + hour);
    assert_eq!(state.history_bytes("acme", 60_000 - 1 + hour), 0);

    // A snapshot keeps the count.
    let mut bytes = Vec::new();
    state.encode_snapshot(&mut bytes);
    let restored = State::decode_snapshot(&bytes, Settings::default()).unwrap();
    assert_eq!(restored.history_bytes("acme", 4_000), total);
}

#[test]
fn a_burst_of_deploys_is_one_interval() {
    let mut window = RateWindow::default();
    for at in 5_000..5_500 {
        window.record(at, 60_000);
    }
    assert_eq!(window.intervals().collect::<Vec<_>>(), [(5_000, 500)]);
    assert_eq!(window.since(4_999, 60_000), 500);
    // The interval counts until all of it has left the window.
    assert_eq!(window.since(5_998, 60_000), 500);
    assert_eq!(window.since(5_999, 60_000), 0);
    // A tenant allowed 500 a minute waits for the burst to leave; one allowed 501 need not.
    assert_eq!(window.room_at(6_000, 60_000, 500), 65_999);
    assert_eq!(window.room_at(6_000, 60_000, 501), 6_000);
    window.record(66_000, 60_000);
    assert_eq!(
        window.intervals().collect::<Vec<_>>(),
        [(66_000, 1)],
        "5,000..6,000 left the window"
    );
}

/// Services being killed hold their instances until they stop: the node counts them, until
/// they stop or are deployed again.
#[test]
fn services_being_killed_are_counted_until_they_stop_or_come_back() {
    let mut state = State::new(Settings::default());
    let stopped = |id: &str| {
        envelope(
            "acme",
            id,
            "node",
            Kind::ServiceStopped(ServiceStopped {
                version: 1,
                ..ServiceStopped::default()
            }),
        )
    };
    state.apply(&at(deployed("a", 1, 7, ""), 1, 1)).unwrap();
    state.apply(&at(deployed("b", 1, 7, ""), 2, 2)).unwrap();
    state.apply(&at(kill("a"), 3, 3)).unwrap();
    state.apply(&at(kill("b"), 4, 4)).unwrap();
    assert_eq!((state.active_services(), state.stopping_services()), (0, 2));
    let mut forced = kill("a");
    forced.kind = Some(Kind::ServiceKillRequested(ServiceKillRequested {
        force: true,
        ..ServiceKillRequested::default()
    }));
    state.apply(&at(forced, 5, 5)).unwrap(); // hurries the first kill along
    state.apply(&at(stopped("a"), 6, 6)).unwrap();
    state.apply(&at(deployed("b", 2, 7, ""), 7, 7)).unwrap();
    assert_eq!((state.active_services(), state.stopping_services()), (1, 0));
    let mut bytes = Vec::new();
    state.apply(&at(kill("b"), 8, 8)).unwrap();
    state.encode_snapshot(&mut bytes);
    let restored = State::decode_snapshot(&bytes, Settings::default()).unwrap();
    assert_eq!(restored.stopping_services(), 1);
}

/// The stop of a version an upgrade replaced is history: the newer version's status and quota
/// are untouched, and only an older version's such stop applies.
#[test]
fn the_stop_of_a_version_an_upgrade_replaced_is_history() {
    let mut state = State::new(Settings::default());
    let replaced = |version| stopped("a", version, StopReason::Replaced);
    state.apply(&at(deployed("a", 1, 7, ""), 1, 1)).unwrap();
    state.apply(&at(started("a", 1), 2, 2)).unwrap();
    // The version serving cannot have been replaced, nor one not yet deployed.
    for version in [1, 2] {
        assert!(matches!(
            state.check(&at(replaced(version), 3, 3)),
            Err(ApplyError::StaleVersion { current: 1, .. })
        ));
    }
    state.apply(&at(deployed("a", 2, 3, ""), 3, 3)).unwrap();
    // Recorded before or after the new version's start, it changes no status.
    state.apply(&at(replaced(1), 4, 4)).unwrap();
    let a = state.service("acme", "a").unwrap();
    assert_eq!((a.version, a.status, a.last_seq), (2, Status::Starting, 4));
    state.apply(&at(started("a", 2), 5, 5)).unwrap();
    let before = state.clone();
    state.apply(&at(replaced(1), 6, 6)).unwrap();
    let a = state.service("acme", "a").unwrap();
    assert_eq!((a.version, a.status, a.desired), (2, Status::Running, Desired::Running));
    assert_eq!(
        state.tenant("acme").unwrap().quota_memory_bytes,
        before.tenant("acme").unwrap().quota_memory_bytes
    );
}

/// A killed version that a deploy replaces before it has stopped is still owed its stop, which
/// is recorded, as history, once: the new version goes on. Until then the service reserves the
/// larger of the two versions' memory (they run one at a time), and one service slot.
#[test]
fn the_stop_of_a_killed_version_replaced_while_stopping_is_history() {
    let mut state = State::new(Settings::default());
    let stopped = |version| stopped("a", version, StopReason::Killed);
    let quota = |state: &State| {
        let tenant = state.tenant("acme").unwrap();
        (tenant.quota_services, tenant.quota_memory_bytes)
    };
    state.apply(&at(deployed("a", 1, 7, ""), 1, 1)).unwrap();
    state.apply(&at(started("a", 1), 2, 2)).unwrap();
    state.apply(&at(kill("a"), 3, 3)).unwrap();
    // Never stopped: its stop is owed to no one.
    assert!(state.check(&at(stopped(0), 4, 4)).is_err());
    // A smaller version replaces it: the killed one's memory stays reserved until it stops.
    state.apply(&at(deployed("a", 2, 3, ""), 4, 4)).unwrap();
    let replaced = &state.service("acme", "a").unwrap().replaced_while_stopping;
    assert_eq!(
        replaced.iter().map(|r| (r.version, r.memory_bytes)).collect::<Vec<_>>(),
        [(1, 7)]
    );
    assert_eq!(quota(&state), (1, 7));
    let mut bytes = Vec::new();
    state.encode_snapshot(&mut bytes);
    assert_eq!(State::decode_snapshot(&bytes, Settings::default()).unwrap(), state);

    state.apply(&at(stopped(1), 5, 5)).unwrap();
    let a = state.service("acme", "a").unwrap();
    assert_eq!((a.version, a.status, a.last_seq), (2, Status::Starting, 5));
    assert!(a.replaced_while_stopping.is_empty());
    assert_eq!(quota(&state), (1, 3));
    // Once recorded, a second stop of it is stale.
    assert!(matches!(
        state.check(&at(stopped(1), 6, 6)),
        Err(ApplyError::StaleVersion { .. })
    ));
    state.apply(&at(started("a", 2), 6, 6)).unwrap();
    assert_eq!(state.service("acme", "a").unwrap().status, Status::Running);

    // Kills and redeploys that outrun a slow stop: the newest versions are kept track of.
    let mut seq = 7;
    for version in 2..2 + MAX_REPLACED_WHILE_STOPPING as u64 + 1 {
        state.apply(&at(kill("a"), seq, seq)).unwrap();
        state
            .apply(&at(deployed("a", version + 1, 9, ""), seq + 1, seq + 1))
            .unwrap();
        seq += 2;
    }
    let a = state.service("acme", "a").unwrap();
    assert_eq!(a.replaced_while_stopping.len(), MAX_REPLACED_WHILE_STOPPING);
    assert_eq!(a.replaced_while_stopping.first().map(|r| r.version), Some(3));
    assert_eq!(quota(&state), (1, 9));
    let mut bytes = Vec::new();
    state.encode_snapshot(&mut bytes);
    assert_eq!(State::decode_snapshot(&bytes, Settings::default()).unwrap(), state);

    // Older builds' snapshots lack the list that a replay of their log gives: outdated. So is
    // one whose list is out of order.
    use prost::Message as _;
    let mut snapshot = state.to_snapshot();
    snapshot.format = 0;
    let older = snapshot.encode_to_vec();
    assert!(matches!(
        State::decode_snapshot(&older, Settings::default()),
        Err(SnapshotError::Outdated(_))
    ));
    let mut snapshot = state.to_snapshot();
    snapshot.services[0].replaced_while_stopping.reverse();
    let shuffled = snapshot.encode_to_vec();
    assert!(matches!(
        State::decode_snapshot(&shuffled, Settings::default()),
        Err(SnapshotError::Inconsistent(_))
    ));
}

#[test]
fn snapshot_round_trips() {
    let mut state = State::new(Settings::default());
    state.apply(&at(deployed("a", 1, 7, "k"), 1, 1)).unwrap();
    state.apply(&at(started("a", 1), 2, 2)).unwrap();
    state.apply(&at(deployed("b", 1, 9, ""), 3, 3)).unwrap();
    state.apply(&at(kill("b"), 4, 4)).unwrap();
    let mut bytes = Vec::new();
    state.encode_snapshot(&mut bytes);
    let restored = State::decode_snapshot(&bytes, Settings::default()).unwrap();
    assert_eq!(restored, state);
    assert!(State::decode_snapshot(b"\xff\xff", Settings::default()).is_err());
}

/// Restart times are kept (the newest `max_restarts`), round-trip through snapshots, and a
/// snapshot of a restarted service without them comes from a build that kept none.
#[test]
fn restart_times_are_kept_and_snapshots_without_them_are_outdated() {
    use crate::proto::ServiceRestarted;
    use prost::Message as _;
    let mut state = State::new(Settings::default());
    let mut deploy = deployed("a", 1, 7, "");
    if let Some(Kind::ServiceDeployed(d)) = &mut deploy.kind {
        d.limits.as_mut().unwrap().max_restarts = 2;
    }
    state.apply(&at(deploy, 1, 1)).unwrap();
    state.apply(&at(started("a", 1), 2, 2)).unwrap();
    for restarts in 1..=3 {
        let crashed = envelope(
            "acme",
            "a",
            "node",
            Kind::ServiceCrashed(ServiceCrashed {
                version: 1,
                restarting: true,
                ..ServiceCrashed::default()
            }),
        );
        let restarted = envelope(
            "acme",
            "a",
            "node",
            Kind::ServiceRestarted(ServiceRestarted { version: 1, restarts }),
        );
        let seq = 2 * u64::from(restarts) + 1;
        state.apply(&at(crashed, seq, seq * 10)).unwrap();
        state.apply(&at(restarted, seq + 1, (seq + 1) * 10)).unwrap();
    }
    assert_eq!(state.service("acme", "a").unwrap().restart_times_ms, [60, 80]);

    let mut snapshot = state.to_snapshot();
    let restored = State::decode_snapshot(&snapshot.encode_to_vec(), Settings::default()).unwrap();
    assert_eq!(restored, state);
    snapshot.services[0].restart_times_ms.clear();
    let decoded = State::decode_snapshot(&snapshot.encode_to_vec(), Settings::default());
    assert!(matches!(decoded, Err(SnapshotError::Outdated(_))), "{decoded:?}");
}

#[test]
fn snapshots_with_deploy_times_one_by_one_are_outdated() {
    use prost::Message as _;
    let mut state = State::new(Settings::default());
    state.apply(&at(deployed("a", 1, 7, ""), 1, 1)).unwrap();
    let mut snapshot = state.to_snapshot();
    assert_eq!(snapshot.recent_deploys[0].interval_deploys, [1]);

    snapshot.recent_deploys[0].at_ms = vec![1];
    let decoded = State::decode_snapshot(&snapshot.encode_to_vec(), Settings::default());
    assert!(matches!(decoded, Err(SnapshotError::Outdated(_))), "{decoded:?}");

    snapshot.recent_deploys[0].at_ms.clear();
    snapshot.recent_deploys[0].interval_deploys.push(3);
    let decoded = State::decode_snapshot(&snapshot.encode_to_vec(), Settings::default());
    assert!(
        matches!(&decoded, Err(SnapshotError::Inconsistent(m)) if m.contains("1 deploy interval starts but 2 amounts")),
        "{decoded:?}"
    );
}

fn labelled(mut event: Event, labels: &[(&str, &str)]) -> Event {
    if let Some(Kind::ServiceDeployed(e)) = &mut event.kind {
        e.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    }
    event
}

fn labels_of(event: &Event) -> Labels {
    match &event.kind {
        Some(Kind::ServiceDeployed(e)) => e.labels.clone(),
        other => panic!("not a deploy: {other:?}"),
    }
}

#[test]
fn applying_by_taking_the_labels_equals_applying_a_copy() {
    let events = [
        at(
            labelled(deployed("a", 1, 7, "k1"), &[("env", "prod"), ("app", "a")]),
            1,
            10,
        ),
        at(started("a", 1), 2, 20),
        at(labelled(deployed("a", 2, 7, ""), &[("env", "dev")]), 3, 30),
        at(kill("a"), 4, 40),
    ];
    let mut copied = State::new(Settings::default());
    let mut taken = State::new(Settings::default());
    let mut handed_back = Vec::new();
    for event in &events {
        copied.apply(event).unwrap();
        let mut event = event.clone();
        let stored = stored_bytes(&event);
        taken.apply_taking(&mut event, stored).unwrap();
        if matches!(event.kind, Some(Kind::ServiceDeployed(_))) {
            handed_back.push(labels_of(&event));
        }
    }
    assert_eq!(taken, copied);
    let service = taken.service("acme", "a").unwrap();
    assert_eq!(service.labels, labels_of(&events[2]));
    // Each deploy hands back the labels it replaced: none, then the first version's.
    assert_eq!(handed_back, [Labels::new(), labels_of(&events[0])]);

    // A deploy that does not apply keeps its labels and changes nothing.
    let mut stale = at(labelled(deployed("a", 2, 7, ""), &[("env", "qa")]), 5, 50);
    let before = taken.clone();
    assert!(matches!(
        taken.apply_taking(&mut stale, 0),
        Err(ApplyError::StaleVersion { .. })
    ));
    assert_eq!(taken, before);
    assert_eq!(labels_of(&stale), Labels::from([("env".to_string(), "qa".to_string())]));
}

#[test]
fn a_service_keeps_the_seqs_of_its_newest_events() {
    let mut state = State::new(Settings::default());
    state.apply(&at(deployed("a", 1, 7, ""), 1, 1)).unwrap();
    assert_eq!(state.service("acme", "a").unwrap().recent_seqs.as_slice(), [1]);
    let mut seq = 1;
    for version in 2..=12 {
        seq += 1;
        state.apply(&at(deployed("a", version, 7, ""), seq, seq)).unwrap();
    }
    let recent: Vec<u64> = state.service("acme", "a").unwrap().recent_seqs.iter().collect();
    assert_eq!(
        recent,
        (3..=12).collect::<Vec<_>>(),
        "the newest {RECENT_EVENTS}, oldest first"
    );

    let mut bytes = Vec::new();
    state.encode_snapshot(&mut bytes);
    let restored = State::decode_snapshot(&bytes, Settings::default()).unwrap();
    assert_eq!(
        restored.service("acme", "a").unwrap().recent_seqs,
        state.service("acme", "a").unwrap().recent_seqs
    );
    assert_eq!(RecentSeqs::from_iter(1..=25).as_slice(), (16..=25).collect::<Vec<_>>());
}

#[test]
fn request_hashes_tell_apart_every_field_a_retry_could_change() {
    use crate::state::{deploy_request_hash, kill_request_hash};
    let labels =
        |pairs: &[(&str, &str)]| -> Labels { pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
    let base = deploy_request_hash(&Limits::default(), &labels(&[("ab", "c")]), None);
    assert_eq!(
        base,
        deploy_request_hash(&Limits::default(), &labels(&[("ab", "c")]), None)
    );
    // Length prefixes keep label boundaries apart.
    assert_ne!(
        base,
        deploy_request_hash(&Limits::default(), &labels(&[("a", "bc")]), None)
    );
    let windowed = Limits {
        restart_window_ms: 1,
        ..Limits::default()
    };
    assert_ne!(base, deploy_request_hash(&windowed, &labels(&[("ab", "c")]), None));
    let required = |version| deploy_request_hash(&Limits::default(), &labels(&[("ab", "c")]), Some(version));
    assert_ne!(base, required(0), "naming version 0 is asking for a new service");
    assert_ne!(required(0), required(1));
    assert_ne!(kill_request_hash(false, 0, None), kill_request_hash(true, 0, None));
    assert_ne!(kill_request_hash(false, 0, None), kill_request_hash(false, 1, None));
    assert_ne!(kill_request_hash(false, 0, None), kill_request_hash(false, 0, Some(0)));
}
