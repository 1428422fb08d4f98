//! The HTTP API proxy: requests on the client port that are not WebSocket upgrades, when
//! `--upstream-http` is set, go to the backend's HTTP API server through one pooled client.
//!
//! What a bot is owed, in order: 401/403 before anything reaches the backend (the same
//! token rules as the WebSocket handshake; its credential is never forwarded, lifeguard
//! presents `--upstream-token`); 503 with `Retry-After` at once while the lane is down; a
//! body within `--max-message-size` (413 otherwise); an answer within `--http-timeout`
//! (504 otherwise); 502 when the backend fails. Every failure is OneBot-shaped. A request in
//! flight when the lane goes down gets the reply grace if the disable is planned (operator,
//! config, shutdown), and 503 at once otherwise: it never hangs on a backend that is gone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::{auth_refused, failure, hop_by_hop, unavailable, Resp};
use crate::config::Settings;
use crate::proto::auth;
use crate::proto::onebot::Role;
use crate::state::{Health, Lane, ProbeKind, State};

/// Planned disables: how long a call already forwarded may take to be answered.
const REPLY_GRACE: Duration = Duration::from_millis(500);
/// Idle pooled connections kept to the backend.
const POOL_IDLE: usize = 64;
/// How long an idle pooled connection is kept (NapCat's Node server drops idle ones after 5 s).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// The pooled client every API call goes through.
pub struct ApiProxy {
    client: Client<HttpConnector, Full<Bytes>>,
}

/// How a forwarded call ended, for the session count and the log.
enum Ended {
    Answered(Resp),
    Failed(Resp, &'static str),
}

impl ApiProxy {
    pub fn new(settings: &Settings) -> Arc<ApiProxy> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(POOL_IDLE)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Arc::new(ApiProxy { client })
    }

    /// Answer one API call.
    pub async fn answer(
        &self,
        state: &Arc<State>,
        peer: SocketAddr,
        req: Request<Incoming>,
    ) -> Resp {
        let resp = self.call(state, peer, req).await;
        state.metrics.http_api_answered(resp.status().as_u16());
        resp
    }

    async fn call(&self, state: &Arc<State>, peer: SocketAddr, req: Request<Incoming>) -> Resp {
        let snap = state.snapshot();
        let s = &snap.settings;
        // Auth before anything else; the credential goes nowhere.
        let presented = auth::presented_token(req.headers(), req.uri().query());
        if let Err(status) = auth::authorized(s.access_token.as_ref(), presented.as_deref()) {
            return auth_refused(status);
        }
        let health = snap.lane(Lane::HttpApi);
        if !health.up {
            return unavailable(health, retry_after(s));
        }
        let Some(upstream) = &s.upstream_http else {
            return failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "config",
                "no HTTP API upstream is configured",
            );
        };
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, s.max_message_size).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return failure(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too-large",
                    &format!("request body above {} bytes", s.max_message_size),
                )
            }
            Err(e) => {
                return failure(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    &format!("request body could not be read: {e}"),
                )
            }
        };

        let uri = match backend_uri(upstream, &parts.uri) {
            Ok(u) => u,
            Err(e) => return failure(StatusCode::BAD_REQUEST, "bad-request", &e),
        };
        let mut out = Request::builder().method(parts.method.clone()).uri(uri);
        if let Some(h) = out.headers_mut() {
            for (name, value) in &parts.headers {
                if !hop_by_hop(name)
                    && name != header::HOST
                    && name != header::AUTHORIZATION
                    && name != header::CONTENT_LENGTH
                    && name != header::EXPECT
                {
                    h.append(name, value.clone());
                }
            }
            if let Ok(v) = HeaderValue::from_str(&upstream.authority()) {
                h.insert(header::HOST, v);
            }
            if let Some(t) = &s.upstream_token {
                if let Ok(v) = HeaderValue::from_str(&format!("Bearer {}", t.expose())) {
                    h.insert(header::AUTHORIZATION, v);
                }
            }
        }
        let out = match out.body(Full::new(body)) {
            Ok(r) => r,
            Err(e) => return failure(StatusCode::BAD_REQUEST, "bad-request", &e.to_string()),
        };

        let guard = state.sessions.open(Lane::HttpApi, Role::Api);
        let ended = self
            .forward(state, out, s.http_timeout, s.max_message_size)
            .await;
        let (resp, cause) = match ended {
            Ended::Answered(r) => (r, "answered"),
            Ended::Failed(r, cause) => {
                tracing::debug!(%peer, path = parts.uri.path(), cause, status = r.status().as_u16(), "HTTP API call failed");
                (r, cause)
            }
        };
        guard.close(cause, None);
        resp
    }

    /// Send the call and wait for the answer, the timeout, or the lane going down.
    async fn forward(
        &self,
        state: &Arc<State>,
        out: Request<Full<Bytes>>,
        timeout: Duration,
        limit: usize,
    ) -> Ended {
        let mut rx = state.subscribe();
        rx.borrow_and_update();
        let call = async {
            let resp = self.client.request(out).await.map_err(|e| {
                let why = std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.to_string());
                if e.is_connect() {
                    format!("cannot connect to the backend's HTTP API: {why}")
                } else {
                    format!("the backend's HTTP API failed: {why}")
                }
            })?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, limit)
                .collect()
                .await
                .map_err(|e| format!("the backend's HTTP API failed mid-answer: {e}"))?
                .to_bytes();
            Ok::<_, String>((parts, body))
        };
        tokio::pin!(call);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        // Set once the lane went down for a planned cause: the grace is running.
        let mut planned_down: Option<Arc<Health>> = None;
        let mut watching = true;
        loop {
            tokio::select! {
                r = &mut call => {
                    return match r {
                        Ok((parts, body)) => Ended::Answered(relay_answer(state, parts, body)),
                        Err(e) => {
                            state.kick_probe_of(ProbeKind::Http);
                            Ended::Failed(failure(StatusCode::BAD_GATEWAY, "upstream-failed", &e), "upstream-failed")
                        }
                    };
                }
                _ = &mut deadline => {
                    if let Some(health) = planned_down.take() {
                        let _ticket = state.sessions.sweep_ticket();
                        return Ended::Failed(unavailable(&health, 1), "down");
                    }
                    state.kick_probe_of(ProbeKind::Http);
                    return Ended::Failed(
                        failure(
                            StatusCode::GATEWAY_TIMEOUT,
                            "upstream-timeout",
                            &format!("the backend's HTTP API did not answer within {} ms", timeout.as_millis()),
                        ),
                        "upstream-timeout",
                    );
                }
                changed = rx.changed(), if watching && planned_down.is_none() => {
                    if changed.is_err() {
                        watching = false;
                        continue;
                    }
                    let snap = rx.borrow_and_update().clone();
                    let health = snap.lane(Lane::HttpApi).clone();
                    if snap.hard_stop || (!health.up && !health.cause.planned()) {
                        let _ticket = state.sessions.sweep_ticket();
                        return Ended::Failed(unavailable(&health, 1), "down");
                    }
                    if !health.up {
                        let grace = tokio::time::Instant::now() + REPLY_GRACE;
                        if grace < deadline.deadline() {
                            deadline.as_mut().reset(grace);
                        }
                        planned_down = Some(health);
                    }
                }
            }
        }
    }
}

