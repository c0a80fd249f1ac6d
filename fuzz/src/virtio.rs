//! A virtio device as the VMM runs it, for fuzzing.
//!
//! [`Rig`] puts a device behind a transport (a [`MmioTransport`], or a
//! virtio-pci function on PCI bus 0: [`pci`]) over a small guest memory
//! whose bytes come from the fuzzer, adds it to an event loop, and lets a
//! target program the transport through its registers and kick queues.
//! Everything the device reads from the guest (descriptor tables, rings,
//! request headers, frames) is therefore fuzzer data, reached through
//! the same code path a guest reaches.
//!
//! Layout used by [`Rig::set_up_driver`]: queue `i` has its descriptor
//! table at `i * 0x400`, its available ring at `+0x100` and its used ring
//! at `+0x200`, [`QUEUE_SIZE`] entries each; the rest of memory is for
//! buffers. The fuzzer's memory image starts at address 0, so its first
//! bytes are queue 0's descriptors.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::rate_limiter::{BucketConfig, RateLimiter};
use devices::virtio::balloon::{Balloon, BalloonConfig};
use devices::virtio::block::{Block, DiskImage, ID_BYTES};
use devices::virtio::console::Console;
use devices::virtio::fs::Fs;
use devices::virtio::mmio::{MmioTransport, NOTIFY_OFFSET};
use devices::virtio::net::{Net, NetBackend, SendStatus};
use devices::virtio::rng::Rng;
use devices::virtio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use devices::virtio::VirtioDevice;
use devices::GuestMemoryMmap;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, FileOffset, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::fs::{FsHandle, ScriptedVhostUser};
use crate::Input;

/// Guest memory size: small, so fuzzer-chosen addresses often land in it.
pub const MEM_SIZE: usize = 0x1_0000;
/// Queue size the driver programs (devices offer more).
pub const QUEUE_SIZE: u16 = 16;
/// Size of the in-memory disk behind virtio-blk.
pub const DISK_LEN: usize = 64 * 1024;
/// Event-loop rounds after each notification; enough for activation,
/// the queue event and the re-kicks a budget-limited device gives itself.
const EVENT_ROUNDS: usize = 16;

pub mod pci;

/// virtio-mmio register offsets (virtio 1.2 §4.2.2).
pub mod reg {
    pub const DEVICE_FEATURES_SEL: u64 = 0x14;
    pub const DRIVER_FEATURES: u64 = 0x20;
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    pub const QUEUE_SEL: u64 = 0x30;
    pub const QUEUE_NUM: u64 = 0x38;
    pub const QUEUE_READY: u64 = 0x44;
    pub const INTERRUPT_ACK: u64 = 0x64;
    pub const STATUS: u64 = 0x70;
    pub const QUEUE_DESC_LOW: u64 = 0x80;
    pub const QUEUE_DESC_HIGH: u64 = 0x84;
    pub const QUEUE_AVAIL_LOW: u64 = 0x90;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x94;
    pub const QUEUE_USED_LOW: u64 = 0xa0;
    pub const QUEUE_USED_HIGH: u64 = 0xa4;
}

/// Which device sits behind the transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// virtio-blk over an in-memory disk.
    Block,
    /// virtio-net over a scripted backend.
    Net,
    /// virtio-console writing to a sink.
    Console,
    /// virtio-balloon with every queue (statistics, free page reporting).
    Balloon,
    /// virtio-rng, with or without a rate limiter.
    Rng,
    /// virtio-fs over a scripted vhost-user backend ([`crate::fs`]).
    Fs,
}

impl Kind {
    /// A kind chosen by a fuzzer byte.
    pub fn from_byte(b: u8) -> Self {
        match b % 6 {
            0 => Kind::Block,
            1 => Kind::Net,
            2 => Kind::Console,
            3 => Kind::Balloon,
            4 => Kind::Rng,
            _ => Kind::Fs,
        }
    }

    /// How many queues the device has.
    pub fn queues(self) -> u32 {
        match self {
            Kind::Block | Kind::Rng => 1,
            Kind::Net | Kind::Console | Kind::Fs => 2,
            Kind::Balloon => 4,
        }
    }
}

/// Queue `i`'s (descriptor table, available ring, used ring) addresses.
pub fn queue_layout(i: u32) -> (u64, u64, u64) {
    let base = u64::from(i) * 0x400;
    (base, base + 0x100, base + 0x200)
}

/// [`MEM_SIZE`] bytes of guest memory holding `image` from address 0
/// (what does not fit is dropped).
pub fn memory(image: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("memory");
    let n = image.len().min(MEM_SIZE);
    mem.write_slice(&image[..n], GuestAddress(0))
        .expect("image");
    mem
}

