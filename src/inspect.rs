//! Offline inspection of a data directory: `solo log verify`, `dump`, `stats` and `backup`.
//!
//! These open the log read-only, so they work while a server is writing (LMDB allows readers
//! in other processes). `verify` and `stats` read the whole store in one read transaction (a
//! [`ReadView`]), so that what they compare or count is of one moment, whatever the server
//! commits meanwhile. `dump` reads in bounded chunks, one short read transaction each, as it
//! prints: records are never rewritten (log-format.md §3), so chunks up to one head read show
//! what one transaction would, and a reader slow to take its output pins no pages.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use prost::Message as _;
use sha2::Digest as _;

use crate::event::{self, EventKind};
use crate::log::{self, ReadView, Store, frame};
use crate::proto::{Event, event::Kind};
use crate::state::{Settings, SnapshotError, State};

/// Records `dump` reads per read transaction.
const CHUNK: u64 = 4096;

/// What `verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub head: u64,
    pub blobs: u64,
    /// Remembered keyed requests (the `requests` database).
    pub requests: u64,
    /// The first problem with the log: its seq and what is wrong.
    pub first_bad: Option<(u64, String)>,
    /// Snapshots compared with the replay, and whether each matched.
    pub snapshots: Vec<(u64, Result<(), String>)>,
    /// Other problems: damaged blobs, modules missing from the blob store, remembered
    /// requests that cannot be read back.
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.first_bad.is_none() && self.problems.is_empty() && self.snapshots.iter().all(|(_, r)| r.is_ok())
    }

    /// The report for programs (`solo log verify --json`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ok": self.ok(),
            // As every failure of the log tools reads: what verify finds wrong is damage.
            "damaged": !self.ok(),
            "summary": self.summary(),
            "records": self.records,
            "head": self.head,
            "blobs": self.blobs,
            "requests": self.requests,
            "first_bad": self.first_bad.as_ref().map(|(seq, reason)| serde_json::json!({ "seq": seq, "reason": reason })),
            "snapshots": self.snapshots.iter().map(|(seq, matched)| serde_json::json!({
                "seq": seq,
                "matches": matched.is_ok(),
                "reason": matched.as_ref().err(),
            })).collect::<Vec<_>>(),
            "problems": self.problems,
        })
    }

    /// The problems that [`summary`](Self::summary) does not name, for a person to read after it.
    pub fn other_problems(&self) -> &[String] {
        let summarised = self.first_bad.is_none() && !self.snapshots.iter().any(|(_, r)| r.is_err());
        &self.problems[usize::from(summarised).min(self.problems.len())..]
    }

    /// The one-line summary `solo log verify` prints.
    pub fn summary(&self) -> String {
        if let Some((seq, reason)) = &self.first_bad {
            return format!("FAILED: first bad record is seq {seq}: {reason}");
        }
        if let Some((seq, Err(reason))) = self.snapshots.iter().find(|(_, r)| r.is_err()) {
            return format!("FAILED: snapshot at seq {seq} does not match the replay: {reason}");
        }
        if let Some(problem) = self.problems.first() {
            return format!("FAILED: {problem}");
        }
        let snapshots = match self.snapshots.first() {
            Some((seq, _)) => format!(", replay matches the snapshot at seq {seq}"),
            None => String::new(),
        };
        format!(
            "ok: {} records (seq 1..={}), {} blobs, {} remembered requests{snapshots}",
            self.records, self.head, self.blobs, self.requests
        )
    }
}

/// Checks every record (frame, checksum, contiguous seqs, decoding, applying), every blob
/// (its hash), that every deployed module is present, that replaying the log reproduces
/// each stored snapshot, and that every remembered keyed request reads back.
///
/// All of it is read as of one moment, in one read transaction ([`Store::read_view`]): a node
/// writing meanwhile collects modules, prunes snapshots and remembers requests, and databases
/// read at different moments would disagree where nothing is wrong. The transaction lasts the
/// whole check (about a second per million events), and meanwhile pins the pages of its moment
/// in a live node's file, which grows by what the node writes in that time instead of reusing
/// them. That is acceptable for a check run by hand; the reads themselves stream, so memory
/// does not grow with the log.
pub fn verify(store: &Store, settings: Settings) -> log::Result<VerifyReport> {
    verify_as_of(&store.read_view()?, settings)
}

