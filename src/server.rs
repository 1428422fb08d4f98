//! The client-facing listener: HTTP handshakes (routing, auth, state, the backend
//! handshake) answered before any upgrade, then one relay task per session.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicIsize, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Secret, Settings};
use crate::metrics::Metrics;
use crate::onebot::Role;
use crate::relay::{Session, SessionInfo};
use crate::upstream::{self, ConnectError, Gate};
use crate::ws;

/// How long a client may take to send its handshake request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the listeners, sessions and the prober share.
pub struct Shared {
    /// The effective settings; a reload stores a new value.
    pub settings: Arc<ArcSwap<Settings>>,
    /// The backend's state.
    pub gate: Arc<Gate>,
    /// Counters and histograms for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Open sessions by role (api, event, universal).
    open: Arc<[AtomicUsize; 3]>,
    /// Two-phase mass disable (see [`Sweep`]).
    pub sweep: Arc<Sweep>,
    next_id: AtomicU64,
    /// Every session and client connection task: shutdown waits for them (the drain).
    pub tracker: TaskTracker,
    /// Background tasks (prober, admin listener, watchers): they end on `hard_stop`, which
    /// shutdown cancels once the sessions are drained, so `/live` answers during the drain.
    pub background: TaskTracker,
    /// Cancelled to stop accepting (shutdown).
    pub stop_accepting: CancellationToken,
    /// Cancelled after the drain budget: remaining tasks must end now.
    pub hard_stop: CancellationToken,
    /// Every applied configuration, for sessions to re-check themselves against.
    settings_tx: tokio::sync::watch::Sender<Arc<Settings>>,
    // --- config issue (hot reload + NapCat config): ---
    /// lifeguard's own settings and NapCat's view of the upstream, combined; config
    /// reloads and the NapCat follower change settings through it.
    pub layers: crate::napcat::Layers,
}

/// A mass disable in two phases: every session first sends its `disable` and Close
/// (phase 1), and only then does any spend CPU on reading Close replies, closing sockets
/// and logging (phase 2). With thousands of sessions, the last client hears sooner.
#[derive(Default)]
pub struct Sweep {
    /// Sessions that have not sent their Close yet (may go below zero: late joiners).
    remaining: AtomicIsize,
    done: Notify,
}

impl Sweep {
    fn begin(&self, sessions: usize) {
        self.remaining.store(sessions as isize, Ordering::SeqCst);
    }

    /// This session's Close is out.
    pub fn sent(&self) {
        if self.remaining.fetch_sub(1, Ordering::SeqCst) <= 1 {
            self.done.notify_waiters();
        }
    }

    /// Wait until every session of the sweep has sent its Close, at most `limit`.
    pub async fn wait(&self, limit: Duration) {
        let notified = self.done.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.remaining.load(Ordering::SeqCst) <= 0 {
            return;
        }
        let _ = tokio::time::timeout(limit, notified).await;
    }
}

fn role_index(r: Role) -> usize {
    match r {
        Role::Api => 0,
        Role::Event => 1,
        Role::Universal => 2,
    }
}

impl Shared {
    pub fn new(settings: Settings) -> Arc<Shared> {
        let gate = Arc::new(Gate::new(&settings));
        let metrics = Arc::new(Metrics::new());
        metrics.watch_gate(&gate);
        let settings = Arc::new(settings);
        let (settings_tx, _) = tokio::sync::watch::channel(settings.clone());
        let open: Arc<[AtomicUsize; 3]> = Default::default();
        let sweep = Arc::new(Sweep::default());
        {
            // Runs before the sessions are told: they all take part in the sweep.
            let (open, sweep) = (open.clone(), sweep.clone());
            gate.on_transition(Box::new(move |old, new| {
                if old.up && !new.up {
                    sweep.begin(open.iter().map(|n| n.load(Ordering::Relaxed)).sum());
                }
            }));
        }
        Arc::new(Shared {
            settings: Arc::new(ArcSwap::new(settings)),
            settings_tx,
            gate,
            metrics,
            open,
            sweep,
            next_id: AtomicU64::new(1),
            tracker: TaskTracker::new(),
            background: TaskTracker::new(),
            stop_accepting: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            layers: Default::default(),
        })
    }

