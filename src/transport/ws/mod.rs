//! WebSocket transports: the server-side handshake, the raw-frame pump, the forward relay
//! (clients dial lifeguard, lifeguard dials the backend's server for each) and the reverse
//! relay (the backend dials lifeguard, lifeguard dials the bots).

pub mod forward;
pub mod handshake;
pub mod listener;
pub mod pump;
pub mod reverse;
pub mod watch;
