//! A client's handshake request as bytes off the wire: parsed as hyper would (httparse),
//! then lifeguard's upgrade checks, its token extraction and the path's role. Nothing may
//! panic; an accepted key is 16 base64 bytes and gets a well-formed 101; a token put in
//! the query the way lifeguard encodes it comes back byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeguard::proto::{auth, onebot::Role, ws};
use lifeguard::transport::ws::handshake;

fuzz_target!(|data: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut headers);
    if !matches!(parsed.parse(data), Ok(httparse::Status::Complete(_))) {
        return;
    }
    let mut req = hyper::Request::builder()
        .method(parsed.method.unwrap_or("GET"))
        .uri(parsed.path.unwrap_or("/"))
        .version(if parsed.version == Some(0) {
            hyper::Version::HTTP_10
        } else {
            hyper::Version::HTTP_11
        });
    for h in parsed.headers.iter() {
        req = req.header(h.name, h.value);
    }
    let Ok(req) = req.body(()) else {
        return;
    };
    if let Ok(key) = handshake::upgrade_key(&req) {
        assert!(ws::valid_client_key(&key));
        let resp = handshake::switching(&key);
        assert_eq!(resp.status(), 101);
        assert!(resp.headers().contains_key("sec-websocket-accept"));
    }
    let _ = Role::of_path(req.uri().path());
    let presented = auth::presented_token(req.headers(), req.uri().query());
    if let Some(t) = &presented {
        assert!(!t.is_empty(), "an empty token counts as none");
    }
    // Round trip: lifeguard's own query encoding of any token decodes to the same bytes.
    if let Ok(s) = std::str::from_utf8(data) {
        if !s.is_empty() {
            let q = format!("access_token={}", auth::query_value(s));
            let back = auth::presented_token(&hyper::HeaderMap::new(), Some(&q));
            assert_eq!(back.as_deref(), Some(s.as_bytes()));
        }
    }
});
