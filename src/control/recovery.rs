//! Rebuilding the state at open: the newest valid snapshot, then the events after it.

use std::time::{Duration, Instant};

use prost::Message as _;

use super::EventLog;
use crate::log::{self, Store, frame};
use crate::proto::Event;
use crate::state::{Settings, State};

/// Events decoded per read transaction during replay.
const REPLAY_CHUNK: u64 = 8192;

/// Decoded chunks the decoding thread may hold ready for the applying one.
const DECODED_CHUNKS_AHEAD: usize = 4;

/// What recovery did, for the startup log line and `NodeStarted`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The snapshot replay started from, if a valid one was found.
    pub snapshot_seq: Option<u64>,
    /// Events applied after the snapshot.
    pub replayed: u64,
    /// Events that did not apply and were stepped over (each logged).
    pub skipped: u64,
    pub head: u64,
    pub elapsed: Duration,
    /// Modules deleted from the blob store because no service that should run has them.
    pub modules_collected: usize,
}

pub(super) fn recover(log: &EventLog, settings: Settings) -> log::Result<(State, Recovery)> {
    let started = Instant::now();
    let head = log.head();
    let (mut state, snapshot_seq) = match load_snapshot(log.store(), settings, head) {
        Some(state) => {
            let seq = state.applied_seq();
            (state, Some(seq))
        }
        None => (State::new(settings), None),
    };
    let from = state.applied_seq() + 1;
    let skipped = replay(log.store(), &mut state, from, head)?;
    // A state that stepped over events may not know every service that should run: what it
    // finds unused is then kept.
    let modules_collected = if skipped == 0 {
        collect_unused_modules(log, &state)
    } else {
        0
    };
    let recovery = Recovery {
        snapshot_seq,
        replayed: head + 1 - from,
        skipped,
        head,
        elapsed: started.elapsed(),
        modules_collected,
    };
    Ok((state, recovery))
}

/// Deletes the modules that no service that should run has: a data directory written before
/// commits collected them (log-format.md, invariant 6) may hold those of every service ever
/// upgraded or killed. Returns how many went. Failing costs only disk space, so it is logged,
/// not fatal.
fn collect_unused_modules(log: &EventLog, state: &State) -> usize {
    let mut unused = Vec::new();
    let scanned = log.store().scan_blobs(|key, _| {
        // A key that is not a hash is for `solo log verify` to report, not for this to delete.
        if let Ok(sha256) = <[u8; 32]>::try_from(key)
            && state.module_users(&sha256) == 0
        {
            unused.push(sha256);
        }
    });
    let deleted = scanned.and_then(|()| {
        let changes = log::BlobChanges {
            put: &[],
            delete: &unused,
        };
        log.append(&log::Batch::with_capacity(0), changes, log::RequestChanges::default())
    });
    match deleted {
        Ok(_) => unused.len(),
        Err(e) => {
            tracing::warn!(error = %e, "modules no service runs were not deleted");
            0
        }
    }
}

/// The newest snapshot that passes its checks and is not past `head`. A snapshot that fails is
/// skipped with a log line, never trusted.
pub fn load_snapshot(store: &Store, settings: Settings, head: u64) -> Option<State> {
    let seqs = match store.snapshot_seqs() {
        Ok(seqs) => seqs,
        Err(e) => {
            tracing::warn!(error = %e, "snapshots unreadable; replaying the whole log");
            return None;
        }
    };
    for seq in seqs {
        let decoded = store.read_snapshot(seq, |bytes| {
            let bytes = bytes.ok_or("vanished while loading")?;
            let payload = frame::decode(bytes).map_err(|e| e.to_string())?;
            State::decode_snapshot(payload, settings).map_err(|e| e.to_string())
        });
        let loaded = decoded.map_err(|e| e.to_string()).and_then(|decoded| {
            let state = decoded?;
            if state.applied_seq() != seq {
                return Err(format!("it says it was taken after seq {}", state.applied_seq()));
            }
            if seq > head {
                return Err(format!("it is past the log's head {head}"));
            }
            Ok(state)
        });
        match loaded {
            Ok(state) => return Some(state),
            Err(reason) => tracing::warn!(seq, %reason, "skipping snapshot"),
        }
    }
    None
}

