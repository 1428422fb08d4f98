//! lifeguard's TOML config file (any text): parsed and resolved into settings without
//! panicking; every error is a message, and tokens show as `***` in `check-config` output.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeguard::config::{parse_file_config, RunArgs, Settings};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = parse_file_config(text) else {
        return;
    };
    if let Ok(s) = Settings::resolve(&RunArgs::default(), Some(&file)) {
        for (key, value) in s.entries() {
            if key.ends_with("token") {
                assert!(value == "***" || value == "(unset)", "{key} = {value}");
            }
        }
    }
});
