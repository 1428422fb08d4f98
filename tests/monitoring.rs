//! `deploy/monitoring/`: the Prometheus alert rules pass `promtool check rules` and their
//! unit tests, and every lifeguard metric the rules and the Grafana dashboard name is one a
//! live lifeguard exports.
//!
//! promtool comes with Debian's `prometheus` package; `.ci/run` installs it and sets
//! `LIFEGUARD_PROMTOOL_TEST=required`, which turns a missing promtool into a failure.
//! Anywhere else the promtool checks say loudly that they did not run.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use common::http::{call, http_args, http_sim, start_proxy, BotSim, Mode};
use common::*;
use futures_util::StreamExt;
use lifeguard::sim::{HttpServerConfig, PostConfig, ReverseConfig, SimConfig};
use tokio::net::TcpListener;

fn monitoring() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/monitoring")
}

const RULES: &str = "lifeguard-alerts.yml";
const RULE_TESTS: &str = "lifeguard-alerts.test.yml";
const DASHBOARD: &str = "grafana-dashboard.json";

fn read(name: &str) -> String {
    std::fs::read_to_string(monitoring().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Every `lifeguard_*` metric name written in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("lifeguard_") {
        let before = rest[..i].chars().last();
        rest = &rest[i..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[name.len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        out.insert(name);
    }
    out
}

/// The names a scrape can be queried by: every sample's, and each family's with the
/// suffixes its type gets.
fn exported(exposition: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            for s in suffixes {
                out.insert(format!("{name}{s}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            out.insert(line[..end].to_string());
        }
    }
    out
}

#[tokio::test]
async fn every_metric_in_the_rules_and_the_dashboard_is_exported() {
    let h = Harness::start(SimConfig::default()).await;
    // Some traffic, so that labelled series exist too.
    let mut ws = h.connect_events("/").await;
    api_roundtrip(&mut ws, "1").await;
    h.admin("POST", "/disable").await;
    read_to_end(&mut ws, SOON).await;
    h.admin("POST", "/enable").await;
    h.wait_ready(true).await;
    let (status, text) = h.admin("GET", "/metrics").await;
    assert_eq!(status, 200);
    let mut live = exported(&text);
    live.extend(exported(&every_transport_metrics().await));
    for (file, text) in [(RULES, read(RULES)), (DASHBOARD, read(DASHBOARD))] {
        let named = metric_names(&text);
        assert!(named.len() >= 5, "{file} names {named:?}");
        let unknown: Vec<_> = named.difference(&live).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics lifeguard does not export: {unknown:?}\nexported: {live:?}"
        );
    }
    // The alerts are all there, each with a severity and a summary.
    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(&read(RULES)).unwrap();
    let alerts: Vec<&serde_yaml_ng::Value> = rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
        .collect();
    for a in &alerts {
        assert!(a["labels"]["severity"].as_str().is_some(), "{a:?}");
        assert!(a["annotations"]["summary"].as_str().is_some(), "{a:?}");
    }
    let names: BTreeSet<&str> = alerts.iter().filter_map(|a| a["alert"].as_str()).collect();
    for want in [
        "LifeguardBackendDown",
        "LifeguardAccountOffline",
        "LifeguardFlapping",
        "LifeguardConfigReloadFailed",
        "LifeguardProtocolViolations",
    ] {
        assert!(names.contains(want), "{want} missing: {names:?}");
    }
    // The dashboard: Grafana's JSON with queries in its panels.
    let dash: serde_json::Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    for p in panels {
        assert!(
            p["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "{}",
            p["title"]
        );
    }
    h.stop().await;
}

/// `/metrics` of a lifeguard with the HTTP API, the POST relay and reverse WebSocket
/// configured and one exchange on each, so that their labelled series exist.
async fn every_transport_metrics() -> String {
    let sim = http_sim(SimConfig::default(), HttpServerConfig::default()).await;
    let post_bot = BotSim::start(Mode::NoContent).await;
    let ws_bot = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut args = http_args();
    args.upstream_http = sim.http_url();
    args.post_listen = Some("127.0.0.1:0".parse().unwrap());
    args.post_url = Some(vec![post_bot.url()]);
    args.reverse_listen = Some("127.0.0.1:0".parse().unwrap());
    args.reverse_url = Some(vec![format!(
        "ws://{}/onebot/v11/ws",
        ws_bot.local_addr().unwrap()
    )]);
    let proxy = start_proxy(args).await;

    let _reverse = sim.add_reverse(ReverseConfig::napcat(format!(
        "ws://{}/",
        proxy.reverse_addr.expect("reverse listener")
    )));
    let (tcp, _) = tokio::time::timeout(SOON, ws_bot.accept())
        .await
        .expect("lifeguard dials the reverse bot")
        .unwrap();
    let mut bot_ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
    let first = tokio::time::timeout(SOON, bot_ws.next()).await;
    assert!(
        matches!(first, Ok(Some(Ok(_)))),
        "the reverse bot gets the backend's connect: {first:?}"
    );

    let _post = sim.add_post(PostConfig::napcat(format!(
        "http://{}/",
        proxy.post_addr.expect("POST listener")
    )));
    sim.emit_message(1);
    post_bot
        .wait_for(SOON, "a relayed event", |r| r.lifecycle().is_none())
        .await;

    let answer = call(proxy.addr, "GET", "/get_status", &[], "").await;
    assert_eq!(answer.status, 200, "{answer:?}");

    let (status, text) = http(proxy.admin_addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    proxy.shutdown().await;
    sim.shutdown().await;
    text
}

#[test]
fn metric_names_are_found_whole() {
    let found = metric_names(
        "rate(lifeguard_sessions_closed_total{x=\"y\"}[5m]) my_lifeguard_x lifeguard status",
    );
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        vec!["lifeguard_sessions_closed_total"]
    );
}

fn promtool() -> Option<PathBuf> {
    let found = Command::new("promtool").arg("--version").output().is_ok();
    if found {
        return Some(PathBuf::from("promtool"));
    }
    let msg = "PROMTOOL CHECKS NOT RUN: promtool is missing (apt-get install prometheus)";
    if std::env::var("LIFEGUARD_PROMTOOL_TEST").as_deref() == Ok("required") {
        panic!("{msg} (LIFEGUARD_PROMTOOL_TEST=required)");
    }
    eprintln!("\n!!!!!!!! {msg} !!!!!!!!\n");
    None
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let Some(promtool) = promtool() else {
        return;
    };
    for args in [["check", "rules", RULES], ["test", "rules", RULE_TESTS]] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(monitoring())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
