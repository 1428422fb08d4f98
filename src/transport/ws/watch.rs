//! Waiting for a signal from the state without paying for it on every wake-up of a busy
//! session. A waiter is polled once to register the task (its waker stays registered),
//! then only when a cheap check (an atomic load) says the signal came.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::state::Snapshot;

type Wait = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The state's watch channel.
pub struct StateWatch {
    rx: watch::Receiver<Arc<Snapshot>>,
    wait: Wait,
    registered: bool,
}

impl StateWatch {
    pub fn new(rx: watch::Receiver<Arc<Snapshot>>) -> StateWatch {
        let wait = Self::wait_on(rx.clone());
        StateWatch {
            rx,
            wait,
            registered: false,
        }
    }

    fn wait_on(mut rx: watch::Receiver<Arc<Snapshot>>) -> Wait {
        // Unconstrained: under tokio's cooperative budget a poll could return Pending
        // without registering the task, and a wait skipped afterwards would never wake.
        Box::pin(tokio::task::unconstrained(async move {
            let _ = rx.changed().await;
        }))
    }

    /// `Ready(Some(snapshot))` after a change, `Ready(None)` when the state is gone.
    pub fn poll_change(&mut self, cx: &mut Context<'_>) -> Poll<Option<Arc<Snapshot>>> {
        if self.registered && matches!(self.rx.has_changed(), Ok(false)) {
            return Poll::Pending;
        }
        if self.wait.as_mut().poll(cx).is_pending() {
            self.registered = true;
            return Poll::Pending;
        }
        let closed = self.rx.has_changed().is_err();
        let snap = self.rx.borrow_and_update().clone();
        self.wait = Self::wait_on(self.rx.clone());
        self.registered = false;
        Poll::Ready((!closed).then_some(snap))
    }
}

/// A cancellation token, checked the same way.
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
