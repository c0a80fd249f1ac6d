//! The metadata service as a guest reaches it: the first byte chooses
//! between its HTTP request parser plus answers (the rest is one
//! request, over a V1 or V2 store), and its TCP/IP endpoint (the rest is
//! frames, each a 2-byte length and that many bytes, handed to the
//! endpoint as the net device would, its answers taken after each).
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use mmds::http::{self, Parsed};
use mmds::{Mmds, Responder, Version};

fn store(v2: bool) -> Mmds {
    let mut m = Mmds::default();
    m.put(
        serde_json::json!({"latest": {"meta-data": {"id": "i-1", "list": [1, "a", {"k": null}]}}}),
    )
    .expect("seed data fits");
    if v2 {
        m.version = Version::V2;
    }
    m
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let mut m = store(mode & 2 != 0);
        if let Parsed::Done(req, used) = http::parse(rest) {
            assert!(used <= rest.len());
            let answer = http::respond(&mut m, &req).to_bytes();
            assert!(answer.starts_with(b"HTTP/1.1 "));
        }
        return;
    }
    let mut r = Responder::new(Arc::new(Mutex::new(store(mode & 2 != 0))));
    let mut frames = rest;
    while let [hi, lo, tail @ ..] = frames {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (frame, next) = tail.split_at(len);
        if mmds::is_for(frame, r.ip()) {
            r.receive(frame);
        }
        let mut out = 0;
        while let Some(f) = r.pop() {
            assert!(f.len() <= 1514, "a {}-byte frame for the guest", f.len());
            out += 1;
            assert!(out < 10_000, "the endpoint never stops sending");
        }
        frames = next;
    }
});
