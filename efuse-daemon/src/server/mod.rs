//! The daemon of one mount: preflight checks, the backend, the tier it
//! starts in, mount(2), and its serving loop (transport, control socket,
//! bpf tier, inotify), until unmount; with [`state`] (its record under
//! /run/efuse and the mount table), [`export_table`] (export handles kept
//! across a restart) and [`control`] (the control socket server).
//!
//! Invariants: the filesystem is built in one pass and gets what needs
//! the session (notifier, connection, backing ids) before the first
//! request is read; the record, socket and state files are root-only; a
//! clean exit writes the export table, a killed daemon leaves the mount
//! answering ENOTCONN.
//!
//! `efuse mount` (see [`crate::cmd`]) runs `serve` in a
//! foreground process of its own; that process writes `ready` on the
//! pipe it was given once the kernel has answered FUSE_INIT.

pub mod control;
pub mod export_table;
pub mod state;
pub mod tier;

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

use crate::backend::SharedBackend;
use crate::backend::dir::DirBackend;
use crate::backend::mem::MemBackend;
use crate::backend::sim::SimBackend;
use crate::config::{BackendKind, MountConfig, Offload};
use crate::fs::EfuseFs;
use crate::metrics::Metrics;

use crate::server::state::*;

/// Checks before mounting, each failing with what to do about it.
pub(crate) fn preflight(cfg: &MountConfig, mp: &Path) -> anyhow::Result<()> {
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
    if cfg.offload == Offload::Bpf && tier::allow_root(cfg) {
        bail!("{}", tier::ALLOW_ROOT_NO_BPF);
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
pub(crate) fn detach_own(mp: &Path, dev: u32) {
    if dev != 0 && connection_of(mp) == Some(dev) {
        let _ = lazy_unmount(mp);
    }
}

pub(crate) fn lazy_unmount(mp: &Path) -> anyhow::Result<()> {
    nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH)
        .with_context(|| format!("cannot detach {}", mp.display()))
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
pub(crate) fn fuse_config(cfg: &MountConfig) -> (crate::mount::MountSpec, bool) {
    let source = match cfg.backend {
        BackendKind::Mem => "efuse-mem".to_string(),
        _ => cfg
            .source
            .as_ref()
            .map(|s| s.display().to_string())
            .unwrap_or_else(|| "efuse".into()),
    };
    let others = tier::allow_root(cfg) || cfg.options.iter().any(|o| o == "allow_other");
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

/// Mount and serve until unmounted (the foreground daemon).
pub(crate) fn serve(
    cfg: &MountConfig,
    mp: &Path,
    log: Option<PathBuf>,
    ready: &mut Option<File>,
) -> anyhow::Result<()> {
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
    let fuse = tier::choose(&mut cfg)?;
    let cfg = &cfg;
    let backend = build_backend(cfg)?;
    let kind = backend.kind();
    // Tracing starts before the mount so that FUSE_INIT is counted.
    let slow_ns = cfg.trace_slow_us * 1000;
    let (mut tracer, trace_off_reason) = if cfg.trace {
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
        match crate::fs::staging::Staging::open(&dir, k.staging_max_mib << 20, k.staging_max_file_mib << 20) {
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
    let (spec, others) = fuse_config(cfg);
    let fs = Arc::new(EfuseFs::build(
        backend,
        crate::fs::FsConfig {
            tier: cfg.offload,
            kernel: cfg.kernel.clone(),
            bpf: cfg.bpf.clone(),
            xattr: cfg.xattr,
            others_may_use: others,
            bpf_refusal: tier::allow_root(cfg).then_some(tier::ALLOW_ROOT_NO_BPF),
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
        let entries =
            crate::server::export_table::take(Path::new(crate::server::export_table::DIR), src, root);
        if !entries.is_empty() {
            let n = fs.import_handles(entries);
            tracing::info!(n, "export handles of the previous daemon taken over");
        }
    }
    let metrics = Arc::new(Metrics::default());
    let started = Instant::now();
    if let Some(t) = tracer.as_mut() {
        t.mark();
    }
    let fd = crate::mount::mount_fuse(mp, &spec, fuse)
        .with_context(|| format!("cannot mount on {}", mp.display()))?;
    // The module's control filesystem is nobody else's to mount.
    fuse.mount_control();
    let dev = connection_of(mp).unwrap_or(0);
    let allow_root = tier::allow_root(cfg);
    let (f2, m2) = (fs.clone(), metrics.clone());
    let session = crate::transport::Session::start(
        fd,
        |devfd| {
            // What needs the session is handed over before its first
            // request is read: no request is served without its kernel
            // invalidations.
            f2.connect(crate::fs::SessionLink {
                connection: dev,
                fuse,
                notifier: Arc::new(crate::transport::reply::Notify::new(devfd.clone())),
                passthrough: Arc::new(crate::fs::passthrough::Passthrough::new(devfd)),
            });
            let d = crate::dispatch::Dispatcher::new(f2, m2);
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
    let control = Arc::new(control::ControlState {
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
    let socket = control::serve(control).context("control socket")?;
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
        && let Some((root, entries)) = fs.export_handles(export_table::MAX_ENTRIES)
        && let Err(e) = crate::server::export_table::save(
            Path::new(crate::server::export_table::DIR),
            src,
            &root,
            &entries,
        )
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
