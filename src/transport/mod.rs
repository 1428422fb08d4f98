//! The transports: each relays one way bots and backends talk, reads the
//! [`State`](crate::state::State) (a snapshot and a watch) and acts on it, and never
//! writes intent. A new transport is a new room here beside the others; what every
//! transport owes a client when a session ends is [`policy`].
//!
//! - [`ws`]: WebSocket: the client handshake, the raw-frame pump, the forward relay;
//! - [`notify`]: webhooks, posting every transition the state records.

pub mod notify;
pub mod policy;
pub mod ws;
