//! One reverse session: a backend connection (lifeguard is its WebSocket server) and the
//! bot connections lifeguard dialled for it (lifeguard is their client), relayed message by
//! message in one task.
//!
//! - One bot URL: every message goes through as it is, both ways.
//! - Several: every event goes to every bot; an API call's `echo` is replaced by one
//!   lifeguard can route ([`EchoRoutes`]), and the reply goes back only to the bot that
//!   asked, with its own echo restored. A bot that is missing is redialled with backoff and
//!   jitter, and gets the backend's `connect` first when it joins; a bot whose queue
//!   overflows is closed alone.
//!
//! The session's own health: its socket, its heartbeats (a watchdog), its account state
//! (`status.online` in heartbeats, the `bot_offline` notice). While the account is offline
//! the bots are told and closed but the backend connection is kept: lifeguard asks
//! `get_status` over it and dials the bots again once the account is back. The operator's
//! intent (admin API, config files, shutdown) comes from the reverse lane.
//!
//! Every bot connection is a session of the reverse lane: it ends through
//! [`policy`](crate::transport::policy) (what the backend sent, `disable`, a Close with a
//! code and a reason, a closed socket, one log line), in a task of its own so that a slow
//! bot never holds up the others.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use futures_util::{FutureExt, Sink, Stream, StreamExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Sleep;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::bots::{self, BotWs, EchoRoutes, Hello};
use crate::config::ReverseUrl;
use crate::proto::auth;
use crate::proto::dial::ConnectError;
use crate::proto::onebot::{self, Kind, Role};
use crate::proto::ws;
use crate::state::{BackendGuard, Cause, Health, Lane, SessionGuard, Snapshot, State};
use crate::transport::policy::{self, End, Outcome, SessionInfo, Traffic};
use crate::transport::ws::watch::{StateWatch, TokenWatch};

/// The backend's connection: lifeguard is the WebSocket server.
pub type BackendWs = WebSocketStream<TcpStream>;

/// Most bytes queued for one bot. With several bots, one that overflows it is closed
/// alone; with one, reading the backend pauses instead (the backend buffers).
pub const BOT_QUEUE_LIMIT: usize = 4 * 1024 * 1024;
/// Most bytes queued for the backend before reading the bots pauses.
const BACKEND_QUEUE_LIMIT: usize = 4 * 1024 * 1024;
/// Planned disables: how long replies to API calls already forwarded may take.
const REPLY_GRACE: Duration = Duration::from_millis(500);
/// Longest a session waits for the others' Close frames in a mass disable.
const SWEEP_WAIT: Duration = Duration::from_millis(250);
/// Prefix of the echo of lifeguard's own `get_status` calls while the account is offline.
const STATUS_ECHO: &str = "lifeguard-status-";
const FAR: Duration = Duration::from_secs(30 * 86400);
/// Events handled per wake-up before yielding to other tasks.
const EVENTS_PER_WAKE: usize = 64;

/// Everything a session starts with, from the handshake.
pub struct Setup {
    pub state: Arc<State>,
    pub backend: BackendWs,
    pub peer: SocketAddr,
    pub hello: Hello,
    pub role: Role,
    /// What the backend presented (re-checked when the access token changes).
    pub credential: Option<Box<[u8]>>,
    pub registration: BackendGuard,
    /// The bot URLs in force at the handshake, one slot each.
    pub urls: Vec<Arc<ReverseUrl>>,
    /// The bots that accepted at the handshake, by slot.
    pub bots: Vec<(usize, BotWs)>,
    /// Dials still under way when the handshake was answered, by slot.
    pub pending: Vec<(usize, DialFuture)>,
}

/// Why the backend connection ends.
#[derive(Debug)]
enum BackendEnd {
    /// The reverse lane went down (operator, config files, shutdown), or the bot URLs
    /// changed.
    Down(Arc<Health>),
    /// A newer connection for the same self id took over.
    Replaced,
    Closed(Option<u16>),
    Lost(String),
    HeartbeatTimeout(Duration),
    /// No bot is behind the backend connection any more.
    BotsGone(String),
    Revoked,
    /// The drain budget is spent: drop everything.
    HardStop,
}

impl BackendEnd {
    fn cause(&self) -> &'static str {
        match self {
            BackendEnd::Down(h) => h.cause.as_str(),
            BackendEnd::Replaced => "replaced",
            BackendEnd::Closed(_) => "upstream-closed",
            BackendEnd::Lost(_) => "upstream-lost",
            BackendEnd::HeartbeatTimeout(_) => "heartbeat-timeout",
            BackendEnd::BotsGone(_) => "bot-gone",
            BackendEnd::Revoked => "token-revoked",
            BackendEnd::HardStop => "hard-stop",
        }
    }
}

/// One bot connection.
struct Leg {
    /// Unique within the session (replies are routed to it).
    id: u64,
    slot: usize,
    ws: BotWs,
    queue: VecDeque<Message>,
    queued: usize,
    flush: bool,
    guard: SessionGuard,
    info: SessionInfo,
    started: Instant,
    traffic: Traffic,
    /// The backend's `connect` went (or is queued) to it.
    saw_connect: bool,
}

/// A bot URL and, while it has no connection, its redial.
struct Slot {
    url: Arc<ReverseUrl>,
    dialing: Option<DialFuture>,
    retry: Option<Pin<Box<Sleep>>>,
    attempt: u32,
    /// The last dial's error, for the reason when every bot is gone.
    last_error: Option<String>,
}

