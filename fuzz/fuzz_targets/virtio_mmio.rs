//! The virtio-mmio register window: any sequence of reads and writes at
//! any offset and width, memory patches and queue notifications, for each
//! device type, over fuzzer-filled guest memory.
#![no_main]

use capsule_fuzz::virtio::{Kind, Rig};
use capsule_fuzz::Input;
use devices::bus::BusDevice;
use libfuzzer_sys::fuzz_target;

/// Most operations run per input, so one input cannot take long.
const MAX_OPS: usize = 512;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let kind = Kind::from_byte(input.u8());
    let image_len = usize::from(input.u16() % 4096);
    let image = input.bytes(image_len);
    let mut opts = Input::new(input.bytes(8));
    let mut rig = Rig::new(kind, &mut opts, image);
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        // Offsets past the 0x1000-byte window too, to check they are ignored.
        let offset = u64::from(input.u16() % 0x1100);
        let width = [1usize, 2, 4, 8, 3, 0][usize::from(op >> 4) % 6];
        match op % 5 {
            0 => {
                let mut buf = [0u8; 8];
                rig.mmio().read(offset, &mut buf[..width]);
            }
            1 => {
                let v = input.u64().to_le_bytes();
                rig.mmio().write(offset, &v[..width]);
            }
            2 => {
                // A driver-like 32-bit write to a register (offset & !3).
                let v = input.u32();
                rig.write(offset & 0x1fc, v);
            }
            3 => {
                let q = u32::from(input.u8() % 3);
                rig.notify(q);
            }
            _ => {
                let addr = u64::from(input.u16());
                let len = usize::from(input.u8());
                let bytes = input.bytes(len);
                rig.poke(addr, bytes);
                rig.run_events();
            }
        }
    }
});
