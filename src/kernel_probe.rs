//! What the guest kernel image says it supports, read before it boots:
//!
//! * **ACPI.** A kernel built without `CONFIG_ACPI` (as many kernels
//!   built for Firecracker are) never looks at the DSDT, so capsule's
//!   virtio-mmio devices must be announced to it on the command line
//!   instead (`virtio_mmio.device=`).
//! * **virtio-pci.** A kernel with PCI, MSI and the virtio-pci driver
//!   built in finds capsule's devices on PCI bus 0, the faster transport
//!   (docs/performance.md), which capsule then picks unless told
//!   otherwise; one without them would find no device there.
//!
//! The answers come from the kernel image itself, for an ELF vmlinux (the
//! only kind Firecracker boots on x86_64):
//!
//! 1. its symbol table (`.symtab`, kept by `strip --strip-debug`): a kernel
//!    with ACPI has the function `acpi_init` (drivers/acpi/bus.c, built
//!    exactly when `CONFIG_ACPI` is set); one with virtio-pci has
//!    `pci_bus_type` (`CONFIG_PCI`), `pci_msi_enabled` (`CONFIG_PCI_MSI`)
//!    and `virtio_pci_modern_probe` (`CONFIG_VIRTIO_PCI`, built in);
//! 2. without a symbol table, its embedded configuration (`CONFIG_IKCONFIG`:
//!    a gzip'd `.config` between the markers `IKCFG_ST` and `IKCFG_ED` in
//!    `.rodata`): `CONFIG_ACPI=y`, and `CONFIG_PCI=y`, `CONFIG_PCI_MSI=y`,
//!    `CONFIG_VIRTIO_PCI=y`, or not.
//!
//! A bzImage (its vmlinux is compressed and stripped) or a vmlinux with
//! neither gives no answer; capsule then keeps ACPI, as before (`acpi=off`
//! on the command line still announces the devices there), and virtio-mmio.
//! Only section headers, the symbol table and `.rodata` are read, never
//! the whole image.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;

/// Whether the kernel has a feature, and how capsule knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// The kernel has it; how capsule knows.
    Present(&'static str),
    /// The kernel was built without it; how capsule knows.
    Absent(&'static str),
    /// The image does not tell.
    Unknown,
}

impl Support {
    /// Whether the image says the kernel has the feature.
    pub fn is_present(&self) -> bool {
        matches!(self, Self::Present(_))
    }
}

/// What capsule found out about the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSupport {
    /// Whether it reads ACPI tables.
    pub acpi: Support,
    /// Whether it can drive virtio-pci functions with MSI-X.
    pub virtio_pci: Support,
}

impl KernelSupport {
    /// An image that tells nothing (a bzImage).
    pub const UNKNOWN: Self = Self {
        acpi: Support::Unknown,
        virtio_pci: Support::Unknown,
    };
}

/// The function a kernel with `CONFIG_ACPI` has.
const ACPI_SYMBOL: &[u8] = b"acpi_init";
/// The symbols a kernel that drives virtio-pci devices with MSI-X has:
/// the PCI bus type, MSI, and the modern virtio-pci driver built in.
const VIRTIO_PCI_SYMBOLS: [&[u8]; 3] = [
    b"pci_bus_type",
    b"pci_msi_enabled",
    b"virtio_pci_modern_probe",
];
/// The configuration options that build [`VIRTIO_PCI_SYMBOLS`] in.
const VIRTIO_PCI_OPTIONS: [&str; 3] = ["CONFIG_PCI=y", "CONFIG_PCI_MSI=y", "CONFIG_VIRTIO_PCI=y"];
/// Most bytes read for one section (a symbol table, `.rodata`): far more
/// than any real kernel's; a larger claim is not believed.
const MAX_SECTION: u64 = 256 << 20;

const SHT_SYMTAB: u32 = 2;
const SYM_SIZE: usize = 24;

/// One ELF64 section header, the fields used here.
#[derive(Debug, Clone, Copy)]
struct Section {
    name: u32,
    kind: u32,
    offset: u64,
    size: u64,
    link: u32,
}

/// The little-endian `u16` at `b[at..]` (an ELF field; also read by
/// [`crate::kernel_map`]).
pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The little-endian `u32` at `b[at..]`.
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

/// The little-endian `u64` at `b[at..]`.
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// `len` bytes of `file` at `offset`, if it has them (and `len` is at
/// most [`MAX_SECTION`]).
pub(crate) fn read_at(file: &File, offset: u64, len: u64) -> Option<Vec<u8>> {
    if len > MAX_SECTION {
        return None;
    }
    let mut buf = vec![0u8; usize::try_from(len).ok()?];
    file.read_exact_at(&mut buf, offset).ok()?;
    Some(buf)
}

