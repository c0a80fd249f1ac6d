//! The exec session over vsock: the guest init connects to host port
//! [`exec_proto::VSOCK_PORT`], which the vsock device forwards to a Unix
//! listener at `<uds_path>_<port>` in a private directory; this
//! event-loop subscriber accepts that one connection, decodes the guest's
//! frames into the [`Session`] (through the same [`Sink`] as the console
//! channel) and sends the time and host stdin back.
//!
//! Back-pressure both ways: guest output is read only as this loop takes
//! it (the device holds at most its credit, the guest waits), and host
//! stdin is taken from the reader thread only while less than
//! [`OUT_HIGH_WATER`] bytes wait for the socket.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use exec_proto::{HostMsg, MAX_PAYLOAD};
use vmm_sys_util::eventfd::EventFd;

use super::lock;
use super::session::{Session, Sink};
use super::stdin::StdinChunk;

/// Host → guest bytes held before stdin is no longer taken.
const OUT_HIGH_WATER: usize = 1 << 20;
/// Most bytes read from the guest per event before yielding.
const READ_BUDGET: usize = 4 << 20;

const LISTENER: u32 = 0;
const STREAM: u32 = 1;
const WAKE: u32 = 2;
const DATA: u32 = 3;

/// A private (0700) directory for the session's sockets, removed (with
/// what is left in it) when dropped.
pub(super) struct PrivateDir(pub(super) PathBuf);

impl PrivateDir {
    /// Creates `capsule-exec.<pid>.<n>` in `$XDG_RUNTIME_DIR`, else the
    /// temporary directory; never reuses an existing one.
    pub(super) fn new() -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let mut last = None;
        for i in 0..16u32 {
            let dir = base.join(format!(
                "capsule-exec.{}.{}",
                std::process::id(),
                nanos.wrapping_add(i)
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(Self(dir)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no free directory name")))
    }

    /// A path in the directory.
    pub(super) fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The host end of the session's vsock connection.
pub(super) struct VsockLink {
    listener: UnixListener,
    stream: Option<UnixStream>,
    registered: Option<EventSet>,
    sink: Sink,
    session: Arc<Mutex<Session>>,
    out: VecDeque<u8>,
    wake: EventFd,
    data_ready: EventFd,
    chunks: Receiver<StdinChunk>,
    time_sent: bool,
    stdin_done: bool,
    buf: Vec<u8>,
}

impl VsockLink {
    /// A link accepting on `listener`, reporting to `session`; `wake`
    /// fires at the guest's hello, `data_ready` when the stdin reader has
    /// a chunk.
    pub(super) fn new(
        listener: UnixListener,
        sink: Sink,
        session: Arc<Mutex<Session>>,
        wake: EventFd,
        data_ready: EventFd,
        chunks: Receiver<StdinChunk>,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            stream: None,
            registered: None,
            sink,
            session,
            out: VecDeque::new(),
            wake,
            data_ready,
            chunks,
            time_sent: false,
            stdin_done: false,
            buf: vec![0; 256 * 1024],
        })
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) if self.stream.is_none() => match s.set_nonblocking(true) {
                    Ok(()) => self.stream = Some(s),
                    Err(e) => log::warn!("exec: cannot use the guest's connection: {e}"),
                },
                Ok(_) => log::warn!("exec: a second guest connection was refused"),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads what the guest sent, up to the budget; false once the
    /// connection is over.
    fn read(&mut self) -> bool {
        let mut taken = 0;
        while taken < READ_BUDGET {
            let Some(s) = self.stream.as_mut() else {
                return false;
            };
            match s.read(&mut self.buf) {
                Ok(0) => {
                    log::debug!("exec: the guest closed the session's connection");
                    return false;
                }
                Ok(n) => {
                    taken += n;
                    let _ = self.sink.write_all(&self.buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) => {
                    log::warn!("exec: the session's connection failed: {e}");
                    return false;
                }
            }
        }
        true
    }

    /// Writes what waits for the guest.
    fn flush(&mut self) {
        while !self.out.is_empty() {
            let Some(s) = self.stream.as_mut() else {
                return;
            };
            let (front, _) = self.out.as_slices();
            match s.write(front) {
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("exec: cannot write to the guest: {e}");
                    self.out.clear();
                    return;
                }
            }
        }
    }

    /// Queues the time (once the init said hello) and stdin, below the
    /// high-water mark.
    fn pump(&mut self) {
        if !self.time_sent {
            if !lock(&self.session).hello {
                return;
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let mut frame = Vec::new();
            HostMsg::Time {
                secs: now.as_secs(),
                nanos: now.subsec_nanos(),
            }
            .encode(&mut frame);
            self.out.extend(frame);
            self.time_sent = true;
        }
        while !self.stdin_done && self.out.len() < OUT_HIGH_WATER {
            let mut frame = Vec::new();
            match self.chunks.try_recv() {
                Ok(StdinChunk::Data(d)) => {
                    for part in d.chunks(MAX_PAYLOAD) {
                        HostMsg::Stdin(part.to_vec()).encode(&mut frame);
                    }
                }
                Ok(StdinChunk::Eof) | Err(TryRecvError::Disconnected) => {
                    HostMsg::StdinEof.encode(&mut frame);
                    self.stdin_done = true;
                }
                Err(TryRecvError::Empty) => break,
            }
            self.out.extend(frame);
        }
        self.flush();
    }

    /// Watches the connection for input, and for output room while bytes
    /// wait.
    fn update_registration(&mut self, ops: &mut EventOps) {
        let Some(s) = self.stream.as_ref() else {
            return;
        };
        let mut want = EventSet::IN;
        if !self.out.is_empty() {
            want |= EventSet::OUT;
        }
        if self.registered == Some(want) {
            return;
        }
        let events = Events::with_data(s, STREAM, want);
        let r = if self.registered.is_some() {
            ops.modify(events)
        } else {
            ops.add(events)
        };
        match r {
            Ok(()) => self.registered = Some(want),
            Err(e) => log::error!("exec: cannot watch the session's connection: {e}"),
        }
    }
}

impl MutEventSubscriber for VsockLink {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, tag) in [
            (self.listener.as_raw_fd(), LISTENER),
            (self.wake.as_raw_fd(), WAKE),
            (self.data_ready.as_raw_fd(), DATA),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, tag, EventSet::IN)) {
                log::error!("exec: cannot watch the session's events: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            LISTENER => {
                self.accept();
                if self.stream.is_some() {
                    let _ = ops.remove(Events::with_data(&self.listener, LISTENER, EventSet::IN));
                }
            }
            STREAM => {
                let set = events.event_set();
                let mut open = true;
                if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                    open = self.read();
                }
                if open && set.intersects(EventSet::OUT) {
                    self.flush();
                }
                if !open {
                    // Out of epoll before the descriptor closes.
                    let _ = ops.remove(Events::empty_raw(events.fd()));
                    self.stream = None;
                    self.registered = None;
                    self.out.clear();
                }
            }
            WAKE => {
                let _ = self.wake.read();
            }
            DATA => {
                let _ = self.data_ready.read();
            }
            _ => {}
        }
        self.pump();
        self.update_registration(ops);
    }
}

/// The path of the listener for guest connections to `port`.
pub(super) fn port_path(uds: &Path, port: u32) -> PathBuf {
    devices::virtio::vsock::forward_path(uds, port)
}
