//! Fuzzing entry points, shared by the cargo-fuzz targets in `fuzz/` and by the corpus test
//! (`tests/fuzz_corpus.rs`, which runs the checked-in seeds through them on stable Rust).
//!
//! Each function takes arbitrary bytes and must not panic on any input. The `assert!`s are
//! differential checks: one that fails is a finding, exactly like any other panic.

use prost::Message as _;

use crate::log::{Record, frame};
use crate::proto::{Event, Limits, ServiceDeployed, ServiceKillRequested, event::Kind};
use crate::state::{Settings, State};

/// `data` as a stored event record: a frame around a protobuf `solo.v1.Event`.
pub fn record(data: &[u8]) {
    let Ok(payload) = frame::decode(data) else {
        return;
    };
    // Framing is deterministic: a frame that checks is exactly the frame of its payload.
    assert_eq!(frame::encode(payload), data, "re-framed payload differs");
    let Ok(event) = Event::decode_payload(payload) else {
        return;
    };
    // The log's own write path (encode_with + encode_payload) must read back to the same event.
    let reframed = frame::encode_with(|out| event.encode_payload(out));
    let payload = frame::decode(&reframed).expect("a fresh frame checks");
    assert_eq!(Event::decode_payload(payload).as_ref(), Ok(&event), "record round trip");
    show(&event);
    fold(State::new(Settings::default()), &event);
}

/// `data` as the protobuf payload of an event.
pub fn event(data: &[u8]) {
    let Ok(event) = Event::decode(data) else {
        return;
    };
    assert_eq!(
        Event::decode(event.encode_to_vec().as_slice()).as_ref(),
        Ok(&event),
        "event round trip"
    );
    show(&event);
    for state in [State::new(Settings::default()), with_service(), with_replaced_version()] {
        // As it is, and moved to the seq that follows the state, so that seq is no barrier.
        fold(state.clone(), &event);
        let next = Event {
            seq: state.applied_seq() + 1,
            ..event.clone()
        };
        fold(state, &next);
    }
}

/// `data` as the protobuf payload of a state snapshot.
///
/// A decoded snapshot need not be canonical (a record may repeat, a tenant may be empty), so
/// the check is that its re-encoding is a fixpoint: it decodes to a state that encodes to it.
pub fn snapshot(data: &[u8]) {
    let settings = Settings::default();
    let Ok(state) = State::decode_snapshot(data, settings) else {
        return;
    };
    let canonical = state.to_snapshot();
    let mut bytes = Vec::new();
    state.encode_snapshot(&mut bytes);
    let again = State::decode_snapshot(&bytes, settings).expect("a snapshot this build wrote decodes");
    assert_eq!(again.to_snapshot(), canonical, "snapshot is not a fixpoint");
}

/// The JSON and the one-line forms of an event, which the CLI and the REST API print.
fn show(event: &Event) {
    let json = crate::event::to_json(event);
    assert_eq!(json["seq"], event.seq);
    let _ = crate::event::describe(event);
}

/// Applies `event` to `state`, checking that `check` agrees with `apply`, that a refused event
/// leaves the state untouched, and that an applied one survives a snapshot round trip.
fn fold(mut state: State, event: &Event) {
    let before = state.clone();
    let checked = state.check(event);
    let applied = state.apply(event);
    assert_eq!(checked, applied, "check and apply disagree");
    if applied.is_err() {
        assert_eq!(state, before, "a refused event changed the state");
        return;
    }
    let mut bytes = Vec::new();
    state.encode_snapshot(&mut bytes);
    assert_eq!(
        State::decode_snapshot(&bytes, state.settings()),
        Ok(state),
        "state changed across a snapshot"
    );
}

/// A state holding one running service, `acme/echo` at version 1, deployed by seq 1.
fn with_service() -> State {
    let deployed = Event {
        seq: 1,
        timestamp_ms: 1_700_000_000_000,
        tenant: "acme".into(),
        service_id: "echo".into(),
        actor: "tenant:acme".into(),
        kind: Some(Kind::ServiceDeployed(ServiceDeployed {
            module_sha256: "00".repeat(32),
            version: 1,
            limits: Some(Limits {
                memory_bytes: 64 << 20,
                ..Limits::default()
            }),
            idempotency_key: "k1".into(),
            module_size: 8,
            ..ServiceDeployed::default()
        })),
    };
    let mut state = State::new(Settings::default());
    state.apply(&deployed).expect("a first deploy applies");
    state
}

/// [`with_service`] killed at seq 2 and redeployed at seq 3 as version 2, smaller, while
/// version 1 still stops: a state that owes version 1 its stop.
fn with_replaced_version() -> State {
    let mut state = with_service();
    let event = |seq: u64, kind: Kind| Event {
        seq,
        timestamp_ms: 1_700_000_000_000 + seq,
        tenant: "acme".into(),
        service_id: "echo".into(),
        actor: "tenant:acme".into(),
        kind: Some(kind),
    };
    let kill = event(2, Kind::ServiceKillRequested(ServiceKillRequested::default()));
    state.apply(&kill).expect("a kill of a running service applies");
    let redeploy = event(
        3,
        Kind::ServiceDeployed(ServiceDeployed {
            module_sha256: "11".repeat(32),
            version: 2,
            limits: Some(Limits {
                memory_bytes: 1 << 20,
                ..Limits::default()
            }),
            module_size: 8,
            ..ServiceDeployed::default()
        }),
    );
    state
        .apply(&redeploy)
        .expect("a redeploy of a stopping service applies");
    state
}
