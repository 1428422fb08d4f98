//! The simulator's reverse WebSocket client against a hand-written framework server on
//! loopback (tokio-tungstenite), checking what a framework would see.
// The handshake callback's error type is fixed by tungstenite.
#![allow(clippy::result_large_err)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use lifeguard::sim::{
    DialFailure, NapSim, PeerFrame, ReverseAuth, ReverseConfig, ReverseRole, SimConfig,
};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{self, HeaderMap};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Conn = WebSocketStream<TcpStream>;

const WAIT: Duration = Duration::from_secs(3);
const QUIET: Duration = Duration::from_millis(300);
/// Short redial delay so that the tests stay fast; bounds below are generous.
const REDIAL: Duration = Duration::from_millis(300);

/// A framework's reverse WebSocket server.
struct Peer {
    listener: TcpListener,
}

/// One accepted connection and what its upgrade request said.
struct Accepted {
    ws: Conn,
    path: String,
    headers: HeaderMap,
    at: Instant,
}

impl Peer {
    async fn bind() -> Peer {
        Peer {
            listener: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.listener.local_addr().expect("addr"))
    }

    /// Accept the next dial's TCP connection; when it came.
    async fn tcp(&self) -> (TcpStream, Instant) {
        let (tcp, _) = timeout(WAIT, self.listener.accept())
            .await
            .expect("a dial in time")
            .expect("accept");
        (tcp, Instant::now())
    }

    /// Accept the next dial and upgrade it.
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

    /// Accept the next dial and refuse the upgrade with `status`.
    async fn refuse(&self, status: u16) -> Instant {
        let (tcp, at) = self.tcp().await;
        let result = tokio_tungstenite::accept_hdr_async(tcp, |_: &Request, _: Response| {
            Err::<Response, _>(
                http::Response::builder()
                    .status(status)
                    .body(None)
                    .expect("response"),
            )
        })
        .await;
        assert!(result.is_err(), "the upgrade must fail");
        at
    }

    /// Assert that nobody dials for `wait`.
    async fn no_dial(&self, wait: Duration) {
        if let Ok(accepted) = timeout(wait, self.listener.accept()).await {
            panic!("unexpected dial: {:?}", accepted.map(|a| a.1));
        }
    }
}

async fn sim() -> NapSim {
    NapSim::start(SimConfig::default().with_heartbeat_interval(None))
        .await
        .expect("simulator starts")
}

fn cfg(url: String) -> ReverseConfig {
    ReverseConfig::napcat(url)
        .with_reconnect_interval(REDIAL)
        .with_heartbeat_interval(None)
}

/// The next frame, pings skipped (there should be none, the check is elsewhere).
async fn next(c: &mut Conn, wait: Duration) -> Option<Result<Message, String>> {
    match timeout(wait, c.next()).await {
        Err(_) => None,
        Ok(None) => Some(Err("end".to_owned())),
        Ok(Some(Err(e))) => Some(Err(e.to_string())),
        Ok(Some(Ok(m))) => Some(Ok(m)),
    }
}

