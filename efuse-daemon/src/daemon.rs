//! Mount lifecycle: preflight checks, daemonizing, the serving loop,
//! state records, `status` and `umount`.
//!
//! `efuse mount` without `--foreground` re-executes itself in the
//! foreground in a new session, with its output going to a log file, and
//! waits on a pipe: the child writes `ready` once the kernel has answered
//! FUSE_INIT (the mount is usable), or `error: ...`. The parent exits 0 only
//! after `ready`, so scripts can use the mount as soon as the command returns.
//!
//! Each live mount has a record in `/run/efuse/mounts/` (root-only) with
//! the daemon's pid, backend and tier; `status` joins these records with
//! `/proc/self/mountinfo`.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::backend::SharedBackend;
use crate::backend::dir::DirBackend;
use crate::backend::mem::MemBackend;
use crate::backend::sim::SimBackend;
use crate::cli::{MountArgs, StatusArgs, UmountArgs};
use crate::config::{BackendKind, MountConfig, Offload};
use crate::fs::EfuseFs;
use crate::metrics::Metrics;

/// Root of efuse's run-time state.
pub const STATE_DIR: &str = "/run/efuse";
const READY_FD_ENV: &str = "EFUSE_READY_FD";
const CONFIG_ENV: &str = "EFUSE_MOUNT_CONFIG";

/// What `status` knows of a mount.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountRecord {
    /// Absolute mount point.
    pub mountpoint: PathBuf,
    /// Backend source.
    pub source: String,
    /// Backend label (`dir`, `mem`, `sim+dir`).
    pub backend: String,
    /// Offload tier in effect.
    pub offload: String,
    /// Request transport in use (`uring`, `classic`).
    #[serde(default)]
    pub transport: String,
    /// How the backend holds inodes (`handles`, `descriptors`; `-` for
    /// backends that hold no backing objects).
    #[serde(default)]
    pub inodes: String,
    /// Daemon pid.
    pub pid: u32,
    /// FUSE connection id (kernel dev_t of the mount).
    pub connection: u32,
    /// The kernel FUSE the mount goes through.
    #[serde(default)]
    pub fuse: crate::kfuse::Fuse,
    /// Unix time the mount became ready.
    pub started: u64,
    /// Daemon log file, if daemonized.
    pub log: Option<PathBuf>,
}

/// Make `p` absolute and drop `.`/`..` without touching the filesystem
/// (a dead FUSE mount cannot be canonicalized).
pub fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    let base = if p.is_absolute() {
        PathBuf::new()
    } else {
        std::env::current_dir()?
    };
    let mut out = PathBuf::from("/");
    for c in base.join(p).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    Ok(out)
}

/// Stable short id of a mount point, used to name its record, log and socket.
pub fn mount_id(mp: &Path) -> String {
    // FNV-1a: a stable, dependency-free name for the record.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in mp.as_os_str().as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

fn records_dir() -> PathBuf {
    Path::new(STATE_DIR).join("mounts")
}

fn ensure_state_dirs() -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(records_dir())
        .with_context(|| format!("cannot create {}", records_dir().display()))
}

fn record_path(mp: &Path) -> PathBuf {
    records_dir().join(format!("{}.json", mount_id(mp)))
}

fn write_record(r: &MountRecord) -> anyhow::Result<()> {
    ensure_state_dirs()?;
    let p = record_path(&r.mountpoint);
    let tmp = p.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(serde_json::to_string_pretty(r)?.as_bytes())?;
    fs::rename(&tmp, &p)?;
    Ok(())
}

/// Read the record of a mount point, if any.
pub fn read_record(mp: &Path) -> Option<MountRecord> {
    let text = fs::read_to_string(record_path(mp)).ok()?;
    serde_json::from_str(&text).ok()
}

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// Mount point.
    pub mountpoint: PathBuf,
    /// Filesystem type (`fuse.efuse`, or `efuse` through efuse.ko).
    pub fstype: String,
    /// Source.
    pub source: String,
    /// Kernel dev_t (major << 20 | minor), the FUSE connection id.
    pub dev: u32,
    /// Mount options: the per-mount ones, then the superblock's.
    pub options: Vec<String>,
}

impl MountInfo {
    /// The FUSE behind this mount if it is an efuse mount.
    pub fn efuse(&self) -> Option<crate::kfuse::Fuse> {
        crate::kfuse::Fuse::of_fstype(&self.fstype)
    }

