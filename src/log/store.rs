//! The LMDB environment and its four databases (see `log-format.md`).
//!
//! Everything here is blocking and short: one write transaction per appended batch, and read
//! transactions that live for one bounded read. Nothing here holds a transaction across an
//! `.await`; async callers go through `spawn_blocking`.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use heed::byteorder::BigEndian;
use heed::types::{Bytes, Str, U64};
use heed::{Database, Env, EnvFlags, EnvOpenOptions, PutFlags, RoTxn, RwTxn, WithoutTls};

use super::dir::{self, check_data_file, lock_for_writing, sync_dir};
use super::error::{Error, Result};
use super::frame;
use super::pages;

/// The on-disk format this build writes (`meta/format_version`). Version 2 may hold
/// `service_removed` events, which a reader of version 1 would step over, and so list removed
/// services again and refuse the deploys that reused their ids.
pub const FORMAT_VERSION: u32 = 2;

/// The oldest format this build reads. A directory of an older format that is opened for
/// writing is raised to [`FORMAT_VERSION`] first, so that older builds refuse it from then on
/// rather than misread it.
pub const OLDEST_FORMAT_VERSION: u32 = 1;

pub const EVENTS_DB: &str = "events";
pub const BLOBS_DB: &str = "blobs";
pub const SNAPSHOTS_DB: &str = "snapshots";
pub const META_DB: &str = "meta";
pub const REQUESTS_DB: &str = "requests";

/// LMDB's data file in the data directory.
pub const DATA_FILE: &str = "data.mdb";

pub const META_FORMAT_VERSION: &str = "format_version";
pub const META_NODE_ID: &str = "node_id";
pub const META_CREATED_AT_MS: &str = "created_at_ms";
/// When the node last tried whether the log takes writes again ([`Store::probe_writes`]).
pub const META_WRITE_PROBE_MS: &str = "write_probe_ms";

type SeqKey = U64<BigEndian>;

/// How the environment is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Size of LMDB's memory map: the most the data file may ever hold. A read-only open
    /// ignores it and maps what the data file records (the largest map a writer used).
    pub map_size: u64,
    /// Slots in LMDB's reader table: concurrent read transactions, across processes.
    pub max_readers: u32,
    /// Open for reading only, as the offline tools do while a server may be writing.
    pub read_only: bool,
    /// Opening to write, walk the newest commit's pages first and refuse damage.
    pub check_pages: bool,
}

/// A content-addressed blob: SHA-256 of the bytes, and the bytes.
#[derive(Debug, Clone, Copy)]
pub struct BlobRef<'a> {
    pub sha256: &'a [u8; 32],
    pub bytes: &'a [u8],
}

/// What a commit changes in the `requests` database (keyed requests that changed nothing,
/// kept for their idempotency window), beside the records it appends. Its keys and values are
/// the caller's; a value is put framed.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestChanges<'a> {
    pub put: &'a [(Vec<u8>, Vec<u8>)],
    pub delete: &'a [Vec<u8>],
}

impl RequestChanges<'_> {
    pub fn is_empty(&self) -> bool {
        self.put.is_empty() && self.delete.is_empty()
    }
}

/// An entry of the `requests` database: its key, and its value unframed, or why it cannot be.
pub type StoredRequest = (Vec<u8>, std::result::Result<Vec<u8>, String>);

/// What a commit changes in the blob store, beside the records it appends.
#[derive(Debug, Clone, Copy, Default)]
pub struct BlobChanges<'a> {
    /// Blobs to store; one already stored is kept (or healed, if its copy is damaged).
    pub put: &'a [BlobRef<'a>],
    /// Blobs nothing needs any more, deleted once the puts are done.
    pub delete: &'a [[u8; 32]],
}

impl BlobChanges<'_> {
    pub fn is_empty(&self) -> bool {
        self.put.is_empty() && self.delete.is_empty()
    }
}

/// Sizes and counts, for `solo log stats`.
#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    pub events: u64,
    pub blobs: u64,
    pub blob_bytes: u64,
    pub snapshots: Vec<(u64, u64)>,
    pub file_bytes: u64,
    /// The map in effect: for a read-only open, the size recorded in the data file.
    pub map_size: u64,
}

/// Identity of a data directory, from the `meta` database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMeta {
    pub node_id: String,
    pub created_at_ms: u64,
}

#[derive(Debug)]
pub struct Store {
    env: Env<WithoutTls>,
    path: PathBuf,
    map_size: u64,
    events: Database<SeqKey, Bytes>,
    blobs: Database<Bytes, Bytes>,
    snapshots: Database<SeqKey, Bytes>,
    meta: Database<Str, Bytes>,
    /// Absent only from a data directory written before it existed, opened read-only.
    requests: Option<Database<Bytes, Bytes>>,
    node: NodeMeta,
    /// Where this process maps data.mdb, if that can be found.
    mapping: Option<Mapping>,
    /// The writer's exclusive lock on the directory, held while the store is open.
    _writer_lock: Option<std::fs::File>,
}

/// Where data.mdb is mapped. LMDB hands out values in place, trusting the lengths its pages
/// record; one damaged length can make a value run past the end of the file, and reading
/// there kills the process with SIGBUS rather than failing. Knowing the map, each value is
/// checked to lie within the file's pages before a byte of it is read.
#[derive(Debug, Clone, Copy)]
struct Mapping {
    base: usize,
    len: usize,
    page_size: usize,
}

/// Said of a value whose length runs past the end of data.mdb.
const PAST_THE_END: &str = "its length in data.mdb is damaged: it runs past the end of the file";

