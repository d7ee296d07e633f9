//! The pages an LMDB data file's newest commit uses, found by reading the file (not the map).
//!
//! A commit records the highest page number it has allocated, and a data file may well end
//! before it: pages a transaction allocated and freed again before its commit (LMDB's loose
//! pages) go on the free list without ever being written, so the file ends at the last page
//! written. A node killed right after such a commit (a full disk makes it likely) leaves such a
//! file, and it is sound. A copy cut short is not: a page its trees use lies past its end,
//! where reading through the map would kill the process with SIGBUS. Only a walk of the trees
//! tells the two apart. It reads every branch and leaf page once (about 30 ms for a million
//! events). It is done for a file shorter than its commit's page count, by a node as it opens
//! its data directory to write (LMDB has no checksums of its own: a damaged root or free list
//! would have it build on damage), and by `solo log verify`.
//!
//! The layout read here is LMDB's on-disk format on a 64-bit build (`mdb.c`): a page header
//! of 16 bytes (page number, padding, flags, then the free space's bounds or, for an overflow
//! page, the count of pages), then for branch and leaf pages 2-byte offsets of their nodes.

use std::fs::File;
use std::os::unix::fs::FileExt;

const PAGE_HEADER: usize = 16;
const P_BRANCH: u16 = 0x01;
const P_LEAF: u16 = 0x02;
const P_OVERFLOW: u16 = 0x04;
/// A node's data is in overflow pages: its data holds the first one's number.
const F_BIGDATA: u16 = 0x01;
/// A node's data is a named database's record (`MDB_db`), whose root is at byte 40.
const F_SUBDATA: u16 = 0x02;
/// A node's data is a sorted-duplicates sub-page or sub-tree (no database here uses them).
const F_DUPDATA: u16 = 0x04;
/// An empty tree's root.
const P_INVALID: u64 = u64::MAX;
/// In a meta page, after its page header: the free list's and the main database's records
/// (`MDB_db`, 48 bytes each, root at byte 40), then the last page number and the txn id.
const META_FREE_ROOT: usize = PAGE_HEADER + 24 + 40;
const META_MAIN_ROOT: usize = PAGE_HEADER + 24 + 48 + 40;
const META_LAST_PAGE: usize = PAGE_HEADER + 24 + 96;
const META_TXN_ID: usize = META_LAST_PAGE + 8;

/// Why the walk found the file unsound.
#[derive(Debug)]
pub(super) enum Unsound {
    /// A page the trees use lies past the end of the file: it was cut short.
    PastEnd {
        page: u64,
    },
    /// A page is not what the tree that points to it says it is.
    Malformed {
        page: u64,
        what: &'static str,
    },
    Io(std::io::Error),
}

/// What the newest commit uses of the file, as a walk of its trees found it.
#[derive(Debug)]
pub(super) struct Usage {
    /// The highest page number the trees use (their overflow pages included).
    pub highest: u64,
    /// The commit's last allocated page.
    pub last_page: u64,
    /// The pages the free list holds, as it lists them.
    #[cfg_attr(not(test), allow(dead_code))]
    pub free: Vec<u64>,
    /// Where in the file the free list's first page number is, if it is on a leaf page.
    #[cfg_attr(not(test), allow(dead_code))]
    pub free_listed_at: Option<u64>,
    /// A page both on the free list and in use: a later commit may write over what it holds.
    pub free_in_use: Option<u64>,
    /// A page on the free list past the last allocated one: the free list is damaged.
    pub free_past_last: Option<u64>,
}

/// Walks every tree of a commit, and its free list: which pages it uses, and whether the free
/// list and the trees agree. The commit is the one with txn id `txn_id` if a meta page still
/// names it (a read transaction's, which keeps a writer beside it from reusing the pages it
/// walks), else the newest. `file` is `pages` pages of `page_size` bytes long.
pub(super) fn walk(file: &File, page_size: usize, pages: u64, txn_id: Option<u64>) -> Result<Usage, Unsound> {
    let mut walk = Walk {
        file,
        page_size,
        pages,
        seen: vec![0u64; pages.div_ceil(64) as usize],
        buffer: vec![0u8; page_size],
        highest: 1,
        free: Vec::new(),
        free_listed_at: None,
    };
    // The newer of the two meta pages is the newest commit, as LMDB itself picks it.
    let mut metas = Vec::with_capacity(2);
    for meta in 0..2u64 {
        walk.read(meta)?;
        walk.mark(meta)?;
        let word = |at: usize| u64::from_le_bytes(walk.buffer[at..at + 8].try_into().expect("8 bytes"));
        metas.push((
            word(META_TXN_ID),
            meta,
            word(META_LAST_PAGE),
            word(META_FREE_ROOT),
            word(META_MAIN_ROOT),
        ));
    }
    let newest = metas.iter().copied().max().expect("two metas");
    let (_, _, last_page, free_root, main_root) = metas.into_iter().find(|m| Some(m.0) == txn_id).unwrap_or(newest);
    let mut roots = vec![(free_root, true), (main_root, false)];
    while let Some((root, free)) = roots.pop() {
        walk.tree(root, free, &mut roots)?;
    }
    let free = std::mem::take(&mut walk.free);
    Ok(Usage {
        highest: walk.highest,
        last_page,
        free_in_use: free.iter().copied().find(|&page| walk.is_seen(page)),
        free_past_last: free.iter().copied().find(|&page| page > last_page),
        free,
        free_listed_at: walk.free_listed_at,
    })
}

