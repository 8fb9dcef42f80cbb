//! The FUSE wire codec: requests decoded from kernel bytes with a length
//! check on every field, replies encoded into a caller's buffer.
//!
//! A request reaches efuse in two parts whatever the transport: the fixed
//! per-opcode struct (`in_args[0]`, [`fixed_len`] bytes) and the variable
//! tail (names, data). Over /dev/fuse both follow the in-header in one
//! buffer; over io_uring the fixed part is the ring entry's `op_in` area and
//! the tail its payload buffer. [`decode`] takes the two slices, so one
//! decoder serves both. Decoding never panics: a short, oversized or
//! unknown request is an errno for the kernel.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime};

use super::abi::{self, GETATTR_FH, IN_HEADER_LEN, OUT_HEADER_LEN, fattr, opcode as op};

/// `struct fuse_in_header`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// Length of extensions after the arguments, in units of 8 bytes.
    pub total_extlen: u16,
}

impl InHeader {
    /// Decode from the first [`IN_HEADER_LEN`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Result<Self, i32> {
        let mut r = Reader(b);
        let h = InHeader {
            len: r.u32()?,
            opcode: r.u32()?,
            unique: r.u64()?,
            nodeid: r.u64()?,
            uid: r.u32()?,
            gid: r.u32()?,
            pid: r.u32()?,
            total_extlen: r.u16()?,
        };
        let _pad = r.u16()?;
        Ok(h)
    }
}

/// Size of the fixed struct that opens the request of `opcode`
/// (`in_args[0]`; 0 where the kernel sends a name or nothing first).
pub fn fixed_len(opcode: u32) -> usize {
    match opcode {
        op::FORGET | op::INTERRUPT | op::LINK | op::RENAME => 8,
        op::GETATTR | op::MKNOD | op::RENAME2 | op::FSYNC | op::FSYNCDIR | op::CREATE | op::TMPFILE => 16,
        op::MKDIR | op::OPEN | op::OPENDIR | op::GETXATTR | op::LISTXATTR | op::ACCESS => 8,
        op::SETXATTR | op::BATCH_FORGET => 8,
        op::SETATTR => 88,
        op::READ | op::READDIR | op::READDIRPLUS | op::WRITE => 40,
        op::RELEASE | op::RELEASEDIR | op::FLUSH | op::LSEEK => 24,
        op::IOCTL | op::FALLOCATE => 32,
        op::COPY_FILE_RANGE => 56,
        op::INIT => 64,
        op::POLL => 24,
        _ => 0,
    }
}

/// `struct fuse_init_in` before FUSE 7.36: major, minor, max_readahead, flags.
pub const INIT_IN_MIN: usize = 16;

/// A decoded request. Names borrow from the request buffer.
#[derive(Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Req<'a> {
    Init(InitIn),
    Destroy,
    Lookup {
        name: &'a OsStr,
    },
    Forget {
        nlookup: u64,
    },
    /// `(nodeid, nlookup)` pairs, 16 bytes each.
    BatchForget {
        items: &'a [u8],
    },
    Getattr {
        fh: Option<u64>,
    },
    Setattr(SetattrIn),
    Readlink,
    Symlink {
        name: &'a OsStr,
        target: &'a OsStr,
    },
    Mknod {
        mode: u32,
        rdev: u32,
        umask: u32,
        name: &'a OsStr,
    },
    Mkdir {
        mode: u32,
        umask: u32,
        name: &'a OsStr,
    },
    Unlink {
        name: &'a OsStr,
    },
    Rmdir {
        name: &'a OsStr,
    },
    Rename {
        newdir: u64,
        flags: u32,
        name: &'a OsStr,
        newname: &'a OsStr,
    },
    Link {
        oldnodeid: u64,
        name: &'a OsStr,
    },
    Open {
        flags: u32,
    },
    Read {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Write {
        fh: u64,
        offset: u64,
        data: &'a [u8],
    },
    Statfs,
    Release {
        fh: u64,
    },
    Fsync {
        fh: u64,
        datasync: bool,
    },
    Setxattr {
        flags: i32,
        name: &'a OsStr,
        value: &'a [u8],
    },
    Getxattr {
        size: u32,
        name: &'a OsStr,
    },
    Listxattr {
        size: u32,
    },
    Removexattr {
        name: &'a OsStr,
    },
    Flush {
        fh: u64,
    },
    Opendir,
    Readdir {
        fh: u64,
        offset: u64,
        size: u32,
        plus: bool,
    },
    Releasedir {
        fh: u64,
    },
    Fsyncdir,
    Access {
        mask: u32,
    },
    Create {
        flags: u32,
        mode: u32,
        umask: u32,
        name: &'a OsStr,
    },
    /// O_TMPFILE: an unnamed file in the directory.
    Tmpfile {
        flags: u32,
        mode: u32,
        umask: u32,
    },
    Interrupt {
        unique: u64,
    },
    Ioctl {
        fh: u64,
        /// FUSE_IOCTL_* flags.
        flags: u32,
        cmd: u32,
        /// The argument the kernel copied in (`in_size` bytes).
        data: &'a [u8],
        /// Bytes the kernel copies back out.
        out_size: u32,
    },
    Fallocate {
        fh: u64,
        offset: u64,
        length: u64,
        mode: u32,
    },
    Lseek {
        fh: u64,
        offset: i64,
        whence: u32,
    },
    CopyFileRange {
        fh_in: u64,
        off_in: u64,
        nodeid_out: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    },
    /// An opcode efuse does not serve (answered ENOSYS).
    Unsupported(u32),
}

