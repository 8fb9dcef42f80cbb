//! mount(8)'s options and remount: each checked against the same options
//! on a tmpfs (a local filesystem mounted the same way). The helper is run
//! as mount(8) runs it (`mount.fuse.efuse SRC DST -o OPTS`, with the
//! options mount(8) passes: it keeps suid/dev/exec for itself and passes
//! only what differs from its defaults).

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use efuse_tests::{Daemonized, Tmpfs, efuse_bin, mount_connection};

struct Helper {
    _t: tempfile::TempDir,
    helper: PathBuf,
    src: PathBuf,
    mnt: PathBuf,
}

fn helper() -> Helper {
    let t = tempfile::tempdir().unwrap();
    let helper = t.path().join("mount.fuse.efuse");
    std::os::unix::fs::symlink(efuse_bin(), &helper).unwrap();
    let (src, mnt) = (t.path().join("src"), t.path().join("mnt"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    fs::write(src.join("f"), b"data").unwrap();
    std::os::unix::fs::symlink("f", src.join("l")).unwrap();
    Helper {
        _t: t,
        helper,
        src,
        mnt,
    }
}

impl Helper {
    fn run(&self, opts: &str) -> std::process::Output {
        Command::new(&self.helper)
            .arg(&self.src)
            .arg(&self.mnt)
            .args(["-o", opts])
            .output()
            .unwrap()
    }
}

/// The per-mount and superblock options of the mount at `p`.
fn options(p: &Path) -> (Vec<String>, Vec<String>) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == p.to_str())
        .unwrap_or_else(|| panic!("{} not mounted", p.display()));
    let f: Vec<&str> = line.split(' ').collect();
    let sep = f.iter().position(|x| *x == "-").unwrap();
    let split = |s: &str| s.split(',').map(str::to_string).collect();
    (split(f[5]), split(f[sep + 3]))
}

fn tmpfs_remount(p: &Path, opts: &str) {
    let st = Command::new("mount")
        .args(["-o", &format!("remount,{opts}")])
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success(), "remount of the tmpfs with {opts}");
}

fn append(p: &Path) -> Option<i32> {
    fs::OpenOptions::new()
        .append(true)
        .open(p)
        .and_then(|mut f| f.write_all(b"x"))
        .err()
        .and_then(|e| e.raw_os_error())
}

