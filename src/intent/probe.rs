//! What lifeguard finds out by asking the backend itself, written to the state:
//!
//! - the active prober: a WebSocket handshake on the backend's `/api` every
//!   `probe_interval` (sooner when a session's backend socket failed), counted against
//!   `fall`/`rise`;
//! - the HTTP prober, beside it when `--upstream-http` is set: `get_status` on the
//!   backend's HTTP API server over a fresh connection (a switched-off NapCat refuses new
//!   ones), whose `data.online` is also the account state, and `get_login_info` while the
//!   bot's self id is unknown (the POST relay's lifecycle events need it);
//! - the login watch: while the backend is down because QQ is logged out, no session is
//!   open to see a heartbeat saying it is back, so `get_status` on `/api` asks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::config::Settings;
use crate::proto::{dial, ws};
use crate::state::{Cause, Lane, ProbeKind, State};

/// Passive failures ask for a probe at once, but never more often than this.
const MIN_PROBE_GAP: Duration = Duration::from_millis(50);

/// Wait for the next probe of `kind`: its interval since the `last` one, or a kick from a
/// passive failure (but never sooner than [`MIN_PROBE_GAP`] after the last). `false` at the
/// hard stop.
async fn next_turn(state: &State, kind: ProbeKind, last: Instant) -> bool {
    let wait = state
        .settings()
        .probe_interval
        .saturating_sub(last.elapsed());
    tokio::select! {
        _ = state.drain.hard_stopped() => return false,
        _ = tokio::time::sleep(wait) => {}
        _ = state.probe_kicked(kind) => {
            tokio::select! {
                _ = state.drain.hard_stopped() => return false,
                _ = tokio::time::sleep(MIN_PROBE_GAP.saturating_sub(last.elapsed())) => {}
            }
        }
    }
    true
}

/// Probe until the hard stop.
pub async fn run_prober(state: Arc<State>) {
    let mut last = Instant::now() - Duration::from_secs(3600);
    while next_turn(&state, ProbeKind::Ws, last).await {
        last = Instant::now();
        let (epoch, s) = state.probe_target(ProbeKind::Ws);
        if s.upstream.is_none() {
            // Reverse WebSocket only: nothing to probe (each backend connection is its own
            // health), until a reload adds an upstream.
            continue;
        }
        let result = tokio::select! {
            _ = state.drain.hard_stopped() => return,
            r = probe_once(&s) => r,
        };
        let result = match result {
            Err(ProbeError::Local(e)) => {
                // Our own shortage says nothing about the backend: not counted.
                state.metrics.probe_skipped("local");
                tracing::warn!(error = %e, "probe could not run (local shortage); not counted against the backend");
                continue;
            }
            Err(ProbeError::Backend(e)) => Err(e),
            Ok(()) => Ok(()),
        };
        state
            .metrics
            .probe_done("ws", last.elapsed(), result.is_ok());
        if let Err(e) = &result {
            tracing::debug!(error = %e, "probe failed");
        }
        state.observe_probe(ProbeKind::Ws, epoch, result);
    }
}

/// Probe the backend's HTTP API server until the hard stop; idle while none is configured.
pub async fn run_http_prober(state: Arc<State>) {
    let mut last = Instant::now() - Duration::from_secs(3600);
    while next_turn(&state, ProbeKind::Http, last).await {
        last = Instant::now();
        let (epoch, s) = state.probe_target(ProbeKind::Http);
        if s.upstream_http.is_none() {
            continue;
        }
        let want_login = state.backend().self_id.is_none();
        let result = tokio::select! {
            _ = state.drain.hard_stopped() => return,
            r = tokio::time::timeout(s.probe_timeout, http_probe_once(&state, &s, want_login)) => {
                r.unwrap_or_else(|_| Err(format!(
                    "the backend's HTTP API did not answer get_status within {} ms",
                    s.probe_timeout.as_millis()
                )))
            }
        };
        state
            .metrics
            .probe_done("http", last.elapsed(), result.is_ok());
        let result = match result {
            Ok(seen) => {
                if let Some(online) = seen.online {
                    state.observe_online(online);
                }
                if seen.self_id.is_some() {
                    state.observe_backend(seen.self_id, None, None);
                }
                Ok(())
            }
            Err(e) => {
                tracing::debug!(error = %e, "HTTP probe failed");
                Err(e)
            }
        };
        state.observe_probe(ProbeKind::Http, epoch, result);
    }
}

/// What one HTTP probe learned besides "it answers".
#[derive(Debug, Default)]
struct HttpSeen {
    online: Option<bool>,
    self_id: Option<u64>,
}

/// `get_status` (and, when asked, `get_login_info`) on a fresh connection.
async fn http_probe_once(
    state: &State,
    s: &Settings,
    want_login: bool,
) -> Result<HttpSeen, String> {
    use hyper_util::rt::TokioIo;
    let Some(url) = &s.upstream_http else {
        return Err("no HTTP upstream configured".into());
    };
    let authority = url.authority();
    let tcp = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| format!("cannot connect to the backend's HTTP API: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP handshake with the backend failed: {e}"))?;
    let limit = s.probe_timeout + Duration::from_secs(1);
    state.drain.spawn_background(async move {
        let _ = tokio::time::timeout(limit, conn).await;
    });
    let status = http_call(&mut sender, s, "get_status").await?;
    let mut seen = HttpSeen {
        online: status.pointer("/data/online").and_then(Value::as_bool),
        self_id: None,
    };
    if want_login {
        // Best effort: the probe is about get_status.
        if let Ok(login) = http_call(&mut sender, s, "get_login_info").await {
            seen.self_id = login.pointer("/data/user_id").and_then(Value::as_u64);
        }
    }
    Ok(seen)
}

