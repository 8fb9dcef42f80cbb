//! The dir backend's node table: every inode the kernel may name, pinned.
//!
//! Two ways to hold a node:
//! - **handles** (where the backing filesystem exports file handles and the
//!   daemon may open by handle, i.e. has CAP_DAC_READ_SEARCH): a node is its
//!   `name_to_handle_at` handle, a few dozen bytes kept inline; an
//!   `O_PATH` descriptor is opened on demand with `open_by_handle_at`
//!   against the backing mount and kept in a bounded cache (CLOCK: a hit
//!   marks the node hot, eviction passes over hot nodes once). The number of
//!   nodes is bounded by memory, not by the descriptor limit.
//! - **descriptors** (elsewhere): a node is an `O_PATH | O_NOFOLLOW`
//!   descriptor for as long as it is pinned, which also keeps the backing
//!   inode (and so its number) alive.
//!
//! The jail is the same in both: a handle is only ever made by the daemon
//! from a descriptor it opened inside the tree, and only handles in this
//! table (or buried by the inode table, which got them from here) are ever
//! opened. Nodes are keyed by backing `st_ino`; the handle's generation
//! tells a reused number from the object that had it.
//!
//! A node the daemon removed a name of (unlink, rmdir, rename over it) is
//! kept open ("sticky") until the kernel forgets it: the kernel may still
//! stat it through an open file, as on a local filesystem, and an unlinked
//! inode cannot be opened by handle once nothing holds it.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::backend::{BackendError, Ino, Result};

/// How the table holds nodes (config `inodes`, `-o inodes=`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum InodeMode {
    /// Handles where the backing filesystem and the daemon's privileges
    /// allow, else descriptors.
    #[default]
    Auto,
    /// File handles, with a bounded cache of open descriptors (fails to
    /// mount where handles are unavailable).
    Handles,
    /// One open descriptor per inode the kernel knows.
    Descriptors,
}

impl std::fmt::Display for InodeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Handles => "handles",
            Self::Descriptors => "descriptors",
        })
    }
}

/// `struct file_handle` bytes (handle_bytes, handle_type, f_handle) up to
/// this size are kept inside the node: ext4, xfs and tmpfs handles without
/// a parent fit (others take an allocation).
const INLINE: usize = 22;

/// The kernel's MAX_HANDLE_SZ.
const MAX_HANDLE: usize = 128;

/// A file handle as `name_to_handle_at` returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Handle {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl Handle {
    fn new(b: &[u8]) -> Self {
        if b.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..b.len()].copy_from_slice(b);
            Self::Inline {
                len: b.len() as u8,
                bytes,
            }
        } else {
            Self::Heap(b.into())
        }
    }

    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..*len as usize],
            Self::Heap(b) => b,
        }
    }

    /// The handle of the object `fd` names (`O_PATH` is fine).
    pub(super) fn of_fd(fd: RawFd) -> std::io::Result<Self> {
        let mut buf = [0u8; 8 + MAX_HANDLE];
        buf[0..4].copy_from_slice(&(MAX_HANDLE as u32).to_ne_bytes());
        let mut mount_id: libc::c_int = 0;
        // SAFETY: a valid fd, an empty C string, a file_handle with room
        // for MAX_HANDLE handle bytes, and an int for the mount id.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_name_to_handle_at,
                fd,
                c"".as_ptr(),
                buf.as_mut_ptr(),
                &mut mount_id,
                libc::AT_EMPTY_PATH,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        Ok(Self::new(&buf[..8 + n.min(MAX_HANDLE)]))
    }

    /// Open the object as `O_PATH` through `mount_fd` (a descriptor on the
    /// backing mount that is not `O_PATH`).
    fn open(&self, mount_fd: RawFd) -> std::io::Result<OwnedFd> {
        let mut h = [0u8; 8 + MAX_HANDLE];
        let b = self.bytes();
        h[..b.len()].copy_from_slice(b);
        // SAFETY: a valid mount fd and a file_handle whose handle_bytes
        // (from name_to_handle_at) is within the buffer.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                mount_fd,
                h.as_mut_ptr(),
                libc::O_PATH | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: freshly opened, owned from here.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }
}

