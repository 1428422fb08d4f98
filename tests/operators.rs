//! What an operator sees and hears: a kicked QQ account noticed at once, the admin token,
//! the transition history, webhooks and `lifeguard status`, each through the real binary
//! or a real proxy on loopback.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use lifeguard::sim::{NapSim, SimConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const KICK_TAG: &str = "被顶下线";
const KICK_MESSAGE: &str = "你的帐号在另一台设备上登录 (device: iPad)";

/// NapCat's `bot_offline` notice, in its field order (OB11BaseNoticeEvent's, then
/// BotOfflineEvent's).
fn kick_notice(self_id: u64) -> String {
    format!(
        r#"{{"time":{},"self_id":{self_id},"post_type":"notice","notice_type":"bot_offline","user_id":{self_id},"tag":{},"message":{}}}"#,
        lifeguard::proto::onebot::now_secs(),
        serde_json::json!(KICK_TAG),
        serde_json::json!(KICK_MESSAGE),
    )
}

fn spawn(args: &[&str]) -> Bin {
    tokio::task::block_in_place(|| Bin::spawn(args))
}

async fn json(addr: SocketAddr, path: &str, token: Option<&str>) -> serde_json::Value {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    let (status, body) = http_with(addr, "GET", path, &headers).await;
    assert!(status == 200 || status == 503, "{path}: {status} {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_offline_notice_closes_every_session_at_once_and_login_brings_it_back() {
    // NapCat's default 30 s heartbeat: only the notice can be this fast.
    let sim = NapSim::start(SimConfig::default()).await.unwrap();
    let lg = spawn(&[
        "--upstream",
        &sim.url(),
        "--probe-interval",
        "100ms",
        "--close-timeout",
        "500ms",
    ]);
    lg.wait_ready(true).await;
    let mut clients = Vec::new();
    for path in ["/", "/", "/event", "/api"] {
        let ws = if path == "/api" {
            connect_url(lg.url(path)).await
        } else {
            connect_url_events(lg.url(path)).await
        };
        clients.push((path, ws));
    }
    // Kicked: QQ says offline from now on (get_status too), and NapCat sends the notice.
    sim.set_online(false);
    let kicked = Instant::now();
    assert_eq!(sim.emit(kick_notice(sim.self_id())), 3, "event clients");
    let mut last_close = kicked;
    for (path, ws) in clients.iter_mut() {
        let end = read_to_end(ws, SOON).await;
        assert_eq!(end.code(), Some(1013), "{path}: {end:?}");
        let reason = &end.close.as_ref().unwrap().1;
        assert!(reason.starts_with("offline: "), "{reason}");
        if *path != "/api" {
            // The notice itself reaches the bots first, then `disable`.
            assert!(
                end.texts.iter().any(|t| t.contains("\"bot_offline\"")),
                "{end:?}"
            );
            assert!(end.got_disable(), "{path}: {end:?}");
        }
        last_close = last_close.max(end.at);
    }
    let took = last_close - kicked;
    println!("kick-to-Close (last of 4 clients): {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");

    // /state and the log carry the notice's words.
    let state = json(lg.admin, "/state", None).await;
    assert_eq!(state["cause"], "offline", "{state}");
    let reason = state["reason"].as_str().unwrap();
    assert!(
        reason.contains(KICK_TAG) && reason.contains(KICK_MESSAGE),
        "{reason}"
    );
    assert_eq!(state["backend"]["last_kick"]["tag"], KICK_TAG);
    assert_eq!(state["backend"]["last_kick"]["message"], KICK_MESSAGE);
    let line = tokio::task::block_in_place(|| {
        lg.wait_log(SOON, |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("kicked offline"))
        })
    });
    assert_eq!(line["kick_tag"], KICK_TAG, "{line}");
    assert_eq!(line["kick_message"], KICK_MESSAGE, "{line}");
    let changed = tokio::task::block_in_place(|| {
        lg.wait_log(SOON, |v| {
            v["message"] == "upstream state changed" && v["cause"] == "offline"
        })
    });
    assert!(
        changed["reason"].as_str().unwrap().contains(KICK_MESSAGE),
        "{changed}"
    );
    // While offline, handshakes are refused; the login watch's get_status sees it back.
    let (status, _, _) = refused_req(lg.url("/")).await;
    assert_eq!(status, 503);
    sim.set_online(true);
    lg.wait_ready(true).await;
    let t = json(lg.admin, "/transitions", None).await;
    let items = t["transitions"].as_array().unwrap();
    let last_two: Vec<_> = items[items.len() - 2..]
        .iter()
        .map(|r| {
            (
                r["state"].clone(),
                r["cause"].clone(),
                r["sessions_closed"].clone(),
            )
        })
        .collect();
    assert_eq!(
        last_two,
        vec![
            ("down".into(), "offline".into(), 4.into()),
            ("up".into(), "healthy".into(), 0.into())
        ],
        "{t}"
    );
    connect_url_events(lg.url("/")).await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_guards_everything_but_the_probes_and_never_shows() {
    let sim = NapSim::start(SimConfig::default()).await.unwrap();
    let token = "adm1n-s3cret";
    let lg = spawn(&["--upstream", &sim.url(), "--admin-token", token]);
    lg.wait_ready(true).await;
    let bearer = format!("Bearer {token}");
    let good = [("Authorization", bearer.as_str())];
    let wrong = [("Authorization", "Bearer nope")];
    for (method, path) in [
        ("GET", "/state"),
        ("GET", "/transitions"),
        ("POST", "/disable"),
        ("POST", "/enable"),
        ("GET", "/"),
    ] {
        let (status, body) = http_with(lg.admin, method, path, &[]).await;
        assert_eq!(status, 401, "{method} {path}: {body}");
        let (status, _) = http_with(lg.admin, method, path, &wrong).await;
        assert_eq!(status, 403, "{method} {path}");
    }
    // Refused POSTs changed nothing.
    assert_eq!(json(lg.admin, "/state", Some(token)).await["state"], "up");
    // Probes and scrapes stay open; /ready then says only up or down.
    for path in ["/live", "/ready", "/metrics"] {
        assert_eq!(http(lg.admin, "GET", path).await.0, 200, "{path}");
    }
    let (_, ready) = http(lg.admin, "GET", "/ready").await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ready).unwrap(),
        serde_json::json!({"state": "up"})
    );
    // The page without a token is a form that asks for it; with one, the page.
    let (_, login) = http(lg.admin, "GET", "/").await;
    assert!(login.contains("type=\"password\""), "{login}");
    assert!(!login.contains("id=\"transitions\""));
    let (status, page) = http(lg.admin, "GET", &format!("/?token={token}")).await;
    assert_eq!(status, 200);
    assert!(page.contains("id=\"transitions\""));
    let (status, page) = http_with(lg.admin, "GET", "/", &good).await;
    assert_eq!(status, 200);
    for external in ["<link", " src=", "href=\"http", "url(", "@import"] {
        assert!(!page.contains(external), "no external assets: {external}");
    }
    // A browser's cross-origin POST is refused even with the token.
    let (status, _) = http_with(
        lg.admin,
        "POST",
        "/disable",
        &[good[0], ("Origin", "http://evil.example")],
    )
    .await;
    assert_eq!(status, 403);
    let same_origin = format!("http://{}", lg.admin);
    let (status, body) = http_with(
        lg.admin,
        "POST",
        "/disable",
        &[good[0], ("Origin", same_origin.as_str())],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    lg.wait_ready(false).await;
    tokio::task::block_in_place(|| {
        lg.wait_log(SOON, |v| v["message"] == "admin: disable requested")
    });
    let all = lg.lines.lock().unwrap().join("\n");
    assert!(!all.contains(token), "the admin token leaked into the log");
    // check-config masks it too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lifeguard"))
        .args([
            "check-config",
            "--upstream",
            "ws://h:1",
            "--admin-token",
            token,
        ])
        .env_remove("LIFEGUARD_ADMIN_TOKEN")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("admin_token = ***"), "{printed}");
    assert!(!printed.contains(token));
    sim.shutdown().await;
}

