//! The container's terminal (`process.terminal`): `capsule exec --tty`
//! runs the process on a pseudo-terminal in the guest and relays it over
//! its own stdin and stdout, so the shim gives capsule a terminal of its
//! own, as runc hands containerd a console. The host side is raw (the
//! guest's terminal does the line discipline); the shim copies its master
//! to the stdout FIFO and the stdin FIFO into it; `resize_pty` sets its
//! size and tells capsule with SIGWINCH, which capsule sends on to the
//! guest's terminal as a `Resize` frame.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;

use exec_proto::WinSize;

use crate::process::{open_stdio, Stdio3};

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A new raw pseudo-terminal of `size`: (master, slave), close-on-exec.
pub fn open_pty(size: WinSize) -> io::Result<(File, File)> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: a valid NUL-terminated path; the result is checked.
    let fd = check(unsafe { libc::open(c"/dev/ptmx".as_ptr(), flags) })?;
    // SAFETY: a fresh descriptor this function owns.
    let master = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads the int pointed to, which outlives the call.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })?;
    // SAFETY: TIOCGPTPEER takes open flags and returns a new descriptor.
    let fd = check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) })?;
    // SAFETY: a fresh descriptor this function owns.
    let slave = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and pointer.
    check(unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut t) })?;
    // SAFETY: a valid pointer to an initialized termios.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: a valid descriptor and pointer.
    check(unsafe { libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t) })?;
    set_size(&master, size)?;
    Ok((master, slave))
}

/// Sets the terminal's size.
pub fn set_size(master: &File, size: WinSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads the winsize, which outlives the call.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// `resize_pty` of the container's process: the terminal's new size,
/// and SIGWINCH for `capsule exec` (process `pid`) to pass it on.
pub fn resize(master: &File, size: WinSize, pid: u32) -> io::Result<()> {
    set_size(master, size)?;
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("bad pid"))?;
    // SAFETY: kill has no memory arguments; `pid` is the shim's own child,
    // not yet waited for.
    check(unsafe { libc::kill(pid, libc::SIGWINCH) })?;
    Ok(())
}

/// Waits until `f` has something to read, or its end. A FIFO that no
/// writer has opened yet reads as end-of-file at once, but polls as
/// nothing to read until a writer comes and writes or hangs up: containerd's
/// client opens the stdin FIFO only as the shim does, so the first read
/// must wait for it (the stdin pump of `crate::stdin` polls the same way).
fn wait_readable(f: &File) -> io::Result<()> {
    let mut fd = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd entry.
        if unsafe { libc::poll(&mut fd, 1, -1) } >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Copies `from` into `to` until either ends (EIO from a master whose
/// slaves are all closed is its end).
fn copy(mut from: File, mut to: File, what: &'static str) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = wait_readable(&from) {
            log::debug!("terminal {what}: {e}");
            return;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::debug!("terminal {what}: {e}");
                return;
            }
        };
        if let Err(e) = to.write_all(&buf[..n]) {
            log::debug!("terminal {what}: {e}");
            return;
        }
    }
}

/// Starts `capsule ARGS` (with `--tty`) in `cwd` on a new terminal whose
/// output goes to the stdout FIFO and whose input is the stdin FIFO
/// (capsule's own messages go to the stderr FIFO, usually none with a
/// terminal). Returns the child, the terminal's master and a receiver
/// that hears when the output is all copied.
pub fn spawn(
    capsule: &Path,
    args: &[OsString],
    cwd: &Path,
    io: &Stdio3,
) -> io::Result<(Child, File, Receiver<()>)> {
    let (master, slave) = open_pty(WinSize { rows: 24, cols: 80 })?;
    let stdout = open_stdio(&io.stdout, false)?;
    let stderr = open_stdio(&io.stderr, false)?;
    let stdin = if io.stdin.is_empty() {
        None
    } else {
        Some(open_stdio(&io.stdin, true)?)
    };
    let mut cmd = Command::new(capsule);
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave))
        .stderr(Stdio::from(stderr));
    log::info!("starting {} {:?} on a terminal", capsule.display(), args);
    let child = cmd.spawn()?;
    // `cmd` held the shim's copies of the slave: closed, so that the
    // master reads its end once capsule's are.
    drop(cmd);
    let out = master.try_clone()?;
    let (done, copied) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("tty-out".into())
        .spawn(move || {
            copy(out, stdout, "output");
            let _ = done.send(());
        })?;
    if let Some(fifo) = stdin {
        let input = master.try_clone()?;
        std::thread::Builder::new()
            .name("tty-in".into())
            .spawn(move || copy(fifo, input, "input"))?;
    }
    Ok((child, master, copied))
}

/// Waits (at most `wait`) until the output is all copied: the exit is
/// reported after the process's last output, unless a process that
/// outlives capsule holds the terminal.
pub fn drain(copied: &Receiver<()>, wait: std::time::Duration) {
    let _ = copied.recv_timeout(wait);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::unix::fs::OpenOptionsExt;

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    /// Reads the FIFO until what came ends with `end` (10 s at most).
    fn read_until(reader: &mut File, got: &mut Vec<u8>, end: &[u8]) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !got.ends_with(end) && std::time::Instant::now() < deadline {
            let mut buf = [0u8; 256];
            match reader.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    }

    #[test]
    fn the_process_gets_a_raw_terminal_that_resizes_and_its_output_reaches_the_fifo() {
        let dir = std::env::temp_dir().join(format!("capsule-shim-tty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (out, inp) = (dir.join("out"), dir.join("in"));
        mkfifo(&out);
        mkfifo(&inp);
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&out)
            .unwrap();
        let io = Stdio3 {
            stdin: inp.to_str().unwrap().into(),
            stdout: out.to_str().unwrap().into(),
            stderr: String::new(),
        };
        // The shell stands for capsule: its terminal's size before and
        // after the resize, output and input through the FIFOs.
        let script = "stty size; printf 'a\\nb\\n'; read x; stty size; echo got-$x";
        let args: Vec<OsString> = vec!["-c".into(), script.into()];
        let (mut child, master, copied) = spawn(Path::new("/bin/sh"), &args, &dir, &io).unwrap();
        // containerd's client opens its end of the stdin FIFO after the
        // shim: late here, and without blocking, so that a shim that took
        // the FIFO's end-of-file before any writer came (and closed its
        // end) fails the test (ENXIO) instead of hanging it.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut writer = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&inp)
            .expect("the shim still reads the stdin FIFO");
        let mut got = Vec::new();
        read_until(&mut reader, &mut got, b"b\n");
        // SIGWINCH: the shell ignores it (its default action).
        resize(
            &master,
            WinSize {
                rows: 40,
                cols: 100,
            },
            child.id(),
        )
        .unwrap();
        writer.write_all(b"line\n").unwrap();
        assert!(child.wait().unwrap().success());
        copied
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the copy ends with the process");
        read_until(&mut reader, &mut got, b"got-line\n");
        // Raw: no echo, no CR added.
        assert_eq!(
            String::from_utf8_lossy(&got),
            "24 80\na\nb\n40 100\ngot-line\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
