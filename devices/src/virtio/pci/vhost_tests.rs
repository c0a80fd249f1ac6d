//! Devices whose queues another party serves (vhost-net in the host
//! kernel, virtio-fs's vhost-user backend) behind a virtio-pci function:
//! the backend's kick eventfds are the transport's notification
//! eventfds (the ones the VMM registers as ioeventfds, and which a
//! notification reaching the transport, directly or through the
//! `PCI_CFG` window, signals); its call eventfds become the MSI-X vector
//! the driver chose for the queue at the time of the call (none: only
//! the ISR bit); a reset stops the backend's rings and a second
//! activation hands them over again.

use std::os::unix::io::{AsRawFd, RawFd};

use event_manager::{EventManager, SubscriberOps};
use vhost::VhostUserMemoryRegionInfo;

use super::*;
use crate::virtio::features::VIRTIO_RING_F_EVENT_IDX;
use crate::virtio::fs::{self, Fs, FsError, VhostUserOps};
use crate::virtio::net::vhost_net::{self, VhostNet, VhostNetOps};
use crate::virtio::test_utils::memfd_mem;

const V1: u64 = bit(VIRTIO_F_VERSION_1);
const MEM: usize = 0x10_0000;

/// What a stand-in backend was given: per queue, its own copies of the
/// kick and call eventfds of the latest start, and the rings stopped.
#[derive(Default)]
struct Seen {
    kicks: Vec<Option<EventFd>>,
    calls: Vec<Option<EventFd>>,
    starts: usize,
    stops: Vec<usize>,
}

type Shared = Arc<StdMutex<Seen>>;

impl Seen {
    fn start(&mut self, index: usize, kick: &EventFd, call: &EventFd) {
        let slot = |v: &mut Vec<Option<EventFd>>, fd: &EventFd| {
            if v.len() <= index {
                v.resize_with(index + 1, || None);
            }
            v[index] = Some(fd.try_clone().unwrap());
        };
        slot(&mut self.kicks, kick);
        slot(&mut self.calls, call);
        self.starts += 1;
    }
}

/// vhost-net as the device sees it, recording into a [`Seen`]; with
/// `refuse_second_start`, the second ring start fails once (EINVAL).
struct Kernel {
    seen: Shared,
    refuse_second_start: bool,
}

impl VhostNetOps for Kernel {
    fn describe(&self) -> String {
        "TAP test (vhost-net)".into()
    }
    fn features(&self) -> u64 {
        V1 | bit(VIRTIO_RING_F_EVENT_IDX)
    }
    fn offload_features(&self) -> u64 {
        0
    }
    fn set_features(&mut self, _features: u64) -> Result<(), vhost::Error> {
        Ok(())
    }
    fn set_mem_table(&mut self, _: &[VhostUserMemoryRegionInfo]) -> Result<(), vhost::Error> {
        Ok(())
    }
    fn start_vring(
        &mut self,
        index: usize,
        r: &vhost_net::VringSetup<'_>,
    ) -> Result<(), vhost::Error> {
        let mut seen = self.seen.lock().unwrap();
        if self.refuse_second_start && seen.starts == 1 {
            self.refuse_second_start = false;
            return Err(vhost::Error::IoctlError(io::Error::from_raw_os_error(
                libc::EINVAL,
            )));
        }
        seen.start(index, r.kick, r.call);
        Ok(())
    }
    fn set_backend(&mut self, _index: usize, _attach: bool) -> Result<(), vhost::Error> {
        Ok(())
    }
    fn stop_vring(&mut self, index: usize) -> Result<u32, vhost::Error> {
        self.seen.lock().unwrap().stops.push(index);
        Ok(0)
    }
    fn set_offloads(&mut self, _acked: u64) -> io::Result<()> {
        Ok(())
    }
}

/// A vhost-user backend (virtiofsd) as the device sees it.
struct Backend(Shared, std::os::unix::net::UnixStream);

