//! What the HTTP transports take from peers: an `X-Signature` header, a POSTed event's
//! head, a URL, and a request target mapped onto the backend. Nothing may panic; a parsed
//! signature is one lifeguard would print the same way; a body signed by lifeguard
//! verifies, and changing one byte makes it fail.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeguard::config::HttpUrl;
use lifeguard::transport::http::{api, post::EventHead, sign};

fuzz_target!(|data: &[u8]| {
    if let Some(digest) = sign::parse_signature(data) {
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let v = data.trim_ascii();
        assert!(v[5..].eq_ignore_ascii_case(hex.as_bytes()));
    }
    let (secret, body) = data.split_at(data.len().min(16));
    let header = sign::signature(secret, body);
    assert!(sign::verify(secret, Some(header.as_bytes()), body).is_ok());
    if let Some((first, rest)) = body.split_first() {
        let mut other = vec![first ^ 1];
        other.extend_from_slice(rest);
        assert!(sign::verify(secret, Some(header.as_bytes()), &other).is_err());
    }
    assert!(sign::verify(secret, None, body).is_err());
    let _ = EventHead::parse(data);
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(url) = HttpUrl::parse(s) {
            let _ = url.to_string();
            if let Ok(target) = "/send_msg?x=1".parse::<hyper::Uri>() {
                let _ = api::backend_uri(&url, &target);
            }
        }
        if let Ok(target) = s.parse::<hyper::Uri>() {
            if let Ok(up) = HttpUrl::parse("http://127.0.0.1:3000/base") {
                let _ = api::backend_uri(&up, &target);
            }
        }
    }
});
