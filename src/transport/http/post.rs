//! The HTTP POST relay: the backend posts its events to `--post-listen`; lifeguard checks
//! their signature and posts each body, byte for byte, to every `--post-url`, and adds the
//! lifecycle `enable`/`disable` events the spec promises and no backend sends.
//!
//! - **Order.** Every accepted event goes into every bot's queue under one lock, so each bot
//!   gets the events in the order their requests arrived, lifecycle events included (one is
//!   queued after everything accepted before the transition). One worker per bot sends one
//!   request at a time; a slow bot never delays another.
//! - **Quick operations.** The first bot is the primary: while it answers, the backend's
//!   request is held until the primary's answer for that event (status and body go back,
//!   within `--post-timeout`). Once the primary fails, the backend gets 204 at once and the
//!   lost quick operation is logged: NapCat waits forever for an answer, so it is never left
//!   waiting.
//! - **Failures.** A bot that fails (5xx, 408, 429, refused, no answer within
//!   `--post-timeout`) gets the same event again, with backoff from 50 ms doubling to 1 s;
//!   the events behind it wait in its queue (`--post-queue`, the oldest dropped when full).
//!   An event is given up after `--post-retry-for`; one a bot refuses with another 4xx is
//!   given up at once (the same bytes would be refused again). Every drop is counted
//!   (`lifeguard_post_dropped_total{bot,reason}`) and logged.
//! - **Intent.** While the lane is down for a planned cause (operator, config, NapCat's
//!   `httpClients[].enable`, shutdown), the backend's POSTs are refused with 503 and counted:
//!   a disabled backend's events do not reach the bots. Down for health reasons (probes,
//!   heartbeats, QQ offline), the events that still arrive are relayed: they are real, and
//!   the bots were told `disable`.
//! - **Health.** The heartbeats the backend POSTs (go-cqhttp, Lagrange; not NapCat) feed the
//!   account state and, in a POST-only setup, the lane's health (see
//!   [`HealthSource::Heartbeats`](crate::state::HealthSource)).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};

use super::{failure, sign, unavailable, Resp};
use crate::config::{HttpUrl, Settings};
use crate::metrics::PostBotMetrics;
use crate::proto::onebot::{self, Role};
use crate::state::{Cause, Health, Lane, State};
use crate::transport::accept::Acceptor;

/// First retry delay after a failed delivery; doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Largest answer read from a bot (a quick operation is small).
const REPLY_LIMIT: usize = 1 << 20;
/// How long the backend may take to send a request's head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// While a lifecycle event waits for the bot's self id, how often to look for it.
const SELF_ID_POLL: Duration = Duration::from_millis(200);
/// Log lines of one kind (drops, lost quick operations) per second before they are
/// summed up instead.
const LOG_BURST: u32 = 10;

/// The relay: its bots, the order lock, what it learned from the backend.
pub struct PostRelay {
    state: Arc<State>,
    bots: Vec<Arc<Bot>>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// Held while an event (or a lifecycle event) goes into every bot's queue, so that all
    /// bots see one order; holds what the bots were last told.
    order: Mutex<Order>,
    /// The bot's QQ number, as the backend's own POSTs say (0: not seen yet).
    self_id: AtomicU64,
    /// Rings when the self id is first learned (a lifecycle event may be waiting for it).
    learned: Notify,
    /// The last heartbeat the backend POSTed.
    beats: Mutex<Option<Beat>>,
    /// Rings on every heartbeat (the watchdog restarts its clock).
    beat: Notify,
    /// Lost quick operations, for the log.
    lost_log: RateLog,
}

struct Order {
    /// The last lifecycle state the bots were told (`None`: nothing yet).
    told: Option<bool>,
}

#[derive(Debug, Clone, Copy)]
struct Beat {
    at: Instant,
    interval: Duration,
}

