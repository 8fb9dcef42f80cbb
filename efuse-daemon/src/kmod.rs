//! `efuse kmod install | status | remove`: efuse's FUSE module (efuse.ko)
//! for the kernel a user runs.
//!
//! `install` builds the module the way `cargo xtask kmod` does for the test
//! VM: the kernel's own fs/fuse (from the distribution's kernel source
//! package of exactly the running kernel's version, or `--source`),
//! kernel/patches and the rename layer of kernel/module/prepare.sh (both
//! embedded in this binary), built with the kernel's headers
//! (`/lib/modules/R/build`). It installs the module under
//! `/lib/modules/R/updates/`, loads it and has it loaded at boot
//! (`/etc/modules-load.d/efuse.conf`). Whatever is missing is installed
//! through apt where it can be; every refusal names what is missing and how
//! to get it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::kfuse::{Hook, MODULE};

/// kernel/patches and kernel/module, as (path under kernel/, contents).
pub static KERNEL_FILES: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/kernel_files.rs"));

/// Where `install` prepares and builds.
const WORK: &str = "/var/lib/efuse/kmod";
/// Loads the module at boot.
const MODULES_LOAD: &str = "/etc/modules-load.d/efuse.conf";
/// Rebuilds the module for each kernel the package manager installs (the
/// hook directory Debian's kernel packages run, as DKMS uses).
const KERNEL_HOOK: &str = "/etc/kernel/postinst.d/zz-efuse";

/// The kernel-upgrade hook for the efuse binary at `efuse`.
fn kernel_hook(efuse: &Path) -> String {
    let e = efuse.display();
    format!(
        "#!/bin/sh\n\
         # Written by `efuse kmod install`: build efuse.ko for each kernel the\n\
         # package manager installs. Removed by `efuse kmod remove`.\n\
         version=\"$1\"\n\
         [ -x '{e}' ] || exit 0\n\
         if ! '{e}' kmod install --kernel \"$version\" --no-load >>/var/log/efuse-kmod.log 2>&1; then\n\
         \techo \"efuse: efuse.ko not built for $version (see /var/log/efuse-kmod.log); run 'efuse kmod install' once it runs\" >&2\n\
         fi\n\
         exit 0\n"
    )
}

/// `efuse kmod install`.
#[derive(Debug, clap::Args, Clone)]
pub struct InstallArgs {
    /// Kernel release to build for [default: the running kernel, uname -r].
    #[arg(long)]
    pub kernel: Option<String>,
    /// The kernel's build directory (headers) [default: /lib/modules/RELEASE/build].
    #[arg(long)]
    pub build: Option<PathBuf>,
    /// The kernel's sources: a source tree or its fs/fuse directory
    /// [default: the distribution's kernel source package of this version].
    #[arg(long)]
    pub source: Option<PathBuf>,
    /// Where to put efuse.ko [default: /lib/modules/RELEASE/updates].
    #[arg(long)]
    pub dest: Option<PathBuf>,
    /// Build and install, but do not load.
    #[arg(long)]
    pub no_load: bool,
}

/// `efuse kmod`.
#[derive(Debug, clap::Subcommand, Clone)]
pub enum KmodCommand {
    /// Build efuse.ko for this kernel, install and load it.
    Install(InstallArgs),
    /// What hook serves the bpf tier, which module is loaded and installed.
    Status,
    /// Unload efuse.ko (refused while a mount uses it) and uninstall it.
    Remove,
}

