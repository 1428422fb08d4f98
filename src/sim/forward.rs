//! NapCat's forward WebSocket server (`websocketServers`): the listening socket, its accept
//! loop, its heartbeat timer, the clients attached to it, and each connection's handshake
//! with NapCat's token check.
//!
//! NapCat 3.1.10 creates a new server object on every re-enable; connections of the old one
//! are orphaned (still open, never attached to the new one). The simulator models that by
//! giving each enable its own [`Server`] and keeping connections independent of it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{self, UnboundedSender};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use super::api::Flavor;
use super::frames;
use super::process::{lock, Listener, Shared};
use super::query;
use super::session::{self, Out, Role};

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
    /// The listening socket. Closing it (disable, kill, shutdown) also ends the heartbeat
    /// timer and handshakes still in progress, not the established connections.
    listener: Listener,
    /// Connections attached to this server (API and event ones).
    clients: Mutex<Vec<Client>>,
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
            listener: Listener::new(listener, process),
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
        self.listener.close();
    }

    /// Attach a connection. False if the server was stopped meanwhile (NapCat closes
    /// connections that complete while it is disabled).
    pub(crate) fn attach(&self, client: Client) -> bool {
        let mut clients = lock(&self.clients);
        if self.listener.stop.is_cancelled() {
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
}

/// Accept TCP connections until the server stops; each one gets its own task.
async fn accept_loop(shared: Arc<Shared>, server: Arc<Server>, process: CancellationToken) {
    while let Some(tcp) = server.listener.accept().await {
        shared.tracker.spawn(serve(
            Arc::clone(&shared),
            Arc::clone(&server),
            tcp,
            process.clone(),
        ));
    }
}

/// The server's heartbeat timer: one per server, restarted when the interval changes.
async fn heartbeat_loop(shared: Arc<Shared>, server: Arc<Server>) {
    let mut interval_rx = shared.heartbeat.subscribe();
    loop {
        let period = (*interval_rx.borrow_and_update()).filter(|d| !d.is_zero());
        let Some(period) = period else {
            tokio::select! {
                _ = server.listener.stop.cancelled() => return,
                changed = interval_rx.changed() => if changed.is_err() { return },
            }
            continue;
        };
        let start = tokio::time::Instant::now() + period;
        let mut ticker = tokio::time::interval_at(start, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = server.listener.stop.cancelled() => return,
                changed = interval_rx.changed() => {
                    if changed.is_err() { return }
                    break;
                }
                _ = ticker.tick() => {
                    if !shared.is_hung() {
                        server.broadcast(&Utf8Bytes::from(shared.heartbeat_frame(period)));
                    }
                }
            }
        }
    }
}

/// What the handshake callback learned about the request.
struct Upgrade {
    /// Request path, query stripped.
    path: String,
    /// Token check passed (or no token configured).
    authorized: bool,
}

/// Serve one TCP connection from accept to close.
// The handshake callback's error type is fixed by tungstenite.
#[allow(clippy::result_large_err)]
pub(crate) async fn serve(
    shared: Arc<Shared>,
    server: Arc<Server>,
    tcp: TcpStream,
    process: CancellationToken,
) {
    let handshake = async {
        // A hung process never answers the HTTP upgrade; the TCP connect itself succeeded.
        shared.wait_unhung().await;
        let mut upgrade = None;
        let ws = tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, resp: Response| {
            upgrade = Some(inspect(&shared, req));
            Ok::<Response, ErrorResponse>(resp)
        })
        .await
        .ok()?;
        Some((ws, upgrade?))
    };
    let (ws, upgrade) = tokio::select! {
        _ = server.listener.stop.cancelled() => return,
        done = handshake => match done {
            Some(done) => done,
            None => return,
        },
    };
    shared.count_handshake(&upgrade.path);
    let _open = OpenGuard::new(&shared);
    // kill(): drop the socket mid-whatever, no Close frame. Biased: a kill that also ends a
    // hang must not let the connection write one more frame.
    tokio::select! {
        biased;
        _ = process.cancelled() => {}
        _ = attached(&shared, &server, ws, upgrade) => {}
    }
}

/// Read the path and check the token like NapCat: a non-empty `access_token` query
/// parameter wins, else the `Authorization` header after its last `Bearer `.
fn inspect(shared: &Shared, req: &Request) -> Upgrade {
    let path = req.uri().path().to_owned();
    let authorized = match shared.token.as_deref() {
        None | Some("") => true,
        Some(token) => {
            let query = req
                .uri()
                .query()
                .and_then(|q| query::param(q, "access_token"))
                .filter(|t| !t.is_empty());
            let presented = match query {
                Some(t) => t,
                None => req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.rsplit("Bearer ").next())
                    .unwrap_or("")
                    .to_owned(),
            };
            presented == token
        }
    };
    Upgrade { path, authorized }
}

/// Counts the connection in `open_connections()` while alive.
struct OpenGuard<'a>(&'a Shared);

impl<'a> OpenGuard<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(shared)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Detaches the connection from its server when the session ends.
struct Attached<'a> {
    server: &'a Server,
    id: u64,
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.server.detach(self.id);
    }
}

/// An established connection: check the token, attach to the server, serve.
async fn attached(shared: &Shared, server: &Server, mut ws: session::Ws, upgrade: Upgrade) {
    if !upgrade.authorized {
        let _ = futures_util::SinkExt::feed(&mut ws, Message::text(frames::AUTH_FAILED)).await;
        session::close_no_code(&mut ws, None).await;
        return;
    }
    let path = upgrade.path.as_str();
    let events = path != "/api" && path != "/api/";
    let (tx, mut rx) = mpsc::unbounded_channel();
    if events {
        // Queued before attaching: the connect event is always the first frame.
        let connect = frames::lifecycle(shared.self_id, "connect");
        let _ = tx.send(Out::Frame(Utf8Bytes::from(connect)));
    }
    let id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    // The session keeps a sender so its queue stays open after the server forgets it
    // (NapCat 3.1.10's orphans keep answering API calls).
    if !server.attach(Client {
        id,
        events,
        tx: tx.clone(),
    }) {
        session::close_no_code(&mut ws, None).await;
        return;
    }
    let _attached = Attached { server, id };
    let role = Role {
        api: Some(Flavor::ForwardWs),
        observe: None,
    };
    session::run(shared, &mut ws, &mut rx, role).await;
}
