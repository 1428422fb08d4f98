//! The bots' side of the reverse relay: dialling a bot the way the backend would have
//! (its `X-Self-ID`, `X-Client-Role` and `User-Agent`, lifeguard's own token), the redial
//! backoff, and the echo routing that lets several bots share one backend connection.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use crate::config::{ReverseUrl, Secret};
use crate::proto::dial::{self, ConnectError, Dial};

/// A bot connection: lifeguard is the WebSocket client.
pub type BotWs = WebSocketStream<TcpStream>;

/// What the backend said about itself when it dialled, replayed to every bot it reaches.
#[derive(Debug, Clone, Default)]
pub struct Hello {
    pub self_id: Option<String>,
    pub role_header: Option<String>,
    pub user_agent: Option<String>,
    /// The path (and query, less any `access_token`) the backend dialled.
    pub path_and_query: String,
}

impl Hello {
    /// The request target for `url`: its own path, or else the backend's.
    pub fn target(&self, url: &ReverseUrl) -> String {
        if url.path.is_empty() {
            if self.path_and_query.is_empty() {
                "/".to_string()
            } else {
                self.path_and_query.clone()
            }
        } else {
            url.path.clone()
        }
    }

    /// The request target without a query (what logs show).
    pub fn path_of(&self, url: &ReverseUrl) -> String {
        let t = self.target(url);
        t.split('?').next().unwrap_or("/").to_string()
    }
}

/// The WebSocket settings of a bot connection: a bot's messages (API calls) are bounded
/// like a forward client's.
pub fn bot_config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
        .max_write_buffer_size(16 * 1024 * 1024)
}

/// Dial one bot as the backend would have, within `timeout`.
pub async fn dial(
    url: &ReverseUrl,
    hello: &Hello,
    token: Option<&Secret>,
    timeout: Duration,
    max_message: usize,
) -> Result<BotWs, ConnectError> {
    let mut headers: Vec<(&str, &str)> = Vec::with_capacity(3);
    if let Some(v) = &hello.self_id {
        headers.push(("X-Self-ID", v));
    }
    if let Some(v) = &hello.role_header {
        headers.push(("X-Client-Role", v));
    }
    if let Some(v) = &hello.user_agent {
        headers.push(("User-Agent", v));
    }
    let d = Dial {
        host: &url.host,
        port: url.port,
        authority: url.authority(),
        target: hello.target(url),
        bearer: token,
        headers: &headers,
    };
    let c = dial::open(&d, timeout).await?;
    Ok(WebSocketStream::from_partially_read(
        c.stream,
        c.leftover,
        WsRole::Client,
        Some(bot_config(max_message)),
    )
    .await)
}

/// The wait before redial `attempt` (0-based) of a bot that is missing: doubling from
/// 250 ms to 10 s, each with ±25 % jitter so that bots behind one restart do not come
/// back in lockstep.
pub fn backoff(attempt: u32) -> Duration {
    let base = 250u64.saturating_mul(1 << attempt.min(6)).min(10_000);
    let jitter = fastrand::u64(0..=base / 2);
    Duration::from_millis(base - base / 4 + jitter)
}

// ---------------------------------------------------------------------------------------
// Echo routing (several bots on one backend connection).

/// Prefix of the echo lifeguard puts in a bot's request; the rest is a number.
const ECHO_PREFIX: &str = "lifeguard:";
/// Requests awaiting a reply, at most; the oldest are forgotten first (their replies, if
/// they ever come, are dropped).
const ROUTES_MAX: usize = 65_536;

/// Requests in flight: lifeguard's echo → (the bot connection that asked, its own echo as
/// raw JSON text, or `None` when it sent none).
#[derive(Default)]
pub struct EchoRoutes {
    next: u64,
    routes: HashMap<u64, (u64, Option<Box<str>>)>,
    order: VecDeque<u64>,
}

#[derive(Deserialize)]
struct EchoOnly<'a> {
    /// Present (`null` included) or absent: `Option<&RawValue>` alone would read a `null`
    /// echo as absent.
    #[serde(borrow, default, deserialize_with = "present")]
    echo: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Where the top-level `echo` value of a JSON object text is: its byte range, if present.
/// `None` when the text is not a JSON object.
fn echo_span(text: &str) -> Option<Option<std::ops::Range<usize>>> {
    let parsed: EchoOnly<'_> = serde_json::from_str(text).ok()?;
    Some(parsed.echo.map(|raw| {
        let start = raw.get().as_ptr() as usize - text.as_ptr() as usize;
        start..start + raw.get().len()
    }))
}

