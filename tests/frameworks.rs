//! Reverse WebSocket against a real bot framework: NoneBot2 (FastAPI driver on uvicorn, the
//! OneBot V11 adapter, versions pinned in tests/frameworks/requirements.txt), installed by
//! `.ci/run` into `target/framework-venv`. The simulator plays NapCat dialling lifeguard;
//! lifeguard dials NoneBot; `tests/frameworks/nonebot_bot.py` records what NoneBot sees.
//!
//! Without the venv the test is skipped with a loud message, unless
//! `LIFEGUARD_FRAMEWORK_TESTS=required` (as `.ci/run` sets it): then it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lifeguard::app::Proxy;
use lifeguard::config::{RunArgs, Settings};
use lifeguard::sim::{NapSim, ReverseConfig, SimConfig};
use serde_json::Value;

use common::TempDir;

const TOKEN: &str = "nonebot-token";

fn python() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/framework-venv/bin/python");
    if p.exists() {
        return Some(p);
    }
    let required = std::env::var("LIFEGUARD_FRAMEWORK_TESTS").as_deref() == Ok("required");
    assert!(
        !required,
        "LIFEGUARD_FRAMEWORK_TESTS=required but {} is missing (run .ci/run, or: python3 -m venv target/framework-venv && target/framework-venv/bin/pip install -r tests/frameworks/requirements.txt)",
        p.display()
    );
    eprintln!(
        "\n\n!!! SKIPPED: the real NoneBot2 test needs {} (.ci/run installs it) !!!\n\n",
        p.display()
    );
    None
}

/// NoneBot2, running, and the file it records to.
struct NoneBot {
    child: Child,
    record: PathBuf,
    port: u16,
    _dir: TempDir,
}

impl NoneBot {
    fn start(python: &Path) -> NoneBot {
        let dir = TempDir::new("nonebot");
        let record = dir.path("record.jsonl");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/frameworks/nonebot_bot.py");
        let child = Command::new(python)
            .arg(&script)
            .current_dir(&dir.0)
            .env("BOT_PORT", port.to_string())
            .env("BOT_RECORD", &record)
            .env("BOT_TOKEN", TOKEN)
            .env("ENVIRONMENT", "prod")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python starts");
        let bot = NoneBot {
            child,
            record,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "NoneBot did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        bot
    }

    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Wait until `n` record lines match `pred`; returns all lines.
    async fn wait_for(&self, what: &str, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.lines();
            if lines.iter().filter(|v| pred(v)).count() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "NoneBot never saw {what}; it saw:\n{}",
                lines
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What NoneBot logged (warnings about refused connections show here).
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        err
    }
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or("")
}

fn show(lines: &[Value], t0: f64) -> String {
    lines
        .iter()
        .map(|v| {
            format!(
                "  +{:>7.1} ms  {:<10} {}",
                (v["t"].as_f64().unwrap_or(0.0) - t0) * 1000.0,
                kind(v),
                v.get("name")
                    .or(v.get("action"))
                    .map(|x| x.to_string())
                    .unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonebot2_behind_lifeguard_sees_connect_events_a_clean_replacement_and_disable() {
    let Some(python) = python() else { return };
    let nb = NoneBot::start(&python);
    let args = RunArgs {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        reverse_listen: Some("127.0.0.1:0".parse().unwrap()),
        reverse_url: Some(vec![format!("ws://127.0.0.1:{}/onebot/v11/ws", nb.port)]),
        access_token: Some("napcat-token".into()),
        reverse_token: Some(TOKEN.into()),
        close_timeout: Some(Duration::from_millis(500)),
        ..Default::default()
    };
    let proxy = Proxy::start(Settings::resolve(&args, None).unwrap())
        .await
        .unwrap();
    let entry = |interval| {
        ReverseConfig::napcat(format!(
            "ws://{}/onebot/v11/ws",
            proxy.reverse_addr.unwrap()
        ))
        .with_token("napcat-token")
        .with_reconnect_interval(interval)
        .with_heartbeat_interval(Some(Duration::from_millis(500)))
    };
    let sim_cfg = SimConfig::default().with_heartbeat_interval(None);

    // NapCat dials lifeguard, lifeguard dials NoneBot: connect, an API call, an event.
    let t0 = now_secs();
    let a = NapSim::start(sim_cfg.clone()).await.unwrap();
    let _ha = a.add_reverse(entry(Duration::from_secs(60)));
    nb.wait_for("its bot connect", 1, |v| kind(v) == "connect")
        .await;
    let lines = nb.wait_for("the API answer", 1, |v| kind(v) == "api").await;
    let api = lines.iter().find(|v| kind(v) == "api").unwrap();
    assert_eq!(api["user_id"], a.self_id(), "{api}");
    a.emit_message(1);
    nb.wait_for("a group message", 1, |v| {
        v["name"] == "message.group.normal"
    })
    .await;
    let first_event = lines.iter().find(|v| kind(v) == "event").unwrap();
    assert_eq!(first_event["name"], "meta_event.lifecycle.connect");

    // A second NapCat logged in as the same account dials in: NoneBot must see the old
    // bot leave before the new one arrives, and refuse nothing.
    let t_dup = now_secs();
    let b = NapSim::start(sim_cfg.clone()).await.unwrap();
    let hb = b.add_reverse(entry(Duration::from_millis(300)));
    let lines = nb
        .wait_for("the second connect", 2, |v| kind(v) == "connect")
        .await;
    tokio::time::timeout(Duration::from_secs(5), hb.wait_connected())
        .await
        .expect("the new backend connection completed");
    let seq: Vec<&str> = lines
        .iter()
        .filter(|v| matches!(kind(v), "connect" | "disconnect"))
        .map(kind)
        .collect();
    assert_eq!(seq, ["connect", "disconnect", "connect"], "{lines:?}");
    let dup: Vec<Value> = lines
        .iter()
        .filter(|v| v["t"].as_f64().unwrap_or(0.0) >= t_dup)
        .cloned()
        .collect();
    eprintln!(
        "duplicate self id, as NoneBot2 saw it (from the second dial):\n{}",
        show(&dup, t_dup)
    );
    b.emit_message(2);
    nb.wait_for("the new backend's message", 2, |v| {
        v["name"] == "message.group.normal"
    })
    .await;

    // The backend is killed: NoneBot gets `disable`, then its bot disconnects.
    let t_kill = now_secs();
    b.kill();
    let lines = nb
        .wait_for("the second disconnect", 2, |v| kind(v) == "disconnect")
        .await;
    let after: Vec<Value> = lines
        .iter()
        .filter(|v| v["t"].as_f64().unwrap_or(0.0) >= t_kill)
        .cloned()
        .collect();
    eprintln!(
        "NapCat killed, as NoneBot2 saw it:\n{}",
        show(&after, t_kill)
    );
    let names: Vec<String> = after
        .iter()
        .map(|v| format!("{} {}", kind(v), v["name"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        names,
        ["event meta_event.lifecycle.disable", "disconnect "],
        "{after:?}"
    );
    eprintln!("whole record:\n{}", show(&nb.lines(), t0));

    proxy.shutdown().await;
    a.shutdown().await;
    b.shutdown().await;
    let log = nb.stop();
    assert!(
        !log.contains("already"),
        "NoneBot refused a duplicate connection:\n{log}"
    );
}