/// Applies the events `from..=to` to `state`. A record that fails its checks stops replay
/// with an error; an event that does not apply is logged and stepped over. Returns how many
/// were stepped over.
///
/// Reading and decoding run on a second thread, a few chunks ahead of applying. Applied chunks
/// go back to that thread to be decoded into again, so every allocation of an event is made
/// and freed there, and never on the applying thread. (More decoder threads do not help on
/// two cores: the scheduler's fair share then slows the applying thread.)
pub fn replay(store: &Store, state: &mut State, from: u64, to: u64) -> log::Result<u64> {
    if from > to {
        return Ok(0);
    }
    std::thread::scope(|scope| {
        let (chunks, decoded) = std::sync::mpsc::sync_channel(DECODED_CHUNKS_AHEAD);
        let (applied, spent) = std::sync::mpsc::channel::<Chunk>();
        scope.spawn(move || {
            let mut chunk_start = from;
            while chunk_start <= to {
                let chunk_end = to.min(chunk_start + REPLAY_CHUNK - 1);
                let mut chunk = spent.try_recv().unwrap_or_default();
                let decoded = decode_chunk(store, chunk_start, chunk_end, &mut chunk).map(|()| chunk);
                let failed = decoded.is_err();
                if chunks.send(decoded).is_err() || failed {
                    return;
                }
                chunk_start = chunk_end + 1;
            }
        });
        let mut skipped = 0;
        for chunk in decoded {
            let mut chunk = chunk?;
            for (event, &stored) in chunk.events.iter_mut().zip(&chunk.stored) {
                if let Err(e) = state.apply_taking(event, stored) {
                    tracing::warn!(seq = event.seq, error = %e, "event does not apply; stepping over it");
                    state.skip(event);
                    skipped += 1;
                }
            }
            // Gone only once the decoding thread is done, which then drops the chunk itself.
            let _ = applied.send(chunk);
        }
        Ok(skipped)
    })
}

/// Events read for replay, and the bytes the log stores each in (its frame), which the state
/// counts as the tenant's history and which the decoding thread knows for free.
#[derive(Default)]
struct Chunk {
    events: Vec<Event>,
    stored: Vec<u64>,
}

