//! virtio-blk request processing: descriptor chains, request headers,
//! data buffers and status bytes all come from fuzzer-filled guest memory;
//! the device runs behind its MMIO transport in an event loop.
#![no_main]

use capsule_fuzz::virtio::{run_device, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    run_device(Kind::Block, data, |rig, _| rig.notify(0));
});
