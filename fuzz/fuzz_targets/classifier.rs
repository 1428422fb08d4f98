//! The OneBot classifier on any payload: whole small texts and the first bytes of large
//! ones. Nothing may panic, and a heartbeat's or lifecycle's fields must be what the JSON
//! says when the payload is valid JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeguard::proto::onebot::{self, Kind};

fuzz_target!(|data: &[u8]| {
    let _ = onebot::is_reply(data);
    match onebot::classify(data) {
        Kind::Heartbeat { self_id, .. } | Kind::Lifecycle { self_id, .. } => {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
                if let (Some(id), Some(json)) = (self_id, v.get("self_id").and_then(|x| x.as_u64()))
                {
                    assert_eq!(id, json, "self_id read differently than JSON says");
                }
            }
        }
        Kind::BotOffline { tag, message, .. } => {
            // What a kick notice says is kept, but bounded.
            assert!(tag.len() <= onebot::NOTICE_TEXT_MAX + 4, "{}", tag.len());
            assert!(
                message.len() <= onebot::NOTICE_TEXT_MAX + 4,
                "{}",
                message.len()
            );
        }
        Kind::Reply | Kind::Event => {}
    }
    // What lifeguard builds from what it learned stays valid JSON.
    if let Ok(status) = std::str::from_utf8(data) {
        if serde_json::from_str::<serde_json::Value>(status).is_ok_and(|v| v.is_object()) {
            let beat = onebot::heartbeat_event(1, status, 1000);
            assert!(
                serde_json::from_str::<serde_json::Value>(&beat).is_ok(),
                "{beat}"
            );
        }
    }
});
