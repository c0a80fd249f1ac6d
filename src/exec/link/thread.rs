//! The link on a thread of its own, with its own event loop.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use super::VsockLink;
use crate::exec::lock;

/// The link on a thread of its own, with its own event loop. Under load
/// the event loop that runs the devices is busy moving the guest's bytes
/// into the session's socket; reading them out, decoding the frames and
/// writing the command's output is as much work again, and on its own
/// thread it runs beside, not after, the device's share (issue 18's
/// exec throughput). Stopped and joined when dropped.
pub(in crate::exec) struct LinkThread {
    stop: Arc<AtomicBool>,
    /// Wakes the thread's loop to see `stop` (the stdin reader's eventfd:
    /// a spurious wake-up finds no chunk and is harmless).
    nudge: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl LinkThread {
    /// Starts `link` on the `exec-link` thread. Called before the VM is
    /// built: once the main thread has its filter it can start no thread.
    /// So the thread confines itself, as the other helper threads do: the
    /// Landlock paths registered so far (the writable shares among them,
    /// for copy-back) and the main thread's seccomp list (`vmm`), whose
    /// calls are those the link made on the main thread.
    pub(in crate::exec) fn spawn(link: VsockLink) -> io::Result<Self> {
        let nudge = link.data_ready.try_clone()?;
        let session = link.session.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(|e| io::Error::other(format!("event loop: {e:?}")))?;
        em.add_subscriber(Arc::new(Mutex::new(link)));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("exec-link".into())
            .spawn(move || {
                if let Err(e) = crate::confine::helper_thread(crate::seccomp::ThreadKind::Vmm) {
                    let mut s = lock(&session);
                    s.broken = Some(format!("the session's thread cannot run: {e}"));
                    let _ = s.ended.write(1);
                    return;
                }
                while !flag.load(Ordering::Acquire) {
                    if let Err(e) = em.run_with_timeout(LINK_TICK_MS) {
                        log::error!("exec: the session's event loop failed: {e:?}");
                        return;
                    }
                }
            })?;
        Ok(Self {
            stop,
            nudge,
            handle: Some(handle),
        })
    }
}

impl Drop for LinkThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.nudge.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The link thread's loop wakes at least this often (ms) to see a stop.
const LINK_TICK_MS: i32 = 200;

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::mpsc;

    use exec_proto::{GuestMsg, MAX_PAYLOAD};

    use super::*;
    use crate::exec::link::tests::link_on;
    use crate::exec::link::PrivateDir;
    use crate::exec::session::tests::session;
    use crate::exec::stdin::StdinChunk;

    /// The link on its own thread: the output arrives, the end of the
    /// session is signalled to the run loop, and dropping the thread
    /// stops it at once.
    #[test]
    fn the_link_thread_carries_the_session_and_stops_when_dropped() {
        let dir = PrivateDir::new().unwrap();
        let path = dir.join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let session = Arc::new(Mutex::new(session(vec![])));
        let ended = lock(&session).ended.try_clone().unwrap();
        let (tx, rx) = mpsc::sync_channel(1);
        tx.send(StdinChunk::Eof).unwrap();
        let link = link_on(
            listener,
            &session,
            devices::eventfd().unwrap(),
            devices::eventfd().unwrap(),
            rx,
        );
        let thread = LinkThread::spawn(link).unwrap();
        let mut guest = UnixStream::connect(&path).unwrap();
        let mut frames = Vec::new();
        GuestMsg::Hello {
            version: exec_proto::VERSION,
        }
        .encode(&mut frames);
        GuestMsg::Stdout(vec![b'x'; MAX_PAYLOAD]).encode(&mut frames);
        GuestMsg::Exit(3).encode(&mut frames);
        guest.write_all(&frames).unwrap();
        // The end is signalled.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while ended.read().is_err() {
            assert!(std::time::Instant::now() < deadline, "no end signalled");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(lock(&session).exit, Some(3));
        let t0 = std::time::Instant::now();
        drop(thread);
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(1),
            "stopped in {:?}",
            t0.elapsed()
        );
    }
}
