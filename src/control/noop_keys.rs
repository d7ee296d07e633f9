//! Idempotency keys of requests that changed nothing.
//!
//! A keyed deploy of the module, limits and labels a service already runs, or a keyed kill of
//! a stopped service, appends no event, so the log cannot carry its key. Decided afresh, a
//! retry could then act: the kill's retry would stop the service someone has redeployed since.
//! The writer keeps such keys here for the idempotency window, so a retry gets the first
//! answer, or a conflict if the key comes back with another request. Each is also written to
//! the log's `requests` database, in the commit that answers the request, and read back when
//! the node starts: a retry after a restart gets the first answer too.
//!
//! The keys held are bounded in number, and when the bound is reached the tenant that holds
//! the most gives up its oldest. So a tenant sending many keyed no-ops forgets its own keys
//! first: a tenant that holds no more keys than it does keeps every key for the whole window.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use prost::Message;

use super::command::{Command, DeployOutcome, KillOutcome, Reply};
use super::error::{Error, Result};
use crate::proto::{IdempotentOp, NoOpRequest};
use crate::state::{RequestHash, deploy_request_hash, kill_request_hash, remove_request_hash};

/// What a keyed request asked for: a retry must ask for the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KeyedRequest {
    tenant: String,
    key: String,
    op: IdempotentOp,
    service_id: String,
    module_hash: [u8; 32],
    request_hash: RequestHash,
}

impl KeyedRequest {
    /// The request a keyed deploy or kill makes; `None` without a key.
    pub fn of(command: &Command) -> Option<KeyedRequest> {
        match command {
            Command::Deploy(cmd) if !cmd.idempotency_key.is_empty() => Some(KeyedRequest {
                tenant: cmd.tenant.clone(),
                key: cmd.idempotency_key.clone(),
                op: IdempotentOp::Deploy,
                service_id: cmd.service_id.clone(),
                module_hash: cmd.module.sha256,
                request_hash: deploy_request_hash(&cmd.requested_limits, &cmd.labels, cmd.expected_version),
            }),
            Command::Kill(cmd) if !cmd.idempotency_key.is_empty() => Some(KeyedRequest {
                tenant: cmd.tenant.clone(),
                key: cmd.idempotency_key.clone(),
                op: IdempotentOp::Kill,
                service_id: cmd.service_id.clone(),
                module_hash: [0; 32],
                request_hash: kill_request_hash(cmd.force, cmd.requested_grace_ms, cmd.expected_version),
            }),
            // Never a no-op itself, but its key may be one a no-op took.
            Command::Remove(cmd) if !cmd.idempotency_key.is_empty() => Some(KeyedRequest {
                tenant: cmd.tenant.clone(),
                key: cmd.idempotency_key.clone(),
                op: IdempotentOp::Remove,
                service_id: cmd.service_id.clone(),
                module_hash: [0; 32],
                request_hash: remove_request_hash(cmd.expected_version),
            }),
            _ => None,
        }
    }
}

pub(super) struct NoOpKeys {
    /// By (tenant, key): the request, its answer, and when it was made.
    remembered: HashMap<(String, String), (KeyedRequest, Reply, u64)>,
    /// Each tenant's keys with the time they were remembered, oldest first. An entry whose
    /// key has since been remembered again, or forgotten, is stale: skipped when it comes out.
    queues: HashMap<String, VecDeque<(u64, String)>>,
    /// (entries queued, tenant) for each tenant with a queue, to find the largest.
    sizes: BTreeSet<(usize, String)>,
    /// Entries in all queues, stale ones included: what the bound counts.
    queued: usize,
    window_ms: u64,
    max_keys: usize,
    /// Keys remembered or forgotten since the last commit that stored the changes.
    unstored: HashSet<(String, String)>,
    /// Stored entries that [`NoOpKeys::restore`] did not take back (past their window, or
    /// unreadable), by their stored key: deleted with the next commit.
    stale: Vec<Vec<u8>>,
}

/// What the `requests` database must take to match the keys held: entries to put (stored key,
/// encoded [`NoOpRequest`]) and stored keys to delete.
#[derive(Debug, Default)]
pub(super) struct StoredChanges {
    pub put: Vec<(Vec<u8>, Vec<u8>)>,
    pub delete: Vec<Vec<u8>>,
}

