//! Debian's stock kernel and efuse.ko built for it (`cargo xtask kmod`,
//! the default kernel of `cargo xtask vm` and of the VM test suite).
//!
//! The kernel is the one users run, unmodified: Debian's
//! `linux-image-<abi>-cloud-amd64-unsigned`, fetched from the archive by
//! version and unpacked (not installed) under the cache, with its headers
//! (`linux-headers-<abi>-cloud-amd64`, `-common`, `linux-kbuild-<abi>`,
//! which ship the BTF-only vmlinux module BTF is generated against) and
//! fs/fuse from `linux-source-6.12` of the same version. efuse.ko is
//! prepared by kernel/module/prepare.sh and built with the headers'
//! Kbuild, cached by a hash of the patches, the module glue and the kernel
//! version. Nothing is installed on the host but build tools.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

use crate::{apt_install, root, run};

/// What fetching Debian's packages and building a module needs (the
/// kernel's Kbuild tools link libelf; BTF needs pahole from dwarves).
const PACKAGES: &[&str] = &[
    "build-essential",
    "patch",
    "kmod",
    "dwarves",
    "libelf1",
    "xz-utils",
    "cpio",
    "qemu-system-x86",
    "busybox-static",
];

/// The source package whose version picks the kernel.
const SOURCE_PACKAGE: &str = "linux-source-6.12";
/// Debian's kernel flavour the VM boots: small, serial console built in.
const FLAVOUR: &str = "cloud-amd64";

/// Debian's kernel, unpacked in the cache.
#[derive(Clone, Debug)]
pub struct StockKernel {
    /// Debian package version (`6.12.118-1~deb12u1`).
    pub version: String,
    /// Kernel release (`6.12.118+deb12-cloud-amd64`), as `uname -r` shows.
    pub release: String,
    /// The image, as Debian ships it.
    pub vmlinuz: PathBuf,
    /// The headers' build directory (`make -C` here, `M=` the module).
    pub build: PathBuf,
    /// The kernel's fs/fuse.
    pub fuse_src: PathBuf,
}

fn cache_dir() -> PathBuf {
    crate::vm::cache_root().join("debian")
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let o = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !o.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The candidate version of a package, from apt's lists.
fn candidate(package: &str) -> anyhow::Result<Option<String>> {
    let text = output(Command::new("apt-cache").args(["policy", package]))?;
    Ok(text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .filter(|v| *v != "(none)")
        .map(str::to_owned))
}

/// The kernel ABI name (`6.12.118+deb12`) whose image has version
/// `version`: the image packages are named by ABI, versioned by source.
fn abi_for(version: &str) -> anyhow::Result<String> {
    let names = output(Command::new("apt-cache").args([
        "search",
        "--names-only",
        &format!("^linux-image-6\\.12\\..*-{FLAVOUR}-unsigned$"),
    ]))?;
    for line in names.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if candidate(name)?.as_deref() == Some(version) {
            let abi = name
                .strip_prefix("linux-image-")
                .and_then(|n| n.strip_suffix(&format!("-{FLAVOUR}-unsigned")))
                .context("image package name")?;
            return Ok(abi.to_owned());
        }
    }
    bail!(
        "Debian's archive has no linux-image-*-{FLAVOUR}-unsigned of version {version} (the version \
         of {SOURCE_PACKAGE}); run apt-get update"
    )
}

