//! Following NapCat's own config file (`--napcat-config`, `--napcat-server`).
//!
//! NapCat keeps its OneBot settings in `<workdir>/config/onebot11_<uin>.json`; its WebUI
//! rewrites that file when the operator switches one of its network entries off or on,
//! moves a port or changes a token. lifeguard reads the file at start (before anything
//! talks to the backend), then again on every change (a `notify` watch of the directory,
//! debounced by [`DEBOUNCE`]), with a poll every [`POLL_EVERY`] as a fallback. For each
//! transport lifeguard relays, it follows the matching entry ([`wanted`]):
//!
//! - `enable: false` → that transport's lane goes down with cause `napcat-config` (the
//!   disable sequence, Close 1012, 503 for new handshakes); `enable: true` → back to
//!   following its health. An entry that was followed and disappears from the file counts
//!   as disabled (the server is gone).
//! - the forward WebSocket server's `port` → the upstream's port (the host stays what
//!   `--upstream` says), and its `token` → the token lifeguard presents to the backend,
//!   unless the operator set `--upstream-token` explicitly: then theirs is kept and a
//!   differing NapCat token is reported once, without the token.
//!
//! Which entry: both of NapCat's formats are understood. v4.1+ has lists
//! (`network.websocketServers[]`, `websocketClients[]`, `httpServers[]`, `httpClients[]`):
//! the entry named `--napcat-server` (forward WebSocket), or else a server on the port
//! lifeguard talks to (a client whose URL points at the port lifeguard listens on), an
//! enabled one first. Once found, an entry is followed by its name, so a port change does
//! not lose it. The older flat format (v3.1.10 to v4.0.x) has one entry of each kind:
//! `ws`, `reverseWs`, `http` and `http.enablePost`/`postUrls`, with a top-level `token`.
//!
//! Which file: `--napcat-config` may name the file itself, or NapCat's config directory.
//! For a directory, the candidates are its `onebot11_*.json` files (NapCat's per-account
//! files; the `onebot11.json` template is not one); the one holding the first wanted
//! entry is followed, the most recently modified if several do. A followed file that
//! disappears is searched for again.
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

/// The kinds of network entry NapCat has, one per transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Forward WebSocket server (bots dial it).
    WsServer,
    /// Reverse WebSocket client (it dials the bots).
    WsClient,
    /// HTTP API server.
    HttpServer,
    /// HTTP POST client (it posts events).
    HttpClient,
}

impl EntryKind {
    const ALL: [EntryKind; 4] = [
        EntryKind::WsServer,
        EntryKind::WsClient,
        EntryKind::HttpServer,
        EntryKind::HttpClient,
    ];

    /// The v4 list it lives in.
    fn list(self) -> &'static str {
        match self {
            EntryKind::WsServer => "websocketServers",
            EntryKind::WsClient => "websocketClients",
            EntryKind::HttpServer => "httpServers",
            EntryKind::HttpClient => "httpClients",
        }
    }

    /// Its name in the flat format.
    fn flat(self) -> &'static str {
        match self {
            EntryKind::WsServer => "ws",
            EntryKind::WsClient => "reverseWs",
            EntryKind::HttpServer => "http",
            EntryKind::HttpClient => "http (enablePost)",
        }
    }

    /// What it is, for log lines and reasons.
    fn what(self) -> &'static str {
        match self {
            EntryKind::WsServer => "WebSocket server",
            EntryKind::WsClient => "reverse WebSocket client",
            EntryKind::HttpServer => "HTTP server",
            EntryKind::HttpClient => "HTTP POST client",
        }
    }

    fn is_server(self) -> bool {
        matches!(self, EntryKind::WsServer | EntryKind::HttpServer)
    }
}

/// One network entry as NapCat's file describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    /// `name` (v4 lists); `None` in the flat format.
    pub name: Option<String>,
    pub enable: Option<bool>,
    /// Servers: the port they listen on.
    pub port: Option<u16>,
    /// Clients: where they connect or post to.
    pub urls: Vec<String>,
    pub token: Option<String>,
}

