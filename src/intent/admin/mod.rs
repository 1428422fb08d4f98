//! The admin listener (loopback by default): the status page, liveness, readiness, state,
//! transitions, metrics, and the operator's switch.
//!
//! | endpoint            | answer                                                     | token |
//! |---------------------|------------------------------------------------------------|-------|
//! | `GET /`             | the status page (one self-contained HTML document)         | yes   |
//! | `GET /live`         | 200 while the process runs                                 | no    |
//! | `GET /ready`        | 200 when the backend is up, 503 otherwise (JSON state)     | no    |
//! | `GET /state`        | 200, JSON: state, cause, reason, since, sessions, connections | yes |
//! | `GET /transitions`  | 200, JSON: the last `?limit=N` (50) transitions            | yes   |
//! | `GET /metrics`      | Prometheus text format                                     | no    |
//! | `POST /disable`     | backend disabled by the operator: sessions closed with 1012 | yes   |
//! | `POST /enable`      | back to following health                                   | yes   |
//!
//! With `--admin-token`, the endpoints marked "token" want `Authorization: Bearer <token>`
//! (401 without, 403 with a wrong one; compared in constant time, never logged); the page
//! also takes `?token=` (for a bookmark or a script), and without a credential answers
//! with a small form that asks for the token and keeps it in the tab's `sessionStorage`.
//! `/live` and `/ready` stay open for probes, and `/ready` then tells only up or down.
//! `/metrics` stays open too: Prometheus scrapes it, and it holds counts and states, no
//! reasons, ids or tokens.
//!
//! A `POST` that a browser sends from another origin (its `Origin` is not this listener)
//! is refused: without a token, any web page could otherwise make the operator's browser
//! disable the backend.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::state::conns::ADMIN_MAX_CONNECTIONS;
use crate::state::{history, Health, Lane, State};

type Resp = Response<Full<Bytes>>;

/// The status page: one document, no external assets, no build step.
const PAGE: &str = include_str!("page.html");
/// What `GET /` answers without a credential when a token is set: a form that asks for it.
const LOGIN: &str = include_str!("login.html");
/// Transitions `/transitions` gives without `?limit=`.
const DEFAULT_TRANSITIONS: usize = 50;

