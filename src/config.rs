//! Settings: command line, environment, config file and defaults, resolved into one
//! immutable [`Settings`] value.
//!
//! Precedence is flag > `LIFEGUARD_*` environment variable > config file > default.
//! clap already folds the first two together (every flag has an `env`), so every field
//! of [`RunArgs`] is an `Option`: `None` means "not given on the command line or in the
//! environment", and the file or the default decides.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:6700";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:6701";
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_FALL: u32 = 2;
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_HEARTBEAT_GRACE: f64 = 2.5;
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;
/// Exit status for a bad flag, value or config file (sysexits' EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// `lifeguard`: the command line.
#[derive(Debug, Parser)]
#[command(
    name = "lifeguard",
    version,
    about = "Lifecycle-enforcing reverse proxy for OneBot v11 forward-WebSocket backends",
    args_conflicts_with_subcommands = false
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy in front of a bundled NapCat simulator and walk through a disable.
    Demo(DemoArgs),
    /// Validate the configuration and print the effective settings (secrets masked).
    CheckConfig,
    /// Query the admin listener's /live (or /ready) endpoint; exit 0 when it answers 200.
    Health(HealthArgs),
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the proxy and the simulator running after the walkthrough (Ctrl-C to stop).
    #[arg(long)]
    pub keep_running: bool,
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Ask /ready (backend up) instead of /live (process alive).
    #[arg(long)]
    pub ready: bool,
    /// How long to wait for the answer.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Every setting of the running proxy. All optional here: see the module docs.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// TOML config file; every flag below has a key of the same name (with `_`).
    #[arg(long, env = "LIFEGUARD_CONFIG", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Address clients connect to [default: 0.0.0.0:6700].
    #[arg(long, env = "LIFEGUARD_LISTEN", value_name = "ADDR", global = true)]
    pub listen: Option<SocketAddr>,
    /// The backend's forward WebSocket server, ws://host:port (required).
    #[arg(long, env = "LIFEGUARD_UPSTREAM", value_name = "URL", global = true)]
    pub upstream: Option<String>,
    /// Token clients must present (Bearer/Token header or ?access_token=); unset = open.
    #[arg(
        long,
        env = "LIFEGUARD_ACCESS_TOKEN",
        value_name = "TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub access_token: Option<String>,
    /// Token lifeguard presents to the backend [default: the access token].
    #[arg(
        long,
        env = "LIFEGUARD_UPSTREAM_TOKEN",
        value_name = "TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub upstream_token: Option<String>,
    /// Admin listener: /live, /ready, /state, /metrics, POST /disable, POST /enable [default: 127.0.0.1:6701].
    #[arg(
        long,
        env = "LIFEGUARD_ADMIN_LISTEN",
        value_name = "ADDR",
        global = true
    )]
    pub admin_listen: Option<SocketAddr>,
    /// Time between active probes (a WebSocket handshake on the backend's /api) [default: 1s].
    #[arg(long, env = "LIFEGUARD_PROBE_INTERVAL", value_name = "DUR", value_parser = parse_duration, global = true)]
    pub probe_interval: Option<Duration>,
    /// How long one probe may take [default: 1s].
    #[arg(long, env = "LIFEGUARD_PROBE_TIMEOUT", value_name = "DUR", value_parser = parse_duration, global = true)]
    pub probe_timeout: Option<Duration>,
    /// Consecutive failed probes that mark the backend down [default: 2].
    #[arg(long, env = "LIFEGUARD_FALL", value_name = "N", global = true)]
    pub fall: Option<u32>,
    /// Consecutive successful probes that mark it up again [default: 2].
    #[arg(long, env = "LIFEGUARD_RISE", value_name = "N", global = true)]
    pub rise: Option<u32>,
    /// A session whose backend sends no heartbeat for FACTOR x its announced interval is dead [default: 2.5].
    #[arg(
        long,
        env = "LIFEGUARD_HEARTBEAT_GRACE",
        value_name = "FACTOR",
        global = true
    )]
    pub heartbeat_grace: Option<f64>,
    /// How long to wait for a client's Close reply before closing its TCP socket [default: 1s].
    #[arg(long, env = "LIFEGUARD_CLOSE_TIMEOUT", value_name = "DUR", value_parser = parse_duration, global = true)]
    pub close_timeout: Option<Duration>,
    /// Shutdown budget on SIGTERM/SIGINT [default: 10s].
    #[arg(long, env = "LIFEGUARD_DRAIN_TIMEOUT", value_name = "DUR", value_parser = parse_duration, global = true)]
    pub drain_timeout: Option<Duration>,
    /// How long to wait for the backend's TCP connect and handshake for a new client [default: 3s].
    #[arg(long, env = "LIFEGUARD_CONNECT_TIMEOUT", value_name = "DUR", value_parser = parse_duration, global = true)]
    pub connect_timeout: Option<Duration>,
    /// Largest message a client may send, in bytes; larger ones close with 1009 [default: 67108864].
    #[arg(
        long,
        env = "LIFEGUARD_MAX_MESSAGE_SIZE",
        value_name = "BYTES",
        global = true
    )]
    pub max_message_size: Option<usize>,
    /// NapCat's onebot11_<uin>.json (or its config directory) to follow `enable` in.
    #[arg(
        long,
        env = "LIFEGUARD_NAPCAT_CONFIG",
        value_name = "PATH",
        global = true
    )]
    pub napcat_config: Option<PathBuf>,
    /// Which websocketServers entry (by name) of the NapCat config [default: the one whose port matches --upstream].
    #[arg(
        long,
        env = "LIFEGUARD_NAPCAT_SERVER",
        value_name = "NAME",
        global = true
    )]
    pub napcat_server: Option<String>,
    /// Treat a heartbeat with status.online == false (QQ logged out) as down [default: true].
    #[arg(
        long,
        env = "LIFEGUARD_OFFLINE_IS_DOWN",
        value_name = "BOOL",
        global = true
    )]
    pub offline_is_down: Option<bool>,
    /// Send a client a heartbeat when nothing was sent to it for DUR [default: off].
    #[arg(long, env = "LIFEGUARD_CLIENT_HEARTBEAT", value_name = "DUR", value_parser = parse_duration, global = true)]
    pub client_heartbeat: Option<Duration>,
    /// Log format [default: text]; the filter comes from RUST_LOG (default: info).
    #[arg(
        long,
        env = "LIFEGUARD_LOG_FORMAT",
        value_name = "FORMAT",
        global = true
    )]
    pub log_format: Option<LogFormat>,
}

