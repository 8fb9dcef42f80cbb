//! How FUSE requests travel between the kernel and the daemon.
//!
//! ```text
//!            /dev/fuse                       io_uring (one queue per CPU)
//!   classic::worker × N threads        uring::queue × CPUs, pinned
//!     read(2) -> wire::split             CQE -> header/op_in/payload
//!              \                        /
//!               wire::decode  ->  dispatch::Dispatcher::handle  ->  EfuseFs
//!               wire::Out (reply encoded into the transport's buffer)
//! ```
//!
//! FUSE_INIT always arrives over /dev/fuse ([`Session::start`] answers it
//! before any worker starts). With io_uring the classic reader keeps
//! running for what the kernel still sends there (FORGET, INTERRUPT, and
//! requests before every queue has registered); notifications are written
//! to /dev/fuse by [`reply::Notify`].
//!
//! Owns: the wire format ([`abi`] constants, [`wire`] length-checked
//! decoding and the reply buffer, [`reply`] encoders of the filesystem's
//! results), the session (INIT before any worker) and both transports.
//! Invariants: every request gets exactly one reply or none (FORGET,
//! BATCH_FORGET, INTERRUPT); a request that cannot be decoded, or whose
//! handling panics, is answered with an errno and the worker keeps
//! serving; a reply that does not fit its buffer is EIO, never truncated.

pub mod abi;
pub mod classic;
pub mod reply;
pub mod uring;
pub mod wire;

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, bail};

use crate::config::Transport;
use crate::dispatch::{Dispatcher, Done};

/// Decode and serve one request whatever the transport. A panic anywhere
/// under it (decoder, dispatcher, filesystem, backend) answers the request
/// EIO, is logged once with its opcode and node, and leaves the worker
/// serving: a request the daemon never answers would hang its caller until
/// the connection is aborted.
pub fn dispatch(
    disp: &Dispatcher,
    h: &wire::InHeader,
    fixed: &[u8],
    tail: &[u8],
    out: &mut wire::Out,
) -> Done {
    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        match wire::decode(h.opcode, fixed, tail) {
            Ok(r) => disp.handle(h, r, out),
            Err(e) => {
                tracing::debug!(opcode = h.opcode, errno = e, "undecodable FUSE request");
                Done::Error(e)
            }
        }
    }));
    let no_reply = abi::opcode::no_reply(h.opcode);
    match served {
        // FORGETs have no reply, not even for a malformed one: the kernel
        // waits for none.
        Ok(_) if no_reply => Done::NoReply,
        Ok(done) => done,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            tracing::error!(
                op = %crate::metrics::opcode_name(h.opcode),
                nodeid = h.nodeid,
                unique = h.unique,
                "a request panicked, answered EIO: {what}"
            );
            out.clear();
            if no_reply {
                Done::NoReply
            } else {
                Done::Error(libc::EIO)
            }
        }
    }
}

/// The transport a session ended up with, for `efuse status`/`stats`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InUse {
    /// `uring` or `classic`.
    pub kind: &'static str,
    /// Queues (uring) or worker threads (classic).
    pub threads: usize,
    /// Why not io_uring, when `auto` fell back.
    pub fallback: Option<String>,
}

impl std::fmt::Display for InUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            "uring" => write!(f, "uring ({} queues, one per CPU)", self.threads)?,
            k => write!(f, "{k} ({} threads)", self.threads)?,
        }
        if let Some(why) = &self.fallback {
            write!(f, "; not io_uring: {why}")?;
        }
        Ok(())
    }
}

/// A serving FUSE session.
pub struct Session {
    threads: Vec<JoinHandle<io::Result<()>>>,
    in_use: InUse,
    /// The I/O pool of a remote backend; dropped without waiting for
    /// backend calls still running (their replies have nowhere to go).
    pool: Option<tokio::runtime::Runtime>,
}

/// Backend calls in flight at once on the pool, at most.
const REMOTE_CONCURRENCY: usize = 256;

/// Worker threads of the classic transport when not configured: four per
/// CPU (4..=64). Measured here (2 vCPUs, stat with TTL 0, medians of three
/// interleaved runs): 2 threads 252 µs, 4 198 µs, 8 85 µs, 16 94 µs. With
/// fewer threads than requests in flight a request waits for a worker to
/// come back from writing its reply.
pub fn default_threads() -> usize {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    (4 * cpus).clamp(4, 64)
}

