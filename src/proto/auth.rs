//! Access tokens as OneBot peers present them, and the check against the configured one.
//!
//! Accepted forms (the OneBot v11 spec and what real clients send): `Authorization: Bearer
//! <token>`, `Authorization: Token <token>` (Koishi's HTTP mode, go-cqhttp), or the query
//! parameter `access_token=<token>` (percent-decoded). The header wins when both are
//! given. A token is compared as bytes, in constant time: what a peer sends is never
//! re-encoded, so two different inputs can never decode to the same accepted token.

use hyper::header::{HeaderMap, AUTHORIZATION};
use hyper::StatusCode;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::config::Secret;

/// The credential a peer presented, if any. An empty one counts as none.
pub fn presented_token(headers: &HeaderMap, query: Option<&str>) -> Option<Box<[u8]>> {
    if let Some(v) = headers.get(AUTHORIZATION) {
        let v = v.as_bytes().trim_ascii();
        if let Some(sp) = v.iter().position(|b| *b == b' ') {
            let (scheme, rest) = v.split_at(sp);
            if scheme.eq_ignore_ascii_case(b"bearer") || scheme.eq_ignore_ascii_case(b"token") {
                let t = rest.trim_ascii();
                return (!t.is_empty()).then(|| t.into());
            }
        }
    }
    let raw = query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("access_token="))?;
    let t: Vec<u8> = percent_decode_str(raw).collect();
    (!t.is_empty()).then(|| t.into())
}

/// Does `presented` satisfy the configured token? 401 when one is needed and none was
/// given, 403 when the one given is wrong.
pub fn authorized(expected: Option<&Secret>, presented: Option<&[u8]>) -> Result<(), StatusCode> {
    match (expected, presented) {
        (None, _) => Ok(()),
        (Some(_), None) => Err(StatusCode::UNAUTHORIZED),
        (Some(t), Some(p)) if t.matches(p) => Ok(()),
        (Some(_), Some(_)) => Err(StatusCode::FORBIDDEN),
    }
}

/// RFC 3986's unreserved characters stay as they are; everything else is encoded.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A token as the value of a query parameter.
pub fn query_value(s: &str) -> String {
    utf8_percent_encode(s, QUERY_VALUE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(auth: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_bytes(auth).unwrap());
        h
    }

    #[test]
    fn auth_rules() {
        let t = Secret::new("abc");
        assert_eq!(authorized(None, None), Ok(()));
        assert_eq!(authorized(Some(&t), None), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(
            authorized(Some(&t), Some(b"abd")),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            authorized(Some(&t), Some(b"ab")),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(authorized(Some(&t), Some(b"abc")), Ok(()));
    }

    #[test]
    fn header_forms_and_query() {
        let none = HeaderMap::new();
        let p = |h: &HeaderMap, q: Option<&str>| presented_token(h, q).map(|b| b.to_vec());
        assert_eq!(p(&headers(b"Bearer abc"), None), Some(b"abc".to_vec()));
        assert_eq!(p(&headers(b"token  abc "), None), Some(b"abc".to_vec()));
        assert_eq!(
            p(&headers(b"Basic abc"), Some("access_token=q")),
            Some(b"q".to_vec())
        );
        assert_eq!(p(&headers(b"Bearer "), None), None, "empty is none");
        assert_eq!(
            p(&none, Some("x=1&access_token=a%20b%2Bc+d")),
            Some(b"a b+c+d".to_vec())
        );
        assert_eq!(p(&none, Some("access_token=100%")), Some(b"100%".to_vec()));
        assert_eq!(p(&none, Some("access_token=%zz")), Some(b"%zz".to_vec()));
        assert_eq!(p(&none, Some("access_token=")), None);
        assert_eq!(p(&none, Some("my_access_token=x")), None);
        // Decoding never turns invalid UTF-8 into something else that might match.
        assert_eq!(p(&none, Some("access_token=%FF")), Some(vec![0xFF]));
        assert_eq!(
            authorized(Some(&Secret::new("\u{FFFD}")), Some(&[0xFF])),
            Err(StatusCode::FORBIDDEN)
        );
    }

    #[test]
    fn query_values_round_trip() {
        for t in ["a b&c", "s3cret", "晴=?#%+", ""] {
            let enc = query_value(t);
            assert!(enc
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)));
            assert_eq!(percent_decode_str(&enc).decode_utf8().unwrap(), t);
        }
        assert_eq!(query_value("a b&c"), "a%20b%26c");
    }
}