/// As [`verify`], of the store as `view` shows it.
pub fn verify_as_of(view: &ReadView<'_>, settings: Settings) -> log::Result<VerifyReport> {
    let mut report = VerifyReport::default();
    // First, by reading the file: damage to LMDB's own pages, which its reads below trust. Trees
    // that are not whole are not read through LMDB at all: it could crash on them.
    if let Some(damage) = view.page_damage()? {
        report.problems.push(damage.message);
        if !damage.trees_readable {
            return Ok(report);
        }
    }
    report.head = view.head()?;
    let snapshots = stored_snapshots(view, settings, &mut report)?;
    let (state, mut modules) = check_events(view, settings, &snapshots, &mut report)?;
    // Modules no service runs any more leave the blob store; those that some service runs
    // must be there. Which ones those are, only a replay to the head tells: one stopped at
    // damage would name modules that later kills let go of, a second problem that is not.
    if report.first_bad.is_some() {
        modules.clear();
    }
    modules.retain(|sha, _| crate::state::parse_sha256(sha).is_some_and(|hash| state.module_users(&hash) > 0));
    check_blobs(view, &modules, &mut report)?;
    check_requests(view, &mut report)?;
    Ok(report)
}

/// What a backup made: the copy, and what verifying it found.
#[derive(Debug)]
pub struct BackupReport {
    /// The copy's data file: `data.mdb` in the destination, there only if it was kept.
    pub path: PathBuf,
    pub bytes: u64,
    pub verified: VerifyReport,
}

impl BackupReport {
    /// Whether the copy verified, and so was kept.
    pub fn kept(&self) -> bool {
        self.verified.ok()
    }
}

/// Where a backup is written before it has verified: beside its final place, so that the
/// link that keeps it stays on one file system.
const BACKUP_STAGING: &str = ".solo-backup-partial";

/// A backup being written: a data file in a staging directory inside its destination, which
/// takes the name `data.mdb` in the destination only once it is durable and has verified as
/// `solo log verify` would. So a backup is either whole, durable and verified, or not there:
/// one dropped unfinished, or that does not verify, is deleted.
#[derive(Debug)]
pub struct StagedBackup {
    dest: PathBuf,
    /// The destination, open and locked: one backup at a time writes in it.
    _locked: fs::File,
    staging: PathBuf,
    file: fs::File,
}