fn uname_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// (major, minor) of a kernel release string.
pub fn release_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn output(cmd: &mut Command) -> Option<String> {
    let o = cmd.output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    tracing::debug!("$ {cmd:?}");
    let st = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The candidate version apt offers of `package`, if any.
fn apt_candidate(package: &str) -> Option<String> {
    let text = output(Command::new("apt-cache").args(["policy", package]))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .filter(|v| *v != "(none)")
        .map(str::to_owned)
}

/// Is `package` at `version` installable by apt?
fn apt_has(package: &str, version: &str) -> bool {
    output(Command::new("apt-cache").args(["madison", package])).is_some_and(|t| {
        t.lines()
            .any(|l| l.split('|').nth(1).map(str::trim) == Some(version))
    })
}

fn apt_install(packages: &[String]) -> anyhow::Result<()> {
    eprintln!("efuse kmod: installing {}", packages.join(" "));
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Refusals that hold for the running kernel whatever is installed.
fn check_running_kernel(release: &str) -> anyhow::Result<()> {
    match release_version(release) {
        Some((maj, min)) if (maj, min) >= (6, 9) => {}
        Some((maj, min)) => bail!(
            "Linux {maj}.{min} ({release}) cannot take efuse.ko: a module can register a BPF \
             struct_ops type since Linux 6.9. {}",
            newer_kernel_advice()
        ),
        None => bail!("cannot read the kernel version from {release:?}"),
    }
    if !Path::new("/sys/module").exists() || !Path::new("/proc/modules").exists() {
        bail!("this kernel was built without loadable modules (CONFIG_MODULES): efuse.ko cannot be loaded");
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "this kernel has no BTF (/sys/kernel/btf/vmlinux; CONFIG_DEBUG_INFO_BTF): the bpf tier \
             needs it to load its programs"
        );
    }
    Ok(())
}

/// What the distribution offers instead of an old kernel.
fn newer_kernel_advice() -> String {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |k: &str| {
        os.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_default()
    };
    match (field("ID").as_str(), field("VERSION_CODENAME").as_str()) {
        ("debian", "bookworm") => {
            let offer = ["linux-image-6.12-cloud-amd64", "linux-image-6.12-amd64"]
                .into_iter()
                .filter(|p| apt_candidate(p).is_some())
                .collect::<Vec<_>>();
            if offer.is_empty() {
                "Debian 12's default kernel is 6.1; Linux 6.12 comes from bookworm-security \
                 (apt-get install linux-image-6.12-amd64, then reboot into it)"
                    .into()
            } else {
                format!(
                    "Debian 12's default kernel is 6.1; this system's archive offers Linux 6.12: \
                     apt-get install {}, then reboot into it",
                    offer.join(" or ")
                )
            }
        }
        ("ubuntu", _) => {
            "on Ubuntu, install the HWE kernel (linux-generic-hwe-24.04 or newer) and reboot".into()
        }
        _ => "install a kernel of 6.9 or newer from your distribution and reboot".into(),
    }
}

/// Module signing: None when unsigned modules load; else why they do not.
fn signing_required() -> Option<String> {
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown").unwrap_or_default();
    let active = lockdown
        .split_whitespace()
        .find(|w| w.starts_with('['))
        .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_owned());
    if let Some(mode) = active.filter(|m| m != "none") {
        return Some(format!(
            "kernel lockdown is active ({mode}, usually from UEFI Secure Boot)"
        ));
    }
    let enforce = std::fs::read_to_string("/sys/module/module/parameters/sig_enforce").unwrap_or_default();
    (enforce.trim() == "Y").then(|| "the kernel enforces module signatures (module.sig_enforce)".into())
}

/// The DKMS machine-owner key, where DKMS keeps it (Debian, Ubuntu).
fn mok_key() -> Option<(PathBuf, PathBuf)> {
    [
        ("/var/lib/dkms/mok.key", "/var/lib/dkms/mok.pub"),
        (
            "/var/lib/shim-signed/mok/MOK.priv",
            "/var/lib/shim-signed/mok/MOK.der",
        ),
    ]
    .into_iter()
    .map(|(k, p)| (PathBuf::from(k), PathBuf::from(p)))
    .find(|(k, p)| k.exists() && p.exists())
}

/// fs/fuse of `source` (a kernel tree or its fs/fuse directory).
fn fuse_dir_of(source: &Path) -> anyhow::Result<PathBuf> {
    for d in [source.join("fs/fuse"), source.to_owned()] {
        if d.join("fuse_i.h").exists() {
            return Ok(d);
        }
    }
    bail!(
        "{} is neither a kernel source tree nor its fs/fuse directory (no fuse_i.h)",
        source.display()
    )
}

/// The Debian package version of the running kernel's image.
fn image_package_version(release: &str) -> Option<(String, String)> {
    let owner = output(Command::new("dpkg-query").args(["-S", &format!("/boot/vmlinuz-{release}")]))?;
    let package = owner.split(':').next()?.trim().to_owned();
    let version = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", &package]))?;
    Some((package, version))
}