/// The section headers of a little-endian ELF64 file, or `None` for
/// anything else.
fn sections(file: &File) -> Option<Vec<Section>> {
    let mut eh = [0u8; 64];
    file.read_exact_at(&mut eh, 0).ok()?;
    if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return None;
    }
    let shoff = u64_at(&eh, 0x28);
    let shentsize = u64::from(u16_at(&eh, 0x3a));
    let shnum = u64::from(u16_at(&eh, 0x3c));
    if shentsize < 64 || shnum == 0 {
        return None;
    }
    let table = read_at(file, shoff, shentsize.checked_mul(shnum)?)?;
    Some(
        table
            .chunks_exact(usize::try_from(shentsize).ok()?)
            .map(|h| Section {
                name: u32_at(h, 0),
                kind: u32_at(h, 4),
                offset: u64_at(h, 0x18),
                size: u64_at(h, 0x20),
                link: u32_at(h, 0x28),
            })
            .collect(),
    )
}

/// Whether the symbol table `symtab` (names in `strtab`) has `name`.
#[cfg(test)]
fn has_symbol(symtab: &[u8], strtab: &[u8], name: &[u8]) -> bool {
    has_symbols(symtab, strtab, [name])[0]
}

/// Which of `names` the symbol table `symtab` (names in `strtab`) has.
///
/// This runs at every boot, over ~40,000 symbols in a typical vmlinux, and
/// under an emulated host a byte-at-a-time loop over the names costs tens
/// of milliseconds. So the string table is searched (SIMD, `memchr`) for
/// every occurrence of `name` and its terminating NUL: each is a place a
/// symbol's name could start. Not only those after a NUL: the linker may
/// share a name's bytes with the tail of a longer one (`early_acpi_init`
/// holding `acpi_init`). Then the symbols' name offsets (the first 4 bytes
/// of each entry) are compared with those few candidates, in one pass
/// over the table for all the names, which ends once each is found.
fn has_symbols<const N: usize>(symtab: &[u8], strtab: &[u8], names: [&[u8]; N]) -> [bool; N] {
    let mut starts: Vec<(u32, usize)> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut needle = name.to_vec();
        needle.push(0);
        starts.extend(
            memchr::memmem::find_iter(strtab, &needle)
                .filter_map(|at| u32::try_from(at).ok())
                .map(|at| (at, i)),
        );
    }
    let mut found = [false; N];
    let mut left: usize = names
        .iter()
        .enumerate()
        .filter(|(i, _)| starts.iter().any(|s| s.1 == *i))
        .count();
    for sym in symtab.chunks_exact(SYM_SIZE) {
        if left == 0 {
            break;
        }
        let at = u32_at(sym, 0);
        for &(start, i) in &starts {
            if start == at && !found[i] {
                found[i] = true;
                left -= 1;
            }
        }
    }
    found
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