pub type DialFuture = Pin<Box<dyn Future<Output = Result<BotWs, ConnectError>> + Send>>;

/// What woke the session.
enum Ev {
    State(Arc<Snapshot>),
    StateGone,
    Replaced,
    Backend(Option<Result<Message, tungstenite::Error>>),
    BackendWrite(String),
    Bot(usize, Option<Result<Message, tungstenite::Error>>),
    BotWrite(usize, String),
    Dialled(usize, Box<Result<BotWs, ConnectError>>),
    Redial(usize),
    Watchdog,
    StatusTick,
}

pub struct Session {
    state: Arc<State>,
    backend: BackendWs,
    peer: SocketAddr,
    hello: Hello,
    role: Role,
    credential: Option<Box<[u8]>>,
    reg: BackendGuard,
    self_id: Option<u64>,
    multi: bool,
    slots: Vec<Slot>,
    legs: Vec<Leg>,
    next_leg: u64,
    routes: EchoRoutes,
    to_backend: VecDeque<Message>,
    to_backend_bytes: usize,
    backend_flush: bool,
    /// The backend's `connect` event, for bots that join later.
    connect: Option<Message>,
    heartbeat_window: Duration,
    watchdog: Pin<Box<Sleep>>,
    watchdog_armed: bool,
    /// The account is online (as far as the backend told).
    online: bool,
    status_tick: Option<Pin<Box<Sleep>>>,
    status_seq: u64,
    /// Bots are being dialled again after the account came back: the session does not end
    /// for want of bots until those dials have answered.
    coming_back: bool,
    /// API calls forwarded and replies received (planned disables wait for the difference).
    requests: u64,
    replies: u64,
    started: Instant,
    /// Bot connections ending in tasks of their own.
    retiring: Vec<JoinHandle<()>>,
    watch: StateWatch,
    seen: Arc<Snapshot>,
    replaced: TokenWatch,
    /// Which side is read first on the next wake-up (fairness between backend and bots).
    bots_first: bool,
    frames_to_backend: u64,
    frames_from_backend: u64,
}

fn msg_len(m: &Message) -> usize {
    m.len()
}

pub(super) fn close_msg(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: ws::close_reason(reason).to_string().into(),
    }))
}

impl Session {
    pub fn new(setup: Setup) -> Session {
        let Setup {
            state,
            backend,
            peer,
            hello,
            role,
            credential,
            registration,
            urls,
            bots,
            pending,
        } = setup;
        let mut rx = state.subscribe();
        let seen = rx.borrow_and_update().clone();
        let watch = StateWatch::new(rx);
        let replaced = TokenWatch::new(registration.replaced_token());
        registration.set_bots_configured(urls.len());
        let self_id = hello.self_id.as_deref().and_then(|s| s.trim().parse().ok());
        let multi = urls.len() > 1;
        let slots = urls
            .into_iter()
            .map(|url| Slot {
                url,
                dialing: None,
                retry: None,
                attempt: 0,
                last_error: None,
            })
            .collect();
        let mut s = Session {
            state,
            backend,
            peer,
            hello,
            role,
            credential,
            reg: registration,
            self_id,
            multi,
            slots,
            legs: Vec::new(),
            next_leg: 0,
            routes: EchoRoutes::default(),
            to_backend: VecDeque::new(),
            to_backend_bytes: 0,
            backend_flush: false,
            connect: None,
            heartbeat_window: Duration::ZERO,
            watchdog: Box::pin(tokio::time::sleep(FAR)),
            watchdog_armed: false,
            online: true,
            status_tick: None,
            status_seq: 0,
            coming_back: false,
            requests: 0,
            replies: 0,
            started: Instant::now(),
            retiring: Vec::new(),
            watch,
            seen,
            replaced,
            bots_first: false,
            frames_to_backend: 0,
            frames_from_backend: 0,
        };
        // Bounded before the first heartbeat too, by the interval this backend announced on
        // an earlier connection (NapCat's timer is per entry, not per connection): one
        // that hangs right after connecting is not kept forever.
        let known = s
            .role
            .gets_events()
            .then(|| s.reg.known_heartbeat_interval());
        if let Some(ms) = known.flatten().filter(|ms| *ms > 0) {
            s.arm_watchdog(ms);
        }
        for (slot, ws) in bots {
            s.add_leg(slot, ws);
        }
        for (slot, dial) in pending {
            s.slots[slot].dialing = Some(dial);
        }
        let connected: Vec<usize> = s.legs.iter().map(|l| l.slot).collect();
        for slot in 0..s.slots.len() {
            if !connected.contains(&slot) {
                s.schedule_redial(slot);
            }
        }
        s
    }

    /// Relay until the backend connection ends, then end it.
    pub async fn run(mut self) {
        tracing::info!(
            peer = %self.peer,
            self_id = self.hello.self_id.as_deref().unwrap_or(""),
            role = self.role.as_str(),
            bots = self.legs.len(),
            of = self.slots.len(),
            "reverse backend connected"
        );
        let end = self.relay().await;
        let hard_stop = self.state.drain.hard_stop_token();
        tokio::select! {
            _ = Box::pin(self.finish(end)) => {}
            _ = hard_stop.cancelled() => {}
        }
    }

