//! lifeguard: a lifecycle-enforcing reverse proxy for OneBot v11 forward-WebSocket backends.
//!
//! Clients (NoneBot2, Koishi, ZeroBot, aiocqhttp) connect to lifeguard exactly as they would
//! to NapCat; lifeguard relays every frame untouched, watches the backend's health and the
//! operator's intent, and when the backend goes away it tells every client properly: the
//! lifecycle `disable` event, a Close frame with a code and a reason, a closed socket.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

//!
//! The crate is layered; each layer may use the ones below it, never one above (see
//! ARCHITECTURE.md):
//!
//! 1. [`config`], [`proto`], [`metrics`]: settings, wire protocols, counters;
//! 2. [`state`]: the one state (lanes' health, effective settings, sessions, drain);
//! 3. [`intent`] writes the state; [`transport`] reads it and acts on it;
//! 4. [`app`]: the wiring; [`demo`] and [`cli`]: entry points.
//!
//! [`sim`] is the NapCat simulator used by tests, benchmarks and the demo.

pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod intent;
pub mod metrics;
pub mod proto;
pub mod sim;
pub mod state;
pub mod transport;
