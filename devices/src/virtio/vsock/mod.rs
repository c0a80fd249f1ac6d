//! virtio-vsock (virtio 1.2 §5.10, device type 19) with Firecracker's
//! host side: guest stream sockets become host Unix stream sockets.
//!
//! * **Host → guest**: a host program connects to the device's Unix
//!   socket (`uds_path`) and writes `CONNECT <port>\n`; the device sends
//!   the guest a `REQUEST` to `port` from a fresh host port `P` (from
//!   2^30 up). When the guest accepts, the program reads `OK <P>\n` and
//!   then has a byte stream to the guest's socket; when the guest refuses
//!   (`RST`) the program's connection is closed without a reply.
//! * **Guest → host**: a guest connection to CID 2 port `P` is forwarded
//!   to a Unix listener at `<uds_path>_P`; nothing listening there
//!   (or a full backlog) refuses it with a `RST`.
//!
//! Three queues: receive (0, device → driver packets), transmit (1,
//! driver → device packets) and event (2, device → driver events: only
//! `TRANSPORT_RESET`, sent by [`Vsock::transport_reset`], e.g. after a
//! snapshot restore, when every connection has been dropped). The
//! configuration space is the guest's CID.
//!
//! # Bounds against a hostile guest
//!
//! * Transmit packets are read through vm-memory's checked accessors;
//!   a malformed chain (write-only descriptors, shorter than its header
//!   or its `len`, `len` above 64 KiB) is returned unread. Unknown
//!   operations and socket types are answered with a `RST`.
//! * Guest data the host has not taken yet is held per connection within
//!   the credit the device granted ([`conn::CONN_BUF_ALLOC`]); past it
//!   the connection is reset. At most [`MAX_CONNECTIONS`] connections
//!   exist, so capsule holds at most `MAX_CONNECTIONS * CONN_BUF_ALLOC`
//!   (128 MiB) of guest data.
//! * Host data is read only into receive buffers the guest posted, only
//!   within the guest's credit: nothing is buffered in that direction.
//! * Control replies are per-connection flags, and `RST`s for packets of
//!   unknown connections wait in a queue of at most [`MAX_STRAY_RESETS`];
//!   a guest that posts no receive buffers cannot grow either.
//! * Each queue event handles at most [`PACKET_BUDGET`] packets before
//!   yielding to the rest of the event loop.
//!
//! # Layout
//!
//! This file: the device, its queues and its reset; `conn.rs`: one
//! connection and its credit; `host.rs`: the host side (listener, the
//! `CONNECT` line, forwarding connects, event-loop registrations);
//! `packet.rs`: the packet header and descriptor chains; `queues.rs`: the
//! receive and transmit queues.

pub mod conn;
mod host;
pub mod packet;
pub mod persist;
mod queues;

pub use host::forward_path;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::QueueT;
use vm_memory::Bytes;

