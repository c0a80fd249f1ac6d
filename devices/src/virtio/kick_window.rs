//! Kick windows: while the driver keeps a queue busy, a kick is answered
//! after a short window instead of at once.
//!
//! Why: a device that serves every kick the moment it arrives returns each
//! small batch under its own interrupt, and a guest that finds nothing in
//! flight sends the next small batch at once: every request or frame
//! costs a kick, an interrupt and their exits. Holding the queue for a
//! window lets the driver queue more, and the device serves it all in one
//! run, under one interrupt. QEMU's virtio-net `tx=timer` and its
//! iothreads' polling act on the same observation.
//!
//! Only while the queue is busy: a kick that comes more than the window's
//! busy gap after the previous run (a ping, a request after a pause) is
//! served at once, so the latency of sporadic work is unchanged, and so
//! is a kick the device's own rule says not to hold (a short frame, a
//! queue that holds one request at a time). Work waits at most one window.
//!
//! [`KickWindow`] keeps the timer and the rule; the device decides what
//! to hold (`net/tx_batch.rs`), turns the queue's notifications off while
//! a kick is held and serves the queue when the timer's descriptor is
//! readable. Where the guest does not answer a held queue with larger
//! batches of its own, a window only adds latency: on virtio-blk's queue
//! (fio at queue depth 32 and 4, in the nested harness) it tripled the
//! requests per interrupt and cut the throughput (docs/performance.md,
//! 2026-12-06 night), so the block device does not use one.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// A queue's window timer and when the device last served it.
#[derive(Debug)]
pub struct KickWindow {
    timer: TimerFd,
    /// How long a held kick waits.
    window: Duration,
    /// A kick this soon after the previous run finds the queue busy.
    busy_gap: Duration,
    /// The timer runs; the queue is served when it fires.
    armed: bool,
    /// When the device last served the queue.
    last_run: Option<Instant>,
    /// The next kick is the device's own (a run that yielded with work
    /// left): served at once.
    serve_next: bool,
}

impl KickWindow {
    /// A window of `window` with its own timer, for kicks that come
    /// within `busy_gap` of the previous run.
    pub fn new(window: Duration, busy_gap: Duration) -> io::Result<Self> {
        Ok(Self {
            timer: TimerFd::new().map_err(io::Error::from)?,
            window,
            busy_gap,
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
    /// `worth_holding` is the device's rule for this kick (asked only
    /// when the kick could be held: the queue busy or a window running).
    pub fn hold_kick(&mut self, now: Instant, worth_holding: impl FnOnce() -> bool) -> bool {
        if std::mem::take(&mut self.serve_next) {
            return false;
        }
        let busy = self
            .last_run
            .is_some_and(|t| now.saturating_duration_since(t) < self.busy_gap);
        if !(self.armed || busy) || !worth_holding() {
            return false;
        }
        if self.armed {
            return true;
        }
        match self.timer.reset(self.window, None) {
            Ok(()) => {
                self.armed = true;
                true
            }
            Err(e) => {
                crate::warn_ratelimited!("virtio: cannot start a kick window: {e}");
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

    const WINDOW: Duration = Duration::from_micros(200);
    const GAP: Duration = Duration::from_millis(5);

    fn window() -> KickWindow {
        KickWindow::new(WINDOW, GAP).unwrap()
    }

    /// Waits up to 2 s for the timer; true if it fired.
    fn timer_fires(w: &KickWindow) -> bool {
        crate::test_fd::readable_within(w.timer_fd(), 2000)
    }

    #[test]
    fn first_kick_and_kicks_after_a_pause_are_served_at_once() {
        let mut w = window();
        let t0 = Instant::now();
        assert!(!w.hold_kick(t0, || true), "nothing ran yet: not busy");
        w.ran(t0);
        let later = t0 + GAP + Duration::from_millis(1);
        assert!(
            !w.hold_kick(later, || true),
            "a kick after a pause is served at once"
        );
    }

    #[test]
    fn kicks_on_a_busy_queue_wait_for_the_timer() {
        let mut w = window();
        let t0 = Instant::now();
        w.ran(t0);
        let soon = t0 + Duration::from_micros(300);
        assert!(!w.hold_kick(soon, || false), "the device's rule: served");
        assert!(w.hold_kick(soon, || true), "busy: held");
        assert!(w.hold_kick(soon, || true), "a second kick joins the window");
        assert!(timer_fires(&w), "the window's timer fires");
        w.fired();
        w.ran(Instant::now());
        assert!(
            w.hold_kick(Instant::now(), || true),
            "still busy: a new window"
        );
    }

    #[test]
    fn the_rule_is_not_asked_when_the_kick_cannot_be_held() {
        let mut w = window();
        assert!(!w.hold_kick(Instant::now(), || panic!("asked")));
        w.ran(Instant::now());
        w.serve_next_kick();
        assert!(!w.hold_kick(Instant::now(), || panic!("asked")));
    }

    #[test]
    fn the_devices_own_kick_is_served_at_once() {
        let mut w = window();
        let t0 = Instant::now();
        w.ran(t0);
        w.serve_next_kick();
        assert!(!w.hold_kick(t0, || true), "the device's own kick: served");
        assert!(w.hold_kick(t0, || true), "the driver's next one: held");
    }

    #[test]
    fn reset_forgets_the_busy_queue_and_the_timer() {
        let mut w = window();
        let t0 = Instant::now();
        w.ran(t0);
        assert!(w.hold_kick(t0, || true));
        w.reset();
        assert!(
            !w.hold_kick(Instant::now(), || true),
            "after a reset: served at once"
        );
    }
}
