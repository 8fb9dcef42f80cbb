//! The `bpf` offload tier: programs for efuse's `fuse_bpf_ops` struct_ops
//! (kernel patches in `kernel/patches/`), answering FUSE LOOKUP, GETATTR,
//! read-only OPEN, IOCTL and GETXATTR from maps the daemon fills.
//!
//! The kernel calls `efuse_lookup(args, out)`, `efuse_getattr(args, out)`
//! and `efuse_open(args, out)` with a `u64` context array holding the two
//! pointers. A program returns 0 when it wrote the answer to `out`, 1 to
//! let the request go to the daemon. `efuse_ioctl(args)` and
//! `efuse_getxattr(args)` can only fail a request: a negative errno is the
//! answer, 1 sends it to the daemon.
//!
//! An open answered here names the passthrough backing id the daemon
//! registered for the inode (`EFUSE_OPENS`); the kernel checks the id and
//! finishes the open as for a daemon reply, and sends no FLUSH or RELEASE
//! for the file. Whether an inode has extended attributes is the daemon's
//! knowledge (`EFUSE_NOXATTR`); values never come from here.
//!
//! Lookup-count protocol: every lookup answered here gives the kernel one
//! more reference to the inode, which the daemon must expect FORGETs for.
//! The program counts it in `EFUSE_LOOKUPS[nodeid]` *before* answering,
//! then checks that the entry is still in the map. The daemon deletes an
//! entry first and reads the count after, so an answer it does not see
//! counted cannot happen: if the recheck fails, the program gives the count
//! back and lets the daemon answer. A full count map means "ask the
//! daemon", never an unaccounted answer.
//!
//! The entry, attribute and no-xattr maps are LRU hash maps: when the
//! daemon adds to a full one, the kernel evicts what the programs used
//! least recently, so the maps keep the hot set of a tree larger than they
//! are. An eviction is a delete the daemon did not make: it notices it
//! later (it compares its mirror with the map's keys) and only then reads
//! the count, which the protocol above makes safe for any delete. The
//! count map and the open map (each open holds a backing file) are plain
//! hash maps: nothing there may vanish unseen.
//!
//! Programs are built into their own object (not `efuse`) because aya does
//! not know struct_ops sections; the daemon loads this object itself. The
//! section names are only labels for that loader.
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap, so core offers no
// AtomicU64::fetch_add; the intrinsic lowers to BPF's atomic add.
#![allow(internal_features)]
#![feature(core_intrinsics)]
#![deny(clippy::undocumented_unsafe_blocks)]

use core::intrinsics::{AtomicOrdering, atomic_xadd, atomic_xsub};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, generated::bpf_probe_read_kernel},
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use efuse_common::ops::{
    AttrValue, COUNTERS, CTR_EVENTS_DROPPED, CTR_EXPIRED, CTR_GETATTR_HIT, CTR_GETATTR_MISS,
    CTR_GETXATTR_HIT, CTR_GETXATTR_MISS, CTR_IOCTL_HIT, CTR_LOOKUP_HIT, CTR_LOOKUP_MISS, CTR_LOOKUPS_FULL,
    CTR_OPEN_HIT, CTR_OPEN_MISS, CTR_RACES, DEFAULT_ATTRS, DEFAULT_ENTRIES, DEFAULT_LOOKUPS, DEFAULT_NOXATTR,
    DEFAULT_OPENS, EntryValue, FuseAttrOut, FuseEntryOut, FuseOpenOut, MISSES_BYTES, MissEvent, NameKey,
    NoXattr, OP_LOOKUP, OpenArgs, OpenValue, split_ns,
};

#[map(name = "EFUSE_ENTRIES")]
static ENTRIES: LruHashMap<NameKey, EntryValue> = LruHashMap::with_max_entries(DEFAULT_ENTRIES, 0);

#[map(name = "EFUSE_ATTRS")]
static ATTRS: LruHashMap<u64, AttrValue> = LruHashMap::with_max_entries(DEFAULT_ATTRS, 0);

#[map(name = "EFUSE_LOOKUPS")]
static LOOKUPS: HashMap<u64, u64> = HashMap::with_max_entries(DEFAULT_LOOKUPS, 0);

