//! The client commands, which drive mounts from outside: `mount`
//! (preflight, then the daemon in the foreground or daemonized), `umount`,
//! `status`, `offload`, `prefetch`, and [`stats`]. They talk to a daemon
//! only over the control protocol ([`crate::control`]) and read its
//! record ([`crate::server::state`]); nothing here runs inside a daemon.
//!
//! `efuse mount` without `--foreground` re-executes itself in the
//! foreground in a new session, with its output going to a log file, and
//! waits on a pipe: the child writes `ready` once the kernel has answered
//! FUSE_INIT (the mount is usable), or `error: ...`. The parent exits 0 only
//! after `ready`, so scripts can use the mount as soon as the command returns.
//! `status` joins the mount records with `/proc/self/mountinfo`.

pub mod stats;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::cli::{MountArgs, StatusArgs, UmountArgs};
use crate::config::MountConfig;

use crate::server::state::*;
use crate::server::{preflight, serve};

/// `mount -o remount,...` (mount(8) runs the helper with it): change the
/// flags the kernel can change on a live FUSE mount (ro/rw, nosuid, nodev,
/// noexec, the atime modes, nosymfollow, sync, dirsync) without touching
/// the daemon. A remount to ro makes every write fail with EROFS at once.
fn remount(args: &MountArgs) -> anyhow::Result<()> {
    let mp = absolute(&args.mountpoint)?;
    let m = match mounted_at(&mp)? {
        Some(m) if m.efuse().is_some() => m,
        Some(m) => bail!("{} is a {} mount, not efuse", mp.display(), m.fstype),
        None => bail!(
            "{} is not mounted; remount needs a mounted efuse filesystem",
            mp.display()
        ),
    };
    // The flags in force now (mountinfo lists them as options), then the
    // ones asked for, each through the same parser.
    let mut flags = nix::mount::MsFlags::empty();
    for o in &m.options {
        if o == "nodiratime" {
            flags |= nix::mount::MsFlags::MS_NODIRATIME;
        } else {
            crate::mount::apply_flag(&mut flags, o);
        }
    }
    for o in &args.options {
        let o = o.trim();
        if o == "remount" || o.is_empty() {
            continue;
        }
        if crate::mount::apply_flag(&mut flags, o) {
            continue;
        }
        // mount(8) hands the helper the mount's whole option string on a
        // remount (from fstab and utab): efuse's own options come back with
        // it. They apply at mount time (the tier switches at run time with
        // `efuse offload`); a remount leaves them, quietly.
        if !crate::cli::is_efuse_option(o) {
            crate::config::mount_option_known(o)?;
        }
        if !crate::config::ignored_option(o) {
            tracing::debug!(
                option = o,
                "mount option not changed by a remount; it applies at mount time"
            );
        }
    }
    nix::mount::mount(
        None::<&str>,
        &mp,
        None::<&str>,
        nix::mount::MsFlags::MS_REMOUNT | flags,
        None::<&str>,
    )
    .with_context(|| format!("cannot remount {}", mp.display()))?;
    Ok(())
}

