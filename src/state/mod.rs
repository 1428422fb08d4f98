//! The one state every transport acts on, and the only thing intent writes to.
//!
//! - [`gate`]: the lanes' states, derived purely from their inputs;
//! - [`settings`]: the effective settings (lifeguard's own, NapCat's overlay on top);
//! - [`sessions`]: the open sessions, counted, and the mass-disable sweep;
//! - [`history`]: the lanes' recent transitions (status page, webhooks);
//! - [`drain`]: every spawned task, and the shutdown order.
//!
//! Inputs and settings change under one lock; each change publishes one [`Snapshot`]
//! (health per lane plus the effective settings) in an `ArcSwap` for handshakes to read
//! with one atomic load, and on a `watch` channel that sessions wait on. Intent modules
//! call the `set_*`/`observe_*` methods; transports read [`State::snapshot`] and
//! [`State::subscribe`]. Nothing in here calls out to code that could call back in.

pub mod backends;
pub mod conns;
pub mod drain;
pub mod gate;
pub mod history;
pub mod sessions;
pub mod settings;

use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};

use crate::config::Settings;
use crate::metrics::Metrics;

pub use backends::{BackendGuard, BackendSet, BackendView};
pub use conns::{ConnPermit, Connections, Refusal};
pub use drain::Drain;
pub use gate::{Cause, Health, HealthSource, Lane, ProbeKind};
pub use history::History;
pub use sessions::{SessionGuard, SessionSet, SweepTicket};
pub use settings::{Origin, Overlay};

/// One consistent view: every lane's state and the settings in force.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub lanes: [Arc<Health>; Lane::COUNT],
    pub settings: Arc<Settings>,
    /// The drain budget is spent: every session ends now, without its end sequence.
    pub hard_stop: bool,
}

impl Snapshot {
    pub fn lane(&self, lane: Lane) -> &Arc<Health> {
        &self.lanes[lane.index()]
    }

    /// The lanes the settings configure, in order.
    pub fn configured(&self) -> Vec<Lane> {
        configured_lanes(&self.settings)
    }

    /// Ready: every configured lane is up.
    pub fn ready(&self) -> bool {
        self.configured().iter().all(|l| self.lane(*l).up)
    }

    /// The lane that speaks for the whole: the first configured lane that is down, else
    /// the first configured one.
    pub fn summary(&self) -> (Lane, &Arc<Health>) {
        let lanes = self.configured();
        let lane = lanes
            .iter()
            .copied()
            .find(|l| !self.lane(*l).up)
            .or_else(|| lanes.first().copied())
            .unwrap_or(Lane::Forward);
        (lane, self.lane(lane))
    }
}

/// The lanes `s` configures: a transport is on when its settings are given.
pub fn configured_lanes(s: &Settings) -> Vec<Lane> {
    let mut lanes = Vec::new();
    if s.upstream.is_some() {
        lanes.push(Lane::Forward);
    }
    if s.reverse_listen.is_some() {
        lanes.push(Lane::Reverse);
    }
    if s.upstream_http.is_some() {
        lanes.push(Lane::HttpApi);
    }
    if s.post_listen.is_some() {
        lanes.push(Lane::HttpPost);
    }
    lanes
}

/// Where each lane's health comes from under `s`.
fn health_sources(s: &Settings) -> [HealthSource; Lane::COUNT] {
    let mut sources = gate::default_sources();
    // The POST lane has no connection of its own to the backend to watch: its HTTP API
    // when there is one, else its forward WebSocket server, else the heartbeats it posts.
    sources[Lane::HttpPost.index()] = if s.upstream_http.is_some() {
        HealthSource::Probe(ProbeKind::Http)
    } else if s.upstream.is_some() {
        HealthSource::Probe(ProbeKind::Ws)
    } else {
        HealthSource::Heartbeats
    };
    sources
}

/// A transport's own figures for `/state` (queues, bots...), produced on demand.
pub type LaneDetail = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What the backend last told about itself (from its own events).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackendInfo {
    pub self_id: Option<u64>,
    /// The raw `status` object of the latest heartbeat.
    pub status: Option<String>,
    pub heartbeat_interval_ms: Option<u64>,
    /// The latest `bot_offline` notice: the account was kicked.
    pub last_kick: Option<Kick>,
}