/// The config file: every key optional, unknown keys refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `false` keeps the backend administratively disabled (503, sessions closed with 1012).
    pub enabled: Option<bool>,
    pub listen: Option<SocketAddr>,
    pub upstream: Option<String>,
    pub access_token: Option<String>,
    pub upstream_token: Option<String>,
    pub admin_listen: Option<SocketAddr>,
    #[serde(default, deserialize_with = "de_duration")]
    pub probe_interval: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    pub probe_timeout: Option<Duration>,
    pub fall: Option<u32>,
    pub rise: Option<u32>,
    pub heartbeat_grace: Option<f64>,
    #[serde(default, deserialize_with = "de_duration")]
    pub close_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    pub drain_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    pub connect_timeout: Option<Duration>,
    pub max_message_size: Option<usize>,
    pub napcat_config: Option<PathBuf>,
    pub napcat_server: Option<String>,
    pub offline_is_down: Option<bool>,
    #[serde(default, deserialize_with = "de_duration")]
    pub client_heartbeat: Option<Duration>,
    pub log_format: Option<LogFormat>,
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// `500ms`, `2s`, `1m30s`: humantime's syntax. A bare number is refused: units matter.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?} ({e}); write it like 500ms or 2s"))
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
    /// Constant-time comparison with what a client presented.
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

/// Active-probe settings (HAProxy's inter/timeout/fall/rise).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeSettings {
    pub interval: Duration,
    pub timeout: Duration,
    pub fall: u32,
    pub rise: u32,
}

/// The effective configuration. Immutable; a reload builds a new one.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `false` while the operator has disabled the backend in the config file.
    pub enabled: bool,
    pub listen: SocketAddr,
    pub upstream: UpstreamUrl,
    pub access_token: Option<Secret>,
    pub upstream_token: Option<Secret>,
    /// The operator set the upstream token (flag, env or file) rather than letting it
    /// default to the access token; NapCat-config watching then leaves it alone.
    pub upstream_token_explicit: bool,
    pub admin_listen: SocketAddr,
    pub probe: ProbeSettings,
    pub heartbeat_grace: f64,
    pub close_timeout: Duration,
    pub drain_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_message_size: usize,
    pub napcat_config: Option<PathBuf>,
    pub napcat_server: Option<String>,
    pub offline_is_down: bool,
    pub client_heartbeat: Option<Duration>,
    pub log_format: LogFormat,
}

