//! One vsock stream connection between a guest socket and a host Unix
//! stream, with its credit accounting (virtio 1.2 §5.10.6.3).
//!
//! Each side tells the other how big its receive buffer is (`buf_alloc`)
//! and how many bytes it has consumed so far (`fwd_cnt`); a sender may
//! have at most `buf_alloc - (sent - fwd_cnt)` bytes in flight.
//!
//! * Guest → host: the device offers [`CONN_BUF_ALLOC`] bytes. A payload
//!   is written from guest memory straight to the host stream where it
//!   takes it; what it does not take is copied to `tx_buf`, which
//!   therefore never holds more than `CONN_BUF_ALLOC` bytes: a guest that
//!   sends past its credit is a broken or hostile driver and its
//!   connection is reset. `fwd_cnt` counts bytes written to the host
//!   stream; the guest hears of it with every packet and by a
//!   `CREDIT_UPDATE` once the room it knows of fell below half its
//!   window while more was made (Linux never asks for credit: a sender
//!   that ran out waits for the receiver to speak). The window is the
//!   smaller of the credit offered and the guest's own `buf_alloc`:
//!   Linux sends at most that much unacknowledged (its
//!   `virtio_transport_tx_buf_size`), so a guest with a smaller socket
//!   buffer than capsule's stops short of the credit, and an update
//!   reckoned against the credit alone would never come.
//! * Host → guest: the host stream is read straight into a receive chain,
//!   and only as much as the guest's credit allows, so nothing is
//!   buffered on the host: a slow guest leaves the bytes in the host
//!   socket.
//!
//! Control packets owed to the guest are flags here, not a queue, so a
//! guest that floods requests without posting receive buffers cannot
//! make them pile up.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use event_manager::EventSet;

use super::packet::{op, Header, RxChain, TxPayload, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::HOST_CID;
use crate::GuestMemoryMmap;

/// A transmit packet's payload, in guest memory.
pub struct Payload<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// Where the bytes are.
    pub data: &'a TxPayload,
}

/// Receive buffer the device offers the guest per connection: the most
/// guest data capsule holds for one connection.
pub const CONN_BUF_ALLOC: u32 = 1024 * 1024;

/// Control packets owed to the guest (bits of `Connection::owed`), in the
/// order they are sent.
mod owed {
    pub const RST: u8 = 1;
    pub const REQUEST: u8 = 2;
    pub const RESPONSE: u8 = 4;
    pub const SHUTDOWN: u8 = 8;
    pub const CREDIT_UPDATE: u8 = 16;
    pub const CREDIT_REQUEST: u8 = 32;
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// A host client asked for it; `REQUEST` sent (or owed) to the guest,
    /// waiting for its `RESPONSE`.
    HostInit,
    /// Both sides may exchange data.
    Established,
}

/// What the device must do with a connection after a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it.
    Keep,
    /// Reset it: send the guest a `RST` and close the host stream.
    Reset,
    /// Close the host stream and forget it; the guest already did
    /// (it sent `RST`).
    Drop,
}

/// What went through a connection, for its closing log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// `RW` packets from the guest.
    pub rw_in: u64,
    /// Their payload bytes.
    pub bytes_in: u64,
    /// Of those, packets the host socket did not take whole at once.
    pub held: u64,
    /// `RW` packets to the guest.
    pub rw_out: u64,
    /// Their payload bytes.
    pub bytes_out: u64,
    /// `CREDIT_UPDATE`s sent to the guest.
    pub updates: u64,
    /// `CREDIT_REQUEST`s sent to the guest.
    pub requests: u64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let avg = |b: u64, n: u64| b.checked_div(n).unwrap_or(0);
        write!(
            f,
            "from the guest {} bytes in {} packets ({} B each, {} not taken whole by the host), to the guest {} bytes in {} packets ({} B each), {} credit updates, {} credit requests",
            self.bytes_in,
            self.rw_in,
            avg(self.bytes_in, self.rw_in),
            self.held,
            self.bytes_out,
            self.rw_out,
            avg(self.bytes_out, self.rw_out),
            self.updates,
            self.requests
        )
    }
}