/// One `--post-url`, its queue and its figures.
struct Bot {
    /// Its place in `--post-url` (0 is the primary); the `bot` label.
    index: usize,
    url: HttpUrl,
    queue: Mutex<BotQueue>,
    /// Rings when an item is queued or the queue closes.
    wake: Notify,
    metrics: PostBotMetrics,
    /// The last delivery attempt succeeded (or none was made): the primary's answers are
    /// worth waiting for.
    reachable: AtomicBool,
    /// Items queued or being sent.
    pending: AtomicUsize,
    delivered: AtomicU64,
    retries: AtomicU64,
    dropped: AtomicU64,
    drop_log: RateLog,
}

struct BotQueue {
    items: VecDeque<Item>,
    /// No more items will come (shutdown): the worker ends once the queue is empty.
    closing: bool,
}

/// One event on its way to one bot.
struct Item {
    body: Bytes,
    /// `X-Self-ID` as the backend sent it (or the event's `self_id`).
    self_id: Option<HeaderValue>,
    arrived: Instant,
    /// The backend is waiting for this bot's answer (primary only).
    reply: Option<oneshot::Sender<Reply>>,
    /// What it is, for the logs: `event`, `enable`, `disable`.
    what: &'static str,
}

/// What the backend's held request gets.
enum Reply {
    /// The primary's answer, relayed.
    Answered {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
    },
    /// No answer can be had (why): the backend gets 204.
    Lost(String),
}

/// The fields of an event the relay looks at, raw: any JSON object is an event, whatever
/// the types of its fields, and everything passes untouched.
#[derive(Deserialize)]
pub struct EventHead<'a> {
    #[serde(default, borrow)]
    self_id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    post_type: Option<&'a RawValue>,
    #[serde(default, borrow)]
    meta_event_type: Option<&'a RawValue>,
    #[serde(default, borrow)]
    interval: Option<&'a RawValue>,
    #[serde(default, borrow)]
    status: Option<&'a RawValue>,
}

impl<'a> EventHead<'a> {
    /// The head of an event body: a JSON object, or why not. Pure, for fuzzing.
    pub fn parse(body: &'a [u8]) -> Result<EventHead<'a>, String> {
        if !body.trim_ascii_start().starts_with(b"{") {
            return Err("not a JSON object".into());
        }
        serde_json::from_slice(body).map_err(|e| e.to_string())
    }

    /// A number, or a string holding one (some implementations send ids as strings).
    fn number(v: Option<&RawValue>) -> Option<u64> {
        v?.get().trim_matches('"').parse().ok()
    }

    fn is(v: Option<&RawValue>, s: &str) -> bool {
        v.is_some_and(|v| v.get().strip_prefix('"').and_then(|r| r.strip_suffix('"')) == Some(s))
    }

    fn self_id(&self) -> Option<u64> {
        Self::number(self.self_id)
    }

    fn post_type(&self) -> &str {
        self.post_type
            .map(|v| v.get().trim_matches('"'))
            .unwrap_or("")
    }

    fn is_heartbeat(&self) -> bool {
        Self::is(self.post_type, "meta_event") && Self::is(self.meta_event_type, "heartbeat")
    }

    /// `status.online` of a heartbeat.
    fn online(&self) -> Option<bool> {
        let status: serde_json::Value = serde_json::from_str(self.status?.get()).ok()?;
        status.get("online")?.as_bool()
    }
}

/// How one delivery attempt ended.
enum Attempt {
    /// 2xx: delivered.
    Delivered(StatusCode, Option<HeaderValue>, Bytes),
    /// Another 4xx (or 3xx): the bot refuses these bytes; retrying cannot help.
    Rejected(StatusCode, Option<HeaderValue>, Bytes),
    /// 5xx, 408, 429, a transport error or no answer in time: retry.
    Failed(String),
}

/// At most [`LOG_BURST`] lines a second of one kind; the rest are summed up.
struct RateLog(Mutex<(Instant, u32, u64)>);

impl RateLog {
    fn new() -> RateLog {
        RateLog(Mutex::new((Instant::now(), 0, 0)))
    }