    async fn relay(&mut self) -> BackendEnd {
        // Anything already decided at the start (the lane went down during the upgrade).
        if let Some(end) = self.check_snapshot(self.seen.clone()) {
            return end;
        }
        // Events are handled inside one poll, up to a budget, so that a burst costs one
        // wake-up and one write per connection, not one each.
        std::future::poll_fn(|cx| {
            for _ in 0..EVENTS_PER_WAKE {
                match self.poll_event(cx) {
                    Poll::Ready(ev) => {
                        if let Some(end) = self.handle(ev) {
                            return Poll::Ready(end);
                        }
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    }

    // --- waking up ----------------------------------------------------------------------

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Ev> {
        if let Poll::Ready(change) = self.watch.poll_change(cx) {
            return Poll::Ready(match change {
                Some(snap) => Ev::State(snap),
                None => Ev::StateGone,
            });
        }
        if self.replaced.poll_cancelled(cx).is_ready() {
            return Poll::Ready(Ev::Replaced);
        }
        // Writes first: what is queued goes into the connections' write buffers before
        // more is read; it is sent once there is nothing more to read right now, so that a
        // burst of messages goes out in a few writes, not one each.
        if let Some(ev) = self.drive_all(cx, false) {
            return Poll::Ready(ev);
        }
        if self.watchdog_armed && self.watchdog.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ev::Watchdog);
        }
        if let Some(t) = self.status_tick.as_mut() {
            if t.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ev::StatusTick);
            }
        }
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(d) = slot.dialing.as_mut() {
                if let Poll::Ready(r) = d.as_mut().poll(cx) {
                    slot.dialing = None;
                    return Poll::Ready(Ev::Dialled(i, Box::new(r)));
                }
            }
            if let Some(t) = slot.retry.as_mut() {
                if t.as_mut().poll(cx).is_ready() {
                    slot.retry = None;
                    return Poll::Ready(Ev::Redial(i));
                }
            }
        }
        self.bots_first = !self.bots_first;
        for pass in 0..2 {
            let bots_turn = (pass == 0) == self.bots_first;
            if bots_turn {
                if self.to_backend_bytes < BACKEND_QUEUE_LIMIT {
                    for (i, leg) in self.legs.iter_mut().enumerate() {
                        if let Poll::Ready(m) = Pin::new(&mut leg.ws).poll_next(cx) {
                            return Poll::Ready(Ev::Bot(i, m));
                        }
                    }
                }
            } else {
                // One bot: a full queue pauses the backend (it buffers); several: a bot
                // that falls behind is closed alone, so the backend is always read.
                let paused = !self.multi && self.legs.iter().any(|l| l.queued >= BOT_QUEUE_LIMIT);
                if !paused {
                    if let Poll::Ready(m) = Pin::new(&mut self.backend).poll_next(cx) {
                        return Poll::Ready(Ev::Backend(m));
                    }
                }
            }
        }
        match self.drive_all(cx, true) {
            Some(ev) => Poll::Ready(ev),
            None => Poll::Pending,
        }
    }

    /// Hand every queued message to its connection; with `flush`, also send what the
    /// connections buffered. Some(event) when a write failed.
    fn drive_all(&mut self, cx: &mut Context<'_>, flush: bool) -> Option<Ev> {
        for (i, leg) in self.legs.iter_mut().enumerate() {
            if let Err(e) = drive(
                &mut leg.ws,
                &mut leg.queue,
                &mut leg.queued,
                &mut leg.flush,
                flush,
                cx,
            ) {
                return Some(Ev::BotWrite(i, e));
            }
        }
        if let Err(e) = drive(
            &mut self.backend,
            &mut self.to_backend,
            &mut self.to_backend_bytes,
            &mut self.backend_flush,
            flush,
            cx,
        ) {
            return Some(Ev::BackendWrite(e));
        }
        None
    }

    fn handle(&mut self, ev: Ev) -> Option<BackendEnd> {
        match ev {
            Ev::State(snap) => self.check_snapshot(snap),
            Ev::StateGone => Some(BackendEnd::HardStop),
            Ev::Replaced => Some(BackendEnd::Replaced),
            Ev::Backend(None) => Some(BackendEnd::Lost(
                "connection closed without a Close frame".into(),
            )),
            Ev::Backend(Some(Err(e))) => Some(BackendEnd::Lost(e.to_string())),
            Ev::Backend(Some(Ok(m))) => self.on_backend(m),
            Ev::BackendWrite(e) => Some(BackendEnd::Lost(e)),
            Ev::Bot(i, m) => self.on_bot(i, m),
            Ev::BotWrite(i, e) => self.leg_ended(i, End::ClientGone(e)),
            Ev::Dialled(slot, r) => self.dialled(slot, *r),
            Ev::Redial(slot) => {
                self.start_dial(slot);
                None
            }
            Ev::Watchdog => Some(BackendEnd::HeartbeatTimeout(self.heartbeat_window)),
            Ev::StatusTick => {
                self.ask_status();
                None
            }
        }
    }

