//! Host stdin to the guest: a reader thread and an event-loop
//! subscriber that feeds the virtio console at the pace the guest takes it.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use devices::virtio::console::{Console as VirtioConsole, INPUT_HIGH_WATER};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use exec_proto::{HostMsg, MAX_PAYLOAD};
use vmm_sys_util::eventfd::EventFd;

use super::session::Session;
use super::{lock, STDIN_CHUNK};

/// What the stdin reader thread sends.
pub(super) enum StdinChunk {
    Data(Vec<u8>),
    Eof,
}

/// Feeds the time and then host stdin to the guest, at the pace it takes
/// them: a thread reads stdin (any kind of file) into a small bounded
/// channel; this subscriber moves chunks into the console only while the
/// console's pending input is below its high-water mark.
pub(super) struct StdinPump {
    pub(super) console: Arc<Mutex<VirtioConsole>>,
    pub(super) session: Arc<Mutex<Session>>,
    pub(super) wake: EventFd,
    pub(super) data_ready: EventFd,
    pub(super) room: EventFd,
    pub(super) chunks: Receiver<StdinChunk>,
    pub(super) time_sent: bool,
    pub(super) done: bool,
}

impl StdinPump {
    pub(super) fn pump(&mut self) {
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
            lock(&self.console).queue_input(&frame);
            self.time_sent = true;
        }
        let mut signals = Vec::new();
        lock(&self.session).forward_signals(&mut signals);
        let mut console = lock(&self.console);
        if !signals.is_empty() {
            console.queue_input(&signals);
        }
        while !self.done && console.pending_input() < INPUT_HIGH_WATER {
            let mut frame = Vec::new();
            match self.chunks.try_recv() {
                Ok(StdinChunk::Data(d)) => {
                    for part in d.chunks(MAX_PAYLOAD) {
                        HostMsg::Stdin(part.to_vec()).encode(&mut frame);
                    }
                }
                Ok(StdinChunk::Eof) | Err(TryRecvError::Disconnected) => {
                    HostMsg::StdinEof.encode(&mut frame);
                    self.done = true;
                }
                Err(TryRecvError::Empty) => break,
            }
            console.queue_input(&frame);
        }
    }
}

impl MutEventSubscriber for StdinPump {
    fn init(&mut self, ops: &mut EventOps) {
        for evt in [&self.wake, &self.data_ready, &self.room] {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                log::error!("exec: cannot watch stdin events: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        for evt in [&self.wake, &self.data_ready, &self.room] {
            if events.fd() == std::os::fd::AsRawFd::as_raw_fd(evt) {
                let _ = evt.read();
            }
        }
        self.pump();
    }
}

/// Starts the thread that reads host stdin.
pub(super) fn spawn_stdin_reader(ready: EventFd) -> io::Result<Receiver<StdinChunk>> {
    let (tx, rx): (SyncSender<StdinChunk>, _) = mpsc::sync_channel(8);
    let mut stdin = match io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => File::from(fd),
        Err(e) => {
            // No usable stdin (e.g. closed): the command gets end of file.
            log::debug!("stdin unavailable ({e}); the command gets end of file");
            let _ = tx.send(StdinChunk::Eof);
            let _ = ready.write(1);
            return Ok(rx);
        }
    };
    std::thread::Builder::new()
        .name("exec-stdin".into())
        .spawn(move || {
            if let Err(e) = crate::confine::helper_thread(crate::seccomp::ThreadKind::ExecStdin) {
                log::error!("{e}; the command gets end of file");
                let _ = tx.send(StdinChunk::Eof);
                let _ = ready.write(1);
                return;
            }
            let mut buf = vec![0u8; STDIN_CHUNK];
            loop {
                let chunk = match stdin.read(&mut buf) {
                    Ok(0) => StdinChunk::Eof,
                    Ok(n) => StdinChunk::Data(buf[..n].to_vec()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("cannot read stdin: {e}");
                        StdinChunk::Eof
                    }
                };
                let eof = matches!(chunk, StdinChunk::Eof);
                if tx.send(chunk).is_err() {
                    return;
                }
                let _ = ready.write(1);
                if eof {
                    return;
                }
            }
        })?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::exec::session::tests::session;

    #[test]
    fn stdin_waits_for_hello_then_time_then_flows_with_back_pressure() {
        let s = Arc::new(Mutex::new(session(vec![])));
        let console = Arc::new(Mutex::new(
            VirtioConsole::new(Box::new(io::sink())).unwrap(),
        ));
        let (tx, rx) = mpsc::sync_channel(8);
        let evt = || devices::eventfd().unwrap();
        let mut pump = StdinPump {
            console: console.clone(),
            session: s.clone(),
            wake: evt(),
            data_ready: evt(),
            room: evt(),
            chunks: rx,
            time_sent: false,
            done: false,
        };
        tx.send(StdinChunk::Data(b"early".to_vec())).unwrap();
        pump.pump();
        // Nothing before the init said hello (the console is not active,
        // so queued input stays pending and can be inspected).
        assert_eq!(lock(&console).pending_input(), 0);
        lock(&s).hello = true;
        pump.pump();
        // The time frame (5 + 12 bytes), then stdin (5 + 5 bytes).
        assert_eq!(lock(&console).pending_input(), 17 + 10);
        // Above the high-water mark the channel is no longer drained.
        tx.send(StdinChunk::Data(vec![0; INPUT_HIGH_WATER]))
            .unwrap();
        pump.pump();
        let high = lock(&console).pending_input();
        assert_eq!(
            high,
            27 + INPUT_HIGH_WATER + 5 * INPUT_HIGH_WATER.div_ceil(MAX_PAYLOAD)
        );
        tx.send(StdinChunk::Eof).unwrap();
        pump.pump();
        assert_eq!(lock(&console).pending_input(), high);
        assert!(!pump.done);
    }
}