impl NoOpKeys {
    pub fn new(window_ms: u64, max_keys: usize) -> NoOpKeys {
        NoOpKeys {
            remembered: HashMap::new(),
            queues: HashMap::new(),
            sizes: BTreeSet::new(),
            queued: 0,
            window_ms,
            max_keys: max_keys.max(1),
            unstored: HashSet::new(),
            stale: Vec::new(),
        }
    }

    /// Takes back the keys stored by earlier runs of the node, as [`Store::requests`] reads
    /// them, dropping those whose window is over at `now_ms` (and any that cannot be read).
    ///
    /// [`Store::requests`]: crate::log::Store::requests
    pub fn restore(&mut self, stored: Vec<crate::log::StoredRequest>, now_ms: u64) {
        let mut kept = Vec::new();
        for (stored_key, value) in stored {
            match read_stored(&stored_key, value) {
                Ok((request, answer, at_ms)) if at_ms.saturating_add(self.window_ms) > now_ms => {
                    kept.push((request, answer, at_ms));
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "a remembered keyed request cannot be read; it is forgotten"),
            }
            self.stale.push(stored_key);
        }
        kept.sort_by_key(|(_, _, at_ms)| *at_ms);
        for (request, answer, at_ms) in kept {
            let id = (request.tenant.clone(), request.key.clone());
            self.remember(request, &answer, at_ms);
            self.unstored.remove(&id);
        }
    }

    /// The changes to store with the next commit.
    pub fn unstored_changes(&self) -> StoredChanges {
        let mut changes = StoredChanges {
            put: Vec::new(),
            delete: self.stale.clone(),
        };
        for id in &self.unstored {
            let stored_key = stored_key(&id.0, &id.1);
            match self.remembered.get(id) {
                Some((request, answer, at_ms)) => changes.put.push((stored_key, encoded(request, answer, *at_ms))),
                None => changes.delete.push(stored_key),
            }
        }
        changes
    }

    /// The changes last taken are durable.
    pub fn stored(&mut self) {
        self.unstored.clear();
        self.stale.clear();
    }

    /// The commit that was to store the changes failed, so the answers remembered since the
    /// last one that succeeded were never given (their callers got the error): forgets them. A
    /// key stored before stays marked, and is deleted from the store with the next commit.
    pub fn forget_unstored_answers(&mut self) {
        for id in &self.unstored {
            // Its queue entry is stale from now on, and skipped when it comes out.
            self.remembered.remove(id);
        }
    }

    /// The first answer to this request's key, marked as a replay; a conflict if the key was
    /// used for another request; `None` if the key is not remembered here.
    pub fn answer(&mut self, request: &KeyedRequest, now_ms: u64) -> Option<Result<Reply>> {
        self.expire(&request.tenant, now_ms);
        let (first, answer, _) = self.remembered.get(&(request.tenant.clone(), request.key.clone()))?;
        if first != request {
            return Some(Err(Error::IdempotencyConflict {
                key: request.key.clone(),
            }));
        }
        Some(Ok(match answer.clone() {
            Reply::Deployed(mut outcome) => {
                outcome.replayed = true;
                Reply::Deployed(outcome)
            }
            Reply::Killed(mut outcome) => {
                outcome.replayed = true;
                Reply::Killed(outcome)
            }
            other => other,
        }))
    }

    /// Remembers `answer` if it changed nothing (an unchanged deploy, a kill of a stopped
    /// service); an answer that rests on an event is remembered by the log.
    pub fn remember(&mut self, request: KeyedRequest, answer: &Reply, now_ms: u64) {
        let changed_nothing = match answer {
            Reply::Deployed(outcome) => outcome.unchanged && !outcome.replayed,
            Reply::Killed(outcome) => outcome.already_stopped && !outcome.replayed,
            // A remove always appends its event (or is refused).
            Reply::Removed(_) | Reply::Appended(_) | Reply::ShuttingDown(_) => false,
        };
        if !changed_nothing {
            return;
        }
        self.expire(&request.tenant, now_ms);
        while self.queued >= self.max_keys {
            let Some((_, largest)) = self.sizes.last().cloned() else {
                break;
            };
            self.pop_oldest(&largest);
        }
        let tenant = request.tenant.clone();
        let size = self.queues.get(&tenant).map_or(0, VecDeque::len);
        self.sizes.remove(&(size, tenant.clone()));
        self.sizes.insert((size + 1, tenant.clone()));
        self.queues
            .entry(tenant.clone())
            .or_default()
            .push_back((now_ms, request.key.clone()));
        self.queued += 1;
        let id = (tenant, request.key.clone());
        self.unstored.insert(id.clone());
        self.remembered.insert(id, (request, answer.clone(), now_ms));
    }

