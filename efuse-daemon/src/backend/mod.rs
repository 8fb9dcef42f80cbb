//! The storage behind a mount.
//!
//! [`Backend`] is shaped for a remote metadata/data service such as 3FS:
//! objects are named by a backend inode number ([`Ino`]), metadata comes in
//! single and batched calls, directories are listed with attributes in one
//! round trip, data moves in chunks through open handles ([`Fh`]).
//!
//! Pinning: every call that hands out an inode to the filesystem layer
//! (`lookup`, `create`, `mkdir`, `mknod`, `symlink`, `link`, and each entry of
//! `readdir_plus`) takes one reference on it; [`Backend::forget`] drops `n` of
//! them. The filesystem layer forwards the kernel's lookup counts one to one,
//! so a backend may keep per-inode state (the `dir` backend keeps an
//! `O_PATH` fd) exactly as long as the kernel can name the inode.
//!
//! Implementations: [`dir::DirBackend`] (a local directory, jailed),
//! [`mem::MemBackend`] (in memory) and [`sim::SimBackend`] (wraps another
//! backend with 3FS-like latency and fault injection).

pub mod dir;
pub mod mem;
pub mod sim;

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::sync::Arc;
use std::time::SystemTime;

/// Backend inode number. Stable while the backend object exists.
pub type Ino = u64;
/// Backend open-file or open-directory handle. Never reused within a mount.
pub type Fh = u64;

/// Longest name a backend accepts, in bytes (Linux `NAME_MAX`).
pub const NAME_MAX: usize = 255;

/// Kind of a filesystem object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
    /// Character device.
    CharDev,
    /// Block device.
    BlockDev,
}

impl FileKind {
    /// Kind from the `S_IFMT` bits of a mode.
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Self::File,
            libc::S_IFDIR => Self::Dir,
            libc::S_IFLNK => Self::Symlink,
            libc::S_IFIFO => Self::Fifo,
            libc::S_IFSOCK => Self::Socket,
            libc::S_IFCHR => Self::CharDev,
            libc::S_IFBLK => Self::BlockDev,
            _ => return None,
        })
    }

    /// `S_IFMT` bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            Self::File => libc::S_IFREG,
            Self::Dir => libc::S_IFDIR,
            Self::Symlink => libc::S_IFLNK,
            Self::Fifo => libc::S_IFIFO,
            Self::Socket => libc::S_IFSOCK,
            Self::CharDev => libc::S_IFCHR,
            Self::BlockDev => libc::S_IFBLK,
        }
    }
}

/// Attributes of an object, as `stat(2)` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Backend inode number.
    pub ino: Ino,
    /// Size in bytes.
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    /// Last access.
    pub atime: SystemTime,
    /// Last modification.
    pub mtime: SystemTime,
    /// Last status change.
    pub ctime: SystemTime,
    /// Kind.
    pub kind: FileKind,
    /// Permission bits (`mode & 0o7777`).
    pub perm: u16,
    /// Hard links.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number of a device node.
    pub rdev: u32,
    /// Preferred I/O size.
    pub blksize: u32,
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Name (bytes, not necessarily UTF-8).
    pub name: OsString,
    /// Backend inode number.
    pub ino: Ino,
    /// Kind.
    pub kind: FileKind,
    /// Cookie to pass as `offset` to continue after this entry.
    pub next: u64,
}

/// A time to set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    /// The current time.
    Now,
    /// This time.
    At(SystemTime),
}

/// Changes requested by `setattr`; `None` fields are left alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (truncate/extend).
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<SetTime>,
    /// New modification time.
    pub mtime: Option<SetTime>,
}

/// Who asks: owner of newly created objects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Process id.
    pub pid: u32,
    /// The caller's umask, for creates (0 where the kernel already applied
    /// it; applying it again changes nothing).
    pub umask: u32,
}

