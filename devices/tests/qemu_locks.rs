//! capsule's disk image locks against QEMU's: a real `qemu-system-x86_64`
//! (stopped with `-S`, a virtio-blk device on the image) holds an image
//! while capsule opens it, and the other way round.
//!
//! Needs `qemu-system-x86_64` (Debian's qemu-system-x86, which
//! resources/install-deps.sh installs); without it the test fails.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures cast small, known values"
)]

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use devices::virtio::block::{BlockError, EphemeralImage, RawImage};

const QEMU: &str = "qemu-system-x86_64";

fn image(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let p = dir.join(format!("qemu-lock-{}-{name}.img", std::process::id()));
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    p
}

/// A QEMU process, killed when dropped (also when an assertion fails).
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu(img: &Path, read_only: bool) -> Qemu {
    let ro = if read_only { ",readonly=on" } else { "" };
    let child = Command::new(QEMU)
        .args([
            "-M",
            "microvm,accel=tcg",
            "-nodefaults",
            "-display",
            "none",
            "-S",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=d0{ro}",
            img.display()
        ))
        .args(["-device", "virtio-blk-device,drive=d0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {QEMU} (install qemu-system-x86): {e}"));
    Qemu(child)
}

/// How many OFD read locks on `img` cover byte `at` (/proc/locks lists
/// each open file description's apart).
fn read_locks_at(img: &Path, at: u64) -> usize {
    let ino = std::fs::metadata(img).unwrap().ino().to_string();
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let on_img = f
                .iter()
                .find(|x| x.matches(':').count() == 2)
                .is_some_and(|d| d.rsplit(':').next() == Some(ino.as_str()));
            let start = f[f.len() - 2].parse::<u64>().unwrap_or(u64::MAX);
            let end = f[f.len() - 1].parse::<u64>().unwrap_or(u64::MAX);
            l.contains("OFDLCK") && l.contains(" READ ") && on_img && start <= at && at <= end
        })
        .count()
}

/// Whether QEMU (writer or reader) has taken its final locks: a read lock
/// on byte 101 (write permission; capsule never holds one) for a writer,
/// one more read lock on byte 201 (others may not write) for a reader.
fn qemu_ready(img: &Path, read_only: bool, before_201: usize) -> bool {
    if read_only {
        read_locks_at(img, 201) > before_201
    } else {
        read_locks_at(img, 101) > 0
    }
}

/// Starts QEMU on `img` and waits until it holds its locks.
fn qemu_holding(img: &Path, read_only: bool) -> Qemu {
    let before = read_locks_at(img, 201);
    let mut q = qemu(img, read_only);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !qemu_ready(img, read_only, before) {
        if let Some(status) = q.0.try_wait().unwrap() {
            let mut err = String::new();
            q.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("{QEMU} exited ({status}) instead of holding the image: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "{QEMU} took no lock on the image"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    q
}

/// Starts QEMU on `img` and returns its error output if it is refused
/// (exits on its own), None if it runs.
fn qemu_refused(img: &Path, read_only: bool) -> Option<String> {
    let before = read_locks_at(img, 201);
    let mut q = qemu(img, read_only);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = q.0.try_wait().unwrap() {
            assert!(!status.success());
            let mut err = String::new();
            q.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            return Some(err);
        }
        // QEMU takes its locks while it sets up, before it waits (-S).
        if qemu_ready(img, read_only, before) || Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn locked<T: std::fmt::Debug>(r: Result<T, BlockError>) -> bool {
    matches!(r, Err(BlockError::Locked { .. }))
}

#[test]
fn capsule_and_qemu_exclude_each_other() {
    // QEMU writes the image: capsule may neither write nor read it.
    let img = image("qemu-rw");
    let q = qemu_holding(&img, false);
    assert!(
        locked(RawImage::open(&img, false)),
        "writable next to a QEMU writer"
    );
    assert!(
        locked(RawImage::open(&img, true)),
        "read-only next to a QEMU writer"
    );
    assert!(
        locked(EphemeralImage::open(&img)),
        "ephemeral next to a QEMU writer"
    );
    drop(q);
    RawImage::open(&img, false).expect("free again once QEMU is gone");

    // QEMU reads it: capsule may read, not write.
    let q = qemu_holding(&img, true);
    assert!(
        locked(RawImage::open(&img, false)),
        "writable next to a QEMU reader"
    );
    RawImage::open(&img, true).expect("two readers");
    EphemeralImage::open(&img).expect("a reader and an ephemeral disk");
    drop(q);

    // capsule writes it: QEMU is refused either way.
    let rw = RawImage::open(&img, false).unwrap();
    for read_only in [false, true] {
        let err = qemu_refused(&img, read_only)
            .unwrap_or_else(|| panic!("QEMU (read-only {read_only}) ran next to a capsule writer"));
        assert!(err.contains("lock"), "{err}");
    }
    drop(rw);

    // capsule reads it: QEMU may read, not write.
    let ro = RawImage::open(&img, true).unwrap();
    let err = qemu_refused(&img, false).expect("QEMU wrote next to a capsule reader");
    assert!(err.contains("lock"), "{err}");
    assert!(
        qemu_refused(&img, true).is_none(),
        "QEMU reader refused next to a capsule reader"
    );
    drop(ro);
    let _ = std::fs::remove_file(&img);
}