/// The addresses of data.mdb's pages as of one moment ([`Store::file_pages`]).
#[derive(Debug, Clone, Copy)]
struct FilePages(Option<(Mapping, usize)>);

impl FilePages {
    /// Whether `value` lies within the file's pages. One outside the map altogether is a page
    /// of the current write transaction, in memory, and whole.
    fn hold(&self, value: &[u8]) -> bool {
        let Some((mapping, file_end)) = self.0 else { return true };
        let start = value.as_ptr() as usize;
        if start < mapping.base || start >= mapping.base + mapping.len {
            return true;
        }
        start.checked_add(value.len()).is_some_and(|end| end <= file_end)
    }
}

/// Finds the one mapping of `file` at offset 0 in this process (Linux's `/proc/self/maps`).
/// `None` if there is no such table, or not exactly one such mapping.
fn find_mapping(file: &Path, page_size: usize) -> Option<Mapping> {
    let file = std::fs::canonicalize(file).ok()?;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let mut found = maps.lines().filter_map(|line| {
        // start-end perms offset dev inode path (the path may hold spaces)
        let mut fields = line.splitn(6, ' ');
        let range = fields.next()?;
        let offset = fields.nth(1)?;
        let path = fields.nth(2)?.trim_start();
        if u64::from_str_radix(offset, 16).ok()? != 0 || Path::new(path) != file {
            return None;
        }
        let (start, end) = range.split_once('-')?;
        let base = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        Some(Mapping {
            base,
            len: end.checked_sub(base)?,
            page_size,
        })
    });
    let mapping = found.next()?;
    found.next().is_none().then_some(mapping)
}

impl Store {
    pub fn open(path: &Path, options: &StoreOptions) -> Result<Store> {
        Store::open_with(path, options, true)
    }

    /// As [`open`](Self::open), read-only and without LMDB's lock file (`MDB_NOLOCK`): for the
    /// offline tools on a directory they may not write. A node writing meanwhile knows nothing
    /// of this reader and may reuse the pages it reads, so it is safe only while none writes.
    pub fn open_unlocked(path: &Path, options: &StoreOptions) -> Result<Store> {
        let options = StoreOptions {
            read_only: true,
            ..options.clone()
        };
        Store::open_with(path, &options, false)
    }

