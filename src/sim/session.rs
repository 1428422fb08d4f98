//! An established WebSocket connection, whichever side dialled: a loop that writes what the
//! process queues for it (events, heartbeats, a Close) and answers API calls, and that
//! freezes while the process is hung.
//!
//! The forward server and the reverse client both hand their socket to [`run`]; they keep
//! the parts that differ (handshake, attaching to a server or an entry, redial).

use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use super::api::{self, Flavor};
use super::frames;
use super::process::Shared;

/// A WebSocket over plain TCP (the simulator speaks `ws://` only).
pub(crate) type Ws = WebSocketStream<TcpStream>;

/// How long to wait for the peer's Close reply after sending ours.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// Most incoming frames answered before one flush.
const READ_BATCH: usize = 64;
/// Most queued outgoing items fed before one flush.
const WRITE_BATCH: usize = 256;

/// What a connection task is asked to write (or do) next, in order.
#[derive(Debug)]
pub(crate) enum Out {
    /// One text frame (an event, a heartbeat); flushed with whatever else is queued.
    Frame(Utf8Bytes),
    /// Many text frames fed in a row (from `blast`).
    Batch(Arc<[Utf8Bytes]>),
    /// Flush, then signal: everything queued before it is in the socket.
    Barrier(oneshot::Sender<()>),
    /// NapCat's disable: a Close frame with no status code, then the end.
    CloseNoCode,
}

/// What one connection does with the frames its peer sends.
pub(crate) struct Role<'a> {
    /// Answer API calls in this flavour; `None`: ignore them (go-cqhttp's and Lagrange's
    /// Event connections read nothing).
    pub(crate) api: Option<Flavor>,
    /// Called with every frame the peer sent, before it is handled.
    pub(crate) observe: Option<&'a (dyn Fn(&Message) + Send + Sync)>,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The peer closed, or the socket failed.
    Peer,
    /// We closed it (`Out::CloseNoCode`) or our queue was dropped.
    Us,
}

/// Whether the session goes on after an action.
enum Flow {
    Continue,
    Stop(Ended),
}

/// Serve an established connection until it ends. A hung process neither reads (so no pong)
/// nor writes until unhung; kill and shutdown are the caller's (it drops this future).
pub(crate) async fn run(
    shared: &Shared,
    ws: &mut Ws,
    rx: &mut mpsc::UnboundedReceiver<Out>,
    role: Role<'_>,
) -> Ended {
    let mut hung = shared.hung.subscribe();
    loop {
        if *hung.borrow_and_update() {
            if hung.wait_for(|h| !*h).await.is_err() {
                return Ended::Us;
            }
            continue;
        }
        let flow = tokio::select! {
            changed = hung.changed() => match changed {
                Ok(()) => Flow::Continue,
                Err(_) => Flow::Stop(Ended::Us),
            },
            out = rx.recv() => match out {
                Some(out) => write_queued(ws, rx, out, &role).await,
                None => Flow::Stop(Ended::Us),
            },
            incoming = ws.next() => match incoming {
                Some(Ok(msg)) => answer(shared, ws, msg, &role).await,
                _ => Flow::Stop(Ended::Peer),
            },
        };
        if let Flow::Stop(ended) = flow {
            return ended;
        }
    }
}

/// Write `first` and whatever else is queued (up to a batch), then flush once.
async fn write_queued(
    ws: &mut Ws,
    rx: &mut mpsc::UnboundedReceiver<Out>,
    first: Out,
    role: &Role<'_>,
) -> Flow {
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
                close_no_code(ws, role.observe).await;
                return Flow::Stop(Ended::Us);
            }
        };
        if !ok {
            return Flow::Stop(Ended::Peer);
        }
        handled += 1;
        if handled < WRITE_BATCH {
            next = rx.try_recv().ok();
        }
    }
    match ws.flush().await {
        Ok(()) => Flow::Continue,
        Err(_) => Flow::Stop(Ended::Peer),
    }
}

/// Answer `first` and any further frames already readable (up to a batch), then flush.
async fn answer(shared: &Shared, ws: &mut Ws, first: Message, role: &Role<'_>) -> Flow {
    let mut msg = first;
    for _ in 0..READ_BATCH {
        if let Some(observe) = role.observe {
            observe(&msg);
        }
        let reply = match (&msg, role.api) {
            (_, None) => None,
            (Message::Text(text), Some(flavor)) => Some(api::handle(shared, text.as_str(), flavor)),
            (Message::Binary(bytes), Some(flavor)) => Some(match std::str::from_utf8(bytes) {
                Ok(text) => api::handle(shared, text, flavor),
                Err(_) => frames::PARSE_FAILED.to_owned(),
            }),
            // The peer closed: tungstenite has queued our Close reply; send it and end
            // without waiting for the peer to drop TCP (a peer that never does would hold
            // the connection forever).
            (Message::Close(_), _) => {
                let _ = ws.flush().await;
                return Flow::Stop(Ended::Peer);
            }
            // Pongs are queued by tungstenite and written on the next read or flush.
            (Message::Ping(_) | Message::Pong(_) | Message::Frame(_), _) => None,
        };
        if let Some(reply) = reply {
            if ws.feed(Message::text(reply)).await.is_err() {
                return Flow::Stop(Ended::Peer);
            }
        }
        match ws.next().now_or_never() {
            Some(Some(Ok(more))) => msg = more,
            Some(_) => {
                let _ = ws.flush().await;
                return Flow::Stop(Ended::Peer);
            }
            None => break,
        }
    }
    match ws.flush().await {
        Ok(()) => Flow::Continue,
        Err(_) => Flow::Stop(Ended::Peer),
    }
}

/// Send a Close frame with an empty payload (the peer reports 1005) and wait briefly for
/// the peer's Close before dropping the socket; `observe` sees what the peer sent meanwhile.
pub(crate) async fn close_no_code(ws: &mut Ws, observe: Option<&(dyn Fn(&Message) + Send + Sync)>) {
    if ws.close(None).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(msg)) = ws.next().await {
            if let Some(observe) = observe {
                observe(&msg);
            }
        }
    })
    .await;
}
