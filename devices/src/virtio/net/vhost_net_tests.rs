//! vhost-net device tests: feature negotiation, the memory table, and
//! what a (possibly hostile) driver's register work turns into on the
//! vhost-net side, against a recording stand-in for the kernel.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
};
use vm_memory::GuestAddress;

use super::*;
use crate::virtio::test_utils::{RecordingInterrupt, Rings};

/// What the stand-in was asked, in order.
#[derive(Debug, Clone, PartialEq)]
enum Req {
    Features(u64),
    MemTable(Vec<(u64, u64, u64)>),
    Start {
        index: usize,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
        base: u16,
        fds: [RawFd; 3],
    },
    Offloads(u64),
    Backend(usize, bool),
    Stop(usize),
}

#[derive(Clone)]
struct Kernel {
    features: u64,
    offloads: u64,
    log: Arc<Mutex<Vec<Req>>>,
    /// start_vring of this queue fails.
    fail_start: Option<usize>,
    /// set_backend (attaching) of this queue fails.
    fail_attach: Option<usize>,
}

impl Kernel {
    fn new(features: u64) -> Self {
        Self {
            features,
            offloads: bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM),
            log: Arc::default(),
            fail_start: None,
            fail_attach: None,
        }
    }

    fn take(&self) -> Vec<Req> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    fn push(&self, r: Req) {
        self.log.lock().unwrap().push(r);
    }
}

fn einval() -> vhost::Error {
    vhost::Error::IoctlError(io::Error::from_raw_os_error(libc::EINVAL))
}

impl VhostNetOps for Kernel {
    fn describe(&self) -> String {
        "TAP test (vhost-net)".into()
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn offload_features(&self) -> u64 {
        self.offloads
    }
    fn set_features(&mut self, features: u64) -> Result<(), vhost::Error> {
        self.push(Req::Features(features));
        Ok(())
    }
    fn set_mem_table(&mut self, regions: &[VhostUserMemoryRegionInfo]) -> Result<(), vhost::Error> {
        let r = regions
            .iter()
            .map(|r| (r.guest_phys_addr, r.memory_size, r.userspace_addr))
            .collect();
        self.push(Req::MemTable(r));
        Ok(())
    }
    fn start_vring(&mut self, index: usize, ring: &VringSetup<'_>) -> Result<(), vhost::Error> {
        if self.fail_start == Some(index) {
            return Err(einval());
        }
        self.push(Req::Start {
            index,
            size: ring.config.queue_size,
            desc: ring.config.desc_table_addr,
            avail: ring.config.avail_ring_addr,
            used: ring.config.used_ring_addr,
            base: ring.base,
            fds: [
                ring.kick.as_raw_fd(),
                ring.call.as_raw_fd(),
                ring.err.as_raw_fd(),
            ],
        });
        Ok(())
    }
    fn set_backend(&mut self, index: usize, attach: bool) -> Result<(), vhost::Error> {
        if attach && self.fail_attach == Some(index) {
            return Err(einval());
        }
        self.push(Req::Backend(index, attach));
        Ok(())
    }
    fn stop_vring(&mut self, index: usize) -> Result<u32, vhost::Error> {
        self.push(Req::Stop(index));
        Ok(0)
    }
    fn set_offloads(&mut self, acked: u64) -> io::Result<()> {
        self.push(Req::Offloads(acked));
        Ok(())
    }
}

const V1: u64 = bit(VIRTIO_F_VERSION_1);
const MEM: usize = 0x10_0000;
/// What Linux 6.1's vhost-net offers (VHOST_NET_FEATURES): the ring
/// features, NOTIFY_ON_EMPTY, ANY_LAYOUT, LOG_ALL, the vnet header bit,
/// MRG_RXBUF and ACCESS_PLATFORM.
const KERNEL_FEATURES: u64 = V1
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | (1 << 24)
    | (1 << 27)
    | (1 << 26)
    | (1 << 33)
    | (1 << 30);

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
}

