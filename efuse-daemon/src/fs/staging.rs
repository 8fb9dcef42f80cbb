//! Local staging cache: lets passthrough serve files of a remote backend.
//!
//! Passthrough needs a local file. For a backend without one (3FS, `sim`),
//! a read-only open in the `kernel` tier copies the file into
//! `<dir>/<ino>-<mtime_ns>-<size>` and hands that copy to the kernel, so
//! every read and mmap after the open is served by the kernel from local
//! storage, with no FUSE message.
//!
//! - Correctness: the name carries the backend's mtime and size at open, so
//!   a file changed in the backend is staged again at its next open
//!   (close-to-open); a stale copy is never served to a new open.
//! - Crash safety: a copy is written to a `.tmp` name and renamed into place
//!   only once complete, so a partial copy is never served. Copies are not
//!   fsynced (that would cost a disk flush per open); instead the cache is
//!   emptied when a daemon starts, so nothing written before a crash is
//!   trusted.
//! - Size bound: least recently used copies are unlinked until the total is
//!   under the bound. An unlinked copy stays readable for opens that hold
//!   it, so eviction never disturbs a reader.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use parking_lot::Mutex;

use crate::backend::{Fh, Ino, SharedBackend};

struct Entry {
    size: u64,
    last_use: u64,
}

/// The staging cache of one mount.
pub struct Staging {
    dir: PathBuf,
    max_bytes: u64,
    max_file: u64,
    state: Mutex<(
        HashMap<PathBuf, Entry>,
        u64, /* clock */
        u64, /* total */
    )>,
    /// Numbers temporary copies, so concurrent opens never share one.
    tmp_seq: std::sync::atomic::AtomicU64,
}

fn key(ino: Ino, mtime: SystemTime, size: u64) -> String {
    let ns = mtime
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{ino}-{ns}-{size}")
}

impl Staging {
    /// Open (or create) the cache in `dir`, bounded to `max_bytes`; files
    /// larger than `max_file` are not staged.
    pub fn open(dir: &Path, max_bytes: u64, max_file: u64) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create staging dir {}", dir.display()))?;
        // Unsynced copies from an earlier life are not trusted.
        let old: Vec<PathBuf> = fs::read_dir(dir)?.flatten().map(|e| e.path()).collect();
        for p in old {
            let _ = fs::remove_file(p);
        }
        let index = HashMap::new();
        let total = 0;
        let s = Self {
            dir: dir.to_owned(),
            max_bytes,
            max_file,
            state: Mutex::new((index, 1, total)),
            tmp_seq: std::sync::atomic::AtomicU64::new(0),
        };
        s.evict();
        Ok(s)
    }

    /// Bytes held.
    pub fn used(&self) -> u64 {
        self.state.lock().2
    }

    fn touch(&self, p: &Path) -> bool {
        let mut st = self.state.lock();
        let clock = st.1;
        st.1 += 1;
        match st.0.get_mut(p) {
            Some(e) => {
                e.last_use = clock;
                true
            }
            None => false,
        }
    }

    fn evict(&self) {
        let victims: Vec<PathBuf> = {
            let mut st = self.state.lock();
            let mut v = Vec::new();
            while st.2 > self.max_bytes {
                let Some(oldest) =
                    st.0.iter()
                        .min_by_key(|(_, e)| e.last_use)
                        .map(|(p, _)| p.clone())
                else {
                    break;
                };
                let e = st.0.remove(&oldest).expect("present");
                st.2 -= e.size;
                v.push(oldest);
            }
            v
        };
        for p in victims {
            let _ = fs::remove_file(&p);
        }
    }

    /// A local copy of the file open as `fh` in `backend` (inode `ino`,
    /// `size` bytes, modified at `mtime`), staged now if needed.
    /// `None` when the file is too large to stage.
    pub fn stage(
        &self,
        backend: &SharedBackend,
        ino: Ino,
        fh: Fh,
        mtime: SystemTime,
        size: u64,
    ) -> anyhow::Result<Option<Arc<File>>> {
        if size > self.max_file || size > self.max_bytes {
            return Ok(None);
        }
        let path = self.dir.join(key(ino, mtime, size));
        // Copies run in parallel (a data loader opens many files at once);
        // two racing opens of one file may both copy it, the last rename wins.
        if self.touch(&path)
            && let Ok(f) = File::open(&path)
        {
            return Ok(Some(Arc::new(f)));
        }
        let seq = self.tmp_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("{seq}.tmp"));
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut off = 0u64;
        const CHUNK: u32 = 1 << 20;
        while off < size {
            let want = (size - off).min(CHUNK as u64) as u32;
            let data = backend.read(fh, off, want)?;
            if data.is_empty() {
                break;
            }
            out.write_all(&data)?;
            off += data.len() as u64;
        }
        if off != size {
            let _ = fs::remove_file(&tmp);
            anyhow::bail!("file changed while staging ({off} of {size} bytes)");
        }
        drop(out);
        fs::rename(&tmp, &path)?;
        {
            let mut st = self.state.lock();
            let clock = st.1;
            st.1 += 1;
            if st
                .0
                .insert(
                    path.clone(),
                    Entry {
                        size,
                        last_use: clock,
                    },
                )
                .is_none()
            {
                st.2 += size;
            }
        }
        let f = File::open(&path)?;
        self.evict();
        Ok(Some(Arc::new(f)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Caller;
    use crate::backend::mem::MemBackend;
    use std::ffi::OsStr;
    use std::io::Read;

    fn file(b: &SharedBackend, name: &str, data: &[u8]) -> (Ino, Fh, SystemTime) {
        let (a, fh) = b
            .create(Caller::default(), b.root(), OsStr::new(name), 0o644, libc::O_RDWR)
            .unwrap();
        b.write(fh, 0, data).unwrap();
        let a2 = b.getattr(a.ino).unwrap();
        (a.ino, fh, a2.mtime)
    }

    #[test]
    fn stages_once_and_serves_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let b: SharedBackend = Arc::new(MemBackend::new());
        let (ino, fh, mtime) = file(&b, "f", b"hello staging");
        let s = Staging::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        let f = s.stage(&b, ino, fh, mtime, 13).unwrap().unwrap();
        let mut got = String::new();
        (&*f).read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello staging");
        assert_eq!(s.used(), 13);
        // A second open reuses the copy.
        s.stage(&b, ino, fh, mtime, 13).unwrap().unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn lru_keeps_the_bound_and_open_copies_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let b: SharedBackend = Arc::new(MemBackend::new());
        let s = Staging::open(dir.path(), 250, 200).unwrap();
        let (i1, f1, m1) = file(&b, "a", &[1u8; 100]);
        let held = s.stage(&b, i1, f1, m1, 100).unwrap().unwrap();
        for (n, name) in ["b", "c"].iter().enumerate() {
            let (i, f, m) = file(&b, name, &[n as u8; 100]);
            s.stage(&b, i, f, m, 100).unwrap().unwrap();
        }
        assert!(s.used() <= 250);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
        // "a" was evicted but its open copy still reads.
        let mut buf = Vec::new();
        (&*held).read_to_end(&mut buf).unwrap();
        assert_eq!(buf, vec![1u8; 100]);
        // Too large to stage.
        let (i, f, m) = file(&b, "big", &[0u8; 300]);
        assert!(s.stage(&b, i, f, m, 300).unwrap().is_none());
    }

    #[test]
    fn copies_from_an_earlier_life_are_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("5-1-3.tmp"), b"par").unwrap();
        fs::write(dir.path().join("6-1-4"), b"done").unwrap();
        let s = Staging::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(s.used(), 0);
    }
}