/// `efuse mount`.
pub fn mount(args: &MountArgs) -> anyhow::Result<()> {
    if args.options.iter().any(|o| o.trim() == "remount") {
        return remount(args);
    }
    let cfg = match std::env::var(CONFIG_ENV) {
        // Re-executed by our own parent: the merged config travels whole.
        Ok(json) if args.foreground => serde_json::from_str(&json).context("bad inherited config")?,
        _ => args.mount_config()?,
    };
    let mp = absolute(&args.mountpoint)?;
    let ready = match std::env::var(READY_FD_ENV) {
        Ok(fd) if args.foreground => {
            let fd: i32 = fd.parse().context("bad EFUSE_READY_FD")?;
            // SAFETY: the parent passed this fd to us for our exclusive use.
            Some(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
        }
        _ => None,
    };
    if args.foreground {
        let mut ready = ready;
        let res = preflight(&cfg, &mp).and_then(|()| serve(&cfg, &mp, args.log_file.clone(), &mut ready));
        if let (Err(e), Some(r)) = (&res, ready.as_mut()) {
            let _ = writeln!(r, "error: {e:#}");
        }
        return res;
    }
    preflight(&cfg, &mp)?;
    spawn_daemon(args, &cfg, &mp)
}

fn spawn_daemon(args: &MountArgs, cfg: &MountConfig, mp: &Path) -> anyhow::Result<()> {
    ensure_state_dirs()?;
    let log = args
        .log_file
        .clone()
        .unwrap_or_else(|| Path::new(STATE_DIR).join(format!("{}.log", mount_id(mp))));
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log)
        .with_context(|| format!("cannot open log file {}", log.display()))?;
    let (rd, wr) = nix::unistd::pipe().context("pipe")?;
    let wr_fd = wr.as_raw_fd();
    let exe = std::env::current_exe().context("cannot find own executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount")
        .arg(&args.source)
        .arg(mp)
        .arg("--foreground")
        .arg("--log-file")
        .arg(&log)
        .env(READY_FD_ENV, wr_fd.to_string())
        .env(CONFIG_ENV, serde_json::to_string(cfg)?)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Let the ready pipe survive exec.
            let flags = libc::fcntl(wr_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(wr_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the efuse daemon")?;
    drop(wr);
    let mut msg = String::new();
    File::from(rd).read_to_string(&mut msg).ok();
    let msg = msg.trim();
    if msg == "ready" {
        if args.quiet {
            return Ok(());
        }
        let tier = read_record(mp).map_or_else(|| cfg.offload.to_string(), |r| r.offload);
        println!(
            "efuse: mounted {} on {} (backend {}, offload {}, pid {}, log {})",
            args.source.display(),
            mp.display(),
            cfg.backend_label(),
            tier,
            child.id(),
            log.display()
        );
        return Ok(());
    }
    if let Some(e) = msg.strip_prefix("error: ") {
        let _ = child.wait();
        bail!("{e}");
    }
    let status = child.wait()?;
    let tail = fs::read_to_string(&log).unwrap_or_default();
    let tail: Vec<&str> = tail.lines().rev().take(10).collect();
    bail!(
        "the efuse daemon exited ({status}) before the mount was ready; last log lines:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// `efuse offload`.
pub fn offload(args: &crate::cli::OffloadArgs) -> anyhow::Result<()> {
    let mp = absolute(&args.mountpoint)?;
    if mounted_at(&mp)?.is_none_or(|m| m.efuse().is_none()) {
        bail!("{} is not an efuse mount", mp.display());
    }
    let s = crate::control::switch_tier(&mp, args.tier)?;
    if let Some(mut r) = read_record(&mp) {
        r.offload = s.current.to_string();
        let _ = write_record(&r);
    }
    println!(
        "efuse: {} offload {} -> {} ({} cached entries invalidated)",
        mp.display(),
        s.previous,
        s.current,
        s.invalidated
    );
    Ok(())
}

/// `efuse prefetch`: find the efuse mount holding the path and ask its daemon.
pub fn prefetch(args: &crate::cli::PrefetchArgs) -> anyhow::Result<()> {
    let path = fs::canonicalize(&args.path).with_context(|| format!("{}", args.path.display()))?;
    let mut mp = path.as_path();
    loop {
        if mounted_at(mp)?.is_some_and(|m| m.efuse().is_some()) {
            break;
        }
        mp = mp
            .parent()
            .with_context(|| format!("{} is not inside an efuse mount", path.display()))?;
    }
    let rel = path.strip_prefix(mp).unwrap_or(Path::new(""));
    let n = crate::control::prefetch(mp, rel, args.max)?;
    println!(
        "efuse: {} entries of {} loaded into the BPF maps",
        n,
        path.display()
    );
    if let Ok(s) = crate::control::query_stats(mp) {
        let cap = s.bpf.entry_capacity as usize;
        if cap > 0 && n > cap {
            println!(
                "efuse: that is more than the entry map holds ({cap}): it keeps the {cap} most recently \
                 used, and lookups of the rest go to the daemon (raise [bpf] entries to keep more)"
            );
        }
    }
    Ok(())
}

/// How long `efuse umount` waits for a busy mount to settle.
const BUSY_GRACE: Duration = Duration::from_secs(1);

/// umount2, waiting up to [`BUSY_GRACE`] while the mount is busy. A
/// reference can be transient: a forked child holds copies of its parent's
/// descriptors until it execs (close-on-exec drops them only then), and a
/// path walk through the mount pins it for the walk. A file kept open, or a
/// cwd, still fails after the grace.
fn umount_settled(mp: &Path, flags: nix::mount::MntFlags) -> nix::Result<()> {
    let deadline = Instant::now() + BUSY_GRACE;
    loop {
        match nix::mount::umount2(mp, flags) {
            Err(nix::errno::Errno::EBUSY) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            r => return r,
        }
    }
}

/// Processes with a descriptor, cwd or root inside the mount at `mp`
/// ("pid (comm)"), as fuser -m would list them; best effort.
fn mount_holders(mp: &Path) -> Vec<String> {
    // Everything inside one mount shares its st_dev. AT_STATX_DONT_SYNC:
    // FUSE answers from what it has, so a stuck daemon cannot hang this.
    let dev_of = |p: &Path| -> Option<(u32, u32)> {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
        // SAFETY: statx is plain data; all-zero is a valid value.
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a statx the kernel fills.
        let rc = unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), libc::AT_STATX_DONT_SYNC, 0, &mut st) };
        (rc == 0).then_some((st.stx_dev_major, st.stx_dev_minor))
    };
    let Some(dev) = dev_of(mp) else {
        return Vec::new();
    };
    let on_mount = |p: &Path| dev_of(p) == Some(dev);
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let base = e.path();
        let mut held = on_mount(&base.join("cwd")) || on_mount(&base.join("root"));
        if !held && let Ok(fds) = fs::read_dir(base.join("fd")) {
            held = fds.flatten().any(|fd| on_mount(&fd.path()));
        }
        if held {
            let comm = fs::read_to_string(base.join("comm")).unwrap_or_default();
            out.push(format!("{pid} ({})", comm.trim_end()));
        }
    }
    out
}