/// Find (installing through apt if needed) the distribution's sources of
/// kernel `release` and unpack its fs/fuse under `work`.
fn distribution_fuse_source(release: &str, work: &Path) -> anyhow::Result<PathBuf> {
    let (maj, min) = release_version(release).context("kernel version")?;
    let package = format!("linux-source-{maj}.{min}");
    let Some((image, version)) = image_package_version(release) else {
        bail!(
            "cannot tell which package installed /boot/vmlinuz-{release} (not a Debian/Ubuntu \
             kernel?): pass --source with this kernel's sources (kernel.org's linux-{maj}.{min}.x \
             of the same version, or your distribution's kernel source package)"
        );
    };
    let installed = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", &package]));
    if installed.as_deref() != Some(version.as_str()) {
        if !apt_has(&package, &version) {
            let offered = apt_candidate(&package).unwrap_or_else(|| "none".into());
            bail!(
                "this kernel ({image} {version}) needs {package} {version}, which the package \
                 archive no longer offers (it has {offered}): upgrade the kernel (apt-get upgrade, \
                 reboot) and run this again, or pass --source with the sources of {version}"
            );
        }
        apt_install(&[format!("{package}={version}")])?;
    }
    let tarball = ["xz", "bz2", "gz", "zst"]
        .iter()
        .map(|ext| PathBuf::from(format!("/usr/src/{package}.tar.{ext}")))
        .find(|p| p.exists())
        .with_context(|| format!("{package} is installed but /usr/src/{package}.tar.* is missing"))?;
    let dest = work.join("src");
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::create_dir_all(&dest)?;
    eprintln!("efuse kmod: unpacking fs/fuse from {}", tarball.display());
    run(Command::new("tar")
        .arg("-xaf")
        .arg(&tarball)
        .arg("-C")
        .arg(&dest)
        .arg("--wildcards")
        .arg(format!("{package}/fs/fuse/*")))?;
    fuse_dir_of(&dest.join(&package))
}

/// The kernel's build directory, installing the headers through apt if
/// they are missing.
fn headers(release: &str, given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(b) = given {
        return Ok(b.to_owned());
    }
    let build = PathBuf::from(format!("/lib/modules/{release}/build"));
    if build.join("Makefile").exists() {
        return Ok(build);
    }
    let package = format!("linux-headers-{release}");
    if have("apt-get") && apt_candidate(&package).is_some() {
        apt_install(std::slice::from_ref(&package))?;
        if build.join("Makefile").exists() {
            return Ok(build);
        }
    }
    bail!(
        "no headers for kernel {release} ({} is missing): install {package} (Debian, Ubuntu) or \
         kernel-devel-{release} (Fedora, RHEL), or pass --build",
        build.display()
    )
}

/// Write kernel/ (patches and module glue) under `dir`.
fn write_kernel_files(dir: &Path) -> anyhow::Result<()> {
    for (name, text) in KERNEL_FILES {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().expect("has a parent"))?;
        std::fs::write(&p, text)?;
    }
    Ok(())
}

/// Build efuse.ko from `fuse_src` with the kernel build directory
/// `build`, in `work`; returns the module's path.
pub fn build(fuse_src: &Path, build: &Path, work: &Path) -> anyhow::Result<PathBuf> {
    for tool in ["make", "gcc", "patch", "pahole"] {
        if !have(tool) {
            bail!(
                "{tool} is missing: install build-essential, patch and dwarves (pahole, for the \
                 module's BTF)"
            );
        }
    }
    let kernel = work.join("kernel");
    let _ = std::fs::remove_dir_all(&kernel);
    write_kernel_files(&kernel)?;
    let out = work.join("build");
    run(Command::new("sh")
        .arg(kernel.join("module/prepare.sh"))
        .arg(fuse_src)
        .arg(&out)
        .arg(build)
        .env("EFUSE_VERSION", env!("CARGO_PKG_VERSION")))?;
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    run(Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(build)
        .arg(format!("M={}", out.display()))
        .arg(format!("-j{jobs}"))
        .arg("modules"))
    .context("building efuse.ko (the kernel's headers, compiler and this FUSE source must match)")?;
    let ko = out.join("efuse.ko");
    let bytes = std::fs::read(&ko).context("the build produced no efuse.ko")?;
    if !bytes.windows(28).any(|w| w == b"bpf_struct_ops_efuse_bpf_ops") {
        bail!(
            "efuse.ko was built without BTF (the kernel needs CONFIG_DEBUG_INFO_BTF_MODULES, its \
             headers a vmlinux, and pahole must be installed)"
        );
    }
    Ok(ko)
}

fn module_loaded_version() -> Option<String> {
    crate::kfuse::module_version()
}

fn modinfo_version(path: &Path) -> Option<String> {
    output(Command::new("modinfo").args(["-F", "version"]).arg(path))
}

