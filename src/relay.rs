//! One session: a client socket and its own backend socket, relayed as raw frames, and
//! the disable sequence that ends it.
//!
//! Both directions run in one task. Reads go into a per-thread 64 KiB buffer and are
//! written straight out with `try_write`; only what the destination cannot take yet is
//! copied into the session (`pending`), and reading that direction pauses until it is
//! gone. An idle session therefore holds no buffer at all.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::time::sleep_until;

use crate::onebot::{self, Kind, Role};
use crate::server::Shared;
use crate::upstream::Snapshot;
use crate::ws::{self, FrameScanner, Stop};

const READ_BUF: usize = 64 * 1024;
/// Reads per wake-up before yielding to other sessions.
const BATCHES_PER_WAKE: usize = 16;
/// Planned disables: how long replies to API calls already forwarded may take.
const REPLY_GRACE: Duration = Duration::from_millis(500);
/// Unplanned: how long to wait for a frame in flight to complete before injecting.
const BOUNDARY_GRACE: Duration = Duration::from_millis(200);
/// Longest a session waits for the others' Close frames in a mass disable.
const SWEEP_WAIT: Duration = Duration::from_millis(250);
const FAR: Duration = Duration::from_secs(30 * 86400);

thread_local! {
    static BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_BUF].into_boxed_slice());
}