#[test]
fn every_option_mount_8_passes_is_accepted_and_the_helper_is_silent() {
    for opts in [
        "rw,relatime",
        "rw,strictatime,lazytime",
        "rw,noatime,nodiratime,nosymfollow",
        "ro,nosuid,nodev,noexec,relatime,x-systemd.automount,comment=x,_netdev,nofail,iversion",
        "rw,offload=kernel,relatime,loud",
    ] {
        let h = helper();
        let _g = Daemonized { mnt: h.mnt.clone() };
        let out = h.run(opts);
        assert!(
            out.status.success(),
            "{opts}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stdout.is_empty(),
            "{opts}: a helper prints nothing on success: {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        let (mnt_opts, _) = options(&h.mnt);
        for want in opts
            .split(',')
            .filter(|o| ["ro", "nosuid", "nodev", "noexec", "noatime", "nosymfollow"].contains(o))
        {
            assert!(
                mnt_opts.iter().any(|o| o == want),
                "{opts}: {want} missing from {mnt_opts:?}"
            );
        }
        // mount(8) passes no suid/dev: the helper takes its defaults.
        if !opts.contains("nosuid") {
            assert!(!mnt_opts.iter().any(|o| o == "nosuid"), "{opts}: {mnt_opts:?}");
            assert!(!mnt_opts.iter().any(|o| o == "nodev"), "{opts}: {mnt_opts:?}");
        }
        assert_eq!(
            efuse_tests::efuse(&[OsStr::new("umount"), h.mnt.as_os_str()]).0,
            0
        );
    }
    // `efuse mount` itself keeps its safer defaults.
    let h = helper();
    let _g = Daemonized { mnt: h.mnt.clone() };
    let (code, _, err) = efuse_tests::efuse(&[OsStr::new("mount"), h.src.as_os_str(), h.mnt.as_os_str()]);
    assert_eq!(code, 0, "{err}");
    let (mnt_opts, _) = options(&h.mnt);
    assert!(
        mnt_opts.iter().any(|o| o == "nosuid") && mnt_opts.iter().any(|o| o == "nodev"),
        "{mnt_opts:?}"
    );
    assert_eq!(
        efuse_tests::efuse(&[OsStr::new("umount"), h.mnt.as_os_str()]).0,
        0
    );
}

#[test]
fn nosymfollow_and_noatime_behave_as_on_tmpfs() {
    let tmp = Tmpfs::new();
    fs::write(tmp.path().join("f"), b"data").unwrap();
    std::os::unix::fs::symlink("f", tmp.path().join("l")).unwrap();
    tmpfs_remount(tmp.path(), "nosymfollow,noatime");
    let h = helper();
    let _g = Daemonized { mnt: h.mnt.clone() };
    for tier in ["off", "kernel"] {
        let out = h.run(&format!("rw,nosymfollow,noatime,offload={tier}"));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let follow = |root: &Path| fs::read(root.join("l")).map_err(|e| e.raw_os_error());
        assert_eq!(follow(&h.mnt), follow(tmp.path()), "{tier}: following a symlink");
        assert_eq!(
            fs::read_link(h.mnt.join("l")).unwrap(),
            fs::read_link(tmp.path().join("l")).unwrap()
        );
        // Reading through a noatime mount leaves the atime alone, on the
        // backing file too.
        for root in [h.src.as_path(), tmp.path()] {
            let old = filetime_set_old(&root.join("f"));
            assert_eq!(fs::metadata(root.join("f")).unwrap().atime(), old);
        }
        for root in [h.mnt.as_path(), tmp.path()] {
            assert_eq!(fs::read(root.join("f")).unwrap(), b"data");
        }
        assert_eq!(
            fs::metadata(tmp.path().join("f")).unwrap().atime(),
            1_000_000_000,
            "tmpfs"
        );
        assert_eq!(
            fs::metadata(h.src.join("f")).unwrap().atime(),
            1_000_000_000,
            "{tier}: backing atime moved"
        );
        assert_eq!(
            efuse_tests::efuse(&[OsStr::new("umount"), h.mnt.as_os_str()]).0,
            0
        );
    }
}

/// Set atime (and mtime) of `p` to 2001-09-09; returns the atime.
fn filetime_set_old(p: &Path) -> i64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let t = libc::timespec {
        tv_sec: 1_000_000_000,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: valid C string and two timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
    assert_eq!(rc, 0);
    1_000_000_000
}

#[test]
fn remount_ro_and_back_as_on_tmpfs() {
    let tmp = Tmpfs::new();
    fs::write(tmp.path().join("f"), b"data").unwrap();
    for tier in ["off", "kernel"] {
        let h = helper();
        let _g = Daemonized { mnt: h.mnt.clone() };
        let out = h.run(&format!("rw,relatime,offload={tier}"));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let conn = mount_connection(&h.mnt).unwrap();
        // A file open for writing makes a remount to ro fail with EBUSY,
        // as on any filesystem.
        let open_writer = fs::OpenOptions::new().append(true).open(h.mnt.join("f")).unwrap();
        let tmp_writer = fs::OpenOptions::new()
            .append(true)
            .open(tmp.path().join("f"))
            .unwrap();
        let out = h.run("remount,ro");
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("EBUSY"),
            "{tier}: remount ro under a writer"
        );
        let st = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(tmp.path())
            .output()
            .unwrap();
        assert!(!st.status.success(), "tmpfs remounted ro under a writer");
        drop((open_writer, tmp_writer));
        // As mount(8) runs the helper for `mount -o remount,ro M`: the
        // mount's whole option string comes back with it, efuse's own
        // options included (from fstab or utab). A successful remount
        // prints nothing, as tmpfs's does.
        let out = h.run(&format!(
            "remount,ro,relatime,offload={tier},backend=dir,trace=on,user_id=0,group_id=0"
        ));
        assert!(
            out.status.success(),
            "remount ro: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stdout.is_empty() && out.stderr.is_empty(),
            "{tier}: a successful remount printed: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        tmpfs_remount(tmp.path(), "ro");
        assert_eq!(
            mount_connection(&h.mnt),
            Some(conn),
            "a remount keeps the daemon and connection"
        );
        assert!(options(&h.mnt).0.contains(&"ro".to_string()));
        assert_eq!(
            append(&h.mnt.join("f")),
            append(&tmp.path().join("f")),
            "{tier}: open for writing on ro"
        );
        assert_eq!(append(&h.mnt.join("f")), Some(libc::EROFS));
        let touch = |root: &Path| fs::write(root.join("new"), b"n").map_err(|e| e.raw_os_error());
        assert_eq!(touch(&h.mnt), touch(tmp.path()), "{tier}: create on ro");
        assert_eq!(fs::read(h.mnt.join("f")).unwrap(), b"data", "reads still work");
        // And back to rw.
        let out = h.run(&format!(
            "remount,rw,offload={tier},nopassthrough,entry_timeout=1"
        ));
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "remount rw: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // An option nobody knows is still refused, and changes nothing.
        let out = h.run("remount,ro,bogus=1");
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));
        assert!(
            !options(&h.mnt).0.contains(&"ro".to_string()),
            "a refused remount changed the mount"
        );
        tmpfs_remount(tmp.path(), "rw");
        assert_eq!(append(&h.mnt.join("f")), None, "{tier}: writable again");
        assert_eq!(fs::read(h.src.join("f")).unwrap(), b"datax");
        // Remounting something that is not an efuse mount is refused.
        let out = Command::new(&h.helper)
            .arg("x")
            .arg(tmp.path())
            .args(["-o", "remount,ro"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not efuse"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            efuse_tests::efuse(&[OsStr::new("umount"), h.mnt.as_os_str()]).0,
            0
        );
    }
}

