//! `efuse bench` (the `efuse-bench` program): the same workloads on the raw backing directory, efuse
//! at every tier this kernel offers, and peer FUSE filesystems, with the
//! `dir` backend and with simulated 3FS latency (`sim`).
//!
//! Every target is mounted before the first measurement and the runs are
//! interleaved: each repetition runs every target once, in a rotating order,
//! so drift (page cache, CPU frequency, other load) spreads evenly. Each op
//! is timed on its own; rows give the median and p99 per op, ops/s over the
//! timed passes, and ratios of medians against the raw directory and
//! against plain FUSE (`efuse-off`) from the same run. For efuse targets the
//! kernel-side upcalls per op come from the fuse tracepoints.
//!
//! Benchmarks are never tests: nothing here asserts a speed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::BenchArgs;
use efuse::control::query_stats;

/// Sizes of the dataset and the passes.
#[derive(Clone, Debug, Serialize)]
struct Scale {
    stat_files: usize,
    stat_rounds: usize,
    deep_paths: usize,
    tree_dirs: usize,
    tree_files: usize,
    tree_dirs_sim: usize,
    small_files: usize,
    big_mib: usize,
    rand_ops: usize,
    churn_ops: usize,
    loader_files: usize,
    /// Files of the dataset-epoch workload, in directories of
    /// [`EPOCH_DIR_FILES`].
    epoch_files: usize,
    reps: usize,
    sim_reps: usize,
}

impl Scale {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                stat_files: 100,
                stat_rounds: 5,
                deep_paths: 50,
                tree_dirs: 100,
                tree_files: 100,
                tree_dirs_sim: 10,
                small_files: 200,
                big_mib: 32,
                rand_ops: 2000,
                churn_ops: 200,
                loader_files: 150,
                epoch_files: 20_000,
                reps: 3,
                sim_reps: 1,
            }
        } else {
            Self {
                stat_files: 1000,
                stat_rounds: 10,
                deep_paths: 300,
                tree_dirs: 100,
                tree_files: 120,
                tree_dirs_sim: 100,
                small_files: 1000,
                big_mib: 256,
                rand_ops: 20000,
                churn_ops: 1000,
                loader_files: 1000,
                epoch_files: 1_000_000,
                reps: 5,
                sim_reps: 2,
            }
        }
    }
}

/// The workloads, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Workload {
    StatWarm,
    DeepLookupCold,
    TreeWalkFirst,
    TreeWalkSecond,
    SmallOpenReadClose,
    SeqRead1M,
    RandRead4K,
    CreateUnlink,
    DataLoader,
    PyRead,
    LsL,
    EpochFirst,
    EpochSecond,
}

/// Files per directory of the dataset-epoch workload.
const EPOCH_DIR_FILES: usize = 1000;

impl Workload {
    const ALL: [Workload; 13] = [
        Self::StatWarm,
        Self::DeepLookupCold,
        Self::TreeWalkFirst,
        Self::TreeWalkSecond,
        Self::SmallOpenReadClose,
        Self::SeqRead1M,
        Self::RandRead4K,
        Self::CreateUnlink,
        Self::DataLoader,
        Self::PyRead,
        Self::LsL,
        Self::EpochFirst,
        Self::EpochSecond,
    ];

    /// The name `--only` takes.
    fn key(self) -> &'static str {
        match self {
            Self::StatWarm => "stat",
            Self::DeepLookupCold => "cold-lookup",
            Self::TreeWalkFirst | Self::TreeWalkSecond => "walk",
            Self::SmallOpenReadClose => "open-read",
            Self::SeqRead1M => "seq-read",
            Self::RandRead4K => "rand-read",
            Self::CreateUnlink => "create-unlink",
            Self::DataLoader => "loader",
            Self::PyRead => "py-read",
            Self::LsL => "ls-l",
            Self::EpochFirst | Self::EpochSecond => "epoch",
        }
    }

    /// One pass per target (a pass is the whole dataset, and the first one
    /// is cold only once).
    fn once(self) -> bool {
        matches!(self, Self::EpochFirst | Self::EpochSecond)
    }

    fn short(self) -> &'static str {
        match self {
            Self::StatWarm => "stat",
            Self::DeepLookupCold => "cold lookup",
            Self::TreeWalkFirst => "walk 1st",
            Self::TreeWalkSecond => "walk 2nd",
            Self::SmallOpenReadClose => "open+read 4K",
            Self::SeqRead1M => "seq read 1M",
            Self::RandRead4K => "rand read 4K",
            Self::CreateUnlink => "create+unlink",
            Self::DataLoader => "data loader",
            Self::PyRead => "python read",
            Self::LsL => "ls -l",
            Self::EpochFirst => "epoch 1st",
            Self::EpochSecond => "epoch 2nd",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::StatWarm => "stat, warm file",
            Self::DeepLookupCold => "cold lookup, depth-8 path",
            Self::TreeWalkFirst => "tree walk, 1st pass (per entry)",
            Self::TreeWalkSecond => "tree walk, 2nd pass (per entry)",
            Self::SmallOpenReadClose => "open+read+close 4 KiB",
            Self::SeqRead1M => "sequential read, 1 MiB",
            Self::RandRead4K => "random read 4 KiB",
            Self::CreateUnlink => "create+unlink",
            Self::DataLoader => "data loader, 16-128 KiB files x4 threads",
            Self::PyRead => "Python-style read 4 KiB (open, fstat, isatty, read, close)",
            Self::LsL => "ls -l of 1,000 entries, warm (per entry)",
            Self::EpochFirst => "dataset epoch, 1st pass: stat every file, shuffled (per file)",
            Self::EpochSecond => "dataset epoch, 2nd pass: stat every file, reshuffled (per file)",
        }
    }
}

