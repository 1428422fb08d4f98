//! What the binary's subcommands other than running the proxy do (tracing set-up,
//! signals, `health`), kept in the library so tests can reach it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

use crate::config::{self, HealthArgs, LogFormat, RunArgs, StatusArgs};

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

/// Where the admin listener is, and its token, from the flags, the environment and the
/// config file (the subcommands run beside the proxy and read what it reads).
struct AdminTarget {
    addr: SocketAddr,
    token: Option<String>,
}

fn admin_target(args: &RunArgs) -> Result<AdminTarget, ExitCode> {
    let file = match &args.config {
        Some(p) => match config::read_file_config(p) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("lifeguard: {e}");
                return Err(ExitCode::from(config::EXIT_USAGE as u8));
            }
        },
        None => None,
    };
    let mut addr: SocketAddr = args
        .admin_listen
        .or(file.as_ref().and_then(|f| f.admin_listen))
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
    let token = args
        .admin_token
        .clone()
        .or(file.and_then(|f| f.admin_token))
        .filter(|t| !t.is_empty());
    Ok(AdminTarget { addr, token })
}

/// `lifeguard health [--ready]`: GET /live or /ready on the admin listener; no shell tools
/// needed (Docker HEALTHCHECK). Exit 0 on 200, 1 otherwise.
pub fn health(args: &RunArgs, h: &HealthArgs) -> ExitCode {
    let target = match admin_target(args) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let addr = target.addr;
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

/// Exit status of `lifeguard status` when the admin listener cannot be asked.
pub const STATUS_UNKNOWN: u8 = 2;

/// `lifeguard status`: the status page in a terminal. Exit 0 when every configured
/// transport is up, 1 when one is down, 2 when lifeguard cannot be asked.
pub fn status(args: &RunArgs, st: &StatusArgs) -> ExitCode {
    let target = match admin_target(args) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let auth = target.token.as_deref();
    let get = |path: &str| -> Result<serde_json::Value, String> {
        match http_request_with(target.addr, "GET", path, st.timeout, auth) {
            Ok((200, body)) => serde_json::from_str(&body)
                .map_err(|e| format!("GET {path}: not JSON ({e})")),
            Ok((401, _)) => Err(format!(
                "GET {path}: the admin listener wants a token (--admin-token or LIFEGUARD_ADMIN_TOKEN)"
            )),
            Ok((403, _)) => Err(format!("GET {path}: the admin token was refused")),
            Ok((status, body)) => Err(format!("GET {path} answered {status}: {}", body.trim())),
            Err(e) => Err(format!("cannot reach the admin listener: {e}")),
        }
    };
    let fetched = get("/state")
        .and_then(|s| get(&format!("/transitions?limit={}", st.transitions)).map(|t| (s, t)));
    let (state, transitions) = match fetched {
        Ok(x) => x,
        Err(e) => {
            eprintln!("lifeguard: {} ({})", e, target.addr);
            return ExitCode::from(STATUS_UNKNOWN);
        }
    };
    let up = state["lanes"]
        .as_object()
        .map(|lanes| lanes.values().all(|l| l["state"] == "up"))
        .unwrap_or(false)
        && state["state"] == "up";
    if st.json {
        println!(
            "{}",
            serde_json::json!({"state": state, "transitions": transitions["transitions"]})
        );
    } else {
        use std::io::IsTerminal;
        let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        print!(
            "{}",
            render_status(&target.addr.to_string(), &state, &transitions, color)
        );
    }
    if up {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The text view of `/state` and `/transitions`: one screen, plain when piped.
pub fn render_status(
    admin: &str,
    state: &serde_json::Value,
    transitions: &serde_json::Value,
    color: bool,
) -> String {
    use serde_json::Value;
    use std::fmt::Write as _;
    let paint = |code: &str, s: &str| {
        if color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    };
    let word = |v: &Value| -> String {
        let up = v.as_str() == Some("up");
        let w = if up { "UP" } else { "DOWN" };
        paint(if up { "1;32" } else { "1;31" }, w)
    };
    let str_of = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let mut out = String::new();
    let since = state["since"].as_f64().unwrap_or(0.0);
    let _ = writeln!(
        out,
        "lifeguard {}  {}  since {} ({} ago)   admin {admin}",
        word(&state["state"]),
        str_of(&state["cause"]),
        utc(since),
        human(state["for_seconds"].as_f64().unwrap_or(0.0)),
    );
    let _ = writeln!(out, "  reason    {}", str_of(&state["reason"]));
    let _ = writeln!(out, "  upstream  {}", str_of(&state["upstream"]));
    let b = &state["backend"];
    let self_id = b["self_id"]
        .as_u64()
        .map(|i| i.to_string())
        .unwrap_or_else(|| "unknown (no event seen yet)".into());
    let account = if state["cause"] == "offline" {
        "offline".to_string()
    } else {
        match b["status"]["online"].as_bool() {
            Some(true) => "online".into(),
            Some(false) => "offline".into(),
            None => "not reported yet".into(),
        }
    };
    let heartbeat = b["heartbeat_interval_ms"]
        .as_u64()
        .map(|ms| format!(", heartbeat every {}", human(ms as f64 / 1000.0)))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "  backend   QQ {self_id}, account {account}{heartbeat}"
    );
    if let Some(k) = b["last_kick"].as_object() {
        let _ = writeln!(
            out,
            "  kicked    {}: {}: {}",
            utc(k.get("time").and_then(Value::as_f64).unwrap_or(0.0)),
            k.get("tag").and_then(Value::as_str).unwrap_or(""),
            k.get("message").and_then(Value::as_str).unwrap_or("")
        );
    }
    let empty = serde_json::Map::new();
    let lanes = state["lanes"].as_object().unwrap_or(&empty);
    let mut by_lane = Vec::new();
    for (name, l) in lanes {
        let s = &l["sessions"];
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        by_lane.push(format!(
            "{name}: api {}, event {}, universal {}",
            n("api"),
            n("event"),
            n("universal")
        ));
    }
    let _ = writeln!(
        out,
        "  sessions  {} open ({})",
        state["sessions"]["total"].as_u64().unwrap_or(0),
        by_lane.join("; ")
    );
    if lanes.len() > 1 {
        for (name, l) in lanes {
            let _ = writeln!(
                out,
                "  lane      {name}: {} {} since {}: {}",
                word(&l["state"]),
                str_of(&l["cause"]),
                utc(l["since"].as_f64().unwrap_or(0.0)),
                str_of(&l["reason"])
            );
        }
    }
    let items = transitions["transitions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "\nrecent transitions ({} of {} so far, newest first)",
        items.len(),
        transitions["last_seq"].as_u64().unwrap_or(0)
    );
    if items.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    let _ = writeln!(
        out,
        "  {:<20} {:<10} {:<10} {:<14} {:>12} {:>7}  reason",
        "time (UTC)", "lane", "state", "cause", "lasted", "closed"
    );
    for r in items.iter().rev() {
        let lasted = human(r["lasted_seconds"].as_f64().unwrap_or(0.0));
        let lasted = if r["ongoing"] == true {
            format!("{lasted}+")
        } else {
            lasted
        };
        let arrow = format!(
            "{}>{}",
            str_of(&r["previous"]["state"]),
            str_of(&r["state"])
        );
        let arrow_padded = format!("{arrow:<10}");
        let arrow_shown = if r["state"] == "up" {
            paint("32", &arrow_padded)
        } else {
            paint("31", &arrow_padded)
        };
        let mut reason = str_of(&r["reason"]);
        if reason.chars().count() > 70 {
            reason = reason.chars().take(69).collect::<String>() + "…";
        }
        let _ = writeln!(
            out,
            "  {:<20} {:<10} {} {:<14} {:>12} {:>7}  {}",
            utc(r["time"].as_f64().unwrap_or(0.0)),
            str_of(&r["lane"]),
            arrow_shown,
            str_of(&r["cause"]),
            lasted,
            r["sessions_closed"].as_u64().unwrap_or(0),
            reason
        );
    }
    out
}

/// `1.2 s`, `3 min 4 s`, `2 h 5 min`, `3 d 4 h`.
pub fn human(sec: f64) -> String {
    let sec = sec.max(0.0);
    if sec < 1.0 {
        format!("{} ms", (sec * 1000.0).round() as u64)
    } else if sec < 60.0 {
        format!("{sec:.1} s")
    } else if sec < 3600.0 {
        format!("{} min {} s", (sec / 60.0) as u64, (sec % 60.0) as u64)
    } else if sec < 86400.0 {
        format!(
            "{} h {} min",
            (sec / 3600.0) as u64,
            ((sec % 3600.0) / 60.0) as u64
        )
    } else {
        format!(
            "{} d {} h",
            (sec / 86400.0) as u64,
            ((sec % 86400.0) / 3600.0) as u64
        )
    }
}

/// A Unix time as `YYYY-MM-DD HH:MM:SS` in UTC (no time-zone database needed).
pub fn utc(unix: f64) -> String {
    let secs = unix.max(0.0) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
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
    http_request_with(addr, method, path, timeout, None)
}

/// [`http_request`] with `Authorization: Bearer <token>` when a token is given.
pub fn http_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    timeout: std::time::Duration,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
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
