//! The kernel maps of the bpf tier, as the daemon writes them: the
//! [`KernelMaps`] interface the mirror uses, its implementation over the
//! aya maps of an attached instance ([`BpfMaps`]), and an in-memory model
//! that answers like the programs ([`ModelMaps`], for tests without a
//! hook).
//!
//! Invariants: deleting an absent key is not an error; a full map is
//! [`MapError::Full`] (the LRU maps never are: the kernel evicts instead).

use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError as AyaMapError, PerCpuArray};
use efuse_common::ops::{AttrValue, COUNTERS, EntryValue, NameKey, NoXattr, OpenValue};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

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
/// by [`BpfMaps`]; tests use an in-memory model.
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

/// The maps of an attached instance, as [`KernelMaps`].
pub struct BpfMaps {
    pub(super) entries: Mutex<BpfHashMap<MapData, NameKey, EntryValue>>,
    pub(super) attrs: Mutex<BpfHashMap<MapData, u64, AttrValue>>,
    pub(super) lookups: Mutex<BpfHashMap<MapData, u64, u64>>,
    pub(super) counters: PerCpuArray<MapData, u64>,
    pub(super) opens: Mutex<BpfHashMap<MapData, u64, OpenValue>>,
    pub(super) noxattr: Mutex<BpfHashMap<MapData, u64, NoXattr>>,
    pub(super) answers: Answers,
    /// Capacities of the entry and attribute maps.
    pub(super) capacities: (usize, usize),
}

fn map_error(e: AyaMapError) -> MapError {
    if let AyaMapError::SyscallError(s) = &e
        && matches!(
            s.io_error.raw_os_error(),
            Some(libc::E2BIG | libc::ENOMEM | libc::ENOSPC)
        )
    {
        return MapError::Full;
    }
    MapError::Other(e.to_string())
}

fn is_absent(e: &AyaMapError) -> bool {
    matches!(e, AyaMapError::KeyNotFound)
        || matches!(e, AyaMapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

impl KernelMaps for BpfMaps {
    fn put_entry(&self, key: &NameKey, value: &EntryValue) -> Result<(), MapError> {
        self.entries.lock().insert(key, value, 0).map_err(map_error)
    }
    fn del_entry(&self, key: &NameKey) {
        if let Err(e) = self.entries.lock().remove(key)
            && !is_absent(&e)
        {
            tracing::error!("cannot delete from the BPF entry map: {e}");
        }
    }
    fn put_attr(&self, ino: u64, value: &AttrValue) -> Result<(), MapError> {
        self.attrs.lock().insert(ino, value, 0).map_err(map_error)
    }
    fn del_attr(&self, ino: u64) {
        if let Err(e) = self.attrs.lock().remove(&ino)
            && !is_absent(&e)
        {
            tracing::error!("cannot delete from the BPF attribute map: {e}");
        }
    }
    fn lookups(&self, ino: u64) -> u64 {
        match self.lookups.lock().get(&ino, 0) {
            Ok(n) => n,
            Err(e) if is_absent(&e) => 0,
            Err(e) => {
                tracing::error!(ino, "cannot read the BPF lookup count: {e}");
                0
            }
        }
    }
    fn del_lookups(&self, ino: u64) {
        let _ = self.lookups.lock().remove(&ino);
    }
    fn counters(&self) -> [u64; COUNTERS as usize] {
        let mut out = [0; COUNTERS as usize];
        for (i, o) in out.iter_mut().enumerate() {
            if let Ok(v) = self.counters.get(&(i as u32), 0) {
                *o = v.iter().sum();
            }
        }
        out
    }
    fn answers(&self) -> Answers {
        self.answers
    }
    fn put_open(&self, ino: u64, value: &OpenValue) -> Result<(), MapError> {
        self.opens.lock().insert(ino, value, 0).map_err(map_error)
    }
    fn del_open(&self, ino: u64) {
        if let Err(e) = self.opens.lock().remove(&ino)
            && !is_absent(&e)
        {
            tracing::error!("cannot delete from the BPF open map: {e}");
        }
    }
    fn put_noxattr(&self, ino: u64, value: &NoXattr) -> Result<(), MapError> {
        self.noxattr.lock().insert(ino, value, 0).map_err(map_error)
    }
    fn del_noxattr(&self, ino: u64) {
        if let Err(e) = self.noxattr.lock().remove(&ino)
            && !is_absent(&e)
        {
            tracing::error!("cannot delete from the BPF no-xattr map: {e}");
        }
    }
    fn capacities(&self) -> (usize, usize) {
        self.capacities
    }
    fn entry_keys(&self) -> Vec<NameKey> {
        self.entries.lock().keys().filter_map(Result::ok).collect()
    }
    fn attr_keys(&self) -> Vec<u64> {
        self.attrs.lock().keys().filter_map(Result::ok).collect()
    }
    fn noxattr_keys(&self) -> Vec<u64> {
        self.noxattr.lock().keys().filter_map(Result::ok).collect()
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
