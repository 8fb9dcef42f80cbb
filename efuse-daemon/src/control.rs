//! The per-mount control socket: `/run/efuse/<id>.sock`, root only (0600
//! in a 0700 directory).
//!
//! One JSON request per line, one JSON response per line. Requests:
//! `{"cmd":"stats"}` returns [`MountStats`]. A bad request gets
//! `{"ok":false,"error":...}` and the connection stays usable.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::config::Offload;
use crate::fs::SharedFs;
use crate::metrics::{Metrics, OpCount};
use crate::trace::{KernelOpStats, Tracer};

/// State of tracing for a mount.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TraceStatus {
    /// Programs attached and counting.
    pub enabled: bool,
    /// Why not, when disabled.
    pub reason: Option<String>,
    /// Ring-buffer events lost to overflow.
    pub dropped: u64,
    /// Ring-buffer events received (slow requests).
    pub events: u64,
    /// Threshold of a "slow" request, ns.
    pub slow_ns: u64,
}

/// Everything `efuse stats` shows.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MountStats {
    /// Mount point.
    pub mountpoint: PathBuf,
    /// Backend label.
    pub backend: String,
    /// Offload tier.
    pub offload: String,
    /// Request transport (e.g. `uring (2 queues, one per CPU)`).
    #[serde(default)]
    pub transport: String,
    /// FUSE connection id.
    pub connection: u32,
    /// The kernel FUSE the mount goes through.
    #[serde(default)]
    pub fuse: crate::kfuse::Fuse,
    /// Where the bpf tier's hook is, once the tier was attached.
    #[serde(default)]
    pub hook: Option<crate::kfuse::Hook>,
    /// Seconds since the mount was made.
    pub uptime_s: f64,
    /// Tracing state.
    pub trace: TraceStatus,
    /// Kernel-side per-opcode statistics (from the tracepoints).
    pub kernel: Vec<KernelOpStats>,
    /// The daemon's own per-opcode counters.
    pub daemon: Vec<OpCount>,
    /// Inodes the kernel holds and the sum of their lookup counts.
    pub inodes: (usize, u64),
    /// FORGETs beyond the lookups counted (0 when the accounting is right).
    #[serde(default)]
    pub excess_forgets: u64,
    /// The bpf tier.
    #[serde(default)]
    pub bpf: crate::bpf::BpfStats,
    /// Daemon-side metadata cache (remote backends).
    pub cache: Option<crate::cache::CacheStats>,
    /// Most backend calls in flight at once (backends that count them).
    pub backend_max_inflight: Option<u64>,
    /// Changes seen behind the mount not yet handled (inotify): false once
    /// every change made before the stats call has been handled.
    #[serde(default)]
    pub changes_pending: bool,
    /// The backend's node table (dir backend).
    #[serde(default)]
    pub backend_nodes: Option<crate::backend::NodeStats>,
    /// The daemon's resident memory (KiB).
    #[serde(default)]
    pub daemon_rss_kib: u64,
    /// The daemon's open descriptors.
    #[serde(default)]
    pub daemon_fds: u64,
}

/// Resident set (KiB) and open descriptors of the process whose /proc
/// directory is `proc_dir` (`/proc/self`, `/proc/<pid>`).
pub fn process_usage(proc_dir: &str) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("{proc_dir}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("{proc_dir}/fd")).ok()?.count() as u64;
    Some((rss, fds))
}

/// What the control server needs from the daemon.
pub struct ControlState {
    /// The filesystem.
    pub fs: SharedFs,
    /// Daemon counters.
    pub metrics: Arc<Metrics>,
    /// Tracer, when tracing is on.
    pub tracer: Option<Mutex<Tracer>>,
    /// Why tracing is off, when it is.
    pub trace_off_reason: Option<String>,
    /// Slow-request threshold.
    pub slow_ns: u64,
    /// Mount point.
    pub mountpoint: PathBuf,
    /// Backend label.
    pub backend: String,
    /// Connection id.
    pub connection: u32,
    /// When the mount became ready.
    pub started: Instant,
    /// The request transport, described.
    pub transport: String,
}

