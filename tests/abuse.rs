//! What a hostile or broken peer sends, answered as RFC 6455 says: lengths that wrap,
//! close codes nobody may send, sloppy handshakes, a backend that dies inside a frame.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use lifeguard::app::Proxy;
use lifeguard::config::Settings;
use lifeguard::proto::ws;
use lifeguard::sim::SimConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn quiet() -> SimConfig {
    SimConfig::default().with_heartbeat_interval(None)
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Send `head` (a request without its final blank line) and read the status code.
async fn status_of(addr: SocketAddr, head: &str) -> u16 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("{head}\r\n").as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n") {
        match tokio::time::timeout(SOON, s.read(&mut b)).await {
            Ok(Ok(1)) => got.push(b[0]),
            other => panic!("no status line: {other:?} {got:?}"),
        }
    }
    let line = String::from_utf8_lossy(&got);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line}"))
}

fn upgrade(version: &str, extra: &str) -> String {
    format!(
        "GET /api {version}\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{extra}"
    )
}

#[tokio::test]
async fn sloppy_handshakes_get_400() {
    let h = Harness::start(quiet()).await;
    let ok = upgrade("HTTP/1.1", &format!("Sec-WebSocket-Key: {KEY}\r\n"));
    assert_eq!(status_of(h.addr, &ok).await, 101);
    let cases = [
        // 15 bytes, then 24 characters that are not base64, then 16 bytes non-canonically.
        upgrade("HTTP/1.1", "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA\r\n"),
        upgrade(
            "HTTP/1.1",
            "Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==\r\n",
        ),
        upgrade(
            "HTTP/1.1",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZR==\r\n",
        ),
        upgrade("HTTP/1.1", "Sec-WebSocket-Key: \r\n"),
        upgrade("HTTP/1.1", ""),
        // HTTP/1.0 has no upgrade.
        upgrade("HTTP/1.0", &format!("Sec-WebSocket-Key: {KEY}\r\n")),
        // Two keys: which one would the accept answer?
        upgrade(
            "HTTP/1.1",
            &format!("Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Key: {KEY}\r\n"),
        ),
    ];
    for case in &cases {
        assert_eq!(status_of(h.addr, case).await, 400, "{case}");
    }
    // None of them reached the backend; the proxy is fine.
    let mut good = h.connect_events("/").await;
    api_roundtrip(&mut good, "still").await;
    h.stop().await;
}

/// A raw masked client frame.
fn client_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = ws::encode_frame(first_byte & 0x0F, payload, Some([7, 1, 7, 1]));
    f[0] = first_byte;
    f
}

/// A raw client on `path` (101 checked).
async fn raw_client(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        got.push(b[0]);
    }
    assert!(got.starts_with(b"HTTP/1.1 101"));
    s
}

