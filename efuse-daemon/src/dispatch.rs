//! The request dispatcher: a decoded FUSE request to one [`EfuseFs`](crate::fs::EfuseFs) call
//! and its encoded reply.
//!
//! Both transports (`transport::classic` over /dev/fuse reads and writes,
//! `transport::uring` over FUSE-over-io_uring) decode with
//! [`crate::transport::wire`] and call [`Dispatcher::handle`]; no
//! operation's logic exists twice. Each request is counted once, with the
//! time it took, in [`Metrics`]; errors are logged (quietly for expected
//! errnos) and become the reply's errno. No filesystem logic lives here.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crate::backend::{Caller, SetAttr, SetTime};
use crate::fs::{FsError, FsResult, Opened, SharedFs, fopen_flags};
use crate::metrics::{Metrics, op};
use crate::transport::abi::{self, init as initf};
use crate::transport::reply::{Dirents, attr_out, entry_out, negative_entry, open_out, xattr_out};
use crate::transport::wire::{InHeader, InitIn, Out, Req};

/// What INIT negotiated.
#[derive(Debug, Default)]
pub struct Negotiated {
    /// FUSE_PASSTHROUGH granted.
    pub passthrough: AtomicBool,
    /// Passthrough was refused at run time; page cache used instead.
    pub passthrough_refused: AtomicBool,
    /// The protocol minor version in use.
    pub minor: AtomicU64,
    /// FUSE_OVER_IO_URING was offered by the kernel and asked for.
    pub uring: AtomicBool,
}

/// What a request's handling left for the transport to send.
#[derive(Debug, PartialEq, Eq)]
pub enum Done {
    /// The body in the `Out` buffer.
    Reply,
    /// An errno.
    Error(i32),
    /// Nothing (FORGET, BATCH_FORGET, INTERRUPT).
    NoReply,
}

/// The dispatcher over an [`EfuseFs`](crate::fs::EfuseFs).
pub struct Dispatcher {
    fs: SharedFs,
    metrics: Arc<Metrics>,
    negotiated: Negotiated,
    /// Without allow_other, the only uids served (the daemon's own, and
    /// with allow_root also root); see [`Dispatcher::restrict`].
    allowed: Option<(u32, bool)>,
}

impl Dispatcher {
    /// A dispatcher over `fs` counting into `metrics`.
    pub fn new(fs: SharedFs, metrics: Arc<Metrics>) -> Self {
        Self {
            fs,
            metrics,
            negotiated: Negotiated::default(),
            allowed: None,
        }
    }

    /// Serve only requests of the daemon's user (and root with
    /// `allow_root`), as mount(8)'s FUSE semantics promise when other users
    /// are not allowed: the kernel already refuses other users' processes,
    /// this also refuses a process that changed its fsuid after passing that
    /// check. Requests the kernel sends on its own behalf pass.
    pub fn restrict(mut self, owner: u32, allow_root: bool) -> Self {
        self.allowed = Some((owner, allow_root));
        self
    }

    fn refused(&self, h: &InHeader, req: &Req<'_>) -> bool {
        let Some((owner, root)) = self.allowed else {
            return false;
        };
        if h.uid == owner || (root && h.uid == 0) {
            return false;
        }
        !matches!(
            req,
            Req::Init(_)
                | Req::Destroy
                | Req::Read { .. }
                | Req::Readdir { .. }
                | Req::Forget { .. }
                | Req::BatchForget { .. }
                | Req::Write { .. }
                | Req::Fsync { .. }
                | Req::Fsyncdir
                | Req::Release { .. }
                | Req::Releasedir { .. }
                | Req::Interrupt { .. }
        )
    }

    /// What INIT negotiated.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// The filesystem served.
    pub fn fs(&self) -> &SharedFs {
        &self.fs
    }