/// A parsed NapCat OneBot config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NapcatFile {
    /// The flat format (v3.1.10 to v4.0.x): one entry of each kind, no names.
    pub flat: bool,
    pub entries: Vec<Entry>,
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
    let strings = |o: &Value, k: &str| -> Vec<String> {
        match o.get(k) {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        }
    };
    if let Some(network) = v
        .get("network")
        .filter(|n| n.get("websocketServers").is_some())
    {
        let mut entries = Vec::new();
        for kind in EntryKind::ALL {
            let Some(list) = network.get(kind.list()) else {
                continue;
            };
            let list = list
                .as_array()
                .ok_or_else(|| format!("network.{} is not a list", kind.list()))?;
            entries.extend(list.iter().filter(|e| e.is_object()).map(|e| Entry {
                kind,
                name: string(e, "name"),
                enable: e.get("enable").and_then(Value::as_bool),
                port: port(e),
                urls: strings(e, "url"),
                token: string(e, "token"),
            }));
        }
        return Ok(NapcatFile {
            flat: false,
            entries,
        });
    }
    let Some(ws) = v.get("ws").filter(|w| w.is_object()) else {
        return Err(
            "neither network.websocketServers (NapCat v4) nor ws (older NapCat) is in it".into(),
        );
    };
    let token = string(&v, "token");
    let mut entries = vec![Entry {
        kind: EntryKind::WsServer,
        name: None,
        enable: ws.get("enable").and_then(Value::as_bool),
        port: port(ws),
        urls: Vec::new(),
        token: token.clone(),
    }];
    if let Some(r) = v.get("reverseWs").filter(|r| r.is_object()) {
        entries.push(Entry {
            kind: EntryKind::WsClient,
            name: None,
            enable: r.get("enable").and_then(Value::as_bool),
            port: None,
            urls: strings(r, "urls"),
            token: token.clone(),
        });
    }
    if let Some(h) = v.get("http").filter(|h| h.is_object()) {
        entries.push(Entry {
            kind: EntryKind::HttpServer,
            name: None,
            enable: h.get("enable").and_then(Value::as_bool),
            port: port(h),
            urls: Vec::new(),
            token: token.clone(),
        });
        entries.push(Entry {
            kind: EntryKind::HttpClient,
            name: None,
            enable: h.get("enablePost").and_then(Value::as_bool),
            port: None,
            urls: strings(h, "postUrls"),
            // The flat format signs posts with `http.secret`, not the token.
            token: string(h, "secret"),
        });
    }
    Ok(NapcatFile {
        flat: true,
        entries,
    })
}

/// The port a `ws://` or `http://` URL points at.
fn url_port(url: &str) -> Option<u16> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let port = match authority.rsplit_once(':') {
        Some((host, p)) if !host.ends_with(']') || authority.starts_with('[') => p.parse().ok(),
        _ => None,
    };
    port.or(match scheme {
        "ws" | "http" => Some(80),
        "wss" | "https" => Some(443),
        _ => None,
    })
}

/// An entry lifeguard follows for one of its lanes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub lane: Lane,
    pub kind: EntryKind,
    /// Follow the entry with this name (v4) when given.
    pub name: Option<String>,
    /// Else the server on this port, or the client pointing at it.
    pub port: Option<u16>,
}

/// What the settings make lifeguard follow, the lane that picks the file first.
pub fn wanted(s: &Settings) -> Vec<Want> {
    let mut out = Vec::new();
    if let Some(up) = &s.upstream {
        out.push(Want {
            lane: Lane::Forward,
            kind: EntryKind::WsServer,
            name: s.napcat_server.clone(),
            port: Some(up.port),
        });
    }
    out
}

impl Want {
    fn matches(&self, e: &Entry) -> bool {
        e.kind == self.kind
            && match self.port {
                None => false,
                Some(p) if self.kind.is_server() => e.port == Some(p),
                Some(p) => e.urls.iter().any(|u| url_port(u) == Some(p)),
            }
    }

    /// How the entry is called in log lines and reasons.
    fn label(&self, key: &Key) -> String {
        match key {
            Key::Named(n) => format!("{} {n:?}", self.kind.list()),
            Key::Flat => self.kind.flat().to_string(),
        }
    }
}

/// Which entry a follower tracks.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Named(String),
    Flat,
}

impl NapcatFile {
    /// The entry `want` names, or else the one on its port (enabled first).
    fn select(&self, want: &Want) -> Option<(Key, Entry)> {
        let of_kind = || self.entries.iter().filter(|e| e.kind == want.kind);
        let hit = match (&want.name, self.flat) {
            (Some(_), true) => of_kind().next(),
            (Some(n), false) => of_kind().find(|e| e.name.as_deref() == Some(n)),
            (None, _) => of_kind()
                .filter(|e| want.matches(e))
                .max_by_key(|e| e.enable == Some(true)),
        }?;
        let key = match &hit.name {
            Some(n) if !self.flat => Key::Named(n.clone()),
            _ => Key::Flat,
        };
        Some((key, hit.clone()))
    }

