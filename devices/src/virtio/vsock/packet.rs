//! The vsock packet header (`struct virtio_vsock_hdr`, virtio 1.2
//! §5.10.6) and moving packets between descriptor chains and the host.
//!
//! Every packet on the receive and transmit queues is a 44-byte header,
//! little endian, followed by `len` bytes of payload (only `RW` packets
//! carry any). Chains are read and written through vm-memory's checked
//! accessors; a chain is never trusted to be well formed.

use std::collections::VecDeque;
use std::io;

use crate::GuestMemoryMmap;
use virtio_queue::DescriptorChain;
use vm_memory::volatile_memory::Error as VolatileMemoryError;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, Permissions, ReadVolatile,
    WriteVolatile,
};

/// Size of the packet header.
pub const HDR_LEN: usize = 44;
/// Most payload one packet may carry (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`); a longer transmit packet is refused.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Most descriptors looked at in one chain.
const MAX_CHAIN_DESCRIPTORS: usize = 64;

/// Stream sockets: the only socket type the device offers.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    /// Connect.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection refused or torn down.
    pub const RST: u16 = 3;
    /// The sender will send or receive no more (see the `flags`).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's credit (`buf_alloc`, `fwd_cnt`) changed.
    pub const CREDIT_UPDATE: u16 = 6;
    /// The sender asks for the receiver's credit.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `SHUTDOWN` flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// `SHUTDOWN` flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// A packet header, in host byte order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation ([`op`]).
    pub op: u16,
    /// Operation flags (`SHUTDOWN`'s directions).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer so far.
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes the wire form.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or([0; 2]));
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the wire form.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Where a transmit packet's payload lies in guest memory. The device
/// keeps one and reuses it, so reading a packet allocates nothing, and the
/// payload goes from guest memory to the host socket without a copy.
#[derive(Debug, Default)]
pub struct TxPayload {
    /// Address and length of each piece, in order.
    segments: Segments,
    /// Their total length (the header's `len`).
    len: usize,
}

impl TxPayload {
    /// Payload bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces from byte `from` on.
    fn pieces_from(&self, from: usize) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
        let mut skip = from;
        self.segments.iter().filter_map(move |&(addr, len)| {
            if skip >= len {
                skip -= len;
                return None;
            }
            let piece = (addr.unchecked_add(skip as u64), len - skip);
            skip = 0;
            Some(piece)
        })
    }

    /// Writes the payload from byte `from` on to `w`, as far as it takes
    /// it without blocking; returns the bytes written (an error only if
    /// nothing was).
    pub fn write_to(
        &self,
        mem: &GuestMemoryMmap,
        from: usize,
        w: &mut impl WriteVolatile,
    ) -> io::Result<usize> {
        let mut done = 0;
        for (addr, len) in self.pieces_from(from) {
            for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
                let slice = slice.map_err(io::Error::other)?;
                match w.write_volatile(&slice) {
                    Ok(n) => {
                        done += n;
                        if n < slice.len() {
                            return Ok(done);
                        }
                    }
                    Err(VolatileMemoryError::IOError(e)) if done == 0 => return Err(e),
                    Err(VolatileMemoryError::IOError(_)) => return Ok(done),
                    Err(e) => return Err(io::Error::other(e)),
                }
            }
        }
        Ok(done)
    }

    /// Appends the payload from byte `from` on to `out`.
    pub fn copy_to(
        &self,
        mem: &GuestMemoryMmap,
        from: usize,
        out: &mut VecDeque<u8>,
    ) -> Result<(), &'static str> {
        let mut chunk = [0u8; 4096];
        for (addr, len) in self.pieces_from(from) {
            let mut off = 0;
            while off < len {
                let n = (len - off).min(chunk.len());
                mem.read_slice(&mut chunk[..n], addr.unchecked_add(off as u64))
                    .map_err(|_| "buffer outside guest memory")?;
                out.extend(&chunk[..n]);
                off += n;
            }
        }
        Ok(())
    }
}

/// Reads a transmit chain: returns its header and records where its
/// payload is in `payload`; or why the chain is unusable (write-only
/// descriptors, too short for its header or its `len`, a `len` past
/// [`MAX_PAYLOAD`], memory outside the guest, too many descriptors).
pub fn read_tx_packet(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    payload: &mut TxPayload,
) -> Result<Header, &'static str> {
    let mut hdr = [0u8; HDR_LEN];
    let mut header: Option<Header> = None;
    payload.segments.clear();
    payload.len = 0;
    // Bytes of the header, then of the payload, gathered so far.
    let mut got = 0usize;
    let mut want = HDR_LEN;
    for (count, d) in chain.enumerate() {
        if count >= MAX_CHAIN_DESCRIPTORS {
            return Err("too many descriptors");
        }
        if d.is_write_only() {
            return Err("device-writable descriptor in a transmit chain");
        }
        let mut addr = d.addr();
        let mut left = d.len() as usize;
        while left > 0 && got < want {
            let n = left.min(want - got);
            match header {
                None => mem
                    .read_slice(&mut hdr[got..got + n], addr)
                    .map_err(|_| "buffer outside guest memory")?,
                Some(_) => {
                    if !GuestMemory::check_range(mem, addr, n, Permissions::Read) {
                        return Err("buffer outside guest memory");
                    }
                    payload.segments.push((addr, n));
                }
            }
            got += n;
            left -= n;
            addr = GuestAddress(addr.0.checked_add(n as u64).ok_or("address overflow")?);
            if header.is_none() && got == HDR_LEN {
                let h = Header::from_bytes(&hdr);
                let len = h.len as usize;
                if len > MAX_PAYLOAD {
                    return Err("payload longer than the maximum");
                }
                header = Some(h);
                got = 0;
                want = len;
            }
        }
        if header.is_some() && got == want {
            break;
        }
    }
    match header {
        None => Err("shorter than the packet header"),
        Some(_) if got < want => Err("shorter than its payload length"),
        Some(h) => {
            payload.len = want;
            Ok(h)
        }
    }
}

