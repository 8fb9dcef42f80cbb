//! The daemon's side of the `bpf` tier: what is in the kernel's BPF maps.
//!
//! The BPF programs (`efuse-ebpf/src/ops.rs`) answer LOOKUP from an entry
//! map keyed by (parent nodeid, name) and GETATTR from an attribute map
//! keyed by nodeid. The daemon stays the one source of truth; this module
//! keeps the maps a subset of it:
//!
//! - **Mirror.** Every key in the entry map is also in `entries` here, with
//!   the inode it names. Each such key holds one backend pin and one
//!   `maprefs` count in the [`InodeTable`], so an inode a program can hand
//!   out is always pinned.
//! - **Delete before invalidate.** A change (through the mount or reported
//!   by the backend) deletes the affected keys and attributes from the maps
//!   before the caller answers the request or sends the FUSE notify, so the
//!   kernel never gets a stale answer from a map after the daemon has
//!   spoken.
//! - **Epochs.** Every change bumps one epoch counter under the mirror
//!   lock. An insert carries the epoch read before its backend call and is
//!   dropped if a change happened since, so a lookup racing a change never
//!   puts back what the change removed.
//! - **Lookup counts.** Programs count the lookups they answer per nodeid;
//!   before any decision that could free an inode (forget, removal of a
//!   key) the count is read and added to the inode's lookup count
//!   ([`InodeTable::reconcile`]), after the key was deleted. See the
//!   protocol in `ops.rs`.
//! - **Full maps** are not errors: the entry is simply not offloaded and the
//!   kernel keeps asking the daemon, which says so once in the log.
//! - **Opens and xattrs.** With attributes of a regular file the mirror
//!   offers its read-only opens: a passthrough backing id held for the
//!   inode ([`crate::passthrough::Passthrough::hold`]) goes into the open
//!   map. With attributes of any inode that has no extended attributes at
//!   all, the no-xattr map answers its GETXATTRs with ENODATA. Both are
//!   dropped with the inode's attributes (every change above), and neither
//!   is offered while the inode has writers open through the daemon: their
//!   passthrough writes change size and times without telling it.
//!
//! Lock order: the mirror lock, then the inode table, then the backend.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use efuse_common::ops::{
    AttrValue, COUNTERS, EntryValue, FOPEN_NOFLUSH, FOPEN_PASSTHROUGH, FuseAttrOut, FuseEntryOut, NameKey,
    NoXattr, OpenValue,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::backend::{Attr, FileKind, SharedBackend};
use crate::inode::{FUSE_ROOT, InodeTable};

/// Errors of map updates.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The map has no room (E2BIG / ENOMEM from the kernel).
    #[error("map full")]
    Full,
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// The kernel maps of the bpf tier, as the daemon writes them. Implemented
/// by [`crate::bpf::BpfMaps`]; tests use an in-memory model.
pub trait KernelMaps: Send + Sync {
    /// Insert or overwrite an entry.
    fn put_entry(&self, key: &NameKey, value: &EntryValue) -> Result<(), MapError>;
    /// Delete an entry (absent is fine).
    fn del_entry(&self, key: &NameKey);
    /// Insert or overwrite attributes.
    fn put_attr(&self, ino: u64, value: &AttrValue) -> Result<(), MapError>;
    /// Delete attributes (absent is fine).
    fn del_attr(&self, ino: u64);
    /// Lookups of `ino` answered by the programs so far.
    fn lookups(&self, ino: u64) -> u64;
    /// Drop the lookup count of `ino` (nothing can answer for it any more).
    fn del_lookups(&self, ino: u64);
    /// The programs' counters, summed over CPUs (`efuse_common::ops::CTR_*`).
    fn counters(&self) -> [u64; COUNTERS as usize];
    /// Which of the optional programs are attached.
    fn answers(&self) -> Answers {
        Answers::default()
    }
    /// Insert or overwrite how to answer the read-only opens of `ino`.
    fn put_open(&self, _ino: u64, _value: &OpenValue) -> Result<(), MapError> {
        Err(MapError::Other("no open map".into()))
    }
    /// Delete the open answer of `ino` (absent is fine).
    fn del_open(&self, _ino: u64) {}
    /// Record that `ino` has no extended attributes.
    fn put_noxattr(&self, _ino: u64, _value: &NoXattr) -> Result<(), MapError> {
        Err(MapError::Other("no xattr map".into()))
    }
    /// Delete the no-xattr record of `ino` (absent is fine).
    fn del_noxattr(&self, _ino: u64) {}
    /// Capacities of the entry and the attribute (and no-xattr) maps: LRU
    /// maps, which evict what the programs used least recently when the
    /// daemon adds to a full one.
    fn capacities(&self) -> (usize, usize) {
        (usize::MAX, usize::MAX)
    }
    /// The keys in the entry map now.
    fn entry_keys(&self) -> Vec<NameKey> {
        Vec::new()
    }
    /// The inodes in the attribute map now.
    fn attr_keys(&self) -> Vec<u64> {
        Vec::new()
    }
    /// The inodes in the no-xattr map now.
    fn noxattr_keys(&self) -> Vec<u64> {
        Vec::new()
    }
}