/// Like [`memory`], but backed by a memfd, as capsule maps guest memory
/// for a vhost-user backend (virtio-fs refuses anonymous memory).
pub fn shared_memory(image: &[u8]) -> GuestMemoryMmap {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fuzz-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE as u64).expect("memfd size");
    let region = (GuestAddress(0), MEM_SIZE, Some(FileOffset::new(file, 0)));
    let mem = GuestMemoryMmap::from_ranges_with_files(&[region]).expect("memory");
    let n = image.len().min(MEM_SIZE);
    mem.write_slice(&image[..n], GuestAddress(0))
        .expect("image");
    mem
}

/// A disk image in memory; `fail` makes every I/O call fail, so the
/// device's error paths are fuzzed too.
struct MemDisk {
    data: Vec<u8>,
    read_only: bool,
    fail: bool,
}

impl MemDisk {
    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        if self.fail {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let start = usize::try_from(offset).map_err(|_| io::Error::other("offset"))?;
        // The device must keep requests inside the disk (the trait's
        // contract); one that gets here out of range is a device bug.
        match start.checked_add(len) {
            Some(end) if end <= self.data.len() => Ok(start..end),
            _ => panic!(
                "disk access {start:#x}+{len:#x} beyond {:#x}",
                self.data.len()
            ),
        }
    }
}

impl DiskImage for MemDisk {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.data[r]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        assert!(!self.read_only, "write reached a read-only disk");
        let r = self.range(offset, buf.len())?;
        self.data[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.range(0, 0).map(|_| ())
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        assert!(!self.read_only, "zeroes reached a read-only disk");
        let len = usize::try_from(len).map_err(|_| io::Error::other("len"))?;
        let r = self.range(offset, len)?;
        self.data[r].fill(0);
        Ok(())
    }
}

/// A network backend whose received frames and send outcomes are fuzzer
/// data. Its descriptor is an eventfd that is always readable and
/// writable, so the device asks it for frames whenever it may.
pub struct ScriptedBackend {
    evt: EventFd,
    frames: VecDeque<Vec<u8>>,
    outcomes: VecDeque<u8>,
}

impl ScriptedBackend {
    /// A backend that delivers `frames` and answers sends by `outcomes`
    /// (0: sent, 1: full, 2: transient error, 3: fatal error; sent once
    /// they run out).
    pub fn new(frames: VecDeque<Vec<u8>>, outcomes: VecDeque<u8>) -> Self {
        let evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        evt.write(1).expect("eventfd write");
        Self {
            evt,
            frames,
            outcomes,
        }
    }
}

impl NetBackend for ScriptedBackend {
    fn raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
    fn describe(&self) -> String {
        "fuzz backend".into()
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.frames.pop_front() {
            None => Ok(None),
            Some(f) if f.len() == 1 && f[0] == 0xff => {
                Err(io::Error::from_raw_os_error(libc::EAGAIN))
            }
            Some(f) => {
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                Ok(Some(n))
            }
        }
    }
    fn send(&mut self, _frame: &[u8]) -> io::Result<SendStatus> {
        match self.outcomes.pop_front().unwrap_or(0) % 4 {
            1 => Ok(SendStatus::Full),
            2 => Err(io::Error::from_raw_os_error(libc::ENOBUFS)),
            3 => Err(io::Error::from(io::ErrorKind::BrokenPipe)),
            _ => Ok(SendStatus::Sent),
        }
    }
}

/// Console output that fails when told to.
struct FlakyOut {
    fail: bool,
}

impl Write for FlakyOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.fail {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        } else {
            Ok(buf.len())
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the event loop holds: a device as its subscriber.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Which transport a rig puts its device behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// virtio-mmio, capsule's default.
    Mmio,
    /// virtio-pci (`--transport pci`).
    Pci,
}

/// The transport a rig's device is behind, as the guest reaches it.
pub enum Transport {
    /// A virtio-mmio register window.
    Mmio(MmioTransport),
    /// A virtio-pci function on bus 0, behind the configuration ports,
    /// ECAM and its BAR (boxed: it holds two buses).
    Pci(Box<pci::Pci>),
}

/// A device behind its transport, in an event loop, over fuzzer memory.
pub struct Rig {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The transport the guest programs.
    pub transport: Transport,
    /// The device behind it (a snapshot's virtio-pci state is restored
    /// onto a PCI function over the same device).
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// The VMM's event loop, with the device subscribed.
    pub em: EventManager<Subscriber>,
    /// The device's queue count.
    pub queues: u32,
    console: Option<Arc<Mutex<Console>>>,
    /// The virtio-fs backend's handle, for [`Kind::Fs`].
    pub fs: Option<Arc<FsHandle>>,
}

