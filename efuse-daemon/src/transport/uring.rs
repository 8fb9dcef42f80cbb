//! FUSE-over-io_uring (Linux 6.14+): one ring queue per CPU, each served
//! by a thread pinned to that CPU.
//!
//! The kernel queues a request on the queue of the CPU its caller runs on
//! (`qid = task_cpu`), so the thread that serves it is on the same CPU: no
//! cross-CPU wake-up, which on an idle-halting vCPU costs tens of µs. Each
//! queue registers `DEPTH` entries (`FUSE_IO_URING_CMD_REGISTER`: a
//! header buffer and a payload buffer per entry); a request arrives as the
//! completion of an entry's command, and `COMMIT_AND_FETCH` posts the
//! reply and re-arms the entry in one submission. Through Linux 6.18 the
//! kernel uses the ring only once every possible CPU has a queue; until
//! then, and always for FORGET and INTERRUPT, requests come over /dev/fuse
//! (the classic reader keeps running).
//!
//! With a remote backend an entry's request runs on the I/O pool; the pool
//! thread writes the reply into the entry's buffers and hands the entry
//! back through an eventfd the ring reads, so only the queue's own thread
//! ever submits (IORING_SETUP_SINGLE_ISSUER).

use std::cell::UnsafeCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use parking_lot::Mutex;

use super::abi::{self, MAX_WRITE, OUT_HEADER_LEN, uring as u};
use super::wire::{self, Out};
use crate::dispatch::{Dispatcher, Done};

/// Entries per queue with a local backend (requests are served inline,
/// so more only lets the kernel hand over several at once).
const DEPTH: usize = 8;
/// Entries per queue with a remote backend (served concurrently on the pool).
const DEPTH_REMOTE: usize = 64;
/// Payload buffer per entry: the kernel requires max(8 KiB, max_write,
/// max_pages pages).
const PAYLOAD_LEN: usize = MAX_WRITE as usize;
/// user_data of the eventfd read.
const WAKE: u64 = u64::MAX;

/// Offsets in `fuse_uring_req_header`.
const OP_IN: usize = u::IN_OUT_HEADER_SZ;
const ENT: usize = u::IN_OUT_HEADER_SZ + u::OP_IN_OUT_SZ;

/// Why io_uring cannot be used here, or None if it can be tried.
pub fn unavailable() -> Option<String> {
    let p = std::path::Path::new("/sys/module/fuse/parameters/enable_uring");
    match std::fs::read_to_string(p) {
        Err(_) => Some(
            "this kernel has no FUSE-over-io_uring (needs Linux 6.14+ built with CONFIG_FUSE_IO_URING)"
                .into(),
        ),
        Ok(v) if v.trim() == "Y" || v.trim() == "1" => None,
        Ok(_) => Some(
            "the fuse module parameter enable_uring is off; an administrator enables it with \
             `echo 1 > /sys/module/fuse/parameters/enable_uring` (persistently: \
             `options fuse enable_uring=1` in /etc/modprobe.d/fuse.conf)"
                .into(),
        ),
    }
}

/// Number of possible CPUs (the kernel's queue count).
pub fn possible_cpus() -> usize {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let mut n = 0;
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => match (a.parse::<usize>(), b.parse::<usize>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 0,
            },
            None => 1,
        };
    }
    if n == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    } else {
        n
    }
}

/// One entry's buffers, shared by the kernel (between a command and its
/// completion) and by whichever thread serves the entry's request.
struct Ent {
    header: Box<[u8; u::REQ_HEADER_SZ]>,
    payload: Box<[u8]>,
    iov: [libc::iovec; 2],
}

/// Who holds an entry's buffers.
const KERNEL: u8 = 0;
const SERVING: u8 = 1;

/// One entry and who holds it. The kernel holds it from the submission of
/// its command until the command's completion; then the party serving its
/// request (the queue thread, or a pool thread), until the commit is
/// queued. [`Ents::claim`] and [`Claimed`]'s drop make that hand-over an
/// atomic state change that is checked, not only a convention.
struct Slot {
    owner: std::sync::atomic::AtomicU8,
    ent: UnsafeCell<Ent>,
}

/// A queue's entries.
struct Ents(Vec<Slot>);
// SAFETY: an entry's buffers are reached only through `Ents::claim`, which
// hands them to one party at a time (the atomic owner state), or by the
// kernel while the owner state says KERNEL.
unsafe impl Sync for Ents {}
// SAFETY: as above; the buffers are plain heap memory.
unsafe impl Send for Ents {}

