//! The virtio-pci transport as a hostile guest reaches it: any sequence of
//! configuration-space accesses (through the ports 0xCF8/0xCFC and
//! through ECAM, any slot, register and width, the BAR and the
//! `VIRTIO_PCI_CAP_PCI_CFG` window among them), reads and writes at any
//! offset and width of the function's BAR (common configuration, ISR,
//! device configuration, notifications, MSI-X table and pending bits),
//! queue notifications, memory patches and event-loop runs, for each
//! device type, over fuzzer-filled guest memory
//! (`capsule_fuzz::virtio::pci::run`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    capsule_fuzz::virtio::pci::run(data);
});
