//! The filesystem's side of the bpf tier ([`crate::bpf`]): attaching it,
//! telling it what the daemon hands the kernel (entries, attributes, the
//! extra answers it asks for) and what changed, and prefetching the
//! directories its programs missed in. Everything here that reads the
//! backend is the filesystem's: the tier is only told.

use std::ffi::{OsStr, OsString};
use std::sync::Arc;
use std::time::Duration;

use super::{EfuseFs, Entry, FsResult};
use crate::backend::{Attr, BackendError, FileKind, SharedBackend};
use crate::bpf::{Extras, Tier};
use crate::fs::inode::{FUSE_ROOT, InodeTable};

/// The attached tier and its epoch, taken before a backend call whose
/// result is offered to it: a change in between (which moves the epoch)
/// makes the tier drop the offer, and a tier detached in between ignores
/// it.
pub(super) struct Offer {
    pub(super) tier: Arc<Tier>,
    pub(super) epoch: u64,
}

/// Map entries pin their inodes in the backend.
struct BackendPins {
    backend: SharedBackend,
    inodes: Arc<InodeTable>,
}

impl crate::bpf::Pins for BackendPins {
    fn pin(&self, ino: u64) -> bool {
        self.backend.pin(self.inodes.to_backend(ino)).is_ok()
    }
    fn unpin(&self, ino: u64, n: u64) {
        self.backend.forget(self.inodes.to_backend(ino), n);
    }
}

impl EfuseFs {
    /// The hook the bpf tier was last attached through.
    pub fn bpf_hook(&self) -> Option<crate::kfuse::Hook> {
        self.bpf.hook()
    }

    /// Load the bpf tier's programs and attach them to this mount's
    /// connection; on failure nothing is attached and the error says why.
    pub fn attach_bpf(self: &Arc<Self>) -> anyhow::Result<()> {
        if let Some(why) = self.bpf_refusal {
            anyhow::bail!("{why}");
        }
        self.bpf.attach(|| {
            let (dev, fuse) = self
                .session
                .get()
                .map(|l| (l.connection, l.fuse))
                .ok_or_else(|| anyhow::anyhow!("the mount has no FUSE connection yet"))?;
            let hook = crate::kfuse::hook_for(fuse).map_err(|e| anyhow::anyhow!(e))?;
            let (tier, misses) = Tier::attach(hook, dev, &self.bpf_cfg, self.bpf_host())?;
            let weak = Arc::downgrade(self);
            let reader = std::thread::Builder::new()
                .name("efuse-misses".into())
                .spawn(move || {
                    for ev in misses {
                        match weak.upgrade() {
                            Some(fs) => fs.missed(ev),
                            None => return,
                        }
                    }
                })
                .map_err(|e| anyhow::anyhow!("spawning the miss-event thread: {e}"))?;
            Ok((tier, Some(reader)))
        })
    }

    /// What a tier attached to this filesystem is built over.
    fn bpf_host(&self) -> crate::bpf::Host {
        crate::bpf::Host {
            inodes: self.inodes.clone(),
            pins: Arc::new(BackendPins {
                backend: self.backend.clone(),
                inodes: self.inodes.clone(),
            }),
            writers: self.writers.clone(),
            passthrough: self.passthrough().cloned(),
            max_entries: self.bpf_max_entries,
            opens: !self.backend.is_remote(),
            xattrs: !self.no_xattrs,
        }
    }

    /// Attach a tier over model maps (tests of the accounting without a
    /// hook).
    #[cfg(test)]
    pub(super) fn attach_model(&self, maps: Arc<dyn crate::bpf::KernelMaps>) {
        self.bpf
            .attach(|| Ok((Tier::over(maps, self.bpf_host()), None)))
            .unwrap();
    }

    /// Detach the bpf tier's programs: once the kernel no longer runs them,
    /// their lookup counts are taken over and the maps freed.
    pub fn detach_bpf(&self) {
        if self.bpf.detach() {
            tracing::info!("bpf tier: programs detached");
        }
    }

    /// Counters of the bpf tier.
    pub fn bpf_stats(&self) -> crate::bpf::BpfStats {
        let mut s = self.bpf.stats();
        if let Some(pt) = self.passthrough() {
            (s.backing_ids, s.backing_held, s.backing_full) = pt.counts();
        }
        s
    }

    /// The attached tier with its epoch, read before a backend call.
    pub(super) fn offer(&self) -> Option<Offer> {
        let tier = self.bpf.current()?;
        let epoch = tier.epoch();
        Some(Offer { tier, epoch })
    }

    /// Offer an entry the kernel is given (its pin is the kernel's).
    pub(super) fn offer_entry(&self, offer: Option<&Offer>, parent: u64, name: &OsStr, e: &Entry) {
        if let Some(o) = offer {
            let x = o
                .tier
                .put_entry(o.epoch, parent, name, &e.attr, e.entry_ttl, e.attr_ttl, false);
            self.offer_extras(o, x);
        }
    }

    /// Offer an entry the kernel was not given, whose backend pin the map
    /// reference takes over.
    fn offer_pinned(&self, o: &Offer, parent: u64, name: &OsStr, a: &Attr) {
        let (entry_ttl, attr_ttl) = self.entry_ttls(parent, a);
        let x = o
            .tier
            .put_entry(o.epoch, parent, name, a, entry_ttl, attr_ttl, true);
        self.offer_extras(o, x);
    }