#[map(name = "EFUSE_MISSES")]
static MISSES: RingBuf = RingBuf::with_byte_size(MISSES_BYTES, 0);

#[map(name = "EFUSE_OPS_COUNTERS")]
static COUNTERS_MAP: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

#[map(name = "EFUSE_OPENS")]
static OPENS: HashMap<u64, OpenValue> = HashMap::with_max_entries(DEFAULT_OPENS, 0);

#[map(name = "EFUSE_NOXATTR")]
static NOXATTR: LruHashMap<u64, NoXattr> = LruHashMap::with_max_entries(DEFAULT_NOXATTR, 0);

const ENOTTY: i32 = 25;
const O_ACCMODE: u32 = 3;
const O_TRUNC: u32 = 0o1000;

/// Answered: the kernel uses `out`.
const ANSWERED: i32 = 0;
/// Not answered: the request goes to the daemon.
const ASK_DAEMON: i32 = 1;

#[inline(always)]
fn count(ctr: u32) {
    if let Some(c) = COUNTERS_MAP.get_ptr_mut(ctr) {
        // SAFETY: a per-CPU slot, written only by programs on this CPU.
        unsafe { *c += 1 };
    }
}

/// Tell the daemon about a miss; a full ring is counted, never retried.
#[inline(always)]
fn report_miss(opcode: u32, key: *const NameKey) {
    match MISSES.reserve::<MissEvent>(0) {
        Some(mut e) => {
            let ev = e.as_mut_ptr();
            // SAFETY: `ev` points at a reserved record of the right size;
            // `key` is a valid pointer (the kernel's arguments or the stack).
            unsafe {
                (*ev).opcode = opcode;
                (*ev)._pad = 0;
                bpf_probe_read_kernel(
                    (&raw mut (*ev).key).cast(),
                    size_of::<NameKey>() as u32,
                    key.cast(),
                );
            }
            e.submit(0);
        }
        None => count(CTR_EVENTS_DROPPED),
    }
}

/// Time left until `deadline`, or None if it has passed.
#[inline(always)]
fn left(now: u64, deadline: u64) -> Option<u64> {
    if deadline > now {
        Some(deadline - now)
    } else {
        None
    }
}

/// Add one to the BPF lookup count of `nodeid`; false if the map is full.
#[inline(always)]
fn add_lookup(nodeid: u64) -> bool {
    if LOOKUPS.get_ptr_mut(&nodeid).is_none() {
        // BPF_NOEXIST: a racing CPU's insert wins and we add to it below.
        let _ = LOOKUPS.insert(&nodeid, &0, BPF_NOEXIST as u64);
    }
    match LOOKUPS.get_ptr_mut(&nodeid) {
        Some(c) => {
            // SAFETY: `c` points at the map value; atomic because every CPU
            // and the daemon share it.
            unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(c, 1) };
            true
        }
        None => false,
    }
}

#[inline(always)]
fn sub_lookup(nodeid: u64) {
    if let Some(c) = LOOKUPS.get_ptr_mut(&nodeid) {
        // SAFETY: as in add_lookup.
        unsafe { atomic_xsub::<u64, u64, { AtomicOrdering::SeqCst }>(c, 1) };
    }
}

/// `fuse_bpf_ops.lookup(struct fuse_bpf_lookup_args *args, struct fuse_entry_out *out)`.
///
/// # Safety
/// Called by the kernel with its argument array.
#[unsafe(no_mangle)]
#[unsafe(link_section = "tp_btf/efuse_lookup")]
pub unsafe extern "C" fn efuse_lookup(ctx: *const u64) -> i32 {
    // SAFETY: the kernel passes two pointer arguments.
    let (args, out) = unsafe { (*ctx as *const NameKey, *ctx.add(1) as *mut FuseEntryOut) };
    try_lookup(args, out)
}

