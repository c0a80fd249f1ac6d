//! The copy-on-write ephemeral image: a read-only base plus an anonymous
//! overlay file that takes the guest's writes and vanishes with capsule.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::disk::{file_len, open_image, zero_range, DiskImage, SECTOR_SIZE};
use super::lock::lock_image;
use super::BlockError;

/// A read-only base image plus an anonymous, sparse overlay file that takes
/// every write. The base is never written; the overlay is unlinked from the
/// start, so it disappears when capsule exits.
#[derive(Debug)]
pub struct EphemeralImage {
    base: File,
    overlay: File,
    len: u64,
    /// Which sectors live in the overlay.
    written: SectorBitmap,
}

/// Sectors per second-level bitmap block (2 MiB of disk).
const BITMAP_BLOCK_SECTORS: u64 = 64 * 64;

/// A sparse bitmap with one bit per sector: second-level blocks are only
/// allocated once a sector in their range is written, so a large image that
/// the guest barely touches costs a few bytes per 2 MiB.
#[derive(Debug)]
struct SectorBitmap {
    blocks: Vec<Option<Box<[u64; 64]>>>,
}

impl SectorBitmap {
    fn new(sectors: u64) -> Option<Self> {
        let n = usize::try_from(sectors.div_ceil(BITMAP_BLOCK_SECTORS)).ok()?;
        Some(Self {
            blocks: std::iter::repeat_with(|| None).take(n).collect(),
        })
    }

    fn position(sector: u64) -> (usize, usize, u64) {
        let block = (sector / BITMAP_BLOCK_SECTORS) as usize;
        let bit = sector % BITMAP_BLOCK_SECTORS;
        (block, (bit / 64) as usize, 1 << (bit % 64))
    }

    fn get(&self, sector: u64) -> bool {
        let (b, w, mask) = Self::position(sector);
        matches!(self.blocks.get(b), Some(Some(words)) if words[w] & mask != 0)
    }

    fn set(&mut self, sector: u64) {
        let (b, w, mask) = Self::position(sector);
        if let Some(slot) = self.blocks.get_mut(b) {
            slot.get_or_insert_with(|| Box::new([0; 64]))[w] |= mask;
        }
    }
}

/// Creates an unnamed temporary file in `dir`: with `O_TMPFILE`, or where
/// the file system lacks it (or `named` asks for that path), as a new
/// file with a random name that is unlinked at once, before anything is
/// written to it, so no name is left behind even if capsule is killed.
/// Close-on-exec either way (the standard library's default).
fn anonymous_file(dir: &Path, named: bool) -> io::Result<File> {
    if !named {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o600)
            .open(dir)
        {
            Ok(f) => return Ok(f),
            Err(e) => log::debug!("O_TMPFILE in {}: {e}; using a named file", dir.display()),
        }
    }
    for _ in 0..16 {
        let name = dir.join(format!("capsule-overlay-{:016x}", random_u64()?));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&name)
        {
            Ok(f) => {
                std::fs::remove_file(&name)?;
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free overlay file name",
    ))
}

/// Eight random bytes from the kernel.
fn random_u64() -> io::Result<u64> {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from_ne_bytes(b))
}

impl EphemeralImage {
    /// Opens `path` read-only with a shared lock and creates the overlay.
    pub fn open(path: &Path) -> Result<Self, BlockError> {
        let mut base = open_image(path, false)?;
        lock_image(&base, false, path)?;
        let len = file_len(&mut base).map_err(|source| BlockError::Size {
            path: path.to_path_buf(),
            source,
        })?;
        let overlay = anonymous_file(&std::env::temp_dir(), false)
            .and_then(|f| f.set_len(len).map(|()| f))
            .map_err(|source| BlockError::Overlay {
                path: path.to_path_buf(),
                source,
            })?;
        let written =
            SectorBitmap::new(len.div_ceil(SECTOR_SIZE)).ok_or_else(|| BlockError::Size {
                path: PathBuf::from(path),
                source: io::Error::other("image too large"),
            })?;
        Ok(Self {
            base,
            overlay,
            len,
            written,
        })
    }