/// Exclusive use of an entry, from its command's completion until its
/// commit is queued; dropping it gives the entry back to the kernel.
struct Claimed<'a>(&'a Slot);

impl std::ops::Deref for Claimed<'_> {
    type Target = Ent;
    fn deref(&self) -> &Ent {
        // SAFETY: the owner state is SERVING for this claim alone.
        unsafe { &*self.0.ent.get() }
    }
}

impl std::ops::DerefMut for Claimed<'_> {
    fn deref_mut(&mut self) -> &mut Ent {
        // SAFETY: the owner state is SERVING for this claim alone.
        unsafe { &mut *self.0.ent.get() }
    }
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        self.0.owner.store(KERNEL, std::sync::atomic::Ordering::Release);
    }
}

impl Ents {
    /// Take entry `i`, which the kernel just handed over with a
    /// completion. None (logged) if another party holds it: that would be
    /// a completion the kernel should not have produced, and serving it
    /// would share the buffers.
    fn claim(&self, i: usize) -> Option<Claimed<'_>> {
        let slot = self.0.get(i)?;
        match slot.owner.compare_exchange(
            KERNEL,
            SERVING,
            std::sync::atomic::Ordering::Acquire,
            std::sync::atomic::Ordering::Relaxed,
        ) {
            Ok(_) => Some(Claimed(slot)),
            Err(_) => {
                tracing::error!(
                    entry = i,
                    "io_uring entry completed while it is being served; ignored"
                );
                None
            }
        }
    }

    /// The iovec of entry `i` for its REGISTER command, before the kernel
    /// holds it.
    fn iov(&self, i: usize) -> *const libc::iovec {
        // SAFETY: called before any command is submitted: nobody else holds
        // the entry; only the address is taken.
        unsafe { (*self.0[i].ent.get()).iov.as_ptr() }
    }
}

/// Handed-back entries (served on the pool) with their commit ids, and the
/// eventfd that wakes the ring.
struct Returns {
    done: Mutex<Vec<(usize, u64)>>,
    efd: OwnedFd,
}

/// Start one queue per possible CPU and wait until each has registered its
/// entries. Returns the threads; an error if any queue failed (the kernel
/// then keeps using /dev/fuse).
pub fn start(
    dev: &Arc<OwnedFd>,
    disp: &Arc<Dispatcher>,
    pool: Option<tokio::runtime::Handle>,
) -> io::Result<Vec<std::thread::JoinHandle<io::Result<()>>>> {
    let n = possible_cpus();
    let (tx, rx) = mpsc::channel();
    let mut threads = Vec::with_capacity(n);
    let guard = Arc::new(Guard::new(n));
    for qid in 0..n {
        let (dev, disp, pool, tx, g) = (dev.clone(), disp.clone(), pool.clone(), tx.clone(), guard.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("efuse-q{qid}"))
                .spawn(move || {
                    let _live = g.enter(qid);
                    queue(qid as u16, &dev, &disp, pool, tx)
                })?,
        );
    }
    std::thread::Builder::new()
        .name("efuse-guard".into())
        .spawn(move || guard.run())?;
    drop(tx);
    for _ in 0..n {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::other("an io_uring queue did not register within 10 s")),
        }
    }
    Ok(threads)
}

/// Keeps the SCHED_IDLE queue threads from starving.
///
/// SCHED_IDLE wins the round trip on an idle machine (see `queue`), but a
/// SCHED_IDLE thread gets almost no CPU while ordinary work keeps the CPUs
/// busy: measured here with two busy loops, queue threads spent 10 minutes
/// of 18 waiting to run and fsx through the mount managed ~10 operations a
/// second. Every [`GUARD_EVERY`] this thread reads each queue thread's time
/// spent runnable but not running (`schedstat`'s run delay): one that
/// waited more than [`STARVED`] becomes SCHED_OTHER; one that has waited
/// (almost) nothing for a second goes back to SCHED_IDLE.
struct Guard {
    tids: Vec<std::sync::atomic::AtomicI32>,
    live: std::sync::atomic::AtomicUsize,
}

const GUARD_EVERY: Duration = Duration::from_millis(10);
/// Run delay in one interval that counts as starving.
const STARVED: u64 = 1_000_000;
/// Run delay in one interval that counts as calm; a second of calm
/// intervals returns a boosted thread to SCHED_IDLE.
const CALM: u64 = 50_000;
const CALM_INTERVALS: u32 = 100;

