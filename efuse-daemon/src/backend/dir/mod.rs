//! `dir` backend: a directory on this machine (in production, a 3FS FUSE
//! mount or any POSIX tree).
//!
//! The root is a jail. Every inode the kernel may name is held in the node
//! table ([`nodes`]: by file handle, or by an `O_PATH | O_NOFOLLOW`
//! descriptor), and every name is resolved with one `openat` relative to
//! its parent's descriptor: no path string is ever walked, no symlink is
//! ever followed by the daemon, `.`/`..`/`/` in names are refused, and
//! entries on another device (mounts inside the tree) are hidden. Data and
//! attribute calls that need a real descriptor reopen the inode through
//! `/proc/self/fd/N`, which names exactly that inode.
//!
//! Backend inode numbers are the backing `st_ino`.

mod atime;
mod dirents;
pub mod nodes;
pub use atime::Atime;
use atime::atime_view;
mod watch;
mod xattr;

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};

use super::{
    Attr, Backend, BackendError, Caller, DirEntry, Fh, FileKind, Ino, Result, SetAttr, SetTime, StatFs,
    check_name,
};

/// An open directory stream.
struct DirHandle {
    ino: Ino,
    fd: OwnedFd,
}

/// A local directory served as a backend. See the module docs.
pub struct DirBackend {
    root_ino: Ino,
    dev: u64,
    is_root_user: bool,
    /// Open backing files with O_NOATIME (a `noatime` mount).
    noatime: std::sync::atomic::AtomicBool,
    /// Lock order: `nodes` before `files` before `dirs`; no call holds two.
    nodes: nodes::Nodes,
    files: RwLock<HashMap<Fh, Arc<File>>>,
    dirs: RwLock<HashMap<Fh, Arc<Mutex<DirHandle>>>>,
    next_fh: AtomicU64,
    /// Lock order: taken after `nodes` is released, never inside it.
    /// The inotify watcher: read on every lookup (is the parent
    /// watched?), written when a watch is added or removed.
    watcher: RwLock<Option<watch::Watcher>>,
    self_weak: Mutex<Option<std::sync::Weak<DirBackend>>>,
}

fn cstr(name: &OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| BackendError::InvalidName(name.to_owned()))
}

fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number")
}

/// Run `f` with the calling thread's umask set to `umask`. Each thread
/// that creates gets a filesystem context of its own first
/// (unshare(CLONE_FS), once), so the umask is the caller's for this call
/// only; the backing filesystem then applies it as for a local create,
/// which means not at all where the directory has a default ACL.
///
/// `f` gets the bits it must still clear from the mode itself: 0 when the
/// umask is set, the umask when no private context could be had (that
/// loses only the default-ACL exception).
fn with_umask<T>(umask: u32, f: impl FnOnce(u32) -> T) -> T {
    thread_local! {
        static OWN_FS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if umask == 0 {
        return f(0);
    }
    let own = OWN_FS.with(|o| {
        if !o.get() {
            // SAFETY: unshare has no memory arguments.
            o.set(unsafe { libc::unshare(libc::CLONE_FS) } == 0);
        }
        o.get()
    });
    if !own {
        return f(umask);
    }
    // SAFETY: umask has no preconditions; this thread's context is its own.
    unsafe { libc::umask(umask as libc::mode_t) };
    let r = f(0);
    // SAFETY: as above.
    unsafe { libc::umask(0) };
    r
}

/// Flags to reopen a pinned inode with for a caller's open(2).
///
/// The kernel has resolved the path and applied every flag that concerns
/// the name or the checks before OPEN is sent: `O_NOFOLLOW` (a symlink never
/// reaches OPEN; and `/proc/self/fd/N` is itself a symlink, so passing it on
/// fails every open with ELOOP), `O_CREAT`/`O_EXCL`, `O_NOCTTY`, `O_PATH` (no
/// OPEN at all) and `O_TRUNC` (sent as SETATTR after the kernel's own checks,
/// see `fuse::FuseAdapter::init`). `O_APPEND` goes too: the kernel chooses
/// every write's offset (end of file for an append), and a backing descriptor
/// opened with it would move page-cache writebacks to the end. `O_DIRECT`
/// goes: the kernel serves it without the page cache whatever the backing
/// descriptor, whose alignment rules would only add EINVALs. What stays is
/// what changes how the backing file does its I/O: the access mode,
/// `O_SYNC`/`O_DSYNC`, `O_NOATIME`, `O_NONBLOCK`, `O_LARGEFILE`.
pub(crate) fn reopen_flags(flags: i32) -> i32 {
    let keep = libc::O_ACCMODE
        | libc::O_SYNC
        | libc::O_DSYNC
        | libc::O_NOATIME
        | libc::O_NONBLOCK
        | libc::O_LARGEFILE;
    (flags & keep) | libc::O_CLOEXEC
}

fn check(op: &'static str, rc: libc::c_int) -> Result<libc::c_int> {
    if rc < 0 {
        Err(BackendError::last_os(op))
    } else {
        Ok(rc)
    }
}

fn ts(sec: i64, nsec: i64) -> SystemTime {
    crate::unixtime::from_unix(sec, nsec)
}

/// Convert a `struct stat` to [`Attr`].
pub(crate) fn attr_from_stat(st: &libc::stat) -> Attr {
    Attr {
        ino: st.st_ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: ts(st.st_atime, st.st_atime_nsec),
        mtime: ts(st.st_mtime, st.st_mtime_nsec),
        ctime: ts(st.st_ctime, st.st_ctime_nsec),
        kind: FileKind::from_mode(st.st_mode).unwrap_or(FileKind::File),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
    }
}

fn fstat_fd(fd: RawFd) -> Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid fd, empty C string, `st` is a valid out pointer.
    let rc = unsafe {
        libc::fstatat(
            fd,
            c"".as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check("fstatat", rc)?;
    // SAFETY: fstatat succeeded and filled `st`.
    Ok(unsafe { st.assume_init() })
}

fn timespec(t: Option<SetTime>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(SetTime::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(SetTime::At(t)) => {
            let (sec, nsec) = crate::unixtime::to_unix(t);
            libc::timespec {
                tv_sec: sec,
                tv_nsec: i64::from(nsec),
            }
        }
    }
}

/// How a [`DirBackend`] is opened.
#[derive(Clone, Copy, Debug, Default)]
pub struct DirOptions {
    /// Serve the tree through a view with this atime mode.
    pub atime: Option<Atime>,
    /// How inodes are held (see [`nodes`]).
    pub inodes: nodes::InodeMode,
    /// Descriptors cached in handle mode [default: from the descriptor limit].
    pub fd_cache: Option<usize>,
}

/// Descriptors cached in handle mode by default: a quarter of the
/// descriptor limit, at most 16,384 (enough for the hot directories and
/// files of a busy tree; the kernel's own caches hold the rest).
fn default_fd_cache() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer.
    let cur = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur as usize
    } else {
        1024
    };
    (cur / 4).clamp(16, 16_384)
}

