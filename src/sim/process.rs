//! The simulated NapCat process: what every network entry shares (identity, QQ login state,
//! counters) and the process's own life (running, killed, hung, shut down).
//!
//! Every transport module depends on this one and on nothing of its siblings but the
//! helpers below it (`session`, `api`, `frames`, `query`), so data flows one way: the
//! [`NapSim`](super::NapSim) handle drives the transports, the transports read this state.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::frames;

/// State shared by the handle and every task of one simulator.
pub(crate) struct Shared {
    /// `self_id` of every event, `X-Self-ID` of every outgoing request.
    pub(crate) self_id: u64,
    /// Access token of the forward WebSocket server, if any.
    pub(crate) token: Option<String>,
    /// QQ login state for heartbeats and `get_status`.
    pub(crate) online: AtomicBool,
    /// Heartbeat period of the forward WebSocket server; its timer watches it.
    pub(crate) heartbeat: watch::Sender<Option<Duration>>,
    /// Process hung: nothing reads, writes, dials or posts until it is cleared.
    pub(crate) hung: watch::Sender<bool>,
    /// The running process: `Some(token)` while it runs, `None` after `kill()` until the
    /// restart. Everything a process owns (sockets, requests in flight) holds its token and
    /// is dropped, without a goodbye, when it is cancelled.
    process: watch::Sender<Option<CancellationToken>>,
    /// The `emit_message` event, pre-split around its sequence numbers.
    pub(crate) template: frames::MessageTemplate,
    /// `message_id` of the next `send_msg` reply.
    pub(crate) next_message_id: AtomicU64,
    /// Sequence number of the next `blast` event.
    pub(crate) next_blast_seq: AtomicU64,
    /// Connection ids, to detach a closed connection from its server.
    pub(crate) next_conn_id: AtomicU64,
    /// Forward WebSocket handshakes completed.
    handshakes: AtomicU64,
    /// ... per request path (query stripped).
    handshakes_by_path: Mutex<HashMap<String, u64>>,
    /// Forward WebSocket connections currently open.
    pub(crate) open: AtomicUsize,
    /// Cancelled by `shutdown()` (or by dropping the last handle): ends every task.
    pub(crate) shutdown: CancellationToken,
    /// Every task the simulator spawned, awaited by `shutdown()`.
    pub(crate) tracker: TaskTracker,
}

/// Lock a mutex, ignoring poisoning: every critical section leaves its data consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bind `addr` with SO_REUSEADDR (as Node does), so that re-enabling on the same port works
/// while old connections on it are still open or in TIME_WAIT.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A listening socket that can be closed synchronously from any thread, so that a connect
/// right after `disable_*()` or `kill()` returns is refused, while its accept loop runs in a
/// task.
#[derive(Debug)]
pub(crate) struct Listener {
    /// Cancelled when the listener closes: ends the accept loop and whatever else lives
    /// only as long as the listener (a server's heartbeat timer, pending handshakes).
    pub(crate) stop: CancellationToken,
    /// The socket; taken (and so closed) by [`Listener::close`].
    socket: Mutex<Option<TcpListener>>,
}

impl Listener {
    /// A listener on `socket` that also closes when `parent` is cancelled.
    pub(crate) fn new(socket: TcpListener, parent: &CancellationToken) -> Listener {
        Listener {
            stop: parent.child_token(),
            socket: Mutex::new(Some(socket)),
        }
    }

    /// Close now: no more connects are accepted by the kernel.
    pub(crate) fn close(&self) {
        self.stop.cancel();
        drop(lock(&self.socket).take());
    }

    /// The next connection (Nagle off), or `None` once closed. Accept errors (EMFILE and
    /// friends) back off briefly instead of spinning.
    pub(crate) async fn accept(&self) -> Option<TcpStream> {
        loop {
            let accepted = tokio::select! {
                _ = self.stop.cancelled() => None,
                accepted = poll_fn(|cx| match lock(&self.socket).as_ref() {
                    Some(listener) => listener.poll_accept(cx).map(Some),
                    None => Poll::Ready(None),
                }) => accepted,
            };
            match accepted {
                None => {
                    self.close();
                    return None;
                }
                Some(Ok((tcp, _peer))) => {
                    let _ = tcp.set_nodelay(true);
                    return Some(tcp);
                }
                Some(Err(_)) => {
                    tokio::select! {
                        _ = self.stop.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                }
            }
        }
    }
}

/// A duration in whole milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Shared {
    /// A running process for `self_id`.
    pub(crate) fn new(
        self_id: u64,
        token: Option<String>,
        online: bool,
        heartbeat: Option<Duration>,
    ) -> Shared {
        let shutdown = CancellationToken::new();
        Shared {
            self_id,
            token: token.filter(|t| !t.is_empty()),
            online: AtomicBool::new(online),
            heartbeat: watch::Sender::new(heartbeat),
            hung: watch::Sender::new(false),
            process: watch::Sender::new(Some(shutdown.child_token())),
            template: frames::MessageTemplate::new(self_id, frames::now_secs()),
            next_message_id: AtomicU64::new(1),
            next_blast_seq: AtomicU64::new(1),
            next_conn_id: AtomicU64::new(1),
            handshakes: AtomicU64::new(0),
            handshakes_by_path: Mutex::new(HashMap::new()),
            open: AtomicUsize::new(0),
            shutdown,
            tracker: TaskTracker::new(),
        }
    }

