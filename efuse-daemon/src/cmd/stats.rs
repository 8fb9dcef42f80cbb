//! `efuse stats`: per-opcode table and log2 histograms, printed the way the
//! classic BPF tools (biolatency, fsslower) print them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::cli::StatsArgs;
use crate::control::{MountStats, query_stats};
use crate::server::state::absolute;
use crate::trace::KernelOpStats;

/// Format nanoseconds with a unit.
pub fn fmt_ns(ns: u64) -> String {
    let ns = ns as f64;
    if ns < 1e3 {
        format!("{ns:.0}ns")
    } else if ns < 1e6 {
        format!("{:.1}µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2}ms", ns / 1e6)
    } else {
        format!("{:.2}s", ns / 1e9)
    }
}

/// A log2 histogram in microseconds, biolatency style.
pub fn render_hist(title: &str, hist_ns: &[u64]) -> String {
    // Fold ns buckets into µs buckets: slot i covers [2^i, 2^(i+1)) ns.
    let mut us: BTreeMap<u32, u64> = BTreeMap::new();
    for (i, &n) in hist_ns.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let lo_us = (1u64 << i) / 1000;
        let slot = if lo_us == 0 { 0 } else { 64 - lo_us.leading_zeros() };
        *us.entry(slot).or_default() += n;
    }
    let mut out = String::new();
    let _ = writeln!(out, "{title}");
    if us.is_empty() {
        let _ = writeln!(out, "     (no samples)");
        return out;
    }
    let max = *us.values().max().unwrap_or(&1);
    let last = *us.keys().max().unwrap_or(&0);
    let first = *us.keys().min().unwrap_or(&0);
    let _ = writeln!(out, "{:>22} : {:<8} distribution", "usecs", "count");
    for slot in first..=last {
        let n = us.get(&slot).copied().unwrap_or(0);
        let (lo, hi) = if slot == 0 {
            (0, 1)
        } else {
            (1u64 << (slot - 1), (1u64 << slot) - 1)
        };
        let width = (n * 40).div_ceil(max.max(1)) as usize;
        let _ = writeln!(
            out,
            "{:>10} -> {:<9} : {:<8} |{:<40}|",
            lo,
            hi,
            n,
            "*".repeat(width.min(40))
        );
    }
    out
}

