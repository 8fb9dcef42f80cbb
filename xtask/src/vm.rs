//! The patched whole kernel (`cargo xtask kernel`, `cargo xtask vm
//! --patched`) and the qemu runner. The default VM kernel is Debian's
//! stock kernel with efuse.ko (`crate::stock`); this one is for people who
//! build their own kernel with the hook built in.
//!
//! The kernel is Debian's linux-source-6.12 with `kernel/patches/*.patch`
//! applied and configured from `make tinyconfig` plus
//! `kernel/config.fragment`: a few MB bzImage with no modules that boots in
//! seconds. Builds are cached under /var/cache/efuse/kernel/patched, keyed
//! by a hash of the patches, the fragment and the source package version,
//! so a second run costs nothing and a changed patch rebuilds.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{apt_install, root, run};

/// What building and booting the kernel needs.
const KERNEL_PACKAGES: &[&str] = &[
    "linux-source-6.12",
    "build-essential",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "dwarves",
    "cpio",
    "xz-utils",
    "qemu-system-x86",
    "busybox-static",
];

const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";
/// Where kernels and modules are cached (`EFUSE_KERNEL_CACHE` overrides).
pub fn cache_root() -> PathBuf {
    std::env::var_os("EFUSE_KERNEL_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/efuse/kernel"), PathBuf::from)
}

fn cache_dir() -> PathBuf {
    cache_root().join("patched")
}

/// FNV-1a's offset basis.
pub const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, 64 bits: a stable cache key (std's hasher may change).
pub fn fnv(data: &[u8], mut h: u64) -> u64 {
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn patches() -> anyhow::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("kernel/patches"))
        .context("kernel/patches")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "patch"))
        .collect();
    v.sort();
    Ok(v)
}

fn cache_key() -> anyhow::Result<String> {
    let mut h = FNV_INIT;
    for p in patches()? {
        h = fnv(&std::fs::read(&p)?, h);
    }
    h = fnv(&std::fs::read(root().join("kernel/config.fragment"))?, h);
    let version = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "linux-source-6.12"])
        .output()
        .context("dpkg-query")?;
    h = fnv(&version.stdout, h);
    Ok(format!("{h:016x}"))
}

/// Build (or find in the cache) the patched kernel; returns the bzImage.
pub fn patched_kernel() -> anyhow::Result<PathBuf> {
    apt_install(KERNEL_PACKAGES)?;
    let key = cache_key()?;
    let cache_dir = cache_dir();
    let cache = cache_dir.as_path();
    let image = cache.join(format!("bzImage-{key}"));
    if image.exists() {
        eprintln!("xtask: kernel {} (cached)", image.display());
        return Ok(image);
    }
    let tree = cache.join("linux-source-6.12");
    let stamp = tree.join(".efuse-key");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(key.as_str()) {
        // A fresh tree: patches do not apply twice.
        let _ = std::fs::remove_dir_all(&tree);
        std::fs::create_dir_all(cache)?;
        eprintln!("xtask: unpacking {SOURCE_TARBALL}");
        run(Command::new("tar")
            .arg("-C")
            .arg(cache)
            .arg("-xaf")
            .arg(SOURCE_TARBALL))?;
        for p in patches()? {
            run(Command::new("patch")
                .arg("-p1")
                .arg("--forward")
                .arg("--quiet")
                .arg("-d")
                .arg(&tree)
                .arg("-i")
                .arg(&p))?;
        }
        run(Command::new("make").arg("-C").arg(&tree).arg("tinyconfig"))?;
        run(Command::new(tree.join("scripts/kconfig/merge_config.sh"))
            .current_dir(&tree)
            .args(["-m", ".config"])
            .arg(root().join("kernel/config.fragment")))?;
        run(Command::new("make").arg("-C").arg(&tree).arg("olddefconfig"))?;
        check_config(&tree)?;
        std::fs::write(&stamp, &key)?;
    }
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get() + 1);
    let started = std::time::Instant::now();
    run(Command::new("make")
        .arg("-C")
        .arg(&tree)
        .arg(format!("-j{jobs}"))
        .arg("bzImage"))?;
    eprintln!("xtask: kernel built in {:.0?}", started.elapsed());
    std::fs::copy(tree.join("arch/x86/boot/bzImage"), &image)?;
    // A tree is only reused for the same key, whose image is now cached:
    // give the 2 GB back.
    let _ = std::fs::remove_dir_all(&tree);
    Ok(image)
}

/// Every `CONFIG_X=y` of the fragment must have survived olddefconfig (a
/// missing dependency silently drops an option).
fn check_config(tree: &Path) -> anyhow::Result<()> {
    let have = std::fs::read_to_string(tree.join(".config"))?;
    let want = std::fs::read_to_string(root().join("kernel/config.fragment"))?;
    let lost: Vec<&str> = want
        .lines()
        .filter(|l| l.starts_with("CONFIG_") && l.ends_with("=y"))
        .filter(|l| !have.lines().any(|h| h == *l))
        .collect();
    if !lost.is_empty() {
        bail!(
            "kernel config lost options (unmet dependencies?): {}",
            lost.join(", ")
        );
    }
    Ok(())
}

/// Boot `guest`, run `cmd` with `files` in /bin; returns the guest exit status.
pub fn run_in_vm(
    guest: &efuse_tests::vm::Guest,
    files: &[PathBuf],
    cmd: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<i32> {
    let r = efuse_tests::vm::run(guest, files, cmd, timeout).context("running the VM")?;
    r.code.with_context(
        || "the VM exited without reporting a status (kernel panic or timeout; see its console above)",
    )
}
