//! Thin wrappers over the system calls the init needs. Every `unsafe`
//! block here is an FFI call with arguments built from owned Rust values.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Converts a path or string to a C string.
pub fn cstr(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in string"))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `mount(2)`.
pub fn mount(
    source: Option<&str>,
    target: &[u8],
    fstype: Option<&str>,
    flags: libc::c_ulong,
) -> io::Result<()> {
    let source = source.map(|s| cstr(s.as_bytes())).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype.map(|s| cstr(s.as_bytes())).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: valid NUL-terminated strings (or null where allowed); no data.
    check(unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            std::ptr::null(),
        )
    })?;
    Ok(())
}

/// `mount(2)` with file-system specific `data` (e.g. overlayfs's
/// `lowerdir=...`).
pub fn mount_data(
    source: &str,
    target: &[u8],
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let source = cstr(source.as_bytes())?;
    let target = cstr(target)?;
    let fstype = cstr(fstype.as_bytes())?;
    let data = cstr(data.as_bytes())?;
    // SAFETY: valid NUL-terminated strings; the data string outlives the call.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    })?;
    Ok(())
}

/// Loads the kernel module in the open file `fd` (`finit_module(2)`);
/// `compressed` asks the kernel to decompress it (.ko.xz, .ko.zst).
pub fn finit_module(fd: RawFd, compressed: bool) -> io::Result<()> {
    /// MODULE_INIT_COMPRESSED_FILE (linux/module.h, Linux 6.4+).
    const COMPRESSED_FILE: libc::c_long = 4;
    let flags = if compressed { COMPRESSED_FILE } else { 0 };
    // SAFETY: finit_module reads the descriptor and the empty parameter
    // string; nothing of ours is written.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, fd, c"".as_ptr(), flags) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts a terminal in raw mode: no echo, no line editing, no signals, no
/// output processing, 8-bit clean.
pub fn make_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    check(unsafe { libc::tcgetattr(fd, &mut t) })?;
    // SAFETY: valid pointer to an initialized termios.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: valid fd and pointer.
    check(unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) })?;
    Ok(())
}

/// Sets the wall clock.
pub fn set_clock(secs: u64, nanos: u32) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: nanos as libc::c_long,
    };
    // SAFETY: valid pointer to a timespec.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })?;
    Ok(())
}

/// A pipe: (read end, write end), both close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: valid pointer to two ints.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 returned two new descriptors that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Asks for a pipe buffer of `size` bytes on the pipe `fd` belongs to.
pub fn set_pipe_size(fd: &impl AsRawFd, size: i32) -> io::Result<()> {
    // SAFETY: fcntl on a valid descriptor; no pointers.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size) })?;
    Ok(())
}

/// Makes `fd` non-blocking.
pub fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a valid descriptor.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// `poll(2)` on `fds` for up to `timeout_ms`.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: the pointer and length describe `fds`.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

/// How a child ended.
#[derive(Debug, Clone, Copy)]
pub enum Reaped {
    /// No child has ended.
    None,
    /// Process `pid` ended with shell-style status (128+N for signal N).
    Child(libc::pid_t, u8),
}

/// Reaps one ended child, without blocking.
pub fn reap_any() -> Reaped {
    let mut status = 0;
    // SAFETY: valid pointer to an int.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    if pid <= 0 {
        return Reaped::None;
    }
    let code = if libc::WIFEXITED(status) {
        // WEXITSTATUS is the low byte of the exit status: 0 to 255.
        u8::try_from(libc::WEXITSTATUS(status)).unwrap_or(u8::MAX)
    } else if libc::WIFSIGNALED(status) {
        // Signals are 1 to 64, so 129 to 192, as a shell reports them.
        u8::try_from(128 + libc::WTERMSIG(status)).unwrap_or(u8::MAX)
    } else {
        return Reaped::None;
    };
    Reaped::Child(pid, code)
}