    /// Whether to log this occurrence, and how many went unlogged in the window before.
    fn admit(&self) -> (bool, u64) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut summed = 0;
        if g.0.elapsed() >= Duration::from_secs(1) {
            summed = g.2;
            *g = (Instant::now(), 0, 0);
        }
        if g.1 < LOG_BURST {
            g.1 += 1;
            (true, summed)
        } else {
            g.2 += 1;
            (false, summed)
        }
    }

    /// Occurrences not logged one by one since the window began.
    fn take_unlogged(&self) -> u64 {
        std::mem::take(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()).2)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serve `--post-listen` until the drain stops accepting. The bots' workers, the lifecycle
/// watcher and the heartbeat watchdog are tracked by the drain too; the workers deliver
/// what is queued (the `disable` of the shutdown last) before they end.
pub async fn serve(state: Arc<State>, listener: TcpListener) {
    let relay = PostRelay::new(state.clone());
    for bot in &relay.bots {
        tracing::info!(bot = bot.index, url = %bot.url, primary = bot.index == 0, "relaying the backend's POSTs to a bot");
        state
            .drain
            .spawn_session(run_bot(relay.clone(), bot.clone()));
    }
    state.drain.spawn_session(watch_lifecycle(relay.clone()));
    state.drain.spawn_background(watch_beats(relay.clone()));
    let detail = relay.clone();
    state.set_lane_detail(Lane::HttpPost, Arc::new(move || detail.detail()));
    let mut backends = Acceptor::backends(listener, "post");
    while let Some((stream, peer)) = backends.next(&state).await {
        let relay = relay.clone();
        state.drain.spawn_session(async move {
            let stop = relay.state.clone();
            let svc = hyper::service::service_fn(move |req| {
                let relay = relay.clone();
                async move { Ok::<_, Infallible>(relay.handle(peer, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.drain.accepting_stopped() => {}
            }
            // Requests in flight get their answer (503 now: the lane is down for shutdown).
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.drain.hard_stopped() => {}
            }
        });
    }
}

impl PostRelay {
    fn new(state: Arc<State>) -> Arc<PostRelay> {
        let s = state.settings();
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(s.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(4)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let bots = s
            .post_url
            .iter()
            .enumerate()
            .map(|(index, url)| {
                Arc::new(Bot {
                    index,
                    url: url.clone(),
                    queue: Mutex::new(BotQueue {
                        items: VecDeque::new(),
                        closing: false,
                    }),
                    wake: Notify::new(),
                    metrics: state.metrics.post_bot(index),
                    reachable: AtomicBool::new(true),
                    pending: AtomicUsize::new(0),
                    delivered: AtomicU64::new(0),
                    retries: AtomicU64::new(0),
                    dropped: AtomicU64::new(0),
                    drop_log: RateLog::new(),
                })
            })
            .collect();
        Arc::new(PostRelay {
            state,
            bots,
            client,
            order: Mutex::new(Order { told: None }),
            self_id: AtomicU64::new(0),
            learned: Notify::new(),
            beats: Mutex::new(None),
            beat: Notify::new(),
            lost_log: RateLog::new(),
        })
    }

    /// The bot's QQ number: from the backend's POSTs, else from what the state learned
    /// (forward sessions, the HTTP probe).
    fn self_id(&self) -> Option<u64> {
        match self.self_id.load(Ordering::Relaxed) {
            0 => self.state.backend().self_id,
            id => Some(id),
        }
    }

    fn learn_self_id(&self, id: u64) {
        if id != 0 && self.self_id.swap(id, Ordering::Relaxed) == 0 {
            self.learned.notify_one();
        }
    }

    /// One POST from the backend.
    async fn handle(&self, peer: SocketAddr, req: Request<Incoming>) -> Resp {
        let state = &self.state;
        if req.method() != Method::POST {
            state.metrics.post_received("bad-request");
            return failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "bad-request",
                "lifeguard's POST listener takes the backend's event POSTs only",
            );
        }
        let snap = state.snapshot();
        let s = &snap.settings;
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, s.max_message_size).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                state.metrics.post_received("too-large");
                return failure(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too-large",
                    &format!("event body above {} bytes", s.max_message_size),
                );
            }
            Err(e) => {
                state.metrics.post_received("bad-request");
                return failure(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    &format!("event body could not be read: {e}"),
                );
            }
        };
        if let Some(secret) = &s.post_secret {
            let presented = parts.headers.get("x-signature").map(|v| v.as_bytes());
            if let Err(e) = sign::verify(secret.expose().as_bytes(), presented, &body) {
                let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::FORBIDDEN);
                state
                    .metrics
                    .post_received(if status == StatusCode::UNAUTHORIZED {
                        "unauthorized"
                    } else {
                        "forbidden"
                    });
                tracing::warn!(%peer, problem = e.as_str(), "refused a POST: its signature does not pass");
                return failure(status, "signature", e.as_str());
            }
        }
        let health = snap.lane(Lane::HttpPost);
        if !health.up && health.cause.planned() {
            state.metrics.post_received("refused");
            tracing::debug!(%peer, cause = %health.cause, "refused a POST: the backend is disabled");
            return unavailable(health, 1);
        }
        let head = match EventHead::parse(&body) {
            Ok(h) => h,
            Err(e) => {
                state.metrics.post_received("bad-request");
                return failure(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    &format!("the body is not a JSON event: {e}"),
                );
            }
        };
        let header_id = parts.headers.get("x-self-id").cloned();
        let self_id = header_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .or(head.self_id());
        if let Some(id) = self_id {
            self.learn_self_id(id);
        }
        if head.is_heartbeat() {
            self.on_heartbeat(EventHead::number(head.interval), head.online());
        }
        let post_type = head.post_type().to_string();
        state.metrics.post_received("accepted");

        let guard = state.sessions.open(Lane::HttpPost, Role::Event);
        let waiting = self.enqueue(
            body,
            header_id.or(self_id.map(HeaderValue::from)),
            "event",
            true,
        );
        let (resp, cause) = match waiting {
            None => {
                self.quick_lost(
                    &post_type,
                    "the primary bot is failing; the event is queued for retry",
                );
                (no_content(), "answered-204")
            }
            Some(rx) => {
                match tokio::time::timeout(s.post_timeout, rx).await {
                    Ok(Ok(Reply::Answered {
                        status,
                        content_type,
                        body,
                    })) => {
                        state.metrics.post_quick("relayed");
                        let mut r = Response::new(Full::new(body));
                        *r.status_mut() = status;
                        if let Some(ct) = content_type {
                            r.headers_mut().insert(header::CONTENT_TYPE, ct);
                        }
                        (r, "answered")
                    }
                    Ok(Ok(Reply::Lost(why))) => {
                        self.quick_lost(&post_type, &why);
                        (no_content(), "answered-204")
                    }
                    Ok(Err(_)) => {
                        self.quick_lost(
                            &post_type,
                            "the event was dropped before the primary answered",
                        );
                        (no_content(), "answered-204")
                    }
                    Err(_) => {
                        self.quick_lost(
                        &post_type,
                        &format!("the primary bot did not answer within {} ms; it still gets the event", s.post_timeout.as_millis()),
                    );
                        (no_content(), "answered-204")
                    }
                }
            }
        };
        guard.close(cause, None);
        resp
    }