    /// Abort this mount's FUSE connection (any FUSE mount, efuse's or a
    /// peer's, through the kernel's FUSE or efuse.ko); false if it is not
    /// a FUSE mount or the control filesystem refused.
    pub fn abort(&self) -> bool {
        crate::kfuse::Fuse::of_any_fstype(&self.fstype).is_some_and(|f| {
            f.mount_control();
            fs::write(f.abort_file(self.dev), b"1").is_ok()
        })
    }
}

fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from(OsStr::from_bytes(&out)))
}

/// Parse `/proc/self/mountinfo`.
pub fn mountinfo() -> anyhow::Result<Vec<MountInfo>> {
    let text = fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.len() < sep + 3 || f.len() < 5 {
            continue;
        }
        let (maj, min) = f[2].split_once(':').unwrap_or(("0", "0"));
        let dev = (maj.parse::<u32>().unwrap_or(0) << 20) | min.parse::<u32>().unwrap_or(0);
        out.push(MountInfo {
            mountpoint: unescape_mountinfo(f[4]),
            fstype: f[sep + 1].to_string(),
            source: f[sep + 2].to_string(),
            dev,
            options: f[5]
                .split(',')
                .chain(f.get(sep + 3).copied().unwrap_or("").split(','))
                .filter(|o| !o.is_empty())
                .map(str::to_string)
                .collect(),
        });
    }
    Ok(out)
}

fn mounted_at(mp: &Path) -> anyhow::Result<Option<MountInfo>> {
    Ok(mountinfo()?.into_iter().rev().find(|m| m.mountpoint == mp))
}

/// True if `pid` is a running (not zombie) process.
fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// True if the efuse mount at `mp` has lost its daemon. Decided from the
/// record and /proc, never by a call on the mount (a stalled backend would
/// block it).
fn connection_dead(mp: &Path) -> bool {
    read_record(mp).as_ref().and_then(daemon_pid).is_none()
}

/// Checks before mounting, each failing with what to do about it.
fn preflight(cfg: &MountConfig, mp: &Path) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("efuse must run as root: it mounts with mount(2) and loads BPF programs (try sudo)");
    }
    let fuse = if cfg.offload == Offload::Bpf {
        crate::kfuse::for_bpf().map_err(|e| anyhow::anyhow!(e))?
    } else {
        crate::kfuse::Fuse::Kernel
    };
    let dev = fuse.device().to_string_lossy();
    if !Path::new(&*dev).exists() {
        match fuse {
            crate::kfuse::Fuse::Kernel => bail!(
                "/dev/fuse is missing: load the FUSE module (modprobe fuse) or, in a container, pass --device /dev/fuse"
            ),
            crate::kfuse::Fuse::Module => bail!(
                "{dev} is missing although efuse.ko is loaded (no devtmpfs on /dev?); in a container, pass --device {dev}"
            ),
        }
    }
    if cfg.offload == Offload::Bpf && allow_root(cfg) {
        bail!("{ALLOW_ROOT_NO_BPF}");
    }
    if let Some(m) = mounted_at(mp)? {
        let dead = m.efuse().is_some() && connection_dead(mp);
        if dead {
            tracing::warn!(mountpoint = %mp.display(), "removing the stale mount of a dead efuse daemon");
            lazy_unmount(mp)?;
        } else {
            bail!(
                "{} is already a mount point ({} from {}); unmount it first (efuse umount {})",
                mp.display(),
                m.fstype,
                m.source,
                mp.display()
            );
        }
    }
    let md = fs::metadata(mp).with_context(|| format!("mountpoint {} does not exist", mp.display()))?;
    if !md.is_dir() {
        bail!("mountpoint {} is not a directory", mp.display());
    }
    if !cfg.options.iter().any(|o| o == "nonempty")
        && fs::read_dir(mp)
            .with_context(|| format!("cannot list mountpoint {}", mp.display()))?
            .next()
            .is_some()
    {
        bail!(
            "mountpoint {} is not empty; mounting would hide its files (use -o nonempty to mount anyway)",
            mp.display()
        );
    }
    if let Some(src) = &cfg.source
        && matches!(cfg.backend, BackendKind::Dir)
    {
        let src = fs::canonicalize(src)?;
        if mp.starts_with(&src) {
            bail!(
                "mountpoint {} lies inside the backend {}; pick a mountpoint outside it",
                mp.display(),
                src.display()
            );
        }
    }
    Ok(())
}

