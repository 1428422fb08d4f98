//! One forward session: a client socket and its own backend socket, relayed as raw
//! frames by two [`Direction`]s in one task, and the end sequence the
//! [`policy`](crate::transport::policy) asks for.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::time::sleep_until;

use super::pump::{Direction, Step};
use super::watch::StateWatch;
use crate::proto::auth;
use crate::proto::onebot::{self, Kind};
use crate::proto::ws::{self, FrameScanner};
use crate::state::{Cause, SessionGuard, Snapshot, State, SweepTicket};
use crate::transport::policy::{self, End, Outcome, SessionInfo, Traffic, Verdict};

/// Planned disables: how long replies to API calls already forwarded may take.
const REPLY_GRACE: Duration = Duration::from_millis(500);
/// Unplanned: how long to wait for a frame in flight to complete before injecting.
const BOUNDARY_GRACE: Duration = Duration::from_millis(200);
/// Longest a session waits for the others' Close frames in a mass disable.
const SWEEP_WAIT: Duration = Duration::from_millis(250);
const FAR: Duration = Duration::from_secs(30 * 86400);
/// A kick this recent is what took the lane down (the notice's copies arrive together).
const KICK_RECENT: Duration = Duration::from_secs(2);

/// What the session learned from the backend's own frames.
struct Learned {
    connect_seen: bool,
    self_id: Option<u64>,
    /// Replies received (to compare with requests forwarded).
    replies: u64,
    /// When the watchdog fires (set by a heartbeat).
    heartbeat_deadline: Option<Instant>,
    heartbeat_window: Duration,
    /// This session relayed a `bot_offline` notice.
    kick_seen: bool,
    /// The lane went down because another session saw the account kicked: this one's copy
    /// of the notice is on its way (NapCat sends it to every event connection at once), and
    /// the bot should get it before `disable` (bots tell their owner from it).
    await_kick: bool,
}

impl Learned {
    /// Nothing more to wait for from a kick: none is expected, or its notice went through.
    fn kick_heard(&self) -> bool {
        !self.await_kick || self.kick_seen
    }
}

/// A running session. Owns both sockets.
pub struct Session {
    state: Arc<State>,
    info: SessionInfo,
    guard: SessionGuard,
    client: TcpStream,
    upstream: TcpStream,
    /// Backend to client.
    down: Direction,
    /// Client to backend.
    up: Direction,
    learned: Learned,
    started: Instant,
    /// When something last went to the client; tracked only with `--client-heartbeat`.
    last_to_client: Option<Instant>,
    /// While frames wait for the client: when it counts as stalled (unless it takes some).
    stall_deadline: Option<Instant>,
    /// `down.progress` when `stall_deadline` was set.
    stall_progress: u64,
}