    fn quick_lost(&self, post_type: &str, why: &str) {
        self.state.metrics.post_quick("lost");
        let (log, unlogged) = self.lost_log.admit();
        if unlogged > 0 {
            tracing::info!(
                count = unlogged,
                "more quick operations lost (not logged one by one)"
            );
        }
        if log {
            tracing::info!(
                post_type,
                reason = why,
                "quick operation lost: the backend got 204 instead of the primary bot's answer"
            );
        }
    }

    /// A heartbeat the backend posted: the account state, and the watchdog's clock.
    fn on_heartbeat(&self, interval_ms: Option<u64>, online: Option<bool>) {
        if let Some(ms) = interval_ms.filter(|ms| *ms > 0) {
            *lock(&self.beats) = Some(Beat {
                at: Instant::now(),
                interval: Duration::from_millis(ms),
            });
            self.beat.notify_one();
            self.state.observe_beats(None);
        }
        if let Some(online) = online {
            self.state.observe_online(online);
        }
    }

    /// Queue `body` for every bot, in one order for all; when `want_reply` and the primary
    /// answers, the receiver gets its answer. Any lifecycle event due goes first.
    fn enqueue(
        &self,
        body: Bytes,
        self_id: Option<HeaderValue>,
        what: &'static str,
        want_reply: bool,
    ) -> Option<oneshot::Receiver<Reply>> {
        let mut order = lock(&self.order);
        let health = self.state.snapshot().lane(Lane::HttpPost).clone();
        self.announce_locked(&mut order, &health);
        let arrived = Instant::now();
        let cap = self.state.settings().post_queue;
        let mut waiting = None;
        for bot in &self.bots {
            let reply = if bot.index == 0 && want_reply && bot.reachable.load(Ordering::Relaxed) {
                let (tx, rx) = oneshot::channel();
                waiting = Some(rx);
                Some(tx)
            } else {
                None
            };
            self.push(
                bot,
                Item {
                    body: body.clone(),
                    self_id: self_id.clone(),
                    arrived,
                    reply,
                    what,
                },
                cap,
            );
        }
        waiting
    }

