//! Smoke test of `efuse bench --quick`: it must mount every target it can,
//! run every workload and write the table, the JSON and the plots. No
//! timing is asserted (speed belongs in the bench's own report).

use std::ffi::OsStr;
use std::fs;

use efuse_tests::efuse;

#[test]
fn quick_bench_writes_table_json_and_plots() {
    let out = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let _mounts = efuse_tests::UnmountUnder(work.path().to_owned());
    // The bench may only touch its own subdirectory of --work-dir.
    fs::write(work.path().join("keep-me"), b"user data").unwrap();
    fs::create_dir(work.path().join("data")).unwrap();
    let (code, stdout, stderr) = efuse(&[
        OsStr::new("bench"),
        OsStr::new("--quick"),
        OsStr::new("--out"),
        out.path().as_os_str(),
        OsStr::new("--work-dir"),
        work.path().as_os_str(),
    ]);
    assert_eq!(code, 0, "bench failed:\n{stderr}");
    assert!(stdout.contains("| workload | target |"), "{stdout}");
    assert!(stdout.contains("### dataset epochs"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.path().join("results.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    let workloads: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r["workload"].as_str().unwrap()).collect();
    assert_eq!(workloads.len(), 13, "{workloads:?}");
    for w in &workloads {
        // The dataset epochs run on the dir backend only (a pass over the
        // whole dataset behind simulated latency would take minutes).
        let epoch = w.starts_with("epoch_");
        let targets: &[&str] = if epoch {
            &["raw", "efuse-off"]
        } else {
            &["raw", "efuse-off", "efuse-off-sim"]
        };
        for &target in targets {
            let row = rows.iter().find(|r| r["workload"] == *w && r["target"] == target);
            let row = row.unwrap_or_else(|| panic!("no {target} row for {w}"));
            assert!(row["ops"].as_u64().unwrap() > 0);
            assert!(row["median_ns"].as_u64().unwrap() > 0);
        }
        // Ratios against raw come from the same run; raw against itself is 1.
        let raw = rows
            .iter()
            .find(|r| r["workload"] == *w && r["target"] == "raw")
            .unwrap();
        assert_eq!(raw["vs_raw"].as_f64().unwrap(), 1.0);
        // efuse rows carry kernel-side upcall counts from the tracepoints.
        let off = rows
            .iter()
            .find(|r| r["workload"] == *w && r["target"] == "efuse-off")
            .unwrap();
        if matches!(*w, "stat_warm" | "py_read" | "ls_l") {
            assert!(off["upcalls_per_op"].as_f64().unwrap() >= 1.0, "{off}");
        }
        // A dataset epoch reports its whole pass and the daemon's memory
        // and descriptors after it.
        if epoch {
            assert!(off["pass_ns"].as_u64().unwrap() > 0, "{off}");
            assert!(off["daemon_rss_kib"].as_u64().unwrap() > 0, "{off}");
            assert!(off["daemon_fds"].as_u64().unwrap() > 0, "{off}");
        }
    }
    for f in [
        "results.md",
        "latency-dir.svg",
        "latency-dir.png",
        "latency-sim.svg",
        "latency-sim.png",
    ] {
        let md = fs::metadata(out.path().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(md.len() > 100, "{f} is nearly empty");
    }
    // Every mount the bench made is gone.
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert_eq!(fs::read(work.path().join("keep-me")).unwrap(), b"user data");
    assert!(work.path().join("data").is_dir());
    assert!(
        !work.path().join("efuse-bench").exists(),
        "scratch directory left behind"
    );
    assert!(
        !info.contains(work.path().to_str().unwrap()),
        "bench left a mount behind"
    );
}

#[test]
fn interrupted_bench_leaves_no_mount() {
    let out = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    // Declared before the child's guard, so dropped after it is killed.
    let _mounts = efuse_tests::UnmountUnder(work.path().to_owned());
    fs::write(work.path().join("keep-me"), b"user data").unwrap();
    let child = std::process::Command::new(efuse_tests::efuse_bin())
        .args(["bench", "--quick", "--out"])
        .arg(out.path())
        .arg("--work-dir")
        .arg(work.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let mounted = || {
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(work.path().to_str().unwrap()))
            .count()
    };
    assert!(
        efuse_tests::eventually(std::time::Duration::from_secs(120), || mounted() >= 2),
        "the bench mounted nothing"
    );
    // Ctrl-C in the middle of a run.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGINT) };
    let st = efuse_tests::wait_timeout(&mut child.0, std::time::Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the bench did not exit after SIGINT"));
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), None);
    assert_eq!(st.code(), Some(128 + libc::SIGINT));
    assert_eq!(mounted(), 0, "mounts left after SIGINT");
    assert!(
        !work.path().join("efuse-bench").exists(),
        "scratch directory left behind"
    );
    assert_eq!(fs::read(work.path().join("keep-me")).unwrap(), b"user data");
}

/// The bench process, killed if the test ends early.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