/// `struct fuse_init_in` (the part efuse reads).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    /// `flags | flags2 << 32` (flags2 only with FUSE_INIT_EXT).
    pub flags: u64,
}

/// `struct fuse_setattr_in`, with the time fields resolved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct SetattrIn {
    pub valid: u32,
    pub fh: u64,
    pub size: u64,
    pub atime: (u64, u32),
    pub mtime: (u64, u32),
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl SetattrIn {
    fn has(&self, bit: u32) -> bool {
        self.valid & bit != 0
    }
    /// The handle, if the kernel named one.
    pub fn fh(&self) -> Option<u64> {
        self.has(fattr::FH).then_some(self.fh)
    }
    #[allow(missing_docs)]
    pub fn mode(&self) -> Option<u32> {
        self.has(fattr::MODE).then_some(self.mode)
    }
    #[allow(missing_docs)]
    pub fn uid(&self) -> Option<u32> {
        self.has(fattr::UID).then_some(self.uid)
    }
    #[allow(missing_docs)]
    pub fn gid(&self) -> Option<u32> {
        self.has(fattr::GID).then_some(self.gid)
    }
    #[allow(missing_docs)]
    pub fn size(&self) -> Option<u64> {
        self.has(fattr::SIZE).then_some(self.size)
    }
    /// New atime: `Some(None)` = now.
    pub fn atime(&self) -> Option<Option<SystemTime>> {
        time_arg(self.valid, fattr::ATIME, fattr::ATIME_NOW, self.atime)
    }
    /// New mtime: `Some(None)` = now.
    pub fn mtime(&self) -> Option<Option<SystemTime>> {
        time_arg(self.valid, fattr::MTIME, fattr::MTIME_NOW, self.mtime)
    }
}

fn time_arg(valid: u32, set: u32, now: u32, (s, ns): (u64, u32)) -> Option<Option<SystemTime>> {
    if valid & now != 0 {
        return Some(None);
    }
    if valid & set == 0 {
        return None;
    }
    Some(Some(crate::unixtime::from_fuse(s, ns)))
}

