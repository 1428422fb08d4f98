//! NapCat simulator: one fake NapCatQQ process (OneBot v11) with NapCat's network entries
//! and failure modes.
//!
//! It is the one backend the project uses for the proxy's integration tests, the benchmarks
//! and `lifeguard demo`. Like NapCat's `network` config, one process has several entries,
//! and every event ([`NapSim::emit`], [`NapSim::emit_message`], [`NapSim::kick`],
//! heartbeats) goes to each enabled one; API calls get the same answers on every transport:
//!
//! - the forward WebSocket server (`websocketServers`, always started, [`NapSim::url`]):
//!   `/api` and `/api/` (query ignored) are API-only, every other path is universal (the
//!   lifecycle `connect` first, then events, heartbeats from one timer per server, API
//!   calls answered with the request's `echo` byte for byte); a wrong or missing token does
//!   not fail the upgrade: a retcode 1403 frame, then a Close frame without a code;
//! - reverse WebSocket entries (`websocketClients`, [`NapSim::add_reverse`]): dial out with
//!   NapCat's headers, redial after a fixed interval;
//! - the HTTP API server (`httpServers`, [`NapSim::start_http`]);
//! - HTTP POST entries (`httpClients`, [`NapSim::add_post`]).
//!
//! Failure modes: [`NapSim::disable_3110`] (orphaned sockets), [`NapSim::disable_v4`]
//! (Close without a code), per-entry disable ([`ReverseHandle::disable`],
//! [`NapSim::disable_http`], [`PostHandle::disable`]), [`NapSim::kill`] (process exit:
//! everything dropped without a goodbye until [`NapSim::enable`] restarts it),
//! [`NapSim::hang`] (nothing moves), [`NapSim::set_online`] and [`NapSim::kick`] (QQ logged
//! out).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use lifeguard::sim::{NapSim, SimConfig};
//! let sim = NapSim::start(SimConfig::default()).await?;
//! println!("backend at {}", sim.url());
//! sim.emit_message(1);
//! sim.disable_3110();
//! sim.shutdown().await;
//! # Ok(()) }
//! ```

mod api;
mod forward;
mod frames;
mod http_client;
mod http_server;
mod process;
mod query;
mod reverse;
mod session;

pub use http_client::{PostConfig, PostHandle, PostOutcome, PostStatus, QuickOperation};
pub use http_server::{HttpRequestRecord, HttpServerConfig};
pub use reverse::{
    DialFailure, PeerFrame, ReverseAuth, ReverseConfig, ReverseHandle, ReverseRole, ReverseStatus,
    DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_RECONNECT_INTERVAL, LLONEBOT_RECONNECT_INTERVAL,
};

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::DropGuard;

use forward::Server;
use process::{lock, Shared};
use session::Out;

/// The QQ number the simulated bot is logged in as, unless configured otherwise.
pub const DEFAULT_SELF_ID: u64 = 3889001234;
/// NapCat's default `heartInterval`.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);

/// Real-shaped frames a NapCat backend sends (meta events, messages, notices, a request,
/// API replies), one JSON text per line; copied from the project's reference samples.
const SAMPLE_FRAMES: &str = include_str!("samples.jsonl");

/// Sample frames as NapCat sends them (lifecycle, heartbeat, group and private messages, a
/// notice, a friend request, API replies), for demos and tests that want variety. Their
/// `self_id` is [`DEFAULT_SELF_ID`].
pub fn sample_frames() -> impl Iterator<Item = &'static str> {
    SAMPLE_FRAMES.lines().filter(|l| !l.trim().is_empty())
}

/// How to start a [`NapSim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// The bot's QQ number: `self_id` of every event, `user_id` of `get_login_info`.
    pub self_id: u64,
    /// Heartbeat period (also the `interval` field, in ms); `None` sends no heartbeats.
    pub heartbeat_interval: Option<Duration>,
    /// Access token clients must present (`Authorization: Bearer T` or `?access_token=T`);
    /// `None` (or empty) accepts everyone.
    pub token: Option<String>,
    /// QQ login state: `status.online` in heartbeats and `online` in `get_status`.
    pub online: bool,
}

impl Default for SimConfig {
    /// NapCat's defaults: self id [`DEFAULT_SELF_ID`], 30 s heartbeats, no token, online.
    fn default() -> Self {
        SimConfig {
            self_id: DEFAULT_SELF_ID,
            heartbeat_interval: Some(DEFAULT_HEARTBEAT_INTERVAL),
            token: None,
            online: true,
        }
    }
}

