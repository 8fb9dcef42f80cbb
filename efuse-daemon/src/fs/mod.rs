//! Filesystem logic between the FUSE dispatcher and the backend.
//!
//! `EfuseFs` speaks in FUSE inode numbers and plain structs ([`Entry`],
//! [`Opened`], [`KernelOpen`]); it never touches the wire format, so tests
//! drive it without a mount. Owns:
//! - the operations (here), and the rules a local filesystem applies that
//!   the backend cannot (`setid.rs`: set-group-ID clearing, with
//!   [`creds`]);
//! - the open policy (`open.rs`: passthrough, cached and zero-message
//!   opens and their shared handles, staged copies, [`passthrough`]
//!   backing ids);
//! - the lookup counts ([`inode`]): every method that returns an [`Entry`]
//!   has counted it once, and callers must hand it to the kernel (or call
//!   [`EfuseFs::forget`] themselves);
//! - what the kernel caches: the tier's cache policy (with `off` every TTL
//!   is zero and no open keeps the page cache, so every operation reaches
//!   the daemon), invalidations (`invalidate.rs`), descriptor pressure
//!   (`pressure.rs`), the metadata cache of remote backends ([`cache`])
//!   and their local copies ([`staging`]);
//! - the bpf tier's side that reads the backend (`bpf.rs`): the tier is
//!   told about entries, attributes and changes, before the reply or
//!   notification that makes them visible.

mod bpf;
pub mod cache;
pub mod creds;
pub mod inode;
mod invalidate;
mod open;
pub mod passthrough;
mod pressure;
mod setid;
pub mod staging;

pub use open::{KernelOpen, fopen_flags};

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Attr, BackendError, Caller, DirEntry, Fh, FileKind, SetAttr, SharedBackend, StatFs};
use crate::config::{KernelTierConfig, Offload};
use crate::fs::inode::InodeTable;

/// Errors of filesystem calls; carries the errno the kernel gets.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A refusal with a plain errno (no backend call failed).
    #[error("errno {0}")]
    Errno(i32),
    /// LOOKUP of a name that does not exist (ENOENT), whose absence the
    /// kernel may cache for `cache_for` (zero: not at all).
    #[error("no such name")]
    Missing {
        /// How long the kernel may keep a negative entry.
        cache_for: Duration,
    },
    /// An xattr value or list larger than the caller's buffer.
    #[error("buffer of {size} bytes too small for {needed}")]
    Range {
        /// Caller's buffer.
        size: u32,
        /// Bytes needed.
        needed: usize,
    },
}

impl FsError {
    /// The errno for the reply.
    pub fn to_errno(&self) -> i32 {
        match self {
            Self::Backend(e) => e.to_errno(),
            Self::Errno(e) => *e,
            Self::Missing { .. } => libc::ENOENT,
            Self::Range { .. } => libc::ERANGE,
        }
    }

    /// Expected failures (a missing name, a missing xattr) are not worth a warning.
    pub fn is_expected(&self) -> bool {
        matches!(
            self.to_errno(),
            libc::ENOENT
                | libc::ENODATA
                | libc::EEXIST
                | libc::ENOTEMPTY
                | libc::ENAMETOOLONG
                | libc::ERANGE
                | libc::EOPNOTSUPP
                | libc::EINVAL
                | libc::ENOTDIR
                | libc::EISDIR
                | libc::EACCES
                | libc::EPERM
                | libc::ENXIO
                | libc::ENOSYS
                | libc::ETXTBSY
        )
    }
}

/// Result of filesystem calls.
pub type FsResult<T> = Result<T, FsError>;

/// An entry handed to the kernel (already counted in the inode table).
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// Attributes, with `ino` the FUSE inode number.
    pub attr: Attr,
    /// Generation of the inode.
    pub generation: u64,
    /// How long the kernel may trust the name -> inode binding.
    pub entry_ttl: Duration,
    /// How long the kernel may trust the attributes.
    pub attr_ttl: Duration,
}

/// Flags of an open reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenFlags {
    /// Keep the page cache from earlier opens (FOPEN_KEEP_CACHE).
    pub keep_cache: bool,
    /// Cache directory contents in the kernel (FOPEN_CACHE_DIR).
    pub cache_dir: bool,
    /// Do not send FLUSH on close (FOPEN_NOFLUSH): read-only opens.
    pub noflush: bool,
    /// Serve this open from its backing file (FOPEN_PASSTHROUGH) if the
    /// kernel and backend allow it.
    pub passthrough: bool,
}

/// An open file or directory.
#[derive(Clone, Debug)]
pub struct Opened {
    /// Handle the kernel passes back.
    pub fh: Fh,
    /// Reply flags.
    pub flags: OpenFlags,
    /// The local file behind the handle, for passthrough.
    pub backing: Option<Arc<std::fs::File>>,
    /// `backing` is a staged copy (read-only), not the file itself.
    pub staged: bool,
    /// Opened for writing.
    pub writable: bool,
}

/// Receives plain directory entries; `add` returns true when full (entry not taken).
pub trait DirReplier {
    /// Add an entry; true if the buffer is full and the entry was not added.
    fn add(&mut self, ino: u64, next: u64, kind: FileKind, name: &OsStr) -> bool;
}

/// Receives directory entries with attributes; `add` returns true when full.
pub trait DirPlusReplier {
    /// Add an entry; true if the buffer is full and the entry was not added.
    fn add(&mut self, entry: &Entry, next: u64, name: &OsStr) -> bool;
}

/// Tells the kernel to drop what it cached (FUSE notify). Implemented by
/// the FUSE adapter; the filesystem only names what changed.
pub trait KernelNotifier: Send + Sync {
    /// The name `name` in directory `parent` may have changed: the kernel
    /// must look it up again before trusting it (the dentry is expired,
    /// not unhashed, so a process whose cwd it is keeps a working getcwd).
    fn inval_entry(&self, parent: u64, name: &OsStr);
    /// Drop the name `name` in directory `parent` from the kernel's cache
    /// altogether, so that its inode can be forgotten once unused.
    fn drop_entry(&self, parent: u64, name: &OsStr);
    /// Forget the attributes of `ino`, so the kernel asks again (and then
    /// drops its cached data if mtime or size changed). Never waits for
    /// the page cache: see the adapter's implementation.
    fn inval_inode(&self, ino: u64);
    /// Ask the kernel to drop unused cached dentries of these inodes so that
    /// it forgets them (Linux 6.18+, FUSE_NOTIFY_PRUNE); false where it
    /// cannot.
    fn prune(&self, _inodes: &[u64]) -> bool {
        false
    }
}

