use std::io::Write;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::vstate::memory::GuestRam;

const HIMEM: u64 = 0x10_0000;
const MIB: u64 = 1 << 20;

/// A little x86-64 ELF file: entry `entry`, and per segment
/// (file offset, paddr, file bytes, memory size); the bytes are filled
/// with a pattern of the file offset.
fn elf(entry: u64, segs: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let mut f = vec![0u8; 64 + 56 * segs.len()];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    f[24..32].copy_from_slice(&entry.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
    for (i, &(offset, paddr, filesz, memsz)) in segs.iter().enumerate() {
        let ph = &mut f[64 + 56 * i..64 + 56 * (i + 1)];
        ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[8..16].copy_from_slice(&offset.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&filesz.to_le_bytes());
        ph[40..48].copy_from_slice(&memsz.to_le_bytes());
    }
    let end = segs.iter().map(|s| s.0 + s.2).max().unwrap_or(0) as usize;
    let len = f.len().max(end).next_multiple_of(PAGE as usize);
    f.resize(len, 0);
    for &(offset, _, filesz, _) in segs {
        for i in offset..offset + filesz {
            f[i as usize] = pattern(i);
        }
    }
    f
}

fn pattern(offset: u64) -> u8 {
    (offset * 7 % 251) as u8 + 1
}

fn parse(file: &[u8]) -> Option<(u64, Vec<Segment>)> {
    let mut ehdr = [0u8; 64];
    ehdr.copy_from_slice(&file[..64]);
    let read = |off: u64, len: u64| {
        file.get(off as usize..(off + len) as usize)
            .map(<[u8]>::to_vec)
    };
    segments(&ehdr, read, file.len() as u64, HIMEM)
}

#[test]
fn segments_are_read_and_sorted_by_address() {
    let f = elf(
        2 * MIB,
        &[
            (0x3000, 3 * MIB, 0x1800, 0x5000),
            (0x1000, 2 * MIB, 0x1000, 0x1000),
        ],
    );
    let (entry, segs) = parse(&f).unwrap();
    assert_eq!(entry, 2 * MIB);
    let addrs: Vec<u64> = segs.iter().map(|s| s.paddr).collect();
    assert_eq!(addrs, [2 * MIB, 3 * MIB]);
}

#[test]
fn layouts_that_do_not_map_page_for_page_are_refused() {
    // File offset and address disagree within the page.
    assert!(parse(&elf(2 * MIB, &[(0x1010, 2 * MIB, 0x100, 0x100)])).is_none());
    // Two segments share a page.
    let shared = [
        (0x1000, 2 * MIB, 0x800, 0x800),
        (0x1800, 2 * MIB + 0x800, 0x100, 0x100),
    ];
    assert!(parse(&elf(2 * MIB, &shared)).is_none());
    // Below high memory, entry or segment.
    assert!(parse(&elf(0x1000, &[(0x1000, 2 * MIB, 0x100, 0x100)])).is_none());
    assert!(parse(&elf(2 * MIB, &[(0x1000, 0x1000, 0x100, 0x100)])).is_none());
    // More file bytes than memory.
    assert!(parse(&elf(2 * MIB, &[(0x1000, 2 * MIB, 0x200, 0x100)])).is_none());
    // No loadable bytes at all.
    assert!(parse(&elf(2 * MIB, &[])).is_none());
}

#[test]
fn hostile_headers_are_refused() {
    let good = elf(2 * MIB, &[(0x1000, 2 * MIB, 0x100, 0x100)]);
    // Bytes past the file's end.
    let mut past = good.clone();
    past[64 + 32..64 + 40].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(parse(&past).is_none());
    // An address that wraps.
    let mut wrap = good.clone();
    wrap[64 + 24..64 + 32].copy_from_slice(&(u64::MAX - 0xfff).to_le_bytes());
    wrap[64 + 8..64 + 16].copy_from_slice(&0u64.to_le_bytes());
    assert!(parse(&wrap).is_none());
    // A program header table past the end, or of an odd entry size.
    let mut table = good.clone();
    table[32..40].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(parse(&table).is_none());
    let mut size = good.clone();
    size[54..56].copy_from_slice(&32u16.to_le_bytes());
    assert!(parse(&size).is_none());
    // Not x86-64, not 64-bit, not ELF.
    for (at, byte) in [(18, 3u8), (4, 1), (0, 0)] {
        let mut bad = good.clone();
        bad[at] = byte;
        assert!(parse(&bad).is_none());
    }
}

/// A kernel file in the temporary directory, removed when dropped.
struct TempKernel(std::path::PathBuf);

impl TempKernel {
    fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("capsule-kernel-map-{}-{n}", std::process::id());
        Self(std::env::temp_dir().join(name))
    }
}