impl StagedBackup {
    /// Starts a backup into the directory `dest`, made if missing (readable by its owner
    /// alone, as the data it holds is every tenant's), which must hold no data file: a backup
    /// never overwrites one.
    pub fn create(dest: &Path) -> anyhow::Result<StagedBackup> {
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        let held = || {
            anyhow::anyhow!(
                "{} already holds a data file: a backup never overwrites one; choose an empty directory",
                dest.display()
            )
        };
        // A symbolic link by that name too, even one that leads nowhere.
        if fs::symlink_metadata(dest.join(log::DATA_FILE)).is_ok() {
            return Err(held());
        }
        match fs::metadata(dest) {
            Ok(meta) if !meta.is_dir() => {
                anyhow::bail!("{} is not a directory: name a directory for the backup", dest.display())
            }
            Ok(_) => {}
            Err(_) => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dest)
                    .with_context(|| format!("cannot create the backup directory {}", dest.display()))?;
                // The new directory's entry is durable with its parent's.
                let parent = dest
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                fs::File::open(parent)
                    .and_then(|dir| dir.sync_all())
                    .with_context(|| format!("cannot make the backup directory {} durable", dest.display()))?;
            }
        }
        let locked =
            fs::File::open(dest).with_context(|| format!("cannot open the backup directory {}", dest.display()))?;
        rustix::fs::flock(&locked, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
            if e == rustix::io::Errno::WOULDBLOCK {
                anyhow::anyhow!(
                    "another backup is writing in {}: wait for it, or choose another directory",
                    dest.display()
                )
            } else {
                anyhow::anyhow!("cannot lock the backup directory {}: {e}", dest.display())
            }
        })?;
        let staging = dest.join(BACKUP_STAGING);
        // What an interrupted backup left: only ever a copy that was never verified.
        match fs::remove_dir_all(&staging) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot clear {}", staging.display()));
            }
            _ => {}
        }
        fs::create_dir(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(staging.join(log::DATA_FILE))
            .with_context(|| format!("cannot write the backup in {}", dest.display()))?;
        Ok(StagedBackup {
            dest: dest.to_path_buf(),
            _locked: locked,
            staging,
            file,
        })
    }

    /// Where the copy's bytes go.
    pub fn file(&mut self) -> &mut fs::File {
        &mut self.file
    }

    /// Makes the copy durable and verifies it; keeps it if it verifies. Either way, the report
    /// says what verifying it found.
    pub fn finish(self, options: &log::StoreOptions, settings: Settings) -> anyhow::Result<BackupReport> {
        let writing = || format!("cannot write the backup in {}", self.dest.display());
        self.file.sync_all().with_context(writing)?;
        let bytes = self.file.metadata().with_context(writing)?.len();
        let read_only = log::StoreOptions {
            read_only: true,
            ..options.clone()
        };
        let verified = {
            let copy = Store::open(&self.staging, &read_only).with_context(writing)?;
            verify(&copy, settings).with_context(writing)?
        };
        let report = BackupReport {
            path: self.dest.join(log::DATA_FILE),
            bytes,
            verified,
        };
        if report.kept() {
            // A link, not a rename: it never replaces a data file that came meanwhile (a node
            // started on the directory). The staged name goes with the staging directory.
            fs::hard_link(self.staging.join(log::DATA_FILE), &report.path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    anyhow::anyhow!(
                        "{} holds a data file now, which came while the backup was written (a node \
                         started on the directory?): the backup was not put over it",
                        self.dest.display()
                    )
                } else {
                    anyhow::Error::new(e).context(format!("cannot move the backup into {}", report.path.display()))
                }
            })?;
            // The link is durable with the directory that holds it.
            fs::File::open(&self.dest)
                .and_then(|dir| dir.sync_all())
                .with_context(|| format!("cannot make the backup in {} durable", self.dest.display()))?;
        }
        Ok(report)
    }
}

impl Drop for StagedBackup {
    fn drop(&mut self) {
        // The copy if it was not kept, and the lock file of the verifying read.
        let _ = fs::remove_dir_all(&self.staging);
    }
}

/// Backs `store` up into the directory `dest` (see [`StagedBackup`]): LMDB's copy as one read
/// transaction sees it, compacted. It works beside a running node, as every `solo log` tool
/// does, and is what a node started on `dest` serves: the log up to the head it was taken at,
/// and the modules, snapshots and remembered keys of that moment.
pub fn backup(
    store: &Store,
    dest: &Path,
    options: &log::StoreOptions,
    settings: Settings,
) -> anyhow::Result<BackupReport> {
    let mut staged = StagedBackup::create(dest)?;
    store
        .copy_compacted(staged.file())
        .with_context(|| format!("cannot write the backup in {}", dest.display()))?;
    staged.finish(options, settings)
}

/// The states the stored snapshots hold, by seq; one that is damaged is reported.
fn stored_snapshots(
    view: &ReadView<'_>,
    settings: Settings,
    report: &mut VerifyReport,
) -> log::Result<BTreeMap<u64, State>> {
    let mut snapshots = BTreeMap::new();
    for (seq, frame) in view.snapshots()? {
        match snapshot_state(frame, settings) {
            Ok(Some(state)) => {
                snapshots.insert(seq, state);
            }
            // Startup skips it as well, and replay rebuilds what it held: nothing is wrong.
            Ok(None) => {}
            Err(reason) => report
                .problems
                .push(format!("snapshot at seq {seq} is damaged ({reason}); startup skips it")),
        }
    }
    Ok(snapshots)
}

