//! Prometheus metrics (`GET /metrics` on the admin listener), with prometheus-client.
//!
//! Hot-path counters (frames and bytes relayed) are plain handles taken once, so relaying
//! costs one relaxed atomic add per read batch, not a label lookup. Per-lane series carry
//! `lane` (the state's) or `transport` (sessions, handshakes) labels with the lane's name,
//! and exist only for lanes that are configured.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::proto::onebot::Role;

type Labels = Vec<(&'static str, String)>;

/// One bot's pre-resolved series (the POST relay's hot path).
#[derive(Clone)]
pub struct PostBotMetrics {
    bot: String,
    pub delivered: Counter,
    pub retries: Counter,
    pub queued: Gauge,
}

/// Shards of the relayed-traffic counters: more than the worker threads there are.
const SHARDS: usize = 16;

/// One thread's (frames, bytes) to the client and to the backend, alone on its cache line.
#[derive(Default)]
#[repr(align(128))]
struct RelayedShard([AtomicU64; 4]);

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's shard, handed out round robin.
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

/// Every metric lifeguard exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    upstream_up: Family<Labels, Gauge>,
    upstream_cause: Family<Labels, Gauge>,
    state_seconds: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    transitions: Family<Labels, Counter>,
    probe_seconds: Family<Labels, Histogram>,
    sessions_open: Family<Labels, Gauge>,
    sessions_closed: Family<Labels, Counter>,
    handshakes: Family<Labels, Counter>,
    reloads: Family<Labels, Counter>,
    http_api_requests: Family<Labels, Counter>,
    post_received: Family<Labels, Counter>,
    post_delivered: Family<Labels, Counter>,
    post_retries: Family<Labels, Counter>,
    post_dropped: Family<Labels, Counter>,
    post_queued: Family<Labels, Gauge>,
    post_quick: Family<Labels, Counter>,
    post_lifecycle: Family<Labels, Counter>,
    connections_open: Gauge,
    connections_refused: Family<Labels, Counter>,
    probes_skipped: Family<Labels, Counter>,
    notify_delivered: Counter,
    notify_dropped: Family<Labels, Counter>,
    reverse_backends: Family<Labels, Gauge>,
    reverse_bots: Family<Labels, Gauge>,
    reverse_online: Family<Labels, Gauge>,
    /// Pre-resolved handles for the hot path: (frames, bytes) to the client and to the backend.
    to_client: (Counter, Counter),
    to_backend: (Counter, Counter),
    /// What the hot path adds, per worker thread, before a scrape folds it into the four
    /// counters above: one shared counter per direction would bounce its cache line
    /// between cores on every request.
    relayed_shards: Box<[RelayedShard; SHARDS]>,
}

fn l(k: &'static str, v: impl Into<String>) -> Labels {
    vec![(k, v.into())]
}

fn lane_cause(lane: &'static str, cause: &str) -> Labels {
    vec![("lane", lane.to_string()), ("cause", cause.to_string())]
}

