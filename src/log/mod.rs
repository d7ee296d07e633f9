//! The durable, append-only log: the only source of truth.
//!
//! It owns the LMDB environment (`store`), the record frame (`frame`) and the fan-out to
//! tailers (`tail`). It stores opaque records keyed by a gap-free `u64` seq starting at 1, a
//! content-addressed blob store and snapshots; it knows nothing of services. What a record
//! means is the business of the [`Record`] implementation handed to it.

mod dir;
mod error;
pub mod frame;
mod pages;
mod store;
mod tail;

use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

pub use error::{Error, Result};
pub use frame::FrameError;
pub use store::{
    BLOBS_DB, BlobChanges, BlobRef, DATA_FILE, EVENTS_DB, FORMAT_VERSION, META_CREATED_AT_MS, META_DB,
    META_FORMAT_VERSION, META_NODE_ID, NodeMeta, OLDEST_FORMAT_VERSION, PageDamage, REQUESTS_DB, ReadView,
    RequestChanges, SNAPSHOTS_DB, Store, StoreOptions, StoreStats, StoredRequest,
};

use tail::Window;

/// A record the log can hold: it knows its seq and its payload encoding.
pub trait Record: Send + Sync + Sized + 'static {
    fn seq(&self) -> u64;
    /// Appends the payload bytes to `out`.
    fn encode_payload(&self, out: &mut Vec<u8>);
    fn decode_payload(payload: &[u8]) -> std::result::Result<Self, String>;
}

/// How the log is opened and how its tailers behave.
#[derive(Debug, Clone)]
pub struct LogOptions {
    pub store: StoreOptions,
    /// Most recent records kept in memory for tailers, decoded once and shared.
    pub tail_window: usize,
    /// Records a tailer behind the window reads from disk per read transaction.
    pub tail_read_chunk: usize,
    /// Tailers that may read from disk at once; the others wait their turn, chunk by chunk.
    pub tail_disk_readers: usize,
}

/// A handle to the log. Clones share one environment; only one appender may run at a time.
#[derive(Debug)]
pub struct Log<R> {
    inner: Arc<Inner<R>>,
}

impl<R> Clone for Log<R> {
    fn clone(&self) -> Self {
        Log {
            inner: Arc::clone(&self.inner),
        }
    }
}

#[derive(Debug)]
struct Inner<R> {
    store: Store,
    window: Window<R>,
    /// The published head. Moved after the window holds the new records, so a tailer woken by
    /// it finds them in memory.
    head: watch::Sender<u64>,
    /// The last durable seq; runs ahead of `head` between an append and its publication.
    durable: AtomicU64,
    /// Serialises appends: seqs are assigned by the caller and checked against the head here.
    append_lock: Mutex<()>,
    read_chunk: usize,
    /// Turns at reading a chunk from disk. Replays of history take them in turn, as etcd's
    /// unsynced watchers are caught up by one loop: hundreds of replays on as many blocking
    /// threads starved the writer and every request of CPU (deploys took 1.5 s under 200).
    /// Its own `Arc`: a tailer waiting for a turn must not keep a closed log open.
    disk_reads: Arc<tokio::sync::Semaphore>,
}

impl<R: Record> Log<R> {
    /// Opens (or creates) the log in `dir`. Blocking.
    pub fn open(dir: &Path, options: &LogOptions) -> Result<Log<R>> {
        let store = Store::open(dir, &options.store)?;
        let head = store.head()?;
        Ok(Log {
            inner: Arc::new(Inner {
                store,
                window: Window::new(options.tail_window),
                head: watch::Sender::new(head),
                durable: AtomicU64::new(head),
                append_lock: Mutex::new(()),
                read_chunk: options.tail_read_chunk.max(1),
                disk_reads: Arc::new(tokio::sync::Semaphore::new(options.tail_disk_readers.max(1))),
            }),
        })
    }

    /// The seq of the last published record; 0 when the log is empty.
    pub fn head(&self) -> u64 {
        *self.inner.head.borrow()
    }

