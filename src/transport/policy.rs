//! The session policy every transport shares: what ended a session, what that means for
//! the client (a typed [`Verdict`]), and the one log line each termination gets. Each
//! transport carries a verdict out its own way (WebSocket: frames; HTTP: a body or a
//! POSTed event).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::proto::onebot::Role;
use crate::proto::ws;
use crate::state::{Health, Lane};

/// Who the session is, for routing, logs and re-checks after a config change.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: u64,
    pub lane: Lane,
    pub peer: SocketAddr,
    pub path: String,
    pub role: Role,
    /// The credential the client presented (to re-check it when the access token
    /// changes). Never logged, never sent upstream.
    pub credential: Option<Box<[u8]>>,
    /// The backend's QQ number, when the session knows it from the start (reverse
    /// WebSocket: the backend's `X-Self-ID`).
    pub self_id: Option<u64>,
}

/// What ended a session.
#[derive(Debug, Clone)]
pub enum End {
    /// The session's lane went down (admin, config, probes, offline, shutdown).
    Down(Arc<Health>),
    /// This session's backend connection closed (with that code, if any).
    BackendClosed(Option<u16>),
    /// This session's backend connection failed or ended without a Close.
    BackendLost(String),
    /// The backend broke the protocol.
    BackendViolation(&'static str),
    /// The backend sent no heartbeat within the grace.
    HeartbeatTimeout(Duration),
    /// The client closed the session (with that code, if any).
    ClientClosed(Option<u16>),
    /// The client's connection went away without a Close.
    ClientGone(String),
    /// The client broke the protocol (unmasked frame, invalid UTF-8, too big...).
    ClientViolation(u16, &'static str),
    /// The access token changed and the client's credential no longer passes.
    Revoked,
    /// Reverse WebSocket: a newer backend connection for the same self id took over.
    Replaced(String),
    /// Reverse WebSocket: the bot fell behind (this many bytes queued for it) while other
    /// bots share the backend connection.
    Overflow(usize),
    /// Frames waited for the client and it took none of them for this long.
    ClientStalled(Duration),
}

/// What the client is owed when its session ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The cause label (logs, metrics).
    pub cause: &'static str,
    /// A human sentence (Close reasons, logs).
    pub reason: String,
    /// The Close code lifeguard sends; `None` when the client ended it.
    pub code: Option<u16>,
    /// Tell the client with the lifecycle `disable` event first.
    pub announce: bool,
    /// Planned: replies to requests already forwarded get a short grace to arrive.
    pub planned: bool,
    /// The backend connection can still be read and written (to drain it, to say goodbye).
    pub backend_usable: bool,
    /// The backend itself may be in trouble: probe it now.
    pub probe_now: bool,
    /// The client ended the session; nothing is owed but an orderly close.
    pub by_client: bool,
}

impl End {
    pub fn verdict(&self) -> Verdict {
        let lifeguard = |cause: &'static str, code: u16, reason: String| Verdict {
            cause,
            reason,
            code: Some(code),
            announce: true,
            planned: false,
            backend_usable: true,
            probe_now: false,
            by_client: false,
        };
        match self {
            End::Down(h) => Verdict {
                planned: h.cause.planned(),
                ..lifeguard(
                    h.cause.as_str(),
                    h.cause.close_code(),
                    format!("{}: {}", h.cause, h.reason),
                )
            },
            End::BackendClosed(code) => Verdict {
                backend_usable: false,
                probe_now: true,
                ..lifeguard(
                    "upstream-closed",
                    ws::code::BACKEND_GONE,
                    match code {
                        Some(c) => format!("backend closed the connection (code {c})"),
                        None => "backend closed the connection without a close code".into(),
                    },
                )
            },
            End::BackendLost(e) => Verdict {
                backend_usable: false,
                probe_now: true,
                ..lifeguard(
                    "upstream-lost",
                    ws::code::BACKEND_GONE,
                    format!("backend connection lost: {e}"),
                )
            },
            End::BackendViolation(e) => Verdict {
                backend_usable: false,
                probe_now: true,
                ..lifeguard(
                    "upstream-protocol",
                    ws::code::BACKEND_GONE,
                    format!("backend protocol error: {e}"),
                )
            },
            End::HeartbeatTimeout(d) => Verdict {
                probe_now: true,
                ..lifeguard(
                    "heartbeat-timeout",
                    ws::code::TRY_AGAIN_LATER,
                    format!("backend sent no heartbeat for {} ms", d.as_millis()),
                )
            },
            End::Revoked => Verdict {
                planned: true,
                ..lifeguard(
                    "token-revoked",
                    ws::code::POLICY,
                    "access token changed; reconnect with the new one".into(),
                )
            },
            End::Replaced(why) => lifeguard("replaced", ws::code::SERVICE_RESTART, why.clone()),
            End::Overflow(queued) => Verdict {
                announce: false,
                ..lifeguard(
                    "bot-overflow",
                    ws::code::POLICY,
                    format!(
                        "bot fell behind: {} KiB queued for it; lifeguard redials it",
                        queued / 1024
                    ),
                )
            },
            End::ClientStalled(d) => Verdict {
                announce: false,
                ..lifeguard(
                    "client-stalled",
                    ws::code::POLICY,
                    format!(
                        "client took nothing for {} ms while frames waited for it",
                        d.as_millis()
                    ),
                )
            },
            End::ClientClosed(_) => Verdict {
                code: None,
                announce: false,
                by_client: true,
                ..lifeguard("client-closed", 0, String::new())
            },
            End::ClientGone(e) => Verdict {
                code: None,
                announce: false,
                by_client: true,
                ..lifeguard("client-gone", 0, e.clone())
            },
            End::ClientViolation(code, reason) => Verdict {
                announce: false,
                ..lifeguard("client-protocol", *code, reason.to_string())
            },
        }
    }
}

/// What the end sequence actually delivered.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The `disable` event went out.
    pub disable_sent: bool,
    /// The Close code that went out, or the client's when it closed first.
    pub close_code: Option<u16>,
    /// lifeguard's Close frame went out.
    pub close_sent: bool,
    /// Anything that kept the sequence from running as the verdict said.
    pub note: &'static str,
}

/// Traffic of a session, for its termination line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic {
    pub frames_to_client: u64,
    pub frames_to_backend: u64,
    pub bytes_to_client: u64,
    pub bytes_to_backend: u64,
}

/// The one line every termination gets.
pub fn log_termination(
    info: &SessionInfo,
    verdict: &Verdict,
    outcome: &Outcome,
    lifetime: Duration,
    traffic: Traffic,
) {
    tracing::info!(
        session = info.id,
        transport = info.lane.as_str(),
        self_id = info.self_id,
        peer = %info.peer,
        path = %info.path,
        cause = verdict.cause,
        close_code = outcome.close_code.map(|c| c as i64).unwrap_or(-1),
        reason = %verdict.reason,
        disable_sent = outcome.disable_sent,
        close_sent = outcome.close_sent,
        lifetime_ms = lifetime.as_millis() as u64,
        frames_to_client = traffic.frames_to_client,
        frames_to_backend = traffic.frames_to_backend,
        bytes_to_client = traffic.bytes_to_client,
        bytes_to_backend = traffic.bytes_to_backend,
        note = outcome.note,
        "session closed"
    );
}