    /// Apply a new, already validated configuration to the running proxy:
    /// - `enabled` drives the gate (false: every session gets the disable sequence, 1012);
    /// - a new upstream closes every session (1012); new sessions go to the new address;
    /// - a new access token closes the sessions whose credential no longer passes (1008);
    /// - probe, heartbeat and timeout settings are read afresh by whoever uses them.
    ///
    /// Listen addresses cannot move without a restart; a change to them is logged and ignored.
    pub fn apply_settings(&self, mut new: Settings) {
        let old = self.settings.load_full();
        if new.listen != old.listen || new.admin_listen != old.admin_listen {
            tracing::warn!(
                listen = %new.listen,
                admin_listen = %new.admin_listen,
                "listen addresses change only on restart; keeping the current ones"
            );
            new.listen = old.listen;
            new.admin_listen = old.admin_listen;
        }
        if *old == new {
            return;
        }
        let new = Arc::new(new);
        self.settings.store(new.clone());
        self.settings_tx.send_replace(new.clone());
        if new.upstream != old.upstream {
            tracing::info!(from = %old.upstream, to = %new.upstream, "upstream changed");
        }
        if new.access_token != old.access_token {
            tracing::info!("access token changed");
        }
        self.gate.set_offline_is_down(new.offline_is_down);
        self.gate.set_config_enabled(new.enabled);
        self.gate.kick();
    }

    /// A receiver of every applied configuration (sessions use it).
    pub fn subscribe_settings(&self) -> tokio::sync::watch::Receiver<Arc<Settings>> {
        self.settings_tx.subscribe()
    }

    /// Open sessions: (api, event, universal).
    pub fn open_sessions(&self) -> [usize; 3] {
        [0, 1, 2].map(|i| self.open[i].load(Ordering::Relaxed))
    }

    fn session_opened(&self, role: Role) {
        self.open[role_index(role)].fetch_add(1, Ordering::Relaxed);
        self.metrics.session_opened(role);
    }

    /// Called once by every session as it ends.
    pub fn session_closed(&self, info: &SessionInfo, cause: &str, code: Option<u16>) {
        self.open[role_index(info.role)].fetch_sub(1, Ordering::Relaxed);
        self.metrics.session_closed(info.role, cause, code);
    }
}

/// A running proxy: both listeners, the prober, and every session.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
}

