//! Every operation through a real efuse mount (`--offload off`, `dir`
//! backend) compared with the same operation on a plain directory.

use std::ffi::{CString, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::time::Duration;

use efuse_tests::{TestMount, assert_same_tree, within};

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn rc(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// mode, size, nlink, uid, gid, mtime, mtime_nsec, ino
type StatKey = (u32, u64, u64, u32, u32, i64, i64, u64);

fn stat_key(p: &Path) -> io::Result<StatKey> {
    let m = fs::symlink_metadata(p)?;
    Ok((
        m.mode(),
        m.size(),
        m.nlink(),
        m.uid(),
        m.gid(),
        m.mtime(),
        m.mtime_nsec(),
        m.ino(),
    ))
}

#[test]
fn stat_matches_backing_for_every_kind() {
    let m = TestMount::new();
    fs::write(m.b("f"), b"hello").unwrap();
    fs::create_dir(m.b("d")).unwrap();
    symlink("f", m.b("l")).unwrap();
    // SAFETY: NUL-terminated strings and buffers that outlive the call, with their true lengths.
    rc(unsafe { libc::mkfifo(c(&m.b("p")).as_ptr(), 0o640) }).unwrap();
    for name in ["f", "d", "l", "p"] {
        assert_eq!(
            stat_key(&m.m(name)).unwrap(),
            stat_key(&m.b(name)).unwrap(),
            "{name}"
        );
    }
    // The root reports inode 1 but the backing root's attributes otherwise.
    let (r, br) = (fs::metadata(m.mnt()).unwrap(), fs::metadata(m.backing()).unwrap());
    assert_eq!(r.ino(), 1);
    assert_eq!(
        (r.mode(), r.nlink(), r.mtime()),
        (br.mode(), br.nlink(), br.mtime())
    );
    assert_eq!(
        fs::metadata(m.m("nope")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
}

#[test]
fn create_write_read_truncate_like_a_plain_dir() {
    let m = TestMount::new();
    m.both("create", |r| {
        let mut f = File::create(r.join("a"))?;
        f.write_all(b"0123456789")?;
        Ok(())
    })
    .unwrap();
    m.both("pwrite past eof", |r| {
        let f = OpenOptions::new().write(true).open(r.join("a"))?;
        f.write_all_at(b"xyz", 20)?;
        Ok(())
    })
    .unwrap();
    m.both("read", |r| fs::read(r.join("a"))).unwrap();
    m.both("append", |r| {
        let mut f = OpenOptions::new().append(true).open(r.join("a"))?;
        f.write_all(b"tail")
    })
    .unwrap();
    m.both("truncate", |r| {
        OpenOptions::new().write(true).open(r.join("a"))?.set_len(5)
    })
    .unwrap();
    m.both("O_TRUNC", |r| {
        let mut f = OpenOptions::new().write(true).truncate(true).open(r.join("a"))?;
        f.write_all(b"new")
    })
    .unwrap();
    m.both("O_EXCL on existing", |r| {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(r.join("a"))
            .map(|_| ())
    })
    .unwrap_err();
    m.both("read at offsets", |r| {
        let mut f = File::open(r.join("a"))?;
        f.seek(SeekFrom::Start(1))?;
        let mut s = String::new();
        f.read_to_string(&mut s)?;
        Ok(s)
    })
    .unwrap();
    assert_same_tree(&m.backing(), &m.twin());
    assert_eq!(stat_key(&m.m("a")).unwrap(), stat_key(&m.b("a")).unwrap());
}

#[test]
fn setattr_chmod_chown_utimens() {
    let m = TestMount::new();
    m.seed_file("f", b"data");
    m.both("chmod", |r| {
        fs::set_permissions(r.join("f"), fs::Permissions::from_mode(0o4751))
    })
    .unwrap();
    m.both("chown", |r| {
        // SAFETY: NUL-terminated strings and buffers that outlive the call, with their true lengths.
        rc(unsafe { libc::chown(c(&r.join("f")).as_ptr(), 1234, 5678) })
    })
    .unwrap();
    m.both("utimens", |r| {
        let t = [
            libc::timespec {
                tv_sec: 1_000_000,
                tv_nsec: 123_456_789,
            },
            libc::timespec {
                tv_sec: 2_000_000,
                tv_nsec: 987_654_321,
            },
        ];
        // SAFETY: NUL-terminated strings and buffers that outlive the call, with their true lengths.
        rc(unsafe { libc::utimensat(libc::AT_FDCWD, c(&r.join("f")).as_ptr(), t.as_ptr(), 0) })
    })
    .unwrap();
    let (a, b) = (
        fs::metadata(m.m("f")).unwrap(),
        fs::metadata(m.twin().join("f")).unwrap(),
    );
    assert_eq!((a.mode(), a.uid(), a.gid()), (b.mode(), b.uid(), b.gid()));
    assert_eq!(
        (a.atime(), a.atime_nsec(), a.mtime(), a.mtime_nsec()),
        (1_000_000, 123_456_789, 2_000_000, 987_654_321)
    );
    // UTIME_NOW sets the time to now on the backing file.
    // SAFETY: NUL-terminated strings and buffers that outlive the call, with their true lengths.
    rc(unsafe { libc::utimensat(libc::AT_FDCWD, c(&m.m("f")).as_ptr(), std::ptr::null(), 0) }).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((fs::metadata(m.b("f")).unwrap().mtime() - now).abs() <= 2);
    assert_eq!(stat_key(&m.m("f")).unwrap(), stat_key(&m.b("f")).unwrap());
}

#[test]
fn directories_rename_and_errnos() {
    let m = TestMount::new();
    m.seed_file("x/file", b"1");
    m.seed_file("y/other", b"2");
    m.seed_file("z", b"3");
    m.both("mkdir", |r| fs::create_dir(r.join("d"))).unwrap();
    m.both("mkdir existing", |r| fs::create_dir(r.join("d")))
        .unwrap_err();
    m.both("rmdir non-empty", |r| fs::remove_dir(r.join("x")))
        .unwrap_err();
    m.both("rmdir a file", |r| fs::remove_dir(r.join("z")))
        .unwrap_err();
    m.both("unlink a dir", |r| fs::remove_file(r.join("d")))
        .unwrap_err();
    m.both("unlink missing", |r| fs::remove_file(r.join("missing")))
        .unwrap_err();
    m.both("open missing", |r| File::open(r.join("missing")).map(|_| ()))
        .unwrap_err();
    m.both("lookup through a file", |r| {
        fs::metadata(r.join("z/sub")).map(|_| ())
    })
    .unwrap_err();
    m.both("rename file", |r| fs::rename(r.join("z"), r.join("d/z2")))
        .unwrap();
    m.both("rename dir over non-empty dir", |r| {
        fs::rename(r.join("d"), r.join("x"))
    })
    .unwrap_err();
    m.both("rename dir into itself", |r| {
        fs::rename(r.join("x"), r.join("x/in"))
    })
    .unwrap_err();
    m.both("rename dir", |r| fs::rename(r.join("y"), r.join("x/y")))
        .unwrap();
    let renameat2 = |r: &Path, a: &str, b: &str, flags: u32| {
        // SAFETY: NUL-terminated strings and buffers that outlive the call, with their true lengths.
        rc(unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                c(&r.join(a)).as_ptr(),
                libc::AT_FDCWD,
                c(&r.join(b)).as_ptr(),
                flags,
            )
        })
    };
    m.both("RENAME_NOREPLACE onto existing", |r| {
        renameat2(r, "x/file", "d/z2", libc::RENAME_NOREPLACE)
    })
    .unwrap_err();
    m.both("RENAME_NOREPLACE", |r| {
        renameat2(r, "x/file", "d/file", libc::RENAME_NOREPLACE)
    })
    .unwrap();
    m.both("RENAME_EXCHANGE", |r| {
        renameat2(r, "d/file", "x/y/other", libc::RENAME_EXCHANGE)
    })
    .unwrap();
    m.both("RENAME_EXCHANGE file and dir", |r| {
        renameat2(r, "d", "x/y/other", libc::RENAME_EXCHANGE)
    })
    .unwrap();
    m.both("rmdir", |r| {
        fs::remove_dir(r.join("x/y/other/z2").parent().unwrap().join("nonexistent"))
    })
    .unwrap_err();
    assert_same_tree(&m.backing(), &m.twin());
    // A rename is visible at once under both names.
    fs::write(m.m("r1"), b"r").unwrap();
    fs::rename(m.m("r1"), m.m("r2")).unwrap();
    assert_eq!(
        fs::metadata(m.m("r1")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    assert_eq!(fs::read(m.m("r2")).unwrap(), b"r");
}

#[test]
fn symlinks_and_hard_links() {
    let m = TestMount::new();
    m.seed_file("target", b"t");
    m.both("symlink", |r| symlink("target", r.join("sl"))).unwrap();
    m.both("symlink to nowhere", |r| {
        symlink("/nonexistent/x", r.join("dangling"))
    })
    .unwrap();
    m.both("readlink", |r| fs::read_link(r.join("sl"))).unwrap();
    m.both("read via symlink", |r| fs::read(r.join("sl"))).unwrap();
    m.both("follow dangling", |r| fs::read(r.join("dangling")))
        .unwrap_err();
    m.both("readlink of a file", |r| fs::read_link(r.join("target")))
        .unwrap_err();
    m.both("link", |r| fs::hard_link(r.join("target"), r.join("hl")))
        .unwrap();
    m.both("link existing", |r| fs::hard_link(r.join("target"), r.join("hl")))
        .unwrap_err();
    m.both("nlink", |r| fs::metadata(r.join("hl")).map(|md| md.nlink()))
        .unwrap();
    m.both("write via link", |r| fs::write(r.join("hl"), b"via link"))
        .unwrap();
    m.both("read other name", |r| fs::read(r.join("target"))).unwrap();
    assert_same_tree(&m.backing(), &m.twin());
    assert_eq!(
        fs::metadata(m.m("hl")).unwrap().ino(),
        fs::metadata(m.m("target")).unwrap().ino()
    );
}

#[test]
fn symlink_escape_is_resolved_by_the_kernel_not_the_daemon() {
    let m = TestMount::new();
    // A secret next to the backing tree, reachable from backing/sub/esc.
    let outside = m.scratch().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"secret").unwrap();
    fs::create_dir(m.b("sub")).unwrap();
    symlink("../../outside", m.b("sub/esc")).unwrap();
    assert_eq!(fs::read(m.b("sub/esc/secret")).unwrap(), b"secret");
    // Through the mount the link is a link, with the same text...
    assert!(
        fs::symlink_metadata(m.m("sub/esc"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::read_link(m.m("sub/esc")).unwrap(), Path::new("../../outside"));
    // ...resolved by the kernel relative to the mount, where it leads
    // nowhere: the daemon never follows a link out of its root.
    let expected = m.mnt().join("sub").join("../../outside/secret");
    assert!(
        !expected.exists(),
        "test layout: {} must not exist",
        expected.display()
    );
    assert_eq!(
        fs::read(m.m("sub/esc/secret")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    // An absolute link to / through the mount is served as a link, and
    // readdir of the mount never lists the host root.
    symlink("/", m.b("root")).unwrap();
    assert!(
        fs::symlink_metadata(m.m("root"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // A link replaced by a directory behind our back is served as what it is now.
    fs::remove_file(m.b("sub/esc")).unwrap();
    fs::create_dir(m.b("sub/esc")).unwrap();
    assert!(fs::symlink_metadata(m.m("sub/esc")).unwrap().is_dir());
    assert_eq!(
        fs::read(m.m("sub/esc/secret")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
}

#[test]
fn names_are_bytes_and_limited_to_255() {
    let m = TestMount::new();
    let latin1 = OsString::from_vec(vec![b'c', b'a', b'f', 0xe9]);
    let invalid = OsString::from_vec(vec![0xff, 0xfe, b'x']);
    for name in [&latin1, &invalid] {
        m.both("create non-utf8", |r| fs::write(r.join(name), b"n"))
            .unwrap();
        m.both("read non-utf8", |r| fs::read(r.join(name))).unwrap();
    }
    let mut listed: Vec<OsString> = fs::read_dir(m.mnt())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    listed.sort();
    let mut expected = vec![latin1.clone(), invalid.clone()];
    expected.sort();
    assert_eq!(listed, expected);
    let n255 = "n".repeat(255);
    let n256 = "n".repeat(256);
    m.both("255-byte name", |r| fs::write(r.join(&n255), b"ok"))
        .unwrap();
    m.both("255-byte mkdir", |r| {
        fs::create_dir(r.join(format!("d{}", &n255[1..])))
    })
    .unwrap();
    let e = m
        .both("256-byte name", |r| fs::write(r.join(&n256), b"no"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
    let e = m
        .both("256-byte lookup", |r| fs::metadata(r.join(&n256)).map(|_| ()))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
    assert_same_tree(&m.backing(), &m.twin());
}

#[test]
fn ten_thousand_entry_directory() {
    let m = TestMount::new();
    fs::create_dir(m.b("big")).unwrap();
    for i in 0..10_000 {
        File::create(m.b(format!("big/entry-{i:05}"))).unwrap();
    }
    let mut via_mount: Vec<OsString> = fs::read_dir(m.m("big"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut backing: Vec<OsString> = fs::read_dir(m.b("big"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    via_mount.sort();
    backing.sort();
    assert_eq!(via_mount.len(), 10_000);
    assert_eq!(via_mount, backing);
    // d_type and d_ino agree with stat through the mount.
    for e in fs::read_dir(m.m("big")).unwrap().take(50) {
        let e = e.unwrap();
        assert!(e.file_type().unwrap().is_file());
        assert_eq!(e.ino(), fs::metadata(e.path()).unwrap().ino());
    }
}

#[test]
fn xattrs() {
    let m = TestMount::new();
    m.seed_file("f", b"x");
    let set = |p: &Path, k: &str, v: &[u8], flags: i32| {
        let k = CString::new(k).unwrap();
        // SAFETY: NUL-terminated strings and buffers that outlive the call, with their true lengths.
        rc(unsafe { libc::setxattr(c(p).as_ptr(), k.as_ptr(), v.as_ptr().cast(), v.len(), flags) })
    };
    let get = |p: &Path, k: &str| -> io::Result<Vec<u8>> {
        let k = CString::new(k).unwrap();
        let mut buf = vec![0u8; 256];
        // SAFETY: NUL-terminated strings and buffers that outlive the call, with their true lengths.
        let n = unsafe { libc::getxattr(c(p).as_ptr(), k.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    };
    let list = |p: &Path| -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 1024];
        // SAFETY: NUL-terminated strings and buffers that outlive the call, with their true lengths.
        let n = unsafe { libc::listxattr(c(p).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    };
    m.both("setxattr", |r| set(&r.join("f"), "user.a", b"1", 0))
        .unwrap();
    m.both("setxattr create existing", |r| {
        set(&r.join("f"), "user.a", b"2", libc::XATTR_CREATE)
    })
    .unwrap_err();
    m.both("setxattr replace missing", |r| {
        set(&r.join("f"), "user.b", b"2", libc::XATTR_REPLACE)
    })
    .unwrap_err();
    m.both("setxattr b", |r| set(&r.join("f"), "user.b", b"bee", 0))
        .unwrap();
    m.both("getxattr", |r| get(&r.join("f"), "user.b")).unwrap();
    m.both("getxattr missing", |r| get(&r.join("f"), "user.none"))
        .unwrap_err();
    m.both("listxattr", |r| list(&r.join("f"))).unwrap();
    m.both("getxattr size query", |r| {
        let k = CString::new("user.b").unwrap();
        // SAFETY: NUL-terminated strings and buffers that outlive the call, with their true lengths.
        let n = unsafe { libc::getxattr(c(&r.join("f")).as_ptr(), k.as_ptr(), std::ptr::null_mut(), 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n)
        }
    })
    .unwrap();
    m.both("getxattr small buffer", |r| {
        let k = CString::new("user.b").unwrap();
        let mut b = [0u8; 1];
        // SAFETY: NUL-terminated strings and buffers that outlive the call, with their true lengths.
        let n = unsafe { libc::getxattr(c(&r.join("f")).as_ptr(), k.as_ptr(), b.as_mut_ptr().cast(), 1) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n)
        }
    })
    .unwrap_err();
    m.both("removexattr", |r| {
        let k = CString::new("user.a").unwrap();
        // SAFETY: NUL-terminated strings and buffers that outlive the call, with their true lengths.
        rc(unsafe { libc::removexattr(c(&r.join("f")).as_ptr(), k.as_ptr()) })
    })
    .unwrap();
    m.both("listxattr after remove", |r| list(&r.join("f"))).unwrap();
}

#[test]
fn sparse_gigabyte_file_fallocate_lseek_copy_file_range() {
    let m = TestMount::new();
    const GIB: u64 = 1 << 30;
    m.both("sparse 1 GiB", |r| {
        let f = File::create(r.join("sparse"))?;
        f.set_len(GIB)?;
        f.write_all_at(b"middle", GIB / 2)?;
        f.write_all_at(b"end", GIB - 3)?;
        Ok(())
    })
    .unwrap();
    let (a, b) = (
        fs::metadata(m.m("sparse")).unwrap(),
        fs::metadata(m.b("sparse")).unwrap(),
    );
    assert_eq!(a.len(), GIB);
    assert_eq!((a.len(), a.blocks()), (b.len(), b.blocks()));
    assert!(
        a.blocks() * 512 < 16 << 20,
        "the file stays sparse: {} blocks",
        a.blocks()
    );
    m.both("read middle", |r| {
        let mut buf = [0u8; 6];
        File::open(r.join("sparse"))?.read_exact_at(&mut buf, GIB / 2)?;
        Ok(buf)
    })
    .unwrap();
    m.both("read hole", |r| {
        let mut buf = [1u8; 4096];
        File::open(r.join("sparse"))?.read_exact_at(&mut buf, 4096)?;
        Ok(buf.iter().all(|&b| b == 0))
    })
    .unwrap();
    let seek = |r: &Path, off: i64, whence: i32| -> io::Result<i64> {
        let f = File::open(r.join("sparse"))?;
        // SAFETY: a descriptor this test owns; no memory is passed.
        let n = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n)
        }
    };
    let (a, b) = (
        seek(&m.mnt(), 0, libc::SEEK_DATA),
        seek(&m.backing(), 0, libc::SEEK_DATA),
    );
    assert_eq!(a.unwrap(), b.unwrap());
    let (a, b) = (
        seek(&m.mnt(), (GIB / 2) as i64, libc::SEEK_HOLE),
        seek(&m.backing(), (GIB / 2) as i64, libc::SEEK_HOLE),
    );
    assert_eq!(a.unwrap(), b.unwrap());
    assert_eq!(
        seek(&m.mnt(), GIB as i64 + 10, libc::SEEK_DATA)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENXIO)
    );
    m.both("fallocate", |r| {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(r.join("alloc"))?;
        // SAFETY: NUL-terminated strings and buffers that outlive the call, with their true lengths.
        rc(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 1 << 20) })?;
        // SAFETY: NUL-terminated strings and buffers that outlive the call, with their true lengths.
        rc(unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20) })?;
        Ok(f.metadata()?.len())
    })
    .unwrap();
    m.both("punch hole", |r| {
        let f = OpenOptions::new().write(true).open(r.join("alloc"))?;
        f.write_all_at(&[7u8; 8192], 0)?;
        // SAFETY: NUL-terminated strings and buffers that outlive the call, with their true lengths.
        rc(unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                4096,
            )
        })?;
        let mut buf = [0u8; 8192];
        f.read_exact_at(&mut buf, 0)
            .or_else(|_| File::open(r.join("alloc"))?.read_exact_at(&mut buf, 0))?;
        Ok((buf[0], buf[4096]))
    })
    .unwrap();
    m.both("copy_file_range", |r| {
        fs::write(r.join("src"), vec![9u8; 100_000])?;
        let a = File::open(r.join("src"))?;
        let b = File::create(r.join("dst"))?;
        let mut copied = 0;
        while copied < 100_000 {
            // SAFETY: a descriptor this test owns; no memory is passed.
            let n = unsafe {
                libc::copy_file_range(
                    a.as_raw_fd(),
                    std::ptr::null_mut(),
                    b.as_raw_fd(),
                    std::ptr::null_mut(),
                    100_000 - copied,
                    0,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                break;
            }
            copied += n as usize;
        }
        Ok(copied)
    })
    .unwrap();
    assert_eq!(fs::read(m.m("dst")).unwrap(), vec![9u8; 100_000]);
}

#[test]
fn statfs_matches_backing() {
    let m = TestMount::new();
    let sv = |p: &Path| {
        // SAFETY: statvfs is plain data: all zeroes is a valid value.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: NUL-terminated strings and buffers that outlive the call, with their true lengths.
        rc(unsafe { libc::statvfs(c(p).as_ptr(), &mut s) }).unwrap();
        s
    };
    let (a, b) = (sv(&m.mnt()), sv(&m.backing()));
    assert_eq!(
        (a.f_bsize, a.f_frsize, a.f_blocks, a.f_files, a.f_namemax),
        (b.f_bsize, b.f_frsize, b.f_blocks, b.f_files, b.f_namemax)
    );
}

#[test]
fn fsync_and_close_reach_the_backing_file() {
    let m = TestMount::new();
    let mut f = File::create(m.m("durable")).unwrap();
    f.write_all(b"committed").unwrap();
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    // Written data is in the backing file before close (no write-back cache).
    assert_eq!(fs::read(m.b("durable")).unwrap(), b"committed");
    drop(f);
    let dir = File::open(m.mnt()).unwrap();
    dir.sync_all().unwrap();
    assert_eq!(fs::metadata(m.m("durable")).unwrap().len(), 9);
}

#[test]
fn changes_behind_the_mount_are_seen_at_once_with_offload_off() {
    let m = TestMount::new();
    fs::write(m.b("f"), b"v1").unwrap();
    assert_eq!(fs::read(m.m("f")).unwrap(), b"v1");
    fs::write(m.b("f"), b"version 2").unwrap();
    assert_eq!(fs::read(m.m("f")).unwrap(), b"version 2");
    assert_eq!(fs::metadata(m.m("f")).unwrap().len(), 9);
    fs::remove_file(m.b("f")).unwrap();
    assert_eq!(
        fs::metadata(m.m("f")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    fs::create_dir(m.b("newdir")).unwrap();
    assert!(fs::metadata(m.m("newdir")).unwrap().is_dir());
}

#[test]
fn concurrent_writers_and_readers() {
    let m = TestMount::new();
    let mnt = m.mnt();
    // Each writer owns a file and a 64 KiB region of a shared file. The
    // files get their final size before any thread starts: a plain-FUSE
    // reader racing a writer that *extends* a file can see zeros up to an
    // i_size that changed mid-read (FUSE page-cache semantics, not a daemon
    // fault), so writers rewrite in place while readers read.
    File::create(m.m("shared")).unwrap().set_len(8 * 65536).unwrap();
    for i in 0..8u8 {
        fs::write(m.m(format!("w{i}")), vec![i; 20_000]).unwrap();
    }
    let writers: Vec<_> = (0..8u8)
        .map(|i| {
            let mnt = mnt.clone();
            std::thread::spawn(move || {
                let data = vec![i; 65536];
                let own = mnt.join(format!("w{i}"));
                let f = OpenOptions::new().write(true).open(&own).unwrap();
                for round in 0..20 {
                    f.write_all_at(&data[round * 1000..(round + 1) * 1000], (round * 1000) as u64)
                        .unwrap();
                }
                let f = OpenOptions::new().write(true).open(mnt.join("shared")).unwrap();
                for chunk in 0..16 {
                    f.write_all_at(&data[..4096], i as u64 * 65536 + chunk * 4096)
                        .unwrap();
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let mnt = mnt.clone();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    for i in 0..8u8 {
                        if let Ok(d) = fs::read(mnt.join(format!("w{i}"))) {
                            // A reader never sees another writer's bytes or garbage.
                            assert!(d.iter().all(|&b| b == i), "foreign bytes in w{i}");
                        }
                    }
                }
            })
        })
        .collect();
    for t in writers.into_iter().chain(readers) {
        t.join().unwrap();
    }
    let shared = fs::read(m.b("shared")).unwrap();
    for i in 0..8 {
        assert!(shared[i * 65536..(i + 1) * 65536].iter().all(|&b| b == i as u8));
        assert_eq!(fs::read(m.b(format!("w{i}"))).unwrap(), vec![i as u8; 20_000]);
    }
    assert_eq!(fs::read(m.m("shared")).unwrap(), shared);
}

#[test]
fn killed_daemon_gives_enotconn_and_remount_works() {
    let mut m = TestMount::new();
    fs::write(m.m("kept"), b"safe").unwrap();
    // A writer with a file open when the daemon dies.
    let mut f = File::create(m.m("half")).unwrap();
    f.write_all(b"first").unwrap();
    m.kill_daemon();
    let mnt = m.mnt();
    let err = within(Duration::from_secs(10), move || {
        fs::metadata(mnt.join("kept")).unwrap_err()
    });
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN));
    let werr = within(Duration::from_secs(10), move || {
        f.write_all(b"second").and_then(|_| f.sync_all())
    });
    assert!(werr.is_err(), "writes after the daemon died must fail");
    // Data written before the crash is on the backing dir, nothing lost.
    assert_eq!(fs::read(m.b("kept")).unwrap(), b"safe");
    assert_eq!(fs::read(m.b("half")).unwrap(), b"first");
    // Mounting again on the same mount point clears the dead mount.
    m.start();
    assert_eq!(fs::read(m.m("kept")).unwrap(), b"safe");
    let st = m.unmount();
    assert!(st.success(), "daemon exit status {st}");
}

#[test]
fn mem_backend_serves_a_tree() {
    let m = TestMount::with_args(&["--backend", "mem"]);
    fs::create_dir_all(m.m("a/b/c")).unwrap();
    fs::write(m.m("a/b/c/f"), b"in memory").unwrap();
    symlink("c/f", m.m("a/b/l")).unwrap();
    assert_eq!(fs::read(m.m("a/b/l")).unwrap(), b"in memory");
    fs::rename(m.m("a/b/c/f"), m.m("a/g")).unwrap();
    assert_eq!(fs::read(m.m("a/g")).unwrap(), b"in memory");
    assert!(fs::read_dir(m.m("a/b/c")).unwrap().next().is_none());
    // Nothing reaches the backing directory.
    assert!(fs::read_dir(m.backing()).unwrap().next().is_none());
}

#[test]
fn sim_backend_injects_errors_without_losing_data() {
    let m = TestMount::with_config(
        "backend = \"sim\"\n[sim]\nmeta_us = 0\nsmall_read_us = 0\nwrite_us = 0\nerror_rate = 1.0\nfault_errno = 5\n",
        &[],
    );
    fs::write(m.b("f"), b"kept").unwrap();
    let e = fs::metadata(m.m("f")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    let e = fs::write(m.m("g"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert_eq!(fs::read(m.b("f")).unwrap(), b"kept");
    assert!(!m.b("g").exists());
}

#[test]
fn nlookup_counts_balance_after_unmount() {
    // Lookups and forgets must balance: the daemon logs a warning and
    // clamps on a forget it never gave (a debug build asserts). Exercise
    // lookups from many paths, then drop caches to force FORGETs.
    let m = TestMount::new();
    for i in 0..200 {
        fs::write(m.b(format!("f{i}")), b"x").unwrap();
    }
    for _ in 0..3 {
        for i in 0..200 {
            fs::metadata(m.m(format!("f{i}"))).unwrap();
        }
    }
    fs::write("/proc/sys/vm/drop_caches", b"2").unwrap();
    let st = m.unmount();
    assert!(
        st.success(),
        "daemon exited with {st} (a debug assertion on lookup counts fires as a panic)"
    );
}

#[test]
fn open_unlinked_file_stays_readable() {
    let m = TestMount::new();
    fs::write(m.m("gone"), b"still here").unwrap();
    let mut f = File::open(m.m("gone")).unwrap();
    fs::remove_file(m.m("gone")).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
    assert!(!m.b("gone").exists());
}

#[test]
fn o_tmpfile_and_linkat_as_on_a_plain_directory() {
    // Editors, package managers and atomic-replace code: an unnamed file,
    // written, then given a name with linkat(2); O_EXCL makes it
    // unlinkable; the refusals are the kernel's.
    let script = r#"
import ctypes, errno, os, sys
R = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
def linkat(fd, dst):
    # linkat(2) of the open file through its /proc magic link, following it
    # (AT_SYMLINK_FOLLOW), as the O_TMPFILE man page shows.
    if libc.linkat(-100, b"/proc/self/fd/%d" % fd, -100, dst.encode(), 0x400) != 0:
        raise OSError(ctypes.get_errno(), "linkat")
def t(what, f):
    try:
        r = f()
        print(what, "ok", r if r is not None else "")
    except OSError as e:
        print(what, "error", errno.errorcode[e.errno])
os.mkdir(R + "/d")
fd = os.open(R + "/d", os.O_TMPFILE | os.O_RDWR, 0o640)
os.write(fd, b"tmp data")
st = os.fstat(fd)
print("nlink", st.st_nlink, "mode", oct(st.st_mode), "size", st.st_size)
print("listing before", sorted(os.listdir(R + "/d")))
t("link", lambda: linkat(fd, R + "/d/named"))
os.write(fd, b" more")
os.close(fd)
print("read", open(R + "/d/named", "rb").read())
st = os.stat(R + "/d/named")
print("nlink", st.st_nlink, "mode", oct(st.st_mode), "size", st.st_size)
print("listing after", sorted(os.listdir(R + "/d")))
fd = os.open(R + "/d", os.O_TMPFILE | os.O_RDWR | os.O_EXCL, 0o600)
t("link of an O_EXCL tmpfile", lambda: linkat(fd, R + "/d/excl"))
os.close(fd)
t("tmpfile read-only", lambda: os.open(R + "/d", os.O_TMPFILE | os.O_RDONLY))
t("tmpfile in a file", lambda: os.open(R + "/d/named", os.O_TMPFILE | os.O_RDWR))
t("tmpfile in a missing dir", lambda: os.open(R + "/nope", os.O_TMPFILE | os.O_RDWR))
# Replace a file atomically, as editors do.
fd = os.open(R + "/d", os.O_TMPFILE | os.O_WRONLY, 0o644)
os.write(fd, b"new version")
t("link as temp name", lambda: linkat(fd, R + "/d/.tmp"))
os.close(fd)
os.rename(R + "/d/.tmp", R + "/d/named")
print("replaced", open(R + "/d/named", "rb").read(), sorted(os.listdir(R + "/d")))
"#;
    for tier in ["off", "kernel"] {
        let m = TestMount::with_args(&["--offload", tier]);
        let run = |root: &Path| {
            let o = std::process::Command::new("python3")
                .arg("-c")
                .arg(script)
                .arg(root)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let (plain, mount) = (run(&m.twin()), run(&m.mnt()));
        assert!(
            plain.contains("link ok"),
            "the script fails on the plain directory:\n{plain}"
        );
        assert_eq!(
            mount, plain,
            "{tier}: efuse (left) and the plain directory (right) differ"
        );
        assert_eq!(fs::read(m.b("d/named")).unwrap(), b"new version");
    }
}
