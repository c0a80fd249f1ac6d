//! MSI-X: the vector table, the pending-bit array and the masks.
//!
//! Each vector has an eventfd that the VMM registers as a KVM irqfd on
//! its own GSI ([`Msix::gsi`]); the GSI's route (the message address and
//! data the guest programmed) is handed to an [`MsiRouter`], which keeps
//! KVM's routing table. Masking is done here: [`Msix::signal`] on a
//! masked vector (or with the function masked, or MSI-X disabled) sets
//! the vector's pending bit instead, and unmasking fires what is pending.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Bytes per table entry: address low, address high, data, control.
pub const ENTRY_SIZE: u64 = 16;
/// Vector control: the vector is masked.
const VECTOR_MASKED: u32 = 1;
/// Message control: MSI-X enabled.
pub const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: all vectors masked.
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Most vectors a table may have (the table-size field is 11 bits).
pub const MAX_VECTORS: u16 = 2048;

/// An MSI message: where the guest asked the interrupt to be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// Keeps the hypervisor's GSI routing: GSI `gsi` delivers `message`, or
/// nothing (`None`).
pub trait MsiRouter: Send + Sync {
    /// Routes `gsi` to `message`.
    fn route(&self, gsi: u32, message: Option<MsiMessage>) -> io::Result<()>;
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    address_lo: u32,
    address_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: (u64::from(self.address_hi) << 32) | u64::from(self.address_lo),
            data: self.data,
        }
    }

    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }

    fn dword(&self, i: u64) -> u32 {
        match i {
            0 => self.address_lo,
            1 => self.address_hi,
            2 => self.data,
            _ => self.control,
        }
    }
}

/// One function's MSI-X state.
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    irqs: Vec<EventFd>,
    first_gsi: u32,
    router: Arc<dyn MsiRouter>,
    /// The route KVM has for each vector's GSI.
    routed: Vec<Option<MsiMessage>>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("vectors", &self.entries.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .finish()
    }
}

impl Msix {
    /// `vectors` vectors (1 to [`MAX_VECTORS`]), all masked, on GSIs
    /// `first_gsi..`, routed through `router`.
    pub fn new(vectors: u16, first_gsi: u32, router: Arc<dyn MsiRouter>) -> io::Result<Self> {
        let n = usize::from(vectors.clamp(1, MAX_VECTORS));
        let irqs = (0..n)
            .map(|_| crate::eventfd())
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            entries: vec![
                Entry {
                    control: VECTOR_MASKED,
                    ..Entry::default()
                };
                n
            ],
            pending: vec![false; n],
            enabled: false,
            function_masked: false,
            irqs,
            first_gsi,
            router,
            routed: vec![None; n],
        })
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Always false: a table has at least one vector.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The eventfd of each vector, to register as irqfd on [`Self::gsi`].
    pub fn irqs(&self) -> &[EventFd] {
        &self.irqs
    }

    /// The GSI of vector `i`.
    pub fn gsi(&self, i: usize) -> Option<u32> {
        let i = u32::try_from(i).ok().filter(|_| i < self.entries.len())?;
        self.first_gsi.checked_add(i)
    }

    /// Size of the table in bytes.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// Size of the pending-bit array in bytes (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.entries.len().div_ceil(64) as u64 * 8
    }

    /// The message control value's writable part as the guest set it.
    pub fn control(&self) -> u16 {
        (if self.enabled { CONTROL_ENABLE } else { 0 })
            | (if self.function_masked {
                CONTROL_FUNCTION_MASK
            } else {
                0
            })
    }

    /// Applies a message control value the guest wrote.
    pub fn set_control(&mut self, control: u16) {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        for i in 0..self.entries.len() {
            self.update(i);
        }
    }

    fn live(&self, i: usize) -> bool {
        self.enabled && !self.function_masked && !self.entries[i].masked()
    }

    /// Brings vector `i`'s route in line with its entry and delivers a
    /// pending interrupt if the vector is live.
    fn update(&mut self, i: usize) {
        if !self.live(i) {
            return;
        }
        let message = Some(self.entries[i].message());
        if self.routed[i] != message {
            let Some(gsi) = self.gsi(i) else { return };
            match self.router.route(gsi, message) {
                Ok(()) => self.routed[i] = message,
                Err(e) => crate::error_ratelimited!("MSI-X: cannot route vector {i}: {e}"),
            }
        }
        if std::mem::take(&mut self.pending[i]) {
            self.fire(i);
        }
    }

    fn fire(&self, i: usize) {
        if let Err(e) = self.irqs[i].write(1) {
            crate::error_ratelimited!("MSI-X: cannot raise vector {i}: {e}");
        }
    }

    /// Raises vector `vector`, or marks it pending if it is masked.
    /// Vectors past the table are ignored (false).
    pub fn signal(&mut self, vector: u16) -> bool {
        let i = usize::from(vector);
        if i >= self.entries.len() {
            return false;
        }
        if self.live(i) && self.routed[i].is_some() {
            self.fire(i);
        } else {
            self.pending[i] = true;
        }
        true
    }

    /// Whether vector `i`'s pending bit is set.
    pub fn is_pending(&self, i: usize) -> bool {
        self.pending.get(i).copied().unwrap_or(false)
    }

    /// Reads the table at `offset`: dword or qword accesses, aligned;
    /// anything else reads as zero.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !aligned(offset, data.len()) {
            return;
        }
        for (k, chunk) in (0u64..).zip(data.chunks_mut(4)) {
            let dw = offset / 4 + k;
            if let Some(e) = self.entries.get(crate::usize_from(dw / 4)) {
                chunk.copy_from_slice(&e.dword(dw % 4).to_le_bytes());
            }
        }
    }

    /// Writes the table at `offset`: dword or qword accesses, aligned;
    /// anything else is dropped. Any value is accepted: the address and
    /// data are only ever handed to the router.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        if !aligned(offset, data.len()) {
            crate::debug_ratelimited!("MSI-X: {}-byte table write at {offset:#x}", data.len());
            return;
        }
        let mut touched = None;
        for (k, chunk) in (0u64..).zip(data.chunks(4)) {
            let dw = offset / 4 + k;
            let i = crate::usize_from(dw / 4);
            let Some(e) = self.entries.get_mut(i) else {
                continue;
            };
            let mut b = [0u8; 4];
            b.copy_from_slice(chunk);
            let v = u32::from_le_bytes(b);
            match dw % 4 {
                0 => e.address_lo = v,
                1 => e.address_hi = v,
                2 => e.data = v,
                _ => e.control = v & VECTOR_MASKED,
            }
            touched = Some(i);
        }
        if let Some(i) = touched {
            self.update(i);
        }
    }

    /// Reads the pending-bit array at `offset` (writes to it are ignored).
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !aligned(offset, data.len()) {
            return;
        }
        for (k, b) in (0u64..).zip(data.iter_mut()) {
            // Bytes past the array (or past any index) read as zero.
            let Some(first) = offset.checked_add(k).and_then(|o| o.checked_mul(8)) else {
                continue;
            };
            for bit in 0..8u64 {
                if self.is_pending(crate::usize_from(first | bit)) {
                    *b |= 1 << bit;
                }
            }
        }
    }
}

