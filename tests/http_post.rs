//! The HTTP POST relay over real sockets: the simulator's HTTP POST client posts to
//! lifeguard, lifeguard posts to bot receivers. Byte-for-byte bodies, signatures, order,
//! quick operations, retries, counted drops, and the lifecycle `enable`/`disable` events.

mod common;

use std::time::{Duration, Instant};

use common::http::*;
use common::*;
use lifeguard::app::Proxy;
use lifeguard::config::RunArgs;
use lifeguard::sim::{HttpServerConfig, NapSim, PostConfig, PostHandle, SimConfig};
use lifeguard::state::Lane;

struct Setup {
    sim: NapSim,
    proxy: Proxy,
    bots: Vec<BotSim>,
    post: PostHandle,
}

impl Setup {
    /// Bots answering as `modes`; with `http_api`, the backend's HTTP API is configured
    /// too (the POST lane's health then comes from its probe). The simulator's POST entry
    /// is serial (deterministic order) and signs with `in`; lifeguard signs with `out`.
    async fn start(
        modes: Vec<Mode>,
        http_api: bool,
        entry: impl FnOnce(PostConfig) -> PostConfig,
        tweak: impl FnOnce(&mut RunArgs),
    ) -> Setup {
        let sim = NapSim::start(SimConfig::default().with_heartbeat_interval(None))
            .await
            .unwrap();
        let mut bots = Vec::new();
        for m in modes {
            bots.push(BotSim::start(m).await);
        }
        let mut args = http_args();
        if http_api {
            sim.start_http(HttpServerConfig::default()).await.unwrap();
            args.upstream_http = sim.http_url();
        }
        args.post_listen = Some("127.0.0.1:0".parse().unwrap());
        args.post_url = Some(bots.iter().map(|b| b.url()).collect());
        args.post_secret = Some("in".into());
        args.post_bot_secret = Some("out".into());
        tweak(&mut args);
        let proxy = start_proxy(args).await;
        let post_addr = proxy.post_addr.expect("POST listener");
        let post = sim.add_post(entry(
            PostConfig::napcat(format!("http://{post_addr}/"))
                .with_token("in")
                .serial(),
        ));
        Setup {
            sim,
            proxy,
            bots,
            post,
        }
    }

    async fn metrics(&self) -> prometheus_parse::Scrape {
        parse_metrics(&http(self.proxy.admin_addr, "GET", "/metrics").await.1)
    }

    async fn stop(self) {
        self.proxy.shutdown().await;
        self.sim.shutdown().await;
    }
}

/// The bodies a bot received that are not lifecycle events.
fn events(bot: &BotSim) -> Vec<String> {
    bot.received()
        .iter()
        .filter(|r| r.lifecycle().is_none())
        .map(|r| r.text().to_string())
        .collect()
}

