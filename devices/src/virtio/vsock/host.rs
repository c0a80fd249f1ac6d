//! The host side of the vsock device: the listener for host clients and
//! their `CONNECT <port>` line, forwarding guest connections to
//! `<uds_path>_<port>`, and which host descriptors the event loop watches.

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use event_manager::{EventOps, EventSet, Events};

use super::conn::{ConnState, Connection};
use super::packet::{Header, SHUTDOWN_RCV, SHUTDOWN_SEND};

use super::{Vsock, MAX_CONNECTIONS};
use crate::virtio::VirtioCommon;

/// First host port given to host-initiated connections.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line accepted.
pub const MAX_CONNECT_LINE: usize = 32;
/// The listener's event-loop tag; connections and clients get others.
const LISTENER: u32 = 0;
/// Largest tag handed out (device tags are offset by the common code).
const MAX_TAG: u32 = 1 << 24;

/// A host client that has not finished its `CONNECT` line.
#[derive(Debug)]
pub struct PendingClient {
    /// Its stream.
    pub stream: UnixStream,
    line: Vec<u8>,
}

/// What a host client's line says.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// Not complete yet.
    Partial,
    /// `CONNECT <port>`.
    Connect(u32),
    /// Anything else, or the client left.
    Bad(&'static str),
}

impl PendingClient {
    /// Reads the client's line a byte at a time, so that nothing the
    /// client sends after it (data for the guest) is consumed here.
    fn read_line(&mut self) -> Line {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return Line::Bad("closed before its CONNECT line"),
                Ok(_) if byte[0] == b'\n' => return parse_connect(&self.line),
                Ok(_) if self.line.len() >= MAX_CONNECT_LINE => {
                    return Line::Bad("CONNECT line too long")
                }
                Ok(_) => self.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Line::Partial,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Line::Bad("read failed"),
            }
        }
    }
}

/// Parses `CONNECT <port>` (the newline already removed).
fn parse_connect(line: &[u8]) -> Line {
    let text = std::str::from_utf8(line).unwrap_or("");
    let text = text.strip_suffix('\r').unwrap_or(text);
    match text.split_once(' ') {
        Some(("CONNECT", port)) => match port.trim().parse::<u32>() {
            Ok(p) => Line::Connect(p),
            Err(_) => Line::Bad("bad port in CONNECT line"),
        },
        _ => Line::Bad("not a CONNECT line"),
    }
}