/// A configuration problem: what, and where when it came from the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    /// Several problems, each one clear line (what `check-config` prints, one per line).
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Many(Vec<ConfigError>),
}

impl ConfigError {
    /// Every problem as its own line.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Many(all) => all.iter().flat_map(|e| e.problems()).collect(),
            e => vec![e.to_string()],
        }
    }

    fn many(mut all: Vec<ConfigError>) -> ConfigError {
        if all.len() == 1 {
            all.remove(0)
        } else {
            ConfigError::Many(all)
        }
    }
}

/// Where the config file came from, to name the file and the line of a key in errors.
#[derive(Debug, Clone, Copy)]
pub struct FileSource<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl FileSource<'_> {
    /// The 1-based line a top-level key is written on, if it is.
    fn line_of(&self, key: &str) -> Option<usize> {
        let table = toml::de::DeTable::parse(self.text).ok()?;
        let (k, _) = table.get_ref().iter().find(|(k, _)| k.get_ref() == key)?;
        let start = k.span().start.min(self.text.len());
        Some(self.text[..start].matches('\n').count() + 1)
    }
}

impl Settings {
    /// Read `--config` (when given) and resolve everything; what `main` and `check-config` use.
    ///
    /// Every problem is reported, not only the first: unreadable file, each bad key (with
    /// its line), each bad value (with the flag or the file line it came from).
    pub fn load(args: &RunArgs) -> Result<Settings, ConfigError> {
        let Some(path) = &args.config else {
            return Settings::resolve(args, None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let src = FileSource { path, text: &text };
        let (file, file_problems, syntax_ok) = parse_keys(&text);
        if !syntax_ok {
            // Nothing in the file could be read: its syntax error is the one problem.
            return Err(ConfigError::many(
                file_problems
                    .into_iter()
                    .map(|message| ConfigError::File {
                        path: path.to_path_buf(),
                        message,
                    })
                    .collect(),
            ));
        }
        let mut problems: Vec<ConfigError> = file_problems
            .into_iter()
            .map(|message| ConfigError::File {
                path: path.to_path_buf(),
                message,
            })
            .collect();
        match Settings::resolve_from(args, Some(&file), Some(src)) {
            Ok(s) if problems.is_empty() => Ok(s),
            Ok(_) => Err(ConfigError::many(problems)),
            Err(e) => {
                problems.extend(match e {
                    ConfigError::Many(all) => all,
                    e => vec![e],
                });
                Err(ConfigError::many(problems))
            }
        }
    }

    /// Merge: command line/env first, then the file, then defaults; then validate.
    pub fn resolve(args: &RunArgs, file: Option<&FileConfig>) -> Result<Settings, ConfigError> {
        Settings::resolve_from(args, file, None)
    }

    /// [`Settings::resolve`], naming the file and line of a bad value that came from it.
    pub fn resolve_from(
        args: &RunArgs,
        file: Option<&FileConfig>,
        src: Option<FileSource<'_>>,
    ) -> Result<Settings, ConfigError> {
        let f = file.cloned().unwrap_or_default();
        let mut problems: Vec<ConfigError> = Vec::new();
        let upstream = match args.upstream.clone().or(f.upstream.clone()) {
            None => {
                problems.push(ConfigError::Invalid(
                    "missing upstream: pass --upstream ws://host:port (or LIFEGUARD_UPSTREAM, or `upstream` in the config file)"
                        .into(),
                ));
                None
            }
            Some(u) => match UpstreamUrl::parse(&u) {
                Ok(u) => Some(u),
                Err(m) => {
                    problems.push(located(args.upstream.is_some(), "upstream", src, m));
                    None
                }
            },
        };
        let access_token = args
            .access_token
            .clone()
            .or(f.access_token.clone())
            .filter(|t| !t.is_empty())
            .map(Secret);
        let explicit_upstream_token = args.upstream_token.clone().or(f.upstream_token.clone());
        let upstream_token_explicit = explicit_upstream_token.is_some();
        let upstream_token = explicit_upstream_token
            .map(Secret)
            .or_else(|| access_token.clone())
            .filter(|t| !t.0.is_empty());
        let probe = ProbeSettings {
            interval: args
                .probe_interval
                .or(f.probe_interval)
                .unwrap_or(DEFAULT_PROBE_INTERVAL),
            timeout: args
                .probe_timeout
                .or(f.probe_timeout)
                .unwrap_or(DEFAULT_PROBE_TIMEOUT),
            fall: args.fall.or(f.fall).unwrap_or(DEFAULT_FALL),
            rise: args.rise.or(f.rise).unwrap_or(DEFAULT_RISE),
        };
        let s = Settings {
            enabled: f.enabled.unwrap_or(true),
            listen: args
                .listen
                .or(f.listen)
                .unwrap_or_else(|| parse_default(DEFAULT_LISTEN)),
            // Placeholder while collecting problems; never returned without a real one.
            upstream: upstream.clone().unwrap_or(UpstreamUrl {
                host: String::new(),
                port: 0,
                base_path: String::new(),
            }),
            access_token,
            upstream_token,
            upstream_token_explicit,
            admin_listen: args
                .admin_listen
                .or(f.admin_listen)
                .unwrap_or_else(|| parse_default(DEFAULT_ADMIN_LISTEN)),
            probe,
            heartbeat_grace: args
                .heartbeat_grace
                .or(f.heartbeat_grace)
                .unwrap_or(DEFAULT_HEARTBEAT_GRACE),
            close_timeout: args
                .close_timeout
                .or(f.close_timeout)
                .unwrap_or(DEFAULT_CLOSE_TIMEOUT),
            drain_timeout: args
                .drain_timeout
                .or(f.drain_timeout)
                .unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            connect_timeout: args
                .connect_timeout
                .or(f.connect_timeout)
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            max_message_size: args
                .max_message_size
                .or(f.max_message_size)
                .unwrap_or(DEFAULT_MAX_MESSAGE_SIZE),
            napcat_config: args.napcat_config.clone().or(f.napcat_config.clone()),
            napcat_server: args.napcat_server.clone().or(f.napcat_server.clone()),
            offline_is_down: args.offline_is_down.or(f.offline_is_down).unwrap_or(true),
            client_heartbeat: args.client_heartbeat.or(f.client_heartbeat),
            log_format: args.log_format.or(f.log_format).unwrap_or_default(),
        };
        let from_flag = |key: &str| -> bool {
            match key {
                "probe_interval" => args.probe_interval.is_some(),
                "probe_timeout" => args.probe_timeout.is_some(),
                "fall" => args.fall.is_some(),
                "rise" => args.rise.is_some(),
                "heartbeat_grace" => args.heartbeat_grace.is_some(),
                "connect_timeout" => args.connect_timeout.is_some(),
                "max_message_size" => args.max_message_size.is_some(),
                "client_heartbeat" => args.client_heartbeat.is_some(),
                "napcat_server" => args.napcat_server.is_some(),
                _ => false,
            }
        };
        for (key, message) in s.validate() {
            problems.push(located(from_flag(key), key, src, message));
        }
        if problems.is_empty() && upstream.is_some() {
            Ok(s)
        } else {
            Err(ConfigError::many(problems))
        }
    }

    /// Every problem with the values, as (key, message); empty when all is well.
    fn validate(&self) -> Vec<(&'static str, String)> {
        let mut bad: Vec<(&'static str, String)> = Vec::new();
        let mut check = |ok: bool, key: &'static str, m: &str| {
            if !ok {
                bad.push((key, m.to_string()));
            }
        };
        check(
            !self.probe.interval.is_zero(),
            "probe_interval",
            "probe_interval must be above 0 (write it like 1s)",
        );
        check(
            !self.probe.timeout.is_zero(),
            "probe_timeout",
            "probe_timeout must be above 0 (write it like 1s)",
        );
        check(self.probe.fall >= 1, "fall", "fall must be at least 1");
        check(self.probe.rise >= 1, "rise", "rise must be at least 1");
        check(
            self.heartbeat_grace.is_finite() && self.heartbeat_grace >= 1.0,
            "heartbeat_grace",
            "heartbeat_grace must be a number >= 1 (a factor of the backend's heartbeat interval)",
        );
        check(
            !self.connect_timeout.is_zero(),
            "connect_timeout",
            "connect_timeout must be above 0",
        );
        check(
            self.max_message_size >= 1024,
            "max_message_size",
            "max_message_size must be at least 1024 bytes",
        );
        check(
            !self.client_heartbeat.is_some_and(|d| d.is_zero()),
            "client_heartbeat",
            "client_heartbeat must be above 0 (leave it unset to turn it off)",
        );
        check(
            !self.napcat_server.as_ref().is_some_and(|n| n.is_empty()),
            "napcat_server",
            "napcat_server must not be empty (leave it unset to match by port)",
        );
        bad
    }

    /// The settings as `check-config` prints them: one `key = value` a line, secrets masked.
    pub fn render(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "(unset)".into());
        let d = |v: Duration| humantime::format_duration(v).to_string();
        let lines = [
            ("enabled", self.enabled.to_string()),
            ("listen", self.listen.to_string()),
            ("upstream", self.upstream.to_string()),
            (
                "access_token",
                opt(self.access_token.as_ref().map(|_| "***".into())),
            ),
            (
                "upstream_token",
                opt(self.upstream_token.as_ref().map(|_| "***".into())),
            ),
            ("admin_listen", self.admin_listen.to_string()),
            ("probe_interval", d(self.probe.interval)),
            ("probe_timeout", d(self.probe.timeout)),
            ("fall", self.probe.fall.to_string()),
            ("rise", self.probe.rise.to_string()),
            ("heartbeat_grace", self.heartbeat_grace.to_string()),
            ("close_timeout", d(self.close_timeout)),
            ("drain_timeout", d(self.drain_timeout)),
            ("connect_timeout", d(self.connect_timeout)),
            ("max_message_size", self.max_message_size.to_string()),
            (
                "napcat_config",
                opt(self.napcat_config.as_ref().map(|p| p.display().to_string())),
            ),
            ("napcat_server", opt(self.napcat_server.clone())),
            ("offline_is_down", self.offline_is_down.to_string()),
            ("client_heartbeat", opt(self.client_heartbeat.map(d))),
            (
                "log_format",
                format!("{:?}", self.log_format).to_lowercase(),
            ),
        ];
        lines.iter().map(|(k, v)| format!("{k} = {v}\n")).collect()
    }
}

fn parse_default(s: &str) -> SocketAddr {
    s.parse().expect("built-in default address parses")
}

/// Read and parse the TOML config file; errors name the file and the line.
pub fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let (file, problems) = parse_file_config_partial(&text);
    if problems.is_empty() {
        return Ok(file);
    }
    Err(ConfigError::many(
        problems
            .into_iter()
            .map(|message| ConfigError::File {
                path: path.to_path_buf(),
                message,
            })
            .collect(),
    ))
}

