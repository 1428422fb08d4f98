//! OneBot v11 shapes: the events lifeguard injects, and a cheap classifier for the frames
//! it relays (so the hot path never parses JSON unless a frame is a meta event).

use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use memchr::memmem::Finder;
use serde::Deserialize;

/// Which forward-WebSocket role a path has (NapCat's routing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `/api`: API calls only; no connect event, no events, no heartbeats.
    Api,
    /// `/event`: events (NapCat also answers API calls there).
    Event,
    /// `/` and any other path: events and API.
    Universal,
}

impl Role {
    /// Route a request path (query already stripped); a trailing slash is allowed.
    pub fn of_path(path: &str) -> Role {
        let p = path.trim_end_matches('/');
        match p {
            "/api" => Role::Api,
            "/event" => Role::Event,
            _ => Role::Universal,
        }
    }

    /// Whether the backend sends events (and so the connect event) on this role.
    pub fn gets_events(self) -> bool {
        self != Role::Api
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Event => "event",
            Role::Universal => "universal",
        }
    }
}

/// What a small text frame from the backend is.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// A reply to an API call (it carries the caller's echo).
    Reply,
    /// Any event that is not a meta event.
    Event,
    /// `lifecycle` (connect, enable, disable).
    Lifecycle {
        self_id: Option<u64>,
        sub_type: String,
    },
    /// `heartbeat`: interval in ms, and the QQ login state when present.
    Heartbeat {
        self_id: Option<u64>,
        interval_ms: Option<u64>,
        online: Option<bool>,
        /// The raw `status` object, reused for keepalive heartbeats to clients.
        status: Option<String>,
    },
    /// The QQ account was kicked offline, said at once (the heartbeat may take its whole
    /// interval): NapCat's `bot_offline` notice, or Lagrange's `notify`/`bot_offline`.
    BotOffline {
        self_id: Option<u64>,
        /// Who kicked it, in the backend's words (bounded, see [`NOTICE_TEXT_MAX`]).
        tag: String,
        message: String,
    },
}

static META: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"meta_event\""));
/// The end of a `bot_offline` string value (an escaped quote inside a message's text has a
/// backslash before it, so message texts do not match).
static BOT_OFFLINE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"bot_offline\""));

/// Longest `tag` / `message` of a `bot_offline` notice kept (they go into logs, `/state`
/// and Close reasons).
pub const NOTICE_TEXT_MAX: usize = 200;

/// First keys of API replies (NapCat: `status`; others order fields differently).
const REPLY_KEYS: [&[u8]; 6] = [
    b"status", b"retcode", b"data", b"echo", b"message", b"wording",
];

/// Whether a backend text frame (or its first bytes) is an API reply: its first key.
pub fn is_reply(payload: &[u8]) -> bool {
    first_key(payload).is_some_and(|key| REPLY_KEYS.contains(&key))
}

/// NapCat's message and user events begin `{"self_id":N,"user_id":`; no meta event has a
/// `user_id`. The hot path (group messages) is decided by this prefix alone.
#[inline]
fn napcat_user_event(p: &[u8]) -> bool {
    let Some(rest) = p.strip_prefix(b"{\"self_id\":") else {
        return false;
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    digits > 0 && rest[digits..].starts_with(b",\"user_id\":")
}

/// Meta events name themselves early (NapCat: third key; go-cqhttp: sorted keys); a
/// message event is never searched past this many bytes.
const META_WINDOW: usize = 256;

/// Classify a backend text frame: a look at its first key and one bounded substring
/// search; JSON is parsed only for meta events (a heartbeat every few seconds).
#[inline]
pub fn classify(payload: &[u8]) -> Kind {
    if napcat_user_event(payload) {
        return Kind::Event;
    }
    classify_slow(payload)
}

/// Everything but NapCat's user events: out of line, so the hot check stays small.
#[cold]
#[inline(never)]
fn classify_slow(payload: &[u8]) -> Kind {
    if is_reply(payload) {
        return Kind::Reply;
    }
    let window = &payload[..payload.len().min(META_WINDOW)];
    if META.find(window).is_none() {
        if BOT_OFFLINE.find(window).is_some() {
            return bot_offline(payload).unwrap_or(Kind::Event);
        }
        return Kind::Event;
    }
    #[derive(Deserialize)]
    struct Meta<'a> {
        self_id: Option<u64>,
        meta_event_type: Option<&'a str>,
        sub_type: Option<&'a str>,
        interval: Option<u64>,
        status: Option<&'a serde_json::value::RawValue>,
    }
    #[derive(Deserialize)]
    struct Status {
        online: Option<bool>,
    }
    let Ok(m) = serde_json::from_slice::<Meta<'_>>(payload) else {
        return Kind::Event;
    };
    match m.meta_event_type {
        Some("lifecycle") => Kind::Lifecycle {
            self_id: m.self_id,
            sub_type: m.sub_type.unwrap_or_default().to_string(),
        },
        Some("heartbeat") => Kind::Heartbeat {
            self_id: m.self_id,
            interval_ms: m.interval,
            online: m
                .status
                .and_then(|s| serde_json::from_str::<Status>(s.get()).ok())
                .and_then(|s| s.online),
            status: m.status.map(|s| s.get().to_string()),
        },
        _ => Kind::Event,
    }
}