/// What the child does between `fork` and `exec`, prepared beforehand.
pub struct ChildSetup<'a> {
    /// Root to `chroot` into, if not `/`.
    pub chroot: Option<&'a CStr>,
    /// Working directory (inside the root).
    pub cwd: &'a CStr,
    /// Program to execute (already resolved against PATH).
    pub program: &'a CStr,
    /// NULL-terminated argv.
    pub argv: &'a [*const libc::c_char],
    /// NULL-terminated environment.
    pub envp: &'a [*const libc::c_char],
    /// Descriptors for the child's stdin, stdout and stderr.
    pub stdio: [RawFd; 3],
    /// Message and status when the program does not exist.
    pub not_found: &'a [u8],
    /// stdin is a pseudo-terminal's slave: make it the controlling
    /// terminal of the child's new session.
    pub tty: bool,
    /// Run as this user: (uid, gid, supplementary groups).
    pub user: Option<(libc::uid_t, libc::gid_t, &'a [libc::gid_t])>,
}

fn write_fd(fd: RawFd, msg: &[u8]) {
    // SAFETY: valid buffer; the result does not matter (best effort).
    let _ = unsafe { libc::write(fd, msg.as_ptr().cast(), msg.len()) };
}

/// Forks and runs the command. The child only makes system calls on
/// prepared data (the init is single-threaded, but this keeps the child
/// free of allocation anyway).
pub fn spawn(setup: &ChildSetup) -> io::Result<libc::pid_t> {
    // SAFETY: the init is single-threaded; the child below only calls
    // async-signal-safe functions and ends in exec or _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid > 0 {
        return Ok(pid);
    }
    // Child.
    // SAFETY: plain system calls on prepared, valid arguments; every path
    // ends in execve or _exit.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        libc::setsid();
        for (i, &fd) in (0..).zip(setup.stdio.iter()) {
            libc::dup2(fd, i);
        }
        if setup.tty && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
            write_fd(2, b"capsule-init: cannot take the terminal\n");
            libc::_exit(125);
        }
        if let Some(root) = setup.chroot {
            if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                write_fd(2, b"capsule-init: cannot enter the --disk root\n");
                libc::_exit(125);
            }
        }
        if let Some((uid, gid, groups)) = setup.user {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                write_fd(2, b"capsule-init: cannot become the process's user\n");
                libc::_exit(125);
            }
        }
        if libc::chdir(setup.cwd.as_ptr()) != 0 {
            write_fd(2, b"capsule-init: cannot enter the working directory\n");
            libc::_exit(125);
        }
        if !setup.not_found.is_empty() {
            write_fd(2, setup.not_found);
            libc::_exit(127);
        }
        libc::execve(
            setup.program.as_ptr(),
            setup.argv.as_ptr(),
            setup.envp.as_ptr(),
        );
        let err = *libc::__errno_location();
        write_fd(2, b"capsule-init: ");
        write_fd(2, setup.program.to_bytes());
        let status = if err == libc::ENOENT {
            write_fd(2, b": command not found\n");
            127
        } else {
            write_fd(2, b": cannot execute: ");
            let msg = CStr::from_ptr(libc::strerror(err));
            write_fd(2, msg.to_bytes());
            write_fd(2, b"\n");
            126
        };
        libc::_exit(status);
    }
}

