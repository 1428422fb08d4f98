//! Benchmark harness: lifeguard side by side with a direct connection, nginx and HAProxy.
//!
//! One binary, three modes (`benches/run.sh` drives them; see BENCHMARKS.md):
//!
//! * `sim --listen ADDR --control ADDR`: the project's NapCat simulator (`lifeguard::sim`) as
//!   the shared upstream, in its own process (it holds one socket per session, so the load
//!   generator and the simulator each stay under the 20,000 fd hard limit), driven over a
//!   line protocol on the control address (`blast N`, `disable_3110`, `enable`, `pid`, ...).
//! * `run --target NAME --url ws://HOST:PORT --control ADDR [--pids P,...] [--admin ADDR]`:
//!   measures one target (throughput, round trip, idle memory, CPU per event, and for
//!   lifeguard the disable and detection times) and appends JSON lines to `--out`.
//! * `report --input FILE`: medians with min and max over repetitions, ratios to `direct`
//!   (and CPU to `haproxy`), one Markdown table.
//!
//! `cargo bench` passes `--bench`; it is ignored.

use std::collections::BTreeMap;
use std::error::Error;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Barrier, Semaphore};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;
type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Parser)]
#[command(about = "lifeguard benchmark harness (see benches/run.sh)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the NapCat simulator as the upstream, controlled over a line protocol.
    Sim {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        control: SocketAddr,
    },
    /// Measure one target and append JSON lines to --out.
    Run(Box<RunArgs>),
    /// Reference relay, not a product: copies bytes both ways (tokio, 64 KiB buffers) and
    /// parses nothing but nothing else either; the floor of a user-space proxy's cost here.
    Floor {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        upstream: SocketAddr,
    },
    /// Aggregate JSON lines into the table.
    Report {
        #[arg(long)]
        input: PathBuf,
        /// Written as well as printed, when given.
        #[arg(long)]
        markdown: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Target name: direct, lifeguard, nginx, haproxy, floor (or an A/B variant name).
    #[arg(long)]
    target: String,
    /// Base URL of the target, e.g. ws://127.0.0.1:18081 (paths are appended).
    #[arg(long)]
    url: String,
    /// The simulator's control address.
    #[arg(long)]
    control: SocketAddr,
    /// Proxy process ids (comma separated) whose CPU and RSS are measured; empty for direct.
    #[arg(long, default_value = "")]
    pids: String,
    /// lifeguard's admin address: enables the disable and detection scenarios.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Comma separated: idle,tput,rtt,disable,detect.
    #[arg(long, default_value = "idle,tput,rtt,disable,detect")]
    scenarios: String,
    /// Repetition number recorded with each figure.
    #[arg(long, default_value_t = 1)]
    rep: u32,
    /// JSON lines are appended here (and printed on stderr).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Small sizes for a smoke run of a few seconds.
    #[arg(long)]
    quick: bool,
    /// Idle sessions for the memory and disable scenarios [9000; quick 200].
    #[arg(long)]
    sessions: Option<usize>,
    /// Events per connection, 1-connection throughput run [1000000; quick 20000].
    #[arg(long)]
    events_1: Option<u64>,
    /// Events per connection, 64-connection throughput run [30000; quick 300].
    #[arg(long)]
    events_64: Option<u64>,
    /// Measured API calls, 1 connection [20000; quick 500].
    #[arg(long)]
    calls_1: Option<usize>,
    /// Measured API calls per connection, 64 connections [1000; quick 20].
    #[arg(long)]
    calls_64: Option<usize>,
    /// Upper bound for any single wait, seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let cli = Cli::parse_from(args);
    raise_nofile();
    let threads = std::env::var("RELAY_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2usize);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Sim { listen, control } => sim_mode(listen, control).await,
            Cmd::Run(args) => run_mode(*args).await,
            Cmd::Floor { listen, upstream } => floor_mode(listen, upstream).await,
            Cmd::Report { input, markdown } => report_mode(input, markdown),
        }
    });
    if let Err(e) = result {
        eprintln!("relay: error: {e}");
        std::process::exit(1);
    }
}

/// Soft fd limit up to the hard limit (20,000 here): 9,000 sessions need 9,000 fds in the
/// load generator and 9,000 in the simulator.
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Simulator process
// ---------------------------------------------------------------------------------------