    /// The state changed: the lane, the bot URLs, the access token.
    fn check_snapshot(&mut self, snap: Arc<Snapshot>) -> Option<BackendEnd> {
        if snap.hard_stop {
            return Some(BackendEnd::HardStop);
        }
        let health = snap.lane(Lane::Reverse);
        if !health.up {
            return Some(BackendEnd::Down(health.clone()));
        }
        let old = std::mem::replace(&mut self.seen, snap.clone());
        if Arc::ptr_eq(&old.settings, &snap.settings) {
            return None;
        }
        let (before, after) = (&old.settings, &snap.settings);
        if before.reverse_url != after.reverse_url {
            return Some(BackendEnd::Down(Arc::new(Health {
                up: false,
                cause: Cause::Config,
                reason: "lifeguard's config changed the bot URLs (reverse_url)".into(),
                since: SystemTime::now(),
                since_instant: Instant::now(),
                generation: health.generation,
            })));
        }
        if before.access_token != after.access_token
            && auth::authorized(after.access_token.as_ref(), self.credential.as_deref()).is_err()
        {
            return Some(BackendEnd::Revoked);
        }
        None
    }

    // --- the backend's messages ---------------------------------------------------------

    fn on_backend(&mut self, m: Message) -> Option<BackendEnd> {
        self.frames_from_backend += 1;
        match m {
            Message::Text(t) => self.backend_text(Message::Text(t)),
            Message::Binary(b) => self.broadcast(Message::Binary(b)),
            Message::Close(frame) => Some(BackendEnd::Closed(frame.map(|f| u16::from(f.code)))),
            // Pings are answered by the WebSocket layer; pongs need nothing.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => None,
        }
    }

    fn backend_text(&mut self, m: Message) -> Option<BackendEnd> {
        let Message::Text(t) = &m else { return None };
        let payload = t.as_bytes();
        match onebot::classify(payload) {
            Kind::Reply => {
                self.replies += 1;
                if self.status_seq > 0 && t.as_str().contains(STATUS_ECHO) {
                    return self.status_reply(t.as_str());
                }
                if self.multi {
                    match self.routes.inbound(t.as_str()) {
                        Some((leg, text)) => {
                            if let Some(i) = self.legs.iter().position(|l| l.id == leg) {
                                return self.push(i, Message::text(text));
                            }
                        }
                        None => tracing::debug!(
                            self_id = self.hello.self_id.as_deref().unwrap_or(""),
                            "reply with an echo no bot asked for: dropped"
                        ),
                    }
                    return None;
                }
                self.broadcast(m)
            }
            Kind::Lifecycle { self_id, sub_type } => {
                if sub_type == "connect" {
                    self.connect = Some(m.clone());
                    for leg in &mut self.legs {
                        leg.saw_connect = true;
                    }
                }
                if self_id.is_some() {
                    self.self_id = self_id;
                }
                self.broadcast(m)
            }
            Kind::Heartbeat {
                self_id,
                interval_ms,
                online,
                ..
            } => {
                if self_id.is_some() {
                    self.self_id = self_id;
                }
                if let Some(ms) = interval_ms.filter(|ms| *ms > 0) {
                    self.reg.set_heartbeat_interval(ms);
                    self.arm_watchdog(ms);
                }
                if let Some(end) = self.broadcast(m) {
                    return Some(end);
                }
                match online {
                    Some(false) => self.offline("heartbeat status.online = false"),
                    Some(true) if !self.online => self.back_online("heartbeat"),
                    _ => None,
                }
            }
            _ => {
                let offline = is_bot_offline(payload);
                if let Some(end) = self.broadcast(m) {
                    return Some(end);
                }
                if offline {
                    return self.offline("bot_offline notice");
                }
                None
            }
        }
    }

    /// Queue a backend message for every bot.
    fn broadcast(&mut self, m: Message) -> Option<BackendEnd> {
        let mut overflowed = Vec::new();
        for (i, leg) in self.legs.iter_mut().enumerate() {
            leg.queued += msg_len(&m);
            leg.queue.push_back(m.clone());
            leg.traffic.frames_to_client += 1;
            leg.traffic.bytes_to_client += msg_len(&m) as u64;
            if self.multi && leg.queued > BOT_QUEUE_LIMIT && leg.queue.len() > 1 {
                overflowed.push(i);
            }
        }
        self.state.metrics.relayed(true, self.legs.len() as u64, 0);
        let mut end = None;
        for i in overflowed.into_iter().rev() {
            let queued = self.legs[i].queued;
            end = end.or(self.leg_ended(i, End::Overflow(queued)));
        }
        end
    }

    /// Queue a message for one bot.
    fn push(&mut self, i: usize, m: Message) -> Option<BackendEnd> {
        let leg = &mut self.legs[i];
        leg.queued += msg_len(&m);
        leg.traffic.frames_to_client += 1;
        leg.traffic.bytes_to_client += msg_len(&m) as u64;
        leg.queue.push_back(m);
        if self.multi && leg.queued > BOT_QUEUE_LIMIT && leg.queue.len() > 1 {
            let queued = leg.queued;
            return self.leg_ended(i, End::Overflow(queued));
        }
        None
    }

    // --- the bots' messages -------------------------------------------------------------

