//! Reply encoders: the kernel's reply structures (`fuse_entry_out`,
//! `fuse_attr_out`, `fuse_open_out`, directory entries) written into a
//! request's [`Out`] buffer, and the notifications the daemon sends
//! unasked ([`Notify`]). The dispatcher (`crate::dispatch`) decides what to
//! answer; this writes it the way the ABI says.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::backend::{Attr, FileKind};
use crate::fs::{DirPlusReplier, DirReplier, Entry, XattrReply};
use crate::transport::abi;
use crate::transport::wire::{self, Out};

/// `struct fuse_attr` (88 bytes), from the one conversion
/// ([`wire::fuse_attr`]) the bpf tier's maps use too.
pub(crate) fn attr(out: &mut Out, a: &Attr) {
    let f = wire::fuse_attr(a);
    for v in [f.ino, f.size, f.blocks, f.atime, f.mtime, f.ctime] {
        out.u64(v);
    }
    for v in [
        f.atimensec,
        f.mtimensec,
        f.ctimensec,
        f.mode,
        f.nlink,
        f.uid,
        f.gid,
        f.rdev,
        f.blksize,
        f.flags,
    ] {
        out.u32(v);
    }
}

/// `struct fuse_entry_out` (128 bytes).
pub(crate) fn entry_out(out: &mut Out, e: &Entry) {
    let (es, en) = wire::ttl(e.entry_ttl);
    let (as_, an) = wire::ttl(e.attr_ttl);
    out.u64(e.attr.ino);
    out.u64(e.generation);
    out.u64(es);
    out.u64(as_);
    out.u32(en);
    out.u32(an);
    attr(out, &e.attr);
}

/// A negative entry: nodeid 0, cached by the kernel for `ttl`.
pub(crate) fn negative_entry(out: &mut Out, ttl: Duration) {
    let (s, n) = wire::ttl(ttl);
    out.u64(0);
    out.u64(0);
    out.u64(s);
    out.u64(0);
    out.u32(n);
    out.u32(0);
    out.zeros(88);
}

/// `struct fuse_attr_out` (104 bytes).
pub(crate) fn attr_out(out: &mut Out, a: &Attr, ttl: Duration) {
    let (s, n) = wire::ttl(ttl);
    out.u64(s);
    out.u32(n);
    out.u32(0);
    attr(out, a);
}

/// `struct fuse_open_out` (16 bytes).
pub(crate) fn open_out(out: &mut Out, fh: u64, flags: u32, backing_id: u32) {
    out.u64(fh);
    out.u32(flags);
    out.u32(backing_id);
}

pub(crate) fn xattr_out(out: &mut Out, x: XattrReply) {
    match x {
        // struct fuse_getxattr_out
        XattrReply::Size(n) => {
            out.u32(n);
            out.u32(0);
        }
        XattrReply::Data(v) => out.put(&v),
    }
}

/// Directory entries (`fuse_dirent`, or `fuse_direntplus` with an entry
/// in front) into a reply of at most `limit` bytes.
pub(crate) struct Dirents<'o, 'b> {
    pub(crate) out: &'o mut Out<'b>,
    pub(crate) limit: usize,
    pub(crate) used: usize,
}

impl Dirents<'_, '_> {
    fn fits(&self, n: usize) -> bool {
        self.used + n <= self.limit && n <= self.out.remaining()
    }
    fn dirent(&mut self, ino: u64, next: u64, kind: FileKind, name: &OsStr) {
        let name = name.as_bytes();
        let len = 24 + name.len();
        let padded = len.next_multiple_of(8);
        self.out.u64(ino);
        self.out.u64(next);
        self.out.u32(name.len() as u32);
        self.out.u32(kind.mode_bits() >> 12);
        self.out.put(name);
        self.out.zeros(padded - len);
    }
}

impl DirReplier for Dirents<'_, '_> {
    fn add(&mut self, ino: u64, next: u64, kind: FileKind, name: &OsStr) -> bool {
        let n = (24 + name.len()).next_multiple_of(8);
        if !self.fits(n) {
            return true;
        }
        self.dirent(ino, next, kind, name);
        self.used += n;
        false
    }
}

