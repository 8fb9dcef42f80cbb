//! Types shared between the efuse BPF programs (`efuse-ebpf`) and the daemon.
//!
//! Everything here is `#[repr(C)]`, `Copy`, made of fixed-width integers and
//! free of hidden padding, so both sides agree on the byte layout. The daemon
//! turns on the `user` feature to get `aya::Pod` impls for the map types.
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]

/// Tracing of FUSE requests through the `fuse:fuse_request_send` and
/// `fuse:fuse_request_end` tracepoints.
pub mod trace {
    /// Map: in-flight requests, [`ReqKey`] -> [`ReqStart`].
    pub const MAP_INFLIGHT: &str = "EFUSE_INFLIGHT";
    /// Map: per-CPU statistics, [`OpKey`] -> [`OpStats`].
    pub const MAP_OPSTATS: &str = "EFUSE_OPSTATS";
    /// Map: ring buffer of [`TraceEvent`]s.
    pub const MAP_EVENTS: &str = "EFUSE_EVENTS";
    /// Map: one-slot array of [`TraceConfig`], written by the daemon.
    pub const MAP_CONFIG: &str = "EFUSE_TRACE_CONFIG";
    /// Map: one-slot per-CPU array of `u64`: events dropped because the ring was full.
    pub const MAP_DROPPED: &str = "EFUSE_DROPPED";

    /// Program names (the Rust function names in efuse-ebpf).
    pub const PROG_SEND: &str = "fuse_request_send";
    /// See [`PROG_SEND`].
    pub const PROG_END: &str = "fuse_request_end";

    /// Number of log2 latency buckets: bucket `i` holds latencies in
    /// `[2^i, 2^(i+1))` ns; the last one holds everything above.
    pub const HIST_SLOTS: usize = 40;
    /// Opcodes at or above this are folded into slot `OPCODE_OTHER`.
    pub const MAX_OPCODE: u32 = 64;
    /// Size of the in-flight map.
    pub const INFLIGHT_ENTRIES: u32 = 16384;
    /// Size of the statistics map (connections x opcodes).
    pub const OPSTATS_ENTRIES: u32 = 4096;
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub const EVENTS_BYTES: u32 = 256 * 1024;

    /// Event kinds carried by the ring buffer.
    pub const EVENT_SLOW: u32 = 1;
    /// A request that finished with an error.
    pub const EVENT_ERROR: u32 = 2;

    /// Offsets of the tracepoint fields, read from
    /// `/sys/kernel/tracing/events/fuse/*/format` and checked at load time.
    pub mod layout {
        /// `fuse_request_send`: `dev_t connection`.
        pub const SEND_CONNECTION: usize = 8;
        /// `fuse_request_send`: `uint64_t unique`.
        pub const SEND_UNIQUE: usize = 16;
        /// `fuse_request_send`: `enum fuse_opcode opcode`.
        pub const SEND_OPCODE: usize = 24;
        /// `fuse_request_end`: `dev_t connection`.
        pub const END_CONNECTION: usize = 8;
        /// `fuse_request_end`: `uint64_t unique`.
        pub const END_UNIQUE: usize = 16;
        /// `fuse_request_end`: `int32_t error`.
        pub const END_ERROR: usize = 28;
    }