/// The inode-flag ioctls (`linux/fs.h`) and the size of their argument.
pub mod fileattr {
    /// `FS_IOC_GETFLAGS` (`_IOR('f', 1, long)`; the argument is an int).
    pub const GETFLAGS: u32 = 0x8008_6601;
    /// `FS_IOC_SETFLAGS`.
    pub const SETFLAGS: u32 = 0x4008_6602;
    /// `FS_IOC_FSGETXATTR` (`_IOR('X', 31, struct fsxattr)`).
    pub const FSGETXATTR: u32 = 0x801c_581f;
    /// `FS_IOC_FSSETXATTR`.
    pub const FSSETXATTR: u32 = 0x401c_5820;

    /// The argument size of `cmd` if it is one of them.
    pub fn arg_len(cmd: u32) -> Option<usize> {
        match cmd {
            GETFLAGS | SETFLAGS => Some(4),
            FSGETXATTR | FSSETXATTR => Some(28),
            _ => None,
        }
    }

    /// Does `cmd` write the flags?
    pub fn sets(cmd: u32) -> bool {
        matches!(cmd, SETFLAGS | FSSETXATTR)
    }
}

/// Filesystem statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatFs {
    /// Total blocks.
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Blocks available to unprivileged users.
    pub bavail: u64,
    /// Total inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Block size.
    pub bsize: u32,
    /// Longest name.
    pub namelen: u32,
    /// Fragment size.
    pub frsize: u32,
}

/// Errors of a backend. Each maps to exactly one errno in
/// [`BackendError::errno`].
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// No such entry.
    #[error("no such file or directory")]
    NotFound,
    /// A name longer than [`NAME_MAX`].
    #[error("name is {0} bytes, longer than 255")]
    NameTooLong(usize),
    /// A name the jail refuses (`.`, `..`, contains `/` or NUL).
    #[error("invalid name {0:?}")]
    InvalidName(OsString),
    /// The inode or handle is not (or no longer) known to the backend.
    #[error("stale inode or handle {0}")]
    Stale(u64),
    /// An entry on another device inside the backend tree (a mount point).
    #[error("entry lies on another filesystem; mounts inside the backend are not served")]
    CrossDevice,
    /// The backend cannot do this.
    #[error("operation not supported by this backend")]
    Unsupported,
    /// An error injected by the `sim` backend.
    #[error("injected fault (errno {0})")]
    Injected(i32),
}

impl BackendError {
    /// Wrap the last OS error.
    pub fn last_os(op: &'static str) -> Self {
        Self::Io {
            op,
            source: io::Error::last_os_error(),
        }
    }

    /// Wrap an I/O error.
    pub fn io(op: &'static str, source: io::Error) -> Self {
        Self::Io { op, source }
    }

    /// Wrap an errno value.
    pub fn errno(op: &'static str, errno: i32) -> Self {
        Self::Io {
            op,
            source: io::Error::from_raw_os_error(errno),
        }
    }

    /// The errno a FUSE reply carries for this error.
    pub fn to_errno(&self) -> i32 {
        match self {
            Self::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Self::NotFound => libc::ENOENT,
            Self::NameTooLong(_) => libc::ENAMETOOLONG,
            // The kernel never sends these names; a caller that does is
            // trying to walk out of the jail.
            Self::InvalidName(_) => libc::EINVAL,
            Self::Stale(_) => libc::ESTALE,
            // Same answer passthrough_hp gives for hidden submounts.
            Self::CrossDevice => libc::ENOTSUP,
            Self::Unsupported => libc::EOPNOTSUPP,
            Self::Injected(e) => *e,
        }
    }
}

/// Result of backend calls.
pub type Result<T> = std::result::Result<T, BackendError>;

/// Check a name before it reaches a backend: not empty, no `/` or NUL,
/// not `.` or `..`, at most [`NAME_MAX`] bytes.
pub fn check_name(name: &OsStr) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let b = name.as_bytes();
    if b.len() > NAME_MAX {
        return Err(BackendError::NameTooLong(b.len()));
    }
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(BackendError::InvalidName(name.to_owned()));
    }
    Ok(())
}

/// What a backend that holds backing objects holds (`efuse stats`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeStats {
    /// `handles` or `descriptors`.
    pub mode: String,
    /// Inodes held (the kernel's, BPF map entries', the root).
    pub nodes: usize,
    /// Descriptors open for them.
    pub descriptors: usize,
    /// Descriptors opened by handle so far (cache misses).
    pub opened_by_handle: u64,
}