/// Cache policy derived from the offload tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachePolicy {
    /// TTL of positive entries.
    pub entry_ttl: Duration,
    /// TTL of attributes.
    pub attr_ttl: Duration,
    /// TTL of negative entries (zero: reply ENOENT, nothing cached).
    pub negative_ttl: Duration,
    /// Keep the page cache across opens, cache directory listings.
    pub keep_cache: bool,
    /// Use passthrough for opens where possible.
    pub passthrough: bool,
    /// TTL of entries (and attributes of files with one link) in a
    /// directory the backend watches: every change there, through the
    /// mount or behind it, is invalidated, so the TTL need not bound
    /// staleness (zero: the plain TTLs).
    pub watched_ttl: Duration,
}

impl CachePolicy {
    /// Policy of a tier.
    pub fn for_tier(tier: Offload, k: &KernelTierConfig) -> Self {
        match tier {
            Offload::Off => Self {
                entry_ttl: Duration::ZERO,
                attr_ttl: Duration::ZERO,
                negative_ttl: Duration::ZERO,
                keep_cache: false,
                passthrough: false,
                watched_ttl: Duration::ZERO,
            },
            // The bpf tier keeps the kernel tier's caching; its programs
            // answer what the dcache does not hold.
            Offload::Kernel | Offload::Bpf | Offload::Auto => Self {
                entry_ttl: Duration::from_millis(k.entry_ttl_ms),
                attr_ttl: Duration::from_millis(k.attr_ttl_ms),
                negative_ttl: Duration::from_millis(k.negative_ttl_ms),
                keep_cache: true,
                passthrough: k.passthrough,
                watched_ttl: Duration::from_millis(k.watched_ttl_ms),
            },
        }
    }
}

/// Shared backend handles kept for zero-message opens, at most.
const MAX_INODE_HANDLES: usize = 1024;

/// Directory entries are fetched from the backend in batches of this size.
const READDIR_BATCH: usize = 256;

/// The filesystem.
pub struct EfuseFs {
    backend: SharedBackend,
    /// Ask the kernel to enforce POSIX ACLs (see [`EfuseFs::posix_acl`]).
    posix_acl: bool,
    /// `-o xattr` resolved to none: xattr requests are answered ENOSYS.
    no_xattrs: bool,
    /// Writable handles and their inodes: while an inode has one, the bpf
    /// tier answers nothing about it ([`crate::bpf::Writers`]).
    writer_fhs: parking_lot::Mutex<HashMap<Fh, u64>>,
    /// Writable opens per inode, for the bpf tier (kept on every tier).
    writers: Arc<crate::bpf::Writers>,
    /// Why this mount may not use the bpf tier, if it may not.
    bpf_refusal: Option<&'static str>,
    inodes: Arc<InodeTable>,
    kernel_cfg: KernelTierConfig,
    /// The bpf tier, while attached (see [`crate::bpf`]).
    bpf: crate::bpf::Slot,
    bpf_cfg: crate::config::BpfConfig,
    /// Most entries the bpf tier's maps may name at once (each pins a
    /// backend inode: a descriptor where the backend holds one per inode).
    bpf_max_entries: usize,
    /// What needs the FUSE session, handed over once before its first
    /// request is read ([`EfuseFs::connect`]); unset in tests of the
    /// filesystem alone.
    session: std::sync::OnceLock<SessionLink>,
    tier: parking_lot::RwLock<(Offload, CachePolicy)>,
    /// Zero-message opens: one backend handle per inode, opened on first
    /// use and closed when the kernel forgets the inode.
    inode_handles: parking_lot::Mutex<std::collections::HashMap<u64, (Fh, u64)>>,
    handle_clock: std::sync::atomic::AtomicU64,
    /// Last time the kernel was asked to drop entries for lack of descriptors.
    pressure: parking_lot::Mutex<Option<std::time::Instant>>,
    /// Inodes the kernel may hold before we ask it to drop some (7/8 of the
    /// descriptor limit: the dir backend holds one each).
    fd_budget: usize,
    /// Metadata cache with batched prefetch (remote backends only).
    meta: Option<crate::fs::cache::MetaCache>,
    /// Local copies for passthrough on remote backends.
    staging: Option<crate::fs::staging::Staging>,
}

/// Everything a filesystem is built from, in one pass ([`EfuseFs::build`]);
/// only what needs the FUSE session ([`SessionLink`]) is handed over later,
/// in one call, before the first request is read.
pub struct FsConfig {
    /// The tier to start in.
    pub tier: Offload,
    /// Settings of the kernel tier.
    pub kernel: KernelTierConfig,
    /// Settings of the bpf tier.
    pub bpf: crate::config::BpfConfig,
    /// `-o xattr=`.
    pub xattr: crate::config::Xattr,
    /// Other users may use the mount (`allow_other`, `allow_root`): the
    /// kernel enforces POSIX ACLs where the backend keeps them.
    pub others_may_use: bool,
    /// Why the mount may never use the bpf tier, if it may not.
    pub bpf_refusal: Option<&'static str>,
    /// Local copies for passthrough (remote backends).
    pub staging: Option<crate::fs::staging::Staging>,
}

impl FsConfig {
    /// `tier` with default settings (tests, tools).
    pub fn tier(tier: Offload, kernel: KernelTierConfig) -> Self {
        Self {
            tier,
            kernel,
            bpf: crate::config::BpfConfig::default(),
            xattr: crate::config::Xattr::Auto,
            others_may_use: false,
            bpf_refusal: None,
            staging: None,
        }
    }
}

/// What a filesystem needs of its FUSE session, handed over in one
/// [`EfuseFs::connect`] before the session's first request is read, so no
/// request is ever served without its kernel invalidations.
pub struct SessionLink {
    /// The connection number (under /sys/fs/fuse/connections, or efuse.ko's).
    pub connection: u32,
    /// The FUSE it belongs to.
    pub fuse: crate::kfuse::Fuse,
    /// Kernel notifications (invalidations) on the session's device.
    pub notifier: Arc<dyn KernelNotifier>,
    /// The connection's passthrough backing ids.
    pub passthrough: Arc<crate::fs::passthrough::Passthrough>,
}

