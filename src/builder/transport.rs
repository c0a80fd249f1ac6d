//! Which transport a VM's virtio devices get when its configuration names
//! none: virtio-pci where the guest kernel can drive it, virtio-mmio
//! elsewhere.
//!
//! virtio-pci is the faster of the two (one MSI-X vector per queue: no
//! interrupt-status exits, and the interrupt goes from the irqfd straight
//! into the guest; docs/performance.md), but a kernel without PCI, MSI or
//! the virtio-pci driver finds no device on it, and kernels built for
//! micro-VMs often have none of them. So capsule only picks it when the
//! kernel image says so ([`crate::kernel_probe`]), and keeps virtio-mmio,
//! which every virtio kernel drives, when the image does not tell (a
//! bzImage) or the command line turns PCI or ACPI off.

use crate::config::{Transport, VmConfig};
use crate::kernel_probe::{KernelSupport, Support};

/// The transport for the VM `config` describes, whose kernel image told
/// `support`: the one the configuration names, else as the module
/// documentation says. Logs the choice, and warns when the configuration
/// names virtio-pci for a kernel that cannot drive it.
pub(super) fn pick(config: &VmConfig, support: &KernelSupport) -> Transport {
    let devices = has_virtio_devices(config);
    if let Some(chosen) = config.transport {
        if let (Transport::Pci, Support::Absent(why), true) = (chosen, &support.virtio_pci, devices)
        {
            log::warn!(
                "--transport pci, but the kernel cannot drive virtio-pci ({why}): \
                 the guest will not find its devices; --transport mmio boots it"
            );
        }
        return chosen;
    }
    let (transport, why) = automatic(&config.cmdline, support);
    if devices {
        log::info!("virtio transport: {transport} ({why}; --transport names another)");
    } else {
        log::debug!("virtio transport: {transport} ({why}), for devices added later");
    }
    transport
}

/// Whether `config` names a virtio device (a VM without one has no PCI
/// bus either way; `capsule exec` adds its own, on virtio-mmio).
fn has_virtio_devices(config: &VmConfig) -> bool {
    !config.disks.is_empty()
        || !config.nets.is_empty()
        || !config.fs.is_empty()
        || config.vsock.is_some()
        || config.entropy.is_some()
        || config.balloon.is_some()
}

/// The transport picked for a kernel that told `support` and the user's
/// command line `cmdline`, and why.
fn automatic(cmdline: &str, support: &KernelSupport) -> (Transport, &'static str) {
    if cmdline.split_whitespace().any(|w| w == "pci=off") {
        return (Transport::Mmio, "the command line has pci=off");
    }
    // Without ACPI the guest has no description of PCI bus 0's windows:
    // capsule has never run its devices that way.
    if crate::kernel_load::acpi_off(cmdline) {
        return (Transport::Mmio, "the command line has acpi=off");
    }
    if let Support::Absent(_) = support.acpi {
        return (Transport::Mmio, "the kernel has no ACPI");
    }
    match support.virtio_pci {
        Support::Present(why) => (Transport::Pci, why),
        Support::Absent(why) => (Transport::Mmio, why),
        Support::Unknown => (
            Transport::Mmio,
            "the kernel image does not tell whether it drives virtio-pci",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PCI: KernelSupport = KernelSupport {
        acpi: Support::Present("acpi"),
        virtio_pci: Support::Present("pci"),
    };

    #[test]
    fn virtio_pci_only_for_a_kernel_known_to_drive_it() {
        assert_eq!(automatic("console=ttyS0", &PCI).0, Transport::Pci);
        assert_eq!(
            automatic("console=ttyS0", &KernelSupport::UNKNOWN).0,
            Transport::Mmio
        );
        let no_pci = KernelSupport {
            virtio_pci: Support::Absent("no pci"),
            ..PCI
        };
        assert_eq!(automatic("", &no_pci), (Transport::Mmio, "no pci"));
        let no_acpi = KernelSupport {
            acpi: Support::Absent("no acpi"),
            ..PCI
        };
        assert_eq!(automatic("", &no_acpi).0, Transport::Mmio);
    }

    #[test]
    fn the_command_line_turning_pci_or_acpi_off_keeps_virtio_mmio() {
        for line in [
            "console=ttyS0 pci=off",
            "acpi=off quiet",
            "pci=off acpi=off",
        ] {
            assert_eq!(automatic(line, &PCI).0, Transport::Mmio, "{line}");
        }
        // Other values of the options are the user's business.
        assert_eq!(automatic("pci=noaer acpi=strict", &PCI).0, Transport::Pci);
    }

    #[test]
    fn a_named_transport_wins() {
        let config = |t| VmConfig {
            cmdline: "pci=off".into(),
            transport: t,
            ..VmConfig::bare("/k")
        };
        assert_eq!(pick(&config(Some(Transport::Pci)), &PCI), Transport::Pci);
        assert_eq!(pick(&config(Some(Transport::Mmio)), &PCI), Transport::Mmio);
        assert_eq!(pick(&config(None), &PCI), Transport::Mmio);
        let mut c = config(None);
        c.cmdline = String::new();
        assert_eq!(pick(&c, &PCI), Transport::Pci);
    }
}