    /// Key of an in-flight request.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ReqKey {
        /// FUSE connection (kernel `dev_t` of the mount).
        pub dev: u32,
        /// Padding, always zero.
        pub _pad: u32,
        /// Request id.
        pub unique: u64,
    }

    /// Start of an in-flight request.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ReqStart {
        /// `bpf_ktime_get_ns()` at send.
        pub ts: u64,
        /// FUSE opcode.
        pub opcode: u32,
        /// Padding, always zero.
        pub _pad: u32,
    }

    /// Key of the statistics map.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct OpKey {
        /// FUSE connection (kernel `dev_t`).
        pub dev: u32,
        /// FUSE opcode, or [`MAX_OPCODE`] for anything larger.
        pub opcode: u32,
    }

    /// Per-CPU statistics of one (connection, opcode).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct OpStats {
        /// Requests sent to the daemon.
        pub sent: u64,
        /// Requests answered (or aborted).
        pub done: u64,
        /// Answers with a non-zero error.
        pub errors: u64,
        /// Sum of latencies in ns, over `done` requests with a known start.
        pub total_ns: u64,
        /// Largest latency in ns.
        pub max_ns: u64,
        /// log2 histogram of latencies in ns.
        pub hist: [u64; HIST_SLOTS],
    }

    impl Default for OpStats {
        fn default() -> Self {
            Self {
                sent: 0,
                done: 0,
                errors: 0,
                total_ns: 0,
                max_ns: 0,
                hist: [0; HIST_SLOTS],
            }
        }
    }

    /// Configuration the daemon writes after mounting.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct TraceConfig {
        /// Only count this connection; 0 = every connection (used until the
        /// daemon knows its own, so that FUSE_INIT is seen).
        pub dev: u32,
        /// Non-zero: emit [`EVENT_ERROR`] events.
        pub emit_errors: u32,
        /// Emit [`EVENT_SLOW`] for requests slower than this; 0 = never.
        pub slow_ns: u64,
    }

    /// One event in the ring buffer.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct TraceEvent {
        /// [`EVENT_SLOW`] or [`EVENT_ERROR`].
        pub kind: u32,
        /// FUSE connection.
        pub dev: u32,
        /// Request id.
        pub unique: u64,
        /// Latency in ns.
        pub latency_ns: u64,
        /// FUSE opcode.
        pub opcode: u32,
        /// Error the daemon returned (negative errno) or 0.
        pub error: i32,
    }

    /// Index of the histogram bucket for a latency: floor(log2(ns)).
    #[inline(always)]
    pub fn hist_slot(ns: u64) -> usize {
        if ns == 0 {
            return 0;
        }
        let slot = 63 - ns.leading_zeros() as usize;
        if slot >= HIST_SLOTS { HIST_SLOTS - 1 } else { slot }
    }
}

/// The `bpf` offload tier: struct_ops programs (`fuse_bpf_ops`, efuse's
/// kernel patch) that answer FUSE LOOKUP and GETATTR from maps the daemon
/// fills. The layouts of [`NameKey`], [`FuseEntryOut`] and [`FuseAttrOut`]
/// are the kernel's (`struct fuse_bpf_lookup_args`, `struct
/// fuse_entry_out`, `struct fuse_attr_out`).
pub mod ops {
    /// Map: `(parent, name)` [`NameKey`] -> [`EntryValue`].
    pub const MAP_ENTRIES: &str = "EFUSE_ENTRIES";
    /// Map: nodeid `u64` -> [`AttrValue`].
    pub const MAP_ATTRS: &str = "EFUSE_ATTRS";
    /// Map: nodeid `u64` -> `u64` lookups answered by BPF (the kernel's
    /// lookup count grew by this much without the daemon seeing it).
    pub const MAP_LOOKUPS: &str = "EFUSE_LOOKUPS";
    /// Map: ring buffer of [`MissEvent`]s.
    pub const MAP_MISSES: &str = "EFUSE_MISSES";
    /// Map: per-CPU array of `u64` counters, indexed by the `CTR_*` constants.
    pub const MAP_COUNTERS: &str = "EFUSE_OPS_COUNTERS";
    /// Map: nodeid `u64` -> [`OpenValue`]: how to answer a read-only open.
    pub const MAP_OPENS: &str = "EFUSE_OPENS";
    /// Map: nodeid `u64` -> [`NoXattr`]: the inode has no extended
    /// attributes at all, and what asking for one gives.
    pub const MAP_NOXATTR: &str = "EFUSE_NOXATTR";

    /// Program answering LOOKUP (member `lookup` of `fuse_bpf_ops`).
    pub const PROG_LOOKUP: &str = "efuse_lookup";
    /// Program answering GETATTR (member `getattr` of `fuse_bpf_ops`).
    pub const PROG_GETATTR: &str = "efuse_getattr";
    /// Program answering read-only OPEN (member `open`).
    pub const PROG_OPEN: &str = "efuse_open";
    /// Program failing terminal IOCTLs (member `ioctl`).
    pub const PROG_IOCTL: &str = "efuse_ioctl";
    /// Program answering GETXATTR of absent attributes (member `getxattr`).
    pub const PROG_GETXATTR: &str = "efuse_getxattr";

    /// Size of the name buffer (the kernel's `FUSE_BPF_NAME_MAX`): names
    /// up to 255 bytes, NUL-padded.
    pub const NAME_MAX: usize = 256;

