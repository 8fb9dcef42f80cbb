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
//! With the `bpf` tier, two more counts per inode:
//! - `maprefs`: entries of the kernel's BPF entry map that name the inode.
//!   Each holds one backend pin (so a lookup BPF answers always finds the
//!   inode pinned), and keeps the inode known at `nlookup == 0`.
//! - `bpf_seen`: how much of the BPF lookup count (lookups the kernel got
//!   from a program, never seen by the daemon) has been added to `nlookup`.
//!   [`InodeTable::reconcile`] adds what is new, pinning it in the backend,
//!   before any decision that could free the inode.
//!
//! An inode is dropped from the table when both `nlookup` and `maprefs`
//! are zero.
//!
//! Generations come from one counter, so an inode number that is
//! forgotten and later handed out again (its backing object replaced) gets a
//! new generation. The counter starts at the time of the mount in
//! microseconds, so a later daemon never hands out a generation an earlier
//! one gave (an old export handle cannot name a new object by chance); a
//! daemon that exits cleanly [`InodeTable::export`]s what it knows, and the
//! next one [`InodeTable::import`]s it, so that export handles survive a
//! restart where the backend can reopen objects by identity.

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

/// One inode the kernel (or a BPF map entry) holds. Kept small: a
/// million-file dataset has a million of these (32 bytes, and one
/// allocation for its names); the bpf tier's counts live beside them
/// ([`Table::bpf`]), only for inodes that have any.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Known {
    nlookup: u64,
    generation: u64,
    names: Names,
}

/// The inodes the table holds, and the bpf tier's counts of those that
/// have any.
#[derive(Debug, Default)]
struct Table {
    known: HashMap<u64, Known>,
    bpf: HashMap<u64, BpfRefs>,
}

impl Table {
    fn maprefs(&self, ino: u64) -> u64 {
        self.bpf.get(&ino).map_or(0, |b| b.maprefs)
    }

    /// Neither the kernel nor a map entry refers to `ino`.
    fn unused(&self, ino: u64) -> bool {
        self.known.get(&ino).is_none_or(|k| k.nlookup == 0) && self.maprefs(ino) == 0
    }

    fn remove_inode(&mut self, ino: u64) {
        self.known.remove(&ino);
        self.bpf.remove(&ino);
    }
}

/// Which reference [`InodeTable::add_ref`] adds.
#[derive(Clone, Copy)]
enum Ref {
    /// A lookup the kernel got.
    Lookup,
    /// A BPF map entry.
    Map,
}

/// See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct BpfRefs {
    maprefs: u64,
    bpf_seen: u64,
}

/// Up to [`MAX_NAMES`] (parent, name) pairs packed in one allocation:
/// per pair, the parent (8 bytes, native order), the name's length (one
/// byte: names are at most 255 bytes) and the name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Names(Box<[u8]>);

impl Names {
    fn iter(&self) -> impl Iterator<Item = (u64, &OsStr)> {
        use std::os::unix::ffi::OsStrExt;
        let mut rest: &[u8] = &self.0;
        std::iter::from_fn(move || {
            if rest.len() < 9 {
                return None;
            }
            let parent = u64::from_ne_bytes(rest[..8].try_into().ok()?);
            let len = rest[8] as usize;
            let name = rest.get(9..9 + len)?;
            rest = &rest[9 + len..];
            Some((parent, OsStr::from_bytes(name)))
        })
    }

    fn add(&mut self, parent: u64, name: &OsStr) {
        use std::os::unix::ffi::OsStrExt;
        let b = name.as_bytes();
        if b.len() > u8::MAX as usize
            || self.iter().count() >= MAX_NAMES
            || self.iter().any(|(p, n)| p == parent && n == name)
        {
            return;
        }
        let mut v = Vec::with_capacity(self.0.len() + 9 + b.len());
        v.extend_from_slice(&self.0);
        v.extend_from_slice(&parent.to_ne_bytes());
        v.push(b.len() as u8);
        v.extend_from_slice(b);
        self.0 = v.into_boxed_slice();
    }

    fn to_vec(&self) -> Vec<(u64, OsString)> {
        self.iter().map(|(p, n)| (p, n.to_owned())).collect()
    }
}