/// A `bot_offline` notice, as the backend sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Kick {
    pub tag: String,
    pub message: String,
    pub at: std::time::SystemTime,
}

/// A lane's transition, as published.
#[derive(Debug, Clone)]
pub struct Transition {
    pub lane: Lane,
    pub from: Arc<Health>,
    pub to: Arc<Health>,
}

/// What a settings change did.
#[derive(Debug, Clone)]
pub struct SettingsChange {
    pub before: Arc<Settings>,
    pub after: Arc<Settings>,
    /// Keys that differ and took effect.
    pub applied: Vec<&'static str>,
    /// Keys that differ in lifeguard's own settings but wait for a restart.
    pub restart_needed: Vec<&'static str>,
}

struct Core {
    inputs: gate::Inputs,
    layers: settings::Layers,
    /// Published to sessions so that they need no watch of their own for it.
    hard_stop: bool,
}

pub struct State {
    core: Mutex<Core>,
    snapshot: ArcSwap<Snapshot>,
    tx: watch::Sender<Arc<Snapshot>>,
    /// A passive failure (a session's backend socket died): probe now; one per probe.
    probe_now: [Notify; ProbeKind::COUNT],
    /// Per lane, what its transport adds to `/state`.
    details: Mutex<[Option<LaneDetail>; Lane::COUNT]>,
    backend: ArcSwap<BackendInfo>,
    pub sessions: Arc<SessionSet>,
    /// Reverse WebSocket backends connected now, by self id and role.
    pub backends: Arc<BackendSet>,
    /// Client connections held, against `--max-connections` (per address too).
    pub conns: Arc<Connections>,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    /// The configured lanes' recent transitions, in order.
    pub history: History,
}

impl State {
    pub fn new(settings: Settings) -> Arc<State> {
        let mut inputs = gate::Inputs::new(settings.enabled, settings.offline_is_down);
        inputs.sources = health_sources(&settings);
        let layers = settings::Layers::new(settings);
        let lanes = Lane::ALL.map(|l| Health::starting_now(gate::derive(&inputs, l), 0));
        let snap = Arc::new(Snapshot {
            lanes,
            settings: layers.effective().clone(),
            hard_stop: false,
        });
        let metrics = Arc::new(Metrics::new());
        for lane in snap.configured() {
            let h = snap.lane(lane);
            metrics.lane_configured(lane.as_str(), h.up, h.cause.as_str(), &lane_roles(lane));
        }
        let (tx, _) = watch::channel(snap.clone());
        Arc::new(State {
            core: Mutex::new(Core {
                inputs,
                layers,
                hard_stop: false,
            }),
            snapshot: ArcSwap::new(snap),
            tx,
            probe_now: [Notify::new(), Notify::new()],
            details: Mutex::new(Default::default()),
            backend: ArcSwap::from_pointee(BackendInfo::default()),
            sessions: Arc::new(SessionSet::new(metrics.clone())),
            backends: Arc::new(BackendSet::new(metrics.clone())),
            conns: Arc::new(Connections::new(metrics.clone())),
            metrics,
            drain: Drain::default(),
            history: History::default(),
        })
    }

    // --- reading --------------------------------------------------------------------

