//! The core proxy, end to end: real simulator, real proxy, real WebSocket clients.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use lifeguard::sim::SimConfig;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn quiet() -> SimConfig {
    SimConfig::default().with_heartbeat_interval(None)
}

#[tokio::test]
async fn connect_event_comes_first_and_api_path_gets_no_events() {
    let h = Harness::start(quiet()).await;
    let mut uni = h.connect("/").await;
    let mut ev = h.connect("/event/?foo=bar").await;
    let mut api = h.connect("/api").await;
    for ws in [&mut uni, &mut ev] {
        let first = next_text(ws).await;
        assert_eq!(
            first.split("\"self_id\"").nth(1).map(|r| r.starts_with(":3889001234,\"post_type\":\"meta_event\",\"meta_event_type\":\"lifecycle\",\"sub_type\":\"connect\"}")),
            Some(true),
            "{first}"
        );
    }
    assert_eq!(
        h.sim.emit_message(1),
        2,
        "both event sessions have their own backend socket"
    );
    let expected = h.sim.message_event(1);
    assert_eq!(next_text(&mut uni).await, expected);
    assert_eq!(next_text(&mut ev).await, expected);
    // The /api session gets nothing but its replies.
    send_text(
        &mut api,
        r#"{"action":"get_login_info","params":{},"echo":"1"}"#,
    )
    .await;
    let reply = next_text(&mut api).await;
    assert!(
        reply.contains("\"echo\":\"1\"") && reply.contains("\"retcode\":0"),
        "{reply}"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), api.next())
            .await
            .is_err(),
        "no event on /api"
    );
    h.stop().await;
}

#[tokio::test]
async fn echo_values_come_back_byte_for_byte() {
    let h = Harness::start(quiet()).await;
    let mut ws = h.connect_events("/").await;
    for echo in [
        r#""12345""#,
        "42",
        r#"{"seq":7}"#,
        r#"{"seq": 7, "k":[1,2.50,"x"]}"#,
        "-0.0",
        r#""""#,
    ] {
        send_text(
            &mut ws,
            &format!(r#"{{"action":"get_status","params":{{}},"echo":{echo}}}"#),
        )
        .await;
        let reply = next_non_heartbeat(&mut ws).await;
        assert!(
            reply.contains(&format!("\"echo\":{echo}")),
            "echo {echo} came back as: {reply}"
        );
    }
    // A binary frame and a ping are relayed too (the backend answers the ping).
    ws.send(Message::Ping(b"hi".to_vec().into())).await.unwrap();
    let pong = tokio::time::timeout(SOON, async {
        loop {
            if let Some(Ok(Message::Pong(p))) = ws.next().await {
                return p;
            }
        }
    })
    .await
    .expect("pong relayed");
    assert_eq!(&pong[..], b"hi");
    h.stop().await;
}

#[tokio::test]
async fn napcat_3110_disable_is_detected_and_swept() {
    // NapCat 3.1.10: listener gone, old sockets alive (pings and API answered), no events.
    let h = Harness::start(quiet()).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(h.connect_events("/").await);
    }
    let t0 = Instant::now();
    h.sim.disable_3110();
    let (interval, fall) = (Duration::from_millis(100), 2u32);
    for ws in clients.iter_mut() {
        let end = read_to_end(ws, SOON).await;
        assert!(end.got_disable(), "disable event last: {:?}", end.texts);
        assert_eq!(end.code(), Some(1013), "{end:?}");
        let reason = &end.close.as_ref().unwrap().1;
        assert!(
            reason.contains("unhealthy"),
            "reason names the cause: {reason}"
        );
        let latency = end.at - t0;
        assert!(
            latency <= interval * fall + Duration::from_secs(1),
            "swept after {latency:?}"
        );
    }
    println!(
        "3.1.10 disable: last Close {:?} after the listener went away",
        t0.elapsed()
    );
    // While down, handshakes are refused with 503 and a Retry-After.
    let (status, headers, body) = h.refused("/").await;
    assert_eq!(status, 503);
    assert!(headers.get("retry-after").is_some());
    assert!(body.contains("\"cause\":\"unhealthy\""), "{body}");
    // Back: fresh connections get a working event stream again.
    h.sim.enable().await.unwrap();
    h.wait_ready(true).await;
    let mut ws = h.connect_events("/").await;
    h.sim.emit_message(9);
    assert_eq!(next_text(&mut ws).await, h.sim.message_event(9));
    h.stop().await;
}

