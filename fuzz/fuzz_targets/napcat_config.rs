//! NapCat's OneBot config file (any text): parsed without panicking; what it reports is
//! what the JSON says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeguard::intent::napcat;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = napcat::parse(text) {
        let v: serde_json::Value = serde_json::from_str(text).expect("parsed, so JSON");
        if !file.flat {
            // Every entry reported comes from one of the file's lists.
            let listed: usize = v
                .get("network")
                .and_then(|n| n.as_object())
                .map(|n| {
                    n.values()
                        .filter_map(|l| l.as_array())
                        .map(|l| l.len())
                        .sum()
                })
                .unwrap_or(0);
            assert!(
                file.entries.len() <= listed,
                "{} > {listed}",
                file.entries.len()
            );
        }
    }
});
