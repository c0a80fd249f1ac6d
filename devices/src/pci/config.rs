//! A type-0 PCI configuration space (256 bytes) with a capability list and
//! memory BARs.
//!
//! The space is kept as bytes plus a write mask per byte: a guest write
//! changes only the bits the mask allows, at any offset and width. A BAR
//! is writable only in its address bits, so the sizing protocol (write all
//! ones, read back) returns the size mask with no special case.

/// Size of the configuration space (no extended space).
pub const CONFIG_SIZE: usize = 256;
/// Size of a function's configuration space with the PCI Express
/// extended space (offsets 0x100-0xFFF), which ECAM reaches.
pub const EXTENDED_CONFIG_SIZE: usize = 4096;
/// Offset of the first capability.
const FIRST_CAP: usize = 0x40;
/// Offset of BAR 0.
const BAR0: usize = 0x10;
/// Number of BARs of a type-0 header.
pub const NUM_BARS: usize = 6;

const VENDOR_ID: usize = 0x00;
const DEVICE_ID: usize = 0x02;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION: usize = 0x08;
const CLASS: usize = 0x09;
const HEADER_TYPE: usize = 0x0e;
const SUBSYSTEM_VENDOR: usize = 0x2c;
const SUBSYSTEM_ID: usize = 0x2e;
const CAPABILITIES: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;

/// Command register bits the guest may set: I/O and memory decode, bus
/// master, INTx disable.
const COMMAND_WRITABLE: u16 = 0x0001 | 0x0002 | 0x0004 | 0x0400;
/// Status register bit: a capability list is present.
const STATUS_CAP_LIST: u16 = 0x0010;

/// Why a configuration space could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The capabilities do not fit in the 256-byte space.
    #[error("PCI capability of {0} bytes does not fit in configuration space")]
    CapabilityTooLarge(usize),
    /// A BAR index past 5, or a size that is not a power of two of at
    /// least 16 bytes.
    #[error("invalid PCI BAR {index} of size {size:#x}")]
    InvalidBar {
        /// The BAR.
        index: usize,
        /// Its size.
        size: u64,
    },
    /// The BAR does not sit on a multiple of its size below 4 GiB.
    #[error("PCI BAR at {0:#x} is misaligned or above 4 GiB")]
    BarAddress(u64),
}

/// Why a saved configuration space cannot be put back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    /// Not 256 bytes.
    #[error("configuration space of {0} bytes (256 expected)")]
    Length(usize),
    /// A read-only byte differs: another kind of function.
    #[error("read-only configuration byte {0:#x} differs: not the same kind of PCI function")]
    ReadOnly(usize),
}

/// The fixed identity of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Revision id.
    pub revision: u8,
    /// Class code: base class, subclass, programming interface.
    pub class: [u8; 3],
    /// Subsystem vendor id.
    pub subsystem_vendor: u16,
    /// Subsystem id.
    pub subsystem: u16,
}

/// One function's configuration space.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    writable: [u8; CONFIG_SIZE],
    /// Offset of the last capability's "next" byte.
    last_link: usize,
    /// Where the next capability goes.
    next_cap: usize,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("vendor", &self.read_u16(VENDOR_ID))
            .field("device", &self.read_u16(DEVICE_ID))
            .finish()
    }
}

