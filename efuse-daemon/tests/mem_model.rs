//! Property test: random operation sequences applied to the `mem` backend
//! and to a small reference model of a POSIX tree must give the same
//! results (value or errno) and leave the same tree.

use std::collections::BTreeMap;
use std::ffi::OsStr;

use efuse::backend::mem::MemBackend;
use efuse::backend::{Backend, Caller, FileKind, Ino, SetAttr};
use proptest::prelude::*;

type Path = Vec<&'static str>;

#[derive(Clone, Debug, PartialEq)]
enum Node {
    File(Vec<u8>),
    Dir(BTreeMap<&'static str, Node>),
}

#[derive(Clone, Debug)]
enum Op {
    Create(Path),
    Mkdir(Path),
    Write(Path, u8, Vec<u8>),
    Truncate(Path, u8),
    Read(Path),
    Unlink(Path),
    Rmdir(Path),
    Rename(Path, Path),
    List(Path),
}

/// Outcome of an op: a value or an errno.
#[derive(Debug, PartialEq)]
enum Out {
    Ok,
    Data(Vec<u8>),
    Names(Vec<String>),
    Err(i32),
}

fn path() -> impl Strategy<Value = Path> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..=3)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => path().prop_map(Op::Create),
        2 => path().prop_map(Op::Mkdir),
        3 => (path(), 0u8..16, prop::collection::vec(any::<u8>(), 0..8)).prop_map(|(p, o, d)| Op::Write(p, o, d)),
        1 => (path(), 0u8..24).prop_map(|(p, s)| Op::Truncate(p, s)),
        2 => path().prop_map(Op::Read),
        2 => path().prop_map(Op::Unlink),
        2 => path().prop_map(Op::Rmdir),
        3 => (path(), path()).prop_map(|(a, b)| Op::Rename(a, b)),
        1 => prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 0..=2).prop_map(Op::List),
    ]
}

// ---- the model ----

struct Model {
    root: Node,
}