    fn open_with(path: &Path, options: &StoreOptions, lock: bool) -> Result<Store> {
        let bad = |reason: &str| Error::BadDataDir {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && options.read_only => {
                return Err(bad("it does not exist"));
            }
            Ok(meta) if !meta.is_dir() => return Err(bad("it is a file, not a directory")),
            _ => {}
        }
        if options.read_only && !path.join(DATA_FILE).exists() {
            return Err(bad("it holds no Solo log (no data.mdb)"));
        }
        // The directories this open creates, innermost first: their names are made durable with
        // the data file's first commit.
        let created: Vec<&Path> = path
            .ancestors()
            .take_while(|dir| !dir.as_os_str().is_empty() && !dir.exists())
            .collect();
        std::fs::create_dir_all(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        check_data_file(path)?;
        let made_lock_file = lock && dir::allocate_lmdb_lock_file(path, options.max_readers)?;
        let opened = Store::open_allocated(path, options, lock, &created);
        if let Err(e) = &opened
            && made_lock_file
            && matches!(e, Error::Damaged { .. } | Error::BadDataDir { .. })
        {
            // Refused as no log to serve, so no node uses the directory: it is left as it was.
            let _ = std::fs::remove_file(path.join(dir::LMDB_LOCK_FILE));
        }
        opened
    }

    /// [`open_with`](Self::open_with) once the directory is checked and LMDB's lock file is
    /// ready. `created`: the directories the open made, innermost first.
    fn open_allocated(path: &Path, options: &StoreOptions, lock: bool, created: &[&Path]) -> Result<Store> {
        let env = open_env(path, options, lock)?;
        // After the environment: a second open in this process is told so by LMDB itself.
        let writer_lock = (!options.read_only).then(|| lock_for_writing(path)).transpose()?;
        check_file_length(&env, path)?;
        if options.check_pages && !options.read_only {
            refuse_page_damage(&env, path)?;
        }
        let heed_err = |e| Error::from_heed(e, path, options.map_size);
        // A data file with commits must still have every database: creating a lost `events`
        // afresh (its main tree damaged, say) would serve an empty log over the data that
        // remains. A new one has none: the databases are its first commit.
        let initialised = !options.read_only && env.info().last_txn_id > 0;
        let (events, blobs, snapshots, meta, requests) = if options.read_only || initialised {
            let opened = open_databases(&env, path).map_err(|e| match e {
                Error::Lmdb { source, .. } => heed_err(source),
                other => other,
            })?;
            match opened {
                // Directories from before remembered requests get their database now.
                (events, blobs, snapshots, meta, None) if !options.read_only => {
                    let mut wtxn = env.write_txn().map_err(heed_err)?;
                    let requests = env.create_database(&mut wtxn, Some(REQUESTS_DB)).map_err(heed_err)?;
                    wtxn.commit().map_err(heed_err)?;
                    (events, blobs, snapshots, meta, Some(requests))
                }
                opened => opened,
            }
        } else {
            let databases = create_databases(&env).map_err(heed_err)?;
            // The commit made the new data file's pages durable, not its name in the directory
            // (nor the names of the directories made for it): a power loss could lose the file
            // whose first commits the node has acknowledged.
            for dir in std::iter::once(path).chain(created.iter().filter_map(|dir| dir.parent())) {
                sync_dir(dir)?;
            }
            databases
        };
        let map_size = env.info().map_size as u64;
        if !options.read_only && map_size > options.map_size {
            // LMDB raises a map smaller than the data already committed to just fit it.
            tracing::warn!(
                path = %path.display(),
                map_size_mb = map_size >> 20,
                configured_mb = options.map_size >> 20,
                "[database] map_size_mb is smaller than the data the file already holds, so the map is just \
                 that large: writes will fail for want of room until map_size_mb is raised"
            );
        }
        let mapping = find_mapping(&path.join(DATA_FILE), env.stat().page_size as usize);
        if mapping.is_none() {
            tracing::debug!(path = %path.display(), "data.mdb's mapping not found: value lengths are trusted");
        }
        let mut store = Store {
            env,
            path: path.to_path_buf(),
            map_size,
            events,
            blobs,
            snapshots,
            meta,
            requests,
            node: NodeMeta {
                node_id: String::new(),
                created_at_ms: 0,
            },
            mapping,
            _writer_lock: writer_lock,
        };
        store.node = store.check_or_init_meta(options.read_only)?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the log takes writes again after a commit failed for a full disk: the disk has
    /// room for `needed` bytes (a small write would fit in free pages of the data file while
    /// the batch that failed still does not), and one small write (the time, in `meta`)
    /// commits. A commit with nothing in it would tell nothing, as LMDB writes nothing for it.
    pub fn probe_writes(&self, now_ms: u64, needed: u64) -> Result<()> {
        let room = rustix::fs::statvfs(&self.path).map_err(|e| Error::Io {
            path: self.path.clone(),
            source: e.into(),
        })?;
        if room.f_bavail.saturating_mul(room.f_frsize) < needed {
            return Err(Error::DiskFull {
                path: self.path.clone(),
            });
        }
        let mut wtxn = self.env.write_txn().map_err(|e| self.err(e))?;
        self.meta
            .put(&mut wtxn, META_WRITE_PROBE_MS, &now_ms.to_be_bytes())
            .map_err(|e| self.err(e))?;
        wtxn.commit().map_err(|e| self.commit_err(e))
    }

    pub fn node(&self) -> &NodeMeta {
        &self.node
    }

    fn err(&self, e: heed::Error) -> Error {
        Error::from_heed(e, &self.path, self.map_size)
    }

    /// As `err`, for a failed commit: the one place a write reaches the disk.
    fn commit_err(&self, e: heed::Error) -> Error {
        Error::from_commit(e, &self.path, self.map_size)
    }

    /// Verifies the format version (raising an older one, when writing), or stamps a new data
    /// directory with this build's.
    fn check_or_init_meta(&self, read_only: bool) -> Result<NodeMeta> {
        let rtxn = self.env.read_txn().map_err(|e| self.err(e))?;
        let version = self.meta.get(&rtxn, META_FORMAT_VERSION).map_err(|e| self.err(e))?;
        match version {
            Some(bytes) => {
                let found = u32::from_be_bytes(
                    bytes
                        .try_into()
                        .map_err(|_| self.bad("meta/format_version is not 4 bytes"))?,
                );
                if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&found) {
                    return Err(Error::UnsupportedFormat {
                        path: self.path.clone(),
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
                let node = self.read_node_meta(&rtxn)?;
                let lost_events = self.events.is_empty(&rtxn).map_err(|e| self.err(e))?
                    && !(self.snapshots.is_empty(&rtxn).map_err(|e| self.err(e))?
                        && self.blobs.is_empty(&rtxn).map_err(|e| self.err(e))?);
                if lost_events {
                    return Err(self.bad(
                        "its events database is empty, but it holds snapshots or modules, which only \
                         events bring: the events were lost; restore it from a backup",
                    ));
                }
                drop(rtxn);
                if found < FORMAT_VERSION && !read_only {
                    let mut wtxn = self.env.write_txn().map_err(|e| self.err(e))?;
                    self.meta
                        .put(&mut wtxn, META_FORMAT_VERSION, &FORMAT_VERSION.to_be_bytes())
                        .map_err(|e| self.err(e))?;
                    wtxn.commit().map_err(|e| self.commit_err(e))?;
                    tracing::info!(from = found, to = FORMAT_VERSION, "data directory format raised");
                }
                Ok(node)
            }
            None if read_only => Err(self.bad("it was never initialised (no meta/format_version)")),
            None => {
                if !self.events.is_empty(&rtxn).map_err(|e| self.err(e))? {
                    return Err(self.bad("it holds events but no meta/format_version"));
                }
                drop(rtxn);
                self.init_meta()
            }
        }
    }

    /// The file's pages as of now: they hold every value of a transaction begun before this
    /// call (the file only grows), unless the value's length is damaged.
    fn file_pages(&self) -> FilePages {
        FilePages(self.mapping.map(|mapping| {
            let pages = self.env.info().last_page_number + 1;
            (mapping, mapping.base + pages * mapping.page_size)
        }))
    }

    fn bad(&self, reason: &str) -> Error {
        Error::BadDataDir {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }

    fn read_node_meta(&self, rtxn: &RoTxn<'_, WithoutTls>) -> Result<NodeMeta> {
        let node_id = self.meta.get(rtxn, META_NODE_ID).map_err(|e| self.err(e))?;
        let created = self.meta.get(rtxn, META_CREATED_AT_MS).map_err(|e| self.err(e))?;
        let created_at_ms = created
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| self.bad("meta/created_at_ms is missing or not 8 bytes"))?;
        Ok(NodeMeta {
            node_id: hex::encode(node_id.ok_or_else(|| self.bad("meta/node_id is missing"))?),
            created_at_ms,
        })
    }

    fn init_meta(&self) -> Result<NodeMeta> {
        let mut node_id = [0u8; 16];
        getrandom::fill(&mut node_id).map_err(|e| self.bad(&format!("no randomness for a node id: {e}")))?;
        let created_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut wtxn = self.env.write_txn().map_err(|e| self.err(e))?;
        let put = |wtxn: &mut RwTxn<'_>, key: &str, value: &[u8]| self.meta.put(wtxn, key, value);
        put(&mut wtxn, META_FORMAT_VERSION, &FORMAT_VERSION.to_be_bytes()).map_err(|e| self.err(e))?;
        put(&mut wtxn, META_NODE_ID, &node_id).map_err(|e| self.err(e))?;
        put(&mut wtxn, META_CREATED_AT_MS, &created_at_ms.to_be_bytes()).map_err(|e| self.err(e))?;
        wtxn.commit().map_err(|e| self.commit_err(e))?;
        Ok(NodeMeta {
            node_id: hex::encode(node_id),
            created_at_ms,
        })
    }

    /// The seq of the last record, 0 for an empty log.
    pub fn head(&self) -> Result<u64> {
        self.read_view()?.head()
    }

    /// Frees the reader slots of processes that died holding a read transaction (a `solo log`
    /// tool killed mid-read): LMDB frees a slot only when its reader ends, and a dead reader's
    /// transaction would keep every page of its moment from reuse, the data file growing by
    /// all that is written. Returns how many it freed.
    pub fn clear_stale_readers(&self) -> Result<usize> {
        self.env.clear_stale_readers().map_err(|e| self.err(e))
    }

    /// Writes the whole store as one read transaction sees it to `file`, compacted (free pages
    /// left out, pages renumbered): a data file of its own, which a node writing meanwhile does
    /// not disturb. The caller makes it durable.
    /// A write that fails is the copy's I/O error; anything else carries the store's error.
    pub fn copy_compacted(&self, file: &mut std::fs::File) -> std::io::Result<()> {
        self.env
            .copy_to_file(file, heed::CompactionOption::Enabled)
            .map_err(|e| match e {
                heed::Error::Io(e) => e,
                heed::Error::Mdb(heed::MdbError::Other(errno)) => std::io::Error::from_raw_os_error(errno),
                other => std::io::Error::other(self.err(other)),
            })
    }

    /// The whole store as of now, for reads that must all see one moment ([`ReadView`]).
    pub fn read_view(&self) -> Result<ReadView<'_>> {
        let rtxn = self.env.read_txn().map_err(|e| self.err(e))?;
        // After the transaction began: the file only grows, so these pages hold all it reads.
        let pages = self.file_pages();
        Ok(ReadView {
            store: self,
            rtxn,
            pages,
        })
    }

    /// Writes `frames` as records `first_seq..` and the blob changes, in one durable
    /// transaction. Either all of it is committed or none of it.
    pub fn append<'f>(
        &self,
        first_seq: u64,
        frames: impl IntoIterator<Item = &'f [u8]>,
        blobs: BlobChanges<'_>,
        requests: RequestChanges<'_>,
    ) -> Result<()> {
        let mut wtxn = self.env.write_txn().map_err(|e| self.err(e))?;
        if !requests.is_empty() {
            let db = self.requests.ok_or_else(|| Error::BadDataDir {
                path: self.path.clone(),
                reason: format!("it has no `{REQUESTS_DB}` database, and is open read-only"),
            })?;
            for key in requests.delete {
                db.delete(&mut wtxn, key).map_err(|e| self.err(e))?;
            }
            for (key, value) in requests.put {
                db.put(&mut wtxn, key, &frame::encode(value)).map_err(|e| self.err(e))?;
            }
        }
        for blob in blobs.put {
            match self
                .blobs
                .put_with_flags(&mut wtxn, PutFlags::NO_OVERWRITE, blob.sha256, blob.bytes)
            {
                Ok(()) => {}
                Err(heed::Error::Mdb(heed::MdbError::KeyExist)) => {
                    // The key is the hash of the bytes in hand, so a stored copy that differs
                    // is damaged: replacing it heals every service that runs this module.
                    let pages = self.file_pages();
                    let stored = self.blobs.get(&wtxn, blob.sha256).map_err(|e| self.err(e))?;
                    if stored.is_none_or(|stored| !pages.hold(stored) || stored != blob.bytes) {
                        tracing::warn!(module = %hex::encode(blob.sha256), "a damaged module in the blob store is rewritten from a deploy");
                        self.blobs
                            .put(&mut wtxn, blob.sha256, blob.bytes)
                            .map_err(|e| self.err(e))?;
                    }
                }
                Err(e) => return Err(self.err(e)),
            }
        }
        for sha256 in blobs.delete {
            self.blobs.delete(&mut wtxn, sha256).map_err(|e| self.err(e))?;
        }
        for (seq, frame) in (first_seq..).zip(frames) {
            // APPEND: keys only grow, and LMDB refuses (KeyExist) a key that would not.
            self.events
                .put_with_flags(&mut wtxn, PutFlags::APPEND, &seq, frame)
                .map_err(|e| match e {
                    heed::Error::Mdb(heed::MdbError::KeyExist) => Error::NotPastHead { seq },
                    e => self.err(e),
                })?;
        }
        wtxn.commit().map_err(|e| self.commit_err(e))
    }

    /// Reads the frames of `range`, checking each frame, in one short read transaction.
    /// Stops early at a missing seq (the caller decides whether that is a gap or the end).
    pub fn read_frames<T>(
        &self,
        range: RangeInclusive<u64>,
        mut each: impl FnMut(u64, &[u8]) -> Result<T>,
    ) -> Result<Vec<T>> {
        let mut out = Vec::with_capacity((range.end() - range.start()).saturating_add(1).min(8192) as usize);
        self.visit_frames(range, |seq, payload| {
            out.push(each(seq, payload)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Hands `each` the checked payload of every frame of `range`, in order, in one short read
    /// transaction. Stops early at a missing seq, as [`Store::read_frames`] does.
    pub fn visit_frames(
        &self,
        range: RangeInclusive<u64>,
        mut each: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let rtxn = self.env.read_txn().map_err(|e| self.err(e))?;
        let pages = self.file_pages();
        let iter = self.events.range(&rtxn, &range).map_err(|e| self.err(e))?;
        for (expected, item) in (*range.start()..).zip(iter) {
            let (seq, bytes) = item.map_err(|e| self.damaged_from(expected, e))?;
            if seq != expected {
                return Err(Error::MissingRecord { seq: expected });
            }
            if !pages.hold(bytes) {
                return Err(past_the_end(seq));
            }
            let payload = frame::decode(bytes).map_err(|source| Error::CorruptRecord { seq, source })?;
            each(seq, payload)?;
        }
        Ok(())
    }

    /// Visits raw records (unchecked frames) of `range`, in one read transaction; for the
    /// offline tools, which report damage rather than stop at it.
    pub fn scan_raw(
        &self,
        range: RangeInclusive<u64>,
        each: impl FnMut(u64, &[u8]) -> std::ops::ControlFlow<()>,
    ) -> Result<()> {
        self.read_view()?.scan_raw(range, each)
    }

    /// An error met walking the events from `seq` on: a key that does not decode or a page
    /// that LMDB cannot find means the records from `seq` on are unreadable, so it names it.
    fn damaged_from(&self, seq: u64, e: heed::Error) -> Error {
        let reason = match &e {
            heed::Error::Decoding(_) => format!("its key in data.mdb is damaged ({e})"),
            heed::Error::Mdb(heed::MdbError::Corrupted | heed::MdbError::PageNotFound) => {
                format!("the page of data.mdb that holds it is damaged ({e})")
            }
            _ => return self.err(e),
        };
        Error::UndecodableRecord { seq, reason }
    }

    pub fn blob(&self, sha256: &[u8; 32]) -> Result<Option<Vec<u8>>> {
        self.with_blob(sha256, <[u8]>::to_vec)
    }

    /// Whether the blob is stored; an error if its record cannot be read (a damaged page, or a
    /// length that runs past the end of the file).
    pub fn has_blob(&self, sha256: &[u8; 32]) -> Result<bool> {
        Ok(self.blob_len(sha256)?.is_some())
    }

    /// The size of a stored blob, read without copying it; errors as [`has_blob`](Self::has_blob).
    pub fn blob_len(&self, sha256: &[u8; 32]) -> Result<Option<usize>> {
        self.with_blob(sha256, <[u8]>::len)
    }

    /// `read` of the blob's bytes in place, if it is stored.
    fn with_blob<T>(&self, sha256: &[u8; 32], read: impl FnOnce(&[u8]) -> T) -> Result<Option<T>> {
        let rtxn = self.env.read_txn().map_err(|e| self.err(e))?;
        let pages = self.file_pages();
        match self.blobs.get(&rtxn, sha256).map_err(|e| self.err(e))? {
            Some(bytes) if !pages.hold(bytes) => {
                Err(self.bad(&format!("blob {}: {PAST_THE_END}", hex::encode(sha256))))
            }
            found => Ok(found.map(read)),
        }
    }

    /// Visits every blob (key, bytes) in one read transaction; a blob whose length is
    /// damaged comes as the reason it cannot be read.
    pub fn scan_blobs(&self, each: impl FnMut(&[u8], std::result::Result<&[u8], &str>)) -> Result<()> {
        self.read_view()?.scan_blobs(each)
    }

    /// Every entry of the `requests` database, its value unframed; one whose frame is damaged
    /// comes as the reason it cannot be read.
    pub fn requests(&self) -> Result<Vec<StoredRequest>> {
        let mut entries = Vec::new();
        self.read_view()?.scan_requests(|entry| entries.push(entry))?;
        Ok(entries)
    }

    /// Stores a framed snapshot taken after `seq`, keeping only the newest `keep` snapshots.
    pub fn put_snapshot(&self, seq: u64, frame: &[u8], keep: usize) -> Result<()> {
        let mut wtxn = self.env.write_txn().map_err(|e| self.err(e))?;
        self.snapshots.put(&mut wtxn, &seq, frame).map_err(|e| self.err(e))?;
        let older: Vec<u64> = self
            .snapshots
            .rev_iter(&wtxn)
            .map_err(|e| self.err(e))?
            .skip(keep.max(1))
            .map(|item| item.map(|(seq, _)| seq))
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))?;
        for seq in older {
            self.snapshots.delete(&mut wtxn, &seq).map_err(|e| self.err(e))?;
        }
        wtxn.commit().map_err(|e| self.commit_err(e))
    }

    /// Seqs of the stored snapshots, newest first.
    pub fn snapshot_seqs(&self) -> Result<Vec<u64>> {
        let rtxn = self.env.read_txn().map_err(|e| self.err(e))?;
        self.snapshots
            .rev_iter(&rtxn)
            .map_err(|e| self.err(e))?
            .map(|item| item.map(|(seq, _)| seq).map_err(|e| self.err(e)))
            .collect()
    }

    /// Every stored snapshot (seq and frame), newest first, as of one moment: read in one read
    /// transaction, so one the server prunes meanwhile is still here rather than vanished. A
    /// snapshot whose length is damaged comes back empty, which no frame check passes.
    pub fn snapshots(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        let view = self.read_view()?;
        let frames = view.snapshots()?;
        Ok(frames.into_iter().map(|(seq, frame)| (seq, frame.to_vec())).collect())
    }

    /// Runs `read` on the framed snapshot taken after `seq`, in place (no copy of what may be
    /// megabytes), within one read transaction. A snapshot whose length is damaged is read as
    /// empty, which no frame check passes.
    pub fn read_snapshot<T>(&self, seq: u64, read: impl FnOnce(Option<&[u8]>) -> T) -> Result<T> {
        let rtxn = self.env.read_txn().map_err(|e| self.err(e))?;
        let pages = self.file_pages();
        let frame = self.snapshots.get(&rtxn, &seq).map_err(|e| self.err(e))?;
        Ok(read(frame.map(|bytes| if pages.hold(bytes) { bytes } else { &[] })))
    }

    pub fn stats(&self) -> Result<StoreStats> {
        self.read_view()?.stats()
    }
}

/// Damage to LMDB's own pages, found by walking the data file ([`ReadView::page_damage`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageDamage {
    pub message: String,
    /// Whether the B-trees are whole (the damage is the free list's): reading them through
    /// LMDB is then safe.
    pub trees_readable: bool,
}

impl PageDamage {
    /// Walks the pages of the commit `txn_id` (else the newest) of the data file in `dir`,
    /// reading the file ([`pages::walk`]), and says what it found wrong.
    fn find(env: &Env<WithoutTls>, dir: &Path, txn_id: Option<u64>) -> Result<Option<PageDamage>> {
        let file = dir.join(DATA_FILE);
        let io = |source| Error::Io {
            path: file.clone(),
            source,
        };
        let data = std::fs::File::open(&file).map_err(io)?;
        let page_size = u64::from(env.stat().page_size);
        let pages = data.metadata().map_err(io)?.len() / page_size;
        PageDamage::of(pages::walk(&data, page_size as usize, pages, txn_id), &file)
    }

    /// What a walk of a commit's pages of the data file `file` found wrong.
    fn of(walked: std::result::Result<pages::Usage, pages::Unsound>, file: &Path) -> Result<Option<PageDamage>> {
        let usage = match walked {
            Ok(usage) => usage,
            Err(pages::Unsound::Io(source)) => {
                return Err(Error::Io {
                    path: file.to_path_buf(),
                    source,
                });
            }
            Err(pages::Unsound::PastEnd { page }) => {
                return Ok(Some(PageDamage::to_trees(format!(
                    "LMDB page {page}, which the data file's trees use, lies past the file's end"
                ))));
            }
            Err(pages::Unsound::Malformed { page, what }) => {
                return Ok(Some(PageDamage::to_trees(format!(
                    "LMDB page {page} of the data file is damaged: {what}"
                ))));
            }
        };
        let to_free_list = |message| PageDamage {
            message,
            trees_readable: true,
        };
        Ok(if let Some(page) = usage.free_in_use {
            Some(to_free_list(format!(
                "LMDB page {page} is both on the free list and in use: a later commit may write over \
                 what it holds"
            )))
        } else {
            usage.free_past_last.map(|page| {
                to_free_list(format!(
                    "LMDB's free list names page {page}, past the last page allocated ({}): it is damaged",
                    usage.last_page
                ))
            })
        })
    }

    fn to_trees(message: String) -> PageDamage {
        PageDamage {
            message,
            trees_readable: false,
        }
    }
}

/// The store as of one moment: one read transaction, in which every database is read. A check
/// across databases (`solo log verify`: the events against the blobs, the snapshots and the
/// remembered requests) needs it, as separate transactions would each see another moment of a
/// node writing meanwhile. Its scans stream: they hold nothing but the entry at hand.
///
/// It pins the pages of its moment for as long as it lives: a node writing meanwhile cannot
/// reuse them, so its data file grows instead (log-format.md §1). Keep one for one check, not
/// across waits on anything else (a reader of the output, say).
pub struct ReadView<'s> {
    store: &'s Store,
    rtxn: RoTxn<'s, WithoutTls>,
    /// The file's pages when the transaction began: they hold every value it reads.
    pages: FilePages,
}

impl std::fmt::Debug for ReadView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadView")
            .field("path", &self.store.path)
            .finish_non_exhaustive()
    }
}

