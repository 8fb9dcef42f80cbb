//! Project chores: `cargo xtask setup | build | test | demo | bench | kernel | vm`.
//!
//! Every command installs what it needs first and is safe to run again:
//! `setup` checks each prerequisite and installs only what is missing.

mod stock;
mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "efuse project chores")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install prerequisites (apt packages, nightly rust-src, bpf-linker) and mount tracefs/bpffs/fusectl.
    Setup,
    /// Build the efuse binary (release).
    Build,
    /// Run setup, then every test (unit, property, real-mount integration).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Mount a demo directory with efuse (best tier: bpf on the patched kernel, else kernel), show it working, then run the quick latency comparison.
    Demo,
    /// Catch what a fresh or busy machine shows and a warm one hides: the
    /// real-mount suites --repeat times in a row (alternating io_uring and
    /// classic), with --load keeping every CPU busy meanwhile, then a report
    /// of every test that failed at least once; and the fuzzers with
    /// 100,000 cases. --long adds the conformance suites ten times longer
    /// than `test` (fsx 1,000,000 operations a setup, pjdfstest 30 runs a
    /// tier, stress-ng 60 s a tier).
    Soak {
        /// How many times to run the real-mount suites.
        #[arg(long, default_value_t = 3)]
        repeat: u32,
        /// Keep every CPU busy with other work while the suites run.
        #[arg(long)]
        load: bool,
        /// Also run the conformance suites ten times longer.
        #[arg(long)]
        long: bool,
    },
    /// Run the latency comparison (efuse bench) with a release build.
    Bench {
        /// Small dataset, under 2 minutes.
        #[arg(long)]
        quick: bool,
        /// Output directory for results.md, results.json and plots.
        #[arg(long, default_value = "bench-out")]
        out: PathBuf,
    },
    /// Build a whole kernel with the hook built in (Linux 6.12 +
    /// kernel/patches, a small config; cached by the hash of patches, config
    /// and source version) and print the bzImage path. The VM's default
    /// kernel is Debian's stock one with efuse.ko (`kmod`).
    Kernel,
    /// Fetch Debian's stock 6.12 kernel (image and headers, cached by
    /// version), build efuse.ko for it (cached by the hash of the patches
    /// and the module glue) and print the module's path.
    Kmod,
    /// Boot Debian's stock kernel with efuse.ko loaded under qemu, with an
    /// initramfs holding busybox, efuse and the given files, run a shell
    /// command as root, and exit with its status.
    Vm {
        /// Files to put into the VM's /bin (e.g. a test binary).
        #[arg(long = "add")]
        add: Vec<PathBuf>,
        /// Boot the whole kernel built with the hook in (`cargo xtask
        /// kernel`) instead of Debian's kernel with the module.
        #[arg(long)]
        patched: bool,
        /// Shell command to run inside the VM.
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
}

/// Debian packages: the eBPF toolchain (bpf-linker builds against LLVM 22),
/// bpftool, fuse3 (fusermount, mount.fuse3), and the peers the bench compares with.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "fuse3",
    "pkg-config",
    "fio",
    "bindfs",
    "libfuse3-dev",
    "fonts-dejavu-core",
    // The real-workload and conformance suites (tests/tools.rs, tests/conformance.rs).
    "git",
    "rsync",
    "sqlite3",
    "stress-ng",
    "python3",
    "acl",
];

/// Test tools from crates.io, pinned: (binary, crate, version).
const CARGO_TOOLS: &[(&str, &str, &str)] = &[("fsx", "fsx", "0.3.2"), ("pjdfstest", "pjdfstest", "0.2.2")];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: $ {cmd:?}");
    let st = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed with {st}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn is_mounted(path: &str, fstype: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.get(1) == Some(&path) && f.get(2) == Some(&fstype)
        })
}

/// The fuse module parameter that allows FUSE-over-io_uring.
const URING_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether this kernel serves FUSE over io_uring now.
fn uring_enabled() -> bool {
    std::fs::read_to_string(URING_PARAM).is_ok_and(|v| matches!(v.trim(), "Y" | "1"))
}

