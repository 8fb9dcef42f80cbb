//! `sim` backend: wraps another backend and makes it behave like a remote
//! store such as 3FS, for benchmarks and fault tests.
//!
//! Every call first waits for the latency of its class (metadata, small
//! read, large read, write), varied by a uniform jitter, plus the transfer
//! time at the throughput cap. Batched calls (`batch_getattr`,
//! `readdir_plus`) pay one metadata round trip for the whole batch, which is
//! what makes batching worth it on a real cluster. Faults are injected
//! *before* the inner call, so an injected error never leaves a half-done
//! change behind, and an injected stall holds the calling thread.
//!
//! Defaults follow what 3FS users report for a cluster over RDMA: metadata
//! ops of a few hundred microseconds, small reads ~200 us, writes ~1 ms.

use std::ffi::OsStr;
use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{Attr, Backend, BackendError, Caller, DirEntry, Fh, Ino, Result, SetAttr, SharedBackend, StatFs};

/// Latency and fault settings of the `sim` backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Metadata round trip (lookup, getattr, create, readdir...), microseconds.
    pub meta_us: u64,
    /// Read of at most `small_read_max` bytes, microseconds.
    pub small_read_us: u64,
    /// Read larger than `small_read_max`, microseconds (plus transfer time).
    pub large_read_us: u64,
    /// Boundary between small and large reads, bytes.
    pub small_read_max: u32,
    /// Write, microseconds (plus transfer time).
    pub write_us: u64,
    /// Uniform jitter as a fraction of the latency (0.2 = +-20%).
    pub jitter: f64,
    /// Throughput cap in MiB/s for data transfer; 0 = unlimited.
    pub throughput_mib_s: u64,
    /// Probability that a call fails with `fault_errno`.
    pub error_rate: f64,
    /// Errno of injected failures.
    pub fault_errno: i32,
    /// Probability that a call stalls for `stall_ms` first.
    pub stall_rate: f64,
    /// Length of an injected stall, milliseconds.
    pub stall_ms: u64,
    /// Probability that a call panics (tests that no request can take the
    /// daemon down or leave its caller hanging).
    pub panic_rate: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            meta_us: 300,
            small_read_us: 200,
            large_read_us: 500,
            small_read_max: 64 * 1024,
            write_us: 1000,
            jitter: 0.2,
            throughput_mib_s: 4096,
            error_rate: 0.0,
            fault_errno: libc::EIO,
            stall_rate: 0.0,
            stall_ms: 0,
            panic_rate: 0.0,
        }
    }
}

impl SimConfig {
    /// Check the values are usable.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!((0.0..=1.0).contains(&self.jitter), "sim.jitter must be in 0..=1");
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.error_rate),
            "sim.error_rate must be in 0..=1"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.stall_rate),
            "sim.stall_rate must be in 0..=1"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.panic_rate),
            "sim.panic_rate must be in 0..=1"
        );
        anyhow::ensure!(self.fault_errno > 0, "sim.fault_errno must be a positive errno");
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Class {
    Meta,
    Read(u64),
    Write(u64),
}

/// A backend with simulated remote latency and faults.
pub struct SimBackend {
    inner: SharedBackend,
    cfg: SimConfig,
    inflight: std::sync::atomic::AtomicU64,
    max_inflight: std::sync::atomic::AtomicU64,
}

/// One call in flight; counts down when dropped.
struct InFlight<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl SimBackend {
    /// Wrap `inner`.
    pub fn new(inner: SharedBackend, cfg: SimConfig) -> Self {
        Self {
            inner,
            cfg,
            inflight: std::sync::atomic::AtomicU64::new(0),
            max_inflight: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn delay(&self, class: Class) -> Duration {
        let c = &self.cfg;
        let (base, bytes) = match class {
            Class::Meta => (c.meta_us, 0),
            Class::Read(n) if n <= c.small_read_max as u64 => (c.small_read_us, n),
            Class::Read(n) => (c.large_read_us, n),
            Class::Write(n) => (c.write_us, n),
        };
        let mut us = base as f64;
        if c.jitter > 0.0 && us > 0.0 {
            us *= 1.0 + rand::thread_rng().gen_range(-c.jitter..=c.jitter);
        }
        if c.throughput_mib_s > 0 {
            us += bytes as f64 / (c.throughput_mib_s as f64 * 1024.0 * 1024.0) * 1e6;
        }
        Duration::from_nanos((us * 1000.0) as u64)
    }

    /// Wait, then maybe fail; the inner call runs only if this returns Ok.
    /// The returned guard counts the call as in flight until dropped.
    fn enter(&self, class: Class) -> Result<InFlight<'_>> {
        use std::sync::atomic::Ordering;
        let n = self.inflight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_inflight.fetch_max(n, Ordering::Relaxed);
        let guard = InFlight(&self.inflight);
        let c = &self.cfg;
        let mut rng = rand::thread_rng();
        if c.stall_rate > 0.0 && rng.gen_bool(c.stall_rate) {
            tracing::debug!(ms = c.stall_ms, "sim: injected stall");
            std::thread::sleep(Duration::from_millis(c.stall_ms));
        }
        let d = self.delay(class);
        if !d.is_zero() {
            std::thread::sleep(d);
        }
        if c.error_rate > 0.0 && rng.gen_bool(c.error_rate) {
            return Err(BackendError::Injected(c.fault_errno));
        }
        if c.panic_rate > 0.0 && rng.gen_bool(c.panic_rate) {
            panic!("sim: injected panic");
        }
        Ok(guard)
    }
}

impl Backend for SimBackend {
    fn changes_pending(&self) -> bool {
        self.inner.changes_pending()
    }
    fn kind(&self) -> String {
        format!("sim+{}", self.inner.kind())
    }
    fn inode_mode(&self) -> Option<super::dir::nodes::InodeMode> {
        self.inner.inode_mode()
    }
    fn node_stats(&self) -> Option<super::NodeStats> {
        self.inner.node_stats()
    }
    fn root(&self) -> Ino {
        self.inner.root()
    }
    fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr> {
        let _call = self.enter(Class::Meta)?;
        self.inner.lookup(parent, name)
    }
    fn forget(&self, ino: Ino, n: u64) {
        // Local bookkeeping only: no round trip, never fails.
        self.inner.forget(ino, n)
    }
    fn pin(&self, ino: Ino) -> Result<()> {
        // A client keeps its inode handles locally: no round trip.
        self.inner.pin(ino)
    }
    fn posix_acl(&self) -> bool {
        self.inner.posix_acl()
    }