impl EfuseFs {
    /// A filesystem over `backend` starting in `tier`, other settings
    /// default.
    pub fn new(backend: SharedBackend, tier: Offload, kernel_cfg: KernelTierConfig) -> Self {
        Self::build(backend, FsConfig::tier(tier, kernel_cfg))
    }

    /// A filesystem over `backend` as `cfg` says.
    pub fn build(backend: SharedBackend, cfg: FsConfig) -> Self {
        let FsConfig {
            tier,
            kernel: kernel_cfg,
            bpf: bpf_cfg,
            xattr,
            others_may_use,
            bpf_refusal,
            staging,
        } = cfg;
        let xattrs = match xattr {
            crate::config::Xattr::On => true,
            crate::config::Xattr::Off => false,
            crate::config::Xattr::Auto => backend.xattrs(),
        };
        let posix_acl = others_may_use && xattrs && backend.posix_acl();
        let root = backend.root();
        let policy = CachePolicy::for_tier(tier, &kernel_cfg);
        let meta = (backend.is_remote() && kernel_cfg.prefetch_max > 0).then(|| {
            crate::fs::cache::MetaCache::new(
                backend.clone(),
                Duration::from_millis(kernel_cfg.prefetch_ttl_ms),
                kernel_cfg.prefetch_max,
            )
        });
        let inodes = Arc::new(InodeTable::new(root));
        // Zero-message opens keep up to MAX_INODE_HANDLES shared backend
        // handles open besides the pins: leave room for them (a full-size
        // `efuse bench` under a 20,000 descriptor limit ran out on them).
        let limit_budget = pressure::fd_budget();
        // Only a backend that holds a descriptor per inode limits how many
        // the kernel may keep; by handle (or in memory) that is memory.
        let per_inode_fd = backend.inode_mode() == Some(crate::backend::dir::nodes::InodeMode::Descriptors);
        let fd_budget = if !per_inode_fd {
            usize::MAX
        } else if kernel_cfg.zero_open {
            limit_budget
                .saturating_sub(MAX_INODE_HANDLES)
                .max(limit_budget / 2)
        } else {
            limit_budget
        };
        Self {
            meta,
            staging,
            bpf: crate::bpf::Slot::default(),
            bpf_cfg,
            bpf_max_entries: if per_inode_fd { fd_budget / 2 } else { usize::MAX },
            session: std::sync::OnceLock::new(),
            backend,
            inodes,
            kernel_cfg,
            tier: parking_lot::RwLock::new((tier, policy)),
            inode_handles: parking_lot::Mutex::new(std::collections::HashMap::new()),
            handle_clock: std::sync::atomic::AtomicU64::new(0),
            posix_acl,
            no_xattrs: !xattrs,
            writer_fhs: parking_lot::Mutex::new(HashMap::new()),
            writers: Arc::default(),
            bpf_refusal,
            pressure: parking_lot::Mutex::new(None),
            fd_budget,
        }
    }

    /// Hand over what needs the session; call once, before the first
    /// request is read (a second call is ignored).
    pub fn connect(&self, link: SessionLink) {
        link.passthrough.set_max_held(u64::from(self.bpf_cfg.backing_max));
        let _ = self.session.set(link);
    }

    /// The FUSE this mount goes through (the kernel's until mounted).
    pub fn kfuse(&self) -> crate::kfuse::Fuse {
        self.session.get().map(|l| l.fuse).unwrap_or_default()
    }

    fn notifier(&self) -> Option<&dyn KernelNotifier> {
        self.session.get().map(|l| &*l.notifier)
    }

    fn passthrough(&self) -> Option<&Arc<crate::fs::passthrough::Passthrough>> {
        self.session.get().map(|l| &l.passthrough)
    }

    /// INIT granted FUSE_PASSTHROUGH: backing ids may be registered.
    pub fn grant_passthrough(&self) {
        if let Some(pt) = self.passthrough() {
            pt.set_granted(true);
        }
    }

    /// Counters of the metadata cache, when there is one.
    pub fn cache_stats(&self) -> Option<crate::fs::cache::CacheStats> {
        self.meta.as_ref().map(|m| m.stats())
    }

    /// Is the bpf tier refused on this mount?
    pub fn bpf_refused(&self) -> bool {
        self.bpf_refusal.is_some()
    }

    fn writer_opened(&self, fh: Fh, ino: u64) {
        self.writer_fhs.lock().insert(fh, ino);
        self.writers.opened(ino);
        self.bpf_changed(&[], &[ino]);
    }

    /// Whether extended attributes are served.
    pub fn xattrs(&self) -> bool {
        !self.no_xattrs
    }

    /// Whether INIT asks for FUSE_POSIX_ACL.
    pub fn posix_acl(&self) -> bool {
        self.posix_acl
    }

    /// Settings of the kernel tier.
    pub fn kernel_cfg(&self) -> &KernelTierConfig {
        &self.kernel_cfg
    }

    /// Current tier.
    pub fn tier(&self) -> Offload {
        self.tier.read().0
    }

    /// Switch tier; returns the previous one. The caller invalidates what
    /// the kernel cached under the old policy.
    pub fn set_tier(&self, tier: Offload) -> Offload {
        if tier != Offload::Bpf {
            self.detach_bpf();
        }
        let mut t = self.tier.write();
        let old = t.0;
        *t = (tier, CachePolicy::for_tier(tier, &self.kernel_cfg));
        drop(t);
        if tier == Offload::Off
            && let Some(m) = &self.meta
        {
            m.clear();
        }
        old
    }

    /// The backend.
    pub fn backend(&self) -> &SharedBackend {
        &self.backend
    }

    /// The inode table (for statistics and tests).
    pub fn inodes(&self) -> &Arc<InodeTable> {
        &self.inodes
    }

    /// Current cache policy.
    pub fn policy(&self) -> CachePolicy {
        self.tier.read().1
    }

    fn b(&self, ino: u64) -> u64 {
        self.inodes.to_backend(ino)
    }