/// Replays the records `1..=head` in one pass, comparing the state with each snapshot on the
/// way. Returns the state replayed and, for each module deployed, the seq of its first deploy.
fn check_events(
    view: &ReadView<'_>,
    settings: Settings,
    snapshots: &BTreeMap<u64, State>,
    report: &mut VerifyReport,
) -> log::Result<(State, BTreeMap<String, u64>)> {
    let mut state = State::new(settings);
    let mut modules = BTreeMap::new();
    let head = report.head;
    let mut expected = 1;
    let scanned = match head {
        0 => Ok(()),
        _ => view.scan_raw(1..=head, |seq, bytes| {
            let checked = check_record(seq, expected, bytes, &mut state);
            expected = seq + 1;
            report.records += 1;
            match checked {
                Ok(event) => {
                    if let Some(Kind::ServiceDeployed(d)) = &event.kind {
                        modules.entry(d.module_sha256.clone()).or_insert(seq);
                    }
                    if let Some(snapshot) = snapshots.get(&seq) {
                        let matched = if snapshot == &state {
                            Ok(())
                        } else {
                            Err(first_difference(snapshot, &state))
                        };
                        report.snapshots.push((seq, matched));
                    }
                    ControlFlow::Continue(())
                }
                Err(bad) => {
                    report.first_bad = Some(bad);
                    ControlFlow::Break(())
                }
            }
        }),
    };
    match scanned {
        Ok(()) => {}
        // A damaged page or key of data.mdb: damage to report, at the seq it starts from.
        Err(log::Error::UndecodableRecord { seq, reason }) => report.first_bad = Some((seq, reason)),
        Err(e) => return Err(e),
    }
    if report.first_bad.is_none() && expected <= head {
        report.first_bad = Some((expected, "missing: the log has a gap".into()));
    }
    // Newest first, as they are stored.
    report.snapshots.reverse();
    Ok((state, modules))
}

/// Each entry of the `requests` database must read back as the node reads it when it starts
/// (which forgets one that does not), and rest on an event the log holds.
fn check_requests(view: &ReadView<'_>, report: &mut VerifyReport) -> log::Result<()> {
    view.scan_requests(|(key, value)| {
        report.requests += 1;
        let name = String::from_utf8_lossy(&key).replace('\0', "/");
        match crate::control::check_stored_request((key, value)) {
            Ok(seq) if seq > report.head => report.problems.push(format!(
                "remembered request {name:?} rests on seq {seq}, past the log's head {}",
                report.head
            )),
            Ok(_) => {}
            Err(reason) => report.problems.push(format!(
                "remembered request {name:?} cannot be read back ({reason}); the node forgets it when it starts"
            )),
        }
    })
}

fn check_record(seq: u64, expected: u64, bytes: &[u8], state: &mut State) -> Result<Event, (u64, String)> {
    if seq != expected {
        return Err((expected, "missing: the log has a gap".into()));
    }
    let event = decode_record(seq, bytes).map_err(|reason| (seq, reason))?;
    state
        .apply(&event)
        .map_err(|e| (seq, format!("event does not apply: {e}")))?;
    Ok(event)
}

/// The event a record at `seq` holds: its frame checked, its payload decoded and naming `seq`.
fn decode_record(seq: u64, bytes: &[u8]) -> Result<Event, String> {
    let payload = frame::decode(bytes).map_err(|e| e.to_string())?;
    let event = Event::decode(payload).map_err(|e| format!("payload does not decode: {e}"))?;
    if event.seq != seq {
        return Err(format!("payload says seq {}", event.seq));
    }
    Ok(event)
}

