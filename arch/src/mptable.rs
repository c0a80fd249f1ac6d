//! Intel MultiProcessor Specification 1.4 table, which tells the guest
//! about its vCPUs, the IOAPIC and how ISA interrupts are wired.

use std::mem::size_of;

use crate::GuestMemoryMmap;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress};

use crate::layout::{
    addr32, APIC_START_32, IOAPIC_NUM_PINS, IOAPIC_START_32, MAX_VCPUS, MPTABLE_START,
};

pub use crate::layout::MPTABLE_END;

const MPC_SPEC_REVISION: u8 = 4;
/// [`IOAPIC_NUM_PINS`] as the byte-wide pin numbers of interrupt entries.
const IOAPIC_PINS: u8 = {
    assert!(IOAPIC_NUM_PINS <= u8::MAX as u32);
    #[expect(clippy::cast_possible_truncation, reason = "checked by the assert")]
    let pins = IOAPIC_NUM_PINS as u8;
    pins
};
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Version of the emulated local APIC.
const APIC_VERSION: u8 = 0x14;
/// Version of the emulated IOAPIC.
const IOAPIC_VERSION: u8 = 0x11;
const MPC_APIC_USABLE: u8 = 1;
/// CPU signature (family 6) reported in processor entries.
const CPU_SIGNATURE: u32 = 0x600;
/// CPU feature flags reported in processor entries: FPU and APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const MP_IRQ_TYPE_INT: u8 = 0;
const MP_IRQ_TYPE_NMI: u8 = 1;
const MP_IRQ_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger mode conform to the bus.
const MP_IRQ_FLAGS_DEFAULT: u16 = 0;
/// Number of legacy ISA interrupt lines.
const ISA_IRQS: u8 = 16;
/// Destination "all local APICs".
const ALL_LAPICS: u8 = 0xff;

/// MP floating pointer structure.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpfIntel {
    signature: [u8; 4],
    physptr: u32,
    length: u8,
    specification: u8,
    checksum: u8,
    feature1: u8,
    feature2: u8,
    feature3: u8,
    feature4: u8,
    feature5: u8,
}
// SAFETY: packed struct of integers only: no padding, every bit pattern valid.
unsafe impl ByteValued for MpfIntel {}

/// MP configuration table header.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcTable {
    signature: [u8; 4],
    length: u16,
    spec: u8,
    checksum: u8,
    oem: [u8; 8],
    productid: [u8; 12],
    oemptr: u32,
    oemsize: u16,
    oemcount: u16,
    lapic: u32,
    ext_length: u16,
    ext_checksum: u8,
    reserved: u8,
}
// SAFETY: packed struct of integers only: no padding, every bit pattern valid.
unsafe impl ByteValued for MpcTable {}

/// Processor entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcCpu {
    entry_type: u8,
    apicid: u8,
    apicver: u8,
    cpuflag: u8,
    cpufeature: u32,
    featureflag: u32,
    reserved: [u32; 2],
}
// SAFETY: packed struct of integers only: no padding, every bit pattern valid.
unsafe impl ByteValued for MpcCpu {}

/// Bus entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcBus {
    entry_type: u8,
    busid: u8,
    bustype: [u8; 6],
}
// SAFETY: packed struct of integers only: no padding, every bit pattern valid.
unsafe impl ByteValued for MpcBus {}

/// I/O APIC entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIoapic {
    entry_type: u8,
    apicid: u8,
    apicver: u8,
    flags: u8,
    apicaddr: u32,
}
// SAFETY: packed struct of integers only: no padding, every bit pattern valid.
unsafe impl ByteValued for MpcIoapic {}

/// I/O interrupt assignment entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIntsrc {
    entry_type: u8,
    irqtype: u8,
    irqflag: u16,
    srcbus: u8,
    srcbusirq: u8,
    dstapic: u8,
    dstirq: u8,
}
// SAFETY: packed struct of integers only: no padding, every bit pattern valid.
unsafe impl ByteValued for MpcIntsrc {}

/// Local interrupt assignment entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcLintsrc {
    entry_type: u8,
    irqtype: u8,
    irqflag: u16,
    srcbusid: u8,
    srcbusirq: u8,
    destapic: u8,
    destapiclint: u8,
}
// SAFETY: packed struct of integers only: no padding, every bit pattern valid.
unsafe impl ByteValued for MpcLintsrc {}

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The VM has no vCPU.
    #[error("the MP table needs at least one vCPU")]
    NoCpus,
    /// More vCPUs than capsule supports.
    #[error("{0} vCPUs exceed the maximum of {MAX_VCPUS}")]
    TooManyCpus(u8),
    /// The table would extend past [`MPTABLE_END`].
    #[error("the MP table for {0} vCPUs does not fit below {MPTABLE_END:#x}")]
    TableTooLarge(u8),
    /// Writing to guest memory failed.
    #[error("failed to write the MP table: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Value that makes the byte sum of `bytes` plus itself zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Size in bytes of the MP table (floating pointer and configuration