impl DirPlusReplier for Dirents<'_, '_> {
    fn add(&mut self, e: &Entry, next: u64, name: &OsStr) -> bool {
        let n = 128 + (24 + name.len()).next_multiple_of(8);
        if !self.fits(n) {
            return true;
        }
        entry_out(self.out, e);
        self.dirent(e.attr.ino, next, e.attr.kind, name);
        self.used += n;
        false
    }
}

/// The kernel notifications efuse sends, written on the connection's
/// /dev/fuse descriptor (unique 0, the code in the error field).
pub struct Notify {
    dev: Arc<OwnedFd>,
    /// The kernel refused FUSE_NOTIFY_PRUNE (older than 6.18).
    no_prune: AtomicBool,
}

impl Notify {
    /// Notifications over `dev`.
    pub fn new(dev: Arc<OwnedFd>) -> Self {
        Self {
            dev,
            no_prune: AtomicBool::new(false),
        }
    }

    fn send(&self, code: i32, body: &[&[u8]]) -> io::Result<()> {
        let len: usize = abi::OUT_HEADER_LEN + body.iter().map(|b| b.len()).sum::<usize>();
        let mut h = [0u8; abi::OUT_HEADER_LEN];
        h[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        h[4..8].copy_from_slice(&code.to_ne_bytes());
        let mut iov = vec![libc::iovec {
            iov_base: h.as_mut_ptr().cast(),
            iov_len: h.len(),
        }];
        for b in body {
            iov.push(libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: b.len(),
            });
        }
        // SAFETY: every iovec points into a live buffer of its length.
        let n = unsafe { libc::writev(self.dev.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// FUSE_NOTIFY_INVAL_ENTRY. With FUSE_EXPIRE_ONLY (Linux 6.2+) the
    /// dentry stays hashed but must be revalidated by its next user, so a
    /// process whose working directory it is keeps a working getcwd() (a
    /// plain invalidation unhashes it: getcwd then fails with ENOENT, which
    /// broke git in a directory created through the mount). A kernel before
    /// 6.2 ignores the flag and invalidates fully.
    fn entry(&self, parent: u64, name: &OsStr, flags: u32) -> io::Result<()> {
        let name = name.as_bytes();
        // struct fuse_notify_inval_entry_out: parent, namelen, flags; the name and a NUL.
        let mut m = [0u8; 16];
        m[0..8].copy_from_slice(&parent.to_ne_bytes());
        m[8..12].copy_from_slice(&(name.len() as u32).to_ne_bytes());
        m[12..16].copy_from_slice(&flags.to_ne_bytes());
        self.send(abi::notify::INVAL_ENTRY, &[&m, name, &[0]])
    }
}

impl crate::fs::KernelNotifier for Notify {
    fn inval_entry(&self, parent: u64, name: &OsStr) {
        if let Err(e) = self.entry(parent, name, abi::notify::EXPIRE_ONLY) {
            tracing::debug!(parent, ?name, "inval_entry (expire): {e}");
        }
    }
    fn drop_entry(&self, parent: u64, name: &OsStr) {
        if let Err(e) = self.entry(parent, name, 0) {
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
        // struct fuse_notify_inval_inode_out: ino, off, len.
        let mut m = [0u8; 24];
        m[0..8].copy_from_slice(&ino.to_ne_bytes());
        m[8..16].copy_from_slice(&(-1i64).to_ne_bytes());
        if let Err(e) = self.send(abi::notify::INVAL_INODE, &[&m]) {
            tracing::debug!(ino, "inval_inode: {e}");
        }
    }
    fn prune(&self, inodes: &[u64]) -> bool {
        if self.no_prune.load(Ordering::Relaxed) {
            return false;
        }
        // struct fuse_notify_prune_out: count, padding, spare; then the
        // node ids. The kernel takes at most a page of them per message.
        for chunk in inodes.chunks(abi::notify::PRUNE_MAX) {
            let mut m = Vec::with_capacity(16 + chunk.len() * 8);
            m.extend_from_slice(&(chunk.len() as u32).to_ne_bytes());
            m.extend_from_slice(&[0u8; 12]);
            for ino in chunk {
                m.extend_from_slice(&ino.to_ne_bytes());
            }
            if let Err(e) = self.send(abi::notify::PRUNE, &[&m]) {
                tracing::debug!("FUSE_NOTIFY_PRUNE (Linux 6.18+): {e}; dropping entries name by name");
                self.no_prune.store(true, Ordering::Relaxed);
                return false;
            }
        }
        true
    }
}
