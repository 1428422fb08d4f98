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

/// A transport lifeguard relays, with its own state. A new transport adds a variant
/// here, its rule in [`derive`], and its entry in [`Lane::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Forward WebSocket: clients connect to lifeguard, lifeguard to the backend's server.
    Forward,
}

impl Lane {
    pub const ALL: [Lane; 1] = [Lane::Forward];
    pub const COUNT: usize = Lane::ALL.len();

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Forward => "forward",
        }
    }
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
    /// The forward upstream moved: (who moved it, reason). Down until the first probe
    /// of the new address answers.
    pub retarget: Option<(Cause, String)>,
    /// The forward WebSocket probe.
    pub probe: ProbeCounter,
    /// Bumped when the upstream moves: results of probes started before are stale.
    pub probe_epoch: u64,
    /// QQ login state, as the backend last told.
    pub online: bool,
    pub offline_is_down: bool,
}

impl Inputs {
    pub fn new(config_enabled: bool, offline_is_down: bool) -> Inputs {
        Inputs {
            shutting_down: false,
            admin_enabled: true,
            config_enabled,
            napcat_off: Default::default(),
            retarget: None,
            probe: ProbeCounter::default(),
            probe_epoch: 0,
            online: true,
            offline_is_down,
        }
    }

    /// The upstream moved: forget what was known of the old one.
    pub fn retarget(&mut self, by: Cause, reason: String) {
        self.retarget = Some((by, reason));
        self.probe = ProbeCounter::default();
        self.probe_epoch += 1;
        self.online = true;
    }
}

/// The state the inputs imply for `lane`: (up, cause, reason). The operator's intent
/// comes first, then the backend's configuration, then its health.
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
    } else if let Some((by, why)) = &i.retarget {
        (*by, why.clone())
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
        i.probe.observe(Ok(()), 2, 2);
        assert!(up(&i).0, "one success is enough at start");
        i.probe.observe(Err("refused".into()), 2, 2);
        assert!(up(&i).0);
        i.probe.observe(Err("refused".into()), 2, 2);
        assert_eq!(up(&i), (false, Cause::Unhealthy));
        assert!(derive(&i, Lane::Forward).2.contains("refused"));
        i.probe.observe(Ok(()), 2, 2);
        assert!(!up(&i).0);
        i.probe.observe(Ok(()), 2, 2);
        assert!(up(&i).0);
    }

    #[test]
    fn operator_intent_wins() {
        let mut i = Inputs::new(true, true);
        i.probe.observe(Ok(()), 2, 2);
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
        i.probe.observe(Ok(()), 2, 2);
        i.retarget(Cause::NapcatConfig, "moved".into());
        assert_eq!(up(&i), (false, Cause::NapcatConfig));
        assert_eq!(derive(&i, Lane::Forward).2, "moved");
        i.retarget = None; // what the first probe of the new address does
        i.probe.observe(Ok(()), 2, 2);
        assert!(up(&i).0, "one success is enough for a new address");
    }
}
