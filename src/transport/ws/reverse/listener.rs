//! Where backends dial in (`--reverse-listen`). Each handshake is answered only once a bot
//! has accepted lifeguard's own dial for it: authentication (401/403 before the upgrade),
//! the reverse lane's state (503 while the operator has it off), a previous connection for
//! the same self id fully closed, the bots dialled; then 101, or 502/503 well within the
//! backend's 2 s handshake timeout, so that its own redial timer does the retrying and no
//! bot ever sees accept-then-close.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderName, USER_AGENT};
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use super::bots::{self, BotWs, Hello};
use super::session::{close_msg, DialFuture, Session, Setup};
use crate::proto::auth;
use crate::proto::dial::ConnectError;
use crate::proto::onebot::Role;
use crate::state::{Lane, State};
use crate::transport::accept::Acceptor;
use crate::transport::ws::handshake::{self, json, unavailable, Resp};

/// How long a backend may take to send its handshake request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The whole handshake, from the request to the 101 or the refusal: well within NapCat's
/// 2000 ms handshake timeout (which also covers its TCP connect).
pub const HANDSHAKE_BUDGET: Duration = Duration::from_millis(1500);
/// Largest message a backend may send (it is trusted with sizes, within reason).
const BACKEND_MAX_MESSAGE: usize = 256 * 1024 * 1024;
/// Once one bot has accepted, how long the handshake waits for the others.
const LATE_BOT_GRACE: Duration = Duration::from_millis(200);

/// Accept backends until the drain stops accepting.
pub async fn serve(state: Arc<State>, listener: TcpListener) {
    let mut backends = Acceptor::backends(listener, "reverse");
    while let Some((stream, peer)) = backends.next(&state).await {
        let conn_state = state.clone();
        state.drain.spawn_session(async move {
            let svc_state = conn_state.clone();
            let svc = hyper::service::service_fn(move |req| answer(svc_state.clone(), peer, req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "reverse handshake connection ended with an error");
                    }
                }
                _ = conn_state.drain.accepting_stopped() => {}
            }
        });
    }
}

async fn answer(
    state: Arc<State>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Resp, Infallible> {
    let resp = handshake(&state, peer, &mut req).await;
    state
        .metrics
        .handshake(Lane::Reverse.as_str(), resp.status().as_u16());
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        tracing::info!(
            %peer,
            path = req.uri().path(),
            status = resp.status().as_u16(),
            self_id = header(&req, "x-self-id").unwrap_or_default(),
            "reverse handshake refused"
        );
    }
    Ok(resp)
}

