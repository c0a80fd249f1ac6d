//! The command line's value parsers: `--disk`, `--net`, `--memory` (and
//! the sizes and MAC addresses inside them).
#![no_main]

use capsule::config::{format_size, parse_mac, parse_size, DiskConfig, NetConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 4 {
        0 => {
            let _ = s.parse::<DiskConfig>();
        }
        1 => {
            let _ = s.parse::<NetConfig>();
        }
        2 => {
            if let Ok(n) = parse_size(s) {
                // A size shown exactly (a whole number of its unit; sizes
                // that are not are rounded to one decimal, for messages)
                // must parse back to the same size.
                let shown = format_size(n);
                if n > 0 && !shown.contains('.') {
                    assert_eq!(
                        parse_size(&shown).ok(),
                        Some(n),
                        "{s:?} -> {n} -> {shown:?}"
                    );
                }
            }
        }
        _ => {
            if let Ok(mac) = parse_mac(s) {
                let shown = devices::virtio::net::format_mac(&mac);
                assert_eq!(parse_mac(&shown).ok(), Some(mac), "{s:?} -> {shown:?}");
            }
        }
    }
});
