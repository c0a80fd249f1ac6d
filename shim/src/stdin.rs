//! The container's stdin: containerd's FIFO copied into a pipe that
//! `capsule exec` reads, so that the shim can close it (`close_io`: the
//! process in the guest then reads end-of-file) even while containerd's
//! client still holds the FIFO open, as runc's shim closes the process's
//! stdin pipe.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A pipe, both ends close-on-exec (the child gets its end through
/// `Stdio`, which duplicates it).
fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is two writable ints, as pipe2 needs.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just opened both descriptors; each is owned once.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((File::from(r), File::from(w)))
}

/// Closes the container's stdin when asked or dropped.
#[derive(Debug)]
pub struct StdinCloser {
    wake: Option<File>,
}

impl StdinCloser {
    /// Ends the copy: the process reads end-of-file once what was copied
    /// is read. Returns at once (a copy blocked on a full pipe finishes
    /// its write first).
    pub fn close(&mut self) {
        self.wake = None;
    }
}

/// Starts copying `fifo` into a new pipe; returns the pipe's read end
/// (the child's stdin) and the closer. The copy ends at the FIFO's
/// end-of-file (no writer left), a write error (the child is gone), or
/// [`StdinCloser::close`].
pub fn copy(fifo: File) -> io::Result<(File, StdinCloser)> {
    let (child_end, ours) = pipe()?;
    let (stop_r, stop_w) = pipe()?;
    std::thread::Builder::new()
        .name("stdin-copy".into())
        .spawn(move || {
            if let Err(e) = pump(fifo, ours, &stop_r) {
                log::debug!("container stdin copy ended: {e}");
            }
        })?;
    Ok((child_end, StdinCloser { wake: Some(stop_w) }))
}

/// Copies until end-of-file on `from` or until `stop` is readable (its
/// writer closed); dropping `to` then closes the child's stdin.
fn pump(mut from: File, mut to: File, stop: &File) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: from.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is two valid pollfd entries.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let stopped = fds[1].revents != 0;
        // Asked to stop: what the client wrote before is still copied.
        while fds[0].revents != 0 {
            match from.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => to.write_all(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if !stopped {
                break;
            }
            fds[0].revents = 0;
            // SAFETY: one valid pollfd entry; no wait.
            if unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if stopped {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Reads `r` until end-of-file, in a thread, to see whether it comes.
    fn reader(mut r: File) -> std::sync::mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let _ = r.read_to_end(&mut got);
            let _ = tx.send(got);
        });
        rx
    }

    #[test]
    fn close_gives_end_of_file_while_the_writer_stays_open() {
        let (fifo_r, mut client) = pipe().unwrap();
        let (child, mut closer) = copy(fifo_r).unwrap();
        let done = reader(child);
        client.write_all(b"line\n").unwrap();
        // containerd's client keeps its end open: no end-of-file yet.
        assert!(done.recv_timeout(Duration::from_millis(300)).is_err());
        // What is written right before the close still arrives.
        client.write_all(b"last\n").unwrap();
        closer.close();
        let got = done.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(got, b"line\nlast\n");
        drop(client);
    }

    #[test]
    fn the_fifo_s_end_of_file_is_the_child_s() {
        let (fifo_r, mut client) = pipe().unwrap();
        let (child, _closer) = copy(fifo_r).unwrap();
        let done = reader(child);
        client.write_all(&[7u8; 200_000]).unwrap();
        drop(client);
        let got = done.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(got, vec![7u8; 200_000]);
    }
}
