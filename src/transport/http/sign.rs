//! The `X-Signature` of OneBot's HTTP POST: `sha1=<lowercase hex HMAC-SHA1(secret, body)>`
//! over the body's exact bytes. Pure functions, so that they can be fuzzed and tested
//! apart from any socket.

use hmac::{Hmac, Mac};
use sha1::Sha1;

/// Why a signature does not pass, and the HTTP status that says so (the spec's and
/// NoneBot's: 401 missing, 403 wrong).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    /// No `X-Signature` header.
    Missing,
    /// Not `sha1=` followed by 40 hex digits.
    Malformed,
    /// Well formed, but not the body's HMAC under the secret.
    Mismatch,
}

impl SignatureError {
    pub fn status(self) -> u16 {
        match self {
            SignatureError::Missing => 401,
            SignatureError::Malformed | SignatureError::Mismatch => 403,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SignatureError::Missing => "missing X-Signature",
            SignatureError::Malformed => "malformed X-Signature (sha1=<40 hex digits> expected)",
            SignatureError::Mismatch => "X-Signature does not match the body",
        }
    }
}

fn mac(secret: &[u8], body: &[u8]) -> Hmac<Sha1> {
    // HMAC takes keys of any length: this cannot fail.
    let mut m = <Hmac<Sha1> as Mac>::new_from_slice(secret).expect("HMAC accepts any key length");
    m.update(body);
    m
}

/// The header value for `body` signed with `secret`: `sha1=<40 lowercase hex digits>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = mac(secret, body).finalize().into_bytes();
    let mut out = String::with_capacity(45);
    out.push_str("sha1=");
    for b in digest {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
    }
    out
}

/// The 20-byte digest a header value carries: `sha1=` (any case) and 40 hex digits (any
/// case), surrounding whitespace allowed; `None` for anything else.
pub fn parse_signature(header: &[u8]) -> Option<[u8; 20]> {
    let v = header.trim_ascii();
    if v.len() != 45 || !v[..5].eq_ignore_ascii_case(b"sha1=") {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 20];
    for (i, pair) in v[5..].chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// Does `header` (the request's `X-Signature`, if any) sign `body` with `secret`? The
/// comparison is constant-time.
pub fn verify(secret: &[u8], header: Option<&[u8]>, body: &[u8]) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let digest = parse_signature(header).ok_or(SignatureError::Malformed)?;
    mac(secret, body)
        .verify_slice(&digest)
        .map_err(|_| SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_2202_vectors() {
        // RFC 2202, test cases 1 and 2.
        assert_eq!(
            signature(&[0x0b; 20], b"Hi There"),
            "sha1=b617318655057264e28bc0b6fb378c8ef146be00"
        );
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha1=effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
    }

    #[test]
    fn verify_tells_missing_from_wrong() {
        let body = br#"{"post_type":"message"}"#;
        let good = signature(b"s3cret", body);
        assert_eq!(verify(b"s3cret", Some(good.as_bytes()), body), Ok(()));
        assert_eq!(
            verify(b"s3cret", Some(good.to_uppercase().as_bytes()), body),
            Ok(()),
            "hex and prefix in any case"
        );
        assert_eq!(verify(b"s3cret", None, body).unwrap_err().status(), 401);
        let wrong = signature(b"other", body);
        assert_eq!(
            verify(b"s3cret", Some(wrong.as_bytes()), body),
            Err(SignatureError::Mismatch)
        );
        // One byte more in the body is another body.
        assert_eq!(
            verify(
                b"s3cret",
                Some(good.as_bytes()),
                br#"{"post_type":"message"} "#
            ),
            Err(SignatureError::Mismatch)
        );
        for bad in [
            "",
            "sha1=",
            "sha256=00",
            "sha1=zz",
            &good[..44],
            &format!("{good}0"),
        ] {
            assert_eq!(
                verify(b"s3cret", Some(bad.as_bytes()), body),
                Err(SignatureError::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn parse_never_panics_on_odd_bytes() {
        for input in [
            &b"sha1=\xff\xfe"[..],
            b"\x00",
            b"sha1=\xc3\xa9\xc3\xa9",
            &[b'a'; 45],
        ] {
            assert_eq!(parse_signature(input), None);
        }
    }
}
