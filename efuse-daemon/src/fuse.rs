//! The FUSE adapter: fuser callbacks to [`EfuseFs`] calls.
//!
//! Each callback converts arguments, calls one filesystem method, and
//! replies through [`FuseAdapter::finish`], which counts the request and on
//! error logs it (quietly for expected errnos) and replies with the errno.
//! No filesystem logic lives here.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use fuser::{
    AccessFlags, BackingId, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::backend::{Attr, Caller, FileKind, SetAttr, SetTime};
use crate::fs::{DirPlusReplier, DirReplier, Entry, FsError, FsResult, Opened, SharedFs, XattrReply};
use crate::metrics::{Metrics, op};

/// Passthrough state: one backing id per inode, shared by its open
/// handles (the kernel requires it), held strongly by each handle and
/// closed with the last one; and the count of cached (non-passthrough)
/// opens per inode, because the kernel refuses to mix the two modes on one
/// inode.
#[derive(Default)]
struct Backing {
    /// Backing id of an inode and whether it is a staged (read-only) copy.
    by_ino: HashMap<u64, (Weak<BackingId>, bool)>,
    by_fh: HashMap<u64, (u64, Arc<BackingId>)>,
    /// Cached opens: handle -> inode, and their number per inode.
    cached_fh: HashMap<u64, u64>,
    cached_per_ino: HashMap<u64, u32>,
}

impl Backing {
    fn add_cached(&mut self, fh: u64, ino: u64) {
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
}

/// What INIT negotiated.
#[derive(Debug, Default)]
pub struct Negotiated {
    /// FUSE_PASSTHROUGH granted.
    pub passthrough: AtomicBool,
    /// Passthrough was refused at run time; page cache used instead.
    pub passthrough_refused: AtomicBool,
}

/// fuser's `Filesystem` over an [`EfuseFs`](crate::fs::EfuseFs).
///
/// Requests run on fuser's worker threads. For a remote backend (slow
/// round trips) each request's work moves to a tokio blocking pool, so
/// that many slow backend calls proceed at once instead of one per worker.
pub struct FuseAdapter {
    inner: Arc<Inner>,
    pool: Option<tokio::runtime::Runtime>,
}

impl Drop for FuseAdapter {
    fn drop(&mut self) {
        // The session is over: do not wait for backend calls still running
        // on the pool (a stalled backend would keep the daemon alive after
        // its mount is gone); their replies have nowhere to go.
        if let Some(rt) = self.pool.take() {
            rt.shutdown_background();
        }
    }
}

/// The adapter's state, shared with the requests in flight on the pool.
struct Inner {
    fs: SharedFs,
    metrics: Arc<Metrics>,
    backing: Mutex<Backing>,
    negotiated: Arc<Negotiated>,
}

/// Backend calls in flight at once on the pool, at most.
const REMOTE_CONCURRENCY: usize = 256;

impl FuseAdapter {
    /// An adapter counting into `metrics`.
    pub fn new(fs: SharedFs, metrics: Arc<Metrics>) -> Self {
        let pool = if fs.backend().is_remote() {
            match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .max_blocking_threads(REMOTE_CONCURRENCY)
                .thread_name("efuse-io")
                .build()
            {
                Ok(rt) => Some(rt),
                Err(e) => {
                    tracing::warn!("no I/O pool ({e}); backend calls run on the FUSE threads");
                    None
                }
            }
        } else {
            None
        };
        Self {
            inner: Arc::new(Inner {
                fs,
                metrics,
                backing: Mutex::new(Backing::default()),
                negotiated: Arc::new(Negotiated::default()),
            }),
            pool,
        }
    }

    /// What INIT negotiated (filled in by `init`).
    pub fn negotiated(&self) -> Arc<Negotiated> {
        self.inner.negotiated.clone()
    }

