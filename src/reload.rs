//! Live reconfiguration: the `--config` file is re-read when it changes (the `notify`
//! crate, watching its directory so editors that write a new file and rename it over the
//! old one work; debounced) and on SIGHUP.
//!
//! A reload re-resolves everything with [`Settings::load`] from the original command line
//! and environment, so flags and `LIFEGUARD_*` variables keep their precedence over the
//! file. An invalid file changes nothing: the running configuration stays, one error line
//! says why (file, line, field), and `lifeguard_config_reloads_total{result="failed"}`
//! counts it. A valid one is handed to [`Shared::apply_settings`] (through
//! [`crate::napcat::Layers`], so what NapCat's own config says about the upstream's port
//! and token stays applied on top), counted as `result="ok"`, and one info line names the
//! keys that changed.
//!
//! Content is compared with what was last read: a file event that leaves the bytes as they
//! were (an editor's touch, our own read) reloads nothing; SIGHUP always reloads. A slow
//! poll (every [`POLL_EVERY`]) catches what file events miss (a Kubernetes ConfigMap swaps
//! a symlink in a `..data` directory, network file systems send no events).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, RunArgs, Settings};
use crate::server::Shared;

/// Quiet time after the last file event before the file is read.
pub const DEBOUNCE: Duration = Duration::from_millis(150);
/// The fallback poll of the file's content.
pub const POLL_EVERY: Duration = Duration::from_secs(2);

/// Watches for configuration changes until stopped.
pub struct Reloader {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Reloader {
    /// Start watching `args.config` (if any) and listening for SIGHUP. Must be called inside
    /// the runtime; SIGHUP is handled from the moment this returns.
    pub fn start(shared: &Arc<Shared>, args: RunArgs) -> Reloader {
        let stop = CancellationToken::new();
        #[cfg(unix)]
        let hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by file change only");
                None
            }
        };
        let events = match &args.config {
            Some(path) => match watch_files(path, same_name(path)) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(
                        file = %path.display(),
                        error = %e,
                        "cannot watch the config file's directory; polling it every {}s",
                        POLL_EVERY.as_secs()
                    );
                    None
                }
            },
            None => None,
        };
        if let Some(path) = &args.config {
            tracing::info!(file = %path.display(), "watching the config file (reload on change or SIGHUP)");
        }
        let worker = Worker {
            shared: shared.clone(),
            last: args.config.as_ref().and_then(|p| std::fs::read(p).ok()),
            args,
        };
        let task = shared.background.spawn(worker.run(
            events,
            #[cfg(unix)]
            hup,
            stop.clone(),
            shared.hard_stop.clone(),
        ));
        Reloader {
            stop,
            task: Some(task),
        }
    }

    /// Stop watching and wait for the watcher task to end.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Reloader {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What triggered a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    FileEvent,
    Poll,
    Sighup,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::FileEvent => "file-change",
            Trigger::Poll => "poll",
            Trigger::Sighup => "SIGHUP",
        }
    }
}

struct Worker {
    shared: Arc<Shared>,
    args: RunArgs,
    /// The file's bytes as last read (valid or not).
    last: Option<Vec<u8>>,
}

impl Worker {
    async fn run(
        mut self,
        events: Option<FileEvents>,
        #[cfg(unix)] mut hup: Option<tokio::signal::unix::Signal>,
        stop: CancellationToken,
        hard_stop: CancellationToken,
    ) {
        let changed = events.as_ref().map(|e| e.changed.clone());
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.reset();
        loop {
            #[cfg(unix)]
            let sighup = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let sighup = std::future::pending::<()>();
            let trigger = tokio::select! {
                _ = stop.cancelled() => break,
                _ = hard_stop.cancelled() => break,
                _ = sighup => Trigger::Sighup,
                _ = wait_changed(changed.as_deref()) => {
                    // Debounce: a save is often several events (truncate, write, rename).
                    if !debounce(changed.as_deref(), DEBOUNCE, &stop).await {
                        break;
                    }
                    Trigger::FileEvent
                }
                _ = poll.tick(), if self.args.config.is_some() => Trigger::Poll,
            };
            self.reload(trigger);
        }
        drop(events);
    }

    fn reload(&mut self, trigger: Trigger) {
        let Some(path) = self.args.config.clone() else {
            tracing::info!(
                trigger = trigger.as_str(),
                "no config file (--config) to reload; nothing changed"
            );
            return;
        };
        if trigger != Trigger::Sighup {
            // Only act on a real change of content.
            let now = std::fs::read(&path).ok();
            if now == self.last {
                return;
            }
        }
        self.last = std::fs::read(&path).ok();
        let m = self.shared.metrics.clone();
        match Settings::load(&self.args) {
            Err(e) => {
                m.reload(false);
                tracing::error!(
                    file = %path.display(),
                    trigger = trigger.as_str(),
                    error = %one_line(&e),
                    "config reload failed; keeping the running configuration"
                );
            }
            Ok(new) => {
                let (old, now) = self.shared.layers.set_base(&self.shared, new.clone());
                m.reload(true);
                let changed = changed_keys(&old, &new);
                let restart = restart_keys(&old, &new);
                if changed.is_empty() && restart.is_empty() {
                    tracing::info!(
                        file = %path.display(),
                        trigger = trigger.as_str(),
                        "config reloaded; nothing changed"
                    );
                } else {
                    tracing::info!(
                        file = %path.display(),
                        trigger = trigger.as_str(),
                        changed = %changed.join(","),
                        needs_restart = %restart.join(","),
                        upstream = %now.upstream,
                        "config reloaded"
                    );
                }
            }
        }
    }
}