    fn fuse_attr(&self, mut a: Attr) -> Attr {
        a.ino = self.inodes.to_fuse(a.ino);
        a
    }

    /// Count a backend-pinned attr as a kernel entry named `name` in `parent`.
    fn entry(&self, parent: u64, name: &OsStr, a: Attr) -> Entry {
        let attr = self.fuse_attr(a);
        let b = a.ino;
        let generation = self
            .inodes
            .remember_again(attr.ino, parent, name, || self.backend.identity(b));
        let (entry_ttl, attr_ttl) = self.entry_ttls(parent, &attr);
        Entry {
            attr,
            generation,
            entry_ttl,
            attr_ttl,
        }
    }

    /// The entry and attribute TTLs of `attr` named in `parent`: what a
    /// LOOKUP reply gives the kernel, and what the bpf tier's answers for
    /// the same entry hold, by whichever path they are offered.
    fn entry_ttls(&self, parent: u64, attr: &Attr) -> (Duration, Duration) {
        let p = self.policy();
        let (mut entry_ttl, mut attr_ttl) = (p.entry_ttl, p.attr_ttl);
        // Coherent by invalidation alone: a dataset stays cached from one
        // epoch to the next, however long apart. A file with more links may
        // change through a directory nobody watches: plain TTL for its
        // attributes.
        if p.watched_ttl > entry_ttl && self.backend.watched(self.b(parent)) {
            entry_ttl = p.watched_ttl;
            if attr.kind == FileKind::Dir || attr.nlink <= 1 {
                attr_ttl = attr_ttl.max(p.watched_ttl);
            }
        }
        (entry_ttl, attr_ttl)
    }

