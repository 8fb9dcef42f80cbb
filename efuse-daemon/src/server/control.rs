//! The control socket server of one mount's daemon (the protocol is
//! [`crate::control`]): statistics, tier switches and prefetch requests
//! from the client commands, answered on a thread of its own, which also
//! drains the trace ring buffer so it does not overflow between requests.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use parking_lot::Mutex;

use crate::config::Offload;
use crate::control::{MountStats, Request, Response, Switched, TraceStatus, process_usage, socket_path};
use crate::fs::SharedFs;
use crate::metrics::Metrics;
use crate::trace::Tracer;

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