impl ReadView<'_> {
    fn err(&self, e: heed::Error) -> Error {
        self.store.err(e)
    }

    /// Walks the data file's pages as of this view's commit, reading the file, not the map
    /// ([`pages`]): damage to LMDB's own structure, which its checksum-less reads could crash
    /// on, or which a later commit would spread (a page both free and in use, so the next
    /// commits may write over live data). `None` if the pages agree.
    pub fn page_damage(&self) -> Result<Option<PageDamage>> {
        PageDamage::find(&self.store.env, &self.store.path, Some(self.rtxn.id() as u64))
    }

    /// The seq of the last record, 0 for an empty log.
    pub fn head(&self) -> Result<u64> {
        let last = self.store.events.last(&self.rtxn).map_err(|e| self.err(e))?;
        Ok(last.map_or(0, |(seq, _)| seq))
    }

    /// Visits raw records (unchecked frames) of `range`, in order; for the offline tools, which
    /// report damage rather than stop at it.
    pub fn scan_raw(
        &self,
        range: RangeInclusive<u64>,
        mut each: impl FnMut(u64, &[u8]) -> std::ops::ControlFlow<()>,
    ) -> Result<()> {
        let mut next = *range.start();
        for item in self.store.events.range(&self.rtxn, &range).map_err(|e| self.err(e))? {
            let (seq, bytes) = item.map_err(|e| self.store.damaged_from(next, e))?;
            if !self.pages.hold(bytes) {
                return Err(past_the_end(seq));
            }
            if each(seq, bytes).is_break() {
                break;
            }
            next = seq + 1;
        }
        Ok(())
    }

    /// Visits every blob (key, bytes); a blob whose length is damaged comes as the reason it
    /// cannot be read.
    pub fn scan_blobs(&self, mut each: impl FnMut(&[u8], std::result::Result<&[u8], &str>)) -> Result<()> {
        for item in self.store.blobs.iter(&self.rtxn).map_err(|e| self.err(e))? {
            let (key, bytes) = item.map_err(|e| self.err(e))?;
            each(
                key,
                if self.pages.hold(bytes) {
                    Ok(bytes)
                } else {
                    Err(PAST_THE_END)
                },
            );
        }
        Ok(())
    }

    /// Visits every entry of the `requests` database, its value unframed; one whose frame is
    /// damaged comes as the reason it cannot be read.
    pub fn scan_requests(&self, mut each: impl FnMut(StoredRequest)) -> Result<()> {
        let Some(db) = self.store.requests else {
            return Ok(());
        };
        for item in db.iter(&self.rtxn).map_err(|e| self.err(e))? {
            let (key, value) = item.map_err(|e| self.err(e))?;
            let payload = if self.pages.hold(value) {
                frame::decode(value).map(<[u8]>::to_vec).map_err(|e| e.to_string())
            } else {
                Err(PAST_THE_END.to_string())
            };
            each((key.to_vec(), payload));
        }
        Ok(())
    }

    /// Every stored snapshot (seq and frame, read in place), newest first. A snapshot whose
    /// length is damaged comes back empty, which no frame check passes.
    pub fn snapshots(&self) -> Result<Vec<(u64, &[u8])>> {
        self.store
            .snapshots
            .rev_iter(&self.rtxn)
            .map_err(|e| self.err(e))?
            .map(|item| {
                item.map(|(seq, bytes)| (seq, if self.pages.hold(bytes) { bytes } else { &[] }))
                    .map_err(|e| self.err(e))
            })
            .collect()
    }

    pub fn stats(&self) -> Result<StoreStats> {
        let store = self.store;
        let mut stats = StoreStats {
            events: store.events.len(&self.rtxn).map_err(|e| self.err(e))?,
            map_size: store.map_size,
            file_bytes: std::fs::metadata(store.path.join(DATA_FILE)).map_or(0, |m| m.len()),
            ..StoreStats::default()
        };
        for item in store.blobs.iter(&self.rtxn).map_err(|e| self.err(e))? {
            let (_, bytes) = item.map_err(|e| self.err(e))?;
            stats.blobs += 1;
            stats.blob_bytes += bytes.len() as u64;
        }
        for item in store.snapshots.rev_iter(&self.rtxn).map_err(|e| self.err(e))? {
            let (seq, bytes) = item.map_err(|e| self.err(e))?;
            stats.snapshots.push((seq, bytes.len() as u64));
        }
        Ok(stats)
    }
}

