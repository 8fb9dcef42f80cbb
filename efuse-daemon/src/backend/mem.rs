//! `mem` backend: a POSIX tree in memory, for unit tests and as a fast
//! reference in benchmarks.
//!
//! One mutex guards the whole tree. An inode lives while it has a link, a
//! pin (the kernel knows it) or an open handle, like an inode on disk that
//! stays readable after unlink while a process holds it open.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::time::SystemTime;

use parking_lot::Mutex;

use super::{
    Attr, Backend, BackendError, Caller, DirEntry, Fh, FileKind, Ino, Result, SetAttr, SetTime, StatFs,
    check_name,
};

const ROOT: Ino = 1;
const BLKSIZE: u32 = 4096;

#[derive(Debug)]
enum Content {
    File(Vec<u8>),
    Dir {
        children: BTreeMap<OsString, Ino>,
        parent: Ino,
    },
    Symlink(Vec<u8>),
    Special,
}

#[derive(Debug)]
struct Node {
    attr: Attr,
    content: Content,
    xattrs: BTreeMap<OsString, Vec<u8>>,
    pins: u64,
    opens: u64,
}

struct DirSnapshot {
    ino: Ino,
    entries: Vec<DirEntry>,
}

#[derive(Default)]
struct State {
    nodes: HashMap<Ino, Node>,
    files: HashMap<Fh, Ino>,
    dirs: HashMap<Fh, DirSnapshot>,
    next_ino: Ino,
    next_fh: Fh,
}

/// In-memory backend.
pub struct MemBackend {
    state: Mutex<State>,
}

impl Default for MemBackend {
    fn default() -> Self {
        Self::new()
    }
}

fn new_attr(ino: Ino, kind: FileKind, perm: u32, who: Caller) -> Attr {
    let now = SystemTime::now();
    Attr {
        ino,
        size: 0,
        blocks: 0,
        atime: now,
        mtime: now,
        ctime: now,
        kind,
        // The kernel leaves the umask to the server (FUSE_DONT_MASK).
        perm: (perm & 0o7777 & !who.umask) as u16,
        nlink: if kind == FileKind::Dir { 2 } else { 1 },
        uid: who.uid,
        gid: who.gid,
        rdev: 0,
        blksize: BLKSIZE,
    }
}

impl State {
    fn node(&self, ino: Ino) -> Result<&Node> {
        self.nodes.get(&ino).ok_or(BackendError::Stale(ino))
    }

    fn node_mut(&mut self, ino: Ino) -> Result<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(BackendError::Stale(ino))
    }

    fn children(&self, ino: Ino) -> Result<&BTreeMap<OsString, Ino>> {
        match &self.node(ino)?.content {
            Content::Dir { children, .. } => Ok(children),
            _ => Err(BackendError::errno("lookup", libc::ENOTDIR)),
        }
    }

    fn children_mut(&mut self, ino: Ino) -> Result<&mut BTreeMap<OsString, Ino>> {
        match &mut self.node_mut(ino)?.content {
            Content::Dir { children, .. } => Ok(children),
            _ => Err(BackendError::errno("lookup", libc::ENOTDIR)),
        }
    }

    fn child(&self, parent: Ino, name: &OsStr) -> Result<Ino> {
        self.children(parent)?
            .get(name)
            .copied()
            .ok_or(BackendError::NotFound)
    }

    fn touch_dir(&mut self, ino: Ino) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            let now = SystemTime::now();
            n.attr.mtime = now;
            n.attr.ctime = now;
        }
    }

    fn maybe_free(&mut self, ino: Ino) {
        if ino == ROOT {
            return;
        }
        if let Some(n) = self.nodes.get(&ino)
            && n.attr.nlink == 0
            && n.pins == 0
            && n.opens == 0
        {
            self.nodes.remove(&ino);
        }
    }

    /// Insert a new node under `parent/name`; pins it once.
    fn insert(&mut self, parent: Ino, name: &OsStr, mut attr: Attr, content: Content) -> Result<Attr> {
        check_name(name)?;
        if self.children(parent)?.contains_key(name) {
            return Err(BackendError::errno("create", libc::EEXIST));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        attr.ino = ino;
        let is_dir = matches!(content, Content::Dir { .. });
        // inode_init_owner(): in a set-group-ID directory a new object takes
        // the directory's group, and a new directory its set-group-ID bit.
        // (The kernel has already stripped S_ISGID from a new file's mode
        // where its creator may not have it.)
        let pattr = self.node(parent)?.attr;
        if pattr.perm & libc::S_ISGID as u16 != 0 {
            attr.gid = pattr.gid;
            if is_dir {
                attr.perm |= libc::S_ISGID as u16;
            }
        }
        self.nodes.insert(
            ino,
            Node {
                attr,
                content,
                xattrs: BTreeMap::new(),
                pins: 1,
                opens: 0,
            },
        );
        self.children_mut(parent)?.insert(name.to_owned(), ino);
        if is_dir {
            self.node_mut(parent)?.attr.nlink += 1;
        }
        self.touch_dir(parent);
        Ok(attr)
    }

    /// Drop one link of `ino` from `parent/name` (entry already removed from the map).
    fn drop_link(&mut self, ino: Ino) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.attr.nlink = n.attr.nlink.saturating_sub(1);
            if matches!(n.content, Content::Dir { .. }) {
                n.attr.nlink = 0;
            }
            n.attr.ctime = SystemTime::now();
        }
        self.maybe_free(ino);
    }

    fn is_ancestor(&self, anc: Ino, mut ino: Ino) -> bool {
        loop {
            if ino == anc {
                return true;
            }
            match self.nodes.get(&ino).map(|n| &n.content) {
                Some(Content::Dir { parent, .. }) if *parent != ino => ino = *parent,
                _ => return false,
            }
        }
    }
}