    /// True while `hang()` is in effect.
    pub(crate) fn is_hung(&self) -> bool {
        *self.hung.borrow()
    }

    /// Resolves once the simulator is not hung.
    pub(crate) async fn wait_unhung(&self) {
        let mut rx = self.hung.subscribe();
        let _ = rx.wait_for(|hung| !*hung).await;
    }

    /// QQ login state.
    pub(crate) fn online(&self) -> bool {
        self.online.load(Ordering::Relaxed)
    }

    /// The running process's token; `None` while killed or after shutdown.
    pub(crate) fn process(&self) -> Option<CancellationToken> {
        if self.shutdown.is_cancelled() {
            return None;
        }
        self.process.borrow().clone()
    }

    /// A receiver that sees every kill and restart.
    pub(crate) fn watch_process(&self) -> watch::Receiver<Option<CancellationToken>> {
        self.process.subscribe()
    }

    /// The process is running and not hung: it can emit right now.
    pub(crate) fn live(&self) -> Option<CancellationToken> {
        if self.is_hung() {
            None
        } else {
            self.process()
        }
    }

    /// Process exit: everything it owns is dropped; nothing runs until [`Shared::restart`].
    /// Also ends a hang (a dead process is not hung).
    pub(crate) fn kill(&self) {
        if let Some(token) = self.process.send_replace(None) {
            token.cancel();
        }
        self.hung.send_replace(false);
    }

    /// Start a new process after a kill; returns its token, or the running one's.
    pub(crate) fn restart(&self) -> CancellationToken {
        let mut token = None;
        self.process.send_modify(|p| {
            token = Some(p.get_or_insert_with(|| self.shutdown.child_token()).clone());
        });
        token.unwrap_or_else(|| self.shutdown.child_token())
    }

    /// Record a completed forward WebSocket handshake on `path`.
    pub(crate) fn count_handshake(&self, path: &str) {
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        *lock(&self.handshakes_by_path)
            .entry(path.to_owned())
            .or_insert(0) += 1;
    }

    /// Forward WebSocket handshakes completed.
    pub(crate) fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// Forward WebSocket handshakes completed on exactly `path`.
    pub(crate) fn handshakes_on(&self, path: &str) -> u64 {
        lock(&self.handshakes_by_path)
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// A heartbeat meta event as of now, with `interval` as its `interval` field.
    pub(crate) fn heartbeat_frame(&self, interval: Duration) -> String {
        frames::heartbeat(self.self_id, self.online(), millis(interval))
    }

    /// Resolves when the simulator shuts down.
    pub(crate) async fn shut_down(&self) {
        self.shutdown.cancelled().await;
    }
}

/// Wait until `ready` holds for the current process and hang state, rechecking whenever the
/// process, the hang flag, or `extra` changes; returns the running process's token, or
/// `None` on shutdown. `extra` is a per-entry switch (enabled/disabled).
pub(crate) async fn wait_running(
    shared: &Shared,
    extra: &mut watch::Receiver<bool>,
) -> Option<CancellationToken> {
    let mut process = shared.watch_process();
    let mut hung = shared.hung.subscribe();
    loop {
        let enabled = *extra.borrow_and_update();
        let token = process.borrow_and_update().clone();
        let is_hung = *hung.borrow_and_update();
        if shared.shutdown.is_cancelled() {
            return None;
        }
        if let (true, false, Some(token)) = (enabled, is_hung, token) {
            if !token.is_cancelled() {
                return Some(token);
            }
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => return None,
            r = process.changed() => if r.is_err() { return None },
            r = hung.changed() => if r.is_err() { return None },
            r = extra.changed() => if r.is_err() { return None },
        }
    }
}
