//! The classic transport: worker threads that read(2) requests from
//! /dev/fuse and write(2) replies to it.
//!
//! Each worker owns its request and reply buffers for its lifetime, so a
//! round trip allocates nothing. With a remote backend (slow round trips)
//! the request is copied and served on the I/O pool, so that many slow
//! backend calls proceed at once.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use super::abi::{OUT_HEADER_LEN, REQUEST_BUF_LEN};
use super::wire::{self, Out};
use crate::dispatch::{Dispatcher, Done};

/// Reply buffer: the out-header and the largest body (a READ of max_write).
pub const REPLY_BUF_LEN: usize = OUT_HEADER_LEN + super::abi::MAX_WRITE as usize;

/// How a worker's read ended.
pub enum Read {
    /// A request of this many bytes.
    Request(usize),
    /// The connection is gone (unmounted or aborted).
    Closed,
}

/// Read one request from `dev` into `buf`, retrying what the kernel says
/// to retry (ENOENT: the request was interrupted before we got it).
pub fn read_request(dev: &OwnedFd, buf: &mut [u8]) -> io::Result<Read> {
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Read::Request(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR | libc::EAGAIN | libc::ENOENT) => continue,
            Some(libc::ENODEV | libc::ECONNABORTED) => return Ok(Read::Closed),
            _ => return Err(e),
        }
    }
}

/// Write one reply (or notification) to `dev`. A reply to a request the
/// kernel no longer waits for (interrupted, aborted) fails with ENOENT:
/// nobody needs it, and it is not an error of the daemon.
pub fn write_reply(dev: &OwnedFd, msg: &[u8]) {
    // SAFETY: `msg` is valid for reads of its length.
    let n = unsafe { libc::write(dev.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) {
            tracing::debug!("cannot send a FUSE reply: {e}");
        }
    }
}

/// Serve one /dev/fuse request: decode, dispatch, encode; `send` gets the
/// whole reply (header and body), or nothing for requests without one.
pub fn serve(disp: &Dispatcher, req: &[u8], reply: &mut [u8], send: impl FnOnce(&[u8])) {
    let (h, fixed, tail) = match wire::split(req) {
        Ok(x) => x,
        Err((h, e)) => {
            tracing::debug!(opcode = h.opcode, len = req.len(), "malformed FUSE request");
            if h.unique != 0 && !super::abi::opcode::no_reply(h.opcode) {
                send(&wire::out_header(h.unique, e, 0));
            }
            return;
        }
    };
    let (head, body) = reply.split_at_mut(OUT_HEADER_LEN);
    let mut out = Out::new(body);
    let done = super::dispatch(disp, &h, fixed, tail, &mut out);
    match done {
        Done::Reply => {
            let len = out.len();
            head.copy_from_slice(&wire::out_header(h.unique, 0, len));
            send(&reply[..OUT_HEADER_LEN + len]);
        }
        Done::Error(e) => send(&wire::out_header(h.unique, e, 0)),
        Done::NoReply => {}
    }
}

thread_local! {
    /// Reply buffer of an I/O pool thread.
    static POOL_REPLY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Run `f` with the reply buffer ([`REPLY_BUF_LEN`] bytes) of the I/O pool
/// thread this runs on (both transports serve remote backends there).
pub fn with_pool_reply<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    POOL_REPLY.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < REPLY_BUF_LEN {
            b.resize(REPLY_BUF_LEN, 0);
        }
        f(&mut b)
    })
}

/// Serve `req` on the I/O pool thread this runs on.
pub fn serve_on_pool(disp: &Dispatcher, dev: &OwnedFd, req: &[u8]) {
    with_pool_reply(|b| serve(disp, req, b, |m| write_reply(dev, m)));
}

/// A worker: serve requests until the connection closes.
pub fn worker(
    dev: Arc<OwnedFd>,
    disp: Arc<Dispatcher>,
    pool: Option<tokio::runtime::Handle>,
) -> io::Result<()> {
    let mut req = vec![0u8; REQUEST_BUF_LEN];
    let mut reply = vec![0u8; REPLY_BUF_LEN];
    loop {
        let n = match read_request(&dev, &mut req)? {
            Read::Request(n) => n,
            Read::Closed => return Ok(()),
        };
        match &pool {
            Some(p) => {
                let (d, f) = (disp.clone(), dev.clone());
                let owned = req[..n].to_vec();
                drop(p.spawn_blocking(move || serve_on_pool(&d, &f, &owned)));
            }
            None => serve(&disp, &req[..n], &mut reply, |m| write_reply(&dev, m)),
        }
    }
}
