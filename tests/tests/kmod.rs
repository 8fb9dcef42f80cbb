//! `efuse kmod`: building efuse.ko for a kernel, its status, and the
//! refusals that name what is missing.
//!
//! The build test builds for Debian's stock kernel that the VM suite boots
//! (`cargo xtask test` fetches its headers and fs/fuse and names them in
//! EFUSE_KMOD_RELEASE, EFUSE_KMOD_BUILD and EFUSE_KMOD_SOURCE): the same
//! code path as `efuse kmod install` on that kernel, without loading (this
//! host's kernel is another). Loading and serving are the VM suite's
//! (tests/bpf_vm.rs, which boots the module this builds the same way).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use efuse_tests::efuse;

fn os<'a>(v: &'a [&'a str]) -> Vec<&'a OsStr> {
    v.iter().map(OsStr::new).collect()
}

fn env_path(name: &str) -> PathBuf {
    std::env::var_os(name).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{name} is not set: run this test through `cargo xtask test`, which fetches Debian's kernel")
    })
}

#[test]
fn builds_the_module_for_debians_kernel() {
    let release = std::env::var("EFUSE_KMOD_RELEASE").unwrap_or_else(|_| {
        panic!("EFUSE_KMOD_RELEASE is not set: run this test through `cargo xtask test`")
    });
    let build = env_path("EFUSE_KMOD_BUILD");
    let source = env_path("EFUSE_KMOD_SOURCE");
    let dest = tempfile::tempdir().unwrap();
    let (code, out, err) = efuse(&[
        OsStr::new("kmod"),
        OsStr::new("install"),
        OsStr::new("--kernel"),
        OsStr::new(&release),
        OsStr::new("--build"),
        build.as_os_str(),
        OsStr::new("--source"),
        source.as_os_str(),
        OsStr::new("--dest"),
        dest.path().as_os_str(),
        OsStr::new("--no-load"),
    ]);
    assert_eq!(code, 0, "efuse kmod install failed:\n{out}\n{err}");
    let ko = dest.path().join("efuse.ko");
    assert!(out.contains(&*ko.to_string_lossy()), "{out}");
    let info = |field: &str| {
        let o = std::process::Command::new("modinfo")
            .args(["-F", field])
            .arg(&ko)
            .output()
            .expect("modinfo");
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    // Built for that kernel, versioned as efuse, named efuse.
    assert!(
        info("vermagic").starts_with(&format!("{release} ")),
        "{}",
        info("vermagic")
    );
    assert_eq!(info("version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(info("name"), "efuse");
    // No alias that would make the kernel load it for /dev/fuse or "fuse".
    assert_eq!(info("alias"), "", "module aliases");
    let bytes = std::fs::read(&ko).unwrap();
    let has = |s: &[u8]| bytes.windows(s.len()).any(|w| w == s);
    assert!(
        has(b"bpf_struct_ops_efuse_bpf_ops"),
        "no struct_ops type in the module's BTF"
    );
    assert!(
        has(b"efusectl\0") && has(b"efuseblk\0"),
        "renamed filesystem types"
    );
    // The kernel's ksymtab of the module is empty: nothing clashes with the
    // built-in FUSE's exports.
    let o = std::process::Command::new("readelf")
        .args(["-S", "-W"])
        .arg(&ko)
        .output()
        .unwrap();
    let sections = String::from_utf8_lossy(&o.stdout);
    assert!(
        !sections.contains("__ksymtab"),
        "efuse.ko exports symbols:\n{sections}"
    );
}

#[test]
fn kernels_before_6_9_are_refused() {
    let dest = tempfile::tempdir().unwrap();
    let (code, _, err) = efuse(&[
        OsStr::new("kmod"),
        OsStr::new("install"),
        OsStr::new("--kernel"),
        OsStr::new("6.1.0-28-amd64"),
        OsStr::new("--dest"),
        dest.path().as_os_str(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("6.9") && err.contains("struct_ops"), "{err}");
    assert!(!dest.path().join("efuse.ko").exists());
}

#[test]
fn a_source_that_is_not_fuse_is_refused() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let not_src = tempfile::tempdir().unwrap();
    let build = tempfile::tempdir().unwrap();
    std::fs::write(build.path().join("Makefile"), "").unwrap();
    let (code, _, err) = efuse(&[
        OsStr::new("kmod"),
        OsStr::new("install"),
        OsStr::new("--kernel"),
        OsStr::new(release.trim()),
        OsStr::new("--build"),
        build.path().as_os_str(),
        OsStr::new("--source"),
        not_src.path().as_os_str(),
        OsStr::new("--no-load"),
    ]);
    assert_ne!(code, 0);
    if Path::new("/proc/modules").exists() {
        assert!(err.contains("fuse_i.h") || err.contains("6.9"), "{err}");
    } else {
        // This host: no loadable modules at all, said first.
        assert!(err.contains("CONFIG_MODULES"), "{err}");
    }
}

#[test]
fn status_says_what_serves_the_bpf_tier() {
    let (code, out, err) = efuse(&os(&["kmod", "status"]));
    assert_eq!(code, 0, "{err}");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(out.contains(&format!("kernel: {}", release.trim())), "{out}");
    let hook = out
        .lines()
        .find(|l| l.starts_with("bpf hook: "))
        .expect("a bpf hook line");
    let loaded = Path::new("/sys/module/efuse").exists();
    if !loaded {
        assert!(out.contains("loaded: no"), "{out}");
    }
    // The host's answer agrees with what a bpf mount would do.
    let btf = std::fs::read("/sys/kernel/btf/vmlinux").unwrap_or_default();
    let builtin = btf.windows(14).any(|w| w == b"efuse_bpf_ops\0");
    assert_eq!(hook.starts_with("bpf hook: none"), !builtin && !loaded, "{hook}");
}