/// The per-opcode table; `prev` and `dt` give rates over an interval.
pub fn render_table(s: &MountStats, prev: Option<&MountStats>, dt: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "efuse stats {}  (connection {}, backend {}, offload {}, up {:.0}s)",
        s.mountpoint.display(),
        s.connection,
        s.backend,
        s.offload,
        s.uptime_s
    );
    if !s.transport.is_empty() {
        let _ = writeln!(out, "transport: {}", s.transport);
    }
    let _ = writeln!(
        out,
        "FUSE: {} ({}){}",
        s.fuse.label(),
        s.fuse.device().to_string_lossy(),
        match &s.hook {
            Some(h) => format!("; bpf hook: {h}"),
            None => String::new(),
        }
    );
    if !s.trace.enabled {
        let _ = writeln!(
            out,
            "kernel-side tracing off: {}",
            s.trace.reason.as_deref().unwrap_or("unknown reason")
        );
    }
    let _ = writeln!(
        out,
        "{:<16} {:>10} {:>7} {:>11} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "OP", "UPCALLS", "ERRORS", "UPCALLS/s", "P50", "P90", "P99", "MAX", "DAEMON", "DAEMON-AVG"
    );
    let mut ops: BTreeMap<u32, (Option<&KernelOpStats>, Option<&crate::metrics::OpCount>)> = BTreeMap::new();
    for k in &s.kernel {
        ops.entry(k.opcode).or_default().0 = Some(k);
    }
    for d in &s.daemon {
        ops.entry(d.opcode).or_default().1 = Some(d);
    }
    let mut total = 0;
    for (op, (k, d)) in &ops {
        let name = k
            .map(|k| k.name.clone())
            .or_else(|| d.map(|d| d.name.clone()))
            .unwrap_or_else(|| crate::metrics::opcode_name(*op));
        let (sent, errors) = k.map_or((0, 0), |k| (k.sent, k.errors));
        total += sent;
        let rate = match prev.and_then(|p| p.kernel.iter().find(|x| x.opcode == *op)) {
            Some(pk) if dt > 0.0 => (sent - pk.sent.min(sent)) as f64 / dt,
            None if prev.is_some() && dt > 0.0 => sent as f64 / dt,
            _ if s.uptime_s > 0.0 => sent as f64 / s.uptime_s,
            _ => 0.0,
        };
        let pct = |p: f64| k.map_or("-".into(), |k| fmt_ns(k.percentile_ns(p)));
        let (dcount, davg) = d.map_or((0, "-".to_string()), |d| {
            (
                d.count,
                d.total_ns.checked_div(d.count).map_or("-".into(), fmt_ns),
            )
        });
        let _ = writeln!(
            out,
            "{:<16} {:>10} {:>7} {:>11.1} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}",
            name,
            if k.is_some() { sent.to_string() } else { "-".into() },
            if k.is_some() {
                errors.to_string()
            } else {
                "-".into()
            },
            rate,
            pct(50.0),
            pct(90.0),
            pct(99.0),
            k.map_or("-".into(), |k| fmt_ns(k.max_ns)),
            dcount,
            davg
        );
    }
    let _ = writeln!(
        out,
        "total upcalls {total}; slow-request events {} (over {}), dropped {}; inodes held by the kernel {} (lookups {})",
        s.trace.events,
        fmt_ns(s.trace.slow_ns),
        s.trace.dropped,
        s.inodes.0,
        s.inodes.1
    );
    let _ = write!(
        out,
        "daemon: {:.1} MiB resident, {} descriptors open",
        s.daemon_rss_kib as f64 / 1024.0,
        s.daemon_fds
    );
    match &s.backend_nodes {
        Some(n) => {
            let _ = writeln!(
                out,
                "; backend holds {} inodes by {} ({} descriptors open for them{})",
                n.nodes,
                if n.mode == "handles" {
                    "file handle"
                } else {
                    "descriptor"
                },
                n.descriptors,
                if n.mode == "handles" {
                    format!(", {} opened by handle so far", n.opened_by_handle)
                } else {
                    String::new()
                }
            );
        }
        None => {
            let _ = writeln!(out);
        }
    }
    if let Some(c) = &s.cache {
        let _ = writeln!(
            out,
            "daemon metadata cache: {} hits, {} misses, {} directories prefetched ({} entries)",
            c.hits, c.misses, c.prefetches, c.prefetched_entries
        );
    }
    let b = &s.bpf;
    if b.attached || b.lookup_hits + b.getattr_hits > 0 {
        let _ = writeln!(
            out,
            "bpf tier{}: answered in the kernel: {} lookups, {} getattrs; sent to the daemon: {} lookups, {} getattrs; \
             maps hold {} entries, {} attrs; {} miss events ({} dropped), {} directories prefetched, \
             {} races, {} expired, {} refused by full maps, {} evicted (least recently used)",
            if b.attached { "" } else { " (detached)" },
            b.lookup_hits,
            b.getattr_hits,
            b.lookup_misses,
            b.getattr_misses,
            b.entries,
            b.attrs,
            b.events,
            b.events_dropped,
            b.prefetches,
            b.races,
            b.expired,
            b.map_full + b.lookups_map_full,
            b.evicted
        );
        let a = b.answers;
        let _ = writeln!(
            out,
            "bpf tier warm reads: answered in the kernel: {} opens (no FLUSH/RELEASE follows), {} ioctls, {} getxattrs; \
             sent to the daemon: {} opens, {} getxattrs; open map {} files ({} backing ids, {} held for kernel opens, \
             {} files over backing_max), no-xattr map {} inodes{}",
            b.open_hits,
            b.ioctl_hits,
            b.getxattr_hits,
            b.open_misses,
            b.getxattr_misses,
            b.opens,
            b.backing_ids,
            b.backing_held,
            b.backing_full,
            b.noxattr,
            match (a.open, a.ioctl, a.getxattr) {
                (true, true, true) => String::new(),
                _ => format!(
                    " (the kernel's hook lacks:{}{}{})",
                    if a.open { "" } else { " open" },
                    if a.ioctl { "" } else { " ioctl" },
                    if a.getxattr { "" } else { " getxattr" }
                ),
            }
        );
    } else if let Some(r) = &b.reason {
        let _ = writeln!(out, "bpf tier not attached: {r}");
    }
    out
}

/// `efuse stats`.
pub fn run(args: &StatsArgs) -> anyhow::Result<()> {
    let mp = absolute(&args.mountpoint)?;
    let print = |s: &MountStats, prev: Option<&MountStats>, dt: f64| -> anyhow::Result<()> {
        if args.json {
            println!("{}", serde_json::to_string(s)?);
            return Ok(());
        }
        print!("{}", render_table(s, prev, dt));
        if args.hist {
            for k in &s.kernel {
                println!();
                print!("{}", render_hist(&format!("{} latency", k.name), &k.hist));
            }
        }
        Ok(())
    };
    let first = query_stats(&mp)?;
    print(&first, None, 0.0)?;
    if !args.watch {
        return Ok(());
    }
    let mut prev = first;
    let mut n = 1;
    while args.count == 0 || n < args.count {
        std::thread::sleep(Duration::from_secs_f64(args.interval.max(0.05)));
        let cur = query_stats(&mp)?;
        if !args.json {
            println!();
        }
        print(&cur, Some(&prev), cur.uptime_s - prev.uptime_s)?;
        prev = cur;
        n += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_buckets_and_bars() {
        let mut h = vec![0u64; 40];
        h[13] = 10; // 8.2-16.4 µs
        h[14] = 40;
        let text = render_hist("LOOKUP latency", &h);
        assert!(text.contains("LOOKUP latency"));
        assert!(text.contains("8 -> 15"), "{text}");
        assert!(text.contains(&"*".repeat(40)), "{text}");
        assert!(render_hist("x", &[0; 40]).contains("no samples"));
    }

    #[test]
    fn ns_units() {
        assert_eq!(fmt_ns(500), "500ns");
        assert_eq!(fmt_ns(12_300), "12.3µs");
        assert_eq!(fmt_ns(4_500_000), "4.50ms");
    }
}