    /// Look up what the extra answers the tier asked for need, and offer
    /// them: a backing id for the read-only opens of a file with no ACL,
    /// the errnos of an inode without extended attributes.
    pub(super) fn offer_extras(&self, o: &Offer, x: Extras) {
        if !x.any() {
            return;
        }
        let b = self.b(x.ino);
        let Ok(list) = self.backend.listxattr(b) else {
            return;
        };
        // An ACL is checked by the backend, not by the kernel's mode check
        // an answered open gets: such files open through the daemon.
        let acl = list.split(|c| *c == 0).any(|n| n == b"system.posix_acl_access");
        if x.open
            && !acl
            && let Some(pt) = self.passthrough()
        {
            let backend = &self.backend;
            let held = pt.hold(x.ino, || {
                let fh = backend.open(b, libc::O_RDONLY).ok()?;
                let f = backend.backing_file(fh);
                backend.release(fh);
                f
            });
            if let Some(id) = held {
                o.tier.put_open(o.epoch, x, id);
            }
        }
        if x.noxattr && list.is_empty() {
            let errno_of = |name: &str| -> u16 {
                match self.backend.getxattr(b, OsStr::new(name)) {
                    Err(e) if matches!(e.to_errno(), libc::ENODATA | libc::EOPNOTSUPP) => e.to_errno() as u16,
                    _ => 0,
                }
            };
            o.tier.put_noxattr(
                o.epoch,
                x,
                errno_of("security.selinux"),
                errno_of("system.posix_acl_access"),
            );
        }
    }

    /// Something changed: `names` (parent, name) no longer hold and the
    /// attributes of `inos` are stale. Out of the maps before the caller
    /// answers or invalidates.
    pub(super) fn bpf_changed(&self, names: &[(u64, &OsStr)], inos: &[u64]) {
        if let Some(t) = self.bpf.current() {
            t.changed(names, inos);
        }
    }

    /// A miss event of the programs: for a LOOKUP, load the name's whole
    /// directory, so its siblings are answered in the kernel (the missed
    /// LOOKUP itself reaches the daemon and fills its own entry).
    fn missed(&self, ev: efuse_common::ops::MissEvent) {
        let Some(tier) = self.bpf.current() else { return };
        tier.event();
        match ev.opcode {
            efuse_common::ops::OP_LOOKUP => {
                // A directory listing larger than a quarter of the entry
                // map would evict the hot set it is meant to add to.
                let max = self.bpf_cfg.prefetch_max.min(self.bpf_cfg.entries as usize / 4);
                let every = Duration::from_millis(self.bpf_cfg.prefetch_every_ms);
                if max > 0 && tier.should_prefetch(ev.key.parent, every) {
                    self.prefetch_dir(ev.key.parent, max);
                }
            }
            op => tracing::debug!(op, "unknown miss event"),
        }
    }

    /// Put the entries of directory `dir` (a FUSE inode the kernel holds)
    /// into the bpf tier's maps, in one backend listing. Returns how many
    /// were offered and the subdirectories seen.
    pub fn prefetch_dir(&self, dir: u64, max: usize) -> (usize, Vec<(u64, OsString)>) {
        let Some(o) = self.offer() else {
            return (0, Vec::new());
        };
        if dir != FUSE_ROOT && self.inodes.generation(dir).is_none() {
            return (0, Vec::new());
        }
        let (list, _complete) = match self.backend.list_plus(self.b(dir), max) {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(dir, "prefetch: {e}");
                return (0, Vec::new());
            }
        };
        let mut n = 0;
        let mut subdirs = Vec::new();
        for (e, a) in list {
            if e.name == "." || e.name == ".." {
                continue;
            }
            let a = self.fuse_attr(a);
            if a.kind == FileKind::Dir {
                subdirs.push((dir, e.name.clone()));
            }
            // list_plus pinned the inode: the map entry takes the pin over.
            self.offer_pinned(&o, dir, &e.name, &a);
            n += 1;
        }
        (n, subdirs)
    }

    /// Prefetch the tree under `dir` breadth-first, at most `max` entries.
    pub fn prefetch_tree(&self, dir: u64, max: usize) -> usize {
        let (n, subdirs) = self.prefetch_dir(dir, self.bpf_cfg.prefetch_max);
        let mut total = n;
        let mut queue = std::collections::VecDeque::from(subdirs);
        while let Some((parent, name)) = queue.pop_front() {
            if total >= max {
                break;
            }
            // By name again: in a tree larger than the maps the entry of a
            // directory offered earlier may have been evicted (and its
            // inode let go) by the time its turn comes.
            let Some(o) = self.offer() else { break };
            let Ok(a) = self.backend.lookup(self.b(parent), &name) else {
                continue;
            };
            let a = self.fuse_attr(a);
            self.offer_pinned(&o, parent, &name, &a);
            let (n, subdirs) = self.prefetch_dir(a.ino, self.bpf_cfg.prefetch_max);
            total += n;
            queue.extend(subdirs);
        }
        total
    }

    /// Resolve a path below the root to its FUSE inode, for prefetch. Each
    /// directory passed on the way is offered to the maps, which gives the
    /// kernel's later lookups of it an answer in the map.
    pub fn resolve(&self, rel: &std::path::Path) -> FsResult<u64> {
        let mut ino = FUSE_ROOT;
        for c in rel.components() {
            match c {
                std::path::Component::Normal(name) => {
                    let offer = self.offer();
                    let a = self.backend.lookup(self.b(ino), name)?;
                    let a = self.fuse_attr(a);
                    match &offer {
                        Some(o) => self.offer_pinned(o, ino, name, &a),
                        // Not attached: nothing takes the pin over.
                        None => self.backend.forget(self.b(a.ino), 1),
                    }
                    if self.inodes.generation(a.ino).is_none() {
                        return Err(BackendError::errno("prefetch", libc::ENOSPC).into());
                    }
                    ino = a.ino;
                }
                std::path::Component::CurDir | std::path::Component::RootDir => {}
                _ => return Err(BackendError::errno("prefetch", libc::EINVAL).into()),
            }
        }
        Ok(ino)
    }
}
