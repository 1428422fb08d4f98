//! Watching files for changes: lifeguard's config file and NapCat's. A watch on the
//! directory (so editors that write a new file and rename it over the old one work), with
//! reads ignored so that reading a file does not trigger another read.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

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
