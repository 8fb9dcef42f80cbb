//! The daemon's own request counters, per FUSE opcode.
//!
//! Counted in the FUSE adapter, once per request, with the time the daemon
//! spent on it. They are what the kernel-side tracepoint counts are checked
//! against, and what `efuse stats` shows beside them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// FUSE opcodes (from `<linux/fuse.h>`) with their names.
pub const OPCODES: &[(u32, &str)] = &[
    (1, "LOOKUP"),
    (2, "FORGET"),
    (3, "GETATTR"),
    (4, "SETATTR"),
    (5, "READLINK"),
    (6, "SYMLINK"),
    (8, "MKNOD"),
    (9, "MKDIR"),
    (10, "UNLINK"),
    (11, "RMDIR"),
    (12, "RENAME"),
    (13, "LINK"),
    (14, "OPEN"),
    (15, "READ"),
    (16, "WRITE"),
    (17, "STATFS"),
    (18, "RELEASE"),
    (20, "FSYNC"),
    (21, "SETXATTR"),
    (22, "GETXATTR"),
    (23, "LISTXATTR"),
    (24, "REMOVEXATTR"),
    (25, "FLUSH"),
    (26, "INIT"),
    (27, "OPENDIR"),
    (28, "READDIR"),
    (29, "RELEASEDIR"),
    (30, "FSYNCDIR"),
    (31, "GETLK"),
    (32, "SETLK"),
    (33, "SETLKW"),
    (34, "ACCESS"),
    (35, "CREATE"),
    (36, "INTERRUPT"),
    (37, "BMAP"),
    (38, "DESTROY"),
    (39, "IOCTL"),
    (40, "POLL"),
    (41, "NOTIFY_REPLY"),
    (42, "BATCH_FORGET"),
    (43, "FALLOCATE"),
    (44, "READDIRPLUS"),
    (45, "RENAME2"),
    (46, "LSEEK"),
    (47, "COPY_FILE_RANGE"),
    (48, "SETUPMAPPING"),
    (49, "REMOVEMAPPING"),
    (50, "SYNCFS"),
    (51, "TMPFILE"),
    (52, "STATX"),
];

/// Name of an opcode (`OP<n>` when unknown).
pub fn opcode_name(op: u32) -> String {
    OPCODES
        .iter()
        .find(|(o, _)| *o == op)
        .map(|(_, n)| (*n).to_string())
        .unwrap_or_else(|| format!("OP{op}"))
}

/// Opcode numbers used by the adapter.
#[allow(missing_docs)]
pub mod op {
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
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const IOCTL: u32 = 39;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
}

const SLOTS: usize = 64;

#[derive(Default)]
struct Slot {
    count: AtomicU64,
    errors: AtomicU64,
    total_ns: AtomicU64,
}

/// Per-opcode counters of one mount.
pub struct Metrics {
    slots: [Slot; SLOTS],
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            slots: std::array::from_fn(|_| Slot::default()),
        }
    }
}

/// A snapshot of one opcode's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpCount {
    /// Opcode.
    pub opcode: u32,
    /// Name.
    pub name: String,
    /// Requests handled.
    pub count: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Time spent in the daemon, ns.
    pub total_ns: u64,
}

impl Metrics {
    /// Count one request of `opcode` that started at `start`.
    pub fn record(&self, opcode: u32, start: Instant, failed: bool) {
        let s = &self.slots[(opcode as usize).min(SLOTS - 1)];
        s.count.fetch_add(1, Ordering::Relaxed);
        if failed {
            s.errors.fetch_add(1, Ordering::Relaxed);
        }
        s.total_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Count of one opcode.
    pub fn count(&self, opcode: u32) -> u64 {
        self.slots[(opcode as usize).min(SLOTS - 1)]
            .count
            .load(Ordering::Relaxed)
    }

    /// Every opcode with a non-zero count.
    pub fn snapshot(&self) -> Vec<OpCount> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.count.load(Ordering::Relaxed) > 0)
            .map(|(i, s)| OpCount {
                opcode: i as u32,
                name: opcode_name(i as u32),
                count: s.count.load(Ordering::Relaxed),
                errors: s.errors.load(Ordering::Relaxed),
                total_ns: s.total_ns.load(Ordering::Relaxed),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_opcode() {
        let m = Metrics::default();
        m.record(op::LOOKUP, Instant::now(), false);
        m.record(op::LOOKUP, Instant::now(), true);
        m.record(op::READ, Instant::now(), false);
        let s = m.snapshot();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "LOOKUP");
        assert_eq!((s[0].count, s[0].errors), (2, 1));
        assert_eq!(m.count(op::READ), 1);
        assert_eq!(opcode_name(999), "OP999");
    }
}
