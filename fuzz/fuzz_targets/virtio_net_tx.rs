//! virtio-net transmit: frames the guest offers on the TX queue, over a
//! backend whose send outcomes (sent, full, errors) are fuzzer data.
#![no_main]

use capsule_fuzz::virtio::{run_device, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    run_device(Kind::Net, data, |rig, _| rig.notify(1));
});
