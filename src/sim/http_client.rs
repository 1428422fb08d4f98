//! NapCat's HTTP POST client (`httpClients`, `network/http-client.ts`): every event is POSTed
//! to a configured URL.
//!
//! As NapCat does it: `Content-Type: application/json`, `x-self-id`, and `x-signature:
//! sha1=<hex HMAC-SHA1(token, body)>` when a token is set; the body is the event's exact
//! JSON; fire and forget (no timeout, no retry, each event its own request, concurrently,
//! so order is not guaranteed); 301/302/307/308 followed (at most 5, same method and body,
//! like its `RequestUtil`); no heartbeat and no lifecycle event; a 2xx JSON body is a quick
//! operation (NapCat then acts on it). Node writes the body with `req.write()`, so it goes
//! chunked; the simulator does the same unless told otherwise.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use sha1::Sha1;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;

use super::process::{self, lock, Shared};

/// Most redirects followed for one event (NapCat's `maxRedirects`).
const MAX_REDIRECTS: usize = 5;
/// Largest response body read (a quick operation is small).
const RESPONSE_LIMIT: usize = 1 << 20;
/// Events waiting in a serial entry's queue; more are dropped (and recorded as such).
const QUEUE_LIMIT: usize = 4096;
/// Requests in flight per concurrent entry; more events are dropped (and recorded).
const IN_FLIGHT_LIMIT: usize = 1024;
/// Most outcomes and quick operations remembered per entry (oldest forgotten first).
const LOG_LIMIT: usize = 4096;

/// One HTTP POST entry of the simulated process (NapCat's `httpClients[i]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostConfig {
    /// `http://host:port/path` to POST events to (plain `http://` only).
    pub url: String,
    /// Secret for `X-Signature`; `None` or empty: no signature header.
    pub token: Option<String>,
    /// Send one request at a time, in event order (deterministic tests); NapCat does not.
    pub serial: bool,
    /// Also POST heartbeats with this period (go-cqhttp does; NapCat never). `None`: no.
    pub heartbeat_interval: Option<Duration>,
    /// Chunked request body like Node's `req.write()` (true), or `Content-Length` (false).
    pub chunked: bool,
    /// Whether the entry starts enabled.
    pub enabled: bool,
}

impl PostConfig {
    /// NapCat's behaviour for `url`: no token, concurrent, no heartbeats, chunked.
    pub fn napcat(url: impl Into<String>) -> Self {
        PostConfig {
            url: url.into(),
            token: None,
            serial: false,
            heartbeat_interval: None,
            chunked: true,
            enabled: true,
        }
    }

    /// This entry signing its bodies with `token`.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// This entry sending one request at a time, in order.
    pub fn serial(mut self) -> Self {
        self.serial = true;
        self
    }

    /// This entry POSTing heartbeats every `interval` (go-cqhttp style).
    pub fn with_heartbeat_interval(mut self, interval: Option<Duration>) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// This entry sending `Content-Length` bodies instead of chunked ones.
    pub fn with_content_length(mut self) -> Self {
        self.chunked = false;
        self
    }

    /// This entry starting enabled or not.
    pub fn with_enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }
}

/// How one POST ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostOutcome {
    /// The event's JSON, as posted.
    pub event: String,
    /// The final response's status (after redirects); `None` if there was none.
    pub status: Option<u16>,
    /// What NapCat would log as a failure: a transport error, a non-2xx status, a 2xx body
    /// that is not JSON, too many redirects, a full queue. `None`: success.
    pub error: Option<String>,
}

/// A quick operation: a 2xx response with a JSON body, which NapCat acts on (reply, kick,
/// approve...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuickOperation {
    /// The event it answers.
    pub event: String,
    /// The response status.
    pub status: u16,
    /// The response body, verbatim.
    pub body: String,
}

/// Counters of one POST entry, for tests that wait for something to happen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostStatus {
    /// Events accepted for posting.
    pub posted: u64,
    /// Posts finished (outcome recorded), including dropped ones.
    pub finished: u64,
    /// Quick operations received.
    pub quick_operations: u64,
}

