//! Keeping what the kernel (and the bpf tier's maps) caches coherent:
//! after a change through the mount, and when the backend reports one made
//! behind it. Order: the backend changes, then the maps drop what no
//! longer holds, then the kernel is told (or the reply goes out), so
//! neither can answer from before the change once the daemon has spoken.

use std::ffi::OsStr;

use super::EfuseFs;

impl EfuseFs {
    /// Something in backend directory `dir_b` changed: its prefetched
    /// listing, if any, no longer holds.
    pub(super) fn dir_changed(&self, dir_b: u64) {
        if let Some(m) = &self.meta {
            m.invalidate(dir_b);
        }
    }

    /// Drop the listings of `dirs` (FUSE inodes) once a change in them has
    /// happened (after, so no listing fetched meanwhile survives), and pass
    /// the result on.
    pub(super) fn after<T>(&self, dirs: &[u64], r: crate::backend::Result<T>) -> crate::backend::Result<T> {
        for d in dirs {
            self.dir_changed(self.b(*d));
        }
        // The directories' attributes (mtime, nlink) changed.
        self.bpf_changed(&[], dirs);
        r
    }

    /// The FUSE inode `name` in `parent` names now, if the bpf tier is
    /// active (to drop its attributes from the maps after a change).
    pub(super) fn child(&self, parent: u64, name: &OsStr) -> Option<u64> {
        self.bpf.current()?;
        let a = self.backend.lookup(self.b(parent), name).ok()?;
        self.backend.forget(a.ino, 1);
        Some(self.inodes.to_fuse(a.ino))
    }

    /// The backend changed `name` in backend directory `parent_b` (and the
    /// object now or formerly under it, if known): drop what the kernel caches.
    pub fn backend_changed(&self, parent_b: u64, name: Option<&OsStr>, child_b: Option<u64>) {
        let Some(n) = self.notifier() else { return };
        if self.policy().entry_ttl.is_zero() && !self.policy().keep_cache {
            // Nothing is cached under the off tier.
            return;
        }
        self.dir_changed(parent_b);
        let parent = self.inodes.to_fuse(parent_b);
        tracing::debug!(parent, ?name, ?child_b, "backend changed");
        // Out of the BPF maps first, so the programs cannot answer with
        // what the invalidation below drops.
        let names: Vec<(u64, &OsStr)> = name.map(|n| (parent, n)).into_iter().collect();
        let mut inos = vec![parent];
        inos.extend(child_b.map(|c| self.inodes.to_fuse(c)));
        self.bpf_changed(&names, &inos);
        if let Some(name) = name {
            n.inval_entry(parent, name);
        }
        if let Some(c) = child_b {
            let c = self.inodes.to_fuse(c);
            if self.inodes.nlookup(c) > 0 {
                n.inval_inode(c);
            }
        } else if name.is_none() {
            n.inval_inode(parent);
        }
    }

    /// Drop everything the kernel caches from us: every name handed out and
    /// every inode's attributes and data.
    pub fn invalidate_all(&self) -> usize {
        if let Some(t) = self.bpf.current() {
            t.clear();
        }
        let Some(n) = self.notifier() else { return 0 };
        // Name by name, with expiry only. FUSE_NOTIFY_INC_EPOCH (6.16)
        // would do it in one message, but a dentry of an older epoch is
        // dropped without a lookup (unhashed), which breaks getcwd() of
        // every process working in a directory of the mount.
        let mut count = 0;
        for (ino, names) in self.inodes.snapshot() {
            for (parent, name) in names {
                n.inval_entry(parent, &name);
                count += 1;
            }
            n.inval_inode(ino);
        }
        n.inval_inode(crate::fs::inode::FUSE_ROOT);
        count
    }

    /// The file `ino` was modified through the mount: drop the listings
    /// that may hold its old attributes.
    pub fn modified(&self, ino: u64) {
        if let Some(m) = &self.meta {
            m.invalidate_holding(self.b(ino));
        }
        self.bpf_changed(&[], &[ino]);
    }
}