/// One function's MSI-X state as saved: each vector's table entry
/// (address low, address high, data, control), its pending bit, and the
/// message control bits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixSnapshot {
    /// Table entries, in vector order.
    pub entries: Vec<[u32; 4]>,
    /// Pending bits, in vector order.
    pub pending: Vec<bool>,
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub function_masked: bool,
}

/// Why a saved MSI-X state cannot be put back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsixRestoreError {
    /// Another table size.
    #[error("{found} MSI-X vectors (entries {entries}, pending bits {pending}) where the function has {expected}")]
    Vectors {
        /// Vectors of the function.
        expected: usize,
        /// Entries saved.
        entries: usize,
        /// Pending bits saved.
        pending: usize,
        /// The smaller of the two.
        found: usize,
    },
}

impl Msix {
    /// The state to save.
    pub fn save(&self) -> MsixSnapshot {
        MsixSnapshot {
            entries: self
                .entries
                .iter()
                .map(|e| [e.address_lo, e.address_hi, e.data, e.control])
                .collect(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Puts back `snap` on a freshly made table of the same size: every
    /// live vector is routed again (its GSI's KVM route) and a pending
    /// one whose vector is live is delivered. Nothing changes on error.
    pub fn restore(&mut self, snap: &MsixSnapshot) -> Result<(), MsixRestoreError> {
        let n = self.entries.len();
        if snap.entries.len() != n || snap.pending.len() != n {
            return Err(MsixRestoreError::Vectors {
                expected: n,
                entries: snap.entries.len(),
                pending: snap.pending.len(),
                found: snap.entries.len().min(snap.pending.len()),
            });
        }
        for (e, s) in self.entries.iter_mut().zip(&snap.entries) {
            *e = Entry {
                address_lo: s[0],
                address_hi: s[1],
                data: s[2],
                control: s[3] & VECTOR_MASKED,
            };
        }
        self.pending.clone_from(&snap.pending);
        self.routed.fill(None);
        self.enabled = snap.enabled;
        self.function_masked = snap.function_masked;
        for i in 0..n {
            self.update(i);
        }
        Ok(())
    }
}

fn aligned(offset: u64, len: usize) -> bool {
    matches!(len, 4 | 8) && offset.is_multiple_of(len as u64)
}