impl ControlState {
    /// Current statistics.
    pub fn stats(&self) -> MountStats {
        let mut trace = TraceStatus {
            enabled: self.tracer.is_some(),
            reason: self.trace_off_reason.clone(),
            slow_ns: self.slow_ns,
            ..Default::default()
        };
        let mut kernel = Vec::new();
        if let Some(t) = &self.tracer {
            let mut t = t.lock();
            let _ = t.drain_events();
            match t.op_stats() {
                Ok(k) => kernel = k,
                Err(e) => tracing::warn!("reading trace maps: {e:#}"),
            }
            trace.dropped = t.dropped().unwrap_or(0);
            trace.events = t.events_seen();
        }
        let usage = process_usage("/proc/self").unwrap_or_default();
        MountStats {
            mountpoint: self.mountpoint.clone(),
            backend: self.backend.clone(),
            offload: self.fs.tier().to_string(),
            transport: self.transport.clone(),
            connection: self.connection,
            fuse: self.fs.kfuse(),
            hook: self.fs.bpf_hook(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            trace,
            kernel,
            daemon: self.metrics.snapshot(),
            inodes: self.fs.inodes().totals(),
            excess_forgets: self.fs.inodes().excess_forgets(),
            bpf: self.fs.bpf_stats(),
            cache: self.fs.cache_stats(),
            backend_max_inflight: self.fs.backend().max_concurrency(),
            changes_pending: self.fs.backend().changes_pending(),
            backend_nodes: self.fs.backend().node_stats(),
            daemon_rss_kib: usage.0,
            daemon_fds: usage.1,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
enum Request {
    Ping,
    Stats,
    Offload { tier: Offload },
    Prefetch { path: PathBuf, max: usize },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Response {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stats: Option<MountStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    switched: Option<Switched>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefetched: Option<usize>,
}

impl Response {
    fn failed(error: String) -> Self {
        Self {
            error: Some(error),
            ..Default::default()
        }
    }
}

/// Result of a tier switch.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Switched {
    /// Tier before.
    pub previous: Offload,
    /// Tier now.
    pub current: Offload,
    /// Kernel cache entries invalidated.
    pub invalidated: usize,
}

impl ControlState {
    /// Switch the mount's tier without remounting. Going to `off`
    /// invalidates every name and inode the kernel caches, so nothing stale
    /// is served; new opens stop using passthrough (an inode with a
    /// passthrough open keeps it until its last close).
    pub fn switch(&self, tier: Offload) -> anyhow::Result<Switched> {
        let tier = match tier {
            // A mount that refuses the tier (allow_root) says so first.
            Offload::Bpf if self.fs.bpf_refused() => Offload::Bpf,
            Offload::Bpf => {
                if let Err(why) = crate::kfuse::hook_for(self.fs.kfuse()) {
                    bail!("{why}")
                }
                Offload::Bpf
            }
            Offload::Auto if self.fs.bpf_refused() => Offload::Kernel,
            Offload::Auto if crate::kfuse::hook_for(self.fs.kfuse()).is_ok() => Offload::Bpf,
            Offload::Auto => Offload::Kernel,
            t => t,
        };
        if tier == Offload::Bpf {
            self.fs.attach_bpf().context("attaching the bpf tier")?;
        }
        let previous = self.fs.set_tier(tier);
        let invalidated = if tier == Offload::Off && previous != Offload::Off {
            self.fs.invalidate_all()
        } else {
            0
        };
        tracing::info!(%previous, current = %tier, invalidated, "offload tier switched");
        Ok(Switched {
            previous,
            current: tier,
            invalidated,
        })
    }
}

impl ControlState {
    /// Put the tree under `path` (relative to the mount root) into the bpf
    /// tier's maps, at most `max` entries; returns how many.
    pub fn prefetch(&self, path: &Path, max: usize) -> anyhow::Result<usize> {
        if self.fs.tier() != Offload::Bpf || !self.fs.bpf_stats().attached {
            bail!(
                "prefetch fills the bpf tier's maps; this mount's offload is {}",
                self.fs.tier()
            );
        }
        let dir = self.fs.resolve(path).map_err(|e| {
            anyhow::anyhow!(
                "{}: {}",
                path.display(),
                std::io::Error::from_raw_os_error(e.to_errno())
            )
        })?;
        Ok(self.fs.prefetch_tree(dir, max))
    }
}

/// Ask the daemon of mount `mp` to prefetch `rel` (relative to the root).
pub fn prefetch(mp: &Path, rel: &Path, max: usize) -> anyhow::Result<usize> {
    let req = serde_json::json!({"cmd": "prefetch", "path": rel, "max": max});
    // A tree of millions of entries takes a while to load (and longer on a
    // busy machine): the daemon answers when it is done.
    let r = request(mp, &req.to_string(), PREFETCH_TIMEOUT)?;
    r.prefetched.context("daemon sent no answer")
}

/// Socket path of a mount.
pub fn socket_path(mp: &Path) -> PathBuf {
    Path::new(crate::state::STATE_DIR).join(format!("{}.sock", crate::state::mount_id(mp)))
}

/// Serve the control socket on a background thread; also drains the trace
/// ring buffer periodically so it does not overflow between `stats` calls.
pub fn serve(state: Arc<ControlState>) -> anyhow::Result<PathBuf> {
    let path = socket_path(&state.mountpoint);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let st = state.clone();
    std::thread::Builder::new()
        .name("efuse-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        let st = st.clone();
                        let _ = std::thread::Builder::new()
                            .name("efuse-control-conn".into())
                            .spawn(move || handle(&st, c));
                    }
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        tracing::warn!("control socket: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    if state.tracer.is_some() {
        let st = state.clone();
        std::thread::Builder::new()
            .name("efuse-trace".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_millis(200));
                    if let Some(t) = &st.tracer
                        && let Err(e) = t.lock().drain_events()
                    {
                        tracing::warn!("draining trace events: {e:#}");
                    }
                }
            })?;
    }
    Ok(path)
}

fn handle(state: &ControlState, conn: UnixStream) {
    let mut out = match conn.try_clone() {
        Ok(o) => o,
        Err(_) => return,
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Ping) => Response {
                ok: true,
                ..Default::default()
            },
            Ok(Request::Stats) => Response {
                ok: true,
                stats: Some(state.stats()),
                ..Default::default()
            },
            Ok(Request::Offload { tier }) => match state.switch(tier) {
                Ok(s) => Response {
                    ok: true,
                    switched: Some(s),
                    ..Default::default()
                },
                Err(e) => Response::failed(format!("{e:#}")),
            },
            Ok(Request::Prefetch { path, max }) => match state.prefetch(&path, max) {
                Ok(n) => Response {
                    ok: true,
                    prefetched: Some(n),
                    ..Default::default()
                },
                Err(e) => Response::failed(format!("{e:#}")),
            },
            Err(e) => Response::failed(format!("bad request: {e}")),
        };
        let mut text = serde_json::to_string(&resp).unwrap_or_else(|_| "{\"ok\":false}".into());
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

/// True if the daemon of mount `mp` answers its control socket within `d`
/// (a check that never touches the mount).
pub fn ping(mp: &Path, d: Duration) -> bool {
    let Ok(mut s) = UnixStream::connect(socket_path(mp)) else {
        return false;
    };
    if s.set_read_timeout(Some(d)).is_err() || s.set_write_timeout(Some(d)).is_err() {
        return false;
    }
    if s.write_all(b"{\"cmd\":\"ping\"}\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok()
        && serde_json::from_str::<Response>(&line).is_ok_and(|r| r.ok)
}

/// Ask the daemon of mount `mp` for its statistics.
pub fn query_stats(mp: &Path) -> anyhow::Result<MountStats> {
    let r = request(mp, "{\"cmd\":\"stats\"}", REQUEST_TIMEOUT)?;
    r.stats.context("daemon sent no stats")
}

/// Ask the daemon of mount `mp` to switch tier.
pub fn switch_tier(mp: &Path, tier: Offload) -> anyhow::Result<Switched> {
    let r = request(
        mp,
        &format!("{{\"cmd\":\"offload\",\"tier\":\"{tier}\"}}"),
        REQUEST_TIMEOUT,
    )?;
    r.switched.context("daemon sent no answer")
}

/// How long a stats or tier-switch request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a prefetch may take.
const PREFETCH_TIMEOUT: Duration = Duration::from_secs(3600);

fn request(mp: &Path, req: &str, timeout: Duration) -> anyhow::Result<Response> {
    let path = socket_path(mp);
    let mut s = UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach the efuse daemon of {} at {} (is it an efuse mount? are you root?)",
            mp.display(),
            path.display()
        )
    })?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => anyhow::anyhow!(
                "the efuse daemon of {} did not answer within {timeout:?} (busy, or its backend stalls); \
             the request may still complete",
                mp.display()
            ),
            _ => anyhow::Error::new(e).context("reading the daemon's answer"),
        })?;
    let r: Response = serde_json::from_str(&line).context("bad answer from the daemon")?;
    if !r.ok {
        bail!("{}", r.error.unwrap_or_default());
    }
    Ok(r)
}