    fn on_bot(
        &mut self,
        i: usize,
        m: Option<Result<Message, tungstenite::Error>>,
    ) -> Option<BackendEnd> {
        let m = match m {
            None => {
                return self.leg_ended(
                    i,
                    End::ClientGone("connection closed without a Close frame".into()),
                )
            }
            Some(Err(e)) => return self.leg_ended(i, bot_error(e)),
            Some(Ok(m)) => m,
        };
        let out = match m {
            Message::Close(frame) => {
                return self.leg_ended(i, End::ClientClosed(frame.map(|f| u16::from(f.code))))
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return None,
            Message::Text(t) if self.multi => {
                let id = self.legs[i].id;
                match self.routes.outbound(id, t.as_str()) {
                    Some(rewritten) => Message::text(rewritten),
                    None => Message::Text(t),
                }
            }
            Message::Binary(b) if self.multi => {
                let id = self.legs[i].id;
                match std::str::from_utf8(&b)
                    .ok()
                    .and_then(|t| self.routes.outbound(id, t))
                {
                    Some(rewritten) => Message::binary(rewritten.into_bytes()),
                    None => Message::Binary(b),
                }
            }
            m => m,
        };
        let leg = &mut self.legs[i];
        leg.traffic.frames_to_backend += 1;
        leg.traffic.bytes_to_backend += msg_len(&out) as u64;
        self.requests += 1;
        self.frames_to_backend += 1;
        self.state.metrics.relayed(false, 1, msg_len(&out) as u64);
        self.to_backend_bytes += msg_len(&out);
        self.to_backend.push_back(out);
        None
    }

    // --- bot connections ----------------------------------------------------------------

    fn add_leg(&mut self, slot: usize, ws: BotWs) {
        self.next_leg += 1;
        let guard = self.state.sessions.open(Lane::Reverse, self.role);
        let peer = ws
            .get_ref()
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let url = &self.slots[slot].url;
        let info = SessionInfo {
            id: guard.id,
            lane: Lane::Reverse,
            peer,
            path: format!("ws://{}{}", url.authority(), self.hello.path_of(url)),
            role: self.role,
            credential: None,
            self_id: self.self_id,
        };
        let mut leg = Leg {
            id: self.next_leg,
            slot,
            ws,
            queue: VecDeque::new(),
            queued: 0,
            flush: false,
            guard,
            info,
            started: Instant::now(),
            traffic: Traffic::default(),
            saw_connect: false,
        };
        // A bot that joins after the backend's `connect` gets it first.
        if let Some(connect) = &self.connect {
            leg.queued += msg_len(connect);
            leg.queue.push_back(connect.clone());
            leg.traffic.frames_to_client += 1;
            leg.saw_connect = true;
        }
        tracing::debug!(
            session = leg.info.id,
            bot = %leg.info.path,
            self_id = self.hello.self_id.as_deref().unwrap_or(""),
            "bot connected"
        );
        self.reg.bot_connected(true);
        self.slots[slot].attempt = 0;
        self.slots[slot].last_error = None;
        self.legs.push(leg);
    }

    /// A bot connection ended by itself (or failed): it gets its end sequence; the backend
    /// connection goes on only while another bot is behind it.
    fn leg_ended(&mut self, i: usize, end: End) -> Option<BackendEnd> {
        let slot = self.legs[i].slot;
        let url = self.slots[slot].url.clone();
        let why = match &end {
            End::ClientClosed(Some(c)) => format!("bot {url} closed the connection (code {c})"),
            End::ClientClosed(None) => format!("bot {url} closed the connection"),
            End::ClientGone(e) => format!("bot {url} went away: {e}"),
            other => format!("bot {url}: {}", other.verdict().reason),
        };
        self.slots[slot].last_error = Some(why.clone());
        self.retire_leg(i, end);
        if !self.multi {
            return Some(BackendEnd::BotsGone(why));
        }
        self.schedule_redial(slot);
        self.bots_gone(why)
    }

    /// The session ends when no bot is behind it (unless the account is offline, or bots
    /// are being dialled again after it came back).
    fn bots_gone(&mut self, why: String) -> Option<BackendEnd> {
        if self.legs.is_empty() && self.online && !self.coming_back {
            return Some(BackendEnd::BotsGone(why));
        }
        None
    }

    /// Take a bot connection out of the session and run its end sequence in a task.
    fn retire_leg(&mut self, i: usize, end: End) -> Option<BackendEnd> {
        let mut leg = self.legs.swap_remove(i);
        self.routes.forget(leg.id);
        self.reg.bot_connected(false);
        if matches!(end, End::Overflow(_)) {
            // What it could not take is dropped: the Close goes next.
            leg.queue.clear();
            leg.queued = 0;
        }
        let announce = Announce {
            self_id: self.self_id.unwrap_or(0),
            allowed: leg.saw_connect && self.role.gets_events(),
        };
        let close_timeout = self.seen.settings.close_timeout;
        let ticket = match &end {
            End::Down(h) if h.cause != Cause::Offline && h.cause != Cause::Config => {
                Some(self.state.sessions.sweep_ticket())
            }
            _ => None,
        };
        let state = self.state.clone();
        let hard_stop = state.drain.hard_stop_token();
        self.retiring
            .push(self.state.drain.spawn_session(async move {
                tokio::select! {
                    _ = leg.finish(end, announce, close_timeout, ticket, &state) => {}
                    _ = hard_stop.cancelled() => {}
                }
            }));
        self.retiring.retain(|h| !h.is_finished());
        None
    }

    fn schedule_redial(&mut self, slot: usize) {
        if !self.online {
            return;
        }
        let s = &mut self.slots[slot];
        if s.dialing.is_some() || s.retry.is_some() {
            return;
        }
        let wait = bots::backoff(s.attempt);
        s.attempt = s.attempt.saturating_add(1);
        s.retry = Some(Box::pin(tokio::time::sleep(wait)));
    }

    fn start_dial(&mut self, slot: usize) {
        if self.legs.iter().any(|l| l.slot == slot) || !self.online {
            return;
        }
        let s = &self.seen.settings;
        let (url, hello) = (self.slots[slot].url.clone(), self.hello.clone());
        let (token, timeout, max) = (
            s.reverse_token.clone(),
            s.connect_timeout,
            s.max_message_size,
        );
        self.slots[slot].dialing = Some(Box::pin(async move {
            bots::dial(&url, &hello, token.as_ref(), timeout, max).await
        }));
    }

    fn dialled(&mut self, slot: usize, r: Result<BotWs, ConnectError>) -> Option<BackendEnd> {
        match r {
            Ok(ws) => {
                if !self.online {
                    // The account went offline again meanwhile: this bot must not be told
                    // anything. Closed politely, without a session.
                    let close = close_msg(
                        ws::code::TRY_AGAIN_LATER,
                        "the backend's account went offline",
                    );
                    self.state.drain.spawn_session(async move {
                        use futures_util::SinkExt;
                        let mut ws = ws;
                        let _ =
                            tokio::time::timeout(Duration::from_millis(500), ws.send(close)).await;
                    });
                } else {
                    self.add_leg(slot, ws);
                }
            }
            Err(e) => {
                let url = &self.slots[slot].url;
                tracing::debug!(bot = %url, error = %e, "bot redial failed");
                self.slots[slot].last_error = Some(format!("bot {url}: {e}"));
                if self.multi && self.online {
                    self.schedule_redial(slot);
                }
            }
        }
        if self.coming_back && self.slots.iter().all(|s| s.dialing.is_none()) {
            self.coming_back = false;
            if self.legs.is_empty() {
                let why = self
                    .slots
                    .iter()
                    .filter_map(|s| s.last_error.clone())
                    .collect::<Vec<_>>()
                    .join("; ");
                return Some(BackendEnd::BotsGone(format!(
                    "the account is back online but no bot accepted: {why}"
                )));
            }
        }
        None
    }

    /// The next heartbeat is due within `heartbeat_grace` × the announced `ms` from now.
    fn arm_watchdog(&mut self, ms: u64) {
        self.heartbeat_window =
            Duration::from_millis(ms).mul_f64(self.seen.settings.heartbeat_grace);
        self.watchdog
            .as_mut()
            .reset(tokio::time::Instant::now() + self.heartbeat_window);
        self.watchdog_armed = true;
    }

    // --- the account --------------------------------------------------------------------

    /// The account went offline: the bots are told and closed, the backend connection is
    /// kept (closing it would only make the backend redial in a loop).
    fn offline(&mut self, why: &str) -> Option<BackendEnd> {
        if !self.online || !self.seen.settings.offline_is_down {
            return None;
        }
        self.online = false;
        self.coming_back = false;
        self.reg.set_online(false);
        tracing::info!(
            self_id = self.hello.self_id.as_deref().unwrap_or(""),
            peer = %self.peer,
            "reverse backend's QQ account is offline ({why}): bots closed, connection kept"
        );
        let health = Arc::new(Health {
            up: false,
            cause: Cause::Offline,
            reason: format!("the backend's QQ account is offline ({why})"),
            since: SystemTime::now(),
            since_instant: Instant::now(),
            generation: 0,
        });
        while !self.legs.is_empty() {
            self.retire_leg(self.legs.len() - 1, End::Down(health.clone()));
        }
        for s in &mut self.slots {
            s.dialing = None;
            s.retry = None;
            s.attempt = 0;
        }
        let every = self.seen.settings.probe_interval;
        self.status_tick = Some(Box::pin(tokio::time::sleep(every)));
        None
    }

    fn back_online(&mut self, how: &str) -> Option<BackendEnd> {
        if self.online {
            return None;
        }
        self.online = true;
        self.status_tick = None;
        self.reg.set_online(true);
        tracing::info!(
            self_id = self.hello.self_id.as_deref().unwrap_or(""),
            peer = %self.peer,
            "reverse backend's QQ account is online again ({how}): dialling the bots"
        );
        self.coming_back = true;
        for slot in 0..self.slots.len() {
            self.start_dial(slot);
        }
        None
    }

    /// While offline: ask the backend whether the account is back.
    fn ask_status(&mut self) {
        self.status_seq += 1;
        let call = format!(
            r#"{{"action":"get_status","params":{{}},"echo":"{STATUS_ECHO}{}"}}"#,
            self.status_seq
        );
        self.to_backend_bytes += call.len();
        self.to_backend.push_back(Message::text(call));
        let every = self.seen.settings.probe_interval;
        self.status_tick = Some(Box::pin(tokio::time::sleep(every)));
    }

    fn status_reply(&mut self, text: &str) -> Option<BackendEnd> {
        let online = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.pointer("/data/online").and_then(|o| o.as_bool()));
        match online {
            Some(true) => self.back_online("get_status"),
            _ => None,
        }
    }