/// The state a framed snapshot holds; `None` for one in a form only older builds wrote.
fn snapshot_state(frame: &[u8], settings: Settings) -> Result<Option<State>, String> {
    let payload = frame::decode(frame).map_err(|e| e.to_string())?;
    match State::decode_snapshot(payload, settings) {
        // Keys past their window answer nothing, kept or not: one written before they
        // expired with every event may hold some.
        Ok(mut state) => {
            state.forget_expired_keys();
            Ok(Some(state))
        }
        Err(SnapshotError::Outdated(_)) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

fn first_difference(snapshot: &State, replayed: &State) -> String {
    let by_key = |s: &State| -> BTreeMap<(String, String), crate::state::Service> {
        s.services()
            .map(|svc| ((svc.tenant.clone(), svc.id.clone()), svc.clone()))
            .collect()
    };
    let (a, b) = (by_key(snapshot), by_key(replayed));
    for (key, service) in &a {
        match b.get(key) {
            None => return format!("service {}/{} is only in the snapshot", key.0, key.1),
            Some(other) if other != service => return format!("service {}/{} differs", key.0, key.1),
            Some(_) => {}
        }
    }
    if let Some(key) = b.keys().find(|k| !a.contains_key(*k)) {
        return format!("service {}/{} is only in the replay", key.0, key.1);
    }
    "quota figures or idempotency keys differ".into()
}

fn check_blobs(view: &ReadView<'_>, modules: &BTreeMap<String, u64>, report: &mut VerifyReport) -> log::Result<()> {
    let mut present = std::collections::BTreeSet::new();
    view.scan_blobs(|key, bytes| {
        report.blobs += 1;
        present.insert(hex::encode(key));
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(reason) => {
                report
                    .problems
                    .push(format!("blob {} is damaged: {reason}", hex::encode(key)));
                return;
            }
        };
        let computed = sha2::Sha256::digest(bytes);
        if computed.as_slice() != key {
            report.problems.push(format!(
                "blob {} is damaged: its bytes hash to {}",
                hex::encode(key),
                hex::encode(computed)
            ));
        }
    })?;
    for (sha, seq) in modules {
        if !present.contains(sha) {
            report.problems.push(format!(
                "module {sha} deployed at seq {seq} is missing from the blob store"
            ));
        }
    }
    Ok(())
}

/// Which records `dump` prints.
#[derive(Debug, Clone, Default)]
pub struct DumpFilter {
    pub from: u64,
    pub to: Option<u64>,
    pub tenant: Option<String>,
    pub service_id: Option<String>,
}

impl DumpFilter {
    fn matches(&self, event: &Event) -> bool {
        self.tenant.as_ref().is_none_or(|t| *t == event.tenant)
            && self.service_id.as_ref().is_none_or(|s| *s == event.service_id)
    }
}

/// Prints events one per line (JSON lines with `json`). Damaged records, and runs of missing
/// ones, are reported on `errors` and skipped. Returns the number of those reports.
pub fn dump(
    store: &Store,
    filter: &DumpFilter,
    json: bool,
    out: &mut dyn Write,
    errors: &mut dyn Write,
) -> std::io::Result<u64> {
    let head = store.head().map_err(std::io::Error::other)?;
    let to = filter.to.unwrap_or(head).min(head);
    let mut damaged = 0;
    let mut from = filter.from.max(1);
    // Seqs are gap-free: a record missing, or one whose payload names another seq, is damage
    // (log-format.md), reported rather than skipped in silence.
    let missing = |from: u64, to: u64| match to - from {
        0 => format!("seq {from}: missing (the log skips it)"),
        _ => format!("seqs {from}..={to}: missing (the log skips them)"),
    };
    while from <= to {
        let end = to.min(from + CHUNK - 1);
        let mut lines = Vec::new();
        let mut expected = from;
        let scanned = store.scan_raw(from..=end, |seq, bytes| {
            if seq > expected {
                lines.push(Err(missing(expected, seq - 1)));
            }
            expected = seq + 1;
            match decode_record(seq, bytes) {
                Ok(event) if filter.matches(&event) => lines.push(Ok(if json {
                    event::to_json(&event).to_string()
                } else {
                    event::describe(&event)
                })),
                Ok(_) => {}
                Err(reason) => lines.push(Err(format!("seq {seq}: damaged record: {reason}"))),
            }
            ControlFlow::Continue(())
        });
        if scanned.is_ok() && expected <= end {
            lines.push(Err(missing(expected, end)));
        }
        // The records before damage that stops the scan are printed, then the damage.
        for line in lines {
            match line {
                Ok(line) => writeln!(out, "{line}")?,
                Err(line) => {
                    damaged += 1;
                    writeln!(errors, "{line}")?;
                }
            }
        }
        scanned.map_err(std::io::Error::other)?;
        from = end + 1;
    }
    Ok(damaged)
}

/// What `stats` reports.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    pub head: u64,
    pub records: u64,
    pub record_bytes: u64,
    pub by_kind: BTreeMap<String, u64>,
    pub tenants: u64,
    pub services: u64,
    pub blobs: u64,
    pub blob_bytes: u64,
    /// (seq, bytes) of each snapshot, newest first.
    pub snapshots: Vec<(u64, u64)>,
    pub file_bytes: u64,
    pub map_size_bytes: u64,
    pub node_id: String,
    pub first_timestamp_ms: u64,
    pub last_timestamp_ms: u64,
}

