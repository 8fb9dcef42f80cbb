//! The control protocol of a mount's daemon, shared by its server
//! (`crate::server::control`) and the client commands: the socket
//! `/run/efuse/<id>.sock`, root only (0600 in a 0700 directory).
//!
//! One JSON [`Request`] per line, one JSON [`Response`] per line:
//! `{"cmd":"stats"}` returns [`MountStats`]. A bad request gets
//! `{"ok":false,"error":...}` and the connection stays usable.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::config::Offload;
use crate::metrics::OpCount;
use crate::trace::KernelOpStats;

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
    pub cache: Option<crate::fs::cache::CacheStats>,
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

/// A request to a daemon.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Are you there?
    Ping,
    /// Statistics ([`MountStats`]).
    Stats,
    /// Switch tier.
    Offload {
        /// The tier to switch to.
        tier: Offload,
    },
    /// Prefetch a tree into the bpf tier's maps.
    Prefetch {
        /// Relative to the mount's root.
        path: PathBuf,
        /// At most this many entries.
        max: usize,
    },
}

/// A daemon's answer.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    /// Done.
    pub ok: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Answer to [`Request::Stats`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<MountStats>,
    /// Answer to [`Request::Offload`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switched: Option<Switched>,
    /// Answer to [`Request::Prefetch`]: entries prefetched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetched: Option<usize>,
}

impl Response {
    /// A failure saying why.
    pub fn failed(error: String) -> Self {
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
    Path::new(crate::server::state::STATE_DIR).join(format!("{}.sock", crate::server::state::mount_id(mp)))
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
