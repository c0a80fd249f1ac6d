//! Loading the guest into its memory: the kernel (ELF vmlinux or bzImage),
//! the initrd followed by a generated initramfs, and the command line
//! (with the virtio-mmio devices on it when the guest has no ACPI).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use arch::acpi::MmioDevice;
use arch::layout;
use arch::GuestMemoryMmap;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::builder::{Error, Result};
use crate::kernel_map::KernelMap;

/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Where and how the kernel starts.
pub(crate) struct KernelEntry {
    pub(crate) address: u64,
    pub(crate) setup_header: Option<linux_loader::bootparam::setup_header>,
    /// Whether the kernel reads ACPI tables and drives virtio-pci
    /// ([`crate::kernel_probe`]).
    pub(crate) support: crate::kernel_probe::KernelSupport,
}

/// Loads the kernel in `file` into fresh guest RAM `mem`: an ELF kernel
/// mapped from the file when `map` allows it ([`crate::kernel_map`]; the
/// map is returned and must live as long as the VM), else copied.
///
/// What the kernel supports ([`crate::kernel_probe`]) is read from the
/// file on a second thread meanwhile: the probe reads the symbol table
/// (about 1.5 MiB for a distribution-sized vmlinux) with positioned reads,
/// which leave the file offset the loader seeks alone, and copying the
/// kernel into fresh guest RAM is most of capsule's own start-up time, so
/// the probe's time is hidden behind it rather than added to it.
pub(crate) fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    file: &mut File,
    map: bool,
) -> Result<(KernelEntry, Option<KernelMap>)> {
    let probe_file = file.try_clone().ok();
    std::thread::scope(|scope| {
        let probe = probe_file.as_ref().and_then(|f| {
            std::thread::Builder::new()
                .name("kernel-probe".into())
                .stack_size(PROBE_STACK)
                .spawn_scoped(scope, move || crate::kernel_probe::probe(f))
                .ok()
        });
        let loaded = place_kernel(mem, path, file, map);
        let support = match probe {
            Some(thread) => thread
                .join()
                .unwrap_or(crate::kernel_probe::KernelSupport::UNKNOWN),
            // No second thread (or no second descriptor): probe here.
            None => crate::kernel_probe::probe(file),
        };
        // A bzImage's probe finds no ELF and says "unknown", as it should:
        // what a compressed kernel supports cannot be read from outside.
        loaded.map(|(entry, kmap)| (KernelEntry { support, ..entry }, kmap))
    })
}

/// The probe thread's stack: it only walks byte buffers on the heap.
const PROBE_STACK: usize = 256 << 10;

/// Maps (when `map` allows it) or copies the kernel in `file` into `mem`;
/// its `support` is [`load_kernel`]'s to fill in.
fn place_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    file: &mut File,
    map: bool,
) -> Result<(KernelEntry, Option<KernelMap>)> {
    if map {
        match KernelMap::new(mem, file, layout::HIMEM_START) {
            Ok((kmap, address)) => {
                log::info!(
                    "kernel: {} KiB mapped from {} (read lease held)",
                    kmap.mapped_bytes() >> 10,
                    path.display()
                );
                let entry = KernelEntry {
                    address,
                    setup_header: None,
                    support: crate::kernel_probe::KernelSupport::UNKNOWN,
                };
                return Ok((entry, Some(kmap)));
            }
            Err(why) => log::debug!("kernel: copied, not mapped: {why}"),
        }
    }
    copy_kernel(mem, path, file).map(|entry| (entry, None))
}

/// What [`load_kernel_image`] did with a kernel file.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedKernel {
    /// The guest address the vCPU starts at.
    pub entry: u64,
    /// Whether the file was mapped (rather than copied) into guest RAM.
    pub mapped: bool,
    /// Whether it is a bzImage (it has a setup header).
    pub bzimage: bool,
    /// What [`crate::kernel_probe`] found out about it.
    pub support: crate::kernel_probe::KernelSupport,
}

/// Loads the kernel in `file` into fresh guest RAM `mem` as a VM's build
/// does (`load_kernel`: mapped from the file if `map` and it can be,
/// else copied), then lets go of the file (a map's lease is released; its
/// pages stay in `mem`).
///
/// Public only for the `kernel_image` fuzz target (`fuzz/`), which feeds
/// it malformed files: capsule itself calls `load_kernel`, which keeps
/// the map for the VM's life.
#[doc(hidden)]
pub fn load_kernel_image(
    mem: &GuestMemoryMmap,
    path: &Path,
    file: &mut File,
    map: bool,
) -> Result<LoadedKernel> {
    let (entry, kmap) = load_kernel(mem, path, file, map)?;
    Ok(LoadedKernel {
        entry: entry.address,
        mapped: kmap.is_some(),
        bzimage: entry.setup_header.is_some(),
        support: entry.support,
    })
}

/// Loads the kernel in `file` into guest RAM `mem` by copying it (ELF or
/// bzImage); its `support` is [`load_kernel`]'s to fill in.
fn copy_kernel(mem: &GuestMemoryMmap, path: &Path, file: &mut File) -> Result<KernelEntry> {
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let load_err = |source| Error::LoadKernel {
        path: path.to_path_buf(),
        source,
    };
    let rewind = |file: &mut File| {
        file.seek(SeekFrom::Start(0))
            .map(drop)
            .map_err(|source| Error::File {
                what: "kernel",
                path: path.to_path_buf(),
                source,
            })
    };
    rewind(file)?;
    match Elf::load(mem, None, file, himem) {
        Ok(r) => {
            return Ok(KernelEntry {
                address: r.kernel_load.0,
                setup_header: None,
                support: crate::kernel_probe::KernelSupport::UNKNOWN,
            })
        }
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {}
        Err(e) => return Err(load_err(e)),
    }
    rewind(file)?;
    match BzImage::load(mem, None, file, himem) {
        Ok(r) => Ok(KernelEntry {
            address: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
            setup_header: r.setup_header,
            support: crate::kernel_probe::KernelSupport::UNKNOWN,
        }),
        Err(loader::Error::Bzimage(loader::bzimage::Error::InvalidBzImage)) => {
            Err(Error::NotAKernel(path.to_path_buf()))
        }
        Err(e) => Err(load_err(e)),
    }
}