/// A queue thread is running while this lives.
struct Live<'a>(&'a Guard, usize);

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.0.tids[self.1].store(0, std::sync::atomic::Ordering::Relaxed);
        self.0.live.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Guard {
    fn new(n: usize) -> Self {
        Self {
            tids: (0..n).map(|_| std::sync::atomic::AtomicI32::new(0)).collect(),
            live: std::sync::atomic::AtomicUsize::new(n),
        }
    }

    /// Called by queue thread `qid` on its own thread.
    fn enter(&self, qid: usize) -> Live<'_> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.tids[qid].store(tid, std::sync::atomic::Ordering::Relaxed);
        Live(self, qid)
    }

    /// Run delay of thread `tid` so far, in ns.
    fn run_delay(tid: i32) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
        s.split_whitespace().nth(1)?.parse().ok()
    }

    fn run(&self) {
        let n = self.tids.len();
        let mut last = vec![None::<u64>; n];
        let mut boosted = vec![false; n];
        let mut calm = vec![0u32; n];
        while self.live.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            std::thread::sleep(GUARD_EVERY);
            for q in 0..n {
                let tid = self.tids[q].load(std::sync::atomic::Ordering::Relaxed);
                let Some(now) = (tid != 0).then(|| Self::run_delay(tid)).flatten() else {
                    last[q] = None;
                    continue;
                };
                let waited = last[q].map_or(0, |l| now.saturating_sub(l));
                last[q] = Some(now);
                if !boosted[q] && waited > STARVED {
                    set_policy_of(tid, libc::SCHED_OTHER);
                    boosted[q] = true;
                    calm[q] = 0;
                    tracing::debug!(
                        queue = q,
                        waited_us = waited / 1000,
                        "queue thread starved: SCHED_OTHER"
                    );
                } else if boosted[q] {
                    calm[q] = if waited < CALM { calm[q] + 1 } else { 0 };
                    if calm[q] >= CALM_INTERVALS {
                        set_policy_of(tid, libc::SCHED_IDLE);
                        boosted[q] = false;
                        tracing::debug!(queue = q, "queue thread calm again: SCHED_IDLE");
                    }
                }
            }
        }
    }
}

fn set_policy_of(tid: i32, p: i32) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a valid sched_param; `tid` is a thread of this process (at
    // worst it has exited: ESRCH).
    unsafe { libc::sched_setscheduler(tid, p, &param) };
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::debug!(cpu, "cannot pin the queue thread: {}", io::Error::last_os_error());
        }
    }
}

/// The command area of an SQE128 (`struct fuse_uring_cmd_req`).
fn cmd_req(qid: u16, commit_id: u64) -> [u8; 80] {
    let mut c = [0u8; 80];
    c[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    c[16..18].copy_from_slice(&qid.to_ne_bytes());
    c
}

// The raw SQE patch below relies on these layouts.
const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);
const _: () = assert!(std::mem::align_of::<squeue::Entry128>() <= 8);

fn register_sqe(fd: i32, qid: u16, idx: usize, iov: *const libc::iovec) -> squeue::Entry128 {
    let e = opcode::UringCmd80::new(types::Fd(fd), u::CMD_REGISTER)
        .cmd(cmd_req(qid, 0))
        .addr(Some(iov as u64))
        .build()
        .user_data(idx as u64);
    // The kernel wants the iovec count (2: headers, payload) in sqe->len,
    // which the crate's UringCmd80 does not set: patch the raw SQE.
    // SAFETY: Entry128 is repr(C), 128 bytes (asserted above at compile
    // time), an io_uring_sqe (len at offset 24) followed by the command's
    // tail; every bit pattern of it is a valid [u8; 128] and back.
    unsafe {
        let mut raw: [u8; 128] = std::mem::transmute(e);
        raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
        std::mem::transmute(raw)
    }
}

fn commit_sqe(fd: i32, qid: u16, idx: usize, commit_id: u64) -> squeue::Entry128 {
    opcode::UringCmd80::new(types::Fd(fd), u::CMD_COMMIT_AND_FETCH)
        .cmd(cmd_req(qid, commit_id))
        .build()
        .user_data(idx as u64)
}

fn build_ring(entries: u32) -> io::Result<IoUring<squeue::Entry128, cqueue::Entry>> {
    // Completions and the kernel's task work run only when this thread
    // waits for them: nothing interrupts it while it serves a request.
    IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
        .or_else(|_| IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(entries))
}

