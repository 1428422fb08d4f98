//! The accept loop every listener shares: the next connection until the drain stops
//! accepting. An accept error (out of descriptors, mostly) must neither spin the loop nor
//! end it, and under a flood it repeats thousands of times a second, so it is logged at
//! most once per [`LOG_EVERY`] per listener.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::proto::dial;
use crate::state::State;

/// Pause after a failed accept: the shortage behind it rarely lasts less.
const BACKOFF: Duration = Duration::from_millis(50);
const LOG_EVERY: Duration = Duration::from_secs(10);

pub struct Acceptor {
    listener: TcpListener,
    /// Which listener, for the log line.
    name: &'static str,
    /// Whether a failed accept counts as a client refused for lack of descriptors (the
    /// client listener; backends dialling in are not clients).
    counts_clients: bool,
    last_logged: Option<Instant>,
}

impl Acceptor {
    pub fn clients(listener: TcpListener, name: &'static str) -> Acceptor {
        Acceptor {
            listener,
            name,
            counts_clients: true,
            last_logged: None,
        }
    }

    pub fn backends(listener: TcpListener, name: &'static str) -> Acceptor {
        Acceptor {
            counts_clients: false,
            ..Acceptor::clients(listener, name)
        }
    }

    /// The next connection, with Nagle off (OneBot frames are small and latency-bound), or
    /// `None` once the drain stops accepting.
    pub async fn next(&mut self, state: &State) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let accepted = tokio::select! {
                _ = state.drain.accepting_stopped() => return None,
                r = self.listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer));
                }
                Err(e) => {
                    if self.counts_clients && dial::is_local_exhaustion(&e) {
                        state.metrics.connection_refused("fd-exhausted");
                    }
                    let now = Instant::now();
                    if self.last_logged.map_or(true, |t| now - t > LOG_EVERY) {
                        tracing::warn!(listener = self.name, error = %e, "accept failed");
                        self.last_logged = Some(now);
                    }
                    tokio::time::sleep(BACKOFF).await;
                }
            }
        }
    }
}