/// How long an admin connection may take to send its request.
const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve the admin listener until shutdown.
///
/// It has its own budget ([`ADMIN_MAX_CONNECTIONS`], inside the descriptors the client
/// cap leaves free), one request per connection and a short request deadline, so `/live`
/// keeps answering while the client port is flooded.
pub async fn serve(state: Arc<State>, listener: TcpListener) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, _) = tokio::select! {
            _ = state.drain.hard_stopped() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if open.fetch_add(1, Ordering::Relaxed) >= ADMIN_MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        let s = state.clone();
        let open = open.clone();
        state.drain.spawn_background(async move {
            let svc_state = s.clone();
            let svc = hyper::service::service_fn(move |req| {
                let st = svc_state.clone();
                async move { Ok::<_, Infallible>(route(&st, req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_REQUEST_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = tokio::time::sleep(ADMIN_REQUEST_TIMEOUT * 2) => {}
                _ = s.drain.hard_stopped() => {}
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// One lane's state, as `/state` shows it.
fn lane_json(health: &Health, sessions: [usize; 3]) -> serde_json::Value {
    let since = health
        .since
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let [api, event, universal] = sessions;
    serde_json::json!({
        "state": if health.up { "up" } else { "down" },
        "cause": health.cause.as_str(),
        "reason": health.reason,
        "since": since,
        "for_seconds": health.since_instant.elapsed().as_secs_f64(),
        "transitions": health.generation,
        "sessions": {"total": api + event + universal, "api": api, "event": event, "universal": universal},
    })
}

/// The JSON `/state` (and `/ready`, `/enable`, `/disable`) answers with: the summary
/// (the first configured lane that is down, else the first) at the top, every configured
/// lane under `lanes`.
pub fn state_json(state: &State) -> serde_json::Value {
    let snap = state.snapshot();
    let (_, summary) = snap.summary();
    let backend = state.backend();
    let mut lanes = serde_json::Map::new();
    for lane in snap.configured() {
        let mut v = lane_json(snap.lane(lane), state.sessions.open_by_role(lane));
        if let Some(detail) = state.lane_detail(lane) {
            v["detail"] = detail;
        }
        lanes.insert(lane.as_str().to_string(), v);
    }
    if let Some(reverse) = lanes.get_mut(Lane::Reverse.as_str()) {
        reverse["backends"] = reverse_backends_json(state);
    }
    let total = state.sessions.total();
    let mut v = lane_json(summary, [0; 3]);
    let [api, event, universal] = state.sessions.open_by_role(Lane::Forward);
    v["sessions"] =
        serde_json::json!({"total": total, "api": api, "event": event, "universal": universal});
    v["upstream"] = serde_json::json!(snap.settings.upstream.as_ref().map(|u| u.to_string()));
    v["upstream_http"] =
        serde_json::json!(snap.settings.upstream_http.as_ref().map(|u| u.to_string()));
    v["backend"] = serde_json::json!({
        "self_id": backend.self_id,
        "heartbeat_interval_ms": backend.heartbeat_interval_ms,
        "status": backend.status.as_deref().and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()),
        "last_kick": backend.last_kick.as_ref().map(|k| serde_json::json!({
            "tag": k.tag,
            "message": k.message,
            "time": k.at.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
        })),
    });
    v["lanes"] = serde_json::Value::Object(lanes);
    let limits = state.conns.limits(&snap.settings);
    v["connections"] = serde_json::json!({
        "open": state.conns.open(),
        "max": limits.max,
        "max_per_ip": limits.per_ip,
        "fd_limit": state.conns.fd_limit(),
    });
    v
}

/// The reverse WebSocket backends connected now: who, since when, account state, bots.
fn reverse_backends_json(state: &State) -> serde_json::Value {
    let list: Vec<serde_json::Value> = state
        .backends
        .list()
        .into_iter()
        .map(|b| {
            serde_json::json!({
                "self_id": b.self_id.as_deref().map(|s| s.parse::<u64>().map(serde_json::Value::from).unwrap_or_else(|_| s.into())),
                "role": b.role.as_str(),
                "peer": b.peer.to_string(),
                "since": b.since.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
                "for_seconds": b.for_seconds,
                "online": b.online,
                "bots": {"connected": b.bots_connected, "configured": b.bots_configured},
            })
        })
        .collect();
    serde_json::Value::Array(list)
}

/// `/metrics`, with how long each configured lane's state has lasted.
fn metrics_text(state: &State) -> String {
    let snap = state.snapshot();
    let lasted: Vec<_> = snap
        .configured()
        .into_iter()
        .map(|l| (l.as_str(), snap.lane(l).since_instant.elapsed()))
        .collect();
    state.metrics.render(&lasted)
}

/// The last `limit` transitions, oldest first; each also says how long the state it
/// entered lasted (or has lasted so far: `ongoing`).
pub fn transitions_json(state: &State, limit: usize) -> serde_json::Value {
    let records = state.history.latest(limit.min(history::CAPACITY));
    let items: Vec<serde_json::Value> = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let next = records[i + 1..].iter().find(|n| n.lane == r.lane);
            let mut v = r.to_json();
            let (lasted, ongoing) = match next {
                Some(n) => (n.previous_for.as_secs_f64(), false),
                None => (r.at.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0), true),
            };
            v["lasted_seconds"] = serde_json::json!(lasted);
            v["ongoing"] = serde_json::json!(ongoing);
            v
        })
        .collect();
    serde_json::json!({
        "last_seq": state.history.last_seq(),
        "capacity": history::CAPACITY,
        "transitions": items,
    })
}

/// Whether the request may see protected endpoints, and why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Granted,
    /// No credential presented (401).
    Missing,
    /// A credential that does not match (403).
    Wrong,
}

/// `Authorization: Bearer <t>`, or (for the page) `?token=<t>`, against `--admin-token`.
fn access(state: &State, req: &Request<Incoming>, query_allowed: bool) -> Access {
    let settings = state.settings();
    let Some(token) = &settings.admin_token else {
        return Access::Granted;
    };
    let from_header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().as_bytes().to_vec())
        });
    let from_query = || {
        let q = req.uri().query()?;
        q.split('&').find_map(|kv| {
            let v = kv.strip_prefix("token=")?;
            Some(percent_encoding::percent_decode_str(v).collect::<Vec<u8>>())
        })
    };
    let presented = from_header.or_else(|| query_allowed.then(from_query).flatten());
    match presented {
        None => Access::Missing,
        Some(p) if token.matches(&p) => Access::Granted,
        Some(_) => Access::Wrong,
    }
}