impl MemBackend {
    /// An empty tree with a root directory owned by root, mode 0755.
    pub fn new() -> Self {
        let mut st = State {
            next_ino: ROOT + 1,
            next_fh: 1,
            ..Default::default()
        };
        st.nodes.insert(
            ROOT,
            Node {
                attr: new_attr(ROOT, FileKind::Dir, 0o755, Caller::default()),
                content: Content::Dir {
                    children: BTreeMap::new(),
                    parent: ROOT,
                },
                xattrs: BTreeMap::new(),
                pins: 1,
                opens: 0,
            },
        );
        Self {
            state: Mutex::new(st),
        }
    }

    fn with_file<T>(&self, fh: Fh, f: impl FnOnce(&mut Node) -> Result<T>) -> Result<T> {
        let mut st = self.state.lock();
        let ino = *st.files.get(&fh).ok_or(BackendError::Stale(fh))?;
        f(st.node_mut(ino)?)
    }
}

/// The most bytes the in-memory tree holds, and so the largest file: half
/// the machine's memory (files are stored densely, not sparsely).
fn capacity() -> u64 {
    static CAP: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let (pages, size) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        match (u64::try_from(pages), u64::try_from(size)) {
            (Ok(p), Ok(s)) if p > 0 && s > 0 => p.saturating_mul(s) / 2,
            _ => 1 << 30,
        }
    })
}

/// Grow or shrink file data to `len` bytes: EFBIG beyond the tree's
/// capacity, ENOSPC if the memory cannot be had (never an abort).
fn set_len(op: &'static str, d: &mut Vec<u8>, len: u64) -> Result<()> {
    if len > capacity() {
        return Err(BackendError::errno(op, libc::EFBIG));
    }
    let len = usize::try_from(len).map_err(|_| BackendError::errno(op, libc::EFBIG))?;
    if len > d.len() && d.try_reserve_exact(len - d.len()).is_err() {
        return Err(BackendError::errno(op, libc::ENOSPC));
    }
    d.resize(len, 0);
    Ok(())
}

fn update_blocks(a: &mut Attr) {
    a.blocks = a.size.div_ceil(512);
}

impl Backend for MemBackend {
    fn kind(&self) -> String {
        "mem".into()
    }

    fn root(&self) -> Ino {
        ROOT
    }

    fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr> {
        check_name(name)?;
        let mut st = self.state.lock();
        let ino = st.child(parent, name)?;
        let n = st.node_mut(ino)?;
        n.pins += 1;
        Ok(n.attr)
    }

