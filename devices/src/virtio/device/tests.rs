//! Tests of the transport-independent virtio device state.

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::*;
use crate::virtio::features::VIRTIO_F_VERSION_1;
use crate::virtio::test_utils::{RecordingInterrupt, Rings};

const QSIZE: u16 = 16;

fn evts(n: usize) -> Vec<EventFd> {
    (0..n)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect()
}

#[test]
fn activation_is_checked_and_reset_forgets_it() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let rings = Rings::new(&mem, 0x1000, QSIZE);
    let offered = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX);
    let mut c = VirtioCommon::new("test", 99, offered, &[QSIZE]).unwrap();
    let irq = Arc::new(RecordingInterrupt::default());

    c.set_acked_features(offered | 1);
    assert_eq!(c.acked_features(), offered, "only offered features kept");
    let two = c.activate(mem.clone(), irq.clone(), vec![rings.queue()], evts(2));
    assert!(matches!(two, Err(ActivateError::QueueCount { .. })));
    let mut unready = rings.queue();
    unready.set_ready(false);
    let r = c.activate(mem.clone(), irq.clone(), vec![unready], evts(1));
    assert!(matches!(r, Err(ActivateError::QueueNotReady(0))));
    assert!(!c.is_activated());

    c.activate(mem.clone(), irq.clone(), vec![rings.queue()], evts(1))
        .unwrap();
    assert!(c.activation().unwrap().queues[0].event_idx_enabled());
    let again = c.activate(mem.clone(), irq.clone(), vec![rings.queue()], evts(1));
    assert!(matches!(again, Err(ActivateError::AlreadyActive)));

    c.reset();
    assert!(!c.is_activated());
    assert_eq!(c.acked_features(), 0);
}

#[test]
fn config_changes_bump_the_generation_and_interrupt_when_asked() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let rings = Rings::new(&mem, 0x1000, QSIZE);
    let mut c = VirtioCommon::new("test", 99, 0, &[QSIZE]).unwrap();
    let irq = Arc::new(RecordingInterrupt::default());
    c.config_changed(true); // inactive: nobody to tell
    assert_eq!(c.config_generation(), 1);
    c.activate(mem.clone(), irq.clone(), vec![rings.queue()], evts(1))
        .unwrap();
    c.config_changed(false);
    assert!(irq.take().is_empty());
    c.config_changed(true);
    assert_eq!(irq.take(), vec![InterruptKind::Config]);
    assert_eq!(c.config_generation(), 3);
}

#[test]
fn config_reads_past_the_end_are_zero() {
    let mut b = [0xffu8; 4];
    read_config_bytes(&[1, 2, 3], 1, &mut b);
    assert_eq!(b, [2, 3, 0, 0]);
    read_config_bytes(&[1, 2, 3], u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);
}
