//! Waiting for a signal from the state inside a session's own poll loop, with one wait
//! kept across wake-ups.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::state::Snapshot;

type Wait = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The state's watch channel, one wait kept across wake-ups (rather than a `changed()`
/// future built and dropped on each, which registers and unregisters every time).
///
/// It is polled on every wake-up, not only when the version moved: the channel wakes its
/// waiters one `Notify` shard at a time, so a session that handled a change and waited
/// again can be woken once more by the same change; a wait skipped then would have
/// consumed that wake-up and miss the next change.
pub struct StateWatch<T = Arc<Snapshot>> {
    rx: watch::Receiver<T>,
    wait: Wait,
}

impl<T: Clone + Send + Sync + 'static> StateWatch<T> {
    pub fn new(rx: watch::Receiver<T>) -> StateWatch<T> {
        let wait = Self::wait_on(rx.clone());
        StateWatch { rx, wait }
    }

    fn wait_on(mut rx: watch::Receiver<T>) -> Wait {
        Box::pin(async move {
            let _ = rx.changed().await;
        })
    }

    /// `Ready(Some(snapshot))` after a change, `Ready(None)` when the state is gone.
    pub fn poll_change(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if self.wait.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let closed = self.rx.has_changed().is_err();
        let snap = self.rx.borrow_and_update().clone();
        self.wait = Self::wait_on(self.rx.clone());
        Poll::Ready((!closed).then_some(snap))
    }
}

/// A cancellation token, polled only until the task is registered, then checked with an
/// atomic load: a token is notified once, when it is cancelled, and stays cancelled, so a
/// skipped poll can never miss it.
pub struct TokenWatch {
    token: CancellationToken,
    wait: Wait,
    registered: bool,
}

impl TokenWatch {
    pub fn new(token: CancellationToken) -> TokenWatch {
        let t = token.clone();
        TokenWatch {
            token,
            wait: Box::pin(tokio::task::unconstrained(async move {
                t.cancelled().await;
            })),
            registered: false,
        }
    }

    /// `Ready` once the token is cancelled.
    pub fn poll_cancelled(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.token.is_cancelled() {
            return Poll::Ready(());
        }
        if !self.registered {
            if self.wait.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            self.registered = true;
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Many waiters, each handling a change and waiting again while the channel may still
    /// be waking the others (one `Notify` shard at a time), and a publisher that sends the
    /// next change only once every waiter has seen the last: none may stall.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_waiter_misses_a_change() {
        use std::sync::atomic::{AtomicU64, Ordering};
        const WAITERS: usize = 64;
        const CHANGES: u64 = 200;
        let (tx, rx) = watch::channel(0u64);
        let seen: Arc<Vec<AtomicU64>> = Arc::new((0..WAITERS).map(|_| AtomicU64::new(0)).collect());
        let mut tasks = Vec::new();
        for i in 0..WAITERS {
            let mut w = StateWatch::new(rx.clone());
            let seen = seen.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(v) = std::future::poll_fn(|cx| w.poll_change(cx)).await {
                    seen[i].store(v, Ordering::SeqCst);
                    if v == CHANGES {
                        return;
                    }
                }
            }));
        }
        for v in 1..=CHANGES {
            tx.send_replace(v);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while seen.iter().any(|s| s.load(Ordering::SeqCst) < v) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "a waiter never saw change {v}"
                );
                tokio::task::yield_now().await;
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
}
