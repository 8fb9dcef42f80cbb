//! The `bpf` tier: efuse's BPF programs (`efuse-ebpf/src/ops.rs`) answer
//! LOOKUP, GETATTR, read-only OPEN, IOCTL and GETXATTR of one FUSE
//! connection in the kernel, from maps the daemon fills.
//!
//! What this subsystem owns, and nothing else does:
//! - [`loader`]: loading the programs and attaching them through the
//!   `efuse_bpf_ops` struct_ops hook (built in, or efuse.ko's), with
//!   [`btf`] to find the hook's types and `sys` for the raw bpf(2) calls
//!   aya cannot make;
//! - [`maps`]: the kernel maps as the daemon writes them;
//! - [`mirror`]: what is in the maps, kept a subset of what the daemon
//!   knows (the invariants are there);
//! - [`events`]: the programs' miss events.
//!
//! The filesystem (`crate::fs`) tells an attached [`Tier`] about entries,
//! attributes and changes; the tier never calls the backend, and the
//! filesystem's inode table alone counts lookups (the tier adds the
//! lookups its programs answered to it, [`crate::fs::inode`]). The tier exists
//! only while the programs are attached: on any other tier, and once
//! detached, there is none ([`Slot`] is empty), so no request pays for it.

pub mod btf;
pub mod events;
pub mod loader;
pub mod maps;
pub mod mirror;
mod sys;

use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

pub use events::Misses;
pub use maps::{Answers, KernelMaps, MapError, ModelMaps};
pub use mirror::{BpfMirror, Extras, Host, Pins, Writers};

use crate::config::BpfConfig;
use crate::kfuse::Hook;

/// One attachment of the programs to a connection, with the mirror of its
/// maps. Dereferences to the [`BpfMirror`] the filesystem talks to.
pub struct Tier {
    mirror: BpfMirror,
    programs: Mutex<Option<loader::Programs>>,
    stop_misses: Option<events::StopMisses>,
    hook: Option<Hook>,
}

impl std::ops::Deref for Tier {
    type Target = BpfMirror;
    fn deref(&self) -> &BpfMirror {
        &self.mirror
    }
}

impl Tier {
    /// Load the programs and attach them through `hook` to connection
    /// `dev`, for the filesystem `host`. The miss events are the caller's
    /// to read.
    pub fn attach(hook: Hook, dev: u32, cfg: &BpfConfig, host: Host) -> anyhow::Result<(Arc<Self>, Misses)> {
        let (maps, programs, misses) = loader::attach(&hook, dev, cfg)?;
        let tier = Self {
            mirror: BpfMirror::new(host, maps),
            programs: Mutex::new(Some(programs)),
            stop_misses: Some(misses.stopper()),
            hook: Some(hook),
        };
        Ok((Arc::new(tier), misses))
    }

    /// A tier over `maps` with no programs (an in-memory model of them, in
    /// tests of the accounting without a hook).
    pub fn over(maps: Arc<dyn KernelMaps>, host: Host) -> Arc<Self> {
        Arc::new(Self {
            mirror: BpfMirror::new(host, maps),
            programs: Mutex::new(None),
            stop_misses: None,
            hook: None,
        })
    }

    /// Unregister the programs (returns once none runs any more), stop the
    /// miss events, then take the final lookup counts over and release
    /// every map reference. Returns the final statistics.
    fn detach(&self) -> BpfStats {
        drop(self.programs.lock().take());
        if let Some(s) = &self.stop_misses {
            s.stop();
        }
        self.mirror.detach()
    }
}

/// Where a filesystem keeps its tier: empty unless the programs are
/// attached. Attach and detach are serialized; readers take the current
/// tier without waiting for them.
#[derive(Default)]
pub struct Slot {
    tier: RwLock<Option<Arc<Tier>>>,
    /// The thread reading the attached tier's miss events; held while
    /// attaching or detaching, which it serializes.
    reader: Mutex<Option<JoinHandle<()>>>,
    /// Statistics of the last attachment, and why the last attach failed.
    last: Mutex<BpfStats>,
    /// The hook the tier was last attached through.
    hook: Mutex<Option<Hook>>,
}

impl Slot {
    /// The attached tier, if any.
    pub fn current(&self) -> Option<Arc<Tier>> {
        self.tier.read().clone()
    }

    /// Attach the tier `make` returns (with the thread reading its miss
    /// events, if any), unless one is attached; a failure is kept for
    /// `efuse stats`.
    pub fn attach(
        &self,
        make: impl FnOnce() -> anyhow::Result<(Arc<Tier>, Option<JoinHandle<()>>)>,
    ) -> anyhow::Result<()> {
        let mut reader = self.reader.lock();
        if self.tier.read().is_some() {
            return Ok(());
        }
        match make() {
            Ok((tier, thread)) => {
                if tier.hook.is_some() {
                    *self.hook.lock() = tier.hook.clone();
                }
                self.last.lock().reason = None;
                *self.tier.write() = Some(tier);
                *reader = thread;
                Ok(())
            }
            Err(e) => {
                self.last.lock().reason = Some(format!("{e:#}"));
                Err(e)
            }
        }
    }

    /// Detach the tier, if attached. It stays reachable until it is fully
    /// detached, so a FORGET meanwhile still goes through its mirror (which
    /// then takes over the counts it has not read yet). Returns whether one
    /// was attached.
    pub fn detach(&self) -> bool {
        let mut reader = self.reader.lock();
        let Some(tier) = self.current() else {
            return false;
        };
        let stats = tier.detach();
        if let Some(t) = reader.take() {
            let _ = t.join();
        }
        *self.last.lock() = stats;
        self.tier.write().take();
        true
    }

    /// Statistics of the attached tier, else of the last one (with why the
    /// last attach failed, if it did).
    pub fn stats(&self) -> BpfStats {
        match self.current() {
            Some(t) => t.stats(),
            None => self.last.lock().clone(),
        }
    }

    /// The hook the tier was last attached through.
    pub fn hook(&self) -> Option<Hook> {
        self.hook.lock().clone()
    }
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