#[tokio::test]
async fn napcat_v4_disable_closes_with_code_and_disable() {
    let h = Harness::start(quiet()).await;
    let mut ws = h.connect_events("/event").await;
    let mut api = h.connect("/api").await;
    h.sim.disable_v4();
    let end = read_to_end(&mut ws, SOON).await;
    assert!(end.got_disable(), "{end:?}");
    assert!(end.code() == Some(1013), "{end:?}");
    // The /api session gets a Close with a code too, but no lifecycle event.
    let end = read_to_end(&mut api, SOON).await;
    assert!(end.texts.is_empty(), "{end:?}");
    assert!(end.code() == Some(1013), "{end:?}");
    h.stop().await;
}

#[tokio::test]
async fn killed_backend_gets_disable_and_close() {
    let h = Harness::start(quiet()).await;
    let mut ws = h.connect_events("/").await;
    h.sim.emit_message(1);
    assert_eq!(next_text(&mut ws).await, h.sim.message_event(1));
    h.sim.kill();
    let end = read_to_end(&mut ws, SOON).await;
    assert_eq!(end.texts.len(), 1, "only the disable event: {end:?}");
    assert!(end.got_disable(), "{end:?}");
    // 1013, not 1014: tungstenite clients reject 1014 as reserved (see ws::code::BACKEND_GONE).
    assert_eq!(end.code(), Some(1013), "{end:?}");
    assert!(end.close.as_ref().unwrap().1.contains("backend"), "{end:?}");
    h.wait_ready(false).await;
    let (status, _, _) = h.refused("/").await;
    assert!(status == 503 || status == 502, "{status}");
    h.stop().await;
}

#[tokio::test]
async fn hung_backend_is_detected() {
    let h = Harness::start(quiet()).await;
    let mut ws = h.connect_events("/").await;
    let t0 = Instant::now();
    h.sim.hang();
    let end = read_to_end(&mut ws, SOON).await;
    assert!(end.got_disable(), "{end:?}");
    assert_eq!(end.code(), Some(1013), "{end:?}");
    assert!(end.at - t0 < Duration::from_secs(3), "{:?}", end.at - t0);
    h.stop().await;
}

#[tokio::test]
async fn missing_heartbeats_end_a_session() {
    // The backend announces 100ms heartbeats, then goes silent on this socket only
    // while the listener (and so the probe) stays fine: the watchdog must catch it.
    let h = Harness::start_with(
        SimConfig::default().with_heartbeat_interval(Some(Duration::from_millis(100))),
        |a| {
            a.heartbeat_grace = Some(3.0);
        },
    )
    .await;
    let mut ws = h.connect_events("/").await;
    next_text(&mut ws).await; // a heartbeat arms the watchdog
    h.sim.set_heartbeat_interval(None);
    let t0 = Instant::now();
    let end = read_to_end(&mut ws, SOON).await;
    assert!(end.got_disable(), "{end:?}");
    assert_eq!(end.code(), Some(1013), "{end:?}");
    let reason = &end.close.as_ref().unwrap().1;
    assert!(reason.contains("heartbeat"), "{reason}");
    assert!(
        end.at - t0 >= Duration::from_millis(150),
        "not before the grace: {:?}",
        end.at - t0
    );
    h.stop().await;
}

#[tokio::test]
async fn admin_disable_and_enable() {
    let h = Harness::start(quiet()).await;
    let mut ws = h.connect_events("/").await;
    let mut api = h.connect("/api").await;
    let (status, body) = h.admin("POST", "/disable").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"cause\":\"admin\""), "{body}");
    let end = read_to_end(&mut ws, SOON).await;
    assert!(end.got_disable(), "{end:?}");
    assert_eq!(end.code(), Some(1012));
    let end = read_to_end(&mut api, SOON).await;
    assert!(end.texts.is_empty(), "no lifecycle event on /api: {end:?}");
    assert_eq!(end.code(), Some(1012));
    assert_eq!(h.admin("GET", "/ready").await.0, 503);
    let (status, headers, body) = h.refused("/").await;
    assert_eq!(status, 503);
    assert!(headers.get("retry-after").is_some());
    assert!(body.contains("admin"), "{body}");
    let (status, state) = h.admin("GET", "/state").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(
        (v["state"].as_str(), v["cause"].as_str()),
        (Some("down"), Some("admin"))
    );
    assert_eq!(v["sessions"]["total"], 0);
    // What the backend told about itself, learned from its connect event.
    assert_eq!(v["backend"]["self_id"], h.sim.self_id());

    assert_eq!(h.admin("POST", "/enable").await.0, 200);
    h.wait_ready(true).await;
    assert_eq!(h.admin("GET", "/ready").await.0, 200);
    assert_eq!(h.admin("GET", "/live").await.0, 200);
    let mut ws = h.connect_events("/").await;
    h.sim.emit_message(5);
    assert_eq!(next_text(&mut ws).await, h.sim.message_event(5));
    h.stop().await;
}

