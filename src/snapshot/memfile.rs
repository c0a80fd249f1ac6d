//! The memory file: guest RAM, the regions one after the other. A Full
//! snapshot writes every page that is not zero (holes elsewhere); a Diff
//! writes the pages its dirty log names, zero or not.

use std::fs::File;
use std::path::Path;

use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

use super::{format, io_err, Error};

/// Writes the `runs` (offset, length) of guest memory, the regions laid
/// one after the other, to a new memory file `path` of the full size;
/// the rest stays holes. Every page of a run is written, zero or not (a
/// page the guest zeroed must overwrite the base's). Returns the bytes
/// written.
pub(super) fn write_pages(
    ram: &crate::vstate::memory::GuestRam,
    path: &Path,
    runs: &[(u64, u64)],
) -> Result<u64, Error> {
    use std::os::unix::fs::FileExt;
    let mem = ram.memory();
    let tmp = format::temp_path(path);
    let result = (|| -> std::io::Result<u64> {
        let file = format::create_private(&tmp)?;
        let total: u64 = mem.iter().map(|r| r.len()).sum();
        file.set_len(total)?;
        let mut buf = vec![0u8; 2 << 20];
        let mut written = 0u64;
        for_each_piece(mem, runs, |region, start, at, len| {
            for off in (0..len).step_by(buf.len()) {
                let n = arch::usize_from((len - off).min(buf.len() as u64));
                region
                    .read_slice(&mut buf[..n], vm_memory::MemoryRegionAddress(start + off))
                    .map_err(std::io::Error::other)?;
                file.write_all_at(&buf[..n], at + off)?;
                written += n as u64;
            }
            Ok(())
        })?;
        file.sync_data()?;
        std::fs::rename(&tmp, path)?;
        Ok(written)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(path)(e)
    })
}

/// Calls `f(region, offset in region, offset in the memory file, length)`
/// for each part of each run of `runs` (memory-file offsets, the regions
/// laid one after the other) that falls in one region. A run outside
/// guest memory is an error (a damaged Diff snapshot).
pub(crate) fn for_each_piece(
    mem: &arch::GuestMemoryMmap,
    runs: &[(u64, u64)],
    mut f: impl FnMut(&arch::GuestRegionMmap, u64, u64, u64) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    check_runs(total, runs)?;
    for &(at, len) in runs {
        let mut base = 0u64;
        for region in mem.iter() {
            let (lo, hi) = (at.max(base), (at + len).min(base + region.len()));
            if lo < hi {
                f(region, lo - base, lo, hi - lo)?;
            }
            base += region.len();
        }
    }
    Ok(())
}

/// Checks that each run of `runs` is whole pages inside `total` bytes
/// of guest memory (the regions laid one after the other): a Diff
/// snapshot's runs are file data, checked before anything is mapped.
pub(crate) fn check_runs(total: u64, runs: &[(u64, u64)]) -> std::io::Result<()> {
    for &(at, len) in runs {
        let end = at.checked_add(len).filter(|&e| e <= total);
        if end.is_none() || at % PAGE as u64 != 0 || len % PAGE as u64 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("page run {at:#x}+{len:#x} is not whole pages of guest memory"),
            ));
        }
    }
    Ok(())
}

/// Which of the `pages` pages from host address `addr` have ever been
/// written (present or swapped out, from /proc/self/pagemap). A page of
/// anonymous memory that is neither has never been touched and reads as
/// zero: reading it anyway would only fault in the zero page, which on a
/// large guest costs seconds.
fn touched_pages(pagemap: &File, addr: usize, pages: usize) -> std::io::Result<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let mut raw = vec![0u8; pages * 8];
    pagemap.read_exact_at(&mut raw, (addr / PAGE) as u64 * 8)?;
    Ok(raw
        .chunks_exact(8)
        .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")) & (PRESENT | SWAPPED) != 0)
        .collect())
}

/// The host page size.
const PAGE: usize = 4096;

/// Writes guest memory, region after region, to `path`; all-zero pages
/// are left as holes. Pages of anonymous RAM the guest never touched are
/// not even read. Returns the bytes written.
pub(super) fn write_memory(
    ram: &crate::vstate::memory::GuestRam,
    path: &Path,
) -> Result<u64, Error> {
    const CHUNK: usize = 2 << 20;
    let mem = ram.memory();
    let tmp = format::temp_path(path);
    let result = (|| -> std::io::Result<u64> {
        let file = format::create_private(&tmp)?;
        let total: u64 = mem.iter().map(|r| r.len()).sum();
        file.set_len(total)?;
        // Without pagemap (no /proc) every page is read through the
        // mapping. With it, a page never touched is zero, or for RAM
        // mapped from a memory file the file's: read from the file.
        let pagemap = File::open("/proc/self/pagemap").ok();
        let source = ram.backing_file();
        let mut buf = vec![0u8; CHUNK];
        let mut offset = 0u64;
        let mut written = 0u64;
        for region in mem.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(std::io::Error::other)? as usize;
            let mut done = 0u64;
            while done < region.len() {
                let n = arch::usize_from((region.len() - done).min(CHUNK as u64));
                let pages = n.div_ceil(PAGE);
                let touched = match &pagemap {
                    Some(pm) => touched_pages(pm, host + arch::usize_from(done), pages)?,
                    None => vec![true; pages],
                };
                let at = offset + done;
                let chunk = Chunk {
                    region,
                    start: done,
                    at,
                    source,
                };
                written += chunk.write(&file, &mut buf[..n], &touched)?;
                done += n as u64;
            }
            offset += region.len();
        }
        file.sync_data()?;
        std::fs::rename(&tmp, path)?;
        Ok(written)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(path)(e)
    })
}