impl VhostUserOps for Backend {
    fn handshake(&mut self) -> Result<u64, FsError> {
        Ok(V1 | bit(VIRTIO_RING_F_EVENT_IDX))
    }
    fn set_features(&mut self, _features: u64) -> Result<(), vhost::Error> {
        Ok(())
    }
    fn set_mem_table(&mut self, _: &[VhostUserMemoryRegionInfo]) -> Result<(), vhost::Error> {
        Ok(())
    }
    fn start_vring(&mut self, index: usize, r: &fs::VringSetup<'_>) -> Result<(), vhost::Error> {
        self.0.lock().unwrap().start(index, r.kick, r.call);
        Ok(())
    }
    fn stop_vring(&mut self, index: usize) -> Result<(), vhost::Error> {
        self.0.lock().unwrap().stops.push(index);
        Ok(())
    }
    fn raw_fd(&self) -> RawFd {
        self.1.as_raw_fd()
    }
}

type Loop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// A function with the device behind it and the device in an event loop.
struct Rig {
    t: VirtioPci,
    em: Loop,
    mem: GuestMemoryMmap,
    seen: Shared,
    /// Keeps the vhost-user socket's peer open (its hang-up would be the
    /// backend ending).
    _peer: Option<std::os::unix::net::UnixStream>,
}

fn rig<D: VirtioDevice + 'static>(
    device: D,
    mem: GuestMemoryMmap,
    seen: Shared,
    peer: Option<std::os::unix::net::UnixStream>,
) -> Rig {
    let device = Arc::new(Mutex::new(device));
    let mut em = Loop::new().unwrap();
    em.add_subscriber(device.clone());
    let routes = Arc::new(Routes::default());
    let t = VirtioPci::new(mem.clone(), device, BAR, 24, routes).unwrap();
    Rig {
        t,
        em,
        mem,
        seen,
        _peer: peer,
    }
}

fn vhost_net() -> Rig {
    vhost_net_with(false)
}

/// A vhost-net function over the `Kernel` stand-in, which refuses the
/// rings from its second start on if `refuse_second_start`.
fn vhost_net_with(refuse_second_start: bool) -> Rig {
    let seen = Shared::default();
    let net = VhostNet::new(
        Box::new(Kernel {
            seen: seen.clone(),
            refuse_second_start,
        }),
        [2, 0, 0, 0, 0, 9],
    )
    .unwrap();
    rig(net, memfd_mem(MEM), seen, None)
}

fn virtio_fs() -> Rig {
    let seen = Shared::default();
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let fs = Fs::new("share", Box::new(Backend(seen.clone(), a)), None).unwrap();
    rig(fs, memfd_mem(MEM), seen, Some(b))
}

const ENABLE: u64 = 0x8000;

impl Rig {
    /// MSI-X on, and vectors 0-2 programmed and unmasked.
    fn enable_msix(&mut self) {
        let control = self.t.msix_cap as u64 + 2;
        self.t.config_write(control, &(ENABLE as u16).to_le_bytes());
        for v in 0..3u64 {
            let entry = layout::MSIX_TABLE + v * 16;
            wr(&mut self.t, entry, 8, 0xfee0_0000);
            wr(&mut self.t, entry + 8, 4, 0x30 + v);
            wr(&mut self.t, entry + 12, 4, 0);
        }
    }

