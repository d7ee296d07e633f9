//! State to and from its protobuf snapshot (`proto/solo/v1/snapshot.proto`).

use prost::Message as _;

use std::collections::VecDeque;

use super::{
    CompactString, Desired, IdempotencyRecord, Map, RateWindow, Service, Settings, State, Status, count_quota,
    count_stopped,
};
use crate::proto::{self, IdempotentOp, StateSnapshot};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot does not decode: {0}")]
    Decode(String),
    #[error("snapshot is inconsistent: {0}")]
    Inconsistent(String),
    /// Sound, but in a form this build no longer reads; replay rebuilds what it held.
    #[error("snapshot was written by an older build ({0})")]
    Outdated(&'static str),
}

impl State {
    /// The snapshot message of this state.
    pub fn to_snapshot(&self) -> StateSnapshot {
        let mut services: Vec<proto::ServiceRecord> = self.services().map(service_record).collect();
        // Tenants live in a hash map; sort so equal states give equal bytes.
        services.sort_by(|a, b| (&a.tenant, &a.service_id).cmp(&(&b.tenant, &b.service_id)));
        let idempotency = self
            .idempotency_expiry
            .iter()
            .filter_map(|(at, tenant, key)| {
                let record = self.tenants.get(tenant)?.idempotency.get(key)?;
                (record.at_ms == *at).then(|| idempotency_record(tenant, key, record))
            })
            .collect();
        let mut recent_deploys: Vec<proto::TenantDeploys> = self
            .tenants
            .iter()
            .filter(|(_, t)| !t.recent_deploys.is_empty() || !t.recent_history_bytes.is_empty())
            .map(|(name, t)| {
                let (interval_start_ms, interval_deploys) = t
                    .recent_deploys
                    .intervals()
                    .map(|(start, deploys)| (start, u32::try_from(deploys).unwrap_or(u32::MAX)))
                    .unzip();
                let (history_interval_start_ms, history_interval_bytes) = t.recent_history_bytes.intervals().unzip();
                proto::TenantDeploys {
                    tenant: name.to_string(),
                    at_ms: Vec::new(),
                    interval_start_ms,
                    interval_deploys,
                    history_interval_start_ms,
                    history_interval_bytes,
                }
            })
            .collect();
        recent_deploys.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        StateSnapshot {
            seq: self.applied_seq,
            services,
            idempotency,
            recent_deploys,
            last_timestamp_ms: self.last_timestamp_ms,
            format: SNAPSHOT_FORMAT,
        }
    }

    pub fn encode_snapshot(&self, out: &mut Vec<u8>) {
        let snapshot = self.to_snapshot();
        out.reserve(snapshot.encoded_len());
        snapshot.encode(out).expect("a Vec grows as needed");
    }

    /// Rebuilds a state from snapshot bytes. The services and the idempotency keys are decoded
    /// on two threads: a large snapshot is mostly allocation and copying, which halves across
    /// cores.
    pub fn decode_snapshot(bytes: &[u8], settings: Settings) -> Result<State, SnapshotError> {
        let decode = |e: prost::DecodeError| SnapshotError::Decode(e.to_string());
        let (services, idempotency) = std::thread::scope(|scope| {
            let idempotency = scope.spawn(|| {
                let part = IdempotencyPart::decode(bytes).map_err(decode)?;
                idempotency_from_records(part.idempotency)
            });
            let services = ServicesPart::decode(bytes)
                .map_err(decode)
                .and_then(|part| State::from_services(part, settings));
            let idempotency = idempotency
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (services, idempotency)
        });
        let mut state = services?;
        let (keys, expiry) = idempotency?;
        for (tenant, keys) in keys {
            state.tenants.entry(tenant).or_default().idempotency = keys;
        }
        state.idempotency_expiry = expiry;
        Ok(state)
    }

