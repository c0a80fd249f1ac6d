//! virtio-vsock with both of its sides fuzzed: the guest's (memory,
//! features, queue notifications, as for the other devices, through
//! [`Rig`]) and the host's (Unix-socket clients of the device's socket,
//! listeners at `<uds>_<port>`, what they write, read, shut down, close).
//!
//! Input: `features: u64 | script_len: u16 | script | image`. The image
//! is guest memory from address 0 (queue `i` at [`queue_layout`]`(i)`);
//! the script is a list of operations, one byte each followed by its
//! operands (see [`Vsock::step`]), at most [`MAX_OPS`] of them, then
//! every queue is kicked once more.
//!
//! Everything runs in the calling thread: host sockets are nonblocking,
//! the event loop runs with a zero timeout, every loop is bounded. Each
//! run has its own temporary directory for the sockets.
//!
//! After every operation that ran the event loop the device is checked:
//! it holds at most [`CONN_BUF_ALLOC`] bytes of guest data per
//! connection, [`MAX_CONNECTIONS`] connections at most. Before the
//! harness itself writes guest memory (a patch, a re-offer) and at the
//! end, the memory is compared with its copy from the last such point:
//! the device may have changed it only inside buffers the guest gave it
//! (a used ring, or a device-writable descriptor's buffer, direct or
//! indirect). Comparing after every operation instead would cost more
//! than the device's work.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::virtio::vsock::conn::CONN_BUF_ALLOC;
use devices::virtio::vsock::{forward_path, Vsock as Device, MAX_CONNECTIONS};
use devices::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempdir::TempDir;

use crate::virtio::{memory, queue_layout, reg, Rig, MEM_SIZE, QUEUE_SIZE};
use crate::Input;

/// Most script operations per run.
pub const MAX_OPS: usize = 128;
/// Most host streams (clients and accepted connections) at once.
const MAX_STREAMS: usize = 16;
/// Most listeners at `<uds>_<port>` at once.
const MAX_LISTENERS: usize = 4;
/// The guest's CID.
pub const GUEST_CID: u64 = 3;
/// The device's queues: receive, transmit, event.
const QUEUES: u32 = 3;

/// A vsock device behind its transport, and the host programs around it.
pub struct Vsock {
    /// The device, its transport and event loop, guest memory.
    pub rig: Rig,
    /// The device itself.
    pub device: Arc<Mutex<Device>>,
    /// Features the driver took.
    features: u64,
    /// The device's socket.
    pub uds: PathBuf,
    /// Listeners at `<uds>_<port>`.
    listeners: Vec<(u32, UnixListener)>,
    /// Host ends of streams: clients of `uds`, and guest connections a
    /// listener accepted.
    pub streams: Vec<UnixStream>,
    /// What host streams read from the device so far.
    pub host_read: Vec<u8>,
    /// Guest memory as of the last memory check (or harness write).
    seen: Vec<u8>,
    _dir: TempDir,
}

impl Vsock {
    /// The device over memory holding `image`, with the driver set up
    /// with `features`.
    pub fn new(features: u64, image: &[u8]) -> Self {
        // Sockets on a disk file system cost more than the run's other
        // work: the thread's directory is in memory where it can be.
        let dir = TempDir::new_in(&crate::thread_dir()).expect("temp dir");
        let uds = dir.as_path().join("v");
        let listener = UnixListener::bind(&uds).expect("bind the device's socket");
        let device = Arc::new(Mutex::new(
            Device::new(GUEST_CID, uds.clone(), listener).expect("vsock"),
        ));
        let mem = memory(image);
        let seen = snapshot(&mem);
        let mut rig = Rig::attach(mem, device.clone(), device.clone(), QUEUES);
        rig.set_up_driver(features);
        Self {
            rig,
            device,
            features,
            uds,
            listeners: Vec::new(),
            streams: Vec::new(),
            host_read: Vec::new(),
            seen,
            _dir: dir,
        }
    }

    /// Checks what the device wrote to guest memory since the last check
    /// (see the module documentation).
    pub fn check_memory(&mut self) {
        let now = snapshot(&self.rig.mem);
        check_writes(&self.seen, &now);
        self.seen = now;
    }

