//! Model-based property test: random command sequences run against the real control writer
//! and log, and against a tiny in-memory model; their answers and projections must agree.
//! Then: replay from empty equals the live state, and snapshot + tail equals full replay.

mod common;

use std::collections::{BTreeMap, HashMap};

use common::*;
use proptest::prelude::*;
use solo::control::{Control, Error, KillCommand, Observation, RemoveCommand};
use solo::proto::{CrashReason, StopReason};
use solo::state::State;

const TENANTS: [&str; 2] = ["acme", "beta"];
const SERVICES: [&str; 3] = ["a", "b", "c"];
const MAX_SERVICES: u32 = 2;
/// Killed, stopped services a tenant keeps: with one, a service that stops makes the node
/// remove the tenant's other stopped one, necessarily stopped before it (a stopped service
/// takes no event but a redeploy or a removal).
const MAX_STOPPED_SERVICES: u32 = 1;

#[derive(Debug, Clone)]
enum Op {
    Deploy {
        tenant: usize,
        service: usize,
        module: u8,
        key: Option<u8>,
        /// The version the deploy requires (0: that the service not exist).
        expected: Option<u64>,
    },
    Kill {
        tenant: usize,
        service: usize,
        key: Option<u8>,
        /// The version the kill requires.
        expected: Option<u64>,
    },
    Started {
        tenant: usize,
        service: usize,
        stale: bool,
    },
    Crashed {
        tenant: usize,
        service: usize,
        init: bool,
        restarting: bool,
    },
    Restarted {
        tenant: usize,
        service: usize,
        restarts: u32,
    },
    Stopped {
        tenant: usize,
        service: usize,
        killed: bool,
    },
    Remove {
        tenant: usize,
        service: usize,
        key: Option<u8>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let t = 0..TENANTS.len();
    let s = 0..SERVICES.len();
    let key = proptest::option::weighted(0.3, 0u8..3);
    let expected = proptest::option::weighted(0.3, 0u64..4);
    prop_oneof![
        4 => (t.clone(), s.clone(), 0u8..3, key.clone(), expected.clone())
            .prop_map(|(tenant, service, module, key, expected)| Op::Deploy { tenant, service, module, key, expected }),
        2 => (t.clone(), s.clone(), key, expected)
            .prop_map(|(tenant, service, key, expected)| Op::Kill { tenant, service, key, expected }),
        3 => (t.clone(), s.clone(), proptest::bool::weighted(0.2))
            .prop_map(|(tenant, service, stale)| Op::Started { tenant, service, stale }),
        2 => (t.clone(), s.clone(), proptest::bool::weighted(0.2), any::<bool>())
            .prop_map(|(tenant, service, init, restarting)| Op::Crashed { tenant, service, init, restarting }),
        2 => (t.clone(), s.clone(), 1u32..5).prop_map(|(tenant, service, restarts)| Op::Restarted { tenant, service, restarts }),
        2 => (t.clone(), s.clone(), any::<bool>()).prop_map(|(tenant, service, killed)| Op::Stopped { tenant, service, killed }),
        2 => (t, s, proptest::option::weighted(0.3, 0u8..3))
            .prop_map(|(tenant, service, key)| Op::Remove { tenant, service, key }),
    ]
}

/// The model's idea of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ModelService {
    version: u64,
    module: u8,
    running_desired: bool,
    status: &'static str,
    restarts: u32,
}

impl ModelService {
    fn holds_quota(&self) -> bool {
        self.running_desired || self.status == "stopping"
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyUse {
    /// `unchanged`: the deploy changed nothing, and its retries say so.
    Deploy {
        service: usize,
        module: u8,
        expected: Option<u64>,
        version: u64,
        unchanged: bool,
    },
    /// `already_stopped`: the kill changed nothing, and its retries say so.
    Kill {
        service: usize,
        expected: Option<u64>,
        already_stopped: bool,
    },
    Remove {
        service: usize,
    },
}

impl KeyUse {
    fn deploy(service: usize, module: u8, expected: Option<u64>, version: u64, unchanged: bool) -> KeyUse {
        KeyUse::Deploy {
            service,
            module,
            expected,
            version,
            unchanged,
        }
    }
}

/// What a command answered, reduced to what the model can predict.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Deployed {
        version: u64,
        created: bool,
        unchanged: bool,
        replayed: bool,
    },
    Killed {
        already_stopped: bool,
        replayed: bool,
    },
    Removed {
        replayed: bool,
    },
    NotStopped,
    Observed,
    NotFound,
    Quota,
    Conflict,
    VersionMismatch,
    Stale,
}

