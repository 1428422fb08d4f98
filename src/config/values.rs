//! The value types settings are made of, how a raw value becomes one (parse and check),
//! and how each is shown by `check-config` (secrets never).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// `500ms`, `2s`, `1m30s`: humantime's syntax. A bare number is refused: units matter.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?} ({e}); write it like 500ms or 2s"))
}

/// serde's side of [`parse_duration`], for the config file.
pub fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// A token. Never printed: `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison with what a peer presented.
    pub fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(presented).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where the backend's forward WebSocket server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// Host as written (brackets stripped from IPv6 literals); what we connect to.
    pub host: String,
    pub port: u16,
    /// Path prefix before /, /api, /event; normally empty.
    pub base_path: String,
}

impl UpstreamUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = if let Some(r) = s.strip_prefix("ws://") {
            r
        } else if s.starts_with("wss://") {
            return Err(format!(
                "upstream {s:?}: wss:// is not supported; lifeguard runs beside the backend, use ws://"
            ));
        } else {
            return Err(format!(
                "upstream {s:?} must start with ws://, as in ws://127.0.0.1:3001"
            ));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if path.contains('?') || path.contains('#') {
            return Err(format!("upstream {s:?}: no query or fragment allowed"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6
                .find(']')
                .ok_or_else(|| format!("upstream {s:?}: unterminated [ in host"))?;
            let host = &v6[..end];
            let port = match &v6[end + 1..] {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("upstream {s:?}: bad port"))?,
                ),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("upstream {s:?} has no host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("upstream {s:?}: port {p:?} is not a number 1-65535"))?,
            None => 80,
        };
        if port == 0 {
            return Err(format!("upstream {s:?}: port 0 is not a port"));
        }
        Ok(UpstreamUrl {
            host: host.to_string(),
            port,
            base_path: path.to_string(),
        })
    }

    /// `host:port` as it goes into the Host header and into a `TcpStream::connect` call.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ws://{}{}", self.authority(), self.base_path)
    }
}

/// Where a webhook goes: `http://host[:port][/path][?query]`. Chat webhooks carry their key
/// in the path or query, so it is shown (logs, `check-config`) as `http://host:port/…`.
#[derive(Clone, PartialEq, Eq)]
pub struct NotifyUrl {
    /// Host as written (brackets stripped from IPv6 literals).
    pub host: String,
    pub port: u16,
    /// `/path?query` as written (at least `/`): what goes into the request line.
    pub target: String,
}

impl NotifyUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let Some(rest) = s.strip_prefix("http://") else {
            if s.starts_with("https://") {
                return Err(
                    "notify_url: https:// is not supported (lifeguard has no TLS client); post to a local relay or to Alertmanager over http:// (see the README)"
                        .into(),
                );
            }
            return Err(
                "notify_url must start with http://, as in http://127.0.0.1:9093/hook".into(),
            );
        };
        let (authority, target) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        let target = target.split('#').next().unwrap_or("/").to_string();
        if authority.contains('@') {
            return Err(
                "notify_url: user:password@ is not supported; put a token in the path or query"
                    .into(),
            );
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6
                .find(']')
                .ok_or_else(|| "notify_url: unterminated [ in host".to_string())?;
            (&v6[..end], v6[end + 1..].strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err("notify_url has no host".into());
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("notify_url: port {p:?} is not a number 1-65535"))?,
            None => 80,
        };
        if target.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err("notify_url: spaces and control characters must be percent-encoded".into());
        }
        Ok(NotifyUrl {
            host: host.to_string(),
            port,
            target,
        })
    }

    /// `host:port`, for the Host header and for connecting.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for NotifyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rest = if self.target == "/" { "/" } else { "/…" };
        write!(f, "http://{}{rest}", self.authority())
    }
}

impl fmt::Debug for NotifyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

// ---------------------------------------------------------------------------------------
// Conversions: raw value -> setting, with the check that belongs to it.

/// Taken as given.
pub fn same<T>(v: T) -> Result<T, String> {
    Ok(v)
}

