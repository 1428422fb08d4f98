//! Webhooks (`--notify-url`, repeatable): every transition of a configured lane is POSTed
//! as JSON to each URL.
//!
//! The state machine never waits for a receiver: it only appends to its history ring (under
//! its lock, as it publishes). A follower reads the ring by sequence number whenever a
//! snapshot is published and hands each record to one bounded queue per URL without
//! waiting (a full queue drops the record, counted and logged); each URL has its own
//! delivery task, so a slow or dead receiver delays only itself. A post that fails (no
//! connection, a timeout, a non-2xx answer) is retried [`ATTEMPTS`] times in all with a
//! growing backoff, then dropped: counted in `lifeguard_notify_dropped_total{reason}` and
//! logged with the URL's host (its path and query, which often hold a chat webhook's key,
//! are never shown).
//!
//! Plain `http://` only: lifeguard has no TLS client. An https chat webhook is reached
//! through a relay on the same host or network, or through Alertmanager (README).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::config::NotifyUrl;
use crate::state::history::Record;
use crate::state::State;

/// Records waiting per URL; beyond this a slow receiver loses the newest ones.
pub const QUEUE: usize = 64;
/// Posts per record before it is dropped (the first and the retries).
pub const ATTEMPTS: u32 = 4;
/// The first retry's wait; each next one doubles (250 ms, 500 ms, 1 s), with jitter.
const BACKOFF: Duration = Duration::from_millis(250);
/// One post, connection included.
const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// At shutdown, how long what is still queued may take.
const SHUTDOWN_FLUSH: Duration = Duration::from_millis(800);

/// Start following the history for every `--notify-url`; nothing when there is none.
pub fn start(state: &Arc<State>) {
    let urls = state.settings().notify_url.clone();
    if urls.is_empty() {
        return;
    }
    let mut queues = Vec::new();
    for url in urls {
        let (tx, rx) = mpsc::channel(QUEUE);
        tracing::info!(url = %url, "webhook: posting every transition");
        queues.push((url.to_string(), tx));
        state
            .drain
            .spawn_background(deliver(state.clone(), url, rx));
    }
    state.drain.spawn_background(follow(state.clone(), queues));
}

/// Hand every new record to every URL's queue, never waiting.
async fn follow(state: Arc<State>, queues: Vec<(String, mpsc::Sender<Arc<Record>>)>) {
    let mut rx = state.subscribe();
    let mut seen = 0;
    loop {
        let (records, missed) = state.history.since(seen);
        if missed > 0 {
            for (url, _) in &queues {
                state.metrics.notify_dropped("missed", missed);
                tracing::warn!(url = %url, missed, "webhook: transitions were forgotten before they could be queued");
            }
        }
        for record in records {
            seen = record.seq;
            for (url, tx) in &queues {
                if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(record.clone()) {
                    state.metrics.notify_dropped("queue_full", 1);
                    tracing::warn!(
                        url = %url,
                        seq = record.seq,
                        queued = QUEUE,
                        "webhook dropped: the receiver is too slow (queue full)"
                    );
                }
            }
        }
        tokio::select! {
            _ = state.drain.hard_stopped() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// Post each queued record to `url`, with bounded retries.
async fn deliver(state: Arc<State>, url: NotifyUrl, mut rx: mpsc::Receiver<Arc<Record>>) {
    loop {
        let record = tokio::select! {
            r = rx.recv() => match r {
                Some(r) => r,
                None => return,
            },
            _ = state.drain.hard_stopped() => break,
        };
        let body = Bytes::from(payload(&record).to_string());
        let mut attempt = 1;
        loop {
            let result = tokio::select! {
                r = post(&url, body.clone()) => r,
                _ = state.drain.hard_stopped() => {
                    // Shutting down: one last try below, with the rest of the queue.
                    let _ = tokio::time::timeout(SHUTDOWN_FLUSH, post(&url, body.clone())).await;
                    break;
                }
            };
            match result {
                Ok(()) => {
                    state.metrics.notify_delivered();
                    break;
                }
                Err(e) if attempt >= ATTEMPTS => {
                    state.metrics.notify_dropped("failed", 1);
                    tracing::warn!(
                        url = %url,
                        seq = record.seq,
                        attempts = attempt,
                        error = %e,
                        "webhook dropped: every attempt failed"
                    );
                    break;
                }
                Err(e) => {
                    tracing::debug!(url = %url, seq = record.seq, attempt, error = %e, "webhook failed; retrying");
                    let wait = BACKOFF * 2u32.pow(attempt - 1);
                    let wait = wait + wait.mul_f64(fastrand::f64() * 0.2);
                    attempt += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = state.drain.hard_stopped() => {}
                    }
                }
            }
        }
        if state.drain.hard_stop_token().is_cancelled() {
            break;
        }
    }
    // Shutting down: what is queued (the `shutdown` transition, typically) gets one quick
    // try each, within a small budget.
    let _ = tokio::time::timeout(SHUTDOWN_FLUSH, async {
        while let Ok(record) = rx.try_recv() {
            let body = Bytes::from(payload(&record).to_string());
            if post(&url, body).await.is_ok() {
                state.metrics.notify_delivered();
            }
        }
    })
    .await;
}

/// What a receiver gets: the transition as `/transitions` shows it, plus `text`, one line
/// for chat webhooks (Slack-compatible ones, Mattermost and Rocket.Chat show it as is).
pub fn payload(record: &Record) -> serde_json::Value {
    let mut v = record.to_json();
    let who = record
        .self_id
        .map(|id| format!(" (QQ {id})"))
        .unwrap_or_default();
    v["text"] = serde_json::json!(format!("lifeguard{who}: {}", record.summary()));
    v["source"] = serde_json::json!("lifeguard");
    v
}

/// One POST; Ok on a 2xx answer.
async fn post(url: &NotifyUrl, body: Bytes) -> Result<(), String> {
    let attempt = async {
        let stream = TcpStream::connect(url.authority())
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        let req = Request::post(url.target.as_str())
            .header(header::HOST, url.authority())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("lifeguard/", env!("CARGO_PKG_VERSION")),
            )
            .header(header::CONNECTION, "close")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        // The connection is driven beside the request; with `Connection: close` it ends
        // right after the answer.
        let (response, _) = tokio::join!(sender.send_request(req), conn);
        let response = response.map_err(|e| e.to_string())?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered {status}"))
        }
    };
    tokio::time::timeout(POST_TIMEOUT, attempt)
        .await
        .map_err(|_| format!("no answer within {} s", POST_TIMEOUT.as_secs()))?
}
