//! The real `lifeguard` binary: flags, exit codes, SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use lifeguard::sim::{NapSim, SimConfig};

const BIN: &str = env!("CARGO_BIN_EXE_lifeguard");

fn lifeguard(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args);
    // Nothing from the test environment may leak in.
    for (k, _) in std::env::vars() {
        if k.starts_with("LIFEGUARD_") {
            c.env_remove(k);
        }
    }
    c.env("RUST_LOG", "info");
    c
}

/// Bad flags and values: exit 64 with one clear message.
#[test]
fn bad_configuration_exits_64_with_one_message() {
    let cases: &[(&[&str], &str)] = &[
        (&[], "missing upstream"),
        (
            &["--upstream", "http://napcat:3001"],
            "must start with ws://",
        ),
        (
            &["--upstream", "ws://napcat:3001", "--probe-interval", "5"],
            "invalid duration",
        ),
        (
            &["--upstream", "ws://napcat:3001", "--fall", "two"],
            "--fall",
        ),
        (
            &["--upstream", "ws://napcat:3001", "--listen", "nowhere"],
            "--listen",
        ),
        (
            &["--upstream", "ws://napcat:3001", "--heartbeat-grace", "0.5"],
            "heartbeat_grace",
        ),
        (
            &["--upstream", "ws://napcat:3001", "--no-such-flag"],
            "--no-such-flag",
        ),
        (
            &["--reverse-listen", "127.0.0.1:8080"],
            "needs at least one --reverse-url",
        ),
        (
            &["--reverse-url", "ws://nonebot:8080/onebot/v11/ws"],
            "missing upstream",
        ),
        (
            &[
                "--upstream",
                "ws://napcat:3001",
                "--reverse-url",
                "ws://nonebot:8080/",
            ],
            "--reverse-url needs --reverse-listen",
        ),
        (
            &[
                "--reverse-listen",
                "0.0.0.0:6700",
                "--reverse-url",
                "ws://nb:8080/",
            ],
            "collides with --listen",
        ),
        (
            &[
                "--reverse-listen",
                "127.0.0.1:8080",
                "--reverse-url",
                "http://nb:8080/",
            ],
            "must start with ws://",
        ),
    ];
    for (args, expect) in cases {
        let out = lifeguard(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    let out = lifeguard(&["--help"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--upstream",
        "--access-token",
        "--upstream-token",
        "--admin-listen",
        "--probe-interval",
        "--probe-timeout",
        "--fall",
        "--rise",
        "--heartbeat-grace",
        "--close-timeout",
        "--drain-timeout",
        "--reverse-listen",
        "--reverse-url",
        "--reverse-token",
    ] {
        assert!(help.contains(flag), "{flag} in --help");
    }
    // Every flag can come from LIFEGUARD_<FLAG>.
    let out = lifeguard(&["check-config"])
        .env("LIFEGUARD_UPSTREAM", "ws://napcat:3001")
        .env("LIFEGUARD_PROBE_INTERVAL", "250ms")
        .env("LIFEGUARD_ACCESS_TOKEN", "hunter2")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("probe_interval = 250ms"), "{text}");
    assert!(
        text.contains("access_token = ***") && !text.contains("hunter2"),
        "{text}"
    );
}

struct Running {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Running {
    fn start(upstream: &str, extra: &[&str], rust_log: &str) -> Running {
        let mut args = vec![
            "--upstream",
            upstream,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--probe-interval",
            "100ms",
        ];
        args.extend_from_slice(extra);
        let mut child = lifeguard(&args)
            .env("RUST_LOG", rust_log)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut log = Vec::new();
        let started = loop {
            let line = rx.recv_timeout(SOON).expect("lifeguard logs its start");
            log.push(line.clone());
            if line.contains("lifeguard started") {
                break line;
            }
        };
        let field = |name: &str| -> SocketAddr {
            let at = started.find(&format!("{name}=")).unwrap() + name.len() + 1;
            started[at..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        Running {
            addr: field("listen"),
            admin: field("admin"),
            child,
            lines: rx,
            log,
        }
    }

    fn wait_exit(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.log.push(l);
                }
                return (status.code(), t0.elapsed());
            }
            assert!(
                t0.elapsed() < limit,
                "lifeguard did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_session_with_1001_and_exits_0() {
    let sim = NapSim::start(SimConfig::default().with_heartbeat_interval(None))
        .await
        .unwrap();
    let mut lg = Running::start(&sim.url(), &["--drain-timeout", "10s"], "info");
    let deadline = Instant::now() + SOON;
    while http(lg.admin, "GET", "/ready").await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = |p: &str| format!("ws://{}{}", lg.addr, p);
    let mut clients = Vec::new();
    for path in ["/", "/event", "/api"] {
        let (ws, _) = tokio_tungstenite::connect_async(url(path)).await.unwrap();
        clients.push((path, ws));
    }
    for (path, ws) in clients.iter_mut() {
        if *path != "/api" {
            assert!(next_text(ws).await.contains("connect"));
        }
    }
    let pid = lg.child.id() as i32;
    // SAFETY-free: libc::kill with a pid we own.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    for (path, ws) in clients.iter_mut() {
        let end = read_to_end(ws, SOON).await;
        assert_eq!(end.code(), Some(1001), "{path}: {end:?}");
        assert!(
            end.close.as_ref().unwrap().1.contains("shutting down"),
            "{end:?}"
        );
        if *path == "/api" {
            assert!(end.texts.is_empty(), "{end:?}");
        } else {
            assert!(end.got_disable(), "{path}: {end:?}");
        }
    }
    let (code, took) = tokio::task::block_in_place(|| lg.wait_exit(Duration::from_secs(12)));
    assert_eq!(code, Some(0), "{:#?}", lg.log);
    assert!(
        took < Duration::from_secs(5),
        "drained long before the 10s budget: {took:?}"
    );
    let closed: Vec<_> = lg
        .log
        .iter()
        .filter(|l| l.contains("session closed"))
        .collect();
    assert_eq!(
        closed.len(),
        3,
        "one log line per termination: {:#?}",
        lg.log
    );
    for l in closed {
        for field in [
            "session=",
            "peer=",
            "path=",
            "cause=\"shutdown\"",
            "lifetime_ms=",
            "frames_to_client=",
            "frames_to_backend=",
        ] {
            assert!(l.contains(field), "{field} in {l}");
        }
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_the_logs() {
    let sim = NapSim::start(
        SimConfig::default()
            .with_heartbeat_interval(None)
            .with_token("up-s3cret-token"),
    )
    .await
    .unwrap();
    // Debug level: everything lifeguard (and its HTTP stack) could log.
    let mut lg = Running::start(
        &sim.url(),
        &[
            "--access-token",
            "cl-s3cret-token",
            "--upstream-token",
            "up-s3cret-token",
        ],
        "debug",
    );
    let deadline = Instant::now() + SOON;
    while http(lg.admin, "GET", "/ready").await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = format!("ws://{}/?access_token=cl-s3cret-token", lg.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert!(next_text(&mut ws).await.contains("connect"));
    let bad = format!("ws://{}/?access_token=wrong-s3cret-guess", lg.addr);
    assert_eq!(refused_req(bad).await.0, 403);
    drop(ws);
    assert_eq!(
        unsafe { libc::kill(lg.child.id() as i32, libc::SIGTERM) },
        0
    );
    let (code, _) = tokio::task::block_in_place(|| lg.wait_exit(Duration::from_secs(12)));
    assert_eq!(code, Some(0));
    let all = lg.log.join("\n");
    assert!(all.contains("session closed"), "{all}");
    assert!(
        !all.contains("s3cret"),
        "a token leaked into the logs:\n{all}"
    );
    sim.shutdown().await;
}

/// The README's flag table lists exactly the flags `--help` knows, with their defaults.
#[test]
fn readme_flag_table_matches_the_cli() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let help = String::from_utf8(lifeguard(&["--help"]).output().unwrap().stdout).unwrap();
    let flags_of = |text: &str, prefix: &str| -> std::collections::BTreeSet<String> {
        text.lines()
            .filter_map(|l| l.trim_start().strip_prefix(prefix))
            .filter_map(|rest| rest.split([' ', '`']).next())
            .map(|f| format!("--{f}"))
            .collect()
    };
    let in_readme = flags_of(&readme, "| `--");
    let mut in_help = flags_of(&help, "--");
    in_help.remove("--help");
    in_help.remove("--version");
    assert_eq!(in_readme, in_help, "README flag table vs --help");
    for (flag, default) in [
        ("--listen", lifeguard::config::DEFAULT_LISTEN),
        ("--admin-listen", lifeguard::config::DEFAULT_ADMIN_LISTEN),
    ] {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{flag} ")))
            .unwrap();
        assert!(row.contains(default), "{row}");
    }
}