    fn from_services(snapshot: ServicesPart, settings: Settings) -> Result<State, SnapshotError> {
        if snapshot.format < SNAPSHOT_FORMAT {
            // Its services lack what a replay of the same events gives them.
            return Err(SnapshotError::Outdated(
                "it keeps no killed versions replaced while stopping, no load failures, or no \
                 history bytes of tenants",
            ));
        }
        let mut state = State::new(settings);
        state.applied_seq = snapshot.seq;
        state.last_timestamp_ms = snapshot.last_timestamp_ms;
        // Snapshots list services by tenant: size each tenant's map once, from its run.
        let mut runs: Vec<(CompactString, usize)> = Vec::new();
        for record in &snapshot.services {
            match runs.last_mut() {
                Some((tenant, run)) if *tenant == record.tenant => *run += 1,
                _ => runs.push((record.tenant.as_str().into(), 1)),
            }
        }
        let mut records = snapshot.services.into_iter();
        for (name, run) in runs {
            let tenant = state.tenants.entry(name).or_default();
            tenant.services.reserve(run);
            for record in records.by_ref().take(run) {
                let service = service_from_record(record)?;
                if tenant.services.contains_key(service.id.as_str()) {
                    return Err(SnapshotError::Inconsistent(format!(
                        "service {}/{} appears twice",
                        service.tenant, service.id
                    )));
                }
                count_stopped(&mut tenant.stopped_services, false, service.is_removable());
                if service.status == Status::Stopping {
                    state.stopping_services += 1;
                }
                count_quota(
                    &mut tenant.quota_services,
                    &mut tenant.quota_memory_bytes,
                    None,
                    service.held_quota(),
                );
                if service.is_active() {
                    state.active_services += 1;
                    *state
                        .module_users
                        .entry(super::module_key(&service.module_hash))
                        .or_default() += 1;
                }
                tenant.services.insert(service.id.as_str().into(), Box::new(service));
            }
        }
        for deploys in snapshot.recent_deploys {
            if !deploys.at_ms.is_empty() {
                return Err(SnapshotError::Outdated("it lists deploy times one by one"));
            }
            let window = |what: &str, starts: Vec<u64>, amounts: Vec<u64>| {
                if starts.len() == amounts.len() {
                    Ok(RateWindow::from_intervals(starts.into_iter().zip(amounts)))
                } else {
                    Err(SnapshotError::Inconsistent(format!(
                        "tenant {} has {} {what} interval starts but {} amounts",
                        deploys.tenant,
                        starts.len(),
                        amounts.len()
                    )))
                }
            };
            let recent_deploys = window(
                "deploy",
                deploys.interval_start_ms,
                deploys.interval_deploys.into_iter().map(u64::from).collect(),
            )?;
            let recent_history_bytes = window(
                "history",
                deploys.history_interval_start_ms,
                deploys.history_interval_bytes,
            )?;
            let tenant = state.tenants.entry(deploys.tenant.into()).or_default();
            tenant.recent_deploys = recent_deploys;
            tenant.recent_history_bytes = recent_history_bytes;
        }
        Ok(state)
    }
}

/// The fields of [`StateSnapshot`] but the idempotency keys (same tags; the others are
/// skipped), decoded apart from [`IdempotencyPart`].
#[derive(Clone, PartialEq, prost::Message)]
struct ServicesPart {
    #[prost(uint64, tag = "1")]
    seq: u64,
    #[prost(message, repeated, tag = "2")]
    services: Vec<proto::ServiceRecord>,
    #[prost(message, repeated, tag = "4")]
    recent_deploys: Vec<proto::TenantDeploys>,
    #[prost(uint64, tag = "5")]
    last_timestamp_ms: u64,
    #[prost(uint32, tag = "6")]
    format: u32,
}

/// The idempotency keys of a [`StateSnapshot`].
#[derive(Clone, PartialEq, prost::Message)]
struct IdempotencyPart {
    #[prost(message, repeated, tag = "3")]
    idempotency: Vec<proto::IdempotencyRecord>,
}

/// Remembered keys by tenant, and the expiry queue, oldest first as the snapshot lists them.
type Idempotency = (
    Map<CompactString, Map<CompactString, IdempotencyRecord>>,
    VecDeque<(u64, CompactString, CompactString)>,
);

fn idempotency_from_records(records: Vec<proto::IdempotencyRecord>) -> Result<Idempotency, SnapshotError> {
    let mut tenants: Map<CompactString, Map<CompactString, IdempotencyRecord>> = Map::default();
    let mut expiry = VecDeque::with_capacity(records.len());
    for record in records {
        let op = IdempotentOp::try_from(record.op)
            .ok()
            .filter(|op| *op != IdempotentOp::Unspecified)
            .ok_or_else(|| SnapshotError::Inconsistent(format!("idempotency op {}", record.op)))?;
        let module_hash = match record.module_hash.len() {
            0 => [0; 32],
            _ => record.module_hash.as_slice().try_into().map_err(|_| {
                SnapshotError::Inconsistent(format!("idempotency key '{}': bad module hash", record.key))
            })?,
        };
        let request_hash = match record.request_hash.len() {
            0 => None,
            _ => Some(record.request_hash.as_slice().try_into().map_err(|_| {
                SnapshotError::Inconsistent(format!("idempotency key '{}': bad request hash", record.key))
            })?),
        };
        let tenant = CompactString::from(record.tenant);
        let key = CompactString::from(record.key);
        expiry.push_back((record.at_ms, tenant.clone(), key.clone()));
        let remembered = IdempotencyRecord {
            op,
            service_id: record.service_id.into(),
            seq: record.seq,
            version: record.version,
            module_hash,
            request_hash,
            at_ms: record.at_ms,
        };
        tenants.entry(tenant).or_default().insert(key, remembered);
    }
    Ok((tenants, expiry))
}

fn service_record(s: &Service) -> proto::ServiceRecord {
    proto::ServiceRecord {
        tenant: s.tenant.clone(),
        service_id: s.id.clone(),
        module_sha256: s.module_sha256.clone(),
        module_size: s.module_size,
        version: s.version,
        limits: Some(s.limits),
        labels: s.labels.clone(),
        desired: s.desired.to_proto() as i32,
        status: s.status.to_proto() as i32,
        restarts: s.restarts,
        created_at_ms: s.created_at_ms,
        updated_at_ms: s.updated_at_ms,
        last_error: s.last_error.clone(),
        deployed_seq: s.deployed_seq,
        last_seq: s.last_seq,
        recent_seqs: s.recent_seqs.as_slice().to_vec(),
        restart_times_ms: s.restart_times_ms.clone(),
        replaced_while_stopping: s.replaced_while_stopping.clone(),
        load_failed: s.load_failed,
    }
}