fn past_the_end(seq: u64) -> Error {
    Error::UndecodableRecord {
        seq,
        reason: PAST_THE_END.into(),
    }
}

/// Refuses a data file cut short: one that ends before a page its newest commit uses. A file
/// that ends before the commit's last allocated page is walked (see [`pages`]): it is sound if
/// the pages past its end are only free ones, never written.
fn check_file_length(env: &Env<WithoutTls>, path: &Path) -> Result<()> {
    let file = path.join(DATA_FILE);
    let io = |source| Error::Io {
        path: file.clone(),
        source,
    };
    let data = std::fs::File::open(&file).map_err(io)?;
    let length = data.metadata().map_err(io)?.len();
    let pages = env.info().last_page_number as u64 + 1;
    let page_size = env.stat().page_size;
    let needed = pages.saturating_mul(u64::from(page_size));
    if length >= needed {
        return Ok(());
    }
    let cut_short = |detail: String| Error::Damaged {
        path: path.to_path_buf(),
        reason: format!(
            "{DATA_FILE} is {length} bytes, but its last commit holds {pages} pages ({needed} bytes), \
             {detail}: the file was cut short (an interrupted copy or restore?); restore it from a backup"
        ),
    };
    // A read transaction keeps a node writing beside a tool from reusing the pages walked.
    let pinned = env.read_txn().map_err(|e| Error::from_heed(e, path, 0))?;
    let txn_id = Some(pinned.id() as u64);
    match pages::walk(&data, page_size as usize, length / u64::from(page_size), txn_id) {
        Ok(pages::Usage { highest, .. }) => {
            tracing::info!(
                path = %file.display(),
                length,
                highest_used_page = highest,
                last_allocated_page = pages - 1,
                "the data file ends before its last commit's last page, which only free pages (never \
                 written) lie past: it is sound"
            );
            Ok(())
        }
        Err(pages::Unsound::PastEnd { page }) => {
            Err(cut_short(format!("and page {page} that it uses is past its end")))
        }
        Err(pages::Unsound::Malformed { page, what }) => Err(cut_short(format!(
            "and its pages cannot be walked to tell (page {page} is {what})"
        ))),
        Err(pages::Unsound::Io(source)) => Err(io(source)),
    }
}