fn setup() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("setup needs root (apt-get, mounting tracefs/bpffs); run it with sudo");
    }
    apt_install(APT_PACKAGES)?;
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("rustup")?;
    if !String::from_utf8_lossy(&installed.stdout).contains("rust-src") {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    if !succeeds(Command::new("bpf-linker").arg("--version")) {
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    for (bin, krate, version) in CARGO_TOOLS {
        let have = Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(version));
        if !have {
            run(Command::new("cargo").args(["install", "--locked", &format!("{krate}@{version}")]))?;
        }
    }
    for (path, fstype) in [
        ("/sys/kernel/tracing", "tracefs"),
        ("/sys/fs/bpf", "bpf"),
        ("/sys/fs/fuse/connections", "fusectl"),
    ] {
        if !is_mounted(path, fstype) {
            std::fs::create_dir_all(path).ok();
            if let Err(e) = run(Command::new("mount").args(["-t", fstype, "none", path])) {
                eprintln!("xtask: warning: cannot mount {fstype} on {path}: {e:#}");
            }
        }
    }
    if !Path::new("/dev/fuse").exists() {
        let _ = run(Command::new("modprobe").arg("fuse"));
        if !Path::new("/dev/fuse").exists() {
            bail!("/dev/fuse is missing and `modprobe fuse` did not create it");
        }
    }
    // FUSE-over-io_uring is off by default in the kernel; test machines
    // turn it on so that the suite runs on both transports. (On a
    // production machine that is the administrator's decision: efuse's
    // `transport=auto` never writes it.)
    let uring = Path::new(URING_PARAM);
    if uring.exists() {
        if std::fs::read_to_string(uring).is_ok_and(|v| v.trim() == "N") {
            match std::fs::write(uring, b"1") {
                Ok(()) => eprintln!("xtask: enabled FUSE-over-io_uring ({URING_PARAM})"),
                Err(e) => eprintln!("xtask: warning: cannot enable FUSE-over-io_uring: {e}"),
            }
        }
    } else {
        eprintln!("xtask: this kernel has no FUSE-over-io_uring (Linux 6.14+); tests run on /dev/fuse only");
    }
    eprintln!("xtask: setup complete");
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Install what is missing from `packages`.
fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        eprintln!("xtask: apt packages present");
        return Ok(());
    }
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The integration test files that mount through the host kernel and whose
/// mounts follow EFUSE_TRANSPORT: every file in tests/tests but the VM
/// scenarios, the module build (no mount) and the bench smoke test (`efuse
/// bench` mounts each target with its transport named, both of them in one
/// run).
fn real_mount_suites() -> anyhow::Result<Vec<String>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(root().join("tests/tests")).context("tests/tests")? {
        let p = e?.path();
        if let Some(stem) = p.file_stem().and_then(|s| s.to_str())
            && p.extension().is_some_and(|x| x == "rs")
            && stem != "bpf_vm"
            && stem != "bench"
            && stem != "kmod"
        {
            v.push(stem.to_string());
        }
    }
    v.sort();
    Ok(v)
}

pub(crate) fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Build the programs the tests, the bench and the demo run: `efuse` and
/// `efuse-bench` (which `efuse bench` runs from beside it).
fn build_programs(release: bool) -> anyhow::Result<()> {
    let mut c = cargo();
    c.arg("build");
    if release {
        c.arg("--release");
    }
    run(c.args(["--package", "efuse-daemon", "--package", "efuse-bench", "--bins"]))
}

fn test(args: &[String]) -> anyhow::Result<()> {
    setup()?;
    // The real-mount tests run the efuse binary: build it first.
    build_programs(false)?;
    if args.is_empty() {
        // The standards every change is held to.
        run(cargo().args(["fmt", "--all", "--check"]))?;
        run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    }
    // The bpf tier's tests boot Debian's stock kernel with efuse.ko under
    // qemu.
    let stock = stock::kernel()?;
    let guest = efuse_tests::vm::Guest {
        kernel: stock.vmlinuz.clone(),
        module: Some(stock::module(&stock)?),
    };
    // Every mount of the run uses one transport; the suite runs once per
    // transport the kernel offers: io_uring first (`auto` would pick it),
    // then classic /dev/fuse. The VM scenarios run in the first pass only
    // (6.12's FUSE has no io_uring: they use classic).
    let first = if uring_enabled() { "uring" } else { "classic" };
    eprintln!("xtask: test run 1: EFUSE_TRANSPORT={first}");
    run(cargo()
        .arg("test")
        .args(args)
        .env("EFUSE_VM_KERNEL", &guest.kernel)
        .env(
            "EFUSE_VM_MODULE",
            guest.module.as_deref().unwrap_or(Path::new("")),
        )
        // tests/kmod.rs builds the module for that kernel as a user would.
        .env("EFUSE_KMOD_RELEASE", &stock.release)
        .env("EFUSE_KMOD_BUILD", &stock.build)
        .env("EFUSE_KMOD_SOURCE", &stock.fuse_src)
        .env("EFUSE_TRANSPORT", first))?;
    if first == "uring" {
        eprintln!("xtask: test run 2: EFUSE_TRANSPORT=classic (the real-mount suite again)");
        let mut c = cargo();
        c.args(["test", "--package", "efuse-tests"]);
        for t in real_mount_suites()? {
            c.args(["--test", &t]);
        }
        run(c.args(args).env("EFUSE_TRANSPORT", "classic"))?;
    }
    Ok(())
}