fn evts() -> Vec<EventFd> {
    (0..NUM_QUEUES).map(|_| crate::eventfd().unwrap()).collect()
}

fn device(k: &Kernel) -> VhostNet {
    VhostNet::new(Box::new(k.clone()), [2, 0, 0, 0, 0, 1]).unwrap()
}

/// What an activation's [`ActivateError::Backend`] holds.
fn backend_error(r: &Result<(), ActivateError>) -> Option<&VhostActivateError> {
    match r {
        Err(ActivateError::Backend(e)) => e.downcast_ref(),
        _ => None,
    }
}

#[test]
fn the_guest_is_offered_what_vhost_net_and_the_tap_carry_plus_mac_and_status() {
    let k = Kernel::new(KERNEL_FEATURES);
    let net = device(&k);
    let offered = net.avail_features();
    assert_eq!(
        offered,
        PASSED_FEATURES
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
    );
    // Nothing of vhost's own (LOG_ALL, the vnet header bit,
    // ACCESS_PLATFORM, legacy layout bits) reaches the guest.
    assert_eq!(offered & ((1 << 26) | (1 << 27) | (1 << 33) | (1 << 30)), 0);
    // A kernel without MRG_RXBUF or EVENT_IDX: not offered either.
    assert_eq!(
        offered_features(V1, 0),
        V1 | bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS)
    );
}

#[test]
fn vhost_net_is_told_only_the_accepted_features_it_knows() {
    let acked = V1
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4);
    assert_eq!(
        vhost_features(acked, KERNEL_FEATURES),
        V1 | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_NET_F_MRG_RXBUF)
    );
    // Never a bit vhost-net did not offer, whatever the driver accepted.
    assert_eq!(vhost_features(u64::MAX, V1), V1);
}

#[test]
fn a_kernel_without_version_1_is_refused_at_start() {
    let k = Kernel::new(KERNEL_FEATURES & !V1);
    let r = VhostNet::new(Box::new(k), [2, 0, 0, 0, 0, 1]);
    assert!(matches!(r, Err(VhostNetError::NoVersion1)), "{r:?}");
}

#[test]
fn the_memory_table_has_each_region_with_capsules_address() {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), MEM),
        (GuestAddress(0x1_0000_0000), 2 * MEM),
    ])
    .unwrap();
    let host = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    let table: Vec<_> = memory_table(&mem)
        .iter()
        .map(|r| (r.guest_phys_addr, r.memory_size, r.userspace_addr))
        .collect();
    assert_eq!(
        table,
        vec![
            (0, MEM as u64, host(0)),
            (0x1_0000_0000, 2 * MEM as u64, host(0x1_0000_0000)),
        ]
    );
}

#[test]
fn activation_hands_features_memory_rings_and_the_tap_to_vhost_net_and_reset_takes_them_back() {
    let k = Kernel::new(KERNEL_FEATURES);
    let mut net = device(&k);
    let mem = mem();
    let rx = Rings::new(&mem, 0x1000, 16);
    let tx = Rings::new(&mem, 0x4000, 64);
    let kicks = evts();
    let kick_fds: Vec<RawFd> = kicks.iter().map(|e| e.as_raw_fd()).collect();
    let acked = V1 | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_CSUM);
    net.set_acked_features(acked);
    let irq = Arc::new(RecordingInterrupt::default());
    net.activate(mem.clone(), irq, vec![rx.queue(), tx.queue()], kicks)
        .unwrap();
    assert!(net.is_activated());
    let host0 = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let mut want = vec![
        Req::Features(V1 | bit(VIRTIO_NET_F_MRG_RXBUF)),
        Req::MemTable(vec![(0, MEM as u64, host0)]),
    ];
    for (i, rings) in [&rx, &tx].into_iter().enumerate() {
        want.push(Req::Start {
            index: i,
            size: rings.size,
            // Guest addresses: the vhost crate translates them.
            desc: rings.desc,
            avail: rings.avail,
            used: rings.used,
            base: 0,
            fds: [
                kick_fds[i],
                net.calls[i].as_raw_fd(),
                net.errs[i].as_raw_fd(),
            ],
        });
    }
    want.extend([
        Req::Offloads(acked),
        Req::Backend(0, true),
        Req::Backend(1, true),
    ]);
    assert_eq!(k.take(), want);

    assert!(net.reset());
    assert_eq!(
        k.take(),
        vec![
            Req::Backend(0, false),
            Req::Backend(1, false),
            Req::Stop(0),
            Req::Stop(1),
            Req::Offloads(0),
        ]
    );
    assert!(!net.is_activated());
    // Dropping a reset device asks the kernel for nothing more.
    drop(net);
    assert!(k.take().is_empty());
}