async fn sim_mode(listen: SocketAddr, control: SocketAddr) -> Res<()> {
    let sim =
        lifeguard::sim::NapSim::start_on(listen, lifeguard::sim::SimConfig::default()).await?;
    let sim = Arc::new(sim);
    let ctl = TcpListener::bind(control).await?;
    eprintln!(
        "relay sim: upstream {} control {} pid {}",
        sim.url(),
        ctl.local_addr()?,
        std::process::id()
    );
    loop {
        let (sock, _) = ctl.accept().await?;
        let sim = sim.clone();
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut it = line.split_whitespace();
                let reply = match (it.next(), it.next()) {
                    (Some("ping"), _) => "ok".to_string(),
                    (Some("pid"), _) => std::process::id().to_string(),
                    (Some("open"), _) => sim.open_connections().to_string(),
                    (Some("blast"), Some(n)) => match n.parse::<u64>() {
                        Ok(n) => sim.blast(n).await.to_string(),
                        Err(e) => format!("err {e}"),
                    },
                    (Some("disable_3110"), _) => {
                        sim.disable_3110();
                        "ok".to_string()
                    }
                    (Some("disable_v4"), _) => {
                        sim.disable_v4();
                        "ok".to_string()
                    }
                    (Some("enable"), _) => match sim.enable().await {
                        Ok(()) => "ok".to_string(),
                        Err(e) => format!("err {e}"),
                    },
                    (Some("quit"), _) => std::process::exit(0),
                    _ => format!("err unknown command {line:?}"),
                };
                if w.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn floor_mode(listen: SocketAddr, upstream: SocketAddr) -> Res<()> {
    let l = TcpListener::bind(listen).await?;
    loop {
        let (mut c, _) = l.accept().await?;
        tokio::spawn(async move {
            let Ok(mut u) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = (c.set_nodelay(true), u.set_nodelay(true));
            let _ = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut u, 65536, 65536).await;
        });
    }
}

struct Control {
    lines: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Control {
    async fn connect(addr: SocketAddr) -> Res<Control> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(Control {
            lines: BufReader::new(r).lines(),
            w,
        })
    }

    async fn cmd(&mut self, cmd: &str) -> Res<String> {
        self.w.write_all(format!("{cmd}\n").as_bytes()).await?;
        let line = timeout(Duration::from_secs(120), self.lines.next_line())
            .await
            .map_err(|_| format!("sim control: no answer to {cmd:?}"))??
            .ok_or("sim control closed")?;
        if line.starts_with("err") {
            return Err(format!("sim control: {cmd:?} -> {line}").into());
        }
        Ok(line)
    }
}

// ---------------------------------------------------------------------------------------
// /proc readings
// ---------------------------------------------------------------------------------------

/// CPU time in seconds (user + system), summed over the processes (all their threads, dead
/// ones too).
///
/// Read from each process's CPU-time clock (`clock_getcpuclockid`), which the kernel keeps in
/// nanoseconds; `/proc/PID/stat` gives the same total only in clock ticks (10 ms here), which
/// is 2-7 % of a throughput window. The ticks remain the fallback.
fn cpu_secs(pids: &[u32]) -> f64 {
    pids.iter().map(|&pid| cpu_secs_one(pid)).sum()
}

fn cpu_secs_one(pid: u32) -> f64 {
    let mut clk: libc::clockid_t = 0;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both calls write only to the local out-parameters passed by pointer.
    let ok = unsafe {
        libc::clock_getcpuclockid(pid as libc::pid_t, &mut clk) == 0
            && libc::clock_gettime(clk, &mut ts) == 0
    };
    if ok {
        ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
    } else {
        cpu_secs_ticks(pid)
    }
}

/// utime + stime of one process from `/proc/PID/stat`, in clock ticks turned into seconds.
fn cpu_secs_ticks(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut ticks = 0u64;
    if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        if let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            // fields 14 and 15 of the stat line; `rest` starts at field 3
            ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            ticks += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    ticks as f64 / tck
}

/// VmRSS in KiB summed over the processes.
fn rss_kib(pids: &[u32]) -> u64 {
    let mut kib = 0;
    for pid in pids {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            for line in s.lines() {
                if let Some(v) = line.strip_prefix("VmRSS:") {
                    kib += v
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .unwrap_or(0);
                }
            }
        }
    }
    kib
}

// ---------------------------------------------------------------------------------------
// Load generator
// ---------------------------------------------------------------------------------------

struct Ctx {
    a: RunArgs,
    pids: Vec<u32>,
    sim_pid: Vec<u32>,
    me: Vec<u32>,
    ctl: Control,
    out: Option<std::fs::File>,
    limit: Duration,
}

impl Ctx {
    fn record(&mut self, metric: &str, value: f64) {
        let line = serde_json::json!({
            "rep": self.a.rep, "target": self.a.target, "metric": metric, "value": value,
            "quick": self.a.quick,
        })
        .to_string();
        eprintln!("  {:<10} {:<22} {:>14.3}", self.a.target, metric, value);
        if let Some(f) = self.out.as_mut() {
            let _ = writeln!(f, "{line}");
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.a.url.trim_end_matches('/'), path)
    }
}