    fn forget(&self, ino: Ino, n: u64) {
        let mut st = self.state.lock();
        if let Some(node) = st.nodes.get_mut(&ino) {
            node.pins = node.pins.saturating_sub(n);
        }
        st.maybe_free(ino);
    }

    fn pin(&self, ino: Ino) -> Result<()> {
        self.state.lock().node_mut(ino)?.pins += 1;
        Ok(())
    }

    fn getattr(&self, ino: Ino) -> Result<Attr> {
        Ok(self.state.lock().node(ino)?.attr)
    }

    fn reopen(&self, ino: Ino, _identity: Option<&[u8]>) -> Result<Attr> {
        // Numbers are never reused: the node, while it is linked, is the object.
        let mut st = self.state.lock();
        let n = st.nodes.get_mut(&ino).ok_or(BackendError::Stale(ino))?;
        if n.attr.nlink == 0 {
            return Err(BackendError::Stale(ino));
        }
        n.pins += 1;
        Ok(n.attr)
    }

    fn parent(&self, dir: Ino) -> Result<Attr> {
        let mut st = self.state.lock();
        let p = match &st.node(dir)?.content {
            Content::Dir { parent, .. } => *parent,
            _ => return Err(BackendError::errno("lookup(..)", libc::ENOTDIR)),
        };
        let n = st.node_mut(p)?;
        n.pins += 1;
        Ok(n.attr)
    }

    fn setattr(&self, ino: Ino, _fh: Option<Fh>, set: &SetAttr) -> Result<Attr> {
        let mut st = self.state.lock();
        let n = st.node_mut(ino)?;
        let now = SystemTime::now();
        if let Some(size) = set.size {
            match &mut n.content {
                Content::File(d) => set_len("truncate", d, size)?,
                Content::Dir { .. } => return Err(BackendError::errno("truncate", libc::EISDIR)),
                _ => return Err(BackendError::errno("truncate", libc::EINVAL)),
            }
            n.attr.size = size;
            update_blocks(&mut n.attr);
            n.attr.mtime = now;
        }
        if let Some(mode) = set.mode {
            n.attr.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = set.uid {
            n.attr.uid = uid;
        }
        if let Some(gid) = set.gid {
            n.attr.gid = gid;
        }
        let pick = |t: SetTime| match t {
            SetTime::Now => now,
            SetTime::At(t) => t,
        };
        if let Some(t) = set.atime {
            n.attr.atime = pick(t);
        }
        if let Some(t) = set.mtime {
            n.attr.mtime = pick(t);
        }
        n.attr.ctime = now;
        Ok(n.attr)
    }

    fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        match &self.state.lock().node(ino)?.content {
            Content::Symlink(t) => Ok(t.clone()),
            _ => Err(BackendError::errno("readlink", libc::EINVAL)),
        }
    }

    fn mknod(&self, who: Caller, parent: Ino, name: &OsStr, mode: u32, rdev: u32) -> Result<Attr> {
        let kind = FileKind::from_mode(mode).unwrap_or(FileKind::File);
        let mut attr = new_attr(0, kind, mode, who);
        attr.rdev = rdev;
        let content = if kind == FileKind::File {
            Content::File(Vec::new())
        } else {
            Content::Special
        };
        self.state.lock().insert(parent, name, attr, content)
    }

    fn mkdir(&self, who: Caller, parent: Ino, name: &OsStr, mode: u32) -> Result<Attr> {
        let attr = new_attr(0, FileKind::Dir, mode, who);
        self.state.lock().insert(
            parent,
            name,
            attr,
            Content::Dir {
                children: BTreeMap::new(),
                parent,
            },
        )
    }

    fn symlink(&self, who: Caller, parent: Ino, name: &OsStr, target: &OsStr) -> Result<Attr> {
        let mut attr = new_attr(0, FileKind::Symlink, 0o777, who);
        attr.size = target.len() as u64;
        self.state
            .lock()
            .insert(parent, name, attr, Content::Symlink(target.as_bytes().to_vec()))
    }

