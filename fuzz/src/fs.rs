//! virtio-fs's front end for fuzzing: a vhost-user backend whose answers
//! are fuzzer data and which checks what capsule hands it.
//!
//! capsule does not walk virtio-fs's descriptor chains (virtiofsd does);
//! what a guest controls on capsule's side is the transport's state
//! machine and the ring addresses capsule turns into its own host
//! addresses for the backend. A backend that is given a ring outside
//! guest memory would read and write wherever it points, so
//! [`ScriptedVhostUser::start_vring`] panics (a crash for the fuzzer)
//! if any ring is not inside a region of the last memory table, or a
//! queue is started before a memory table or with a size the device
//! never offered.

use std::collections::VecDeque;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use devices::virtio::fs::{FsError, VhostUserOps, VringSetup, QUEUE_SIZE};
use vhost::VhostUserMemoryRegionInfo;
use vmm_sys_util::eventfd::EventFd;

/// What the fuzz target can do to the backend from outside: fire the
/// call eventfd of a queue it was given, or hang up its socket.
#[derive(Default)]
pub struct FsHandle {
    /// Per queue index: a copy of the call eventfd of its last start.
    calls: Mutex<Vec<Option<EventFd>>>,
    /// The far end of the backend's socket; dropping it is a hang-up.
    peer: Mutex<Option<UnixStream>>,
    /// Queue starts the backend accepted.
    starts: AtomicUsize,
}

impl FsHandle {
    /// The backend signals "used buffers" on queue `index` (if started).
    pub fn fire(&self, index: usize) {
        if let Some(Some(call)) = self.calls.lock().unwrap().get(index) {
            let _ = call.write(1);
        }
    }

    /// How many times the backend was told to serve a queue.
    pub fn started(&self) -> usize {
        self.starts.load(Ordering::Relaxed)
    }

    /// The backend process goes away.
    pub fn hang_up(&self) {
        self.peer.lock().unwrap().take();
    }
}

/// A vhost-user backend scripted by the fuzzer.
pub struct ScriptedVhostUser {
    features: u64,
    /// One byte per request: an odd byte refuses it.
    answers: VecDeque<u8>,
    /// (capsule's address, size) of each region of the last memory table.
    regions: Option<Vec<(u64, u64)>>,
    sock: UnixStream,
    handle: Arc<FsHandle>,
}

impl ScriptedVhostUser {
    /// A backend offering `features` that answers its requests by
    /// `answers` (granted once they run out); returns it with its handle.
    pub fn new(features: u64, answers: &[u8]) -> (Self, Arc<FsHandle>) {
        let (sock, peer) = UnixStream::pair().expect("socketpair");
        let handle = Arc::new(FsHandle::default());
        *handle.peer.lock().unwrap() = Some(peer);
        let backend = Self {
            features,
            answers: answers.iter().copied().collect(),
            regions: None,
            sock,
            handle: handle.clone(),
        };
        (backend, handle)
    }

    fn answer(&mut self) -> Result<(), vhost::Error> {
        match self.answers.pop_front() {
            Some(b) if b & 1 == 1 => Err(vhost::Error::VhostUserProtocol(
                vhost::vhost_user::Error::InvalidParam,
            )),
            _ => Ok(()),
        }
    }

    /// Panics unless `[addr, addr + len)` is inside one region.
    fn check_inside(&self, what: &str, addr: u64, len: u64) {
        let regions = self
            .regions
            .as_ref()
            .unwrap_or_else(|| panic!("{what} given before any memory table"));
        let inside = regions.iter().any(|&(start, size)| {
            addr >= start && addr.checked_add(len).is_some_and(|end| end <= start + size)
        });
        assert!(
            inside,
            "{what} {addr:#x}+{len:#x} is outside guest memory {regions:x?}"
        );
    }
}

impl VhostUserOps for ScriptedVhostUser {
    fn handshake(&mut self) -> Result<u64, FsError> {
        Ok(self.features)
    }

    fn set_features(&mut self, _features: u64) -> Result<(), vhost::Error> {
        self.answer()
    }

    fn set_mem_table(&mut self, regions: &[VhostUserMemoryRegionInfo]) -> Result<(), vhost::Error> {
        self.answer()?;
        self.regions = Some(
            regions
                .iter()
                .map(|r| (r.userspace_addr, r.memory_size))
                .collect(),
        );
        Ok(())
    }

    fn start_vring(&mut self, index: usize, ring: &VringSetup<'_>) -> Result<(), vhost::Error> {
        let c = &ring.config;
        assert!(
            c.queue_size != 0 && c.queue_size <= QUEUE_SIZE && c.queue_max_size == QUEUE_SIZE,
            "queue {index} started with size {} (max {})",
            c.queue_size,
            c.queue_max_size
        );
        let n = u64::from(c.queue_size);
        self.check_inside("descriptor table", c.desc_table_addr, 16 * n);
        self.check_inside("available ring", c.avail_ring_addr, 6 + 2 * n);
        self.check_inside("used ring", c.used_ring_addr, 6 + 8 * n);
        self.answer()?;
        let mut calls = self.handle.calls.lock().unwrap();
        if calls.len() <= index {
            calls.resize_with(index + 1, || None);
        }
        calls[index] = ring.call.try_clone().ok();
        self.handle.starts.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn stop_vring(&mut self, _index: usize) -> Result<(), vhost::Error> {
        self.answer()
    }

    fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}
