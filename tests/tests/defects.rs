//! Regression tests for the defects found by using efuse as a new user
//! would (issue 10). Each compares with the same steps on a plain
//! directory, and each failed before its fix.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use efuse_tests::{
    Daemonized, TestMount, efuse, mount_connection, mount_daemonized, process_gone, status_pid, within,
};

/// The mounts every open-path test runs on: both tiers that exist on a
/// stock kernel, over the dir backend, and the in-memory backend.
const SETUPS: &[&[&str]] = &[
    &["--offload", "off"],
    &["--offload", "kernel"],
    &["--offload", "off", "--backend", "mem"],
    &["--offload", "kernel", "--backend", "mem"],
];

fn open_raw(p: &Path, flags: i32, mode: u32) -> std::io::Result<OwnedFd> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C string; the fd is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), flags, mode) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just opened.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A 4 KiB-aligned buffer, as O_DIRECT on the plain directory needs.
struct Aligned(*mut u8);
impl Aligned {
    const LEN: usize = 4096;
    fn new() -> Self {
        let l = std::alloc::Layout::from_size_align(Self::LEN, 4096).unwrap();
        // SAFETY: non-zero size.
        Self(unsafe { std::alloc::alloc_zeroed(l) })
    }
}
impl Drop for Aligned {
    fn drop(&mut self) {
        let l = std::alloc::Layout::from_size_align(Self::LEN, 4096).unwrap();
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.0, l) };
    }
}

