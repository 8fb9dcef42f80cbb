//! Harness for efuse's real-mount tests.
//!
//! [`TestMount`] mounts the `efuse` binary for real over a temporary
//! backing directory and keeps a *twin*: a plain directory with the same
//! starting content. A mutating operation is applied once through the mount
//! and once to the twin ([`TestMount::both`]); the results (value or errno)
//! must match, and at the end the backing tree must equal the twin tree
//! ([`assert_same_tree`]). Read-only checks compare the mount with the
//! backing directory directly.
//!
//! Teardown never depends on the test passing: `Drop` detaches the mount
//! (MNT_DETACH never blocks), aborts the FUSE connection so no thread stays
//! stuck in a request, then kills and reaps the daemon.

pub mod vm;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `efuse` binary built from this workspace.
pub fn efuse_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("EFUSE_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    for profile in ["debug", "release"] {
        let p = target.join(profile).join("efuse");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "efuse binary not found under {}: run `cargo build -p efuse-daemon` first \
         (`cargo xtask test` does it), or set EFUSE_BIN",
        target.display()
    );
}

/// A live efuse mount for one test.
pub struct TestMount {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// FUSE connection id (dev_t of the mount).
    pub connection: u32,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    /// The config file, kept for restarts.
    config: Option<tempfile::NamedTempFile>,
}

/// Kernel dev_t of the filesystem holding `p` (major << 20 | minor).
pub fn kernel_dev(p: &Path) -> io::Result<u32> {
    let dev = fs::metadata(p)?.dev();
    let (maj, min) = (libc::major(dev), libc::minor(dev));
    Ok((maj << 20) | min)
}

fn lazy_unmount(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path");
    // SAFETY: valid C string; MNT_DETACH never blocks.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// Guard for tests whose mounts are made by a program (say `efuse bench`):
/// on drop, even after a failed assertion, every mount under the path is
/// aborted (FUSE) and detached, deepest first.
pub struct UnmountUnder(pub PathBuf);

impl Drop for UnmountUnder {
    fn drop(&mut self) {
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut under: Vec<PathBuf> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
            .filter(|m| m.starts_with(&self.0) && m != &self.0)
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in under {
            if let Some(conn) = mount_connection(&m) {
                abort_connection(conn);
            }
            lazy_unmount(&m);
        }
    }
}

/// Where FUSE connections show their control files: the kernel's FUSE,
/// and efuse.ko's beside it.
const CONTROL_DIRS: [&str; 2] = ["/sys/fs/fuse/connections", "/sys/fs/efuse/connections"];

/// Abort FUSE connection `conn`, of the kernel's FUSE or of efuse.ko
/// (connection numbers are device numbers from one allocator: a number
/// names one connection of either at a time).
pub fn abort_connection(conn: u32) {
    for ctl in CONTROL_DIRS {
        let _ = fs::write(format!("{ctl}/{conn}/abort"), b"1");
    }
}

/// FUSE connection id of the mount at `p`, from mountinfo (no syscall on
/// the mount itself, so it works on a dead or failing mount).
pub fn mount_connection(p: &Path) -> Option<u32> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        if f.get(4).map(Path::new) != Some(p) {
            return None;
        }
        let (maj, min) = f.get(2)?.split_once(':')?;
        Some((maj.parse::<u32>().ok()? << 20) | min.parse::<u32>().ok()?)
    })
}

/// `extra` with `--offload off` added unless it (or its config file) names
/// a tier: efuse mounts `auto` by default, the tests' baseline is plain
/// FUSE, and a test that wants a tier says which.
fn with_default_tier(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let named = extra.windows(2).any(|w| {
        (w[0] == "-o" && w[1].split(',').any(|o| o.starts_with("offload=")))
            || (w[0] == "--config" && fs::read_to_string(w[1]).is_ok_and(|t| t.contains("offload")))
    }) || extra.contains(&"--offload");
    if !named {
        v.extend(["--offload".to_string(), "off".to_string()]);
    }
    v
}

impl TestMount {
    /// Mount a `dir` backend with `--offload off` and default options.
    pub fn new() -> Self {
        Self::with_args(&[])
    }

