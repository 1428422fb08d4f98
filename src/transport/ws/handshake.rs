//! The server side of a WebSocket handshake, answered with hyper before any upgrade: is
//! this a valid upgrade request, and the answers lifeguard gives (101, or an HTTP error
//! with a body that says why).

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};

use crate::proto::ws;

pub type Resp = Response<Full<Bytes>>;

pub fn plain(status: StatusCode, body: &str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub fn json(status: StatusCode, body: serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// 503 while the backend cannot serve: never accept-then-close.
pub fn unavailable(cause: &str, reason: &str, retry_after: u64) -> Resp {
    let mut r = json(
        StatusCode::SERVICE_UNAVAILABLE,
        serde_json::json!({"status": "unavailable", "cause": cause, "reason": reason}),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    r
}

/// 401 (missing) or 403 (wrong), in OneBot's shape.
pub fn auth_refused(status: StatusCode) -> Resp {
    let msg = if status == StatusCode::UNAUTHORIZED {
        "missing access token (Authorization: Bearer <token> or ?access_token=)"
    } else {
        "wrong access token"
    };
    let mut r = json(
        status,
        serde_json::json!({"status": "failed", "retcode": status.as_u16(), "message": msg}),
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

fn header_has_token<B>(req: &Request<B>, name: header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether the request asks for a WebSocket upgrade (the rest are plain HTTP).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    header_has_token(req, header::CONNECTION, "upgrade")
        && header_has_token(req, header::UPGRADE, "websocket")
}

/// The request's `Sec-WebSocket-Key` when it is a WebSocket upgrade lifeguard can answer;
/// otherwise the answer it gets.
pub fn upgrade_key<B>(req: &Request<B>) -> Result<Vec<u8>, Box<Resp>> {
    if !is_upgrade(req) {
        let mut r = plain(
            StatusCode::UPGRADE_REQUIRED,
            "lifeguard: this port speaks OneBot v11 forward WebSocket; connect with a WebSocket client",
        );
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return Err(Box::new(r));
    }
    if req.method() != Method::GET {
        return Err(Box::new(plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "WebSocket handshakes use GET",
        )));
    }
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        let mut r = plain(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported Sec-WebSocket-Version (13 is)",
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Err(Box::new(r));
    }
    let bad = |why: &str| Err(Box::new(plain(StatusCode::BAD_REQUEST, why)));
    // RFC 6455 4.1: an HTTP/1.1 (or later) GET; hyper answers HTTP/1.0 upgrades too.
    if req.version() < Version::HTTP_11 {
        return bad("WebSocket handshakes need HTTP/1.1");
    }
    let mut keys = req.headers().get_all(header::SEC_WEBSOCKET_KEY).iter();
    match (keys.next(), keys.next()) {
        (Some(k), None) if ws::valid_client_key(k.as_bytes()) => Ok(k.as_bytes().to_vec()),
        (Some(_), Some(_)) => bad("more than one Sec-WebSocket-Key"),
        _ => bad("missing or malformed Sec-WebSocket-Key (16 bytes, base64)"),
    }
}

/// The 101 that completes a handshake for `key`.
pub fn switching(key: &[u8]) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&ws::accept_key(key)) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}