async fn text(c: &mut Conn) -> String {
    match next(c, WAIT).await {
        Some(Ok(Message::Text(t))) => t.as_str().to_owned(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

async fn silent(c: &mut Conn) {
    if let Some(got) = next(c, QUIET).await {
        panic!("expected silence, got {got:?}");
    }
}

async fn call(c: &mut Conn, request: &str) -> String {
    c.send(Message::text(request)).await.expect("send");
    text(c).await
}

fn json(frame: &str) -> Value {
    serde_json::from_str(frame).expect("json")
}

async fn expect_connect(c: &mut Conn, self_id: u64) {
    let first = json(&text(c).await);
    assert_eq!(first["post_type"], "meta_event");
    assert_eq!(first["meta_event_type"], "lifecycle");
    assert_eq!(first["sub_type"], "connect");
    assert_eq!(first["self_id"], self_id);
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().expect("ascii header"))
}

/// The stream ends without a Close frame (reset or FIN).
async fn ends_without_close(c: &mut Conn) {
    match next(c, WAIT).await {
        Some(Err(_)) => {}
        other => panic!("expected the socket to drop without Close, got {other:?}"),
    }
}

#[tokio::test]
async fn napcat_headers_connect_first_then_events_heartbeats_and_api() {
    let sim = sim().await;
    let peer = Peer::bind().await;
    let handle = sim.add_reverse(
        cfg(peer.url("/onebot/v11/ws")).with_heartbeat_interval(Some(Duration::from_millis(100))),
    );
    let mut a = peer.accept().await;
    assert_eq!(a.path, "/onebot/v11/ws");
    assert_eq!(header(&a.headers, "x-self-id"), Some("3889001234"));
    // An empty token still sends `Bearer ` (the parser may trim the trailing space).
    assert_eq!(
        header(&a.headers, "authorization").map(str::trim_end),
        Some("Bearer")
    );
    assert_eq!(header(&a.headers, "x-client-role"), Some("Universal"));
    assert_eq!(header(&a.headers, "user-agent"), Some("OneBot/11"));
    expect_connect(&mut a.ws, sim.self_id()).await;
    timeout(WAIT, handle.wait_connected())
        .await
        .expect("connected");
    assert_eq!(handle.handshakes(), 1);
    assert_eq!(handle.dials(), 1);

    // Heartbeats as JSON frames every interval, never a WebSocket ping.
    let started = Instant::now();
    for _ in 0..3 {
        let hb = json(&text(&mut a.ws).await);
        assert_eq!(hb["meta_event_type"], "heartbeat");
        assert_eq!(hb["interval"], 100);
        assert_eq!(hb["status"]["online"], true);
    }
    assert!(started.elapsed() >= Duration::from_millis(190));
    handle.set_heartbeat_interval(None);
    // One heartbeat may already be on its way.
    if let Some(Ok(Message::Text(t))) = next(&mut a.ws, Duration::from_millis(50)).await {
        assert!(t.as_str().contains("heartbeat"), "{t}");
    }

    // Events and API replies (echo byte for byte, NapCat client wording for unknown).
    assert_eq!(sim.emit_message(7), 1);
    assert_eq!(text(&mut a.ws).await, sim.message_event(7));
    let reply = call(&mut a.ws, r#"{"action":"get_status","echo":{ "seq" : 7 }}"#).await;
    assert_eq!(
        reply,
        r#"{"status":"ok","retcode":0,"data":{"online":true,"good":true,"stat":{}},"message":"","wording":"","echo":{ "seq" : 7 },"stream":"normal-action"}"#
    );
    let reply = call(&mut a.ws, r#"{"action":"nope","echo":"3"}"#).await;
    assert_eq!(
        reply,
        r#"{"status":"failed","retcode":1404,"data":null,"message":"不支持的Api nope","wording":"不支持的Api nope","echo":"3","stream":"normal-action"}"#
    );
    silent(&mut a.ws).await;
    let received = handle.received();
    assert_eq!(received.len(), 2, "{received:?}");
    assert!(matches!(&received[0], PeerFrame::Text(t) if t.contains("get_status")));
    sim.shutdown().await;
}

#[tokio::test]
async fn redials_after_the_fixed_interval_after_a_close_or_a_refusal() {
    let sim = sim().await;
    let peer = Peer::bind().await;
    let handle = sim.add_reverse(cfg(peer.url("/ws")));
    let mut a = peer.accept().await;
    expect_connect(&mut a.ws, sim.self_id()).await;
    a.ws.close(Some(CloseFrame {
        code: CloseCode::Policy,
        reason: "who are you".into(),
    }))
    .await
    .expect("close");
    // The simulator answers the Close and ends the connection.
    match next(&mut a.ws, WAIT).await {
        Some(Ok(Message::Close(_))) => {}
        other => panic!("expected the Close reply, got {other:?}"),
    }
    let closed = Instant::now();
    let b = peer.accept().await;
    // The simulator saw our Close, code and reason.
    let gap = b.at - closed;
    assert!(gap >= REDIAL - Duration::from_millis(20), "{gap:?}");
    assert!(gap < REDIAL + Duration::from_millis(900), "{gap:?}");
    assert!(handle
        .received()
        .contains(&PeerFrame::Close(Some((1008, "who are you".to_owned())))));
    drop(b);

    // Refused handshakes: redial after the same fixed interval, statuses recorded in order.
    let first = peer.refuse(503).await;
    let second = peer.refuse(401).await;
    let third = peer.accept().await;
    for gap in [second - first, third.at - second] {
        assert!(gap >= REDIAL - Duration::from_millis(20), "{gap:?}");
        assert!(gap < REDIAL + Duration::from_millis(900), "{gap:?}");
    }
    assert_eq!(handle.refused_statuses(), vec![503, 401]);
    // The peer has sent its 101; the simulator may not have read it yet.
    let status = timeout(WAIT, handle.wait_status(|s| s.connected))
        .await
        .expect("connected");
    assert_eq!(status.dials, 5);
    assert_eq!(status.handshakes, 3);
    assert_eq!(status.failures, 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn handshake_timeout_and_refused_connect_count_as_failures() {
    let sim = sim().await;
    let peer = Peer::bind().await;
    let handle =
        sim.add_reverse(cfg(peer.url("/")).with_handshake_timeout(Duration::from_millis(200)));
    // Accept the TCP connection and never answer the upgrade.
    let (_silent, first) = peer.tcp().await;
    let b = peer.accept().await;
    let gap = b.at - first;
    // Timeout (200 ms) + interval (300 ms).
    assert!(gap >= Duration::from_millis(480), "{gap:?}");
    assert!(gap < Duration::from_millis(1500), "{gap:?}");
    assert_eq!(handle.failures(), vec![DialFailure::Timeout]);
    drop(b);

    // Nobody listening: connect refused, redial on the same schedule.
    drop(peer);
    timeout(WAIT, handle.wait_status(|s| s.failures >= 3))
        .await
        .expect("failures");
    let failures = handle.failures();
    assert!(matches!(failures[1], DialFailure::Error(_)), "{failures:?}");
    assert!(handle.refused_statuses().is_empty());
    assert!(!handle.is_connected());
    sim.shutdown().await;
}

#[tokio::test]
async fn disable_closes_without_a_code_and_stops_dialling() {
    let sim = sim().await;
    let peer = Peer::bind().await;
    let handle = sim.add_reverse(cfg(peer.url("/")));
    let mut a = peer.accept().await;
    expect_connect(&mut a.ws, sim.self_id()).await;
    timeout(WAIT, handle.wait_connected()).await.unwrap();
    handle.disable();
    match next(&mut a.ws, WAIT).await {
        Some(Ok(Message::Close(frame))) => assert!(frame.is_none(), "no code: {frame:?}"),
        other => panic!("expected a Close without a code, got {other:?}"),
    }
    timeout(WAIT, handle.wait_disconnected()).await.unwrap();
    assert_eq!(sim.emit_message(1), 0);
    peer.no_dial(REDIAL * 3).await;

    // Switched on again: it dials at once, not after the interval.
    let enabled = Instant::now();
    handle.enable();
    let mut b = peer.accept().await;
    assert!(b.at - enabled < REDIAL, "{:?}", b.at - enabled);
    expect_connect(&mut b.ws, sim.self_id()).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn kill_drops_without_close_and_the_restart_dials_again() {
    let sim = sim().await;
    let peer = Peer::bind().await;
    let handle = sim.add_reverse(cfg(peer.url("/")));
    let mut a = peer.accept().await;
    expect_connect(&mut a.ws, sim.self_id()).await;
    timeout(WAIT, handle.wait_connected()).await.unwrap();
    sim.kill();
    ends_without_close(&mut a.ws).await;
    timeout(WAIT, handle.wait_disconnected()).await.unwrap();
    // A dead process dials nobody.
    peer.no_dial(REDIAL * 3).await;
    let restarted = Instant::now();
    sim.enable().await.expect("restart");
    let mut b = peer.accept().await;
    assert!(b.at - restarted < REDIAL, "{:?}", b.at - restarted);
    expect_connect(&mut b.ws, sim.self_id()).await;
    assert!(!handle
        .received()
        .iter()
        .any(|f| matches!(f, PeerFrame::Close(_))));
    sim.shutdown().await;
}

#[tokio::test]
async fn hang_freezes_the_connection_and_the_dialler() {
    let sim = sim().await;
    let peer = Peer::bind().await;
    let handle = sim
        .add_reverse(cfg(peer.url("/")).with_heartbeat_interval(Some(Duration::from_millis(50))));
    let mut a = peer.accept().await;
    expect_connect(&mut a.ws, sim.self_id()).await;
    sim.hang();
    // Drain a heartbeat that may have been on its way.
    while let Some(Ok(Message::Text(_))) = next(&mut a.ws, Duration::from_millis(100)).await {}
    a.ws.send(Message::text(r#"{"action":"get_login_info","echo":1}"#))
        .await
        .unwrap();
    assert_eq!(sim.emit_message(1), 0);
    silent(&mut a.ws).await;
    sim.unhang();
    // The request sent while hung is answered (heartbeats resume around it).
    loop {
        let frame = text(&mut a.ws).await;
        if frame.contains(r#""echo":1,"#) {
            break;
        }
        assert!(frame.contains("heartbeat"), "{frame}");
    }
    // A hung process does not redial either.
    drop(a);
    timeout(WAIT, handle.wait_disconnected()).await.unwrap();
    sim.hang();
    peer.no_dial(REDIAL * 3).await;
    sim.unhang();
    let mut b = peer.accept().await;
    expect_connect(&mut b.ws, sim.self_id()).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn auth_styles_and_lagrange_split_roles() {
    let sim = sim().await;
    let peer = Peer::bind().await;
    // go-cqhttp: `Token`, and no header at all without a token.
    let gocq = sim.add_reverse(ReverseConfig::gocqhttp(peer.url("/")).with_token("t0k"));
    let a = peer.accept().await;
    assert_eq!(header(&a.headers, "authorization"), Some("Token t0k"));
    assert_eq!(header(&a.headers, "user-agent"), Some("CQHttp/4.15.0"));
    gocq.disable();
    let none = sim.add_reverse(ReverseConfig::gocqhttp(peer.url("/")));
    let b = peer.accept().await;
    assert_eq!(header(&b.headers, "authorization"), None);
    none.disable();
    let napcat = sim.add_reverse(cfg(peer.url("/")).with_token("s3cret"));
    let c = peer.accept().await;
    assert_eq!(header(&c.headers, "authorization"), Some("Bearer s3cret"));
    napcat.disable();
    let bare = sim.add_reverse(
        cfg(peer.url("/"))
            .with_auth(ReverseAuth::None)
            .with_token("x"),
    );
    let d = peer.accept().await;
    assert_eq!(header(&d.headers, "authorization"), None);
    bare.disable();
    drop((a, b, c, d));

    // LLOneBot: NapCat's headers, fixed 3 s redial (too slow to exercise here).
    let llob = ReverseConfig::llonebot(peer.url("/"));
    assert_eq!(llob.reconnect_interval, Duration::from_millis(3000));
    assert_eq!(
        (llob.auth, llob.role, llob.user_agent.as_str()),
        (ReverseAuth::Bearer, ReverseRole::Universal, "OneBot/11")
    );

    // Lagrange's split mode: an API connection and an Event connection on separate URLs.
    let api = sim.add_reverse(
        ReverseConfig::lagrange(peer.url("/api"), ReverseRole::Api)
            .with_reconnect_interval(REDIAL)
            .with_heartbeat_interval(Some(Duration::from_millis(100))),
    );
    let mut api_conn = peer.accept().await;
    let event = sim.add_reverse(
        ReverseConfig::lagrange(peer.url("/event"), ReverseRole::Event)
            .with_reconnect_interval(REDIAL)
            .with_heartbeat_interval(Some(Duration::from_millis(100))),
    );
    let mut event_conn = peer.accept().await;
    assert_eq!(api_conn.path, "/api");
    assert_eq!(header(&api_conn.headers, "x-client-role"), Some("Api"));
    assert_eq!(header(&event_conn.headers, "x-client-role"), Some("Event"));
    assert_eq!(header(&event_conn.headers, "authorization"), None);
    timeout(WAIT, api.wait_connected()).await.unwrap();
    timeout(WAIT, event.wait_connected()).await.unwrap();
    expect_connect(&mut event_conn.ws, sim.self_id()).await;
    assert_eq!(sim.emit_message(3), 1);
    assert_eq!(text(&mut event_conn.ws).await, sim.message_event(3));
    assert!(text(&mut event_conn.ws).await.contains("heartbeat"));
    // The API connection: no connect, no events, no heartbeats, but answers.
    silent(&mut api_conn.ws).await;
    let reply = call(
        &mut api_conn.ws,
        r#"{"action":"get_login_info","echo":"1"}"#,
    )
    .await;
    assert!(reply.contains(r#""echo":"1""#), "{reply}");
    // The Event connection ignores API calls.
    event_conn
        .ws
        .send(Message::text(r#"{"action":"get_login_info","echo":"2"}"#))
        .await
        .unwrap();
    // Heartbeats keep coming every 100 ms: watch for a while, see nothing else.
    let until = Instant::now() + QUIET;
    while let Ok(got) = tokio::time::timeout_at(until, event_conn.ws.next()).await {
        match got {
            Some(Ok(Message::Text(t))) => assert!(t.as_str().contains("heartbeat"), "{t}"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(event.received().len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn kick_tells_every_consumer_at_once() {
    let sim = sim().await;
    let peer = Peer::bind().await;
    let _handle = sim.add_reverse(cfg(peer.url("/")));
    let mut a = peer.accept().await;
    expect_connect(&mut a.ws, sim.self_id()).await;
    let (mut fwd, _) = tokio_tungstenite::connect_async(sim.url()).await.unwrap();
    let first = fwd.next().await.unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("connect"));
    assert_eq!(sim.kick("下线通知", "你的帐号在另一台设备登录"), 2);
    let notice = text(&mut a.ws).await;
    let v = json(&notice);
    assert_eq!(v["post_type"], "notice");
    assert_eq!(v["notice_type"], "bot_offline");
    assert_eq!(v["user_id"], sim.self_id());
    assert_eq!(v["tag"], "下线通知");
    assert_eq!(v["message"], "你的帐号在另一台设备登录");
    let time = v["time"].as_u64().unwrap();
    assert_eq!(notice, {
        let expected = sim.bot_offline_event("下线通知", "你的帐号在另一台设备登录");
        let t = json(&expected)["time"].as_u64().unwrap();
        expected.replace(&format!(r#""time":{t}"#), &format!(r#""time":{time}"#))
    });
    let fwd_notice = fwd.next().await.unwrap().unwrap();
    assert_eq!(
        json(fwd_notice.to_text().unwrap())["notice_type"],
        "bot_offline"
    );
    let status = call(&mut a.ws, r#"{"action":"get_status","echo":1}"#).await;
    assert!(status.contains(r#""online":false"#), "{status}");
    assert_eq!(sim.heartbeat_now(), 2);
    assert!(text(&mut a.ws).await.contains(r#""online":false"#));
    sim.shutdown().await;
}

#[tokio::test]
async fn blast_reaches_reverse_connections() {
    let sim = sim().await;
    let peer = Peer::bind().await;
    let handle = sim.add_reverse(cfg(peer.url("/")));
    let mut a = peer.accept().await;
    expect_connect(&mut a.ws, sim.self_id()).await;
    timeout(WAIT, handle.wait_connected()).await.unwrap();
    let reader = {
        let sim = sim.clone();
        tokio::spawn(async move {
            for seq in 1..=500 {
                assert_eq!(text(&mut a.ws).await, sim.message_event(seq));
            }
        })
    };
    assert_eq!(timeout(WAIT, sim.blast(500)).await.unwrap(), 1);
    timeout(WAIT, reader).await.unwrap().unwrap();
    sim.shutdown().await;
}