/// The optional programs a kernel's `fuse_bpf_ops` has and that are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answers {
    /// `open` (with passthrough; also means no FLUSH/RELEASE for those).
    pub open: bool,
    /// `ioctl`.
    pub ioctl: bool,
    /// `getxattr`.
    pub getxattr: bool,
}

/// Counters and state of the bpf tier, for `efuse stats`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BpfStats {
    /// Programs attached to the connection.
    pub attached: bool,
    /// Why the tier is not attached, when it was asked for and failed.
    pub reason: Option<String>,
    /// Entries in the entry map.
    pub entries: u64,
    /// Attributes in the attribute map.
    pub attrs: u64,
    /// Lookups answered in the kernel.
    pub lookup_hits: u64,
    /// Lookups the programs sent to the daemon.
    pub lookup_misses: u64,
    /// Getattrs answered in the kernel.
    pub getattr_hits: u64,
    /// Getattrs the programs sent to the daemon.
    pub getattr_misses: u64,
    /// Lookups sent to the daemon because the lookup-count map was full.
    pub lookups_map_full: u64,
    /// Miss events lost to a full ring buffer.
    pub events_dropped: u64,
    /// Lookups that raced with a deletion (given back to the daemon).
    pub races: u64,
    /// Map entries found expired.
    pub expired: u64,
    /// Inserts refused because a map was full.
    pub map_full: u64,
    /// Entries the kernel evicted from the full LRU entry map (the least
    /// recently used), noticed and released by the daemon.
    #[serde(default)]
    pub evicted: u64,
    /// Capacity of the entry map (while attached).
    #[serde(default)]
    pub entry_capacity: u64,
    /// Miss events received.
    pub events: u64,
    /// Directories prefetched into the maps.
    pub prefetches: u64,
    /// Lookups of BPF answers added to the daemon's counts.
    pub reconciled: u64,
    /// The optional programs attached.
    #[serde(default)]
    pub answers: Answers,
    /// Opens answered in the kernel.
    #[serde(default)]
    pub open_hits: u64,
    /// Opens the programs sent to the daemon.
    #[serde(default)]
    pub open_misses: u64,
    /// Ioctls answered (ENOTTY) in the kernel.
    #[serde(default)]
    pub ioctl_hits: u64,
    /// Getxattrs answered (ENODATA) in the kernel.
    #[serde(default)]
    pub getxattr_hits: u64,
    /// Getxattrs the programs sent to the daemon.
    #[serde(default)]
    pub getxattr_misses: u64,
    /// Inodes in the open map.
    #[serde(default)]
    pub opens: u64,
    /// Inodes in the no-xattr map.
    #[serde(default)]
    pub noxattr: u64,
    /// Passthrough backing ids registered on the connection now.
    #[serde(default)]
    pub backing_ids: u64,
    /// Of those, held for opens answered in the kernel.
    #[serde(default)]
    pub backing_held: u64,
    /// Files whose opens stayed with the daemon because `backing_max` was reached.
    #[serde(default)]
    pub backing_full: u64,
}

#[derive(Default)]
struct Mirror {
    maps: Option<Arc<dyn KernelMaps>>,
    /// (parent, name) -> inode, exactly the keys of the entry map.
    entries: HashMap<(u64, OsString), u64>,
    /// inode -> the keys naming it (the reverse of `entries`).
    by_ino: HashMap<u64, Vec<(u64, OsString)>>,
    /// Inodes in the attribute map.
    attrs: HashSet<u64>,
    /// Inodes in the open map.
    opens: HashSet<u64>,
    /// Inodes in the no-xattr map.
    noxattr: HashSet<u64>,
    /// Writable opens per inode through the daemon.
    writers: HashMap<u64, u32>,
    epoch: u64,
    /// Last prefetch of each directory, to coalesce miss events.
    prefetched: HashMap<u64, Instant>,
    full_warned: bool,
    stats: BpfStats,
}

