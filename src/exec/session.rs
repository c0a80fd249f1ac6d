//! What the guest reports: frames decoded from the virtio console
//! ([`Sink`]) update the [`Session`], which the run loop asks whether to
//! stop; and the kernel console's tail, shown when the guest fails.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use exec_proto::{Decoder, GuestMsg};
use vmm_sys_util::eventfd::EventFd;

use super::copyback::ShareBack;
use super::{lock, CONSOLE_KEEP, STALL_TIMEOUT};

/// A gap this long between two of the run loop's checks (every
/// `TICK`) means capsule was stopped: the shim's `pause`.
const HOST_STOPPED: Duration = Duration::from_secs(5);

/// The kernel console's recent output.
#[derive(Clone, Default)]
pub struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

impl ConsoleTail {
    /// The last `n` non-empty lines.
    pub fn lines(&self, n: usize) -> Vec<String> {
        let buf = lock(&self.0);
        let bytes: Vec<u8> = buf.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<String> = text
            .split(['\n', '\r'])
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect();
        lines[lines.len().saturating_sub(n)..].to_vec()
    }
}

impl Write for ConsoleTail {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut buf = lock(&self.0);
        buf.extend(data);
        let excess = buf.len().saturating_sub(CONSOLE_KEEP);
        buf.drain(..excess);
        if log::log_enabled!(log::Level::Debug) {
            let _ = io::stderr().write_all(data);
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the guest has reported so far.
pub(super) struct Session {
    pub(super) started: Instant,
    pub(super) timeout: Option<Duration>,
    pub(super) boot_timeout: Duration,
    pub(super) hello: bool,
    pub(super) last_message: Instant,
    /// The run loop's last [`Session::check`] (every tick).
    pub(super) last_check: Instant,
    pub(super) exit: Option<u8>,
    pub(super) error: Option<String>,
    pub(super) broken: Option<String>,
    pub(super) copy_error: Option<String>,
    pub(super) stdout: File,
    pub(super) stderr: File,
    pub(super) output_failed: bool,
    pub(super) shares: Vec<ShareBack>,
    pub(super) current_file: Option<(File, PathBuf)>,
    /// Wakes the [`StdinPump`] when the init said hello.
    pub(super) wake: EventFd,
    /// Written when the session is over (the command's status or an
    /// error arrived, or the stream broke), so the run loop sees it at
    /// once when the session is decoded on another thread ([`EndWatch`]).
    pub(super) ended: EventFd,
    /// Signals are forwarded to the command (see `forward.rs`); off in
    /// unit tests, which must not touch the process-wide state.
    pub(super) forwarding: bool,
    /// The command started (and has not exited).
    pub(super) command_running: bool,
    /// How long the command has to end after a forwarded stopping
    /// signal before the VM is stopped (`None`: for as long as it takes).
    pub(super) stop_timeout: Option<Duration>,
    /// The stopping signal forwarded and when the VM is stopped if the
    /// command has not ended.
    pub(super) stop_deadline: Option<(Instant, libc::c_int)>,
    /// The command has a terminal: SIGWINCH becomes a `Resize` frame.
    pub(super) tty: bool,
    /// The terminal's size was sent once the command started.
    pub(super) tty_sized: bool,
}

/// Wakes the run loop when the session is over: subscribed to
/// [`Session::ended`]; the loop's check then finds why.
pub(super) struct EndWatch(pub(super) EventFd);

impl MutEventSubscriber for EndWatch {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("exec: cannot watch the session's end: {e}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.read();
    }
}

/// Why the run loop stopped on the host's initiative.
#[derive(Debug)]
pub(super) enum Stop {
    Finished,
    TimedOut(Duration),
    Failed(String),
    /// The guest went quiet: no hello within the boot timeout, or no
    /// message for [`STALL_TIMEOUT`] after it. Ends as `Failed` does;
    /// the run loop logs the quiet guest's state first
    /// ([`crate::stall`]).
    Quiet(String),
    /// The command did not end within the stop timeout of this
    /// forwarded signal.
    Unanswered(libc::c_int, Duration),
}

impl Session {
    pub(super) fn check(&mut self) -> Option<Stop> {
        let gap = self.last_check.elapsed();
        self.last_check = Instant::now();
        if gap >= HOST_STOPPED {
            // capsule itself did not run (SIGSTOP: the containerd shim's
            // pause), so neither did the guest: its silence is no stall.
            self.last_message = Instant::now();
        }
        if self.exit.is_some() || self.error.is_some() {
            return Some(Stop::Finished);
        }
        if let Some(why) = &self.broken {
            return Some(Stop::Failed(why.clone()));
        }
        if let Some((at, sig)) = self.stop_deadline {
            if Instant::now() >= at {
                crate::signals::stop_with(sig);
                return Some(Stop::Unanswered(sig, self.stop_timeout.unwrap_or_default()));
            }
        }
        let elapsed = self.started.elapsed();
        if let Some(t) = self.timeout {
            if elapsed >= t {
                return Some(Stop::TimedOut(t));
            }
        }
        if !self.hello && elapsed >= self.boot_timeout {
            return Some(Stop::Quiet(format!(
                "the guest did not start capsule's init within {} s (kernel boot failed or hung)",
                self.boot_timeout.as_secs()
            )));
        }
        if self.hello && self.last_message.elapsed() >= STALL_TIMEOUT {
            return Some(Stop::Quiet(format!(
                "the guest stopped responding: no message from its init for {} s",
                STALL_TIMEOUT.as_secs()
            )));
        }
        None
    }

    fn write_out(&mut self, stderr: bool, data: &[u8]) {
        let f = if stderr {
            &mut self.stderr
        } else {
            &mut self.stdout
        };
        if let Err(e) = f.write_all(data) {
            if !self.output_failed {
                log::warn!("cannot write the command's output: {e}");
                self.output_failed = true;
            }
        }
    }

    pub(super) fn handle(&mut self, msg: GuestMsg) {
        self.last_message = Instant::now();
        match msg {
            GuestMsg::Hello { version } => {
                if version != exec_proto::VERSION {
                    self.broken = Some(format!(
                        "the guest init speaks protocol {version}, not {}",
                        exec_proto::VERSION
                    ));
                    return;
                }
                log::info!(
                    "guest init up {} ms after capsule started",
                    self.started.elapsed().as_millis()
                );
                self.hello = true;
                let _ = self.wake.write(1);
            }
            GuestMsg::Stdout(d) => self.write_out(false, &d),
            GuestMsg::Stderr(d) => self.write_out(true, &d),
            GuestMsg::Started => {
                log::info!(
                    "command started {} ms after capsule started",
                    self.started.elapsed().as_millis()
                );
                self.command_started();
            }
            GuestMsg::Heartbeat => {}
            // Sent only on an events watch of the exec port; logged should
            // an init send one here.
            GuestMsg::Oom(n) => log::warn!("the guest's OOM killer killed {n} processes"),
            GuestMsg::Exit(status) => {
                self.command_ended();
                self.current_file = None;
                self.exit = Some(status);
                let _ = self.ended.write(1);
            }
            GuestMsg::Error(m) => {
                self.error = Some(m);
                let _ = self.ended.write(1);
            }
            GuestMsg::File { share, mode, path } => {
                self.current_file = None;
                match self.create(share, &path, false, mode) {
                    Ok(Some(f)) => self.current_file = Some((f, PathBuf::from(path))),
                    Ok(None) => {}
                    Err(e) => self.copy_failed(&path, e),
                }
            }
            GuestMsg::FileData(d) => {
                if let Some((f, path)) = self.current_file.as_mut() {
                    if let Err(e) = f.write_all(&d) {
                        let path = path.display().to_string();
                        self.current_file = None;
                        self.copy_failed(&path, e);
                    }
                }
            }
            GuestMsg::Dir { share, mode, path } => {
                self.current_file = None;
                if let Err(e) = self.create(share, &path, true, mode) {
                    self.copy_failed(&path, e);
                }
            }
        }
    }
}

/// The virtio-console output: decodes frames and hands them to the session.
pub(super) struct Sink {
    pub(super) session: Arc<Mutex<Session>>,
    pub(super) decoder: Decoder,
}

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.decoder.push(data);
        let mut session = lock(&self.session);
        loop {
            match self
                .decoder
                .next_frame()
                .and_then(|f| f.map(GuestMsg::parse).transpose())
            {
                Ok(Some(msg)) => session.handle(msg),
                Ok(None) => break,
                Err(e) => {
                    self.decoder.fail(e.clone());
                    if session.broken.is_none() {
                        session.broken =
                            Some(format!("the guest init sent a malformed message: {e}"));
                        let _ = session.ended.write(1);
                    }
                    break;
                }
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::exec) fn session(shares: Vec<ShareBack>) -> Session {
        let null = || File::options().write(true).open("/dev/null").unwrap();
        Session {
            started: Instant::now(),
            timeout: None,
            boot_timeout: Duration::from_secs(60),
            hello: false,
            last_message: Instant::now(),
            last_check: Instant::now(),
            exit: None,
            error: None,
            broken: None,
            copy_error: None,
            stdout: null(),
            stderr: null(),
            output_failed: false,
            shares,
            current_file: None,
            wake: devices::eventfd().unwrap(),
            ended: devices::eventfd().unwrap(),
            forwarding: false,
            command_running: false,
            stop_timeout: None,
            stop_deadline: None,
            tty: false,
            tty_sized: false,
        }
    }

    #[test]
    fn malformed_stream_breaks_the_session() {
        let s = Arc::new(Mutex::new(session(vec![])));
        let mut sink = Sink {
            session: s.clone(),
            decoder: Decoder::new(),
        };
        sink.write_all(&[0x7e, 0, 0, 0, 0]).unwrap();
        sink.write_all(&[0x02, 1, 0, 0, 0, b'x']).unwrap();
        let mut s = lock(&s);
        assert!(matches!(s.check(), Some(Stop::Failed(_))));
    }

    /// A file that vanishes from the directory at once; read back with
    /// its second descriptor.
    fn scratch() -> (File, File) {
        let dir = crate::exec::link::PrivateDir::new().unwrap();
        let path = dir.join("out");
        let w = File::create(&path).unwrap();
        let r = File::open(&path).unwrap();
        (w, r)
    }

    /// Interleaved stdout and stderr frames of every size up to the
    /// largest, cut into the pieces either channel hands over (the
    /// console's 64 KiB bounce buffer, the vsock link's 256 KiB reads, odd
    /// sizes), come out as the two streams, each byte for byte.
    #[test]
    fn stdout_and_stderr_come_apart_intact_however_the_stream_is_cut() {
        use std::io::Read;
        // Bytes that look like frame headers too (kinds 0x02/0x03).
        let pattern = |seed: u32, len: usize| -> Vec<u8> {
            let mut x = seed.wrapping_mul(2_654_435_761).max(1);
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x.to_le_bytes()[0]
                })
                .collect()
        };
        let sizes = [
            1,
            5,
            4096,
            65_535,
            65_536,
            65_537,
            exec_proto::MAX_PAYLOAD,
            0,
            3,
        ];
        let (mut want_out, mut want_err, mut stream) = (Vec::new(), Vec::new(), Vec::new());
        for (i, &n) in sizes.iter().cycle().take(40).enumerate() {
            let data = pattern(i as u32, n);
            if i % 3 == 1 {
                want_err.extend_from_slice(&data);
                GuestMsg::Stderr(data).encode(&mut stream);
            } else {
                want_out.extend_from_slice(&data);
                GuestMsg::Stdout(data).encode(&mut stream);
            }
        }
        GuestMsg::Exit(3).encode(&mut stream);
        for cut in [65_536, 262_144, 4093, 7] {
            let (out_w, mut out_r) = scratch();
            let (err_w, mut err_r) = scratch();
            let mut s = session(vec![]);
            s.stdout = out_w;
            s.stderr = err_w;
            let s = Arc::new(Mutex::new(s));
            let mut sink = Sink {
                session: s.clone(),
                decoder: Decoder::new(),
            };
            for piece in stream.chunks(cut) {
                sink.write_all(piece).unwrap();
            }
            assert_eq!(lock(&s).exit, Some(3), "cut {cut}");
            assert!(lock(&s).broken.is_none(), "cut {cut}");
            let (mut got_out, mut got_err) = (Vec::new(), Vec::new());
            out_r.read_to_end(&mut got_out).unwrap();
            err_r.read_to_end(&mut got_err).unwrap();
            assert!(got_out == want_out, "stdout differs, cut {cut}");
            assert!(got_err == want_err, "stderr differs, cut {cut}");
        }
    }

    #[test]
    fn deadlines() {
        let mut s = session(vec![]);
        assert!(s.check().is_none());
        s.boot_timeout = Duration::ZERO;
        assert!(matches!(s.check(), Some(Stop::Quiet(m)) if m.contains("init")));
        s.hello = true;
        s.timeout = Some(Duration::ZERO);
        assert!(matches!(s.check(), Some(Stop::TimedOut(_))));
        s.timeout = None;
        s.last_message = Instant::now() - STALL_TIMEOUT;
        assert!(matches!(s.check(), Some(Stop::Quiet(m)) if m.contains("stopped responding")));
        // capsule was stopped (SIGSTOP) meanwhile: the guest was too.
        s.last_message = Instant::now() - STALL_TIMEOUT;
        s.last_check = Instant::now() - HOST_STOPPED;
        assert!(s.check().is_none(), "no stall after a pause");
        s.exit = Some(0);
        assert!(matches!(s.check(), Some(Stop::Finished)));
    }
}