/// Decodes the events `from..=to`, checked, in one read transaction, into `chunk`: the
/// events it already holds are cleared and merged into, which keeps their strings' buffers.
fn decode_chunk(store: &Store, from: u64, to: u64, chunk: &mut Chunk) -> log::Result<()> {
    let Chunk { events, stored } = chunk;
    stored.clear();
    let mut decoded = 0;
    store.visit_frames(from..=to, |seq, payload| {
        let event = match events.get_mut(decoded) {
            Some(event) => {
                event.clear();
                event
            }
            None => {
                events.push(Event::default());
                events.last_mut().expect("just pushed")
            }
        };
        event.merge(payload).map_err(|e| log::Error::UndecodableRecord {
            seq,
            reason: e.to_string(),
        })?;
        if event.seq != seq {
            return Err(log::Error::UndecodableRecord {
                seq,
                reason: format!("payload says seq {}", event.seq),
            });
        }
        stored.push((log::frame::HEADER_LEN + payload.len()) as u64);
        decoded += 1;
        Ok(())
    })?;
    events.truncate(decoded);
    if (decoded as u64) < to - from + 1 {
        return Err(log::Error::MissingRecord {
            seq: from + decoded as u64,
        });
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::event::envelope;
    use crate::proto::{Limits, ServiceDeployed, ServiceKillRequested, ServiceStarted, event::Kind};

    /// Events of `services` services, each deployed, started and killed in turn, on 7 tenants.
    /// Every other deploy has labels and every third an idempotency key.
    pub(in crate::control) fn history(services: u64, rounds: u64) -> Vec<Event> {
        let mut events = Vec::new();
        for round in 1..=rounds {
            for service in 0..services {
                let id = format!("s{service}");
                let tenant = format!("t{}", service % 7);
                let labels = if round % 2 == 1 {
                    BTreeMap::from([("round".to_string(), round.to_string())])
                } else {
                    BTreeMap::new()
                };
                let idempotency_key = if round % 3 == 0 {
                    format!("deploy-{service}-{round}")
                } else {
                    String::new()
                };
                let deployed = ServiceDeployed {
                    module_sha256: format!("{round:064x}"),
                    version: round,
                    limits: Some(Limits {
                        memory_bytes: 1 << 20,
                        ..Limits::default()
                    }),
                    labels,
                    requested_limits: (!idempotency_key.is_empty()).then(Limits::default),
                    idempotency_key,
                    module_size: 8,
                    expected_version: None,
                };
                let started = ServiceStarted {
                    version: round,
                    recovered: false,
                };
                events.push(envelope(&tenant, &id, "tenant:a", Kind::ServiceDeployed(deployed)));
                events.push(envelope(&tenant, &id, "node", Kind::ServiceStarted(started)));
                let kill = ServiceKillRequested::default();
                events.push(envelope(&tenant, &id, "tenant:a", Kind::ServiceKillRequested(kill)));
            }
        }
        for (seq, event) in (1..).zip(&mut events) {
            event.seq = seq;
            event.timestamp_ms = 1_000_000 + seq;
        }
        events
    }

    fn logged(events: &[Event]) -> (tempfile::TempDir, EventLog, u64) {
        let dir = tempfile::tempdir().expect("a temp dir");
        let log =
            EventLog::open(dir.path(), &crate::config::Config::default().log_options(false)).expect("the log opens");
        let mut head = 0;
        for chunk in events.chunks(4096) {
            let batch: log::Batch<Event> = chunk.iter().cloned().map(Arc::new).collect();
            head = log
                .append(&batch, Default::default(), Default::default())
                .expect("the batch commits");
        }
        (dir, log, head)
    }

    /// Replay decodes into the events of chunks already applied: nothing of what they held may
    /// linger, whatever it was.
    #[test]
    fn decoding_into_used_events_leaves_nothing_of_them() {
        let events = history(100, 4);
        let (_dir, log, _) = logged(&events);
        let mut reused = Chunk::default();
        // Each with the bytes the log stores it in: its frame.
        let stored = |events: &[Event]| -> Vec<u64> {
            events
                .iter()
                .map(|e| (frame::HEADER_LEN + e.encoded_len()) as u64)
                .collect()
        };
        decode_chunk(log.store(), 1, 300, &mut reused).expect("round 1 decodes");
        assert_eq!(reused.events, events[..300]);
        assert_eq!(reused.stored, stored(&events[..300]));
        // Round 2's deploys carry no labels and round 3's carry keys, where round 1's had
        // labels and no keys; a shorter chunk leaves no extra events behind.
        decode_chunk(log.store(), 301, 900, &mut reused).expect("rounds 2 and 3 decode");
        assert_eq!(reused.events, events[300..900]);
        decode_chunk(log.store(), 1101, 1200, &mut reused).expect("round 4 decodes");
        assert_eq!(reused.events, events[1100..1200]);
        assert_eq!(reused.stored, stored(&events[1100..1200]));
        let missing = decode_chunk(log.store(), 1101, 1300, &mut reused);
        assert!(
            matches!(missing, Err(log::Error::MissingRecord { seq: 1201 })),
            "{missing:?}"
        );
    }

    /// Replay reads in chunks on a second thread; across chunk boundaries it must still apply
    /// every event once, in order.
    #[test]
    fn replay_over_many_chunks_equals_applying_the_events() {
        let events = history(1_000, 10);
        assert!(
            events.len() as u64 > 3 * REPLAY_CHUNK,
            "the replay spans several chunks"
        );
        let (_dir, log, head) = logged(&events);
        let mut expected = State::new(Settings::default());
        for event in &events {
            expected.apply(event).expect("the history applies");
        }

        let mut replayed = State::new(Settings::default());
        let skipped = replay(log.store(), &mut replayed, 1, head).expect("replay reads the log");
        assert_eq!(skipped, 0);
        assert_eq!(replayed.applied_seq(), events.len() as u64);
        assert!(replayed == expected, "the replayed state differs from the applied one");
        let last = replayed.service("t1", "s1").expect("a service");
        assert_eq!(last.version, 10);
        assert!(
            last.labels.is_empty(),
            "round 10 deploys carry no labels, whatever round 9's did"
        );
        let earlier = replayed.idempotency("t1", "deploy-1-9", replayed.last_timestamp_ms());
        assert_eq!(earlier.map(|r| r.version), Some(9), "round 9's key is remembered");
    }
}