/// A connection between guest port `peer_port` and host port
/// `local_port`, carried on `stream`.
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// The device's event-loop tag for `stream`.
    pub tag: u32,
    /// Port on the host (CID 2) side.
    pub local_port: u32,
    /// Port on the guest side.
    pub peer_port: u32,
    /// The guest's CID.
    guest_cid: u64,
    /// State.
    pub state: ConnState,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest.
    rx_cnt: u32,
    /// Payload bytes written to the host stream.
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_told: u32,
    /// Written to the host stream before any data (`OK <port>\n`).
    reply: Vec<u8>,
    /// Guest data the host stream has not taken yet.
    tx_buf: VecDeque<u8>,
    /// Control packets owed to the guest.
    owed: u8,
    /// `SHUTDOWN` flags owed to the guest.
    shutdown_flags: u32,
    /// Directions the guest shut down.
    guest_shut: u32,
    /// The host stream's write side was shut down.
    host_wr_shut: bool,
    /// The host stream reached end of file.
    host_eof: bool,
    /// The `SHUTDOWN` flags the guest gets at the host stream's end of
    /// file: `SEND`, or both once the host end hung up altogether.
    eof_flags: u32,
    /// The host stream reported readable (or hang-up) and has not yet
    /// read `EAGAIN`: it is not polled for input meanwhile.
    pub readable: bool,
    /// A `CREDIT_REQUEST` went out since the guest last gave credit.
    credit_asked: bool,
    /// What `stream` is registered for in the event loop.
    pub registered: Option<EventSet>,
    /// Already in the device's receive round-robin.
    pub queued: bool,
    /// What went through it.
    pub stats: Stats,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("local_port", &self.local_port)
            .field("peer_port", &self.peer_port)
            .field("state", &self.state)
            .field("peer_buf_alloc", &self.peer_buf_alloc)
            .field("peer_fwd_cnt", &self.peer_fwd_cnt)
            .field("rx_cnt", &self.rx_cnt)
            .field("fwd_cnt", &self.fwd_cnt)
            .field("fwd_cnt_told", &self.fwd_cnt_told)
            .field("held", &self.tx_buf.len())
            .field("owed", &self.owed)
            .field("guest_shut", &self.guest_shut)
            .field("host_eof", &self.host_eof)
            .field("readable", &self.readable)
            .field("registered", &self.registered)
            .field("queued", &self.queued)
            .finish()
    }
}

impl Connection {
    /// A connection the guest asked for (its `REQUEST` to host port
    /// `local_port` was accepted by a host listener on `stream`); a
    /// `RESPONSE` is owed.
    pub fn guest_init(stream: UnixStream, tag: u32, guest_cid: u64, req: &Header) -> Self {
        let mut c = Self::new(stream, tag, guest_cid, req.dst_port, req.src_port);
        c.state = ConnState::Established;
        c.update_credit(req);
        c.owed |= owed::RESPONSE;
        c.readable = true;
        c
    }

    /// A connection a host client asked for, to guest port `peer_port`
    /// from host port `local_port`; a `REQUEST` is owed.
    pub fn host_init(
        stream: UnixStream,
        tag: u32,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
    ) -> Self {
        let mut c = Self::new(stream, tag, guest_cid, local_port, peer_port);
        c.owed |= owed::REQUEST;
        c
    }

