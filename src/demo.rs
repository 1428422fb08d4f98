//! `lifeguard demo`: the proxy in front of the bundled NapCat simulator, and a scripted
//! client that shows, in about fifteen seconds, what a bot framework sees: a transparent
//! relay, then NapCat 3.1.10's silent disable turned into `disable` + Close, 503 while
//! down, recovery, and an operator's disable through the admin API.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::app::Proxy;
use crate::config::{DemoArgs, RunArgs, Settings};
use crate::sim::{NapSim, SimConfig};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn say(step: &str) {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        println!("\n\x1b[1m== {step}\x1b[0m");
    } else {
        println!("\n== {step}");
    }
}

fn show(who: &str, what: &str) {
    let mut line = what.to_string();
    if line.len() > 160 {
        let mut cut = 157;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str("...");
    }
    println!("   {who:<8} {line}");
}

/// Run the walkthrough; with `--keep-running`, stay up for a real bot afterwards.
pub async fn run(mut args: RunArgs, demo: DemoArgs) -> ExitCode {
    match walkthrough(&mut args, &demo).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::from(1)
        }
    }
}

async fn walkthrough(args: &mut RunArgs, demo: &DemoArgs) -> Result<(), String> {
    let sim =
        NapSim::start(SimConfig::default().with_heartbeat_interval(Some(Duration::from_secs(5))))
            .await
            .map_err(|e| format!("cannot start the simulator: {e}"))?;
    args.upstream = Some(sim.url());
    args.listen.get_or_insert(([127, 0, 0, 1], 6700).into());
    args.admin_listen
        .get_or_insert(([127, 0, 0, 1], 6701).into());
    args.probe_interval
        .get_or_insert(Duration::from_millis(500));
    let settings = Settings::resolve(args, None).map_err(|e| e.to_string())?;
    let proxy = match Proxy::start(settings.clone()).await {
        Ok(p) => p,
        Err(e) => {
            // Ports taken (a real lifeguard running?): use free ones rather than fail.
            eprintln!("({e}; using free ports instead)");
            let mut s = settings;
            s.listen = ([127, 0, 0, 1], 0).into();
            s.admin_listen = ([127, 0, 0, 1], 0).into();
            Proxy::start(s).await.map_err(|e| e.to_string())?
        }
    };
    let url = format!("ws://{}", proxy.addr);
    let admin = format!("http://{}", proxy.admin_addr);
    println!("NapCat simulator at {}  (QQ {})", sim.url(), sim.self_id());
    println!("lifeguard at {url}   admin at {admin}");
    wait_up(&proxy, true).await?;

    say("1. A bot connects through lifeguard: it sees exactly NapCat's frames");
    let mut ws = connect(&url).await?;
    show("recv", &next_text(&mut ws).await?);
    let call = r#"{"action":"get_login_info","params":{},"echo":"1"}"#;
    show("send", call);
    ws.send(Message::text(call))
        .await
        .map_err(|e| e.to_string())?;
    show("recv", &next_text(&mut ws).await?);
    sim.emit_message(1);
    show("recv", &next_text(&mut ws).await?);

    say("2. NapCat 3.1.10: the WebSocket server is switched off in the WebUI");
    println!(
        "   (the listener goes away; open sockets stay up, still answer pings, get no more events)"
    );
    let t0 = Instant::now();
    sim.disable_3110();
    let (texts, close) = read_to_end(&mut ws).await;
    for t in &texts {
        show("recv", t);
    }
    match close {
        Some((code, reason)) => show(
            "close",
            &format!("{code} \"{reason}\"  after {} ms", t0.elapsed().as_millis()),
        ),
        None => show("close", "(socket ended without a Close frame)"),
    }

    say("3. While NapCat is down, reconnects are refused before the upgrade");
    match tokio_tungstenite::connect_async(&url).await {
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let retry = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            show(
                "http",
                &format!("{} Retry-After: {retry} {body}", resp.status()),
            );
        }
        Ok(_) => show("http", "unexpectedly accepted"),
        Err(e) => show("http", &e.to_string()),
    }

    say("4. The server is switched back on: fresh connections work again");
    sim.enable().await.map_err(|e| e.to_string())?;
    wait_up(&proxy, true).await?;
    let mut ws = connect(&url).await?;
    show("recv", &next_text(&mut ws).await?);
    sim.emit_message(2);
    show("recv", &next_text(&mut ws).await?);

    say("5. The operator disables the backend: POST /disable on the admin listener");
    let admin_addr = proxy.admin_addr;
    let post = |path: &'static str| {
        tokio::task::spawn_blocking(move || {
            crate::cli::http_request(admin_addr, "POST", path, Duration::from_secs(5))
        })
    };
    match post("/disable").await {
        Ok(Ok((status, _))) => show("http", &format!("POST {admin}/disable -> {status}")),
        other => return Err(format!("POST /disable failed: {other:?}")),
    }
    let (texts, close) = read_to_end(&mut ws).await;
    for t in &texts {
        show("recv", t);
    }
    if let Some((code, reason)) = close {
        show("close", &format!("{code} \"{reason}\""));
    }
    match post("/enable").await {
        Ok(Ok((status, _))) => show("http", &format!("POST {admin}/enable -> {status}")),
        other => return Err(format!("POST /enable failed: {other:?}")),
    }

    if demo.keep_running {
        say("Still running: point a bot at lifeguard, then play with the backend");
        println!("   bot:        {url}  (or /event, /api)");
        println!(
            "   disable:    curl -X POST {admin}/disable    enable: curl -X POST {admin}/enable"
        );
        println!("   status:     {admin}/  (the status page)    or: lifeguard status --admin-listen {admin_addr}");
        println!("   state:      curl {admin}/state              metrics: curl {admin}/metrics");
        println!("   a sample group message is emitted every 5 s; Ctrl-C to stop");
        let mut seq = 100;
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = crate::app::wait_for_stop_signal() => break,
                _ = tick.tick() => {
                    seq += 1;
                    sim.emit_message(seq);
                }
            }
        }
    } else {
        println!("\nDone. `lifeguard demo --keep-running` keeps it up for a real bot.");
    }
    proxy.shutdown().await;
    sim.shutdown().await;
    Ok(())
}

async fn wait_up(proxy: &Proxy, up: bool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.state.snapshot().lane(crate::state::Lane::Forward).up != up {
        if Instant::now() > deadline {
            return Err("the backend never came up".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn connect(url: &str) -> Result<Ws, String> {
    tokio_tungstenite::connect_async(url)
        .await
        .map(|(ws, _)| ws)
        .map_err(|e| format!("connect {url}: {e}"))
}

async fn next_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Ok(t.to_string()),
            Ok(Some(Ok(_))) => continue,
            Ok(other) => return Err(format!("connection ended: {other:?}")),
            Err(_) => return Err("no frame within 10 s".into()),
        }
    }
}

async fn read_to_end(ws: &mut Ws) -> (Vec<String>, Option<(u16, String)>) {
    let mut texts = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => texts.push(t.to_string()),
            Ok(Some(Ok(Message::Close(f)))) => {
                let close = f
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                while let Ok(Some(_)) =
                    tokio::time::timeout(Duration::from_secs(1), ws.next()).await
                {}
                return (texts, Some(close));
            }
            Ok(Some(Ok(_))) => {}
            _ => return (texts, None),
        }
    }
}