/// One result row.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    workload: Workload,
    label: String,
    backend: String,
    target: String,
    ops: usize,
    median_ns: u64,
    p99_ns: u64,
    ops_per_s: f64,
    /// median / median of the raw directory (1.0 = raw speed).
    vs_raw: Option<f64>,
    /// median / median of plain FUSE (efuse-off) on the same backend.
    vs_fuse: Option<f64>,
    /// Kernel-side upcalls per op (efuse targets, from the tracepoints).
    upcalls_per_op: Option<f64>,
    /// CPU time the FUSE daemon spent per op (user + system, every thread),
    /// in ns; FUSE targets only.
    #[serde(default)]
    daemon_cpu_ns_per_op: Option<f64>,
    /// Wall time of the whole pass, ns (dataset epochs).
    #[serde(default)]
    pass_ns: Option<u64>,
    /// The daemon's resident memory (KiB) and open descriptors after the
    /// pass (dataset epochs; FUSE targets).
    #[serde(default)]
    daemon_rss_kib: Option<u64>,
    #[serde(default)]
    daemon_fds: Option<u64>,
}

/// Whole report.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    date: String,
    kernel: String,
    cpus: usize,
    quick: bool,
    notes: Vec<String>,
    rows: Vec<Row>,
}

/// How a target is mounted; `Drop` unmounts it.
struct Target {
    name: String,
    backend: &'static str,
    root: PathBuf,
    efuse: bool,
    child: Option<Child>,
    mounted: bool,
    /// The FUSE daemon serving the target.
    daemon: Option<u32>,
}

/// On-CPU time of every thread of `pid` so far, ns (schedstat).
fn cpu_ns(pid: u32) -> Option<u64> {
    let mut sum = 0u64;
    for t in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let s = fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        sum += s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(sum)
}

/// The `efuse` program: beside this one (as cargo builds and installs
/// them), else on PATH.
fn efuse_program() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("efuse")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "efuse".into())
}