impl Session {
    /// Answer FUSE_INIT on `dev` and start serving with `want`.
    pub fn start(
        dev: OwnedFd,
        disp_new: impl FnOnce(Arc<OwnedFd>) -> Dispatcher,
        want: Transport,
        threads: usize,
    ) -> anyhow::Result<Self> {
        let dev = Arc::new(dev);
        let disp = Arc::new(disp_new(dev.clone()));
        let mut fallback = None;
        let try_uring = match want {
            Transport::Classic => false,
            Transport::Uring | Transport::Auto => match uring::unavailable() {
                None => true,
                Some(why) if want == Transport::Uring => bail!("-o transport=uring: {why}"),
                Some(why) => {
                    fallback = Some(why);
                    false
                }
            },
        };
        handshake(&dev, &disp, try_uring)?;
        let pool = if disp.fs().backend().is_remote() {
            match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .max_blocking_threads(REMOTE_CONCURRENCY)
                .thread_name("efuse-io")
                .build()
            {
                Ok(rt) => Some(rt),
                Err(e) => {
                    tracing::warn!("no I/O pool ({e}); backend calls run on the FUSE threads");
                    None
                }
            }
        } else {
            None
        };
        let handle = pool.as_ref().map(|p| p.handle().clone());
        let mut out = Vec::new();
        let mut kind = "classic";
        let mut n = if threads == 0 { default_threads() } else { threads };
        if try_uring {
            if !disp.negotiated().uring.load(std::sync::atomic::Ordering::Relaxed) {
                let why = "the kernel did not offer FUSE_OVER_IO_URING in FUSE_INIT".to_string();
                if want == Transport::Uring {
                    bail!("-o transport=uring: {why}");
                }
                fallback = Some(why);
            } else {
                match uring::start(&dev, &disp, handle.clone()) {
                    Ok(q) => {
                        kind = "uring";
                        n = q.len();
                        out = q;
                    }
                    Err(e) => {
                        // The kernel falls back to /dev/fuse by itself when a
                        // registration fails.
                        if want == Transport::Uring {
                            return Err(e).context("-o transport=uring");
                        }
                        tracing::warn!("io_uring queues failed, serving over /dev/fuse: {e}");
                        fallback = Some(e.to_string());
                    }
                }
            }
        }
        if let Some(why) = &fallback
            && want == Transport::Auto
        {
            tracing::info!("transport: classic /dev/fuse ({why})");
        }
        // The classic readers: all the work without io_uring; with it, what
        // the kernel still sends over /dev/fuse.
        let readers = if kind == "uring" { 1 } else { n };
        for i in 0..readers {
            let (d, f, h) = (disp.clone(), dev.clone(), handle.clone());
            out.push(
                std::thread::Builder::new()
                    .name(format!("efuse-w{i}"))
                    .spawn(move || classic::worker(f, d, h))
                    .context("cannot start a FUSE worker thread")?,
            );
        }
        Ok(Self {
            threads: out,
            in_use: InUse {
                kind,
                threads: n,
                fallback,
            },
            pool,
        })
    }

    /// The transport in use.
    pub fn in_use(&self) -> &InUse {
        &self.in_use
    }

    /// Serve until the connection ends (unmount, abort); the first error of
    /// a worker, if any.
    pub fn run(mut self) -> io::Result<()> {
        let mut res = Ok(());
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if res.is_ok() {
                        res = Err(e);
                    }
                }
                Err(_) => res = Err(io::Error::other("a FUSE worker thread panicked")),
            }
        }
        res
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(rt) = self.pool.take() {
            rt.shutdown_background();
        }
    }
}

/// Read FUSE_INIT from `dev` and answer it.
fn handshake(dev: &OwnedFd, disp: &Dispatcher, uring: bool) -> anyhow::Result<()> {
    let mut buf = vec![0u8; abi::REQUEST_BUF_LEN];
    loop {
        let n = match classic::read_request(dev, &mut buf).context("reading FUSE_INIT")? {
            classic::Read::Request(n) => n,
            classic::Read::Closed => bail!("the FUSE connection closed before FUSE_INIT"),
        };
        let (h, fixed, tail) = match wire::split(&buf[..n]) {
            Ok(x) => x,
            Err((h, e)) => {
                classic::write_reply(dev, &wire::out_header(h.unique, e, 0));
                continue;
            }
        };
        if h.opcode != abi::opcode::INIT {
            // Nothing else may come before INIT; refuse it and wait.
            classic::write_reply(dev, &wire::out_header(h.unique, libc::EIO, 0));
            continue;
        }
        let mut body = [0u8; 64];
        let mut out = wire::Out::new(&mut body);
        let res = match wire::decode(h.opcode, fixed, tail) {
            Ok(wire::Req::Init(i)) => disp.init(&i, &mut out, uring),
            _ => Err(libc::EINVAL),
        };
        let mut msg = Vec::with_capacity(80);
        match res {
            Ok(()) => {
                msg.extend_from_slice(&wire::out_header(h.unique, 0, out.len()));
                msg.extend_from_slice(out.bytes());
                classic::write_reply(dev, &msg);
                return Ok(());
            }
            Err(e) => {
                classic::write_reply(dev, &wire::out_header(h.unique, e, 0));
                bail!("FUSE_INIT refused: {}", io::Error::from_raw_os_error(e));
            }
        }
    }
}