    /// Wait until the daemon has handled every change made to the backing
    /// tree so far ([`settle_mount`]).
    pub fn settle(&self) {
        settle_mount(&self.mnt());
    }

    /// Wait until no request of this mount is in flight: the kernel counts
    /// a request as waiting from its allocation to its reply, so this
    /// covers background ones a syscall only started (readahead, an
    /// asynchronous RELEASE once it is queued).
    pub fn quiesce(&self) {
        let path = CONTROL_DIRS
            .iter()
            .map(|c| PathBuf::from(format!("{c}/{}/waiting", self.connection)))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no control file for connection {}", self.connection));
        let idle = eventually(Duration::from_secs(60), || {
            fs::read_to_string(&path).is_ok_and(|w| w.trim() == "0")
        });
        assert!(
            idle,
            "requests still in flight on {} after 60 s",
            self.mnt().display()
        );
    }

    /// Mount with extra `efuse mount` arguments.
    pub fn with_args(extra: &[&str]) -> Self {
        Self::with_args_env(extra, &[])
    }

    /// Mount with a TOML config file holding `toml`, plus extra arguments.
    pub fn with_config(toml: &str, extra: &[&str]) -> Self {
        let cfg = tempfile::NamedTempFile::new().expect("config file");
        fs::write(cfg.path(), toml).expect("write config");
        let path = cfg.path().to_str().expect("utf-8 temp path").to_string();
        let mut args = vec!["--config", path.as_str()];
        args.extend_from_slice(extra);
        let mut m = Self::with_args(&args);
        m.config = Some(cfg);
        m
    }

