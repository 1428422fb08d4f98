//! The transports: each relays one way bots and backends talk, reads the
//! [`State`](crate::state::State) (a snapshot and a watch) and acts on it, and never
//! writes intent. A new transport is a new room here beside the others; what every
//! transport owes a client when a session ends is [`policy`].
//!
//! - [`accept`]: the accept loop every listener shares;
//! - [`ws`]: WebSocket: the client handshake, the raw-frame pump, the forward relay;
//! - [`http`]: HTTP: the API proxy and the event POST relay;
//! - [`notify`]: webhooks, posting every transition the state records.

pub mod accept;
pub mod http;
pub mod notify;
pub mod policy;
pub mod ws;
