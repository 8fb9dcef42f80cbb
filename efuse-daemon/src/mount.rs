//! mount(2) of a FUSE connection, done by efuse itself.
//!
//! efuse opens `/dev/fuse`, mounts it with mount(2) and serves the
//! descriptor with its own transports (`crate::transport`). The daemon never
//! unmounts by path when its session ends (by then `efuse umount` or the
//! signal thread has unmounted, and a second umount would fail or hit
//! whatever was mounted at the same path meanwhile): unmounting is the job
//! of whoever asks for it (`efuse umount`, SIGTERM, umount(8)), and the
//! daemon only detaches a mount it still finds under its own connection
//! when its session ends on an error.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, bail};
use nix::mount::MsFlags;

/// What to mount: the kernel's share of the mount options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    /// The source shown in mountinfo (`fsname`).
    pub source: String,
    /// mount(2) flags (ro, nosuid, nodev, noexec, noatime, sync, dirsync).
    pub flags: MsFlags,
    /// Let users other than root use the mount.
    pub allow_other: bool,
    /// Let the kernel check permissions (`default_permissions`).
    pub default_permissions: bool,
}

/// Open the device of `fuse` (`/dev/fuse`, or `/dev/efuse` for efuse.ko)
/// and mount it at `mp` (type `fuse.efuse`, or `efuse`). Returns the
/// connection's descriptor; the kernel sends FUSE_INIT on it next.
pub fn mount_fuse(mp: &Path, spec: &MountSpec, fuse: crate::kfuse::Fuse) -> anyhow::Result<OwnedFd> {
    let device = fuse.device();
    // SAFETY: a constant C string; the fd is owned below.
    let fd = unsafe { libc::open(device.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot open {}", device.to_string_lossy()));
    }
    // SAFETY: just opened, owned from here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut data = format!(
        "fd={},rootmode=40000,user_id={},group_id={}",
        fd.as_raw_fd(),
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    if spec.allow_other {
        data.push_str(",allow_other");
    }
    if spec.default_permissions {
        data.push_str(",default_permissions");
    }
    // fsname may hold a comma or a space; the kernel takes the source
    // argument as it is.
    let source = CString::new(spec.source.as_bytes()).context("source contains NUL")?;
    let target = CString::new(mp.as_os_str().as_bytes()).context("mountpoint contains NUL")?;
    let data = CString::new(data).expect("no NUL in numbers");
    let fstype = CString::new(fuse.fstype()).expect("no NUL in a constant");
    // SAFETY: valid C strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            spec.flags.bits(),
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENODEV) {
            bail!(
                "the kernel has no {} filesystem type ({}): {e}",
                fuse.fstype(),
                match fuse {
                    crate::kfuse::Fuse::Kernel => "modprobe fuse",
                    crate::kfuse::Fuse::Module => "efuse.ko was unloaded: modprobe efuse",
                }
            );
        }
        return Err(e).with_context(|| format!("mount(2) of {} failed", mp.display()));
    }
    Ok(fd)
}

/// `MS_NOSYMFOLLOW` (Linux 5.10), which nix does not name.
pub const MS_NOSYMFOLLOW: MsFlags = MsFlags::from_bits_retain(256);

/// mount(2) flags for the options efuse passes to the kernel, with the
/// defaults efuse mounts with (nosuid, nodev unless asked otherwise).
pub fn flags_for(options: &[String]) -> MsFlags {
    let mut f = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    for o in options {
        apply_flag(&mut f, o);
    }
    f
}

/// Apply one mount(8) flag option to `f`; false if `o` is not one.
pub fn apply_flag(f: &mut MsFlags, o: &str) -> bool {
    // remove()/difference(), never `& !x`: bitflags' `!` drops the bits it
    // has no name for, MS_NOSYMFOLLOW among them.
    let atime = MsFlags::MS_NOATIME | MsFlags::MS_RELATIME | MsFlags::MS_STRICTATIME;
    match o {
        "ro" => *f |= MsFlags::MS_RDONLY,
        "rw" => f.remove(MsFlags::MS_RDONLY),
        "nosuid" => *f |= MsFlags::MS_NOSUID,
        "suid" => f.remove(MsFlags::MS_NOSUID),
        "nodev" => *f |= MsFlags::MS_NODEV,
        "dev" => f.remove(MsFlags::MS_NODEV),
        "noexec" => *f |= MsFlags::MS_NOEXEC,
        "exec" => f.remove(MsFlags::MS_NOEXEC),
        "noatime" => *f = f.difference(atime) | MsFlags::MS_NOATIME,
        "atime" => f.remove(MsFlags::MS_NOATIME),
        "relatime" => *f = f.difference(atime) | MsFlags::MS_RELATIME,
        "norelatime" => f.remove(MsFlags::MS_RELATIME),
        "strictatime" => *f = f.difference(atime) | MsFlags::MS_STRICTATIME,
        "nostrictatime" => f.remove(MsFlags::MS_STRICTATIME),
        "lazytime" => *f |= MsFlags::MS_LAZYTIME,
        "nolazytime" => f.remove(MsFlags::MS_LAZYTIME),
        "nosymfollow" => *f |= MS_NOSYMFOLLOW,
        "symfollow" => f.remove(MS_NOSYMFOLLOW),
        "sync" => *f |= MsFlags::MS_SYNCHRONOUS,
        "async" => f.remove(MsFlags::MS_SYNCHRONOUS),
        "dirsync" => *f |= MsFlags::MS_DIRSYNC,
        _ => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_default_to_nosuid_nodev_and_follow_the_last_word() {
        let o = |v: &[&str]| flags_for(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(o(&[]), MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        assert_eq!(o(&["ro", "rw"]), MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        assert_eq!(o(&["dev", "suid", "noexec"]), MsFlags::MS_NOEXEC);
        assert!(o(&["noatime"]).contains(MsFlags::MS_NOATIME));
    }
}
