//! Export handles (name_to_handle_at / open_by_handle_at), as NFS
//! re-export and handle-based tools use them, compared with a plain
//! directory: a handle opens the same file for as long as it exists, also
//! after the kernel forgot the inode, and fails with ESTALE once it is gone.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use efuse_tests::TestMount;

/// struct file_handle with room for 128 bytes of handle.
fn handle_of(p: &Path) -> std::io::Result<(Vec<u8>, OwnedFd)> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 8 + 128];
    buf[0..4].copy_from_slice(&128u32.to_ne_bytes());
    let mut mount_id: libc::c_int = 0;
    // SAFETY: valid C string, a file_handle of 128 bytes and an int.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            c.as_ptr(),
            buf.as_mut_ptr(),
            &mut mount_id,
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The mount to open handles on: its root.
    let mut root = p.to_path_buf();
    while let Some(parent) = root.parent() {
        if fs::metadata(parent)
            .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
            .ok()
            != fs::metadata(p)
                .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
                .ok()
        {
            break;
        }
        root = parent.to_path_buf();
    }
    let f = fs::File::open(&root)?;
    Ok((buf, f.into()))
}

fn open_handle(h: &[u8], mount: &OwnedFd, flags: i32) -> std::io::Result<fs::File> {
    let mut h = h.to_vec();
    // SAFETY: a valid mount fd and file_handle.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            h.as_mut_ptr(),
            flags,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor we own.
    Ok(fs::File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

fn read_handle(h: &[u8], mount: &OwnedFd) -> Result<Vec<u8>, Option<i32>> {
    use std::io::Read;
    let mut f = open_handle(h, mount, libc::O_RDONLY).map_err(|e| e.raw_os_error())?;
    let mut v = Vec::new();
    f.read_to_end(&mut v).map_err(|e| e.raw_os_error())?;
    Ok(v)
}

fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", b"2").unwrap();
}

#[test]
fn handles_open_the_same_file_while_it_exists_then_estale() {
    for setup in [
        &["--offload", "off"][..],
        &["--offload", "kernel"],
        &["--offload", "kernel", "--backend", "mem"],
    ] {
        let m = TestMount::with_args(setup);
        for root in [m.mnt(), m.twin()] {
            fs::create_dir_all(root.join("d/e")).unwrap();
            fs::write(root.join("d/e/f"), b"first").unwrap();
        }
        let mut results = Vec::new();
        for root in [m.mnt(), m.twin()] {
            let (hf, mnt) = handle_of(&root.join("d/e/f")).unwrap();
            let (hd, _) = handle_of(&root.join("d/e")).unwrap();
            let mut r = vec![format!("{:?}", read_handle(&hf, &mnt))];
            // After the kernel forgot the inodes (no dentry, no inode cached).
            drop_caches();
            r.push(format!("{:?}", read_handle(&hf, &mnt)));
            // A directory handle opens the directory; ".." from it works.
            let d = open_handle(&hd, &mnt, libc::O_RDONLY | libc::O_DIRECTORY).map(|d| {
                let c = CString::new("..").unwrap();
                // SAFETY: valid dirfd and C string.
                let fd =
                    unsafe { libc::openat(d.as_raw_fd(), c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
                // SAFETY: plain C data: all zeroes is a valid value.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: valid fd and out pointer.
                let rc = unsafe { libc::fstat(fd, &mut st) };
                // SAFETY: our fd.
                unsafe { libc::close(fd) };
                (rc, st.st_mode & libc::S_IFMT)
            });
            r.push(format!("{:?}", d.map_err(|e| e.raw_os_error())));
            drop_caches();
            let d2 = open_handle(&hd, &mnt, libc::O_RDONLY | libc::O_DIRECTORY)
                .map(|_| ())
                .map_err(|e| e.raw_os_error());
            r.push(format!("dir after drop: {d2:?}"));
            // Renamed: the handle still names it.
            fs::rename(root.join("d/e/f"), root.join("d/g")).unwrap();
            drop_caches();
            r.push(format!("{:?}", read_handle(&hf, &mnt)));
            // Replaced under the same name by another file: the handle
            // still opens the old one (held by nobody now: gone) -> ESTALE.
            fs::remove_file(root.join("d/g")).unwrap();
            fs::write(root.join("d/g"), b"second").unwrap();
            // Through FUSE the kernel may still hold the unlinked inode for
            // a moment (the RELEASE of the last open is asynchronous), and
            // a handle opens it until then; ext4 frees it at once. What
            // both guarantee: the handle never opens the new file, and it
            // is ESTALE once the old one is gone.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            let last = loop {
                drop_caches();
                let got = read_handle(&hf, &mnt);
                assert_ne!(
                    got.as_deref().ok(),
                    Some(&b"second"[..]),
                    "a handle opened another file"
                );
                if got.is_err() || std::time::Instant::now() > deadline {
                    break got;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            r.push(format!("{last:?}"));
            results.push(r);
        }
        assert_eq!(
            results[0], results[1],
            "{setup:?}: handles on efuse (left) and a plain directory (right) differ"
        );
        assert!(
            results[0][0].contains("[102, 105, 114, 115, 116]"),
            "{setup:?}: {:?}",
            results[0]
        );
        assert!(
            results[0][5].contains(&libc::ESTALE.to_string()),
            "{setup:?}: {:?}",
            results[0]
        );
    }
}

#[test]
fn handles_survive_a_daemon_restart() {
    // ext4 keeps a handle valid for as long as its file exists, across
    // unmounts; so does efuse over a tree whose filesystem opens by handle
    // (the daemon that exits cleanly leaves its table to the next one).
    for setup in [
        &["--offload", "off"][..],
        &["--offload", "kernel"],
        &["--offload", "kernel", "-o", "inodes=descriptors"],
    ] {
        let mut m = TestMount::with_args(setup);
        for root in [m.mnt(), m.twin()] {
            fs::create_dir_all(root.join("d/e")).unwrap();
            fs::write(root.join("d/e/f"), b"kept").unwrap();
            fs::write(root.join("d/gone"), b"x").unwrap();
        }
        let handles = |root: &Path| ["d/e/f", "d/e", "d/gone"].map(|p| handle_of(&root.join(p)).unwrap().0);
        let hm = handles(&m.mnt());
        let ht = handles(&m.twin());
        // One of them only ever looked up by the new daemon, before use.
        m.restart();
        fs::metadata(m.m("d/e/f")).unwrap();
        for root in [m.b("."), m.twin()] {
            fs::remove_file(root.join("d/gone")).unwrap();
        }
        let mut results = Vec::new();
        for (root, h) in [(m.mnt(), &hm), (m.twin(), &ht)] {
            let mnt: OwnedFd = fs::File::open(&root).unwrap().into();
            let mut r = vec![format!("{:?}", read_handle(&h[0], &mnt))];
            let d = open_handle(&h[1], &mnt, libc::O_RDONLY | libc::O_DIRECTORY)
                .map(|d| {
                    fs::read_dir(format!("/proc/self/fd/{}", d.as_raw_fd()))
                        .unwrap()
                        .count()
                })
                .map_err(|e| e.raw_os_error());
            r.push(format!("{d:?}"));
            r.push(format!("{:?}", read_handle(&h[2], &mnt)));
            results.push(r);
        }
        assert_eq!(
            results[0], results[1],
            "{setup:?}: handles across a restart on efuse (left) and a plain directory (right) differ"
        );
        assert!(results[0][0].contains("[107, 101, 112, 116]"), "{results:?}");
        assert!(results[0][2].contains(&libc::ESTALE.to_string()), "{results:?}");
    }
}
