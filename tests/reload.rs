//! Hot reload of lifeguard's own config file, on the real binary: file written in place,
//! renamed over, SIGHUP; an invalid file; token and probe changes. The backend is the
//! simulator, in this process.

mod common;

use std::time::{Duration, Instant};

use common::*;
use lifeguard::sim::{NapSim, SimConfig};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn quiet() -> SimConfig {
    SimConfig::default().with_heartbeat_interval(None)
}

/// A config file: fast probes, the simulator as upstream, plus `extra` lines.
fn config(sim: &NapSim, extra: &str) -> String {
    format!(
        "upstream = \"{}\"\nprobe_interval = \"100ms\"\nprobe_timeout = \"500ms\"\nclose_timeout = \"500ms\"\ndrain_timeout = \"3s\"\n{extra}\n",
        sim.url()
    )
}

fn is_reload(v: &serde_json::Value) -> bool {
    v["message"] == "config reloaded" || v["message"] == "config reloaded; nothing changed"
}

fn reloads(scrape: &prometheus_parse::Scrape, result: &str) -> f64 {
    metric(
        scrape,
        "lifeguard_config_reloads_total",
        &[("result", result)],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_by_write_rename_and_sighup() {
    let sim = NapSim::start(quiet()).await.unwrap();
    let dir = TempDir::new("reload");
    let file = dir.path("lifeguard.toml");
    write_in_place(&file, &config(&sim, "enabled = true"));
    let mut lg = Bin::spawn(&["--config", file.to_str().unwrap()]);
    lg.wait_ready(true).await;
    let mut uni = connect_url_events(lg.url("/")).await;
    let mut ev = connect_url_events(lg.url("/event")).await;

    // 1. Written in place: enabled = false -> disable + 1012, then 503.
    write_in_place(&file, &config(&sim, "enabled = false"));
    for ws in [&mut uni, &mut ev] {
        let end = read_to_end(ws, SOON).await;
        assert!(end.got_disable(), "{end:?}");
        assert_eq!(end.code(), Some(1012), "{end:?}");
        assert!(end.close.as_ref().unwrap().1.contains("config"), "{end:?}");
    }
    let (status, headers, body) = refused_req(lg.url("/")).await;
    assert_eq!(status, 503, "{body}");
    assert!(headers.get("retry-after").is_some());
    assert!(body.contains("\"cause\":\"config\""), "{body}");
    let line = lg.wait_log(SOON, |v| v["message"] == "config reloaded");
    assert!(
        line["changed"].as_str().unwrap().contains("enabled"),
        "{line}"
    );
    assert_eq!(line["level"], "INFO");

    // 2. Renamed over (how vim, many editors and config managers save): enabled again.
    write_by_rename(&file, &config(&sim, "enabled = true"));
    lg.wait_ready(true).await;
    let mut ws = connect_url_events(lg.url("/")).await;
    sim.emit_message(4);
    assert_eq!(next_text(&mut ws).await, sim.message_event(4));
    // The rename must not have lost the watch: write in place once more.
    write_in_place(&file, &config(&sim, "enabled = false"));
    let end = read_to_end(&mut ws, SOON).await;
    assert_eq!(end.code(), Some(1012), "{end:?}");
    write_in_place(&file, &config(&sim, "enabled = true"));
    lg.wait_ready(true).await;

    // 3. SIGHUP: always a reload (here with nothing changed), never the default "terminate".
    let before = reloads(&lg.metrics().await, "ok");
    let hups = lg.count_logs(|v| is_reload(v) && v["trigger"] == "SIGHUP");
    lg.signal(libc::SIGHUP);
    let deadline = Instant::now() + SOON;
    while lg.count_logs(|v| is_reload(v) && v["trigger"] == "SIGHUP") == hups {
        assert!(Instant::now() < deadline, "no reload after SIGHUP");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(lg.is_running(), "SIGHUP must not stop lifeguard");
    assert_eq!(reloads(&lg.metrics().await, "ok"), before + 1.0);
    assert_eq!(reloads(&lg.metrics().await, "failed"), 0.0);
    let _ws = connect_url_events(lg.url("/")).await;
    assert_eq!(lg.stop(), Some(0));
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_keeps_the_running_config() {
    let sim = NapSim::start(quiet()).await.unwrap();
    let dir = TempDir::new("reload-invalid");
    let file = dir.path("lifeguard.toml");
    write_in_place(&file, &config(&sim, "fall = 2"));
    let mut lg = Bin::spawn(&["--config", file.to_str().unwrap()]);
    lg.wait_ready(true).await;
    let mut ws = connect_url_events(lg.url("/")).await;

    // A bad value and an unknown key, and enabled = false which must NOT be applied.
    write_in_place(
        &file,
        &config(
            &sim,
            "enabled = false\nfall = \"two\"\nprob_interval = \"1s\"",
        ),
    );
    let line = lg.wait_log(SOON, |v| v["level"] == "ERROR");
    let err = line["error"].as_str().unwrap_or_default();
    assert!(err.contains("lifeguard.toml"), "names the file: {line}");
    assert!(
        err.contains("line 7") && err.contains("fall"),
        "line and field: {line}"
    );
    assert!(err.contains("prob_interval"), "every problem: {line}");
    let scrape = lg.metrics().await;
    assert_eq!(reloads(&scrape, "failed"), 1.0);
    assert_eq!(reloads(&scrape, "ok"), 0.0);
    // Still serving on the old configuration.
    api_roundtrip(&mut ws, "alive").await;
    assert_eq!(lg.admin("GET", "/ready").await.0, 200);
    let _second = connect_url_events(lg.url("/event")).await;
    // The poll fallback sees the same bad bytes: no second error line.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(lg.count_logs(|v| v["level"] == "ERROR"), 1);

    // Fixed: applied.
    write_in_place(&file, &config(&sim, "enabled = false"));
    let end = read_to_end(&mut ws, SOON).await;
    assert_eq!(end.code(), Some(1012), "{end:?}");
    assert_eq!(reloads(&lg.metrics().await, "ok"), 1.0);
    assert_eq!(lg.stop(), Some(0));
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_token_changes_close_only_sessions_whose_credential_fails() {
    let sim = NapSim::start(quiet()).await.unwrap();
    let dir = TempDir::new("reload-token");
    let file = dir.path("lifeguard.toml");
    write_in_place(&file, &config(&sim, ""));
    let mut lg = Bin::spawn(&["--config", file.to_str().unwrap()]);
    lg.wait_ready(true).await;
    // No token yet: one client presents nothing, one already presents the coming token,
    // one presents it as a header.
    let mut open = connect_url_events(lg.url("/")).await;
    let mut early = connect_url_events(lg.url("/?access_token=first")).await;
    let mut req = lg.url("/event").into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", "Bearer first".parse().unwrap());
    let mut header = connect_url_events(req).await;

    // A token appears: the client without a credential is told and closed with 1008.
    write_in_place(&file, &config(&sim, "access_token = \"first\""));
    let end = read_to_end(&mut open, SOON).await;
    assert!(end.got_disable(), "{end:?}");
    assert_eq!(end.code(), Some(1008), "{end:?}");
    api_roundtrip(&mut early, "kept-1").await;
    api_roundtrip(&mut header, "kept-2").await;
    assert_eq!(refused_req(lg.url("/")).await.0, 401);

    // Rotated: every session with the old token goes.
    write_in_place(&file, &config(&sim, "access_token = \"second\""));
    for ws in [&mut early, &mut header] {
        let end = read_to_end(ws, SOON).await;
        assert!(end.got_disable(), "{end:?}");
        assert_eq!(end.code(), Some(1008), "{end:?}");
    }
    assert_eq!(refused_req(lg.url("/?access_token=first")).await.0, 403);
    let mut ws = connect_url_events(lg.url("/?access_token=second")).await;
    api_roundtrip(&mut ws, "new").await;
    // The tokens never reach the log.
    lg.stop();
    let log = lg.lines.lock().unwrap().join("\n");
    assert!(!log.contains("first") && !log.contains("second"), "{log}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_settings_apply_without_restart() {
    let sim = NapSim::start(quiet()).await.unwrap();
    let dir = TempDir::new("reload-probe");
    let file = dir.path("lifeguard.toml");
    let slow = format!("upstream = \"{}\"\nprobe_interval = \"30s\"\n", sim.url());
    write_in_place(&file, &slow);
    let mut lg = Bin::spawn(&["--config", file.to_str().unwrap()]);
    lg.wait_ready(true).await;
    let probes = |s: &prometheus_parse::Scrape| {
        metric(
            s,
            "lifeguard_probe_duration_seconds_count",
            &[("result", "ok")],
        )
        .or_else(|| metric(s, "lifeguard_probe_duration_seconds", &[("result", "ok")]))
        .unwrap_or(0.0)
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    let a = probes(&lg.metrics().await);
    assert!(a <= 2.0, "30s interval: {a} probes");
    write_in_place(&file, &slow.replace("30s", "50ms"));
    lg.wait_log(SOON, |v| {
        v["message"] == "config reloaded"
            && v["changed"]
                .as_str()
                .is_some_and(|c| c.contains("probe_interval"))
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let b = probes(&lg.metrics().await);
    assert!(
        b - a >= 5.0,
        "50ms interval applied live: {a} -> {b} probes"
    );
    // Same process all along.
    assert!(lg.is_running());
    assert_eq!(lg.stop(), Some(0));
    sim.shutdown().await;
}