    fn identity(&self, ino: Ino) -> Option<Vec<u8>> {
        self.inner.identity(ino)
    }

    fn reopen(&self, ino: Ino, identity: Option<&[u8]>) -> Result<Attr> {
        self.inner.reopen(ino, identity)
    }

    fn parent(&self, dir: Ino) -> Result<Attr> {
        self.inner.parent(dir)
    }

    fn is_remote(&self) -> bool {
        true
    }
    fn max_concurrency(&self) -> Option<u64> {
        Some(self.max_inflight.load(std::sync::atomic::Ordering::Relaxed))
    }
    fn getattr(&self, ino: Ino) -> Result<Attr> {
        let _call = self.enter(Class::Meta)?;
        self.inner.getattr(ino)
    }
    fn batch_getattr(&self, inos: &[Ino]) -> Vec<Result<Attr>> {
        let _call = match self.enter(Class::Meta) {
            Ok(c) => c,
            Err(e) => {
                let errno = e.to_errno();
                return inos.iter().map(|_| Err(BackendError::Injected(errno))).collect();
            }
        };
        inos.iter().map(|&i| self.inner.getattr(i)).collect()
    }
    fn setattr(&self, ino: Ino, fh: Option<Fh>, set: &SetAttr) -> Result<Attr> {
        let _call = self.enter(Class::Meta)?;
        self.inner.setattr(ino, fh, set)
    }
    fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let _call = self.enter(Class::Meta)?;
        self.inner.readlink(ino)
    }
    fn mknod(&self, who: Caller, parent: Ino, name: &OsStr, mode: u32, rdev: u32) -> Result<Attr> {
        let _call = self.enter(Class::Meta)?;
        self.inner.mknod(who, parent, name, mode, rdev)
    }
    fn mkdir(&self, who: Caller, parent: Ino, name: &OsStr, mode: u32) -> Result<Attr> {
        let _call = self.enter(Class::Meta)?;
        self.inner.mkdir(who, parent, name, mode)
    }
    fn symlink(&self, who: Caller, parent: Ino, name: &OsStr, target: &OsStr) -> Result<Attr> {
        let _call = self.enter(Class::Meta)?;
        self.inner.symlink(who, parent, name, target)
    }
    fn link(&self, ino: Ino, newparent: Ino, newname: &OsStr) -> Result<Attr> {
        let _call = self.enter(Class::Meta)?;
        self.inner.link(ino, newparent, newname)
    }
    fn unlink(&self, parent: Ino, name: &OsStr) -> Result<()> {
        let _call = self.enter(Class::Meta)?;
        self.inner.unlink(parent, name)
    }
    fn rmdir(&self, parent: Ino, name: &OsStr) -> Result<()> {
        let _call = self.enter(Class::Meta)?;
        self.inner.rmdir(parent, name)
    }
    fn rename(&self, p: Ino, n: &OsStr, np: Ino, nn: &OsStr, flags: u32) -> Result<()> {
        let _call = self.enter(Class::Meta)?;
        self.inner.rename(p, n, np, nn, flags)
    }
    fn open(&self, ino: Ino, flags: i32) -> Result<Fh> {
        let _call = self.enter(Class::Meta)?;
        self.inner.open(ino, flags)
    }
    fn create(&self, who: Caller, p: Ino, n: &OsStr, mode: u32, flags: i32) -> Result<(Attr, Fh)> {
        let _call = self.enter(Class::Meta)?;
        self.inner.create(who, p, n, mode, flags)
    }
    fn read(&self, fh: Fh, offset: u64, size: u32) -> Result<Vec<u8>> {
        let _call = self.enter(Class::Read(size as u64))?;
        self.inner.read(fh, offset, size)
    }
    fn write(&self, fh: Fh, offset: u64, data: &[u8]) -> Result<u32> {
        let _call = self.enter(Class::Write(data.len() as u64))?;
        self.inner.write(fh, offset, data)
    }
    fn flush(&self, fh: Fh) -> Result<()> {
        let _call = self.enter(Class::Meta)?;
        self.inner.flush(fh)
    }
    fn fsync(&self, fh: Fh, datasync: bool) -> Result<()> {
        let _call = self.enter(Class::Write(0))?;
        self.inner.fsync(fh, datasync)
    }
    fn release(&self, fh: Fh) {
        self.inner.release(fh)
    }
    fn opendir(&self, ino: Ino) -> Result<Fh> {
        let _call = self.enter(Class::Meta)?;
        self.inner.opendir(ino)
    }
    fn readdir(&self, dh: Fh, offset: u64, max: usize) -> Result<Vec<DirEntry>> {
        let _call = self.enter(Class::Meta)?;
        self.inner.readdir(dh, offset, max)
    }
    fn readdir_plus(&self, dh: Fh, offset: u64, max: usize) -> Result<Vec<(DirEntry, Attr)>> {
        let _call = self.enter(Class::Meta)?;
        self.inner.readdir_plus(dh, offset, max)
    }
    fn releasedir(&self, dh: Fh) {
        self.inner.releasedir(dh)
    }
    fn list_plus(&self, dir: Ino, max: usize) -> Result<(Vec<(DirEntry, Attr)>, bool)> {
        // One listing RPC, like a remote metadata service's "list with attrs".
        let _call = self.enter(Class::Meta)?;
        self.inner.list_plus(dir, max)
    }
    fn open_attr(&self, ino: Ino, flags: i32) -> Result<(Fh, Attr)> {
        let _call = self.enter(Class::Meta)?;
        self.inner.open_attr(ino, flags)
    }
    fn statfs(&self) -> Result<StatFs> {
        let _call = self.enter(Class::Meta)?;
        self.inner.statfs()
    }
    /// 3FS keeps no extended attributes: `-o xattr=auto` answers none
    /// (`-o xattr=on` still passes them to the inner backend).
    fn xattrs(&self) -> bool {
        false
    }
    fn getxattr(&self, ino: Ino, name: &OsStr) -> Result<Vec<u8>> {
        let _call = self.enter(Class::Meta)?;
        self.inner.getxattr(ino, name)
    }
    fn setxattr(&self, ino: Ino, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        let _call = self.enter(Class::Meta)?;
        self.inner.setxattr(ino, name, value, flags)
    }
    fn listxattr(&self, ino: Ino) -> Result<Vec<u8>> {
        let _call = self.enter(Class::Meta)?;
        self.inner.listxattr(ino)
    }
    fn removexattr(&self, ino: Ino, name: &OsStr) -> Result<()> {
        let _call = self.enter(Class::Meta)?;
        self.inner.removexattr(ino, name)
    }
    fn fallocate(&self, fh: Fh, offset: u64, len: u64, mode: i32) -> Result<()> {
        let _call = self.enter(Class::Meta)?;
        self.inner.fallocate(fh, offset, len, mode)
    }
    fn lseek(&self, fh: Fh, offset: i64, whence: i32) -> Result<i64> {
        let _call = self.enter(Class::Meta)?;
        self.inner.lseek(fh, offset, whence)
    }
    fn copy_file_range(&self, a: Fh, oa: u64, b: Fh, ob: u64, len: u64) -> Result<u64> {
        let _call = self.enter(Class::Write(len))?;
        self.inner.copy_file_range(a, oa, b, ob, len)
    }
    fn backing_file(&self, _fh: Fh) -> Option<Arc<File>> {
        // A remote store has no local file to pass through to.
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::mem::MemBackend;
    use std::time::Instant;

    fn sim(cfg: SimConfig) -> SimBackend {
        SimBackend::new(Arc::new(MemBackend::new()), cfg)
    }

    #[test]
    fn metadata_calls_pay_the_configured_latency() {
        let b = sim(SimConfig {
            meta_us: 2000,
            jitter: 0.0,
            ..Default::default()
        });
        let t = Instant::now();
        for _ in 0..5 {
            b.getattr(b.root()).unwrap();
        }
        assert!(t.elapsed() >= Duration::from_millis(10), "{:?}", t.elapsed());
    }

    #[test]
    fn injected_errors_change_nothing() {
        let b = sim(SimConfig {
            meta_us: 0,
            error_rate: 1.0,
            fault_errno: libc::EIO,
            ..Default::default()
        });
        let e = b
            .mkdir(Caller::default(), b.root(), OsStr::new("d"), 0o755)
            .unwrap_err();
        assert_eq!(e.to_errno(), libc::EIO);
        // The inner tree is untouched.
        assert!(b.inner.lookup(b.root(), OsStr::new("d")).is_err());
    }

    #[test]
    fn bad_config_is_refused() {
        assert!(
            SimConfig {
                jitter: 2.0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(SimConfig::default().validate().is_ok());
    }
}
