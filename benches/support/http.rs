//! `relay http`: the HTTP transports measured in one run, beside direct calls to the same
//! simulator (see BENCHMARKS.md, "HTTP transports").
//!
//! One process holds the simulator (its HTTP API server and HTTP POST client), a bot's
//! HTTP POST receiver (204, like NoneBot) and the load generator; lifeguard is the real
//! binary in its own process. Repetitions alternate direct and lifeguard.
//!
//! - **API**: `conns` keep-alive connections each call `get_status` one at a time; latency
//!   percentiles and calls/s, direct to the simulator's HTTP server and through lifeguard's
//!   client port.
//! - **POST relay**: the simulator posts `events` message events like NapCat (a request per
//!   event, concurrently, at most 256 in flight); events/s as the bot receives them, the
//!   simulator posting to the bot directly and through lifeguard.
//! - **Bot outage**: the simulator posts one at a time (so its order is the reference) at
//!   `rate` events/s; the bot is gone (connections refused) for `outage`; afterwards: what
//!   the bot got, whether in order, and lifeguard's own counts (retries, drops, lost quick
//!   operations).

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lifeguard::sim::{HttpServerConfig, NapSim, PostConfig, PostHandle, SimConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Res;

#[derive(clap::Args, Clone)]
pub struct HttpArgs {
    /// The lifeguard binary to measure.
    #[arg(long)]
    lifeguard: PathBuf,
    /// Repetitions (each: direct then lifeguard, or the other way round).
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Small sizes for a smoke run of a few seconds.
    #[arg(long)]
    quick: bool,
    /// JSON lines are appended here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The table, written as well as printed.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// nginx, to measure it as a plain HTTP reverse proxy of the API beside lifeguard (a
    /// reference: keep-alive upstream connections, no auth, no state).
    #[arg(long)]
    nginx: Option<PathBuf>,
}

/// nginx proxying the API to `upstream` (its own prefix directory under the temp dir).
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Nginx {
    async fn start(bin: &PathBuf, upstream: SocketAddr) -> Res<Nginx> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir =
            std::env::temp_dir().join(format!("lifeguard-bench-nginx-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("logs"))?;
        let d = dir.display();
        let conf = format!(
            "worker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log error;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             keepalive_requests 1000000;\n\
             upstream napcat {{ server {upstream}; keepalive 64; keepalive_requests 1000000; }}\n\
             server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://napcat; \
             proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let child = Command::new(bin)
            .args([
                "-p",
                &d.to_string(),
                "-c",
                &format!("{d}/nginx.conf"),
                "-g",
                "daemon off;",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let nginx = Nginx { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).await.is_err() {
            if Instant::now() > deadline {
                return Err("nginx did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(nginx)
    }
}

/// A bot's receiver: counts what it gets, answers 204, can go away and come back.
#[derive(Clone)]
struct Bot {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Bytes>>>,
    count: watch::Sender<usize>,
    running: Arc<Mutex<CancellationToken>>,
}

impl Bot {
    async fn start() -> Res<Bot> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let bot = Bot {
            addr: l.local_addr()?,
            got: Arc::default(),
            count: watch::Sender::new(0),
            running: Arc::new(Mutex::new(CancellationToken::new())),
        };
        bot.serve(l);
        Ok(bot)
    }

    fn serve(&self, l: TcpListener) {
        let token = self.running.lock().unwrap().clone();
        let bot = self.clone();
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = token.cancelled() => return,
                    r = l.accept() => match r { Ok((t, _)) => t, Err(_) => continue },
                };
                let _ = tcp.set_nodelay(true);
                let (bot, token) = (bot.clone(), token.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let bot = bot.clone();
                        async move {
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            bot.got.lock().unwrap().push(body);
                            bot.count.send_modify(|n| *n += 1);
                            let mut r = Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = StatusCode::NO_CONTENT;
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc);
                    tokio::select! { _ = token.cancelled() => {}, _ = conn => {} }
                });
            }
        });
    }

    fn down(&self) {
        self.running.lock().unwrap().cancel();
    }

    async fn up(&self) -> Res<()> {
        *self.running.lock().unwrap() = CancellationToken::new();
        let l = TcpListener::bind(self.addr).await?;
        self.serve(l);
        Ok(())
    }

    fn reset(&self) {
        self.got.lock().unwrap().clear();
        self.count.send_replace(0);
    }

    async fn wait(&self, n: usize, limit: Duration) -> Res<()> {
        let mut rx = self.count.subscribe();
        let waited = tokio::time::timeout(limit, rx.wait_for(|c| *c >= n))
            .await
            .is_ok();
        if !waited {
            return Err(format!(
                "the bot got {} of {n} events in {limit:?}",
                *self.count.borrow()
            )
            .into());
        }
        Ok(())
    }
}

/// lifeguard as a child process, with its addresses from its "lifeguard started" line.
struct Lifeguard {
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
    post: SocketAddr,
}

impl Drop for Lifeguard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Lifeguard {
    fn start(bin: &PathBuf, http_url: &str, bot: SocketAddr) -> Res<Lifeguard> {
        let mut child = Command::new(bin)
            .args([
                "--upstream-http",
                http_url,
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args([
                "--post-listen",
                "127.0.0.1:0",
                "--post-url",
                &format!("http://{bot}/"),
            ])
            .args(["--probe-interval", "1s", "--log-format", "json"])
            .env("RUST_LOG", "warn,lifeguard=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("lifeguard started") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line);
                    }
                }
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(10))?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        let addr = |k: &str| -> Res<SocketAddr> { Ok(v[k].as_str().ok_or("no address")?.parse()?) };
        Ok(Lifeguard {
            listen: addr("listen")?,
            admin: addr("admin")?,
            post: addr("post_listen")?,
            child,
        })
    }

    /// Sum of the samples of `name` (any labels) on /metrics.
    async fn metric(&self, name: &str) -> Res<f64> {
        let text = get(self.admin, "/metrics").await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    async fn wait_ready(&self) -> Res<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while get_status(self.admin, "/ready").await? != 200 {
            if Instant::now() > deadline {
                return Err("lifeguard never became ready".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

async fn get_status(addr: SocketAddr, path: &str) -> Res<u16> {
    let mut c = Conn::open(addr).await?;
    Ok(c.get(path).await?.0)
}

async fn get(addr: SocketAddr, path: &str) -> Res<String> {
    let mut c = Conn::open(addr).await?;
    Ok(c.get(path).await?.1)
}

/// One keep-alive client connection.
struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    host: String,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Res<Conn> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            sender,
            host: addr.to_string(),
        })
    }

    async fn get(&mut self, path: &str) -> Res<(u16, String)> {
        self.sender.ready().await?;
        let req = Request::get(path)
            .header("host", &self.host)
            .body(Empty::new())?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

struct Sizes {
    conns: usize,
    calls: usize,
    warmup: usize,
    events: u64,
    rate: u64,
    outage: Duration,
}

/// One figure, as a JSON line and a table cell.
fn record(out: &mut Option<std::fs::File>, v: serde_json::Value) {
    eprintln!("{v}");
    if let Some(f) = out {
        let _ = writeln!(f, "{v}");
    }
}

pub async fn http_mode(a: HttpArgs) -> Res<()> {
    let z = if a.quick {
        Sizes {
            conns: 4,
            calls: 200,
            warmup: 20,
            events: 1000,
            rate: 200,
            outage: Duration::from_secs(1),
        }
    } else {
        Sizes {
            conns: 16,
            calls: 2000,
            warmup: 100,
            events: 20_000,
            rate: 200,
            outage: Duration::from_secs(10),
        }
    };
    let mut out = match &a.out {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
        None => None,
    };
    let sim = NapSim::start(SimConfig::default().with_heartbeat_interval(None)).await?;
    sim.start_http(HttpServerConfig::default()).await?;
    let http_url = sim.http_url().ok_or("no HTTP server")?;
    let http_addr = sim.http_addr().ok_or("no HTTP server")?;
    let bot = Bot::start().await?;
    let lg = Lifeguard::start(&a.lifeguard, &http_url, bot.addr)?;
    lg.wait_ready().await?;
    let nginx = match &a.nginx {
        Some(bin) => Some(Nginx::start(bin, http_addr).await?),
        None => None,
    };
    // The `enable` lifeguard sends at start.
    bot.wait(1, Duration::from_secs(10)).await?;

    let mut rows: Vec<serde_json::Value> = Vec::new();
    for rep in 1..=a.reps {
        let mut order = vec![("direct", http_addr), ("lifeguard", lg.listen)];
        if let Some(n) = &nginx {
            order.push(("nginx", n.addr));
        }
        let k = order.len();
        order.rotate_left((rep as usize - 1) % k);
        for (target, addr) in order {
            for (conns, calls, scenario) in [
                (1, z.calls * 2, "http-api-1"),
                (z.conns, z.calls, "http-api"),
            ] {
                let v = api(target, addr, conns, calls, z.warmup, scenario, rep).await?;
                record(&mut out, v.clone());
                rows.push(v);
            }
        }
        for target in if rep % 2 == 1 {
            ["direct", "lifeguard"]
        } else {
            ["lifeguard", "direct"]
        } {
            let url = match target {
                "direct" => format!("http://{}/", bot.addr),
                _ => format!("http://{}/", lg.post),
            };
            let v = post_rate(&sim, &bot, target, &url, &z, rep).await?;
            record(&mut out, v.clone());
            rows.push(v);
        }
    }
    let v = outage(&sim, &bot, &lg, &z).await?;
    record(&mut out, v.clone());
    rows.push(v);
    let table = table(&rows, &z, a.reps);
    println!("{table}");
    if let Some(p) = &a.markdown {
        std::fs::write(p, &table)?;
    }
    drop(lg);
    drop(nginx);
    sim.shutdown().await;
    Ok(())
}

/// API calls: `conns` connections, one call at a time each.
async fn api(
    target: &str,
    addr: SocketAddr,
    conns: usize,
    calls: usize,
    warmup: usize,
    scenario: &str,
    rep: u32,
) -> Res<serde_json::Value> {
    let barrier = Arc::new(tokio::sync::Barrier::new(conns));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(addr).await?;
            for _ in 0..warmup {
                c.get("/get_status").await?;
            }
            barrier.wait().await;
            let t0 = Instant::now();
            let mut lat = Vec::with_capacity(calls);
            for _ in 0..calls {
                let t = Instant::now();
                let (status, body) = c.get("/get_status").await?;
                if status != 200 || !body.contains("\"retcode\":0") {
                    return Err(format!("get_status answered {status}: {body}").into());
                }
                lat.push(t.elapsed());
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((t0, Instant::now(), lat))
        }));
    }
    let mut all = Vec::new();
    let (mut start, mut end) = (None::<Instant>, None::<Instant>);
    for t in tasks {
        let (t0, t1, lat) = t.await??;
        start = Some(start.map_or(t0, |s| s.min(t0)));
        end = Some(end.map_or(t1, |e| e.max(t1)));
        all.extend(lat);
    }
    all.sort();
    let pct =
        |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1e6;
    let secs = (end.ok_or("no call")? - start.ok_or("no call")?).as_secs_f64();
    Ok(serde_json::json!({
        "scenario": scenario, "target": target, "rep": rep, "conns": conns,
        "calls": all.len(), "p50_us": pct(0.50), "p99_us": pct(0.99),
        "calls_per_s": all.len() as f64 / secs,
    }))
}

/// Post `events` like NapCat (concurrent, at most `window` in flight) to `url`; events/s
/// as the bot receives them.
async fn post_rate(
    sim: &NapSim,
    bot: &Bot,
    target: &str,
    url: &str,
    z: &Sizes,
    rep: u32,
) -> Res<serde_json::Value> {
    const WINDOW: u64 = 256;
    let entry = sim.add_post(PostConfig::napcat(url).with_content_length());
    bot.reset();
    let t0 = Instant::now();
    let mut emitted = 0;
    while emitted < z.events {
        let st = entry.status();
        let room = WINDOW
            .saturating_sub(st.posted - st.finished)
            .min(z.events - emitted);
        for _ in 0..room {
            emitted += 1;
            sim.emit_message(emitted);
        }
        if room == 0 {
            let posted = st.posted;
            entry.wait_status(|s| s.finished + WINDOW > posted).await;
        }
    }
    bot.wait(z.events as usize, Duration::from_secs(120))
        .await?;
    let secs = t0.elapsed().as_secs_f64();
    entry.disable();
    let failed = entry
        .outcomes()
        .iter()
        .filter(|o| o.error.is_some())
        .count();
    Ok(serde_json::json!({
        "scenario": "http-post", "target": target, "rep": rep, "events": z.events,
        "events_per_s": z.events as f64 / secs, "failed_posts": failed,
    }))
}

/// The bot gone for `outage` while events keep coming at `rate`.
async fn outage(sim: &NapSim, bot: &Bot, lg: &Lifeguard, z: &Sizes) -> Res<serde_json::Value> {
    let entry: PostHandle = sim.add_post(
        PostConfig::napcat(format!("http://{}/", lg.post))
            .with_content_length()
            .serial(),
    );
    bot.reset();
    let before = (
        lg.metric("lifeguard_post_retries_total").await?,
        lg.metric("lifeguard_post_dropped_total").await?,
        lg.metric("lifeguard_post_quick_operations_total{result=\"lost\"}")
            .await?,
    );
    let lead = Duration::from_secs(if z.outage > Duration::from_secs(2) {
        2
    } else {
        1
    });
    let total = lead + z.outage + lead;
    let n = (total.as_secs_f64() * z.rate as f64) as u64;
    let first = 1_000_000u64;
    let gap = Duration::from_secs_f64(1.0 / z.rate as f64);
    let t0 = Instant::now();
    let mut down_at = None;
    let mut up_at = None;
    let mut during = 0u64;
    let mut drained = None;
    for i in 0..n {
        let at = t0 + gap * i as u32;
        tokio::time::sleep_until(at.into()).await;
        if down_at.is_none() && t0.elapsed() >= lead {
            bot.down();
            down_at = Some(Instant::now());
        }
        if up_at.is_none() && down_at.is_some_and(|d| d.elapsed() >= z.outage) {
            bot.up().await?;
            let up = Instant::now();
            up_at = Some(up);
            // The backlog: every event posted before the bot came back.
            let (bot, backlog) = (bot.clone(), i as usize);
            drained = Some(tokio::spawn(async move {
                bot.wait(backlog, Duration::from_secs(60))
                    .await
                    .map(|_| up.elapsed())
            }));
        }
        if down_at.is_some() && up_at.is_none() {
            during += 1;
        }
        sim.emit_message(first + i);
    }
    entry.wait_finished(n).await;
    let failed_posts = entry
        .outcomes()
        .iter()
        .filter(|o| o.error.is_some())
        .count();
    bot.wait(n as usize, Duration::from_secs(60)).await?;
    let drained = match drained {
        Some(t) => t.await?.map_err(|e| e.to_string())?.as_secs_f64(),
        None => 0.0,
    };
    let ids: Vec<u64> = bot
        .got
        .lock()
        .unwrap()
        .iter()
        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
        .filter_map(|v| v["message_id"].as_u64())
        .filter(|id| *id >= first)
        .collect();
    let in_order = ids.windows(2).all(|w| w[0] < w[1]);
    let complete = ids.len() as u64 == n;
    entry.disable();
    Ok(serde_json::json!({
        "scenario": "http-post-outage", "target": "lifeguard", "outage_s": z.outage.as_secs_f64(),
        "rate": z.rate, "events": n, "emitted_during_outage": during,
        "failed_posts": failed_posts,
        "delivered": ids.len(), "in_order": in_order, "complete": complete,
        "retries": lg.metric("lifeguard_post_retries_total").await? - before.0,
        "dropped": lg.metric("lifeguard_post_dropped_total").await? - before.1,
        "quick_operations_lost": lg.metric("lifeguard_post_quick_operations_total{result=\"lost\"}").await? - before.2,
        "backlog_delivered_s_after_up": drained,
    }))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn table(rows: &[serde_json::Value], z: &Sizes, reps: u32) -> String {
    let m = |scenario: &str, target: &str, key: &str| {
        median(
            rows.iter()
                .filter(|r| r["scenario"] == scenario && r["target"] == target)
                .filter_map(|r| r[key].as_f64())
                .collect(),
        )
    };
    let mut t = String::new();
    t.push_str(&format!(
        "HTTP transports, medians of {reps} repetition(s) (get_status calls: 1 connection x {}, {} connections x {} each; {} posted events)\n\n",
        z.calls * 2, z.conns, z.calls, z.events
    ));
    let nginx = rows.iter().any(|r| r["target"] == "nginx");
    t.push_str(
        "| | direct | lifeguard | added by lifeguard | nginx (API only) |\n|---|---|---|---|---|\n",
    );
    for (label, scenario, key, unit) in [
        (
            "API p50 latency, 1 connection",
            "http-api-1",
            "p50_us",
            "µs",
        ),
        (
            "API p99 latency, 1 connection",
            "http-api-1",
            "p99_us",
            "µs",
        ),
        ("API calls/s, 1 connection", "http-api-1", "calls_per_s", ""),
        (
            "API p50 latency, many connections",
            "http-api",
            "p50_us",
            "µs",
        ),
        (
            "API p99 latency, many connections",
            "http-api",
            "p99_us",
            "µs",
        ),
        (
            "API calls/s, many connections",
            "http-api",
            "calls_per_s",
            "",
        ),
        ("POST relay events/s", "http-post", "events_per_s", ""),
    ] {
        let (d, l) = (m(scenario, "direct", key), m(scenario, "lifeguard", key));
        let added = if unit.is_empty() {
            format!("{:.2}×", l / d)
        } else {
            format!("+{:.0} {unit}", l - d)
        };
        let n = m(scenario, "nginx", key);
        let n = if nginx && !n.is_nan() {
            format!("{n:.0} {unit}")
        } else {
            "–".into()
        };
        t.push_str(&format!(
            "| {label} | {d:.0} {unit} | {l:.0} {unit} | {added} | {n} |\n"
        ));
    }
    if let Some(o) = rows.iter().find(|r| r["scenario"] == "http-post-outage") {
        t.push_str(&format!(
            "\nBot down for {} s at {} events/s: {} events, {} posted during the outage, {} POSTs failed for the backend; \
             delivered {} ({}), in order: {}; retries {}, dropped {}, quick operations lost {}; the backlog was delivered {:.2} s after the bot was back.\n",
            o["outage_s"], o["rate"], o["events"], o["emitted_during_outage"], o["failed_posts"],
            o["delivered"], if o["complete"] == true { "all" } else { "NOT all" }, o["in_order"],
            o["retries"], o["dropped"], o["quick_operations_lost"],
            o["backlog_delivered_s_after_up"].as_f64().unwrap_or(0.0)
        ));
    }
    t
}