impl Drop for Target {
    fn drop(&mut self) {
        if self.mounted {
            if self.efuse {
                let _ = Command::new(efuse_program())
                    .arg("umount")
                    .arg("--force")
                    .arg(&self.root)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            // Whatever happened above (no efuse binary to run, a peer's
            // mount): abort and detach what is still mounted here.
            if let Some(m) = efuse::server::state::mountinfo()
                .unwrap_or_default()
                .into_iter()
                .rev()
                .find(|m| m.mountpoint == self.root)
            {
                m.abort();
                let _ = nix::mount::umount2(&self.root, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn drop_caches() {
    // 2 = dentries and inodes; 3 would also drop the page cache.
    let _ = fs::write("/proc/sys/vm/drop_caches", b"2");
}

fn wait_mounted(p: &Path, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if efuse::server::state::connection_of(p).is_some() && fs::read_dir(p).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// One timed pass of a workload on a target.
struct Pass {
    /// Per-op latencies, ns.
    samples: Vec<u64>,
    wall: Duration,
    /// Kernel-side upcalls during the pass (efuse targets).
    calls: Option<u64>,
    /// Daemon CPU time during the pass, ns (FUSE targets).
    cpu: Option<u64>,
    /// The daemon's resident KiB and descriptors after the pass.
    usage: Option<(u64, u64)>,
}

struct Bench {
    scale: Scale,
    data: PathBuf,
    work: PathBuf,
    out: PathBuf,
    notes: Vec<String>,
}

impl Bench {
    fn mkdata(&self) -> anyhow::Result<()> {
        let s = &self.scale;
        let d = &self.data;
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        fs::create_dir_all(d.join("stat"))?;
        for i in 0..s.stat_files {
            fs::write(d.join(format!("stat/f{i}")), b"x")?;
        }
        for i in 0..s.deep_paths {
            let p = d.join(format!("deep/p{i}/a/b/c/d/e/f/g"));
            fs::create_dir_all(&p)?;
            fs::write(p.join("leaf"), b"x")?;
        }
        for j in 0..s.tree_dirs {
            let p = d.join(format!("tree/d{j}"));
            fs::create_dir_all(&p)?;
            for k in 0..s.tree_files {
                fs::write(p.join(format!("f{k}")), b"")?;
            }
        }
        fs::create_dir_all(d.join("small"))?;
        for i in 0..s.small_files {
            fs::write(d.join(format!("small/s{i}")), vec![7u8; 4096])?;
        }
        let big = d.join("big.bin");
        let chunk: Vec<u8> = (0..1 << 20).map(|_| rng.r#gen()).collect();
        let f = File::create(&big)?;
        for i in 0..s.big_mib {
            f.write_all_at(&chunk, (i << 20) as u64)?;
        }
        fs::create_dir_all(d.join("loader"))?;
        for i in 0..s.loader_files {
            let n = rng.gen_range(16..=128) * 1024;
            fs::write(d.join(format!("loader/l{i}")), &chunk[..n])?;
        }
        for j in 0..s.epoch_files.div_ceil(EPOCH_DIR_FILES) {
            let p = d.join(format!("epoch/d{j}"));
            fs::create_dir_all(&p)?;
            for k in 0..EPOCH_DIR_FILES.min(s.epoch_files - j * EPOCH_DIR_FILES) {
                File::create(p.join(format!("f{k}")))?;
            }
        }
        fs::create_dir_all(d.join("churn"))?;
        fs::create_dir_all(d.join("lsl"))?;
        for i in 0..LSL_ENTRIES {
            fs::write(d.join(format!("lsl/e{i:04}")), b"entry")?;
        }
        Ok(())
    }

    fn mount_efuse(
        &self,
        name: &str,
        backend: &'static str,
        tier: &str,
        extra: &[&str],
    ) -> anyhow::Result<Target> {
        let _mounting = mounting();
        let mnt = self.work.join("mnt").join(name);
        fs::create_dir_all(&mnt)?;
        let log = self.out.join("logs").join(format!("{name}.log"));
        let mut cmd = Command::new(efuse_program());
        cmd.arg("mount")
            .arg(&self.data)
            .arg(&mnt)
            .args(["--offload", tier])
            .arg("--log-file")
            .arg(&log);
        if backend == "sim" {
            cmd.args(["--backend", "sim"]);
        }
        cmd.args(extra);
        let out = cmd.output().context("starting efuse")?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let daemon = efuse::server::state::read_record(&mnt).map(|r| r.pid);
        Ok(Target {
            name: name.into(),
            backend,
            root: mnt,
            efuse: true,
            child: None,
            mounted: true,
            daemon,
        })
    }

    fn mount_peer(&self, name: &str, mut cmd: Command, mnt: PathBuf) -> anyhow::Result<Target> {
        let _mounting = mounting();
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        let pid = child.id();
        let mut t = Target {
            name: name.into(),
            backend: "dir",
            root: mnt.clone(),
            efuse: false,
            child: Some(child),
            mounted: false,
            daemon: Some(pid),
        };
        if !wait_mounted(&mnt, 10) {
            bail!("{name} did not mount");
        }
        t.mounted = true;
        Ok(t)
    }

    fn passthrough_ll(&self) -> anyhow::Result<PathBuf> {
        let src = Path::new("/usr/share/doc/libfuse3-dev/examples/passthrough_ll.c");
        if !src.exists() {
            bail!("libfuse3-dev examples not installed ({})", src.display());
        }
        let bin = self.work.join("passthrough_ll");
        if !bin.exists() {
            let flags = Command::new("pkg-config")
                .args(["--cflags", "--libs", "fuse3"])
                .output()?;
            let flags = String::from_utf8_lossy(&flags.stdout).to_string();
            let st = Command::new("gcc")
                .args(["-O2", "-I/usr/share/doc/libfuse3-dev/examples"])
                .arg(src)
                .args(flags.split_whitespace())
                .arg("-o")
                .arg(&bin)
                .status()?;
            if !st.success() {
                bail!("building passthrough_ll failed");
            }
        }
        Ok(bin)
    }

    fn targets(&mut self) -> Vec<Target> {
        let mut ts = vec![Target {
            name: "raw".into(),
            backend: "dir",
            root: self.data.clone(),
            efuse: false,
            child: None,
            mounted: false,
            daemon: None,
        }];
        // `efuse-off`/`efuse-kernel` use the classic /dev/fuse transport,
        // the `-uring` targets FUSE-over-io_uring (where the kernel offers it).
        let classic: &[&str] = &["--transport", "classic"];
        let uring: &[&str] = &["--transport", "uring"];
        let variants: [(&str, &'static str, &str, &[&str]); 8] = [
            ("efuse-off", "dir", "off", classic),
            ("efuse-off-uring", "dir", "off", uring),
            ("efuse-off-sim", "sim", "off", classic),
            ("efuse-kernel", "dir", "kernel", classic),
            ("efuse-kernel-uring", "dir", "kernel", uring),
            (
                "efuse-kernel-zo",
                "dir",
                "kernel",
                &["-o", "zero_open", "--transport", "classic"],
            ),
            ("efuse-kernel-sim", "sim", "kernel", classic),
            ("efuse-bpf", "dir", "bpf", &[]),
        ];
        for (name, backend, tier, extra) in variants {
            match self.mount_efuse(name, backend, tier, extra) {
                Ok(t) => ts.push(t),
                Err(e) => self.notes.push(format!("{name}: not run: {e:#}")),
            }
        }
        match self.passthrough_ll() {
            Ok(bin) => {
                let mnt = self.work.join("mnt/passthrough_ll");
                let _ = fs::create_dir_all(&mnt);
                let mut cmd = Command::new(bin);
                cmd.arg("-f")
                    .arg("-o")
                    .arg(format!("source={}", self.data.display()))
                    .arg(&mnt);
                match self.mount_peer("passthrough_ll", cmd, mnt) {
                    Ok(t) => ts.push(t),
                    Err(e) => self.notes.push(format!("passthrough_ll: not run: {e:#}")),
                }
            }
            Err(e) => self.notes.push(format!("passthrough_ll: not run: {e:#}")),
        }
        if which("bindfs") {
            let mnt = self.work.join("mnt/bindfs");
            let _ = fs::create_dir_all(&mnt);
            let mut cmd = Command::new("bindfs");
            cmd.arg("-f").arg(&self.data).arg(&mnt);
            match self.mount_peer("bindfs", cmd, mnt) {
                Ok(t) => ts.push(t),
                Err(e) => self.notes.push(format!("bindfs: not run: {e:#}")),
            }
        } else {
            self.notes.push("bindfs: not installed".into());
        }
        ts
    }

    /// One timed pass; returns per-op ns samples, the wall time, and the
    /// kernel-side upcalls during the timed part (efuse targets).
    fn pass(&self, w: Workload, t: &Target) -> anyhow::Result<Pass> {
        let mut before = None;
        let mut cpu_before = None;
        let mut begin = || {
            before = upcalls(t);
            cpu_before = t.daemon.and_then(cpu_ns);
            Instant::now()
        };
        let s = &self.scale;
        let r = &t.root;
        let mut samples = Vec::new();
        let timed =
            |samples: &mut Vec<u64>, f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<()> {
                let t0 = Instant::now();
                f()?;
                samples.push(t0.elapsed().as_nanos() as u64);
                Ok(())
            };
        let start;
        match w {
            Workload::StatWarm => {
                for i in 0..s.stat_files {
                    fs::metadata(r.join(format!("stat/f{i}")))?;
                }
                start = begin();
                for _ in 0..s.stat_rounds {
                    for i in 0..s.stat_files {
                        let p = r.join(format!("stat/f{i}"));
                        timed(&mut samples, &mut || Ok(fs::metadata(&p).map(|_| ())?))?;
                    }
                }
            }
            Workload::DeepLookupCold => {
                drop_caches();
                start = begin();
                for i in 0..s.deep_paths {
                    let p = r.join(format!("deep/p{i}/a/b/c/d/e/f/g/leaf"));
                    timed(&mut samples, &mut || Ok(fs::metadata(&p).map(|_| ())?))?;
                }
            }
            Workload::TreeWalkFirst | Workload::TreeWalkSecond => {
                let dirs = if t.backend == "sim" {
                    s.tree_dirs_sim
                } else {
                    s.tree_dirs
                };
                if w == Workload::TreeWalkFirst {
                    drop_caches();
                } else {
                    walk_tree(&r.join("tree"), dirs, &mut Vec::new())?;
                }
                start = begin();
                walk_tree(&r.join("tree"), dirs, &mut samples)?;
            }
            Workload::SmallOpenReadClose => {
                let mut buf = vec![0u8; 8192];
                for i in 0..s.small_files {
                    File::open(r.join(format!("small/s{i}")))?.read_exact(&mut buf[..4096])?;
                }
                start = begin();
                for i in 0..s.small_files {
                    let p = r.join(format!("small/s{i}"));
                    timed(&mut samples, &mut || {
                        let n = File::open(&p)?.read(&mut buf)?;
                        anyhow::ensure!(n == 4096, "short read {n}");
                        Ok(())
                    })?;
                }
            }
            Workload::SeqRead1M => {
                let p = r.join("big.bin");
                let mut buf = vec![0u8; 1 << 20];
                let mut f = File::open(&p)?;
                while f.read(&mut buf)? > 0 {}
                let mut f = File::open(&p)?;
                start = begin();
                for _ in 0..s.big_mib {
                    timed(&mut samples, &mut || {
                        f.read_exact(&mut buf)?;
                        Ok(())
                    })?;
                }
            }
            Workload::RandRead4K => {
                let f = File::open(r.join("big.bin"))?;
                let blocks = (s.big_mib << 20) / 4096;
                let mut rng = rand::rngs::StdRng::seed_from_u64(7);
                let mut buf = [0u8; 4096];
                start = begin();
                for _ in 0..s.rand_ops {
                    let off = rng.gen_range(0..blocks) as u64 * 4096;
                    timed(&mut samples, &mut || {
                        f.read_exact_at(&mut buf, off)?;
                        Ok(())
                    })?;
                }
            }
            Workload::CreateUnlink => {
                let d = self.data.join("churn").join(&t.name);
                let _ = fs::create_dir_all(&d);
                let d = r.join("churn").join(&t.name);
                start = begin();
                for i in 0..s.churn_ops {
                    let p = d.join(format!("c{i}"));
                    timed(&mut samples, &mut || {
                        fs::write(&p, b"churn")?;
                        fs::remove_file(&p)?;
                        Ok(())
                    })?;
                }
            }
            Workload::PyRead => {
                let mut buf = Vec::with_capacity(8192);
                for i in 0..s.small_files {
                    py_read(&r.join(format!("small/s{i}")), &mut buf)?;
                }
                start = begin();
                for i in 0..s.small_files {
                    let p = r.join(format!("small/s{i}"));
                    timed(&mut samples, &mut || {
                        let n = py_read(&p, &mut buf)?;
                        anyhow::ensure!(n == 4096, "short read {n}");
                        Ok(())
                    })?;
                }
            }
            Workload::EpochFirst | Workload::EpochSecond => {
                let mut order: Vec<usize> = (0..s.epoch_files).collect();
                let seed = if w == Workload::EpochFirst { 11 } else { 12 };
                order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
                let base = r.join("epoch");
                start = begin();
                for i in order {
                    let p = base.join(format!("d{}/f{}", i / EPOCH_DIR_FILES, i % EPOCH_DIR_FILES));
                    timed(&mut samples, &mut || Ok(fs::metadata(&p).map(|_| ())?))?;
                }
            }
            Workload::LsL => {
                let d = r.join("lsl");
                ls_l(&d, &mut Vec::new())?;
                start = begin();
                ls_l(&d, &mut samples)?;
            }
            Workload::DataLoader => {
                let mut order: Vec<usize> = (0..s.loader_files).collect();
                order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(3));
                let chunks: Vec<Vec<usize>> = order
                    .chunks(order.len().div_ceil(4))
                    .map(|c| c.to_vec())
                    .collect();
                start = begin();
                let results: Vec<anyhow::Result<Vec<u64>>> = std::thread::scope(|sc| {
                    let hs: Vec<_> = chunks
                        .into_iter()
                        .map(|c| {
                            sc.spawn(move || -> anyhow::Result<Vec<u64>> {
                                let mut out = Vec::new();
                                let mut buf = Vec::with_capacity(128 << 10);
                                for i in c {
                                    let t0 = Instant::now();
                                    buf.clear();
                                    File::open(r.join(format!("loader/l{i}")))?.read_to_end(&mut buf)?;
                                    out.push(t0.elapsed().as_nanos() as u64);
                                }
                                Ok(out)
                            })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().expect("loader thread")).collect()
                });
                for r in results {
                    samples.extend(r?);
                }
            }
        }
        let wall = start.elapsed();
        let cpu = match (cpu_before, t.daemon.and_then(cpu_ns)) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let calls = match (before, upcalls(t)) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        Ok(Pass {
            samples,
            wall,
            calls,
            cpu,
            usage: if w.once() {
                t.daemon
                    .and_then(|pid| efuse::control::process_usage(&format!("/proc/{pid}")))
            } else {
                None
            },
        })
    }
}

/// Ctrl-C (or SIGTERM, SIGHUP) ends the bench without leaving its mounts:
/// a thread waits for the signal, aborts and detaches every mount under
/// the scratch directory (a workload blocked on one returns), removes the
/// scratch tree and exits. Call before any other thread exists, so only
/// that thread takes the signals (children get an empty mask from std).
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Held while a target mounts, so the signal thread's sweep sees every mount.
static MOUNTING: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// Wait until the bench ends (the signal thread exits the process).
fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

/// Enter a mount: never once a signal came (the sweep may be done).
fn mounting() -> parking_lot::MutexGuard<'static, ()> {
    let g = MOUNTING.lock();
    if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
        drop(g);
        park_forever();
    }
    g
}

fn on_signal_unmount(work: &Path) -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut sigs = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        sigs.add(s);
    }
    sigs.thread_block().context("cannot block signals")?;
    let work = work.to_owned();
    std::thread::Builder::new()
        .name("efuse-bench-signals".into())
        .spawn(move || {
            let Ok(sig) = sigs.wait() else { return };
            INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
            let _sweep = MOUNTING.lock();
            eprintln!("efuse bench: {sig}: unmounting its targets");
            let mnt = work.join("mnt");
            for m in efuse::server::state::mountinfo().unwrap_or_default() {
                if m.mountpoint.starts_with(&mnt) {
                    m.abort();
                    let _ = nix::mount::umount2(&m.mountpoint, nix::mount::MntFlags::MNT_DETACH);
                }
            }
            let _ = fs::remove_dir_all(&work);
            std::process::exit(128 + sig as i32);
        })
        .context("spawning the signal thread")?;
    Ok(())
}

/// Entries of the `ls -l` workload's directory.
const LSL_ENTRIES: usize = 1000;

/// What Python's `open(p, 'rb').read()` asks of the filesystem: open,
/// fstat, isatty (TCGETS, which must fail), read to the end, close.
fn py_read(p: &Path, buf: &mut Vec<u8>) -> anyhow::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut f = File::open(p)?;
    let len = f.metadata()?.len() as usize;
    // SAFETY: zeroed plain-data out struct.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and out pointer.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TCGETS, &mut t) };
    anyhow::ensure!(rc < 0, "TCGETS succeeded on {}", p.display());
    buf.clear();
    buf.reserve(len + 1);
    Ok(f.read_to_end(buf)?)
}

/// What GNU `ls -l` asks per entry: the listing, then lstat, the SELinux
/// label and the access ACL of each. One sample per entry (its share of the
/// listing included).
fn ls_l(dir: &Path, samples: &mut Vec<u64>) -> anyhow::Result<()> {
    let xattr = |p: &std::ffi::CStr, name: &std::ffi::CStr, size: usize| {
        let mut buf = [0u8; 256];
        // SAFETY: valid C strings and a buffer of at least `size` bytes.
        unsafe { libc::lgetxattr(p.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), size) }
    };
    let t0 = Instant::now();
    let names: Vec<PathBuf> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    let list = t0.elapsed().as_nanos() as u64 / names.len().max(1) as u64;
    for p in names {
        let t = Instant::now();
        fs::symlink_metadata(&p)?;
        let c = std::ffi::CString::new(p.into_os_string().into_encoded_bytes())?;
        xattr(&c, c"security.selinux", 255);
        xattr(&c, c"system.posix_acl_access", 0);
        samples.push(list + t.elapsed().as_nanos() as u64);
    }
    Ok(())
}

/// `ls -lR`: list each directory and lstat every entry. One sample per
/// entry: its lstat plus its share of the directory listing.
fn walk(dir: &Path, samples: &mut Vec<u64>) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let entries: Vec<PathBuf> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    let share = t0.elapsed().as_nanos() as u64 / entries.len().max(1) as u64;
    let mut subdirs = Vec::new();
    for p in entries {
        let t = Instant::now();
        let md = fs::symlink_metadata(&p)?;
        samples.push(share + t.elapsed().as_nanos() as u64);
        if md.is_dir() {
            subdirs.push(p);
        }
    }
    for d in subdirs {
        walk(&d, samples)?;
    }
    Ok(())
}

/// Walk the first `dirs` directories of the tree (all of them for `dir`
/// targets; a subset behind simulated latency in quick runs).
fn walk_tree(tree: &Path, dirs: usize, samples: &mut Vec<u64>) -> anyhow::Result<()> {
    for j in 0..dirs {
        walk(&tree.join(format!("d{j}")), samples)?;
    }
    Ok(())
}

fn which(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).exists()))
        .unwrap_or(false)
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn upcalls(t: &Target) -> Option<u64> {
    if !t.efuse {
        return None;
    }
    let s = query_stats(&t.root).ok()?;
    s.trace.enabled.then(|| s.kernel.iter().map(|k| k.sent).sum())
}