struct Walk<'a> {
    file: &'a File,
    page_size: usize,
    pages: u64,
    /// Pages read, one bit each: a damaged tree that points back into itself ends.
    seen: Vec<u64>,
    buffer: Vec<u8>,
    highest: u64,
    /// The pages the free list holds.
    free: Vec<u64>,
    free_listed_at: Option<u64>,
}

impl Walk<'_> {
    fn read(&mut self, page: u64) -> Result<(), Unsound> {
        if page >= self.pages {
            return Err(Unsound::PastEnd { page });
        }
        self.highest = self.highest.max(page);
        self.file
            .read_exact_at(&mut self.buffer, page * self.page_size as u64)
            .map_err(Unsound::Io)
    }

    fn is_seen(&self, page: u64) -> bool {
        self.seen
            .get((page / 64) as usize)
            .is_some_and(|word| word & (1 << (page % 64)) != 0)
    }

    /// Marks `page` as in use; a page in use twice is damage.
    fn mark(&mut self, page: u64) -> Result<(), Unsound> {
        if page >= self.pages {
            return Err(Unsound::PastEnd { page });
        }
        if self.is_seen(page) {
            return Err(Unsound::Malformed {
                page,
                what: "a page two trees (or one twice) use",
            });
        }
        self.seen[(page / 64) as usize] |= 1 << (page % 64);
        Ok(())
    }

    /// Walks the tree at `root`, adding the roots of the named databases it holds to `roots`;
    /// `free`: the free list's tree, whose values are lists of free pages.
    fn tree(&mut self, root: u64, free: bool, roots: &mut Vec<(u64, bool)>) -> Result<(), Unsound> {
        if root == P_INVALID {
            return Ok(());
        }
        let mut stack = vec![root];
        while let Some(page) = stack.pop() {
            self.mark(page)?;
            self.read(page)?;
            let malformed = |what| Unsound::Malformed { page, what };
            let half = |at: usize| u16::from_le_bytes([self.buffer[at], self.buffer[at + 1]]);
            if u64::from_le_bytes(self.buffer[..8].try_into().expect("8 bytes")) != page {
                return Err(malformed("a page whose header names another page"));
            }
            let flags = half(10);
            let (lower, upper) = (usize::from(half(12)), usize::from(half(14)));
            let mut overflows = Vec::new();
            // On disk a tree page is a branch or a leaf page, and nothing else (LMDB's other
            // flags live in memory only, or mark pages of kinds no Solo database has).
            if flags != P_BRANCH && flags != P_LEAF {
                return Err(malformed("not a branch or leaf page"));
            }
            // Node offsets, then free space, then the nodes: LMDB trusts these bounds, and one
            // out of place sends its next write, or its reads, past the page.
            if lower < PAGE_HEADER || lower > upper || upper > self.page_size {
                return Err(malformed("a page whose free space is out of bounds"));
            }
            for index in 0..(lower - PAGE_HEADER) / 2 {
                let node = usize::from(half(PAGE_HEADER + 2 * index));
                if node < upper || node + 8 > self.page_size {
                    return Err(malformed("a node outside the page's node area"));
                }
                let (lo, hi, node_flags, key_size) = (half(node), half(node + 2), half(node + 4), half(node + 6));
                if flags & P_BRANCH != 0 {
                    stack.push(u64::from(lo) | u64::from(hi) << 16 | u64::from(node_flags) << 32);
                    continue;
                }
                let data = node + 8 + usize::from(key_size);
                // A value's length past its page is not the tree's damage but the value's: the
                // reads of records, modules and snapshots check what they read, and name it.
                let size = usize::from(lo) | usize::from(hi) << 16;
                let field = |at: usize| {
                    self.buffer
                        .get(data + at..data + at + 8)
                        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                        .ok_or(malformed("a node's data past the page's end"))
                };
                if node_flags & F_DUPDATA != 0 {
                    return Err(malformed("sorted duplicates, which no Solo database has"));
                } else if node_flags & F_SUBDATA != 0 {
                    roots.push((field(40)?, false));
                } else if node_flags & F_BIGDATA != 0 {
                    overflows.push((field(0)?, size));
                } else if free {
                    let list = self
                        .buffer
                        .get(data..data + size)
                        .ok_or(malformed("a node's data past the page's end"))?;
                    let pages = free_list(list).ok_or(malformed("a free list that does not read"))?;
                    if self.free.is_empty() && size > 8 {
                        self.free_listed_at = Some(page * self.page_size as u64 + data as u64 + 8);
                    }
                    self.free.extend(pages);
                }
            }
            // Read once done with this page: reading them takes the buffer.
            for (first, size) in overflows {
                self.overflow(first)?;
                if free {
                    let mut list = vec![0u8; size];
                    self.file
                        .read_exact_at(&mut list, first * self.page_size as u64 + PAGE_HEADER as u64)
                        .map_err(Unsound::Io)?;
                    let pages = free_list(&list).ok_or(Unsound::Malformed {
                        page: first,
                        what: "a free list that does not read",
                    })?;
                    self.free.extend(pages);
                }
            }
        }
        Ok(())
    }

    /// Checks the overflow pages starting at `first` (read from its header) lie in the file,
    /// and marks them in use.
    fn overflow(&mut self, first: u64) -> Result<(), Unsound> {
        self.read(first)?;
        let flags = u16::from_le_bytes([self.buffer[10], self.buffer[11]]);
        if flags != P_OVERFLOW {
            return Err(Unsound::Malformed {
                page: first,
                what: "a value's first page that is no overflow page",
            });
        }
        let count = u32::from_le_bytes(self.buffer[12..16].try_into().expect("4 bytes"));
        let last = first + u64::from(count.max(1)) - 1;
        if last >= self.pages {
            return Err(Unsound::PastEnd { page: last });
        }
        for page in first..=last {
            self.mark(page)?;
        }
        self.highest = self.highest.max(last);
        Ok(())
    }
}