    /// `lookup(2)` of `name` in `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Entry> {
        // Export handles (FUSE_EXPORT_SUPPORT): the kernel asks for "." of a
        // node id it no longer holds, and for ".." of a directory.
        if name == "." {
            return self.lookup_self(parent);
        }
        if name == ".." {
            let a = self.backend.parent(self.b(parent))?;
            return Ok(self.entry(self.inodes.to_fuse(a.ino), OsStr::new(".."), a));
        }
        crate::backend::check_name(name)?;
        if let Some(m) = &self.meta
            && self.tier() != Offload::Off
        {
            match m.lookup(self.b(parent), name) {
                crate::fs::cache::Cached::Found(a, age) => {
                    // Never trust cached data longer than its TTL from when
                    // it was fetched: older than that, the backend answers.
                    let (entry_ttl, attr_ttl) = self.entry_ttls(parent, &a);
                    if age < entry_ttl.min(attr_ttl) {
                        let mut e = self.entry(parent, name, a);
                        e.entry_ttl = entry_ttl - age;
                        e.attr_ttl = attr_ttl - age;
                        return Ok(e);
                    }
                    // The pin the listing took for us.
                    self.backend.forget(a.ino, 1);
                }
                crate::fs::cache::Cached::Missing(age) => {
                    // Absent from a listing this old: the kernel may cache
                    // the absence for what is left of the negative TTL;
                    // past it, the backend answers.
                    let neg = self.policy().negative_ttl;
                    if age < neg {
                        return Err(FsError::Missing { cache_for: neg - age });
                    }
                }
                crate::fs::cache::Cached::Unknown => {}
            }
        }
        let offer = self.offer();
        let a = self
            .pinning(|| self.backend.lookup(self.b(parent), name))
            .map_err(|e| match e.to_errno() {
                libc::ENOENT => FsError::Missing {
                    cache_for: self.policy().negative_ttl,
                },
                _ => e.into(),
            })?;
        let e = self.entry(parent, name, a);
        self.offer_entry(offer.as_ref(), parent, name, &e);
        Ok(e)
    }

    /// LOOKUP of "." in `ino`: the inode itself, pinned once more; for an
    /// inode the kernel forgot, found again by its backend identity, with
    /// the generation it had (an object that is gone, or another that
    /// reuses the number, is ESTALE by generation or here).
    fn lookup_self(&self, ino: u64) -> FsResult<Entry> {
        let b = self.b(ino);
        // The identity from the grave, or (the inode still held) from the
        // backend now: a FORGET handled on another thread may let the
        // object go between this lookup's checks, and the identity still
        // finds it then.
        // A FORGET completing between the two looks leaves the identity in
        // the grave (it is buried before the backend lets go): look again.
        let id = self
            .inodes
            .grave(ino)
            .flatten()
            .or_else(|| self.backend.identity(b))
            .or_else(|| self.inodes.grave(ino).flatten());
        let a = self.backend.reopen(b, id.as_deref()).inspect_err(|e| {
            tracing::debug!(ino, has_identity = id.is_some(), "LOOKUP of '.': {e}");
        })?;
        // Unlinked: nothing in the kernel holds it (or it would not ask),
        // so, as on a local filesystem, the handle is stale; this also
        // covers a FORGET still in flight for a file unlinked meanwhile.
        if a.ino != b || (a.nlink == 0 && a.kind != FileKind::Dir) {
            self.backend.forget(a.ino, 1);
            return Err(BackendError::Stale(ino).into());
        }
        Ok(self.entry(ino, OsStr::new("."), a))
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        // Lookup counts live in the inode table; an attached bpf tier first
        // adds the lookups its programs answered.
        let f = match self.bpf.current() {
            Some(t) => t.forget(ino, n),
            None => {
                let f = self.inodes.forget(ino, n);
                if f.removed
                    && let Some(pt) = self.passthrough()
                {
                    pt.forgotten(ino);
                }
                f
            }
        };
        if f.removed {
            // What identifies the object, while the backend still holds it:
            // an export handle given out for it keeps working.
            self.inodes.bury(ino, self.backend.identity(self.b(ino)));
        }
        let n = f.taken;
        if n > 0 {
            if self.inodes.nlookup(ino) == 0
                && let Some((h, _)) = self.inode_handles.lock().remove(&ino)
            {
                self.backend.release(h);
            }
            self.backend.forget(self.b(ino), n);
        }
    }

    /// What a later daemon needs to keep the export handles given out by
    /// this one valid (the server keeps it, `crate::server::export_table`):
    /// up to `max` inodes known or buried, each with its generation and
    /// backend identity. `None` where the backend has no identities
    /// (nothing could be found again).
    pub fn export_handles(&self, max: usize) -> Option<(Vec<u8>, Vec<inode::Exported>)> {
        let root = self.backend.identity(self.backend.root())?;
        let entries = self.inodes.export(|ino| self.backend.identity(self.b(ino)), max);
        Some((root, entries))
    }

    /// The backend identity of the root (keys the export table).
    pub fn root_identity(&self) -> Option<Vec<u8>> {
        self.backend.identity(self.backend.root())
    }

    /// Take in an earlier daemon's [`Self::export_handles`]; call before
    /// serving.
    pub fn import_handles(&self, entries: Vec<inode::Exported>) -> usize {
        self.inodes.import(entries)
    }

    /// Attributes and their TTL.
    pub fn getattr(&self, ino: u64) -> FsResult<(Attr, Duration)> {
        let offer = self.offer();
        let a = self.fuse_attr(self.backend.getattr(self.b(ino))?);
        let ttl = self.policy().attr_ttl;
        if let Some(o) = &offer {
            self.offer_extras(o, o.tier.put_attr(o.epoch, &a, ttl));
        }
        Ok((a, ttl))
    }

    /// Change attributes.
    pub fn setattr(&self, ino: u64, fh: Option<Fh>, set: &SetAttr) -> FsResult<(Attr, Duration)> {
        let a = self.backend.setattr(self.b(ino), fh, set);
        self.modified(ino);
        let a = a?;
        Ok((self.fuse_attr(a), self.policy().attr_ttl))
    }

    /// access(2): check `mask` (R_OK/W_OK/X_OK bits) for a caller against
    /// the mode bits, as the kernel's generic_permission does.
    pub fn access(&self, ino: u64, mask: i32, uid: u32, gid: u32) -> FsResult<()> {
        let a = self.backend.getattr(self.b(ino))?;
        if mask == libc::F_OK {
            return Ok(());
        }
        let perm = a.perm as i32;
        if uid == 0 {
            // Root passes read/write; execute needs some x bit (or a directory).
            if mask & libc::X_OK != 0 && a.kind != FileKind::Dir && perm & 0o111 == 0 {
                return Err(BackendError::errno("access", libc::EACCES).into());
            }
            return Ok(());
        }
        let bits = if uid == a.uid {
            (perm >> 6) & 7
        } else if gid == a.gid {
            (perm >> 3) & 7
        } else {
            perm & 7
        };
        if bits & mask == mask {
            Ok(())
        } else {
            Err(BackendError::errno("access", libc::EACCES).into())
        }
    }

    /// Target of a symlink.
    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        Ok(self.backend.readlink(self.b(ino))?)
    }

    /// Create a node.
    pub fn mknod(&self, who: Caller, parent: u64, name: &OsStr, mode: u32, rdev: u32) -> FsResult<Entry> {
        let a = self.after(
            &[parent],
            self.backend.mknod(who, self.b(parent), name, mode, rdev),
        )?;
        Ok(self.entry(parent, name, a))
    }

    /// Create a directory.
    pub fn mkdir(&self, who: Caller, parent: u64, name: &OsStr, mode: u32) -> FsResult<Entry> {
        let a = self.after(&[parent], self.backend.mkdir(who, self.b(parent), name, mode))?;
        Ok(self.entry(parent, name, a))
    }

    /// Create a symlink.
    pub fn symlink(&self, who: Caller, parent: u64, name: &OsStr, target: &OsStr) -> FsResult<Entry> {
        let a = self.after(&[parent], self.backend.symlink(who, self.b(parent), name, target))?;
        Ok(self.entry(parent, name, a))
    }

    /// Add a hard link.
    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<Entry> {
        let a = self.after(
            &[newparent, ino],
            self.backend.link(self.b(ino), self.b(newparent), newname),
        )?;
        Ok(self.entry(newparent, newname, a))
    }

    /// Remove a file.
    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let child = self.child(parent, name);
        let r = self.after(&[parent], self.backend.unlink(self.b(parent), name));
        self.bpf_changed(&[(parent, name)], child.as_slice());
        Ok(r?)
    }

    /// Remove a directory.
    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let child = self.child(parent, name);
        let r = self.after(&[parent], self.backend.rmdir(self.b(parent), name));
        self.bpf_changed(&[(parent, name)], child.as_slice());
        Ok(r?)
    }

    /// Rename.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        let children: Vec<u64> = [self.child(parent, name), self.child(newparent, newname)]
            .into_iter()
            .flatten()
            .collect();
        let r = self
            .backend
            .rename(self.b(parent), name, self.b(newparent), newname, flags);
        let r = self.after(&[parent, newparent], r);
        self.bpf_changed(&[(parent, name), (newparent, newname)], &children);
        Ok(r?)
    }

    /// An inode-flag ioctl (chattr, lsattr; see [`crate::backend::fileattr`]):
    /// `data` is what the kernel copied in; returns the argument after the
    /// call (the flags, for a get).
    pub fn fileattr(&self, ino: u64, cmd: u32, data: &[u8]) -> FsResult<Vec<u8>> {
        use crate::backend::fileattr;
        let len = fileattr::arg_len(cmd).ok_or(FsError::Errno(libc::ENOTTY))?;
        let mut arg = vec![0u8; len];
        if fileattr::sets(cmd) {
            if data.len() < len {
                return Err(FsError::Errno(libc::EINVAL));
            }
            arg.copy_from_slice(&data[..len]);
        }
        let r = self.backend.fileattr(self.b(ino), cmd, &mut arg);
        if fileattr::sets(cmd) && r.is_ok() {
            // The ctime moved: cached attributes are stale, the kernel's
            // and the maps'.
            self.modified(ino);
            if let Some(n) = self.notifier() {
                n.inval_inode(ino);
            }
        }
        r?;
        Ok(arg)
    }

    /// Create and open a file.
    pub fn create(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> FsResult<(Entry, Opened)> {
        let (a, fh) = self.after(
            &[parent],
            self.backend.create(who, self.b(parent), name, mode, flags),
        )?;
        Ok(self.new_file(parent, name, a, fh))
    }

    /// O_TMPFILE: an unnamed file in `parent`, opened; the kernel holds a
    /// reference to it (a lookup) as for a create.
    pub fn tmpfile(&self, who: Caller, parent: u64, mode: u32, flags: i32) -> FsResult<(Entry, Opened)> {
        let (a, fh) = self.backend.tmpfile(who, self.b(parent), mode, flags)?;
        Ok(self.new_file(parent, OsStr::new("/"), a, fh))
    }

    /// The entry and the open of a file just created (CREATE, TMPFILE).
    fn new_file(&self, parent: u64, name: &OsStr, a: Attr, fh: Fh) -> (Entry, Opened) {
        let p = self.policy();
        let e = self.entry(parent, name, a);
        self.writer_opened(fh, e.attr.ino);
        let o = Opened {
            fh,
            // A new file has nothing cached worth keeping; no passthrough so
            // the open does not pin the inode to uncached I/O.
            flags: OpenFlags {
                keep_cache: p.keep_cache,
                ..Default::default()
            },
            backing: None,
            staged: false,
            writable: true,
        };
        (e, o)
    }

    /// Read.
    pub fn read(&self, fh: Fh, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        Ok(self.backend.read(fh, offset, size)?)
    }

    /// Read into `buf` (a reply buffer); returns the bytes read.
    pub fn read_into(&self, fh: Fh, offset: u64, buf: &mut [u8]) -> FsResult<usize> {
        Ok(self.backend.read_into(fh, offset, buf)?)
    }

    /// Write.
    pub fn write(&self, fh: Fh, offset: u64, data: &[u8]) -> FsResult<u32> {
        Ok(self.backend.write(fh, offset, data)?)
    }

    /// close(2) of one descriptor.
    pub fn flush(&self, fh: Fh) -> FsResult<()> {
        Ok(self.backend.flush(fh)?)
    }

    /// fsync(2).
    pub fn fsync(&self, fh: Fh, datasync: bool) -> FsResult<()> {
        Ok(self.backend.fsync(fh, datasync)?)
    }

    /// Last close of a handle.
    pub fn release(&self, fh: Fh) {
        if let Some(ino) = self.writer_fhs.lock().remove(&fh) {
            self.writers.closed(ino);
        }
        self.backend.release(fh)
    }

    /// Open a directory.
    pub fn opendir(&self, ino: u64) -> FsResult<Opened> {
        let fh = self.backend.opendir(self.b(ino))?;
        let p = self.policy();
        Ok(Opened {
            fh,
            flags: OpenFlags {
                keep_cache: p.keep_cache,
                cache_dir: p.keep_cache,
                ..Default::default()
            },
            backing: None,
            staged: false,
            writable: false,
        })
    }

    /// List a directory from cookie `offset` into `out` until it is full.
    pub fn readdir(&self, dh: Fh, offset: u64, out: &mut dyn DirReplier) -> FsResult<()> {
        let mut offset = offset;
        loop {
            let batch = self.backend.readdir(dh, offset, READDIR_BATCH)?;
            if batch.is_empty() {
                return Ok(());
            }
            for DirEntry {
                name,
                ino,
                kind,
                next,
            } in batch
            {
                if out.add(self.inodes.to_fuse(ino), next, kind, &name) {
                    return Ok(());
                }
                offset = next;
            }
        }
    }

    /// List a directory with attributes (READDIRPLUS). Every entry but `.`
    /// and `..` that is added counts as a lookup; the ones that do not fit
    /// are given back to the backend.
    pub fn readdir_plus(&self, dir: u64, dh: Fh, offset: u64, out: &mut dyn DirPlusReplier) -> FsResult<()> {
        let mut offset = offset;
        loop {
            // Every entry of the listing pins its inode, as a lookup does:
            // past the budget, ask the kernel to drop unused entries (a
            // walk of a big tree otherwise fills the descriptor table
            // without a single lookup noticing).
            if self.inodes.len() > self.fd_budget {
                self.relieve_fd_pressure(false);
            }
            let offer = self.offer();
            let batch = self.backend.readdir_plus(dh, offset, READDIR_BATCH)?;
            if batch.is_empty() {
                return Ok(());
            }
            let mut iter = batch.into_iter();
            while let Some((e, a)) = iter.next() {
                let dots = e.name == "." || e.name == "..";
                let full = if dots {
                    let p = self.policy();
                    let entry = Entry {
                        attr: self.fuse_attr(a),
                        generation: 0,
                        entry_ttl: p.entry_ttl,
                        attr_ttl: p.attr_ttl,
                    };
                    out.add(&entry, e.next, &e.name)
                } else {
                    let entry = self.entry(dir, &e.name, a);
                    let full = out.add(&entry, e.next, &e.name);
                    if full {
                        self.forget(entry.attr.ino, 1);
                    } else {
                        self.offer_entry(offer.as_ref(), dir, &e.name, &entry);
                    }
                    full
                };
                if full {
                    for (rest, ra) in iter {
                        if rest.name != "." && rest.name != ".." {
                            self.backend.forget(ra.ino, 1);
                        }
                    }
                    return Ok(());
                }
                offset = e.next;
            }
        }
    }

    /// Close a directory.
    pub fn releasedir(&self, dh: Fh) {
        self.backend.releasedir(dh)
    }

    /// statfs(2).
    pub fn statfs(&self) -> FsResult<StatFs> {
        Ok(self.backend.statfs()?)
    }

    /// Get an xattr: its size if `size` is 0, else its value (ERANGE if it does not fit).
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> FsResult<XattrReply> {
        let offer = self.offer();
        let v = self.backend.getxattr(self.b(ino), name).inspect_err(|e| {
            if matches!(e.to_errno(), libc::ENODATA | libc::EOPNOTSUPP)
                && let Some(o) = &offer
            {
                self.offer_extras(o, o.tier.renew(ino, self.policy().attr_ttl, false));
            }
        })?;
        sized(v, size)
    }

    /// Set an xattr.
    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        let r = self.backend.setxattr(self.b(ino), name, value, flags);
        self.modified(ino);
        Ok(r?)
    }

    /// List xattrs: the size if `size` is 0, else the list.
    pub fn listxattr(&self, ino: u64, size: u32) -> FsResult<XattrReply> {
        let v = self.backend.listxattr(self.b(ino))?;
        sized(v, size)
    }

    /// Remove an xattr.
    pub fn removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        let r = self.backend.removexattr(self.b(ino), name);
        self.modified(ino);
        Ok(r?)
    }

    /// fallocate(2).
    pub fn fallocate(&self, fh: Fh, offset: u64, len: u64, mode: i32) -> FsResult<()> {
        Ok(self.backend.fallocate(fh, offset, len, mode)?)
    }

    /// lseek(2) for SEEK_DATA / SEEK_HOLE.
    pub fn lseek(&self, fh: Fh, offset: i64, whence: i32) -> FsResult<i64> {
        Ok(self.backend.lseek(fh, offset, whence)?)
    }

    /// copy_file_range(2).
    pub fn copy_file_range(&self, a: Fh, oa: u64, b: Fh, ob: u64, len: u64) -> FsResult<u64> {
        Ok(self.backend.copy_file_range(a, oa, b, ob, len)?)
    }
}

