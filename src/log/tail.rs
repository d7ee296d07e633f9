//! Fan-out of committed records to any number of tailers.
//!
//! The newest records live in a bounded in-memory window shared by every tailer (decoded
//! once). A tailer inside the window copies `Arc`s out under a short read lock; a tailer that
//! fell behind it reads LMDB in chunks, one short read transaction each, on the blocking pool,
//! until it is back inside (etcd's synced and unsynced watchers work this way). Caught-up
//! tailers wait on the head watch channel.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock, Weak};

use futures_util::Stream;
use tokio::sync::watch;

use super::{Error, Inner, Record, Result};

/// Records handed to a tailer per turn, so one tailer cannot hog the window lock.
const WINDOW_BATCH: usize = 512;

#[derive(Debug)]
pub(super) struct Window<R> {
    capacity: usize,
    /// Why a std lock: it is held for a few pointer copies and never across an `.await`.
    records: RwLock<VecDeque<Arc<R>>>,
}

impl<R: Record> Window<R> {
    pub(super) fn new(capacity: usize) -> Self {
        Window {
            capacity,
            records: RwLock::new(VecDeque::with_capacity(capacity.min(1 << 16))),
        }
    }

    /// Adds freshly committed records; the oldest beyond the capacity move to `evicted`.
    pub(super) fn push(&self, records: &[Arc<R>], evicted: &mut Vec<Arc<R>>) {
        if self.capacity == 0 {
            return;
        }
        let mut window = self.records.write().unwrap_or_else(|poison| poison.into_inner());
        let keep = records.len().min(self.capacity);
        let overflow = (window.len() + keep).saturating_sub(self.capacity);
        evicted.extend(window.drain(..overflow));
        window.extend(records[records.len() - keep..].iter().cloned());
    }

    /// Up to `max` records from `from` on, or `None` when `from` is no longer (or not yet) in
    /// memory and must be read from disk.
    fn read_from(&self, from: u64, max: usize) -> Option<Vec<Arc<R>>> {
        let window = self.records.read().unwrap_or_else(|poison| poison.into_inner());
        let oldest = window.front()?.seq();
        let newest = window.back()?.seq();
        if from < oldest || from > newest {
            return None;
        }
        let start = (from - oldest) as usize;
        Some(window.range(start..).take(max).cloned().collect())
    }
}

pub(super) fn tail<R: Record>(
    log: Weak<Inner<R>>,
    mut head: watch::Receiver<u64>,
    from_seq: u64,
) -> impl Stream<Item = Result<Arc<R>>> + Send + 'static {
    async_stream::try_stream! {
        let mut next = from_seq;
        loop {
            let committed = *head.borrow_and_update();
            if next > committed {
                if head.changed().await.is_err() {
                    return; // the log was closed
                }
                continue;
            }
            // The strong handle is dropped before yielding: a slow consumer must not keep a
            // closed log open.
            let in_memory = {
                let Some(inner) = log.upgrade() else { return };
                inner.window.read_from(next, WINDOW_BATCH).ok_or(inner.read_chunk)
            };
            let batch = match in_memory {
                Ok(batch) => batch,
                Err(chunk) => {
                    let end = committed.min(next.saturating_add(chunk as u64 - 1));
                    match read_from_disk(&log, next, end).await {
                        Err(Error::Closed) => return,
                        batch => batch?,
                    }
                }
            };
            for record in batch {
                next = record.seq() + 1;
                yield record;
            }
        }
    }
}

async fn read_from_disk<R: Record>(log: &Weak<Inner<R>>, from: u64, to: u64) -> Result<Vec<Arc<R>>> {
    let log = log.clone();
    let batch = tokio::task::spawn_blocking(move || match log.upgrade() {
        Some(inner) => inner.read(from..=to),
        None => Err(Error::Closed),
    })
    .await
    .map_err(|_| Error::Closed)??;
    // Every seq up to the committed head exists; a short read means a hole in the log.
    if batch.len() as u64 != to - from + 1 {
        return Err(Error::MissingRecord {
            seq: from + batch.len() as u64,
        });
    }
    Ok(batch)
}
