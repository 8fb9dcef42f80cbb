//! The FUSE kernel ABI as efuse speaks it (`include/uapi/linux/fuse.h`):
//! opcodes, flags, and the sizes of the fixed structs. Values are read and
//! written field by field in native byte order by [`super::wire`]; nothing
//! here is cast from raw bytes.

/// Protocol major version.
pub const KERNEL_VERSION: u32 = 7;
/// The newest minor version efuse knows (7.42: FUSE_OVER_IO_URING).
pub const KERNEL_MINOR_VERSION: u32 = 42;
/// The oldest minor version efuse serves (Linux 5.10 speaks 7.32).
pub const MIN_MINOR_VERSION: u32 = 31;

/// Size of `struct fuse_in_header`.
pub const IN_HEADER_LEN: usize = 40;
/// Size of `struct fuse_out_header`.
pub const OUT_HEADER_LEN: usize = 16;

/// Largest WRITE efuse accepts (and READ it serves), in bytes.
pub const MAX_WRITE: u32 = 1 << 20;
/// `max_pages` asked for in INIT: MAX_WRITE in 4 KiB pages.
pub const MAX_PAGES: u16 = (MAX_WRITE / 4096) as u16;
/// A buffer that holds any request (the kernel refuses a smaller read:
/// in header + write header + max_write).
pub const REQUEST_BUF_LEN: usize = MAX_WRITE as usize + 4096;

#[allow(missing_docs)]
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const GETLK: u32 = 31;
    pub const SETLK: u32 = 32;
    pub const SETLKW: u32 = 33;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const BMAP: u32 = 37;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const POLL: u32 = 40;
    pub const NOTIFY_REPLY: u32 = 41;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const SYNCFS: u32 = 50;
    pub const TMPFILE: u32 = 51;
    pub const STATX: u32 = 52;

    /// Requests the kernel expects no reply to, not even an error.
    pub fn no_reply(op: u32) -> bool {
        matches!(op, FORGET | BATCH_FORGET)
    }
}

/// FUSE_INIT flags (`flags | flags2 << 32`).
#[allow(missing_docs)]
pub mod init {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const ATOMIC_O_TRUNC: u64 = 1 << 3;
    pub const EXPORT_SUPPORT: u64 = 1 << 4;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const DONT_MASK: u64 = 1 << 6;
    pub const AUTO_INVAL_DATA: u64 = 1 << 12;
    pub const DO_READDIRPLUS: u64 = 1 << 13;
    pub const WRITEBACK_CACHE: u64 = 1 << 16;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const POSIX_ACL: u64 = 1 << 20;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const CACHE_SYMLINKS: u64 = 1 << 23;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const HAS_EXPIRE_ONLY: u64 = 1 << 35;
    pub const PASSTHROUGH: u64 = 1 << 37;
    pub const OVER_IO_URING: u64 = 1 << 41;
}

/// Open reply flags.
#[allow(missing_docs)]
pub mod fopen {
    pub const KEEP_CACHE: u32 = 1 << 1;
    pub const CACHE_DIR: u32 = 1 << 3;
    pub const NOFLUSH: u32 = 1 << 5;
    pub const PASSTHROUGH: u32 = 1 << 7;
}

/// SETATTR `valid` bits.
#[allow(missing_docs)]
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
}

/// Notification codes (the `error` field of a unique-0 message).
#[allow(missing_docs)]
pub mod notify {
    pub const INVAL_INODE: i32 = 2;
    pub const INVAL_ENTRY: i32 = 3;
    /// Drop unused dentries of the listed inodes (Linux 6.18+).
    pub const PRUNE: i32 = 9;
    /// Node ids per PRUNE message.
    pub const PRUNE_MAX: usize = 256;
    /// Flag of INVAL_ENTRY (Linux 6.2+).
    pub const EXPIRE_ONLY: u32 = 1;
}

/// GETATTR flag: `fh` is valid.
pub const GETATTR_FH: u32 = 1;

/// `ioctl(/dev/fuse)` requests.
#[allow(missing_docs)]
pub mod ioc {
    /// _IOW(229, 1, struct fuse_backing_map)
    pub const BACKING_OPEN: libc::c_ulong = 0x4010_e501;
    /// _IOW(229, 2, uint32_t)
    pub const BACKING_CLOSE: libc::c_ulong = 0x4004_e502;
}

/// FUSE-over-io_uring (ABI 7.42, Linux 6.14+).
#[allow(missing_docs)]
pub mod uring {
    /// `fuse_uring_req_header`: in/out header area, op header area, and
    /// `fuse_uring_ent_in_out`.
    pub const IN_OUT_HEADER_SZ: usize = 128;
    pub const OP_IN_OUT_SZ: usize = 128;
    pub const ENT_IN_OUT_SZ: usize = 32;
    pub const REQ_HEADER_SZ: usize = IN_OUT_HEADER_SZ + OP_IN_OUT_SZ + ENT_IN_OUT_SZ;
    pub const CMD_REGISTER: u32 = 1;
    pub const CMD_COMMIT_AND_FETCH: u32 = 2;
}
