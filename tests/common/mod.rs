//! Shared test scaffolding: a simulated NapCat, a real proxy in front of it on
//! 127.0.0.1:0, real WebSocket clients, and a tiny HTTP client for the admin API.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use lifeguard::config::{RunArgs, Settings};
use lifeguard::server::Proxy;
use lifeguard::sim::{NapSim, SimConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

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
        while self.proxy().shared.gate.snapshot().up != up {
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
    let mut s = TcpStream::connect(addr).await.expect("admin reachable");
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
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
