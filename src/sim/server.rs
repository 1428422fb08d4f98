//! One "WebSocket server" of the simulated NapCat: the listening socket, its accept loop,
//! its heartbeat timer and the clients attached to it.
//!
//! NapCat 3.1.10 creates a new server object on every re-enable; connections of the old one
//! are orphaned (still open, never attached to the new one). The simulator models that by
//! giving each enable its own [`Server`] and keeping connections independent of it.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc::UnboundedSender;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use super::{conn, frames, Shared};

/// What a connection task is asked to write (or do) next, in order.
#[derive(Debug)]
pub(crate) enum Out {
    /// One text frame (an event, a heartbeat); flushed with whatever else is queued.
    Frame(Utf8Bytes),
    /// Many text frames fed in a row (from `blast`).
    Batch(Arc<[Utf8Bytes]>),
    /// Flush, then signal: everything queued before it is in the socket.
    Barrier(tokio::sync::oneshot::Sender<()>),
    /// NapCat >= 3.1.11 disable: send a Close frame with no status code and finish.
    CloseNoCode,
}

/// A connection attached to a server.
#[derive(Debug)]
pub(crate) struct Client {
    /// Connection id, to detach on close.
    pub(crate) id: u64,
    /// False for `/api` connections: they get no events and no heartbeats.
    pub(crate) events: bool,
    /// The connection task's queue.
    pub(crate) tx: UnboundedSender<Out>,
}

/// One enabled period of the forward WebSocket server.
#[derive(Debug)]
pub(crate) struct Server {
    /// Cancelled on disable/kill/shutdown: ends the accept loop, the heartbeat timer and
    /// handshakes still in progress (not the established connections).
    pub(crate) stop: CancellationToken,
    /// The listening socket; taken (and so closed, synchronously) on disable and kill, so
    /// that a connect right after `disable_*()` returns is refused.
    listener: Mutex<Option<TcpListener>>,
    /// Connections attached to this server (API and event ones).
    clients: Mutex<Vec<Client>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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

impl Server {
    /// Start a server on `listener`: spawn its accept loop and heartbeat timer. `process`
    /// is the token that `kill()` cancels; connections accepted here hold it.
    pub(crate) fn start(
        shared: &Arc<Shared>,
        listener: TcpListener,
        process: &CancellationToken,
    ) -> Arc<Server> {
        let server = Arc::new(Server {
            stop: process.child_token(),
            listener: Mutex::new(Some(listener)),
            clients: Mutex::new(Vec::new()),
        });
        shared.tracker.spawn(accept_loop(
            Arc::clone(shared),
            Arc::clone(&server),
            process.clone(),
        ));
        shared
            .tracker
            .spawn(heartbeat_loop(Arc::clone(shared), Arc::clone(&server)));
        server
    }

    /// Stop listening now: close the socket and end the accept loop and heartbeat timer.
    pub(crate) fn stop_listening(&self) {
        self.stop.cancel();
        drop(lock(&self.listener).take());
    }

    /// Attach a connection. False if the server was stopped meanwhile (NapCat closes
    /// connections that complete while it is disabled).
    pub(crate) fn attach(&self, client: Client) -> bool {
        let mut clients = lock(&self.clients);
        if self.stop.is_cancelled() {
            return false;
        }
        clients.push(client);
        true
    }

    /// Detach a connection that ended.
    pub(crate) fn detach(&self, id: u64) {
        lock(&self.clients).retain(|c| c.id != id);
    }

    /// Queue `frame` for every event client; returns how many accepted it.
    pub(crate) fn broadcast(&self, frame: &Utf8Bytes) -> usize {
        let mut sent = 0;
        lock(&self.clients).retain(|c| {
            if !c.events {
                return true;
            }
            let ok = c.tx.send(Out::Frame(frame.clone())).is_ok();
            sent += usize::from(ok);
            ok
        });
        sent
    }

    /// The queues of the event clients (for `blast`).
    pub(crate) fn event_senders(&self) -> Vec<UnboundedSender<Out>> {
        lock(&self.clients)
            .iter()
            .filter(|c| c.events)
            .map(|c| c.tx.clone())
            .collect()
    }

    /// NapCat 3.1.10: forget every connection (they stay open, orphaned).
    pub(crate) fn orphan_all(&self) {
        lock(&self.clients).clear();
    }

    /// NapCat >= 3.1.11: close every connection with a Close frame without a code.
    pub(crate) fn close_all(&self) {
        for c in lock(&self.clients).drain(..) {
            let _ = c.tx.send(Out::CloseNoCode);
        }
    }

    /// Accept the next TCP connection, or `None` once the listener was taken.
    async fn accept(&self) -> Option<io::Result<(TcpStream, SocketAddr)>> {
        poll_fn(|cx| match lock(&self.listener).as_ref() {
            Some(listener) => listener.poll_accept(cx).map(Some),
            None => Poll::Ready(None),
        })
        .await
    }
}

/// Accept TCP connections until the server stops; each one gets its own task.
async fn accept_loop(shared: Arc<Shared>, server: Arc<Server>, process: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = server.stop.cancelled() => break,
            accepted = server.accept() => accepted,
        };
        match accepted {
            None => break,
            Some(Ok((tcp, _peer))) => {
                let _ = tcp.set_nodelay(true);
                shared.tracker.spawn(conn::serve(
                    Arc::clone(&shared),
                    Arc::clone(&server),
                    tcp,
                    process.clone(),
                ));
            }
            // EMFILE and friends: back off instead of spinning.
            Some(Err(_)) => {
                tokio::select! {
                    _ = server.stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        }
    }
    drop(lock(&server.listener).take());
}

/// The server's heartbeat timer: one per server, restarted when the interval changes.
async fn heartbeat_loop(shared: Arc<Shared>, server: Arc<Server>) {
    let mut interval_rx = shared.heartbeat.subscribe();
    loop {
        let period = (*interval_rx.borrow_and_update()).filter(|d| !d.is_zero());
        let Some(period) = period else {
            tokio::select! {
                _ = server.stop.cancelled() => return,
                changed = interval_rx.changed() => if changed.is_err() { return },
            }
            continue;
        };
        let start = tokio::time::Instant::now() + period;
        let mut ticker = tokio::time::interval_at(start, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = server.stop.cancelled() => return,
                changed = interval_rx.changed() => {
                    if changed.is_err() { return }
                    break;
                }
                _ = ticker.tick() => {
                    if !shared.is_hung() {
                        let frame = frames::heartbeat(
                            shared.self_id,
                            shared.online.load(std::sync::atomic::Ordering::Relaxed),
                            millis(period),
                        );
                        server.broadcast(&Utf8Bytes::from(frame));
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
