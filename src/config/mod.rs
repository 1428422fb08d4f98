//! Settings: command line, environment, config file and defaults, resolved into one
//! immutable [`Settings`] value.
//!
//! Precedence is flag > `LIFEGUARD_*` environment variable > config file > default.
//! clap already folds the first two together (every flag has an `env`), so every field
//! of [`RunArgs`] is an `Option`: `None` means "not given on the command line or in the
//! environment", and the file or the default decides.
//!
//! Every setting is declared once, in the `settings!` list below ([`fields`] explains the
//! entry format); flags, variables, file keys, defaults, validation, `check-config` output
//! and the restart-needed set all come from that list.

mod fields;
mod file;
pub mod values;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

pub use file::{parse_file_config, read_file_config};
pub use values::{parse_duration, HttpUrl, LogFormat, NotifyUrl, ReverseUrl, Secret, UpstreamUrl};

use fields::settings;
use values::*;

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
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_POST_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_POST_QUEUE: usize = 4096;
pub const DEFAULT_POST_RETRY_FOR: Duration = Duration::from_secs(60);
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_CLIENT_STALL_TIMEOUT: Duration = Duration::from_secs(30);
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
    /// Show the state, the backend, open sessions and recent transitions (the status page in
    /// a terminal); exit 0 when every transport is up, 1 when one is down.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// How many recent transitions to show.
    #[arg(long, default_value_t = 10)]
    pub transitions: usize,
    /// How long to wait for the admin listener.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub timeout: Duration,
    /// Print the admin listener's JSON (/state with its transitions) instead of the text view.
    #[arg(long)]
    pub json: bool,
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

/// When a changed setting takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// At once, by the running proxy.
    Live,
    /// Only after a restart (listen addresses, the log format).
    Restart,
}

fn default_addr(s: &str) -> SocketAddr {
    s.parse().expect("built-in default address parses")
}

