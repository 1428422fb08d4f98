//! Client connections: how many lifeguard holds at once, in all and per address.
//!
//! Each relayed session holds two descriptors (client and backend); a connection still in
//! its handshake holds one, and two while its backend connection is dialled. The cap keeps
//! `2 × max_connections` below the open-file limit with [`FD_RESERVE`] descriptors left for
//! what must never fail for lack of one: the probes (a probe that cannot open a socket
//! would blame the backend for a local shortage), the admin listener (`/live`), refusals
//! and the process's own files. A flood therefore meets 503 long before the limit, and
//! one address can take at most `max_connections_per_ip` of the budget.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::Settings;
use crate::metrics::Metrics;

/// Descriptors kept free of client connections: the admin listener's connections
/// ([`ADMIN_MAX_CONNECTIONS`]), refusals being answered ([`MAX_REFUSALS_IN_FLIGHT`]), the
/// probes and the login watch, and the process's own (stdio, listeners, epoll, inotify,
/// log files) with room to spare.
pub const FD_RESERVE: u64 = 192;
/// Admin connections served at once; more are closed unanswered.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;
/// Refused client connections whose 503 is still being delivered.
pub const MAX_REFUSALS_IN_FLIGHT: usize = 32;
/// Descriptors one client connection may hold: its own and its backend's.
pub const FDS_PER_CONNECTION: u64 = 2;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` are open.
    Full { max: usize },
    /// This address holds `max_connections_per_ip`.
    PerIp { max: usize },
}

impl Refusal {
    /// The cause label (503 bodies, metrics).
    pub fn cause(&self) -> &'static str {
        match self {
            Refusal::Full { .. } => "capacity",
            Refusal::PerIp { .. } => "per-ip-limit",
        }
    }

    pub fn reason(&self) -> String {
        match self {
            Refusal::Full { max } => format!("lifeguard holds its maximum of {max} connections"),
            Refusal::PerIp { max } => {
                format!("this address holds its maximum of {max} connections")
            }
        }
    }
}

/// The effective limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max: usize,
    pub per_ip: usize,
}

/// Every client connection lifeguard holds, counted.
pub struct Connections {
    /// The soft open-file limit when the state was made.
    fd_limit: u64,
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Refusals whose 503 is still on its way.
    refusing: AtomicUsize,
    metrics: Arc<Metrics>,
}

/// The soft open-file limit of this process (1024 when it cannot be read).
pub fn fd_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024)
}

impl Connections {
    pub(super) fn new(metrics: Arc<Metrics>) -> Connections {
        Connections {
            fd_limit: fd_limit(),
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            refusing: AtomicUsize::new(0),
            metrics,
        }
    }

    /// The open-file limit the default cap derives from.
    pub fn fd_limit(&self) -> u64 {
        self.fd_limit
    }

    /// The cap when `--max-connections` is unset.
    pub fn auto_max(fd_limit: u64) -> usize {
        (fd_limit.saturating_sub(FD_RESERVE) / FDS_PER_CONNECTION).max(1) as usize
    }

    /// The limits in force under `s`.
    pub fn limits(&self, s: &Settings) -> Limits {
        let max = s
            .max_connections
            .map(|m| m as usize)
            .unwrap_or_else(|| Self::auto_max(self.fd_limit));
        let per_ip = s
            .max_connections_per_ip
            .map(|m| m as usize)
            .unwrap_or((max / 2).max(1))
            .min(max);
        Limits { max, per_ip }
    }

    /// Client connections held now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.per_ip.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Count a new connection from `ip` in, or say why not. The permit counts it out.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, s: &Settings) -> Result<ConnPermit, Refusal> {
        let limits = self.limits(s);
        let ip = ip.to_canonical();
        let refused = {
            let mut per_ip = self.lock();
            let mine = per_ip.get(&ip).copied().unwrap_or(0);
            if self.open.load(Ordering::Relaxed) >= limits.max {
                Some(Refusal::Full { max: limits.max })
            } else if mine >= limits.per_ip {
                Some(Refusal::PerIp { max: limits.per_ip })
            } else {
                per_ip.insert(ip, mine + 1);
                self.open.fetch_add(1, Ordering::Relaxed);
                None
            }
        };
        if let Some(r) = refused {
            self.metrics.connection_refused(r.cause());
            return Err(r);
        }
        self.metrics.connections_open(self.open());
        Ok(ConnPermit {
            set: self.clone(),
            ip,
        })
    }

    /// A refusal may keep its socket for a moment to deliver its 503; None when too many
    /// already do (then it is closed at once).
    pub fn refusing(self: &Arc<Self>) -> Option<RefusalSlot> {
        if self.refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSALS_IN_FLIGHT {
            self.refusing.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(RefusalSlot { set: self.clone() })
    }
}

/// One admitted connection. Cheap to share between the handshake and the session it
/// becomes; counted out when the last holder drops it.
pub struct ConnPermit {
    set: Arc<Connections>,
    ip: IpAddr,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        {
            let mut per_ip = self.set.lock();
            if let Some(n) = per_ip.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
        let left = self.set.open.fetch_sub(1, Ordering::Relaxed) - 1;
        self.set.metrics.connections_open(left);
    }
}

/// A refused connection delivering its 503.
pub struct RefusalSlot {
    set: Arc<Connections>,
}

impl Drop for RefusalSlot {
    fn drop(&mut self) {
        self.set.refusing.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RunArgs, Settings};

    fn settings(max: Option<u32>, per_ip: Option<u32>) -> Settings {
        let args = RunArgs {
            upstream: Some("ws://127.0.0.1:1".into()),
            max_connections: max,
            max_connections_per_ip: per_ip,
            ..Default::default()
        };
        Settings::resolve(&args, None).unwrap()
    }

    #[test]
    fn the_cap_and_the_per_address_share_hold_and_come_back() {
        let c = Arc::new(Connections::new(Arc::new(Metrics::new())));
        let s = settings(Some(4), Some(3));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mut held: Vec<_> = (0..3).map(|_| c.admit(a, &s).unwrap()).collect();
        assert_eq!(
            c.admit(a, &s).err(),
            Some(Refusal::PerIp { max: 3 }),
            "one address cannot take the whole budget"
        );
        // The same address written as IPv4-mapped IPv6 is the same address.
        assert!(c.admit("::ffff:10.0.0.1".parse().unwrap(), &s).is_err());
        held.push(c.admit(b, &s).unwrap());
        assert_eq!(c.admit(b, &s).err(), Some(Refusal::Full { max: 4 }));
        assert_eq!(c.open(), 4);
        held.clear();
        assert_eq!(c.open(), 0);
        assert!(c.lock().is_empty());
        assert!(c.admit(a, &s).is_ok());
    }

    #[test]
    fn defaults_derive_from_the_open_file_limit() {
        assert_eq!(Connections::auto_max(20_000), 9_904);
        assert_eq!(Connections::auto_max(1024), 416);
        assert_eq!(Connections::auto_max(100), 1);
        let c = Connections {
            fd_limit: 20_000,
            ..Connections::new(Arc::new(Metrics::new()))
        };
        assert_eq!(
            c.limits(&settings(None, None)),
            Limits {
                max: 9_904,
                per_ip: 4_952
            }
        );
        assert_eq!(
            c.limits(&settings(Some(10), Some(50))),
            Limits {
                max: 10,
                per_ip: 10
            }
        );
    }
}