/// Parse config file text; the error names the line and the field (every bad key, one
/// per line of the message).
pub fn parse_file_config(text: &str) -> Result<FileConfig, String> {
    let (file, problems) = parse_file_config_partial(text);
    if problems.is_empty() {
        Ok(file)
    } else {
        Err(problems.join("\n"))
    }
}

/// Parse config file text key by key: the keys that are fine, and one message per bad key
/// (`line N: ...`). A TOML syntax error stops everything: one message, no keys.
pub fn parse_file_config_partial(text: &str) -> (FileConfig, Vec<String>) {
    let (file, problems, _) = parse_keys(text);
    (file, problems)
}

/// (good keys, one message per bad key in line order, the TOML syntax was fine).
fn parse_keys(text: &str) -> (FileConfig, Vec<String>, bool) {
    let line_at = |pos: usize| text[..pos.min(text.len())].matches('\n').count() + 1;
    let table = match text.parse::<toml::Table>() {
        Ok(t) => t,
        Err(e) => {
            let msg = e.message().trim().to_string();
            let msg = match e.span() {
                Some(sp) => format!("line {}: {msg}", line_at(sp.start)),
                None => msg,
            };
            return (FileConfig::default(), vec![msg], false);
        }
    };
    let spans = toml::de::DeTable::parse(text).ok();
    let key_line = |key: &str| -> Option<usize> {
        let t = spans.as_ref()?;
        let (k, _) = t.get_ref().iter().find(|(k, _)| k.get_ref() == key)?;
        Some(line_at(k.span().start))
    };
    let mut good = toml::Table::new();
    let mut problems: Vec<(usize, String)> = Vec::new();
    for (key, value) in table {
        let mut one = toml::Table::new();
        one.insert(key.clone(), value.clone());
        match toml::Value::Table(one).try_into::<FileConfig>() {
            Ok(_) => {
                good.insert(key, value);
            }
            Err(e) => {
                let msg = e.message().trim().to_string();
                let msg = if msg.contains(&format!("`{key}`")) || msg.contains(&key) {
                    msg
                } else {
                    format!("{key}: {msg}")
                };
                problems.push(match key_line(&key) {
                    Some(l) => (l, format!("line {l}: {msg}")),
                    None => (0, msg),
                });
            }
        }
    }
    let file = toml::Value::Table(good)
        .try_into::<FileConfig>()
        .unwrap_or_default();
    problems.sort_by_key(|p| p.0);
    (file, problems.into_iter().map(|p| p.1).collect(), true)
}