fn open_root(root: &Path) -> anyhow::Result<OwnedFd> {
    use anyhow::Context;
    let c = CString::new(root.as_os_str().as_bytes()).context("backend path contains NUL")?;
    // SAFETY: valid C string; the returned fd is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot open backend directory {}", root.display()));
    }
    // SAFETY: `fd` was just returned by open and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl DirBackend {
    /// Open `root` as a jailed backend.
    ///
    /// With `opts.atime`, the tree is served through a private, detached
    /// copy of its mount with that atime mode (`noatime`, `relatime`,
    /// `strictatime`), so that reads through efuse update backing atimes as
    /// a local filesystem mounted that way would, whatever the backing
    /// tree's own mount says (passthrough reads and executed files
    /// included: the kernel reads those through the backing file's own
    /// mount). Without open_tree/mount_setattr (Linux 5.12+) the plain tree
    /// is served, with a warning (and O_NOATIME opens for noatime).
    ///
    /// The backend keeps a weak reference to itself so its watcher thread
    /// can reach it without keeping it alive.
    pub fn open(root: &Path, opts: &DirOptions) -> anyhow::Result<Arc<Self>> {
        let view = match opts.atime {
            Some(mode) => {
                let v = atime_view(root, mode)?;
                if v.is_none() {
                    tracing::warn!(
                        "{}: cannot make a {} view of {} ({}; needs open_tree and mount_setattr, Linux \
                         5.12+): serving the tree as it is mounted, so backing atimes follow its own mount",
                        mode.name(),
                        mode.name(),
                        root.display(),
                        std::io::Error::last_os_error()
                    );
                }
                v
            }
            None => None,
        };
        let fd = match view {
            Some(fd) => fd,
            None => open_root(root)?,
        };
        let b = Arc::new(Self::from_root_fd(root, fd, opts)?);
        if opts.atime == Some(Atime::No) {
            b.noatime.store(true, Ordering::Relaxed);
        }
        *b.self_weak.lock() = Some(Arc::downgrade(&b));
        Ok(b)
    }

    /// Open `root` with the defaults (handles where possible).
    pub fn new_shared(root: &Path) -> anyhow::Result<Arc<Self>> {
        Self::open(root, &DirOptions::default())
    }

    fn from_root_fd(root: &Path, fd: OwnedFd, opts: &DirOptions) -> anyhow::Result<Self> {
        use anyhow::Context;
        let st = fstat_fd(fd.as_raw_fd())
            .with_context(|| format!("cannot stat backend directory {}", root.display()))?;
        let cap = opts.fd_cache.unwrap_or_else(default_fd_cache);
        let nodes = nodes::Nodes::new(st.st_ino, fd, opts.inodes, cap)
            .with_context(|| format!("backend directory {}", root.display()))?;
        tracing::debug!(mode = %nodes.mode(), "dir backend holds inodes by {}", nodes.mode());
        Ok(Self {
            root_ino: st.st_ino,
            dev: st.st_dev,
            is_root_user: nix::unistd::geteuid().is_root(),
            noatime: std::sync::atomic::AtomicBool::new(false),
            nodes,
            files: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            watcher: RwLock::new(None),
            self_weak: Mutex::new(None),
        })
    }

    /// How inodes are held: `handles` or `descriptors`.
    pub fn inode_mode(&self) -> nodes::InodeMode {
        self.nodes.mode()
    }

    fn fd(&self, ino: Ino) -> Result<Arc<OwnedFd>> {
        self.nodes.fd(ino)
    }

    fn file(&self, fh: Fh) -> Result<Arc<File>> {
        self.files.read().get(&fh).cloned().ok_or(BackendError::Stale(fh))
    }

    fn new_fh(&self) -> Fh {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Pin the object `fd` names (an `O_PATH` descriptor just opened); the
    /// root is pinned for the life of the backend already.
    fn pin_fd(&self, fd: OwnedFd) -> Result<Attr> {
        let st = fstat_fd(fd.as_raw_fd())?;
        if st.st_dev != self.dev {
            return Err(BackendError::CrossDevice);
        }
        let (fd, new) = self.nodes.pin(st.st_ino, fd)?;
        let attr = attr_from_stat(&st);
        if new && attr.kind == FileKind::Dir {
            self.add_watch(attr.ino, &fd);
        }
        Ok(attr)
    }

    /// Open `name` under `parent_fd` as an `O_PATH` node, stat it and pin it.
    fn pin_child(&self, parent_fd: RawFd, name: &OsStr) -> Result<Attr> {
        let c = cstr(name)?;
        // SAFETY: valid dirfd and C string; the fd is owned below.
        let fd = unsafe {
            libc::openat(
                parent_fd,
                c.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENOENT) => BackendError::NotFound,
                _ => BackendError::io("openat", e),
            });
        }
        // SAFETY: freshly opened, not owned elsewhere.
        self.pin_fd(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Handle mode: `name` in `dir_fd` is about to lose a name; if the
    /// kernel knows it, keep it open until the kernel forgets it (see
    /// [`nodes`]).
    fn keep_victim(&self, dir_fd: RawFd, name: &CString) {
        if !self.nodes.by_handle() {
            return;
        }
        let mut st = MaybeUninit::<libc::stat>::uninit();
        // SAFETY: valid dirfd, C string and out pointer.
        let rc = unsafe { libc::fstatat(dir_fd, name.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
        if rc == 0 {
            // SAFETY: fstatat succeeded.
            let ino = unsafe { st.assume_init() }.st_ino;
            if self.nodes.contains(ino) {
                self.nodes.keep(ino);
            }
        }
    }

    /// Give newly created `name` under `parent_fd` to the caller.
    /// Give a new object its creator as owner, as the kernel's
    /// inode_init_owner() would have: the caller's uid, and the caller's gid
    /// unless the directory is set-group-ID, where the backing filesystem
    /// (creating as root) has already given it the directory's group (and a
    /// directory the set-group-ID bit). `mode` is the mode a non-directory
    /// was created with: a chown clears S_ISUID/S_ISGID of a non-directory,
    /// which is right for chown(2) but not for a create, so they are put back.
    fn chown_new(&self, who: Caller, parent_fd: RawFd, name: &CString, mode: Option<u32>) -> Result<()> {
        if !self.is_root_user {
            return Ok(());
        }
        let inherit = fstat_fd(parent_fd)?.st_mode & libc::S_ISGID != 0;
        let gid = if inherit { u32::MAX } else { who.gid };
        if who.uid == 0 && (inherit || who.gid == 0) {
            return Ok(());
        }
        // SAFETY: valid dirfd and C string.
        let rc = unsafe { libc::fchownat(parent_fd, name.as_ptr(), who.uid, gid, libc::AT_SYMLINK_NOFOLLOW) };
        check("fchownat", rc)?;
        if let Some(m) = mode
            && m & (libc::S_ISUID | libc::S_ISGID) != 0
        {
            // SAFETY: valid dirfd and C string; the name is no symlink.
            check("fchmodat", unsafe {
                libc::fchmodat(parent_fd, name.as_ptr(), m & 0o7777, 0)
            })?;
        }
        Ok(())
    }
}

impl Backend for DirBackend {
    fn inode_mode(&self) -> Option<nodes::InodeMode> {
        Some(self.nodes.mode())
    }

    fn watched(&self, dir: Ino) -> bool {
        self.watching(dir)
    }

    fn node_stats(&self) -> Option<super::NodeStats> {
        let (nodes, descriptors, opened_by_handle) = self.nodes.counts();
        Some(super::NodeStats {
            mode: self.nodes.mode().to_string(),
            nodes,
            descriptors,
            opened_by_handle,
        })
    }

    fn kind(&self) -> String {
        "dir".into()
    }

    fn root(&self) -> Ino {
        self.root_ino
    }

    fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr> {
        check_name(name)?;
        let pfd = self.fd(parent)?;
        self.pin_child(pfd.as_raw_fd(), name)
    }

    fn forget(&self, ino: Ino, n: u64) {
        if self.nodes.unpin(ino, n) {
            self.remove_watch(ino);
        }
    }

    fn pin(&self, ino: Ino) -> Result<()> {
        self.nodes.pin_again(ino)
    }

    fn getattr(&self, ino: Ino) -> Result<Attr> {
        let fd = self.fd(ino)?;
        Ok(attr_from_stat(&fstat_fd(fd.as_raw_fd())?))
    }

    fn setattr(&self, ino: Ino, fh: Option<Fh>, set: &SetAttr) -> Result<Attr> {
        let fd = self.fd(ino)?;
        let path = proc_path(fd.as_raw_fd());
        if let Some(mode) = set.mode {
            // SAFETY: valid C string.
            check("chmod", unsafe { libc::chmod(path.as_ptr(), mode & 0o7777) })?;
        }
        if set.uid.is_some() || set.gid.is_some() {
            let uid = set.uid.unwrap_or(u32::MAX);
            let gid = set.gid.unwrap_or(u32::MAX);
            // SAFETY: valid fd and empty C string.
            let rc = unsafe {
                libc::fchownat(
                    fd.as_raw_fd(),
                    c"".as_ptr(),
                    uid,
                    gid,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            check("fchownat", rc)?;
        }
        if let Some(size) = set.size {
            let open = fh.and_then(|fh| self.file(fh).ok());
            match open {
                Some(f) => f.set_len(size).map_err(|e| BackendError::io("ftruncate", e))?,
                None => {
                    // SAFETY: valid C string.
                    check("truncate", unsafe {
                        libc::truncate(path.as_ptr(), size as libc::off_t)
                    })?;
                }
            }
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let times = [timespec(set.atime), timespec(set.mtime)];
            // SAFETY: valid C string and a 2-element timespec array.
            let rc = unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) };
            check("utimensat", rc)?;
        }
        self.getattr(ino)
    }

    fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let fd = self.fd(ino)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: valid fd, empty C string, buffer of the given length.
        let n = unsafe { libc::readlinkat(fd.as_raw_fd(), c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(BackendError::last_os("readlinkat"));
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    fn mknod(&self, who: Caller, parent: Ino, name: &OsStr, mode: u32, rdev: u32) -> Result<Attr> {
        check_name(name)?;
        let pfd = self.fd(parent)?;
        let c = cstr(name)?;
        // SAFETY: valid dirfd and C string.
        let rc = with_umask(who.umask, |m| unsafe {
            libc::mknodat(pfd.as_raw_fd(), c.as_ptr(), mode & !m, rdev as libc::dev_t)
        });
        check("mknodat", rc)?;
        self.chown_new(who, pfd.as_raw_fd(), &c, Some(mode & !who.umask))?;
        self.pin_child(pfd.as_raw_fd(), name)
    }

    fn mkdir(&self, who: Caller, parent: Ino, name: &OsStr, mode: u32) -> Result<Attr> {
        check_name(name)?;
        let pfd = self.fd(parent)?;
        let c = cstr(name)?;
        let rc = with_umask(who.umask, |m| {
            // SAFETY: valid dirfd and C string.
            unsafe { libc::mkdirat(pfd.as_raw_fd(), c.as_ptr(), mode & !m) }
        });
        check("mkdirat", rc)?;
        self.chown_new(who, pfd.as_raw_fd(), &c, None)?;
        self.pin_child(pfd.as_raw_fd(), name)
    }

    fn symlink(&self, who: Caller, parent: Ino, name: &OsStr, target: &OsStr) -> Result<Attr> {
        check_name(name)?;
        let pfd = self.fd(parent)?;
        let c = cstr(name)?;
        let t = cstr(target)?;
        // SAFETY: valid dirfd and C strings.
        check("symlinkat", unsafe {
            libc::symlinkat(t.as_ptr(), pfd.as_raw_fd(), c.as_ptr())
        })?;
        self.chown_new(who, pfd.as_raw_fd(), &c, None)?;
        self.pin_child(pfd.as_raw_fd(), name)
    }

    fn link(&self, ino: Ino, newparent: Ino, newname: &OsStr) -> Result<Attr> {
        check_name(newname)?;
        let fd = self.fd(ino)?;
        let pfd = self.fd(newparent)?;
        let c = cstr(newname)?;
        let src = proc_path(fd.as_raw_fd());
        // SAFETY: valid C strings and dirfd; AT_SYMLINK_FOLLOW resolves the
        // magic link to exactly the inode `fd` holds.
        let rc = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                src.as_ptr(),
                pfd.as_raw_fd(),
                c.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        check("linkat", rc)?;
        self.pin_child(pfd.as_raw_fd(), newname)
    }

    fn unlink(&self, parent: Ino, name: &OsStr) -> Result<()> {
        check_name(name)?;
        let pfd = self.fd(parent)?;
        let c = cstr(name)?;
        self.keep_victim(pfd.as_raw_fd(), &c);
        // SAFETY: valid dirfd and C string.
        check("unlinkat", unsafe {
            libc::unlinkat(pfd.as_raw_fd(), c.as_ptr(), 0)
        })?;
        Ok(())
    }

    fn rmdir(&self, parent: Ino, name: &OsStr) -> Result<()> {
        check_name(name)?;
        let pfd = self.fd(parent)?;
        let c = cstr(name)?;
        self.keep_victim(pfd.as_raw_fd(), &c);
        // SAFETY: valid dirfd and C string.
        check("rmdir", unsafe {
            libc::unlinkat(pfd.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR)
        })?;
        Ok(())
    }

    fn rename(&self, parent: Ino, name: &OsStr, newparent: Ino, newname: &OsStr, flags: u32) -> Result<()> {
        check_name(name)?;
        check_name(newname)?;
        let pfd = self.fd(parent)?;
        let npfd = self.fd(newparent)?;
        let a = cstr(name)?;
        let b = cstr(newname)?;
        if flags & (libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) == 0 {
            self.keep_victim(npfd.as_raw_fd(), &b);
        }
        // SAFETY: valid dirfds and C strings.
        let rc = unsafe { libc::renameat2(pfd.as_raw_fd(), a.as_ptr(), npfd.as_raw_fd(), b.as_ptr(), flags) };
        check("renameat2", rc)?;
        Ok(())
    }

    fn open(&self, ino: Ino, flags: i32) -> Result<Fh> {
        let fd = self.fd(ino)?;
        let path = proc_path(fd.as_raw_fd());
        let asked = flags;
        let mut flags = reopen_flags(flags);
        if self.noatime.load(Ordering::Relaxed) {
            flags |= libc::O_NOATIME;
        }
        // SAFETY: valid C string; the fd is owned below.
        let mut f = unsafe { libc::open(path.as_ptr(), flags) };
        if f < 0
            && asked & libc::O_APPEND != 0
            && asked & libc::O_ACCMODE != libc::O_RDONLY
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
        {
            // An append-only file (chattr +a) opens for writing only with
            // O_APPEND; its writes then go to the end, which is where the
            // kernel puts an appending write anyway.
            // SAFETY: as above.
            f = unsafe { libc::open(path.as_ptr(), flags | libc::O_APPEND) };
        }
        if f < 0
            && flags & libc::O_NOATIME != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
        {
            // The kernel already checked the caller may ask for O_NOATIME;
            // a daemon that is not root may not, for others' files.
            // SAFETY: as above.
            f = unsafe { libc::open(path.as_ptr(), flags & !libc::O_NOATIME) };
        }
        let f = check("open", f)?;
        // SAFETY: freshly opened, not owned elsewhere.
        let file = Arc::new(unsafe { File::from_raw_fd(f) });
        let fh = self.new_fh();
        self.files.write().insert(fh, file);
        Ok(fh)
    }

    fn tmpfile(&self, who: Caller, parent: Ino, mode: u32, flags: i32) -> Result<(Attr, Fh)> {
        let pfd = self.fd(parent)?;
        // As create: the access mode and I/O flags; O_EXCL stays (it makes
        // the file unlinkable, as the caller asked).
        let flags = (flags & (libc::O_ACCMODE | libc::O_EXCL | libc::O_SYNC | libc::O_DSYNC))
            | libc::O_TMPFILE
            | libc::O_CLOEXEC;
        // SAFETY: valid dirfd and C string; the fd is owned below.
        let f = with_umask(who.umask, |m| unsafe {
            libc::openat(pfd.as_raw_fd(), c".".as_ptr(), flags, (mode & 0o7777) & !m)
        });
        let f = check("openat(O_TMPFILE)", f)?;
        // SAFETY: freshly opened, not owned elsewhere.
        let file = Arc::new(unsafe { File::from_raw_fd(f) });
        if self.is_root_user {
            let inherit = fstat_fd(pfd.as_raw_fd())?.st_mode & libc::S_ISGID != 0;
            if !(who.uid == 0 && (inherit || who.gid == 0)) {
                let gid = if inherit { u32::MAX } else { who.gid };
                // SAFETY: a descriptor we own.
                check("fchown", unsafe { libc::fchown(file.as_raw_fd(), who.uid, gid) })?;
                if mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
                    // SAFETY: as above.
                    check("fchmod", unsafe {
                        libc::fchmod(file.as_raw_fd(), (mode & !who.umask) & 0o7777)
                    })?;
                }
            }
        }
        // The node: an O_PATH descriptor of the same inode.
        let path = proc_path(file.as_raw_fd());
        // SAFETY: valid C string; the fd is owned below.
        let o = check("open(O_PATH)", unsafe {
            libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC)
        })?;
        // SAFETY: freshly opened, not owned elsewhere.
        let attr = self.pin_fd(unsafe { OwnedFd::from_raw_fd(o) })?;
        let fh = self.new_fh();
        self.files.write().insert(fh, file);
        Ok((attr, fh))
    }

    fn fileattr(&self, ino: Ino, cmd: u32, arg: &mut [u8]) -> Result<()> {
        let fd = self.fd(ino)?;
        let st = fstat_fd(fd.as_raw_fd())?;
        let kind = st.st_mode & libc::S_IFMT;
        if kind != libc::S_IFREG && kind != libc::S_IFDIR {
            return Err(BackendError::errno("ioctl", libc::ENOTTY));
        }
        // The ioctl needs an open file, not the O_PATH descriptor; the
        // backing filesystem applies (and enforces) the flags.
        let path = proc_path(fd.as_raw_fd());
        // SAFETY: valid C string; the fd is owned below.
        let f = check("open", unsafe {
            libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC)
        })?;
        // SAFETY: freshly opened, not owned elsewhere.
        let f = unsafe { OwnedFd::from_raw_fd(f) };
        // SAFETY: `arg` is as large as `cmd`'s argument (checked by the
        // caller through fileattr::arg_len) and outlives the call.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), cmd as libc::c_ulong, arg.as_mut_ptr()) };
        check("ioctl", rc).map(drop)
    }

    fn create(&self, who: Caller, parent: Ino, name: &OsStr, mode: u32, flags: i32) -> Result<(Attr, Fh)> {
        check_name(name)?;
        let pfd = self.fd(parent)?;
        let c = cstr(name)?;
        // O_TRUNC stays: the kernel sends CREATE only for a name it found
        // absent, and should another process create it first, O_CREAT|O_TRUNC
        // empties it as on a local filesystem. O_APPEND goes: see reopen_flags.
        let flags = (flags & !(libc::O_NOCTTY | libc::O_DIRECT | libc::O_APPEND))
            | libc::O_CREAT
            | libc::O_NOFOLLOW
            | libc::O_CLOEXEC;
        // SAFETY: valid dirfd and C string; the fd is owned below.
        let f = with_umask(who.umask, |m| unsafe {
            libc::openat(pfd.as_raw_fd(), c.as_ptr(), flags, mode & !m)
        });
        let f = check("openat(O_CREAT)", f)?;
        // SAFETY: freshly opened, not owned elsewhere.
        let file = Arc::new(unsafe { File::from_raw_fd(f) });
        self.chown_new(who, pfd.as_raw_fd(), &c, Some(mode & !who.umask))?;
        let attr = self.pin_child(pfd.as_raw_fd(), name)?;
        let fh = self.new_fh();
        self.files.write().insert(fh, file);
        Ok((attr, fh))
    }

    fn read(&self, fh: Fh, offset: u64, size: u32) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; size as usize];
        let n = self.read_into(fh, offset, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    fn read_into(&self, fh: Fh, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let f = self.file(fh)?;
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BackendError::io("pread", e)),
            }
        }
        Ok(done)
    }

    fn write(&self, fh: Fh, offset: u64, data: &[u8]) -> Result<u32> {
        let f = self.file(fh)?;
        f.write_all_at(data, offset)
            .map_err(|e| BackendError::io("pwrite", e))?;
        Ok(data.len() as u32)
    }

    fn flush(&self, fh: Fh) -> Result<()> {
        let f = self.file(fh)?;
        // close(dup(fd)): a network filesystem below (3FS, NFS) commits on
        // close, so every close(2) through the mount reaches it.
        // SAFETY: valid fd.
        let d = check("dup", unsafe { libc::dup(f.as_raw_fd()) })?;
        // SAFETY: `d` is ours to close.
        check("close", unsafe { libc::close(d) })?;
        Ok(())
    }

    fn fsync(&self, fh: Fh, datasync: bool) -> Result<()> {
        let f = self.file(fh)?;
        if datasync { f.sync_data() } else { f.sync_all() }.map_err(|e| BackendError::io("fsync", e))
    }

    fn release(&self, fh: Fh) {
        self.files.write().remove(&fh);
    }

    fn opendir(&self, ino: Ino) -> Result<Fh> {
        let fd = self.fd(ino)?;
        // SAFETY: valid dirfd and C string; the fd is owned below.
        let d = unsafe {
            libc::openat(
                fd.as_raw_fd(),
                c".".as_ptr(),
                libc::O_RDONLY
                    | libc::O_DIRECTORY
                    | libc::O_CLOEXEC
                    | if self.noatime.load(Ordering::Relaxed) {
                        libc::O_NOATIME
                    } else {
                        0
                    },
            )
        };
        let d = check("opendir", d)?;
        // SAFETY: freshly opened, not owned elsewhere.
        let d = unsafe { OwnedFd::from_raw_fd(d) };
        let fh = self.new_fh();
        self.dirs
            .write()
            .insert(fh, Arc::new(Mutex::new(DirHandle { ino, fd: d })));
        Ok(fh)
    }

    fn readdir(&self, dh: Fh, offset: u64, max: usize) -> Result<Vec<DirEntry>> {
        self.dir_read(dh, offset, max)
    }

    fn readdir_plus(&self, dh: Fh, offset: u64, max: usize) -> Result<Vec<(DirEntry, Attr)>> {
        self.dir_read_plus(dh, offset, max)
    }

    fn releasedir(&self, dh: Fh) {
        self.dirs.write().remove(&dh);
    }

    fn statfs(&self) -> Result<StatFs> {
        let fd = self.fd(self.root_ino)?;
        let mut st = MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: valid fd and out pointer.
        check("fstatvfs", unsafe {
            libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr())
        })?;
        // SAFETY: fstatvfs succeeded.
        let st = unsafe { st.assume_init() };
        Ok(StatFs {
            blocks: st.f_blocks,
            bfree: st.f_bfree,
            bavail: st.f_bavail,
            files: st.f_files,
            ffree: st.f_ffree,
            bsize: st.f_bsize as u32,
            namelen: st.f_namemax as u32,
            frsize: st.f_frsize as u32,
        })
    }

    fn getxattr(&self, ino: Ino, name: &OsStr) -> Result<Vec<u8>> {
        self.xattr_get(ino, name)
    }

    fn setxattr(&self, ino: Ino, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        self.xattr_set(ino, name, value, flags)
    }

    fn listxattr(&self, ino: Ino) -> Result<Vec<u8>> {
        self.xattr_list(ino)
    }

    fn removexattr(&self, ino: Ino, name: &OsStr) -> Result<()> {
        self.xattr_remove(ino, name)
    }

    fn fallocate(&self, fh: Fh, offset: u64, len: u64, mode: i32) -> Result<()> {
        let f = self.file(fh)?;
        // SAFETY: valid fd.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
        check("fallocate", rc)?;
        Ok(())
    }

    fn lseek(&self, fh: Fh, offset: i64, whence: i32) -> Result<i64> {
        let f = self.file(fh)?;
        // SAFETY: valid fd.
        let rc = unsafe { libc::lseek(f.as_raw_fd(), offset, whence) };
        if rc < 0 {
            return Err(BackendError::last_os("lseek"));
        }
        Ok(rc)
    }

    fn copy_file_range(&self, fh_in: Fh, off_in: u64, fh_out: Fh, off_out: u64, len: u64) -> Result<u64> {
        let a = self.file(fh_in)?;
        let b = self.file(fh_out)?;
        let mut oi = off_in as libc::loff_t;
        let mut oo = off_out as libc::loff_t;
        // SAFETY: valid fds and offset pointers.
        let n =
            unsafe { libc::copy_file_range(a.as_raw_fd(), &mut oi, b.as_raw_fd(), &mut oo, len as usize, 0) };
        if n < 0 {
            return Err(BackendError::last_os("copy_file_range"));
        }
        Ok(n as u64)
    }

    fn backing_file(&self, fh: Fh) -> Option<Arc<File>> {
        self.file(fh).ok()
    }

    fn identity(&self, ino: Ino) -> Option<Vec<u8>> {
        if let Some(h) = self.nodes.handle(ino) {
            return Some(h);
        }
        let fd = self.fd(ino).ok()?;
        nodes::Handle::of_fd(fd.as_raw_fd())
            .ok()
            .map(|h| h.bytes().to_vec())
    }

    fn reopen(&self, ino: Ino, identity: Option<&[u8]>) -> Result<Attr> {
        if self.nodes.contains(ino)
            && let Ok(a) = self
                .fd(ino)
                .and_then(|_| self.pin(ino))
                .and_then(|()| self.getattr(ino))
        {
            return Ok(a);
        }
        // Only a handle this backend made (the inode table kept it when the
        // kernel forgot the inode) is ever opened.
        let Some(handle) = identity else {
            return Err(BackendError::Stale(ino));
        };
        let fd = if self.nodes.by_handle() {
            self.nodes.open_handle(handle)
        } else {
            self.nodes
                .open_handle_once(self.fd(self.root_ino)?.as_raw_fd(), handle)
        }
        .map_err(|_| BackendError::Stale(ino))?;
        let st = fstat_fd(fd.as_raw_fd())?;
        // The same object, still linked somewhere (an unlinked file is gone
        // for handles too, as NFS sees it).
        if st.st_ino != ino || st.st_dev != self.dev || st.st_nlink == 0 {
            return Err(BackendError::Stale(ino));
        }
        self.pin_fd(fd)
    }

    fn parent(&self, dir: Ino) -> Result<Attr> {
        if dir == self.root_ino {
            // The jail: the root's parent is the root.
            return self.getattr(dir);
        }
        let fd = self.fd(dir)?;
        // SAFETY: valid dirfd and C string; the fd is owned below.
        let p = unsafe {
            libc::openat(
                fd.as_raw_fd(),
                c"..".as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if p < 0 {
            return Err(BackendError::last_os("openat(..)"));
        }
        // SAFETY: freshly opened, owned from here.
        self.pin_fd(unsafe { OwnedFd::from_raw_fd(p) })
    }

    fn xattrs(&self) -> bool {
        // A filesystem without extended attributes answers EOPNOTSUPP.
        !matches!(
            self.listxattr(self.root_ino),
            Err(e) if e.to_errno() == libc::EOPNOTSUPP
        )
    }

    fn posix_acl(&self) -> bool {
        // A filesystem without ACLs answers EOPNOTSUPP for the name.
        let Ok(fd) = self.fd(self.root_ino) else {
            return false;
        };
        let path = proc_path(fd.as_raw_fd());
        // SAFETY: valid C strings; a size query (null buffer, 0).
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                c"system.posix_acl_access".as_ptr(),
                std::ptr::null_mut(),
                0,
            )
        };
        n >= 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::ENODATA)
    }

    fn changes_pending(&self) -> bool {
        self.watch_pending()
    }

    fn watch(&self, sink: super::ChangeSink) -> anyhow::Result<bool> {
        self.watch_start(sink)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> (tempfile::TempDir, Arc<DirBackend>) {
        let t = tempfile::tempdir().unwrap();
        let b = DirBackend::new_shared(t.path()).unwrap();
        (t, b)
    }

    #[test]
    fn lookup_pins_and_forget_unpins() {
        let (t, b) = backend();
        std::fs::write(t.path().join("f"), b"x").unwrap();
        let a = b.lookup(b.root(), OsStr::new("f")).unwrap();
        b.lookup(b.root(), OsStr::new("f")).unwrap();
        assert_eq!(b.nodes.pins(a.ino), 2);
        b.forget(a.ino, 1);
        assert!(b.getattr(a.ino).is_ok());
        b.forget(a.ino, 1);
        assert!(matches!(b.getattr(a.ino), Err(BackendError::Stale(_))));
        // The root is never dropped.
        b.forget(b.root(), 100);
        assert!(b.getattr(b.root()).is_ok());
    }

    #[test]
    fn jail_refuses_dot_dot_and_slashes() {
        let (_t, b) = backend();
        for bad in ["..", ".", "a/b", "/etc"] {
            let e = b.lookup(b.root(), OsStr::new(bad)).unwrap_err();
            assert_eq!(e.to_errno(), libc::EINVAL, "{bad}");
        }
        let long = "x".repeat(256);
        assert_eq!(
            b.lookup(b.root(), OsStr::new(&long)).unwrap_err().to_errno(),
            libc::ENAMETOOLONG
        );
    }

    #[test]
    fn symlink_is_never_followed_by_the_daemon() {
        let (t, b) = backend();
        std::os::unix::fs::symlink("/etc", t.path().join("evil")).unwrap();
        let a = b.lookup(b.root(), OsStr::new("evil")).unwrap();
        assert_eq!(a.kind, FileKind::Symlink);
        // Resolving a name under the symlink must not reach /etc/passwd.
        let e = b.lookup(a.ino, OsStr::new("passwd")).unwrap_err();
        assert_eq!(e.to_errno(), libc::ENOTDIR);
        assert_eq!(b.readlink(a.ino).unwrap(), b"/etc");
        // Opening the symlink inode for data is refused too.
        assert!(b.opendir(a.ino).is_err());
    }

    #[test]
    fn readdir_resumes_from_cookies() {
        let (t, b) = backend();
        for i in 0..100 {
            std::fs::write(t.path().join(format!("f{i}")), b"").unwrap();
        }
        let dh = b.opendir(b.root()).unwrap();
        let mut names = Vec::new();
        let mut off = 0;
        loop {
            let chunk = b.readdir(dh, off, 7).unwrap();
            if chunk.is_empty() {
                break;
            }
            off = chunk.last().unwrap().next;
            names.extend(chunk.into_iter().map(|e| e.name));
        }
        b.releasedir(dh);
        assert_eq!(names.len(), 102);
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 102);
    }

    #[test]
    fn create_write_read_roundtrip() {
        let (t, b) = backend();
        let (attr, fh) = b
            .create(
                Caller::default(),
                b.root(),
                OsStr::new("new"),
                0o100644,
                libc::O_RDWR,
            )
            .unwrap();
        assert_eq!(attr.kind, FileKind::File);
        assert_eq!(b.write(fh, 3, b"abc").unwrap(), 3);
        assert_eq!(b.read(fh, 0, 100).unwrap(), b"\0\0\0abc");
        b.release(fh);
        assert_eq!(std::fs::read(t.path().join("new")).unwrap(), b"\0\0\0abc");
    }
}