#[derive(Debug, Default)]
struct Model {
    services: BTreeMap<(usize, usize), ModelService>,
    keys: HashMap<(usize, u8), KeyUse>,
}

impl Model {
    /// The tenant's services that hold quota: not killed, or killed and still stopping.
    fn holding_quota(&self, tenant: usize) -> u32 {
        self.services
            .iter()
            .filter(|((t, _), s)| *t == tenant && s.holds_quota())
            .count() as u32
    }

    /// What a keyed request's retries will be answered from.
    fn remember(&mut self, tenant: usize, key: Option<u8>, used: KeyUse) {
        if let Some(k) = key {
            self.keys.insert((tenant, k), used);
        }
    }

    fn apply(&mut self, op: &Op) -> Answer {
        match *op {
            Op::Deploy {
                tenant,
                service,
                module,
                key,
                expected,
            } => {
                if let Some(k) = key
                    && let Some(used) = self.keys.get(&(tenant, k))
                {
                    return match *used {
                        KeyUse::Deploy {
                            service: s,
                            module: m,
                            expected: e,
                            version,
                            unchanged,
                        } if s == service && m == module && e == expected => Answer::Deployed {
                            version,
                            created: version == 1 && !unchanged,
                            unchanged,
                            replayed: true,
                        },
                        _ => Answer::Conflict,
                    };
                }
                let existing = self.services.get(&(tenant, service)).cloned();
                if expected.is_some_and(|e| existing.as_ref().map_or(0, |s| s.version) != e) {
                    return Answer::VersionMismatch;
                }
                if let Some(s) = &existing
                    && s.module == module
                    && s.running_desired
                    && matches!(s.status, "starting" | "running")
                {
                    self.remember(tenant, key, KeyUse::deploy(service, module, expected, s.version, true));
                    return Answer::Deployed {
                        version: s.version,
                        created: false,
                        unchanged: true,
                        replayed: false,
                    };
                }
                let holds_slot = existing.as_ref().is_some_and(ModelService::holds_quota);
                if !holds_slot && self.holding_quota(tenant) >= MAX_SERVICES {
                    return Answer::Quota;
                }
                let version = existing.map_or(1, |s| s.version + 1);
                self.services.insert(
                    (tenant, service),
                    ModelService {
                        version,
                        module,
                        running_desired: true,
                        status: "starting",
                        restarts: 0,
                    },
                );
                self.remember(tenant, key, KeyUse::deploy(service, module, expected, version, false));
                Answer::Deployed {
                    version,
                    created: version == 1,
                    unchanged: false,
                    replayed: false,
                }
            }
            Op::Kill {
                tenant,
                service,
                key,
                expected,
            } => {
                if let Some(k) = key
                    && let Some(used) = self.keys.get(&(tenant, k))
                {
                    return match *used {
                        KeyUse::Kill {
                            service: s,
                            expected: e,
                            already_stopped,
                        } if s == service && e == expected => Answer::Killed {
                            already_stopped,
                            replayed: true,
                        },
                        _ => Answer::Conflict,
                    };
                }
                let Some(s) = self.services.get_mut(&(tenant, service)) else {
                    return Answer::NotFound;
                };
                if expected.is_some_and(|e| e != s.version) {
                    return Answer::VersionMismatch;
                }
                let already_stopped = !s.running_desired;
                if !already_stopped {
                    s.running_desired = false;
                    s.status = "stopping";
                }
                self.remember(
                    tenant,
                    key,
                    KeyUse::Kill {
                        service,
                        expected,
                        already_stopped,
                    },
                );
                Answer::Killed {
                    already_stopped,
                    replayed: false,
                }
            }
            Op::Started { tenant, service, stale } => self.observe(tenant, service, stale, |s| {
                (s.status == "starting").then(|| s.status = "running")
            }),
            Op::Crashed {
                tenant,
                service,
                init,
                restarting,
            } => self.observe(tenant, service, false, |s| {
                let down_with_the_node = s.status == "stopped" && s.running_desired;
                (matches!(s.status, "starting" | "running") || down_with_the_node).then(|| {
                    s.status = if init {
                        "failed"
                    } else if restarting {
                        "starting"
                    } else {
                        "crashed"
                    }
                })
            }),
            Op::Restarted {
                tenant,
                service,
                restarts,
            } => self.observe(tenant, service, false, |s| {
                (s.status == "starting").then(|| {
                    s.status = "running";
                    s.restarts = restarts;
                })
            }),
            Op::Stopped {
                tenant,
                service,
                killed,
            } => {
                let answer = self.observe(tenant, service, false, |s| {
                    let up = matches!(s.status, "starting" | "running" | "stopping");
                    (up && (!killed || !s.running_desired)).then(|| s.status = "stopped")
                });
                let removable = |s: &ModelService| !s.running_desired && s.status == "stopped";
                if answer == Answer::Observed && self.services.get(&(tenant, service)).is_some_and(removable) {
                    self.services
                        .retain(|&(t, s), held| t != tenant || s == service || !removable(held));
                }
                answer
            }
            Op::Remove { tenant, service, key } => {
                if let Some(k) = key
                    && let Some(used) = self.keys.get(&(tenant, k))
                {
                    return match *used {
                        KeyUse::Remove { service: s } if s == service => Answer::Removed { replayed: true },
                        _ => Answer::Conflict,
                    };
                }
                let Some(s) = self.services.get(&(tenant, service)) else {
                    return Answer::NotFound;
                };
                if s.running_desired || s.status != "stopped" {
                    return Answer::NotStopped;
                }
                self.services.remove(&(tenant, service));
                self.remember(tenant, key, KeyUse::Remove { service });
                Answer::Removed { replayed: false }
            }
        }
    }

