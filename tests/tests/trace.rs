//! eBPF tracing of real mounts: kernel-side counts from the fuse
//! tracepoints against the daemon's own counters, per-mount separation,
//! and cleanup of programs and maps.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use efuse_tests::{TestMount, efuse, mount_stats};
use serde_json::Value;

/// opcode name -> (kernel upcalls, daemon count)
fn counts(v: &Value) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for k in v["kernel"].as_array().unwrap() {
        out.entry(k["name"].as_str().unwrap().into()).or_default().0 = k["sent"].as_u64().unwrap();
    }
    for d in v["daemon"].as_array().unwrap() {
        out.entry(d["name"].as_str().unwrap().into()).or_default().1 = d["count"].as_u64().unwrap();
    }
    out
}

const EXACT: [&str; 5] = ["LOOKUP", "GETATTR", "OPEN", "READ", "RELEASE"];

/// Wait until kernel and daemon agree on the exact opcodes (RELEASE is
/// asynchronous and the daemon counts after replying), then return them.
fn settled(mnt: &Path) -> (Value, BTreeMap<String, (u64, u64)>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = mount_stats(mnt);
        let c = counts(&v);
        let agree = EXACT.iter().all(|op| c.get(*op).is_none_or(|(k, d)| k == d));
        if agree || Instant::now() > deadline {
            return (v, c);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn workload(m: &TestMount, files: usize, stats_each: usize) {
    for i in 0..files {
        fs::write(m.b(format!("f{i}")), vec![b'x'; 10_000]).unwrap();
    }
    for i in 0..files {
        for _ in 0..stats_each {
            fs::metadata(m.m(format!("f{i}"))).unwrap();
        }
        let mut buf = Vec::new();
        fs::File::open(m.m(format!("f{i}")))
            .unwrap()
            .read_to_end(&mut buf)
            .unwrap();
        assert_eq!(buf.len(), 10_000);
    }
    assert!(fs::metadata(m.m("missing")).is_err());
}

#[test]
fn tracepoint_counts_equal_daemon_counts() {
    let m = TestMount::new();
    workload(&m, 20, 5);
    let (v, c) = settled(&m.mnt());
    assert_eq!(
        v["trace"]["enabled"], true,
        "tracing should be on: {}",
        v["trace"]
    );
    for op in EXACT {
        let (k, d) = c.get(op).copied().unwrap_or_default();
        assert!(k > 0, "{op}: no upcalls counted");
        assert_eq!(k, d, "{op}: tracepoints counted {k}, daemon counted {d}");
    }
    // 20 files x 5 stats with zero TTLs: every stat is a LOOKUP.
    assert!(c["LOOKUP"].0 >= 100, "{:?}", c["LOOKUP"]);
    assert!(c["READ"].0 >= 20);
    // FUSE_INIT happened before the daemon knew its connection and was still counted.
    assert_eq!(c["INIT"].0, 1);
    // The missing file is one LOOKUP answered with an error.
    let lookup = v["kernel"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "LOOKUP")
        .unwrap();
    assert!(lookup["errors"].as_u64().unwrap() >= 1);
    // The histogram holds every completed request.
    let hist_total: u64 = lookup["hist"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(hist_total, lookup["done"].as_u64().unwrap());
}

#[test]
fn two_mounts_are_counted_separately() {
    let a = TestMount::new();
    let b = TestMount::new();
    assert_ne!(a.connection, b.connection);
    workload(&a, 5, 2);
    workload(&b, 30, 4);
    for (m, min_lookups) in [(&a, 10), (&b, 120)] {
        let (v, c) = settled(&m.mnt());
        assert_eq!(v["connection"].as_u64().unwrap() as u32, m.connection);
        for op in EXACT {
            let (k, d) = c.get(op).copied().unwrap_or_default();
            // Counting another mount's requests would make k exceed d.
            assert_eq!(
                k, d,
                "{op} on connection {}: kernel {k}, daemon {d}",
                m.connection
            );
        }
        assert!(c["LOOKUP"].0 >= min_lookups);
    }
    let (la, lb) = (
        counts(&mount_stats(&a.mnt()))["LOOKUP"].0,
        counts(&mount_stats(&b.mnt()))["LOOKUP"].0,
    );
    assert!(la < lb, "mount a {la} lookups, mount b {lb}");
}

fn bpf_ids_of(pid: u32) -> (Vec<u32>, Vec<u32>) {
    let (mut progs, mut maps) = (Vec::new(), Vec::new());
    for e in fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap().flatten() {
        let Ok(text) = fs::read_to_string(e.path()) else {
            continue;
        };
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("prog_id:") {
                progs.push(v.trim().parse().unwrap());
            } else if let Some(v) = line.strip_prefix("map_id:") {
                maps.push(v.trim().parse().unwrap());
            }
        }
    }
    progs.sort();
    progs.dedup();
    maps.sort();
    maps.dedup();
    (progs, maps)
}

fn exists(kind: &str, id: u32) -> bool {
    std::process::Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn unmount_leaves_no_programs_or_maps() {
    let m = TestMount::new();
    let pid = m.pid().unwrap();
    let (progs, maps) = bpf_ids_of(pid);
    assert!(
        progs.len() >= 2,
        "daemon should hold its two tracing programs: {progs:?}"
    );
    assert!(!maps.is_empty());
    for &p in &progs {
        assert!(exists("prog", p), "bpftool cannot see prog {p}");
    }
    let st = m.unmount();
    assert!(st.success());
    // The kernel frees programs and maps from RCU callbacks and a
    // workqueue after the last reference goes; allow it a moment.
    let deadline = Instant::now() + Duration::from_secs(60);
    let left = || -> Vec<String> {
        let p = progs
            .iter()
            .filter(|&&p| exists("prog", p))
            .map(|p| format!("prog {p}"));
        let m = maps
            .iter()
            .filter(|&&id| exists("map", id))
            .map(|id| format!("map {id}"));
        p.chain(m).collect()
    };
    while !left().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(left().is_empty(), "left behind: {:?}", left());
    // Nothing is pinned.
    let pinned: Vec<_> = fs::read_dir("/sys/fs/bpf")
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !pinned
            .iter()
            .any(|n| n.to_string_lossy().to_lowercase().contains("efuse")),
        "{pinned:?}"
    );
}

#[test]
fn trace_off_mounts_and_says_so() {
    let m = TestMount::with_args(&["--trace", "off"]);
    fs::write(m.m("f"), b"x").unwrap();
    let v = mount_stats(&m.mnt());
    assert_eq!(v["trace"]["enabled"], false);
    assert!(v["trace"]["reason"].as_str().unwrap().contains("--trace off"));
    assert!(v["kernel"].as_array().unwrap().is_empty());
    // The daemon's own counters still work.
    assert!(counts(&v)["CREATE"].1 >= 1);
    assert!(
        bpf_ids_of(m.pid().unwrap()).0.is_empty(),
        "no programs with --trace off"
    );
}

#[test]
fn slow_requests_reach_the_ring_buffer() {
    // Every metadata op takes ~3 ms in the sim backend; the threshold is 1 ms.
    let m = TestMount::with_config(
        "backend = \"sim\"\ntrace_slow_us = 1000\n[sim]\nmeta_us = 3000\njitter = 0.0\n",
        &[],
    );
    for _ in 0..10 {
        let _ = fs::metadata(m.m("nothing-here"));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = mount_stats(&m.mnt());
        if v["trace"]["events"].as_u64().unwrap() >= 10 {
            assert_eq!(v["trace"]["dropped"], 0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slow events never arrived: {}",
            v["trace"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn stats_table_and_histograms_print() {
    let m = TestMount::new();
    workload(&m, 3, 3);
    let (code, out, err) = efuse(&[OsStr::new("stats"), OsStr::new("--hist"), m.mnt().as_os_str()]);
    assert_eq!(code, 0, "{err}");
    for want in [
        "UPCALLS",
        "P99",
        "LOOKUP",
        "GETATTR",
        "usecs",
        "distribution",
        "total upcalls",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let (code, _, err) = efuse(&[OsStr::new("stats"), OsStr::new("/nonexistent-mount")]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot reach"), "{err}");
}