impl Model {
    fn dir(&self, p: &[&'static str]) -> Result<&BTreeMap<&'static str, Node>, i32> {
        let mut cur = &self.root;
        for c in p {
            match cur {
                Node::Dir(m) => cur = m.get(c).ok_or(libc::ENOENT)?,
                Node::File(_) => return Err(libc::ENOTDIR),
            }
        }
        match cur {
            Node::Dir(m) => Ok(m),
            Node::File(_) => Err(libc::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, p: &[&'static str]) -> Result<&mut BTreeMap<&'static str, Node>, i32> {
        let mut cur = &mut self.root;
        for c in p {
            match cur {
                Node::Dir(m) => cur = m.get_mut(c).ok_or(libc::ENOENT)?,
                Node::File(_) => return Err(libc::ENOTDIR),
            }
        }
        match cur {
            Node::Dir(m) => Ok(m),
            Node::File(_) => Err(libc::ENOTDIR),
        }
    }

    fn split(p: &Path) -> (&[&'static str], &'static str) {
        (&p[..p.len() - 1], p[p.len() - 1])
    }

    fn apply(&mut self, op: &Op) -> Out {
        match self.try_apply(op) {
            Ok(o) => o,
            Err(e) => Out::Err(e),
        }
    }

    fn try_apply(&mut self, op: &Op) -> Result<Out, i32> {
        match op {
            Op::Create(p) => {
                let (d, n) = Self::split(p);
                let m = self.dir_mut(d)?;
                if m.contains_key(n) {
                    return Err(libc::EEXIST);
                }
                m.insert(n, Node::File(Vec::new()));
                Ok(Out::Ok)
            }
            Op::Mkdir(p) => {
                let (d, n) = Self::split(p);
                let m = self.dir_mut(d)?;
                if m.contains_key(n) {
                    return Err(libc::EEXIST);
                }
                m.insert(n, Node::Dir(BTreeMap::new()));
                Ok(Out::Ok)
            }
            Op::Write(p, off, data) => {
                let (d, n) = Self::split(p);
                match self.dir_mut(d)?.get_mut(n).ok_or(libc::ENOENT)? {
                    Node::Dir(_) => Err(libc::EISDIR),
                    Node::File(f) => {
                        let end = *off as usize + data.len();
                        if f.len() < end {
                            f.resize(end, 0);
                        }
                        f[*off as usize..end].copy_from_slice(data);
                        Ok(Out::Ok)
                    }
                }
            }
            Op::Truncate(p, size) => {
                let (d, n) = Self::split(p);
                match self.dir_mut(d)?.get_mut(n).ok_or(libc::ENOENT)? {
                    Node::Dir(_) => Err(libc::EISDIR),
                    Node::File(f) => {
                        f.resize(*size as usize, 0);
                        Ok(Out::Ok)
                    }
                }
            }
            Op::Read(p) => {
                let (d, n) = Self::split(p);
                match self.dir(d)?.get(n).ok_or(libc::ENOENT)? {
                    Node::Dir(_) => Err(libc::EISDIR),
                    Node::File(f) => Ok(Out::Data(f.clone())),
                }
            }
            Op::Unlink(p) => {
                let (d, n) = Self::split(p);
                let m = self.dir_mut(d)?;
                match m.get(n).ok_or(libc::ENOENT)? {
                    Node::Dir(_) => Err(libc::EISDIR),
                    Node::File(_) => {
                        m.remove(n);
                        Ok(Out::Ok)
                    }
                }
            }
            Op::Rmdir(p) => {
                let (d, n) = Self::split(p);
                let m = self.dir_mut(d)?;
                match m.get(n).ok_or(libc::ENOENT)? {
                    Node::File(_) => Err(libc::ENOTDIR),
                    Node::Dir(c) if !c.is_empty() => Err(libc::ENOTEMPTY),
                    Node::Dir(_) => {
                        m.remove(n);
                        Ok(Out::Ok)
                    }
                }
            }
            Op::Rename(a, b) => {
                let (da, na) = Self::split(a);
                let (db, nb) = Self::split(b);
                self.dir(da)?;
                self.dir(db)?;
                let src = self.dir(da)?.get(na).ok_or(libc::ENOENT)?.clone();
                let src_dir = matches!(src, Node::Dir(_));
                // A directory cannot move into its own subtree.
                if src_dir && b.len() > a.len() && b[..a.len()] == a[..] {
                    return Err(libc::EINVAL);
                }
                if a == b {
                    return Ok(Out::Ok);
                }
                if let Some(dst) = self.dir(db)?.get(nb) {
                    match (dst, src_dir) {
                        (Node::Dir(c), true) if !c.is_empty() => return Err(libc::ENOTEMPTY),
                        (Node::Dir(_), false) => return Err(libc::EISDIR),
                        (Node::File(_), true) => return Err(libc::ENOTDIR),
                        _ => {}
                    }
                }
                self.dir_mut(da)?.remove(na);
                self.dir_mut(db)?.insert(nb, src);
                Ok(Out::Ok)
            }
            Op::List(p) => {
                let m = self.dir(p)?;
                Ok(Out::Names(m.keys().map(|s| s.to_string()).collect()))
            }
        }
    }
}

// ---- the backend side ----

struct Real {
    b: MemBackend,
}

impl Real {
    /// Resolve a path to an inode, giving back every pin taken on the way.
    fn resolve(&self, p: &[&'static str]) -> Result<Ino, i32> {
        let mut cur = self.b.root();
        for c in p {
            let a = self.b.lookup(cur, OsStr::new(c)).map_err(|e| e.to_errno())?;
            self.b.forget(a.ino, 1);
            cur = a.ino;
        }
        Ok(cur)
    }

    fn dir(&self, p: &[&'static str]) -> Result<Ino, i32> {
        let ino = self.resolve(p)?;
        let a = self.b.getattr(ino).map_err(|e| e.to_errno())?;
        if a.kind != FileKind::Dir {
            return Err(libc::ENOTDIR);
        }
        Ok(ino)
    }

    fn apply(&self, op: &Op) -> Out {
        match self.try_apply(op) {
            Ok(o) => o,
            Err(e) => Out::Err(e),
        }
    }

    fn try_apply(&self, op: &Op) -> Result<Out, i32> {
        let e = |e: efuse::backend::BackendError| e.to_errno();
        let who = Caller::default();
        match op {
            Op::Create(p) => {
                let (d, n) = Model::split(p);
                let parent = self.dir(d)?;
                let (a, fh) = self
                    .b
                    .create(who, parent, OsStr::new(n), 0o644, libc::O_RDWR | libc::O_EXCL)
                    .map_err(e)?;
                self.b.release(fh);
                self.b.forget(a.ino, 1);
                Ok(Out::Ok)
            }
            Op::Mkdir(p) => {
                let (d, n) = Model::split(p);
                let a = self.b.mkdir(who, self.dir(d)?, OsStr::new(n), 0o755).map_err(e)?;
                self.b.forget(a.ino, 1);
                Ok(Out::Ok)
            }
            Op::Write(p, off, data) => {
                let ino = self.resolve(p)?;
                let fh = self.b.open(ino, libc::O_RDWR).map_err(e)?;
                let r = self.b.write(fh, *off as u64, data).map_err(e);
                self.b.release(fh);
                r.map(|_| Out::Ok)
            }
            Op::Truncate(p, size) => {
                let ino = self.resolve(p)?;
                let set = SetAttr {
                    size: Some(*size as u64),
                    ..Default::default()
                };
                self.b.setattr(ino, None, &set).map_err(e)?;
                Ok(Out::Ok)
            }
            Op::Read(p) => {
                let ino = self.resolve(p)?;
                if self.b.getattr(ino).map_err(e)?.kind == FileKind::Dir {
                    return Err(libc::EISDIR);
                }
                let fh = self.b.open(ino, libc::O_RDONLY).map_err(e)?;
                let r = self.b.read(fh, 0, 1 << 16).map_err(e);
                self.b.release(fh);
                r.map(Out::Data)
            }
            Op::Unlink(p) => {
                let (d, n) = Model::split(p);
                self.b.unlink(self.dir(d)?, OsStr::new(n)).map_err(e)?;
                Ok(Out::Ok)
            }
            Op::Rmdir(p) => {
                let (d, n) = Model::split(p);
                self.b.rmdir(self.dir(d)?, OsStr::new(n)).map_err(e)?;
                Ok(Out::Ok)
            }
            Op::Rename(a, b) => {
                let (da, na) = Model::split(a);
                let (db, nb) = Model::split(b);
                let pa = self.dir(da)?;
                let pb = self.dir(db)?;
                self.b
                    .rename(pa, OsStr::new(na), pb, OsStr::new(nb), 0)
                    .map_err(e)?;
                Ok(Out::Ok)
            }
            Op::List(p) => {
                let ino = self.dir(p)?;
                let dh = self.b.opendir(ino).map_err(e)?;
                let entries = self.b.readdir(dh, 0, 1000).map_err(e);
                self.b.releasedir(dh);
                let mut names: Vec<String> = entries?
                    .into_iter()
                    .map(|d| d.name.to_string_lossy().into_owned())
                    .filter(|n| n != "." && n != "..")
                    .collect();
                names.sort();
                Ok(Out::Names(names))
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn mem_backend_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let mut model = Model { root: Node::Dir(BTreeMap::new()) };
        let real = Real { b: MemBackend::new() };
        for (i, op) in ops.iter().enumerate() {
            let want = model.apply(op);
            let got = real.apply(op);
            prop_assert_eq!(&got, &want, "step {} {:?}", i, op);
        }
        // Every directory's link count is 2 + its subdirectories.
        fn check(real: &Real, p: &mut Vec<&'static str>, node: &Node) {
            if let Node::Dir(m) = node {
                let ino = real.resolve(p).unwrap();
                let subdirs = m.values().filter(|n| matches!(n, Node::Dir(_))).count() as u32;
                assert_eq!(real.b.getattr(ino).unwrap().nlink, 2 + subdirs, "{p:?}");
                for (k, v) in m {
                    p.push(k);
                    check(real, p, v);
                    p.pop();
                }
            }
        }
        check(&real, &mut Vec::new(), &model.root);
    }
}

/// Minimized failures kept as named regressions.
#[test]
fn regression_rename_onto_itself_is_a_noop() {
    let mut model = Model {
        root: Node::Dir(BTreeMap::new()),
    };
    let real = Real { b: MemBackend::new() };
    for op in [
        Op::Mkdir(vec!["a"]),
        Op::Rename(vec!["a"], vec!["a"]),
        Op::List(vec![]),
    ] {
        assert_eq!(real.apply(&op), model.apply(&op), "{op:?}");
    }
}