fn client_config(read_buf: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buf)
        .write_buffer_size(0)
}

async fn connect(url: &str, cfg: WebSocketConfig) -> Res<Ws> {
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(cfg), true).await?;
    Ok(ws)
}

/// The first frame of a non-/api session: the backend's lifecycle `connect` event.
async fn first_frame(ws: &mut Ws, limit: Duration) -> Res<()> {
    loop {
        match timeout(limit, ws.next()).await {
            Err(_) => return Err("no connect event".into()),
            Ok(None) => return Err("closed before the connect event".into()),
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(Some(Ok(Message::Text(_) | Message::Binary(_)))) => return Ok(()),
            Ok(Some(Ok(Message::Close(c)))) => {
                return Err(format!("close before the connect event: {c:?}").into())
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

async fn run_mode(a: RunArgs) -> Res<()> {
    let pids: Vec<u32> = a
        .pids
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let mut ctl = Control::connect(a.control).await?;
    let sim_pid = vec![ctl.cmd("pid").await?.trim().parse::<u32>()?];
    let out = match &a.out {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
        None => None,
    };
    let limit = Duration::from_secs(a.timeout);
    let scen: Vec<String> = a
        .scenarios
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let has = |s: &str| scen.iter().any(|x| x == s);
    let q = a.quick;
    let mut cx = Ctx {
        pids,
        sim_pid,
        me: vec![std::process::id()],
        ctl,
        out,
        limit,
        a: a.clone(),
    };
    eprintln!("relay run: target {} at {} rep {}", a.target, a.url, a.rep);
    let sessions = a.sessions.unwrap_or(if q { 200 } else { 9000 });
    if has("idle") && !cx.pids.is_empty() {
        idle_memory(&mut cx, sessions).await?;
    }
    if has("tput") {
        let e1 = a.events_1.unwrap_or(if q { 20_000 } else { 1_000_000 });
        let e64 = a.events_64.unwrap_or(if q { 300 } else { 30_000 });
        throughput(&mut cx, 1, e1, "1").await?;
        throughput(&mut cx, 64, e64, "64").await?;
    }
    if has("rtt") {
        let c1 = a.calls_1.unwrap_or(if q { 500 } else { 20_000 });
        let c64 = a.calls_64.unwrap_or(if q { 20 } else { 1000 });
        round_trip(&mut cx, 1, c1, "1").await?;
        round_trip(&mut cx, 64, c64, "64").await?;
    }
    if let Some(admin) = a.admin {
        if has("disable") {
            disable(&mut cx, admin, sessions).await?;
        }
        if has("detect") {
            detect(&mut cx, admin, if q { 4 } else { 16 }).await?;
        }
    }
    Ok(())
}

/// events/s from the upstream to `conns` clients: every client counts `n` message events
/// after its connect event; the clock runs from the `blast` command to the last client done.
async fn throughput(cx: &mut Ctx, conns: usize, n: u64, tag: &str) -> Res<()> {
    let url = cx.url("/");
    let limit = cx.limit;
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(conns);
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let url = url.clone();
        let ready_tx = ready_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = connect(&url, client_config(128 * 1024)).await?;
            first_frame(&mut ws, limit).await?;
            let _ = ready_tx.send(()).await;
            let finder = memchr::memmem::Finder::new(b"\"post_type\":\"message\"");
            let (mut got, mut bytes) = (0u64, 0u64);
            while got < n {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        if finder.find(t.as_bytes()).is_some() {
                            got += 1;
                            bytes += t.len() as u64;
                        }
                    }
                    Some(Ok(Message::Binary(b))) => {
                        if finder.find(&b).is_some() {
                            got += 1;
                            bytes += b.len() as u64;
                        }
                    }
                    Some(Ok(Message::Close(c))) => {
                        return Err(format!("closed after {got} events: {c:?}").into())
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("after {got} events: {e}").into()),
                    None => return Err(format!("eof after {got} events").into()),
                }
            }
            Res::Ok((Instant::now(), bytes, ws))
        }));
    }
    drop(ready_tx);
    for _ in 0..conns {
        timeout(limit, ready_rx.recv())
            .await
            .map_err(|_| "throughput: clients not connected in time")?
            .ok_or("throughput: a client failed to connect")?;
    }
    // Let every proxy finish registering its upstream leg before the blast.
    tokio::time::sleep(Duration::from_millis(150)).await;
    background_check(cx, &format!("tput{tag}")).await;
    let (p0, s0, m0) = (cpu_secs(&cx.pids), cpu_secs(&cx.sim_pid), cpu_secs(&cx.me));
    let t0 = Instant::now();
    let fed = cx.ctl.cmd(&format!("blast {n}")).await?;
    if fed.trim() != conns.to_string() {
        eprintln!("  warning: the simulator blasted {fed} event clients, expected {conns}");
    }
    let mut last = t0;
    let mut bytes = 0u64;
    let mut wss = Vec::with_capacity(conns);
    for t in tasks {
        let (done, b, ws) = timeout(limit, t)
            .await
            .map_err(|_| format!("throughput {tag}: not all events arrived in time"))???;
        last = last.max(done);
        bytes += b;
        wss.push(ws);
    }
    let (p1, s1, m1) = (cpu_secs(&cx.pids), cpu_secs(&cx.sim_pid), cpu_secs(&cx.me));
    let secs = (last - t0).as_secs_f64();
    let total = n as f64 * conns as f64;
    cx.record(&format!("eps_{tag}"), total / secs);
    cx.record(&format!("event_bytes_{tag}"), bytes as f64 / total);
    if !cx.pids.is_empty() {
        cx.record(&format!("cpu_ns_event_{tag}"), (p1 - p0) * 1e9 / total);
    }
    cx.record(&format!("sim_cpu_ns_event_{tag}"), (s1 - s0) * 1e9 / total);
    cx.record(
        &format!("client_cpu_ns_event_{tag}"),
        (m1 - m0) * 1e9 / total,
    );
    close_all(wss).await;
    Ok(())
}