/// Detach the mount at `mp` if it is still the one of connection `dev`
/// (never another mount made at the same path since).
fn detach_own(mp: &Path, dev: u32) {
    if dev != 0 && connection_of(mp) == Some(dev) {
        let _ = lazy_unmount(mp);
    }
}

fn lazy_unmount(mp: &Path) -> anyhow::Result<()> {
    nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH)
        .with_context(|| format!("cannot detach {}", mp.display()))
}

/// Why `allow_root` mounts do not get the bpf tier: its programs answer
/// any process the kernel lets in, and with allow_root the kernel lets in
/// every user (allow_other), leaving the daemon to refuse all but the owner
/// and root; answers given in the kernel would skip that.
pub const ALLOW_ROOT_NO_BPF: &str = "-o allow_root mounts use the kernel tier: the bpf tier answers every \
     user the kernel admits (allow_root admits all and leaves refusing them to the daemon); use \
     allow_other, or no option, for the bpf tier";

/// Does the mount use `allow_root`?
pub fn allow_root(cfg: &MountConfig) -> bool {
    cfg.options.iter().any(|o| o == "allow_root")
}

/// Build the backend a config asks for.
pub fn build_backend(cfg: &MountConfig) -> anyhow::Result<SharedBackend> {
    let plain = |kind: BackendKind| -> anyhow::Result<SharedBackend> {
        Ok(match kind {
            BackendKind::Mem => Arc::new(MemBackend::new()),
            _ => {
                let src = cfg
                    .source
                    .as_ref()
                    .context("the dir backend needs a source directory")?;
                // noatime, relatime, strictatime: reads through the mount
                // update backing atimes as that mode says, whatever the
                // backing tree's own mount does.
                DirBackend::open(
                    src,
                    &crate::backend::dir::DirOptions {
                        atime: crate::backend::dir::Atime::of_options(&cfg.options),
                        inodes: cfg.inodes,
                        fd_cache: None,
                    },
                )?
            }
        })
    };
    Ok(match cfg.backend {
        BackendKind::Sim => Arc::new(SimBackend::new(plain(cfg.sim_inner)?, cfg.sim.clone())),
        k => plain(k)?,
    })
}

/// The mount(2) arguments, and whether other users may use the mount
/// (allow_other, allow_root).
fn fuse_config(cfg: &MountConfig) -> (crate::mount::MountSpec, bool) {
    let source = match cfg.backend {
        BackendKind::Mem => "efuse-mem".to_string(),
        _ => cfg
            .source
            .as_ref()
            .map(|s| s.display().to_string())
            .unwrap_or_else(|| "efuse".into()),
    };
    let allow_root = cfg.options.iter().any(|o| o == "allow_root");
    let others = allow_root || cfg.options.iter().any(|o| o == "allow_other");
    // The daemon runs as root. When other users may use the mount, the
    // kernel checks modes itself (default_permissions). When only the
    // mounting user can (the default), the kernel's check would add a
    // GETATTR per directory crossed whenever attributes are not cached;
    // the daemon answers ACCESS instead.
    let spec = crate::mount::MountSpec {
        source,
        flags: crate::mount::flags_for(&cfg.options),
        allow_other: others,
        default_permissions: others,
    };
    (spec, others)
}

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

