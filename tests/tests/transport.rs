//! The request transports. FUSE-over-io_uring serves each CPU's requests
//! from that CPU's queue, or, where the kernel does not offer it, is
//! refused with the reason while `auto` falls back to /dev/fuse. Teardown
//! (unmount, `umount --force`, a killed daemon) never hangs and leaves no
//! daemon thread behind, on the transport the kernel offers.
//!
//! (The whole real-mount suite runs once per transport: `cargo xtask test`
//! sets EFUSE_TRANSPORT for each pass.)

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use efuse_tests::{
    Daemonized, TestMount, efuse, mount_connection, mount_daemonized, mount_stats, process_gone, src_and_mnt,
    status_pid, within,
};

fn uring_offered() -> bool {
    fs::read_to_string("/sys/module/fuse/parameters/enable_uring").is_ok_and(|v| v.trim() == "Y")
}

/// The transport these tests exercise: io_uring where the kernel offers it.
fn best() -> &'static str {
    if uring_offered() { "uring" } else { "classic" }
}

fn possible_cpus() -> usize {
    let s = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    s.trim()
        .split(',')
        .map(|p| match p.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

/// (thread name, on-CPU ns) of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, u64)> {
    let mut v = Vec::new();
    for t in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let ns = fs::read_to_string(t.path().join("schedstat"))
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0);
        v.push((comm.trim().to_string(), ns));
    }
    v.sort();
    v
}

fn pin_self(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

#[test]
fn uring_serves_each_cpu_from_its_own_queue_or_is_refused_with_the_reason() {
    if !uring_offered() {
        // Asked for explicitly, io_uring is refused with what to do ...
        let (_t, src, mnt) = src_and_mnt();
        let _guard = Daemonized { mnt: mnt.clone() };
        let (code, _, err) = efuse(&[
            OsStr::new("mount"),
            src.as_os_str(),
            mnt.as_os_str(),
            OsStr::new("--transport"),
            OsStr::new("uring"),
        ]);
        assert_ne!(
            code, 0,
            "transport=uring must fail where the kernel does not offer it"
        );
        assert!(err.contains("enable_uring") || err.contains("6.14"), "{err}");
        assert!(
            mount_connection(&mnt).is_none(),
            "a refused mount leaves nothing mounted"
        );
        // ... and auto falls back to /dev/fuse.
        let m = TestMount::with_args(&["--transport", "auto"]);
        fs::write(m.m("f"), b"x").unwrap();
        assert_eq!(fs::read(m.b("f")).unwrap(), b"x");
        let s = mount_stats(&m.mnt());
        assert!(s["transport"].as_str().unwrap().starts_with("classic"), "{s}");
        return;
    }
    let m = TestMount::with_args(&["--transport", "uring"]);
    let s = mount_stats(&m.mnt());
    assert!(
        s["transport"].as_str().unwrap().starts_with("uring"),
        "{}",
        s["transport"]
    );
    let pid = m.pid().unwrap();
    let n = possible_cpus();
    let queues: Vec<String> = threads(pid)
        .into_iter()
        .map(|(c, _)| c)
        .filter(|c| c.starts_with("efuse-q"))
        .collect();
    assert_eq!(queues.len(), n, "one queue thread per possible CPU: {queues:?}");
    m.seed_file("f", b"0123456789");
    let want = fs::metadata(m.b("f")).unwrap();
    for cpu in 0..n {
        let before = threads(pid);
        let p = m.m("f");
        let sizes = std::thread::spawn(move || {
            pin_self(cpu);
            // Offload off: every stat reaches the daemon.
            (0..400)
                .map(|_| fs::metadata(&p).unwrap().size())
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap();
        assert!(sizes.iter().all(|&s| s == want.size()));
        let after = threads(pid);
        let delta = |name: &str| {
            let get = |v: &[(String, u64)]| v.iter().find(|(c, _)| c == name).map_or(0, |x| x.1);
            get(&after) - get(&before)
        };
        let mine = delta(&format!("efuse-q{cpu}"));
        let others: u64 = (0..n)
            .filter(|&q| q != cpu)
            .map(|q| delta(&format!("efuse-q{q}")))
            .sum();
        assert!(
            mine > 0 && mine > others,
            "requests from CPU {cpu} must be served by its queue: q{cpu} ran {mine} ns, the others {others} ns"
        );
    }
    let st = m.unmount();
    assert!(st.success(), "daemon exit status {st}");
}

#[test]
fn a_killed_daemon_leaves_enotconn_at_once_and_no_thread_behind() {
    for round in 0..3 {
        let mut m = TestMount::with_args(&["--transport", best(), "--offload", "kernel"]);
        fs::write(m.m("kept"), b"safe").unwrap();
        let mut f = File::create(m.m("half")).unwrap();
        f.write_all(b"first").unwrap();
        let pid = m.pid().unwrap();
        m.kill_daemon();
        assert!(
            process_gone(pid),
            "round {round}: a thread of the killed daemon is left"
        );
        // Every descriptor of the daemon is closed (process_gone), so the
        // kernel has aborted the connection: a request fails without
        // waiting for anything. The bound only keeps a hang from hanging
        // the suite.
        let mnt = m.mnt();
        let err = within(Duration::from_secs(30), move || {
            fs::metadata(mnt.join("kept")).unwrap_err()
        });
        assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "round {round}");
        let werr = within(Duration::from_secs(10), move || {
            f.write_all(b"second").and_then(|_| f.sync_all())
        });
        assert!(werr.is_err(), "writes after the daemon died must fail");
        assert_eq!(fs::read(m.b("kept")).unwrap(), b"safe");
        assert_eq!(fs::read(m.b("half")).unwrap(), b"first");
    }
}

#[test]
fn umount_and_force_umount_end_the_daemon_with_every_thread() {
    for force in [false, true] {
        for round in 0..3 {
            let (_t, src, mnt) = src_and_mnt();
            fs::write(src.join("f"), b"x").unwrap();
            let _guard = Daemonized { mnt: mnt.clone() };
            mount_daemonized(&src, &mnt, &["--transport", best()]);
            let pid = status_pid(&mnt).expect("pid");
            let (code, out, err) = efuse(&[OsStr::new("status")]);
            assert_eq!(code, 0, "{err}");
            let line = out
                .lines()
                .find(|l| l.starts_with(mnt.to_str().unwrap()))
                .unwrap_or_default()
                .to_string();
            assert!(line.contains(best()), "status shows the transport: {line}");
            assert_eq!(fs::read(mnt.join("f")).unwrap(), b"x");
            let mut args = vec![OsStr::new("umount")];
            if force {
                args.push(OsStr::new("--force"));
            }
            args.push(mnt.as_os_str());
            let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
            let (code, _, err) = within(Duration::from_secs(60), move || {
                efuse(&args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>())
            });
            assert_eq!(code, 0, "force={force} round {round}: {err}");
            assert!(mount_connection(&mnt).is_none());
            assert!(
                process_gone(pid),
                "force={force} round {round}: the daemon (or a thread of it) is left"
            );
        }
    }
}