/// `efuse kmod install`.
pub fn install(args: &InstallArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("efuse kmod install builds and loads a kernel module: run it as root (sudo)");
    }
    let running = uname_release();
    let release = args.kernel.clone().unwrap_or_else(|| running.clone());
    let for_running = release == running;
    if for_running {
        check_running_kernel(&release)?;
    } else if release_version(&release).is_none_or(|v| v < (6, 9)) {
        bail!(
            "Linux {release} cannot take efuse.ko: a module can register a BPF struct_ops type since Linux 6.9"
        );
    }
    let sign = if for_running && !args.no_load {
        match (signing_required(), mok_key()) {
            (None, _) => None,
            (Some(_), Some(key)) => Some(key),
            (Some(why), None) => bail!(
                "{why}, so the kernel loads only signed modules, and there is no machine-owner key \
                 to sign efuse.ko with. Create and enroll one as DKMS does: `openssl req -new -x509 \
                 -newkey rsa:2048 -nodes -days 36500 -subj '/CN=efuse module signing/' -keyout \
                 /var/lib/dkms/mok.key -outform DER -out /var/lib/dkms/mok.pub`, `mokutil --import \
                 /var/lib/dkms/mok.pub`, reboot and confirm the key in the MOK manager; then run \
                 this again (efuse signs with /var/lib/dkms/mok.key). Or disable Secure Boot."
            ),
        }
    } else {
        None
    };
    let build_dir = headers(&release, args.build.as_deref())?;
    let work = PathBuf::from(WORK).join(&release);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let fuse_src = match &args.source {
        Some(s) => fuse_dir_of(s)?,
        None => distribution_fuse_source(&release, &work)?,
    };
    eprintln!(
        "efuse kmod: building efuse.ko {} for {release} from {}",
        env!("CARGO_PKG_VERSION"),
        fuse_src.display()
    );
    let ko = build(&fuse_src, &build_dir, &work)?;
    if let Some((key, cert)) = &sign {
        run(Command::new(build_dir.join("scripts/sign-file"))
            .arg("sha256")
            .arg(key)
            .arg(cert)
            .arg(&ko))
        .context("signing efuse.ko with the machine-owner key")?;
    }
    let default_dest = args.dest.is_none();
    let dest = args
        .dest
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/lib/modules/{release}/updates")));
    std::fs::create_dir_all(&dest)?;
    let installed = dest.join("efuse.ko");
    std::fs::copy(&ko, &installed).with_context(|| format!("installing {}", installed.display()))?;
    println!("efuse kmod: installed {}", installed.display());
    if default_dest {
        let _ = run(Command::new("depmod").arg("-a").arg(&release));
    }
    if !for_running || args.no_load {
        return Ok(());
    }
    if default_dest {
        std::fs::write(
            MODULES_LOAD,
            "# efuse's FUSE with the BPF hook (efuse kmod install)\nefuse\n",
        )?;
        if Path::new(KERNEL_HOOK).parent().is_some_and(Path::exists)
            && let Ok(me) = std::env::current_exe()
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(KERNEL_HOOK, kernel_hook(&me))?;
            std::fs::set_permissions(KERNEL_HOOK, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    if let Some(v) = module_loaded_version() {
        if Some(&v) == modinfo_version(&installed).as_ref() {
            println!("efuse kmod: efuse.ko {v} is already loaded");
            return report_hook();
        }
        if Command::new("rmmod")
            .arg(MODULE)
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            bail!(
                "efuse.ko {v} is loaded and in use (efuse mounts, or its control filesystem): the \
                 new module is installed and loads at the next boot, or after `efuse umount` of \
                 every module mount and `efuse kmod remove`"
            );
        }
    }
    let loaded = if default_dest {
        Command::new("modprobe").arg(MODULE).status()
    } else {
        Command::new("insmod").arg(&installed).status()
    };
    if !loaded.is_ok_and(|s| s.success()) {
        bail!(
            "the kernel refused to load {} (see dmesg){}",
            installed.display(),
            signing_required()
                .map(|w| format!(": {w}, and the module must be signed with an enrolled key"))
                .unwrap_or_default()
        );
    }
    report_hook()
}

fn report_hook() -> anyhow::Result<()> {
    match crate::kfuse::hook() {
        Ok(h @ Hook::Module { .. }) => {
            println!("efuse kmod: {h} loaded: `efuse mount --offload bpf` (or auto) now uses it");
            Ok(())
        }
        Ok(Hook::BuiltIn) => {
            println!(
                "efuse kmod: efuse.ko loaded; this kernel also has the hook built in, which bpf mounts use first"
            );
            Ok(())
        }
        Err(e) => bail!("efuse.ko loaded, but the hook is not usable: {e}"),
    }
}