fn queue(
    qid: u16,
    dev: &Arc<OwnedFd>,
    disp: &Arc<Dispatcher>,
    pool: Option<tokio::runtime::Handle>,
    ready: mpsc::Sender<io::Result<()>>,
) -> io::Result<()> {
    pin_to(qid as usize);
    // SCHED_IDLE: when a queue thread commits a reply it is still running
    // on the caller's CPU, so the scheduler would wake the caller on
    // another, idle CPU (a halted vCPU: tens of µs) and the caller's next
    // request would go to that CPU's queue: every round trip would cross
    // CPUs. A CPU running only SCHED_IDLE work counts as idle for wake-up
    // placement, so the caller stays on its CPU and preempts this thread,
    // which sleeps right after anyway. Measured here (2 vCPUs, stat with
    // TTL 0, unpinned caller): p50 39 µs instead of 150 µs; with every CPU
    // saturated by other work, the same as SCHED_OTHER (33-43 µs p50).
    set_policy(libc::SCHED_IDLE);
    let depth = if pool.is_some() { DEPTH_REMOTE } else { DEPTH };
    let setup = (|| {
        let ring = build_ring((2 * depth + 2).next_power_of_two() as u32)?;
        let mut v = Vec::with_capacity(depth);
        for _ in 0..depth {
            let mut header = Box::new([0u8; u::REQ_HEADER_SZ]);
            let mut payload = vec![0u8; PAYLOAD_LEN].into_boxed_slice();
            let iov = [
                libc::iovec {
                    iov_base: header.as_mut_ptr().cast(),
                    iov_len: u::REQ_HEADER_SZ,
                },
                libc::iovec {
                    iov_base: payload.as_mut_ptr().cast(),
                    iov_len: PAYLOAD_LEN,
                },
            ];
            v.push(Slot {
                owner: std::sync::atomic::AtomicU8::new(KERNEL),
                ent: UnsafeCell::new(Ent { header, payload, iov }),
            });
        }
        // SAFETY: eventfd(2) returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        Ok((
            ring,
            Arc::new(Ents(v)),
            Arc::new(Returns {
                done: Mutex::new(Vec::new()),
                efd,
            }),
        ))
    })();
    let (mut ring, ents, returns) = match setup {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(io::Error::new(
                e.kind(),
                format!("io_uring queue {qid}: {e}"),
            )));
            return Ok(());
        }
    };
    let fd = dev.as_raw_fd();
    let mut wake_buf = Box::new([0u8; 8]);
    let wake_sqe = |buf: &mut [u8; 8]| {
        squeue::Entry128::from(
            opcode::Read::new(types::Fd(returns.efd.as_raw_fd()), buf.as_mut_ptr(), 8)
                .build()
                .user_data(WAKE),
        )
    };
    // SAFETY: the SQEs point into buffers that live in `ents` / `wake_buf`,
    // which outlive the ring's use of them (held to the end of this
    // function, and `ents` by pool tasks).
    unsafe {
        let mut sq = ring.submission();
        for i in 0..ents.0.len() {
            sq.push(&register_sqe(fd, qid, i, ents.iov(i)))
                .map_err(io::Error::other)?;
        }
        if pool.is_some() {
            sq.push(&wake_sqe(&mut wake_buf)).map_err(io::Error::other)?;
        }
    }
    if let Err(e) = ring.submit() {
        let _ = ready.send(Err(io::Error::new(
            e.kind(),
            format!("io_uring queue {qid}: submit: {e}"),
        )));
        return Ok(());
    }
    // A refused REGISTER completes at once with the errno.
    let mut early = Vec::new();
    for c in ring.completion() {
        if c.result() < 0 && c.user_data() != WAKE {
            let e = io::Error::from_raw_os_error(-c.result());
            let _ = ready.send(Err(io::Error::new(
                e.kind(),
                format!("io_uring queue {qid}: FUSE_IO_URING_CMD_REGISTER refused: {e}"),
            )));
            return Ok(());
        }
        early.push((c.user_data(), c.result()));
    }
    let _ = ready.send(Ok(()));
    drop(ready);

    let mut live = ents.0.len();
    let mut scratch = vec![0u8; OUT_HEADER_LEN + PAYLOAD_LEN];
    let mut pending: Vec<squeue::Entry128> = Vec::with_capacity(depth + 1);
    let mut batch: Vec<(u64, i32)> = early;
    loop {
        for (ud, res) in batch.drain(..) {
            if ud == WAKE {
                let mut back = std::mem::take(&mut *returns.done.lock());
                for (i, commit_id) in back.drain(..) {
                    pending.push(commit_sqe(fd, qid, i, commit_id));
                }
                pending.push(wake_sqe(&mut wake_buf));
                continue;
            }
            let i = ud as usize;
            if res < 0 {
                // The connection is going away (ENOTCONN, ECONNABORTED) or
                // the entry was refused: it will not come back.
                if !matches!(-res, libc::ENOTCONN | libc::ECONNABORTED | libc::ENODEV) {
                    tracing::warn!(qid, errno = -res, "io_uring entry failed");
                }
                live -= 1;
                continue;
            }
            match &pool {
                None => {
                    let Some(mut e) = ents.claim(i) else { continue };
                    let commit_id = answer(disp, &mut e, &mut scratch);
                    drop(e);
                    pending.push(commit_sqe(fd, qid, i, commit_id));
                }
                Some(p) => {
                    let (d, es, rs) = (disp.clone(), ents.clone(), returns.clone());
                    drop(p.spawn_blocking(move || {
                        let Some(mut e) = es.claim(i) else { return };
                        let commit_id = super::classic::with_pool_reply(|s| answer(&d, &mut e, s));
                        // Back to the kernel before the queue thread can
                        // submit the commit.
                        drop(e);
                        rs.done.lock().push((i, commit_id));
                        let one = 1u64.to_ne_bytes();
                        // SAFETY: writes 8 bytes from a live buffer.
                        unsafe { libc::write(rs.efd.as_raw_fd(), one.as_ptr().cast(), 8) };
                    }));
                }
            }
        }
        if live == 0 {
            return Ok(());
        }
        {
            let mut sq = ring.submission();
            for e in pending.drain(..) {
                // SAFETY: see above; the ring has room for every entry's
                // command plus the wake read.
                if unsafe { sq.push(&e) }.is_err() {
                    tracing::error!(qid, "io_uring submission queue full");
                }
            }
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {}
            Err(e) => return Err(e),
        }
        batch.extend(ring.completion().map(|c| (c.user_data(), c.result())));
    }
}