/// Fetch (once) and unpack Debian's stock kernel of the version
/// `linux-source-6.12` has now, with its headers and fs/fuse.
pub fn kernel() -> anyhow::Result<StockKernel> {
    apt_install(PACKAGES)?;
    let mut version = candidate(SOURCE_PACKAGE)?;
    if version.is_none() {
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        version = candidate(SOURCE_PACKAGE)?;
    }
    let version = version.with_context(|| {
        format!("no {SOURCE_PACKAGE} in apt's lists: the VM kernel comes from bookworm-security (or trixie)")
    })?;
    let abi = abi_for(&version)?;
    let release = format!("{abi}-{FLAVOUR}");
    let dir = cache_dir().join(&version);
    let fsroot = dir.join("root");
    let stamp = dir.join(".complete");
    let k = StockKernel {
        vmlinuz: fsroot.join(format!("boot/vmlinuz-{release}")),
        build: fsroot.join(format!("usr/src/linux-headers-{release}")),
        fuse_src: dir.join("linux-source-6.12/fs/fuse"),
        version: version.clone(),
        release: release.clone(),
    };
    if stamp.exists() {
        eprintln!("xtask: Debian kernel {release} ({version}) (cached)");
        return Ok(k);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs)?;
    let started = std::time::Instant::now();
    let packages = [
        format!("linux-image-{release}-unsigned={version}"),
        format!("linux-headers-{release}={version}"),
        format!("linux-headers-{abi}-common={version}"),
        format!("linux-kbuild-{abi}={version}"),
        format!("{SOURCE_PACKAGE}={version}"),
    ];
    run(Command::new("apt-get")
        .arg("download")
        .arg("-q")
        .args(&packages)
        .current_dir(&debs))?;
    std::fs::create_dir_all(&fsroot)?;
    for e in std::fs::read_dir(&debs)? {
        let p = e?.path();
        let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if name.starts_with(SOURCE_PACKAGE) {
            // Only fs/fuse of the 150 MB source tarball.
            run(Command::new("sh")
                .arg("-c")
                .arg(
                    "dpkg-deb --fsys-tarfile \"$1\" | tar -xO ./usr/src/linux-source-6.12.tar.xz \
                     | xz -dc -T0 | tar -x -C \"$2\" --wildcards 'linux-source-6.12/fs/fuse/*'",
                )
                .arg("sh")
                .arg(&p)
                .arg(&dir))?;
        } else {
            run(Command::new("dpkg-deb").arg("-x").arg(&p).arg(&fsroot))?;
        }
    }
    // The headers' Makefile includes the -common one by its installed
    // path; point it into the cache.
    let makefile = k.build.join("Makefile");
    let text = std::fs::read_to_string(&makefile).context("the headers' Makefile")?;
    let src = fsroot.join("usr/src");
    std::fs::write(
        &makefile,
        text.replace("include /usr/src/", &format!("include {}/", src.display())),
    )?;
    for p in [&k.vmlinuz, &k.fuse_src.join("fuse_i.h"), &k.build.join("vmlinux")] {
        if !p.exists() {
            bail!("{} missing from Debian's packages of {version}", p.display());
        }
    }
    std::fs::remove_dir_all(&debs)?;
    std::fs::write(&stamp, &version)?;
    eprintln!(
        "xtask: fetched Debian kernel {release} ({version}) in {:.0?}",
        started.elapsed()
    );
    Ok(k)
}

/// FNV-1a over every file of the patch series and the module glue.
fn module_key(k: &StockKernel) -> anyhow::Result<String> {
    let mut h = crate::vm::FNV_INIT;
    for dir in ["kernel/patches", "kernel/module"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        files.sort();
        for f in files {
            h = crate::vm::fnv(f.file_name().unwrap_or_default().as_encoded_bytes(), h);
            h = crate::vm::fnv(&std::fs::read(&f)?, h);
        }
    }
    // The build steps themselves (`efuse kmod install`).
    h = crate::vm::fnv(&std::fs::read(root().join("efuse-daemon/src/kmod.rs"))?, h);
    h = crate::vm::fnv(k.version.as_bytes(), h);
    h = crate::vm::fnv(env!("CARGO_PKG_VERSION").as_bytes(), h);
    Ok(format!("{h:016x}"))
}

/// Build efuse.ko for `k` (cached); returns its path. The build is the
/// product's own: `efuse kmod install` for that kernel, its headers and
/// sources, into the cache, without loading (the efuse binary must have
/// been built).
pub fn module(k: &StockKernel) -> anyhow::Result<PathBuf> {
    let key = module_key(k)?;
    let dir = cache_dir().join(&k.version);
    let out = dir.join(format!("efuse-{key}.ko"));
    if out.exists() {
        eprintln!("xtask: efuse.ko {} (cached)", out.display());
        return Ok(out);
    }
    let dest = dir.join("module-build");
    let _ = std::fs::remove_dir_all(&dest);
    let started = std::time::Instant::now();
    let efuse = root().join("target/debug/efuse");
    if !efuse.exists() {
        crate::build_programs(false)?;
    }
    run(Command::new(&efuse)
        .args(["kmod", "install", "--no-load", "--kernel", &k.release])
        .arg("--build")
        .arg(&k.build)
        .arg("--source")
        .arg(&k.fuse_src)
        .arg("--dest")
        .arg(&dest))?;
    std::fs::copy(dest.join("efuse.ko"), &out)?;
    let _ = std::fs::remove_dir_all(&dest);
    eprintln!(
        "xtask: built efuse.ko for {} in {:.0?}",
        k.release,
        started.elapsed()
    );
    Ok(out)
}
