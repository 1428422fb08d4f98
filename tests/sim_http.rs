//! The simulator's HTTP API server (driven by a raw HTTP/1.1 client, to control keep-alive)
//! and its HTTP POST client (against a hand-written hyper receiver), on loopback.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use lifeguard::sim::{HttpServerConfig, NapSim, PostConfig, SimConfig};
use serde_json::Value;
use sha1::Sha1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(3);
const QUIET: Duration = Duration::from_millis(300);

async fn sim() -> NapSim {
    NapSim::start(SimConfig::default().with_heartbeat_interval(None))
        .await
        .expect("simulator starts")
}

/// A raw HTTP/1.1 response.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("json body")
    }
}

/// One keep-alive connection to the simulator's HTTP server.
struct Http {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl Http {
    async fn connect(addr: SocketAddr) -> Http {
        Http {
            tcp: timeout(WAIT, TcpStream::connect(addr))
                .await
                .expect("connect in time")
                .expect("connect"),
            buf: Vec::new(),
        }
    }

    /// Send a request; `headers` are extra lines like `"Authorization: Bearer x"`.
    async fn send(&mut self, method: &str, target: &str, headers: &[&str], body: &str) {
        let mut req = format!("{method} {target} HTTP/1.1\r\nHost: sim\r\n");
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        req.push_str(body);
        self.tcp.write_all(req.as_bytes()).await.expect("write");
    }