impl std::ops::Deref for TempKernel {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempKernel {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A temporary kernel file with `bytes` (closed: no writer holds it
/// open), and guest RAM of 8 MiB.
fn setup(bytes: &[u8]) -> (TempKernel, GuestRam) {
    let file = TempKernel::new();
    std::fs::write(&*file, bytes).unwrap();
    let ram = GuestRam::new(&[(GuestAddress(0), 8 * MIB as usize)]).unwrap();
    (file, ram)
}

/// Two segments: 6 KiB at 2 MiB + 0x200 (bss up to 16 KiB), and 4 KiB at
/// 3 MiB.
fn two_segments() -> Vec<u8> {
    elf(
        2 * MIB,
        &[
            (0x1200, 2 * MIB + 0x200, 0x1800, 0x4000),
            (0x4000, 3 * MIB, 0x1000, 0x1000),
        ],
    )
}

/// Checks guest RAM holds what a copying loader would have put there.
fn assert_loaded(ram: &GuestRam) {
    let mem = ram.memory();
    let mut seg = vec![0u8; 0x4000 + 0x200];
    mem.read_slice(&mut seg, GuestAddress(2 * MIB)).unwrap();
    assert!(seg[..0x200].iter().all(|&b| b == 0), "before the segment");
    for (i, &b) in seg[0x200..0x1a00].iter().enumerate() {
        assert_eq!(b, pattern(0x1200 + i as u64), "segment byte {i}");
    }
    assert!(seg[0x1a00..].iter().all(|&b| b == 0), "bss");
    let mut two = vec![0u8; 0x1000];
    mem.read_slice(&mut two, GuestAddress(3 * MIB)).unwrap();
    assert_eq!(two[0x10], pattern(0x4010));
}

/// The pathname column of the mapping at `addr` in /proc/self/maps.
fn mapped_file(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let range = line.split_whitespace().next().unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            usize::from_str_radix(a, 16).unwrap(),
            usize::from_str_radix(b, 16).unwrap(),
        );
        if (a..b).contains(&addr) {
            return line.split_whitespace().nth(5).unwrap_or("").to_string();
        }
    }
    panic!("{addr:#x} is not mapped");
}

/// Opens `file` read-only, after checking a read lease can be had on it
/// at all: a temporary directory on a filesystem without leases fails
/// these tests loudly instead of letting them pass on the copying path.
fn open_leasable(file: &TempKernel) -> File {
    let f = File::open(&**file).unwrap();
    // SAFETY: fcntl on a descriptor the test owns.
    let ok = unsafe {
        let ok = libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) == 0;
        libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK);
        ok
    };
    assert!(
        ok,
        "no read lease on {}: {} (set TMPDIR to a local filesystem)",
        file.display(),
        std::io::Error::last_os_error()
    );
    f
}