/// Refuses, before LMDB reads any tree of it, a data file whose newest commit's pages are
/// damaged, as `solo log verify` finds them. LMDB keeps no checksums: a root or free list a
/// bit off would have it abort on an assertion, serve an older tree (or none, started afresh)
/// as the log under seqs already given out, or let the node's own commits write over
/// acknowledged events. One read of each page in use, done by a writer only: the offline
/// tools report damage rather than refuse it.
fn refuse_page_damage(env: &Env<WithoutTls>, path: &Path) -> Result<()> {
    if env.info().last_txn_id == 0 {
        return Ok(()); // A new data file: no commit yet.
    }
    let started = std::time::Instant::now();
    let damage = PageDamage::find(env, path, None)?;
    tracing::info!(
        took_ms = started.elapsed().as_millis() as u64,
        "walked the data file's pages in use"
    );
    match damage {
        None => Ok(()),
        Some(damage) => Err(Error::Damaged {
            path: path.to_path_buf(),
            reason: format!(
                "{}; the node will not build on it (`solo log verify` tells more): restore it from a backup",
                damage.message
            ),
        }),
    }
}

fn open_env(path: &Path, options: &StoreOptions, lock: bool) -> Result<Env<WithoutTls>> {
    let mut open = EnvOpenOptions::new().read_txn_without_tls();
    open.max_dbs(5).max_readers(options.max_readers);
    if options.read_only {
        // No map size: LMDB then maps what the data file records, which a writer raises to its
        // own map at each commit, so a reader maps all the writer may write and reports the
        // size the directory is really served with, whatever this process's config says.
        // SAFETY: READ_ONLY only restricts what this handle may do; NO_LOCK (the caller's
        // choice, see `open_unlocked`) leaves readers' safety to the caller.
        #[allow(unsafe_code)]
        unsafe {
            open.flags(if lock {
                EnvFlags::READ_ONLY
            } else {
                EnvFlags::READ_ONLY | EnvFlags::NO_LOCK
            });
        }
    } else {
        let page = 4096;
        let map_size = options.map_size.div_ceil(page) * page;
        open.map_size(usize::try_from(map_size).unwrap_or(usize::MAX));
    }
    // SAFETY: LMDB maps the file into memory; the file must not be modified other than through
    // LMDB. Only Solo opens this directory, always through this function, and LMDB's own lock
    // file coordinates the writer with readers in other processes (the offline tools).
    #[allow(unsafe_code)]
    let env = unsafe { open.open(path) };
    env.map_err(|e| match e {
        heed::Error::Mdb(heed::MdbError::Invalid | heed::MdbError::VersionMismatch) => Error::BadDataDir {
            path: path.to_path_buf(),
            reason: format!("data.mdb is not an LMDB file this build can read ({e})"),
        },
        e => Error::from_heed(e, path, options.map_size),
    })
}