    /// Tell the bots the lane's state if it is not what they were last told (and the self
    /// id the event needs is known). Called with the order lock held.
    fn announce_locked(&self, order: &mut Order, health: &Health) {
        let up = health.up;
        if !announcement_due(order.told, up) {
            return;
        }
        let Some(id) = self.self_id() else {
            return;
        };
        let sub_type = if up { "enable" } else { "disable" };
        let body = Bytes::from(onebot::lifecycle_event(id, sub_type));
        let arrived = Instant::now();
        let cap = self.state.settings().post_queue;
        for bot in &self.bots {
            self.state.metrics.post_lifecycle(&bot.metrics, sub_type);
            self.push(
                bot,
                Item {
                    body: body.clone(),
                    self_id: Some(HeaderValue::from(id)),
                    arrived,
                    reply: None,
                    what: sub_type,
                },
                cap,
            );
        }
        order.told = Some(up);
        tracing::info!(
            sub_type,
            self_id = id,
            cause = %health.cause,
            reason = %health.reason,
            bots = self.bots.len(),
            "lifecycle event queued for every bot (HTTP POST)"
        );
    }

    /// Announce what is due now (the lane changed, or the self id became known).
    fn announce(&self) {
        let mut order = lock(&self.order);
        let health = self.state.snapshot().lane(Lane::HttpPost).clone();
        self.announce_locked(&mut order, &health);
    }

    /// A lifecycle event is due but waits for the self id.
    fn announcement_waits(&self) -> bool {
        let order = lock(&self.order);
        let up = self.state.snapshot().lane(Lane::HttpPost).up;
        announcement_due(order.told, up) && self.self_id().is_none()
    }

    fn push(&self, bot: &Bot, item: Item, cap: usize) {
        let pushed_out = {
            let mut q = lock(&bot.queue);
            let out = if q.items.len() >= cap {
                q.items.pop_front()
            } else {
                None
            };
            q.items.push_back(item);
            out
        };
        let n = bot.pending.fetch_add(1, Ordering::Relaxed) + 1;
        bot.metrics.queued.set(n as i64);
        if let Some(old) = pushed_out {
            self.dropped(bot, old, "queue-full");
        }
        bot.wake.notify_one();
    }