/// `efuse umount`: unmount, then return only once the daemon has exited.
pub fn umount(args: &UmountArgs) -> anyhow::Result<()> {
    let mp = absolute(&args.mountpoint)?;
    let Some(m) = mounted_at(&mp)? else {
        bail!("{} is not mounted", mp.display());
    };
    let Some(fuse) = m.efuse() else {
        bail!(
            "{} is a {} mount, not efuse; use umount(8)",
            mp.display(),
            m.fstype
        );
    };
    let pid = read_record(&mp).as_ref().and_then(daemon_pid);
    if args.force {
        fuse.mount_control();
        let abort = fuse.abort_file(m.dev);
        match fs::write(&abort, b"1") {
            Ok(()) => tracing::info!(connection = m.dev, "aborted FUSE connection"),
            Err(e) => tracing::warn!(
                "cannot abort {abort}: {e} (is {} mounted on {}?)",
                fuse.control_fstype(),
                fuse.connections()
            ),
        }
    }
    let flags = if args.lazy || args.force {
        nix::mount::MntFlags::MNT_DETACH
    } else {
        nix::mount::MntFlags::empty()
    };
    if let Err(e) = umount_settled(&mp, flags) {
        // An aborted daemon may have detached its mount itself meanwhile:
        // what counts is that this connection's mount is gone.
        let gone = connection_of(&mp) != Some(m.dev);
        if !gone {
            if e == nix::errno::Errno::EBUSY {
                let holders = mount_holders(&mp);
                let who = if holders.is_empty() {
                    String::new()
                } else {
                    format!(" (held by {})", holders.join(", "))
                };
                bail!(
                    "{} is busy{who}: a process has a file open or its cwd there; close it or use --lazy",
                    mp.display()
                );
            }
            return Err(e).with_context(|| format!("cannot unmount {}", mp.display()));
        }
    }
    if let Some(pid) = pid
        && !args.lazy
    {
        let exited = if args.force {
            // The connection is aborted: nothing the daemon still does can
            // matter. Give it a moment to exit, then make it.
            // SIGKILL always ends it (its connection cannot hold it in D
            // state any more), but tearing down a process can take seconds
            // on a loaded machine: wait for that, not for a guess.
            wait_exit(pid, Duration::from_millis(500)) || {
                tracing::warn!(pid, "the daemon did not exit after the abort; killing it");
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
                wait_exit(pid, Duration::from_secs(30))
            }
        } else {
            wait_exit(pid, Duration::from_secs(30))
        };
        if !exited {
            bail!(
                "{} is unmounted but its daemon (pid {pid}) has not exited; kill it with `kill -9 {pid}`",
                mp.display()
            );
        }
        let _ = fs::remove_file(record_path(&mp));
    }
    println!("efuse: unmounted {}", mp.display());
    Ok(())
}

