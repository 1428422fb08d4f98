//! Following NapCat's own config file (`--napcat-config`, `--napcat-server`).
//!
//! NapCat keeps its OneBot settings in `<workdir>/config/onebot11_<uin>.json`; its WebUI
//! rewrites that file when the operator switches the forward WebSocket server off or on,
//! moves its port or changes its token. lifeguard reads the file at start, then again on
//! every change (a `notify` watch of the directory, debounced by [`DEBOUNCE`]), with a
//! poll every [`POLL_EVERY`] as a fallback, and:
//!
//! - `enable: false` → the backend goes down with cause `napcat-config` (the disable
//!   sequence, Close 1012, 503 for new handshakes); `enable: true` → back to following the
//!   probes (up once they pass). An entry that was followed and disappears from the file
//!   counts as disabled (the server is gone).
//! - `port` → the upstream's port (the host stays what `--upstream` says).
//! - `token` → the token lifeguard presents to the backend, unless the operator set
//!   `--upstream-token` (flag, env or file) explicitly: then theirs is kept and a differing
//!   NapCat token is reported once, without the token.
//!
//! Which server: both of NapCat's formats are understood. v4.1+ has a list,
//! `network.websocketServers[]`: the entry named `--napcat-server`, or else the one whose
//! `port` is the upstream's port (an enabled one first). Once found, an entry is followed
//! by its name, so a port change does not lose it. The older flat format (v3.1.10 to
//! v4.0.x) has one server, `ws` (`ws.enable`, `ws.port`, top-level `token`); a server name
//! is ignored there.
//!
//! Which file: `--napcat-config` may name the file itself, or NapCat's config directory.
//! For a directory, the candidates are its `onebot11_*.json` files (NapCat's per-account
//! files; the `onebot11.json` template is not one); the one holding the matching server
//! is followed, the most recently modified if several do. A followed file that disappears
//! is searched for again.
//!
//! NapCat writes in place, not atomically: a read that does not parse is retried
//! ([`RETRIES`] times, [`RETRY_GAP`] apart) and, if it still does not parse, ignored until
//! the file changes again. A half-written file is never acted on. A missing file changes
//! nothing either (NapCat not started yet, or a rename in progress).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::files::{debounce, same_name, wait_changed, watch_files, FileEvents};
use crate::config::{Secret, Settings};
use crate::state::{Lane, Overlay, State};

/// Quiet time after the last file event before NapCat's file is read.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// The fallback poll.
pub const POLL_EVERY: Duration = Duration::from_secs(2);
/// Extra reads of a file that does not parse, before giving up on that version of it.
pub const RETRIES: u32 = 3;
pub const RETRY_GAP: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------------------
// NapCat's file formats.

/// One forward WebSocket server as NapCat's file describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsServer {
    /// `name` (v4 list); `None` for the flat format's `ws`.
    pub name: Option<String>,
    pub enable: Option<bool>,
    pub port: Option<u16>,
    pub token: Option<String>,
}

/// A parsed NapCat OneBot config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NapcatFile {
    /// v4.1+: `network.websocketServers[]`.
    V4(Vec<WsServer>),
    /// v3.1.10 to v4.0.x: `ws` and a top-level `token`.
    Flat(WsServer),
}

/// Parse NapCat's OneBot config. Errors: not JSON (half-written), or neither format.
pub fn parse(text: &str) -> Result<NapcatFile, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let port = |o: &Value| {
        o.get("port")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
    };
    let string = |o: &Value, k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
    if let Some(list) = v.pointer("/network/websocketServers") {
        let list = list
            .as_array()
            .ok_or("network.websocketServers is not a list")?;
        return Ok(NapcatFile::V4(
            list.iter()
                .filter(|e| e.is_object())
                .map(|e| WsServer {
                    name: string(e, "name"),
                    enable: e.get("enable").and_then(Value::as_bool),
                    port: port(e),
                    token: string(e, "token"),
                })
                .collect(),
        ));
    }
    if let Some(ws) = v.get("ws").filter(|w| w.is_object()) {
        return Ok(NapcatFile::Flat(WsServer {
            name: None,
            enable: ws.get("enable").and_then(Value::as_bool),
            port: port(ws),
            token: string(&v, "token"),
        }));
    }
    Err("neither network.websocketServers (NapCat v4) nor ws (older NapCat) is in it".into())
}