    fn is_written(&self, sector: u64) -> bool {
        self.written.get(sector)
    }

    fn mark_written(&mut self, sector: u64) {
        self.written.set(sector);
    }

    /// Copies the base sector into the overlay if it is not there yet
    /// (before a partial write to it).
    fn copy_up(&mut self, sector: u64) -> io::Result<()> {
        if self.is_written(sector) {
            return Ok(());
        }
        let start = sector * SECTOR_SIZE;
        let n = crate::usize_from(SECTOR_SIZE.min(self.len - start));
        let mut buf = [0u8; crate::usize_from(SECTOR_SIZE)];
        self.base.read_exact_at(&mut buf[..n], start)?;
        self.overlay.write_all_at(&buf[..n], start)?;
        self.mark_written(sector);
        Ok(())
    }

    /// Validates a range and returns its first and last sector (inclusive).
    fn sectors(&self, offset: u64, len: u64) -> io::Result<(u64, u64)> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "beyond end of disk"))?;
        Ok((offset / SECTOR_SIZE, (end - 1) / SECTOR_SIZE))
    }

    /// Prepares a write to `[offset, offset + len)`: copies up partially
    /// covered edge sectors.
    fn prepare_write(&mut self, offset: u64, len: u64) -> io::Result<(u64, u64)> {
        let (first, last) = self.sectors(offset, len)?;
        if !offset.is_multiple_of(SECTOR_SIZE) {
            self.copy_up(first)?;
        }
        let end = offset + len;
        if !end.is_multiple_of(SECTOR_SIZE) && end != self.len {
            self.copy_up(last)?;
        }
        Ok((first, last))
    }
}

/// Copies `[start, start + len)` of `from` to the same offsets of `to`.
fn copy_range(from: &File, to: &File, start: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = crate::usize_from((len - done).min(buf.len() as u64));
        from.read_exact_at(&mut buf[..n], start + done)?;
        to.write_all_at(&buf[..n], start + done)?;
        done += n as u64;
    }
    Ok(())
}

impl EphemeralImage {
    /// The written sectors as (first, count) runs, in order.
    fn written_runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (b, block) in self.written.blocks.iter().enumerate() {
            let Some(words) = block else { continue };
            for (w, &word) in words.iter().enumerate() {
                for bit in 0..64 {
                    if word & (1 << bit) == 0 {
                        continue;
                    }
                    let sector = b as u64 * BITMAP_BLOCK_SECTORS + w as u64 * 64 + bit;
                    match runs.last_mut() {
                        Some((first, count)) if *first + *count == sector => *count += 1,
                        _ => runs.push((sector, 1)),
                    }
                }
            }
        }
        runs
    }
}

impl DiskImage for EphemeralImage {
    fn len(&self) -> u64 {
        self.len
    }

    fn save_overlay(&self, out: &File) -> io::Result<Vec<(u64, u64)>> {
        out.set_len(self.len)?;
        let runs = self.written_runs();
        for &(first, count) in &runs {
            let start = first * SECTOR_SIZE;
            let len = (count * SECTOR_SIZE).min(self.len - start);
            copy_range(&self.overlay, out, start, len)?;
        }
        Ok(runs)
    }