/// One POST entry.
pub(crate) struct Entry {
    cfg: PostConfig,
    /// Switched on or off (hot reload): off posts nothing.
    enabled: watch::Sender<bool>,
    /// The serial worker's queue (serial entries only).
    queue: Option<mpsc::Sender<(String, CancellationToken)>>,
    /// Bounds concurrent requests (concurrent entries).
    in_flight: Arc<Semaphore>,
    status: watch::Sender<PostStatus>,
    outcomes: Mutex<VecDeque<PostOutcome>>,
    quick: Mutex<VecDeque<QuickOperation>>,
}

fn push_bounded<T>(log: &Mutex<VecDeque<T>>, item: T) {
    let mut log = lock(log);
    if log.len() >= LOG_LIMIT {
        log.pop_front();
    }
    log.push_back(item);
}

impl Entry {
    /// Whether this entry POSTs heartbeats (NapCat's never do).
    pub(crate) fn wants_heartbeats(&self) -> bool {
        self.cfg.heartbeat_interval.is_some()
    }

    /// POST `event` (fire and forget) if the entry is on; true if it was sent off.
    /// `process` is the running process, whose death aborts the request.
    pub(crate) fn post(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        event: &str,
        process: &CancellationToken,
    ) -> bool {
        if !*self.enabled.borrow() {
            return false;
        }
        self.status.send_modify(|s| s.posted += 1);
        let dropped = |why: &str| {
            self.record(PostOutcome {
                event: event.to_owned(),
                status: None,
                error: Some(why.to_owned()),
            });
            false
        };
        if let Some(queue) = &self.queue {
            return match queue.try_send((event.to_owned(), process.clone())) {
                Ok(()) => true,
                Err(_) => dropped("dropped: queue full"),
            };
        }
        let Ok(permit) = Arc::clone(&self.in_flight).try_acquire_owned() else {
            return dropped("dropped: too many requests in flight");
        };
        let (shared2, entry, event, process) = (
            Arc::clone(shared),
            Arc::clone(self),
            event.to_owned(),
            process.clone(),
        );
        shared.tracker.spawn(async move {
            entry.post_now(&shared2, event, &process).await;
            drop(permit);
        });
        true
    }

    /// Send one event and record how it went.
    async fn post_now(&self, shared: &Shared, event: String, process: &CancellationToken) {
        let result = tokio::select! {
            biased;
            _ = process.cancelled() => Err("process killed".to_owned()),
            result = send(shared, &self.cfg, &event, process) => result,
        };
        let outcome = match result {
            Err(error) => PostOutcome {
                event,
                status: None,
                error: Some(error),
            },
            Ok((status, body)) => {
                let error = if !(200..300).contains(&status) {
                    Some(format!("Unexpected status code: {status}"))
                } else if body.iter().all(u8::is_ascii_whitespace) {
                    // An empty body is `{}`: nothing to do.
                    None
                } else if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok() {
                    push_bounded(
                        &self.quick,
                        QuickOperation {
                            event: event.clone(),
                            status,
                            body: String::from_utf8_lossy(&body).into_owned(),
                        },
                    );
                    self.status.send_modify(|s| s.quick_operations += 1);
                    None
                } else {
                    Some("quick operation is not JSON".to_owned())
                };
                PostOutcome {
                    event,
                    status: Some(status),
                    error,
                }
            }
        };
        self.record(outcome);
    }

    fn record(&self, outcome: PostOutcome) {
        push_bounded(&self.outcomes, outcome);
        self.status.send_modify(|s| s.finished += 1);
    }
}

/// Control and observation of one POST entry. Cheap to clone.
#[derive(Clone)]
pub struct PostHandle {
    entry: Arc<Entry>,
}

impl std::fmt::Debug for PostHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostHandle")
            .field("url", &self.entry.cfg.url)
            .field("status", &self.status())
            .finish()
    }
}

