//! Transmit batching: while the guest streams, a kick of the transmit
//! queue is answered after a short window instead of at once.
//!
//! Why: a guest's TCP merges what its application writes into larger
//! segments while its earlier segments are still in the device
//! (autocorking and TCP small queues count the bytes not yet given back).
//! A device that takes and returns every frame the moment it is kicked
//! leaves nothing in flight, so the guest sends one small segment per
//! kick, and each costs a kick, an interrupt and their exits. Holding
//! the queue for [`WINDOW`] lets the guest queue more, in larger
//! segments, and the device sends them all in one run, under one
//! interrupt. QEMU's virtio-net has the same idea as its `tx=timer` mode.
//!
//! Only while the guest streams: a kick that comes more than [`BUSY_GAP`]
//! after the previous transmit run (a ping, a request after a pause) is
//! served at once, so latency of sporadic traffic is unchanged; so is a
//! kick for a frame under [`MIN_HELD_LEN`] bytes (a TCP acknowledgement,
//! a small request), whose delay would slow the peer that waits for it.
//! Frames wait at most [`WINDOW`] in the ring.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// How long a kick waits while the guest streams.
pub const WINDOW: Duration = Duration::from_micros(200);
/// A kick this soon after the previous transmit run counts as streaming.
pub const BUSY_GAP: Duration = Duration::from_millis(5);
/// A kick whose frame (vnet header included) is shorter is served at once.
pub const MIN_HELD_LEN: u64 = 512;

/// The window's timer and what the device last did.
#[derive(Debug)]
pub struct TxBatch {
    timer: TimerFd,
    /// The timer runs; the queue is served when it fires.
    armed: bool,
    /// When the device last ran the transmit queue.
    last_run: Option<Instant>,
    /// The next kick is the device's own (a run that yielded with work
    /// left): served at once.
    serve_next: bool,
}

impl TxBatch {
    /// A batcher with its own timer.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            timer: TimerFd::new().map_err(io::Error::from)?,
            armed: false,
            last_run: None,
            serve_next: false,
        })
    }

    /// The timer's descriptor, for the event loop.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// A kick arrived at `now`: true if it is held (the timer is running,
    /// or now started), false if the queue should be served now.
    /// `frame_len` gives the length of the frame the kick is for; it is
    /// asked only when the kick could be held.
    pub fn hold_kick(&mut self, now: Instant, frame_len: impl FnOnce() -> u64) -> bool {
        if std::mem::take(&mut self.serve_next) {
            return false;
        }
        let streaming = self
            .last_run
            .is_some_and(|t| now.saturating_duration_since(t) < BUSY_GAP);
        if !(self.armed || streaming) || frame_len() < MIN_HELD_LEN {
            return false;
        }
        if self.armed {
            return true;
        }
        match self.timer.reset(WINDOW, None) {
            Ok(()) => {
                self.armed = true;
                true
            }
            Err(e) => {
                crate::warn_ratelimited!("virtio-net: cannot start the transmit window: {e}");
                false
            }
        }
    }

    /// The timer fired: consume it; the queue is to be served now.
    pub fn fired(&mut self) {
        // A failed read only means no expiry was counted.
        let _ = self.timer.wait();
        self.armed = false;
    }

    /// The device kicks the queue itself (a run stopped with work left):
    /// that kick is served at once, not held.
    pub fn serve_next_kick(&mut self) {
        self.serve_next = true;
    }

    /// The queue was served at `now`.
    pub fn ran(&mut self, now: Instant) {
        self.last_run = Some(now);
    }

    /// Forgets the window (device reset): the next kick is served at once.
    pub fn reset(&mut self) {
        if self.armed {
            let _ = self.timer.clear();
        }
        self.armed = false;
        self.last_run = None;
        self.serve_next = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_kick_and_kicks_after_a_pause_are_served_at_once() {
        let mut b = TxBatch::new().unwrap();
        let t0 = Instant::now();
        assert!(!b.hold_kick(t0, || 1000), "nothing ran yet: no stream");
        b.ran(t0);
        let later = t0 + BUSY_GAP + Duration::from_millis(1);
        assert!(
            !b.hold_kick(later, || 1000),
            "a kick after a pause is served at once"
        );
    }

    #[test]
    fn kicks_while_streaming_wait_for_the_timer() {
        let mut b = TxBatch::new().unwrap();
        let t0 = Instant::now();
        b.ran(t0);
        let soon = t0 + Duration::from_micros(300);
        assert!(
            !b.hold_kick(soon, || 60),
            "streaming, a small frame: served"
        );
        assert!(b.hold_kick(soon, || 1000), "streaming: held");
        assert!(b.hold_kick(soon, || 1000), "a second kick joins the window");
        // The timer fires within the window (and a little scheduling).
        let mut poll = libc::pollfd {
            fd: b.timer_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `poll` is a valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut poll, 1, 2000) };
        assert_eq!(n, 1, "the window's timer fires");
        b.fired();
        b.ran(Instant::now());
        assert!(
            b.hold_kick(Instant::now(), || 1000),
            "still streaming: a new window"
        );
    }

    #[test]
    fn the_devices_own_kick_is_served_at_once() {
        let mut b = TxBatch::new().unwrap();
        let t0 = Instant::now();
        b.ran(t0);
        b.serve_next_kick();
        assert!(!b.hold_kick(t0, || 1000), "the device's own kick: served");
        assert!(b.hold_kick(t0, || 1000), "the guest's next one: held");
    }

    #[test]
    fn reset_forgets_the_stream_and_the_timer() {
        let mut b = TxBatch::new().unwrap();
        let t0 = Instant::now();
        b.ran(t0);
        assert!(b.hold_kick(t0, || 1000));
        b.reset();
        assert!(
            !b.hold_kick(Instant::now(), || 1000),
            "after a reset: served at once"
        );
    }
}
