//! efuse's run-time state, shared by the daemon and the commands that
//! talk to it: the root-only state directory (`/run/efuse`), each live
//! mount's record (`/run/efuse/mounts/`: the daemon's pid, backend, tier),
//! and what `/proc/self/mountinfo` says about mounts.

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Root of efuse's run-time state.
pub const STATE_DIR: &str = "/run/efuse";
pub(crate) const READY_FD_ENV: &str = "EFUSE_READY_FD";
pub(crate) const CONFIG_ENV: &str = "EFUSE_MOUNT_CONFIG";

/// What `status` knows of a mount.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountRecord {
    /// Absolute mount point.
    pub mountpoint: PathBuf,
    /// Backend source.
    pub source: String,
    /// Backend label (`dir`, `mem`, `sim+dir`).
    pub backend: String,
    /// Offload tier in effect.
    pub offload: String,
    /// Request transport in use (`uring`, `classic`).
    #[serde(default)]
    pub transport: String,
    /// How the backend holds inodes (`handles`, `descriptors`; `-` for
    /// backends that hold no backing objects).
    #[serde(default)]
    pub inodes: String,
    /// Daemon pid.
    pub pid: u32,
    /// FUSE connection id (kernel dev_t of the mount).
    pub connection: u32,
    /// The kernel FUSE the mount goes through.
    #[serde(default)]
    pub fuse: crate::kfuse::Fuse,
    /// Unix time the mount became ready.
    pub started: u64,
    /// Daemon log file, if daemonized.
    pub log: Option<PathBuf>,
}

/// Make `p` absolute and drop `.`/`..` without touching the filesystem
/// (a dead FUSE mount cannot be canonicalized).
pub fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    let base = if p.is_absolute() {
        PathBuf::new()
    } else {
        std::env::current_dir()?
    };
    let mut out = PathBuf::from("/");
    for c in base.join(p).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    Ok(out)
}

/// Stable short id of a mount point, used to name its record, log and socket.
pub fn mount_id(mp: &Path) -> String {
    // FNV-1a: a stable, dependency-free name for the record.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in mp.as_os_str().as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

pub(crate) fn records_dir() -> PathBuf {
    Path::new(STATE_DIR).join("mounts")
}

pub(crate) fn ensure_state_dirs() -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(records_dir())
        .with_context(|| format!("cannot create {}", records_dir().display()))
}

pub(crate) fn record_path(mp: &Path) -> PathBuf {
    records_dir().join(format!("{}.json", mount_id(mp)))
}

pub(crate) fn write_record(r: &MountRecord) -> anyhow::Result<()> {
    ensure_state_dirs()?;
    let p = record_path(&r.mountpoint);
    let tmp = p.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(serde_json::to_string_pretty(r)?.as_bytes())?;
    fs::rename(&tmp, &p)?;
    Ok(())
}

/// Read the record of a mount point, if any.
pub fn read_record(mp: &Path) -> Option<MountRecord> {
    let text = fs::read_to_string(record_path(mp)).ok()?;
    serde_json::from_str(&text).ok()
}

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// Mount point.
    pub mountpoint: PathBuf,
    /// Filesystem type (`fuse.efuse`, or `efuse` through efuse.ko).
    pub fstype: String,
    /// Source.
    pub source: String,
    /// Kernel dev_t (major << 20 | minor), the FUSE connection id.
    pub dev: u32,
    /// Mount options: the per-mount ones, then the superblock's.
    pub options: Vec<String>,
}

impl MountInfo {
    /// The FUSE behind this mount if it is an efuse mount.
    pub fn efuse(&self) -> Option<crate::kfuse::Fuse> {
        crate::kfuse::Fuse::of_fstype(&self.fstype)
    }