settings! {
    /// `false` keeps the backend administratively disabled (503, sessions closed with 1012).
    enabled: bool = true, from bool, via same, applied Live,
        arg(env = "LIFEGUARD_ENABLED", value_name = "BOOL", hide = true), file();
    /// Address clients connect to [default: 0.0.0.0:6700].
    listen: SocketAddr = default_addr(DEFAULT_LISTEN), from SocketAddr, via same, applied Restart,
        arg(env = "LIFEGUARD_LISTEN", value_name = "ADDR"), file();
    /// The backend's forward WebSocket server, ws://host:port (required).
    upstream: Option<UpstreamUrl> = None, from String, via upstream_url, applied Live,
        arg(env = "LIFEGUARD_UPSTREAM", value_name = "URL"), file();
    /// Token clients must present (Bearer/Token header or ?access_token=); unset = open.
    access_token: Option<Secret> = None, from String, via secret, applied Live,
        arg(env = "LIFEGUARD_ACCESS_TOKEN", value_name = "TOKEN", hide_env_values = true), file();
    /// Token lifeguard presents to the backend [default: the access token].
    upstream_token: Option<Secret> = None, from String, via secret, applied Live,
        arg(env = "LIFEGUARD_UPSTREAM_TOKEN", value_name = "TOKEN", hide_env_values = true), file();
    /// Reverse WebSocket: where backends (NapCat's websocketClients) dial in [default: off].
    reverse_listen: Option<SocketAddr> = None, from SocketAddr, via some, applied Restart,
        arg(env = "LIFEGUARD_REVERSE_LISTEN", value_name = "ADDR"), file();
    /// Reverse WebSocket: a bot endpoint lifeguard dials for each backend, ws://host:port/path (repeatable).
    reverse_url: Vec<ReverseUrl> = Vec::new(), from Vec<String>, via reverse_urls, applied Live,
        arg(env = "LIFEGUARD_REVERSE_URL", value_name = "URL", value_delimiter = ','),
        file(, deserialize_with = "de_string_or_list");
    /// Token lifeguard presents to the bots it dials [default: the access token].
    reverse_token: Option<Secret> = None, from String, via secret, applied Live,
        arg(env = "LIFEGUARD_REVERSE_TOKEN", value_name = "TOKEN", hide_env_values = true), file();
    /// Admin listener: status page, /live, /ready, /state, /transitions, /metrics, POST /disable, POST /enable [default: 127.0.0.1:6701].
    admin_listen: SocketAddr = default_addr(DEFAULT_ADMIN_LISTEN), from SocketAddr, via same, applied Restart,
        arg(env = "LIFEGUARD_ADMIN_LISTEN", value_name = "ADDR"), file();
    /// Token the admin listener asks for (Authorization: Bearer) on everything but /live, /ready and /metrics; unset = open.
    admin_token: Option<Secret> = None, from String, via secret, applied Live,
        arg(env = "LIFEGUARD_ADMIN_TOKEN", value_name = "TOKEN", hide_env_values = true), file();
    /// POST a JSON document to this http:// URL on every state transition (repeatable; env: comma-separated).
    notify_url: Vec<NotifyUrl> = Vec::new(), from Vec<String>, via notify_urls, applied Restart,
        arg(env = "LIFEGUARD_NOTIFY_URL", value_name = "URL", value_delimiter = ',', hide_env_values = true),
        file(, deserialize_with = "de_string_or_list");
    /// Time between active probes (a WebSocket handshake on the backend's /api) [default: 1s].
    probe_interval: Duration = DEFAULT_PROBE_INTERVAL, from Duration, via positive("probe_interval"), applied Live,
        arg(env = "LIFEGUARD_PROBE_INTERVAL", value_name = "DUR", value_parser = parse_duration),
        file(, deserialize_with = "de_duration");
    /// How long one probe may take [default: 1s].
    probe_timeout: Duration = DEFAULT_PROBE_TIMEOUT, from Duration, via positive("probe_timeout"), applied Live,
        arg(env = "LIFEGUARD_PROBE_TIMEOUT", value_name = "DUR", value_parser = parse_duration),
        file(, deserialize_with = "de_duration");
    /// Consecutive failed probes that mark the backend down [default: 2].
    fall: u32 = DEFAULT_FALL, from u32, via at_least("fall", 1), applied Live,
        arg(env = "LIFEGUARD_FALL", value_name = "N"), file();
    /// Consecutive successful probes that mark it up again [default: 2].
    rise: u32 = DEFAULT_RISE, from u32, via at_least("rise", 1), applied Live,
        arg(env = "LIFEGUARD_RISE", value_name = "N"), file();
    /// A session whose backend sends no heartbeat for FACTOR x its announced interval is dead [default: 2.5].
    heartbeat_grace: f64 = DEFAULT_HEARTBEAT_GRACE, from f64, via grace_factor, applied Live,
        arg(env = "LIFEGUARD_HEARTBEAT_GRACE", value_name = "FACTOR"), file();
    /// How long to wait for a client's Close reply before closing its TCP socket [default: 1s].
    close_timeout: Duration = DEFAULT_CLOSE_TIMEOUT, from Duration, via same, applied Live,
        arg(env = "LIFEGUARD_CLOSE_TIMEOUT", value_name = "DUR", value_parser = parse_duration),
        file(, deserialize_with = "de_duration");
    /// Shutdown budget on SIGTERM/SIGINT [default: 10s].
    drain_timeout: Duration = DEFAULT_DRAIN_TIMEOUT, from Duration, via same, applied Live,
        arg(env = "LIFEGUARD_DRAIN_TIMEOUT", value_name = "DUR", value_parser = parse_duration),
        file(, deserialize_with = "de_duration");
    /// How long to wait for the backend's TCP connect and handshake for a new client [default: 3s].
    connect_timeout: Duration = DEFAULT_CONNECT_TIMEOUT, from Duration, via positive("connect_timeout"), applied Live,
        arg(env = "LIFEGUARD_CONNECT_TIMEOUT", value_name = "DUR", value_parser = parse_duration),
        file(, deserialize_with = "de_duration");
    /// The backend's HTTP API server, http://host:port; requests on --listen that are not WebSocket upgrades go there.
    upstream_http: Option<HttpUrl> = None, from String, via upstream_http_url, applied Live,
        arg(env = "LIFEGUARD_UPSTREAM_HTTP", value_name = "URL"), file();
    /// How long one proxied HTTP API call may take before the bot gets 504 [default: 30s].
    http_timeout: Duration = DEFAULT_HTTP_TIMEOUT, from Duration, via positive("http_timeout"), applied Live,
        arg(env = "LIFEGUARD_HTTP_TIMEOUT", value_name = "DUR", value_parser = parse_duration),
        file(, deserialize_with = "de_duration");
    /// Where the backend POSTs its events (its HTTP POST client's URL points here); unset: no POST relay.
    post_listen: Option<SocketAddr> = None, from SocketAddr, via some, applied Restart,
        arg(env = "LIFEGUARD_POST_LISTEN", value_name = "ADDR"), file();
    /// Secret the backend signs its POSTs with (X-Signature, checked when set).
    post_secret: Option<Secret> = None, from String, via secret, applied Live,
        arg(env = "LIFEGUARD_POST_SECRET", value_name = "SECRET", hide_env_values = true), file();
    /// A bot's HTTP POST URL (repeatable); the first is the primary, whose answers are quick operations.
    post_url: Vec<HttpUrl> = Vec::new(), from Vec<String>, via post_urls, applied Restart,
        arg(env = "LIFEGUARD_POST_URL", value_name = "URL", value_delimiter = ','),
        file(, deserialize_with = "de_string_or_list");
    /// Secret lifeguard signs its POSTs to the bots with [default: the post secret].
    post_bot_secret: Option<Secret> = None, from String, via secret, applied Live,
        arg(env = "LIFEGUARD_POST_BOT_SECRET", value_name = "SECRET", hide_env_values = true), file();
    /// How long a bot may take to answer one POST; the backend waits that long for the primary's answer [default: 10s].
    post_timeout: Duration = DEFAULT_POST_TIMEOUT, from Duration, via positive("post_timeout"), applied Live,
        arg(env = "LIFEGUARD_POST_TIMEOUT", value_name = "DUR", value_parser = parse_duration),
        file(, deserialize_with = "de_duration");
    /// Events queued per bot while it is slow or failing; beyond that the oldest are dropped (counted) [default: 4096].
    post_queue: usize = DEFAULT_POST_QUEUE, from usize, via at_least("post_queue", 1), applied Live,
        arg(env = "LIFEGUARD_POST_QUEUE", value_name = "N"), file();
    /// How long an event is retried for a failing bot before it is dropped (counted) [default: 60s].
    post_retry_for: Duration = DEFAULT_POST_RETRY_FOR, from Duration, via positive("post_retry_for"), applied Live,
        arg(env = "LIFEGUARD_POST_RETRY_FOR", value_name = "DUR", value_parser = parse_duration),
        file(, deserialize_with = "de_duration");
    /// Largest message a client may send, in bytes (larger: Close 1009), and largest HTTP body read (larger: 413) [default: 67108864].
    max_message_size: usize = DEFAULT_MAX_MESSAGE_SIZE, from usize, via at_least("max_message_size", 1024), applied Live,
        arg(env = "LIFEGUARD_MAX_MESSAGE_SIZE", value_name = "BYTES"), file();
    /// NapCat's onebot11_<uin>.json (or its config directory) to follow `enable` in.
    napcat_config: Option<PathBuf> = None, from PathBuf, via some, applied Live,
        arg(env = "LIFEGUARD_NAPCAT_CONFIG", value_name = "PATH"), file();
    /// Which websocketServers entry (by name) of the NapCat config [default: the one whose port matches --upstream].
    napcat_server: Option<String> = None, from String, via name("napcat_server", "match by port"), applied Live,
        arg(env = "LIFEGUARD_NAPCAT_SERVER", value_name = "NAME"), file();
    /// Treat a heartbeat with status.online == false (QQ logged out) as down [default: true].
    offline_is_down: bool = true, from bool, via same, applied Live,
        arg(env = "LIFEGUARD_OFFLINE_IS_DOWN", value_name = "BOOL"), file();
    /// Send a client a heartbeat when nothing was sent to it for DUR [default: off].
    client_heartbeat: Option<Duration> = None, from Duration, via positive_or_off("client_heartbeat"), applied Live,
        arg(env = "LIFEGUARD_CLIENT_HEARTBEAT", value_name = "DUR", value_parser = parse_duration),
        file(, deserialize_with = "de_duration");
    /// Client connections held at once, handshaking or relaying; more get 503 [default: (open-file limit - 192) / 2].
    max_connections: Option<u32> = None, from u32, via at_least_some("max_connections", 1), applied Live,
        arg(env = "LIFEGUARD_MAX_CONNECTIONS", value_name = "N"), file();
    /// Client connections held at once from one IP address; more get 503 [default: half of --max-connections].
    max_connections_per_ip: Option<u32> = None, from u32, via at_least_some("max_connections_per_ip", 1), applied Live,
        arg(env = "LIFEGUARD_MAX_CONNECTIONS_PER_IP", value_name = "N"), file();
    /// How long a new client connection may take to send its whole handshake request [default: 3s].
    handshake_timeout: Duration = DEFAULT_HANDSHAKE_TIMEOUT, from Duration, via positive("handshake_timeout"), applied Live,
        arg(env = "LIFEGUARD_HANDSHAKE_TIMEOUT", value_name = "DUR", value_parser = parse_duration),
        file(, deserialize_with = "de_duration");
    /// A client that takes nothing for DUR while frames wait for it is closed alone (1008, cause client-stalled) [default: 30s].
    client_stall_timeout: Duration = DEFAULT_CLIENT_STALL_TIMEOUT, from Duration, via positive("client_stall_timeout"), applied Live,
        arg(env = "LIFEGUARD_CLIENT_STALL_TIMEOUT", value_name = "DUR", value_parser = parse_duration),
        file(, deserialize_with = "de_duration");
    /// Log format [default: text]; the filter comes from RUST_LOG (default: info).
    log_format: LogFormat = LogFormat::Text, from LogFormat, via same, applied Restart,
        arg(env = "LIFEGUARD_LOG_FORMAT", value_name = "FORMAT"), file();
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

impl Settings {
    /// Read `--config` (when given) and resolve everything; what `main`, `check-config`
    /// and every reload use. The file is parsed once.
    ///
    /// Every problem is reported, not only the first: unreadable file, each bad key (with
    /// its line), each bad value (with the flag or the file line it came from).
    pub fn load(args: &RunArgs) -> Result<Settings, ConfigError> {
        Settings::load_with_source(args).map(|(s, _)| s)
    }

    /// [`Settings::load`], and the config file's bytes the settings came from (`None`
    /// without `--config`): what a reload compares later versions of the file with.
    pub fn load_with_source(args: &RunArgs) -> Result<(Settings, Option<Vec<u8>>), ConfigError> {
        let Some(path) = &args.config else {
            return Settings::resolve(args, None).map(|s| (s, None));
        };
        let mut parsed = file::read(path)?;
        let bytes = std::mem::take(&mut parsed.bytes);
        let file_problems = parsed.problems.iter().map(|message| ConfigError::File {
            path: path.to_path_buf(),
            message: message.clone(),
        });
        if parsed.syntax_error {
            // Nothing in the file could be read: its syntax error is the one problem.
            return Err(ConfigError::many(file_problems.collect()));
        }
        let mut problems: Vec<ConfigError> = file_problems.collect();
        match Settings::resolve_located(args, &parsed.config, Some((path, &parsed))) {
            Ok(s) if problems.is_empty() => Ok((s, Some(bytes))),
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
        let empty = FileConfig::default();
        Settings::resolve_located(args, file.unwrap_or(&empty), None)
    }

    fn resolve_located(
        args: &RunArgs,
        file: &FileConfig,
        src: Option<(&Path, &file::Parsed)>,
    ) -> Result<Settings, ConfigError> {
        let mut bad = Vec::new();
        let mut s = Settings::layered(args, file, &mut bad);
        let mut problems: Vec<ConfigError> = bad
            .into_iter()
            .map(|(key, by_flag, message)| located(by_flag, key, src, message))
            .collect();
        let gives = |key: &str, in_file: bool| args.gives(key) || in_file;
        problems.splice(0..0, transport_problems(args, file));
        problems.extend(
            reverse_combination(&s, args, file)
                .into_iter()
                .map(ConfigError::Invalid),
        );
        if !gives("reverse_token", file.reverse_token.is_some()) {
            s.reverse_token = s.access_token.clone();
        }
        // The upstream token defaults to the access token, except when NapCat's file is
        // followed: then NapCat's own token for the followed server applies once its file
        // is read, and until then lifeguard presents none.
        s.upstream_token_explicit = args.gives("upstream_token") || file.upstream_token.is_some();
        if !s.upstream_token_explicit && s.napcat_config.is_none() {
            s.upstream_token = s.access_token.clone();
        }
        // The bots' POSTs are signed like the backend's unless told otherwise.
        if !args.gives("post_bot_secret") && file.post_bot_secret.is_none() {
            s.post_bot_secret = s.post_secret.clone();
        }
        if problems.is_empty() {
            Ok(s)
        } else {
            Err(ConfigError::many(problems))
        }
    }

    /// The settings as `check-config` prints them: one `key = value` a line, secrets masked.
    pub fn render(&self) -> String {
        self.entries()
            .iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect()
    }

    /// Keys that differ between `self` and `new` and apply at once.
    pub fn live_changes(&self, new: &Settings) -> Vec<&'static str> {
        self.changes(new, Applied::Live)
    }

    /// Keys that differ between `self` and `new` but only take effect on restart.
    pub fn restart_changes(&self, new: &Settings) -> Vec<&'static str> {
        self.changes(new, Applied::Restart)
    }

    fn changes(&self, new: &Settings, when: Applied) -> Vec<&'static str> {
        self.changed_keys(new)
            .into_iter()
            .filter(|k| KEYS.iter().any(|(key, a)| key == k && *a == when))
            .collect()
    }
}

