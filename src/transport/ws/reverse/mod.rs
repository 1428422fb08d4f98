//! Reverse WebSocket: the backend (NapCat's `websocketClients`, LLOneBot, go-cqhttp,
//! Lagrange) dials lifeguard, and lifeguard dials the bot frameworks for it.
//!
//! - [`listener`]: where backends dial in; a handshake is answered once a bot accepted.
//! - [`session`]: one backend connection and its bot connections, relayed; its own health
//!   (socket, heartbeats, account state) and the reverse lane's (operator, config files).
//! - [`bots`]: dialling a bot as the backend would, redial backoff, echo routing.

pub mod bots;
pub mod listener;
pub mod session;

pub use listener::serve;
