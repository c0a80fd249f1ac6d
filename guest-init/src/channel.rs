//! The channel to the host (a vsock stream, or the virtio-console port)
//! and the wait for the host's first messages: the time, and for an init
//! booted from an exec template, the command.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use exec_proto::{Decoder, ExecSpec, GuestMsg, HostMsg, CONSOLE_CHANNEL_ARG, VERSION, VSOCK_PORT};

use crate::{sys, CHUNK};

/// Console port to the host (with `capsule.channel=console`).
const PORT: &str = "/dev/hvc0";
/// How long the channel may take to appear (driver probing).
const CHANNEL_WAIT: Duration = Duration::from_secs(5);
/// How long the init waits for its last frames to reach the host.
const FINISH_WAIT: Duration = Duration::from_secs(10);
/// The exec socket's buffer: what may be in flight towards the host, and
/// the credit capsule's vsock device offers a connection (1 MiB).
const SOCKET_BUFFER: u64 = 1 << 20;
/// Heartbeat period.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long to wait for the host's time after `Hello`.
const TIME_WAIT: Duration = Duration::from_secs(30);

/// The channel to the host, both ways: a vsock stream, or the console
/// port.
pub(crate) struct Channel {
    /// Blocking writer: the host always drains, so writes only wait briefly.
    tx: File,
    /// Read without blocking (the console port is opened `O_NONBLOCK`, the
    /// socket is read with `MSG_DONTWAIT`).
    pub(crate) rx: File,
    /// Whether `rx` is a socket.
    socket: bool,
    decoder: Decoder,
    last_sent: Instant,
    /// The host ended the connection (a read returned end-of-file).
    closed: bool,
}

impl Channel {
    /// The vsock channel, or the console one if the command line asks.
    pub(crate) fn open() -> Result<Self, String> {
        let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
        if cmdline.split_whitespace().any(|a| a == CONSOLE_CHANNEL_ARG) {
            Self::open_console().map_err(|e| format!("cannot open {PORT}: {e}"))
        } else {
            Self::open_vsock()
                .map_err(|e| format!("cannot connect to the host's vsock port {VSOCK_PORT}: {e}"))
        }
    }