/// `lifeguard status` as a script runs it: piped, exit status 0 up, 1 down, 2 unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifeguard_status_shows_the_page_in_a_terminal_and_exits_by_state() {
    let sim = NapSim::start(SimConfig::default()).await.unwrap();
    let lg = spawn(&["--upstream", &sim.url(), "--admin-token", "t0k"]);
    lg.wait_ready(true).await;
    let admin = lg.admin.to_string();
    let status = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lifeguard"))
            .args(["status", "--admin-listen", &admin])
            .args(extra)
            .env_remove("LIFEGUARD_ADMIN_TOKEN")
            .env_remove("LIFEGUARD_ADMIN_LISTEN")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let mut ws = connect_url_events(lg.url("/event")).await;
    let (code, out, err) = tokio::task::block_in_place(|| status(&["--admin-token", "t0k"]));
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("lifeguard UP  healthy"), "{out}");
    assert!(out.contains(&format!("QQ {}", sim.self_id())), "{out}");
    assert!(
        out.contains("1 open (forward: api 0, event 1, universal 0)"),
        "{out}"
    );
    assert!(!out.contains('\x1b'), "no colours when piped: {out:?}");
    assert!(out.lines().count() < 25, "one screen: {out}");

    http_with(
        lg.admin,
        "POST",
        "/disable",
        &[("Authorization", "Bearer t0k")],
    )
    .await;
    read_to_end(&mut ws, SOON).await;
    let (code, out, _) = tokio::task::block_in_place(|| status(&["--admin-token", "t0k"]));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.starts_with("lifeguard DOWN  admin"), "{out}");
    let newest = out
        .lines()
        .skip_while(|l| !l.starts_with("recent transitions"))
        .nth(2)
        .unwrap();
    assert!(
        newest.contains("up>down") && newest.contains("admin") && newest.contains(" 1  "),
        "newest first, with the sessions it closed: {newest}"
    );
    let (code, _, err) = tokio::task::block_in_place(|| status(&[]));
    assert_eq!(code, Some(2), "no token: {err}");
    assert!(err.contains("wants a token"), "{err}");
    let (code, out, _) =
        tokio::task::block_in_place(|| status(&["--admin-token", "t0k", "--json"]));
    assert_eq!(code, Some(1));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["state"]["cause"], "admin");
    drop(lg);
    let (code, _, err) = tokio::task::block_in_place(|| status(&["--admin-token", "t0k"]));
    assert_eq!(code, Some(2), "unreachable: {err}");
    sim.shutdown().await;
}