/// Reply to a getxattr/listxattr.
#[derive(Debug, PartialEq, Eq)]
pub enum XattrReply {
    /// Only the size was asked for.
    Size(u32),
    /// The data.
    Data(Vec<u8>),
}

fn sized(v: Vec<u8>, size: u32) -> FsResult<XattrReply> {
    if size == 0 {
        Ok(XattrReply::Size(v.len() as u32))
    } else if v.len() > size as usize {
        Err(FsError::Range {
            size,
            needed: v.len(),
        })
    } else {
        Ok(XattrReply::Data(v))
    }
}

/// A filesystem over a backend, shared by the FUSE threads.
pub type SharedFs = Arc<EfuseFs>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::mem::MemBackend;

    /// A plain-FUSE (`off`) filesystem over an empty in-memory tree.
    fn mem_fs() -> EfuseFs {
        EfuseFs::new(
            Arc::new(MemBackend::new()),
            Offload::Off,
            KernelTierConfig::default(),
        )
    }

    /// A `bpf`-tier filesystem over an in-memory tree with a model of the
    /// kernel maps attached.
    fn bpf_fs(capacity: usize) -> (EfuseFs, Arc<crate::bpf::ModelMaps>) {
        let fs = EfuseFs::build(
            Arc::new(MemBackend::new()),
            FsConfig {
                xattr: crate::config::Xattr::On,
                ..FsConfig::tier(Offload::Bpf, KernelTierConfig::default())
            },
        );
        let maps = Arc::new(crate::bpf::ModelMaps {
            capacity,
            answers: crate::bpf::Answers {
                open: true,
                ioctl: true,
                getxattr: true,
            },
            ..Default::default()
        });
        fs.attach_model(maps.clone());
        (fs, maps)
    }

    fn file(fs: &EfuseFs, name: &str) -> u64 {
        let (e, o) = fs
            .create(Caller::default(), 1, OsStr::new(name), 0o644, libc::O_RDWR)
            .unwrap();
        fs.release(o.fh);
        fs.forget(e.attr.ino, 1);
        e.attr.ino
    }

    #[test]
    fn bpf_answered_lookups_are_counted_before_forgets() {
        let (fs, maps) = bpf_fs(0);
        let ino = file(&fs, "f");
        assert_eq!(fs.lookup(1, OsStr::new("f")).unwrap().attr.ino, ino);
        assert!(
            maps.entries.lock().contains_key(&(1, b"f".to_vec())),
            "lookup reply offered to the map"
        );
        // The kernel's dentry goes; two lookups are then answered by BPF.
        fs.forget(ino, 1);
        assert_eq!(maps.bpf_lookup(1, "f"), Some(ino));
        assert_eq!(maps.bpf_lookup(1, "f"), Some(ino));
        // The kernel forgets them: the daemon had never seen them, yet the
        // counts balance and the inode stays usable while the map names it.
        fs.forget(ino, 2);
        assert_eq!(fs.inodes().excess_forgets(), 0);
        assert_eq!(fs.inodes().totals(), (0, 0));
        assert!(fs.getattr(ino).is_ok(), "inode freed while a map entry names it");
        // Removing the name removes the entry, and then the inode.
        fs.unlink(1, OsStr::new("f")).unwrap();
        assert!(maps.entries.lock().is_empty());
        assert_eq!(fs.inodes().len(), 0);
    }

    #[test]
    fn xattr_records_follow_changes_and_writers() {
        let (fs, maps) = bpf_fs(0);
        let ino = file(&fs, "f");
        fs.lookup(1, OsStr::new("f")).unwrap();
        // No attributes: recorded with the backend's errno per namespace.
        let v = *maps.noxattr.lock().get(&ino).expect("no-xattr record");
        assert_eq!(v.security_errno as i32, libc::ENODATA);
        assert_ne!(v.acl_errno, 0);
        // A setxattr deletes the record before it returns.
        fs.setxattr(ino, OsStr::new("user.k"), b"v", 0).unwrap();
        assert!(!maps.noxattr.lock().contains_key(&ino));
        // With an attribute, no record comes back.
        fs.getattr(ino).unwrap();
        assert!(!maps.noxattr.lock().contains_key(&ino));
        fs.removexattr(ino, OsStr::new("user.k")).unwrap();
        fs.getattr(ino).unwrap();
        assert!(maps.noxattr.lock().contains_key(&ino));
        // A writer open takes everything about the inode out of the maps,
        // and nothing comes back until it is released.
        let o = fs.open(ino, libc::O_WRONLY).unwrap();
        assert!(!maps.noxattr.lock().contains_key(&ino));
        assert!(!maps.attrs.lock().contains_key(&ino));
        fs.getattr(ino).unwrap();
        fs.lookup(1, OsStr::new("f")).unwrap();
        assert!(
            !maps.attrs.lock().contains_key(&ino),
            "attributes offered while a writer is open"
        );
        assert!(
            maps.entries.lock().is_empty(),
            "entry offered while a writer is open"
        );
        fs.release(o.fh);
        fs.getattr(ino).unwrap();
        assert!(maps.attrs.lock().contains_key(&ino));
        // A read-only open leaves the attributes (atime may lag, see SEMANTICS.md).
        let o = fs.open(ino, libc::O_RDONLY).unwrap();
        assert!(maps.attrs.lock().contains_key(&ino));
        fs.release(o.fh);
    }

    #[test]
    fn changes_leave_the_maps_before_the_reply() {
        let (fs, maps) = bpf_fs(0);
        let ino = file(&fs, "f");
        fs.lookup(1, OsStr::new("f")).unwrap();
        fs.getattr(ino).unwrap();
        assert!(maps.attrs.lock().contains_key(&ino));
        let set = SetAttr {
            mode: Some(0o600),
            ..Default::default()
        };
        fs.setattr(ino, None, &set).unwrap();
        assert!(
            !maps.attrs.lock().contains_key(&ino),
            "stale attributes left in the map"
        );
        assert!(
            maps.entries.lock().is_empty(),
            "entry with stale attributes left in the map"
        );
        // A lookup whose backend call started before a change is not offered.
        let o = fs.offer().expect("attached");
        let a = fs.fuse_attr(fs.backend.getattr(fs.b(ino)).unwrap());
        fs.modified(ino);
        let x = o.tier.put_entry(
            o.epoch,
            1,
            OsStr::new("f"),
            &a,
            Duration::from_secs(1),
            Duration::from_secs(1),
            false,
        );
        assert!(maps.entries.lock().is_empty(), "raced insert accepted");
        assert!(!x.any(), "extras asked for a raced insert");
        fs.forget(ino, 1);
    }

    #[test]
    fn a_full_map_keeps_the_recent_entries() {
        // The model evicts the smallest key, here the oldest name.
        let (fs, maps) = bpf_fs(4);
        let names: Vec<String> = (0..20).map(|i| format!("f{i:02}")).collect();
        for n in &names {
            file(&fs, n);
        }
        let mut inos = Vec::new();
        for n in &names {
            inos.push(fs.lookup(1, OsStr::new(n)).unwrap().attr.ino);
        }
        assert!(maps.entries.lock().len() <= 4);
        let st = fs.bpf_stats();
        assert_eq!(st.map_full, 0, "a full LRU map is never an error");
        assert!(st.evicted >= 14, "{st:?}");
        // The mirror noticed the evictions: at most an eighth over.
        assert!(st.entries <= 5, "{st:?}");
        // The newest names are answered in the kernel, counted.
        assert_eq!(maps.bpf_lookup(1, "f19"), Some(inos[19]));
        assert_eq!(maps.bpf_lookup(1, "f00"), None);
        for &ino in &inos {
            fs.forget(ino, 1);
        }
        // Detaching takes over the BPF lookup and releases every map
        // reference: the kernel still holds f19 once.
        fs.detach_bpf();
        assert_eq!(fs.inodes().nlookup(inos[19]), 1);
        fs.forget(inos[19], 1);
        assert_eq!(fs.inodes().len(), 0);
        assert_eq!(fs.inodes().excess_forgets(), 0);
    }

    struct Collect(Vec<(u64, String)>, usize);
    impl DirPlusReplier for Collect {
        fn add(&mut self, e: &Entry, _next: u64, name: &OsStr) -> bool {
            if self.0.len() >= self.1 {
                return true;
            }
            self.0.push((e.attr.ino, name.to_string_lossy().into()));
            false
        }
    }

    #[test]
    fn readdirplus_counts_only_what_fits() {
        let fs = mem_fs();
        for i in 0..10 {
            let e = fs
                .mkdir(Caller::default(), 1, OsStr::new(&format!("d{i}")), 0o755)
                .unwrap();
            fs.forget(e.attr.ino, 1);
        }
        assert_eq!(fs.inodes().totals(), (0, 0));
        let dh = fs.opendir(1).unwrap().fh;
        let mut c = Collect(Vec::new(), 5);
        fs.readdir_plus(1, dh, 0, &mut c).unwrap();
        // ".", ".." and three directories fit; only the three are counted.
        assert_eq!(c.0.len(), 5);
        assert_eq!(fs.inodes().totals(), (3, 3));
        for (ino, name) in &c.0[2..] {
            assert!(name.starts_with('d'));
            fs.forget(*ino, 1);
        }
        assert_eq!(fs.inodes().totals(), (0, 0));
        fs.releasedir(dh);
    }

    #[test]
    fn access_follows_mode_bits() {
        let fs = mem_fs();
        let who = Caller {
            uid: 1000,
            gid: 1000,
            pid: 1,
            umask: 0,
        };
        let (e, o) = fs.create(who, 1, OsStr::new("f"), 0o640, libc::O_RDWR).unwrap();
        fs.release(o.fh);
        let ino = e.attr.ino;
        assert!(fs.access(ino, libc::R_OK | libc::W_OK, 1000, 1000).is_ok());
        assert!(fs.access(ino, libc::X_OK, 1000, 1000).is_err());
        assert!(fs.access(ino, libc::R_OK, 2000, 1000).is_ok());
        assert!(fs.access(ino, libc::W_OK, 2000, 1000).is_err());
        assert!(fs.access(ino, libc::R_OK, 2000, 2000).is_err());
        assert!(fs.access(ino, libc::R_OK | libc::W_OK, 0, 0).is_ok());
        assert_eq!(
            fs.access(ino, libc::X_OK, 0, 0).unwrap_err().to_errno(),
            libc::EACCES
        );
        assert!(fs.access(ino, libc::F_OK, 2000, 2000).is_ok());
    }

    #[test]
    fn root_is_inode_one() {
        let fs = mem_fs();
        let (a, ttl) = fs.getattr(1).unwrap();
        assert_eq!(a.ino, 1);
        assert_eq!(a.kind, FileKind::Dir);
        assert_eq!(ttl, Duration::ZERO);
    }

    #[test]
    fn xattr_size_then_data_then_erange() {
        let fs = mem_fs();
        fs.setxattr(1, OsStr::new("user.k"), b"value", 0).unwrap();
        assert_eq!(
            fs.getxattr(1, OsStr::new("user.k"), 0).unwrap(),
            XattrReply::Size(5)
        );
        assert_eq!(
            fs.getxattr(1, OsStr::new("user.k"), 5).unwrap(),
            XattrReply::Data(b"value".to_vec())
        );
        assert_eq!(
            fs.getxattr(1, OsStr::new("user.k"), 2).unwrap_err().to_errno(),
            libc::ERANGE
        );
    }
}
