//! The user's kernel file, for fuzzing: what capsule reads of it before
//! the guest runs.
//!
//! Input: `flags: u8 | file`. The file is written to the thread's
//! directory ([`crate::thread_dir`]) and opened read-only, as capsule
//! opens `--kernel`; then
//!
//! * `capsule::kernel_probe::probe` reads it (section headers, symbol
//!   table, embedded configuration);
//! * [`capsule::load_kernel_image`] copies it into [`MEM_SIZE`] bytes of
//!   fresh guest RAM (ELF vmlinux or bzImage, through linux-loader);
//! * with flag bit 0, it is loaded again with the map asked for
//!   (`CAPSULE_KERNEL_MAP=1`: an ELF kernel's segments mapped from the
//!   file over guest RAM under a read lease, `src/kernel_map.rs`), into
//!   other fresh RAM, and the two loads are compared: where both load the
//!   kernel, the entry points and the whole of guest RAM must be the
//!   same, and the map may only refuse what the copy refuses;
//! * with bit 1, `capsule doctor`'s reading of the file
//!   (`capsule::doctor::kernel::inspect`: a bzImage's payload
//!   decompressed, the embedded configuration, the release).
//!
//! Guest RAM lies between two canary zones in one host mapping
//! ([`GuardedRam`]); a load that wrote or mapped anything outside guest
//! RAM changes a canary, which panics (a crash for the fuzzer), as does
//! any panic in capsule's code.

use std::fs::File;
use std::sync::OnceLock;

use capsule::kernel_probe::{self, KernelSupport};
use capsule::{load_kernel_image, LoadedKernel};
use devices::GuestMemoryMmap;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestRegionMmap, MmapRegion};

use crate::Input;

/// Guest RAM: 2 MiB, so the 1 MiB above `HIMEM_START` (where a kernel's
/// segments must lie to be mapped) is there, and little enough to compare.
pub const MEM_SIZE: usize = 2 << 20;
/// Bytes of canary on each side of guest RAM.
const CANARY: usize = 64 << 10;

/// The canary's bytes: a pattern no file mapping or zeroing reproduces
/// by chance. Made once, and filled in and compared whole (`memcpy`,
/// `memcmp`): the harness is instrumented too, and a loop per byte cost
/// it more than the loads it checks.
fn canary() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| {
        (0..CANARY)
            .map(|i| (i as u8).wrapping_mul(31) ^ 0xa5)
            .collect()
    })
}

/// Guest RAM at guest address 0 in the middle of one anonymous host
/// mapping, with [`CANARY`] bytes of a known pattern before and after it.
pub struct GuardedRam {
    base: *mut u8,
    total: usize,
    mem: Option<GuestMemoryMmap>,
}

impl GuardedRam {
    /// Fresh, zeroed guest RAM between filled canaries.
    pub fn new() -> Self {
        let total = CANARY + MEM_SIZE + CANARY;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: a new anonymous mapping; the result is checked.
        let base = unsafe { libc::mmap(std::ptr::null_mut(), total, prot, flags, -1, 0) };
        assert!(base != libc::MAP_FAILED, "mmap guest RAM");
        let base = base.cast::<u8>();
        // SAFETY: both canaries lie inside the mapping just made, which
        // nothing else refers to yet.
        unsafe {
            for zone in [0, CANARY + MEM_SIZE] {
                std::slice::from_raw_parts_mut(base.add(zone), CANARY).copy_from_slice(canary());
            }
        }
        // SAFETY: the middle MEM_SIZE bytes of the mapping, which outlives
        // the region (`Drop` drops the memory before unmapping).
        let region = unsafe {
            MmapRegion::<AtomicBitmap>::build_raw(base.add(CANARY), MEM_SIZE, prot, flags)
        }
        .expect("guest RAM region");
        let region = GuestRegionMmap::new(region, GuestAddress(0)).expect("guest RAM");
        let mem = GuestMemoryMmap::from_regions(vec![region]).expect("guest memory");
        Self {
            base,
            total,
            mem: Some(mem),
        }
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.mem.as_ref().expect("memory")
    }

