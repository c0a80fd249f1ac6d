//! virtio-fs device tests: what a (possibly hostile) driver's register
//! work turns into on the vhost-user side, against a recording backend.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::GuestAddress;

use super::*;
use crate::virtio::test_utils::{memfd_mem, RecordingInterrupt, Rings};

/// What the fake backend was asked, in order.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    Features(u64),
    MemTable(Vec<(u64, u64, u64, u64)>),
    Start {
        index: usize,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
        base: u16,
        call: RawFd,
        kick: RawFd,
    },
    Stop(usize),
}

#[derive(Clone)]
struct Fake {
    features: u64,
    calls: Arc<Mutex<Vec<Call>>>,
    /// start_vring of this queue fails.
    fail_start: Option<usize>,
    sock: Arc<std::os::unix::net::UnixStream>,
}

impl Fake {
    fn new(features: u64) -> (Self, std::os::unix::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fake = Self {
            features,
            calls: Arc::default(),
            fail_start: None,
            sock: Arc::new(a),
        };
        (fake, b)
    }

    fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

fn refused() -> vhost::Error {
    vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::InvalidParam)
}

impl VhostUserOps for Fake {
    fn handshake(&mut self) -> Result<u64, FsError> {
        Ok(self.features)
    }
    fn set_features(&mut self, features: u64) -> Result<(), vhost::Error> {
        self.calls.lock().unwrap().push(Call::Features(features));
        Ok(())
    }
    fn set_mem_table(&mut self, regions: &[VhostUserMemoryRegionInfo]) -> Result<(), vhost::Error> {
        let r = regions
            .iter()
            .map(|r| {
                (
                    r.guest_phys_addr,
                    r.memory_size,
                    r.userspace_addr,
                    r.mmap_offset,
                )
            })
            .collect();
        self.calls.lock().unwrap().push(Call::MemTable(r));
        Ok(())
    }
    fn start_vring(&mut self, index: usize, ring: &VringSetup<'_>) -> Result<(), vhost::Error> {
        if self.fail_start == Some(index) {
            return Err(refused());
        }
        self.calls.lock().unwrap().push(Call::Start {
            index,
            size: ring.config.queue_size,
            desc: ring.config.desc_table_addr,
            avail: ring.config.avail_ring_addr,
            used: ring.config.used_ring_addr,
            base: ring.base,
            call: ring.call.as_raw_fd(),
            kick: ring.kick.as_raw_fd(),
        });
        Ok(())
    }
    fn stop_vring(&mut self, index: usize) -> Result<(), vhost::Error> {
        self.calls.lock().unwrap().push(Call::Stop(index));
        Ok(())
    }
    fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

const V1: u64 = bit(VIRTIO_F_VERSION_1);
const MEM: usize = 0x10_0000;

fn evts() -> Vec<EventFd> {
    (0..NUM_QUEUES).map(|_| crate::eventfd().unwrap()).collect()
}

fn device(fake: &Fake) -> Fs {
    Fs::new("share", Box::new(fake.clone()), None).unwrap()
}

#[test]
fn config_space_has_the_tag_and_one_request_queue_and_is_read_only() {
    let (fake, _peer) = Fake::new(V1);
    let mut fs = Fs::new(&"t".repeat(MAX_TAG_LEN), Box::new(fake), None).unwrap();
    let mut cfg = [0xffu8; 40];
    fs.read_config(0, &mut cfg);
    assert_eq!(&cfg[..MAX_TAG_LEN], "t".repeat(MAX_TAG_LEN).as_bytes());
    assert_eq!(u32::from_le_bytes(cfg[36..40].try_into().unwrap()), 1);
    // A guest writing the tag or reading far past the end changes nothing.
    fs.write_config(0, b"evil");
    fs.write_config(u64::MAX, b"evil");
    let mut again = [0u8; 40];
    fs.read_config(0, &mut again);
    assert_eq!(again, cfg);
    let mut past = [0xffu8; 8];
    fs.read_config(u64::MAX - 2, &mut past);
    assert_eq!(past, [0; 8]);
    assert_eq!(fs.device_type(), 26);
    assert_eq!(fs.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
}

#[test]
fn bad_tags_are_refused() {
    for tag in ["", &"x".repeat(MAX_TAG_LEN + 1), "a\0b"] {
        let (fake, _peer) = Fake::new(V1);
        let r = Fs::new(tag, Box::new(fake), None);
        assert!(matches!(r, Err(FsError::Tag(_))), "{tag:?}");
    }
}

#[test]
fn a_backend_without_version_1_is_refused_and_only_known_features_reach_the_guest() {
    let (fake, _peer) = Fake::new(bit(VIRTIO_RING_F_EVENT_IDX));
    assert!(matches!(
        Fs::new("t", Box::new(fake), None),
        Err(FsError::NoVersion1)
    ));
    // The backend's own bits (protocol features, bit 30) and ones capsule
    // does not know stay between capsule and the backend.
    let offered = V1 | bit(VIRTIO_RING_F_EVENT_IDX) | bit(30) | bit(41) | bit(0);
    let (fake, _peer) = Fake::new(offered);
    let fs = device(&fake);
    assert_eq!(fs.avail_features(), V1 | bit(VIRTIO_RING_F_EVENT_IDX));
}

#[test]
fn activation_hands_memory_rings_and_eventfds_to_the_backend() {
    let (fake, _peer) = Fake::new(V1 | bit(VIRTIO_RING_F_EVENT_IDX));
    let mut fs = device(&fake);
    let mem = memfd_mem(MEM);
    let hi = Rings::new(&mem, 0x1000, 16);
    let req = Rings::new(&mem, 0x4000, 64);
    let kicks = evts();
    let kick_fds: Vec<RawFd> = kicks.iter().map(|e| e.as_raw_fd()).collect();
    // A driver acknowledging more than was offered gets only the offer.
    fs.set_acked_features(u64::MAX);
    let irq = Arc::new(RecordingInterrupt::default());
    fs.activate(mem.clone(), irq, vec![hi.queue(), req.queue()], kicks)
        .unwrap();
    let host = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    let calls = fake.take();
    assert_eq!(calls[0], Call::Features(V1 | bit(VIRTIO_RING_F_EVENT_IDX)));
    assert_eq!(
        calls[1],
        Call::MemTable(vec![(0, MEM as u64, host(0), 0)]),
        "one region, capsule's address of it, offset 0 in the memfd"
    );
    for (i, rings) in [&hi, &req].into_iter().enumerate() {
        assert_eq!(
            calls[2 + i],
            Call::Start {
                index: i,
                size: rings.size,
                desc: host(rings.desc),
                avail: host(rings.avail),
                used: host(rings.used),
                base: 0,
                call: fs.calls[i].as_raw_fd(),
                kick: kick_fds[i],
            }
        );
    }
    assert!(fs.common().is_activated());
    // A driver reset stops both rings in the backend.
    assert!(fs.reset());
    assert_eq!(fake.take(), vec![Call::Stop(0), Call::Stop(1)]);
    assert!(!fs.common().is_activated());
}

/// What an activation's [`ActivateError::Backend`] holds.
fn backend_error(r: &Result<(), ActivateError>) -> Option<&BackendError> {
    match r {
        Err(ActivateError::Backend(e)) => e.downcast_ref(),
        _ => None,
    }
}

#[test]
fn a_driver_without_version_1_is_refused_before_the_backend_hears_of_it() {
    let (fake, _peer) = Fake::new(V1);
    let mut fs = device(&fake);
    let mem = memfd_mem(MEM);
    let hi = Rings::new(&mem, 0x1000, 16);
    let req = Rings::new(&mem, 0x4000, 16);
    fs.set_acked_features(0);
    let irq = Arc::new(RecordingInterrupt::default());
    let r = fs.activate(mem.clone(), irq, vec![hi.queue(), req.queue()], evts());
    assert!(
        matches!(backend_error(&r), Some(BackendError::NoVersion1)),
        "{r:?}"
    );
    assert!(fake.take().is_empty());
    assert!(!fs.common().is_activated());
}

#[test]
fn wrong_queue_counts_and_unready_queues_are_refused() {
    let (fake, _peer) = Fake::new(V1);
    let mut fs = device(&fake);
    let mem = memfd_mem(MEM);
    let hi = Rings::new(&mem, 0x1000, 16);
    let req = Rings::new(&mem, 0x4000, 16);
    fs.set_acked_features(V1);
    let irq = Arc::new(RecordingInterrupt::default());
    let r = fs.activate(mem.clone(), irq.clone(), vec![hi.queue()], evts());
    assert!(matches!(r, Err(ActivateError::QueueCount { .. })), "{r:?}");
    let r = fs.activate(
        mem.clone(),
        irq.clone(),
        vec![hi.queue(), req.queue()],
        vec![],
    );
    assert!(matches!(r, Err(ActivateError::QueueCount { .. })), "{r:?}");
    let mut unready = req.queue();
    unready.set_ready(false);
    let r = fs.activate(mem.clone(), irq, vec![hi.queue(), unready], evts());
    assert!(matches!(r, Err(ActivateError::QueueNotReady(1))), "{r:?}");
    assert!(fake.take().is_empty());
}

/// Rings are handed to virtiofsd as capsule's own addresses: one that
/// starts in guest memory but runs past its end (or lies outside it) is
/// refused before the backend hears of any of it.
#[test]
fn rings_outside_or_across_the_end_of_guest_memory_are_refused() {
    let (fake, _peer) = Fake::new(V1);
    let mut fs = device(&fake);
    let mem = memfd_mem(MEM);
    let hi = Rings::new(&mem, 0x1000, 16);
    let req = Rings::new(&mem, 0x4000, 16);
    fs.set_acked_features(V1);
    let irq = Arc::new(RecordingInterrupt::default());
    let end = MEM as u64;
    // (descriptor table, available ring, used ring) of the request queue.
    for (desc, avail, used) in [
        (end - 16, 0x4100, 0x4200),     // descriptors cross the end
        (0x4000, end - 2, 0x4200),      // available ring crosses the end
        (0x4000, 0x4100, end - 4),      // used ring crosses the end
        (end + 0x1000, 0x4100, 0x4200), // wholly outside
    ] {
        let mut q = req.queue();
        q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        let r = fs.activate(mem.clone(), irq.clone(), vec![hi.queue(), q], evts());
        assert!(
            matches!(r, Err(ActivateError::QueueOutsideMemory(1))),
            "{desc:#x} {avail:#x} {used:#x}: {r:?}"
        );
        assert!(!fs.common().is_activated());
    }
    assert!(fake.take().is_empty(), "the backend heard nothing");
}

#[test]
fn private_guest_memory_cannot_be_shared_and_the_device_stays_inactive() {
    let (fake, _peer) = Fake::new(V1);
    let mut fs = device(&fake);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let hi = Rings::new(&mem, 0x1000, 16);
    let req = Rings::new(&mem, 0x4000, 16);
    fs.set_acked_features(V1);
    let irq = Arc::new(RecordingInterrupt::default());
    let r = fs.activate(mem.clone(), irq, vec![hi.queue(), req.queue()], evts());
    assert!(
        matches!(backend_error(&r), Some(BackendError::NotShareable(0))),
        "{r:?}"
    );
    assert!(!fs.common().is_activated());
    assert_eq!(fake.take(), vec![Call::Features(V1)]);
}

#[test]
fn a_backend_refusing_a_queue_fails_activation_and_stops_what_it_started() {
    let (mut fake, _peer) = Fake::new(V1);
    fake.fail_start = Some(1);
    let mut fs = Fs::new("t", Box::new(fake.clone()), None).unwrap();
    let mem = memfd_mem(MEM);
    let hi = Rings::new(&mem, 0x1000, 16);
    let req = Rings::new(&mem, 0x4000, 16);
    fs.set_acked_features(V1);
    let irq = Arc::new(RecordingInterrupt::default());
    let r = fs.activate(
        mem.clone(),
        irq.clone(),
        vec![hi.queue(), req.queue()],
        evts(),
    );
    assert!(
        matches!(backend_error(&r), Some(BackendError::Request { .. })),
        "{r:?}"
    );
    assert!(!fs.common().is_activated());
    let calls = fake.take();
    // The queue it did start is stopped again.
    assert_eq!(&calls[calls.len() - 2..], &[Call::Stop(0), Call::Stop(1)]);
}

#[test]
fn backend_calls_become_queue_interrupts_only_while_active() {
    let (fake, _peer) = Fake::new(V1);
    let fs = Arc::new(Mutex::new(device(&fake)));
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(fs.clone());
    // Inactive: a stray call is consumed, nothing is raised.
    fs.lock().unwrap().calls[1].write(1).unwrap();
    em.run_with_timeout(50).unwrap();
    assert!(fs.lock().unwrap().calls[1].read().is_err(), "consumed");

    let mem = memfd_mem(MEM);
    let hi = Rings::new(&mem, 0x1000, 16);
    let req = Rings::new(&mem, 0x4000, 16);
    let irq = Arc::new(RecordingInterrupt::default());
    {
        let mut d = fs.lock().unwrap();
        d.set_acked_features(V1);
        d.activate(
            mem.clone(),
            irq.clone(),
            vec![hi.queue(), req.queue()],
            evts(),
        )
        .unwrap();
    }
    em.run_with_timeout(50).unwrap(); // the activation event
    fs.lock().unwrap().calls[1].write(1).unwrap();
    em.run_with_timeout(50).unwrap();
    assert_eq!(irq.take(), vec![InterruptKind::Queue(1)]);
}

/// Runs the loop until the device has seen its backend hang up (at most
/// 10 s): the hang-up comes when the last copy of the backend's socket
/// closes, and another test's fork may hold one until its exec.
fn wait_backend_gone(
    em: &mut EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    fs: &Arc<Mutex<Fs>>,
) {
    for _ in 0..200 {
        em.run_with_timeout(50).unwrap();
        if fs.lock().unwrap().backend_gone {
            return;
        }
    }
    panic!("the backend's hang-up was not noticed in 10 s");
}

#[test]
fn the_backend_closing_its_socket_is_noticed_once() {
    let (fake, peer) = Fake::new(V1);
    let fs = Arc::new(Mutex::new(device(&fake)));
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(fs.clone());
    drop(peer);
    wait_backend_gone(&mut em, &fs);
    // No longer watched: the loop does not spin on the closed socket.
    assert_eq!(em.run_with_timeout(50).unwrap(), 0);
}

/// A reply the backend sends to a request made from a vCPU thread (the
/// activation's SET_MEM_TABLE, a reset's GET_VRING_BASE) makes the socket
/// readable while the event loop waits: that is not the backend leaving,
/// and the share goes on being watched (in the harness every virtio-fs
/// run printed "the vhost-user backend closed its socket" while
/// virtiofsd served on).
#[test]
fn a_reply_in_flight_is_not_the_backend_closing() {
    use std::io::{Read, Write};
    let (fake, mut peer) = Fake::new(V1);
    let fs = Arc::new(Mutex::new(device(&fake)));
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(fs.clone());
    peer.write_all(&[0u8; 12]).unwrap();
    em.run_with_timeout(50).unwrap();
    assert!(!fs.lock().unwrap().backend_gone, "a reply is not a hang-up");
    // The frontend reads its reply; then the backend really leaves.
    let mut reply = [0u8; 12];
    (&*fake.sock).read_exact(&mut reply).unwrap();
    drop(peer);
    wait_backend_gone(&mut em, &fs);
    assert_eq!(em.run_with_timeout(50).unwrap(), 0);
}

#[test]
fn daemon_arguments_per_flavor() {
    let cfg = daemon::DaemonConfig {
        binary: "/x/virtiofsd".into(),
        dir: "/srv/share".into(),
        read_only: true,
        submounts: false,
        sandbox: Some("chroot".into()),
        debug: false,
    };
    let args = daemon::arguments(&cfg, daemon::Flavor::Rust).unwrap();
    assert_eq!(
        args,
        [
            "--fd=3",
            "--shared-dir=/srv/share",
            "--cache=auto",
            "--readonly",
            "--no-announce-submounts",
            "--sandbox=chroot",
            "--log-level=error"
        ]
    );
    // QEMU's daemon cannot enforce read-only: refused, not silently
    // writable.
    assert!(matches!(
        daemon::arguments(&cfg, daemon::Flavor::Qemu),
        Err(daemon::DaemonError::Unsupported { .. })
    ));
    let rw = daemon::DaemonConfig {
        read_only: false,
        ..cfg
    };
    let args = daemon::arguments(&rw, daemon::Flavor::Qemu).unwrap();
    assert_eq!(
        args,
        [
            "--fd=3",
            "-o",
            "source=/srv/share",
            "-o",
            "cache=auto",
            "-o",
            "sandbox=chroot"
        ]
    );
}

#[test]
fn a_missing_daemon_is_one_clear_error() {
    let cfg = daemon::DaemonConfig {
        binary: "/nonexistent/virtiofsd".into(),
        dir: "/".into(),
        read_only: false,
        submounts: true,
        sandbox: None,
        debug: false,
    };
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let e = daemon::Virtiofsd::spawn(&cfg, a.into()).unwrap_err();
    assert!(e.to_string().starts_with("virtiofsd not found"), "{e}");
}
