//! The snapshot file reader and the checks a restore makes before it
//! opens KVM, then the saved device states put back
//! (`capsule_fuzz::snapshot`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    capsule_fuzz::snapshot::run(data);
});