impl Rig {
    /// A `kind` device over memory holding `image` from address 0. Device
    /// options are taken from `input`: a flags byte (block: bit 0
    /// read-only, bit 1 failing disk; console: bit 0 failing output; net:
    /// low 3 bits the number of frames to receive; balloon: its target in
    /// MiB; rng: bit 0 a byte limit, bit 1 a request limit, each a bucket
    /// of the next `u16` tokens refilled in 100 ms), then for net the
    /// frames (`len: u16 | bytes`) and the send outcomes (`n: u8 | bytes`),
    /// for the console the host input, for virtio-fs the backend's
    /// features (`u64`, `VERSION_1` always added) and answers (the rest).
    pub fn new(kind: Kind, input: &mut Input<'_>, image: &[u8]) -> Self {
        Self::new_over(TransportKind::Mmio, kind, input, image)
    }

    /// Like [`Self::new`], behind the transport `over`.
    pub fn new_over(over: TransportKind, kind: Kind, input: &mut Input<'_>, image: &[u8]) -> Self {
        let mem = if kind == Kind::Fs {
            shared_memory(image)
        } else {
            memory(image)
        };
        let opts = input.u8();
        let mut console = None;
        let mut fs = None;
        let (device, sub) = match kind {
            Kind::Block => shared(block_device(opts)),
            Kind::Net => shared(net_device(opts, input)),
            Kind::Console => {
                let c = console_device(opts, input);
                console = Some(c.clone());
                shared(c)
            }
            Kind::Balloon => shared(balloon_device(opts)),
            Kind::Rng => shared(rng_device(opts, input)),
            Kind::Fs => {
                let (d, handle) = fs_device(opts, input);
                fs = Some(handle);
                shared(d)
            }
        };
        let mut rig = match over {
            TransportKind::Mmio => Self::attach(mem, device, sub, kind.queues()),
            TransportKind::Pci => Self::attach_pci(mem, device, sub, kind.queues()),
        };
        rig.console = console;
        rig.fs = fs;
        rig
    }

    /// A rig around a device built by the caller (`device` and `sub` the
    /// same object) over `mem`, with `queues` queues.
    pub fn attach(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        sub: Subscriber,
        queues: u32,
    ) -> Self {
        let transport = MmioTransport::new(mem.clone(), device.clone()).expect("transport");
        Self::with_transport(mem, Transport::Mmio(transport), device, sub, queues)
    }

    /// Like [`Self::attach`], with the device behind a virtio-pci
    /// function on PCI bus 0 ([`pci::Pci`]).
    pub fn attach_pci(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        sub: Subscriber,
        queues: u32,
    ) -> Self {
        let function = pci::Pci::new(mem.clone(), device.clone());
        Self::with_transport(mem, Transport::Pci(Box::new(function)), device, sub, queues)
    }

    fn with_transport(
        mem: GuestMemoryMmap,
        transport: Transport,
        device: Arc<Mutex<dyn VirtioDevice>>,
        sub: Subscriber,
        queues: u32,
    ) -> Self {
        let mut em = EventManager::<Subscriber>::new().expect("event manager");
        em.add_subscriber(sub);
        Self {
            mem,
            transport,
            device,
            em,
            queues,
            console: None,
            fs: None,
        }
    }

    /// The virtio-mmio transport. Panics for a PCI rig: the targets that
    /// ask for it built an MMIO one.
    pub fn mmio(&mut self) -> &mut MmioTransport {
        match &mut self.transport {
            Transport::Mmio(t) => t,
            Transport::Pci(_) => panic!("harness bug: an MMIO register access on a PCI rig"),
        }
    }

    /// The virtio-pci function and its buses, for a PCI rig.
    pub fn pci(&mut self) -> Option<&mut pci::Pci> {
        match &mut self.transport {
            Transport::Pci(p) => Some(p),
            Transport::Mmio(_) => None,
        }
    }

    /// Writes a 32-bit virtio-mmio register (an MMIO rig's).
    pub fn write(&mut self, offset: u64, value: u32) {
        self.mmio().write(offset, &value.to_le_bytes());
    }