    /// Run a request's work: inline for a local backend, on the I/O pool
    /// for a remote one.
    fn run(&self, f: impl FnOnce(&Inner) + Send + 'static) {
        match &self.pool {
            Some(rt) => {
                let me = self.inner.clone();
                drop(rt.spawn_blocking(move || f(&me)));
            }
            None => f(&self.inner),
        }
    }
}

impl Inner {
    /// Reply to an open: passthrough when wanted, granted and consistent
    /// with the inode's other opens; else a cached open.
    /// Reply to an open. `sgid_writer`: a writer whose writes must clear the
    /// file's S_ISGID (see `EfuseFs::drop_sgid`); should the inode have to
    /// stay in passthrough (other opens use it), the bit is cleared now,
    /// since no write of this open will reach the daemon.
    fn reply_open(&self, ino: u64, o: Opened, reply: ReplyOpen, sgid_writer: Option<Caller>) {
        let mut b = self.backing.lock();
        let live_staged = b
            .by_ino
            .get(&ino)
            .is_some_and(|(w, staged)| *staged && w.strong_count() > 0);
        if live_staged && o.writable {
            // Readers are served from a read-only local copy; the kernel
            // cannot mix their passthrough with a writer's open.
            drop(b);
            self.fs.release(o.fh);
            reply.error(Errno::from_i32(libc::ETXTBSY));
            return;
        }
        let live = b.by_ino.get(&ino).and_then(|(w, _)| w.upgrade());
        let has_cached = b.cached_per_ino.contains_key(&ino);
        let want = live.is_some()
            || (o.flags.passthrough
                && !has_cached
                && self.negotiated.passthrough.load(Ordering::Relaxed)
                && !self.negotiated.passthrough_refused.load(Ordering::Relaxed));
        if let Some(who) = sgid_writer
            && live.is_some()
        {
            let _ = self.fs.drop_sgid(ino, who);
        }
        // An inode with a live passthrough open must get passthrough for
        // every open (the kernel fails a cached open of it with EIO), also
        // for an open that asked for none (the off tier, after a switch):
        // the live backing id serves it; a backing file is needed only to
        // register a new one.
        let id = match (want, live, o.backing.as_ref()) {
            (true, Some(id), _) => Some(Ok(id)),
            (true, None, Some(file)) => Some(reply.open_backing(&**file).map(Arc::new)),
            _ => None,
        };
        if let Some(id) = id {
            match id {
                Ok(id) => {
                    let staged = o.staged || live_staged;
                    b.by_ino.insert(ino, (Arc::downgrade(&id), staged));
                    b.by_fh.insert(o.fh, (ino, id.clone()));
                    reply.opened_passthrough(
                        FileHandle(o.fh),
                        fopen_flags(&o) & !FopenFlags::FOPEN_KEEP_CACHE,
                        &id,
                    );
                    return;
                }
                Err(e) => {
                    if !self.negotiated.passthrough_refused.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "FUSE passthrough refused by the kernel ({e}); reads use the page cache \
                             (FOPEN_KEEP_CACHE) from now on"
                        );
                    }
                }
            }
        }
        b.add_cached(o.fh, ino);
        reply.opened(FileHandle(o.fh), fopen_flags(&o));
    }

    fn released(&self, fh: u64) {
        let mut b = self.backing.lock();
        if let Some((ino, id)) = b.by_fh.remove(&fh) {
            drop(id);
            if b.by_ino.get(&ino).is_some_and(|(w, _)| w.strong_count() == 0) {
                b.by_ino.remove(&ino);
            }
        }
        b.remove_cached(fh);
    }

    fn zero_open(&self) -> bool {
        self.fs.kernel_cfg().zero_open && self.fs.tier() != crate::config::Offload::Off
    }

    fn finish<T, R: ErrReply>(
        &self,
        opcode: u32,
        start: Instant,
        res: FsResult<T>,
        reply: R,
        ok: impl FnOnce(R, T),
    ) {
        match res {
            Ok(v) => {
                ok(reply, v);
                self.metrics.record(opcode, start, false);
            }
            Err(e) => {
                log_error(opcode, &e);
                reply.error(Errno::from_i32(e.to_errno()));
                self.metrics.record(opcode, start, true);
            }
        }
    }
}

fn log_error(opcode: u32, e: &FsError) {
    let op = crate::metrics::opcode_name(opcode);
    if e.is_expected() {
        tracing::debug!(op, errno = e.to_errno(), "{e}");
    } else {
        tracing::warn!(op, errno = e.to_errno(), "{e:#}");
    }
}