    /// Answer FUSE_INIT into `out`. `uring`: ask for FUSE_OVER_IO_URING if
    /// the kernel offers it.
    pub fn init(&self, i: &InitIn, out: &mut Out, uring: bool) -> Result<(), i32> {
        let start = Instant::now();
        if i.major != abi::KERNEL_VERSION {
            tracing::error!(major = i.major, "unsupported FUSE major version (efuse speaks 7)");
            return Err(libc::EPROTO);
        }
        if i.minor < abi::MIN_MINOR_VERSION {
            tracing::error!(
                minor = i.minor,
                "the kernel speaks FUSE 7.{}; efuse needs 7.{} (Linux 5.10) or newer",
                i.minor,
                abi::MIN_MINOR_VERSION
            );
            return Err(libc::EPROTO);
        }
        let minor = i.minor.min(abi::KERNEL_MINOR_VERSION);
        let offered = i.flags;
        let k = self.fs.kernel_cfg().clone();
        let kernel_start = self.fs.tier() != crate::config::Offload::Off;
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
        let mut want: Vec<(&str, u64)> = vec![
            ("asynchronous reads", initf::ASYNC_READ),
            ("big writes", initf::BIG_WRITES),
            ("max_pages", initf::MAX_PAGES),
            ("parallel dirops", initf::PARALLEL_DIROPS),
            // name_to_handle_at/open_by_handle_at and NFS re-export: node
            // ids are the backing inode numbers, generations survive FORGET
            // (see InodeTable::graves), LOOKUP answers "." and "..".
            ("export support", initf::EXPORT_SUPPORT),
            ("READDIRPLUS", initf::DO_READDIRPLUS),
            ("auto page-cache invalidation", initf::AUTO_INVAL_DATA),
            // The umask is applied by the backend (the dir backend lets the
            // backing filesystem apply it, which skips it where a default ACL
            // applies, as on a local filesystem).
            ("unmasked create modes", initf::DONT_MASK),
        ];
        if kernel_start {
            want.push(("symlink caching", initf::CACHE_SYMLINKS));
        }
        // POSIX ACLs, enforced by the kernel, where the backend keeps them
        // and other users may use the mount (the kernel then checks
        // permissions itself; for the mounting user alone, root, ACLs
        // grant nothing more).
        if self.fs.posix_acl() {
            want.push(("POSIX ACLs", initf::POSIX_ACL));
        }
        if k.writeback_cache {
            want.push(("writeback cache", initf::WRITEBACK_CACHE));
        }
        let mut flags = 0u64;
        for (what, cap) in want {
            if offered & cap == cap {
                flags |= cap;
            } else {
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
        let mut stack_depth = 0;
        if k.passthrough && !k.writeback_cache && !disabled {
            if offered & initf::PASSTHROUGH != 0 {
                flags |= initf::PASSTHROUGH;
                // Backing files are on a plain filesystem; the mount may
                // itself sit under overlayfs.
                stack_depth = 1;
                self.negotiated.passthrough.store(true, Ordering::Relaxed);
                self.fs.grant_passthrough();
            } else {
                tracing::warn!(
                    "FUSE passthrough needs Linux 6.9+ (FUSE_PASSTHROUGH); this kernel does not offer it, \
                     so the kernel tier serves reads from the page cache (FOPEN_KEEP_CACHE)"
                );
            }
        }
        if uring && offered & initf::OVER_IO_URING != 0 {
            flags |= initf::OVER_IO_URING;
            self.negotiated.uring.store(true, Ordering::Relaxed);
        }
        if flags >> 32 != 0 {
            flags |= initf::INIT_EXT;
        }
        self.negotiated.minor.store(minor as u64, Ordering::Relaxed);
        // struct fuse_init_out (64 bytes).
        out.u32(abi::KERNEL_VERSION);
        out.u32(minor);
        out.u32(i.max_readahead);
        out.u32(flags as u32);
        out.put(&16u16.to_ne_bytes()); // max_background
        out.put(&12u16.to_ne_bytes()); // congestion_threshold
        out.u32(abi::MAX_WRITE);
        out.u32(1); // time_gran: nanoseconds
        out.put(&abi::MAX_PAGES.to_ne_bytes());
        out.put(&0u16.to_ne_bytes()); // map_alignment
        out.u32((flags >> 32) as u32);
        out.u32(stack_depth);
        out.zeros(24); // request_timeout + unused
        tracing::debug!(
            minor,
            offered = format_args!("{offered:#x}"),
            flags = format_args!("{flags:#x}"),
            "FUSE_INIT"
        );
        self.metrics.record(op::INIT, start, false);
        Ok(())
    }

    /// Serve one decoded request (not INIT) and encode its reply into `out`.
    pub fn handle(&self, h: &InHeader, req: Req<'_>, out: &mut Out) -> Done {
        let t = Instant::now();
        let opcode = h.opcode;
        let ino = h.nodeid;
        if self.refused(h, &req) {
            self.metrics.record(opcode, t, true);
            return Done::Error(libc::EACCES);
        }
        if !self.fs.xattrs()
            && matches!(
                req,
                Req::Getxattr { .. } | Req::Listxattr { .. } | Req::Setxattr { .. } | Req::Removexattr { .. }
            )
        {
            // ENOSYS: the kernel remembers that this connection has no such
            // operation and answers every later call EOPNOTSUPP itself.
            self.metrics.record(opcode, t, true);
            return Done::Error(libc::ENOSYS);
        }
        let res: FsResult<()> = match req {
            Req::Init(_) => Err(FsError::Errno(libc::EPROTO)),
            Req::Destroy => Ok(()),
            Req::Lookup { name } => match self.fs.lookup(ino, name) {
                // The kernel caches the absence of the name.
                Err(FsError::Missing { cache_for }) if !cache_for.is_zero() => {
                    negative_entry(out, cache_for);
                    Ok(())
                }
                r => r.map(|e| entry_out(out, &e)),
            },
            Req::Forget { nlookup } => {
                self.fs.forget(ino, nlookup);
                self.metrics.record(op::FORGET, t, false);
                return Done::NoReply;
            }
            Req::BatchForget { items } => {
                for it in items.chunks_exact(16) {
                    let (a, b) = it.split_at(8);
                    let id = u64::from_ne_bytes(a.try_into().unwrap_or_default());
                    let n = u64::from_ne_bytes(b.try_into().unwrap_or_default());
                    self.fs.forget(id, n);
                }
                self.metrics.record(op::FORGET, t, false);
                return Done::NoReply;
            }
            Req::Interrupt { .. } => {
                // Requests run to completion; the kernel needs no answer.
                return Done::NoReply;
            }
            Req::Getattr { .. } => self.fs.getattr(ino).map(|(a, ttl)| attr_out(out, &a, ttl)),
            Req::Setattr(s) => {
                let who = caller(h, 0);
                let set = SetAttr {
                    mode: s.mode(),
                    uid: s.uid(),
                    gid: s.gid(),
                    size: s.size(),
                    atime: s.atime().map(set_time),
                    mtime: s.mtime().map(set_time),
                };
                self.fs
                    .setattr_by(ino, s.fh(), &set, who)
                    .map(|(a, ttl)| attr_out(out, &a, ttl))
            }
            Req::Readlink => self.fs.readlink(ino).map(|v| out.put(&v)),
            Req::Mknod {
                mode,
                rdev,
                umask,
                name,
            } => self
                .fs
                .mknod(caller(h, umask), ino, name, mode, rdev)
                .map(|e| entry_out(out, &e)),
            Req::Mkdir { mode, umask, name } => self
                .fs
                .mkdir(caller(h, umask), ino, name, mode)
                .map(|e| entry_out(out, &e)),
            Req::Symlink { name, target } => self
                .fs
                .symlink(caller(h, 0), ino, name, target)
                .map(|e| entry_out(out, &e)),
            Req::Unlink { name } => self.fs.unlink(ino, name),
            Req::Rmdir { name } => self.fs.rmdir(ino, name),
            Req::Rename {
                newdir,
                flags,
                name,
                newname,
            } => self.fs.rename(ino, name, newdir, newname, flags),
            Req::Link { oldnodeid, name } => self.fs.link(oldnodeid, ino, name).map(|e| entry_out(out, &e)),
            Req::Open { flags } => self
                .fs
                .open_for_kernel(ino, flags as i32, caller(h, 0))
                .map(|k| open_out(out, k.fh, k.flags, k.backing_id)),
            Req::Read { fh, offset, size } => {
                // Straight into the reply buffer: no copy, no allocation.
                let buf = out.spare(size as usize);
                let res = self.fs.with_io(ino, fh, |f| self.fs.read_into(f, offset, buf));
                res.map(|n| out.advance(n))
            }
            Req::Write { fh, offset, data } => {
                self.fs.write_by(ino, fh, offset, data, caller(h, 0)).map(|n| {
                    out.u32(n);
                    out.u32(0);
                })
            }
            Req::Statfs => self.fs.statfs().map(|s| {
                for v in [s.blocks, s.bfree, s.bavail, s.files, s.ffree] {
                    out.u64(v);
                }
                for v in [s.bsize, s.namelen, s.frsize] {
                    out.u32(v);
                }
                out.zeros(4 + 24);
            }),
            Req::Release { fh } => {
                self.fs.released_by_kernel(fh);
                Ok(())
            }
            Req::Fsync { fh, datasync } => self.fs.with_io(ino, fh, |f| self.fs.fsync(f, datasync)),
            Req::Setxattr { flags, name, value } => {
                self.fs.setxattr_by(ino, name, value, flags, caller(h, 0))
            }
            Req::Getxattr { size, name } => self.fs.getxattr(ino, name, size).map(|x| xattr_out(out, x)),
            Req::Listxattr { size } => self.fs.listxattr(ino, size).map(|x| xattr_out(out, x)),
            Req::Removexattr { name } => self.fs.removexattr(ino, name),
            Req::Flush { fh } => {
                if fh == 0 {
                    // A zero-message open: writes already reached the backend
                    // synchronously; ENOSYS stops further FLUSH messages.
                    self.metrics.record(op::FLUSH, t, false);
                    return Done::Error(libc::ENOSYS);
                }
                self.fs.flush(fh)
            }
            Req::Opendir => self
                .fs
                .opendir(ino)
                .map(|o| open_out(out, o.fh, fopen_flags(&o), 0)),
            Req::Readdir {
                fh,
                offset,
                size,
                plus,
            } => {
                let mut d = Dirents {
                    out,
                    limit: size as usize,
                    used: 0,
                };
                if plus {
                    self.fs.readdir_plus(ino, fh, offset, &mut d)
                } else {
                    self.fs.readdir(fh, offset, &mut d)
                }
            }
            Req::Releasedir { fh } => {
                self.fs.releasedir(fh);
                Ok(())
            }
            // Directory metadata is durable once the backend call returned.
            Req::Fsyncdir => Ok(()),
            Req::Access { mask } => self.fs.access(ino, mask as i32, h.uid, h.gid),
            Req::Create {
                flags,
                mode,
                umask,
                name,
            } => self
                .fs
                .create(caller(h, umask), ino, name, mode, flags as i32)
                .map(|(e, o)| self.created(out, &e, o)),
            Req::Tmpfile { flags, mode, umask } => self
                .fs
                .tmpfile(caller(h, umask), ino, mode, flags as i32)
                .map(|(e, o)| self.created(out, &e, o)),
            // The inode flags (chattr, lsattr): the kernel sends these from
            // its fileattr get/set, after checking the caller's rights.
            Req::Ioctl {
                cmd, data, out_size, ..
            } if crate::backend::fileattr::arg_len(cmd).is_some() => {
                self.fs.fileattr(ino, cmd, data).map(|arg| {
                    // fuse_ioctl_out: result, flags, in_iovs, out_iovs.
                    out.zeros(16);
                    out.put(&arg[..(out_size as usize).min(arg.len())]);
                })
            }
            // No other ioctl is served: ENOTTY, as a local filesystem
            // answers commands it does not know (Python's isatty check on
            // every open, the terminal ioctls of shells).
            Req::Ioctl { .. } => {
                self.metrics.record(op::IOCTL, t, true);
                return Done::Error(libc::ENOTTY);
            }
            Req::Fallocate {
                fh,
                offset,
                length,
                mode,
            } => self
                .fs
                .fallocate_by(ino, fh, offset, length, mode as i32, caller(h, 0)),
            Req::Lseek { fh, offset, whence } => self
                .fs
                .with_io(ino, fh, |f| self.fs.lseek(f, offset, whence as i32))
                .map(|o| out.u64(o as u64)),
            Req::CopyFileRange {
                fh_in,
                off_in,
                nodeid_out,
                fh_out,
                off_out,
                len,
            } => {
                let res = self.fs.with_io(ino, fh_in, |a| {
                    self.fs.with_io(nodeid_out, fh_out, |b| {
                        self.fs.copy_file_range(a, off_in, b, off_out, len)
                    })
                });
                self.fs.modified(nodeid_out);
                res.map(|n| {
                    out.u32(n.min(u32::MAX as u64) as u32);
                    out.u32(0);
                })
            }
            Req::Unsupported(_) => {
                self.metrics.record(opcode, t, true);
                return Done::Error(libc::ENOSYS);
            }
        };
        match res {
            Ok(()) if out.overflowed() => {
                tracing::warn!(op = %crate::metrics::opcode_name(opcode), "reply larger than its buffer");
                self.metrics.record(opcode, t, true);
                Done::Error(libc::EIO)
            }
            Ok(()) => {
                self.metrics.record(opcode, t, false);
                Done::Reply
            }
            Err(e) => {
                log_error(opcode, &e);
                self.metrics.record(opcode, t, true);
                Done::Error(e.to_errno())
            }
        }
    }
}

fn log_error(opcode: u32, e: &FsError) {
    if e.is_expected() {
        tracing::debug!(op = %crate::metrics::opcode_name(opcode), errno = e.to_errno(), "{e}");
    } else {
        tracing::warn!(op = %crate::metrics::opcode_name(opcode), errno = e.to_errno(), "{e:#}");
    }
}

impl Dispatcher {
    /// The reply to CREATE or TMPFILE: the entry and the open.
    fn created(&self, out: &mut Out, e: &crate::fs::Entry, o: Opened) {
        let k = self.fs.created_for_kernel(e.attr.ino, o);
        entry_out(out, e);
        open_out(out, k.fh, k.flags, k.backing_id);
    }
}

fn caller(h: &InHeader, umask: u32) -> Caller {
    Caller {
        uid: h.uid,
        gid: h.gid,
        pid: h.pid,
        // With FUSE_DONT_MASK the kernel has not applied it.
        umask: umask & 0o777,
    }
}

fn set_time(t: Option<std::time::SystemTime>) -> SetTime {
    match t {
        None => SetTime::Now,
        Some(t) => SetTime::At(t),
    }
}

#[cfg(test)]
mod tests {
    //! The dispatcher over a filesystem in memory: decoded requests in,
    //! encoded replies out, no /dev/fuse and no mount.
    use std::ffi::OsStr;

    use super::*;
    use crate::backend::mem::MemBackend;
    use crate::config::{KernelTierConfig, Offload, Xattr};
    use crate::fs::{EfuseFs, FsConfig};

    fn dispatcher(tier: Offload, xattr: Xattr) -> Dispatcher {
        let fs = Arc::new(EfuseFs::build(
            Arc::new(MemBackend::new()),
            FsConfig {
                xattr,
                ..FsConfig::tier(tier, KernelTierConfig::default())
            },
        ));
        let e = fs.mkdir(Caller::default(), 1, OsStr::new("d"), 0o755).unwrap();
        fs.forget(e.attr.ino, 1);
        Dispatcher::new(fs, Arc::new(Metrics::default()))
    }

    fn header(opcode: u32, nodeid: u64, uid: u32) -> InHeader {
        InHeader {
            opcode,
            unique: 9,
            nodeid,
            uid,
            ..Default::default()
        }
    }

    /// Serve `req`; the outcome and the reply's bytes.
    fn serve(d: &Dispatcher, h: InHeader, req: Req<'_>) -> (Done, Vec<u8>) {
        let mut buf = vec![0u8; 4096];
        let mut out = Out::new(&mut buf);
        let done = d.handle(&h, req, &mut out);
        let bytes = out.bytes().to_vec();
        (done, bytes)
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_ne_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn lookup_replies_an_entry_and_counts_it_once() {
        let d = dispatcher(Offload::Kernel, Xattr::Auto);
        let (done, b) = serve(
            &d,
            header(op::LOOKUP, 1, 0),
            Req::Lookup {
                name: OsStr::new("d"),
            },
        );
        assert_eq!(done, Done::Reply);
        assert_eq!(b.len(), 128, "fuse_entry_out");
        let ino = u64_at(&b, 0);
        assert_ne!(ino, 0);
        assert_eq!(d.fs().inodes().nlookup(ino), 1, "the kernel got one reference");
        assert_eq!(d.metrics.count(op::LOOKUP), 1);
        // FORGET has no reply and gives the reference back.
        let (done, b) = serve(&d, header(op::FORGET, ino, 0), Req::Forget { nlookup: 1 });
        assert_eq!((done, b.len()), (Done::NoReply, 0));
        assert_eq!(d.fs().inodes().nlookup(ino), 0);
    }

    #[test]
    fn a_missing_name_is_a_negative_entry_where_the_kernel_caches() {
        let name = OsStr::new("nope");
        // Kernel tier: an entry with node id 0 and the negative TTL.
        let d = dispatcher(Offload::Kernel, Xattr::Auto);
        let (done, b) = serve(&d, header(op::LOOKUP, 1, 0), Req::Lookup { name });
        assert_eq!(done, Done::Reply);
        assert_eq!(u64_at(&b, 0), 0, "node id 0: a negative entry");
        assert_eq!(
            u64_at(&b, 16),
            KernelTierConfig::default().negative_ttl_ms / 1000,
            "entry_valid"
        );
        // Off: nothing is cached, so ENOENT.
        let d = dispatcher(Offload::Off, Xattr::Auto);
        let (done, _) = serve(&d, header(op::LOOKUP, 1, 0), Req::Lookup { name });
        assert_eq!(done, Done::Error(libc::ENOENT));
    }

    #[test]
    fn other_users_are_refused_but_the_kernels_own_requests_pass() {
        let d = dispatcher(Offload::Kernel, Xattr::Auto).restrict(1000, false);
        let name = OsStr::new("d");
        let (done, _) = serve(&d, header(op::LOOKUP, 1, 2000), Req::Lookup { name });
        assert_eq!(done, Done::Error(libc::EACCES));
        let (done, _) = serve(&d, header(op::LOOKUP, 1, 0), Req::Lookup { name });
        assert_eq!(done, Done::Error(libc::EACCES), "root without allow_root");
        let (done, b) = serve(&d, header(op::LOOKUP, 1, 1000), Req::Lookup { name });
        assert_eq!(done, Done::Reply);
        // A FORGET carries no user's authority: it always passes.
        let ino = u64_at(&b, 0);
        let (done, _) = serve(&d, header(op::FORGET, ino, 2000), Req::Forget { nlookup: 1 });
        assert_eq!(done, Done::NoReply);
        assert_eq!(d.fs().inodes().nlookup(ino), 0);
        let root = dispatcher(Offload::Kernel, Xattr::Auto).restrict(1000, true);
        let (done, _) = serve(&root, header(op::LOOKUP, 1, 0), Req::Lookup { name });
        assert_eq!(done, Done::Reply, "root with allow_root");
    }

    #[test]
    fn xattr_requests_without_xattrs_are_enosys_so_the_kernel_stops_asking() {
        let d = dispatcher(Offload::Kernel, Xattr::Off);
        let name = OsStr::new("user.k");
        let (done, _) = serve(&d, header(op::GETXATTR, 1, 0), Req::Getxattr { size: 0, name });
        assert_eq!(done, Done::Error(libc::ENOSYS));
        let d = dispatcher(Offload::Kernel, Xattr::On);
        let (done, _) = serve(&d, header(op::GETXATTR, 1, 0), Req::Getxattr { size: 0, name });
        assert_eq!(done, Done::Error(libc::ENODATA));
    }
}
