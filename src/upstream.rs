//! The backend: its state (one immutable snapshot in an `ArcSwap`, transitions pushed to
//! sessions through a `watch` channel), the WebSocket handshake lifeguard performs with it,
//! and the active prober.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::{Secret, Settings, UpstreamUrl};
use crate::ws;

/// Why the backend is not serving (or `Healthy` when it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    Healthy,
    /// No probe has succeeded yet since lifeguard started.
    Starting,
    /// `POST /disable` on the admin listener.
    Admin,
    /// `enabled = false` in lifeguard's config file.
    Config,
    /// The backend's own config file says its WebSocket server is off.
    NapcatConfig,
    /// `--fall` consecutive probes failed.
    Unhealthy,
    /// The backend's heartbeat says QQ is logged out.
    Offline,
    /// lifeguard is shutting down.
    Shutdown,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Healthy => "healthy",
            Cause::Starting => "starting",
            Cause::Admin => "admin",
            Cause::Config => "config",
            Cause::NapcatConfig => "napcat-config",
            Cause::Unhealthy => "unhealthy",
            Cause::Offline => "offline",
            Cause::Shutdown => "shutdown",
        }
    }

    /// The Close code sessions get when the backend goes down for this cause.
    pub fn close_code(self) -> u16 {
        match self {
            Cause::Admin | Cause::Config | Cause::NapcatConfig => ws::code::SERVICE_RESTART,
            Cause::Shutdown => ws::code::GOING_AWAY,
            Cause::Healthy | Cause::Starting | Cause::Unhealthy | Cause::Offline => {
                ws::code::TRY_AGAIN_LATER
            }
        }
    }

    /// Planned disables give replies to API calls already forwarded a short grace.
    pub fn planned(self) -> bool {
        matches!(
            self,
            Cause::Admin | Cause::Config | Cause::NapcatConfig | Cause::Shutdown
        )
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One consistent view of the backend's state. Immutable; a change stores a new one.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub up: bool,
    pub cause: Cause,
    /// A human sentence: what happened (goes into Close reasons, 503 bodies, logs).
    pub reason: String,
    pub since: SystemTime,
    pub since_instant: Instant,
    /// Bumped by every change, so sessions can tell one transition from the next.
    pub generation: u64,
}

impl Snapshot {
    /// A state that starts now.
    fn new(up: bool, cause: Cause, reason: String, generation: u64) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            up,
            cause,
            reason,
            since: SystemTime::now(),
            since_instant: Instant::now(),
            generation,
        })
    }
}

/// What the backend last told us about itself (from its own events).
#[derive(Debug, Clone, Default)]
pub struct BackendInfo {
    pub self_id: Option<u64>,
    /// The raw `status` object of the latest heartbeat.
    pub status: Option<String>,
    pub heartbeat_interval_ms: Option<u64>,
}

/// The inputs the state is derived from; changed only under the gate's mutex.
#[derive(Debug, Clone)]
struct Inputs {
    admin_enabled: bool,
    config_enabled: bool,
    napcat_enabled: bool,
    napcat_reason: String,
    online: bool,
    offline_is_down: bool,
    shutting_down: bool,
    probe: ProbeCounter,
}

/// HAProxy-style rise/fall counter.
#[derive(Debug, Clone)]
struct ProbeCounter {
    healthy: bool,
    /// At least one probe has completed.
    started: bool,
    consecutive_ok: u32,
    consecutive_fail: u32,
    last_error: String,
}

/// A change the gate reports to whoever observes transitions (logs, metrics).
pub type TransitionHook = Box<dyn Fn(&Snapshot, &Snapshot) + Send + Sync>;

/// The backend's state: read by every handshake (`snapshot()`), watched by every session.
pub struct Gate {
    snapshot: ArcSwap<Snapshot>,
    tx: watch::Sender<Arc<Snapshot>>,
    inputs: Mutex<Inputs>,
    /// Woken by a passive failure (a session's backend socket died): probe now.
    kick: Notify,
    backend: ArcSwap<BackendInfo>,
    hooks: Mutex<Vec<TransitionHook>>,
}