/// One OneBot call on the probe's connection: the answer when it says `retcode` 0.
async fn http_call(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    s: &Settings,
    action: &str,
) -> Result<Value, String> {
    use http_body_util::{BodyExt, Empty, Limited};
    let Some(url) = &s.upstream_http else {
        return Err("no HTTP upstream configured".into());
    };
    let mut req = hyper::Request::get(format!("{}/{action}", url.base_path()))
        .header(hyper::header::HOST, url.authority());
    if let Some(t) = &s.upstream_token {
        req = req.header(
            hyper::header::AUTHORIZATION,
            format!("Bearer {}", t.expose()),
        );
    }
    let req = req
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("bad request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("the backend's HTTP API failed: {e}"))?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| format!("the backend's HTTP API failed mid-answer: {e}"))?
        .to_bytes();
    let v: Option<Value> = serde_json::from_slice(&body).ok();
    let message = v
        .as_ref()
        .and_then(|v| v.get("message"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    match (status, v) {
        (401 | 403, _) => Err(format!(
            "the backend's HTTP API refused lifeguard's token (HTTP {status}{})",
            if message.is_empty() {
                String::new()
            } else {
                format!(": {message}")
            }
        )),
        (200, Some(v)) if v.get("retcode").and_then(Value::as_i64) == Some(0) => Ok(v),
        (200, Some(_)) if message == "Server is closed" => {
            Err("the backend's HTTP server is switched off (Server is closed)".into())
        }
        (200, Some(v)) => Err(format!(
            "{action} failed on the backend's HTTP API: retcode {}: {message}",
            v.get("retcode").map(|r| r.to_string()).unwrap_or_default()
        )),
        (200, None) => Err(format!(
            "{action} on the backend's HTTP API: not a JSON answer"
        )),
        (status, _) => Err(format!("{action} on the backend's HTTP API: HTTP {status}")),
    }
}

/// Why a probe did not pass.
#[derive(Debug)]
pub enum ProbeError {
    /// The backend failed it.
    Backend(String),
    /// lifeguard could not even try (out of descriptors, say).
    Local(String),
}

/// One probe: open `/api`, say goodbye properly, report.
pub async fn probe_once(s: &Settings) -> Result<(), ProbeError> {
    let Some(upstream) = &s.upstream else {
        return Err(ProbeError::Backend("no upstream configured".into()));
    };
    let c = dial::connect(upstream, "/api", s.upstream_token.as_ref(), s.probe_timeout)
        .await
        .map_err(|e| match e.is_local() {
            true => ProbeError::Local(e.to_string()),
            false => ProbeError::Backend(e.to_string()),
        })?;
    let mut stream = c.stream;
    let close = ws::close_frame(ws::code::NORMAL, "lifeguard probe", ws::random_mask());
    let _ = tokio::time::timeout(Duration::from_millis(100), stream.write_all(&close)).await;
    let _ = stream.shutdown().await;
    Ok(())
}

/// Ask `get_status` every probe interval while the forward lane is down with cause
/// `offline`; feed the answer to the state like a heartbeat's `online`.
pub async fn watch_login(state: Arc<State>) {
    let mut rx = state.subscribe();
    loop {
        loop {
            if rx.borrow_and_update().lane(Lane::Forward).cause == Cause::Offline {
                break;
            }
            tokio::select! {
                _ = state.drain.hard_stopped() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
        let s = state.settings();
        tokio::select! {
            _ = state.drain.hard_stopped() => return,
            _ = tokio::time::sleep(s.probe_interval) => {}
        }
        if state.snapshot().lane(Lane::Forward).cause != Cause::Offline {
            continue;
        }
        let asked = tokio::select! {
            _ = state.drain.hard_stopped() => return,
            r = tokio::time::timeout(s.probe_timeout + s.connect_timeout, ask_online(&s)) => r,
        };
        match asked {
            Ok(Ok(online)) => {
                if online {
                    tracing::info!("the backend's QQ account is online again (get_status)");
                }
                state.observe_online(online);
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "get_status on the backend failed"),
            Err(_) => tracing::debug!("get_status on the backend timed out"),
        }
    }
}

/// `get_status` on the backend's `/api`: its `data.online`.
async fn ask_online(s: &Settings) -> Result<bool, String> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    let Some(upstream) = &s.upstream else {
        return Err("no upstream configured".into());
    };
    let c = dial::connect(
        upstream,
        "/api",
        s.upstream_token.as_ref(),
        s.connect_timeout,
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut ws = tokio_tungstenite::WebSocketStream::from_partially_read(
        c.stream,
        c.leftover,
        Role::Client,
        None,
    )
    .await;
    let echo = "lifeguard-login-check";
    ws.send(Message::text(format!(
        r#"{{"action":"get_status","params":{{}},"echo":"{echo}"}}"#
    )))
    .await
    .map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(s.probe_timeout, async {
        while let Some(m) = ws.next().await {
            let Message::Text(t) = m.map_err(|e| e.to_string())? else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(&t) else {
                continue;
            };
            if v.get("echo").and_then(Value::as_str) == Some(echo) {
                return v
                    .pointer("/data/online")
                    .and_then(Value::as_bool)
                    .ok_or_else(|| "get_status without data.online".to_string());
            }
        }
        Err("the backend closed the connection".to_string())
    })
    .await
    .map_err(|_| "no get_status reply in time".to_string())?;
    // Say goodbye, but never wait long for the backend's reply.
    let _ = tokio::time::timeout(Duration::from_millis(100), ws.close(None)).await;
    answer
}
