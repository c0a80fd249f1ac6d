//! One exec connection to the host: frames in (decoded) and frames out
//! (queued, written without blocking), so that a host that reads slowly
//! holds up only its own process.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use exec_proto::{Decoder, GuestMsg, HostMsg};

use crate::pump::{transient, Output};
use crate::{sys, CHUNK};

/// Stop reading a process's output while this much waits for its host.
const OUTBOX_HIGH: usize = 1 << 20;

/// One exec connection: frames in (decoded), frames out (queued).
pub(super) struct Conn {
    sock: OwnedFd,
    decoder: Decoder,
    outbox: Vec<u8>,
    /// The host ended the connection (end-of-file).
    pub(super) closed: bool,
}

impl Conn {
    pub(super) fn new(sock: OwnedFd) -> Self {
        Self {
            sock,
            decoder: Decoder::new(),
            outbox: Vec::new(),
            closed: false,
        }
    }

    pub(super) fn queue(&mut self, msg: &GuestMsg) {
        msg.encode(&mut self.outbox);
    }

    /// Reads what the host sent; returns the complete messages. A
    /// malformed frame is an error (the connection is then dropped).
    pub(super) fn receive(&mut self) -> Result<Vec<HostMsg>, String> {
        let mut buf = [0u8; CHUNK];
        loop {
            match sys::recv_nonblocking(self.sock.as_raw_fd(), &mut buf) {
                Ok(0) => {
                    self.closed = true;
                    break;
                }
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if transient(&e) => break,
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        let mut msgs = Vec::new();
        while let Some(frame) = self.decoder.next_frame().map_err(|e| e.to_string())? {
            msgs.push(HostMsg::parse(frame).map_err(|e| e.to_string())?);
        }
        Ok(msgs)
    }

    /// Writes what is queued, as far as the socket takes it now.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        while !self.outbox.is_empty() {
            match sys::send_nonblocking(self.sock.as_raw_fd(), &self.outbox) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.outbox.drain(..n);
                }
                Err(e) if transient(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Output for Conn {
    fn send_data(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        self.outbox
            .extend_from_slice(&exec_proto::header(kind, payload.len()));
        self.outbox.extend_from_slice(payload);
        Ok(())
    }
}

impl Conn {
    /// The socket, for poll.
    pub(super) fn raw(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Whether the process's output may be read for now.
    pub(super) fn has_room(&self) -> bool {
        self.outbox.len() < OUTBOX_HIGH
    }

    /// Whether frames wait to be written.
    pub(super) fn has_queued(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// Bytes waiting to be written.
    pub(super) fn queued(&self) -> usize {
        self.outbox.len()
    }

    /// Ends the sending direction: the host reads end-of-file.
    pub(super) fn shutdown_write(&self) {
        sys::shutdown_write(self.sock.as_raw_fd());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn queued_frames_wait_for_a_full_socket_and_never_block() {
        let _only = crate::TEST_CHILDREN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut conn = Conn::new(OwnedFd::from(ours));
        let big = vec![7u8; 4 << 20];
        conn.send_data(exec_proto::kind::STDOUT, &big[..exec_proto::MAX_PAYLOAD])
            .unwrap();
        for _ in 0..15 {
            conn.send_data(exec_proto::kind::STDOUT, &big[..exec_proto::MAX_PAYLOAD])
                .unwrap();
        }
        // Nobody reads `host`: the socket fills and the rest stays queued.
        conn.flush().unwrap();
        assert!(conn.has_queued());
        drop(host);
        assert!(conn.flush().is_err(), "a gone host is an error");
    }
}