/// Reverse WebSocket settings that only make sense together, and listeners that would
/// collide: one message per problem.
fn reverse_combination(s: &Settings, args: &RunArgs, file: &FileConfig) -> Vec<String> {
    let mut out = Vec::new();
    let urls_given = args.gives("reverse_url") || file.reverse_url.is_some();
    match s.reverse_listen {
        None => {
            if urls_given {
                out.push(
                    "--reverse-url needs --reverse-listen ADDR (where the backend dials in)"
                        .to_string(),
                );
            }
            if args.gives("reverse_token") || file.reverse_token.is_some() {
                out.push("--reverse-token needs --reverse-listen ADDR (it is what lifeguard presents to the bots it dials)".to_string());
            }
        }
        Some(addr) => {
            if s.reverse_url.is_empty() {
                out.push(format!(
                    "--reverse-listen {addr} needs at least one --reverse-url ws://bot:port/path (the bot endpoint lifeguard dials for each backend)"
                ));
            }
            let collides = |other: SocketAddr| {
                other.port() == addr.port()
                    && addr.port() != 0
                    && (other.ip() == addr.ip()
                        || other.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            };
            for (flag, other) in [("--listen", s.listen), ("--admin-listen", s.admin_listen)] {
                if collides(other) {
                    out.push(format!("--reverse-listen {addr} collides with {flag} {other}: give each its own port"));
                }
            }
        }
    }
    out
}

/// Which transports are configured, checked in one place: at least one, and each one whole.
/// A key counts as given when it was given at all (a bad value is reported by its own
/// conversion, not as missing).
fn transport_problems(args: &RunArgs, file: &FileConfig) -> Vec<ConfigError> {
    let given = |key: &str, in_file: bool| args.gives(key) || in_file;
    let upstream = given("upstream", file.upstream.is_some());
    let upstream_http = given("upstream_http", file.upstream_http.is_some());
    let post_listen = given("post_listen", file.post_listen.is_some());
    let reverse_listen = given("reverse_listen", file.reverse_listen.is_some());
    let post_url = args.post_url.as_ref().or(file.post_url.as_ref());
    let post_urls = post_url.is_some_and(|u| !u.is_empty());
    let mut problems = Vec::new();
    if !(upstream || upstream_http || post_listen || reverse_listen) {
        problems.push(ConfigError::Invalid(
            "missing upstream: pass --upstream ws://host:port (the backend's forward WebSocket: \
             lifeguard dials it), --reverse-listen ADDR with --reverse-url URL (reverse WebSocket: \
             the backend dials lifeguard, lifeguard dials the bots), --upstream-http \
             http://host:port (its HTTP API) or --post-listen ADDR with --post-url URL (its HTTP \
             POST), as flags, LIFEGUARD_* variables or config file keys"
                .into(),
        ));
    }
    if post_listen && !post_urls {
        problems.push(ConfigError::Invalid(
            "post_listen needs at least one --post-url http://bot:port/path to relay the events to"
                .into(),
        ));
    }
    if post_urls && !post_listen {
        problems.push(ConfigError::Invalid(
            "post_url needs --post-listen ADDR (where the backend POSTs its events)".into(),
        ));
    }
    problems
}

/// A bad value, named by where it came from: the flag (or its env var), or the file's line.
fn located(
    by_flag: bool,
    key: &str,
    src: Option<(&Path, &file::Parsed)>,
    message: String,
) -> ConfigError {
    if by_flag {
        let flag = key.replace('_', "-");
        let env = format!("LIFEGUARD_{}", key.to_uppercase());
        return ConfigError::Invalid(format!("--{flag} (or {env}): {message}"));
    }
    match src {
        Some((path, parsed)) => ConfigError::File {
            path: path.to_path_buf(),
            message: match parsed.line_of(key) {
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
    fn http_urls() {
        let u = HttpUrl::parse("http://napcat:3000").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path_and_query.as_str()),
            ("napcat", 3000, "/")
        );
        assert_eq!(
            (u.to_string(), u.full()),
            ("http://napcat:3000".into(), "http://napcat:3000/".into())
        );
        let u = HttpUrl::parse("http://[::1]:8080/onebot/v11/?k=s3cret").unwrap();
        assert_eq!(u.base_path(), "/onebot/v11");
        assert_eq!(u.full(), "http://[::1]:8080/onebot/v11/?k=s3cret");
        assert_eq!(
            u.to_string(),
            "http://[::1]:8080/onebot/v11/?***",
            "a query may hold a token"
        );
        assert_eq!(
            HttpUrl::parse("http://h?x=1").unwrap().path_and_query,
            "/?x=1"
        );
        assert_eq!(HttpUrl::parse("http://h").unwrap().port, 80);
        for bad in [
            "https://h:1",
            "ws://h:1",
            "http://:1",
            "http://h:0",
            "http://u:p@h:1/",
            "http://h/#x",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn http_transports_count_as_upstreams_and_come_whole() {
        let http_only = RunArgs {
            upstream_http: Some("http://127.0.0.1:3000".into()),
            ..Default::default()
        };
        let s = Settings::resolve(&http_only, None).unwrap();
        assert_eq!(s.upstream, None);
        assert!(Settings::resolve(
            &RunArgs {
                upstream_http: Some("http://h:1?q=1".into()),
                ..Default::default()
            },
            None
        )
        .is_err());
        let mut post = RunArgs {
            post_listen: Some("127.0.0.1:5700".parse().unwrap()),
            ..Default::default()
        };
        let err = Settings::resolve(&post, None).unwrap_err().to_string();
        assert!(
            err.contains("post_listen needs at least one --post-url"),
            "{err}"
        );
        post.post_url = Some(vec![
            "http://bot:8080/onebot/v11/".into(),
            "http://other/".into(),
        ]);
        post.post_secret = Some("in".into());
        let s = Settings::resolve(&post, None).unwrap();
        assert_eq!(s.post_url.len(), 2);
        assert_eq!(
            s.post_bot_secret.as_ref().unwrap().expose(),
            "in",
            "defaults to the post secret"
        );
        post.post_bot_secret = Some(String::new());
        assert_eq!(
            Settings::resolve(&post, None).unwrap().post_bot_secret,
            None,
            "\"\" signs nothing"
        );
        let urls_alone = RunArgs {
            upstream: Some("ws://h:1".into()),
            post_url: Some(vec!["http://bot/".into()]),
            ..Default::default()
        };
        assert!(Settings::resolve(&urls_alone, None)
            .unwrap_err()
            .to_string()
            .contains("--post-listen"));
        // One URL or a list in the file.
        let f = parse_file_config("post_listen = \"127.0.0.1:5700\"\npost_url = \"http://bot/\"\n")
            .unwrap();
        assert_eq!(
            Settings::resolve(&RunArgs::default(), Some(&f))
                .unwrap()
                .post_url
                .len(),
            1
        );
        let f = parse_file_config(
            "post_listen = \"127.0.0.1:5700\"\npost_url = [\"http://a/\", \"http://b/\"]\n",
        )
        .unwrap();
        assert_eq!(
            Settings::resolve(&RunArgs::default(), Some(&f))
                .unwrap()
                .post_url
                .len(),
            2
        );
        let rendered = Settings::resolve(&post, None).unwrap().render();
        assert!(
            rendered.contains("post_url = http://bot:8080/onebot/v11/, http://other"),
            "{rendered}"
        );
        assert!(
            !rendered.contains("in\n") && rendered.contains("post_secret = ***"),
            "{rendered}"
        );
    }

    #[test]
    fn precedence_flag_over_file_over_default() {
        let file =
            parse_file_config("upstream = \"ws://file:1\"\nfall = 5\nprobe_interval = \"250ms\"\n")
                .unwrap();
        let mut a = args("ws://flag:2");
        a.fall = Some(7);
        let s = Settings::resolve(&a, Some(&file)).unwrap();
        assert_eq!(s.upstream.unwrap().host, "flag");
        assert_eq!(s.fall, 7);
        assert_eq!(s.probe_interval, Duration::from_millis(250));
        assert_eq!(s.rise, DEFAULT_RISE);
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
