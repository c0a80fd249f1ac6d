//! Opening host files a user or an API client names (kernel, initrd,
//! `--config-file`, `serial_out_path`, `log_path`) without letting the
//! file's type hang capsule.
//!
//! `open(2)` of a FIFO blocks until the other end is opened too, so a FIFO
//! given as a kernel would hang the thread opening it forever (and on the
//! API's VMM thread, the whole VM). Every open here is `O_NONBLOCK`; the
//! file type is then checked with `fstat` on the open descriptor (no race
//! with a path swapped after a check), and `O_NONBLOCK` is cleared again
//! for regular files. Outputs may be FIFOs where that is useful
//! (`log_path`, `serial_out_path`): those stay non-blocking, and their
//! writers drop what a full FIFO cannot take instead of stalling
//! ([`DroppingWriter`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The kind of an opened output file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A regular file (written normally).
    File,
    /// A FIFO (non-blocking: a full FIFO drops what is written).
    Fifo,
}

fn type_name(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

fn wrong_type(ft: std::fs::FileType, want: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("it is {}, not {want}", type_name(ft)),
    )
}

/// Clears `O_NONBLOCK` on `file`.
fn set_blocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; only the status
    // flags change.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Opens a regular file for reading (kernel, initrd, configuration file).
/// Anything else — a FIFO, a directory, a device — is an error, at once.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let ft = file.metadata()?.file_type();
    if !ft.is_file() {
        return Err(wrong_type(ft, "a regular file"));
    }
    set_blocking(&file)?;
    Ok(file)
}

/// Reads a whole regular file (see [`open_regular`]).
pub fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    io::Read::read_to_end(&mut open_regular(path)?, &mut data)?;
    Ok(data)
}

/// Opens an output for appending: a regular file (created if missing) or
/// a FIFO that a reader has open (without one, `ENXIO` is reported as "no
/// process is reading the FIFO"). A FIFO stays non-blocking.
pub fn open_output(path: &Path) -> io::Result<(File, OutputKind)> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ENXIO) {
                io::Error::new(
                    io::ErrorKind::NotConnected,
                    "it is a FIFO and no process is reading it",
                )
            } else {
                e
            }
        })?;
    let ft = file.metadata()?.file_type();
    if ft.is_file() {
        set_blocking(&file)?;
        Ok((file, OutputKind::File))
    } else if ft.is_fifo() {
        Ok((file, OutputKind::Fifo))
    } else {
        Err(wrong_type(ft, "a regular file or a FIFO"))
    }
}

/// The atomic write size of a pipe: a write this long or shorter to a
/// non-blocking FIFO is taken whole or not at all.
pub const PIPE_BUF: usize = libc::PIPE_BUF;

/// A writer over a non-blocking output that never blocks: what a full
/// FIFO (or one whose reader went away) cannot take is dropped and
/// counted.
#[derive(Debug)]
pub struct DroppingWriter {
    file: File,
    what: &'static str,
    dropped: u64,
}

impl DroppingWriter {
    /// Wraps `file` (already non-blocking); `what` names it in the log.
    pub fn new(file: File, what: &'static str) -> Self {
        Self {
            file,
            what,
            dropped: 0,
        }
    }

    /// Bytes dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Writes what the file takes now; returns how many bytes were
    /// dropped.
    pub fn write_now(&mut self, buf: &[u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            match self.file.write(&buf[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let lost = buf.len() - done;
        self.dropped += lost as u64;
        lost
    }
}

impl Write for DroppingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let was = self.dropped;
        if self.write_now(buf) > 0 && was == 0 {
            log::warn!("{}: the FIFO is full or unread; dropping output", self.what);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for DroppingWriter {
    fn drop(&mut self) {
        if self.dropped > 0 {
            log::warn!(
                "{}: {} bytes dropped (the FIFO was full or unread)",
                self.what,
                self.dropped
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn fifo(tag: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("capsule-hostfile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: a valid path; mkfifo only creates a file.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        p
    }

    #[test]
    fn fifo_inputs_fail_at_once() {
        let p = fifo("in");
        let t = Instant::now();
        let e = open_regular(&p).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(e.to_string().contains("a FIFO"), "{e}");
        let e = open_regular(Path::new("/")).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let e = open_regular(Path::new("/dev/null")).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn fifo_output_without_reader_fails_and_with_one_never_blocks() {
        let p = fifo("out");
        let e = open_output(&p).unwrap_err();
        assert!(e.to_string().contains("no process is reading"), "{e}");
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&p)
            .unwrap();
        let (f, kind) = open_output(&p).unwrap();
        assert_eq!(kind, OutputKind::Fifo);
        let mut w = DroppingWriter::new(f, "test");
        let t = Instant::now();
        for _ in 0..100 {
            w.write_all(&[b'x'; 4096]).unwrap();
        }
        assert!(t.elapsed() < Duration::from_secs(1));
        // A pipe holds 64 KiB by default; the rest was dropped.
        assert!(
            w.dropped() > 0 && w.dropped() < 100 * 4096,
            "{}",
            w.dropped()
        );
        drop(reader);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn regular_output_is_created_and_blocking() {
        let p = std::env::temp_dir().join(format!("capsule-hostfile-reg-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let (f, kind) = open_output(&p).unwrap();
        assert_eq!(kind, OutputKind::File);
        // SAFETY: F_GETFL on a descriptor we own.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        std::fs::remove_file(&p).unwrap();
    }
}
