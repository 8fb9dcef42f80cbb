//! Boot a kernel under qemu with a throwaway initramfs and run one shell
//! command in it: how the `bpf` tier is tested on a kernel with efuse's
//! hook while the host runs a kernel without it. The kernel is Debian's
//! stock image with efuse.ko (the default), or a kernel built with the
//! patches in (`cargo xtask kernel`).
//!
//! The initramfs holds busybox (static), the given binaries and the shared
//! libraries they need (found with ldd), and the module if one is given.
//! Its `/init` mounts proc, sysfs, devtmpfs, tmpfs, tracefs, bpffs and
//! fusectl, prints the kernel release, loads the module (and mounts its
//! control filesystem efusectl) and prints its version, runs the command,
//! prints an exit marker on the serial console and powers off. The guest
//! has no network and no disk; its tmpfs is its only storage.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Printed by the guest's init with the command's exit status.
const MARKER: &str = "EFUSE-VM-EXIT=";

/// Shared libraries `bin` needs (absolute paths), from ldd.
fn libs_of(bin: &Path) -> std::io::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn copy_into(root: &Path, src: &Path, dest: &Path) -> std::io::Result<()> {
    let d = root.join(dest.strip_prefix("/").unwrap_or(dest));
    if let Some(p) = d.parent() {
        fs::create_dir_all(p)?;
    }
    fs::copy(src, &d)?;
    Ok(())
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tracefs tracefs /sys/kernel/tracing
mount -t bpf bpf /sys/fs/bpf
mount -t fusectl fusectl /sys/fs/fuse/connections
ulimit -n 1048576
echo "efuse-vm: kernel $(uname -r) ($(cat /proc/version))"
if [ -f /lib/efuse.ko ]; then
    if ! insmod /lib/efuse.ko; then
        echo "efuse-vm: insmod efuse.ko failed"; dmesg | tail -20
        echo "EFUSE-VM-EXIT=97"; reboot -f
    fi
    mkdir -p /sys/fs/efuse/connections
    mount -t efusectl efusectl /sys/fs/efuse/connections
    echo "efuse-vm: efuse.ko $(cat /sys/module/efuse/version) loaded ($(grep -c . /sys/kernel/btf/efuse) lines of module BTF)"
fi
export HOME=/tmp TMPDIR=/tmp EFUSE_BIN=/bin/efuse RUST_BACKTRACE=1
cd /tmp
sh /cmd
echo "EFUSE-VM-EXIT=$?"
sync
reboot -f
"#;

/// Build the initramfs (gzip'd newc cpio) with `files` in /bin, `module`
/// as /lib/efuse.ko and the command `cmd`; returns its path inside `work`.
pub fn initramfs(
    work: &Path,
    files: &[PathBuf],
    module: Option<&Path>,
    cmd: &str,
) -> std::io::Result<PathBuf> {
    let root = work.join("root");
    let _ = fs::remove_dir_all(&root);
    for d in ["bin", "proc", "sys", "dev", "tmp", "run", "etc"] {
        fs::create_dir_all(root.join(d))?;
    }
    copy_into(&root, Path::new("/bin/busybox"), Path::new("/bin/busybox"))?;
    let mut libs = BTreeSet::new();
    for f in files {
        let name = f
            .file_name()
            .ok_or_else(|| std::io::Error::other(format!("{} has no file name", f.display())))?;
        fs::copy(f, root.join("bin").join(name))?;
        libs.extend(libs_of(f)?);
    }
    for l in libs {
        copy_into(&root, &l, &l)?;
    }
    if let Some(m) = module {
        copy_into(&root, m, Path::new("/lib/efuse.ko"))?;
    }
    fs::write(root.join("init"), INIT)?;
    fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755))?;
    fs::write(root.join("cmd"), cmd)?;
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/tmp:/bin/sh\n")?;
    fs::write(root.join("etc/group"), "root:x:0:\n")?;
    let out = work.join("initramfs.cpio.gz");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
            root.display(),
            out.display()
        ))
        .status()?;
    if !status.success() {
        return Err(std::io::Error::other("building the initramfs failed (cpio/gzip)"));
    }
    let _ = fs::remove_dir_all(&root);
    Ok(out)
}

/// What a VM run produced.
pub struct VmRun {
    /// The command's exit status inside the guest (None: no marker seen,
    /// e.g. a kernel panic or the timeout).
    pub code: Option<i32>,
    /// Everything the guest printed on its console.
    pub console: String,
}

/// The kernel a VM boots.
#[derive(Clone, Debug)]
pub struct Guest {
    /// The kernel image (bzImage / vmlinuz).
    pub kernel: PathBuf,
    /// efuse.ko built for that kernel, loaded before the command runs.
    pub module: Option<PathBuf>,
}

impl Guest {
    /// The guest the test environment names: `EFUSE_VM_KERNEL` (an image)
    /// and `EFUSE_VM_MODULE` (efuse.ko for it, if the hook is not built
    /// in), as `cargo xtask test` sets them.
    pub fn from_env() -> Option<Self> {
        Some(Self {
            kernel: std::env::var_os("EFUSE_VM_KERNEL")?.into(),
            module: std::env::var_os("EFUSE_VM_MODULE")
                .filter(|m| !m.is_empty())
                .map(PathBuf::from),
        })
    }
}

/// Boot `guest` with `files` and run `cmd`; the console is echoed to
/// stderr line by line. The guest is killed after `timeout`.
pub fn run(guest: &Guest, files: &[PathBuf], cmd: &str, timeout: Duration) -> std::io::Result<VmRun> {
    let work = tempfile::tempdir()?;
    let initrd = initramfs(work.path(), files, guest.module.as_deref(), cmd)?;
    let kernel = &guest.kernel;
    let mut child = Command::new("qemu-system-x86_64")
        // TCG: nested KVM is not dependable on CI machines (it hangs here).
        // One host thread for both vCPUs: with multi-threaded TCG (QEMU
        // 7.2), a vCPU can run a stale translation of kernel text another
        // vCPU has just patched (static keys, at boot and whenever a
        // tracepoint is enabled) and die on the int3 of text_poke_bp.
        .args(["-accel", "tcg,thread=single"])
        .args(["-m", "2048", "-smp", "2", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 oops=panic loglevel=4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| std::io::Error::other(format!("cannot start qemu-system-x86_64: {e}")))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel::<String>();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("qemu: {l}"));
        }
    });
    let deadline = Instant::now() + timeout;
    let mut console = String::new();
    let mut code = None;
    let mut err = std::io::stderr();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(l) => {
                let l = l.trim_end_matches('\r').to_owned();
                let _ = writeln!(err, "vm| {l}");
                if let Some(c) = l.strip_prefix(MARKER) {
                    code = c.trim().parse().ok();
                }
                console.push_str(&l);
                console.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() >= deadline {
                    let _ = writeln!(err, "vm| timeout after {timeout:?}: killing qemu");
                    let _ = child.kill();
                    break;
                }
                if let Ok(Some(_)) = child.try_wait() {
                    // Drain what is left.
                    while let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
                        console.push_str(&l);
                        console.push('\n');
                        if let Some(c) = l.trim_end_matches('\r').strip_prefix(MARKER) {
                            code = c.trim().parse().ok();
                        }
                    }
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.wait();
    Ok(VmRun { code, console })
}
