//! The FUSE adapter: fuser callbacks to [`EfuseFs`] calls.
//!
//! Each callback converts arguments, calls one filesystem method, and
//! replies through [`FuseAdapter::finish`], which counts the request and on
//! error logs it (quietly for expected errnos) and replies with the errno.
//! No filesystem logic lives here.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::backend::{Attr, Caller, FileKind, SetAttr, SetTime};
use crate::fs::{DirPlusReplier, DirReplier, Entry, FsError, FsResult, Opened, SharedFs, XattrReply};
use crate::metrics::{Metrics, op};

/// fuser's `Filesystem` over an [`EfuseFs`](crate::fs::EfuseFs).
pub struct FuseAdapter {
    fs: SharedFs,
    metrics: Arc<Metrics>,
}

impl FuseAdapter {
    /// An adapter counting into `metrics`.
    pub fn new(fs: SharedFs, metrics: Arc<Metrics>) -> Self {
        Self { fs, metrics }
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
    f
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
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
        // Same defaults libfuse3 asks for: parallel lookups in one directory,
        // and O_TRUNC handled in open.
        for cap in [InitFlags::FUSE_PARALLEL_DIROPS, InitFlags::FUSE_ATOMIC_O_TRUNC] {
            if let Err(missing) = config.add_capabilities(cap) {
                tracing::info!(?missing, "kernel lacks FUSE capability");
            }
        }
        tracing::debug!(abi = ?config.kernel_abi(), caps = ?config.capabilities(), "FUSE_INIT");
        self.metrics.record(op::INIT, start, false);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let t = Instant::now();
        self.finish(op::LOOKUP, t, self.fs.lookup(parent.0, name), reply, reply_entry);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let t = Instant::now();
        self.fs.forget(ino.0, nlookup);
        self.metrics.record(op::FORGET, t, false);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let t = Instant::now();
        self.finish(op::GETATTR, t, self.fs.getattr(ino.0), reply, |r, (a, ttl)| {
            r.attr(&ttl, &file_attr(&a))
        });
    }

    fn setattr(
        &self,
        _req: &Request,
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
        let t = Instant::now();
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        let res = self.fs.setattr(ino.0, fh.map(|f| f.0), &set);
        self.finish(op::SETATTR, t, res, reply, |r, (a, ttl)| {
            r.attr(&ttl, &file_attr(&a))
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let t = Instant::now();
        self.finish(op::READLINK, t, self.fs.readlink(ino.0), reply, |r, v| r.data(&v));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let t = Instant::now();
        let res = self.fs.mknod(caller(req), parent.0, name, mode, rdev);
        self.finish(op::MKNOD, t, res, reply, reply_entry);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let t = Instant::now();
        let res = self.fs.mkdir(caller(req), parent.0, name, mode);
        self.finish(op::MKDIR, t, res, reply, reply_entry);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let t = Instant::now();
        self.finish(op::UNLINK, t, self.fs.unlink(parent.0, name), reply, |r, ()| {
            r.ok()
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let t = Instant::now();
        self.finish(op::RMDIR, t, self.fs.rmdir(parent.0, name), reply, |r, ()| r.ok());
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let t = Instant::now();
        let res = self
            .fs
            .symlink(caller(req), parent.0, link_name, target.as_os_str());
        self.finish(op::SYMLINK, t, res, reply, reply_entry);
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
        let t = Instant::now();
        let res = self.fs.rename(parent.0, name, newparent.0, newname, flags.bits());
        self.finish(op::RENAME, t, res, reply, |r, ()| r.ok());
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let t = Instant::now();
        let res = self.fs.link(ino.0, newparent.0, newname);
        self.finish(op::LINK, t, res, reply, reply_entry);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let t = Instant::now();
        self.finish(op::OPEN, t, self.fs.open(ino.0, flags.0), reply, |r, o| {
            r.opened(FileHandle(o.fh), fopen_flags(&o))
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let t = Instant::now();
        self.finish(op::READ, t, self.fs.read(fh.0, offset, size), reply, |r, v| {
            r.data(&v)
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let t = Instant::now();
        self.finish(op::WRITE, t, self.fs.write(fh.0, offset, data), reply, |r, n| {
            r.written(n)
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
        let t = Instant::now();
        self.finish(op::FLUSH, t, self.fs.flush(fh.0), reply, |r, ()| r.ok());
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
        self.fs.release(fh.0);
        reply.ok();
        self.metrics.record(op::RELEASE, t, false);
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let t = Instant::now();
        self.finish(op::FSYNC, t, self.fs.fsync(fh.0, datasync), reply, |r, ()| r.ok());
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let t = Instant::now();
        self.finish(op::OPENDIR, t, self.fs.opendir(ino.0), reply, |r, o| {
            r.opened(FileHandle(o.fh), fopen_flags(&o))
        });
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let t = Instant::now();
        let res = self.fs.readdir(fh.0, offset, &mut Plain(&mut reply));
        self.finish(op::READDIR, t, res, reply, |r, ()| r.ok());
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let t = Instant::now();
        let res = self.fs.readdir_plus(fh.0, offset, &mut Plus(&mut reply));
        self.finish(op::READDIRPLUS, t, res, reply, |r, ()| r.ok());
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
        self.fs.releasedir(fh.0);
        reply.ok();
        self.metrics.record(op::RELEASEDIR, t, false);
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Directory metadata is durable once the backend call returned.
        let t = Instant::now();
        reply.ok();
        self.metrics.record(op::FSYNCDIR, t, false);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let t = Instant::now();
        self.finish(op::STATFS, t, self.fs.statfs(), reply, |r, s| {
            r.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            )
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
        let t = Instant::now();
        let res = self.fs.setxattr(ino.0, name, value, flags);
        self.finish(op::SETXATTR, t, res, reply, |r, ()| r.ok());
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let t = Instant::now();
        let res = self.fs.getxattr(ino.0, name, size);
        self.finish(op::GETXATTR, t, res, reply, reply_xattr);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let t = Instant::now();
        let res = self.fs.listxattr(ino.0, size);
        self.finish(op::LISTXATTR, t, res, reply, reply_xattr);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let t = Instant::now();
        let res = self.fs.removexattr(ino.0, name);
        self.finish(op::REMOVEXATTR, t, res, reply, |r, ()| r.ok());
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let t = Instant::now();
        let res = self.fs.access(ino.0, mask.bits(), req.uid(), req.gid());
        self.finish(op::ACCESS, t, res, reply, |r, ()| r.ok());
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let t = Instant::now();
        let res = self.fs.create(caller(req), parent.0, name, mode, flags);
        self.finish(op::CREATE, t, res, reply, |r, (e, o)| {
            r.created(
                &e.entry_ttl,
                &file_attr(&e.attr),
                Generation(e.generation),
                FileHandle(o.fh),
                fopen_flags(&o),
            )
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let t = Instant::now();
        let res = self.fs.fallocate(fh.0, offset, length, mode);
        self.finish(op::FALLOCATE, t, res, reply, |r, ()| r.ok());
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let t = Instant::now();
        let res = self.fs.lseek(fh.0, offset, whence);
        self.finish(op::LSEEK, t, res, reply, |r, o| r.offset(o));
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let t = Instant::now();
        let res = self
            .fs
            .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len);
        self.finish(op::COPY_FILE_RANGE, t, res, reply, |r, n| {
            r.written(n.min(u32::MAX as u64) as u32)
        });
    }
}

fn reply_xattr(r: ReplyXattr, x: XattrReply) {
    match x {
        XattrReply::Size(n) => r.size(n),
        XattrReply::Data(v) => r.data(&v),
    }
}
