//! KVM's GSI routing table for MSI-X vectors (`--transport pci`).
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so [`KvmMsiRoutes`]
//! keeps it: the default routes of the in-kernel irqchip (GSIs 0-15 to
//! the PIC and the IOAPIC, 16-23 to the IOAPIC, as KVM sets them up) plus
//! one MSI route per vector the guest has programmed. Each change sends
//! the whole table again; that happens when the guest programs or
//! re-targets a vector, not per interrupt.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd};
use std::sync::Mutex;

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{Kvm, VmFd};

use devices::pci::msix::{MsiMessage, MsiRouter};

/// The VM's routing table and the handle to set it.
pub struct KvmMsiRoutes {
    vm: VmFd,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
}

impl std::fmt::Debug for KvmMsiRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmMsiRoutes").finish_non_exhaustive()
    }
}

impl KvmMsiRoutes {
    /// Routes for the VM `vm` of `kvm` (a second descriptor of it is kept).
    pub fn new(kvm: &Kvm, vm: &VmFd) -> io::Result<Self> {
        // SAFETY: the VM's descriptor is open for as long as `vm` lives,
        // which outlasts this borrow.
        let borrowed = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) };
        let owned = borrowed.try_clone_to_owned()?;
        // SAFETY: `owned` is a fresh descriptor of the VM (a dup), whose
        // ownership passes to the new `VmFd`; nothing else closes it.
        let vm =
            unsafe { kvm.create_vmfd_from_rawfd(owned.into_raw_fd()) }.map_err(io::Error::from)?;
        Ok(Self {
            vm,
            msi: Mutex::new(BTreeMap::new()),
        })
    }
}

/// An irqchip route: `gsi` to `pin` of `chip`.
fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// The whole table: KVM's default irqchip routes and `msi`.
pub fn routing_table(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let mut table = Vec::new();
    for gsi in 0..arch::layout::IOAPIC_NUM_PINS {
        table.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            table.push(irqchip(gsi, chip, gsi % 8));
        }
    }
    for (&gsi, m) in msi {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = low32(m.address);
        e.u.msi.address_hi = low32(m.address >> 32);
        e.u.msi.data = m.data;
        table.push(e);
    }
    table
}

#[expect(clippy::cast_possible_truncation, reason = "truncation is the point")]
const fn low32(v: u64) -> u32 {
    v as u32
}

impl MsiRouter for KvmMsiRoutes {
    fn route(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()> {
        let mut msi = self.msi.lock().unwrap_or_else(|e| e.into_inner());
        match message {
            Some(m) => msi.insert(gsi, m),
            None => msi.remove(&gsi),
        };
        let table = KvmIrqRouting::from_entries(&routing_table(&msi))
            .map_err(|e| io::Error::other(format!("routing table: {e:?}")))?;
        self.vm.set_gsi_routing(&table).map_err(io::Error::from)?;
        log::debug!("MSI: GSI {gsi} routed to {message:x?}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KVM takes the table: irqchip routes and MSI routes, set and removed.
    #[test]
    fn kvm_accepts_the_routes() {
        use crate::vstate::memory::GuestRam;
        use vm_memory::GuestAddress;

        let ram = GuestRam::new(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let kvm = crate::vstate::vm::Vm::open_kvm(std::path::Path::new("/dev/kvm")).unwrap();
        let vm = crate::vstate::vm::Vm::new(kvm, ram.memory()).unwrap();
        let routes = KvmMsiRoutes::new(vm.kvm(), vm.fd()).unwrap();
        let m = MsiMessage {
            address: 0xfee0_0000,
            data: 0x31,
        };
        routes.route(24, Some(m)).unwrap();
        routes.route(4095, Some(m)).unwrap();
        routes.route(24, None).unwrap();
        assert_eq!(routes.msi.lock().unwrap().len(), 1);
    }

    #[test]
    fn the_table_keeps_the_irqchip_routes_and_adds_each_vector() {
        let mut msi = BTreeMap::new();
        assert_eq!(routing_table(&msi).len(), 24 + 16);
        msi.insert(
            24,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4041,
            },
        );
        let t = routing_table(&msi);
        assert_eq!(t.len(), 24 + 16 + 1);
        let last = t.last().unwrap();
        assert_eq!((last.gsi, last.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: the entry was written as an MSI route.
        let m = unsafe { last.u.msi };
        assert_eq!(
            (m.address_lo, m.address_hi, m.data),
            (0xfee0_1000, 1, 0x4041)
        );
        // GSI 9 goes to the slave PIC's pin 1 and the IOAPIC's pin 9.
        let nine: Vec<_> = t.iter().filter(|e| e.gsi == 9).collect();
        assert_eq!(nine.len(), 2);
        // SAFETY: irqchip routes were written as such.
        let pins: Vec<_> = nine
            .iter()
            .map(|e| unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) })
            .collect();
        assert!(pins.contains(&(KVM_IRQCHIP_IOAPIC, 9)));
        assert!(pins.contains(&(KVM_IRQCHIP_PIC_SLAVE, 1)));
    }
}