/// Address and length of each buffer of a chain, in order.
pub type Segments = Vec<(GuestAddress, usize)>;

/// The device-writable buffers of a receive chain.
pub struct RxChain {
    /// Address and length of each writable descriptor, in order.
    segments: Segments,
    /// Their total length.
    capacity: usize,
}

impl RxChain {
    /// Collects the writable descriptors of `chain` (into `segments`,
    /// which it reuses); device-readable ones, or buffers outside guest
    /// memory, are a broken chain (`Err`).
    pub fn new(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mut segments: Segments,
    ) -> Result<Self, (&'static str, Segments)> {
        segments.clear();
        let mut capacity = 0usize;
        for (count, d) in chain.enumerate() {
            if count >= MAX_CHAIN_DESCRIPTORS {
                return Err(("too many descriptors", segments));
            }
            if !d.is_write_only() {
                return Err(("device-readable descriptor in a receive chain", segments));
            }
            if !GuestMemory::check_range(mem, d.addr(), d.len() as usize, Permissions::Write) {
                return Err(("buffer outside guest memory", segments));
            }
            segments.push((d.addr(), d.len() as usize));
            capacity = capacity.saturating_add(d.len() as usize);
        }
        if capacity < HDR_LEN {
            return Err(("shorter than the packet header", segments));
        }
        Ok(Self { segments, capacity })
    }

    /// Gives back the segment list for the next chain.
    pub fn into_segments(self) -> Segments {
        self.segments
    }

    /// Most payload a packet in this chain can carry.
    pub fn payload_room(&self) -> usize {
        (self.capacity - HDR_LEN).min(MAX_PAYLOAD)
    }

    /// The chain's bytes from `from` on, `count` of them at most, as
    /// (address, length) pieces.
    fn pieces(
        &self,
        from: usize,
        count: usize,
    ) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
        let mut skip = from;
        let mut left = count;
        self.segments.iter().filter_map(move |&(addr, len)| {
            if skip >= len || left == 0 {
                skip = skip.saturating_sub(len);
                return None;
            }
            let n = (len - skip).min(left);
            let piece = (addr.unchecked_add(skip as u64), n);
            skip = 0;
            left -= n;
            Some(piece)
        })
    }

    /// Reads at most `max` payload bytes (no more than
    /// [`Self::payload_room`]) from `r` straight into the chain, after the
    /// header's place; returns the bytes read (an error only if none
    /// were; `Ok(0)` is end of file).
    pub fn read_payload(
        &self,
        mem: &GuestMemoryMmap,
        r: &mut impl ReadVolatile,
        max: usize,
    ) -> io::Result<usize> {
        let mut done = 0;
        for (addr, len) in self.pieces(HDR_LEN, max.min(self.payload_room())) {
            for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
                let mut slice = slice.map_err(io::Error::other)?;
                match r.read_volatile(&mut slice) {
                    Ok(n) => {
                        done += n;
                        if n < slice.len() {
                            return Ok(done);
                        }
                    }
                    Err(VolatileMemoryError::IOError(e)) if done == 0 => return Err(e),
                    Err(VolatileMemoryError::IOError(_)) => return Ok(done),
                    Err(e) => return Err(io::Error::other(e)),
                }
            }
        }
        Ok(done)
    }

    /// Writes `hdr` at the start of the chain; returns the packet's length
    /// (header and `hdr.len` payload bytes already in place), or `Err` if
    /// a buffer is outside guest memory.
    pub fn write_header(&self, mem: &GuestMemoryMmap, hdr: &Header) -> Result<u32, &'static str> {
        let bytes = hdr.to_bytes();
        let mut off = 0;
        for (addr, n) in self.pieces(0, HDR_LEN) {
            mem.write_slice(&bytes[off..off + n], addr)
                .map_err(|_| "buffer outside guest memory")?;
            off += n;
        }
        let len = HDR_LEN + hdr.len as usize;
        if len > self.capacity {
            return Err("packet longer than the chain");
        }
        u32::try_from(len).map_err(|_| "packet too long")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_wire_order() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234,
            dst_port: 52,
            len: 7,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 3,
            buf_alloc: 1 << 18,
            fwd_cnt: 99,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        assert_eq!(&b[40..44], &99u32.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }
}
