//! Shared pieces of capsule's fuzz targets.
//!
//! [`Input`] reads fuzzer bytes as numbers without ever failing (missing
//! bytes read as zero), so every input is a valid test case and the fuzzer
//! spends no time on framing. [`virtio`] runs a device the way the VMM
//! does: behind a virtio-mmio transport or a virtio-pci function,
//! programmed through its registers, over guest memory the fuzzer filled,
//! with queue work done by the event loop. [`kernel`] loads a kernel file
//! the fuzzer wrote.

use std::path::{Path, PathBuf};

use vmm_sys_util::tempdir::TempDir;

pub mod fs;
pub mod kernel;
pub mod snapshot;
pub mod virtio;
pub mod vsock;

/// A directory of the calling thread's own for the files a harness
/// writes (tests run in threads at once), in `/dev/shm` where there is
/// one: writing files on a disk's file system costs more than the code
/// under test.
pub fn thread_dir() -> PathBuf {
    thread_local! {
        static DIR: TempDir = {
            let prefix = if Path::new("/dev/shm").is_dir() {
                "/dev/shm/capsule-fuzz-"
            } else {
                "/tmp/capsule-fuzz-"
            };
            TempDir::new_with_prefix(prefix).expect("temp dir")
        };
    }
    DIR.with(|d| d.as_path().to_path_buf())
}

/// A cursor over fuzzer bytes; reads past the end yield zeroes.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Takes up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    /// Takes everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    /// Whether the input is used up.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// A byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}