impl Known {
    fn new(generation: u64) -> Self {
        Self {
            nlookup: 0,
            generation,
            names: Names::default(),
        }
    }

    fn add_name(&mut self, parent: u64, name: &OsStr) {
        // "." and ".." (export handles) name nothing to invalidate.
        if name == "." || name == ".." {
            return;
        }
        self.names.add(parent, name);
    }
}

/// An inode as a later daemon finds it again: FUSE number, generation,
/// backend identity ([`InodeTable::export`]).
pub type Exported = (u64, u64, Vec<u8>);

/// What a [`InodeTable::forget`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forgotten {
    /// References taken off (forward this many to the backend).
    pub taken: u64,
    /// The inode left the table (nothing refers to it any more).
    pub removed: bool,
}

/// Lookup counts and generations of the inodes the kernel knows.
#[derive(Debug)]
pub struct InodeTable {
    backend_root: Ino,
    table: Mutex<Table>,
    next_generation: AtomicU64,
    /// FORGETs for more than the table counted (or for unknown inodes):
    /// each one is a lookup the daemon missed, i.e. an inode it could have
    /// freed while the kernel held it. Zero when the accounting is right.
    excess_forgets: AtomicU64,
    /// Forgotten inodes: their generation and backend identity, so that an
    /// export handle the kernel gave out keeps opening the same object
    /// (same generation) after the kernel forgot it, and a number reused by
    /// another object gets a new one. Bounded; the oldest go first (their
    /// handles then answer ESTALE).
    graves: Mutex<Graves>,
}

/// A backend identity (see `Backend::identity`); `None`: the backend
/// never reuses numbers.
type Identity = Option<Vec<u8>>;

/// See [`InodeTable::graves`].
#[derive(Debug, Default)]
struct Graves {
    /// Generation, and the identity once [`InodeTable::bury`] recorded it
    /// (`Some(None)`: the backend never reuses numbers).
    by_ino: HashMap<u64, (u64, Option<Identity>)>,
    order: std::collections::VecDeque<u64>,
}

/// Forgotten inodes whose generation is kept for export handles, at most.
const MAX_GRAVES: usize = 1 << 16;