/// The pages of one free-list entry: a count, then as many page numbers (LMDB's `MDB_IDL`).
fn free_list(bytes: &[u8]) -> Option<impl Iterator<Item = u64> + '_> {
    let word = |chunk: &[u8]| u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
    let count = usize::try_from(word(bytes.get(..8)?)).ok()?;
    let pages = bytes.get(8..8 + count.checked_mul(8)?)?;
    Some(pages.chunks_exact(8).map(word))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::log::frame;
    use crate::log::{BlobChanges, BlobRef, Error, Store, StoreOptions};

    const PAGE: u64 = 4096;

    fn options() -> StoreOptions {
        StoreOptions {
            map_size: 64 << 20,
            max_readers: 16,
            read_only: false,
            check_pages: true,
        }
    }

    /// Opening `dir` to write is refused as damage, for a reason that says `why`.
    #[track_caller]
    fn refused(dir: &Path, why: &str) {
        match Store::open(dir, &options()) {
            Err(Error::Damaged { reason, .. }) => assert!(reason.contains(why), "{reason}"),
            Err(e) => panic!("{e}"),
            Ok(store) => panic!("opened, at head {}", store.head().unwrap()),
        }
    }

    /// A store of `events` records, closed.
    fn store_of(events: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = Store::open(dir.path(), &options()).expect("a new store");
        let record = frame::encode(b"an event");
        for seq in 1..=events {
            store
                .append(seq, [record.as_slice()], Default::default(), Default::default())
                .unwrap();
        }
        dir
    }

    /// The offset of the newest meta page (of the two, the one with the higher txn id).
    fn newest_meta(bytes: &[u8]) -> usize {
        let txn = |page: usize| {
            let at = page * PAGE as usize + META_TXN_ID;
            u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
        };
        if txn(1) > txn(0) { PAGE as usize } else { 0 }
    }

    /// One bit of the newest commit's roots flipped: LMDB has no checksum to tell, and would
    /// serve another tree (or none) as the log. Each is refused before the node writes, rather
    /// than started afresh or carried on from an older tree under seqs already given out.
    #[test]
    fn a_commit_whose_roots_are_damaged_is_refused_not_built_on() {
        for (root, bit) in [
            (META_MAIN_ROOT, 0),
            (META_MAIN_ROOT, 1),
            (META_MAIN_ROOT, 3),
            (META_FREE_ROOT, 0),
        ] {
            let dir = store_of(200);
            let path = dir.path().join("data.mdb");
            let mut bytes = std::fs::read(&path).unwrap();
            let at = newest_meta(&bytes) + root;
            bytes[at] ^= 1 << bit;
            std::fs::write(&path, &bytes).unwrap();
            match Store::open(dir.path(), &options()) {
                // Damage the walk finds, or trees that a flipped root no longer leads to.
                Err(Error::Damaged { reason, .. }) => assert!(reason.contains("LMDB page"), "{reason}"),
                Err(Error::BadDataDir { reason, .. }) => assert!(reason.contains("database"), "{reason}"),
                Err(e) => panic!("root at {root}, bit {bit}: {e}"),
                Ok(store) => panic!("root at {root}, bit {bit}: opened, at head {}", store.head().unwrap()),
            }
        }
    }

    fn data_file(dir: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("data.mdb"))
            .expect("the data file")
    }

    /// A crash can leave a data file that ends before its last commit's last page, when the
    /// pages past its end are free ones never written: it opens, and takes writes. A file cut
    /// one page shorter, before a page its trees use, is refused, naming that page.
    #[test]
    fn a_file_that_ends_in_free_pages_is_sound_and_one_cut_short_is_not() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let record = frame::encode(b"an event");
        {
            let store = Store::open(dir.path(), &options()).expect("a new store");
            // A module of 256 pages at the end of the file, then deleted: its pages are free,
            // and the commits after it use some of them.
            let (sha, module) = ([1u8; 32], vec![7u8; 1 << 20]);
            let put = [BlobRef {
                sha256: &sha,
                bytes: &module,
            }];
            let blobs = BlobChanges { put: &put, delete: &[] };
            store.append(1, [record.as_slice()], blobs, Default::default()).unwrap();
            let blobs = BlobChanges {
                put: &[],
                delete: &[sha],
            };
            store.append(2, [record.as_slice()], blobs, Default::default()).unwrap();
            for seq in 3..=5 {
                store
                    .append(seq, [record.as_slice()], Default::default(), Default::default())
                    .unwrap();
            }
        }
        let file = data_file(dir.path());
        let pages = file.metadata().unwrap().len() / PAGE;
        let Usage {
            highest,
            last_page: last,
            ..
        } = walk(&file, PAGE as usize, pages, None).expect("a sound file");
        assert_eq!(last + 1, pages, "the file holds every page allocated");
        assert!(
            highest + 16 < last,
            "the module's pages past {highest} are free, up to {last}"
        );

        // As a crash can leave it: the free pages at its end were never written.
        file.set_len((highest + 1) * PAGE).unwrap();
        {
            let store = Store::open(dir.path(), &options()).expect("a file that ends in free pages is sound");
            assert_eq!(store.head().unwrap(), 5);
            store
                .append(6, [record.as_slice()], Default::default(), Default::default())
                .unwrap();
        }
        let store = Store::open(dir.path(), &options()).expect("it opens again");
        assert_eq!(store.head().unwrap(), 6);
        drop(store);

        // The free list holds the module's pages, none of them in use.
        let file = data_file(dir.path());
        let pages = file.metadata().unwrap().len() / PAGE;
        let usage = walk(&file, PAGE as usize, pages, None).expect("a sound file");
        assert!(usage.free.len() > 16, "{usage:?}");
        assert_eq!((usage.free_in_use, usage.free_past_last), (None, None));

        // A free list that names a page in use: the next commits could write over it.
        let mut bytes = std::fs::read(dir.path().join("data.mdb")).unwrap();
        let listed = usage.free[0].to_le_bytes();
        let at = usage.free_listed_at.expect("a free list on a leaf page") as usize;
        assert_eq!(bytes[at..at + 8], listed);
        let damaged = tempfile::tempdir().expect("a temp dir");
        bytes[at..at + 8].copy_from_slice(&usage.highest.to_le_bytes());
        std::fs::write(damaged.path().join("data.mdb"), &bytes).unwrap();
        let usage = walk(&data_file(damaged.path()), PAGE as usize, pages, None).expect("trees still sound");
        assert_eq!(usage.free_in_use, Some(usage.highest));
        let store = Store::open_unlocked(damaged.path(), &options()).expect("LMDB opens it to read");
        let damage = store.read_view().unwrap().page_damage().unwrap().expect("damage");
        assert!(damage.trees_readable, "{damage:?}");
        assert!(
            damage.message.contains("both on the free list and in use"),
            "{damage:?}"
        );
        drop(store);
        // A node will not write over it, unless told not to look.
        refused(damaged.path(), "both on the free list and in use");
        let unchecked = StoreOptions {
            check_pages: false,
            ..options()
        };
        let store = Store::open(damaged.path(), &unchecked).expect("opened without the walk");
        assert_eq!(store.head().unwrap(), 6);
        drop(store);

        // Cut short: a page in use is gone.
        let highest = walk(&file, PAGE as usize, pages, None).expect("still sound").highest;
        file.set_len(highest * PAGE).unwrap();
        match Store::open(dir.path(), &options()) {
            Err(Error::Damaged { reason, .. }) => assert!(
                reason.contains("cut short") && reason.contains(&format!("page {highest} that it uses")),
                "{reason}"
            ),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a file cut short opened"),
        }
    }
}
