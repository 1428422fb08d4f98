//! A real framework behind the HTTP transports: aiocqhttp (installed from PyPI by .ci/run
//! into `target/pyenv-aiocqhttp`, pinned in tests/frameworks/aiocqhttp-requirements.txt)
//! receives lifeguard's POSTs (its own signature check), answers with quick operations, and
//! calls the API through lifeguard's HTTP proxy. Skipped, loudly, when that venv is
//! missing, unless `LIFEGUARD_FRAMEWORK_TESTS=required` (what .ci/run sets): then it fails.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::http::*;
use common::*;
use lifeguard::sim::{HttpServerConfig, PostConfig, SimConfig};
use lifeguard::state::Lane;
use serde_json::Value;

/// The venv's python, if aiocqhttp imports there.
fn python() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let py = std::env::var_os("LIFEGUARD_AIOCQHTTP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/pyenv-aiocqhttp/bin/python"));
    let ok = Command::new(&py)
        .args(["-c", "import aiocqhttp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(py);
    }
    let msg = format!(
        "aiocqhttp is not installed at {} (run .ci/run, or: python3 -m venv target/pyenv-aiocqhttp && \
         target/pyenv-aiocqhttp/bin/pip install -r tests/frameworks/aiocqhttp-requirements.txt)",
        py.display()
    );
    if std::env::var("LIFEGUARD_FRAMEWORK_TESTS").as_deref() == Ok("required") {
        panic!("{msg}");
    }
    eprintln!("\n!!! SKIPPED the aiocqhttp framework test: {msg}\n");
    None
}

/// The receiver process, killed when dropped.
struct Receiver {
    child: Child,
    out: PathBuf,
    /// aiocqhttp's own log, shown when something goes wrong.
    stderr: PathBuf,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// `enable`/`disable`/`m<id>` in the order aiocqhttp handled them.
    fn story(&self) -> Vec<String> {
        self.records()
            .iter()
            .filter_map(|r| match r["kind"].as_str() {
                Some("meta") if r["meta_event_type"] == "lifecycle" => {
                    r["sub_type"].as_str().map(str::to_string)
                }
                Some("message") => Some(format!("m{}", r["message_id"])),
                _ => None,
            })
            .collect()
    }

    async fn wait_story(&mut self, want: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.story() == want {
                return;
            }
            let log = || std::fs::read_to_string(&self.stderr).unwrap_or_default();
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "aiocqhttp exited ({status}); records: {:#?}\n{}",
                    self.records(),
                    log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "aiocqhttp saw {:?}, not {want:?}; records: {:#?}\n{}",
                self.story(),
                self.records(),
                log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiocqhttp_gets_signed_events_enable_and_disable_and_its_quick_operations_reach_the_backend(
) {
    let Some(py) = python() else { return };
    let dir = TempDir::new("aiocqhttp");
    let sim = http_sim(
        SimConfig::default().with_token("up"),
        HttpServerConfig::default().with_token("up"),
    )
    .await;
    // A free port for aiocqhttp (bound and released: lifeguard must know it first).
    let bot_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut args = http_args();
    args.upstream_http = sim.http_url();
    args.access_token = Some("cl".into());
    args.upstream_token = Some("up".into());
    args.post_listen = Some("127.0.0.1:0".parse().unwrap());
    args.post_url = Some(vec![format!("http://127.0.0.1:{bot_port}/")]);
    args.post_secret = Some("napcat-secret".into());
    args.post_bot_secret = Some("bot-secret".into());
    let proxy = start_proxy(args).await;
    let out = dir.path("events.jsonl");
    let child = Command::new(&py)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/frameworks/aiocqhttp_receiver.py"
        ))
        .arg(bot_port.to_string())
        .arg(format!("http://{}/", proxy.addr))
        .arg("cl")
        .arg("bot-secret")
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path("stderr.log")).unwrap())
        .spawn()
        .expect("python starts");
    let mut rx = Receiver {
        child,
        out,
        stderr: dir.path("stderr.log"),
    };
    // lifeguard retries until aiocqhttp listens: the `enable` it queued at start arrives.
    wait_lane(&proxy, Lane::HttpPost, true).await;
    rx.wait_story(&["enable"]).await;
    let post_addr = proxy.post_addr.unwrap();
    let post = sim.add_post(
        PostConfig::napcat(format!("http://{post_addr}/"))
            .with_token("napcat-secret")
            .serial(),
    );
    for seq in 1..=3 {
        sim.emit_message(seq);
    }
    rx.wait_story(&["enable", "m1", "m2", "m3"]).await;
    // Its API calls went through lifeguard's proxy with lifeguard's token.
    let msgs: Vec<Value> = rx
        .records()
        .into_iter()
        .filter(|r| r["kind"] == "message")
        .collect();
    for m in &msgs {
        assert_eq!(m["api"]["ok"], true, "{m}");
        assert_eq!(m["api"]["data"]["user_id"], sim.self_id(), "{m}");
        assert_eq!(m["self_id"], sim.self_id());
    }
    assert!(sim
        .http_requests()
        .iter()
        .filter(|r| r.action == "get_login_info")
        .all(|r| r.authorization.as_deref() == Some("Bearer up")));
    // Its quick operations reached the backend, each for its own event.
    post.wait_finished(3).await;
    let ops = post.quick_operations();
    assert_eq!(ops.len(), 3, "{ops:#?}");
    for (i, op) in ops.iter().enumerate() {
        let body: Value = serde_json::from_str(&op.body).unwrap();
        assert_eq!(body["reply"], format!("pong {}", i + 1), "{op:?}");
        assert!(op.event.contains(&format!("\"message_id\":{}", i + 1)));
    }
    // The operator disables: aiocqhttp hears `disable`, and its API call right then fails
    // at once (503), it does not hang.
    http(proxy.admin_addr, "POST", "/disable").await;
    rx.wait_story(&["enable", "m1", "m2", "m3", "disable"])
        .await;
    let disable = rx
        .records()
        .into_iter()
        .find(|r| r["sub_type"] == "disable")
        .unwrap();
    assert_eq!(disable["api"]["ok"], false, "{disable}");
    assert_eq!(disable["api"]["http_status"], 503, "{disable}");
    assert!(disable["api"]["ms"].as_u64().unwrap() < 1000, "{disable}");
    http(proxy.admin_addr, "POST", "/enable").await;
    rx.wait_story(&["enable", "m1", "m2", "m3", "disable", "enable"])
        .await;
    sim.emit_message(4);
    rx.wait_story(&["enable", "m1", "m2", "m3", "disable", "enable", "m4"])
        .await;
    proxy.shutdown().await;
    rx.wait_story(&[
        "enable", "m1", "m2", "m3", "disable", "enable", "m4", "disable",
    ])
    .await;
    sim.shutdown().await;
}