/// The proxy's CPU over 100 ms with its sessions open and nothing sent, as % of one core:
/// left-over work of an earlier phase (the 9,000-session idle test tearing down) would show
/// here and leak into the window that follows. Recorded, not in the table; warns above 2 %.
async fn background_check(cx: &mut Ctx, key: &str) {
    if cx.pids.is_empty() {
        return;
    }
    let (c0, t0) = (cpu_secs(&cx.pids), Instant::now());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pct = (cpu_secs(&cx.pids) - c0) / t0.elapsed().as_secs_f64() * 100.0;
    if pct > 2.0 {
        eprintln!(
            "  warning: {key}: the proxy used {pct:.1} % of a core while idle before the run"
        );
    }
    cx.record(&format!("bg_cpu_pct_{key}"), pct);
}

async fn close_all(wss: Vec<Ws>) {
    let mut js = Vec::with_capacity(wss.len());
    for mut ws in wss {
        js.push(tokio::spawn(async move {
            let _ = timeout(Duration::from_millis(500), ws.close(None)).await;
        }));
    }
    for j in js {
        let _ = j.await;
    }
    // Give the proxy and the simulator a moment to tear the sessions down.
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// API round trip: every connection sends calls one at a time and waits for its echo.
/// Besides the latency percentiles, the same closed loop gives the API throughput (requests
/// answered per second over the measured calls, warm-up excluded) and the CPU each process
/// spent per request in that window.
///
/// The clients run on one thread of their own (a current-thread runtime): with a
/// work-stealing pool the load generator's own threads compete with the target's and the
/// simulator's for the 2 cores, and its scheduling noise, not the target, set the tail.
async fn round_trip(cx: &mut Ctx, conns: usize, calls: usize, tag: &str) -> Res<()> {
    let url = cx.url("/api");
    let limit = cx.limit;
    let pids = [cx.pids.clone(), cx.sim_pid.clone(), cx.me.clone()];
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let res = match rt {
            Ok(rt) => rt.block_on(round_trip_clients(url, conns, calls, limit, pids)),
            Err(e) => Err(e.into()),
        };
        let _ = tx.send(res);
    });
    let RoundTrips {
        lat: mut all,
        secs,
        cpu,
    } = rx.await.map_err(|_| "round trip: client thread died")??;
    let total = all.len() as f64;
    cx.record(&format!("api_rps_{tag}"), total / secs);
    if !cx.pids.is_empty() {
        cx.record(&format!("cpu_us_req_{tag}"), cpu[0] * 1e6 / total);
    }
    cx.record(&format!("sim_cpu_us_req_{tag}"), cpu[1] * 1e6 / total);
    cx.record(&format!("client_cpu_us_req_{tag}"), cpu[2] * 1e6 / total);
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        let i = ((p * all.len() as f64).ceil() as usize).clamp(1, all.len()) - 1;
        all[i] as f64 / 1000.0
    };
    cx.record(&format!("rtt{tag}_p50_us"), pct(0.50));
    cx.record(&format!("rtt{tag}_p99_us"), pct(0.99));
    cx.record(&format!("rtt{tag}_p999_us"), pct(0.999));
    Ok(())
}