/// What the store holds, counted as of one moment (one read transaction, as [`verify`]).
pub fn stats(store: &Store) -> log::Result<Stats> {
    let view = store.read_view()?;
    let store_stats = view.stats()?;
    let head = view.head()?;
    let mut stats = Stats {
        head,
        blobs: store_stats.blobs,
        blob_bytes: store_stats.blob_bytes,
        snapshots: store_stats.snapshots,
        file_bytes: store_stats.file_bytes,
        map_size_bytes: store_stats.map_size,
        node_id: store.node().node_id.clone(),
        ..Stats::default()
    };
    let mut services = std::collections::BTreeSet::new();
    // Figures of a history with a record missing or damaged would contradict one another (a
    // damaged page hides every record under it): the damage is the answer.
    let mut damage = None;
    let mut expected = 1;
    if head > 0 {
        view.scan_raw(1..=head, |seq, bytes| {
            if seq != expected {
                damage = Some(log::Error::MissingRecord { seq: expected });
                return ControlFlow::Break(());
            }
            expected = seq + 1;
            stats.record_bytes += bytes.len() as u64;
            let event = match decode_record(seq, bytes) {
                Ok(event) => event,
                Err(reason) => {
                    damage = Some(log::Error::UndecodableRecord { seq, reason });
                    return ControlFlow::Break(());
                }
            };
            let kind = EventKind::of_event(&event).map_or("unknown", EventKind::as_str);
            *stats.by_kind.entry(kind.to_string()).or_default() += 1;
            if stats.first_timestamp_ms == 0 {
                stats.first_timestamp_ms = event.timestamp_ms;
            }
            stats.last_timestamp_ms = event.timestamp_ms;
            if !event.service_id.is_empty() {
                services.insert((event.tenant, event.service_id));
            }
            ControlFlow::Continue(())
        })?;
    }
    if let Some(damage) = damage {
        return Err(damage);
    }
    if expected <= head {
        return Err(log::Error::MissingRecord { seq: expected });
    }
    // Counted, not LMDB's own count of the database, which damage may leave behind.
    stats.records = head;
    stats.services = services.len() as u64;
    stats.tenants = services
        .iter()
        .map(|(t, _)| t)
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::VerifyReport;

    #[test]
    fn every_problem_is_either_in_the_summary_or_among_the_others() {
        let problems = vec![
            "blob 00 is damaged".to_string(),
            "request r cannot be read back".to_string(),
        ];
        let only_problems = VerifyReport {
            problems: problems.clone(),
            ..VerifyReport::default()
        };
        assert!(only_problems.summary().contains("blob 00 is damaged"));
        assert_eq!(only_problems.other_problems(), &problems[1..]);
        let with_a_bad_record = VerifyReport {
            first_bad: Some((14, "checksum mismatch".into())),
            problems: problems.clone(),
            ..VerifyReport::default()
        };
        assert!(with_a_bad_record.summary().contains("seq 14"));
        assert_eq!(with_a_bad_record.other_problems(), &problems[..]);
        let with_a_bad_snapshot = VerifyReport {
            snapshots: vec![(10, Err("services differ".into()))],
            problems: problems.clone(),
            ..VerifyReport::default()
        };
        assert_eq!(with_a_bad_snapshot.other_problems(), &problems[..]);
        assert!(VerifyReport::default().other_problems().is_empty());
    }
}