/// `buf.len()` bytes of guest memory: at `start` of `region`, at `at` in
/// the memory file (and in `source`, the file RAM is mapped from, if any).
struct Chunk<'a> {
    region: &'a arch::GuestRegionMmap,
    start: u64,
    at: u64,
    source: Option<&'a File>,
}

impl Chunk<'_> {
    /// Writes the chunk's pages that are not all zero to `file`, runs of
    /// pages in one write; `touched` pages are read through the mapping,
    /// the others from `source` (or are zero). Returns the bytes written.
    fn write(&self, file: &File, buf: &mut [u8], touched: &[bool]) -> std::io::Result<u64> {
        use std::os::unix::fs::FileExt;
        let n = buf.len();
        let mut written = 0u64;
        let mut i = 0;
        while i < touched.len() {
            let kind = touched[i];
            let first = i;
            while i < touched.len() && touched[i] == kind {
                i += 1;
            }
            let (lo, hi) = (first * PAGE, n.min(i * PAGE));
            match (kind, self.source) {
                (true, _) => self
                    .region
                    .read_slice(
                        &mut buf[lo..hi],
                        vm_memory::MemoryRegionAddress(self.start + lo as u64),
                    )
                    .map_err(std::io::Error::other)?,
                (false, Some(src)) => {
                    // Only the parts of the source that hold data.
                    let (from, to) = (self.at + lo as u64, self.at + hi as u64);
                    for (s, e) in data_ranges(src, from, to)? {
                        let (a, b) = (arch::usize_from(s - self.at), arch::usize_from(e - self.at));
                        src.read_exact_at(&mut buf[a..b], s)?;
                        written += write_nonzero(file, &buf[a..b], s)?;
                    }
                    continue;
                }
                (false, None) => continue,
            }
            written += write_nonzero(file, &buf[lo..hi], self.at + lo as u64)?;
        }
        Ok(written)
    }
}

/// The ranges of `[from, to)` in `file` that hold data (between its
/// holes), page aligned, from `SEEK_DATA`/`SEEK_HOLE`.
fn data_ranges(file: &File, from: u64, to: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let seek = |off: u64, whence: i32| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own; it only moves the file
        // offset, which nothing else uses (every read here is positioned).
        let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, whence) };
        if r >= 0 {
            Ok(Some(r as u64))
        } else {
            match std::io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
                e => Err(e),
            }
        }
    };
    let mut ranges = Vec::new();
    let mut pos = from;
    while pos < to {
        let Some(start) = seek(pos, libc::SEEK_DATA)? else {
            break;
        };
        if start >= to {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(to).min(to);
        let start = start - start % PAGE as u64;
        ranges.push((start.max(from), end.next_multiple_of(PAGE as u64).min(to)));
        pos = end;
    }
    Ok(ranges)
}

/// Writes the pages of `data` that are not all zero to `file` at `at`
/// (runs of them in one write); returns the bytes written.
fn write_nonzero(file: &File, data: &[u8], at: u64) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut written = 0u64;
    let mut run: Option<usize> = None;
    let mut p = 0;
    loop {
        let has_data = p < data.len() && data[p..data.len().min(p + PAGE)].iter().any(|&b| b != 0);
        match (has_data, run) {
            (true, None) => run = Some(p),
            (false, Some(s)) => {
                let end = p.min(data.len());
                file.write_all_at(&data[s..end], at + s as u64)?;
                written += (end - s) as u64;
                run = None;
            }
            _ => {}
        }
        if p >= data.len() {
            break;
        }
        p += PAGE;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    /// Runs are memory-file offsets over the regions laid end to end: one
    /// across a region boundary is split; a run off the end or not whole
    /// pages (a damaged Diff) is refused.
    #[test]
    fn page_runs_map_onto_regions_and_bad_ones_are_refused() {
        let mem = arch::GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x2000),
            (GuestAddress(0x10_0000), 0x3000),
        ])
        .unwrap();
        let mut seen = Vec::new();
        for_each_piece(
            &mem,
            &[(0x1000, 0x2000), (0x4000, 0x1000)],
            |r, start, at, len| {
                seen.push((r.start_addr().0, start, at, len));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (0, 0x1000, 0x1000, 0x1000),
                (0x10_0000, 0, 0x2000, 0x1000),
                (0x10_0000, 0x2000, 0x4000, 0x1000),
            ]
        );
        for bad in [
            (0x4000, 0x2000),
            (0x800, 0x1000),
            (0, 0x10),
            (u64::MAX - 0xfff, 0x1000),
        ] {
            let e = for_each_piece(&mem, &[bad], |_, _, _, _| Ok(())).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{bad:x?}");
        }
    }
}
