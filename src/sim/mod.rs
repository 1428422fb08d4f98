//! NapCat simulator: a fake OneBot v11 forward-WebSocket backend that behaves like NapCatQQ,
//! including its failure modes.
//!
//! It is the one backend the project uses for the proxy's integration tests, the benchmarks
//! and `lifeguard demo`. What it does, as NapCat does it:
//!
//! - `/api` and `/api/` (query ignored) are API-only; every other path is universal: the
//!   lifecycle `connect` event first, then events and heartbeats, and API calls answered.
//! - One heartbeat timer per server, sent to event clients only.
//! - API replies carry the request's `echo` byte for byte (any JSON type).
//! - A wrong or missing token does not fail the upgrade: a retcode 1403 frame, then a Close
//!   frame without a code.
//! - Failure modes: [`NapSim::disable_3110`] (orphaned sockets), [`NapSim::disable_v4`]
//!   (Close without a code), [`NapSim::kill`] (no Close at all), [`NapSim::hang`] (nothing
//!   moves, handshakes never finish).
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
mod conn;
mod frames;
mod server;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use server::{Out, Server};

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

/// State shared by the handle and every task of one simulator.
pub(crate) struct Shared {
    /// `self_id` of every event.
    pub(crate) self_id: u64,
    /// Required access token, if any.
    pub(crate) token: Option<String>,
    /// QQ login state for heartbeats and `get_status`.
    pub(crate) online: AtomicBool,
    /// Heartbeat period; heartbeat timers watch it and restart on change.
    pub(crate) heartbeat: watch::Sender<Option<Duration>>,
    /// Process hung: connections neither read nor write, handshakes do not proceed.
    pub(crate) hung: watch::Sender<bool>,
    /// The bound address (port 0 resolved), reused by `enable()`.
    addr: SocketAddr,
    /// The `emit_message` event, pre-split around its sequence numbers.
    template: frames::MessageTemplate,
    /// `message_id` of the next `send_msg` reply.
    pub(crate) next_message_id: AtomicU64,
    /// Sequence number of the next `blast` event.
    next_blast_seq: AtomicU64,
    /// Connection ids, to detach a closed connection from its server.
    pub(crate) next_conn_id: AtomicU64,
    /// WebSocket handshakes completed.
    handshakes: AtomicU64,
    /// ... per request path (query stripped).
    handshakes_by_path: Mutex<HashMap<String, u64>>,
    /// WebSocket connections currently open.
    pub(crate) open: AtomicUsize,
    /// The current server and the token `kill()` cancels.
    state: Mutex<State>,
    /// Cancelled by `shutdown()` (or by dropping the last handle): ends every task.
    shutdown: CancellationToken,
    /// Every task the simulator spawned, awaited by `shutdown()`.
    pub(crate) tracker: TaskTracker,
}

/// What `disable_*`, `enable`, and `kill` change.
struct State {
    /// The enabled server; `None` while disabled, killed or shut down.
    server: Option<Arc<Server>>,
    /// The "process": `kill()` cancels it, dropping every connection accepted under it,
    /// and starts a new one.
    process: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// True while `hang()` is in effect.
    pub(crate) fn is_hung(&self) -> bool {
        *self.hung.borrow()
    }

    /// Resolves once the simulator is not hung.
    pub(crate) async fn wait_unhung(&self) {
        let mut rx = self.hung.subscribe();
        let _ = rx.wait_for(|hung| !*hung).await;
    }

    /// Record a completed WebSocket handshake on `path`.
    pub(crate) fn count_handshake(&self, path: &str) {
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        *lock(&self.handshakes_by_path)
            .entry(path.to_owned())
            .or_insert(0) += 1;
    }

    /// The enabled server, if any.
    fn server(&self) -> Option<Arc<Server>> {
        lock(&self.state).server.clone()
    }

