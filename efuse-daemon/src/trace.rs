//! eBPF tracing of one mount's FUSE requests.
//!
//! The programs in `efuse-ebpf` are attached to `fuse:fuse_request_send`
//! and `fuse:fuse_request_end` *before* the mount is made (so FUSE_INIT is
//! seen) with no connection filter; once the daemon knows its connection id
//! it writes it to the config map and the programs drop every other
//! connection's requests at the first instruction. Each daemon loads its own
//! copy, so several mounts are traced independently, and nothing is pinned:
//! the programs and maps go away with the daemon.
//!
//! Failure to trace never stops a mount: [`Tracer::start`] returns an error
//! saying what is missing, the daemon logs it once and serves untraced.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use efuse_common::trace::{self as t, HIST_SLOTS, OpKey, OpStats, TraceConfig, TraceEvent, layout};
use serde::{Deserialize, Serialize};

use crate::metrics::opcode_name;

/// The BPF object built by build.rs (empty when built without bpf-linker).
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/efuse"));

const TRACEFS: &str = "/sys/kernel/tracing";

/// Kernel-side statistics of one opcode on one connection, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelOpStats {
    /// FUSE opcode.
    pub opcode: u32,
    /// Name.
    pub name: String,
    /// Requests sent to the daemon (upcalls).
    pub sent: u64,
    /// Requests completed.
    pub done: u64,
    /// Completed with an error.
    pub errors: u64,
    /// Sum of latencies, ns.
    pub total_ns: u64,
    /// Largest latency, ns.
    pub max_ns: u64,
    /// log2 latency histogram (slot i: [2^i, 2^(i+1)) ns).
    pub hist: Vec<u64>,
}

impl KernelOpStats {
    /// Latency at percentile `p` (0..=100), interpolated inside its log2 bucket.
    pub fn percentile_ns(&self, p: f64) -> u64 {
        // Interpolation inside the top bucket can overshoot the real maximum.
        percentile(&self.hist, p).min(self.max_ns)
    }
}

/// Percentile of a log2 histogram, interpolated linearly inside the bucket.
pub fn percentile(hist: &[u64], p: f64) -> u64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0;
    }
    let want = (p / 100.0 * total as f64).ceil().max(1.0);
    let mut seen = 0f64;
    for (i, &n) in hist.iter().enumerate() {
        if n == 0 {
            continue;
        }
        if seen + n as f64 >= want {
            let lo = if i == 0 { 0.0 } else { (1u64 << i) as f64 };
            let hi = (1u64 << (i + 1)) as f64;
            let frac = (want - seen) / n as f64;
            return (lo + (hi - lo) * frac) as u64;
        }
        seen += n as f64;
    }
    1u64 << hist.len()
}