/// Debian's stock kernel and efuse.ko built for it.
fn stock_guest() -> anyhow::Result<efuse_tests::vm::Guest> {
    let k = stock::kernel()?;
    let module = stock::module(&k)?;
    Ok(efuse_tests::vm::Guest {
        kernel: k.vmlinuz,
        module: Some(module),
    })
}

/// Busy loops on every CPU until dropped (plain priority: they compete
/// with the suites as other work on the machine would).
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        for i in 0..100_000u64 {
                            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
                        }
                    }
                })
            })
            .collect();
        eprintln!("xtask: {n} busy loops keep every CPU loaded");
        Self { stop, threads }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The names of the tests libtest reported as failed in `output`.
fn failed_tests(output: &str) -> Vec<String> {
    let mut binary = String::new();
    let mut out = Vec::new();
    for line in output.lines() {
        if let Some(rest) = line.trim().strip_prefix("Running ") {
            // "Running tests/kernel.rs (target/debug/deps/kernel-...)"
            binary = rest
                .split_whitespace()
                .next()
                .and_then(|p| Path::new(p).file_stem())
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
        }
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... FAILED"))
        {
            out.push(format!("{binary}::{name}"));
        }
    }
    out
}

/// libtest's "---- name stdout ----" section of failed test `suite::name`.
fn failure_output(output: &str, test: &str) -> Option<String> {
    let name = test.split_once("::").map_or(test, |(_, n)| n);
    let start = output.find(&format!("---- {name} stdout ----"))?;
    let rest = &output[start..];
    let end = [rest.find("\n\n---- "), rest.find("\nfailures:\n")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(rest.len());
    Some(rest[..end].trim_end().to_string())
}

fn soak(repeat: u32, load: bool, long: bool) -> anyhow::Result<()> {
    setup()?;
    build_programs(false)?;
    run(cargo().args(["test", "--package", "efuse-tests", "--no-run"]))?;
    let _load = load.then(Load::start);
    let mut failures: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
    let mut broken_runs = Vec::new();
    let logs = root().join("target/soak");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs)?;
    for i in 1..=repeat {
        let transport = if i % 2 == 1 && uring_enabled() {
            "uring"
        } else {
            "classic"
        };
        eprintln!("xtask: soak run {i}/{repeat}: real-mount suites, EFUSE_TRANSPORT={transport}");
        // cargo's "Running tests/x.rs" lines (stderr) and libtest's results
        // (stdout) in one stream, in order, to name each failure's suite.
        let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut c = Command::new("sh");
        c.current_dir(root())
            .args(["-c", "exec \"$0\" \"$@\" 2>&1", &cargo_bin])
            .args(["test", "--package", "efuse-tests", "--no-fail-fast"]);
        for t in real_mount_suites()? {
            c.args(["--test", &t]);
        }
        let started = std::time::Instant::now();
        let out = c
            .env("EFUSE_TRANSPORT", transport)
            .stdin(std::process::Stdio::null())
            .output()
            .context("running the suites")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // Every run's whole output is kept: a failure seen once must be
        // readable afterwards, not only named.
        let log = logs.join(format!("run-{i}.log"));
        std::fs::write(&log, &text).with_context(|| format!("writing {}", log.display()))?;
        let failed = failed_tests(&text);
        eprintln!(
            "xtask: soak run {i}: {} in {:.0?}, {} failed",
            if out.status.success() { "passed" } else { "failed" },
            started.elapsed(),
            failed.len()
        );
        if !out.status.success() && failed.is_empty() {
            // Failed without a failing test (a crash, a build error): keep
            // the output's end.
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            broken_runs.push((i, tail.into_iter().rev().collect::<Vec<_>>().join("\n")));
        }
        for f in failed {
            eprintln!("xtask: soak run {i}: FAILED {f}");
            if let Some(section) = failure_output(&text, &f) {
                eprintln!("{section}");
            }
            failures.entry(f).or_default().push(i);
        }
    }
    eprintln!("xtask: soak: fuzzers, 100,000 cases a property");
    let fuzz = cargo()
        .args(["test", "--package", "efuse-daemon", "--test", "fuzz_wire"])
        .env("EFUSE_FUZZ_CASES", "100000")
        .status()?;
    if long {
        run(cargo()
            .args([
                "test",
                "--test",
                "conformance",
                "--test",
                "tools",
                "--test",
                "defects",
            ])
            .env("EFUSE_SOAK", "1"))?;
    }
    println!(
        "soak: {repeat} runs of the real-mount suites{}",
        if load { " with every CPU loaded" } else { "" }
    );
    for (t, runs) in &failures {
        println!("  FAILED at least once: {t} (runs {runs:?})");
    }
    for (i, tail) in &broken_runs {
        println!("  run {i} failed outside any test:\n{tail}");
    }
    println!("  each run's output: {}", logs.display());
    if failures.is_empty() && broken_runs.is_empty() {
        println!("  no test failed");
    }
    if !fuzz.success() {
        println!("  the fuzzers failed");
    }
    if !failures.is_empty() || !broken_runs.is_empty() || !fuzz.success() {
        bail!("soak found failures");
    }
    Ok(())
}

