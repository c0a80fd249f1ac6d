//! The user's kernel file: capsule's probe of it (symbol table, embedded
//! configuration), its load into guest RAM, copied and mapped, compared,
//! and `capsule doctor`'s reading of it (`capsule_fuzz::kernel`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    capsule_fuzz::kernel::run(data);
});
