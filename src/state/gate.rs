//! The gate: what the backend's state is, derived purely from its inputs.
//!
//! Inputs are the operator's intent (admin API, lifeguard's config, NapCat's config,
//! shutdown) and the backend's health (probes, account state). [`derive`] turns them into
//! one [`Health`] per [`Lane`]: each transport lifeguard relays is a lane, because NapCat
//! switches each of its servers on and off separately while the operator's switch applies
//! to all of them. Locking, publishing and transitions are [`super::State`]'s business;
//! nothing here has side effects.

use std::fmt;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::proto::ws;

/// Why a lane is not serving (or `Healthy` when it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    Healthy,
    /// No probe has succeeded yet since lifeguard started.
    Starting,
    /// `POST /disable` on the admin listener.
    Admin,
    /// `enabled = false` in lifeguard's config file, or the config moved the upstream.
    Config,
    /// The backend's own config file says this server is off, or moved it.
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

    /// The Close code sessions get when their lane goes down for this cause.
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

/// A transport lifeguard relays, with its own state: NapCat switches each of its servers
/// on and off separately, and each transport's health comes from its own source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lane {
    /// Forward WebSocket: bots dial lifeguard, lifeguard dials the backend's server.
    Forward,
    /// Reverse WebSocket: the backend dials lifeguard, lifeguard dials the bots.
    Reverse,
    /// HTTP API: bots call lifeguard, lifeguard calls the backend's HTTP server.
    HttpApi,
    /// HTTP POST: the backend posts events to lifeguard, lifeguard posts them to the bots.
    HttpPost,
}

impl Lane {
    pub const ALL: [Lane; 4] = [Lane::Forward, Lane::Reverse, Lane::HttpApi, Lane::HttpPost];
    pub const COUNT: usize = Lane::ALL.len();

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Forward => "forward",
            Lane::Reverse => "reverse",
            Lane::HttpApi => "http-api",
            Lane::HttpPost => "http-post",
        }
    }
}

/// An active probe of the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// A WebSocket handshake on the forward server's `/api`.
    Ws,
    /// A `get_status` call on the HTTP API server.
    Http,
}

impl ProbeKind {
    pub const COUNT: usize = 2;

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Where a lane's health comes from, once the operator's intent and NapCat's config let
/// it serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthSource {
    /// An active probe (with passive kicks), and the account state.
    Probe(ProbeKind),
    /// Each connection's own (the backend dials in: socket, heartbeats, account state are
    /// that session's business), so the lane itself follows intent only.
    OwnConnections,
}

/// One lane's state. Immutable; a change makes a new one.
#[derive(Debug, Clone)]
pub struct Health {
    pub up: bool,
    pub cause: Cause,
    /// A human sentence: what happened (goes into Close reasons, 503 bodies, logs).
    pub reason: String,
    pub since: SystemTime,
    pub since_instant: Instant,
    /// Transitions of this lane so far; sessions tell one from the next by it.
    pub generation: u64,
}

impl Health {
    /// A state that starts now.
    pub(super) fn starting_now(
        (up, cause, reason): (bool, Cause, String),
        generation: u64,
    ) -> Arc<Health> {
        Arc::new(Health {
            up,
            cause,
            reason,
            since: SystemTime::now(),
            since_instant: Instant::now(),
            generation,
        })
    }
}

/// HAProxy-style rise/fall counter.
#[derive(Debug, Clone, Default)]
pub(super) struct ProbeCounter {
    pub healthy: bool,
    /// At least one probe has completed (for the current upstream).
    pub started: bool,
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
    pub last_error: String,
}

impl ProbeCounter {
    pub fn observe(&mut self, result: Result<(), String>, fall: u32, rise: u32) {
        match result {
            Ok(()) => {
                self.consecutive_fail = 0;
                self.consecutive_ok = self.consecutive_ok.saturating_add(1);
                // At start one success is enough; after a fall, `rise` are needed.
                if !self.started || self.consecutive_ok >= rise {
                    self.healthy = true;
                }
            }
            Err(e) => {
                self.consecutive_ok = 0;
                self.consecutive_fail = self.consecutive_fail.saturating_add(1);
                if self.consecutive_fail >= fall {
                    self.healthy = false;
                }
                self.last_error = e;
            }
        }
        self.started = true;
    }
}