impl Gate {
    pub fn new(settings: &Settings) -> Gate {
        let inputs = Inputs {
            admin_enabled: true,
            config_enabled: settings.enabled,
            napcat_enabled: true,
            napcat_reason: String::new(),
            online: true,
            offline_is_down: settings.offline_is_down,
            shutting_down: false,
            probe: ProbeCounter {
                healthy: false,
                started: false,
                consecutive_ok: 0,
                consecutive_fail: 0,
                last_error: String::new(),
            },
        };
        let (up, cause, reason) = derive(&inputs);
        let snap = Snapshot::new(up, cause, reason, 0);
        let (tx, _) = watch::channel(snap.clone());
        Gate {
            snapshot: ArcSwap::new(snap),
            tx,
            inputs: Mutex::new(inputs),
            kick: Notify::new(),
            backend: ArcSwap::from_pointee(BackendInfo::default()),
            hooks: Mutex::new(Vec::new()),
        }
    }

    /// The current state: one atomic load.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// A receiver that sees every transition.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Called with (old, new) on every transition.
    pub fn on_transition(&self, hook: TransitionHook) {
        self.hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(hook);
    }

    pub fn backend(&self) -> Arc<BackendInfo> {
        self.backend.load_full()
    }

    fn update(&self, f: impl FnOnce(&mut Inputs)) {
        let mut inputs = self.inputs.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut inputs);
        let (up, cause, reason) = derive(&inputs);
        let old = self.snapshot.load_full();
        if old.up == up && old.cause == cause {
            if old.reason != reason && !up {
                // Same state, better words (e.g. the latest probe error): no transition.
                let snap = Arc::new(Snapshot {
                    reason,
                    ..(*old).clone()
                });
                self.snapshot.store(snap.clone());
                self.tx.send_replace(snap);
            }
            return;
        }
        let snap = Snapshot::new(up, cause, reason, old.generation + 1);
        self.snapshot.store(snap.clone());
        // Hooks first (a mass disable is prepared before any session hears of it).
        for hook in self.hooks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            hook(&old, &snap);
        }
        self.tx.send_replace(snap.clone());
        drop(inputs);
        tracing::info!(
            state = if snap.up { "up" } else { "down" },
            cause = %snap.cause,
            reason = %snap.reason,
            previous = %old.cause,
            previous_for_ms = old.since_instant.elapsed().as_millis() as u64,
            "upstream state changed"
        );
    }

    /// `POST /disable` / `POST /enable`.
    pub fn set_admin_enabled(&self, enabled: bool) {
        self.update(|i| i.admin_enabled = enabled);
    }

    /// `enabled` in lifeguard's config file.
    pub fn set_config_enabled(&self, enabled: bool) {
        self.update(|i| i.config_enabled = enabled);
    }

    /// The backend's own config file (`enable` of its WebSocket server).
    pub fn set_napcat_enabled(&self, enabled: bool, reason: String) {
        self.update(|i| {
            i.napcat_enabled = enabled;
            i.napcat_reason = reason;
        });
    }

    pub fn set_offline_is_down(&self, on: bool) {
        self.update(|i| i.offline_is_down = on);
    }

    /// SIGTERM/SIGINT: down for good, with cause `shutdown`.
    pub fn set_shutting_down(&self) {
        self.update(|i| i.shutting_down = true);
    }

    /// A probe's outcome, counted against `fall`/`rise`.
    pub fn observe_probe(&self, result: Result<(), String>, fall: u32, rise: u32) {
        self.update(|i| {
            let p = &mut i.probe;
            match result {
                Ok(()) => {
                    p.consecutive_fail = 0;
                    p.consecutive_ok = p.consecutive_ok.saturating_add(1);
                    // At start one success is enough; after a fall, `rise` are needed.
                    if !p.started || p.consecutive_ok >= rise {
                        p.healthy = true;
                    }
                }
                Err(e) => {
                    p.consecutive_ok = 0;
                    p.consecutive_fail = p.consecutive_fail.saturating_add(1);
                    if p.consecutive_fail >= fall {
                        p.healthy = false;
                    }
                    p.last_error = e;
                }
            }
            p.started = true;
        });
    }

    /// What a session learned from a backend event. Cheap when nothing changed.
    pub fn observe_backend(
        &self,
        self_id: Option<u64>,
        status: Option<&str>,
        interval_ms: Option<u64>,
        online: Option<bool>,
    ) {
        let cur = self.backend.load();
        let changed = (self_id.is_some() && self_id != cur.self_id)
            || (status.is_some() && status != cur.status.as_deref())
            || (interval_ms.is_some() && interval_ms != cur.heartbeat_interval_ms);
        if changed {
            let mut next = (**cur).clone();
            if self_id.is_some() {
                next.self_id = self_id;
            }
            if let Some(s) = status {
                next.status = Some(s.to_string());
            }
            if interval_ms.is_some() {
                next.heartbeat_interval_ms = interval_ms;
            }
            self.backend.store(Arc::new(next));
        }
        if let Some(online) = online {
            let known = self.inputs.lock().unwrap_or_else(|e| e.into_inner()).online;
            if known != online {
                self.update(|i| i.online = online);
            }
        }
    }

    /// A session's backend socket failed: probe now instead of at the next interval.
    pub fn kick(&self) {
        self.kick.notify_one();
    }
}

