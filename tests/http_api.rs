//! The HTTP API proxy on the client port, in front of the simulator's HTTP server, over
//! real sockets: auth before the backend, the backend's answers untouched, immediate
//! OneBot-shaped failures while it is down, the reply grace, limits and timeouts.

mod common;

use std::time::{Duration, Instant};

use common::http::*;
use common::*;
use lifeguard::sim::{HttpServerConfig, SimConfig};
use lifeguard::state::Lane;

/// Proxy with only the HTTP API configured, client token `cl`, backend token `up`.
async fn setup(
    tweak: impl FnOnce(&mut lifeguard::config::RunArgs),
) -> (lifeguard::sim::NapSim, lifeguard::app::Proxy) {
    let sim = http_sim(
        SimConfig::default().with_token("up"),
        HttpServerConfig::default().with_token("up"),
    )
    .await;
    let mut args = http_args();
    args.upstream_http = sim.http_url();
    args.access_token = Some("cl".into());
    args.upstream_token = Some("up".into());
    tweak(&mut args);
    let proxy = start_proxy(args).await;
    wait_lane(&proxy, Lane::HttpApi, true).await;
    (sim, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_calls_go_through_with_lifeguards_token_and_come_back_untouched() {
    let (sim, proxy) = setup(|_| {}).await;
    let a = proxy.addr;
    let r = call(
        a,
        "GET",
        "/get_login_info?access_token=cl&echo=abc",
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.body,
        r#"{"status":"ok","retcode":0,"data":{"user_id":3889001234,"nickname":"lifeguard-bot"},"message":"","wording":"","echo":"abc","stream":"normal-action"}"#
    );
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    let r = call(
        a,
        "POST",
        "/send_msg",
        &[
            ("authorization", "Bearer cl"),
            ("content-type", "application/json"),
        ],
        r#"{"message":"hi","echo":{ "seq" : 1 }}"#,
    )
    .await;
    assert!(r.body.contains(r#""echo":{ "seq" : 1 }"#), "{r:?}");
    // Koishi's form, and a urlencoded body.
    let r = call(
        a,
        "POST",
        "/get_status",
        &[
            ("authorization", "Token cl"),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        "echo=7",
    )
    .await;
    assert_eq!(r.json()["echo"], "7");
    // An unknown action is the backend's business: HTTP 200 with its retcode.
    let r = call(a, "GET", "/no_such_action?access_token=cl", &[], "").await;
    assert_eq!((r.status, r.json()["retcode"].as_i64()), (200, Some(200)));
    // The client's credential never reached the backend: lifeguard's did.
    let seen = sim.http_requests();
    let api_calls: Vec<_> = seen
        .iter()
        .filter(|r| r.action != "get_status" || r.method == "POST")
        .collect();
    assert!(api_calls.len() >= 4, "{seen:#?}");
    for r in &seen {
        assert_eq!(r.authorization.as_deref(), Some("Bearer up"), "{r:?}");
        assert_eq!(r.access_token, None, "{r:?}");
    }
    // The WebSocket port still refuses plain HTTP when no HTTP upstream is set: see
    // proxy.rs; here every non-upgrade request is an API call.
    let scrape = parse_metrics(&http(proxy.admin_addr, "GET", "/metrics").await.1);
    assert!(
        metric(
            &scrape,
            "lifeguard_http_api_requests_total",
            &[("status", "200")]
        )
        .unwrap()
            >= 4.0
    );
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_is_refused_before_anything_reaches_the_backend() {
    let (sim, proxy) = setup(|_| {}).await;
    let before = sim.http_requests_on("send_msg");
    let r = call(proxy.addr, "POST", "/send_msg", &[], r#"{"message":"x"}"#).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(
        (r.json()["status"].as_str(), r.json()["retcode"].as_i64()),
        (Some("failed"), Some(401))
    );
    let r = call(
        proxy.addr,
        "POST",
        "/send_msg?access_token=up",
        &[],
        r#"{"message":"x"}"#,
    )
    .await;
    assert_eq!(
        r.status, 403,
        "the backend's token is not the client's: {r:?}"
    );
    let r = call(
        proxy.addr,
        "POST",
        "/send_msg",
        &[("authorization", "Bearer nope")],
        "{}",
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        sim.http_requests_on("send_msg"),
        before,
        "nothing reached the backend"
    );
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_backend_is_down_or_disabled_calls_fail_at_once() {
    let (sim, proxy) = setup(|_| {}).await;
    let auth = [("authorization", "Bearer cl")];
    // Killed: the probe notices, calls get 503 at once.
    sim.kill();
    wait_lane(&proxy, Lane::HttpApi, false).await;
    let r = call(proxy.addr, "GET", "/get_status", &auth, "").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.took < Duration::from_millis(500), "{:?}", r.took);
    assert!(r.header("retry-after").is_some(), "{r:?}");
    let v = r.json();
    assert_eq!(
        (v["status"].as_str(), v["retcode"].as_i64()),
        (Some("failed"), Some(503))
    );
    assert_eq!(v["cause"], "unhealthy");
    assert!(v["message"].as_str().unwrap().contains("unhealthy"), "{v}");
    sim.enable().await.unwrap();
    wait_lane(&proxy, Lane::HttpApi, true).await;
    assert_eq!(
        call(proxy.addr, "GET", "/get_status", &auth, "")
            .await
            .status,
        200
    );
    // The operator's switch.
    assert_eq!(http(proxy.admin_addr, "POST", "/disable").await.0, 200);
    let r = call(proxy.addr, "GET", "/get_status", &auth, "").await;
    assert_eq!((r.status, r.json()["cause"].as_str()), (503, Some("admin")));
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("disabled by the operator"));
    http(proxy.admin_addr, "POST", "/enable").await;
    wait_lane(&proxy, Lane::HttpApi, true).await;
    // NapCat's hot reload switched its HTTP server off: new connections are refused, the
    // probe sees it.
    sim.disable_http();
    wait_lane(&proxy, Lane::HttpApi, false).await;
    let r = call(proxy.addr, "GET", "/get_status", &auth, "").await;
    assert_eq!(r.status, 503);
    let (_, state) = http(proxy.admin_addr, "GET", "/state").await;
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["lanes"]["http-api"]["state"], "down", "{state}");
    assert_eq!(state["upstream_http"], sim.http_url().unwrap(), "{state}");
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_gets_the_reply_grace_on_a_planned_disable() {
    let (sim, proxy) = setup(|a| a.fall = Some(50)).await;
    let addr = proxy.addr;
    // The backend holds the call; the operator disables; the backend answers 150 ms
    // later, inside the grace: the bot gets the answer.
    sim.hang();
    let pending = tokio::spawn(async move {
        call(
            addr,
            "POST",
            "/send_msg",
            &[("authorization", "Bearer cl")],
            r#"{"echo":"graced"}"#,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    http(proxy.admin_addr, "POST", "/disable").await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    sim.unhang();
    let r = pending.await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["echo"], "graced");
    // Past the grace: 503, within about half a second of the disable.
    http(proxy.admin_addr, "POST", "/enable").await;
    wait_lane(&proxy, Lane::HttpApi, true).await;
    sim.hang();
    let pending =
        tokio::spawn(
            async move { call(addr, "GET", "/get_status?access_token=cl", &[], "").await },
        );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    http(proxy.admin_addr, "POST", "/disable").await;
    let r = pending.await.unwrap();
    let after = t0.elapsed();
    assert_eq!(
        (r.status, r.json()["cause"].as_str()),
        (503, Some("admin")),
        "{r:?}"
    );
    assert!(
        after >= Duration::from_millis(400) && after < Duration::from_millis(1500),
        "answered {after:?} after the disable"
    );
    sim.unhang();
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_fails_at_once_when_the_backend_turns_unhealthy() {
    let (sim, proxy) = setup(|_| {}).await;
    let addr = proxy.addr;
    sim.hang();
    let t0 = Instant::now();
    let r = call(addr, "GET", "/get_status?access_token=cl", &[], "").await;
    // Probes every 100 ms time out after 300 ms; two failures: down within about a second.
    assert_eq!(
        (r.status, r.json()["cause"].as_str()),
        (503, Some("unhealthy")),
        "{r:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    sim.unhang();
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_bounded_and_calls_time_out() {
    let (sim, proxy) = setup(|a| {
        a.max_message_size = Some(1024);
        a.http_timeout = Some(Duration::from_millis(300));
        a.fall = Some(50);
    })
    .await;
    let big = format!(r#"{{"message":"{}"}}"#, "x".repeat(2000));
    let r = call(proxy.addr, "POST", "/send_msg?access_token=cl", &[], big).await;
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (413, Some("failed")),
        "{r:?}"
    );
    sim.hang();
    let r = call(proxy.addr, "GET", "/get_status?access_token=cl", &[], "").await;
    assert_eq!(
        (r.status, r.json()["cause"].as_str()),
        (504, Some("upstream-timeout")),
        "{r:?}"
    );
    assert!(
        r.took >= Duration::from_millis(280) && r.took < Duration::from_secs(2),
        "{:?}",
        r.took
    );
    sim.unhang();
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_http_share_the_client_port() {
    // Both upstreams: upgrades go to the forward WebSocket relay, the rest to the HTTP API.
    let sim = http_sim(SimConfig::default(), HttpServerConfig::default()).await;
    let mut args = http_args();
    args.upstream = Some(sim.url());
    args.upstream_http = sim.http_url();
    let proxy = start_proxy(args).await;
    wait_lane(&proxy, Lane::HttpApi, true).await;
    wait_lane(&proxy, Lane::Forward, true).await;
    let mut ws = connect_url_events(format!("ws://{}/", proxy.addr)).await;
    api_roundtrip(&mut ws, "ws-1").await;
    let r = call(proxy.addr, "GET", "/get_status?echo=h", &[], "").await;
    assert_eq!((r.status, r.json()["echo"].as_str()), (200, Some("h")));
    let (status, body) = http(proxy.admin_addr, "GET", "/ready").await;
    assert_eq!(status, 200, "{body}");
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    for lane in ["forward", "http-api"] {
        assert_eq!(state["lanes"][lane]["state"], "up", "{state}");
    }
    // The HTTP server alone switched off: the WebSocket lane stays up.
    sim.disable_http();
    wait_lane(&proxy, Lane::HttpApi, false).await;
    api_roundtrip(&mut ws, "ws-2").await;
    assert_eq!(http(proxy.admin_addr, "GET", "/ready").await.0, 503);
    let scrape = parse_metrics(&http(proxy.admin_addr, "GET", "/metrics").await.1);
    assert_eq!(
        metric(&scrape, "lifeguard_upstream_up", &[("lane", "http-api")]),
        Some(0.0)
    );
    assert!(
        metric(
            &scrape,
            "lifeguard_probe_duration_seconds_count",
            &[("probe", "http"), ("result", "failed")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    proxy.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_http_upstream_is_followed_on_reload() {
    let old = http_sim(SimConfig::default(), HttpServerConfig::default()).await;
    let new = http_sim(
        SimConfig::default().with_self_id(42),
        HttpServerConfig::default(),
    )
    .await;
    let mut args = http_args();
    args.upstream_http = old.http_url();
    let proxy = start_proxy(args.clone()).await;
    wait_lane(&proxy, Lane::HttpApi, true).await;
    let r = call(proxy.addr, "GET", "/get_login_info", &[], "").await;
    assert_eq!(r.json()["data"]["user_id"], old.self_id());
    // lifeguard's config moves the HTTP upstream: a transition (cause config) until the new
    // address answers its first probe, then calls go there.
    args.upstream_http = new.http_url();
    let change = proxy
        .state
        .set_base_settings(lifeguard::config::Settings::resolve(&args, None).unwrap());
    assert_eq!(change.applied, ["upstream_http"]);
    wait_lane(&proxy, Lane::HttpApi, true).await;
    let r = call(proxy.addr, "GET", "/get_login_info", &[], "").await;
    assert_eq!(r.json()["data"]["user_id"], 42);
    let scrape = parse_metrics(&http(proxy.admin_addr, "GET", "/metrics").await.1);
    assert_eq!(
        metric(
            &scrape,
            "lifeguard_upstream_transitions_total",
            &[("lane", "http-api"), ("cause", "config")]
        ),
        Some(1.0)
    );
    proxy.shutdown().await;
    old.shutdown().await;
    new.shutdown().await;
}
