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
//!   out is always pinned. It also pins its directory, as a kernel dentry
//!   pins its parent: a backend watches the directories it holds, so every
//!   change in the directory reaches the maps while they name its entries.
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
//! - **Deadlines only grow.** The same answer is offered by several paths
//!   (a LOOKUP reply, a prefetch, a GETATTR reply) that race; an offer may
//!   extend an open or no-xattr answer's deadline but never shortens what
//!   an earlier one promised. Only a change, which deletes it, does.
//! - **Opens and xattrs.** Taking attributes, the mirror says which extra
//!   answers it would take for the inode ([`Extras`]): the filesystem
//!   then looks them up and offers a regular file's read-only opens (a
//!   passthrough backing id it holds for the inode) and the no-xattr
//!   record of an inode with no extended attributes at all. Both are
//!   dropped with the inode's attributes (every change above), and neither
//!   is taken while the inode has writers open through the daemon
//!   ([`Writers`]): their passthrough writes change size and times without
//!   telling it.
//! - **No backend.** The mirror is told facts; it never reads the backend.
//!   The one thing it needs from below is pins ([`Pins`]).
//!
//! Lock order: the mirror lock, then the inode table, then the pins (the
//! backend) and the passthrough table.

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

use super::BpfStats;
use super::maps::{KernelMaps, MapError};
use crate::backend::{Attr, FileKind};
use crate::fs::inode::{FUSE_ROOT, InodeTable};
use crate::fs::passthrough::Passthrough;
use crate::transport::wire::fuse_attr;

/// How the mirror holds the inodes its map entries name, and their
/// directories: one pin each per entry (a program may hand the inode to
/// the kernel at any time, and a change in the directory must be seen),
/// taken and given back through the filesystem, which pins them in the
/// backend.
pub trait Pins: Send + Sync {
    /// Pin FUSE inode `ino` once more; false if it is gone.
    fn pin(&self, ino: u64) -> bool;
    /// Give back `n` pins of `ino`.
    fn unpin(&self, ino: u64, n: u64);
}

/// Writable opens per inode through the daemon, kept by the filesystem
/// on every tier (a tier attached later must know of the writers already
/// open): the programs answer nothing about such an inode.
#[derive(Default)]
pub struct Writers(Mutex<HashMap<u64, u32>>);

impl Writers {
    /// A writable open of `ino`; tell an attached tier
    /// ([`BpfMirror::changed`]) after this.
    pub fn opened(&self, ino: u64) {
        *self.0.lock().entry(ino).or_default() += 1;
    }

    /// A writable open of `ino` was released.
    pub fn closed(&self, ino: u64) {
        let mut w = self.0.lock();
        if let Some(n) = w.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                w.remove(&ino);
            }
        }
    }

    fn any(&self, ino: u64) -> bool {
        self.0.lock().contains_key(&ino)
    }
}

/// The extra answers the mirror would take for an inode whose attributes
/// it took: the filesystem looks up what they need (the backend's xattr
/// list, a backing file) and offers them with [`BpfMirror::put_open`] and
/// [`BpfMirror::put_noxattr`].
#[must_use = "the filesystem offers the extras the mirror asks for"]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extras {
    /// The inode.
    pub ino: u64,
    /// Its read-only opens (a regular file, on a local backend).
    pub open: bool,
    /// Its no-xattr record (xattrs are served).
    pub noxattr: bool,
    /// Until when the answers hold (CLOCK_MONOTONIC ns).
    pub until: u64,
}

impl Extras {
    /// Whether any extra is wanted.
    pub fn any(&self) -> bool {
        self.open || self.noxattr
    }
}

/// What a mirror is built over: the filesystem's side of the tier.
pub struct Host {
    /// The inode table: lookup counts, map references.
    pub inodes: Arc<InodeTable>,
    /// Pins for map entries.
    pub pins: Arc<dyn Pins>,
    /// Writable opens through the daemon.
    pub writers: Arc<Writers>,
    /// The connection's backing ids (none in tests of the filesystem alone).
    pub passthrough: Option<Arc<Passthrough>>,
    /// Most entries held at once (each pins a backend inode, which for a
    /// backend holding a descriptor per inode is a descriptor).
    pub max_entries: usize,
    /// Opens may be answered (a local backend: a backing file exists).
    pub opens: bool,
    /// The mount serves extended attributes (else the kernel stops asking).
    pub xattrs: bool,
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
    /// Inodes in the open map, with the deadline of their answer.
    opens: HashMap<u64, u64>,
    /// Inodes in the no-xattr map, with the deadline of their answer.
    noxattr: HashMap<u64, u64>,
    epoch: u64,
    /// Last prefetch of each directory, to coalesce miss events.
    prefetched: HashMap<u64, Instant>,
    full_warned: bool,
    stats: BpfStats,
}

