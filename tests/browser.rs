//! The status page in a real browser: the real binary (with `--admin-token`) in front of the
//! NapCat simulator, real bot sessions, and Debian's chromium driven headless by
//! `tests/browser/status_page.mjs` (playwright-core). Screenshots go to `target/`.
//!
//! Needs `/usr/bin/chromium` (or `LIFEGUARD_CHROMIUM`), `node`, and
//! `tests/browser/node_modules` (`npm install` there); `.ci/run` installs all three and sets
//! `LIFEGUARD_BROWSER_TEST=required`, which turns a missing piece into a failure. Anywhere
//! else the test says loudly what is missing and skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use lifeguard::sim::{NapSim, SimConfig};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What is missing to run a browser here, if anything.
fn missing(chromium: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    if !chromium.exists() {
        missing.push(format!("{} (apt-get install chromium)", chromium.display()));
    }
    if Command::new("node").arg("--version").output().is_err() {
        missing.push("node (apt-get install nodejs npm)".into());
    }
    if !root()
        .join("tests/browser/node_modules/playwright-core")
        .exists()
    {
        missing.push(
            "tests/browser/node_modules/playwright-core (cd tests/browser && npm install)".into(),
        );
    }
    missing
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_chromium_shows_the_state_and_its_buttons_work() {
    let chromium = std::env::var_os("LIFEGUARD_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let missing = missing(&chromium);
    if !missing.is_empty() {
        let msg = format!("BROWSER TEST NOT RUN: missing {}", missing.join(", "));
        if std::env::var("LIFEGUARD_BROWSER_TEST").as_deref() == Ok("required") {
            panic!("{msg} (LIFEGUARD_BROWSER_TEST=required)");
        }
        eprintln!("\n!!!!!!!! {msg} !!!!!!!!\n");
        return;
    }
    let sim = NapSim::start(SimConfig::default()).await.unwrap();
    let token = "br0wser-t0ken";
    let lg = tokio::task::block_in_place(|| {
        Bin::spawn(&[
            "--upstream",
            &sim.url(),
            "--admin-token",
            token,
            "--probe-interval",
            "200ms",
        ])
    });
    lg.wait_ready(true).await;
    let mut event = connect_url_events(lg.url("/event")).await;
    let mut universal = connect_url_events(lg.url("/")).await;
    let mut api = connect_url(lg.url("/api")).await;
    sim.heartbeat_now();
    let bearer = format!("Bearer {token}");
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let (_, body) = http_with(lg.admin, "GET", "/state", &[("Authorization", &bearer)]).await;
        if body.contains("\"online\":true") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no heartbeat reached the state: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The bots read until their session ends (the page's Disable button).
    let ends = tokio::spawn(async move {
        let mut codes = Vec::new();
        for ws in [&mut event, &mut universal, &mut api] {
            codes.push(
                read_to_end(ws, std::time::Duration::from_secs(60))
                    .await
                    .code(),
            );
        }
        codes
    });

    let shots = root().join("target");
    std::fs::create_dir_all(&shots).unwrap();
    let profile = TempDir::new("chromium-profile");
    let admin = format!("http://{}", lg.admin);
    let self_id = sim.self_id().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(root().join("tests/browser/status_page.mjs"))
            .current_dir(root().join("tests/browser"))
            .env("ADMIN_URL", &admin)
            .env("ADMIN_TOKEN", token)
            .env("SELF_ID", &self_id)
            .env("CHROMIUM", &chromium)
            .env("SHOTS", &shots)
            .env("PROFILE", &profile.0)
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("PASS"),
        "the browser test failed:\n{stdout}\n{stderr}"
    );
    assert_eq!(
        ends.await.unwrap(),
        vec![Some(1012); 3],
        "the bots saw the disable"
    );
    let shot = root().join("target/status-page.png");
    let png = std::fs::read(&shot).expect("screenshot saved");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        shot.display()
    );
    println!("screenshot: {}", shot.display());
    let all = lg.lines.lock().unwrap().join("\n");
    assert!(!all.contains(token), "the admin token leaked into the log");
    sim.shutdown().await;
}