/// `efuse kmod status`.
pub fn status() -> anyhow::Result<()> {
    let release = uname_release();
    println!("kernel: {release}");
    match crate::kfuse::hook() {
        Ok(h) => println!("bpf hook: {h}"),
        Err(e) => println!("bpf hook: none: {e}"),
    }
    match module_loaded_version() {
        Some(v) => {
            let refcnt = std::fs::read_to_string(format!("/sys/module/{MODULE}/refcnt")).unwrap_or_default();
            let mounts = crate::server::state::mountinfo()
                .unwrap_or_default()
                .iter()
                .filter(|m| m.efuse() == Some(crate::kfuse::Fuse::Module))
                .count();
            println!(
                "loaded: efuse.ko {v} (users {}, {mounts} efuse mounts through it)",
                refcnt.trim()
            );
        }
        None => println!("loaded: no"),
    }
    let installed = PathBuf::from(format!("/lib/modules/{release}/updates/efuse.ko"));
    if installed.exists() {
        println!(
            "installed for this kernel: {} ({})",
            installed.display(),
            modinfo_version(&installed).unwrap_or_else(|| "version unknown".into())
        );
    } else {
        println!("installed for this kernel: no (efuse kmod install)");
    }
    let shown = |p: &'static str| if Path::new(p).exists() { p } else { "no" };
    println!("loaded at boot: {}", shown(MODULES_LOAD));
    println!("rebuilt for new kernels: {}", shown(KERNEL_HOOK));
    if let Some(why) = signing_required() {
        println!("module signatures: required ({why})");
    }
    Ok(())
}

/// `efuse kmod remove`.
pub fn remove() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("efuse kmod remove unloads a kernel module: run it as root (sudo)");
    }
    if module_loaded_version().is_some() {
        let mounts: Vec<String> = crate::server::state::mountinfo()?
            .iter()
            .filter(|m| m.efuse() == Some(crate::kfuse::Fuse::Module))
            .map(|m| m.mountpoint.display().to_string())
            .collect();
        if !mounts.is_empty() {
            bail!(
                "efuse.ko serves {} (the kernel refuses to unload a module whose filesystem is \
                 mounted): efuse umount them first",
                mounts.join(", ")
            );
        }
        let ctl = crate::kfuse::Fuse::Module.connections();
        let _ = nix::mount::umount2(ctl, nix::mount::MntFlags::MNT_DETACH);
        // A bpf tier detached moments ago frees its struct_ops (and their
        // reference on the module) from a kernel workqueue: allow it time.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let st = Command::new("rmmod").arg(MODULE).output()?;
            if st.status.success() {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "the kernel refused to unload efuse.ko: {}",
                    String::from_utf8_lossy(&st.stderr).trim()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        println!("efuse kmod: unloaded efuse.ko");
    }
    let release = uname_release();
    let installed = PathBuf::from(format!("/lib/modules/{release}/updates/efuse.ko"));
    if installed.exists() {
        std::fs::remove_file(&installed)?;
        let _ = run(Command::new("depmod").arg("-a").arg(&release));
        println!("efuse kmod: removed {}", installed.display());
    }
    for f in [MODULES_LOAD, KERNEL_HOOK] {
        if Path::new(f).exists() {
            std::fs::remove_file(f)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_versions() {
        assert_eq!(release_version("6.12.118+deb12-cloud-amd64"), Some((6, 12)));
        assert_eq!(release_version("6.1.0-28-amd64"), Some((6, 1)));
        assert_eq!(release_version("5.15.0-100-generic"), Some((5, 15)));
        assert_eq!(release_version("garbage"), None);
    }

    #[test]
    fn the_kernel_hook_is_a_shell_script_that_never_fails_an_upgrade() {
        let h = kernel_hook(Path::new("/usr/local/bin/efuse"));
        assert!(h.starts_with("#!/bin/sh\n"));
        assert!(h.contains("'/usr/local/bin/efuse' kmod install --kernel \"$version\" --no-load"));
        assert!(h.trim_end().ends_with("exit 0"));
        let st = Command::new("sh").arg("-n").arg("-c").arg(&h).status().unwrap();
        assert!(st.success(), "sh -n rejects the hook:\n{h}");
    }

    #[test]
    fn the_module_sources_are_embedded() {
        assert!(KERNEL_FILES.iter().any(|(n, _)| *n == "module/prepare.sh"));
        assert!(KERNEL_FILES.iter().any(|(n, _)| *n == "module/Kbuild"));
        let patches = KERNEL_FILES
            .iter()
            .filter(|(n, _)| n.starts_with("patches/"))
            .count();
        assert!(patches >= 4, "{patches} patches embedded");
        assert!(
            KERNEL_FILES
                .iter()
                .any(|(n, t)| n.starts_with("patches/0001") && t.contains("efuse_bpf_ops"))
        );
    }
}