/// table) for `num_cpus` vCPUs.
pub fn mptable_size(num_cpus: u8) -> usize {
    size_of::<MpfIntel>()
        + size_of::<MpcTable>()
        + size_of::<MpcCpu>() * usize::from(num_cpus)
        + size_of::<MpcBus>()
        + size_of::<MpcIoapic>()
        + size_of::<MpcIntsrc>() * IOAPIC_NUM_PINS as usize
        + size_of::<MpcLintsrc>() * 2
}

/// Largest vCPU count whose MP table fits between [`MPTABLE_START`] and
/// [`MPTABLE_END`].
pub fn max_mptable_cpus() -> u8 {
    let fixed = mptable_size(0) as u64;
    let room = (MPTABLE_END - MPTABLE_START).saturating_sub(fixed);
    let fit = room / size_of::<MpcCpu>() as u64;
    u8::try_from(fit).map_or(MAX_VCPUS, |n| n.min(MAX_VCPUS))
}

/// Builds the configuration table entries (without the header).
fn build_entries(num_cpus: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for cpu in 0..num_cpus {
        let flags = if cpu == 0 {
            CPU_ENABLED | CPU_BOOTPROCESSOR
        } else {
            CPU_ENABLED
        };
        out.extend_from_slice(
            MpcCpu {
                entry_type: MP_PROCESSOR,
                apicid: cpu,
                apicver: APIC_VERSION,
                cpuflag: flags,
                cpufeature: CPU_SIGNATURE,
                featureflag: CPU_FEATURES,
                reserved: [0; 2],
            }
            .as_slice(),
        );
    }
    out.extend_from_slice(
        MpcBus {
            entry_type: MP_BUS,
            busid: 0,
            bustype: *b"ISA   ",
        }
        .as_slice(),
    );
    let ioapic_id = num_cpus + 1;
    out.extend_from_slice(
        MpcIoapic {
            entry_type: MP_IOAPIC,
            apicid: ioapic_id,
            apicver: IOAPIC_VERSION,
            flags: MPC_APIC_USABLE,
            apicaddr: IOAPIC_START_32,
        }
        .as_slice(),
    );
    // ISA IRQs 0..16 to the same IOAPIC pins, then the remaining pins.
    debug_assert!(u32::from(ISA_IRQS) <= IOAPIC_NUM_PINS);
    for pin in 0..IOAPIC_PINS {
        out.extend_from_slice(
            MpcIntsrc {
                entry_type: MP_INTSRC,
                irqtype: MP_IRQ_TYPE_INT,
                irqflag: MP_IRQ_FLAGS_DEFAULT,
                srcbus: 0,
                srcbusirq: pin,
                dstapic: ioapic_id,
                dstirq: pin,
            }
            .as_slice(),
        );
    }
    for (irqtype, lint) in [(MP_IRQ_TYPE_EXTINT, 0), (MP_IRQ_TYPE_NMI, 1)] {
        out.extend_from_slice(
            MpcLintsrc {
                entry_type: MP_LINTSRC,
                irqtype,
                irqflag: MP_IRQ_FLAGS_DEFAULT,
                srcbusid: 0,
                srcbusirq: 0,
                destapic: ALL_LAPICS,
                destapiclint: lint,
            }
            .as_slice(),
        );
    }
    out
}

/// Writes an MP table describing `num_cpus` vCPUs (APIC ids `0..num_cpus`,
/// vCPU 0 is the BSP) and the IOAPIC at [`MPTABLE_START`].
///
/// With the current layout the table fits up to [`max_mptable_cpus`] vCPUs.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<()> {
    if num_cpus == 0 {
        return Err(Error::NoCpus);
    }
    if num_cpus > MAX_VCPUS {
        return Err(Error::TooManyCpus(num_cpus));
    }
    let size = mptable_size(num_cpus) as u64;
    if MPTABLE_START + size > MPTABLE_END {
        return Err(Error::TableTooLarge(num_cpus));
    }

    let mpf_addr = GuestAddress(MPTABLE_START);
    let table_addr = mpf_addr.unchecked_add(size_of::<MpfIntel>() as u64);
    let entries = build_entries(num_cpus);

    let mut table = MpcTable {
        signature: *b"PCMP",
        length: u16::try_from(size_of::<MpcTable>() + entries.len())
            .map_err(|_| Error::TableTooLarge(num_cpus))?,
        spec: MPC_SPEC_REVISION,
        oem: *b"CAPSULE ",
        productid: *b"000000000000",
        oemcount: entries_count(num_cpus),
        lapic: APIC_START_32,
        ..Default::default()
    };
    let mut bytes = table.as_slice().to_vec();
    bytes.extend_from_slice(&entries);
    table.checksum = checksum(&bytes);

    let mut mpf = MpfIntel {
        signature: *b"_MP_",
        // Below 1 MiB: the MP table lives between MPTABLE_START and MPTABLE_END.
        physptr: addr32(table_addr.raw_value()),
        // In 16-byte units.
        length: 1,
        specification: MPC_SPEC_REVISION,
        ..Default::default()
    };
    mpf.checksum = checksum(mpf.as_slice());

    mem.write_obj(mpf, mpf_addr).map_err(Error::Write)?;
    mem.write_obj(table, table_addr).map_err(Error::Write)?;
    mem.write_slice(
        &entries,
        table_addr.unchecked_add(size_of::<MpcTable>() as u64),
    )
    .map_err(Error::Write)
}