fn set_policy(p: i32) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a valid sched_param for the calling thread.
    unsafe { libc::sched_setscheduler(0, p, &param) };
}

fn commit_id_of(e: &Ent) -> u64 {
    u64::from_ne_bytes(e.header[ENT + 8..ENT + 16].try_into().unwrap_or_default())
}

/// Serve the request in entry `e` and write its reply into the entry
/// (out-header in the header area, body in the payload, its length in
/// `fuse_uring_ent_in_out.payload_sz`). Returns the commit id. Nothing here
/// can panic on what the kernel wrote: lengths go through
/// [`wire::split_uring`], and a reply larger than the payload buffer is
/// answered EIO by the dispatcher (its encoder refuses to overflow).
fn answer(disp: &Dispatcher, e: &mut Ent, scratch: &mut [u8]) -> u64 {
    let commit_id = commit_id_of(e);
    let psz = u32::from_ne_bytes(e.header[ENT + 16..ENT + 20].try_into().unwrap_or_default()) as usize;
    let cap = e.payload.len();
    let (unique, done, len) = match wire::split_uring(
        &e.header[..abi::IN_HEADER_LEN],
        &e.header[OP_IN..OP_IN + u::OP_IN_OUT_SZ],
        psz,
        &e.payload,
    ) {
        Err((h, err)) => {
            tracing::debug!(
                opcode = h.opcode,
                payload_sz = psz,
                "malformed FUSE request on io_uring"
            );
            (h.unique, Done::Error(err), 0)
        }
        Ok((h, fixed, tail)) => {
            // The fixed part is copied out of the header area the reply
            // header goes to.
            let mut f = [0u8; u::OP_IN_OUT_SZ];
            f[..fixed.len()].copy_from_slice(fixed);
            let fixed = &f[..fixed.len()];
            if tail.is_empty() {
                let mut out = Out::new(&mut e.payload);
                let done = super::dispatch(disp, &h, fixed, &[], &mut out);
                (h.unique, done, out.len())
            } else {
                // A request with a tail (names, data) is answered into
                // `scratch`, then copied: the tail lives in the payload
                // buffer the reply goes to.
                let room = scratch.len().min(cap);
                let mut out = Out::new(&mut scratch[..room]);
                let done = super::dispatch(disp, &h, fixed, tail, &mut out);
                let len = out.len();
                if done == Done::Reply {
                    e.payload[..len].copy_from_slice(&scratch[..len]);
                }
                (h.unique, done, len)
            }
        }
    };
    let (err, len) = match done {
        Done::Reply => (0, len),
        Done::Error(e) => (e, 0),
        // No request that comes over the ring goes unanswered; should one
        // ever, an empty reply completes it.
        Done::NoReply => (0, 0),
    };
    e.header[..OUT_HEADER_LEN].copy_from_slice(&wire::out_header(unique, err, len));
    e.header[ENT + 16..ENT + 20].copy_from_slice(&(len as u32).to_ne_bytes());
    commit_id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Caller;
    use crate::config::{KernelTierConfig, Offload};
    use crate::fs::EfuseFs;
    use std::ffi::OsStr;

    fn dispatcher() -> Dispatcher {
        let fs = Arc::new(EfuseFs::new(
            Arc::new(crate::backend::mem::MemBackend::new()),
            Offload::Kernel,
            KernelTierConfig::default(),
        ));
        fs.mkdir(Caller::default(), 1, OsStr::new("a"), 0o755).unwrap();
        Dispatcher::new(fs, Arc::new(crate::metrics::Metrics::default()))
    }

    /// An entry holding LOOKUP "a" of the root, with a payload buffer of
    /// `cap` bytes.
    fn lookup_entry(cap: usize) -> Ent {
        let mut header = Box::new([0u8; u::REQ_HEADER_SZ]);
        let name = b"a\0";
        header[0..4].copy_from_slice(&((abi::IN_HEADER_LEN + name.len()) as u32).to_ne_bytes());
        header[4..8].copy_from_slice(&abi::opcode::LOOKUP.to_ne_bytes());
        header[8..16].copy_from_slice(&77u64.to_ne_bytes());
        header[16..24].copy_from_slice(&1u64.to_ne_bytes());
        header[ENT + 8..ENT + 16].copy_from_slice(&5u64.to_ne_bytes());
        header[ENT + 16..ENT + 20].copy_from_slice(&(name.len() as u32).to_ne_bytes());
        let mut payload = vec![0u8; cap].into_boxed_slice();
        payload[..name.len()].copy_from_slice(name);
        let iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 2];
        Ent { header, payload, iov }
    }

    fn reply(e: &Ent) -> (i32, u32) {
        let error = i32::from_ne_bytes(e.header[4..8].try_into().unwrap());
        let len = u32::from_ne_bytes(e.header[ENT + 16..ENT + 20].try_into().unwrap());
        (error, len)
    }

    #[test]
    fn a_reply_that_fits_is_committed() {
        let d = dispatcher();
        let mut e = lookup_entry(PAYLOAD_LEN);
        let mut scratch = vec![0u8; OUT_HEADER_LEN + PAYLOAD_LEN];
        assert_eq!(answer(&d, &mut e, &mut scratch), 5, "the commit id");
        let (error, len) = reply(&e);
        assert_eq!((error, len), (0, 128), "an entry reply (fuse_entry_out)");
    }

    #[test]
    fn a_reply_larger_than_the_payload_buffer_is_eio_not_a_panic() {
        // Before: the reply was built in scratch and copied into the
        // 16-byte payload with copy_from_slice, which panicked.
        let d = dispatcher();
        let mut e = lookup_entry(16);
        let mut scratch = vec![0u8; OUT_HEADER_LEN + PAYLOAD_LEN];
        answer(&d, &mut e, &mut scratch);
        assert_eq!(reply(&e), (-libc::EIO, 0));
    }

    #[test]
    fn a_payload_size_beyond_the_buffer_is_einval() {
        let d = dispatcher();
        let mut e = lookup_entry(16);
        e.header[ENT + 16..ENT + 20].copy_from_slice(&1000u32.to_ne_bytes());
        let mut scratch = vec![0u8; OUT_HEADER_LEN + PAYLOAD_LEN];
        answer(&d, &mut e, &mut scratch);
        assert_eq!(reply(&e), (-libc::EINVAL, 0));
        // The out-header names the request it answers.
        assert_eq!(u64::from_ne_bytes(e.header[8..16].try_into().unwrap()), 77);
    }
}