/// `efuse bench`.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let r = run_bench(args);
    if r.is_err() && INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
        // Interrupted mid-way (its files swept away): the signal thread exits.
        park_forever();
    }
    r
}

fn run_bench(args: &BenchArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("efuse bench mounts filesystems and must run as root");
    }
    let started = Instant::now();
    let out = efuse::server::state::absolute(&args.out)?;
    fs::create_dir_all(out.join("logs"))?;
    // Everything the bench creates and deletes lives in a directory of its
    // own, never in the user's --work-dir itself.
    let work = match &args.work_dir {
        Some(w) => efuse::server::state::absolute(w)?,
        None => std::env::temp_dir(),
    }
    .join("efuse-bench");
    // A previous run's mounts are stale: clear them before reusing the tree.
    if let Ok(entries) = fs::read_dir(work.join("mnt")) {
        for e in entries.flatten() {
            let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _ = fs::remove_dir_all(work.join("data"));
    let _ = fs::remove_dir_all(work.join("mnt"));
    fs::create_dir_all(work.join("data"))?;
    on_signal_unmount(&work)?;
    let mut bench = Bench {
        scale: Scale {
            epoch_files: args.files.unwrap_or(Scale::new(args.quick).epoch_files),
            ..Scale::new(args.quick)
        },
        data: work.join("data"),
        work: work.clone(),
        out: out.clone(),
        notes: Vec::new(),
    };
    eprintln!("efuse bench: building the dataset in {}", bench.data.display());
    bench.mkdata()?;
    let targets = bench.targets();
    eprintln!(
        "efuse bench: targets: {}",
        targets
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    // samples[(workload, target index)]: latencies, wall, upcalls, daemon
    // CPU, daemon memory and descriptors
    type Acc = (Vec<u64>, Duration, u64, Option<u64>, Option<(u64, u64)>);
    let mut samples: BTreeMap<(Workload, usize), Acc> = BTreeMap::new();
    let mut failed = std::collections::BTreeSet::new();
    for w in Workload::ALL {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == w.key()) {
            continue;
        }
        let reps = if w.once() { 1 } else { bench.scale.reps };
        for rep in 0..reps {
            let n = targets.len();
            for k in 0..n {
                let i = (k + rep) % n;
                let t = &targets[i];
                if t.backend == "sim" && (rep >= bench.scale.sim_reps || w.once()) {
                    continue;
                }
                if failed.contains(&(w, i)) {
                    continue;
                }
                // A failing pass (say EMFILE under a small descriptor limit)
                // costs that row, not the whole comparison.
                let p = match bench.pass(w, t) {
                    Ok(p) => p,
                    // The signal thread is tearing down; it exits the process.
                    Err(_) if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) => park_forever(),
                    Err(e) => {
                        let msg = format!("{} on {}: failed: {e:#}", w.label(), t.name);
                        eprintln!("efuse bench: {msg}");
                        bench.notes.push(msg);
                        failed.insert((w, i));
                        samples.remove(&(w, i));
                        continue;
                    }
                };
                let e = samples.entry((w, i)).or_default();
                e.0.extend(p.samples);
                e.1 += p.wall;
                e.2 += p.calls.unwrap_or(0);
                if let Some(c) = p.cpu {
                    e.3 = Some(e.3.unwrap_or(0) + c);
                }
                e.4 = p.usage;
            }
        }
        eprintln!(
            "efuse bench: {} done ({:.0}s)",
            w.label(),
            started.elapsed().as_secs_f64()
        );
    }
    let mut rows = Vec::new();
    for ((w, i), (mut s, wall, calls, cpu, usage)) in samples {
        s.sort_unstable();
        let t = &targets[i];
        rows.push(Row {
            workload: w,
            label: w.label().into(),
            backend: t.backend.into(),
            target: t.name.clone(),
            ops: s.len(),
            median_ns: pct(&s, 50.0),
            p99_ns: pct(&s, 99.0),
            ops_per_s: s.len() as f64 / wall.as_secs_f64().max(1e-9),
            vs_raw: None,
            vs_fuse: None,
            upcalls_per_op: t
                .efuse
                .then(|| calls as f64 / s.len().max(1) as f64)
                .filter(|_| calls > 0),
            daemon_cpu_ns_per_op: cpu.map(|c| c as f64 / s.len().max(1) as f64),
            pass_ns: w.once().then_some(wall.as_nanos() as u64),
            daemon_rss_kib: usage.map(|u| u.0),
            daemon_fds: usage.map(|u| u.1),
        });
    }
    let median_of = |rows: &[Row], w: Workload, target: &str| {
        rows.iter()
            .find(|r| r.workload == w && r.target == target)
            .map(|r| r.median_ns as f64)
    };
    let snapshot = rows.clone();
    for r in &mut rows {
        if r.backend == "dir" && r.workload.once() {
            // A dataset epoch is compared by its whole pass: the tail counts.
            let raw = snapshot
                .iter()
                .find(|x| x.workload == r.workload && x.target == "raw")
                .and_then(|x| x.pass_ns);
            r.vs_raw = raw
                .zip(r.pass_ns)
                .map(|(raw, me)| me as f64 / (raw as f64).max(1.0));
        } else if r.backend == "dir" {
            r.vs_raw = median_of(&snapshot, r.workload, "raw").map(|raw| r.median_ns as f64 / raw.max(1.0));
        }
        let fuse = if r.backend == "sim" {
            "efuse-off-sim"
        } else {
            "efuse-off"
        };
        r.vs_fuse = median_of(&snapshot, r.workload, fuse).map(|f| r.median_ns as f64 / f.max(1.0));
    }
    drop(targets);
    if !args.keep {
        let _ = fs::remove_dir_all(&work);
    }
    let report = Report {
        date: chrono_like_now(),
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .into(),
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        quick: args.quick,
        notes: bench.notes.clone(),
        rows,
    };
    fs::write(out.join("results.json"), serde_json::to_string_pretty(&report)?)?;
    let md = markdown(&report);
    fs::write(out.join("results.md"), &md)?;
    print!("{md}");
    match crate::plot::plots(&report_points(&report), &out) {
        Ok(files) => eprintln!("efuse bench: plots: {}", files.join(", ")),
        Err(e) => eprintln!("efuse bench: no plots: {e:#}"),
    }
    eprintln!(
        "efuse bench: wrote {}/results.{{md,json}} in {:.0}s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn chrono_like_now() -> String {
    let out = Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn ratio(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.2}x"))
}

fn markdown(r: &Report) -> String {
    use efuse::cmd::stats::fmt_ns;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## efuse bench ({}), {}, Linux {}, {} CPUs\n",
        if r.quick { "quick" } else { "full" },
        r.date,
        r.kernel,
        r.cpus
    );
    let _ = writeln!(
        s,
        "Ratios are of medians from one interleaved run: `vs raw` = target / raw directory, \
         `vs FUSE` = target / plain FUSE (`efuse-off`) on the same backend; lower is faster. \
         `daemon CPU/op` = on-CPU time of every thread of the FUSE daemon during the pass / ops. \
         `-uring` targets use FUSE-over-io_uring, the others /dev/fuse.\n"
    );
    for backend in ["dir", "sim"] {
        let rows: Vec<&Row> = r
            .rows
            .iter()
            .filter(|x| x.backend == backend && !x.workload.once())
            .collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(
            s,
            "### backend `{backend}`{}\n",
            if backend == "sim" {
                " (simulated 3FS latency)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "| workload | target | median | p99 | ops/s | vs raw | vs FUSE | upcalls/op | daemon CPU/op |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
        for x in rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.0} | {} | {} | {} | {} |",
                x.label,
                x.target,
                fmt_ns(x.median_ns),
                fmt_ns(x.p99_ns),
                x.ops_per_s,
                ratio(x.vs_raw),
                ratio(x.vs_fuse),
                x.upcalls_per_op.map_or("-".into(), |u| format!("{u:.2}")),
                x.daemon_cpu_ns_per_op.map_or("-".into(), |c| fmt_ns(c as u64))
            );
        }
        let _ = writeln!(s);
    }
    let epochs: Vec<&Row> = r.rows.iter().filter(|x| x.workload.once()).collect();
    if !epochs.is_empty() {
        let files = epochs.iter().map(|x| x.ops).max().unwrap_or(0);
        let _ = writeln!(
            s,
            "### dataset epochs: {files} files in directories of {EPOCH_DIR_FILES}, `stat` of each in a \
             shuffled order, twice\n"
        );
        let _ = writeln!(
            s,
            "| target | pass | per file | pass time | vs raw | upcalls/file | daemon RSS | daemon fds |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|");
        for x in epochs {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} s | {} | {} | {} | {} |",
                x.target,
                if x.workload == Workload::EpochFirst {
                    "1st"
                } else {
                    "2nd"
                },
                fmt_ns(x.median_ns),
                x.pass_ns.unwrap_or(0) as f64 / 1e9,
                ratio(x.vs_raw),
                x.upcalls_per_op.map_or("-".into(), |u| format!("{u:.2}")),
                x.daemon_rss_kib
                    .map_or("-".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0)),
                x.daemon_fds.map_or("-".into(), |f| f.to_string()),
            );
        }
        let _ = writeln!(s);
    }
    for n in &r.notes {
        let _ = writeln!(s, "- {n}");
    }
    s
}

fn report_points(r: &Report) -> Vec<crate::plot::Point> {
    r.rows
        .iter()
        .map(|x| crate::plot::Point {
            group: x.backend.clone(),
            category: x.workload.short().to_string(),
            series: x.target.clone(),
            value_us: x.median_ns as f64 / 1000.0,
        })
        .collect()
}
