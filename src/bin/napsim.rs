//! `napsim`: the NapCat simulator (`lifeguard::sim`) as a process of its own, for tests
//! that need a backend they can SIGKILL, SIGSTOP and restart (the fault matrix, the soak)
//! and for trying lifeguard by hand.
//!
//! ```text
//! napsim [--listen 127.0.0.1:0] [--control 127.0.0.1:0] [--heartbeat-ms N] [--flaky-api-every N]
//!        [--reverse-url ws://HOST:PORT/PATH ...] [--reverse-token T] [--reverse-reconnect-ms N]
//!        [--http-listen 127.0.0.1:0] [--post-url http://HOST:PORT/PATH ...] [--post-secret S]
//! ```
//!
//! Each `--reverse-url` is a reverse WebSocket entry (NapCat's `websocketClients`, NapCat
//! v4's headers, `Bearer <--reverse-token>` even when empty): it dials at once and redials
//! `--reverse-reconnect-ms` (NapCat's default 5000) after every close or failed dial; its
//! heartbeats follow `--heartbeat-ms` (NapCat's `heartInterval` is per entry).
//!
//! `--http-listen` starts the HTTP API server (NapCat's `httpServers`, no token). Each
//! `--post-url` is an HTTP POST entry (NapCat's `httpClients`, `PostConfig::napcat`: every
//! event its own concurrent request, no heartbeats, no lifecycle events), signed with
//! `--post-secret` when one is given (the entry's `token`).
//!
//! It prints one line on stdout, `napsim upstream=ws://HOST:PORT control=HOST:PORT pid=N`
//! (with ` http=http://HOST:PORT` when the HTTP server runs), and then takes one command per line on the control address, answering one line each:
//!
//! | command | answer |
//! |---|---|
//! | `ping`, `pid`, `open`, `handshakes [PATH]` | `ok`, the pid, open WebSocket connections, handshakes so far |
//! | `emit_seq FIRST COUNT` | emits message events `FIRST..FIRST+COUNT` to every event client; recipients of the last |
//! | `blast N` | N numbered events, written to every socket before answering; clients that got all |
//! | `heartbeat` | a heartbeat now; recipients |
//! | `disable_3110`, `disable_v4`, `enable` | `ok`: the forward server only, as in `NapSim` (NapCat switches each network entry on its own) |
//! | `reverse_disable`, `reverse_enable` | `ok`: every reverse entry switched off (a Close with no code, no redial) or on (dials at once), as NapCat's hot reload of a `websocketClients` entry |
//! | `reverse` | `connected=N dials=N handshakes=N failures=N`, summed over the reverse entries |
//! | `http_disable`, `http_enable` | `ok`: the HTTP server switched off (new connects refused, kept-alive ones answer `Server is closed`) or on again, as NapCat's hot reload of an `httpServers` entry |
//! | `post_disable`, `post_enable` | `ok`: every POST entry switched off (nothing more is posted; requests in flight finish) or on, as NapCat's hot reload of an `httpClients` entry |
//! | `post` | `posted=N finished=N failed=N quick=N`, summed over the POST entries (`failed`: finished with an error or a non-2xx status, among the last few thousand) |
//! | `kill`, `hang`, `unhang`, `offline`, `online` | `ok` (see `NapSim`; they apply to reverse entries, the HTTP server and POST entries too) |
//! | `quit` | exits |
//!
//! `--flaky-api-every N` puts a front on the listen address that drops every Nth connection
//! to exactly `/api` (lifeguard's probes; `/api/` passes) before its handshake: a backend
//! that fails one probe in N.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lifeguard::sim::{
    HttpServerConfig, NapSim, PostConfig, PostHandle, ReverseConfig, ReverseHandle, SimConfig,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

