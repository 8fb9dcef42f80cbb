//! Atime modes: the dir backend serves the tree through a private,
//! detached copy of its mount with the efuse mount's atime mode, so that
//! reads through efuse update backing atimes as that mode says.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// An atime mode of a mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Atime {
    /// `noatime`: reads never update atimes.
    No,
    /// `relatime`: only when atime is older than mtime/ctime or a day.
    Rel,
    /// `strictatime`: every read.
    Strict,
}

impl Atime {
    /// The atime mode an efuse mount's options ask for (the last one
    /// named wins, as with mount(8)); None if they name none.
    pub fn of_options(options: &[String]) -> Option<Self> {
        options.iter().rev().find_map(|o| match o.as_str() {
            "noatime" => Some(Atime::No),
            "relatime" => Some(Atime::Rel),
            "strictatime" => Some(Atime::Strict),
            _ => None,
        })
    }

    pub(super) fn mount_attr(self) -> u64 {
        match self {
            Atime::No => 0x10,
            Atime::Rel => 0x00,
            Atime::Strict => 0x20,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Atime::No => "noatime",
            Atime::Rel => "relatime",
            Atime::Strict => "strictatime",
        }
    }
}

/// A private, detached copy of `root`'s mount with atime mode `mode`
/// (open_tree and mount_setattr, Linux 5.12+); `None` where the kernel
/// cannot.
pub(super) fn atime_view(root: &Path, mode: Atime) -> anyhow::Result<Option<OwnedFd>> {
    use anyhow::Context;
    let c = CString::new(root.as_os_str().as_bytes()).context("backend path contains NUL")?;
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const MOUNT_ATTR_ATIME_MASK: u64 = 0x70;
    // SAFETY: valid C string; the returned fd is owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Ok(None);
    }
    // SAFETY: a descriptor we own from here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // struct mount_attr: attr_set, attr_clr, propagation, userns_fd.
    let attr: [u64; 4] = [mode.mount_attr(), MOUNT_ATTR_ATIME_MASK, 0, 0];
    // SAFETY: valid fd, empty C string, and a mount_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    Ok((rc == 0).then_some(fd))
}