impl ConfigSpace {
    /// A type-0 header for `id`, with no BARs, no capabilities and no
    /// interrupt pin (INTx is not offered).
    pub fn new(id: &Identity) -> Self {
        let mut s = Self {
            bytes: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            last_link: CAPABILITIES,
            next_cap: FIRST_CAP,
        };
        s.put_u16(VENDOR_ID, id.vendor);
        s.put_u16(DEVICE_ID, id.device);
        s.bytes[REVISION] = id.revision;
        // Class code: programming interface, subclass, base class.
        s.bytes[CLASS] = id.class[2];
        s.bytes[CLASS + 1] = id.class[1];
        s.bytes[CLASS + 2] = id.class[0];
        s.bytes[HEADER_TYPE] = 0;
        s.put_u16(SUBSYSTEM_VENDOR, id.subsystem_vendor);
        s.put_u16(SUBSYSTEM_ID, id.subsystem);
        s.set_writable(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        // The interrupt line is a scratch byte for the OS; the pin stays 0.
        s.writable[INTERRUPT_LINE] = 0xff;
        s
    }

    fn put_u16(&mut self, offset: usize, v: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        self.writable[offset..offset + mask.len()].copy_from_slice(mask);
    }

    /// The 16-bit value at `offset` (which must leave room for it).
    pub fn read_u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    /// The 32-bit value at `offset` (which must leave room for it).
    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.bytes[offset..offset + 4]);
        u32::from_le_bytes(b)
    }

    /// Makes BAR `index` a 32-bit, non-prefetchable memory BAR of `size`
    /// bytes (a power of two, at least 16) at `addr` (a multiple of it).
    pub fn set_memory_bar(&mut self, index: usize, addr: u64, size: u64) -> Result<(), Error> {
        if index >= NUM_BARS || !size.is_power_of_two() || size < 16 {
            return Err(Error::InvalidBar { index, size });
        }
        let addr32 = u32::try_from(addr).map_err(|_| Error::BarAddress(addr))?;
        let size32 = u32::try_from(size).map_err(|_| Error::InvalidBar { index, size })?;
        if !addr.is_multiple_of(size) {
            return Err(Error::BarAddress(addr));
        }
        let offset = BAR0 + 4 * index;
        // Memory space, 32-bit, not prefetchable: type bits are zero.
        self.bytes[offset..offset + 4].copy_from_slice(&addr32.to_le_bytes());
        self.set_writable(offset, &(!(size32 - 1)).to_le_bytes());
        Ok(())
    }

    /// The address BAR `index` holds now (what the guest last wrote).
    pub fn bar_address(&self, index: usize) -> Option<u32> {
        (index < NUM_BARS).then(|| self.read_u32(BAR0 + 4 * index) & !0xf)
    }

    /// Appends a capability with id `id` and the bytes after its id and
    /// "next" bytes; returns its offset. `writable` (same length as
    /// `body`) says which bits of the body the guest may change.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> Result<usize, Error> {
        let len = body.len() + 2;
        let offset = self.next_cap;
        if offset + len > CONFIG_SIZE || writable.len() != body.len() {
            return Err(Error::CapabilityTooLarge(len));
        }
        self.bytes[offset] = id;
        self.bytes[offset + 1] = 0;
        self.bytes[offset + 2..offset + len].copy_from_slice(body);
        self.writable[offset + 2..offset + len].copy_from_slice(writable);
        // Offsets are below 256 (checked above).
        self.bytes[self.last_link] = u8::try_from(offset).unwrap_or(0);
        self.last_link = offset + 1;
        self.next_cap = (offset + len).next_multiple_of(4);
        let status = self.read_u16(STATUS) | STATUS_CAP_LIST;
        self.put_u16(STATUS, status);
        Ok(offset)
    }

    /// Reads `data.len()` bytes at `offset`. The extended space
    /// (0x100-0xFFF) reads as zeros: an empty extended capability list,
    /// which is what Linux expects of a function it reaches through ECAM.
    /// Bytes past it read as all ones, like a function that does not
    /// decode them.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match byte_index(offset, i) {
                Some(o) if o < CONFIG_SIZE => self.bytes[o],
                Some(o) if o < EXTENDED_CONFIG_SIZE => 0,
                _ => 0xff,
            };
        }
    }

    /// The 256 bytes as the guest reads them (for a snapshot).
    pub fn save(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    /// Puts back `saved` (from [`Self::save`] of a function built the same
    /// way): only its writable bits are taken, and every read-only bit
    /// must equal this space's, else [`RestoreError`] and nothing changes.
    pub fn restore(&mut self, saved: &[u8]) -> Result<(), RestoreError> {
        if saved.len() != CONFIG_SIZE {
            return Err(RestoreError::Length(saved.len()));
        }
        let differs =
            (0..CONFIG_SIZE).find(|&o| (saved[o] ^ self.bytes[o]) & !self.writable[o] != 0);
        if let Some(offset) = differs {
            return Err(RestoreError::ReadOnly(offset));
        }
        self.bytes.copy_from_slice(saved);
        Ok(())
    }

    /// Writes `data` at `offset`, changing only the writable bits; bytes
    /// past the first 256 (the extended space has nothing) are ignored. Returns whether any byte changed.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> bool {
        let mut changed = false;
        for (i, v) in data.iter().enumerate() {
            let Some(o) = byte_index(offset, i).filter(|&o| o < CONFIG_SIZE) else {
                continue;
            };
            let w = self.writable[o];
            let new = (self.bytes[o] & !w) | (v & w);
            changed |= new != self.bytes[o];
            self.bytes[o] = new;
        }
        changed
    }
}

fn byte_index(offset: u64, i: usize) -> Option<usize> {
    usize::try_from(offset).ok()?.checked_add(i)
}

/// Whether an access of `len` bytes at `offset` touches any byte of
/// `[start, start + span)`.
pub fn overlaps(offset: u64, len: usize, start: usize, span: usize) -> bool {
    let (Ok(start), Ok(span), Ok(len)) = (
        u64::try_from(start),
        u64::try_from(span),
        u64::try_from(len),
    ) else {
        return false;
    };
    offset < start.saturating_add(span) && offset.saturating_add(len) > start
}
