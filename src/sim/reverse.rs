//! NapCat's reverse WebSocket client (`websocketClients`): the backend dials the framework.
//!
//! What NapCat v4 does (`network/websocket-client.ts`), and so the simulator:
//! - request headers `X-Self-ID: <uin>`, `Authorization: Bearer <token>` (sent even with an
//!   empty token), `x-client-role: Universal`, `User-Agent: OneBot/11`; 2000 ms handshake
//!   timeout (TCP connect included);
//! - first frame the lifecycle `connect`; heartbeats from one timer per entry, started when
//!   the entry is enabled (not per connection), sent only while connected; no pings;
//! - API calls answered on the connection (`不支持的Api` for unknown actions);
//! - after a close, an error or a refused handshake (non-101 status, timeout, connect
//!   refused) it redials after a fixed `reconnectInterval`: no backoff, no jitter;
//! - switched off (hot reload): a Close frame with no status code, no redial; switched on
//!   again: it dials at once;
//! - process exit: the socket dropped without a Close; the restarted process dials at once.
//!
//! Other backends differ in headers, roles and interval; [`ReverseConfig`] has presets.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use super::api::Flavor;
use super::frames;
use super::process::{self, lock, Shared};
use super::session::{self, Out, Role, Ws};

/// NapCat's schema default `reconnectInterval` (its WebUI form suggests 30000 ms).
pub const DEFAULT_RECONNECT_INTERVAL: Duration = Duration::from_millis(5000);
/// LLOneBot's fixed redial delay.
pub const LLONEBOT_RECONNECT_INTERVAL: Duration = Duration::from_millis(3000);
/// NapCat's `handshakeTimeout` for its reverse connections.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(2000);

/// Most failed dials and peer frames remembered per entry (oldest forgotten first), so a
/// test that leaves an entry redialling for long does not grow memory without bound.
const LOG_LIMIT: usize = 4096;

/// What a reverse connection is for, sent as `X-Client-Role` (the OneBot v11 spec's roles).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReverseRole {
    /// Events, heartbeats, the `connect` event and API calls on one socket (NapCat's only
    /// mode).
    Universal,
    /// API calls only: no events, no heartbeats, no `connect` (Lagrange's and go-cqhttp's
    /// split mode).
    Api,
    /// Events, heartbeats and `connect` only; frames from the peer are ignored.
    Event,
}

impl ReverseRole {
    /// The spec's spelling of the role.
    pub fn header(self) -> &'static str {
        match self {
            ReverseRole::Universal => "Universal",
            ReverseRole::Api => "API",
            ReverseRole::Event => "Event",
        }
    }

    /// Whether the connection gets events and heartbeats.
    fn events(self) -> bool {
        self != ReverseRole::Api
    }

    /// Whether the connection answers API calls.
    fn answers(self) -> bool {
        self != ReverseRole::Event
    }
}

/// How the access token is presented on the upgrade request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReverseAuth {
    /// `Authorization: Bearer <token>`, even when the token is empty (NapCat, LLOneBot).
    Bearer,
    /// `Authorization: Bearer <token>` only when a token is set (Lagrange).
    BearerIfSet,
    /// `Authorization: Token <token>` only when a token is set (go-cqhttp).
    Token,
    /// No `Authorization` header at all.
    None,
}

/// One reverse WebSocket entry of the simulated process (NapCat's `websocketClients[i]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReverseConfig {
    /// `ws://host:port/path` to dial (plain `ws://` only).
    pub url: String,
    /// Access token; empty means none (NapCat still sends `Bearer ` with [`ReverseAuth::Bearer`]).
    pub token: String,
    /// How the token is presented.
    pub auth: ReverseAuth,
    /// What the connection is for.
    pub role: ReverseRole,
    /// `X-Client-Role` value when it is not the spec's spelling of `role` (Lagrange sends
    /// `Api`); `None`: [`ReverseRole::header`].
    pub role_header: Option<String>,
    /// `User-Agent` header.
    pub user_agent: String,
    /// Fixed delay before redialling after a close, an error or a refused handshake.
    pub reconnect_interval: Duration,
    /// Longest wait for TCP connect plus upgrade response; a timeout counts as a failure.
    pub handshake_timeout: Duration,
    /// Heartbeat period of this entry (also the `interval` field); `None`: no heartbeats.
    pub heartbeat_interval: Option<Duration>,
    /// Whether the entry starts enabled (it dials at once) or waits for
    /// [`ReverseHandle::enable`].
    pub enabled: bool,
}