    /// Runs `f` (which runs the event loop) and checks the device after.
    fn checked(&mut self, f: impl FnOnce(&mut Self)) {
        f(self);
        let d = self.device.lock().unwrap();
        let conns = d.connections();
        assert!(conns <= MAX_CONNECTIONS, "{conns} connections");
        let held = d.held_bytes();
        assert!(
            held <= conns * CONN_BUF_ALLOC as usize,
            "{held} bytes held for {conns} connections"
        );
    }

    fn stream(&mut self, input: &mut Input<'_>) -> Option<&mut UnixStream> {
        let n = self.streams.len();
        let i = usize::from(input.u8());
        (n > 0).then(|| &mut self.streams[i % n])
    }

    fn add_stream(&mut self, s: UnixStream) {
        if self.streams.len() < MAX_STREAMS && s.set_nonblocking(true).is_ok() {
            self.streams.push(s);
        }
    }

    /// A host client of the device's socket that writes `data`.
    pub fn client(&mut self, data: &[u8]) {
        if self.streams.len() >= MAX_STREAMS {
            return;
        }
        // The listener's backlog (128) is never full: at most
        // MAX_STREAMS clients exist, so this connect does not block.
        if let Ok(mut s) = UnixStream::connect(&self.uds) {
            let _ = s.set_nonblocking(true);
            let _ = s.write(data);
            self.add_stream(s);
        }
    }

    /// A listener for guest connections to `port`.
    pub fn listen(&mut self, port: u32) {
        if self.listeners.len() < MAX_LISTENERS {
            if let Ok(l) = UnixListener::bind(forward_path(&self.uds, port)) {
                let _ = l.set_nonblocking(true);
                self.listeners.push((port, l));
            }
        }
    }

    /// Accepts what the listeners have waiting.
    pub fn accept(&mut self) {
        let mut got = Vec::new();
        for (_, l) in &self.listeners {
            for _ in 0..MAX_STREAMS {
                match l.accept() {
                    Ok((s, _)) => got.push(s),
                    Err(_) => break,
                }
            }
        }
        for s in got {
            self.add_stream(s);
        }
    }