/// Mount and serve until unmounted (the foreground daemon).
fn serve(cfg: &MountConfig, mp: &Path, log: Option<PathBuf>, ready: &mut Option<File>) -> anyhow::Result<()> {
    // Block termination signals before any thread exists, so that only the
    // signal thread below receives them.
    let mut sigs = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        sigs.add(s);
    }
    sigs.thread_block().context("cannot block signals")?;
    // The kernel applies the caller's umask before the request reaches us.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    raise_fd_limit();
    fixed_mmap_threshold();

    let mut cfg = cfg.clone();
    // Where the bpf tier's hook is, looked up once (it reads the kernel's
    // BTF): it decides `auto` and the FUSE a bpf mount goes through.
    let hook = matches!(cfg.offload, Offload::Auto | Offload::Bpf).then(crate::kfuse::hook);
    if cfg.offload == Offload::Auto {
        cfg.offload = match &hook {
            Some(Ok(_)) => Offload::Bpf,
            _ => Offload::Kernel,
        };
        if cfg.offload == Offload::Bpf && allow_root(&cfg) {
            tracing::info!("{ALLOW_ROOT_NO_BPF}");
            cfg.offload = Offload::Kernel;
        }
        tracing::info!(tier = %cfg.offload, "offload auto: picked the best tier this kernel has");
    }
    let cfg = &cfg;
    // The bpf tier goes through whichever FUSE has the hook (checked by
    // preflight); every other tier through the kernel's own.
    let fuse = match (cfg.offload, hook) {
        (Offload::Bpf, Some(h)) => h.map_err(|e| anyhow::anyhow!(e))?.fuse(),
        _ => crate::kfuse::Fuse::Kernel,
    };
    let backend = build_backend(cfg)?;
    let kind = backend.kind();
    // Tracing starts before the mount so that FUSE_INIT is counted.
    let slow_ns = cfg.trace_slow_us * 1000;
    let (tracer, trace_off_reason) = if cfg.trace {
        match crate::trace::Tracer::start(slow_ns, fuse.trace_system()) {
            Ok(t) => (Some(t), None),
            Err(e) => {
                tracing::warn!("eBPF tracing unavailable, mounting without it: {e:#}");
                (None, Some(format!("{e:#}")))
            }
        }
    } else {
        (None, Some("disabled (--trace off)".to_string()))
    };
    let k = &cfg.kernel;
    let mut staging_dir = None;
    let mut staging = None;
    if backend.is_remote() && k.passthrough && k.staging_max_mib > 0 {
        let dir = k
            .staging_dir
            .clone()
            .unwrap_or_else(|| Path::new("/var/cache/efuse").join(mount_id(mp)));
        match crate::staging::Staging::open(&dir, k.staging_max_mib << 20, k.staging_max_file_mib << 20) {
            Ok(s) => {
                tracing::info!(dir = %dir.display(), "staging remote files locally for passthrough");
                staging = Some(s);
                staging_dir = Some(dir);
            }
            Err(e) => {
                tracing::warn!("no local staging ({e:#}); remote files are read through the page cache")
            }
        }
    }
    let fs = Arc::new(EfuseFs::build(
        backend,
        crate::fs::FsConfig {
            tier: cfg.offload,
            kernel: cfg.kernel.clone(),
            bpf: cfg.bpf.clone(),
            xattr: cfg.xattr,
            others_may_use: cfg
                .options
                .iter()
                .any(|o| o == "allow_other" || o == "allow_root"),
            bpf_refusal: allow_root(cfg).then_some(ALLOW_ROOT_NO_BPF),
            staging,
        },
    ));
    if !fs.xattrs() {
        tracing::info!(
            backend = %kind,
            "extended attributes off (-o xattr={}): the kernel answers EOPNOTSUPP after the first request",
            cfg.xattr
        );
    }
    // Export handles an earlier daemon of this tree gave out stay valid.
    let handle_table = (cfg.backend == BackendKind::Dir)
        .then(|| cfg.source.clone())
        .flatten()
        .zip(fs.root_identity());
    if let Some((src, root)) = &handle_table {
        let entries = crate::export_table::take(Path::new(crate::export_table::DIR), src, root);
        if !entries.is_empty() {
            let n = fs.import_handles(entries);
            tracing::info!(n, "export handles of the previous daemon taken over");
        }
    }
    let metrics = Arc::new(Metrics::default());
    let started = Instant::now();
    let (spec, others) = fuse_config(cfg);
    let fd = crate::mount::mount_fuse(mp, &spec, fuse)
        .with_context(|| format!("cannot mount on {}", mp.display()))?;
    // The module's control filesystem is nobody else's to mount.
    fuse.mount_control();
    let dev = connection_of(mp).unwrap_or(0);
    let allow_root = cfg.options.iter().any(|o| o == "allow_root");
    let (f2, m2) = (fs.clone(), metrics.clone());
    // What needs the session is handed over before its first request is
    // read: no request is served without its kernel invalidations.
    fs.set_connection(dev, fuse);
    let session = crate::transport::Session::start(
        fd,
        |dev| {
            f2.set_notifier(Arc::new(crate::fuse::Notify::new(dev.clone())));
            let d = crate::fuse::Dispatcher::new(f2, m2, dev);
            // SAFETY: geteuid cannot fail.
            let me = unsafe { libc::geteuid() };
            if others && !allow_root {
                d
            } else {
                d.restrict(me, allow_root)
            }
        },
        cfg.transport,
        cfg.threads,
    );
    let session = match session {
        Ok(s) => s,
        Err(e) => {
            // The kernel mounted but INIT or the transport failed: leave no
            // dead mount behind.
            detach_own(mp, dev);
            return Err(e).with_context(|| format!("cannot serve {}", mp.display()));
        }
    };
    let transport = session.in_use().clone();
    if cfg.offload == Offload::Bpf
        && let Err(e) = fs.attach_bpf()
    {
        // The hook exists (checked above) but loading failed: serve with
        // the kernel tier rather than not at all.
        tracing::error!("bpf tier unavailable, falling back to the kernel tier: {e:#}");
        fs.set_tier(Offload::Kernel);
    }
    if cfg.kernel.watch {
        let f = fs.clone();
        let sink: crate::backend::ChangeSink = Arc::new(move |ev| match ev {
            crate::backend::ChangeEvent::Changed { dir, name, child } => {
                f.backend_changed(dir, name.as_deref(), child)
            }
            crate::backend::ChangeEvent::Overflow => {
                tracing::warn!("change events overflowed; invalidating every cached entry");
                f.invalidate_all();
            }
        });
        match fs.backend().watch(sink) {
            Ok(true) => tracing::debug!("watching the backend for changes"),
            Ok(false) => tracing::info!(
                "backend {kind} reports no changes: kernel caches of changes made behind the mount \
                 last up to the entry/attr TTL"
            ),
            Err(e) => tracing::warn!(
                "cannot watch the backend ({e:#}); changes behind the mount are seen after the TTL"
            ),
        }
    }
    let tracer = match tracer {
        Some(mut t) => match t.set_connection(dev) {
            Ok(()) => Some(parking_lot::Mutex::new(t)),
            Err(e) => {
                tracing::warn!("cannot set the trace filter, tracing off: {e:#}");
                None
            }
        },
        None => None,
    };
    tracing::info!(
        mountpoint = %mp.display(),
        backend = %kind,
        offload = %cfg.offload,
        transport = %transport,
        connection = dev,
        ms = started.elapsed().as_millis() as u64,
        "mounted"
    );
    let record = MountRecord {
        mountpoint: mp.to_owned(),
        source: cfg
            .source
            .as_ref()
            .map(|s| s.display().to_string())
            .unwrap_or_default(),
        backend: kind,
        inodes: fs
            .backend()
            .inode_mode()
            .map_or_else(|| "-".to_string(), |m| m.to_string()),
        // The tier in effect: `auto` resolved, a failed bpf attach fallen back.
        offload: fs.tier().to_string(),
        transport: transport.kind.to_string(),
        pid: std::process::id(),
        connection: dev,
        fuse,
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        log,
    };
    if let Err(e) = write_record(&record) {
        tracing::warn!("cannot write mount record: {e:#}");
    }
    let control = Arc::new(crate::control::ControlState {
        fs: fs.clone(),
        metrics: metrics.clone(),
        trace_off_reason: if tracer.is_none() {
            trace_off_reason.or_else(|| Some("trace filter failed".into()))
        } else {
            None
        },
        tracer,
        slow_ns,
        mountpoint: mp.to_owned(),
        backend: record.backend.clone(),
        connection: dev,
        started,
        transport: transport.to_string(),
    });
    let socket = crate::control::serve(control).context("control socket")?;
    let mp_sig = mp.to_owned();
    std::thread::Builder::new()
        .name("efuse-signals".into())
        .spawn(move || {
            if let Ok(sig) = sigs.wait() {
                tracing::info!(?sig, "unmounting on signal");
                if let Err(e) = lazy_unmount(&mp_sig) {
                    tracing::error!("{e:#}");
                }
            }
        })?;
    if let Some(mut r) = ready.take() {
        r.write_all(b"ready\n")?;
    }
    let res = session.run();
    // The session ends when the mount is gone (ENODEV), was aborted
    // (ECONNABORTED) or on an error; in the last case nobody unmounted:
    // detach what is still ours so no dead mount stays behind.
    detach_own(mp, dev);
    let res = match res {
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
            tracing::info!("the FUSE connection was aborted");
            Ok(())
        }
        r => r,
    };
    // Take over the programs' lookup counts before the numbers are final.
    fs.detach_bpf();
    if let Some((src, _)) = &handle_table
        && let Some((root, entries)) = fs.export_handles()
        && let Err(e) = crate::export_table::save(Path::new(crate::export_table::DIR), src, &root, &entries)
    {
        tracing::warn!("export handles will not survive this daemon: {e:#}");
    }
    let excess = fs.inodes().excess_forgets();
    if excess > 0 {
        tracing::error!(excess, "the kernel forgot more lookups than efuse counted");
    }
    // Staged copies are not trusted by a later daemon: free the space now.
    if let Some(dir) = staging_dir {
        let _ = fs::remove_dir_all(dir);
    }
    let _ = fs::remove_file(record_path(mp));
    let _ = fs::remove_file(socket);
    tracing::info!(mountpoint = %mp.display(), "unmounted; daemon exiting");
    res.context("FUSE session failed")
}