    /// The tracked entry now: `None` when it is gone from the file.
    fn find(&self, want: &Want, key: &Key) -> Option<Entry> {
        match key {
            Key::Named(n) => self
                .entries
                .iter()
                .find(|e| e.kind == want.kind && e.name.as_deref() == Some(n))
                .cloned(),
            Key::Flat => self.select(want).map(|(_, e)| e),
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

/// What, when it changes, makes the follower start over: the file, and which entries by
/// name. Not the ports: NapCat's own file moves those, and an entry once found is
/// followed by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    path: Option<PathBuf>,
    wanted: Vec<(Lane, EntryKind, Option<String>)>,
}

impl Target {
    fn of(s: &Settings) -> Target {
        Target {
            path: s.napcat_config.clone(),
            wanted: wanted(s)
                .into_iter()
                .map(|w| (w.lane, w.kind, w.name))
                .collect(),
        }
    }
}

async fn run(state: Arc<State>, first: oneshot::Sender<()>) {
    let mut first = Some(first);
    let mut rx = state.subscribe();
    let stop = state.drain.hard_stop_token();
    loop {
        let target = Target::of(&state.settings());
        match &target.path {
            None => {
                // Not (or no longer) following: NapCat's file has no say.
                state.clear_napcat();
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
            }
            Some(path) => {
                let mut f = Follower::new(state.clone(), path.clone());
                f.run(&mut rx, &target, &stop, first.take()).await;
            }
        }
        // Wait for a change of target (or stop).
        loop {
            if stop.is_cancelled() {
                return;
            }
            if Target::of(&state.settings()) != target {
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
    /// The file being followed, once found.
    tracked: Option<PathBuf>,
    /// Per wanted lane, the entry followed (found in the tracked file).
    keys: Vec<(Want, Key)>,
    /// The bytes of the last version read (acted on, or ignored as unparsable).
    last_bytes: Option<Vec<u8>>,
    /// Per lane, `enable` last acted on.
    enabled: [Option<bool>; Lane::COUNT],
    /// Per lane, why its entry is off, as last told to the state (`None`: on).
    off: [Option<String>; Lane::COUNT],
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
    fn new(state: Arc<State>, path: PathBuf) -> Follower {
        Follower {
            state,
            path,
            tracked: None,
            keys: Vec::new(),
            last_bytes: None,
            enabled: Default::default(),
            off: Default::default(),
            last_warning: None,
            token_note_logged: false,
        }
    }

    async fn run(
        &mut self,
        rx: &mut tokio::sync::watch::Receiver<Arc<crate::state::Snapshot>>,
        target: &Target,
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
        tracing::info!(path = %self.path.display(), "following NapCat's config");
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
                    if Target::of(&s) != *target {
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

    /// Read the followed file (finding it first if needed) and act on what changed.
    async fn check(&mut self) {
        let wanted = wanted(&self.state.settings());
        if wanted.is_empty() {
            self.warn_once("nothing to follow in NapCat's config (no transport configured)".into());
            return;
        }
        if let Some(file) = self.tracked.clone() {
            match read_file(&file).await {
                Read::Missing if self.path.is_dir() => {
                    // Gone from the directory: look for the entries elsewhere.
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
                    self.act(&file, &parsed, &wanted);
                    return;
                }
            }
        }
        self.find_and_act(&wanted).await;
    }

    /// Look for the file holding the first wanted entry (the file itself, or among the
    /// directory's candidates).
    async fn find_and_act(&mut self, wanted: &[Want]) {
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
        let first = &wanted[0];
        let mut best: Option<(SystemTime, PathBuf, NapcatFile, Vec<u8>)> = None;
        let mut problems = Vec::new();
        for file in files {
            match read_file(&file).await {
                Read::Missing => problems.push(format!("{} does not exist (yet)", file.display())),
                Read::Unreadable(e) => {
                    problems.push(format!("cannot read {}: {e}", file.display()))
                }
                Read::Unparsable(bytes, e) => {
                    problems.push(format!(
                        "{} does not parse ({e}); ignoring this version",
                        file.display()
                    ));
                    if !self.path.is_dir() {
                        self.last_bytes = Some(bytes);
                    }
                }
                Read::Parsed(bytes, parsed) => {
                    if parsed.select(first).is_none() {
                        problems.push(match &first.name {
                            Some(n) => format!("{} has no {} entry named {n:?}", file.display(), first.kind.list()),
                            None => format!(
                                "{} has no {} on port {} (the one lifeguard uses); name it with --napcat-server",
                                file.display(),
                                first.kind.what(),
                                first.port.unwrap_or(0),
                            ),
                        });
                        continue;
                    }
                    let mtime = std::fs::metadata(&file)
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    if best.as_ref().map_or(true, |b| mtime > b.0) {
                        best = Some((mtime, file, parsed, bytes));
                    }
                }
            }
        }
        match best {
            Some((_, file, parsed, bytes)) => {
                tracing::info!(file = %file.display(), "following NapCat's config file");
                self.last_warning = None;
                self.last_bytes = Some(bytes);
                self.tracked = Some(file.clone());
                self.keys.clear();
                self.act(&file, &parsed, wanted);
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

    /// The entry followed for `want`: found before (and still what is wanted), or found
    /// now.
    fn key_for(&mut self, parsed: &NapcatFile, want: &Want) -> Option<Key> {
        let same = |w: &Want| w.lane == want.lane && w.kind == want.kind && w.name == want.name;
        if let Some((_, key)) = self.keys.iter().find(|(w, _)| same(w)) {
            return Some(key.clone());
        }
        let (key, _) = parsed.select(want)?;
        self.keys.retain(|(w, _)| w.lane != want.lane);
        self.keys.push((want.clone(), key.clone()));
        Some(key)
    }

    /// Act on the followed entries' current descriptions: whether each is on, and the
    /// forward server's port and token, in one change of the state.
    fn act(&mut self, file: &Path, parsed: &NapcatFile, wanted: &[Want]) {
        let fname = display_name(file);
        let current = self.state.napcat_overlay();
        let mut overlay = current.clone();
        let mut off = self.off.clone();
        let mut enabled = self.enabled;
        for want in wanted {
            let lane = want.lane.index();
            let Some(key) = self.key_for(parsed, want) else {
                self.warn_once(format!(
                    "{} has no {} for lifeguard's {} transport; not following it",
                    file.display(),
                    want.kind.what(),
                    want.lane.as_str()
                ));
                continue;
            };
            let label = want.label(&key);
            let Some(entry) = parsed.find(want, &key) else {
                if enabled[lane] != Some(false) {
                    let reason = format!(
                        "NapCat's {} {label} was removed from {fname}",
                        want.kind.what()
                    );
                    tracing::warn!(file = %file.display(), entry = %label, "{reason}");
                    enabled[lane] = Some(false);
                    off[lane] = Some(reason);
                }
                continue;
            };
            match entry.enable {
                None => self.warn_once(format!(
                    "{label} in {} has no `enable`; not acting on it",
                    file.display()
                )),
                Some(enable) if enabled[lane] != Some(enable) => {
                    if !(enabled[lane].is_none() && enable) {
                        tracing::info!(
                            file = %file.display(),
                            entry = %label,
                            enable,
                            "NapCat's config: the {} was {}",
                            want.kind.what(),
                            if enable { "enabled (up again once healthy)" } else { "disabled" }
                        );
                    }
                    enabled[lane] = Some(enable);
                    off[lane] = (!enable).then(|| {
                        format!(
                            "NapCat's {} {label} is disabled in {fname}",
                            want.kind.what()
                        )
                    });
                }
                Some(_) => {}
            }
            if want.lane == Lane::Forward {
                // Port and token: follow them.
                let token = entry
                    .token
                    .as_ref()
                    .map(|t| Some(Secret::new(t.clone())).filter(|s| !s.expose().is_empty()));
                overlay = Overlay {
                    port: entry.port.or(current.port),
                    token: token.or(current.token.clone()),
                };
            }
        }
        self.enabled = enabled;
        if overlay == current && off == self.off {
            return;
        }
        let switched_on = Lane::ALL
            .iter()
            .any(|l| self.off[l.index()].is_some() && off[l.index()].is_none());
        self.off = off.clone();
        let change = self.state.set_napcat(overlay.clone(), off);
        if switched_on {
            self.state.kick_probe();
        }
        let (old, new) = (&change.before, &change.after);
        let port = |s: &Settings| s.upstream.as_ref().map(|u| u.port);
        if port(old) != port(new) {
            tracing::info!(
                file = %file.display(),
                from = port(old).unwrap_or(0),
                to = port(new).unwrap_or(0),
                "NapCat's config: following its forward WebSocket server to a new port"
            );
        }
        if old.upstream_token != new.upstream_token {
            tracing::info!(
                file = %file.display(),
                "NapCat's config: following its token for the backend connection"
            );
        }
        if new.upstream_token_explicit && overlay.token.is_some() && overlay.token != current.token
        {
            let differs =
                overlay.token.as_ref().map(|t| t.as_ref()) != Some(new.upstream_token.as_ref());
            if differs && !self.token_note_logged {
                self.token_note_logged = true;
                tracing::warn!(
                    file = %file.display(),
                    "NapCat's token differs from --upstream-token; keeping --upstream-token (set explicitly)"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(kind: EntryKind, name: Option<&str>, port: u16) -> Want {
        Want {
            lane: Lane::Forward,
            kind,
            name: name.map(str::to_string),
            port: Some(port),
        }
    }

    #[test]
    fn v4_lists_of_every_kind_parse() {
        let v4 = r#"{"network":{
            "websocketServers":[{"enable":true,"name":"ws","port":3001,"token":"t"},{"enable":false,"name":"other","port":3002,"token":""}],
            "websocketClients":[{"enable":true,"name":"nb","url":"ws://lifeguard:8080/onebot/v11/ws","token":"r"}],
            "httpServers":[{"enable":false,"name":"http","port":3000,"token":"h"}],
            "httpClients":[{"enable":true,"name":"post","url":"http://lifeguard:5700/","token":"p"}]}}"#;
        let f = parse(v4).unwrap();
        assert!(!f.flat);
        assert_eq!(f.entries.len(), 5);
        let (key, s) = f.select(&want(EntryKind::WsServer, None, 3002)).unwrap();
        assert_eq!(key, Key::Named("other".into()));
        assert_eq!((s.enable, s.port), (Some(false), Some(3002)));
        let (key, s) = f.select(&want(EntryKind::WsServer, Some("ws"), 1)).unwrap();
        assert_eq!(key, Key::Named("ws".into()));
        assert_eq!(s.token.as_deref(), Some("t"));
        assert!(f.select(&want(EntryKind::WsServer, None, 9)).is_none());
        let gone = want(EntryKind::WsServer, None, 3001);
        assert!(f.find(&gone, &Key::Named("gone".into())).is_none());
        let (_, c) = f.select(&want(EntryKind::WsClient, None, 8080)).unwrap();
        assert_eq!(c.token.as_deref(), Some("r"));
        assert!(f.select(&want(EntryKind::WsClient, None, 3001)).is_none());
        let (_, h) = f.select(&want(EntryKind::HttpServer, None, 3000)).unwrap();
        assert_eq!(h.enable, Some(false));
        let (_, p) = f.select(&want(EntryKind::HttpClient, None, 5700)).unwrap();
        assert_eq!(p.urls, ["http://lifeguard:5700/"]);
    }

    #[test]
    fn the_flat_format_has_one_entry_of_each_kind() {
        // As NapCat 3.1.10 writes it (the reference sample).
        let flat = r#"{"http":{"enable":false,"host":"","port":3000,"secret":"","enableHeart":false,"enablePost":false,"postUrls":[]},
            "ws":{"enable":true,"host":"","port":3001},"reverseWs":{"enable":false,"urls":[]},
            "debug":false,"heartInterval":30000,"messagePostFormat":"array","token":""}"#;
        let f = parse(flat).unwrap();
        assert!(f.flat);
        let (key, s) = f.select(&want(EntryKind::WsServer, None, 3001)).unwrap();
        assert_eq!(key, Key::Flat);
        assert_eq!((s.enable, s.token.as_deref()), (Some(true), Some("")));
        assert!(f.select(&want(EntryKind::WsServer, None, 3002)).is_none());
        assert!(f
            .select(&want(EntryKind::WsServer, Some("any"), 3002))
            .is_some());
        let (_, http) = f.select(&want(EntryKind::HttpServer, None, 3000)).unwrap();
        assert_eq!(http.enable, Some(false));
        let post = f
            .entries
            .iter()
            .find(|e| e.kind == EntryKind::HttpClient)
            .unwrap();
        assert_eq!((post.enable, post.urls.len()), (Some(false), 0));
    }

    #[test]
    fn url_ports() {
        assert_eq!(url_port("ws://lifeguard:8080/onebot/v11/ws"), Some(8080));
        assert_eq!(url_port("http://[::1]:5700"), Some(5700));
        assert_eq!(url_port("http://u:p@h:1/x?y=2"), Some(1));
        assert_eq!(url_port("ws://h/x"), Some(80));
        assert_eq!(url_port("https://h"), Some(443));
        assert_eq!(url_port("ws://[::1]/x"), Some(80));
        assert_eq!(url_port("nonsense"), None);
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