/// The state the inputs imply: (up, cause, reason). Order: the operator's intent first.
fn derive(i: &Inputs) -> (bool, Cause, String) {
    let (cause, reason) = if i.shutting_down {
        (Cause::Shutdown, "lifeguard is shutting down".to_string())
    } else if !i.admin_enabled {
        (
            Cause::Admin,
            "disabled by the operator (admin API)".to_string(),
        )
    } else if !i.config_enabled {
        (
            Cause::Config,
            "disabled in lifeguard's config file".to_string(),
        )
    } else if !i.napcat_enabled {
        (Cause::NapcatConfig, i.napcat_reason.clone())
    } else if !i.probe.healthy {
        if i.probe.started && !i.probe.last_error.is_empty() {
            (
                Cause::Unhealthy,
                format!("backend unhealthy: {}", i.probe.last_error),
            )
        } else {
            (
                Cause::Starting,
                "waiting for the first successful probe".to_string(),
            )
        }
    } else if !i.online && i.offline_is_down {
        (
            Cause::Offline,
            "the backend's QQ account is offline (heartbeat status.online = false)".to_string(),
        )
    } else {
        (Cause::Healthy, "backend healthy".to_string())
    };
    (cause == Cause::Healthy, cause, reason)
}

/// Why a handshake with the backend failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to the backend: {0}")]
    Io(#[from] std::io::Error),
    #[error("the backend did not complete the handshake in time")]
    Timeout,
    #[error("the backend answered HTTP {0} instead of 101")]
    Status(u16),
    #[error("the backend's handshake is invalid: {0}")]
    Invalid(&'static str),
}

/// An open WebSocket connection to the backend, as raw bytes.
pub struct Connected {
    pub stream: TcpStream,
    /// Bytes the backend sent right after its 101 (often the connect event).
    pub leftover: Vec<u8>,
}

/// Open a WebSocket to the backend on `path_and_query` (`/api`, `/event?x=1`, ...),
/// presenting `token` as a Bearer header and as `access_token` in the query.
pub async fn connect(
    up: &UpstreamUrl,
    path_and_query: &str,
    token: Option<&Secret>,
    timeout: Duration,
) -> Result<Connected, ConnectError> {
    tokio::time::timeout(timeout, connect_inner(up, path_and_query, token))
        .await
        .map_err(|_| ConnectError::Timeout)?
}

async fn connect_inner(
    up: &UpstreamUrl,
    path_and_query: &str,
    token: Option<&Secret>,
) -> Result<Connected, ConnectError> {
    let mut stream = TcpStream::connect((up.host.as_str(), up.port)).await?;
    stream.set_nodelay(true)?;
    let key = ws::new_key();
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let mut target = format!(
        "{}{}",
        up.base_path,
        if path.is_empty() { "/" } else { path }
    );
    let mut params: Vec<&str> = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|kv| !kv.is_empty() && !kv.starts_with("access_token="))
        .collect();
    let token_param;
    if let Some(t) = token {
        token_param = format!("access_token={}", percent_encode(t.expose()));
        params.push(&token_param);
    }
    if !params.is_empty() {
        target.push('?');
        target.push_str(&params.join("&"));
    }
    let mut req = format!(
        "GET {target} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: lifeguard/{}\r\n",
        up.authority(),
        env!("CARGO_PKG_VERSION")
    );
    if let Some(t) = token {
        req.push_str("Authorization: Bearer ");
        req.push_str(t.expose());
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await?;

    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() > 16 * 1024 {
            return Err(ConnectError::Invalid("response headers too large"));
        }
        let mut chunk = [0u8; 2048];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(ConnectError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the backend closed the connection during the handshake",
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Partial) => continue,
            Err(_) => return Err(ConnectError::Invalid("unparsable HTTP response")),
            Ok(httparse::Status::Complete(len)) => {
                let code = resp.code.unwrap_or(0);
                if code != 101 {
                    return Err(ConnectError::Status(code));
                }
                let accept = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
                    .map(|h| h.value)
                    .ok_or(ConnectError::Invalid("no Sec-WebSocket-Accept"))?;
                if accept != ws::accept_key(key.as_bytes()).as_bytes() {
                    return Err(ConnectError::Invalid("wrong Sec-WebSocket-Accept"));
                }
                if resp
                    .headers
                    .iter()
                    .any(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions"))
                {
                    return Err(ConnectError::Invalid(
                        "the backend negotiated an extension nobody asked for",
                    ));
                }
                let leftover = buf[len..].to_vec();
                return Ok(Connected { stream, leftover });
            }
        }
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The active prober: a WebSocket handshake on the backend's `/api` every
/// `probe.interval` (sooner when kicked), counted against fall/rise.
pub async fn run_prober(
    gate: Arc<Gate>,
    settings: Arc<ArcSwap<Settings>>,
    shutdown: CancellationToken,
    on_probe: Option<Box<dyn Fn(Duration, bool) + Send + Sync>>,
) {
    let mut last = Instant::now() - Duration::from_secs(3600);
    loop {
        let s = settings.load_full();
        let wait = s.probe.interval.saturating_sub(last.elapsed());
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = gate.kick.notified() => {
                // Passive failure: probe now, but never more often than every 50ms.
                let min_gap = Duration::from_millis(50);
                if last.elapsed() < min_gap {
                    tokio::time::sleep(min_gap - last.elapsed()).await;
                }
            }
        }
        last = Instant::now();
        let started = Instant::now();
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = probe_once(&s) => r,
        };
        if let Some(f) = &on_probe {
            f(started.elapsed(), result.is_ok());
        }
        if let Err(e) = &result {
            tracing::debug!(error = %e, "probe failed");
        }
        gate.observe_probe(result, s.probe.fall, s.probe.rise);
    }
}