    /// Mount with extra arguments and environment variables for the daemon.
    pub fn with_args_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::with_args_env_in(&std::env::temp_dir(), extra, env)
    }

    /// Mount with extra arguments, with the backing directory, the twin and
    /// the mount point under `base` (say, a [`Tmpfs`]).
    pub fn with_args_in(base: &Path, extra: &[&str]) -> Self {
        Self::with_args_env_in(base, extra, &[])
    }

    fn with_args_env_in(base: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("efuse-test")
            .tempdir_in(base)
            .expect("tempdir");
        // The mount point sits one level deeper than the backing dir, so a
        // relative symlink resolves differently on the two sides.
        for d in ["backing", "twin", "mounts/mnt"] {
            fs::create_dir_all(dir.path().join(d)).expect("mkdir");
        }
        let mut m = Self {
            dir,
            child: None,
            connection: 0,
            extra: with_default_tier(extra),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            config: None,
        };
        m.start();
        m
    }

    /// Start (or restart) the daemon in the foreground and wait until it is ready.
    pub fn start(&mut self) {
        let (rd, wr) = pipe();
        let wr_fd = wr.as_raw_fd();
        let mut cmd = Command::new(efuse_bin());
        cmd.arg("mount")
            .arg(self.backing())
            .arg(self.mnt())
            .arg("--foreground")
            .args(&self.extra)
            .env("EFUSE_READY_FD", wr_fd.to_string())
            .env(
                "EFUSE_LOG",
                std::env::var("EFUSE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null());
        // A test may cap the daemon's descriptors (both limits, so it
        // cannot raise them) with the pseudo variable `__NOFILE`.
        let nofile: Option<u64> = self
            .env
            .iter()
            .find(|(k, _)| k == "__NOFILE")
            .and_then(|(_, v)| v.parse().ok());
        // SAFETY: only async-signal-safe fcntl/setrlimit between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let flags = libc::fcntl(wr_fd, libc::F_GETFD);
                libc::fcntl(wr_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                if let Some(n) = nofile {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn efuse");
        drop(wr);
        self.child = Some(child);
        let mut msg = String::new();
        fs::File::from(rd).read_to_string(&mut msg).ok();
        assert_eq!(msg.trim(), "ready", "efuse did not become ready: {msg:?}");
        self.connection = mount_connection(&self.mnt()).expect("mount missing from mountinfo");
    }

    /// The mount point.
    pub fn mnt(&self) -> PathBuf {
        self.dir.path().join("mounts/mnt")
    }
    /// The backing directory.
    pub fn backing(&self) -> PathBuf {
        self.dir.path().join("backing")
    }
    /// The twin directory.
    pub fn twin(&self) -> PathBuf {
        self.dir.path().join("twin")
    }
    /// Scratch space next to the mount.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }
    /// `rel` under the mount.
    pub fn m(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mnt().join(rel)
    }
    /// `rel` under the backing directory.
    pub fn b(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.backing().join(rel)
    }

    /// Create `rel` with `data` in both the backing dir and the twin.
    pub fn seed_file(&self, rel: &str, data: &[u8]) {
        for root in [self.backing(), self.twin()] {
            let p = root.join(rel);
            if let Some(d) = p.parent() {
                fs::create_dir_all(d).expect("mkdir");
            }
            fs::write(p, data).expect("seed");
        }
    }

    /// Run `op` through the mount and on the twin; assert both give the same
    /// value or the same errno, and return the mount's result.
    pub fn both<T: PartialEq + std::fmt::Debug>(
        &self,
        what: &str,
        op: impl Fn(&Path) -> io::Result<T>,
    ) -> io::Result<T> {
        let a = op(&self.mnt());
        let b = op(&self.twin());
        match (&a, &b) {
            (Ok(x), Ok(y)) => assert_eq!(x, y, "{what}: values differ"),
            (Err(x), Err(y)) => assert_eq!(
                x.raw_os_error(),
                y.raw_os_error(),
                "{what}: errno differs (mount {x}, twin {y})"
            ),
            _ => panic!("{what}: mount gave {a:?}, twin gave {b:?}"),
        }
        a
    }

    /// Unmount cleanly, wait for the daemon to exit, and mount the same
    /// backing directory again with a new daemon.
    pub fn restart(&mut self) {
        let out = Command::new(efuse_bin())
            .arg("umount")
            .arg(self.mnt())
            .output()
            .expect("efuse umount");
        assert!(
            out.status.success(),
            "efuse umount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut c = self.child.take().expect("daemon");
        wait_timeout(&mut c, Duration::from_secs(60)).expect("daemon did not exit after umount");
        self.start();
    }

    /// Kill the daemon with SIGKILL, as a crash would.
    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Daemon pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Unmount cleanly and wait for the daemon to exit; returns its status.
    pub fn unmount(mut self) -> std::process::ExitStatus {
        let status = Command::new(efuse_bin())
            .arg("umount")
            .arg(self.mnt())
            .output()
            .expect("efuse umount");
        assert!(
            status.status.success(),
            "efuse umount failed: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        let mut c = self.child.take().expect("daemon");
        wait_timeout(&mut c, Duration::from_secs(60)).expect("daemon did not exit after umount")
    }
}

impl Default for TestMount {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        let mnt = self.mnt();
        // Connection ids are reused as soon as a mount is gone: abort only
        // while our mount is still there under our id, and before detaching.
        if let Some(conn) = mount_connection(&mnt) {
            if conn == self.connection {
                abort_connection(conn);
            }
            lazy_unmount(&mnt);
        }
        if let Some(mut c) = self.child.take()
            && wait_timeout(&mut c, Duration::from_secs(3)).is_none()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Wait for a child with a deadline.
pub fn wait_timeout(c: &mut Child, d: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + d;
    loop {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: valid out array of two ints.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2");
    // SAFETY: both fds were just created and are owned here.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// What two trees are compared on, per entry.
#[derive(Debug, PartialEq, Eq)]
pub struct Node {
    /// File type and permission bits.
    pub mode: u32,
    /// Size (directories: not compared).
    pub size: u64,
    /// Link count (files only).
    pub nlink: u64,
    /// Content (files) or target (symlinks).
    pub data: Vec<u8>,
}

/// Snapshot of a tree, keyed by path bytes relative to the root.
pub fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("read_dir") {
            let e = e.expect("entry");
            let p = e.path();
            let md = fs::symlink_metadata(&p).expect("lstat");
            let rel = p
                .strip_prefix(root)
                .expect("prefix")
                .as_os_str()
                .as_bytes()
                .to_vec();
            let ft = md.file_type();
            let data = if ft.is_file() {
                fs::read(&p).expect("read")
            } else if ft.is_symlink() {
                fs::read_link(&p)
                    .expect("readlink")
                    .as_os_str()
                    .as_bytes()
                    .to_vec()
            } else {
                Vec::new()
            };
            if ft.is_dir() {
                stack.push(p);
            }
            out.insert(
                rel,
                Node {
                    mode: md.mode(),
                    size: if ft.is_dir() { 0 } else { md.size() },
                    nlink: if ft.is_dir() { 0 } else { md.nlink() },
                    data,
                },
            );
        }
    }
    out
}

/// Assert two trees hold the same names, types, modes, sizes, links and data.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let (sa, sb) = (snapshot(a), snapshot(b));
    let ka: Vec<_> = sa
        .keys()
        .map(|k| OsString::from(std::ffi::OsStr::from_bytes(k)))
        .collect();
    let kb: Vec<_> = sb
        .keys()
        .map(|k| OsString::from(std::ffi::OsStr::from_bytes(k)))
        .collect();
    assert_eq!(
        ka,
        kb,
        "trees {} and {} differ in names",
        a.display(),
        b.display()
    );
    for (k, va) in &sa {
        assert_eq!(va, &sb[k], "{:?} differs", String::from_utf8_lossy(k));
    }
}

/// Run `f` on another thread and fail (instead of hanging) if it takes longer than `d`.
pub fn within<T: Send + 'static>(d: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(d).expect("operation hung")
}

/// `efuse mount SRC MNT EXTRA...`, daemonized; panics unless it succeeds.
pub fn mount_daemonized(src: &Path, mnt: &Path, extra: &[&str]) {
    let extra = with_default_tier(extra);
    let mut args: Vec<&std::ffi::OsStr> = vec!["mount".as_ref(), src.as_os_str(), mnt.as_os_str()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    let (code, _, err) = efuse(&args);
    assert_eq!(code, 0, "{err}");
}

/// Run the efuse CLI; returns (exit code, stdout, stderr).
pub fn efuse(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    let out = Command::new(efuse_bin()).args(args).output().expect("run efuse");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `efuse stats --json` of a mount.
pub fn mount_stats(mnt: &Path) -> serde_json::Value {
    let (code, out, err) = efuse(&[
        std::ffi::OsStr::new("stats"),
        std::ffi::OsStr::new("--json"),
        mnt.as_os_str(),
    ]);
    assert_eq!(code, 0, "efuse stats failed: {err}");
    serde_json::from_str(&out).expect("stats json")
}

/// Kernel-side upcalls of one opcode (from the tracepoints).
pub fn upcalls(v: &serde_json::Value, op: &str) -> u64 {
    v["kernel"]
        .as_array()
        .expect("kernel stats")
        .iter()
        .find(|k| k["name"] == op)
        .map_or(0, |k| k["sent"].as_u64().unwrap_or(0))
}

/// The daemon's own count of one opcode.
pub fn daemon_count(v: &serde_json::Value, op: &str) -> u64 {
    v["daemon"]
        .as_array()
        .expect("daemon stats")
        .iter()
        .find(|k| k["name"] == op)
        .map_or(0, |k| k["count"].as_u64().unwrap_or(0))
}

/// Poll `f` until it returns true or `d` passes; returns whether it did.
pub fn eventually(d: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + d;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until the daemon of the mount at `mnt` has handled every change
/// made behind the mount before this call (its inotify queue is empty and
/// no batch is being handled): what a test that changed the backing tree
/// waits for before it counts upcalls or reads through the kernel's caches.
/// A bound, not a guess: fails after 60 s.
pub fn settle_mount(mnt: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = mount_stats(mnt);
        if !s["changes_pending"].as_bool().unwrap_or(false) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon of {} still has changes pending after 60 s",
            mnt.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Names of the BPF programs (`progs`) or maps loaded in the kernel now,
/// from the bpf(2) id iterators (what `bpftool prog/map list` shows).
pub fn bpf_objects(progs: bool) -> Vec<String> {
    // Commands and struct offsets from include/uapi/linux/bpf.h.
    let (next_cmd, fd_cmd, name_off) = if progs { (11, 13, 64) } else { (12, 14, 24) };
    const GET_INFO: libc::c_long = 15;
    let sys = |cmd: libc::c_long, attr: &mut [u8; 128]| -> i64 {
        // SAFETY: a zeroed bpf_attr-sized buffer, valid for the call.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128u32) }
    };
    let mut names = Vec::new();
    let mut id = 0u32;
    loop {
        let mut a = [0u8; 128];
        a[0..4].copy_from_slice(&id.to_ne_bytes());
        if sys(next_cmd, &mut a) < 0 {
            break;
        }
        id = u32::from_ne_bytes(a[4..8].try_into().unwrap());
        let mut a = [0u8; 128];
        a[0..4].copy_from_slice(&id.to_ne_bytes());
        let fd = sys(fd_cmd, &mut a);
        if fd < 0 {
            continue;
        }
        // SAFETY: a descriptor we own from here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut info = [0u8; 256];
        let mut a = [0u8; 128];
        a[0..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
        a[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
        a[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
        if sys(GET_INFO, &mut a) == 0 {
            let raw = &info[name_off..name_off + 16];
            let end = raw.iter().position(|&c| c == 0).unwrap_or(16);
            names.push(String::from_utf8_lossy(&raw[..end]).into_owned());
        }
    }
    names
}

/// Tears down a daemonized mount (`efuse mount` without `--foreground`)
/// whatever happens to the test: abort, detach, kill the daemon.
pub struct Daemonized {
    /// The mount point.
    pub mnt: PathBuf,
}

impl Drop for Daemonized {
    fn drop(&mut self) {
        let pid = status_pid(&self.mnt);
        if let Some(conn) = mount_connection(&self.mnt) {
            abort_connection(conn);
            lazy_unmount(&self.mnt);
        }
        if let Some(pid) = pid {
            // SAFETY: a signal to a pid; at worst ESRCH.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// The daemon pid `efuse status` shows for a mount point.
pub fn status_pid(mnt: &Path) -> Option<u32> {
    let (_, out, _) = efuse(&[std::ffi::OsStr::new("status"), std::ffi::OsStr::new("--json")]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).ok()?;
    rows.iter()
        .find(|r| r["mountpoint"] == mnt.to_str().unwrap_or_default())
        .and_then(|r| r["pid"].as_u64())
        .map(|p| p as u32)
}

/// True once no thread of process `pid` is left (a zombie whose threads
/// are all gone counts as exited: it holds no descriptor any more).
pub fn process_gone(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/status")) {
        Err(_) => true,
        Ok(s) => {
            let zombie = s.lines().any(|l| l.starts_with("State:") && l.contains('Z'));
            let threads = s
                .lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse::<u32>().ok())
                .unwrap_or(1);
            let fds = fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
            zombie && threads <= 1 && fds == 0
        }
    }
}

/// Run a shell command (`sh -c`), returning (exit code, stdout, stderr).
pub fn sh(cmd: &str, dir: &Path) -> (i32, String, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run sh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A tmpfs mounted for one test, detached on drop: a filesystem other than
/// the one under /tmp (for cross-filesystem moves), and cheap fsync.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mount a fresh tmpfs (world-searchable, for tests that switch users).
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("efuse-tmpfs")
            .tempdir()
            .expect("tempdir");
        let c = std::ffi::CString::new(dir.path().as_os_str().as_bytes()).expect("path");
        // SAFETY: valid C strings.
        let rc = unsafe {
            libc::mount(
                c"efuse-test".as_ptr(),
                c.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                c"mode=0755".as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount tmpfs: {}", io::Error::last_os_error());
        Self { dir }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for Tmpfs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        lazy_unmount(self.dir.path());
    }
}

/// A temporary directory holding an empty `src` and `mnt`, for tests that
/// mount with the `efuse` command itself.
pub fn src_and_mnt() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, mnt) = (t.path().join("src"), t.path().join("mnt"));
    fs::create_dir(&src).expect("mkdir src");
    fs::create_dir(&mnt).expect("mkdir mnt");
    (t, src, mnt)
}