/// What the measured part of a round-trip run gives.
struct RoundTrips {
    /// Latencies in ns, `calls` per connection.
    lat: Vec<u64>,
    /// From the moment every connection had finished its warm-up to the last reply.
    secs: f64,
    /// CPU seconds in that window: proxy, simulator, load generator.
    cpu: [f64; 3],
}

/// Round-trip latencies, `calls` per connection after a warm-up; `pids` are the proxy's,
/// the simulator's and the load generator's processes, whose CPU is read around the
/// measured calls (every connection waits for the others to finish the warm-up).
async fn round_trip_clients(
    url: String,
    conns: usize,
    calls: usize,
    limit: Duration,
    pids: [Vec<u32>; 3],
) -> Res<RoundTrips> {
    let warm = (calls / 10).clamp(10, 200);
    let barrier = Arc::new(Barrier::new(conns));
    let warmed = Arc::new(Barrier::new(conns));
    let pids = Arc::new(pids);
    let read_cpu = |p: &[Vec<u32>; 3]| [cpu_secs(&p[0]), cpu_secs(&p[1]), cpu_secs(&p[2])];
    let start = Arc::new(std::sync::Mutex::new(None::<(Instant, [f64; 3])>));
    let mut tasks = Vec::with_capacity(conns);
    for c in 0..conns {
        let url = url.clone();
        let (barrier, warmed, pids, start) =
            (barrier.clone(), warmed.clone(), pids.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            let mut ws = connect(&url, client_config(16 * 1024)).await?;
            barrier.wait().await;
            let mut lat = Vec::with_capacity(calls);
            for i in 0..warm + calls {
                if i == warm && warmed.wait().await.is_leader() {
                    // The last connection to finish its warm-up; on this current-thread
                    // runtime no other task runs before this one yields.
                    let cpu = read_cpu(&pids);
                    *start.lock().unwrap() = Some((Instant::now(), cpu));
                }
                let echo = format!("\"echo\":\"b{c}-{i}\"");
                let req = format!(r#"{{"action":"get_status","params":{{}},{echo}}}"#);
                let finder = memchr::memmem::Finder::new(echo.as_bytes());
                let t = Instant::now();
                ws.send(Message::text(req)).await?;
                loop {
                    match timeout(limit, ws.next()).await {
                        Err(_) => return Err("round trip: no reply in time".into()),
                        Ok(Some(Ok(Message::Text(r)))) if finder.find(r.as_bytes()).is_some() => {
                            break
                        }
                        Ok(Some(Ok(Message::Close(c)))) => {
                            return Err(format!("round trip: closed {c:?}").into())
                        }
                        Ok(Some(Ok(_))) => {}
                        Ok(Some(Err(e))) => return Err(e.into()),
                        Ok(None) => return Err("round trip: eof".into()),
                    }
                }
                if i >= warm {
                    lat.push(t.elapsed().as_nanos() as u64);
                }
            }
            Res::Ok((lat, Instant::now(), ws))
        }));
    }
    let mut all = Vec::with_capacity(conns * calls);
    let mut wss = Vec::with_capacity(conns);
    let mut last = None::<Instant>;
    for t in tasks {
        let (lat, done, ws) = timeout(limit * 2, t)
            .await
            .map_err(|_| "round trip: not finished in time")???;
        all.extend(lat);
        last = Some(last.map_or(done, |l| l.max(done)));
        wss.push(ws);
    }
    let cpu1 = read_cpu(&pids);
    let (t0, cpu0) = start
        .lock()
        .unwrap()
        .take()
        .ok_or("round trip: no measured calls")?;
    let secs = last.map_or(0.0, |l| (l - t0).as_secs_f64());
    close_all(wss).await;
    Ok(RoundTrips {
        lat: all,
        secs,
        cpu: [0, 1, 2].map(|i| cpu1[i] - cpu0[i]),
    })
}

/// How one session ended.
struct End {
    close_at: Option<Instant>,
    other_end: Option<Instant>,
    saw_disable: bool,
}

struct Sessions {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<End>>,
}

