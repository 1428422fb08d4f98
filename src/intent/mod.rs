//! Where the operator's intent and the backend's observed health enter: each module here
//! writes to the [`State`](crate::state::State) and nothing else; none of them touches a
//! session or a transport.
//!
//! - [`admin`]: the admin API (`POST /disable`, `/enable`) and what it shows;
//! - [`reload`]: lifeguard's own config file and SIGHUP;
//! - [`napcat`]: NapCat's config file (its servers' `enable`, port and token);
//! - [`probe`]: the active probes and the login watch;
//! - [`files`]: watching files for changes, shared by `reload` and `napcat`.

pub mod admin;
pub mod files;
pub mod napcat;
pub mod probe;
pub mod reload;