#[tokio::test]
async fn ordering_nothing_lost_and_disable_is_last() {
    let h = Harness::start(quiet()).await;
    let mut ws = h.connect_events("/").await;
    let n = 3000u64;
    assert_eq!(h.sim.blast(n).await, 1);
    let (status, _) = h.admin("POST", "/disable").await;
    assert_eq!(status, 200);
    let end = read_to_end(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(end.code(), Some(1012));
    assert_eq!(end.texts.len() as u64, n + 1, "every event, then disable");
    let mut last = 0u64;
    for t in &end.texts[..n as usize] {
        let v: serde_json::Value = serde_json::from_str(t).unwrap();
        let id = v["message_id"].as_u64().unwrap();
        assert!(id > last, "in order, no duplicates: {id} after {last}");
        last = id;
    }
    assert!(end.got_disable());
    h.stop().await;
}

#[tokio::test]
async fn planned_disable_waits_for_replies_in_flight() {
    let h = Harness::start(quiet()).await;
    let mut ws = h.connect_events("/").await;
    // A request and the disable race; the reply must still arrive before the Close.
    send_text(
        &mut ws,
        r#"{"action":"send_msg","params":{"message":"x"},"echo":"race"}"#,
    )
    .await;
    let _ = h.admin("POST", "/disable").await;
    let end = read_to_end(&mut ws, SOON).await;
    assert!(
        end.texts.iter().any(|t| t.contains("\"echo\":\"race\"")),
        "{end:?}"
    );
    assert!(end.got_disable());
    assert_eq!(end.code(), Some(1012));
    h.stop().await;
}

#[tokio::test]
async fn auth_is_checked_before_the_upgrade() {
    let h = Harness::start_with(quiet().with_token("upstream-secret"), |a| {
        a.access_token = Some("client-secret".into());
        a.upstream_token = Some("upstream-secret".into());
    })
    .await;
    let (status, headers, _) = h.refused("/").await;
    assert_eq!(status, 401);
    assert!(headers.get("www-authenticate").is_some());
    let mut req = h.url("/").into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", "Bearer nope".parse().unwrap());
    assert_eq!(refused_req(req).await.0, 403);
    assert_eq!(refused_req(h.url("/?access_token=nope")).await.0, 403);

    for scheme in ["Bearer", "Token"] {
        let mut req = h.url("/").into_client_request().unwrap();
        req.headers_mut().insert(
            "Authorization",
            format!("{scheme} client-secret").parse().unwrap(),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("accepted");
        // The backend accepted lifeguard's own token: its first frame is connect, not 1403.
        assert!(next_text(&mut ws).await.contains("connect"));
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(h.url("/?access_token=client-secret"))
        .await
        .unwrap();
    assert!(next_text(&mut ws).await.contains("connect"));
    h.stop().await;
}

#[tokio::test]
async fn backend_refusing_gives_an_http_error_not_a_closed_socket() {
    let h = Harness::start_with(quiet(), |a| {
        a.probe_interval = Some(Duration::from_secs(30)); // the probe won't notice first
    })
    .await;
    h.sim.kill();
    let (status, _, body) = h.refused("/").await;
    assert!(status == 502 || status == 503, "{status} {body}");
    h.stop().await;
}

#[tokio::test]
async fn bad_clients_get_clear_errors_and_hurt_nobody() {
    let h = Harness::start(quiet()).await;
    let mut good = h.connect_events("/").await;

    // Not a WebSocket handshake at all.
    let (status, body) = http(h.addr, "GET", "/").await;
    assert_eq!(status, 426, "{body}");
    // Garbage instead of HTTP.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        s.write_all(b"\x16\x03\x01garbage\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(SOON, s.read_to_end(&mut buf))
            .await
            .expect("closed in time");
        assert!(
            buf.starts_with(b"HTTP/1.1 400") || buf.is_empty(),
            "{}",
            String::from_utf8_lossy(&buf)
        );
    }
    // Invalid UTF-8 in a text frame: 1007.
    {
        use tokio::io::AsyncWriteExt;
        let mut raw = raw_ws(h.addr, "/api").await;
        let mask = [1u8, 2, 3, 4];
        let payload = [0xFFu8, 0xFE, 0x41];
        let mut frame = vec![0x81, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        raw.write_all(&frame).await.unwrap();
        assert_eq!(read_close_code(&mut raw).await, Some(1007));
    }
    // Oversized message: 1009.
    let h2 = Harness::start_with(quiet(), |a| a.max_message_size = Some(4096)).await;
    let mut big = h2.connect("/api").await;
    let _ = big.send(Message::text("x".repeat(10_000))).await;
    let end = read_to_end(&mut big, SOON).await;
    assert_eq!(end.code(), Some(1009));
    h2.stop().await;
    // A client that never reads does not stall anyone else.
    let _lazy = h.connect("/").await;
    h.sim.blast(20_000).await;
    for _ in 0..5 {
        h.sim.emit_message(7);
    }
    let mut seen = 0;
    while seen < 5 {
        if next_text(&mut good).await.contains("\"message_id\":7,") {
            seen += 1;
        }
    }
    h.stop().await;
}

/// A raw TCP WebSocket client (to send what tungstenite refuses to).
async fn raw_ws(addr: std::net::SocketAddr, path: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        got.push(b[0]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    s
}

/// Read raw frames until a Close; its code.
async fn read_close_code(s: &mut tokio::net::TcpStream) -> Option<u16> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(SOON, async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let mut i = 0;
    while i + 2 <= buf.len() {
        let op = buf[i] & 0x0F;
        let len = (buf[i + 1] & 0x7F) as usize;
        let (len, hl) = match len {
            126 => (u16::from_be_bytes([buf[i + 2], buf[i + 3]]) as usize, 4),
            127 => return None,
            l => (l, 2),
        };
        if op == 0x8 && len >= 2 {
            return Some(u16::from_be_bytes([buf[i + hl], buf[i + hl + 1]]));
        }
        i += hl + len;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mass_disable_reaches_every_session() {
    // 150 sessions (4 fds each in this one process stay under the default soft limit).
    let h = Harness::start(quiet()).await;
    let mut clients = Vec::new();
    for i in 0..150 {
        clients.push(
            h.connect_events(if i % 2 == 0 { "/" } else { "/event" })
                .await,
        );
    }
    let t0 = Instant::now();
    assert_eq!(h.admin("POST", "/disable").await.0, 200);
    let ends = futures_util::future::join_all(
        clients
            .iter_mut()
            .map(|ws| read_to_end(ws, Duration::from_secs(10))),
    )
    .await;
    for end in &ends {
        assert!(end.got_disable(), "{end:?}");
        assert_eq!(end.code(), Some(1012), "{end:?}");
    }
    let last = ends.iter().map(|e| e.at - t0).max().unwrap();
    println!("150 sessions: last Close {last:?} after POST /disable");
    assert!(last < Duration::from_secs(3), "{last:?}");
    // Every session is gone from the books.
    let deadline = Instant::now() + SOON;
    while h.proxy().state.sessions.total() != 0 {
        assert!(Instant::now() < deadline, "sessions still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_vanish_leave_nothing_behind() {
    let h = Harness::start(quiet()).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(h.connect_events("/").await);
    }
    assert_eq!(h.sim.open_connections(), 20);
    // Events in flight while every client disappears without a Close frame.
    let blast = {
        let sim = h.sim.clone();
        tokio::spawn(async move { sim.blast(20_000).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(clients);
    let deadline = Instant::now() + SOON;
    while h.proxy().state.sessions.total() != 0 || h.sim.open_connections() != 0 {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?} sessions, {} backend sockets",
            h.proxy().state.sessions.total(),
            h.sim.open_connections()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tokio::time::timeout(SOON, blast).await;
    // The proxy is still fine for the next client.
    let mut ws = h.connect_events("/").await;
    h.sim.emit_message(1);
    assert!(next_non_heartbeat(&mut ws)
        .await
        .contains("\"message_id\":1,"));
    h.stop().await;
}