/// A descriptor `open_by_handle_at` accepts for the mount of `root` (an
/// `O_PATH` descriptor of the backing root): it takes no `O_PATH` one.
fn mount_fd(root: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: a valid dirfd and C string; the fd is owned below.
    let m = unsafe {
        libc::openat(
            root,
            c".".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if m < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: freshly opened, owned from here.
    Ok(unsafe { OwnedFd::from_raw_fd(m) })
}

/// One pinned inode (32 bytes: a million-file tree holds a million).
struct Node {
    /// Handle mode: the node itself.
    handle: Option<Handle>,
    /// Saturates (four billion lookups of one inode without a forget).
    pins: u32,
    /// Keep the descriptor until the node goes (see the module docs).
    sticky: bool,
}

/// An open descriptor of a node.
struct Open {
    fd: Arc<OwnedFd>,
    /// Used since the cache last passed it (handle mode).
    hot: AtomicBool,
}

impl Open {
    fn new(fd: Arc<OwnedFd>) -> Self {
        Self {
            fd,
            hot: AtomicBool::new(false),
        }
    }
}

/// The nodes and their open descriptors (all of them in descriptor mode,
/// the cached ones in handle mode): kept apart, so that a node costs no
/// descriptor slot.
#[derive(Default)]
struct Table {
    nodes: HashMap<Ino, Node>,
    fds: HashMap<Ino, Open>,
}

/// See the module docs.
pub(super) struct Nodes {
    root: Ino,
    map: RwLock<Table>,
    /// Handle mode: a readable descriptor on the backing mount (the root
    /// directory) for `open_by_handle_at`.
    mount_fd: Option<OwnedFd>,
    /// Handle mode: nodes with a cached descriptor, oldest first (may name
    /// nodes gone or evicted since; those are skipped). Lock order: after
    /// `map`.
    ring: Mutex<VecDeque<Ino>>,
    /// Descriptors cached in handle mode (not counting sticky ones).
    cached: AtomicUsize,
    /// At most this many are cached.
    cap: usize,
    /// Descriptors opened by handle (cache misses), for `efuse stats`.
    opened: AtomicU64,
}

impl Nodes {
    /// A table holding `root` (pinned for the life of the table) as `fd`.
    /// `mode`: as asked; `Auto` becomes what the filesystem allows. `cap`:
    /// descriptors to cache in handle mode.
    pub(super) fn new(root: Ino, fd: OwnedFd, mode: InodeMode, cap: usize) -> anyhow::Result<Self> {
        let handles = match mode {
            InodeMode::Descriptors => None,
            InodeMode::Auto => Self::probe(&fd).ok(),
            InodeMode::Handles => Some(Self::probe(&fd).map_err(|e| {
                anyhow::anyhow!("inodes=handles: {e}; use inodes=descriptors (or auto) for this tree")
            })?),
        };
        let (mount_fd, handle) = match handles {
            Some((m, h)) => (Some(m), Some(h)),
            None => (None, None),
        };
        let mut t = Table::default();
        t.nodes.insert(
            root,
            Node {
                handle,
                pins: 1,
                sticky: true,
            },
        );
        t.fds.insert(root, Open::new(Arc::new(fd)));
        Ok(Self {
            root,
            map: RwLock::new(t),
            mount_fd,
            ring: Mutex::new(VecDeque::new()),
            cached: AtomicUsize::new(0),
            cap: cap.max(16),
            opened: AtomicU64::new(0),
        })
    }

    /// Can objects of this tree be held by handle? Returns the mount
    /// descriptor and the root's handle.
    fn probe(root: &OwnedFd) -> anyhow::Result<(OwnedFd, Handle)> {
        let h = Handle::of_fd(root.as_raw_fd()).map_err(|e| {
            anyhow::anyhow!("the backing filesystem does not export file handles (name_to_handle_at: {e})")
        })?;
        let m =
            mount_fd(root.as_raw_fd()).map_err(|e| anyhow::anyhow!("cannot open the backing root ({e})"))?;
        h.open(m.as_raw_fd()).map_err(|e| {
            anyhow::anyhow!(
                "cannot open by file handle (open_by_handle_at: {e}; it needs CAP_DAC_READ_SEARCH)"
            )
        })?;
        Ok((m, h))
    }

    /// True in handle mode.
    pub(super) fn by_handle(&self) -> bool {
        self.mount_fd.is_some()
    }

    /// The mode in use: `handles` or `descriptors`.
    pub(super) fn mode(&self) -> InodeMode {
        if self.by_handle() {
            InodeMode::Handles
        } else {
            InodeMode::Descriptors
        }
    }

    /// Number of nodes, descriptors open for them, and opens by handle so far.
    pub(super) fn counts(&self) -> (usize, usize, u64) {
        let t = self.map.read();
        (t.nodes.len(), t.fds.len(), self.opened.load(Ordering::Relaxed))
    }

    /// A descriptor for pinned `ino`.
    pub(super) fn fd(&self, ino: Ino) -> Result<Arc<OwnedFd>> {
        let handle = {
            let t = self.map.read();
            if let Some(o) = t.fds.get(&ino) {
                if !o.hot.load(Ordering::Relaxed) {
                    o.hot.store(true, Ordering::Relaxed);
                }
                return Ok(o.fd.clone());
            }
            let n = t.nodes.get(&ino).ok_or(BackendError::Stale(ino))?;
            n.handle.clone().ok_or(BackendError::Stale(ino))?
        };
        self.open_cached(ino, &handle)
    }

    /// Open `ino` by `handle` and cache the descriptor.
    fn open_cached(&self, ino: Ino, handle: &Handle) -> Result<Arc<OwnedFd>> {
        let mount = self.mount_fd.as_ref().ok_or(BackendError::Stale(ino))?;
        let fd = match handle.open(mount.as_raw_fd()) {
            Ok(fd) => Arc::new(fd),
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => return Err(BackendError::Stale(ino)),
            Err(e) => return Err(BackendError::io("open_by_handle_at", e)),
        };
        self.opened.fetch_add(1, Ordering::Relaxed);
        let mut t = self.map.write();
        match t.nodes.get(&ino) {
            // Forgotten, or the number reused, meanwhile: the caller still
            // gets its descriptor.
            None => return Ok(fd),
            Some(n) if n.handle.as_ref() != Some(handle) => return Ok(fd),
            Some(_) => {}
        }
        if let Some(have) = t.fds.get(&ino) {
            return Ok(have.fd.clone());
        }
        t.fds.insert(ino, Open::new(fd.clone()));
        self.cache_added(&mut t, ino);
        Ok(fd)
    }

    /// A descriptor was cached for `ino` (not sticky): account for it and
    /// evict down to the cap.
    fn cache_added(&self, t: &mut Table, ino: Ino) {
        let mut ring = self.ring.lock();
        ring.push_back(ino);
        let cached = self.cached.fetch_add(1, Ordering::Relaxed) + 1;
        if cached <= self.cap {
            return;
        }
        // Evict a sixteenth at once, so that eviction runs once every
        // cap/16 misses, not on each.
        let target = self.cap - self.cap / 16;
        let mut budget = ring.len() * 2;
        let mut left = self.cached.load(Ordering::Relaxed);
        while left > target && budget > 0 {
            budget -= 1;
            let Some(victim) = ring.pop_front() else { break };
            let evictable = t
                .nodes
                .get(&victim)
                .is_some_and(|n| n.handle.is_some() && !n.sticky);
            let Some(o) = t.fds.get(&victim).filter(|_| evictable) else {
                continue;
            };
            if o.hot.swap(false, Ordering::Relaxed) {
                ring.push_back(victim);
                continue;
            }
            t.fds.remove(&victim);
            left -= 1;
        }
        self.cached.store(left, Ordering::Relaxed);
        // Entries of nodes gone or evicted accumulate; drop them when the
        // ring has grown well past what is cached.
        if ring.len() > 2 * self.cap {
            ring.retain(|i| t.fds.contains_key(i) && t.nodes.get(i).is_some_and(|n| !n.sticky));
        }
    }

    /// Pin the object `fd` (just opened inside the tree) names, whose
    /// `st_ino` is `ino`. Returns the node's descriptor and whether the
    /// node is new.
    pub(super) fn pin(&self, ino: Ino, fd: OwnedFd) -> Result<(Arc<OwnedFd>, bool)> {
        let handle = if self.by_handle() {
            Some(Handle::of_fd(fd.as_raw_fd()).map_err(|e| BackendError::io("name_to_handle_at", e))?)
        } else {
            None
        };
        let mut t = self.map.write();
        let by_handle = handle.is_some();
        let mut reused = false;
        let new = match t.nodes.get_mut(&ino) {
            Some(n) => {
                if ino != self.root {
                    n.pins = n.pins.saturating_add(1);
                }
                if by_handle && n.handle != handle && !n.sticky {
                    // The number was reused: the object the node named is
                    // gone (a sticky node's object is alive, so its number
                    // is not reused). The node now names the new object.
                    tracing::debug!(ino, "backing inode number reused");
                    n.handle = handle;
                    reused = true;
                }
                false
            }
            None => {
                t.nodes.insert(
                    ino,
                    Node {
                        handle,
                        pins: 1,
                        sticky: false,
                    },
                );
                true
            }
        };
        if reused && t.fds.remove(&ino).is_some() {
            self.cached.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(have) = t.fds.get(&ino) {
            return Ok((have.fd.clone(), new));
        }
        let fd = Arc::new(fd);
        t.fds.insert(ino, Open::new(fd.clone()));
        if by_handle {
            self.cache_added(&mut t, ino);
        }
        Ok((fd, new))
    }

    /// One more pin on a node already held.
    pub(super) fn pin_again(&self, ino: Ino) -> Result<()> {
        let mut t = self.map.write();
        let n = t.nodes.get_mut(&ino).ok_or(BackendError::Stale(ino))?;
        if ino != self.root {
            n.pins = n.pins.saturating_add(1);
        }
        Ok(())
    }

    /// Drop `n` pins; true if the node went.
    pub(super) fn unpin(&self, ino: Ino, n: u64) -> bool {
        if ino == self.root {
            return false;
        }
        let mut t = self.map.write();
        let Some(node) = t.nodes.get_mut(&ino) else {
            return false;
        };
        node.pins = node.pins.saturating_sub(n.min(u32::MAX as u64) as u32);
        if node.pins > 0 {
            return false;
        }
        let counted = t
            .nodes
            .remove(&ino)
            .is_some_and(|n| n.handle.is_some() && !n.sticky);
        if t.fds.remove(&ino).is_some() && counted {
            self.cached.fetch_sub(1, Ordering::Relaxed);
        }
        true
    }

    /// Keep `ino`'s descriptor open until the node goes: one of its names
    /// is about to be removed.
    pub(super) fn keep(&self, ino: Ino) {
        if !self.by_handle() || self.fd(ino).is_err() {
            return;
        }
        let mut t = self.map.write();
        let open = t.fds.contains_key(&ino);
        if let Some(n) = t.nodes.get_mut(&ino)
            && open
            && !n.sticky
        {
            n.sticky = true;
            self.cached.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Is `ino` in the table?
    pub(super) fn contains(&self, ino: Ino) -> bool {
        self.map.read().nodes.contains_key(&ino)
    }

    /// Pins of `ino` (0 if not held).
    #[cfg(test)]
    pub(super) fn pins(&self, ino: Ino) -> u64 {
        self.map.read().nodes.get(&ino).map_or(0, |n| n.pins as u64)
    }

    /// The handle of `ino`, in handle mode.
    pub(super) fn handle(&self, ino: Ino) -> Option<Vec<u8>> {
        self.map
            .read()
            .nodes
            .get(&ino)?
            .handle
            .as_ref()
            .map(|h| h.bytes().to_vec())
    }

    /// Open an object by a handle the daemon made earlier (kept by the
    /// inode table after the node went), for an export handle.
    pub(super) fn open_handle(&self, bytes: &[u8]) -> Result<OwnedFd> {
        let mount = self.mount_fd.as_ref().ok_or(BackendError::Unsupported)?;
        Self::open_bytes(mount.as_raw_fd(), bytes)
    }

    /// As [`Self::open_handle`] in descriptor mode: through a mount
    /// descriptor opened from `root` (an `O_PATH` descriptor of the root)
    /// for this one call.
    pub(super) fn open_handle_once(&self, root: RawFd, bytes: &[u8]) -> Result<OwnedFd> {
        let m = mount_fd(root).map_err(|e| BackendError::io("open(root)", e))?;
        Self::open_bytes(m.as_raw_fd(), bytes)
    }

    fn open_bytes(mount: RawFd, bytes: &[u8]) -> Result<OwnedFd> {
        if bytes.len() < 8 || bytes.len() > 8 + MAX_HANDLE {
            return Err(BackendError::Unsupported);
        }
        let declared = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        if declared != bytes.len() - 8 {
            return Err(BackendError::Unsupported);
        }
        Handle::new(bytes)
            .open(mount)
            .map_err(|e| BackendError::io("open_by_handle_at", e))
    }

    /// Every node with its descriptor, where one is open.
    pub(super) fn open_nodes(&self) -> Vec<(Ino, Arc<OwnedFd>)> {
        self.map
            .read()
            .fds
            .iter()
            .map(|(i, o)| (*i, o.fd.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_path(p: &std::path::Path) -> OwnedFd {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string; owned below.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: freshly opened.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// A handle-mode table over `dir`; `None` (nothing to test) only where
    /// the tests do not run as root (open_by_handle_at needs
    /// CAP_DAC_READ_SEARCH): temporary directories are on filesystems with
    /// handles (ext4, tmpfs).
    fn by_handle(dir: &std::path::Path, root: Ino) -> Option<Nodes> {
        match Nodes::new(root, open_path(dir), InodeMode::Handles, 16) {
            Ok(n) => Some(n),
            Err(_) if !nix::unistd::geteuid().is_root() => None,
            Err(e) => panic!("handles refused as root: {e:#}"),
        }
    }

    fn ino_of(p: &std::path::Path) -> Ino {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(p).unwrap().ino()
    }

    #[test]
    fn handles_keep_nodes_beyond_the_descriptor_cache() {
        let t = tempfile::tempdir().unwrap();
        let root = ino_of(t.path());
        let Some(nodes) = by_handle(t.path(), root) else {
            return;
        };
        let mut inos = Vec::new();
        for i in 0..100 {
            let p = t.path().join(format!("f{i}"));
            std::fs::write(&p, b"x").unwrap();
            let ino = ino_of(&p);
            assert!(nodes.pin(ino, open_path(&p)).unwrap().1);
            inos.push(ino);
        }
        let (n, fds, _) = nodes.counts();
        assert_eq!(n, 101);
        // The cache holds at most 16, besides the root's own.
        assert!(fds <= 17, "{fds} descriptors open");
        // Every node still answers, opened by handle where it was evicted.
        for &ino in &inos {
            let fd = nodes.fd(ino).unwrap();
            let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
            // SAFETY: a valid fd and out pointer.
            assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) }, 0);
            // SAFETY: fstat succeeded.
            assert_eq!(unsafe { st.assume_init() }.st_ino, ino);
        }
        assert!(nodes.counts().2 > 0, "nothing was opened by handle");
        assert!(nodes.counts().1 <= 17);
        for &ino in &inos {
            assert!(nodes.unpin(ino, 1));
        }
        assert_eq!(nodes.counts().0, 1);
        assert_eq!(nodes.counts().1, 1, "only the root's descriptor is left");
    }

    #[test]
    fn a_kept_node_outlives_its_last_name() {
        let t = tempfile::tempdir().unwrap();
        let root = ino_of(t.path());
        let Some(nodes) = by_handle(t.path(), root) else {
            return;
        };
        let p = t.path().join("gone");
        std::fs::write(&p, b"x").unwrap();
        let ino = ino_of(&p);
        nodes.pin(ino, open_path(&p)).unwrap();
        nodes.keep(ino);
        std::fs::remove_file(&p).unwrap();
        // Many more nodes: the kept one is never evicted.
        for i in 0..64 {
            let q = t.path().join(format!("g{i}"));
            std::fs::write(&q, b"y").unwrap();
            nodes.pin(ino_of(&q), open_path(&q)).unwrap();
        }
        let fd = nodes.fd(ino).unwrap();
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: a valid fd and out pointer.
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) }, 0);
        // SAFETY: fstat succeeded.
        assert_eq!(unsafe { st.assume_init() }.st_nlink, 0);
    }

    #[test]
    fn handles_are_small() {
        assert!(
            std::mem::size_of::<Node>() <= 32,
            "{}",
            std::mem::size_of::<Node>()
        );
    }
}