impl ReverseConfig {
    /// NapCat v4's defaults for `url`: Bearer (even empty), `Universal`, `OneBot/11`, 5 s
    /// redial, 2 s handshake timeout, 30 s heartbeats.
    pub fn napcat(url: impl Into<String>) -> Self {
        ReverseConfig {
            url: url.into(),
            token: String::new(),
            auth: ReverseAuth::Bearer,
            role: ReverseRole::Universal,
            role_header: None,
            user_agent: "OneBot/11".to_owned(),
            reconnect_interval: DEFAULT_RECONNECT_INTERVAL,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            heartbeat_interval: Some(super::DEFAULT_HEARTBEAT_INTERVAL),
            enabled: true,
        }
    }

    /// LLOneBot: NapCat's headers with a fixed 3 s redial.
    pub fn llonebot(url: impl Into<String>) -> Self {
        Self::napcat(url).with_reconnect_interval(LLONEBOT_RECONNECT_INTERVAL)
    }

    /// go-cqhttp: `Authorization: Token <t>` only when set, `CQHttp/4.15.0`, 5 s heartbeats.
    pub fn gocqhttp(url: impl Into<String>) -> Self {
        ReverseConfig {
            auth: ReverseAuth::Token,
            user_agent: "CQHttp/4.15.0".to_owned(),
            heartbeat_interval: Some(Duration::from_secs(5)),
            ..Self::napcat(url)
        }
    }

    /// Lagrange.OneBot: Bearer only when set, 5 s heartbeats; `role` other than
    /// `Universal` is its split mode (`X-Client-Role: Api` / `Event`, one entry per URL).
    pub fn lagrange(url: impl Into<String>, role: ReverseRole) -> Self {
        ReverseConfig {
            auth: ReverseAuth::BearerIfSet,
            role,
            role_header: (role == ReverseRole::Api).then(|| "Api".to_owned()),
            user_agent: "Lagrange.OneBot".to_owned(),
            heartbeat_interval: Some(Duration::from_secs(5)),
            ..Self::napcat(url)
        }
    }

    /// This entry with an access token.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = token.into();
        self
    }

    /// This entry with another way of presenting the token.
    pub fn with_auth(mut self, auth: ReverseAuth) -> Self {
        self.auth = auth;
        self
    }

    /// This entry with another role (the header follows the spec's spelling).
    pub fn with_role(mut self, role: ReverseRole) -> Self {
        self.role = role;
        self.role_header = None;
        self
    }

    /// This entry with another redial delay.
    pub fn with_reconnect_interval(mut self, interval: Duration) -> Self {
        self.reconnect_interval = interval;
        self
    }

    /// This entry with another handshake timeout.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// This entry with another heartbeat period (`None`: no heartbeats).
    pub fn with_heartbeat_interval(mut self, interval: Option<Duration>) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// This entry starting enabled or not.
    pub fn with_enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }
}

/// Why one dial did not end in an open connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialFailure {
    /// The peer answered the upgrade with this HTTP status instead of 101.
    Refused(u16),
    /// No upgrade response within the handshake timeout.
    Timeout,
    /// Anything else: connect refused, reset, a bad URL, a malformed response.
    Error(String),
}

/// A frame the peer sent on a reverse connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerFrame {
    /// A text frame.
    Text(String),
    /// A binary frame.
    Binary(Vec<u8>),
    /// A ping (answered with a pong by the WebSocket layer).
    Ping(Vec<u8>),
    /// A pong.
    Pong(Vec<u8>),
    /// A Close frame: its code and reason, if it had a payload.
    Close(Option<(u16, String)>),
}

/// Counters of one reverse entry, for tests that wait for something to happen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReverseStatus {
    /// Dials started (TCP connect attempts).
    pub dials: u64,
    /// Upgrades that got a 101.
    pub handshakes: u64,
    /// Dials that failed (see [`ReverseHandle::failures`]).
    pub failures: u64,
    /// A connection is open right now.
    pub connected: bool,
}