impl EchoRoutes {
    /// Rewrite a bot's request so that its reply can be routed back to `leg`: its echo is
    /// replaced by lifeguard's own (added when it had none). `None`: not a JSON object, to
    /// be forwarded as it is.
    pub fn outbound(&mut self, leg: u64, text: &str) -> Option<String> {
        let span = echo_span(text)?;
        self.next += 1;
        let id = self.next;
        let ours = format!("\"{ECHO_PREFIX}{id}\"");
        let (rewritten, original) = match span {
            Some(r) => {
                let original: Box<str> = text[r.clone()].into();
                let mut out = String::with_capacity(text.len() + ours.len());
                out.push_str(&text[..r.start]);
                out.push_str(&ours);
                out.push_str(&text[r.end..]);
                (out, Some(original))
            }
            None => {
                // A JSON object: insert the key right after its opening brace.
                let open = text.find('{')?;
                let body_empty = text[open + 1..].trim_start().starts_with('}');
                let mut out = String::with_capacity(text.len() + ours.len() + 8);
                out.push_str(&text[..=open]);
                out.push_str("\"echo\":");
                out.push_str(&ours);
                if !body_empty {
                    out.push(',');
                }
                out.push_str(&text[open + 1..]);
                (out, None)
            }
        };
        if self.order.len() >= ROUTES_MAX {
            if let Some(old) = self.order.pop_front() {
                self.routes.remove(&old);
            }
        }
        self.routes.insert(id, (leg, original));
        self.order.push_back(id);
        Some(rewritten)
    }

    /// A reply from the backend: the bot connection that asked and the reply with its own
    /// echo restored exactly (removed when it sent none). `None`: not a reply to a routed
    /// request.
    pub fn inbound(&mut self, text: &str) -> Option<(u64, String)> {
        let span = echo_span(text)??;
        let value = &text[span.clone()];
        let id: u64 = value
            .strip_prefix('"')?
            .strip_suffix('"')?
            .strip_prefix(ECHO_PREFIX)?
            .parse()
            .ok()?;
        let (leg, original) = self.routes.remove(&id)?;
        if let Some(pos) = self.order.iter().position(|x| *x == id) {
            self.order.remove(pos);
        }
        let restored = match original {
            Some(orig) => {
                let mut out = String::with_capacity(text.len() + orig.len());
                out.push_str(&text[..span.start]);
                out.push_str(&orig);
                out.push_str(&text[span.end..]);
                out
            }
            None => remove_member(text, span)?,
        };
        Some((leg, restored))
    }

    /// Forget the requests of a bot connection that is gone.
    pub fn forget(&mut self, leg: u64) {
        self.routes.retain(|_, (l, _)| *l != leg);
        let routes = &self.routes;
        self.order.retain(|id| routes.contains_key(id));
    }

    pub fn in_flight(&self) -> usize {
        self.routes.len()
    }
}