/// A new pseudo-terminal of the devpts instance beside `ptmx` (a
/// `/dev/ptmx` whose `pts` sibling is a devpts mount): (master, slave),
/// both close-on-exec, the slave opened through the master
/// (`TIOCGPTPEER`), so it needs no path; the terminal is `size` big.
pub fn open_pty(ptmx: &CStr, size: exec_proto::WinSize) -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: a valid NUL-terminated path; the result is checked.
    let fd = check(unsafe {
        libc::open(
            ptmx.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: a fresh descriptor this function owns.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads the int pointed to, which outlives the call.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })?;
    set_winsize(master.as_raw_fd(), size)?;
    // SAFETY: TIOCGPTPEER takes open flags and returns a new descriptor.
    let fd = check(unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: a fresh descriptor this function owns.
    let slave = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok((master, slave))
}

/// Sets a terminal's size (the kernel signals SIGWINCH to its foreground
/// process group).
pub fn set_winsize(fd: RawFd, size: exec_proto::WinSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads the winsize pointed to, which outlives the
    // call.
    check(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// Flushes file systems and powers the machine off. Never returns.
pub fn power_off() -> ! {
    // SAFETY: plain system calls.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot only returns on failure; PID 1 must not exit, so wait.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

/// `<linux/vm_sockets.h>` socket options (level `AF_VSOCK`), which the
/// libc crate does not define.
const SO_VM_SOCKETS_BUFFER_SIZE: libc::c_int = 0;
const SO_VM_SOCKETS_BUFFER_MAX_SIZE: libc::c_int = 2;

/// Sets one `u64` vsock socket option.
fn vsock_option(fd: &OwnedFd, name: libc::c_int, value: u64) -> io::Result<()> {
    // SAFETY: the option value is a u64 that outlives the call, and the
    // length passed is its size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::AF_VSOCK,
            name,
            std::ptr::addr_of!(value).cast::<libc::c_void>(),
            8, // size_of::<u64>()
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A blocking vsock stream socket connected to `cid`:`port`, with a
/// receive buffer of `buffer` bytes if given. Linux sends at most the
/// smaller of its own buffer and the peer's unacknowledged, so this is
/// also how much the socket can have in flight towards the host (the
/// default, 256 KiB, is a round trip's worth too little under nested
/// virtualization).
pub fn vsock_connect(cid: u32, port: u32, buffer: Option<u64>) -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor this function owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Some(bytes) = buffer {
        // The maximum first: the size may not exceed it.
        vsock_option(&sock, SO_VM_SOCKETS_BUFFER_MAX_SIZE, bytes)?;
        vsock_option(&sock, SO_VM_SOCKETS_BUFFER_SIZE, bytes)?;
    }
    // SAFETY: sockaddr_vm is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).unwrap_or_default();
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: addr is a valid sockaddr_vm that outlives the call, and the
    // length is its size.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            vm_len(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Reads what a socket holds without waiting (`WouldBlock` if nothing).
pub fn recv_nonblocking(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The size of `sockaddr_vm` (16 bytes) as a `socklen_t`.
fn vm_len() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_vm>()).unwrap_or(16)
}

/// A non-blocking vsock stream listener on `port` (any local CID).
pub fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = check(unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    // SAFETY: a fresh descriptor this function owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).unwrap_or_default();
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = port;
    // SAFETY: addr is a valid sockaddr_vm that outlives the call, and the
    // length is its size.
    check(unsafe {
        libc::bind(
            sock.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            vm_len(),
        )
    })?;
    // SAFETY: plain system call on the socket above.
    check(unsafe { libc::listen(sock.as_raw_fd(), 16) })?;
    Ok(sock)
}

/// One pending connection of `listener`, non-blocking and close-on-exec
/// (`WouldBlock` if none).
pub fn accept_nonblocking(listener: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: no address is asked for (null pointers are allowed).
    let fd = check(unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: accept4 returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Writes what a socket takes without waiting (`WouldBlock` if nothing).
pub fn send_nonblocking(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for reads of buf.len() bytes.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Ends the sending direction of a socket (the peer reads end-of-file).
pub fn shutdown_write(fd: RawFd) {
    // SAFETY: plain system call; a failure (already shut) does not matter.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// Sends `sig` to process `pid`, or with `group` to the process group it
/// leads (a spawned command leads a session of its own).
pub fn kill(pid: libc::pid_t, sig: libc::c_int, group: bool) -> io::Result<()> {
    let target = if group { -pid } else { pid };
    // SAFETY: plain system call, no pointers.
    check(unsafe { libc::kill(target, sig) })?;
    Ok(())
}