/// Opens `n` event sessions (at most 128 handshakes in flight), each waiting for its
/// connect event, then reading until a Close frame, an error, or `stop`.
async fn open_sessions(url: &str, n: usize, limit: Duration) -> Res<Sessions> {
    let (stop, stop_rx) = watch::channel(false);
    let sem = Arc::new(Semaphore::new(128));
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(n);
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (url, sem, ready_tx, mut stop_rx) = (
            url.to_string(),
            sem.clone(),
            ready_tx.clone(),
            stop_rx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut end = End {
                close_at: None,
                other_end: None,
                saw_disable: false,
            };
            let permit = sem.acquire_owned().await;
            let mut ws = match connect(&url, client_config(4096)).await {
                Ok(ws) => ws,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string())).await;
                    return end;
                }
            };
            if let Err(e) = first_frame(&mut ws, limit).await {
                let _ = ready_tx.send(Err(e.to_string())).await;
                return end;
            }
            drop(permit);
            let _ = ready_tx.send(Ok(())).await;
            drop(ready_tx);
            let disable = memchr::memmem::Finder::new(b"\"sub_type\":\"disable\"");
            loop {
                tokio::select! {
                    m = ws.next() => match m {
                        Some(Ok(Message::Close(_))) => { end.close_at = Some(Instant::now()); break }
                        Some(Ok(Message::Text(t))) => {
                            if disable.find(t.as_bytes()).is_some() { end.saw_disable = true }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => { end.other_end = Some(Instant::now()); break }
                    },
                    _ = stop_rx.changed() => break,
                }
            }
            end
        }));
    }
    drop(ready_tx);
    let mut failed = 0usize;
    let mut first_err = None;
    for _ in 0..n {
        match timeout(limit, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => {
                failed += 1;
                first_err.get_or_insert(e);
            }
            Ok(None) | Err(_) => return Err("sessions: not all opened in time".into()),
        }
    }
    if failed > 0 {
        let _ = stop.send(true);
        return Err(format!(
            "sessions: {failed} of {n} failed to open, first: {}",
            first_err.unwrap_or_default()
        )
        .into());
    }
    Ok(Sessions { stop, tasks })
}

async fn end_sessions(s: Sessions, limit: Duration) -> Vec<End> {
    let _ = s.stop.send(true);
    let mut ends = Vec::with_capacity(s.tasks.len());
    for t in s.tasks {
        if let Ok(Ok(e)) = timeout(limit, t).await {
            ends.push(e);
        }
    }
    ends
}

/// Resident memory per idle proxied session: proxy VmRSS before and after opening them.
async fn idle_memory(cx: &mut Ctx, n: usize) -> Res<()> {
    let before = rss_kib(&cx.pids);
    let s = open_sessions(&cx.url("/"), n, cx.limit).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(&cx.pids);
    cx.record("rss_kib_session", (after as f64 - before as f64) / n as f64);
    end_sessions(s, cx.limit).await;
    tokio::time::sleep(Duration::from_millis(if n > 1000 { 1500 } else { 300 })).await;
    Ok(())
}

async fn http(admin: SocketAddr, method: &str, path: &str) -> Res<u16> {
    let mut s = timeout(Duration::from_secs(5), TcpStream::connect(admin)).await??;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await??;
    let head = String::from_utf8_lossy(&buf);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("admin {method} {path}: bad answer {head:?}").into())
}

async fn wait_ready(admin: SocketAddr, limit: Duration) -> Res<()> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Ok(200) = http(admin, "GET", "/ready").await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("lifeguard did not become ready in time".into())
}

/// Collects the session ends after `t0`; returns (ms to the last Close, closes, others).
async fn close_times(s: Sessions, t0: Instant, limit: Duration) -> (f64, usize, usize, usize) {
    let mut last = t0;
    let (mut closes, mut others, mut disables) = (0, 0, 0);
    let deadline = tokio::time::Instant::now() + limit;
    for t in s.tasks {
        if let Ok(Ok(e)) = tokio::time::timeout_at(deadline, t).await {
            if let Some(c) = e.close_at {
                closes += 1;
                last = last.max(c);
            } else if let Some(c) = e.other_end {
                others += 1;
                last = last.max(c);
            }
            disables += e.saw_disable as usize;
        }
    }
    let _ = s.stop.send(true);
    ((last - t0).as_secs_f64() * 1000.0, closes, others, disables)
}

/// lifeguard: `POST /disable` until the last of `n` clients has its Close frame.
async fn disable(cx: &mut Ctx, admin: SocketAddr, n: usize) -> Res<()> {
    wait_ready(admin, cx.limit).await?;
    let s = open_sessions(&cx.url("/"), n, cx.limit).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (p0, s0, m0) = (cpu_secs(&cx.pids), cpu_secs(&cx.sim_pid), cpu_secs(&cx.me));
    let t0 = Instant::now();
    let code = http(admin, "POST", "/disable").await?;
    let (ms, closes, others, disables) = close_times(s, t0, Duration::from_secs(20)).await;
    let (p1, s1, m1) = (cpu_secs(&cx.pids), cpu_secs(&cx.sim_pid), cpu_secs(&cx.me));
    eprintln!(
        "  disable: CPU-ms until the last close: lifeguard {:.0}, simulator {:.0}, load generator {:.0}",
        (p1 - p0) * 1e3,
        (s1 - s0) * 1e3,
        (m1 - m0) * 1e3
    );
    eprintln!(
        "  disable: HTTP {code}; {closes} Close frames, {others} ended without one, {disables} saw the disable event, of {n}"
    );
    cx.record("disable_ms", ms);
    cx.record("disable_closed_frac", closes as f64 / n as f64);
    cx.record("disable_proxy_cpu_ms", (p1 - p0) * 1e3);
    let code = http(admin, "POST", "/enable").await?;
    if code >= 300 {
        return Err(format!("POST /enable answered {code}").into());
    }
    wait_ready(admin, cx.limit).await?;
    Ok(())
}