struct Args {
    listen: SocketAddr,
    control: SocketAddr,
    heartbeat: Option<Duration>,
    flaky_api_every: Option<u64>,
    reverse_urls: Vec<String>,
    reverse_token: String,
    reverse_reconnect: Option<Duration>,
    http_listen: Option<SocketAddr>,
    post_urls: Vec<String>,
    post_secret: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        control: SocketAddr::from(([127, 0, 0, 1], 0)),
        heartbeat: None,
        flaky_api_every: None,
        reverse_urls: Vec::new(),
        reverse_token: String::new(),
        reverse_reconnect: None,
        http_listen: None,
        post_urls: Vec::new(),
        post_secret: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => a.listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--control" => a.control = value()?.parse().map_err(|e| format!("--control: {e}"))?,
            "--heartbeat-ms" => {
                let ms: u64 = value()?
                    .parse()
                    .map_err(|e| format!("--heartbeat-ms: {e}"))?;
                a.heartbeat = (ms > 0).then(|| Duration::from_millis(ms));
            }
            "--flaky-api-every" => {
                let n: u64 = value()?
                    .parse()
                    .map_err(|e| format!("--flaky-api-every: {e}"))?;
                a.flaky_api_every = (n > 0).then_some(n);
            }
            "--reverse-url" => a.reverse_urls.push(value()?),
            "--reverse-token" => a.reverse_token = value()?,
            "--reverse-reconnect-ms" => {
                let ms: u64 = value()?
                    .parse()
                    .map_err(|e| format!("--reverse-reconnect-ms: {e}"))?;
                a.reverse_reconnect = Some(Duration::from_millis(ms));
            }
            "--http-listen" => {
                a.http_listen = Some(
                    value()?
                        .parse()
                        .map_err(|e| format!("--http-listen: {e}"))?,
                )
            }
            "--post-url" => a.post_urls.push(value()?),
            "--post-secret" => a.post_secret = Some(value()?),
            "-h" | "--help" => {
                println!("napsim [--listen ADDR] [--control ADDR] [--heartbeat-ms N] [--flaky-api-every N] [--reverse-url URL ...] [--reverse-token T] [--reverse-reconnect-ms N] [--http-listen ADDR] [--post-url URL ...] [--post-secret S]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("napsim: {e}");
            std::process::exit(64);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("napsim: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> std::io::Result<()> {
    let cfg = SimConfig::default().with_heartbeat_interval(args.heartbeat);
    let (sim, upstream) = match args.flaky_api_every {
        None => {
            let sim = NapSim::start_on(args.listen, cfg).await?;
            let url = sim.url();
            (sim, url)
        }
        Some(every) => {
            let sim = NapSim::start(cfg).await?;
            let front = TcpListener::bind(args.listen).await?;
            let url = format!("ws://{}", front.local_addr()?);
            tokio::spawn(flaky_front(front, sim.addr(), every));
            (sim, url)
        }
    };
    let reverse: Vec<ReverseHandle> = args
        .reverse_urls
        .iter()
        .map(|url| {
            let mut cfg = ReverseConfig::napcat(url.as_str())
                .with_token(args.reverse_token.as_str())
                .with_heartbeat_interval(args.heartbeat);
            if let Some(every) = args.reverse_reconnect {
                cfg = cfg.with_reconnect_interval(every);
            }
            sim.add_reverse(cfg)
        })
        .collect();
    let reverse = Arc::new(reverse);
    let http = match args.http_listen {
        Some(addr) => {
            let cfg = HttpServerConfig {
                addr,
                ..HttpServerConfig::default()
            };
            Some(sim.start_http(cfg).await?)
        }
        None => None,
    };
    let posts: Vec<PostHandle> = args
        .post_urls
        .iter()
        .map(|url| {
            let mut cfg = PostConfig::napcat(url.as_str());
            if let Some(secret) = &args.post_secret {
                cfg = cfg.with_token(secret.as_str());
            }
            sim.add_post(cfg)
        })
        .collect();
    let posts = Arc::new(posts);
    let ctl = TcpListener::bind(args.control).await?;
    let http = http
        .map(|a| format!(" http=http://{a}"))
        .unwrap_or_default();
    println!(
        "napsim upstream={upstream} control={} pid={}{http}",
        ctl.local_addr()?,
        std::process::id()
    );
    loop {
        let (sock, _) = ctl.accept().await?;
        let sim = sim.clone();
        let reverse = reverse.clone();
        let posts = posts.clone();
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = command(&sim, &reverse, &posts, &line).await;
                if w.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn command(
    sim: &NapSim,
    reverse: &[ReverseHandle],
    posts: &[PostHandle],
    line: &str,
) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| -> Result<u64, String> {
        words
            .get(i)
            .ok_or_else(|| format!("err {line:?} needs a number"))?
            .parse()
            .map_err(|e| format!("err {e}"))
    };
    let ok = |()| "ok".to_string();
    let done = |f: &dyn Fn()| -> Result<String, String> {
        f();
        Ok("ok".into())
    };
    let r: Result<String, String> = match words.first().copied().unwrap_or("") {
        "ping" => Ok("ok".into()),
        "pid" => Ok(std::process::id().to_string()),
        "open" => Ok(sim.open_connections().to_string()),
        "handshakes" => Ok(match words.get(1) {
            Some(path) => sim.handshakes_on(path),
            None => sim.handshakes(),
        }
        .to_string()),
        "emit_seq" => (|| {
            let (first, count) = (num(1)?, num(2)?);
            let mut got = 0;
            for seq in first..first + count {
                got = sim.emit_message(seq);
            }
            Ok(got.to_string())
        })(),
        "blast" => match num(1) {
            Ok(n) => Ok(sim.blast(n).await.to_string()),
            Err(e) => Err(e),
        },
        "heartbeat" => Ok(sim.heartbeat_now().to_string()),
        "disable_3110" => done(&|| sim.disable_3110()),
        "disable_v4" => done(&|| sim.disable_v4()),
        "enable" => sim.enable().await.map(ok).map_err(|e| format!("err {e}")),
        "reverse_disable" => done(&|| reverse.iter().for_each(|r| r.disable())),
        "reverse_enable" => done(&|| reverse.iter().for_each(|r| r.enable())),
        "reverse" => {
            let all: Vec<_> = reverse.iter().map(|r| r.status()).collect();
            Ok(format!(
                "connected={} dials={} handshakes={} failures={}",
                all.iter().filter(|s| s.connected).count(),
                all.iter().map(|s| s.dials).sum::<u64>(),
                all.iter().map(|s| s.handshakes).sum::<u64>(),
                all.iter().map(|s| s.failures).sum::<u64>(),
            ))
        }
        "http_disable" => done(&|| sim.disable_http()),
        "http_enable" => sim
            .enable_http()
            .await
            .map(ok)
            .map_err(|e| format!("err {e}")),
        "post_disable" => done(&|| posts.iter().for_each(|p| p.disable())),
        "post_enable" => done(&|| posts.iter().for_each(|p| p.enable())),
        "post" => {
            let all: Vec<_> = posts.iter().map(|p| p.status()).collect();
            let failed: usize = posts
                .iter()
                .map(|p| p.outcomes().iter().filter(|o| o.error.is_some()).count())
                .sum();
            Ok(format!(
                "posted={} finished={} failed={failed} quick={}",
                all.iter().map(|s| s.posted).sum::<u64>(),
                all.iter().map(|s| s.finished).sum::<u64>(),
                all.iter().map(|s| s.quick_operations).sum::<u64>(),
            ))
        }
        "kill" => done(&|| sim.kill()),
        "hang" => done(&|| sim.hang()),
        "unhang" => done(&|| sim.unhang()),
        "offline" => done(&|| sim.set_online(false)),
        "online" => done(&|| sim.set_online(true)),
        "quit" => std::process::exit(0),
        _ => Err(format!("err unknown command {line:?}")),
    };
    r.unwrap_or_else(|e| e)
}

/// Relay every connection to the simulator, except every `every`th `/api` one, which is
/// closed before its handshake.
async fn flaky_front(front: TcpListener, sim: SocketAddr, every: u64) {
    let api = Arc::new(AtomicU64::new(0));
    while let Ok((mut client, _)) = front.accept().await {
        let api = api.clone();
        tokio::spawn(async move {
            // `GET /api ` or `GET /api?`: lifeguard's probes (sessions on `/api/` pass).
            let mut head = vec![0u8; 9];
            if client.read_exact(&mut head).await.is_err() {
                return;
            }
            let probe = head.starts_with(b"GET /api") && matches!(head[8], b' ' | b'?');
            if probe && (api.fetch_add(1, Ordering::Relaxed) + 1) % every == 0 {
                return;
            }
            let Ok(mut upstream) = TcpStream::connect(sim).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            if upstream.write_all(&head).await.is_err() {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
    }
}
