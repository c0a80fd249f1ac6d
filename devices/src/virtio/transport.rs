//! What the virtio-mmio and virtio-pci transports share: the driver's
//! device-status state machine (virtio 1.2 §3.1.1), the feature check at
//! FEATURES_OK, and handing the driver's queues to the device at
//! DRIVER_OK. Each transport keeps its own registers and calls these.

use std::io;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::features::{bit, VIRTIO_F_VERSION_1};
use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use super::{ActivateError, InterruptKind, VirtioDevice, VirtioInterrupt};
use crate::GuestMemoryMmap;

/// What a driver's write of the device status asks the transport to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusWrite {
    /// 0: reset the device.
    Reset,
    /// The driver gave up on the device: set FAILED.
    Failed,
    /// ACKNOWLEDGE, then DRIVER: store the new status as written.
    Store,
    /// FEATURES_OK: check and accept the driver's features.
    FeaturesOk,
    /// DRIVER_OK: activate the device.
    DriverOk,
    /// Out of order, after a failure, or clearing bits: ignored (why).
    Ignored(&'static str),
}

/// Classifies a status write of `new` over the current status `old`:
/// only the spec's order of steps is accepted, one bit at a time, and
/// nothing but a reset after FAILED or DEVICE_NEEDS_RESET.
pub(crate) fn status_write(old: u32, new: u32) -> StatusWrite {
    if new == 0 {
        return StatusWrite::Reset;
    }
    if new & FAILED != 0 {
        return StatusWrite::Failed;
    }
    if old & (FAILED | DEVICE_NEEDS_RESET) != 0 {
        return StatusWrite::Ignored("written before a reset");
    }
    if new == old {
        return StatusWrite::Ignored("unchanged");
    }
    if new & old != old {
        return StatusWrite::Ignored("clears bits");
    }
    match (old, new & !old) {
        (0, ACKNOWLEDGE) | (ACKNOWLEDGE, DRIVER) => StatusWrite::Store,
        (s, FEATURES_OK) if s == ACKNOWLEDGE | DRIVER => StatusWrite::FeaturesOk,
        (s, DRIVER_OK) if s == ACKNOWLEDGE | DRIVER | FEATURES_OK => StatusWrite::DriverOk,
        _ => StatusWrite::Ignored("not the next step"),
    }
}

/// Why the driver's `acked` features cannot be accepted from a device
/// offering `offered`, if they cannot: unoffered bits, or no
/// VIRTIO_F_VERSION_1 (both transports are modern-only).
pub(crate) fn refuse_features(acked: u64, offered: u64) -> Option<String> {
    let unknown = acked & !offered;
    if unknown != 0 {
        return Some(format!("driver acked unoffered features {unknown:#x}"));
    }
    if acked & bit(VIRTIO_F_VERSION_1) == 0 {
        return Some("driver did not accept VIRTIO_F_VERSION_1".into());
    }
    None
}

/// Activates `device` with the driver's queues: every ready queue must
/// lie in guest memory (else [`ActivateError::QueueOutsideMemory`], and
/// the device is not touched), then the device gets copies of the queues,
/// of their notification eventfds and the transport's interrupt.
pub(crate) fn activate(
    device: &mut dyn VirtioDevice,
    mem: &GuestMemoryMmap,
    queues: &[Queue],
    queue_evts: &[EventFd],
    interrupt: Arc<dyn VirtioInterrupt>,
) -> Result<(), ActivateError> {
    let mut active = Vec::with_capacity(queues.len());
    for (index, q) in queues.iter().enumerate() {
        if q.ready() && !q.is_valid(mem) {
            return Err(ActivateError::QueueOutsideMemory(index));
        }
        active.push(
            Queue::try_from(q.state())
                .map_err(|source| ActivateError::QueueState { index, source })?,
        );
    }
    let evts = queue_evts
        .iter()
        .map(EventFd::try_clone)
        .collect::<io::Result<Vec<_>>>()
        .map_err(ActivateError::EventFd)?;
    device.activate(mem.clone(), interrupt, active, evts)
}

/// The DRIVER_OK step: [`activate`], and the status bits the transport
/// then sets: DRIVER_OK, plus DEVICE_NEEDS_RESET if the activation failed
/// (logged, and a configuration interrupt raised so that the driver
/// reads the status). `transport` and `device_type` are for the log.
pub(crate) fn driver_ok(
    transport: &str,
    device_type: u32,
    device: &mut dyn VirtioDevice,
    mem: &GuestMemoryMmap,
    queues: &[Queue],
    queue_evts: &[EventFd],
    interrupt: Arc<dyn VirtioInterrupt>,
) -> u32 {
    match activate(device, mem, queues, queue_evts, interrupt.clone()) {
        Ok(()) => DRIVER_OK,
        Err(e) => {
            crate::error_ratelimited!(
                "{transport}: cannot activate device type {device_type}: {e}"
            );
            if let Err(e) = interrupt.trigger(InterruptKind::Config) {
                crate::error_ratelimited!("{transport}: cannot raise config interrupt: {e}");
            }
            DRIVER_OK | DEVICE_NEEDS_RESET
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_steps_in_order_only() {
        use StatusWrite::*;
        let ad = ACKNOWLEDGE | DRIVER;
        let adf = ad | FEATURES_OK;
        assert_eq!(status_write(0, ACKNOWLEDGE), Store);
        assert_eq!(status_write(ACKNOWLEDGE, ad), Store);
        assert_eq!(status_write(ad, adf), FeaturesOk);
        assert_eq!(status_write(adf, adf | DRIVER_OK), DriverOk);
        assert_eq!(status_write(adf | DRIVER_OK, 0), Reset);
        assert_eq!(status_write(ad, ad | FAILED), Failed);
        // Skipping a step, two steps at once, clearing a bit, repeating.
        assert!(matches!(status_write(0, DRIVER), Ignored(_)));
        assert!(matches!(status_write(0, ad), Ignored(_)));
        assert!(matches!(status_write(ad, ACKNOWLEDGE), Ignored(_)));
        assert!(matches!(status_write(ad, ad), Ignored(_)));
        assert!(matches!(status_write(ad, ad | DRIVER_OK), Ignored(_)));
        // After a failure only a reset counts.
        let broken = adf | DRIVER_OK | DEVICE_NEEDS_RESET;
        assert!(matches!(
            status_write(broken, broken | 0x80_0000),
            Ignored(_)
        ));
        assert_eq!(status_write(broken, 0), Reset);
    }

    #[test]
    fn features_need_version_1_and_nothing_unoffered() {
        let v1 = bit(VIRTIO_F_VERSION_1);
        assert_eq!(refuse_features(v1 | 1, v1 | 1), None);
        assert!(refuse_features(1, v1 | 1).unwrap().contains("VERSION_1"));
        assert!(refuse_features(v1 | 2, v1 | 1).unwrap().contains("0x2"));
    }
}
