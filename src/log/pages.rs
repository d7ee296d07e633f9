//! The pages an LMDB data file's newest commit uses, found by reading the file (not the map).
//!
//! A commit records the highest page number it has allocated, and a data file may well end
//! before it: pages a transaction allocated and freed again before its commit (LMDB's loose
//! pages) go on the free list without ever being written, so the file ends at the last page
//! written. A node killed right after such a commit (a full disk makes it likely) leaves such a
//! file, and it is sound. A copy cut short is not: a page its trees use lies past its end,
//! where reading through the map would kill the process with SIGBUS. Only a walk of the trees
//! tells the two apart. It reads every branch and leaf page once, so it is done only for a file
//! shorter than its commit's page count.
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

/// The highest page number the newest commit's trees use (their overflow pages included),
/// and that commit's last allocated page. `file` is `pages` pages of `page_size` bytes long.
pub(super) fn highest_used(file: &File, page_size: usize, pages: u64) -> Result<(u64, u64), Unsound> {
    let mut walk = Walk {
        file,
        page_size,
        pages,
        seen: vec![0u64; pages.div_ceil(64) as usize],
        buffer: vec![0u8; page_size],
        highest: 1,
    };
    // The newer of the two meta pages is the newest commit, as LMDB itself picks it.
    let mut metas = Vec::with_capacity(2);
    for meta in 0..2u64 {
        walk.read(meta)?;
        let word = |at: usize| u64::from_le_bytes(walk.buffer[at..at + 8].try_into().expect("8 bytes"));
        metas.push((
            word(META_TXN_ID),
            word(META_LAST_PAGE),
            word(META_FREE_ROOT),
            word(META_MAIN_ROOT),
        ));
    }
    let (_, last_page, free_root, main_root) = metas.into_iter().max().expect("two metas");
    let mut roots = vec![free_root, main_root];
    while let Some(root) = roots.pop() {
        walk.tree(root, &mut roots)?;
    }
    Ok((walk.highest, last_page))
}

struct Walk<'a> {
    file: &'a File,
    page_size: usize,
    pages: u64,
    /// Pages read, one bit each: a damaged tree that points back into itself ends.
    seen: Vec<u64>,
    buffer: Vec<u8>,
    highest: u64,
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

    /// Walks the tree at `root`, adding the roots of the named databases it holds to `roots`.
    fn tree(&mut self, root: u64, roots: &mut Vec<u64>) -> Result<(), Unsound> {
        if root == P_INVALID {
            return Ok(());
        }
        let mut stack = vec![root];
        while let Some(page) = stack.pop() {
            let (word, bit) = ((page / 64) as usize, page % 64);
            if self.seen.get(word).is_some_and(|w| w & (1 << bit) != 0) {
                return Err(Unsound::Malformed {
                    page,
                    what: "a page two trees (or one twice) point to",
                });
            }
            self.read(page)?;
            self.seen[word] |= 1 << bit;
            let malformed = |what| Unsound::Malformed { page, what };
            let half = |at: usize| u16::from_le_bytes([self.buffer[at], self.buffer[at + 1]]);
            if u64::from_le_bytes(self.buffer[..8].try_into().expect("8 bytes")) != page {
                return Err(malformed("a page whose header names another page"));
            }
            let flags = half(10);
            let lower = usize::from(half(12));
            let mut overflows = Vec::new();
            if flags & (P_BRANCH | P_LEAF) == 0 || lower < PAGE_HEADER || lower > self.page_size {
                return Err(malformed("not a branch or leaf page"));
            }
            for index in 0..(lower - PAGE_HEADER) / 2 {
                let node = usize::from(half(PAGE_HEADER + 2 * index));
                if node + 8 > self.page_size {
                    return Err(malformed("a node past the page's end"));
                }
                let (lo, hi, node_flags, key_size) = (half(node), half(node + 2), half(node + 4), half(node + 6));
                if flags & P_BRANCH != 0 {
                    stack.push(u64::from(lo) | u64::from(hi) << 16 | u64::from(node_flags) << 32);
                    continue;
                }
                let data = node + 8 + usize::from(key_size);
                let field = |at: usize| {
                    self.buffer
                        .get(data + at..data + at + 8)
                        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                        .ok_or(malformed("a node's data past the page's end"))
                };
                if node_flags & F_DUPDATA != 0 {
                    return Err(malformed("sorted duplicates, which no Solo database has"));
                } else if node_flags & F_SUBDATA != 0 {
                    roots.push(field(40)?);
                } else if node_flags & F_BIGDATA != 0 {
                    overflows.push(field(0)?);
                }
            }
            // Read once done with this page: reading them takes the buffer.
            for first in overflows {
                self.overflow(first)?;
            }
        }
        Ok(())
    }

    /// Checks the overflow pages starting at `first` (read from its header) lie in the file.
    fn overflow(&mut self, first: u64) -> Result<(), Unsound> {
        self.read(first)?;
        let flags = u16::from_le_bytes([self.buffer[10], self.buffer[11]]);
        if flags & P_OVERFLOW == 0 {
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
        self.highest = self.highest.max(last);
        Ok(())
    }
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
        let (highest, last) = highest_used(&file, PAGE as usize, pages).expect("a sound file");
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

        // Cut short: a page in use is gone.
        let file = data_file(dir.path());
        let pages = file.metadata().unwrap().len() / PAGE;
        let (highest, _) = highest_used(&file, PAGE as usize, pages).expect("still sound");
        file.set_len(highest * PAGE).unwrap();
        match Store::open(dir.path(), &options()) {
            Err(Error::BadDataDir { reason, .. }) => assert!(
                reason.contains("cut short") && reason.contains(&format!("page {highest} that it uses")),
                "{reason}"
            ),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a file cut short opened"),
        }
    }
}
