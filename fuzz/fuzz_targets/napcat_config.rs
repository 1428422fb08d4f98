//! NapCat's OneBot config file (any text): parsed without panicking; what it reports is
//! what the JSON says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeguard::intent::napcat::{self, NapcatFile};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(NapcatFile::V4(servers)) = napcat::parse(text) {
        let v: serde_json::Value = serde_json::from_str(text).expect("parsed, so JSON");
        let list = v.pointer("/network/websocketServers").and_then(|l| l.as_array());
        assert!(servers.len() <= list.map(|l| l.len()).unwrap_or(0));
    }
});
