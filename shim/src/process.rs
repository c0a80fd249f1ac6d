//! One container's microVM: `capsule exec` started with the container's
//! stdio FIFOs, and a thread that waits for it.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::stdin::StdinCloser;

/// Opens containerd's FIFO `path` for the child's stdin (read) or its
/// stdout/stderr (write); an empty path is `/dev/null`.
///
/// stdin is opened without blocking (a FIFO open for reading waits for a
/// writer otherwise); stdout and stderr read-write, which never blocks on
/// a FIFO whose reader is not there yet and keeps it open if the reader
/// comes and goes.
pub fn open_stdio(path: &str, input: bool) -> io::Result<File> {
    if path.is_empty() {
        return OpenOptions::new()
            .read(input)
            .write(!input)
            .open("/dev/null");
    }
    if input {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        clear_nonblock(&f)?;
        Ok(f)
    } else {
        OpenOptions::new().read(true).write(true).open(path)
    }
}

fn clear_nonblock(f: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function's caller owns; no memory
    // is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The container's stdio paths as containerd gave them.
#[derive(Debug, Clone, Default)]
pub struct Stdio3 {
    /// stdin FIFO (may be empty).
    pub stdin: String,
    /// stdout FIFO (may be empty).
    pub stdout: String,
    /// stderr FIFO (may be empty).
    pub stderr: String,
}

/// Starts `capsule ARGS` in `cwd` with the container's stdio; a stdin
/// FIFO is copied through a pipe, closed by the returned closer
/// (`close_io`).
pub fn spawn(
    capsule: &Path,
    args: &[OsString],
    cwd: &Path,
    io: &Stdio3,
) -> io::Result<(Child, Option<StdinCloser>)> {
    let (stdin, closer) = if io.stdin.is_empty() {
        (open_stdio(&io.stdin, true)?, None)
    } else {
        let (pipe, closer) = crate::stdin::copy(open_stdio(&io.stdin, true)?)?;
        (pipe, Some(closer))
    };
    let stdout = open_stdio(&io.stdout, false)?;
    let stderr = open_stdio(&io.stderr, false)?;
    let mut cmd = Command::new(capsule);
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    log::info!("starting {} {:?}", capsule.display(), args);
    Ok((cmd.spawn()?, closer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn stdio_goes_to_the_fifos_and_empty_is_dev_null() {
        let dir = std::env::temp_dir().join(format!("capsule-shim-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let c = std::ffi::CString::new(out.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // containerd's side: the reader, opened before the task starts.
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&out)
            .unwrap();
        let io = Stdio3 {
            stdin: String::new(),
            stdout: out.to_str().unwrap().into(),
            stderr: String::new(),
        };
        let args: Vec<OsString> = vec!["-c".into(), "read x; echo hi:$x:; exit 7".into()];
        let (mut child, closer) = spawn(Path::new("/bin/sh"), &args, &dir, &io).unwrap();
        assert!(closer.is_none(), "no stdin FIFO, nothing to close");
        let status = child.wait().unwrap();
        assert_eq!(crate::status::exit_code(status), 7);
        let mut got = String::new();
        clear_nonblock(&reader).unwrap();
        // The writer side is closed now (the child exited, the shim kept
        // no copy), so read_to_string ends... except that the child's
        // read-write open kept a reader too; read what is there.
        let mut buf = [0u8; 64];
        let n = reader.read(&mut buf).unwrap();
        got.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        assert_eq!(got, "hi::\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
