//! Extended attributes: served where the backend keeps them (`-o
//! xattr=auto` over `dir` on a filesystem with xattrs) exactly as the
//! backing directory answers them; with `-o xattr=off` every xattr call
//! fails with EOPNOTSUPP, as on a filesystem without extended attributes,
//! changes nothing, and only the first call of each kind reaches the daemon.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use efuse_tests::{TestMount, daemon_count, mount_stats};

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// getxattr: the value, or the errno.
fn get(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let (p, n) = (c(p), CString::new(name).unwrap());
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of its length.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(errno());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn set(p: &Path, name: &str, v: &[u8]) -> Result<(), i32> {
    let (p, n) = (c(p), CString::new(name).unwrap());
    // SAFETY: valid C strings and value.
    let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    if r < 0 { Err(errno()) } else { Ok(()) }
}

fn list(p: &Path) -> Result<Vec<u8>, i32> {
    let p = c(p);
    let mut buf = vec![0u8; 4096];
    // SAFETY: a valid C string and a buffer of its length.
    let r = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(errno());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn remove(p: &Path, name: &str) -> Result<(), i32> {
    let (p, n) = (c(p), CString::new(name).unwrap());
    // SAFETY: valid C strings.
    let r = unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) };
    if r < 0 { Err(errno()) } else { Ok(()) }
}

#[test]
fn xattrs_behave_as_on_the_backing_directory() {
    for tier in ["off", "kernel"] {
        let m = TestMount::with_args(&["--offload", tier]);
        m.seed_file("f", b"x");
        fs::write(m.b("g"), b"y").unwrap();
        // A missing attribute, through the mount and on the directory.
        assert_eq!(get(&m.m("f"), "user.none"), get(&m.b("g"), "user.none"), "{tier}");
        assert_eq!(get(&m.m("f"), "user.none"), Err(libc::ENODATA), "{tier}");
        set(&m.m("f"), "user.a", b"1").unwrap();
        set(&m.b("g"), "user.a", b"1").unwrap();
        assert_eq!(get(&m.m("f"), "user.a"), get(&m.b("g"), "user.a"));
        assert_eq!(
            get(&m.b("f"), "user.a"),
            Ok(b"1".to_vec()),
            "written through to the backing file"
        );
        assert_eq!(list(&m.m("f")), list(&m.b("g")));
        assert_eq!(remove(&m.m("f"), "user.a"), remove(&m.b("g"), "user.a"));
        assert_eq!(remove(&m.m("f"), "user.a"), remove(&m.b("g"), "user.a"));
        assert_eq!(get(&m.m("f"), "user.a"), Err(libc::ENODATA));
    }
}

#[test]
fn xattr_off_answers_eopnotsupp_changes_nothing_and_the_kernel_stops_asking() {
    for tier in ["off", "kernel"] {
        let m = TestMount::with_args(&["--offload", tier, "-o", "xattr=off"]);
        m.seed_file("f", b"x");
        // An attribute the backing file has stays invisible and untouched.
        set(&m.b("f"), "user.kept", b"k").unwrap();
        for _ in 0..20 {
            assert_eq!(get(&m.m("f"), "user.kept"), Err(libc::EOPNOTSUPP), "{tier}");
            assert_eq!(list(&m.m("f")), Err(libc::EOPNOTSUPP), "{tier}");
            assert_eq!(set(&m.m("f"), "user.a", b"1"), Err(libc::EOPNOTSUPP), "{tier}");
            assert_eq!(remove(&m.m("f"), "user.kept"), Err(libc::EOPNOTSUPP), "{tier}");
        }
        assert_eq!(
            get(&m.b("f"), "user.kept"),
            Ok(b"k".to_vec()),
            "a refused call changes nothing"
        );
        assert_eq!(
            get(&m.b("f"), "user.a"),
            Err(libc::ENODATA),
            "a refused call changes nothing"
        );
        // The file itself still works.
        assert_eq!(fs::read(m.m("f")).unwrap(), b"x");
        let s = mount_stats(&m.mnt());
        for op in ["GETXATTR", "LISTXATTR", "SETXATTR", "REMOVEXATTR"] {
            assert!(
                daemon_count(&s, op) <= 1,
                "{tier}: {op} reached the daemon {} times; after the first ENOSYS the kernel answers",
                daemon_count(&s, op)
            );
        }
    }
}