/// A bounds-checked little reader over a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], i32> {
        if self.0.len() < n {
            return Err(libc::EINVAL);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, i32> {
        Ok(u16::from_ne_bytes(
            self.take(2)?.try_into().map_err(|_| libc::EINVAL)?,
        ))
    }
    fn u32(&mut self) -> Result<u32, i32> {
        Ok(u32::from_ne_bytes(
            self.take(4)?.try_into().map_err(|_| libc::EINVAL)?,
        ))
    }
    fn u64(&mut self) -> Result<u64, i32> {
        Ok(u64::from_ne_bytes(
            self.take(8)?.try_into().map_err(|_| libc::EINVAL)?,
        ))
    }
    fn skip(&mut self, n: usize) -> Result<(), i32> {
        self.take(n).map(|_| ())
    }
    /// A NUL-terminated name: not empty, at most 255 bytes (NAME_MAX)
    /// for names, at most 4095 for symlink targets.
    fn cstr(&mut self, max: usize) -> Result<&'a OsStr, i32> {
        let end = self.0.iter().position(|&c| c == 0).ok_or(libc::EINVAL)?;
        let s = &self.0[..end];
        self.0 = &self.0[end + 1..];
        if s.len() > max {
            return Err(libc::ENAMETOOLONG);
        }
        Ok(OsStr::from_bytes(s))
    }
    fn name(&mut self) -> Result<&'a OsStr, i32> {
        let n = self.cstr(255)?;
        if n.is_empty() {
            return Err(libc::EINVAL);
        }
        Ok(n)
    }
}

/// A request split into header, fixed part and tail.
pub type Split<'a> = (InHeader, &'a [u8], &'a [u8]);

/// Split a /dev/fuse request (header included) into header, fixed part
/// and tail, checking the lengths the header claims against what was read.
/// On error, the header as far as it was read, and the errno.
pub fn split(buf: &[u8]) -> Result<Split<'_>, (InHeader, i32)> {
    let h = InHeader::parse(buf).map_err(|e| (InHeader::default(), e))?;
    let len = h.len as usize;
    if len < IN_HEADER_LEN || len > buf.len() {
        return Err((h, libc::EINVAL));
    }
    let ext = h.total_extlen as usize * 8;
    let body = &buf[IN_HEADER_LEN..len];
    if ext > body.len() {
        return Err((h, libc::EINVAL));
    }
    let body = &body[..body.len() - ext];
    let fixed = fixed_len(h.opcode).min(body.len());
    let (a, b) = body.split_at(fixed);
    Ok((h, a, b))
}

/// Split an io_uring request: the header from the entry's in/out area, the
/// fixed part from its `op_in` area, the tail from the first `payload_sz`
/// bytes of its payload buffer. The same checks as [`split`]: the header's
/// length covers the header and the payload, the payload fits its buffer
/// (no clamping: a kernel that claims more is answered EINVAL), and the
/// extensions lie within the payload (they are cut off, as over /dev/fuse).
pub fn split_uring<'a>(
    in_out: &'a [u8],
    op_in: &'a [u8],
    payload_sz: usize,
    payload: &'a [u8],
) -> Result<Split<'a>, (InHeader, i32)> {
    let h = InHeader::parse(in_out).map_err(|e| (InHeader::default(), e))?;
    let len = h.len as usize;
    if payload_sz > payload.len() || len < IN_HEADER_LEN || len - IN_HEADER_LEN < payload_sz {
        return Err((h, libc::EINVAL));
    }
    let ext = h.total_extlen as usize * 8;
    if ext > payload_sz {
        return Err((h, libc::EINVAL));
    }
    let fixed = &op_in[..fixed_len(h.opcode).min(op_in.len())];
    Ok((h, fixed, &payload[..payload_sz - ext]))
}

