//! The admin listener (loopback by default): liveness, readiness, state, metrics, and
//! the operator's switch.
//!
//! | endpoint        | answer                                                     |
//! |-----------------|------------------------------------------------------------|
//! | `GET /live`     | 200 while the process runs                                 |
//! | `GET /ready`    | 200 when the backend is up, 503 otherwise (JSON state)     |
//! | `GET /state`    | 200, JSON: state, cause, reason, since, open sessions      |
//! | `GET /metrics`  | Prometheus text format                                     |
//! | `POST /disable` | backend disabled by the operator: sessions closed with 1012 |
//! | `POST /enable`  | back to following health                                   |

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::server::Shared;

type Resp = Response<Full<Bytes>>;

/// Serve the admin listener until shutdown.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shared.hard_stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let s = shared.clone();
        shared.background.spawn(async move {
            let svc_shared = s.clone();
            let svc = hyper::service::service_fn(move |req| {
                let sh = svc_shared.clone();
                async move { Ok::<_, Infallible>(route(&sh, req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = s.hard_stop.cancelled() => {}
            }
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

/// The JSON `/state` (and `/ready`, `/enable`, `/disable`) answers with.
pub fn state_json(shared: &Shared) -> serde_json::Value {
    let snap = shared.gate.snapshot();
    let [api, event, universal] = shared.open_sessions();
    let since = snap
        .since
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let backend = shared.gate.backend();
    let settings = shared.settings.load();
    serde_json::json!({
        "state": if snap.up { "up" } else { "down" },
        "cause": snap.cause.as_str(),
        "reason": snap.reason,
        "since": since,
        "for_seconds": snap.since_instant.elapsed().as_secs_f64(),
        "upstream": settings.upstream.to_string(),
        "transitions": snap.generation,
        "backend": {
            "self_id": backend.self_id,
            "heartbeat_interval_ms": backend.heartbeat_interval_ms,
            "status": backend.status.as_deref().and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()),
        },
        "sessions": {"total": api + event + universal, "api": api, "event": event, "universal": universal},
    })
}

fn route(shared: &Shared, req: Request<Incoming>) -> Resp {
    let json = |status, v: serde_json::Value| respond(status, "application/json", format!("{v}\n"));
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => json(StatusCode::OK, serde_json::json!({"status": "live"})),
        (&Method::GET, "/ready") => {
            let status = if shared.gate.snapshot().up {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(status, state_json(shared))
        }
        (&Method::GET, "/state") => json(StatusCode::OK, state_json(shared)),
        (&Method::GET, "/metrics") => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.render(),
        ),
        (&Method::POST, "/disable") => {
            tracing::info!("admin: disable requested");
            shared.gate.set_admin_enabled(false);
            json(StatusCode::OK, state_json(shared))
        }
        (&Method::POST, "/enable") => {
            tracing::info!("admin: enable requested");
            shared.gate.set_admin_enabled(true);
            json(StatusCode::OK, state_json(shared))
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