    /// The current state: one atomic load.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// A receiver that sees every published change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.snapshot.load().settings.clone()
    }

    pub fn backend(&self) -> Arc<BackendInfo> {
        self.backend.load_full()
    }

    /// What NapCat's file currently says about the upstream.
    pub fn napcat_overlay(&self) -> Overlay {
        self.lock().layers.napcat().clone()
    }

    /// lifeguard's own settings, without NapCat's overlay.
    pub fn base_settings(&self) -> Settings {
        self.lock().layers.base().clone()
    }

    // --- writing (intent) -----------------------------------------------------------

    /// `POST /disable` / `POST /enable`.
    pub fn set_admin_enabled(&self, enabled: bool) {
        self.update(|c| c.inputs.admin_enabled = enabled);
    }

    /// SIGTERM/SIGINT: down for good, with cause `shutdown`.
    pub fn begin_shutdown(&self) {
        self.update(|c| c.inputs.shutting_down = true);
    }

    /// lifeguard's own settings were (re)loaded.
    pub fn set_base_settings(&self, base: Settings) -> SettingsChange {
        self.change_settings(Origin::Config, |c| c.layers.set_base(base))
    }

    /// NapCat's file: what it says about the upstream, and, per lane, whether the server
    /// it relays is on (`off[lane]`: why not). One publication, so a file that switches a
    /// server off and moves another is one change.
    pub fn set_napcat(
        &self,
        overlay: Overlay,
        off: [Option<String>; Lane::COUNT],
    ) -> SettingsChange {
        self.change_settings(Origin::Napcat, |c| {
            c.layers.set_napcat(overlay);
            c.inputs.napcat_off = off;
        })
    }

    /// NapCat's file is no longer followed: it has no say any more.
    pub fn clear_napcat(&self) {
        self.change_settings(Origin::Napcat, |c| {
            c.layers.set_napcat(Overlay::default());
            c.inputs.napcat_off = Default::default();
        });
    }

    /// The epoch of probe `kind` and the settings it should use now.
    pub fn probe_target(&self, kind: ProbeKind) -> (u64, Arc<Settings>) {
        let core = self.lock();
        (
            core.inputs.probe_epoch[kind.index()],
            core.layers.effective().clone(),
        )
    }

    /// A probe's outcome. Ignored when its address moved since the probe started.
    pub fn observe_probe(&self, kind: ProbeKind, epoch: u64, result: Result<(), String>) {
        self.update(|c| {
            if c.inputs.probe_epoch[kind.index()] != epoch {
                return;
            }
            let s = c.layers.effective();
            let (fall, rise) = (s.fall, s.rise);
            c.inputs.observe_probe(kind, result, fall, rise);
        });
    }

    /// The QQ account's login state, as the backend just reported it.
    pub fn observe_online(&self, online: bool) {
        if self.lock().inputs.online == online {
            return;
        }
        self.update(|c| {
            c.inputs.online = online;
            if online {
                c.inputs.kicked = None;
            }
        });
    }

    /// The backend said the account was just kicked offline (a `bot_offline` notice):
    /// offline at once, with the backend's words in the reason. Every event session gets
    /// the same notice; only the first changes anything.
    pub fn observe_kicked(&self, tag: &str, message: &str) {
        let what = format!("{tag}: {message}");
        {
            let core = self.lock();
            if !core.inputs.online && core.inputs.kicked.as_deref() == Some(what.as_str()) {
                return;
            }
        }
        tracing::warn!(
            kick_tag = tag,
            kick_message = message,
            "the backend's QQ account was kicked offline (bot_offline notice)"
        );
        // Before the transition: sessions that hear of it look for the kick here.
        self.backend.rcu(|cur| BackendInfo {
            last_kick: Some(Kick {
                tag: tag.to_string(),
                message: message.to_string(),
                at: std::time::SystemTime::now(),
            }),
            ..(**cur).clone()
        });
        self.update(|c| {
            c.inputs.online = false;
            c.inputs.kicked = Some(what);
        });
    }

    /// What a session learned from a backend event. Cheap when nothing changed.
    pub fn observe_backend(
        &self,
        self_id: Option<u64>,
        status: Option<&str>,
        interval_ms: Option<u64>,
    ) {
        let cur = self.backend.load();
        let changed = (self_id.is_some() && self_id != cur.self_id)
            || (status.is_some() && status != cur.status.as_deref())
            || (interval_ms.is_some() && interval_ms != cur.heartbeat_interval_ms);
        if !changed {
            return;
        }
        self.backend.rcu(|cur| {
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
            next
        });
    }

    /// A session's backend socket failed: probe now instead of at the next interval.
    pub fn kick_probe(&self) {
        for n in &self.probe_now {
            n.notify_one();
        }
    }

    /// A request on one probe's address failed: run that probe now.
    pub fn kick_probe_of(&self, kind: ProbeKind) {
        self.probe_now[kind.index()].notify_one();
    }

    /// Resolves when probe `kind` was asked for.
    pub async fn probe_kicked(&self, kind: ProbeKind) {
        self.probe_now[kind.index()].notified().await
    }

    /// The heartbeats the backend POSTs stopped (why), or came again (`None`).
    pub fn observe_beats(&self, lapsed: Option<String>) {
        if self.lock().inputs.beats_lapsed == lapsed {
            return;
        }
        self.update(|c| c.inputs.beats_lapsed = lapsed);
    }

    /// A transport's figures for its lane in `/state`.
    pub fn set_lane_detail(&self, lane: Lane, detail: LaneDetail) {
        let mut d = self.details.lock().unwrap_or_else(|e| e.into_inner());
        d[lane.index()] = Some(detail);
    }

    /// What the lane's transport adds to `/state`, if anything (computed now, no lock held).
    pub fn lane_detail(&self, lane: Lane) -> Option<serde_json::Value> {
        let f = self.details.lock().unwrap_or_else(|e| e.into_inner())[lane.index()].clone();
        f.map(|f| f())
    }

    /// Stop accepting, tell every session lifeguard is going away, and wait for them
    /// (within `drain_timeout`), then for the background tasks. True when drained.
    pub async fn shutdown(&self) -> bool {
        let budget = self.settings().drain_timeout;
        tracing::info!(
            sessions = self.sessions.total(),
            tasks = self.drain.session_tasks(),
            budget_ms = budget.as_millis() as u64,
            "shutting down"
        );
        let drained = self
            .drain
            .shutdown(
                budget,
                || self.begin_shutdown(),
                || self.update(|c| c.hard_stop = true),
            )
            .await;
        tracing::info!(drained, "stopped");
        drained
    }

    // --- publishing -----------------------------------------------------------------

    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn change_settings(&self, origin: Origin, f: impl FnOnce(&mut Core)) -> SettingsChange {
        let mut change = None;
        self.update(|c| {
            let before = c.layers.effective().clone();
            f(c);
            let after = c.layers.effective().clone();
            if before.upstream != after.upstream {
                let (by, reason) = match origin {
                    Origin::Config => (
                        Cause::Config,
                        format!("lifeguard's config moved the upstream to {}", show(&after)),
                    ),
                    Origin::Napcat => (
                        Cause::NapcatConfig,
                        format!(
                            "NapCat's config moved its WebSocket server to {}",
                            show(&after)
                        ),
                    ),
                };
                c.inputs.retarget(ProbeKind::Ws, by, reason);
            }
            if before.upstream_http != after.upstream_http && after.upstream_http.is_some() {
                let reason = format!(
                    "lifeguard's config moved the HTTP upstream to {}",
                    after
                        .upstream_http
                        .as_ref()
                        .map(|u| u.to_string())
                        .unwrap_or_default()
                );
                c.inputs.retarget(ProbeKind::Http, Cause::Config, reason);
            }
            c.inputs.sources = health_sources(&after);
            c.inputs.config_enabled = after.enabled;
            c.inputs.offline_is_down = after.offline_is_down;
            change = Some(SettingsChange {
                applied: before.live_changes(&after),
                restart_needed: c.layers.restart_needed(),
                before,
                after,
            });
        });
        let change = change.expect("update ran");
        if !change.applied.is_empty() {
            // The prober may be asleep for an interval that just changed, or about to
            // probe an address or with a token that just changed: probe now.
            self.kick_probe();
        }
        change
    }

    /// Change inputs, derive every lane, publish when anything changed. Logging happens
    /// after the lock is released.
    fn update(&self, f: impl FnOnce(&mut Core)) {
        let transitions = {
            let mut core = self.lock();
            f(&mut core);
            self.publish(&core)
        };
        for t in transitions {
            if !configured_lanes(&self.settings()).contains(&t.lane) {
                continue;
            }
            tracing::info!(
                lane = t.lane.as_str(),
                state = if t.to.up { "up" } else { "down" },
                cause = %t.to.cause,
                reason = %t.to.reason,
                previous = %t.from.cause,
                previous_for_ms = t.from.since_instant.elapsed().as_millis() as u64,
                "upstream state changed"
            );
        }
    }

    /// Called with the lock held, so publications happen in the order of the changes.
    fn publish(&self, core: &Core) -> Vec<Transition> {
        let old = self.snapshot.load_full();
        let mut lanes = old.lanes.clone();
        let mut transitions = Vec::new();
        for lane in Lane::ALL {
            let prev = &old.lanes[lane.index()];
            let (up, cause, reason) = gate::derive(&core.inputs, lane);
            if prev.up == up && prev.cause == cause {
                if !up && prev.reason != reason {
                    // Same state, better words (the latest probe error): no transition.
                    lanes[lane.index()] = Arc::new(Health {
                        reason,
                        ..(**prev).clone()
                    });
                }
                continue;
            }
            let next = Health::starting_now((up, cause, reason), prev.generation + 1);
            lanes[lane.index()] = next.clone();
            transitions.push(Transition {
                lane,
                from: prev.clone(),
                to: next,
            });
        }
        let settings = core.layers.effective();
        let same_lanes = lanes.iter().zip(&old.lanes).all(|(a, b)| Arc::ptr_eq(a, b));
        if same_lanes && Arc::ptr_eq(settings, &old.settings) && core.hard_stop == old.hard_stop {
            return transitions;
        }
        // Prepared before any session hears of it: every session of a lane that just went
        // down takes part in the sweep.
        let went_down: Vec<Lane> = transitions
            .iter()
            .filter(|t| t.from.up && !t.to.up)
            .map(|t| t.lane)
            .collect();
        if !went_down.is_empty() {
            self.sessions.begin_sweep(&went_down);
        }
        let configured = configured_lanes(settings);
        let self_id = self.backend.load().self_id;
        for t in &transitions {
            if configured.contains(&t.lane) {
                self.metrics.transition(
                    t.lane.as_str(),
                    t.to.up,
                    t.from.cause.as_str(),
                    t.to.cause.as_str(),
                );
                // The sessions the sweep just counted: every one of them is being closed.
                let sessions_closed = if t.from.up && !t.to.up {
                    self.sessions.open_by_role(t.lane).iter().sum()
                } else {
                    0
                };
                self.history.push(history::Record {
                    seq: 0,
                    at: t.to.since,
                    lane: t.lane,
                    up: t.to.up,
                    cause: t.to.cause,
                    reason: t.to.reason.clone(),
                    previous_up: t.from.up,
                    previous_cause: t.from.cause,
                    previous_for: t.to.since_instant.duration_since(t.from.since_instant),
                    sessions_closed,
                    self_id,
                });
            }
        }
        if !Arc::ptr_eq(settings, &old.settings) {
            for lane in configured {
                if !configured_lanes(&old.settings).contains(&lane) {
                    self.metrics.lane_configured(
                        lane.as_str(),
                        lanes[lane.index()].up,
                        lanes[lane.index()].cause.as_str(),
                        &lane_roles(lane),
                    );
                }
            }
        }
        let snap = Arc::new(Snapshot {
            lanes,
            settings: settings.clone(),
            hard_stop: core.hard_stop,
        });
        self.snapshot.store(snap.clone());
        self.tx.send_replace(snap);
        transitions
    }
}

/// The path roles a lane's sessions can have, for their metric series.
fn lane_roles(lane: Lane) -> Vec<crate::proto::onebot::Role> {
    use crate::proto::onebot::Role;
    match lane {
        Lane::Forward | Lane::Reverse => vec![Role::Api, Role::Event, Role::Universal],
        Lane::HttpApi => vec![Role::Api],
        Lane::HttpPost => vec![Role::Event],
    }
}

fn show(s: &Settings) -> String {
    s.upstream
        .as_ref()
        .map(|u| u.to_string())
        .unwrap_or_else(|| "(none)".into())
}
