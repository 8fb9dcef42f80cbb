//! Export handles across daemon restarts.
//!
//! An export handle (`name_to_handle_at` on the mount, an NFS re-export)
//! holds a FUSE inode number and generation. A new daemon knows neither the
//! number's backing object nor its generation, so without help every old
//! handle is ESTALE after a restart, where ext4 keeps them valid. A daemon
//! that exits cleanly writes what it knows, for each inode its number,
//! generation and backend identity (the backing file handle it made), to
//! `/var/lib/efuse/handles/`, keyed by the backing tree; the next daemon of
//! that tree reads it before serving and deletes it (a daemon that dies
//! leaves none, and its handles are ESTALE as before).
//!
//! The table is root-only (a 0700 directory, 0600 files) and holds only
//! identities the daemon made from objects inside the jail; a table whose
//! backing root differs (another tree at the same path) is ignored.

use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Where the tables live.
pub const DIR: &str = "/var/lib/efuse/handles";

const MAGIC: &[u8; 8] = b"EFUSEHT1";

/// Most entries a table keeps.
pub const MAX_ENTRIES: usize = 1 << 20;

/// One entry: FUSE inode, generation, backend identity.
pub use crate::fs::inode::Exported as Entry;

/// 64-bit FNV-1a: stable across builds (unlike std's hasher).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The table file of backing tree `source`.
pub fn path_for(dir: &Path, source: &Path) -> PathBuf {
    dir.join(format!("{:016x}", fnv(source.as_os_str().as_bytes())))
}

fn encode(source: &Path, root: &[u8], entries: &[Entry]) -> Vec<u8> {
    let src = source.as_os_str().as_bytes();
    let mut v = Vec::with_capacity(32 + src.len() + root.len() + entries.len() * 40);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&(src.len() as u32).to_le_bytes());
    v.extend_from_slice(src);
    v.extend_from_slice(&(root.len() as u32).to_le_bytes());
    v.extend_from_slice(root);
    v.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (ino, generation, id) in entries {
        v.extend_from_slice(&ino.to_le_bytes());
        v.extend_from_slice(&generation.to_le_bytes());
        v.extend_from_slice(&(id.len() as u16).to_le_bytes());
        v.extend_from_slice(id);
    }
    v
}

/// A length-checked reader of a table.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// (source, root identity, entries) of a table; `None` if malformed.
fn decode(b: &[u8]) -> Option<(PathBuf, Vec<u8>, Vec<Entry>)> {
    let mut r = Reader(b);
    if r.take(8)? != MAGIC {
        return None;
    }
    let n = r.u32()? as usize;
    let src = PathBuf::from(std::ffi::OsStr::from_bytes(r.take(n)?));
    let n = r.u32()? as usize;
    let root = r.take(n)?.to_vec();
    let count = r.u64()?;
    if count > MAX_ENTRIES as u64 {
        return None;
    }
    let mut entries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let ino = r.u64()?;
        let generation = r.u64()?;
        let n = r.u16()? as usize;
        entries.push((ino, generation, r.take(n)?.to_vec()));
    }
    r.0.is_empty().then_some((src, root, entries))
}

/// Write the table of `source` (whose root has identity `root`) under `dir`.
pub fn save(dir: &Path, source: &Path, root: &[u8], entries: &[Entry]) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let path = path_for(dir, source);
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(&encode(source, root, entries))?;
    f.sync_all()?;
    fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Read and delete the table of `source` under `dir`, if there is one for
/// a tree with root identity `root`. Also deletes the tables of trees that
/// no longer exist.
pub fn take(dir: &Path, source: &Path, root: &[u8]) -> Vec<Entry> {
    let path = path_for(dir, source);
    let got = fs::read(&path).ok().and_then(|b| decode(&b));
    let _ = fs::remove_file(&path);
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let stale = fs::read(e.path())
                .ok()
                .and_then(|b| decode(&b))
                .is_none_or(|(src, _, _)| !src.exists());
            if stale {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    match got {
        Some((src, r, entries)) if src == source && r == root => entries,
        Some(_) => {
            tracing::info!(
                "{}: the saved export handles are of another tree; ignored",
                source.display()
            );
            Vec::new()
        }
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_round_trips_and_is_taken_once() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("tree");
        fs::create_dir(&src).unwrap();
        let entries = vec![(5, 77, vec![1, 2, 3]), (9, 78, vec![])];
        save(t.path(), &src, b"root", &entries).unwrap();
        assert_eq!(take(t.path(), &src, b"other root"), Vec::<Entry>::new());
        save(t.path(), &src, b"root", &entries).unwrap();
        assert_eq!(take(t.path(), &src, b"root"), entries);
        assert_eq!(take(t.path(), &src, b"root"), Vec::<Entry>::new());
    }

    #[test]
    fn malformed_tables_are_refused() {
        let good = encode(Path::new("/x"), b"r", &[(1, 2, vec![3; 20])]);
        assert!(decode(&good).is_some());
        for n in 0..good.len() {
            assert!(decode(&good[..n]).is_none(), "truncated at {n}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(decode(&long).is_none());
    }

    #[test]
    fn tables_of_trees_that_are_gone_are_deleted() {
        let t = tempfile::tempdir().unwrap();
        let gone = t.path().join("gone");
        save(t.path(), &gone, b"r", &[]).unwrap();
        let here = t.path().join("here");
        fs::create_dir(&here).unwrap();
        take(t.path(), &here, b"r");
        assert!(!path_for(t.path(), &gone).exists());
    }
}
