//! The NapCat simulator against real tokio-tungstenite clients on loopback.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use lifeguard::sim::{NapSim, SimConfig};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(3);
const QUIET: Duration = Duration::from_millis(300);

/// What a client saw next.
#[derive(Debug)]
enum Recv {
    Msg(Message),
    End,
    Error(#[allow(dead_code)] String),
    Timeout,
}

async fn start(cfg: SimConfig) -> NapSim {
    NapSim::start(cfg).await.expect("simulator starts")
}

fn quiet_cfg() -> SimConfig {
    SimConfig::default().with_heartbeat_interval(None)
}

async fn connect(sim: &NapSim, path: &str) -> Client {
    let url = format!("{}{}", sim.url(), path);
    timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake in time")
        .expect("handshake ok")
        .0
}

async fn connect_with_auth(sim: &NapSim, path: &str, authorization: &str) -> Client {
    let mut req = format!("{}{}", sim.url(), path)
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("authorization", authorization.parse().expect("header"));
    timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake in time")
        .expect("handshake ok")
        .0
}

async fn recv(c: &mut Client, wait: Duration) -> Recv {
    match timeout(wait, c.next()).await {
        Err(_) => Recv::Timeout,
        Ok(None) => Recv::End,
        Ok(Some(Err(e))) => Recv::Error(e.to_string()),
        Ok(Some(Ok(m))) => Recv::Msg(m),
    }
}

/// The next text frame (pings and pongs skipped); panics on anything else.
async fn text(c: &mut Client) -> String {
    loop {
        match recv(c, WAIT).await {
            Recv::Msg(Message::Text(t)) => return t.as_str().to_owned(),
            Recv::Msg(Message::Ping(_) | Message::Pong(_)) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Assert that no text frame arrives for `QUIET`.
async fn silent(c: &mut Client) {
    loop {
        match recv(c, QUIET).await {
            Recv::Timeout => return,
            Recv::Msg(Message::Ping(_) | Message::Pong(_)) => continue,
            other => panic!("expected silence, got {other:?}"),
        }
    }
}

async fn call(c: &mut Client, request: &str) -> String {
    c.send(Message::text(request)).await.expect("send");
    text(c).await
}

fn connect_event(self_id: u64, time: u64) -> String {
    format!(
        r#"{{"time":{time},"self_id":{self_id},"post_type":"meta_event","meta_event_type":"lifecycle","sub_type":"connect"}}"#
    )
}

fn time_of(frame: &str) -> u64 {
    let v: Value = serde_json::from_str(frame).expect("json");
    v["time"].as_u64().expect("time")
}

async fn expect_connect(sim: &NapSim, c: &mut Client) {
    let first = text(c).await;
    assert_eq!(first, connect_event(sim.self_id(), time_of(&first)));
}

async fn refused(sim: &NapSim) -> bool {
    matches!(
        timeout(WAIT, TcpStream::connect(sim.addr())).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

#[tokio::test]
async fn connect_event_first_on_universal_paths_none_on_api() {
    let sim = start(quiet_cfg().with_self_id(10001000)).await;
    let mut keep = Vec::new();
    for path in ["/", "/event", "/anything?x=1"] {
        let mut c = connect(&sim, path).await;
        let first = text(&mut c).await;
        assert_eq!(first, connect_event(10001000, time_of(&first)), "{path}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(time_of(&first).abs_diff(now) <= 2, "time in seconds");
        keep.push(c);
    }
    for path in ["/api", "/api/", "/api?access_token="] {
        let mut c = connect(&sim, path).await;
        silent(&mut c).await;
        let reply = call(
            &mut c,
            r#"{"action":"get_login_info","params":{},"echo":"1"}"#,
        )
        .await;
        assert!(reply.contains(r#""nickname":"lifeguard-bot""#), "{reply}");
        keep.push(c);
    }
    assert_eq!(sim.handshakes(), 6);
    assert_eq!(sim.handshakes_on("/"), 1);
    assert_eq!(sim.handshakes_on("/event"), 1);
    assert_eq!(sim.handshakes_on("/api"), 2);
    assert_eq!(sim.handshakes_on("/api/"), 1);
    assert_eq!(sim.open_connections(), 6);
    sim.shutdown().await;
}

#[tokio::test]
async fn api_replies_echo_byte_for_byte() {
    let sim = start(quiet_cfg()).await;
    let mut c = connect(&sim, "/api").await;
    let cases = [
        (
            r#"{"action":"get_login_info","params":{},"echo":"1"}"#,
            r#"{"status":"ok","retcode":0,"data":{"user_id":3889001234,"nickname":"lifeguard-bot"},"message":"","wording":"","echo":"1","stream":"normal-action"}"#.to_owned(),
        ),
        (
            r#"{"action":"send_group_msg","params":{"group_id":812345678,"message":"hi"},"echo":42}"#,
            r#"{"status":"ok","retcode":0,"data":{"message_id":1},"message":"","wording":"","echo":42,"stream":"normal-action"}"#.to_owned(),
        ),
        (
            r#"{"action":"get_status","params":{},"echo":{"seq":7}}"#,
            r#"{"status":"ok","retcode":0,"data":{"online":true,"good":true,"stat":{}},"message":"","wording":"","echo":{"seq":7},"stream":"normal-action"}"#.to_owned(),
        ),
        (
            r#"{"echo": { "seq" : 8 } , "action":"send_msg"}"#,
            r#"{"status":"ok","retcode":0,"data":{"message_id":2},"message":"","wording":"","echo":{ "seq" : 8 },"stream":"normal-action"}"#.to_owned(),
        ),
        (
            r#"{"action":"no_such_action","params":{},"echo":"3"}"#,
            r#"{"status":"failed","retcode":1404,"data":null,"message":"不支持的API no_such_action","wording":"不支持的API no_such_action","echo":"3","stream":"normal-action"}"#.to_owned(),
        ),
        (
            r#"{"action":"send_private_msg","params":{"user_id":2233445566,"message":"hello"}}"#,
            r#"{"status":"ok","retcode":0,"data":{"message_id":3},"message":"","wording":"","echo":"","stream":"normal-action"}"#.to_owned(),
        ),
        (
            r#"{"action":"get_login_info","echo":null}"#,
            r#"{"status":"ok","retcode":0,"data":{"user_id":3889001234,"nickname":"lifeguard-bot"},"message":"","wording":"","echo":"","stream":"normal-action"}"#.to_owned(),
        ),
        (
            r#"["get_status","1"]"#,
            r#"{"status":"failed","retcode":1404,"data":null,"message":"不支持的API undefined","wording":"不支持的API undefined","echo":null,"stream":"normal-action"}"#.to_owned(),
        ),
        (
            r#"{"action":"nope"}"#,
            r#"{"status":"failed","retcode":1404,"data":null,"message":"不支持的API nope","wording":"不支持的API nope","echo":null,"stream":"normal-action"}"#.to_owned(),
        ),
        (
            r#"{"action":"get_login_info","echo":"#,
            r#"{"status":"failed","retcode":1400,"data":null,"message":"json解析失败,请检查数据格式","wording":"json解析失败,请检查数据格式","echo":null,"stream":"normal-action"}"#.to_owned(),
        ),
    ];
    for (request, expected) in &cases {
        assert_eq!(&call(&mut c, request).await, expected, "{request}");
    }
    // Pipelined requests are answered in order.
    for i in 0..50 {
        c.feed(Message::text(format!(
            r#"{{"action":"get_status","echo":"{i}"}}"#
        )))
        .await
        .unwrap();
    }
    c.flush().await.unwrap();
    for i in 0..50 {
        let reply = text(&mut c).await;
        assert!(reply.ends_with(&format!(r#""echo":"{i}","stream":"normal-action"}}"#)));
    }
    // Universal connections answer API calls too.
    let mut u = connect(&sim, "/").await;
    expect_connect(&sim, &mut u).await;
    let reply = call(&mut u, r#"{"action":"get_version_info","echo":1.5e3}"#).await;
    assert!(reply.contains(r#""echo":1.5e3,"#), "{reply}");
    sim.shutdown().await;
}

#[tokio::test]
async fn heartbeats_follow_the_configured_interval_and_online_state() {
    let sim =
        start(SimConfig::default().with_heartbeat_interval(Some(Duration::from_millis(100)))).await;
    let mut ev = connect(&sim, "/").await;
    let mut api = connect(&sim, "/api").await;
    expect_connect(&sim, &mut ev).await;
    let mut first = None;
    for _ in 0..3 {
        let hb = text(&mut ev).await;
        let first = *first.get_or_insert_with(tokio::time::Instant::now);
        let expected = format!(
            r#"{{"time":{},"self_id":3889001234,"post_type":"meta_event","meta_event_type":"heartbeat","status":{{"online":true,"good":true}},"interval":100}}"#,
            time_of(&hb)
        );
        assert_eq!(hb, expected);
        // One timer per server: the phase is the server's, the period the configured one.
        let since_first = first.elapsed();
        assert!(since_first < Duration::from_secs(2), "{since_first:?}");
    }
    let since_first = first.expect("heartbeats").elapsed();
    assert!(since_first >= Duration::from_millis(190), "{since_first:?}");

    sim.set_online(false);
    // At most one heartbeat may have been built before the change.
    let mut hb = text(&mut ev).await;
    if hb.contains(r#""online":true"#) {
        hb = text(&mut ev).await;
    }
    assert!(
        hb.contains(r#""status":{"online":false,"good":true}"#),
        "{hb}"
    );
    let status = call(&mut api, r#"{"action":"get_status","echo":1}"#).await;
    assert!(
        status.contains(r#""data":{"online":false,"good":true,"stat":{}}"#),
        "{status}"
    );

    sim.set_heartbeat_interval(None);
    // Drain a heartbeat that may already be in flight, then nothing.
    let _ = recv(&mut ev, Duration::from_millis(50)).await;
    silent(&mut ev).await;
    assert_eq!(sim.heartbeat_now(), 1);
    let hb = text(&mut ev).await;
    assert!(hb.ends_with(r#""interval":30000}"#), "{hb}");

    sim.set_heartbeat_interval(Some(Duration::from_millis(50)));
    let hb = text(&mut ev).await;
    assert!(hb.ends_with(r#""interval":50}"#), "{hb}");
    // The API client never got any of it.
    silent(&mut api).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn emitted_messages_reach_event_clients_only() {
    let sim = start(quiet_cfg()).await;
    let mut a = connect(&sim, "/").await;
    let mut b = connect(&sim, "/event").await;
    let mut api = connect(&sim, "/api").await;
    expect_connect(&sim, &mut a).await;
    expect_connect(&sim, &mut b).await;
    assert_eq!(sim.emit_message(5), 2);
    let expected = sim.message_event(5);
    assert_eq!(text(&mut a).await, expected);
    assert_eq!(text(&mut b).await, expected);
    let v: Value = serde_json::from_str(&expected).unwrap();
    assert_eq!(v["message_id"], 5);
    assert_eq!(v["real_id"], 5);
    assert_eq!(v["message_seq"], 5);
    assert_eq!(v["self_id"], 3889001234u64);
    assert_eq!(sim.emit(r#"{"post_type":"notice"}"#), 2);
    assert_eq!(text(&mut a).await, r#"{"post_type":"notice"}"#);
    silent(&mut api).await;

    // A client that goes away is simply no longer counted.
    drop(b);
    let deadline = tokio::time::Instant::now() + WAIT;
    while sim.open_connections() != 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connection not closed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sim.emit_message(6), 1);
    assert!(lifeguard::sim::sample_frames().count() >= 10);
    sim.shutdown().await;
}

#[tokio::test]
async fn disable_3110_orphans_open_sockets() {
    let sim =
        start(SimConfig::default().with_heartbeat_interval(Some(Duration::from_millis(100)))).await;
    let mut old = connect(&sim, "/").await;
    expect_connect(&sim, &mut old).await;
    sim.disable_3110();
    assert!(refused(&sim).await, "new connects are refused");

    // Drain a heartbeat that may have been sent just before.
    let _ = recv(&mut old, Duration::from_millis(50)).await;
    assert_eq!(sim.emit_message(1), 0);
    assert_eq!(sim.heartbeat_now(), 0);
    silent(&mut old).await;

    // Still answers pings and API calls.
    old.send(Message::Ping(b"alive".to_vec().into()))
        .await
        .unwrap();
    match recv(&mut old, WAIT).await {
        Recv::Msg(Message::Pong(p)) => assert_eq!(&p[..], b"alive"),
        other => panic!("expected a pong, got {other:?}"),
    }
    let reply = call(&mut old, r#"{"action":"get_login_info","echo":"9"}"#).await;
    assert!(reply.contains(r#""retcode":0"#) && reply.contains(r#""echo":"9""#));

    sim.enable().await.expect("re-enable on the same port");
    let mut new = connect(&sim, "/").await;
    expect_connect(&sim, &mut new).await;
    assert_eq!(sim.emit_message(2), 1);
    assert_eq!(text(&mut new).await, sim.message_event(2));
    // The new server's heartbeats reach the new socket only.
    let hb = text(&mut new).await;
    assert!(hb.contains(r#""meta_event_type":"heartbeat""#));
    silent(&mut old).await;
    assert_eq!(sim.open_connections(), 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn disable_v4_closes_without_a_code() {
    let sim = start(quiet_cfg()).await;
    let mut ev = connect(&sim, "/").await;
    let mut api = connect(&sim, "/api").await;
    expect_connect(&sim, &mut ev).await;
    sim.disable_v4();
    assert!(refused(&sim).await);
    for c in [&mut ev, &mut api] {
        match recv(c, WAIT).await {
            Recv::Msg(Message::Close(frame)) => assert!(frame.is_none(), "no code: {frame:?}"),
            other => panic!("expected Close without a code, got {other:?}"),
        }
        assert!(matches!(recv(c, WAIT).await, Recv::End));
    }
    sim.enable().await.unwrap();
    let mut again = connect(&sim, "/event").await;
    expect_connect(&sim, &mut again).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn kill_drops_sockets_without_close() {
    let sim = start(quiet_cfg()).await;
    let mut ev = connect(&sim, "/").await;
    expect_connect(&sim, &mut ev).await;
    sim.disable_3110();
    sim.enable().await.unwrap();
    let mut fresh = connect(&sim, "/api").await;
    sim.kill();
    assert!(refused(&sim).await);
    // Orphans and current sockets alike.
    for c in [&mut ev, &mut fresh] {
        match recv(c, WAIT).await {
            Recv::End | Recv::Error(_) => {}
            other => panic!("expected the stream to end without Close, got {other:?}"),
        }
    }
    // A restart listens again.
    sim.enable().await.unwrap();
    let mut c = connect(&sim, "/").await;
    expect_connect(&sim, &mut c).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn hang_stops_handshakes_and_traffic() {
    let sim = start(quiet_cfg()).await;
    let mut c = connect(&sim, "/").await;
    expect_connect(&sim, &mut c).await;
    sim.hang();
    // TCP connects succeed, the WebSocket handshake does not.
    let tcp = timeout(WAIT, TcpStream::connect(sim.addr())).await;
    assert!(matches!(tcp, Ok(Ok(_))));
    let pending = sim.url();
    let handshake = tokio::spawn(async move { tokio_tungstenite::connect_async(pending).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !handshake.is_finished(),
        "handshake must not complete while hung"
    );
    // No pong, no reply, no events.
    c.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
    c.send(Message::text(r#"{"action":"get_status","echo":1}"#))
        .await
        .unwrap();
    assert_eq!(sim.emit_message(1), 0);
    assert!(matches!(
        recv(&mut c, Duration::from_millis(500)).await,
        Recv::Timeout
    ));
    let handshakes = sim.handshakes();
    sim.unhang();
    // Everything resumes: the pong and the reply arrive, the handshake completes.
    match recv(&mut c, WAIT).await {
        Recv::Msg(Message::Pong(p)) => assert_eq!(&p[..], b"p"),
        other => panic!("expected the delayed pong, got {other:?}"),
    }
    assert!(text(&mut c).await.contains(r#""echo":1,"#));
    let (mut late, _) = timeout(WAIT, handshake)
        .await
        .expect("handshake in time")
        .expect("task")
        .expect("handshake ok");
    expect_connect(&sim, &mut late).await;
    assert_eq!(sim.handshakes(), handshakes + 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn token_auth_like_napcat() {
    let sim = start(quiet_cfg().with_token("s3cret")).await;
    let auth_failed = r#"{"status":"failed","retcode":1403,"data":null,"message":"token验证失败","wording":"token验证失败","echo":null}"#;
    for mut c in [
        connect_with_auth(&sim, "/", "Bearer wrong").await,
        connect(&sim, "/api").await,
        connect(&sim, "/?access_token=nope").await,
    ] {
        assert_eq!(text(&mut c).await, auth_failed);
        match recv(&mut c, WAIT).await {
            Recv::Msg(Message::Close(frame)) => assert!(frame.is_none(), "{frame:?}"),
            other => panic!("expected Close without a code, got {other:?}"),
        }
    }
    let mut bearer = connect_with_auth(&sim, "/", "Bearer s3cret").await;
    expect_connect(&sim, &mut bearer).await;
    let mut query = connect(&sim, "/event?foo=1&access_token=s3cret").await;
    expect_connect(&sim, &mut query).await;
    let mut api = connect_with_auth(&sim, "/api", "Bearer s3cret").await;
    let reply = call(&mut api, r#"{"action":"get_login_info","echo":"1"}"#).await;
    assert!(reply.contains(r#""retcode":0"#));
    // The upgrade itself never fails: all six handshakes completed.
    assert_eq!(sim.handshakes(), 6);
    sim.shutdown().await;
}

#[tokio::test]
async fn blast_delivers_every_event_in_order() {
    let sim = start(quiet_cfg()).await;
    let mut a = connect(&sim, "/").await;
    let mut b = connect(&sim, "/event").await;
    let _api = connect(&sim, "/api").await;
    expect_connect(&sim, &mut a).await;
    expect_connect(&sim, &mut b).await;
    const N: u64 = 2000;
    let reader = |mut c: Client, sim: NapSim, first: u64| async move {
        for seq in first..first + N {
            assert_eq!(text(&mut c).await, sim.message_event(seq));
        }
        c
    };
    let ra = tokio::spawn(reader(a, sim.clone(), 1));
    let rb = tokio::spawn(reader(b, sim.clone(), 1));
    assert_eq!(timeout(WAIT, sim.blast(N)).await.expect("blast in time"), 2);
    let a = timeout(WAIT, ra).await.unwrap().unwrap();
    let _b = timeout(WAIT, rb).await.unwrap().unwrap();
    // The next blast continues the numbering.
    let ra = tokio::spawn(reader(a, sim.clone(), N + 1));
    assert_eq!(timeout(WAIT, sim.blast(N)).await.expect("blast in time"), 2);
    timeout(WAIT, ra).await.unwrap().unwrap();
    sim.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_everything() {
    let sim =
        start(SimConfig::default().with_heartbeat_interval(Some(Duration::from_millis(20)))).await;
    let mut c = connect(&sim, "/").await;
    expect_connect(&sim, &mut c).await;
    // A client that never reads must not hold shutdown up.
    let _stuck = connect(&sim, "/").await;
    for seq in 0..2000 {
        sim.emit_message(seq);
    }
    timeout(WAIT, sim.shutdown())
        .await
        .expect("shutdown in time");
    assert!(refused(&sim).await);
    assert!(sim.enable().await.is_err());
    loop {
        match recv(&mut c, WAIT).await {
            Recv::Msg(Message::Text(_)) => continue,
            Recv::End | Recv::Error(_) => break,
            other => panic!("expected the stream to end, got {other:?}"),
        }
    }
    assert_eq!(sim.open_connections(), 0);
}

/// Throughput check, not run by default:
/// `cargo test --release --test sim -- --ignored --nocapture blast_throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn blast_throughput() {
    let sim = start(quiet_cfg()).await;
    let mut c = connect(&sim, "/").await;
    expect_connect(&sim, &mut c).await;
    const N: u64 = 200_000;
    let reader = tokio::spawn(async move {
        let mut bytes = 0usize;
        for _ in 0..N {
            bytes += text(&mut c).await.len();
        }
        bytes
    });
    let started = std::time::Instant::now();
    assert_eq!(sim.blast(N).await, 1);
    let written = started.elapsed();
    let bytes = reader.await.unwrap();
    let read = started.elapsed();
    println!(
        "blast {N} events ({bytes} bytes): written in {written:?}, read in {read:?} ({:.0} events/s)",
        N as f64 / read.as_secs_f64()
    );
    let mut api = connect(&sim, "/api").await;
    let started = std::time::Instant::now();
    for i in 0..20_000u32 {
        call(
            &mut api,
            &format!(r#"{{"action":"get_status","echo":{i}}}"#),
        )
        .await;
    }
    println!("20000 sequential API calls in {:?}", started.elapsed());
    sim.shutdown().await;
}
