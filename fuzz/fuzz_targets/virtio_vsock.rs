//! virtio-vsock: guest memory, features and queue kicks on one side,
//! host clients, listeners and their reads and writes on the other,
//! interleaved by a script (`capsule_fuzz::vsock`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    capsule_fuzz::vsock::run(data);
});
