//! Placement of guest RAM around the 32-bit MMIO hole.

use vm_memory::GuestAddress;

use crate::layout::{FIRST_ADDR_PAST_32BITS, MMIO32_START};
use crate::usize_from;

/// Returns the guest RAM regions, as `(start, size)` pairs, for a VM with
/// `mem_size` bytes of memory.
///
/// RAM starts at guest physical address 0. Memory that does not fit below
/// [`MMIO32_START`] is placed in a second region starting at
/// [`FIRST_ADDR_PAST_32BITS`], leaving the 32-bit MMIO hole free for devices.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    if mem_size <= MMIO32_START {
        vec![(GuestAddress(0), usize_from(mem_size))]
    } else {
        vec![
            (GuestAddress(0), usize_from(MMIO32_START)),
            (
                GuestAddress(FIRST_ADDR_PAST_32BITS),
                usize_from(mem_size - MMIO32_START),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        let regions = ram_regions(128 << 20);
        assert_eq!(regions, vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn memory_exactly_at_hole_is_one_region() {
        let regions = ram_regions(MMIO32_START);
        assert_eq!(regions, vec![(GuestAddress(0), MMIO32_START as usize)]);
    }

    #[test]
    fn memory_above_hole_is_split() {
        let size = 8u64 << 30;
        let regions = ram_regions(size);
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), MMIO32_START as usize),
                (
                    GuestAddress(FIRST_ADDR_PAST_32BITS),
                    (size - MMIO32_START) as usize
                ),
            ]
        );
        let total: usize = regions.iter().map(|r| r.1).sum();
        assert_eq!(total as u64, size);
    }

    #[test]
    fn one_byte_past_hole() {
        let regions = ram_regions(MMIO32_START + 1);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[1], (GuestAddress(FIRST_ADDR_PAST_32BITS), 1));
    }
}
