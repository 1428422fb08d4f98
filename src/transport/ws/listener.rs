//! The forward WebSocket listener: each client's handshake is answered before any
//! upgrade (routing, auth, the lane's state, the backend's own handshake), then one
//! relay task per session. Requests that are not upgrades go to the HTTP API proxy when
//! `--upstream-http` is set (426 otherwise).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use super::forward::Session;
use super::handshake::{self, json, unavailable, Resp};
use crate::proto::auth;
use crate::proto::dial::{self, ConnectError};
use crate::proto::onebot::Role;
use crate::state::{Lane, State};
use crate::transport::http::api::ApiProxy;
use crate::transport::policy::SessionInfo;

/// How long a client may take to send its handshake request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Accept clients until the drain stops accepting.
pub async fn serve(state: Arc<State>, listener: TcpListener, api: Arc<ApiProxy>) {
    loop {
        let accepted = tokio::select! {
            _ = state.drain.accepting_stopped() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off, never spin or die.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn_state = state.clone();
        let api = api.clone();
        state.drain.spawn_session(async move {
            let svc_state = conn_state.clone();
            let svc = hyper::service::service_fn(move |req| {
                answer(svc_state.clone(), api.clone(), peer, req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "handshake connection ended with an error");
                    }
                    return;
                }
                _ = conn_state.drain.accepting_stopped() => {}
            }
            // A request in flight (an API call, a handshake) still gets its answer.
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = conn_state.drain.hard_stopped() => {}
            }
        });
    }
}

/// Answer one HTTP request on the client port: a WebSocket handshake or an error.
async fn answer(
    state: Arc<State>,
    api: Arc<ApiProxy>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Resp, Infallible> {
    if !handshake::is_upgrade(&req) && state.snapshot().settings.upstream_http.is_some() {
        return Ok(api.answer(&state, peer, req).await);
    }
    let resp = handshake(&state, peer, &mut req).await;
    state
        .metrics
        .handshake(Lane::Forward.as_str(), resp.status().as_u16());
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        tracing::debug!(%peer, path = req.uri().path(), status = resp.status().as_u16(), "handshake refused");
    }
    Ok(resp)
}

async fn handshake(state: &Arc<State>, peer: SocketAddr, req: &mut Request<Incoming>) -> Resp {
    let key = match handshake::upgrade_key(req) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let snap = state.snapshot();
    let settings = &snap.settings;

    // Auth before anything else; the credential never reaches the logs or the backend.
    let presented = auth::presented_token(req.headers(), req.uri().query());
    if let Err(status) = auth::authorized(settings.access_token.as_ref(), presented.as_deref()) {
        return handshake::auth_refused(status);
    }

    // Refuse while the backend is down: never accept-then-close.
    let health = snap.lane(Lane::Forward);
    if !health.up {
        let retry = settings.probe_interval.as_secs().max(1) * settings.rise as u64;
        return unavailable(health.cause.as_str(), &health.reason, retry.clamp(1, 30));
    }
    let Some(upstream) = &settings.upstream else {
        return unavailable("config", "no forward WebSocket upstream is configured", 30);
    };

    // One backend connection per client, opened before the client's upgrade is answered.
    let path = req.uri().path().to_string();
    let role = Role::of_path(&path);
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    let connected = match dial::connect(
        upstream,
        &path_and_query,
        settings.upstream_token.as_ref(),
        settings.connect_timeout,
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            state.kick_probe();
            tracing::warn!(%peer, path = %path, error = %e, "backend refused a new session");
            return match e {
                ConnectError::Timeout => unavailable("upstream-timeout", &e.to_string(), 1),
                _ => json(
                    StatusCode::BAD_GATEWAY,
                    serde_json::json!({"status": "bad_gateway", "cause": "upstream-refused", "reason": e.to_string()}),
                ),
            };
        }
    };
    // The backend could have gone down while we connected.
    let health = state.snapshot().lane(Lane::Forward).clone();
    if !health.up {
        return unavailable(health.cause.as_str(), &health.reason, 1);
    }

    let guard = state.sessions.open(Lane::Forward, role);
    let info = SessionInfo {
        id: guard.id,
        lane: Lane::Forward,
        peer,
        path,
        role,
        credential: presented,
        self_id: None,
    };
    let on_upgrade = hyper::upgrade::on(req);
    let task_state = state.clone();
    state.drain.spawn_session(async move {
        let id = info.id;
        let upgraded = tokio::select! {
            u = on_upgrade => u,
            _ = task_state.drain.hard_stopped() => return,
        };
        let parts = match upgraded.map(|u| u.downcast::<TokioIo<TcpStream>>()) {
            Ok(Ok(parts)) => parts,
            Ok(Err(_)) => {
                tracing::error!(session = id, "upgraded connection is not a TCP stream");
                return;
            }
            Err(e) => {
                tracing::debug!(session = id, error = %e, "client left during the upgrade");
                return;
            }
        };
        let client = parts.io.into_inner();
        // Copy what hyper read past the request (normally nothing): `read_buf` may be a
        // view into hyper's 8 KiB read buffer, which must not live as long as the session.
        let client_leftover = parts.read_buf.to_vec();
        drop(parts.read_buf);
        tracing::debug!(session = id, peer = %info.peer, path = %info.path, "session opened");
        let session = Session::new(task_state.clone(), info, guard, client, connected.stream);
        session.run(client_leftover, connected.leftover).await;
    });
    handshake::switching(&key)
}
