//! A backend in front of another that answers the guest's metadata
//! service traffic itself (`mmds::Responder`) and passes every other frame
//! through: what Firecracker's MMDS does inside its net device. The
//! frames the service answers never reach the TAP device.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex};

use super::{NetBackend, SendStatus, VNET_HDR_LEN};

/// `inner` with the metadata service answering at its address.
pub struct MmdsBackend {
    inner: Box<dyn NetBackend>,
    responder: mmds::Responder,
}

impl MmdsBackend {
    /// Puts the service for `store` in front of `inner`.
    pub fn new(inner: Box<dyn NetBackend>, store: Arc<Mutex<mmds::Mmds>>) -> Self {
        Self {
            inner,
            responder: mmds::Responder::new(store),
        }
    }
}

impl NetBackend for MmdsBackend {
    fn raw_fd(&self) -> RawFd {
        self.inner.raw_fd()
    }

    fn describe(&self) -> String {
        format!(
            "{}, with the metadata service at {}",
            self.inner.describe(),
            self.responder.ip()
        )
    }

    fn offload_features(&self) -> u64 {
        self.inner.offload_features()
    }

    fn set_offloads(&mut self, acked: u64) -> io::Result<()> {
        self.inner.set_offloads(acked)
    }

    /// The service's frames first (with a zeroed header: checksums are
    /// complete, no segmentation), then the inner backend's.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if let Some(frame) = self.responder.pop() {
            let len = VNET_HDR_LEN + frame.len();
            let Some(out) = buf.get_mut(..len) else {
                log::debug!("mmds: a {len}-byte frame does not fit the receive buffer");
                return Ok(None);
            };
            out[..VNET_HDR_LEN].fill(0);
            out[VNET_HDR_LEN..].copy_from_slice(&frame);
            return Ok(Some(len));
        }
        self.inner.recv(buf)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<SendStatus> {
        let eth = frame.get(VNET_HDR_LEN..).unwrap_or_default();
        if mmds::is_for(eth, self.responder.ip()) {
            self.responder.receive(eth);
            return Ok(SendStatus::Sent);
        }
        self.inner.send(frame)
    }

    fn has_local_frames(&self) -> bool {
        self.responder.has_output() || self.inner.has_local_frames()
    }

    fn has_pending_output(&self) -> bool {
        self.inner.has_pending_output()
    }

    fn flush(&mut self) -> io::Result<bool> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An inner backend that records what it is sent and has nothing to
    /// receive.
    #[derive(Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl NetBackend for Recorder {
        fn raw_fd(&self) -> RawFd {
            -1
        }
        fn describe(&self) -> String {
            "recorder".into()
        }
        fn recv(&mut self, _: &mut [u8]) -> io::Result<Option<usize>> {
            Ok(None)
        }
        fn send(&mut self, frame: &[u8]) -> io::Result<SendStatus> {
            self.0.lock().unwrap().push(frame.to_vec());
            Ok(SendStatus::Sent)
        }
    }

    /// A guest's ARP request for `target`, behind a virtio-net header.
    fn arp_request(target: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend([0xff; 6]);
        f.extend([0x52, 0x54, 0, 0, 0, 2]);
        f.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend([0x52, 0x54, 0, 0, 0, 2, 169, 254, 1, 2]);
        f.extend([0; 6]);
        f.extend(target);
        f
    }

    #[test]
    fn answers_for_the_service_and_passes_the_rest() {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let mut b = MmdsBackend::new(
            Box::new(Recorder(sent.clone())),
            Arc::new(Mutex::new(mmds::Mmds::default())),
        );
        assert!(!b.has_local_frames());
        // For the service: answered here, not sent on.
        b.send(&arp_request([169, 254, 169, 254])).unwrap();
        assert!(sent.lock().unwrap().is_empty());
        assert!(b.has_local_frames());
        let mut buf = vec![0xaa; 2048];
        let n = b.recv(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
        let reply = &buf[VNET_HDR_LEN..n];
        assert_eq!(&reply[..6], &[0x52, 0x54, 0, 0, 0, 2], "to the guest");
        assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
        assert_eq!(&reply[22..28], &mmds::stack::MAC, "with the service's MAC");
        assert!(!b.has_local_frames());
        // Anything else goes to the inner backend unchanged.
        let other = arp_request([10, 0, 0, 1]);
        b.send(&other).unwrap();
        assert_eq!(sent.lock().unwrap().as_slice(), &[other]);
        // A receive buffer too small for the answer loses it, no more.
        b.send(&arp_request([169, 254, 169, 254])).unwrap();
        assert_eq!(b.recv(&mut [0u8; 20]).unwrap(), None);
        // Frames too short to carry a header go to the inner backend.
        b.send(&[0u8; 3]).unwrap();
        assert_eq!(sent.lock().unwrap().len(), 2);
    }
}