impl Proxy {
    /// Bind both listeners and start serving. Errors are bind errors.
    pub async fn start(settings: Settings) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(settings.listen).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", settings.listen),
            )
        })?;
        let admin = TcpListener::bind(settings.admin_listen)
            .await
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot listen on {} (admin): {e}", settings.admin_listen),
                )
            })?;
        let addr = listener.local_addr()?;
        let admin_addr = admin.local_addr()?;
        let shared = Shared::new(settings);
        let s = shared.clone();
        let m = shared.metrics.clone();
        shared.background.spawn(upstream::run_prober(
            s.gate.clone(),
            s.settings.clone(),
            s.hard_stop.clone(),
            Some(Box::new(move |d, ok| m.probe_done(d, ok))),
        ));
        shared.tracker.spawn(accept_loop(shared.clone(), listener));
        shared
            .background
            .spawn(crate::admin::serve(shared.clone(), admin));
        // --- config issue: follow NapCat's config file (`--napcat-config`); idle while unset,
        // so a reload can set or change it. Ends on the hard stop like the prober.
        shared
            .background
            .spawn(crate::napcat::run(shared.clone(), shared.hard_stop.clone()));
        // --- config issue: while down because QQ is logged out, ask the backend (get_status)
        // whether it is back, since no session is open to see a heartbeat say so.
        shared.background.spawn(crate::napcat::watch_login(
            shared.clone(),
            shared.hard_stop.clone(),
        ));
        tracing::info!(
            listen = %addr,
            admin = %admin_addr,
            upstream = %shared.settings.load().upstream,
            "lifeguard started"
        );
        Ok(Proxy {
            addr,
            admin_addr,
            shared,
        })
    }

    /// Stop accepting, run the disable sequence with 1001 for every session, wait for
    /// all tasks within the drain budget. True when everything ended in time.
    pub async fn shutdown(self) -> bool {
        let budget = self.shared.settings.load().drain_timeout;
        let open: usize = self.shared.open_sessions().iter().sum();
        tracing::info!(
            sessions = open,
            tasks = self.shared.tracker.len(),
            budget_ms = budget.as_millis() as u64,
            "shutting down"
        );
        self.shared.stop_accepting.cancel();
        self.shared.gate.set_shutting_down();
        self.shared.tracker.close();
        let drained = tokio::time::timeout(budget, self.shared.tracker.wait())
            .await
            .is_ok();
        if !drained {
            self.shared.hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), self.shared.tracker.wait()).await;
        }
        self.shared.hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.shared.tracker.wait()).await;
        tracing::info!(drained, "stopped");
        drained
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = shared.stop_accepting.cancelled() => return,
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
        let shared2 = shared.clone();
        shared.tracker.spawn(async move {
            let svc_shared = shared2.clone();
            let svc = hyper::service::service_fn(move |req| handshake(svc_shared.clone(), peer, req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "handshake connection ended with an error");
                    }
                }
                _ = shared2.stop_accepting.cancelled() => {}
            }
        });
    }
}

type Resp = Response<Full<Bytes>>;

fn plain(status: StatusCode, body: &str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, body: serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn header_has_token(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// What the client presented: `Authorization: Bearer T` / `Token T`, or `?access_token=T`.
fn presented_token(req: &Request<Incoming>) -> Option<String> {
    if let Some(v) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if let Some((scheme, rest)) = v.split_once(' ') {
            if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token") {
                return Some(rest.trim().to_string());
            }
        }
    }
    req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("access_token="))
            .map(percent_decode)
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 3 <= b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Does `presented` satisfy the configured access token? (constant-time)
pub fn authorized(expected: Option<&Secret>, presented: Option<&str>) -> Result<(), StatusCode> {
    match (expected, presented) {
        (None, _) => Ok(()),
        (Some(_), None) => Err(StatusCode::UNAUTHORIZED),
        (Some(t), Some(p)) if t.matches(p.as_bytes()) => Ok(()),
        (Some(_), Some(_)) => Err(StatusCode::FORBIDDEN),
    }
}

