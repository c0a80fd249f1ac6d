//! The VM-wide state KVM holds, for snapshots: the in-kernel interrupt
//! controllers (both PICs and the IOAPIC), the PIT and the KVM clock.
//! Saved with every vCPU parked; restored into a new VM (irqchip and PIT
//! created) before any vCPU runs.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// Errors while saving or restoring the VM's state.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct Error {
    what: &'static str,
    source: kvm_ioctls::Error,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error { what, source }
}

/// The irqchip, PIT and clock.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// The KVM clock (kvmclock's reference).
    pub clock: kvm_clock_data,
}

fn chip(fd: &VmFd, id: u32) -> Result<kvm_irqchip, Error> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    fd.get_irqchip(&mut c)
        .map_err(kvm("cannot read the irqchip"))?;
    Ok(c)
}

/// Saves the VM's state (vCPUs parked).
pub fn save(fd: &VmFd) -> Result<VmState, Error> {
    Ok(VmState {
        pic_master: chip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(fd, KVM_IRQCHIP_IOAPIC)?,
        pit: fd.get_pit2().map_err(kvm("cannot read the PIT"))?,
        clock: fd.get_clock().map_err(kvm("cannot read the KVM clock"))?,
    })
}

/// Restores `state` into a new VM. The clock goes on from the saved
/// value: the guest sees no time pass while it was saved, so nothing in
/// it (timers, watchdogs) jumps.
pub fn restore(fd: &VmFd, state: &VmState) -> Result<(), Error> {
    // The chip ids are the snapshot's: a corrupted one could name another
    // chip, so each is set as the chip it is saved as.
    let set = |mut c: kvm_irqchip, id: u32| {
        c.chip_id = id;
        fd.set_irqchip(&c)
            .map_err(kvm("cannot restore the irqchip"))
    };
    set(state.pic_master, KVM_IRQCHIP_PIC_MASTER)?;
    set(state.pic_slave, KVM_IRQCHIP_PIC_SLAVE)?;
    set(state.ioapic, KVM_IRQCHIP_IOAPIC)?;
    fd.set_pit2(&state.pit)
        .map_err(kvm("cannot restore the PIT"))?;
    // Only the clock value is set: the flags and host timestamps describe
    // the saving host's moment.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    fd.set_clock(&clock)
        .map_err(kvm("cannot restore the KVM clock"))?;
    Ok(())
}