#[test]
fn dropping_an_active_device_stops_vhost_net() {
    let k = Kernel::new(KERNEL_FEATURES);
    let mut net = device(&k);
    let mem = mem();
    let rx = Rings::new(&mem, 0x1000, 16);
    let tx = Rings::new(&mem, 0x4000, 16);
    net.set_acked_features(V1);
    let irq = Arc::new(RecordingInterrupt::default());
    net.activate(mem.clone(), irq, vec![rx.queue(), tx.queue()], evts())
        .unwrap();
    k.take();
    drop(net);
    assert_eq!(
        k.take(),
        vec![
            Req::Backend(0, false),
            Req::Backend(1, false),
            Req::Stop(0),
            Req::Stop(1),
        ]
    );
}

#[test]
fn a_driver_without_version_1_or_with_wrong_queues_is_refused_before_vhost_net_hears_of_it() {
    let k = Kernel::new(KERNEL_FEATURES);
    let mut net = device(&k);
    let mem = mem();
    let rx = Rings::new(&mem, 0x1000, 16);
    let tx = Rings::new(&mem, 0x4000, 16);
    let irq = Arc::new(RecordingInterrupt::default());
    net.set_acked_features(bit(VIRTIO_NET_F_MAC));
    let r = net.activate(
        mem.clone(),
        irq.clone(),
        vec![rx.queue(), tx.queue()],
        evts(),
    );
    assert!(
        matches!(backend_error(&r), Some(VhostActivateError::NoVersion1)),
        "{r:?}"
    );
    net.set_acked_features(V1);
    let r = net.activate(mem.clone(), irq.clone(), vec![rx.queue()], evts());
    assert!(matches!(r, Err(ActivateError::QueueCount { .. })), "{r:?}");
    let mut unready = tx.queue();
    unready.set_ready(false);
    let r = net.activate(mem.clone(), irq, vec![rx.queue(), unready], evts());
    assert!(matches!(r, Err(ActivateError::QueueNotReady(1))), "{r:?}");
    assert!(k.take().is_empty());
    assert!(!net.is_activated());
}

/// A ring that starts in guest memory but runs past its end (or lies
/// outside it) is refused before vhost-net hears of any of it.
#[test]
fn rings_outside_or_across_the_end_of_guest_memory_are_refused() {
    let k = Kernel::new(KERNEL_FEATURES);
    let mut net = device(&k);
    let mem = mem();
    let rx = Rings::new(&mem, 0x1000, 16);
    let tx = Rings::new(&mem, 0x4000, 16);
    net.set_acked_features(V1);
    let irq = Arc::new(RecordingInterrupt::default());
    let end = MEM as u64;
    for (desc, avail, used) in [
        (end - 16, 0x4100, 0x4200),
        (0x4000, end - 2, 0x4200),
        (0x4000, 0x4100, end - 4),
        (end + 0x1000, 0x4100, 0x4200),
        (0xffff_ffff_ffff_f000, 0x4100, 0x4200),
    ] {
        let mut q = tx.queue();
        q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        let r = net.activate(mem.clone(), irq.clone(), vec![rx.queue(), q], evts());
        assert!(
            matches!(r, Err(ActivateError::QueueOutsideMemory(1))),
            "{desc:#x} {avail:#x} {used:#x}: {r:?}"
        );
        assert!(!net.is_activated());
    }
    assert!(k.take().is_empty(), "vhost-net heard nothing");
}