/// The snapshot format this build writes ([`StateSnapshot::format`]).
const SNAPSHOT_FORMAT: u32 = 3;

fn service_from_record(r: proto::ServiceRecord) -> Result<Service, SnapshotError> {
    let bad = |what: &str| SnapshotError::Inconsistent(format!("service {}/{}: {what}", r.tenant, r.service_id));
    let desired = proto::DesiredState::try_from(r.desired)
        .ok()
        .and_then(Desired::from_proto)
        .ok_or_else(|| bad("unknown desired state"))?;
    let status = proto::ServiceStatusCode::try_from(r.status)
        .ok()
        .and_then(Status::from_proto)
        .ok_or_else(|| bad("unknown status"))?;
    let limits = r.limits.ok_or_else(|| bad("no limits"))?;
    // Every restart on record keeps its time (the latest `max_restarts` of them): a service
    // that restarted, with none kept, comes from a build that kept no times.
    if r.restarts > 0 && limits.max_restarts > 0 && r.restart_times_ms.is_empty() {
        return Err(SnapshotError::Outdated("it keeps no restart times"));
    }
    let module_hash = super::parse_sha256(&r.module_sha256).ok_or_else(|| bad("module_sha256 is not 64 hex digits"))?;
    let replaced = &r.replaced_while_stopping;
    if replaced.len() > super::MAX_REPLACED_WHILE_STOPPING
        || !replaced.windows(2).all(|pair| pair[0].version < pair[1].version)
        || replaced.last().is_some_and(|newest| newest.version >= r.version)
    {
        return Err(bad(
            "its killed versions replaced while stopping are out of order or too many",
        ));
    }
    Ok(Service {
        tenant: r.tenant,
        id: r.service_id,
        module_sha256: r.module_sha256,
        module_hash,
        module_size: r.module_size,
        version: r.version,
        limits,
        labels: r.labels,
        desired,
        status,
        restarts: r.restarts,
        created_at_ms: r.created_at_ms,
        updated_at_ms: r.updated_at_ms,
        last_error: r.last_error,
        deployed_seq: r.deployed_seq,
        last_seq: r.last_seq,
        // Only the newest RECENT_EVENTS, whatever the snapshot holds.
        recent_seqs: r.recent_seqs.into_iter().collect(),
        restart_times_ms: r.restart_times_ms,
        replaced_while_stopping: r.replaced_while_stopping,
        load_failed: r.load_failed,
    })
}

fn idempotency_record(tenant: &str, key: &str, r: &IdempotencyRecord) -> proto::IdempotencyRecord {
    proto::IdempotencyRecord {
        tenant: tenant.to_string(),
        key: key.to_string(),
        op: r.op as i32,
        service_id: r.service_id.to_string(),
        seq: r.seq,
        version: r.version,
        module_hash: if r.module_hash == [0; 32] {
            Vec::new()
        } else {
            r.module_hash.to_vec()
        },
        at_ms: r.at_ms,
        request_hash: r.request_hash.map(|h| h.to_vec()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::{IdempotencyPart, ServicesPart};
    use crate::proto::{IdempotencyRecord, ServiceRecord, StateSnapshot, TenantDeploys};

    /// The two parts together must carry every field of the snapshot message: a field added
    /// to `StateSnapshot` but to neither part would be silently dropped on load.
    #[test]
    fn the_decoding_parts_cover_every_field_of_the_snapshot() {
        let snapshot = StateSnapshot {
            seq: 7,
            services: vec![ServiceRecord {
                tenant: "acme".into(),
                service_id: "echo".into(),
                version: 2,
                ..Default::default()
            }],
            idempotency: vec![IdempotencyRecord {
                tenant: "acme".into(),
                key: "k1".into(),
                op: 1,
                seq: 5,
                ..Default::default()
            }],
            recent_deploys: vec![TenantDeploys {
                tenant: "acme".into(),
                at_ms: vec![1, 2],
                interval_start_ms: vec![0, 1000],
                interval_deploys: vec![2, 1],
                history_interval_start_ms: vec![0],
                history_interval_bytes: vec![700],
            }],
            last_timestamp_ms: 99,
            format: 1,
        };
        let bytes = snapshot.encode_to_vec();
        let services = ServicesPart::decode(bytes.as_slice()).unwrap();
        let idempotency = IdempotencyPart::decode(bytes.as_slice()).unwrap();
        let mut together = services.encode_to_vec();
        together.extend(idempotency.encode_to_vec());
        assert_eq!(StateSnapshot::decode(together.as_slice()).unwrap(), snapshot);
        assert_eq!(
            together.len(),
            bytes.len(),
            "no field is decoded by both parts or by neither"
        );
    }
}