fn demo() -> anyhow::Result<()> {
    setup()?;
    build_programs(true)?;
    let efuse = root().join("target/release/efuse");
    let base = std::env::temp_dir().join("efuse-demo");
    let (src, mnt) = (base.join("data"), base.join("mnt"));
    let _ = Command::new(&efuse)
        .arg("umount")
        .arg("--force")
        .arg(&mnt)
        .output();
    std::fs::create_dir_all(src.join("docs"))?;
    std::fs::create_dir_all(&mnt)?;
    std::fs::write(src.join("docs/hello.txt"), "hello from the backing directory\n")?;
    run(Command::new(&efuse)
        .arg("mount")
        .arg(&src)
        .arg(&mnt)
        .args(["--offload", "auto"]))?;
    let res = (|| -> anyhow::Result<()> {
        run(Command::new("ls").arg("-la").arg(mnt.join("docs")))?;
        run(Command::new("cat").arg(mnt.join("docs/hello.txt")))?;
        std::fs::write(mnt.join("docs/written.txt"), "written through efuse\n")?;
        eprintln!(
            "xtask: backing file now holds: {}",
            std::fs::read_to_string(src.join("docs/written.txt"))?.trim()
        );
        run(Command::new(&efuse).arg("status"))?;
        // Ten more stats of the same file: the kernel answers them itself.
        for _ in 0..10 {
            std::fs::metadata(mnt.join("docs/hello.txt"))?;
        }
        run(Command::new(&efuse).arg("stats").arg(&mnt))?;
        Ok(())
    })();
    run(Command::new(&efuse).arg("umount").arg(&mnt))?;
    res?;
    eprintln!("xtask: now the latency comparison: raw directory vs plain FUSE vs efuse tiers vs peers");
    bench(true, &root().join("bench-out"))
}

fn bench(quick: bool, out: &Path) -> anyhow::Result<()> {
    setup()?;
    build_programs(true)?;
    let mut cmd = Command::new(root().join("target/release/efuse"));
    cmd.arg("bench").arg("--out").arg(out);
    if quick {
        cmd.arg("--quick");
    }
    run(&mut cmd)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup(),
        Cmd::Build => build_programs(true),
        Cmd::Test { args } => test(&args),
        Cmd::Demo => demo(),
        Cmd::Soak { repeat, load, long } => soak(repeat, load, long),
        Cmd::Bench { quick, out } => bench(quick, &out),
        Cmd::Kernel => {
            let image = vm::patched_kernel()?;
            println!("{}", image.display());
            Ok(())
        }
        Cmd::Kmod => {
            build_programs(false)?;
            let g = stock_guest()?;
            println!("{}", g.module.unwrap_or_default().display());
            Ok(())
        }
        Cmd::Vm { add, patched, cmd } => {
            setup()?;
            build_programs(false)?;
            let guest = if patched {
                efuse_tests::vm::Guest {
                    kernel: vm::patched_kernel()?,
                    module: None,
                }
            } else {
                stock_guest()?
            };
            let mut files = vec![root().join("target/debug/efuse")];
            files.extend(add);
            let code = vm::run_in_vm(
                &guest,
                &files,
                &cmd.join(" "),
                std::time::Duration::from_secs(1800),
            )?;
            std::process::exit(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_tests_are_named_with_their_suite() {
        let out = "     Running tests/kernel.rs (target/debug/deps/kernel-0123abcd)\n\
                   test a ... ok\n\
                   test b_fails ... FAILED\n\
                   \n     Running tests/posix.rs (target/debug/deps/posix-99)\n\
                   test c ... FAILED\n";
        assert_eq!(failed_tests(out), ["kernel::b_fails", "posix::c"]);
        assert!(failed_tests("test x ... ok\n").is_empty());
    }
}