#[test]
fn a_refused_ring_or_tap_fails_activation_and_undoes_what_was_started() {
    let mem = mem();
    let rx = Rings::new(&mem, 0x1000, 16);
    let tx = Rings::new(&mem, 0x4000, 16);
    let irq = Arc::new(RecordingInterrupt::default());

    let mut k = Kernel::new(KERNEL_FEATURES);
    k.fail_start = Some(1);
    let mut net = device(&k);
    net.set_acked_features(V1);
    let r = net.activate(
        mem.clone(),
        irq.clone(),
        vec![rx.queue(), tx.queue()],
        evts(),
    );
    assert!(
        matches!(backend_error(&r), Some(VhostActivateError::Request { .. })),
        "{r:?}"
    );
    assert!(!net.is_activated());
    let log = k.take();
    assert_eq!(
        &log[log.len() - 3..],
        &[Req::Stop(0), Req::Stop(1), Req::Offloads(0)],
        "{log:?}"
    );
    assert!(!log.iter().any(|r| matches!(r, Req::Backend(..))));

    let mut k = Kernel::new(KERNEL_FEATURES);
    k.fail_attach = Some(1);
    let mut net = device(&k);
    net.set_acked_features(V1);
    let r = net.activate(mem.clone(), irq, vec![rx.queue(), tx.queue()], evts());
    assert!(backend_error(&r).is_some(), "{r:?}");
    let log = k.take();
    assert_eq!(
        &log[log.len() - 6..],
        &[
            Req::Backend(0, true),
            Req::Backend(0, false),
            Req::Backend(1, false),
            Req::Stop(0),
            Req::Stop(1),
            Req::Offloads(0),
        ],
        "{log:?}"
    );
    // The device can be activated again after the driver's reset.
    assert!(net.reset());
}

#[test]
fn calls_become_queue_interrupts_only_while_active_and_errors_raise_none() {
    let k = Kernel::new(KERNEL_FEATURES);
    let net = Arc::new(Mutex::new(device(&k)));
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(net.clone());
    // Inactive: a stray call is consumed, nothing is raised.
    net.lock().unwrap().calls[1].write(1).unwrap();
    em.run_with_timeout(50).unwrap();
    assert!(net.lock().unwrap().calls[1].read().is_err(), "consumed");

    let mem = mem();
    let rx = Rings::new(&mem, 0x1000, 16);
    let tx = Rings::new(&mem, 0x4000, 16);
    let irq = Arc::new(RecordingInterrupt::default());
    {
        let mut d = net.lock().unwrap();
        d.set_acked_features(V1);
        d.activate(
            mem.clone(),
            irq.clone(),
            vec![rx.queue(), tx.queue()],
            evts(),
        )
        .unwrap();
    }
    em.run_with_timeout(50).unwrap(); // the activation event
    net.lock().unwrap().calls[0].write(1).unwrap();
    em.run_with_timeout(50).unwrap();
    assert_eq!(irq.take(), vec![InterruptKind::Queue(0)]);
    net.lock().unwrap().calls[1].write(3).unwrap();
    em.run_with_timeout(50).unwrap();
    assert_eq!(irq.take(), vec![InterruptKind::Queue(1)], "one per wake-up");
    // A ring error is logged and consumed; the guest is not interrupted.
    net.lock().unwrap().errs[1].write(1).unwrap();
    em.run_with_timeout(50).unwrap();
    assert!(irq.take().is_empty());
    assert!(net.lock().unwrap().errs[1].read().is_err(), "consumed");
    assert_eq!(net.lock().unwrap().relayed, 2);
}

#[test]
fn the_config_space_has_the_mac_and_link_up() {
    let k = Kernel::new(KERNEL_FEATURES);
    let net = device(&k);
    let mut b = [0u8; 8];
    net.read_config(0, &mut b);
    assert_eq!(b, [2, 0, 0, 0, 0, 1, 1, 0]);
}