fn session(transport: &'static str, role: Role) -> Labels {
    vec![
        ("transport", transport.to_string()),
        ("path", role.as_str().to_string()),
    ]
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("lifeguard");
        let upstream_up = Family::<Labels, Gauge>::default();
        let upstream_cause = Family::<Labels, Gauge>::default();
        let state_seconds = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let transitions = Family::<Labels, Counter>::default();
        let probe_seconds: Family<Labels, Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 14)));
        let sessions_open = Family::<Labels, Gauge>::default();
        let sessions_closed = Family::<Labels, Counter>::default();
        let frames = Family::<Labels, Counter>::default();
        let bytes = Family::<Labels, Counter>::default();
        let handshakes = Family::<Labels, Counter>::default();
        let reloads = Family::<Labels, Counter>::default();
        let http_api_requests = Family::<Labels, Counter>::default();
        let post_received = Family::<Labels, Counter>::default();
        let post_delivered = Family::<Labels, Counter>::default();
        let post_retries = Family::<Labels, Counter>::default();
        let post_dropped = Family::<Labels, Counter>::default();
        let post_queued = Family::<Labels, Gauge>::default();
        let post_quick = Family::<Labels, Counter>::default();
        let post_lifecycle = Family::<Labels, Counter>::default();
        let connections_open = Gauge::default();
        let connections_refused = Family::<Labels, Counter>::default();
        let probes_skipped = Family::<Labels, Counter>::default();
        r.register(
            "client_connections_open",
            "Client connections held (handshaking or relaying), counted against --max-connections",
            connections_open.clone(),
        );
        r.register(
            "client_connections_refused",
            "Client connections answered 503 before any handshake, by cause (capacity, per-ip-limit, fd-exhausted)",
            connections_refused.clone(),
        );
        r.register(
            "probes_skipped",
            "Probes that could not run for a local reason (no file descriptor), not counted against the backend",
            probes_skipped.clone(),
        );
        let notify_delivered = Counter::default();
        let notify_dropped = Family::<Labels, Counter>::default();
        let reverse_backends = Family::<Labels, Gauge>::default();
        let reverse_bots = Family::<Labels, Gauge>::default();
        let reverse_online = Family::<Labels, Gauge>::default();
        r.register(
            "reverse_backend_connections",
            "Reverse WebSocket: backend connections open, by self id and role",
            reverse_backends.clone(),
        );
        r.register(
            "reverse_bot_connections",
            "Reverse WebSocket: bot connections open (lifeguard dialled them), by self id",
            reverse_bots.clone(),
        );
        r.register(
            "reverse_backend_online",
            "Reverse WebSocket: 1 while the backend's QQ account is online, 0 offline, by self id",
            reverse_online.clone(),
        );
        r.register(
            "upstream_up",
            "1 when the lane is up (accepting sessions), 0 when down, by lane",
            upstream_up.clone(),
        );
        r.register(
            "upstream_cause",
            "1 for the cause of the lane's current state (healthy, starting, admin, config, napcat-config, unhealthy, offline, shutdown), by lane and cause",
            upstream_cause.clone(),
        );
        r.register(
            "upstream_state_seconds",
            "Seconds since the lane's state last changed, by lane",
            state_seconds.clone(),
        );
        r.register(
            "upstream_transitions",
            "State transitions, by lane and the new state's cause",
            transitions.clone(),
        );
        r.register(
            "probe_duration_seconds",
            "Active probe duration, by probe (ws: a handshake on /api; http: get_status) and result",
            probe_seconds.clone(),
        );
        r.register(
            "sessions_open",
            "Open sessions, by transport and path role",
            sessions_open.clone(),
        );
        r.register(
            "sessions_closed",
            "Closed sessions, by transport, cause and close code sent",
            sessions_closed.clone(),
        );
        r.register(
            "frames_relayed",
            "Frames relayed, by direction",
            frames.clone(),
        );
        r.register(
            "bytes_relayed",
            "Bytes relayed (frames included whole), by direction",
            bytes.clone(),
        );
        r.register(
            "handshakes",
            "Client handshakes answered, by transport and HTTP status",
            handshakes.clone(),
        );
        r.register(
            "config_reloads",
            "Config reloads, by result",
            reloads.clone(),
        );
        r.register(
            "http_api_requests",
            "HTTP API calls answered on the client port, by HTTP status",
            http_api_requests.clone(),
        );
        r.register(
            "post_received",
            "Event POSTs from the backend, by result (accepted, refused while disabled, unauthorized, forbidden, bad-request, too-large)",
            post_received.clone(),
        );
        r.register(
            "post_delivered",
            "Events (the lifecycle ones included) a bot acknowledged with a 2xx, by bot (0 is the primary)",
            post_delivered.clone(),
        );
        r.register(
            "post_retries",
            "Repeated attempts to deliver an event to a failing bot, by bot",
            post_retries.clone(),
        );
        r.register(
            "post_dropped",
            "Events given up on for a bot, by bot and reason (queue-full, expired, rejected, shutdown)",
            post_dropped.clone(),
        );
        r.register(
            "post_queued",
            "Events waiting for a bot (the one being sent included), by bot",
            post_queued.clone(),
        );
        r.register(
            "post_quick_operations",
            "Backend POSTs answered with the primary bot's reply (relayed) or with 204 because it could not be had (lost)",
            post_quick.clone(),
        );
        r.register(
            "post_lifecycle",
            "Lifecycle events lifeguard queued for a bot, by bot and sub_type (enable, disable)",
            post_lifecycle.clone(),
        );
        r.register(
            "notify_delivered",
            "Webhook posts (--notify-url) a receiver accepted with a 2xx",
            notify_delivered.clone(),
        );
        r.register(
            "notify_dropped",
            "Webhook posts given up, by reason: failed (every retry failed), queue_full (the receiver was too slow), missed (the history ring overran)",
            notify_dropped.clone(),
        );
        for reason in ["failed", "queue_full", "missed"] {
            let _ = notify_dropped.get_or_create(&l("reason", reason));
        }
        let to_client = (
            frames.get_or_create(&l("direction", "to_client")).clone(),
            bytes.get_or_create(&l("direction", "to_client")).clone(),
        );
        let to_backend = (
            frames.get_or_create(&l("direction", "to_backend")).clone(),
            bytes.get_or_create(&l("direction", "to_backend")).clone(),
        );
        for result in ["ok", "failed"] {
            let _ = reloads.get_or_create(&l("result", result));
        }
        // At 0 from the start: `increase()` cannot see a series' first increment.
        for cause in ["capacity", "per-ip-limit", "fd-exhausted"] {
            let _ = connections_refused.get_or_create(&l("cause", cause));
        }
        Metrics {
            registry: Mutex::new(r),
            upstream_up,
            upstream_cause,
            state_seconds,
            transitions,
            probe_seconds,
            sessions_open,
            sessions_closed,
            handshakes,
            reloads,
            http_api_requests,
            post_received,
            post_delivered,
            post_retries,
            post_dropped,
            post_queued,
            post_quick,
            post_lifecycle,
            connections_open,
            connections_refused,
            probes_skipped,
            notify_delivered,
            notify_dropped,
            reverse_backends,
            reverse_bots,
            reverse_online,
            to_client,
            to_backend,
            relayed_shards: Box::new(std::array::from_fn(|_| RelayedShard::default())),
        }
    }

    /// A configured lane's state: its series exist from now on, sessions' included.
    pub fn lane_configured(&self, lane: &'static str, up: bool, cause: &str, roles: &[Role]) {
        self.upstream_up
            .get_or_create(&l("lane", lane))
            .set(up as i64);
        self.upstream_cause
            .get_or_create(&lane_cause(lane, cause))
            .set(1);
        for role in roles {
            let _ = self.sessions_open.get_or_create(&session(lane, *role));
        }
    }

    /// A lane changed state (from the cause `was`): its up and cause gauges, and
    /// transitions by the new cause.
    pub fn transition(&self, lane: &'static str, up: bool, was: &str, cause: &str) {
        self.upstream_up
            .get_or_create(&l("lane", lane))
            .set(up as i64);
        self.upstream_cause
            .get_or_create(&lane_cause(lane, was))
            .set(0);
        self.upstream_cause
            .get_or_create(&lane_cause(lane, cause))
            .set(1);
        self.transitions
            .get_or_create(&vec![
                ("lane", lane.to_string()),
                ("cause", cause.to_string()),
            ])
            .inc();
    }

    /// One probe (`ws` or `http`) took `d`.
    pub fn probe_done(&self, probe: &'static str, d: Duration, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.probe_seconds
            .get_or_create(&vec![
                ("probe", probe.to_string()),
                ("result", result.to_string()),
            ])
            .observe(d.as_secs_f64());
    }

    /// An HTTP API call was answered with `status`.
    pub fn http_api_answered(&self, status: u16) {
        self.http_api_requests
            .get_or_create(&l("status", status.to_string()))
            .inc();
    }

    /// A POST from the backend, by what became of it.
    pub fn post_received(&self, result: &'static str) {
        self.post_received.get_or_create(&l("result", result)).inc();
    }

    /// The series of bot `bot` (its index in `--post-url`), created at once so that they
    /// read 0 before anything happens; the hot-path handles.
    pub fn post_bot(&self, bot: usize) -> PostBotMetrics {
        let b = l("bot", bot.to_string());
        for reason in ["queue-full", "expired", "rejected", "shutdown"] {
            let _ = self.post_dropped.get_or_create(&vec![
                ("bot", bot.to_string()),
                ("reason", reason.to_string()),
            ]);
        }
        for sub_type in ["enable", "disable"] {
            let _ = self.post_lifecycle.get_or_create(&vec![
                ("bot", bot.to_string()),
                ("sub_type", sub_type.to_string()),
            ]);
        }
        for result in ["relayed", "lost"] {
            let _ = self.post_quick.get_or_create(&l("result", result));
        }
        PostBotMetrics {
            bot: bot.to_string(),
            delivered: self.post_delivered.get_or_create(&b).clone(),
            retries: self.post_retries.get_or_create(&b).clone(),
            queued: self.post_queued.get_or_create(&b).clone(),
        }
    }

    /// `n` events were given up on for a bot.
    pub fn post_dropped(&self, bot: &PostBotMetrics, reason: &'static str, n: u64) {
        self.post_dropped
            .get_or_create(&vec![
                ("bot", bot.bot.clone()),
                ("reason", reason.to_string()),
            ])
            .inc_by(n);
    }

    /// A lifecycle event was queued for a bot.
    pub fn post_lifecycle(&self, bot: &PostBotMetrics, sub_type: &'static str) {
        self.post_lifecycle
            .get_or_create(&vec![
                ("bot", bot.bot.clone()),
                ("sub_type", sub_type.to_string()),
            ])
            .inc();
    }

    /// A backend POST got the primary's reply (`relayed`) or a 204 instead (`lost`).
    pub fn post_quick(&self, result: &'static str) {
        self.post_quick.get_or_create(&l("result", result)).inc();
    }

    pub fn session_opened(&self, transport: &'static str, role: Role) {
        self.sessions_open
            .get_or_create(&session(transport, role))
            .inc();
    }

    pub fn session_aborted(&self, transport: &'static str, role: Role) {
        self.sessions_open
            .get_or_create(&session(transport, role))
            .dec();
    }

    pub fn session_closed(
        &self,
        transport: &'static str,
        role: Role,
        cause: &str,
        code: Option<u16>,
    ) {
        self.sessions_open
            .get_or_create(&session(transport, role))
            .dec();
        let code = code.map(|c| c.to_string()).unwrap_or_else(|| "none".into());
        self.sessions_closed
            .get_or_create(&vec![
                ("transport", transport.to_string()),
                ("cause", cause.to_string()),
                ("code", code),
            ])
            .inc();
    }

    /// Frames and bytes just relayed (deltas), per read batch: an uncontended add to this
    /// thread's shard.
    pub fn relayed(&self, to_client: bool, frames: u64, bytes: u64) {
        let shard = &self.relayed_shards[SHARD.with(|s| *s)];
        let i = if to_client { 0 } else { 2 };
        shard.0[i].fetch_add(frames, Ordering::Relaxed);
        shard.0[i + 1].fetch_add(bytes, Ordering::Relaxed);
    }

    /// Fold the shards into the exported counters (only `render` calls it, under the
    /// registry lock, so no two folds race).
    fn fold_relayed(&self) {
        let mut sums = [0u64; 4];
        for shard in self.relayed_shards.iter() {
            for (sum, v) in sums.iter_mut().zip(&shard.0) {
                *sum += v.load(Ordering::Relaxed);
            }
        }
        let exported = [
            &self.to_client.0,
            &self.to_client.1,
            &self.to_backend.0,
            &self.to_backend.1,
        ];
        for (counter, sum) in exported.into_iter().zip(sums) {
            let delta = sum.saturating_sub(counter.get());
            if delta > 0 {
                counter.inc_by(delta);
            }
        }
    }

    pub fn handshake(&self, transport: &'static str, status: u16) {
        self.handshakes
            .get_or_create(&vec![
                ("transport", transport.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    /// A reverse backend connection opened (+1) or closed (-1).
    pub fn reverse_backend(&self, self_id: &str, role: Role, delta: i64) {
        let g = self.reverse_backends.get_or_create(&vec![
            ("self_id", self_id.to_string()),
            ("role", role.as_str().to_string()),
        ]);
        g.inc_by(delta);
    }

    /// A bot connection of a reverse backend opened (+1) or closed (-1).
    pub fn reverse_bot(&self, self_id: &str, delta: i64) {
        self.reverse_bots
            .get_or_create(&l("self_id", self_id))
            .inc_by(delta);
    }

    /// A reverse backend's account state, as it last told.
    pub fn reverse_online(&self, self_id: &str, online: bool) {
        self.reverse_online
            .get_or_create(&l("self_id", self_id))
            .set(online as i64);
    }

    pub fn connections_open(&self, n: usize) {
        self.connections_open.set(n as i64);
    }

    pub fn connection_refused(&self, cause: &'static str) {
        self.connections_refused
            .get_or_create(&l("cause", cause))
            .inc();
    }

    pub fn probe_skipped(&self, reason: &'static str) {
        self.probes_skipped
            .get_or_create(&l("reason", reason))
            .inc();
    }

    pub fn reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&l("result", if ok { "ok" } else { "failed" }))
            .inc();
    }

    /// A webhook post was accepted.
    pub fn notify_delivered(&self) {
        self.notify_delivered.inc();
    }

    /// `n` webhook posts were given up for `reason` (`failed`, `queue_full`, `missed`).
    pub fn notify_dropped(&self, reason: &'static str, n: u64) {
        self.notify_dropped
            .get_or_create(&l("reason", reason))
            .inc_by(n);
    }

    /// The text exposition format; `state_for` is how long each configured lane's
    /// current state has lasted.
    pub fn render(&self, state_for: &[(&'static str, Duration)]) -> String {
        for (lane, d) in state_for {
            self.state_seconds
                .get_or_create(&l("lane", *lane))
                .set(d.as_secs_f64());
        }
        let mut out = String::new();
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        self.fold_relayed();
        if encode(&mut out, &reg).is_err() {
            out.clear();
        }
        out
    }
}