    /// Reads a 32-bit virtio-mmio register (an MMIO rig's).
    pub fn read(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mmio().read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Does what a driver does to bring the device up: status handshake,
    /// the given feature words, every queue at [`queue_layout`], DRIVER_OK
    /// (over PCI also the MSI-X table and a vector per queue:
    /// [`pci::Pci::set_up_driver`]).
    pub fn set_up_driver(&mut self, features: u64) {
        if let Transport::Pci(p) = &mut self.transport {
            p.set_up_driver(features, self.queues);
            self.run_events();
            return;
        }
        self.negotiate(features);
        for q in 0..self.queues {
            let (desc, avail, used) = queue_layout(q);
            self.write(reg::QUEUE_SEL, q);
            self.write(reg::QUEUE_NUM, u32::from(QUEUE_SIZE));
            self.write(reg::QUEUE_DESC_LOW, desc as u32);
            self.write(reg::QUEUE_DESC_HIGH, 0);
            self.write(reg::QUEUE_AVAIL_LOW, avail as u32);
            self.write(reg::QUEUE_AVAIL_HIGH, 0);
            self.write(reg::QUEUE_USED_LOW, used as u32);
            self.write(reg::QUEUE_USED_HIGH, 0);
            self.write(reg::QUEUE_READY, 1);
        }
        self.write(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        self.run_events();
    }

    /// The status handshake and feature negotiation of a driver's
    /// bring-up, up to FEATURES_OK (`VERSION_1` always acked).
    pub fn negotiate(&mut self, features: u64) {
        if let Transport::Pci(p) = &mut self.transport {
            p.negotiate(features);
            return;
        }
        self.write(reg::STATUS, ACKNOWLEDGE);
        self.write(reg::STATUS, ACKNOWLEDGE | DRIVER);
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, features as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        // VERSION_1 is mandatory over MMIO.
        self.write(reg::DRIVER_FEATURES, (features >> 32) as u32 | 1);
        self.write(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }

    /// Kicks queue `q` through the notify register (over PCI, the
    /// queue's notification address in the BAR) and lets the event loop
    /// run.
    pub fn notify(&mut self, q: u32) {
        match &mut self.transport {
            Transport::Mmio(t) => t.write(NOTIFY_OFFSET, &q.to_le_bytes()),
            Transport::Pci(p) => p.notify(q),
        }
        self.run_events();
    }

    /// What a driver's interrupt handler does: acknowledges the pending
    /// interrupts (the MMIO `InterruptACK` register; over PCI, reads the
    /// ISR and takes the MSI-X interrupts, checking each went out on a
    /// route the guest programmed).
    pub fn ack_interrupts(&mut self) {
        match &mut self.transport {
            Transport::Mmio(t) => t.write(reg::INTERRUPT_ACK, &3u32.to_le_bytes()),
            Transport::Pci(p) => {
                p.read_isr();
                p.take_interrupts();
            }
        }
    }

    /// A driver reset: device status 0.
    pub fn reset_driver(&mut self) {
        match &mut self.transport {
            Transport::Mmio(t) => t.write(reg::STATUS, &0u32.to_le_bytes()),
            Transport::Pci(p) => p.write_status(0),
        }
    }

    /// Hands host input to a console (ignored for other devices).
    pub fn console_input(&mut self, data: &[u8]) {
        if let Some(c) = &self.console {
            c.lock().unwrap().queue_input(data);
        }
    }

    /// Runs the event loop until it is idle (or [`EVENT_ROUNDS`] rounds).
    pub fn run_events(&mut self) {
        for _ in 0..EVENT_ROUNDS {
            match self.em.run_with_timeout(0) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// Overwrites guest memory at `addr` (a driver adding buffers between
    /// notifications); what does not fit is dropped.
    pub fn poke(&mut self, addr: u64, data: &[u8]) {
        let addr = addr % MEM_SIZE as u64;
        let room = MEM_SIZE - addr as usize;
        let n = data.len().min(room);
        self.mem
            .write_slice(&data[..n], GuestAddress(addr))
            .expect("poke inside memory");
    }
}

/// `device` as the rig holds it twice: the transport's device and the
/// event loop's subscriber.
fn shared<D: VirtioDevice + 'static>(
    device: Arc<Mutex<D>>,
) -> (Arc<Mutex<dyn VirtioDevice>>, Subscriber) {
    (device.clone(), device)
}

/// virtio-blk over a [`DISK_LEN`] in-memory disk; `opts` bit 0 read-only,
/// bit 1 failing.
fn block_device(opts: u8) -> Arc<Mutex<Block>> {
    let disk = MemDisk {
        data: vec![0xa5; DISK_LEN],
        read_only: opts & 1 != 0,
        fail: opts & 2 != 0,
    };
    Arc::new(Mutex::new(
        Block::with_disk(Box::new(disk), [b'f'; ID_BYTES]).expect("block"),
    ))
}

/// virtio-net over a scripted backend: `opts % 8` frames to receive and
/// the send outcomes, read from `input`.
fn net_device(opts: u8, input: &mut Input<'_>) -> Arc<Mutex<Net>> {
    let mut frames = VecDeque::new();
    for _ in 0..(opts % 8) {
        let len = usize::from(input.u16() % 2048);
        frames.push_back(input.bytes(len).to_vec());
    }
    let n = usize::from(input.u8() % 16);
    let outcomes = input.bytes(n).to_vec();
    let backend = ScriptedBackend::new(frames, outcomes.into());
    Arc::new(Mutex::new(
        Net::new(Box::new(backend), [2, 0, 0, 0, 0, 1]).expect("net"),
    ))
}

/// virtio-console whose output fails with `opts` bit 0, with the rest of
/// `input` queued as host input.
fn console_device(opts: u8, input: &mut Input<'_>) -> Arc<Mutex<Console>> {
    let c = Arc::new(Mutex::new(
        Console::new(Box::new(FlakyOut {
            fail: opts & 1 != 0,
        }))
        .expect("console"),
    ));
    c.lock().unwrap().queue_input(input.rest());
    c
}

/// virtio-balloon with every feature, its target `opts` MiB.
fn balloon_device(opts: u8) -> Arc<Mutex<Balloon>> {
    Arc::new(Mutex::new(
        Balloon::new(BalloonConfig {
            amount_mib: u32::from(opts),
            deflate_on_oom: true,
            stats_interval_s: 1,
            free_page_reporting: true,
        })
        .expect("balloon"),
    ))
}

/// virtio-rng with a byte limit (`opts` bit 0) and a request limit (bit
/// 1), each a bucket of the next `u16` of `input` refilled in 100 ms.
fn rng_device(opts: u8, input: &mut Input<'_>) -> Arc<Mutex<Rng>> {
    let mut bucket = |on: bool| {
        on.then(|| BucketConfig {
            size: u64::from(input.u16()),
            one_time_burst: 0,
            refill_time_ms: 100,
        })
    };
    let bytes = bucket(opts & 1 != 0);
    let ops = bucket(opts & 2 != 0);
    let limiter = RateLimiter::new(bytes, ops).expect("rate limiter");
    Arc::new(Mutex::new(Rng::with_limiter(limiter).expect("rng")))
}

/// virtio-fs over a scripted vhost-user backend (its features, then its
/// answers, from `input`), one of three tags by `opts`; with the
/// backend's handle.
fn fs_device(opts: u8, input: &mut Input<'_>) -> (Arc<Mutex<Fs>>, Arc<FsHandle>) {
    let features = input.u64() | (1 << 32);
    let (backend, handle) = ScriptedVhostUser::new(features, input.rest());
    let tag = ["share", "x", "a-tag-of-36-bytes-exactly-0123456789"][usize::from(opts % 3)];
    let d = Arc::new(Mutex::new(
        Fs::new(tag, Box::new(backend), None).expect("fs"),
    ));
    (d, handle)
}

/// The common shape of the per-device targets: device options, driver
/// features, then rounds of (queue to kick, memory patch), the rest of the
/// input being the initial memory image.
///
/// Input: `features: u64 | rounds: u8 | opts_len: u16 | opts | image`;
/// `opts` is what [`Rig::new`] reads (device options, frames, input).
/// Returns the rig afterwards, for tests to look at.
pub fn run_device(kind: Kind, data: &[u8], kick: impl Fn(&mut Rig, u8)) -> Rig {
    run_device_over(TransportKind::Mmio, kind, data, kick)
}

/// [`run_device`] with the device behind the transport `over`.
pub fn run_device_over(
    over: TransportKind,
    kind: Kind,
    data: &[u8],
    kick: impl Fn(&mut Rig, u8),
) -> Rig {
    let mut input = Input::new(data);
    let features = input.u64();
    let rounds = input.u8() % 4 + 1;
    let opts_len = usize::from(input.u16() % 8192);
    let mut opts = Input::new(input.bytes(opts_len));
    let image = input.rest();
    let mut rig = Rig::new_over(over, kind, &mut opts, image);
    rig.set_up_driver(features);
    for round in 0..rounds {
        kick(&mut rig, round);
        // Between kicks the driver recycles buffers: bump the available
        // index of each queue so the same chains are offered again.
        for q in 0..rig.queues {
            let (_, avail, _) = queue_layout(q);
            let idx: u16 = rig.mem.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
            let _ = rig.mem.write_obj(
                idx.wrapping_add(u16::from(round) + 1),
                GuestAddress(avail + 2),
            );
        }
        rig.ack_interrupts();
    }
    rig
}

#[cfg(test)]
mod tests;
