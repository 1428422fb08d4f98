//! The protocols lifeguard speaks, with no state of their own: WebSocket framing, the
//! backend handshake, OneBot's shapes and its access-token rules. Everything above
//! (state, intent, transports) may use them; they use nothing but the config types.

pub mod auth;
pub mod dial;
pub mod onebot;
pub mod ws;