/// A bad value, named by where it came from: the flag (or its env var), or the file's line.
fn located(
    from_flag: bool,
    key: &str,
    src: Option<FileSource<'_>>,
    message: String,
) -> ConfigError {
    if from_flag {
        let flag = key.replace('_', "-");
        let env = format!("LIFEGUARD_{}", key.to_uppercase());
        return ConfigError::Invalid(format!("--{flag} (or {env}): {message}"));
    }
    match src {
        Some(src) => ConfigError::File {
            path: src.path.to_path_buf(),
            message: match src.line_of(key) {
                Some(l) => format!("line {l}: {message}"),
                None => message,
            },
        },
        None => ConfigError::Invalid(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(upstream: &str) -> RunArgs {
        RunArgs {
            upstream: Some(upstream.into()),
            ..Default::default()
        }
    }

    #[test]
    fn upstream_urls() {
        let u = UpstreamUrl::parse("ws://napcat:3001").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.base_path.as_str()),
            ("napcat", 3001, "")
        );
        let u = UpstreamUrl::parse("ws://[::1]:3001/onebot/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.base_path.as_str()),
            ("::1", 3001, "/onebot")
        );
        assert_eq!(u.authority(), "[::1]:3001");
        assert_eq!(UpstreamUrl::parse("ws://h").unwrap().port, 80);
        assert!(UpstreamUrl::parse("http://h:1").is_err());
        assert!(UpstreamUrl::parse("wss://h:1").is_err());
        assert!(UpstreamUrl::parse("ws://h:99999").is_err());
        assert!(UpstreamUrl::parse("ws://:1").is_err());
    }

    #[test]
    fn precedence_flag_over_file_over_default() {
        let file =
            parse_file_config("upstream = \"ws://file:1\"\nfall = 5\nprobe_interval = \"250ms\"\n")
                .unwrap();
        let mut a = args("ws://flag:2");
        a.fall = Some(7);
        let s = Settings::resolve(&a, Some(&file)).unwrap();
        assert_eq!(s.upstream.host, "flag");
        assert_eq!(s.probe.fall, 7);
        assert_eq!(s.probe.interval, Duration::from_millis(250));
        assert_eq!(s.probe.rise, DEFAULT_RISE);
        assert_eq!(s.listen, DEFAULT_LISTEN.parse().unwrap());
    }

    #[test]
    fn upstream_token_defaults_to_access_token_and_never_renders() {
        let mut a = args("ws://h:1");
        a.access_token = Some("s3cret".into());
        let s = Settings::resolve(&a, None).unwrap();
        assert_eq!(s.upstream_token.as_ref().unwrap().expose(), "s3cret");
        assert!(!s.render().contains("s3cret"));
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn file_errors_name_the_line() {
        let err = parse_file_config("upstream = \"ws://h:1\"\nfall = \"two\"\n").unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        let err = parse_file_config("nope = 1\n").unwrap_err();
        assert!(err.contains("nope"), "{err}");
        let err = parse_file_config("probe_interval = \"soon\"\n").unwrap_err();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn missing_upstream_is_one_clear_error() {
        let err = Settings::resolve(&RunArgs::default(), None).unwrap_err();
        assert!(err.to_string().contains("--upstream"));
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let dir = std::env::temp_dir().join(format!("lifeguard-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("many.toml");
        std::fs::write(
            &path,
            "upstream = \"ws://h:1\"\nfall = 0\nrise = \"two\"\nnope = 1\nheartbeat_grace = 0.5\n",
        )
        .unwrap();
        let a = RunArgs {
            config: Some(path.clone()),
            probe_interval: Some(Duration::ZERO),
            ..Default::default()
        };
        let err = Settings::load(&a).unwrap_err();
        let p = err.problems();
        assert_eq!(p.len(), 5, "{p:#?}");
        let has = |needle: &str| p.iter().any(|l| l.contains(needle));
        assert!(has("line 2: fall must be at least 1"), "{p:#?}");
        assert!(has("line 3: rise"), "{p:#?}");
        assert!(has("line 4: unknown field `nope`"), "{p:#?}");
        assert!(has("line 5: heartbeat_grace"), "{p:#?}");
        assert!(has("--probe-interval"), "{p:#?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
