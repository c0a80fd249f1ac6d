//! virtio-net receive: fuzzer frames from the backend land in receive
//! buffers described by fuzzer descriptor chains (mergeable buffers when
//! the driver features ask for them).
#![no_main]

use capsule_fuzz::virtio::{run_device, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    run_device(Kind::Net, data, |rig, _| rig.notify(0));
});
