//! The set-ID rules a local filesystem applies and FUSE leaves to the
//! server: S_ISGID cleared by a write, truncation, fallocate or chown by a
//! caller outside the file's group without CAP_FSETID, and by an access
//! ACL set by such a caller. The backend acts as the daemon (root), so the
//! rule is applied here for the caller, after the backend's change and
//! before the reply.

use std::ffi::OsStr;
use std::time::Duration;

use super::{EfuseFs, FsResult};
use crate::backend::{Attr, Caller, Fh, FileKind, SetAttr};

impl EfuseFs {
    /// SETATTR from the kernel on behalf of `who`: [`Self::setattr`], and
    /// a truncation or owner change by anyone but root clears S_ISGID where
    /// the kernel leaves that to the server ([`Self::drop_sgid`]); the
    /// attributes returned are those after both.
    pub fn setattr_by(
        &self,
        ino: u64,
        fh: Option<Fh>,
        set: &SetAttr,
        who: Caller,
    ) -> FsResult<(Attr, Duration)> {
        let a = self.setattr(ino, fh, set)?;
        if who.uid != 0
            && (set.size.is_some() || set.uid.is_some() || set.gid.is_some())
            && set.mode.is_none()
            && let Some(after) = self.drop_sgid(ino, who)
        {
            return Ok(after);
        }
        Ok(a)
    }

    /// After a write, truncate, fallocate or chown by `who`: clear the
    /// set-group-ID bit where Linux would and FUSE does not.
    ///
    /// The kernel kills S_ISUID, and S_ISGID of a group-executable file,
    /// itself (a SETATTR of the mode) when the caller lacks CAP_FSETID. Its
    /// FUSE emulation of that rule predates the VFS's current one, which
    /// also clears S_ISGID of a file that is not group-executable when the
    /// caller is not in the file's group (setattr_should_drop_sgid): that
    /// case is left to the server. Only callers other than root can hit it,
    /// so root's requests cost nothing here.
    /// Returns the attributes after the change, if it made one.
    pub fn drop_sgid(&self, ino: u64, who: Caller) -> Option<(Attr, Duration)> {
        let perm = self.sgid_at_risk(ino, who)?;
        self.clear_sgid(ino, perm)
    }

    /// Set `ino`'s permission bits to `perm` without S_ISGID, and drop the
    /// mode the kernel caches (a write or an ACL change invalidates only
    /// what it knows it changed).
    pub(super) fn clear_sgid(&self, ino: u64, perm: u16) -> Option<(Attr, Duration)> {
        let set = SetAttr {
            mode: Some((perm & !(libc::S_ISGID as u16)) as u32),
            ..Default::default()
        };
        let a = self.setattr(ino, None, &set).ok()?;
        if let Some(n) = self.notifier() {
            n.inval_inode(ino);
        }
        Some(a)
    }

    /// After `who` set the access ACL of `ino`: clear S_ISGID unless `who`
    /// is in the inode's group or has CAP_FSETID (any file type), as
    /// posix_acl_update_mode() does for a local filesystem.
    pub fn acl_kill_sgid(&self, ino: u64, who: Caller) {
        if who.uid == 0 {
            return;
        }
        let Ok(a) = self.backend.getattr(self.b(ino)) else {
            return;
        };
        if a.perm & libc::S_ISGID as u16 == 0
            || crate::fs::creds::in_group_or_capable(who, a.gid, crate::fs::creds::CAP_FSETID)
        {
            return;
        }
        self.clear_sgid(ino, a.perm);
    }

    /// WRITE from the kernel on behalf of `who` through handle `fh` of
    /// `ino` ([`Self::with_io`]), as [`Self::data_changed_by`] says.
    pub fn write_by(&self, ino: u64, fh: Fh, offset: u64, data: &[u8], who: Caller) -> FsResult<u32> {
        self.data_changed_by(ino, fh, who, |f| self.write(f, offset, data))
    }

    /// FALLOCATE from the kernel on behalf of `who`, as [`Self::write_by`].
    pub fn fallocate_by(
        &self,
        ino: u64,
        fh: Fh,
        offset: u64,
        len: u64,
        mode: i32,
        who: Caller,
    ) -> FsResult<()> {
        self.data_changed_by(ino, fh, who, |f| self.fallocate(f, offset, len, mode))
    }

    /// Run `change` on the handle for I/O of `ino` (`fh`, or the inode's
    /// shared handle with zero-message opens): the cached attributes
    /// are dropped, and a change that happened clears S_ISGID as
    /// [`Self::drop_sgid`] says.
    fn data_changed_by<T>(
        &self,
        ino: u64,
        fh: Fh,
        who: Caller,
        change: impl FnMut(Fh) -> FsResult<T>,
    ) -> FsResult<T> {
        let res = self.with_io(ino, fh, change);
        self.modified(ino);
        if res.is_ok() {
            let _ = self.drop_sgid(ino, who);
        }
        res
    }

    /// SETXATTR from the kernel on behalf of `who`. Setting an access ACL
    /// clears S_ISGID unless the caller is in the file's group or has
    /// CAP_FSETID, as the kernel's posix_acl_update_mode does on a local
    /// filesystem: the backend applied it as the daemon (root), so the rule
    /// is applied for the caller here.
    pub fn setxattr_by(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32, who: Caller) -> FsResult<()> {
        self.setxattr(ino, name, value, flags)?;
        if name == "system.posix_acl_access" {
            self.acl_kill_sgid(ino, who);
        }
        Ok(())
    }

    /// The permission bits of `ino` if a write by `who` must clear its
    /// S_ISGID (see [`Self::drop_sgid`]); `None` otherwise.
    pub fn sgid_at_risk(&self, ino: u64, who: Caller) -> Option<u16> {
        if who.uid == 0 {
            return None;
        }
        let a = self.backend.getattr(self.b(ino)).ok()?;
        let sgid = libc::S_ISGID as u16;
        if a.kind != FileKind::File || a.perm & sgid == 0 || a.perm & libc::S_IXGRP as u16 != 0 {
            return None;
        }
        (!crate::fs::creds::in_group_or_capable(who, a.gid, crate::fs::creds::CAP_FSETID)).then_some(a.perm)
    }
}