    /// Whether every handle to this log has been dropped, which closes the LMDB environment:
    /// only then can the data directory be opened again in this process.
    pub fn closed_signal(&self) -> impl Fn() -> bool + Send + Sync + 'static + use<R> {
        let inner = Arc::downgrade(&self.inner);
        move || inner.strong_count() == 0
    }

    /// A receiver that changes whenever the head moves.
    pub fn subscribe_head(&self) -> watch::Receiver<u64> {
        self.inner.head.subscribe()
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Appends the records of `batch` (whose seqs must continue the log) and makes the `blobs`
    /// and `requests` changes in one write transaction and one durable commit; a batch with no
    /// records commits the changes alone, if there are any. Blocking. On error nothing was
    /// written.
    ///
    /// The records are durable but not yet visible: [`Log::publish`] shows them to tailers,
    /// once the appender has done what must happen before anyone hears of them.
    pub fn append(&self, batch: &Batch<R>, blobs: BlobChanges<'_>, requests: RequestChanges<'_>) -> Result<u64> {
        let records = batch.records();
        let _appending = self
            .inner
            .append_lock
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let durable = self.inner.durable.load(Ordering::Acquire);
        let Some(first) = records.first() else {
            if !requests.is_empty() || !blobs.is_empty() {
                self.inner
                    .store
                    .append(durable + 1, std::iter::empty(), blobs, requests)?;
            }
            return Ok(durable);
        };
        for (expected, record) in (durable + 1..).zip(records) {
            if record.seq() != expected {
                return Err(Error::OutOfOrder {
                    expected,
                    found: record.seq(),
                });
            }
        }
        self.inner.store.append(first.seq(), batch.frames(), blobs, requests)?;
        let new_durable = durable + records.len() as u64;
        self.inner.durable.store(new_durable, Ordering::Release);
        Ok(new_durable)
    }

    /// Makes appended records visible to tailers and moves the head past them. Records must be
    /// published in the order they were appended. Records that leave the in-memory window move
    /// into `evicted`, so that the caller chooses when to pay for freeing them (the writer does
    /// so once its callers are answered), and tailers never wait on it.
    pub fn publish(&self, records: &[Arc<R>], evicted: &mut Vec<Arc<R>>) {
        let Some(last) = records.last() else { return };
        debug_assert!(
            last.seq() <= self.inner.durable.load(Ordering::Acquire),
            "published before it was durable"
        );
        self.inner.window.push(records, evicted);
        self.inner.head.send_replace(last.seq());
    }

    /// Reads and decodes `range` (inclusive), checking every frame. Blocking.
    pub fn read(&self, range: RangeInclusive<u64>) -> Result<Vec<Arc<R>>> {
        self.inner.read(range)
    }

    /// An endless stream of committed records from `from_seq` on (inclusive; 0 and 1 both mean
    /// the first record), in order, each once. When caught up it waits for the head to move. A
    /// slow consumer only falls behind and then reads from disk; it never blocks the appender.
    /// The stream ends when the log is closed.
    ///
    /// Reads from disk take turns with every other such tail's (`tail_disk_readers`).
    pub fn tail(&self, from_seq: u64) -> impl futures_util::Stream<Item = Result<Arc<R>>> + Send + 'static + use<R> {
        tail::tail(
            Arc::downgrade(&self.inner),
            self.inner.head.subscribe(),
            from_seq.max(1),
            Some(Arc::clone(&self.inner.disk_reads)),
        )
    }

    /// A [`Log::tail`] for the node's own follower of the log (the runtime's reconciler), whose
    /// reads from disk never wait behind clients' replays: calls and deploys wait on it.
    pub fn tail_without_turns(
        &self,
        from_seq: u64,
    ) -> impl futures_util::Stream<Item = Result<Arc<R>>> + Send + 'static + use<R> {
        tail::tail(
            Arc::downgrade(&self.inner),
            self.inner.head.subscribe(),
            from_seq.max(1),
            None,
        )
    }
}

/// Records on their way into the log, each framed as it is added: the encoding happens as a
/// batch is gathered, not inside the write transaction. The frames share one buffer.
#[derive(Debug)]
pub struct Batch<R> {
    records: Vec<Arc<R>>,
    frames: Vec<u8>,
    /// Where each record's frame ends in `frames`.
    frame_ends: Vec<usize>,
}

impl<R: Record> Batch<R> {
    pub fn with_capacity(records: usize) -> Batch<R> {
        Batch {
            records: Vec::with_capacity(records),
            frames: Vec::with_capacity(records * 128),
            frame_ends: Vec::with_capacity(records),
        }
    }

    pub fn push(&mut self, record: Arc<R>) {
        frame::append_with(&mut self.frames, |out| record.encode_payload(out));
        self.frame_ends.push(self.frames.len());
        self.records.push(record);
    }

    pub fn records(&self) -> &[Arc<R>] {
        &self.records
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn clear(&mut self) {
        self.records.clear();
        self.frames.clear();
        self.frame_ends.clear();
    }

    /// The framed records, in order.
    /// Bytes of the batch's framed records.
    pub fn frames_len(&self) -> usize {
        self.frames.len()
    }

    fn frames(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.frame_ends.iter().copied());
        starts
            .zip(&self.frame_ends)
            .map(|(start, &end)| &self.frames[start..end])
    }
}

impl<R: Record> FromIterator<Arc<R>> for Batch<R> {
    fn from_iter<I: IntoIterator<Item = Arc<R>>>(records: I) -> Batch<R> {
        let records = records.into_iter();
        let mut batch = Batch::with_capacity(records.size_hint().0);
        records.for_each(|record| batch.push(record));
        batch
    }
}

impl<R: Record> Inner<R> {
    fn read(&self, range: RangeInclusive<u64>) -> Result<Vec<Arc<R>>> {
        self.store.read_frames(range, |seq, payload| {
            let record = R::decode_payload(payload).map_err(|reason| Error::UndecodableRecord { seq, reason })?;
            if record.seq() != seq {
                return Err(Error::UndecodableRecord {
                    seq,
                    reason: format!("payload says seq {}", record.seq()),
                });
            }
            Ok(Arc::new(record))
        })
    }
}