/// Number of entries in the configuration table.
fn entries_count(num_cpus: u8) -> u16 {
    u16::from(num_cpus) + 2 + u16::from(IOAPIC_PINS) + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn sum(mem: &GuestMemoryMmap, addr: u64, len: usize) -> u8 {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn struct_sizes() {
        assert_eq!(size_of::<MpfIntel>(), 16);
        assert_eq!(size_of::<MpcTable>(), 44);
        assert_eq!(size_of::<MpcCpu>(), 20);
        assert_eq!(size_of::<MpcBus>(), 8);
        assert_eq!(size_of::<MpcIoapic>(), 8);
        assert_eq!(size_of::<MpcIntsrc>(), 8);
        assert_eq!(size_of::<MpcLintsrc>(), 8);
    }

    #[test]
    fn checksums_and_counts() {
        for num_cpus in [1u8, 2, 4, max_mptable_cpus()] {
            let m = mem();
            setup_mptable(&m, num_cpus).unwrap();

            let mpf: MpfIntel = m.read_obj(GuestAddress(MPTABLE_START)).unwrap();
            assert_eq!(mpf.signature, *b"_MP_");
            assert_eq!(sum(&m, MPTABLE_START, 16), 0);

            let table_addr = u64::from(mpf.physptr);
            let table: MpcTable = m.read_obj(GuestAddress(table_addr)).unwrap();
            assert_eq!(table.signature, *b"PCMP");
            let len = usize::from(table.length);
            assert_eq!(sum(&m, table_addr, len), 0);
            assert_eq!(16 + len, mptable_size(num_cpus));
            assert!(MPTABLE_START + mptable_size(num_cpus) as u64 <= MPTABLE_END);

            // Count processor entries and check their ids.
            let mut addr = table_addr + size_of::<MpcTable>() as u64;
            let mut cpus = 0u8;
            let mut intsrcs = 0;
            let mut lints = 0;
            for _ in 0..table.oemcount {
                let entry_type: u8 = m.read_obj(GuestAddress(addr)).unwrap();
                match entry_type {
                    MP_PROCESSOR => {
                        let cpu: MpcCpu = m.read_obj(GuestAddress(addr)).unwrap();
                        assert_eq!(cpu.apicid, cpus);
                        assert_eq!(cpu.cpuflag & CPU_ENABLED, CPU_ENABLED);
                        assert_eq!(cpu.cpuflag & CPU_BOOTPROCESSOR != 0, cpus == 0);
                        cpus += 1;
                        addr += size_of::<MpcCpu>() as u64;
                    }
                    MP_IOAPIC => {
                        let io: MpcIoapic = m.read_obj(GuestAddress(addr)).unwrap();
                        assert_eq!(io.apicid, num_cpus + 1);
                        assert_eq!({ io.apicaddr }, IOAPIC_START_32);
                        addr += 8;
                    }
                    MP_INTSRC => {
                        let i: MpcIntsrc = m.read_obj(GuestAddress(addr)).unwrap();
                        assert_eq!(i.srcbusirq, i.dstirq);
                        assert_eq!(i.dstapic, num_cpus + 1);
                        intsrcs += 1;
                        addr += 8;
                    }
                    MP_LINTSRC => {
                        let l: MpcLintsrc = m.read_obj(GuestAddress(addr)).unwrap();
                        assert_eq!(l.destapic, 0xff);
                        lints += 1;
                        addr += 8;
                    }
                    MP_BUS => addr += 8,
                    t => panic!("unexpected entry type {t}"),
                }
            }
            assert_eq!(cpus, num_cpus);
            assert_eq!(intsrcs, IOAPIC_NUM_PINS);
            assert_eq!(lints, 2);
            assert_eq!(addr, table_addr + len as u64);
        }
    }

    #[test]
    fn errors() {
        let m = mem();
        assert!(matches!(setup_mptable(&m, 0), Err(Error::NoCpus)));
        assert!(matches!(
            setup_mptable(&m, 255),
            Err(Error::TooManyCpus(255))
        ));
        // The table has room for every vCPU count capsule supports.
        assert!(max_mptable_cpus() >= MAX_VCPUS);
        setup_mptable(&m, MAX_VCPUS).unwrap();
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(setup_mptable(&small, 1), Err(Error::Write(_))));
    }
}
