//! BPF programs of efuse.
//!
//! Tracing: `fuse:fuse_request_send` records the start of every FUSE request
//! in an in-flight map keyed by (connection, unique); `fuse:fuse_request_end`
//! takes it out and aggregates count, errors, total/max latency and a log2
//! latency histogram per (connection, opcode) in a per-CPU hash map. Rare
//! events (slow requests over a threshold, errors) go one by one through a
//! ring buffer; when the ring is full the event is counted as dropped, never
//! retried. Field offsets come from `efuse_common::trace::layout` and are
//! checked against the tracepoint format by the daemon before loading.
#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks)]

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use efuse_common::trace::{
    EVENT_ERROR, EVENT_SLOW, EVENTS_BYTES, INFLIGHT_ENTRIES, MAX_OPCODE, OPSTATS_ENTRIES, OpKey, OpStats,
    ReqKey, ReqStart, TraceConfig, TraceEvent, hist_slot, layout,
};

#[map(name = "EFUSE_INFLIGHT")]
static INFLIGHT: HashMap<ReqKey, ReqStart> = HashMap::with_max_entries(INFLIGHT_ENTRIES, 0);

#[map(name = "EFUSE_OPSTATS")]
static OPSTATS: PerCpuHashMap<OpKey, OpStats> = PerCpuHashMap::with_max_entries(OPSTATS_ENTRIES, 0);

#[map(name = "EFUSE_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map(name = "EFUSE_TRACE_CONFIG")]
static CONFIG: Array<TraceConfig> = Array::with_max_entries(1, 0);

#[map(name = "EFUSE_DROPPED")]
static DROPPED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn config() -> TraceConfig {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => TraceConfig::default(),
    }
}

#[inline(always)]
fn stats_for(key: &OpKey) -> Option<*mut OpStats> {
    if let Some(p) = OPSTATS.get_ptr_mut(key) {
        return Some(p);
    }
    // Insert a zeroed slot; BPF_NOEXIST so a racing CPU's insert is kept.
    let _ = OPSTATS.insert(key, &OpStats::default(), BPF_NOEXIST as u64);
    OPSTATS.get_ptr_mut(key)
}

#[inline(always)]
fn opcode_slot(opcode: u32) -> u32 {
    if opcode > MAX_OPCODE { MAX_OPCODE } else { opcode }
}

/// Entry point for `fuse:fuse_request_send`.
#[tracepoint(category = "fuse", name = "fuse_request_send")]
pub fn fuse_request_send(ctx: TracePointContext) -> u32 {
    match try_fuse_request_send(&ctx) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

fn try_fuse_request_send(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: offsets were checked against the tracepoint's format file by
    // the loader; bpf_probe_read_kernel faults safely on a bad address.
    let dev: u32 = unsafe { ctx.read_at(layout::SEND_CONNECTION)? };
    let cfg = config();
    if cfg.dev != 0 && cfg.dev != dev {
        return Ok(());
    }
    // SAFETY: as above.
    let unique: u64 = unsafe { ctx.read_at(layout::SEND_UNIQUE)? };
    // SAFETY: as above.
    let opcode: u32 = unsafe { ctx.read_at(layout::SEND_OPCODE)? };
    let key = ReqKey { dev, _pad: 0, unique };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let ts = unsafe { bpf_ktime_get_ns() };
    let start = ReqStart { ts, opcode, _pad: 0 };
    if INFLIGHT.insert(&key, &start, 0).is_err() {
        warn!(ctx, "efuse: in-flight map full, request {} not timed", unique);
    }
    let okey = OpKey {
        dev,
        opcode: opcode_slot(opcode),
    };
    if let Some(s) = stats_for(&okey) {
        // SAFETY: per-CPU value, only this CPU writes it, and the pointer
        // came from the map lookup just above.
        unsafe { (*s).sent += 1 };
    }
    Ok(())
}

/// Entry point for `fuse:fuse_request_end`.
#[tracepoint(category = "fuse", name = "fuse_request_end")]
pub fn fuse_request_end(ctx: TracePointContext) -> u32 {
    match try_fuse_request_end(&ctx) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

fn try_fuse_request_end(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: see try_fuse_request_send.
    let dev: u32 = unsafe { ctx.read_at(layout::END_CONNECTION)? };
    // SAFETY: as above.
    let unique: u64 = unsafe { ctx.read_at(layout::END_UNIQUE)? };
    let key = ReqKey { dev, _pad: 0, unique };
    let start = match INFLIGHT.get_ptr(&key) {
        // SAFETY: pointer from a successful lookup; the value is copied out
        // before the element is removed.
        Some(p) => unsafe { *p },
        // Not sent while we were attached, or filtered out at send.
        None => return Ok(()),
    };
    let _ = INFLIGHT.remove(&key);
    // SAFETY: as above.
    let error: i32 = unsafe { ctx.read_at(layout::END_ERROR)? };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let ns = now.saturating_sub(start.ts);
    let okey = OpKey {
        dev,
        opcode: opcode_slot(start.opcode),
    };
    if let Some(s) = stats_for(&okey) {
        // SAFETY: per-CPU value written only by this CPU.
        unsafe {
            (*s).done += 1;
            if error != 0 {
                (*s).errors += 1;
            }
            (*s).total_ns += ns;
            if ns > (*s).max_ns {
                (*s).max_ns = ns;
            }
            let slot = hist_slot(ns);
            if let Some(b) = (*s).hist.get_mut(slot) {
                *b += 1;
            }
        }
    }
    let cfg = config();
    let kind = if cfg.slow_ns != 0 && ns >= cfg.slow_ns {
        EVENT_SLOW
    } else if error != 0 && cfg.emit_errors != 0 {
        EVENT_ERROR
    } else {
        return Ok(());
    };
    let ev = TraceEvent {
        kind,
        dev,
        unique,
        latency_ns: ns,
        opcode: start.opcode,
        error,
    };
    if EVENTS.output::<TraceEvent>(&ev, 0).is_err()
        && let Some(d) = DROPPED.get_ptr_mut(0)
    {
        // SAFETY: per-CPU slot written only by this CPU.
        unsafe { *d += 1 };
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
