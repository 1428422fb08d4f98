//! Reverse WebSocket over real sockets: the simulator plays NapCat's `websocketClients`
//! entry dialling lifeguard's `--reverse-listen`, and hand-written framework servers play
//! the bots lifeguard dials (`--reverse-url`), recording what a bot sees.
// The handshake callback's error type is fixed by tungstenite.
#![allow(clippy::result_large_err)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use lifeguard::app::Proxy;
use lifeguard::config::{RunArgs, Settings};
use lifeguard::sim::{NapSim, PeerFrame, ReverseConfig, ReverseHandle, SimConfig};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{self as ws_http, HeaderMap};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use common::{http, metric, parse_metrics, TempDir};

type Conn = WebSocketStream<TcpStream>;

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);
/// A short redial for the simulated NapCat, so that tests stay fast.
const REDIAL: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------
// A bot framework's reverse WebSocket server.

struct Bot {
    listener: TcpListener,
}

struct Accepted {
    ws: Conn,
    path: String,
    headers: HeaderMap,
    at: Instant,
}

impl Bot {
    async fn bind() -> Bot {
        Bot {
            listener: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        }
    }

    /// A bot whose sockets have a small receive buffer (no autotuning): one that stops
    /// reading fills up after a few hundred KiB, not 32 MiB.
    async fn bind_small_buffer() -> Bot {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(64 * 1024).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        s.listen(64).unwrap();
        s.set_nonblocking(true).unwrap();
        Bot {
            listener: TcpListener::from_std(s.into()).unwrap(),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("addr")
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr())
    }

    async fn tcp(&self) -> (TcpStream, Instant) {
        let (tcp, _) = timeout(WAIT, self.listener.accept())
            .await
            .expect("lifeguard dials the bot in time")
            .expect("accept");
        (tcp, Instant::now())
    }