/// Decode request `opcode` from its fixed part and tail.
pub fn decode<'a>(opcode: u32, fixed: &'a [u8], tail: &'a [u8]) -> Result<Req<'a>, i32> {
    // FUSE_INIT's fixed part grew from 16 bytes (major, minor, readahead,
    // flags; up to 7.35) to 64 (flags2 and padding, 7.36): an old kernel's
    // must still decode, so that the version check names what is needed.
    let need = match opcode {
        op::INIT => fixed.len().clamp(INIT_IN_MIN, fixed_len(op::INIT)),
        _ => fixed_len(opcode),
    };
    if fixed.len() < need {
        return Err(libc::EINVAL);
    }
    let mut f = Reader(&fixed[..need]);
    let mut t = Reader(tail);
    Ok(match opcode {
        op::INIT => {
            let major = f.u32()?;
            let minor = f.u32()?;
            let max_readahead = f.u32()?;
            let lo = f.u32()? as u64;
            let hi = if need >= 20 { f.u32()? as u64 } else { 0 };
            let flags = if lo & abi::init::INIT_EXT != 0 {
                lo | hi << 32
            } else {
                lo
            };
            Req::Init(InitIn {
                major,
                minor,
                max_readahead,
                flags,
            })
        }
        op::DESTROY => Req::Destroy,
        op::LOOKUP => Req::Lookup { name: t.name()? },
        op::FORGET => Req::Forget { nlookup: f.u64()? },
        op::BATCH_FORGET => {
            let count = f.u32()? as usize;
            let items = t.take(count.checked_mul(16).ok_or(libc::EINVAL)?)?;
            Req::BatchForget { items }
        }
        op::GETATTR => {
            let flags = f.u32()?;
            f.skip(4)?;
            let fh = f.u64()?;
            Req::Getattr {
                fh: (flags & GETATTR_FH != 0).then_some(fh),
            }
        }
        op::SETATTR => {
            let valid = f.u32()?;
            f.skip(4)?;
            let fh = f.u64()?;
            let size = f.u64()?;
            let _lock_owner = f.u64()?;
            let atime = f.u64()?;
            let mtime = f.u64()?;
            let _ctime = f.u64()?;
            let atimensec = f.u32()?;
            let mtimensec = f.u32()?;
            let _ctimensec = f.u32()?;
            let mode = f.u32()?;
            f.skip(4)?;
            let uid = f.u32()?;
            let gid = f.u32()?;
            Req::Setattr(SetattrIn {
                valid,
                fh,
                size,
                atime: (atime, atimensec),
                mtime: (mtime, mtimensec),
                mode,
                uid,
                gid,
            })
        }
        op::READLINK => Req::Readlink,
        op::SYMLINK => {
            let name = t.name()?;
            let target = t.cstr(4095)?;
            if target.is_empty() {
                return Err(libc::ENOENT);
            }
            Req::Symlink { name, target }
        }
        op::MKNOD => {
            let mode = f.u32()?;
            let rdev = f.u32()?;
            let umask = f.u32()?;
            Req::Mknod {
                mode,
                rdev,
                umask,
                name: t.name()?,
            }
        }
        op::MKDIR => {
            let mode = f.u32()?;
            let umask = f.u32()?;
            Req::Mkdir {
                mode,
                umask,
                name: t.name()?,
            }
        }
        op::UNLINK => Req::Unlink { name: t.name()? },
        op::RMDIR => Req::Rmdir { name: t.name()? },
        op::RENAME | op::RENAME2 => {
            let newdir = f.u64()?;
            let flags = if opcode == op::RENAME2 { f.u32()? } else { 0 };
            let name = t.name()?;
            let newname = t.name()?;
            Req::Rename {
                newdir,
                flags,
                name,
                newname,
            }
        }
        op::LINK => {
            let oldnodeid = f.u64()?;
            Req::Link {
                oldnodeid,
                name: t.name()?,
            }
        }
        op::OPEN => Req::Open { flags: f.u32()? },
        op::OPENDIR => Req::Opendir,
        op::READ | op::READDIR | op::READDIRPLUS => {
            let fh = f.u64()?;
            let offset = f.u64()?;
            let size = f.u32()?.min(abi::MAX_WRITE);
            match opcode {
                op::READ => Req::Read { fh, offset, size },
                _ => Req::Readdir {
                    fh,
                    offset,
                    size,
                    plus: opcode == op::READDIRPLUS,
                },
            }
        }
        op::WRITE => {
            let fh = f.u64()?;
            let offset = f.u64()?;
            let size = f.u32()? as usize;
            if size > abi::MAX_WRITE as usize {
                return Err(libc::EINVAL);
            }
            Req::Write {
                fh,
                offset,
                data: t.take(size)?,
            }
        }
        op::STATFS => Req::Statfs,
        op::RELEASE => Req::Release { fh: f.u64()? },
        op::RELEASEDIR => Req::Releasedir { fh: f.u64()? },
        op::FSYNC => {
            let fh = f.u64()?;
            Req::Fsync {
                fh,
                datasync: f.u32()? & 1 != 0,
            }
        }
        op::FSYNCDIR => Req::Fsyncdir,
        op::SETXATTR => {
            let size = f.u32()? as usize;
            let flags = f.u32()? as i32;
            let name = t.name()?;
            if size > 64 * 1024 {
                return Err(libc::E2BIG);
            }
            Req::Setxattr {
                flags,
                name,
                value: t.take(size)?,
            }
        }
        op::GETXATTR => {
            let size = f.u32()?;
            Req::Getxattr {
                size,
                name: t.name()?,
            }
        }
        op::LISTXATTR => Req::Listxattr { size: f.u32()? },
        op::REMOVEXATTR => Req::Removexattr { name: t.name()? },
        op::FLUSH => Req::Flush { fh: f.u64()? },
        op::ACCESS => Req::Access { mask: f.u32()? },
        op::CREATE => {
            let flags = f.u32()?;
            let mode = f.u32()?;
            let umask = f.u32()?;
            Req::Create {
                flags,
                mode,
                umask,
                name: t.name()?,
            }
        }
        op::TMPFILE => {
            // The name that follows is the VFS's placeholder ("/"): unused.
            let flags = f.u32()?;
            let mode = f.u32()?;
            Req::Tmpfile {
                flags,
                mode,
                umask: f.u32()?,
            }
        }
        op::INTERRUPT => Req::Interrupt { unique: f.u64()? },
        op::IOCTL => {
            let fh = f.u64()?;
            let flags = f.u32()?;
            let cmd = f.u32()?;
            let _arg = f.u64()?;
            let in_size = f.u32()? as usize;
            let out_size = f.u32()?;
            Req::Ioctl {
                fh,
                flags,
                cmd,
                data: t.take(in_size)?,
                out_size,
            }
        }
        op::FALLOCATE => {
            let fh = f.u64()?;
            let offset = f.u64()?;
            let length = f.u64()?;
            Req::Fallocate {
                fh,
                offset,
                length,
                mode: f.u32()?,
            }
        }
        op::LSEEK => {
            let fh = f.u64()?;
            let offset = f.u64()? as i64;
            Req::Lseek {
                fh,
                offset,
                whence: f.u32()?,
            }
        }
        op::COPY_FILE_RANGE => Req::CopyFileRange {
            fh_in: f.u64()?,
            off_in: f.u64()?,
            nodeid_out: f.u64()?,
            fh_out: f.u64()?,
            off_out: f.u64()?,
            len: f.u64()?,
        },
        other => Req::Unsupported(other),
    })
}