#[test]
fn mapped_kernel_reads_like_a_copied_one_and_writes_stay_private() {
    let (file, ram) = setup(&two_segments());
    let f = open_leasable(&file);
    let (kmap, entry) = KernelMap::new(ram.memory(), &f, HIMEM).unwrap();
    assert_eq!(entry, 2 * MIB);
    assert_eq!(kmap.mapped_bytes(), 0x2000 + 0x1000);
    let host = ram
        .memory()
        .get_host_address(GuestAddress(3 * MIB))
        .unwrap() as usize;
    assert!(mapped_file(host).ends_with(&*file.to_string_lossy()));
    assert_loaded(&ram);
    // A guest write changes guest RAM, not the file.
    ram.memory()
        .write_obj(0xffu8, GuestAddress(3 * MIB + 0x10))
        .unwrap();
    let on_disk = std::fs::read(&*file).unwrap();
    assert_eq!(on_disk[0x4010], pattern(0x4010));

    kmap.settle().unwrap();
    assert_eq!(mapped_file(host), "", "anonymous after settling");
    // Guest RAM keeps both the file's bytes and the guest's write, and
    // the file can now change without the guest seeing it.
    std::fs::write(&*file, b"").unwrap();
    let mut two = vec![0u8; 0x20];
    ram.memory()
        .read_slice(&mut two, GuestAddress(3 * MIB))
        .unwrap();
    assert_eq!(two[0x10], 0xff);
    assert_eq!(two[0x11], pattern(0x4011));
    let mut seg = [0u8; 4];
    ram.memory()
        .read_slice(&mut seg, GuestAddress(2 * MIB + 0x200))
        .unwrap();
    assert_eq!(seg[0], pattern(0x1200));
}

#[test]
fn a_writer_waits_for_the_lease_break_and_the_guest_keeps_its_kernel() {
    let (file, ram) = setup(&two_segments());
    let f = open_leasable(&file);
    let (kmap, _) = KernelMap::new(ram.memory(), &f, HIMEM).unwrap();
    let watcher = kmap.watcher().unwrap();
    assert!(!kmap.wants_settle());
    // Another "process" truncates the file: its open blocks on the lease
    // break until the map settles.
    let path = file.to_path_buf();
    let writer = std::thread::spawn(move || {
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .map(|_| std::time::Instant::now())
    });
    let mut woken = false;
    for _ in 0..500 {
        if watcher.wake.read().is_ok() {
            woken = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(woken, "SIGIO did not wake the watcher");
    watcher.woken.store(true, Ordering::SeqCst);
    assert!(kmap.wants_settle());
    assert!(
        !writer.is_finished(),
        "the writer did not wait for the lease"
    );
    let settled = std::time::Instant::now();
    kmap.settle().unwrap();
    let opened = writer.join().unwrap().unwrap();
    assert!(opened >= settled);
    assert_eq!(std::fs::metadata(&*file).unwrap().len(), 0);
    assert_loaded(&ram);
}

#[test]
fn a_kernel_that_cannot_be_mapped_leaves_guest_ram_untouched() {
    // Segments sharing a page: refused before anything is mapped.
    let shared = elf(
        2 * MIB,
        &[
            (0x1000, 2 * MIB, 0x800, 0x800),
            (0x1800, 2 * MIB + 0x800, 0x100, 0x100),
        ],
    );
    let (file, ram) = setup(&shared);
    let f = open_leasable(&file);
    assert!(matches!(
        KernelMap::new(ram.memory(), &f, HIMEM),
        Err(NotMapped::Layout)
    ));
    // A segment past the end of guest RAM: refused as well.
    let past = elf(2 * MIB, &[(0x1000, 8 * MIB - 0x1000, 0x2000, 0x2000)]);
    let (file, ram) = setup(&past);
    let f = open_leasable(&file);
    assert!(matches!(
        KernelMap::new(ram.memory(), &f, HIMEM),
        Err(NotMapped::Memory)
    ));
    let host = ram
        .memory()
        .get_host_address(GuestAddress(2 * MIB))
        .unwrap() as usize;
    assert_eq!(mapped_file(host), "");
    // No lease is left behind: a non-blocking open for writing, which
    // fails with EWOULDBLOCK on a leased file, succeeds.
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&*file)
        .expect("a lease was left on the file");
}

#[test]
fn a_file_open_for_writing_gets_no_lease() {
    let (file, ram) = setup(&two_segments());
    let mut writer = std::fs::OpenOptions::new()
        .append(true)
        .open(&*file)
        .unwrap();
    writer.write_all(b"").unwrap();
    let f = File::open(&*file).unwrap();
    // `writer` has the file open for writing.
    assert!(matches!(
        KernelMap::new(ram.memory(), &f, HIMEM),
        Err(NotMapped::Lease(_))
    ));
}