    /// What Linux's virtio-pci driver does: status steps, VERSION_1 only,
    /// the configuration vector 0, queue `i` on vector `i + 1` with
    /// 16-entry rings, DRIVER_OK.
    fn bring_up(&mut self) {
        let t = &mut self.t;
        wr(t, 0x14, 1, u64::from(ACKNOWLEDGE));
        wr(t, 0x14, 1, u64::from(ACKNOWLEDGE | DRIVER));
        wr(t, 0x08, 4, 1);
        wr(t, 0x0c, 4, 1);
        wr(t, 0x14, 1, u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK));
        assert_eq!(
            rd(t, 0x14, 1),
            u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        );
        wr(t, 0x10, 2, 0);
        for q in 0..2u16 {
            let rings = Rings::new(&self.mem, 0x1000 + 0x2000 * u64::from(q), QSIZE);
            wr(t, 0x16, 2, u64::from(q));
            wr(t, 0x18, 2, u64::from(QSIZE));
            wr(t, 0x1a, 2, u64::from(q + 1));
            assert_eq!(rd(t, 0x1a, 2), u64::from(q + 1), "vector accepted");
            wr(t, 0x20, 8, rings.desc);
            wr(t, 0x28, 8, rings.avail);
            wr(t, 0x30, 8, rings.used);
            wr(t, 0x1c, 2, 1);
        }
        wr(
            t,
            0x14,
            1,
            u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
        );
        assert_eq!(
            rd(t, 0x14, 1),
            u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
            "activated, no NEEDS_RESET"
        );
        self.spin();
    }

    fn spin(&mut self) {
        for _ in 0..3 {
            self.em.run_with_timeout(10).unwrap();
        }
    }

    /// The backend's copy of queue `q`'s kick eventfd.
    fn kick(&self, q: usize) -> EventFd {
        let seen = self.seen.lock().unwrap();
        seen.kicks[q].as_ref().unwrap().try_clone().unwrap()
    }

    /// The backend uses buffers of queue `q`: writes its call eventfd,
    /// and the event loop relays it.
    fn call(&mut self, q: usize) {
        let call = {
            let seen = self.seen.lock().unwrap();
            seen.calls[q].as_ref().unwrap().try_clone().unwrap()
        };
        call.write(1).unwrap();
        self.spin();
    }

    /// Interrupts fired on each of the three vectors since the last look.
    fn fired(&self) -> [u64; 3] {
        let msix = self.t.interrupt().msix();
        std::array::from_fn(|v| msix.irqs()[v].read().unwrap_or(0))
    }
}

/// What both devices must do behind the function.
fn served_elsewhere_over_pci(mut r: Rig) {
    r.enable_msix();
    r.bring_up();
    assert_eq!(r.seen.lock().unwrap().starts, 2, "both rings handed over");

    // Kicks: the eventfd the VMM registers as the notification address's
    // ioeventfd is the backend's kick eventfd...
    for q in 0..2 {
        let kick = r.kick(q);
        r.t.queue_evts()[q].write(1).unwrap();
        assert_eq!(kick.read().unwrap(), 1, "queue {q}: ioeventfd kick");
        // ...and a notification that reaches the transport (no
        // ioeventfd matched) signals it as well.
        wr(&mut r.t, layout::NOTIFY + 4 * q as u64, 2, q as u64);
        assert_eq!(kick.read().unwrap(), 1, "queue {q}: MMIO kick");
    }
    // Through the PCI_CFG window (a driver that cannot map the BAR).
    let cap = caps(&mut r.t)
        .into_iter()
        .find(|c| c.1 == CAP_VENDOR && c.2[1] == CFG_PCI)
        .unwrap()
        .0;
    r.t.config_write(cap + 4, &[0]);
    r.t.config_write(cap + 8, &((layout::NOTIFY + 4) as u32).to_le_bytes());
    r.t.config_write(cap + 12, &2u32.to_le_bytes());
    r.t.config_write(cap + 16, &1u32.to_le_bytes());
    assert_eq!(r.kick(1).read().unwrap(), 1, "PCI_CFG kick");
    assert!(r.kick(0).read().is_err(), "queue 0 not kicked");

    // Calls: each queue's own vector.
    r.call(0);
    assert_eq!(r.fired(), [0, 1, 0]);
    r.call(1);
    assert_eq!(r.fired(), [0, 0, 1]);
    assert_eq!(rd(&mut r.t, layout::ISR, 1), 1, "ISR queue bit");
    // The driver moves queue 1 to vector 1: the next call follows.
    wr(&mut r.t, 0x16, 2, 1);
    wr(&mut r.t, 0x1a, 2, 1);
    r.call(1);
    assert_eq!(r.fired(), [0, 1, 0]);
    // A masked vector keeps the interrupt pending until unmasked.
    let entry1 = layout::MSIX_TABLE + 16;
    wr(&mut r.t, entry1 + 12, 4, 1);
    r.call(0);
    assert_eq!(r.fired(), [0, 0, 0]);
    assert_eq!(rd(&mut r.t, layout::MSIX_PBA, 8), 0b10);
    wr(&mut r.t, entry1 + 12, 4, 0);
    assert_eq!(r.fired(), [0, 1, 0]);
    // VIRTIO_MSI_NO_VECTOR: no message, only the ISR bit.
    wr(&mut r.t, 0x1a, 2, u64::from(NO_VECTOR));
    assert_eq!(rd(&mut r.t, 0x1a, 2), u64::from(NO_VECTOR));
    let _ = rd(&mut r.t, layout::ISR, 1);
    r.call(1);
    assert_eq!(r.fired(), [0, 0, 0]);
    assert_eq!(rd(&mut r.t, layout::ISR, 1), 1);

    // The driver resets the device: the backend stops both rings, and a
    // late call interrupts nobody.
    wr(&mut r.t, 0x14, 1, 0);
    assert_eq!(rd(&mut r.t, 0x14, 1), 0);
    assert_eq!(r.seen.lock().unwrap().stops, vec![0, 1]);
    r.call(0);
    assert_eq!(r.fired(), [0, 0, 0]);
    assert_eq!(rd(&mut r.t, layout::ISR, 1), 0);

    // And brings it up again (as after a driver reload): the rings are
    // handed over once more, kicks and calls work as before.
    r.bring_up();
    assert_eq!(r.seen.lock().unwrap().starts, 4);
    let kick = r.kick(0);
    r.t.queue_evts()[0].write(1).unwrap();
    assert_eq!(kick.read().unwrap(), 1);
    r.call(1);
    assert_eq!(r.fired(), [0, 0, 1]);
}

