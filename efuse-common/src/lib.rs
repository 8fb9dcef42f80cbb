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
}