    /// The enabled server, unless the simulator is hung (a hung process emits nothing).
    fn live_server(&self) -> Option<Arc<Server>> {
        if self.is_hung() {
            None
        } else {
            self.server()
        }
    }
}

/// A running NapCat simulator. Cheap to clone; all clones control the same simulator, and
/// dropping the last one stops it (call [`NapSim::shutdown`] to also wait for its tasks).
#[derive(Clone)]
pub struct NapSim {
    /// Everything the tasks share.
    shared: Arc<Shared>,
    /// Cancels everything when the last handle goes away.
    _guard: Arc<DropGuard>,
}

impl fmt::Debug for NapSim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NapSim")
            .field("addr", &self.shared.addr)
            .field("self_id", &self.shared.self_id)
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
        let listener = server::bind(addr)?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let process = shutdown.child_token();
        let shared = Arc::new(Shared {
            self_id: cfg.self_id,
            token: cfg.token.filter(|t| !t.is_empty()),
            online: AtomicBool::new(cfg.online),
            heartbeat: watch::Sender::new(cfg.heartbeat_interval),
            hung: watch::Sender::new(false),
            addr,
            template: frames::MessageTemplate::new(cfg.self_id, frames::now_secs()),
            next_message_id: AtomicU64::new(1),
            next_blast_seq: AtomicU64::new(1),
            next_conn_id: AtomicU64::new(1),
            handshakes: AtomicU64::new(0),
            handshakes_by_path: Mutex::new(HashMap::new()),
            open: AtomicUsize::new(0),
            state: Mutex::new(State {
                server: None,
                process: process.clone(),
            }),
            shutdown: shutdown.clone(),
            tracker: TaskTracker::new(),
        });
        let server = Server::start(&shared, listener, &process);
        lock(&shared.state).server = Some(server);
        Ok(NapSim {
            shared,
            _guard: Arc::new(shutdown.drop_guard()),
        })
    }

    /// The address the simulator listens on (the same after `enable()`).
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `ws://HOST:PORT` to connect to (loopback if bound to an unspecified address).
    pub fn url(&self) -> String {
        let mut addr = self.shared.addr;
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
        self.shared.self_id
    }

    /// Send one raw text frame to every event (non-`/api`) client of the current server;
    /// returns how many got it (0 while disabled, killed or hung). Like NapCat, the frame
    /// is queued without limit for a client that does not read.
    pub fn emit(&self, frame: impl Into<String>) -> usize {
        match self.shared.live_server() {
            Some(server) => server.broadcast(&Utf8Bytes::from(frame.into())),
            None => 0,
        }
    }

    /// Emit the group message event [`NapSim::message_event`]`(seq)`; returns recipients.
    pub fn emit_message(&self, seq: u64) -> usize {
        self.emit(self.message_event(seq))
    }

    /// A realistic group message event (NapCat's fields and order, ~400 bytes) whose
    /// `message_id`, `message_seq`, `real_id` (and `real_seq`, a string) are `seq`. Its
    /// `time` is fixed at start-up, so the same `seq` always gives the same text.
    pub fn message_event(&self, seq: u64) -> String {
        self.shared.template.build(seq)
    }

    /// Send a heartbeat now to every event client; returns recipients. Its `interval` is
    /// the configured one (30000 when heartbeats are off).
    pub fn heartbeat_now(&self) -> usize {
        let interval = (*self.shared.heartbeat.borrow()).unwrap_or(DEFAULT_HEARTBEAT_INTERVAL);
        let frame = frames::heartbeat(
            self.shared.self_id,
            self.shared.online.load(Ordering::Relaxed),
            server::millis(interval),
        );
        self.emit(frame)
    }

    /// Set the QQ login state seen in the next heartbeats and `get_status` replies.
    pub fn set_online(&self, online: bool) {
        self.shared.online.store(online, Ordering::Relaxed);
    }

    /// Change the heartbeat period (the timer restarts now); `None` stops heartbeats.
    pub fn set_heartbeat_interval(&self, d: Option<Duration>) {
        self.shared.heartbeat.send_replace(d);
    }

    /// NapCat 3.1.10's bug: the listener stops (new TCP connects are refused), but open
    /// sockets stay open, still answer pings and API calls, and never get events or
    /// heartbeats again (not even after `enable()`). No disable event, no Close.
    pub fn disable_3110(&self) {
        let server = lock(&self.shared.state).server.take();
        if let Some(server) = server {
            server.stop_listening();
            server.orphan_all();
        }
    }

    /// NapCat >= 3.1.11 / v4: the listener stops and every open socket is closed with a
    /// Close frame that has no status code (clients see 1005); no disable event.
    pub fn disable_v4(&self) {
        let server = lock(&self.shared.state).server.take();
        if let Some(server) = server {
            server.stop_listening();
            server.close_all();
        }
    }

    /// Re-enable (or restart after `kill()`): listen again on the same port (SO_REUSEADDR)
    /// as a fresh server. Sockets orphaned by `disable_3110` stay orphaned. No-op if
    /// already enabled; an error after `shutdown()` or if the port was taken meanwhile.
    pub async fn enable(&self) -> io::Result<()> {
        if self.shared.shutdown.is_cancelled() {
            return Err(io::Error::other("simulator shut down"));
        }
        let mut state = lock(&self.shared.state);
        if state.server.is_some() {
            return Ok(());
        }
        let listener = server::bind(self.shared.addr)?;
        state.server = Some(Server::start(&self.shared, listener, &state.process));
        Ok(())
    }

    /// Process killed: the listener is gone and every socket (orphans included) is dropped
    /// without a Close frame. `enable()` afterwards is a restart (of a process that is not
    /// hung: `kill()` also ends a `hang()`).
    pub fn kill(&self) {
        let mut state = lock(&self.shared.state);
        if let Some(server) = state.server.take() {
            server.stop_listening();
        }
        state.process.cancel();
        state.process = self.shared.shutdown.child_token();
        drop(state);
        self.shared.hung.send_replace(false);
    }

    /// Process hung: the port stays bound and TCP connects succeed, but no WebSocket
    /// handshake completes; open sockets stop reading and writing entirely (no pong, no API
    /// reply, no events, no heartbeats). Events emitted meanwhile are lost.
    pub fn hang(&self) {
        self.shared.hung.send_replace(true);
    }

    /// End a `hang()`: pending handshakes complete, requests sent meanwhile are answered.
    pub fn unhang(&self) {
        self.shared.hung.send_replace(false);
    }

    /// WebSocket connections currently open (orphans included).
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// WebSocket handshakes completed so far (probes and rejected tokens included).
    pub fn handshakes(&self) -> u64 {
        self.shared.handshakes.load(Ordering::Relaxed)
    }

    /// WebSocket handshakes completed on exactly `path` (query stripped): `"/api"`,
    /// `"/event"`, `"/"`, ...
    pub fn handshakes_on(&self, path: &str) -> u64 {
        lock(&self.shared.handshakes_by_path)
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Benchmark helper: send `n` message events as fast as possible to every event client
    /// of the current server; resolves when all were written to the sockets, with the
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
        let Some(server) = self.shared.live_server() else {
            return 0;
        };
        let senders = server.event_senders();
        if senders.is_empty() {
            return 0;
        }
        let first = self.shared.next_blast_seq.fetch_add(n, Ordering::Relaxed);
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
                            self.shared.template.write(seq, &mut text);
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
            _ = self.shared.shutdown.cancelled() => return 0,
            _ = work => {}
        }
        alive.iter().filter(|a| **a).count()
    }

    /// Stop everything: the listener, every connection (dropped, no Close frame), every
    /// task; resolves when all tasks have ended. Later `enable()` calls fail.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        let server = lock(&self.shared.state).server.take();
        if let Some(server) = server {
            server.stop_listening();
        }
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
    }
}