/// Loads the initrd file (if any) followed by the generated initramfs
/// bytes (if any, 4-byte aligned after the file, as the kernel accepts
/// concatenated archives) at the top of low memory.
pub(crate) fn load_initrd(
    mem: &GuestMemoryMmap,
    file: Option<(&PathBuf, File)>,
    extra: Option<&[u8]>,
) -> Result<arch::boot::InitrdConfig> {
    let (path, file_size) = match &file {
        Some((path, f)) => {
            let size = f.metadata().map_err(|source| Error::File {
                what: "initrd",
                path: path.to_path_buf(),
                source,
            })?;
            (path.to_path_buf(), size.len())
        }
        None => (PathBuf::from("(generated initramfs)"), 0),
    };
    let file_err = |source| Error::File {
        what: "initrd",
        path: path.clone(),
        source,
    };
    let extra_at = if extra.is_some() {
        file_size.next_multiple_of(4)
    } else {
        file_size
    };
    let total = extra_at + extra.map_or(0, |e| e.len() as u64);
    let size = usize::try_from(total).map_err(|_| file_err(std::io::Error::other("too large")))?;
    let address =
        arch::boot::initrd_load_addr(mem, size).map_err(|source| Error::InitrdTooBig {
            path: path.clone(),
            size: total,
            source,
        })?;
    if let Some((_, mut f)) = file {
        mem.read_exact_volatile_from(address, &mut f, arch::usize_from(file_size))
            .map_err(|source| Error::ReadInitrd {
                path: path.clone(),
                source,
            })?;
    }
    if let Some(extra) = extra {
        // Zero the alignment gap, then the archive.
        let gap = vec![0u8; arch::usize_from(extra_at - file_size)];
        mem.write_slice(&gap, address.unchecked_add(file_size))
            .and_then(|()| mem.write_slice(extra, address.unchecked_add(extra_at)))
            .map_err(Error::Initramfs)?;
    }
    Ok(arch::boot::InitrdConfig { address, size })
}

/// The command line the guest gets. With ACPI (the default) virtio-mmio
/// devices are described in the DSDT; a guest booted with `acpi=off`, or
/// a kernel without ACPI (`no_acpi`), does not read it, so the devices are
/// then announced with `virtio_mmio.device=` entries instead (its legacy
/// interrupt routing maps the lines those name).
///
/// Without a PCI bus (`pci_bus` false: every device on virtio-mmio) the
/// guest is told `pci=off`, as Firecracker does, unless the user's line
/// already says `pci=` something: otherwise Linux probes the
/// configuration ports for a host bridge that is not there (about 225
/// port exits to capsule per boot, and 12-20 ms of `amd_postcore_init`
/// in the nested harness).
pub(crate) fn kernel_cmdline(
    user: &str,
    virtio_mmio: &[MmioDevice],
    no_acpi: bool,
    pci_bus: bool,
) -> String {
    let mut cmdline = user.to_string();
    if !pci_bus && !user.split_whitespace().any(|w| w.starts_with("pci=")) {
        cmdline.push_str(" pci=off");
    }
    if no_acpi || acpi_off(user) {
        for dev in virtio_mmio {
            cmdline.push_str(&format!(
                " virtio_mmio.device={}K@{:#x}:{}",
                dev.len >> 10,
                dev.base,
                dev.gsi
            ));
        }
    }
    cmdline
}

/// Whether kernel command line `cmdline` turns ACPI off (`acpi=off`).
pub(crate) fn acpi_off(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == "acpi=off")
}

/// Writes the command line; returns its size including the NUL.
pub(crate) fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize> {
    let mut c = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(Error::Cmdline)?;
    c.insert_str(cmdline).map_err(Error::CmdlineTooLong)?;
    loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &c)
        .map_err(Error::LoadCmdline)?;
    let len = c.as_cstring().map_err(Error::Cmdline)?;
    Ok(len.as_bytes_with_nul().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_mmio_on_cmdline_only_without_acpi() {
        let devs = [MmioDevice {
            base: 0xd000_0000,
            len: 0x1000,
            gsi: 5,
        }];
        assert_eq!(
            kernel_cmdline("console=ttyS0", &devs, false, true),
            "console=ttyS0"
        );
        assert_eq!(
            kernel_cmdline("console=ttyS0 acpi=off", &devs, false, true),
            "console=ttyS0 acpi=off virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(
            kernel_cmdline("console=ttyS0", &devs, true, true),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"
        );
    }

    #[test]
    fn pci_off_without_a_pci_bus_unless_the_user_chose() {
        assert_eq!(
            kernel_cmdline("console=ttyS0", &[], false, false),
            "console=ttyS0 pci=off"
        );
        assert_eq!(
            kernel_cmdline("console=ttyS0 pci=noacpi", &[], false, false),
            "console=ttyS0 pci=noacpi"
        );
        assert_eq!(kernel_cmdline("quiet", &[], false, true), "quiet");
    }
}
