//! Shutdown, owned in one place. Every task lifeguard spawns is tracked here, in one of
//! two sets: sessions (and the client connections that may become one), which shutdown
//! waits for within the drain budget, and background tasks (listeners of the admin API,
//! probes, file watchers), which keep running during the drain, so `/live` answers, and
//! end once the sessions are done.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// How long background tasks get to end after the hard stop.
const BACKGROUND_GRACE: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Drain {
    /// Cancelled first: listeners stop accepting.
    stop_accepting: CancellationToken,
    /// Cancelled when the sessions are done or the budget is spent: everything ends now.
    hard_stop: CancellationToken,
    sessions: TaskTracker,
    background: TaskTracker,
}

impl Drain {
    /// Track a session (or a client connection that may become one).
    pub fn spawn_session<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.sessions.spawn(task)
    }

    /// Track a background task; it must end when [`Drain::hard_stopped`] fires.
    pub fn spawn_background<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.background.spawn(task)
    }

    /// Resolves when listeners must stop accepting.
    pub fn accepting_stopped(&self) -> WaitForCancellationFuture<'_> {
        self.stop_accepting.cancelled()
    }

    /// Resolves when every remaining task must end at once.
    pub fn hard_stopped(&self) -> WaitForCancellationFuture<'_> {
        self.hard_stop.cancelled()
    }

    /// A token for tasks that outlive a borrow of the drain.
    pub fn hard_stop_token(&self) -> CancellationToken {
        self.hard_stop.clone()
    }

    pub fn is_stopping(&self) -> bool {
        self.stop_accepting.is_cancelled()
    }

    /// Tracked sessions and client connections.
    pub fn session_tasks(&self) -> usize {
        self.sessions.len()
    }

    /// The shutdown order: stop accepting; `announce` (the sessions learn that lifeguard
    /// is going away and start their end sequence); wait for the sessions within
    /// `budget`; then `stop_now` and the hard stop (everything still running ends), and
    /// wait for the background tasks. True when the sessions ended within the budget.
    pub async fn shutdown(
        &self,
        budget: Duration,
        announce: impl FnOnce(),
        stop_now: impl FnOnce(),
    ) -> bool {
        self.stop_accepting.cancel();
        announce();
        self.sessions.close();
        let drained = tokio::time::timeout(budget, self.sessions.wait())
            .await
            .is_ok();
        stop_now();
        self.hard_stop.cancel();
        if !drained {
            let _ = tokio::time::timeout(BACKGROUND_GRACE, self.sessions.wait()).await;
        }
        self.background.close();
        let _ = tokio::time::timeout(BACKGROUND_GRACE, self.background.wait()).await;
        drained
    }
}