    fn observe(
        &mut self,
        tenant: usize,
        service: usize,
        stale: bool,
        change: impl FnOnce(&mut ModelService) -> Option<()>,
    ) -> Answer {
        match self.services.get_mut(&(tenant, service)) {
            Some(s) if !stale => change(s).map_or(Answer::Stale, |()| Answer::Observed),
            _ => Answer::Stale,
        }
    }
}

/// The version an observation names: the current one, or an older one when `stale`.
fn observed_version(control: &Control, tenant: &str, service: &str, stale: bool) -> u64 {
    let current = control.status(tenant, service).map_or(1, |s| s.version);
    if stale { current + 7 } else { current }
}

async fn run_on_solo(control: &Control, op: &Op) -> Answer {
    let key = |k: Option<u8>| k.map(|k| format!("key-{k}")).unwrap_or_default();
    let result = match op.clone() {
        Op::Deploy {
            tenant,
            service,
            module,
            key: k,
            expected,
        } => {
            let mut request = deploy_request(TENANTS[tenant], SERVICES[service], &module.to_string());
            request.idempotency_key = key(k);
            request.expected_version = expected;
            control.deploy(request).await.map(|o| Answer::Deployed {
                version: o.version,
                created: o.created,
                unchanged: o.unchanged,
                replayed: o.replayed,
            })
        }
        Op::Kill {
            tenant,
            service,
            key: k,
            expected,
        } => {
            let command = KillCommand {
                idempotency_key: key(k),
                expected_version: expected,
                ..kill_command(TENANTS[tenant], SERVICES[service])
            };
            control.kill(command).await.map(|o| Answer::Killed {
                already_stopped: o.already_stopped,
                replayed: o.replayed,
            })
        }
        Op::Started { tenant, service, stale } => {
            let (tenant, service_id) = (TENANTS[tenant].to_string(), SERVICES[service].to_string());
            let version = observed_version(control, &tenant, &service_id, stale);
            control
                .observe(Observation::Started {
                    tenant,
                    service_id,
                    version,
                    recovered: false,
                })
                .await
                .map(|_| Answer::Observed)
        }
        Op::Crashed {
            tenant,
            service,
            init,
            restarting,
        } => {
            let (tenant, service_id) = (TENANTS[tenant].to_string(), SERVICES[service].to_string());
            let version = observed_version(control, &tenant, &service_id, false);
            let reason = if init {
                CrashReason::InitFailure
            } else {
                CrashReason::Trap
            };
            let crashed = Observation::Crashed {
                tenant,
                service_id,
                version,
                reason,
                trap_code: "unreachable".into(),
                message: "boom".into(),
                restarting,
            };
            control.observe(crashed).await.map(|_| Answer::Observed)
        }
        Op::Restarted {
            tenant,
            service,
            restarts,
        } => {
            let (tenant, service_id) = (TENANTS[tenant].to_string(), SERVICES[service].to_string());
            let version = observed_version(control, &tenant, &service_id, false);
            control
                .observe(Observation::Restarted {
                    tenant,
                    service_id,
                    version,
                    restarts,
                })
                .await
                .map(|_| Answer::Observed)
        }
        Op::Stopped {
            tenant,
            service,
            killed,
        } => {
            let (tenant, service_id) = (TENANTS[tenant].to_string(), SERVICES[service].to_string());
            let version = observed_version(control, &tenant, &service_id, false);
            let reason = if killed {
                StopReason::Killed
            } else {
                StopReason::NodeShutdown
            };
            control
                .observe(Observation::Stopped {
                    tenant,
                    service_id,
                    version,
                    reason,
                    how: Default::default(),
                })
                .await
                .map(|_| Answer::Observed)
        }
        Op::Remove {
            tenant,
            service,
            key: k,
        } => {
            let command = RemoveCommand {
                tenant: TENANTS[tenant].to_string(),
                actor: format!("tenant:{}", TENANTS[tenant]),
                service_id: SERVICES[service].to_string(),
                idempotency_key: key(k),
                expected_version: None,
            };
            control
                .remove(command)
                .await
                .map(|o| Answer::Removed { replayed: o.replayed })
        }
    };
    match result {
        Ok(answer) => answer,
        Err(Error::NotFound { .. }) => Answer::NotFound,
        Err(Error::QuotaExceeded { .. }) => Answer::Quota,
        Err(Error::IdempotencyConflict { .. }) => Answer::Conflict,
        Err(Error::VersionMismatch { .. }) => Answer::VersionMismatch,
        Err(Error::NotStopped { .. }) => Answer::NotStopped,
        Err(Error::Stale(_)) => Answer::Stale,
        Err(other) => panic!("unexpected error for {op:?}: {other}"),
    }
}