    fn link(&self, ino: Ino, newparent: Ino, newname: &OsStr) -> Result<Attr> {
        check_name(newname)?;
        let mut st = self.state.lock();
        if matches!(st.node(ino)?.content, Content::Dir { .. }) {
            return Err(BackendError::errno("link", libc::EPERM));
        }
        if st.children(newparent)?.contains_key(newname) {
            return Err(BackendError::errno("link", libc::EEXIST));
        }
        st.children_mut(newparent)?.insert(newname.to_owned(), ino);
        st.touch_dir(newparent);
        let n = st.node_mut(ino)?;
        n.attr.nlink += 1;
        n.attr.ctime = SystemTime::now();
        n.pins += 1;
        Ok(n.attr)
    }

    fn unlink(&self, parent: Ino, name: &OsStr) -> Result<()> {
        check_name(name)?;
        let mut st = self.state.lock();
        let ino = st.child(parent, name)?;
        if matches!(st.node(ino)?.content, Content::Dir { .. }) {
            return Err(BackendError::errno("unlink", libc::EISDIR));
        }
        st.children_mut(parent)?.remove(name);
        st.touch_dir(parent);
        st.drop_link(ino);
        Ok(())
    }

    fn rmdir(&self, parent: Ino, name: &OsStr) -> Result<()> {
        check_name(name)?;
        let mut st = self.state.lock();
        let ino = st.child(parent, name)?;
        match &st.node(ino)?.content {
            Content::Dir { children, .. } if !children.is_empty() => {
                return Err(BackendError::errno("rmdir", libc::ENOTEMPTY));
            }
            Content::Dir { .. } => {}
            _ => return Err(BackendError::errno("rmdir", libc::ENOTDIR)),
        }
        st.children_mut(parent)?.remove(name);
        st.node_mut(parent)?.attr.nlink -= 1;
        st.touch_dir(parent);
        st.drop_link(ino);
        Ok(())
    }