/// One reverse entry: its config and what tests can observe of it.
pub(crate) struct Entry {
    /// The entry's settings (the heartbeat period lives in `heartbeat`).
    cfg: ReverseConfig,
    /// Switched on or off (NapCat's `enable` in the config file).
    enabled: watch::Sender<bool>,
    /// Heartbeat period; the entry's timer restarts when it changes.
    heartbeat: watch::Sender<Option<Duration>>,
    /// Counters and the connected flag.
    status: watch::Sender<ReverseStatus>,
    /// Failed dials, oldest first (bounded).
    failures: Mutex<VecDeque<DialFailure>>,
    /// Frames from the peer, oldest first (bounded).
    received: Mutex<VecDeque<PeerFrame>>,
    /// The open connection's queue. Also serialises enable/disable against attaching a new
    /// connection, so that a disable never misses a connection that is just opening.
    conn: Mutex<Option<mpsc::UnboundedSender<Out>>>,
}

fn push_bounded<T>(log: &Mutex<VecDeque<T>>, item: T) {
    let mut log = lock(log);
    if log.len() >= LOG_LIMIT {
        log.pop_front();
    }
    log.push_back(item);
}

impl Entry {
    /// Queue an event for the open connection if it takes events; true if queued.
    pub(crate) fn broadcast(&self, frame: &Utf8Bytes) -> bool {
        self.event_sender()
            .is_some_and(|tx| tx.send(Out::Frame(frame.clone())).is_ok())
    }

    /// The open connection's queue if it takes events (for `blast`).
    pub(crate) fn event_sender(&self) -> Option<mpsc::UnboundedSender<Out>> {
        if !self.cfg.role.events() {
            return None;
        }
        lock(&self.conn).clone()
    }

    fn record(&self, msg: &Message) {
        let frame = match msg {
            Message::Text(t) => PeerFrame::Text(t.as_str().to_owned()),
            Message::Binary(b) => PeerFrame::Binary(b.to_vec()),
            Message::Ping(p) => PeerFrame::Ping(p.to_vec()),
            Message::Pong(p) => PeerFrame::Pong(p.to_vec()),
            Message::Close(c) => PeerFrame::Close(
                c.as_ref()
                    .map(|c| (u16::from(c.code), c.reason.as_str().to_owned())),
            ),
            Message::Frame(_) => return,
        };
        push_bounded(&self.received, frame);
    }

    fn fail(&self, failure: DialFailure) {
        push_bounded(&self.failures, failure);
        self.status.send_modify(|s| s.failures += 1);
    }
}

/// Control and observation of one reverse WebSocket entry. Cheap to clone.
#[derive(Clone)]
pub struct ReverseHandle {
    entry: Arc<Entry>,
}

impl std::fmt::Debug for ReverseHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReverseHandle")
            .field("url", &self.entry.cfg.url)
            .field("status", &self.status())
            .finish()
    }
}

impl ReverseHandle {
    /// The entry's configuration as added.
    pub fn config(&self) -> &ReverseConfig {
        &self.entry.cfg
    }

    /// Hot reload switched the entry off: the open connection gets a Close frame with no
    /// status code (after what was queued before it) and nothing is redialled.
    pub fn disable(&self) {
        let mut conn = lock(&self.entry.conn);
        self.entry.enabled.send_replace(false);
        if let Some(tx) = conn.take() {
            let _ = tx.send(Out::CloseNoCode);
        }
    }

    /// Hot reload switched the entry on: it dials at once (if the process runs).
    pub fn enable(&self) {
        let _conn = lock(&self.entry.conn);
        self.entry.enabled.send_replace(true);
    }

    /// Change this entry's heartbeat period (its timer restarts now); `None` stops them.
    pub fn set_heartbeat_interval(&self, interval: Option<Duration>) {
        self.entry.heartbeat.send_replace(interval);
    }

    /// Counters and the connected flag, now.
    pub fn status(&self) -> ReverseStatus {
        self.entry.status.borrow().clone()
    }

    /// Dials started so far.
    pub fn dials(&self) -> u64 {
        self.status().dials
    }

    /// Handshakes that got a 101 so far.
    pub fn handshakes(&self) -> u64 {
        self.status().handshakes
    }

    /// A connection is open right now.
    pub fn is_connected(&self) -> bool {
        self.status().connected
    }

    /// Every failed dial, oldest first (the last few thousand).
    pub fn failures(&self) -> Vec<DialFailure> {
        lock(&self.entry.failures).iter().cloned().collect()
    }