/// The embedded `.config` in `rodata`, if there is one.
fn ikconfig(rodata: &[u8]) -> Option<String> {
    let start = find(rodata, b"IKCFG_ST")? + 8;
    let len = find(&rodata[start..], b"IKCFG_ED")?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(&rodata[start..start + len])
        .take(MAX_SECTION)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// Looks at the kernel image `file` (see the module documentation).
pub fn probe(file: &File) -> KernelSupport {
    let Some(sections) = sections(file) else {
        return KernelSupport::UNKNOWN;
    };
    let read = |s: &Section| read_at(file, s.offset, s.size);
    if let Some(symtab) = sections.iter().find(|s| s.kind == SHT_SYMTAB) {
        let strtab = sections.get(symtab.link as usize).and_then(read);
        if let (Some(syms), Some(names)) = (read(symtab), strtab) {
            if syms.len() >= SYM_SIZE {
                return from_symbols(&syms, &names);
            }
        }
    }
    let shstrtab = {
        let mut eh = [0u8; 64];
        if file.read_exact_at(&mut eh, 0).is_err() {
            return KernelSupport::UNKNOWN;
        }
        sections
            .get(usize::from(u16_at(&eh, 0x3e)))
            .and_then(read)
            .unwrap_or_default()
    };
    let named = |s: &&Section| {
        shstrtab
            .get(s.name as usize..)
            .and_then(|r| r.split(|&b| b == 0).next())
            .is_some_and(|n| n == b".rodata")
    };
    match sections
        .iter()
        .find(named)
        .and_then(read)
        .and_then(|r| ikconfig(&r))
    {
        Some(config) => from_config(&config),
        None => KernelSupport::UNKNOWN,
    }
}

/// What the symbol table `syms` (names in `names`) says.
fn from_symbols(syms: &[u8], names: &[u8]) -> KernelSupport {
    let [acpi_init, pci @ ..] = has_symbols(
        syms,
        names,
        [
            ACPI_SYMBOL,
            VIRTIO_PCI_SYMBOLS[0],
            VIRTIO_PCI_SYMBOLS[1],
            VIRTIO_PCI_SYMBOLS[2],
        ],
    );
    let acpi = if acpi_init {
        Support::Present("its symbol table has acpi_init")
    } else {
        Support::Absent("its symbol table has no acpi_init")
    };
    let missing = pci.iter().position(|found| !found);
    let virtio_pci = match missing {
        None => Support::Present(
            "its symbol table has pci_bus_type, pci_msi_enabled and virtio_pci_modern_probe",
        ),
        Some(0) => Support::Absent("its symbol table has no pci_bus_type (no PCI)"),
        Some(1) => Support::Absent("its symbol table has no pci_msi_enabled (no PCI MSI)"),
        Some(_) => Support::Absent(
            "its symbol table has no virtio_pci_modern_probe (no virtio-pci driver built in)",
        ),
    };
    KernelSupport { acpi, virtio_pci }
}

/// What the embedded configuration `config` says.
fn from_config(config: &str) -> KernelSupport {
    let has = |option: &str| config.lines().any(|l| l == option);
    let acpi = if has("CONFIG_ACPI=y") {
        Support::Present("its embedded configuration has CONFIG_ACPI=y")
    } else {
        Support::Absent("its embedded configuration has no CONFIG_ACPI")
    };
    let virtio_pci = if VIRTIO_PCI_OPTIONS.iter().all(|o| has(o)) {
        Support::Present(
            "its embedded configuration has CONFIG_PCI=y, CONFIG_PCI_MSI=y and CONFIG_VIRTIO_PCI=y",
        )
    } else {
        Support::Absent(
            "its embedded configuration lacks one of CONFIG_PCI=y, CONFIG_PCI_MSI=y, CONFIG_VIRTIO_PCI=y",
        )
    };
    KernelSupport { acpi, virtio_pci }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal ELF64 with the given sections (name, type, contents,
    /// link), a section-name table appended last.
    fn elf(secs: &[(&str, u32, Vec<u8>, u32)]) -> Vec<u8> {
        let mut names = vec![0u8];
        let mut name_at = Vec::new();
        for (n, ..) in secs {
            name_at.push(names.len() as u32);
            names.extend(n.as_bytes());
            names.push(0);
        }
        let shstr_name = names.len() as u32;
        names.extend(b".shstrtab\0");
        let mut body = vec![0u8; 64];
        let mut headers = vec![[0u8; 64]]; // the null section
        let mut add = |body: &mut Vec<u8>, name: u32, kind: u32, data: &[u8], link: u32| {
            let mut h = [0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(body.len() as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(data.len() as u64).to_le_bytes());
            h[0x28..0x2c].copy_from_slice(&link.to_le_bytes());
            body.extend(data);
            headers.push(h);
        };
        for (i, (_, kind, data, link)) in secs.iter().enumerate() {
            add(&mut body, name_at[i], *kind, data, *link);
        }
        add(&mut body, shstr_name, 3, &names, 0);
        let shoff = body.len() as u64;
        let shnum = headers.len() as u16;
        for h in &headers {
            body.extend(h);
        }
        body[..6].copy_from_slice(b"\x7fELF\x02\x01");
        body[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        body[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        body[0x3c..0x3e].copy_from_slice(&shnum.to_le_bytes());
        body[0x3e..0x40].copy_from_slice(&(shnum - 1).to_le_bytes());
        body
    }

    fn symtab(names: &[&str]) -> (Vec<u8>, Vec<u8>) {
        let mut strtab = vec![0u8];
        let mut syms = vec![0u8; SYM_SIZE];
        for n in names {
            let mut s = [0u8; SYM_SIZE];
            s[..4].copy_from_slice(&(strtab.len() as u32).to_le_bytes());
            strtab.extend(n.as_bytes());
            strtab.push(0);
            syms.extend(s);
        }
        (syms, strtab)
    }

    fn probe_bytes(b: &[u8]) -> KernelSupport {
        let mut f = tempfile();
        f.write_all(b).unwrap();
        probe(&f)
    }

    fn tempfile() -> File {
        let dir = std::env::temp_dir();
        let path = dir.join(format!(
            "capsule-acpi-probe-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    fn gz(text: &str) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(text.as_bytes()).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn symbols_decide() {
        let (syms, strs) = symtab(&["start_kernel", "acpi_init", "x"]);
        let k = elf(&[(".symtab", SHT_SYMTAB, syms, 2), (".strtab", 3, strs, 0)]);
        assert!(matches!(probe_bytes(&k).acpi, Support::Present(_)));
        // A longer name ending in acpi_init is not acpi_init.
        let (syms, strs) = symtab(&["start_kernel", "early_acpi_init", "acpi_init_x"]);
        let k = elf(&[(".symtab", SHT_SYMTAB, syms, 2), (".strtab", 3, strs, 0)]);
        assert!(matches!(probe_bytes(&k).acpi, Support::Absent(_)));
    }

    #[test]
    fn virtio_pci_needs_pci_msi_and_the_driver_built_in() {
        let all = ["pci_bus_type", "pci_msi_enabled", "virtio_pci_modern_probe"];
        let probe_names = |names: &[&str]| {
            let (syms, strs) = symtab(names);
            probe_bytes(&elf(&[
                (".symtab", SHT_SYMTAB, syms, 2),
                (".strtab", 3, strs, 0),
            ]))
        };
        assert!(probe_names(&all).virtio_pci.is_present());
        for missing in all {
            let some: Vec<&str> = all.iter().copied().filter(|n| *n != missing).collect();
            let k = probe_names(&some);
            match k.virtio_pci {
                Support::Absent(why) => assert!(why.contains(missing), "{why}"),
                other => panic!("without {missing}: {other:?}"),
            }
        }
        // A kernel without ACPI may still have PCI, and the other way round.
        let k = probe_names(&["acpi_init"]);
        assert!(k.acpi.is_present() && !k.virtio_pci.is_present());
    }

    #[test]
    fn a_name_sharing_a_longer_ones_tail_is_found() {
        // As a linker's tail merging leaves it: acpi_init's name is the
        // end of early_acpi_init's, with no NUL before it.
        let mut strtab = b"\0early_acpi_init\0".to_vec();
        let mut syms = vec![0u8; SYM_SIZE];
        for at in [1u32, 7] {
            let mut s = [0u8; SYM_SIZE];
            s[..4].copy_from_slice(&at.to_le_bytes());
            syms.extend(s);
        }
        assert!(has_symbol(&syms, &strtab, b"acpi_init"));
        // Only early_acpi_init named: not found.
        syms.truncate(2 * SYM_SIZE);
        assert!(!has_symbol(&syms, &strtab, b"acpi_init"));
        // A name offset past the table is no match, and no panic.
        syms[SYM_SIZE..SYM_SIZE + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        strtab.truncate(3);
        assert!(!has_symbol(&syms, &strtab, b"acpi_init"));
    }

    #[test]
    fn embedded_config_decides_without_symbols() {
        let mut rodata = b"junk IKCFG_ST".to_vec();
        rodata.extend(gz("CONFIG_64BIT=y\n# CONFIG_ACPI is not set\n"));
        rodata.extend(b"IKCFG_ED more");
        let k = elf(&[(".rodata", 1, rodata, 0)]);
        assert!(matches!(probe_bytes(&k).acpi, Support::Absent(_)));
        assert!(matches!(probe_bytes(&k).virtio_pci, Support::Absent(_)));
        let mut rodata = b"IKCFG_ST".to_vec();
        rodata.extend(gz("CONFIG_ACPI=y\n"));
        rodata.extend(b"IKCFG_ED");
        let k = elf(&[(".rodata", 1, rodata, 0)]);
        assert!(matches!(probe_bytes(&k).acpi, Support::Present(_)));
        // virtio-pci as a module is not built in: capsule cannot know the
        // guest will load it.
        for (config, present) in [
            (
                "CONFIG_PCI=y\nCONFIG_PCI_MSI=y\nCONFIG_VIRTIO_PCI=y\n",
                true,
            ),
            (
                "CONFIG_PCI=y\nCONFIG_PCI_MSI=y\nCONFIG_VIRTIO_PCI=m\n",
                false,
            ),
            ("CONFIG_PCI=y\nCONFIG_VIRTIO_PCI=y\n", false),
        ] {
            let mut rodata = b"IKCFG_ST".to_vec();
            rodata.extend(gz(config));
            rodata.extend(b"IKCFG_ED");
            let k = elf(&[(".rodata", 1, rodata, 0)]);
            assert_eq!(probe_bytes(&k).virtio_pci.is_present(), present, "{config}");
        }
    }

    #[test]
    fn anything_else_is_unknown() {
        assert_eq!(probe_bytes(b""), KernelSupport::UNKNOWN);
        assert_eq!(probe_bytes(b"MZ not an elf"), KernelSupport::UNKNOWN);
        let k = elf(&[(".text", 1, vec![0x90; 16], 0)]);
        assert_eq!(probe_bytes(&k), KernelSupport::UNKNOWN);
        // Garbled headers: offsets and sizes past the end of the file.
        let mut k = elf(&[(".rodata", 1, b"IKCFG_STxxIKCFG_ED".to_vec(), 0)]);
        let n = k.len();
        k[0x28..0x30].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
        assert_eq!(probe_bytes(&k[..n]), KernelSupport::UNKNOWN);
    }
}