/// Every frame a raw client reads until the server hangs up: (opcode, payload).
async fn frames_until_eof(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(SOON, s.read_to_end(&mut buf)).await;
    let mut out = Vec::new();
    let mut i = 0;
    while i + 2 <= buf.len() {
        let op = buf[i] & 0x0F;
        let (len, hl) = match buf[i + 1] & 0x7F {
            126 => (u16::from_be_bytes([buf[i + 2], buf[i + 3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(buf[i + 2..i + 10].try_into().unwrap()) as usize,
                10,
            ),
            l => (l as usize, 2),
        };
        let end = (i + hl + len).min(buf.len());
        out.push((op, buf[i + hl..end].to_vec()));
        i += hl + len;
    }
    out
}

fn close_of(frames: &[(u8, Vec<u8>)]) -> Option<(u16, String)> {
    frames.iter().find(|(op, _)| *op == 0x8).map(|(_, p)| {
        (
            u16::from_be_bytes([p[0], p[1]]),
            String::from_utf8_lossy(&p[2..]).into_owned(),
        )
    })
}

#[tokio::test]
async fn a_length_that_wraps_the_size_check_is_a_protocol_error() {
    let h = Harness::start_with(quiet(), |a| a.max_message_size = Some(4096)).await;
    let mut s = raw_client(h.addr, "/api").await;
    // One byte of an unfinished text message, then a continuation claiming 2^64-1 bytes
    // and a smuggled request behind it.
    let mut attack = client_frame(0x01, b"{");
    let mut cont = vec![0x80, 0x80 | 127];
    cont.extend_from_slice(&u64::MAX.to_be_bytes());
    cont.extend_from_slice(&[0, 0, 0, 0]);
    attack.extend(cont);
    attack.extend(client_frame(
        0x81,
        br#"{"action":"get_status","echo":"smuggled"}"#,
    ));
    s.write_all(&attack).await.unwrap();
    let frames = frames_until_eof(&mut s).await;
    let (code, reason) = close_of(&frames).expect("a Close frame");
    assert_eq!(code, 1002, "{reason}");
    assert!(
        !frames
            .iter()
            .any(|(_, p)| String::from_utf8_lossy(p).contains("smuggled")),
        "the smuggled request was answered: {frames:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn close_codes_nobody_may_send_are_answered_with_1002() {
    let h = Harness::start(quiet()).await;
    for bad in [999u16, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
        let mut s = raw_client(h.addr, "/api").await;
        let mut payload = bad.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        s.write_all(&client_frame(0x88, &payload)).await.unwrap();
        let frames = frames_until_eof(&mut s).await;
        let (code, reason) = close_of(&frames).unwrap_or_else(|| panic!("{bad}: no Close"));
        assert_eq!(code, 1002, "{bad}: {reason}");
        // lifeguard's own answer, not the backend's reaction to a relayed code.
        assert!(reason.contains("close code"), "{bad}: {reason}");
    }
    // Allowed codes still reach the backend and its reply comes back.
    let mut s = raw_client(h.addr, "/api").await;
    let mut payload = 4000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"app says bye");
    s.write_all(&client_frame(0x88, &payload)).await.unwrap();
    let frames = frames_until_eof(&mut s).await;
    assert_eq!(close_of(&frames).map(|c| c.0), Some(4000), "{frames:?}");
    h.stop().await;
}

/// A scripted backend: `/api` (the probes) gets a 101 and nothing else; every other path
/// gets a 101 and then `script` on that socket.
async fn scripted_backend<F, Fut>(script: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let script = std::sync::Arc::new(script);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let script = script.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut b = [0u8; 1];
                while !req.ends_with(b"\r\n\r\n") {
                    if s.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    req.push(b[0]);
                }
                let text = String::from_utf8_lossy(&req).into_owned();
                let key = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                let resp = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    ws::accept_key(key.as_bytes())
                );
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
                if text.starts_with("GET /api") {
                    let mut sink = [0u8; 256];
                    while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
                    return;
                }
                script(s).await;
            });
        }
    });
    addr
}

async fn proxy_for(backend: SocketAddr) -> Proxy {
    let args = fast_args(&format!("ws://{backend}"));
    let proxy = Proxy::start(Settings::resolve(&args, None).unwrap())
        .await
        .unwrap();
    let state = proxy.state.clone();
    wait_until(SOON, "the first probe", || {
        state.snapshot().lane(lifeguard::state::Lane::Forward).up
    })
    .await;
    proxy
}

const CONNECT: &str = r#"{"time":1718000000,"self_id":10001000,"post_type":"meta_event","meta_event_type":"lifecycle","sub_type":"connect"}"#;