    /// The HTTP status of each refused handshake, in order (e.g. `[401, 503]`).
    pub fn refused_statuses(&self) -> Vec<u16> {
        lock(&self.entry.failures)
            .iter()
            .filter_map(|f| match f {
                DialFailure::Refused(status) => Some(*status),
                _ => None,
            })
            .collect()
    }

    /// Every frame the peer sent, across connections, oldest first (the last few
    /// thousand); a Close the peer sent shows up as [`PeerFrame::Close`].
    pub fn received(&self) -> Vec<PeerFrame> {
        lock(&self.entry.received).iter().cloned().collect()
    }

    /// Resolves once `pred` holds for the entry's status (at once if it already does).
    /// Wrap it in a timeout: it waits forever for something that never happens.
    pub async fn wait_status(&self, mut pred: impl FnMut(&ReverseStatus) -> bool) -> ReverseStatus {
        let mut rx = self.entry.status.subscribe();
        let seen = match rx.wait_for(|s| pred(s)).await {
            Ok(s) => Some(s.clone()),
            // The sender lives in the entry this handle holds: never dropped first.
            Err(_) => None,
        };
        seen.unwrap_or_else(|| self.status())
    }

    /// Resolves once a connection is open.
    pub async fn wait_connected(&self) {
        self.wait_status(|s| s.connected).await;
    }

    /// Resolves once no connection is open.
    pub async fn wait_disconnected(&self) {
        self.wait_status(|s| !s.connected).await;
    }

    /// Resolves once at least `n` dials have started.
    pub async fn wait_dials(&self, n: u64) {
        self.wait_status(|s| s.dials >= n).await;
    }
}

/// Create an entry for `cfg` and spawn its dialler and heartbeat timer.
pub(crate) fn add(shared: &Arc<Shared>, cfg: ReverseConfig) -> (Arc<Entry>, ReverseHandle) {
    let entry = Arc::new(Entry {
        enabled: watch::Sender::new(cfg.enabled),
        heartbeat: watch::Sender::new(cfg.heartbeat_interval),
        status: watch::Sender::new(ReverseStatus::default()),
        failures: Mutex::new(VecDeque::new()),
        received: Mutex::new(VecDeque::new()),
        conn: Mutex::new(None),
        cfg,
    });
    shared
        .tracker
        .spawn(supervise(Arc::clone(shared), Arc::clone(&entry)));
    if entry.cfg.role.events() {
        shared
            .tracker
            .spawn(heartbeat_loop(Arc::clone(shared), Arc::clone(&entry)));
    }
    let handle = ReverseHandle {
        entry: Arc::clone(&entry),
    };
    (entry, handle)
}

/// Resolves when the entry is switched off (at once if it is off).
async fn disabled(entry: &Entry) {
    let mut rx = entry.enabled.subscribe();
    let _ = rx.wait_for(|on| !*on).await;
}

/// Dial, serve, redial: the entry's life, until shutdown.
async fn supervise(shared: Arc<Shared>, entry: Arc<Entry>) {
    let mut enabled = entry.enabled.subscribe();
    loop {
        // Switched off, killed or hung: nothing dials until that changes.
        let Some(process) = process::wait_running(&shared, &mut enabled).await else {
            return;
        };
        entry.status.send_modify(|s| s.dials += 1);
        let dialled = tokio::select! {
            // Killed or switched off mid-handshake: the attempt is abandoned.
            _ = process.cancelled() => continue,
            _ = disabled(&entry) => continue,
            dialled = dial(&shared, &entry.cfg) => dialled,
        };
        match dialled {
            Ok(ws) => serve(&shared, &entry, ws, &process).await,
            Err(failure) => entry.fail(failure),
        }
        if process.is_cancelled() || !*entry.enabled.borrow() {
            // Restart and re-enable dial at once, without the interval.
            continue;
        }
        tokio::select! {
            _ = shared.shut_down() => return,
            _ = process.cancelled() => {}
            _ = disabled(&entry) => {}
            _ = tokio::time::sleep(entry.cfg.reconnect_interval) => {}
        }
    }
}

