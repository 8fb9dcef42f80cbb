//! Model-based test of the filesystem as a whole (`EfuseFs`, no mount):
//! random sequences of lookup, create, mkdir, rename, unlink, rmdir, link,
//! truncate, write, read and forget, over `mem` and over `dir`, compared
//! with a reference model of a POSIX tree, lookup counts included.
//!
//! The test plays the kernel: every successful LOOKUP, CREATE, MKDIR and
//! LINK gives it one reference to the inode, every FORGET gives some back
//! (never more than it holds), and after every step the daemon's count of
//! each inode must equal the kernel's, with no excess forgets.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::sync::Arc;

use efuse::backend::dir::DirBackend;
use efuse::backend::mem::MemBackend;
use efuse::backend::{Caller, FileKind, SetAttr, SharedBackend};
use efuse::config::{KernelTierConfig, Offload};
use efuse::fs::EfuseFs;
use proptest::prelude::*;

type P = Vec<&'static str>;

#[derive(Clone, Debug)]
enum Op {
    Lookup(P),
    Create(P),
    Mkdir(P),
    Unlink(P),
    Rmdir(P),
    Rename(P, P),
    Link(P, P),
    Truncate(P, u8),
    Write(P, u8, Vec<u8>),
    Read(P),
    Forget(usize, u64),
}

fn path() -> impl Strategy<Value = P> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..=3)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => path().prop_map(Op::Lookup),
        3 => path().prop_map(Op::Create),
        2 => path().prop_map(Op::Mkdir),
        2 => path().prop_map(Op::Unlink),
        1 => path().prop_map(Op::Rmdir),
        3 => (path(), path()).prop_map(|(a, b)| Op::Rename(a, b)),
        2 => (path(), path()).prop_map(|(a, b)| Op::Link(a, b)),
        1 => (path(), 0u8..24).prop_map(|(p, s)| Op::Truncate(p, s)),
        2 => (path(), 0u8..16, prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(p, o, d)| Op::Write(p, o, d)),
        2 => path().prop_map(Op::Read),
        3 => (any::<usize>(), 1u64..4).prop_map(|(i, n)| Op::Forget(i, n)),
    ]
}

// ---- the model: directories of names; files are shared (hard links) ----