    /// The guest RAM's bytes as the host sees them.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: guest RAM inside the mapping; nothing writes it while
        // the harness compares (the loads are over).
        unsafe { std::slice::from_raw_parts(self.base.add(CANARY), MEM_SIZE) }
    }

    /// Panics unless both canaries are as written: nothing was written,
    /// and nothing mapped, outside guest RAM.
    pub fn check(&self) {
        for (zone, name) in [(0, "below"), (CANARY + MEM_SIZE, "above")] {
            // SAFETY: the canary zone inside the mapping.
            let bytes = unsafe { std::slice::from_raw_parts(self.base.add(zone), CANARY) };
            if bytes != canary() {
                let i = (0..CANARY).find(|&i| bytes[i] != canary()[i]);
                panic!("the kernel load changed host memory {name} guest RAM, at {i:#x?}");
            }
        }
    }
}

impl Default for GuardedRam {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for GuardedRam {
    fn drop(&mut self) {
        // The region only borrows the mapping (build_raw): unmap it once
        // the memory object is gone.
        self.mem.take();
        // SAFETY: the mapping made in `new`, no longer referred to.
        unsafe { libc::munmap(self.base.cast(), self.total) };
    }
}

/// What a run found.
#[derive(Debug)]
pub struct Outcome {
    /// What the probe said.
    pub probe: KernelSupport,
    /// The copying load's result.
    pub copied: Result<LoadedKernel, String>,
    /// The load with the map asked for (flag bit 0).
    pub mapped: Option<Result<LoadedKernel, String>>,
}

/// Runs one input (see the module documentation).
pub fn run(data: &[u8]) -> Outcome {
    let mut input = Input::new(data);
    let flags = input.u8();
    let path = crate::thread_dir().join("vmlinux");
    std::fs::write(&path, input.rest()).expect("write the kernel file");
    // Read-only, so that no writer keeps the map's lease from being
    // granted.
    let mut file = File::open(&path).expect("open the kernel file");
    let probe = kernel_probe::probe(&file);
    let copy_ram = GuardedRam::new();
    let copied =
        load_kernel_image(copy_ram.memory(), &path, &mut file, false).map_err(|e| e.to_string());
    copy_ram.check();
    if let Ok(k) = &copied {
        assert!(!k.mapped, "mapped without being asked to");
        let expected = if k.bzimage {
            KernelSupport::UNKNOWN
        } else {
            probe.clone()
        };
        assert_eq!(k.support, expected, "the load's probe differs");
    }
    let mapped = (flags & 1 != 0).then(|| {
        let ram = GuardedRam::new();
        let r = load_kernel_image(ram.memory(), &path, &mut file, true).map_err(|e| e.to_string());
        ram.check();
        match (&r, &copied) {
            (Ok(m), Ok(c)) => {
                assert_eq!(m.entry, c.entry, "map and copy start the kernel apart");
                assert_eq!(m.support, c.support, "the load's probe differs");
                assert!(
                    ram.bytes() == copy_ram.bytes(),
                    "guest RAM differs between the map (mapped: {}) and the copy",
                    m.mapped
                );
            }
            // The map does not run linux-loader's ELF checks (its notes).
            (Ok(m), Err(_)) => assert!(m.mapped, "only a map may load what the copy refuses"),
            (Err(e), Ok(_)) => panic!("the map path refused what the copy loads: {e}"),
            (Err(_), Err(_)) => {}
        }
        r
    });
    if flags & 2 != 0 {
        if let Err(e) = capsule::doctor::kernel::inspect(&path) {
            assert!(!e.to_string().is_empty());
        }
    }
    Outcome {
        probe,
        copied,
        mapped,
    }
}

#[cfg(test)]
mod tests;
