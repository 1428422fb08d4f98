//! Account state (QQ logged out), client keepalive, `/metrics` through a Prometheus text
//! parser, and JSON logs from the real binary.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use lifeguard::sim::{NapSim, SimConfig};
use tokio_tungstenite::tungstenite::Message;

fn quiet() -> SimConfig {
    SimConfig::default().with_heartbeat_interval(None)
}

fn fast_heartbeats() -> SimConfig {
    SimConfig::default().with_heartbeat_interval(Some(Duration::from_millis(100)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qq_logout_takes_the_backend_down_and_login_brings_it_back() {
    let h = Harness::start(fast_heartbeats()).await;
    let mut clients = [
        h.connect_events("/").await,
        h.connect_events("/event").await,
    ];
    h.sim.set_online(false);
    for ws in clients.iter_mut() {
        let end = read_to_end(ws, SOON).await;
        assert!(end.got_disable(), "{end:?}");
        assert_eq!(end.code(), Some(1013), "{end:?}");
        assert!(end.close.as_ref().unwrap().1.contains("offline"), "{end:?}");
    }
    let (status, headers, body) = h.refused("/").await;
    assert_eq!(status, 503);
    assert!(headers.get("retry-after").is_some());
    assert!(body.contains("\"cause\":\"offline\""), "{body}");

    // Logged in again. No session is open to see a heartbeat say so: lifeguard asks the
    // backend (get_status) while it is down for this cause.
    h.sim.set_online(true);
    h.wait_ready(true).await;
    let mut ws = h.connect_events("/").await;
    h.sim.emit_message(2);
    assert_eq!(next_non_heartbeat(&mut ws).await, h.sim.message_event(2));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_is_not_down_when_turned_off() {
    let h = Harness::start_with(fast_heartbeats(), |a| a.offline_is_down = Some(false)).await;
    let mut ws = h.connect_events("/").await;
    h.sim.set_online(false);
    // Heartbeats saying offline reach the client; the session and the gate stay.
    let deadline = Instant::now() + SOON;
    loop {
        let t = next_text(&mut ws).await;
        if t.contains("\"online\":false") {
            break;
        }
        assert!(Instant::now() < deadline);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        h.proxy()
            .state
            .snapshot()
            .lane(lifeguard::state::Lane::Forward)
            .up
    );
    api_roundtrip(&mut ws, "still").await;
    let _another = h.connect_events("/event").await;
    h.stop().await;
}

/// Collect heartbeat meta events (and anything else) for `window`.
async fn collect(ws: &mut Ws, window: Duration) -> (Vec<(Instant, String)>, usize) {
    let mut beats = Vec::new();
    let mut others = 0;
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, ws.next()).await {
        if let Message::Text(t) = m {
            if t.contains("\"meta_event_type\":\"heartbeat\"") {
                beats.push((Instant::now(), t.to_string()));
            } else {
                others += 1;
            }
        }
    }
    (beats, others)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_keepalive_fills_silence_only() {
    let h = Harness::start_with(quiet(), |a| {
        a.client_heartbeat = Some(Duration::from_millis(200))
    })
    .await;
    let mut ws = h.connect_events("/").await;
    let mut api = h.connect("/api").await;

    // Idle: a heartbeat roughly every 200 ms, built for this client.
    let (beats, _) = collect(&mut ws, Duration::from_millis(1500)).await;
    assert!(
        (3..=9).contains(&beats.len()),
        "about 7 heartbeats in 1.5 s, got {}",
        beats.len()
    );
    for (_, b) in &beats {
        let v: serde_json::Value = serde_json::from_str(b).unwrap();
        assert_eq!(v["interval"], 200, "{b}");
        assert_eq!(v["post_type"], "meta_event");
        assert_eq!(v["self_id"], h.sim.self_id(), "{b}");
        assert!(v["status"]["online"].is_boolean(), "{b}");
    }
    let gaps: Vec<Duration> = beats.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(150)),
        "never faster than the interval: {gaps:?}"
    );

    // Traffic every 50 ms: no heartbeat is needed, none is sent.
    let emitter = {
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        let sim = h.sim.clone();
        let task = tokio::spawn(async move {
            let mut seq = 100;
            while !s.is_cancelled() {
                sim.emit_message(seq);
                seq += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        (stop, task)
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (beats, others) = collect(&mut ws, Duration::from_millis(1000)).await;
    emitter.0.cancel();
    let _ = emitter.1.await;
    assert!(others >= 10, "events flowed: {others}");
    assert!(
        beats.is_empty(),
        "no heartbeat while traffic flows: {beats:?}"
    );

    // The /api session gets no invented heartbeats (it is not an event stream).
    let (beats, _) = collect(&mut api, Duration::from_millis(500)).await;
    assert!(beats.is_empty(), "{beats:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_what_happened() {
    let h = Harness::start(quiet()).await;
    let mut uni = h.connect_events("/").await;
    let mut ev = h.connect_events("/event").await;
    let mut api = h.connect("/api").await;
    api_roundtrip(&mut api, "m1").await;
    h.sim.emit_message(1);
    next_text(&mut uni).await;
    next_text(&mut ev).await;
    let scrape = parse_metrics(&h.admin("GET", "/metrics").await.1);
    let open = |path: &str| metric(&scrape, "lifeguard_sessions_open", &[("path", path)]);
    assert_eq!(open("universal"), Some(1.0));
    assert_eq!(open("event"), Some(1.0));
    assert_eq!(open("api"), Some(1.0));
    assert_eq!(metric(&scrape, "lifeguard_upstream_up", &[]), Some(1.0));
    assert!(metric(&scrape, "lifeguard_upstream_state_seconds", &[]).unwrap() >= 0.0);
    assert!(metric(&scrape, "lifeguard_handshakes_total", &[("status", "101")]).unwrap() >= 3.0);

    // Down (admin), then a refused handshake, then back.
    assert_eq!(h.admin("POST", "/disable").await.0, 200);
    for ws in [&mut uni, &mut ev, &mut api] {
        assert_eq!(read_to_end(ws, SOON).await.code(), Some(1012));
    }
    assert_eq!(h.refused("/").await.0, 503);
    assert_eq!(h.admin("POST", "/enable").await.0, 200);
    h.wait_ready(true).await;

    let text = h.admin("GET", "/metrics").await.1;
    let s = parse_metrics(&text);
    let m = |name: &str, labels: &[(&str, &str)]| metric(&s, name, labels);
    for path in ["universal", "event", "api"] {
        assert_eq!(m("lifeguard_sessions_open", &[("path", path)]), Some(0.0));
    }
    assert_eq!(
        m(
            "lifeguard_sessions_closed_total",
            &[("cause", "admin"), ("code", "1012")]
        ),
        Some(3.0),
        "{text}"
    );
    assert!(m("lifeguard_handshakes_total", &[("status", "503")]).unwrap() >= 1.0);
    for dir in ["to_client", "to_backend"] {
        let frames = m("lifeguard_frames_relayed_total", &[("direction", dir)]).unwrap();
        let bytes = m("lifeguard_bytes_relayed_total", &[("direction", dir)]).unwrap();
        assert!(
            frames >= 1.0 && bytes > frames,
            "{dir}: {frames} frames, {bytes} bytes"
        );
    }
    assert!(
        m(
            "lifeguard_upstream_transitions_total",
            &[("cause", "admin")]
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        m(
            "lifeguard_upstream_transitions_total",
            &[("cause", "healthy")]
        )
        .unwrap()
            >= 1.0
    );
    let hist: Vec<_> = s
        .samples
        .iter()
        .filter(|x| x.metric.starts_with("lifeguard_probe_duration_seconds"))
        .filter_map(|x| match &x.value {
            prometheus_parse::Value::Histogram(b) => Some(b.clone()),
            _ => None,
        })
        .collect();
    assert!(
        !hist.is_empty(),
        "the probe latency histogram parses as one:\n{text}"
    );
    let buckets = &hist[0];
    assert!(buckets.len() >= 10, "{buckets:?}");
    assert!(buckets.last().unwrap().count >= 1.0, "{buckets:?}");
    assert_eq!(
        m("lifeguard_config_reloads_total", &[("result", "ok")]),
        Some(0.0)
    );
    assert_eq!(
        m("lifeguard_config_reloads_total", &[("result", "failed")]),
        Some(0.0)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_session_ends_and_never_the_token() {
    let sim = NapSim::start(quiet().with_token("backend-s3cret-tok"))
        .await
        .unwrap();
    let url = sim.url();
    let mut lg = Bin::spawn(&[
        "--upstream",
        &url,
        "--access-token",
        "client-s3cret-tok",
        "--upstream-token",
        "backend-s3cret-tok",
        "--probe-interval",
        "100ms",
    ]);
    lg.wait_ready(true).await;
    let mut ws = connect_url_events(lg.url("/event?access_token=client-s3cret-tok")).await;
    api_roundtrip(&mut ws, "x").await;
    sim.emit_message(5);
    let _ = next_non_heartbeat(&mut ws).await;
    assert_eq!(
        refused_req(lg.url("/?access_token=wrong-s3cret-tok"))
            .await
            .0,
        403
    );
    assert_eq!(lg.admin("POST", "/disable").await.0, 200);
    let end = read_to_end(&mut ws, SOON).await;
    assert_eq!(end.code(), Some(1012));
    let closed = lg.wait_log(SOON, |v| v["message"] == "session closed");
    for field in [
        "session",
        "peer",
        "path",
        "cause",
        "close_code",
        "lifetime_ms",
    ] {
        assert!(!closed[field].is_null(), "{field} in {closed}");
    }
    assert_eq!(closed["path"], "/event");
    assert_eq!(closed["cause"], "admin");
    assert_eq!(closed["close_code"], 1012);
    let fields = closed.as_object().unwrap();
    assert!(
        fields.keys().filter(|k| k.contains("frames")).count() >= 2
            && fields.keys().filter(|k| k.contains("bytes")).count() >= 2,
        "frames and bytes each way: {closed}"
    );
    let changed = lg.wait_log(SOON, |v| {
        v["message"] == "upstream state changed" && v["cause"] == "admin"
    });
    assert_eq!(changed["state"], "down");
    assert_eq!(lg.stop(), Some(0));
    // Every line is JSON (logs() panics otherwise), and no secret appears anywhere.
    let n = lg.logs().len();
    assert!(n >= 4, "{n} lines");
    let all = format!(
        "{}\n{}",
        lg.lines.lock().unwrap().join("\n"),
        lg.stdout.lock().unwrap().join("\n")
    );
    assert!(!all.contains("s3cret"), "a token leaked:\n{all}");
    sim.shutdown().await;
}