    // --- the end ------------------------------------------------------------------------

    async fn finish(mut self, end: BackendEnd) {
        if matches!(end, BackendEnd::HardStop) {
            return;
        }
        let close_timeout = self.seen.settings.close_timeout;
        let usable = matches!(
            end,
            BackendEnd::Down(_)
                | BackendEnd::Replaced
                | BackendEnd::HeartbeatTimeout(_)
                | BackendEnd::Revoked
                | BackendEnd::BotsGone(_)
        );
        // (a) Everything the backend already sent goes to the bots first; planned
        // disables give replies to calls already forwarded a short grace.
        if usable && !matches!(end, BackendEnd::HeartbeatTimeout(_)) {
            let planned = matches!(&end, BackendEnd::Down(h) if h.cause.planned());
            let until = tokio::time::Instant::now()
                + if planned {
                    REPLY_GRACE.min(close_timeout)
                } else {
                    Duration::ZERO
                };
            self.drain_backend(until).await;
        }
        let leg_end = match &end {
            BackendEnd::Down(h) => Some(End::Down(h.clone())),
            BackendEnd::Replaced => Some(End::Replaced(format!(
                "replaced by a newer connection for self id {}",
                self.hello.self_id.as_deref().unwrap_or("?")
            ))),
            BackendEnd::Closed(c) => Some(End::BackendClosed(*c)),
            BackendEnd::Lost(e) => Some(End::BackendLost(e.clone())),
            BackendEnd::HeartbeatTimeout(d) => Some(End::HeartbeatTimeout(*d)),
            BackendEnd::Revoked => Some(End::Revoked),
            BackendEnd::BotsGone(_) | BackendEnd::HardStop => None,
        };
        // (b)-(d) per bot, at once for all of them.
        if let Some(leg_end) = leg_end {
            while !self.legs.is_empty() {
                self.retire_leg(self.legs.len() - 1, leg_end.clone());
            }
        }
        for s in &mut self.slots {
            s.dialing = None;
            s.retry = None;
        }
        if matches!(&end, BackendEnd::Down(h) if h.cause != Cause::Config) {
            self.state.sessions.sweep_wait(SWEEP_WAIT).await;
        }
        for h in std::mem::take(&mut self.retiring) {
            let _ = h.await;
        }
        // A successor may dial the bots now: none of ours is connected any more.
        self.reg.bots_closed();
        // The backend's own goodbye.
        let goodbye = match &end {
            BackendEnd::Down(h) => {
                Some((h.cause.close_code(), format!("{}: {}", h.cause, h.reason)))
            }
            BackendEnd::Replaced => Some((
                ws::code::NORMAL,
                format!(
                    "replaced by a newer connection for self id {}",
                    self.hello.self_id.as_deref().unwrap_or("?")
                ),
            )),
            BackendEnd::BotsGone(why) => Some((ws::code::TRY_AGAIN_LATER, why.clone())),
            BackendEnd::Revoked => Some((
                ws::code::POLICY,
                "access token changed; reconnect with the new one".to_string(),
            )),
            BackendEnd::HeartbeatTimeout(d) => Some((
                ws::code::TRY_AGAIN_LATER,
                format!("no heartbeat for {} ms", d.as_millis()),
            )),
            BackendEnd::Closed(_) | BackendEnd::Lost(_) | BackendEnd::HardStop => None,
        };
        let close_code = goodbye.as_ref().map(|g| g.0);
        let deadline = tokio::time::Instant::now() + close_timeout;
        match goodbye {
            Some((code, reason)) => {
                // A hung backend reads nothing: do not wait for its reply then.
                let wait = if matches!(end, BackendEnd::HeartbeatTimeout(_)) {
                    tokio::time::Instant::now() + Duration::from_millis(50)
                } else {
                    deadline
                };
                let _ = tokio::time::timeout_at(
                    wait,
                    self.backend.close(close_msg_frame(code, &reason)),
                )
                .await;
                let _ = tokio::time::timeout_at(wait, async {
                    while let Some(Ok(_)) = self.backend.next().await {}
                })
                .await;
            }
            None if matches!(end, BackendEnd::Closed(_)) => {
                // Our reply to its Close is queued in the WebSocket layer: send it.
                let _ = tokio::time::timeout_at(deadline, self.backend.close(None)).await;
            }
            None => {}
        }
        let reason = match &end {
            BackendEnd::Down(h) => h.reason.clone(),
            BackendEnd::Closed(Some(c)) => format!("the backend closed the connection (code {c})"),
            BackendEnd::Closed(None) => {
                "the backend closed the connection without a close code".into()
            }
            BackendEnd::Lost(e) => format!("backend connection lost: {e}"),
            BackendEnd::HeartbeatTimeout(d) => format!("no heartbeat for {} ms", d.as_millis()),
            BackendEnd::BotsGone(why) => why.clone(),
            BackendEnd::Replaced => "replaced by a newer connection for the same self id".into(),
            BackendEnd::Revoked => "access token changed".into(),
            BackendEnd::HardStop => String::new(),
        };
        tracing::info!(
            transport = Lane::Reverse.as_str(),
            peer = %self.peer,
            self_id = self.hello.self_id.as_deref().unwrap_or(""),
            role = self.role.as_str(),
            cause = end.cause(),
            close_code = close_code.map(|c| c as i64).unwrap_or(-1),
            reason = %reason,
            lifetime_ms = self.started.elapsed().as_millis() as u64,
            frames_from_backend = self.frames_from_backend,
            frames_to_backend = self.frames_to_backend,
            "reverse backend connection closed"
        );
    }