use self::conn::{Connection, Payload, Verdict};
use self::host::PendingClient;
use self::packet::{op, Header, TxPayload, TYPE_STREAM};
use super::features::{
    bit, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use super::{device_type, DeviceEvent, VirtioCommon, VirtioDevice};

/// The virtio device type id of vsock.
pub const VSOCK_DEVICE_TYPE: u32 = device_type::VSOCK;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// Receive queue index.
pub const RX_QUEUE: usize = 0;
/// Transmit queue index.
pub const TX_QUEUE: usize = 1;
/// Event queue index.
pub const EVENT_QUEUE: usize = 2;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most connections (and host clients still sending their `CONNECT`
/// line) at once; more guest requests are refused, more host clients
/// wait in the listener's backlog.
pub const MAX_CONNECTIONS: usize = 128;
/// Most `RST`s owed for packets of unknown connections; more are dropped.
pub const MAX_STRAY_RESETS: usize = 64;
/// Packets handled per queue event before yielding.
pub const PACKET_BUDGET: usize = 256;
/// The event `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Why a vsock device cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved (0-2) or out of range.
    #[error("guest CID {0} is invalid: it must be at least 3 and below 2^32 - 1")]
    BadCid(u64),
    /// Setting up the device's eventfds failed.
    #[error("cannot set up the device: {0}")]
    Setup(#[source] io::Error),
}

/// Host port and guest port of a connection.
type Key = (u32, u32);

/// A virtio-vsock device: one object that is both the transport's
/// [`VirtioDevice`] and the event loop's subscriber.
pub struct Vsock {
    common: VirtioCommon,
    config: [u8; 8],
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    listener_registered: bool,
    conns: HashMap<Key, Connection>,
    /// Event-loop tag → connection.
    tags: HashMap<u32, Key>,
    /// Host clients that have not finished their `CONNECT` line.
    clients: HashMap<u32, PendingClient>,
    next_tag: u32,
    next_local_port: u32,
    /// Connections that may have a packet for the guest, in turn.
    rx_ready: VecDeque<Key>,
    /// `RST`s for packets of unknown connections.
    strays: VecDeque<Header>,
    /// Host streams to take out of the event loop, then close.
    closing: Vec<(UnixStream, bool)>,
    /// A `TRANSPORT_RESET` waits for an event buffer.
    event_owed: bool,
    /// Where the transmit packet being handled has its payload (kept, so
    /// that handling a packet allocates nothing).
    tx_payload: TxPayload,
    /// The segment list of the receive chain being filled (likewise).
    rx_segments: packet::Segments,
    /// Transmit queue rounds that found packets, and the packets.
    tx_rounds: u64,
    tx_packets: u64,
    /// Packets written to the receive queue.
    rx_packets: u64,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("cid", &self.cid)
            .field("uds_path", &self.uds_path)
            .field("connections", &self.conns.len())
            .finish()
    }
}

impl Vsock {
    /// A device for guest CID `cid`, accepting host clients on
    /// `listener` (bound at `uds_path` by the caller) and forwarding guest
    /// connections to `<uds_path>_<port>`.
    pub fn new(cid: u64, uds_path: PathBuf, listener: UnixListener) -> Result<Self, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&cid) {
            return Err(VsockError::BadCid(cid));
        }
        listener.set_nonblocking(true).map_err(VsockError::Setup)?;
        let features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_RING_F_EVENT_IDX);
        Ok(Self {
            common: VirtioCommon::new(
                "virtio-vsock",
                device_type::VSOCK,
                features,
                &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE],
            )
            .map_err(VsockError::Setup)?,
            config: cid.to_le_bytes(),
            cid,
            uds_path,
            listener,
            listener_registered: false,
            conns: HashMap::new(),
            tags: HashMap::new(),
            clients: HashMap::new(),
            next_tag: 1,
            next_local_port: host::FIRST_LOCAL_PORT,
            rx_ready: VecDeque::new(),
            strays: VecDeque::new(),
            closing: Vec::new(),
            event_owed: false,
            tx_payload: TxPayload::default(),
            rx_segments: Vec::new(),
            tx_rounds: 0,
            tx_packets: 0,
            rx_packets: 0,
        })
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Guest data held for host streams that have not taken it yet, over
    /// all connections: at most [`conn::CONN_BUF_ALLOC`] per connection.
    /// For tests and the fuzz target, which check that bound.
    pub fn held_bytes(&self) -> usize {
        self.conns.values().map(Connection::buffered).sum()
    }

    /// The device's state in one line, for the log when the guest's side
    /// of a connection goes quiet: the queues' positions (a lost kick or
    /// interrupt shows there), then [`Self::describe_connections`].
    pub fn describe(&self) -> String {
        format!(
            "{}; {}",
            self.common.describe_queues(),
            self.describe_connections()
        )
    }

    /// The packets moved, what is owed the guest, and each connection
    /// with its credit.
    pub fn describe_connections(&self) -> String {
        let mut conns: Vec<_> = self.conns.values().map(|c| format!("{c:?}")).collect();
        conns.sort();
        format!(
            "{} packets from the guest in {} rounds, {} to it; {} connection(s) due a turn, {} reset(s) owed, transport reset owed: {}; connections: [{}]",
            self.tx_packets,
            self.tx_rounds,
            self.rx_packets,
            self.rx_ready.len(),
            self.strays.len(),
            self.event_owed,
            conns.join(", ")
        )
    }

    /// Drops every connection (host clients see their stream close) and
    /// tells the driver with a `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, so
    /// the guest drops its side too and re-reads the CID. For a snapshot
    /// restore: the connections' host ends did not survive it.
    pub fn transport_reset(&mut self) {
        self.drop_all();
        self.event_owed = true;
        self.send_event();
        // Come back in the event loop to take the closed streams out.
        self.common.kick(EVENT_QUEUE);
    }

    /// Moves every connection and client to the closing list.
    fn drop_all(&mut self) {
        for (_, c) in self.conns.drain() {
            self.closing.push((c.stream, c.registered.is_some()));
        }
        for (_, c) in self.clients.drain() {
            self.closing.push((c.stream, true));
        }
        self.tags.clear();
        self.rx_ready.clear();
        self.strays.clear();
    }

    /// Writes an owed `TRANSPORT_RESET` into an event buffer, if there is
    /// one.
    fn send_event(&mut self) {
        if !self.event_owed {
            return;
        }
        let Some(active) = self.common.activation_mut() else {
            return;
        };
        let q = &mut active.queues[EVENT_QUEUE];
        let chain = match q.pop_descriptor_chain(&active.mem) {
            Some(chain) => chain,
            // None yet: have the driver kick when it adds one (EVENT_IDX),
            // unless one came meanwhile.
            None => match q.enable_notification(&active.mem) {
                Ok(true) => match q.pop_descriptor_chain(&active.mem) {
                    Some(chain) => chain,
                    None => return,
                },
                _ => return,
            },
        };
        let head = chain.head_index();
        let mut len = 0;
        if let Some(d) = chain.into_iter().next() {
            if d.is_write_only() && d.len() >= 4 {
                match active
                    .mem
                    .write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr())
                {
                    Ok(()) => len = 4,
                    Err(_) => crate::warn_ratelimited!(
                        "virtio-vsock: event buffer is outside guest memory"
                    ),
                }
            } else {
                crate::warn_ratelimited!("virtio-vsock: unusable event buffer");
            }
        }
        if let Err(e) = q.add_used(&active.mem, head, len) {
            crate::warn_ratelimited!("virtio-vsock: cannot return event buffer {head}: {e}");
        }
        active.signal_used_queue(EVENT_QUEUE);
        self.event_owed = len == 0;
    }

    /// Makes `key` take its turn for the receive queue.
    fn queue_rx(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued {
                c.queued = true;
                self.rx_ready.push_back(key);
            }
        }
    }

    /// Applies a connection's verdict.
    fn apply(&mut self, key: Key, verdict: Verdict) {
        match verdict {
            Verdict::Keep => {}
            Verdict::Reset => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.owe_reset();
                }
            }
            Verdict::Drop => {
                self.remove(key);
                return;
            }
        }
        self.queue_rx(key);
    }

    /// Forgets a connection and closes its host stream.
    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.log_stats(&c, "closed");
            self.tags.remove(&c.tag);
            self.closing.push((c.stream, c.registered.is_some()));
        }
    }

    /// Logs what went through `c` (debug).
    fn log_stats(&self, c: &Connection, how: &str) {
        log::debug!(
            "virtio-vsock: host port {} / guest port {} {how}: {}; the transmit queue so far: {} packets in {} rounds",
            c.local_port,
            c.peer_port,
            c.stats,
            self.tx_packets,
            self.tx_rounds
        );
    }

    /// Owes the guest a `RST` answering `hdr` (a packet of no known
    /// connection).
    fn stray_reset(&mut self, hdr: &Header) {
        if hdr.op == op::RST {
            return;
        }
        if self.strays.len() >= MAX_STRAY_RESETS {
            crate::debug_ratelimited!("virtio-vsock: too many resets owed; one dropped");
            return;
        }
        self.strays.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Header::default()
        });
    }

    /// Handles one packet from the guest.
    fn handle_packet(&mut self, hdr: &Header, payload: Payload<'_>) {
        if hdr.src_cid != self.cid || hdr.dst_cid != HOST_CID {
            crate::debug_ratelimited!(
                "virtio-vsock: dropped a packet from CID {} to CID {}",
                hdr.src_cid,
                hdr.dst_cid
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            crate::debug_ratelimited!("virtio-vsock: socket type {} refused", hdr.type_);
            self.stray_reset(hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(c) = self.conns.get_mut(&key) {
            let verdict = if hdr.op == op::REQUEST {
                Verdict::Reset
            } else {
                c.handle_tx(hdr, payload)
            };
            self.apply(key, verdict);
            return;
        }
        match hdr.op {
            op::REQUEST => self.guest_connect(hdr),
            op::RST => {}
            _ => self.stray_reset(hdr),
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        for c in self.conns.values() {
            self.log_stats(c, "open at exit");
        }
    }
}

impl VirtioDevice for Vsock {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    /// `struct virtio_vsock_config`: the guest's CID.
    fn config_space(&self) -> &[u8] {
        &self.config
    }

    /// Every connection is dropped: the driver forgot its side.
    fn reset_device(&mut self) -> bool {
        self.drop_all();
        self.event_owed = false;
        true
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.common.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.common.event(&events, ops) {
            DeviceEvent::Queue(TX_QUEUE) => self.process_tx(),
            DeviceEvent::Queue(EVENT_QUEUE) => self.send_event(),
            DeviceEvent::Device { tag, set } => self.host_event(tag, set, ops),
            _ => {}
        }
        self.process_rx();
        self.sync_registrations(ops);
    }
}

#[cfg(test)]
mod tests;