    fn new(stream: UnixStream, tag: u32, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            tag,
            local_port,
            peer_port,
            guest_cid,
            state: ConnState::HostInit,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            reply: Vec::new(),
            tx_buf: VecDeque::new(),
            owed: 0,
            shutdown_flags: 0,
            guest_shut: 0,
            host_wr_shut: false,
            host_eof: false,
            eof_flags: SHUTDOWN_SEND,
            readable: false,
            credit_asked: false,
            registered: None,
            queued: false,
            stats: Stats::default(),
        }
    }

    /// Guest data held for the host stream.
    pub fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// Bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_host_data(&self) -> bool {
        !self.resetting()
            && self.state == ConnState::Established
            && !self.host_eof
            && self.guest_shut & SHUTDOWN_RCV == 0
    }

    /// What the host stream should be polled for now.
    pub fn wanted_events(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.wants_host_data() && !self.readable {
            set |= EventSet::IN;
        }
        if !self.reply.is_empty() || !self.tx_buf.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Whether a packet for the guest is waiting (control, or host data
    /// the guest has credit for). Asks for credit when data waits for it.
    pub fn has_rx_work(&mut self) -> bool {
        if self.owed != 0 {
            return true;
        }
        if self.readable && self.wants_host_data() {
            if self.peer_credit() > 0 {
                return true;
            }
            if !self.credit_asked {
                self.credit_asked = true;
                self.owed |= owed::CREDIT_REQUEST;
                return true;
            }
        }
        false
    }

    /// A header from this connection to the guest; it carries (and so
    /// announces) the current credit.
    fn header(&mut self, op: u16, len: u32, flags: u32) -> Header {
        self.fwd_cnt_told = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The next packet for the guest, whose payload (if any) is read from
    /// the host stream straight into `rx` (within the guest's credit).
    /// `None` when there is nothing to send after all (the host stream had
    /// no data). The verdict is `Drop` after a `RST` went out.
    pub fn next_rx(&mut self, mem: &GuestMemoryMmap, rx: &RxChain) -> (Option<Header>, Verdict) {
        for bit in [
            owed::RST,
            owed::REQUEST,
            owed::RESPONSE,
            owed::SHUTDOWN,
            owed::CREDIT_UPDATE,
            owed::CREDIT_REQUEST,
        ] {
            if self.owed & bit == 0 {
                continue;
            }
            self.owed &= !bit;
            let (op, flags) = match bit {
                owed::RST => return (Some(self.header(op::RST, 0, 0)), Verdict::Drop),
                owed::REQUEST => (op::REQUEST, 0),
                owed::RESPONSE => (op::RESPONSE, 0),
                owed::SHUTDOWN => (op::SHUTDOWN, self.shutdown_flags),
                owed::CREDIT_UPDATE => {
                    self.stats.updates += 1;
                    (op::CREDIT_UPDATE, 0)
                }
                _ => {
                    self.stats.requests += 1;
                    (op::CREDIT_REQUEST, 0)
                }
            };
            return (Some(self.header(op, 0, flags)), Verdict::Keep);
        }
        if !self.readable || !self.wants_host_data() {
            return (None, Verdict::Keep);
        }
        let n = rx.payload_room().min(self.peer_credit() as usize);
        if n == 0 {
            return (None, Verdict::Keep);
        }
        match rx.read_payload(mem, &mut self.stream, n) {
            Ok(0) => {
                // The host will send no more: tell the guest.
                self.host_eof = true;
                self.readable = false;
                let hdr = self.header(op::SHUTDOWN, 0, self.eof_flags);
                (Some(hdr), Verdict::Keep)
            }
            Ok(n) => {
                let len = len32(n);
                self.stats.rw_out += 1;
                self.stats.bytes_out += u64::from(len);
                self.rx_cnt = self.rx_cnt.wrapping_add(len);
                (Some(self.header(op::RW, len, 0)), Verdict::Keep)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.readable = false;
                (None, Verdict::Keep)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => (None, Verdict::Keep),
            Err(e) => {
                log::debug!("vsock: port {}: host read failed: {e}", self.local_port);
                self.owed = owed::RST;
                self.next_rx(mem, rx)
            }
        }
    }

    /// Takes the credit the guest announces in every packet.
    fn update_credit(&mut self, hdr: &Header) {
        if hdr.buf_alloc != self.peer_buf_alloc || hdr.fwd_cnt != self.peer_fwd_cnt {
            self.credit_asked = false;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// Handles a packet from the guest for this connection.
    pub fn handle_tx(&mut self, hdr: &Header, payload: Payload<'_>) -> Verdict {
        self.update_credit(hdr);
        match (hdr.op, self.state) {
            (op::RST, _) => Verdict::Drop,
            (op::RESPONSE, ConnState::HostInit) => {
                self.state = ConnState::Established;
                self.reply = format!("OK {}\n", self.local_port).into_bytes();
                self.readable = true;
                self.flush()
            }
            (op::RW, ConnState::Established) => self.guest_data(payload),
            (op::CREDIT_UPDATE, _) => Verdict::Keep,
            (op::CREDIT_REQUEST, _) => {
                self.owed |= owed::CREDIT_UPDATE;
                Verdict::Keep
            }
            (op::SHUTDOWN, ConnState::Established) => {
                self.guest_shut |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                self.flush()
            }
            (op, state) => {
                crate::debug_ratelimited!(
                    "vsock: port {}: unexpected op {op} in state {state:?}; reset",
                    self.local_port
                );
                Verdict::Reset
            }
        }
    }

    /// A guest `RW` payload: to the host stream, or held within the
    /// credit the guest was given.
    fn guest_data(&mut self, payload: Payload<'_>) -> Verdict {
        if self.guest_shut & SHUTDOWN_SEND != 0 {
            crate::debug_ratelimited!(
                "vsock: port {}: data after the guest's shutdown; reset",
                self.local_port
            );
            return Verdict::Reset;
        }
        let len = payload.data.len();
        if self.tx_buf.len() + len > CONN_BUF_ALLOC as usize {
            crate::warn_ratelimited!(
                "vsock: port {}: the guest sent past its credit ({} bytes held, {len} more); reset",
                self.local_port,
                self.tx_buf.len(),
            );
            return Verdict::Reset;
        }
        let mut done = 0;
        if self.tx_buf.is_empty() && self.reply.is_empty() {
            match payload.data.write_to(payload.mem, 0, &mut self.stream) {
                Ok(n) => {
                    done = n;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(len32(n));
                }
                Err(e) => {
                    if self.write_failed(e) != Verdict::Keep {
                        return Verdict::Reset;
                    }
                }
            }
        }
        self.stats.rw_in += 1;
        self.stats.bytes_in += len as u64;
        if done < len {
            self.stats.held += 1;
            if let Err(why) = payload.data.copy_to(payload.mem, done, &mut self.tx_buf) {
                crate::warn_ratelimited!("vsock: port {}: {why}; reset", self.local_port);
                return Verdict::Reset;
            }
        }
        self.flush()
    }

    /// Writes what is held to the host stream; `Reset` if the stream
    /// failed (the host closed it).
    pub fn flush(&mut self) -> Verdict {
        while !self.reply.is_empty() {
            match self.stream.write(&self.reply) {
                Ok(n) => {
                    self.reply.drain(..n);
                }
                Err(e) => return self.write_failed(e),
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(len32(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.write_failed(e),
            }
        }
        self.check_credit();
        if self.tx_buf.is_empty() && self.guest_shut & SHUTDOWN_SEND != 0 && !self.host_wr_shut {
            self.host_wr_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        self.after_shutdowns()
    }

    /// The room the guest knows of: the credit it was given less what it
    /// sent since the `fwd_cnt` it was last told.
    fn room_told(&self) -> u32 {
        let received = self.fwd_cnt.wrapping_add(len32(self.tx_buf.len()));
        self.window()
            .saturating_sub(received.wrapping_sub(self.fwd_cnt_told))
    }

    /// What the guest may have in flight: the credit offered, or its own
    /// receive buffer if smaller (see the module's notes).
    pub fn window(&self) -> u32 {
        CONN_BUF_ALLOC.min(self.peer_buf_alloc)
    }

    /// Owes the guest a `CREDIT_UPDATE` when the room it knows of fell
    /// below half its window (early enough that a guest sending flat out
    /// rarely runs dry, rarely enough that it is not one update per
    /// packet) and the host has taken bytes it was not told of.
    fn check_credit(&mut self) {
        if self.fwd_cnt != self.fwd_cnt_told && self.room_told() < self.window() / 2 {
            self.owed |= owed::CREDIT_UPDATE;
        }
    }

    fn write_failed(&mut self, e: io::Error) -> Verdict {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Verdict::Keep,
            _ => {
                log::debug!("vsock: port {}: host write failed: {e}", self.local_port);
                Verdict::Reset
            }
        }
    }

    /// After a shutdown on either side: a connection the guest shut in
    /// both directions is over once its data reached the host (Linux
    /// waits for the peer's `RST` to finish `close`).
    fn after_shutdowns(&mut self) -> Verdict {
        let both = SHUTDOWN_RCV | SHUTDOWN_SEND;
        if self.guest_shut & both == both && self.tx_buf.is_empty() {
            return Verdict::Reset;
        }
        Verdict::Keep
    }

    /// The host end hung up: the guest gets a `SHUTDOWN` with `flags`
    /// at the end of the data (or now, if that was already reached).
    pub fn owe_shutdown_on_eof(&mut self, flags: u32) {
        if self.host_eof {
            if self.shutdown_flags & flags != flags {
                self.shutdown_flags |= flags;
                self.owed |= owed::SHUTDOWN;
            }
        } else {
            self.eof_flags |= flags;
        }
    }

    /// Owes the guest a `RST`; nothing else is sent on the connection.
    pub fn owe_reset(&mut self) {
        self.owed = owed::RST;
        self.tx_buf.clear();
        self.reply.clear();
        self.readable = false;
    }

    /// Whether a `RST` is owed.
    pub fn resetting(&self) -> bool {
        self.owed & owed::RST != 0
    }
}

/// A length the device bounded (a packet's payload, a write into a
/// connection's buffer: at most 256 KiB) as the header's `u32`.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