/// A row of `efuse status`.
#[derive(Debug, Serialize)]
struct StatusRow {
    mountpoint: PathBuf,
    source: String,
    backend: String,
    /// How the backend holds inodes (`handles`, `descriptors`, `-`).
    inodes: String,
    offload: String,
    transport: String,
    pid: Option<u32>,
    connection: u32,
    /// `kernel` (the kernel's FUSE) or `module` (efuse.ko).
    fuse: crate::kfuse::Fuse,
    state: &'static str,
}

/// `efuse status`.
pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for m in mountinfo()?.into_iter().filter(|m| m.efuse().is_some()) {
        let rec = read_record(&m.mountpoint);
        // Never touch the mount itself: a stalled backend would block us.
        // The record names the daemon; its control socket answers at once
        // (a thread of its own, no backend call) or within the timeout.
        let state = match rec.as_ref().and_then(daemon_pid) {
            None => "dead (run efuse umount)",
            Some(_) if crate::control::ping(&m.mountpoint, Duration::from_millis(500)) => "running",
            Some(_) => "not responding",
        };
        rows.push(StatusRow {
            source: rec.as_ref().map(|r| r.source.clone()).unwrap_or(m.source.clone()),
            backend: rec
                .as_ref()
                .map(|r| r.backend.clone())
                .unwrap_or_else(|| "?".into()),
            inodes: rec
                .as_ref()
                .map(|r| r.inodes.clone())
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "?".into()),
            offload: rec
                .as_ref()
                .map(|r| r.offload.clone())
                .unwrap_or_else(|| "?".into()),
            transport: rec
                .as_ref()
                .map(|r| r.transport.clone())
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "?".into()),
            pid: rec.as_ref().map(|r| r.pid),
            connection: m.dev,
            fuse: m.efuse().unwrap_or_default(),
            state,
            mountpoint: m.mountpoint,
        });
    }
    // Records whose mount is gone belong to daemons that died after unmount.
    if let Ok(dir) = fs::read_dir(records_dir()) {
        for e in dir.flatten() {
            if let Ok(text) = fs::read_to_string(e.path())
                && let Ok(r) = serde_json::from_str::<MountRecord>(&text)
                && !rows.iter().any(|row| row.mountpoint == r.mountpoint)
                && !pid_alive(r.pid)
            {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no efuse mounts");
        return Ok(());
    }
    println!(
        "{:<32} {:<8} {:<11} {:<8} {:<9} {:<6} {:>8} {:>6}  {:<24} SOURCE",
        "MOUNTPOINT", "BACKEND", "INODES", "OFFLOAD", "TRANSPORT", "FUSE", "PID", "CONN", "STATE"
    );
    for r in rows {
        println!(
            "{:<32} {:<8} {:<11} {:<8} {:<9} {:<6} {:>8} {:>6}  {:<24} {}",
            r.mountpoint.display(),
            r.backend,
            r.inodes,
            r.offload,
            r.transport,
            r.fuse,
            r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            r.connection,
            r.state,
            r.source
        );
    }
    Ok(())
}