/// Reply types that can carry an errno.
trait ErrReply {
    fn error(self, e: Errno);
}

macro_rules! err_reply {
    ($($t:ty),*) => {$(
        impl ErrReply for $t {
            fn error(self, e: Errno) {
                <$t>::error(self, e)
            }
        }
    )*};
}
err_reply!(
    ReplyEntry,
    ReplyAttr,
    ReplyData,
    ReplyEmpty,
    ReplyOpen,
    ReplyWrite,
    ReplyCreate,
    ReplyStatfs,
    ReplyXattr,
    ReplyDirectory,
    ReplyDirectoryPlus,
    ReplyLseek
);

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

/// Backend attributes to fuser's.
pub fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn reply_entry(r: ReplyEntry, e: Entry) {
    r.entry_with_ttls(
        &e.attr_ttl,
        &e.entry_ttl,
        &file_attr(&e.attr),
        Generation(e.generation),
    );
}

fn fopen_flags(o: &Opened) -> FopenFlags {
    let mut f = FopenFlags::empty();
    if o.flags.keep_cache {
        f |= FopenFlags::FOPEN_KEEP_CACHE;
    }
    if o.flags.cache_dir {
        f |= FopenFlags::FOPEN_CACHE_DIR;
    }
    if o.flags.noflush {
        f |= FopenFlags::FOPEN_NOFLUSH;
    }
    f
}

/// A negative entry: nodeid 0, cached by the kernel for `ttl`.
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

/// The kernel notifications efuse sends: fuser's, plus entry expiry,
/// which fuser does not offer, written on a duplicate of the connection's
/// descriptor.
pub struct Notify {
    fuser: fuser::Notifier,
    dev: std::os::fd::OwnedFd,
}

impl Notify {
    /// Notifications over `dev` (a duplicate of the connection's /dev/fuse
    /// descriptor) and fuser's notifier of the same session.
    pub fn new(fuser: fuser::Notifier, dev: std::os::fd::OwnedFd) -> Self {
        Self { fuser, dev }
    }

    /// FUSE_NOTIFY_INVAL_ENTRY with FUSE_EXPIRE_ONLY (Linux 6.2+): the
    /// dentry stays hashed but must be revalidated by its next user, so a
    /// process whose working directory it is keeps a working getcwd() (a
    /// plain invalidation unhashes it: getcwd then fails with ENOENT, which
    /// broke git in a directory created through the mount). A kernel before
    /// 6.2 ignores the flag and invalidates fully.
    fn expire_entry(&self, parent: u64, name: &OsStr) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        const FUSE_NOTIFY_INVAL_ENTRY: i32 = 3;
        const FUSE_EXPIRE_ONLY: u32 = 1;
        let name = name.as_bytes();
        let len = 16 + 16 + name.len() + 1;
        let mut msg = Vec::with_capacity(len);
        // fuse_out_header: len, error (the notify code), unique 0.
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&FUSE_NOTIFY_INVAL_ENTRY.to_ne_bytes());
        msg.extend_from_slice(&0u64.to_ne_bytes());
        // fuse_notify_inval_entry_out: parent, namelen, flags; then the name and a NUL.
        msg.extend_from_slice(&parent.to_ne_bytes());
        msg.extend_from_slice(&(name.len() as u32).to_ne_bytes());
        msg.extend_from_slice(&FUSE_EXPIRE_ONLY.to_ne_bytes());
        msg.extend_from_slice(name);
        msg.push(0);
        // SAFETY: a valid descriptor and a buffer of msg.len() bytes.
        let n = unsafe { libc::write(self.dev.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl crate::fs::KernelNotifier for Notify {
    fn inval_entry(&self, parent: u64, name: &OsStr) {
        if let Err(e) = self.expire_entry(parent, name) {
            tracing::debug!(parent, ?name, "inval_entry (expire): {e}");
        }
    }
    fn drop_entry(&self, parent: u64, name: &OsStr) {
        if let Err(e) = fuser::Notifier::inval_entry(&self.fuser, INodeNo(parent), name) {
            tracing::debug!(parent, ?name, "inval_entry: {e}");
        }
    }
    fn inval_inode(&self, ino: u64) {
        // Offset -1: attributes only. Invalidating the page cache from here
        // would launder dirty pages (a shared-mmap writer's) and wait for
        // their WRITE, which only this daemon can answer: a daemon killed
        // meanwhile never exits and its mount hangs instead of failing with
        // ENOTCONN. The kernel drops stale pages itself, in the reader's
        // context: on the next read or getattr that sees a new mtime or size
        // (FUSE_AUTO_INVAL_DATA), and at every open without FOPEN_KEEP_CACHE.
        if let Err(e) = fuser::Notifier::inval_inode(&self.fuser, INodeNo(ino), -1, 0) {
            tracing::debug!(ino, "inval_inode: {e}");
        }
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
        umask: 0,
    }
}

/// The caller of a create, with the umask the kernel sent (with
/// FUSE_DONT_MASK it has not applied it).
fn creator(req: &Request, umask: u32) -> Caller {
    Caller {
        umask: umask & 0o777,
        ..caller(req)
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    })
}

struct Plain<'a>(&'a mut ReplyDirectory);
impl DirReplier for Plain<'_> {
    fn add(&mut self, ino: u64, next: u64, kind: FileKind, name: &OsStr) -> bool {
        self.0.add(INodeNo(ino), next, file_type(kind), name)
    }
}

