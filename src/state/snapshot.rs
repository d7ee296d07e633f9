//! State to and from its protobuf snapshot (`proto/solo/v1/snapshot.proto`).

use prost::Message as _;

use super::{Desired, IdempotencyRecord, Service, Settings, State, Status};
use crate::proto::{self, IdempotentOp, StateSnapshot};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot does not decode: {0}")]
    Decode(String),
    #[error("snapshot is inconsistent: {0}")]
    Inconsistent(String),
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
            .filter(|(_, t)| !t.recent_deploys.is_empty())
            .map(|(name, t)| proto::TenantDeploys {
                tenant: name.clone(),
                at_ms: t.recent_deploys.iter().copied().collect(),
            })
            .collect();
        recent_deploys.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        StateSnapshot {
            seq: self.applied_seq,
            services,
            idempotency,
            recent_deploys,
            last_timestamp_ms: self.last_timestamp_ms,
        }
    }

    pub fn encode_snapshot(&self, out: &mut Vec<u8>) {
        let snapshot = self.to_snapshot();
        out.reserve(snapshot.encoded_len());
        snapshot.encode(out).expect("a Vec grows as needed");
    }

    /// Rebuilds a state from snapshot bytes.
    pub fn decode_snapshot(bytes: &[u8], settings: Settings) -> Result<State, SnapshotError> {
        let snapshot = StateSnapshot::decode(bytes).map_err(|e| SnapshotError::Decode(e.to_string()))?;
        State::from_snapshot(snapshot, settings)
    }

    pub fn from_snapshot(snapshot: StateSnapshot, settings: Settings) -> Result<State, SnapshotError> {
        let mut state = State::new(settings);
        state.applied_seq = snapshot.seq;
        state.last_timestamp_ms = snapshot.last_timestamp_ms;
        // Snapshots list services by tenant: size each tenant's map once, from its run.
        let mut runs: Vec<(String, usize)> = Vec::new();
        for record in &snapshot.services {
            match runs.last_mut() {
                Some((tenant, run)) if *tenant == record.tenant => *run += 1,
                _ => runs.push((record.tenant.clone(), 1)),
            }
        }
        let mut records = snapshot.services.into_iter();
        for (name, run) in runs {
            let tenant = state.tenants.entry(name).or_default();
            tenant.services.reserve(run);
            for record in records.by_ref().take(run) {
                let service = service_from_record(record)?;
                if tenant.services.contains_key(&service.id) {
                    return Err(SnapshotError::Inconsistent(format!(
                        "service {}/{} appears twice",
                        service.tenant, service.id
                    )));
                }
                if service.is_active() {
                    tenant.active_services = tenant.active_services.saturating_add(1);
                    state.active_services += 1;
                    tenant.active_memory_bytes = tenant.active_memory_bytes.saturating_add(service.limits.memory_bytes);
                }
                tenant.services.insert(service.id.clone(), service);
            }
        }
        state.idempotency_expiry.reserve(snapshot.idempotency.len());
        for record in snapshot.idempotency {
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
            state
                .idempotency_expiry
                .push_back((record.at_ms, record.tenant.clone(), record.key.clone()));
            let remembered = IdempotencyRecord {
                op,
                service_id: record.service_id,
                seq: record.seq,
                version: record.version,
                module_hash,
                at_ms: record.at_ms,
            };
            state
                .tenants
                .entry(record.tenant)
                .or_default()
                .idempotency
                .insert(record.key, remembered);
        }
        for deploys in snapshot.recent_deploys {
            state.tenants.entry(deploys.tenant).or_default().recent_deploys = deploys.at_ms.into();
        }
        Ok(state)
    }
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
        recent_seqs: s.recent_seqs.iter().copied().collect(),
    }
}

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
    Ok(Service {
        tenant: r.tenant,
        id: r.service_id,
        module_sha256: r.module_sha256,
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
        recent_seqs: r.recent_seqs[r.recent_seqs.len().saturating_sub(super::RECENT_EVENTS)..]
            .iter()
            .copied()
            .collect(),
    })
}

fn idempotency_record(tenant: &str, key: &str, r: &IdempotencyRecord) -> proto::IdempotencyRecord {
    proto::IdempotencyRecord {
        tenant: tenant.to_string(),
        key: key.to_string(),
        op: r.op as i32,
        service_id: r.service_id.clone(),
        seq: r.seq,
        version: r.version,
        module_hash: if r.module_hash == [0; 32] {
            Vec::new()
        } else {
            r.module_hash.to_vec()
        },
        at_ms: r.at_ms,
    }
}