/// What a bot received, as a sequence of `enable`/`disable`/`e<message_id>`.
fn story(bot: &BotSim) -> Vec<String> {
    bot.received()
        .iter()
        .map(|r| match r.lifecycle() {
            Some(l) => l,
            None => format!("e{}", r.json()["message_id"]),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_every_bot_byte_for_byte_signed_and_in_order_with_quick_operations() {
    let quick = r#"{"reply":"hello","auto_escape":true}"#;
    let s = Setup::start(
        vec![Mode::Quick(quick.into()), Mode::NoContent],
        true,
        |e| e,
        |_| {},
    )
    .await;
    let id = s.sim.self_id();
    // The backend is up at start: `enable` first, with the self id the probe learned.
    for bot in &s.bots {
        bot.wait_count(1, SOON).await;
        assert_eq!(bot.lifecycles(), ["enable"]);
        assert_eq!(bot.received()[0].json()["self_id"], id);
    }
    for seq in 1..=30 {
        s.sim.emit_message(seq);
    }
    s.post.wait_finished(30).await;
    for bot in &s.bots {
        let got = bot.wait_count(31, SOON).await;
        let expected: Vec<String> = (1..=30).map(|seq| s.sim.message_event(seq)).collect();
        assert_eq!(events(bot), expected, "byte for byte, in order");
        for r in &got {
            assert_eq!(r.header("content-type"), Some("application/json"));
            assert_eq!(r.header("x-self-id"), Some(id.to_string().as_str()));
            assert_eq!(
                r.header("x-signature"),
                Some(signature("out", &r.body).as_str()),
                "signed with the bot secret over the exact bytes"
            );
        }
    }
    // Every POST got the primary's answer as a quick operation.
    let ops = s.post.quick_operations();
    assert_eq!(ops.len(), 30, "{ops:#?}");
    assert!(ops.iter().all(|o| o.body == quick && o.status == 200));
    assert!(
        s.post.outcomes().iter().all(|o| o.error.is_none()),
        "{:#?}",
        s.post.outcomes()
    );
    let m = s.metrics().await;
    assert_eq!(
        metric(
            &m,
            "lifeguard_post_received_total",
            &[("result", "accepted")]
        ),
        Some(30.0)
    );
    assert_eq!(
        metric(&m, "lifeguard_post_delivered_total", &[("bot", "0")]),
        Some(31.0)
    );
    assert_eq!(
        metric(&m, "lifeguard_post_delivered_total", &[("bot", "1")]),
        Some(31.0)
    );
    assert_eq!(
        metric(
            &m,
            "lifeguard_post_quick_operations_total",
            &[("result", "relayed")]
        ),
        Some(30.0)
    );
    assert_eq!(metric(&m, "lifeguard_post_dropped_total", &[]), Some(0.0));
    assert_eq!(
        metric(
            &m,
            "lifeguard_post_lifecycle_total",
            &[("sub_type", "enable")]
        ),
        Some(2.0)
    );
    let (_, state) = http(s.proxy.admin_addr, "GET", "/state").await;
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let post = &state["lanes"]["http-post"];
    assert_eq!(post["state"], "up", "{state}");
    assert_eq!(post["detail"]["bots"][1]["delivered"], 31, "{state}");
    assert_eq!(post["detail"]["told"], "enable", "{state}");
    assert_eq!(post["detail"]["self_id"], id, "{state}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_or_missigned_posts_are_refused_and_nothing_is_relayed() {
    let s = Setup::start(vec![Mode::NoContent], true, |e| e, |_| {}).await;
    s.bots[0].wait_count(1, SOON).await;
    let post = s.proxy.post_addr.unwrap();
    let body = s.sim.message_event(1);
    let r = call(
        post,
        "POST",
        "/",
        &[("content-type", "application/json")],
        body.clone(),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (401, Some("failed")),
        "{r:?}"
    );
    let wrong = signature("not-it", body.as_bytes());
    let r = call(post, "POST", "/", &[("x-signature", &wrong)], body.clone()).await;
    assert_eq!(r.status, 403, "{r:?}");
    let good = signature("in", body.as_bytes());
    let r = call(post, "POST", "/", &[("x-signature", &good)], "not json").await;
    assert_eq!(r.status, 403, "the signature covers the exact bytes: {r:?}");
    let sig = signature("in", b"not json");
    let r = call(post, "POST", "/", &[("x-signature", &sig)], "not json").await;
    assert_eq!(r.status, 400, "{r:?}");
    let r = call(post, "GET", "/", &[], "").await;
    assert_eq!(r.status, 405, "{r:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.bots[0].lifecycles(), ["enable"]);
    assert_eq!(events(&s.bots[0]).len(), 0);
    let m = s.metrics().await;
    assert_eq!(
        metric(
            &m,
            "lifeguard_post_received_total",
            &[("result", "unauthorized")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "lifeguard_post_received_total",
            &[("result", "forbidden")]
        ),
        Some(2.0)
    );
    // A good one goes through.
    let r = call(
        post,
        "POST",
        "/",
        &[("x-signature", &good), ("x-self-id", "42")],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, 204, "{r:?}");
    let got = s.bots[0].wait_count(2, SOON).await;
    assert_eq!(got[1].text(), body);
    assert_eq!(
        got[1].header("x-self-id"),
        Some("42"),
        "the backend's own header, as sent"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_primary_never_holds_the_backend_and_gets_everything_in_order_once_back() {
    let s = Setup::start(
        vec![Mode::Quick(r#"{"reply":"x"}"#.into()), Mode::NoContent],
        true,
        |e| e,
        |_| {},
    )
    .await;
    for bot in &s.bots {
        bot.wait_count(1, SOON).await;
    }
    s.bots[0].down().await;
    let t0 = Instant::now();
    for seq in 1..=20 {
        s.sim.emit_message(seq);
    }
    s.post.wait_finished(20).await;
    // The first waits for the primary's first failure; the rest are answered at once.
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(
        s.post.outcomes().iter().all(|o| o.status == Some(204)),
        "{:#?}",
        s.post.outcomes()
    );
    // The other bot is not held up by the failing one.
    s.bots[1].wait_count(21, SOON).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.bots[0].up().await;
    s.bots[0].wait_count(21, SOON).await;
    let want: Vec<String> = std::iter::once("enable".to_string())
        .chain((1..=20).map(|i| format!("e{i}")))
        .collect();
    assert_eq!(story(&s.bots[0]), want);
    assert_eq!(story(&s.bots[1]), want);
    let m = s.metrics().await;
    assert!(metric(&m, "lifeguard_post_retries_total", &[("bot", "0")]).unwrap() >= 1.0);
    assert_eq!(metric(&m, "lifeguard_post_dropped_total", &[]), Some(0.0));
    assert_eq!(
        metric(
            &m,
            "lifeguard_post_quick_operations_total",
            &[("result", "lost")]
        ),
        Some(20.0)
    );
    // Back and answering: quick operations again.
    s.sim.emit_message(21);
    s.post.wait_finished(21).await;
    assert_eq!(s.post.quick_operations().len(), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_bot_delays_no_other_and_a_failing_one_is_retried_in_order() {
    let s = Setup::start(
        vec![
            Mode::NoContent,
            Mode::Slow(Duration::from_millis(300)),
            Mode::Status(500),
        ],
        true,
        |e| e,
        |_| {},
    )
    .await;
    s.bots[0].wait_count(1, SOON).await;
    let t0 = Instant::now();
    for seq in 1..=5 {
        s.sim.emit_message(seq);
    }
    s.bots[0].wait_count(6, SOON).await;
    assert!(
        t0.elapsed() < Duration::from_millis(1200),
        "primary not held up: {:?}",
        t0.elapsed()
    );
    // The failing bot gets the same event again and again, nothing else.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tries = s.bots[2].bodies();
    assert!(
        tries.len() >= 3 && tries.iter().all(|b| b == &tries[0]),
        "{tries:#?}"
    );
    s.bots[2].set_mode(Mode::NoContent);
    let want: Vec<String> = std::iter::once("enable".to_string())
        .chain((1..=5).map(|i| format!("e{i}")))
        .collect();
    s.bots[1].wait_count(6, SOON).await;
    assert_eq!(story(&s.bots[1]), want);
    let deadline = Instant::now() + SOON;
    loop {
        let mut st = story(&s.bots[2]);
        st.dedup();
        if st == want {
            break;
        }
        assert!(Instant::now() < deadline, "{st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = s.metrics().await;
    assert!(metric(&m, "lifeguard_post_retries_total", &[("bot", "2")]).unwrap() >= 2.0);
    assert_eq!(metric(&m, "lifeguard_post_dropped_total", &[]), Some(0.0));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_and_old_events_are_dropped_counted_never_silently() {
    let s = Setup::start(
        vec![Mode::NoContent, Mode::NoContent],
        true,
        |e| e,
        |a| {
            a.post_queue = Some(5);
            a.post_retry_for = Some(Duration::from_millis(1500));
        },
    )
    .await;
    for bot in &s.bots {
        bot.wait_count(1, SOON).await;
    }
    s.bots[1].down().await;
    for seq in 1..=20 {
        s.sim.emit_message(seq);
    }
    s.post.wait_finished(20).await;
    s.bots[0].wait_count(21, SOON).await;
    let m = s.metrics().await;
    let full = metric(
        &m,
        "lifeguard_post_dropped_total",
        &[("bot", "1"), ("reason", "queue-full")],
    )
    .unwrap();
    assert!(
        (13.0..=15.0).contains(&full),
        "20 events, 5 queued, at most 1 in flight: {full}"
    );
    assert_eq!(
        metric(&m, "lifeguard_post_dropped_total", &[("bot", "0")]),
        Some(0.0)
    );
    // Down for longer than post_retry_for: what is left expires.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    s.bots[1].up().await;
    s.sim.emit_message(21);
    s.bots[1]
        .wait_for(SOON, "event 21", |r| r.text() == s.sim.message_event(21))
        .await;
    let m = s.metrics().await;
    let expired = metric(
        &m,
        "lifeguard_post_dropped_total",
        &[("bot", "1"), ("reason", "expired")],
    )
    .unwrap();
    let got = events(&s.bots[1]);
    let delivered_old = got
        .iter()
        .filter(|b| **b != s.sim.message_event(21))
        .count();
    // Every event is accounted for: delivered, dropped because the queue was full, or expired.
    assert_eq!(full + expired + delivered_old as f64, 20.0, "{got:#?}");
    assert!(expired >= 5.0, "{expired}");
    let (_, state) = http(s.proxy.admin_addr, "GET", "/state").await;
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(
        state["lanes"]["http-post"]["detail"]["bots"][1]["dropped"].as_f64(),
        Some(full + expired),
        "{state}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_and_enable_reach_the_bots_in_order_and_a_disabled_backends_posts_are_refused() {
    let s = Setup::start(vec![Mode::NoContent], true, |e| e, |_| {}).await;
    let bot = &s.bots[0];
    bot.wait_count(1, SOON).await;
    s.sim.emit_message(1);
    s.sim.emit_message(2);
    s.post.wait_finished(2).await;
    assert_eq!(http(s.proxy.admin_addr, "POST", "/disable").await.0, 200);
    bot.wait_for(SOON, "disable", |r| {
        r.lifecycle().as_deref() == Some("disable")
    })
    .await;
    // Disabled: the backend's events are refused (503), counted, not relayed.
    s.sim.emit_message(3);
    s.post.wait_finished(3).await;
    assert_eq!(
        s.post.outcomes()[2].status,
        Some(503),
        "{:#?}",
        s.post.outcomes()
    );
    http(s.proxy.admin_addr, "POST", "/enable").await;
    wait_lane(&s.proxy, Lane::HttpPost, true).await;
    s.sim.emit_message(4);
    bot.wait_count(6, SOON).await;
    assert_eq!(
        story(bot),
        ["enable", "e1", "e2", "disable", "enable", "e4"]
    );
    let disable = bot
        .received()
        .into_iter()
        .find(|r| r.lifecycle().as_deref() == Some("disable"))
        .unwrap();
    assert_eq!(disable.json()["self_id"], s.sim.self_id());
    assert_eq!(
        disable.header("x-signature"),
        Some(signature("out", &disable.body).as_str())
    );
    let m = s.metrics().await;
    assert_eq!(
        metric(
            &m,
            "lifeguard_post_received_total",
            &[("result", "refused")]
        ),
        Some(1.0)
    );
    // The backend dies (probe failures): `disable`; it comes back: `enable`.
    s.sim.kill();
    bot.wait_count(7, SOON).await;
    s.sim.enable().await.unwrap();
    bot.wait_count(8, SOON).await;
    s.sim.emit_message(5);
    bot.wait_count(9, SOON).await;
    assert_eq!(story(bot)[6..], ["disable", "enable", "e5"]);
    // Shutdown: a last `disable`, delivered before lifeguard is gone.
    let Setup {
        sim, proxy, bots, ..
    } = s;
    assert!(proxy.shutdown().await);
    assert_eq!(story(&bots[0]).last().map(String::as_str), Some("disable"));
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_only_a_backend_without_heartbeats_is_judged_by_intent_and_enable_precedes_its_first_event(
) {
    let s = Setup::start(vec![Mode::NoContent], false, |e| e, |_| {}).await;
    wait_lane(&s.proxy, Lane::HttpPost, true).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        s.bots[0].received().is_empty(),
        "no self id known: nothing announced yet"
    );
    s.sim.emit_message(1);
    s.bots[0].wait_count(2, SOON).await;
    assert_eq!(story(&s.bots[0]), ["enable", "e1"]);
    assert_eq!(s.bots[0].received()[0].json()["self_id"], s.sim.self_id());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_only_heartbeats_that_stop_or_say_offline_take_the_lane_down() {
    let s = Setup::start(
        vec![Mode::NoContent],
        false,
        |e| e.with_heartbeat_interval(Some(Duration::from_millis(100))),
        |_| {},
    )
    .await;
    let bot = &s.bots[0];
    bot.wait_for(SOON, "enable", |r| {
        r.lifecycle().as_deref() == Some("enable")
    })
    .await;
    // Heartbeats are relayed like any event.
    bot.wait_for(SOON, "a heartbeat", |r| {
        r.json()["meta_event_type"] == "heartbeat"
    })
    .await;
    // They stop: down after 2.5 x 100 ms, `disable` to the bot.
    s.post.disable();
    let t0 = Instant::now();
    wait_lane(&s.proxy, Lane::HttpPost, false).await;
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(
        s.proxy.state.snapshot().lane(Lane::HttpPost).cause.as_str(),
        "unhealthy"
    );
    bot.wait_for(SOON, "disable", |r| {
        r.lifecycle().as_deref() == Some("disable")
    })
    .await;
    s.post.enable();
    wait_lane(&s.proxy, Lane::HttpPost, true).await;
    bot.wait_for(SOON, "enable again", |_| {
        bot.lifecycles() == ["enable", "disable", "enable"]
    })
    .await;
    // QQ logged out: the heartbeat says so.
    s.sim.set_online(false);
    wait_lane(&s.proxy, Lane::HttpPost, false).await;
    assert_eq!(
        s.proxy.state.snapshot().lane(Lane::HttpPost).cause.as_str(),
        "offline"
    );
    s.sim.set_online(true);
    wait_lane(&s.proxy, Lane::HttpPost, true).await;
    bot.wait_for(SOON, "the offline period told", |_| {
        bot.lifecycles() == ["enable", "disable", "enable", "disable", "enable"]
    })
    .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_posts_like_napcats_all_arrive_with_nothing_lost() {
    // NapCat posts each event on its own request, concurrently: the bots get them in the
    // order they arrived at lifeguard, every one of them, and the same order for both.
    let s = Setup::start(
        vec![Mode::NoContent, Mode::NoContent],
        true,
        |mut e| {
            e.serial = false;
            e
        },
        |_| {},
    )
    .await;
    for bot in &s.bots {
        bot.wait_count(1, SOON).await;
    }
    for seq in 1..=200 {
        s.sim.emit_message(seq);
    }
    s.post.wait_finished(200).await;
    let a = s.bots[0].wait_count(201, SOON).await;
    let b = s.bots[1].wait_count(201, SOON).await;
    let bodies = |v: &[Received]| v.iter().map(|r| r.text().to_string()).collect::<Vec<_>>();
    assert_eq!(bodies(&a), bodies(&b), "one order for every bot");
    let mut got: Vec<String> = bodies(&a)[1..].to_vec();
    got.sort();
    let mut want: Vec<String> = (1..=200).map(|i| s.sim.message_event(i)).collect();
    want.sort();
    assert_eq!(got, want);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_bot_does_not_hold_up_shutdown_and_what_it_misses_is_counted() {
    let s = Setup::start(
        vec![Mode::NoContent, Mode::NoContent],
        true,
        |e| e,
        |a| {
            a.drain_timeout = Some(Duration::from_secs(5));
        },
    )
    .await;
    for bot in &s.bots {
        bot.wait_count(1, SOON).await;
    }
    s.bots[1].down().await;
    for seq in 1..=5 {
        s.sim.emit_message(seq);
    }
    s.post.wait_finished(5).await;
    s.bots[0].wait_count(6, SOON).await;
    let state = s.proxy.state.clone();
    let t0 = Instant::now();
    let Setup {
        sim, proxy, bots, ..
    } = s;
    assert!(proxy.shutdown().await, "drained within the budget");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // The live bot got its last `disable`; the dead one's backlog (5 events and the
    // `disable`) is counted as dropped at shutdown.
    assert_eq!(story(&bots[0]).last().map(String::as_str), Some("disable"));
    let m = parse_metrics(&state.metrics.render(&[]));
    assert_eq!(
        metric(
            &m,
            "lifeguard_post_dropped_total",
            &[("bot", "1"), ("reason", "shutdown")]
        ),
        Some(6.0)
    );
    sim.shutdown().await;
}