struct Plus<'a>(&'a mut ReplyDirectoryPlus);
impl DirPlusReplier for Plus<'_> {
    fn add(&mut self, e: &Entry, next: u64, name: &OsStr) -> bool {
        self.0.add(
            INodeNo(e.attr.ino),
            next,
            name,
            &e.entry_ttl,
            &file_attr(&e.attr),
            Generation(e.generation),
        )
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let start = Instant::now();
        let k = self.inner.fs.kernel_cfg().clone();
        let kernel_start = self.inner.fs.tier() != crate::config::Offload::Off;
        // Parallel lookups in one directory. READDIRPLUS and AUTO_INVAL_DATA
        // are asked for in every tier so the tier can change at run time;
        // with zero TTLs (off) the kernel trusts none of it.
        //
        // Not FUSE_ATOMIC_O_TRUNC: with it the daemon truncates during OPEN,
        // before the kernel's last checks (ETXTBSY of a running executable
        // opened O_RDONLY|O_TRUNC, IMA, the LSM truncate hook), so an open
        // the kernel then refuses would already have emptied the file.
        // Without it the kernel sends the truncation as a SETATTR once every
        // check has passed: one more round trip per O_TRUNC open, and a
        // refused open changes nothing.
        let mut want = vec![
            ("parallel dirops", InitFlags::FUSE_PARALLEL_DIROPS),
            // name_to_handle_at/open_by_handle_at and NFS re-export: node
            // ids are the backing inode numbers, generations survive FORGET
            // (see InodeTable::graves), LOOKUP answers "." and "..".
            ("export support", InitFlags::FUSE_EXPORT_SUPPORT),
            ("READDIRPLUS", InitFlags::FUSE_DO_READDIRPLUS),
            ("auto page-cache invalidation", InitFlags::FUSE_AUTO_INVAL_DATA),
        ];
        if kernel_start {
            want.push(("symlink caching", InitFlags::FUSE_CACHE_SYMLINKS));
        }
        // POSIX ACLs, enforced by the kernel, where the backend keeps them
        // and other users may use the mount (the kernel then checks
        // permissions itself; for the mounting user alone, root, ACLs
        // grant nothing more).
        if self.inner.fs.posix_acl() {
            want.push(("POSIX ACLs", InitFlags::FUSE_POSIX_ACL));
        }
        // The umask is applied by the backend (the dir backend lets the
        // backing filesystem apply it, which skips it where a default ACL
        // applies, as on a local filesystem).
        want.push(("unmasked create modes", InitFlags::FUSE_DONT_MASK));
        if k.writeback_cache {
            want.push(("writeback cache", InitFlags::FUSE_WRITEBACK_CACHE));
        }
        for (what, cap) in want {
            if config.add_capabilities(cap).is_err() {
                tracing::info!("the kernel does not offer {what}; continuing without it");
            }
        }
        // EFUSE_DISABLE_PASSTHROUGH=1 behaves as a kernel without
        // passthrough (to check the fallback on kernels that have it).
        let disabled = std::env::var_os("EFUSE_DISABLE_PASSTHROUGH").is_some_and(|v| v == "1");
        if disabled && k.passthrough {
            tracing::warn!(
                "FUSE passthrough disabled by EFUSE_DISABLE_PASSTHROUGH; reads use the page cache"
            );
        }
        if k.passthrough && !k.writeback_cache && !disabled {
            match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
                Ok(()) => {
                    // Backing files are on a plain filesystem; the mount may
                    // itself sit under overlayfs.
                    let _ = config.set_max_stack_depth(1);
                    self.inner.negotiated.passthrough.store(true, Ordering::Relaxed);
                }
                Err(_) => tracing::warn!(
                    "FUSE passthrough needs Linux 6.9+ (FUSE_PASSTHROUGH); this kernel does not offer it, \
                     so the kernel tier serves reads from the page cache (FOPEN_KEEP_CACHE)"
                ),
            }
        }
        tracing::debug!(abi = ?config.kernel_abi(), caps = ?config.capabilities(), "FUSE_INIT");
        self.inner.metrics.record(op::INIT, start, false);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_owned();
        self.run(move |me| {
            let name = name.as_os_str();
            let t = Instant::now();
            let res = me.fs.lookup(parent.0, name);
            let neg = me.fs.policy().negative_ttl;
            match res {
                // The kernel caches the absence of the name for `neg`.
                Err(e) if e.to_errno() == libc::ENOENT && !neg.is_zero() => {
                    reply.entry_with_ttls(&Duration::ZERO, &neg, &negative_attr(), Generation(0));
                    me.metrics.record(op::LOOKUP, t, false);
                }
                res => me.finish(op::LOOKUP, t, res, reply, reply_entry),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let t = Instant::now();
        self.inner.fs.forget(ino.0, nlookup);
        self.inner.metrics.record(op::FORGET, t, false);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.run(move |me| {
            let t = Instant::now();
            me.finish(op::GETATTR, t, me.fs.getattr(ino.0), reply, |r, (a, ttl)| {
                r.attr(&ttl, &file_attr(&a))
            });
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let who = caller(req);
        self.run(move |me| {
            let t = Instant::now();
            let set = SetAttr {
                mode,
                uid,
                gid,
                size,
                atime: set_time(atime),
                mtime: set_time(mtime),
            };
            let mut res = me.fs.setattr(ino.0, fh.map(|f| f.0), &set);
            if res.is_ok()
                && who.uid != 0
                && (size.is_some() || uid.is_some() || gid.is_some())
                && mode.is_none()
            {
                // The reply carries the mode without S_ISGID, when cleared.
                if let Some(a) = me.fs.drop_sgid(ino.0, who) {
                    res = Ok(a);
                }
            }
            me.finish(op::SETATTR, t, res, reply, |r, (a, ttl)| {
                r.attr(&ttl, &file_attr(&a))
            });
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.run(move |me| {
            let t = Instant::now();
            me.finish(op::READLINK, t, me.fs.readlink(ino.0), reply, |r, v| r.data(&v));
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let who = creator(req, umask);
        let name = name.to_owned();
        self.run(move |me| {
            let name = name.as_os_str();
            let t = Instant::now();
            let res = me.fs.mknod(who, parent.0, name, mode, rdev);
            me.finish(op::MKNOD, t, res, reply, reply_entry);
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let who = creator(req, umask);
        let name = name.to_owned();
        self.run(move |me| {
            let name = name.as_os_str();
            let t = Instant::now();
            let res = me.fs.mkdir(who, parent.0, name, mode);
            me.finish(op::MKDIR, t, res, reply, reply_entry);
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.run(move |me| {
            let name = name.as_os_str();
            let t = Instant::now();
            me.finish(op::UNLINK, t, me.fs.unlink(parent.0, name), reply, |r, ()| r.ok());
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.run(move |me| {
            let name = name.as_os_str();
            let t = Instant::now();
            me.finish(op::RMDIR, t, me.fs.rmdir(parent.0, name), reply, |r, ()| r.ok());
        });
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let who = caller(req);
        let link_name = link_name.to_owned();
        let target = target.to_path_buf();
        self.run(move |me| {
            let link_name = link_name.as_os_str();
            let target = target.as_path();
            let t = Instant::now();
            let res = me.fs.symlink(who, parent.0, link_name, target.as_os_str());
            me.finish(op::SYMLINK, t, res, reply, reply_entry);
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let name = name.to_owned();
        let newname = newname.to_owned();
        self.run(move |me| {
            let name = name.as_os_str();
            let newname = newname.as_os_str();
            let t = Instant::now();
            let res = me.fs.rename(parent.0, name, newparent.0, newname, flags.bits());
            me.finish(op::RENAME, t, res, reply, |r, ()| r.ok());
        });
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let newname = newname.to_owned();
        self.run(move |me| {
            let newname = newname.as_os_str();
            let t = Instant::now();
            let res = me.fs.link(ino.0, newparent.0, newname);
            me.finish(op::LINK, t, res, reply, reply_entry);
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let who = caller(req);
        self.run(move |me| {
            let t = Instant::now();
            if me.zero_open() {
                // ENOSYS makes the kernel stop sending OPEN (and RELEASE) for
                // files on this connection: opens cost no message at all.
                reply.error(Errno::ENOSYS);
                me.metrics.record(op::OPEN, t, false);
                return;
            }
            let res = me.fs.open(ino.0, flags.0).map(|mut o| {
                // Writes to a file whose S_ISGID this caller's first write
                // must clear go through the daemon, which clears it
                // (passthrough writes would keep it).
                let at_risk = o.writable && me.fs.sgid_at_risk(ino.0, who).is_some();
                if at_risk {
                    o.flags.passthrough = false;
                }
                (o, at_risk)
            });
            me.finish(op::OPEN, t, res, reply, |r, (o, at_risk)| {
                me.reply_open(ino.0, o, r, at_risk.then_some(who))
            });
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.run(move |me| {
            let t = Instant::now();
            let res = me.fs.with_io(ino.0, fh.0, |h| me.fs.read(h, offset, size));
            me.finish(op::READ, t, res, reply, |r, v| r.data(&v));
        });
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        let who = caller(req);
        self.run(move |me| {
            let data = &data[..];
            let t = Instant::now();
            let res = me.fs.with_io(ino.0, fh.0, |h| me.fs.write(h, offset, data));
            me.fs.modified(ino.0);
            if res.is_ok() {
                let _ = me.fs.drop_sgid(ino.0, who);
            }
            me.finish(op::WRITE, t, res, reply, |r, n| r.written(n));
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.run(move |me| {
            let t = Instant::now();
            if fh.0 == 0 {
                // A zero-message open: writes already reached the backend
                // synchronously; ENOSYS stops further FLUSH messages.
                reply.error(Errno::ENOSYS);
                me.metrics.record(op::FLUSH, t, false);
                return;
            }
            me.finish(op::FLUSH, t, me.fs.flush(fh.0), reply, |r, ()| r.ok());
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let t = Instant::now();
        if fh.0 != 0 {
            self.inner.released(fh.0);
            self.inner.fs.release(fh.0);
        }
        reply.ok();
        self.inner.metrics.record(op::RELEASE, t, false);
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        self.run(move |me| {
            let t = Instant::now();
            let res = me.fs.with_io(ino.0, fh.0, |h| me.fs.fsync(h, datasync));
            me.finish(op::FSYNC, t, res, reply, |r, ()| r.ok());
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.run(move |me| {
            let t = Instant::now();
            me.finish(op::OPENDIR, t, me.fs.opendir(ino.0), reply, |r, o| {
                r.opened(FileHandle(o.fh), fopen_flags(&o))
            });
        });
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.run(move |me| {
            let t = Instant::now();
            let res = me.fs.readdir(fh.0, offset, &mut Plain(&mut reply));
            me.finish(op::READDIR, t, res, reply, |r, ()| r.ok());
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.run(move |me| {
            let t = Instant::now();
            let res = me.fs.readdir_plus(ino.0, fh.0, offset, &mut Plus(&mut reply));
            me.finish(op::READDIRPLUS, t, res, reply, |r, ()| r.ok());
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let t = Instant::now();
        self.inner.fs.releasedir(fh.0);
        reply.ok();
        self.inner.metrics.record(op::RELEASEDIR, t, false);
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Directory metadata is durable once the backend call returned.
        let t = Instant::now();
        reply.ok();
        self.inner.metrics.record(op::FSYNCDIR, t, false);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.run(move |me| {
            let t = Instant::now();
            me.finish(op::STATFS, t, me.fs.statfs(), reply, |r, s| {
                r.statfs(
                    s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
                )
            });
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let name = name.to_owned();
        let value = value.to_vec();
        self.run(move |me| {
            let name = name.as_os_str();
            let value = &value[..];
            let t = Instant::now();
            let res = me.fs.setxattr(ino.0, name, value, flags);
            me.finish(op::SETXATTR, t, res, reply, |r, ()| r.ok());
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.to_owned();
        self.run(move |me| {
            let name = name.as_os_str();
            let t = Instant::now();
            let res = me.fs.getxattr(ino.0, name, size);
            me.finish(op::GETXATTR, t, res, reply, reply_xattr);
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.run(move |me| {
            let t = Instant::now();
            let res = me.fs.listxattr(ino.0, size);
            me.finish(op::LISTXATTR, t, res, reply, reply_xattr);
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.run(move |me| {
            let name = name.as_os_str();
            let t = Instant::now();
            let res = me.fs.removexattr(ino.0, name);
            me.finish(op::REMOVEXATTR, t, res, reply, |r, ()| r.ok());
        });
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let who = caller(req);
        self.run(move |me| {
            let t = Instant::now();
            let res = me.fs.access(ino.0, mask.bits(), who.uid, who.gid);
            me.finish(op::ACCESS, t, res, reply, |r, ()| r.ok());
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let who = creator(req, umask);
        let name = name.to_owned();
        self.run(move |me| {
            let name = name.as_os_str();
            let t = Instant::now();
            let res = me.fs.create(who, parent.0, name, mode, flags);
            me.finish(op::CREATE, t, res, reply, |r, (e, o)| {
                me.backing.lock().add_cached(o.fh, e.attr.ino);
                r.created(
                    &e.entry_ttl,
                    &file_attr(&e.attr),
                    Generation(e.generation),
                    FileHandle(o.fh),
                    fopen_flags(&o),
                )
            });
        });
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let who = caller(req);
        self.run(move |me| {
            let t = Instant::now();
            let res = me
                .fs
                .with_io(ino.0, fh.0, |h| me.fs.fallocate(h, offset, length, mode));
            me.fs.modified(ino.0);
            if res.is_ok() {
                let _ = me.fs.drop_sgid(ino.0, who);
            }
            me.finish(op::FALLOCATE, t, res, reply, |r, ()| r.ok());
        });
    }

    /// No ioctl is served: answer ENOTTY, as a local filesystem does for
    /// commands it does not know (Python's isatty check on every open, the
    /// terminal ioctls of shells). fuser's default logs a warning per call
    /// at the default level and answers ENOSYS.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        let t = Instant::now();
        reply.error(Errno::from_i32(libc::ENOTTY));
        self.inner.metrics.record(op::IOCTL, t, true);
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.run(move |me| {
            let t = Instant::now();
            let res = me.fs.with_io(ino.0, fh.0, |h| me.fs.lseek(h, offset, whence));
            me.finish(op::LSEEK, t, res, reply, |r, o| r.offset(o));
        });
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.run(move |me| {
            let t = Instant::now();
            let res = me.fs.with_io(ino_in.0, fh_in.0, |a| {
                me.fs.with_io(ino_out.0, fh_out.0, |b| {
                    me.fs.copy_file_range(a, offset_in, b, offset_out, len)
                })
            });
            me.fs.modified(ino_out.0);
            me.finish(op::COPY_FILE_RANGE, t, res, reply, |r, n| {
                r.written(n.min(u32::MAX as u64) as u32)
            });
        });
    }
}

fn reply_xattr(r: ReplyXattr, x: XattrReply) {
    match x {
        XattrReply::Size(n) => r.size(n),
        XattrReply::Data(v) => r.data(&v),
    }
}