/// Serve one open connection until the peer ends it, the entry is switched off (Close with
/// no code) or the process is killed (dropped, no Close).
async fn serve(shared: &Shared, entry: &Entry, mut ws: Ws, process: &CancellationToken) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    if entry.cfg.role.events() {
        let connect = frames::lifecycle(shared.self_id, "connect");
        let _ = tx.send(Out::Frame(Utf8Bytes::from(connect)));
    }
    {
        let mut conn = lock(&entry.conn);
        if !*entry.enabled.borrow() {
            // Switched off while the upgrade completed: NapCat aborts, no Close frame.
            return;
        }
        *conn = Some(tx);
    }
    entry.status.send_modify(|s| {
        s.handshakes += 1;
        s.connected = true;
    });
    let observe = |msg: &Message| entry.record(msg);
    let role = Role {
        api: entry.cfg.role.answers().then_some(Flavor::ReverseWs),
        observe: Some(&observe),
    };
    // Biased: a kill that also ends a hang must not let one more frame out.
    tokio::select! {
        biased;
        _ = process.cancelled() => {}
        _ = session::run(shared, &mut ws, &mut rx, role) => {}
    }
    lock(&entry.conn).take();
    entry.status.send_modify(|s| s.connected = false);
}

/// Connect and upgrade within the handshake timeout.
async fn dial(shared: &Shared, cfg: &ReverseConfig) -> Result<Ws, DialFailure> {
    let attempt = async {
        let request = request(shared, cfg)?;
        let uri = request.uri();
        if uri.scheme_str() != Some("ws") {
            return Err(DialFailure::Error(format!(
                "unsupported URL (ws:// only): {}",
                cfg.url
            )));
        }
        let host = uri
            .host()
            .ok_or_else(|| DialFailure::Error(format!("no host in {}", cfg.url)))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(80);
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| DialFailure::Error(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        match tokio_tungstenite::client_async(request, tcp).await {
            Ok((ws, _response)) => Ok(ws),
            Err(tungstenite::Error::Http(response)) => {
                Err(DialFailure::Refused(response.status().as_u16()))
            }
            Err(e) => Err(DialFailure::Error(e.to_string())),
        }
    };
    match tokio::time::timeout(cfg.handshake_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(DialFailure::Timeout),
    }
}

/// The upgrade request with the backend's headers.
fn request(
    shared: &Shared,
    cfg: &ReverseConfig,
) -> Result<tungstenite::handshake::client::Request, DialFailure> {
    let bad = |e: &dyn std::fmt::Display| DialFailure::Error(e.to_string());
    let mut request = cfg
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| bad(&e))?;
    let headers = request.headers_mut();
    headers.insert("X-Self-ID", HeaderValue::from(shared.self_id));
    let authorization = match cfg.auth {
        ReverseAuth::Bearer => Some(format!("Bearer {}", cfg.token)),
        ReverseAuth::BearerIfSet if !cfg.token.is_empty() => Some(format!("Bearer {}", cfg.token)),
        ReverseAuth::Token if !cfg.token.is_empty() => Some(format!("Token {}", cfg.token)),
        _ => None,
    };
    if let Some(value) = authorization {
        let value = HeaderValue::from_str(&value).map_err(|e| bad(&e))?;
        headers.insert("Authorization", value);
    }
    let role = cfg.role_header.as_deref().unwrap_or(cfg.role.header());
    headers.insert(
        "X-Client-Role",
        HeaderValue::from_str(role).map_err(|e| bad(&e))?,
    );
    headers.insert(
        "User-Agent",
        HeaderValue::from_str(&cfg.user_agent).map_err(|e| bad(&e))?,
    );
    Ok(request)
}

/// The entry's heartbeat timer: started when the entry is enabled (or the process
/// restarts), not per connection; a tick with no open connection sends nothing.
async fn heartbeat_loop(shared: Arc<Shared>, entry: Arc<Entry>) {
    let mut enabled = entry.enabled.subscribe();
    let mut interval_rx = entry.heartbeat.subscribe();
    loop {
        let Some(process) = process::wait_running(&shared, &mut enabled).await else {
            return;
        };
        let period = (*interval_rx.borrow_and_update()).filter(|d| !d.is_zero());
        let Some(period) = period else {
            tokio::select! {
                _ = shared.shut_down() => return,
                _ = process.cancelled() => {}
                _ = enabled.changed() => {}
                _ = interval_rx.changed() => {}
            }
            continue;
        };
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shared.shut_down() => return,
                _ = process.cancelled() => break,
                _ = enabled.changed() => break,
                _ = interval_rx.changed() => break,
                _ = ticker.tick() => {
                    if !shared.is_hung() {
                        entry.broadcast(&Utf8Bytes::from(shared.heartbeat_frame(period)));
                    }
                }
            }
        }
    }
}