type Databases = (
    Database<SeqKey, Bytes>,
    Database<Bytes, Bytes>,
    Database<SeqKey, Bytes>,
    Database<Str, Bytes>,
    Option<Database<Bytes, Bytes>>,
);

fn create_databases(env: &Env<WithoutTls>) -> heed::Result<Databases> {
    let mut wtxn = env.write_txn()?;
    let dbs = (
        env.create_database(&mut wtxn, Some(EVENTS_DB))?,
        env.create_database(&mut wtxn, Some(BLOBS_DB))?,
        env.create_database(&mut wtxn, Some(SNAPSHOTS_DB))?,
        env.create_database(&mut wtxn, Some(META_DB))?,
        Some(env.create_database(&mut wtxn, Some(REQUESTS_DB))?),
    );
    wtxn.commit()?;
    Ok(dbs)
}

fn open_databases(env: &Env<WithoutTls>, path: &Path) -> Result<Databases> {
    let lmdb = |source| Error::Lmdb {
        path: path.to_path_buf(),
        source,
    };
    let rtxn = env.read_txn().map_err(lmdb)?;
    let missing = |name: &str| Error::BadDataDir {
        path: path.to_path_buf(),
        reason: format!("it has no `{name}` database"),
    };
    let dbs = (
        env.open_database(&rtxn, Some(EVENTS_DB))
            .map_err(lmdb)?
            .ok_or_else(|| missing(EVENTS_DB))?,
        env.open_database(&rtxn, Some(BLOBS_DB))
            .map_err(lmdb)?
            .ok_or_else(|| missing(BLOBS_DB))?,
        env.open_database(&rtxn, Some(SNAPSHOTS_DB))
            .map_err(lmdb)?
            .ok_or_else(|| missing(SNAPSHOTS_DB))?,
        env.open_database(&rtxn, Some(META_DB))
            .map_err(lmdb)?
            .ok_or_else(|| missing(META_DB))?,
        env.open_database(&rtxn, Some(REQUESTS_DB)).map_err(lmdb)?,
    );
    rtxn.commit().map_err(lmdb)?;
    Ok(dbs)
}
