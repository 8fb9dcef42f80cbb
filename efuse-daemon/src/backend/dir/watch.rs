//! The dir backend's inotify watcher: one watch per directory the kernel
//! holds, and a thread that turns events into [`ChangeEvent`]s (so the
//! kernel's caches are invalidated when the tree changes behind the mount).

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use super::{DirBackend, cstr, fstat_fd};
use crate::backend::{ChangeEvent, ChangeSink, Ino};

/// Clears the watch thread's busy flag when a batch is handled (or left).
struct IdleOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for IdleOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// inotify state: one watch per directory the kernel holds.
pub(super) struct Watcher {
    inotify: Arc<nix::sys::inotify::Inotify>,
    /// The watch thread has taken events off the queue and not yet handled
    /// them all.
    busy: Arc<std::sync::atomic::AtomicBool>,
    by_wd: HashMap<nix::sys::inotify::WatchDescriptor, Ino>,
    by_ino: HashMap<Ino, nix::sys::inotify::WatchDescriptor>,
    full_warned: bool,
}

const WATCH_MASK: nix::sys::inotify::AddWatchFlags = nix::sys::inotify::AddWatchFlags::from_bits_truncate(
    libc::IN_CREATE
        | libc::IN_DELETE
        | libc::IN_MOVED_FROM
        | libc::IN_MOVED_TO
        | libc::IN_ATTRIB
        | libc::IN_MODIFY
        | libc::IN_CLOSE_WRITE
        | libc::IN_DELETE_SELF
        | libc::IN_MOVE_SELF
        | libc::IN_ONLYDIR,
);

impl DirBackend {
    /// Is directory `dir` watched (its changes behind the mount reported)?
    pub(super) fn watching(&self, dir: Ino) -> bool {
        self.watcher
            .read()
            .as_ref()
            .is_some_and(|w| w.by_ino.contains_key(&dir))
    }

    pub(super) fn add_watch(&self, ino: Ino, fd: &OwnedFd) {
        let mut w = self.watcher.write();
        let Some(w) = w.as_mut() else { return };
        if w.by_ino.contains_key(&ino) {
            return;
        }
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        match w.inotify.add_watch(path.as_str(), WATCH_MASK) {
            Ok(wd) => {
                tracing::trace!(ino, ?wd, "inotify watch added");
                w.by_wd.insert(wd, ino);
                w.by_ino.insert(ino, wd);
            }
            Err(e) => {
                if !w.full_warned {
                    w.full_warned = true;
                    tracing::warn!(
                        "inotify watch failed ({e}); changes behind the mount in further directories \
                         are seen only after the cache TTL (raise fs.inotify.max_user_watches)"
                    );
                }
            }
        }
    }

    pub(super) fn remove_watch(&self, ino: Ino) {
        let mut w = self.watcher.write();
        if let Some(w) = w.as_mut()
            && let Some(wd) = w.by_ino.remove(&ino)
        {
            w.by_wd.remove(&wd);
            let _ = w.inotify.rm_watch(wd);
        }
    }

    pub(super) fn watch_pending(&self) -> bool {
        let w = self.watcher.read();
        let Some(w) = w.as_ref() else { return false };
        if w.busy.load(std::sync::atomic::Ordering::SeqCst) {
            return true;
        }
        let mut queued: libc::c_int = 0;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(&*w.inotify));
        // SAFETY: FIONREAD writes one int.
        let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut queued) };
        rc == 0 && queued > 0
    }

    pub(super) fn watch_start(&self, sink: ChangeSink) -> anyhow::Result<bool> {
        use nix::sys::inotify::{InitFlags, Inotify};
        let inotify = Arc::new(Inotify::init(InitFlags::IN_CLOEXEC)?);
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        *self.watcher.write() = Some(Watcher {
            inotify: inotify.clone(),
            busy: busy.clone(),
            by_wd: HashMap::new(),
            by_ino: HashMap::new(),
            full_warned: false,
        });
        // Watch every directory already pinned (at least the root).
        let dirs = self.nodes.open_nodes();
        for (ino, fd) in dirs {
            if fstat_fd(fd.as_raw_fd()).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR) {
                self.add_watch(ino, &fd);
            }
        }
        let me = self.self_weak.lock().clone();
        std::thread::Builder::new()
            .name("efuse-inotify".into())
            .spawn(move || {
                loop {
                    // Wait until events are queued, then say so before
                    // taking them off the queue: `changes_pending` is true
                    // from the moment an event is queued until it has been
                    // handled.
                    let mut pfd = libc::pollfd {
                        fd: std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(&*inotify)),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
                        continue;
                    }
                    busy.store(true, std::sync::atomic::Ordering::SeqCst);
                    let _idle = IdleOnDrop(&busy);
                    let events = match inotify.read_events() {
                        Ok(ev) if ev.is_empty() => continue,
                        Ok(ev) => ev,
                        Err(nix::errno::Errno::EINTR) => continue,
                        Err(e) => {
                            tracing::warn!("inotify read failed, no more change events: {e}");
                            return;
                        }
                    };
                    let Some(me) = me.as_ref().and_then(std::sync::Weak::upgrade) else {
                        tracing::debug!("backend gone; inotify thread exits");
                        return;
                    };
                    for ev in events {
                        tracing::trace!(?ev, "inotify event");
                        if ev.mask.contains(nix::sys::inotify::AddWatchFlags::IN_Q_OVERFLOW) {
                            sink(ChangeEvent::Overflow);
                            continue;
                        }
                        let dir = me
                            .watcher
                            .read()
                            .as_ref()
                            .and_then(|w| w.by_wd.get(&ev.wd).copied());
                        let Some(dir) = dir else { continue };
                        let child = ev.name.as_ref().and_then(|n| {
                            let pfd = me.fd(dir).ok()?;
                            let c = cstr(n).ok()?;
                            let mut st = MaybeUninit::<libc::stat>::uninit();
                            // SAFETY: valid dirfd, C string and out pointer.
                            let rc = unsafe {
                                libc::fstatat(
                                    pfd.as_raw_fd(),
                                    c.as_ptr(),
                                    st.as_mut_ptr(),
                                    libc::AT_SYMLINK_NOFOLLOW,
                                )
                            };
                            // SAFETY: fstatat succeeded.
                            (rc == 0).then(|| unsafe { st.assume_init() }.st_ino)
                        });
                        sink(ChangeEvent::Changed {
                            dir,
                            name: ev.name,
                            child,
                        });
                    }
                }
            })?;
        Ok(true)
    }
}