    /// Read what the backend has already sent (and, until `until`, replies still owed)
    /// and queue it for the bots.
    async fn drain_backend(&mut self, until: tokio::time::Instant) {
        loop {
            let next = match self.backend.next().now_or_never() {
                Some(m) => Some(m),
                None if self.replies < self.requests && tokio::time::Instant::now() < until => {
                    tokio::time::timeout_at(until, self.backend.next())
                        .await
                        .ok()
                }
                None => None,
            };
            match next {
                Some(Some(Ok(m @ (Message::Text(_) | Message::Binary(_))))) => {
                    if self.on_backend(m).is_some() && self.legs.is_empty() {
                        return;
                    }
                }
                Some(Some(Ok(_))) => {}
                _ => return,
            }
        }
    }
}

fn close_msg_frame(code: u16, reason: &str) -> Option<CloseFrame> {
    match close_msg(code, reason) {
        Message::Close(f) => f,
        _ => None,
    }
}

/// What a bot that breaks the protocol gets.
fn bot_error(e: tungstenite::Error) -> End {
    use tungstenite::Error as E;
    match e {
        E::Capacity(_) => End::ClientViolation(ws::code::TOO_BIG, "message too big"),
        E::Protocol(_) => End::ClientViolation(ws::code::PROTOCOL_ERROR, "protocol error"),
        E::Utf8(_) => {
            End::ClientViolation(ws::code::INVALID_PAYLOAD, "invalid UTF-8 in a text message")
        }
        e => End::ClientGone(e.to_string()),
    }
}

