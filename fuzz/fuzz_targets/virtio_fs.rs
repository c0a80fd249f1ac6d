//! virtio-fs's front end: the driver's bring-up with any features and
//! ring addresses the fuzzer put in memory, then a script interleaving
//! queue kicks, the backend's "used" signals, resets and re-activations,
//! memory patches and the backend hanging up; the backend refuses any
//! request the fuzzer says. The scripted backend (`capsule_fuzz::fs`)
//! panics if capsule ever hands it a ring outside guest memory.
#![no_main]

use capsule_fuzz::virtio::{reg, Kind, Rig};
use capsule_fuzz::Input;
use devices::virtio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use libfuzzer_sys::fuzz_target;

/// Script steps per input.
const MAX_STEPS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let features = input.u64();
    let opts_len = usize::from(input.u16() % 512);
    let mut opts = Input::new(input.bytes(opts_len));
    let script_len = usize::from(input.u8()) % MAX_STEPS;
    let mut script = Input::new(input.bytes(script_len * 4));
    let image = input.rest();
    let mut rig = Rig::new(Kind::Fs, &mut opts, image);
    let fs = rig.fs.clone().expect("an fs rig has its backend handle");
    rig.set_up_driver(features);
    while !script.is_empty() {
        let op = script.u8();
        let arg = script.u8();
        match op % 6 {
            0 => rig.notify(u32::from(arg % 3)),
            1 => {
                fs.fire(usize::from(arg % 3));
                rig.run_events();
            }
            2 => {
                // A driver reset, then a new bring-up (other features).
                rig.write(reg::STATUS, 0);
                rig.run_events();
                rig.set_up_driver(features ^ u64::from(script.u16()));
            }
            3 => {
                fs.hang_up();
                rig.run_events();
            }
            4 => {
                // A bring-up with rings wherever the script says, any
                // queue size: capsule must refuse what is not in memory.
                rig.write(reg::STATUS, 0);
                rig.run_events();
                hostile_bring_up(&mut rig, features, arg, &mut script);
            }
            _ => {
                let addr = u64::from(script.u16());
                rig.poke(addr, &[arg; 8]);
                rig.notify(u32::from(arg % 2));
            }
        }
    }
});

/// Brings the device up as a driver would, but with each queue's size and
/// ring addresses from the script (`arg` bit `q` leaves queue `q` not
/// ready); the high address words are small, so they sometimes land just
/// past the end of memory and sometimes far away.
fn hostile_bring_up(rig: &mut Rig, features: u64, arg: u8, script: &mut Input<'_>) {
    rig.negotiate(features);
    for q in 0..rig.queues {
        rig.write(reg::QUEUE_SEL, q);
        rig.write(reg::QUEUE_NUM, u32::from(script.u16()));
        for (low, high) in [
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH),
            (reg::QUEUE_AVAIL_LOW, reg::QUEUE_AVAIL_HIGH),
            (reg::QUEUE_USED_LOW, reg::QUEUE_USED_HIGH),
        ] {
            rig.write(low, script.u32());
            rig.write(high, u32::from(script.u8() % 4));
        }
        if arg & (1 << q) == 0 {
            rig.write(reg::QUEUE_READY, 1);
        }
    }
    rig.write(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    rig.run_events();
}