    fn rename(&self, parent: Ino, name: &OsStr, newparent: Ino, newname: &OsStr, flags: u32) -> Result<()> {
        check_name(name)?;
        check_name(newname)?;
        let mut st = self.state.lock();
        let src = st.child(parent, name)?;
        let dst = st.children(newparent)?.get(newname).copied();
        let src_dir = matches!(st.node(src)?.content, Content::Dir { .. });
        if flags & libc::RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or(BackendError::NotFound)?;
            let dst_dir = matches!(st.node(dst)?.content, Content::Dir { .. });
            if (src_dir && st.is_ancestor(src, newparent)) || (dst_dir && st.is_ancestor(dst, parent)) {
                return Err(BackendError::errno("rename", libc::EINVAL));
            }
            st.children_mut(parent)?.insert(name.to_owned(), dst);
            st.children_mut(newparent)?.insert(newname.to_owned(), src);
            for (ino, p) in [(src, newparent), (dst, parent)] {
                if let Content::Dir { parent, .. } = &mut st.node_mut(ino)?.content {
                    *parent = p;
                }
            }
            if src_dir != dst_dir && parent != newparent {
                let (from, to) = if src_dir {
                    (parent, newparent)
                } else {
                    (newparent, parent)
                };
                st.node_mut(from)?.attr.nlink -= 1;
                st.node_mut(to)?.attr.nlink += 1;
            }
            st.touch_dir(parent);
            st.touch_dir(newparent);
            return Ok(());
        }
        if src_dir && st.is_ancestor(src, newparent) {
            return Err(BackendError::errno("rename", libc::EINVAL));
        }
        if let Some(dst) = dst {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(BackendError::errno("rename", libc::EEXIST));
            }
            if dst == src {
                return Ok(());
            }
            match (&st.node(dst)?.content, src_dir) {
                (Content::Dir { children, .. }, true) if !children.is_empty() => {
                    return Err(BackendError::errno("rename", libc::ENOTEMPTY));
                }
                (Content::Dir { .. }, false) => return Err(BackendError::errno("rename", libc::EISDIR)),
                (c, true) if !matches!(c, Content::Dir { .. }) => {
                    return Err(BackendError::errno("rename", libc::ENOTDIR));
                }
                _ => {}
            }
            let dst_dir = matches!(st.node(dst)?.content, Content::Dir { .. });
            st.children_mut(newparent)?.remove(newname);
            if dst_dir {
                st.node_mut(newparent)?.attr.nlink -= 1;
            }
            st.drop_link(dst);
        }
        st.children_mut(parent)?.remove(name);
        st.children_mut(newparent)?.insert(newname.to_owned(), src);
        if src_dir {
            st.node_mut(parent)?.attr.nlink -= 1;
            st.node_mut(newparent)?.attr.nlink += 1;
            if let Content::Dir { parent: p, .. } = &mut st.node_mut(src)?.content {
                *p = newparent;
            }
        }
        st.node_mut(src)?.attr.ctime = SystemTime::now();
        st.touch_dir(parent);
        st.touch_dir(newparent);
        Ok(())
    }

    fn open(&self, ino: Ino, flags: i32) -> Result<Fh> {
        let mut st = self.state.lock();
        let n = st.node_mut(ino)?;
        match n.content {
            // As on ext4: O_TRUNC empties the file whatever the access mode
            // (O_RDONLY|O_TRUNC too) and sets mtime and ctime.
            Content::File(ref mut d) if flags & libc::O_TRUNC != 0 => {
                d.clear();
                n.attr.size = 0;
                update_blocks(&mut n.attr);
                let now = SystemTime::now();
                n.attr.mtime = now;
                n.attr.ctime = now;
            }
            Content::Dir { .. } if flags & libc::O_ACCMODE != libc::O_RDONLY => {
                return Err(BackendError::errno("open", libc::EISDIR));
            }
            _ => {}
        }
        n.opens += 1;
        let fh = st.next_fh;
        st.next_fh += 1;
        st.files.insert(fh, ino);
        Ok(fh)
    }

    fn create(&self, who: Caller, parent: Ino, name: &OsStr, mode: u32, flags: i32) -> Result<(Attr, Fh)> {
        check_name(name)?;
        let existing = self.state.lock().children(parent)?.get(name).copied();
        let attr = match existing {
            Some(_) if flags & libc::O_EXCL != 0 => return Err(BackendError::errno("create", libc::EEXIST)),
            Some(_) => self.lookup(parent, name)?,
            None => {
                let attr = new_attr(0, FileKind::File, mode, who);
                self.state
                    .lock()
                    .insert(parent, name, attr, Content::File(Vec::new()))?
            }
        };
        let fh = self.open(attr.ino, flags)?;
        Ok((self.getattr(attr.ino)?, fh))
    }

    fn read(&self, fh: Fh, offset: u64, size: u32) -> Result<Vec<u8>> {
        self.with_file(fh, |n| match &n.content {
            Content::File(d) => {
                let start = (offset as usize).min(d.len());
                let end = (start + size as usize).min(d.len());
                Ok(d[start..end].to_vec())
            }
            _ => Err(BackendError::errno("read", libc::EISDIR)),
        })
    }

    fn write(&self, fh: Fh, offset: u64, data: &[u8]) -> Result<u32> {
        self.with_file(fh, |n| match &mut n.content {
            Content::File(d) => {
                let end = offset
                    .checked_add(data.len() as u64)
                    .ok_or_else(|| BackendError::errno("write", libc::EFBIG))?;
                if (d.len() as u64) < end {
                    set_len("write", d, end)?;
                }
                let (start, end) = (offset as usize, end as usize);
                d[start..end].copy_from_slice(data);
                n.attr.size = d.len() as u64;
                update_blocks(&mut n.attr);
                let now = SystemTime::now();
                n.attr.mtime = now;
                n.attr.ctime = now;
                Ok(data.len() as u32)
            }
            _ => Err(BackendError::errno("write", libc::EISDIR)),
        })
    }

    fn flush(&self, fh: Fh) -> Result<()> {
        self.with_file(fh, |_| Ok(()))
    }

    fn fsync(&self, fh: Fh, _datasync: bool) -> Result<()> {
        self.with_file(fh, |_| Ok(()))
    }

    fn release(&self, fh: Fh) {
        let mut st = self.state.lock();
        if let Some(ino) = st.files.remove(&fh) {
            if let Some(n) = st.nodes.get_mut(&ino) {
                n.opens = n.opens.saturating_sub(1);
            }
            st.maybe_free(ino);
        }
    }

    fn opendir(&self, ino: Ino) -> Result<Fh> {
        let mut st = self.state.lock();
        let (children, parent) = match &st.node(ino)?.content {
            Content::Dir { children, parent } => (children, *parent),
            _ => return Err(BackendError::errno("opendir", libc::ENOTDIR)),
        };
        let mut entries = vec![
            (OsString::from("."), ino, FileKind::Dir),
            (OsString::from(".."), parent, FileKind::Dir),
        ];
        for (name, &child) in children {
            let kind = st
                .nodes
                .get(&child)
                .map(|n| n.attr.kind)
                .unwrap_or(FileKind::File);
            entries.push((name.clone(), child, kind));
        }
        let entries = entries
            .into_iter()
            .enumerate()
            .map(|(i, (name, ino, kind))| DirEntry {
                name,
                ino,
                kind,
                next: i as u64 + 1,
            })
            .collect();
        let fh = st.next_fh;
        st.next_fh += 1;
        st.dirs.insert(fh, DirSnapshot { ino, entries });
        Ok(fh)
    }

    fn readdir(&self, dh: Fh, offset: u64, max: usize) -> Result<Vec<DirEntry>> {
        let st = self.state.lock();
        let d = st.dirs.get(&dh).ok_or(BackendError::Stale(dh))?;
        Ok(d.entries
            .iter()
            .skip(offset as usize)
            .take(max)
            .cloned()
            .collect())
    }

    fn readdir_plus(&self, dh: Fh, offset: u64, max: usize) -> Result<Vec<(DirEntry, Attr)>> {
        let entries = self.readdir(dh, offset, max)?;
        let mut st = self.state.lock();
        let dir = st.dirs.get(&dh).map(|d| d.ino).ok_or(BackendError::Stale(dh))?;
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let dots = e.name == "." || e.name == "..";
            // Skip entries removed since the snapshot.
            if !dots && st.children(dir).ok().and_then(|c| c.get(&e.name)) != Some(&e.ino) {
                continue;
            }
            let Some(n) = st.nodes.get_mut(&e.ino) else {
                continue;
            };
            if !dots {
                n.pins += 1;
            }
            out.push((e, n.attr));
        }
        Ok(out)
    }

    fn releasedir(&self, dh: Fh) {
        self.state.lock().dirs.remove(&dh);
    }

    fn statfs(&self) -> Result<StatFs> {
        let st = self.state.lock();
        let used: u64 = st.nodes.values().map(|n| n.attr.blocks).sum();
        let total = capacity() / 512;
        Ok(StatFs {
            blocks: total,
            bfree: total - used.min(total),
            bavail: total - used.min(total),
            files: 1 << 24,
            ffree: (1 << 24) - st.nodes.len() as u64,
            bsize: 512,
            namelen: 255,
            frsize: 512,
        })
    }

    fn getxattr(&self, ino: Ino, name: &OsStr) -> Result<Vec<u8>> {
        self.state
            .lock()
            .node(ino)?
            .xattrs
            .get(name)
            .cloned()
            .ok_or(BackendError::errno("getxattr", libc::ENODATA))
    }

    fn setxattr(&self, ino: Ino, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        // POSIX ACLs are not plain attributes: on a filesystem that keeps
        // them, setting system.posix_acl_access changes the mode too. This
        // backend has none, so it says so as such filesystems do, and tools
        // (cp -a, tar, rsync -A) fall back to chmod instead of believing the
        // mode was set.
        if name.as_bytes().starts_with(b"system.posix_acl_") {
            return Err(BackendError::errno("setxattr", libc::EOPNOTSUPP));
        }
        let mut st = self.state.lock();
        let n = st.node_mut(ino)?;
        let exists = n.xattrs.contains_key(name);
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(BackendError::errno("setxattr", libc::EEXIST));
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(BackendError::errno("setxattr", libc::ENODATA));
        }
        n.xattrs.insert(name.to_owned(), value.to_vec());
        n.attr.ctime = SystemTime::now();
        Ok(())
    }

    fn listxattr(&self, ino: Ino) -> Result<Vec<u8>> {
        let st = self.state.lock();
        let mut out = Vec::new();
        for k in st.node(ino)?.xattrs.keys() {
            out.extend_from_slice(k.as_bytes());
            out.push(0);
        }
        Ok(out)
    }

    fn removexattr(&self, ino: Ino, name: &OsStr) -> Result<()> {
        let mut st = self.state.lock();
        st.node_mut(ino)?
            .xattrs
            .remove(name)
            .map(|_| ())
            .ok_or(BackendError::errno("removexattr", libc::ENODATA))
    }

    fn fallocate(&self, fh: Fh, offset: u64, len: u64, mode: i32) -> Result<()> {
        // What ext4 offers for files that are all data (no extents here):
        // allocation (which only extends), hole punching and range zeroing
        // (both write zeros). Collapse/insert range are not offered.
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let op = mode & !libc::FALLOC_FL_KEEP_SIZE;
        let (punch, zero) = (op == libc::FALLOC_FL_PUNCH_HOLE, op == libc::FALLOC_FL_ZERO_RANGE);
        if op != 0 && !punch && !zero {
            return Err(BackendError::Unsupported);
        }
        if punch && !keep {
            // As the kernel requires: a punched hole never changes the size.
            return Err(BackendError::errno("fallocate", libc::EOPNOTSUPP));
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| len > 0 && e <= i64::MAX as u64)
            .ok_or_else(|| {
                BackendError::errno("fallocate", if len == 0 { libc::EINVAL } else { libc::EFBIG })
            })?;
        let (offset, end) = (usize::try_from(offset), usize::try_from(end));
        let (Ok(offset), Ok(end)) = (offset, end) else {
            return Err(BackendError::errno("fallocate", libc::EFBIG));
        };
        self.with_file(fh, |n| match &mut n.content {
            Content::File(d) => {
                let now = SystemTime::now();
                if punch || zero {
                    let stop = end.min(d.len());
                    if offset < stop {
                        d[offset..stop].fill(0);
                    }
                    n.attr.mtime = now;
                }
                if !keep && d.len() < end {
                    set_len("fallocate", d, end as u64)?;
                    n.attr.size = end as u64;
                    update_blocks(&mut n.attr);
                    n.attr.mtime = now;
                }
                n.attr.ctime = now;
                Ok(())
            }
            _ => Err(BackendError::errno("fallocate", libc::ENODEV)),
        })
    }

    fn lseek(&self, fh: Fh, offset: i64, whence: i32) -> Result<i64> {
        // No holes in memory: all data, one hole at EOF.
        self.with_file(fh, |n| {
            let size = n.attr.size as i64;
            if offset < 0 || offset >= size {
                return Err(BackendError::errno("lseek", libc::ENXIO));
            }
            match whence {
                libc::SEEK_DATA => Ok(offset),
                libc::SEEK_HOLE => Ok(size),
                _ => Err(BackendError::errno("lseek", libc::EINVAL)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlinked_open_file_stays_readable() {
        let b = MemBackend::new();
        let (a, fh) = b
            .create(Caller::default(), ROOT, OsStr::new("f"), 0o644, libc::O_RDWR)
            .unwrap();
        b.write(fh, 0, b"data").unwrap();
        b.unlink(ROOT, OsStr::new("f")).unwrap();
        b.forget(a.ino, 1);
        assert_eq!(b.read(fh, 0, 10).unwrap(), b"data");
        b.release(fh);
        assert!(b.getattr(a.ino).is_err());
    }

    #[test]
    fn rename_dir_into_itself_is_einval() {
        let b = MemBackend::new();
        let d = b.mkdir(Caller::default(), ROOT, OsStr::new("d"), 0o755).unwrap();
        b.mkdir(Caller::default(), d.ino, OsStr::new("e"), 0o755).unwrap();
        let e = b
            .rename(ROOT, OsStr::new("d"), d.ino, OsStr::new("x"), 0)
            .unwrap_err();
        assert_eq!(e.to_errno(), libc::EINVAL);
    }

    #[test]
    fn dir_link_counts_follow_subdirs() {
        let b = MemBackend::new();
        let d = b.mkdir(Caller::default(), ROOT, OsStr::new("d"), 0o755).unwrap();
        assert_eq!(b.getattr(ROOT).unwrap().nlink, 3);
        b.mkdir(Caller::default(), d.ino, OsStr::new("e"), 0o755).unwrap();
        assert_eq!(b.getattr(d.ino).unwrap().nlink, 3);
        b.rmdir(d.ino, OsStr::new("e")).unwrap();
        assert_eq!(b.getattr(d.ino).unwrap().nlink, 2);
    }
}