/// NapCat's `bot_offline` notice (QQ kicked the account off); it names itself early.
fn is_bot_offline(payload: &[u8]) -> bool {
    let head = &payload[..payload.len().min(256)];
    memchr::memmem::find(head, b"\"notice_type\":\"bot_offline\"").is_some()
}

/// Send what is queued on `ws` as far as it takes it, then flush. Err: the socket failed.
fn drive(
    ws: &mut WebSocketStream<TcpStream>,
    queue: &mut VecDeque<Message>,
    queued: &mut usize,
    flush: &mut bool,
    send_now: bool,
    cx: &mut Context<'_>,
) -> Result<(), String> {
    while !queue.is_empty() {
        match Pin::new(&mut *ws).poll_ready(cx) {
            Poll::Ready(Ok(())) => {
                let Some(m) = queue.pop_front() else { break };
                *queued = queued.saturating_sub(msg_len(&m));
                Pin::new(&mut *ws)
                    .start_send(m)
                    .map_err(|e| e.to_string())?;
                *flush = true;
            }
            Poll::Ready(Err(e)) => return Err(e.to_string()),
            Poll::Pending => return Ok(()),
        }
    }
    if *flush && send_now {
        match Pin::new(&mut *ws).poll_flush(cx) {
            Poll::Ready(Ok(())) => *flush = false,
            Poll::Ready(Err(e)) => return Err(e.to_string()),
            Poll::Pending => {}
        }
    }
    Ok(())
}

/// Whether a bot is owed the `disable` event, and for which self id.
#[derive(Clone, Copy)]
struct Announce {
    self_id: u64,
    allowed: bool,
}

impl Leg {
    /// The end sequence the verdict asks for, then one log line.
    async fn finish(
        mut self,
        end: End,
        announce: Announce,
        close_timeout: Duration,
        ticket: Option<crate::state::SweepTicket>,
        state: &State,
    ) {
        let verdict = end.verdict();
        let deadline = tokio::time::Instant::now() + close_timeout;
        let outcome = match &end {
            End::ClientClosed(code) => {
                // The WebSocket layer queued our Close reply: send it and hang up.
                let _ =
                    tokio::time::timeout_at(deadline, futures_util::SinkExt::close(&mut self.ws))
                        .await;
                Outcome {
                    close_code: *code,
                    ..Outcome::default()
                }
            }
            End::ClientGone(_) => Outcome::default(),
            _ => {
                let disable = verdict.announce && announce.allowed;
                if disable {
                    let e = onebot::disable_event(announce.self_id);
                    self.queued += e.len();
                    self.queue.push_back(Message::text(e));
                }
                let code = verdict.code.unwrap_or(ws::code::NORMAL);
                self.queue.push_back(close_msg(code, &verdict.reason));
                let sent = tokio::time::timeout_at(deadline, async {
                    while !self.queue.is_empty() || self.flush {
                        let r = std::future::poll_fn(|cx| {
                            match drive(
                                &mut self.ws,
                                &mut self.queue,
                                &mut self.queued,
                                &mut self.flush,
                                true,
                                cx,
                            ) {
                                Err(e) => Poll::Ready(Err(e)),
                                Ok(()) if self.queue.is_empty() && !self.flush => {
                                    Poll::Ready(Ok(()))
                                }
                                Ok(()) => Poll::Pending,
                            }
                        })
                        .await;
                        if r.is_err() {
                            return false;
                        }
                    }
                    true
                })
                .await
                .unwrap_or(false);
                if let Some(t) = ticket {
                    t.sent();
                }
                if sent {
                    // The bot's Close reply (or the end of its socket), then hang up.
                    let _ = tokio::time::timeout_at(deadline, async {
                        while let Some(Ok(m)) = self.ws.next().await {
                            if m.is_close() {
                                break;
                            }
                        }
                    })
                    .await;
                    Outcome {
                        disable_sent: disable,
                        close_code: verdict.code,
                        close_sent: true,
                        note: "",
                    }
                } else {
                    Outcome {
                        note: "bot did not take the Close frame in time",
                        ..Outcome::default()
                    }
                }
            }
        };
        drop(self.ws);
        let _ = state;
        policy::log_termination(
            &self.info,
            &verdict,
            &outcome,
            self.started.elapsed(),
            self.traffic,
        );
        self.guard.close(verdict.cause, outcome.close_code);
    }
}
