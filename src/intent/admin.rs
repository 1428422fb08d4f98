//! The admin listener (loopback by default): liveness, readiness, state, metrics, and
//! the operator's switch.
//!
//! | endpoint        | answer                                                     |
//! |-----------------|------------------------------------------------------------|
//! | `GET /live`     | 200 while the process runs                                 |
//! | `GET /ready`    | 200 when the backend is up, 503 otherwise (JSON state)     |
//! | `GET /state`    | 200, JSON: state, cause, reason, since, open sessions, connections |
//! | `GET /metrics`  | Prometheus text format                                     |
//! | `POST /disable` | backend disabled by the operator: sessions closed with 1012 |
//! | `POST /enable`  | back to following health                                   |

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
use crate::state::{Health, Lane, State};

type Resp = Response<Full<Bytes>>;

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
        lanes.insert(
            lane.as_str().to_string(),
            lane_json(snap.lane(lane), state.sessions.open_by_role(lane)),
        );
    }
    let total = state.sessions.total();
    let mut v = lane_json(summary, [0; 3]);
    let [api, event, universal] = state.sessions.open_by_role(Lane::Forward);
    v["sessions"] =
        serde_json::json!({"total": total, "api": api, "event": event, "universal": universal});
    v["upstream"] = serde_json::json!(snap.settings.upstream.as_ref().map(|u| u.to_string()));
    v["backend"] = serde_json::json!({
        "self_id": backend.self_id,
        "heartbeat_interval_ms": backend.heartbeat_interval_ms,
        "status": backend.status.as_deref().and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()),
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

fn route(state: &State, req: Request<Incoming>) -> Resp {
    let json = |status, v: serde_json::Value| respond(status, "application/json", format!("{v}\n"));
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => json(StatusCode::OK, serde_json::json!({"status": "live"})),
        (&Method::GET, "/ready") => {
            let status = if state.snapshot().ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(status, state_json(state))
        }
        (&Method::GET, "/state") => json(StatusCode::OK, state_json(state)),
        (&Method::GET, "/metrics") => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics_text(state),
        ),
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
        (_, "/live" | "/ready" | "/state" | "/metrics" | "/disable" | "/enable") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "method not allowed"}),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found", "endpoints": ["GET /live", "GET /ready", "GET /state", "GET /metrics", "POST /disable", "POST /enable"]}),
        ),
    }
}