    /// The next response, or `None` if none came within `wait` or the connection ended.
    async fn read(&mut self, wait: Duration) -> Option<Resp> {
        timeout(wait, async {
            loop {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut parsed = httparse::Response::new(&mut headers);
                if let Ok(httparse::Status::Complete(head)) = parsed.parse(&self.buf) {
                    let status = parsed.code.expect("status");
                    let headers: Vec<(String, String)> = parsed
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    let len: usize = headers
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                        .map(|(_, v)| v.parse().expect("length"))
                        .unwrap_or(0);
                    if self.buf.len() >= head + len {
                        let body =
                            String::from_utf8_lossy(&self.buf[head..head + len]).into_owned();
                        self.buf.drain(..head + len);
                        return Some(Resp {
                            status,
                            headers,
                            body,
                        });
                    }
                }
                let mut chunk = [0u8; 4096];
                match self.tcp.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    async fn request(&mut self, method: &str, target: &str, headers: &[&str], body: &str) -> Resp {
        self.send(method, target, headers, body).await;
        self.read(WAIT).await.expect("a response")
    }
}

/// One request on a fresh connection.
async fn once(addr: SocketAddr, method: &str, target: &str, headers: &[&str], body: &str) -> Resp {
    Http::connect(addr)
        .await
        .request(method, target, headers, body)
        .await
}

async fn refused(addr: SocketAddr) -> bool {
    matches!(
        timeout(WAIT, TcpStream::connect(addr)).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

#[tokio::test]
async fn http_api_answers_like_napcat() {
    let sim = sim().await;
    let addr = sim
        .start_http(HttpServerConfig::default())
        .await
        .expect("http starts");
    assert_eq!(sim.http_addr(), Some(addr));
    let mut c = Http::connect(addr).await;

    let r = c.request("GET", "/get_login_info?echo=abc", &[], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(
        r.body,
        r#"{"status":"ok","retcode":0,"data":{"user_id":3889001234,"nickname":"lifeguard-bot"},"message":"","wording":"","echo":"abc","stream":"normal-action"}"#
    );
    // JSON body: echo byte for byte; the query wins over the body.
    let r = c
        .request(
            "POST",
            "/send_msg",
            &["Content-Type: application/json"],
            r#"{"message":"hi","echo":{ "seq" : 1 }}"#,
        )
        .await;
    assert_eq!(
        r.body,
        r#"{"status":"ok","retcode":0,"data":{"message_id":1},"message":"","wording":"","echo":{ "seq" : 1 },"stream":"normal-action"}"#
    );
    let r = c
        .request("POST", "/send_msg?echo=q", &[], r#"{"echo":2}"#)
        .await;
    assert_eq!(r.json()["echo"], "q");
    // A urlencoded form.
    let r = c
        .request(
            "POST",
            "/get_status",
            &["Content-Type: application/x-www-form-urlencoded"],
            "echo=7&x=%E4%BD%A0",
        )
        .await;
    assert_eq!(r.json()["echo"], "7");
    assert_eq!(r.json()["data"]["online"], true);
    // No echo: a random base-36 string.
    let r = c.request("GET", "/get_status", &[], "").await;
    let echo = r.json()["echo"].as_str().expect("string echo").to_owned();
    assert!(
        !echo.is_empty() && echo.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{echo}"
    );
    // Unknown action: HTTP 200, retcode 200, NapCat's wording.
    let r = c.request("GET", "/no_such_action?echo=3", &[], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        r#"{"status":"failed","retcode":200,"data":null,"message":"不支持的Api no_such_action","wording":"不支持的Api no_such_action","echo":"3","stream":"normal-action"}"#
    );
    // Bad JSON: 400 whatever the action.
    let r = c.request("POST", "/send_msg", &[], r#"{"echo":"#).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body, "Invalid JSON");
    // The banner.
    let r = c.request("GET", "/", &[], "").await;
    assert_eq!(r.json()["message"], "NapCat4 Is Running");
    assert_eq!(r.json()["retcode"], 0);

    assert_eq!(sim.http_requests_on("send_msg"), 3);
    assert_eq!(sim.http_requests_on("get_status"), 2);
    assert_eq!(sim.http_requests_on(""), 1);
    let statuses: Vec<u16> = sim.http_requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 200, 200, 200, 200, 200, 400, 200]);
    // The WebSocket API shares its counters: the next message id is 3.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/api", sim.url()))
        .await
        .unwrap();
    use futures_util::{SinkExt, StreamExt};
    ws.send(r#"{"action":"send_msg","echo":1}"#.into())
        .await
        .unwrap();
    let reply = ws.next().await.unwrap().unwrap();
    assert!(reply.to_text().unwrap().contains(r#""message_id":3"#));
    assert!(sim.start_http(HttpServerConfig::default()).await.is_err());
    sim.shutdown().await;
}

#[tokio::test]
async fn http_token_missing_or_wrong_is_403_and_credentials_are_recorded() {
    let sim = sim().await;
    let addr = sim
        .start_http(HttpServerConfig::default().with_token("s3cret"))
        .await
        .unwrap();
    let denied = r#"{"message":"token verify failed!"}"#;
    for (target, headers) in [
        ("/get_status", &[][..]),
        ("/get_status", &["Authorization: Bearer wrong"][..]),
        (
            "/get_status?access_token=nope",
            &["Authorization: Bearer s3cret"][..],
        ),
        ("/", &["Authorization: Token s3cret"][..]),
    ] {
        let r = once(addr, "GET", target, headers, "").await;
        assert_eq!(r.status, 403, "{target} {headers:?}");
        assert_eq!(r.body, denied);
    }
    for (target, headers) in [
        ("/get_status", &["Authorization: Bearer s3cret"][..]),
        ("/get_status?access_token=s3cret", &[][..]),
        // An empty access_token falls back to the header.
        (
            "/get_status?access_token=",
            &["Authorization: Bearer s3cret"][..],
        ),
    ] {
        let r = once(addr, "GET", target, headers, "").await;
        assert_eq!(r.status, 200, "{target} {headers:?}");
        assert_eq!(r.json()["retcode"], 0);
    }
    // The body is parsed before the token is checked.
    let r = once(addr, "POST", "/send_msg", &[], "{oops").await;
    assert_eq!(r.status, 400);
    let records = sim.http_requests();
    assert_eq!(records.len(), 8);
    assert_eq!(records[0].authorization, None);
    assert_eq!(records[1].authorization.as_deref(), Some("Bearer wrong"));
    assert_eq!(records[2].access_token.as_deref(), Some("nope"));
    assert_eq!(records[5].access_token.as_deref(), Some("s3cret"));
    assert_eq!(records[5].status, 200);
    assert_eq!(records[0].status, 403);
    sim.shutdown().await;
}

#[tokio::test]
async fn http_disable_refuses_new_connections_and_kept_alive_ones_get_server_is_closed() {
    let sim = sim().await;
    let addr = sim
        .start_http(HttpServerConfig::default().with_token("t"))
        .await
        .unwrap();
    let mut kept = Http::connect(addr).await;
    let r = kept
        .request("GET", "/get_status?access_token=t", &[], "")
        .await;
    assert_eq!(r.json()["status"], "ok");
    sim.disable_http();
    assert!(refused(addr).await);
    let r = kept
        .request("GET", "/get_status?access_token=t", &[], "")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        r#"{"status":"failed","retcode":200,"data":null,"message":"Server is closed","wording":"Server is closed","echo":null,"stream":"normal-action"}"#
    );
    // The token is still checked first.
    let r = kept.request("GET", "/get_status", &[], "").await;
    assert_eq!(r.status, 403);
    sim.enable_http().await.expect("enable on the same port");
    assert_eq!(sim.http_addr(), Some(addr));
    let r = once(addr, "GET", "/get_login_info?access_token=t", &[], "").await;
    assert_eq!(r.json()["status"], "ok");
    let r = kept
        .request("GET", "/get_status?access_token=t", &[], "")
        .await;
    assert_eq!(r.json()["status"], "ok");
    sim.shutdown().await;
}

#[tokio::test]
async fn http_hang_never_answers_and_kill_drops_connections() {
    let sim = sim().await;
    let addr = sim.start_http(HttpServerConfig::default()).await.unwrap();
    let mut c = Http::connect(addr).await;
    sim.hang();
    // Accepted, never answered.
    let mut fresh = Http::connect(addr).await;
    fresh.send("GET", "/get_status", &[], "").await;
    c.send("GET", "/get_status?echo=1", &[], "").await;
    assert!(c.read(QUIET).await.is_none());
    assert!(fresh.read(Duration::from_millis(10)).await.is_none());
    sim.unhang();
    assert_eq!(
        c.read(WAIT).await.expect("answered after unhang").json()["echo"],
        "1"
    );
    assert_eq!(fresh.read(WAIT).await.expect("answered").status, 200);

    sim.kill();
    c.send("GET", "/get_status", &[], "").await;
    assert!(
        c.read(WAIT).await.is_none(),
        "no response from a dead process"
    );
    assert!(refused(addr).await);
    assert!(
        sim.enable_http().await.is_err(),
        "a dead process enables nothing"
    );
    sim.enable().await.expect("restart");
    let r = once(addr, "GET", "/get_status", &[], "").await;
    assert_eq!(r.status, 200);
    sim.shutdown().await;
}

/// What the POST receiver got.
#[derive(Debug)]
struct Got {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

/// A framework's HTTP POST receiver: records each request and answers with `respond`.
async fn receiver(
    respond: impl Fn(&str, &[u8]) -> (u16, Vec<(&'static str, String)>, String) + Send + Sync + 'static,
) -> (String, mpsc::UnboundedReceiver<Got>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    let respond = Arc::new(respond);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (tx, respond) = (tx.clone(), Arc::clone(&respond));
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (tx, respond) = (tx.clone(), Arc::clone(&respond));
                    async move {
                        let path = req.uri().path().to_owned();
                        let headers = req.headers().clone();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let (status, extra, reply) = respond(&path, &body);
                        let _ = tx.send(Got {
                            path,
                            headers,
                            body,
                        });
                        let mut resp = Response::builder().status(status);
                        for (k, v) in extra {
                            resp = resp.header(k, v);
                        }
                        Ok::<_, Infallible>(resp.body(Full::new(Bytes::from(reply))).unwrap())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (url, rx)
}

async fn got(rx: &mut mpsc::UnboundedReceiver<Got>) -> Got {
    timeout(WAIT, rx.recv())
        .await
        .expect("a POST in time")
        .expect("receiver alive")
}

async fn nothing(rx: &mut mpsc::UnboundedReceiver<Got>) {
    if let Ok(got) = timeout(QUIET, rx.recv()).await {
        panic!("expected no POST, got {got:?}");
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn post_sends_napcat_headers_and_a_signature_that_verifies() {
    // Heartbeats on the forward server must not be posted.
    let sim = NapSim::start(
        SimConfig::default().with_heartbeat_interval(Some(Duration::from_millis(50))),
    )
    .await
    .unwrap();
    let (url, mut rx) = receiver(|_, _| (204, vec![], String::new())).await;
    let post = sim.add_post(PostConfig::napcat(url).with_token("k3y").serial());
    assert_eq!(sim.emit_message(1), 1);
    let g = got(&mut rx).await;
    assert_eq!(g.path, "/");
    assert_eq!(g.body, sim.message_event(1).as_bytes());
    assert_eq!(header(&g.headers, "content-type"), Some("application/json"));
    assert_eq!(header(&g.headers, "x-self-id"), Some("3889001234"));
    assert_eq!(header(&g.headers, "transfer-encoding"), Some("chunked"));
    let signature = header(&g.headers, "x-signature").expect("signed");
    let mut mac = Hmac::<Sha1>::new_from_slice(b"k3y").unwrap();
    mac.update(&g.body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(signature, format!("sha1={hex}"));
    // No lifecycle, no heartbeat, not even on demand.
    nothing(&mut rx).await;
    assert_eq!(sim.heartbeat_now(), 0);
    nothing(&mut rx).await;
    timeout(WAIT, post.wait_finished(1)).await.unwrap();
    let outcome = &post.outcomes()[0];
    assert_eq!(outcome.status, Some(204));
    assert_eq!(outcome.error, None);
    assert!(post.quick_operations().is_empty());

    // Without a token: no signature; with Content-Length if asked.
    let (url, mut rx) = receiver(|_, _| (204, vec![], String::new())).await;
    let _plain = sim.add_post(PostConfig::napcat(url).with_content_length());
    assert_eq!(sim.emit(r#"{"post_type":"notice"}"#), 2);
    let g = got(&mut rx).await;
    assert_eq!(header(&g.headers, "x-signature"), None);
    assert_eq!(header(&g.headers, "content-length"), Some("22"));
    sim.shutdown().await;
}

#[tokio::test]
async fn post_records_quick_operations_and_outcomes_in_order() {
    let sim = sim().await;
    let (url, mut rx) = receiver(|_, body| {
        let event: Value = serde_json::from_slice(body).unwrap();
        match event["post_type"].as_str() {
            Some("message") => (
                200,
                vec![],
                r#"{"reply":"pong","at_sender":false}"#.to_owned(),
            ),
            Some("notice") => (500, vec![], "boom".to_owned()),
            _ => (200, vec![], "not json".to_owned()),
        }
    })
    .await;
    let post = sim.add_post(PostConfig::napcat(url).serial());
    assert_eq!(sim.emit_message(1), 1);
    assert_eq!(sim.emit(r#"{"post_type":"notice","notice_type":"x"}"#), 1);
    assert_eq!(sim.emit(r#"{"post_type":"request"}"#), 1);
    for _ in 0..3 {
        got(&mut rx).await;
    }
    timeout(WAIT, post.wait_finished(3)).await.unwrap();
    let outcomes = post.outcomes();
    assert_eq!(outcomes[0].event, sim.message_event(1));
    assert_eq!(
        (outcomes[0].status, outcomes[0].error.as_deref()),
        (Some(200), None)
    );
    assert_eq!(outcomes[1].status, Some(500));
    assert!(outcomes[1].error.as_deref().unwrap().contains("500"));
    assert_eq!(outcomes[2].status, Some(200));
    assert!(
        outcomes[2].error.is_some(),
        "a non-JSON 2xx body is a failed quick operation"
    );
    let quick = post.quick_operations();
    assert_eq!(quick.len(), 1);
    assert_eq!(quick[0].event, sim.message_event(1));
    assert_eq!(quick[0].status, 200);
    assert_eq!(quick[0].body, r#"{"reply":"pong","at_sender":false}"#);
    assert_eq!(post.status().quick_operations, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn post_follows_redirects_and_reports_unreachable_targets() {
    let sim = sim().await;
    let (url, mut rx) = receiver(|path, _| match path {
        "/" => (307, vec![("location", "/moved".to_owned())], String::new()),
        _ => (200, vec![], r#"{"approve":true}"#.to_owned()),
    })
    .await;
    let post = sim.add_post(PostConfig::napcat(url).serial());
    sim.emit(r#"{"post_type":"request"}"#);
    assert_eq!(got(&mut rx).await.path, "/");
    let second = got(&mut rx).await;
    assert_eq!(second.path, "/moved");
    assert_eq!(second.body, r#"{"post_type":"request"}"#.as_bytes());
    timeout(WAIT, post.wait_finished(1)).await.unwrap();
    assert_eq!(post.outcomes()[0].status, Some(200));
    assert_eq!(post.quick_operations().len(), 1);

    // Nobody listening: an error outcome, no retry.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}/", l.local_addr().unwrap())
    };
    let post = sim.add_post(PostConfig::napcat(dead));
    sim.emit(r#"{"post_type":"notice"}"#);
    timeout(WAIT, post.wait_finished(1)).await.unwrap();
    let outcome = &post.outcomes()[0];
    assert_eq!(outcome.status, None);
    assert!(outcome.error.is_some());
    tokio::time::sleep(QUIET).await;
    assert_eq!(post.status().finished, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn post_disable_hang_kill_and_heartbeats() {
    let sim = sim().await;
    let (url, mut rx) = receiver(|_, _| (204, vec![], String::new())).await;
    let post = sim.add_post(PostConfig::napcat(url));
    post.disable();
    assert_eq!(sim.emit_message(1), 0);
    nothing(&mut rx).await;
    post.enable();
    // Concurrent by default: every event arrives, in some order.
    for seq in 1..=20 {
        assert_eq!(sim.emit_message(seq), 1);
    }
    let mut seen: Vec<Bytes> = Vec::new();
    for _ in 0..20 {
        seen.push(got(&mut rx).await.body);
    }
    seen.sort();
    let mut expected: Vec<Bytes> = (1..=20)
        .map(|s| Bytes::from(sim.message_event(s)))
        .collect();
    expected.sort();
    assert_eq!(seen, expected);

    sim.hang();
    assert_eq!(sim.emit_message(99), 0);
    nothing(&mut rx).await;
    sim.unhang();
    sim.kill();
    assert_eq!(sim.emit_message(99), 0);
    nothing(&mut rx).await;
    sim.enable().await.unwrap();
    assert_eq!(sim.emit_message(100), 1);
    assert_eq!(got(&mut rx).await.body, sim.message_event(100).as_bytes());

    // go-cqhttp style heartbeats over POST, if asked for.
    let (url, mut rx) = receiver(|_, _| (204, vec![], String::new())).await;
    let _hb = sim.add_post(
        PostConfig::napcat(url).with_heartbeat_interval(Some(Duration::from_millis(100))),
    );
    let hb: Value = serde_json::from_slice(&got(&mut rx).await.body).unwrap();
    assert_eq!(hb["meta_event_type"], "heartbeat");
    assert_eq!(hb["interval"], 100);
    // On demand too, but only to the entry that POSTs heartbeats.
    assert_eq!(sim.heartbeat_now(), 1);
    sim.shutdown().await;
}