/// Loaded and attached tracing programs of one daemon.
pub struct Tracer {
    ebpf: Ebpf,
    dev: u32,
    slow_ns: u64,
    events_seen: u64,
    /// Every connection's counts just before the mount (see
    /// [`Tracer::mark`]), subtracted from our connection's.
    baseline: BTreeMap<(u32, u32), KernelOpStats>,
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// Read a tracepoint format file into field name -> (offset, size).
fn read_format(system: &str, event: &str) -> anyhow::Result<BTreeMap<String, (usize, usize)>> {
    let path = Path::new(TRACEFS)
        .join("events")
        .join(system)
        .join(event)
        .join("format");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut parts = rest.split(';').map(str::trim);
        let decl = parts.next().unwrap_or_default();
        let name = decl.rsplit(' ').next().unwrap_or_default().to_string();
        let mut off = None;
        let mut size = None;
        for p in parts {
            if let Some(v) = p.strip_prefix("offset:") {
                off = v.parse().ok();
            } else if let Some(v) = p.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        if let (Some(o), Some(s)) = (off, size) {
            out.insert(name, (o, s));
        }
    }
    Ok(out)
}

/// Check that the tracepoint layout of `system` (`fuse`, or `efuse` for
/// efuse.ko) is the one the programs read.
pub fn check_layout(system: &str) -> anyhow::Result<()> {
    if !Path::new(TRACEFS).join("events").exists() {
        // Mount tracefs if the system has not.
        let _ = nix::mount::mount(
            Some("tracefs"),
            TRACEFS,
            Some("tracefs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    if !Path::new(TRACEFS)
        .join("events")
        .join(system)
        .join("fuse_request_send")
        .exists()
    {
        bail!(
            "this kernel has no {system}:fuse_request_send/fuse_request_end tracepoints \
             (fs/fuse/fuse_trace.h, CONFIG_FUSE_FS with tracing; recent mainline kernels have them) \
             or tracefs is not mounted at {TRACEFS}"
        );
    }
    let want: [(&str, &str, usize, usize); 6] = [
        ("fuse_request_send", "connection", layout::SEND_CONNECTION, 4),
        ("fuse_request_send", "unique", layout::SEND_UNIQUE, 8),
        ("fuse_request_send", "opcode", layout::SEND_OPCODE, 4),
        ("fuse_request_end", "connection", layout::END_CONNECTION, 4),
        ("fuse_request_end", "unique", layout::END_UNIQUE, 8),
        ("fuse_request_end", "error", layout::END_ERROR, 4),
    ];
    for event in ["fuse_request_send", "fuse_request_end"] {
        let fields = read_format(system, event)?;
        for (_, field, off, size) in want.iter().filter(|w| w.0 == event) {
            match fields.get(*field) {
                Some(&(o, s)) if o == *off && s == *size => {}
                Some(&(o, s)) => bail!(
                    "{system}:{event} field {field} is at offset {o} size {s}, efuse expects offset {off} size {size}; \
                     tracing disabled for this kernel"
                ),
                None => bail!("{system}:{event} has no field {field}; tracing disabled for this kernel"),
            }
        }
    }
    Ok(())
}

impl Tracer {
    /// Load and attach the tracing programs to the tracepoints of `system`
    /// (`fuse`, or `efuse` for mounts through efuse.ko). Call before
    /// mounting.
    pub fn start(slow_ns: u64, system: &str) -> anyhow::Result<Self> {
        if BPF_OBJECT.is_empty() {
            bail!(
                "efuse was built without its BPF programs (bpf-linker was missing at build time); \
                 run `cargo xtask setup` and rebuild"
            );
        }
        check_layout(system)?;
        let mut ebpf = EbpfLoader::new()
            .load(BPF_OBJECT)
            .context("loading the efuse BPF object")?;
        let logger = aya_log::EbpfLogger::init(&mut ebpf).ok();
        for (prog, event) in [
            (t::PROG_SEND, "fuse_request_send"),
            (t::PROG_END, "fuse_request_end"),
        ] {
            let p: &mut TracePoint = ebpf
                .program_mut(prog)
                .with_context(|| format!("program {prog} missing from the BPF object"))?
                .try_into()?;
            p.load().with_context(|| format!("loading {prog}"))?;
            p.attach(system, event)
                .with_context(|| format!("attaching {prog} to {system}:{event}"))?;
        }
        let mut tracer = Self {
            ebpf,
            dev: 0,
            slow_ns,
            events_seen: 0,
            baseline: BTreeMap::new(),
            _logger: logger,
        };
        tracer.write_config()?;
        Ok(tracer)
    }

    fn write_config(&mut self) -> anyhow::Result<()> {
        let mut cfg: Array<&mut MapData, TraceConfig> =
            Array::try_from(self.ebpf.map_mut(t::MAP_CONFIG).context("config map missing")?)?;
        cfg.set(
            0,
            TraceConfig {
                dev: self.dev,
                emit_errors: 0,
                slow_ns: self.slow_ns,
            },
            0,
        )?;
        Ok(())
    }

    /// Call just before the mount is made. Until the daemon knows its
    /// connection, every connection is counted, and connection numbers are
    /// reused: what a previous mount with our number did before now is not
    /// ours (its last request precedes our mount, which can only take the
    /// number once that mount is gone), and is subtracted.
    pub fn mark(&mut self) {
        self.baseline = self
            .summed()
            .map(|v| v.into_iter().map(|(k, s)| ((k.dev, k.opcode), s)).collect())
            .unwrap_or_default();
    }

    /// Count only connection `dev` from now on.
    pub fn set_connection(&mut self, dev: u32) -> anyhow::Result<()> {
        self.dev = dev;
        self.write_config()
    }

    /// Per-opcode statistics of our connection, summed over CPUs.
    pub fn op_stats(&self) -> anyhow::Result<Vec<KernelOpStats>> {
        let mut out = Vec::new();
        for (key, mut s) in self.summed()? {
            if key.dev != self.dev {
                continue;
            }
            if let Some(b) = self.baseline.get(&(key.dev, key.opcode)) {
                s.sent = s.sent.saturating_sub(b.sent);
                s.done = s.done.saturating_sub(b.done);
                s.errors = s.errors.saturating_sub(b.errors);
                s.total_ns = s.total_ns.saturating_sub(b.total_ns);
                for (a, b) in s.hist.iter_mut().zip(b.hist.iter()) {
                    *a = a.saturating_sub(*b);
                }
                if s.sent == 0 && s.done == 0 {
                    continue;
                }
            }
            out.push(s);
        }
        out.sort_by_key(|s| s.opcode);
        Ok(out)
    }

    /// Every (connection, opcode)'s statistics, summed over CPUs.
    fn summed(&self) -> anyhow::Result<Vec<(OpKey, KernelOpStats)>> {
        let map: PerCpuHashMap<&MapData, OpKey, OpStats> =
            PerCpuHashMap::try_from(self.ebpf.map(t::MAP_OPSTATS).context("stats map missing")?)?;
        let mut out = Vec::new();
        for item in map.iter() {
            let (key, values) = item?;
            let mut s = KernelOpStats {
                opcode: key.opcode,
                name: opcode_name(key.opcode),
                hist: vec![0; HIST_SLOTS],
                ..Default::default()
            };
            for v in values.iter() {
                s.sent += v.sent;
                s.done += v.done;
                s.errors += v.errors;
                s.total_ns += v.total_ns;
                s.max_ns = s.max_ns.max(v.max_ns);
                for (a, b) in s.hist.iter_mut().zip(v.hist.iter()) {
                    *a += b;
                }
            }
            out.push((key, s));
        }
        Ok(out)
    }

    /// Events lost because the ring buffer was full.
    pub fn dropped(&self) -> anyhow::Result<u64> {
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map(t::MAP_DROPPED).context("dropped map missing")?)?;
        Ok(map.get(&0, 0)?.iter().sum())
    }

    /// Take the pending ring-buffer events, keeping the last few for `stats`.
    pub fn drain_events(&mut self) -> anyhow::Result<usize> {
        let mut ring = RingBuf::try_from(self.ebpf.map_mut(t::MAP_EVENTS).context("ring missing")?)?;
        let mut n = 0;
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<TraceEvent>() {
                continue;
            }
            // SAFETY: the record is at least one TraceEvent long and is copied
            // out (read_unaligned) before the ring slot is released.
            let ev: TraceEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            if ev.dev != self.dev {
                continue;
            }
            tracing::debug!(
                op = %opcode_name(ev.opcode),
                latency_us = ev.latency_ns / 1000,
                error = ev.error,
                unique = ev.unique,
                "slow FUSE request"
            );
            n += 1;
        }
        self.events_seen += n as u64;
        Ok(n)
    }

    /// Slow-request events seen so far.
    pub fn events_seen(&self) -> u64 {
        self.events_seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_log2_histogram() {
        let mut h = vec![0u64; HIST_SLOTS];
        h[10] = 50; // [1024, 2048)
        h[20] = 50; // [1 Mi, 2 Mi)
        let p50 = percentile(&h, 50.0);
        assert!((1024..2048).contains(&p50) || p50 == 2048, "{p50}");
        let p99 = percentile(&h, 99.0);
        assert!((1 << 20..=1 << 21).contains(&p99), "{p99}");
        assert_eq!(percentile(&[0; 4], 50.0), 0);
    }

    #[test]
    fn format_parser_reads_this_kernels_tracepoints() {
        if check_layout("fuse").is_err() {
            // The layout check itself is exercised by the mount tests; here we
            // only need the parser on a kernel that has the events.
            assert!(!Path::new(TRACEFS).join("events/fuse/fuse_request_send").exists());
            return;
        }
        let f = read_format("fuse", "fuse_request_send").unwrap();
        assert_eq!(f["opcode"], (layout::SEND_OPCODE, 4));
    }
}
