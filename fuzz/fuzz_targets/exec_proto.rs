//! `capsule exec`'s wire format: frames decoded from a byte stream cut
//! into arbitrary pieces, each parsed as a guest and as a host message,
//! and the exec spec decoder. A message that decodes must encode back to
//! the same frame.
#![no_main]

use exec_proto::{Decoder, ExecSpec, GuestMsg, HostMsg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    if cut & 0x80 != 0 {
        if let Ok(spec) = ExecSpec::from_bytes(data) {
            let bytes = spec.to_bytes().expect("a decoded spec encodes");
            assert_eq!(ExecSpec::from_bytes(&bytes), Ok(spec));
        }
        return;
    }
    let step = usize::from(cut).max(1);
    let mut dec = Decoder::new();
    for piece in data.chunks(step) {
        dec.push(piece);
        loop {
            match dec.next_frame() {
                Ok(Some(frame)) => {
                    if let Ok(m) = GuestMsg::parse(frame.clone()) {
                        let mut out = Vec::new();
                        m.encode(&mut out);
                        let mut again = Decoder::new();
                        again.push(&out);
                        let f = again.next_frame().expect("re-encoded frame decodes");
                        assert_eq!(GuestMsg::parse(f.expect("one frame")).ok(), Some(m));
                    }
                    if let Ok(m) = HostMsg::parse(frame) {
                        let mut out = Vec::new();
                        m.encode(&mut out);
                        let mut again = Decoder::new();
                        again.push(&out);
                        let f = again.next_frame().expect("re-encoded frame decodes");
                        assert_eq!(HostMsg::parse(f.expect("one frame")).ok(), Some(m));
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