/// All problems on one line ("; "-separated), for a single log line.
fn one_line(e: &ConfigError) -> String {
    e.problems().join("; ")
}

/// The keys whose effective value differs (secrets compared, never shown).
pub fn changed_keys(old: &Settings, new: &Settings) -> Vec<String> {
    let kv = |s: &Settings| -> Vec<(String, String)> {
        s.render()
            .lines()
            .filter_map(|l| l.split_once(" = "))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let mut out: Vec<String> = kv(old)
        .into_iter()
        .zip(kv(new))
        .filter(|((k, a), (_, b))| {
            a != b && !matches!(k.as_str(), "listen" | "admin_listen" | "log_format")
        })
        .map(|((k, _), _)| k)
        .collect();
    for (key, a, b) in [
        ("access_token", &old.access_token, &new.access_token),
        ("upstream_token", &old.upstream_token, &new.upstream_token),
    ] {
        if a != b && !out.iter().any(|k| k == key) {
            out.push(key.to_string());
        }
    }
    out
}

/// Keys that changed in the file but only take effect on restart.
fn restart_keys(old: &Settings, new: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    if old.listen != new.listen {
        out.push("listen".to_string());
    }
    if old.admin_listen != new.admin_listen {
        out.push("admin_listen".to_string());
    }
    if old.log_format != new.log_format {
        out.push("log_format".to_string());
    }
    out
}

// ---------------------------------------------------------------------------------------
// File watching, shared with the NapCat config follower.

/// A directory watch: `changed` is notified (one stored permit) whenever an event touches
/// a file the filter accepts. Dropping it stops the watch.
pub struct FileEvents {
    _watcher: notify::RecommendedWatcher,
    pub changed: Arc<Notify>,
}

/// Watch the directory holding `path` (or `path` itself when it is a directory) for
/// events on files whose path passes `filter`. Reads (open, read, close-without-write) are
/// ignored, so reading the file does not trigger another read.
pub fn watch_files(
    path: &Path,
    filter: impl Fn(&Path) -> bool + Send + 'static,
) -> notify::Result<FileEvents> {
    let dir: PathBuf = if path.is_dir() {
        path.to_path_buf()
    } else {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    };
    let changed = Arc::new(Notify::new());
    let tx = changed.clone();
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(ev) => {
                let relevant = match ev.kind {
                    EventKind::Access(notify::event::AccessKind::Close(
                        notify::event::AccessMode::Write,
                    )) => true,
                    EventKind::Access(_) => false,
                    _ => true,
                };
                // An event without paths (overflow, rescan) may hide anything: take it.
                if relevant && (ev.paths.is_empty() || ev.paths.iter().any(|p| filter(p))) {
                    tx.notify_one();
                }
            }
            Err(_) => tx.notify_one(),
        })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(FileEvents {
        _watcher: watcher,
        changed,
    })
}

/// A filter accepting paths with the same file name as `path`.
pub fn same_name(path: &Path) -> impl Fn(&Path) -> bool + Send + 'static {
    let name = path.file_name().map(|n| n.to_os_string());
    move |p: &Path| p.file_name().map(|n| n.to_os_string()) == name
}

/// Wait for a file event (forever when there is no watch).
pub async fn wait_changed(changed: Option<&Notify>) {
    match changed {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

/// Wait until no event came for `quiet`. False when stopped meanwhile.
pub async fn debounce(changed: Option<&Notify>, quiet: Duration, stop: &CancellationToken) -> bool {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = wait_changed(changed) => continue,
            _ = tokio::time::sleep(quiet) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunArgs;

    fn settings(extra: impl FnOnce(&mut RunArgs)) -> Settings {
        let mut a = RunArgs {
            upstream: Some("ws://127.0.0.1:3001".into()),
            ..Default::default()
        };
        extra(&mut a);
        Settings::resolve(&a, None).unwrap()
    }

    #[test]
    fn changed_keys_names_secrets_without_values() {
        let a = settings(|a| a.access_token = Some("one".into()));
        let b = settings(|a| {
            a.access_token = Some("two".into());
            a.fall = Some(5);
        });
        let keys = changed_keys(&a, &b);
        assert!(keys.contains(&"access_token".to_string()), "{keys:?}");
        assert!(keys.contains(&"upstream_token".to_string()), "{keys:?}");
        assert!(keys.contains(&"fall".to_string()), "{keys:?}");
        assert!(!keys.iter().any(|k| k.contains("one") || k.contains("two")));
        assert!(changed_keys(&a, &a).is_empty());
    }
}