/// Read what `src` has. A short read means the socket is drained (as tokio's own
/// `poll_read` assumes with epoll): readiness is cleared then, so the caller waits for the
/// next edge instead of issuing a read that can only fail with EAGAIN.
fn read_drained(src: &TcpStream, buf: &mut [u8]) -> io::Result<(usize, bool)> {
    use std::io::Read;
    let mut short = 0;
    let r = src.try_io(tokio::io::Interest::READABLE, || {
        let n = (&*socket2::SockRef::from(src)).read(buf)?;
        if n > 0 && n < buf.len() {
            short = n;
            // Reported as WouldBlock only to clear tokio's readiness flag.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => Ok((short, true)),
        r => r.map(|n| (n, false)),
    }
}

/// Who the session is, for routing, logs and re-checks after a config change.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: u64,
    pub peer: SocketAddr,
    pub path: String,
    pub role: Role,
    /// The credential the client presented (to re-check it when the access token changes).
    pub credential: Option<Box<str>>,
}

/// Why a session ended.
#[derive(Debug, Clone)]
pub enum End {
    /// The backend went down for everyone (admin, config, probes, offline, shutdown).
    Down(Arc<Snapshot>),
    /// This session's backend socket closed (with that code, if any).
    UpstreamClosed(Option<u16>),
    /// This session's backend socket failed or ended without a Close frame.
    UpstreamLost(String),
    /// The backend broke the WebSocket protocol.
    UpstreamViolation(&'static str),
    /// The backend sent no heartbeat within the grace.
    HeartbeatTimeout(Duration),
    /// The client closed the session (with that code, if any).
    ClientClosed(Option<u16>),
    /// The client's socket went away without a Close frame.
    ClientGone(String),
    /// The client broke the protocol (unmasked frame, invalid UTF-8, too big...).
    ClientViolation(u16, &'static str),
    /// The session must end for a reason decided elsewhere (config change): code, cause, reason.
    Kicked(u16, &'static str, String),
}

impl End {
    /// (cause label, close code sent to the client, reason text, tell the client with `disable`).
    fn verdict(&self) -> (&'static str, Option<u16>, String, bool) {
        match self {
            End::Down(s) => (
                s.cause.as_str(),
                Some(s.cause.close_code()),
                format!("{}: {}", s.cause, s.reason),
                true,
            ),
            End::UpstreamClosed(code) => (
                "upstream-closed",
                Some(ws::code::BACKEND_GONE),
                match code {
                    Some(c) => format!("backend closed the connection (code {c})"),
                    None => "backend closed the connection without a close code".to_string(),
                },
                true,
            ),
            End::UpstreamLost(e) => (
                "upstream-lost",
                Some(ws::code::BACKEND_GONE),
                format!("backend connection lost: {e}"),
                true,
            ),
            End::UpstreamViolation(e) => (
                "upstream-protocol",
                Some(ws::code::BACKEND_GONE),
                format!("backend protocol error: {e}"),
                true,
            ),
            End::HeartbeatTimeout(d) => (
                "heartbeat-timeout",
                Some(ws::code::TRY_AGAIN_LATER),
                format!("backend sent no heartbeat for {} ms", d.as_millis()),
                true,
            ),
            End::ClientClosed(_) => ("client-closed", None, String::new(), false),
            End::ClientGone(e) => ("client-gone", None, e.clone(), false),
            End::ClientViolation(code, reason) => {
                ("client-protocol", Some(*code), reason.to_string(), false)
            }
            End::Kicked(code, cause, reason) => (cause, Some(*code), reason.clone(), true),
        }
    }

    /// Replies to API calls already forwarded get a short grace to arrive.
    fn planned(&self) -> bool {
        match self {
            End::Down(s) => s.cause.planned(),
            End::Kicked(..) => true,
            _ => false,
        }
    }
}

/// One direction of a session: what it has seen and what it still owes the destination.
struct Direction {
    scanner: FrameScanner,
    /// Scanned bytes the destination has not taken yet.
    pending: Vec<u8>,
    pending_off: usize,
    /// Unscanned tail of the last read (a split header or small frame).
    carry: Vec<u8>,
}

/// Outcome of pumping one direction.
enum Step {
    /// Nothing more to read now.
    Idle,
    /// The destination is full; wait until it is writable.
    Blocked,
    /// Read budget used up; more may be waiting.
    Yield,
    /// The source sent a Close frame (raw bytes kept to forward as a reply if needed).
    Close(Option<u16>, Vec<u8>),
    Violation(u16, &'static str),
    /// The source ended (EOF) or failed.
    SrcGone(String),
    /// The destination failed.
    DstGone(String),
}

impl Direction {
    fn new(scanner: FrameScanner) -> Self {
        Direction {
            scanner,
            pending: Vec::new(),
            pending_off: 0,
            carry: Vec::new(),
        }
    }

    fn has_pending(&self) -> bool {
        self.pending_off < self.pending.len()
    }

    /// Write what is pending; Ok(true) when all of it went out.
    fn flush_pending(&mut self, dst: &TcpStream) -> io::Result<bool> {
        while self.has_pending() {
            match dst.try_write(&self.pending[self.pending_off..]) {
                Ok(n) => self.pending_off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        // Give the memory back: idle sessions hold no buffers.
        self.pending = Vec::new();
        self.pending_off = 0;
        Ok(true)
    }

    /// Wait (until `deadline`) for `dst` to take everything pending. True when it did.
    async fn finish_pending(&mut self, dst: &TcpStream, deadline: tokio::time::Instant) -> bool {
        loop {
            match self.flush_pending(dst) {
                Ok(true) => return true,
                Ok(false) => {}
                Err(_) => return false,
            }
            tokio::select! {
                _ = sleep_until(deadline) => return false,
                _ = dst.writable() => {}
            }
        }
    }

    /// Write `data` now as far as the socket takes it; keep the rest.
    fn send(&mut self, dst: &TcpStream, data: &[u8]) -> io::Result<()> {
        if self.has_pending() {
            self.pending.extend_from_slice(data);
            return Ok(());
        }
        let mut off = 0;
        while off < data.len() {
            match dst.try_write(&data[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.pending = data[off..].to_vec();
                    self.pending_off = 0;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Scan `bytes` (a read, with any carry in front), send what may go now and keep the
    /// undecided tail. Some(step) when the stream stops here or `dst` failed.
    fn relay(
        &mut self,
        dst: &TcpStream,
        bytes: &[u8],
        on_text: &mut dyn FnMut(&[u8], bool),
    ) -> Option<Step> {
        let scan = self.scanner.scan(bytes, on_text);
        if let Err(e) = self.send(dst, &bytes[..scan.forward]) {
            return Some(Step::DstGone(e.to_string()));
        }
        if scan.carry {
            if bytes.len() - scan.forward > READ_BUF / 2 {
                // Cannot happen with CLASSIFY_MAX-sized carries; never loop on it.
                return Some(Step::Violation(
                    ws::code::PROTOCOL_ERROR,
                    "frame header too large",
                ));
            }
            self.carry = bytes[scan.forward..].to_vec();
        }
        match scan.stop {
            Some(Stop::Close { code, frame, .. }) => Some(Step::Close(code, bytes[frame].to_vec())),
            Some(Stop::Violation { code, reason }) => Some(Step::Violation(code, reason)),
            None => None,
        }
    }

    /// Relay what `src` has to `dst`, scanning frames on the way.
    fn pump(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        on_text: &mut dyn FnMut(&[u8], bool),
    ) -> Step {
        match self.flush_pending(dst) {
            Ok(true) => {}
            Ok(false) => return Step::Blocked,
            Err(e) => return Step::DstGone(e.to_string()),
        }
        for _ in 0..BATCHES_PER_WAKE {
            let step = BUF.with(|cell| {
                let mut buf = cell.borrow_mut();
                let k = self.carry.len();
                buf[..k].copy_from_slice(&self.carry);
                let (n, drained) = match read_drained(src, &mut buf[k..]) {
                    Ok((0, _)) => {
                        return Some(Step::SrcGone(
                            "connection closed without a Close frame".into(),
                        ))
                    }
                    Ok(r) => r,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(Step::Idle),
                    Err(e) => return Some(Step::SrcGone(e.to_string())),
                };
                self.carry = Vec::new();
                if let Some(step) = self.relay(dst, &buf[..k + n], on_text) {
                    return Some(step);
                }
                if self.has_pending() {
                    return Some(Step::Blocked);
                }
                // A short read emptied the socket: no second read just to see EAGAIN.
                drained.then_some(Step::Idle)
            });
            if let Some(step) = step {
                return step;
            }
        }
        Step::Yield
    }
}

/// What the session learned from the backend's own frames.
struct Learned {
    connect_seen: bool,
    self_id: Option<u64>,
    /// Replies received (to compare with requests forwarded).
    replies: u64,
    /// When the watchdog fires (set by a heartbeat).
    heartbeat_deadline: Option<Instant>,
    heartbeat_window: Duration,
}

/// A running session. Owns both sockets.
pub struct Session {
    shared: Arc<Shared>,
    info: SessionInfo,
    client: TcpStream,
    upstream: TcpStream,
    down: Direction,
    up: Direction,
    learned: Learned,
    started: Instant,
    /// When something last went to the client; tracked only with `--client-heartbeat`.
    last_to_client: Option<Instant>,
}

impl Session {
    pub fn new(
        shared: Arc<Shared>,
        info: SessionInfo,
        client: TcpStream,
        upstream: TcpStream,
    ) -> Session {
        let max = shared.settings.load().max_message_size;
        Session {
            shared,
            info,
            client,
            upstream,
            // The backend is trusted with sizes: its frames stream through unbuffered.
            down: Direction::new(FrameScanner::new(ws::From::Server, usize::MAX)),
            up: Direction::new(FrameScanner::new(ws::From::Client, max)),
            learned: Learned {
                connect_seen: false,
                self_id: None,
                replies: 0,
                heartbeat_deadline: None,
                heartbeat_window: Duration::ZERO,
            },
            started: Instant::now(),
            last_to_client: None,
        }
    }

    fn on_backend_text(
        learned: &mut Learned,
        shared: &Shared,
        grace: f64,
        payload: &[u8],
        whole: bool,
    ) {
        if !whole {
            // The start of a large message: only replies matter (for the in-flight count).
            if onebot::is_reply(payload) {
                learned.replies += 1;
            }
            return;
        }
        match onebot::classify(payload) {
            Kind::Reply => learned.replies += 1,
            Kind::Event => {}
            Kind::Lifecycle { self_id, sub_type } => {
                if sub_type == "connect" {
                    learned.connect_seen = true;
                }
                if self_id.is_some() {
                    learned.self_id = self_id;
                }
                shared.gate.observe_backend(self_id, None, None, None);
            }
            Kind::Heartbeat {
                self_id,
                interval_ms,
                online,
                status,
            } => {
                if self_id.is_some() {
                    learned.self_id = self_id;
                }
                if let Some(ms) = interval_ms.filter(|ms| *ms > 0) {
                    let window = Duration::from_millis(ms).mul_f64(grace);
                    learned.heartbeat_window = window;
                    learned.heartbeat_deadline = Some(Instant::now() + window);
                }
                shared
                    .gate
                    .observe_backend(self_id, status.as_deref(), interval_ms, online);
            }
        }
    }

    /// Relay until something ends the session, then run the end sequence.
    pub async fn run(mut self, client_leftover: Vec<u8>, upstream_leftover: Vec<u8>) {
        let mut gate_rx = self.shared.gate.subscribe();
        let mut settings_rx = self.shared.subscribe_settings();
        let mut settings = settings_rx.borrow_and_update().clone();
        // Follows reloads: the next heartbeat re-arms the watchdog with the new factor.
        let mut grace = settings.heartbeat_grace;
        let end = 'relay: {
            // Bytes that arrived with the handshakes go first, through the scanners.
            if !upstream_leftover.is_empty() {
                if let Some(end) = self.feed(Dir::Down, &upstream_leftover, grace) {
                    break 'relay end;
                }
            }
            if !client_leftover.is_empty() {
                if let Some(end) = self.feed(Dir::Up, &client_leftover, grace) {
                    break 'relay end;
                }
            }
            drop((client_leftover, upstream_leftover));
            let snap = gate_rx.borrow_and_update().clone();
            if !snap.up {
                break 'relay End::Down(snap);
            }
            let watchdog = tokio::time::sleep(FAR);
            tokio::pin!(watchdog);
            let mut armed: Option<Instant> = None;
            // Client keepalive: a heartbeat when nothing went to the client for a while.
            let keepalive = tokio::time::sleep(FAR);
            tokio::pin!(keepalive);
            let mut keepalive_every = settings
                .client_heartbeat
                .filter(|_| self.info.role.gets_events());
            if let Some(every) = keepalive_every {
                self.last_to_client = Some(Instant::now());
                keepalive
                    .as_mut()
                    .reset(tokio::time::Instant::now() + every);
            }
            loop {
                if self.learned.heartbeat_deadline != armed {
                    armed = self.learned.heartbeat_deadline;
                    if let Some(at) = armed {
                        watchdog.as_mut().reset(at.into());
                    }
                }
                let down_pending = self.down.has_pending();
                let up_pending = self.up.has_pending();
                tokio::select! {
                    biased;
                    changed = gate_rx.changed() => {
                        let snap = gate_rx.borrow_and_update().clone();
                        if changed.is_err() || !snap.up {
                            break 'relay End::Down(snap);
                        }
                    }
                    _ = &mut watchdog, if armed.is_some() => {
                        break 'relay End::HeartbeatTimeout(self.learned.heartbeat_window);
                    }
                    _ = settings_rx.changed() => {
                        let new = settings_rx.borrow_and_update().clone();
                        if let Some(end) = self.recheck(&settings, &new) {
                            break 'relay end;
                        }
                        if new.client_heartbeat != settings.client_heartbeat {
                            keepalive_every = new.client_heartbeat.filter(|_| self.info.role.gets_events());
                            self.last_to_client = keepalive_every.map(|_| Instant::now());
                            let at = keepalive_every.unwrap_or(FAR);
                            keepalive.as_mut().reset(tokio::time::Instant::now() + at);
                        }
                        grace = new.heartbeat_grace;
                        settings = new;
                    }
                    _ = &mut keepalive, if keepalive_every.is_some() => {
                        let every = keepalive_every.unwrap_or(FAR);
                        let last = self.last_to_client.unwrap_or_else(Instant::now);
                        if last.elapsed() + Duration::from_millis(1) >= every {
                            self.send_keepalive();
                            self.last_to_client = Some(Instant::now());
                        }
                        let next = self.last_to_client.unwrap_or_else(Instant::now) + every;
                        keepalive.as_mut().reset(next.into());
                    }
                    _ = async {
                        if down_pending { self.client.writable().await } else { self.upstream.readable().await }
                    } => {
                        if let Some(end) = self.pump(Dir::Down, grace) {
                            break 'relay end;
                        }
                    }
                    _ = async {
                        if up_pending { self.upstream.writable().await } else { self.client.readable().await }
                    } => {
                        if let Some(end) = self.pump(Dir::Up, grace) {
                            break 'relay end;
                        }
                    }
                }
            }
        };
        // Boxed: the end sequence is allocated when a session ends, not held by idle ones.
        Box::pin(self.finish(end)).await;
    }

    /// A new configuration: does this session still belong?
    fn recheck(&self, old: &crate::config::Settings, new: &crate::config::Settings) -> Option<End> {
        if new.upstream != old.upstream {
            return Some(End::Kicked(
                ws::code::SERVICE_RESTART,
                "config",
                format!("config: upstream changed to {}", new.upstream),
            ));
        }
        if new.access_token != old.access_token
            && crate::server::authorized(new.access_token.as_ref(), self.info.credential.as_deref())
                .is_err()
        {
            return Some(End::Kicked(
                ws::code::POLICY,
                "token-revoked",
                "access token changed; reconnect with the new one".into(),
            ));
        }
        None
    }

    /// Client keepalive: a heartbeat from the backend's last known status, sent only when
    /// the client is taking data (never queued for a client that is gone) and only between
    /// frames, once the backend's connect event has gone through.
    fn send_keepalive(&mut self) {
        if !self.learned.connect_seen
            || self.down.has_pending()
            || !self.down.scanner.at_boundary()
            || !self.down.carry.is_empty()
        {
            return;
        }
        let backend = self.shared.gate.backend();
        let Some(self_id) = self.learned.self_id.or(backend.self_id) else {
            return;
        };
        let status = backend
            .status
            .as_deref()
            .unwrap_or(r#"{"online":true,"good":true}"#);
        let interval = self
            .shared
            .settings
            .load()
            .client_heartbeat
            .unwrap_or_default()
            .as_millis() as u64;
        let frame = ws::encode_frame(
            ws::OP_TEXT,
            onebot::heartbeat_event(self_id, status, interval).as_bytes(),
            None,
        );
        // All or nothing: a partial write would be finished from `pending`, which is fine.
        let _ = self.down.send(&self.client, &frame);
        self.down.scanner.bytes += frame.len() as u64;
    }

    /// Scan and relay bytes that were read elsewhere (the handshake's leftovers).
    fn feed(&mut self, dir: Dir, bytes: &[u8], grace: f64) -> Option<End> {
        let shared = &*self.shared;
        let learned = &mut self.learned;
        let mut on_text =
            |p: &[u8], whole: bool| Self::on_backend_text(learned, shared, grace, p, whole);
        let step = match dir {
            Dir::Down => self.down.relay(&self.client, bytes, &mut on_text),
            Dir::Up => self.up.relay(&self.upstream, bytes, &mut on_text),
        }?;
        self.end_of(dir, step)
    }

    /// One wake-up of one direction. Some(end) when the session must end.
    fn pump(&mut self, dir: Dir, grace: f64) -> Option<End> {
        let shared = &*self.shared;
        let learned = &mut self.learned;
        let mut on_text =
            |p: &[u8], whole: bool| Self::on_backend_text(learned, shared, grace, p, whole);
        let (frames, bytes) = match dir {
            Dir::Down => (self.down.scanner.frames, self.down.scanner.bytes),
            Dir::Up => (self.up.scanner.frames, self.up.scanner.bytes),
        };
        let step = match dir {
            Dir::Down => self.down.pump(&self.upstream, &self.client, &mut on_text),
            Dir::Up => self.up.pump(&self.client, &self.upstream, &mut on_text),
        };
        let scanner = match dir {
            Dir::Down => &self.down.scanner,
            Dir::Up => &self.up.scanner,
        };
        let (df, db) = (scanner.frames - frames, scanner.bytes - bytes);
        if db > 0 {
            shared.metrics.relayed(matches!(dir, Dir::Down), df, db);
            if let (Dir::Down, Some(t)) = (dir, self.last_to_client.as_mut()) {
                *t = Instant::now();
            }
        }
        self.end_of(dir, step)
    }

    /// What a direction's step means for the session: Some(end) when it must end.
    fn end_of(&mut self, dir: Dir, step: Step) -> Option<End> {
        match step {
            Step::Idle | Step::Blocked | Step::Yield => None,
            Step::Close(code, raw) => Some(self.on_close(dir, code, &raw)),
            Step::Violation(code, reason) => Some(dir.violation(code, reason)),
            Step::SrcGone(e) => Some(match dir {
                Dir::Down => End::UpstreamLost(e),
                Dir::Up => End::ClientGone(e),
            }),
            Step::DstGone(e) => Some(dir.dst_gone(e)),
        }
    }

    /// A Close frame arrived. A client's is forwarded to the backend (whose reply is
    /// relayed back in `finish`); a backend's is not: the client gets the disable sequence.
    fn on_close(&mut self, dir: Dir, code: Option<u16>, raw: &[u8]) -> End {
        match dir {
            Dir::Up => {
                let _ = self.up.send(&self.upstream, raw);
                End::ClientClosed(code)
            }
            Dir::Down => End::UpstreamClosed(code),
        }
    }

    /// The end sequence: deliver what the backend already sent, `disable`, Close, wait
    /// for the client's Close, close both sockets, log one line.
    async fn finish(mut self, end: End) {
        let s = self.shared.settings.load_full();
        let close_timeout = s.close_timeout;
        let (cause, code, reason, tell) = end.verdict();
        let backend_alive = !matches!(
            end,
            End::UpstreamClosed(_) | End::UpstreamLost(_) | End::UpstreamViolation(_)
        );
        if matches!(
            end,
            End::UpstreamClosed(_)
                | End::UpstreamLost(_)
                | End::UpstreamViolation(_)
                | End::HeartbeatTimeout(_)
        ) {
            self.shared.gate.kick();
        }
        let mut injected_disable = false;
        let mut sent_close = false;
        let mut note = "";

        match &end {
            End::ClientClosed(_) => {
                // Relay the backend's Close reply (and anything before it), then hang up.
                let deadline = tokio::time::Instant::now() + close_timeout;
                let _ = self.flush_up(deadline).await;
                self.drain_down(deadline, true, s.heartbeat_grace).await;
            }
            End::ClientGone(_) => {}
            _ => {
                if backend_alive {
                    let planned = end.planned();
                    let wait = if planned {
                        REPLY_GRACE.min(close_timeout)
                    } else {
                        BOUNDARY_GRACE
                    };
                    let deadline = tokio::time::Instant::now() + wait;
                    self.drain_down(deadline, false, s.heartbeat_grace).await;
                }
                let deadline = tokio::time::Instant::now() + close_timeout;
                if self.down.scanner.at_boundary() && self.down.carry.is_empty() {
                    let mut out = Vec::new();
                    if tell && self.info.role.gets_events() && self.learned.connect_seen {
                        let self_id = self
                            .learned
                            .self_id
                            .or(self.shared.gate.backend().self_id)
                            .unwrap_or(0);
                        out.extend(ws::encode_frame(
                            ws::OP_TEXT,
                            onebot::disable_event(self_id).as_bytes(),
                            None,
                        ));
                        injected_disable = true;
                    }
                    if let Some(code) = code {
                        out.extend(ws::close_frame(code, &reason, None));
                        sent_close = true;
                    }
                    let sent = self.down.send(&self.client, &out).is_ok();
                    if let End::Down(_) = end {
                        // Phase 1 of a mass disable is done for this session; phase 2 (the
                        // teardown) waits until every session has sent its Close.
                        self.shared.sweep.sent();
                        self.shared.sweep.wait(SWEEP_WAIT).await;
                    }
                    if sent && self.write_down(deadline).await {
                        self.await_client_close(deadline).await;
                    } else {
                        injected_disable = false;
                        sent_close = false;
                        note = "client did not take the Close frame in time";
                    }
                } else {
                    note = "backend died inside a frame: closed without a Close frame";
                    if let End::Down(_) = end {
                        self.shared.sweep.sent();
                    }
                }
                if backend_alive {
                    // Say goodbye to the backend too, if a frame can go in now.
                    if self.up.scanner.at_boundary() && !self.up.has_pending() {
                        let bye = ws::close_frame(
                            ws::code::GOING_AWAY,
                            "client session ended by lifeguard",
                            ws::random_mask(),
                        );
                        let _ = self.upstream.try_write(&bye);
                    }
                }
            }
        }
        if let End::ClientGone(_) | End::ClientViolation(..) = end {
            if self.up.scanner.at_boundary() && !self.up.has_pending() {
                let bye =
                    ws::close_frame(ws::code::GOING_AWAY, "client went away", ws::random_mask());
                let _ = self.upstream.try_write(&bye);
            }
        }
        let lifetime = self.started.elapsed();
        let client_code = match &end {
            End::ClientClosed(c) => *c,
            _ => None,
        };
        tracing::info!(
            session = self.info.id,
            peer = %self.info.peer,
            path = %self.info.path,
            cause,
            close_code = code.or(client_code).map(|c| c as i64).unwrap_or(-1),
            reason = %reason,
            disable_sent = injected_disable,
            close_sent = sent_close,
            lifetime_ms = lifetime.as_millis() as u64,
            frames_to_client = self.down.scanner.frames,
            frames_to_backend = self.up.scanner.frames,
            bytes_to_client = self.down.scanner.bytes,
            bytes_to_backend = self.up.scanner.bytes,
            note,
            "session closed"
        );
        self.shared
            .session_closed(&self.info, cause, code.or(client_code));
    }

    /// Keep relaying the backend to the client until it is quiet at a frame boundary
    /// (and, when `until_close`, until its Close frame, which is forwarded).
    async fn drain_down(&mut self, deadline: tokio::time::Instant, until_close: bool, grace: f64) {
        let requests = self.up.scanner.messages;
        loop {
            let step = {
                let shared = &*self.shared;
                let learned = &mut self.learned;
                let mut on_text =
                    |p: &[u8], whole: bool| Self::on_backend_text(learned, shared, grace, p, whole);
                self.down.pump(&self.upstream, &self.client, &mut on_text)
            };
            let waiting_replies = self.learned.replies < requests;
            match step {
                Step::Close(_, raw) => {
                    if until_close {
                        let _ = self.down.send(&self.client, &raw);
                        self.write_down(deadline).await;
                    }
                    return;
                }
                Step::SrcGone(_) | Step::DstGone(_) | Step::Violation(..) => return,
                Step::Idle
                    if !until_close && self.down.scanner.at_boundary() && !waiting_replies =>
                {
                    // Everything already received has been handed over.
                    self.write_down(deadline).await;
                    return;
                }
                Step::Yield => continue,
                Step::Idle | Step::Blocked => {}
            }
            let pending = self.down.has_pending();
            tokio::select! {
                _ = sleep_until(deadline) => return,
                _ = async { if pending { self.client.writable().await } else { self.upstream.readable().await } } => {}
            }
        }
    }

    /// Finish writing what is pending to the client. True when all of it went out.
    async fn write_down(&mut self, deadline: tokio::time::Instant) -> bool {
        self.down.finish_pending(&self.client, deadline).await
    }

    /// Finish writing what is pending to the backend.
    async fn flush_up(&mut self, deadline: tokio::time::Instant) -> bool {
        self.up.finish_pending(&self.upstream, deadline).await
    }

    /// After our Close: read (and drop) what the client still sends until its Close or EOF.
    async fn await_client_close(&mut self, deadline: tokio::time::Instant) {
        let mut scanner = FrameScanner::new(ws::From::Client, usize::MAX);
        let mut carry: Vec<u8> = std::mem::take(&mut self.up.carry);
        // Small: this array lives in every session's future.
        let mut buf = [0u8; 256];
        loop {
            let n = {
                let k = carry.len().min(buf.len());
                buf[..k].copy_from_slice(&carry[..k]);
                match self.client.try_read(&mut buf[k..]) {
                    Ok(0) => return,
                    Ok(n) => {
                        carry.clear();
                        Some(k + n)
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                    Err(_) => return,
                }
            };
            if let Some(total) = n {
                let scan = scanner.scan(&buf[..total], &mut |_, _| {});
                if scan.stop.is_some() {
                    return;
                }
                if scan.carry {
                    carry = buf[scan.forward..total].to_vec();
                }
                continue;
            }
            tokio::select! {
                _ = sleep_until(deadline) => return,
                _ = self.client.readable() => {}
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Dir {
    /// Backend to client.
    Down,
    /// Client to backend.
    Up,
}

impl Dir {
    fn violation(self, code: u16, reason: &'static str) -> End {
        match self {
            Dir::Down => End::UpstreamViolation(reason),
            Dir::Up => End::ClientViolation(code, reason),
        }
    }

    fn dst_gone(self, e: String) -> End {
        match self {
            Dir::Down => End::ClientGone(e),
            Dir::Up => End::UpstreamLost(e),
        }
    }
}