impl PostHandle {
    /// The entry's configuration as added.
    pub fn config(&self) -> &PostConfig {
        &self.entry.cfg
    }

    /// Hot reload switched the entry off: later events are not posted (requests in flight
    /// finish).
    pub fn disable(&self) {
        self.entry.enabled.send_replace(false);
    }

    /// Switched on again.
    pub fn enable(&self) {
        self.entry.enabled.send_replace(true);
    }

    /// Counters now.
    pub fn status(&self) -> PostStatus {
        self.entry.status.borrow().clone()
    }

    /// How each finished POST ended, in the order they finished (the last few thousand).
    pub fn outcomes(&self) -> Vec<PostOutcome> {
        lock(&self.entry.outcomes).iter().cloned().collect()
    }

    /// Quick operations received, in the order they came back (the last few thousand).
    pub fn quick_operations(&self) -> Vec<QuickOperation> {
        lock(&self.entry.quick).iter().cloned().collect()
    }

    /// Resolves once `pred` holds for the counters (at once if it already does). Wrap it
    /// in a timeout: it waits forever for something that never happens.
    pub async fn wait_status(&self, mut pred: impl FnMut(&PostStatus) -> bool) -> PostStatus {
        let mut rx = self.entry.status.subscribe();
        let seen = match rx.wait_for(|s| pred(s)).await {
            Ok(s) => Some(s.clone()),
            Err(_) => None,
        };
        seen.unwrap_or_else(|| self.status())
    }

    /// Resolves once at least `n` posts have finished.
    pub async fn wait_finished(&self, n: u64) {
        self.wait_status(|s| s.finished >= n).await;
    }
}

/// Create an entry for `cfg` and spawn its worker (serial) and heartbeat timer (if any).
pub(crate) fn add(shared: &Arc<Shared>, cfg: PostConfig) -> (Arc<Entry>, PostHandle) {
    let (queue, rx) = if cfg.serial {
        let (tx, rx) = mpsc::channel(QUEUE_LIMIT);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let entry = Arc::new(Entry {
        enabled: watch::Sender::new(cfg.enabled),
        queue,
        in_flight: Arc::new(Semaphore::new(IN_FLIGHT_LIMIT)),
        status: watch::Sender::new(PostStatus::default()),
        outcomes: Mutex::new(VecDeque::new()),
        quick: Mutex::new(VecDeque::new()),
        cfg,
    });
    if let Some(rx) = rx {
        shared
            .tracker
            .spawn(serial_worker(Arc::clone(shared), Arc::clone(&entry), rx));
    }
    if entry.cfg.heartbeat_interval.is_some() {
        shared
            .tracker
            .spawn(heartbeat_loop(Arc::clone(shared), Arc::clone(&entry)));
    }
    let handle = PostHandle {
        entry: Arc::clone(&entry),
    };
    (entry, handle)
}

/// A serial entry's worker: one request at a time, in order.
async fn serial_worker(
    shared: Arc<Shared>,
    entry: Arc<Entry>,
    mut rx: mpsc::Receiver<(String, CancellationToken)>,
) {
    loop {
        let next = tokio::select! {
            _ = shared.shut_down() => return,
            next = rx.recv() => next,
        };
        let Some((event, process)) = next else { return };
        entry.post_now(&shared, event, &process).await;
    }
}

/// go-cqhttp-style heartbeats over POST, one timer per entry.
async fn heartbeat_loop(shared: Arc<Shared>, entry: Arc<Entry>) {
    let Some(period) = entry.cfg.heartbeat_interval.filter(|d| !d.is_zero()) else {
        return;
    };
    let mut enabled = entry.enabled.subscribe();
    loop {
        let Some(process) = process::wait_running(&shared, &mut enabled).await else {
            return;
        };
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shared.shut_down() => return,
                _ = process.cancelled() => break,
                _ = enabled.changed() => break,
                _ = ticker.tick() => {
                    if !shared.is_hung() {
                        entry.post(&shared, &shared.heartbeat_frame(period), &process);
                    }
                }
            }
        }
    }
}

