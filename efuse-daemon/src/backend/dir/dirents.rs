//! The dir backend's directory listings: getdents64 on the backing
//! directory, resumed from its cookies, with attributes for READDIRPLUS.

use std::ffi::OsString;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use super::{DirBackend, cstr};
use crate::backend::{Attr, Backend, BackendError, DirEntry, Fh, FileKind, Result};

/// Parse a `getdents64` buffer into entries.
fn parse_dirents(buf: &[u8], out: &mut Vec<(OsString, u64, u8, u64)>) {
    let mut pos = 0;
    while pos + 19 <= buf.len() {
        let ino = u64::from_ne_bytes(buf[pos..pos + 8].try_into().expect("8 bytes"));
        let off = u64::from_ne_bytes(buf[pos + 8..pos + 16].try_into().expect("8 bytes"));
        let reclen = u16::from_ne_bytes(buf[pos + 16..pos + 18].try_into().expect("2 bytes")) as usize;
        let dtype = buf[pos + 18];
        if reclen == 0 || pos + reclen > buf.len() {
            break;
        }
        let name_bytes = &buf[pos + 19..pos + reclen];
        let len = name_bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_bytes.len());
        out.push((OsString::from_vec(name_bytes[..len].to_vec()), ino, dtype, off));
        pos += reclen;
    }
}

fn kind_from_dtype(d: u8) -> Option<FileKind> {
    Some(match d {
        libc::DT_REG => FileKind::File,
        libc::DT_DIR => FileKind::Dir,
        libc::DT_LNK => FileKind::Symlink,
        libc::DT_FIFO => FileKind::Fifo,
        libc::DT_SOCK => FileKind::Socket,
        libc::DT_CHR => FileKind::CharDev,
        libc::DT_BLK => FileKind::BlockDev,
        _ => return None,
    })
}

impl DirBackend {
    pub(super) fn dir_read(&self, dh: Fh, offset: u64, max: usize) -> Result<Vec<DirEntry>> {
        let h = self
            .dirs
            .read()
            .get(&dh)
            .cloned()
            .ok_or(BackendError::Stale(dh))?;
        let h = h.lock();
        // SAFETY: valid fd.
        let rc = unsafe { libc::lseek(h.fd.as_raw_fd(), offset as libc::off_t, libc::SEEK_SET) };
        if rc < 0 {
            return Err(BackendError::last_os("seekdir"));
        }
        let mut out = Vec::new();
        let mut raw = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while out.len() < max {
            // SAFETY: valid fd and buffer of the given length.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_getdents64,
                    h.fd.as_raw_fd(),
                    buf.as_mut_ptr(),
                    buf.len(),
                )
            };
            if n < 0 {
                return Err(BackendError::last_os("getdents64"));
            }
            if n == 0 {
                break;
            }
            raw.clear();
            parse_dirents(&buf[..n as usize], &mut raw);
            for (name, ino, dtype, next) in raw.drain(..) {
                if out.len() >= max {
                    break;
                }
                let kind = match kind_from_dtype(dtype) {
                    Some(k) => k,
                    None => {
                        let c = cstr(&name)?;
                        let mut st = MaybeUninit::<libc::stat>::uninit();
                        // SAFETY: valid dirfd, C string and out pointer.
                        let rc = unsafe {
                            libc::fstatat(
                                h.fd.as_raw_fd(),
                                c.as_ptr(),
                                st.as_mut_ptr(),
                                libc::AT_SYMLINK_NOFOLLOW,
                            )
                        };
                        if rc < 0 {
                            continue;
                        }
                        // SAFETY: fstatat succeeded.
                        FileKind::from_mode(unsafe { st.assume_init() }.st_mode).unwrap_or(FileKind::File)
                    }
                };
                out.push(DirEntry {
                    name,
                    ino,
                    kind,
                    next,
                });
            }
        }
        Ok(out)
    }

    pub(super) fn dir_read_plus(&self, dh: Fh, offset: u64, max: usize) -> Result<Vec<(DirEntry, Attr)>> {
        let dir_ino = self
            .dirs
            .read()
            .get(&dh)
            .map(|h| h.lock().ino)
            .ok_or(BackendError::Stale(dh))?;
        let entries = self.dir_read(dh, offset, max)?;
        let pfd = self.fd(dir_ino)?;
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let b = e.name.as_bytes();
            if b == b"." || b == b".." {
                let attr = if b == b"." {
                    self.getattr(dir_ino)?
                } else {
                    // Only the name and kind of `..` matter to the kernel.
                    let mut a = self.getattr(dir_ino)?;
                    a.ino = e.ino;
                    a
                };
                out.push((e, attr));
                continue;
            }
            match self.pin_child(pfd.as_raw_fd(), &e.name) {
                Ok(attr) => out.push((
                    DirEntry {
                        ino: attr.ino,
                        kind: attr.kind,
                        ..e
                    },
                    attr,
                )),
                // Removed since the listing, or a hidden mount point: skip.
                Err(BackendError::NotFound | BackendError::CrossDevice) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(out)
    }
}
