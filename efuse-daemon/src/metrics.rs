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

/// Opcode numbers (the FUSE ABI's).
pub use crate::transport::abi::opcode as op;

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
