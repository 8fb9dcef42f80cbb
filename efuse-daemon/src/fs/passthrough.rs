//! Passthrough backing files registered with the kernel
//! (`FUSE_DEV_IOC_BACKING_OPEN`), shared by the daemon's opens and the bpf
//! tier's.
//!
//! The kernel lets an inode's passthrough opens use one backing file only
//! (a second backing id for the same inode fails the open with EBUSY), and
//! refuses to mix passthrough and cached opens of one inode. So one
//! [`BackingId`] serves every passthrough open of an inode while any is
//! live: the daemon's handles hold it (released by RELEASE), and so does
//! the bpf tier for inodes whose read-only opens a program answers
//! ([`Passthrough::hold`]). Those opens send no RELEASE, so the daemon
//! cannot know when the last one closes: the tier's reference is kept until
//! the kernel forgets the inode (no inode, no open file), or the
//! connection ends, which closes every id.
//!
//! One held id costs no daemon descriptor (the one registered is closed
//! right after the ioctl): the kernel keeps an open `struct file` of the
//! backing file, about 1 KiB with its `fuse_backing`, and the backing inode
//! stays referenced (an unlinked file's blocks are freed at the FORGET).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, MutexGuard};

use crate::transport::abi;

/// A passthrough backing file registered with the kernel; closed when
/// dropped.
pub struct BackingId {
    pt: Arc<Registry>,
    /// The id the kernel gave.
    pub id: u32,
}

/// The connection's descriptor and the number of live ids.
struct Registry {
    dev: Arc<OwnedFd>,
    live: AtomicU64,
}

impl BackingId {
    fn open(reg: &Arc<Registry>, file: &File) -> io::Result<Self> {
        // struct fuse_backing_map { int32 fd; uint32 flags; uint64 padding; }
        let mut map = [0u8; 16];
        map[0..4].copy_from_slice(&file.as_raw_fd().to_ne_bytes());
        // SAFETY: the ioctl reads 16 bytes from `map`.
        let r = unsafe { libc::ioctl(reg.dev.as_raw_fd(), abi::ioc::BACKING_OPEN, map.as_ptr()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        reg.live.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            pt: reg.clone(),
            id: r as u32,
        })
    }
}

