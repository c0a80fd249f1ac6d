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
/// Most bytes kept to send again on the init's next connection (see
/// [`VsockLink::replay`]).
const REPLAY_MAX: usize = 8 << 20;

const LISTENER: u32 = 0;
const STREAM: u32 = 1;
const WAKE: u32 = 2;
const DATA: u32 = 3;

mod dir;
mod thread;

pub(super) use dir::{port_path, PrivateDir};
pub(super) use thread::LinkThread;

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
    /// The command, sent right after the time to a clone of an exec
    /// template (whose init awaits it).
    spec: Option<Vec<u8>>,
    stdin_done: bool,
    buf: Vec<u8>,
    /// Everything queued for the guest on this connection while its
    /// command has not started (the time, a clone's command, early stdin),
    /// to be sent again if the init connects again: a clone of an exec
    /// template can lose its first connection to the restored vsock
    /// device's reset after it said hello (the reset and a reply to the
    /// template's connection race in the guest), and the init then
    /// connects again, having got none of it. `None` once the command
    /// started (a new connection is then refused) or past [`REPLAY_MAX`].
    replay: Option<Vec<u8>>,
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
            spec: None,
            stdin_done: false,
            buf: vec![0; 256 * 1024],
            replay: Some(Vec::new()),
        })
    }

    /// Sends `spec` (an [`exec_proto::ExecSpec`]'s bytes, at most
    /// [`MAX_PAYLOAD`]) right after the time: the command of a clone of
    /// an exec template.
    pub(super) fn send_spec(&mut self, spec: Vec<u8>) {
        self.spec = Some(spec);
    }

    /// Takes the guest's connections: the first, and a later one that
    /// replaces it while the command has not started (the init connected
    /// again: see [`Self::replay`]); any other is refused.
    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let s = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            let again = self.stream.is_some() || self.time_sent;
            if again && (self.replay.is_none() || lock(&self.session).command_running) {
                log::warn!("exec: a second guest connection was refused");
                continue;
            }
            if let Err(e) = s.set_nonblocking(true) {
                log::warn!("exec: cannot use the guest's connection: {e}");
                continue;
            }
            if let Some(old) = self.stream.take() {
                if self.registered.take().is_some() {
                    let _ = ops.remove(Events::empty_raw(old.as_raw_fd()));
                }
            }
            if again {
                log::info!(
                    "exec: the guest init connected again before its command started; the session goes on on the new connection"
                );
                // A frame cut short on the old connection is not the
                // start of the new one's.
                self.sink.decoder = exec_proto::Decoder::new();
                self.out = self.replay.iter().flatten().copied().collect();
            }
            self.stream = Some(s);
        }
    }

    /// Queues `bytes` for the guest (and for a replay, see
    /// [`Self::replay`]).
    fn queue(&mut self, bytes: &[u8]) {
        self.out.extend(bytes);
        if self.replay.is_some() && lock(&self.session).command_running {
            self.replay = None;
        }
        if let Some(r) = &mut self.replay {
            if r.len() + bytes.len() > REPLAY_MAX {
                self.replay = None;
            } else {
                r.extend_from_slice(bytes);
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
            if let Some(spec) = self.spec.take() {
                HostMsg::Spec(spec).encode(&mut frame);
            }
            self.queue(&frame);
            self.time_sent = true;
        }
        let mut signals = Vec::new();
        lock(&self.session).forward_signals(&mut signals);
        self.queue(&signals);
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
            self.queue(&frame);
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
            // The listener stays watched: the init may connect again.
            LISTENER => self.accept(ops),
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::mpsc;

    use event_manager::{EventManager, SubscriberOps};
    use exec_proto::{Decoder, GuestMsg};

    use super::*;
    use crate::exec::session::tests::session;

    type Loop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

    fn run(em: &mut Loop) {
        for _ in 0..1000 {
            if em.run_with_timeout(50).unwrap() == 0 {
                return;
            }
        }
        panic!("the link never went idle");
    }

    /// Host frames read from the guest's end until `want` of them came.
    fn host_frames(s: &mut UnixStream, em: &mut Loop, want: usize) -> Vec<HostMsg> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..100 {
            run(em);
            match s.read(&mut buf) {
                Ok(n) => d.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            while let Some(f) = d.next_frame().unwrap() {
                out.push(HostMsg::parse(f).unwrap());
            }
            if out.len() >= want {
                return out;
            }
        }
        panic!("only {} host frames", out.len());
    }

    /// A link accepting on `listener` for `session`.
    pub(super) fn link_on(
        listener: UnixListener,
        session: &Arc<Mutex<Session>>,
        wake: EventFd,
        data_ready: EventFd,
        chunks: Receiver<StdinChunk>,
    ) -> VsockLink {
        let sink = Sink {
            session: session.clone(),
            decoder: Decoder::new(),
        };
        VsockLink::new(listener, sink, session.clone(), wake, data_ready, chunks).unwrap()
    }

    #[test]
    fn the_link_accepts_the_init_and_carries_the_session_both_ways() {
        let dir = PrivateDir::new().unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir.0).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let path = port_path(&dir.join("vsock"), exec_proto::VSOCK_PORT);
        assert!(path.ends_with("vsock_10000"));
        let listener = UnixListener::bind(&path).unwrap();
        let session = Arc::new(Mutex::new(session(vec![])));
        let wake = devices::eventfd().unwrap();
        lock(&session).wake = wake.try_clone().unwrap();
        let data_ready = devices::eventfd().unwrap();
        let (tx, rx) = mpsc::sync_channel(8);
        let link = link_on(
            listener,
            &session,
            wake,
            data_ready.try_clone().unwrap(),
            rx,
        );
        let mut em = Loop::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(link)));

        // The init connects (through the vsock device, here directly).
        let mut guest = UnixStream::connect(&path).unwrap();
        guest.set_nonblocking(true).unwrap();
        run(&mut em);
        // Stdin that arrives before the hello waits for it.
        tx.send(StdinChunk::Data(b"typed early".to_vec())).unwrap();
        data_ready.write(1).unwrap();
        run(&mut em);
        let mut b = [0u8; 16];
        assert!(matches!(guest.read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock));

        let mut frames = Vec::new();
        GuestMsg::Hello {
            version: exec_proto::VERSION,
        }
        .encode(&mut frames);
        GuestMsg::Stdout(b"out".to_vec()).encode(&mut frames);
        guest.write_all(&frames).unwrap();
        let got = host_frames(&mut guest, &mut em, 2);
        assert!(matches!(got[0], HostMsg::Time { .. }), "{got:?}");
        assert_eq!(got[1], HostMsg::Stdin(b"typed early".to_vec()));
        assert!(lock(&session).hello);

        tx.send(StdinChunk::Eof).unwrap();
        data_ready.write(1).unwrap();
        assert_eq!(host_frames(&mut guest, &mut em, 1), vec![HostMsg::StdinEof]);

        let mut frames = Vec::new();
        GuestMsg::Exit(7).encode(&mut frames);
        guest.write_all(&frames).unwrap();
        drop(guest);
        run(&mut em);
        assert_eq!(lock(&session).exit, Some(7));
    }

    fn hello() -> Vec<u8> {
        let mut f = Vec::new();
        GuestMsg::Hello {
            version: exec_proto::VERSION,
        }
        .encode(&mut f);
        f
    }

    /// A clone's link (its command `spec` to send after the time) in an
    /// event loop, on a socket in a private directory.
    struct CloneRig {
        _dir: PrivateDir,
        path: PathBuf,
        session: Arc<Mutex<Session>>,
        tx: mpsc::SyncSender<StdinChunk>,
        data_ready: EventFd,
        em: Loop,
    }

    fn clone_rig(spec: &[u8], stdin_slots: usize) -> CloneRig {
        let dir = PrivateDir::new().unwrap();
        let path = dir.join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let session = Arc::new(Mutex::new(session(vec![])));
        let (tx, rx) = mpsc::sync_channel(stdin_slots);
        let data_ready = devices::eventfd().unwrap();
        let mut link = link_on(
            listener,
            &session,
            devices::eventfd().unwrap(),
            data_ready.try_clone().unwrap(),
            rx,
        );
        link.send_spec(spec.to_vec());
        let mut em = Loop::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(link)));
        CloneRig {
            _dir: dir,
            path,
            session,
            tx,
            data_ready,
            em,
        }
    }

    #[test]
    fn a_clone_gets_its_command_right_after_the_time() {
        let mut r = clone_rig(b"arg=true\0", 1);
        let mut guest = UnixStream::connect(&r.path).unwrap();
        guest.set_nonblocking(true).unwrap();
        r.tx.send(StdinChunk::Eof).unwrap();
        r.data_ready.write(1).unwrap();
        guest.write_all(&hello()).unwrap();
        let got = host_frames(&mut guest, &mut r.em, 3);
        assert!(matches!(got[0], HostMsg::Time { .. }), "{got:?}");
        assert_eq!(got[1], HostMsg::Spec(b"arg=true\0".to_vec()));
        assert_eq!(got[2], HostMsg::StdinEof);
    }

    /// A clone's init that connects again before its command started (its
    /// first connection reset under it, or not yet seen to end) gets the
    /// time, its command and its stdin again on the new connection; once
    /// the command has started, another connection is refused.
    #[test]
    fn an_init_that_connects_again_before_its_command_gets_it_all_again() {
        let mut r = clone_rig(b"arg=true\0", 4);
        r.tx.send(StdinChunk::Data(b"in".to_vec())).unwrap();
        r.tx.send(StdinChunk::Eof).unwrap();
        r.data_ready.write(1).unwrap();
        let want = [
            HostMsg::Spec(b"arg=true\0".to_vec()),
            HostMsg::Stdin(b"in".to_vec()),
            HostMsg::StdinEof,
        ];

        let mut first = UnixStream::connect(&r.path).unwrap();
        first.set_nonblocking(true).unwrap();
        first.write_all(&hello()).unwrap();
        let got = host_frames(&mut first, &mut r.em, 4);
        assert!(matches!(got[0], HostMsg::Time { .. }), "{got:?}");
        assert_eq!(got[1..], want[..]);

        // Connects again while the first connection is still open, then
        // once more after it was closed: each time it all comes again.
        for close_first in [false, true] {
            if close_first {
                drop(first);
                run(&mut r.em);
            }
            let mut again = UnixStream::connect(&r.path).unwrap();
            again.set_nonblocking(true).unwrap();
            again.write_all(&hello()).unwrap();
            let got = host_frames(&mut again, &mut r.em, 4);
            assert!(matches!(got[0], HostMsg::Time { .. }), "{got:?}");
            assert_eq!(got[1..], want[..]);
            first = again;
        }

        // The command starts: a further connection gets nothing.
        let mut started = Vec::new();
        GuestMsg::Started.encode(&mut started);
        first.write_all(&started).unwrap();
        run(&mut r.em);
        assert!(lock(&r.session).command_running);
        let mut late = UnixStream::connect(&r.path).unwrap();
        late.set_nonblocking(true).unwrap();
        late.write_all(&hello()).unwrap();
        run(&mut r.em);
        let mut b = [0u8; 16];
        let res = late.read(&mut b);
        assert!(
            matches!(&res, Ok(0))
                || matches!(&res, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "a connection after the command started is closed at once: {res:?}"
        );
    }

    #[test]
    fn a_malformed_frame_from_the_guest_breaks_the_session() {
        let dir = PrivateDir::new().unwrap();
        let path = dir.join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let session = Arc::new(Mutex::new(session(vec![])));
        let (_tx, rx) = mpsc::sync_channel(1);
        let link = link_on(
            listener,
            &session,
            devices::eventfd().unwrap(),
            devices::eventfd().unwrap(),
            rx,
        );
        let mut em = Loop::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(link)));
        let mut guest = UnixStream::connect(&path).unwrap();
        run(&mut em);
        guest.write_all(&[0x7e, 0, 0, 0, 0]).unwrap();
        run(&mut em);
        assert!(lock(&session).broken.is_some());
        // A second connection is refused; the first stays.
        let _second = UnixStream::connect(&path);
        run(&mut em);
        let p = dir.0.clone();
        drop(dir);
        assert!(!p.exists(), "the private directory is removed");
    }
}