#[inline(always)]
fn try_lookup(args: *const NameKey, out: *mut FuseEntryOut) -> i32 {
    let mut key = core::mem::MaybeUninit::<NameKey>::uninit();
    // SAFETY: copies the kernel's lookup arguments (same layout) to the stack.
    let r =
        unsafe { bpf_probe_read_kernel(key.as_mut_ptr().cast(), size_of::<NameKey>() as u32, args.cast()) };
    if r != 0 {
        return ASK_DAEMON;
    }
    // SAFETY: fully written by the read above.
    let key = unsafe { key.assume_init_ref() };
    // SAFETY: map values stay valid under the RCU read lock programs run in.
    let Some(v) = (unsafe { ENTRIES.get(key) }) else {
        count(CTR_LOOKUP_MISS);
        report_miss(OP_LOOKUP, key);
        return ASK_DAEMON;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let (Some(entry_left), Some(attr_left)) = (left(now, v.entry_deadline_ns), left(now, v.attr_deadline_ns))
    else {
        count(CTR_EXPIRED);
        count(CTR_LOOKUP_MISS);
        report_miss(OP_LOOKUP, key);
        return ASK_DAEMON;
    };
    let nodeid = v.out.nodeid;
    if !add_lookup(nodeid) {
        count(CTR_LOOKUPS_FULL);
        count(CTR_LOOKUP_MISS);
        return ASK_DAEMON;
    }
    // The daemon deletes entries before it reads counts: if the entry is
    // still here, the count above is one it will see.
    // SAFETY: as above.
    match unsafe { ENTRIES.get(key) } {
        Some(v2) if v2.out.nodeid == nodeid => {}
        _ => {
            sub_lookup(nodeid);
            count(CTR_RACES);
            count(CTR_LOOKUP_MISS);
            return ASK_DAEMON;
        }
    }
    let (es, ens) = split_ns(entry_left);
    let (as_, ans) = split_ns(attr_left);
    // SAFETY: `out` is the kernel's answer struct, writable by this program.
    unsafe {
        (*out).nodeid = nodeid;
        (*out).generation = v.out.generation;
        (*out).entry_valid = es;
        (*out).entry_valid_nsec = ens;
        (*out).attr_valid = as_;
        (*out).attr_valid_nsec = ans;
        (*out).attr = v.out.attr;
    }
    count(CTR_LOOKUP_HIT);
    ANSWERED
}

/// `fuse_bpf_ops.getattr(struct fuse_bpf_getattr_args *args, struct fuse_attr_out *out)`.
///
/// # Safety
/// Called by the kernel with its argument array.
#[unsafe(no_mangle)]
#[unsafe(link_section = "tp_btf/efuse_getattr")]
pub unsafe extern "C" fn efuse_getattr(ctx: *const u64) -> i32 {
    // SAFETY: the kernel passes two pointer arguments.
    let (args, out) = unsafe { (*ctx as *const u64, *ctx.add(1) as *mut FuseAttrOut) };
    // SAFETY: `args` points at struct fuse_bpf_getattr_args { u64 nodeid }.
    let nodeid = unsafe { *args };
    // SAFETY: as in efuse_lookup.
    // No miss event: the GETATTR itself goes to the daemon, whose reply
    // fills the attribute map.
    let Some(v) = (unsafe { ATTRS.get(&nodeid) }) else {
        count(CTR_GETATTR_MISS);
        return ASK_DAEMON;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(attr_left) = left(now, v.deadline_ns) else {
        count(CTR_EXPIRED);
        count(CTR_GETATTR_MISS);
        return ASK_DAEMON;
    };
    let (s, ns) = split_ns(attr_left);
    // SAFETY: `out` is the kernel's answer struct, writable by this program.
    unsafe {
        (*out).attr_valid = s;
        (*out).attr_valid_nsec = ns;
        (*out).attr = v.out.attr;
    }
    count(CTR_GETATTR_HIT);
    ANSWERED
}

/// `fuse_bpf_ops.open(struct fuse_bpf_open_args *args, struct fuse_open_out *out)`.
///
/// # Safety
/// Called by the kernel with its argument array.
#[unsafe(no_mangle)]
#[unsafe(link_section = "tp_btf/efuse_open")]
pub unsafe extern "C" fn efuse_open(ctx: *const u64) -> i32 {
    // SAFETY: the kernel passes two pointer arguments.
    let (args, out) = unsafe { (*ctx as *const OpenArgs, *ctx.add(1) as *mut FuseOpenOut) };
    // SAFETY: `args` points at the kernel's struct fuse_bpf_open_args.
    let (nodeid, flags) = unsafe { ((*args).nodeid, (*args).flags) };
    // The kernel offers only these; checked again, writers stay the daemon's.
    if flags & O_ACCMODE != 0 || flags & O_TRUNC != 0 {
        count(CTR_OPEN_MISS);
        return ASK_DAEMON;
    }
    // SAFETY: as in efuse_lookup.
    let Some(v) = (unsafe { OPENS.get(&nodeid) }) else {
        count(CTR_OPEN_MISS);
        return ASK_DAEMON;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if left(now, v.deadline_ns).is_none() {
        count(CTR_EXPIRED);
        count(CTR_OPEN_MISS);
        return ASK_DAEMON;
    }
    // SAFETY: `out` is the kernel's answer struct, writable by this program.
    unsafe {
        (*out).fh = 0;
        (*out).open_flags = v.open_flags;
        (*out).backing_id = v.backing_id as i32;
    }
    count(CTR_OPEN_HIT);
    ANSWERED
}

/// `fuse_bpf_ops.ioctl(struct fuse_bpf_ioctl_args *args)`: the daemon
/// serves no ioctl (ENOTTY for every command, as a local filesystem answers
/// commands it does not know: Python's isatty check on each open), so none
/// needs to reach it.
///
/// # Safety
/// Called by the kernel with its argument array.
#[unsafe(no_mangle)]
#[unsafe(link_section = "tp_btf/efuse_ioctl")]
pub unsafe extern "C" fn efuse_ioctl(_ctx: *const u64) -> i32 {
    count(CTR_IOCTL_HIT);
    -ENOTTY
}

/// Byte by byte, so no memcmp call is emitted (BPF has none).
#[inline(always)]
fn starts_with<const N: usize>(p: &[u8; 17], s: &[u8; N]) -> bool {
    let mut i = 0;
    while i < N {
        if p[i] != s[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// `fuse_bpf_ops.getxattr(struct fuse_bpf_getxattr_args *args)`: for an
/// inode the daemon recorded as having no extended attributes, a
/// `security.*` or `system.posix_acl_*` name (what `ls -l` asks of every
/// entry) gets the errno the backend gives for it; other names go to the
/// daemon.
///
/// # Safety
/// Called by the kernel with its argument array.
#[unsafe(no_mangle)]
#[unsafe(link_section = "tp_btf/efuse_getxattr")]
pub unsafe extern "C" fn efuse_getxattr(ctx: *const u64) -> i32 {
    const SECURITY: &[u8; 9] = b"security.";
    const ACL: &[u8; 17] = b"system.posix_acl_";
    // SAFETY: the kernel passes one pointer argument, whose first field is
    // the u64 nodeid (struct fuse_bpf_getxattr_args).
    let args = unsafe { *ctx as *const u64 };
    // SAFETY: as above.
    let nodeid = unsafe { *args };
    // SAFETY: as in efuse_lookup.
    let Some(v) = (unsafe { NOXATTR.get(&nodeid) }) else {
        count(CTR_GETXATTR_MISS);
        return ASK_DAEMON;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if left(now, v.deadline_ns).is_none() {
        count(CTR_EXPIRED);
        count(CTR_GETXATTR_MISS);
        return ASK_DAEMON;
    }
    let mut prefix = [0u8; 17];
    // SAFETY: the name starts 16 bytes into the arguments and is 256 bytes
    // long; 17 of them are copied to the stack.
    let r = unsafe {
        bpf_probe_read_kernel(
            prefix.as_mut_ptr().cast(),
            prefix.len() as u32,
            args.cast::<u8>().add(16).cast(),
        )
    };
    let errno = if r != 0 {
        0
    } else if starts_with(&prefix, SECURITY) {
        v.security_errno
    } else if starts_with(&prefix, ACL) {
        v.acl_errno
    } else {
        0
    };
    if errno == 0 {
        count(CTR_GETXATTR_MISS);
        return ASK_DAEMON;
    }
    count(CTR_GETXATTR_HIT);
    -i32::from(errno)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
