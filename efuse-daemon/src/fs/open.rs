//! Open policy: how the kernel is to open a file. Passthrough to a backing
//! id where wanted, granted and consistent with the inode's other opens,
//! else a cached open; no open at all with zero-message opens; and the
//! rules FUSE leaves to the server (a writer that must clear S_ISGID,
//! readers of a staged copy). The dispatcher only encodes the answer.

use std::sync::Arc;

use super::{EfuseFs, FsError, FsResult, MAX_INODE_HANDLES, OpenFlags, Opened};
use crate::backend::{Attr, BackendError, Caller, Fh, FileKind};
use crate::transport::abi::fopen;

/// An open as the kernel is to see it: the fields of `fuse_open_out`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOpen {
    /// Handle the kernel passes back (0: none, zero-message opens).
    pub fh: u64,
    /// FOPEN_* flags.
    pub flags: u32,
    /// Passthrough backing id (0: none).
    pub backing_id: u32,
}

/// FOPEN_* flags of an open's own wishes (before passthrough is decided).
pub fn fopen_flags(o: &Opened) -> u32 {
    let mut f = 0;
    if o.flags.keep_cache {
        f |= fopen::KEEP_CACHE;
    }
    if o.flags.cache_dir {
        f |= fopen::CACHE_DIR;
    }
    if o.flags.noflush {
        f |= fopen::NOFLUSH;
    }
    f
}

impl EfuseFs {
    /// Zero-message opens are in effect: the kernel got ENOSYS for OPEN
    /// and sends neither OPEN nor RELEASE for files any more.
    pub fn zero_open(&self) -> bool {
        self.kernel_cfg().zero_open && self.tier() != crate::config::Offload::Off
    }

    /// OPEN of `ino` with open(2) `flags` by `who`.
    pub fn open_for_kernel(&self, ino: u64, flags: i32, who: Caller) -> FsResult<KernelOpen> {
        if self.zero_open() {
            // ENOSYS makes the kernel stop sending OPEN (and RELEASE) for
            // files on this connection: opens cost no message at all.
            return Err(FsError::Errno(libc::ENOSYS));
        }
        let mut o = self.open(ino, flags)?;
        // Writes to a file whose S_ISGID this caller's first write must
        // clear go through the daemon, which clears it (passthrough writes
        // would keep it).
        let at_risk = o.writable && self.sgid_at_risk(ino, who).is_some();
        if at_risk {
            o.flags.passthrough = false;
        }
        let (k, sgid_now) = self.kernel_open_locked(ino, o)?;
        // Should the inode have to stay in passthrough (other opens use
        // it), no write of this open reaches the daemon: clear the bit now.
        // Outside the passthrough lock: this takes the mirror's (the bpf
        // tier takes that one first, then this).
        if sgid_now && at_risk {
            let _ = self.drop_sgid(ino, who);
        }
        Ok(k)
    }

    /// The open part of CREATE or TMPFILE of `ino`.
    pub fn created_for_kernel(&self, ino: u64, mut o: Opened) -> KernelOpen {
        if self.zero_open() {
            // Zero-message opens: once OPEN got ENOSYS the kernel sends no
            // RELEASE for any file of the connection, created ones
            // included, so a handle given here would never be closed (one
            // descriptor leaked per create). The file's I/O uses the
            // inode's shared handle, as every other open's does.
            self.release(o.fh);
            o.fh = 0;
        } else if let Some(pt) = self.passthrough() {
            pt.state().add_cached(o.fh, ino);
        }
        KernelOpen {
            fh: o.fh,
            flags: fopen_flags(&o),
            backing_id: 0,
        }
    }

    /// RELEASE of a file handle the kernel had: its backing id (if any)
    /// first, then the backend's handle. Handle 0 is a zero-message open's
    /// (the inode's shared handle, closed with the inode).
    pub fn released_by_kernel(&self, fh: u64) {
        if fh == 0 {
            return;
        }
        if let Some(pt) = self.passthrough() {
            pt.released(fh);
        }
        self.release(fh);
    }

