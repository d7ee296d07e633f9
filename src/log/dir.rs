//! The data directory around LMDB's data file: what is checked before LMDB opens it, the one
//! writer's lock, LMDB's lock file made ready, and names made durable.

use std::path::Path;

use super::error::{Error, Result};
use super::store::DATA_FILE;

/// LMDB's lock file: its reader table, shared by the processes that open the directory.
pub const LMDB_LOCK_FILE: &str = "lock.mdb";

/// How long a directory lock held by this very process is waited for.
const OWN_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The file whose lock marks the directory's one writer.
const LOCK_FILE: &str = "solo.lock";

/// Takes the directory's writer lock, or says who holds it. LMDB's own lock file lets any
/// number of processes write in turn, which is right for its readers but would let a second
/// node append to the log behind the first one's back. The kernel drops the lock with its
/// holder, `kill -9` included, so a stale lock file never blocks a restart.
pub(super) fn lock_for_writing(path: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let lock_path = path.join(LOCK_FILE);
    let io = |source| Error::Io {
        path: lock_path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(io)?;
    // A lock this very process holds is a transient: LMDB has refused a second open of the
    // directory in this process already, so it is a store that is closing, or a child
    // process's copy of the descriptor between its fork and its exec. It is waited out.
    let own_deadline = std::time::Instant::now() + OWN_LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                file.rewind().map_err(io)?;
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                if holder == std::process::id().to_string() && std::time::Instant::now() < own_deadline {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    continue;
                }
                return Err(Error::InUse {
                    path: path.to_path_buf(),
                    holder: match holder {
                        "" => "a process that has not said which".to_string(),
                        pid => format!("process {pid}"),
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
    }
    // Who holds it, for the next one to be told; only a courtesy, the lock is what counts.
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    write!(file, "{}", std::process::id()).map_err(io)?;
    Ok(file)
}

/// LMDB's magic number, at the start of each of its two meta pages (after the page header).
const LMDB_MAGIC: u32 = 0xBEEF_C0DE;

/// Makes the names in `dir` durable (`.` for an empty path, a relative path's parent).
pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Refuses, before LMDB sees it (which would start a new log over an empty file, or create
/// its lock file beside a stranger's), a data file that is empty, is no LMDB file, or is
/// shorter than its two meta pages (a cut-short copy). A longer file cut short is found once
/// open (`check_file_length`). A directory without a data file passes: a writer starts one.
pub(super) fn check_data_file(dir: &Path) -> Result<()> {
    let file = dir.join(DATA_FILE);
    let io = |source| Error::Io {
        path: file.clone(),
        source,
    };
    let bad = |reason: String| Error::BadDataDir {
        path: dir.to_path_buf(),
        reason,
    };
    let damaged = |reason: String| Error::Damaged {
        path: dir.to_path_buf(),
        reason,
    };
    let mut data = match std::fs::File::open(&file) {
        // A node makes the data file before its lock file: with the lock file there, the data
        // file was lost, and a new log would start in its place as if nothing had been.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir.join(LOCK_FILE).exists() => {
            return Err(bad(format!(
                "its {DATA_FILE} is missing, though a node ran here ({LOCK_FILE} is there): whatever it \
                 held is gone; restore it from a backup, or remove {LOCK_FILE} too to start a new log"
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
        Ok(data) => data,
    };
    let length = data.metadata().map_err(io)?.len();
    if length == 0 {
        return Err(damaged(format!(
            "its {DATA_FILE} is empty (0 bytes): whatever it held is gone; restore it from a backup, \
             or move it away to start a new log"
        )));
    }
    // The first meta page: a 16-byte page header, then the magic, the version, the map's
    // address and size, and the page size (the free list's `md_pad`).
    let mut head = Vec::with_capacity(44);
    std::io::Read::read_to_end(&mut std::io::Read::take(&mut data, 44), &mut head).map_err(io)?;
    let word = |at: usize| {
        head.get(at..at + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().unwrap_or_default()))
    };
    if word(16) != Some(LMDB_MAGIC) {
        if let Some(page_size) = second_meta_page(&mut data).map_err(io)? {
            return Err(damaged(format!(
                "its {DATA_FILE} is an LMDB file (its second meta page, at byte {page_size}, says so) \
                 whose first meta page is damaged; restore it from a backup"
            )));
        }
        return Err(bad(format!(
            "its {DATA_FILE} is not an LMDB file, so it holds no Solo log"
        )));
    }
    let page_size = u64::from(word(40).unwrap_or(0)).max(512);
    if length < 2 * page_size {
        return Err(damaged(format!(
            "its {DATA_FILE} is {length} bytes, shorter than LMDB's two meta pages ({} bytes): the file \
             was cut short (an interrupted copy or restore?); restore it from a backup",
            2 * page_size
        )));
    }
    Ok(())
}

/// Where LMDB's second meta page starts, if `data` has one (its magic after a page header, at
/// one of the page sizes LMDB may use), whatever its first page holds.
fn second_meta_page(data: &mut std::fs::File) -> std::io::Result<Option<u64>> {
    use std::io::{Read, Seek, SeekFrom};
    for page_size in (9..=16).map(|shift| 1u64 << shift) {
        let mut magic = [0u8; 4];
        data.seek(SeekFrom::Start(page_size + 16))?;
        match data.read_exact(&mut magic) {
            Ok(()) if u32::from_ne_bytes(magic) == LMDB_MAGIC => return Ok(Some(page_size)),
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Bytes LMDB's lock file takes for `max_readers` reader slots (`mdb_env_setup_locks`): a
/// header of two cache-line-padded parts (the reader table's count and mutex, the writer's
/// mutex), then one cache line per slot.
fn lmdb_lock_file_bytes(max_readers: u32) -> u64 {
    const CACHE_LINE: u64 = 64;
    let mutex = std::mem::size_of::<libc::pthread_mutex_t>() as u64;
    // The magic and format (u32 each), the last txn id (u64) and the slots in use (u32, padded).
    let table = 24 + mutex;
    table.next_multiple_of(CACHE_LINE) + mutex.next_multiple_of(CACHE_LINE) + u64::from(max_readers) * CACHE_LINE
}

/// Gives LMDB's lock file its disk blocks before LMDB maps it. LMDB sizes the file with
/// `ftruncate`, which allocates nothing, and writes it only through its map: with no room
/// left on the disk, that first write kills the process with SIGBUS, and no error says why.
/// Allocated here, a full disk is an error that says so. A new file gets the size LMDB would
/// give it for `max_readers` slots, so LMDB keeps it and makes exactly as many; one already
/// there keeps its size (a process using it has mapped just that much) and has its holes
/// filled, which changes none of its bytes. Returns whether this call made the file.
pub(super) fn allocate_lmdb_lock_file(dir: &Path, max_readers: u32) -> Result<bool> {
    use std::io::ErrorKind;
    let path = dir.join(LMDB_LOCK_FILE);
    let io = |source| Error::Io {
        path: path.clone(),
        source,
    };
    let made = !path.exists();
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
    {
        Ok(file) => file,
        // Where this process may not write (another user's directory, a read-only mount), the
        // tools read without the lock file, and LMDB says what is wrong for the others.
        Err(e) if matches!(e.kind(), ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem) => {
            return Ok(false);
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Err(disk_full(dir)),
        Err(e) => return Err(io(e)),
    };
    let length = match file.metadata().map_err(io)?.len() {
        0 => lmdb_lock_file_bytes(max_readers),
        length => length,
    };
    match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, length) {
        Ok(()) => Ok(made),
        Err(rustix::io::Errno::NOSPC | rustix::io::Errno::DQUOT) => {
            drop(file);
            if made {
                // Still empty: no process can have mapped it.
                let _ = std::fs::remove_file(&path);
            }
            Err(disk_full(dir))
        }
        // A file system that cannot allocate ahead: LMDB's own way, as before.
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => Ok(made),
        Err(e) => Err(io(e.into())),
    }
}

fn disk_full(dir: &Path) -> Error {
    Error::DiskFull {
        path: dir.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size computed for a new lock file is the size LMDB gives one itself: LMDB keeps it,
    /// and makes neither more reader slots than asked nor a tail of unallocated ones.
    #[test]
    fn a_new_lock_file_has_the_size_lmdb_would_give_it() {
        for max_readers in [1, 4, 126, 1024] {
            let dir = tempfile::tempdir().unwrap();
            let mut options = heed::EnvOpenOptions::new().read_txn_without_tls();
            options.max_readers(max_readers);
            // SAFETY: a new environment in a private temp dir, opened once.
            #[allow(unsafe_code)]
            let env = unsafe { options.open(dir.path()) }.unwrap();
            let lmdb = std::fs::metadata(dir.path().join(LMDB_LOCK_FILE)).unwrap().len();
            assert_eq!(lmdb_lock_file_bytes(max_readers), lmdb, "{max_readers} readers");
            drop(env);

            let ours = tempfile::tempdir().unwrap();
            assert!(allocate_lmdb_lock_file(ours.path(), max_readers).unwrap());
            // SAFETY: as above.
            #[allow(unsafe_code)]
            let env = unsafe { options.open(ours.path()) }.unwrap();
            assert_eq!(env.max_readers(), max_readers);
            assert_eq!(std::fs::metadata(ours.path().join(LMDB_LOCK_FILE)).unwrap().len(), lmdb);
            assert!(
                !allocate_lmdb_lock_file(ours.path(), max_readers).unwrap(),
                "made twice"
            );
        }
    }
}
