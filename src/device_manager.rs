//! Owns the device buses and hands out the platform's resources.
//!
//! Devices are placed on the port-I/O or MMIO [`Bus`]; interrupt lines
//! (GSIs) and MMIO windows come from simple allocators here, so device
//! models never hard-code where they live. The legacy platform devices
//! (COM1, i8042, ACPI power management, pvpanic) sit at the fixed
//! addresses that `arch::layout` and the firmware tables announce.

use arch::GuestMemoryMmap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arch::layout;
use devices::acpi_pm::{self, AcpiPm};
use devices::boot_marker::BootMarker;
use devices::bus::{self, Bus};
use devices::exit::ExitSignal;
use devices::legacy::serial::{ReadableFd, SerialOut};
use devices::legacy::{EventFdTrigger, SerialDevice, SerialInput, I8042};
use devices::pvpanic::PvPanic;

use arch::acpi::MmioDevice;
use devices::pci::ecam::{self, PciEcam};
use devices::pci::PciRoot;
use devices::virtio::mmio::{MmioTransport, TransportError, MMIO_SIZE, NOTIFY_OFFSET};
use devices::virtio::pci::{layout as pci_layout, PciTransportError, VirtioPci};
use devices::virtio::VirtioDevice;

use crate::vstate::vm::{self, Vm};