/// A browser's cross-origin request: its `Origin` names another host than the one asked.
fn cross_origin(req: &Request<Incoming>) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return false;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, h)| h.trim_end_matches('/'));
    origin_host.is_none() || origin_host != host
}

fn query_limit(req: &Request<Incoming>) -> usize {
    req.uri()
        .query()
        .and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("limit="))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(DEFAULT_TRANSITIONS)
}

fn refusal(access: Access, html: bool) -> Resp {
    let status = if access == Access::Missing {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::FORBIDDEN
    };
    let mut r = if html {
        respond(status, "text/html; charset=utf-8", LOGIN.to_string())
    } else {
        let error = if access == Access::Missing {
            "admin token required: Authorization: Bearer <token>"
        } else {
            "wrong admin token"
        };
        respond(
            status,
            "application/json",
            format!("{}\n", serde_json::json!({ "error": error })),
        )
    };
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"lifeguard admin\""),
    );
    r
}

const ENDPOINTS: [&str; 8] = [
    "GET /",
    "GET /live",
    "GET /ready",
    "GET /state",
    "GET /transitions",
    "GET /metrics",
    "POST /disable",
    "POST /enable",
];

/// One of the listener's paths (the page also answers as `/index.html`).
fn known(path: &str) -> bool {
    path == "/index.html"
        || ENDPOINTS
            .iter()
            .any(|e| e.split_once(' ').map(|(_, p)| p) == Some(path))
}

fn route(state: &State, req: Request<Incoming>) -> Resp {
    let json = |status, v: serde_json::Value| respond(status, "application/json", format!("{v}\n"));
    let path = req.uri().path();
    let protected = !matches!(path, "/live" | "/ready" | "/metrics");
    let is_page = matches!(path, "/" | "/index.html");
    let granted = access(state, &req, is_page);
    if protected && granted != Access::Granted && known(path) {
        if req.method() == Method::POST {
            tracing::warn!(path, "admin: refused a request without a valid admin token");
        }
        return refusal(granted, is_page);
    }
    match (req.method(), path) {
        (&Method::GET, "/" | "/index.html") => {
            let mut r = respond(StatusCode::OK, "text/html; charset=utf-8", PAGE.to_string());
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        // Browsers ask for it; there is none.
        (&Method::GET, "/favicon.ico") => {
            respond(StatusCode::NO_CONTENT, "image/x-icon", String::new())
        }
        (&Method::GET, "/live") => json(StatusCode::OK, serde_json::json!({"status": "live"})),
        (&Method::GET, "/ready") => {
            let ready = state.snapshot().ready();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            if granted == Access::Granted {
                json(status, state_json(state))
            } else {
                // Open for probes, but the details are the admin's.
                json(
                    status,
                    serde_json::json!({"state": if ready { "up" } else { "down" }}),
                )
            }
        }
        (&Method::GET, "/state") => json(StatusCode::OK, state_json(state)),
        (&Method::GET, "/transitions") => {
            json(StatusCode::OK, transitions_json(state, query_limit(&req)))
        }
        (&Method::GET, "/metrics") => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics_text(state),
        ),
        (&Method::POST, "/disable" | "/enable") if cross_origin(&req) => {
            tracing::warn!(path, "admin: refused a cross-origin request");
            json(
                StatusCode::FORBIDDEN,
                serde_json::json!({"error": "cross-origin request refused"}),
            )
        }
        (&Method::POST, "/disable") => {
            tracing::info!("admin: disable requested");
            state.set_admin_enabled(false);
            json(StatusCode::OK, state_json(state))
        }
        (&Method::POST, "/enable") => {
            tracing::info!("admin: enable requested");
            state.set_admin_enabled(true);
            json(StatusCode::OK, state_json(state))
        }
        (_, p) if known(p) => json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "method not allowed"}),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found", "endpoints": ENDPOINTS}),
        ),
    }
}