impl InodeTable {
    /// A table for a backend whose root is `backend_root`.
    pub fn new(backend_root: Ino) -> Self {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        Self {
            backend_root,
            table: Mutex::new(Table::default()),
            next_generation: AtomicU64::new(now_us.max(1)),
            excess_forgets: AtomicU64::new(0),
            graves: Mutex::new(Graves::default()),
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
        self.add_ref(ino, parent, name, Ref::Lookup, || None)
    }

    /// As [`Self::remember`], for an inode that may have been forgotten
    /// before: `identity` gives its backend identity, compared with the one
    /// it had then, so that the same object gets its old generation back.
    pub fn remember_again(
        &self,
        ino: u64,
        parent: u64,
        name: &OsStr,
        identity: impl FnOnce() -> Option<Vec<u8>>,
    ) -> u64 {
        self.add_ref(ino, parent, name, Ref::Lookup, identity)
    }

    /// The identity a forgotten inode had (see [`Self::bury`]), if kept.
    pub fn grave(&self, ino: u64) -> Option<Option<Vec<u8>>> {
        self.graves
            .lock()
            .by_ino
            .get(&ino)
            .map(|(_, id)| id.clone().flatten())
    }

    /// Every inode known or buried with an identity, as (FUSE inode,
    /// generation, identity), for [`Self::import`] by a later daemon;
    /// `identity(ino)` gives the backend identity of an inode still known
    /// (FUSE number). Buried ones most recent first, at most `max` in all.
    pub fn export(&self, identity: impl Fn(u64) -> Option<Vec<u8>>, max: usize) -> Vec<Exported> {
        let known: Vec<(u64, u64)> = self
            .table
            .lock()
            .known
            .iter()
            .map(|(i, k)| (*i, k.generation))
            .collect();
        let mut out = Vec::new();
        for (ino, generation) in known {
            if out.len() >= max {
                return out;
            }
            if let Some(id) = identity(ino) {
                out.push((ino, generation, id));
            }
        }
        let g = self.graves.lock();
        for ino in g.order.iter().rev() {
            if out.len() >= max {
                break;
            }
            if let Some((generation, Some(Some(id)))) = g.by_ino.get(ino) {
                out.push((*ino, *generation, id.clone()));
            }
        }
        out
    }

    /// Take in what an earlier daemon [`Self::export`]ed: each inode is
    /// buried with its generation and identity, so that an export handle
    /// given out then finds the same object again (or ESTALE). Call before
    /// serving.
    pub fn import(&self, entries: impl IntoIterator<Item = Exported>) -> usize {
        let mut g = self.graves.lock();
        let mut n = 0;
        let mut max_gen = 0;
        for (ino, generation, id) in entries {
            if ino == FUSE_ROOT {
                continue;
            }
            if g.by_ino.insert(ino, (generation, Some(Some(id)))).is_none() {
                g.order.push_front(ino);
            }
            max_gen = max_gen.max(generation);
            n += 1;
        }
        while g.order.len() > MAX_GRAVES {
            if let Some(old) = g.order.pop_front() {
                g.by_ino.remove(&old);
            }
        }
        self.next_generation
            .fetch_max(max_gen.saturating_add(1), Ordering::Relaxed);
        n
    }

    /// Record the backend identity of `ino`, just forgotten (call before
    /// the backend lets the object go).
    pub fn bury(&self, ino: u64, identity: Option<Vec<u8>>) {
        if let Some(g) = self.graves.lock().by_ino.get_mut(&ino) {
            g.1 = Some(identity);
        }
    }

    fn new_generation(&self, ino: u64, identity: impl FnOnce() -> Option<Vec<u8>>) -> u64 {
        let grave = self.graves.lock().by_ino.remove(&ino);
        match grave {
            // No identity: the backend never reuses numbers. Not yet buried:
            // a lookup racing the FORGET that is burying it (the backend
            // still holds the object, so it is the same one).
            Some((g, Some(None) | None)) => g,
            Some((g, Some(Some(old)))) if identity().as_ref() == Some(&old) => g,
            // Another object under the number: a new generation.
            _ => self.next_generation.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Find or create `ino` (named `name` in `parent`), add a reference
    /// of kind `r`, and return its generation. The root is never counted.
    fn add_ref(
        &self,
        ino: u64,
        parent: u64,
        name: &OsStr,
        r: Ref,
        identity: impl FnOnce() -> Option<Vec<u8>>,
    ) -> u64 {
        if ino == FUSE_ROOT {
            return 0;
        }
        let mut t = self.table.lock();
        let k = t
            .known
            .entry(ino)
            .or_insert_with(|| Known::new(self.new_generation(ino, identity)));
        if let Ref::Lookup = r {
            k.nlookup += 1;
        }
        k.add_name(parent, name);
        let generation = k.generation;
        if let Ref::Map = r {
            t.bpf.entry(ino).or_default().maprefs += 1;
        }
        generation
    }

    /// Count one more BPF map entry naming `ino` (as `name` in `parent`);
    /// returns its generation. The caller holds a backend pin for it.
    pub fn map_ref(&self, ino: u64, parent: u64, name: &OsStr) -> u64 {
        self.add_ref(ino, parent, name, Ref::Map, || None)
    }

    /// One BPF map entry naming `ino` is gone (call [`Self::reconcile`]
    /// first); true if the inode left the table.
    pub fn map_unref(&self, ino: u64) -> bool {
        let mut t = self.table.lock();
        if !t.known.contains_key(&ino) {
            debug_assert!(false, "map_unref of unknown inode {ino}");
            return false;
        }
        let b = t.bpf.entry(ino).or_default();
        b.maprefs = b.maprefs.saturating_sub(1);
        if t.unused(ino) {
            t.remove_inode(ino);
            return true;
        }
        false
    }

    /// The BPF programs have answered `total` lookups of `ino` so far: add
    /// the ones not seen yet to its lookup count, calling `pin(n)` (under
    /// the table lock, so no concurrent forget can unpin first) to take
    /// their backend pins. Returns how many were added.
    pub fn reconcile(&self, ino: u64, total: u64, pin: impl FnOnce(u64)) -> u64 {
        let mut t = self.table.lock();
        let seen = t.bpf.get(&ino).map_or(0, |b| b.bpf_seen);
        let Some(k) = t.known.get_mut(&ino) else {
            if total > 0 {
                tracing::warn!(
                    ino,
                    total,
                    "BPF lookup count for an inode the daemon does not hold"
                );
            }
            return 0;
        };
        let delta = total.saturating_sub(seen);
        if delta > 0 {
            k.nlookup += delta;
            t.bpf.entry(ino).or_default().bpf_seen = total;
            pin(delta);
        }
        delta
    }

    /// Forget every BPF lookup count seen (the counts were reset).
    pub fn reset_bpf_seen(&self) {
        for b in self.table.lock().bpf.values_mut() {
            b.bpf_seen = 0;
        }
    }

    /// Inodes named by BPF map entries, and how many entries name them.
    pub fn mapped(&self) -> u64 {
        self.table.lock().bpf.values().map(|b| b.maprefs).sum()
    }

    /// Every inode the kernel holds with the names it was given under.
    pub fn snapshot(&self) -> Vec<(u64, Vec<(u64, OsString)>)> {
        self.table
            .lock()
            .known
            .iter()
            .filter(|(_, k)| k.nlookup > 0)
            .map(|(i, k)| (*i, k.names.to_vec()))
            .collect()
    }

    /// Every inode in the table (held by the kernel or a map entry).
    pub fn all(&self) -> Vec<u64> {
        self.table.lock().known.keys().copied().collect()
    }

    /// Drop `n` kernel references (call [`Self::reconcile`] first).
    pub fn forget(&self, ino: u64, n: u64) -> Forgotten {
        let none = Forgotten {
            taken: 0,
            removed: false,
        };
        if ino == FUSE_ROOT {
            return none;
        }
        let mut t = self.table.lock();
        let Some(k) = t.known.get_mut(&ino) else {
            tracing::warn!(ino, n, "forget of an inode the kernel was never given");
            self.excess_forgets.fetch_add(n, Ordering::Relaxed);
            return none;
        };
        let taken = if n > k.nlookup {
            tracing::warn!(
                ino,
                n,
                have = k.nlookup,
                "forget for more lookups than given; clamped"
            );
            self.excess_forgets.fetch_add(n - k.nlookup, Ordering::Relaxed);
            k.nlookup
        } else {
            n
        };
        k.nlookup -= taken;
        let g = k.generation;
        let removed = t.unused(ino);
        if removed {
            t.remove_inode(ino);
            let mut graves = self.graves.lock();
            if graves.by_ino.insert(ino, (g, None)).is_none() {
                graves.order.push_back(ino);
            }
            while graves.order.len() > MAX_GRAVES {
                if let Some(old) = graves.order.pop_front() {
                    graves.by_ino.remove(&old);
                }
            }
        }
        Forgotten { taken, removed }
    }

    /// Generation of `ino`, if the table holds it.
    pub fn generation(&self, ino: u64) -> Option<u64> {
        if ino == FUSE_ROOT {
            return Some(0);
        }
        self.table.lock().known.get(&ino).map(|k| k.generation)
    }

    /// FORGETs beyond what was counted (see the field).
    pub fn excess_forgets(&self) -> u64 {
        self.excess_forgets.load(Ordering::Relaxed)
    }

    /// Lookup count of `ino` (0 if unknown).
    pub fn nlookup(&self, ino: u64) -> u64 {
        self.table.lock().known.get(&ino).map_or(0, |k| k.nlookup)
    }

    /// Number of inodes in the table (O(1)): held by the kernel or by a
    /// BPF map entry, each with one backend descriptor.
    pub fn len(&self) -> usize {
        self.table.lock().known.len()
    }

    /// True if the kernel holds no inode but the root.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of inodes the kernel holds, and the sum of their counts.
    pub fn totals(&self) -> (usize, u64) {
        let t = self.table.lock();
        (
            t.known.values().filter(|k| k.nlookup > 0).count(),
            t.known.values().map(|k| k.nlookup).sum(),
        )
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
        assert_eq!(t.forget(10, 1).taken, 1);
        assert_eq!(t.nlookup(10), 1);
        assert_eq!(
            t.forget(10, 1),
            Forgotten {
                taken: 1,
                removed: true
            }
        );
        assert_eq!(t.totals(), (0, 0));
        // Buried with its identity: the same object gets its generation
        // back (export handles), another object under the number a new one.
        t.bury(10, Some(vec![1, 2]));
        assert_eq!(t.remember_again(10, 1, OsStr::new("a"), || Some(vec![1, 2])), g);
        t.forget(10, 1);
        t.bury(10, Some(vec![1, 2]));
        assert_ne!(t.remember_again(10, 1, OsStr::new("a"), || Some(vec![3, 4])), g);
    }

    #[test]
    fn names_pack_and_stay_few() {
        let mut n = Names::default();
        n.add(1, OsStr::new("a"));
        n.add(1, OsStr::new("a"));
        n.add(7, OsStr::new(&"x".repeat(255)));
        n.add(2, OsStr::new(&"y".repeat(256)));
        assert_eq!(
            n.to_vec(),
            vec![(1, OsString::from("a")), (7, OsString::from("x".repeat(255)))]
        );
        for i in 0..10 {
            n.add(100 + i, OsStr::new("b"));
        }
        assert_eq!(n.iter().count(), MAX_NAMES);
        assert!(
            std::mem::size_of::<Known>() <= 32,
            "{}",
            std::mem::size_of::<Known>()
        );
    }

    #[test]
    fn an_exported_table_gives_old_handles_their_generation() {
        let a = InodeTable::new(2);
        let g5 = a.remember(5, 1, OsStr::new("kept"));
        let g6 = a.remember(6, 1, OsStr::new("buried"));
        a.forget(6, 1);
        a.bury(6, Some(vec![6, 6]));
        let out = a.export(|ino| Some(vec![ino as u8]), 10);
        assert_eq!(out.len(), 2);
        let b = InodeTable::new(2);
        assert_eq!(b.import(out), 2);
        // The same objects get their old generations back...
        assert_eq!(b.remember_again(5, 1, OsStr::new("kept"), || Some(vec![5])), g5);
        assert_eq!(
            b.remember_again(6, 1, OsStr::new("buried"), || Some(vec![6, 6])),
            g6
        );
        // ...another object under a known number a new one, above both.
        b.forget(6, 1);
        b.bury(6, Some(vec![6, 6]));
        let g = b.remember_again(6, 1, OsStr::new("x"), || Some(vec![9]));
        assert!(g > g5.max(g6));
    }

    #[test]
    fn over_forget_is_clamped() {
        let t = InodeTable::new(2);
        t.remember(5, 1, OsStr::new("b"));
        assert_eq!(t.forget(5, 3).taken, 1);
        assert_eq!(t.nlookup(5), 0);
        assert_eq!(t.excess_forgets(), 2);
    }

    #[test]
    fn root_is_never_counted() {
        let t = InodeTable::new(2);
        assert_eq!(t.remember(FUSE_ROOT, 1, OsStr::new("c")), 0);
        assert_eq!(t.forget(FUSE_ROOT, 1).taken, 0);
        assert_eq!(t.totals(), (0, 0));
    }

    #[test]
    fn map_refs_keep_an_inode_until_both_counts_are_zero() {
        let t = InodeTable::new(2);
        let g = t.map_ref(9, 1, OsStr::new("m"));
        assert_eq!(t.totals(), (0, 0), "a map entry is not a kernel reference");
        assert_eq!(t.remember(9, 1, OsStr::new("m")), g);
        assert!(!t.forget(9, 1).removed, "still named by a map entry");
        assert!(t.map_unref(9));
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn bpf_lookups_are_added_once_and_pinned() {
        let t = InodeTable::new(2);
        t.map_ref(9, 1, OsStr::new("m"));
        let mut pinned = 0;
        assert_eq!(t.reconcile(9, 3, |n| pinned += n), 3);
        assert_eq!(t.reconcile(9, 3, |n| pinned += n), 0);
        assert_eq!(t.reconcile(9, 5, |n| pinned += n), 2);
        assert_eq!((pinned, t.nlookup(9)), (5, 5));
        // The map entry goes; the kernel still holds five references.
        assert!(!t.map_unref(9));
        assert_eq!(t.forget(9, 4).taken, 4);
        assert!(t.forget(9, 1).removed);
    }
}