    async fn accept(&self) -> Accepted {
        let (tcp, at) = self.tcp().await;
        let mut seen = None;
        let ws = tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, resp: Response| {
            seen = Some((req.uri().path().to_owned(), req.headers().clone()));
            Ok::<_, ErrorResponse>(resp)
        })
        .await
        .expect("upgrade");
        let (path, headers) = seen.expect("request seen");
        Accepted {
            ws,
            path,
            headers,
            at,
        }
    }

    async fn refuse(&self, status: u16) {
        let (tcp, _) = self.tcp().await;
        let _ = tokio_tungstenite::accept_hdr_async(tcp, |_: &Request, _: Response| {
            Err::<Response, _>(
                ws_http::Response::builder()
                    .status(status)
                    .body(None)
                    .expect("response"),
            )
        })
        .await;
    }

    async fn no_dial(&self, wait: Duration) {
        if let Ok(accepted) = timeout(wait, self.listener.accept()).await {
            panic!("unexpected dial: {:?}", accepted.map(|a| a.1));
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn next(c: &mut Conn, wait: Duration) -> Option<Result<Message, String>> {
    match timeout(wait, c.next()).await {
        Err(_) => None,
        Ok(None) => Some(Err("end".to_owned())),
        Ok(Some(Err(e))) => Some(Err(e.to_string())),
        Ok(Some(Ok(m))) => Some(Ok(m)),
    }
}

async fn text(c: &mut Conn) -> String {
    loop {
        match next(c, WAIT).await {
            Some(Ok(Message::Text(t))) => return t.as_str().to_owned(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

async fn silent(c: &mut Conn) {
    if let Some(got) = next(c, QUIET).await {
        panic!("expected silence, got {got:?}");
    }
}

fn json(frame: &str) -> Value {
    serde_json::from_str(frame).expect("json")
}

async fn expect_connect(c: &mut Conn) {
    let first = text(c).await;
    assert!(
        first.contains("\"sub_type\":\"connect\""),
        "first frame is the backend's connect: {first}"
    );
}

/// What a bot saw at the end: text frames (heartbeats dropped), the Close, when.
#[derive(Debug)]
struct Ending {
    texts: Vec<String>,
    close: Option<(u16, String)>,
    at: Instant,
}

impl Ending {
    fn got_disable(&self) -> bool {
        self.texts
            .last()
            .is_some_and(|t| t.contains("\"sub_type\":\"disable\""))
    }
    fn code(&self) -> Option<u16> {
        self.close.as_ref().map(|c| c.0)
    }
}

/// Read until the bot connection ends; replies to the Close as a framework would.
async fn read_to_end(c: &mut Conn, limit: Duration) -> Ending {
    let mut texts = Vec::new();
    let deadline = Instant::now() + limit;
    loop {
        let m = timeout(deadline - Instant::now(), c.next())
            .await
            .expect("the bot connection ended in time");
        match m {
            Some(Ok(Message::Text(t))) => {
                if !t.contains("\"meta_event_type\":\"heartbeat\"") {
                    texts.push(t.to_string());
                }
            }
            Some(Ok(Message::Close(f))) => {
                let at = Instant::now();
                let close = Some(
                    f.map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new())),
                );
                // The socket goes away after our Close reply.
                let gone = timeout(Duration::from_secs(3), async {
                    while let Some(Ok(_)) = c.next().await {}
                })
                .await;
                assert!(gone.is_ok(), "lifeguard closed the bot's socket");
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

// ---------------------------------------------------------------------------------------
// lifeguard with reverse WebSocket, and a simulated NapCat dialling it.

struct Rev {
    sim: NapSim,
    proxy: Option<Proxy>,
    reverse: SocketAddr,
    admin: SocketAddr,
}

fn args(urls: &[String]) -> RunArgs {
    RunArgs {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        reverse_listen: Some("127.0.0.1:0".parse().unwrap()),
        reverse_url: Some(urls.to_vec()),
        close_timeout: Some(Duration::from_millis(500)),
        drain_timeout: Some(Duration::from_secs(3)),
        probe_interval: Some(Duration::from_millis(100)),
        ..Default::default()
    }
}

impl Rev {
    async fn start(urls: &[String]) -> Rev {
        Self::start_with(
            urls,
            SimConfig::default().with_heartbeat_interval(None),
            |_| {},
        )
        .await
    }

    async fn start_with(urls: &[String], sim: SimConfig, tweak: impl FnOnce(&mut RunArgs)) -> Rev {
        let sim = NapSim::start(sim).await.expect("simulator starts");
        let mut a = args(urls);
        tweak(&mut a);
        let settings = Settings::resolve(&a, None).expect("valid settings");
        let proxy = Proxy::start(settings).await.expect("proxy starts");
        Rev {
            sim,
            reverse: proxy.reverse_addr.expect("reverse listener"),
            admin: proxy.admin_addr,
            proxy: Some(proxy),
        }
    }

    fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("running")
    }

    /// NapCat's `websocketClients` entry pointed at lifeguard (path as a NoneBot user writes it).
    fn entry(&self) -> ReverseConfig {
        ReverseConfig::napcat(format!("ws://{}/onebot/v11/ws", self.reverse))
            .with_reconnect_interval(REDIAL)
            .with_heartbeat_interval(None)
    }

    async fn admin(&self, method: &str, path: &str) -> (u16, String) {
        http(self.admin, method, path).await
    }

    async fn stop(mut self) {
        if let Some(p) = self.proxy.take() {
            p.shutdown().await;
        }
        self.sim.shutdown().await;
    }
}

/// A NapCat entry that dialled in, and the bot connection lifeguard opened for it (its
/// connect event consumed).
async fn connected(rev: &Rev, bot: &Bot, entry: ReverseConfig) -> (ReverseHandle, Accepted) {
    let handle = rev.sim.add_reverse(entry);
    let mut a = bot.accept().await;
    expect_connect(&mut a.ws).await;
    timeout(WAIT, handle.wait_connected())
        .await
        .expect("the backend's handshake completed");
    (handle, a)
}

async fn call(c: &mut Conn, request: &str) -> String {
    c.send(Message::text(request)).await.expect("send");
    loop {
        let t = text(c).await;
        if !t.contains("\"post_type\"") {
            return t;
        }
    }
}

fn closes(handle: &ReverseHandle) -> Vec<(u16, String)> {
    handle
        .received()
        .into_iter()
        .filter_map(|f| match f {
            PeerFrame::Close(c) => Some(c.unwrap_or((1005, String::new()))),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// 2. The backend dials in.

#[tokio::test]
async fn the_bot_is_dialled_with_the_backends_headers_and_frames_pass_both_ways() {
    let bot = Bot::bind().await;
    let rev = Rev::start_with(
        &[bot.url("/onebot/v11/ws")],
        SimConfig::default().with_heartbeat_interval(None),
        |a| {
            a.access_token = Some("napcat-secret".into());
            a.reverse_token = Some("bot-secret".into());
        },
    )
    .await;
    let handle = rev.sim.add_reverse(rev.entry().with_token("napcat-secret"));
    let mut a = bot.accept().await;
    assert_eq!(a.path, "/onebot/v11/ws");
    assert_eq!(header(&a.headers, "x-self-id"), Some("3889001234"));
    assert_eq!(header(&a.headers, "x-client-role"), Some("Universal"));
    assert_eq!(header(&a.headers, "user-agent"), Some("OneBot/11"));
    assert_eq!(
        header(&a.headers, "authorization"),
        Some("Bearer bot-secret"),
        "lifeguard presents its own token, never the backend's"
    );
    // The backend's handshake completes only now, and its first frame is `connect`.
    expect_connect(&mut a.ws).await;
    timeout(WAIT, handle.wait_connected())
        .await
        .expect("connected");
    rev.sim.emit_message(7);
    assert_eq!(text(&mut a.ws).await, rev.sim.message_event(7));
    let reply = call(
        &mut a.ws,
        r#"{"action":"get_status","params":{},"echo":{ "seq" : 7 }}"#,
    )
    .await;
    assert!(
        reply.contains(r#""echo":{ "seq" : 7 }"#),
        "echo untouched: {reply}"
    );
    let reply = call(&mut a.ws, r#"{"action":"get_login_info","echo":"12"}"#).await;
    assert!(reply.contains(r#""echo":"12""#), "{reply}");
    silent(&mut a.ws).await;
    // The backend saw exactly the bot's frames.
    let got: Vec<String> = handle
        .received()
        .into_iter()
        .filter_map(|f| match f {
            PeerFrame::Text(t) => Some(t),
            _ => None,
        })
        .collect();
    assert_eq!(
        got,
        [
            r#"{"action":"get_status","params":{},"echo":{ "seq" : 7 }}"#,
            r#"{"action":"get_login_info","echo":"12"}"#
        ]
    );
    rev.stop().await;
}

#[tokio::test]
async fn backends_authenticate_before_the_upgrade() {
    let bot = Bot::bind().await;
    let rev = Rev::start_with(&[bot.url("/ws")], SimConfig::default(), |a| {
        a.access_token = Some("right".into());
    })
    .await;
    // NapCat sends `Bearer ` with an empty token: missing, 401.
    let missing = rev.sim.add_reverse(rev.entry());
    let wrong = rev.sim.add_reverse(rev.entry().with_token("wrong"));
    let go_cq = rev.sim.add_reverse(
        ReverseConfig::gocqhttp(format!("ws://{}/ws", rev.reverse))
            .with_token("right")
            .with_reconnect_interval(Duration::from_secs(60)),
    );
    timeout(WAIT, missing.wait_status(|s| s.failures >= 1))
        .await
        .unwrap();
    timeout(WAIT, wrong.wait_status(|s| s.failures >= 1))
        .await
        .unwrap();
    assert_eq!(missing.refused_statuses()[0], 401);
    assert_eq!(wrong.refused_statuses()[0], 403);
    // go-cqhttp's `Authorization: Token <t>` passes.
    let mut a = bot.accept().await;
    expect_connect(&mut a.ws).await;
    timeout(WAIT, go_cq.wait_connected()).await.unwrap();
    assert_eq!(header(&a.headers, "user-agent"), Some("CQHttp/4.15.0"));
    rev.stop().await;
}

#[tokio::test]
async fn a_bot_that_refuses_gives_502_and_one_that_is_down_503_never_accept_then_close() {
    let bot = Bot::bind().await;
    let bot_url = bot.url("/onebot/v11/ws");
    let rev = Rev::start(std::slice::from_ref(&bot_url)).await;
    let handle = rev.sim.add_reverse(rev.entry());
    bot.refuse(403).await;
    timeout(WAIT, handle.wait_status(|s| s.failures >= 1))
        .await
        .unwrap();
    assert_eq!(handle.refused_statuses(), [502]);
    assert_eq!(handle.handshakes(), 0);

    // Nothing listens there any more: 503, and NapCat's own timer redials.
    let addr = bot.addr();
    drop(bot);
    timeout(WAIT, handle.wait_status(|s| s.failures >= 2))
        .await
        .unwrap();
    assert_eq!(handle.refused_statuses(), [502, 503]);

    // The bot is back: the next redial goes through.
    let bot = Bot {
        listener: TcpListener::bind(addr).await.expect("rebind"),
    };
    let mut a = bot.accept().await;
    expect_connect(&mut a.ws).await;
    timeout(WAIT, handle.wait_connected()).await.unwrap();
    assert_eq!(handle.handshakes(), 1);
    rev.stop().await;
}

#[tokio::test]
async fn a_bot_that_never_answers_gives_503_within_napcats_handshake_timeout() {
    let bot = Bot::bind().await;
    let rev = Rev::start(&[bot.url("/ws")]).await;
    let handle = rev
        .sim
        .add_reverse(rev.entry().with_reconnect_interval(Duration::from_secs(60)));
    // Accept TCP, never answer the upgrade.
    let (_tcp, at) = bot.tcp().await;
    timeout(WAIT, handle.wait_status(|s| s.failures >= 1))
        .await
        .unwrap();
    let took = at.elapsed();
    assert_eq!(handle.refused_statuses(), [503], "{:?}", handle.failures());
    assert!(
        took < Duration::from_millis(1900),
        "answered within NapCat's 2 s handshake timeout: {took:?}"
    );
    rev.stop().await;
}

// ---------------------------------------------------------------------------------------
// 3. The backend goes away.

#[tokio::test]
async fn napcat_killed_the_bot_gets_disable_and_1013_then_the_restart_dials_again() {
    let bot = Bot::bind().await;
    let rev = Rev::start(&[bot.url("/onebot/v11/ws")]).await;
    let (handle, mut a) = connected(&rev, &bot, rev.entry()).await;
    rev.sim.emit_message(1);
    // Written by NapCat (a kill drops what it has not written yet).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    rev.sim.kill();
    let end = read_to_end(&mut a.ws, WAIT).await;
    assert_eq!(
        end.texts.first(),
        Some(&rev.sim.message_event(1)),
        "what NapCat sent first"
    );
    assert!(end.got_disable(), "{end:?}");
    assert_eq!(end.code(), Some(1013), "{end:?}");
    assert!(
        end.close
            .as_ref()
            .unwrap()
            .1
            .contains("backend connection lost"),
        "{end:?}"
    );
    assert!(end.at - t0 < Duration::from_secs(1), "{:?}", end.at - t0);
    eprintln!("kill -> bot Close: {:?}", end.at - t0);
    // The restarted process dials at once: a fresh bot connection, `connect` first.
    rev.sim.enable().await.unwrap();
    let mut b = bot.accept().await;
    expect_connect(&mut b.ws).await;
    timeout(WAIT, handle.wait_connected()).await.unwrap();
    rev.stop().await;
}

#[tokio::test]
async fn napcat_switching_its_entry_off_closes_with_no_code_the_bot_still_gets_disable() {
    let bot = Bot::bind().await;
    let rev = Rev::start(&[bot.url("/onebot/v11/ws")]).await;
    let (handle, mut a) = connected(&rev, &bot, rev.entry()).await;
    let t0 = Instant::now();
    handle.disable();
    let end = read_to_end(&mut a.ws, WAIT).await;
    assert!(end.got_disable(), "{end:?}");
    assert_eq!(end.code(), Some(1013), "{end:?}");
    assert!(
        end.close
            .as_ref()
            .unwrap()
            .1
            .contains("without a close code"),
        "{end:?}"
    );
    eprintln!("entry switched off -> bot Close: {:?}", end.at - t0);
    bot.no_dial(QUIET).await;
    rev.stop().await;
}

#[tokio::test]
async fn a_hung_napcat_is_caught_by_its_heartbeats() {
    let bot = Bot::bind().await;
    let rev = Rev::start(&[bot.url("/ws")]).await;
    let entry = rev
        .entry()
        .with_heartbeat_interval(Some(Duration::from_millis(100)));
    let (handle, mut a) = connected(&rev, &bot, entry).await;
    // Heartbeats flow; then NapCat hangs.
    assert!(text(&mut a.ws).await.contains("heartbeat"));
    let t0 = Instant::now();
    rev.sim.hang();
    let took = closed_for_silence(&mut a.ws, t0, Duration::from_millis(600)).await;
    eprintln!("hang -> bot Close: {took:?}");
    rev.sim.unhang();
    // NapCat sees its connection gone and redials.
    let mut b = bot.accept().await;
    expect_connect(&mut b.ws).await;
    timeout(WAIT, handle.wait_connected()).await.unwrap();
    rev.stop().await;
}

/// A bot whose backend went silent (100 ms heartbeats, grace 2.5) gets `disable` and
/// 1013 naming the silence, within `bound` of `t0`; how long it took.
async fn closed_for_silence(ws: &mut Conn, t0: Instant, bound: Duration) -> Duration {
    let end = read_to_end(ws, WAIT).await;
    assert!(end.got_disable(), "{end:?}");
    assert_eq!(end.code(), Some(1013), "{end:?}");
    assert!(
        end.close
            .as_ref()
            .is_some_and(|c| c.1.contains("no heartbeat for 250 ms")),
        "{end:?}"
    );
    let took = end.at - t0;
    assert!(took < bound, "{took:?}");
    took
}

/// Found by the fault matrix (`matrix_backend_sigstop`, reverse row): a reverse connection
/// that hangs before its first heartbeat was never ended, its bots kept forever. Like a
/// forward session, it now gets the deadline its backend (same self id) announced on an
/// earlier connection: NapCat's heartbeat timer is per entry, so a live one heartbeats
/// within one interval of any reconnect.
#[tokio::test]
async fn a_napcat_hung_before_its_first_heartbeat_on_a_new_connection_is_caught() {
    let bot = Bot::bind().await;
    // Heartbeats only when the test says (`heartbeat_now`, announcing 100 ms).
    let rev = Rev::start_with(
        &[bot.url("/ws")],
        SimConfig::default().with_heartbeat_interval(Some(Duration::from_millis(100))),
        |_| {},
    )
    .await;
    let (handle, mut a) = connected(&rev, &bot, rev.entry()).await;
    assert_eq!(rev.sim.heartbeat_now(), 1);
    assert!(text(&mut a.ws).await.contains("heartbeat"));
    // NapCat reconnects (entry switched off and on); the new connection hangs at once.
    handle.disable();
    let end = read_to_end(&mut a.ws, WAIT).await;
    assert_eq!(end.code(), Some(1013), "{end:?}");
    handle.enable();
    let mut b = bot.accept().await;
    expect_connect(&mut b.ws).await;
    let t0 = Instant::now();
    rev.sim.hang();
    closed_for_silence(&mut b.ws, t0, Duration::from_secs(2)).await;
    rev.sim.unhang();
    rev.stop().await;
}

#[tokio::test]
async fn the_operator_disables_reverse_bots_get_1012_backend_dials_get_503_until_enabled() {
    let bot = Bot::bind().await;
    let rev = Rev::start(&[bot.url("/ws")]).await;
    let (handle, mut a) = connected(&rev, &bot, rev.entry()).await;
    let t0 = Instant::now();
    let (status, _) = rev.admin("POST", "/disable").await;
    assert_eq!(status, 200);
    let end = read_to_end(&mut a.ws, WAIT).await;
    assert!(end.got_disable(), "{end:?}");
    assert_eq!(end.code(), Some(1012), "{end:?}");
    assert!(
        end.close.as_ref().unwrap().1.starts_with("admin:"),
        "{end:?}"
    );
    eprintln!("POST /disable -> bot Close: {:?}", end.at - t0);
    // lifeguard closed the backend's connection too, with the same code.
    timeout(WAIT, handle.wait_disconnected()).await.unwrap();
    assert_eq!(closes(&handle).last().map(|c| c.0), Some(1012));
    // NapCat redials: refused before the upgrade while disabled; no bot is dialled.
    timeout(WAIT, handle.wait_status(|s| s.failures >= 1))
        .await
        .unwrap();
    assert_eq!(handle.refused_statuses()[0], 503);
    bot.no_dial(QUIET).await;
    rev.admin("POST", "/enable").await;
    let mut b = bot.accept().await;
    expect_connect(&mut b.ws).await;
    timeout(WAIT, handle.wait_connected()).await.unwrap();
    rev.stop().await;
}

/// A free loopback port (bound then released): NapCat's file must name lifeguard's port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn napcat_file(port: u16, enable: bool) -> String {
    format!(
        r#"{{"network":{{"httpServers":[],"httpClients":[],"websocketServers":[],
  "websocketClients":[{{"enable":{enable},"name":"nonebot","url":"ws://127.0.0.1:{port}/onebot/v11/ws","token":"","reconnectInterval":5000,"heartInterval":30000}}]}}}}"#
    )
}

#[tokio::test]
async fn napcat_config_switching_the_entry_off_takes_the_reverse_lane_down() {
    let bot = Bot::bind().await;
    let dir = TempDir::new("reverse-napcat");
    let file = dir.path("onebot11_3889001234.json");
    let port = free_port();
    common::write_in_place(&file, &napcat_file(port, true));
    let rev = Rev::start_with(
        &[bot.url("/ws")],
        SimConfig::default().with_heartbeat_interval(None),
        |a| {
            a.reverse_listen = Some(([127, 0, 0, 1], port).into());
            a.napcat_config = Some(file.clone());
        },
    )
    .await;
    let (handle, mut a) = connected(&rev, &bot, rev.entry()).await;
    // The WebUI switch: NapCat rewrites its file and closes (no code) at about the same time.
    let t0 = Instant::now();
    common::write_in_place(&file, &napcat_file(port, false));
    handle.disable();
    let end = read_to_end(&mut a.ws, WAIT).await;
    assert!(end.got_disable(), "{end:?}");
    assert!(matches!(end.code(), Some(1012 | 1013)), "{end:?}");
    eprintln!(
        "NapCat entry off (file + close) -> bot Close: {:?}",
        end.at - t0
    );
    common::wait_until(WAIT, "the reverse lane down", || {
        let s = rev.proxy().state.snapshot();
        !s.lane(lifeguard::state::Lane::Reverse).up
    })
    .await;
    let (_, body) = rev.admin("GET", "/state").await;
    let v = json(&body);
    assert_eq!(v["lanes"]["reverse"]["cause"], "napcat-config", "{v}");
    // Another backend dialling in meanwhile is refused.
    let other = rev
        .sim
        .add_reverse(rev.entry().with_reconnect_interval(Duration::from_secs(60)));
    timeout(WAIT, other.wait_status(|s| s.failures >= 1))
        .await
        .unwrap();
    assert_eq!(other.refused_statuses(), [503]);
    other.disable();
    // Switched on again: NapCat dials, the bot is dialled.
    common::write_in_place(&file, &napcat_file(port, true));
    common::wait_until(WAIT, "the reverse lane up", || {
        rev.proxy()
            .state
            .snapshot()
            .lane(lifeguard::state::Lane::Reverse)
            .up
    })
    .await;
    handle.enable();
    let mut b = bot.accept().await;
    expect_connect(&mut b.ws).await;
    rev.stop().await;
}

#[tokio::test]
async fn offline_account_bots_are_closed_the_backend_is_kept_and_bots_come_back_with_it() {
    let bot = Bot::bind().await;
    let rev = Rev::start(&[bot.url("/ws")]).await;
    let (handle, mut a) = connected(&rev, &bot, rev.entry()).await;
    let t0 = Instant::now();
    rev.sim.kick("KickedOffLine", "另一台设备登录");
    let end = read_to_end(&mut a.ws, WAIT).await;
    assert!(
        end.texts.first().is_some_and(|t| t.contains("bot_offline")),
        "the notice first: {end:?}"
    );
    assert!(end.got_disable(), "{end:?}");
    assert_eq!(end.code(), Some(1013), "{end:?}");
    assert!(
        end.close.as_ref().unwrap().1.starts_with("offline:"),
        "{end:?}"
    );
    eprintln!("kick -> bot Close: {:?}", end.at - t0);
    // The backend connection stays: no redial loop, lifeguard asks get_status over it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(handle.is_connected());
    assert_eq!(handle.dials(), 1);
    assert!(handle
        .received()
        .iter()
        .any(|f| matches!(f, PeerFrame::Text(t) if t.contains("get_status") && t.contains("lifeguard-status-"))));
    bot.no_dial(Duration::from_millis(100)).await;
    let (_, body) = rev.admin("GET", "/state").await;
    let v = json(&body);
    assert_eq!(v["lanes"]["reverse"]["backends"][0]["online"], false, "{v}");
    // Back online: the bot is dialled again and gets `connect` first.
    rev.sim.set_online(true);
    let mut b = bot.accept().await;
    expect_connect(&mut b.ws).await;
    rev.sim.emit_message(2);
    assert_eq!(text(&mut b.ws).await, rev.sim.message_event(2));
    assert_eq!(handle.dials(), 1, "the same backend connection");
    rev.stop().await;
}

// ---------------------------------------------------------------------------------------
// 4. The bot goes away.

#[tokio::test]
async fn the_bot_restarts_the_backend_is_closed_naming_it_and_redials_once_it_is_back() {
    let bot = Bot::bind().await;
    let url = bot.url("/onebot/v11/ws");
    let rev = Rev::start(std::slice::from_ref(&url)).await;
    let (handle, mut a) = connected(&rev, &bot, rev.entry()).await;
    a.ws.close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "restarting".into(),
    }))
    .await
    .unwrap();
    timeout(WAIT, handle.wait_disconnected()).await.unwrap();
    let (code, reason) = closes(&handle)
        .last()
        .cloned()
        .expect("a Close for the backend");
    assert_eq!(code, 1013);
    assert!(reason.contains(&url) && reason.contains("1001"), "{reason}");
    // NapCat's own timer redials; the bot is back: `connect` again.
    let mut b = bot.accept().await;
    expect_connect(&mut b.ws).await;
    timeout(WAIT, handle.wait_connected()).await.unwrap();
    assert_eq!(handle.handshakes(), 2);
    rev.stop().await;
}

// ---------------------------------------------------------------------------------------
// 5. Duplicate self id.

/// A second NapCat process logged in as the same account.
async fn twin(rev: &Rev) -> NapSim {
    let _ = rev;
    NapSim::start(SimConfig::default().with_heartbeat_interval(None))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_new_connection_for_the_same_self_id_replaces_the_old_one_cleanly() {
    let bot = Bot::bind().await;
    let rev = Rev::start(&[bot.url("/ws")]).await;
    let (old, mut a) = connected(
        &rev,
        &bot,
        rev.entry().with_reconnect_interval(Duration::from_secs(60)),
    )
    .await;
    let other = twin(&rev).await;
    let new = other.add_reverse(rev.entry());
    // The old bot connection is fully closed before the new one is dialled.
    let end_old = tokio::spawn(async move { read_to_end(&mut a.ws, WAIT).await });
    let mut b = bot.accept().await;
    let end_old = end_old.await.unwrap();
    assert!(end_old.got_disable(), "{end_old:?}");
    assert_eq!(end_old.code(), Some(1012), "{end_old:?}");
    assert!(
        end_old.close.as_ref().unwrap().1.contains("replaced"),
        "{end_old:?}"
    );
    assert!(
        end_old.at < b.at,
        "old closed {:?} before the new dial",
        b.at - end_old.at
    );
    expect_connect(&mut b.ws).await;
    timeout(WAIT, new.wait_connected()).await.unwrap();
    // The superseded backend connection was closed too, saying why.
    timeout(WAIT, old.wait_disconnected()).await.unwrap();
    assert!(
        closes(&old).last().unwrap().1.contains("replaced"),
        "{:?}",
        closes(&old)
    );
    // The new one relays.
    other.emit_message(3);
    assert_eq!(text(&mut b.ws).await, other.message_event(3));
    other.shutdown().await;
    rev.stop().await;
}

#[tokio::test]
async fn a_stale_connection_closing_late_never_tears_down_its_successor() {
    let bot = Bot::bind().await;
    let rev = Rev::start(&[bot.url("/ws")]).await;
    let (old, mut a) = connected(
        &rev,
        &bot,
        rev.entry().with_reconnect_interval(Duration::from_secs(60)),
    )
    .await;
    // The old NapCat hangs: its socket will not answer lifeguard's Close.
    rev.sim.hang();
    let other = twin(&rev).await;
    let new = other.add_reverse(rev.entry());
    let end_old = read_to_end(&mut a.ws, WAIT).await;
    let mut b = bot.accept().await;
    assert!(end_old.at < b.at);
    expect_connect(&mut b.ws).await;
    timeout(WAIT, new.wait_connected()).await.unwrap();
    // The old socket ends late (close timeout, then the hung process is killed).
    tokio::time::sleep(Duration::from_millis(700)).await;
    rev.sim.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    other.emit_message(4);
    assert_eq!(text(&mut b.ws).await, other.message_event(4));
    assert!(new.is_connected());
    let (_, body) = rev.admin("GET", "/state").await;
    let v = json(&body);
    let backends = v["lanes"]["reverse"]["backends"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(backends.len(), 1, "{v}");
    assert_eq!(backends[0]["self_id"], 3889001234u64, "{v}");
    let _ = old;
    other.shutdown().await;
    rev.stop().await;
}

// ---------------------------------------------------------------------------------------
// 6. Several bots on one backend connection.

#[tokio::test]
async fn several_bots_each_get_every_event_and_only_their_own_replies() {
    let (bot1, bot2) = (Bot::bind().await, Bot::bind().await);
    let rev = Rev::start(&[bot1.url("/onebot/v11/ws"), bot2.url("/ws")]).await;
    let handle = rev.sim.add_reverse(rev.entry());
    let (mut a, mut b) = tokio::join!(bot1.accept(), bot2.accept());
    expect_connect(&mut a.ws).await;
    expect_connect(&mut b.ws).await;
    timeout(WAIT, handle.wait_connected()).await.unwrap();
    rev.sim.emit_message(1);
    assert_eq!(text(&mut a.ws).await, rev.sim.message_event(1));
    assert_eq!(text(&mut b.ws).await, rev.sim.message_event(1));
    // Same echo from both, of different JSON types, and one with none.
    a.ws.send(Message::text(
        r#"{"action":"get_status","params":{},"echo":{"seq":1}}"#,
    ))
    .await
    .unwrap();
    b.ws.send(Message::text(
        r#"{"action":"get_status","params":{},"echo":"1"}"#,
    ))
    .await
    .unwrap();
    b.ws.send(Message::text(r#"{"action":"get_login_info","echo":1}"#))
        .await
        .unwrap();
    let ra = text(&mut a.ws).await;
    assert!(ra.contains(r#""echo":{"seq":1}"#), "{ra}");
    let rb1 = text(&mut b.ws).await;
    let rb2 = text(&mut b.ws).await;
    assert!(rb1.contains(r#""echo":"1""#), "{rb1}");
    assert!(
        rb2.contains(r#""echo":1,"#) && rb2.contains("nickname"),
        "{rb2}"
    );
    silent(&mut a.ws).await;
    // NapCat saw lifeguard's echoes, never two alike.
    let echoes: Vec<String> = handle
        .received()
        .into_iter()
        .filter_map(|f| match f {
            PeerFrame::Text(t) => Some(json(&t)["echo"].to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(echoes.len(), 3);
    assert!(
        echoes.iter().all(|e| e.contains("lifeguard:")),
        "{echoes:?}"
    );
    // A bot that leaves is redialled; the other keeps going.
    b.ws.close(None).await.unwrap();
    rev.sim.emit_message(2);
    assert_eq!(text(&mut a.ws).await, rev.sim.message_event(2));
    let mut b2 = bot2.accept().await;
    expect_connect(&mut b2.ws).await;
    assert_eq!(handle.handshakes(), 1, "the backend connection was kept");
    rev.stop().await;
}

#[tokio::test]
async fn a_missing_bot_joins_late_and_gets_connect_first() {
    let bot1 = Bot::bind().await;
    let late = free_port();
    let rev = Rev::start(&[bot1.url("/ws"), format!("ws://127.0.0.1:{late}/ws")]).await;
    let handle = rev.sim.add_reverse(rev.entry());
    let mut a = bot1.accept().await;
    expect_connect(&mut a.ws).await;
    timeout(WAIT, handle.wait_connected()).await.unwrap();
    rev.sim.emit_message(1);
    assert_eq!(text(&mut a.ws).await, rev.sim.message_event(1));
    // The second bot starts now; lifeguard's background redial finds it.
    let bot2 = Bot {
        listener: TcpListener::bind(("127.0.0.1", late)).await.unwrap(),
    };
    let mut b = bot2.accept().await;
    expect_connect(&mut b.ws).await;
    rev.sim.emit_message(2);
    assert_eq!(text(&mut b.ws).await, rev.sim.message_event(2));
    assert_eq!(text(&mut a.ws).await, rev.sim.message_event(2));
    rev.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_that_falls_behind_is_closed_alone() {
    let (bot1, bot2) = (Bot::bind().await, Bot::bind_small_buffer().await);
    let rev = Rev::start(&[bot1.url("/ws"), bot2.url("/ws")]).await;
    let handle = rev.sim.add_reverse(rev.entry());
    let (mut a, mut b) = tokio::join!(bot1.accept(), bot2.accept());
    expect_connect(&mut a.ws).await;
    expect_connect(&mut b.ws).await;
    timeout(WAIT, handle.wait_connected()).await.unwrap();
    // bot2 reads nothing while 16 MiB of events go by; bot1 takes them all.
    let big = format!(
        r#"{{"time":1,"self_id":3889001234,"post_type":"message","raw_message":"{}"}}"#,
        "x".repeat(64 * 1024)
    );
    let n = 256;
    let len = big.len();
    let reader = tokio::spawn(async move {
        for i in 0..n {
            let t = text(&mut a.ws).await;
            assert_eq!(t.len(), len, "event {i}");
        }
        a
    });
    for chunk in 0..n / 16 {
        for _ in 0..16 {
            rev.sim.emit(big.clone());
        }
        if chunk % 4 == 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let _a = reader.await.expect("bot1 got every event");
    let deadline = Instant::now() + WAIT;
    loop {
        let scrape = parse_metrics(&rev.admin("GET", "/metrics").await.1);
        let overflowed = metric(
            &scrape,
            "lifeguard_sessions_closed_total",
            // Code 1008 when the bot reads its Close within the close timeout; this one
            // reads nothing, so "none".
            &[("transport", "reverse"), ("cause", "bot-overflow")],
        );
        if overflowed == Some(1.0) {
            break;
        }
        if Instant::now() > deadline {
            let m = rev.admin("GET", "/metrics").await.1;
            let st = rev.admin("GET", "/state").await.1;
            panic!(
                "no bot-overflow termination: {overflowed:?}\n{}\n{st}",
                m.lines()
                    .filter(|l| l.contains("reverse"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What bot2 still gets ends early: fewer events, then the end of its connection.
    let mut got = 0;
    loop {
        match next(&mut b.ws, WAIT).await {
            Some(Ok(Message::Text(_))) => got += 1,
            Some(Ok(Message::Close(f))) => {
                assert_eq!(f.map(|f| u16::from(f.code)), Some(1008));
                break;
            }
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    assert!(got < n, "bot2 got {got} of {n}");
    // And it is redialled.
    let mut b2 = bot2.accept().await;
    expect_connect(&mut b2.ws).await;
    rev.stop().await;
}

// ---------------------------------------------------------------------------------------
// 7. Observability.

#[tokio::test]
async fn state_and_metrics_show_reverse_backends_by_self_id() {
    let bot = Bot::bind().await;
    let rev = Rev::start(&[bot.url("/ws")]).await;
    let (_handle, _a) = connected(&rev, &bot, rev.entry()).await;
    let (_, body) = rev.admin("GET", "/state").await;
    let v = json(&body);
    let r = &v["lanes"]["reverse"];
    assert_eq!(r["state"], "up", "{v}");
    assert_eq!(r["sessions"]["universal"], 1, "{v}");
    let b = &r["backends"][0];
    assert_eq!(b["self_id"], 3889001234u64, "{v}");
    assert_eq!(b["role"], "universal");
    assert_eq!(b["online"], true);
    assert_eq!(b["bots"]["connected"], 1);
    let scrape = parse_metrics(&rev.admin("GET", "/metrics").await.1);
    let id = [("self_id", "3889001234")];
    assert_eq!(
        metric(&scrape, "lifeguard_reverse_backend_connections", &id),
        Some(1.0)
    );
    assert_eq!(
        metric(&scrape, "lifeguard_reverse_bot_connections", &id),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &scrape,
            "lifeguard_sessions_open",
            &[("transport", "reverse"), ("path", "universal")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &scrape,
            "lifeguard_handshakes_total",
            &[("transport", "reverse"), ("status", "101")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&scrape, "lifeguard_upstream_up", &[("lane", "reverse")]),
        Some(1.0)
    );
    rev.stop().await;
}
