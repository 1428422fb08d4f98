//! The exact JSON text NapCat puts on the wire: lifecycle and heartbeat meta events, the
//! group message event used by `emit_message`/`blast`, and API replies.
//!
//! Everything is built by string concatenation in NapCat's field order (serde_json's `Value`
//! would sort the keys), and the message event is a pre-split template so that producing
//! one more event is a handful of `memcpy`s and three integer formats.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// Reply to a frame that is not valid JSON (NapCat: retcode 1400, `echo` null).
pub(crate) const PARSE_FAILED: &str = concat!(
    r#"{"status":"failed","retcode":1400,"data":null,"#,
    r#""message":"json解析失败,请检查数据格式","wording":"json解析失败,请检查数据格式","#,
    r#""echo":null,"stream":"normal-action"}"#
);

/// The frame NapCat sends before closing a connection whose token is missing or wrong.
pub(crate) const AUTH_FAILED: &str = concat!(
    r#"{"status":"failed","retcode":1403,"data":null,"#,
    r#""message":"token验证失败","wording":"token验证失败","echo":null}"#
);

/// Unix time in seconds, as NapCat writes `time`.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `{"time":..,"self_id":..,"post_type":"meta_event","meta_event_type":"lifecycle","sub_type":..}`
pub(crate) fn lifecycle(self_id: u64, sub_type: &str) -> String {
    format!(
        r#"{{"time":{},"self_id":{},"post_type":"meta_event","meta_event_type":"lifecycle","sub_type":"{}"}}"#,
        now_secs(),
        self_id,
        sub_type
    )
}

/// A heartbeat meta event; `interval_ms` is the configured heartbeat interval.
pub(crate) fn heartbeat(self_id: u64, online: bool, interval_ms: u64) -> String {
    format!(
        r#"{{"time":{},"self_id":{},"post_type":"meta_event","meta_event_type":"heartbeat","status":{{"online":{},"good":true}},"interval":{}}}"#,
        now_secs(),
        self_id,
        online,
        interval_ms
    )
}

/// The notice NapCat sends to every event consumer at once when QQ kicks the account off
/// (`BotOfflineEvent`); `tag` and `message` are QQ's tip title and text.
pub(crate) fn bot_offline(self_id: u64, tag: &str, message: &str) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\""));
    format!(
        r#"{{"time":{},"self_id":{self_id},"post_type":"notice","notice_type":"bot_offline","user_id":{self_id},"tag":{},"message":{}}}"#,
        now_secs(),
        quote(tag),
        quote(message)
    )
}

/// An `ok` API reply. `data` and `echo` are JSON texts, copied verbatim.
pub(crate) fn reply_ok(data: &str, echo: &str) -> String {
    let mut out = String::with_capacity(96 + data.len() + echo.len());
    out.push_str(r#"{"status":"ok","retcode":0,"data":"#);
    out.push_str(data);
    out.push_str(r#","message":"","wording":"","echo":"#);
    out.push_str(echo);
    out.push_str(r#","stream":"normal-action"}"#);
    out
}

/// A `failed` API reply with `data` null. `message` is plain text (escaped here), `echo` a
/// JSON text copied verbatim.
pub(crate) fn reply_failed(retcode: u32, message: &str, echo: &str) -> String {
    let quoted = serde_json::to_string(message).unwrap_or_else(|_| String::from("\"\""));
    let mut out = String::with_capacity(96 + 2 * quoted.len() + echo.len());
    let _ = write!(
        out,
        r#"{{"status":"failed","retcode":{retcode},"data":null,"message":{quoted},"wording":{quoted},"echo":"#
    );
    out.push_str(echo);
    out.push_str(r#","stream":"normal-action"}"#);
    out
}

/// The group message event of `emit_message`, split around its sequence numbers.
///
/// The `time` field is fixed when the simulator starts, so that `message_event(seq)` is the
/// same text whenever it is built (tests compare frames byte for byte).
#[derive(Debug)]
pub(crate) struct MessageTemplate {
    /// Everything up to and including `"message_id":`.
    head: String,
    /// Everything after the last sequence number (`"` closing `real_seq` onwards).
    tail: &'static str,
}

impl MessageTemplate {
    /// A template for `self_id`, with `time` = `time`.
    pub(crate) fn new(self_id: u64, time: u64) -> Self {
        MessageTemplate {
            head: format!(
                r#"{{"self_id":{self_id},"user_id":1145141919,"time":{time},"message_id":"#
            ),
            tail: concat!(
                r#"","message_type":"group","#,
                r#""sender":{"user_id":1145141919,"nickname":"小明","card":"","role":"member"},"#,
                r#""raw_message":"晚上好","font":14,"sub_type":"normal","#,
                r#""message":[{"type":"text","data":{"text":"晚上好"}}],"#,
                r#""message_format":"array","post_type":"message","group_id":812345678}"#
            ),
        }
    }

    /// Append the event with message_id/message_seq/real_id/real_seq = `seq` to `out`.
    pub(crate) fn write(&self, seq: u64, out: &mut String) {
        out.push_str(&self.head);
        let _ = write!(
            out,
            r#"{seq},"message_seq":{seq},"real_id":{seq},"real_seq":"{seq}"#
        );
        out.push_str(self.tail);
    }

    /// The event with sequence number `seq` as a new string.
    pub(crate) fn build(&self, seq: u64) -> String {
        let mut out = String::with_capacity(self.head.len() + self.tail.len() + 96);
        self.write(seq, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_event_is_valid_json_with_the_sequence_everywhere() {
        let t = MessageTemplate::new(3889001234, 1764180031);
        let text = t.build(77);
        let v: serde_json::Value = serde_json::from_str(&text).expect("valid json");
        assert_eq!(v["message_id"], 77);
        assert_eq!(v["message_seq"], 77);
        assert_eq!(v["real_id"], 77);
        assert_eq!(v["real_seq"], "77");
        assert_eq!(v["self_id"], 3889001234u64);
        assert_eq!(v["post_type"], "message");
        assert!(text.starts_with(
            r#"{"self_id":3889001234,"user_id":1145141919,"time":1764180031,"message_id":77,"#
        ));
    }

    #[test]
    fn replies_are_valid_json() {
        for text in [
            PARSE_FAILED.to_string(),
            AUTH_FAILED.to_string(),
            reply_ok(r#"{"a":1}"#, r#"{"seq": 7}"#),
            reply_failed(1404, "不支持的API \"x\"", "null"),
            heartbeat(1, false, 30000),
            lifecycle(1, "connect"),
            bot_offline(1, "下线\"", "x\ny"),
        ] {
            serde_json::from_str::<serde_json::Value>(&text).expect(&text);
        }
    }
}
