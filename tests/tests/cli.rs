//! The `efuse` command line: daemonized mounts, status, umount, the mount
//! helper, and a clear error for each kind of bad input.

use std::ffi::OsStr;
use std::fs;
use std::time::Duration;

use efuse_tests::{Daemonized, efuse, efuse_bin, mount_connection};

use efuse_tests::src_and_mnt as dirs;

fn os<'a>(v: &'a [&'a str]) -> Vec<&'a OsStr> {
    v.iter().map(OsStr::new).collect()
}

/// What `auto` must pick here: bpf where efuse's hook is (built into the
/// kernel's BTF, or efuse.ko loaded), else kernel.
fn best_tier() -> &'static str {
    let btf = fs::read("/sys/kernel/btf/vmlinux").unwrap_or_default();
    let built_in = btf.windows(14).any(|w| w == b"efuse_bpf_ops\0");
    if built_in || std::path::Path::new("/sys/kernel/btf/efuse").exists() {
        "bpf"
    } else {
        "kernel"
    }
}

#[test]
fn auto_is_the_default_of_the_command_the_helper_and_the_help() {
    let (_t, src, mnt) = dirs();
    fs::write(src.join("f"), b"f").unwrap();
    let _guard = Daemonized { mnt: mnt.clone() };
    // The mount helper, as mount(8) runs it, without offload=.
    let helper = _t.path().join("mount.fuse.efuse");
    std::os::unix::fs::symlink(efuse_bin(), &helper).unwrap();
    let out = std::process::Command::new(&helper)
        .arg(&src)
        .arg(&mnt)
        .args(["-o", "rw"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(efuse_tests::mount_stats(&mnt)["offload"], best_tier());
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"f");
    assert_eq!(efuse(&[OsStr::new("umount"), mnt.as_os_str()]).0, 0);
    // --help says what auto picks here.
    let (code, out, _) = efuse(&os(&["mount", "--help"]));
    assert_eq!(code, 0);
    assert!(out.contains("[default: auto]"), "{out}");
    assert!(out.contains(&format!("Here auto picks {}", best_tier())), "{out}");
}

#[test]
fn daemonized_mount_status_umount() {
    let (_t, src, mnt) = dirs();
    fs::write(src.join("hello"), b"world").unwrap();
    let _guard = Daemonized { mnt: mnt.clone() };
    let (code, out, err) = efuse(&[OsStr::new("mount"), src.as_os_str(), mnt.as_os_str()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("mounted"), "{out}");
    // Usable as soon as the command returned.
    assert_eq!(fs::read(mnt.join("hello")).unwrap(), b"world");

    let (code, out, _) = efuse(&os(&["status", "--json"]));
    assert_eq!(code, 0);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let row = rows
        .iter()
        .find(|r| r["mountpoint"] == mnt.to_str().unwrap())
        .unwrap_or_else(|| panic!("mount missing from status: {out}"));
    assert_eq!(row["backend"], "dir");
    // No --offload: auto, resolved to the best tier this kernel has.
    assert_eq!(row["offload"], best_tier());
    assert_eq!(row["state"], "running");
    let pid = row["pid"].as_u64().unwrap() as i32;
    // SAFETY: signal 0 only probes.
    assert_eq!(unsafe { libc::kill(pid, 0) }, 0);

    let (code, _, err) = efuse(&[OsStr::new("umount"), mnt.as_os_str()]);
    assert_eq!(code, 0, "{err}");
    assert!(mount_connection(&mnt).is_none());
    // The daemon has exited (umount waits for it).
    let gone = fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z"));
    assert!(gone, "daemon {pid} still running after umount");
    let (_, out, _) = efuse(&os(&["status", "--json"]));
    assert!(!out.contains(mnt.to_str().unwrap()), "{out}");
}

#[test]
fn bad_input_gets_clear_errors() {
    let (t, src, mnt) = dirs();
    let missing = t.path().join("missing");
    let inner_missing = src.join("inner");
    let cases: Vec<(Vec<&OsStr>, &str)> = vec![
        (
            vec![OsStr::new("mount"), src.as_os_str(), missing.as_os_str()],
            "does not exist",
        ),
        (
            vec![OsStr::new("mount"), missing.as_os_str(), mnt.as_os_str()],
            "backend directory",
        ),
        (
            vec![
                OsStr::new("mount"),
                src.as_os_str(),
                mnt.as_os_str(),
                OsStr::new("-o"),
                OsStr::new("frob"),
            ],
            "unknown mount option",
        ),
        (
            vec![
                OsStr::new("mount"),
                src.as_os_str(),
                mnt.as_os_str(),
                OsStr::new("-o"),
                OsStr::new("entry_timeout=soon"),
            ],
            "invalid timeout",
        ),
        (
            vec![
                OsStr::new("mount"),
                src.as_os_str(),
                mnt.as_os_str(),
                OsStr::new("--offload"),
                OsStr::new("bpf"),
            ],
            "efuse_bpf_ops",
        ),
        (
            vec![OsStr::new("mount"), src.as_os_str(), inner_missing.as_os_str()],
            "does not exist",
        ),
        (vec![OsStr::new("umount"), mnt.as_os_str()], "not mounted"),
    ];
    for (args, want) in cases {
        let (code, _, err) = efuse(&args);
        assert_ne!(code, 0, "{args:?} should fail");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err:?}");
    }
    // Not empty.
    fs::write(mnt.join("existing"), b"x").unwrap();
    let (code, _, err) = efuse(&[OsStr::new("mount"), src.as_os_str(), mnt.as_os_str()]);
    assert_ne!(code, 0);
    assert!(err.contains("not empty"), "{err}");
    // Nothing was mounted by any of these.
    assert!(mount_connection(&mnt).is_none());
    // Mounting a dir inside its own backend is refused.
    fs::create_dir(src.join("inner")).unwrap();
    let inner = src.join("inner");
    let (code, _, err) = efuse(&[OsStr::new("mount"), src.as_os_str(), inner.as_os_str()]);
    assert_ne!(code, 0);
    assert!(err.contains("inside the backend"), "{err}");
}

#[test]
fn second_mount_on_a_live_mount_is_refused() {
    let (_t, src, mnt) = dirs();
    let _guard = Daemonized { mnt: mnt.clone() };
    let (code, _, err) = efuse(&[OsStr::new("mount"), src.as_os_str(), mnt.as_os_str()]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = efuse(&[OsStr::new("mount"), src.as_os_str(), mnt.as_os_str()]);
    assert_ne!(code, 0);
    assert!(err.contains("already a mount point"), "{err}");
    assert_eq!(efuse(&[OsStr::new("umount"), mnt.as_os_str()]).0, 0);
}

#[test]
fn mount_helper_as_mount_8_calls_it() {
    let (t, src, mnt) = dirs();
    fs::write(src.join("f"), b"helper").unwrap();
    // mount(8) runs /sbin/mount.fuse.efuse SRC DST -o OPTS for -t fuse.efuse.
    let helper = t.path().join("mount.fuse.efuse");
    std::os::unix::fs::symlink(efuse_bin(), &helper).unwrap();
    let _guard = Daemonized { mnt: mnt.clone() };
    let out = std::process::Command::new(&helper)
        .arg(&src)
        .arg(&mnt)
        .args(["-o", "rw,noatime,offload=off,_netdev", "-n"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"helper");
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info.lines().find(|l| l.contains(mnt.to_str().unwrap())).unwrap();
    assert!(line.contains("fuse.efuse"), "{line}");
    assert!(line.contains("noatime"), "{line}");
    assert_eq!(efuse(&[OsStr::new("umount"), mnt.as_os_str()]).0, 0);
}

#[test]
fn umount_force_recovers_a_stalled_backend() {
    let (t, src, mnt) = dirs();
    let cfg = t.path().join("stall.toml");
    fs::write(
        &cfg,
        "backend = \"sim\"\n[sim]\nmeta_us = 0\nstall_rate = 1.0\nstall_ms = 60000\n",
    )
    .unwrap();
    let _guard = Daemonized { mnt: mnt.clone() };
    let (code, _, err) = efuse(&[
        OsStr::new("mount"),
        src.as_os_str(),
        mnt.as_os_str(),
        OsStr::new("--config"),
        cfg.as_os_str(),
    ]);
    assert_eq!(code, 0, "{err}");
    // A request that stalls in the backend...
    let m2 = mnt.clone();
    let stuck = std::thread::spawn(move || fs::metadata(m2.join("x")).map(|_| ()));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!stuck.is_finished());
    // ...is released by a forced unmount, which aborts the connection.
    let (code, _, err) = efuse(&[OsStr::new("umount"), OsStr::new("--force"), mnt.as_os_str()]);
    assert_eq!(code, 0, "{err}");
    let res = stuck.join().unwrap();
    assert!(res.is_err());
    assert!(mount_connection(&mnt).is_none());
}

#[test]
fn help_lists_every_command() {
    let (code, out, _) = efuse(&os(&["--help"]));
    assert_eq!(code, 0);
    for cmd in ["mount", "umount", "status"] {
        assert!(out.contains(cmd), "{out}");
    }
    let (code, out, _) = efuse(&os(&["mount", "--help"]));
    assert_eq!(code, 0);
    assert!(
        out.contains("--offload") && out.contains("--backend") && out.contains("--foreground"),
        "{out}"
    );
}

#[test]
fn busy_umount_names_the_holder_and_waits_out_a_short_hold() {
    let (_t, src, mnt) = dirs();
    fs::write(src.join("f"), b"data").unwrap();
    let _guard = Daemonized { mnt: mnt.clone() };
    let (code, _, err) = efuse(&[OsStr::new("mount"), src.as_os_str(), mnt.as_os_str()]);
    assert_eq!(code, 0, "{err}");
    // A process that keeps a file open: the unmount is refused, names it,
    // and the mount keeps serving (as umount(8) on a plain mount: EBUSY).
    let mut holder = std::process::Command::new("sleep")
        .arg("30")
        .stdin(fs::File::open(mnt.join("f")).unwrap())
        .spawn()
        .unwrap();
    let (code, _, err) = efuse(&[OsStr::new("umount"), mnt.as_os_str()]);
    assert_ne!(code, 0);
    assert!(err.contains("busy"), "{err}");
    assert!(err.contains(&format!("{} (sleep)", holder.id())), "{err}");
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"data");
    let _ = holder.kill();
    let _ = holder.wait();
    // A reference that goes away within the grace (a forked child that
    // still has its parent's descriptors, say) does not fail the unmount.
    let mut brief = std::process::Command::new("sleep")
        .arg("0.3")
        .stdin(fs::File::open(mnt.join("f")).unwrap())
        .spawn()
        .unwrap();
    let (code, _, err) = efuse(&[OsStr::new("umount"), mnt.as_os_str()]);
    assert_eq!(code, 0, "{err}");
    assert!(mount_connection(&mnt).is_none());
    let _ = brief.wait();
}
