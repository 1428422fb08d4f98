//! Reverse WebSocket backends connected now: one registration per backend connection,
//! unique per (self id, role), so that a new connection for a self id that already has one
//! replaces it cleanly, and so that `/state` can list them without knowing transports.
//!
//! A handshake [`BackendSet::claim`]s its key before dialling any bot. When the key was
//! taken, it gets the previous holder as a [`Superseded`]: it asks it to stop and waits
//! until that one's bot connections are fully closed, so a bot never sees the same self id
//! twice (NoneBot refuses the second with 403; aiocqhttp's cleanup of the first deletes the
//! second). A registration is removed by its own guard only while it is still the current
//! one for its key: a late end of a replaced connection never touches its successor.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::metrics::Metrics;
use crate::proto::onebot::Role;

type Key = (String, Role);

/// Most keys whose heartbeat interval is remembered: backends are few, but self ids come
/// from the backends' headers.
const INTERVALS_KEPT: usize = 1024;

/// Every reverse backend connection, by registration.
pub struct BackendSet {
    inner: Mutex<Inner>,
    next: AtomicU64,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Inner {
    /// Every registration (self id or not), by its number.
    all: HashMap<u64, Arc<Entry>>,
    /// The current registration of each (self id, role).
    current: HashMap<Key, u64>,
    /// The heartbeat interval (ms) each (self id, role) last announced, kept across its
    /// connections: a new one is watched from its start.
    intervals: HashMap<Key, u64>,
}

/// One backend connection as the registry knows it.
pub struct Entry {
    pub registration: u64,
    /// `X-Self-ID` as the backend sent it (`None`: it sent none).
    pub self_id: Option<String>,
    pub role: Role,
    pub peer: SocketAddr,
    pub since: SystemTime,
    since_instant: Instant,
    /// Asks the session to end (a newer connection for its key arrived).
    stop: CancellationToken,
    /// Its bot connections are all closed (or it never had any open).
    bots_closed: CancellationToken,
    online: AtomicBool,
    bots_connected: AtomicUsize,
    bots_configured: AtomicUsize,
}

/// What `/state` shows of one backend connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendView {
    pub self_id: Option<String>,
    pub role: Role,
    pub peer: SocketAddr,
    pub since: SystemTime,
    pub for_seconds: u64,
    pub online: bool,
    pub bots_connected: usize,
    pub bots_configured: usize,
}

impl BackendSet {
    pub(super) fn new(metrics: Arc<Metrics>) -> BackendSet {
        BackendSet {
            inner: Mutex::new(Inner::default()),
            next: AtomicU64::new(1),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a backend connection for (`self_id`, `role`). When another holds that key,
    /// it is returned as superseded: the caller stops it and waits for its bots.
    pub fn claim(
        self: &Arc<Self>,
        self_id: Option<&str>,
        role: Role,
        peer: SocketAddr,
    ) -> (BackendGuard, Option<Superseded>) {
        let registration = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            registration,
            self_id: self_id.map(str::to_string),
            role,
            peer,
            since: SystemTime::now(),
            since_instant: Instant::now(),
            stop: CancellationToken::new(),
            bots_closed: CancellationToken::new(),
            online: AtomicBool::new(true),
            bots_connected: AtomicUsize::new(0),
            bots_configured: AtomicUsize::new(0),
        });
        let mut inner = self.lock();
        inner.all.insert(registration, entry.clone());
        let previous = self_id.and_then(|id| {
            let prev = inner.current.insert((id.to_string(), role), registration)?;
            inner.all.get(&prev).cloned()
        });
        drop(inner);
        self.metrics.reverse_backend(self_id.unwrap_or(""), role, 1);
        let guard = BackendGuard {
            set: self.clone(),
            entry,
        };
        (guard, previous.map(|entry| Superseded { entry }))
    }

    /// Every backend connection, oldest first.
    pub fn list(&self) -> Vec<BackendView> {
        let mut all: Vec<Arc<Entry>> = self.lock().all.values().cloned().collect();
        all.sort_by_key(|e| e.registration);
        all.iter()
            .map(|e| BackendView {
                self_id: e.self_id.clone(),
                role: e.role,
                peer: e.peer,
                since: e.since,
                for_seconds: e.since_instant.elapsed().as_secs(),
                online: e.online.load(Ordering::Relaxed),
                bots_connected: e.bots_connected.load(Ordering::Relaxed),
                bots_configured: e.bots_configured.load(Ordering::Relaxed),
            })
            .collect()
    }

