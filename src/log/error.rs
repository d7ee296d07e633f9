//! The log's error type: every way storage can fail, each with a message a person can act on.

use std::path::PathBuf;

use super::frame::FrameError;

/// ENOSPC: LMDB reports a full disk as this errno.
const ENOSPC: i32 = 28;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the log's map is full ({map_size_mb} MiB used up); raise [database] map_size_mb and restart \
         (it reserves address space, not disk); nothing of the failed batch was written"
    )]
    MapFull { map_size_mb: u64 },
    #[error("the disk holding {path} is full; free some space and retry (nothing of the failed batch was written)")]
    DiskFull { path: PathBuf },
    #[error("I/O error on the data directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "data directory {path} has format version {found}, but this build of Solo reads version \
         {supported}; use a matching Solo release"
    )]
    UnsupportedFormat { path: PathBuf, found: u32, supported: u32 },
    #[error("data directory {path} is not usable: {reason}")]
    BadDataDir { path: PathBuf, reason: String },
    #[error("data directory {path} is already open in this process")]
    AlreadyOpen { path: PathBuf },
    #[error("record {seq} is corrupt: {source}")]
    CorruptRecord {
        seq: u64,
        #[source]
        source: FrameError,
    },
    #[error("record {seq} does not decode: {reason}")]
    UndecodableRecord { seq: u64, reason: String },
    #[error("record {seq} is missing: the log has a gap")]
    MissingRecord { seq: u64 },
    #[error("append out of order: the next seq is {expected}, the batch starts at {found}")]
    OutOfOrder { expected: u64, found: u64 },
    #[error("record {seq} is not past the last record of the log")]
    NotPastHead { seq: u64 },
    #[error("too many concurrent readers of the log; raise [database] max_readers")]
    ReadersFull,
    #[error("the log is closed")]
    Closed,
    #[error("LMDB error on {path}: {source}")]
    Lmdb {
        path: PathBuf,
        #[source]
        source: heed::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Classifies a heed error: the cases an operator can fix get their own variant.
    pub(crate) fn from_heed(source: heed::Error, path: &std::path::Path, map_size: u64) -> Error {
        use heed::MdbError;
        let path = path.to_path_buf();
        match source {
            heed::Error::Mdb(MdbError::MapFull) => Error::MapFull {
                map_size_mb: map_size >> 20,
            },
            heed::Error::Mdb(MdbError::ReadersFull) => Error::ReadersFull,
            heed::Error::Mdb(MdbError::Other(ENOSPC)) => Error::DiskFull { path },
            heed::Error::Io(source) if source.raw_os_error() == Some(ENOSPC) => Error::DiskFull { path },
            heed::Error::Io(source) => Error::Io { path, source },
            heed::Error::EnvAlreadyOpened => Error::AlreadyOpen { path },
            source => Error::Lmdb { path, source },
        }
    }
}