    /// Reads what host stream `i` has (bounded).
    fn drain(&mut self, input: &mut Input<'_>) {
        let mut buf = [0u8; 16384];
        let mut got = Vec::new();
        if let Some(s) = self.stream(input) {
            for _ in 0..8 {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        }
        if self.host_read.len() < 1 << 20 {
            self.host_read.extend_from_slice(&got);
        }
    }

    /// Kicks queue `q`.
    pub fn kick(&mut self, q: u32) {
        self.checked(|v| v.rig.notify(q % QUEUES));
    }

    /// Runs the event loop (host sockets' events).
    pub fn run(&mut self) {
        self.checked(|v| v.rig.run_events());
    }

    /// Offers queue `q`'s chains again: its available index moves on by
    /// `n` (the ring's entries wrap around the same heads).
    pub fn offer(&mut self, q: u32, n: u16) {
        self.check_memory();
        let (_, avail, _) = queue_layout(q % QUEUES);
        let idx: u16 = self.rig.mem.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
        let _ = self
            .rig
            .mem
            .write_obj(idx.wrapping_add(n), GuestAddress(avail + 2));
        self.seen = snapshot(&self.rig.mem);
    }

    /// One script operation: an opcode byte, then its operands.
    ///
    /// 0 kick queue `q: u8`; 1 offer `q: u8` chains again, `n: u8`;
    /// 2 listen on port `u32`; 3 close listener `i: u8`; 4 client writes
    /// `CONNECT <u32>\n`; 5 client writes `len: u8` raw bytes; 6 accept;
    /// 7 stream `i: u8` writes `len: u16` copies of `byte: u8`; 8 stream
    /// `i` is read; 9 stream `i` shuts its write side; 10 stream `i` is
    /// closed; 11 memory patch `addr: u16 | len: u8 | bytes`; 12 event
    /// loop; 13 transport reset; 14 driver reset and set-up again.
    pub fn step(&mut self, input: &mut Input<'_>) {
        match input.u8() % 15 {
            0 => {
                let q = u32::from(input.u8());
                self.kick(q);
            }
            1 => {
                let q = u32::from(input.u8());
                let n = u16::from(input.u8() % 4) + 1;
                self.offer(q, n);
            }
            2 => {
                let port = input.u32();
                self.listen(port);
            }
            3 => {
                let n = self.listeners.len();
                let i = usize::from(input.u8());
                if n > 0 {
                    let (port, _) = self.listeners.remove(i % n);
                    let _ = std::fs::remove_file(forward_path(&self.uds, port));
                }
            }
            4 => {
                let line = format!("CONNECT {}\n", input.u32());
                self.client(line.as_bytes());
            }
            5 => {
                let n = usize::from(input.u8());
                let data = input.bytes(n);
                self.client(data);
            }
            6 => self.accept(),
            7 => {
                let n = usize::from(input.u16() % 8192);
                let byte = input.u8();
                if let Some(s) = self.stream(input) {
                    let _ = s.write(&vec![byte; n]);
                }
            }
            8 => self.drain(input),
            9 => {
                if let Some(s) = self.stream(input) {
                    let _ = s.shutdown(Shutdown::Write);
                }
            }
            10 => {
                let n = self.streams.len();
                let i = usize::from(input.u8());
                if n > 0 {
                    self.streams.remove(i % n);
                }
            }
            11 => {
                let addr = u64::from(input.u16());
                let n = usize::from(input.u8());
                let data = input.bytes(n);
                self.check_memory();
                self.rig.poke(addr, data);
                self.seen = snapshot(&self.rig.mem);
            }
            12 => self.run(),
            13 => self.checked(|v| {
                v.device.lock().unwrap().transport_reset();
                v.rig.run_events();
            }),
            _ => {
                let features = self.features;
                self.checked(|v| {
                    v.rig.write(reg::STATUS, 0);
                    v.rig.set_up_driver(features);
                });
            }
        }
    }
}

/// Runs one fuzz input (see the module documentation); returns the
/// device and its host side afterwards, for tests to look at.
pub fn run(data: &[u8]) -> Vsock {
    let mut input = Input::new(data);
    let features = input.u64();
    let script_len = usize::from(input.u16());
    let mut script = Input::new(input.bytes(script_len));
    let mut v = Vsock::new(features, input.rest());
    for _ in 0..MAX_OPS {
        if script.is_empty() {
            break;
        }
        v.step(&mut script);
    }
    for q in 0..QUEUES {
        v.kick(q);
    }
    v.check_memory();
    v
}

/// A copy of guest memory.
fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut m = vec![0u8; MEM_SIZE];
    mem.read_slice(&mut m, GuestAddress(0))
        .expect("guest memory");
    m
}

const DESC_LEN: usize = 16;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// The bytes of `mem` the device may write: every queue's used ring, and
/// the buffers of device-writable descriptors (in the tables, and in
/// indirect tables they point to).
fn writable(mem: &[u8]) -> Vec<bool> {
    let mut ok = vec![false; mem.len()];
    let mut mark = |addr: u64, len: u64| {
        let start = usize::try_from(addr).unwrap_or(usize::MAX).min(mem.len());
        let end = usize::try_from(addr.saturating_add(len))
            .unwrap_or(usize::MAX)
            .min(mem.len());
        ok[start..end].fill(true);
    };
    let desc = |at: usize| -> Option<(u64, u32, u16)> {
        let d = mem.get(at..at.checked_add(DESC_LEN)?)?;
        Some((
            u64::from_le_bytes(d[0..8].try_into().ok()?),
            u32::from_le_bytes(d[8..12].try_into().ok()?),
            u16::from_le_bytes(d[12..14].try_into().ok()?),
        ))
    };
    for q in 0..QUEUES {
        let (table, _, used) = queue_layout(q);
        let n = u64::from(QUEUE_SIZE);
        mark(used, 4 + 8 * n + 2);
        for i in 0..usize::from(QUEUE_SIZE) {
            let Some((addr, len, flags)) = desc(table as usize + i * DESC_LEN) else {
                continue;
            };
            if flags & F_WRITE != 0 {
                mark(addr, u64::from(len));
            }
            if flags & F_INDIRECT != 0 {
                let Ok(base) = usize::try_from(addr) else {
                    continue;
                };
                for j in 0..(len as usize / DESC_LEN) {
                    let Some(at) = base.checked_add(j * DESC_LEN) else {
                        break;
                    };
                    match desc(at) {
                        Some((a, l, f)) if f & F_WRITE != 0 => mark(a, u64::from(l)),
                        Some(_) => {}
                        None => break,
                    }
                }
            }
        }
    }
    ok
}