/// POST `event` to `cfg.url`, following redirects; the final status and body.
async fn send(
    shared: &Shared,
    cfg: &PostConfig,
    event: &str,
    process: &CancellationToken,
) -> Result<(u16, Bytes), String> {
    let mut uri: Uri = cfg.url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let body = Bytes::from(event.to_owned());
    let signature = cfg
        .token
        .as_deref()
        .filter(|t| !t.is_empty())
        .map(|token| signature(token, &body));
    for _ in 0..=MAX_REDIRECTS {
        let (status, location, response) =
            request_once(shared, cfg, &uri, &body, signature.as_deref(), process).await?;
        let redirect = matches!(status, 301 | 302 | 307 | 308);
        match location {
            Some(location) if redirect => uri = resolve(&uri, &location)?,
            _ => return Ok((status, response)),
        }
    }
    Err("Too many redirects".to_owned())
}

/// `sha1=<lowercase hex HMAC-SHA1(token, body)>`.
pub(crate) fn signature(token: &str, body: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("sha1=");
    // HMAC takes keys of any length.
    if let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(token.as_bytes()) {
        mac.update(body);
        for byte in mac.finalize().into_bytes() {
            let _ = write!(out, "{byte:02x}");
        }
    }
    out
}

/// A redirect target: absolute, or an absolute path on the same origin.
fn resolve(base: &Uri, location: &str) -> Result<Uri, String> {
    let target: Uri = location
        .parse()
        .map_err(|e| format!("bad redirect {location:?}: {e}"))?;
    if target.scheme().is_some() {
        return Ok(target);
    }
    let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
    if location.starts_with('/') {
        return format!("http://{authority}{location}")
            .parse()
            .map_err(|e| format!("bad redirect {location:?}: {e}"));
    }
    Err(format!("unsupported relative redirect {location:?}"))
}

/// One request on a fresh connection: status, `Location`, body.
async fn request_once(
    shared: &Shared,
    cfg: &PostConfig,
    uri: &Uri,
    body: &Bytes,
    signature: Option<&str>,
    process: &CancellationToken,
) -> Result<(u16, Option<String>, Bytes), String> {
    if uri.scheme_str() != Some("http") {
        return Err(format!("unsupported URL (http:// only): {uri}"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("no host in {uri}"))?
        .clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    // The connection ends when the sender is dropped after the response, or with the
    // process.
    let conn_process = process.clone();
    shared.tracker.spawn(async move {
        tokio::select! {
            biased;
            _ = conn_process.cancelled() => {}
            _ = conn => {}
        }
    });
    let payload: BoxBody<Bytes, Infallible> = if cfg.chunked {
        let chunk = body.clone();
        StreamBody::new(futures_util::stream::once(async move {
            Ok::<_, Infallible>(Frame::data(chunk))
        }))
        .boxed()
    } else {
        Full::new(body.clone()).boxed()
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::HOST, authority.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-self-id", HeaderValue::from(shared.self_id));
    if let Some(signature) = signature {
        request = request.header("x-signature", signature);
    }
    let request = request.body(payload).map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let location = response
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = Limited::new(response.into_body(), RESPONSE_LIMIT)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((StatusCode::as_u16(&status), location, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_rfc_2202_hmac_sha1() {
        // RFC 2202 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha1=effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
    }

    #[test]
    fn redirects_resolve() {
        let base: Uri = "http://127.0.0.1:9/a?b".parse().unwrap();
        assert_eq!(
            resolve(&base, "/x?y").unwrap().to_string(),
            "http://127.0.0.1:9/x?y"
        );
        assert_eq!(
            resolve(&base, "http://h:1/z").unwrap().to_string(),
            "http://h:1/z"
        );
        assert!(resolve(&base, "rel").is_err());
    }
}