/// The mirror of the kernel maps of one attachment. See the module docs.
pub struct BpfMirror {
    inner: Mutex<Mirror>,
    host: Host,
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

fn deadline(now: u64, ttl: Duration) -> u64 {
    now.saturating_add(ttl.as_nanos().min(u64::MAX as u128) as u64)
}

impl BpfMirror {
    /// A mirror filling `maps` (empty) for the filesystem `host`.
    pub fn new(host: Host, maps: Arc<dyn KernelMaps>) -> Self {
        let m = Mirror {
            maps: Some(maps),
            stats: BpfStats {
                attached: true,
                ..Default::default()
            },
            ..Default::default()
        };
        Self {
            inner: Mutex::new(m),
            host,
        }
    }

    /// The current epoch: read it before a backend call whose result will
    /// be offered to [`Self::put_entry`] / [`Self::put_attr`].
    pub fn epoch(&self) -> u64 {
        self.inner.lock().epoch
    }

    /// Stop using the maps. Call only once the programs can no longer run
    /// (after the struct_ops link is gone): every BPF lookup count is then
    /// final and is added to the inode table, and every map reference is
    /// released. Later offers are ignored. Returns the final statistics.
    pub fn detach(&self) -> BpfStats {
        let mut m = self.inner.lock();
        let Some(maps) = m.maps.take() else {
            return m.stats.clone();
        };
        m.epoch += 1;
        m.stats.attached = false;
        // Keep the programs' final counters for `efuse stats`.
        Self::fold_counters(&mut m.stats, &maps.counters());
        m.by_ino.clear();
        let keys: Vec<((u64, OsString), u64)> = m.entries.drain().collect();
        for ((parent, name), ino) in keys {
            self.unmap(&mut m, &*maps, parent, &name, ino);
        }
        for ino in self.host.inodes.all() {
            let total = maps.lookups(ino);
            m.stats.reconciled += self.reconcile(ino, total);
        }
        // The counts will not be read again; a later attach starts at zero.
        self.host.inodes.reset_bpf_seen();
        m.attrs.clear();
        m.opens.clear();
        m.noxattr.clear();
        m.prefetched.clear();
        m.stats.entries = 0;
        m.stats.attrs = 0;
        m.stats.opens = 0;
        m.stats.noxattr = 0;
        m.stats.clone()
    }

