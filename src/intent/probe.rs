//! What lifeguard finds out by asking the backend itself, written to the state:
//!
//! - the active prober: a WebSocket handshake on the backend's `/api` every
//!   `probe_interval` (sooner when a session's backend socket failed), counted against
//!   `fall`/`rise`;
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

/// Probe until the hard stop.
pub async fn run_prober(state: Arc<State>) {
    let mut last = Instant::now() - Duration::from_secs(3600);
    loop {
        let interval = state.settings().probe_interval;
        let wait = interval.saturating_sub(last.elapsed());
        tokio::select! {
            _ = state.drain.hard_stopped() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = state.probe_kicked() => {
                tokio::select! {
                    _ = state.drain.hard_stopped() => return,
                    _ = tokio::time::sleep(MIN_PROBE_GAP.saturating_sub(last.elapsed())) => {}
                }
            }
        }
        last = Instant::now();
        let (epoch, s) = state.probe_target(ProbeKind::Ws);
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
        state.metrics.probe_done(last.elapsed(), result.is_ok());
        if let Err(e) = &result {
            tracing::debug!(error = %e, "probe failed");
        }
        state.observe_probe(ProbeKind::Ws, epoch, result);
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
