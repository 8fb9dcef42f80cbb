//! The kernel-facing inode table.
//!
//! FUSE inode numbers are the backend's, so `st_ino` through the mount
//! equals `st_ino` on the backing tree, except that the backend root and
//! backend inode 1 trade places (the kernel's root is always 1). The map is
//! a bijection and needs no state.
//!
//! For every inode the kernel holds, the table keeps its lookup count
//! (`nlookup`) and generation. Each reply that hands an entry to the kernel
//! adds exactly one (lookup, create, mkdir, mknod, symlink, link, and every
//! readdirplus entry but `.` and `..`); `forget` subtracts the kernel's `n`.
//! The same counts are forwarded to the backend, which pins the object as
//! long as the count is positive. Counting saturates at zero: a forget for
//! more than we gave is logged and clamped, never underflows.
//!
//! Generations come from one per-mount counter, so an inode number that is
//! forgotten and later handed out again (its backing object replaced) gets a
//! new generation.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::backend::Ino;

/// The kernel's root inode number.
pub const FUSE_ROOT: u64 = 1;

/// Names under which an inode was handed out, kept to invalidate them.
/// A few suffice: more than that are hard links, invalidated by inode.
const MAX_NAMES: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Known {
    nlookup: u64,
    generation: u64,
    names: Vec<(u64, OsString)>,
}

/// Lookup counts and generations of the inodes the kernel knows.
#[derive(Debug)]
pub struct InodeTable {
    backend_root: Ino,
    known: Mutex<HashMap<u64, Known>>,
    next_generation: AtomicU64,
}

impl InodeTable {
    /// A table for a backend whose root is `backend_root`.
    pub fn new(backend_root: Ino) -> Self {
        Self {
            backend_root,
            known: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(1),
        }
    }

    /// Backend inode -> FUSE inode.
    pub fn to_fuse(&self, ino: Ino) -> u64 {
        if ino == self.backend_root {
            FUSE_ROOT
        } else if ino == FUSE_ROOT {
            self.backend_root
        } else {
            ino
        }
    }

    /// FUSE inode -> backend inode (the map is its own inverse).
    pub fn to_backend(&self, ino: u64) -> Ino {
        if ino == FUSE_ROOT {
            self.backend_root
        } else if ino == self.backend_root {
            FUSE_ROOT
        } else {
            ino
        }
    }

    /// Count one more kernel reference to FUSE inode `ino`, handed out as
    /// `name` in `parent`; returns its generation.
    pub fn remember(&self, ino: u64, parent: u64, name: &OsStr) -> u64 {
        if ino == FUSE_ROOT {
            return 0;
        }
        let mut known = self.known.lock();
        let k = known.entry(ino).or_insert_with(|| Known {
            nlookup: 0,
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
            names: Vec::new(),
        });
        k.nlookup += 1;
        if k.names.len() < MAX_NAMES && !k.names.iter().any(|(p, n)| *p == parent && n == name) {
            k.names.push((parent, name.to_owned()));
        }
        k.generation
    }

    /// Every inode the kernel holds with the names it was given under.
    pub fn snapshot(&self) -> Vec<(u64, Vec<(u64, OsString)>)> {
        self.known
            .lock()
            .iter()
            .map(|(i, k)| (*i, k.names.clone()))
            .collect()
    }

    /// Drop `n` kernel references; returns how many to forward to the backend.
    pub fn forget(&self, ino: u64, n: u64) -> u64 {
        if ino == FUSE_ROOT {
            return 0;
        }
        let mut known = self.known.lock();
        let Some(k) = known.get_mut(&ino) else {
            tracing::warn!(ino, n, "forget of an inode the kernel was never given");
            debug_assert!(false, "forget of unknown inode {ino}");
            return 0;
        };
        let take = if n > k.nlookup {
            tracing::warn!(
                ino,
                n,
                have = k.nlookup,
                "forget for more lookups than given; clamped"
            );
            k.nlookup
        } else {
            n
        };
        k.nlookup -= take;
        if k.nlookup == 0 {
            known.remove(&ino);
        }
        take
    }

    /// Lookup count of `ino` (0 if unknown).
    pub fn nlookup(&self, ino: u64) -> u64 {
        self.known.lock().get(&ino).map_or(0, |k| k.nlookup)
    }

    /// Number of inodes the kernel holds (O(1)).
    pub fn len(&self) -> usize {
        self.known.lock().len()
    }

    /// True if the kernel holds no inode but the root.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of inodes the kernel holds, and the sum of their counts.
    pub fn totals(&self) -> (usize, u64) {
        let known = self.known.lock();
        (known.len(), known.values().map(|k| k.nlookup).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_one_swap_and_invert() {
        let t = InodeTable::new(2);
        assert_eq!(t.to_fuse(2), 1);
        assert_eq!(t.to_fuse(1), 2);
        assert_eq!(t.to_fuse(77), 77);
        for i in [1, 2, 3, 77, u64::MAX] {
            assert_eq!(t.to_backend(t.to_fuse(i)), i);
        }
    }

    #[test]
    fn counts_balance_and_saturate() {
        let t = InodeTable::new(2);
        let g = t.remember(10, 1, OsStr::new("a"));
        assert_eq!(t.remember(10, 1, OsStr::new("a")), g);
        assert_eq!(t.nlookup(10), 2);
        assert_eq!(t.forget(10, 1), 1);
        assert_eq!(t.nlookup(10), 1);
        assert_eq!(t.forget(10, 1), 1);
        assert_eq!(t.totals(), (0, 0));
        // A new life gets a new generation.
        assert_ne!(t.remember(10, 1, OsStr::new("a")), g);
    }

    #[test]
    fn over_forget_is_clamped() {
        let t = InodeTable::new(2);
        t.remember(5, 1, OsStr::new("b"));
        assert_eq!(t.forget(5, 3), 1);
        assert_eq!(t.nlookup(5), 0);
    }

    #[test]
    fn root_is_never_counted() {
        let t = InodeTable::new(2);
        assert_eq!(t.remember(FUSE_ROOT, 1, OsStr::new("c")), 0);
        assert_eq!(t.forget(FUSE_ROOT, 1), 0);
        assert_eq!(t.totals(), (0, 0));
    }
}