/// `<uds_path>_<port>`: where guest connections to `port` go.
pub fn forward_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = OsString::from(uds_path.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connects to the Unix stream listener at `path` without blocking: a
/// listener whose backlog is full refuses (`EAGAIN`) instead of stalling
/// the event loop.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).map_err(io::Error::other)?;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket this function owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>())
        .map_err(io::Error::other)?;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes that outlives
    // the call.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

impl Vsock {
    /// A tag no connection or client uses.
    fn alloc_tag(&mut self) -> u32 {
        loop {
            let tag = self.next_tag;
            self.next_tag = if tag >= MAX_TAG { 1 } else { tag + 1 };
            if !self.tags.contains_key(&tag) && !self.clients.contains_key(&tag) {
                return tag;
            }
        }
    }

    /// A host port no connection uses, for a host-initiated connection.
    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.values().any(|c| c.local_port == port) {
                return port;
            }
        }
    }

    fn at_capacity(&self) -> bool {
        self.conns.len() + self.clients.len() >= MAX_CONNECTIONS
    }

    /// A guest `REQUEST` to host port `hdr.dst_port`: connect to its
    /// listener, or refuse.
    pub(super) fn guest_connect(&mut self, hdr: &Header) {
        if self.at_capacity() {
            crate::warn_ratelimited!(
                "virtio-vsock: {MAX_CONNECTIONS} connections open; guest connection to port {} refused",
                hdr.dst_port
            );
            self.stray_reset(hdr);
            return;
        }
        let path = forward_path(&self.uds_path, hdr.dst_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let tag = self.alloc_tag();
                let c = Connection::guest_init(stream, tag, self.cid, hdr);
                let key = (c.local_port, c.peer_port);
                self.tags.insert(tag, key);
                self.conns.insert(key, c);
                self.queue_rx(key);
            }
            Err(e) => {
                log::debug!(
                    "virtio-vsock: guest connection to port {} refused: {}: {e}",
                    hdr.dst_port,
                    path.display()
                );
                self.stray_reset(hdr);
            }
        }
    }

    /// Accepts host clients while there is room.
    fn accept(&mut self, ops: &mut EventOps) {
        while !self.at_capacity() {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    crate::warn_ratelimited!("virtio-vsock: accept failed: {e}");
                    return;
                }
            };
            if let Err(e) = stream.set_nonblocking(true) {
                crate::warn_ratelimited!("virtio-vsock: client dropped: {e}");
                continue;
            }
            let tag = self.alloc_tag();
            let events = VirtioCommon::device_events(stream.as_raw_fd(), tag, EventSet::IN);
            if let Err(e) = ops.add(events) {
                crate::error_ratelimited!("virtio-vsock: cannot watch a client: {e}");
                continue;
            }
            let mut client = PendingClient {
                stream,
                line: Vec::new(),
            };
            // The line may already be there.
            match client.read_line() {
                Line::Partial => {
                    self.clients.insert(tag, client);
                }
                line => {
                    self.clients.insert(tag, client);
                    self.client_line(tag, line);
                }
            }
        }
    }

    /// A client's line is complete (or broken): open the connection to
    /// the guest, or drop the client.
    fn client_line(&mut self, tag: u32, line: Line) {
        let Some(client) = self.clients.remove(&tag) else {
            return;
        };
        match line {
            Line::Partial => {
                self.clients.insert(tag, client);
            }
            Line::Bad(why) => {
                log::debug!("virtio-vsock: host client dropped: {why}");
                self.closing.push((client.stream, true));
            }
            Line::Connect(port) => {
                let local = self.alloc_local_port();
                let mut c = Connection::host_init(client.stream, tag, self.cid, local, port);
                c.registered = Some(EventSet::IN);
                let key = (local, port);
                self.tags.insert(tag, key);
                self.conns.insert(key, c);
                self.queue_rx(key);
            }
        }
    }

    /// A host descriptor of the device is ready.
    pub(super) fn host_event(&mut self, tag: u32, set: EventSet, ops: &mut EventOps) {
        if tag == LISTENER {
            self.accept(ops);
            return;
        }
        if let Some(client) = self.clients.get_mut(&tag) {
            let line = client.read_line();
            self.client_line(tag, line);
            return;
        }
        let Some(&key) = self.tags.get(&tag) else {
            return; // a stream already closed
        };
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let hangup = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if set.intersects(EventSet::IN) || hangup {
            c.readable = true;
        }
        if hangup && c.state == ConnState::Established {
            // The host end is gone for good: once its last bytes are
            // read, the guest hears that it neither sends nor receives.
            c.owe_shutdown_on_eof(SHUTDOWN_RCV | SHUTDOWN_SEND);
        }
        let verdict = if set.intersects(EventSet::OUT) || hangup {
            c.flush()
        } else {
            super::conn::Verdict::Keep
        };
        self.apply(key, verdict);
    }

    /// Brings the event loop's view in line with what each host
    /// descriptor should be watched for, and closes what is done.
    pub(super) fn sync_registrations(&mut self, ops: &mut EventOps) {
        for (stream, registered) in self.closing.drain(..) {
            if registered {
                let _ = ops.remove(Events::empty_raw(stream.as_raw_fd()));
            }
        }
        let want = self.common.is_activated() && !self.at_capacity();
        if want != self.listener_registered {
            let fd = self.listener.as_raw_fd();
            let r = if want {
                ops.add(VirtioCommon::device_events(fd, LISTENER, EventSet::IN))
            } else {
                ops.remove(Events::empty_raw(fd))
            };
            match r {
                Ok(()) => self.listener_registered = want,
                Err(e) => crate::error_ratelimited!("virtio-vsock: cannot watch the listener: {e}"),
            }
        }
        for c in self.conns.values_mut() {
            let want = c.wanted_events();
            let fd = c.stream.as_raw_fd();
            let r = match (c.registered, want.is_empty()) {
                (Some(cur), false) if cur == want => continue,
                (None, true) => continue,
                (Some(_), false) => ops.modify(VirtioCommon::device_events(fd, c.tag, want)),
                (None, false) => ops.add(VirtioCommon::device_events(fd, c.tag, want)),
                (Some(_), true) => ops.remove(Events::empty_raw(fd)),
            };
            match r {
                Ok(()) => c.registered = (!want.is_empty()).then_some(want),
                Err(e) => crate::error_ratelimited!(
                    "virtio-vsock: cannot update the watch of port {}: {e}",
                    c.local_port
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_are_parsed_strictly() {
        assert_eq!(parse_connect(b"CONNECT 52"), Line::Connect(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Line::Connect(52));
        assert!(matches!(parse_connect(b"CONNECT"), Line::Bad(_)));
        assert!(matches!(parse_connect(b"CONNECT -1"), Line::Bad(_)));
        assert!(matches!(parse_connect(b"CONNECT 4294967296"), Line::Bad(_)));
        assert!(matches!(parse_connect(b"connect 5"), Line::Bad(_)));
        assert!(matches!(parse_connect(b"\xff\xfe 5"), Line::Bad(_)));
    }

    #[test]
    fn forward_paths_append_the_port() {
        assert_eq!(
            forward_path(Path::new("/run/v.sock"), 52),
            PathBuf::from("/run/v.sock_52")
        );
    }
}