    /// The open `o` of `ino` as the kernel is to see it, under the
    /// passthrough lock; also true if it got a live backing id (so a
    /// writer's S_ISGID must be cleared now).
    fn kernel_open_locked(&self, ino: u64, o: Opened) -> FsResult<(KernelOpen, bool)> {
        let Some(pt) = self.passthrough() else {
            // No session (tests of the filesystem alone): a cached open.
            return Ok((
                KernelOpen {
                    fh: o.fh,
                    flags: fopen_flags(&o),
                    backing_id: 0,
                },
                false,
            ));
        };
        let mut b = pt.state();
        let live_staged = b
            .by_ino
            .get(&ino)
            .is_some_and(|(w, staged)| *staged && w.strong_count() > 0);
        if live_staged && o.writable {
            // Readers are served from a read-only local copy; the kernel
            // cannot mix their passthrough with a writer's open.
            drop(b);
            self.release(o.fh);
            return Err(FsError::Errno(libc::ETXTBSY));
        }
        let live = b.live(ino);
        let has_cached = b.has_cached(ino);
        let want = live.is_some() || (o.flags.passthrough && !has_cached && pt.granted());
        let sgid_now = live.is_some();
        // An inode with a live passthrough open must get passthrough for
        // every open (the kernel fails a cached open of it with EIO), also
        // for an open that asked for none (the off tier, after a switch):
        // the live backing id serves it; a backing file is needed only to
        // register a new one.
        let id = match (want, live, o.backing.as_ref()) {
            (true, Some(id), _) => Some(Ok(id)),
            (true, None, Some(file)) => Some(pt.register(file)),
            _ => None,
        };
        match id {
            Some(Ok(id)) => {
                let staged = o.staged || live_staged;
                b.by_ino.insert(ino, (Arc::downgrade(&id), staged));
                b.by_fh.insert(o.fh, (ino, id.clone()));
                let flags = (fopen_flags(&o) & !fopen::KEEP_CACHE) | fopen::PASSTHROUGH;
                return Ok((
                    KernelOpen {
                        fh: o.fh,
                        flags,
                        backing_id: id.id,
                    },
                    sgid_now,
                ));
            }
            Some(Err(e)) if pt.granted() => {
                pt.set_granted(false);
                tracing::warn!(
                    "FUSE passthrough refused by the kernel ({e}); reads use the page cache \
                     (FOPEN_KEEP_CACHE) from now on"
                );
            }
            _ => {}
        }
        b.add_cached(o.fh, ino);
        Ok((
            KernelOpen {
                fh: o.fh,
                flags: fopen_flags(&o),
                backing_id: 0,
            },
            sgid_now,
        ))
    }
}

impl EfuseFs {
    /// Open a file.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<Opened> {
        // Passthrough reads change the atime without the daemon: the bpf
        // tier's attributes keep the old one up to their TTL (SEMANTICS.md).
        let offer = self.offer();
        let p = self.policy();
        let read_only = flags & libc::O_ACCMODE == libc::O_RDONLY;