/// A storage backend. See the module docs for the pinning contract.
pub trait Backend: Send + Sync + 'static {
    /// Short name for logs and `efuse status` (`dir`, `mem`, `sim+dir`).
    fn kind(&self) -> String;
    /// How the backend holds the inodes the kernel knows, where it holds
    /// backing objects (`dir`); `None` for a store that needs nothing.
    fn inode_mode(&self) -> Option<dir::nodes::InodeMode> {
        None
    }
    /// Does the backend see every change in directory `dir` (its own and
    /// its entries'), also those made behind the mount, and report them
    /// through [`Backend::watch`]'s sink?
    fn watched(&self, _dir: Ino) -> bool {
        false
    }
    /// The backend's node table, where it holds backing objects.
    fn node_stats(&self) -> Option<NodeStats> {
        None
    }
    /// Inode number of the root directory.
    fn root(&self) -> Ino;
    /// Find `name` in `parent`; pins the result.
    fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr>;
    /// Drop `n` pins of `ino`.
    fn forget(&self, ino: Ino, n: u64);
    /// Take one more pin on an inode the backend already holds pinned,
    /// without a round trip.
    fn pin(&self, _ino: Ino) -> Result<()> {
        Err(BackendError::Unsupported)
    }
    /// What identifies the object `ino` (pinned) beyond its number, for
    /// export handles: the same bytes for as long as the object exists,
    /// other bytes for an object that reuses the number. `None` when the
    /// backend never reuses numbers or cannot tell.
    fn identity(&self, _ino: Ino) -> Option<Vec<u8>> {
        None
    }
    /// Pin `ino` again, found by number (and `identity`, from
    /// [`Backend::identity`]) after the filesystem layer let it go: how an
    /// export handle opens a file the kernel had forgotten. `Stale` once
    /// the object is gone.
    fn reopen(&self, ino: Ino, _identity: Option<&[u8]>) -> Result<Attr> {
        Err(BackendError::Stale(ino))
    }
    /// Pin and return the parent directory of directory `dir` (the root's
    /// parent is the root), for LOOKUP of "..".
    fn parent(&self, dir: Ino) -> Result<Attr> {
        Err(BackendError::Stale(dir))
    }
    /// True when the backend keeps POSIX ACLs as `system.posix_acl_*`
    /// attributes and applies them (mode interplay, default ACLs on
    /// create), so that the kernel may enforce them (FUSE_POSIX_ACL).
    fn posix_acl(&self) -> bool {
        false
    }
    /// Whether the backend keeps extended attributes at all (`-o
    /// xattr=auto` serves them only then).
    fn xattrs(&self) -> bool {
        true
    }
    /// True when a metadata round trip is expensive (a remote store), so
    /// that batching and caching metadata in the daemon pays off.
    fn is_remote(&self) -> bool {
        false
    }
    /// Most calls the backend has had in flight at once, where it counts.
    fn max_concurrency(&self) -> Option<u64> {
        None
    }
    /// Attributes of `ino`.
    fn getattr(&self, ino: Ino) -> Result<Attr>;
    /// Attributes of many inodes in one round trip.
    fn batch_getattr(&self, inos: &[Ino]) -> Vec<Result<Attr>> {
        inos.iter().map(|&i| self.getattr(i)).collect()
    }
    /// Change attributes; `fh` is an open handle of the file when the caller has one.
    fn setattr(&self, ino: Ino, fh: Option<Fh>, set: &SetAttr) -> Result<Attr>;
    /// Target of a symlink.
    fn readlink(&self, ino: Ino) -> Result<Vec<u8>>;
    /// Create a node (file, fifo, socket, device); pins it.
    fn mknod(&self, who: Caller, parent: Ino, name: &OsStr, mode: u32, rdev: u32) -> Result<Attr>;
    /// Create a directory; pins it.
    fn mkdir(&self, who: Caller, parent: Ino, name: &OsStr, mode: u32) -> Result<Attr>;
    /// Create a symlink; pins it.
    fn symlink(&self, who: Caller, parent: Ino, name: &OsStr, target: &OsStr) -> Result<Attr>;
    /// Add a hard link to `ino`; pins it.
    fn link(&self, ino: Ino, newparent: Ino, newname: &OsStr) -> Result<Attr>;
    /// Remove a non-directory.
    fn unlink(&self, parent: Ino, name: &OsStr) -> Result<()>;
    /// Remove an empty directory.
    fn rmdir(&self, parent: Ino, name: &OsStr) -> Result<()>;
    /// Rename; `flags` are `RENAME_NOREPLACE` / `RENAME_EXCHANGE`.
    fn rename(&self, parent: Ino, name: &OsStr, newparent: Ino, newname: &OsStr, flags: u32) -> Result<()>;
    /// Open a file with `open(2)` flags.
    fn open(&self, ino: Ino, flags: i32) -> Result<Fh>;
    /// Create and open a file; pins it.
    fn create(&self, who: Caller, parent: Ino, name: &OsStr, mode: u32, flags: i32) -> Result<(Attr, Fh)>;
    /// Create an unnamed regular file in `parent` (O_TMPFILE) and open it;
    /// `link` can give it a name later. EOPNOTSUPP where the backend cannot.
    fn tmpfile(&self, who: Caller, parent: Ino, mode: u32, flags: i32) -> Result<(Attr, Fh)> {
        let _ = (who, parent, mode, flags);
        Err(BackendError::errno("tmpfile", libc::EOPNOTSUPP))
    }
    /// Read up to `size` bytes at `offset`.
    fn read(&self, fh: Fh, offset: u64, size: u32) -> Result<Vec<u8>>;
    /// The inode-flag ioctls of chattr/lsattr on a regular file or
    /// directory: `cmd` is FS_IOC_GETFLAGS/SETFLAGS (a 4-byte int) or
    /// FS_IOC_FSGETXATTR/FSSETXATTR (a 28-byte `struct fsxattr`); `arg`
    /// holds the argument and receives the result. The kernel has checked
    /// the caller's right to change the flags. ENOTTY where the backend
    /// keeps no such flags.
    fn fileattr(&self, ino: Ino, cmd: u32, arg: &mut [u8]) -> Result<()> {
        let _ = (ino, cmd, arg);
        Err(BackendError::errno("ioctl", libc::ENOTTY))
    }
    /// Read into `buf` (the reply buffer) at `offset`; returns the bytes
    /// read (short only at end of file).
    fn read_into(&self, fh: Fh, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let v = self.read(fh, offset, buf.len() as u32)?;
        let n = v.len().min(buf.len());
        buf[..n].copy_from_slice(&v[..n]);
        Ok(n)
    }
    /// Write `data` at `offset`; returns bytes written.
    fn write(&self, fh: Fh, offset: u64, data: &[u8]) -> Result<u32>;
    /// Called on every close(2) of a descriptor of the handle.
    fn flush(&self, fh: Fh) -> Result<()>;
    /// Make the file's data (and metadata unless `datasync`) durable.
    fn fsync(&self, fh: Fh, datasync: bool) -> Result<()>;
    /// Close a file handle.
    fn release(&self, fh: Fh);
    /// Open a directory for listing.
    fn opendir(&self, ino: Ino) -> Result<Fh>;
    /// List entries after cookie `offset` (0 = start), at most `max`.
    /// Includes `.` and `..`.
    fn readdir(&self, dh: Fh, offset: u64, max: usize) -> Result<Vec<DirEntry>>;
    /// Like `readdir` with the attributes of each entry, in one round trip.
    /// Pins every entry but `.` and `..`; the caller must `forget` those it
    /// does not hand to the kernel.
    fn readdir_plus(&self, dh: Fh, offset: u64, max: usize) -> Result<Vec<(DirEntry, Attr)>>;
    /// Close a directory handle.
    fn releasedir(&self, dh: Fh);
    /// List up to `max` entries of directory `dir` with attributes in one
    /// round trip (pinning each, like `readdir_plus`); the bool says whether
    /// the listing is complete.
    fn list_plus(&self, dir: Ino, max: usize) -> Result<(Vec<(DirEntry, Attr)>, bool)> {
        let dh = self.opendir(dir)?;
        let mut out = Vec::new();
        let mut offset = 0;
        let res = loop {
            if out.len() >= max {
                break Ok(false);
            }
            match self.readdir_plus(dh, offset, (max - out.len()).min(1024)) {
                Ok(b) if b.is_empty() => break Ok(true),
                Ok(b) => {
                    offset = b.last().map_or(offset, |(e, _)| e.next);
                    out.extend(b);
                }
                Err(e) => break Err(e),
            }
        };
        self.releasedir(dh);
        match res {
            Ok(complete) => Ok((out, complete)),
            Err(e) => {
                for (e, a) in &out {
                    if e.name != "." && e.name != ".." {
                        self.forget(a.ino, 1);
                    }
                }
                Err(e)
            }
        }
    }
    /// Open a file and return its attributes, in one round trip where the
    /// backend can (remote stores answer opens with the inode's attributes).
    fn open_attr(&self, ino: Ino, flags: i32) -> Result<(Fh, Attr)> {
        let fh = self.open(ino, flags)?;
        match self.getattr(ino) {
            Ok(a) => Ok((fh, a)),
            Err(e) => {
                self.release(fh);
                Err(e)
            }
        }
    }
    /// Filesystem statistics.
    fn statfs(&self) -> Result<StatFs>;
    /// Value of an extended attribute.
    fn getxattr(&self, ino: Ino, name: &OsStr) -> Result<Vec<u8>>;
    /// Set an extended attribute (`XATTR_CREATE` / `XATTR_REPLACE` flags).
    fn setxattr(&self, ino: Ino, name: &OsStr, value: &[u8], flags: i32) -> Result<()>;
    /// NUL-separated list of extended attribute names.
    fn listxattr(&self, ino: Ino) -> Result<Vec<u8>>;
    /// Remove an extended attribute.
    fn removexattr(&self, ino: Ino, name: &OsStr) -> Result<()>;
    /// Allocate or punch space (`fallocate(2)` mode).
    fn fallocate(&self, fh: Fh, offset: u64, len: u64, mode: i32) -> Result<()>;
    /// `lseek(2)` with `SEEK_DATA` / `SEEK_HOLE`.
    fn lseek(&self, fh: Fh, offset: i64, whence: i32) -> Result<i64>;
    /// Copy a range between two open files without moving data through the daemon.
    fn copy_file_range(
        &self,
        _fh_in: Fh,
        _off_in: u64,
        _fh_out: Fh,
        _off_out: u64,
        _len: u64,
    ) -> Result<u64> {
        Err(BackendError::Unsupported)
    }
    /// Start reporting changes to `sink`. Returns false when the backend
    /// cannot watch (kernel caches are then bounded by their TTLs).
    fn watch(&self, _sink: ChangeSink) -> anyhow::Result<bool> {
        Ok(false)
    }
    /// Are changes seen by the watch still waiting to be passed to the sink
    /// (queued, or being handled)? False once every change made before the
    /// call has been handled: a barrier for tools and tests.
    fn changes_pending(&self) -> bool {
        false
    }
    /// A local file holding the data of an open handle, for kernel
    /// passthrough; `None` when the backend is not local.
    fn backing_file(&self, _fh: Fh) -> Option<Arc<File>> {
        None
    }
}

/// A change the backend learned of (made by anyone, through the mount or not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeEvent {
    /// `name` in directory `dir` was created, removed, renamed or modified
    /// (`child`: the object now under that name, when known); with no
    /// name, `dir` itself changed.
    Changed {
        /// Directory (backend inode).
        dir: Ino,
        /// Entry name.
        name: Option<OsString>,
        /// Object under the name.
        child: Option<Ino>,
    },
    /// Events were lost: assume anything changed.
    Overflow,
}

/// Where a backend reports changes.
pub type ChangeSink = Arc<dyn Fn(ChangeEvent) + Send + Sync>;

/// A shared backend, as the filesystem and wrappers hold it.
pub type SharedBackend = Arc<dyn Backend>;