    /// Forgets `tenant`'s keys whose window is over.
    fn expire(&mut self, tenant: &str, now_ms: u64) {
        while let Some((at_ms, _)) = self.queues.get(tenant).and_then(VecDeque::front)
            && at_ms.saturating_add(self.window_ms) <= now_ms
        {
            self.pop_oldest(tenant);
        }
    }

    /// Takes `tenant`'s oldest queue entry out, and forgets its key unless the key has been
    /// remembered again since.
    fn pop_oldest(&mut self, tenant: &str) {
        let Some(queue) = self.queues.get_mut(tenant) else {
            return;
        };
        let Some((at_ms, key)) = queue.pop_front() else { return };
        let left = queue.len();
        self.sizes.remove(&(left + 1, tenant.to_string()));
        if left == 0 {
            self.queues.remove(tenant);
        } else {
            self.sizes.insert((left, tenant.to_string()));
        }
        self.queued -= 1;
        let id = (tenant.to_string(), key);
        if self.remembered.get(&id).is_some_and(|(_, _, at)| *at == at_ms) {
            self.remembered.remove(&id);
            self.unstored.insert(id);
        }
    }
}

/// Where a key is stored: the tenant, a zero byte (which no tenant name holds), the key.
fn stored_key(tenant: &str, key: &str) -> Vec<u8> {
    let mut stored = Vec::with_capacity(tenant.len() + 1 + key.len());
    stored.extend_from_slice(tenant.as_bytes());
    stored.push(0);
    stored.extend_from_slice(key.as_bytes());
    stored
}

fn encoded(request: &KeyedRequest, answer: &Reply, at_ms: u64) -> Vec<u8> {
    let mut record = NoOpRequest {
        tenant: request.tenant.clone(),
        key: request.key.clone(),
        op: request.op as i32,
        service_id: request.service_id.clone(),
        module_hash: if request.op == IdempotentOp::Deploy {
            request.module_hash.to_vec()
        } else {
            Vec::new()
        },
        request_hash: request.request_hash.to_vec(),
        at_ms,
        ..Default::default()
    };
    match answer {
        Reply::Deployed(outcome) => {
            record.seq = outcome.seq;
            record.version = outcome.version;
            record.module_sha256 = outcome.module_sha256.clone();
            record.created = outcome.created;
        }
        Reply::Killed(outcome) => record.seq = outcome.seq,
        Reply::Removed(_) | Reply::Appended(_) | Reply::ShuttingDown(_) => {
            unreachable!("only no-op answers are remembered")
        }
    }
    record.encode_to_vec()
}

/// An entry of the `requests` database read back: the request, its answer and when it was
/// answered; or why it cannot be.
fn read_stored(stored_key: &[u8], value: Result<Vec<u8>, String>) -> Result<(KeyedRequest, Reply, u64), String> {
    let record = NoOpRequest::decode(value?.as_slice()).map_err(|e| format!("it does not decode: {e}"))?;
    if stored_key != self::stored_key(&record.tenant, &record.key) {
        return Err(format!(
            "it is stored under another key than tenant '{}' and key '{}'",
            record.tenant, record.key
        ));
    }
    decoded(record).ok_or_else(|| "its operation or digests are not valid".to_string())
}

/// Checks an entry of the `requests` database as the node reads it back when it starts;
/// `Ok` with the seq of the event its answer rested on.
pub fn check_stored((stored_key, value): crate::log::StoredRequest) -> Result<u64, String> {
    read_stored(&stored_key, value).map(|(_, answer, _)| match answer {
        Reply::Deployed(outcome) => outcome.seq,
        Reply::Killed(outcome) => outcome.seq,
        Reply::Removed(_) | Reply::Appended(_) | Reply::ShuttingDown(_) => {
            unreachable!("only no-op answers are stored")
        }
    })
}

