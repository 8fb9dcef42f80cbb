//! Descriptor pressure: where the backend holds a descriptor per inode
//! the kernel holds (`-o inodes=descriptors`), the kernel is asked to drop
//! unused entries before the descriptor limit is reached, and a lookup
//! that hits EMFILE asks for relief and retries. By file handle (the
//! default where the backing filesystem has them) none of this applies:
//! the budget is unlimited.

use std::time::Duration;

use super::EfuseFs;

/// Seven eighths of the descriptor limit, read once at start: the rest is
/// for handles, the control socket and lookups that arrive while the kernel
/// is still dropping entries.
pub(super) fn fd_budget() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer.
    let cur = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    };
    // Room for the daemon's own descriptors besides one per inode: BPF
    // maps and programs, the control socket and its connections, inotify,
    // /dev/fuse and its notify duplicate, logs, the pool's transient opens.
    // Under a small limit 1/8 is not enough of it.
    const RESERVE: usize = 64;
    let cur = cur as usize;
    (cur.saturating_mul(7) / 8)
        .min(cur.saturating_sub(RESERVE))
        .max(cur / 2)
}

impl EfuseFs {
    /// Descriptors are short: ask the kernel, from a thread of its own, to
    /// drop entries it caches from us down to 3/4 of the budget, so that their
    /// FORGETs free descriptors (at most every 20 ms). Never from the
    /// request's thread: the kernel may hold the directory lock the
    /// invalidation needs until this request is answered.
    pub(super) fn relieve_fd_pressure(&self, force: bool) {
        {
            let mut last = self.pressure.lock();
            if !force && last.is_some_and(|t| t.elapsed() < Duration::from_millis(20)) {
                return;
            }
            if last.is_none() {
                tracing::warn!(
                    budget = self.fd_budget,
                    "running short of file descriptors (one per inode the kernel holds); asking the \
                     kernel to drop unused cached entries. Raise LimitNOFILE / ulimit -n for large trees"
                );
            }
            *last = Some(std::time::Instant::now());
        }
        let Some(n) = self.session.get().map(|l| l.notifier.clone()) else {
            return;
        };
        let known = self.inodes.snapshot();
        // Down to three quarters of the budget, so that lookups have room
        // until the FORGETs come back.
        let take = known.len().saturating_sub(self.fd_budget / 4 * 3).max(1);
        let _ = std::thread::Builder::new()
            .name("efuse-relief".into())
            .spawn(move || {
                // One message per batch of inodes where the kernel can
                // (6.18+): it drops only dentries nobody uses, so a
                // process's working directory stays. Else one full
                // invalidation per name.
                let inos: Vec<u64> = known.iter().take(take).map(|(ino, _)| *ino).collect();
                if n.prune(&inos) {
                    return;
                }
                for (_, names) in known.into_iter().take(take) {
                    for (parent, name) in names {
                        n.drop_entry(parent, &name);
                    }
                }
            });
    }

    /// A backend call that pins a new inode; retried once after relieving
    /// descriptor pressure.
    pub(super) fn pinning<T>(&self, f: impl Fn() -> crate::backend::Result<T>) -> crate::backend::Result<T> {
        if self.inodes.len() > self.fd_budget {
            self.relieve_fd_pressure(false);
        }
        // No waiting here on failure: the kernel holds this directory's
        // lock until we answer, and the relief needs it.
        let r = f();
        if let Err(e) = &r
            && matches!(e.to_errno(), libc::EMFILE | libc::ENFILE)
        {
            self.relieve_fd_pressure(true);
        }
        r
    }
}