impl Session {
    pub fn new(
        state: Arc<State>,
        info: SessionInfo,
        guard: SessionGuard,
        client: TcpStream,
        upstream: TcpStream,
    ) -> Session {
        let max = state.settings().max_message_size;
        // Bounded before the first heartbeat too: an event session whose backend connection
        // stalls from the start gets the deadline the backend's announced interval gives
        // (learned from any session); a backend that never announced one gets none.
        let first_heartbeat = info
            .role
            .gets_events()
            .then(|| state.backend().heartbeat_interval_ms)
            .flatten()
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(ms).mul_f64(state.settings().heartbeat_grace));
        Session {
            state,
            info,
            guard,
            client,
            upstream,
            // The backend is trusted with sizes: its frames stream through unbuffered.
            down: Direction::new(FrameScanner::new(ws::From::Server, usize::MAX)),
            up: Direction::new(FrameScanner::new(ws::From::Client, max)),
            learned: Learned {
                connect_seen: false,
                self_id: None,
                replies: 0,
                heartbeat_deadline: first_heartbeat.map(|w| Instant::now() + w),
                heartbeat_window: first_heartbeat.unwrap_or_default(),
                kick_seen: false,
                await_kick: false,
            },
            started: Instant::now(),
            last_to_client: None,
            stall_deadline: None,
            stall_progress: 0,
        }
    }

    fn on_backend_text(
        learned: &mut Learned,
        state: &State,
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
                state.observe_backend(self_id, None, None);
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
                state.observe_backend(self_id, status.as_deref(), interval_ms);
                if let Some(online) = online {
                    state.observe_online(online);
                }
            }
            Kind::BotOffline {
                self_id,
                tag,
                message,
            } => {
                learned.kick_seen = true;
                state.observe_backend(self_id, None, None);
                state.observe_kicked(&tag, &message);
            }
        }
    }

    /// Relay until something ends the session, then run the end sequence.
    pub async fn run(mut self, client_leftover: Vec<u8>, upstream_leftover: Vec<u8>) {
        let Some(end) = self.relay(client_leftover, upstream_leftover).await else {
            // Hard stop: dropped at once (the guard counts the session as aborted).
            return;
        };
        let hard_stop = self.state.drain.hard_stop_token();
        // Boxed: the end sequence is allocated when a session ends, not held by idle ones.
        tokio::select! {
            _ = Box::pin(self.finish(end)) => {}
            _ = hard_stop.cancelled() => {}
        }
    }

    /// Relay both directions until something ends the session (`None`: a hard stop).
    ///
    /// One hand-written poll loop rather than a `select!` rebuilt on every wake-up: socket
    /// readiness is asked only of the side each direction waits on, and the state's watch
    /// is polled only when its version moved (its waker stays registered in between).
    async fn relay(&mut self, client_leftover: Vec<u8>, upstream_leftover: Vec<u8>) -> Option<End> {
        let mut rx = self.state.subscribe();
        let seen: Arc<Snapshot> = rx.borrow_and_update().clone();
        let grace = seen.settings.heartbeat_grace;
        // Bytes that arrived with the handshakes go first, through the scanners.
        if !upstream_leftover.is_empty() {
            if let Some(end) = self.feed(Dir::Down, &upstream_leftover, grace) {
                return Some(end);
            }
            self.note_client_backlog(seen.settings.client_stall_timeout);
        }
        if !client_leftover.is_empty() {
            if let Some(end) = self.feed(Dir::Up, &client_leftover, grace) {
                return Some(end);
            }
        }
        drop((client_leftover, upstream_leftover));
        if seen.hard_stop {
            return None;
        }
        let health = seen.lane(self.info.lane);
        if !health.up {
            return Some(End::Down(health.clone()));
        }
        let keepalive_every = self.keepalive_period(&seen);
        let mut ctl = Controls {
            watch: StateWatch::new(rx),
            armed: None,
            keepalive_every,
            grace,
            stall_after: seen.settings.client_stall_timeout,
            seen,
        };
        let mut watchdog = std::pin::pin!(tokio::time::sleep(FAR));
        // Client keepalive: a heartbeat when nothing went to the client for a while.
        let mut keepalive = std::pin::pin!(tokio::time::sleep(FAR));
        if let Some(every) = keepalive_every {
            self.last_to_client = Some(Instant::now());
            keepalive
                .as_mut()
                .reset(tokio::time::Instant::now() + every);
        }
        std::future::poll_fn(|cx| {
            self.poll_relay(cx, &mut ctl, watchdog.as_mut(), keepalive.as_mut())
        })
        .await
    }

    /// One wake-up of the relay: the state first, then the timers, then both directions
    /// until neither can make progress.
    fn poll_relay(
        &mut self,
        cx: &mut Context<'_>,
        ctl: &mut Controls,
        mut watchdog: Pin<&mut tokio::time::Sleep>,
        mut keepalive: Pin<&mut tokio::time::Sleep>,
    ) -> Poll<Option<End>> {
        while let Poll::Ready(change) = ctl.watch.poll_change(cx) {
            let Some(snap) = change else {
                return Poll::Ready(Some(End::Down(ctl.seen.lane(self.info.lane).clone())));
            };
            if snap.hard_stop {
                return Poll::Ready(None);
            }
            let health = snap.lane(self.info.lane);
            if !health.up {
                return Poll::Ready(Some(End::Down(health.clone())));
            }
            if !Arc::ptr_eq(&snap.settings, &ctl.seen.settings) {
                if self.revoked(&ctl.seen, &snap) {
                    return Poll::Ready(Some(End::Revoked));
                }
                let every = self.keepalive_period(&snap);
                if every != ctl.keepalive_every {
                    ctl.keepalive_every = every;
                    self.last_to_client = every.map(|_| Instant::now());
                    let at = every.unwrap_or(FAR);
                    keepalive.as_mut().reset(tokio::time::Instant::now() + at);
                }
                // Follows reloads: the next heartbeat re-arms the watchdog with the new factor.
                ctl.grace = snap.settings.heartbeat_grace;
                ctl.stall_after = snap.settings.client_stall_timeout;
            }
            ctl.seen = snap;
        }
        loop {
            let mut yielded = false;
            for dir in [Dir::Down, Dir::Up] {
                loop {
                    match self.poll_direction(cx, dir, ctl.grace) {
                        Poll::Pending => break,
                        Poll::Ready(Pumped::Again) => continue,
                        Poll::Ready(Pumped::Yield) => {
                            yielded = true;
                            break;
                        }
                        Poll::Ready(Pumped::End(end)) => return Poll::Ready(Some(end)),
                    }
                }
            }
            self.note_client_backlog(ctl.stall_after);
            // Timers after the sockets: a heartbeat just relayed re-arms the watchdog
            // before it is asked whether it expired. One timer for both deadlines: the
            // backend's heartbeat and a client that takes nothing.
            let due = match (self.learned.heartbeat_deadline, self.stall_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if due != ctl.armed {
                ctl.armed = due;
                if let Some(at) = ctl.armed {
                    watchdog.as_mut().reset(at.into());
                }
            }
            if ctl.armed.is_some() && watchdog.as_mut().poll(cx).is_ready() {
                let now = Instant::now();
                if self.stall_deadline.is_some_and(|at| at <= now) {
                    return Poll::Ready(Some(End::ClientStalled(ctl.stall_after)));
                }
                if self.learned.heartbeat_deadline.is_some_and(|at| at <= now) {
                    return Poll::Ready(Some(End::HeartbeatTimeout(self.learned.heartbeat_window)));
                }
                // Woken a hair early: arm again for what is still due.
                ctl.armed = None;
                continue;
            }
            if let Some(every) = ctl.keepalive_every {
                if keepalive.as_mut().poll(cx).is_ready() {
                    let last = self.last_to_client.unwrap_or_else(Instant::now);
                    if last.elapsed() + Duration::from_millis(1) >= every {
                        self.send_keepalive(&ctl.seen);
                        self.last_to_client = Some(Instant::now());
                    }
                    let next = self.last_to_client.unwrap_or_else(Instant::now) + every;
                    keepalive.as_mut().reset(next.into());
                    continue;
                }
            }
            if yielded {
                // Read budget used up with more waiting: let other sessions run first.
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        }
    }

    /// Wait for the side `dir` is blocked on (the destination while something is pending,
    /// else the source), then pump it.
    fn poll_direction(&mut self, cx: &mut Context<'_>, dir: Dir, grace: f64) -> Poll<Pumped> {
        let ready = match dir {
            Dir::Down if self.down.has_pending() => self.client.poll_write_ready(cx),
            Dir::Down => self.upstream.poll_read_ready(cx),
            Dir::Up if self.up.has_pending() => self.upstream.poll_write_ready(cx),
            Dir::Up => self.client.poll_read_ready(cx),
        };
        match ready {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Pumped::End(match dir {
                Dir::Down => End::BackendLost(e.to_string()),
                Dir::Up => End::ClientGone(e.to_string()),
            })),
            Poll::Ready(Ok(())) => Poll::Ready(self.pump(dir, grace)),
        }
    }

    /// Frames wait for the client: start (or, when it took some, restart) the stall clock;
    /// nothing waits: stop it. Only the first branch costs anything, and only while the
    /// client is behind.
    #[inline]
    fn note_client_backlog(&mut self, stall_after: Duration) {
        if self.down.has_pending() {
            if self.stall_deadline.is_none() || self.down.progress != self.stall_progress {
                self.stall_deadline = Some(Instant::now() + stall_after);
                self.stall_progress = self.down.progress;
            }
        } else if self.stall_deadline.is_some() {
            self.stall_deadline = None;
        }
    }

    /// `--client-heartbeat`, for sessions that get events.
    fn keepalive_period(&self, snap: &Snapshot) -> Option<Duration> {
        snap.settings
            .client_heartbeat
            .filter(|_| self.info.role.gets_events())
    }

    /// The access token changed and this client's credential no longer passes.
    fn revoked(&self, old: &Snapshot, new: &Snapshot) -> bool {
        new.settings.access_token != old.settings.access_token
            && auth::authorized(
                new.settings.access_token.as_ref(),
                self.info.credential.as_deref(),
            )
            .is_err()
    }

    /// Client keepalive: a heartbeat from the backend's last known status, sent only when
    /// the client is taking data (never queued for a client that is gone) and only between
    /// frames, once the backend's connect event has gone through.
    fn send_keepalive(&mut self, snap: &Snapshot) {
        if !self.learned.connect_seen
            || self.down.has_pending()
            || !self.down.scanner.at_boundary()
            || !self.down.carry.is_empty()
        {
            return;
        }
        let backend = self.state.backend();
        let Some(self_id) = self.learned.self_id.or(backend.self_id) else {
            return;
        };
        let status = backend
            .status
            .as_deref()
            .unwrap_or(r#"{"online":true,"good":true}"#);
        let interval = snap
            .settings
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
        let state = &*self.state;
        let learned = &mut self.learned;
        let mut on_text =
            |p: &[u8], whole: bool| Self::on_backend_text(learned, state, grace, p, whole);
        let step = match dir {
            Dir::Down => self.down.relay(&self.client, bytes, &mut on_text),
            Dir::Up => self.up.relay(&self.upstream, bytes, &mut on_text),
        }?;
        self.end_of(dir, step)
    }

    /// One wake-up of one direction.
    fn pump(&mut self, dir: Dir, grace: f64) -> Pumped {
        let state = &*self.state;
        let learned = &mut self.learned;
        let mut on_text =
            |p: &[u8], whole: bool| Self::on_backend_text(learned, state, grace, p, whole);
        let (direction, src, dst) = match dir {
            Dir::Down => (&mut self.down, &self.upstream, &self.client),
            Dir::Up => (&mut self.up, &self.client, &self.upstream),
        };
        let (frames, bytes) = (direction.scanner.frames, direction.scanner.bytes);
        let step = direction.pump(src, dst, &mut on_text);
        let (df, db) = (
            direction.scanner.frames - frames,
            direction.scanner.bytes - bytes,
        );
        if db > 0 {
            state.metrics.relayed(matches!(dir, Dir::Down), df, db);
            if let (Dir::Down, Some(t)) = (dir, self.last_to_client.as_mut()) {
                *t = Instant::now();
            }
        }
        match step {
            Step::Yield => Pumped::Yield,
            step => match self.end_of(dir, step) {
                Some(end) => Pumped::End(end),
                None => Pumped::Again,
            },
        }
    }

    /// What a direction's step means for the session: Some(end) when it must end.
    fn end_of(&mut self, dir: Dir, step: Step) -> Option<End> {
        match step {
            Step::Idle | Step::Blocked | Step::Yield => None,
            Step::Close(code, raw) => Some(self.on_close(dir, code, &raw)),
            Step::Violation(code, reason) => Some(dir.violation(code, reason)),
            Step::SrcGone(e) => Some(match dir {
                Dir::Down => End::BackendLost(e),
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
            Dir::Down => End::BackendClosed(code),
        }
    }

    /// The end sequence the verdict asks for, then one log line.
    async fn finish(mut self, end: End) {
        let verdict = end.verdict();
        if verdict.probe_now {
            self.state.kick_probe();
        }
        // Sessions ending because their lane went down take part in the sweep.
        let ticket = matches!(end, End::Down(_)).then(|| self.state.sessions.sweep_ticket());
        if let End::Down(h) = &end {
            self.learned.await_kick = h.cause == Cause::Offline
                && self.info.role.gets_events()
                && !self.learned.kick_seen
                && self
                    .state
                    .backend()
                    .last_kick
                    .as_ref()
                    .is_some_and(|k| k.at.elapsed().unwrap_or_default() < KICK_RECENT);
        }
        let close_timeout = self.state.settings().close_timeout;
        let outcome = match &end {
            End::ClientClosed(code) => {
                // Relay the backend's Close reply (and anything before it), then hang up.
                let deadline = tokio::time::Instant::now() + close_timeout;
                let _ = self.flush_up(deadline).await;
                self.drain_down(deadline, true).await;
                Outcome {
                    close_code: *code,
                    ..Outcome::default()
                }
            }
            End::ClientGone(_) => Outcome::default(),
            _ => self.terminate(&verdict, close_timeout, ticket).await,
        };
        if let End::BackendViolation(why) = &end {
            // RFC 6455 7.1.7: fail the connection, saying why, if a frame can still go.
            if self.up.scanner.at_boundary() && !self.up.has_pending() {
                let bye = ws::close_frame(ws::code::PROTOCOL_ERROR, why, ws::random_mask());
                let _ = self.upstream.try_write(&bye);
            }
        }
        if !verdict.by_client || matches!(end, End::ClientGone(_)) {
            // Say goodbye to the backend too, if its connection still works and a frame can
            // go in now.
            if verdict.backend_usable && self.up.scanner.at_boundary() && !self.up.has_pending() {
                let why = if verdict.by_client {
                    "client went away"
                } else {
                    "client session ended by lifeguard"
                };
                let bye = ws::close_frame(ws::code::GOING_AWAY, why, ws::random_mask());
                let _ = self.upstream.try_write(&bye);
            }
        }
        let traffic = Traffic {
            frames_to_client: self.down.scanner.frames,
            frames_to_backend: self.up.scanner.frames,
            bytes_to_client: self.down.scanner.bytes,
            bytes_to_backend: self.up.scanner.bytes,
        };
        policy::log_termination(
            &self.info,
            &verdict,
            &outcome,
            self.started.elapsed(),
            traffic,
        );
        self.guard.close(verdict.cause, outcome.close_code);
    }

    /// lifeguard ends the session: deliver what the backend already sent, then `disable`,
    /// then Close, then wait for the client's Close.
    async fn terminate(
        &mut self,
        verdict: &Verdict,
        close_timeout: Duration,
        ticket: Option<SweepTicket>,
    ) -> Outcome {
        if verdict.backend_usable {
            let wait = if verdict.planned {
                REPLY_GRACE.min(close_timeout)
            } else {
                BOUNDARY_GRACE
            };
            self.drain_down(tokio::time::Instant::now() + wait, false)
                .await;
        }
        let deadline = tokio::time::Instant::now() + close_timeout;
        if !self.down.scanner.at_boundary() || !self.down.carry.is_empty() {
            // Nothing can be injected into the middle of a frame: hang up.
            return Outcome {
                note: if verdict.backend_usable {
                    "inside a frame that did not finish in time: closed without a Close frame"
                } else {
                    "backend died inside a frame: closed without a Close frame"
                },
                ..Outcome::default()
            };
        }
        let announce =
            verdict.announce && self.info.role.gets_events() && self.learned.connect_seen;
        let mut out = Vec::new();
        if announce {
            let self_id = self
                .learned
                .self_id
                .or(self.state.backend().self_id)
                .unwrap_or(0);
            out.extend(ws::encode_frame(
                ws::OP_TEXT,
                onebot::disable_event(self_id).as_bytes(),
                None,
            ));
        }
        if let Some(code) = verdict.code {
            out.extend(ws::close_frame(code, &verdict.reason, None));
        }
        let sent = self.down.send(&self.client, &out).is_ok();
        if let Some(ticket) = ticket {
            // Phase 1 of a mass disable is done for this session; phase 2 (the teardown)
            // waits until every session has sent its Close.
            ticket.sent();
            self.state.sessions.sweep_wait(SWEEP_WAIT).await;
        }
        if !(sent && self.write_down(deadline).await) {
            return Outcome {
                note: "client did not take the Close frame in time",
                ..Outcome::default()
            };
        }
        self.await_client_close(deadline).await;
        Outcome {
            disable_sent: announce,
            close_code: verdict.code,
            close_sent: verdict.code.is_some(),
            note: "",
        }
    }

    /// Keep relaying the backend to the client until it is quiet at a frame boundary
    /// (and, when `until_close`, until its Close frame, which is forwarded).
    async fn drain_down(&mut self, deadline: tokio::time::Instant, until_close: bool) {
        let requests = self.up.scanner.messages;
        let grace = self.state.settings().heartbeat_grace;
        loop {
            let step = {
                let state = &*self.state;
                let learned = &mut self.learned;
                let mut on_text =
                    |p: &[u8], whole: bool| Self::on_backend_text(learned, state, grace, p, whole);
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
                    if !until_close
                        && self.down.scanner.at_boundary()
                        && !waiting_replies
                        && self.learned.kick_heard() =>
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
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
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

/// What pumping a direction once left to do.
enum Pumped {
    /// Ask the socket again (it may be drained or blocked by now).
    Again,
    /// The read budget is used up and more is waiting.
    Yield,
    End(End),
}

/// The relay loop's own state between wake-ups.
struct Controls {
    watch: StateWatch,
    /// The heartbeat deadline the watchdog is set to.
    armed: Option<Instant>,
    keepalive_every: Option<Duration>,
    /// The heartbeat grace factor in force.
    grace: f64,
    /// `--client-stall-timeout` in force.
    stall_after: Duration,
    /// The snapshot last acted on.
    seen: Arc<Snapshot>,
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
            Dir::Down => End::BackendViolation(reason),
            Dir::Up => End::ClientViolation(code, reason),
        }
    }

    fn dst_gone(self, e: String) -> End {
        match self {
            Dir::Down => End::ClientGone(e),
            Dir::Up => End::BackendLost(e),
        }
    }
}
