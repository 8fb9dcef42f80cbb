//! The programs' miss events: each LOOKUP a program could not answer is
//! put on a ring buffer (`efuse_common::ops::MissEvent`), so the daemon
//! can load the rest of that directory before the kernel asks for it.
//!
//! [`Misses`] reads them, blocking; whoever acts on them (the
//! filesystem's prefetch, `crate::fs`) runs the reading loop on a thread of
//! its own. A full ring buffer drops events (counted by the programs,
//! `events_dropped`): an event is a hint, never needed for correctness.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use aya::maps::{MapData, RingBuf};
use efuse_common::ops::MissEvent;

/// The reading end of the miss-event ring buffer of one attachment.
pub struct Misses {
    ring: RingBuf<MapData>,
    pending: VecDeque<MissEvent>,
    stop: Arc<AtomicBool>,
}

/// Ends a [`Misses`] reader's loop (within its 100 ms poll).
#[derive(Clone)]
pub struct StopMisses(Arc<AtomicBool>);

impl StopMisses {
    /// The reader ends (within its 100 ms poll).
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Misses {
    pub(super) fn new(ring: RingBuf<MapData>) -> Self {
        Self {
            ring,
            pending: VecDeque::new(),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// What ends this reader's loop.
    pub fn stopper(&self) -> StopMisses {
        StopMisses(self.stop.clone())
    }
}

/// Blocks for the next event; ends once stopped.
impl Iterator for Misses {
    type Item = MissEvent;

    fn next(&mut self) -> Option<MissEvent> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            if let Some(ev) = self.pending.pop_front() {
                return Some(ev);
            }
            let mut pfd = libc::pollfd {
                fd: self.ring.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            while let Some(item) = self.ring.next() {
                if item.len() >= size_of::<MissEvent>() {
                    // SAFETY: the record holds a MissEvent written by the
                    // programs; read unaligned from the ring.
                    let ev = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<MissEvent>()) };
                    self.pending.push_back(ev);
                }
            }
        }
    }
}
