//! Established conformance and stress suites run against real mounts:
//! fsx (random I/O with every read verified), stress-ng's filesystem
//! stressors with `--verify`, and pjdfstest. Each is also run, with the
//! same settings, on a plain directory, so a failure or a skip that the
//! setup itself causes shows there too.
//!
//! The sizes here keep the file within a few minutes of CI; `cargo xtask
//! soak` sets `EFUSE_SOAK=1`, which runs each suite ten times longer.

use std::path::Path;
use std::process::{Command, Stdio};

use efuse_tests::{TestMount, Tmpfs};

fn soak() -> u64 {
    if std::env::var_os("EFUSE_SOAK").is_some_and(|v| v == "1") {
        10
    } else {
        1
    }
}

/// Run a command, returning (exit code, stdout + stderr).
fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (cargo xtask setup installs fsx, pjdfstest and stress-ng)")
    });
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// fsx's configuration: every operation it has, hole punching included,
/// with or without the mmap ones.
fn fsx_config(dir: &Path, mmap: bool) -> std::path::PathBuf {
    let m = if mmap { 10 } else { 0 };
    let text = format!(
        "flen = 262144\n\
         [weights]\n\
         close_open = 1\nread = 10\nwrite = 10\nmapread = {m}\nmapwrite = {m}\ninvalidate = {inv}\n\
         truncate = 4\nfsync = 1\nfdatasync = 1\nposix_fallocate = 2\npunch_hole = 2\nsendfile = 1\n\
         posix_fadvise = 1\ncopy_file_range = 2\n",
        inv = if mmap { 1 } else { 0 },
    );
    let p = dir.join(format!("fsx-{}.toml", if mmap { "mmap" } else { "plain" }));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn fsx_with_and_without_mmap_on_every_tier() {
    // Backing directories on a tmpfs: fsx's fsyncs and fallocates then cost
    // what the daemon costs, not what the disk does. 50,000 operations with
    // mmap and 50,000 without, per setup; the setups run side by side.
    let ops = 50_000 * soak();
    let base = Tmpfs::new();
    let setups: Vec<(&str, Vec<&str>, u64)> = vec![
        ("off", vec!["--offload", "off"], ops),
        ("kernel", vec!["--offload", "kernel"], ops),
        (
            "mem kernel",
            vec!["--offload", "kernel", "--backend", "mem"],
            ops / 5,
        ),
    ];
    let mut threads = Vec::new();
    for (i, (name, args, ops)) in setups.into_iter().enumerate() {
        let basep = base.path().to_owned();
        threads.push(std::thread::spawn(move || {
            let m = TestMount::with_args_in(&basep, &args);
            let art = m.scratch().join("fsx-artifacts");
            std::fs::create_dir_all(&art).unwrap();
            for (j, mmap) in [false, true].into_iter().enumerate() {
                let cfg = fsx_config(m.scratch(), mmap);
                let seed = (100 + 10 * i + j).to_string();
                let (code, out) = run(Command::new("fsx")
                    .args(["-q", "-N", &ops.to_string(), "-S", &seed, "-f"])
                    .arg(&cfg)
                    .arg("-P")
                    .arg(&art)
                    .arg(m.m(format!("fsx-{j}"))));
                assert!(
                    code == 0 && out.contains("All operations completed A-OK"),
                    "fsx on {name} (mmap {mmap}, seed {seed}, {ops} ops) failed with {code}:\n{}",
                    tail(&out, 40)
                );
            }
            ops * 2
        }));
    }
    let total: u64 = threads.into_iter().map(|t| t.join().expect("fsx run")).sum();
    eprintln!("fsx: {total} operations, zero failures");
    // The same configuration on the plain directory, as a check of the setup.
    let plain = base.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let (code, out) = run(Command::new("fsx")
        .args(["-q", "-N", "5000", "-S", "1", "-f"])
        .arg(fsx_config(base.path(), true))
        .arg("-P")
        .arg(base.path())
        .arg(plain.join("f")));
    assert_eq!(code, 0, "fsx on the plain directory: {}", tail(&out, 20));
}

#[test]
fn stress_ng_filesystem_stressors_verify() {
    let secs = 6 * soak();
    let stressors = [
        "dir",
        "dentry",
        "filename",
        "rename",
        "link",
        "symlink",
        "chmod",
        "xattr",
        "fallocate",
        "seek",
        "hdd",
    ];
    let stress = |dir: &Path| {
        let mut c = Command::new("stress-ng");
        for s in stressors {
            c.args([format!("--{s}"), "1".into()]);
        }
        c.args([
            "--verify",
            "--hdd-bytes",
            "32M",
            "--fallocate-bytes",
            "32M",
            "--timeout",
        ])
        .arg(format!("{secs}s"))
        .arg("--temp-path")
        .arg(dir)
        .arg("--metrics-brief");
        run(&mut c)
    };
    for tier in ["off", "kernel"] {
        let m = TestMount::with_args(&["--offload", tier]);
        let (code, out) = stress(&m.mnt());
        assert!(
            code == 0 && out.contains("successful run completed") && !out.contains("fail:"),
            "stress-ng on the {tier} tier exited {code}:\n{}",
            tail(&out, 40)
        );
        // Every stressor made progress through the mount.
        for s in stressors {
            assert!(
                out.lines().any(|l| l.contains(&format!("] {s} "))),
                "{tier}: no metrics for {s}:\n{out}"
            );
        }
        // Nothing is left behind on the backing directory.
        assert!(
            std::fs::read_dir(m.backing()).unwrap().next().is_none(),
            "{tier}: stress-ng left files"
        );
        if tier == "off" {
            let (code, out) = stress(&m.twin());
            assert_eq!(code, 0, "stress-ng on the plain directory:\n{}", tail(&out, 20));
        }
    }
}

/// pjdfstest's outcome: its summary line and the names of skipped tests.
struct Pjd {
    code: i32,
    failed: u64,
    passed: u64,
    skipped: Vec<String>,
    out: String,
}

fn pjdfstest(config: &Path, dir: &Path, secondary: &Path) -> Pjd {
    let (code, out) = run(Command::new("pjdfstest")
        .arg("-c")
        .arg(config)
        .arg("-p")
        .arg(dir)
        .arg("-s")
        .arg(secondary)
        .current_dir(dir));
    let summary = out
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or_else(|| panic!("pjdfstest printed no summary:\n{}", tail(&out, 30)))
        .to_string();
    let num = |what: &str| {
        summary
            .split(',')
            .find(|p| p.contains(what))
            .and_then(|p| p.split_whitespace().find_map(|w| w.parse::<u64>().ok()))
            .unwrap_or(0)
    };
    let mut skipped: Vec<String> = out
        .lines()
        .filter(|l| l.trim_end().ends_with("skipped"))
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect();
    skipped.sort();
    Pjd {
        code,
        failed: num("failed"),
        passed: num("passed"),
        skipped,
        out,
    }
}

#[test]
fn pjdfstest_on_both_tiers_several_runs() {
    // Two unprivileged users for its permission tests (they exist on
    // Debian); the mount lets others in (allow_other, so the kernel checks
    // modes), and every directory above it must be searchable for them.
    let scratch = Tmpfs::new();
    let config = scratch.path().join("pjdfstest.toml");
    std::fs::write(
        &config,
        "[features]\nposix_fallocate = {}\nutimensat = {}\nutime_now = {}\nrename_ctime = {}\n\
         [settings]\nnaptime = 0.01\nallow_remount = false\nexpected_failures = []\n\
         [dummy_auth]\nentries = [[\"nobody\", \"nogroup\"], [\"daemon\", \"daemon\"]]\n",
    )
    .unwrap();
    let secondary = scratch.path().join("secondary");
    std::fs::create_dir(&secondary).unwrap();
    let runs = 3 * soak();
    let mut plain_skips = None;
    for tier in ["off", "kernel"] {
        let m = TestMount::with_args(&["--offload", tier, "-o", "allow_other"]);
        let world = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap()
        };
        for p in [m.scratch(), &m.scratch().join("mounts"), &m.twin(), &m.mnt()] {
            world(p);
        }
        if plain_skips.is_none() {
            let plain = pjdfstest(&config, &m.twin(), &secondary);
            assert!(
                plain.code == 0 && plain.failed == 0,
                "pjdfstest fails on the plain directory:\n{}",
                tail(&plain.out, 30)
            );
            plain_skips = Some(plain.skipped);
        }
        for run in 0..runs {
            let r = pjdfstest(&config, &m.mnt(), &secondary);
            let failures: Vec<&str> = r
                .out
                .lines()
                .filter(|l| l.trim_end().ends_with("FAILED"))
                .collect();
            assert!(
                r.code == 0 && r.failed == 0,
                "pjdfstest on the {tier} tier, run {run}: {} failed:\n{}\n{}",
                r.failed,
                failures.join("\n"),
                tail(&r.out, 20)
            );
            assert!(r.passed > 300, "{tier}: only {} passed", r.passed);
            // The same tests are skipped as on the plain directory (the
            // EROFS ones: they need remounts, which this run does not
            // allow), plus one: link::link_count_max needs LINK_MAX, which
            // glibc's pathconf knows per filesystem magic and not for FUSE
            // (nor tmpfs); efuse cannot change that answer.
            let expected: Vec<String> = plain_skips
                .iter()
                .flatten()
                .cloned()
                .chain(std::iter::once("link::link_count_max".to_string()))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            assert_eq!(
                r.skipped, expected,
                "{tier}: skips differ from the plain directory's"
            );
        }
    }
}