/// The backend's answer as the bot gets it: status, headers (hop-by-hop ones dropped), body.
fn relay_answer(state: &State, parts: hyper::http::response::Parts, body: Bytes) -> Resp {
    if parts.status == StatusCode::OK
        && body.len() < 512
        && contains(&body, b"\"Server is closed\"")
    {
        // NapCat's HTTP server was switched off under a kept-alive connection: its own
        // failure goes through as it is, and the probe finds out at once.
        state.kick_probe_of(ProbeKind::Http);
    }
    let mut r = hyper::Response::new(Full::new(body));
    *r.status_mut() = parts.status;
    let h = r.headers_mut();
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) && name != header::CONTENT_LENGTH {
            h.append(name, value.clone());
        }
    }
    r
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

/// The backend's URI for a bot's request: the upstream's base path, the request's path,
/// its query without `access_token` (a client credential never goes upstream).
pub fn backend_uri(upstream: &crate::config::HttpUrl, req: &Uri) -> Result<Uri, String> {
    let mut target = format!(
        "http://{}{}{}",
        upstream.authority(),
        upstream.base_path(),
        req.path()
    );
    if let Some(q) = req.query() {
        let kept: Vec<&str> = q
            .split('&')
            .filter(|kv| {
                !kv.is_empty() && !kv.starts_with("access_token=") && *kv != "access_token"
            })
            .collect();
        if !kept.is_empty() {
            target.push('?');
            target.push_str(&kept.join("&"));
        }
    }
    target
        .parse()
        .map_err(|e| format!("cannot build the backend URL: {e}"))
}

/// What `Retry-After` says while the lane is down: about the time probes need to bring it
/// back.
fn retry_after(s: &Settings) -> u64 {
    (s.probe_interval.as_secs().max(1) * u64::from(s.rise)).clamp(1, 30)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HttpUrl;

    #[test]
    fn the_client_credential_never_reaches_the_backend_uri() {
        let up = HttpUrl::parse("http://127.0.0.1:3000/napcat/").unwrap();
        let uri = |s: &str| backend_uri(&up, &s.parse().unwrap()).unwrap().to_string();
        assert_eq!(
            uri("/send_msg?access_token=s3cret&echo=1"),
            "http://127.0.0.1:3000/napcat/send_msg?echo=1"
        );
        assert_eq!(
            uri("/get_status?access_token=s3cret"),
            "http://127.0.0.1:3000/napcat/get_status"
        );
        assert_eq!(
            uri("/get_status?my_access_token=x&&access_token"),
            "http://127.0.0.1:3000/napcat/get_status?my_access_token=x"
        );
        let root = HttpUrl::parse("http://[::1]:3000").unwrap();
        assert_eq!(
            backend_uri(&root, &"/".parse().unwrap())
                .unwrap()
                .to_string(),
            "http://[::1]:3000/"
        );
    }
}
