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
use tokio::sync::{Semaphore, watch};

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

/// `turns`: the turns at reading from disk this tail takes, if any.
pub(super) fn tail<R: Record>(
    log: Weak<Inner<R>>,
    mut head: watch::Receiver<u64>,
    from_seq: u64,
    turns: Option<Arc<Semaphore>>,
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
                    match read_from_disk(&log, next, end, turns.as_ref()).await {
                        Ok(batch) => batch,
                        Err(Error::Closed) => return,
                        Err(damage) => {
                            // The records before the damage are whole: they go out first, so a
                            // reader learns exactly where the log stops being readable.
                            if let Some(bad) = damage.damaged_seq().filter(|&bad| bad > next) {
                                match read_from_disk(&log, next, bad - 1, turns.as_ref()).await {
                                    Ok(whole) => {
                                        for record in whole {
                                            next = record.seq() + 1;
                                            yield record;
                                        }
                                    }
                                    Err(Error::Closed) => return,
                                    Err(e) => Err(e)?,
                                }
                            }
                            Err(damage)?
                        }
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

async fn read_from_disk<R: Record>(
    log: &Weak<Inner<R>>,
    from: u64,
    to: u64,
    turns: Option<&Arc<Semaphore>>,
) -> Result<Vec<Arc<R>>> {
    let log = log.clone();
    // Held by the read alone, not while the chunk is delivered: a reader that stalls holds
    // no one up.
    let turn = match turns {
        Some(turns) => Some(Arc::clone(turns).acquire_owned().await.map_err(|_| Error::Closed)?),
        None => None,
    };
    let batch = tokio::task::spawn_blocking(move || {
        let _turn = turn;
        match log.upgrade() {
            Some(inner) => inner.read(from..=to),
            None => Err(Error::Closed),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A record that is only its seq.
    #[derive(Debug, PartialEq)]
    struct Seq(u64);

    impl Record for Seq {
        fn seq(&self) -> u64 {
            self.0
        }

        fn encode_payload(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(&self.0.to_be_bytes());
        }

        fn decode_payload(payload: &[u8]) -> std::result::Result<Self, String> {
            let bytes = payload.try_into().map_err(|_| "not 8 bytes".to_string())?;
            Ok(Seq(u64::from_be_bytes(bytes)))
        }
    }

    fn records(seqs: std::ops::RangeInclusive<u64>) -> Vec<Arc<Seq>> {
        seqs.map(|seq| Arc::new(Seq(seq))).collect()
    }

    fn seqs(records: &[Arc<Seq>]) -> Vec<u64> {
        records.iter().map(|r| r.0).collect()
    }

    #[test]
    fn records_leaving_the_window_go_to_the_caller_oldest_first() {
        let window = Window::new(4);
        let mut evicted = Vec::new();
        window.push(&records(1..=3), &mut evicted);
        assert!(evicted.is_empty());
        window.push(&records(4..=6), &mut evicted);
        assert_eq!(seqs(&evicted), [1, 2]);
        assert_eq!(window.read_from(3, 10).map(|r| seqs(&r)), Some(vec![3, 4, 5, 6]));
        assert_eq!(window.read_from(2, 10), None, "an evicted seq is read from disk");

        // A batch larger than the window keeps only its newest records; the rest never enter.
        evicted.clear();
        window.push(&records(7..=12), &mut evicted);
        assert_eq!(seqs(&evicted), [3, 4, 5, 6]);
        assert_eq!(window.read_from(9, 10).map(|r| seqs(&r)), Some(vec![9, 10, 11, 12]));
    }

    #[test]
    fn a_window_of_zero_keeps_nothing_and_evicts_nothing() {
        let window = Window::new(0);
        let mut evicted = Vec::new();
        window.push(&records(1..=3), &mut evicted);
        assert!(evicted.is_empty());
        assert_eq!(window.read_from(1, 10), None);
    }
}
