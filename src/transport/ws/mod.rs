//! WebSocket transports: the server-side handshake, the raw-frame pump, and the forward
//! relay (clients dial lifeguard, lifeguard dials the backend's server for each).

pub mod forward;
pub mod handshake;
pub mod listener;
pub mod pump;