    /// Default sizes of the maps (configurable per mount).
    pub const DEFAULT_ENTRIES: u32 = 65_536;
    /// See [`DEFAULT_ENTRIES`].
    pub const DEFAULT_ATTRS: u32 = 65_536;
    /// See [`DEFAULT_ENTRIES`].
    pub const DEFAULT_LOOKUPS: u32 = 65_536;
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub const MISSES_BYTES: u32 = 256 * 1024;
    /// Default size of the open map (the `[bpf] backing_max` default).
    pub const DEFAULT_OPENS: u32 = 16_384;
    /// Default size of the no-xattr map.
    pub const DEFAULT_NOXATTR: u32 = 65_536;

    /// Counter: lookups answered.
    pub const CTR_LOOKUP_HIT: u32 = 0;
    /// Counter: lookups sent to the daemon (no entry, or expired).
    pub const CTR_LOOKUP_MISS: u32 = 1;
    /// Counter: getattrs answered.
    pub const CTR_GETATTR_HIT: u32 = 2;
    /// Counter: getattrs sent to the daemon.
    pub const CTR_GETATTR_MISS: u32 = 3;
    /// Counter: lookups sent to the daemon because the lookup-count map was full.
    pub const CTR_LOOKUPS_FULL: u32 = 4;
    /// Counter: miss events lost because the ring buffer was full.
    pub const CTR_EVENTS_DROPPED: u32 = 5;
    /// Counter: lookups whose entry the daemon removed while they ran
    /// (count given back, sent to the daemon).
    pub const CTR_RACES: u32 = 6;
    /// Counter: entries or attributes found past their validity.
    pub const CTR_EXPIRED: u32 = 7;
    /// Counter: opens answered (passthrough to a registered backing file).
    pub const CTR_OPEN_HIT: u32 = 8;
    /// Counter: opens sent to the daemon.
    pub const CTR_OPEN_MISS: u32 = 9;
    /// Counter: ioctls failed with ENOTTY in the kernel.
    pub const CTR_IOCTL_HIT: u32 = 10;
    /// Counter: ioctls sent to the daemon.
    pub const CTR_IOCTL_MISS: u32 = 11;
    /// Counter: getxattrs answered ENODATA in the kernel.
    pub const CTR_GETXATTR_HIT: u32 = 12;
    /// Counter: getxattrs sent to the daemon.
    pub const CTR_GETXATTR_MISS: u32 = 13;
    /// Number of counters.
    pub const COUNTERS: u32 = 14;

    /// `FOPEN_KEEP_CACHE` (include/uapi/linux/fuse.h).
    pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
    /// `FOPEN_NOFLUSH`.
    pub const FOPEN_NOFLUSH: u32 = 1 << 5;
    /// `FOPEN_PASSTHROUGH`.
    pub const FOPEN_PASSTHROUGH: u32 = 1 << 7;