/// The projection, reduced to what the model tracks.
fn projection(control: &Control) -> BTreeMap<(usize, usize), ModelService> {
    control
        .list(None)
        .services
        .into_iter()
        .map(|s| {
            let tenant = TENANTS.iter().position(|t| *t == s.tenant).unwrap();
            let service = SERVICES.iter().position(|id| *id == s.id).unwrap();
            let module =
                (0u8..3).find(|m| solo::control::Module::new(module(&m.to_string())).sha256_hex() == s.module_sha256);
            let model = ModelService {
                version: s.version,
                module: module.expect("a known module"),
                running_desired: s.is_active(),
                status: s.status.as_str(),
                restarts: s.restarts,
            };
            ((tenant, service), model)
        })
        .collect()
}

fn check(ops: Vec<Op>, snapshot_every: u64) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut options = options(dir.path());
    options.limits.node.max_services = MAX_SERVICES;
    options.limits.node.max_stopped_services = MAX_STOPPED_SERVICES;
    options.writer.snapshot_every = snapshot_every;
    let settings = options.settings;
    runtime.block_on(async {
        let control = open(options);
        let mut model = Model::default();
        for op in &ops {
            let expected = model.apply(op);
            let actual = run_on_solo(&control, op).await;
            prop_assert_eq!(&actual, &expected, "answers differ at {:?}", op);
        }
        prop_assert_eq!(projection(&control), model.services.clone());

        // Replay from empty equals the live state.
        let live = control.read_state(Clone::clone);
        let head = control.head();
        let mut replayed = State::new(settings);
        let skipped = solo::control::replay(control.log().store(), &mut replayed, 1, control.head()).unwrap();
        prop_assert_eq!(skipped, 0);
        prop_assert_eq!(&replayed, &live);
        control.close().await;
        drop(control);

        // Snapshot + tail (what a restart does) equals the full replay.
        let mut reopen_options = common::options(dir.path());
        reopen_options.limits.node.max_services = MAX_SERVICES;
        reopen_options.limits.node.max_stopped_services = MAX_STOPPED_SERVICES;
        let (control, recovery) = Control::open(reopen_options).unwrap();
        if snapshot_every > 0 && head >= snapshot_every {
            prop_assert!(recovery.snapshot_seq.is_some(), "a snapshot was used: {:?}", recovery);
        }
        prop_assert_eq!(&control.read_state(Clone::clone), &live);
        Ok(())
    })
}

/// The node's own removal, made sure of rather than left to chance: a tenant's second stopped
/// service takes the first out of the registry, in the log, a replay and a snapshot alike.
#[test]
fn a_second_stopped_service_removes_the_first() {
    let (tenant, killed) = (0, true);
    let mut ops = Vec::new();
    for service in [1, 0] {
        let (key, expected) = (None, None);
        ops.push(Op::Deploy {
            tenant,
            service,
            module: 0,
            key,
            expected,
        });
        ops.push(Op::Kill {
            tenant,
            service,
            key,
            expected,
        });
        ops.push(Op::Stopped {
            tenant,
            service,
            killed,
        });
    }
    ops.push(Op::Deploy {
        tenant,
        service: 1,
        module: 0,
        key: None,
        expected: Some(0),
    });
    for snapshot_every in [0, 1, 4] {
        check(ops.clone(), snapshot_every).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn control_agrees_with_the_model(ops in proptest::collection::vec(op(), 1..60), snapshot_every in prop_oneof![Just(0u64), 1u64..12]) {
        check(ops, snapshot_every)?;
    }
}