#[derive(Clone, Debug)]
enum Node {
    File(usize),
    Dir(BTreeMap<&'static str, Node>),
}

#[derive(Default)]
struct Model {
    root: BTreeMap<&'static str, Node>,
    files: Vec<Vec<u8>>,
}

/// Where a path leads in the model.
enum At<'a> {
    Missing,
    /// A component before the last is a file.
    NotDir,
    Found(&'a Node),
}

impl Model {
    fn dir(&self, p: &[&'static str]) -> Result<&BTreeMap<&'static str, Node>, i32> {
        let mut d = &self.root;
        for c in p {
            match d.get(c) {
                None => return Err(libc::ENOENT),
                Some(Node::File(_)) => return Err(libc::ENOTDIR),
                Some(Node::Dir(m)) => d = m,
            }
        }
        Ok(d)
    }
    fn dir_mut(&mut self, p: &[&'static str]) -> Result<&mut BTreeMap<&'static str, Node>, i32> {
        let mut d = &mut self.root;
        for c in p {
            match d.get_mut(c) {
                None => return Err(libc::ENOENT),
                Some(Node::File(_)) => return Err(libc::ENOTDIR),
                Some(Node::Dir(m)) => d = m,
            }
        }
        Ok(d)
    }
    fn at(&self, p: &[&'static str]) -> At<'_> {
        let (last, parent) = p.split_last().expect("non-empty");
        match self.dir(parent) {
            Err(libc::ENOTDIR) => At::NotDir,
            Err(_) => At::Missing,
            Ok(d) => d.get(last).map_or(At::Missing, At::Found),
        }
    }
    /// The errno of resolving `p`'s parent, or of `p` missing.
    fn node(&self, p: &[&'static str]) -> Result<&Node, i32> {
        match self.at(p) {
            At::Missing => Err(libc::ENOENT),
            At::NotDir => Err(libc::ENOTDIR),
            At::Found(n) => Ok(n),
        }
    }
}

/// Outcome compared between the model and the filesystem.
#[derive(Debug, PartialEq)]
enum Out {
    Ok,
    Kind(bool),
    Data(Vec<u8>),
    Err(i32),
}

fn apply_model(m: &mut Model, op: &Op) -> Out {
    let e = Out::Err;
    match op {
        Op::Lookup(p) => match m.node(p) {
            Ok(Node::Dir(_)) => Out::Kind(true),
            Ok(Node::File(_)) => Out::Kind(false),
            Err(x) => e(x),
        },
        Op::Create(p) | Op::Mkdir(p) => {
            let (last, parent) = p.split_last().unwrap();
            let next = m.files.len();
            let dir = matches!(op, Op::Mkdir(_));
            match m.dir_mut(parent) {
                Err(x) => e(x),
                Ok(d) if d.contains_key(last) => e(libc::EEXIST),
                Ok(d) => {
                    d.insert(
                        last,
                        if dir {
                            Node::Dir(BTreeMap::new())
                        } else {
                            Node::File(next)
                        },
                    );
                    if !dir {
                        m.files.push(Vec::new());
                    }
                    Out::Ok
                }
            }
        }
        Op::Unlink(p) => match m.node(p) {
            Err(x) => e(x),
            Ok(Node::Dir(_)) => e(libc::EISDIR),
            Ok(Node::File(_)) => {
                let (last, parent) = p.split_last().unwrap();
                m.dir_mut(parent).unwrap().remove(last);
                Out::Ok
            }
        },
        Op::Rmdir(p) => match m.node(p) {
            Err(x) => e(x),
            Ok(Node::File(_)) => e(libc::ENOTDIR),
            Ok(Node::Dir(c)) if !c.is_empty() => e(libc::ENOTEMPTY),
            Ok(Node::Dir(_)) => {
                let (last, parent) = p.split_last().unwrap();
                m.dir_mut(parent).unwrap().remove(last);
                Out::Ok
            }
        },
        Op::Rename(a, b) => {
            // As rename(2) resolves: both parents first, then the source.
            let (al, ap) = a.split_last().unwrap();
            let (bl, bp) = b.split_last().unwrap();
            if let Err(x) = m.dir(ap) {
                return e(x);
            }
            if let Err(x) = m.dir(bp) {
                return e(x);
            }
            let src = match m.dir(ap).unwrap().get(al) {
                None => return e(libc::ENOENT),
                Some(n) => n.clone(),
            };
            if a == b {
                return Out::Ok;
            }
            let src_dir = matches!(src, Node::Dir(_));
            // The VFS refuses a source that is an ancestor of the target,
            // and a target that is an ancestor of the source.
            if src_dir && b.len() > a.len() && b[..a.len()] == a[..] {
                return e(libc::EINVAL);
            }
            if a.len() > b.len() && a[..b.len()] == b[..] {
                return e(libc::ENOTEMPTY);
            }
            match (m.node(b), &src) {
                (Ok(Node::File(x)), Node::File(y)) if x == y => return Out::Ok,
                (Ok(Node::File(_)), Node::Dir(_)) => return e(libc::ENOTDIR),
                (Ok(Node::Dir(_)), Node::File(_)) => return e(libc::EISDIR),
                (Ok(Node::Dir(c)), Node::Dir(_)) if !c.is_empty() => return e(libc::ENOTEMPTY),
                _ => {}
            }
            // The destination directory may be an ancestor of the source:
            // removing the source first is right either way.
            m.dir_mut(ap).unwrap().remove(al);
            m.dir_mut(bp).unwrap().insert(bl, src);
            Out::Ok
        }
        Op::Link(a, b) => {
            // As linkat(2) resolves: the source, the new name's parent, the
            // new name; only then is a directory source refused.
            let src = match m.node(a) {
                Err(x) => return e(x),
                Ok(n) => n.clone(),
            };
            let (bl, bp) = b.split_last().unwrap();
            match (m.dir_mut(bp), src) {
                (Err(x), _) => e(x),
                (Ok(d), _) if d.contains_key(bl) => e(libc::EEXIST),
                (Ok(_), Node::Dir(_)) => e(libc::EPERM),
                (Ok(d), Node::File(id)) => {
                    d.insert(bl, Node::File(id));
                    Out::Ok
                }
            }
        }
        Op::Truncate(p, size) => match m.node(p) {
            Err(x) => e(x),
            Ok(Node::Dir(_)) => e(libc::EISDIR),
            Ok(Node::File(id)) => {
                let id = *id;
                m.files[id].resize(*size as usize, 0);
                Out::Ok
            }
        },
        Op::Write(p, off, data) => match m.node(p) {
            Err(x) => e(x),
            Ok(Node::Dir(_)) => e(libc::EISDIR),
            Ok(Node::File(id)) => {
                let (id, off) = (*id, *off as usize);
                let f = &mut m.files[id];
                if f.len() < off + data.len() {
                    f.resize(off + data.len(), 0);
                }
                f[off..off + data.len()].copy_from_slice(data);
                Out::Ok
            }
        },
        Op::Read(p) => match m.node(p) {
            Err(x) => e(x),
            Ok(Node::Dir(_)) => e(libc::EISDIR),
            Ok(Node::File(id)) => Out::Data(m.files[*id].clone()),
        },
        Op::Forget(..) => Out::Ok,
    }
}

// ---- the system under test, driven as the kernel would ----

struct Kernel {
    fs: Arc<EfuseFs>,
    /// References the "kernel" holds per FUSE inode.
    refs: HashMap<u64, u64>,
}

const WHO: Caller = Caller {
    uid: 0,
    gid: 0,
    pid: 1,
    umask: 0o022,
};

fn errno(e: &efuse::fs::FsError) -> i32 {
    e.to_errno()
}

impl Kernel {
    fn got(&mut self, ino: u64) {
        *self.refs.entry(ino).or_default() += 1;
    }

    /// Look up every component of `p` (each success is a reference).
    fn walk(&mut self, p: &[&'static str]) -> Result<(u64, bool), i32> {
        let mut ino = 1;
        let mut dir = true;
        for c in p {
            let e = self.fs.lookup(ino, OsStr::new(c)).map_err(|e| errno(&e))?;
            self.got(e.attr.ino);
            ino = e.attr.ino;
            dir = e.attr.kind == FileKind::Dir;
        }
        Ok((ino, dir))
    }

    fn parent(&mut self, p: &[&'static str]) -> Result<(u64, &'static str), i32> {
        let (last, parent) = p.split_last().unwrap();
        let (ino, dir) = self.walk(parent)?;
        if !dir {
            return Err(libc::ENOTDIR);
        }
        Ok((ino, last))
    }

    fn file(&mut self, p: &[&'static str], flags: i32) -> Result<u64, i32> {
        let (ino, dir) = self.walk(p)?;
        if dir {
            return Err(libc::EISDIR);
        }
        let o = self.fs.open(ino, flags).map_err(|e| errno(&e))?;
        Ok(o.fh)
    }

    fn apply(&mut self, op: &Op) -> Out {
        let r: Result<Out, i32> = (|| match op {
            Op::Lookup(p) => self.walk(p).map(|(_, d)| Out::Kind(d)),
            Op::Create(p) => {
                let (dir, name) = self.parent(p)?;
                let (e, o) = self
                    .fs
                    .create(
                        WHO,
                        dir,
                        OsStr::new(name),
                        libc::S_IFREG | 0o644,
                        libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
                    )
                    .map_err(|e| errno(&e))?;
                self.got(e.attr.ino);
                self.fs.release(o.fh);
                Ok(Out::Ok)
            }
            Op::Mkdir(p) => {
                let (dir, name) = self.parent(p)?;
                let e = self
                    .fs
                    .mkdir(WHO, dir, OsStr::new(name), 0o755)
                    .map_err(|e| errno(&e))?;
                self.got(e.attr.ino);
                Ok(Out::Ok)
            }
            Op::Unlink(p) => {
                let (dir, name) = self.parent(p)?;
                self.fs.unlink(dir, OsStr::new(name)).map_err(|e| errno(&e))?;
                Ok(Out::Ok)
            }
            Op::Rmdir(p) => {
                let (dir, name) = self.parent(p)?;
                self.fs.rmdir(dir, OsStr::new(name)).map_err(|e| errno(&e))?;
                Ok(Out::Ok)
            }
            Op::Rename(a, b) => {
                let (da, na) = self.parent(a)?;
                let (db, nb) = self.parent(b)?;
                // What the VFS checks before it sends RENAME: the source
                // exists, neither name is an ancestor of the other, and the
                // two are not the same inode.
                let src = self.fs.lookup(da, OsStr::new(na)).map_err(|e| errno(&e))?;
                self.got(src.attr.ino);
                if src.attr.kind == FileKind::Dir && b.len() > a.len() && b[..a.len()] == a[..] {
                    return Err(libc::EINVAL);
                }
                let dst = match self.fs.lookup(db, OsStr::new(nb)) {
                    Ok(e) => {
                        self.got(e.attr.ino);
                        Some(e.attr)
                    }
                    Err(e) if errno(&e) == libc::ENOENT => None,
                    Err(e) => return Err(errno(&e)),
                };
                if a.len() > b.len() && a[..b.len()] == b[..] {
                    return Err(libc::ENOTEMPTY);
                }
                if dst.as_ref().is_some_and(|d| d.ino == src.attr.ino) {
                    return Ok(Out::Ok);
                }
                match (
                    src.attr.kind == FileKind::Dir,
                    dst.map(|d| d.kind == FileKind::Dir),
                ) {
                    (true, Some(false)) => return Err(libc::ENOTDIR),
                    (false, Some(true)) => return Err(libc::EISDIR),
                    _ => {}
                }
                self.fs
                    .rename(da, OsStr::new(na), db, OsStr::new(nb), 0)
                    .map_err(|e| errno(&e))?;
                Ok(Out::Ok)
            }
            Op::Link(a, b) => {
                let (ino, dir) = self.walk(a)?;
                let (db, nb) = self.parent(b)?;
                // The kernel looks the new name up, and sends LINK only for
                // an absent name and a source that is not a directory.
                match self.fs.lookup(db, OsStr::new(nb)) {
                    Ok(e) => {
                        self.got(e.attr.ino);
                        return Err(libc::EEXIST);
                    }
                    Err(e) if errno(&e) != libc::ENOENT => return Err(errno(&e)),
                    Err(_) if dir => return Err(libc::EPERM),
                    Err(_) => {}
                }
                let e = self.fs.link(ino, db, OsStr::new(nb)).map_err(|e| errno(&e))?;
                self.got(e.attr.ino);
                Ok(Out::Ok)
            }
            Op::Truncate(p, size) => {
                let (ino, dir) = self.walk(p)?;
                if dir {
                    return Err(libc::EISDIR);
                }
                let set = SetAttr {
                    size: Some(u64::from(*size)),
                    ..SetAttr::default()
                };
                self.fs.setattr(ino, None, &set).map_err(|e| errno(&e))?;
                Ok(Out::Ok)
            }
            Op::Write(p, off, data) => {
                let fh = self.file(p, libc::O_WRONLY)?;
                let r = self.fs.write(fh, u64::from(*off), data);
                self.fs.release(fh);
                r.map_err(|e| errno(&e))?;
                Ok(Out::Ok)
            }
            Op::Read(p) => {
                let fh = self.file(p, libc::O_RDONLY)?;
                let r = self.fs.read(fh, 0, 4096);
                self.fs.release(fh);
                Ok(Out::Data(r.map_err(|e| errno(&e))?))
            }
            Op::Forget(i, n) => {
                let mut held: Vec<(u64, u64)> = self
                    .refs
                    .iter()
                    .map(|(k, v)| (*k, *v))
                    .filter(|x| x.1 > 0)
                    .collect();
                held.sort();
                if held.is_empty() {
                    return Ok(Out::Ok);
                }
                let (ino, have) = held[i % held.len()];
                let n = (*n).min(have);
                self.fs.forget(ino, n);
                *self.refs.get_mut(&ino).unwrap() -= n;
                Ok(Out::Ok)
            }
        })();
        r.unwrap_or_else(Out::Err)
    }

    /// The daemon's counts equal the kernel's.
    fn check_counts(&self, step: usize, op: &Op) {
        let t = self.fs.inodes();
        for (ino, n) in &self.refs {
            assert_eq!(
                t.nlookup(*ino),
                *n,
                "step {step} ({op:?}): lookup count of inode {ino}"
            );
        }
        let sum: u64 = self.refs.values().sum();
        assert_eq!(t.totals().1, sum, "step {step} ({op:?}): total lookup count");
        assert_eq!(t.excess_forgets(), 0, "step {step} ({op:?}): excess forgets");
    }
}

fn run(backend: SharedBackend, ops: &[Op]) {
    let fs = Arc::new(EfuseFs::new(
        backend,
        Offload::Kernel,
        KernelTierConfig::default(),
    ));
    let mut k = Kernel {
        fs,
        refs: HashMap::new(),
    };
    let mut model = Model::default();
    for (i, op) in ops.iter().enumerate() {
        let want = apply_model(&mut model, op);
        let got = k.apply(op);
        assert_eq!(got, want, "step {i}: {op:?}");
        k.check_counts(i, op);
    }
    // Give back every reference: the table empties (but for the root).
    let held: Vec<(u64, u64)> = k.refs.iter().map(|(a, b)| (*a, *b)).collect();
    for (ino, n) in held {
        k.fs.forget(ino, n);
        k.refs.insert(ino, 0);
    }
    k.check_counts(ops.len(), &Op::Forget(0, 0));
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("EFUSE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).map_or(300, |n: u32| n / 10),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn efuse_fs_over_mem_matches_the_model(ops in prop::collection::vec(op(), 1..50)) {
        run(Arc::new(MemBackend::new()), &ops);
    }

    #[test]
    fn efuse_fs_over_dir_matches_the_model(ops in prop::collection::vec(op(), 1..50)) {
        let t = tempfile::tempdir().unwrap();
        run(DirBackend::new_shared(t.path()).unwrap(), &ops);
    }
}