/// A stored request back as it was remembered; `None` if it is not one this build writes.
fn decoded(record: NoOpRequest) -> Option<(KeyedRequest, Reply, u64)> {
    let op = IdempotentOp::try_from(record.op).ok()?;
    let request_hash = record.request_hash.as_slice().try_into().ok()?;
    let (module_hash, answer) = match op {
        IdempotentOp::Deploy => (
            record.module_hash.as_slice().try_into().ok()?,
            Reply::Deployed(DeployOutcome {
                service_id: record.service_id.clone(),
                version: record.version,
                module_sha256: record.module_sha256,
                seq: record.seq,
                created: record.created,
                unchanged: true,
                replayed: false,
                at_ms: record.at_ms,
            }),
        ),
        IdempotentOp::Kill => (
            [0; 32],
            Reply::Killed(KillOutcome {
                seq: record.seq,
                already_stopped: true,
                replayed: false,
            }),
        ),
        // Removes are never no-ops, so never stored here.
        IdempotentOp::Remove | IdempotentOp::Unspecified => return None,
    };
    let request = KeyedRequest {
        tenant: record.tenant,
        key: record.key,
        op,
        service_id: record.service_id,
        module_hash,
        request_hash,
    };
    Some((request, answer, record.at_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::command::KillOutcome;

    fn kill(key: &str) -> KeyedRequest {
        kill_by("acme", key)
    }

    fn kill_by(tenant: &str, key: &str) -> KeyedRequest {
        KeyedRequest {
            tenant: tenant.into(),
            key: key.into(),
            op: IdempotentOp::Kill,
            service_id: "a".into(),
            module_hash: [0; 32],
            request_hash: kill_request_hash(false, 0, None),
        }
    }

    fn stopped(seq: u64) -> Reply {
        Reply::Killed(KillOutcome {
            seq,
            already_stopped: true,
            replayed: false,
        })
    }

    #[test]
    fn keys_are_kept_for_the_window_and_at_most_max_keys() {
        let mut keys = NoOpKeys::new(1000, 2);
        keys.remember(kill("k1"), &stopped(7), 0);
        assert!(matches!(
            keys.answer(&kill("k1"), 999),
            Some(Ok(Reply::Killed(KillOutcome {
                seq: 7,
                replayed: true,
                ..
            })))
        ));
        assert!(keys.answer(&kill("k1"), 1000).is_none(), "the window is over");

        for (i, key) in ["k2", "k3", "k4"].into_iter().enumerate() {
            keys.remember(kill(key), &stopped(i as u64), 2000);
        }
        assert!(keys.answer(&kill("k2"), 2001).is_none(), "the oldest went first");
        assert!(keys.answer(&kill("k4"), 2001).is_some());
    }

    /// A commit that fails answers its callers with the error: the no-op answers it was to
    /// store are forgotten (their retries are decided afresh), those stored before are kept,
    /// and the next commit deletes what the store may hold of the forgotten ones.
    #[test]
    fn answers_whose_commit_failed_are_forgotten() {
        let mut keys = NoOpKeys::new(1000, 10);
        keys.remember(kill("stored"), &stopped(1), 0);
        keys.stored();
        keys.remember(kill("failed"), &stopped(2), 10);
        keys.forget_unstored_answers();
        assert!(keys.answer(&kill("failed"), 11).is_none(), "never answered");
        assert!(keys.answer(&kill("stored"), 11).is_some());
        let changes = keys.unstored_changes();
        assert!(changes.put.is_empty(), "{changes:?}");
        assert_eq!(changes.delete, [stored_key("acme", "failed")]);
        // Remembered afresh by its retry, it is stored as usual.
        keys.remember(kill("failed"), &stopped(3), 12);
        assert_eq!(keys.unstored_changes().put.len(), 1);
        keys.stored();
        assert!(matches!(
            keys.answer(&kill("failed"), 13),
            Some(Ok(Reply::Killed(KillOutcome { seq: 3, .. })))
        ));
    }

    #[test]
    fn only_answers_that_changed_nothing_are_kept() {
        let mut keys = NoOpKeys::new(1000, 10);
        let acted = Reply::Killed(KillOutcome {
            seq: 3,
            already_stopped: false,
            replayed: false,
        });
        keys.remember(kill("k1"), &acted, 0);
        assert!(keys.answer(&kill("k1"), 1).is_none(), "the log remembers that one");
    }

    #[test]
    fn a_tenant_that_sends_many_keys_forgets_its_own_not_anothers() {
        let mut keys = NoOpKeys::new(1_000_000, 4);
        keys.remember(kill_by("beta", "b1"), &stopped(1), 0);
        for i in 0..100 {
            keys.remember(kill(&format!("a{i}")), &stopped(2), i);
        }
        assert!(keys.answer(&kill_by("beta", "b1"), 200).is_some(), "beta's key is kept");
        assert!(keys.answer(&kill("a99"), 200).is_some());
        assert!(keys.answer(&kill("a96"), 200).is_none(), "acme's oldest went");
        assert_eq!(keys.queued, 4);
        // Beta, holding fewer, may still add: acme, holding the most, gives up another.
        keys.remember(kill_by("beta", "b2"), &stopped(3), 300);
        assert!(keys.answer(&kill_by("beta", "b1"), 301).is_some());
        assert!(keys.answer(&kill_by("beta", "b2"), 301).is_some());
        assert!(keys.answer(&kill("a97"), 301).is_none());
        assert_eq!(keys.queued, 4);
    }

    #[test]
    fn stored_keys_come_back_and_those_past_their_window_or_damaged_leave_the_store() {
        let mut keys = NoOpKeys::new(1000, 10);
        keys.remember(kill("k1"), &stopped(7), 0);
        keys.remember(kill("k2"), &stopped(8), 500);
        let changes = keys.unstored_changes();
        assert_eq!((changes.put.len(), changes.delete.len()), (2, 0));
        keys.stored();
        assert!(keys.unstored_changes().put.is_empty(), "stored once");

        // As the database gives them back after a restart past k1's window, with a damaged
        // one, and k2's record copied under a key that is not its own.
        let mut stored: Vec<_> = changes.put.into_iter().map(|(k, v)| (k, Ok(v))).collect();
        stored.push((stored_key("acme", "k3"), Err("damaged".to_string())));
        let k2 = stored
            .iter()
            .find(|(k, _)| *k == stored_key("acme", "k2"))
            .unwrap()
            .1
            .clone();
        stored.push((stored_key("acme", "k4"), k2));
        let mut restarted = NoOpKeys::new(1000, 10);
        restarted.restore(stored, 1200);
        assert!(restarted.answer(&kill("k1"), 1200).is_none(), "its window is over");
        assert!(matches!(
            restarted.answer(&kill("k2"), 1200),
            Some(Ok(Reply::Killed(KillOutcome {
                seq: 8,
                already_stopped: true,
                replayed: true
            })))
        ));
        let mut changes = restarted.unstored_changes();
        changes.delete.sort();
        assert!(changes.put.is_empty(), "k2 is stored already");
        assert_eq!(
            changes.delete,
            [
                stored_key("acme", "k1"),
                stored_key("acme", "k3"),
                stored_key("acme", "k4")
            ]
        );
        assert!(restarted.answer(&kill("k4"), 1200).is_none());
    }

    #[test]
    fn a_key_remembered_again_is_kept_from_its_second_time() {
        let mut keys = NoOpKeys::new(1000, 10);
        keys.remember(kill("k1"), &stopped(1), 0);
        keys.remember(kill("k1"), &stopped(2), 500);
        // The first entry's expiry is stale: it does not take the second with it.
        assert!(matches!(
            keys.answer(&kill("k1"), 1200),
            Some(Ok(Reply::Killed(KillOutcome { seq: 2, .. })))
        ));
        assert!(keys.answer(&kill("k1"), 1500).is_none());
        assert!(keys.queues.is_empty() && keys.sizes.is_empty() && keys.queued == 0);
        assert!(keys.remembered.is_empty());
    }
}