    fn restore_overlay(&mut self, from: &File, runs: &[(u64, u64)]) -> io::Result<()> {
        let sectors = self.len.div_ceil(SECTOR_SIZE);
        for &(first, count) in runs {
            let end = first.checked_add(count).filter(|&e| e <= sectors);
            if end.is_none() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "overlay run beyond the end of the disk",
                ));
            }
        }
        for &(first, count) in runs {
            let start = first * SECTOR_SIZE;
            let len = (count * SECTOR_SIZE).min(self.len - start);
            copy_range(from, &self.overlay, start, len)?;
            for s in first..first + count {
                self.mark_written(s);
            }
        }
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        false
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.sectors(offset, buf.len() as u64)?;
        // Split into runs of sectors that all come from the same file.
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let from_overlay = self.is_written(pos / SECTOR_SIZE);
            let mut run_end = (pos / SECTOR_SIZE + 1) * SECTOR_SIZE;
            let end = offset + buf.len() as u64;
            while run_end < end && self.is_written(run_end / SECTOR_SIZE) == from_overlay {
                run_end += SECTOR_SIZE;
            }
            let n = crate::usize_from(run_end.min(end) - pos);
            let file = if from_overlay {
                &self.overlay
            } else {
                &self.base
            };
            file.read_exact_at(&mut buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (first, last) = self.prepare_write(offset, buf.len() as u64)?;
        self.overlay.write_all_at(buf, offset)?;
        for s in first..=last {
            self.mark_written(s);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Nothing outlives the process, so there is nothing to make durable.
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        // Reading zeroes is a valid outcome of a discard. Punching the
        // range out of the overlay gives its space back, so a guest cannot
        // pin host memory on a tmpfs $TMPDIR with data it has discarded.
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (first, last) = self.prepare_write(offset, len)?;
        // Punching a hole in the overlay frees its space and reads as zeroes.
        zero_range(&self.overlay, offset, len, true)?;
        for s in first..=last {
            self.mark_written(s);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::disk::tests::{image_with, pattern};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn ephemeral_keeps_base_untouched() {
        // An odd size exercises the partial last sector.
        let base = pattern(5000);
        let tmp = image_with(&base);
        let mut img = EphemeralImage::open(tmp.as_path()).unwrap();
        assert_eq!(img.len(), 5000);
        let mut want = base.clone();

        img.write_at(&[0x11; 512], 512).unwrap();
        want[512..1024].fill(0x11);
        // Unaligned, spanning three sectors.
        img.write_at(&[0x22; 700], 1900).unwrap();
        want[1900..2600].fill(0x22);
        // The partial tail sector.
        img.write_at(&[0x33; 8], 4990).unwrap();
        want[4990..4998].fill(0x33);
        img.write_zeroes(3000, 1000, true).unwrap();
        want[3000..4000].fill(0);
        // A discarded sector reads as zeroes (its overlay space is freed).
        img.discard(0, 512).unwrap();
        want[..512].fill(0);
        img.flush().unwrap();

        let mut buf = vec![0; 5000];
        img.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, want);
        // Reads straddling overlay and base sectors.
        let mut small = vec![0; 300];
        img.read_at(&mut small, 1800).unwrap();
        assert_eq!(small, want[1800..2100]);
        assert!(img.read_at(&mut small, 4800).is_err());
        assert!(img.write_at(&[0; 2], 4999).is_err());

        assert_eq!(std::fs::read(tmp.as_path()).unwrap(), base);
        drop(img);
        assert_eq!(std::fs::read(tmp.as_path()).unwrap(), base);
    }

    /// A snapshot's overlay copy restores the guest's writes into a new
    /// ephemeral image over the same base, and nothing else.
    #[test]
    fn overlay_survives_save_and_restore() {
        let base = pattern(8192);
        let tmp = image_with(&base);
        let mut img = EphemeralImage::open(tmp.as_path()).unwrap();
        img.write_at(&[0x44; 1024], 1024).unwrap();
        img.write_at(&[0x55; 10], 7000).unwrap();
        let mut want = base.clone();
        want[1024..2048].fill(0x44);
        want[7000..7010].fill(0x55);
        let saved = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let runs = img.save_overlay(saved.as_file()).unwrap();
        assert_eq!(runs, vec![(2, 2), (13, 1)]);

        let mut copy = EphemeralImage::open(tmp.as_path()).unwrap();
        copy.restore_overlay(saved.as_file(), &runs).unwrap();
        let mut buf = vec![0; 8192];
        copy.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, want);
        assert_eq!(std::fs::read(tmp.as_path()).unwrap(), base);
        // Runs past the end of the disk are refused.
        let mut other = EphemeralImage::open(tmp.as_path()).unwrap();
        assert!(other.restore_overlay(saved.as_file(), &[(15, 2)]).is_err());
        // A raw image has nothing to restore into.
        let mut raw = super::super::disk::RawImage::open(tmp.as_path(), true).unwrap();
        assert!(raw.restore_overlay(saved.as_file(), &runs).is_err());
        assert!(raw.save_overlay(saved.as_file()).unwrap().is_empty());
    }

    #[test]
    fn sector_bitmap_is_sparse() {
        let mut bm = SectorBitmap::new(1 << 31).unwrap(); // a 1 TiB image
        assert_eq!(bm.blocks.len(), (1 << 31) / BITMAP_BLOCK_SECTORS as usize);
        for s in [0, 63, 64, 4095, 4096, (1 << 31) - 1] {
            assert!(!bm.get(s));
            bm.set(s);
            assert!(bm.get(s));
        }
        assert!(!bm.get(1) && !bm.get(4097) && !bm.get(1 << 31));
        bm.set(1 << 31); // out of range: ignored
        assert_eq!(bm.blocks.iter().filter(|b| b.is_some()).count(), 3);
    }

    /// Without O_TMPFILE the overlay is a named file unlinked at once: no
    /// name is left in the directory, and it is close-on-exec.
    #[test]
    fn named_overlay_fallback_leaves_no_name() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let f = anonymous_file(dir.as_path(), true).unwrap();
        assert_eq!(std::fs::read_dir(dir.as_path()).unwrap().count(), 0);
        assert_eq!(f.metadata().unwrap().nlink(), 0);
        f.write_all_at(b"overlay", 4096).unwrap();
        let mut b = [0u8; 7];
        f.read_exact_at(&mut b, 4096).unwrap();
        assert_eq!(&b, b"overlay");
        // SAFETY: F_GETFD on a descriptor we own.
        let flags =
            unsafe { libc::fcntl(std::os::unix::io::AsRawFd::as_raw_fd(&f), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        // The O_TMPFILE path gives the same.
        let g = anonymous_file(dir.as_path(), false).unwrap();
        assert_eq!(g.metadata().unwrap().nlink(), 0);
        assert_eq!(std::fs::read_dir(dir.as_path()).unwrap().count(), 0);
    }

    /// A discard on an ephemeral disk gives the overlay's space back (a
    /// guest cannot pin host memory on a tmpfs $TMPDIR) and reads as zeroes.
    #[test]
    fn ephemeral_discard_frees_overlay_space() {
        let tmp = image_with(&pattern(4 << 20));
        let mut img = EphemeralImage::open(tmp.as_path()).unwrap();
        img.write_at(&vec![0x5a; 2 << 20], 1 << 20).unwrap();
        img.flush().unwrap();
        let blocks = |img: &EphemeralImage| img.overlay.metadata().unwrap().blocks();
        let before = blocks(&img);
        assert!(
            before >= (2 << 20) / 512,
            "written data takes space: {before}"
        );
        img.discard(1 << 20, 2 << 20).unwrap();
        let after = blocks(&img);
        assert!(
            after < before / 8,
            "discard freed the overlay: {before} -> {after} blocks"
        );
        let mut buf = vec![1u8; 2 << 20];
        img.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        // Outside the range the base still shows.
        let mut head = vec![0u8; 4096];
        img.read_at(&mut head, 0).unwrap();
        assert_eq!(head, pattern(4 << 20)[..4096]);
        assert_eq!(std::fs::read(tmp.as_path()).unwrap(), pattern(4 << 20));
    }
}
