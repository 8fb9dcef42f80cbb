//! Daemon-side metadata cache with batched directory prefetch.
//!
//! For backends where a metadata round trip is expensive (3FS, `sim`), the
//! first lookup miss in a directory fetches the whole directory with
//! attributes in one batch (`readdir_plus`), and later lookups in it are
//! answered from memory, including "no such name" when the listing is
//! complete. The kernel caches answers itself in the `kernel` tier; this
//! cache saves the round trips for the names the kernel has not asked
//! about yet (data loaders opening thousands of files in one directory).
//!
//! Invariants:
//! - every cached entry holds exactly one backend pin (taken by
//!   `readdir_plus`), given back when the listing is dropped;
//! - a hit takes one more pin (`Backend::pin`, no round trip) for the
//!   lookup count the kernel is about to hold;
//! - a listing is dropped when it is older than its TTL, when anything in
//!   the directory changes through the mount, and when the backend reports
//!   a change in it. The TTL bounds staleness for changes by other clients.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::backend::{Attr, BackendError, Ino, SharedBackend};

struct Listing {
    fetched: Instant,
    complete: bool,
    entries: HashMap<OsString, Attr>,
}

/// Counters of the cache.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from a listing.
    pub hits: u64,
    /// Lookups that went to the backend.
    pub misses: u64,
    /// Directories fetched in one batch.
    pub prefetches: u64,
    /// Entries fetched by prefetches.
    pub prefetched_entries: u64,
}

/// The cache. See the module docs.
pub struct MetaCache {
    backend: SharedBackend,
    ttl: Duration,
    max_entries: usize,
    dirs: Mutex<HashMap<Ino, Listing>>,
    hits: AtomicU64,
    misses: AtomicU64,
    prefetches: AtomicU64,
    prefetched: AtomicU64,
}

/// Answer of the cache to a lookup.
#[derive(Debug)]
pub enum Cached {
    /// The entry, pinned once more for the caller, and the age of the data.
    Found(Attr, Duration),
    /// The complete listing has no such name; the age of the listing.
    Missing(Duration),
    /// The cache cannot answer.
    Unknown,
}

impl MetaCache {
    /// A cache over `backend` keeping listings for `ttl`, fetching at most
    /// `max_entries` entries of one directory.
    pub fn new(backend: SharedBackend, ttl: Duration, max_entries: usize) -> Self {
        Self {
            backend,
            ttl,
            max_entries,
            dirs: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            prefetches: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
        }
    }