    fn release(&self, entry: &Entry) {
        let mut inner = self.lock();
        inner.all.remove(&entry.registration);
        if let Some(id) = &entry.self_id {
            let key = (id.clone(), entry.role);
            if inner.current.get(&key) == Some(&entry.registration) {
                inner.current.remove(&key);
            }
        }
        drop(inner);
        let id = entry.self_id.as_deref().unwrap_or("");
        self.metrics.reverse_backend(id, entry.role, -1);
        let bots = entry.bots_connected.swap(0, Ordering::Relaxed);
        if bots > 0 {
            self.metrics.reverse_bot(id, -(bots as i64));
        }
    }
}

/// A previous connection for the same (self id, role).
pub struct Superseded {
    entry: Arc<Entry>,
}

impl Superseded {
    /// Ask it to end, and wait until its bot connections are closed.
    pub async fn stop_and_wait(&self) {
        self.entry.stop.cancel();
        self.entry.bots_closed.cancelled().await
    }

    pub fn peer(&self) -> SocketAddr {
        self.entry.peer
    }
}

/// A registered backend connection; removes its registration when dropped.
pub struct BackendGuard {
    set: Arc<BackendSet>,
    entry: Arc<Entry>,
}

impl BackendGuard {
    /// Resolves when a newer connection for the same key asks this one to end.
    pub fn replaced(&self) -> WaitForCancellationFuture<'_> {
        self.entry.stop.cancelled()
    }

    pub fn is_replaced(&self) -> bool {
        self.entry.stop.is_cancelled()
    }

    /// A token that fires with [`BackendGuard::replaced`], for futures that outlive a borrow.
    pub fn replaced_token(&self) -> CancellationToken {
        self.entry.stop.clone()
    }

    /// Every bot connection of this backend is closed: a successor may dial now.
    pub fn bots_closed(&self) {
        self.entry.bots_closed.cancel();
    }

    pub fn self_id(&self) -> Option<&str> {
        self.entry.self_id.as_deref()
    }

    /// The account's state, as this backend last told.
    pub fn set_online(&self, online: bool) {
        self.entry.online.store(online, Ordering::Relaxed);
        self.set
            .metrics
            .reverse_online(self.self_id().unwrap_or(""), online);
    }

    /// The backend announced this heartbeat interval (ms).
    pub fn set_heartbeat_interval(&self, ms: u64) {
        let Some(id) = &self.entry.self_id else {
            return;
        };
        let key = (id.clone(), self.entry.role);
        let mut inner = self.set.lock();
        if inner.intervals.len() < INTERVALS_KEPT || inner.intervals.contains_key(&key) {
            inner.intervals.insert(key, ms);
        }
    }

    /// The heartbeat interval (ms) an earlier connection with this self id and role
    /// announced, if any.
    pub fn known_heartbeat_interval(&self) -> Option<u64> {
        let id = self.entry.self_id.as_ref()?;
        let key = (id.clone(), self.entry.role);
        self.set.lock().intervals.get(&key).copied()
    }

    pub fn set_bots_configured(&self, n: usize) {
        self.entry.bots_configured.store(n, Ordering::Relaxed);
    }

    /// A bot connection of this backend opened (+1) or closed (-1).
    pub fn bot_connected(&self, up: bool) {
        let id = self.self_id().unwrap_or("");
        if up {
            self.entry.bots_connected.fetch_add(1, Ordering::Relaxed);
            self.set.metrics.reverse_bot(id, 1);
        } else if self
            .entry
            .bots_connected
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            self.set.metrics.reverse_bot(id, -1);
        }
    }
}

impl Drop for BackendGuard {
    fn drop(&mut self) {
        self.entry.bots_closed.cancel();
        self.set.release(&self.entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> Arc<BackendSet> {
        Arc::new(BackendSet::new(Arc::new(Metrics::new())))
    }

    fn peer(p: u16) -> SocketAddr {
        ([127, 0, 0, 1], p).into()
    }

    #[tokio::test]
    async fn a_new_claim_supersedes_and_a_late_release_keeps_the_successor() {
        let set = set();
        let (old, none) = set.claim(Some("1"), Role::Universal, peer(1));
        assert!(none.is_none());
        let (_api, none) = set.claim(Some("1"), Role::Api, peer(2));
        assert!(none.is_none(), "another role is another key");
        let (new, prev) = set.claim(Some("1"), Role::Universal, peer(3));
        let prev = prev.expect("the old one is superseded");
        assert_eq!(prev.peer(), peer(1));
        let waiter = tokio::spawn(async move { prev.stop_and_wait().await });
        tokio::task::yield_now().await;
        assert!(old.is_replaced());
        old.bots_closed();
        waiter.await.unwrap();
        drop(old);
        let (_newest, prev) = set.claim(Some("1"), Role::Universal, peer(4));
        assert_eq!(
            prev.map(|p| p.peer()),
            Some(peer(3)),
            "the late release of the old one left the new one registered"
        );
        assert!(!new.is_replaced());
        assert_eq!(set.list().len(), 3);
    }
}
