//! Following NapCat's config file: real files written in place (as NapCat does), a real
//! proxy, real clients, the simulator as the backend.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use lifeguard::sim::{NapSim, SimConfig};
use lifeguard::state::Lane;

fn quiet() -> SimConfig {
    SimConfig::default().with_heartbeat_interval(None)
}

/// NapCat v4's file (as the reference sample), with the forward WS server's fields set.
fn v4(enable: bool, port: u16, token: &str) -> String {
    format!(
        r#"{{
  "network": {{
    "httpServers": [],
    "httpSseServers": [],
    "httpClients": [],
    "websocketServers": [
      {{
        "enable": {enable},
        "name": "ws",
        "host": "0.0.0.0",
        "port": {port},
        "reportSelfMessage": false,
        "enableForcePushEvent": true,
        "messagePostFormat": "array",
        "token": "{token}",
        "debug": false,
        "heartInterval": 30000
      }}
    ],
    "websocketClients": [],
    "plugins": []
  }},
  "musicSignUrl": "",
  "enableLocalFile2Url": false,
  "parseMultMsg": false
}}"#
    )
}

/// NapCat's older flat file (v3.1.10 to v4.0.x).
fn flat(enable: bool, port: u16) -> String {
    format!(
        r#"{{
  "http": {{"enable": false, "host": "", "port": 3000, "secret": "", "enableHeart": false, "enablePost": false, "postUrls": []}},
  "ws": {{"enable": {enable}, "host": "", "port": {port}}},
  "reverseWs": {{"enable": false, "urls": []}},
  "GroupLocalTime": {{"Record": false, "RecordList": []}},
  "debug": false,
  "heartInterval": 30000,
  "messagePostFormat": "array",
  "enableLocalFile2Url": true,
  "musicSignUrl": "",
  "reportSelfMessage": false,
  "token": ""
}}"#
    )
}

/// A proxy following `file`, which does not exist yet; then NapCat "writes" it with the
/// simulator's port (`write(enable, port)`), and the follower picks it up.
async fn start_following(file: &Path, write: impl Fn(bool, u16) -> String) -> Harness {
    let path = file.to_path_buf();
    let h = Harness::start_with(quiet(), |a| a.napcat_config = Some(path)).await;
    let port = h.sim.addr().port();
    write_in_place(file, &write(true, port));
    let state = h.proxy().state.clone();
    wait_until(SOON, "the follower to read NapCat's config", || {
        state.napcat_overlay().port == Some(port)
    })
    .await;
    h
}