/// A notice that names `bot_offline` early: parsed (rare), and a kick only when it is one.
#[cold]
fn bot_offline(payload: &[u8]) -> Option<Kind> {
    use serde_json::Value;
    let v: Value = serde_json::from_slice(payload).ok()?;
    let field = |k: &str| v.get(k).and_then(Value::as_str);
    if field("post_type") != Some("notice") {
        return None;
    }
    let napcat = field("notice_type") == Some("bot_offline");
    let lagrange =
        field("notice_type") == Some("notify") && field("sub_type") == Some("bot_offline");
    if !(napcat || lagrange) {
        return None;
    }
    let text = |k: &str| {
        let s = match v.get(k) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        bounded(s, NOTICE_TEXT_MAX)
    };
    Some(Kind::BotOffline {
        self_id: v.get("self_id").and_then(Value::as_u64),
        tag: text("tag"),
        message: text("message"),
    })
}

/// `s` cut to at most `max` bytes on a character boundary, with an ellipsis when cut.
pub fn bounded(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// The first object key of a JSON text, without allocating (None if not an object).
fn first_key(p: &[u8]) -> Option<&[u8]> {
    let mut i = 0;
    while i < p.len() && p[i].is_ascii_whitespace() {
        i += 1;
    }
    if p.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    while i < p.len() && p[i].is_ascii_whitespace() {
        i += 1;
    }
    if p.get(i) != Some(&b'"') {
        return None;
    }
    let start = i + 1;
    let end = start + memchr::memchr(b'"', p.get(start..)?)?;
    Some(&p[start..end])
}

/// Seconds since the epoch, as OneBot's `time`.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The lifecycle `disable` event, in NapCat's field order.
pub fn disable_event(self_id: u64) -> String {
    format!(
        "{{\"time\":{},\"self_id\":{},\"post_type\":\"meta_event\",\"meta_event_type\":\"lifecycle\",\"sub_type\":\"disable\"}}",
        now_secs(),
        self_id
    )
}

/// A heartbeat meta event (client keepalive), built from the backend's last known status.
pub fn heartbeat_event(self_id: u64, status: &str, interval_ms: u64) -> String {
    format!(
        "{{\"time\":{},\"self_id\":{},\"post_type\":\"meta_event\",\"meta_event_type\":\"heartbeat\",\"status\":{},\"interval\":{}}}",
        now_secs(),
        self_id,
        status,
        interval_ms
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(Role::of_path("/api"), Role::Api);
        assert_eq!(Role::of_path("/api/"), Role::Api);
        assert_eq!(Role::of_path("/event"), Role::Event);
        assert_eq!(Role::of_path("/"), Role::Universal);
        assert_eq!(Role::of_path("/onebot/v11/ws"), Role::Universal);
        assert_eq!(Role::of_path("/apix"), Role::Universal);
    }

    #[test]
    fn classifies_sample_frames() {
        let connect = br#"{"time":1764180000,"self_id":3889001234,"post_type":"meta_event","meta_event_type":"lifecycle","sub_type":"connect"}"#;
        assert_eq!(
            classify(connect),
            Kind::Lifecycle {
                self_id: Some(3889001234),
                sub_type: "connect".into()
            }
        );
        let hb = br#"{"time":1764180030,"self_id":3889001234,"post_type":"meta_event","meta_event_type":"heartbeat","status":{"online":false,"good":true},"interval":30000}"#;
        assert_eq!(
            classify(hb),
            Kind::Heartbeat {
                self_id: Some(3889001234),
                interval_ms: Some(30000),
                online: Some(false),
                status: Some(r#"{"online":false,"good":true}"#.into()),
            }
        );
        let reply = br#"{"status":"ok","retcode":0,"data":null,"message":"","wording":"","echo":"1","stream":"normal-action"}"#;
        assert_eq!(classify(reply), Kind::Reply);
        let gocq_reply = br#"{"data":null,"echo":"1","retcode":0,"status":"ok"}"#;
        assert_eq!(classify(gocq_reply), Kind::Reply);
        let msg = r#"{"self_id":1,"user_id":2,"time":3,"raw_message":"meta_event","post_type":"message"}"#;
        assert_eq!(classify(msg.as_bytes()), Kind::Event);
        assert!(napcat_user_event(msg.as_bytes()));
        // Other backends' field orders still go through the search.
        let gocq_hb = br#"{"interval":5000,"meta_event_type":"heartbeat","post_type":"meta_event","self_id":1,"status":{"online":true},"time":3}"#;
        assert!(matches!(
            classify(gocq_hb),
            Kind::Heartbeat {
                interval_ms: Some(5000),
                online: Some(true),
                ..
            }
        ));
        for line in include_str!("../sim/samples.jsonl")
            .lines()
            .filter(|l| l.contains("\"post_type\":\"message\""))
        {
            assert!(napcat_user_event(line.as_bytes()), "{line}");
        }
        assert_eq!(classify(b"not json"), Kind::Event);
    }

    #[test]
    fn bot_offline_notices_are_kicks() {
        // NapCat's field order (OB11BaseNoticeEvent, then BotOfflineEvent's fields).
        let napcat = r#"{"time":1764180040,"self_id":3889001234,"post_type":"notice","notice_type":"bot_offline","user_id":3889001234,"tag":"被顶下线","message":"你的帐号在另一台设备上登录"}"#;
        assert_eq!(
            classify(napcat.as_bytes()),
            Kind::BotOffline {
                self_id: Some(3889001234),
                tag: "被顶下线".into(),
                message: "你的帐号在另一台设备上登录".into(),
            }
        );
        let lagrange = r#"{"time":1,"self_id":2,"post_type":"notice","notice_type":"notify","sub_type":"bot_offline","tag":"t","message":"m"}"#;
        assert!(matches!(
            classify(lagrange.as_bytes()),
            Kind::BotOffline { .. }
        ));
        // Not kicks: a message quoting the words, an escaped quote, another notice type.
        let quoted = r#"{"time":1,"self_id":2,"post_type":"message","raw_message":"bot_offline","user_id":3}"#;
        assert_eq!(classify(quoted.as_bytes()), Kind::Event);
        let escaped = r#"{"time":1,"post_type":"message","raw_message":"\"bot_offline\""}"#;
        assert_eq!(classify(escaped.as_bytes()), Kind::Event);
        let other = r#"{"time":1,"self_id":2,"post_type":"notice","notice_type":"bot_offline_x"}"#;
        assert_eq!(classify(other.as_bytes()), Kind::Event);
        // Long texts are bounded.
        let long = format!(
            r#"{{"time":1,"self_id":2,"post_type":"notice","notice_type":"bot_offline","tag":"t","message":"{}"}}"#,
            "é".repeat(500)
        );
        let Kind::BotOffline { message, .. } = classify(long.as_bytes()) else {
            panic!("a kick");
        };
        assert!(
            message.len() <= NOTICE_TEXT_MAX + '…'.len_utf8(),
            "{}",
            message.len()
        );
    }

    #[test]
    fn disable_event_is_exact() {
        let e = disable_event(10001000);
        let v: serde_json::Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["self_id"], 10001000);
        assert_eq!(v["sub_type"], "disable");
        assert!(e.starts_with("{\"time\":"));
        assert!(e.ends_with(",\"self_id\":10001000,\"post_type\":\"meta_event\",\"meta_event_type\":\"lifecycle\",\"sub_type\":\"disable\"}"));
    }
}
