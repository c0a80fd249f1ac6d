use crate::GuestMemoryMmap;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::test_utils::{activate_on_rings, Rings};

const RING: u64 = 0x1000;
const DATA: u64 = 0x10_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

#[test]
fn fills_writable_buffers_with_random_bytes() {
    let mem = guest_memory();
    let mut rng = Rng::new().unwrap();
    assert_eq!(rng.device_type(), 4);
    let ring = Rings::new(&mem, RING, 16);
    let irq = activate_on_rings(&mut rng, &mem, 0, &[&ring]);
    // Chain 0: one 64-byte buffer. Chain 1: a read-only descriptor
    // (skipped), then 32 writable bytes.
    ring.store(0, DATA, 64, W, 0);
    ring.store(1, DATA + 0x1000, 16, N, 2);
    ring.store(2, DATA + 0x2000, 32, W, 0);
    ring.push_avail(0);
    ring.push_avail(1);
    rng.process_queue();
    assert_eq!(ring.used_idx(), 2);
    assert_eq!(ring.used_elem(0), (0, 64));
    assert_eq!(ring.used_elem(1), (1, 32));
    let mut a = [0u8; 64];
    mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
    assert_ne!(a, [0u8; 64], "not random");
    let mut ro = [0u8; 16];
    mem.read_slice(&mut ro, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(ro, [0u8; 16], "a read-only buffer was written");
    assert!(!irq.take().is_empty());
}

#[test]
fn hostile_buffers_are_bounded_and_never_panic() {
    let mem = guest_memory();
    let mut rng = Rng::new().unwrap();
    let ring = Rings::new(&mem, RING, 16);
    let _irq = activate_on_rings(&mut rng, &mem, 0, &[&ring]);
    // A 4 GiB buffer mostly outside guest memory, a buffer past the end.
    ring.store(0, DATA, u32::MAX, W, 0);
    ring.store(1, 0x1_0000_0000, 4096, W, 0);
    ring.push_avail(0);
    ring.push_avail(1);
    rng.process_queue();
    assert_eq!(ring.used_idx(), 2);
    // The huge one: capped to one chain's worth; the outside one: nothing.
    assert_eq!(ring.used_elem(0), (0, BYTES_PER_CHAIN as u32));
    assert_eq!(ring.used_elem(1), (1, 0));
}

#[test]
fn a_rate_limited_device_waits_for_its_timer_and_then_goes_on() {
    use crate::rate_limiter::{BucketConfig, RateLimiter};
    let mem = guest_memory();
    // 1000 bytes per 100 ms.
    let bw = BucketConfig {
        size: 1000,
        one_time_burst: 0,
        refill_time_ms: 100,
    };
    let mut rng = Rng::with_limiter(RateLimiter::new(Some(bw), None).unwrap()).unwrap();
    let ring = Rings::new(&mem, RING, 16);
    let _irq = activate_on_rings(&mut rng, &mem, 0, &[&ring]);
    for i in 0..3u16 {
        ring.store(i, DATA + u64::from(i) * 0x1000, 600, W, 0);
        ring.push_avail(i);
    }
    rng.process_queue();
    // The first fits the full bucket; the second waits.
    assert_eq!(ring.used_idx(), 1);
    let limiter = rng.limiter.as_ref().unwrap();
    assert!(limiter.is_blocked());
    assert!(
        crate::test_fd::readable_within(limiter.timer_fd(), 2000),
        "the refill never woke the device"
    );
    rng.limiter.as_mut().unwrap().timer_fired();
    rng.process_queue();
    assert_eq!(ring.used_idx(), 2);
    assert_eq!(ring.used_elem(1), (1, 600));
}
