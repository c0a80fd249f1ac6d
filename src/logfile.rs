//! Size-capped log files for detached VMs (`run -d`): `console.log` and
//! `vmm.log` in the VM's runtime directory, which lives on a tmpfs such as
//! `/run`. A guest printing without end must not fill it: when a file
//! passes [`max_size`] it is renamed to `NAME.1` (replacing the previous
//! one) and a new `NAME` is started, so each log takes at most twice the
//! cap (plus one write).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The default cap of each detached log file.
pub const DEFAULT_MAX_SIZE: u64 = 8 << 20;

/// The environment variable that overrides the cap (bytes; the tests use
/// a small one).
pub const MAX_SIZE_ENV: &str = "CAPSULE_DETACHED_LOG_MAX";

/// The cap: `CAPSULE_DETACHED_LOG_MAX` bytes if set to a positive number,
/// else [`DEFAULT_MAX_SIZE`].
pub fn max_size() -> u64 {
    std::env::var(MAX_SIZE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_MAX_SIZE)
}

/// `path` with `.1` appended: where the older half of a log goes.
pub fn rotated(path: &Path) -> PathBuf {
    with_suffix(path, ".1")
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// `path` with `suffix` appended.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Moves `path` to `path.1` and opens a new, empty `path`, so that both
/// names exist at every instant once a first rotation is done: a reader
/// (`capsule logs`, a user's `tail`) never finds the log missing. The
/// new file is made beside the log and swapped with it in one
/// `renameat2(RENAME_EXCHANGE)`; the old one, now under the new file's
/// name, then replaces `path.1` by a plain (atomic) rename. Between the
/// two, `path.1` still holds the rotation before, so a reader may miss
/// the newest old bytes for an instant, never the log. Only `openat` and
/// the rename calls are used: the seccomp filters of every thread that
/// logs allow those. A file system without the exchange gets a rename
/// and a new file (a short gap).
fn rotate(path: &Path) -> io::Result<File> {
    let fresh = with_suffix(path, ".new");
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_TRUNC)
        .open(&fresh)?;
    if exchange(&fresh, path).is_err() {
        std::fs::rename(path, rotated(path))?;
        std::fs::rename(&fresh, path)?;
        return Ok(file);
    }
    std::fs::rename(&fresh, rotated(path))?;
    Ok(file)
}

/// Swaps the two names atomically.
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let a = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let b = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive
    // the call; renameat2 only reads them.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An append-only file that rotates itself at a size cap.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    max: u64,
}

impl RotatingFile {
    /// Opens (creates) `path` for appending, rotating at `max` bytes.
    pub fn open(path: &Path, max: u64) -> io::Result<Self> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size,
            max,
        })
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.size >= self.max {
            // A failed rotation (someone removed the directory) keeps
            // writing where it was rather than losing the console.
            if let Ok(f) = rotate(&self.path) {
                self.file = f;
                self.size = 0;
            }
        }
        let n = self.file.write(buf)?;
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// The file standard error points at, when it is a capped log.
static STDERR_LOG: Mutex<Option<(PathBuf, u64)>> = Mutex::new(None);

/// Points standard error at `path` (appending), to be rotated at `max`
/// bytes by [`check_stderr`].
pub fn redirect_stderr(path: &Path, max: u64) -> io::Result<()> {
    let f = open_append(path)?;
    dup_to_stderr(&f)?;
    *STDERR_LOG.lock().unwrap_or_else(|e| e.into_inner()) = Some((path.to_path_buf(), max));
    Ok(())
}

fn dup_to_stderr(f: &File) -> io::Result<()> {
    // SAFETY: dup2 of two valid descriptors; fd 2 is replaced atomically,
    // so a concurrent write goes to either the old or the new file.
    if unsafe { libc::dup2(f.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Rotates the standard-error log if it has passed its cap. The logger
/// calls this after each line, so the log overshoots by at most one line
/// (capsule's own messages a guest can trigger are rate-limited).
pub fn check_stderr() {
    let guard = STDERR_LOG.lock().unwrap_or_else(|e| e.into_inner());
    let Some((path, max)) = guard.as_ref() else {
        return;
    };
    // SAFETY: fstat fills a plain struct for a valid descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `st` is a valid, writable stat.
    if unsafe { libc::fstat(libc::STDERR_FILENO, &mut st) } != 0 || (st.st_size as u64) < *max {
        return;
    }
    if let Ok(f) = rotate(path) {
        let _ = dup_to_stderr(&f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader polling the log while it rotates over and over always
    /// finds both names once the first rotation is done (the CI failure
    /// of 2026-12-05: `console.log` was missing between the rename and
    /// the new file's creation).
    #[test]
    fn the_log_never_disappears_while_it_rotates() {
        let dir = std::env::temp_dir().join(format!("capsule-logrot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vmm.log");
        let mut f = RotatingFile::open(&path, 64).unwrap();
        f.write_all(&[b'x'; 100]).unwrap();
        f.write_all(b"y").unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut misses = 0;
                let mut looks = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    looks += 1;
                    if !path.exists() || !rotated(&path).exists() {
                        misses += 1;
                    }
                }
                (misses, looks)
            });
            for _ in 0..20_000 {
                f.write_all(&[b'z'; 70]).unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            let (misses, looks) = reader.join().unwrap();
            assert_eq!(misses, 0, "missing in {misses} of {looks} looks");
        });
        assert!(!with_suffix(&path, ".new").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotates_at_the_cap_and_keeps_one_old_file() {
        let dir = std::env::temp_dir().join(format!("capsule-logfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let mut f = RotatingFile::open(&path, 1000).unwrap();
        for i in 0..10_000u32 {
            f.write_all(format!("{i:09}\n").as_bytes()).unwrap();
        }
        let cur = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(rotated(&path)).unwrap();
        assert!(
            cur.len() <= 1000 && old.len() <= 1000,
            "{} {}",
            cur.len(),
            old.len()
        );
        // The newest lines are kept, in order, across the two files.
        assert!(cur.ends_with("000009999\n"), "{cur}");
        let both = old + &cur;
        let first: u32 = both[..9].parse().unwrap();
        let expect: String = (first..10_000).map(|i| format!("{i:09}\n")).collect();
        assert_eq!(both, expect);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
