//! virtio-balloon: inflate, deflate, statistics and free page report
//! chains from the guest, one queue kicked per round.
#![no_main]

use capsule_fuzz::virtio::{run_device, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    run_device(Kind::Balloon, data, |rig, round| {
        rig.notify(u32::from(round % 4));
    });
});
