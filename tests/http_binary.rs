//! The real binary with the HTTP transports: what its log says about them (lifecycle
//! events, lost quick operations, dropped events), and no secret in it.

mod common;

use std::net::SocketAddr;

use common::http::*;
use common::*;
use lifeguard::sim::{HttpServerConfig, NapSim, PostConfig, SimConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_tells_what_happened_to_events_and_never_shows_a_secret() {
    let sim = NapSim::start(
        SimConfig::default()
            .with_heartbeat_interval(None)
            .with_token("up-s3cret"),
    )
    .await
    .unwrap();
    sim.start_http(HttpServerConfig::default().with_token("up-s3cret"))
        .await
        .unwrap();
    let primary = BotSim::start(Mode::Quick(r#"{"reply":"ok"}"#.into())).await;
    let http_url = sim.http_url().unwrap();
    let bot_url = format!("{}?key=url-s3cret", primary.url());
    let mut bin = Bin::spawn(&[
        "--upstream-http",
        &http_url,
        "--access-token",
        "cl-s3cret",
        "--upstream-token",
        "up-s3cret",
        "--post-listen",
        "127.0.0.1:0",
        "--post-url",
        &bot_url,
        "--post-secret",
        "in-s3cret",
        "--post-bot-secret",
        "out-s3cret",
        "--post-queue",
        "3",
        "--probe-interval",
        "100ms",
        "--drain-timeout",
        "3s",
    ]);
    let started = bin.wait_log(SOON, |v| v["message"] == "lifeguard started");
    let post_addr: SocketAddr = started["post_listen"].as_str().unwrap().parse().unwrap();
    bin.wait_ready(true).await;
    let post = sim.add_post(
        PostConfig::napcat(format!("http://{post_addr}/"))
            .with_token("in-s3cret")
            .serial(),
    );
    primary
        .wait_for(SOON, "enable", |r| {
            r.lifecycle().as_deref() == Some("enable")
        })
        .await;
    assert!(primary.received()[0].headers.get("x-signature").is_some());

    let r = call(
        bin.addr,
        "GET",
        "/get_status?access_token=cl-s3cret",
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    sim.emit_message(1);
    primary.wait_count(2, SOON).await;
    // The primary goes away: quick operations are lost (logged), its queue overflows
    // (drops logged and counted).
    primary.down().await;
    for seq in 2..=8 {
        sim.emit_message(seq);
    }
    post.wait_finished(8).await;
    bin.wait_log(SOON, |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("quick operation lost"))
    });
    let drop = bin.wait_log(SOON, |v| v["message"] == "event dropped for a bot");
    assert_eq!(drop["reason"], "queue-full", "{drop}");
    assert_eq!(drop["url"], format!("{}?***", primary.url()), "{drop}");
    let m = bin.metrics().await;
    let dropped = metric(
        &m,
        "lifeguard_post_dropped_total",
        &[("reason", "queue-full")],
    )
    .unwrap();
    assert!(dropped >= 3.0, "{dropped}");
    primary.up().await;
    // SIGTERM: the bots' last word is `disable`, delivered before the process exits.
    assert_eq!(bin.stop(), Some(0));
    assert_eq!(
        primary.lifecycles().last().map(String::as_str),
        Some("disable")
    );
    bin.wait_log(SOON, |v| {
        v["message"] == "lifecycle event queued for every bot (HTTP POST)"
            && v["sub_type"] == "disable"
    });
    let all = bin.lines.lock().unwrap().join("\n");
    assert!(
        !all.contains("s3cret"),
        "a secret leaked into the log:\n{all}"
    );
    sim.shutdown().await;
}

#[test]
fn check_config_masks_the_post_secrets_and_the_post_urls_query() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lifeguard"))
        .args([
            "check-config",
            "--post-listen",
            "127.0.0.1:5700",
            "--post-url",
            "http://bot:8080/onebot/v11/?k=url-s3cret",
            "--post-url",
            "http://other:8081/",
            "--post-secret",
            "in-s3cret",
        ])
        .env_remove("LIFEGUARD_UPSTREAM")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("post_url = http://bot:8080/onebot/v11/?***, http://other:8081"),
        "{text}"
    );
    assert!(
        text.contains("post_secret = ***") && text.contains("post_bot_secret = ***"),
        "{text}"
    );
    assert!(!text.contains("s3cret"), "{text}");
}
