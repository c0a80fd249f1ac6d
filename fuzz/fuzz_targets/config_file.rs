//! `--config-file`: the JSON document a user gives, decoded as
//! `read_config_file` does, applied to a controller as `capsule run
//! --config-file` does (without starting the VM), then the configuration
//! it yields read back.
#![no_main]

use std::path::PathBuf;

use capsule::api::controller::Controller;
use capsule::api::types::FullVmConfig;
use capsule::builder::Console;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut config) = serde_json::from_slice::<FullVmConfig>(data) else {
        return;
    };
    // A logger section would open (create) its log file; the rest of the
    // logger section is decoded above and its level checked here.
    config.logger = None;
    let mut ctl = Controller::new("fuzz".into(), PathBuf::from("/dev/null"), Console::stdio());
    if ctl.apply_config(config).is_ok() {
        let _ = ctl.handle(capsule::api::action::VmmAction::GetVmConfig, None);
    }
});