    fn reconcile(&self, ino: u64, total: u64) -> u64 {
        let pins = &self.host.pins;
        self.host.inodes.reconcile(ino, total, |n| {
            for _ in 0..n {
                if !pins.pin(ino) {
                    tracing::error!(ino, "cannot pin an inode the kernel got from BPF");
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
        let removed = self.host.inodes.map_unref(ino);
        self.host.pins.unpin(ino, 1);
        // The directory's pin the key held (see put_entry).
        self.host.pins.unpin(parent, 1);
        if removed {
            self.gone(m, maps, ino);
        }
    }

    /// `ino` left the inode table: nothing can answer for it any more.
    fn gone(&self, m: &mut Mirror, maps: &dyn KernelMaps, ino: u64) {
        maps.del_lookups(ino);
        Self::drop_inode(m, maps, ino);
        // Out of the table: the kernel holds no inode, so no open file.
        if let Some(pt) = &self.host.passthrough {
            pt.forgotten(ino);
        }
    }

    /// Delete what the maps say about `ino` itself (attributes, open,
    /// xattrs); the keys naming it stay.
    fn drop_inode(m: &mut Mirror, maps: &dyn KernelMaps, ino: u64) {
        if m.attrs.remove(&ino) {
            maps.del_attr(ino);
        }
        if m.opens.remove(&ino).is_some() {
            maps.del_open(ino);
        }
        if m.noxattr.remove(&ino).is_some() {
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
            m.noxattr.retain(|i, _| present.contains(i));
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
    /// over (else the mirror pins it). Dropped if the epoch moved. Returns
    /// the extra answers wanted for the inode (see [`Self::put_attr`]).
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
    ) -> Extras {
        let ino = attr.ino;
        // Not taken: the caller's pin, if it handed one over, goes back.
        let refuse = || {
            if pin_held {
                self.host.pins.unpin(ino, 1);
            }
            Extras::default()
        };
        let mut m = self.inner.lock();
        let Some(maps) = m.maps.clone() else {
            return refuse();
        };
        let key = match NameKey::new(parent, name.as_bytes()) {
            Some(k)
                if m.epoch == epoch
                    && ino != FUSE_ROOT
                    && !entry_ttl.is_zero()
                    && !self.host.writers.any(ino) =>
            {
                k
            }
            _ => return refuse(),
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
                value.out.generation = self.host.inodes.generation(ino).unwrap_or(0);
                if maps.put_entry(&key, &value).is_err() {
                    // Could not refresh: drop it rather than keep old data.
                    Self::remove_key(&mut m, &slot);
                    self.unmap(&mut m, &*maps, parent, name, ino);
                }
                if pin_held {
                    self.host.pins.unpin(ino, 1);
                }
                drop(m);
                return self.put_attr(epoch, attr, attr_ttl);
            }
            Some(old) => {
                Self::remove_key(&mut m, &slot);
                self.unmap(&mut m, &*maps, parent, name, old);
            }
            None => {}
        }
        if m.entries.len() >= self.host.max_entries {
            Self::warn_full(&mut m, "entry (descriptor budget)");
            return refuse();
        }
        if !pin_held && !self.host.pins.pin(ino) {
            return Extras::default();
        }
        // A key also pins its directory, which keeps the directory watched
        // (a backend watches the directories it holds): every change in it
        // reaches the maps for as long as they name its entries, even once
        // the kernel and the maps hold nothing of the directory itself.
        if !self.host.pins.pin(parent) {
            self.host.pins.unpin(ino, 1);
            return Extras::default();
        }
        value.out.generation = self.host.inodes.map_ref(ino, parent, name);
        match maps.put_entry(&key, &value) {
            Ok(()) => {
                Self::insert_key(&mut m, slot, ino);
                self.sync_evictions(&mut m, &*maps);
                m.stats.entries = m.entries.len() as u64;
            }
            Err(e) => {
                if self.host.inodes.map_unref(ino) {
                    self.gone(&mut m, &*maps, ino);
                }
                self.host.pins.unpin(ino, 1);
                self.host.pins.unpin(parent, 1);
                match e {
                    MapError::Full => Self::warn_full(&mut m, "entry"),
                    MapError::Other(e) => tracing::warn!("cannot update the BPF entry map: {e}"),
                }
                return Extras::default();
            }
        }
        drop(m);
        self.put_attr(epoch, attr, attr_ttl)
    }

    /// Offer the attributes of an inode the kernel holds (FUSE numbers).
    /// Returns the extra answers wanted for it: offered again with every
    /// attribute refresh, also when present, as the answers carry the new
    /// deadline (expired ones ask the daemon, whose GETATTR reply lands
    /// here).
    pub fn put_attr(&self, epoch: u64, attr: &Attr, attr_ttl: Duration) -> Extras {
        let mut m = self.inner.lock();
        let Some(maps) = m.maps.clone() else {
            return Extras::default();
        };
        if m.epoch != epoch
            || attr_ttl.is_zero()
            || self.host.writers.any(attr.ino)
            || self.host.inodes.generation(attr.ino).is_none()
        {
            return Extras::default();
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
            Err(MapError::Full) => {
                Self::warn_full(&mut m, "attribute");
                return Extras::default();
            }
            Err(MapError::Other(e)) => {
                tracing::warn!("cannot update the BPF attribute map: {e}");
                return Extras::default();
            }
        }
        let (open, noxattr) = self.extras(&*maps);
        Extras {
            ino: attr.ino,
            open: open && attr.kind == FileKind::File,
            noxattr,
            until,
        }
    }

    /// Which extra answers the attached programs and this mount can give:
    /// (opens: local backends only; no-xattr: only if xattrs are served).
    fn extras(&self, maps: &dyn KernelMaps) -> (bool, bool) {
        let a = maps.answers();
        (
            a.open && self.host.opens && self.host.passthrough.is_some(),
            a.getxattr && self.host.xattrs,
        )
    }

    /// A request an extra answer would have answered reached the daemon
    /// (the answer had expired while the kernel's attributes had not, so
    /// no GETATTR renewed it): the read-only open of a regular file
    /// (`open`) or a GETXATTR that found nothing. Returns the extra wanted
    /// again, valid for `ttl`.
    pub fn renew(&self, ino: u64, ttl: Duration, open: bool) -> Extras {
        let Some(maps) = self.inner.lock().maps.clone() else {
            return Extras::default();
        };
        if ttl.is_zero() {
            return Extras::default();
        }
        let (can_open, can_noxattr) = self.extras(&*maps);
        Extras {
            ino,
            open: open && can_open,
            noxattr: !open && can_noxattr,
            until: deadline(monotonic_ns(), ttl),
        }
    }

    /// Put an extra answer for `x.ino` into a map if nothing changed since
    /// `epoch` and the inode has no writer; `put` does the map update with
    /// the deadline, `set` names the mirror's record.
    ///
    /// A deadline never moves earlier: answers offered by different paths
    /// race (a LOOKUP reply with the watched TTL, a prefetch or a GETATTR
    /// with the plain one), and the one landing last must not take back
    /// what an earlier one promised. Only a change (which deletes the
    /// record) does.
    fn put_if_current(
        &self,
        epoch: u64,
        x: Extras,
        what: &str,
        put: impl FnOnce(&dyn KernelMaps, u64) -> Result<(), MapError>,
        set: impl Fn(&mut Mirror) -> &mut HashMap<u64, u64>,
    ) {
        let mut m = self.inner.lock();
        let Some(maps) = m.maps.clone() else { return };
        let ino = x.ino;
        if m.epoch != epoch || self.host.writers.any(ino) || self.host.inodes.generation(ino).is_none() {
            return;
        }
        let until = set(&mut m).get(&ino).map_or(x.until, |d| x.until.max(*d));
        match put(&*maps, until) {
            Ok(()) => {
                set(&mut m).insert(ino, until);
            }
            Err(MapError::Full) => Self::warn_full(&mut m, what),
            Err(MapError::Other(e)) => tracing::warn!("cannot update the BPF {what} map: {e}"),
        }
    }

    /// Let the programs answer read-only opens of the regular file `x.ino`
    /// with passthrough through `backing_id` (held for the inode), until
    /// `x.until` or a later deadline it already has; `epoch` was read
    /// before the backend calls.
    pub fn put_open(&self, epoch: u64, x: Extras, backing_id: u32) {
        let put = |maps: &dyn KernelMaps, until| {
            let value = OpenValue {
                backing_id,
                open_flags: FOPEN_PASSTHROUGH | FOPEN_NOFLUSH,
                deadline_ns: until,
            };
            maps.put_open(x.ino, &value)
        };
        self.put_if_current(epoch, x, "open", put, |m| &mut m.opens);
    }

    /// Let the programs answer GETXATTR of `x.ino`, which has no extended
    /// attributes at all, until `x.until` (or a later deadline it already
    /// has): with the errno the backend gives for a missing `security.*`
    /// and `system.posix_acl_*` name (ENODATA, or EOPNOTSUPP where the
    /// backing filesystem lacks the namespace; 0 lets the daemon answer
    /// that namespace).
    pub fn put_noxattr(&self, epoch: u64, x: Extras, security_errno: u16, acl_errno: u16) {
        if security_errno == 0 && acl_errno == 0 {
            return;
        }
        let put = |maps: &dyn KernelMaps, until| {
            let value = NoXattr {
                deadline_ns: until,
                security_errno,
                acl_errno,
                _pad: 0,
            };
            maps.put_noxattr(x.ino, &value)
        };
        self.put_if_current(epoch, x, "no-xattr", put, |m| &mut m.noxattr);
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
        for ino in std::mem::take(&mut m.opens).into_keys() {
            maps.del_open(ino);
        }
        for ino in std::mem::take(&mut m.noxattr).into_keys() {
            maps.del_noxattr(ino);
        }
        m.prefetched.clear();
        m.stats.entries = 0;
        m.stats.attrs = 0;
    }

    /// The kernel dropped `n` references to `ino`: add the lookups BPF
    /// answered, then take `n` off. Returns how many to forward to the
    /// backend and whether the inode left the table.
    pub fn forget(&self, ino: u64, n: u64) -> crate::fs::inode::Forgotten {
        let mut m = self.inner.lock();
        let maps = m.maps.clone();
        if let Some(maps) = &maps {
            m.stats.reconciled += self.reconcile(ino, maps.lookups(ino));
        }
        let f = self.host.inodes.forget(ino, n);
        if f.removed {
            match &maps {
                Some(maps) => self.gone(&mut m, &**maps, ino),
                None => {
                    if let Some(pt) = &self.host.passthrough {
                        pt.forgotten(ino);
                    }
                }
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

    /// Statistics, with the programs' counters.
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
        s
    }
}

#[cfg(test)]
mod tests {
    //! The mirror alone, over model maps: no filesystem, no backend, no
    //! mount. Pins are counted per inode.
    use super::*;
    use crate::bpf::{Answers, ModelMaps};

    #[derive(Default)]
    struct CountPins(Mutex<HashMap<u64, i64>>);
    impl Pins for CountPins {
        fn pin(&self, ino: u64) -> bool {
            *self.0.lock().entry(ino).or_default() += 1;
            true
        }
        fn unpin(&self, ino: u64, n: u64) {
            *self.0.lock().entry(ino).or_default() -= n as i64;
        }
    }
    impl CountPins {
        fn of(&self, ino: u64) -> i64 {
            self.0.lock().get(&ino).copied().unwrap_or(0)
        }
    }

    struct Rig {
        mirror: BpfMirror,
        maps: Arc<ModelMaps>,
        pins: Arc<CountPins>,
        inodes: Arc<InodeTable>,
        writers: Arc<Writers>,
    }

    fn rig(capacity: usize) -> Rig {
        let maps = Arc::new(ModelMaps {
            capacity,
            answers: Answers {
                open: true,
                ioctl: true,
                getxattr: true,
            },
            ..Default::default()
        });
        let pins = Arc::new(CountPins::default());
        let inodes = Arc::new(InodeTable::new(1));
        let writers = Arc::new(Writers::default());
        let host = Host {
            inodes: inodes.clone(),
            pins: pins.clone(),
            writers: writers.clone(),
            passthrough: None,
            max_entries: usize::MAX,
            opens: true,
            xattrs: true,
        };
        Rig {
            mirror: BpfMirror::new(host, maps.clone()),
            maps,
            pins,
            inodes,
            writers,
        }
    }

    fn file(ino: u64) -> Attr {
        let t = std::time::SystemTime::UNIX_EPOCH;
        Attr {
            ino,
            size: 0,
            blocks: 0,
            atime: t,
            mtime: t,
            ctime: t,
            kind: FileKind::File,
            perm: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
        }
    }

    const TTL: Duration = Duration::from_secs(60);
    const ENODATA: u16 = libc::ENODATA as u16;

    impl Rig {
        /// Offer `name` in the root -> `ino`, as the filesystem does for a
        /// lookup reply the kernel got (its own pin and count).
        fn lookup(&self, name: &str, ino: u64) -> Extras {
            self.pins.pin(ino);
            self.inodes.remember(ino, 1, OsStr::new(name));
            let epoch = self.mirror.epoch();
            self.mirror
                .put_entry(epoch, 1, OsStr::new(name), &file(ino), TTL, TTL, false)
        }
    }

    #[test]
    fn an_entry_holds_one_pin_until_its_name_changes() {
        let r = rig(0);
        let x = r.lookup("f", 5);
        assert_eq!(r.maps.bpf_lookup(1, "f"), Some(5));
        assert_eq!(r.pins.of(5), 2, "the map reference pins the inode");
        assert_eq!(r.pins.of(1), 1, "and its directory");
        assert!(r.maps.attrs.lock().contains_key(&5));
        // Attributes taken: the filesystem is asked for both extras, as
        // the model has both programs and the mount serves xattrs; no
        // passthrough table (no session), so no opens.
        assert_eq!((x.ino, x.open, x.noxattr), (5, false, true));
        // The kernel forgets its own lookup and the one BPF answered: the
        // inode stays, named by the map.
        let f = r.mirror.forget(5, 2);
        r.pins.unpin(5, f.taken);
        assert_eq!(r.inodes.excess_forgets(), 0);
        assert_eq!(r.pins.of(5), 1, "the map's pin");
        assert_eq!(r.inodes.nlookup(5), 0);
        assert!(r.inodes.generation(5).is_some(), "freed while the map names it");
        // The name goes: out of the maps, pin given back, inode gone.
        r.mirror.changed(&[(1, OsStr::new("f"))], &[]);
        assert!(r.maps.entries.lock().is_empty());
        assert!(r.maps.attrs.lock().is_empty());
        assert_eq!(r.pins.of(5), 0);
        assert_eq!(r.pins.of(1), 0, "the directory's pin went with the key");
        assert!(r.inodes.generation(5).is_none());
    }

    #[test]
    fn an_offer_older_than_a_change_is_dropped() {
        let r = rig(0);
        r.inodes.remember(5, 1, OsStr::new("f"));
        // The pin of a listing, to be taken over by the entry.
        r.pins.pin(5);
        let epoch = r.mirror.epoch();
        r.mirror.changed(&[], &[5]);
        let x = r
            .mirror
            .put_entry(epoch, 1, OsStr::new("f"), &file(5), TTL, TTL, true);
        assert!(!x.any());
        assert!(r.maps.entries.lock().is_empty());
        // The pin handed over was given back.
        assert_eq!(r.pins.of(5), 0);
        let x = r.mirror.put_attr(epoch, &file(5), TTL);
        assert!(!x.any() && r.maps.attrs.lock().is_empty());
    }

    #[test]
    fn an_extra_answer_is_never_shortened_but_a_change_drops_it() {
        let r = rig(0);
        let long = r.lookup("f", 5);
        assert!(long.noxattr);
        let epoch = r.mirror.epoch();
        r.mirror.put_noxattr(epoch, long, ENODATA, ENODATA);
        // A second path offers the same answer with a shorter TTL (a
        // GETATTR after a LOOKUP in a watched directory), and lands last.
        let short = r.mirror.put_attr(epoch, &file(5), Duration::from_secs(1));
        assert!(short.until < long.until);
        r.mirror.put_noxattr(epoch, short, ENODATA, ENODATA);
        assert_eq!(r.maps.noxattr.lock()[&5].deadline_ns, long.until);
        // A later deadline is taken.
        let later = Extras {
            until: long.until + 1,
            ..long
        };
        r.mirror.put_noxattr(epoch, later, ENODATA, ENODATA);
        assert_eq!(r.maps.noxattr.lock()[&5].deadline_ns, later.until);
        // A change deletes the answer; the next offer starts afresh.
        r.mirror.changed(&[], &[5]);
        assert!(r.maps.noxattr.lock().is_empty());
        let epoch = r.mirror.epoch();
        let x = r.mirror.put_attr(epoch, &file(5), Duration::from_secs(1));
        r.mirror.put_noxattr(epoch, x, ENODATA, ENODATA);
        assert_eq!(r.maps.noxattr.lock()[&5].deadline_ns, x.until);
    }

    #[test]
    fn writers_keep_an_inode_out_of_the_maps() {
        let r = rig(0);
        r.writers.opened(5);
        let x = r.lookup("f", 5);
        assert!(!x.any());
        assert!(r.maps.entries.lock().is_empty() && r.maps.attrs.lock().is_empty());
        r.writers.closed(5);
        let _ = r.lookup("f", 5);
        assert!(r.maps.attrs.lock().contains_key(&5));
    }

    #[test]
    fn detach_takes_over_the_counts_and_ignores_later_offers() {
        let r = rig(0);
        let _ = r.lookup("f", 5);
        let _ = r.lookup("g", 6);
        r.maps.bpf_lookup(1, "f");
        r.maps.bpf_lookup(1, "f");
        let st = r.mirror.detach();
        assert!(!st.attached);
        assert_eq!(st.reconciled, 2);
        // The kernel holds f three times (one from the daemon, two from
        // BPF), g once; every map pin is back.
        assert_eq!(r.inodes.nlookup(5), 3);
        assert_eq!(r.inodes.nlookup(6), 1);
        assert_eq!(r.pins.of(5), 3, "one pin per kernel reference");
        assert_eq!(r.pins.of(6), 1);
        let x = r.lookup("h", 7);
        assert!(!x.any() && !r.maps.entries.lock().contains_key(&(1, b"h".to_vec())));
    }

    #[test]
    fn evictions_of_a_full_map_are_released() {
        let r = rig(8);
        for i in 0..40 {
            let _ = r.lookup(&format!("f{i:02}"), 100 + i);
        }
        let st = r.mirror.stats();
        assert!(st.entries <= 9, "{st:?}");
        assert!(st.evicted >= 31, "{st:?}");
        assert_eq!(st.map_full, 0);
        // Each evicted entry gave its pin back; the kept ones hold one
        // besides the kernel's.
        let held: i64 = (100..140).map(|i| r.pins.of(i)).sum();
        assert_eq!(held, 40 + st.entries as i64);
    }
}
