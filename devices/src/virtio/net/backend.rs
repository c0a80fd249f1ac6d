//! What a virtio-net device needs from the host side of its link.

use std::io;
use std::os::unix::io::RawFd;

/// Outcome of [`NetBackend::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendStatus {
    /// The frame was taken (sent, or queued inside the backend).
    Sent,
    /// The backend cannot take the frame now; it was not consumed. Retry when
    /// the backend's fd is writable.
    Full,
}

/// Whether an I/O error means the link is gone for good (as opposed to a
/// frame that could not be sent this once).
pub fn is_fatal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD) | Some(libc::EBADF) | Some(libc::ENODEV) | Some(libc::ENXIO)
    ) || matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::InvalidData
    )
}

/// The host side of a virtio-net link: a TAP device, a passt socket, or a
/// test double.
///
/// Frames cross this interface with a 12-byte `virtio_net_hdr_v1` in
/// front ([`super::VNET_HDR_LEN`]). A backend that cannot carry offload
/// metadata reports no [`Self::offload_features`], drops the header on
/// [`Self::send`] and puts a zeroed one in front of received frames.
///
/// All methods are non-blocking; they are called on the event-loop thread.
pub trait NetBackend: Send {
    /// The descriptor to poll: readable when a frame may be waiting, writable
    /// when [`Self::send`] may take frames again.
    fn raw_fd(&self) -> RawFd;

    /// A short description for logs, e.g. `TAP tap0`.
    fn describe(&self) -> String;

    /// virtio-net offload feature bits (checksum, TSO) this backend can
    /// handle in both directions.
    fn offload_features(&self) -> u64 {
        0
    }

    /// Applies the offload features the driver accepted (the subset of
    /// [`Self::offload_features`] it acked).
    fn set_offloads(&mut self, _acked: u64) -> io::Result<()> {
        Ok(())
    }

    /// Reads one frame, header included, into `buf`. Returns `Ok(None)` if
    /// no frame is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;

    /// Sends one frame, header included.
    fn send(&mut self, frame: &[u8]) -> io::Result<SendStatus>;

    /// Whether frames for the guest are waiting that polling
    /// [`Self::raw_fd`] would not announce (made by capsule itself, such as
    /// the metadata service's answers): the device delivers them after
    /// each transmit run.
    fn has_local_frames(&self) -> bool {
        false
    }

    /// Whether output is queued inside the backend (the fd should be polled
    /// for writability and [`Self::flush`] called).
    fn has_pending_output(&self) -> bool {
        false
    }

    /// Writes out queued output; returns `Ok(true)` once nothing is pending.
    fn flush(&mut self) -> io::Result<bool> {
        Ok(true)
    }
}
