//! OneBot API calls, answered like NapCat whichever transport they came on: WebSocket
//! frames are parsed here (just `action` and `echo`); the HTTP server parses its own
//! requests and asks [`data`] for the answer.
//!
//! `echo` is kept as a [`RawValue`]: the reply carries exactly the bytes the client wrote,
//! whatever their JSON type. Where the client sent no echo (or `null`), NapCat v4 replies
//! with `"echo":""` for actions it knows and `"echo":null` for unknown actions and bad JSON
//! (`echo ?? ''` in its WebSocket server, `echo = null` default in `OB11Response.error`);
//! the simulator does the same. Unlike NapCat (JSON5), only strict JSON is accepted.

use std::borrow::Cow;
use std::sync::atomic::Ordering;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::frames;
use super::process::Shared;

/// Which NapCat adapter answers: they word the unknown-action error differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    /// `websocket-server.ts`: `不支持的API <action>`.
    ForwardWs,
    /// `websocket-client.ts` (and `http-server.ts`): `不支持的Api <action>`.
    ReverseWs,
}

impl Flavor {
    /// The unknown-action message prefix, space included.
    fn unsupported(self) -> &'static str {
        match self {
            Flavor::ForwardWs => "不支持的API ",
            Flavor::ReverseWs => UNSUPPORTED_API,
        }
    }
}

/// NapCat's unknown-action prefix in its reverse WebSocket client and HTTP server.
pub(crate) const UNSUPPORTED_API: &str = "不支持的Api ";

/// The two fields of a request the simulator looks at; `params` is ignored.
#[derive(Deserialize)]
struct Request<'a> {
    #[serde(borrow, default)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    echo: Option<&'a RawValue>,
}

/// Answer one request frame (a text frame's payload).
pub(crate) fn handle(shared: &Shared, text: &str, flavor: Flavor) -> String {
    if !text.trim_start().starts_with('{') {
        // serde would read a JSON array positionally into `Request`; NapCat finds no
        // `action` in anything but an object.
        return match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => {
                frames::reply_failed(1404, &format!("{}undefined", flavor.unsupported()), "null")
            }
            Err(_) => frames::PARSE_FAILED.to_owned(),
        };
    }
    let req: Request<'_> = match serde_json::from_str(text) {
        Ok(req) => req,
        Err(_) => return frames::PARSE_FAILED.to_owned(),
    };
    let echo = req.echo.map(RawValue::get);
    // JavaScript's `'不支持的API ' + undefined` for a request without an action.
    let action = req.action.as_deref().unwrap_or("undefined");
    let Some(data) = data(shared, action) else {
        return frames::reply_failed(
            1404,
            &format!("{}{action}", flavor.unsupported()),
            echo.unwrap_or("null"),
        );
    };
    frames::reply_ok(&data, echo.unwrap_or(r#""""#))
}

/// The `data` of a successful reply to `action` (a JSON text), or `None` for an action
/// NapCat does not know. `params` are ignored: the simulator answers with canned data.
pub(crate) fn data(shared: &Shared, action: &str) -> Option<String> {
    Some(match action {
        "get_login_info" => format!(
            r#"{{"user_id":{},"nickname":"lifeguard-bot"}}"#,
            shared.self_id
        ),
        "get_status" => format!(
            r#"{{"online":{},"good":true,"stat":{{}}}}"#,
            shared.online.load(Ordering::Relaxed)
        ),
        "send_msg" | "send_group_msg" | "send_private_msg" => format!(
            r#"{{"message_id":{}}}"#,
            shared.next_message_id.fetch_add(1, Ordering::Relaxed)
        ),
        "get_version_info" => {
            r#"{"app_name":"NapCat.Onebot","protocol_version":"v11","app_version":"4.8.98"}"#
                .to_owned()
        }
        "can_send_image" | "can_send_record" => r#"{"yes":true}"#.to_owned(),
        _ => return None,
    })
}