impl SimConfig {
    /// This config with `self_id` set.
    pub fn with_self_id(mut self, self_id: u64) -> Self {
        self.self_id = self_id;
        self
    }

    /// This config with the heartbeat period set (`None`: no heartbeats).
    pub fn with_heartbeat_interval(mut self, interval: Option<Duration>) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// This config with an access token required.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// This config with the QQ login state set.
    pub fn with_online(mut self, online: bool) -> Self {
        self.online = online;
        self
    }
}

/// What the handle controls; shared by its clones.
struct Inner {
    /// Process state every task reads.
    shared: Arc<Shared>,
    /// The forward server's address (port 0 resolved), reused by `enable()`.
    addr: SocketAddr,
    /// The enabled forward WebSocket server; `None` while disabled, killed or shut down.
    forward: Mutex<Option<Arc<Server>>>,
    /// Reverse WebSocket entries, enabled or not.
    reverse: Mutex<Vec<Arc<reverse::Entry>>>,
    /// The HTTP API server, once started.
    http: Mutex<Option<Arc<http_server::HttpServer>>>,
    /// HTTP POST entries, enabled or not.
    posts: Mutex<Vec<Arc<http_client::Entry>>>,
}

impl Inner {
    /// The enabled forward server, unless the process is hung (a hung process emits
    /// nothing).
    fn live_forward(&self) -> Option<Arc<Server>> {
        if self.shared.is_hung() {
            None
        } else {
            lock(&self.forward).clone()
        }
    }
}

/// A running NapCat simulator. Cheap to clone; all clones control the same simulator, and
/// dropping the last one stops it (call [`NapSim::shutdown`] to also wait for its tasks).
#[derive(Clone)]
pub struct NapSim {
    /// Everything the handle controls.
    inner: Arc<Inner>,
    /// Cancels everything when the last handle goes away.
    _guard: Arc<DropGuard>,
}

impl fmt::Debug for NapSim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NapSim")
            .field("addr", &self.inner.addr)
            .field("self_id", &self.inner.shared.self_id)
            .field("open_connections", &self.open_connections())
            .finish()
    }
}

