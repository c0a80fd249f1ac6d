//! The API socket's HTTP/1.1 request parser, the router and the JSON body
//! decoders, then the controller's pre-boot handling of what they accept,
//! and the response the server would write.
//!
//! The input is cut into the pieces a client's writes arrive in (first
//! byte: where to cut), so the parser sees partial requests too.
#![no_main]

use std::path::PathBuf;

use capsule::api::action::VmmAction;
use capsule::api::controller::Controller;
use capsule::api::http::{self, Parsed};
use capsule::api::server::{response, route};
use capsule::api::types::ActionType;
use capsule::builder::Console;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(cut).max(1);
    let mut ctl = Controller::new("fuzz".into(), PathBuf::from("/dev/null"), Console::stdio());
    let mut buf = Vec::new();
    let mut fed = 0;
    while fed < data.len() || !buf.is_empty() {
        let take = step.min(data.len() - fed);
        buf.extend_from_slice(&data[fed..fed + take]);
        fed += take;
        match http::parse(&buf) {
            Ok(Parsed::Incomplete { .. }) if take > 0 => continue,
            Ok(Parsed::Incomplete { .. }) => break,
            Err(e) => {
                let _ = http::Response::fault(e.status, &e.message).to_bytes(true);
                break;
            }
            Ok(Parsed::Complete(req, used)) => {
                assert!(
                    used > 0 && used <= buf.len(),
                    "consumed {used} of {}",
                    buf.len()
                );
                buf.drain(..used);
                let answer = match route(&req.method, &req.path, &req.body) {
                    Err(r) => r,
                    // Actions with effects outside the process (a log
                    // file, starting a VM) are routed but not carried out.
                    Ok(VmmAction::PutLogger(_) | VmmAction::Action(ActionType::InstanceStart)) => {
                        continue
                    }
                    Ok(action) => response(ctl.handle(action, None)),
                };
                let _ = answer.to_bytes(req.close);
            }
        }
    }
});