/// Everything the lanes' states are derived from. Changed only under the state's lock.
#[derive(Debug, Clone)]
pub(super) struct Inputs {
    pub shutting_down: bool,
    /// `POST /disable` / `POST /enable`.
    pub admin_enabled: bool,
    /// `enabled` in lifeguard's (effective) settings.
    pub config_enabled: bool,
    /// Per lane: why NapCat's file has the matching server off (`None`: on).
    pub napcat_off: [Option<String>; Lane::COUNT],
    /// Where each lane's health comes from (set from the settings).
    pub sources: [HealthSource; Lane::COUNT],
    /// Per probe: the address it probes moved (who moved it, reason). Down until the
    /// first probe of the new address answers.
    pub retarget: [Option<(Cause, String)>; ProbeKind::COUNT],
    pub probes: [ProbeCounter; ProbeKind::COUNT],
    /// Per probe, bumped when its address moves: results of probes started before are
    /// stale.
    pub probe_epoch: [u64; ProbeKind::COUNT],
    /// QQ login state, as the backend last told.
    pub online: bool,
    /// What the backend said when it kicked the account offline (a `bot_offline`
    /// notice's tag and message); cleared when the account is back online.
    pub kicked: Option<String>,
    pub offline_is_down: bool,
}

impl Inputs {
    pub fn new(config_enabled: bool, offline_is_down: bool) -> Inputs {
        Inputs {
            shutting_down: false,
            admin_enabled: true,
            config_enabled,
            napcat_off: Default::default(),
            sources: default_sources(),
            retarget: Default::default(),
            probes: Default::default(),
            probe_epoch: [0; ProbeKind::COUNT],
            online: true,
            kicked: None,
            offline_is_down,
        }
    }

    /// The address `kind` probes moved: forget what was known of the old one.
    pub fn retarget(&mut self, kind: ProbeKind, by: Cause, reason: String) {
        let k = kind.index();
        self.retarget[k] = Some((by, reason));
        self.probes[k] = ProbeCounter::default();
        self.probe_epoch[k] += 1;
        self.online = true;
        self.kicked = None;
    }

    /// A probe of the current address answered (or failed): the move is over.
    pub fn observe_probe(
        &mut self,
        kind: ProbeKind,
        result: Result<(), String>,
        fall: u32,
        rise: u32,
    ) {
        let k = kind.index();
        self.retarget[k] = None;
        self.probes[k].observe(result, fall, rise);
    }
}

/// Each lane's health source before the settings say otherwise.
pub(super) fn default_sources() -> [HealthSource; Lane::COUNT] {
    Lane::ALL.map(|lane| match lane {
        Lane::Forward => HealthSource::Probe(ProbeKind::Ws),
        Lane::Reverse => HealthSource::OwnConnections,
        Lane::HttpApi => HealthSource::Probe(ProbeKind::Http),
        Lane::HttpPost => HealthSource::Probe(ProbeKind::Ws),
    })
}

/// The state the inputs imply for `lane`: (up, cause, reason). The operator's intent
/// comes first, then the backend's configuration, then the lane's health source.
pub(super) fn derive(i: &Inputs, lane: Lane) -> (bool, Cause, String) {
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
    } else if let Some(why) = &i.napcat_off[lane.index()] {
        (Cause::NapcatConfig, why.clone())
    } else {
        match i.sources[lane.index()] {
            HealthSource::Probe(kind) => probed(i, kind),
            HealthSource::OwnConnections => (Cause::Healthy, "accepting".to_string()),
        }
    };
    (cause == Cause::Healthy, cause, reason)
}