fn unavailable(cause: &str, reason: &str, retry_after: u64) -> Resp {
    let mut r = json(
        StatusCode::SERVICE_UNAVAILABLE,
        serde_json::json!({"status": "unavailable", "cause": cause, "reason": reason}),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    r
}

/// Answer one HTTP request on the client port: a WebSocket handshake or an error.
async fn handshake(
    shared: Arc<Shared>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Resp, Infallible> {
    let resp = handshake_inner(&shared, peer, &mut req).await;
    shared.metrics.handshake(resp.status().as_u16());
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        tracing::debug!(%peer, path = req.uri().path(), status = resp.status().as_u16(), "handshake refused");
    }
    Ok(resp)
}

async fn handshake_inner(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    req: &mut Request<Incoming>,
) -> Resp {
    let is_upgrade = header_has_token(req, header::CONNECTION, "upgrade")
        && header_has_token(req, header::UPGRADE, "websocket");
    if !is_upgrade {
        let mut r = plain(
            StatusCode::UPGRADE_REQUIRED,
            "lifeguard: this port speaks OneBot v11 forward WebSocket; connect with a WebSocket client",
        );
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return r;
    }
    if req.method() != Method::GET {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "WebSocket handshakes use GET",
        );
    }
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        let mut r = plain(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported Sec-WebSocket-Version (13 is)",
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return r;
    }
    let key = match req.headers().get(header::SEC_WEBSOCKET_KEY) {
        Some(k) if k.len() == 24 => k.as_bytes().to_vec(),
        _ => {
            return plain(
                StatusCode::BAD_REQUEST,
                "missing or malformed Sec-WebSocket-Key",
            )
        }
    };
    let settings = shared.settings.load_full();

    // Auth before anything else; the credential never reaches the logs.
    let presented = presented_token(req);
    if let Err(status) = authorized(settings.access_token.as_ref(), presented.as_deref()) {
        let msg = if status == StatusCode::UNAUTHORIZED {
            "missing access token (Authorization: Bearer <token> or ?access_token=)"
        } else {
            "wrong access token"
        };
        let mut r = json(
            status,
            serde_json::json!({"status": "failed", "retcode": status.as_u16(), "message": msg}),
        );
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        return r;
    }

    // Refuse while the backend is down: never accept-then-close.
    let snap = shared.gate.snapshot();
    if !snap.up {
        let retry = settings.probe.interval.as_secs().max(1) * settings.probe.rise as u64;
        return unavailable(snap.cause.as_str(), &snap.reason, retry.clamp(1, 30));
    }

    // One backend connection per client, opened before the client's upgrade is answered.
    let path = req.uri().path().to_string();
    let role = Role::of_path(&path);
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    let connected = match upstream::connect(
        &settings.upstream,
        &path_and_query,
        settings.upstream_token.as_ref(),
        settings.connect_timeout,
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            shared.gate.kick();
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
    let snap = shared.gate.snapshot();
    if !snap.up {
        return unavailable(snap.cause.as_str(), &snap.reason, 1);
    }

    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let info = SessionInfo {
        id,
        peer,
        path,
        role,
        credential: presented.map(String::into_boxed_str),
    };
    let on_upgrade = hyper::upgrade::on(req);
    let task_shared = shared.clone();
    shared.session_opened(role);
    shared.tracker.spawn(async move {
        let upgraded = tokio::select! {
            u = on_upgrade => u,
            _ = task_shared.hard_stop.cancelled() => {
                task_shared.session_aborted(role);
                return;
            }
        };
        let parts = match upgraded.map(|u| u.downcast::<TokioIo<TcpStream>>()) {
            Ok(Ok(parts)) => parts,
            Ok(Err(_)) => {
                tracing::error!(session = id, "upgraded connection is not a TCP stream");
                task_shared.session_aborted(role);
                return;
            }
            Err(e) => {
                tracing::debug!(session = id, error = %e, "client left during the upgrade");
                task_shared.session_aborted(role);
                return;
            }
        };
        let client = parts.io.into_inner();
        // Copy what hyper read past the request (normally nothing): `read_buf` may be a
        // view into hyper's 8 KiB read buffer, which must not live as long as the session.
        let client_leftover = parts.read_buf.to_vec();
        drop(parts.read_buf);
        tracing::debug!(session = id, peer = %info.peer, path = %info.path, "session opened");
        let session = Session::new(task_shared.clone(), info, client, connected.stream);
        let hard_stop = task_shared.hard_stop.clone();
        tokio::select! {
            _ = session.run(client_leftover, connected.leftover) => {}
            _ = hard_stop.cancelled() => {
                task_shared.session_aborted(role);
            }
        }
    });

    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&ws::accept_key(&key)) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

impl Shared {
    /// A session that never started relaying (client gone during the upgrade, hard stop).
    fn session_aborted(&self, role: Role) {
        self.open[role_index(role)].fetch_sub(1, Ordering::Relaxed);
        self.metrics.session_aborted(role);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_rules() {
        let t = Secret::new("abc");
        assert_eq!(authorized(None, None), Ok(()));
        assert_eq!(authorized(Some(&t), None), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(
            authorized(Some(&t), Some("abd")),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(authorized(Some(&t), Some("ab")), Err(StatusCode::FORBIDDEN));
        assert_eq!(authorized(Some(&t), Some("abc")), Ok(()));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%2Bc+d"), "a b+c+d");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