#[test]
fn vhost_net_over_pci_kicks_calls_vectors_and_resets() {
    served_elsewhere_over_pci(vhost_net());
}

#[test]
fn virtio_fs_over_pci_kicks_calls_vectors_and_resets() {
    served_elsewhere_over_pci(virtio_fs());
}

/// A backend that refuses the rings: the function says NEEDS_RESET (with
/// a configuration interrupt on the driver's vector), and a reset and a
/// new bring-up work.
#[test]
fn a_vhost_net_activation_failure_over_pci_asks_for_a_reset() {
    let mut r = vhost_net_with(true);
    r.enable_msix();
    // bring_up() asserts success: drive the steps by hand up to DRIVER_OK.
    let t = &mut r.t;
    wr(t, 0x14, 1, u64::from(ACKNOWLEDGE));
    wr(t, 0x14, 1, u64::from(ACKNOWLEDGE | DRIVER));
    wr(t, 0x08, 4, 1);
    wr(t, 0x0c, 4, 1);
    wr(t, 0x14, 1, u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK));
    wr(t, 0x10, 2, 0);
    for q in 0..2u16 {
        let rings = Rings::new(&r.mem, 0x1000 + 0x2000 * u64::from(q), QSIZE);
        wr(t, 0x16, 2, u64::from(q));
        wr(t, 0x18, 2, u64::from(QSIZE));
        wr(t, 0x20, 8, rings.desc);
        wr(t, 0x28, 8, rings.avail);
        wr(t, 0x30, 8, rings.used);
        wr(t, 0x1c, 2, 1);
    }
    wr(
        t,
        0x14,
        1,
        u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
    );
    assert_ne!(rd(t, 0x14, 1) as u32 & DEVICE_NEEDS_RESET, 0);
    assert_eq!(r.fired(), [1, 0, 0], "configuration interrupt");
    assert_eq!(r.seen.lock().unwrap().stops, vec![0, 1], "undone");
    wr(&mut r.t, 0x14, 1, 0);
    r.bring_up();
    assert_eq!(r.seen.lock().unwrap().starts, 3);
}
