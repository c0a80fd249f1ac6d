//! virtio-console: transmit chains from the guest and host input into
//! the guest's receive chains, alternating.
#![no_main]

use capsule_fuzz::virtio::{run_device, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    run_device(Kind::Console, data, |rig, round| {
        rig.console_input(&[b'x'; 300][..usize::from(round) * 100]);
        rig.notify(u32::from(round % 2));
    });
});