impl NapSim {
    /// Start on `127.0.0.1` with an OS-chosen port.
    pub async fn start(cfg: SimConfig) -> io::Result<NapSim> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), cfg).await
    }

    /// Start listening on `addr` (port 0: OS-chosen), enabled.
    pub async fn start_on(addr: SocketAddr, cfg: SimConfig) -> io::Result<NapSim> {
        let listener = process::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(
            cfg.self_id,
            cfg.token,
            cfg.online,
            cfg.heartbeat_interval,
        ));
        let guard = shared.shutdown.clone().drop_guard();
        let process = shared.restart();
        let server = Server::start(&shared, listener, &process);
        let inner = Arc::new(Inner {
            shared,
            addr,
            forward: Mutex::new(Some(server)),
            reverse: Mutex::new(Vec::new()),
            http: Mutex::new(None),
            posts: Mutex::new(Vec::new()),
        });
        Ok(NapSim {
            inner,
            _guard: Arc::new(guard),
        })
    }

    /// The address the simulator listens on (the same after `enable()`).
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `ws://HOST:PORT` to connect to (loopback if bound to an unspecified address).
    pub fn url(&self) -> String {
        let mut addr = self.inner.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        format!("ws://{addr}")
    }

    /// The bot's QQ number (`self_id` of its events).
    pub fn self_id(&self) -> u64 {
        self.inner.shared.self_id
    }

    /// Send one raw text frame (an event) to every event consumer of the process: the
    /// forward server's non-`/api` clients, the open reverse connections that take events,
    /// and the enabled HTTP POST entries (one request each, fire and forget). Returns how
    /// many got it (0 while killed or hung; events emitted then are lost, as in a stuck
    /// NapCat). Like NapCat, a frame is queued without limit for a WebSocket peer that does
    /// not read.
    pub fn emit(&self, frame: impl Into<String>) -> usize {
        self.fan_out(frame.into(), false)
    }

    /// Deliver `frame` to every event consumer; a heartbeat skips POST entries that were
    /// not configured to POST heartbeats.
    fn fan_out(&self, frame: String, heartbeat: bool) -> usize {
        let inner = &self.inner;
        let Some(process) = inner.shared.live() else {
            return 0;
        };
        let frame = Utf8Bytes::from(frame);
        let posted = lock(&inner.posts)
            .iter()
            .filter(|entry| !heartbeat || entry.wants_heartbeats())
            .filter(|entry| entry.post(&inner.shared, frame.as_str(), &process))
            .count();
        let mut sent = match inner.live_forward() {
            Some(server) => server.broadcast(&frame),
            None => 0,
        };
        for entry in lock(&inner.reverse).iter() {
            sent += usize::from(entry.broadcast(&frame));
        }
        sent + posted
    }

    /// Emit the group message event [`NapSim::message_event`]`(seq)`; returns recipients.
    pub fn emit_message(&self, seq: u64) -> usize {
        self.emit(self.message_event(seq))
    }

    /// A realistic group message event (NapCat's fields and order, ~400 bytes) whose
    /// `message_id`, `message_seq`, `real_id` (and `real_seq`, a string) are `seq`. Its
    /// `time` is fixed at start-up, so the same `seq` always gives the same text.
    pub fn message_event(&self, seq: u64) -> String {
        self.inner.shared.template.build(seq)
    }

    /// Send a heartbeat now to every event consumer (as [`NapSim::emit`], but only to POST
    /// entries configured to POST heartbeats); returns recipients. Its `interval` is the
    /// forward server's (30000 when heartbeats are off).
    pub fn heartbeat_now(&self) -> usize {
        let shared = &self.inner.shared;
        let interval = (*shared.heartbeat.borrow()).unwrap_or(DEFAULT_HEARTBEAT_INTERVAL);
        self.fan_out(shared.heartbeat_frame(interval), true)
    }

    /// Set the QQ login state seen in the next heartbeats and `get_status` replies.
    pub fn set_online(&self, online: bool) {
        self.inner.shared.online.store(online, Ordering::Relaxed);
    }

    /// QQ kicked the account off: from now on heartbeats and `get_status` say offline, and
    /// the `bot_offline` notice ([`NapSim::bot_offline_event`]) goes at once to every event
    /// consumer (as [`NapSim::emit`], whose count it returns). The next heartbeat may come
    /// up to a heartbeat interval later, as in NapCat.
    pub fn kick(&self, tag: &str, message: &str) -> usize {
        self.set_online(false);
        self.emit(self.bot_offline_event(tag, message))
    }

    /// NapCat's `bot_offline` notice: `{"time":..,"self_id":..,"post_type":"notice",
    /// "notice_type":"bot_offline","user_id":<self_id>,"tag":..,"message":..}`.
    pub fn bot_offline_event(&self, tag: &str, message: &str) -> String {
        frames::bot_offline(self.inner.shared.self_id, tag, message)
    }

    /// Add a reverse WebSocket entry (NapCat's `websocketClients`): unless configured
    /// disabled, it dials `cfg.url` at once and keeps redialling as NapCat does, for the
    /// life of the simulator. Events from [`NapSim::emit`] and friends reach it while it is
    /// connected; API calls on it are answered like on the forward server.
    pub fn add_reverse(&self, cfg: ReverseConfig) -> ReverseHandle {
        let (entry, handle) = reverse::add(&self.inner.shared, cfg);
        lock(&self.inner.reverse).push(entry);
        handle
    }

    /// Change the heartbeat period (the timer restarts now); `None` stops heartbeats.
    pub fn set_heartbeat_interval(&self, d: Option<Duration>) {
        self.inner.shared.heartbeat.send_replace(d);
    }

    /// NapCat 3.1.10's bug: the listener stops (new TCP connects are refused), but open
    /// sockets stay open, still answer pings and API calls, and never get events or
    /// heartbeats again (not even after `enable()`). No disable event, no Close.
    pub fn disable_3110(&self) {
        let server = lock(&self.inner.forward).take();
        if let Some(server) = server {
            server.stop_listening();
            server.orphan_all();
        }
    }

    /// NapCat >= 3.1.11 / v4: the listener stops and every open socket is closed with a
    /// Close frame that has no status code (clients see 1005); no disable event.
    pub fn disable_v4(&self) {
        let server = lock(&self.inner.forward).take();
        if let Some(server) = server {
            server.stop_listening();
            server.close_all();
        }
    }

    /// Re-enable the forward server (or restart the whole process after `kill()`): listen
    /// again on the same port (SO_REUSEADDR) as a fresh server. Sockets orphaned by `disable_3110` stay orphaned. No-op if
    /// already enabled; an error after `shutdown()` or if the port was taken meanwhile.
    pub async fn enable(&self) -> io::Result<()> {
        let shared = &self.inner.shared;
        if shared.shutdown.is_cancelled() {
            return Err(io::Error::other("simulator shut down"));
        }
        let mut forward = lock(&self.inner.forward);
        let restarting = shared.process().is_none();
        let process = shared.restart();
        if restarting {
            let http = lock(&self.inner.http).clone();
            if let Some(http) = http.filter(|h| h.is_enabled()) {
                http.relisten(&process)?;
            }
        }
        if forward.is_none() {
            let listener = process::bind(self.inner.addr)?;
            *forward = Some(Server::start(shared, listener, &process));
        }
        Ok(())
    }

    /// Add an HTTP POST entry (NapCat's `httpClients`): every event from [`NapSim::emit`]
    /// and friends is POSTed to `cfg.url` while the entry is enabled and the process runs
    /// and is not hung; no heartbeats or lifecycle events unless configured.
    pub fn add_post(&self, cfg: PostConfig) -> PostHandle {
        let (entry, handle) = http_client::add(&self.inner.shared, cfg);
        lock(&self.inner.posts).push(entry);
        handle
    }

    /// Process killed: the listeners (forward and HTTP) are gone and every socket (orphans,
    /// reverse connections, HTTP connections, POSTs in flight) is dropped without a Close
    /// frame or a response; reverse and POST entries fall silent. `enable()` afterwards is a restart (of a process that is not hung: `kill()`
    /// also ends a `hang()`): the forward server listens again and enabled reverse entries
    /// dial at once, the HTTP server (unless switched off) listens again, POSTs resume.
    pub fn kill(&self) {
        let mut forward = lock(&self.inner.forward);
        if let Some(server) = forward.take() {
            server.stop_listening();
        }
        if let Some(http) = lock(&self.inner.http).as_ref() {
            http.stop_listening();
        }
        self.inner.shared.kill();
    }

    /// Start NapCat's HTTP API server (`httpServers`) on its own listener; returns its
    /// address. API calls are answered as on the WebSocket (same counters, same data), with
    /// NapCat's HTTP quirks (see [`HttpServerConfig`] and the module docs). One per
    /// simulator: a second call is an error.
    pub async fn start_http(&self, cfg: HttpServerConfig) -> io::Result<SocketAddr> {
        let mut http = lock(&self.inner.http);
        if http.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the HTTP server is already started",
            ));
        }
        let process = self
            .inner
            .shared
            .process()
            .ok_or_else(|| io::Error::other("simulator killed or shut down"))?;
        let server = http_server::HttpServer::start(&self.inner.shared, cfg, &process)?;
        let addr = server.addr;
        *http = Some(server);
        Ok(addr)
    }

    /// The HTTP API server's address, once started.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        lock(&self.inner.http).as_ref().map(|h| h.addr)
    }

    /// `http://HOST:PORT` of the HTTP API server, once started.
    pub fn http_url(&self) -> Option<String> {
        self.http_addr().map(|a| format!("http://{a}"))
    }

    /// Hot reload switched the HTTP server off: its listener closes (new connects are
    /// refused), but kept-alive connections stay open and every request on them gets HTTP
    /// 200 `{"status":"failed","retcode":200,...,"message":"Server is closed",...}` (after
    /// the token check, as in NapCat).
    pub fn disable_http(&self) {
        if let Some(http) = lock(&self.inner.http).as_ref() {
            http.disable();
        }
    }

    /// Switch the HTTP server on again, on the same port; kept-alive connections answer
    /// normally again. An error if it was never started, the process is killed or the port
    /// was taken meanwhile.
    pub async fn enable_http(&self) -> io::Result<()> {
        let http = lock(&self.inner.http).clone();
        let http = http.ok_or_else(|| io::Error::other("the HTTP server was never started"))?;
        let process = self
            .inner
            .shared
            .process()
            .ok_or_else(|| io::Error::other("simulator killed or shut down"))?;
        http.relisten(&process)
    }

    /// Requests that reached the HTTP server with `action` as their first path segment
    /// (answered or not, authorised or not).
    pub fn http_requests_on(&self, action: &str) -> u64 {
        lock(&self.inner.http)
            .as_ref()
            .map_or(0, |h| h.count(action))
    }

    /// Every request that reached the HTTP server (the last few thousand), oldest first,
    /// with the credentials it carried: a test can prove a client's token never got here.
    pub fn http_requests(&self) -> Vec<HttpRequestRecord> {
        lock(&self.inner.http)
            .as_ref()
            .map(|h| h.records())
            .unwrap_or_default()
    }

    /// Process hung: the port stays bound and TCP connects succeed, but no WebSocket
    /// handshake completes; open sockets (reverse ones too) stop reading and writing
    /// entirely (no pong, no API reply, no events, no heartbeats); reverse entries do not
    /// redial; the HTTP server accepts connections but answers nothing; nothing is POSTed.
    /// Events emitted meanwhile are lost.
    pub fn hang(&self) {
        self.inner.shared.hung.send_replace(true);
    }

    /// End a `hang()`: pending handshakes complete, requests sent meanwhile are answered.
    pub fn unhang(&self) {
        self.inner.shared.hung.send_replace(false);
    }

    /// WebSocket connections currently open (orphans included).
    pub fn open_connections(&self) -> usize {
        self.inner.shared.open.load(Ordering::Relaxed)
    }

    /// WebSocket handshakes completed so far (probes and rejected tokens included).
    pub fn handshakes(&self) -> u64 {
        self.inner.shared.handshakes()
    }

    /// WebSocket handshakes completed on exactly `path` (query stripped): `"/api"`,
    /// `"/event"`, `"/"`, ...
    pub fn handshakes_on(&self, path: &str) -> u64 {
        self.inner.shared.handshakes_on(path)
    }

    /// Benchmark helper: send `n` message events as fast as possible to every WebSocket
    /// event consumer (forward clients and open reverse connections; not POST entries);
    /// resolves when all were written to the sockets, with the
    /// number of clients that got all of them.
    ///
    /// The events are [`NapSim::message_event`]`(seq)` with `seq` counting up from 1 across
    /// all blasts of this simulator. Each event is serialised once for all clients; clients
    /// get them in batches of 256, fed and flushed once, with at most a few batches in
    /// flight. A client that does not read holds the blast up (like a full socket would),
    /// until it disconnects or the simulator is killed or shut down.
    pub async fn blast(&self, n: u64) -> usize {
        const CHUNK: u64 = 256;
        const IN_FLIGHT: usize = 4;
        let shared = &self.inner.shared;
        if shared.live().is_none() {
            return 0;
        }
        let mut senders = self
            .inner
            .live_forward()
            .map(|server| server.event_senders())
            .unwrap_or_default();
        senders.extend(
            lock(&self.inner.reverse)
                .iter()
                .filter_map(|e| e.event_sender()),
        );
        if senders.is_empty() {
            return 0;
        }
        let first = shared.next_blast_seq.fetch_add(n, Ordering::Relaxed);
        let mut alive = vec![true; senders.len()];
        let mut pending: VecDeque<Vec<(usize, oneshot::Receiver<()>)>> = VecDeque::new();
        let mut text = String::new();
        let mut done = 0;
        let work = async {
            while done < n || !pending.is_empty() {
                if done < n && pending.len() < IN_FLIGHT {
                    let count = CHUNK.min(n - done);
                    let batch: Arc<[Utf8Bytes]> = (first + done..first + done + count)
                        .map(|seq| {
                            text.clear();
                            shared.template.write(seq, &mut text);
                            Utf8Bytes::from(text.as_str())
                        })
                        .collect();
                    done += count;
                    let mut acks = Vec::with_capacity(senders.len());
                    for (i, tx) in senders.iter().enumerate() {
                        if !alive[i] {
                            continue;
                        }
                        let (ack, acked) = oneshot::channel();
                        if tx.send(Out::Batch(Arc::clone(&batch))).is_ok()
                            && tx.send(Out::Barrier(ack)).is_ok()
                        {
                            acks.push((i, acked));
                        } else {
                            alive[i] = false;
                        }
                    }
                    pending.push_back(acks);
                } else if let Some(acks) = pending.pop_front() {
                    for (i, acked) in acks {
                        if acked.await.is_err() {
                            alive[i] = false;
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = shared.shutdown.cancelled() => return 0,
            _ = work => {}
        }
        alive.iter().filter(|a| **a).count()
    }

    /// Stop everything: the listener, every connection (dropped, no Close frame), every
    /// task; resolves when all tasks have ended. Later `enable()` calls fail.
    pub async fn shutdown(&self) {
        let shared = &self.inner.shared;
        shared.shutdown.cancel();
        let server = lock(&self.inner.forward).take();
        if let Some(server) = server {
            server.stop_listening();
        }
        if let Some(http) = lock(&self.inner.http).as_ref() {
            http.stop_listening();
        }
        shared.tracker.close();
        shared.tracker.wait().await;
    }
}