/// lifeguard: 3.1.10-style disable on the simulator (listener gone, old sockets silent)
/// until the last of `n` clients has its Close frame.
async fn detect(cx: &mut Ctx, admin: SocketAddr, n: usize) -> Res<()> {
    wait_ready(admin, cx.limit).await?;
    let s = open_sessions(&cx.url("/"), n, cx.limit).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    cx.ctl.cmd("disable_3110").await?;
    let (ms, closes, others, _) = close_times(s, t0, Duration::from_secs(30)).await;
    eprintln!("  detect: {closes} Close frames, {others} ended without one, of {n}");
    cx.record("detect_3110_ms", ms);
    cx.ctl.cmd("enable").await?;
    wait_ready(admin, cx.limit).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

struct Row {
    metric: &'static str,
    label: &'static str,
    /// Ratio against this target ("" for none).
    base: &'static str,
    /// (comparison, bound) for the target column.
    goal: Option<(&'static str, f64)>,
}

const ROWS: &[Row] = &[
    Row {
        metric: "eps_1",
        label: "events/s, 1 conn",
        base: "direct",
        goal: None,
    },
    Row {
        metric: "eps_64",
        label: "events/s, 64 conns",
        base: "direct",
        goal: Some((">=", 0.9)),
    },
    Row {
        metric: "api_rps_1",
        label: "API requests/s, 1 conn",
        base: "direct",
        goal: None,
    },
    Row {
        metric: "api_rps_64",
        label: "API requests/s, 64 conns",
        base: "direct",
        goal: None,
    },
    Row {
        metric: "rtt1_p50_us",
        label: "RTT p50 µs, 1 conn",
        base: "direct",
        goal: None,
    },
    Row {
        metric: "rtt1_p99_us",
        label: "RTT p99 µs, 1 conn",
        base: "direct",
        goal: None,
    },
    Row {
        metric: "rtt1_p999_us",
        label: "RTT p99.9 µs, 1 conn",
        base: "direct",
        goal: None,
    },
    Row {
        metric: "rtt64_p50_us",
        label: "RTT p50 µs, 64 conns",
        base: "direct",
        goal: None,
    },
    Row {
        metric: "rtt64_p99_us",
        label: "RTT p99 µs, 64 conns",
        base: "direct",
        goal: Some(("<=", 1.3)),
    },
    Row {
        metric: "rtt64_p999_us",
        label: "RTT p99.9 µs, 64 conns",
        base: "direct",
        goal: None,
    },
    Row {
        metric: "cpu_ns_event_64",
        label: "proxy CPU ns/event, 64 conns (= CPU-ms per 1M)",
        base: "haproxy",
        goal: Some(("<=", 0.4)),
    },
    Row {
        metric: "cpu_ns_event_1",
        label: "proxy CPU ns/event, 1 conn",
        base: "haproxy",
        goal: None,
    },
    Row {
        metric: "cpu_us_req_64",
        label: "proxy CPU µs/API request, 64 conns",
        base: "haproxy",
        goal: None,
    },
    Row {
        metric: "cpu_us_req_1",
        label: "proxy CPU µs/API request, 1 conn",
        base: "haproxy",
        goal: None,
    },
    Row {
        metric: "rss_kib_session",
        label: "proxy RSS KiB per idle session",
        base: "",
        goal: Some(("<=", 8.0)),
    },
    Row {
        metric: "disable_ms",
        label: "POST /disable → last Close, ms",
        base: "",
        goal: Some(("<=", 250.0)),
    },
    Row {
        metric: "disable_closed_frac",
        label: "share of sessions that got a Close frame",
        base: "",
        goal: None,
    },
    Row {
        metric: "detect_3110_ms",
        label: "3.1.10 disable → last Close, ms",
        base: "",
        goal: None,
    },
    Row {
        metric: "sim_cpu_ns_event_64",
        label: "simulator CPU ns/event, 64 conns",
        base: "",
        goal: None,
    },
    Row {
        metric: "client_cpu_ns_event_64",
        label: "load generator CPU ns/event, 64 conns",
        base: "",
        goal: None,
    },
    Row {
        metric: "sim_cpu_us_req_64",
        label: "simulator CPU µs/API request, 64 conns",
        base: "",
        goal: None,
    },
    Row {
        metric: "client_cpu_us_req_64",
        label: "load generator CPU µs/API request, 64 conns",
        base: "",
        goal: None,
    },
    Row {
        metric: "event_bytes_64",
        label: "message event size, bytes (WebSocket payload)",
        base: "",
        goal: None,
    },
];

/// Column order; other target names (A/B variants) follow in the order they first appear.
const TARGETS: &[&str] = &[
    "direct",
    "lifeguard",
    "nginx",
    "haproxy",
    "floor",
    "nginx-4k",
    "haproxy-16k",
];

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (med, v[0], v[n - 1])
}

fn fmt(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 {
        format!("{:.0}", x)
    } else if a >= 10.0 {
        format!("{:.1}", x)
    } else {
        format!("{:.2}", x)
    }
}

fn report_mode(input: PathBuf, markdown: Option<PathBuf>) -> Res<()> {
    let text = std::fs::read_to_string(&input)?;
    let mut data: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut reps = std::collections::BTreeSet::new();
    let mut seen: Vec<String> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let (Some(t), Some(m), Some(x)) = (
            v["target"].as_str(),
            v["metric"].as_str(),
            v["value"].as_f64(),
        ) else {
            continue;
        };
        reps.insert(v["rep"].as_u64().unwrap_or(0));
        if !seen.iter().any(|s| s == t) {
            seen.push(t.to_string());
        }
        data.entry((t.to_string(), m.to_string()))
            .or_default()
            .push(x);
    }
    let targets: Vec<&str> = TARGETS
        .iter()
        .copied()
        .filter(|t| seen.iter().any(|s| s == t))
        .chain(
            seen.iter()
                .map(String::as_str)
                .filter(|s| !TARGETS.contains(s)),
        )
        .collect();
    let mut med: BTreeMap<(String, String), (f64, f64, f64, usize)> = BTreeMap::new();
    for ((t, m), v) in data.iter_mut() {
        let n = v.len();
        let (a, b, c) = stats(v);
        med.insert((t.clone(), m.clone()), (a, b, c, n));
    }
    let mut out = String::new();
    out.push_str(&format!(
        "Medians of {} repetition(s), [min–max], (×ratio to the column named in `vs`).\n\n",
        reps.len()
    ));
    out.push_str("| figure | vs |");
    for t in &targets {
        out.push_str(&format!(" {t} |"));
    }
    out.push_str(" lifeguard target | met |\n|---|---|");
    for _ in &targets {
        out.push_str("---|");
    }
    out.push_str("---|---|\n");
    for row in ROWS {
        if !targets
            .iter()
            .any(|t| med.contains_key(&(t.to_string(), row.metric.to_string())))
        {
            continue;
        }
        out.push_str(&format!(
            "| {} | {} |",
            row.label,
            if row.base.is_empty() { "–" } else { row.base }
        ));
        let base = med
            .get(&(row.base.to_string(), row.metric.to_string()))
            .map(|x| x.0);
        for t in &targets {
            match med.get(&(t.to_string(), row.metric.to_string())) {
                Some(&(m, lo, hi, _)) => {
                    let ratio = match base {
                        Some(b) if b != 0.0 && !row.base.is_empty() => format!(" ×{:.2}", m / b),
                        _ => String::new(),
                    };
                    out.push_str(&format!(" {} [{}–{}]{} |", fmt(m), fmt(lo), fmt(hi), ratio));
                }
                None => out.push_str(" – |"),
            }
        }
        let lg = med
            .get(&("lifeguard".to_string(), row.metric.to_string()))
            .map(|x| x.0);
        match row.goal {
            Some((cmp, bound)) => {
                let (desc, val) = if row.base.is_empty() {
                    (format!("{cmp} {bound}"), lg)
                } else {
                    (
                        format!("{cmp} {bound}× {}", row.base),
                        lg.zip(base).map(|(l, b)| l / b),
                    )
                };
                let met = match val {
                    Some(v) if cmp == ">=" => {
                        if v >= bound {
                            "yes"
                        } else {
                            "**no**"
                        }
                    }
                    Some(v) => {
                        if v <= bound {
                            "yes"
                        } else {
                            "**no**"
                        }
                    }
                    None => "n/a",
                };
                out.push_str(&format!(" {desc} | {met} |\n"));
            }
            None => out.push_str(" | |\n"),
        }
    }
    print!("{out}");
    if let Some(p) = markdown {
        std::fs::write(p, &out)?;
    }
    Ok(())
}