/// Remove the object member whose value occupies `value` (its key, colon and one comma).
fn remove_member(text: &str, value: std::ops::Range<usize>) -> Option<String> {
    let b = text.as_bytes();
    // Back from the value: whitespace, ':', whitespace, the key string.
    let mut i = value.start;
    while i > 0 && b[i - 1].is_ascii_whitespace() {
        i -= 1;
    }
    if i == 0 || b[i - 1] != b':' {
        return None;
    }
    i -= 1;
    while i > 0 && b[i - 1].is_ascii_whitespace() {
        i -= 1;
    }
    if i == 0 || b[i - 1] != b'"' {
        return None;
    }
    // The key's opening quote (the key is "echo", possibly escaped: find the quote that
    // is not preceded by a backslash).
    let mut k = i - 1;
    loop {
        if k == 0 {
            return None;
        }
        k -= 1;
        if b[k] == b'"' && (k == 0 || b[k - 1] != b'\\') {
            break;
        }
    }
    let (mut start, mut end) = (k, value.end);
    let mut j = end;
    while j < b.len() && b[j].is_ascii_whitespace() {
        j += 1;
    }
    if j < b.len() && b[j] == b',' {
        end = j + 1;
    } else {
        // The last member: take the comma before it instead.
        let mut p = start;
        while p > 0 && b[p - 1].is_ascii_whitespace() {
            p -= 1;
        }
        if p > 0 && b[p - 1] == b',' {
            start = p - 1;
        }
    }
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..start]);
    out.push_str(&text[end..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_to(request: &str) -> String {
        // What NapCat does: the echo value comes back as sent.
        let v: serde_json::Value = serde_json::from_str(request).unwrap();
        format!(
            r#"{{"status":"ok","retcode":0,"data":null,"message":"","wording":"","echo":{},"stream":"normal-action"}}"#,
            v["echo"]
        )
    }

    #[test]
    fn echoes_come_back_exactly_to_the_bot_that_asked() {
        let mut r = EchoRoutes::default();
        let cases = [
            (
                1,
                r#"{"action":"get_status","params":{},"echo":"1"}"#,
                r#""1""#,
            ),
            (2, r#"{"action":"get_status","params":{},"echo":1}"#, "1"),
            (
                3,
                r#"{"action":"x","echo":{"seq":7, "k":[1,"晴"]},"params":{"echo":"inner"}}"#,
                r#"{"seq":7, "k":[1,"晴"]}"#,
            ),
            (4, r#"{"action":"x","echo":1.50e3}"#, "1.50e3"),
            (5, r#"{"action":"x","echo":null}"#, "null"),
        ];
        let mut sent = Vec::new();
        for (leg, req, _) in cases {
            let out = r.outbound(leg, req).unwrap();
            assert!(out.contains("\"echo\":\"lifeguard:"), "{out}");
            if leg == 3 {
                assert!(
                    out.contains(r#""params":{"echo":"inner"}"#),
                    "nested echo untouched: {out}"
                );
            }
            sent.push(out);
        }
        for (i, (leg, _, echo)) in cases.iter().enumerate().rev() {
            let reply = reply_to(&sent[i]);
            let (to, reply) = r
                .inbound(&reply)
                .unwrap_or_else(|| panic!("not routed: {reply} (sent {})", sent[i]));
            assert_eq!(to, *leg);
            assert!(
                reply.contains(&format!(r#""echo":{echo},"stream""#)),
                "{reply}"
            );
        }
        assert_eq!(r.in_flight(), 0);
        assert!(r.inbound(&reply_to(&sent[0])).is_none(), "routed once");
    }

    #[test]
    fn a_request_without_echo_gets_a_reply_without_one() {
        let mut r = EchoRoutes::default();
        for req in [r#"{"action":"send_msg","params":{"a":1}}"#, r#"{ }"#] {
            let out = r.outbound(9, req).unwrap();
            let _: serde_json::Value = serde_json::from_str(&out).unwrap();
            for reply_shape in [
                r#"{"status":"ok","echo":ECHO,"stream":"x"}"#,
                r#"{"status":"ok","stream":"x", "echo" : ECHO }"#,
                r#"{"echo":ECHO}"#,
            ] {
                let mut r2 = EchoRoutes::default();
                let out2 = r2.outbound(9, req).unwrap();
                let echo =
                    serde_json::from_str::<serde_json::Value>(&out2).unwrap()["echo"].to_string();
                let reply = reply_shape.replace("ECHO", &echo);
                let (leg, restored) = r2.inbound(&reply).unwrap();
                assert_eq!(leg, 9);
                let v: serde_json::Value =
                    serde_json::from_str(&restored).unwrap_or_else(|e| panic!("{restored}: {e}"));
                assert!(v.get("echo").is_none(), "{restored}");
            }
            assert!(out.starts_with("{\"echo\":\"lifeguard:"), "{out}");
        }
        assert!(r.outbound(1, "not json").is_none());
        assert!(r.outbound(1, "[1,2]").is_none());
        assert!(r.inbound(r#"{"status":"failed","echo":null}"#).is_none());
    }

    #[test]
    fn routes_are_bounded_and_forgotten_with_their_bot() {
        let mut r = EchoRoutes::default();
        for _ in 0..ROUTES_MAX + 10 {
            r.outbound(1, r#"{"echo":1}"#).unwrap();
        }
        assert_eq!(r.in_flight(), ROUTES_MAX);
        r.outbound(2, r#"{"echo":1}"#).unwrap();
        r.forget(1);
        assert_eq!(r.in_flight(), 1);
    }

    #[test]
    fn backoff_grows_with_jitter_and_a_ceiling() {
        for attempt in 0..20 {
            let d = backoff(attempt).as_millis() as u64;
            let base = (250u64 << attempt.min(6)).min(10_000);
            assert!(d >= base * 3 / 4 && d <= base * 5 / 4, "{attempt}: {d}");
        }
    }
}
