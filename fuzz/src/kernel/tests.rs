//! The seeds must reach the code under test: the ELF ones load both ways
//! (and really map), the probe reads what they hold, `capsule doctor`
//! finds the configuration in every bzImage payload.

use super::*;
use capsule::doctor::kernel::{inspect, Source};
use capsule::kernel_probe::Support;

fn seed(name: &str) -> Vec<u8> {
    let path = format!("{}/corpus/kernel_image/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn elf_seeds_load_copied_and_mapped() {
    for (name, maps) in [
        ("elf-symtab", true),
        ("elf-ikconfig", true),
        ("elf-two-segments", true),
        ("elf-pvh-note", true),
        ("elf-unmappable", false),
    ] {
        let out = run(&seed(name));
        let copied = out.copied.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!copied.bzimage, "{name}");
        let mapped = out
            .mapped
            .unwrap()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(mapped.mapped, maps, "{name}");
        assert_eq!(mapped.entry, copied.entry, "{name}");
    }
}

#[test]
fn the_probe_reads_symbols_and_the_embedded_configuration() {
    for (name, acpi, pci) in [
        ("elf-symtab", true, true),
        ("elf-ikconfig", true, true),
        ("elf-ikconfig-no-acpi", false, false),
        ("elf-two-segments", true, false),
    ] {
        let probe = run(&seed(name)).probe;
        assert_eq!(probe.acpi.is_present(), acpi, "{name}: {probe:?}");
        assert_eq!(probe.virtio_pci.is_present(), pci, "{name}: {probe:?}");
    }
    assert_eq!(run(&seed("elf-pvh-note")).probe.acpi, Support::Unknown);
}

#[test]
fn bzimage_seeds_load_and_doctor_finds_their_configuration() {
    for name in [
        "bzimage-gzip",
        "bzimage-xz",
        "bzimage-zstd",
        "bzimage-lz4",
        "bzimage-lz4-empty-blocks",
        "bzimage-none",
    ] {
        let out = run(&seed(name));
        let k = out.copied.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(k.bzimage, "{name}");
        assert_eq!(k.entry, 0x10_0200, "{name}: code32_start + 0x200");
        let info = inspect(&crate::thread_dir().join("vmlinux")).unwrap();
        let (source, text) = info
            .config
            .unwrap_or_else(|| panic!("{name}: {:?}", info.tried));
        assert_eq!(source, Source::Embedded, "{name}");
        assert!(text.contains("CONFIG_VIRTIO_PCI=y"), "{name}");
        assert_eq!(info.release.as_deref(), Some("6.1.0-fuzz"), "{name}");
    }
    assert!(run(&seed("not-a-kernel")).copied.is_err());
}

#[test]
#[should_panic(expected = "above guest RAM")]
fn a_write_past_guest_ram_is_caught() {
    let ram = GuardedRam::new();
    // SAFETY: the first byte of the canary above guest RAM, inside the
    // mapping.
    unsafe { *ram.base.add(CANARY + MEM_SIZE) ^= 1 };
    ram.check();
}
