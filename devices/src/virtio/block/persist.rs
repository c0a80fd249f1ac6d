//! Snapshot state of a virtio-blk device beyond what its transport saves
//! (features, queues): the disk's size, checked on restore, and for an
//! `,ephemeral` disk the guest's writes, which live only in the anonymous
//! overlay and so are copied into a file beside the snapshot.

use std::fs::File;
use std::io;

use serde::{Deserialize, Serialize};

use super::Block;

/// A block device's own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSnapshot {
    /// Capacity in sectors: the image must still have this size.
    pub capacity: u64,
    /// Whether the guest saw the disk read-only.
    pub read_only: bool,
    /// The overlay's written sectors, (first, count) runs, whose data is
    /// in the overlay file at the same offsets.
    pub overlay_runs: Vec<(u64, u64)>,
}

/// Why a block device could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum BlockRestoreError {
    /// The image changed size since the snapshot.
    #[error("the disk has {found} sectors, the snapshot {expected}")]
    Capacity {
        /// Sectors in the snapshot.
        expected: u64,
        /// Sectors of the image now.
        found: u64,
    },
    /// Read-only in one, writable in the other.
    #[error("the disk is {} but was {} in the snapshot",
        if *.found { "read-only" } else { "writable" },
        if *.found { "writable" } else { "read-only" })]
    ReadOnly {
        /// Read-only now.
        found: bool,
    },
    /// The overlay could not be copied back.
    #[error("cannot restore the ephemeral overlay: {0}")]
    Overlay(#[source] io::Error),
}

impl Block {
    /// The device's own state; an ephemeral overlay's data is written to
    /// `overlay` (which ends up the disk's size, sparse where unwritten).
    pub fn save(&self, overlay: &File) -> io::Result<BlockSnapshot> {
        Ok(BlockSnapshot {
            capacity: self.capacity,
            read_only: self.disk.is_read_only(),
            overlay_runs: self.disk.save_overlay(overlay)?,
        })
    }

    /// Restores the state `snap` into a freshly opened device; `overlay`
    /// is the file [`Self::save`] wrote, needed only if there are runs.
    pub fn restore(
        &mut self,
        snap: &BlockSnapshot,
        overlay: Option<&File>,
    ) -> Result<(), BlockRestoreError> {
        if snap.capacity != self.capacity {
            return Err(BlockRestoreError::Capacity {
                expected: snap.capacity,
                found: self.capacity,
            });
        }
        if snap.read_only != self.disk.is_read_only() {
            return Err(BlockRestoreError::ReadOnly {
                found: self.disk.is_read_only(),
            });
        }
        if snap.overlay_runs.is_empty() {
            return Ok(());
        }
        let file = overlay.ok_or_else(|| {
            BlockRestoreError::Overlay(io::Error::new(
                io::ErrorKind::NotFound,
                "the overlay file is missing",
            ))
        })?;
        self.disk
            .restore_overlay(file, &snap.overlay_runs)
            .map_err(BlockRestoreError::Overlay)
    }
}
