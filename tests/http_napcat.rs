//! NapCat's `httpServers[].enable` and `httpClients[].enable` followed like its WebSocket
//! server's: real files written in place, a real proxy, the simulator's HTTP server and
//! POST client, a bot receiver.

mod common;

use std::time::Duration;

use common::http::*;
use common::*;
use lifeguard::sim::{HttpServerConfig, NapSim, PostConfig, SimConfig};
use lifeguard::state::Lane;

/// NapCat v4's file with one HTTP server and one HTTP POST client.
fn v4(http_enable: bool, http_port: u16, post_enable: bool, post_port: u16) -> String {
    format!(
        r#"{{
  "network": {{
    "httpServers": [
      {{"enable": {http_enable}, "name": "http", "host": "0.0.0.0", "port": {http_port},
        "enableCors": true, "enableWebsocket": false, "messagePostFormat": "array",
        "token": "up", "debug": false}}
    ],
    "httpSseServers": [],
    "httpClients": [
      {{"enable": {post_enable}, "name": "post", "url": "http://127.0.0.1:{post_port}/",
        "reportSelfMessage": false, "messagePostFormat": "array", "token": "in", "debug": false}}
    ],
    "websocketServers": [],
    "websocketClients": [],
    "plugins": []
  }},
  "musicSignUrl": "",
  "enableLocalFile2Url": false,
  "parseMultMsg": false
}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn napcats_http_server_and_post_client_switches_are_followed() {
    let dir = TempDir::new("http-napcat");
    let file = dir.path("onebot11_3889001234.json");
    let sim = NapSim::start(SimConfig::default().with_heartbeat_interval(None))
        .await
        .unwrap();
    let http_addr = sim
        .start_http(HttpServerConfig::default().with_token("up"))
        .await
        .unwrap();
    let bot = BotSim::start(Mode::NoContent).await;
    let mut args = http_args();
    args.upstream_http = sim.http_url();
    args.post_listen = Some("127.0.0.1:0".parse().unwrap());
    args.post_url = Some(vec![bot.url()]);
    args.post_secret = Some("in".into());
    args.napcat_config = Some(file.clone());
    let proxy = start_proxy(args).await;
    let post_port = proxy.post_addr.unwrap().port();
    let post = sim.add_post(
        PostConfig::napcat(format!("http://127.0.0.1:{post_port}/"))
            .with_token("in")
            .serial(),
    );
    // No --upstream-token: the HTTP server's own token (from the file) is what lifeguard
    // presents; until the file is read, the probe is refused.
    write_in_place(&file, &v4(true, http_addr.port(), true, post_port));
    wait_lane(&proxy, Lane::HttpApi, true).await;
    wait_lane(&proxy, Lane::HttpPost, true).await;
    bot.wait_for(SOON, "enable", |r| {
        r.lifecycle().as_deref() == Some("enable")
    })
    .await;
    assert_eq!(
        call(proxy.addr, "GET", "/get_status", &[], "").await.status,
        200
    );

    // The POST client switched off in NapCat's WebUI: the POST lane goes down, the bots
    // hear `disable`; the API lane is not concerned.
    write_in_place(&file, &v4(true, http_addr.port(), false, post_port));
    wait_lane(&proxy, Lane::HttpPost, false).await;
    let post_lane = proxy.state.snapshot().lane(Lane::HttpPost).clone();
    assert_eq!(post_lane.cause.as_str(), "napcat-config");
    assert!(
        post_lane.reason.contains("httpClients \"post\""),
        "{}",
        post_lane.reason
    );
    bot.wait_for(SOON, "disable", |r| {
        r.lifecycle().as_deref() == Some("disable")
    })
    .await;
    assert!(proxy.state.snapshot().lane(Lane::HttpApi).up);
    // Its POSTs, should any come, are refused: disabled means disabled.
    sim.emit_message(1);
    post.wait_finished(1).await;
    assert_eq!(post.outcomes()[0].status, Some(503));

    // The HTTP server switched off: API calls get 503 naming the cause at once.
    write_in_place(&file, &v4(false, http_addr.port(), false, post_port));
    wait_lane(&proxy, Lane::HttpApi, false).await;
    let r = call(proxy.addr, "GET", "/get_status", &[], "").await;
    assert_eq!(
        (r.status, r.json()["cause"].as_str()),
        (503, Some("napcat-config")),
        "{r:?}"
    );
    assert!(r.took < Duration::from_millis(500));

    // Both back on.
    write_in_place(&file, &v4(true, http_addr.port(), true, post_port));
    wait_lane(&proxy, Lane::HttpApi, true).await;
    wait_lane(&proxy, Lane::HttpPost, true).await;
    sim.emit_message(2);
    bot.wait_count(4, SOON).await;
    let story: Vec<String> = bot
        .received()
        .iter()
        .map(|r| {
            r.lifecycle()
                .unwrap_or_else(|| format!("e{}", r.json()["message_id"]))
        })
        .collect();
    assert_eq!(story, ["enable", "disable", "enable", "e2"]);
    assert!(sim
        .http_requests()
        .iter()
        .all(|r| r.authorization.as_deref() != Some("Bearer in")));
    proxy.shutdown().await;
    sim.shutdown().await;
}