/// A reply body being encoded into a caller's buffer (the transport adds
/// the out-header). Writes past the end fail the reply with EIO rather
/// than truncate it.
pub struct Out<'b> {
    buf: &'b mut [u8],
    len: usize,
    overflow: bool,
}

impl<'b> Out<'b> {
    /// An empty body over `buf`.
    pub fn new(buf: &'b mut [u8]) -> Self {
        Self {
            buf,
            len: 0,
            overflow: false,
        }
    }
    /// Bytes encoded so far.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Nothing encoded.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Room left.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.len
    }
    /// A write did not fit.
    pub fn overflowed(&self) -> bool {
        self.overflow
    }
    /// Forget what was encoded.
    pub fn clear(&mut self) {
        self.len = 0;
        self.overflow = false;
    }
    /// The encoded body.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
    /// Append `b`.
    pub fn put(&mut self, b: &[u8]) {
        match self.buf.get_mut(self.len..self.len + b.len()) {
            Some(dst) => {
                dst.copy_from_slice(b);
                self.len += b.len();
            }
            None => self.overflow = true,
        }
    }
    #[allow(missing_docs)]
    pub fn u32(&mut self, v: u32) {
        self.put(&v.to_ne_bytes());
    }
    #[allow(missing_docs)]
    pub fn u64(&mut self, v: u64) {
        self.put(&v.to_ne_bytes());
    }
    /// `n` zero bytes.
    pub fn zeros(&mut self, n: usize) {
        const Z: [u8; 64] = [0; 64];
        let mut n = n;
        while n > 0 {
            let k = n.min(Z.len());
            self.put(&Z[..k]);
            n -= k;
        }
    }
    /// Up to `max` bytes to fill in place (for READ data); commit with
    /// [`Out::advance`].
    pub fn spare(&mut self, max: usize) -> &mut [u8] {
        let end = (self.len + max).min(self.buf.len());
        &mut self.buf[self.len..end]
    }
    /// Take `n` bytes filled through [`Out::spare`].
    pub fn advance(&mut self, n: usize) {
        self.len = (self.len + n).min(self.buf.len());
    }
}