/// The mirror of the kernel maps. See the module docs.
pub struct BpfMirror {
    inner: Mutex<Mirror>,
    /// Most entries held at once (each pins a backend inode, which for the
    /// dir backend is a descriptor).
    max_entries: usize,
    inodes: Arc<InodeTable>,
    backend: SharedBackend,
    /// Backing ids for the opens the programs answer (set with the session).
    passthrough: std::sync::OnceLock<Arc<crate::passthrough::Passthrough>>,
    /// The mount serves extended attributes (else the kernel stops asking).
    xattrs: std::sync::atomic::AtomicBool,
}

/// CLOCK_MONOTONIC now, in ns (the clock of `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub use crate::transport::wire::fuse_attr;

fn deadline(now: u64, ttl: Duration) -> u64 {
    now.saturating_add(ttl.as_nanos().min(u64::MAX as u128) as u64)
}

impl BpfMirror {
    /// A detached mirror over the inode table and backend of a filesystem.
    pub fn new(inodes: Arc<InodeTable>, backend: SharedBackend, max_entries: usize) -> Self {
        Self {
            inner: Mutex::new(Mirror::default()),
            max_entries,
            inodes,
            backend,
            passthrough: std::sync::OnceLock::new(),
            xattrs: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The connection's backing ids (once the session exists).
    pub fn set_passthrough(&self, pt: Arc<crate::passthrough::Passthrough>) {
        let _ = self.passthrough.set(pt);
    }

    /// Whether the mount serves extended attributes.
    pub fn set_xattrs(&self, on: bool) {
        self.xattrs.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn b(&self, ino: u64) -> u64 {
        self.inodes.to_backend(ino)
    }

    /// True while maps are attached.
    pub fn active(&self) -> bool {
        self.inner.lock().maps.is_some()
    }

    /// The current epoch: read it before a backend call whose result will
    /// be offered to [`Self::put_entry`] / [`Self::put_attr`].
    pub fn epoch(&self) -> u64 {
        self.inner.lock().epoch
    }

    /// Start filling `maps` (empty).
    pub fn attach(&self, maps: Arc<dyn KernelMaps>) {
        let mut m = self.inner.lock();
        debug_assert!(m.entries.is_empty());
        m.maps = Some(maps);
        m.epoch += 1;
        m.stats.attached = true;
        m.stats.reason = None;
    }

    /// Stop using the maps. Call only once the programs can no longer run
    /// (after the struct_ops link is gone): every BPF lookup count is then
    /// final and is added to the inode table, and every map reference is
    /// released. Returns the maps, to be dropped by the caller.
    pub fn detach(&self) -> Option<Arc<dyn KernelMaps>> {
        let mut m = self.inner.lock();
        let maps = m.maps.take()?;
        m.epoch += 1;
        m.stats.attached = false;
        // Keep the programs' final counters for `efuse stats`.
        Self::fold_counters(&mut m.stats, &maps.counters());
        m.by_ino.clear();
        let keys: Vec<((u64, OsString), u64)> = m.entries.drain().collect();
        for ((parent, name), ino) in keys {
            self.unmap(&mut m, &*maps, parent, &name, ino);
        }
        for ino in self.inodes.all() {
            let total = maps.lookups(ino);
            m.stats.reconciled += self.reconcile(ino, total);
        }
        // The counts will not be read again; a later attach starts at zero.
        self.inodes.reset_bpf_seen();
        m.attrs.clear();
        m.opens.clear();
        m.noxattr.clear();
        m.prefetched.clear();
        m.stats.entries = 0;
        m.stats.attrs = 0;
        Some(maps)
    }

    /// Why the tier is not attached (shown by `efuse stats`).
    pub fn set_reason(&self, reason: Option<String>) {
        self.inner.lock().stats.reason = reason;
    }

    fn reconcile(&self, ino: u64, total: u64) -> u64 {
        let b = self.b(ino);
        let backend = &self.backend;
        self.inodes.reconcile(ino, total, |n| {
            for _ in 0..n {
                if let Err(e) = backend.pin(b) {
                    tracing::error!(ino, "cannot pin an inode the kernel got from BPF: {e}");
                }
            }
        })
    }

    fn insert_key(m: &mut Mirror, slot: (u64, OsString), ino: u64) {
        m.by_ino.entry(ino).or_default().push(slot.clone());
        m.entries.insert(slot, ino);
    }

    fn remove_key(m: &mut Mirror, slot: &(u64, OsString)) -> Option<u64> {
        let ino = m.entries.remove(slot)?;
        if let Some(v) = m.by_ino.get_mut(&ino) {
            v.retain(|s| s != slot);
            if v.is_empty() {
                m.by_ino.remove(&ino);
            }
        }
        Some(ino)
    }

    /// Remove key (parent, name) -> ino from the maps (already out of
    /// `m.entries`), reconcile, and release its map reference.
    fn unmap(&self, m: &mut Mirror, maps: &dyn KernelMaps, parent: u64, name: &OsStr, ino: u64) {
        if let Some(key) = NameKey::new(parent, name.as_bytes()) {
            maps.del_entry(&key);
        }
        // After the delete: no program can count a lookup we do not read now.
        m.stats.reconciled += self.reconcile(ino, maps.lookups(ino));
        let removed = self.inodes.map_unref(ino);
        self.backend.forget(self.b(ino), 1);
        if removed {
            self.gone(m, maps, ino);
        }
    }

    /// `ino` left the inode table: nothing can answer for it any more.
    fn gone(&self, m: &mut Mirror, maps: &dyn KernelMaps, ino: u64) {
        maps.del_lookups(ino);
        Self::drop_inode(m, maps, ino);
        // Out of the table: the kernel holds no inode, so no open file.
        if let Some(pt) = self.passthrough.get() {
            pt.forgotten(ino);
        }
    }

    /// Delete what the maps say about `ino` itself (attributes, open,
    /// xattrs); the keys naming it stay.
    fn drop_inode(m: &mut Mirror, maps: &dyn KernelMaps, ino: u64) {
        if m.attrs.remove(&ino) {
            maps.del_attr(ino);
        }
        if m.opens.remove(&ino) {
            maps.del_open(ino);
        }
        if m.noxattr.remove(&ino) {
            maps.del_noxattr(ino);
        }
    }

    /// The kernel evicts from full LRU maps without telling: once the
    /// mirror holds an eighth more than a map can, compare it with the
    /// map's keys and release what was evicted, as for a delete (the count
    /// is read after the entry is gone, so none is missed). One scan per
    /// capacity/8 inserts.
    fn sync_evictions(&self, m: &mut Mirror, maps: &dyn KernelMaps) {
        let (ecap, acap) = maps.capacities();
        let over = |len: usize, cap: usize| len > cap.saturating_add((cap / 8).max(1));
        if over(m.entries.len(), ecap) {
            let present: HashSet<(u64, Vec<u8>)> = maps
                .entry_keys()
                .into_iter()
                .map(|k| {
                    (
                        k.parent,
                        k.name[..(k.namelen as usize).min(k.name.len())].to_vec(),
                    )
                })
                .collect();
            let gone: Vec<((u64, OsString), u64)> = m
                .entries
                .iter()
                .filter(|((p, n), _)| !present.contains(&(*p, n.as_bytes().to_vec())))
                .map(|(k, i)| (k.clone(), *i))
                .collect();
            for (slot, ino) in gone {
                Self::remove_key(m, &slot);
                self.unmap(m, maps, slot.0, &slot.1, ino);
                m.stats.evicted += 1;
            }
        }
        if over(m.attrs.len(), acap) {
            let present: HashSet<u64> = maps.attr_keys().into_iter().collect();
            m.attrs.retain(|i| present.contains(i));
        }
        if over(m.noxattr.len(), acap) {
            let present: HashSet<u64> = maps.noxattr_keys().into_iter().collect();
            m.noxattr.retain(|i| present.contains(i));
        }
    }

    fn warn_full(m: &mut Mirror, what: &str) {
        m.stats.map_full += 1;
        if !m.full_warned {
            m.full_warned = true;
            tracing::warn!(
                "the BPF {what} map is full: further entries are answered by the daemon \
                 (raise [bpf] map sizes to offload more)"
            );
        }
    }

    /// Offer the entry `name` in `parent` -> `attr` (FUSE inode numbers) to
    /// the maps, valid for the given TTLs from now. `pin_held`: the caller
    /// holds a backend pin on the inode that the map reference may take
    /// over (else the mirror pins it). Dropped if the epoch moved.
    #[allow(clippy::too_many_arguments)]
    pub fn put_entry(
        &self,
        epoch: u64,
        parent: u64,
        name: &OsStr,
        attr: &Attr,
        entry_ttl: Duration,
        attr_ttl: Duration,
        pin_held: bool,
    ) {
        let ino = attr.ino;
        let release = |held: bool| {
            if held {
                self.backend.forget(self.b(ino), 1);
            }
        };
        let mut m = self.inner.lock();
        let Some(maps) = m.maps.clone() else {
            return release(pin_held);
        };
        let key = match NameKey::new(parent, name.as_bytes()) {
            Some(k)
                if m.epoch == epoch
                    && ino != FUSE_ROOT
                    && !entry_ttl.is_zero()
                    && !m.writers.contains_key(&ino) =>
            {
                k
            }
            _ => return release(pin_held),
        };
        let now = monotonic_ns();
        let mut value = EntryValue {
            out: FuseEntryOut {
                nodeid: ino,
                attr: fuse_attr(attr),
                ..Default::default()
            },
            entry_deadline_ns: deadline(now, entry_ttl),
            attr_deadline_ns: deadline(now, attr_ttl),
        };
        let slot = (parent, name.to_owned());
        match m.entries.get(&slot).copied() {
            Some(old) if old == ino => {
                value.out.generation = self.inodes.generation(ino).unwrap_or(0);
                if maps.put_entry(&key, &value).is_err() {
                    // Could not refresh: drop it rather than keep old data.
                    Self::remove_key(&mut m, &slot);
                    self.unmap(&mut m, &*maps, parent, name, ino);
                }
                release(pin_held);
                drop(m);
                return self.put_attr(epoch, attr, attr_ttl);
            }
            Some(old) => {
                Self::remove_key(&mut m, &slot);
                self.unmap(&mut m, &*maps, parent, name, old);
            }
            None => {}
        }
        if m.entries.len() >= self.max_entries {
            Self::warn_full(&mut m, "entry (descriptor budget)");
            return release(pin_held);
        }
        if !pin_held && self.backend.pin(self.b(ino)).is_err() {
            return;
        }
        value.out.generation = self.inodes.map_ref(ino, parent, name);
        match maps.put_entry(&key, &value) {
            Ok(()) => {
                Self::insert_key(&mut m, slot, ino);
                self.sync_evictions(&mut m, &*maps);
                m.stats.entries = m.entries.len() as u64;
            }
            Err(e) => {
                if self.inodes.map_unref(ino) {
                    self.gone(&mut m, &*maps, ino);
                }
                self.backend.forget(self.b(ino), 1);
                match e {
                    MapError::Full => Self::warn_full(&mut m, "entry"),
                    MapError::Other(e) => tracing::warn!("cannot update the BPF entry map: {e}"),
                }
                return;
            }
        }
        drop(m);
        self.put_attr(epoch, attr, attr_ttl);
    }

    /// Offer the attributes of an inode the kernel holds (FUSE numbers).
    pub fn put_attr(&self, epoch: u64, attr: &Attr, attr_ttl: Duration) {
        let mut m = self.inner.lock();
        let Some(maps) = m.maps.clone() else { return };
        if m.epoch != epoch
            || attr_ttl.is_zero()
            || m.writers.contains_key(&attr.ino)
            || self.inodes.generation(attr.ino).is_none()
        {
            return;
        }
        let until = deadline(monotonic_ns(), attr_ttl);
        let value = AttrValue {
            out: FuseAttrOut {
                attr: fuse_attr(attr),
                ..Default::default()
            },
            deadline_ns: until,
        };
        match maps.put_attr(attr.ino, &value) {
            Ok(()) => {
                m.attrs.insert(attr.ino);
                self.sync_evictions(&mut m, &*maps);
                m.stats.attrs = m.attrs.len() as u64;
            }
            Err(MapError::Full) => return Self::warn_full(&mut m, "attribute"),
            Err(MapError::Other(e)) => return tracing::warn!("cannot update the BPF attribute map: {e}"),
        }
        // Offered again with every attribute refresh, also when present:
        // the answers carry the new deadline (expired ones ask the daemon,
        // whose GETATTR reply lands here).
        let (can_open, want_noxattr) = self.extras(maps.answers());
        let want_open = can_open && attr.kind == FileKind::File;
        drop(m);
        self.offer_extras(epoch, attr.ino, until, want_open, want_noxattr);
    }

    /// Offer the open and no-xattr answers of `ino` (outside the mirror
    /// lock: these are backend calls).
    fn offer_extras(&self, epoch: u64, ino: u64, until: u64, want_open: bool, want_noxattr: bool) {
        if !want_open && !want_noxattr {
            return;
        }
        let Ok(list) = self.backend.listxattr(self.b(ino)) else {
            return;
        };
        // An ACL is checked by the backend, not by the kernel's mode check
        // an answered open gets: such files open through the daemon.
        let acl = list.split(|c| *c == 0).any(|n| n == b"system.posix_acl_access");
        if want_open && !acl {
            self.offer_open(epoch, ino, until);
        }
        if want_noxattr && list.is_empty() {
            self.offer_noxattr(epoch, ino, until);
        }
    }

    /// Which extra answers the attached programs and this mount can give:
    /// (opens: local backends only; no-xattr: only if xattrs are served).
    fn extras(&self, a: Answers) -> (bool, bool) {
        (
            a.open && !self.backend.is_remote(),
            a.getxattr && self.xattrs.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Offer `ino`'s open (`open`) or no-xattr answer again, valid for
    /// `ttl`: a request it would have answered reached the daemon (the
    /// answer had expired while the kernel's attributes had not, so no
    /// GETATTR renewed it). `epoch` was read before the daemon's backend call.
    fn renew(&self, epoch: u64, ino: u64, ttl: Duration, open: bool) {
        let Some(maps) = self.inner.lock().maps.clone() else {
            return;
        };
        let (can_open, can_noxattr) = self.extras(maps.answers());
        let (o, x) = (open && can_open, !open && can_noxattr);
        if !ttl.is_zero() {
            self.offer_extras(epoch, ino, deadline(monotonic_ns(), ttl), o, x);
        }
    }

    /// A read-only open of the regular file `ino` reached the daemon.
    pub fn renew_open(&self, epoch: u64, ino: u64, ttl: Duration) {
        self.renew(epoch, ino, ttl, true);
    }

    /// A GETXATTR of `ino` reached the daemon and found nothing.
    pub fn renew_noxattr(&self, epoch: u64, ino: u64, ttl: Duration) {
        self.renew(epoch, ino, ttl, false);
    }

    /// Put `v` into a map if nothing changed since `epoch` and `ino` has no
    /// writer; `put` does the map update, `set` names the mirror's record.
    fn put_if_current(
        &self,
        epoch: u64,
        ino: u64,
        what: &str,
        put: impl FnOnce(&dyn KernelMaps) -> Result<(), MapError>,
        set: impl FnOnce(&mut Mirror) -> &mut HashSet<u64>,
    ) {
        let mut m = self.inner.lock();
        let Some(maps) = m.maps.clone() else { return };
        if m.epoch != epoch || m.writers.contains_key(&ino) || self.inodes.generation(ino).is_none() {
            return;
        }
        match put(&*maps) {
            Ok(()) => {
                set(&mut m).insert(ino);
            }
            Err(MapError::Full) => Self::warn_full(&mut m, what),
            Err(MapError::Other(e)) => tracing::warn!("cannot update the BPF {what} map: {e}"),
        }
    }

    /// Let the programs answer read-only opens of the regular file `ino`
    /// with passthrough to its backing file, until `until`.
    fn offer_open(&self, epoch: u64, ino: u64, until: u64) {
        let Some(pt) = self.passthrough.get() else { return };
        let b = self.b(ino);
        let backend = &self.backend;
        // Outside the mirror lock: this opens the backing file.
        let Some(id) = pt.hold(ino, || {
            let fh = backend.open(b, libc::O_RDONLY).ok()?;
            let f = backend.backing_file(fh);
            backend.release(fh);
            f
        }) else {
            return;
        };
        let value = OpenValue {
            backing_id: id,
            open_flags: FOPEN_PASSTHROUGH | FOPEN_NOFLUSH,
            deadline_ns: until,
        };
        self.put_if_current(
            epoch,
            ino,
            "open",
            |maps| maps.put_open(ino, &value),
            |m| &mut m.opens,
        );
    }

    /// Let the programs answer GETXATTR of `ino`, which has no extended
    /// attributes at all, until `until`: with the errno the backend gives
    /// for a missing `security.*` and `system.posix_acl_*` name (ENODATA,
    /// or EOPNOTSUPP where the backing filesystem lacks the namespace).
    fn offer_noxattr(&self, epoch: u64, ino: u64, until: u64) {
        let b = self.b(ino);
        let errno_of = |name: &str| -> u16 {
            match self.backend.getxattr(b, OsStr::new(name)) {
                Err(e) if matches!(e.to_errno(), libc::ENODATA | libc::EOPNOTSUPP) => e.to_errno() as u16,
                _ => 0,
            }
        };
        let value = NoXattr {
            deadline_ns: until,
            security_errno: errno_of("security.selinux"),
            acl_errno: errno_of("system.posix_acl_access"),
            _pad: 0,
        };
        if value.security_errno == 0 && value.acl_errno == 0 {
            return;
        }
        self.put_if_current(
            epoch,
            ino,
            "no-xattr",
            |maps| maps.put_noxattr(ino, &value),
            |m| &mut m.noxattr,
        );
    }

    /// A writable open of `ino` through the daemon: nothing about the inode
    /// is answered by the programs until the last such open is released.
    pub fn writer_opened(&self, ino: u64) {
        *self.inner.lock().writers.entry(ino).or_default() += 1;
        self.changed(&[], &[ino]);
    }

    /// A writable open of `ino` was released.
    pub fn writer_closed(&self, ino: u64) {
        let mut m = self.inner.lock();
        if let Some(n) = m.writers.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                m.writers.remove(&ino);
            }
        }
    }

    /// Something changed: `names` (parent, name) no longer hold and the
    /// attributes of `inos` are stale. Deletes them from the maps and moves
    /// the epoch; call after the backend change and before answering or
    /// invalidating.
    pub fn changed(&self, names: &[(u64, &OsStr)], inos: &[u64]) {
        let mut m = self.inner.lock();
        m.epoch += 1;
        let Some(maps) = m.maps.clone() else { return };
        for (parent, name) in names {
            if let Some(ino) = Self::remove_key(&mut m, &(*parent, name.to_os_string())) {
                self.unmap(&mut m, &*maps, *parent, name, ino);
                Self::drop_inode(&mut m, &*maps, ino);
            }
            m.prefetched.remove(parent);
        }
        for ino in inos {
            Self::drop_inode(&mut m, &*maps, *ino);
            // Entry values carry attributes too: drop every key naming it.
            for slot in m.by_ino.remove(ino).unwrap_or_default() {
                if m.entries.remove(&slot).is_some() {
                    self.unmap(&mut m, &*maps, slot.0, &slot.1, *ino);
                }
            }
        }
        m.stats.entries = m.entries.len() as u64;
        m.stats.attrs = m.attrs.len() as u64;
    }

    /// Drop everything from the maps (invalidate-all, or a change of unknown extent).
    pub fn clear(&self) {
        let mut m = self.inner.lock();
        m.epoch += 1;
        let Some(maps) = m.maps.clone() else { return };
        m.by_ino.clear();
        let keys: Vec<((u64, OsString), u64)> = m.entries.drain().collect();
        for ((parent, name), ino) in keys {
            self.unmap(&mut m, &*maps, parent, &name, ino);
        }
        for ino in std::mem::take(&mut m.attrs) {
            maps.del_attr(ino);
        }
        for ino in std::mem::take(&mut m.opens) {
            maps.del_open(ino);
        }
        for ino in std::mem::take(&mut m.noxattr) {
            maps.del_noxattr(ino);
        }
        m.prefetched.clear();
        m.stats.entries = 0;
        m.stats.attrs = 0;
    }

    /// The kernel dropped `n` references to `ino`: add the lookups BPF
    /// answered, then take `n` off. Returns how many to forward to the
    /// backend and whether the inode left the table.
    pub fn forget(&self, ino: u64, n: u64) -> crate::inode::Forgotten {
        let mut m = self.inner.lock();
        let maps = m.maps.clone();
        if let Some(maps) = &maps {
            m.stats.reconciled += self.reconcile(ino, maps.lookups(ino));
        }
        let f = self.inodes.forget(ino, n);
        if f.removed {
            if let Some(maps) = &maps {
                self.gone(&mut m, &**maps, ino);
            }
            if let Some(pt) = self.passthrough.get() {
                pt.forgotten(ino);
            }
        }
        f
    }

    /// Should directory `dir` be prefetched now? Coalesces the miss events
    /// of one directory to one prefetch per `every`.
    pub fn should_prefetch(&self, dir: u64, every: Duration) -> bool {
        let mut m = self.inner.lock();
        if m.maps.is_none() {
            return false;
        }
        let now = Instant::now();
        match m.prefetched.get(&dir) {
            Some(t) if now.duration_since(*t) < every => false,
            _ => {
                m.prefetched.insert(dir, now);
                m.stats.prefetches += 1;
                true
            }
        }
    }

    /// Count a miss event received.
    pub fn event(&self) {
        self.inner.lock().stats.events += 1;
    }

    fn fold_counters(s: &mut BpfStats, c: &[u64; COUNTERS as usize]) {
        use efuse_common::ops::*;
        s.lookup_hits = c[CTR_LOOKUP_HIT as usize];
        s.lookup_misses = c[CTR_LOOKUP_MISS as usize];
        s.getattr_hits = c[CTR_GETATTR_HIT as usize];
        s.getattr_misses = c[CTR_GETATTR_MISS as usize];
        s.lookups_map_full = c[CTR_LOOKUPS_FULL as usize];
        s.events_dropped = c[CTR_EVENTS_DROPPED as usize];
        s.races = c[CTR_RACES as usize];
        s.expired = c[CTR_EXPIRED as usize];
        s.open_hits = c[CTR_OPEN_HIT as usize];
        s.open_misses = c[CTR_OPEN_MISS as usize];
        s.ioctl_hits = c[CTR_IOCTL_HIT as usize];
        s.getxattr_hits = c[CTR_GETXATTR_HIT as usize];
        s.getxattr_misses = c[CTR_GETXATTR_MISS as usize];
    }

    /// Statistics, with the programs' counters (of the current or last
    /// attachment).
    pub fn stats(&self) -> BpfStats {
        let m = self.inner.lock();
        let mut s = m.stats.clone();
        if let Some(maps) = &m.maps {
            Self::fold_counters(&mut s, &maps.counters());
            s.answers = maps.answers();
            s.entry_capacity = maps.capacities().0.min(u64::MAX as usize) as u64;
        }
        s.opens = m.opens.len() as u64;
        s.noxattr = m.noxattr.len() as u64;
        drop(m);
        if let Some(pt) = self.passthrough.get() {
            (s.backing_ids, s.backing_held, s.backing_full) = pt.counts();
        }
        s
    }
}

/// An in-memory [`KernelMaps`] that answers like the BPF programs, for
/// tests of the accounting without a patched kernel.
#[derive(Default)]
pub struct ModelMaps {
    /// Entry map.
    pub entries: Mutex<HashMap<(u64, Vec<u8>), EntryValue>>,
    /// Attribute map.
    pub attrs: Mutex<HashMap<u64, AttrValue>>,
    /// Lookup counts.
    pub lookups: Mutex<HashMap<u64, u64>>,
    /// No-xattr map.
    pub noxattr: Mutex<HashMap<u64, NoXattr>>,
    /// Open map.
    pub opens: Mutex<HashMap<u64, OpenValue>>,
    /// Capacity of the entry map (0 = unbounded).
    pub capacity: usize,
    /// The optional programs the model has.
    pub answers: Answers,
}

impl ModelMaps {
    /// What `efuse_lookup` does: answer from the entry map, counting the lookup.
    pub fn bpf_lookup(&self, parent: u64, name: &str) -> Option<u64> {
        let v = *self.entries.lock().get(&(parent, name.as_bytes().to_vec()))?;
        *self.lookups.lock().entry(v.out.nodeid).or_default() += 1;
        Some(v.out.nodeid)
    }
}

impl KernelMaps for ModelMaps {
    fn put_entry(&self, key: &NameKey, value: &EntryValue) -> Result<(), MapError> {
        let mut e = self.entries.lock();
        let k = (key.parent, key.name[..key.namelen as usize].to_vec());
        if self.capacity > 0 && e.len() >= self.capacity && !e.contains_key(&k) {
            // As the kernel's LRU map: room is made by evicting (here the
            // smallest key; the kernel's choice is the least recently used).
            if let Some(victim) = e.keys().min().cloned() {
                e.remove(&victim);
            }
        }
        e.insert(k, *value);
        Ok(())
    }
    fn del_entry(&self, key: &NameKey) {
        self.entries
            .lock()
            .remove(&(key.parent, key.name[..key.namelen as usize].to_vec()));
    }
    fn put_attr(&self, ino: u64, value: &AttrValue) -> Result<(), MapError> {
        self.attrs.lock().insert(ino, *value);
        Ok(())
    }
    fn del_attr(&self, ino: u64) {
        self.attrs.lock().remove(&ino);
    }
    fn lookups(&self, ino: u64) -> u64 {
        self.lookups.lock().get(&ino).copied().unwrap_or(0)
    }
    fn del_lookups(&self, ino: u64) {
        self.lookups.lock().remove(&ino);
    }
    fn counters(&self) -> [u64; COUNTERS as usize] {
        [0; COUNTERS as usize]
    }
    fn answers(&self) -> Answers {
        self.answers
    }
    fn put_open(&self, ino: u64, value: &OpenValue) -> Result<(), MapError> {
        self.opens.lock().insert(ino, *value);
        Ok(())
    }
    fn del_open(&self, ino: u64) {
        self.opens.lock().remove(&ino);
    }
    fn put_noxattr(&self, ino: u64, value: &NoXattr) -> Result<(), MapError> {
        self.noxattr.lock().insert(ino, *value);
        Ok(())
    }
    fn del_noxattr(&self, ino: u64) {
        self.noxattr.lock().remove(&ino);
    }
    fn capacities(&self) -> (usize, usize) {
        let cap = if self.capacity > 0 {
            self.capacity
        } else {
            usize::MAX
        };
        (cap, usize::MAX)
    }
    fn entry_keys(&self) -> Vec<NameKey> {
        self.entries
            .lock()
            .keys()
            .filter_map(|(p, n)| NameKey::new(*p, n))
            .collect()
    }
    fn attr_keys(&self) -> Vec<u64> {
        self.attrs.lock().keys().copied().collect()
    }
    fn noxattr_keys(&self) -> Vec<u64> {
        self.noxattr.lock().keys().copied().collect()
    }
}