    /// Give up on `item` for `bot`: counted, logged, and the backend (if it waits) answered.
    fn dropped(&self, bot: &Bot, item: Item, reason: &'static str) {
        let n = bot
            .pending
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        bot.metrics.queued.set(n as i64);
        bot.dropped.fetch_add(1, Ordering::Relaxed);
        self.state.metrics.post_dropped(&bot.metrics, reason, 1);
        if let Some(tx) = item.reply {
            let _ = tx.send(Reply::Lost(format!("the event was dropped ({reason})")));
        }
        let (log, unlogged) = bot.drop_log.admit();
        if unlogged > 0 {
            tracing::warn!(
                bot = bot.index,
                count = unlogged,
                "more events dropped for this bot (not logged one by one)"
            );
        }
        if log {
            tracing::warn!(
                bot = bot.index,
                url = %bot.url,
                reason,
                event = item.what,
                age_ms = item.arrived.elapsed().as_millis() as u64,
                "event dropped for a bot"
            );
        }
    }

    /// No more items for any bot: each worker ends once its queue is delivered.
    fn close_bots(&self) {
        for bot in &self.bots {
            lock(&bot.queue).closing = true;
            bot.wake.notify_one();
        }
    }

    /// Deliver `item` to `bot`: retried until it is delivered, refused, too old, or the hard
    /// stop comes.
    async fn deliver(&self, bot: &Bot, mut item: Item) {
        let mut backoff = RETRY_FIRST;
        let mut attempts = 0u32;
        loop {
            let s = self.state.settings();
            if attempts > 0 && item.arrived.elapsed() >= s.post_retry_for {
                self.dropped(bot, item, "expired");
                return;
            }
            if attempts > 0 {
                bot.retries.fetch_add(1, Ordering::Relaxed);
                bot.metrics.retries.inc();
            }
            attempts += 1;
            let attempt = tokio::select! {
                _ = self.state.drain.hard_stopped() => {
                    self.dropped(bot, item, "shutdown");
                    return;
                }
                a = self.attempt(bot, &item, &s) => a,
            };
            match attempt {
                Attempt::Delivered(status, content_type, body) => {
                    if !bot.reachable.swap(true, Ordering::Relaxed) {
                        tracing::info!(bot = bot.index, url = %bot.url, "bot answers again; delivering what was queued");
                    }
                    let n = bot
                        .pending
                        .fetch_sub(1, Ordering::Relaxed)
                        .saturating_sub(1);
                    bot.metrics.queued.set(n as i64);
                    bot.delivered.fetch_add(1, Ordering::Relaxed);
                    bot.metrics.delivered.inc();
                    if let Some(tx) = item.reply.take() {
                        let _ = tx.send(Reply::Answered {
                            status,
                            content_type,
                            body,
                        });
                    }
                    return;
                }
                Attempt::Rejected(status, content_type, body) => {
                    bot.reachable.store(true, Ordering::Relaxed);
                    if let Some(tx) = item.reply.take() {
                        // The bot's own answer: the backend hears it as it is.
                        let _ = tx.send(Reply::Answered {
                            status,
                            content_type,
                            body,
                        });
                    }
                    tracing::warn!(bot = bot.index, url = %bot.url, status = status.as_u16(), "bot refused an event");
                    self.dropped(bot, item, "rejected");
                    return;
                }
                Attempt::Failed(why) => {
                    if bot.reachable.swap(false, Ordering::Relaxed) {
                        tracing::warn!(
                            bot = bot.index,
                            url = %bot.url,
                            error = %why,
                            "bot failing; its events are queued and retried in order"
                        );
                    }
                    if let Some(tx) = item.reply.take() {
                        let _ = tx.send(Reply::Lost(why));
                    }
                    if lock(&bot.queue).closing {
                        // Shutting down: a failing bot gets no retries, or the shutdown
                        // would wait for it (what is left is dropped, counted).
                        self.dropped(bot, item, "shutdown");
                        return;
                    }
                    tokio::select! {
                        _ = self.state.drain.hard_stopped() => {
                            self.dropped(bot, item, "shutdown");
                            return;
                        }
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// One POST of `item` to `bot`.
    async fn attempt(&self, bot: &Bot, item: &Item, s: &Settings) -> Attempt {
        let mut req =
            Request::post(bot.url.full()).header(header::CONTENT_TYPE, "application/json");
        if let Ok(host) = HeaderValue::from_str(&bot.url.authority()) {
            req = req.header(header::HOST, host);
        }
        if let Some(id) = &item.self_id {
            req = req.header("X-Self-ID", id.clone());
        }
        if let Some(secret) = &s.post_bot_secret {
            req = req.header(
                "X-Signature",
                sign::signature(secret.expose().as_bytes(), &item.body),
            );
        }
        let req = match req.body(Full::new(item.body.clone())) {
            Ok(r) => r,
            Err(e) => return Attempt::Failed(format!("cannot build the request: {e}")),
        };
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| {
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.to_string())
            })?;
            let status = resp.status();
            let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
            let body = Limited::new(resp.into_body(), REPLY_LIMIT)
                .collect()
                .await
                .map_err(|e| format!("answer could not be read: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, content_type, body))
        };
        match tokio::time::timeout(s.post_timeout, call).await {
            Err(_) => Attempt::Failed(format!(
                "no answer within {} ms",
                s.post_timeout.as_millis()
            )),
            Ok(Err(e)) => Attempt::Failed(e),
            Ok(Ok((status, ct, body))) => {
                let code = status.as_u16();
                if status.is_success() {
                    Attempt::Delivered(status, ct, body)
                } else if status.is_server_error() || code == 408 || code == 429 {
                    Attempt::Failed(format!("HTTP {code}"))
                } else {
                    Attempt::Rejected(status, ct, body)
                }
            }
        }
    }

    /// What `/state` shows under the POST lane.
    fn detail(&self) -> serde_json::Value {
        let bots: Vec<serde_json::Value> = self
            .bots
            .iter()
            .map(|b| {
                serde_json::json!({
                    "bot": b.index,
                    "url": b.url.to_string(),
                    "primary": b.index == 0,
                    "reachable": b.reachable.load(Ordering::Relaxed),
                    "queued": b.pending.load(Ordering::Relaxed),
                    "delivered": b.delivered.load(Ordering::Relaxed),
                    "retries": b.retries.load(Ordering::Relaxed),
                    "dropped": b.dropped.load(Ordering::Relaxed),
                })
            })
            .collect();
        let beat = *lock(&self.beats);
        serde_json::json!({
            "self_id": self.self_id(),
            "told": lock(&self.order).told.map(|up| if up { "enable" } else { "disable" }),
            "last_heartbeat_ms_ago": beat.map(|b| b.at.elapsed().as_millis() as u64),
            "bots": bots,
        })
    }
}

/// Whether the bots must be told `up`, having last been told `told`: every change, and
/// the first `enable` (a lane that was never up owes no `disable`).
fn announcement_due(told: Option<bool>, up: bool) -> bool {
    match told {
        None => up,
        Some(t) => t != up,
    }
}

fn no_content() -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// One bot's worker: its queue, in order, one request at a time.
async fn run_bot(relay: Arc<PostRelay>, bot: Arc<Bot>) {
    loop {
        let next = loop {
            let wake = bot.wake.notified();
            {
                let mut q = lock(&bot.queue);
                if let Some(item) = q.items.pop_front() {
                    break Some(item);
                }
                if q.closing {
                    break None;
                }
            }
            tokio::select! {
                _ = wake => {}
                _ = relay.state.drain.hard_stopped() => break None,
            }
        };
        let Some(item) = next else { break };
        relay.deliver(&bot, item).await;
        if relay.state.drain.hard_stop_token().is_cancelled() {
            break;
        }
    }
    // Whatever is left can no longer be delivered.
    let left: Vec<Item> = lock(&bot.queue).items.drain(..).collect();
    for item in left {
        relay.dropped(&bot, item, "shutdown");
    }
    let unlogged = bot.drop_log.take_unlogged();
    if unlogged > 0 {
        tracing::warn!(
            bot = bot.index,
            count = unlogged,
            "more events dropped for this bot (not logged one by one)"
        );
    }
}

/// Queue `enable`/`disable` on every transition of the POST lane, and close the queues at
/// shutdown (after its `disable`).
async fn watch_lifecycle(relay: Arc<PostRelay>) {
    let state = relay.state.clone();
    let mut rx = state.subscribe();
    loop {
        let snap = rx.borrow_and_update().clone();
        relay.announce();
        if snap.lane(Lane::HttpPost).cause == Cause::Shutdown || snap.hard_stop {
            relay.close_bots();
            return;
        }
        let waits = relay.announcement_waits();
        tokio::select! {
            r = rx.changed() => if r.is_err() {
                relay.close_bots();
                return;
            },
            _ = relay.learned.notified() => {}
            _ = tokio::time::sleep(SELF_ID_POLL), if waits => {}
            _ = state.drain.hard_stopped() => {
                relay.close_bots();
                return;
            }
        }
    }
}

/// The heartbeats the backend POSTs: when one is late by `--heartbeat-grace` × its
/// interval, the state hears that they stopped.
async fn watch_beats(relay: Arc<PostRelay>) {
    let state = relay.state.clone();
    let mut reported: Option<Instant> = None;
    loop {
        let beat = *lock(&relay.beats);
        match beat {
            Some(b) if reported != Some(b.at) => {
                let window = b.interval.mul_f64(state.settings().heartbeat_grace);
                tokio::select! {
                    _ = relay.beat.notified() => {}
                    _ = tokio::time::sleep_until((b.at + window).into()) => {
                        if lock(&relay.beats).map(|x| x.at) == Some(b.at) {
                            state.observe_beats(Some(format!(
                                "the backend POSTed no heartbeat for {} ms",
                                window.as_millis()
                            )));
                            state.kick_probe();
                            reported = Some(b.at);
                        }
                    }
                    _ = state.drain.hard_stopped() => return,
                }
            }
            _ => {
                tokio::select! {
                    _ = relay.beat.notified() => {}
                    _ = state.drain.hard_stopped() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_json_object_is_an_event_and_its_head_is_read_leniently() {
        let beat = br#"{"time":1,"self_id":"10001","post_type":"meta_event","meta_event_type":"heartbeat","status":{"online":false,"good":true},"interval":5000}"#;
        let h = EventHead::parse(beat).unwrap();
        assert_eq!(h.self_id(), Some(10001));
        assert!(h.is_heartbeat());
        assert_eq!(EventHead::number(h.interval), Some(5000));
        assert_eq!(h.online(), Some(false));
        let odd = br#"{"self_id":[1],"post_type":"message\u0021","status":"x"}"#;
        let h = EventHead::parse(odd).unwrap();
        assert_eq!(
            (h.self_id(), h.is_heartbeat(), h.online()),
            (None, false, None)
        );
        for bad in [&b"[1,2]"[..], b"{nope", b"", b"  1", b"\xff"] {
            assert!(EventHead::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_change_is_announced_but_a_lane_never_up_owes_nothing() {
        assert!(announcement_due(None, true));
        assert!(!announcement_due(None, false));
        assert!(announcement_due(Some(true), false));
        assert!(!announcement_due(Some(false), false));
    }
}