/// Set `p`'s mtime to two hours ago and its atime to one hour ago: a read
/// updates the atime under strictatime, not under relatime (the atime is
/// newer than the mtime and less than a day old).
fn atime_newer_than_mtime(p: &Path) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let times = [
        libc::timespec {
            tv_sec: now - 3600,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: now - 7200,
            tv_nsec: 0,
        },
    ];
    // SAFETY: valid C string and two timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
    assert_eq!(rc, 0);
}

#[test]
fn strictatime_and_relatime_update_atimes_as_on_tmpfs() {
    // The backing tree is mounted the other way: the efuse mount's own
    // atime mode decides, as for a local filesystem mounted with it.
    for (mode, backing_mode) in [("strictatime", "relatime"), ("relatime", "strictatime")] {
        let backing = Tmpfs::new();
        tmpfs_remount(backing.path(), backing_mode);
        let plain = Tmpfs::new();
        tmpfs_remount(plain.path(), mode);
        for tier in ["off", "kernel"] {
            let src = backing.path().join(tier);
            fs::create_dir(&src).unwrap();
            fs::write(src.join("f"), b"data").unwrap();
            fs::write(plain.path().join("f"), b"data").unwrap();
            let mnt = tempfile::tempdir().unwrap();
            let _g = Daemonized {
                mnt: mnt.path().to_owned(),
            };
            let (code, _, err) = efuse_tests::efuse(&[
                OsStr::new("mount"),
                src.as_os_str(),
                mnt.path().as_os_str(),
                OsStr::new("-o"),
                OsStr::new(mode),
                OsStr::new("--offload"),
                OsStr::new(tier),
            ]);
            assert_eq!(code, 0, "{err}");
            atime_newer_than_mtime(&src.join("f"));
            atime_newer_than_mtime(&plain.path().join("f"));
            let before = fs::metadata(src.join("f")).unwrap().atime();
            for _ in 0..3 {
                assert_eq!(fs::read(mnt.path().join("f")).unwrap(), b"data");
                assert_eq!(fs::read(plain.path().join("f")).unwrap(), b"data");
            }
            let moved = |p: &Path| fs::metadata(p).unwrap().atime() != before;
            let want = fs::metadata(plain.path().join("f")).unwrap().atime() > before + 600;
            assert_eq!(
                moved(&src.join("f")),
                want,
                "{tier}, -o {mode} over a {backing_mode} tree: backing atime {} moved vs tmpfs -o {mode}",
                if want { "not" } else { "" }
            );
            assert_eq!(
                efuse_tests::efuse(&[OsStr::new("umount"), mnt.path().as_os_str()]).0,
                0
            );
        }
    }
}
