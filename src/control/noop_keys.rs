//! Idempotency keys of requests that changed nothing.
//!
//! A keyed deploy of the module, limits and labels a service already runs, or a keyed kill of
//! a stopped service, appends no event, so the log cannot carry its key. Decided afresh, a
//! retry could then act: the kill's retry would stop the service someone has redeployed since.
//! The writer keeps such keys here for the idempotency window, so a retry gets the first
//! answer, or a conflict if the key comes back with another request. They live in memory
//! only: after the node restarts, a retry of a request that had changed nothing is decided
//! again.

use std::collections::{HashMap, VecDeque};

use super::command::{Command, Reply};
use super::error::{Error, Result};
use crate::proto::IdempotentOp;
use crate::state::{RequestHash, deploy_request_hash, kill_request_hash};

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
                request_hash: deploy_request_hash(&cmd.requested_limits, &cmd.labels),
            }),
            Command::Kill(cmd) if !cmd.idempotency_key.is_empty() => Some(KeyedRequest {
                tenant: cmd.tenant.clone(),
                key: cmd.idempotency_key.clone(),
                op: IdempotentOp::Kill,
                service_id: cmd.service_id.clone(),
                module_hash: [0; 32],
                request_hash: kill_request_hash(cmd.force, cmd.grace_ms),
            }),
            _ => None,
        }
    }
}

pub(super) struct NoOpKeys {
    remembered: HashMap<(String, String), (KeyedRequest, Reply, u64)>,
    /// (time, tenant, key), oldest first, for expiry.
    order: VecDeque<(u64, String, String)>,
    window_ms: u64,
    max_keys: usize,
}

impl NoOpKeys {
    pub fn new(window_ms: u64, max_keys: usize) -> NoOpKeys {
        NoOpKeys {
            remembered: HashMap::new(),
            order: VecDeque::new(),
            window_ms,
            max_keys: max_keys.max(1),
        }
    }

    /// The first answer to this request's key, marked as a replay; a conflict if the key was
    /// used for another request; `None` if the key is not remembered here.
    pub fn answer(&mut self, request: &KeyedRequest, now_ms: u64) -> Option<Result<Reply>> {
        self.expire(now_ms);
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
            Reply::Appended(_) => false,
        };
        if !changed_nothing {
            return;
        }
        if self.order.len() >= self.max_keys
            && let Some((_, tenant, key)) = self.order.pop_front()
        {
            self.remembered.remove(&(tenant, key));
        }
        let id = (request.tenant.clone(), request.key.clone());
        self.order.push_back((now_ms, id.0.clone(), id.1.clone()));
        self.remembered.insert(id, (request, answer.clone(), now_ms));
    }

    fn expire(&mut self, now_ms: u64) {
        while let Some((at_ms, _, _)) = self.order.front()
            && at_ms.saturating_add(self.window_ms) <= now_ms
        {
            let (at_ms, tenant, key) = self.order.pop_front().expect("a front");
            let id = (tenant, key);
            // Only if that entry is the one this expiry was queued for.
            if self.remembered.get(&id).is_some_and(|(_, _, at)| *at == at_ms) {
                self.remembered.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::command::KillOutcome;

    fn kill(key: &str) -> KeyedRequest {
        KeyedRequest {
            tenant: "acme".into(),
            key: key.into(),
            op: IdempotentOp::Kill,
            service_id: "a".into(),
            module_hash: [0; 32],
            request_hash: kill_request_hash(false, 0),
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
}