        let stage = p.passthrough && read_only && self.staging.is_some();
        // Staging keys copies by the attributes at open: get them with the open.
        let (fh, attr) = if stage {
            let (fh, a) = self.backend.open_attr(self.b(ino), flags)?;
            (fh, Some(a))
        } else {
            (self.backend.open(self.b(ino), flags)?, None)
        };
        // Before the reply: nothing stale is answered once the open (and
        // its truncation) returns.
        if !read_only {
            self.writer_opened(fh, ino);
        } else if flags & libc::O_TRUNC != 0 {
            self.bpf_changed(&[], &[ino]);
        } else if let Some(o) = &offer {
            // An open that could have been answered in the kernel: its
            // answer had expired (or was never made); offer it again.
            self.offer_extras(o, o.tier.renew(ino, p.attr_ttl, true));
        }
        let mut staged = false;
        let backing = match (p.passthrough, self.backend.backing_file(fh), attr) {
            (false, _, _) => None,
            (true, Some(f), _) => Some(f),
            (true, None, Some(a)) => {
                let f = self.staged_copy(fh, &a);
                staged = f.is_some();
                f
            }
            (true, None, None) => None,
        };
        Ok(Opened {
            fh,
            flags: OpenFlags {
                keep_cache: p.keep_cache,
                cache_dir: false,
                // Nothing to flush from a read-only open in the kernel tier.
                noflush: p.keep_cache && read_only,
                passthrough: p.passthrough,
            },
            backing,
            staged,
            writable: !read_only,
        })
    }

    /// Run `f` with the handle for I/O: the open's own, or with
    /// zero-message opens (`fh == 0`) the inode's shared handle, opened on
    /// first use. Shared handles are bounded (least recently used closed);
    /// one closed under a concurrent call is reopened and the call retried.
    pub fn with_io<T>(&self, ino: u64, fh: Fh, mut f: impl FnMut(Fh) -> FsResult<T>) -> FsResult<T> {
        if fh != 0 {
            return f(fh);
        }
        let h = self.inode_handle(ino)?;
        match f(h) {
            Err(FsError::Backend(BackendError::Stale(_))) => {
                let mut handles = self.inode_handles.lock();
                if handles.get(&ino).is_some_and(|(x, _)| *x == h) {
                    handles.remove(&ino);
                }
                drop(handles);
                f(self.inode_handle(ino)?)
            }
            r => r,
        }
    }

    fn inode_handle(&self, ino: u64) -> FsResult<Fh> {
        use std::sync::atomic::Ordering;
        let now = self.handle_clock.fetch_add(1, Ordering::Relaxed);
        let mut handles = self.inode_handles.lock();
        if let Some((h, used)) = handles.get_mut(&ino) {
            *used = now;
            return Ok(*h);
        }
        let b = self.b(ino);
        let h = match self.backend.open(b, libc::O_RDWR) {
            Ok(h) => h,
            // Read-only file or backend: reads still work.
            Err(_) => self.backend.open(b, libc::O_RDONLY)?,
        };
        handles.insert(ino, (h, now));
        if handles.len() > MAX_INODE_HANDLES
            && let Some((&old, &(oh, _))) = handles.iter().min_by_key(|(_, (_, used))| *used)
        {
            handles.remove(&old);
            self.backend.release(oh);
        }
        Ok(h)
    }

    /// A staged local copy of `ino` (`a`) open as `fh`, if staging applies.
    fn staged_copy(&self, fh: Fh, a: &Attr) -> Option<Arc<std::fs::File>> {
        let s = self.staging.as_ref()?;
        if a.kind != FileKind::File {
            return None;
        }
        match s.stage(&self.backend, a.ino, fh, a.mtime, a.size) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(ino = a.ino, "staging failed, reading through the daemon: {e:#}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;
    use crate::backend::mem::MemBackend;
    use crate::config::{KernelTierConfig, Offload};

    fn fs(tier: Offload, zero_open: bool) -> EfuseFs {
        EfuseFs::new(
            Arc::new(MemBackend::new()),
            tier,
            KernelTierConfig {
                zero_open,
                passthrough: !zero_open,
                ..Default::default()
            },
        )
    }

    #[test]
    fn zero_message_opens_refuse_open_and_keep_no_handle_of_a_create() {
        let f = fs(Offload::Kernel, true);
        let (e, o) = f
            .create(Caller::default(), 1, OsStr::new("f"), 0o644, libc::O_RDWR)
            .unwrap();
        // No RELEASE will come for a created file: no handle is kept.
        let k = f.created_for_kernel(e.attr.ino, o);
        assert_eq!((k.fh, k.backing_id), (0, 0));
        let err = f
            .open_for_kernel(e.attr.ino, libc::O_RDONLY, Caller::default())
            .unwrap_err();
        assert_eq!(err.to_errno(), libc::ENOSYS);
        // The off tier has no zero-message opens.
        let off = fs(Offload::Off, true);
        let (e, o) = off
            .create(Caller::default(), 1, OsStr::new("g"), 0o644, libc::O_RDWR)
            .unwrap();
        assert_ne!(off.created_for_kernel(e.attr.ino, o).fh, 0);
        let k = off
            .open_for_kernel(e.attr.ino, libc::O_RDONLY, Caller::default())
            .unwrap();
        assert_ne!(k.fh, 0);
        off.release(k.fh);
    }

    #[test]
    fn without_a_session_an_open_is_cached() {
        let f = fs(Offload::Kernel, false);
        let (e, o) = f
            .create(Caller::default(), 1, OsStr::new("f"), 0o644, libc::O_RDWR)
            .unwrap();
        f.release(f.created_for_kernel(e.attr.ino, o).fh);
        let k = f
            .open_for_kernel(e.attr.ino, libc::O_RDONLY, Caller::default())
            .unwrap();
        assert_eq!(k.backing_id, 0);
        assert_eq!(k.flags & fopen::PASSTHROUGH, 0);
        f.release(k.fh);
    }
}