impl Drop for BackingId {
    fn drop(&mut self) {
        let id = self.id;
        // SAFETY: the ioctl reads one u32.
        unsafe { libc::ioctl(self.pt.dev.as_raw_fd(), abi::ioc::BACKING_CLOSE, &id) };
        self.pt.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Who uses which backing id, and the cached (non-passthrough) opens per
/// inode, because the kernel refuses to mix the two modes on one inode.
#[derive(Default)]
pub struct State {
    /// Backing id of an inode and whether it is a staged (read-only) copy.
    pub by_ino: HashMap<u64, (Weak<BackingId>, bool)>,
    /// The daemon's passthrough handles.
    pub by_fh: HashMap<u64, (u64, Arc<BackingId>)>,
    /// Cached opens: handle -> inode, and their number per inode.
    cached_fh: HashMap<u64, u64>,
    cached_per_ino: HashMap<u64, u32>,
    /// Ids held for opens answered by BPF, until the inode is forgotten.
    held: HashMap<u64, Arc<BackingId>>,
}

impl State {
    /// A cached open of `ino` was handed out as `fh`.
    pub fn add_cached(&mut self, fh: u64, ino: u64) {
        if self.cached_fh.insert(fh, ino).is_none() {
            *self.cached_per_ino.entry(ino).or_default() += 1;
        }
    }

    fn remove_cached(&mut self, fh: u64) {
        if let Some(ino) = self.cached_fh.remove(&fh)
            && let Some(n) = self.cached_per_ino.get_mut(&ino)
        {
            *n -= 1;
            if *n == 0 {
                self.cached_per_ino.remove(&ino);
            }
        }
    }

    /// Does `ino` have cached opens?
    pub fn has_cached(&self, ino: u64) -> bool {
        self.cached_per_ino.contains_key(&ino)
    }

    /// The id every passthrough open of `ino` must use now, if one may be
    /// live: the daemon's handles', or the one held for BPF opens (unless a
    /// cached open exists, which the kernel would not allow beside one).
    pub fn live(&self, ino: u64) -> Option<Arc<BackingId>> {
        self.by_ino.get(&ino).and_then(|(w, _)| w.upgrade()).or_else(|| {
            (!self.has_cached(ino))
                .then(|| self.held.get(&ino).cloned())
                .flatten()
        })
    }

    fn tidy(&mut self, ino: u64) {
        if self.by_ino.get(&ino).is_some_and(|(w, _)| w.strong_count() == 0) {
            self.by_ino.remove(&ino);
        }
    }
}

/// The backing ids of one connection. See the module docs.
pub struct Passthrough {
    reg: Arc<Registry>,
    state: Mutex<State>,
    /// FUSE_PASSTHROUGH was granted at INIT and not refused since.
    granted: AtomicBool,
    /// Most ids held for BPF opens (`[bpf] backing_max`).
    max_held: AtomicU64,
    /// Times `max_held` turned an inode away.
    full: AtomicU64,
}

impl Passthrough {
    /// Backing ids registered on the connection `dev`.
    pub fn new(dev: Arc<OwnedFd>) -> Self {
        Self {
            reg: Arc::new(Registry {
                dev,
                live: AtomicU64::new(0),
            }),
            state: Mutex::new(State::default()),
            granted: AtomicBool::new(false),
            max_held: AtomicU64::new(efuse_common::ops::DEFAULT_OPENS as u64),
            full: AtomicU64::new(0),
        }
    }

    /// The sharing state (the dispatcher's opens and releases).
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Register `file` as a backing file.
    pub fn register(&self, file: &File) -> io::Result<Arc<BackingId>> {
        BackingId::open(&self.reg, file).map(Arc::new)
    }

    /// Passthrough usable (granted at INIT, not refused since).
    pub fn granted(&self) -> bool {
        self.granted.load(Ordering::Relaxed)
    }

    /// Set by INIT, cleared when the kernel refuses a backing file.
    pub fn set_granted(&self, on: bool) {
        self.granted.store(on, Ordering::Relaxed);
    }

    /// Bound the ids held for BPF opens.
    pub fn set_max_held(&self, n: u64) {
        self.max_held.store(n, Ordering::Relaxed);
    }

    /// The daemon's handle `fh` was released.
    pub fn released(&self, fh: u64) {
        let mut b = self.state.lock();
        if let Some((ino, id)) = b.by_fh.remove(&fh) {
            drop(id);
            b.tidy(ino);
        }
        b.remove_cached(fh);
    }

    /// The id for BPF opens of `ino`: the live one, or one registered now
    /// from `file()` (a read-only descriptor of the backing file; the
    /// kernel reopens it with each open's flags). None when `ino` has
    /// cached opens, passthrough is off, the bound is reached or `file`
    /// fails: the daemon answers those opens.
    pub fn hold(&self, ino: u64, file: impl FnOnce() -> Option<Arc<File>>) -> Option<u32> {
        if !self.granted() {
            return None;
        }
        let mut b = self.state.lock();
        if b.has_cached(ino) {
            return None;
        }
        if let Some(id) = b.held.get(&ino) {
            return Some(id.id);
        }
        if b.held.len() as u64 >= self.max_held.load(Ordering::Relaxed) {
            self.full.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let id = match b.by_ino.get(&ino).and_then(|(w, _)| w.upgrade()) {
            Some(id) => id,
            None => {
                let f = file()?;
                match self.register(&f) {
                    Ok(id) => {
                        b.by_ino.insert(ino, (Arc::downgrade(&id), false));
                        id
                    }
                    Err(e) => {
                        tracing::debug!(ino, "cannot register a backing file: {e}");
                        return None;
                    }
                }
            }
        };
        let n = id.id;
        b.held.insert(ino, id);
        Some(n)
    }

    /// The kernel forgot `ino`: no BPF-opened file of it can be open.
    pub fn forgotten(&self, ino: u64) {
        let mut b = self.state.lock();
        if b.held.remove(&ino).is_some() {
            b.tidy(ino);
        }
    }

    /// (ids registered now, of which held for BPF opens, inodes turned
    /// away by `backing_max`).
    pub fn counts(&self) -> (u64, u64, u64) {
        let held = self.state.lock().held.len() as u64;
        (
            self.reg.live.load(Ordering::Relaxed),
            held,
            self.full.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    //! The bookkeeping alone: /dev/null stands in for the connection, so
    //! registering a backing file fails as it does on a kernel that
    //! refuses it (ENOTTY here).
    use super::*;

    fn pt() -> Passthrough {
        Passthrough::new(Arc::new(OwnedFd::from(File::open("/dev/null").unwrap())))
    }

    fn some_file() -> Option<Arc<File>> {
        Some(Arc::new(File::open("/dev/null").unwrap()))
    }

    /// `hold(ino)`, and whether it asked for the backing file.
    fn hold_asking(p: &Passthrough, ino: u64) -> (Option<u32>, bool) {
        let mut asked = false;
        let id = p.hold(ino, || {
            asked = true;
            some_file()
        });
        (id, asked)
    }

    #[test]
    fn nothing_is_held_unless_passthrough_was_granted() {
        let p = pt();
        assert_eq!(
            hold_asking(&p, 7),
            (None, false),
            "no backing file opened for nothing"
        );
    }

    #[test]
    fn cached_opens_keep_an_inode_out_of_passthrough_until_released() {
        let p = pt();
        p.set_granted(true);
        p.state().add_cached(1, 7);
        p.state().add_cached(2, 7);
        assert!(p.state().has_cached(7));
        assert_eq!(hold_asking(&p, 7), (None, false));
        p.released(1);
        assert!(p.state().has_cached(7), "one cached open is left");
        p.released(2);
        assert!(!p.state().has_cached(7));
    }

    #[test]
    fn a_refused_registration_holds_nothing_and_the_bound_counts_refusals() {
        let p = pt();
        p.set_granted(true);
        assert_eq!(p.hold(7, some_file), None, "the kernel refused the backing file");
        assert_eq!(p.counts(), (0, 0, 0));
        assert!(p.state().live(7).is_none());
        p.set_max_held(0);
        assert_eq!(p.hold(8, some_file), None);
        assert_eq!(p.counts(), (0, 0, 1), "turned away by backing_max");
        // Forgetting an inode nothing was held for changes nothing.
        p.forgotten(7);
        assert_eq!(p.counts(), (0, 0, 1));
    }
}
