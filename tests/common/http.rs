//! HTTP test scaffolding: a one-shot HTTP/1.1 client, a bot's HTTP POST receiver that
//! records what it gets and can fail, stall or go away, and a proxy started with the HTTP
//! transports in front of a simulator.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lifeguard::app::Proxy;
use lifeguard::config::{RunArgs, Settings};
use lifeguard::sim::{HttpServerConfig, NapSim, SimConfig};
use lifeguard::state::Lane;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::SOON;

/// An HTTP answer as a client sees it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
    /// How long it took, from the request being sent.
    pub took: Duration,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One request on a fresh connection (`headers`: `("name", "value")` pairs), answered
/// within `limit`.
pub async fn call_within(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
    limit: Duration,
) -> Answer {
    let t0 = Instant::now();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(target)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).expect("request");
    let resp = tokio::time::timeout(limit, async {
        let resp = sender.send_request(req).await.expect("an answer");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, headers, body)
    })
    .await
    .unwrap_or_else(|_| panic!("no answer to {method} {target} within {limit:?}"));
    Answer {
        status: resp.0,
        headers: resp.1,
        body: String::from_utf8_lossy(&resp.2).into_owned(),
        took: t0.elapsed(),
    }
}

/// [`call_within`] with the usual bound.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    call_within(addr, method, target, headers, body, SOON).await
}

/// What a bot receiver received.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("UTF-8 body")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `enable`/`disable`/`connect` for a lifecycle event, else `None`.
    pub fn lifecycle(&self) -> Option<String> {
        let v = self.json();
        (v["meta_event_type"] == "lifecycle")
            .then(|| v["sub_type"].as_str().unwrap_or("").to_string())
    }
}

/// How a bot answers.
#[derive(Debug, Clone)]
pub enum Mode {
    /// 204, like NoneBot.
    NoContent,
    /// 200 with this JSON body: a quick operation.
    Quick(String),
    /// This status, every time.
    Status(u16),
    /// 204 after this long.
    Slow(Duration),
}

/// A bot's HTTP POST receiver on 127.0.0.1, recording every request (answered or not).
#[derive(Clone)]
pub struct BotSim {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    count: watch::Sender<usize>,
    mode: Arc<Mutex<Mode>>,
    /// The running listener and its connections; cancelled by `down()`.
    running: Arc<Mutex<CancellationToken>>,
}

impl BotSim {
    pub async fn start(mode: Mode) -> BotSim {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bot = BotSim {
            addr: listener.local_addr().unwrap(),
            received: Arc::default(),
            count: watch::Sender::new(0),
            mode: Arc::new(Mutex::new(mode)),
            running: Arc::new(Mutex::new(CancellationToken::new())),
        };
        bot.serve(listener);
        bot
    }

    pub fn url(&self) -> String {
        format!("http://{}/onebot/v11/", self.addr)
    }

    fn serve(&self, listener: TcpListener) {
        let token = self.running.lock().unwrap().clone();
        let bot = self.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let bot = bot.clone();
                let token = token.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let bot = bot.clone();
                        async move {
                            let headers = req.headers().clone();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let mode = bot.mode.lock().unwrap().clone();
                            bot.received.lock().unwrap().push(Received {
                                headers,
                                body,
                                at: Instant::now(),
                            });
                            bot.count.send_modify(|n| *n += 1);
                            let mut r = Response::new(Full::new(Bytes::new()));
                            match mode {
                                Mode::NoContent => *r.status_mut() = StatusCode::NO_CONTENT,
                                Mode::Quick(body) => {
                                    *r.body_mut() = Full::new(Bytes::from(body));
                                    r.headers_mut().insert(
                                        "content-type",
                                        "application/json".parse().unwrap(),
                                    );
                                }
                                Mode::Status(s) => {
                                    *r.status_mut() = StatusCode::from_u16(s).unwrap()
                                }
                                Mode::Slow(d) => {
                                    tokio::time::sleep(d).await;
                                    *r.status_mut() = StatusCode::NO_CONTENT;
                                }
                            }
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc);
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = conn => {}
                    }
                });
            }
        });
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Gone: the listener closes (connects are refused) and open connections drop (given
    /// a moment for their tasks to see it, so that nothing is answered after this returns).
    pub async fn down(&self) {
        self.running.lock().unwrap().cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Back on the same port.
    pub async fn up(&self) {
        *self.running.lock().unwrap() = CancellationToken::new();
        let deadline = Instant::now() + SOON;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot rebind {}: {e}",
                        self.addr
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        self.serve(listener);
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Bodies received, as text, in order.
    pub fn bodies(&self) -> Vec<String> {
        self.received()
            .iter()
            .map(|r| r.text().to_string())
            .collect()
    }

    /// Lifecycle sub_types received, in order.
    pub fn lifecycles(&self) -> Vec<String> {
        self.received()
            .iter()
            .filter_map(|r| r.lifecycle())
            .collect()
    }

    /// Wait until at least `n` requests arrived.
    pub async fn wait_count(&self, n: usize, limit: Duration) -> Vec<Received> {
        let mut rx = self.count.subscribe();
        if tokio::time::timeout(limit, rx.wait_for(|c| *c >= n))
            .await
            .is_err()
        {
            panic!(
                "bot {} got {} requests, not {n}, within {limit:?}: {:#?}",
                self.addr,
                *rx.borrow(),
                self.bodies()
            );
        }
        self.received()
    }

    /// Wait until a received request satisfies `pred`.
    pub async fn wait_for(&self, limit: Duration, what: &str, pred: impl Fn(&Received) -> bool) {
        let deadline = Instant::now() + limit;
        while !self.received().iter().any(&pred) {
            assert!(
                Instant::now() < deadline,
                "bot never received {what}: {:#?}",
                self.bodies()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Fast probes, loopback listeners, no forward WebSocket unless the test adds it.
pub fn http_args() -> RunArgs {
    RunArgs {
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

/// A simulator with its HTTP API server started (no heartbeats).
pub async fn http_sim(sim_cfg: SimConfig, http: HttpServerConfig) -> NapSim {
    let sim = NapSim::start(sim_cfg.with_heartbeat_interval(None))
        .await
        .expect("simulator starts");
    sim.start_http(http).await.expect("HTTP server starts");
    sim
}

pub async fn start_proxy(args: RunArgs) -> Proxy {
    let settings = Settings::resolve(&args, None).expect("valid settings");
    Proxy::start(settings).await.expect("proxy starts")
}

/// Wait until `lane` is up (or down).
pub async fn wait_lane(proxy: &Proxy, lane: Lane, up: bool) {
    let deadline = Instant::now() + SOON;
    while proxy.state.snapshot().lane(lane).up != up {
        assert!(
            Instant::now() < deadline,
            "{lane:?} never went {}: {:?}",
            if up { "up" } else { "down" },
            proxy.state.snapshot().lane(lane)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `sha1=<hex>` as a receiver recomputes it (computed here, not with lifeguard's code).
pub fn signature(secret: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha1={hex}")
}