#[tokio::test]
async fn transitions_are_recorded_in_order_with_what_they_closed() {
    let h = Harness::start(SimConfig::default()).await;
    let _a = h.connect_events("/").await;
    let _b = h.connect("/api").await;
    assert_eq!(h.admin("POST", "/disable").await.0, 200);
    h.wait_ready(false).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.admin("POST", "/enable").await.0, 200);
    h.wait_ready(true).await;
    let t = json(h.admin, "/transitions", None).await;
    let items = t["transitions"].as_array().unwrap();
    // starting -> healthy at start, then the operator's disable and enable.
    let seen: Vec<_> = items
        .iter()
        .map(|r| {
            (
                r["cause"].as_str().unwrap(),
                r["previous"]["cause"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("healthy", "starting"),
            ("admin", "healthy"),
            ("healthy", "admin")
        ],
        "{t}"
    );
    assert_eq!(items[1]["sessions_closed"], 2);
    assert_eq!(items[1]["ongoing"], false);
    assert!(items[1]["lasted_seconds"].as_f64().unwrap() >= 0.04, "{t}");
    assert!(
        (items[2]["previous"]["for_seconds"].as_f64().unwrap()
            - items[1]["lasted_seconds"].as_f64().unwrap())
        .abs()
            < 1e-9
    );
    assert_eq!(items[2]["ongoing"], true);
    let seqs: Vec<_> = items.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    let one = json(h.admin, "/transitions?limit=1", None).await;
    assert_eq!(one["transitions"].as_array().unwrap().len(), 1);
    assert_eq!(one["transitions"][0]["seq"], 3);
    h.stop().await;
}

// ---------------------------------------------------------------------------------------
// Webhooks

/// A webhook receiver on loopback: records every body; answers 500 to the first `fail`
/// requests, or never answers at all when `hang`.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
}