    /// Value of the open map: the `struct fuse_open_out` fields a program
    /// answers with, valid until `deadline_ns`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct OpenValue {
        /// The passthrough backing id (`FUSE_DEV_IOC_BACKING_OPEN`).
        pub backing_id: u32,
        /// `FOPEN_*` flags of the answer.
        pub open_flags: u32,
        /// CLOCK_MONOTONIC ns after which the daemon answers again.
        pub deadline_ns: u64,
    }

    /// Value of the no-xattr map: an inode without extended attributes, and
    /// the errno a GETXATTR of a `security.*` or `system.posix_acl_*` name
    /// gets from the backend (ENODATA, or EOPNOTSUPP where the backing
    /// filesystem has no such namespace; 0: ask the daemon).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct NoXattr {
        /// CLOCK_MONOTONIC ns after which the daemon answers again.
        pub deadline_ns: u64,
        /// Errno for `security.*` names.
        pub security_errno: u16,
        /// Errno for `system.posix_acl_*` names.
        pub acl_errno: u16,
        /// Padding, zero.
        pub _pad: u32,
    }

    /// `struct fuse_open_out`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct FuseOpenOut {
        /// Server handle (the kernel forces 0 for BPF answers).
        pub fh: u64,
        /// `FOPEN_*` flags.
        pub open_flags: u32,
        /// Backing id for `FOPEN_PASSTHROUGH`.
        pub backing_id: i32,
    }

    /// `struct fuse_bpf_getxattr_args` (the kernel's arguments).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct GetxattrArgs {
        /// nodeid of the inode.
        pub nodeid: u64,
        /// Size of the caller's buffer.
        pub size: u32,
        /// Length of the name.
        pub namelen: u32,
        /// The full name, zero-padded.
        pub name: [u8; NAME_MAX],
    }

    /// `struct fuse_bpf_ioctl_args`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct IoctlArgs {
        /// nodeid of the inode.
        pub nodeid: u64,
        /// The ioctl command.
        pub cmd: u32,
        /// `FUSE_IOCTL_*` flags.
        pub flags: u32,
    }

    /// `struct fuse_bpf_open_args`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct OpenArgs {
        /// nodeid of the file.
        pub nodeid: u64,
        /// open(2) flags.
        pub flags: u32,
        /// Padding.
        pub _pad: u32,
    }

    /// FUSE opcode carried in [`MissEvent::opcode`] (only lookups are
    /// reported: a GETATTR miss reaches the daemon, whose reply fills the map).
    pub const OP_LOOKUP: u32 = 1;

    /// Key of the entry map; also the kernel's lookup arguments, byte for byte.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct NameKey {
        /// nodeid of the directory.
        pub parent: u64,
        /// Length of the name.
        pub namelen: u32,
        /// Padding, always zero.
        pub _pad: u32,
        /// The name, zero-padded.
        pub name: [u8; NAME_MAX],
    }

    impl NameKey {
        /// The key of `name` in `parent`, or None if the name does not fit
        /// (the kernel never asks BPF about such names).
        pub fn new(parent: u64, name: &[u8]) -> Option<Self> {
            if name.len() >= NAME_MAX {
                return None;
            }
            let mut k = Self {
                parent,
                namelen: name.len() as u32,
                _pad: 0,
                name: [0; NAME_MAX],
            };
            k.name[..name.len()].copy_from_slice(name);
            Some(k)
        }
    }

    /// `struct fuse_attr`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct FuseAttr {
        /// Inode number.
        pub ino: u64,
        /// Size in bytes.
        pub size: u64,
        /// 512-byte blocks.
        pub blocks: u64,
        /// Access time, seconds.
        pub atime: u64,
        /// Modification time, seconds.
        pub mtime: u64,
        /// Change time, seconds.
        pub ctime: u64,
        /// Access time, nanoseconds.
        pub atimensec: u32,
        /// Modification time, nanoseconds.
        pub mtimensec: u32,
        /// Change time, nanoseconds.
        pub ctimensec: u32,
        /// Type and permission bits.
        pub mode: u32,
        /// Link count.
        pub nlink: u32,
        /// Owner.
        pub uid: u32,
        /// Group.
        pub gid: u32,
        /// Device number.
        pub rdev: u32,
        /// Preferred I/O size.
        pub blksize: u32,
        /// FUSE_ATTR_* flags.
        pub flags: u32,
    }

    /// `struct fuse_entry_out`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct FuseEntryOut {
        /// Inode id (0: negative entry).
        pub nodeid: u64,
        /// Inode generation.
        pub generation: u64,
        /// Entry validity, seconds.
        pub entry_valid: u64,
        /// Attribute validity, seconds.
        pub attr_valid: u64,
        /// Entry validity, nanoseconds.
        pub entry_valid_nsec: u32,
        /// Attribute validity, nanoseconds.
        pub attr_valid_nsec: u32,
        /// Attributes.
        pub attr: FuseAttr,
    }

    /// `struct fuse_attr_out`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct FuseAttrOut {
        /// Attribute validity, seconds.
        pub attr_valid: u64,
        /// Attribute validity, nanoseconds.
        pub attr_valid_nsec: u32,
        /// Padding.
        pub dummy: u32,
        /// Attributes.
        pub attr: FuseAttr,
    }

    /// Value of the entry map. The program answers only until the
    /// deadlines (CLOCK_MONOTONIC ns, as `bpf_ktime_get_ns`) and tells the
    /// kernel the time left, so no answer outlives what the daemon set.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct EntryValue {
        /// The answer; its `*_valid` fields are filled by the program.
        pub out: FuseEntryOut,
        /// The name -> inode binding holds until then.
        pub entry_deadline_ns: u64,
        /// The attributes hold until then.
        pub attr_deadline_ns: u64,
    }

    /// Value of the attribute map.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct AttrValue {
        /// The answer; its `attr_valid*` fields are filled by the program.
        pub out: FuseAttrOut,
        /// The attributes hold until then.
        pub deadline_ns: u64,
    }

    /// A request BPF could not answer, sent up the ring buffer so the
    /// daemon can prefetch.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct MissEvent {
        /// The FUSE opcode that missed ([`OP_LOOKUP`]).
        pub opcode: u32,
        /// Padding, always zero.
        pub _pad: u32,
        /// Lookup: directory and name. Getattr: `parent` is the nodeid, no name.
        pub key: NameKey,
    }

    /// Split nanoseconds left into the kernel's (seconds, nanoseconds).
    #[inline(always)]
    pub fn split_ns(ns: u64) -> (u64, u32) {
        (ns / 1_000_000_000, (ns % 1_000_000_000) as u32)
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::trace::*;
    // SAFETY: all of these are #[repr(C)], Copy, made of plain integers with
    // explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for ReqKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for ReqStart {}
    // SAFETY: see above.
    unsafe impl aya::Pod for OpKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for OpStats {}
    // SAFETY: see above.
    unsafe impl aya::Pod for TraceConfig {}
    // SAFETY: see above.
    unsafe impl aya::Pod for TraceEvent {}

    use super::ops::{AttrValue, EntryValue, MissEvent, NameKey};
    // SAFETY: #[repr(C)], Copy, plain integers and byte arrays with
    // explicit padding fields: every bit pattern is valid.
    unsafe impl aya::Pod for NameKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for EntryValue {}
    // SAFETY: see above.
    unsafe impl aya::Pod for AttrValue {}
    // SAFETY: see above.
    unsafe impl aya::Pod for MissEvent {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::ops::OpenValue {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::ops::NoXattr {}
}

#[cfg(test)]
mod tests {
    use super::trace::*;

    #[test]
    fn hist_slot_is_floor_log2() {
        assert_eq!(hist_slot(0), 0);
        assert_eq!(hist_slot(1), 0);
        assert_eq!(hist_slot(2), 1);
        assert_eq!(hist_slot(3), 1);
        assert_eq!(hist_slot(1024), 10);
        assert_eq!(hist_slot(u64::MAX), HIST_SLOTS - 1);
    }

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<ReqKey>(), 16);
        assert_eq!(core::mem::size_of::<ReqStart>(), 16);
        assert_eq!(core::mem::size_of::<OpKey>(), 8);
        assert_eq!(core::mem::size_of::<OpStats>(), 8 * (5 + HIST_SLOTS));
        assert_eq!(core::mem::size_of::<TraceConfig>(), 16);
        assert_eq!(core::mem::size_of::<TraceEvent>(), 32);
    }

    #[test]
    fn ops_layouts_match_the_kernel() {
        use crate::ops::*;
        // struct fuse_bpf_lookup_args, fuse_attr, fuse_entry_out, fuse_attr_out.
        assert_eq!(core::mem::size_of::<NameKey>(), 16 + NAME_MAX);
        assert_eq!(core::mem::size_of::<FuseAttr>(), 88);
        assert_eq!(core::mem::size_of::<FuseEntryOut>(), 128);
        assert_eq!(core::mem::size_of::<FuseAttrOut>(), 104);
        assert_eq!(core::mem::size_of::<EntryValue>(), 144);
        assert_eq!(core::mem::size_of::<AttrValue>(), 112);
        assert_eq!(core::mem::size_of::<MissEvent>(), 8 + 16 + NAME_MAX);
    }

    #[test]
    fn name_keys_are_zero_padded_and_bounded() {
        use crate::ops::*;
        let k = NameKey::new(7, b"abc").unwrap();
        assert_eq!((k.parent, k.namelen), (7, 3));
        assert_eq!(&k.name[..4], b"abc\0");
        assert!(k.name[3..].iter().all(|b| *b == 0));
        assert!(NameKey::new(1, &[b'x'; 255]).is_some());
        assert!(NameKey::new(1, &[b'x'; 256]).is_none());
        assert_eq!(split_ns(2_500_000_000), (2, 500_000_000));
    }
}
