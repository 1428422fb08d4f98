//! What the binary's subcommands other than running the proxy do (tracing set-up,
//! signals, `health`), kept in the library so tests can reach it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

use crate::config::{self, HealthArgs, LogFormat, RunArgs};

/// `RUST_LOG`-style filter (default `info`), text or JSON lines on stderr.
///
/// Lines go through a writer thread with a buffer that is flushed whenever its queue runs
/// empty: a mass disable logs thousands of terminations without a syscall each on the
/// proxy's own threads. Nothing is dropped (a full queue blocks). Keep the guard alive
/// until exit: dropping it flushes.
pub fn init_tracing(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("lifeguard-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    guard
}

/// `lifeguard health [--ready]`: GET /live or /ready on the admin listener; no shell tools
/// needed (Docker HEALTHCHECK). Exit 0 on 200, 1 otherwise.
pub fn health(args: &RunArgs, h: &HealthArgs) -> ExitCode {
    let file = match &args.config {
        Some(p) => match config::read_file_config(p) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("lifeguard: {e}");
                return ExitCode::from(config::EXIT_USAGE as u8);
            }
        },
        None => None,
    };
    let mut addr: SocketAddr = args
        .admin_listen
        .or(file.and_then(|f| f.admin_listen))
        .unwrap_or_else(|| {
            config::DEFAULT_ADMIN_LISTEN
                .parse()
                .expect("default parses")
        });
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let path = if h.ready { "/ready" } else { "/live" };
    match http_get(addr, path, h.timeout) {
        Ok((200, _)) => {
            println!("ok: {path} on {addr}");
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!(
                "lifeguard: {path} on {addr} answered {status}: {}",
                body.trim()
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("lifeguard: {path} on {addr}: {e}");
            ExitCode::from(1)
        }
    }
}

/// A minimal blocking HTTP/1.1 GET: (status, body).
pub fn http_get(
    addr: SocketAddr,
    path: &str,
    timeout: std::time::Duration,
) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, timeout)
}

/// A minimal blocking HTTP/1.1 request without a body: (status, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    timeout: std::time::Duration,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.take(1 << 20).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response")
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