#[tokio::test]
async fn a_backend_close_code_nobody_may_send_is_not_relayed() {
    let backend = scripted_backend(|mut s| async move {
        let _ = s
            .write_all(&ws::encode_frame(ws::OP_TEXT, CONNECT.as_bytes(), None))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut payload = 1005u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"oops");
        let _ = s
            .write_all(&ws::encode_frame(ws::OP_CLOSE, &payload, None))
            .await;
        let mut sink = [0u8; 256];
        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    let proxy = proxy_for(backend).await;
    let mut ws = connect_url_events(format!("ws://{}/", proxy.addr)).await;
    let end = read_to_end(&mut ws, SOON).await;
    assert!(end.got_disable(), "{end:?}");
    let (code, reason) = end.close.clone().expect("a Close");
    assert_eq!(code, 1013, "{end:?}");
    assert!(reason.contains("protocol"), "{end:?}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_backend_dying_inside_a_frame_gets_a_true_log_line() {
    // The backend announces 100 KB, sends 10 KB of it, and dies.
    let backend = scripted_backend(|mut s| async move {
        let _ = s
            .write_all(&ws::encode_frame(ws::OP_TEXT, CONNECT.as_bytes(), None))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let big = ws::encode_frame(ws::OP_BINARY, &vec![7u8; 100_000], None);
        let _ = s.write_all(&big[..10_000]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    })
    .await;
    let lg = Bin::spawn(&[
        "--upstream",
        &format!("ws://{backend}"),
        "--probe-interval",
        "100ms",
    ]);
    lg.wait_ready(true).await;
    let mut ws = connect_url_events(lg.url("/")).await;
    let end = read_to_end(&mut ws, SOON).await;
    assert_eq!(end.close, None, "no Close can follow half a frame: {end:?}");
    let line = lg.wait_log(SOON, |v| v["message"] == "session closed");
    assert_eq!(line["cause"], "upstream-lost", "{line}");
    assert_eq!(line["close_code"], -1, "{line}");
    assert_eq!(line["close_sent"], false, "{line}");
    assert_eq!(line["disable_sent"], false, "{line}");
    assert!(
        line["note"]
            .as_str()
            .unwrap_or("")
            .contains("inside a frame"),
        "{line}"
    );
}

#[tokio::test]
async fn a_backend_connection_silent_from_the_start_is_ended_by_the_heartbeat_bound() {
    // The first session's backend connection beats every 100 ms; the second one sends its
    // connect event and then nothing, while the backend still answers probes.
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let backend = scripted_backend(move |mut s| {
        let nth = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            let _ = s
                .write_all(&ws::encode_frame(ws::OP_TEXT, CONNECT.as_bytes(), None))
                .await;
            if nth > 0 {
                let mut sink = [0u8; 256];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
            let beat = r#"{"time":1718000000,"self_id":10001000,"post_type":"meta_event","meta_event_type":"heartbeat","status":{"online":true,"good":true},"interval":100}"#;
            for _ in 0..200 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if s
                    .write_all(&ws::encode_frame(ws::OP_TEXT, beat.as_bytes(), None))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    })
    .await;
    let proxy = proxy_for(backend).await;
    let mut beating = connect_url_events(format!("ws://{}/", proxy.addr)).await;
    // A heartbeat went through: lifeguard knows the backend's interval now.
    assert!(next_text(&mut beating).await.contains("heartbeat"));
    let mut silent = connect_url_events(format!("ws://{}/", proxy.addr)).await;
    let t0 = std::time::Instant::now();
    let end = read_to_end(&mut silent, SOON).await;
    assert!(end.got_disable(), "{end:?}");
    assert_eq!(end.code(), Some(1013), "{end:?}");
    assert!(
        end.close.as_ref().unwrap().1.contains("heartbeat"),
        "{end:?}"
    );
    println!("silent backend connection ended after {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // The healthy one is untouched.
    assert!(next_text(&mut beating).await.contains("heartbeat"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_alone() {
    let h = Harness::start_with(quiet(), |a| {
        a.client_stall_timeout = Some(Duration::from_millis(500))
    })
    .await;
    let mut good = h.connect_events("/").await;
    // A client with a small receive buffer that completes its handshake and stops reading.
    let stalled = {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut s = sock.connect(h.addr).await.unwrap();
        let req = format!("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        s
    };
    wait_until(SOON, "two sessions", || {
        h.proxy().state.sessions.total() == 2
    })
    .await;
    // 16 MB of events: far more than the socket buffers hold.
    let big = format!(
        r#"{{"post_type":"notice","notice_type":"bulk","pad":"{}"}}"#,
        "x".repeat(256 * 1024)
    );
    for _ in 0..64 {
        h.sim.emit(big.clone());
    }
    h.sim.emit_message(9);
    let mut got = 0;
    loop {
        let t = next_text(&mut good).await;
        assert!(
            !t.contains("\"sub_type\":\"disable\""),
            "the reader was swept"
        );
        if t.contains("\"notice_type\":\"bulk\"") {
            got += 1;
        } else if t.contains("\"message_id\":9,") {
            break;
        }
    }
    assert_eq!(got, 64, "the reading client got everything at full speed");
    wait_until(
        Duration::from_secs(10),
        "the stalled session to end",
        || h.proxy().state.sessions.total() == 1,
    )
    .await;
    let (_, metrics) = h.admin("GET", "/metrics").await;
    let scrape = parse_metrics(&metrics);
    assert_eq!(
        metric(
            &scrape,
            "lifeguard_sessions_closed_total",
            &[("cause", "client-stalled")]
        ),
        Some(1.0),
        "{metrics}"
    );
    // The backend connection of the stalled client is closed too; the good one relays on.
    wait_until(SOON, "one backend socket", || h.sim.open_connections() == 1).await;
    api_roundtrip(&mut good, "after").await;
    drop(stalled);
    h.stop().await;
}

/// A WebSocket client whose connection comes from `ip` (any 127.x.y.z is this machine).
async fn connect_from(
    ip: &str,
    url: &str,
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, tokio_tungstenite::tungstenite::Error> {
    let addr: SocketAddr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    let stream = sock.connect(addr).await.unwrap();
    tokio::time::timeout(SOON, tokio_tungstenite::client_async(url, stream))
        .await
        .expect("answer in time")
        .map(|(ws, _)| ws)
}

fn refusal_body(e: tokio_tungstenite::tungstenite::Error) -> (u16, String) {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => (
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        e => panic!("expected an HTTP refusal, got {e}"),
    }
}

#[tokio::test]
async fn the_connection_cap_and_the_per_address_share_answer_503() {
    let h = Harness::start_with(quiet(), |a| {
        a.max_connections = Some(3);
        a.max_connections_per_ip = Some(2);
    })
    .await;
    let url = h.url("/");
    let a1 = connect_from("127.0.0.1", &url).await.unwrap();
    let a2 = connect_from("127.0.0.1", &url).await.unwrap();
    let (status, body) = refusal_body(connect_from("127.0.0.1", &url).await.err().unwrap());
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"cause\":\"per-ip-limit\""), "{body}");
    // Another address still gets in, up to the cap.
    let b1 = connect_from("127.0.0.2", &url).await.unwrap();
    let (status, body) = refusal_body(connect_from("127.0.0.3", &url).await.err().unwrap());
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"cause\":\"capacity\""), "{body}");
    let (_, state) = h.admin("GET", "/state").await;
    let v: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(v["connections"]["open"], 3, "{v}");
    assert_eq!(v["connections"]["max"], 3, "{v}");
    // Room again as soon as one leaves.
    drop(a1);
    wait_until(SOON, "a free slot", || h.proxy().state.conns.open() == 2).await;
    let _c1 = connect_from("127.0.0.3", &url).await.unwrap();
    drop((a2, b1));
    h.stop().await;
}

#[tokio::test]
async fn a_connection_that_does_not_finish_its_request_is_closed_at_the_deadline() {
    let h = Harness::start_with(quiet(), |a| {
        a.handshake_timeout = Some(Duration::from_millis(300))
    })
    .await;
    // Silent, and slowloris (a request that never ends).
    let mut silent = TcpStream::connect(h.addr).await.unwrap();
    let mut slow = TcpStream::connect(h.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let t0 = std::time::Instant::now();
    for s in [&mut silent, &mut slow] {
        let mut buf = Vec::new();
        let r = tokio::time::timeout(SOON, s.read_to_end(&mut buf)).await;
        assert!(r.is_ok(), "still open after {:?}", t0.elapsed());
    }
    let took = t0.elapsed();
    println!("unfinished requests closed after {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    wait_until(SOON, "nothing held", || h.proxy().state.conns.open() == 0).await;
    h.stop().await;
}
