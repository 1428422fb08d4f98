//! The forward WebSocket listener: each client's handshake is answered before any
//! upgrade (routing, auth, the lane's state, the backend's own handshake), then one
//! relay task per session.

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
use crate::state::{ConnPermit, Lane, Refusal, State};
use crate::transport::accept::Acceptor;
use crate::transport::http::api::ApiProxy;
use crate::transport::policy::SessionInfo;

/// Largest handshake request (hyper's minimum is 8 KiB): bounds what a connection that
/// has not authenticated can make lifeguard buffer.
const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// How long a refused connection may take to read its 503.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// Accept clients until the drain stops accepting. Requests that are not WebSocket
/// upgrades go to the HTTP API proxy when `--upstream-http` is set.
pub async fn serve(state: Arc<State>, listener: TcpListener, api: Arc<ApiProxy>) {
    let mut clients = Acceptor::clients(listener, "clients");
    while let Some((stream, peer)) = clients.next(&state).await {
        let snap = state.snapshot();
        let permit = match state.conns.admit(peer.ip(), &snap.settings) {
            Ok(p) => Arc::new(p),
            Err(refusal) => {
                refuse(&state, stream, refusal);
                continue;
            }
        };
        let conn_state = state.clone();
        let api = api.clone();
        let budget = snap.settings.handshake_timeout;
        // Everything up to the session: the request, the backend's handshake, the answer.
        // HTTP API clients keep their connection for call after call: no such bound then
        // (each request still has the header deadline and the API call its timeout).
        let lifetime = match snap.settings.upstream_http {
            None => budget + snap.settings.connect_timeout + Duration::from_secs(1),
            Some(_) => Duration::from_secs(365 * 86400),
        };
        state.drain.spawn_session(async move {
            let started = tokio::time::Instant::now();
            // Until its request head is complete, a connection costs no buffer of its own:
            // hyper allocates 16 KiB (read and write buffers) as soon as it runs.
            let complete = tokio::select! {
                r = tokio::time::timeout(budget, request_head_arrived(&stream)) => matches!(r, Ok(true)),
                _ = conn_state.drain.accepting_stopped() => false,
            };
            if !complete {
                tracing::debug!(%peer, "client sent no complete request in time");
                return;
            }
            let svc_state = conn_state.clone();
            let svc = hyper::service::service_fn(move |req| {
                answer(svc_state.clone(), api.clone(), peer, permit.clone(), req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(budget.saturating_sub(started.elapsed()).max(Duration::from_millis(1)))
                .max_buf_size(MAX_REQUEST_BYTES)
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
                _ = tokio::time::sleep_until(started + lifetime) => {
                    tracing::debug!(%peer, "handshake took too long");
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

thread_local! {
    /// Where waiting connections peek at their request head (one per worker thread).
    static PEEK_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; MAX_REQUEST_BYTES].into_boxed_slice());
}

/// How often a connection's partial request is looked at before hyper takes over anyway
/// (a client dribbling its head a byte at a time costs a peek per byte).
const MAX_PEEKS: usize = 16;

/// Wait until `stream` holds a whole request head (or enough bytes that hyper should
/// judge it, or too many peeks): true then; false when the client hung up or failed. The
/// bytes stay in the kernel's buffer, peeked into a per-thread buffer.
async fn request_head_arrived(stream: &TcpStream) -> bool {
    use std::task::Poll;
    for _ in 0..MAX_PEEKS {
        let peeked = std::future::poll_fn(|cx| {
            PEEK_BUF.with(|cell| {
                let mut buf = cell.borrow_mut();
                let mut rb = tokio::io::ReadBuf::new(&mut buf[..]);
                match stream.poll_peek(cx, &mut rb) {
                    Poll::Ready(Ok(0)) => Poll::Ready(None),
                    Poll::Ready(Ok(n)) => {
                        let head = &rb.filled()[..n];
                        let whole = n == MAX_REQUEST_BYTES
                            || memchr::memmem::find(head, b"\r\n\r\n").is_some();
                        Poll::Ready(Some(whole))
                    }
                    Poll::Ready(Err(_)) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            })
        })
        .await;
        match peeked {
            None => return false,
            Some(true) => return true,
            Some(false) => {
                // Part of a head: wait for the next bytes, not for the ones already here
                // (clearing the readiness makes `readable` wait for the next edge).
                let _ = stream.try_io(tokio::io::Interest::READABLE, || {
                    Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                });
                if stream.readable().await.is_err() {
                    return false;
                }
            }
        }
    }
    true
}

/// 503 before any handshake: the cap (or this address's share) is full. Written at once;
/// the socket stays a moment so the answer is read rather than reset, unless too many
/// refusals are already doing that.
fn refuse(state: &Arc<State>, stream: TcpStream, refusal: Refusal) {
    let body = serde_json::json!({
        "status": "unavailable",
        "cause": refusal.cause(),
        "reason": refusal.reason(),
    })
    .to_string();
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 5\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    if stream.try_write(resp.as_bytes()).is_err() {
        return;
    }
    let Some(slot) = state.conns.refusing() else {
        return;
    };
    state.drain.spawn_session(async move {
        let _slot = slot;
        let mut stream = stream;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 512];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    });
}

/// Answer one HTTP request on the client port: a WebSocket handshake, an HTTP API call,
/// or an error.
async fn answer(
    state: Arc<State>,
    api: Arc<ApiProxy>,
    peer: SocketAddr,
    permit: Arc<ConnPermit>,
    mut req: Request<Incoming>,
) -> Result<Resp, Infallible> {
    if !handshake::is_upgrade(&req) && state.snapshot().settings.upstream_http.is_some() {
        return Ok(api.answer(&state, peer, req).await);
    }
    let mut resp = handshake(&state, peer, permit, &mut req).await;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // One request per connection: a refused client does not keep its socket (hyper's
        // own keep-alive switch would also mark the 101 `close`).
        resp.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    state
        .metrics
        .handshake(Lane::Forward.as_str(), resp.status().as_u16());
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        tracing::debug!(%peer, path = req.uri().path(), status = resp.status().as_u16(), "handshake refused");
    }
    Ok(resp)
}

async fn handshake(
    state: &Arc<State>,
    peer: SocketAddr,
    permit: Arc<ConnPermit>,
    req: &mut Request<Incoming>,
) -> Resp {
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
        Err(e) if e.is_local() => {
            // Our shortage, not the backend's fault: no probe, no 502.
            state.metrics.connection_refused("fd-exhausted");
            tracing::warn!(%peer, path = %path, error = %e, "cannot open a backend connection (local shortage)");
            return unavailable("capacity", &e.to_string(), 5);
        }
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
        // The connection stays counted until the session is over.
        let _permit = permit;
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
