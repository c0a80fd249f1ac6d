//! Ethernet frames over a stream socket, as passt speaks them: each frame
//! is preceded by its length as a 4-byte big-endian number; there is no
//! vnet header. [`StreamBackend`] implements that framing over any
//! connected non-blocking stream socket; [`super::passt::Passt`] runs
//! passt on the other end.

use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use super::backend::{NetBackend, SendStatus};
use super::{MAX_FRAME_LEN, MIN_FRAME_LEN, VNET_HDR_LEN};

/// Length of the frame length prefix.
const PREFIX_LEN: usize = 4;
/// Read buffer: several frames at a time.
const READ_BUF_LEN: usize = 4 * (PREFIX_LEN + MAX_FRAME_LEN);

/// Frames with a 4-byte big-endian length prefix over a stream socket.
#[derive(Debug)]
pub struct StreamBackend {
    sock: UnixStream,
    what: String,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    wbuf: Vec<u8>,
    wpos: usize,
}

impl StreamBackend {
    /// Uses `sock` (made non-blocking here); `what` names the peer in logs.
    pub fn new(sock: UnixStream, what: impl Into<String>) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        Ok(Self {
            sock,
            what: what.into(),
            rbuf: vec![0; READ_BUF_LEN],
            rstart: 0,
            rend: 0,
            wbuf: Vec::with_capacity(PREFIX_LEN + MAX_FRAME_LEN),
            wpos: 0,
        })
    }

    /// The next complete frame in the read buffer, if any, as a range.
    fn buffered_frame(&self) -> io::Result<Option<(usize, usize)>> {
        let avail = &self.rbuf[self.rstart..self.rend];
        let Some(prefix) = avail.get(..PREFIX_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} sent a frame of {len} bytes", self.what),
            ));
        }
        if avail.len() < PREFIX_LEN + len {
            return Ok(None);
        }
        let start = self.rstart + PREFIX_LEN;
        Ok(Some((start, start + len)))
    }
}

impl NetBackend for StreamBackend {
    fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn describe(&self) -> String {
        self.what.clone()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            if let Some((start, end)) = self.buffered_frame()? {
                let len = end - start;
                let out = buf.get_mut(..VNET_HDR_LEN + len).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "receive buffer too small")
                })?;
                out[..VNET_HDR_LEN].fill(0);
                out[VNET_HDR_LEN..].copy_from_slice(&self.rbuf[start..end]);
                self.rstart = end;
                if self.rstart == self.rend {
                    self.rstart = 0;
                    self.rend = 0;
                }
                return Ok(Some(VNET_HDR_LEN + len));
            }
            if self.rend == self.rbuf.len() {
                // Make room: move the partial frame to the front.
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            match self.sock.read(&mut self.rbuf[self.rend..]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} closed the connection", self.what),
                    ))
                }
                Ok(n) => self.rend += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<SendStatus> {
        if self.has_pending_output() && !self.flush()? {
            return Ok(SendStatus::Full);
        }
        let payload = frame.get(VNET_HDR_LEN..).unwrap_or_default();
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
        self.wbuf.clear();
        self.wpos = 0;
        self.wbuf.extend_from_slice(&len.to_be_bytes());
        self.wbuf.extend_from_slice(payload);
        self.flush()?;
        Ok(SendStatus::Sent)
    }

    fn has_pending_output(&self) -> bool {
        self.wpos < self.wbuf.len()
    }

    fn flush(&mut self) -> io::Result<bool> {
        while self.wpos < self.wbuf.len() {
            match self.sock.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (StreamBackend, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (StreamBackend::new(a, "peer").unwrap(), b)
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_add(seed)).collect()
    }

    #[test]
    fn frames_are_length_prefixed_without_vnet_header() {
        let (mut be, mut peer) = pair();
        let mut f = vec![0xaa; VNET_HDR_LEN];
        f.extend(frame(60, 1));
        assert_eq!(be.send(&f).unwrap(), SendStatus::Sent);
        let mut got = vec![0; 64];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got[..4], &60u32.to_be_bytes());
        assert_eq!(&got[4..], &frame(60, 1)[..]);
    }

    #[test]
    fn received_frames_get_a_zero_header_even_when_split() {
        let (mut be, mut peer) = pair();
        let mut buf = vec![0xff; VNET_HDR_LEN + MAX_FRAME_LEN];
        assert_eq!(be.recv(&mut buf).unwrap(), None);
        let mut wire = 100u32.to_be_bytes().to_vec();
        wire.extend(frame(100, 7));
        wire.extend(70u32.to_be_bytes());
        wire.extend(frame(70, 9));
        peer.write_all(&wire[..50]).unwrap();
        assert_eq!(be.recv(&mut buf).unwrap(), None);
        peer.write_all(&wire[50..]).unwrap();
        assert_eq!(be.recv(&mut buf).unwrap(), Some(VNET_HDR_LEN + 100));
        assert!(buf[..VNET_HDR_LEN].iter().all(|&b| b == 0));
        assert_eq!(&buf[VNET_HDR_LEN..VNET_HDR_LEN + 100], &frame(100, 7)[..]);
        assert_eq!(be.recv(&mut buf).unwrap(), Some(VNET_HDR_LEN + 70));
        assert_eq!(&buf[VNET_HDR_LEN..VNET_HDR_LEN + 70], &frame(70, 9)[..]);
        assert_eq!(be.recv(&mut buf).unwrap(), None);
    }

    #[test]
    fn bad_lengths_and_eof_are_errors() {
        let (mut be, mut peer) = pair();
        let mut buf = vec![0; VNET_HDR_LEN + MAX_FRAME_LEN];
        peer.write_all(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes())
            .unwrap();
        let e = be.recv(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);

        let (mut be, peer) = pair();
        drop(peer);
        // Another test's fork holds a copy of `peer` until its exec
        // closes it, and the end of file comes with the last copy (the
        // clean-clone CI saw `Ok(None)` here once): wait for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let e = loop {
            match be.recv(&mut buf) {
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                r => break r.unwrap_err(),
            }
        };
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_full_socket_reports_full_and_flushes_later() {
        let (mut be, mut peer) = pair();
        let mut f = vec![0; VNET_HDR_LEN];
        f.extend(frame(60_000, 3));
        let mut sent = 0;
        while be.send(&f).unwrap() == SendStatus::Sent {
            sent += 1;
            assert!(sent < 10_000, "socket never filled up");
        }
        assert!(be.has_pending_output());
        // Drain the peer; every frame arrives whole and in order.
        peer.set_nonblocking(false).unwrap();
        let mut got = 0;
        let mut hdr = [0u8; 4];
        let mut body = vec![0; 60_000];
        while got < sent {
            peer.read_exact(&mut hdr).unwrap();
            assert_eq!(u32::from_be_bytes(hdr), 60_000);
            peer.read_exact(&mut body).unwrap();
            assert_eq!(body, frame(60_000, 3));
            got += 1;
            if got == sent - 1 {
                // The last one was partly written: flushing finishes it.
                while !be.flush().unwrap() {}
            }
        }
        assert!(!be.has_pending_output());
    }
}