/// Split a duration into FUSE's (seconds, nanoseconds).
pub fn ttl(d: Duration) -> (u64, u32) {
    (d.as_secs(), d.subsec_nanos())
}

/// A time as FUSE's (seconds since the epoch, nanoseconds); before the
/// epoch as a negative seconds count in two's complement.
pub fn time(t: SystemTime) -> (u64, u32) {
    crate::unixtime::to_fuse(t)
}

/// The kernel's `struct fuse_attr` for attributes with a FUSE inode number.
pub fn fuse_attr(a: &crate::backend::Attr) -> efuse_common::ops::FuseAttr {
    let (atime, atimensec) = time(a.atime);
    let (mtime, mtimensec) = time(a.mtime);
    let (ctime, ctimensec) = time(a.ctime);
    efuse_common::ops::FuseAttr {
        ino: a.ino,
        size: a.size,
        blocks: a.blocks,
        atime,
        mtime,
        ctime,
        atimensec,
        mtimensec,
        ctimensec,
        mode: a.kind.mode_bits() | u32::from(a.perm),
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

/// The out-header for a reply of `body` bytes (error 0) or an errno.
pub fn out_header(unique: u64, error: i32, body: usize) -> [u8; OUT_HEADER_LEN] {
    let mut h = [0u8; OUT_HEADER_LEN];
    h[0..4].copy_from_slice(&((OUT_HEADER_LEN + body) as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&(-error).to_ne_bytes());
    h[8..16].copy_from_slice(&unique.to_ne_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn header(opcode: u32, body: usize) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((IN_HEADER_LEN + body) as u32).to_ne_bytes());
        v.extend_from_slice(&opcode.to_ne_bytes());
        v.extend_from_slice(&7u64.to_ne_bytes());
        v.extend_from_slice(&1u64.to_ne_bytes());
        v.extend_from_slice(&[0u8; 16]);
        v
    }

    fn request(opcode: u32, body: &[u8]) -> Vec<u8> {
        let mut v = header(opcode, body.len());
        v.extend_from_slice(body);
        v
    }

    fn decoded(buf: &[u8]) -> Result<Req<'_>, i32> {
        let (h, a, b) = split(buf).map_err(|(_, e)| e)?;
        decode(h.opcode, a, b)
    }

    #[test]
    fn lookup_name_is_decoded() {
        let r = request(op::LOOKUP, b"abc\0");
        assert_eq!(
            decoded(&r),
            Ok(Req::Lookup {
                name: OsStr::new("abc")
            })
        );
    }

    #[test]
    fn a_short_header_is_refused() {
        for n in 0..IN_HEADER_LEN {
            assert!(split(&request(op::LOOKUP, b"a\0")[..n]).is_err(), "{n} bytes");
        }
    }

    #[test]
    fn a_length_beyond_the_buffer_is_refused() {
        let mut r = request(op::LOOKUP, b"a\0");
        r[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(split(&r).map(|_| ()).map_err(|(_, e)| e), Err(libc::EINVAL));
        r[0..4].copy_from_slice(&10u32.to_ne_bytes());
        assert_eq!(split(&r).map(|_| ()).map_err(|(_, e)| e), Err(libc::EINVAL));
    }

    #[test]
    fn every_truncation_of_every_request_is_an_errno_not_a_panic() {
        let mut bodies: Vec<(u32, Vec<u8>)> = Vec::new();
        for opcode in 0..64 {
            let mut b = vec![0x41u8; fixed_len(opcode)];
            if opcode == op::WRITE {
                b[16..20].copy_from_slice(&4u32.to_ne_bytes());
            }
            if opcode == op::SETXATTR {
                b[0..4].copy_from_slice(&4u32.to_ne_bytes());
            }
            if opcode == op::BATCH_FORGET {
                b[0..4].copy_from_slice(&1u32.to_ne_bytes());
            }
            b.extend_from_slice(b"name\0target\0datadatadatadatadata");
            bodies.push((opcode, b));
        }
        for (opcode, body) in bodies {
            let full = request(opcode, &body);
            for cut in 0..=full.len() {
                let mut r = full[..cut].to_vec();
                if r.len() >= 4 {
                    r[0..4].copy_from_slice(&(cut as u32).to_ne_bytes());
                }
                let _ = decoded(&r);
            }
            // Random garbage in the fixed part.
            let mut r = full.clone();
            for (i, b) in r.iter_mut().enumerate().skip(IN_HEADER_LEN) {
                *b = (i * 151 % 256) as u8;
            }
            let _ = decoded(&r);
        }
    }

    #[test]
    fn a_name_without_nul_or_too_long_is_refused() {
        assert_eq!(decoded(&request(op::LOOKUP, b"abc")), Err(libc::EINVAL));
        let mut long = vec![b'x'; 256];
        long.push(0);
        assert_eq!(decoded(&request(op::LOOKUP, &long)), Err(libc::ENAMETOOLONG));
        assert_eq!(decoded(&request(op::LOOKUP, b"\0")), Err(libc::EINVAL));
    }

    #[test]
    fn an_oversized_write_is_refused() {
        let mut b = vec![0u8; 40];
        b[16..20].copy_from_slice(&(abi::MAX_WRITE + 1).to_ne_bytes());
        assert_eq!(decoded(&request(op::WRITE, &b)), Err(libc::EINVAL));
        // A size larger than the data that came.
        b[16..20].copy_from_slice(&100u32.to_ne_bytes());
        b.extend_from_slice(&[1; 99]);
        assert_eq!(decoded(&request(op::WRITE, &b)), Err(libc::EINVAL));
        b.push(1);
        assert!(matches!(decoded(&request(op::WRITE, &b)), Ok(Req::Write { data, .. }) if data.len() == 100));
    }

    #[test]
    fn unknown_opcodes_are_unsupported_not_errors() {
        assert_eq!(decoded(&request(9999, b"xyz")), Ok(Req::Unsupported(9999)));
        assert_eq!(
            decoded(&request(op::STATX, &[0; 24])),
            Ok(Req::Unsupported(op::STATX))
        );
    }

    #[test]
    fn extensions_are_cut_off_the_tail() {
        let mut r = request(op::LOOKUP, b"abc\0\0\0\0\0xxxxxxxx");
        r[36..38].copy_from_slice(&1u16.to_ne_bytes());
        assert_eq!(
            decoded(&r),
            Ok(Req::Lookup {
                name: OsStr::new("abc")
            })
        );
        r[36..38].copy_from_slice(&9u16.to_ne_bytes());
        assert!(decoded(&r).is_err());
    }

    #[test]
    fn setattr_times_and_now() {
        let mut b = vec![0u8; 88];
        b[0..4].copy_from_slice(&(fattr::ATIME | fattr::MTIME_NOW | fattr::SIZE).to_ne_bytes());
        b[16..24].copy_from_slice(&5u64.to_ne_bytes());
        b[32..40].copy_from_slice(&(-2i64 as u64).to_ne_bytes());
        b[56..60].copy_from_slice(&500u32.to_ne_bytes());
        let Ok(Req::Setattr(s)) = decoded(&request(op::SETATTR, &b)) else {
            panic!()
        };
        assert_eq!(s.size(), Some(5));
        assert_eq!(s.mtime(), Some(None));
        assert_eq!(
            s.atime(),
            Some(Some(
                UNIX_EPOCH - Duration::from_secs(2) + Duration::from_nanos(500)
            ))
        );
        assert_eq!(s.mode(), None);
        assert_eq!(
            time(UNIX_EPOCH - Duration::from_secs(2) + Duration::from_nanos(500)),
            (-2i64 as u64, 500)
        );
    }

    #[test]
    fn setattr_at_the_ends_of_time_does_not_panic() {
        for secs in [i64::MIN, i64::MIN + 1, -1, i64::MAX] {
            let mut b = vec![0u8; 88];
            b[0..4].copy_from_slice(&(fattr::ATIME | fattr::MTIME).to_ne_bytes());
            b[32..40].copy_from_slice(&(secs as u64).to_ne_bytes());
            b[40..48].copy_from_slice(&(secs as u64).to_ne_bytes());
            b[56..60].copy_from_slice(&u32::MAX.to_ne_bytes());
            let Ok(Req::Setattr(s)) = decoded(&request(op::SETATTR, &b)) else {
                panic!()
            };
            let t = s.atime().unwrap().unwrap();
            // Back on the wire as the same seconds (nanoseconds clamped).
            assert_eq!(time(t).0, secs as u64, "{secs}");
        }
    }

    /// An io_uring entry: in/out header area, op_in area, payload.
    fn uring_entry(opcode: u32, len: usize, extlen: u16, op_in: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut h = Vec::new();
        h.extend_from_slice(&(len as u32).to_ne_bytes());
        h.extend_from_slice(&opcode.to_ne_bytes());
        h.extend_from_slice(&9u64.to_ne_bytes());
        h.extend_from_slice(&1u64.to_ne_bytes());
        h.extend_from_slice(&[0u8; 12]);
        h.extend_from_slice(&extlen.to_ne_bytes());
        h.extend_from_slice(&[0u8; 2]);
        let mut o = op_in.to_vec();
        o.resize(128, 0);
        (h, o)
    }

    #[test]
    fn io_uring_requests_get_the_same_length_checks() {
        let mut payload = vec![0u8; 64];
        payload[..4].copy_from_slice(b"abc\0");
        // Well formed: 40-byte header + a 4-byte name.
        let (h, o) = uring_entry(op::LOOKUP, IN_HEADER_LEN + 4, 0, &[]);
        let (hd, fixed, tail) = split_uring(&h, &o, 4, &payload).unwrap();
        assert_eq!((hd.unique, fixed.len(), tail), (9, 0, &b"abc\0"[..]));
        assert_eq!(
            decode(hd.opcode, fixed, tail),
            Ok(Req::Lookup {
                name: OsStr::new("abc")
            })
        );
        // A payload size beyond the buffer is refused, not clamped.
        assert_eq!(split_uring(&h, &o, 65, &payload).unwrap_err().1, libc::EINVAL);
        // A header length that does not cover the payload, or the header.
        let (h2, _) = uring_entry(op::LOOKUP, IN_HEADER_LEN + 2, 0, &[]);
        assert_eq!(split_uring(&h2, &o, 4, &payload).unwrap_err().1, libc::EINVAL);
        let (h3, _) = uring_entry(op::LOOKUP, 8, 0, &[]);
        assert_eq!(split_uring(&h3, &o, 0, &payload).unwrap_err().1, libc::EINVAL);
        // Extensions beyond the payload are refused; within it, cut off.
        let (h4, _) = uring_entry(op::LOOKUP, IN_HEADER_LEN + 12, 2, &[]);
        assert_eq!(split_uring(&h4, &o, 12, &payload).unwrap_err().1, libc::EINVAL);
        let (h5, _) = uring_entry(op::LOOKUP, IN_HEADER_LEN + 12, 1, &[]);
        assert_eq!(split_uring(&h5, &o, 12, &payload).unwrap().2, &payload[..4]);
        // A short header area.
        assert!(split_uring(&h[..20], &o, 0, &payload).is_err());
    }

    #[test]
    fn init_of_a_kernel_before_7_36_decodes() {
        // FUSE 7.31-7.35 send a 16-byte fuse_init_in.
        let mut b = Vec::new();
        for v in [7u32, 31, 131072, 0x1] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        let Ok(Req::Init(i)) = decoded(&request(op::INIT, &b)) else {
            panic!("16-byte INIT refused")
        };
        assert_eq!((i.major, i.minor, i.flags), (7, 31, 1));
        // Shorter than that is malformed.
        assert_eq!(decoded(&request(op::INIT, &b[..12])), Err(libc::EINVAL));
    }

    #[test]
    fn out_refuses_to_overflow() {
        let mut buf = [0u8; 8];
        let mut o = Out::new(&mut buf);
        o.u64(1);
        assert!(!o.overflowed());
        o.u32(2);
        assert!(o.overflowed());
        assert_eq!(o.len(), 8);
    }
}
