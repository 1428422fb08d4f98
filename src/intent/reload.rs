//! Live reconfiguration: the `--config` file is re-read when it changes (watched through
//! its directory, debounced) and on SIGHUP.
//!
//! A reload re-resolves everything with [`Settings::load`] from the original command line
//! and environment, so flags and `LIFEGUARD_*` variables keep their precedence over the
//! file. An invalid file changes nothing: the running configuration stays, one error line
//! says why (file, line, field), and `lifeguard_config_reloads_total{result="failed"}`
//! counts it. A valid one becomes the state's base settings (what NapCat's own config says
//! about the upstream stays applied on top), counted as `result="ok"`, and one info line
//! names the keys that changed, effective against effective.
//!
//! Content is compared with what was last read: a file event that leaves the bytes as they
//! were (an editor's touch, our own read) reloads nothing; SIGHUP always reloads. A slow
//! poll (every [`POLL_EVERY`]) catches what file events miss (a Kubernetes ConfigMap swaps
//! a symlink in a `..data` directory, network file systems send no events).

use std::sync::Arc;
use std::time::Duration;

use super::files::{debounce, same_name, wait_changed, watch_files, FileEvents};
use crate::config::{ConfigError, RunArgs, Settings};
use crate::state::State;

/// Quiet time after the last file event before the file is read.
pub const DEBOUNCE: Duration = Duration::from_millis(150);
/// The fallback poll of the file's content.
pub const POLL_EVERY: Duration = Duration::from_secs(2);

/// Start watching `args.config` (if any) and listening for SIGHUP, as a background task
/// of the state's drain. Must be called inside the runtime; SIGHUP is handled from the
/// moment this returns. `source` is the file's content the running settings came from, so
/// that a change made before the watch was in place is still seen (by the poll).
pub fn start(state: &Arc<State>, args: RunArgs, source: Option<Vec<u8>>) {
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
        state: state.clone(),
        last: source,
        args,
    };
    state.drain.spawn_background(worker.run(
        events,
        #[cfg(unix)]
        hup,
    ));
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
    state: Arc<State>,
    args: RunArgs,
    /// The file's bytes as last read (valid or not).
    last: Option<Vec<u8>>,
}

impl Worker {
    async fn run(
        mut self,
        events: Option<FileEvents>,
        #[cfg(unix)] mut hup: Option<tokio::signal::unix::Signal>,
    ) {
        let changed = events.as_ref().map(|e| e.changed.clone());
        let stop = self.state.drain.hard_stop_token();
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
        let now = std::fs::read(&path).ok();
        if trigger != Trigger::Sighup && now == self.last {
            // Only act on a real change of content.
            return;
        }
        self.last = now;
        match Settings::load_with_source(&self.args).map(|(s, source)| {
            // What was parsed, if the file moved on between the two reads.
            if source.is_some() {
                self.last = source;
            }
            s
        }) {
            Err(e) => {
                self.state.metrics.reload(false);
                tracing::error!(
                    file = %path.display(),
                    trigger = trigger.as_str(),
                    error = %one_line(&e),
                    "config reload failed; keeping the running configuration"
                );
            }
            Ok(new) => {
                let change = self.state.set_base_settings(new);
                self.state.metrics.reload(true);
                if change.applied.is_empty() && change.restart_needed.is_empty() {
                    tracing::info!(
                        file = %path.display(),
                        trigger = trigger.as_str(),
                        "config reloaded; nothing changed"
                    );
                } else {
                    tracing::info!(
                        file = %path.display(),
                        trigger = trigger.as_str(),
                        changed = %change.applied.join(","),
                        needs_restart = %change.restart_needed.join(","),
                        upstream = %change.after.upstream.as_ref().map(|u| u.to_string()).unwrap_or_default(),
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
