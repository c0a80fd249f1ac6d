//! Transmit batching: the transmit queue's kick window
//! ([`KickWindow`](crate::virtio::kick_window::KickWindow)).
//!
//! Why for this queue: a guest's TCP merges what its application writes
//! into larger segments while its earlier segments are still in the
//! device (autocorking and TCP small queues count the bytes not yet given
//! back). A device that takes and returns every frame the moment it is
//! kicked leaves nothing in flight, so the guest sends one small segment
//! per kick (~1.8 KB frames in the nested harness, for every VMM
//! measured). Holding the queue for [`WINDOW`] lets the guest queue more,
//! in larger segments, sent in one run under one interrupt.
//!
//! A kick whose frame is shorter than [`MIN_HELD_LEN`] (a TCP
//! acknowledgement, a small request) is served at once: its delay would
//! slow the peer that waits for it.

use std::io;
use std::time::Duration;

use crate::virtio::kick_window::KickWindow;

/// How long a kick waits while the guest streams.
pub const WINDOW: Duration = Duration::from_micros(200);
/// A kick this soon after the previous transmit run counts as streaming.
pub const BUSY_GAP: Duration = Duration::from_millis(5);
/// A kick whose frame (vnet header included) is shorter is served at once.
pub const MIN_HELD_LEN: u64 = 512;

/// The transmit queue's window.
pub fn new_window() -> io::Result<KickWindow> {
    KickWindow::new(WINDOW, BUSY_GAP)
}

/// Whether a kick for a frame of `len` bytes is worth holding.
pub fn worth_holding(len: u64) -> bool {
    len >= MIN_HELD_LEN
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn small_frames_are_served_and_large_ones_held_while_streaming() {
        let mut w = new_window().unwrap();
        let t0 = Instant::now();
        w.ran(t0);
        let soon = t0 + Duration::from_micros(300);
        assert!(!w.hold_kick(soon, || worth_holding(60)), "an ACK: served");
        assert!(
            w.hold_kick(soon, || worth_holding(1500)),
            "a full frame: held"
        );
    }
}
