//! The wiring: what starts in which order and how it stops. Imported by nothing in the
//! library but the entry points (the binary, the demo, tests).
//!
//! Start order matters: NapCat's file is read and applied before anything talks to the
//! backend (otherwise the first probes and sessions would present a token NapCat's file
//! overrides), then the probes, then the listeners. Stop order is [`State::shutdown`]'s.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::{RunArgs, Settings};
use crate::intent::{admin, napcat, probe, reload};
use crate::state::State;
use crate::transport::http::{api::ApiProxy, post};
use crate::transport::notify;
use crate::transport::ws::{listener, reverse};

/// How long start-up waits for NapCat's file before going on without it.
const NAPCAT_FIRST_READ: Duration = Duration::from_secs(2);

/// A running proxy: its listeners and its state.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Where backends dial in (reverse WebSocket), when configured.
    pub reverse_addr: Option<SocketAddr>,
    /// Where the backend POSTs its events, when `--post-listen` is set.
    pub post_addr: Option<SocketAddr>,
    pub state: Arc<State>,
}

impl Proxy {
    /// Bind both listeners and start serving. Errors are bind errors.
    pub async fn start(mut settings: Settings) -> std::io::Result<Proxy> {
        let clients = bind(settings.listen, "").await?;
        let admin = bind(settings.admin_listen, " (admin)").await?;
        let backends = match settings.reverse_listen {
            Some(a) => Some(bind(a, " (reverse WebSocket)").await?),
            None => None,
        };
        let reverse_addr = backends.as_ref().map(|l| l.local_addr()).transpose()?;
        let posts = match settings.post_listen {
            Some(a) => Some(bind(a, " (HTTP POST)").await?),
            None => None,
        };
        let addr = clients.local_addr()?;
        let admin_addr = admin.local_addr()?;
        let post_addr = posts.as_ref().map(|l| l.local_addr()).transpose()?;
        // NapCat's POST and reverse WebSocket clients are found in its file by the port
        // they connect to: the one bound, when the OS chose it.
        if post_addr.is_some() {
            settings.post_listen = post_addr;
        }
        if reverse_addr.is_some() {
            settings.reverse_listen = reverse_addr;
        }
        let state = State::new(settings);

        // Webhooks follow the history from its first record (the first "up" included).
        notify::start(&state);
        // Intent first: NapCat's file, then the probes.
        let first_read = napcat::start(&state);
        if tokio::time::timeout(NAPCAT_FIRST_READ, first_read)
            .await
            .is_err()
        {
            tracing::warn!("NapCat's config was not read in time; starting without it");
        }
        state
            .drain
            .spawn_background(probe::run_prober(state.clone()));
        state
            .drain
            .spawn_background(probe::run_http_prober(state.clone()));
        state
            .drain
            .spawn_background(probe::watch_login(state.clone()));
        state
            .drain
            .spawn_background(admin::serve(state.clone(), admin));
        // Then the transports.
        let api = ApiProxy::new(&state.settings());
        state
            .drain
            .spawn_session(listener::serve(state.clone(), clients, api));
        if let Some(l) = backends {
            state.drain.spawn_session(reverse::serve(state.clone(), l));
        }
        if let Some(posts) = posts {
            state.drain.spawn_session(post::serve(state.clone(), posts));
        }
        let limits = state.conns.limits(&state.settings());
        tracing::info!(
            listen = %addr,
            admin = %admin_addr,
            max_connections = limits.max,
            max_connections_per_ip = limits.per_ip,
            fd_limit = state.conns.fd_limit(),
            reverse_listen = %reverse_addr.map(|a| a.to_string()).unwrap_or_default(),
            upstream = %state.settings().upstream.as_ref().map(|u| u.to_string()).unwrap_or_default(),
            upstream_http = %state.settings().upstream_http.as_ref().map(|u| u.to_string()).unwrap_or_default(),
            post_listen = %post_addr.map(|a| a.to_string()).unwrap_or_default(),
            "lifeguard started"
        );
        Ok(Proxy {
            addr,
            admin_addr,
            reverse_addr,
            post_addr,
            state,
        })
    }

    /// Stop accepting, run the disable sequence with 1001 for every session, wait for
    /// all tasks within the drain budget. True when everything ended in time.
    pub async fn shutdown(self) -> bool {
        self.state.shutdown().await
    }
}

async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}{what}: {e}")))
}

/// Run the proxy until SIGTERM/SIGINT, then drain. Exit 0 on a clean stop.
///
/// `source` is the config file's content `settings` came from: a reload compares the file
/// with it. `release_memory` gives freed heap back to the operating system (glibc's
/// `malloc_trim`); it is called after many connections went away, so that a flood's
/// memory does not stay resident (see RELIABILITY.md).
pub async fn serve(
    args: RunArgs,
    settings: Settings,
    source: Option<Vec<u8>>,
    release_memory: Option<fn()>,
) -> ExitCode {
    raise_fd_limit();
    let proxy = match Proxy::start(settings).await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("lifeguard: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(release) = release_memory {
        proxy
            .state
            .drain
            .spawn_background(give_memory_back(proxy.state.clone(), release));
    }
    reload::start(&proxy.state, args, source);
    wait_for_stop_signal().await;
    proxy.shutdown().await;
    ExitCode::SUCCESS
}

/// Connections that must have gone (from the recent peak) before freed memory is handed
/// back: a flood, not everyday churn.
const RELEASE_AFTER_DROP: usize = 128;

/// After a flood, the allocator keeps what the flood's connections used (glibc: about 3
/// times the live heap, never returned on its own). Once at least [`RELEASE_AFTER_DROP`]
/// connections are gone and the count has stayed down for a few seconds, hand it back.
async fn give_memory_back(state: Arc<State>, release: fn()) {
    const TICK: Duration = Duration::from_secs(1);
    const QUIET_TICKS: u32 = 3;
    let mut peak = 0usize;
    let mut quiet = 0u32;
    loop {
        tokio::select! {
            _ = state.drain.hard_stopped() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        let open = state.conns.open();
        if open >= peak {
            peak = open;
            quiet = 0;
            continue;
        }
        if peak - open < RELEASE_AFTER_DROP {
            continue;
        }
        quiet += 1;
        if quiet < QUIET_TICKS {
            continue;
        }
        let started = std::time::Instant::now();
        let _ = tokio::task::spawn_blocking(release).await;
        tracing::info!(
            connections_before = peak,
            connections_now = open,
            took_ms = started.elapsed().as_millis() as u64,
            "gave freed memory back to the operating system"
        );
        peak = open;
        quiet = 0;
    }
}

/// Soft open-file limit up to the hard one: the connection cap derives from it, and
/// 1024 (a common soft default) would cap lifeguard at a few hundred clients.
pub fn raise_fd_limit() {
    use rlimit::Resource;
    let Ok((soft, hard)) = Resource::NOFILE.get() else {
        return;
    };
    if soft >= hard {
        return;
    }
    match rlimit::increase_nofile_limit(hard) {
        Ok(now) if now > soft => {
            tracing::info!(
                from = soft,
                to = now,
                "raised the open-file limit (soft) to the hard limit"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
    }
}

/// SIGTERM or SIGINT (Ctrl-C).
pub async fn wait_for_stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