fn header<B>(req: &Request<B>, name: &'static str) -> Option<String> {
    req.headers()
        .get(HeaderName::from_static(name))
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The role a backend connection has (`X-Client-Role`; the spec's spellings, any case).
fn role_of(header: Option<&str>) -> Role {
    match header.map(|h| h.to_ascii_lowercase()) {
        Some(h) if h == "api" => Role::Api,
        Some(h) if h == "event" => Role::Event,
        _ => Role::Universal,
    }
}

async fn handshake(state: &Arc<State>, peer: SocketAddr, req: &mut Request<Incoming>) -> Resp {
    let deadline = tokio::time::Instant::now() + HANDSHAKE_BUDGET;
    let key = match handshake::upgrade_key(req) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let snap = state.snapshot();
    let settings = snap.settings.clone();

    // The backend authenticates like a forward client; its credential goes no further.
    let presented = auth::presented_token(req.headers(), req.uri().query());
    if let Err(status) = auth::authorized(settings.access_token.as_ref(), presented.as_deref()) {
        return handshake::auth_refused(status);
    }
    let health = snap.lane(Lane::Reverse);
    if !health.up {
        return unavailable(health.cause.as_str(), &health.reason, 5);
    }
    if settings.reverse_url.is_empty() {
        return unavailable("config", "no bot URL (--reverse-url) is configured", 30);
    }

    let path = req.uri().path().to_string();
    let query: Vec<&str> = req
        .uri()
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|kv| !kv.is_empty() && !kv.starts_with("access_token="))
        .collect();
    let hello = Hello {
        self_id: header(req, "x-self-id"),
        role_header: header(req, "x-client-role"),
        user_agent: req
            .headers()
            .get(USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        path_and_query: if query.is_empty() {
            path.clone()
        } else {
            format!("{path}?{}", query.join("&"))
        },
    };
    let role = role_of(hello.role_header.as_deref());

    // One connection per (self id, role): a previous one is closed, bots included, before
    // any bot is dialled for this one.
    let (registration, previous) = state.backends.claim(hello.self_id.as_deref(), role, peer);
    if let Some(prev) = previous {
        tracing::info!(
            %peer,
            previous = %prev.peer(),
            self_id = hello.self_id.as_deref().unwrap_or(""),
            role = role.as_str(),
            "a new reverse connection replaces the previous one for the same self id"
        );
        if tokio::time::timeout_at(deadline, prev.stop_and_wait())
            .await
            .is_err()
        {
            return unavailable(
                "replacing",
                "the previous connection for this self id is still closing its bots",
                1,
            );
        }
    }

    // Every bot, at once, within what is left of the budget. Once one has accepted, the
    // others get a short grace; those still dialling then go on in the session and join
    // late (they get the backend's `connect` first).
    let urls: Vec<_> = settings.reverse_url.iter().cloned().map(Arc::new).collect();
    let budget = deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .min(settings.connect_timeout);
    let mut dials: Vec<Option<DialFuture>> = urls
        .iter()
        .map(|url| {
            let (url, hello) = (url.clone(), hello.clone());
            let token = settings.reverse_token.clone();
            let max = settings.max_message_size;
            Some(Box::pin(
                async move { bots::dial(&url, &hello, token.as_ref(), budget, max).await },
            ) as DialFuture)
        })
        .collect();
    let mut bots: Vec<(usize, BotWs)> = Vec::new();
    let mut failures = Vec::new();
    let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let collected = std::future::poll_fn(|cx| {
        use std::task::Poll;
        for (slot, d) in dials.iter_mut().enumerate() {
            if let Some(f) = d {
                if let Poll::Ready(r) = f.as_mut().poll(cx) {
                    *d = None;
                    match r {
                        Ok(ws) => bots.push((slot, ws)),
                        Err(e) => failures.push((slot, e)),
                    }
                }
            }
        }
        if dials.iter().all(Option::is_none) {
            return Poll::Ready(());
        }
        if !bots.is_empty() {
            let g = grace.get_or_insert_with(|| Box::pin(tokio::time::sleep(LATE_BOT_GRACE)));
            if g.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    });
    tokio::select! {
        _ = collected => {}
        _ = registration.replaced() => {
            return unavailable("replaced", "a newer connection for this self id arrived meanwhile", 1);
        }
    }
    let pending: Vec<(usize, DialFuture)> = dials
        .into_iter()
        .enumerate()
        .filter_map(|(slot, d)| d.map(|d| (slot, d)))
        .collect();
    for (slot, e) in &failures {
        tracing::warn!(
            %peer,
            bot = %urls[*slot],
            self_id = hello.self_id.as_deref().unwrap_or(""),
            error = %e,
            "bot refused or unreachable"
        );
    }
    if bots.is_empty() {
        let reason = failures
            .iter()
            .map(|(slot, e)| format!("bot {}: {e}", urls[*slot]))
            .collect::<Vec<_>>()
            .join("; ");
        let refused = failures
            .iter()
            .all(|(_, e)| matches!(e, ConnectError::Status(_) | ConnectError::Invalid(_)));
        return if refused {
            json(
                StatusCode::BAD_GATEWAY,
                serde_json::json!({"status": "bad_gateway", "cause": "bot-refused", "reason": reason}),
            )
        } else {
            unavailable("bot-unreachable", &reason, 1)
        };
    }
    // The operator may have switched the lane off, or a newer connection arrived, while
    // the bots were dialled: they are closed at once then, without a session.
    let health = state.snapshot().lane(Lane::Reverse).clone();
    if !health.up || registration.is_replaced() {
        let (cause, reason) = if registration.is_replaced() {
            (
                "replaced",
                "a newer connection for this self id arrived meanwhile".to_string(),
            )
        } else {
            (health.cause.as_str(), health.reason.clone())
        };
        close_unused(bots, reason.clone()).await;
        return unavailable(cause, &reason, 1);
    }

    let on_upgrade = hyper::upgrade::on(req);
    let task_state = state.clone();
    let credential = presented;
    state.drain.spawn_session(async move {
        let upgraded = tokio::select! {
            u = on_upgrade => u,
            _ = task_state.drain.hard_stopped() => return,
        };
        let parts = match upgraded.map(|u| u.downcast::<TokioIo<TcpStream>>()) {
            Ok(Ok(parts)) => parts,
            Ok(Err(_)) => {
                tracing::error!(%peer, "upgraded reverse connection is not a TCP stream");
                return;
            }
            Err(e) => {
                tracing::info!(%peer, error = %e, "backend left during the upgrade");
                close_unused(bots, "the backend left during its handshake".into()).await;
                return;
            }
        };
        let stream = parts.io.into_inner();
        let leftover = parts.read_buf.to_vec();
        drop(parts.read_buf);
        let config = WebSocketConfig::default()
            .max_message_size(Some(BACKEND_MAX_MESSAGE))
            .max_frame_size(Some(BACKEND_MAX_MESSAGE))
            .max_write_buffer_size(16 * 1024 * 1024);
        let backend =
            WebSocketStream::from_partially_read(stream, leftover, WsRole::Server, Some(config))
                .await;
        let session = Session::new(Setup {
            state: task_state.clone(),
            backend,
            peer,
            hello,
            role,
            credential,
            registration,
            urls,
            bots,
            pending,
        });
        session.run().await;
    });
    handshake::switching(&key)
}

/// Bots dialled for a handshake that did not complete: a Close, and nothing else (they
/// never saw the backend's `connect`).
async fn close_unused(bots: Vec<(usize, BotWs)>, reason: String) {
    use futures_util::SinkExt;
    let closes = bots.into_iter().map(|(_, mut ws)| {
        let close = close_msg(crate::proto::ws::code::TRY_AGAIN_LATER, &reason);
        async move {
            let _ = tokio::time::timeout(Duration::from_millis(500), ws.send(close)).await;
        }
    });
    futures_util::future::join_all(closes).await;
}