/// Errors while attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bus range conflict (a bug in the layout).
    #[error("cannot place {0} on the bus: {1}")]
    Bus(&'static str, #[source] bus::Error),
    /// An eventfd could not be created.
    #[error("cannot create the {0} eventfd: {1}")]
    EventFd(&'static str, #[source] std::io::Error),
    /// Wiring an interrupt failed.
    #[error("cannot wire the {0} interrupt: {1}")]
    Irq(&'static str, #[source] vm::Error),
    /// All device interrupt lines are taken.
    #[error("no interrupt line left for another device")]
    IrqsExhausted,
    /// The MMIO device window is full.
    #[error("no MMIO space left for another device")]
    MmioExhausted,
    /// A virtio transport could not be created.
    #[error("cannot create the virtio-mmio transport: {0}")]
    Transport(#[source] TransportError),
    /// Wiring a queue notification failed.
    #[error("cannot wire virtio queue notifications: {0}")]
    IoEvent(#[source] vm::Error),
    /// A virtio-pci function could not be created.
    #[error("cannot create the virtio-pci function: {0}")]
    PciTransport(#[source] PciTransportError),
    /// PCI bus 0 is full, or the PCI memory window or MSI GSIs ran out.
    #[error("no room for another PCI device: {0}")]
    PciExhausted(&'static str),
    /// The MSI routing table cannot be set up.
    #[error("cannot set up MSI routing: {0}")]
    MsiRoutes(#[source] std::io::Error),
}

/// The VM's device buses and resource allocators.
pub struct DeviceManager {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// The keyboard controller, once attached (for Ctrl-Alt-Del).
    pub i8042: Option<Arc<Mutex<I8042>>>,
    /// COM1, once attached (for snapshots).
    pub serial: Option<Arc<Mutex<SerialDevice>>>,
    /// Every virtio-mmio transport, in attach order (for snapshots).
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Every virtio-pci function, in attach order (for snapshots).
    pub pci_functions: Vec<Arc<Mutex<VirtioPci>>>,
    next_irq: u32,
    next_mmio: u64,
    virtio_mmio: Vec<MmioDevice>,
    pci: Option<PciBus>,
}

/// PCI bus 0 (`--transport pci`): the configuration ports and ECAM
/// window, the BAR window and the MSI routes.
struct PciBus {
    root: Arc<Mutex<PciRoot>>,
    routes: Arc<crate::vstate::msi::KvmMsiRoutes>,
    next_bar: u64,
    next_gsi: u32,
}

impl Default for DeviceManager {
    fn default() -> Self {
        Self::new()
    }
}

impl DeviceManager {
    /// An empty device manager.
    pub fn new() -> Self {
        Self {
            pio: Bus::new(),
            mmio: Bus::new(),
            i8042: None,
            serial: None,
            transports: Vec::new(),
            pci_functions: Vec::new(),
            next_irq: layout::FIRST_DEVICE_IRQ,
            next_mmio: layout::MMIO_DEVICES_START,
            virtio_mmio: Vec::new(),
            pci: None,
        }
    }

    /// Whether PCI bus 0 is there (a device was attached over PCI).
    pub fn has_pci(&self) -> bool {
        self.pci.is_some()
    }

    /// PCI bus 0's configuration mechanism, if the bus is there.
    pub fn pci_root(&self) -> Option<Arc<Mutex<PciRoot>>> {
        self.pci.as_ref().map(|b| b.root.clone())
    }

    /// PCI bus 0, put on the port-I/O bus (configuration mechanism #1)
    /// and the MMIO bus (its ECAM window) on first use.
    fn pci_bus(&mut self, vm: &Vm) -> Result<&mut PciBus, Error> {
        if self.pci.is_none() {
            let root = Arc::new(Mutex::new(PciRoot::new()));
            self.pio
                .insert(
                    root.clone(),
                    u64::from(devices::pci::CONFIG_ADDRESS_PORT),
                    devices::pci::CONFIG_PORTS,
                )
                .map_err(|e| Error::Bus("PCI configuration ports", e))?;
            // The window the MCFG table announces: one bus of ECAM.
            const _: () = assert!(
                layout::PCI_ECAM_SIZE == ecam::BUS_SIZE * (layout::PCI_ECAM_LAST_BUS as u64 + 1)
            );
            self.mmio
                .insert(
                    Arc::new(Mutex::new(PciEcam::new(root.clone()))),
                    layout::PCI_ECAM_START,
                    layout::PCI_ECAM_SIZE,
                )
                .map_err(|e| Error::Bus("PCI ECAM window", e))?;
            let routes = crate::vstate::msi::KvmMsiRoutes::new(vm.kvm(), vm.fd())
                .map_err(Error::MsiRoutes)?;
            self.pci = Some(PciBus {
                root,
                routes: Arc::new(routes),
                next_bar: layout::PCI_MMIO_START,
                next_gsi: layout::FIRST_MSI_GSI,
            });
        }
        Ok(self.pci.as_mut().expect("just created"))
    }

    /// Puts `device` behind a virtio-pci function on bus 0: a BAR in the
    /// PCI memory window, one MSI-X vector per queue plus one for
    /// configuration changes, each an irqfd on its own GSI, and each
    /// queue's notification address an ioeventfd.
    pub fn attach_virtio_pci(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<(), Error> {
        let bus = self.pci_bus(vm)?;
        let bar = bus.next_bar;
        if bar + pci_layout::BAR_SIZE > layout::PCI_MMIO_START + layout::PCI_MMIO_SIZE {
            return Err(Error::PciExhausted("the PCI memory window is full"));
        }
        let queues = device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue_max_sizes()
            .len();
        let vectors = u32::try_from(queues + 1).unwrap_or(u32::MAX);
        if bus.next_gsi.saturating_add(vectors) > layout::LAST_MSI_GSI + 1 {
            return Err(Error::PciExhausted("no GSI left for MSI-X vectors"));
        }
        let routes: Arc<dyn devices::pci::msix::MsiRouter> = bus.routes.clone();
        let function = VirtioPci::new(mem.clone(), device, bar, bus.next_gsi, routes)
            .map_err(Error::PciTransport)?;
        {
            let msix = function.interrupt().msix();
            for (i, evt) in msix.irqs().iter().enumerate() {
                let gsi = msix.gsi(i).ok_or(Error::PciExhausted("MSI GSI"))?;
                vm.register_irqfd(evt, gsi)
                    .map_err(|e| Error::Irq("virtio-pci MSI-X", e))?;
            }
        }
        for (i, evt) in function.queue_evts().iter().enumerate() {
            vm.register_mmio_ioevent_any(evt, function.notify_address(i))
                .map_err(Error::IoEvent)?;
        }
        let function = Arc::new(Mutex::new(function));
        let slot = bus
            .root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(function.clone())
            .map_err(|_| Error::PciExhausted("PCI bus 0 is full"))?;
        bus.next_bar += pci_layout::BAR_SIZE;
        bus.next_gsi += vectors;
        self.pci_functions.push(function.clone());
        self.mmio
            .insert(function, bar, pci_layout::BAR_SIZE)
            .map_err(|e| Error::Bus("virtio-pci BAR", e))?;
        log::debug!("virtio-pci: 00:{slot:02x}.0, BAR 0 at {bar:#x}, {vectors} MSI-X vectors");
        Ok(())
    }

    /// The virtio-mmio devices attached so far, for the firmware tables and
    /// the kernel command line.
    pub fn virtio_mmio_devices(&self) -> &[MmioDevice] {
        &self.virtio_mmio
    }

    /// Puts `device` behind a virtio-mmio transport: an MMIO window and an
    /// interrupt line are allocated, the interrupt is wired through an
    /// irqfd and each queue's notification through an ioeventfd, so neither
    /// needs a trip through userspace vCPU code.
    pub fn attach_virtio_mmio(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<MmioDevice, Error> {
        let transport = MmioTransport::new(mem.clone(), device).map_err(Error::Transport)?;
        let base = self.allocate_mmio(MMIO_SIZE)?;
        let gsi = self.allocate_irq()?;
        vm.register_irqfd(transport.interrupt_evt(), gsi)
            .map_err(|e| Error::Irq("virtio-mmio", e))?;
        for (i, evt) in (0u32..).zip(transport.queue_evts().iter()) {
            vm.register_mmio_ioevent(evt, base + NOTIFY_OFFSET, i)
                .map_err(Error::IoEvent)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.transports.push(transport.clone());
        self.mmio
            .insert(transport, base, MMIO_SIZE)
            .map_err(|e| Error::Bus("virtio-mmio", e))?;
        let desc = MmioDevice {
            base,
            len: MMIO_SIZE,
            gsi,
        };
        self.virtio_mmio.push(desc);
        Ok(desc)
    }

    /// Takes the next free device interrupt line.
    pub fn allocate_irq(&mut self) -> Result<u32, Error> {
        if self.next_irq > layout::LAST_DEVICE_IRQ {
            return Err(Error::IrqsExhausted);
        }
        self.next_irq += 1;
        Ok(self.next_irq - 1)
    }

    /// Takes a page-aligned MMIO window of `size` bytes.
    pub fn allocate_mmio(&mut self, size: u64) -> Result<u64, Error> {
        let size = size.next_multiple_of(4096);
        let end = layout::MMIO_DEVICES_START + layout::MMIO_DEVICES_SIZE;
        if size == 0 || self.next_mmio + size > end {
            return Err(Error::MmioExhausted);
        }
        self.next_mmio += size;
        Ok(self.next_mmio - size)
    }

    /// Attaches COM1, the i8042, the ACPI power management registers,
    /// pvpanic and the boot-time marker (timed from `start`). COM1 writes to
    /// `out` and reads from `input`; the returned [`SerialInput`] must be
    /// added to the event loop.
    pub fn attach_legacy_devices(
        &mut self,
        vm: &Vm,
        exit: &ExitSignal,
        out: SerialOut,
        input: Option<Box<dyn ReadableFd>>,
        start: Instant,
    ) -> Result<SerialInput, Error> {
        let irq = EventFdTrigger::new().map_err(|e| Error::EventFd("COM1", e))?;
        vm.register_irqfd(irq.event_fd(), layout::COM1_IRQ)
            .map_err(|e| Error::Irq("COM1", e))?;
        let (serial, buffer_ready) =
            SerialDevice::new(irq, out).map_err(|e| Error::EventFd("COM1", e))?;
        let serial = Arc::new(Mutex::new(serial));
        self.serial = Some(serial.clone());
        self.pio
            .insert(serial.clone(), u64::from(layout::COM1_PORT), 8)
            .map_err(|e| Error::Bus("COM1", e))?;

        let kbd_irq = EventFdTrigger::new().map_err(|e| Error::EventFd("i8042", e))?;
        vm.register_irqfd(kbd_irq.event_fd(), layout::I8042_KBD_IRQ)
            .map_err(|e| Error::Irq("i8042", e))?;
        let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone(), kbd_irq)));
        self.i8042 = Some(i8042.clone());
        self.pio
            .insert(i8042, u64::from(layout::I8042_DATA_PORT), 5)
            .map_err(|e| Error::Bus("i8042", e))?;

        let pm = AcpiPm::new(
            exit.clone(),
            layout::ACPI_S5_SLEEP_TYPE,
            layout::ACPI_RESET_VALUE,
        );
        debug_assert_eq!(
            u64::from(layout::ACPI_SLEEP_STATUS_PORT - layout::ACPI_SLEEP_CONTROL_PORT),
            acpi_pm::SLEEP_STATUS_OFFSET
        );
        debug_assert_eq!(
            u64::from(layout::ACPI_RESET_PORT - layout::ACPI_SLEEP_CONTROL_PORT),
            acpi_pm::RESET_OFFSET
        );
        self.pio
            .insert(
                Arc::new(Mutex::new(pm)),
                u64::from(layout::ACPI_SLEEP_CONTROL_PORT),
                acpi_pm::PORT_COUNT,
            )
            .map_err(|e| Error::Bus("ACPI PM", e))?;

        self.pio
            .insert(
                Arc::new(Mutex::new(PvPanic::new(exit.clone()))),
                u64::from(layout::PVPANIC_PORT),
                1,
            )
            .map_err(|e| Error::Bus("pvpanic", e))?;

        self.pio
            .insert(
                Arc::new(Mutex::new(BootMarker::new(start))),
                u64::from(layout::BOOT_MARKER_PORT),
                1,
            )
            .map_err(|e| Error::Bus("boot marker", e))?;

        Ok(SerialInput::new(serial, input, buffer_ready))
    }

    /// Firecracker's boot timer (`--boot-timer`): a boot marker on the
    /// MMIO bus at [`layout::FC_BOOT_TIMER_START`]; the guest writes 123
    /// there and the time since capsule started is logged. Only for a
    /// guest whose RAM ends below it (`mem_size`).
    pub fn attach_fc_boot_timer(&mut self, mem_size: u64, start: Instant) -> Result<bool, Error> {
        if mem_size > layout::FC_BOOT_TIMER_START {
            log::warn!(
                "--boot-timer: the guest has RAM at {:#x} (more than 3 GiB): no boot timer",
                layout::FC_BOOT_TIMER_START
            );
            return Ok(false);
        }
        self.mmio
            .insert(
                Arc::new(Mutex::new(BootMarker::new(start))),
                layout::FC_BOOT_TIMER_START,
                layout::FC_BOOT_TIMER_SIZE,
            )
            .map_err(|e| Error::Bus("boot timer", e))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_firecracker_boot_timer_answers_only_below_the_guest_ram() {
        let mut dm = DeviceManager::new();
        assert!(!dm.mmio.write(layout::FC_BOOT_TIMER_START, &[123]));
        assert!(!dm.attach_fc_boot_timer(4 << 30, Instant::now()).unwrap());
        assert!(!dm.mmio.write(layout::FC_BOOT_TIMER_START, &[123]));
        assert!(dm.attach_fc_boot_timer(256 << 20, Instant::now()).unwrap());
        assert!(dm.mmio.write(layout::FC_BOOT_TIMER_START, &[123]));
    }

    fn pio_config_read(dm: &DeviceManager, slot: u32, reg: u32) -> u32 {
        let port = u64::from(devices::pci::CONFIG_ADDRESS_PORT);
        assert!(dm
            .pio
            .write(port, &(0x8000_0000 | slot << 11 | reg).to_le_bytes()));
        let mut d = [0u8; 4];
        assert!(dm.pio.read(port + 4, &mut d));
        u32::from_le_bytes(d)
    }

    /// A virtio-rng over PCI on a real KVM VM: bus 0 answers on the
    /// configuration ports, the BAR is where the window starts, and
    /// programming and unmasking an MSI-X vector sets KVM's routing table
    /// (the default irqchip routes plus the vector) without an error.
    #[test]
    fn a_virtio_pci_function_is_wired_to_kvm() {
        use crate::vstate::memory::GuestRam;
        use vm_memory::GuestAddress;

        let ram = GuestRam::new(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let kvm = Vm::open_kvm(std::path::Path::new("/dev/kvm")).expect("/dev/kvm");
        let vm = Vm::new(kvm, ram.memory()).unwrap();
        let mut dm = DeviceManager::new();
        assert!(!dm.has_pci());
        let rng = Arc::new(Mutex::new(devices::virtio::rng::Rng::new().unwrap()));
        dm.attach_virtio_pci(&vm, ram.memory(), rng).unwrap();
        assert!(dm.has_pci());
        assert_eq!(pio_config_read(&dm, 0, 0), 0x0d57_8086, "host bridge");
        assert_eq!(pio_config_read(&dm, 1, 0), 0x1044_1af4, "virtio-rng");
        assert_eq!(
            pio_config_read(&dm, 1, 0x10),
            layout::addr32(layout::PCI_MMIO_START)
        );
        assert_eq!(pio_config_read(&dm, 2, 0), u32::MAX, "empty slot");
        // The same bus through its ECAM window on the MMIO bus.
        let ecam_read = |dev: u64, reg: u64| {
            let mut d = [0u8; 4];
            assert!(dm
                .mmio
                .read(layout::PCI_ECAM_START + (dev << 15) + reg, &mut d));
            u32::from_le_bytes(d)
        };
        assert_eq!(ecam_read(0, 0), 0x0d57_8086, "host bridge via ECAM");
        assert_eq!(ecam_read(1, 0), 0x1044_1af4, "virtio-rng via ECAM");
        assert_eq!(ecam_read(1, 0x10), layout::addr32(layout::PCI_MMIO_START));
        assert_eq!(ecam_read(1, 0x100), 0, "empty extended space");
        assert_eq!(ecam_read(2, 0), u32::MAX, "empty slot via ECAM");

        // MSI-X on, vector 0 programmed and unmasked through the BAR.
        let bar = layout::PCI_MMIO_START;
        let port = u64::from(devices::pci::CONFIG_ADDRESS_PORT);
        let mut cap = pio_config_read(&dm, 1, 0x34) & 0xff;
        while pio_config_read(&dm, 1, cap) & 0xff != 0x11 {
            cap = pio_config_read(&dm, 1, cap) >> 8 & 0xff;
            assert_ne!(cap, 0, "no MSI-X capability");
        }
        dm.pio.write(port, &(0x8000_0800 | cap).to_le_bytes());
        assert!(dm.pio.write(port + 6, &0x8000u16.to_le_bytes()));
        let table = bar + pci_layout::MSIX_TABLE;
        assert!(dm.mmio.write(table, &0xfee0_0000u32.to_le_bytes()));
        assert!(dm.mmio.write(table + 8, &0x0031u32.to_le_bytes()));
        assert!(dm.mmio.write(table + 12, &0u32.to_le_bytes()));
        let mut pba = [0u8; 8];
        assert!(dm.mmio.read(bar + pci_layout::MSIX_PBA, &mut pba));
        assert_eq!(pba, [0; 8]);
    }

    #[test]
    fn irq_allocation_stops_at_the_last_line() {
        let mut dm = DeviceManager::new();
        let n = layout::LAST_DEVICE_IRQ - layout::FIRST_DEVICE_IRQ + 1;
        for i in 0..n {
            assert_eq!(dm.allocate_irq().unwrap(), layout::FIRST_DEVICE_IRQ + i);
        }
        assert!(matches!(dm.allocate_irq(), Err(Error::IrqsExhausted)));
    }

    #[test]
    fn mmio_allocation_is_page_aligned_and_bounded() {
        let mut dm = DeviceManager::new();
        let a = dm.allocate_mmio(0x200).unwrap();
        let b = dm.allocate_mmio(0x1000).unwrap();
        assert_eq!(a, layout::MMIO_DEVICES_START);
        assert_eq!(b, a + 0x1000);
        assert!(matches!(dm.allocate_mmio(0), Err(Error::MmioExhausted)));
        assert!(matches!(
            dm.allocate_mmio(layout::MMIO_DEVICES_SIZE),
            Err(Error::MmioExhausted)
        ));
    }
}