    /// Abort this mount's FUSE connection (any FUSE mount, efuse's or a
    /// peer's, through the kernel's FUSE or efuse.ko); false if it is not
    /// a FUSE mount or the control filesystem refused.
    pub fn abort(&self) -> bool {
        crate::kfuse::Fuse::of_any_fstype(&self.fstype).is_some_and(|f| {
            f.mount_control();
            fs::write(f.abort_file(self.dev), b"1").is_ok()
        })
    }
}

fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from(OsStr::from_bytes(&out)))
}

/// Parse `/proc/self/mountinfo`.
pub fn mountinfo() -> anyhow::Result<Vec<MountInfo>> {
    let text = fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.len() < sep + 3 || f.len() < 5 {
            continue;
        }
        let (maj, min) = f[2].split_once(':').unwrap_or(("0", "0"));
        let dev = (maj.parse::<u32>().unwrap_or(0) << 20) | min.parse::<u32>().unwrap_or(0);
        out.push(MountInfo {
            mountpoint: unescape_mountinfo(f[4]),
            fstype: f[sep + 1].to_string(),
            source: f[sep + 2].to_string(),
            dev,
            options: f[5]
                .split(',')
                .chain(f.get(sep + 3).copied().unwrap_or("").split(','))
                .filter(|o| !o.is_empty())
                .map(str::to_string)
                .collect(),
        });
    }
    Ok(out)
}

pub(crate) fn mounted_at(mp: &Path) -> anyhow::Result<Option<MountInfo>> {
    Ok(mountinfo()?.into_iter().rev().find(|m| m.mountpoint == mp))
}

/// True if `pid` is a running (not zombie) process.
pub(crate) fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// True if the efuse mount at `mp` has lost its daemon. Decided from the
/// record and /proc, never by a call on the mount (a stalled backend would
/// block it).
pub(crate) fn connection_dead(mp: &Path) -> bool {
    read_record(mp).as_ref().and_then(daemon_pid).is_none()
}

/// FUSE connection id of the mount at `mp` (the kernel dev_t).
pub fn connection_of(mp: &Path) -> Option<u32> {
    mounted_at(mp).ok().flatten().map(|m| m.dev)
}

/// Wait until process `pid` has exited entirely (every thread gone, so
/// every descriptor it held, backing files included, is closed), at most
/// `d`. True if it has. A zombie leader whose other threads still run is
/// not gone yet: the pidfd becomes readable only once the thread group is
/// empty.
pub fn wait_exit(pid: u32, d: Duration) -> bool {
    // SAFETY: pidfd_open has no memory arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        // ESRCH: already gone. Anything else (pre-5.3 kernel): poll /proc.
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            return true;
        }
        let deadline = Instant::now() + d;
        while pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        return !pid_alive(pid);
    }
    // SAFETY: a descriptor we own from here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let deadline = Instant::now() + d;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n > 0 {
            return true;
        }
        if n == 0 || (n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)) {
            return false;
        }
    }
}

/// The daemon pid of a record, if that process still is an efuse daemon
/// (not a reused pid).
pub(crate) fn daemon_pid(r: &MountRecord) -> Option<u32> {
    let comm = fs::read_to_string(format!("/proc/{}/comm", r.pid)).ok()?;
    let comm = comm.trim_end();
    (pid_alive(r.pid) && (comm.starts_with("efuse") || comm.starts_with("mount.fuse"))).then_some(r.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_is_lexical() {
        assert_eq!(
            absolute(Path::new("/a/b/../c/./d")).unwrap(),
            PathBuf::from("/a/c/d")
        );
        assert_eq!(absolute(Path::new("/..")).unwrap(), PathBuf::from("/"));
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), PathBuf::from("/mnt/a b"));
        assert_eq!(unescape_mountinfo("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn mountinfo_lists_root() {
        let all = mountinfo().unwrap();
        assert!(all.iter().any(|m| m.mountpoint == Path::new("/")));
    }

    #[test]
    fn mount_ids_differ() {
        assert_ne!(mount_id(Path::new("/a")), mount_id(Path::new("/b")));
    }
}
