//! The log's error type: every way storage can fail, each with a message a person can act on.

use std::path::PathBuf;

use super::frame::FrameError;

/// A full disk, when a write finds no room at all.
const ENOSPC: i32 = 28;
/// What LMDB reports when a write is cut short (it cannot tell why); also a device's own error.
const EIO: i32 = 5;
/// A write past the process's file size limit (with SIGXFSZ ignored).
const EFBIG: i32 = 27;

/// Room left below which a write cut short is put down to a full disk or a reached file size
/// limit: the write that was cut short has just used up the rest.
const NEARLY_OUT_OF_ROOM: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the log's map is full ({map_size_mb} MiB used up); raise [database] map_size_mb and restart \
         (it reserves address space, not disk); nothing of the failed batch was written"
    )]
    MapFull { map_size_mb: u64 },
    #[error("the disk holding {path} is full; free some space and retry (nothing of the failed batch was written)")]
    DiskFull { path: PathBuf },
    #[error(
        "the log file in {path} reached this process's file size limit of {limit_bytes} bytes \
         (`ulimit -f`); raise the limit and restart (nothing of the failed batch was written)"
    )]
    FileSizeLimit { path: PathBuf, limit_bytes: u64 },
    #[error("I/O error on the data directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "data directory {path} has format version {found}, but this build of Solo reads versions \
         up to {supported}; use a matching Solo release"
    )]
    UnsupportedFormat { path: PathBuf, found: u32, supported: u32 },
    #[error("data directory {path} is not usable: {reason}")]
    BadDataDir { path: PathBuf, reason: String },
    /// The data file is damaged as a whole (cut short, emptied, or its pages in use unsound),
    /// not in one record: the reason says where, and that a backup repairs it.
    #[error("data directory {path} is not usable: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("data directory {path} is already open in this process")]
    AlreadyOpen { path: PathBuf },
    #[error(
        "data directory {path} is in use by another node ({holder}); two nodes writing one log \
         would each miss the other's events. Stop that node first; `solo log` tools read a \
         directory in use safely"
    )]
    InUse { path: PathBuf, holder: String },
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
    /// Whether the data file is damaged (in a record, or as a whole), as opposed to unusable
    /// for another reason (not a Solo log, in use, a full disk).
    pub fn is_damage(&self) -> bool {
        matches!(self, Error::Damaged { .. }) || self.damaged_seq().is_some()
    }

    /// The record that is damaged or missing, for an error about one.
    pub fn damaged_seq(&self) -> Option<u64> {
        match self {
            Error::CorruptRecord { seq, .. } | Error::UndecodableRecord { seq, .. } | Error::MissingRecord { seq } => {
                Some(*seq)
            }
            _ => None,
        }
    }
}

impl Error {
    /// The error as the APIs tell it to clients: as [`Display`](std::fmt::Display), without
    /// the node's own paths (where its data lives is the operator's business, who reads it in
    /// the node's log and `/health`).
    pub fn for_clients(&self) -> String {
        match self {
            Error::DiskFull { .. } => {
                "the node's disk is full; retry once it has room (nothing of the failed batch was written)".into()
            }
            Error::FileSizeLimit { limit_bytes, .. } => format!(
                "the node's log file reached its file size limit of {limit_bytes} bytes; retry once the operator \
                 has raised it (nothing of the failed batch was written)"
            ),
            Error::Io { .. }
            | Error::BadDataDir { .. }
            | Error::Damaged { .. }
            | Error::AlreadyOpen { .. }
            | Error::InUse { .. }
            | Error::Lmdb { .. } => "an error in the node's storage (its operator finds it in the node's log)".into(),
            other => other.to_string(),
        }
    }

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

    /// As `from_heed`, for a failed commit: a write cut short, or refused for the file size
    /// limit, is told apart from a device error by the room left.
    pub(crate) fn from_commit(source: heed::Error, path: &std::path::Path, map_size: u64) -> Error {
        match os_error(&source).and_then(|code| out_of_room(code, path)) {
            Some(error) => error,
            None => Error::from_heed(source, path, map_size),
        }
    }
}

/// The errno a heed error carries, if any.
fn os_error(error: &heed::Error) -> Option<i32> {
    match error {
        heed::Error::Mdb(heed::MdbError::Other(code)) => Some(*code),
        heed::Error::Io(error) => error.raw_os_error(),
        _ => None,
    }
}

/// Whether a failed write in `dir` ran out of room, on the disk or under the file size limit.
/// LMDB reports a write the kernel cut short as EIO, as it does a device error: what room is
/// left tells them apart.
fn out_of_room(code: i32, dir: &std::path::Path) -> Option<Error> {
    let file_size_limit = || {
        let limit_bytes = rustix::process::getrlimit(rustix::process::Resource::Fsize).current?;
        let size = std::fs::metadata(dir.join(super::store::DATA_FILE)).ok()?.len();
        (size.saturating_add(NEARLY_OUT_OF_ROOM) >= limit_bytes).then(|| Error::FileSizeLimit {
            path: dir.to_path_buf(),
            limit_bytes,
        })
    };
    let disk_full = || {
        let fs = rustix::fs::statvfs(dir).ok()?;
        (fs.f_bavail.saturating_mul(fs.f_frsize) < NEARLY_OUT_OF_ROOM).then(|| Error::DiskFull {
            path: dir.to_path_buf(),
        })
    };
    match code {
        EFBIG => file_size_limit(),
        EIO => disk_full().or_else(file_size_limit),
        _ => None,
    }
}