/// Which server a follower tracks.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Named(String),
    Flat,
}

impl NapcatFile {
    /// The server `--napcat-server` names, or else the one on `port` (enabled first).
    fn select(&self, name: Option<&str>, port: u16) -> Option<(Key, WsServer)> {
        match self {
            NapcatFile::Flat(ws) => {
                (name.is_some() || ws.port == Some(port)).then(|| (Key::Flat, ws.clone()))
            }
            NapcatFile::V4(list) => {
                let hit = match name {
                    Some(n) => list.iter().find(|e| e.name.as_deref() == Some(n)),
                    None => list
                        .iter()
                        .filter(|e| e.port == Some(port))
                        .max_by_key(|e| e.enable == Some(true)),
                }?;
                let key = match &hit.name {
                    Some(n) => Key::Named(n.clone()),
                    None => return Some((Key::Flat, hit.clone())),
                };
                Some((key, hit.clone()))
            }
        }
    }

    /// The tracked server now: `Ok(None)` when it is gone from the file.
    fn find(&self, key: &Key, port: u16) -> Option<WsServer> {
        match (self, key) {
            (NapcatFile::V4(list), Key::Named(n)) => {
                list.iter().find(|e| e.name.as_deref() == Some(n)).cloned()
            }
            (NapcatFile::Flat(ws), _) => Some(ws.clone()),
            (NapcatFile::V4(_), Key::Flat) => self.select(None, port).map(|(_, s)| s),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The follower.

/// Follow `napcat_config` for as long as the proxy runs, as a background task of the
/// state's drain, retargeting when a reload changes `napcat_config` or `napcat_server`
/// (and standing by while it is unset). The returned receiver fires once the file has
/// been read and acted on the first time (at once when none is configured): nothing may
/// talk to the backend before, or it would present a token NapCat's file overrides.
pub fn start(state: &Arc<State>) -> oneshot::Receiver<()> {
    let (first_tx, first_rx) = oneshot::channel();
    state.drain.spawn_background(run(state.clone(), first_tx));
    first_rx
}

async fn run(state: Arc<State>, first: oneshot::Sender<()>) {
    let mut first = Some(first);
    let mut rx = state.subscribe();
    let stop = state.drain.hard_stop_token();
    loop {
        let s = state.settings();
        let target = (s.napcat_config.clone(), s.napcat_server.clone());
        match &target.0 {
            None => {
                // Not (or no longer) following: NapCat's file has no say.
                state.clear_napcat();
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
            }
            Some(path) => {
                let mut f = Follower::new(state.clone(), path.clone(), target.1.clone());
                f.run(&mut rx, &target, &stop, first.take()).await;
            }
        }
        // Wait for a change of target (or stop).
        loop {
            if stop.is_cancelled() {
                return;
            }
            let s = state.settings();
            if (s.napcat_config.clone(), s.napcat_server.clone()) != target {
                break;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
    }
}

struct Follower {
    state: Arc<State>,
    path: PathBuf,
    server: Option<String>,
    /// The file and server being followed, once found.
    tracked: Option<(PathBuf, Key)>,
    /// The bytes of the last version read (acted on, or ignored as unparsable).
    last_bytes: Option<Vec<u8>>,
    /// `enable` last acted on.
    enabled: Option<bool>,
    /// Why the server is off, as last told to the state (`None`: on).
    off: Option<String>,
    /// The last warning logged, so a steady problem is logged once.
    last_warning: Option<String>,
    token_note_logged: bool,
}

/// One read of a file.
enum Read {
    Missing,
    Unreadable(String),
    Unparsable(Vec<u8>, String),
    Parsed(Vec<u8>, NapcatFile),
}

async fn read_file(path: &Path) -> Read {
    let mut attempt = 0;
    loop {
        let bytes = match tokio::fs::read(path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Read::Missing,
            Err(e) => return Read::Unreadable(e.to_string()),
        };
        let text = String::from_utf8_lossy(&bytes);
        match parse(&text) {
            Ok(f) => return Read::Parsed(bytes, f),
            // Half-written (NapCat writes in place): look again shortly.
            Err(e) if attempt < RETRIES => {
                let _ = e;
                attempt += 1;
                tokio::time::sleep(RETRY_GAP).await;
            }
            Err(e) => return Read::Unparsable(bytes, e),
        }
    }
}

fn is_candidate(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("onebot11_") && n.ends_with(".json"))
}

fn display_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

impl Follower {
    fn new(state: Arc<State>, path: PathBuf, server: Option<String>) -> Follower {
        Follower {
            state,
            path,
            server,
            tracked: None,
            last_bytes: None,
            enabled: None,
            off: None,
            last_warning: None,
            token_note_logged: false,
        }
    }

    async fn run(
        &mut self,
        rx: &mut tokio::sync::watch::Receiver<Arc<crate::state::Snapshot>>,
        target: &(Option<PathBuf>, Option<String>),
        stop: &CancellationToken,
        first: Option<oneshot::Sender<()>>,
    ) {
        let dir_mode = self.path.is_dir();
        let filter: Box<dyn Fn(&Path) -> bool + Send> = if dir_mode {
            Box::new(is_candidate)
        } else {
            Box::new(same_name(&self.path))
        };
        let events: Option<FileEvents> = match watch_files(&self.path, filter) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    path = %self.path.display(),
                    error = %e,
                    "cannot watch NapCat's config; polling it every {}s",
                    POLL_EVERY.as_secs()
                );
                None
            }
        };
        tracing::info!(
            path = %self.path.display(),
            server = self.server.as_deref().unwrap_or("(by port)"),
            "following NapCat's config"
        );
        let changed = events.as_ref().map(|e| e.changed.clone());
        self.check().await;
        if let Some(tx) = first {
            let _ = tx.send(());
        }
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.reset();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = wait_changed(changed.as_deref()) => {
                    if !debounce(changed.as_deref(), DEBOUNCE, stop).await {
                        return;
                    }
                }
                _ = poll.tick() => {}
                r = rx.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let s = rx.borrow_and_update().settings.clone();
                    if (s.napcat_config.clone(), s.napcat_server.clone()) != *target {
                        return;
                    }
                    continue;
                }
            }
            self.check().await;
        }
    }

    fn warn_once(&mut self, msg: String) {
        if self.last_warning.as_ref() != Some(&msg) {
            tracing::warn!(path = %self.path.display(), "{msg}");
            self.last_warning = Some(msg);
        }
    }

    fn upstream_port(&self) -> u16 {
        self.state
            .settings()
            .upstream
            .as_ref()
            .map(|u| u.port)
            .unwrap_or(0)
    }

    /// Read the followed file (finding it first if needed) and act on what changed.
    async fn check(&mut self) {
        if let Some((file, key)) = self.tracked.clone() {
            match read_file(&file).await {
                Read::Missing if self.path.is_dir() => {
                    // Gone from the directory: look for the server elsewhere.
                    self.tracked = None;
                    self.last_bytes = None;
                }
                Read::Missing => {
                    self.warn_once(format!(
                        "{} is missing; keeping the last state until it is back",
                        file.display()
                    ));
                    self.last_bytes = None;
                    return;
                }
                Read::Unreadable(e) => {
                    self.warn_once(format!("cannot read {}: {e}", file.display()));
                    return;
                }
                Read::Unparsable(bytes, e) => {
                    if self.last_bytes.as_ref() != Some(&bytes) {
                        self.last_bytes = Some(bytes);
                        self.warn_once(format!(
                            "{} does not parse ({e}); ignoring this version",
                            file.display()
                        ));
                    }
                    return;
                }
                Read::Parsed(bytes, parsed) => {
                    if self.last_bytes.as_ref() == Some(&bytes) {
                        return;
                    }
                    self.last_bytes = Some(bytes);
                    let port = self.upstream_port();
                    let server = parsed.find(&key, port);
                    self.act(&file, &key, server);
                    return;
                }
            }
        }
        self.find_and_act().await;
    }

    /// Look for the server to follow (in the file, or among the directory's candidates).
    async fn find_and_act(&mut self) {
        let files: Vec<PathBuf> = if self.path.is_dir() {
            match std::fs::read_dir(&self.path) {
                Ok(rd) => rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| is_candidate(p) && p.is_file())
                    .collect(),
                Err(e) => {
                    self.warn_once(format!("cannot list {}: {e}", self.path.display()));
                    return;
                }
            }
        } else {
            vec![self.path.clone()]
        };
        let port = self.upstream_port();
        let mut best: Option<(SystemTime, PathBuf, Key, WsServer, Vec<u8>)> = None;
        let mut problems = Vec::new();
        for file in files {
            match read_file(&file).await {
                Read::Missing => problems.push(format!("{} does not exist (yet)", file.display())),
                Read::Unreadable(e) => problems.push(format!("cannot read {}: {e}", file.display())),
                Read::Unparsable(bytes, e) => {
                    problems.push(format!("{} does not parse ({e}); ignoring this version", file.display()));
                    if !self.path.is_dir() {
                        self.last_bytes = Some(bytes);
                    }
                }
                Read::Parsed(bytes, parsed) => {
                    match parsed.select(self.server.as_deref(), port) {
                        Some((key, server)) => {
                            let mtime = std::fs::metadata(&file)
                                .and_then(|m| m.modified())
                                .unwrap_or(SystemTime::UNIX_EPOCH);
                            let newer = match &best {
                                Some(b) => mtime > b.0,
                                None => true,
                            };
                            if newer {
                                best = Some((mtime, file, key, server, bytes));
                            }
                        }
                        None => problems.push(match &self.server {
                            Some(n) => format!("{} has no websocketServers entry named {n:?}", file.display()),
                            None => format!(
                                "{} has no forward WebSocket server on port {port} (the upstream's); pass --napcat-server NAME",
                                file.display()
                            ),
                        }),
                    }
                }
            }
        }
        match best {
            Some((_, file, key, server, bytes)) => {
                tracing::info!(
                    file = %file.display(),
                    server = match &key { Key::Named(n) => n.as_str(), Key::Flat => "ws" },
                    "following NapCat's forward WebSocket server"
                );
                self.last_warning = None;
                self.last_bytes = Some(bytes);
                self.tracked = Some((file.clone(), key.clone()));
                self.act(&file, &key, Some(server));
            }
            None => {
                let msg = if problems.is_empty() {
                    format!("no onebot11_*.json in {}", self.path.display())
                } else {
                    problems.join("; ")
                };
                self.warn_once(format!(
                    "{msg}; not following NapCat's config until that changes"
                ));
            }
        }
    }

    /// Act on the followed server's current description (`None`: removed from the file):
    /// whether it is on, and its port and token, in one change of the state.
    fn act(&mut self, file: &Path, key: &Key, server: Option<WsServer>) {
        let label = match key {
            Key::Named(n) => format!("websocketServers {n:?}"),
            Key::Flat => "ws".to_string(),
        };
        let fname = display_name(file);
        let current = self.state.napcat_overlay();
        let mut next = current.clone();
        let mut enabled = self.enabled;
        let mut off = self.off.clone();
        match &server {
            None => {
                if enabled != Some(false) {
                    let reason =
                        format!("NapCat's WebSocket server {label} was removed from {fname}");
                    tracing::warn!(file = %file.display(), server = %label, "{reason}");
                    enabled = Some(false);
                    off = Some(reason);
                }
            }
            Some(server) => {
                match server.enable {
                    None => self.warn_once(format!(
                        "{label} in {} has no `enable`; not acting on it",
                        file.display()
                    )),
                    Some(enable) if enabled != Some(enable) => {
                        if !(enabled.is_none() && enable) {
                            tracing::info!(
                                file = %file.display(),
                                server = %label,
                                enable,
                                "NapCat's config: the forward WebSocket server was {}",
                                if enable { "enabled (up again once probes pass)" } else { "disabled" }
                            );
                        }
                        enabled = Some(enable);
                        off = (!enable).then(|| {
                            format!("NapCat's WebSocket server {label} is disabled in {fname}")
                        });
                    }
                    Some(_) => {}
                }
                // Port and token: follow them.
                let token = server
                    .token
                    .as_ref()
                    .map(|t| Some(Secret::new(t.clone())).filter(|s| !s.expose().is_empty()));
                next = Overlay {
                    port: server.port.or(current.port),
                    token: token.or(current.token.clone()),
                };
            }
        }
        if next == current && off == self.off {
            self.enabled = enabled;
            return;
        }
        let switched_on = self.off.is_some() && off.is_none();
        self.enabled = enabled;
        self.off = off.clone();
        let change = self.state.set_napcat(Lane::Forward, next.clone(), off);
        if switched_on {
            self.state.kick_probe();
        }
        let (old, new) = (&change.before, &change.after);
        let port = |s: &Settings| s.upstream.as_ref().map(|u| u.port);
        if port(old) != port(new) {
            tracing::info!(
                file = %file.display(),
                server = %label,
                from = port(old).unwrap_or(0),
                to = port(new).unwrap_or(0),
                "NapCat's config: following its forward WebSocket server to a new port"
            );
        }
        if old.upstream_token != new.upstream_token {
            tracing::info!(
                file = %file.display(),
                server = %label,
                "NapCat's config: following its token for the backend connection"
            );
        }
        if new.upstream_token_explicit && next.token.is_some() && next.token != current.token {
            let differs =
                next.token.as_ref().map(|t| t.as_ref()) != Some(new.upstream_token.as_ref());
            if differs && !self.token_note_logged {
                self.token_note_logged = true;
                tracing::warn!(
                    file = %file.display(),
                    server = %label,
                    "NapCat's token differs from --upstream-token; keeping --upstream-token (set explicitly)"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_parse() {
        let v4 = r#"{"network":{"websocketServers":[{"enable":true,"name":"ws","port":3001,"token":"t"},{"enable":false,"name":"other","port":3002,"token":""}]}}"#;
        let f = parse(v4).unwrap();
        let (key, s) = f.select(None, 3002).unwrap();
        assert_eq!(key, Key::Named("other".into()));
        assert_eq!((s.enable, s.port), (Some(false), Some(3002)));
        let (key, s) = f.select(Some("ws"), 1).unwrap();
        assert_eq!(key, Key::Named("ws".into()));
        assert_eq!(s.token.as_deref(), Some("t"));
        assert!(f.select(None, 9).is_none());
        assert!(f.find(&Key::Named("gone".into()), 3001).is_none());

        let flat = r#"{"http":{"enable":false,"port":3000},"ws":{"enable":false,"host":"","port":3001},"token":"x"}"#;
        let f = parse(flat).unwrap();
        let (key, s) = f.select(None, 3001).unwrap();
        assert_eq!(key, Key::Flat);
        assert_eq!((s.enable, s.token.as_deref()), (Some(false), Some("x")));
        assert!(f.select(None, 3002).is_none());
        assert!(f.select(Some("anything"), 3002).is_some());
    }

    #[test]
    fn half_written_files_do_not_parse() {
        let full =
            r#"{"network":{"websocketServers":[{"enable":false,"name":"ws","port":3001}]},"x":1}"#;
        for cut in 0..full.len() {
            assert!(parse(&full[..cut]).is_err(), "prefix {cut} parsed");
        }
        assert!(parse(full).is_ok());
        assert!(parse(r#"{"foo":1}"#).is_err());
    }
}
