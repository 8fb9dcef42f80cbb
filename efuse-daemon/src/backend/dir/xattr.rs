//! The dir backend's extended attributes: through the `O_PATH` descriptor
//! with getxattrat(2)/listxattrat(2) where the kernel has them (6.13+), else
//! through `/proc/self/fd/N`.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{DirBackend, check, cstr, proc_path};
use crate::backend::{BackendError, Ino, Result};

/// getxattrat(2)/listxattrat(2) (Linux 6.13+): read attributes through the
/// O_PATH descriptor itself. Without them every call resolves the
/// `/proc/self/fd/N` path (a procfs lookup and a magic-link walk).
const SYS_GETXATTRAT: libc::c_long = 464;
const SYS_LISTXATTRAT: libc::c_long = 465;

/// `struct xattr_args`.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// The `*xattrat` calls may be used (cleared at the first ENOSYS).
static XATTR_AT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// The kernel has no `*xattrat` syscalls (ENOSYS; EBADF where an older
/// kernel refuses an O_PATH descriptor): remember, and use the path.
fn xattr_at_missing<T>(r: &Result<T>) -> bool {
    let missing = matches!(r, Err(e) if matches!(e.to_errno(), libc::ENOSYS | libc::EBADF));
    if missing {
        XATTR_AT.store(false, Ordering::Relaxed);
    }
    missing
}

impl DirBackend {
    pub(super) fn xattr_target(&self, ino: Ino) -> Result<(Arc<OwnedFd>, CString)> {
        let fd = self.fd(ino)?;
        let p = proc_path(fd.as_raw_fd());
        Ok((fd, p))
    }

    /// Call an xattr getter twice: once for the size, once for the data.
    pub(super) fn xattr_buf(
        op: &'static str,
        f: impl Fn(*mut libc::c_void, usize) -> isize,
    ) -> Result<Vec<u8>> {
        loop {
            let size = f(std::ptr::null_mut(), 0);
            if size < 0 {
                return Err(BackendError::last_os(op));
            }
            let mut buf = vec![0u8; size as usize];
            let got = f(buf.as_mut_ptr().cast(), buf.len());
            if got < 0 {
                let e = std::io::Error::last_os_error();
                // Grew between the two calls: ask again.
                if e.raw_os_error() == Some(libc::ERANGE) {
                    continue;
                }
                return Err(BackendError::io(op, e));
            }
            buf.truncate(got as usize);
            return Ok(buf);
        }
    }

    pub(super) fn xattr_get(&self, ino: Ino, name: &OsStr) -> Result<Vec<u8>> {
        let n = cstr(name)?;
        if XATTR_AT.load(Ordering::Relaxed) {
            let fd = self.fd(ino)?;
            let r = Self::xattr_buf("getxattrat", |p, len| {
                let mut args = XattrArgs {
                    value: p as u64,
                    size: len as u32,
                    flags: 0,
                };
                // SAFETY: a valid descriptor, C strings, and `args` naming a
                // buffer of `len` bytes (or null, 0).
                unsafe {
                    libc::syscall(
                        SYS_GETXATTRAT,
                        fd.as_raw_fd(),
                        c"".as_ptr(),
                        libc::AT_EMPTY_PATH,
                        n.as_ptr(),
                        &mut args as *mut XattrArgs,
                        std::mem::size_of::<XattrArgs>(),
                    ) as isize
                }
            });
            if !xattr_at_missing(&r) {
                return r;
            }
        }
        let (_fd, path) = self.xattr_target(ino)?;
        Self::xattr_buf("getxattr", |p, len| {
            // SAFETY: valid C strings and a buffer of `len` bytes (or null, 0).
            unsafe { libc::getxattr(path.as_ptr(), n.as_ptr(), p, len) }
        })
    }

    pub(super) fn xattr_set(&self, ino: Ino, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        let (_fd, path) = self.xattr_target(ino)?;
        let n = cstr(name)?;
        // SAFETY: valid C strings and value slice.
        let rc = unsafe {
            libc::setxattr(
                path.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        };
        check("setxattr", rc)?;
        Ok(())
    }

    pub(super) fn xattr_list(&self, ino: Ino) -> Result<Vec<u8>> {
        if XATTR_AT.load(Ordering::Relaxed) {
            let fd = self.fd(ino)?;
            let r = Self::xattr_buf("listxattrat", |p, len| {
                // SAFETY: a valid descriptor and a buffer of `len` bytes (or null, 0).
                unsafe {
                    libc::syscall(
                        SYS_LISTXATTRAT,
                        fd.as_raw_fd(),
                        c"".as_ptr(),
                        libc::AT_EMPTY_PATH,
                        p,
                        len,
                    ) as isize
                }
            });
            if !xattr_at_missing(&r) {
                return r;
            }
        }
        let (_fd, path) = self.xattr_target(ino)?;
        Self::xattr_buf("listxattr", |p, len| {
            // SAFETY: valid C string and a buffer of `len` bytes (or null, 0).
            unsafe { libc::listxattr(path.as_ptr(), p.cast(), len) }
        })
    }

    pub(super) fn xattr_remove(&self, ino: Ino, name: &OsStr) -> Result<()> {
        let (_fd, path) = self.xattr_target(ino)?;
        let n = cstr(name)?;
        // SAFETY: valid C strings.
        check("removexattr", unsafe {
            libc::removexattr(path.as_ptr(), n.as_ptr())
        })?;
        Ok(())
    }
}
