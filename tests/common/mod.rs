//! Shared test scaffolding: a simulated NapCat, a real proxy in front of it on
//! 127.0.0.1:0, real WebSocket clients, and a tiny HTTP client for the admin API.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use lifeguard::app::Proxy;
use lifeguard::config::{RunArgs, Settings};
use lifeguard::sim::{NapSim, SimConfig};
use lifeguard::state::Lane;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod http;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A generous bound for anything that should happen "at once".
pub const SOON: Duration = Duration::from_secs(5);

pub struct Harness {
    pub sim: NapSim,
    pub proxy: Option<Proxy>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

/// Fast probes so failures are detected in well under a second.
pub fn fast_args(upstream: &str) -> RunArgs {
    RunArgs {
        upstream: Some(upstream.to_string()),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        probe_interval: Some(Duration::from_millis(100)),
        probe_timeout: Some(Duration::from_millis(300)),
        fall: Some(2),
        rise: Some(2),
        close_timeout: Some(Duration::from_millis(500)),
        drain_timeout: Some(Duration::from_secs(3)),
        ..Default::default()
    }
}

impl Harness {
    pub async fn start(sim_cfg: SimConfig) -> Harness {
        Self::start_with(sim_cfg, |_| {}).await
    }

    pub async fn start_with(sim_cfg: SimConfig, tweak: impl FnOnce(&mut RunArgs)) -> Harness {
        let sim = NapSim::start(sim_cfg).await.expect("simulator starts");
        let mut args = fast_args(&sim.url());
        tweak(&mut args);
        let settings = Settings::resolve(&args, None).expect("valid settings");
        let proxy = Proxy::start(settings).await.expect("proxy starts");
        let h = Harness {
            addr: proxy.addr,
            admin: proxy.admin_addr,
            sim,
            proxy: Some(proxy),
        };
        h.wait_ready(true).await;
        h
    }

    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("proxy running")
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Wait until the proxy's state is up (or down).
    pub async fn wait_ready(&self, up: bool) {
        let deadline = Instant::now() + SOON;
        while self.proxy().state.snapshot().lane(Lane::Forward).up != up {
            assert!(
                Instant::now() < deadline,
                "proxy never became {}",
                if up { "up" } else { "down" }
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn connect(&self, path: &str) -> Ws {
        let (ws, resp) =
            tokio::time::timeout(SOON, tokio_tungstenite::connect_async(self.url(path)))
                .await
                .expect("handshake in time")
                .expect("handshake accepted");
        assert_eq!(resp.status(), 101);
        ws
    }

    /// Connect and consume the connect event (asserting it is first).
    pub async fn connect_events(&self, path: &str) -> Ws {
        let mut ws = self.connect(path).await;
        let first = next_text(&mut ws).await;
        assert!(
            first.contains("\"sub_type\":\"connect\""),
            "first frame is the connect event: {first}"
        );
        ws
    }

    /// The HTTP status a handshake is refused with (panics if accepted).
    pub async fn refused(&self, path: &str) -> (u16, tungstenite::http::HeaderMap, String) {
        refused_req(self.url(path)).await
    }

    pub async fn admin(&self, method: &str, path: &str) -> (u16, String) {
        http(self.admin, method, path).await
    }

    pub async fn stop(mut self) {
        if let Some(p) = self.proxy.take() {
            p.shutdown().await;
        }
        self.sim.shutdown().await;
    }
}

pub async fn refused_req(
    req: impl IntoClientRequest + Unpin,
) -> (u16, tungstenite::http::HeaderMap, String) {
    match tokio::time::timeout(SOON, tokio_tungstenite::connect_async(req))
        .await
        .expect("answer in time")
    {
        Ok(_) => panic!("handshake was accepted"),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            (resp.status().as_u16(), resp.headers().clone(), body)
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
    }
}

/// Minimal HTTP/1.1 client: (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    http_with(addr, method, path, &[]).await
}

/// [`http`] with extra request headers.
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("admin reachable");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(SOON, s.read_to_end(&mut raw))
        .await
        .expect("admin answers")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Next text frame (skipping pings/pongs), within SOON.
pub async fn next_text(ws: &mut Ws) -> String {
    loop {
        match tokio::time::timeout(SOON, ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Text(t))) => return t.to_string(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Next text frame that is not a heartbeat.
pub async fn next_non_heartbeat(ws: &mut Ws) -> String {
    loop {
        let t = next_text(ws).await;
        if !t.contains("\"meta_event_type\":\"heartbeat\"") {
            return t;
        }
    }
}

/// What a client saw at the end of a session.
#[derive(Debug)]
pub struct Ending {
    /// Text frames received before the Close (heartbeats dropped).
    pub texts: Vec<String>,
    /// The close code and reason (None: no Close frame, only the TCP end).
    pub close: Option<(u16, String)>,
    pub at: Instant,
}

impl Ending {
    pub fn code(&self) -> Option<u16> {
        self.close.as_ref().map(|c| c.0)
    }
    pub fn last_text(&self) -> &str {
        self.texts.last().map(|s| s.as_str()).unwrap_or("")
    }
    pub fn got_disable(&self) -> bool {
        self.last_text().contains("\"sub_type\":\"disable\"")
    }
}

/// Read until the session ends, within `limit`. Replies to the Close like a real client.
pub async fn read_to_end(ws: &mut Ws, limit: Duration) -> Ending {
    let mut texts = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("session ended in time");
        match next {
            Some(Ok(Message::Text(t))) => {
                if !t.contains("\"meta_event_type\":\"heartbeat\"") {
                    texts.push(t.to_string());
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                let close = Some(close.unwrap_or((1005, String::new())));
                let at = Instant::now();
                // Let tungstenite send its Close reply and see the TCP end.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while ws.next().await.is_some() {}
                })
                .await;
                return Ending { texts, close, at };
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                return Ending {
                    texts,
                    close: None,
                    at: Instant::now(),
                }
            }
        }
    }
}

pub async fn send_text(ws: &mut Ws, t: &str) {
    ws.send(Message::text(t)).await.expect("send");
}

pub fn code(c: CloseCode) -> u16 {
    u16::from(c)
}

// ---------------------------------------------------------------------------------------
// Config-issue helpers: temp files, clients by URL, the real binary.

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("lifeguard-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Rewrite a file in place (truncate, write), as NapCat does.
pub fn write_in_place(path: &std::path::Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("open for writing");
    f.write_all(text.as_bytes()).expect("write");
    f.flush().expect("flush");
}

/// Write a sibling temp file and rename it over `path`, as many editors do.
pub fn write_by_rename(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename over");
}

/// Connect to any URL; asserts the 101.
pub async fn connect_url(url: impl IntoClientRequest + Unpin) -> Ws {
    let (ws, resp) = tokio::time::timeout(SOON, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake in time")
        .expect("handshake accepted");
    assert_eq!(resp.status(), 101);
    ws
}

/// Connect and consume the connect event.
pub async fn connect_url_events(url: impl IntoClientRequest + Unpin) -> Ws {
    let mut ws = connect_url(url).await;
    let first = next_text(&mut ws).await;
    assert!(
        first.contains("\"sub_type\":\"connect\""),
        "first frame is the connect event: {first}"
    );
    ws
}

/// Poll `f` every 10 ms until it is true, within `limit`.
pub async fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An API round trip on an open session (proves it is alive and relaying).
pub async fn api_roundtrip(ws: &mut Ws, echo: &str) {
    send_text(
        ws,
        &format!(r#"{{"action":"get_status","params":{{}},"echo":"{echo}"}}"#),
    )
    .await;
    let reply = next_non_heartbeat(ws).await;
    assert!(reply.contains(&format!("\"echo\":\"{echo}\"")), "{reply}");
}

/// Parse a Prometheus text exposition; panics when it does not parse.
pub fn parse_metrics(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("/metrics parses as Prometheus text")
}

/// The value of one sample (`name` as exposed, labels that must match), or None.
pub fn metric(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.last().map(|b| b.count).unwrap_or(0.0),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
        .reduce(|a, b| a + b)
}

/// The real `lifeguard` binary, logging JSON lines on stderr (collected), on loopback ports.
pub struct Bin {
    pub child: Option<std::process::Child>,
    pub lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl Bin {
    /// Start `lifeguard <args> --log-format json --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0`
    /// and wait for its "lifeguard started" line.
    pub fn spawn(args: &[&str]) -> Bin {
        Self::spawn_with(args, |_| {})
    }

    /// [`Bin::spawn`], with a last say on the command (limits, environment).
    pub fn spawn_with(args: &[&str], tweak: impl FnOnce(&mut std::process::Command)) -> Bin {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lifeguard"));
        cmd.args(args)
            .args([
                "--log-format",
                "json",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("LIFEGUARD_") {
                cmd.env_remove(k);
            }
        }
        tweak(&mut cmd);
        let mut child = cmd.spawn().expect("lifeguard binary starts");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        for (pipe, sink) in [
            (
                Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
                lines.clone(),
            ),
            (Box::new(child.stdout.take().unwrap()), stdout.clone()),
        ] {
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
        }
        let mut bin = Bin {
            child: Some(child),
            lines,
            stdout,
            addr: "127.0.0.1:1".parse().unwrap(),
            admin: "127.0.0.1:1".parse().unwrap(),
        };
        let started = bin.wait_log(Duration::from_secs(10), |v| {
            v["message"] == "lifeguard started"
        });
        bin.addr = started["listen"].as_str().unwrap().parse().unwrap();
        bin.admin = started["admin"].as_str().unwrap().parse().unwrap();
        bin
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Every stderr line so far, parsed (panics on a line that is not JSON).
    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Wait (blocking) for a log line matching `pred`; returns it.
    /// Blocks its thread: tests that also run a simulator in-process use a multi-thread
    /// runtime, so that the simulator keeps answering while they wait.
    pub fn wait_log(
        &self,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = self.logs().into_iter().find(|v| pred(v)) {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "no such log line within {limit:?}; log:\n{}",
                    self.lines.lock().unwrap().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// How many log lines match `pred`.
    pub fn count_logs(&self, pred: impl Fn(&serde_json::Value) -> bool) -> usize {
        self.logs().iter().filter(|v| pred(v)).count()
    }

    pub async fn admin(&self, method: &str, path: &str) -> (u16, String) {
        http(self.admin, method, path).await
    }

    pub async fn metrics(&self) -> prometheus_parse::Scrape {
        let (status, body) = self.admin("GET", "/metrics").await;
        assert_eq!(status, 200, "{body}");
        parse_metrics(&body)
    }

    /// Wait until /ready says up (200) or down (503).
    pub async fn wait_ready(&self, up: bool) {
        let want = if up { 200 } else { 503 };
        let deadline = Instant::now() + SOON;
        loop {
            if self.admin("GET", "/ready").await.0 == want {
                return;
            }
            assert!(Instant::now() < deadline, "/ready never answered {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("running").id() as i32;
        // SAFETY-free: libc::kill is a plain syscall wrapper.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM and wait (bounded); the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = child.id() as i32;
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(100));
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("lifeguard did not stop within 15s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Bin {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
