//! lifeguard: a lifecycle-enforcing reverse proxy for OneBot v11 forward-WebSocket backends.
//!
//! Clients (NoneBot2, Koishi, ZeroBot, aiocqhttp) connect to lifeguard exactly as they would
//! to NapCat; lifeguard relays every frame untouched, watches the backend's health and the
//! operator's intent, and when the backend goes away it tells every client properly: the
//! lifecycle `disable` event, a Close frame with a code and a reason, a closed socket.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod napcat;
pub mod onebot;
pub mod relay;
pub mod reload;
pub mod server;
pub mod sim;
pub mod upstream;
pub mod ws;
