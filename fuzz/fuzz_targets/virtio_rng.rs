//! virtio-rng: entropy requests from the guest, with and without a rate
//! limiter, the queue kicked every round.
#![no_main]

use capsule_fuzz::virtio::{run_device, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    run_device(Kind::Rng, data, |rig, _| rig.notify(0));
});
