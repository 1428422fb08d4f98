//! One accepted TCP connection: the WebSocket handshake (with NapCat's token check), then a
//! loop that answers API calls and writes queued events, until the peer goes away or the
//! simulator kills it.
//!
//! The task owns its socket; everything else reaches it through its [`Out`] queue, the
//! `hung` flag, and the process token that `kill()` cancels (dropping the socket without a
//! Close frame).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::server::{Client, Out, Server};
use super::{api, frames, Shared};

type Ws = WebSocketStream<TcpStream>;

/// How long to wait for the peer's Close reply after sending ours.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// Most incoming frames answered before one flush.
const READ_BATCH: usize = 64;
/// Most queued outgoing items fed before one flush.
const WRITE_BATCH: usize = 256;

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
        _ = server.stop.cancelled() => return,
        done = handshake => match done {
            Some(done) => done,
            None => return,
        },
    };
    shared.count_handshake(&upgrade.path);
    let _open = OpenGuard::new(&shared);
    // kill(): drop the socket mid-whatever, no Close frame.
    tokio::select! {
        _ = process.cancelled() => {}
        _ = session(&shared, &server, ws, upgrade) => {}
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
                .and_then(|q| query_param(q, "access_token"))
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

/// The first value of `name` in a query string, percent-decoded (`+` is a space).
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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

/// Whether the session goes on after an action.
enum Flow {
    Continue,
    Stop,
}

/// An established WebSocket connection.
async fn session(shared: &Shared, server: &Server, mut ws: Ws, upgrade: Upgrade) {
    if !upgrade.authorized {
        let _ = ws.feed(Message::text(frames::AUTH_FAILED)).await;
        close_no_code(&mut ws).await;
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
        close_no_code(&mut ws).await;
        return;
    }
    let _attached = Attached { server, id };
    let mut hung = shared.hung.subscribe();
    loop {
        if *hung.borrow_and_update() {
            // Hung: neither read (so no pong) nor write, until unhang (or kill/shutdown,
            // which drop this future).
            if hung.wait_for(|h| !*h).await.is_err() {
                return;
            }
            continue;
        }
        let flow = tokio::select! {
            changed = hung.changed() => match changed {
                Ok(()) => Flow::Continue,
                Err(_) => Flow::Stop,
            },
            out = rx.recv() => match out {
                Some(out) => write_queued(&mut ws, &mut rx, out).await,
                None => Flow::Stop,
            },
            incoming = ws.next() => match incoming {
                Some(Ok(msg)) => answer(shared, &mut ws, msg).await,
                _ => Flow::Stop,
            },
        };
        if let Flow::Stop = flow {
            return;
        }
    }
}

/// Write `first` and whatever else is queued (up to a batch), then flush once.
async fn write_queued(ws: &mut Ws, rx: &mut mpsc::UnboundedReceiver<Out>, first: Out) -> Flow {
    let mut next = Some(first);
    let mut handled = 0;
    while let Some(out) = next.take() {
        let ok = match out {
            Out::Frame(frame) => ws.feed(Message::Text(frame)).await.is_ok(),
            Out::Batch(frames) => {
                let mut ok = true;
                for frame in frames.iter() {
                    if ws.feed(Message::Text(frame.clone())).await.is_err() {
                        ok = false;
                        break;
                    }
                }
                ok
            }
            Out::Barrier(done) => {
                let ok = ws.flush().await.is_ok();
                if ok {
                    let _ = done.send(());
                }
                ok
            }
            Out::CloseNoCode => {
                let _ = ws.flush().await;
                close_no_code(ws).await;
                return Flow::Stop;
            }
        };
        if !ok {
            return Flow::Stop;
        }
        handled += 1;
        if handled < WRITE_BATCH {
            next = rx.try_recv().ok();
        }
    }
    match ws.flush().await {
        Ok(()) => Flow::Continue,
        Err(_) => Flow::Stop,
    }
}

/// Answer `first` and any further frames already readable (up to a batch), then flush.
async fn answer(shared: &Shared, ws: &mut Ws, first: Message) -> Flow {
    let mut msg = first;
    for _ in 0..READ_BATCH {
        let reply = match &msg {
            Message::Text(text) => Some(api::handle(shared, text.as_str())),
            Message::Binary(bytes) => Some(match std::str::from_utf8(bytes) {
                Ok(text) => api::handle(shared, text),
                Err(_) => frames::PARSE_FAILED.to_owned(),
            }),
            // Pongs and Close replies are queued by tungstenite and written on the next
            // read or flush.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => None,
        };
        if let Some(reply) = reply {
            if ws.feed(Message::text(reply)).await.is_err() {
                return Flow::Stop;
            }
        }
        match ws.next().now_or_never() {
            Some(Some(Ok(more))) => msg = more,
            Some(_) => {
                let _ = ws.flush().await;
                return Flow::Stop;
            }
            None => break,
        }
    }
    match ws.flush().await {
        Ok(()) => Flow::Continue,
        Err(_) => Flow::Stop,
    }
}

/// Send a Close frame with an empty payload (the client reports 1005) and wait briefly
/// for the peer's Close before dropping the socket.
async fn close_no_code(ws: &mut Ws) {
    if ws.close(None).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}
