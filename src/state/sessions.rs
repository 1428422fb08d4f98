//! The open sessions: how many per lane and role, their ids, and the two-phase sweep a
//! mass disable runs. Transports register each session here and get a guard that counts
//! it out exactly once, however it ends.

use std::sync::atomic::{AtomicIsize, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::gate::Lane;
use crate::metrics::Metrics;
use crate::proto::onebot::Role;

/// Every open session, counted.
pub struct SessionSet {
    next_id: AtomicU64,
    /// Open sessions by lane, then role (api, event, universal).
    open: [[AtomicUsize; 3]; Lane::COUNT],
    sweep: Sweep,
    metrics: Arc<Metrics>,
}

fn role_index(r: Role) -> usize {
    match r {
        Role::Api => 0,
        Role::Event => 1,
        Role::Universal => 2,
    }
}

impl SessionSet {
    pub(super) fn new(metrics: Arc<Metrics>) -> SessionSet {
        SessionSet {
            next_id: AtomicU64::new(1),
            open: Default::default(),
            sweep: Sweep::default(),
            metrics,
        }
    }

    /// Count a new session in; the guard counts it out.
    pub fn open(self: &Arc<Self>, lane: Lane, role: Role) -> SessionGuard {
        self.open[lane.index()][role_index(role)].fetch_add(1, Ordering::Relaxed);
        self.metrics.session_opened(lane.as_str(), role);
        SessionGuard {
            set: self.clone(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            lane,
            role,
            closed: false,
        }
    }

    /// Open sessions of `lane` by role: (api, event, universal).
    pub fn open_by_role(&self, lane: Lane) -> [usize; 3] {
        let l = &self.open[lane.index()];
        [0, 1, 2].map(|i| l[i].load(Ordering::Relaxed))
    }

    /// Open sessions of every lane.
    pub fn total(&self) -> usize {
        Lane::ALL
            .iter()
            .map(|l| self.open_by_role(*l).iter().sum::<usize>())
            .sum()
    }

    /// `lane` just went down: every session of it takes part in the sweep.
    pub(super) fn begin_sweep(&self, lanes: &[Lane]) {
        let n: usize = lanes
            .iter()
            .map(|l| self.open_by_role(*l).iter().sum::<usize>())
            .sum();
        self.sweep.remaining.store(n as isize, Ordering::SeqCst);
    }

    /// A session ending because its lane went down takes part in the sweep.
    pub fn sweep_ticket(self: &Arc<Self>) -> SweepTicket {
        SweepTicket {
            set: Some(self.clone()),
        }
    }

    /// Wait until every session of the sweep has sent its Close, at most `limit`.
    pub async fn sweep_wait(&self, limit: Duration) {
        let notified = self.sweep.done.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.sweep.remaining.load(Ordering::SeqCst) <= 0 {
            return;
        }
        let _ = tokio::time::timeout(limit, notified).await;
    }
}

/// A mass disable in two phases: every session first sends its `disable` and Close
/// (phase 1), and only then does any spend CPU on reading Close replies, closing sockets
/// and logging (phase 2). With thousands of sessions, the last client hears sooner.
#[derive(Default)]
struct Sweep {
    /// Sessions that have not sent their Close yet (may go below zero: late joiners).
    remaining: AtomicIsize,
    done: Notify,
}

/// One session's part in a sweep: [`SweepTicket::sent`] (or dropping the ticket, on any
/// other path) tells the sweep this session is past phase 1.
pub struct SweepTicket {
    set: Option<Arc<SessionSet>>,
}

impl SweepTicket {
    /// This session's Close is out (or will never be).
    pub fn sent(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if let Some(set) = self.set.take() {
            if set.sweep.remaining.fetch_sub(1, Ordering::SeqCst) <= 1 {
                set.sweep.done.notify_waiters();
            }
        }
    }
}

impl Drop for SweepTicket {
    fn drop(&mut self) {
        self.release();
    }
}

/// A registered session. Counted out when closed, or (as aborted) when dropped unclosed.
pub struct SessionGuard {
    set: Arc<SessionSet>,
    /// The session's id, for logs.
    pub id: u64,
    pub lane: Lane,
    pub role: Role,
    closed: bool,
}

impl SessionGuard {
    /// The session ended for `cause`, with `code` sent (or received) in its Close.
    pub fn close(mut self, cause: &str, code: Option<u16>) {
        self.closed = true;
        self.count_out();
        self.set
            .metrics
            .session_closed(self.lane.as_str(), self.role, cause, code);
    }

    fn count_out(&self) {
        self.set.open[self.lane.index()][role_index(self.role)].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if !self.closed {
            // Never relayed (the client left during the upgrade, or a hard stop).
            self.count_out();
            self.set
                .metrics
                .session_aborted(self.lane.as_str(), self.role);
        }
    }
}
