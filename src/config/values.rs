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

/// A bot's reverse WebSocket endpoint (`--reverse-url`): where lifeguard dials for each
/// backend that dials in. The path is kept exactly as written (NoneBot serves
/// `/onebot/v11/` only with its trailing slash); without one, lifeguard dials the path the
/// backend dialled (as nginx's `proxy_pass` without a URI does), so a backend's split API
/// and Event connections reach a bot's separate endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReverseUrl {
    pub host: String,
    pub port: u16,
    /// The path as written (`/onebot/v11/ws`), or empty: the backend's own path.
    pub path: String,
}

impl ReverseUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let up = UpstreamUrl::parse(s).map_err(|e| e.replacen("upstream", "reverse URL", 1))?;
        let rest = s.strip_prefix("ws://").unwrap_or(s);
        let path = rest.find('/').map(|i| &rest[i..]).unwrap_or("");
        Ok(ReverseUrl {
            host: up.host,
            port: up.port,
            path: path.to_string(),
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

impl fmt::Display for ReverseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ws://{}{}", self.authority(), self.path)
    }
}

/// An `http://` URL lifeguard calls: the backend's HTTP API server (`--upstream-http`) or a
/// bot's HTTP POST receiver (`--post-url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// Host as written (brackets stripped from IPv6 literals).
    pub host: String,
    pub port: u16,
    /// The path (at least `/`) and query, as written.
    pub path_and_query: String,
}

impl HttpUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let Some(rest) = s.strip_prefix("http://") else {
            return Err(if s.starts_with("https://") {
                format!("{s:?}: https:// is not supported; lifeguard talks plain http:// beside the backend and the bots")
            } else {
                format!("{s:?} must start with http://, as in http://127.0.0.1:3000")
            });
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if path.contains('#') {
            return Err(format!("{s:?}: no fragment allowed"));
        }
        if authority.contains('@') {
            return Err(format!("{s:?}: no user:password@ allowed"));
        }
        if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(format!(
                "{s:?}: spaces and control characters must be percent-encoded"
            ));
        }
        // Reuse the WebSocket URL's authority rules (IPv6 brackets, port range).
        let u = UpstreamUrl::parse(&format!("ws://{authority}"))
            .map_err(|e| e.replace(&format!("ws://{authority}"), s))?;
        let path_and_query = match path {
            "" => "/".to_string(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_string(),
        };
        Ok(HttpUrl {
            host: u.host,
            port: u.port,
            path_and_query,
        })
    }

    /// `host:port` as it goes into the Host header and into a connect call.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The path without the query, without a trailing `/`: the prefix API paths go under.
    pub fn base_path(&self) -> &str {
        let path = self.path_and_query.split('?').next().unwrap_or("");
        path.trim_end_matches('/')
    }

    /// The whole URL, for requests (may carry a secret in its query: never log it).
    pub fn full(&self) -> String {
        format!("http://{}{}", self.authority(), self.path_and_query)
    }
}

impl fmt::Display for HttpUrl {
    /// The URL with any query masked: a query may carry a token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.path_and_query.split_once('?') {
            Some((path, _)) => write!(f, "http://{}{path}?***", self.authority()),
            None if self.path_and_query == "/" => write!(f, "http://{}", self.authority()),
            None => write!(f, "http://{}{}", self.authority(), self.path_and_query),
        }
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

/// Bot endpoints, each a `ws://` URL; duplicates are refused (the bot would see the same
/// self id twice and refuse the second).
pub fn reverse_urls(v: Vec<String>) -> Result<Vec<ReverseUrl>, String> {
    let mut out: Vec<ReverseUrl> = Vec::new();
    for raw in v.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let url = ReverseUrl::parse(raw)?;
        if out.contains(&url) {
            return Err(format!("reverse URL {raw:?} is given twice"));
        }
        out.push(url);
    }
    Ok(out)
}

pub fn upstream_http_url(v: String) -> Result<Option<HttpUrl>, String> {
    let u = HttpUrl::parse(&v).map_err(|e| format!("upstream_http {e}"))?;
    if u.path_and_query.contains('?') {
        return Err(format!("upstream_http {v:?}: no query allowed"));
    }
    Ok(Some(u))
}

/// Bots' POST URLs; every one must parse.
pub fn post_urls(v: Vec<String>) -> Result<Vec<HttpUrl>, String> {
    v.iter()
        .map(|u| HttpUrl::parse(u.trim()).map_err(|e| format!("post_url {e}")))
        .collect()
}

/// serde's side of a repeatable setting: one string or a list of them.
pub fn de_string_or_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Some(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    }))
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
    ReverseUrl,
    HttpUrl,
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