impl Receiver {
    async fn start(fail: usize, hang: bool) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let seen = bodies.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                n += 1;
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut raw = Vec::new();
                    let mut buf = [0u8; 4096];
                    let (head, body) = loop {
                        let Ok(k) = s.read(&mut buf).await else {
                            return;
                        };
                        if k == 0 {
                            return;
                        }
                        raw.extend_from_slice(&buf[..k]);
                        let text = String::from_utf8_lossy(&raw).into_owned();
                        if let Some((head, body)) = text.split_once("\r\n\r\n") {
                            let len: usize = head
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length:")
                                        .map(|v| v.trim().parse().unwrap())
                                })
                                .unwrap_or(0);
                            if body.len() >= len {
                                break (head.to_string(), body.to_string());
                            }
                        }
                    };
                    if hang {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    let status = if n <= fail {
                        "500 Internal Server Error"
                    } else {
                        "200 OK"
                    };
                    if n > fail {
                        seen.lock()
                            .unwrap()
                            .push((head, serde_json::from_str(&body).unwrap()));
                    }
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                });
            }
        });
        Receiver { addr, bodies }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| b.clone())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_post_every_transition_retry_and_never_slow_the_state() {
    let sim = NapSim::start(SimConfig::default()).await.unwrap();
    let chat = Receiver::start(0, false).await;
    let flaky = Receiver::start(2, false).await;
    let dead = Receiver::start(usize::MAX, false).await;
    let hung = Receiver::start(0, true).await;
    let chat_url = chat.url("/hooks/SECRETKEY?channel=ops");
    let lg = spawn(&[
        "--upstream",
        &sim.url(),
        "--probe-interval",
        "100ms",
        "--notify-url",
        &chat_url,
        "--notify-url",
        &flaky.url("/"),
        "--notify-url",
        &dead.url("/"),
        "--notify-url",
        &hung.url("/"),
    ]);
    lg.wait_ready(true).await;
    let mut ws = connect_url_events(lg.url("/")).await;
    // A kick, with one receiver hanging and one failing: the disable sequence is as fast
    // as ever.
    sim.set_online(false);
    let t0 = Instant::now();
    sim.emit(kick_notice(sim.self_id()));
    let end = read_to_end(&mut ws, SOON).await;
    assert_eq!(end.code(), Some(1013));
    assert!(end.at - t0 < Duration::from_secs(1), "{:?}", end.at - t0);
    sim.set_online(true);
    lg.wait_ready(true).await;
    wait_until(SOON, "three posts to the chat webhook", || {
        chat.bodies().len() >= 3
    })
    .await;
    let posts = chat.bodies();
    eprintln!("{posts:#?}");
    let down = &posts[1];
    assert_eq!(down["state"], "down", "{down}");
    assert_eq!(down["cause"], "offline");
    assert_eq!(down["previous"]["state"], "up");
    assert!(down["previous"]["for_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(down["sessions_closed"], 1);
    assert_eq!(down["self_id"], sim.self_id());
    assert!(down["reason"].as_str().unwrap().contains(KICK_MESSAGE));
    assert!(
        down["text"].as_str().unwrap().starts_with("lifeguard (QQ "),
        "{down}"
    );
    assert_eq!(posts[2]["state"], "up");
    {
        let heads = chat.bodies.lock().unwrap();
        let head = &heads[0].0;
        assert!(
            head.starts_with("POST /hooks/SECRETKEY?channel=ops HTTP/1.1"),
            "{head}"
        );
        assert!(head
            .to_ascii_lowercase()
            .contains("content-type: application/json"));
    }
    // The flaky one got everything after its retries, in order.
    wait_until(SOON, "flaky receiver catches up", || {
        flaky.bodies().len() >= 3
    })
    .await;
    let causes: Vec<_> = flaky.bodies().iter().map(|b| b["cause"].clone()).collect();
    assert_eq!(causes, vec!["healthy", "offline", "healthy"]);
    // The dead one: each record is dropped after its retries, counted and logged.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dropped = metric(
            &lg.metrics().await,
            "lifeguard_notify_dropped_total",
            &[("reason", "failed")],
        );
        if dropped == Some(3.0) {
            break;
        }
        assert!(Instant::now() < deadline, "dropped: {dropped:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line = tokio::task::block_in_place(|| {
        lg.wait_log(SOON, |v| {
            v["message"] == "webhook dropped: every attempt failed"
        })
    });
    assert_eq!(line["attempts"], 4, "{line}");
    let delivered = metric(&lg.metrics().await, "lifeguard_notify_delivered_total", &[]).unwrap();
    assert!(delivered >= 6.0, "{delivered}");
    // A chat webhook's key never reaches the log.
    let all = lg.lines.lock().unwrap().join("\n");
    assert!(!all.contains("SECRETKEY"), "{all}");
    assert!(all.contains(&format!("http://{}/…", chat.addr)), "{all}");
    sim.shutdown().await;
}
