//! How a device behind the PCI transport interrupts the driver: each
//! queue and the configuration change have an MSI-X vector the driver
//! chose (or [`NO_VECTOR`]).

use std::io;
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::pci::msix::Msix;
use crate::virtio::{InterruptKind, VirtioInterrupt};

/// The vector number meaning "no vector".
pub const NO_VECTOR: u16 = 0xffff;
/// ISR status bit: a queue was used.
pub const ISR_QUEUE: u8 = 1;
/// ISR status bit: the configuration changed.
pub const ISR_CONFIG: u8 = 2;

/// The vectors the driver assigned, the ISR status byte and the MSI-X
/// state: shared by the transport (vCPU threads) and the device (event
/// loop).
#[derive(Debug)]
pub struct PciInterrupt {
    msix: Mutex<Msix>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    isr: AtomicU8,
}

impl PciInterrupt {
    /// Interrupts for `queues` queues through `msix`.
    pub fn new(msix: Msix, queues: usize) -> Self {
        Self {
            msix: Mutex::new(msix),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            isr: AtomicU8::new(0),
        }
    }

    /// The MSI-X state.
    pub fn msix(&self) -> MutexGuard<'_, Msix> {
        self.msix.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accepts `vector` if the table has it (or it is [`NO_VECTOR`]);
    /// returns what the driver reads back.
    fn checked(&self, vector: u16) -> u16 {
        if vector != NO_VECTOR && usize::from(vector) >= self.msix().len() {
            NO_VECTOR
        } else {
            vector
        }
    }

    /// The configuration-change vector.
    pub fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::SeqCst)
    }

    /// Sets the configuration-change vector (refused: [`NO_VECTOR`]).
    pub fn set_config_vector(&self, vector: u16) {
        self.config_vector
            .store(self.checked(vector), Ordering::SeqCst);
    }

    /// Queue `q`'s vector ([`NO_VECTOR`] for no such queue).
    pub fn queue_vector(&self, q: usize) -> u16 {
        self.queue_vectors
            .get(q)
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst))
    }

    /// Sets queue `q`'s vector (refused: [`NO_VECTOR`]).
    pub fn set_queue_vector(&self, q: usize, vector: u16) {
        if let Some(v) = self.queue_vectors.get(q) {
            v.store(self.checked(vector), Ordering::SeqCst);
        }
    }

    /// Reads and clears the ISR status.
    pub fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::SeqCst)
    }

    /// Number of queues with a vector.
    pub fn queues(&self) -> usize {
        self.queue_vectors.len()
    }

    /// The ISR status, left as it is (for a snapshot).
    pub fn isr(&self) -> u8 {
        self.isr.load(Ordering::SeqCst)
    }

    /// Puts back saved vectors and ISR status. Each vector must be
    /// [`NO_VECTOR`] or in the table and there must be one per queue;
    /// else the vector at fault is returned (`Err(None)`: the count) and
    /// nothing changes.
    pub fn restore(&self, config: u16, queues: &[u16], isr: u8) -> Result<(), Option<u16>> {
        if queues.len() != self.queue_vectors.len() {
            return Err(None);
        }
        let n = self.msix().len();
        if let Some(&bad) = std::iter::once(&config)
            .chain(queues)
            .find(|&&v| v != NO_VECTOR && usize::from(v) >= n)
        {
            return Err(Some(bad));
        }
        self.config_vector.store(config, Ordering::SeqCst);
        for (v, &saved) in self.queue_vectors.iter().zip(queues) {
            v.store(saved, Ordering::SeqCst);
        }
        self.isr
            .store(isr & (ISR_QUEUE | ISR_CONFIG), Ordering::SeqCst);
        Ok(())
    }

    /// Forgets the vectors and the ISR status (a device reset).
    pub fn reset(&self) {
        self.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
        self.isr.store(0, Ordering::SeqCst);
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        let (vector, bit) = match kind {
            InterruptKind::Queue(q) => (self.queue_vector(usize::from(q)), ISR_QUEUE),
            InterruptKind::Config => (self.config_vector(), ISR_CONFIG),
        };
        self.isr.fetch_or(bit, Ordering::SeqCst);
        if vector == NO_VECTOR {
            // No INTx either: the driver asked for no interrupt.
            crate::debug_ratelimited!("virtio-pci: {kind:?} has no MSI-X vector");
        } else {
            self.msix().signal(vector);
        }
        Ok(())
    }
}