/// The inode tables of a big tree are hash tables of tens of MiB that
/// double as they grow. glibc's malloc raises its mmap threshold to the
/// size of any mmapped block freed, so after the first doubling the tables
/// come from the heap, and every outgrown table stays resident (a million
/// inodes: ~100 MiB kept for nothing). A fixed threshold of 4 MiB keeps
/// them mmapped (freed back to the kernel on each growth), and request
/// buffers (1 MiB at most) on the heap.
fn fixed_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    {
        const M_MMAP_THRESHOLD: libc::c_int = -3;
        // SAFETY: mallopt takes plain integers; an unknown value is refused.
        unsafe { libc::mallopt(M_MMAP_THRESHOLD, 4 << 20) };
    }
}

/// The `dir` backend holds one descriptor per inode the kernel knows (the
/// jail), so a big tree needs far more than the usual 1024: raise the limit
/// to the system maximum (`fs.nr_open`), as root may.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let max = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    let want = max.max(hard);
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let (now, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((soft, hard));
    tracing::debug!(before = soft, now, "open file limit");
}

/// FUSE connection id of the mount at `mp` (the kernel dev_t).
pub fn connection_of(mp: &Path) -> Option<u32> {
    mounted_at(mp).ok().flatten().map(|m| m.dev)
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

/// Wait until process `pid` has exited entirely (every thread gone, so
/// every descriptor it held, backing files included, is closed), at most
/// `d`. True if it has. A zombie leader whose other threads still run is
/// not gone yet: the pidfd becomes readable only once the thread group is
/// empty.
pub fn wait_exit(pid: u32, d: Duration) -> bool {
    // SAFETY: pidfd_open has no memory arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        // ESRCH: already gone. Anything else (pre-5.3 kernel): poll /proc.
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            return true;
        }
        let deadline = Instant::now() + d;
        while pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        return !pid_alive(pid);
    }
    // SAFETY: a descriptor we own from here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let deadline = Instant::now() + d;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n > 0 {
            return true;
        }
        if n == 0 || (n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)) {
            return false;
        }
    }
}

/// The daemon pid of a record, if that process still is an efuse daemon
/// (not a reused pid).
fn daemon_pid(r: &MountRecord) -> Option<u32> {
    let comm = fs::read_to_string(format!("/proc/{}/comm", r.pid)).ok()?;
    let comm = comm.trim_end();
    (pid_alive(r.pid) && (comm.starts_with("efuse") || comm.starts_with("mount.fuse"))).then_some(r.pid)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_is_lexical() {
        assert_eq!(
            absolute(Path::new("/a/b/../c/./d")).unwrap(),
            PathBuf::from("/a/c/d")
        );
        assert_eq!(absolute(Path::new("/..")).unwrap(), PathBuf::from("/"));
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), PathBuf::from("/mnt/a b"));
        assert_eq!(unescape_mountinfo("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn mountinfo_lists_root() {
        let all = mountinfo().unwrap();
        assert!(all.iter().any(|m| m.mountpoint == Path::new("/")));
    }

    #[test]
    fn mount_ids_differ() {
        assert_ne!(mount_id(Path::new("/a")), mount_id(Path::new("/b")));
    }
}