/// One probe: open `/api`, say goodbye properly, report.
pub async fn probe_once(s: &Settings) -> Result<(), String> {
    let c = connect(
        &s.upstream,
        "/api",
        s.upstream_token.as_ref(),
        s.probe.timeout,
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut stream = c.stream;
    let close = ws::close_frame(ws::code::NORMAL, "lifeguard probe", ws::random_mask());
    let _ = tokio::time::timeout(Duration::from_millis(100), stream.write_all(&close)).await;
    let _ = stream.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RunArgs, Settings};

    fn gate() -> Gate {
        let args = RunArgs {
            upstream: Some("ws://127.0.0.1:1".into()),
            ..Default::default()
        };
        Gate::new(&Settings::resolve(&args, None).unwrap())
    }

    #[test]
    fn rise_and_fall() {
        let g = gate();
        assert_eq!(g.snapshot().cause, Cause::Starting);
        g.observe_probe(Ok(()), 2, 2);
        assert!(g.snapshot().up, "one success is enough at start");
        g.observe_probe(Err("refused".into()), 2, 2);
        assert!(g.snapshot().up);
        g.observe_probe(Err("refused".into()), 2, 2);
        let s = g.snapshot();
        assert_eq!((s.up, s.cause), (false, Cause::Unhealthy));
        assert!(s.reason.contains("refused"));
        g.observe_probe(Ok(()), 2, 2);
        assert!(!g.snapshot().up);
        g.observe_probe(Ok(()), 2, 2);
        assert!(g.snapshot().up);
    }

    #[test]
    fn operator_intent_wins_and_is_announced() {
        let g = gate();
        let mut rx = g.subscribe();
        g.observe_probe(Ok(()), 2, 2);
        g.set_admin_enabled(false);
        assert!(rx.has_changed().unwrap());
        let s = rx.borrow_and_update().clone();
        assert_eq!(
            (s.up, s.cause, s.cause.close_code()),
            (false, Cause::Admin, 1012)
        );
        g.observe_backend(Some(1), None, None, Some(false));
        assert_eq!(g.snapshot().cause, Cause::Admin);
        g.set_admin_enabled(true);
        assert_eq!(g.snapshot().cause, Cause::Offline);
        g.observe_backend(None, None, None, Some(true));
        assert!(g.snapshot().up);
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(percent_encode("a b&c"), "a%20b%26c");
    }
}