    /// Connects to the host's port, retrying while the driver is not
    /// there yet (`ENODEV`) or the connection is refused or reset.
    fn open_vsock() -> io::Result<Self> {
        let deadline = Instant::now() + CHANNEL_WAIT;
        let sock = loop {
            match sys::vsock_connect(libc::VMADDR_CID_HOST, VSOCK_PORT, Some(SOCKET_BUFFER)) {
                Ok(fd) => break fd,
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.raw_os_error(),
                            Some(
                                libc::ENODEV
                                    | libc::ECONNRESET
                                    | libc::ECONNREFUSED
                                    | libc::ETIMEDOUT
                                    | libc::EINTR
                            )
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        let tx = File::from(sock);
        let rx = tx.try_clone()?;
        Ok(Self {
            tx,
            rx,
            socket: true,
            decoder: Decoder::new(),
            last_sent: Instant::now(),
            closed: false,
        })
    }

    fn open_console() -> io::Result<Self> {
        // The port appears when virtio-console probes; normally before init.
        let deadline = Instant::now() + CHANNEL_WAIT;
        let tx = loop {
            match OpenOptions::new().write(true).open(PORT) {
                Ok(f) => break f,
                Err(e) if Instant::now() < deadline && e.kind() == io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        sys::make_raw(tx.as_raw_fd())?;
        let rx = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(PORT)?;
        Ok(Self {
            tx,
            rx,
            socket: false,
            decoder: Decoder::new(),
            last_sent: Instant::now(),
            closed: false,
        })
    }

    /// One read that does not block.
    pub(crate) fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.socket {
            sys::recv_nonblocking(self.rx.as_raw_fd(), buf)
        } else {
            self.rx.read(buf)
        }
    }

    pub(crate) fn send(&mut self, msg: &GuestMsg) -> io::Result<()> {
        let mut buf = Vec::new();
        msg.encode(&mut buf);
        self.tx.write_all(&buf)?;
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Sends a data frame of `kind` with `payload`, header and payload in
    /// one gathered write (no copy of the payload into a frame).
    pub(crate) fn send_data(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        let head = exec_proto::header(kind, payload.len());
        let mut parts = [io::IoSlice::new(&head), io::IoSlice::new(payload)];
        let mut parts = &mut parts[..];
        while !parts.is_empty() {
            match self.tx.write_vectored(parts) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => io::IoSlice::advance_slices(&mut parts, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Reads what the host sent; returns the complete messages.
    pub(crate) fn receive(&mut self) -> io::Result<Vec<HostMsg>> {
        let mut buf = [0u8; CHUNK];
        loop {
            match self.read_some(&mut buf) {
                Ok(0) => {
                    self.closed = self.socket;
                    break;
                }
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let mut msgs = Vec::new();
        while let Some(frame) = self.decoder.next_frame().map_err(io::Error::other)? {
            msgs.push(HostMsg::parse(frame).map_err(io::Error::other)?);
        }
        Ok(msgs)
    }

    /// Before power-off: makes sure the last frames left the guest. A
    /// console write returns once the host took the bytes; a socket write
    /// only queues them (the vsock driver sends from a work queue), so the
    /// init says it is done sending and waits, at most
    /// [`FINISH_WAIT`], for the host to end the connection or the VM
    /// (the host stops the VM as soon as `Exit` arrives).
    pub(crate) fn finish(&mut self) {
        if !self.socket {
            return;
        }
        // SAFETY: plain system call on the socket this channel owns.
        unsafe { libc::shutdown(self.tx.as_raw_fd(), libc::SHUT_WR) };
        let deadline = Instant::now() + FINISH_WAIT;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            let mut fds = [libc::pollfd {
                fd: self.rx.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            if sys::poll(&mut fds, 100).is_err() {
                return;
            }
            match self.read_some(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    pub(crate) fn heartbeat_due(&self) -> bool {
        self.last_sent.elapsed() >= HEARTBEAT
    }
}

/// Why the wait for the host's first messages ended without them.
pub(crate) enum WaitError {
    /// The connection was reset or closed (a clone's restored vsock
    /// device resets every connection): connect again.
    Lost,
    /// Anything else: the init gives up with this message.
    Fatal(String),
}

/// Whether `e` means the connection is gone (rather than a bad message).
fn is_lost(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNRESET | libc::ENOTCONN | libc::EPIPE | libc::ESHUTDOWN)
    )
}

/// Waits for the host's `Time` (which sets the clock) and, with
/// `want_spec`, then for its `Spec` (the command). Returns the spec (if
/// wanted) and the stdin messages that arrived right behind. Without
/// `deadline` it waits for as long as it takes (an exec template's init
/// waits for its command here, and is snapshotted doing so).
fn wait_for_host(
    chan: &mut Channel,
    want_spec: bool,
    deadline: Option<Instant>,
) -> Result<(Option<Vec<u8>>, Vec<HostMsg>), WaitError> {
    let mut time_set = false;
    let mut spec = None;
    let mut rest = Vec::new();
    loop {
        let mut fds = [libc::pollfd {
            fd: chan.rx.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        sys::poll(&mut fds, 200).map_err(|e| WaitError::Fatal(format!("poll: {e}")))?;
        let msgs = match chan.receive() {
            Ok(m) => m,
            Err(e) if chan.socket && is_lost(&e) => return Err(WaitError::Lost),
            Err(e) => return Err(WaitError::Fatal(format!("bad message from the host: {e}"))),
        };
        for m in msgs {
            match m {
                HostMsg::Time { secs, nanos } if !time_set => {
                    if let Err(e) = sys::set_clock(secs, nanos) {
                        eprintln!("capsule-init: cannot set the clock: {e}");
                    }
                    time_set = true;
                }
                HostMsg::Spec(s) if want_spec && spec.is_none() => spec = Some(s),
                other => rest.push(other),
            }
        }
        if time_set && (spec.is_some() || !want_spec) {
            return Ok((spec, rest));
        }
        if chan.closed {
            return Err(WaitError::Lost);
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            return Err(WaitError::Fatal(if time_set {
                "the host did not send the command".into()
            } else {
                "the host did not send the time".into()
            }));
        }
    }
}

/// Waits for the host's `Time` and sets the clock. Returns stdin messages
/// that arrived right behind it.
pub(crate) fn wait_for_time(chan: &mut Channel) -> Result<Vec<HostMsg>, String> {
    match wait_for_host(chan, false, Some(Instant::now() + TIME_WAIT)) {
        Ok((_, rest)) => Ok(rest),
        Err(WaitError::Lost) => {
            Err("the host closed the connection before sending the time".into())
        }
        Err(WaitError::Fatal(m)) => Err(m),
    }
}

/// For an exec template's init (its spec says `await`): waits, for as
/// long as it takes, for the time and the command. The template is
/// snapshotted in this wait; in each clone the restored vsock device
/// resets the connection, and the init connects again (to the clone's
/// host), says hello again and waits for the clone's command. Returns
/// the command's spec and the stdin messages behind it.
pub(crate) fn wait_for_command(
    slot: &mut Option<Channel>,
) -> Result<(ExecSpec, Vec<HostMsg>), String> {
    loop {
        let chan = slot.as_mut().ok_or("no channel to the host")?;
        match wait_for_host(chan, true, None) {
            Ok((Some(bytes), rest)) => {
                let spec = ExecSpec::from_bytes(&bytes)
                    .map_err(|e| format!("bad command from the host: {e}"))?;
                return Ok((spec, rest));
            }
            Ok((None, _)) => return Err("the host sent no command".into()),
            Err(WaitError::Fatal(m)) => return Err(m),
            Err(WaitError::Lost) => {
                // Drop the old socket first: its host end is gone.
                *slot = None;
                let chan = slot.insert(Channel::open_vsock().map_err(|e| {
                    format!("cannot connect to the host's vsock port {VSOCK_PORT} again: {e}")
                })?);
                chan.send(&GuestMsg::Hello { version: VERSION })
                    .map_err(|e| format!("cannot write to the host: {e}"))?;
            }
        }
    }
}