/// Panics if a byte changed between `before` and `after` that no buffer
/// the guest gave (in either) allowed the device to write.
///
/// The harness is instrumented like the code under test, and a
/// comparison per byte of guest memory would cost more than the device:
/// memory is compared in blocks (slice comparisons), bytes only in the
/// blocks that changed.
fn check_writes(before: &[u8], after: &[u8]) {
    const BLOCK: usize = 256;
    let mut allowed: Option<(Vec<bool>, Vec<bool>)> = None;
    for (n, (b, a)) in before.chunks(BLOCK).zip(after.chunks(BLOCK)).enumerate() {
        if b == a {
            continue;
        }
        let (ok_before, ok_after) =
            allowed.get_or_insert_with(|| (writable(before), writable(after)));
        for (k, (x, y)) in b.iter().zip(a).enumerate() {
            let i = n * BLOCK + k;
            if x != y && !ok_before[i] && !ok_after[i] {
                panic!(
                    "the device wrote guest memory at {i:#x} ({x:#04x} -> {y:#04x}), outside every buffer the guest gave it"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The seeds must reach the device's interesting paths: a guest
    //! connection carrying data to a host listener, a host client's
    //! connection answered by the guest, and the write check must fire.

    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        let path = format!("{}/corpus/virtio_vsock/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn used_idx(v: &Vsock, q: u32) -> u16 {
        v.rig
            .mem
            .read_obj(GuestAddress(queue_layout(q).2 + 2))
            .unwrap()
    }

    #[test]
    fn guest_connect_seed_carries_data_to_the_listener() {
        let v = run(&seed("guest-connect-rw"));
        assert!(used_idx(&v, 1) >= 2, "both transmit packets were taken");
        assert_eq!(v.device.lock().unwrap().connections(), 1);
        assert!(
            v.host_read.starts_with(b"hello host"),
            "{:?}",
            String::from_utf8_lossy(&v.host_read)
        );
        // The guest got the RESPONSE in its first receive buffer.
        let op: u16 = v.rig.mem.read_obj(GuestAddress(0x1000 + 30)).unwrap();
        assert_eq!(op, 2, "VIRTIO_VSOCK_OP_RESPONSE");
    }

    #[test]
    fn host_connect_seed_reaches_the_guest_and_gets_ok() {
        let v = run(&seed("host-connect"));
        let op: u16 = v.rig.mem.read_obj(GuestAddress(0x1000 + 30)).unwrap();
        assert_eq!(op, 1, "VIRTIO_VSOCK_OP_REQUEST to the guest");
        let dst: u32 = v.rig.mem.read_obj(GuestAddress(0x1000 + 20)).unwrap();
        assert_eq!(dst, 1234);
        assert!(
            v.host_read.starts_with(b"OK 1073741824\n"),
            "{:?}",
            String::from_utf8_lossy(&v.host_read)
        );
        // The host's bytes reached the guest's second receive buffer.
        let op: u16 = v.rig.mem.read_obj(GuestAddress(0x1400 + 30)).unwrap();
        assert_eq!(op, 5, "VIRTIO_VSOCK_OP_RW");
        let mut data = [0u8; 4];
        v.rig
            .mem
            .read_slice(&mut data, GuestAddress(0x1400 + 44))
            .unwrap();
        assert_eq!(&data, b"pppp");
    }

    #[test]
    fn write_check_catches_a_write_outside_buffers() {
        let before = vec![0u8; MEM_SIZE];
        let mut after = before.clone();
        // The used ring of queue 0 may change ...
        after[queue_layout(0).2 as usize + 2] = 1;
        check_writes(&before, &after);
        // ... a byte no descriptor names may not.
        after[0x8000] = 1;
        let r = std::panic::catch_unwind(|| check_writes(&before, &after));
        assert!(r.is_err());
        // Unless a writable descriptor names it.
        let mut with_desc = before.clone();
        with_desc[0..8].copy_from_slice(&0x8000u64.to_le_bytes());
        with_desc[8..12].copy_from_slice(&16u32.to_le_bytes());
        with_desc[12..14].copy_from_slice(&F_WRITE.to_le_bytes());
        let mut after = with_desc.clone();
        after[0x8000] = 1;
        check_writes(&with_desc, &after);
    }
}