/// Flip `enable` to false with `disabled`, measure, flip back with `enabled`.
async fn flip_closes_everyone(format: &str, write: impl Fn(bool, u16) -> String) {
    let dir = TempDir::new(&format!("napcat-{format}"));
    let file = dir.path("onebot11_3889001234.json");
    let h = start_following(&file, &write).await;
    let port = h.sim.addr().port();

    let mut clients = Vec::new();
    for path in ["/", "/event", "/", "/event", "/", "/event"] {
        clients.push(h.connect_events(path).await);
    }
    let t0 = Instant::now();
    write_in_place(&file, &write(false, port));
    let endings =
        futures_util::future::join_all(clients.iter_mut().map(|ws| read_to_end(ws, SOON))).await;
    let mut worst = Duration::ZERO;
    for end in &endings {
        assert!(end.got_disable(), "disable event last: {end:?}");
        assert_eq!(end.code(), Some(1012), "{end:?}");
        let reason = &end.close.as_ref().unwrap().1;
        assert!(
            reason.contains("napcat-config"),
            "reason names the cause: {reason}"
        );
        worst = worst.max(end.at - t0);
    }
    println!(
        "{format}: NapCat file flipped to enable=false -> last of {} clients got its Close after {worst:?}",
        endings.len()
    );
    assert!(worst < Duration::from_secs(1), "{format}: took {worst:?}");

    let (status, headers, body) = h.refused("/").await;
    assert_eq!(status, 503);
    assert!(headers.get("retry-after").is_some());
    assert!(body.contains("\"cause\":\"napcat-config\""), "{body}");

    // Back on: up once probes pass, and a new client gets events.
    write_in_place(&file, &write(true, port));
    h.wait_ready(true).await;
    let mut ws = h.connect_events("/event").await;
    h.sim.emit_message(3);
    assert_eq!(next_text(&mut ws).await, h.sim.message_event(3));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_enable_false_closes_every_client_within_a_second() {
    flip_closes_everyone("v4", |e, p| v4(e, p, "")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flat_enable_false_closes_every_client_within_a_second() {
    flip_closes_everyone("flat", flat).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_file_is_never_acted_on() {
    let dir = TempDir::new("napcat-partial");
    let file = dir.path("onebot11_1.json");
    let h2 = start_following(&file, |e, p| v4(e, p, "")).await;
    let port = h2.sim.addr().port();
    let state = h2.proxy().state.clone();
    let mut ws = connect_url_events(format!("ws://{}/", h2.addr)).await;

    // NapCat is midway through writing "enable": false: the prefix says false, but the
    // file does not parse. Nothing may happen.
    let disabled = v4(false, port, "");
    let cut = disabled.find("\"name\"").expect("cut point");
    assert!(disabled[..cut].contains("\"enable\": false"));
    write_in_place(&file, &disabled[..cut]);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        state.snapshot().lane(Lane::Forward).up,
        "acted on a half-written file"
    );
    api_roundtrip(&mut ws, "still-here").await;

    // Completed, still enabled (NapCat rewrote other fields): nothing happens either.
    write_in_place(
        &file,
        &v4(true, port, "").replace("\"debug\": false", "\"debug\": true"),
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(state.snapshot().lane(Lane::Forward).up);
    api_roundtrip(&mut ws, "still-here-2").await;

    // A partial write completed a moment later (within the retries): the complete
    // version is what counts.
    write_in_place(&file, &disabled[..cut]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    write_in_place(&file, &disabled);
    let end = read_to_end(&mut ws, SOON).await;
    assert!(end.got_disable(), "{end:?}");
    assert_eq!(end.code(), Some(1012));
    h2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_change_is_followed() {
    let dir = TempDir::new("napcat-port");
    let file = dir.path("onebot11_2.json");
    let a = NapSim::start(quiet()).await.unwrap();
    let b = NapSim::start(quiet().with_self_id(42)).await.unwrap();
    write_in_place(&file, &v4(true, a.addr().port(), ""));
    let follow = file.clone();
    let url = a.url();
    let h = Harness::start_with(quiet(), |args| {
        args.upstream = Some(url);
        args.napcat_config = Some(follow);
    })
    .await;
    let state = h.proxy().state.clone();
    wait_until(SOON, "the first read", || {
        state.napcat_overlay().port == Some(a.addr().port())
    })
    .await;
    let mut old = connect_url_events(format!("ws://{}/", h.addr)).await;
    assert_eq!(a.handshakes_on("/"), 1);

    // NapCat moved its server to b's port (the WebUI rewrote the file).
    let transitions = |text: &str| {
        metric(
            &parse_metrics(text),
            "lifeguard_upstream_transitions_total",
            &[("cause", "napcat-config")],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(transitions(&h.admin("GET", "/metrics").await.1), 0.0);
    write_in_place(&file, &v4(true, b.addr().port(), ""));
    let end = read_to_end(&mut old, SOON).await;
    assert!(end.got_disable(), "{end:?}");
    assert_eq!(end.code(), Some(1012), "{end:?}");
    // One route: a transition of the state, named for where it came from.
    let reason = &end.close.as_ref().unwrap().1;
    assert!(
        reason.starts_with("napcat-config:") && reason.contains(&b.addr().port().to_string()),
        "{reason}"
    );
    assert_eq!(transitions(&h.admin("GET", "/metrics").await.1), 1.0);
    wait_until(SOON, "the new port", || {
        state.settings().upstream.as_ref().unwrap().port == b.addr().port()
    })
    .await;
    h.wait_ready(true).await;
    let mut ws = connect_url(format!("ws://{}/", h.addr)).await;
    let first = next_text(&mut ws).await;
    assert!(
        first.contains("\"self_id\":42"),
        "the session landed on b: {first}"
    );
    assert_eq!(b.handshakes_on("/"), 1);
    b.emit_message(8);
    assert_eq!(next_text(&mut ws).await, b.message_event(8));
    h.stop().await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn napcat_token_is_used_for_the_backend() {
    // The backend requires a token that only NapCat's file knows; lifeguard's clients
    // need none. Without following it, the backend would answer 1403 and close.
    let dir = TempDir::new("napcat-token");
    let file = dir.path("onebot11_3.json");
    let sim = NapSim::start(quiet().with_token("from-napcat"))
        .await
        .unwrap();
    write_in_place(&file, &v4(true, sim.addr().port(), "from-napcat"));
    let (follow, url) = (file.clone(), sim.url());
    let h = Harness::start_with(quiet(), |a| {
        a.upstream = Some(url);
        a.napcat_config = Some(follow);
    })
    .await;
    let state = h.proxy().state.clone();
    wait_until(SOON, "NapCat's token", || {
        state.settings().upstream_token.is_some()
    })
    .await;
    let mut ws = connect_url_events(format!("ws://{}/", h.addr)).await;
    api_roundtrip(&mut ws, "tok").await;
    h.stop().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_directory_follows_the_file_with_the_matching_server() {
    let dir = TempDir::new("napcat-dir");
    let h0 = Harness::start_with(quiet(), |_| {}).await;
    let port = h0.sim.addr().port();
    // Another account's file (another port), NapCat's template, and ours.
    write_in_place(&dir.path("onebot11_111.json"), &v4(false, 1, ""));
    write_in_place(&dir.path("onebot11.json"), &v4(false, port, ""));
    write_in_place(&dir.path("onebot11_222.json"), &flat(true, port));
    let (follow, url) = (dir.0.clone(), h0.sim.url());
    let h = Harness::start_with(quiet(), |a| {
        a.upstream = Some(url);
        a.napcat_config = Some(follow);
    })
    .await;
    let state = h.proxy().state.clone();
    wait_until(SOON, "the first read", || {
        state.napcat_overlay().port == Some(port)
    })
    .await;
    assert!(
        state.snapshot().lane(Lane::Forward).up,
        "the other files are not ours"
    );
    let mut ws = connect_url_events(format!("ws://{}/event", h.addr)).await;
    write_in_place(&dir.path("onebot11_222.json"), &flat(false, port));
    let end = read_to_end(&mut ws, SOON).await;
    assert!(end.got_disable(), "{end:?}");
    assert_eq!(end.code(), Some(1012));
    h.stop().await;
    h0.stop().await;
}

/// Bug: with `--napcat-config` and no `--upstream-token`, connections opened right after
/// start-up presented the client's access token to the backend, before NapCat's file
/// (which names the backend's own token) had been applied. The backend's file must be
/// read before anything talks to the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_presents_the_clients_token_before_napcat_s_file_is_read() {
    let dir = TempDir::new("napcat-first-read");
    let sim = NapSim::start(quiet().with_token("napcat-secret"))
        .await
        .unwrap();
    // Other accounts' files first, so that reading the directory takes a while.
    for i in 0..1500u16 {
        write_in_place(
            &dir.path(&format!("onebot11_9{i}.json")),
            &v4(false, 1 + i, "other"),
        );
    }
    write_in_place(
        &dir.path("onebot11_1.json"),
        &v4(true, sim.addr().port(), "napcat-secret"),
    );
    let follow = dir.0.to_str().unwrap().to_string();
    let mut lg = Bin::spawn(&[
        "--upstream",
        &sim.url(),
        "--access-token",
        "client-secret",
        "--napcat-config",
        &follow,
        "--probe-interval",
        "50ms",
    ]);
    // As soon as it is up, bots connect, all at once.
    lg.wait_ready(true).await;
    let url = format!("{}?access_token=client-secret", lg.url("/"));
    let firsts = futures_util::future::join_all((0..4).map(|_| {
        let url = url.clone();
        async move {
            let mut ws = connect_url(url).await;
            next_text(&mut ws).await
        }
    }))
    .await;
    for first in firsts {
        assert!(
            first.contains("\"sub_type\":\"connect\""),
            "the backend refused lifeguard's token (it got the client's?): {first}"
        );
    }
    assert_eq!(lg.stop(), Some(0));
    sim.shutdown().await;
}

/// Bug: while NapCat's file had moved the upstream's port, every reload of lifeguard's
/// own config reported `upstream` as changed (old effective settings compared with the
/// new base ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reports_only_what_changed_while_napcat_moved_the_port() {
    let dir = TempDir::new("napcat-reload-keys");
    let a = NapSim::start(quiet()).await.unwrap();
    let b = NapSim::start(quiet()).await.unwrap();
    let napcat = dir.path("onebot11_5.json");
    // lifeguard's config says a; NapCat's file says its server is on b's port.
    write_in_place(&napcat, &v4(true, b.addr().port(), ""));
    let config = dir.path("lifeguard.toml");
    let text = |fall: u32| {
        format!(
            "upstream = \"{}\"\nnapcat_config = {:?}\nnapcat_server = \"ws\"\nfall = {fall}\n",
            a.url(),
            napcat.to_str().unwrap()
        )
    };
    write_in_place(&config, &text(2));
    let lg = Bin::spawn(&["--config", config.to_str().unwrap()]);
    lg.wait_ready(true).await;
    let (_, state) = lg.admin("GET", "/state").await;
    assert!(
        state.contains(&format!(":{}", b.addr().port())),
        "following NapCat's port: {state}"
    );
    write_in_place(&config, &text(3));
    let line = lg.wait_log(SOON, |v| v["message"] == "config reloaded");
    assert_eq!(line["changed"], "fall", "{line}");
    a.shutdown().await;
    b.shutdown().await;
}