/// Health from an active probe, then the account state.
fn probed(i: &Inputs, kind: ProbeKind) -> (Cause, String) {
    let probe = &i.probes[kind.index()];
    if let Some((by, why)) = &i.retarget[kind.index()] {
        (*by, why.clone())
    } else if !probe.healthy {
        if probe.started && !probe.last_error.is_empty() {
            (
                Cause::Unhealthy,
                format!("backend unhealthy: {}", probe.last_error),
            )
        } else {
            (
                Cause::Starting,
                "waiting for the first successful probe".to_string(),
            )
        }
    } else if !i.online && i.offline_is_down {
        let reason = match &i.kicked {
            Some(what) => {
                format!("the backend's QQ account was kicked offline (bot_offline: {what})")
            }
            None => {
                "the backend's QQ account is offline (heartbeat status.online = false)".to_string()
            }
        };
        (Cause::Offline, reason)
    } else {
        (Cause::Healthy, "backend healthy".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(i: &Inputs) -> (bool, Cause) {
        let (up, cause, _) = derive(i, Lane::Forward);
        (up, cause)
    }

    #[test]
    fn rise_and_fall() {
        let mut i = Inputs::new(true, true);
        assert_eq!(up(&i), (false, Cause::Starting));
        i.observe_probe(ProbeKind::Ws, Ok(()), 2, 2);
        assert!(up(&i).0, "one success is enough at start");
        i.observe_probe(ProbeKind::Ws, Err("refused".into()), 2, 2);
        assert!(up(&i).0);
        i.observe_probe(ProbeKind::Ws, Err("refused".into()), 2, 2);
        assert_eq!(up(&i), (false, Cause::Unhealthy));
        assert!(derive(&i, Lane::Forward).2.contains("refused"));
        i.observe_probe(ProbeKind::Ws, Ok(()), 2, 2);
        assert!(!up(&i).0);
        i.observe_probe(ProbeKind::Ws, Ok(()), 2, 2);
        assert!(up(&i).0);
    }

    #[test]
    fn operator_intent_wins() {
        let mut i = Inputs::new(true, true);
        i.observe_probe(ProbeKind::Ws, Ok(()), 2, 2);
        i.admin_enabled = false;
        i.online = false;
        let (up_, cause, _) = derive(&i, Lane::Forward);
        assert_eq!(
            (up_, cause, cause.close_code()),
            (false, Cause::Admin, 1012)
        );
        i.admin_enabled = true;
        assert_eq!(up(&i), (false, Cause::Offline));
        i.online = true;
        assert!(up(&i).0);
        i.shutting_down = true;
        assert_eq!(up(&i), (false, Cause::Shutdown));
    }

    #[test]
    fn a_moved_upstream_is_down_until_its_first_probe() {
        let mut i = Inputs::new(true, true);
        i.observe_probe(ProbeKind::Ws, Ok(()), 2, 2);
        i.retarget(ProbeKind::Ws, Cause::NapcatConfig, "moved".into());
        assert_eq!(up(&i), (false, Cause::NapcatConfig));
        assert_eq!(derive(&i, Lane::Forward).2, "moved");
        i.observe_probe(ProbeKind::Ws, Ok(()), 2, 2);
        assert!(up(&i).0, "one success is enough for a new address");
    }

    #[test]
    fn each_lane_follows_its_own_source_and_napcat_switch() {
        let mut i = Inputs::new(true, true);
        let state = |i: &Inputs, l| {
            let (up, cause, _) = derive(i, l);
            (up, cause)
        };
        // Probed by nothing yet: the backend dialling in is all the reverse lane needs.
        assert_eq!(state(&i, Lane::Forward), (false, Cause::Starting));
        assert_eq!(state(&i, Lane::Reverse), (true, Cause::Healthy));
        i.observe_probe(ProbeKind::Ws, Ok(()), 2, 2);
        i.online = false;
        assert_eq!(state(&i, Lane::Forward), (false, Cause::Offline));
        assert_eq!(
            state(&i, Lane::HttpApi),
            (false, Cause::Starting),
            "its own probe"
        );
        assert!(
            state(&i, Lane::Reverse).0,
            "offline is each reverse backend's own"
        );
        i.napcat_off[Lane::Reverse.index()] = Some("switched off".into());
        assert_eq!(state(&i, Lane::Reverse), (false, Cause::NapcatConfig));
        i.admin_enabled = false;
        for lane in Lane::ALL {
            assert_eq!(state(&i, lane), (false, Cause::Admin), "{lane:?}");
        }
    }
}