/// Open `f` under `root` with `flags`, then do what such an open is for:
/// read what there is, write a marker if writable. Returns what was read
/// and the file's content afterwards, or the errno.
fn open_and_use(root: &Path, flags: i32) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let p = root.join("f");
    let fd = open_raw(&p, flags, 0o644)?;
    let acc = flags & libc::O_ACCMODE;
    let buf = Aligned::new();
    let mut got = Vec::new();
    if flags & libc::O_PATH != 0 {
        // An O_PATH descriptor can be fstat'ed, not read.
        // SAFETY: zeroed stat is a valid out buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and out pointer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        got = st.st_size.to_le_bytes().to_vec();
    } else if acc != libc::O_WRONLY {
        // SAFETY: the aligned buffer holds LEN bytes.
        let n = unsafe { libc::pread(fd.as_raw_fd(), buf.0.cast(), Aligned::LEN, 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: n bytes were just read into the buffer.
        got = unsafe { std::slice::from_raw_parts(buf.0, n as usize) }.to_vec();
    }
    if acc != libc::O_RDONLY {
        // A whole aligned block, so O_DIRECT is happy on the plain dir too;
        // with O_APPEND it goes to the end whatever the offset says.
        // SAFETY: the buffer holds LEN bytes.
        unsafe { std::ptr::write_bytes(buf.0, b'w', Aligned::LEN) };
        // SAFETY: as above.
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.0.cast(), Aligned::LEN) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    drop(fd);
    Ok((got, fs::read(&p)?))
}

#[test]
fn every_open_flag_behaves_as_on_the_plain_directory() {
    let flags = [
        ("O_NOFOLLOW", libc::O_NOFOLLOW),
        ("O_NOATIME", libc::O_NOATIME),
        ("O_DIRECT", libc::O_DIRECT),
        ("O_CLOEXEC", libc::O_CLOEXEC),
        ("O_APPEND", libc::O_APPEND),
        ("O_SYNC", libc::O_SYNC),
        ("O_DSYNC", libc::O_DSYNC),
        ("O_LARGEFILE", libc::O_LARGEFILE),
        ("O_NONBLOCK", libc::O_NONBLOCK),
        ("O_PATH", libc::O_PATH),
        ("O_NOFOLLOW|O_PATH", libc::O_NOFOLLOW | libc::O_PATH),
        ("O_TRUNC", libc::O_TRUNC),
        (
            "O_APPEND|O_TRUNC|O_SYNC",
            libc::O_APPEND | libc::O_TRUNC | libc::O_SYNC,
        ),
        (
            "O_NOFOLLOW|O_NOATIME|O_CLOEXEC",
            libc::O_NOFOLLOW | libc::O_NOATIME | libc::O_CLOEXEC,
        ),
    ];
    let content: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    for setup in SETUPS {
        let m = TestMount::with_args(setup);
        for (name, flag) in flags {
            for (acc_name, acc) in [
                ("O_RDONLY", libc::O_RDONLY),
                ("O_WRONLY", libc::O_WRONLY),
                ("O_RDWR", libc::O_RDWR),
            ] {
                for root in [m.mnt(), m.twin()] {
                    fs::write(root.join("f"), &content).unwrap();
                }
                m.both(&format!("{setup:?} open(f, {acc_name}|{name})"), |r| {
                    open_and_use(r, acc | flag)
                })
                .ok();
            }
        }
        // O_NOFOLLOW on a symlink is refused alike, and so is O_DIRECTORY on a file.
        for root in [m.mnt(), m.twin()] {
            std::os::unix::fs::symlink("f", root.join("l")).unwrap();
        }
        m.both(&format!("{setup:?} O_NOFOLLOW on a symlink"), |r| {
            open_raw(&r.join("l"), libc::O_RDONLY | libc::O_NOFOLLOW, 0).map(|_| ())
        })
        .unwrap_err();
        m.both(&format!("{setup:?} O_DIRECTORY on a file"), |r| {
            open_raw(&r.join("f"), libc::O_RDONLY | libc::O_DIRECTORY, 0).map(|_| ())
        })
        .unwrap_err();
        // O_CREAT|O_EXCL|O_NOFOLLOW (what cp, tar x and rsync use).
        m.both(&format!("{setup:?} O_CREAT|O_EXCL|O_NOFOLLOW"), |r| {
            open_raw(
                &r.join("new"),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                0o600,
            )
            .map(|_| ())
        })
        .unwrap();
        m.both(&format!("{setup:?} O_CREAT|O_EXCL again"), |r| {
            open_raw(
                &r.join("new"),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                0o600,
            )
            .map(|_| ())
        })
        .unwrap_err();
    }
}

/// Copy /usr/bin/sleep to `dir/s` and run it from there.
fn run_from(dir: &Path) -> std::process::Child {
    let s = dir.join("s");
    // Copied by cp(1), not here: a descriptor this process held for writing
    // would be inherited by any child a concurrent test forks, until that
    // child execs, and the exec below would then fail with ETXTBSY.
    let st = Command::new("cp").arg("/usr/bin/sleep").arg(&s).status().unwrap();
    assert!(st.success(), "cp /usr/bin/sleep {}", s.display());
    fs::set_permissions(&s, fs::Permissions::from_mode(0o755)).unwrap();
    let child = Command::new(&s).arg("30").stdin(Stdio::null()).spawn().unwrap();
    // Until exec has happened the file is not yet a running text.
    let deadline = Instant::now() + Duration::from_secs(60);
    while fs::read_link(format!("/proc/{}/exe", child.id())).map_or(true, |e| e != s) {
        assert!(Instant::now() < deadline, "sleep did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

#[test]
fn a_refused_o_trunc_open_truncates_nothing() {
    let size = fs::metadata("/usr/bin/sleep").unwrap().len();
    for setup in SETUPS {
        let m = TestMount::with_args(setup);
        let mut running: Vec<_> = [m.mnt(), m.twin()].iter().map(|r| run_from(r)).collect();
        for _ in 0..20 {
            let e = m
                .both(&format!("{setup:?} O_RDONLY|O_TRUNC of a running program"), |r| {
                    open_raw(&r.join("s"), libc::O_RDONLY | libc::O_TRUNC, 0).map(|_| ())
                })
                .unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ETXTBSY));
            m.both(&format!("{setup:?} O_WRONLY|O_TRUNC of a running program"), |r| {
                open_raw(&r.join("s"), libc::O_WRONLY | libc::O_TRUNC, 0).map(|_| ())
            })
            .unwrap_err();
            assert_eq!(
                fs::metadata(m.m("s")).unwrap().len(),
                size,
                "{setup:?}: the mount lost the file"
            );
            if !setup.contains(&"mem") {
                assert_eq!(
                    fs::metadata(m.b("s")).unwrap().len(),
                    size,
                    "{setup:?}: the backing file was emptied"
                );
            }
        }
        // The program still runs: its text was never truncated under it.
        for c in &mut running {
            assert!(
                c.try_wait().unwrap().is_none(),
                "{setup:?}: the running program died"
            );
            c.kill().unwrap();
            c.wait().unwrap();
        }
        // Once it no longer runs, O_TRUNC empties the file on both sides.
        m.both(&format!("{setup:?} O_RDONLY|O_TRUNC once idle"), |r| {
            open_raw(&r.join("s"), libc::O_RDONLY | libc::O_TRUNC, 0)?;
            Ok(fs::metadata(r.join("s"))?.len())
        })
        .unwrap();
    }
}

#[test]
fn o_trunc_and_fallocate_set_times_and_punch_holes_on_mem_as_on_ext4() {
    for setup in SETUPS {
        let m = TestMount::with_args(setup);
        for r in [m.mnt(), m.twin()] {
            fs::write(r.join("f"), vec![7u8; 20_000]).unwrap();
        }
        let times = |r: &Path| {
            let md = fs::metadata(r.join("f")).unwrap();
            (md.mtime(), md.mtime_nsec(), md.ctime(), md.ctime_nsec())
        };
        let before_m = times(&m.mnt());
        std::thread::sleep(Duration::from_millis(20));
        // O_TRUNC sets mtime and ctime, whatever the access mode.
        m.both("O_RDONLY|O_TRUNC", |r| {
            open_raw(&r.join("f"), libc::O_RDONLY | libc::O_TRUNC, 0)?;
            Ok(fs::metadata(r.join("f"))?.len())
        })
        .unwrap();
        let after_m = times(&m.mnt());
        assert!(
            after_m.0 * 1_000_000_000 + after_m.1 > before_m.0 * 1_000_000_000 + before_m.1,
            "{setup:?}: mtime kept"
        );
        assert!(
            after_m.2 * 1_000_000_000 + after_m.3 > before_m.2 * 1_000_000_000 + before_m.3,
            "{setup:?}: ctime kept"
        );
        // Extending posix_fallocate: size and mtime/ctime move.
        std::thread::sleep(Duration::from_millis(20));
        m.both("posix_fallocate extends", |r| {
            let f = fs::OpenOptions::new().read(true).write(true).open(r.join("f"))?;
            // SAFETY: valid fd.
            let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, 65536) };
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            Ok(fs::metadata(r.join("f"))?.len())
        })
        .unwrap();
        let fa = times(&m.mnt());
        assert!(
            fa.0 * 1_000_000_000 + fa.1 > after_m.0 * 1_000_000_000 + after_m.1,
            "{setup:?}: fallocate kept mtime"
        );
        // Punching a hole keeps the size and reads zeros; without KEEP_SIZE it is refused.
        m.both("punch hole", |r| {
            let mut f = fs::OpenOptions::new().read(true).write(true).open(r.join("f"))?;
            f.write_all(&[9u8; 65536])?;
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: valid fd.
            if unsafe { libc::fallocate(f.as_raw_fd(), mode, 4096, 8192) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut d = Vec::new();
            File::open(r.join("f"))?.read_to_end(&mut d)?;
            Ok(d)
        })
        .unwrap();
        m.both("punch hole without KEEP_SIZE", |r| {
            let f = fs::OpenOptions::new().write(true).open(r.join("f"))?;
            // SAFETY: valid fd.
            if unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE, 0, 4096) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
        .unwrap_err();
        m.both("zero range past the end", |r| {
            let f = fs::OpenOptions::new().read(true).write(true).open(r.join("f"))?;
            // SAFETY: valid fd.
            if unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_ZERO_RANGE, 60000, 10000) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            fs::read(r.join("f"))
        })
        .unwrap();
    }
}

/// A process writing through a shared mapping of `p` without pause.
fn mmap_writer(p: &Path) -> std::process::Child {
    let script = r#"
import mmap, os, sys
# Created by the writer itself: a handle from CREATE has no passthrough,
# so the mapping lives in the FUSE inode's page cache.
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
os.ftruncate(fd, 1 << 20)
m = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED)
i = 0
while True:
    for off in range(0, 1 << 20, 4096):
        m[off] = i & 0xff
    i += 1
    try:
        m.flush()
    except OSError:
        pass
"#;
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(p)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_killed_kernel_tier_daemon_under_a_shared_mmap_writer_leaves_enotconn() {
    // Each round: a shared-mmap writer dirties pages through the mount while
    // the backing file changes behind it (so the daemon invalidates that
    // inode), then the daemon dies by SIGKILL. It must exit and leave a
    // mount that fails with ENOTCONN at once.
    for round in 0..6 {
        let mut m = TestMount::with_args(&["--offload", "kernel"]);
        let mut writer = mmap_writer(&m.m("f"));
        assert!(efuse_tests::eventually(Duration::from_secs(60), || fs::metadata(
            m.b("f")
        )
        .is_ok_and(|md| md.len() == 1 << 20)));
        let behind = m.b("f");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let toucher = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(f) = fs::OpenOptions::new().write(true).open(&behind) {
                        let _ = std::os::unix::fs::FileExt::write_at(&f, b"behind", 8192);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        std::thread::sleep(Duration::from_millis(400 + 150 * round));
        let pid = m.pid().unwrap();
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let gone = efuse_tests::eventually(Duration::from_secs(60), || process_gone(pid));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        toucher.join().unwrap();
        let _ = writer.kill();
        assert!(
            gone,
            "round {round}: the killed daemon did not exit (a thread stuck in the kernel)"
        );
        let mnt = m.mnt();
        let err = within(Duration::from_secs(30), move || {
            fs::metadata(mnt.join("f")).unwrap_err()
        });
        assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "round {round}");
        let _ = writer.wait();
        m.kill_daemon();
    }
}

use efuse_tests::src_and_mnt as dirs;

#[test]
fn umount_returns_only_once_the_daemon_has_exited() {
    // The backing directory is a filesystem of its own: unmounting it right
    // after `efuse umount` fails with EBUSY while the daemon holds it open.
    for tier in ["off", "kernel"] {
        for _ in 0..3 {
            let (_t, src, mnt) = dirs();
            let c = std::ffi::CString::new(src.as_os_str().as_bytes()).unwrap();
            // SAFETY: valid C strings.
            let rc = unsafe {
                libc::mount(
                    c"efuse-test".as_ptr(),
                    c.as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
            struct Tmpfs(std::ffi::CString);
            impl Drop for Tmpfs {
                fn drop(&mut self) {
                    // SAFETY: valid C string.
                    unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
                }
            }
            let _tmpfs = Tmpfs(c.clone());
            fs::create_dir_all(src.join("d/e")).unwrap();
            fs::write(src.join("d/e/f"), b"data").unwrap();
            let _guard = Daemonized { mnt: mnt.clone() };
            mount_daemonized(&src, &mnt, &["--offload", tier]);
            let pid = status_pid(&mnt).expect("daemon pid");
            let mut f = File::open(mnt.join("d/e/f")).unwrap();
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            drop(f);
            let (code, _, err) = efuse(&[OsStr::new("umount"), mnt.as_os_str()]);
            assert_eq!(code, 0, "{err}");
            assert!(
                process_gone(pid),
                "{tier}: daemon {pid} still running after efuse umount returned"
            );
            // SAFETY: valid C string.
            let rc = unsafe { libc::umount2(c.as_ptr(), 0) };
            assert_eq!(
                rc,
                0,
                "{tier}: backing filesystem still busy: {}",
                std::io::Error::last_os_error()
            );
            let log = fs::read_dir("/run/efuse")
                .unwrap()
                .flatten()
                .filter(|e| e.path().extension() == Some(OsStr::new("log")))
                .filter_map(|e| fs::read_to_string(e.path()).ok())
                .find(|l| l.contains(&format!("mountpoint={}", mnt.display())));
            if let Some(log) = log {
                assert!(!log.contains("Failed to umount"), "{tier}: {log}");
            }
        }
    }
}

fn stalling_mount(t: &Path, src: &Path, mnt: &Path, stall_ms: u64) {
    let cfg = t.join("stall.toml");
    fs::write(
        &cfg,
        format!("backend = \"sim\"\n[sim]\nmeta_us = 0\nstall_rate = 1.0\nstall_ms = {stall_ms}\n"),
    )
    .unwrap();
    mount_daemonized(src, mnt, &["--config", cfg.to_str().unwrap()]);
}

#[test]
fn status_and_force_umount_do_not_wait_for_a_stalled_backend() {
    // The backend stalls every call for 60 s. `efuse status` and `efuse
    // umount --force` must not wait for it: each must be done well before
    // the stall would end (the bounds leave a loaded machine its time; a
    // wait for the backend would take the full minute).
    let (t, src, mnt) = dirs();
    let _guard = Daemonized { mnt: mnt.clone() };
    stalling_mount(t.path(), &src, &mnt, 60_000);
    let pid = status_pid(&mnt).expect("daemon pid");
    let m2 = mnt.clone();
    let stuck = std::thread::spawn(move || fs::metadata(m2.join("x")).map(|_| ()));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!stuck.is_finished(), "the backend did not stall");
    let t0 = Instant::now();
    let (code, out, err) = within(Duration::from_secs(30), || efuse(&[OsStr::new("status")]));
    assert_eq!(code, 0, "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "status took {:?}",
        t0.elapsed()
    );
    assert!(out.contains(mnt.to_str().unwrap()), "{out}");
    let t0 = Instant::now();
    let mnt2 = mnt.clone();
    let (code, _, err) = within(Duration::from_secs(30), move || {
        efuse(&[OsStr::new("umount"), OsStr::new("--force"), mnt2.as_os_str()])
    });
    assert_eq!(code, 0, "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "forced umount took {:?}",
        t0.elapsed()
    );
    assert!(mount_connection(&mnt).is_none());
    assert!(process_gone(pid), "daemon {pid} left behind");
    assert!(stuck.join().unwrap().is_err());
}

#[test]
fn force_umount_of_a_healthy_mount_succeeds_every_time() {
    for tier in ["off", "kernel"] {
        for i in 0..6 {
            let (_t, src, mnt) = dirs();
            fs::write(src.join("f"), b"x").unwrap();
            let _guard = Daemonized { mnt: mnt.clone() };
            mount_daemonized(&src, &mnt, &["--offload", tier]);
            let pid = status_pid(&mnt).expect("pid");
            assert_eq!(fs::read(mnt.join("f")).unwrap(), b"x");
            let (code, _, err) = within(Duration::from_secs(30), {
                let mnt = mnt.clone();
                move || efuse(&[OsStr::new("umount"), OsStr::new("--force"), mnt.as_os_str()])
            });
            assert_eq!(code, 0, "{tier} run {i}: {err}");
            assert!(mount_connection(&mnt).is_none());
            assert!(process_gone(pid), "{tier} run {i}: daemon left behind");
        }
    }
}

#[test]
fn zero_open_without_the_kernel_tier_is_refused_and_status_shows_absolute_sources() {
    let (t, src, mnt) = dirs();
    let _guard = Daemonized { mnt: mnt.clone() };
    let (code, _, err) = efuse(&[
        OsStr::new("mount"),
        src.as_os_str(),
        mnt.as_os_str(),
        OsStr::new("--offload"),
        OsStr::new("off"),
        OsStr::new("-o"),
        OsStr::new("zero_open"),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("zero_open") && err.contains("--offload kernel"),
        "{err}"
    );
    assert!(mount_connection(&mnt).is_none());
    // A relative source is recorded absolute.
    let out = Command::new(efuse_tests::efuse_bin())
        .args(["mount", "src", "mnt"])
        .current_dir(t.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, out, _) = efuse(&[OsStr::new("status"), OsStr::new("--json")]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let row = rows
        .iter()
        .find(|r| r["mountpoint"] == mnt.to_str().unwrap())
        .expect("row");
    assert_eq!(row["source"], src.to_str().unwrap());
    let (code, _, err) = efuse(&[OsStr::new("umount"), mnt.as_os_str()]);
    assert_eq!(code, 0, "{err}");
    let _ = std::io::stdout().flush();
}

#[test]
fn terminal_ioctls_on_files_fail_as_on_the_plain_directory() {
    for setup in SETUPS {
        let m = TestMount::with_args(setup);
        for r in [m.mnt(), m.twin()] {
            fs::write(r.join("f"), b"x").unwrap();
        }
        m.both(&format!("{setup:?} TCGETS on a file"), |r| {
            let f = File::open(r.join("f"))?;
            // SAFETY: termios is plain data; all zeroes is a valid value.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: valid fd and a termios out buffer.
            if unsafe { libc::ioctl(f.as_raw_fd(), libc::TCGETS, &mut t) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
        .unwrap_err();
    }
}

/// Run `f` on a thread of its own and wait at most `d` for it: a request
/// the daemon never answers must fail the test, not hang it (the mount's
/// guard aborts the connection, which frees the thread).
fn answered_within<T: Send + 'static>(d: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(d)
        .unwrap_or_else(|_| panic!("the request was not answered within {d:?}"))
}

#[test]
fn a_request_that_panics_is_answered_and_the_daemon_keeps_serving() {
    // Every backend call panics (the sim backend's injected panic); remote
    // backends run on the I/O pool, so this covers pool tasks on both
    // transports.
    let m = TestMount::with_config(
        "backend = \"sim\"\noffload = \"off\"\n[sim]\nmeta_us = 0\nsmall_read_us = 0\nlarge_read_us = 0\nwrite_us = 0\njitter = 0.0\npanic_rate = 1.0\n",
        &[],
    );
    for i in 0..5 {
        let p = m.m(format!("f{i}"));
        let r = answered_within(Duration::from_secs(20), move || fs::metadata(&p).map(|_| ()));
        assert_eq!(r.map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)), "stat {i}");
        let p = m.m(format!("new{i}"));
        let r = answered_within(Duration::from_secs(20), move || fs::write(&p, b"x"));
        assert_eq!(
            r.map_err(|e| e.raw_os_error()),
            Err(Some(libc::EIO)),
            "create {i}"
        );
    }
    // The daemon is alive and still serving its control socket.
    let s = efuse_tests::mount_stats(&m.mnt());
    assert_eq!(s["offload"], "off");
    assert!(m.unmount().success(), "the daemon exited with a failure");
}

#[test]
fn times_at_the_ends_of_the_range_and_before_1970_match_a_plain_directory() {
    // utimensat with the extremes of tv_sec and times before the epoch:
    // the backing filesystem clamps to its range; through the mount the
    // result must be the same, and the daemon must not fall over.
    fn set_times(p: &Path, sec: i64, nsec: i64) -> Result<(), i32> {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        let ts = [libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        }; 2];
        // SAFETY: valid C string and two timespecs.
        let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        }
    }
    for setup in SETUPS {
        let m = TestMount::with_args(setup);
        let twin = tempfile::tempdir_in(m.backing().parent().unwrap()).unwrap();
        for (i, (sec, nsec)) in [
            (i64::MIN, 0),
            (i64::MIN + 1, 999_999_999),
            (-1, 500_000_000),
            (-86_400 * 365 * 30, 1),
            (0, 0),
            (i64::MAX, 999_999_999),
        ]
        .into_iter()
        .enumerate()
        {
            let name = format!("t{i}");
            fs::write(m.m(&name), b"t").unwrap();
            fs::write(twin.path().join(&name), b"t").unwrap();
            let through = set_times(&m.m(&name), sec, nsec);
            let plain = set_times(&twin.path().join(&name), sec, nsec);
            let on_mem = setup.contains(&"mem");
            if !on_mem {
                assert_eq!(through, plain, "{setup:?} utimensat({sec}, {nsec})");
            }
            if through.is_ok() && plain.is_ok() && !on_mem {
                let a = fs::metadata(m.m(&name)).unwrap();
                let b = fs::metadata(twin.path().join(&name)).unwrap();
                assert_eq!(
                    (a.mtime(), a.mtime_nsec(), a.atime(), a.atime_nsec()),
                    (b.mtime(), b.mtime_nsec(), b.atime(), b.atime_nsec()),
                    "{setup:?} times after utimensat({sec}, {nsec})"
                );
            }
            if on_mem {
                // mem is compared with tmpfs, the other in-memory
                // filesystem (its time range is the kernel's).
                let shm = tempfile::tempdir_in("/dev/shm").unwrap();
                let p = shm.path().join(&name);
                fs::write(&p, b"t").unwrap();
                assert_eq!(
                    through,
                    set_times(&p, sec, nsec),
                    "{setup:?} utimensat({sec}, {nsec}) vs tmpfs"
                );
                if through.is_ok() {
                    let a = fs::metadata(m.m(&name)).unwrap();
                    let b = fs::metadata(&p).unwrap();
                    assert_eq!(
                        (a.mtime(), a.mtime_nsec()),
                        (b.mtime(), b.mtime_nsec()),
                        "{setup:?} mem vs tmpfs after utimensat({sec}, {nsec})"
                    );
                }
            }
        }
        // Still serving.
        assert_eq!(fs::read(m.m("t0")).unwrap(), b"t");
    }
}