    /// Counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            prefetches: self.prefetches.load(Ordering::Relaxed),
            prefetched_entries: self.prefetched.load(Ordering::Relaxed),
        }
    }

    fn release(&self, l: Listing) {
        for a in l.entries.values() {
            self.backend.forget(a.ino, 1);
        }
    }

    /// Answer from a fresh listing of `dir`, if there is one.
    fn answer(&self, dir: Ino, name: &OsStr) -> Option<Cached> {
        let mut dirs = self.dirs.lock();
        let fresh = dirs.get(&dir).map(|l| l.fetched.elapsed() < self.ttl)?;
        if !fresh {
            let old = dirs.remove(&dir).expect("present");
            drop(dirs);
            self.release(old);
            return None;
        }
        let l = dirs.get(&dir).expect("present");
        Some(match l.entries.get(name) {
            Some(a) => match self.backend.pin(a.ino) {
                Ok(()) => Cached::Found(*a, l.fetched.elapsed()),
                Err(_) => Cached::Unknown,
            },
            None if l.complete => Cached::Missing(l.fetched.elapsed()),
            None => Cached::Unknown,
        })
    }

    /// Look `name` up in `dir`: from a listing, else by fetching the
    /// directory in one batch first.
    pub fn lookup(&self, dir: Ino, name: &OsStr) -> Cached {
        if let Some(c) = self.answer(dir, name) {
            if !matches!(c, Cached::Unknown) {
                self.hits.fetch_add(1, Ordering::Relaxed);
            }
            return c;
        }
        if let Err(e) = self.prefetch(dir) {
            tracing::debug!(dir, "prefetch failed: {e}");
            self.misses.fetch_add(1, Ordering::Relaxed);
            return Cached::Unknown;
        }
        match self.answer(dir, name) {
            Some(c @ (Cached::Found(..) | Cached::Missing(_))) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                c
            }
            _ => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                Cached::Unknown
            }
        }
    }

    /// Fetch `dir` with attributes in one batch, up to `max_entries`.
    fn prefetch(&self, dir: Ino) -> Result<(), BackendError> {
        let (list, complete) = self.backend.list_plus(dir, self.max_entries)?;
        let mut entries = HashMap::new();
        for (e, a) in list {
            if e.name == "." || e.name == ".." {
                continue;
            }
            if let Some(old) = entries.insert(e.name, a) {
                self.backend.forget(old.ino, 1);
            }
        }
        self.prefetches.fetch_add(1, Ordering::Relaxed);
        self.prefetched.fetch_add(entries.len() as u64, Ordering::Relaxed);
        let l = Listing {
            fetched: Instant::now(),
            complete,
            entries,
        };
        if let Some(old) = self.dirs.lock().insert(dir, l) {
            self.release(old);
        }
        Ok(())
    }

    /// Drop the listing of `dir` (something in it changed).
    pub fn invalidate(&self, dir: Ino) {
        let old = self.dirs.lock().remove(&dir);
        if let Some(old) = old {
            self.release(old);
        }
    }

    /// Drop the listings that hold `ino` (its attributes changed).
    pub fn invalidate_holding(&self, ino: Ino) {
        let stale: Vec<Listing> = {
            let mut dirs = self.dirs.lock();
            let keys: Vec<Ino> = dirs
                .iter()
                .filter(|(_, l)| l.entries.values().any(|a| a.ino == ino))
                .map(|(k, _)| *k)
                .collect();
            keys.iter().filter_map(|k| dirs.remove(k)).collect()
        };
        for l in stale {
            self.release(l);
        }
    }

    /// Drop every listing.
    pub fn clear(&self) {
        let all: Vec<Listing> = self.dirs.lock().drain().map(|(_, l)| l).collect();
        for l in all {
            self.release(l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Caller;
    use crate::backend::mem::MemBackend;
    use crate::backend::sim::{SimBackend, SimConfig};
    use std::sync::Arc;

    fn setup(n: usize) -> (SharedBackend, Ino) {
        let b: SharedBackend = Arc::new(MemBackend::new());
        let d = b
            .mkdir(Caller::default(), b.root(), OsStr::new("d"), 0o755)
            .unwrap();
        for i in 0..n {
            let (a, fh) = b
                .create(Caller::default(), d.ino, OsStr::new(&format!("f{i}")), 0o644, 0)
                .unwrap();
            b.release(fh);
            b.forget(a.ino, 1);
        }
        (b, d.ino)
    }

    #[test]
    fn first_miss_prefetches_then_hits_and_negatives() {
        let (b, d) = setup(50);
        let c = MetaCache::new(b.clone(), Duration::from_secs(60), 4096);
        let Cached::Found(a, _) = c.lookup(d, OsStr::new("f1")) else {
            panic!()
        };
        assert!(matches!(c.lookup(d, OsStr::new("f2")), Cached::Found(..)));
        assert!(matches!(c.lookup(d, OsStr::new("nope")), Cached::Missing(_)));
        let s = c.stats();
        assert_eq!(
            (s.prefetches, s.prefetched_entries, s.hits, s.misses),
            (1, 50, 2, 1)
        );
        // The hit took its own pin: dropping the listing leaves f1 alive.
        c.clear();
        assert!(b.getattr(a.ino).is_ok());
        b.forget(a.ino, 1);
    }

    #[test]
    fn stale_and_invalidated_listings_are_refetched() {
        let (b, d) = setup(3);
        let c = MetaCache::new(b.clone(), Duration::from_millis(50), 4096);
        assert!(matches!(c.lookup(d, OsStr::new("new")), Cached::Missing(_)));
        b.create(Caller::default(), d, OsStr::new("new"), 0o644, 0)
            .unwrap();
        c.invalidate(d);
        assert!(matches!(c.lookup(d, OsStr::new("new")), Cached::Found(..)));
        std::thread::sleep(Duration::from_millis(60));
        assert!(matches!(c.lookup(d, OsStr::new("f0")), Cached::Found(..)));
        assert_eq!(c.stats().prefetches, 3);
    }

    #[test]
    fn partial_listing_cannot_answer_negatives() {
        let (b, d) = setup(20);
        let c = MetaCache::new(b, Duration::from_secs(60), 5);
        assert!(matches!(c.lookup(d, OsStr::new("zzz")), Cached::Unknown));
    }

    #[test]
    fn prefetch_costs_one_batch_on_a_remote_backend() {
        let (inner, d) = setup(100);
        let sim: SharedBackend = Arc::new(SimBackend::new(
            inner,
            SimConfig {
                meta_us: 2000,
                jitter: 0.0,
                ..Default::default()
            },
        ));
        let c = MetaCache::new(sim, Duration::from_secs(60), 4096);
        let t = Instant::now();
        for i in 0..100 {
            assert!(matches!(
                c.lookup(d, OsStr::new(&format!("f{i}"))),
                Cached::Found(..)
            ));
        }
        // One listing round trip, not 100 lookups of 2 ms.
        assert!(t.elapsed() < Duration::from_millis(40), "{:?}", t.elapsed());
    }
}
