//! HTTP transports: the API proxy (bots call lifeguard's client port, lifeguard calls the
//! backend's HTTP server) and the POST relay (the backend posts its events to lifeguard,
//! lifeguard posts them to the bots, adding the lifecycle `enable`/`disable` events no
//! backend sends).
//!
//! - [`api`]: the API proxy, for the requests on the client port that are not WebSocket
//!   upgrades;
//! - [`post`]: the POST listener, the per-bot ordered queues and the lifecycle events;
//! - [`sign`]: `X-Signature` (HMAC-SHA1) as pure functions.

pub mod api;
pub mod post;
pub mod sign;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use crate::state::Health;

pub type Resp = Response<Full<Bytes>>;

/// A OneBot-shaped failure: `{"status":"failed","retcode",...,"message"}`, with the cause
/// as its own field for machines. The retcode is the HTTP status, as for auth refusals.
pub fn failure(status: StatusCode, cause: &str, message: &str) -> Resp {
    let body = serde_json::json!({
        "status": "failed",
        "retcode": status.as_u16(),
        "data": null,
        "message": message,
        "wording": message,
        "echo": null,
        "cause": cause,
    });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// 401 (no token) or 403 (wrong token), before anything reaches the backend.
pub fn auth_refused(status: StatusCode) -> Resp {
    let (cause, message) = if status == StatusCode::UNAUTHORIZED {
        (
            "unauthorized",
            "missing access token (Authorization: Bearer <token> or ?access_token=)",
        )
    } else {
        ("forbidden", "wrong access token")
    };
    let mut r = failure(status, cause, message);
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// 503 with `Retry-After` while the lane cannot serve: the answer comes at once.
pub fn unavailable(health: &Health, retry_after: u64) -> Resp {
    let mut r = failure(
        StatusCode::SERVICE_UNAVAILABLE,
        health.cause.as_str(),
        &format!("unavailable: {}: {}", health.cause, health.reason),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    r
}

/// Hop-by-hop headers (RFC 9110 7.6.1), never relayed.
pub(crate) fn hop_by_hop(name: &header::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}