/// Taken as given, and present.
pub fn some<T>(v: T) -> Result<Option<T>, String> {
    Ok(Some(v))
}

/// A token; `""` means none.
pub fn secret(v: String) -> Result<Option<Secret>, String> {
    Ok(Some(Secret(v)).filter(|s| !s.0.is_empty()))
}

pub fn upstream_url(v: String) -> Result<Option<UpstreamUrl>, String> {
    UpstreamUrl::parse(&v).map(Some)
}

/// Webhook URLs (repeatable); empty entries are skipped.
pub fn notify_urls(v: Vec<String>) -> Result<Vec<NotifyUrl>, String> {
    v.iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(NotifyUrl::parse)
        .collect()
}

/// A duration above zero; `what` names the setting in the message.
pub fn positive(what: &'static str) -> impl Fn(Duration) -> Result<Duration, String> {
    move |d| {
        if d.is_zero() {
            Err(format!("{what} must be above 0 (write it like 1s)"))
        } else {
            Ok(d)
        }
    }
}

/// An optional duration that, when set, is above zero.
pub fn positive_or_off(
    what: &'static str,
) -> impl Fn(Duration) -> Result<Option<Duration>, String> {
    move |d| {
        if d.is_zero() {
            Err(format!(
                "{what} must be above 0 (leave it unset to turn it off)"
            ))
        } else {
            Ok(Some(d))
        }
    }
}

/// A count of at least `min`.
pub fn at_least<T: PartialOrd + fmt::Display + Copy>(
    what: &'static str,
    min: T,
) -> impl Fn(T) -> Result<T, String> {
    move |v| {
        if v >= min {
            Ok(v)
        } else {
            Err(format!("{what} must be at least {min}"))
        }
    }
}

/// An optional count that, when set, is at least `min`.
pub fn at_least_some<T: PartialOrd + fmt::Display + Copy>(
    what: &'static str,
    min: T,
) -> impl Fn(T) -> Result<Option<T>, String> {
    let check = at_least(what, min);
    move |v| check(v).map(Some)
}

/// A factor of the backend's heartbeat interval.
pub fn grace_factor(v: f64) -> Result<f64, String> {
    if v.is_finite() && v >= 1.0 {
        Ok(v)
    } else {
        Err(
            "heartbeat_grace must be a number >= 1 (a factor of the backend's heartbeat interval)"
                .into(),
        )
    }
}

/// A name that is not empty.
pub fn name(
    what: &'static str,
    unset_means: &'static str,
) -> impl Fn(String) -> Result<Option<String>, String> {
    move |v| {
        if v.is_empty() {
            Err(format!(
                "{what} must not be empty (leave it unset to {unset_means})"
            ))
        } else {
            Ok(Some(v))
        }
    }
}

// ---------------------------------------------------------------------------------------
// How `check-config` shows each value.

/// One setting's value as `check-config` prints it; secrets as `***`.
pub trait Render {
    fn render(&self) -> String;
}

macro_rules! render_display {
    ($($t:ty),*) => {$(
        impl Render for $t {
            fn render(&self) -> String {
                self.to_string()
            }
        }
    )*};
}

render_display!(
    bool,
    u32,
    usize,
    f64,
    String,
    SocketAddr,
    UpstreamUrl,
    NotifyUrl,
    Secret
);

impl Render for Duration {
    fn render(&self) -> String {
        humantime::format_duration(*self).to_string()
    }
}

impl Render for PathBuf {
    fn render(&self) -> String {
        self.display().to_string()
    }
}

impl Render for LogFormat {
    fn render(&self) -> String {
        format!("{self:?}").to_lowercase()
    }
}

impl<T: Render> Render for Option<T> {
    fn render(&self) -> String {
        match self {
            Some(v) => v.render(),
            None => "(unset)".into(),
        }
    }
}

impl<T: Render> Render for Vec<T> {
    fn render(&self) -> String {
        if self.is_empty() {
            return "(unset)".into();
        }
        self.iter()
            .map(Render::render)
            .collect::<Vec<_>>()
            .join(", ")
    }
}
